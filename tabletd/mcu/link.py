"""The MCU link: acknowledgement, retransmission, duplicates, handshake (``docs/mcu-protocol.md``
sections 2.4, 4 and 5): sans-I/O, time passed in.

Theory of operation
-------------------
One :class:`McuLink` per side and per opening of the port: the daemon makes a ``"host"``
link each time it (re)opens the UART, the (simulated) MCU holds an ``"mcu"`` link. The
caller owns the port and the clock and drives the link with four calls, each followed by
writing :meth:`McuLink.bytes_to_send` to the port:

- :meth:`~McuLink.send` queues a message (host: LEASE, CUT, LED, POWER_OFF, PING;
  MCU: HELLO_REPLY, STATUS, EVENT);
- :meth:`~McuLink.receive_bytes` feeds what the port read and returns the new messages,
  each once, in order (ACK, NAK and duplicates are handled here and never returned);
- :meth:`~McuLink.tick` runs the timers, at :meth:`~McuLink.next_timeout_ns` or later
  (feed everything already read to ``receive_bytes`` first);
- when :attr:`~McuLink.down` becomes true the link is dead for good: the daemon closes the
  port and opens it again, with backoff, with a new link.

Sending is stop-and-wait (section 4.4): one reliable frame outstanding at a time. Its life::

    state        event                           next state    action
    queued       nothing outstanding, may send   sent          transmit, start RTO
    sent         ACK of its SEQ                  done          RTT sample unless retransmitted
    sent         RTO expires / NAK of its SEQ    due           (count it; 6th time: down)
    due          bytes_to_send                   sent          retransmit, same SEQ, restart RTO

The RTO is ``clamp(2 * SRTT + 4 * RTTVAR, 25 ms, 1 s)`` from the samples (RFC 6298
smoothing, Karn's rule: no sample from a frame that was retransmitted); 250 ms before the
first sample. A host link sends only HELLO until HELLO_REPLY arrives (section 5); an MCU link
sends nothing and refuses everything but HELLO, with NAK busy, until it has received a HELLO.

Two rules protect the camera-rail lease (section 7, BRIEF invariant 3):

- a LEASE is re-encoded at every transmission with the time it has left: a LEASE that waited
  in the queue, or is retransmitted, never makes the rail run past ``send``'s ``now_ns`` plus
  the duration asked. If nothing is left it goes out as a CUT.
- a CUT goes to the head of the queue, and a LEASE or CUT drops the LEASEs still queued (a
  later LEASE replaces the earlier anyway). A STATUS likewise replaces a queued STATUS, and
  a HELLO_REPLY goes to the head of the MCU's queue.

This module reads no clock and does no I/O. Times are integers in nanoseconds on one
monotonic clock (CLOCK_BOOTTIME in the daemon), and must not go backwards.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from tabletd.errors import TabletdError
from tabletd.mcu.codec import (
    HOST_TO_MCU_TYPES,
    MAX_LEASE_MS,
    MCU_TO_HOST_TYPES,
    PROTOCOL_VERSION,
    Ack,
    CorruptFrame,
    Cut,
    Event,
    Frame,
    FrameDecoder,
    Hello,
    HelloReply,
    HostMessage,
    Lease,
    Led,
    McuEncodeError,
    McuMessage,
    McuProtocolError,
    Message,
    MsgType,
    Nak,
    NakReason,
    Ping,
    PowerOff,
    Status,
    decode_message,
    encode_message,
)

MS: Final = 1_000_000
#: Retransmissions of one frame before the link is declared down (section 4.4).
MAX_RETRANSMISSIONS: Final = 5
RTO_MIN_NS: Final = 25 * MS
RTO_MAX_NS: Final = 1000 * MS
#: The RTO before the first round-trip sample (section 4.4).
RTO_INITIAL_NS: Final = 250 * MS
#: An incomplete frame with no byte received for this long is abandoned (section 2.4).
IDLE_GAP_NS: Final = 20 * MS
#: A host link with no good frame from the MCU for this long is down (section 5).
SILENCE_TIMEOUT_NS: Final = 3000 * MS

Role: TypeAlias = Literal["host", "mcu"]
OutgoingMessage: TypeAlias = HostMessage | McuMessage

_HOST_SENDS: Final = (Lease, Cut, Led, PowerOff, Ping)
_MCU_SENDS: Final = (HelloReply, Status, Event)


class McuLinkDownError(TabletdError, ConnectionError):
    """:meth:`McuLink.send` was called on a link that is down. Close the port and open it
    again with a new :class:`McuLink` (section 4.4)."""


class McuLinkTimeError(TabletdError, RuntimeError):
    """:meth:`McuLink.bytes_to_send` needs a time and none was ever given ("we misused
    it"): pass ``now_ns``."""


# ---- round-trip estimation ----------------------------------------------------------------


@dataclass(frozen=True)
class RttStats:
    """A snapshot of the round-trip estimate. Times in nanoseconds; ``None`` before the
    first sample."""

    samples: int
    srtt_ns: int | None
    rttvar_ns: int | None
    rto_ns: int
    last_ns: int | None
    min_ns: int | None
    max_ns: int | None


class RttEstimator:
    """Smoothed round trip and retransmission timeout (section 4.4; RFC 6298 section 2
    with gains 1/8 and 1/4, but ``2 * SRTT`` and bounds of 25 ms and 1 s).

    Integer arithmetic only, as firmware does it: the first sample R gives SRTT = R and
    RTTVAR = R / 2; each later one RTTVAR = (3 RTTVAR + |SRTT - R|) / 4, then
    SRTT = (7 SRTT + R) / 8 (floor divisions).
    """

    def __init__(self) -> None:
        self.samples = 0
        self.srtt_ns: int | None = None
        self.rttvar_ns: int | None = None
        self.last_ns: int | None = None
        self.min_ns: int | None = None
        self.max_ns: int | None = None

    def sample(self, rtt_ns: int) -> None:
        """Add one round trip: from a frame's only transmission to its ACK (Karn's rule is
        the caller's: never pass the round trip of a retransmitted frame)."""
        rtt_ns = max(0, rtt_ns)
        if self.srtt_ns is None or self.rttvar_ns is None:
            self.srtt_ns = rtt_ns
            self.rttvar_ns = rtt_ns // 2
        else:
            self.rttvar_ns = (3 * self.rttvar_ns + abs(self.srtt_ns - rtt_ns)) // 4
            self.srtt_ns = (7 * self.srtt_ns + rtt_ns) // 8
        self.samples += 1
        self.last_ns = rtt_ns
        self.min_ns = rtt_ns if self.min_ns is None else min(self.min_ns, rtt_ns)
        self.max_ns = rtt_ns if self.max_ns is None else max(self.max_ns, rtt_ns)

    @property
    def rto_ns(self) -> int:
        """The retransmission timeout now: 250 ms before any sample, else
        ``clamp(2 * SRTT + 4 * RTTVAR, 25 ms, 1 s)``."""
        if self.srtt_ns is None or self.rttvar_ns is None:
            return RTO_INITIAL_NS
        return min(RTO_MAX_NS, max(RTO_MIN_NS, 2 * self.srtt_ns + 4 * self.rttvar_ns))

    def stats(self) -> RttStats:
        """A snapshot of the estimate."""
        return RttStats(self.samples, self.srtt_ns, self.rttvar_ns, self.rto_ns,
                        self.last_ns, self.min_ns, self.max_ns)


# ---- the link -----------------------------------------------------------------------------


@dataclass
class _Outgoing:
    message: OutgoingMessage
    expires_ns: int | None = None  # a LEASE's end on the sender's clock, set by send()
    seq: int = 0
    last_sent_ns: int | None = None
    deadline_ns: int = 0
    retransmissions: int = 0
    due: bool = False  # retransmit at the next bytes_to_send


class McuLink:
    """One side of the MCU link, sans-I/O (see the module docstring for the protocol).

    ``role`` is ``"host"`` (the daemon; the link queues HELLO itself) or ``"mcu"`` (the
    microcontroller or its simulation). An MCU link given ``hello_reply`` answers every
    HELLO with it by itself; without one, its owner must :meth:`send` a HELLO_REPLY when
    :meth:`receive_bytes` returns a :class:`~tabletd.mcu.codec.Hello`.
    ``silence_timeout_ns`` (host only; ``None`` to disable) declares the link down when no
    good frame has come from the MCU for that long (the MCU sends STATUS every second), or
    when HELLO_REPLY has not come that long after the first call (section 5).

    Public state, read-only: :attr:`handshake_done`, :attr:`peer` (the HELLO_REPLY, host
    side), :attr:`down` and :attr:`down_reason`, :attr:`rtt`, :attr:`decoder` (its byte and
    CRC counters) and the counters ``sent``, ``retransmissions``, ``acked``,
    ``duplicates``, ``naks_sent``, ``naks_received``, ``rejected`` (frames refused with a
    NAK reason 2-4) and ``delivered``.
    """

    def __init__(self, role: Role = "host", *, hello_reply: HelloReply | None = None,
                 silence_timeout_ns: int | None = SILENCE_TIMEOUT_NS,
                 max_retransmissions: int = MAX_RETRANSMISSIONS) -> None:
        if role not in ("host", "mcu"):
            raise ValueError(f"role: must be 'host' or 'mcu', got {role!r}")
        if hello_reply is not None:
            if role != "mcu":
                raise ValueError("hello_reply: only an 'mcu' link answers HELLO")
            hello_reply.to_payload()  # raises McuEncodeError now rather than at the HELLO
        self.role: Role = role
        self.decoder = FrameDecoder()
        self._rtt = RttEstimator()
        self._hello_reply = hello_reply
        self._silence_ns = silence_timeout_ns if role == "host" else None
        self._max_retransmissions = max_retransmissions
        self._incoming: frozenset[MsgType] = (
            MCU_TO_HOST_TYPES if role == "host" else HOST_TO_MCU_TYPES)
        self._queue: deque[_Outgoing] = deque()
        self._outstanding: _Outgoing | None = None
        self._control: list[bytes] = []  # ACK and NAK frames not yet written
        self._next_seq = 0
        self._last_accepted: int | None = None
        self._nak_armed = True  # at most one NAK "bad CRC" between two good frames
        self._now: int | None = None
        self._first_now: int | None = None
        self._last_byte_ns: int | None = None
        self._last_frame_ns: int | None = None

        self.handshake_done = False
        self.peer: HelloReply | None = None
        self.down = False
        self.down_reason: str | None = None
        self.sent = 0
        self.retransmissions = 0
        self.acked = 0
        self.duplicates = 0
        self.naks_sent = 0
        self.naks_received = 0
        self.rejected = 0
        self.delivered = 0
        if role == "host":
            self._queue.append(_Outgoing(Hello()))

    # ---- the four calls -----------------------------------------------------------------

    def send(self, message: OutgoingMessage, now_ns: int) -> None:
        """Queue ``message`` for reliable delivery; write :meth:`bytes_to_send` next.

        A host link sends :class:`~tabletd.mcu.codec.Lease`, ``Cut``, ``Led``, ``PowerOff``
        and ``Ping`` (HELLO is its own); an MCU link ``HelloReply``, ``Status`` and
        ``Event``. A LEASE lasts at most until ``now_ns`` + its duration, however late it
        goes out (module docstring). Messages are delivered in order, except that a CUT
        overtakes what is queued and queued LEASEs and STATUSes are replaced.

        Raises :class:`McuLinkDownError` if the link is down, and
        :class:`~tabletd.mcu.codec.McuEncodeError` if the message is not one this role
        sends or a field is out of range (nothing is queued then).
        """
        if self.down:
            raise McuLinkDownError(f"MCU link is down: {self.down_reason}")
        allowed = _HOST_SENDS if self.role == "host" else _MCU_SENDS
        if not isinstance(message, allowed):
            raise McuEncodeError(
                f"message: a {self.role} link does not send {type(message).__name__}")
        message.to_payload()  # validate now: the caller's bug surfaces at its call
        self._observe(now_ns)
        self._enqueue(message, now_ns)

    def receive_bytes(self, data: bytes | bytearray | memoryview, now_ns: int) -> list[Message]:
        """Feed bytes read from the port at ``now_ns``; return the new messages they carry.

        Each reliable message from the peer is returned once, in the peer's order: ACK, NAK,
        duplicates and refused frames are answered here (write :meth:`bytes_to_send` next)
        and not returned. Never raises on any input. A host link returns the
        :class:`~tabletd.mcu.codec.HelloReply` too (and sets :attr:`peer`). After
        :attr:`down` becomes true, bytes are ignored and nothing is returned.
        """
        if self.down:
            return []
        self._observe(now_ns)
        if data:
            self._last_byte_ns = now_ns
        return self._handle(self.decoder.feed_events(data), now_ns)

    def tick(self, now_ns: int) -> list[Message]:
        """Run the timers due at ``now_ns``: retransmission, idle gap, silence.

        Call it at :meth:`next_timeout_ns` (or later, or more often: it is idempotent), after
        feeding every byte already read to :meth:`receive_bytes`, then write
        :meth:`bytes_to_send`. Returns messages completed by abandoning a stale incomplete
        frame (section 2.4): rare, but they are acknowledged, so the caller must handle them
        like those of :meth:`receive_bytes`. Check :attr:`down` afterwards.
        """
        if self.down:
            return []
        self._observe(now_ns)
        delivered: list[Message] = []
        if (self.decoder.partial and self._last_byte_ns is not None
                and now_ns - self._last_byte_ns >= IDLE_GAP_NS):
            delivered = self._handle(self.decoder.abandon_partial(), now_ns)
        out = self._outstanding
        if (not self.down and out is not None and out.last_sent_ns is not None
                and not out.due and now_ns >= out.deadline_ns):
            self._retransmit_or_down("no ACK")
        if not self.down and self._silence_ns is not None:
            reference = self._last_frame_ns if self._last_frame_ns is not None else (
                self._first_now if self._first_now is not None else now_ns)
            started = self._first_now if self._first_now is not None else now_ns
            if now_ns - reference >= self._silence_ns:
                self._go_down(f"no frame from the MCU for {self._silence_ns // MS} ms")
            elif not self.handshake_done and now_ns - started >= self._silence_ns:
                self._go_down(f"no HELLO_REPLY {self._silence_ns // MS} ms after the start")
        return delivered

    def bytes_to_send(self, now_ns: int | None = None) -> bytes:
        """The bytes to write to the port now, whole frames only (maybe ``b""``).

        Call it after every other call. The reliable frame in it, if any, is stamped as
        sent at ``now_ns``, or if omitted at the latest time given to any call: call it
        right away so that the round-trip samples are true. Returns ``b""`` once the link is
        down. Raises :class:`McuLinkTimeError` if no time was ever given.
        """
        if self.down:
            self._control.clear()
            return b""
        if now_ns is not None:
            self._observe(now_ns)
        now = self._now
        if now is None:
            raise McuLinkTimeError("bytes_to_send: no time given yet; pass now_ns")
        chunks = self._control
        self._control = []
        out = self._outstanding
        if out is None and self._queue and self._may_send(self._queue[0].message):
            out = self._queue.popleft()
            out.seq = self._next_seq
            self._next_seq = (self._next_seq + 1) % 256
            self._outstanding = out
        if out is not None and (out.last_sent_ns is None or out.due):
            chunks.append(self._transmit(out, now))
        return b"".join(chunks)

    def next_timeout_ns(self) -> int | None:
        """When to call :meth:`tick` next (a time on the caller's clock), or ``None`` if no
        timer runs. It may be in the past: call :meth:`tick` at once then."""
        if self.down:
            return None
        deadlines: list[int] = []
        out = self._outstanding
        if out is not None and out.last_sent_ns is not None and not out.due:
            deadlines.append(out.deadline_ns)
        if self.decoder.partial and self._last_byte_ns is not None:
            deadlines.append(self._last_byte_ns + IDLE_GAP_NS)
        if self._silence_ns is not None:
            reference = self._last_frame_ns if self._last_frame_ns is not None else (
                self._first_now)
            if reference is not None:
                deadlines.append(reference + self._silence_ns)
            if not self.handshake_done and self._first_now is not None:
                deadlines.append(self._first_now + self._silence_ns)
        return min(deadlines) if deadlines else None

    # ---- state the owner may read -------------------------------------------------------

    @property
    def rtt(self) -> RttStats:
        """The round-trip estimate and the current RTO."""
        return self._rtt.stats()

    @property
    def rto_ns(self) -> int:
        """The retransmission timeout the next transmission will use."""
        return self._rtt.rto_ns

    @property
    def idle(self) -> bool:
        """Whether nothing is queued, outstanding or waiting to be written."""
        return self._outstanding is None and not self._queue and not self._control

    def unsent_messages(self) -> list[OutgoingMessage]:
        """The messages not yet acknowledged, oldest first (outstanding, then queued), for
        an owner that carries them over to a new link after this one went down. A link's
        own HELLO is not among them."""
        pending = ([self._outstanding] if self._outstanding is not None else []) + list(
            self._queue)
        return [item.message for item in pending if not isinstance(item.message, Hello)]

    # ---- internals ----------------------------------------------------------------------

    def _observe(self, now_ns: int) -> None:
        self._now = now_ns
        if self._first_now is None:
            self._first_now = now_ns

    def _may_send(self, message: OutgoingMessage) -> bool:
        # Section 5: a host sends nothing but HELLO before HELLO_REPLY; an MCU sends nothing
        # before its first HELLO.
        return self.handshake_done or isinstance(message, Hello)

    def _enqueue(self, message: OutgoingMessage, now_ns: int) -> None:
        queue = self._queue
        if isinstance(message, Lease | Cut):
            # A later LEASE or CUT supersedes a LEASE not yet sent (section 7.2).
            for item in [item for item in queue if isinstance(item.message, Lease)]:
                queue.remove(item)
        if isinstance(message, Status | HelloReply):
            for item in [item for item in queue if type(item.message) is type(message)]:
                queue.remove(item)
        if isinstance(message, HelloReply):
            queue.appendleft(_Outgoing(message))  # the host waits for it (section 5)
            return
        if isinstance(message, Cut):
            if any(isinstance(item.message, Cut) for item in queue):
                return  # one queued CUT already ends the lease, and no LEASE is behind it
            # Head of the queue, behind the link's own HELLO (which must go first).
            position = 1 if queue and isinstance(queue[0].message, Hello) else 0
            queue.insert(position, _Outgoing(message))
            return
        expires = now_ns + message.duration_ms * MS if isinstance(message, Lease) else None
        queue.append(_Outgoing(message, expires_ns=expires))

    def _transmit(self, out: _Outgoing, now_ns: int) -> bytes:
        message: OutgoingMessage = out.message
        if isinstance(message, Lease) and out.expires_ns is not None:
            # Never past what the host asked, however late this transmission (section 7.2).
            left_ms = min(MAX_LEASE_MS, (out.expires_ns - now_ns) // MS)
            message = Lease(left_ms) if left_ms >= 1 else Cut()
        if out.last_sent_ns is not None:
            out.retransmissions += 1
            self.retransmissions += 1
        self.sent += 1
        out.last_sent_ns = now_ns
        # Exponential backoff per retransmission (RFC 6298 5.5), capped: a round trip that
        # grew past the RTO is waited out instead of taking the link down (Karn's rule gives
        # no sample from a retransmitted frame, so the estimate alone could never catch up).
        out.deadline_ns = now_ns + min(RTO_MAX_NS, self._rtt.rto_ns << out.retransmissions)
        out.due = False
        return encode_message(out.seq, message)

    def _retransmit_or_down(self, why: str) -> None:
        out = self._outstanding
        assert out is not None
        if out.retransmissions >= self._max_retransmissions:
            self._go_down(f"{why} after {out.retransmissions} retransmissions of "
                          f"{type(out.message).__name__} seq {out.seq}")
        else:
            out.due = True

    def _go_down(self, reason: str) -> None:
        self.down = True
        self.down_reason = reason
        self._control.clear()

    def _answer(self, message: Ack | Nak) -> None:
        if isinstance(message, Nak):
            self.naks_sent += 1
        self._control.append(encode_message(0, message))  # SEQ 0 in ACK and NAK (4.1)

    def _handle(self, events: list[Frame | CorruptFrame], now_ns: int) -> list[Message]:
        delivered: list[Message] = []
        for event in events:
            if self.down:
                break
            if isinstance(event, CorruptFrame):
                # One NAK per burst of damage, and only for what may be a peer's reliable
                # frame: a noise byte rarely carries a plausible TYPE (section 4.3).
                if self._nak_armed and event.type in self._incoming:
                    self._nak_armed = False
                    self._answer(Nak(event.seq, NakReason.BAD_CRC))
                continue
            self._nak_armed = True
            self._last_frame_ns = now_ns
            if event.type in (MsgType.ACK, MsgType.NAK):
                self._on_ack_or_nak(event, now_ns)
                continue
            message = self._accept(event)
            if message is not None:
                self.delivered += 1
                delivered.append(message)
        return delivered

    def _accept(self, frame: Frame) -> Message | None:
        """Answer one reliable frame from the peer; return its message if it is new."""
        if frame.type not in self._incoming:
            self.rejected += 1
            self._answer(Nak(frame.seq, NakReason.UNKNOWN_TYPE))
            return None
        is_hello = frame.type == MsgType.HELLO
        # A HELLO is acted on even when its SEQ repeats: it starts a host session, and
        # acting on it twice is harmless (section 5).
        if not is_hello and frame.seq == self._last_accepted:
            self.duplicates += 1
            self._answer(Ack(frame.seq))
            return None
        try:
            message = decode_message(frame)
        except McuProtocolError as exc:
            self.rejected += 1
            self._answer(Nak(frame.seq, exc.nak_reason))
            return None
        if self.role == "mcu" and not self.handshake_done and not is_hello:
            self.rejected += 1
            self._answer(Nak(frame.seq, NakReason.BUSY))
            return None
        self._answer(Ack(frame.seq))
        self._last_accepted = frame.seq
        if isinstance(message, Hello):
            self.handshake_done = True
            if self._hello_reply is not None:
                self._enqueue(self._hello_reply, self._now or 0)
        elif isinstance(message, HelloReply):
            if message.protocol != PROTOCOL_VERSION:
                self._go_down(f"MCU speaks protocol {message.protocol}, "
                              f"this host speaks {PROTOCOL_VERSION}")
            else:
                self.handshake_done = True
                self.peer = message
        return message

    def _on_ack_or_nak(self, frame: Frame, now_ns: int) -> None:
        try:
            message = decode_message(frame)
        except McuProtocolError:
            self.rejected += 1  # never answered: ACK and NAK are not acknowledged
            return
        if not isinstance(message, Ack | Nak):  # pragma: no cover - TYPE was checked
            return
        out = self._outstanding
        if out is None or out.last_sent_ns is None or message.seq != out.seq:
            return  # stale: for an earlier frame, or the SEQ of a damaged frame
        if isinstance(message, Ack):
            if out.retransmissions == 0:  # Karn's rule
                self._rtt.sample(now_ns - out.last_sent_ns)
            self.acked += 1
            self._outstanding = None
        else:
            self.naks_received += 1
            if not out.due:
                self._retransmit_or_down(f"NAK {message.reason.name}")
