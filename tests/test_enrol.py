"""Enrolment (docs/protocol.md section 7) on the reference server (REFERENCE SERVER —
development and tests only): real websockets over real server-authenticated TLS on loopback,
one-time tokens bound to a device, CSRs generated like the tablet generates them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from tabletd.devserver import DevServerError, ca, cli
from tabletd.devserver.server import DevServer
from tabletd.devserver.store import EnrolRefused, Store
from tabletd.link.messages import Welcome, decode_server_message
from tabletd.provision import (
    ENROL_SUBPROTOCOL,
    EnrolmentRefused,
    ProvisionError,
    ProvisioningFile,
    check_certificate,
    decode_reply,
    enrol,
    make_key_and_csr,
    parse_provisioning_file,
)

from .test_devserver import hello

DEVICE = "tab-enrol-1"
NOW_MS = 1_800_000_000_000


class Clock:
    """The server's wall clock, moved by the test."""

    def __init__(self) -> None:
        self.ms = NOW_MS

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def server(srv_dir: Path, clock: Clock) -> AsyncIterator[DevServer]:
    async with DevServer(srv_dir, tick_s=0.02, wall_ms=clock, enrol_port=0) as srv:
        yield srv


def pfile(srv: DevServer, token: str, device_id: str = DEVICE) -> ProvisioningFile:
    return ProvisioningFile(
        device_id=device_id, url=f"wss://localhost:{srv.port}/",
        enrol_url=f"wss://localhost:{srv.enrol_port}/",
        ca_pem=(srv.directory / ca.CA_CERT).read_text(), grant_public_key="unused", token=token)


def token_for(srv: DevServer, device_id: str = DEVICE, ttl_s: int = 3600) -> str:
    return srv.store.issue_token(device_id, srv.now_ms(), ttl_s)


async def refused(pf: ProvisioningFile, csr: str) -> str:
    with pytest.raises(EnrolmentRefused) as info:
        await enrol(pf, csr, timeout_s=5)
    return info.value.code


async def test_enrolment_issues_a_certificate_the_link_then_accepts(
        server: DevServer, tmp_path: Path) -> None:
    pf = pfile(server, token_for(server))
    key, csr = make_key_and_csr(DEVICE)
    cert_pem = await enrol(pf, csr, timeout_s=5)
    cert = check_certificate(cert_pem, pf, key)  # CN, our key, issued by the pinned CA
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    assert server.enrolments == 1
    # The new identity works on the mutual-TLS link: hello is welcomed.
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "c.pem").write_text(cert_pem)
    tls = ssl.create_default_context(cafile=server.directory / ca.CA_CERT)
    tls.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    async with connect(f"wss://localhost:{server.port}/", ssl=tls,
                       subprotocols=[Subprotocol("tabletd.v1")], open_timeout=5) as ws:
        await ws.send(hello(DEVICE))
        assert isinstance(decode_server_message(await ws.recv()), Welcome)


async def test_a_token_works_once(server: DevServer) -> None:
    pf = pfile(server, token_for(server))
    await enrol(pf, make_key_and_csr(DEVICE)[1], timeout_s=5)
    assert await refused(pf, make_key_and_csr(DEVICE)[1]) == "token_used"
    assert server.enrolments == 1


async def test_two_enrolments_racing_with_one_token_one_wins(server: DevServer) -> None:
    pf = pfile(server, token_for(server))
    results = await asyncio.gather(*(enrol(pf, make_key_and_csr(DEVICE)[1], timeout_s=5)
                                     for _ in range(4)), return_exceptions=True)
    wins = [r for r in results if isinstance(r, str)]
    losses = [r for r in results if isinstance(r, EnrolmentRefused)]
    assert len(wins) == 1 and len(losses) == 3
    assert {e.code for e in losses} == {"token_used"}


async def test_an_expired_token_is_refused(server: DevServer, clock: Clock) -> None:
    pf = pfile(server, token_for(server, ttl_s=60))
    clock.ms += 60_000
    assert await refused(pf, make_key_and_csr(DEVICE)[1]) == "token_expired"
    clock.ms -= 1  # one millisecond before its end it would still have worked
    await enrol(pf, make_key_and_csr(DEVICE)[1], timeout_s=5)


async def test_another_devices_token_is_refused_and_stays_usable(server: DevServer) -> None:
    token = token_for(server, "tab-other")
    pf = pfile(server, token)  # device DEVICE, token of tab-other
    assert await refused(pf, make_key_and_csr(DEVICE)[1]) == "token_wrong_device"
    await enrol(pfile(server, token, "tab-other"), make_key_and_csr("tab-other")[1],
                timeout_s=5)


async def test_an_unknown_token_is_refused(server: DevServer) -> None:
    token_for(server)
    pf = pfile(server, "A" * 43)
    assert await refused(pf, make_key_and_csr(DEVICE)[1]) == "token_invalid"


async def test_a_csr_for_another_name_is_refused_without_spending_the_token(
        server: DevServer) -> None:
    pf = pfile(server, token_for(server))
    assert await refused(pf, make_key_and_csr("someone-else")[1]) == "bad_csr"
    garbage = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    assert await refused(pf, garbage) == "bad_csr"
    await enrol(pf, make_key_and_csr(DEVICE)[1], timeout_s=5)  # the token was not spent


async def test_a_server_that_cannot_sign_answers_internal(server: DevServer) -> None:
    pf = pfile(server, token_for(server))
    (server.directory / ca.CA_KEY).unlink()  # the CA's key is gone
    assert await refused(pf, make_key_and_csr(DEVICE)[1]) == "internal"


async def test_a_server_outside_the_pinned_ca_is_refused(server: DevServer,
                                                          tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    ca.init(other)
    pf = dataclasses.replace(pfile(server, token_for(server)),
                             ca_pem=(other / ca.CA_CERT).read_text())
    with pytest.raises(ProvisionError, match="does not verify against \\[server\\] ca"):
        await enrol(pf, make_key_and_csr(DEVICE)[1], timeout_s=5)
    assert server.enrolments == 0


def test_a_reply_that_is_not_the_protocols_is_an_error() -> None:
    """A reply that is neither `enrolled` nor `error` (here: an `enrolled` for another
    device) is refused by the tablet."""
    with pytest.raises(ProvisionError, match="must carry device_id 'tab-1'"):
        decode_reply('{"type": "enrolled", "device_id": "tab-2", "certificate": "x"}', "tab-1")
    with pytest.raises(ProvisionError, match="lacks a code"):
        decode_reply('{"type": "error"}', "tab-1")
    with pytest.raises(ProvisionError, match="expected 'enrolled' or 'error'"):
        decode_reply('{"type": "welcome"}', "tab-1")
    with pytest.raises(ProvisionError, match="invalid: not JSON"):
        decode_reply("<html>", "tab-1")


def test_the_tablet_checks_the_certificate_it_is_given(srv_dir: Path, tmp_path: Path) -> None:
    pf = ProvisioningFile(device_id=DEVICE, url="wss://x/", enrol_url="wss://x/",
                          ca_pem=(srv_dir / ca.CA_CERT).read_text(), grant_public_key="-",
                          token="t" * 20)
    key, csr = make_key_and_csr(DEVICE)
    good = ca.sign_csr(srv_dir, csr.encode(), DEVICE).decode()
    check_certificate(good, pf, key)
    other_key, _ = make_key_and_csr(DEVICE)
    with pytest.raises(ProvisionError, match="certifies another key"):
        check_certificate(good, pf, other_key)
    with pytest.raises(ProvisionError, match="subject CN is not 'tab-enrol-1'"):
        check_certificate(ca.sign_csr(srv_dir, csr.encode(), "tab-x").decode(), pf, key)
    other = tmp_path / "other-ca"
    ca.init(other)
    with pytest.raises(ProvisionError,
                       match=r"not issued by \[server\] ca \(its signature does not verify"):
        check_certificate(ca.sign_csr(other, csr.encode(), DEVICE).decode(), pf, key)
    with pytest.raises(ProvisionError, match="not a PEM certificate"):
        check_certificate("garbage", pf, key)


async def raw_exchange(srv: DevServer, text: str) -> dict[str, str]:
    tls = ssl.create_default_context(cafile=srv.directory / ca.CA_CERT)
    async with connect(f"wss://localhost:{srv.enrol_port}/", ssl=tls, open_timeout=5,
                       subprotocols=[ENROL_SUBPROTOCOL]) as ws:
        await ws.send(text)
        answer: dict[str, str] = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        return answer


@pytest.mark.parametrize(("message", "detail"), [
    ("not json", "not JSON"),
    ("[]", "not a JSON object"),
    ('{"type": "hello"}', "expected type 'enrol'"),
    ('{"type": "enrol", "protocol": 2}', "protocol"),
    ('{"type": "enrol", "protocol": 1, "device_id": "a b", "token": "x", "csr": "x"}',
     "device_id"),
    ('{"type": "enrol", "protocol": 1, "device_id": "tab", "token": "short", "csr": "x"}',
     "token"),
    ('{"type": "enrol", "protocol": 1, "device_id": "tab", "token": "' + "t" * 20
     + '", "csr": 7}', "csr"),
])
async def test_malformed_enrolments_are_answered_bad_message(
        server: DevServer, message: str, detail: str) -> None:
    answer = await raw_exchange(server, message)
    assert answer["type"] == "error" and answer["code"] == "bad_message"
    assert detail in answer["detail"]


async def test_the_subprotocol_is_required(server: DevServer) -> None:
    tls = ssl.create_default_context(cafile=server.directory / ca.CA_CERT)
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"wss://localhost:{server.enrol_port}/", ssl=tls, open_timeout=5):
            pass
    assert info.value.response.status_code == 400


def test_tokens_are_stored_hashed_and_bounded(srv_dir: Path) -> None:
    with Store.open(srv_dir) as store:
        token = store.issue_token(DEVICE, NOW_MS, 3600)
        assert store.device(DEVICE) is not None  # registered by the token
        with pytest.raises(DevServerError, match="token lifetime 59 s"):
            store.issue_token(DEVICE, NOW_MS, 59)
        with pytest.raises(EnrolRefused) as info:
            store.consume_token(token, DEVICE, NOW_MS + 3600 * 1000)
        assert info.value.code == "token_expired"
    assert token.encode() not in (srv_dir / "store.sqlite").read_bytes()


def test_cli_writes_a_private_provisioning_file_the_tablet_reads(
        srv_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tabletd-provision.toml"
    assert cli.main(["provisioning-file", str(srv_dir), "tab-7", "--out", str(out),
                     "--url", "wss://srv.example:8443/v1/tablet",
                     "--enrol-url", "wss://srv.example:8444/", "--ttl", "600"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    pf = parse_provisioning_file(out.read_text(), str(out))
    assert (pf.device_id, pf.url, pf.enrol_url) == (
        "tab-7", "wss://srv.example:8443/v1/tablet", "wss://srv.example:8444/")
    assert pf.grant_public_key == ca.grant_public_key_b64(srv_dir)
    assert x509.load_pem_x509_certificate(pf.ca_pem.encode()) == \
        x509.load_pem_x509_certificate((srv_dir / ca.CA_CERT).read_bytes())
    # the file's token is live, for that device only
    with Store.open(srv_dir) as store, pytest.raises(EnrolRefused, match="token_wrong_device"):
        store.consume_token(pf.token, "tab-8", NOW_MS)
    capsys.readouterr()
    assert cli.main(["provisioning-file", str(srv_dir), "tab-7", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    bare = tmp_path / "bare"  # a store, but no CA: nothing is left behind
    bare.mkdir()
    lost = tmp_path / "lost.toml"
    assert cli.main(["provisioning-file", str(bare), "tab-7", "--out", str(lost)]) == 1
    assert "ca.pem: cannot read" in capsys.readouterr().err and not lost.exists()
    assert cli.main(["token", str(srv_dir), "tab-9", "--ttl", "10"]) == 1
    assert "must be 60 to 2592000 s" in capsys.readouterr().err
    assert cli.main(["token", str(srv_dir), "tab-9"]) == 0
    assert len(capsys.readouterr().out.strip()) == 43
