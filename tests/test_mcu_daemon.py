"""The daemon with the simulated MCU on a real pty: the camera-rail lease holds when the
daemon itself is frozen (BRIEF invariant 3); docking, the battery and an unplugged UART reach
the session machine and the outbox."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tabletd.mcu.pty import start_sim_mcu, stop_sim_mcu
from tabletd.mcu.sim import lease_file_state, query_state, send_control

from .conftest import REPO

LEASE_MS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(what: str, predicate: Any, within: float = 10) -> None:
    end = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


class Tablet:
    def __init__(self, tmp: Path, power: str = "", mcu_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.state = tmp / "state"
        self.state.mkdir()
        self.mcu, device = start_sim_mcu(self.state, seed=7, stderr=subprocess.DEVNULL,
                                         extra_args=mcu_args)
        self.port = free_port()
        text = (REPO / "config" / "sim.toml").read_text().replace("port = 8470",
                                                                   f"port = {self.port}")
        # this test starts the simulated MCU itself, to freeze and unplug it
        text = text.replace("mcu = true", "mcu = false\nself_grant_s = 60")
        text += f'\n[mcu]\nport = "{device}"\nlease_ms = {LEASE_MS}\n'
        if "poweroff" in power:  # sim.toml's own would be a duplicate key
            text = text.replace('\npoweroff = "exit"\n', "\n")
        text = text.replace("\n[power]\n", f"\n[power]\n{power}")  # sim.toml has one
        config = tmp / "tabletd.toml"
        config.write_text(text)
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "tabletd", "run", "--config", str(config), "--state-dir",
             str(self.state)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=None if env is None else {**os.environ, **env})

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/v1/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body: dict[str, Any] = json.load(resp)
                return body
        except OSError:
            return {}

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The outbox as the daemon committed it (no link here: nothing is acked away)."""
        db = sqlite3.connect(f"file:{self.state / 'events.sqlite'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT kind, fields FROM events ORDER BY seq").fetchall()
        finally:
            db.close()
        return [{"kind": k, **json.loads(f)} for k, f in rows if kind in (None, k)]

    def lease_log(self) -> list[tuple[int, str, str]]:
        lines = (self.state / "sim" / "mcu-lease.log").read_text().splitlines()
        return [(int(p[0]), p[1], p[2]) for p in (line.split() for line in lines)]

    def close(self) -> None:
        if self.daemon.poll() is None:
            os.kill(self.daemon.pid, signal.SIGCONT)
            self.daemon.terminate()
            self.daemon.wait(10)
        stop_sim_mcu(self.mcu)


@pytest.fixture
def tablet(tmp_path: Path) -> Iterator[Tablet]:
    t = Tablet(tmp_path)
    try:
        yield t
    finally:
        t.close()


@pytest.mark.timeout(60)
def test_frozen_daemon_the_mcu_cuts_the_rail_when_its_lease_lapses(tablet: Tablet) -> None:
    wait("the call to go live with the lease on, and the MCU's first STATUS",
         lambda: tablet.status().get("rail") == "on" and lease_file_state(tablet.state)
         and tablet.status().get("power") is not None)
    power = tablet.status()["power"]
    assert power is not None and power["link"] is True
    os.kill(tablet.daemon.pid, signal.SIGSTOP)  # Linux "hangs": no renewal, no cut
    frozen_at = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    wait("the MCU to cut by itself", lambda: not lease_file_state(tablet.state), within=5)
    off = [entry for entry in tablet.lease_log() if entry[1] == "off"][-1]
    assert off[2] == "expired", f"the lease did not lapse by itself: {off}"
    # the last renewal happened before the freeze: the rail is off at most one lease later
    assert off[0] - frozen_at <= (LEASE_MS + 50) * 1_000_000
    os.kill(tablet.daemon.pid, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_docking_ends_the_call_and_shows_in_the_status(tablet: Tablet) -> None:
    wait("the call to go live", lambda: tablet.status().get("rail") == "on")
    send_control(tablet.state, {"dock": 3})
    wait("the dock to end the call", lambda: tablet.status().get("state") == "ended")
    status = tablet.status()
    assert status["docked"] is True and status["rail"] == "off"
    assert status["session"]["end_reason"] == "docked"
    assert not lease_file_state(tablet.state)  # the daemon's CUT reached the MCU


POWER = """critical_hold_s = 0.5
shutdown_flush_s = 0
power_cut_delay_s = 10
"""


@pytest.mark.timeout(60)
def test_low_then_critical_battery_ends_the_call_and_powers_off(tmp_path: Path) -> None:
    tablet = Tablet(tmp_path, POWER)
    try:
        wait("the call to go live", lambda: tablet.status().get("rail") == "on")
        send_control(tablet.state, {"battery_pct": 12})
        wait("the low-battery warning", lambda: tablet.events("battery_low"))
        status = tablet.status()
        assert status["state"] == "live" and status["power"]["battery_low"] is True
        send_control(tablet.state, {"battery_pct": 4})
        assert tablet.daemon.wait(15) == 0  # "exit": the daemon stops instead of the tablet
        ended = tablet.events("call_ended")
        assert [e["reason"] for e in ended] == ["low_battery"]
        kinds = [e["kind"] for e in tablet.events()]
        assert kinds.index("battery_critical") < kinds.index("call_ended") < kinds.index(
            "power_off")
        assert tablet.events("power_off")[0]["reason"] == "low_battery"
        assert not lease_file_state(tablet.state)
        assert tablet.lease_log()[-1][1:] == ("off", "cut")  # the call's end cut first
        assert 0 < query_state(tablet.state)["power_off_in_ms"] <= 10_000  # then POWER_OFF
    finally:
        tablet.close()


@pytest.mark.timeout(60)
def test_docking_is_a_custody_event_with_bay_and_battery(tmp_path: Path) -> None:
    tablet = Tablet(tmp_path, mcu_args=["--battery-pct", "42"])
    try:
        wait("the MCU's first STATUS", lambda: tablet.status().get("power") is not None)
        send_control(tablet.state, {"dock": 5})
        wait("the dock to show", lambda: tablet.status().get("docked") is True)
        wait("charging", lambda: tablet.status()["power"]["charging"] == "charging")
        assert tablet.status()["power"]["dock_bay"] == "5"
        send_control(tablet.state, {"undock": True})
        wait("the undock", lambda: tablet.events("undocked"))
        docked, undocked = tablet.events("docked")[0], tablet.events("undocked")[0]
        assert docked["bay"] == "5" and docked["battery_pct"] in (41, 42)
        assert undocked["bay"] == "5" and undocked["battery_pct"] in (41, 42, 43)
        assert len(tablet.events("docked")) == len(tablet.events("undocked")) == 1
        assert tablet.events("battery"), "no battery telemetry"
    finally:
        tablet.close()


@pytest.mark.timeout(60)
def test_unplugged_uart_comes_back_and_the_lease_resumes(tablet: Tablet) -> None:
    wait("the call to go live with the lease on",
         lambda: tablet.status().get("rail") == "on" and lease_file_state(tablet.state))
    send_control(tablet.state, {"unplug": 1.0})
    wait("the daemon to see the UART go", lambda: tablet.events("mcu_link_down"))
    wait("the lease to lapse without renewals", lambda: not lease_file_state(tablet.state))
    wait("the UART to come back", lambda: len(tablet.events("mcu_link_up")) == 2)
    wait("the lease renewed again", lambda: lease_file_state(tablet.state))
    status = tablet.status()
    assert status["state"] == "live" and status["power"]["link"] is True
    assert tablet.daemon.poll() is None


@pytest.mark.timeout(60)
def test_sim_config_runs_its_own_mcu_which_dies_with_the_daemon(tmp_path: Path) -> None:
    """config/sim.toml as shipped ([sim] mcu = true): the daemon starts the simulated MCU,
    and a SIGKILLed daemon takes it along (no orphan holding the lease or the pty)."""
    port = free_port()
    config = tmp_path / "sim.toml"
    config.write_text((REPO / "config" / "sim.toml").read_text().replace(
        "port = 8470", f"port = {port}"))
    state = tmp_path / "state"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tabletd", "run", "--config", str(config), "--state-dir",
         str(state)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def power() -> Any:
            try:
                url = f"http://127.0.0.1:{port}/v1/status"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return json.load(resp).get("power")
            except OSError:
                return None

        wait("the simulated MCU's first STATUS", lambda: power() is not None)
        assert power()["link"] is True and power()["battery_pct"] == 80
        children = subprocess.run(["pgrep", "-P", str(daemon.pid)], capture_output=True,
                                  text=True, check=True).stdout.split()
        assert len(children) == 1
        child = int(children[0])
        daemon.kill()
        daemon.wait(10)

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            with open(f"/proc/{child}/stat") as f:  # a zombie of ours is gone too
                return f.read().split()[2] == "Z"

        wait("the simulated MCU to exit with its daemon", gone, within=5)
        assert not (state / "sim" / "mcu-tty").exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)


@pytest.mark.timeout(60)
def test_a_failed_power_off_is_recorded_and_the_mcu_still_cuts_the_power(
        tmp_path: Path) -> None:
    """poweroff = "systemd" with no systemctl to run (an empty PATH): the failure is an
    event, the call is over all the same, and the MCU already has its POWER_OFF."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    tablet = Tablet(tmp_path, POWER.replace("power_cut_delay_s = 10", "power_cut_delay_s = 30")
                    + 'poweroff = "systemd"\n', env={"PATH": str(empty)})
    try:
        wait("the call to go live", lambda: tablet.status().get("rail") == "on")
        send_control(tablet.state, {"battery_pct": 3})
        wait("the failure to be recorded", lambda: tablet.events("power_off_failed"))
        assert "systemctl" in tablet.events("power_off_failed")[0]["detail"]
        assert [e["reason"] for e in tablet.events("call_ended")] == ["low_battery"]
        assert tablet.status()["power"]["power_off"] == "low_battery"
        assert 0 < query_state(tablet.state)["power_off_in_ms"] <= 30_000
        assert tablet.daemon.poll() is None  # still up: the MCU cuts the power at its delay
    finally:
        tablet.close()
