"""The daemon's link against the reference server: real websockets over real mutual TLS on
loopback, through a TCP fault proxy (docs/protocol.md)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tabletd.config import Config, LinkConfig
from tabletd.devserver import ca
from tabletd.devserver.proxy import FaultProxy
from tabletd.devserver.server import DevServer
from tabletd.devserver.store import Store
from tabletd.events import EventStore
from tabletd.link.grants import ClockMapping, GrantBody, sign_grant
from tabletd.link.messages import GrantMsg
from tabletd.session import State

from .conftest import sim_config, wait_for

DEVICE = "tablet-sim-0001"


@dataclasses.dataclass
class Net:
    server: DevServer
    proxy: FaultProxy
    srv_dir: Path

    def config(self, **link: Any) -> Config:
        dev = self.srv_dir / ca.DEVICES / DEVICE
        cfg = sim_config(session={"link_grace_s": 0.3})
        return dataclasses.replace(cfg, link=LinkConfig(
            url=f"wss://127.0.0.1:{self.proxy.port}/",
            ca_file=str(self.srv_dir / ca.CA_CERT),
            cert_file=str(dev / ca.DEVICE_CERT),
            key_file=str(dev / ca.DEVICE_KEY),
            grant_public_key=ca.grant_public_key_b64(self.srv_dir),
            ping_interval_s=1, ping_timeout_s=1,
            backoff_base_s=0.05, backoff_cap_s=0.2,
            **link,
        ))


@contextlib.asynccontextmanager
async def open_net(srv_dir: Path, **server: Any) -> AsyncIterator[Net]:
    """A development CA with this device registered, the reference server, the proxy."""
    ca.init(srv_dir)
    ca.issue_device(srv_dir, DEVICE)
    with Store.open(srv_dir) as store:
        store.add_device(DEVICE, 0)
    dev = DevServer(srv_dir, tick_s=0.01, **server)
    await dev.start()
    proxy = FaultProxy("127.0.0.1", dev.port)
    await proxy.start()
    try:
        yield Net(dev, proxy, srv_dir)
    finally:
        await proxy.close()
        await dev.stop()


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    async with open_net(tmp_path / "srv") as n:
        yield n


def stored_kinds(state_dir: Path) -> list[str]:
    store = EventStore(state_dir / "events.sqlite")
    try:
        return [e.kind for e in store.all()]
    finally:
        store.close()


async def test_booked_call_goes_live_ends_and_every_event_arrives(net: Net, start_daemon,
                                                                   tmp_path: Path) -> None:
    run = await start_daemon(net.config())
    d = run.daemon
    await wait_for(lambda: d.machine.link_up, within=10)
    session = net.server.book(DEVICE, in_s=0.2, duration_s=1)
    await wait_for(lambda: d.machine.state is State.LIVE, within=5)
    assert d.guard.rail_on
    assert d.machine.snapshot.grant is not None
    assert d.machine.snapshot.grant.session_id == session
    await wait_for(lambda: d.machine.state is State.ENDED, within=5)
    assert not d.guard.rail_on
    # everything recorded reaches the server and is acknowledged (deleted from the outbox)
    await wait_for(lambda: d.store.count() == 0, within=5)
    kinds = [e.event.kind for e in net.server.events(DEVICE)]
    for kind in ("call_scheduled", "call_started", "rail_cut", "call_ended"):
        assert kind in kinds
    ended = next(e.event for e in net.server.events(DEVICE) if e.event.kind == "call_ended")
    assert ended.fields["reason"] == "deadline"


async def test_network_cut_call_still_ends_on_time_and_events_follow(net: Net, start_daemon
                                                                     ) -> None:
    run = await start_daemon(net.config())
    d = run.daemon
    await wait_for(lambda: d.machine.link_up, within=10)
    net.server.book(DEVICE, in_s=0.1, duration_s=6)
    await wait_for(lambda: d.machine.state is State.LIVE, within=5)
    deadline = d.machine.snapshot.deadline_ns
    net.proxy.set_mode("blackhole")  # the cable is cut: only keepalive notices
    await wait_for(lambda: not d.machine.link_up, within=5)
    await wait_for(lambda: not d.guard.rail_on, within=2)  # after the 0.3 s grace
    assert d.guard.last_cut is not None and d.guard.last_cut.reason == "link_grace"
    await wait_for(lambda: d.machine.state is State.ENDED, within=8)
    assert d.machine.snapshot.deadline_ns == deadline  # the deadline never moved
    pending = d.store.count()
    assert pending > 0  # call_ended & co. wait in the outbox
    net.proxy.set_mode("reset")
    net.proxy.set_mode("pass")
    await wait_for(lambda: d.store.count() == 0, within=10)
    kinds = [e.event.kind for e in net.server.events(DEVICE)]
    assert "call_link_lost" in kinds and "call_ended" in kinds


@pytest.mark.parametrize("mode", ["split", "delay"])
async def test_degraded_network_still_delivers(net: Net, start_daemon, mode: str) -> None:
    net.proxy.set_mode(mode, delay_s=0.05)  # type: ignore[arg-type]
    run = await start_daemon(net.config())
    d = run.daemon
    await wait_for(lambda: d.machine.link_up, within=10)
    net.server.book(DEVICE, in_s=0.1, duration_s=1)
    await wait_for(lambda: d.machine.state is State.ENDED, within=8)
    await wait_for(lambda: d.store.count() == 0, within=10)
    assert "call_ended" in [e.event.kind for e in net.server.events(DEVICE)]


async def test_server_restart_reconnects(net: Net, start_daemon) -> None:
    run = await start_daemon(net.config())
    d = run.daemon
    await wait_for(lambda: d.machine.link_up, within=10)
    sessions = d.link.sessions
    port = net.server.port
    await net.server.stop()
    await wait_for(lambda: not d.machine.link_up, within=5)
    net.server._port = port  # the same address, as a restarted server would have
    await net.server.start()
    await wait_for(lambda: d.machine.link_up, within=10)
    assert d.link.sessions == sessions + 1


async def test_server_lock_and_unlock(net: Net, start_daemon) -> None:
    run = await start_daemon(net.config())
    d = run.daemon
    await wait_for(lambda: d.machine.link_up, within=10)
    net.server.lock(DEVICE, "staff")
    await wait_for(lambda: d.machine.state is State.LOCKED, within=5)
    net.server.unlock(DEVICE)
    await wait_for(lambda: d.machine.state is State.IDLE, within=5)


async def test_wrong_ca_is_refused(net: Net, start_daemon, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    ca.init(other)
    cfg = net.config()
    cfg = dataclasses.replace(cfg, link=dataclasses.replace(
        cfg.link, ca_file=str(other / ca.CA_CERT)))
    run = await start_daemon(cfg)
    d = run.daemon
    await wait_for(lambda: d.link.attempts >= 3, within=10)
    assert d.link.sessions == 0 and not d.machine.link_up


def test_ws_without_insecure_dev_is_a_config_error() -> None:
    from tabletd.config import parse_config
    from tabletd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ws:// \(no TLS\) is refused"):
        parse_config('[device]\nid = "t"\n[link]\nurl = "ws://127.0.0.1:1/"\n'
                     'grant_public_key = "x"\n', "f.toml")


@pytest.mark.parametrize("skew_ms", [-3_600_000, 3_600_000])
async def test_server_clock_skew_changes_nothing(tmp_path: Path, start_daemon,
                                                 skew_ms: int) -> None:
    """A server an hour off: the mapping absorbs it; the call lasts its granted length."""
    async with open_net(tmp_path / "skewed", clock_offset_ms=skew_ms) as skewed:
        server = skewed.server
        run = await start_daemon(skewed.config())
        d = run.daemon
        await wait_for(lambda: d.machine.link_up, within=10)
        server.book(DEVICE, in_s=0.1, duration_s=2)
        await wait_for(lambda: d.machine.state is State.LIVE, within=5)
        snap = d.machine.snapshot
        assert snap.deadline_ns is not None and snap.started_ns is not None
        assert snap.deadline_ns - snap.started_ns == 2 * 1_000_000_000
        await wait_for(lambda: d.machine.state is State.ENDED, within=5)
        assert d.machine.snapshot.end_reason == "deadline"
        await run.stop()


async def test_full_outbox_refuses_grants_and_says_why(net: Net, start_daemon,
                                                       tmp_path: Path) -> None:
    """Invariant 6: rather than drop a call record, refuse the call, visibly."""
    state = tmp_path / "state"
    state.mkdir()
    store = EventStore(state / "events.sqlite", capacity=3)
    for n in range(3):
        store.append("call_ended", {"session_id": f"old-{n}", "reason": "deadline"},
                     boot="b", boot_ns=n)
    store.close()
    net.proxy.set_mode("blackhole")  # no acks can arrive to free the outbox
    run = await start_daemon(net.config(), state_dir=state)
    d = run.daemon
    d.store.capacity = 3
    assert d.status()["outbox"] == {"pending": d.store.count(), "calls_refused": True,
                                    "reason": "event backlog full: waiting for the server"}
    now_ms = net.server.now_ms()
    boot = d.clock.boot_ns()
    d._mapping = ClockMapping.from_exchange(boot, boot, now_ms)  # as a welcome would give
    body = GrantBody("g-1", DEVICE, "Frere", now_ms, now_ms + 600_000, 60, "n" * 22, now_ms)
    reply = d.on_server_message(GrantMsg(body, sign_grant(body, ca.load_grant_key(net.srv_dir))))
    assert reply is not None and reply.code == "refused" and "outbox" in reply.detail
    net.proxy.set_mode("pass")
    await wait_for(lambda: d.machine.link_up, within=10)
    await wait_for(lambda: not d.store.full_of_protected(), within=10)
    assert d.status()["outbox"]["calls_refused"] is False


async def test_corrupt_replay_set_refuses_every_grant(net: Net, start_daemon,
                                                      tmp_path: Path) -> None:
    """Without its replay set the tablet could accept an old grant again: it runs, reports,
    and refuses every grant (invariant 5) instead of starting empty."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "grant-nonces.json").write_text("{garbage")
    run = await start_daemon(net.config(), state_dir=state)
    d = run.daemon
    await wait_for(lambda: d.machine.link_up, within=10)
    net.server.book(DEVICE, in_s=0.1, duration_s=1)
    await wait_for(lambda: any(e.kind == "grant_refused" for e in net.server.events(DEVICE)),
                   within=10)
    refused = next(e for e in net.server.events(DEVICE) if e.kind == "grant_refused")
    assert refused.fields["reason"] == "refused"
    assert d.machine.state is State.IDLE and not d.guard.rail_on
    assert "nonce_store_corrupt" in [e.kind for e in net.server.events(DEVICE)]


def test_link_config_problems_are_config_errors() -> None:
    from tabletd.config import parse_config
    from tabletd.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        parse_config('[device]\nid = "t"\n[link]\nurl = "wss://h/"\nca_file = "a"\n'
                     'cert_file = "b"\nkey_file = "c"\ngrant_public_key = "AAAA"\n'
                     '[sim]\nself_grant_s = 5\n', "f.toml")
    text = "\n".join(exc.value.problems)
    assert "f.toml: [link] grant_public_key:" in text
    assert "[sim] self_grant_s = 5: the simulated board stands in for the server only" in text


async def test_forged_grants_are_telemetry_not_call_records(net: Net, start_daemon) -> None:
    """A forger cannot grow the outbox of protected records or block calls."""
    run = await start_daemon(net.config())
    d = run.daemon
    await wait_for(lambda: d.machine.link_up, within=10)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    now_ms = net.server.now_ms()
    for n in range(20):
        body = GrantBody(f"f-{n}", DEVICE, "X", now_ms, now_ms + 600_000, 60, "m" * 22, now_ms)
        reply = d.on_server_message(GrantMsg(body, sign_grant(body, Ed25519PrivateKey.generate())))
        assert reply is not None and reply.code == "bad_signature"
    await wait_for(lambda: d.store.count() == 0, within=10)
    kinds = [e.kind for e in net.server.events(DEVICE)]
    assert kinds.count("protocol_error") == 20 and "grant_refused" not in kinds
