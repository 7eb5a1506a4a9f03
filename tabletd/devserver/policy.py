"""REFERENCE SERVER — development and tests only, never installed on a tablet.

The reference server's booking policy: how a booking becomes a grant window, and when the
grant and the ``start`` are due. Pure: every function takes ``now_ms`` (the server's clock,
ms since the epoch) and reads no clock.

The grant window (``docs/protocol.md`` section 3.2) for a call booked at ``B`` to start at
``S`` for ``D`` seconds:

- ``not_before_ms = B``: the tablet may go live as soon as the server says ``start``; the
  server alone decides when that is (at ``S``, when the relative joins);
- ``not_after_ms = S + D + NOT_AFTER_SLACK_MS``: the hard end leaves two minutes for a
  relative who joins late; the call itself never lasts more than ``max_duration_s = D``
  once started (the tablet's deadline is ``min(start + D, not_after)``, BRIEF invariant 2);
- the grant is signed and sent when the device is connected and ``S`` is at most
  ``GRANT_LEAD_MS`` away (so ``not_after - issued_at`` stays far below the protocol's 7-day
  bound); a booking made for sooner is granted at once;
- ``start`` is sent at ``S`` (or on the first connection after ``S``, while the window
  lasts).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass

from tabletd.devserver import DevServerError
from tabletd.devserver.store import Booking
from tabletd.link.grants import GrantBody

NOT_AFTER_SLACK_MS = 120_000
GRANT_LEAD_MS = 24 * 3600 * 1000
MAX_DURATION_S = 7200  # protocol section 3.2: max_duration_s is 1-7200
MAX_CONTACT_CHARS = 64  # protocol section 3.2: contact_label
MAX_BOOK_AHEAD_S = 30 * 24 * 3600


@dataclass(frozen=True)
class BookingPlan:
    booked_at_ms: int
    start_at_ms: int
    duration_s: int
    not_before_ms: int
    not_after_ms: int
    contact: str


def plan_booking(now_ms: int, in_s: float, duration_s: int, contact: str) -> BookingPlan:
    """The window of a call starting ``in_s`` seconds from ``now_ms``.

    Raises :class:`DevServerError` saying which argument is out of bounds.
    """
    if not 0 <= in_s <= MAX_BOOK_AHEAD_S:
        raise DevServerError(f"--in {in_s}: must be 0 to {MAX_BOOK_AHEAD_S} seconds")
    if isinstance(duration_s, bool) or not 1 <= duration_s <= MAX_DURATION_S:
        raise DevServerError(f"--duration {duration_s}: must be an integer, 1 to "
                             f"{MAX_DURATION_S} seconds (docs/protocol.md section 3.2)")
    if not contact or len(contact) > MAX_CONTACT_CHARS:
        raise DevServerError(f"--contact {contact!r}: must be 1 to {MAX_CONTACT_CHARS} "
                             "characters (docs/protocol.md section 3.2)")
    start_at_ms = now_ms + round(in_s * 1000)
    return BookingPlan(booked_at_ms=now_ms, start_at_ms=start_at_ms, duration_s=duration_s,
                       not_before_ms=now_ms,
                       not_after_ms=start_at_ms + duration_s * 1000 + NOT_AFTER_SLACK_MS,
                       contact=contact)


def grant_due(booking: Booking, now_ms: int) -> bool:
    """A ``booked`` booking's grant should be signed and sent now (device connected)."""
    return (booking.state == "booked" and booking.not_after_ms > now_ms
            and booking.start_at_ms - now_ms <= GRANT_LEAD_MS)


def start_due(booking: Booking, now_ms: int) -> bool:
    """The booking's ``start`` should be sent now (its grant has been delivered)."""
    return booking.start_at_ms <= now_ms < booking.not_after_ms


def new_grant(booking: Booking, now_ms: int) -> GrantBody:
    """The grant body for a booking, with a fresh nonce (22 base64url characters = 16
    random bytes, protocol section 3.2), issued now."""
    return GrantBody(grant_id=booking.session_id, device_id=booking.device_id,
                     contact_label=booking.contact, not_before_ms=booking.not_before_ms,
                     not_after_ms=booking.not_after_ms, max_duration_s=booking.duration_s,
                     nonce=secrets.token_urlsafe(16), issued_at_ms=now_ms)


def grant_to_json(body: GrantBody) -> str:
    """How a signed grant is kept in the store, so that it is re-sent byte-identical."""
    return json.dumps(asdict(body), sort_keys=True)


def grant_from_json(text: str) -> GrantBody:
    """Inverse of :func:`grant_to_json`; raises :class:`DevServerError` if the store holds
    something else."""
    try:
        return GrantBody(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise DevServerError(f"stored grant unreadable ({exc}): {text[:80]!r}") from exc
