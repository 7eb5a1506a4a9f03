"""Switches the detainee or the case operate: privacy (camera forbidden) and tamper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpiozero import DigitalInputDevice


class Switch:
    """A switch to ground on a pulled-up input; ``active_when_closed`` says which position
    means "active": the privacy switch is active closed, the tamper switch active open
    (it is held closed by the case).

    ``on_change(active)`` is called from gpiozero's own thread: it must only hand over.
    """

    def __init__(self, pin: int, factory: Any, *, active_when_closed: bool) -> None:
        # DigitalInputDevice, not Button: Button's "held" thread wakes ten times a second
        # and delays close() by up to a second. Pulled up: closed (to ground) = active.
        self._button = DigitalInputDevice(pin, pull_up=True, pin_factory=factory)
        self._active_when_closed = active_when_closed
        self._callback: Callable[[bool], None] | None = None

    @property
    def active(self) -> bool:
        return bool(self._button.is_active) == self._active_when_closed

    def on_change(self, callback: Callable[[bool], None]) -> None:
        self._callback = callback
        self._button.when_activated = self._changed
        self._button.when_deactivated = self._changed

    def _changed(self) -> None:
        if self._callback is not None:
            self._callback(self.active)

    def close(self) -> None:
        self._button.close()
