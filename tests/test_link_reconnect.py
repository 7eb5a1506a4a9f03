"""The link's reconnection against a stopping server (docs/protocol.md section 1): the real
:class:`LinkClient` (real mutual TLS on loopback, its real reconnect loop) with a minimal host,
and the reference server stopping for a restart, crashing, or sending a bad hint."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from tabletd import __version__
from tabletd.clock import BootClock
from tabletd.config import LinkConfig
from tabletd.devserver import ca
from tabletd.devserver.server import DevServer
from tabletd.devserver.store import Store
from tabletd.events import EventStore
from tabletd.link.backoff import Backoff
from tabletd.link.client import LinkClient
from tabletd.link.grants import ClockMapping
from tabletd.link.messages import (
    ErrorMsg,
    GrantMsg,
    Hello,
    OutboxSummary,
    ProtocolError,
    ServerMessage,
    SessionSummary,
    Start,
    Welcome,
)
from tabletd.media.frames import MediaFrame

from .test_devserver import device_tls, expect, hello

DEVICE = "tab-r"


class Host:
    """An idle tablet that records when its link came up and went down."""

    def __init__(self, store: EventStore, session: SessionSummary | None = None) -> None:
        self.store = store
        self.session = session
        self.ups: list[float] = []
        self.downs: list[float] = []

    def hello(self) -> Hello:
        return Hello(device_id=DEVICE, software=__version__, boot_id=str(uuid.uuid4()),
                     session=self.session, locked=False,
                     outbox=OutboxSummary(pending=self.store.count(),
                                          oldest_seq=self.store.oldest_seq()))

    def link_changed(self, up: bool, mapping: ClockMapping | None) -> None:
        (self.ups if up else self.downs).append(time.monotonic())

    def on_server_message(self, msg: ServerMessage) -> ErrorMsg | None:
        return None

    def on_protocol_error(self, exc: ProtocolError) -> None:
        raise AssertionError(f"unexpected protocol error: {exc}")

    def media_allowed(self) -> bool:
        return False

    def on_media(self, frame: MediaFrame) -> None:
        raise AssertionError("no media expected")


class Recorded(Backoff):
    """The real policy (short delays), recording the server hint each delay was asked with;
    with ``obey=False`` it only records, and retries after 50 ms."""

    def __init__(self, obey: bool = True) -> None:
        super().__init__(0.05, 0.2, random.Random(7))
        self.obey = obey
        self.hints: list[float | None] = []

    def next_delay(self, retry_after_s: float | None = None) -> float:
        self.hints.append(retry_after_s)
        return super().next_delay(retry_after_s) if self.obey else 0.05


async def wait_for(pred: object, within: float = 10.0) -> None:
    assert callable(pred)
    async with asyncio.timeout(within):
        while not pred():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(client: LinkClient) -> AsyncIterator[None]:
    task = asyncio.create_task(client.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def tablet(srv: Path, url: str, tmp_path: Path, **cfg: object
           ) -> tuple[LinkClient, Host, Recorded]:
    d = srv / ca.DEVICES / DEVICE
    config = LinkConfig(url=url, ca_file=str(d / ca.CA_CERT), cert_file=str(d / ca.DEVICE_CERT),
                        key_file=str(d / ca.DEVICE_KEY),
                        grant_public_key=ca.grant_public_key_b64(srv), **cfg)  # type: ignore[arg-type]
    store = EventStore(tmp_path / "outbox.sqlite")
    host = Host(store)
    client = LinkClient(config, host, store, BootClock())
    client.backoff = backoff = Recorded()
    return client, host, backoff


@pytest.fixture
def registered(srv_dir: Path) -> Path:
    ca.issue_device(srv_dir, DEVICE)
    with Store.open(srv_dir) as store:
        store.add_device(DEVICE, 0)
    return srv_dir


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "crash"])
async def test_a_restarted_server_gets_the_tablet_back(registered: Path, tmp_path: Path,
                                                      planned: bool) -> None:
    """Planned: told 1 s, the tablet waits it out, then one attempt. Crash: no hint, the
    tablet retries on its jitter alone while the server is down."""
    server = DevServer(registered)
    await server.start()
    port = server.port
    client, host, backoff = tablet(registered, f"wss://127.0.0.1:{port}/", tmp_path)
    async with running(client):
        await wait_for(lambda: host.ups)
        t_drop = time.monotonic()
        if planned:
            await server.stop(restart_in_s=1)
        else:
            await server.abort()
            await wait_for(lambda: len(backoff.hints) >= 2)  # an attempt refused
        server = DevServer(registered, port=port)
        await server.start()  # back at once: a planned one still waits the second it said
        try:
            await wait_for(lambda: len(host.ups) == 2)
            hints = list(backoff.hints)
        finally:
            await server.stop()
    if planned:
        assert hints == [1.0]  # one attempt, after the hint
        assert 1.0 <= host.ups[1] - t_drop < 1.0 + 0.2 + 2.0  # hint + jitter ceiling + connect
    else:
        assert len(hints) >= 2 and hints == [None] * len(hints)


@pytest.mark.parametrize(("reason", "expected"), [
    ("retry_after=9999", 3600.0),  # beyond the protocol's bound: clamped, not obeyed
    ("retry_after=12345", 3600.0),  # every digit read, then clamped
    ("going away, retry_after=0042", 42.0),
    ("retry_after=2", 2.0),
    ("maintenance", None),  # no hint
])
async def test_the_close_reason_hint_is_read_and_bounded(
        registered: Path, tmp_path: Path, reason: str, expected: float | None) -> None:
    async def refuse(ws: ServerConnection) -> None:
        await ws.recv()  # the hello
        await ws.close(1012, reason)

    async with serve(refuse, "127.0.0.1", 0, subprotocols=[Subprotocol("tabletd.v1")]) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        client, _, backoff = tablet(registered, f"ws://127.0.0.1:{port}/", tmp_path,
                                    insecure_dev=True)
        backoff.obey = False  # record the hint, do not wait it
        async with running(client):
            await wait_for(lambda: len(backoff.hints) >= 2)
    assert backoff.hints[:2] == [expected, expected]


@pytest.mark.parametrize(("restart_in_s", "code", "base"), [(7, 1012, 7), (None, 1001, 0)],
                         ids=["restart", "stop"])
async def test_stopping_spreads_the_fleet_live_calls_first(
        registered: Path, restart_in_s: int | None, code: int, base: int) -> None:
    fleet = [f"tab-q{i}" for i in range(5)]
    with Store.open(registered) as store:
        for dev in fleet:
            ca.issue_device(registered, dev)
            store.add_device(dev, 0)
    server = DevServer(registered, readmit_per_s=2)
    await server.start()
    async with contextlib.AsyncExitStack() as stack:
        conns = {}
        for dev in fleet:
            ws = await stack.enter_async_context(connect(
                f"wss://localhost:{server.port}/", ssl=device_tls(registered, dev),
                subprotocols=[Subprotocol("tabletd.v1")], open_timeout=5))
            await ws.send(hello(dev))
            await expect(ws, Welcome)
            conns[dev] = ws
        # tab-q3's call goes live after it connected (its hello said no session)
        sid = server.book("tab-q3", in_s=0, duration_s=60)
        await expect(conns["tab-q3"], GrantMsg)
        await expect(conns["tab-q3"], Start)
        await wait_for(lambda: server.live_session("tab-q3") == sid)
        await server.stop(restart_in_s=restart_in_s)
        for ws in conns.values():
            await ws.wait_closed()
        got = {dev: (ws.close_code, ws.close_reason) for dev, ws in conns.items()}
    # 2 a second: the live call first, then the others in the order they came
    slots = {"tab-q3": 0, "tab-q0": 0, "tab-q1": 1, "tab-q2": 1, "tab-q4": 2}
    assert got == {dev: (code, f"retry_after={base + slot}") for dev, slot in slots.items()}


async def test_a_crash_sends_nothing_to_anyone(registered: Path) -> None:
    """abort(): welcomed tablets, a connection still before its hello and an enrolment all
    see their connection end with no close frame (1006), so with no hint."""
    server = DevServer(registered, enrol_port=0)
    await server.start()
    enrol_tls = device_tls(registered, None)
    async with (connect(f"wss://localhost:{server.port}/", ssl=device_tls(registered, DEVICE),
                        subprotocols=[Subprotocol("tabletd.v1")], open_timeout=5) as tab,
                connect(f"wss://localhost:{server.port}/", ssl=device_tls(registered, DEVICE),
                        subprotocols=[Subprotocol("tabletd.v1")], open_timeout=5) as early,
                connect(f"wss://localhost:{server.enrol_port}/", ssl=enrol_tls,
                        subprotocols=[Subprotocol("tabletd.enrol.v1")], open_timeout=5) as enrol):
        await tab.send(hello(DEVICE))
        await expect(tab, Welcome)
        await server.abort()
        for ws in (tab, early, enrol):
            async with asyncio.timeout(5):
                await ws.wait_closed()
            assert (ws.close_code, ws.close_reason) == (1006, "")
    await server.stop()  # idempotent after abort
