"""The uplink buffer (``docs/protocol.md`` section 6.3, BRIEF invariant 7).

First, one example per rule of the policy. Then a hypothesis state machine that pushes,
pops, moves the deadline and clears at random, and checks the invariants after every step:
the byte bound, the age bound, the deadline, push order, and that video stays decodable (a
non-key video frame is only ever popped right after its predecessor).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tabletd.media.frames import HEADER_SIZE, MediaFrame, Stream
from tabletd.media.uplink import DEFAULT_MAX_AGE_US, UplinkQueue, UplinkStats

MS = 1_000  # microseconds


class Feed:
    """Makes frames the way the encoders do: seq +1 per frame and stream."""

    def __init__(self) -> None:
        self.seq = {Stream.VIDEO: 0, Stream.AUDIO: 0}

    def video(self, capture_us: int, *, key: bool = False, size: int = 100) -> MediaFrame:
        return self._make(Stream.VIDEO, key, capture_us, size)

    def audio(self, capture_us: int, *, size: int = 100) -> MediaFrame:
        return self._make(Stream.AUDIO, False, capture_us, size)

    def _make(self, stream: Stream, key: bool, capture_us: int, size: int) -> MediaFrame:
        seq = self.seq[stream]
        self.seq[stream] += 1
        return MediaFrame(stream, key, seq, capture_us, b"\x00" * (size - HEADER_SIZE))


def drain(queue: UplinkQueue) -> list[tuple[str, int]]:
    """Pop everything; name each frame: V/K/A and its seq."""
    out: list[tuple[str, int]] = []
    while (frame := queue.pop()) is not None:
        kind = "A" if frame.stream == Stream.AUDIO else "K" if frame.keyframe else "V"
        out.append((kind, frame.seq))
    return out


def push_all(queue: UplinkQueue, frames: list[MediaFrame], now_us: int | None = None) -> None:
    for frame in frames:
        queue.push(frame, frame.capture_us if now_us is None else now_us)


# ---- the plain path -----------------------------------------------------------------------


def test_empty_queue_pops_none() -> None:
    queue = UplinkQueue(1000)
    assert queue.pop() is None
    assert queue.queued_bytes == 0
    assert len(queue) == 0
    assert not queue.want_keyframe


def test_frames_come_out_in_push_order_across_streams() -> None:
    feed, queue = Feed(), UplinkQueue(10_000)
    push_all(queue, [feed.video(0, key=True), feed.audio(1), feed.audio(2), feed.video(3),
                     feed.audio(4), feed.video(5)])
    assert queue.queued_bytes == 600
    assert len(queue) == 6
    assert drain(queue) == [("K", 0), ("A", 0), ("A", 1), ("V", 1), ("A", 2), ("V", 2)]
    assert queue.dropped_frames == 0
    assert queue.queued_bytes == 0


def test_bytes_are_counted_on_the_wire_header_included() -> None:
    queue = UplinkQueue(1000)
    queue.push(MediaFrame(Stream.AUDIO, False, 0, 0, b"x"), 0)
    assert queue.queued_bytes == HEADER_SIZE + 1


def test_a_frame_that_exactly_fills_the_bound_is_kept() -> None:
    feed, queue = Feed(), UplinkQueue(300)
    push_all(queue, [feed.video(0, key=True), feed.video(1), feed.video(2)])
    assert queue.queued_bytes == 300
    assert queue.dropped_frames == 0


@pytest.mark.parametrize(("max_bytes", "max_age_us"), [(0, 1), (HEADER_SIZE, 1), (100, -1)])
def test_bounds_out_of_range(max_bytes: int, max_age_us: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        UplinkQueue(max_bytes, max_age_us)


def test_defaults() -> None:
    queue = UplinkQueue(1000)
    assert queue.max_age_us == DEFAULT_MAX_AGE_US == 2_000_000
    assert queue.max_bytes == 1000
    assert queue.deadline_us is None


# ---- over the byte bound: video goes a group of pictures at a time -----------------------------


def test_overflow_drops_video_up_to_the_next_keyframe() -> None:
    feed, queue = Feed(), UplinkQueue(600)
    push_all(queue, [feed.video(0, key=True), feed.video(1), feed.video(2),
                     feed.video(3, key=True), feed.video(4), feed.audio(5)])
    assert queue.queued_bytes == 600
    queue.push(feed.audio(6), 6)  # 100 bytes more than the bound
    assert queue.want_keyframe
    assert queue.awaiting_keyframe
    # Until a keyframe arrives, new non-key video is dropped: it follows frames now gone.
    queue.push(feed.video(7), 7)
    queue.push(feed.audio(8), 8)
    assert queue.stats.dropped_no_keyframe == 1
    assert drain(queue) == [("K", 3), ("V", 4), ("A", 0), ("A", 1), ("A", 2)]
    assert queue.stats.dropped_overflow == 3
    assert queue.stats.dropped_video == 4
    assert queue.stats.dropped_audio == 0


def test_overflow_drops_the_oldest_keyframe_too_and_all_video_without_another() -> None:
    feed, queue = Feed(), UplinkQueue(400)
    push_all(queue, [feed.video(0, key=True), feed.audio(1), feed.video(2), feed.video(3)])
    queue.push(feed.audio(4), 4)
    assert drain(queue) == [("A", 0), ("A", 1)]
    assert queue.stats.dropped_video == 3
    assert queue.want_keyframe


def test_overflow_repeats_group_by_group_until_the_frame_fits() -> None:
    feed, queue = Feed(), UplinkQueue(500)
    push_all(queue, [feed.video(0, key=True), feed.video(1), feed.video(2, key=True),
                     feed.video(3, key=True), feed.video(4)])
    queue.push(feed.video(5, key=True, size=300), 5)
    # K0 V1 went (still 100 over), then K2 went; K3 V4 and the new keyframe fit.
    assert drain(queue) == [("K", 3), ("V", 4), ("K", 5)]
    # The new keyframe bridges the gap: nothing to ask of the encoder.
    assert not queue.want_keyframe
    assert not queue.awaiting_keyframe


def test_a_non_key_video_frame_that_caused_a_drop_is_dropped_itself() -> None:
    feed, queue = Feed(), UplinkQueue(300)
    push_all(queue, [feed.video(0, key=True), feed.video(1), feed.video(2)])
    queue.push(feed.video(3), 3)
    assert drain(queue) == []
    assert queue.stats.dropped_overflow == 3
    assert queue.stats.dropped_no_keyframe == 1


def test_audio_goes_only_when_video_is_not_enough() -> None:
    feed, queue = Feed(), UplinkQueue(500)
    push_all(queue, [feed.audio(0), feed.audio(1), feed.video(2, key=True), feed.audio(3),
                     feed.audio(4)])
    queue.push(feed.audio(5, size=300), 5)
    # The video went first (100 bytes); then the two oldest audio packets (200 bytes).
    assert drain(queue) == [("A", 2), ("A", 3), ("A", 4)]
    assert queue.stats.dropped_audio == 2
    assert queue.stats.dropped_video == 1


def test_audio_alone_drops_oldest_first() -> None:
    feed, queue = Feed(), UplinkQueue(300)
    push_all(queue, [feed.audio(t) for t in range(5)])
    assert drain(queue) == [("A", 2), ("A", 3), ("A", 4)]
    assert not queue.want_keyframe  # no video was lost


def test_a_frame_larger_than_the_bound_is_dropped_and_nothing_else() -> None:
    feed, queue = Feed(), UplinkQueue(300)
    push_all(queue, [feed.video(0, key=True), feed.audio(1)])
    queue.push(feed.video(2, key=True, size=301), 2)
    queue.push(feed.audio(3, size=400), 3)
    assert queue.stats.dropped_oversize == 2
    assert queue.want_keyframe  # a keyframe was lost: ask for another
    assert drain(queue) == [("K", 0), ("A", 0)]


# ---- the age bound ------------------------------------------------------------------------


def test_stale_video_goes_a_group_at_a_time() -> None:
    feed, queue = Feed(), UplinkQueue(100_000, max_age_us=1000 * MS)
    push_all(queue, [feed.video(0, key=True), feed.video(400 * MS), feed.video(800 * MS, key=True),
                     feed.video(900 * MS)])
    assert len(queue) == 4
    queue.push(feed.audio(1500 * MS), 1500 * MS)  # K0 is 1.5 s old now
    assert queue.stats.dropped_stale == 2
    assert queue.want_keyframe
    assert drain(queue) == [("K", 2), ("V", 3), ("A", 0)]


def test_age_exactly_at_the_bound_is_kept() -> None:
    feed, queue = Feed(), UplinkQueue(100_000, max_age_us=1000 * MS)
    queue.push(feed.video(0, key=True), 0)
    queue.push(feed.audio(1000 * MS), 1000 * MS)
    assert len(queue) == 2
    queue.push(feed.audio(1000 * MS + 1), 1000 * MS + 1)
    assert drain(queue) == [("A", 0), ("A", 1)]


def test_stale_audio_goes_without_taking_fresh_video_with_it() -> None:
    feed, queue = Feed(), UplinkQueue(100_000, max_age_us=1000 * MS)
    push_all(queue, [feed.audio(0), feed.audio(500 * MS), feed.video(900 * MS, key=True)])
    queue.push(feed.video(1200 * MS), 1200 * MS)
    assert drain(queue) == [("A", 1), ("K", 0), ("V", 1)]
    assert not queue.want_keyframe


def test_a_frame_already_too_old_is_dropped_on_arrival() -> None:
    feed, queue = Feed(), UplinkQueue(100_000, max_age_us=1000 * MS)
    queue.push(feed.video(0, key=True), 1001 * MS)
    queue.push(feed.audio(0), 1001 * MS)
    assert queue.stats.dropped_stale == 2
    assert queue.want_keyframe
    assert drain(queue) == []


def test_never_more_than_two_seconds_on_a_stalled_link() -> None:
    # 25 fps video, a keyframe every second, 50 packets/s of audio; nothing is ever popped.
    feed, queue = Feed(), UplinkQueue(10_000_000)
    for t in range(0, 10_000 * MS, 20 * MS):
        queue.push(feed.audio(t), t)
        if t % (40 * MS) == 0:
            queue.push(feed.video(t, key=t % (1000 * MS) == 0), t)
            if queue.want_keyframe:
                queue.keyframe_requested()
    popped = []
    while (frame := queue.pop()) is not None:
        popped.append(frame)
    last = 10_000 * MS - 20 * MS
    assert all(last - f.capture_us <= 2_000 * MS for f in popped)
    assert popped[0].stream == Stream.AUDIO or popped[0].keyframe
    first_video = next(f for f in popped if f.stream == Stream.VIDEO)
    assert first_video.keyframe


# ---- the deadline (BRIEF invariant 7) --------------------------------------------------------


def test_frames_at_or_after_the_deadline_are_never_queued() -> None:
    feed, queue = Feed(), UplinkQueue(10_000)
    queue.set_deadline(1000)
    assert queue.deadline_us == 1000
    push_all(queue, [feed.video(998, key=True), feed.audio(999), feed.video(1000),
                     feed.audio(1000), feed.audio(5000)])
    assert queue.stats.dropped_deadline == 3
    assert drain(queue) == [("K", 0), ("A", 0)]


def test_setting_the_deadline_removes_queued_frames_from_it_on() -> None:
    feed, queue = Feed(), UplinkQueue(10_000)
    push_all(queue, [feed.video(0, key=True), feed.audio(10), feed.video(20), feed.audio(30),
                     feed.video(40)], now_us=40)
    queue.set_deadline(20)
    assert queue.queued_bytes == 200
    assert queue.stats.dropped_deadline == 3
    assert drain(queue) == [("K", 0), ("A", 0)]


def test_a_deadline_of_none_lifts_it() -> None:
    feed, queue = Feed(), UplinkQueue(10_000)
    queue.set_deadline(10)
    queue.push(feed.audio(20), 20)
    queue.set_deadline(None)
    queue.push(feed.audio(30), 30)
    assert drain(queue) == [("A", 1)]


def test_clear_at_the_cut_drops_everything() -> None:
    feed, queue = Feed(), UplinkQueue(10_000)
    push_all(queue, [feed.video(0, key=True), feed.audio(1), feed.video(2)])
    queue.clear()
    assert queue.pop() is None
    assert queue.queued_bytes == 0
    assert queue.stats.dropped_cleared == 3
    assert queue.dropped_frames == 3
    # Video was lost: the next stream must start at a keyframe.
    assert queue.awaiting_keyframe
    queue.push(feed.video(3), 3)
    queue.push(feed.video(4, key=True), 4)
    assert drain(queue) == [("K", 3)]


def test_a_frame_captured_before_its_predecessor_is_dropped() -> None:
    feed, queue = Feed(), UplinkQueue(10_000)
    push_all(queue, [feed.video(500, key=True), feed.audio(500)], now_us=500)
    queue.push(feed.audio(499), 500)
    assert not queue.want_keyframe
    queue.push(feed.video(499), 500)  # a gap in the video: await a keyframe
    assert queue.want_keyframe
    queue.push(feed.video(500), 500)  # same time as its predecessor's: fine, but no keyframe
    assert queue.stats.dropped_out_of_order == 2
    assert drain(queue) == [("K", 0), ("A", 0)]
    # clear() starts the order check afresh.
    queue.clear()
    queue.push(feed.audio(10), 10)
    assert drain(queue) == [("A", 2)]


# ---- the keyframe request -----------------------------------------------------------------


def test_keyframe_requested_lowers_the_flag_but_video_still_waits() -> None:
    feed, queue = Feed(), UplinkQueue(200)
    push_all(queue, [feed.video(0, key=True), feed.video(1), feed.video(2)])
    assert queue.want_keyframe
    assert queue.stats.keyframe_requests == 1
    queue.keyframe_requested()
    assert not queue.want_keyframe
    queue.push(feed.video(3), 3)  # dropped, no second request: one is on its way
    assert not queue.want_keyframe
    assert queue.awaiting_keyframe
    queue.push(feed.video(4, key=True), 4)
    assert not queue.awaiting_keyframe
    queue.push(feed.video(5), 5)
    assert drain(queue) == [("K", 4), ("V", 5)]
    assert queue.stats.keyframe_requests == 1


def test_losing_the_awaited_keyframe_asks_again() -> None:
    feed, queue = Feed(), UplinkQueue(250)
    push_all(queue, [feed.video(0, key=True), feed.video(1), feed.video(2)])
    queue.keyframe_requested()
    queue.push(feed.video(3, key=True, size=251), 3)  # the keyframe asked for: too big
    assert queue.want_keyframe
    assert queue.stats.keyframe_requests == 2


def test_stats_add_up() -> None:
    feed, queue = Feed(), UplinkQueue(300)
    push_all(queue, [feed.video(0, key=True), feed.video(1), feed.audio(2), feed.audio(3)])
    assert queue.pop() is not None
    queue.set_deadline(50)
    queue.push(feed.audio(60), 60)
    stats = queue.stats
    assert stats == UplinkStats(
        queued_frames=1, queued_bytes=100, pushed_frames=5, popped_frames=1, popped_bytes=100,
        dropped_frames=3, dropped_bytes=300, dropped_video=2, dropped_audio=1,
        dropped_overflow=2, dropped_stale=0, dropped_deadline=1, dropped_no_keyframe=0,
        dropped_oversize=0, dropped_out_of_order=0, dropped_cleared=0,
        keyframe_requests=1)


# ---- properties -----------------------------------------------------------------------------


class UplinkMachine(RuleBasedStateMachine):
    """Random pushes, pops, deadlines and cuts; the invariants hold after every step."""

    @initialize(max_bytes=st.integers(HEADER_SIZE + 1, 3000),
                max_age_us=st.sampled_from([0, 50 * MS, 500 * MS, 2000 * MS]))
    def start(self, max_bytes: int, max_age_us: int) -> None:
        self.queue = UplinkQueue(max_bytes, max_age_us)
        self.now = 10_000_000
        self.seq = {Stream.VIDEO: 0, Stream.AUDIO: 0}
        self.push_index: dict[tuple[Stream, int], int] = {}
        self.last_popped_index = -1
        self.last_popped_video_seq = -1
        self.last_push_now: int | None = None
        self.deadline: int | None = None

    def _push(self, stream: Stream, key: bool, size: int, dt: int, lag: int) -> None:
        self.now += dt
        capture = self.now - lag  # may go backwards: such a frame is dropped
        frame = MediaFrame(stream, key, self.seq[stream], capture, b"\x00" * size)
        self.push_index[(stream, frame.seq)] = len(self.push_index)
        self.seq[stream] += 1
        before = self.queue.stats.pushed_frames
        self.queue.push(frame, self.now)
        self.last_push_now = self.now
        assert self.queue.stats.pushed_frames == before + 1
        if self.queue.want_keyframe and key is False and size % 3 == 0:
            self.queue.keyframe_requested()  # sometimes the caller is slow to ask

    @rule(key=st.booleans(), size=st.integers(1, 1500), dt=st.integers(0, 300 * MS),
          lag=st.integers(0, 100 * MS) | st.just(3000 * MS))
    def push_video(self, key: bool, size: int, dt: int, lag: int) -> None:
        self._push(Stream.VIDEO, key, size, dt, lag)

    @rule(size=st.integers(1, 300), dt=st.integers(0, 300 * MS), lag=st.integers(0, 100 * MS))
    def push_audio(self, size: int, dt: int, lag: int) -> None:
        self._push(Stream.AUDIO, False, size, dt, lag)

    @rule(count=st.integers(1, 5))
    def pop(self, count: int) -> None:
        for _ in range(count):
            frame = self.queue.pop()
            if frame is None:
                assert self.queue.queued_bytes == 0
                assert len(self.queue) == 0
                return
            # Push order is kept.
            index = self.push_index[(frame.stream, frame.seq)]
            assert index > self.last_popped_index
            self.last_popped_index = index
            # Invariant 7: nothing captured at or after the deadline ever leaves.
            if self.deadline is not None:
                assert frame.capture_us < self.deadline
            # Never more than max_age_us of media, at the last push's time.
            assert self.last_push_now is not None
            assert self.last_push_now - frame.capture_us <= self.queue.max_age_us
            # Video stays decodable: after any gap, the first video frame out is a keyframe.
            if frame.stream == Stream.VIDEO:
                if not frame.keyframe:
                    assert frame.seq == self.last_popped_video_seq + 1
                self.last_popped_video_seq = frame.seq

    @rule(offset=st.integers(-500 * MS, 1000 * MS) | st.none())
    def set_deadline(self, offset: int | None) -> None:
        self.deadline = None if offset is None else self.now + offset
        self.queue.set_deadline(self.deadline)

    @precondition(lambda self: self.queue.want_keyframe)
    @rule()
    def keyframe_requested(self) -> None:
        self.queue.keyframe_requested()
        assert not self.queue.want_keyframe

    @rule()
    def cut(self) -> None:
        self.queue.clear()
        assert self.queue.queued_bytes == 0
        assert self.queue.pop() is None

    @invariant()
    def bounded_in_bytes(self) -> None:
        assert 0 <= self.queue.queued_bytes <= self.queue.max_bytes

    @invariant()
    def counters_add_up(self) -> None:
        stats = self.queue.stats
        assert stats.pushed_frames == stats.popped_frames + stats.dropped_frames \
            + stats.queued_frames
        assert stats.dropped_frames == stats.dropped_video + stats.dropped_audio == sum([
            stats.dropped_overflow, stats.dropped_stale, stats.dropped_deadline,
            stats.dropped_no_keyframe, stats.dropped_oversize, stats.dropped_out_of_order,
            stats.dropped_cleared])
        assert stats.queued_bytes == self.queue.queued_bytes

    @invariant()
    def awaiting_after_lost_video(self) -> None:
        # want_keyframe only ever stands while non-key video is being held back.
        if self.queue.want_keyframe:
            assert self.queue.awaiting_keyframe


UplinkMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50,
                                           deadline=None)
TestUplinkMachine = UplinkMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(Stream), st.booleans(), st.integers(1, 200)),
                max_size=100))
def test_a_fast_link_loses_nothing(frames: list[tuple[Stream, bool, int]]) -> None:
    # Popped as soon as pushed, within the bounds, before any deadline: nothing is dropped.
    queue = UplinkQueue(HEADER_SIZE + 200)
    queue.set_deadline(10**9)
    for t, (stream, key, size) in enumerate(frames):
        frame = MediaFrame(stream, key, t, t * 20 * MS, b"\x01" * size)
        queue.push(frame, t * 20 * MS)
        assert queue.pop() is frame
    assert queue.dropped_frames == 0
    assert not queue.want_keyframe
