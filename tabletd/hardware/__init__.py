"""Hardware behind narrow interfaces; the backend is chosen here and nowhere else.

``gpio`` uses gpiozero's default pin factory (the real pins); ``sim`` builds the same
devices on gpiozero's own MockFactory inside a :class:`~tabletd.hardware.sim.SimWorld`.
Business code receives a :class:`Hardware` and never asks which backend it is.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabletd.config import Config
from tabletd.errors import HardwareError
from tabletd.hardware.backlight import Backlight, find_backlight
from tabletd.hardware.camera import (
    AlsaMicrophone,
    MediaSource,
    Picamera2Camera,
    SimCamera,
    SimMicrophone,
)
from tabletd.hardware.inputs import Switch
from tabletd.hardware.led import StatusLed
from tabletd.hardware.rail import KillSwitch
from tabletd.hardware.sim import SimWorld
from tabletd.session import Input

log = logging.getLogger(__name__)


@dataclass
class Hardware:
    rail: KillSwitch
    privacy: Switch
    tamper: Switch
    led: StatusLed
    backlight: Backlight
    sim: SimWorld | None  # test verbs; None on real pins

    def scripted_inputs(self, now: int, boot: str) -> list[Input]:
        """Inputs the board itself produces at start (only the simulated board has any)."""
        return self.sim.scripted_inputs(now, boot) if self.sim is not None else []

    def close(self) -> None:
        """Rail off first, then release everything; each step isolated (like a shutdown)."""
        for part in (self.rail, self.privacy, self.tamper, self.led):
            try:
                part.close()
            except Exception:
                log.exception("closing %s failed", type(part).__name__)
        if self.sim is not None:
            self.sim.close()


def open_media(cfg: Config) -> tuple[MediaSource, MediaSource | None]:
    """The camera and (when ``[media] audio``) the microphone, not started: they start only
    once the rail is on, and stop after it is cut."""
    m = cfg.media
    camera: MediaSource
    microphone: MediaSource | None
    if cfg.hardware.backend == "sim":
        camera = SimCamera(m.width, m.height, m.fps, m.bitrate,
                           frame_timeout_s=m.frame_timeout_s)
        microphone = SimMicrophone() if m.audio else None
    else:
        camera = Picamera2Camera(m.width, m.height, m.fps, m.bitrate,
                                 frame_timeout_s=m.frame_timeout_s)
        microphone = AlsaMicrophone() if m.audio else None
    return camera, microphone


def open_rail(cfg: Config, state_dir: Path) -> tuple[KillSwitch, SimWorld | None]:
    """Claim the rail lines, driving enable low at once: the first thing every process does."""
    world, factory = _factory(cfg, state_dir)
    try:
        rail = KillSwitch(cfg.gpio.rail_enable, cfg.gpio.rail_sense, factory)
    except Exception as exc:
        raise HardwareError(
            f"cannot claim rail GPIO{cfg.gpio.rail_enable}/GPIO{cfg.gpio.rail_sense}: {exc}"
        ) from exc
    if world is not None:
        world.set_sense_fault(cfg.sim.sense_fault)
    return rail, world


def open_hardware(cfg: Config, state_dir: Path) -> Hardware:
    """Open every part, the rail first (and off). Raises :class:`HardwareError`."""
    rail, world = open_rail(cfg, state_dir)
    factory = world.factory if world is not None else None
    g = cfg.gpio
    opened: list[Any] = [rail]
    try:
        privacy = Switch(g.privacy, factory, active_when_closed=True)
        opened.append(privacy)
        tamper = Switch(g.tamper, factory, active_when_closed=False)
        opened.append(tamper)
        led = StatusLed(g.led_red, g.led_green, g.led_blue, factory)
        opened.append(led)
    except Exception as exc:
        for part in reversed(opened):
            with contextlib.suppress(Exception):
                part.close()
        raise HardwareError(f"cannot open GPIO inputs/LED: {exc}") from exc
    if world is not None:
        world.settle()
    backlight = open_backlight(cfg, world)
    return Hardware(rail, privacy, tamper, led, backlight, world)


def _factory(cfg: Config, state_dir: Path) -> tuple[SimWorld | None, Any]:
    if cfg.hardware.backend == "sim":
        world = SimWorld(cfg, state_dir)
        return world, world.factory
    return None, None  # gpiozero's default factory: the real pins


def open_backlight(cfg: Config, world: SimWorld | None) -> Backlight:
    """The configured backlight; "auto" on the simulated board is its own file."""
    if world is not None and cfg.backlight.path == "auto":
        return Backlight(world.dir / "bl_power")
    return Backlight(find_backlight(cfg.backlight.path))
