"""Invariant 6 under crashes: the daemon, a real process, is SIGKILLed at random points while
calls run; the reference server's store is then checked for loss and duplicates."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tabletd.devserver import ca
from tabletd.devserver.server import DevServer
from tabletd.devserver.store import Store
from tabletd.events import EventStore

from .conftest import REPO

DEVICE = "tablet-sim-0001"


def daemon_config(tmp: Path, srv_dir: Path, port: int) -> Path:
    dev = srv_dir / ca.DEVICES / DEVICE
    text = (REPO / "config" / "sim.toml").read_text().replace("port = 8470", "port = 0")
    text += f"""
[session]
link_grace_s = 0.5

[link]
url = "wss://127.0.0.1:{port}/"
ca_file = "{srv_dir / ca.CA_CERT}"
cert_file = "{dev / ca.DEVICE_CERT}"
key_file = "{dev / ca.DEVICE_KEY}"
grant_public_key = "{ca.grant_public_key_b64(srv_dir)}"
ping_interval_s = 1
ping_timeout_s = 1
backoff_base_s = 0.05
backoff_cap_s = 0.3
"""
    path = tmp / "tabletd.toml"
    path.write_text(text)
    return path


async def spawn(config: Path, state: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tabletd", "run", "--config", str(config), "--state-dir",
        str(state), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def appended(state: Path) -> int:
    store = EventStore(state / "events.sqlite")
    try:
        return store.appended_total()
    finally:
        store.close()


@pytest.mark.timeout(120)
async def test_sigkill_at_random_points_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(20261127)
    srv_dir = tmp_path / "srv"
    ca.init(srv_dir)
    ca.issue_device(srv_dir, DEVICE)
    with Store.open(srv_dir) as store:
        store.add_device(DEVICE, 0)
    server = DevServer(srv_dir, tick_s=0.01)
    await server.start()
    state = tmp_path / "state"
    config = daemon_config(tmp_path, srv_dir, server.port)
    kills = 0
    try:
        for round_ in range(6):
            server.book(DEVICE, in_s=rng.uniform(0.1, 0.8), duration_s=1)
            proc = await spawn(config, state)
            await asyncio.sleep(rng.uniform(0.3, 2.0))  # a random point in its life
            if proc.returncode is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            await proc.wait()
            assert proc.returncode in (-signal.SIGKILL,), f"round {round_}: {proc.returncode}"
        proc = await spawn(config, state)  # the last one lives: let it deliver everything
        try:
            async with asyncio.timeout(60):
                while True:
                    total = appended(state)
                    seqs = sorted(e.seq for e in server.events(DEVICE))
                    if total and seqs == list(range(1, total + 1)):
                        break
                    await asyncio.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        events = server.events(DEVICE)
    finally:
        await server.stop()
    assert kills >= 4
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)) == total, "lost or duplicated events"
    kinds = [e.kind for e in events]
    assert kinds.count("call_scheduled") >= 1 and "call_started" in kinds
    print(f"{kills} kills, {total} events, all delivered once; kinds {sorted(set(kinds))}")
