"""Configuration: strict, typed, every problem named with file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tabletd.cli import main
from tabletd.config import load_config, parse_config
from tabletd.errors import ConfigError

from .conftest import REPO

MINIMAL = '[device]\nid = "t1"\n'


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "f.toml")
    return exc.value.problems


@pytest.mark.parametrize("name", ["tabletd.toml", "sim.toml"])
def test_shipped_configs_are_valid(name: str) -> None:
    cfg = load_config(REPO / "config" / name)
    assert cfg.device.id


def test_defaults() -> None:
    cfg = parse_config(MINIMAL, "f.toml")
    assert cfg.gpio.rail_enable == 17 and cfg.gpio.rail_sense == 27
    assert cfg.session.link_grace_s == 10.0 and cfg.hardware.backend == "gpio"
    assert cfg.status_api.host == "127.0.0.1"


def test_unknown_key_is_an_error_naming_file_section_key() -> None:
    (p,) = problems(MINIMAL + "[session]\nlink_grace = 5\n")
    assert p.startswith("f.toml: [session] link_grace: unknown key")
    assert "link_grace_s" in p  # says what is known


def test_unknown_section() -> None:
    (p,) = problems(MINIMAL + "[sesion]\n")
    assert "[sesion]: unknown section" in p


def test_every_problem_reported_at_once() -> None:
    ps = problems('[device]\nid = ""\n[gpio]\nrail_enable = "17"\nsense_timeout_ms = 500\n'
                  '[hardware]\nbackend = "real"\n')
    text = "\n".join(ps)
    assert "[device] id" in text
    assert "[gpio] rail_enable = '17': must be an integer" in text
    assert "[gpio] sense_timeout_ms = 500: must be at most 50" in text
    assert "[hardware] backend = 'real': must be one of 'gpio', 'sim'" in text


def test_types() -> None:
    assert "must be true or false" in problems(MINIMAL + "[session]\ncalls_while_docked = 1\n")[0]
    assert "must be a number" in problems(MINIMAL + "[session]\nlink_grace_s = true\n")[0]
    cfg = parse_config(MINIMAL + "[session]\nlink_grace_s = 3\n", "f.toml")
    assert cfg.session.link_grace_s == 3.0 and isinstance(cfg.session.link_grace_s, float)


def test_status_api_must_be_loopback() -> None:
    assert "must be a loopback address" in problems(
        MINIMAL + '[status_api]\nhost = "0.0.0.0"\n')[0]
    assert "must be an IP address" in problems(MINIMAL + '[status_api]\nhost = "lo"\n')[0]
    parse_config(MINIMAL + '[status_api]\nhost = "::1"\n', "f.toml")


def test_pins_must_not_collide() -> None:
    (p,) = problems(MINIMAL + "[gpio]\nprivacy = 17\n")
    assert "[gpio] privacy = 17: pin already used by [gpio] rail_enable" in p


def test_missing_device_and_bad_toml() -> None:
    assert "[device]: required section is missing" in problems("")[0]
    assert "not valid TOML" in problems("[device\n")[0]
    assert "required key is missing" in problems("[device]\n")[0]


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    assert main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + "[watchdog]\ntimeout_s = 60\ndevise = 'x'\n")
    assert main(["check-config", str(bad)]) == 78
    err = capsys.readouterr().err
    assert f"{bad}: [watchdog] timeout_s = 60: must be at most 15" in err
    assert f"{bad}: [watchdog] devise: unknown key" in err
    assert main(["check-config", str(tmp_path / "missing.toml")]) == 78
    assert "cannot read" in capsys.readouterr().err
    assert main(["run", "--config", str(bad)]) == 78
