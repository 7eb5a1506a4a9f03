"""Clocks.

Every deadline in tabletd is on CLOCK_BOOTTIME (BRIEF invariant 2): it counts through
suspend and is never moved by NTP or a wrong date. The sans-I/O core never reads a clock;
the I/O shell passes ``now`` in, read from a :class:`Clock`.
"""

from __future__ import annotations

import time
from typing import Protocol

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000


class Clock(Protocol):
    """Where the I/O shell reads ``now``."""

    def boot_ns(self) -> int:
        """Nanoseconds on CLOCK_BOOTTIME (or a fake of it)."""
        ...


class BootClock:
    """The real CLOCK_BOOTTIME."""

    def boot_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    """The kernel's boot id: it changes on every boot, so persisted deadlines die with a reboot."""
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return f.read().strip()
