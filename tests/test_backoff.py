"""The reconnect policy: full jitter on every attempt, capped, retry-after as a floor."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from tabletd.link.backoff import Backoff


@given(seed=st.integers(0, 2**32), base=st.floats(0.01, 5), cap=st.floats(5, 120),
       attempts=st.integers(1, 80))
def test_delays_are_jittered_within_the_exponential_ceiling(seed: int, base: float, cap: float,
                                                             attempts: int) -> None:
    b = Backoff(base, cap, random.Random(seed))
    for n in range(attempts):
        d = b.next_delay()
        assert 0 <= d <= min(cap, base * 2**n)


def test_every_attempt_is_random_not_only_the_first() -> None:
    b = Backoff(1, 60, random.Random(1))
    delays = [b.next_delay() for _ in range(12)]
    # with full jitter, late attempts are spread over [0, cap], not pinned at the cap
    late = delays[6:]
    assert len(set(late)) == len(late) and min(late) < 30


def test_fleet_does_not_come_back_in_a_wave() -> None:
    """500 clients that lost the server at once: their next attempts spread out."""
    fleet = [Backoff(1, 60, random.Random(i)) for i in range(500)]
    for b in fleet:
        for _ in range(5):
            b.next_delay()
    sixth = sorted(b.next_delay() for b in fleet)  # ceiling 32 s
    per_second = [sum(1 for d in sixth if s <= d < s + 1) for s in range(32)]
    mean = 500 / 32
    assert max(per_second) <= 3 * mean


def test_retry_after_comes_first_with_the_jitter_on_top_and_reset_restarts() -> None:
    b = Backoff(1, 60, random.Random(3))
    assert 30 <= b.next_delay(retry_after_s=30) <= 31
    # a fleet told the same retry_after does not come back in lockstep
    fleet = [Backoff(1, 60, random.Random(i)).next_delay(retry_after_s=30) for i in range(500)]
    per_100ms = [sum(1 for d in fleet if 30 + s / 10 <= d < 30 + (s + 1) / 10) for s in range(10)]
    assert max(per_100ms) <= 2 * 500 / 10
    for _ in range(10):
        b.next_delay()
    b.reset()
    assert b.next_delay() <= 1
