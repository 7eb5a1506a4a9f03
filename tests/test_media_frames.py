"""The media frame codec (``docs/protocol.md`` section 6.1).

First, round trips, by example, against a byte-exact vector, and as a hypothesis property.
Then one invalid example per rule, each with its code and detail; then encoding errors (our
bug, not the peer's). Last, the codec's contract under fuzzing: any bytes either decode to a
``MediaFrame`` or raise ``ProtocolError``, nothing else.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tabletd.errors import TabletdError
from tabletd.link.messages import ProtocolError
from tabletd.media.frames import (
    HEADER_SIZE,
    MAX_BINARY_FRAME,
    MAX_CAPTURE_US,
    MAX_PAYLOAD,
    MAX_SEQ,
    MediaFrame,
    Stream,
    decode_frame,
    encode_frame,
)

NAL_IDR = b"\x00\x00\x00\x01\x67\x42\xc0\x1f" + b"\x00\x00\x00\x01\x68\xce\x3c\x80" \
    + b"\x00\x00\x00\x01\x65\x88\x84"
OPUS = b"\xf8\xff\xfe"


def header(*, version: int = 1, stream: int = 0, flags: int = 0, reserved: int = 0,
           seq: int = 0, capture_us: int = 0) -> bytes:
    return struct.pack(">BBBBIQ", version, stream, flags, reserved, seq, capture_us)


# ---- round trips ----------------------------------------------------------------------------


def test_constants() -> None:
    assert HEADER_SIZE == 16
    assert MAX_BINARY_FRAME == 1_048_576
    assert MAX_PAYLOAD == MAX_BINARY_FRAME - HEADER_SIZE
    assert (Stream.VIDEO, Stream.AUDIO) == (0, 1)


def test_byte_exact_vector() -> None:
    # A keyframe, stream 0, seq 0x01020304, capture 0x0102030405060708 us (section 6.1).
    frame = MediaFrame(Stream.VIDEO, True, 0x01020304, 0x0102030405060708, b"\xab")
    data = encode_frame(frame)
    assert data.hex() == "01000100" "01020304" "0102030405060708" "ab"
    assert decode_frame(data) == frame


@pytest.mark.parametrize("frame", [
    MediaFrame(Stream.VIDEO, True, 0, 0, NAL_IDR),
    MediaFrame(Stream.VIDEO, False, 1, 40_000, b"\x00\x00\x00\x01\x41\x9a"),
    MediaFrame(Stream.AUDIO, False, 7, 1_000_020_000, OPUS),
    MediaFrame(Stream.AUDIO, False, MAX_SEQ, MAX_CAPTURE_US, b"\x00"),
    MediaFrame(Stream.VIDEO, True, MAX_SEQ, 2**63, b"\xff" * MAX_PAYLOAD),
])
def test_round_trip(frame: MediaFrame) -> None:
    data = encode_frame(frame)
    assert isinstance(data, bytes)
    assert len(data) == frame.wire_size == HEADER_SIZE + len(frame.payload)
    decoded = decode_frame(data)
    assert decoded == frame
    assert type(decoded.stream) is Stream
    assert type(decoded.keyframe) is bool
    assert type(decoded.payload) is bytes


def test_largest_frame_is_accepted_and_one_more_byte_is_not() -> None:
    data = header() + b"\x01" * MAX_PAYLOAD
    assert len(data) == MAX_BINARY_FRAME
    assert decode_frame(data).payload == b"\x01" * MAX_PAYLOAD
    with pytest.raises(ProtocolError) as caught:
        decode_frame(data + b"\x01")
    assert caught.value.code == "bad_message"
    assert caught.value.detail == "media: frame of 1048577 bytes, over the limit of 1048576"


def test_audio_keyframe_flag_round_trips() -> None:
    # Section 6.1 defines the flag without restricting it to video; the codec carries it.
    frame = MediaFrame(Stream.AUDIO, True, 3, 4, OPUS)
    assert decode_frame(encode_frame(frame)) == frame


def test_repr_never_shows_the_payload() -> None:
    # A repr ends up in logs; media must not (BRIEF invariant 7).
    text = repr(MediaFrame(Stream.VIDEO, True, 5, 6, b"SECRETPIXELS"))
    assert "SECRET" not in text
    assert text == ("MediaFrame(stream=VIDEO, keyframe=True, seq=5, capture_us=6, "
                    "payload=<12 bytes>)")


frames = st.builds(
    MediaFrame,
    stream=st.sampled_from(Stream),
    keyframe=st.booleans(),
    seq=st.integers(0, MAX_SEQ),
    capture_us=st.integers(0, MAX_CAPTURE_US),
    payload=st.binary(min_size=1, max_size=64),
)


@settings(max_examples=1000, deadline=None)
@given(frames)
def test_round_trip_property(frame: MediaFrame) -> None:
    data = encode_frame(frame)
    assert decode_frame(data) == frame
    assert encode_frame(decode_frame(data)) == data


# ---- invalid input: the peer misbehaved ------------------------------------------------------


@pytest.mark.parametrize(("data", "detail"), [
    (b"", "media: frame of 0 bytes, shorter than the 16-byte header"),
    (b"\x01", "media: frame of 1 bytes, shorter than the 16-byte header"),
    (header()[:15], "media: frame of 15 bytes, shorter than the 16-byte header"),
    (header(), "media.payload: must be at least 1 byte, got 0"),
    (header(version=0) + b"x", "media.version: must be 1, got 0"),
    (header(version=2) + b"x", "media.version: must be 1, got 2"),
    (header(version=255) + b"x", "media.version: must be 1, got 255"),
    (header(stream=2) + b"x", "media.stream: must be 0 (video) or 1 (audio), got 2"),
    (header(stream=255) + b"x", "media.stream: must be 0 (video) or 1 (audio), got 255"),
    (header(flags=0x02) + b"x", "media.flags: reserved bits must be 0, got 0x02"),
    (header(flags=0x81) + b"x", "media.flags: reserved bits must be 0, got 0x81"),
    (header(flags=0xFF) + b"x", "media.flags: reserved bits must be 0, got 0xff"),
    (header(reserved=1) + b"x", "media.reserved: must be 0, got 0x01"),
    (header(reserved=0x80) + b"x", "media.reserved: must be 0, got 0x80"),
    (header() + b"x" * (MAX_PAYLOAD + 1),
     "media: frame of 1048577 bytes, over the limit of 1048576"),
    (b"\x00" * (4 * MAX_BINARY_FRAME),
     "media: frame of 4194304 bytes, over the limit of 1048576"),
    # Checks run in header order: the first bad field is the one named.
    (header(version=9, stream=9, flags=9, reserved=9),
     "media.version: must be 1, got 9"),
    (header(stream=9, flags=9, reserved=9), "media.stream: must be 0 (video) or 1 (audio), got 9"),
])
def test_invalid_frame(data: bytes, detail: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_frame(data)
    assert caught.value.code == "bad_message"
    assert caught.value.detail == detail
    assert str(caught.value) == f"bad_message: {detail}"
    assert isinstance(caught.value, TabletdError)


# ---- encoding errors: our bug ------------------------------------------------------------


def bad(**changes: Any) -> MediaFrame:
    fields: dict[str, Any] = {"stream": Stream.VIDEO, "keyframe": False, "seq": 0,
                              "capture_us": 0, "payload": b"x"}
    fields.update(changes)
    return MediaFrame(**fields)


@pytest.mark.parametrize(("frame", "message"), [
    (bad(stream=0), "media.stream: must be a Stream, got 0"),
    (bad(stream=2), "media.stream: must be a Stream, got 2"),
    (bad(keyframe=1), "media.keyframe: must be a bool, got 1"),
    (bad(keyframe=None), "media.keyframe: must be a bool, got None"),
    (bad(seq=-1), "media.seq: must be an integer from 0 to 4294967295, got -1"),
    (bad(seq=2**32), "media.seq: must be an integer from 0 to 4294967295, got 4294967296"),
    (bad(seq=True), "media.seq: must be an integer from 0 to 4294967295, got True"),
    (bad(seq=1.0), "media.seq: must be an integer from 0 to 4294967295, got 1.0"),
    (bad(capture_us=-1),
     "media.capture_us: must be an integer from 0 to 18446744073709551615, got -1"),
    (bad(capture_us=2**64),
     "media.capture_us: must be an integer from 0 to 18446744073709551615, "
     "got 18446744073709551616"),
    (bad(capture_us=None),
     "media.capture_us: must be an integer from 0 to 18446744073709551615, got None"),
    (bad(payload=b""), "media.payload: must be 1 to 1048560 bytes, got 0"),
    (bad(payload=b"x" * (MAX_PAYLOAD + 1)),
     "media.payload: must be 1 to 1048560 bytes, got 1048561"),
    (bad(payload=bytearray(b"x")), "media.payload: must be bytes, got bytearray"),
    (bad(payload="x"), "media.payload: must be bytes, got str"),
])
def test_encoding_a_bad_frame_is_our_bug(frame: MediaFrame, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        encode_frame(frame)
    assert str(caught.value) == message
    assert not isinstance(caught.value, ProtocolError)  # our bug, not the peer's
    assert isinstance(caught.value, TabletdError)


# ---- fuzzing: decode or ProtocolError, nothing else -----------------------------------------
#
# Hypothesis spends far longer drawing an example than the codec spends on it, so each example
# is a batch: one drawn input, plus MUTANTS derived from a drawn valid frame by a drawn (so
# reproducible) Random: header bytes set to interesting values, truncations, extensions.

MUTANTS = 19
FUZZ_INPUTS = 10_000
FUZZ_EXAMPLES = FUZZ_INPUTS // (MUTANTS + 1) + 50
INTERESTING = [0x00, 0x01, 0x02, 0x7F, 0x80, 0xFE, 0xFF]


def check_contract(data: bytes) -> MediaFrame | None:
    """Any bytes decode to a valid frame (which re-encodes to the same bytes) or raise
    ProtocolError("bad_message"); nothing else escapes."""
    try:
        frame = decode_frame(data)
    except ProtocolError as exc:
        assert exc.code == "bad_message"
        assert exc.detail.startswith("media")
        return None
    assert encode_frame(frame) == data
    return frame


def mutate(valid: bytes, rng: random.Random) -> bytes:
    data = bytearray(valid)
    choice = rng.randrange(5)
    if choice == 0:  # one header byte to an interesting value
        data[rng.randrange(HEADER_SIZE)] = rng.choice(INTERESTING)
    elif choice == 1:  # any byte to anything
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice == 2:  # truncated, around the header boundary most often
        del data[rng.choice([0, 1, HEADER_SIZE - 1, HEADER_SIZE, rng.randrange(len(data))]):]
    elif choice == 3:  # extended
        data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    else:  # a few bit flips
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


@st.composite
def fuzz_batches(draw: st.DrawFn) -> list[bytes]:
    raw = draw(st.binary(max_size=40))
    valid = encode_frame(draw(frames))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    return [raw, valid] + [mutate(valid, rng) for _ in range(MUTANTS - 1)]


def test_any_bytes_decode_or_raise_protocol_error() -> None:
    counts = {"inputs": 0, "decoded": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(fuzz_batches())
    def run(batch: list[bytes]) -> None:
        for data in batch:
            if check_contract(data) is not None:
                counts["decoded"] += 1
        counts["inputs"] += len(batch)

    run()
    assert counts["inputs"] >= FUZZ_INPUTS
    # The mutations reach both outcomes, not only the first check.
    assert FUZZ_INPUTS // 10 < counts["decoded"] < counts["inputs"] - FUZZ_INPUTS // 10


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    check_contract(data)
