"""The reference server (REFERENCE SERVER — development and tests only): its CA, its store,
and the server side of docs/protocol.md over real websockets and real mutual TLS on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from tabletd.devserver import DevServerError, UnknownRecordError, ca, cli, policy
from tabletd.devserver.policy import NOT_AFTER_SLACK_MS
from tabletd.devserver.server import DevServer
from tabletd.devserver.store import EventRecord, Store
from tabletd.link.grants import GrantBody, canonical_grant_bytes, load_public_key, sign_grant
from tabletd.link.messages import (
    Ack,
    End,
    ErrorMsg,
    EventMsg,
    GrantMsg,
    Hello,
    Lock,
    OutboxSummary,
    ServerMessage,
    SessionSummary,
    Start,
    Unlock,
    Welcome,
    decode_server_message,
    encode,
)

from .conftest import MS

DEVICE = "tab-1"
HOUR_MS = 3_600_000
T = TypeVar("T")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA for the module (key generation is the slow part); each test copies nothing
    from it but certificates, and gets its own store."""
    directory = tmp_path_factory.mktemp("devca")
    assert cli.main(["init", str(directory)]) == 0
    assert cli.main(["device", "add", str(directory), DEVICE]) == 0
    ca.issue_device(directory, "ghost")  # a certificate from the CA, never registered
    return directory


@pytest.fixture
def srv_dir(ca_dir: Path, tmp_path: Path) -> Path:
    """The module's CA and keys with a fresh store holding the registered DEVICE."""
    directory = tmp_path / "srv"
    directory.mkdir()
    for path in ca_dir.rglob("*"):
        if path.is_file() and path.name != "store.sqlite" and "store.sqlite" not in path.name:
            target = directory / path.relative_to(ca_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    with Store.open(directory) as store:
        store.add_device(DEVICE, now_ms())
    return directory


@pytest.fixture
async def server(srv_dir: Path) -> AsyncIterator[DevServer]:
    async with DevServer(srv_dir, tick_s=0.02) as srv:
        yield srv


def device_tls(directory: Path, device_id: str | None = DEVICE) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=directory / ca.CA_CERT)
    if device_id is not None:
        d = directory / ca.DEVICES / device_id
        ctx.load_cert_chain(d / ca.DEVICE_CERT, d / ca.DEVICE_KEY)
    return ctx


def open_device(srv: DevServer, device_id: str | None = DEVICE,
                subprotocols: list[str] | None = None) -> connect:
    return connect(f"wss://localhost:{srv.port}/", ssl=device_tls(srv.directory, device_id),
                   subprotocols=[Subprotocol(s) for s in (subprotocols or ["tabletd.v1"])],
                   open_timeout=5, close_timeout=1)


def hello(device_id: str = DEVICE, session: SessionSummary | None = None) -> str:
    return encode(Hello(device_id=device_id, software="test", boot_id="boot-1",
                        session=session, locked=False,
                        outbox=OutboxSummary(pending=0, oldest_seq=None)))


def event(kind: str = "dock", session_id: str | None = None, seq: int = 1,
          event_id: str | None = None, **fields: str) -> EventMsg:
    return EventMsg(id=event_id or str(uuid.uuid4()), seq=seq, kind=kind,
                    session_id=session_id, boot_id="boot-1", boot_ns=123, wall_time="-",
                    fields=dict(fields))


async def expect(ws: ClientConnection, kind: type[T], within: float = 2.0) -> T:
    """The next message of ``kind``, skipping acks; fails on anything else or a timeout."""
    async with asyncio.timeout(within):
        while True:
            msg: ServerMessage = decode_server_message(await ws.recv())
            if isinstance(msg, kind):
                return msg
            assert isinstance(msg, Ack), f"expected {kind.__name__}, got {msg}"


async def welcomed(ws: ClientConnection, session: SessionSummary | None = None) -> Welcome:
    await ws.send(hello(session=session))
    return await expect(ws, Welcome)


async def nothing_more(ws: ClientConnection, within: float = 0.2) -> None:
    """No message but acks arrives within ``within``."""
    with pytest.raises(TimeoutError):
        await expect(ws, ErrorMsg, within)  # expect() fails on anything but an Ack


# -- the CA ------------------------------------------------------------------------------


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_issues_server_and_device_certificates(ca_dir: Path) -> None:
    ca_cert = _load(ca_dir / ca.CA_CERT)
    server = _load(ca_dir / ca.SERVER_CERT)
    device = _load(ca_dir / ca.DEVICES / DEVICE / ca.DEVICE_CERT)
    for cert in (server, device):
        cert.verify_directly_issued_by(ca_cert)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = x509.ExtendedKeyUsage
    assert list(server.extensions.get_extension_for_class(eku).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(device.extensions.get_extension_for_class(eku).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ca.device_common_name(device) == DEVICE
    for key in (ca.CA_KEY, ca.SERVER_KEY, ca.GRANT_KEY, f"devices/{DEVICE}/{ca.DEVICE_KEY}"):
        assert stat.S_IMODE(os.stat(ca_dir / key).st_mode) == 0o600, key
    assert len(load_public_key(ca.grant_public_key_b64(ca_dir)).public_bytes_raw()) == 32


def test_ca_refuses_to_overwrite_and_names_missing_files(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DevServerError, match=r"ca\.key: already exists"):
        ca.init(ca_dir)
    with pytest.raises(DevServerError, match=r"device\.key: already exists"):
        ca.issue_device(ca_dir, DEVICE)
    with pytest.raises(DevServerError, match=r"ca\.key: cannot read"):
        ca.issue_device(tmp_path, "tab-9")
    with pytest.raises(DevServerError, match="device id"):
        ca.issue_device(ca_dir, "bad id/..")


def test_sign_csr_binds_the_given_device_id(ca_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")]))
           .sign(key, hashes.SHA256()))
    pem = ca.sign_csr(ca_dir, csr.public_bytes(serialization.Encoding.PEM), "tab-7")
    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(_load(ca_dir / ca.CA_CERT))
    assert ca.device_common_name(cert) == "tab-7"
    with pytest.raises(DevServerError, match="not a PEM certificate request"):
        ca.sign_csr(ca_dir, b"garbage", "tab-7")


def test_grant_signing_reproduces_protocol_vector_a1(tmp_path: Path) -> None:
    """docs/protocol.md appendix A.1, through the server's own key file and signer."""
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    (tmp_path / ca.GRANT_KEY).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    body = GrantBody(grant_id="call-2024-0001", device_id="tab-07",
                     contact_label='\u00c9lodie "Lou" Martin', not_before_ms=1717243200000,
                     not_after_ms=1717245000000, max_duration_s=1200,
                     nonce="q83vEjRWeJCrze8SNFZ4kA", issued_at_ms=1717156800000)
    assert policy.grant_from_json(policy.grant_to_json(body)) == body
    assert sign_grant(body, ca.load_grant_key(tmp_path)) == (
        "FZX/DVe+ixYZQu/ld5tEf+t5Wj7GszPRxVLONvEASLGkLywZGIZ/tvg6CVRSK+k5B+oYoe8mPHeg4FwKbnZjBA==")


# -- the store ---------------------------------------------------------------------------


def test_store_deduplicates_events_and_follows_the_call(srv_dir: Path) -> None:
    with Store.open(srv_dir) as store:
        sid = store.add_booking(DEVICE, contact="Marie", booked_at_ms=0, start_at_ms=10,
                                duration_s=5, not_before_ms=0, not_after_ms=99_999)
        started = EventRecord(str(uuid.uuid4()), 1, "call_started", sid, "b", 1, "-", {})
        ended = EventRecord(str(uuid.uuid4()), 2, "call_ended", sid, "b", 2, "-",
                            {"reason": "deadline"})
        assert store.add_events(DEVICE, [started, started], 5) == (1, 1)
        assert store.booking(sid).state == "started"  # type: ignore[union-attr]
        assert store.add_events(DEVICE, [ended, started], 6) == (1, 1)
        booking = store.booking(sid)
        assert booking is not None and (booking.state, booking.end_reason) == ("ended",
                                                                               "deadline")
        assert [e.seq for e in store.events(DEVICE)] == [1, 2]
        assert store.duplicates_received() == 2
        with pytest.raises(DevServerError, match="already ended"):
            store.request_end(sid, 7)
        with pytest.raises(UnknownRecordError, match="not registered"):
            store.queue_command("nobody", "lock", 7)


# -- connections -------------------------------------------------------------------------


async def test_hello_gets_welcome_with_server_time(server: DevServer) -> None:
    async with open_device(server) as ws:
        assert ws.subprotocol == "tabletd.v1"
        before = now_ms()
        welcome = await welcomed(ws)
        assert before - 5 <= welcome.server_time_ms <= now_ms() + 5
        assert server.connected(DEVICE)
    device = server.store.device(DEVICE)
    assert device is not None and device.software == "test"


@pytest.mark.parametrize("offset_ms", [HOUR_MS, -HOUR_MS])
async def test_clock_offset_skews_every_server_time(srv_dir: Path, offset_ms: int) -> None:
    async with DevServer(srv_dir, clock_offset_ms=offset_ms, tick_s=0.02) as srv, \
            open_device(srv) as ws:
        welcome = await welcomed(ws)
        assert abs(welcome.server_time_ms - (now_ms() + offset_ms)) < 1000
        # the CLI, another process in real use, books on the server's clock
        assert cli.main(["book", str(srv_dir), DEVICE, "--in", "60", "--duration", "5"]) == 0
        grant = await expect(ws, GrantMsg)
        assert abs(grant.body.issued_at_ms - (now_ms() + offset_ms)) < 1000
        assert grant.body.not_after_ms - grant.body.not_before_ms == (
            60_000 + 5_000 + NOT_AFTER_SLACK_MS)


async def test_events_are_acknowledged_after_storing_and_deduplicated(
        server: DevServer) -> None:
    async with open_device(server) as ws:
        await welcomed(ws)
        ev = event("dock", bay="3")
        await ws.send(encode(ev))
        ack = await expect(ws, Ack)
        assert ack.ids == (ev.id,)
        assert [e.id for e in server.events(DEVICE)] == [ev.id]  # stored before the ack
        await ws.send(encode(ev))  # at least once: the tablet may send it again
        assert (await expect(ws, Ack)).ids == (ev.id,)
        later = [event(seq=n) for n in range(2, 40)]
        for e in later:
            await ws.send(encode(e))
        acked: set[str] = set()
        while len(acked) < len(later):
            acked |= set((await expect(ws, Ack)).ids)
        assert acked == {e.id for e in later}
    assert len(server.events(DEVICE)) == 1 + len(later)
    assert server.duplicates_received == 1
    assert server.events(DEVICE)[0].fields == {"bay": "3"}


async def test_unregistered_device_is_refused(server: DevServer) -> None:
    async with open_device(server, "ghost") as ws:
        await ws.send(hello("ghost"))
        error = await expect(ws, ErrorMsg)
        assert error.code == "refused" and "not registered" in error.detail
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_hello_for_another_device_is_refused(server: DevServer) -> None:
    async with open_device(server) as ws:
        await ws.send(hello("tab-2"))
        error = await expect(ws, ErrorMsg)
        assert error.code == "refused" and "certificate" in error.detail
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert not server.connected(DEVICE)


async def test_first_message_must_be_hello(server: DevServer) -> None:
    async with open_device(server) as ws:
        await ws.send(encode(event()))
        assert (await expect(ws, ErrorMsg)).code == "bad_message"
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert server.events() == []


@pytest.mark.parametrize("offered", [["tabletd.v2"], ["chat", "tabletd.v0"]])
async def test_other_subprotocols_are_refused(server: DevServer, offered: list[str]) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with open_device(server, subprotocols=offered):
            pass
    assert refused.value.response.status_code == 400


async def test_client_without_certificate_is_refused(server: DevServer) -> None:
    with pytest.raises((OSError, ConnectionClosed, InvalidHandshake)):  # TLS 1.3: after
        async with open_device(server, device_id=None) as ws:
            await ws.send(hello())
            await ws.recv()


async def test_invalid_messages_get_errors_and_the_connection_stays(
        server: DevServer) -> None:
    async with open_device(server) as ws:
        await welcomed(ws)
        cases: list[tuple[str | bytes, str]] = [
            ("{not json", "bad_json"), ("[1, 2]", "bad_json"),
            ('{"type": "teleport"}', "unknown_type"),
            ('{"type": "start", "session_id": "x"}', "unknown_type"),
            ('{"type": "event", "id": "nope"}', "bad_message"),
            (b"\x00binary", "bad_message"),
            (hello(), "bad_message"),
        ]
        for frame, code in cases:
            await ws.send(frame)
            error = await expect(ws, ErrorMsg)
            assert error.code == code, (frame, error)
        ev = event()
        await ws.send(encode(ev))
        assert (await expect(ws, Ack)).ids == (ev.id,)
        await ws.send(encode(ErrorMsg(code="replayed", detail="seen", ref="call-x")))
        await ws.send(encode(event()))
        await expect(ws, Ack)
    assert server.messages_refused == len(cases)
    assert [(e.code, e.ref) for e in server.tablet_errors(DEVICE)] == [("replayed", "call-x")]


async def test_oversized_frame_closes_with_1009(server: DevServer) -> None:
    async with open_device(server) as ws:
        await welcomed(ws)
        await ws.send("x" * 70_000)
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


# -- calls -------------------------------------------------------------------------------


async def test_booked_call_gets_a_signed_grant_then_start_on_time(server: DevServer) -> None:
    key = load_public_key(ca.grant_public_key_b64(server.directory))
    async with open_device(server) as ws:
        await welcomed(ws)
        booked_at = server.now_ms()
        sid = server.book(DEVICE, in_s=0.3, duration_s=20, contact="Marie")
        grant = await expect(ws, GrantMsg, within=0.25)  # at once, well before the start
        key.verify(base64.b64decode(grant.signature),
                   canonical_grant_bytes(grant.body))
        body = grant.body
        assert (body.grant_id, body.device_id, body.contact_label, body.max_duration_s) == (
            sid, DEVICE, "Marie", 20)
        booking = server.booking(sid)
        assert booking is not None and booking.state == "granted"
        assert body.not_before_ms == booking.booked_at_ms >= booked_at
        assert body.not_after_ms == booking.start_at_ms + 20_000 + NOT_AFTER_SLACK_MS
        assert len(body.nonce) >= 22 and body.issued_at_ms >= booked_at
        start = await expect(ws, Start, within=1.0)
        assert start.session_id == sid
        assert server.now_ms() >= booking.start_at_ms  # not early
        assert server.now_ms() - booking.start_at_ms < 500  # and about on time
        assert server.booking(sid).state == "started"  # type: ignore[union-attr]
        await nothing_more(ws)  # no second grant or start on this connection

        server.end(sid)
        assert (await expect(ws, End)).session_id == sid
        assert server.booking(sid).state == "started"  # type: ignore[union-attr]
        ended = event("call_ended", sid, reason="staff_end")
        await ws.send(encode(ended))
        await expect(ws, Ack)
    final = server.booking(sid)
    assert final is not None and (final.state, final.end_reason) == ("ended", "staff_end")


async def test_lock_and_unlock_are_delivered_once(server: DevServer) -> None:
    async with open_device(server) as ws:
        await welcomed(ws)
        server.lock(DEVICE, "inspection")
        assert (await expect(ws, Lock)).reason == "inspection"
        server.unlock(DEVICE)
        await expect(ws, Unlock)
        await nothing_more(ws)
    assert all(c.sent_ms is not None for c in server.store.commands(DEVICE))


async def test_commands_wait_for_the_device_to_connect(server: DevServer) -> None:
    server.lock(DEVICE, "queued while offline")
    sid = server.book(DEVICE, in_s=0, duration_s=10)
    await asyncio.sleep(5 * 20 * MS)  # a few scheduler ticks with nobody connected
    assert server.booking(sid).state == "booked"  # type: ignore[union-attr]
    async with open_device(server) as ws:
        await welcomed(ws)
        assert (await expect(ws, GrantMsg)).body.grant_id == sid
        assert (await expect(ws, Start)).session_id == sid
        assert (await expect(ws, Lock)).reason == "queued while offline"


async def test_grant_is_resent_identical_on_reconnection(server: DevServer) -> None:
    sid = server.book(DEVICE, in_s=60, duration_s=10)
    async with open_device(server) as ws:
        await welcomed(ws)
        first = await expect(ws, GrantMsg)
    async with open_device(server) as ws:
        await welcomed(ws)  # the tablet lost it (no session in its hello)
        assert await expect(ws, GrantMsg) == first
    async with open_device(server) as ws:  # the tablet holds it: nothing to re-send
        await welcomed(ws, SessionSummary(id=sid, state="scheduled", remaining_ms=None))
        await nothing_more(ws)


async def test_ending_a_call_before_its_start_cancels_it(server: DevServer) -> None:
    async with open_device(server) as ws:
        await welcomed(ws)
        sid = server.book(DEVICE, in_s=0.5, duration_s=10)
        await expect(ws, GrantMsg)
        server.end(sid)
        assert (await expect(ws, End)).session_id == sid
        await nothing_more(ws, within=0.7)  # never started
    assert server.booking(sid).state == "cancelled"  # type: ignore[union-attr]


# -- the CLI, as a separate process ------------------------------------------------------


async def test_cli_serve_book_events(srv_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tabletd.devserver", "serve", str(srv_dir), "--port", "0",
        "--restart-in", "3", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            banner = (await proc.stdout.readline()).decode()
            line = (await proc.stdout.readline()).decode()
        assert "REFERENCE SERVER" in banner
        port = int(line.split("wss://127.0.0.1:")[1].split("/")[0])
        tls = device_tls(srv_dir)
        async with connect(f"wss://127.0.0.1:{port}/", ssl=tls, open_timeout=5,
                           subprotocols=[Subprotocol("tabletd.v1")]) as ws:
            await welcomed(ws)
            assert cli.main(["book", str(srv_dir), DEVICE, "--in", "0.2", "--duration", "30",
                             "--contact", "Paul"]) == 0
            sid = capsys.readouterr().out.strip()
            grant = await expect(ws, GrantMsg)
            assert (grant.body.grant_id, grant.body.contact_label) == (sid, "Paul")
            assert (await expect(ws, Start)).session_id == sid
            assert cli.main(["lock", str(srv_dir), DEVICE, "--reason", "fouille"]) == 0
            assert (await expect(ws, Lock)).reason == "fouille"
            ev = event("call_started", sid)
            await ws.send(encode(ev))
            await ws.send(encode(ev))
            acked: set[str] = set()
            while len(acked) < 1:
                acked |= set((await expect(ws, Ack)).ids)
            proc.terminate()  # SIGTERM: a restart, the tablet told when to come back
            async with asyncio.timeout(10):
                await ws.wait_closed()
            assert (ws.close_code, ws.close_reason) == (1012, "retry_after=3")
    finally:
        proc.terminate()
        await proc.wait()
    capsys.readouterr()
    assert cli.main(["events", str(srv_dir), "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["id"], x["kind"]) for x in lines] == [(ev.id, "call_started")]
    assert cli.main(["devices", str(srv_dir)]) == 0
    assert DEVICE in capsys.readouterr().out
    assert cli.main(["end", str(srv_dir), "no-such-call"]) == 1
    assert "no such booking" in capsys.readouterr().err


def test_help_labels_the_reference_server(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "REFERENCE SERVER — development and tests only" in capsys.readouterr().out


@pytest.mark.parametrize(("options", "message"), [
    (["--restart-in", "3601"], "--restart-in must be within 0..3600 s, got 3601"),
    (["--restart-in", "-1"], "--restart-in must be within 0..3600 s, got -1"),
    (["--readmit-per-s", "0"], "--readmit-per-s must be > 0, got 0"),
])
def test_serve_refuses_bad_stop_options_by_name(srv_dir: Path, options: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", str(srv_dir), "--port", "0", *options]) == 1
    assert capsys.readouterr().err.strip() == f"tabletd-devserver: {message}"
