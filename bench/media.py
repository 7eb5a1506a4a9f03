"""Benchmark: what forwarding a 720p25 call costs the daemon, and how late its media arrives.

Run from the repository root, with the project installed::

    python bench/media.py                 # defaults: a 60 s window, a 60 s idle baseline
    python bench/media.py --help          # --seconds, --idle-seconds

What it measures (issue 4, item 7)
----------------------------------
1280x720 at 25 fps H.264 at 1.5 Mbit/s, plus Opus (48 kHz mono, 20 ms packets), through the
daemon to the reference server on loopback, beside a bare websockets client sending the same
frames in the same run.

**The clip is encoded once, before anything is measured**: ``--seconds`` of a moving test
pattern with a patch of noise (so that the rate control really spends 1.5 Mbit/s) through
libx264 with the settings of the simulated camera (constrained baseline, ultrafast,
zerolatency, an IDR with SPS/PPS every 2 s) plus a VBV of 1.5 Mbit/s over 1 s, as a hardware
encoder keeps; and a 440 Hz tone through libopus. No encoder runs while measuring.

Three processes, plus this one:

* **the server** (this process): the real :class:`~tabletd.devserver.server.DevServer`,
  recording both sessions as usual, its binary-frame handler wrapped to note the
  CLOCK_BOOTTIME at which each frame reaches it. Its CPU is not counted anywhere.
* **the daemon** (a child process): the real :class:`~tabletd.daemon.Daemon` on the simulated
  board (``config/sim.toml``, media set to 720p25 at 1.5 Mbit/s), its camera and microphone
  replaced by :class:`PrerecordedSource` s that replay the clip from a thread each, at the
  real rate, with ``capture_us`` = CLOCK_BOOTTIME at hand-over. Everything else is the
  daemon's own path: ``call_soon_threadsafe`` -> ``Daemon._media_frame`` ->
  ``LinkClient.push_media`` -> :class:`~tabletd.media.uplink.UplinkQueue` ->
  ``LinkClient._send_media`` -> ``encode_frame`` -> websockets over mutual TLS.
* **the bare client** (a child process): ``websockets.asyncio.client`` over the same mutual
  TLS to the same server (a second registered device), ``hello``, then on the server's
  ``start`` two asyncio tasks (video, audio) that send the same frames with ``encode_frame``
  at the same pace: the least any client could do.

The server books both devices one call at the same time. Each child measures its own
process CPU (``getrusage(RUSAGE_SELF)``: every thread, user + system) over

* an **idle baseline**: ``--idle-seconds`` (default: as long as the window) connected and
  granted, before the call; and
* the **live window**: the first ``--seconds`` of the call (from the daemon's ``RailOn`` /
  the bare client's ``start``); the call lasts 3 s more, so the cut is outside it.

**Forwarding CPU** = window CPU - idle CPU rate x window length: what the media cost, the
daemon's housekeeping (watchdogs, rail guard, pings) subtracted. For the daemon it includes
the source threads' hand-over (a camera's callback does the same); for the bare client, its
pacing tasks. Target: daemon <= 1.3 x bare.

**Latency** = server arrival - ``capture_us``, both CLOCK_BOOTTIME (one machine, so one
clock across processes), for the frames captured in the window. Target: daemon p99 <= 10 ms.
The bare client's figures show what the server, TLS and the machine account for.

**RSS**: VmRSS of each process, sampled every second in the window (max), and VmHWM. Both
processes hold the clip in memory (shown), which the real daemon does not.

Diagnostics (no targets): the source threads' own CPU (read from their per-thread clocks at
the window's ends, nothing per frame) and "the rest", the loop side, beside the bare client;
the three latest frames of each client with when they were captured (s into the window);
and every call the daemon's loop made into its outbox in the window (``EventStore.append``,
``ack``, ``pending``, timed by a wrapper): ``append`` and ``ack`` commit with fsync on the
loop that forwards media, so a slow disk shows up there as media latency.

How to read it
--------------
A table, then one JSON line (the last line printed) with every figure, the targets and the
verdicts. Exit status 0 when both targets are met, 1 otherwise. Frames "fed" are handed over
by the sources, "sent" went to the socket, "dropped" are the uplink queue's drops (by reason
below the table: ``cleared`` counts the frames queued at the cut, after the window). "late
slots" are frame times a source or pacer thread missed (the machine was too busy): they
shift the send times but not the latency, which is measured from hand-over. All three
processes share the machine (its CPU count and load are printed): other work shows up as
latency tails and, less, as CPU. This is a benchmark, not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import multiprocessing as mp
import os
import random
import resource
import ssl
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from fractions import Fraction
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, TypeAlias
from unittest import mock

from benchlib import summary

try:
    import av
    from websockets.asyncio.client import ClientConnection, connect

    import tabletd.daemon as daemon_module
    from tabletd import __version__
    from tabletd.clock import BootClock, boot_id
    from tabletd.config import Config, LinkConfig, load_config
    from tabletd.daemon import Daemon
    from tabletd.devserver import ca
    from tabletd.devserver.server import DevServer, _Connection
    from tabletd.devserver.store import Store
    from tabletd.events import EventStore
    from tabletd.hardware.camera import FaultCallback, FrameCallback, MediaSource, SourceHealth
    from tabletd.link.client import SUBPROTOCOL
    from tabletd.link.messages import (
        GrantMsg,
        Hello,
        OutboxSummary,
        ProtocolError,
        Start,
        Welcome,
        decode_server_message,
        encode,
    )
    from tabletd.logs import setup_logging
    from tabletd.media.frames import (
        HEADER_SIZE,
        MAX_BINARY_FRAME,
        MediaFrame,
        Stream,
        encode_frame,
    )
    from tabletd.media.uplink import UplinkStats
    from tabletd.session import Action, RailOn, Record, State
except ImportError as exc:  # pragma: no cover - a usage error, said plainly
    raise SystemExit(f"bench/media.py: {exc}; run it with the interpreter tabletd is "
                     "installed in, e.g. .venv/bin/python bench/media.py") from None

REPO = Path(__file__).resolve().parent.parent
SIM_CONFIG = REPO / "config" / "sim.toml"

WIDTH, HEIGHT, FPS = 1280, 720, 25
VIDEO_BITRATE = 1_500_000
GOP = 2 * FPS  # protocol 6.2: a keyframe at least every 2 s
AUDIO_BITRATE = 32_000
OPUS_RATE = 48_000
OPUS_SAMPLES = 960
AUDIO_PERIOD_S = OPUS_SAMPLES / OPUS_RATE  # 20 ms
NOISE_W, NOISE_H = 160, 96  # a noise patch: the rate control spends the whole bitrate
BARE_DEVICE = "tablet-bare-0001"
SETTLE_S = 1.0  # after the grant, before the idle baseline (its events and acks)
LEAD_S = 3.0  # after the idle baseline, before the call starts
TAIL_S = 3  # the call lasts this much longer than the window: the cut is outside it

TARGET_CPU_RATIO = 1.3
TARGET_P99_MS = 10.0

Unit: TypeAlias = tuple[bool, bytes]  # (keyframe, one access unit or Opus packet)
Arrival: TypeAlias = tuple[int, bool, int, int]  # (stream, keyframe, capture_us, arrival_us)
Report: TypeAlias = dict[str, Any]  # plain data: what a child sends back through its pipe


def boot_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000


# ---- the clip, encoded once before anything is measured ------------------------------------


def encode_video(seconds: float) -> list[Unit]:
    """``seconds`` (rounded up to whole 2 s groups) of 720p25 H.264 at 1.5 Mbit/s."""
    count = math.ceil(seconds * FPS / GOP) * GOP
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    ctx.time_base = Fraction(1, FPS)
    ctx.framerate = Fraction(FPS, 1)
    ctx.bit_rate = VIDEO_BITRATE
    ctx.gop_size = GOP
    kbps = VIDEO_BITRATE // 1000
    ctx.options = {  # SimCamera's settings, plus a VBV as a hardware encoder keeps one
        "preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
        "forced-idr": "1",
        "x264-params": (f"repeat-headers=1:keyint={GOP}:scenecut=0:"
                        f"vbv-maxrate={kbps}:vbv-bufsize={kbps * 2 // 3}"),
    }
    ctx.open()
    period = 64
    stripe = bytes(16 + (i * 219 // (period - 1)) for i in range(period))
    row = (stripe * (WIDTH // period + 2))[: WIDTH + period]
    probe = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
    pad = b"\x00" * (probe.planes[0].line_size - WIDTH)
    chroma_u = bytes([96]) * probe.planes[1].buffer_size
    chroma_v = bytes([160]) * probe.planes[2].buffer_size
    x0, y0 = (WIDTH - NOISE_W) // 2, (HEIGHT - NOISE_H) // 2
    rng = random.Random(7)
    units: list[Unit] = []
    for n in range(count):
        lines = []
        for r in range(HEIGHT):
            p = (period - (n * 4 + r) % period) % period
            line = row[p : p + WIDTH]
            if y0 <= r < y0 + NOISE_H:
                line = line[:x0] + rng.randbytes(NOISE_W) + line[x0 + NOISE_W :]
            lines.append(line + pad)
        frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
        frame.planes[0].update(b"".join(lines))
        frame.planes[1].update(chroma_u)
        frame.planes[2].update(chroma_v)
        frame.pts = n
        units.extend((bool(pk.is_keyframe), bytes(pk)) for pk in ctx.encode(frame))
    units.extend((bool(pk.is_keyframe), bytes(pk)) for pk in ctx.encode(None))
    if len(units) != count or not units[0][0]:
        raise RuntimeError(f"encoder gave {len(units)} units for {count} frames")
    return units


def encode_audio(seconds: float) -> list[Unit]:
    """``seconds`` of a 440 Hz tone, Opus 48 kHz mono, 20 ms packets."""
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate = OPUS_RATE
    ctx.layout = "mono"
    ctx.format = "s16"
    ctx.bit_rate = AUDIO_BITRATE
    ctx.time_base = Fraction(1, OPUS_RATE)
    ctx.options = {"application": "voip", "frame_duration": "20"}
    ctx.open()
    peak = 0.25 * 32767
    second = b"".join(  # 440 whole cycles: loops seamlessly
        int(peak * math.sin(2 * math.pi * 440 * i / OPUS_RATE)).to_bytes(2, "little", signed=True)
        for i in range(OPUS_RATE))
    chunk = 2 * OPUS_SAMPLES
    units: list[Unit] = []
    for n in range(round(seconds / AUDIO_PERIOD_S)):
        frame = av.AudioFrame(format="s16", layout="mono", samples=OPUS_SAMPLES)
        frame.sample_rate = OPUS_RATE
        offset = n * chunk % len(second)
        frame.planes[0].update(second[offset : offset + chunk])
        frame.pts = n * OPUS_SAMPLES
        units.extend((True, bytes(pk)) for pk in ctx.encode(frame))
    units.extend((True, bytes(pk)) for pk in ctx.encode(None))
    return units


# ---- the daemon's media source: the clip, replayed ---------------------------------------


class PrerecordedSource:
    """A :class:`~tabletd.hardware.camera.MediaSource` that replays pre-encoded units.

    One thread of its own, like a camera's: every ``period_s`` (on an absolute monotonic
    schedule) it hands the next unit (looping) to ``on_frame`` as a
    :class:`~tabletd.media.frames.MediaFrame`, ``seq`` +1 per frame, ``capture_us`` the
    CLOCK_BOOTTIME of the hand-over. A slot missed by a whole period is skipped (counted in
    :attr:`late_slots`), never caught up in a burst; the units stay in order, so the stream
    still decodes. A recording cannot make an IDR on demand: :meth:`request_keyframe` is
    counted; the clip has one every 2 s anyway.
    """

    def __init__(self, stream: Stream, units: Sequence[Unit], period_s: float,
                 name: str) -> None:
        if not units:
            raise ValueError(f"{name}: nothing to replay")
        self.stream = stream
        self.name = name
        self._units = units
        self._period_s = period_s
        self._clock = BootClock()
        self._lock = threading.Lock()
        self._frames = 0
        self._last_ns: int | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.keyframe_requests = 0
        self.late_slots = 0
        self._cpu_at_exit = 0.0

    def start(self, on_frame: FrameCallback, on_fault: FaultCallback | None = None) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"{self.name} is already started")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(on_frame, self._stopping),
                                        name=self.name, daemon=True)
        self._thread.start()

    def request_keyframe(self) -> None:
        self.keyframe_requests += 1

    def stop(self) -> None:
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)

    @property
    def health(self) -> SourceHealth:
        with self._lock:
            return SourceHealth(frames=self._frames, last_frame_ns=self._last_ns)

    @property
    def thread_cpu_s(self) -> float:
        """The source thread's own CPU time so far (read from outside: nothing per frame)."""
        thread = self._thread
        if thread is not None and thread.ident is not None and thread.is_alive():
            with contextlib.suppress(OSError):
                return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        return self._cpu_at_exit

    def _run(self, on_frame: FrameCallback, stopping: threading.Event) -> None:
        units, period = self._units, self._period_s
        start = time.monotonic()
        slot = 0
        sent = 0
        while True:
            delay = start + slot * period - time.monotonic()
            if delay > 0:
                if stopping.wait(delay):
                    break
            elif -delay >= period:
                late = int(-delay / period)
                slot += late
                self.late_slots += late
            if stopping.is_set():
                break
            keyframe, payload = units[sent % len(units)]
            now_ns = self._clock.boot_ns()
            on_frame(MediaFrame(self.stream, keyframe, sent % 2**32, now_ns // 1000, payload))
            sent += 1
            slot += 1
            with self._lock:
                self._frames = sent
                self._last_ns = now_ns
        self._cpu_at_exit = time.thread_time()


def _check_protocol(source: PrerecordedSource) -> MediaSource:
    return source  # mypy: PrerecordedSource implements MediaSource


# ---- what each client process measures about itself ------------------------------------


@dataclasses.dataclass(frozen=True)
class Usage:
    """This process's resource usage at one instant (every thread)."""

    mono_s: float
    boot_us: int
    user_s: float
    sys_s: float
    vcsw: int
    ivcsw: int

    @classmethod
    def now(cls) -> Usage:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return cls(time.monotonic(), boot_us(), r.ru_utime, r.ru_stime, r.ru_nvcsw, r.ru_nivcsw)

    def since(self, before: Usage) -> Report:
        user, sys_ = self.user_s - before.user_s, self.sys_s - before.sys_s
        return {"wall_s": self.mono_s - before.mono_s, "cpu_s": user + sys_, "user_s": user,
                "sys_s": sys_, "vcsw": self.vcsw - before.vcsw,
                "ivcsw": self.ivcsw - before.ivcsw, "from_boot_us": before.boot_us,
                "to_boot_us": self.boot_us}


def memory_kb() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in kB."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


class Window:
    """Usage and counters of this process over the live window: :meth:`begin` at the call's
    start, finished ``seconds`` later by a timer on the loop; RSS sampled every second."""

    def __init__(self, seconds: float, counters: Callable[[], Report]) -> None:
        self.seconds = seconds
        self.counters = counters
        self.done = asyncio.Event()
        self.started = False
        self._start: Usage | None = None
        self._from: Report = {}
        self.report: Report = {}
        self._rss_max = 0

    def begin(self) -> None:
        if self.started:
            return
        self.started = True
        loop = asyncio.get_running_loop()
        self._from = self.counters()
        self._start = Usage.now()
        loop.call_later(1.0, self._sample)
        loop.call_later(self.seconds, self._finish)

    def _sample(self) -> None:
        if self.done.is_set():
            return
        self._rss_max = max(self._rss_max, memory_kb()["VmRSS"])
        asyncio.get_running_loop().call_later(1.0, self._sample)

    def _finish(self) -> None:
        end = Usage.now()
        assert self._start is not None
        mem = memory_kb()
        self.report = {"live": end.since(self._start), "from": self._from,
                       "to": self.counters(), "rss_kb_max": max(self._rss_max, mem["VmRSS"]),
                       "rss_kb_end": mem["VmRSS"], "hwm_kb": mem["VmHWM"]}
        self.done.set()


async def idle_baseline(seconds: float) -> Report:
    before = Usage.now()
    await asyncio.sleep(seconds)
    return Usage.now().since(before)


async def poll(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Wait for a condition, outside any measured window."""
    try:
        async with asyncio.timeout(within):
            while True:
                if predicate():
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise RuntimeError(f"timed out after {within:g} s waiting for {what}") from None


def clip_bytes(*clips: Sequence[Unit]) -> int:
    return sum(len(payload) for clip in clips for _, payload in clip)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What both children are told (plain data, pickled to them)."""

    port: int
    srv_dir: str
    state_dir: str
    seconds: float
    idle_seconds: float


def child_main(role: str, out: Connection, plan: Plan, video: list[Unit],
               audio: list[Unit]) -> None:
    """A child process: ``role`` is "daemon" or "bare"; reports go up ``out``."""
    try:
        setup_logging("error")
        side = daemon_side if role == "daemon" else bare_side
        asyncio.run(side(out, plan, video, audio))
    except BaseException:
        out.send(("error", {"role": role, "traceback": traceback.format_exc()}))
        raise


# ---- the daemon side ----------------------------------------------------------------------


def daemon_config(plan: Plan) -> Config:
    cfg = load_config(SIM_CONFIG)
    srv = Path(plan.srv_dir)
    dev = srv / ca.DEVICES / cfg.device.id
    return dataclasses.replace(
        cfg,
        status_api=dataclasses.replace(cfg.status_api, port=0),
        sim=dataclasses.replace(cfg.sim, self_grant_s=0),
        media=dataclasses.replace(cfg.media, width=WIDTH, height=HEIGHT, fps=FPS,
                                  bitrate=VIDEO_BITRATE, audio=True),
        link=LinkConfig(url=f"wss://127.0.0.1:{plan.port}/", ca_file=str(dev / ca.CA_CERT),
                        cert_file=str(dev / ca.DEVICE_CERT), key_file=str(dev / ca.DEVICE_KEY),
                        grant_public_key=ca.grant_public_key_b64(srv),
                        backoff_base_s=0.05, backoff_cap_s=0.5),
    )


def time_store_calls(store: EventStore, log: list[tuple[str, int, float]]) -> None:
    """Wrap the daemon's outbox calls that run on its loop (``append``, ``ack``, ``pending``)
    to note (name, CLOCK_BOOTTIME µs at entry, ms spent): they block the loop that forwards
    media (``append`` and ``ack`` commit with fsync). A handful of calls per call: no cost
    worth counting."""
    for name in ("append", "ack", "pending"):
        inner: Callable[..., Any] = getattr(store, name)

        def timed(*a: Any, _inner: Callable[..., Any] = inner, _name: str = name,
                  **kw: Any) -> Any:
            t0 = time.perf_counter_ns()
            at = boot_us()
            try:
                return _inner(*a, **kw)
            finally:
                log.append((_name, at, (time.perf_counter_ns() - t0) / 1e6))

        setattr(store, name, timed)


def uplink_counters(stats: UplinkStats) -> Report:
    return {f"uplink_{k}": v for k, v in dataclasses.asdict(stats).items()}


async def daemon_side(out: Connection, plan: Plan, video: list[Unit],
                      audio: list[Unit]) -> None:
    cfg = daemon_config(plan)
    camera = PrerecordedSource(Stream.VIDEO, video, 1 / FPS, "prerecorded-camera")
    microphone = PrerecordedSource(Stream.AUDIO, audio, AUDIO_PERIOD_S, "prerecorded-mic")

    def open_prerecorded(cfg: Config) -> tuple[MediaSource, MediaSource | None]:
        return _check_protocol(camera), _check_protocol(microphone)

    daemon = Daemon(cfg, Path(plan.state_dir), environ={})

    def counters() -> Report:
        link = daemon.link
        assert link is not None
        sources = (camera, microphone)
        return {"fed": sum(s.health.frames for s in sources), "sent": link.media_sent,
                "late_slots": sum(s.late_slots for s in sources),
                "source_cpu_s": sum(s.thread_cpu_s for s in sources),
                "keyframe_requests": camera.keyframe_requests,
                **uplink_counters(link.uplink.stats)}

    window = Window(plan.seconds, counters)
    ended = asyncio.Event()

    def observe(action: Action, now: int) -> None:  # on the loop, from Daemon._apply
        if isinstance(action, RailOn):
            window.begin()  # the first RailOn: the call is live
        elif isinstance(action, Record) and action.kind == "call_ended":
            ended.set()

    daemon.on_action = observe
    # The daemon's one seam for its media devices (called in its start-up): the clip instead
    # of SimCamera and SimMicrophone.
    with mock.patch.object(daemon_module, "open_media", open_prerecorded):
        runner = asyncio.create_task(daemon.run(), name="daemon")
        await poll(daemon.ready.is_set, 10, "the daemon to be ready")
    store_calls: list[tuple[str, int, float]] = []
    assert daemon.store is not None
    time_store_calls(daemon.store, store_calls)
    try:
        await poll(lambda: daemon.machine.link_up, 20, "the daemon's link")
        out.send(("connected", {"device": cfg.device.id}))
        await poll(lambda: daemon.machine.state is State.SCHEDULED, 30, "the daemon's grant")
        await asyncio.sleep(SETTLE_S)
        idle = await idle_baseline(plan.idle_seconds)
        if window.started:
            raise RuntimeError("the call started during the idle baseline")
        async with asyncio.timeout(LEAD_S + plan.seconds + 30):
            await window.done.wait()
        live = window.report["live"]
        in_window = [c for c in store_calls
                     if live["from_boot_us"] <= c[1] < live["to_boot_us"]]
        out.send(("window", {"idle": idle, **window.report, "store_calls": in_window,
                             "clip_bytes": clip_bytes(video, audio)}))
        async with asyncio.timeout(TAIL_S + 30):
            await ended.wait()
        await asyncio.sleep(0.5)  # the sources stop after the cut
        assert daemon.link is not None
        out.send(("final", {**counters(), "after_end_sent": daemon.link.media_sent}))
    finally:
        daemon.request_stop()
        await runner


# ---- the bare websockets client -----------------------------------------------------------


async def pace(ws: ClientConnection, stream: Stream, units: Sequence[Unit], *,
               period_s: float, until_mono: float, counts: dict[str, int]) -> None:
    """Send ``units`` (looping) every ``period_s`` until ``until_mono``, on the loop."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    slot = sent = 0
    while True:
        due = start + slot * period_s
        if due >= until_mono:
            return
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay >= period_s:
            late = int(-delay / period_s)
            slot += late
            counts["late_slots"] += late
            continue
        keyframe, payload = units[sent % len(units)]
        frame = MediaFrame(stream, keyframe, sent % 2**32, boot_us(), payload)
        await ws.send(encode_frame(frame))
        sent += 1
        slot += 1
        counts["sent"] += 1


async def bare_side(out: Connection, plan: Plan, video: list[Unit], audio: list[Unit]) -> None:
    srv = Path(plan.srv_dir)
    dev = srv / ca.DEVICES / BARE_DEVICE
    tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(dev / ca.CA_CERT))
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(dev / ca.DEVICE_CERT, dev / ca.DEVICE_KEY)
    counts = {"sent": 0, "late_slots": 0}
    window = Window(plan.seconds, lambda: {"fed": counts["sent"], **counts})
    granted = asyncio.Event()
    deadline: list[float] = []
    pacers: list[asyncio.Task[None]] = []
    async with connect(f"wss://127.0.0.1:{plan.port}/", ssl=tls, subprotocols=[SUBPROTOCOL],
                       ping_interval=10, ping_timeout=10, max_size=MAX_BINARY_FRAME,
                       open_timeout=10, close_timeout=2, proxy=None) as ws:
        await ws.send(encode(Hello(device_id=BARE_DEVICE, software=f"bench-bare/{__version__}",
                                   boot_id=boot_id(), session=None, locked=False,
                                   outbox=OutboxSummary(pending=0, oldest_seq=None))))
        if not isinstance(decode_server_message(await ws.recv()), Welcome):
            raise RuntimeError("bare client: no welcome")
        out.send(("connected", {"device": BARE_DEVICE}))
        max_duration_s: list[int] = []

        async def read() -> None:
            async for data in ws:
                if not isinstance(data, str):
                    continue
                try:
                    msg = decode_server_message(data)
                except ProtocolError:
                    continue
                if isinstance(msg, GrantMsg):
                    max_duration_s.append(msg.body.max_duration_s)
                    granted.set()
                elif isinstance(msg, Start) and not window.started and max_duration_s:
                    # Like a tablet: live from `start` for max_duration_s, then silent.
                    window.begin()
                    until = asyncio.get_running_loop().time() + max_duration_s[0]
                    deadline.append(until)
                    pacers.extend([
                        asyncio.create_task(pace(ws, Stream.VIDEO, video, period_s=1 / FPS,
                                                 until_mono=until, counts=counts)),
                        asyncio.create_task(pace(ws, Stream.AUDIO, audio, period_s=AUDIO_PERIOD_S,
                                                 until_mono=until, counts=counts)),
                    ])

        reader = asyncio.create_task(read(), name="bare-read")
        try:
            async with asyncio.timeout(30):
                await granted.wait()
            await asyncio.sleep(SETTLE_S)
            idle = await idle_baseline(plan.idle_seconds)
            if window.started:
                raise RuntimeError("the call started during the idle baseline")
            async with asyncio.timeout(LEAD_S + plan.seconds + 30):
                await window.done.wait()
            out.send(("window", {"idle": idle, **window.report,
                                 "clip_bytes": clip_bytes(video, audio)}))
            async with asyncio.timeout(TAIL_S + 30):
                await asyncio.gather(*pacers)
            out.send(("final", dict(counts)))
        finally:
            reader.cancel()
            for task in pacers:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


# ---- the server (this process) ------------------------------------------------------------


class TimedDevServer(DevServer):
    """The reference server, unchanged, noting when each binary frame reaches its handler."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.arrivals: dict[str, list[Arrival]] = {}

    async def _on_media(self, conn: _Connection, data: bytes) -> None:
        arrival_us = boot_us()
        if len(data) >= HEADER_SIZE:
            self.arrivals.setdefault(conn.device_id, []).append(
                (data[1], bool(data[2] & 1), int.from_bytes(data[8:16], "big"), arrival_us))
        await super()._on_media(conn, data)


def _receive(conn: Connection, timeout: float) -> tuple[str, Report]:
    if not conn.poll(timeout):
        raise TimeoutError(f"no report from a child within {timeout:g} s")
    try:
        kind, report = conn.recv()
    except EOFError:
        raise RuntimeError("a child process died without a report") from None
    if kind == "error":
        raise RuntimeError(f"the {report['role']} side failed:\n{report['traceback']}")
    return str(kind), dict(report)


async def expect(conn: Connection, kind: str, within: float) -> Report:
    got, report = await asyncio.to_thread(_receive, conn, within)
    if got != kind:
        raise RuntimeError(f"expected {kind!r} from a child, got {got!r}")
    return report


@dataclasses.dataclass
class Outcome:
    daemon_device: str
    daemon: Report
    bare: Report
    daemon_final: Report
    bare_final: Report
    arrivals: dict[str, list[Arrival]]
    server: Report


async def run(args: argparse.Namespace, video: list[Unit], audio: list[Unit]) -> Outcome:
    daemon_device = load_config(SIM_CONFIG).device.id
    with tempfile.TemporaryDirectory(prefix="tabletd-bench-media-") as tmp:
        srv_dir = Path(tmp) / "srv"
        ca.init(srv_dir)
        with Store.open(srv_dir) as store:
            for device in (daemon_device, BARE_DEVICE):
                ca.issue_device(srv_dir, device)
                store.add_device(device, 0)
        server = TimedDevServer(srv_dir)
        await server.start()
        plan = Plan(port=server.port, srv_dir=str(srv_dir), state_dir=str(Path(tmp) / "state"),
                    seconds=args.seconds, idle_seconds=args.idle_seconds)
        ctx = mp.get_context("spawn")
        pipes: dict[str, Connection] = {}
        procs: list[SpawnProcess] = []
        try:
            for role in ("daemon", "bare"):
                receiver, sender = ctx.Pipe(duplex=False)
                pipes[role] = receiver
                proc = ctx.Process(target=child_main, args=(role, sender, plan, video, audio),
                                   name=f"bench-media-{role}", daemon=True)
                proc.start()
                sender.close()
                procs.append(proc)

            def both(kind: str, within: float) -> Awaitable[list[Report]]:
                return asyncio.gather(*(expect(pipes[r], kind, within)
                                        for r in ("daemon", "bare")))

            await both("connected", 60)
            in_s = SETTLE_S + args.idle_seconds + LEAD_S
            duration = math.ceil(args.seconds + TAIL_S)
            sessions = {dev: server.book(dev, in_s=in_s, duration_s=duration)
                        for dev in (daemon_device, BARE_DEVICE)}
            print(f"  booked two {duration} s calls starting in {in_s:.0f} s (idle baseline "
                  f"{args.idle_seconds:g} s first)", flush=True)
            daemon_rep, bare_rep = await both("window", in_s + args.seconds + 60)
            daemon_fin, bare_fin = await both("final", TAIL_S + 60)
            server_rep: Report = {}
            for dev, sid in sessions.items():
                media = server.media(sid)
                rec = dataclasses.asdict(media.recorder_stats) if media is not None else {}
                server_rep[dev] = {
                    "received": media.frames_received if media is not None else 0,
                    "recorded": media.frames_recorded if media is not None else 0,
                    "seq_gaps": rec.get("seq_gaps", 0), "frames_lost": rec.get("frames_lost", 0),
                    "captured_after_deadline": server.frames_after_deadline(sid),
                    "arrived_after_deadline": server.frames_arrived_after_deadline(sid),
                }
            return Outcome(daemon_device, daemon_rep, bare_rep, daemon_fin, bare_fin,
                           server.arrivals, server_rep)
        finally:
            await server.stop()
            for proc in procs:
                await asyncio.to_thread(proc.join, 15)
                if proc.is_alive():
                    proc.terminate()
                    await asyncio.to_thread(proc.join, 5)


# ---- figures ------------------------------------------------------------------------------


def cpu_figures(rep: Report) -> Report:
    """Forwarding CPU: window CPU minus the idle CPU rate over the window's length."""
    idle, live = rep["idle"], rep["live"]
    idle_scaled = idle["cpu_s"] / idle["wall_s"] * live["wall_s"]
    forwarding = live["cpu_s"] - idle_scaled
    frames = rep["to"]["sent"] - rep["from"]["sent"]
    switches = live["vcsw"] + live["ivcsw"]
    return {
        "window_s": round(live["wall_s"], 3),
        "window_cpu_s": round(live["cpu_s"], 4),
        "window_user_s": round(live["user_s"], 4),
        "window_sys_s": round(live["sys_s"], 4),
        "idle_cpu_s": round(idle["cpu_s"], 4),
        "idle_s": round(idle["wall_s"], 3),
        "idle_cpu_scaled_s": round(idle_scaled, 4),
        "forwarding_cpu_s": round(forwarding, 4),
        "forwarding_core_pct": round(100 * forwarding / live["wall_s"], 3),
        "forwarding_us_per_frame": round(1e6 * forwarding / frames, 2) if frames else None,
        "frames_sent": frames,
        "context_switches_per_frame": round(switches / frames, 3) if frames else None,
        "rss_mb_max": round(rep["rss_kb_max"] / 1024, 1),
        "hwm_mb": round(rep["hwm_kb"] / 1024, 1),
        "clip_mb": round(rep["clip_bytes"] / 2**20, 1),
    }


def latencies(arrivals: Sequence[Arrival], rep: Report) -> dict[str, list[float]]:
    lo, hi = rep["live"]["from_boot_us"], rep["live"]["to_boot_us"]
    out: dict[str, list[float]] = {"all": [], "video": [], "keyframes": [], "audio": []}
    for stream, keyframe, capture_us, arrival_us in arrivals:
        if not lo <= capture_us < hi:
            continue
        ms = (arrival_us - capture_us) / 1000
        out["all"].append(ms)
        if stream == Stream.VIDEO:
            out["video"].append(ms)
            if keyframe:
                out["keyframes"].append(ms)
        else:
            out["audio"].append(ms)
    return out


def worst(arrivals: Sequence[Arrival], rep: Report, count: int = 3) -> list[Report]:
    """The ``count`` latest frames of the window: latency, and when (s into the window)."""
    lo, hi = rep["live"]["from_boot_us"], rep["live"]["to_boot_us"]
    frames = sorted(((a_us - c_us, c_us, stream) for stream, _, c_us, a_us in arrivals
                     if lo <= c_us < hi), reverse=True)[:count]
    return [{"ms": round(lat / 1000, 3), "at_s": round((c_us - lo) / 1e6, 3),
             "stream": Stream(stream).name.lower()} for lat, c_us, stream in frames]


def delta(rep: Report, key: str) -> int:
    return int(rep["to"][key] - rep["from"][key])


def clip_figures(video: Sequence[Unit], audio: Sequence[Unit], encode_s: float) -> Report:
    keys = [len(p) for k, p in video if k]
    others = sorted(len(p) for k, p in video if not k)
    seconds = len(video) / FPS
    return {
        "video_frames": len(video),
        "video_mbit_s": round(sum(len(p) for _, p in video) * 8 / seconds / 1e6, 3),
        "keyframe_kb_mean": round(sum(keys) / len(keys) / 1000, 1),
        "keyframe_kb_max": round(max(keys) / 1000, 1),
        "p_frame_kb_median": round(others[len(others) // 2] / 1000, 2) if others else None,
        "audio_packets": len(audio),
        "audio_kbit_s": round(sum(len(p) for _, p in audio) * 8 / (len(audio) * 0.02) / 1000,
                              1),
        "encode_s": round(encode_s, 1),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0,
                   help="the measured live window, in seconds (default 60)")
    p.add_argument("--idle-seconds", type=float, default=None,
                   help="the idle baseline before the call (default: as long as --seconds)")
    args = p.parse_args(argv)
    if not 2 <= args.seconds <= 600:
        p.error("--seconds must be 2 to 600")
    if args.idle_seconds is None:
        args.idle_seconds = args.seconds
    if not 1 <= args.idle_seconds <= 600:
        p.error("--idle-seconds must be 1 to 600")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("error")
    t_all = time.monotonic()
    load_before = os.getloadavg()[0]
    print(f"media benchmark: {WIDTH}x{HEIGHT} at {FPS} fps, {VIDEO_BITRATE / 1e6:g} Mbit/s "
          f"H.264 + Opus {AUDIO_BITRATE // 1000} kbit/s; window {args.seconds:g} s, idle "
          f"baseline {args.idle_seconds:g} s; {os.cpu_count()} CPUs; load {load_before:.2f}",
          flush=True)
    t0 = time.monotonic()
    video, audio = encode_video(args.seconds), encode_audio(args.seconds)
    clip = clip_figures(video, audio, time.monotonic() - t0)
    print(f"  clip encoded in {clip['encode_s']} s (not measured): {clip['video_frames']} "
          f"frames, {clip['video_mbit_s']} Mbit/s, keyframes {clip['keyframe_kb_mean']} kB "
          f"(max {clip['keyframe_kb_max']}), P frames {clip['p_frame_kb_median']} kB median; "
          f"{clip['audio_packets']} Opus packets, {clip['audio_kbit_s']} kbit/s", flush=True)
    outcome = asyncio.run(run(args, video, audio))
    load_after = os.getloadavg()[0]

    d, b = outcome.daemon, outcome.bare
    cpu_d, cpu_b = cpu_figures(d), cpu_figures(b)
    lat_d = latencies(outcome.arrivals.get(outcome.daemon_device, []), d)
    lat_b = latencies(outcome.arrivals.get(BARE_DEVICE, []), b)
    sum_d = {k: summary(v) for k, v in lat_d.items()}
    sum_b = {k: summary(v) for k, v in lat_b.items()}
    ratio = (round(cpu_d["forwarding_cpu_s"] / cpu_b["forwarding_cpu_s"], 3)
             if cpu_b["forwarding_cpu_s"] > 0 else None)
    drops = {reason: delta(d, f"uplink_dropped_{reason}") for reason in
             ("overflow", "stale", "deadline", "no_keyframe", "oversize", "cleared")}
    fin = outcome.daemon_final
    drops_call = {reason: int(fin[f"uplink_dropped_{reason}"]) for reason in drops}
    frames_d = {"fed": delta(d, "fed"), "sent": delta(d, "sent"),
                "dropped": delta(d, "uplink_dropped_frames"),
                "late_slots": delta(d, "late_slots"),
                "received_by_server": len(lat_d["all"])}
    frames_b = {"fed": delta(b, "fed"), "sent": delta(b, "sent"), "dropped": 0,
                "late_slots": delta(b, "late_slots"), "received_by_server": len(lat_b["all"])}
    source_cpu_s = round(d["to"]["source_cpu_s"] - d["from"]["source_cpu_s"], 4)
    passes = {
        "cpu_ratio": ratio is not None and ratio <= TARGET_CPU_RATIO,
        "latency_p99_ms": sum_d["all"]["p99"] <= TARGET_P99_MS,
    }

    def row(label: str, a: object, c: object, r: object = "") -> None:
        print(f"  {label:<44} {a!s:>16} {c!s:>16} {r!s:>8}")

    print()
    row("live window", "daemon (tabletd)", "bare websockets", "ratio")
    row("process CPU in the window (s)", cpu_d["window_cpu_s"], cpu_b["window_cpu_s"])
    row("  user / system (s)", f"{cpu_d['window_user_s']:.2f} / {cpu_d['window_sys_s']:.2f}",
        f"{cpu_b['window_user_s']:.2f} / {cpu_b['window_sys_s']:.2f}")
    row("idle baseline, scaled to the window (s)", cpu_d["idle_cpu_scaled_s"],
        cpu_b["idle_cpu_scaled_s"])
    row("forwarding CPU (s)", cpu_d["forwarding_cpu_s"], cpu_b["forwarding_cpu_s"], ratio)
    row("forwarding CPU (% of one core)", cpu_d["forwarding_core_pct"],
        cpu_b["forwarding_core_pct"])
    row("forwarding CPU per frame sent (µs)", cpu_d["forwarding_us_per_frame"],
        cpu_b["forwarding_us_per_frame"])
    row("  of which source threads' hand-over (s)", source_cpu_s, "-")
    loop_side = round(cpu_d["forwarding_cpu_s"] - source_cpu_s, 4)
    loop_ratio = (round(loop_side / cpu_b["forwarding_cpu_s"], 3)
                  if cpu_b["forwarding_cpu_s"] > 0 else None)
    row("  the rest: loop side, for information (s)", loop_side, cpu_b["forwarding_cpu_s"],
        loop_ratio)
    row("context switches per frame", cpu_d["context_switches_per_frame"],
        cpu_b["context_switches_per_frame"])
    row("RSS max in the window (MB)", cpu_d["rss_mb_max"], cpu_b["rss_mb_max"])
    row("  of which the clip held in memory (MB)", cpu_d["clip_mb"], cpu_b["clip_mb"])
    row("frames fed / sent", f"{frames_d['fed']} / {frames_d['sent']}",
        f"{frames_b['fed']} / {frames_b['sent']}")
    row("frames dropped by the uplink queue", frames_d["dropped"], "-")
    row("late slots (source / pacer)", frames_d["late_slots"], frames_b["late_slots"])
    row("frames captured in it, received by server", frames_d["received_by_server"],
        frames_b["received_by_server"])
    print()
    print(f"  {'capture -> server latency (ms)':<34} {'count':>6} {'p50':>8} {'p99':>8} "
          f"{'max':>8}")
    for who, lat, sums in (("daemon", lat_d, sum_d), ("bare", lat_b, sum_b)):
        for kind in ("all", "video", "keyframes", "audio"):
            s = sums[kind]
            print(f"  {who + ' ' + kind:<34} {len(lat[kind]):>6} {s['p50']:>8.3f} "
                  f"{s['p99']:>8.3f} {s['max']:>8.3f}")
    arr_d = outcome.arrivals.get(outcome.daemon_device, [])
    arr_b = outcome.arrivals.get(BARE_DEVICE, [])
    worst_d, worst_b = worst(arr_d, d), worst(arr_b, b)
    for who, frames in (("daemon", worst_d), ("bare", worst_b)):
        print(f"  {who} worst frames: " + ", ".join(
            f"{f['ms']:.1f} ms ({f['stream']}, at {f['at_s']:.2f} s)" for f in frames))
    calls = d["store_calls"]
    blocking = [c for c in calls if c[0] in ("append", "ack")]
    store_ms = {"calls": len(calls), "total_ms": round(sum(c[2] for c in calls), 3),
                "max_ms": round(max((c[2] for c in calls), default=0.0), 3),
                "fsync_calls": [{"call": n, "at_s": round((at - d["live"]["from_boot_us"])
                                                           / 1e6, 3), "ms": round(ms, 3)}
                                for n, at, ms in blocking]}
    print(f"  daemon loop in its outbox in the window: {store_ms['calls']} calls, "
          f"{store_ms['total_ms']} ms in all, longest {store_ms['max_ms']} ms; committing "
          "(fsync): " + (", ".join(f"{c['call']} {c['ms']:.1f} ms at {c['at_s']:.2f} s"
                                   for c in store_ms["fsync_calls"]) or "none"))
    print()
    print("  uplink queue drops in the window: "
          + ", ".join(f"{k} {v}" for k, v in drops.items())
          + "; over the whole call: " + ", ".join(f"{k} {v}" for k, v in drops_call.items())
          + f"; keyframe requests {fin['keyframe_requests']}")
    for dev, who in ((outcome.daemon_device, "daemon"), (BARE_DEVICE, "bare")):
        s = outcome.server[dev]
        print(f"  server, {who} session: {s['received']} frames received, {s['recorded']} "
              f"recorded, {s['seq_gaps']} seq gaps ({s['frames_lost']} lost), "
              f"{s['captured_after_deadline']} captured / {s['arrived_after_deadline']} "
              f"arrived after the deadline")
    verdict = {k: "PASS" if v else "FAIL" for k, v in passes.items()}
    print(f"  forwarding CPU daemon / bare {ratio}: {verdict['cpu_ratio']} "
          f"(target <= {TARGET_CPU_RATIO:g})")
    print(f"  daemon latency p99 {sum_d['all']['p99']:.3f} ms: {verdict['latency_p99_ms']} "
          f"(target <= {TARGET_P99_MS:g} ms)")
    elapsed = time.monotonic() - t_all
    print(f"\ntotal {elapsed:.1f} s; load {load_before:.2f} -> {load_after:.2f}; overall: "
          f"{'PASS' if all(passes.values()) else 'FAIL'}")
    out = {
        "forwarding_cpu_ratio": ratio,
        "daemon_cpu": {**cpu_d, "source_threads_cpu_s": source_cpu_s,
                       "loop_side_cpu_s": loop_side, "loop_side_over_bare": loop_ratio},
        "bare_cpu": cpu_b,
        "daemon_latency_ms": sum_d,
        "bare_latency_ms": sum_b,
        "daemon_worst_frames": worst_d,
        "bare_worst_frames": worst_b,
        "daemon_outbox_on_loop": store_ms,
        "daemon_frames": frames_d,
        "bare_frames": frames_b,
        "uplink_drops_window": drops,
        "uplink_drops_call": drops_call,
        "keyframe_requests": fin["keyframe_requests"],
        "server": {"daemon": outcome.server[outcome.daemon_device],
                   "bare": outcome.server[BARE_DEVICE]},
        "clip": clip,
        "targets": {"forwarding_cpu_ratio_max": TARGET_CPU_RATIO,
                    "latency_p99_ms_max": TARGET_P99_MS},
        "pass": {**passes, "all": all(passes.values())},
        "runs": {"seconds": args.seconds, "idle_seconds": args.idle_seconds,
                 "cpus": os.cpu_count(), "load_before": round(load_before, 2),
                 "load_after": round(load_after, 2), "python": sys.version.split()[0],
                 "elapsed_s": round(elapsed, 1)},
    }
    print(json.dumps(out, separators=(",", ":")))
    return 0 if all(passes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
