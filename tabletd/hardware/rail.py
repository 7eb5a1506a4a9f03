"""The camera/microphone power rail: the enable output and its sense input.

Only :class:`tabletd.watchdog.RailGuard` drives this object; everything else asks the guard.
The enable line is active high and pulled down in hardware, so a released line, a crashed
process or a reset SoC all leave the rail off (BRIEF invariant 3, last layer).
"""

from __future__ import annotations

from typing import Any

from gpiozero import DigitalInputDevice, DigitalOutputDevice


class KillSwitch:
    """Rail enable (output, initially off) and rail sense (input) on gpiozero devices.

    ``factory`` is a gpiozero pin factory (None: gpiozero's default, the real pins).
    """

    def __init__(self, enable_pin: int, sense_pin: int, factory: Any) -> None:
        # initial_value=False: the line is driven low from the moment it is claimed.
        self._enable = DigitalOutputDevice(
            enable_pin, active_high=True, initial_value=False, pin_factory=factory
        )
        try:
            self._sense = DigitalInputDevice(sense_pin, pull_up=False, pin_factory=factory)
        except Exception:
            self._enable.close()
            raise

    def drive(self, on: bool) -> None:
        """Set the enable line. Callers must hold the guard's lock."""
        self._enable.value = on

    @property
    def commanded(self) -> bool:
        return bool(self._enable.value)

    @property
    def sensed(self) -> bool:
        """True when the rail is actually powered, as the sense input reads it."""
        return bool(self._sense.value)

    def close(self) -> None:
        """Drive the rail off and release both lines (the pull-down then holds it off)."""
        try:
            self._enable.off()
        finally:
            self._enable.close()
            self._sense.close()
