"""First-boot provisioning: the provisioning file, the config overlay, and `tabletd provision`
end to end against the reference server's enrolment over real TLS on loopback; then the
daemon runs on the provisioned identity."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tabletd import cli as tabletd_cli
from tabletd.config import load_config, parse_config
from tabletd.devserver import ca
from tabletd.devserver import cli as dev_cli
from tabletd.devserver.server import DevServer
from tabletd.errors import ConfigError
from tabletd.provision import (
    ProvisionError,
    parse_provisioning_file,
    provision,
    read_provisioning_file,
)

from .conftest import SIM_CONFIG, wait_for

DEVICE = "tab-prov-1"


@pytest.fixture
async def server(srv_dir: Path) -> AsyncIterator[DevServer]:
    async with DevServer(srv_dir, tick_s=0.02, enrol_port=0) as srv:
        yield srv


def write_file(srv: DevServer, out: Path, device_id: str = DEVICE) -> Path:
    assert dev_cli.main(["provisioning-file", str(srv.directory), device_id, "--out", str(out),
                         "--url", f"wss://127.0.0.1:{srv.port}/",
                         "--enrol-url", f"wss://localhost:{srv.enrol_port}/"]) == 0
    return out


def tablet_config(tmp_path: Path) -> Path:
    """config/sim.toml as the image ships it: [paths] overlay on the data partition."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    text = SIM_CONFIG.read_text().replace(
        'state_dir = "/tmp/tabletd-sim"',
        f'state_dir = "{data}"\noverlay = "{data / "provisioned.toml"}"')
    text = text.replace("port = 8470", "port = 0")
    path = tmp_path / "tabletd.toml"
    path.write_text(text)
    return path


async def test_provision_end_to_end_then_the_daemon_links_up(
        server: DevServer, tmp_path: Path, start_daemon: object) -> None:
    cfg_path = tablet_config(tmp_path)
    before = load_config(cfg_path)
    assert before.link.url == ""  # not provisioned: no link, no calls
    (tmp_path / "boot").mkdir()
    boot = write_file(server, tmp_path / "boot" / "tabletd-provision.toml")
    done = await asyncio.to_thread(provision, before, boot)
    assert done.removed_file and not boot.exists()
    data = tmp_path / "data"
    for name in ("device.key", "device.pem", "ca.pem", "provisioned.toml"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert sorted(p.name for p in data.iterdir()) == [
        "ca.pem", "device.key", "device.pem", "provisioned.toml"]  # no temp file left
    cfg = load_config(cfg_path)
    assert cfg.device.id == DEVICE
    assert cfg.link.url == f"wss://127.0.0.1:{server.port}/"
    assert cfg.link.key_file == str(data / "device.key")
    # The daemon, on the merged configuration, connects with the provisioned identity.
    running = await start_daemon(cfg=cfg, state_dir=data)  # type: ignore[operator]
    await wait_for(lambda: server.connected(DEVICE), within=5)
    await running.stop()


async def test_run_as_root_the_identity_goes_to_the_daemons_user(
        server: DevServer, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving files away is what provisioning does when run as root")
    cfg_path = tablet_config(tmp_path)
    os.chown(tmp_path / "data", 65534, 65534)  # /var/lib/tabletd belongs to tabletd
    (tmp_path / "boot").mkdir()
    boot = write_file(server, tmp_path / "boot" / "p.toml")
    await asyncio.to_thread(provision, load_config(cfg_path), boot)
    for path in (tmp_path / "data").iterdir():
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path


async def test_a_provisioned_tablet_refuses_to_provision_again(
        server: DevServer, tmp_path: Path) -> None:
    cfg_path = tablet_config(tmp_path)
    (tmp_path / "boot").mkdir()
    first = write_file(server, tmp_path / "boot" / "a.toml")
    await asyncio.to_thread(provision, load_config(cfg_path), first)
    overlay_before = (tmp_path / "data" / "provisioned.toml").read_bytes()
    key_before = (tmp_path / "data" / "device.key").read_bytes()
    second = write_file(server, tmp_path / "boot" / "b.toml", "tab-prov-2")
    with pytest.raises(ProvisionError, match="already provisioned"):
        await asyncio.to_thread(provision, load_config(cfg_path), second)
    assert second.exists()  # untouched; the identity too
    assert (tmp_path / "data" / "provisioned.toml").read_bytes() == overlay_before
    assert (tmp_path / "data" / "device.key").read_bytes() == key_before


async def test_a_refused_enrolment_leaves_the_tablet_unprovisioned(
        server: DevServer, tmp_path: Path) -> None:
    cfg_path = tablet_config(tmp_path)
    (tmp_path / "boot").mkdir()
    boot = write_file(server, tmp_path / "boot" / "p.toml")
    pf = read_provisioning_file(boot)
    server.store.consume_token(pf.token, DEVICE, server.now_ms())  # spent elsewhere
    with pytest.raises(ProvisionError, match="token_used"):
        await asyncio.to_thread(provision, load_config(cfg_path), boot)
    assert boot.exists()
    assert list((tmp_path / "data").iterdir()) == []
    assert load_config(cfg_path).link.url == ""


async def test_an_unreachable_server_leaves_the_tablet_unprovisioned(
        server: DevServer, tmp_path: Path) -> None:
    cfg_path = tablet_config(tmp_path)
    (tmp_path / "boot").mkdir()
    boot = write_file(server, tmp_path / "boot" / "p.toml")
    port = server.enrol_port
    await server.stop()
    with pytest.raises(ProvisionError, match=f"enrolment at wss://localhost:{port}/: cannot "
                       "connect"):
        await asyncio.to_thread(provision, load_config(cfg_path), boot)
    assert boot.exists() and list((tmp_path / "data").iterdir()) == []


async def test_an_identity_the_configuration_refuses_is_removed_again(
        server: DevServer, tmp_path: Path) -> None:
    """The overlay is written last, then the merged configuration is read back: a main file
    that cannot take a link (here the simulated board's self-grant) gets no overlay."""
    cfg_path = tablet_config(tmp_path)
    text = cfg_path.read_text()
    cfg_path.write_text(text.replace("[sim]\n", "[sim]\nself_grant_s = 30\n", 1)
                        if "[sim]\n" in text else text + "\n[sim]\nself_grant_s = 30\n")
    (tmp_path / "boot").mkdir()
    boot = write_file(server, tmp_path / "boot" / "p.toml")
    with pytest.raises(ProvisionError) as info:
        await asyncio.to_thread(provision, load_config(cfg_path), boot)
    assert "provisioned.toml: removed again" in info.value.problems[0]
    assert any("self_grant_s" in p for p in info.value.problems)
    assert not (tmp_path / "data" / "provisioned.toml").exists()
    assert load_config(cfg_path).link.url == ""  # not provisioned
    assert boot.exists()


def test_cli_provision_reports_bad_files_and_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = tablet_config(tmp_path)
    bad = tmp_path / "p.toml"
    bad.write_text('format = 1\n[device]\nid = "x y"\n')
    assert tabletd_cli.main(["provision", "--config", str(cfg_path), "--file", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: [server] url: required key is missing" in err
    assert f"{bad}: [enrolment] token: required key is missing" in err
    assert tabletd_cli.main(["provision", "--config", str(cfg_path), "--file",
                             str(tmp_path / "absent.toml")]) == 1
    assert "no provisioning file" in capsys.readouterr().err
    no_overlay = tmp_path / "plain.toml"
    no_overlay.write_text(SIM_CONFIG.read_text())
    assert tabletd_cli.main(["provision", "--config", str(no_overlay), "--file",
                             str(bad)]) == 1
    assert "[paths] overlay is empty" in capsys.readouterr().err


def test_provisioning_needs_the_data_partition(tmp_path: Path, ca_pem: str) -> None:
    cfg = load_config(tablet_config(tmp_path))
    cfg = dataclasses.replace(cfg, paths=dataclasses.replace(
        cfg.paths, overlay=str(tmp_path / "unmounted" / "provisioned.toml")))
    good = tmp_path / "p.toml"
    good.write_text(good_file(ca_pem))
    with pytest.raises(ProvisionError, match="unmounted: no such directory"):
        provision(cfg, good)


# -- the provisioning file ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca_pem(ca_master: Path) -> str:
    return (ca_master / ca.CA_CERT).read_text()


def good_file(ca_pem: str, **over: str) -> str:
    v = {"id": '"tab-1"', "url": '"wss://srv:8443/"', "enrol_url": '"wss://srv:8444/"',
         "key": '"' + "A" * 43 + '="', "ca": f'"""\n{ca_pem}"""', "token": '"' + "t" * 43 + '"',
         "format": "1"} | over
    return (f"format = {v['format']}\n[device]\nid = {v['id']}\n[server]\nurl = {v['url']}\n"
            f"enrol_url = {v['enrol_url']}\ngrant_public_key = {v['key']}\nca = {v['ca']}\n"
            f"[enrolment]\ntoken = {v['token']}\n")


def test_a_good_provisioning_file_parses(ca_pem: str) -> None:
    pf = parse_provisioning_file(good_file(ca_pem), "p.toml")
    assert (pf.device_id, pf.url, pf.enrol_url, pf.token) == (
        "tab-1", "wss://srv:8443/", "wss://srv:8444/", "t" * 43)
    assert pf.ca_pem.startswith("-----BEGIN CERTIFICATE-----")


@pytest.mark.parametrize(("over", "problem"), [
    ({"format": "2"}, "p.toml: format = 2: must be 1"),
    ({"id": '"tab 1"'}, "p.toml: [device] id = 'tab 1': must be 1 to 64 characters"),
    ({"id": "7"}, "p.toml: [device] id = 7: must be a string"),
    ({"url": '"ws://srv/"'}, "p.toml: [server] url = 'ws://srv/': must be a wss:// URL"),
    ({"enrol_url": '"https://srv/"'}, "[server] enrol_url = 'https://srv/': must be a wss://"),
    ({"ca": '"nope"'}, "p.toml: [server] ca: not a PEM certificate"),
    ({"key": '"abc"'}, "p.toml: [server] grant_public_key: grant public key: not valid base64"),
    ({"token": '"short"'}, "p.toml: [enrolment] token: must be 16 to 128 characters"),
])
def test_bad_provisioning_files_name_the_key(ca_pem: str, over: dict[str, str],
                                            problem: str) -> None:
    with pytest.raises(ProvisionError) as info:
        parse_provisioning_file(good_file(ca_pem, **over), "p.toml")
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_a_leaf_certificate_is_not_a_ca(ca_master: Path, ca_pem: str, tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir()
    for name in (ca.CA_CERT, ca.CA_KEY):
        (d / name).write_bytes((ca_master / name).read_bytes())
    _, cert = ca.issue_device(d, "leaf")
    with pytest.raises(ProvisionError, match=r"\[server\] ca: this certificate is not a CA"):
        parse_provisioning_file(good_file(ca_pem, ca=f'"""\n{cert.read_text()}"""'), "p.toml")


def test_unknown_sections_keys_and_bad_toml_are_errors(ca_pem: str) -> None:
    good = good_file(ca_pem)
    with pytest.raises(ProvisionError) as info:
        parse_provisioning_file(good + "[extra]\nx = 1\n", "p.toml")
    assert "p.toml: [extra]: unknown section (known: device, enrolment, server)" in \
        info.value.problems
    with pytest.raises(ProvisionError) as info:
        parse_provisioning_file(good.replace("[enrolment]\n", "[enrolment]\ninsecure = 1\n"),
                                "p.toml")
    assert "p.toml: [enrolment] insecure: unknown key (known: token)" in info.value.problems
    with pytest.raises(ProvisionError, match=r"p\.toml: not valid TOML"):
        parse_provisioning_file("format = ", "p.toml")


# -- the configuration overlay --------------------------------------------------------------

MAIN = SIM_CONFIG.read_text().replace('state_dir = "/tmp/tabletd-sim"',
                                      'state_dir = "/tmp/x"\noverlay = "OVERLAY"')


def with_overlay(tmp_path: Path, overlay: str | None) -> str:
    path = tmp_path / "provisioned.toml"
    if overlay is not None:
        path.write_text(overlay)
    return MAIN.replace("OVERLAY", str(path))


def test_the_overlay_sets_the_identity_and_link(tmp_path: Path) -> None:
    overlay = ('[device]\nid = "tab-9"\n[link]\nurl = "wss://s:1/"\nca_file = "/d/ca.pem"\n'
               'cert_file = "/d/device.pem"\nkey_file = "/d/device.key"\n'
               'grant_public_key = "' + "A" * 43 + '="\n')
    cfg = parse_config(with_overlay(tmp_path, overlay), "main.toml")
    assert cfg.device.id == "tab-9"
    assert (cfg.link.url, cfg.link.ca_file, cfg.link.key_file) == (
        "wss://s:1/", "/d/ca.pem", "/d/device.key")
    assert cfg.media.width == 640  # the rest is the main file's


def test_no_overlay_file_means_not_provisioned(tmp_path: Path) -> None:
    cfg = parse_config(with_overlay(tmp_path, None), "main.toml")
    assert cfg.device.id == "tablet-sim-0001" and cfg.link.url == ""


@pytest.mark.parametrize(("overlay", "problem"), [
    ('[link]\ninsecure_dev = true\n', "[link] insecure_dev: not allowed in the provisioning "
     "overlay (allowed: ca_file, cert_file, grant_public_key, key_file, url)"),
    ('[hardware]\nbackend = "gpio"\n', "[hardware]: not allowed in the provisioning overlay "
     "(allowed: device, link)"),
    ('[device]\nid = 7\n', "[device] id = 7: must be a string"),
    ('[device\n', "not valid TOML"),
])
def test_a_bad_overlay_is_an_error_naming_it(tmp_path: Path, overlay: str,
                                             problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_overlay(tmp_path, overlay), "main.toml")
    where = str(tmp_path / "provisioned.toml")
    assert any(p.startswith(where) and problem in p for p in info.value.problems), \
        info.value.problems


def test_the_overlay_values_get_the_main_files_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_overlay(tmp_path, '[device]\nid = "a b"\n[link]\nurl = "http://x"\n'),
                     "main.toml")
    assert any("[device] id = 'a b'" in p for p in info.value.problems)


def test_the_overlay_path_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match=r"\[paths\] overlay = 'rel.toml': must be an "
                       "absolute path"):
        parse_config(MAIN.replace("OVERLAY", "rel.toml"), "main.toml")


# -- the unit -----------------------------------------------------------------------------------

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "tabletd-provision.service"


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: run `bash tools/dev test`"
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "SYSTEMD_COLORS": "0"})


def test_the_provisioning_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "ConditionPathExists=/boot/firmware/tabletd-provision.toml" in text
    assert "ExecStart=/opt/tabletd/bin/tabletd provision --config /etc/tabletd/tabletd.toml" \
        in text
    # verify needs the program to exist: point it at this checkout's, nothing else changes
    here = tmp_path / UNIT.name
    here.write_text(text.replace("/opt/tabletd/bin/tabletd",
                                 str(Path(sys.executable).parent / "tabletd")))
    proc = systemd_analyze("verify", str(here))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = systemd_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.5, proc.stdout
