"""REFERENCE SERVER — development and tests only, never installed on a tablet.

One session's media as the reference server sees it (:class:`SessionMedia`): its live window
on the server, its recording (:class:`~.recorder.SessionRecorder`), its counters, and the
state of its synthetic downlink. The server (:mod:`.server`) owns the instances and calls
them on the event loop; nothing here reads a clock (times are passed in, server monotonic
nanoseconds).

The live window opens when the server sends ``start`` or the tablet reports
``call_started`` (whichever comes first) and closes at ``call_ended`` or at the server's
deadline: the booking's start (``started_ms`` in the store) + its duration +
:data:`DEADLINE_TOLERANCE_NS`. Frames are recorded only inside it. Two independent checks of
"no media after the deadline" are kept:

- arrival (``arrived_after_deadline``): a frame that reaches the server after start +
  duration + tolerance;
- capture (``captured_after_deadline``): a frame whose ``capture_us * 1000 >= deadline_ns``,
  the tablet's own deadline from its ``call_started`` event (same clock: CLOCK_BOOTTIME).
  Frames that arrive before that event are checked when it arrives.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from tabletd.devserver.downlink import DownlinkStats
from tabletd.devserver.recorder import RecorderStats, SessionRecorder
from tabletd.media.frames import MediaFrame

DEADLINE_TOLERANCE_NS = 50_000_000  # network and scheduling slack after start + duration
MAX_UNCHECKED = 100_000  # capture times held until the tablet's deadline is known


@dataclass(eq=False)
class SessionMedia:
    """Counters and recording of one session (kept after it ends, for inspection)."""

    session_id: str
    device_id: str
    recording: Path | None  # None: the session id cannot be a file name
    live_from_ns: int
    deadline_mono_ns: int  # the server's deadline (start + duration), monotonic
    recorder: SessionRecorder | None = None
    ended_ns: int | None = None
    end_reason: str | None = None
    tablet_started_ns: int | None = None  # from call_started (tablet CLOCK_BOOTTIME)
    tablet_deadline_ns: int | None = None
    frames_received: int = 0  # valid frames attributed to this session, whenever they came
    frames_recorded: int = 0
    arrived_after_deadline: int = 0  # arrival > deadline_mono_ns + tolerance
    arrived_after_end: int = 0  # arrival after the window closed (call_ended or deadline)
    captured_after_deadline: int = 0  # capture_us * 1000 >= tablet_deadline_ns
    downlink: DownlinkStats = field(default_factory=DownlinkStats)
    downlink_task: asyncio.Task[None] | None = None
    downlink_conn: object | None = None  # the connection the downlink runs on
    _unchecked: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.recording is not None and self.recorder is None:
            self.recorder = SessionRecorder(self.recording)

    @property
    def live(self) -> bool:
        return self.ended_ns is None

    @property
    def recorder_stats(self) -> RecorderStats:
        return self.recorder.stats if self.recorder is not None else RecorderStats()

    def past_deadline(self, now_ns: int) -> bool:
        return now_ns > self.deadline_mono_ns + DEADLINE_TOLERANCE_NS

    def set_tablet_times(self, started_ns: int | None, deadline_ns: int | None) -> None:
        """The tablet's ``call_started`` fields; checks the frames that came before it."""
        self.tablet_started_ns = started_ns
        if deadline_ns is None or self.tablet_deadline_ns is not None:
            return
        self.tablet_deadline_ns = deadline_ns
        self.captured_after_deadline += sum(1 for us in self._unchecked
                                            if us * 1000 >= deadline_ns)
        self._unchecked.clear()

    def on_frame(self, frame: MediaFrame, now_ns: int) -> bool:
        """Count one valid frame that arrived at ``now_ns``; record it if the window is open.
        True if it was recorded."""
        self.frames_received += 1
        if self.tablet_deadline_ns is not None:
            self.captured_after_deadline += frame.capture_us * 1000 >= self.tablet_deadline_ns
        elif len(self._unchecked) < MAX_UNCHECKED:
            self._unchecked.append(frame.capture_us)
        if self.past_deadline(now_ns):
            self.arrived_after_deadline += 1
        if not self.live:
            self.arrived_after_end += 1
            return False
        if self.recorder is None or not self.recorder.add(frame):
            return False
        self.frames_recorded += 1
        return True

    def end(self, now_ns: int, reason: str) -> None:
        """Close the window and the recording, stop the downlink. Idempotent."""
        if self.ended_ns is None:
            self.ended_ns = now_ns
            self.end_reason = reason
        if self.recorder is not None:
            self.recorder.close()
        if self.downlink_task is not None:
            self.downlink_task.cancel()
