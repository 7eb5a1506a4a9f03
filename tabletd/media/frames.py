"""The media frame codec of protocol v1 (``docs/protocol.md`` section 6.1): sans-I/O.

Theory of operation
-------------------
Every binary WebSocket frame carries one encoded media unit (one H.264 access unit or one
Opus packet) after a 16-byte header, integers big-endian::

    offset 0  version     1
           1  stream      0 video, 1 audio
           2  flags       bit 0 keyframe, other bits 0
           3  reserved    0
           4  seq         uint32, per stream and direction, wraps at 2**32
           8  capture_us  uint64, microseconds on the sender's monotonic clock
          16  payload     at least 1 byte; the whole frame is at most 1 048 576 bytes

The receiver feeds the payload of one binary WebSocket frame to :func:`decode_frame`. It gets
back a frozen :class:`MediaFrame`, or a :class:`~tabletd.link.messages.ProtocolError` with
code ``bad_message`` ("the peer misbehaved") whose ``detail`` names the field. Nothing else
escapes the decoder, whatever the input (property-tested). Section 6.1 says what to do then:
drop the frame, and answer ``error`` ``bad_message`` at most once per second, if at all.

:func:`encode_frame` goes the other way. A frame that the format cannot carry (a sequence
number out of range, an empty or oversized payload, ...) raises
:class:`~tabletd.link.messages.EncodeError`, a :class:`ValueError` ("we misused it"): it is a
bug in the caller and nothing should be sent.

This module reads no clock and does no I/O. It holds a payload only as long as the caller
holds the frame (BRIEF invariant 7: no media is stored on the tablet), and never prints one:
a :class:`MediaFrame`'s ``repr`` shows the payload's size, not its bytes, so a log line
cannot carry media into the journal.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from tabletd.link.messages import EncodeError, ProtocolError

#: The value of the ``version`` byte in this protocol version (section 6.1).
MEDIA_VERSION: Final = 1
HEADER_SIZE: Final = 16
#: Largest binary frame, header included (section 6.1).
MAX_BINARY_FRAME: Final = 1_048_576
MAX_PAYLOAD: Final = MAX_BINARY_FRAME - HEADER_SIZE
MAX_SEQ: Final = 2**32 - 1
MAX_CAPTURE_US: Final = 2**64 - 1
FLAG_KEYFRAME: Final = 0x01

_HEADER: Final = struct.Struct(">BBBBIQ")
assert _HEADER.size == HEADER_SIZE


class Stream(IntEnum):
    """The ``stream`` byte: what the payload is (section 6.2)."""

    VIDEO = 0  # H.264, Annex B, one access unit
    AUDIO = 1  # one Opus packet


_STREAMS: Final = tuple(Stream)  # indexed by the stream byte


@dataclass(frozen=True)
class MediaFrame:
    """One media unit, as it travels in one binary WebSocket frame.

    ``keyframe`` is the flags bit 0: for video, an IDR access unit with SPS and PPS before
    it. ``seq`` is assigned by the sender (0 to 2**32 - 1, +1 per frame of the stream, so a
    gap means frames were dropped). ``capture_us`` is, on the uplink, the tablet's
    CLOCK_BOOTTIME at capture in microseconds. Construction checks nothing, so that the
    decoder stays cheap; :func:`encode_frame` checks everything.
    """

    stream: Stream
    keyframe: bool
    seq: int
    capture_us: int
    payload: bytes

    @property
    def wire_size(self) -> int:
        """The size of this frame on the wire, header included, in bytes."""
        return HEADER_SIZE + len(self.payload)

    def __repr__(self) -> str:
        # Never the payload's bytes: a repr ends up in logs (BRIEF invariant 7).
        stream = self.stream.name if isinstance(self.stream, Stream) else repr(self.stream)
        return (f"MediaFrame(stream={stream}, keyframe={self.keyframe!r}, seq={self.seq!r}, "
                f"capture_us={self.capture_us!r}, payload=<{len(self.payload)} bytes>)")


def encode_frame(frame: MediaFrame) -> bytes:
    """Return the binary WebSocket frame payload that carries ``frame`` (section 6.1).

    Raises :class:`~tabletd.link.messages.EncodeError` (a :class:`ValueError`) if the format
    cannot carry the frame: ``stream`` not a :class:`Stream`, ``keyframe`` not a bool,
    ``seq`` outside 0 to 2**32 - 1, ``capture_us`` outside 0 to 2**64 - 1, or a payload that
    is not bytes, is empty, or is longer than :data:`MAX_PAYLOAD`. Nothing should be sent then.
    """
    if not isinstance(frame.stream, Stream):
        raise EncodeError(f"media.stream: must be a Stream, got {frame.stream!r}")
    if not isinstance(frame.keyframe, bool):
        raise EncodeError(f"media.keyframe: must be a bool, got {frame.keyframe!r}")
    seq = frame.seq
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise EncodeError(f"media.seq: must be an integer from 0 to {MAX_SEQ}, got {seq!r}")
    capture_us = frame.capture_us
    if (isinstance(capture_us, bool) or not isinstance(capture_us, int)
            or not 0 <= capture_us <= MAX_CAPTURE_US):
        raise EncodeError(
            f"media.capture_us: must be an integer from 0 to {MAX_CAPTURE_US}, "
            f"got {capture_us!r}")
    payload = frame.payload
    if not isinstance(payload, bytes):
        raise EncodeError(f"media.payload: must be bytes, got {type(payload).__name__}")
    if not 1 <= len(payload) <= MAX_PAYLOAD:
        raise EncodeError(
            f"media.payload: must be 1 to {MAX_PAYLOAD} bytes, got {len(payload)}")
    flags = FLAG_KEYFRAME if frame.keyframe else 0
    return _HEADER.pack(MEDIA_VERSION, frame.stream, flags, 0, seq, capture_us) + payload


def decode_frame(data: bytes) -> MediaFrame:
    """Decode the payload of one binary WebSocket frame (section 6.1).

    Returns the :class:`MediaFrame` it carries. Raises
    :class:`~tabletd.link.messages.ProtocolError` with code ``bad_message`` and a detail
    naming the field if the frame is over :data:`MAX_BINARY_FRAME` bytes, shorter than the
    header, of another version, of an unknown stream, has a reserved bit set, or has an empty
    payload. The caller drops such a frame and MAY answer ``error`` ``bad_message``, at most
    once per second (section 6.1); the connection stays up.
    """
    size = len(data)
    # Size first, before any other work on the input (sections 1 and 6.1).
    if size > MAX_BINARY_FRAME:
        raise ProtocolError(
            "bad_message", f"media: frame of {size} bytes, over the limit of {MAX_BINARY_FRAME}")
    if size < HEADER_SIZE:
        raise ProtocolError(
            "bad_message", f"media: frame of {size} bytes, shorter than the {HEADER_SIZE}-byte "
                           "header")
    version, stream, flags, reserved, seq, capture_us = _HEADER.unpack_from(data)
    if version != MEDIA_VERSION:
        raise ProtocolError("bad_message",
                            f"media.version: must be {MEDIA_VERSION}, got {version}")
    if stream >= len(_STREAMS):
        raise ProtocolError("bad_message",
                            f"media.stream: must be 0 (video) or 1 (audio), got {stream}")
    if flags & ~FLAG_KEYFRAME:
        raise ProtocolError("bad_message",
                            f"media.flags: reserved bits must be 0, got 0x{flags:02x}")
    if reserved:
        raise ProtocolError("bad_message", f"media.reserved: must be 0, got 0x{reserved:02x}")
    if size == HEADER_SIZE:
        raise ProtocolError("bad_message", "media.payload: must be at least 1 byte, got 0")
    return MediaFrame(_STREAMS[stream], bool(flags & FLAG_KEYFRAME), seq, capture_us,
                      bytes(data[HEADER_SIZE:]))
