"""The call-session state machine: sans-I/O, the one file that owns the transitions.

Theory of operation
-------------------
The machine is fed *inputs* (a verified grant, the server's start and end, the privacy and
tamper switches, the dock, the battery, the link, a lock, a rail fault, and plain ticks), each with
``now``: nanoseconds on CLOCK_BOOTTIME, read by the caller. It returns *actions* for the I/O
shell to carry out, in order, and :meth:`SessionMachine.next_deadline` tells the caller when
to tick it next. It reads no clock, does no I/O and never blocks, so every property can be
tested with a fake clock and hypothesis.

The camera rail is not a state of its own: after every input the machine recomputes *until
when the rail may be powered* (:meth:`SessionMachine.rail_until`), from first principles, and
emits ``RailOn(until)`` / ``RailOff`` only when that answer changes. The rail may be powered
only while the session is LIVE, before its deadline, with privacy not engaged, the case
closed, not docked (unless policy allows it), the battery not critical, and the link up or
inside its grace after a loss (BRIEF invariant 1). ``RailOn`` always carries ``until``: the
enforcement thread cuts at that instant by itself, whatever happens to the caller
(invariant 3).

The deadline is fixed once, at start: ``min(start + granted duration, grant's hard end)``
(invariant 2). Nothing moves it afterwards; a link loss can only cut earlier.

Actions come out safety-first: a ``RailOff`` before anything else, then the records, then
``Persist``, and a ``RailOn`` only after the state that explains it has been persisted.

Transitions (``*`` = any state; inputs not listed for a state are recorded as refused or
ignored and change nothing)::

    state       input               guard                          next       records
    ---------   -----------------   ----------------------------   ---------  ---------------------
    IDLE/ENDED  GrantReceived       for this device, not expired   SCHEDULED  call_scheduled
    IDLE/ENDED  GrantReceived       otherwise                      (same)     grant_refused
    SCHEDULED   GrantReceived       the identical grant again      SCHEDULED  (none: idempotent)
    SCHEDULED   GrantReceived       any other grant                (same)     grant_refused
    LIVE        GrantReceived       (as SCHEDULED)                 (same)     (as SCHEDULED)
    SCHEDULED   StartCall           id matches, inside window,     LIVE       call_started
                                    link up, no privacy, not       (else      (else
                                    docked, battery not critical    same)      call_start_refused)
    SCHEDULED   Tick                now >= grant.not_after         ENDED      call_ended(expired)
    SCHEDULED   EndByServer         id matches                     ENDED      call_ended(server_end)
    LIVE        Tick                now >= deadline                ENDED      call_ended(deadline)
    LIVE        EndByServer         id matches                     ENDED      call_ended(server_end)
    LIVE        MediaFailed         (camera or microphone gave up) ENDED      media_fault,
                                                                              call_ended(camera_fault)
    *           PrivacyChanged      changed (LIVE: engaged ends)   (ENDED)    privacy_* (+ end)
    *           DockChanged         changed (LIVE: docked ends,    (ENDED)    docked/undocked
                                    unless policy allows)                     (+ end)
    *           BatteryChanged      changed (LIVE or SCHEDULED:    (ENDED)    battery_critical/
                                    critical ends the call)                   battery_recovered
                                                                              (+ end)
    *           LinkChanged         changed (LIVE: loss starts     (same)     LIVE: call_link_*
                                    the grace, return resumes)
    *           TamperChanged       opened (not in FAULT)          LOCKED     tamper_opened (+ end)
    *           LockRequested       (not in FAULT)                 LOCKED     locked (+ end)
    *           RailFaultDetected                                  FAULT      fault (+ end)
    LOCKED      UnlockRequested     case closed                    IDLE       unlocked
    FAULT       UnlockRequested     case closed                    IDLE       unlocked
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias

NS_PER_MS = 1_000_000


class State(StrEnum):
    IDLE = "idle"
    SCHEDULED = "scheduled"
    LIVE = "live"
    ENDED = "ended"
    LOCKED = "locked"
    FAULT = "fault"


class EndReason(StrEnum):
    """Why a call ended; carried by ``call_ended`` and shown on the screen."""

    DEADLINE = "deadline"
    SERVER_END = "server_end"
    PRIVACY = "privacy"
    TAMPER = "tamper"
    LOCKED = "locked"
    FAULT = "fault"
    DOCKED = "docked"
    EXPIRED = "expired"
    REBOOT = "reboot"
    CAMERA_FAULT = "camera_fault"
    LOW_BATTERY = "low_battery"


class Screen(StrEnum):
    IDLE = "idle"
    UPCOMING = "upcoming"
    LIVE = "live"
    ENDED = "ended"
    DOCKED = "docked"
    LOCKED = "locked"
    FAULT = "fault"


class LedColour(StrEnum):
    OFF = "off"
    BLUE = "blue"  # a call is booked
    GREEN = "green"  # camera rail commanded on
    AMBER = "amber"  # live, rail held off (link lost past its grace)
    RED = "red"  # locked or fault


@dataclass(frozen=True)
class Grant:
    """A call grant whose signature, device binding and nonce the link layer has verified.

    Bounds are already mapped to CLOCK_BOOTTIME, erring early (invariant 2).
    """

    session_id: str
    device_id: str
    contact_label: str
    not_before_ns: int
    not_after_ns: int  # the grant's hard end: no rail power at or after it
    max_duration_ns: int


@dataclass(frozen=True)
class Policy:
    device_id: str
    link_grace_ns: int = 10_000_000_000
    calls_while_docked: bool = False


# ---- inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GrantReceived:
    grant: Grant


@dataclass(frozen=True)
class StartCall:
    """The server says the relative joined: go live."""

    session_id: str


@dataclass(frozen=True)
class EndByServer:
    """Staff ended (or cancelled) the call."""

    session_id: str


@dataclass(frozen=True)
class PrivacyChanged:
    engaged: bool


@dataclass(frozen=True)
class TamperChanged:
    opened: bool


@dataclass(frozen=True)
class DockChanged:
    """Docked in ``bay`` (or undocked); ``battery_pct`` goes into the custody record."""

    docked: bool
    bay: str | None = None
    battery_pct: int | None = None


@dataclass(frozen=True)
class BatteryChanged:
    """The battery crossed its critical level (down: ``critical``), or recovered from it."""

    critical: bool
    pct: int | None = None


@dataclass(frozen=True)
class LinkChanged:
    up: bool


@dataclass(frozen=True)
class LockRequested:
    reason: str


@dataclass(frozen=True)
class UnlockRequested:
    pass


@dataclass(frozen=True)
class RailFaultDetected:
    detail: str


@dataclass(frozen=True)
class MediaFailed:
    """The camera or microphone failed past its restarts during a live call."""

    detail: str


@dataclass(frozen=True)
class Tick:
    pass


Input: TypeAlias = (
    GrantReceived | StartCall | EndByServer | PrivacyChanged | TamperChanged | DockChanged
    | BatteryChanged | LinkChanged | LockRequested | UnlockRequested | RailFaultDetected
    | MediaFailed | Tick
)

# ---- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class RailOn:
    """Power the rail (or keep it powered) until ``until_ns``, and not one nanosecond more.

    ``cause`` names what ``until_ns`` is: the call's "deadline", or the end of the
    "link_grace" after a link loss; the enforcement thread cuts with that reason.
    """

    until_ns: int
    cause: str = "deadline"


@dataclass(frozen=True)
class RailOff:
    """Cut the rail now. ``due_ns`` is the instant the cut was due, when it was a deadline."""

    reason: str
    due_ns: int | None = None


@dataclass(frozen=True)
class Record:
    """Write an event durably (invariant 6) before anything reports it."""

    kind: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Persist:
    snapshot: Snapshot


@dataclass(frozen=True)
class ShowScreen:
    screen: Screen


@dataclass(frozen=True)
class SetLed:
    colour: LedColour


@dataclass(frozen=True)
class SetBacklight:
    on: bool


Action: TypeAlias = RailOn | RailOff | Record | Persist | ShowScreen | SetLed | SetBacklight


@dataclass(frozen=True)
class Snapshot:
    """What survives a restart of the daemon within one boot (see ``persistence``)."""

    state: State = State.IDLE
    grant: Grant | None = None
    started_ns: int | None = None
    deadline_ns: int | None = None
    end_reason: EndReason | None = None
    locked_reason: str | None = None
    fault_detail: str | None = None


def compute_deadline(grant: Grant, start_ns: int) -> int:
    """Invariant 2: ``min(start + granted duration, grant's hard end)``."""
    return min(start_ns + grant.max_duration_ns, grant.not_after_ns)


class SessionMachine:
    """The call-session state machine. Feed it with :meth:`handle`; carry out what it returns.

    The caller must tick it (``handle(Tick(), now)``) no later than :meth:`next_deadline`.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._snap = Snapshot()
        self.privacy = False
        self.tamper_open = False
        self.docked = False
        self.dock_bay: str | None = None
        self.battery_critical = False
        self.link_up = False
        # When the link went down during LIVE; None with the link down means "no grace":
        # a call restored after a daemon restart waits for the link with the rail off.
        self._link_lost_ns: int | None = None
        self._rail_until: int | None = None
        self._cut_reason = "idle"
        self._outputs: tuple[Screen, LedColour, bool] | None = None
        self._records: list[Record] = []
        self._handled_any = False

    # ---- read-only views ----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._snap.state

    @property
    def snapshot(self) -> Snapshot:
        return self._snap

    @property
    def commanded_rail_until(self) -> int | None:
        """What the last ``RailOn`` allowed, or None after a ``RailOff``."""
        return self._rail_until

    def rail_until(self, now: int) -> int | None:
        """Until when the rail may be powered at ``now``; None: it must be off (invariant 1)."""
        s = self._snap
        if s.state is not State.LIVE or s.deadline_ns is None:
            return None
        if self.privacy or self.tamper_open or self.battery_critical or (
                self.docked and not self.policy.calls_while_docked):
            return None
        until = s.deadline_ns
        if not self.link_up:
            if self._link_lost_ns is None:
                return None
            until = min(until, self._link_lost_ns + self.policy.link_grace_ns)
        return until if now < until else None

    def remaining_ns(self, now: int) -> int | None:
        s = self._snap
        if s.state is not State.LIVE or s.deadline_ns is None:
            return None
        return max(0, s.deadline_ns - now)

    def next_deadline(self) -> int | None:
        """The latest instant by which the caller must tick the machine, or None."""
        s = self._snap
        candidates: list[int] = []
        if s.state is State.LIVE and s.deadline_ns is not None:
            candidates.append(s.deadline_ns)
        if s.state is State.SCHEDULED and s.grant is not None:
            candidates.append(s.grant.not_after_ns)
        if self._rail_until is not None:
            candidates.append(self._rail_until)
        return min(candidates) if candidates else None

    def screen(self) -> Screen:
        return self._derived_outputs()[0]

    # ---- restore ------------------------------------------------------------------------

    def restore(self, snap: Snapshot, *, same_boot: bool, now: int) -> list[Action]:
        """Adopt the state persisted by a previous run; call once, before any input.

        Within the same boot a LIVE call keeps its deadline but its rail stays off until the
        link is up again (the daemon restarted; no grace). After a reboot any session is over.
        """
        if self._handled_any:
            raise RuntimeError("restore() must come before any input")
        self._handled_any = True
        self._records = []
        if snap.state in (State.LIVE, State.SCHEDULED) and not same_boot:
            self._snap = snap
            self._end(EndReason.REBOOT, now)
        else:
            self._snap = snap
            if snap.state is State.LIVE:
                assert snap.grant is not None
                self._record("call_interrupted", session_id=snap.grant.session_id,
                             cause="daemon_restart")
        return self._finish(now, persist_anyway=True)

    # ---- the one entry point --------------------------------------------------------------

    def handle(self, event: Input, now: int) -> list[Action]:
        """Apply one input at ``now`` (CLOCK_BOOTTIME ns); returns the actions, in order."""
        self._handled_any = True
        self._records = []
        before = self._snap
        handler = _TABLE.get((self._snap.state, type(event))) or _ANY_STATE.get(type(event))
        if handler is not None:
            handler(self, event, now)
        else:
            self._refuse(event)
        # Deadlines are checked on every input, not only on ticks: a late tick never
        # lets another input observe a call past its deadline.
        self._expire(now)
        return self._finish(now, persist_anyway=False, before=before)

    # ---- handlers -------------------------------------------------------------------------

    def _on_grant(self, ev: GrantReceived, now: int) -> None:
        g = ev.grant
        problem = None
        if g.device_id != self.policy.device_id:
            problem = "foreign_device"
        elif g.max_duration_ns <= 0 or g.not_after_ns <= g.not_before_ns:
            problem = "malformed_window"
        elif now >= g.not_after_ns:
            problem = "expired"
        if problem is not None:
            self._record("grant_refused", session_id=g.session_id, reason=problem)
            return
        self._snap = Snapshot(state=State.SCHEDULED, grant=g,
                              locked_reason=None, fault_detail=None)
        self._record(
            "call_scheduled",
            session_id=g.session_id,
            contact=g.contact_label,
            not_before_ns=g.not_before_ns,
            not_after_ns=g.not_after_ns,
            max_duration_ms=g.max_duration_ns // NS_PER_MS,
        )

    def _on_grant_busy(self, ev: GrantReceived, now: int) -> None:
        current = self._snap.grant
        if current is not None and current == ev.grant:
            return  # the server re-sent the same grant: idempotent
        self._record("grant_refused", session_id=ev.grant.session_id, reason=f"busy_{self.state}")

    def _on_start(self, ev: StartCall, now: int) -> None:
        g = self._snap.grant
        assert g is not None
        problem = None
        if ev.session_id != g.session_id:
            problem = "unknown_session"
        elif now < g.not_before_ns:
            problem = "too_early"
        elif now >= g.not_after_ns:
            problem = "expired"
        elif not self.link_up:
            problem = "link_down"
        elif self.privacy:
            problem = "privacy_engaged"
        elif self.docked and not self.policy.calls_while_docked:
            problem = "docked"
        elif self.battery_critical:
            problem = "low_battery"
        if problem is not None:
            self._record("call_start_refused", session_id=ev.session_id, reason=problem)
            return
        deadline = compute_deadline(g, now)
        self._snap = dataclasses.replace(
            self._snap, state=State.LIVE, started_ns=now, deadline_ns=deadline
        )
        self._record(
            "call_started",
            session_id=g.session_id,
            started_ns=now,
            deadline_ns=deadline,
            duration_ms=(deadline - now) // NS_PER_MS,
        )

    def _on_end_by_server(self, ev: EndByServer, now: int) -> None:
        g = self._snap.grant
        if g is None or ev.session_id != g.session_id:
            self._record("end_refused", session_id=ev.session_id, reason="unknown_session")
            return
        self._end(EndReason.SERVER_END, now)

    def _on_privacy(self, ev: PrivacyChanged, now: int) -> None:
        if ev.engaged == self.privacy:
            return
        self.privacy = ev.engaged
        self._record("privacy_engaged" if ev.engaged else "privacy_released")
        if ev.engaged and self.state is State.LIVE:
            self._end(EndReason.PRIVACY, now)

    def _on_tamper(self, ev: TamperChanged, now: int) -> None:
        if ev.opened == self.tamper_open:
            return
        self.tamper_open = ev.opened
        self._record("tamper_opened" if ev.opened else "tamper_closed")
        if ev.opened and self.state is not State.FAULT:
            self._lock("tamper", EndReason.TAMPER, now)

    def _on_dock(self, ev: DockChanged, now: int) -> None:
        if ev.docked == self.docked and (not ev.docked or ev.bay == self.dock_bay):
            return
        # Custody: "undocked" names the bay the tablet left.
        bay = ev.bay if ev.docked else (ev.bay or self.dock_bay)
        self.docked, self.dock_bay = ev.docked, ev.bay if ev.docked else None
        self._record("docked" if ev.docked else "undocked", bay=bay,
                     battery_pct=ev.battery_pct)
        if ev.docked and not self.policy.calls_while_docked and self.state is State.LIVE:
            self._end(EndReason.DOCKED, now)

    def _on_battery(self, ev: BatteryChanged, now: int) -> None:
        if ev.critical == self.battery_critical:
            return
        self.battery_critical = ev.critical
        self._record("battery_critical" if ev.critical else "battery_recovered", pct=ev.pct)
        if ev.critical and self.state in (State.LIVE, State.SCHEDULED):
            self._end(EndReason.LOW_BATTERY, now)

    def _on_link(self, ev: LinkChanged, now: int) -> None:
        if ev.up == self.link_up:
            return
        self.link_up = ev.up
        if self.state is State.LIVE:
            g = self._snap.grant
            assert g is not None
            if ev.up:
                self._link_lost_ns = None
                self._record("call_link_restored", session_id=g.session_id)
            else:
                self._link_lost_ns = now
                self._record("call_link_lost", session_id=g.session_id,
                             grace_ms=self.policy.link_grace_ns // NS_PER_MS)

    def _on_lock(self, ev: LockRequested, now: int) -> None:
        if self.state is State.FAULT:
            return
        self._lock(ev.reason, EndReason.LOCKED, now)

    def _on_unlock(self, ev: UnlockRequested, now: int) -> None:
        if self.tamper_open:
            self._record("unlock_refused", reason="tamper_open")
            return
        self._snap = Snapshot(state=State.IDLE)
        self._record("unlocked")

    def _on_fault(self, ev: RailFaultDetected, now: int) -> None:
        if self.state is State.FAULT:
            return
        self._cut_reason = "fault"
        self._end_if_active(EndReason.FAULT, now)
        self._snap = Snapshot(state=State.FAULT, fault_detail=ev.detail,
                              locked_reason=self._snap.locked_reason)
        self._record("fault", detail=ev.detail)

    def _on_media_failed(self, ev: MediaFailed, now: int) -> None:
        self._record("media_fault", session_id=self._session_id(), detail=ev.detail[:512])
        self._end(EndReason.CAMERA_FAULT, now)

    def _session_id(self) -> str | None:
        g = self._snap.grant
        return None if g is None else g.session_id

    def _on_tick(self, ev: Tick, now: int) -> None:
        """Expiry is checked for every input by :meth:`_expire`; a tick only triggers it."""

    # ---- helpers --------------------------------------------------------------------------

    def _expire(self, now: int) -> None:
        s = self._snap
        if s.state is State.LIVE and s.deadline_ns is not None and now >= s.deadline_ns:
            self._end(EndReason.DEADLINE, now)
        elif s.state is State.SCHEDULED and s.grant is not None and now >= s.grant.not_after_ns:
            self._end(EndReason.EXPIRED, now)

    def _lock(self, reason: str, end_reason: EndReason, now: int) -> None:
        self._end_if_active(end_reason, now)
        if self.state is not State.LOCKED:
            self._snap = Snapshot(state=State.LOCKED, locked_reason=reason)
            self._record("locked", reason=reason)

    def _end_if_active(self, reason: EndReason, now: int) -> None:
        if self.state in (State.LIVE, State.SCHEDULED):
            self._end(reason, now)

    def _end(self, reason: EndReason, now: int) -> None:
        s = self._snap
        g = s.grant
        assert g is not None
        fields: dict[str, Any] = {"session_id": g.session_id, "reason": str(reason)}
        if s.state is State.LIVE and s.started_ns is not None and s.deadline_ns is not None:
            fields["duration_ms"] = (min(now, s.deadline_ns) - s.started_ns) // NS_PER_MS
        else:
            fields["duration_ms"] = 0
        self._cut_reason = str(reason)
        self._snap = dataclasses.replace(s, state=State.ENDED, end_reason=reason)
        self._record("call_ended", **fields)

    def _refuse(self, event: Input) -> None:
        name = type(event).__name__
        session_id = getattr(event, "session_id", None)
        if isinstance(event, GrantReceived):
            session_id = event.grant.session_id
        self._record("input_refused", input=name, state=str(self.state), session_id=session_id)

    def _record(self, kind: str, **fields: Any) -> None:
        self._records.append(Record(kind, fields))

    def _derived_outputs(self) -> tuple[Screen, LedColour, bool]:
        state = self.state
        if state is State.FAULT:
            return Screen.FAULT, LedColour.RED, True
        if state is State.LOCKED:
            return Screen.LOCKED, LedColour.RED, True
        if state is State.LIVE:
            return Screen.LIVE, (LedColour.GREEN if self._rail_until else LedColour.AMBER), True
        if state is State.SCHEDULED:
            return Screen.UPCOMING, LedColour.BLUE, True
        if state is State.ENDED:
            return Screen.ENDED, LedColour.OFF, True
        if self.docked:
            return Screen.DOCKED, LedColour.OFF, False
        return Screen.IDLE, LedColour.OFF, True

    def _finish(self, now: int, *, persist_anyway: bool,
                before: Snapshot | None = None) -> list[Action]:
        actions: list[Action] = []
        want = self.rail_until(now)
        rail_on: RailOn | None = None
        if want is None and self._rail_until is not None:
            # A cut that was due at a deadline (or a grace's end) carries that instant, so the
            # shell can measure and report the lateness (invariant 6: "measured lateness").
            due = self._rail_until if now >= self._rail_until else None
            # Still LIVE with the rail off: the link stayed down past its grace.
            reason = self._cut_reason if self.state is not State.LIVE else "link_grace"
            actions.append(RailOff(reason, due))
            self._rail_until = None
        elif want is not None and want != self._rail_until:
            rail_on = RailOn(want, "deadline" if want == self._snap.deadline_ns else "link_grace")
            self._rail_until = want
        actions.extend(self._records)
        self._records = []
        if persist_anyway or self._snap != before:
            actions.append(Persist(self._snap))
        if rail_on is not None:
            actions.append(rail_on)
        outputs = self._derived_outputs()
        if outputs != self._outputs:
            old = self._outputs
            if old is None or old[0] != outputs[0]:
                actions.append(ShowScreen(outputs[0]))
            if old is None or old[1] != outputs[1]:
                actions.append(SetLed(outputs[1]))
            if old is None or old[2] != outputs[2]:
                actions.append(SetBacklight(outputs[2]))
            self._outputs = outputs
        return actions


_Handler: TypeAlias = Callable[[SessionMachine, Any, int], None]

# (state, input) -> handler. The transition table in the module docstring, as code.
_TABLE: dict[tuple[State, type[Any]], _Handler] = {
    (State.IDLE, GrantReceived): SessionMachine._on_grant,
    (State.ENDED, GrantReceived): SessionMachine._on_grant,
    (State.SCHEDULED, GrantReceived): SessionMachine._on_grant_busy,
    (State.LIVE, GrantReceived): SessionMachine._on_grant_busy,
    (State.SCHEDULED, StartCall): SessionMachine._on_start,
    (State.SCHEDULED, EndByServer): SessionMachine._on_end_by_server,
    (State.LIVE, EndByServer): SessionMachine._on_end_by_server,
    (State.LIVE, MediaFailed): SessionMachine._on_media_failed,
    (State.LOCKED, UnlockRequested): SessionMachine._on_unlock,
    (State.FAULT, UnlockRequested): SessionMachine._on_unlock,
}

# Inputs about the tablet's surroundings are handled in every state.
_ANY_STATE: dict[type[Any], _Handler] = {
    PrivacyChanged: SessionMachine._on_privacy,
    TamperChanged: SessionMachine._on_tamper,
    DockChanged: SessionMachine._on_dock,
    BatteryChanged: SessionMachine._on_battery,
    LinkChanged: SessionMachine._on_link,
    LockRequested: SessionMachine._on_lock,
    RailFaultDetected: SessionMachine._on_fault,
    Tick: SessionMachine._on_tick,
}
