"""The daemon in-process on simulated hardware (gpiozero MockFactory), real threads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tabletd.clock import NS_PER_S, BootClock, boot_id
from tabletd.events import EventStore
from tabletd.persistence import StateFile
from tabletd.session import (
    EndByServer,
    Grant,
    GrantReceived,
    LinkChanged,
    Snapshot,
    StartCall,
    State,
    Tick,
)

from .conftest import sim_config, wait_for


def make_grant(now: int, seconds: float, sid: str = "call-1", device: str = "tablet-sim-0001"
               ) -> Grant:
    return Grant(sid, device, "Papa", now - NS_PER_S, now + 3600 * NS_PER_S,
                 int(seconds * NS_PER_S))


def event_kinds(state_dir: Path) -> list[str]:
    store = EventStore(state_dir / "events.sqlite")
    try:
        return [e.kind for e in store.all()]
    finally:
        store.close()


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def start_live_call(d, seconds: float, sid: str = "call-1") -> Grant:  # type: ignore[no-untyped-def]
    g = make_grant(d.clock.boot_ns(), seconds, sid)
    d.submit(LinkChanged(True))
    d.submit(GrantReceived(g))
    d.submit(StartCall(sid))
    await wait_for(lambda: d.guard.rail_on)
    return g


async def test_start_up_fails_closed(start_daemon, tmp_path: Path) -> None:
    run = await start_daemon()
    d = run.daemon
    assert d.hardware.sim.rail_file_state() is False
    assert not d.guard.rail_on and not d.hardware.rail.sensed
    assert d.machine.state is State.IDLE
    assert await run.stop() == 0


async def test_call_ends_at_deadline_and_is_recorded(start_daemon, tmp_path: Path) -> None:
    run = await start_daemon()
    d = run.daemon
    await start_live_call(d, 0.15)
    assert d.hardware.sim.rail_file_state() is True
    assert d.hardware.rail.sensed
    await wait_for(lambda: d.machine.state is State.ENDED)
    assert not d.guard.rail_on and not d.hardware.sim.rail_file_state()
    cut = d.guard.last_cut
    assert cut is not None and cut.reason == "deadline" and cut.lateness_ns is not None
    assert cut.lateness_ns >= 0
    await run.stop()
    kinds = event_kinds(tmp_path / "state")
    assert kinds[:2] == ["call_scheduled", "call_started"]
    assert "rail_cut" in kinds and "call_ended" in kinds
    store = EventStore(tmp_path / "state" / "events.sqlite")
    ended = next(e for e in store.all() if e.kind == "call_ended")
    store.close()
    assert ended.fields["reason"] == "deadline"
    assert ended.fields["cutoff_lateness_ms"] is not None


async def test_blocked_loop_cannot_extend_a_call(start_daemon) -> None:
    run = await start_daemon()
    d = run.daemon
    g = await start_live_call(d, 0.1)
    deadline = d.machine.snapshot.deadline_ns
    assert deadline is not None and deadline == d.machine.snapshot.started_ns + g.max_duration_ns
    busy(0.4)  # the loop is blocked across the deadline, holding the GIL in Python code
    unblocked_at = d.clock.boot_ns()
    cut = d.guard.last_cut
    assert cut is not None, "nobody cut the rail while the loop was blocked"
    assert cut.by == "thread" and cut.reason == "deadline"
    assert deadline <= cut.at_ns < unblocked_at
    assert not d.hardware.sim.rail_file_state()
    await wait_for(lambda: d.machine.state is State.ENDED)


async def test_link_loss_grace_then_resume(start_daemon) -> None:
    run = await start_daemon(sim_config(session={"link_grace_s": 0.1}))
    d = run.daemon
    await start_live_call(d, 30)
    deadline = d.machine.snapshot.deadline_ns
    d.submit(LinkChanged(False))
    await wait_for(lambda: not d.guard.rail_on)
    assert d.guard.last_cut is not None and d.guard.last_cut.reason == "link_grace"
    assert d.machine.state is State.LIVE
    d.submit(LinkChanged(True))
    await wait_for(lambda: d.guard.rail_on)
    assert d.machine.snapshot.deadline_ns == deadline
    assert d.guard.until_ns == deadline


async def test_sense_stuck_off_faults_and_locks(start_daemon, tmp_path: Path) -> None:
    run = await start_daemon()
    d = run.daemon
    d.hardware.sim.set_sense_fault("stuck_off")
    g = make_grant(d.clock.boot_ns(), 30)
    d.submit(LinkChanged(True))
    d.submit(GrantReceived(g))
    d.submit(StartCall(g.session_id))
    await wait_for(lambda: d.machine.state is State.FAULT)
    assert not d.guard.rail_on
    assert d.guard.fault is not None and "sense reads off" in d.guard.fault
    status = d.status()
    assert status["locked"] is True and status["fault"] == d.guard.fault
    await run.stop()
    assert "fault" in event_kinds(tmp_path / "state")


async def test_sense_stuck_on_at_start_is_a_fault(start_daemon) -> None:
    run = await start_daemon(sim_config(sim={"sense_fault": "stuck_on"}))
    d = run.daemon
    await wait_for(lambda: d.machine.state is State.FAULT)
    assert not d.guard.rail_on
    # a locked tablet refuses calls
    g = make_grant(d.clock.boot_ns(), 30)
    d.submit(GrantReceived(g))
    d.submit(StartCall(g.session_id))
    await wait_for(d._queue.empty)
    assert d.machine.state is State.FAULT and not d.guard.rail_on


async def test_privacy_cuts_at_once_without_the_loop(start_daemon) -> None:
    run = await start_daemon()
    d = run.daemon
    await start_live_call(d, 30)
    d.hardware.sim.set_privacy(True)
    # No await in between: the guard cut from the switch callback itself.
    assert not d.guard.rail_on and not d.hardware.sim.rail_file_state()
    await wait_for(lambda: d.machine.state is State.ENDED)
    assert d.machine.snapshot.end_reason == "privacy"
    g = make_grant(d.clock.boot_ns(), 30, sid="call-2")
    d.submit(GrantReceived(g))
    d.submit(StartCall("call-2"))
    await wait_for(d._queue.empty)
    assert not d.guard.rail_on


async def test_tamper_locks(start_daemon) -> None:
    run = await start_daemon()
    d = run.daemon
    await start_live_call(d, 30)
    d.hardware.sim.set_tamper_open(True)
    assert not d.guard.rail_on
    await wait_for(lambda: d.machine.state is State.LOCKED)
    assert d.status()["locked_reason"] == "tamper"


async def test_restart_same_boot_keeps_deadline_rail_off(start_daemon, tmp_path: Path) -> None:
    state = tmp_path / "state"
    run = await start_daemon(state_dir=state)
    await start_live_call(run.daemon, 30)
    deadline = run.daemon.machine.snapshot.deadline_ns
    await run.stop()
    assert not run.daemon.hardware.sim.rail_file_state()
    run2 = await start_daemon(state_dir=state)
    d = run2.daemon
    assert d.machine.state is State.LIVE
    assert d.machine.snapshot.deadline_ns == deadline
    assert not d.guard.rail_on  # waits for the link
    d.submit(LinkChanged(True))
    await wait_for(lambda: d.guard.rail_on)
    assert d.guard.until_ns == deadline
    assert "call_interrupted" in event_kinds(state)


async def test_restart_after_deadline_never_powers(start_daemon, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    started = BootClock().boot_ns() - 61 * NS_PER_S  # the deadline passed while we were down
    g = make_grant(started, 60)
    snap = Snapshot(State.LIVE, g, started_ns=started, deadline_ns=started + 60 * NS_PER_S)
    StateFile(state).save(snap, boot_id())
    run = await start_daemon(state_dir=state)
    d = run.daemon
    d.submit(LinkChanged(True))
    await wait_for(lambda: d.machine.state is State.ENDED)
    assert not d.guard.rail_on and d.guard.last_cut is None


async def test_restart_after_reboot_ends_session(start_daemon, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    now = BootClock().boot_ns()
    g = make_grant(now, 60)
    snap = Snapshot(State.LIVE, g, started_ns=now, deadline_ns=now + 60 * NS_PER_S)
    StateFile(state).save(snap, "a-previous-boot")
    run = await start_daemon(state_dir=state)
    d = run.daemon
    assert d.machine.state is State.ENDED and d.machine.snapshot.end_reason == "reboot"
    d.submit(LinkChanged(True))
    await wait_for(d._queue.empty)
    assert not d.guard.rail_on


async def test_corrupt_state_file_fails_closed(start_daemon, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "session.json").write_text("{not json")
    run = await start_daemon(state_dir=state)
    assert run.daemon.machine.state is State.IDLE and not run.daemon.guard.rail_on
    await run.stop()
    assert "state_file_corrupt" in event_kinds(state)
    # and it was rewritten, valid
    assert json.loads((state / "session.json").read_text())["snapshot"]["state"] == "idle"


async def test_unexpected_error_cuts_first_and_records_it(start_daemon, tmp_path: Path) -> None:
    """Invariant 4: an error inside the core cuts the rail before the daemon fails."""
    run = await start_daemon()
    d = run.daemon
    await start_live_call(d, 30)

    def broken_save(*args: object) -> None:
        raise OSError(28, "No space left on device")

    d.state_file.save = broken_save  # type: ignore[method-assign]
    d.submit(EndByServer("call-1"))  # ends the call: the machine persists, which fails
    with pytest.raises(ExceptionGroup) as exc:
        await run.task
    assert exc.group_contains(OSError)
    assert not d.hardware.sim.rail_file_state()
    store = EventStore(tmp_path / "state" / "events.sqlite")
    cuts = [e.fields for e in store.all() if e.kind == "rail_cut"]
    store.close()
    assert cuts and cuts[0]["reason"] == "server_end"  # the machine's own cut came first


async def test_error_before_the_cut_is_cut_by_the_emergency_path(start_daemon,
                                                                  tmp_path: Path) -> None:
    run = await start_daemon()
    d = run.daemon
    await start_live_call(d, 30)

    def broken_handle(inp: object, now: int) -> list[object]:
        raise RuntimeError("bug in the machine")

    d.machine.handle = broken_handle  # type: ignore[method-assign,assignment]
    d.submit(Tick())
    with pytest.raises(ExceptionGroup):
        await run.task
    assert not d.hardware.sim.rail_file_state()
    store = EventStore(tmp_path / "state" / "events.sqlite")
    cuts = [e.fields for e in store.all() if e.kind == "rail_cut"]
    store.close()
    assert cuts == [{"by": "loop", "lateness_ms": None, "reason": "internal_error",
                     "session_id": "call-1"}]
