"""RailGuard: the only owner of the rail, and its enforcement thread (layer b)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tabletd.clock import NS_PER_MS, BootClock
from tabletd.hardware import open_rail
from tabletd.hardware.rail import KillSwitch
from tabletd.hardware.sim import SimWorld
from tabletd.watchdog import CutRecord, RailGuard

from .conftest import FakeClock, sim_config


@pytest.fixture
def rail(tmp_path: Path) -> Iterator[tuple[KillSwitch, SimWorld]]:
    rail, world = open_rail(sim_config(), tmp_path)
    assert world is not None
    yield rail, world
    rail.close()


def test_power_refused_at_or_after_until(rail: tuple[KillSwitch, SimWorld]) -> None:
    clock = FakeClock()
    guard = RailGuard(rail[0], clock)
    assert guard.power(clock.now) is False
    assert guard.power(clock.now - 1) is False
    assert not rail[0].commanded
    assert guard.power(clock.now + 1) is True
    assert rail[0].commanded and rail[1].rail_file_state()


def test_cut_is_idempotent_and_keeps_the_first_record(rail: tuple[KillSwitch, SimWorld]) -> None:
    clock = FakeClock()
    cuts: list[CutRecord] = []
    guard = RailGuard(rail[0], clock, on_cut=cuts.append)
    assert guard.cut("nothing") is None  # never powered
    guard.power(clock.now + 10 * NS_PER_MS)
    clock.advance(0.02)
    first = guard.cut("deadline", due_ns=clock.now - 10 * NS_PER_MS)
    clock.advance(1)
    again = guard.cut("server_end")
    assert first is again and len(cuts) == 1
    assert first is not None and first.lateness_ns == 10 * NS_PER_MS


def test_inhibit_cuts_and_refuses_until_released(rail: tuple[KillSwitch, SimWorld]) -> None:
    clock = FakeClock()
    guard = RailGuard(rail[0], clock)
    guard.power(clock.now + 10**12)
    guard.inhibit("privacy")
    assert not rail[0].commanded
    assert guard.power(clock.now + 10**12) is False
    guard.release("privacy")
    assert guard.power(clock.now + 10**12) is True


def test_thread_cuts_at_until_by_itself(rail: tuple[KillSwitch, SimWorld]) -> None:
    guard = RailGuard(rail[0], BootClock(), sense_timeout_ms=5)
    guard.start()
    try:
        assert guard.wait_first_check(2.0) is None
        until = BootClock().boot_ns() + 30 * NS_PER_MS
        assert guard.power(until, "deadline")
        for _ in range(200):  # bounded poll; nothing but the thread can cut here
            if guard.last_cut is not None:
                break
            time.sleep(0.005)
        cut = guard.last_cut
        assert cut is not None, "the enforcement thread did not cut"
        assert cut.by == "thread" and cut.reason == "deadline" and cut.at_ns >= until
        assert not rail[0].commanded
        assert not rail[1].rail_file_state()
    finally:
        guard.stop()


@pytest.mark.parametrize("fault", ["stuck_on", "stuck_off"])
def test_sense_mismatch_latches_a_fault(rail: tuple[KillSwitch, SimWorld], fault: str) -> None:
    faults: list[str] = []
    guard = RailGuard(rail[0], BootClock(), sense_timeout_ms=5, on_fault=faults.append)
    rail[1].set_sense_fault(fault)  # type: ignore[arg-type]
    guard.start()
    try:
        guard.wait_first_check(2.0)
        if fault == "stuck_off":
            assert guard.power(BootClock().boot_ns() + 10**10)
        for _ in range(200):
            if faults:
                break
            time.sleep(0.005)
        assert faults and guard.fault == faults[0]
        assert not rail[0].commanded
        assert guard.power(BootClock().boot_ns() + 10**10) is False
        assert guard.clear_fault() is (fault == "stuck_off")
    finally:
        guard.stop()
