"""Camera and microphone backends: real H.264/Opus from the simulated ones (decoded with PyAV),
and the picamera2 backend's wiring against a fake Picamera2 with test verbs."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest

from tabletd.hardware.camera import (
    AlsaMicrophone,
    MediaSource,
    Picamera2Camera,
    SimCamera,
    SimMicrophone,
    h264_nal_types,
    is_h264_keyframe,
)
from tabletd.media.frames import MediaFrame, Stream
from tests import fake_picamera2
from tests.fake_picamera2 import IDR, PPS, SPS, Rig


def wait_until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    """Poll a condition from the test thread, with a bound; never a fixed sleep."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


class Sink:
    """An on_frame/on_fault pair that records what the source's thread hands over."""

    def __init__(self) -> None:
        self.frames: list[MediaFrame] = []
        self.faults: list[str] = []
        self.lock = threading.Lock()

    def on_frame(self, frame: MediaFrame) -> None:
        with self.lock:
            self.frames.append(frame)

    def on_fault(self, detail: str) -> None:
        self.faults.append(detail)

    def count(self) -> int:
        with self.lock:
            return len(self.frames)


def decode_video(frames: list[MediaFrame]) -> list[av.VideoFrame]:
    decoder = av.CodecContext.create("h264", "r")
    out: list[av.VideoFrame] = []
    for frame in frames:
        out.extend(decoder.decode(av.Packet(frame.payload)))
    out.extend(decoder.decode(None))
    return out


def boot_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000


# --------------------------------------------------------------------------------------------
# Simulated backends: real codecs


def test_sim_camera_produces_decodable_h264_with_keyframes_on_request() -> None:
    camera: MediaSource = SimCamera(320, 240, fps=25, bitrate=300_000)
    sink = Sink()
    before = boot_us()
    camera.start(sink.on_frame)
    try:
        wait_until(lambda: sink.count() >= 8)
        requested_at = sink.count()
        camera.request_keyframe()
        wait_until(lambda: sink.count() >= requested_at + 6)
    finally:
        camera.stop()
    frames = list(sink.frames)

    first = frames[0]
    assert first.stream is Stream.VIDEO and first.keyframe
    assert is_h264_keyframe(first.payload)
    assert h264_nal_types(first.payload)[:2] == [7, 8]  # SPS, PPS before the IDR
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert all(b.capture_us > a.capture_us for a, b in itertools.pairwise(frames))
    assert before <= first.capture_us <= frames[-1].capture_us <= boot_us()
    # A requested keyframe is an IDR with SPS/PPS within 2 frames (the GOP is 50 frames).
    window = frames[requested_at : requested_at + 2]
    assert any(f.keyframe and is_h264_keyframe(f.payload) for f in window)
    assert not any(f.keyframe for f in frames[1:requested_at])
    # Every non-key frame is a plain slice.
    assert all(is_h264_keyframe(f.payload) == f.keyframe for f in frames)

    decoded = decode_video(frames)
    assert len(decoded) == len(frames)
    assert {(d.width, d.height) for d in decoded} == {(320, 240)}
    assert camera.health.frames == len(frames) and camera.health.fault is None


def test_sim_camera_burns_in_a_changing_picture() -> None:
    camera = SimCamera(320, 240, fps=25, bitrate=600_000)
    sink = Sink()
    camera.start(sink.on_frame)
    try:
        wait_until(lambda: sink.count() >= 3)
    finally:
        camera.stop()
    decoded = decode_video(sink.frames[:3])
    lumas = [bytes(d.planes[0]) for d in decoded]
    assert lumas[0] != lumas[1] != lumas[2]  # the pattern moves, the number changes
    text_row = lumas[0][6 * decoded[0].planes[0].line_size :][:100]  # inside the digits
    assert max(text_row) > 200 and min(text_row) < 40  # white glyphs on black


def test_sim_camera_frame_rate_at_720p_within_5_percent() -> None:
    camera = SimCamera()  # the defaults: 1280x720, 25 fps, 1.5 Mbit/s
    sink = Sink()
    camera.start(sink.on_frame)
    try:
        wait_until(lambda: sink.count() >= 5)  # the encoder is warm
        start_count, start = sink.count(), time.monotonic()
        time.sleep(2.0)  # a counting window, not a deadline
        count, elapsed = sink.count() - start_count, time.monotonic() - start
    finally:
        camera.stop()
    expected = 25 * elapsed
    assert abs(count - expected) <= 0.05 * expected + 1, (count, expected)
    size = sum(len(f.payload) for f in sink.frames)
    assert size * 8 / (elapsed + 0.1) < 3 * 1_500_000  # near the configured bitrate


def test_sim_camera_hang_is_restarted_by_the_watchdog() -> None:
    camera = SimCamera(160, 120, fps=25, bitrate=100_000, frame_timeout_s=0.3,
                       restart_delay_s=0.05)
    sink = Sink()
    camera.start(sink.on_frame)
    try:
        wait_until(lambda: sink.count() >= 3)
        camera.hang()
        hung_at = sink.count()
        wait_until(lambda: camera.health.restarts == 1)
        wait_until(lambda: sink.count() >= hung_at + 4)
    finally:
        camera.stop()
    # The new encoder starts with an IDR (at most one frame was in flight at the hang); the
    # first session's next scheduled IDR is 2 s away.
    assert any(f.keyframe for f in sink.frames[hung_at : hung_at + 2])
    assert camera.health.fault is None


def test_sim_camera_fault_after_bounded_restarts() -> None:
    camera = SimCamera(160, 120, max_restarts=2, restart_delay_s=0.01)
    camera.fail_starts(5, "Cannot allocate memory")
    sink = Sink()
    camera.start(sink.on_frame, sink.on_fault)
    wait_until(lambda: camera.health.fault is not None)
    camera.stop()
    assert sink.faults == [camera.health.fault]
    assert "Cannot allocate memory" in sink.faults[0]
    assert camera.health.restarts == 2 and sink.frames == []


def test_sim_microphone_produces_opus_that_decodes() -> None:
    microphone: MediaSource = SimMicrophone()
    sink = Sink()
    microphone.start(sink.on_frame)
    try:
        wait_until(lambda: sink.count() >= 15)
    finally:
        microphone.stop()
    frames = list(sink.frames)
    assert all(f.stream is Stream.AUDIO for f in frames)
    assert [f.seq for f in frames] == list(range(len(frames)))
    decoder = av.CodecContext.create("opus", "r")
    decoder.sample_rate = 48_000
    decoder.layout = "mono"
    for frame in frames:
        (pcm,) = decoder.decode(av.Packet(frame.payload))
        assert (pcm.samples, pcm.sample_rate, pcm.layout.name) == (960, 48_000, "mono")


def test_alsa_microphone_pipeline_on_a_file(tmp_path: Path) -> None:
    """The ALSA backend's read-resample-encode path, fed from a 44.1 kHz stereo WAV."""
    wav = tmp_path / "tone.wav"
    with av.open(str(wav), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=44_100, layout="stereo")
        for n in range(44):  # ~1 s
            frame = av.AudioFrame(format="s16", layout="stereo", samples=1_000)
            frame.sample_rate = 44_100
            frame.planes[0].update(bytes(4_000))
            frame.pts = n * 1_000
            frame.time_base = Fraction(1, 44_100)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    microphone = AlsaMicrophone(str(wav), "wav", frame_timeout_s=5.0)
    sink = Sink()
    microphone.start(sink.on_frame)
    try:
        wait_until(lambda: sink.count() >= 40)
    finally:
        microphone.stop()
    decoder = av.CodecContext.create("opus", "r")
    for packet_frame in sink.frames[:40]:
        (pcm,) = decoder.decode(av.Packet(packet_frame.payload))
        assert (pcm.samples, pcm.sample_rate) == (960, 48_000)


# --------------------------------------------------------------------------------------------
# The picamera2 backend against the fake


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    rig = fake_picamera2.install(monkeypatch)
    yield rig
    rig.close()


def fake_camera(**kwargs: Any) -> Picamera2Camera:
    settings: dict[str, Any] = {
        "frame_timeout_s": 0.3, "first_frame_timeout_s": 0.5, "call_timeout_s": 0.3,
        "restart_delay_s": 0.02, "stop_timeout_s": 0.5,
    }
    settings.update(kwargs)
    return Picamera2Camera(640, 480, 25, 1_000_000, **settings)


def test_picamera2_frames_flow_with_flags_and_timestamps(rig: Rig) -> None:
    camera = fake_camera(frame_timeout_s=5.0, first_frame_timeout_s=5.0)
    sink = Sink()
    camera.start(sink.on_frame, sink.on_fault)
    try:
        wait_until(lambda: rig.current is not None and rig.current.recording)
        before = boot_us()
        assert rig.emit_frame(keyframe=True)
        assert rig.emit_frame(keyframe=False)
        assert rig.emit_frame(keyframe=False)
        wait_until(lambda: sink.count() == 3)
        after = boot_us()
        fake = rig.current
        assert fake is not None and fake.encoder is not None
        assert fake.config == {
            "main": {"size": (640, 480), "format": "YUV420"},
            "controls": {"FrameDurationLimits": (40_000, 40_000)},
        }
        encoder = fake.encoder
        assert (encoder.bitrate, encoder.repeat, encoder.iperiod, encoder.profile) == (
            1_000_000, True, 50, "baseline",
        )
        camera.request_keyframe()  # no V4L2 device here: logged, never raised
    finally:
        camera.stop()
    assert [(f.stream, f.keyframe, f.seq) for f in sink.frames] == [
        (Stream.VIDEO, True, 0), (Stream.VIDEO, False, 1), (Stream.VIDEO, False, 2),
    ]
    assert sink.frames[0].payload.startswith(SPS + PPS + IDR)
    first_us = encoder.firsttimestamp
    assert first_us is not None and sink.frames[0].capture_us == first_us
    assert all(before <= f.capture_us <= after for f in sink.frames)
    assert camera.health.frames == 3 and camera.health.fault is None


def test_picamera2_headers_in_their_own_buffer_join_the_next_frame(rig: Rig) -> None:
    camera = fake_camera(frame_timeout_s=5.0, first_frame_timeout_s=5.0)
    sink = Sink()
    camera.start(sink.on_frame)
    try:
        wait_until(lambda: rig.current is not None and rig.current.recording)
        fake = rig.current
        assert fake is not None and fake.encoder is not None
        output = fake.encoder.output
        assert output is not None
        fake.encoder.firsttimestamp = boot_us()
        output.outputframe(SPS + PPS, True, 0)  # picamera2 < 0.3.13 passes three arguments
        output.outputframe(IDR, True, 40_000)
        wait_until(lambda: sink.count() == 1)
    finally:
        camera.stop()
    (frame,) = sink.frames
    assert frame.keyframe and frame.payload == SPS + PPS + IDR


def test_picamera2_hang_is_restarted_by_the_watchdog(rig: Rig) -> None:
    camera = fake_camera()
    sink = Sink()
    rig.autoplay(fps=50)
    camera.start(sink.on_frame, sink.on_fault)
    try:
        wait_until(lambda: sink.count() >= 5)
        hung = rig.current
        rig.hang()  # frames stop; stop_recording/close block
        wait_until(lambda: camera.health.restarts == 1 and rig.current is not hung)
        resumed_from = sink.count()
        wait_until(lambda: sink.count() >= resumed_from + 5)
    finally:
        camera.stop()
    assert len(rig.cameras) == 2 and sink.faults == []
    # Each fake camera numbers its frames in the payload's last 4 bytes: the new encoder's
    # first frame is an IDR.
    firsts = [f for f in sink.frames if f.payload.endswith(bytes(4))]
    assert len(firsts) == 2 and all(f.keyframe for f in firsts)
    assert [f.seq for f in sink.frames] == list(range(len(sink.frames)))  # no gap, no repeat


def test_picamera2_hung_start_times_out_and_restarts(rig: Rig) -> None:
    rig.hang_next("start_recording")
    camera = fake_camera()
    sink = Sink()
    rig.autoplay(fps=50)
    camera.start(sink.on_frame, sink.on_fault)
    try:
        wait_until(lambda: sink.count() >= 5)
    finally:
        camera.stop()
    assert camera.health.restarts == 1 and sink.faults == []


def test_picamera2_repeated_failure_faults_after_bounded_restarts(rig: Rig) -> None:
    rig.fail_start_with(RuntimeError("Failed to start camera: Cannot allocate memory"), times=10)
    camera = fake_camera(max_restarts=3)
    sink = Sink()
    camera.start(sink.on_frame, sink.on_fault)
    wait_until(lambda: camera.health.fault is not None)
    camera.stop()
    health = camera.health
    assert health.restarts == 3 and len(rig.cameras) == 4
    assert sink.faults == [health.fault]
    assert health.fault is not None and "Cannot allocate memory" in health.fault
    assert all(c.closed for c in rig.cameras)  # each failed attempt released its camera


def test_picamera2_frames_stopping_for_good_faults(rig: Rig) -> None:
    camera = fake_camera(max_restarts=1)
    sink = Sink()
    camera.start(sink.on_frame, sink.on_fault)  # the fake never emits: no first frame
    wait_until(lambda: camera.health.fault is not None)
    camera.stop()
    assert camera.health.restarts == 1 and len(sink.faults) == 1
    assert "no first frame" in sink.faults[0]


def test_picamera2_stop_is_idempotent_and_bounded_when_hung(rig: Rig) -> None:
    camera = fake_camera(frame_timeout_s=5.0, call_timeout_s=5.0, stop_timeout_s=0.3)
    sink = Sink()
    rig.autoplay(fps=50)
    camera.start(sink.on_frame, sink.on_fault)
    wait_until(lambda: sink.count() >= 3)
    fake = rig.current
    assert fake is not None
    rig.hang()  # stop_recording and close will block
    started = time.monotonic()
    camera.stop()
    first_stop = time.monotonic() - started
    camera.stop()
    both = time.monotonic() - started
    assert first_stop < 1.0 and both < 2.0, (first_stop, both)
    delivered = sink.count()
    fake.hung = False
    assert rig.emit_frame(camera=fake)  # the abandoned session still produces...
    assert sink.count() == delivered  # ...but nothing reaches on_frame after stop()
    assert sink.faults == []


def test_picamera2_stop_before_start_and_restart_after_stop(rig: Rig) -> None:
    camera = fake_camera()
    camera.stop()  # nothing to stop: fine
    sink = Sink()
    rig.autoplay(fps=50)
    for _ in range(2):
        sink.frames.clear()
        camera.start(sink.on_frame, sink.on_fault)
        wait_until(lambda: sink.count() >= 3)
        camera.stop()
        assert sink.frames[0].seq == 0
    with pytest.raises(RuntimeError):
        camera.start(sink.on_frame)
        camera.start(sink.on_frame)
    camera.stop()
