"""`tabletd selftest` on the simulated board: gpiozero's MockFactory, the simulated MCU as a
process on a real pty, the reference server over real mutual TLS on loopback. Every check
is shown passing, and failing for a real reason."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tabletd import cli
from tabletd.config import Config, LinkConfig
from tabletd.devserver import ca
from tabletd.devserver.server import DevServer
from tabletd.devserver.store import Store
from tabletd.errors import TabletdError
from tabletd.events import EventStore
from tabletd.hardware.camera import SimCamera
from tabletd.hardware.sim import rail_file_state
from tabletd.mcu.pty import start_sim_mcu, stop_sim_mcu
from tabletd.mcu.sim import send_control
from tabletd.selftest import (
    HARDWARE_CHECKS,
    STA_UNSYNC,
    TIME_ERROR,
    CheckResult,
    KernelClock,
    SelfTest,
    kernel_clock,
    render_table,
)

from .conftest import SIM_CONFIG, sim_config, wait_for

DEVICE = "tablet-sim-0001"
NOBODY = 65534
ALL_CHECKS = ["storage", "disk_space", "clock", "server", *HARDWARE_CHECKS]


def synced() -> KernelClock:
    return KernelClock(state=0, status=0, maxerror_us=12_000)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def mcu(state: Path) -> Iterator[str]:
    """The simulated MCU on a pty; yields the port to configure."""
    proc, port = start_sim_mcu(state)
    yield port
    stop_sim_mcu(proc)


def config(mcu_port: str = "", **sections: dict[str, Any]) -> Config:
    """The simulated board; the MCU on ``mcu_port`` (a test's own), none if empty."""
    sections["mcu"] = {"port": mcu_port, **sections.get("mcu", {})}
    sections["sim"] = {"mcu": False, **sections.get("sim", {})}
    return sim_config(**sections)


def run(cfg: Config, state: Path, **kw: Any) -> dict[str, CheckResult]:
    kw.setdefault("clock_reader", synced)
    results = SelfTest(cfg, state, **kw).run()
    assert [r.name for r in results] == ALL_CHECKS
    return {r.name: r for r in results}


def audit(state: Path) -> list[tuple[str, dict[str, Any]]]:
    store = EventStore(state / "events.sqlite")
    try:
        return [(e.kind, e.fields) for e in store.all() if e.kind.startswith("selftest")]
    finally:
        store.close()


def audit_times(state: Path) -> list[tuple[str, dict[str, Any], int]]:
    store = EventStore(state / "events.sqlite")
    try:
        return [(e.kind, e.fields, e.boot_ns) for e in store.all()
                if e.kind.startswith("selftest")]
    finally:
        store.close()


def lease_spans(state: Path) -> list[tuple[int, int]]:
    """(start, end) of each lease in the simulated MCU's log (renewals extend it)."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for line in (state / "sim" / "mcu-lease.log").read_text().splitlines():
        ns, what, reason = line.split(" ", 2)
        if what == "on" and reason.startswith("lease"):
            start = int(ns)
        elif what == "off" and start is not None:
            spans.append((start, int(ns)))
            start = None
    return spans


def failed(results: dict[str, CheckResult]) -> set[str]:
    return {name for name, r in results.items() if not r.ok}


# -- everything passes, against the reference server -------------------------------------------


@pytest.fixture
def srv_dir(tmp_path: Path) -> Path:
    d = tmp_path / "srv"
    ca.init(d)
    ca.issue_device(d, DEVICE)
    return d


def linked(cfg: Config, srv: DevServer) -> Config:
    dev = srv.directory / ca.DEVICES / DEVICE
    return dataclasses.replace(cfg, link=LinkConfig(
        url=f"wss://127.0.0.1:{srv.port}/", ca_file=str(srv.directory / ca.CA_CERT),
        cert_file=str(dev / ca.DEVICE_CERT), key_file=str(dev / ca.DEVICE_KEY),
        grant_public_key=ca.grant_public_key_b64(srv.directory), backoff_base_s=0.05,
        backoff_cap_s=0.2))


async def test_every_check_passes_on_a_healthy_simulated_tablet(
        srv_dir: Path, state: Path, mcu: str, start_daemon: Any) -> None:
    with Store.open(srv_dir) as store:
        store.add_device(DEVICE, 0)
    async with DevServer(srv_dir, tick_s=0.02) as srv:
        cfg = linked(config(mcu), srv)
        test = SelfTest(cfg, state, clock_reader=synced)
        results = await asyncio.to_thread(test.run)
        assert [r.name for r in results] == ALL_CHECKS
        assert [r for r in results if not r.ok] == []
        by_name = {r.name: r for r in results}
        assert "hello/welcome OK" in by_name["server"].detail
        assert "lease granted then cut" in by_name["mcu"].detail
        assert "first frame" in by_name["camera"].detail
        # The rail was powered twice, each time bounded and recorded before and after.
        kinds = [k for k, _ in audit(state)]
        assert kinds == ["selftest_rail_on", "selftest_rail_off"] * 2
        rail_on, camera_on = test.rail_on_ms
        assert rail_on <= cfg.gpio.sense_timeout_ms
        assert camera_on < 8000
        assert audit(state)[1][1]["sense_on_after_cut"] is False
        assert not rail_file_state(state / "sim")
        # The MCU's lease was running before each selftest_rail_on and until after each
        # selftest_rail_off (its own log, on the same CLOCK_BOOTTIME), then cut.
        leases = lease_spans(state)
        events = [ns for _, _, ns in audit_times(state)]
        for on_ns, off_ns in zip(events[::2], events[1::2], strict=True):
            assert any(start < on_ns and off_ns < end for start, end in leases), leases
        assert (state / "sim" / "mcu-lease.log").read_text().rstrip().endswith("off cut")

        # With the daemon running: the server check asks the daemon, the hardware is its.
        running = await start_daemon(cfg=cfg, state_dir=state)
        await wait_for(lambda: srv.connected(DEVICE), within=5)
        # ... and the daemon delivers the self-test's audit events to the server.
        await wait_for(lambda: [e.kind for e in srv.events(DEVICE)
                                if e.kind.startswith("selftest")] == kinds, within=5)
        api = dataclasses.replace(cfg.status_api, port=running.daemon.status_server.port)
        results = await asyncio.to_thread(SelfTest(dataclasses.replace(cfg, status_api=api),
                                                   state, clock_reader=synced).run)
        by_name = {r.name: r for r in results}
        assert by_name["server"].ok and "running daemon's link" in by_name["server"].detail
        for name in HARDWARE_CHECKS:
            assert not by_name[name].ok
            assert by_name[name].fix is not None and "systemctl stop tabletd" in \
                by_name[name].fix
        await running.stop()


async def test_a_server_that_does_not_know_the_tablet_fails(srv_dir: Path, state: Path) -> None:
    async with DevServer(srv_dir, tick_s=0.02) as srv:  # DEVICE has a certificate, no record
        results = await asyncio.to_thread(run, linked(config(), srv), state)
    assert not results["server"].ok
    assert "refused this tablet: refused" in results["server"].detail


async def test_an_unreachable_server_fails(srv_dir: Path, state: Path) -> None:
    async with DevServer(srv_dir, tick_s=0.02) as srv:
        cfg = linked(config(), srv)
    results = await asyncio.to_thread(run, cfg, state)  # stopped: nothing listens there
    assert not results["server"].ok
    assert "Connect" in results["server"].detail and results["server"].fix


# -- each check failing for a real reason -------------------------------------------------------


def test_a_sense_stuck_off_fails_the_rail_and_the_camera(state: Path) -> None:
    results = run(config(sim={"sense_fault": "stuck_off"}), state)
    assert "did NOT follow on" in results["rail"].detail
    assert results["camera"].detail == "not run: the rail did not come on"
    assert {"rail", "camera"} <= failed(results)
    assert [k for k, _ in audit(state)] == ["selftest_rail_on", "selftest_rail_off"] * 2


def test_a_sense_stuck_on_fails_without_powering_the_rail(state: Path) -> None:
    test = SelfTest(config(sim={"sense_fault": "stuck_on"}), state, clock_reader=synced)
    results = {r.name: r for r in test.run()}
    assert "reads ON while the rail is commanded off" in results["rail"].detail
    assert len(test.rail_on_ms) == 1  # the camera check's only
    assert [f["check"] for k, f in audit(state) if k == "selftest_rail_on"] == ["camera"]


def test_no_mcu_configured_fails_mcu_and_battery(state: Path) -> None:
    results = run(config(), state)
    assert results["mcu"].detail == "no MCU: [mcu] port is empty"
    assert results["battery"].detail.startswith("not run")
    assert {"mcu", "battery"} <= failed(results)


def test_an_mcu_that_does_not_answer_fails(state: Path, tmp_path: Path) -> None:
    results = run(config(str(tmp_path / "no-such-tty")), state)
    assert "no handshake and STATUS from the MCU" in results["mcu"].detail
    assert {"mcu", "battery"} <= failed(results)
    assert results["rail"].ok  # the rail check still runs, on the GPIO alone


def test_a_charger_fault_fails_the_battery(state: Path, mcu: str) -> None:
    send_control(state, {"charger_fault": True})
    results = run(config(mcu), state)
    assert results["mcu"].ok
    assert "CHARGER FAULT" in results["battery"].detail and not results["battery"].ok


def test_a_low_battery_not_charging_fails(state: Path) -> None:
    proc, port = start_sim_mcu(state, extra_args=["--battery-pct", "4"])
    try:
        results = run(config(port), state)
    finally:
        stop_sim_mcu(proc)
    assert not results["battery"].ok and results["battery"].fix == "dock the tablet to charge it"


def test_a_full_disk_fails(state: Path) -> None:
    results = run(config(), state, min_free_mb=10**12)
    assert not results["disk_space"].ok
    assert "needs 1000000000000 MB" in results["disk_space"].detail


def test_a_damaged_outbox_fails_storage_and_the_rail_stays_off(state: Path) -> None:
    (state / "events.sqlite").write_bytes(b"this is not a database, " * 200)
    test = SelfTest(config(), state, clock_reader=synced)
    results = {r.name: r for r in test.run()}
    assert "damaged" in results["storage"].detail and not results["storage"].ok
    assert results["rail"].detail.startswith("not run:")
    assert "cannot record" in results["rail"].detail
    assert results["camera"].detail.startswith("not run:")
    assert test.rail_on_ms == []  # never powered without its audit record


def test_an_untrusted_clock_fails() -> None:
    k = KernelClock(state=TIME_ERROR, status=STA_UNSYNC, maxerror_us=16_000_000)
    assert not k.trusted
    assert not KernelClock(state=0, status=STA_UNSYNC, maxerror_us=0).trusted
    assert synced().trusted
    real = kernel_clock()  # the kernel's answer, whatever it is here
    assert isinstance(real.trusted, bool) and real.state >= 0


def test_the_clock_check_reports_an_unsynchronised_kernel(state: Path) -> None:
    results = run(config(), state, clock_reader=lambda: KernelClock(TIME_ERROR, STA_UNSYNC,
                                                                     16_000_000))
    assert not results["clock"].ok and "NOT synchronised" in results["clock"].detail
    assert results["clock"].fix is not None and "NTP" in results["clock"].fix


def test_the_privacy_switch_forbids_powering_the_rail(state: Path) -> None:
    test = SelfTest(config(sim={"privacy_engaged": True}), state, clock_reader=synced)
    results = {r.name: r for r in test.run()}
    assert "privacy switch (GPIO22) ENGAGED" in results["inputs"].detail
    assert results["rail"].detail.startswith("not run")
    assert results["camera"].detail.startswith("not run")
    assert test.rail_on_ms == [] and audit(state) == []


def test_an_open_case_fails_the_inputs(state: Path) -> None:
    results = run(config(sim={"tamper_open": True}), state)
    assert "case (tamper GPIO23) OPEN" in results["inputs"].detail
    assert {"inputs", "rail", "camera"} <= failed(results)


def test_a_camera_that_never_delivers_fails(state: Path) -> None:
    def broken(cfg: Config) -> SimCamera:
        cam = SimCamera(cfg.media.width, cfg.media.height, cfg.media.fps, cfg.media.bitrate,
                        restart_delay_s=0.01)
        cam.fail_starts(10)
        return cam

    results = run(config(), state, camera_factory=broken)
    assert not results["camera"].ok
    assert "Cannot allocate memory" in results["camera"].detail
    assert not rail_file_state(state / "sim")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_rail_is_on_cuts_it_and_says_so(state: Path,
                                                            sig: signal.Signals) -> None:
    """The engineer's session drops (SIGHUP) or systemd stops it (SIGTERM) in the middle
    of the camera check: the rail is cut, recorded, and the run ends with an error."""
    seen_on: list[bool] = []
    seen_at_stop: list[bool] = []

    def interrupted(cfg: Config) -> SimCamera:
        cam = SimCamera(cfg.media.width, cfg.media.height, cfg.media.fps, cfg.media.bitrate)
        cam.fail_starts(10)  # no frame ever: the check would wait its whole timeout

        def start(on_frame: Any) -> None:
            seen_on.append(rail_file_state(state / "sim"))
            os.kill(os.getpid(), sig)
            SimCamera.start(cam, on_frame)

        def stop() -> None:
            seen_at_stop.append(rail_file_state(state / "sim"))
            SimCamera.stop(cam)
        cam.start = start  # type: ignore[method-assign]
        cam.stop = stop  # type: ignore[method-assign]
        return cam

    with pytest.raises(TabletdError, match="interrupted"):
        SelfTest(config(), state, clock_reader=synced, camera_factory=interrupted).run()
    assert seen_on == [True]
    assert seen_at_stop == [False]  # the camera is stopped after the cut, not before
    assert not rail_file_state(state / "sim")
    kinds = [k for k, _ in audit(state)]
    assert kinds[-2:] == ["selftest_rail_on", "selftest_rail_off"]


def test_a_missing_backlight_fails(state: Path, tmp_path: Path) -> None:
    results = run(config(backlight={"path": str(tmp_path / "nowhere" / "bl_power")}), state)
    assert not results["backlight"].ok and "cannot write" in results["backlight"].detail


def test_files_made_as_root_are_given_to_the_daemons_user(state: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving files away is what the self-test does when run as root")
    os.chown(state, NOBODY, NOBODY)  # the state directory belongs to the daemon's user
    run(config(), state)
    for name in ("tabletd.lock", "events.sqlite"):
        st = (state / name).stat()
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name


# -- the command line -----------------------------------------------------------------------------


def test_cli_json_and_exit_status(state: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text(SIM_CONFIG.read_text().replace("port = 8470", "port = 0"))
    assert cli.main(["selftest", "--config", str(cfg), "--state-dir", str(state),
                     "--json"]) == 1  # no [link]: the server check fails
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert [c["name"] for c in doc["checks"]] == ALL_CHECKS
    server = next(c for c in doc["checks"] if c["name"] == "server")
    assert server == {"name": "server", "ok": False,
                      "detail": "no [link] url: this tablet is not provisioned",
                      "fix": "provision it (docs/field-guide.md, `tabletd provision`)"}
    # config/sim.toml has [sim] mcu = true: the self-test starts the simulated MCU, as the
    # daemon does, and every hardware check passes on it.
    hardware = {c["name"]: c for c in doc["checks"] if c["name"] in HARDWARE_CHECKS}
    assert all(c["ok"] for c in hardware.values()), hardware


def test_the_table_shows_each_fix() -> None:
    table = render_table([CheckResult("rail", False, "sense stuck", "report it"),
                          CheckResult("clock", True, "synchronised")])
    assert table.splitlines() == [
        "check  result  detail",
        "rail   FAIL    sense stuck",
        "       fix:    report it",
        "clock  PASS    synchronised",
        "",
        "FAILED: rail",
    ]
