"""The screen backlight through sysfs ``bl_power`` (0 = on, 4 = FB_BLANK_POWERDOWN)."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from tabletd.errors import HardwareError

log = logging.getLogger(__name__)

BL_ON = "0"
BL_OFF = "4"


def find_backlight(setting: str) -> Path | None:
    """Resolve the configured path: "auto" picks the first device under /sys/class/backlight."""
    if setting != "auto":
        return Path(setting)
    found = sorted(glob.glob("/sys/class/backlight/*/bl_power"))
    return Path(found[0]) if found else None


class Backlight:
    """Writes ``bl_power``. With no device (a headless board) it logs once and does nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is None:
            log.warning("no backlight device found under /sys/class/backlight; screen blanking off")

    def set(self, on: bool) -> None:
        """Raises :class:`HardwareError` naming the file when the write fails."""
        if self.path is None:
            return
        try:
            self.path.write_text(BL_ON if on else BL_OFF, encoding="ascii")
        except OSError as exc:
            raise HardwareError(f"backlight {self.path}: cannot write: {exc.strerror}") from exc

    @property
    def on(self) -> bool | None:
        if self.path is None:
            return None
        try:
            return self.path.read_text(encoding="ascii").strip() == BL_ON
        except OSError:
            return None
