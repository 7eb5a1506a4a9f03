"""Reconnect policy, pure and injectable (``docs/protocol.md`` section 1).

Full jitter on *every* attempt: ``uniform(0, min(cap, base * 2**attempt))``, so a fleet that
lost its server at the same instant does not come back in waves. A server-given
``retry_after`` is waited first, and the jittered delay on top: the whole fleet hears the same
``retry_after``, and a plain floor (``max``) would bring it back in one lockstep wave.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base_s: float = 1.0
    cap_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random)  # jitter, not secrets
    attempt: int = 0

    def next_delay(self, retry_after_s: float | None = None) -> float:
        """The delay before the next attempt; counts the attempt."""
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.attempt, 62))
        self.attempt += 1
        delay = self.rng.uniform(0, ceiling)
        if retry_after_s is not None:
            delay += retry_after_s
        return delay

    def reset(self) -> None:
        """After a connection that got as far as ``welcome``."""
        self.attempt = 0
