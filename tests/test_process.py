"""The daemon as a real process: sd_notify on a real AF_UNIX datagram socket, the status
API over loopback, SIGTERM, and ``tabletd cutoff`` (what systemd's ExecStopPost runs)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tabletd.events import EventStore
from tabletd.hardware.sim import rail_file_state

from .conftest import REPO

TABLETD = [sys.executable, "-m", "tabletd"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def config(tmp_path: Path) -> Path:
    text = (REPO / "config" / "sim.toml").read_text()
    text = text.replace("port = 8470", f"port = {free_port()}")
    text = text.replace("mcu = true", "mcu = true\nself_grant_s = 30")
    p = tmp_path / "sim.toml"
    p.write_text(text)
    return p


class Notifications:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, within: float = 10) -> dict[str, str]:
        end = time.monotonic() + within
        for m in self.messages:
            if key in m and (value is None or m[key] == value):
                return m
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            m = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            self.messages.append(m)
            if key in m and (value is None or m[key] == value):
                return m
        raise AssertionError(f"no {key}={value} in {self.messages}")


@pytest.fixture
def daemon(tmp_path: Path, config: Path) -> Iterator[tuple[subprocess.Popen[bytes], Notifications,
                                                           Path]]:
    notes = Notifications(tmp_path / "notify.sock")
    state = tmp_path / "state"
    env = dict(os.environ, NOTIFY_SOCKET=str(notes.path), WATCHDOG_USEC="400000")
    proc = subprocess.Popen([*TABLETD, "run", "--config", str(config), "--state-dir", str(state)],
                            env=env, stderr=subprocess.PIPE)
    try:
        yield proc, notes, state
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        notes.sock.close()


def wait_rail_on(state: Path, within: float = 5.0) -> None:
    """READY goes out with the rail off; the simulated board's call follows it."""
    end = time.monotonic() + within
    while not rail_file_state(state / "sim"):
        assert time.monotonic() < end, "the simulated call never powered the rail"
        time.sleep(0.01)


def cli(config: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TABLETD, *args, "--config", str(config), "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=30, check=False)


def test_notify_status_stop_and_cutoff(daemon, config: Path) -> None:  # type: ignore[no-untyped-def]
    proc, notes, state = daemon
    ready = notes.wait_for("READY", "1")
    assert ready["STATUS"] == "idle, camera off"  # plain words; READY with the rail off
    notes.wait_for("WATCHDOG", "1")
    # the simulated board granted a 30 s call: the rail is on
    wait_rail_on(state)
    status = json.loads(cli(config, state, "status", "--json").stdout)
    assert status["rail"] == "on" and status["session"]["state"] == "live"
    assert 0 < status["session"]["remaining_ms"] <= 30_000
    assert rail_file_state(state / "sim")
    human = cli(config, state, "status").stdout
    assert "rail      on" in human
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    notes.wait_for("STOPPING", "1")
    assert not rail_file_state(state / "sim")
    # daemon gone: status says so and exits 3 with the persisted state
    gone = cli(config, state, "status", "--json")
    assert gone.returncode == 3
    assert json.loads(gone.stdout)["persisted"]["snapshot"]["state"] == "live"
    # what ExecStopPost runs: idempotent, records an event
    for _ in range(2):
        done = cli(config, state, "cutoff")
        assert done.returncode == 0, done.stderr
        assert not rail_file_state(state / "sim")
    assert (state / "sim" / "bl_power").read_text() == "4"
    store = EventStore(state / "events.sqlite")
    kinds = [e.kind for e in store.all()]
    store.close()
    assert kinds.count("cutoff") == 2


def test_sigkill_then_cutoff_turns_rail_off(daemon, config: Path) -> None:  # type: ignore[no-untyped-def]
    proc, notes, state = daemon
    notes.wait_for("READY", "1")
    wait_rail_on(state)
    proc.kill()
    proc.wait(10)
    assert rail_file_state(state / "sim"), "the simulated line stays latched, like sysfs GPIO"
    done = cli(config, state, "cutoff")
    assert done.returncode == 0, done.stderr
    assert not rail_file_state(state / "sim")


def test_cutoff_while_running_asks_the_daemon(daemon, config: Path) -> None:  # type: ignore[no-untyped-def]
    proc, notes, state = daemon
    notes.wait_for("READY", "1")
    wait_rail_on(state)
    out = cli(config, state, "cutoff")
    assert out.returncode == 0 and f"pid {proc.pid}" in out.stdout
    notes.wait_for("STATUS", "LOCKED (engineer_cutoff), camera off")
    assert not rail_file_state(state / "sim")


def test_status_api_get_and_push(daemon, config: Path) -> None:  # type: ignore[no-untyped-def]
    proc, notes, state = daemon
    notes.wait_for("READY", "1")
    wait_rail_on(state)
    port = int(config.read_text().split("port = ")[1].split()[0])

    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{port}/v1/status/stream") as ws:
            first = json.loads(await ws.recv())
            assert first["rail"] == "on" and first["link"] == {"connected": True}
            await ws.send("please extend my call")  # ignored: the API is read-only
            os.kill(proc.pid, signal.SIGUSR1)  # engineer cutoff: a change to push
            async with asyncio.timeout(5):
                while True:
                    pushed = json.loads(await ws.recv())
                    if pushed["locked"]:
                        break
            assert pushed["rail"] == "off" and pushed["locked_reason"] == "engineer_cutoff"

    asyncio.run(scenario())
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/nothing", timeout=5)
    assert exc.value.code == 404
    assert json.load(exc.value)["paths"] == [
        "/v1/status", "/v1/status/stream", "/v1/media/stream", "/v1/media/self"]
