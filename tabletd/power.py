"""Battery and charging policy, sans-I/O: what the daemon does with the MCU's STATUS.

The MCU reports a STATUS at least once a second (``docs/mcu-protocol.md`` section 6.3). Each
one goes through :meth:`PowerMonitor.update`, which returns what to do:

- **Telemetry**: a ``battery`` record every ``telemetry_interval_s``, and at once when the
  charging state or the charger fault changes; telemetry may be dropped by a full outbox.
- **Low battery** (``low_battery_pct``, 15 % by default): one ``battery_low`` record on the
  way down, re-armed once the charge is ``hysteresis_pct`` above the level again. A warning
  only: calls go on.
- **Critical battery** (``critical_battery_pct``, 5 %) while not on external power, held for
  ``critical_hold_s`` so that one sagging reading under load does not end a call: the
  session machine hears ``BatteryChanged(critical=True)`` (a live or booked call ends with
  reason ``low_battery``, no new call starts), then the daemon shuts the tablet down in order
  (:class:`Critical`), once. A tablet put on a charger before the hold ends never shuts down.
  Critical then stays, charger or not: the MCU already holds POWER_OFF and cuts the power at
  its delay, so no call may start again.

Nothing here reads a clock or does I/O; ``now`` is CLOCK_BOOTTIME nanoseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from tabletd.clock import NS_PER_S
from tabletd.config import PowerConfig
from tabletd.mcu.codec import ChargingState, Status


@dataclass(frozen=True)
class PowerRecord:
    """An event for the outbox."""

    kind: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Critical:
    """The battery is critical, once per monitor and for good: tell the session machine
    (``BatteryChanged(critical=True)``: the call ends, none starts), then shut the tablet
    down in order."""

    pct: int


PowerAction: TypeAlias = PowerRecord | Critical


def on_external_power(status: Status) -> bool:
    """Charging, or full on the charger: the battery is not draining."""
    return status.charging is not ChargingState.NOT_CHARGING


def battery_fields(status: Status) -> dict[str, Any]:
    """The battery as records and the status API show it."""
    return {"pct": status.battery_pct, "mv": status.battery_mv,
            "charging": status.charging.name.lower(), "charger_fault": status.charger_fault,
            "temperature_c": status.temperature_dc / 10}


class PowerMonitor:
    def __init__(self, cfg: PowerConfig) -> None:
        self.cfg = cfg
        self.low = False
        self.critical = False  # latched: the shutdown is asked with it
        self._below_since: int | None = None
        self._next_telemetry: int | None = None
        self._last: Status | None = None

    def update(self, status: Status, now: int) -> list[PowerAction]:
        """One STATUS from the MCU, received at ``now``; returns the actions, in order."""
        cfg = self.cfg
        actions: list[PowerAction] = []
        last, self._last = self._last, status
        pct = status.battery_pct
        changed = last is None or (last.charging, last.charger_fault) != (
            status.charging, status.charger_fault)
        if changed or self._next_telemetry is None or now >= self._next_telemetry:
            actions.append(PowerRecord("battery", battery_fields(status)))
            self._next_telemetry = now + int(cfg.telemetry_interval_s * NS_PER_S)
        if status.charger_fault and (last is None or not last.charger_fault):
            actions.append(PowerRecord("charger_fault", battery_fields(status)))

        if not self.low and pct <= cfg.low_battery_pct:
            self.low = True
            actions.append(PowerRecord("battery_low", battery_fields(status)))
        elif self.low and pct >= cfg.low_battery_pct + cfg.hysteresis_pct:
            self.low = False

        if (not self.critical and not on_external_power(status)
                and pct <= cfg.critical_battery_pct):
            if self._below_since is None:
                self._below_since = now
            if now - self._below_since >= cfg.critical_hold_s * NS_PER_S:
                self.critical = True
                actions.append(Critical(pct))
        else:
            self._below_since = None
        return actions
