"""REFERENCE SERVER — development and tests only, never installed on a tablet.

The synthetic "family" downlink (``docs/protocol.md`` section 6): what the reference server
sends a tablet while its call is live, standing in for the relative's camera and microphone.

To stay cheap, the media is encoded once with PyAV (:func:`encode_loop`, run in a worker
thread) and replayed: a loop of ``seconds`` of H.264 (a teal picture with a white bar
sweeping across it, 640x360 at 15 fps, one IDR with SPS/PPS at the start of each loop, so
every repetition decodes on its own) and of Opus (a 660 Hz tone, 48 kHz mono, 20 ms packets).
:func:`send_downlink` paces the loop in real time on the event loop, framing every unit with
:func:`~tabletd.media.frames.encode_frame` (``seq`` per stream from 0, ``capture_us`` the
server's monotonic clock in microseconds at the unit's scheduled time), and stops before the
deadline it is given.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction

import av
from av.audio.codeccontext import AudioCodecContext
from av.codec.context import CodecContext
from av.video.codeccontext import VideoCodecContext

from tabletd.media.frames import MAX_SEQ, MediaFrame, Stream, encode_frame

WIDTH, HEIGHT, FPS = 640, 360, 15
OPUS_RATE = 48_000
AUDIO_PACKET_US = 20_000
AUDIO_SAMPLES = OPUS_RATE * AUDIO_PACKET_US // 1_000_000  # 960
TONE_HZ = 660
# "family" colours: teal (Y, U, V), unlike the tablet's own test pattern
BACKGROUND_YUV = (110, 160, 60)
BAR_Y = 235


@dataclass(frozen=True)
class EncodedLoop:
    """A loop of encoded media: ``video`` access units (Annex B, the first one an IDR with
    SPS/PPS) at ``fps``, and Opus packets of 20 ms."""

    video: tuple[bytes, ...]
    audio: tuple[bytes, ...]
    fps: int
    width: int
    height: int


def encode_loop(width: int = WIDTH, height: int = HEIGHT, fps: int = FPS,
                seconds: int = 2, tone_hz: int = TONE_HZ) -> EncodedLoop:
    """Encode ``seconds`` of the family pattern and tone (blocking: a worker thread's job)."""
    count = fps * seconds
    video = _encode_video(width, height, fps, count)
    audio = _encode_tone(seconds, tone_hz)
    return EncodedLoop(video=video, audio=audio, fps=fps, width=width, height=height)


def _encode_video(width: int, height: int, fps: int, count: int) -> tuple[bytes, ...]:
    enc = CodecContext.create("libx264", "w")
    assert isinstance(enc, VideoCodecContext)
    enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
    enc.time_base = Fraction(1, fps)
    enc.framerate = Fraction(fps, 1)
    enc.bit_rate = 300_000
    enc.options = {
        "preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
        "x264-params": f"keyint={count}:min-keyint={count}:scenecut=0:bframes=0:"
                       "repeat-headers=1",
    }
    units: list[bytes] = []
    y_bg, u_bg, v_bg = BACKGROUND_YUV
    bar = max(2, width // 16)
    for i in range(count):
        frame = av.VideoFrame(width, height, "yuv420p")
        x0 = (i * (width - bar)) // max(1, count - 1)
        luma = bytes([y_bg]) * x0 + bytes([BAR_Y]) * bar + bytes([y_bg]) * (width - x0 - bar)
        for plane, row, rows in ((frame.planes[0], luma, height),
                                 (frame.planes[1], bytes([u_bg]) * (width // 2), height // 2),
                                 (frame.planes[2], bytes([v_bg]) * (width // 2), height // 2)):
            padded = row + bytes(plane.line_size - len(row))
            plane.update(padded * rows)
        frame.pts = i
        units.extend(bytes(p) for p in enc.encode(frame))
    units.extend(bytes(p) for p in enc.encode(None))
    return tuple(units)


def _encode_tone(seconds: int, tone_hz: int) -> tuple[bytes, ...]:
    enc = CodecContext.create("libopus", "w")
    assert isinstance(enc, AudioCodecContext)
    enc.sample_rate, enc.layout, enc.format = OPUS_RATE, "mono", "s16"
    enc.time_base = Fraction(1, OPUS_RATE)
    enc.bit_rate = 32_000
    packets: list[bytes] = []
    total = seconds * 1_000_000 // AUDIO_PACKET_US
    for n in range(total):
        first = n * AUDIO_SAMPLES
        pcm = b"".join(struct.pack("<h", round(6000 * math.sin(
            2 * math.pi * tone_hz * (first + k) / OPUS_RATE))) for k in range(AUDIO_SAMPLES))
        frame = av.AudioFrame(format="s16", layout="mono", samples=AUDIO_SAMPLES)
        frame.planes[0].update(pcm)
        frame.sample_rate = OPUS_RATE
        frame.pts = first
        packets.extend(bytes(p) for p in enc.encode(frame))
    packets.extend(bytes(p) for p in enc.encode(None))
    return tuple(packets[:total])


@dataclass
class DownlinkStats:
    video_sent: int = 0
    audio_sent: int = 0
    last_sent_ns: int | None = None  # server monotonic clock


async def send_downlink(send: Callable[[bytes], Awaitable[None]], media: EncodedLoop,
                        deadline_ns: int, stats: DownlinkStats | None = None, *,
                        clock: Callable[[], int] = time.monotonic_ns) -> DownlinkStats:
    """Send ``media`` in a loop, paced in real time, until ``deadline_ns`` (``clock``'s time
    base): no unit scheduled at or after the deadline is sent. Returns the counters (also
    kept up to date in ``stats`` while it runs, for a caller that cancels it)."""
    stats = stats if stats is not None else DownlinkStats()
    if not media.video and not media.audio:
        return stats
    start = clock()
    video_period = 1_000_000_000 // media.fps
    n_video = n_audio = 0
    while True:
        t_video = start + n_video * video_period if media.video else None
        t_audio = start + n_audio * AUDIO_PACKET_US * 1000 if media.audio else None
        if t_audio is None or (t_video is not None and t_video <= t_audio):
            assert t_video is not None
            due, stream, count = t_video, Stream.VIDEO, n_video
        else:
            due, stream, count = t_audio, Stream.AUDIO, n_audio
        if due >= deadline_ns:
            return stats
        wait = due - clock()
        if wait > 0:
            await asyncio.sleep(wait / 1e9)
        if clock() >= deadline_ns:
            return stats
        if stream == Stream.VIDEO:
            index = count % len(media.video)
            frame = MediaFrame(Stream.VIDEO, index == 0, count % (MAX_SEQ + 1), due // 1000,
                               media.video[index])
            n_video += 1
        else:
            frame = MediaFrame(Stream.AUDIO, False, count % (MAX_SEQ + 1), due // 1000,
                               media.audio[count % len(media.audio)])
            n_audio += 1
        await send(encode_frame(frame))
        if stream == Stream.VIDEO:
            stats.video_sent += 1
        else:
            stats.audio_sent += 1
        stats.last_sent_ns = clock()
