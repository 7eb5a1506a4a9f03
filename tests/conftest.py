"""Shared fixtures: the simulated config, a fake clock, a daemon running in-process."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tabletd.config import Config, load_config
from tabletd.daemon import Daemon
from tabletd.devserver import ca

REPO = Path(__file__).resolve().parent.parent
SIM_CONFIG = REPO / "config" / "sim.toml"
MS = 0.001  # one time unit for asyncio-layer tests (websockets' tests/utils.py habit)
S_NS = 1_000_000_000


class FakeClock:
    """A CLOCK_BOOTTIME that only moves when told (trio's MockClock habit)."""

    def __init__(self, start_ns: int = 1_000 * S_NS) -> None:
        self.now = start_ns

    def boot_ns(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * S_NS)


def sim_config(**sections: dict[str, Any]) -> Config:
    """config/sim.toml with some sections' fields replaced, status API on a free port."""
    cfg = load_config(SIM_CONFIG)
    # No simulated MCU process unless a test asks for one: most tests drive the daemon alone.
    cfg = dataclasses.replace(cfg, status_api=dataclasses.replace(cfg.status_api, port=0),
                              sim=dataclasses.replace(cfg.sim, mcu=False))
    for name, fields in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
    return cfg


async def wait_for(predicate: Callable[[], bool], within: float = 2.0) -> None:
    """Poll a condition on the loop, with a bound; never a fixed sleep."""
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(MS)


class RunningDaemon:
    def __init__(self, daemon: Daemon, task: asyncio.Task[int]) -> None:
        self.daemon = daemon
        self.task = task

    async def stop(self) -> int:
        self.daemon.request_stop()
        return await self.task


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await start_daemon(cfg=..., state_dir=..., clock=...)`` returns a RunningDaemon that
    is ready; every daemon started this way is stopped at the end of the test."""
    started: list[RunningDaemon] = []

    async def start(cfg: Config | None = None, state_dir: Path | None = None,
                    **kwargs: Any) -> RunningDaemon:
        daemon = Daemon(cfg or sim_config(), state_dir or tmp_path / "state",
                        environ=kwargs.pop("environ", {}), **kwargs)
        task = asyncio.create_task(daemon.run())
        ready = asyncio.create_task(daemon.ready.wait())
        done, _ = await asyncio.wait({task, ready}, timeout=5,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            task.result()  # raises the start-up error
        assert ready in done, "daemon not ready within 5 s"
        running = RunningDaemon(daemon, task)
        started.append(running)
        return running

    yield start
    for running in started:
        if not running.task.done():
            await running.stop()


@pytest.fixture(scope="module")
def ca_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One development CA per test module (making keys is the slow part)."""
    directory = tmp_path_factory.mktemp("ca")
    ca.init(directory)
    return directory


@pytest.fixture
def srv_dir(ca_master: Path, tmp_path: Path) -> Path:
    """A fresh reference-server directory with the module's CA and no store yet."""
    directory = tmp_path / "srv"
    directory.mkdir()
    for path in ca_master.iterdir():
        if path.is_file() and not path.name.startswith("store.sqlite"):
            (directory / path.name).write_bytes(path.read_bytes())
    return directory
