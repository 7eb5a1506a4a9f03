// The tablet's screen (docs/ui.md). It only reads: the status push channel and the
// relative's media, both on this origin. Nothing here can start, extend or end a call.
"use strict";
(() => {
  const WARN_MS = 60_000;          // the warning shows at one minute left
  const RECONNECT_MS = 500;        // after the daemon closes a websocket (restart)
  const TICK_MS = 50;              // countdown refresh; the display leads by one tick
  const MAX_DECODE_QUEUE = 30;     // video frames waiting to decode before we drop to a keyframe
  const AUDIO_LEAD_S = 0.06;       // audio scheduled this far ahead of the audio clock
  const DELIVERY_MARGIN_MS = 100;  // a push may reach the page this late (see remainingMs)
  const LANGUAGES = ["fr", "en"];

  const params = new URLSearchParams(location.search);
  const texts = {};
  const stats = {
    statusMessages: 0, videoChunks: 0, videoFramesDrawn: 0, audioChunksDecoded: 0,
    selfFramesDrawn: 0,   // the tablet's own camera, in the small preview
    decodeErrors: 0, lastFrameAt: null, mediaOpen: false, mediaStoppedAt: null,
    screensShown: 0, shown: [],   // the last 100 screens shown: {screen, at (epoch ms), n}
  };
  let status = null;       // the last status object pushed by the daemon
  let receivedAt = 0;      // performance.now() when it arrived
  let deadline = null;     // {call, at}: the call's end on performance.now()'s clock
  let connected = false;
  let shownScreen = null;
  let media = null;        // the live call's media pipeline, while the screen is "live"
  let generation = 0;      // bumped at every stop: late decoder output is then discarded

  const $ = (id) => document.getElementById(id);

  function language() {
    const asked = params.get("lang");
    if (LANGUAGES.includes(asked)) return asked;
    const configured = status && status.ui && status.ui.language;
    return LANGUAGES.includes(configured) ? configured : "fr";
  }

  function t(key, vars = {}) {
    const table = texts[language()] || {};
    const text = table[key] ?? texts.fr?.[key] ?? key;
    return text.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ""));
  }

  // ---- time -------------------------------------------------------------------------------

  // The time left comes from the daemon only: each push's remaining_ms, counted down on
  // performance.now() since the push arrived. A push that arrives late makes the call look
  // longer, so the page keeps the earliest end any push of this call implies (never above
  // the last pushed value), minus DELIVERY_MARGIN_MS for the delay no push can reveal.
  function noteDeadline() {
    const s = status && status.session;
    if (!s || s.remaining_ms === null || s.remaining_ms === undefined) {
      deadline = null;
      return;
    }
    const call = `${s.id}/${s.deadline_boot_ns}`;
    const at = receivedAt + s.remaining_ms;
    if (deadline === null || deadline.call !== call || at < deadline.at) deadline = { call, at };
  }

  function remainingMs() {
    if (deadline === null) return null;
    return Math.max(0, deadline.at - performance.now() - DELIVERY_MARGIN_MS);
  }

  function startsInMs() {
    const s = status && status.session;
    if (!s || s.starts_in_ms === null || s.starts_in_ms === undefined) return null;
    return Math.max(0, s.starts_in_ms - Math.max(0, performance.now() - receivedAt));
  }

  function mmss(ms) {
    const total = Math.floor(ms / 1000);   // rounded down: never more than is left
    const m = Math.floor(total / 60), s = total % 60;
    return `${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}`;
  }

  // ---- screens ----------------------------------------------------------------------------

  function screenName() {
    return connected && status ? status.screen : "offline";
  }

  function batteryText() {
    const p = status && status.power;
    if (!p || p.battery_pct === null || p.battery_pct === undefined) return "";
    let text = t(p.battery_low ? "battery_low" : "battery", { pct: p.battery_pct });
    if (p.charging === "charging" || p.charging === "full") text += ` — ${t(p.charging)}`;
    return text;
  }

  function endReasonText(reason) {
    const key = `reason_${reason}`;
    return texts.fr && key in texts.fr ? t(key) : t("reason_other");
  }

  function lockedReasonText(reason) {
    return reason === "tamper" || reason === "engineer_cutoff"
      ? t(`locked_${reason}`) : t("locked_other");
  }

  function upcomingLines() {
    const left = startsInMs();
    if (left === null || left <= 0) return [t("upcoming_waiting"), ""];
    const parts = [];
    if (status.server_time_ms !== null && status.server_time_ms !== undefined) {
      const at = new Date(status.server_time_ms + status.session.starts_in_ms);
      const time = new Intl.DateTimeFormat(language(), {
        hour: "2-digit", minute: "2-digit", hourCycle: "h23" })
        .format(at);
      parts.push(t("upcoming_at", { time }));
    }
    parts.push(left < 60_000 ? t("upcoming_in_less")
      : t("upcoming_in", { n: Math.ceil(left / 60_000) }));
    return [parts.join(" "), t("upcoming_waiting")];
  }

  function panelFor(screen) {
    const s = status && status.session;
    switch (screen) {
      case "idle":
        return { title: t("idle_title"), line1: "", line2: t("idle_hint") };
      case "upcoming": {
        const [line1, line2] = upcomingLines();
        return { title: t("upcoming_title", { contact: s ? s.contact : "" }), line1, line2 };
      }
      case "ended":
        return { title: t("ended_title"), line1: endReasonText(s && s.end_reason),
                 line2: t("ended_hint") };
      case "docked":
        return { title: t("docked_title"), line1: batteryText(), line2: t("docked_hint") };
      case "locked":
        return { title: t("locked_title"), line1: lockedReasonText(status.locked_reason),
                 line2: t("locked_hint") };
      case "fault":
        return { title: t("fault_title"), line1: t("fault_hint"), line2: "",
                 code: t("fault_code", { code: status.fault_code || "E199" }) };
      case "live":
        return null;
      default:
        return { title: t("offline_title"), line1: "", line2: t("offline_hint") };
    }
  }

  function render() {
    const screen = screenName();
    document.documentElement.lang = language();
    document.body.dataset.screen = screen;
    for (const el of document.querySelectorAll("[data-t]")) el.textContent = t(el.dataset.t);
    const panel = panelFor(screen);
    $("panel").hidden = panel === null;
    $("live").hidden = panel !== null;
    if (panel !== null) {
      $("title").textContent = panel.title;
      $("line1").textContent = panel.line1;
      $("line2").textContent = panel.line2;
      $("code").hidden = !panel.code;
      $("code").textContent = panel.code || "";
    }
    $("battery").textContent = screen === "docked" ? "" : batteryText();
    const refused = status && status.outbox && status.outbox.calls_refused;
    $("notice").textContent = refused && (screen === "idle" || screen === "upcoming")
      ? t("calls_refused") : "";
    if (screen === "live") startMedia(); else stopMedia();
    tick();
    if (screen !== shownScreen) {
      shownScreen = screen;
      requestAnimationFrame(() => {
        stats.screensShown += 1;
        stats.shown.push({ screen, at: performance.timeOrigin + performance.now(),
                           n: stats.screensShown });
        if (stats.shown.length > 100) stats.shown.shift();
      });
    }
  }

  function tick() {
    const screen = screenName();
    if (screen === "live") {
      const ms = remainingMs() ?? 0;
      // What will be left at the next tick: the text never shows more than is left while
      // it stays on screen.
      $("countdown").textContent = mmss(Math.max(0, ms - TICK_MS));
      const warn = ms <= WARN_MS;
      $("warning").hidden = !warn;
      $("countdown-box").classList.toggle("warn", warn);
      $("link-lost").hidden = !!status.link.connected;
    } else if (screen === "upcoming") {
      const [line1] = upcomingLines();
      if ($("line1").textContent !== line1) $("line1").textContent = line1;
    }
  }

  // ---- the relative's media (docs/status-api.md, /v1/media/stream) ---------------------------

  function parseFrame(buf) {
    const v = new DataView(buf);
    return {
      stream: v.getUint8(1), key: (v.getUint8(2) & 1) === 1,
      captureUs: Number(v.getBigUint64(8)), payload: new Uint8Array(buf, 16),
    };
  }

  // "avc1.PPCCLL" from the SPS (NAL type 7) in an Annex B access unit; null without one.
  function avcCodec(data) {
    for (let i = 0; i + 6 < data.length; i++) {
      if (data[i] === 0 && data[i + 1] === 0 && data[i + 2] === 1 && (data[i + 3] & 0x1f) === 7) {
        const hex = (b) => b.toString(16).padStart(2, "0");
        return `avc1.${hex(data[i + 4])}${hex(data[i + 5])}${hex(data[i + 6])}`;
      }
    }
    return null;
  }

  // A video sink: a canvas and the decoder feeding it (the relative, or the own preview).
  function drawFrame(gen, sink, frame) {
    if (gen !== generation || !media) { frame.close(); return; }
    const canvas = $(sink.canvas);
    if (canvas.width !== frame.displayWidth) canvas.width = frame.displayWidth;
    if (canvas.height !== frame.displayHeight) canvas.height = frame.displayHeight;
    canvas.getContext("2d").drawImage(frame, 0, 0);
    frame.close();
    stats.lastFrameAt = performance.now();
    if (sink.canvas === "remote") {
      stats.videoFramesDrawn += 1;
      $("remote-waiting").hidden = true;
    } else {
      stats.selfFramesDrawn += 1;
    }
  }

  function playAudio(gen, data) {
    if (gen !== generation || !media) { data.close(); return; }
    const ctx = media.audioCtx;
    const buffer = ctx.createBuffer(data.numberOfChannels, data.numberOfFrames, data.sampleRate);
    for (let ch = 0; ch < data.numberOfChannels; ch++) {
      data.copyTo(buffer.getChannelData(ch), { planeIndex: ch, format: "f32-planar" });
    }
    data.close();
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const at = Math.max(ctx.currentTime + AUDIO_LEAD_S, media.audioAt);
    source.start(at);
    media.audioAt = at + buffer.duration;
    stats.audioChunksDecoded += 1;
  }

  function onVideo(sink, frame) {
    if (sink.decoder === null || sink.decoder.state === "closed") {
      if (!frame.key) return;                  // decode starts at a keyframe
      const codec = avcCodec(frame.payload);
      if (codec === null) return;
      const gen = generation;
      sink.decoder = new VideoDecoder({
        output: (f) => drawFrame(gen, sink, f),
        error: () => { stats.decodeErrors += 1; },
      });
      sink.decoder.configure({ codec, optimizeForLatency: true });
    } else if (sink.decoder.decodeQueueSize > MAX_DECODE_QUEUE) {
      sink.decoder.close();                     // too far behind: restart at the next keyframe
      return;
    }
    sink.decoder.decode(new EncodedVideoChunk({
      type: frame.key ? "key" : "delta", timestamp: frame.captureUs, data: frame.payload,
    }));
    stats.videoChunks += 1;
  }

  function onAudio(frame) {
    const m = media;
    if (m.audio.state !== "configured") return;
    m.audio.decode(new EncodedAudioChunk({
      type: "key", timestamp: frame.captureUs, data: frame.payload,
    }));
  }

  // /v1/media/stream: the relative's video and sound; /v1/media/self: the tablet's own
  // camera (video only, never played back: no echo). Both only while the call is live.
  function openMediaSocket(path, sink, withAudio) {
    const gen = generation;
    const ws = new WebSocket(`ws://${location.host}${path}`);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (ev) => {
      if (gen !== generation || !media) return;
      const frame = parseFrame(ev.data);
      try {
        if (frame.stream === 0) onVideo(sink, frame);
        else if (frame.stream === 1 && withAudio) onAudio(frame);
      } catch (err) {
        stats.decodeErrors += 1;
      }
    };
    ws.onclose = () => {
      if (gen === generation && media) setTimeout(() => {
        if (gen === generation && media) sink.ws = openMediaSocket(path, sink, withAudio);
      }, RECONNECT_MS);
    };
    return ws;
  }

  function startMedia() {
    if (media) return;
    const gen = generation;
    const audioCtx = new AudioContext({ sampleRate: 48_000, latencyHint: "interactive" });
    const audio = new AudioDecoder({
      output: (d) => playAudio(gen, d),
      error: () => { stats.decodeErrors += 1; },
    });
    audio.configure({ codec: "opus", sampleRate: 48_000, numberOfChannels: 1 });
    media = {
      remote: { ws: null, decoder: null, canvas: "remote" },
      own: { ws: null, decoder: null, canvas: "self-video" },
      audio, audioCtx, audioAt: 0,
    };
    media.remote.ws = openMediaSocket("/v1/media/stream", media.remote, true);
    media.own.ws = openMediaSocket("/v1/media/self", media.own, false);
    $("remote-waiting").hidden = false;
    stats.mediaOpen = true;
  }

  // At the cut: no frame is drawn or played after this, whatever is still in flight.
  function stopMedia() {
    if (!media) return;
    const m = media;
    media = null;
    generation += 1;
    for (const sink of [m.remote, m.own]) {
      sink.ws.onclose = null;
      sink.ws.close();
    }
    for (const codec of [m.remote.decoder, m.own.decoder, m.audio]) {
      if (codec && codec.state !== "closed") codec.close();
    }
    m.audioCtx.close();
    for (const id of ["remote", "self-video"]) {
      const canvas = $(id);
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    }
    stats.mediaOpen = false;
    stats.mediaStoppedAt = performance.now();
  }

  // ---- the status push channel ------------------------------------------------------------

  function connect() {
    const ws = new WebSocket(`ws://${location.host}/v1/status/stream`);
    ws.onopen = () => { connected = true; };
    ws.onmessage = (ev) => {
      status = JSON.parse(ev.data);
      receivedAt = performance.now();
      noteDeadline();
      stats.statusMessages += 1;
      render();
    };
    ws.onclose = () => {
      connected = false;
      status = null;
      deadline = null;
      render();
      setTimeout(connect, RECONNECT_MS);
    };
  }

  async function start() {
    // for tests and bench/screen.py: read-only views of the page's state
    window.tabletd = { stats, remainingMs, get status() { return status; } };
    await Promise.all(LANGUAGES.map(async (lang) => {
      const resp = await fetch(`/ui/lang/${lang}.json`);
      texts[lang] = await resp.json();
    }));
    render();
    setInterval(tick, TICK_MS);
    connect();
  }

  start();
})();
