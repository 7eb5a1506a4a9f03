"""The MCU frame and message codec (``docs/mcu-protocol.md`` sections 2, 3 and 6): sans-I/O.

Theory of operation
-------------------
A frame on the UART is, integers big-endian::

    SYNC 0xA5 | LEN u8 (0..64) | SEQ u8 | TYPE u8 | PAYLOAD (LEN bytes) | CRC u16

with the CRC-16/CCITT-FALSE of LEN, SEQ, TYPE and PAYLOAD (:func:`crc16_ccitt`). The
largest frame is 70 bytes (4 + 64 + 2).

Receiving is in two layers:

1. :class:`FrameDecoder` turns a byte stream, in chunks of any size, into :class:`Frame`
   objects. It never raises on input: it hunts for the sync byte, and on a length over 64
   or a bad CRC it discards *one* byte (the sync) and hunts again from the next byte, so a
   sync byte in line noise never costs the real frame behind it (section 2.3). What it
   dropped is counted (``bytes_discarded``, ``bad_crcs``, ``bad_lengths``). A false sync
   with a plausible length makes it wait for bytes that may never come; after an idle gap
   the caller calls :meth:`FrameDecoder.abandon_partial` (section 2.4).
2. :func:`decode_message` turns one frame into a frozen message object, or raises
   :class:`McuProtocolError` ("the peer misbehaved") whose ``detail`` names the field and
   whose ``nak_reason`` is the NAK reason to answer with (section 4.3). Nothing else escapes
   it, whatever the frame (property-tested).

Sending: :func:`encode_message` (or :func:`encode_frame` with a payload from a message's
``to_payload()``). A message that the format cannot carry raises :class:`McuEncodeError`
("we misused it"), a subclass of :class:`McuProtocolError`: it is a bug in the caller and
nothing should be sent.

Acknowledgement, retransmission, duplicates and the handshake are :mod:`tabletd.mcu.link`'s
job. This module reads no clock and does no I/O.
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final, Self, TypeAlias, TypeVar

from tabletd.errors import TabletdError

#: The protocol version this module speaks (HELLO, section 5).
PROTOCOL_VERSION: Final = 1
SYNC: Final = 0xA5
MAX_PAYLOAD: Final = 64
#: Bytes around the payload: SYNC, LEN, SEQ, TYPE before it, CRC after it.
FRAME_OVERHEAD: Final = 6
MAX_FRAME: Final = MAX_PAYLOAD + FRAME_OVERHEAD  # 70
#: The longest lease a host may ask for, in milliseconds (section 6.2, LEASE).
MAX_LEASE_MS: Final = 2000
U8_MAX: Final = 0xFF
U16_MAX: Final = 0xFFFF

_SYNC_BYTES: Final = bytes([SYNC])
_E = TypeVar("_E", bound=IntEnum)


# ---- errors -------------------------------------------------------------------------------


class NakReason(IntEnum):
    """The reason byte of a NAK (section 4.3)."""

    BAD_CRC = 1  # a frame with a bad CRC was seen
    UNKNOWN_TYPE = 2  # a TYPE this receiver does not accept
    BAD_PAYLOAD = 3  # the payload breaks section 6
    BUSY = 4  # cannot accept it now (an MCU with no HELLO since its reset)


class McuProtocolError(TabletdError, ValueError):
    """A frame's message breaks ``docs/mcu-protocol.md`` ("the peer misbehaved").

    ``detail`` names the field and says what is wrong (``status.battery_pct: must be 0 to
    100, got 101``). ``nak_reason`` is the NAK reason to answer with: the caller NAKs the
    frame (section 4.3), does not act on it, and keeps the link up.
    """

    def __init__(self, detail: str, nak_reason: NakReason = NakReason.BAD_PAYLOAD) -> None:
        super().__init__(detail)
        self.detail = detail
        self.nak_reason = nak_reason


class McuEncodeError(McuProtocolError):
    """We were asked to encode something the protocol cannot carry ("we misused it").

    Nothing was encoded and nothing should be sent: this is a bug in the caller. It is a
    :class:`McuProtocolError` (and so a :class:`ValueError`) so that one ``except`` catches
    every codec error; catch this class to tell the two apart.
    """


# ---- frames -------------------------------------------------------------------------------


def crc16_ccitt(data: bytes | bytearray | memoryview, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE of ``data``: poly 0x1021, init 0xFFFF, not reflected, no final
    XOR. ``crc16_ccitt(b"123456789") == 0x29B1``. Pass a previous result as ``crc`` to
    continue over more data."""
    # binascii.crc_hqx is exactly this CRC (poly 0x1021, MSB first), with the init passed in.
    return binascii.crc_hqx(data, crc)


class MsgType(IntEnum):
    """The TYPE byte (section 6). Bit 7 set: sent by the MCU."""

    ACK = 0x01
    NAK = 0x02
    HELLO = 0x10
    LEASE = 0x11
    CUT = 0x12
    LED = 0x13
    POWER_OFF = 0x14
    PING = 0x15
    HELLO_REPLY = 0x90
    STATUS = 0x91
    EVENT = 0x92


#: Types that are acknowledged and retransmitted; ACK and NAK are neither (section 4).
CONTROL_TYPES: Final = frozenset({MsgType.ACK, MsgType.NAK})
HOST_TO_MCU_TYPES: Final = frozenset({
    MsgType.HELLO, MsgType.LEASE, MsgType.CUT, MsgType.LED, MsgType.POWER_OFF, MsgType.PING})
MCU_TO_HOST_TYPES: Final = frozenset({MsgType.HELLO_REPLY, MsgType.STATUS, MsgType.EVENT})


@dataclass(frozen=True)
class Frame:
    """One frame with a good CRC. ``type`` is the raw TYPE byte (it may be a type this side
    does not know: :func:`decode_message` says so)."""

    seq: int
    type: int
    payload: bytes

    @property
    def wire_size(self) -> int:
        """The size of this frame on the wire, in bytes."""
        return len(self.payload) + FRAME_OVERHEAD


@dataclass(frozen=True)
class CorruptFrame:
    """A frame candidate whose CRC did not match: the header bytes as read (they may be
    corrupt too). The link answers NAK reason 1 from it (section 4.3)."""

    seq: int
    type: int
    length: int


def encode_frame(seq: int, type: int, payload: bytes = b"") -> bytes:
    """Return the bytes of one frame: sync, length, ``seq``, ``type``, ``payload``, CRC.

    Raises :class:`McuEncodeError` if ``seq`` or ``type`` is not 0 to 255 or the payload is
    longer than :data:`MAX_PAYLOAD` bytes.
    """
    _check_int("frame.seq", seq, 0, U8_MAX, McuEncodeError)
    _check_int("frame.type", type, 0, U8_MAX, McuEncodeError)
    if not isinstance(payload, bytes | bytearray):
        raise McuEncodeError(f"frame.payload: must be bytes, got {payload.__class__.__name__}")
    if len(payload) > MAX_PAYLOAD:
        raise McuEncodeError(
            f"frame.payload: must be at most {MAX_PAYLOAD} bytes, got {len(payload)}")
    body = bytes((len(payload), seq, type)) + payload
    return _SYNC_BYTES + body + crc16_ccitt(body).to_bytes(2, "big")


class FrameDecoder:
    """Turns a received byte stream into frames (section 2.3). One per direction and port.

    Feed every byte received, in order, in chunks of any size, to :meth:`feed` (or
    :meth:`feed_events`). The decoder never raises on input and never gives a frame whose
    CRC is wrong. While :attr:`partial` is true it holds the start of a frame; if no byte
    arrives for the idle gap (:data:`tabletd.mcu.link.IDLE_GAP_NS`, section 2.4), call
    :meth:`abandon_partial`.

    Counters, for diagnostics: ``bytes_received``, ``bytes_discarded`` (every byte that was
    not part of a good frame), ``frames`` (good frames), ``bad_crcs``, ``bad_lengths``
    (a sync followed by a length over 64) and ``abandoned`` (partial frames given up after an
    idle gap). ``bytes_received == bytes_discarded + size of the good frames + pending``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.bytes_received = 0
        self.bytes_discarded = 0
        self.frames = 0
        self.bad_crcs = 0
        self.bad_lengths = 0
        self.abandoned = 0

    @property
    def pending(self) -> int:
        """Bytes held: the start of a frame still incomplete (0 if none)."""
        return len(self._buf)

    @property
    def partial(self) -> bool:
        """Whether the decoder holds the start of an incomplete frame."""
        return bool(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add received bytes; return the frames they complete, in order (maybe none)."""
        return [event for event in self.feed_events(data) if isinstance(event, Frame)]

    def feed_events(
            self, data: bytes | bytearray | memoryview) -> list[Frame | CorruptFrame]:
        """As :meth:`feed`, with a :class:`CorruptFrame` in stream order for each bad CRC."""
        self.bytes_received += len(data)
        self._buf += data
        return self._scan()

    def abandon_partial(self) -> list[Frame | CorruptFrame]:
        """The line has been idle for the idle gap while a frame was incomplete: give it up.

        Discards the incomplete frame's sync byte and hunts again in the bytes held, as often
        as needed, until no incomplete frame is held (every byte held is as old as the gap).
        Returns what the hunt found, in order. Does nothing if :attr:`partial` is false.
        """
        out: list[Frame | CorruptFrame] = []
        while self._buf:
            self.abandoned += 1
            self.bytes_discarded += 1
            del self._buf[:1]
            out += self._scan()
        return out

    def _scan(self) -> list[Frame | CorruptFrame]:
        buf = self._buf
        size = len(buf)
        view = memoryview(buf)
        out: list[Frame | CorruptFrame] = []
        pos = 0
        try:
            while True:
                start = buf.find(SYNC, pos)
                if start < 0:
                    self.bytes_discarded += size - pos
                    pos = size
                    break
                self.bytes_discarded += start - pos
                pos = start
                if size - pos < 2:
                    break
                length = buf[pos + 1]
                if length > MAX_PAYLOAD:
                    # Impossible length: this sync was noise. Skip it alone (section 2.3).
                    self.bad_lengths += 1
                    self.bytes_discarded += 1
                    pos += 1
                    continue
                end = pos + length + FRAME_OVERHEAD
                if end > size:
                    break  # incomplete: wait for more bytes
                received_crc = (buf[end - 2] << 8) | buf[end - 1]
                if crc16_ccitt(view[pos + 1:end - 2]) != received_crc:
                    # Skip the sync byte only: a real frame may start inside this candidate.
                    self.bad_crcs += 1
                    self.bytes_discarded += 1
                    out.append(CorruptFrame(buf[pos + 2], buf[pos + 3], length))
                    pos += 1
                    continue
                out.append(Frame(buf[pos + 2], buf[pos + 3], bytes(view[pos + 4:end - 2])))
                self.frames += 1
                pos = end
        finally:
            view.release()
        del buf[:pos]
        return out


# ---- messages -----------------------------------------------------------------------------


class ChargingState(IntEnum):
    """STATUS ``charging`` (section 6.3)."""

    NOT_CHARGING = 0
    CHARGING = 1
    FULL = 2


class EventKind(IntEnum):
    """EVENT ``kind`` (section 6.3)."""

    DOCKED = 1
    UNDOCKED = 2
    LID_OPENED = 3
    LID_CLOSED = 4
    POWER_BUTTON = 5


def _check_int(field: str, value: object, low: int, high: int,
               error: type[McuProtocolError] = McuEncodeError) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(f"{field}: must be an integer from {low} to {high}, got {value!r}")
    return value


def _check_bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise McuEncodeError(f"{field}: must be a bool, got {value!r}")
    return value


def _check_enum(field: str, value: object, enum: type[_E]) -> _E:
    if isinstance(value, bool) or not isinstance(value, int):
        raise McuEncodeError(f"{field}: must be a {enum.__name__}, got {value!r}")
    try:
        return enum(value)
    except ValueError:
        raise McuEncodeError(
            f"{field}: must be one of {', '.join(str(int(m)) for m in enum)}, got {value!r}"
        ) from None


def _expect_size(name: str, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise McuProtocolError(f"{name}: payload must be {size} bytes, got {len(payload)}")


def _decode_bool(field: str, value: int) -> bool:
    if value > 1:
        raise McuProtocolError(f"{field}: must be 0 or 1, got {value}")
    return value == 1


def _decode_enum(field: str, value: int, enum: type[_E]) -> _E:
    try:
        return enum(value)
    except ValueError:
        raise McuProtocolError(
            f"{field}: must be one of {', '.join(str(int(m)) for m in enum)}, got {value}"
        ) from None


def _decode_range(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise McuProtocolError(f"{field}: must be {low} to {high}, got {value}")
    return value


_U8: Final = struct.Struct(">B")
_U16: Final = struct.Struct(">H")
_U8U8: Final = struct.Struct(">BB")


@dataclass(frozen=True)
class Ack:
    """ACK: the frame ``seq`` of the other side was received (section 4.2). Not itself
    acknowledged."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    seq: int

    def to_payload(self) -> bytes:
        """The payload bytes; raises :class:`McuEncodeError` on a field out of range."""
        return _U8.pack(_check_int("ack.seq", self.seq, 0, U8_MAX))

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` naming the bad field."""
        _expect_size("ack", payload, 1)
        return cls(payload[0])


@dataclass(frozen=True)
class Nak:
    """NAK: the frame ``seq`` was refused for ``reason`` (section 4.3). Not acknowledged."""

    TYPE: ClassVar[MsgType] = MsgType.NAK
    seq: int
    reason: NakReason

    def to_payload(self) -> bytes:
        """The payload bytes; raises :class:`McuEncodeError` on a field out of range."""
        return _U8U8.pack(_check_int("nak.seq", self.seq, 0, U8_MAX),
                          _check_enum("nak.reason", self.reason, NakReason))

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` naming the bad field."""
        _expect_size("nak", payload, 2)
        return cls(payload[0], _decode_enum("nak.reason", payload[1], NakReason))


@dataclass(frozen=True)
class Hello:
    """HELLO, host to MCU: the first frame of every host session (section 5)."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    protocol: int = PROTOCOL_VERSION

    def to_payload(self) -> bytes:
        """The payload bytes; raises :class:`McuEncodeError` on a field out of range."""
        return _U8.pack(_check_int("hello.protocol", self.protocol, 1, U8_MAX))

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` naming the bad field."""
        _expect_size("hello", payload, 1)
        return cls(_decode_range("hello.protocol", payload[0], 1, U8_MAX))


@dataclass(frozen=True)
class HelloReply:
    """HELLO_REPLY, MCU to host: the MCU's protocol version, firmware version and the
    longest lease it grants (section 5)."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO_REPLY
    protocol: int
    firmware_version: int
    max_lease_ms: int

    _STRUCT: ClassVar[struct.Struct] = struct.Struct(">BHH")

    def to_payload(self) -> bytes:
        """The payload bytes; raises :class:`McuEncodeError` on a field out of range."""
        return self._STRUCT.pack(
            _check_int("hello_reply.protocol", self.protocol, 1, U8_MAX),
            _check_int("hello_reply.firmware_version", self.firmware_version, 0, U16_MAX),
            _check_int("hello_reply.max_lease_ms", self.max_lease_ms, 1, U16_MAX))

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` naming the bad field."""
        _expect_size("hello_reply", payload, cls._STRUCT.size)
        protocol, firmware, max_lease_ms = cls._STRUCT.unpack(payload)
        return cls(_decode_range("hello_reply.protocol", protocol, 1, U8_MAX), firmware,
                   _decode_range("hello_reply.max_lease_ms", max_lease_ms, 1, U16_MAX))


@dataclass(frozen=True)
class Lease:
    """LEASE, host to MCU: keep the camera rail enabled until the MCU's now + ``duration_ms``
    (1 to 2000); replaces any earlier lease (section 7)."""

    TYPE: ClassVar[MsgType] = MsgType.LEASE
    duration_ms: int

    def to_payload(self) -> bytes:
        """The payload bytes; raises :class:`McuEncodeError` on a field out of range."""
        return _U16.pack(_check_int("lease.duration_ms", self.duration_ms, 1, MAX_LEASE_MS))

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` naming the bad field."""
        _expect_size("lease", payload, 2)
        (duration_ms,) = _U16.unpack(payload)
        return cls(_decode_range("lease.duration_ms", duration_ms, 1, MAX_LEASE_MS))


@dataclass(frozen=True)
class Cut:
    """CUT, host to MCU: the lease ends now (section 7)."""

    TYPE: ClassVar[MsgType] = MsgType.CUT

    def to_payload(self) -> bytes:
        """The payload bytes (none)."""
        return b""

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` if it is not empty."""
        _expect_size("cut", payload, 0)
        return cls()


@dataclass(frozen=True)
class Led:
    """LED, host to MCU: set the MCU's status LED colour."""

    TYPE: ClassVar[MsgType] = MsgType.LED
    r: int
    g: int
    b: int

    def to_payload(self) -> bytes:
        """The payload bytes; raises :class:`McuEncodeError` on a field out of range."""
        return bytes((_check_int("led.r", self.r, 0, U8_MAX),
                      _check_int("led.g", self.g, 0, U8_MAX),
                      _check_int("led.b", self.b, 0, U8_MAX)))

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` naming the bad field."""
        _expect_size("led", payload, 3)
        return cls(payload[0], payload[1], payload[2])


@dataclass(frozen=True)
class PowerOff:
    """POWER_OFF, host to MCU: cut the tablet's power in ``delay_s`` seconds (0 to 65535);
    the lease ends now (section 6.2)."""

    TYPE: ClassVar[MsgType] = MsgType.POWER_OFF
    delay_s: int

    def to_payload(self) -> bytes:
        """The payload bytes; raises :class:`McuEncodeError` on a field out of range."""
        return _U16.pack(_check_int("power_off.delay_s", self.delay_s, 0, U16_MAX))

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` naming the bad field."""
        _expect_size("power_off", payload, 2)
        return cls(_U16.unpack(payload)[0])


@dataclass(frozen=True)
class Ping:
    """PING, host to MCU: no action; its ACK measures the round trip (section 4.4)."""

    TYPE: ClassVar[MsgType] = MsgType.PING

    def to_payload(self) -> bytes:
        """The payload bytes (none)."""
        return b""

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` if it is not empty."""
        _expect_size("ping", payload, 0)
        return cls()


@dataclass(frozen=True)
class Status:
    """STATUS, MCU to host: every second and on change (section 6.3).

    ``temperature_dc`` is in tenths of a degree Celsius. ``dock_bay`` is 0 when not docked.
    ``rail_measured`` is the rail as the MCU measures it; ``lease_remaining_ms`` is 0 when
    no lease is running.
    """

    TYPE: ClassVar[MsgType] = MsgType.STATUS
    battery_mv: int
    battery_pct: int
    charging: ChargingState
    charger_fault: bool
    temperature_dc: int
    docked: bool
    dock_bay: int
    rail_measured: bool
    lease_remaining_ms: int

    _STRUCT: ClassVar[struct.Struct] = struct.Struct(">HBBBhBBBH")

    def to_payload(self) -> bytes:
        """The payload bytes; raises :class:`McuEncodeError` on a field out of range."""
        docked = _check_bool("status.docked", self.docked)
        dock_bay = _check_int("status.dock_bay", self.dock_bay, 0, U8_MAX)
        if not docked and dock_bay != 0:
            raise McuEncodeError(f"status.dock_bay: must be 0 when not docked, got {dock_bay}")
        return self._STRUCT.pack(
            _check_int("status.battery_mv", self.battery_mv, 0, U16_MAX),
            _check_int("status.battery_pct", self.battery_pct, 0, 100),
            _check_enum("status.charging", self.charging, ChargingState),
            _check_bool("status.charger_fault", self.charger_fault),
            _check_int("status.temperature_dc", self.temperature_dc, -0x8000, 0x7FFF),
            docked, dock_bay,
            _check_bool("status.rail_measured", self.rail_measured),
            _check_int("status.lease_remaining_ms", self.lease_remaining_ms, 0, MAX_LEASE_MS))

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` naming the bad field."""
        _expect_size("status", payload, cls._STRUCT.size)
        (battery_mv, battery_pct, charging, charger_fault, temperature_dc, docked, dock_bay,
         rail_measured, lease_remaining_ms) = cls._STRUCT.unpack(payload)
        is_docked = _decode_bool("status.docked", docked)
        if not is_docked and dock_bay != 0:
            raise McuProtocolError(f"status.dock_bay: must be 0 when not docked, got {dock_bay}")
        return cls(
            battery_mv=battery_mv,
            battery_pct=_decode_range("status.battery_pct", battery_pct, 0, 100),
            charging=_decode_enum("status.charging", charging, ChargingState),
            charger_fault=_decode_bool("status.charger_fault", charger_fault),
            temperature_dc=temperature_dc,
            docked=is_docked,
            dock_bay=dock_bay,
            rail_measured=_decode_bool("status.rail_measured", rail_measured),
            lease_remaining_ms=_decode_range(
                "status.lease_remaining_ms", lease_remaining_ms, 0, MAX_LEASE_MS))


#: Event kinds that carry a bay; the others carry bay 0.
_BAY_EVENTS: Final = frozenset({EventKind.DOCKED, EventKind.UNDOCKED})


@dataclass(frozen=True)
class Event:
    """EVENT, MCU to host (section 6.3). ``bay`` is the dock bay for DOCKED and UNDOCKED (the
    bay arrived at or left, 0 if unknown) and 0 for the other kinds."""

    TYPE: ClassVar[MsgType] = MsgType.EVENT
    kind: EventKind
    bay: int = 0

    def to_payload(self) -> bytes:
        """The payload bytes; raises :class:`McuEncodeError` on a field out of range."""
        kind = _check_enum("event.kind", self.kind, EventKind)
        bay = _check_int("event.bay", self.bay, 0, U8_MAX)
        if kind not in _BAY_EVENTS and bay != 0:
            raise McuEncodeError(f"event.bay: must be 0 for {kind.name}, got {bay}")
        return _U8U8.pack(kind, bay)

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        """Decode a payload; raises :class:`McuProtocolError` naming the bad field."""
        _expect_size("event", payload, 2)
        kind = _decode_enum("event.kind", payload[0], EventKind)
        if kind not in _BAY_EVENTS and payload[1] != 0:
            raise McuProtocolError(f"event.bay: must be 0 for {kind.name}, got {payload[1]}")
        return cls(kind, payload[1])


HostMessage: TypeAlias = Hello | Lease | Cut | Led | PowerOff | Ping
McuMessage: TypeAlias = HelloReply | Status | Event
ControlMessage: TypeAlias = Ack | Nak
Message: TypeAlias = ControlMessage | HostMessage | McuMessage

MESSAGE_CLASSES: Final[dict[MsgType, type[Message]]] = {
    cls.TYPE: cls
    for cls in (Ack, Nak, Hello, HelloReply, Lease, Cut, Led, PowerOff, Ping, Status, Event)
}


def decode_message(frame: Frame) -> Message:
    """Decode the message a good frame carries (section 6).

    Raises :class:`McuProtocolError`: with ``nak_reason`` UNKNOWN_TYPE for a TYPE not in
    section 6, BAD_PAYLOAD (and a detail naming the field) for a payload of the wrong size or
    a field out of range. The caller NAKs the frame with that reason and does not act on it.
    """
    try:
        cls = MESSAGE_CLASSES[MsgType(frame.type)]
    except ValueError:
        raise McuProtocolError(f"frame.type: unknown message type 0x{frame.type:02x}",
                               NakReason.UNKNOWN_TYPE) from None
    return cls.from_payload(frame.payload)


def encode_message(seq: int, message: Message) -> bytes:
    """Return the frame that carries ``message`` with sequence number ``seq`` (0 to 255; by
    section 4.1, 0 for ACK and NAK). Raises :class:`McuEncodeError` if a field is out of
    range or ``message`` is not a message of this module."""
    if type(message) not in MESSAGE_CLASSES.values():
        raise McuEncodeError(f"message: not an MCU message, got {message!r}")
    return encode_frame(seq, message.TYPE, message.to_payload())
