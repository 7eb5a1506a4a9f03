"""The MCU frame and message codec (``docs/mcu-protocol.md`` sections 2, 3 and 6).

First the CRC against its published vectors and a bitwise reference; then frames and every
message by example (including the hex of the document's example exchange) and as hypothesis
round trips; then one refusal per rule, with the field named in the detail; then the frame
decoder's resynchronisation, by example, under random chunking and noise, and fed a million
random bytes. The decoder never raises; ``decode_message`` raises only ``McuProtocolError``.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tabletd.errors import TabletdError
from tabletd.mcu.codec import (
    FRAME_OVERHEAD,
    HOST_TO_MCU_TYPES,
    MAX_FRAME,
    MAX_LEASE_MS,
    MAX_PAYLOAD,
    MCU_TO_HOST_TYPES,
    MESSAGE_CLASSES,
    SYNC,
    Ack,
    ChargingState,
    CorruptFrame,
    Cut,
    Event,
    EventKind,
    Frame,
    FrameDecoder,
    Hello,
    HelloReply,
    Lease,
    Led,
    McuEncodeError,
    McuProtocolError,
    Message,
    MsgType,
    Nak,
    NakReason,
    Ping,
    PowerOff,
    Status,
    crc16_ccitt,
    decode_message,
    encode_frame,
    encode_message,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "mcu-protocol.md"


def crc_reference(data: bytes) -> int:
    """The bitwise CRC of section 2.2, transcribed from its C reference."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


STATUS = Status(battery_mv=3900, battery_pct=82, charging=ChargingState.CHARGING,
                charger_fault=False, temperature_dc=231, docked=True, dock_bay=3,
                rail_measured=True, lease_remaining_ms=998)

EXAMPLES: list[Message] = [
    Ack(0), Ack(255), Nak(7, NakReason.BAD_CRC), Nak(255, NakReason.BUSY),
    Hello(), HelloReply(1, 0x0102, 2000), Lease(1), Lease(MAX_LEASE_MS), Cut(),
    Led(255, 0, 128), PowerOff(0), PowerOff(65535), Ping(), STATUS,
    Status(0, 0, ChargingState.NOT_CHARGING, True, -32768, False, 0, False, 0),
    Status(65535, 100, ChargingState.FULL, False, 32767, True, 255, True, MAX_LEASE_MS),
    Event(EventKind.DOCKED, 4), Event(EventKind.UNDOCKED, 0), Event(EventKind.LID_OPENED),
    Event(EventKind.LID_CLOSED), Event(EventKind.POWER_BUTTON),
]


# ---- CRC and constants ----------------------------------------------------------------------


def test_constants() -> None:
    assert (SYNC, MAX_PAYLOAD, FRAME_OVERHEAD, MAX_FRAME) == (0xA5, 64, 6, 70)
    assert MAX_LEASE_MS == 2000
    assert set(MESSAGE_CLASSES) == set(MsgType)
    assert all(t & 0x80 for t in MCU_TO_HOST_TYPES)
    assert not any(t & 0x80 for t in HOST_TO_MCU_TYPES)


def test_crc_vectors_of_section_2_2() -> None:
    assert crc16_ccitt(b"123456789") == 0x29B1
    assert crc16_ccitt(b"") == 0xFFFF
    assert crc16_ccitt(bytes.fromhex("01001001")) == 0xE126
    assert crc16_ccitt(bytes.fromhex("000212")) == 0x988D
    assert crc_reference(b"123456789") == 0x29B1
    # Continuing over a second part gives the CRC of the whole.
    assert crc16_ccitt(b"6789", crc16_ccitt(b"12345")) == 0x29B1


@given(st.binary(max_size=200))
def test_crc_matches_the_bitwise_reference(data: bytes) -> None:
    assert crc16_ccitt(data) == crc_reference(data)


# ---- frames and messages by example -----------------------------------------------------------


def test_frame_layout() -> None:
    assert encode_frame(0, 0x10, b"\x01") == bytes.fromhex("A5 01 00 10 01 E1 26")
    assert encode_frame(2, 0x12) == bytes.fromhex("A5 00 02 12 98 8D")
    largest = encode_frame(255, 0xFF, bytes(range(64)))
    assert len(largest) == MAX_FRAME
    assert largest[:4] == bytes((0xA5, 64, 255, 0xFF))
    assert int.from_bytes(largest[-2:], "big") == crc16_ccitt(largest[1:-2])
    assert FrameDecoder().feed(largest) == [Frame(255, 0xFF, bytes(range(64)))]
    assert Frame(1, 2, b"abc").wire_size == 9


def test_message_vectors() -> None:
    vectors = {
        (0, Hello()): "a5 01 00 10 01 e1 26",
        (0, Ack(0)): "a5 01 00 01 00 c1 45",
        (0, HelloReply(1, 0x0102, 2000)): "a5 05 00 90 01 01 02 07 d0 57 4b",
        (1, Lease(1000)): "a5 02 01 11 03 e8 7e 1d",
        (1, STATUS): "a5 0c 01 91 0f 3c 52 01 00 00 e7 01 03 01 03 e6 2e 15",
        (2, Cut()): "a5 00 02 12 98 8d",
        (0, Nak(2, NakReason.BAD_CRC)): "a5 02 00 02 02 01 4d ac",
        (2, Event(EventKind.UNDOCKED, 3)): "a5 02 02 92 02 03 f8 bf",
        (3, Ping()): "a5 00 03 15 db 5b",
        (0, Led(255, 0, 0)): "a5 03 00 13 ff 00 00 8f e8",
        (0, PowerOff(30)): "a5 02 00 14 00 1e 39 d3",
    }
    for (seq, message), expected in vectors.items():
        data = encode_message(seq, message)
        assert data.hex(" ") == expected, message
        [frame] = FrameDecoder().feed(data)
        assert frame.seq == seq
        assert decode_message(frame) == message


def test_the_document_example_exchange_decodes() -> None:
    """Every frame in section 9 of the protocol document is well formed, but the one shown
    damaged on the line."""
    section = DOC.read_text(encoding="utf-8").split("## 9. Example exchange")[1]
    section = section.split("## 10.")[0]
    frames = re.findall(r"`(A5(?: [0-9A-F]{2})+)`", section)
    assert len(frames) >= 18
    damaged = 0
    for text in frames:
        decoder = FrameDecoder()
        decoded = decoder.feed(bytes.fromhex(text))
        if not decoded:
            damaged += 1
            assert decoder.bad_crcs == 1
            continue
        [frame] = decoded
        assert encode_message(frame.seq, decode_message(frame)) == bytes.fromhex(text)
    assert damaged == 1


@pytest.mark.parametrize("message", EXAMPLES, ids=repr)
def test_every_example_round_trips(message: Message) -> None:
    data = encode_message(17, message)
    assert data[3] == message.TYPE
    [frame] = FrameDecoder().feed(data)
    assert frame == Frame(17, message.TYPE, message.to_payload())
    assert decode_message(frame) == message
    assert type(message).from_payload(message.to_payload()) == message


# ---- hypothesis strategies ------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)


@st.composite
def statuses(draw: st.DrawFn) -> Status:
    docked = draw(st.booleans())
    return Status(
        battery_mv=draw(u16), battery_pct=draw(st.integers(0, 100)),
        charging=draw(st.sampled_from(ChargingState)), charger_fault=draw(st.booleans()),
        temperature_dc=draw(st.integers(-0x8000, 0x7FFF)), docked=docked,
        dock_bay=draw(u8) if docked else 0, rail_measured=draw(st.booleans()),
        lease_remaining_ms=draw(st.integers(0, MAX_LEASE_MS)))


@st.composite
def events(draw: st.DrawFn) -> Event:
    kind = draw(st.sampled_from(EventKind))
    bay = draw(u8) if kind in (EventKind.DOCKED, EventKind.UNDOCKED) else 0
    return Event(kind, bay)


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ack, u8),
    st.builds(Nak, u8, st.sampled_from(NakReason)),
    st.builds(Hello, st.integers(1, 255)),
    st.builds(HelloReply, st.integers(1, 255), u16, st.integers(1, 0xFFFF)),
    st.builds(Lease, st.integers(1, MAX_LEASE_MS)),
    st.just(Cut()),
    st.builds(Led, u8, u8, u8),
    st.builds(PowerOff, u16),
    st.just(Ping()),
    statuses(),
    events(),
)


@given(u8, messages)
def test_any_message_round_trips(seq: int, message: Message) -> None:
    [frame] = FrameDecoder().feed(encode_message(seq, message))
    assert frame.seq == seq
    assert decode_message(frame) == message


@given(u8, u8, st.binary(max_size=MAX_PAYLOAD))
def test_any_frame_decodes_to_a_message_or_the_codec_error(
        seq: int, type_: int, payload: bytes) -> None:
    [frame] = FrameDecoder().feed(encode_frame(seq, type_, payload))
    assert frame == Frame(seq, type_, payload)
    try:
        message = decode_message(frame)
    except McuProtocolError as exc:
        assert exc.nak_reason in (NakReason.UNKNOWN_TYPE, NakReason.BAD_PAYLOAD)
        assert exc.detail
        return
    # Whatever decodes encodes back to the same bytes: the codec is canonical.
    assert message.to_payload() == payload
    assert type_ == message.TYPE


# ---- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(("type_", "payload", "detail"), [
    (0x01, b"", "ack: payload must be 1 bytes, got 0"),
    (0x02, b"\x01\x00", "nak.reason: must be one of 1, 2, 3, 4, got 0"),
    (0x02, b"\x01\x05", "nak.reason"),
    (0x10, b"\x00", "hello.protocol: must be 1 to 255, got 0"),
    (0x10, b"\x01\x00", "hello: payload must be 1 bytes, got 2"),
    (0x11, b"\x00\x00", "lease.duration_ms: must be 1 to 2000, got 0"),
    (0x11, b"\x07\xd1", "lease.duration_ms: must be 1 to 2000, got 2001"),
    (0x11, b"\x01", "lease: payload must be 2 bytes"),
    (0x12, b"\x00", "cut: payload must be 0 bytes, got 1"),
    (0x13, b"\x00\x00", "led: payload must be 3 bytes"),
    (0x14, b"\x00", "power_off: payload must be 2 bytes"),
    (0x15, b"x", "ping: payload must be 0 bytes"),
    (0x90, b"\x01\x00\x01\x00\x00", "hello_reply.max_lease_ms: must be 1 to 65535, got 0"),
    (0x90, b"\x00\x00\x01\x00\x01", "hello_reply.protocol"),
    (0x91, bytes(11), "status: payload must be 12 bytes, got 11"),
    (0x91, bytes.fromhex("0f3c 65 01 00 00e7 01 03 01 03e6"), "status.battery_pct"),
    (0x91, bytes.fromhex("0f3c 52 03 00 00e7 01 03 01 03e6"), "status.charging"),
    (0x91, bytes.fromhex("0f3c 52 01 02 00e7 01 03 01 03e6"), "status.charger_fault"),
    (0x91, bytes.fromhex("0f3c 52 01 00 00e7 02 03 01 03e6"), "status.docked"),
    (0x91, bytes.fromhex("0f3c 52 01 00 00e7 00 03 01 03e6"),
     "status.dock_bay: must be 0 when not docked, got 3"),
    (0x91, bytes.fromhex("0f3c 52 01 00 00e7 01 03 07 03e6"), "status.rail_measured"),
    (0x91, bytes.fromhex("0f3c 52 01 00 00e7 01 03 01 07d1"),
     "status.lease_remaining_ms: must be 0 to 2000, got 2001"),
    (0x92, b"\x00\x00", "event.kind: must be one of 1, 2, 3, 4, 5, got 0"),
    (0x92, b"\x03\x01", "event.bay: must be 0 for LID_OPENED, got 1"),
    (0x92, b"\x01", "event: payload must be 2 bytes"),
])
def test_bad_payloads_are_refused_naming_the_field(
        type_: int, payload: bytes, detail: str) -> None:
    with pytest.raises(McuProtocolError) as info:
        decode_message(Frame(0, type_, payload))
    assert detail in info.value.detail
    assert info.value.nak_reason is NakReason.BAD_PAYLOAD
    assert not isinstance(info.value, McuEncodeError)
    assert isinstance(info.value, TabletdError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("type_", [0x00, 0x03, 0x16, 0x80, 0x93, 0xFF])
def test_unknown_types_are_refused(type_: int) -> None:
    with pytest.raises(McuProtocolError, match=f"unknown message type 0x{type_:02x}") as info:
        decode_message(Frame(0, type_, b""))
    assert info.value.nak_reason is NakReason.UNKNOWN_TYPE


@pytest.mark.parametrize(("make", "detail"), [
    (lambda: encode_frame(256, 1), "frame.seq: must be an integer from 0 to 255, got 256"),
    (lambda: encode_frame(-1, 1), "frame.seq"),
    (lambda: encode_frame(True, 1), "frame.seq"),
    (lambda: encode_frame(0, 300), "frame.type"),
    (lambda: encode_frame(0, 1, bytes(65)), "frame.payload: must be at most 64 bytes, got 65"),
    (lambda: encode_frame(0, 1, "text"), "frame.payload: must be bytes"),
    (lambda: Ack(256).to_payload(), "ack.seq"),
    (lambda: Nak(1, 9).to_payload(), "nak.reason: must be one of 1, 2, 3, 4, got 9"),
    (lambda: Hello(0).to_payload(), "hello.protocol"),
    (lambda: HelloReply(1, 70000, 10).to_payload(), "hello_reply.firmware_version"),
    (lambda: HelloReply(1, 1, 0).to_payload(), "hello_reply.max_lease_ms"),
    (lambda: Lease(0).to_payload(), "lease.duration_ms: must be an integer from 1 to 2000"),
    (lambda: Lease(2001).to_payload(), "lease.duration_ms"),
    (lambda: Lease(1.5).to_payload(), "lease.duration_ms"),
    (lambda: Led(0, 256, 0).to_payload(), "led.g"),
    (lambda: PowerOff(-1).to_payload(), "power_off.delay_s"),
    (lambda: Status(3900, 101, ChargingState.FULL, False, 0, False, 0, False, 0).to_payload(),
     "status.battery_pct"),
    (lambda: Status(3900, 1, 5, False, 0, False, 0, False, 0).to_payload(), "status.charging"),
    (lambda: Status(3900, 1, 0, 1, 0, False, 0, False, 0).to_payload(),
     "status.charger_fault: must be a bool"),
    (lambda: Status(3900, 1, 0, False, 40000, False, 0, False, 0).to_payload(),
     "status.temperature_dc"),
    (lambda: Status(3900, 1, 0, False, 0, False, 2, False, 0).to_payload(),
     "status.dock_bay: must be 0 when not docked"),
    (lambda: Status(3900, 1, 0, False, 0, True, 2, False, 2001).to_payload(),
     "status.lease_remaining_ms"),
    (lambda: Event(9).to_payload(), "event.kind"),
    (lambda: Event(EventKind.POWER_BUTTON, 1).to_payload(), "event.bay: must be 0"),
    (lambda: encode_message(0, "hello"), "message: not an MCU message"),
])
def test_encoding_what_the_format_cannot_carry_is_our_error(make: object, detail: str) -> None:
    assert callable(make)
    with pytest.raises(McuEncodeError) as info:
        make()
    assert detail in str(info.value)
    assert isinstance(info.value, McuProtocolError)


# ---- the frame decoder: resynchronisation ----------------------------------------------------


def test_a_noise_sync_with_the_largest_length_does_not_lose_the_frame_behind_it() -> None:
    frame = encode_message(5, Ping())
    decoder = FrameDecoder()
    # The false candidate needs 70 bytes: it swallows the real frame and waits.
    assert decoder.feed(b"\xa5\x40" + frame) == []
    assert decoder.partial
    assert decoder.pending == 2 + len(frame)
    # Bytes that complete the candidate: its CRC fails, one byte goes, the hunt finds it.
    filler = bytes(MAX_FRAME)
    assert decoder.feed(filler) == [Frame(5, MsgType.PING, b"")]
    assert decoder.bad_crcs == 1
    assert decoder.bytes_discarded == 2 + len(filler)
    assert not decoder.partial


def test_an_idle_line_abandons_the_false_candidate() -> None:
    decoder = FrameDecoder()
    frame = encode_message(5, Ping())
    assert decoder.feed(b"\x00\xa5\x30\xa5\x20" + frame) == []
    # Abandoning discards each stale sync in turn until nothing incomplete is held.
    assert decoder.abandon_partial() == [Frame(5, MsgType.PING, b"")]
    assert decoder.abandoned == 2
    assert not decoder.partial
    assert decoder.abandon_partial() == []
    assert decoder.bytes_received == decoder.bytes_discarded + len(frame)


def test_impossible_lengths_and_bad_crcs_discard_one_byte_each() -> None:
    decoder = FrameDecoder()
    frame = encode_message(9, Lease(500))
    damaged = bytearray(frame)
    damaged[-1] ^= 0x01
    events = decoder.feed_events(b"\xa5\xff\xa5\x41" + bytes(damaged) + frame)
    assert events == [CorruptFrame(9, MsgType.LEASE, 2), Frame(9, MsgType.LEASE, b"\x01\xf4")]
    assert decoder.bad_lengths == 2
    assert decoder.bad_crcs == 1
    assert decoder.frames == 1
    assert decoder.bytes_discarded == 4 + len(damaged)


def test_a_sync_byte_inside_a_payload_is_harmless() -> None:
    message = Led(0xA5, 0xA5, 0xA5)
    data = encode_message(0xA5, message) * 3
    decoder = FrameDecoder()
    frames = [frame for chunk in (data[:5], data[5:11], data[11:]) for frame in decoder.feed(chunk)]
    assert [decode_message(frame) for frame in frames] == [message] * 3
    assert decoder.bytes_discarded == 0


# Noise between frames: any bytes, with a good share of sync bytes and plausible lengths.
noise_bytes = st.lists(st.one_of(st.just(SYNC), st.integers(0, MAX_PAYLOAD + 2), u8),
                       max_size=80).map(bytes)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(u8, messages, noise_bytes), max_size=25), st.randoms())
def test_frames_survive_random_chunking_and_noise(
        items: list[tuple[int, Message, bytes]], rnd: random.Random) -> None:
    sent: list[Frame] = []
    stream = bytearray()
    for seq, message, noise in items:
        stream += noise
        data = encode_message(seq, message)
        stream += data
        sent.append(Frame(seq, message.TYPE, message.to_payload()))
    stream += rnd.choice([b"", b"\xa5", b"\xa5\x40", bytes(3)])  # trailing noise
    decoder = FrameDecoder()
    got: list[Frame] = []
    position = 0
    while position < len(stream):
        size = rnd.randint(1, 90)
        got += decoder.feed(stream[position:position + size])
        position += size
    # Noise can forge a frame only by carrying a valid CRC (2**-16 per candidate): such an
    # example is set aside, and every other must decode exactly the real frames, in order.
    assume(all(frame in sent for frame in got))
    got += [event for event in decoder.abandon_partial() if isinstance(event, Frame)]
    assume(all(frame in sent for frame in got))
    assert got == sent
    assert decoder.pending == 0
    assert decoder.bytes_received == len(stream)
    assert decoder.bytes_discarded == len(stream) - sum(frame.wire_size for frame in sent)
    # The same stream in one piece gives the same frames.
    whole = FrameDecoder()
    assert whole.feed(bytes(stream)) + [
        e for e in whole.abandon_partial() if isinstance(e, Frame)] == got


def test_a_million_random_bytes_never_raise() -> None:
    """Any byte stream is discarded or decoded; only ``McuProtocolError`` escapes the message
    layer, and every frame that came out has a correct CRC."""
    rnd = random.Random(20240605)
    data = rnd.randbytes(1_000_000)
    decoder = FrameDecoder()
    started = time.monotonic()
    frames: list[Frame] = []
    position = 0
    while position < len(data):
        size = rnd.choice((1, 2, 7, 64, 500, 4096))
        frames += decoder.feed(data[position:position + size])
        position += size
    frames += [event for event in decoder.abandon_partial() if isinstance(event, Frame)]
    decoded = refused = 0
    for frame in frames:
        assert encode_frame(frame.seq, frame.type, frame.payload) in data
        try:
            decode_message(frame)
            decoded += 1
        except McuProtocolError:
            refused += 1
    assert decoder.bytes_received == 1_000_000
    assert decoder.bytes_discarded + sum(f.wire_size for f in frames) == 1_000_000
    assert decoder.bad_lengths > 0
    assert decoder.bad_crcs > 0
    assert time.monotonic() - started < 20
