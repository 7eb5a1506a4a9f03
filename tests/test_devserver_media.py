"""The reference server's media side (REFERENCE SERVER — development and tests only): the
session recorder (MPEG-TS, no re-encoding), binary frames over real mutual TLS, the media
window of a live call and the synthetic family downlink (docs/protocol.md section 6)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import struct
import time
from collections.abc import AsyncIterator, Iterator
from fractions import Fraction
from pathlib import Path

import av
import pytest
from av.audio.codeccontext import AudioCodecContext
from av.codec.context import CodecContext
from av.video.codeccontext import VideoCodecContext
from websockets.asyncio.client import ClientConnection

from tabletd.devserver.recorder import SessionRecorder
from tabletd.devserver.server import DevServer
from tabletd.link.messages import (
    Ack,
    ErrorMsg,
    GrantMsg,
    Start,
    decode_server_message,
    encode,
)
from tabletd.media.frames import MediaFrame, Stream, decode_frame, encode_frame

from .conftest import wait_for
from .test_devserver import (  # noqa: F401  (fixtures)
    DEVICE,
    ca_dir,
    event,
    expect,
    open_device,
    srv_dir,
    welcomed,
)

FPS = 25
W, H = 320, 240


# -- synthetic uplink media ---------------------------------------------------------------


def h264_units(count: int, fps: int = FPS, keyint: int = FPS) -> list[tuple[bytes, bool]]:
    """``count`` access units of a moving pattern from libx264: Annex B, SPS/PPS before
    every IDR, no B-frames (what the tablet sends)."""
    enc = CodecContext.create("libx264", "w")
    assert isinstance(enc, VideoCodecContext)
    enc.width, enc.height, enc.pix_fmt = W, H, "yuv420p"
    enc.time_base = Fraction(1, fps)
    enc.framerate = Fraction(fps, 1)
    enc.options = {"preset": "ultrafast", "tune": "zerolatency",
                   "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=0:"
                                  "repeat-headers=1"}
    units: list[tuple[bytes, bool]] = []
    for i in range(count):
        frame = av.VideoFrame(W, H, "yuv420p")
        for k, plane in enumerate(frame.planes):
            plane.update(bytes([(i * 9 + k * 70) % 256]) * plane.buffer_size)
        frame.pts = i
        units.extend((bytes(p), p.is_keyframe) for p in enc.encode(frame))
    units.extend((bytes(p), p.is_keyframe) for p in enc.encode(None))
    assert len(units) == count and units[0][1]
    return units


def opus_packets(count: int) -> list[bytes]:
    """``count`` Opus packets of 20 ms, 48 kHz mono, a 440 Hz tone."""
    enc = CodecContext.create("libopus", "w")
    assert isinstance(enc, AudioCodecContext)
    enc.sample_rate, enc.layout, enc.format = 48_000, "mono", "s16"
    enc.time_base = Fraction(1, 48_000)
    packets: list[bytes] = []
    for n in range(count + 4):
        pcm = b"".join(struct.pack("<h", round(5000 * math.sin(2 * math.pi * 440 * (n * 960 + k)
                                                                / 48_000))) for k in range(960))
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(pcm)
        frame.sample_rate, frame.pts = 48_000, n * 960
        packets.extend(bytes(p) for p in enc.encode(frame))
    return packets[:count]


def uplink(seconds: float, start_us: int, first_video: int = 0) -> Iterator[MediaFrame]:
    """Video at 25 fps and Opus every 20 ms for ``seconds``, interleaved by capture time;
    video starts at access unit ``first_video`` (mid-GOP when not a multiple of 25)."""
    n_video = round(seconds * FPS)
    units = h264_units(first_video + n_video)[first_video:]
    audio = opus_packets(round(seconds * 50))
    frames = [MediaFrame(Stream.VIDEO, key, i, start_us + i * 40_000, data)
              for i, (data, key) in enumerate(units)]
    frames += [MediaFrame(Stream.AUDIO, False, j, start_us + j * 20_000 + 1, data)
               for j, data in enumerate(audio)]
    return iter(sorted(frames, key=lambda f: f.capture_us))


def count_decoded(path: Path) -> tuple[int, int, float]:
    """Video frames and audio frames the file decodes to, and its video span in seconds."""
    with av.open(str(path)) as container:
        video = audio = 0
        first = last = None
        for frame in container.decode(video=0):
            video += 1
            first = frame.time if first is None else first
            last = frame.time
    with av.open(str(path)) as container:
        if container.streams.audio:
            for _ in container.decode(audio=0):
                audio += 1
    return video, audio, (last or 0.0) - (first or 0.0)


def boot_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000


# -- the recorder -------------------------------------------------------------------------


def test_recorder_muxes_three_seconds_without_reencoding(tmp_path: Path) -> None:
    path = tmp_path / "rec" / "call-1.ts"
    frames = list(uplink(3.0, start_us=5_000_000_000))
    with SessionRecorder(path, fps=FPS) as rec:
        for f in frames:
            assert rec.add(f)
    stats = rec.stats
    assert (stats.video_frames, stats.keyframes, stats.audio_packets) == (75, 3, 150)
    assert (stats.seq_gaps, stats.dropped_before_keyframe, stats.mux_errors) == (0, 0, 0)
    assert (rec.width, rec.height) == (W, H)

    video, audio, span = count_decoded(path)
    assert abs(video - 3.0 * FPS) <= 0.05 * 3.0 * FPS
    assert audio >= 140  # the decoder may hold back the first packets (pre-skip)
    assert span == pytest.approx(74 * 0.04, abs=0.002)  # timestamps from capture_us
    with av.open(str(path)) as container:
        assert container.format.name == "mpegts"
        a = container.streams.audio[0].codec_context
        assert (a.name, a.sample_rate, a.channels) == ("opus", 48_000, 1)
        v = container.streams.video[0].codec_context
        assert (v.name, v.width, v.height) == ("h264", W, H)
        muxed = [bytes(p) for p in container.demux(video=0) if p.size]
    sent = [f.payload for f in frames if f.stream == Stream.VIDEO]
    assert len(muxed) == len(sent)
    assert all(s in m for s, m in zip(sent, muxed, strict=True))  # as received, not re-encoded


def test_recorder_waits_for_a_keyframe_and_counts_gaps(tmp_path: Path) -> None:
    path = tmp_path / "call-2.ts"
    rec = SessionRecorder(path)
    frames = list(uplink(2.0, start_us=1_000_000, first_video=10))  # keyframe at video #15
    video = [f for f in frames if f.stream == Stream.VIDEO]
    first_key = next(i for i, f in enumerate(video) if f.keyframe)
    assert first_key == 15
    skipped = {video[30].seq, video[31].seq}  # a slow link: two frames dropped
    for f in frames:
        if not (f.stream == Stream.VIDEO and f.seq in skipped):
            rec.add(f)
        if f is video[first_key - 1]:
            assert not rec.started and not path.exists()
    rec.close()
    audio_before = sum(1 for f in frames if f.stream == Stream.AUDIO
                       and f.capture_us < video[first_key].capture_us)
    assert rec.stats.dropped_before_keyframe == first_key + audio_before
    assert rec.stats.video_frames == len(video) - first_key - 2
    assert (rec.stats.seq_gaps, rec.stats.frames_lost) == (1, 2)
    assert not rec.add(video[-1])
    assert rec.stats.refused_after_close == 1
    rec.close()  # idempotent
    decoded, _, _ = count_decoded(path)
    # the decoder may skip the frames that refer to the lost ones, up to the next IDR (#40)
    assert 25 <= decoded <= rec.stats.video_frames


def test_recorder_without_keyframe_writes_nothing(tmp_path: Path) -> None:
    rec = SessionRecorder(tmp_path / "none.ts")
    rec.add(MediaFrame(Stream.AUDIO, False, 0, 10, b"\xfc\x00"))
    rec.close()
    assert not (tmp_path / "none.ts").exists() and rec.stats.dropped_before_keyframe == 1


# -- over the link ------------------------------------------------------------------------


async def live_call(ws: ClientConnection, srv: DevServer, duration_s: int,
                    deadline_us: int | None = None) -> tuple[str, int]:
    """Book a call starting now, take grant and start, report call_started; returns the
    session id and the tablet deadline (boot clock, us)."""
    await welcomed(ws)
    sid = srv.book(DEVICE, in_s=0, duration_s=duration_s)
    await expect(ws, GrantMsg)
    assert (await expect(ws, Start)).session_id == sid
    started = boot_us()
    deadline = deadline_us if deadline_us is not None else started + duration_s * 1_000_000
    await ws.send(encode(dataclasses.replace(event("call_started", sid), fields={
        "session_id": sid, "started_ns": started * 1000, "deadline_ns": deadline * 1000})))
    return sid, deadline


async def send_paced(ws: ClientConnection, frames: Iterator[MediaFrame], t0_us: int) -> int:
    """Send each frame at its capture time (in real time from ``t0_us``)."""
    sent = 0
    for f in frames:
        delay = (f.capture_us - boot_us()) / 1e6
        if delay > 0:
            await asyncio.sleep(delay)
        await ws.send(encode_frame(f))
        sent += 1
    assert t0_us <= boot_us()
    return sent


@pytest.fixture
async def server(srv_dir: Path) -> AsyncIterator[DevServer]:  # noqa: F811
    async with DevServer(srv_dir, tick_s=0.02) as srv:
        yield srv


async def test_live_call_is_recorded_and_decodes(server: DevServer) -> None:
    async with open_device(server) as ws:
        sid, _ = await live_call(ws, server, duration_s=30)
        assert server.live_session(DEVICE) == sid
        t0 = boot_us() + 20_000
        sent = await send_paced(ws, uplink(2.0, start_us=t0), t0)
        ended = event("call_ended", sid, seq=3, reason="staff_end")
        await ws.send(encode(ended))
        await expect(ws, Ack)
        await wait_for(lambda: server.live_session(DEVICE) is None)
        late = MediaFrame(Stream.VIDEO, False, 999, boot_us(), b"\x00\x00\x00\x01\x09\xf0")
        await ws.send(encode_frame(late))  # after call_ended: counted, never recorded
        await wait_for(lambda: server.media(sid) is not None
                       and server.media(sid).arrived_after_end == 1)  # type: ignore[union-attr]
    media = server.media(sid)
    assert media is not None and media.end_reason == "staff_end"
    assert media.frames_received == sent + 1 and media.frames_recorded == sent
    assert server.frames_after_deadline(sid) == 0
    assert server.frames_arrived_after_deadline(sid) == 0
    path = server.recording_path(sid)
    assert path == server.directory / "recordings" / f"{sid}.ts" and path.exists()
    video, audio, span = count_decoded(path)
    assert abs(video - 2.0 * FPS) <= 0.05 * 2.0 * FPS
    assert audio >= 90 and span == pytest.approx(49 * 0.04, abs=0.002)
    assert media.recorder_stats.seq_gaps == 0


async def test_frames_after_the_deadline_are_counted(server: DevServer) -> None:
    """The checks the whole-call test relies on: a (misbehaving) client that keeps sending
    after its deadline is caught by capture time and by arrival time."""
    async with open_device(server) as ws:
        sid, deadline_us = await live_call(ws, server, duration_s=1)
        t0 = boot_us()
        frames = [f for f in uplink(1.4, start_us=t0) if f.stream == Stream.VIDEO]
        await send_paced(ws, iter(frames), t0)
        await wait_for(lambda: server.media(sid) is not None
                       and server.media(sid).frames_received == len(frames))  # type: ignore[union-attr]
    media = server.media(sid)
    assert media is not None and not media.live and media.end_reason == "deadline"
    after_capture = sum(1 for f in frames if f.capture_us >= deadline_us)
    assert after_capture >= 5
    assert server.frames_after_deadline(sid) == after_capture
    assert server.frames_arrived_after_deadline(sid) >= 1
    assert media.frames_recorded == len(frames) - media.arrived_after_end
    assert media.arrived_after_end >= server.frames_arrived_after_deadline(sid)


async def test_invalid_binary_frames_get_one_error_and_the_connection_stays(
        server: DevServer) -> None:
    good = encode_frame(MediaFrame(Stream.AUDIO, False, 0, 1, b"\xfc"))
    bad = [b"", b"\x01", b"\x02" + good[1:], good[:1] + b"\x07" + good[2:],
           good[:3] + b"\x01" + good[4:], good[:16], good[:2] + b"\x80" + good[3:]]
    async with open_device(server) as ws:
        await welcomed(ws)
        for frame in bad:
            await ws.send(frame)
        error = await expect(ws, ErrorMsg)
        assert error.code == "bad_message"
        await ws.send(good)  # valid, but no call: counted, dropped
        ev = event()
        await ws.send(encode(ev))
        assert (await expect(ws, Ack)).ids == (ev.id,)  # no second error in between
        await asyncio.sleep(1.05)
        await ws.send(bad[1])
        assert (await expect(ws, ErrorMsg)).code == "bad_message"  # a second later: again
    assert server.media_refused == len(bad) + 1 == server.messages_refused
    assert (server.media_received, server.media_outside_call) == (1, 1)


async def test_downlink_flows_while_live_and_stops_at_the_deadline(srv_dir: Path) -> None:  # noqa: F811
    async with DevServer(srv_dir, tick_s=0.02, downlink=True) as srv, open_device(srv) as ws:
        await welcomed(ws)
        sid = srv.book(DEVICE, in_s=0, duration_s=2)
        frames: list[tuple[float, MediaFrame]] = []
        start_at: float | None = None
        async with asyncio.timeout(5):
            while True:
                try:
                    async with asyncio.timeout(0.8 if start_at else 3):
                        data = await ws.recv()
                except TimeoutError:
                    break  # quiet for 0.8 s after the call: done
                if isinstance(data, bytes):
                    frames.append((time.monotonic(), decode_frame(data)))
                elif isinstance(decode_server_message(data), Start):
                    start_at = time.monotonic()
        assert start_at is not None
        media = srv.media(sid)
        assert media is not None and not media.live
    video = [f for _, f in frames if f.stream == Stream.VIDEO]
    audio = [f for _, f in frames if f.stream == Stream.AUDIO]
    assert video[0].keyframe and [f.seq for f in video] == list(range(len(video)))
    assert 20 <= len(video) <= 30 and 70 <= len(audio) <= 100  # 15 fps and 50/s, for 2 s
    assert (media.downlink.video_sent, media.downlink.audio_sent) == (len(video), len(audio))
    last_arrival = max(t for t, _ in frames)
    assert last_arrival - start_at <= 2.0 + 0.1
    assert frames[0][0] >= start_at
    decoder = CodecContext.create("h264", "r")
    assert isinstance(decoder, VideoCodecContext)
    pictures = [p for f in video for p in decoder.decode(av.Packet(f.payload))]
    assert len(pictures) >= len(video) - 2
    assert (pictures[0].width, pictures[0].height) == (640, 360)


async def test_downlink_stops_at_call_ended(srv_dir: Path) -> None:  # noqa: F811
    async with DevServer(srv_dir, tick_s=0.02, downlink=True) as srv, open_device(srv) as ws:
        await welcomed(ws)
        sid = srv.book(DEVICE, in_s=0, duration_s=60)
        got_media = False
        async with asyncio.timeout(5):
            while not got_media:
                got_media = isinstance(await ws.recv(), bytes)
        await ws.send(encode(event("call_ended", sid, seq=2, reason="staff_end")))
        ended_at = time.monotonic()
        after: list[float] = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                while True:
                    if isinstance(await ws.recv(), bytes):
                        after.append(time.monotonic())
        assert all(t - ended_at < 0.1 for t in after)  # only what was already in flight
        media = srv.media(sid)
        assert media is not None and media.end_reason == "staff_end"
        assert media.downlink_task is not None and media.downlink_task.done()
