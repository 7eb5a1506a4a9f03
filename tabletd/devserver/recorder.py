"""REFERENCE SERVER — development and tests only, never installed on a tablet.

Records one session's uplink (``docs/protocol.md`` section 6) to an MPEG-TS file, standing
in for the administration's recording. Nothing is re-encoded: each H.264 access unit and
each Opus packet is muxed as received, with ``pts = dts = capture_us`` rebased to the first
recorded frame (time base 1/1 000 000; the muxer rescales to MPEG-TS' 90 kHz).

- The file is opened at the first video keyframe (an IDR access unit with SPS and PPS
  before it, section 6.1): video and audio received before it are dropped and counted. The
  keyframe is decoded once to learn the picture size; the SPS/PPS stay in-band (Annex B,
  repeated before every keyframe), which is all MPEG-TS needs, so no ``extradata`` is set.
- Audio: Opus 48 kHz mono. MPEG-TS carries Opus natively (FFmpeg writes the Opus
  registration descriptor and the per-packet control header). A codec-less mux stream would
  be described as two channels (no ``OpusHead``), so the audio stream is declared with a
  ``libopus`` encoder context purely for its parameters (mono, 48 kHz, ``OpusHead``); it
  never encodes anything.
- A frame whose timestamp is not after the previous one of its stream (the muxer requires
  increasing dts) or before the first keyframe is dropped and counted, never fatal.

Every method runs on the caller's thread; muxing a frame is a buffered write (microseconds).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error
from av.audio.stream import AudioStream
from av.codec.context import CodecContext
from av.container import OutputContainer
from av.stream import Stream as AvStream
from av.video.codeccontext import VideoCodecContext

from tabletd.media.frames import MediaFrame, Stream

log = logging.getLogger("tabletd.devserver.recorder")

TIME_BASE = Fraction(1, 1_000_000)  # capture_us
OPUS_RATE = 48_000
SEQ_MOD = 2**32


@dataclass
class RecorderStats:
    """What one recorder saw. ``video_frames``/``keyframes``/``audio_packets`` count what was
    written to the file."""

    video_frames: int = 0
    keyframes: int = 0
    audio_packets: int = 0
    dropped_before_keyframe: int = 0  # video and audio before the first keyframe
    dropped_out_of_order: int = 0  # timestamp not after the previous one of its stream
    seq_gaps: int = 0  # gaps in seq, per stream (section 6.1: frames were dropped)
    frames_lost: int = 0  # frames missing in those gaps
    refused_after_close: int = 0
    mux_errors: int = 0


class SessionRecorder:
    """One session's uplink into the MPEG-TS file ``path`` (its directory is created).

    ``fps`` is the nominal video rate, written as the stream's average rate (timestamps come
    from ``capture_us``). :meth:`add` never raises for a bad frame: it counts it in
    :attr:`stats`. :meth:`close` is idempotent; :meth:`add` after it is refused (counted).
    """

    def __init__(self, path: Path, fps: int = 25) -> None:
        self.path = Path(path)
        self.fps = fps
        self.stats = RecorderStats()
        self._container: OutputContainer | None = None
        self._video: AvStream | None = None
        self._audio: AudioStream | None = None
        self._base_us: int | None = None
        self._last_pts: dict[Stream, int] = {}
        self._last_seq: dict[Stream, int] = {}
        self._closed = False
        self.width = 0
        self.height = 0

    @property
    def started(self) -> bool:
        """The file exists: a keyframe arrived."""
        return self._container is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def duration_us(self) -> int:
        """From the first recorded frame to the last one (either stream)."""
        return max(self._last_pts.values(), default=0)

    def add(self, frame: MediaFrame) -> bool:
        """Mux one frame as received; True if it was written to the file."""
        if self._closed:
            self.stats.refused_after_close += 1
            return False
        self._count_gap(frame)
        if self._container is None:
            if frame.stream != Stream.VIDEO or not frame.keyframe:
                self.stats.dropped_before_keyframe += 1
                return False
            self._open(frame)
        pts = frame.capture_us - (self._base_us or 0)
        last = self._last_pts.get(frame.stream)
        if pts < 0 or (last is not None and pts <= last):
            self.stats.dropped_out_of_order += 1
            return False
        stream = self._video if frame.stream == Stream.VIDEO else self._audio
        assert self._container is not None and stream is not None
        packet = av.Packet(frame.payload)
        packet.stream = stream
        packet.time_base = TIME_BASE
        packet.pts = packet.dts = pts
        packet.is_keyframe = frame.keyframe or frame.stream == Stream.AUDIO
        try:
            self._container.mux_one(packet)
        except (av.error.FFmpegError, ValueError) as exc:
            self.stats.mux_errors += 1
            log.warning("%s: cannot mux a %s frame (seq %d): %s", self.path, frame.stream.name,
                        frame.seq, exc)
            return False
        self._last_pts[frame.stream] = pts
        if frame.stream == Stream.VIDEO:
            self.stats.video_frames += 1
            self.stats.keyframes += frame.keyframe
        else:
            self.stats.audio_packets += 1
        return True

    def close(self) -> None:
        """Write the trailer and close the file (if one was started). Idempotent."""
        if self._closed:
            return
        self._closed = True
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except av.error.FFmpegError as exc:
                log.warning("%s: closing the recording failed: %s", self.path, exc)

    def __enter__(self) -> SessionRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _count_gap(self, frame: MediaFrame) -> None:
        last = self._last_seq.get(frame.stream)
        self._last_seq[frame.stream] = frame.seq
        if last is None:
            return
        missing = (frame.seq - last - 1) % SEQ_MOD
        if 0 < missing < SEQ_MOD // 2:  # a large jump backwards is a reordering, not a gap
            self.stats.seq_gaps += 1
            self.stats.frames_lost += missing

    def _open(self, keyframe: MediaFrame) -> None:
        self.width, self.height = _picture_size(keyframe.payload)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        container = av.open(str(self.path), mode="w", format="mpegts")
        try:
            video = container.add_mux_stream("h264", rate=self.fps, width=self.width,
                                             height=self.height)
            video.time_base = TIME_BASE
            audio = container.add_stream("libopus", rate=OPUS_RATE, layout="mono")
            audio.time_base = TIME_BASE
        except BaseException:
            container.close()
            raise
        self._container, self._video, self._audio = container, video, audio
        self._base_us = keyframe.capture_us
        log.info("recording %s (%dx%d)", self.path, self.width, self.height)


def _picture_size(access_unit: bytes) -> tuple[int, int]:
    """Width and height of an IDR access unit (Annex B, SPS/PPS in it), by decoding it once;
    (0, 0) if it does not decode (MPEG-TS does not need the size)."""
    decoder = CodecContext.create("h264", "r")
    assert isinstance(decoder, VideoCodecContext)
    with contextlib.suppress(av.error.FFmpegError, ValueError):
        for packet in (av.Packet(access_unit), None):
            for frame in decoder.decode(packet):
                return frame.width, frame.height
    return decoder.width, decoder.height
