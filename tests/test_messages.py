"""The protocol v1 message codec (``docs/protocol.md`` sections 1, 3 and 4).

First, round trips of every message type, by example and as a hypothesis property. Then
one invalid example per rule, each with its exact code and a detail that names the member.
Last, the codec's contract under fuzzing: any input either decodes or raises
``ProtocolError``, and the ``error`` that answers it always encodes.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tabletd.errors import TabletdError
from tabletd.link.grants import GrantBody
from tabletd.link.messages import (
    ERROR_CODES,
    MAX_MESSAGE_BYTES,
    Ack,
    DeviceMessage,
    EncodeError,
    End,
    ErrorMsg,
    EventMsg,
    GrantMsg,
    Hello,
    Lock,
    OutboxSummary,
    ProtocolError,
    ServerMessage,
    SessionSummary,
    Start,
    Unlock,
    Welcome,
    decode_device_message,
    decode_server_message,
    encode,
    error_for,
)

MAX_INT = 2**53 - 1
EVENT_ID = "0b7e2a9c-3f41-4c55-9d7e-2f6a1b8c9d0e"
SIGNATURE = base64.b64encode(bytes(range(64))).decode()
NONCE = "q1w2e3r4t5y6u7i8o9p0-_"
DecodeFn = Callable[[str | bytes], Any]

BODY = GrantBody(grant_id="call-42", device_id="tablet-0007", contact_label="Maman",
                 not_before_ms=1_700_000_000_000, not_after_ms=1_700_000_600_000,
                 max_duration_s=1800, nonce=NONCE, issued_at_ms=1_699_999_990_000)

SERVER_EXAMPLES: list[ServerMessage] = [
    Welcome(server_time_ms=1_700_000_000_123),
    Welcome(server_time_ms=0, retry_after_s=30),
    GrantMsg(body=BODY, signature=SIGNATURE),
    Start(session_id="call-42"),
    End(session_id="call-42"),
    Lock(reason="staff: cell search"),
    Unlock(),
    Ack(ids=(EVENT_ID, "not-a-uuid-but-fine")),
    ErrorMsg(code="busy", detail="a call is already booked", ref="call-41"),
]
DEVICE_EXAMPLES: list[DeviceMessage] = [
    Hello(device_id="tablet-0007", software="0.1.0", boot_id="4a1f-boot", session=None,
          locked=False, outbox=OutboxSummary(pending=0, oldest_seq=None)),
    Hello(device_id="tablet-0007", software="0.1.0", boot_id="4a1f-boot",
          session=SessionSummary(id="call-42", state="live", remaining_ms=61_000),
          locked=True, outbox=OutboxSummary(pending=3, oldest_seq=17)),
    Hello(device_id="t", software="", boot_id="b",
          session=SessionSummary(id="c", state="scheduled", remaining_ms=None),
          locked=False, outbox=OutboxSummary(pending=0, oldest_seq=None)),
    EventMsg(id=EVENT_ID, seq=17, kind="call_ended", session_id="call-42", boot_id="4a1f-boot",
             boot_ns=123_456_789, wall_time="2026-11-27T07:48:10.684+00:00",
             fields={"reason": "deadline", "cutoff_lateness_ms": 2.456, "session_id": "call-42",
                     "nested": [1, None, True, {"é": "ü"}]}),
    EventMsg(id=EVENT_ID.upper(), seq=0, kind="privacy_engaged", session_id=None,
             boot_id="b", boot_ns=0, wall_time="", fields={}),
    ErrorMsg(code="bad_json", detail="not JSON", ref=None),
]


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def as_obj(msg: ServerMessage | DeviceMessage) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(encode(msg))
    return obj


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("msg", SERVER_EXAMPLES, ids=lambda m: type(m).__name__)
def test_server_message_round_trip(msg: ServerMessage) -> None:
    text = encode(msg)
    assert decode_server_message(text) == msg
    assert decode_server_message(text.encode("utf-8")) == msg


@pytest.mark.parametrize("msg", DEVICE_EXAMPLES, ids=lambda m: type(m).__name__)
def test_device_message_round_trip(msg: DeviceMessage) -> None:
    text = encode(msg)
    assert decode_device_message(text) == msg
    assert decode_device_message(text.encode("utf-8")) == msg


def test_encode_is_compact_with_type_first() -> None:
    assert encode(Start(session_id="s1")) == '{"type":"start","session_id":"s1"}'
    assert encode(Unlock()) == '{"type":"unlock"}'
    assert encode(Welcome(server_time_ms=5)) == '{"type":"welcome","protocol":1,"server_time_ms":5}'
    assert encode(Welcome(server_time_ms=5, retry_after_s=0)).endswith(',"retry_after_s":0}')
    assert encode(ErrorMsg("busy", "x")) == '{"type":"error","code":"busy","detail":"x","ref":null}'
    hello = as_obj(DEVICE_EXAMPLES[0])
    assert hello["protocol"] == 1
    assert list(hello) == ["type", "protocol", "device_id", "software", "boot_id", "session",
                           "locked", "outbox"]
    assert list(as_obj(GrantMsg(BODY, SIGNATURE))["grant"]) == [
        "grant_id", "device_id", "contact_label", "not_before_ms", "not_after_ms",
        "max_duration_s", "nonce", "issued_at_ms"]
    # Non-ASCII goes out as UTF-8, not \u escapes (and counts as bytes for the size limit).
    assert "é" in encode(Lock(reason="fermé"))


def test_messages_are_frozen_and_hashable() -> None:
    for msg in [*SERVER_EXAMPLES, *DEVICE_EXAMPLES]:
        hash(msg)
        with pytest.raises(AttributeError):
            msg.TYPE_ = 1  # type: ignore[union-attr]


def test_error_is_shared_by_both_directions() -> None:
    text = encode(ErrorMsg("refused", "privacy switch engaged", "call-1"))
    assert decode_server_message(text) == decode_device_message(text)


# ---- the valid-message property ------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
texts = st.text(max_size=256)
ints = st.integers(0, MAX_INT)
json_leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


@st.composite
def grant_bodies(draw: st.DrawFn) -> GrantBody:
    nb, na = sorted(draw(st.lists(ints, min_size=2, max_size=2, unique=True)))
    return GrantBody(
        grant_id=draw(ids), device_id=draw(ids), contact_label=draw(st.text(max_size=64)),
        not_before_ms=nb, not_after_ms=na, max_duration_s=draw(st.integers(1, 7200)),
        nonce=draw(st.from_regex(r"[A-Za-z0-9_-]{22,64}", fullmatch=True)),
        issued_at_ms=draw(ints),
    )


server_messages: st.SearchStrategy[ServerMessage] = st.one_of(
    st.builds(Welcome, server_time_ms=ints, retry_after_s=st.none() | st.integers(0, 3600)),
    st.builds(GrantMsg, body=grant_bodies(), signature=st.binary(min_size=64, max_size=64).map(
        lambda b: base64.b64encode(b).decode())),
    st.builds(Start, session_id=ids),
    st.builds(End, session_id=ids),
    st.builds(Lock, reason=texts),
    st.just(Unlock()),
    st.builds(Ack, ids=st.lists(texts, min_size=1, max_size=30).map(tuple)),
    st.builds(ErrorMsg, code=st.sampled_from(sorted(ERROR_CODES)) | texts,
              detail=st.text(max_size=1024), ref=st.none() | texts),
)
device_messages: st.SearchStrategy[DeviceMessage] = st.one_of(
    st.builds(
        Hello, device_id=ids, software=texts, boot_id=texts,
        session=st.none() | st.builds(SessionSummary, id=ids,
                                      state=st.sampled_from(["scheduled", "live", "ended"]),
                                      remaining_ms=st.none() | ints),
        locked=st.booleans(),
        outbox=st.builds(OutboxSummary, pending=ints, oldest_seq=st.none() | ints),
    ),
    st.builds(
        EventMsg, id=st.uuids().map(str), seq=ints, kind=texts, session_id=st.none() | ids,
        boot_id=texts, boot_ns=ints, wall_time=texts,
        fields=st.dictionaries(st.text(max_size=16), json_values, max_size=6),
    ),
)


@settings(max_examples=400, deadline=None)
@given(server_messages)
def test_any_valid_server_message_round_trips(msg: ServerMessage) -> None:
    assert decode_server_message(encode(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(device_messages)
def test_any_valid_device_message_round_trips(msg: DeviceMessage) -> None:
    assert decode_device_message(encode(msg)) == msg


# ---- one example per rule ------------------------------------------------------------------

DROP = object()


class Raw:
    """Literal JSON text to put where a member's value goes (NaN, 1e400, 5000 digits...)."""

    def __init__(self, text: str) -> None:
        self.text = text


BASE: dict[str, dict[str, Any]] = {
    "welcome": as_obj(Welcome(server_time_ms=1_700_000_000_123, retry_after_s=5)),
    "grant": as_obj(GrantMsg(BODY, SIGNATURE)),
    "start": as_obj(Start("call-42")),
    "end": as_obj(End("call-42")),
    "lock": as_obj(Lock("staff")),
    "unlock": as_obj(Unlock()),
    "ack": as_obj(Ack((EVENT_ID,))),
    "error": as_obj(ErrorMsg("busy", "a call is already booked", "call-41")),
    "hello": as_obj(DEVICE_EXAMPLES[1]),
    "event": as_obj(DEVICE_EXAMPLES[3]),
}
DEVICE_TYPES = {"hello", "event"}


def variant(kind: str, path: str, value: Any) -> str:
    """The base message of ``kind`` with the member at dotted ``path`` set, or removed if
    ``value`` is DROP, as JSON text."""
    obj = json.loads(json.dumps(BASE[kind]))
    *parents, last = path.split(".")
    target = obj
    for name in parents:
        target = target[name]
    raw = None
    if value is DROP:
        del target[last]
    elif isinstance(value, Raw):
        target[last] = "@@RAW@@"
        raw = value.text
    else:
        target[last] = value
    text = json.dumps(obj, ensure_ascii=True)
    return text if raw is None else text.replace('"@@RAW@@"', raw, 1)


def decoder_for(kind: str) -> DecodeFn:
    return decode_device_message if kind in DEVICE_TYPES else decode_server_message


INT_RULE = "must be within 0..9007199254740991"
ID_RULE = "must be an id (1 to 64 of A-Z a-z 0-9 - _ .)"
BAD_MESSAGE_CASES: list[tuple[str, str, Any, str]] = [
    # (message type, member path, value, expected detail: exact, or a prefix ending in "...")
    ("welcome", "protocol", DROP, "protocol: missing"),
    ("welcome", "protocol", 2, "protocol: must be 1, got 2"),
    ("welcome", "protocol", True, "protocol: must be 1, got true"),
    ("welcome", "protocol", Raw("1.0"), "protocol: must be 1, got 1.0"),
    ("welcome", "server_time_ms", DROP, "server_time_ms: missing"),
    ("welcome", "server_time_ms", True, "server_time_ms: must be an integer, got true"),
    ("welcome", "server_time_ms", False, "server_time_ms: must be an integer, got false"),
    ("welcome", "server_time_ms", "1", 'server_time_ms: must be an integer, got "1"'),
    ("welcome", "server_time_ms", None, "server_time_ms: must be an integer, got null"),
    ("welcome", "server_time_ms", Raw("1.5"), "server_time_ms: must be an integer, got 1.5"),
    ("welcome", "server_time_ms", Raw("1e3"), "server_time_ms: must be an integer, got 1000.0"),
    ("welcome", "server_time_ms", Raw("7.0"), "server_time_ms: must be an integer, got 7.0"),
    ("welcome", "server_time_ms", Raw("1e400"),
     "server_time_ms: must be an integer, got Infinity"),
    ("welcome", "server_time_ms", -1, f"server_time_ms: {INT_RULE}, got -1"),
    ("welcome", "server_time_ms", 2**53, f"server_time_ms: {INT_RULE}, got 9007199254740992"),
    ("welcome", "server_time_ms", Raw("9" * 5000),
     f"server_time_ms: {INT_RULE}, got a 5000-digit number"),
    ("welcome", "server_time_ms", [1], "server_time_ms: must be an integer, got an array"),
    ("welcome", "retry_after_s", 3601, "retry_after_s: must be within 0..3600, got 3601"),
    ("welcome", "retry_after_s", -1, "retry_after_s: must be within 0..3600, got -1"),
    ("welcome", "retry_after_s", None, "retry_after_s: must be an integer, got null"),
    ("grant", "grant", DROP, "grant: missing"),
    ("grant", "grant", [], "grant: must be an object, got an array"),
    ("grant", "grant", "x", 'grant: must be an object, got "x"'),
    ("grant", "grant.surplus", 1, 'grant: unexpected member "surplus"'),
    ("grant", "grant.grant_id", "", f'grant.grant_id: {ID_RULE}, got ""'),
    ("grant", "grant.grant_id", "a b", f'grant.grant_id: {ID_RULE}, got "a b"'),
    ("grant", "grant.grant_id", "a/b", f'grant.grant_id: {ID_RULE}, got "a/b"'),
    ("grant", "grant.grant_id", "é", f'grant.grant_id: {ID_RULE}, got "\\u00e9"'),
    ("grant", "grant.grant_id", "x" * 65, f"grant.grant_id: {ID_RULE}, got ..."),
    ("grant", "grant.grant_id", "call\n", f'grant.grant_id: {ID_RULE}, got "call\\n"'),
    ("grant", "grant.device_id", 7, f"grant.device_id: {ID_RULE}, got 7"),
    ("grant", "grant.contact_label", "x" * 65,
     "grant.contact_label: must be at most 64 characters, got 65"),
    ("grant", "grant.contact_label", "\ud800",
     "grant.contact_label: must be Unicode text, got a lone surrogate"),
    ("grant", "grant.not_before_ms", Raw("1.5"),
     "grant.not_before_ms: must be an integer, got 1.5"),
    ("grant", "grant.not_after_ms", Raw("1.5"), "grant.not_after_ms: must be an integer, got 1.5"),
    ("grant", "grant.not_after_ms", BODY.not_before_ms,
     f"grant.not_after_ms: must be greater than not_before_ms ({BODY.not_before_ms}), "
     f"got {BODY.not_before_ms}"),
    ("grant", "grant.not_after_ms", 2**53, f"grant.not_after_ms: {INT_RULE}, got ..."),
    ("grant", "grant.max_duration_s", 0, "grant.max_duration_s: must be within 1..7200, got 0"),
    ("grant", "grant.max_duration_s", 7201,
     "grant.max_duration_s: must be within 1..7200, got 7201"),
    ("grant", "grant.max_duration_s", Raw("60.0"),
     "grant.max_duration_s: must be an integer, got 60.0"),
    ("grant", "grant.nonce", "A" * 21, "grant.nonce: must be 22 to 64 characters of base64url "
                                        "without padding, got ..."),
    ("grant", "grant.nonce", "A" * 65, "grant.nonce: must be 22 to 64 characters ..."),
    ("grant", "grant.nonce", "A" * 22 + "==", "grant.nonce: must be 22 to 64 characters ..."),
    ("grant", "grant.nonce", "A" * 21 + "+", "grant.nonce: must be 22 to 64 characters ..."),
    ("grant", "grant.nonce", None, "grant.nonce: must be 22 to 64 characters of base64url "
                                   "without padding, got null"),
    ("grant", "grant.issued_at_ms", -5, f"grant.issued_at_ms: {INT_RULE}, got -5"),
    ("grant", "signature", DROP, "signature: missing"),
    ("grant", "signature", SIGNATURE.rstrip("="), "signature: must be a 64-byte Ed25519 ..."),
    ("grant", "signature", base64.b64encode(bytes(63)).decode(), "signature: must be a 64-..."),
    ("grant", "signature", base64.b64encode(bytes(65)).decode(), "signature: must be a 64-..."),
    ("grant", "signature", base64.urlsafe_b64encode(b"\xff" * 64).decode(),
     "signature: must be a 64-byte ..."),
    ("grant", "signature", SIGNATURE[:85] + "B==", "signature: must be a 64-byte ..."),
    ("grant", "signature", 12, "signature: must be a 64-byte Ed25519 signature in base64 with "
                               "padding (88 characters), got 12"),
    ("start", "session_id", DROP, "session_id: missing"),
    ("start", "session_id", None, f"session_id: {ID_RULE}, got null"),
    ("end", "session_id", "no spaces", f'session_id: {ID_RULE}, got "no spaces"'),
    ("lock", "reason", DROP, "reason: missing"),
    ("lock", "reason", 5, "reason: must be a string, got 5"),
    ("lock", "reason", "r" * 257, "reason: must be at most 256 characters, got 257"),
    ("lock", "reason", "\udfff", "reason: must be Unicode text, got a lone surrogate"),
    ("ack", "ids", DROP, "ids: missing"),
    ("ack", "ids", [], "ids: must hold 1 to 1000 ids, got 0"),
    ("ack", "ids", [EVENT_ID] * 1001, "ids: must hold 1 to 1000 ids, got 1001"),
    ("ack", "ids", EVENT_ID, f'ids: must be an array, got "{EVENT_ID}"'),
    ("ack", "ids", [EVENT_ID, 1], "ids[1]: must be a string, got 1"),
    ("ack", "ids", ["x" * 257], "ids[0]: must be at most 256 characters, got 257"),
    ("error", "code", DROP, "code: missing"),
    ("error", "code", 5, "code: must be a string, got 5"),
    ("error", "detail", "d" * 1025, "detail: must be at most 1024 characters, got 1025"),
    ("error", "ref", 3, "ref: must be a string, got 3"),
    ("error", "ref", DROP, "ref: missing"),
    ("hello", "protocol", 2, "protocol: must be 1, got 2"),
    ("hello", "protocol", DROP, "protocol: missing"),
    ("hello", "device_id", "bad id", f'device_id: {ID_RULE}, got "bad id"'),
    ("hello", "software", "s" * 257, "software: must be at most 256 characters, got 257"),
    ("hello", "boot_id", DROP, "boot_id: missing"),
    ("hello", "session", "call-42", 'session: must be an object, got "call-42"'),
    ("hello", "session", DROP, "session: missing"),
    ("hello", "session.id", DROP, "session.id: missing"),
    ("hello", "session.state", "paused",
     'session.state: must be one of scheduled, live, ended, got "paused"'),
    ("hello", "session.state", DROP, "session.state: missing"),
    ("hello", "session.remaining_ms", -1, f"session.remaining_ms: {INT_RULE}, got -1"),
    ("hello", "session.remaining_ms", Raw("1.5"),
     "session.remaining_ms: must be an integer, got 1.5"),
    ("hello", "session.remaining_ms", DROP, "session.remaining_ms: missing"),
    ("hello", "locked", 1, "locked: must be true or false, got 1"),
    ("hello", "locked", "true", 'locked: must be true or false, got "true"'),
    ("hello", "locked", None, "locked: must be true or false, got null"),
    ("hello", "outbox", DROP, "outbox: missing"),
    ("hello", "outbox", None, "outbox: must be an object, got null"),
    ("hello", "outbox.pending", True, "outbox.pending: must be an integer, got true"),
    ("hello", "outbox.oldest_seq", "1", 'outbox.oldest_seq: must be an integer, got "1"'),
    ("hello", "outbox.oldest_seq", DROP, "outbox.oldest_seq: missing"),
    ("event", "id", "not-a-uuid", 'id: must be a UUID (8-4-4-4-12 hex digits), got "not-a-uuid"'),
    ("event", "id", EVENT_ID.replace("-", ""), "id: must be a UUID ..."),
    ("event", "id", "{" + EVENT_ID + "}", "id: must be a UUID ..."),
    ("event", "id", DROP, "id: missing"),
    ("event", "seq", True, "seq: must be an integer, got true"),
    ("event", "seq", -1, f"seq: {INT_RULE}, got -1"),
    ("event", "kind", "k" * 257, "kind: must be at most 256 characters, got 257"),
    ("event", "session_id", "a b", f'session_id: {ID_RULE}, got "a b"'),
    ("event", "session_id", DROP, "session_id: missing"),
    ("event", "boot_id", None, "boot_id: must be a string, got null"),
    ("event", "boot_ns", 2**63,
     "boot_ns: must be within 0..9223372036854775807, got 9223372036854775808"),
    ("event", "wall_time", 5, "wall_time: must be a string, got 5"),
    ("event", "fields", DROP, "fields: missing"),
    ("event", "fields", [], "fields: must be an object, got an array"),
    ("event", "fields", None, "fields: must be an object, got null"),
    ("event", "fields.lateness_ms", Raw("1e400"),
     "fields: must hold finite numbers, got one beyond a double's range"),
    ("event", "fields.lateness_ms", Raw("-1e400"), "fields: must hold finite numbers, ..."),
    ("event", "fields.n", Raw("9" * 5000),
     "fields: must hold representable numbers, got a 5000-digit number"),
    ("event", "fields.s", "\ud800",
     "fields: must be Unicode text, got a string with a lone surrogate"),
    ("event", "fields.\udc00", 1, "fields: must be Unicode text, got a name with a lone surrogate"),
]
for _member in BASE["grant"]["grant"]:
    BAD_MESSAGE_CASES.append(("grant", f"grant.{_member}", DROP, f"grant.{_member}: missing"))


def assert_detail(detail: str, expected: str) -> None:
    if expected.endswith("..."):
        assert detail.startswith(expected[:-3]), detail
    else:
        assert detail == expected


@pytest.mark.parametrize(("kind", "path", "value", "detail"), BAD_MESSAGE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(BAD_MESSAGE_CASES)])
def test_bad_message(kind: str, path: str, value: Any, detail: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decoder_for(kind)(variant(kind, path, value))
    assert caught.value.code == "bad_message"
    assert_detail(caught.value.detail, detail)
    assert str(caught.value) == f"bad_message: {caught.value.detail}"


@pytest.mark.parametrize(("kind", "path", "value"), [
    # The bounds themselves are valid.
    ("welcome", "server_time_ms", 0),
    ("welcome", "server_time_ms", MAX_INT),
    ("welcome", "server_time_ms", Raw("-0")),
    ("welcome", "retry_after_s", 0),
    ("welcome", "retry_after_s", 3600),
    ("welcome", "retry_after_s", DROP),  # "integer or absent"
    ("grant", "grant.grant_id", "A-z_0.9" + "x" * 57),
    ("grant", "grant.contact_label", "é" * 64),
    ("grant", "grant.contact_label", ""),
    ("grant", "grant.max_duration_s", 1),
    ("grant", "grant.max_duration_s", 7200),
    ("grant", "grant.nonce", "A" * 22),
    ("grant", "grant.nonce", "-_" * 32),
    ("grant", "grant.not_after_ms", BODY.not_before_ms + 1),
    ("lock", "reason", "r" * 256),
    ("lock", "reason", "😀" * 256),  # characters, not bytes or UTF-16 units
    ("lock", "reason", ""),
    ("ack", "ids", [EVENT_ID] * 1000),
    ("ack", "ids", ["", "anything", "x" * 256]),  # unknown ids are not an error
    ("error", "detail", "d" * 1024),
    ("error", "code", "a_code_from_the_future"),
    ("error", "ref", None),
    ("hello", "session", None),
    ("hello", "session.remaining_ms", None),
    ("hello", "session.state", "ended"),
    ("hello", "outbox.oldest_seq", None),
    ("event", "session_id", None),
    ("event", "id", EVENT_ID.upper()),
    ("event", "boot_ns", MAX_INT),
    ("event", "boot_ns", 2**53 + 1),  # 104 days of uptime and more
    ("event", "boot_ns", 2**63 - 1),
    ("event", "fields.big", 2**70),  # fields are the kind's own: no protocol integer bounds
    ("event", "fields.long", "x" * 3000),
    ("event", "fields.tiny", Raw("1e-400")),  # underflows to 0.0: a finite number
    # Unlisted members are ignored, whatever they hold (forward compatibility).
    ("welcome", "future", {"deep": [1, 2, {"x": None}]}),
    ("welcome", "future", Raw("1e400")),
    ("welcome", "future", Raw("9" * 5000)),
    ("welcome", "future", "\ud800"),
    ("welcome", "future", "x" * 60_000),
    ("start", "protocol", "whatever"),
    ("unlock", "session_id", "whatever"),
    ("hello", "session.future", 1),
    ("hello", "outbox.future", 1),
])
def test_valid_edge(kind: str, path: str, value: Any) -> None:
    decoder_for(kind)(variant(kind, path, value))


def test_unlisted_members_are_dropped() -> None:
    text = variant("start", "colour", "blue")
    assert decode_server_message(text) == Start(session_id="call-42")
    assert encode(decode_server_message(text)) == '{"type":"start","session_id":"call-42"}'


# ---- the type member, JSON and size ----------------------------------------------------------


@pytest.mark.parametrize(("decode", "text", "code", "detail"), [
    (decode_server_message, '{"session_id":"x"}', "bad_message", "type: missing"),
    (decode_server_message, '{"type":3}', "bad_message", "type: must be a string, got 3"),
    (decode_server_message, '{"type":null}', "bad_message", "type: must be a string, got null"),
    (decode_server_message, '{"type":"frobnicate"}', "unknown_type",
     'type: unknown type "frobnicate"'),
    (decode_server_message, '{"type":"Start","session_id":"x"}', "unknown_type",
     'type: unknown type "Start"'),
    (decode_server_message, json.dumps(BASE["hello"]), "unknown_type",
     'type: "hello" is not a server-to-tablet message'),
    (decode_server_message, json.dumps(BASE["event"]), "unknown_type",
     'type: "event" is not a server-to-tablet message'),
    (decode_device_message, json.dumps(BASE["grant"]), "unknown_type",
     'type: "grant" is not a tablet-to-server message'),
    (decode_device_message, json.dumps(BASE["ack"]), "unknown_type",
     'type: "ack" is not a tablet-to-server message'),
    (decode_device_message, '{"type":"unlock"}', "unknown_type",
     'type: "unlock" is not a tablet-to-server message'),
])
def test_type_member(decode: DecodeFn, text: str, code: str, detail: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(text)
    assert (caught.value.code, caught.value.detail) == (code, detail)


BAD_JSON: list[tuple[str | bytes, str]] = [
    ("", "not JSON: ..."),
    ("   ", "not JSON: ..."),
    ("{", "not JSON: ..."),
    ('{"type":"unlock"} x', "not JSON: Extra data ..."),
    ('{"type":"unlock",}', "not JSON: ..."),
    ("{'type':'unlock'}", "not JSON: ..."),
    ('{"type":"lock","reason":"a\nb"}', "not JSON: Invalid control character ..."),
    ("\ufeff" + '{"type":"unlock"}', "not JSON: ..."),
    ("[]", "not a JSON object, got an array"),
    ('[{"type":"unlock"}]', "not a JSON object, got an array"),
    ('"unlock"', 'not a JSON object, got "unlock"'),
    ("null", "not a JSON object, got null"),
    ("3", "not a JSON object, got 3"),
    ("true", "not a JSON object, got true"),
    (b"\xff\xfe{}", "not UTF-8 at byte 0"),
    (b'{"type":"lock","reason":"\xc3"}', "not UTF-8 at byte ..."),
    (b'{"type":"lock","reason":"\xed\xa0\x80"}', "not UTF-8 ..."),  # an encoded surrogate
    ('{"type":"lock","reason":"\ud800"}', "not UTF-8 (lone surrogate)"),  # a str can hold one
    ('{"type":"welcome","protocol":1,"server_time_ms":NaN}', "NaN is not JSON"),
    ('{"type":"welcome","protocol":1,"server_time_ms":Infinity}', "Infinity is not JSON"),
    ('{"type":"welcome","protocol":1,"server_time_ms":-Infinity}', "-Infinity is not JSON"),
    ('{"type":"welcome","protocol":1,"server_time_ms":1,"future":NaN}', "NaN is not JSON"),
    ('{"type":"unlock","x":' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply to parse"),
    ("[" * 60_000, "nested too deeply to parse"),
    ('{"a":' * 10_000 + "1" + "}" * 10_000, "nested too deeply to parse"),
]


@pytest.mark.parametrize(("data", "detail"), BAD_JSON, ids=range(len(BAD_JSON)))
@pytest.mark.parametrize("decode", [decode_server_message, decode_device_message])
def test_bad_json(decode: DecodeFn, data: str | bytes, detail: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(data)
    assert caught.value.code == "bad_json"
    assert_detail(caught.value.detail, detail)
    assert caught.value.ref is None


def padded_to(size: int) -> str:
    """A valid ``unlock`` of exactly ``size`` bytes, padded in an unlisted member."""
    frame = '{"type":"unlock","pad":""}'
    text = frame[:-2] + "x" * (size - len(frame)) + '"}'
    assert len(text.encode()) == size
    return text


@pytest.mark.parametrize("decode", [decode_server_message, decode_device_message])
def test_size_limit(decode: DecodeFn) -> None:
    at_limit = padded_to(MAX_MESSAGE_BYTES)
    for data in (at_limit, at_limit.encode()):
        if decode is decode_server_message:
            assert decode(data) == Unlock()
        else:  # past the size check, refused for its type
            with pytest.raises(ProtocolError, match="unknown_type"):
                decode(data)
    too_big: list[str | bytes] = [
        padded_to(MAX_MESSAGE_BYTES + 1),
        padded_to(MAX_MESSAGE_BYTES + 1).encode(),
        # Fewer characters than the limit, more bytes: the limit is in bytes of UTF-8.
        '{"type":"unlock","pad":"' + "€" * 30_000 + '"}',
        # Checked before parsing: neither invalid JSON nor NaN nor nesting gets that far.
        "{" * (MAX_MESSAGE_BYTES + 1),
        "[" * 10 * MAX_MESSAGE_BYTES,
        b"\xff" * (MAX_MESSAGE_BYTES + 1),
        '{"type":"welcome","protocol":1,"server_time_ms":NaN,"p":"' + "x" * MAX_MESSAGE_BYTES,
    ]
    for big in too_big:
        with pytest.raises(ProtocolError) as caught:
            decode(big)
        assert caught.value.code == "too_large"
        assert "over 65536" in caught.value.detail


def test_frame_of_the_wrong_type_is_our_bug() -> None:
    with pytest.raises(TypeError):
        decode_server_message(bytearray(b"{}"))  # type: ignore[arg-type]


# ---- the error answer ------------------------------------------------------------------------


def test_protocol_error_is_the_peers_fault() -> None:
    exc = ProtocolError("bad_message", "x: missing")
    assert isinstance(exc, TabletdError)
    assert isinstance(exc, ValueError)
    assert (exc.code, exc.detail, exc.ref) == ("bad_message", "x: missing", None)
    assert not isinstance(exc, EncodeError)


@pytest.mark.parametrize(("decode", "text", "ref"), [
    (decode_server_message, variant("grant", "grant.nonce", "short"), "call-42"),
    (decode_server_message, variant("grant", "signature", "AA=="), "call-42"),
    (decode_server_message, variant("grant", "grant.surplus", 1), "call-42"),
    (decode_server_message, variant("grant", "grant.grant_id", "bad id"), None),
    (decode_server_message, variant("grant", "grant.grant_id", 42), None),
    (decode_server_message, variant("grant", "grant.grant_id", "x" * 65), None),
    (decode_server_message, variant("grant", "grant", [1]), None),
    (decode_server_message, '{"type":"start","session_id":"s-1","type":"begin"}', "s-1"),
    (decode_server_message, '{"type":"start"}', None),
    (decode_server_message, '{"type":3,"session_id":"s-2"}', "s-2"),
    (decode_device_message, variant("event", "seq", -1), "call-42"),
    (decode_device_message, variant("event", "session_id", "a b"), None),
    (decode_server_message, "[]", None),
])
def test_ref_names_the_grant_or_session_when_readable(decode: DecodeFn, text: str,
                                                     ref: str | None) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(text)
    assert caught.value.ref == ref
    assert error_for(caught.value).ref == ref


def test_error_for() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_server_message(variant("grant", "grant.not_after_ms", Raw("1.5")))
    reply = error_for(caught.value)
    assert reply == ErrorMsg(code="bad_message",
                             detail="grant.not_after_ms: must be an integer, got 1.5",
                             ref="call-42")
    assert decode_device_message(encode(reply)) == reply


def test_error_for_shortens_a_long_detail() -> None:
    reply = error_for(ProtocolError("bad_message", "é" * 5000))
    assert len(reply.detail) == 1024
    assert reply.detail.endswith("...")
    assert decode_device_message(encode(reply)) == reply


def test_details_quote_peer_values_in_ascii_and_shortened() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_server_message(variant("lock", "reason", ["x"]))
    assert caught.value.detail == "reason: must be a string, got an array"
    with pytest.raises(ProtocolError) as caught:
        decode_server_message(variant("start", "session_id", "\ud800" + "é" * 500))
    detail = caught.value.detail
    assert detail.isascii()
    assert len(detail) < 120


# ---- encoding what the spec forbids ----------------------------------------------------------


@pytest.mark.parametrize("msg", [
    Lock(reason="x" * 257),
    Lock(reason="\ud800"),
    Start(session_id="not an id"),
    End(session_id=""),
    Welcome(server_time_ms=-1),
    Welcome(server_time_ms=1, retry_after_s=3601),
    Welcome(server_time_ms=1, protocol=2),
    Ack(ids=()),
    ErrorMsg(code="busy", detail="d" * 1025),
    GrantMsg(body=BODY, signature="not base64"),
    GrantMsg(body=GrantBody(**{**BODY.__dict__, "not_after_ms": BODY.not_before_ms}),
             signature=SIGNATURE),
    GrantMsg(body=GrantBody(**{**BODY.__dict__, "nonce": "short"}), signature=SIGNATURE),
    GrantMsg(body=GrantBody(**{**BODY.__dict__, "max_duration_s": True}), signature=SIGNATURE),
    EventMsg(id="1", seq=1, kind="k", session_id=None, boot_id="b", boot_ns=1, wall_time="w",
             fields={}),
    EventMsg(id=EVENT_ID, seq=1, kind="k", session_id=None, boot_id="b", boot_ns=2**63,
             wall_time="w", fields={}),
    EventMsg(id=EVENT_ID, seq=1, kind="k", session_id=None, boot_id="b", boot_ns=1,
             wall_time="w", fields={"lateness_ms": float("nan")}),
    EventMsg(id=EVENT_ID, seq=1, kind="k", session_id=None, boot_id="b", boot_ns=1,
             wall_time="w", fields={"blob": "x" * MAX_MESSAGE_BYTES}),
    EventMsg(id=EVENT_ID, seq=1, kind="k", session_id=None, boot_id="b", boot_ns=1,
             wall_time="w", fields={"obj": object()}),  # type: ignore[dict-item]
    Hello(device_id="t", software="s", boot_id="b", session=None, locked=1,  # type: ignore[arg-type]
          outbox=OutboxSummary(pending=0, oldest_seq=None)),
], ids=lambda m: type(m).__name__)
def test_encode_refuses_what_the_spec_forbids(msg: Any) -> None:
    with pytest.raises(EncodeError) as caught:
        encode(msg)
    assert isinstance(caught.value, TabletdError)
    assert isinstance(caught.value, ValueError)
    assert not isinstance(caught.value, ProtocolError)  # our bug, not the peer's


# ---- fuzzing: decode or ProtocolError, nothing else -----------------------------------------
#
# Hypothesis spends about 4 ms drawing a structured example here, and the codec about 0.1 ms
# checking one. So each example is a batch: one input drawn by hypothesis, plus MUTANTS inputs
# derived from a drawn valid message by a drawn (so reproducible) Random. That makes 10,000+
# inputs in a few seconds.

ALL_TYPES = sorted(BASE)
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 1.5, 2**53, 2**64, -(2**63), "", "x" * 300,
                         "a b", [], {}, [1], {"a": 1}, EVENT_ID, "\ud800", *ALL_TYPES]
RAW_NUMBERS = ["9" * 17, "9" * 400, "9" * 4301, "-" + "9" * 5000, "1e400", "-1e400",
               "1e-400", "-0", "1E2", "0.0", "1.0e0", "NaN", "Infinity", "-Infinity"]
BYTE_JUNK = [b"{", b"}", b"[", b'"', b",", b":", b"\\", b"\xff", b"\x00", b"NaN", b"1e999",
             b"\xed\xa0\x80", b"\xc3", b"\\ud800", b"-", b"0", b"."]
MUTANTS = 19
FUZZ_INPUTS = 10_000
FUZZ_EXAMPLES = FUZZ_INPUTS // (MUTANTS + 1) + 100
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(ALL_TYPES),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["type", "grant", "session_id", "ids", "fields"]) | st.text(max_size=6),
        inner, max_size=5),
    max_leaves=20,
)


def member_slots(obj: Any) -> list[tuple[Any, Any]]:
    """Every (container, key-or-index) in a parsed message, nested ones included."""
    slots: list[tuple[Any, Any]] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        keys = list(item) if isinstance(item, dict) else range(len(item))
        for key in keys:
            slots.append((item, key))
            if isinstance(item[key], dict | list):
                stack.append(item[key])
    return slots


def random_json(rnd: random.Random, depth: int = 0) -> Any:
    """Any JSON value Python's json writes, NaN and Infinity included."""
    roll = rnd.random()
    if depth < 3 and roll < 0.2:
        return [random_json(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    if depth < 3 and roll < 0.4:
        return {rnd.choice(["type", "grant", "id", "x", ""]): random_json(rnd, depth + 1)
                for _ in range(rnd.randrange(4))}
    return copy.deepcopy(rnd.choice([  # a copy: later mutations must not change ODD_VALUES
        *ODD_VALUES, float("nan"), float("inf"), -float("inf"), rnd.random() * 1e308,
        rnd.randrange(-(2**80), 2**80), "".join(chr(rnd.randrange(0x110000)) for _ in range(5)),
    ]))


def structural_mutant(obj: Any, rnd: random.Random) -> str:
    """The message with one to three members dropped, retyped, oversized, wrapped, replaced
    by an odd number literal, or added."""
    raws: list[str] = []
    for _ in range(rnd.randint(1, 3)):
        slots = member_slots(obj)
        if not slots:
            break
        container, key = rnd.choice(slots)
        op = rnd.choice(["drop", "odd", "json", "oversize", "raw", "extra", "wrap"])
        if op == "drop":
            del container[key]
        elif op == "odd":
            container[key] = copy.deepcopy(rnd.choice(ODD_VALUES))
        elif op == "json":
            container[key] = random_json(rnd)
        elif op == "oversize":
            container[key] = "x" * rnd.choice([23, 65, 89, 257, 1025, 70_000])
        elif op == "raw":
            container[key] = f"@@RAW{len(raws)}@@"
            raws.append(rnd.choice(RAW_NUMBERS))
        elif op == "wrap":
            container[key] = [container[key]]
        elif isinstance(container, dict):
            container[rnd.choice(["x", "type", "grant_id", "surplus"])] = random_json(rnd)
    text = json.dumps(obj, ensure_ascii=rnd.random() < 0.5)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    return text


def byte_mutant(data: bytes, rnd: random.Random) -> bytes:
    """The bytes with a few bytes flipped, inserted, deleted or cut off."""
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        if not out:
            break
        at = rnd.randrange(len(out))
        op = rnd.choice(["flip", "insert", "delete", "cut"])
        if op == "flip":
            out[at] ^= 1 << rnd.randrange(8)
        elif op == "insert":
            out[at:at] = rnd.choice(BYTE_JUNK)
        elif op == "delete":
            del out[at]
        else:
            del out[at:]
    return bytes(out)


def deep_mutant(rnd: random.Random) -> str:
    """Nesting from 1 to 40,000 deep, at the top, in an unlisted member, or in event fields."""
    depth = rnd.choice([rnd.randint(1, 50), rnd.randint(500, 1500), rnd.randint(1, 40_000)])
    opener, closer = rnd.choice([("[", "]"), ('{"a":', "}"), ('{"fields":', "}")])
    inner = rnd.choice(["1", "{}", '{"type":"unlock"}', "", "NaN"])
    event = (f'{{"type":"event","id":"{EVENT_ID}","seq":1,"kind":"k","session_id":null,'
             '"boot_id":"b","boot_ns":1,"wall_time":"w","fields":{"a":')
    prefix = rnd.choice(["", '{"type":"unlock","x":', event])
    closers = closer * rnd.choice([depth, depth, 0, 1])
    return prefix + opener * depth + inner + closers + "}" * prefix.count("{")


def mutants(msg: ServerMessage | DeviceMessage, rnd: random.Random) -> list[str | bytes]:
    text = encode(msg)
    out: list[str | bytes] = []
    for _ in range(MUTANTS):
        roll = rnd.random()
        if roll < 0.6:
            out.append(structural_mutant(json.loads(text), rnd))
        elif roll < 0.9:
            out.append(byte_mutant(text.encode(), rnd))
        else:
            out.append(deep_mutant(rnd))
    return out


wild_inputs: st.SearchStrategy[str | bytes] = st.one_of(
    any_json.map(json.dumps),  # NaN and Infinity literals included
    st.binary(max_size=300),
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from('{}[]":,0123456789.eE-+ntrufalsNIy\\u\ud800'), max_size=80),
    st.builds(lambda s: '{"type":"welcome","protocol":1,"server_time_ms":' + s + "}",
              st.text(alphabet=string.digits + ".eE+-", min_size=1, max_size=30)),
)


@st.composite
def malformed_batches(draw: st.DrawFn) -> list[str | bytes]:
    base = draw(st.sampled_from([*SERVER_EXAMPLES, *DEVICE_EXAMPLES]) | server_messages
                | device_messages)
    rnd = draw(st.randoms(use_true_random=False))
    return [draw(wild_inputs), *mutants(base, rnd)]


def check_contract(data: str | bytes) -> None:
    """Decode in both directions: a message or a ProtocolError, and whichever it is, what we
    would send back is valid."""
    decoders: list[DecodeFn] = [decode_server_message, decode_device_message]
    for decode in decoders:
        try:
            msg = decode(data)
        except ProtocolError as exc:
            assert exc.code in {"bad_json", "bad_message", "unknown_type", "too_large"}
            assert exc.detail
            assert exc.ref is None or len(exc.ref) <= 64
            reply = encode(error_for(exc))  # the answer is always sendable
            assert decode_device_message(reply) == decode_server_message(reply)
        else:
            try:
                again = encode(msg)
            except EncodeError as exc:
                # Only size can grow on re-encoding (1e5 in `fields` comes back as 100000.0).
                assert isinstance(exc.__cause__, ProtocolError)
                assert exc.__cause__.code == "too_large"
                continue
            assert decode(again) == msg


def test_malformed_inputs_decode_or_raise_protocol_error() -> None:
    inputs: list[int] = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(malformed_batches())
    def run(batch: list[str | bytes]) -> None:
        for data in batch:
            check_contract(data)
        inputs.append(len(batch))

    run()
    assert sum(inputs) >= FUZZ_INPUTS


@pytest.mark.parametrize("data", [
    b"",
    b"\x00",
    "\x00",
    "{\"type\":\"unlock\"}\x00",
    '{"type":"event","fields":' * 3 + "}",
    '{"type":"welcome","protocol":1,"server_time_ms":' + "9" * 60_000 + "}",
    '{"type":"welcome","protocol":1,"server_time_ms":1' + "0" * 5000 + "}",
    '{"type":"welcome","protocol":1,"server_time_ms":0.' + "0" * 5000 + "1}",
    '{"type":"ack","ids":[' + ",".join(['"x"'] * 20_000) + "]}",
    json.dumps({"type": "error", "code": "x", "detail": "d", "ref": None, "x": [[]] * 10_000}),
])
def test_malformed_corner_cases(data: str | bytes) -> None:
    check_contract(data)
