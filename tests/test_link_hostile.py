"""A hostile server: 10,000+ hypothesis-generated malformed frames, then forged, foreign,
expired and replayed grants, against the daemon as a real process. It must stay alive,
answer each with an error, and still run a genuine call correctly afterwards."""

from __future__ import annotations

import base64
import json
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.server import ServerConnection, serve

from tabletd.link.grants import GrantBody, sign_grant
from tabletd.link.messages import GrantMsg, Start, Welcome, encode

from .conftest import REPO

DEVICE = "tablet-sim-0001"
TYPES = ["welcome", "grant", "start", "end", "lock", "unlock", "ack", "error", "hello", ""]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Hostile:
    conn: ServerConnection
    errors: list[dict[str, Any]]
    proc: subprocess.Popen[bytes]
    key: Ed25519PrivateKey
    status_port: int

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.status_port}/v1/status"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body: dict[str, Any] = json.load(resp)
            return body

    def wait(self, what: str, predicate: Any, within: float = 10) -> None:
        end = time.monotonic() + within
        while not predicate():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            time.sleep(0.01)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    tmp = tmp_path_factory.mktemp("hostile")
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    connections: queue.Queue[ServerConnection] = queue.Queue()
    errors: list[dict[str, Any]] = []

    def handler(conn: ServerConnection) -> None:
        conn.recv(timeout=10)  # hello
        conn.send(encode(Welcome(server_time_ms=time.time_ns() // 1_000_000)))
        connections.put(conn)
        for data in conn:
            msg = json.loads(data)
            if msg.get("type") == "error":
                errors.append(msg)

    # no keepalive pings from this end: websockets draws their payload from the global
    # `random`, which hypothesis, generating in this process meanwhile, warns about
    server = serve(handler, "127.0.0.1", 0, subprotocols=["tabletd.v1"],  # type: ignore[list-item]
                   ping_interval=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.socket.getsockname()[1]
    status_port = free_port()
    text = (REPO / "config" / "sim.toml").read_text().replace("port = 8470",
                                                               f"port = {status_port}")
    text += f"""
[link]
url = "ws://127.0.0.1:{port}/"
insecure_dev = true
grant_public_key = "{base64.b64encode(public).decode()}"
"""
    config = tmp / "tabletd.toml"
    config.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "tabletd", "run", "--config", str(config),
                             "--state-dir", str(tmp / "state")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn = connections.get(timeout=20)
        yield Hostile(conn, errors, proc, key, status_port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        server.shutdown()


known_type = st.sampled_from(TYPES)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False), st.text(max_size=80))
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                         max_leaves=12)
member_names = st.sampled_from(["grant", "signature", "session_id", "reason", "ids",
                                "server_time_ms", "protocol", "code", "detail", "x"])
typed_objects = st.builds(
    lambda t, members: json.dumps({"type": t, **members}),
    known_type, st.dictionaries(member_names, json_like, max_size=4))
frames = st.one_of(
    typed_objects,
    json_like.map(json.dumps),
    st.text(max_size=300),
    st.binary(max_size=300),
    st.integers(50, 5000).map(lambda n: "[" * n),  # deep nesting
)
BATCH = 5


@settings(max_examples=2_100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.lists(frames, min_size=BATCH, max_size=BATCH))
def test_a_flood_of_malformed_frames(hostile: Hostile, batch: list[str | bytes]) -> None:
    """2,100 examples of 5 frames: 10,500 malformed frames on one connection."""
    for frame in batch:
        hostile.conn.send(frame)


def test_daemon_alive_and_answered_errors_after_the_flood(hostile: Hostile) -> None:
    assert hostile.proc.poll() is None, "the daemon died"
    hostile.wait("error replies", lambda: len(hostile.errors) >= 5_000, within=60)
    codes = {e["code"] for e in hostile.errors}
    assert codes <= {"bad_json", "bad_message", "unknown_type", "too_large", "bad_signature",
                     "foreign_device", "expired", "replayed", "no_clock", "refused",
                     "unknown_session", "busy", "locked", "not_yet_valid"}
    status = hostile.status()
    assert status["rail"] == "off" and status["link"]["connected"] is True


def body(**changes: Any) -> GrantBody:
    now = time.time_ns() // 1_000_000
    base = GrantBody(grant_id=f"g-{secrets.token_hex(4)}", device_id=DEVICE,
                     contact_label="Soeur", not_before_ms=now - 1000,
                     not_after_ms=now + 600_000, max_duration_s=2,
                     nonce=secrets.token_urlsafe(16), issued_at_ms=now)
    return replace(base, **changes)


def send_grant(h: Hostile, b: GrantBody, key: Ed25519PrivateKey | None = None) -> None:
    h.conn.send(encode(GrantMsg(b, sign_grant(b, key or h.key))))


def last_error(h: Hostile, ref: str) -> str:
    h.wait(f"an error for {ref}", lambda: any(e.get("ref") == ref for e in h.errors))
    return next(e["code"] for e in reversed(h.errors) if e.get("ref") == ref)


def test_bad_grants_are_refused_and_a_genuine_call_still_runs(hostile: Hostile) -> None:
    h = hostile
    forged = body()
    send_grant(h, forged, Ed25519PrivateKey.generate())
    assert last_error(h, forged.grant_id) == "bad_signature"
    foreign = body(device_id="someone-else")
    send_grant(h, foreign)
    assert last_error(h, foreign.grant_id) == "foreign_device"
    now = time.time_ns() // 1_000_000
    expired = body(not_before_ms=now - 600_000, not_after_ms=now - 1, issued_at_ms=now - 700_000)
    send_grant(h, expired)
    assert last_error(h, expired.grant_id) == "expired"

    genuine = body()
    send_grant(h, genuine)
    h.wait("the call to be scheduled", lambda: (h.status()["session"] or {}).get("id")
           == genuine.grant_id)
    replayed = replace(genuine, grant_id="g-replay")  # the same nonce, another body
    send_grant(h, replayed)
    assert last_error(h, "g-replay") == "replayed"
    h.conn.send(encode(Start(genuine.grant_id)))
    h.wait("the call to go live", lambda: h.status()["rail"] == "on")
    h.wait("the call to end at its deadline",
           lambda: h.status()["state"] == "ended", within=10)
    assert h.status()["rail"] == "off" and h.status()["session"]["end_reason"] == "deadline"
    assert h.proc.poll() is None
