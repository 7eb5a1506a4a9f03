"""The tablet's uplink buffer (``docs/protocol.md`` section 6.3): bounded, sans-I/O.

Theory of operation
-------------------
The encoders :meth:`~UplinkQueue.push` each frame with the boot-clock time ``now_us``; the
sender :meth:`~UplinkQueue.pop`\\ s the oldest one whenever the link can take one more. The
queue reads no clock and does no I/O: time comes in with every push. It holds frames in
memory only, and only until they are popped or dropped (BRIEF invariant 7).

Three bounds hold after every call:

- **bytes**: ``queued_bytes`` (frames counted at their size on the wire, header included)
  never exceeds ``max_bytes``;
- **age**: no queued frame is older than ``max_age_us`` at the ``now_us`` of the last push
  (section 6.3: "never more than 2 s of media");
- **deadline**: no queued frame was captured at or after the call's deadline, once
  :meth:`~UplinkQueue.set_deadline` has given it (BRIEF invariant 7, section 6.3).

When the link is slow, the bounds are kept by dropping, cheapest loss first:

1. Video goes first, a group of pictures at a time: the queued video frames up to (not
   including) the next queued keyframe after the oldest one, or all the queued video if
   there is none. This repeats while the oldest queued video frame is too old, or while the
   new frame does not fit in ``max_bytes``.
2. Audio goes oldest-first: the frames that are too old, then as many as the new frame
   still needs room for after step 1.
3. A new frame that cannot be held at all (captured at or after the deadline, already too
   old, or alone larger than ``max_bytes``) is dropped.

A dropped video frame leaves a gap that the server's decoder cannot cross, whatever the
reason it was dropped. So from then on the queue *awaits a keyframe*: it drops every new
non-key video frame until a keyframe is queued, and it raises :attr:`~UplinkQueue.want_keyframe`.
The caller then asks its encoder for a keyframe and calls
:meth:`~UplinkQueue.keyframe_requested`. The server sees a ``seq`` gap followed by a keyframe
(section 6.3); every non-key video frame popped follows the previous video frame popped
directly. Audio packets stand alone and never wait.

The caller assigns ``seq`` (the encoder side, +1 per frame produced), so drops show up as
gaps by themselves. A frame whose ``capture_us`` is earlier than the previous one pushed on
its stream is dropped too: the server takes its timestamps from ``capture_us`` (section 6.2)
and the age bound relies on each stream's oldest frame being at its head.

At the cut the caller calls :meth:`~UplinkQueue.clear`: everything queued is dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Final, Literal, TypeAlias

from tabletd.media.frames import HEADER_SIZE, MediaFrame, Stream

#: Section 6.3: the tablet never holds more than 2 s of media.
DEFAULT_MAX_AGE_US: Final = 2_000_000

#: Why a frame was dropped: ``overflow`` to keep ``max_bytes``; ``stale`` older than
#: ``max_age_us``; ``deadline`` captured at or after the deadline; ``no_keyframe`` a non-key
#: video frame while awaiting a keyframe; ``oversize`` alone larger than ``max_bytes``;
#: ``out_of_order`` captured before the previous frame of its stream; ``cleared`` by
#: :meth:`UplinkQueue.clear`.
DropReason: TypeAlias = Literal[
    "overflow", "stale", "deadline", "no_keyframe", "oversize", "out_of_order", "cleared"]

# (push order, frame, wire size)
_Entry: TypeAlias = tuple[int, MediaFrame, int]


@dataclass(frozen=True)
class UplinkStats:
    """A snapshot of an :class:`UplinkQueue`'s counters, all since it was created.

    ``pushed_frames == popped_frames + dropped_frames + queued_frames`` always.
    ``dropped_frames`` is split by stream (``dropped_video``, ``dropped_audio``) and by
    reason (the ``dropped_<reason>`` fields, see :data:`DropReason`). ``keyframe_requests``
    counts the times :attr:`UplinkQueue.want_keyframe` went up.
    """

    queued_frames: int
    queued_bytes: int
    pushed_frames: int
    popped_frames: int
    popped_bytes: int
    dropped_frames: int
    dropped_bytes: int
    dropped_video: int
    dropped_audio: int
    dropped_overflow: int
    dropped_stale: int
    dropped_deadline: int
    dropped_no_keyframe: int
    dropped_oversize: int
    dropped_out_of_order: int
    dropped_cleared: int
    keyframe_requests: int


class UplinkQueue:
    """The tablet's bounded uplink buffer; see the module docstring for the policy.

    ``max_bytes`` bounds the frames held, counted at their wire size (header included); it
    must be at least ``HEADER_SIZE + 1``. ``max_age_us`` bounds their age at the last push.
    Raises :class:`ValueError` for bounds out of range.
    """

    def __init__(self, max_bytes: int, max_age_us: int = DEFAULT_MAX_AGE_US) -> None:
        if max_bytes <= HEADER_SIZE:
            raise ValueError(f"max_bytes must be more than {HEADER_SIZE}, got {max_bytes}")
        if max_age_us < 0:
            raise ValueError(f"max_age_us must be 0 or more, got {max_age_us}")
        self._max_bytes = max_bytes
        self._max_age_us = max_age_us
        # One deque per stream: video is dropped by groups of pictures, audio oldest-first,
        # and pop() merges them back in push order.
        self._video: deque[_Entry] = deque()
        self._audio: deque[_Entry] = deque()
        self._order = 0
        self._queued_bytes = 0
        self._deadline_us: int | None = None
        self._awaiting_keyframe = False
        self._want_keyframe = False
        self._last_capture_us: dict[Stream, int] = {}
        self._pushed = 0
        self._popped = 0
        self._popped_bytes = 0
        self._dropped_bytes = 0
        self._dropped_video = 0
        self._dropped_audio = 0
        self._keyframe_requests = 0
        self._dropped_by: dict[DropReason, int] = {
            "overflow": 0, "stale": 0, "deadline": 0, "no_keyframe": 0, "oversize": 0,
            "out_of_order": 0, "cleared": 0}

    # ---- the caller's verbs -----------------------------------------------------------

    def push(self, frame: MediaFrame, now_us: int) -> None:
        """Queue ``frame``, produced by an encoder, at boot-clock time ``now_us``.

        First drops what the bounds require (see the module docstring), possibly ``frame``
        itself. Afterwards check :attr:`want_keyframe`. Never raises for a frame's content:
        a frame captured before the previous frame pushed on its stream (since creation or
        :meth:`clear`) is dropped as ``out_of_order``.
        """
        self._pushed += 1
        # Age out first, whatever becomes of this frame: every push enforces the bound.
        self._expire(now_us)
        stream = frame.stream
        capture_us = frame.capture_us
        size = frame.wire_size
        video = stream == Stream.VIDEO
        last_us = self._last_capture_us.get(stream)
        if last_us is not None and capture_us < last_us:
            self._drop_new(frame, size, "out_of_order")
            return
        self._last_capture_us[stream] = capture_us
        # A frame captured at or after the deadline is never sent (BRIEF invariant 7).
        if self._deadline_us is not None and capture_us >= self._deadline_us:
            self._drop_new(frame, size, "deadline")
            return
        if now_us - capture_us > self._max_age_us:
            self._drop_new(frame, size, "stale")
            return
        if video and not frame.keyframe and self._awaiting_keyframe:
            self._drop_new(frame, size, "no_keyframe")
            return
        if size > self._max_bytes:
            self._drop_new(frame, size, "oversize")
            return
        limit = self._max_bytes - size
        while self._queued_bytes > limit and self._video:
            self._drop_video_group("overflow")
            if video and not frame.keyframe:
                # The group just dropped leaves a gap: this frame could not be decoded.
                self._drop_new(frame, size, "no_keyframe")
                return
        while self._queued_bytes > limit:
            self._drop_entry(self._audio.popleft(), "overflow")
        entry = (self._order, frame, size)
        self._order += 1
        self._queued_bytes += size
        if video:
            self._video.append(entry)
            if frame.keyframe:
                # Decoding can resume here: the gap is bridged, whether or not this is the
                # keyframe that was asked for.
                self._awaiting_keyframe = False
                self._want_keyframe = False
        else:
            self._audio.append(entry)

    def pop(self) -> MediaFrame | None:
        """Take the oldest queued frame (in push order), or ``None`` if none is queued.

        The caller encodes it and sends it. Call this only when the link can take the frame
        now: a frame popped is no longer counted, bounded, or removed at the deadline.
        """
        video, audio = self._video, self._audio
        if video and (not audio or video[0][0] < audio[0][0]):
            _, frame, size = video.popleft()
        elif audio:
            _, frame, size = audio.popleft()
        else:
            return None
        self._queued_bytes -= size
        self._popped += 1
        self._popped_bytes += size
        return frame

    def set_deadline(self, deadline_us: int | None) -> None:
        """Set the call's deadline on the boot clock, in microseconds; ``None`` for none.

        Frames captured at or after it are removed now and never queued later (BRIEF
        invariant 7). A later :meth:`set_deadline` replaces it.
        """
        self._deadline_us = deadline_us
        if deadline_us is None:
            return
        self._video = self._drop_from(self._video, deadline_us)
        self._audio = self._drop_from(self._audio, deadline_us)

    def clear(self) -> None:
        """Drop every queued frame: the caller calls this at the cut.

        The deadline stays; the capture-order check starts afresh.
        """
        for queue in (self._video, self._audio):
            while queue:
                self._drop_entry(queue.popleft(), "cleared")
        self._last_capture_us.clear()

    def keyframe_requested(self) -> None:
        """Say that the encoder was asked for a keyframe: lowers :attr:`want_keyframe`.

        Non-key video frames are still dropped until a keyframe is pushed.
        """
        self._want_keyframe = False

    # ---- what the caller reads ----------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def max_age_us(self) -> int:
        return self._max_age_us

    @property
    def deadline_us(self) -> int | None:
        """The deadline given by :meth:`set_deadline`, or ``None``."""
        return self._deadline_us

    @property
    def queued_bytes(self) -> int:
        """The wire size of the frames queued, headers included; at most ``max_bytes``."""
        return self._queued_bytes

    @property
    def dropped_frames(self) -> int:
        """How many frames pushed were dropped, for any reason, since creation."""
        return sum(self._dropped_by.values())

    @property
    def want_keyframe(self) -> bool:
        """True when the caller should ask its video encoder for a keyframe now.

        Raised when video was dropped and the queue has started awaiting a keyframe, and
        when a keyframe itself was dropped. Lowered by :meth:`keyframe_requested`, or when a
        keyframe is queued.
        """
        return self._want_keyframe

    @property
    def awaiting_keyframe(self) -> bool:
        """True while new non-key video frames are dropped, until a keyframe is queued."""
        return self._awaiting_keyframe

    @property
    def stats(self) -> UplinkStats:
        """A snapshot of the counters."""
        by = self._dropped_by
        return UplinkStats(
            queued_frames=len(self), queued_bytes=self._queued_bytes,
            pushed_frames=self._pushed, popped_frames=self._popped,
            popped_bytes=self._popped_bytes, dropped_frames=self.dropped_frames,
            dropped_bytes=self._dropped_bytes, dropped_video=self._dropped_video,
            dropped_audio=self._dropped_audio, dropped_overflow=by["overflow"],
            dropped_stale=by["stale"], dropped_deadline=by["deadline"],
            dropped_no_keyframe=by["no_keyframe"], dropped_oversize=by["oversize"],
            dropped_out_of_order=by["out_of_order"], dropped_cleared=by["cleared"],
            keyframe_requests=self._keyframe_requests)

    def __len__(self) -> int:
        """The number of frames queued."""
        return len(self._video) + len(self._audio)

    # ---- dropping -----------------------------------------------------------------------

    def _expire(self, now_us: int) -> None:
        # Section 6.3: never more than max_age_us of media. Capture times do not go backwards
        # within a stream, so each stream's oldest frame is at the head of its deque.
        oldest_us = now_us - self._max_age_us
        video, audio = self._video, self._audio
        while video and video[0][1].capture_us < oldest_us:
            self._drop_video_group("stale")
        while audio and audio[0][1].capture_us < oldest_us:
            self._drop_entry(audio.popleft(), "stale")

    def _drop_video_group(self, reason: DropReason) -> None:
        """Drop the queued video up to the next keyframe after the oldest, or all of it."""
        video = self._video
        count = len(video)
        # Start at the second frame: the oldest goes even if it is a keyframe itself.
        for index, (_, frame, _) in enumerate(islice(video, 1, None), start=1):
            if frame.keyframe:
                count = index
                break
        for _ in range(count):
            self._drop_entry(video.popleft(), reason)

    def _drop_from(self, queue: deque[_Entry], deadline_us: int) -> deque[_Entry]:
        if not any(entry[1].capture_us >= deadline_us for entry in queue):
            return queue
        kept: deque[_Entry] = deque()
        for entry in queue:
            if entry[1].capture_us >= deadline_us:
                self._drop_entry(entry, "deadline")
            else:
                kept.append(entry)
        return kept

    def _drop_entry(self, entry: _Entry, reason: DropReason) -> None:
        self._queued_bytes -= entry[2]
        self._drop_new(entry[1], entry[2], reason)

    def _drop_new(self, frame: MediaFrame, size: int, reason: DropReason) -> None:
        self._dropped_by[reason] += 1
        self._dropped_bytes += size
        if frame.stream != Stream.VIDEO:
            self._dropped_audio += 1
            return
        self._dropped_video += 1
        # The gap cannot be decoded across: await a keyframe, and ask for one if none is
        # known to be coming (a keyframe just dropped was maybe the one asked for).
        if not self._awaiting_keyframe or frame.keyframe:
            if not self._want_keyframe:
                self._keyframe_requests += 1
            self._awaiting_keyframe = True
            self._want_keyframe = True
