"""Configuration: one TOML file into frozen, typed objects.

Unknown keys are errors: a typo in a safety setting must never fall back silently to a
default. Every problem names the file, the key and what is wrong, and all problems are
reported at once (``tabletd check-config`` exits 78, EX_CONFIG, with them).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from tabletd.errors import ConfigError
from tabletd.link.grants import GrantKeyError, load_public_key

Backend = Literal["gpio", "sim"]
SenseFault = Literal["none", "stuck_on", "stuck_off"]
LogLevel = Literal["debug", "info", "warning", "error"]


def _bounds(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"lo": lo, "hi": hi}


@dataclass(frozen=True)
class DeviceConfig:
    """Who this tablet is."""

    id: str = field(metadata={"pattern": "id"})


@dataclass(frozen=True)
class HardwareConfig:
    """Which backend drives the pins; chosen here and nowhere else."""

    backend: Backend = "gpio"


@dataclass(frozen=True)
class GpioConfig:
    """BCM pin numbers (BRIEF, reference hardware) and the closed-loop sense timing."""

    rail_enable: int = field(default=17, metadata=_bounds(0, 53))
    rail_sense: int = field(default=27, metadata=_bounds(0, 53))
    privacy: int = field(default=22, metadata=_bounds(0, 53))
    tamper: int = field(default=23, metadata=_bounds(0, 53))
    led_red: int = field(default=5, metadata=_bounds(0, 53))
    led_green: int = field(default=6, metadata=_bounds(0, 53))
    led_blue: int = field(default=13, metadata=_bounds(0, 53))
    sense_timeout_ms: int = field(default=50, metadata=_bounds(1, 50))
    sense_poll_ms: int = field(default=500, metadata=_bounds(10, 5000))


@dataclass(frozen=True)
class BacklightConfig:
    """``path`` is a ``bl_power`` file, or "auto" for the first one under /sys/class/backlight."""

    path: str = "auto"


@dataclass(frozen=True)
class SessionConfig:
    """Call policy."""

    link_grace_s: float = field(default=10.0, metadata=_bounds(0, 60))
    calls_while_docked: bool = False


@dataclass(frozen=True)
class EnforcementConfig:
    """The enforcement thread (layer b)."""

    realtime_priority: int = field(default=10, metadata=_bounds(0, 99))


@dataclass(frozen=True)
class WatchdogConfig:
    """``device`` is the hardware watchdog to pet (layer d); empty disables it."""

    device: str = ""
    timeout_s: int = field(default=15, metadata=_bounds(1, 15))


@dataclass(frozen=True)
class LinkConfig:
    """The central link (``docs/protocol.md``). An empty ``url`` means no link: the tablet
    then never receives a grant, so its rail stays off."""

    url: str = ""
    ca_file: str = ""  # the pinned CA: the server's certificate must chain to it, only it
    cert_file: str = ""  # this device's certificate (CN = device id)
    key_file: str = ""  # this device's private key
    grant_public_key: str = ""  # Ed25519, 32 raw bytes in base64
    insecure_dev: bool = False  # allow ws:// (development only; logged at every connect)
    ping_interval_s: float = field(default=10.0, metadata=_bounds(1, 15))
    ping_timeout_s: float = field(default=10.0, metadata=_bounds(1, 10))
    backoff_base_s: float = field(default=1.0, metadata=_bounds(0.01, 60))
    backoff_cap_s: float = field(default=60.0, metadata=_bounds(0.1, 3600))
    max_rtt_ms: int = field(default=2000, metadata=_bounds(1, 10000))
    window: int = field(default=64, metadata=_bounds(1, 1000))


@dataclass(frozen=True)
class MediaConfig:
    """Camera and microphone while a call is live (``docs/protocol.md`` section 6)."""

    width: int = field(default=1280, metadata=_bounds(160, 1920))
    height: int = field(default=720, metadata=_bounds(120, 1080))
    fps: int = field(default=25, metadata=_bounds(1, 30))
    bitrate: int = field(default=1_500_000, metadata=_bounds(100_000, 8_000_000))
    audio: bool = True
    # at least a few 720p keyframes: a queue smaller than one would drop every keyframe
    uplink_max_bytes: int = field(default=524_288, metadata=_bounds(262_144, 8_388_608))
    frame_timeout_s: float = field(default=3.0, metadata=_bounds(0.5, 30))


@dataclass(frozen=True)
class McuConfig:
    """The power/dock microcontroller on a UART (``docs/mcu-protocol.md``). An empty
    ``port`` means none (development machines)."""

    port: str = ""
    lease_ms: int = field(default=1000, metadata=_bounds(100, 2000))


PowerOffAction = Literal["systemd", "exit"]


@dataclass(frozen=True)
class PowerConfig:
    """Battery policy (``tabletd/power.py``): thresholds in percent of charge.

    ``poweroff`` is what the orderly shutdown at critical battery ends with: "systemd" asks
    systemd to power the tablet off (``systemctl poweroff``, allowed to the daemon's user by
    a polkit rule); "exit" only stops the daemon (simulated hardware, development)."""

    low_battery_pct: int = field(default=15, metadata=_bounds(1, 50))
    critical_battery_pct: int = field(default=5, metadata=_bounds(1, 30))
    hysteresis_pct: int = field(default=3, metadata=_bounds(1, 20))
    critical_hold_s: float = field(default=3.0, metadata=_bounds(0, 60))
    telemetry_interval_s: float = field(default=300.0, metadata=_bounds(1, 86400))
    shutdown_flush_s: float = field(default=5.0, metadata=_bounds(0, 60))
    power_cut_delay_s: int = field(default=60, metadata=_bounds(10, 600))
    poweroff: PowerOffAction = "systemd"


UiLanguage = Literal["fr", "en"]


@dataclass(frozen=True)
class UiConfig:
    """The tablet's screen (``docs/ui.md``): the language its texts are shown in."""

    language: UiLanguage = "fr"


@dataclass(frozen=True)
class StatusApiConfig:
    """The local, read-only status API. Loopback addresses only."""

    host: str = "127.0.0.1"
    port: int = field(default=8470, metadata=_bounds(0, 65535))


@dataclass(frozen=True)
class LoggingConfig:
    level: LogLevel = "info"


@dataclass(frozen=True)
class PathsConfig:
    """Where state lives; ``--state-dir`` and systemd's $STATE_DIRECTORY take precedence."""

    state_dir: str = "/var/lib/tabletd"
    # The provisioned identity (``tabletd provision``): merged over this file when it exists;
    # it may set only OVERLAY_KEYS. "" = none. Absent file = not provisioned.
    overlay: str = ""


@dataclass(frozen=True)
class SimConfig:
    """Simulated hardware only (``hardware.backend = "sim"``).

    ``self_grant_s`` > 0 makes the simulated world hand the daemon one call of that length,
    once per boot, standing in for the central server until the link exists. ``mcu`` = true
    makes the daemon start the simulated power/dock MCU (``python -m tabletd.mcu.sim``, a
    child process on a pty, tied to the daemon's life) and talk to it as to the real one.
    """

    sense_fault: SenseFault = "none"
    privacy_engaged: bool = False
    tamper_open: bool = False
    self_grant_s: int = field(default=0, metadata=_bounds(0, 86400))
    mcu: bool = False


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``source`` is the file it came from (for messages)."""

    device: DeviceConfig
    hardware: HardwareConfig = HardwareConfig()
    gpio: GpioConfig = GpioConfig()
    backlight: BacklightConfig = BacklightConfig()
    session: SessionConfig = SessionConfig()
    enforcement: EnforcementConfig = EnforcementConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    link: LinkConfig = LinkConfig()
    media: MediaConfig = MediaConfig()
    mcu: McuConfig = McuConfig()
    power: PowerConfig = PowerConfig()
    status_api: StatusApiConfig = StatusApiConfig()
    ui: UiConfig = UiConfig()
    logging: LoggingConfig = LoggingConfig()
    paths: PathsConfig = PathsConfig()
    sim: SimConfig = SimConfig()
    source: str = field(default="<defaults>", metadata={"internal": True})


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _check_scalar(where: str, key: str, f: dataclasses.Field[Any], value: Any) -> list[str]:
    """Type and bounds of one value; returns the problems found."""
    expected = f.type
    problems: list[str] = []
    if isinstance(expected, str):  # postponed annotations: resolve the few we use
        expected = _TYPES[expected]
    if get_args(expected) and not isinstance(expected, type):
        allowed = get_args(expected)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            problems.append(f"{where}: {key} = {value!r}: must be one of {shown}")
        return problems
    if expected is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: {key} = {value!r}: must be true or false")
        return problems
    if expected is int and (not isinstance(value, int) or isinstance(value, bool)):
        return [f"{where}: {key} = {value!r}: must be an integer"]
    if expected is float and (not isinstance(value, int | float) or isinstance(value, bool)):
        return [f"{where}: {key} = {value!r}: must be a number"]
    if expected is str:
        if not isinstance(value, str):
            return [f"{where}: {key} = {value!r}: must be a string"]
        if f.metadata.get("pattern") == "id" and (not value or not set(value) <= _ID_CHARS):
            problems.append(
                f"{where}: {key} = {value!r}: must be 1+ characters of A-Z a-z 0-9 - _ ."
            )
        return problems
    lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
    if lo is not None and value < lo:
        problems.append(f"{where}: {key} = {value!r}: must be at least {lo}")
    if hi is not None and value > hi:
        problems.append(f"{where}: {key} = {value!r}: must be at most {hi}")
    return problems


_TYPES: dict[str, Any] = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "Backend": Backend,
    "SenseFault": SenseFault,
    "LogLevel": LogLevel,
    "UiLanguage": UiLanguage,
    "PowerOffAction": PowerOffAction,
}


def _section(cls: type[Any], data: Any, where: str, name: str) -> tuple[Any, list[str]]:
    if not isinstance(data, dict):
        return None, [f"{where}: [{name}] must be a table"]
    problems: list[str] = []
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            problems.append(
                f"{where}: [{name}] {key}: unknown key (known: {', '.join(sorted(known))})"
            )
    kwargs: dict[str, Any] = {}
    for key, f in known.items():
        if key in data:
            value = data[key]
            if _TYPES.get(str(f.type)) is float and type(value) is int:
                value = float(value)
            found = _check_scalar(where, f"[{name}] {key}", f, value)
            problems += found
            if not found:
                kwargs[key] = value
        elif f.default is dataclasses.MISSING:
            problems.append(f"{where}: [{name}] {key}: required key is missing")
    if problems:
        return None, problems
    return cls(**kwargs), problems


def parse_config(text: str, source: str) -> Config:
    """Parse and validate a TOML document; raises :class:`ConfigError` listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from exc
    problems = _merge_overlay(raw, source)
    sections: dict[str, Any] = {}
    fields_ = {f.name: f for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    for name in raw:
        if name not in fields_:
            problems.append(
                f"{source}: [{name}]: unknown section (known: {', '.join(sorted(fields_))})"
            )
    for name, f in fields_.items():
        cls = _SECTIONS[name]
        if name in raw:
            value, found = _section(cls, raw[name], source, name)
            problems += found
            if value is not None:
                sections[name] = value
        elif f.default is dataclasses.MISSING:
            problems.append(f"{source}: [{name}]: required section is missing")
    if not problems:
        problems += _cross_checks(sections, source)
    if problems:
        raise ConfigError(problems)
    return Config(**sections, source=source)


OVERLAY_KEYS: dict[str, frozenset[str]] = {
    "device": frozenset({"id"}),
    "link": frozenset({"url", "ca_file", "cert_file", "key_file", "grant_public_key"}),
}
"""What the provisioning overlay may set: the identity and the server, nothing else."""


def _merge_overlay(raw: dict[str, Any], source: str) -> list[str]:
    """Merge ``[paths] overlay`` (if set and present) into ``raw``; returns the problems.

    The overlay is strict: only :data:`OVERLAY_KEYS`, string values, valid TOML; each problem
    names the overlay file. Its values then go through the same checks as the main file's.
    """
    paths = raw.get("paths")
    name = paths.get("overlay", "") if isinstance(paths, dict) else ""
    if not isinstance(name, str) or not name:
        return []  # a non-string is reported by the [paths] section's own check
    if not name.startswith("/"):
        return [f"{source}: [paths] overlay = {name!r}: must be an absolute path"]
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []  # not provisioned: the main file alone
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{name}: cannot read the provisioning overlay: {exc}"]
    try:
        overlay = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [f"{name}: not valid TOML: {exc}"]
    problems: list[str] = []
    for section, table in overlay.items():
        allowed = OVERLAY_KEYS.get(section)
        if allowed is None or not isinstance(table, dict):
            problems.append(f"{name}: [{section}]: not allowed in the provisioning overlay "
                            f"(allowed: {', '.join(sorted(OVERLAY_KEYS))})")
            continue
        for key, value in table.items():
            if key not in allowed:
                problems.append(f"{name}: [{section}] {key}: not allowed in the provisioning "
                                f"overlay (allowed: {', '.join(sorted(allowed))})")
            elif not isinstance(value, str):
                problems.append(f"{name}: [{section}] {key} = {value!r}: must be a string")
            else:
                target = raw.setdefault(section, {})
                if isinstance(target, dict):
                    target[key] = value
    return problems


_SECTIONS: dict[str, type[Any]] = {
    "device": DeviceConfig,
    "hardware": HardwareConfig,
    "gpio": GpioConfig,
    "backlight": BacklightConfig,
    "session": SessionConfig,
    "enforcement": EnforcementConfig,
    "watchdog": WatchdogConfig,
    "link": LinkConfig,
    "media": MediaConfig,
    "mcu": McuConfig,
    "power": PowerConfig,
    "status_api": StatusApiConfig,
    "ui": UiConfig,
    "logging": LoggingConfig,
    "paths": PathsConfig,
    "sim": SimConfig,
}


def _cross_checks(sections: dict[str, Any], source: str) -> list[str]:
    problems: list[str] = []
    api = cast(StatusApiConfig, sections.get("status_api", StatusApiConfig()))
    try:
        if not ipaddress.ip_address(api.host).is_loopback:
            problems.append(
                f"{source}: [status_api] host = {api.host!r}: must be a loopback address "
                "(the status API is never exposed to the network)"
            )
    except ValueError:
        problems.append(
            f"{source}: [status_api] host = {api.host!r}: must be an IP address, e.g. 127.0.0.1"
        )
    link = cast(LinkConfig, sections.get("link", LinkConfig()))
    problems += _link_checks(link, source)
    media = cast(MediaConfig, sections.get("media", MediaConfig()))
    for key in ("width", "height"):
        if getattr(media, key) % 2:
            problems.append(f"{source}: [media] {key} = {getattr(media, key)}: must be even "
                            "(H.264 4:2:0)")
    power = cast(PowerConfig, sections.get("power", PowerConfig()))
    if power.critical_battery_pct >= power.low_battery_pct:
        problems.append(f"{source}: [power] critical_battery_pct = "
                        f"{power.critical_battery_pct}: must be below low_battery_pct "
                        f"({power.low_battery_pct})")
    sim = cast(SimConfig, sections.get("sim", SimConfig()))
    hardware = cast(HardwareConfig, sections.get("hardware", HardwareConfig()))
    if sim.mcu and hardware.backend != "sim":
        problems.append(f"{source}: [sim] mcu = true: only with [hardware] backend = \"sim\"")
    if sim.mcu and cast(McuConfig, sections.get("mcu", McuConfig())).port:
        problems.append(f"{source}: [sim] mcu = true: leave [mcu] port empty (the daemon "
                        "uses the simulated MCU's pty)")
    if link.url and sim.self_grant_s:
        problems.append(f"{source}: [sim] self_grant_s = {sim.self_grant_s}: the simulated "
                        "board stands in for the server only when there is no [link] url")
    gpio = cast(GpioConfig, sections.get("gpio", GpioConfig()))
    pins = {
        name: getattr(gpio, name)
        for name in ("rail_enable", "rail_sense", "privacy", "tamper", "led_red", "led_green",
                     "led_blue")
    }
    seen: dict[int, str] = {}
    for name, pin in pins.items():
        if pin in seen:
            problems.append(
                f"{source}: [gpio] {name} = {pin}: pin already used by [gpio] {seen[pin]}"
            )
        seen[pin] = name
    return problems


def _link_checks(link: LinkConfig, source: str) -> list[str]:
    if not link.url:
        return []
    problems: list[str] = []
    scheme = link.url.split("://", 1)[0] if "://" in link.url else ""
    if scheme not in ("wss", "ws"):
        problems.append(f"{source}: [link] url = {link.url!r}: must start with wss://")
    elif scheme == "ws" and not link.insecure_dev:
        problems.append(f"{source}: [link] url = {link.url!r}: ws:// (no TLS) is refused "
                        "unless [link] insecure_dev = true (development only)")
    needed = ["grant_public_key"] + (["ca_file", "cert_file", "key_file"] if scheme == "wss"
                                     else [])
    for key in needed:
        if not getattr(link, key):
            problems.append(f"{source}: [link] {key}: required when [link] url is set")
    try:
        load_public_key(link.grant_public_key)
    except GrantKeyError as exc:
        problems.append(f"{source}: [link] grant_public_key: {exc}")
    if link.backoff_cap_s < link.backoff_base_s:
        problems.append(f"{source}: [link] backoff_cap_s = {link.backoff_cap_s}: must be at "
                        f"least backoff_base_s ({link.backoff_base_s})")
    return problems


def load_config(path: str | Path) -> Config:
    """Read and validate a configuration file; raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{p}: not UTF-8 text: {exc}"]) from exc
    return parse_config(text, str(p))
