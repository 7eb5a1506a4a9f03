"""Camera and microphone: one interface, a simulated and a real backend.

Theory of operation
-------------------
A :class:`MediaSource` produces encoded media units (H.264 access units or Opus packets,
protocol section 6.2) on a thread of its own and hands each one, as a
:class:`~tabletd.media.frames.MediaFrame`, to the ``on_frame`` callback given to
:meth:`MediaSource.start`. The callback runs on the source's thread: it must only hand over,
e.g. ``loop.call_soon_threadsafe(queue.put_nowait, frame)``, and never block.

Every backend runs under the same supervisor (:class:`SupervisedSource`):

* the device is opened and closed on the supervisor thread, each call bounded by
  ``call_timeout_s`` (a call that overruns is abandoned on a daemon thread: picamera2 is known
  to hang in ``start``/``stop`` after "Camera frontend has timed out", and to fail with
  "Cannot allocate memory" when reopened);
* a frame-arrival watchdog: no frame for ``frame_timeout_s`` means the device is stuck; it is
  closed and reopened, at most ``max_restarts`` times per :meth:`~MediaSource.start`; after
  that ``health.fault`` says why and ``on_fault(detail)`` is called once (the call then ends
  with reason ``camera_fault``);
* frames from an abandoned device session, or produced after :meth:`~MediaSource.stop`, are
  dropped here and never reach ``on_frame`` (BRIEF invariant 7).

Stopping never delays the cut (BRIEF invariant 3): the rail is cut *before* ``stop`` is called,
and ``stop`` only signals the supervisor and waits for it at most ``stop_timeout_s``.

Backends: :class:`SimCamera` and :class:`SimMicrophone` (a moving test pattern with the frame
number and capture time burned in, and a 440 Hz tone, encoded to real H.264 and Opus with
PyAV); :class:`Picamera2Camera` and :class:`AlsaMicrophone` (the device; picamera2 and the ALSA
input are imported/opened lazily, only on a device).

Timestamps (``capture_us``) are CLOCK_BOOTTIME microseconds at capture (protocol 6.1).
"""

from __future__ import annotations

import fcntl
import functools
import importlib
import logging
import math
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Protocol

import av
from av.audio.codeccontext import AudioCodecContext
from av.video.codeccontext import VideoCodecContext
from av.video.frame import PictureType

from tabletd.clock import BootClock, Clock
from tabletd.media.frames import MediaFrame, Stream

log = logging.getLogger(__name__)

FrameCallback = Callable[[MediaFrame], None]
FaultCallback = Callable[[str], None]

NS_PER_US = 1_000
US_PER_S = 1_000_000
SEQ_MODULO = 2**32  # protocol 6.1: seq wraps at 2^32

OPUS_RATE = 48_000  # protocol 6.2: Opus, 48 kHz, mono, 20 ms packets
OPUS_FRAME_SAMPLES = 960
OPUS_FRAME_S = OPUS_FRAME_SAMPLES / OPUS_RATE


class MediaSourceError(RuntimeError):
    """A media device could not be opened or stopped in time (reported through ``health``)."""


@dataclass(frozen=True)
class SourceHealth:
    """A snapshot of a source's state, for the self-test, the status API and the logs."""

    frames: int = 0  # frames handed to on_frame since start()
    last_frame_ns: int | None = None  # CLOCK_BOOTTIME of the last frame handed over
    restarts: int = 0  # device restarts since start() (watchdog or failed open)
    fault: str | None = None  # set once the restarts are exhausted; the source has stopped


class MediaSource(Protocol):
    """What every camera and microphone backend implements."""

    def start(self, on_frame: FrameCallback, on_fault: FaultCallback | None = None) -> None:
        """Start producing frames; returns at once (the device opens on the source's thread).

        ``on_frame(frame)`` and ``on_fault(detail)`` are called from the source's own thread:
        they must only hand over to asyncio with ``loop.call_soon_threadsafe``. ``on_fault`` is
        called at most once, after which the source produces nothing more. Call ``start`` only
        after the rail is on. Raises ``RuntimeError`` if already started.
        """
        ...

    def request_keyframe(self) -> None:
        """Ask the encoder for an IDR (with SPS/PPS) as soon as possible; never blocks."""
        ...

    def stop(self) -> None:
        """Stop producing; idempotent, returns within a bounded time even if the device hangs.

        The rail is cut before this is called; once it returns ``on_frame`` is not called again.
        """
        ...

    @property
    def health(self) -> SourceHealth: ...


# --------------------------------------------------------------------------------------------
# The supervisor shared by every backend


Deliver = Callable[[bool, int, bytes], None]  # (keyframe, capture_us, payload)


def run_bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run ``fn`` on a daemon thread; return its result, re-raise its error.

    Raises :class:`MediaSourceError` if it has not returned within ``timeout_s``: the thread is
    then abandoned (it cannot be killed), which is why callers bound their restarts.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    worker = threading.Thread(target=target, name=f"media-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise MediaSourceError(f"{what} did not return within {timeout_s:g} s")
    if error:
        raise error[0]
    return result[0] if result else None


class SupervisedSource:
    """Base of every backend: supervisor thread, frame watchdog, bounded restarts, health.

    Subclasses implement :meth:`_open` (open the device; frames go to ``deliver`` from any
    thread), :meth:`_close` (release it) and :meth:`_force_keyframe`. ``_open``/``_close`` run
    on a bounded worker thread and may raise or hang.
    """

    def __init__(
        self,
        stream: Stream,
        name: str,
        *,
        frame_timeout_s: float,
        first_frame_timeout_s: float | None = None,
        call_timeout_s: float = 5.0,
        max_restarts: int = 3,
        restart_delay_s: float = 0.5,
        stop_timeout_s: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        if frame_timeout_s <= 0 or call_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError(f"{name}: timeouts must be positive")
        if max_restarts < 0:
            raise ValueError(f"{name}: max_restarts must be >= 0, not {max_restarts}")
        self.stream = stream
        self.name = name
        self._frame_timeout_s = frame_timeout_s
        self._first_frame_timeout_s = (
            first_frame_timeout_s if first_frame_timeout_s is not None else 2 * frame_timeout_s
        )
        self._call_timeout_s = call_timeout_s
        self._max_restarts = max_restarts
        self._restart_delay_s = restart_delay_s
        self._stop_timeout_s = stop_timeout_s
        self._clock: Clock = clock if clock is not None else BootClock()

        self._lock = threading.Lock()  # guards everything below
        # Held while on_frame runs, so stop() can wait for a delivery in flight; reentrant in
        # case on_frame itself calls stop().
        self._deliver_lock = threading.RLock()
        self._frame_arrived = threading.Condition(self._lock)
        self._health = SourceHealth()
        self._on_frame: FrameCallback | None = None
        self._on_fault: FaultCallback | None = None
        self._generation = 0  # bumped at each open; frames of older sessions are dropped
        self._seq = 0
        self._last_frame_mono: float | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # ---- the MediaSource interface

    def start(self, on_frame: FrameCallback, on_fault: FaultCallback | None = None) -> None:
        with self._lock:
            if self._supervisor is not None and not self._stopping.is_set():
                raise RuntimeError(f"{self.name} is already started")
            self._on_frame = on_frame
            self._on_fault = on_fault
            self._health = SourceHealth()
            self._seq = 0
            self._stopping = threading.Event()
            # A previous supervisor still closing its device (stop() gave up waiting) must
            # finish before the device is opened again.
            previous = self._supervisor
            self._supervisor = threading.Thread(
                target=self._supervise, args=(self._stopping, previous),
                name=f"{self.name}-supervisor", daemon=True,
            )
            self._supervisor.start()

    def request_keyframe(self) -> None:
        try:
            self._force_keyframe()
        except Exception as exc:  # the encoder's own keyframe period still bounds the wait
            log.warning("%s: keyframe request failed: %s", self.name, exc)

    def stop(self) -> None:
        with self._lock:
            supervisor = self._supervisor
            self._stopping.set()
            self._generation += 1  # whatever is in flight now is stale
            self._frame_arrived.notify_all()
        # Wait for a delivery in progress so that no on_frame call follows stop(); bounded, as
        # on_frame only hands over.
        if self._deliver_lock.acquire(timeout=self._stop_timeout_s):
            self._deliver_lock.release()
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(self._stop_timeout_s)
            if supervisor.is_alive():
                log.warning(
                    "%s: device teardown still running after %g s; abandoned",
                    self.name, self._stop_timeout_s,
                )

    @property
    def health(self) -> SourceHealth:
        with self._lock:
            return self._health

    # ---- backend hooks

    def _open(self, deliver: Deliver) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _force_keyframe(self) -> None:
        """Default: nothing to do (audio)."""

    # ---- the supervisor

    def _make_deliver(self, generation: int) -> Deliver:
        def deliver(keyframe: bool, capture_us: int, payload: bytes) -> None:
            with self._deliver_lock:
                with self._lock:
                    if generation != self._generation or self._stopping.is_set():
                        return  # an abandoned session, or after stop(): never handed over
                    on_frame = self._on_frame
                    seq = self._seq
                    self._seq = (seq + 1) % SEQ_MODULO
                    self._last_frame_mono = time.monotonic()
                    self._health = replace(
                        self._health,
                        frames=self._health.frames + 1,
                        last_frame_ns=self._clock.boot_ns(),
                    )
                    self._frame_arrived.notify_all()
                if on_frame is not None:
                    on_frame(
                        MediaFrame(
                            stream=self.stream, keyframe=keyframe, seq=seq,
                            capture_us=capture_us, payload=payload,
                        )
                    )

        return deliver

    def _supervise(self, stopping: threading.Event, previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join(2 * self._call_timeout_s)
        try:
            self._supervise_loop(stopping)
        except Exception:  # a bug here must still end in a clear fault, not a silent thread
            log.exception("%s: supervisor failed", self.name)
            self._set_fault(f"{self.name}: supervisor failed", stopping)

    def _supervise_loop(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            with self._lock:
                if stopping.is_set():
                    return
                self._generation += 1
                generation = self._generation
                self._last_frame_mono = None
            opened_at = time.monotonic()
            deliver = self._make_deliver(generation)
            reason: str | None
            try:
                run_bounded(
                    functools.partial(self._open, deliver),
                    self._call_timeout_s, f"{self.name}-open",
                )
            except Exception as exc:
                reason = f"{self.name} failed to start: {exc}"
            else:
                log.info("%s: started", self.name)
                reason = self._watch(stopping, generation, opened_at)
            with self._lock:
                if self._generation == generation:
                    self._generation += 1  # the session being closed delivers no more
            self._close_bounded()
            if reason is None or stopping.is_set():
                return
            with self._lock:
                restarts = self._health.restarts
            if restarts >= self._max_restarts:
                self._set_fault(f"{reason} (after {restarts} restarts)", stopping)
                return
            with self._lock:
                self._health = replace(self._health, restarts=restarts + 1)
            log.warning("%s: %s; restarting (%d/%d)", self.name, reason, restarts + 1,
                        self._max_restarts)
            stopping.wait(self._restart_delay_s)

    def _watch(self, stopping: threading.Event, generation: int, opened_at: float) -> str | None:
        """Block until stop (None) or until frames stop arriving (the reason)."""
        with self._lock:
            while True:
                if stopping.is_set() or generation != self._generation:
                    return None
                now = time.monotonic()
                if self._last_frame_mono is None:
                    limit, since = self._first_frame_timeout_s, opened_at
                    what = "no first frame"
                else:
                    limit, since = self._frame_timeout_s, self._last_frame_mono
                    what = "no frame"
                if now - since >= limit:
                    return f"{self.name}: {what} for {now - since:.1f} s"
                self._frame_arrived.wait(since + limit - now)

    def _close_bounded(self) -> None:
        try:
            run_bounded(self._close, self._call_timeout_s, f"{self.name}-close")
        except Exception as exc:
            log.warning("%s: close failed: %s", self.name, exc)

    def _set_fault(self, detail: str, stopping: threading.Event) -> None:
        with self._lock:
            self._health = replace(self._health, fault=detail)
            on_fault = self._on_fault
            stopping.set()
        log.error("%s: fault: %s", self.name, detail)
        if on_fault is not None:
            try:
                on_fault(detail)
            except Exception:
                log.exception("%s: on_fault raised", self.name)


# --------------------------------------------------------------------------------------------
# H.264 helpers


def _check_video(width: int, height: int, fps: int) -> None:
    """Raises ValueError for a picture H.264 4:2:0 cannot carry or a rate out of range."""
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"camera size must be positive and even, not {width}x{height}")
    if not 1 <= fps <= 120:
        raise ValueError(f"camera fps must be 1..120, not {fps}")


def h264_nal_types(payload: bytes) -> list[int]:
    """NAL unit types of an Annex B access unit, up to and including the first slice."""
    types: list[int] = []
    pos = payload.find(b"\x00\x00\x01")
    while pos >= 0 and pos + 3 < len(payload):
        nal_type = payload[pos + 3] & 0x1F
        types.append(nal_type)
        if 1 <= nal_type <= 5:  # a slice: the rest of the unit is picture data
            break
        pos = payload.find(b"\x00\x00\x01", pos + 3)
    return types


def is_h264_keyframe(payload: bytes) -> bool:
    """True for an IDR access unit with SPS (7) and PPS (8) before it (protocol 6.1 flags)."""
    types = h264_nal_types(payload)
    return bool(types) and types[-1] == 5 and 7 in types and 8 in types


# --------------------------------------------------------------------------------------------
# Simulated backends


# A 3x5 pixel font for the burned-in frame number and time.
_FONT: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"),
    " ": ("000", "000", "000", "000", "000"),
}


def _render_text(text: str, scale: int) -> list[bytes]:
    """Luma rows (white on black, one glyph column of padding) for ``text``."""
    rows: list[bytes] = []
    for glyph_row in range(5):
        line = bytearray()
        for char in text:
            for bit in _FONT.get(char, _FONT[" "])[glyph_row] + "0":
                line += (b"\xeb" if bit == "1" else b"\x10") * scale
        rows.extend([bytes(line)] * scale)
    return rows


class _TestPattern:
    """Builds yuv420p frames: diagonal stripes moving right, text in the top-left corner."""

    PERIOD = 64

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        stripe = bytes(16 + (i * 219 // (self.PERIOD - 1)) for i in range(self.PERIOD))
        self._row = (stripe * (width // self.PERIOD + 2))[: width + self.PERIOD]
        self._scale = max(1, height // 90)
        probe = av.VideoFrame(width, height, "yuv420p")
        self._y_stride = probe.planes[0].line_size
        self._u = bytes([96]) * probe.planes[1].buffer_size
        self._v = bytes([160]) * probe.planes[2].buffer_size

    def frame(self, number: int, capture_us: int) -> av.VideoFrame:
        width, stride, period = self.width, self._y_stride, self.PERIOD
        shift = number * 4
        pad = b"\x00" * (stride - width)
        luma = bytearray(
            b"".join(
                self._row[(p := (period - (shift + r) % period) % period) : p + width] + pad
                for r in range(self.height)
            )
        )
        text = f"{number:06d} {capture_us / US_PER_S:.3f}"
        margin = 2 * self._scale
        for i, text_row in enumerate(_render_text(text, self._scale)):
            y = margin + i
            if y >= self.height:
                break
            row = text_row[: width - margin]
            luma[y * stride + margin : y * stride + margin + len(row)] = row
        frame = av.VideoFrame(width, self.height, "yuv420p")
        frame.planes[0].update(bytes(luma))
        frame.planes[1].update(self._u)
        frame.planes[2].update(self._v)
        return frame


class _Pacer:
    """A producer thread ticking every ``period_s`` on the monotonic clock, with test verbs."""

    def __init__(self, name: str, period_s: float, tick: Callable[[int], None]) -> None:
        self._period_s = period_s
        self._tick = tick
        self._stop = threading.Event()
        self.hung = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        number = 0
        while not self._stop.is_set():
            delay = start + number * self._period_s - time.monotonic()
            if delay > 0:
                if self._stop.wait(delay):
                    return
            elif -delay >= self._period_s:
                # Behind by a whole period or more (a slow host): drop the missed slots, as a
                # sensor does when its consumer is late, rather than catching up in a burst.
                number = int((time.monotonic() - start) / self._period_s)
            if not self.hung.is_set():
                self._tick(number)
            number += 1

    def close(self, timeout_s: float) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)


class SimCamera(SupervisedSource):
    """A simulated camera: a moving test pattern encoded to real H.264 with PyAV's libx264.

    Constrained baseline profile, ultrafast/zerolatency, one IDR every ``2 * fps`` frames at
    most (protocol 6.2: a keyframe at least every 2 s), SPS/PPS repeated before each IDR.
    Each frame carries its number and capture time (CLOCK_BOOTTIME seconds) burned in.
    Test verbs: :meth:`hang` (frames stop, like a frontend timeout), :meth:`fail_starts`.
    """

    def __init__(
        self,
        width: int = 1280,
        height: int = 720,
        fps: int = 25,
        bitrate: int = 1_500_000,
        *,
        frame_timeout_s: float = 2.0,
        max_restarts: int = 3,
        restart_delay_s: float = 0.2,
        clock: Clock | None = None,
    ) -> None:
        _check_video(width, height, fps)
        if bitrate <= 0:
            raise ValueError(f"camera bitrate must be positive, not {bitrate}")
        super().__init__(
            Stream.VIDEO, "sim-camera", frame_timeout_s=frame_timeout_s,
            max_restarts=max_restarts, restart_delay_s=restart_delay_s, clock=clock,
        )
        self.width, self.height, self.fps, self.bitrate = width, height, fps, bitrate
        self._pattern = _TestPattern(width, height)
        self._pacer: _Pacer | None = None
        self._want_keyframe = threading.Event()
        self._failures: list[str] = []

    # ---- test verbs

    def hang(self) -> None:
        """The current device session stops producing frames (the watchdog will restart it)."""
        pacer = self._pacer
        if pacer is not None:
            pacer.hung.set()

    def fail_starts(self, times: int, detail: str = "Cannot allocate memory") -> None:
        """The next ``times`` device opens fail with ``detail``."""
        self._failures.extend([detail] * times)

    # ---- backend

    def _encoder(self) -> VideoCodecContext:
        gop = 2 * self.fps
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = self.width, self.height, "yuv420p"
        ctx.time_base = Fraction(1, self.fps)
        ctx.framerate = Fraction(self.fps, 1)
        ctx.bit_rate = self.bitrate
        ctx.gop_size = gop
        ctx.options = {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "profile": "baseline",
            "forced-idr": "1",  # a requested keyframe is an IDR, not just an I frame
            "x264-params": f"repeat-headers=1:keyint={gop}:scenecut=0",
        }
        ctx.open()
        return ctx

    def _open(self, deliver: Deliver) -> None:
        if self._failures:
            raise MediaSourceError(self._failures.pop(0))
        encoder = self._encoder()
        self._want_keyframe.clear()

        def tick(number: int) -> None:
            capture_us = self._clock.boot_ns() // NS_PER_US
            frame = self._pattern.frame(number, capture_us)
            frame.pts = number
            if self._want_keyframe.is_set():
                self._want_keyframe.clear()
                frame.pict_type = PictureType.I
            for packet in encoder.encode(frame):
                deliver(bool(packet.is_keyframe), capture_us, bytes(packet))

        self._pacer = _Pacer("sim-camera", 1 / self.fps, tick)

    def _close(self) -> None:
        pacer, self._pacer = self._pacer, None
        if pacer is not None:
            pacer.close(1.0)

    def _force_keyframe(self) -> None:
        self._want_keyframe.set()


def _tone_pcm(frequency_hz: float, amplitude: float = 0.25) -> bytes:
    """One second of a mono s16le sine at 48 kHz (a whole number of cycles for 440 Hz)."""
    peak = int(amplitude * 32767)
    return b"".join(
        struct.pack("<h", int(peak * math.sin(2 * math.pi * frequency_hz * i / OPUS_RATE)))
        for i in range(OPUS_RATE)
    )


def _opus_encoder(bitrate: int) -> AudioCodecContext:
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate = OPUS_RATE
    ctx.layout = "mono"
    ctx.format = "s16"
    ctx.bit_rate = bitrate
    ctx.time_base = Fraction(1, OPUS_RATE)
    ctx.options = {"application": "voip", "frame_duration": "20"}
    ctx.open()
    return ctx


class SimMicrophone(SupervisedSource):
    """A simulated microphone: a 440 Hz tone encoded to Opus (48 kHz, mono, 20 ms packets)."""

    def __init__(
        self,
        bitrate: int = 32_000,
        frequency_hz: float = 440.0,
        *,
        frame_timeout_s: float = 1.0,
        max_restarts: int = 3,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(
            Stream.AUDIO, "sim-microphone", frame_timeout_s=frame_timeout_s,
            max_restarts=max_restarts, clock=clock,
        )
        self.bitrate = bitrate
        self._pcm = _tone_pcm(frequency_hz)
        self._pacer: _Pacer | None = None

    def _open(self, deliver: Deliver) -> None:
        encoder = _opus_encoder(self.bitrate)
        chunk = 2 * OPUS_FRAME_SAMPLES
        chunks = len(self._pcm) // chunk

        def tick(number: int) -> None:
            capture_us = self._clock.boot_ns() // NS_PER_US
            frame = av.AudioFrame(format="s16", layout="mono", samples=OPUS_FRAME_SAMPLES)
            frame.sample_rate = OPUS_RATE
            offset = (number % chunks) * chunk
            frame.planes[0].update(self._pcm[offset : offset + chunk])
            frame.pts = number * OPUS_FRAME_SAMPLES
            for packet in encoder.encode(frame):
                deliver(True, capture_us, bytes(packet))

        self._pacer = _Pacer("sim-microphone", OPUS_FRAME_S, tick)

    def _close(self) -> None:
        pacer, self._pacer = self._pacer, None
        if pacer is not None:
            pacer.close(1.0)


# --------------------------------------------------------------------------------------------
# Device backends


# V4L2 (linux/videodev2.h, v4l2-controls.h): VIDIOC_S_CTRL = _IOWR('V', 28, struct v4l2_control)
# and V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME = V4L2_CID_CODEC_BASE + 229.
_VIDIOC_S_CTRL = 0xC008561C
_V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME = 0x009909E5


def _make_output_class(base: Any) -> Any:
    """A picamera2 Output subclass that hands each encoded frame to ``handler``."""

    class _HandOver(base):  # type: ignore[misc]  # base is picamera2's Output, untyped (Any)
        def __init__(self, handler: Callable[[bytes, bool, int | None], None]) -> None:
            super().__init__()
            self._handler = handler

        # picamera2 >= 0.3.13 passes (frame, keyframe, timestamp, packet, audio); older 3 args.
        def outputframe(
            self,
            frame: bytes,
            keyframe: bool = True,
            timestamp: int | None = None,
            packet: Any = None,
            audio: bool = False,
        ) -> None:
            if not audio and frame is not None:
                self._handler(bytes(frame), bool(keyframe), timestamp)

    return _HandOver


class Picamera2Camera(SupervisedSource):
    """The Camera Module through picamera2 and the Pi's hardware H.264 encoder.

    ``import picamera2`` happens on the first open, on the supervisor thread (it cannot import
    off-device). Each open: ``Picamera2(camera_num)``, a video configuration (``size``, YUV420,
    frame rate pinned by ``FrameDurationLimits``), ``H264Encoder(bitrate, repeat=True,
    iperiod=2*fps)`` (SPS/PPS before every IDR, an IDR at least every 2 s), and
    ``start_recording`` into an Output that hands frames to ``on_frame``.

    Capture time: picamera2 passes microseconds since the encoder's first frame; the first
    frame's SensorTimestamp (CLOCK_BOOTTIME, libcamera) is ``encoder.firsttimestamp``. If that is
    missing or disagrees with the boot clock by more than ``max_clock_skew_s``, the arrival time
    on the boot clock is used instead.
    """

    def __init__(
        self,
        width: int = 1280,
        height: int = 720,
        fps: int = 25,
        bitrate: int = 1_500_000,
        *,
        camera_num: int = 0,
        profile: str = "baseline",
        frame_timeout_s: float = 2.0,
        first_frame_timeout_s: float = 5.0,
        call_timeout_s: float = 5.0,
        max_restarts: int = 3,
        restart_delay_s: float = 1.0,
        stop_timeout_s: float = 2.0,
        max_clock_skew_s: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        _check_video(width, height, fps)
        super().__init__(
            Stream.VIDEO, "picamera2", frame_timeout_s=frame_timeout_s,
            first_frame_timeout_s=first_frame_timeout_s, call_timeout_s=call_timeout_s,
            max_restarts=max_restarts, restart_delay_s=restart_delay_s,
            stop_timeout_s=stop_timeout_s, clock=clock,
        )
        self.width, self.height, self.fps, self.bitrate = width, height, fps, bitrate
        self.camera_num, self.profile = camera_num, profile
        self._max_skew_us = int(max_clock_skew_s * US_PER_S)
        self._camera: Any = None
        self._encoder: Any = None

    def _open(self, deliver: Deliver) -> None:
        # Imported here, on the device only: it needs libcamera's Python bindings.
        picamera2 = importlib.import_module("picamera2")
        H264Encoder = importlib.import_module("picamera2.encoders").H264Encoder
        Output = importlib.import_module("picamera2.outputs").Output

        camera = picamera2.Picamera2(self.camera_num)
        self._camera = camera  # so that _close releases it even if the rest fails
        frame_us = round(US_PER_S / self.fps)
        config = camera.create_video_configuration(
            main={"size": (self.width, self.height), "format": "YUV420"},
            controls={"FrameDurationLimits": (frame_us, frame_us)},
        )
        camera.configure(config)
        kwargs: dict[str, Any] = {"bitrate": self.bitrate, "repeat": True, "iperiod": 2 * self.fps}
        try:
            encoder = H264Encoder(profile=self.profile, **kwargs)
        except TypeError:  # picamera2 before 0.3.17 has no profile argument
            encoder = H264Encoder(**kwargs)
        self._encoder = encoder
        pending = bytearray()  # SPS/PPS delivered in a buffer of their own wait for the slice

        def handle(payload: bytes, keyframe: bool, timestamp: int | None) -> None:
            types = h264_nal_types(payload)
            if not any(1 <= t <= 5 for t in types):
                pending.extend(payload)
                return
            if pending:
                payload = bytes(pending) + payload
                pending.clear()
            deliver(keyframe and is_h264_keyframe(payload), self._capture_us(timestamp), payload)

        output = _make_output_class(Output)(handle)
        camera.start_recording(encoder, output)

    def _capture_us(self, timestamp: int | None) -> int:
        now_us = self._clock.boot_ns() // NS_PER_US
        first = getattr(self._encoder, "firsttimestamp", None)
        if isinstance(first, int) and isinstance(timestamp, int):
            capture_us = first + timestamp
            if abs(now_us - capture_us) <= self._max_skew_us:
                return capture_us
        return now_us

    def _close(self) -> None:
        camera, self._camera = self._camera, None
        self._encoder = None
        if camera is None:
            return
        try:
            camera.stop_recording()
        finally:
            camera.close()

    def _force_keyframe(self) -> None:
        # picamera2 has no API for this; the V4L2 control is a button on the bcm2835 codec.
        vd = getattr(self._encoder, "vd", None)
        if vd is None:
            raise MediaSourceError("encoder not running")
        fcntl.ioctl(vd, _VIDIOC_S_CTRL, struct.pack("Ii", _V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME, 0))


class AlsaMicrophone(SupervisedSource):
    """The microphone through ALSA, read and encoded to Opus with PyAV.

    ``device``/``input_format`` are what ``av.open`` takes (``"default"``, ``"alsa"`` on the
    tablet; tests point them at a file). The input is resampled to 48 kHz mono s16 in 20 ms
    frames. The capture time of each packet is the boot clock when its last sample was read.
    """

    def __init__(
        self,
        device: str = "default",
        input_format: str = "alsa",
        bitrate: int = 32_000,
        *,
        frame_timeout_s: float = 1.0,
        call_timeout_s: float = 5.0,
        max_restarts: int = 3,
        restart_delay_s: float = 0.5,
        stop_timeout_s: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(
            Stream.AUDIO, "alsa-microphone", frame_timeout_s=frame_timeout_s,
            call_timeout_s=call_timeout_s, max_restarts=max_restarts,
            restart_delay_s=restart_delay_s, stop_timeout_s=stop_timeout_s, clock=clock,
        )
        self.device, self.input_format, self.bitrate = device, input_format, bitrate
        self._session_stop: threading.Event | None = None
        self._reader: threading.Thread | None = None

    def _open(self, deliver: Deliver) -> None:
        options: dict[str, str] = {}
        if self.input_format == "alsa":
            options = {"sample_rate": str(OPUS_RATE), "channels": "1"}
        container = av.open(self.device, format=self.input_format, options=options)
        try:
            audio = container.streams.audio[0]
            encoder = _opus_encoder(self.bitrate)
            resampler = av.AudioResampler(
                format="s16", layout="mono", rate=OPUS_RATE, frame_size=OPUS_FRAME_SAMPLES
            )
        except Exception:
            container.close()
            raise
        session_stop = threading.Event()

        def read() -> None:
            # Only this thread touches the container: closing it from another thread while a
            # read is in progress is not safe in FFmpeg.
            pts = 0
            try:
                for decoded in container.decode(audio):
                    if session_stop.is_set():
                        break
                    for frame in resampler.resample(decoded):
                        capture_us = self._clock.boot_ns() // NS_PER_US
                        frame.pts = pts
                        pts += frame.samples
                        for packet in encoder.encode(frame):
                            deliver(True, capture_us, bytes(packet))
            except Exception as exc:  # the watchdog notices the silence and restarts
                log.warning("%s: capture ended: %s", self.name, exc)
            finally:
                container.close()

        self._session_stop = session_stop
        self._reader = threading.Thread(target=read, name="alsa-microphone", daemon=True)
        self._reader.start()

    def _close(self) -> None:
        session_stop, reader = self._session_stop, self._reader
        self._session_stop = self._reader = None
        if session_stop is not None:
            session_stop.set()
        if reader is not None and reader is not threading.current_thread():
            reader.join(self._call_timeout_s)
