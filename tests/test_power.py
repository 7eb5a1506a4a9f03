"""The battery policy (tabletd/power.py): examples, then a hypothesis model of any sequence
of readings."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tabletd.config import PowerConfig
from tabletd.mcu.codec import ChargingState, Status
from tabletd.power import Critical, PowerAction, PowerMonitor, PowerRecord

S = 1_000_000_000
CFG = PowerConfig(critical_hold_s=3.0, telemetry_interval_s=60.0)


def status(pct: int, charging: ChargingState = ChargingState.NOT_CHARGING,
           fault: bool = False) -> Status:
    return Status(battery_mv=3500 + pct * 7, battery_pct=pct, charging=charging,
                  charger_fault=fault, temperature_dc=250, docked=charging is not
                  ChargingState.NOT_CHARGING, dock_bay=2 if charging else 0,
                  rail_measured=False, lease_remaining_ms=0)


def kinds(actions: list[PowerAction]) -> list[str]:
    return [a.kind if isinstance(a, PowerRecord) else type(a).__name__ for a in actions]


def test_low_battery_warns_once_until_recharged() -> None:
    m = PowerMonitor(CFG)
    assert kinds(m.update(status(16), 0)) == ["battery"]
    assert kinds(m.update(status(15), S)) == ["battery_low"]
    assert kinds(m.update(status(14), 2 * S)) == []
    assert kinds(m.update(status(17), 3 * S)) == []  # inside the hysteresis: still low
    assert m.low
    m.update(status(18), 4 * S)
    assert not m.low
    assert kinds(m.update(status(15), 5 * S)) == ["battery_low"]


def test_critical_must_hold_then_ends_calls_and_shuts_down_once() -> None:
    m = PowerMonitor(CFG)
    m.update(status(30), 0)
    assert kinds(m.update(status(5), S)) == ["battery_low"]
    assert kinds(m.update(status(5), 3 * S)) == []  # held 2 s of 3
    actions = m.update(status(4), 4 * S)
    assert actions == [Critical(4)]
    assert kinds(m.update(status(4), 5 * S)) == []
    m.update(status(9), 6 * S)  # recovers (a charger): the shutdown is not asked again,
    assert m.critical  # and critical stays: the MCU holds POWER_OFF, no call may start
    assert Critical(3) not in m.update(status(3), 20 * S)


def test_one_sagging_reading_does_not_shut_down() -> None:
    m = PowerMonitor(CFG)
    m.update(status(30), 0)
    m.update(status(4), S)  # a sag under load
    m.update(status(8), 2 * S)
    assert kinds(m.update(status(4), 5 * S)) == []  # the hold starts again here
    assert not m.critical


def test_on_the_charger_a_critical_battery_does_not_shut_down() -> None:
    m = PowerMonitor(CFG)
    for t in range(10):
        actions = m.update(status(3, ChargingState.CHARGING), t * S)
        assert not any(isinstance(a, Critical) for a in actions)


def test_telemetry_on_change_and_on_interval() -> None:
    m = PowerMonitor(CFG)
    assert kinds(m.update(status(50), 0)) == ["battery"]
    assert kinds(m.update(status(50), 59 * S)) == []
    assert kinds(m.update(status(50, ChargingState.CHARGING), 59 * S + 1)) == ["battery"]
    assert kinds(m.update(status(50, ChargingState.CHARGING, fault=True), 70 * S)) == [
        "battery", "charger_fault"]
    assert kinds(m.update(status(50, ChargingState.CHARGING, fault=True), 200 * S)) == [
        "battery"]
    record = m.update(status(50), 201 * S)[0]
    assert isinstance(record, PowerRecord)
    assert record.fields == {"pct": 50, "mv": 3850, "charging": "not_charging",
                             "charger_fault": False, "temperature_c": 25.0}


class PowerModel(RuleBasedStateMachine):
    """Any readings, any timing: shutdown at most once and only after a sustained critical
    drain; critical flips alternate, and stays once the shutdown is asked."""

    @initialize(hold=st.floats(0, 10), low=st.integers(10, 30), critical=st.integers(1, 9))
    def setup(self, hold: float, low: int, critical: int) -> None:
        self.cfg = PowerConfig(low_battery_pct=low, critical_battery_pct=critical,
                               critical_hold_s=hold, telemetry_interval_s=30)
        self.m = PowerMonitor(self.cfg)
        self.now = 0
        self.critical = False
        self.shutdowns = 0
        self.drain_since: int | None = None  # start of the current critical drain streak
        self.last_telemetry: int | None = None
        self.seen: list[Any] = []

    @rule(pct=st.integers(0, 100), charging=st.sampled_from(ChargingState),
          fault=st.booleans(), dt=st.integers(0, 40 * S))
    def reading(self, pct: int, charging: ChargingState, fault: bool, dt: int) -> None:
        self.now += dt
        draining_critical = (charging is ChargingState.NOT_CHARGING
                             and pct <= self.cfg.critical_battery_pct)
        if not draining_critical:
            self.drain_since = None
        elif self.drain_since is None:
            self.drain_since = self.now
        actions = self.m.update(status(pct, charging, fault), self.now)
        for a in actions:
            if isinstance(a, Critical):  # critical, and the shutdown with it
                self.critical = True
                self.shutdowns += 1
                assert self.drain_since is not None, "critical while not draining"
                assert self.now - self.drain_since >= self.cfg.critical_hold_s * S
            elif a.kind == "battery":
                self.last_telemetry = self.now
        assert self.last_telemetry is not None
        assert self.now - self.last_telemetry <= self.cfg.telemetry_interval_s * S

    @invariant()
    def at_most_one_shutdown(self) -> None:
        assert self.shutdowns <= 1

    @invariant()
    def critical_latched_after_shutdown(self) -> None:
        assert self.shutdowns == 0 or self.m.critical

    @invariant()
    def views_agree(self) -> None:
        assert self.m.critical == self.critical


TestPowerModel = PowerModel.TestCase
