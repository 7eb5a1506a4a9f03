"""A fake picamera2 with test verbs (gpiozero MockFactory habit), for the real one cannot import
here (no libcamera bindings).

It mimics the parts :class:`tabletd.hardware.camera.Picamera2Camera` uses, with the shapes of
picamera2 0.3.x: ``Picamera2(camera_num)``, ``create_video_configuration(main=, controls=)``,
``configure``, ``start_recording(encoder, output)``, ``stop_recording``, ``close``;
``encoders.H264Encoder(bitrate=, repeat=, iperiod=, profile=)`` with ``firsttimestamp`` (µs of
the first frame's SensorTimestamp) and ``vd``; ``outputs.Output`` whose ``outputframe(frame,
keyframe, timestamp, packet, audio)`` receives microseconds since the first frame.

:func:`install` puts the modules in ``sys.modules`` (use it with pytest's ``monkeypatch``) and
returns the :class:`Rig`, which holds the test verbs.
"""

from __future__ import annotations

import sys
import threading
import time
import types
from typing import Any

import pytest

SPS = b"\x00\x00\x00\x01\x67\x42\xc0\x1f\x8c\x8d\x40"
PPS = b"\x00\x00\x00\x01\x68\xce\x3c\x80"
IDR = b"\x00\x00\x00\x01\x65\x88\x84\x00\x33"
NON_IDR = b"\x00\x00\x00\x01\x41\x9a\x02\x03"


def boot_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000


class Output:
    """picamera2.outputs.Output."""

    def __init__(self, pts: Any = None) -> None:
        self.recording = False

    def start(self) -> None:
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def outputframe(
        self, frame: bytes, keyframe: bool = True, timestamp: int | None = None,
        packet: Any = None, audio: bool = False,
    ) -> None:
        pass


class H264Encoder:
    """picamera2.encoders.H264Encoder (only what is observable from outside)."""

    def __init__(  # noqa: PLR0917 - picamera2's own signature
        self, bitrate: int | None = None, repeat: bool = True, iperiod: int | None = None,
        framerate: float | None = None, enable_sps_framerate: bool = False,
        qp: int | None = None, profile: str | None = None,
    ) -> None:
        self.bitrate, self.repeat, self.iperiod, self.profile = bitrate, repeat, iperiod, profile
        self.firsttimestamp: int | None = None
        self.vd: Any = None
        self.output: Output | None = None


class Rig:
    """Test verbs for the fake camera stack; one per test."""

    def __init__(self) -> None:
        self.cameras: list[Picamera2] = []
        self._failures: list[tuple[str, BaseException]] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._autoplay: threading.Thread | None = None
        self._autoplay_stop = threading.Event()

    # ---- verbs

    def fail_start_with(
        self, exc: BaseException, times: int = 1, at: str = "start_recording"
    ) -> None:
        """The next ``times`` calls of ``at`` ("Picamera2", "configure", "start_recording")
        raise ``exc``."""
        with self._lock:
            self._failures.extend([(at, exc)] * times)

    def hang(self, calls: tuple[str, ...] = ("stop_recording", "close")) -> None:
        """The current camera stops producing frames, and its ``calls`` block until release()
        (the "Camera frontend has timed out" failure)."""
        camera = self.current
        assert camera is not None, "no camera to hang"
        camera.hung = True
        camera.blocking_calls = set(calls)

    def hang_next(self, call: str = "start_recording") -> None:
        """The next camera created blocks in ``call`` until release()."""
        with self._lock:
            self._failures.append((call, _Hang()))

    def release(self) -> None:
        """Unblock every hung call (end of test)."""
        self._released.set()

    def emit_frame(self, keyframe: bool = False, camera: Picamera2 | None = None) -> bool:
        """The (current) recording camera's encoder outputs one frame; False if none can."""
        camera = camera or self.current
        if camera is None or not camera.recording or camera.hung:
            return False
        return camera.emit(keyframe)

    def autoplay(self, fps: float = 50, keyframe_every: int = 10) -> None:
        """Emit frames at ``fps`` on whichever camera is recording, until :meth:`close`."""

        def run() -> None:
            n = 0
            while not self._autoplay_stop.wait(1 / fps):
                if self.emit_frame(keyframe=n % keyframe_every == 0):
                    n += 1

        self._autoplay = threading.Thread(target=run, name="fake-autoplay", daemon=True)
        self._autoplay.start()

    def close(self) -> None:
        self._autoplay_stop.set()
        self.release()
        if self._autoplay is not None:
            self._autoplay.join(1)

    @property
    def current(self) -> Picamera2 | None:
        with self._lock:
            return self.cameras[-1] if self.cameras else None

    # ---- for the fake classes

    def _check(self, call: str) -> None:
        with self._lock:
            for i, (at, failure) in enumerate(self._failures):
                if at == call:
                    del self._failures[i]
                    exc = failure
                    break
            else:
                return
        if isinstance(exc, _Hang):
            self._released.wait()
            return
        raise exc

    def _block(self, camera: Picamera2, call: str) -> None:
        if call in camera.blocking_calls:
            self._released.wait()


class _Hang(Exception):
    pass


class Picamera2:
    """picamera2.Picamera2."""

    rig: Rig  # set by install()

    def __init__(self, camera_num: int = 0) -> None:
        self.rig._check("Picamera2")
        self.camera_num = camera_num
        self.config: dict[str, Any] | None = None
        self.encoder: H264Encoder | None = None
        self.recording = False
        self.closed = False
        self.hung = False
        self.blocking_calls: set[str] = set()
        self._frames = 0
        self._emit_lock = threading.Lock()
        with self.rig._lock:
            self.rig.cameras.append(self)

    def create_video_configuration(
        self, main: dict[str, Any] | None = None, controls: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        return {"main": dict(main or {}), "controls": dict(controls or {}), **kwargs}

    def configure(self, config: dict[str, Any]) -> None:
        self.rig._check("configure")
        self.config = config

    def start_recording(self, encoder: H264Encoder, output: Output) -> None:
        if not isinstance(output, Output):
            raise RuntimeError("Must pass Output")
        self.rig._check("start_recording")
        self.encoder = encoder
        encoder.output = output
        encoder.firsttimestamp = None
        encoder.vd = None
        output.start()
        self.recording = True

    def emit(self, keyframe: bool) -> bool:
        encoder = self.encoder
        if encoder is None or encoder.output is None:
            return False
        with self._emit_lock:
            now = boot_us()
            if encoder.firsttimestamp is None:
                encoder.firsttimestamp = now
                keyframe = True  # an encoder's first frame is an IDR
            payload = SPS + PPS + IDR if keyframe else NON_IDR
            payload += self._frames.to_bytes(4, "big")
            self._frames += 1
            encoder.output.outputframe(payload, keyframe, now - encoder.firsttimestamp, None, False)
        return True

    def stop_recording(self) -> None:
        self.rig._block(self, "stop_recording")
        self.recording = False
        if self.encoder is not None and self.encoder.output is not None:
            self.encoder.output.stop()

    def close(self) -> None:
        self.rig._block(self, "close")
        self.recording = False
        self.closed = True


def install(monkeypatch: pytest.MonkeyPatch) -> Rig:
    """Make ``import picamera2`` (and its encoders/outputs) find this fake; return the rig."""
    rig = Rig()
    Picamera2.rig = rig
    package = types.ModuleType("picamera2")
    encoders = types.ModuleType("picamera2.encoders")
    outputs = types.ModuleType("picamera2.outputs")
    package.Picamera2 = Picamera2  # type: ignore[attr-defined]
    encoders.H264Encoder = H264Encoder  # type: ignore[attr-defined]
    outputs.Output = Output  # type: ignore[attr-defined]
    package.encoders = encoders  # type: ignore[attr-defined]
    package.outputs = outputs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "picamera2", package)
    monkeypatch.setitem(sys.modules, "picamera2.encoders", encoders)
    monkeypatch.setitem(sys.modules, "picamera2.outputs", outputs)
    return rig
