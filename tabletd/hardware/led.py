"""The RGB status LED (plain on/off channels: no PWM needed for five colours)."""

from __future__ import annotations

from typing import Any

from gpiozero import RGBLED

from tabletd.session import LedColour

_RGB: dict[LedColour, tuple[int, int, int]] = {
    LedColour.OFF: (0, 0, 0),
    LedColour.BLUE: (0, 0, 1),
    LedColour.GREEN: (0, 1, 0),
    LedColour.AMBER: (1, 1, 0),
    LedColour.RED: (1, 0, 0),
}


class StatusLed:
    def __init__(self, red: int, green: int, blue: int, factory: Any) -> None:
        self._led = RGBLED(red, green, blue, pwm=False, pin_factory=factory)

    def show(self, colour: LedColour) -> None:
        self._led.value = _RGB[colour]

    @property
    def colour(self) -> LedColour:
        rgb = tuple(int(v) for v in self._led.value)
        return next(c for c, v in _RGB.items() if v == rgb)

    def close(self) -> None:
        self._led.close()
