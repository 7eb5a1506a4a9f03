"""The sans-I/O session machine: examples, then a hypothesis stateful test of invariant 1."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tabletd.session import (
    Action,
    BatteryChanged,
    DockChanged,
    EndByServer,
    EndReason,
    Grant,
    GrantReceived,
    LinkChanged,
    LockRequested,
    Persist,
    Policy,
    PrivacyChanged,
    RailFaultDetected,
    RailOff,
    RailOn,
    Record,
    SessionMachine,
    Snapshot,
    StartCall,
    State,
    TamperChanged,
    Tick,
    UnlockRequested,
)

S = 1_000_000_000
DEVICE = "tablet-test"
T0 = 1_000 * S


def grant(session_id: str = "s1", *, duration_s: float = 60, window_s: float = 600,
          opens_in_s: float = 0, now: int = T0, device: str = DEVICE) -> Grant:
    nb = now + int(opens_in_s * S)
    return Grant(session_id, device, "Maman", nb, nb + int(window_s * S), int(duration_s * S))


def kinds(actions: list[Action]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, Record)]


def machine(**policy: Any) -> SessionMachine:
    m = SessionMachine(Policy(device_id=DEVICE, link_grace_ns=10 * S, **policy))
    m.handle(LinkChanged(True), T0)
    return m


def start_call(m: SessionMachine, g: Grant, now: int = T0) -> list[Action]:
    m.handle(GrantReceived(g), now)
    return m.handle(StartCall(g.session_id), now)


class TestLifecycle:
    def test_grant_start_deadline(self) -> None:
        m = machine()
        g = grant(duration_s=60)
        actions = start_call(m, g)
        assert m.state is State.LIVE
        assert kinds(actions) == ["call_started"]
        deadline = T0 + 60 * S
        assert m.snapshot.deadline_ns == deadline
        # Persist comes before RailOn: a restart must know the deadline of a powered rail.
        idx = {type(a): i for i, a in enumerate(actions)}
        assert idx[Persist] < idx[RailOn]
        assert RailOn(deadline) in actions
        assert m.next_deadline() == deadline
        actions = m.handle(Tick(), deadline - 1)
        assert m.state is State.LIVE and not any(isinstance(a, RailOff) for a in actions)
        actions = m.handle(Tick(), deadline)
        assert m.state is State.ENDED
        assert actions[0] == RailOff("deadline", deadline)  # the cut comes first
        assert kinds(actions) == ["call_ended"]
        ended = next(a for a in actions if isinstance(a, Record))
        assert ended.fields["reason"] == "deadline"
        assert ended.fields["duration_ms"] == 60_000

    def test_deadline_is_min_of_duration_and_hard_end(self) -> None:
        m = machine()
        g = grant(duration_s=1200, window_s=300)  # hard end comes first
        start_call(m, g)
        assert m.snapshot.deadline_ns == g.not_after_ns

    def test_late_start_keeps_hard_end(self) -> None:
        m = machine()
        g = grant(duration_s=60, window_s=100)
        m.handle(GrantReceived(g), T0)
        m.handle(StartCall("s1"), T0 + 70 * S)
        assert m.snapshot.deadline_ns == T0 + 100 * S

    def test_start_refusals(self) -> None:
        m = machine()
        g = grant(opens_in_s=30)
        m.handle(GrantReceived(g), T0)
        assert kinds(m.handle(StartCall("s1"), T0)) == ["call_start_refused"]
        assert kinds(m.handle(StartCall("other"), T0 + 31 * S)) == ["call_start_refused"]
        m.handle(PrivacyChanged(True), T0 + 31 * S)
        actions = m.handle(StartCall("s1"), T0 + 31 * S)
        refused = next(a for a in actions if isinstance(a, Record))
        assert refused.fields["reason"] == "privacy_engaged"
        assert m.state is State.SCHEDULED

    def test_start_needs_the_link(self) -> None:
        m = SessionMachine(Policy(device_id=DEVICE))  # link never came up
        m.handle(GrantReceived(grant()), T0)
        actions = m.handle(StartCall("s1"), T0)
        assert [a.fields["reason"] for a in actions if isinstance(a, Record)] == ["link_down"]
        assert m.state is State.SCHEDULED

    def test_grant_refusals(self) -> None:
        m = machine()
        actions = m.handle(GrantReceived(grant(device="someone-else")), T0)
        assert [a.fields["reason"] for a in actions if isinstance(a, Record)] == [
            "foreign_device"]
        actions = m.handle(GrantReceived(grant(window_s=10)), T0 + 11 * S)
        assert [a.fields["reason"] for a in actions if isinstance(a, Record)] == ["expired"]
        assert m.state is State.IDLE

    def test_scheduled_grant_expires(self) -> None:
        m = machine()
        g = grant(window_s=60)
        m.handle(GrantReceived(g), T0)
        assert m.next_deadline() == g.not_after_ns
        actions = m.handle(Tick(), g.not_after_ns)
        assert m.state is State.ENDED and m.snapshot.end_reason is EndReason.EXPIRED
        assert not any(isinstance(a, RailOn) for a in actions)

    def test_server_end(self) -> None:
        m = machine()
        start_call(m, grant())
        assert kinds(m.handle(EndByServer("nope"), T0 + S)) == ["end_refused"]
        actions = m.handle(EndByServer("s1"), T0 + S)
        assert actions[0] == RailOff("server_end", None)
        assert m.snapshot.end_reason is EndReason.SERVER_END

    def test_new_grant_after_end(self) -> None:
        m = machine()
        start_call(m, grant())
        m.handle(EndByServer("s1"), T0 + S)
        m.handle(GrantReceived(grant("s2", now=T0 + 2 * S)), T0 + 2 * S)
        assert m.state is State.SCHEDULED and m.snapshot.grant is not None
        assert m.snapshot.grant.session_id == "s2"


class TestLinkLoss:
    def test_grace_then_cut_then_resume_same_deadline(self) -> None:
        m = machine()
        start_call(m, grant(duration_s=120))
        deadline = T0 + 120 * S
        actions = m.handle(LinkChanged(False), T0 + 10 * S)
        # the rail's end moves earlier, never later
        assert RailOn(T0 + 20 * S, "link_grace") in actions
        assert kinds(actions) == ["call_link_lost"]
        assert m.next_deadline() == T0 + 20 * S
        actions = m.handle(Tick(), T0 + 20 * S)
        assert actions[0] == RailOff("link_grace", T0 + 20 * S)
        assert m.state is State.LIVE
        actions = m.handle(LinkChanged(True), T0 + 30 * S)
        assert RailOn(deadline) in actions
        assert m.snapshot.deadline_ns == deadline

    def test_link_back_within_grace(self) -> None:
        m = machine()
        start_call(m, grant(duration_s=120))
        m.handle(LinkChanged(False), T0 + 10 * S)
        actions = m.handle(LinkChanged(True), T0 + 15 * S)
        assert RailOn(T0 + 120 * S) in actions
        assert not any(isinstance(a, RailOff) for a in actions)

    def test_grace_never_extends_past_deadline(self) -> None:
        m = machine()
        start_call(m, grant(duration_s=30))
        actions = m.handle(LinkChanged(False), T0 + 25 * S)
        assert not any(isinstance(a, RailOn) for a in actions)  # deadline < loss + grace
        assert m.commanded_rail_until == T0 + 30 * S


class TestSwitches:
    def test_privacy_ends_call_and_forbids(self) -> None:
        m = machine()
        start_call(m, grant())
        actions = m.handle(PrivacyChanged(True), T0 + S)
        assert actions[0] == RailOff("privacy", None)
        assert m.snapshot.end_reason is EndReason.PRIVACY
        assert kinds(actions) == ["privacy_engaged", "call_ended"]

    def test_tamper_locks_until_unlock_with_case_closed(self) -> None:
        m = machine()
        start_call(m, grant())
        actions = m.handle(TamperChanged(True), T0 + S)
        assert actions[0] == RailOff("tamper", None)
        assert m.state is State.LOCKED
        assert kinds(m.handle(UnlockRequested(), T0 + 2 * S)) == ["unlock_refused"]
        m.handle(TamperChanged(False), T0 + 3 * S)
        assert m.state is State.LOCKED
        assert kinds(m.handle(UnlockRequested(), T0 + 4 * S)) == ["unlocked"]
        assert m.state is State.IDLE

    def test_locked_refuses_grants(self) -> None:
        m = machine()
        m.handle(LockRequested("staff"), T0)
        assert kinds(m.handle(GrantReceived(grant()), T0)) == ["input_refused"]

    def test_dock_ends_call_by_default(self) -> None:
        m = machine()
        start_call(m, grant())
        actions = m.handle(DockChanged(True, "bay-3"), T0 + S)
        assert actions[0] == RailOff("docked", None)
        assert m.snapshot.end_reason is EndReason.DOCKED

    def test_dock_allowed_by_policy(self) -> None:
        m = machine(calls_while_docked=True)
        start_call(m, grant())
        actions = m.handle(DockChanged(True, "bay-3"), T0 + S)
        assert m.state is State.LIVE and not any(isinstance(a, RailOff) for a in actions)

    def test_critical_battery_ends_the_call_and_refuses_the_next(self) -> None:
        m = machine()
        start_call(m, grant())
        actions = m.handle(BatteryChanged(True, 5), T0 + S)
        assert actions[0] == RailOff("low_battery", None)
        assert m.snapshot.end_reason is EndReason.LOW_BATTERY
        assert kinds(actions) == ["battery_critical", "call_ended"]
        m.handle(GrantReceived(grant("s2")), T0 + 2 * S)
        assert kinds(m.handle(StartCall("s2"), T0 + 2 * S)) == ["call_start_refused"]
        assert m.state is State.SCHEDULED
        assert kinds(m.handle(BatteryChanged(False, 9), T0 + 3 * S)) == ["battery_recovered"]
        assert kinds(m.handle(StartCall("s2"), T0 + 3 * S)) == ["call_started"]

    def test_critical_battery_ends_a_scheduled_call(self) -> None:
        m = machine()
        m.handle(LinkChanged(True), T0)
        m.handle(GrantReceived(grant()), T0)
        m.handle(BatteryChanged(True, 4), T0 + S)
        assert m.state is State.ENDED and m.snapshot.end_reason is EndReason.LOW_BATTERY

    def test_fault_is_sticky(self) -> None:
        m = machine()
        start_call(m, grant())
        actions = m.handle(RailFaultDetected("sense stuck"), T0 + S)
        assert actions[0] == RailOff("fault", None)
        assert m.state is State.FAULT
        m.handle(LockRequested("staff"), T0 + S)
        m.handle(TamperChanged(True), T0 + S)
        assert m.state is State.FAULT


class TestRestore:
    def live_snapshot(self) -> Snapshot:
        g = grant(duration_s=60)
        return Snapshot(State.LIVE, g, started_ns=T0, deadline_ns=T0 + 60 * S)

    def test_same_boot_keeps_deadline_rail_off_until_link(self) -> None:
        m = SessionMachine(Policy(device_id=DEVICE))
        actions = m.restore(self.live_snapshot(), same_boot=True, now=T0 + 10 * S)
        assert m.state is State.LIVE
        assert not any(isinstance(a, RailOn) for a in actions)
        assert kinds(actions) == ["call_interrupted"]
        actions = m.handle(LinkChanged(True), T0 + 11 * S)
        assert RailOn(T0 + 60 * S) in actions

    def test_same_boot_after_deadline_never_powers(self) -> None:
        m = SessionMachine(Policy(device_id=DEVICE))
        m.restore(self.live_snapshot(), same_boot=True, now=T0 + 61 * S)
        actions = m.handle(LinkChanged(True), T0 + 61 * S)
        assert not any(isinstance(a, RailOn) for a in actions)
        assert m.state is State.ENDED

    def test_new_boot_ends_session(self) -> None:
        m = SessionMachine(Policy(device_id=DEVICE))
        actions = m.restore(self.live_snapshot(), same_boot=False, now=5 * S)
        assert m.state is State.ENDED and m.snapshot.end_reason is EndReason.REBOOT
        assert kinds(actions) == ["call_ended"]

    def test_restore_only_first(self) -> None:
        m = machine()
        with pytest.raises(RuntimeError):
            m.restore(Snapshot(), same_boot=True, now=T0)


# ---- the property: no sequence of inputs powers the rail outside a live call -------------


class RailModel(RuleBasedStateMachine):
    """Drives the machine with random inputs and a random (monotonic) clock, carrying out
    its rail actions like the guard does: ``RailOn(until)`` lapses by itself at ``until``."""

    @initialize(grace_s=st.integers(0, 20), docked_ok=st.booleans())
    def setup(self, grace_s: int, docked_ok: bool) -> None:
        self.m = SessionMachine(Policy(DEVICE, link_grace_ns=grace_s * S,
                                       calls_while_docked=docked_ok))
        self.now = T0
        self.wall_offset = 0  # the wall clock: jumps, and must change nothing
        self.rail_until: int | None = None
        self.deadlines: dict[str, int] = {}
        self.session_ids = 0
        self.grace_ns = grace_s * S
        self.link_lost_at: int | None = None
        self.apply(self.m.restore(Snapshot(), same_boot=True, now=self.now))

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, RailOn):
                assert a.until_ns > self.now, "RailOn for an instant already past"
                self.rail_until = a.until_ns
            elif isinstance(a, RailOff):
                self.rail_until = None

    def rail_powered(self) -> bool:
        return self.rail_until is not None and self.now < self.rail_until

    def feed(self, inp: Any) -> None:
        self.apply(self.m.handle(inp, self.now))

    @rule(duration=st.integers(1, 1800), window=st.integers(1, 3600),
          opens=st.integers(-100, 100), foreign=st.booleans())
    def grant(self, duration: int, window: int, opens: int, foreign: bool) -> None:
        self.session_ids += 1
        g = grant(f"s{self.session_ids}", duration_s=duration, window_s=window,
                  opens_in_s=opens, now=self.now, device="x" if foreign else DEVICE)
        self.feed(GrantReceived(g))

    @rule(duration=st.integers(1, 600), opens=st.integers(-30, 0))
    def grant_and_start(self, duration: int, opens: int) -> None:
        """The common path, so the search spends most of its steps in live calls."""
        self.link(True)
        self.grant(duration, 3600, opens, False)
        self.start(1)

    @rule(which=st.integers(0, 3))
    def start(self, which: int) -> None:
        g = self.m.snapshot.grant
        sid = g.session_id if g is not None and which else f"s{which}"
        self.feed(StartCall(sid))

    @rule()
    def server_end(self) -> None:
        g = self.m.snapshot.grant
        self.feed(EndByServer(g.session_id if g else "none"))

    @rule(engaged=st.booleans())
    def privacy(self, engaged: bool) -> None:
        self.feed(PrivacyChanged(engaged))

    @rule(roll=st.integers(0, 4))
    def tamper(self, roll: int) -> None:
        self.feed(TamperChanged(roll == 0))

    @rule(docked=st.booleans())
    def dock(self, docked: bool) -> None:
        self.feed(DockChanged(docked, "bay-1" if docked else None))

    @rule(critical=st.booleans())
    def battery(self, critical: bool) -> None:
        self.feed(BatteryChanged(critical, 4 if critical else 50))

    @rule(up=st.booleans())
    def link(self, up: bool) -> None:
        if self.m.link_up and not up:
            self.link_lost_at = self.now
        self.feed(LinkChanged(up))

    # Locks and faults are sticky: drawn rarely, or the search would spend its time locked.
    @rule(roll=st.integers(0, 9))
    def lock(self, roll: int) -> None:
        if roll == 0:
            self.feed(LockRequested("staff"))

    @rule()
    def unlock(self) -> None:
        self.feed(UnlockRequested())

    @rule(roll=st.integers(0, 9))
    def fault(self, roll: int) -> None:
        if roll == 0:
            self.feed(RailFaultDetected("sense"))

    @rule(seconds=st.floats(0, 120))
    def time_passes_with_tick(self, seconds: float) -> None:
        self.now += int(seconds * S)
        self.feed(Tick())

    @rule(seconds=st.floats(0, 120))
    def time_passes_silently(self, seconds: float) -> None:
        """Time passes with no tick at all (a blocked loop): ``until`` alone must hold."""
        self.now += int(seconds * S)

    @rule(jump_s=st.integers(-86400 * 365, 86400 * 365))
    def wall_clock_jump(self, jump_s: int) -> None:
        """NTP or a wrong date: the machine never sees the wall clock, so nothing moves."""
        before = (self.m.next_deadline(), self.m.snapshot)
        self.wall_offset += jump_s
        assert (self.m.next_deadline(), self.m.snapshot) == before

    @precondition(lambda self: self.m.next_deadline() is not None)
    @rule()
    def tick_exactly_at_next_deadline(self) -> None:
        nd = self.m.next_deadline()
        assert nd is not None
        self.now = max(self.now, nd)
        self.feed(Tick())

    @invariant()
    def rail_only_in_live_call_before_deadline(self) -> None:
        if not self.rail_powered():
            return
        m = self.m
        snap = m.snapshot
        assert snap.state is State.LIVE, f"rail powered in {snap.state}"
        assert snap.deadline_ns is not None and self.now < snap.deadline_ns
        assert self.rail_until is not None and self.rail_until <= snap.deadline_ns
        assert not m.privacy and not m.tamper_open
        if not m.link_up:
            assert self.link_lost_at is not None
            assert self.now < self.link_lost_at + self.grace_ns, "rail on past the link grace"
        assert not m.docked or m.policy.calls_while_docked
        assert not m.battery_critical
        g = snap.grant
        assert g is not None and g.device_id == DEVICE
        assert snap.started_ns is not None
        assert g.not_before_ns <= snap.started_ns < g.not_after_ns
        assert snap.deadline_ns <= snap.started_ns + g.max_duration_ns
        assert snap.deadline_ns <= g.not_after_ns

    @invariant()
    def deadline_never_moves(self) -> None:
        snap = self.m.snapshot
        if snap.grant is not None and snap.deadline_ns is not None:
            sid = snap.grant.session_id
            assert self.deadlines.setdefault(sid, snap.deadline_ns) == snap.deadline_ns

    @invariant()
    def machine_never_commands_past_its_own_view(self) -> None:
        until = self.m.commanded_rail_until
        if until is not None and self.rail_until is not None:
            assert until == self.rail_until


TestRailModel = RailModel.TestCase
TestRailModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
