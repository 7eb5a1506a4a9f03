"""The wire-message codec of protocol v1 (``docs/protocol.md`` sections 1, 3 and 4): sans-I/O.

Theory of operation
-------------------
Each side feeds the payload of one WebSocket text frame to its decoder:
:func:`decode_server_message` on the tablet, :func:`decode_device_message` on the reference
server. It gets back one frozen message object, or a :class:`ProtocolError` ("the peer
misbehaved") that carries the section 4 code to answer with. Nothing else escapes a decoder,
whatever the input (this is property-tested). On a :class:`ProtocolError` the caller sends
``encode(error_for(exc))``, records the event and carries on. Section 3 requires this: the
connection and the daemon stay up.

Decoding runs in three steps, cheapest first:

1. size: more than 65 536 bytes of UTF-8 gives ``too_large``. This is checked before any
   parsing (section 1).
2. JSON: not UTF-8, not JSON, a ``NaN``/``Infinity`` literal (Python's parser accepts them,
   JSON has none), nesting deeper than the parser can follow, or a top level that is not an
   object gives ``bad_json``.
3. members: ``type`` selects the schema, and an unknown ``type`` gives ``unknown_type``. A
   listed member that is missing, mistyped or out of bounds gives ``bad_message``, with a
   detail that names the member path (``grant.not_after_ms: must be an integer, got 1.5``).
   Unlisted members are ignored (forward compatibility). The signed grant body is the
   exception: it must hold exactly its eight members.

:func:`encode` goes the other way and returns compact JSON text. It checks its own output
with the same decoder, so a message this module encodes is always one the peer accepts. A
message that breaks the spec raises :class:`EncodeError` ("we misused it").

This module reads no clock and does no I/O. What a valid message *means* is checked by
:mod:`tabletd.link.grants` and the session machine: the signature, the device binding, the
window, the replay set.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final, Literal, NoReturn, TypeAlias, assert_never, cast

from tabletd.errors import TabletdError
from tabletd.link.grants import ID_RE, GrantBody

PROTOCOL_VERSION: Final = 1
#: The WebSocket subprotocol name of this version (section 1).
SUBPROTOCOL: Final = "tabletd.v1"
#: Largest message, in bytes of UTF-8 (section 1).
MAX_MESSAGE_BYTES: Final = 65_536
#: Bounds of a protocol integer: JSON numbers without fraction or exponent (section 3).
MAX_INT: Final = 2**53 - 1
MAX_INT64: Final = 2**63 - 1  # event.boot_ns only: 2**53 ns is only ~104 days of uptime
MAX_STRING_CHARS: Final = 256
MAX_DETAIL_CHARS: Final = 1024
MAX_CONTACT_LABEL_CHARS: Final = 64
MAX_ACK_IDS: Final = 1000
MAX_DURATION_S: Final = 7200
MAX_RETRY_AFTER_S: Final = 3600

#: Every code in section 4. The first four are the codec's own (:class:`ProtocolError`).
ERROR_CODES: Final = frozenset({
    "bad_json", "bad_message", "unknown_type", "too_large", "bad_signature", "foreign_device",
    "expired", "not_yet_valid", "replayed", "no_clock", "busy", "locked", "refused",
    "unknown_session",
})

ProtocolErrorCode: TypeAlias = Literal["bad_json", "bad_message", "unknown_type", "too_large"]
SessionState: TypeAlias = Literal["scheduled", "live", "ended"]
#: A JSON value as this codec holds one: finite floats only, text without lone surrogates.
JsonValue: TypeAlias = (
    "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
)

_ID_RULE = "an id (1 to 64 of A-Z a-z 0-9 - _ .)"
_NONCE = re.compile(r"[A-Za-z0-9_-]{22,64}")
_UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# 64 bytes in RFC 4648 section 4 base64 with padding: 85 characters, then one that carries
# the last 2 bits and 4 zero bits (A, Q, g or w), then "==". Only the canonical spelling
# (the one every encoder writes) is accepted.
_SIGNATURE = re.compile(r"[A-Za-z0-9+/]{85}[AQgw]==")
_SHOW_CHARS = 48


# ---- errors -------------------------------------------------------------------------------


class ProtocolError(TabletdError, ValueError):
    """The peer sent a message that protocol v1 does not allow ("the peer misbehaved").

    ``code`` is the section 4 code to answer with. ``detail`` names the member and says what
    is wrong with it (ASCII, values shortened). ``ref`` is the message's ``grant.grant_id`` or
    ``session_id`` when one could be read as a valid id, else ``None``. The caller answers
    with :func:`error_for` and keeps the connection (section 3).
    """

    def __init__(self, code: ProtocolErrorCode, detail: str, ref: str | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code: ProtocolErrorCode = code
        self.detail = detail
        self.ref = ref


class EncodeError(TabletdError, ValueError):
    """:func:`encode` was given a message the protocol does not allow ("we misused it").

    The message was not encoded and nothing should be sent. This is a bug in the caller, or
    data that cannot go on the wire, such as an event larger than the size limit.
    """


# ---- messages, tablet to server (section 3.1) --------------------------------------------


@dataclass(frozen=True)
class SessionSummary:
    """``hello.session``: the session the tablet holds."""

    id: str
    state: SessionState
    remaining_ms: int | None


@dataclass(frozen=True)
class OutboxSummary:
    """``hello.outbox``: the tablet's outbox position."""

    pending: int
    oldest_seq: int | None


@dataclass(frozen=True)
class Hello:
    """The first message on every connection. Leave ``protocol`` at its default: any value
    other than :data:`PROTOCOL_VERSION` makes :func:`encode` fail."""

    TYPE: ClassVar[str] = "hello"
    device_id: str
    software: str
    boot_id: str
    session: SessionSummary | None
    locked: bool
    outbox: OutboxSummary
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class EventMsg:
    """One durable event from the outbox. ``fields`` is plain JSON; treat it as read-only.
    It is left out of the hash, so a message is still hashable."""

    TYPE: ClassVar[str] = "event"
    id: str
    seq: int
    kind: str
    session_id: str | None
    boot_id: str
    boot_ns: int
    wall_time: str
    fields: dict[str, JsonValue] = field(hash=False)


@dataclass(frozen=True)
class ErrorMsg:
    """Refusal of a message, in either direction. ``code`` is a section 4 code, ``detail``
    is at most 1024 characters, and ``ref`` is the offending grant or session id."""

    TYPE: ClassVar[str] = "error"
    code: str
    detail: str
    ref: str | None = None


# ---- messages, server to tablet (section 3.2) --------------------------------------------


@dataclass(frozen=True)
class Welcome:
    """The answer to ``hello``. ``server_time_ms`` is the server's clock when it answered.
    ``retry_after_s`` is ``None`` when the member is absent. Leave ``protocol`` at its
    default (see :class:`Hello`)."""

    TYPE: ClassVar[str] = "welcome"
    server_time_ms: int
    retry_after_s: int | None = None
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class GrantMsg:
    """A booked call. ``body`` is well-formed, but its signature is *not* verified here.
    That is :mod:`tabletd.link.grants`' job."""

    TYPE: ClassVar[str] = "grant"
    body: GrantBody
    signature: str


@dataclass(frozen=True)
class Start:
    """The relative joined: go live."""

    TYPE: ClassVar[str] = "start"
    session_id: str


@dataclass(frozen=True)
class End:
    """Staff ended or cancelled the call."""

    TYPE: ClassVar[str] = "end"
    session_id: str


@dataclass(frozen=True)
class Lock:
    """Lock the tablet (this ends any call)."""

    TYPE: ClassVar[str] = "lock"
    reason: str


@dataclass(frozen=True)
class Unlock:
    """Unlock the tablet. The tablet refuses it while its case is open."""

    TYPE: ClassVar[str] = "unlock"


@dataclass(frozen=True)
class Ack:
    """The server has stored these events durably (1 to 1000 event ids)."""

    TYPE: ClassVar[str] = "ack"
    ids: tuple[str, ...]


ServerMessage: TypeAlias = Welcome | GrantMsg | Start | End | Lock | Unlock | Ack | ErrorMsg
DeviceMessage: TypeAlias = Hello | EventMsg | ErrorMsg
Message: TypeAlias = ServerMessage | DeviceMessage


# ---- decoding -----------------------------------------------------------------------------


def decode_server_message(data: str | bytes) -> ServerMessage:
    """Decode one text frame received by the tablet.

    Returns the message, valid per section 3.2. Raises :class:`ProtocolError` for anything
    else (the code is one of ``too_large``, ``bad_json``, ``unknown_type`` or
    ``bad_message``), and never raises any other exception. Raises :class:`TypeError` only if
    ``data`` is neither ``str`` nor ``bytes``.
    """
    return cast(ServerMessage, _decode(data, _SERVER_PARSERS, "server-to-tablet"))


def decode_device_message(data: str | bytes) -> DeviceMessage:
    """Decode one text frame received by the server. This is
    :func:`decode_server_message` for section 3.1."""
    return cast(DeviceMessage, _decode(data, _DEVICE_PARSERS, "tablet-to-server"))


def error_for(exc: ProtocolError) -> ErrorMsg:
    """The ``error`` message that answers a frame rejected with ``exc``. It always
    encodes."""
    return ErrorMsg(code=exc.code, detail=_shorten(exc.detail, MAX_DETAIL_CHARS), ref=exc.ref)


class _Unrepresentable:
    """An integer literal with more digits than Python converts (``sys.int_max_str_digits``).

    It stands in the parsed tree so that an unlisted member holding one is still ignored,
    while a listed member holding one is out of bounds.
    """

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(literal: str) -> int | _Unrepresentable:
    try:
        return int(literal)
    except ValueError:
        return _Unrepresentable(len(literal.lstrip("-")))


def _refuse_constant(name: str) -> NoReturn:
    raise ProtocolError("bad_json", f"{name} is not JSON")


def _parse(data: str | bytes) -> dict[str, object]:
    """Steps 1 and 2: size, UTF-8 and JSON. Returns the top-level object."""
    if isinstance(data, str):
        # Every character is at least one byte, so a long str is too large without encoding it.
        if len(data) > MAX_MESSAGE_BYTES:
            raise ProtocolError("too_large", f"message over {MAX_MESSAGE_BYTES} bytes "
                                             f"({len(data)} characters)")
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError:
            raise ProtocolError("bad_json", "not UTF-8 (lone surrogate)") from None
        if size > MAX_MESSAGE_BYTES:
            raise ProtocolError("too_large", f"message is {size} bytes, over "
                                             f"{MAX_MESSAGE_BYTES}")
        text = data
    elif isinstance(data, bytes):
        if len(data) > MAX_MESSAGE_BYTES:
            raise ProtocolError("too_large", f"message is {len(data)} bytes, over "
                                             f"{MAX_MESSAGE_BYTES}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("bad_json", f"not UTF-8 at byte {exc.start}") from None
    else:
        raise TypeError(f"a frame is str or bytes, not {type(data).__name__}")
    try:
        obj = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except ProtocolError:
        raise
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"not JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise ProtocolError("bad_json", "nested too deeply to parse") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"not a JSON object, got {_show(obj)}")
    return obj


def _decode(data: str | bytes, parsers: Mapping[str, _Parser], direction: str) -> Message:
    obj = _parse(data)
    ref = _read_ref(obj)
    try:
        if "type" not in obj:
            _bad("type", "missing")
        kind = obj["type"]
        if not isinstance(kind, str):
            _bad("type", f"must be a string, got {_show(kind)}")
        parser = parsers.get(kind)
        if parser is None:
            if kind in _ALL_PARSERS:
                raise ProtocolError("unknown_type",
                                    f"type: {_show(kind)} is not a {direction} message")
            raise ProtocolError("unknown_type", f"type: unknown type {_show(kind)}")
        return parser(_Members(obj, ""))
    except ProtocolError as exc:
        exc.ref = ref
        raise


def _read_ref(obj: dict[str, object]) -> str | None:
    """``grant.grant_id`` or ``session_id``, when it is a valid id (the ``ref`` of section
    3.1). A malformed one is not echoed, so the ``error`` answer stays valid itself."""
    grant = obj.get("grant")
    candidates = [grant.get("grant_id") if isinstance(grant, dict) else None,
                  obj.get("session_id")]
    for value in candidates:
        if isinstance(value, str) and ID_RE.fullmatch(value):
            return value
    return None


def _bad(where: str, problem: str) -> NoReturn:
    raise ProtocolError("bad_message", f"{where}: {problem}")


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: object) -> str:
    """A peer's value for a detail: JSON spelling, ASCII, shortened."""
    if isinstance(value, _Unrepresentable):
        return f"a {value.digits}-digit number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return _shorten(json.dumps(value, ensure_ascii=True), _SHOW_CHARS)


def _is_text(value: str) -> bool:
    """True when the str holds no lone surrogate, so that it can be sent as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_int(value: object, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(value) is int:  # bool is a subclass of int, and not an integer here
        if not lo <= value <= hi:
            _bad(where, f"must be within {lo}..{hi}, got {_show(value)}")
        return value
    if isinstance(value, _Unrepresentable):
        _bad(where, f"must be within {lo}..{hi}, got {_show(value)}")
    _bad(where, f"must be an integer, got {_show(value)}")


def _check_str(value: object, where: str, max_chars: int = MAX_STRING_CHARS) -> str:
    if not isinstance(value, str):
        _bad(where, f"must be a string, got {_show(value)}")
    if len(value) > max_chars:
        _bad(where, f"must be at most {max_chars} characters, got {len(value)}")
    if not _is_text(value):
        _bad(where, "must be Unicode text, got a lone surrogate")
    return value


def _check_fields(value: object, where: str) -> dict[str, JsonValue]:
    """``event.fields``: any JSON object that can be sent on again. So no number outside
    what JSON text can carry, and no lone surrogate. This is iterative: depth costs no
    stack."""
    if not isinstance(value, dict):
        _bad(where, f"must be an object, got {_show(value)}")
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, member in item.items():
                if not _is_text(key):
                    _bad(where, "must be Unicode text, got a name with a lone surrogate")
                stack.append(member)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if not _is_text(item):
                _bad(where, "must be Unicode text, got a string with a lone surrogate")
        elif isinstance(item, float):
            if not math.isfinite(item):
                _bad(where, "must hold finite numbers, got one beyond a double's range")
        elif isinstance(item, _Unrepresentable):
            _bad(where, f"must hold representable numbers, got {_show(item)}")
    return cast(dict[str, JsonValue], value)


class _Members:
    """Reads the listed members of one JSON object. ``path`` prefixes every detail."""

    def __init__(self, obj: dict[str, object], path: str) -> None:
        self.obj = obj
        self.path = path

    def where(self, name: str) -> str:
        return f"{self.path}{name}"

    def get(self, name: str) -> object:
        if name not in self.obj:
            _bad(self.where(name), "missing")
        return self.obj[name]

    def integer(self, name: str, lo: int = 0, hi: int = MAX_INT) -> int:
        return _check_int(self.get(name), self.where(name), lo, hi)

    def integer_or_null(self, name: str) -> int | None:
        value = self.get(name)
        return None if value is None else _check_int(value, self.where(name))

    def string(self, name: str, max_chars: int = MAX_STRING_CHARS) -> str:
        return _check_str(self.get(name), self.where(name), max_chars)

    def string_or_null(self, name: str) -> str | None:
        value = self.get(name)
        return None if value is None else _check_str(value, self.where(name))

    def matching(self, name: str, pattern: re.Pattern[str], rule: str) -> str:
        value = self.get(name)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            _bad(self.where(name), f"must be {rule}, got {_show(value)}")
        return value

    def ident(self, name: str) -> str:
        return self.matching(name, ID_RE, _ID_RULE)

    def ident_or_null(self, name: str) -> str | None:
        return None if self.get(name) is None else self.ident(name)

    def boolean(self, name: str) -> bool:
        value = self.get(name)
        if not isinstance(value, bool):
            _bad(self.where(name), f"must be true or false, got {_show(value)}")
        return value

    def protocol(self) -> None:
        value = self.get("protocol")
        if type(value) is not int or value != PROTOCOL_VERSION:
            _bad(self.where("protocol"), f"must be {PROTOCOL_VERSION}, got {_show(value)}")

    def object(self, name: str) -> _Members:
        value = self.get(name)
        if not isinstance(value, dict):
            _bad(self.where(name), f"must be an object, got {_show(value)}")
        return _Members(value, f"{self.where(name)}.")

    def object_or_null(self, name: str) -> _Members | None:
        return None if self.get(name) is None else self.object(name)


# ---- one parser per type ------------------------------------------------------------------

_Parser: TypeAlias = Callable[[_Members], Message]
_SESSION_STATES: Final[Mapping[str, SessionState]] = {
    "scheduled": "scheduled", "live": "live", "ended": "ended"}
_GRANT_MEMBERS: Final = (
    "grant_id", "device_id", "contact_label", "not_before_ms", "not_after_ms",
    "max_duration_s", "nonce", "issued_at_ms",
)


def _hello(m: _Members) -> Hello:
    m.protocol()
    device_id = m.ident("device_id")
    software = m.string("software")
    boot_id = m.string("boot_id")
    session: SessionSummary | None = None
    if (s := m.object_or_null("session")) is not None:
        state = s.get("state")
        if not isinstance(state, str) or state not in _SESSION_STATES:
            _bad(s.where("state"),
                 f"must be one of scheduled, live, ended, got {_show(state)}")
        session = SessionSummary(id=s.ident("id"), state=_SESSION_STATES[state],
                                 remaining_ms=s.integer_or_null("remaining_ms"))
    locked = m.boolean("locked")
    o = m.object("outbox")
    outbox = OutboxSummary(pending=o.integer("pending"), oldest_seq=o.integer_or_null("oldest_seq"))
    return Hello(device_id=device_id, software=software, boot_id=boot_id, session=session,
                 locked=locked, outbox=outbox)


def _event(m: _Members) -> EventMsg:
    return EventMsg(
        id=m.matching("id", _UUID, "a UUID (8-4-4-4-12 hex digits)"),
        seq=m.integer("seq"), kind=m.string("kind"),
        session_id=m.ident_or_null("session_id"), boot_id=m.string("boot_id"),
        boot_ns=m.integer("boot_ns", hi=MAX_INT64), wall_time=m.string("wall_time"),
        fields=_check_fields(m.get("fields"), m.where("fields")),
    )


def _error(m: _Members) -> ErrorMsg:
    return ErrorMsg(code=m.string("code"), detail=m.string("detail", MAX_DETAIL_CHARS),
                    ref=m.string_or_null("ref"))


def _welcome(m: _Members) -> Welcome:
    m.protocol()
    server_time_ms = m.integer("server_time_ms")
    retry_after_s = None
    if "retry_after_s" in m.obj:  # "integer or absent": null is mistyped
        retry_after_s = m.integer("retry_after_s", 0, MAX_RETRY_AFTER_S)
    return Welcome(server_time_ms=server_time_ms, retry_after_s=retry_after_s)


def _grant(m: _Members) -> GrantMsg:
    g = m.object("grant")
    body = GrantBody(
        grant_id=g.ident("grant_id"),
        device_id=g.ident("device_id"),
        contact_label=g.string("contact_label", MAX_CONTACT_LABEL_CHARS),
        not_before_ms=g.integer("not_before_ms"),
        not_after_ms=g.integer("not_after_ms"),
        max_duration_s=g.integer("max_duration_s", 1, MAX_DURATION_S),
        nonce=g.matching("nonce", _NONCE, "22 to 64 characters of base64url without padding"),
        issued_at_ms=g.integer("issued_at_ms"),
    )
    if body.not_after_ms <= body.not_before_ms:
        _bad(g.where("not_after_ms"), f"must be greater than not_before_ms "
                                      f"({body.not_before_ms}), got {body.not_after_ms}")
    # The body is signed: a member the signer did not list is not ignorable (section 3.2).
    extra = sorted(set(g.obj) - set(_GRANT_MEMBERS))
    if extra:
        _bad(m.where("grant"), "unexpected member " + ", ".join(_show(k) for k in extra[:3])
             + (f" and {len(extra) - 3} more" if len(extra) > 3 else ""))
    signature = m.matching("signature", _SIGNATURE,
                           "a 64-byte Ed25519 signature in base64 with padding (88 characters)")
    return GrantMsg(body=body, signature=signature)


def _start(m: _Members) -> Start:
    return Start(session_id=m.ident("session_id"))


def _end(m: _Members) -> End:
    return End(session_id=m.ident("session_id"))


def _lock(m: _Members) -> Lock:
    return Lock(reason=m.string("reason"))


def _unlock(m: _Members) -> Unlock:
    return Unlock()


def _ack(m: _Members) -> Ack:
    ids = m.get("ids")
    if not isinstance(ids, list):
        _bad(m.where("ids"), f"must be an array, got {_show(ids)}")
    if not 1 <= len(ids) <= MAX_ACK_IDS:
        _bad(m.where("ids"), f"must hold 1 to {MAX_ACK_IDS} ids, got {len(ids)}")
    return Ack(ids=tuple(_check_str(v, f"{m.where('ids')}[{i}]") for i, v in enumerate(ids)))


_SERVER_PARSERS: Final[Mapping[str, _Parser]] = {
    "welcome": _welcome, "grant": _grant, "start": _start, "end": _end, "lock": _lock,
    "unlock": _unlock, "ack": _ack, "error": _error,
}
_DEVICE_PARSERS: Final[Mapping[str, _Parser]] = {
    "hello": _hello, "event": _event, "error": _error,
}
_ALL_PARSERS: Final[Mapping[str, _Parser]] = {**_SERVER_PARSERS, **_DEVICE_PARSERS}


# ---- encoding -----------------------------------------------------------------------------


def encode(msg: Message) -> str:
    """The message as one compact JSON text, to be sent in one text frame.

    ``type`` comes first, and members follow in the order of the spec's tables. The output is
    checked with this module's decoder. Raises :class:`EncodeError` if the message breaks
    section 3 (a bound, the id syntax, the size limit, or a non-finite number in
    ``fields``). In that case nothing may be sent.
    """
    try:
        text = json.dumps(_members(msg), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False)
    except (ValueError, TypeError, RecursionError) as exc:
        raise EncodeError(f"{msg.TYPE}: not encodable as JSON: {exc}") from exc
    try:
        _decode(text, _ALL_PARSERS, "known")
    except ProtocolError as exc:
        raise EncodeError(f"{msg.TYPE}: breaks docs/protocol.md ({exc.code}): "
                          f"{exc.detail}") from exc
    return text


def _members(msg: Message) -> dict[str, object]:
    out: dict[str, object] = {"type": msg.TYPE}
    match msg:
        case Hello():
            session = msg.session
            out |= {
                "protocol": msg.protocol, "device_id": msg.device_id,
                "software": msg.software, "boot_id": msg.boot_id,
                "session": None if session is None else {
                    "id": session.id, "state": session.state,
                    "remaining_ms": session.remaining_ms},
                "locked": msg.locked,
                "outbox": {"pending": msg.outbox.pending, "oldest_seq": msg.outbox.oldest_seq},
            }
        case EventMsg():
            out |= {
                "id": msg.id, "seq": msg.seq, "kind": msg.kind, "session_id": msg.session_id,
                "boot_id": msg.boot_id, "boot_ns": msg.boot_ns, "wall_time": msg.wall_time,
                "fields": msg.fields,
            }
        case ErrorMsg():
            out |= {"code": msg.code, "detail": msg.detail, "ref": msg.ref}
        case Welcome():
            out |= {"protocol": msg.protocol, "server_time_ms": msg.server_time_ms}
            if msg.retry_after_s is not None:
                out["retry_after_s"] = msg.retry_after_s
        case GrantMsg():
            b = msg.body
            out |= {
                "grant": {
                    "grant_id": b.grant_id, "device_id": b.device_id,
                    "contact_label": b.contact_label, "not_before_ms": b.not_before_ms,
                    "not_after_ms": b.not_after_ms, "max_duration_s": b.max_duration_s,
                    "nonce": b.nonce, "issued_at_ms": b.issued_at_ms,
                },
                "signature": msg.signature,
            }
        case Start() | End():
            out["session_id"] = msg.session_id
        case Lock():
            out["reason"] = msg.reason
        case Unlock():
            pass
        case Ack():
            out["ids"] = list(msg.ids)
        case _:
            assert_never(msg)
    return out
