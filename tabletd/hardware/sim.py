"""Simulated hardware: gpiozero's own MockFactory, wired like the reference board.

The rail-sense pin follows the rail-enable pin, as the real sense circuit does, unless a
fault is injected (``stuck_on``, ``stuck_off``). The rail level is also mirrored to a file,
``<state dir>/sim/rail``, because on a real board the rail is visible to every process: that
is how ``tabletd cutoff`` (another process) and the systemd tests see and cut it.

Test verbs: :meth:`SimWorld.set_sense_fault`, :meth:`SimWorld.set_privacy`,
:meth:`SimWorld.set_tamper_open`, :meth:`SimWorld.rail_file_state`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gpiozero.pins.mock import MockFactory, MockPin

from tabletd.config import Config, SenseFault
from tabletd.session import Grant, GrantReceived, Input, LinkChanged, StartCall

_S = 1_000_000_000


class SimRailPin(MockPin):  # type: ignore[misc]  # gpiozero ships no type information
    """The rail-enable pin: each change is propagated to the world at once."""

    def __init__(self, factory: Any, info: Any, world: SimWorld) -> None:
        super().__init__(factory, info)
        self.world = world

    def _change_state(self, value: bool) -> bool:
        changed = bool(super()._change_state(value))
        if changed:
            self.world.rail_changed(value)
        return changed


class SimWorld:
    """The simulated board around the pins; owns the MockFactory the devices are built on."""

    def __init__(self, cfg: Config, state_dir: Path) -> None:
        self.cfg = cfg
        self.dir = state_dir / "sim"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.factory = MockFactory()
        g = cfg.gpio
        self.sense_pin: MockPin = self.factory.pin(g.rail_sense)
        self.enable_pin: SimRailPin = self.factory.pin(
            g.rail_enable, pin_class=SimRailPin, world=self
        )
        self.privacy_pin: MockPin = self.factory.pin(g.privacy)
        self.tamper_pin: MockPin = self.factory.pin(g.tamper)
        self._fault: SenseFault = cfg.sim.sense_fault
        # Opened once; each change is one pwrite of a fixed-length value, no rename and no
        # flush: the mirror runs inside the cut, and must cost next to nothing there.
        self._rail_fd = os.open(self.dir / "rail", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        # Whoever opens the hardware cuts the rail first: so does the simulated board.
        self._write_rail(False)

    # ---- called once the gpiozero devices exist (they set the pulls) ---------------------

    def settle(self) -> None:
        """Put the switches where the config says and the sense where the fault says."""
        self.set_privacy(self.cfg.sim.privacy_engaged)
        self.set_tamper_open(self.cfg.sim.tamper_open)
        self.set_sense_fault(self._fault)

    # ---- test verbs ---------------------------------------------------------------------

    def set_sense_fault(self, fault: SenseFault) -> None:
        self._fault = fault
        self._drive_sense(bool(self.enable_pin.state))

    def set_privacy(self, engaged: bool) -> None:
        """Closed switch (driven low) = camera forbidden."""
        if engaged:
            self.privacy_pin.drive_low()
        else:
            self.privacy_pin.drive_high()

    def set_tamper_open(self, opened: bool) -> None:
        """The case holds the tamper switch closed (low); opened, the pull-up reads high."""
        if opened:
            self.tamper_pin.drive_high()
        else:
            self.tamper_pin.drive_low()

    def rail_file_state(self) -> bool:
        return rail_file_state(self.dir)

    def close(self) -> None:
        os.close(self._rail_fd)

    # ---- the circuit ----------------------------------------------------------------------

    def rail_changed(self, on: bool) -> None:
        self._drive_sense(on)
        self._write_rail(on)

    def _drive_sense(self, rail_on: bool) -> None:
        level = {"none": rail_on, "stuck_on": True, "stuck_off": False}[self._fault]
        if level:
            self.sense_pin.drive_high()
        else:
            self.sense_pin.drive_low()

    def _write_rail(self, on: bool) -> None:
        os.pwrite(self._rail_fd, b"on \n" if on else b"off\n", 0)

    # ---- the stand-in for the central server ------------------------------------------------

    def scripted_inputs(self, now: int, boot: str) -> list[Input]:
        """With ``[sim] self_grant_s`` set, one call of that length, once per boot."""
        seconds = self.cfg.sim.self_grant_s
        marker = self.dir / f"self-grant.{boot}"
        if seconds <= 0 or marker.exists():
            return []
        marker.touch()
        session_id = f"sim-{boot[:8]}"
        grant = Grant(
            session_id=session_id,
            device_id=self.cfg.device.id,
            contact_label="simulated relative",
            not_before_ns=now - _S,
            not_after_ns=now + (seconds + 60) * _S,
            max_duration_ns=seconds * _S,
        )
        return [LinkChanged(True), GrantReceived(grant), StartCall(session_id)]


def rail_file_state(sim_dir: Path) -> bool:
    """The simulated rail level as another process sees it."""
    return (sim_dir / "rail").read_text(encoding="ascii").strip() == "on"
