"""The daemon with the simulated MCU on a real pty: the camera-rail lease holds when the
daemon itself is frozen (BRIEF invariant 3), and docking reaches the session machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tabletd.mcu.pty import start_sim_mcu, stop_sim_mcu
from tabletd.mcu.sim import lease_file_state, send_control

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
    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "state"
        self.state.mkdir()
        self.mcu, device = start_sim_mcu(self.state, seed=7, stderr=subprocess.DEVNULL)
        self.port = free_port()
        text = (REPO / "config" / "sim.toml").read_text().replace("port = 8470",
                                                                   f"port = {self.port}")
        text += f'\n[sim]\nself_grant_s = 60\n\n[mcu]\nport = "{device}"\nlease_ms = {LEASE_MS}\n'
        config = tmp / "tabletd.toml"
        config.write_text(text)
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "tabletd", "run", "--config", str(config), "--state-dir",
             str(self.state)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/v1/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body: dict[str, Any] = json.load(resp)
                return body
        except OSError:
            return {}

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
