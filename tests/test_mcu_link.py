"""The MCU link (``docs/mcu-protocol.md`` sections 2.4, 4, 5 and 7.2), sans-I/O.

Two :class:`McuLink` objects, a host and an MCU, are wired back to back through a simulated
115200-baud line that drops, duplicates and corrupts bytes by a seeded RNG, on a fake clock:
minutes of protocol run in milliseconds and nothing sleeps. Then each rule alone, driving one
link by hand with frames built by the codec: the handshake, ACK and duplicates, NAK, RTO
bounds and Karn's rule, the link going down, the idle gap, and the lease rules.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tabletd.errors import TabletdError
from tabletd.mcu.codec import (
    Ack,
    ChargingState,
    Cut,
    Event,
    EventKind,
    FrameDecoder,
    Hello,
    HelloReply,
    Lease,
    Led,
    McuEncodeError,
    Message,
    MsgType,
    Nak,
    NakReason,
    Ping,
    PowerOff,
    Status,
    decode_message,
    encode_frame,
    encode_message,
)
from tabletd.mcu.link import (
    IDLE_GAP_NS,
    MAX_RETRANSMISSIONS,
    RTO_INITIAL_NS,
    RTO_MAX_NS,
    RTO_MIN_NS,
    SILENCE_TIMEOUT_NS,
    McuLink,
    McuLinkDownError,
    McuLinkTimeError,
    Role,
    RttEstimator,
)

MS = 1_000_000
BYTE_NS = 86_806  # 10 bits at 115200 baud
T0 = 5_000_000_000_000  # a boot clock far from zero: no code may assume it starts at 0
REPLY = HelloReply(1, 0x0102, 2000)


# ---- a simulated line and a pair of links ----------------------------------------------------


class Line:
    """One direction of the UART: bytes leave at 115200 baud, arrive ``latency_ns`` after
    their last bit, some dropped, duplicated or corrupted by a seeded RNG."""

    def __init__(self, rng: random.Random, *, drop: float = 0.0, duplicate: float = 0.0,
                 corrupt: float = 0.0, latency_ns: int = 200_000) -> None:
        self.rng = rng
        self.drop, self.duplicate, self.corrupt = drop, duplicate, corrupt
        self.latency_ns = latency_ns
        self.free_at = 0
        self.in_flight: deque[tuple[int, bytes]] = deque()
        self.cut = False  # the cable is out: every byte is lost

    def put(self, data: bytes, now: int) -> None:
        start = max(now, self.free_at)
        self.free_at = start + len(data) * BYTE_NS
        if self.cut:
            return
        out = bytearray()
        for byte in data:
            if self.rng.random() < self.drop:
                continue
            value = byte ^ self.rng.randrange(1, 256) if self.rng.random() < self.corrupt \
                else byte
            out.append(value)
            if self.rng.random() < self.duplicate:
                out.append(value)
        if out:
            self.in_flight.append((self.free_at + self.latency_ns, bytes(out)))

    def next_arrival(self) -> int | None:
        return self.in_flight[0][0] if self.in_flight else None

    def take(self, now: int) -> bytes:
        out = bytearray()
        while self.in_flight and self.in_flight[0][0] <= now:
            out += self.in_flight.popleft()[1]
        return bytes(out)


class Pair:
    """A host link and an MCU link on a fake clock, joined by two :class:`Line` objects."""

    def __init__(self, seed: int = 0, *, max_retransmissions: int = MAX_RETRANSMISSIONS,
                 silence_timeout_ns: int | None = SILENCE_TIMEOUT_NS,
                 drop: float = 0.0, duplicate: float = 0.0, corrupt: float = 0.0) -> None:
        rng = random.Random(seed)
        self.now = T0
        self.host = McuLink("host", silence_timeout_ns=silence_timeout_ns,
                            max_retransmissions=max_retransmissions)
        self.mcu = McuLink("mcu", hello_reply=REPLY, max_retransmissions=max_retransmissions)
        self.to_mcu = Line(rng, drop=drop, duplicate=duplicate, corrupt=corrupt)
        self.to_host = Line(rng, drop=drop, duplicate=duplicate, corrupt=corrupt)
        self.host_got: list[Message] = []
        self.mcu_got: list[Message] = []
        self.pump()

    def pump(self) -> None:
        for link, line in ((self.host, self.to_mcu), (self.mcu, self.to_host)):
            data = link.bytes_to_send(self.now)
            if data:
                line.put(data, self.now)

    def step(self) -> bool:
        """Advance the clock to the next event and run it; False when nothing is left."""
        candidates = [t for t in (self.to_mcu.next_arrival(), self.to_host.next_arrival(),
                                  self.host.next_timeout_ns(), self.mcu.next_timeout_ns())
                      if t is not None]
        if not candidates:
            return False
        self.now = max(self.now, min(candidates))
        for link, line, received in ((self.mcu, self.to_mcu, self.mcu_got),
                                     (self.host, self.to_host, self.host_got)):
            data = line.take(self.now)
            if data:
                received.extend(link.receive_bytes(data, self.now))
        self.mcu_got += self.mcu.tick(self.now)
        self.host_got += self.host.tick(self.now)
        for link in (self.host, self.mcu):
            assert RTO_MIN_NS <= link.rto_ns <= RTO_MAX_NS
        self.pump()
        return True

    def run_until(self, done: Callable[[], bool], limit_ns: int = 600_000 * MS) -> None:
        while not done():
            assert self.now - T0 < limit_ns, "the links did not finish in time"
            assert not self.host.down, self.host.down_reason
            assert not self.mcu.down, self.mcu.down_reason
            if not self.step():
                break
        assert done()

    def send_host(self, message: Message) -> None:
        self.host.send(message, self.now)  # type: ignore[arg-type]
        self.pump()

    def send_mcu(self, message: Message) -> None:
        self.mcu.send(message, self.now)  # type: ignore[arg-type]
        self.pump()


def payloads(messages: list[Message], *, skip: tuple[type, ...]) -> list[Message]:
    return [m for m in messages if not isinstance(m, skip)]


# ---- end to end -----------------------------------------------------------------------------


def test_handshake_on_a_clean_line() -> None:
    pair = Pair()
    pair.run_until(lambda: pair.host.handshake_done)
    assert pair.mcu.handshake_done
    assert pair.host.peer == REPLY
    assert pair.mcu_got == [Hello()]
    assert pair.host_got == [REPLY]
    # HELLO, then HELLO_REPLY: one frame each way, acknowledged once, no retransmission.
    assert (pair.host.sent, pair.mcu.sent, pair.host.retransmissions) == (1, 1, 0)
    assert pair.host.rtt.samples == 1
    assert pair.host.rtt.last_ns is not None
    assert pair.host.rtt.last_ns < 3 * MS


@pytest.mark.parametrize("seed", range(8))
def test_lossy_line_delivers_every_message_once_in_order(seed: int) -> None:
    """Bytes dropped, duplicated and corrupted (about 1 byte in 170 damaged, so about one
    exchange in 12): every reliable message arrives exactly once, in order, and neither side
    exhausts its 5 retransmissions."""
    pair = Pair(seed, drop=0.002, duplicate=0.002, corrupt=0.002)
    host_sends: list[Message] = [
        Led(i % 256, i // 256, 7) if i % 3 else PowerOff(i) for i in range(150)]
    mcu_sends: list[Message] = [Event(EventKind.DOCKED, i % 256) for i in range(150)]
    for message in host_sends:
        pair.send_host(message)
    for message in mcu_sends:
        pair.send_mcu(message)
    pair.run_until(lambda: pair.host.idle and pair.mcu.idle and not pair.to_host.in_flight
                   and not pair.to_mcu.in_flight)
    assert payloads(pair.mcu_got, skip=(Hello,)) == host_sends
    assert payloads(pair.host_got, skip=(HelloReply,)) == mcu_sends
    faults = (pair.host.decoder.bad_crcs + pair.mcu.decoder.bad_crcs
              + pair.host.decoder.abandoned + pair.mcu.decoder.abandoned)
    assert faults > 0
    assert pair.host.retransmissions + pair.mcu.retransmissions > 0


@pytest.mark.parametrize("seed", range(4))
def test_heavy_loss_still_delivers_exactly_once_given_enough_retries(seed: int) -> None:
    """5 % of bytes damaged, three ways: with a retry budget the link never gives up, and
    still nothing is lost, doubled or reordered."""
    pair = Pair(seed, max_retransmissions=10_000, silence_timeout_ns=None,
                drop=0.02, duplicate=0.015, corrupt=0.015)
    host_sends: list[Message] = [Led(i, 255 - i, i // 2) for i in range(100)]
    mcu_sends: list[Message] = [
        Event(EventKind.UNDOCKED if i % 2 else EventKind.DOCKED, i) for i in range(100)]
    for message in host_sends:
        pair.send_host(message)
    for message in mcu_sends:
        pair.send_mcu(message)
    pair.run_until(lambda: pair.host.idle and pair.mcu.idle and not pair.to_host.in_flight
                   and not pair.to_mcu.in_flight)
    assert payloads(pair.mcu_got, skip=(Hello,)) == host_sends
    assert payloads(pair.host_got, skip=(HelloReply,)) == mcu_sends
    assert pair.host.duplicates + pair.mcu.duplicates > 0


def test_status_is_coalesced_events_are_not() -> None:
    pair = Pair()
    status = [Status(3900 - i, 80, ChargingState.NOT_CHARGING, False, 200, False, 0, False, 0)
              for i in range(5)]
    for s in status:
        pair.send_mcu(s)  # queued before the HELLO: only the newest remains
    pair.send_mcu(Event(EventKind.LID_OPENED))
    pair.send_mcu(Event(EventKind.LID_CLOSED))
    pair.run_until(lambda: pair.mcu.idle and not pair.to_host.in_flight)
    assert pair.host_got == [REPLY, status[-1], Event(EventKind.LID_OPENED),
                             Event(EventKind.LID_CLOSED)]


def test_an_unplugged_mcu_takes_the_host_link_down_and_nothing_is_sent_after() -> None:
    pair = Pair()
    pair.run_until(lambda: pair.host.handshake_done)
    pair.to_mcu.cut = pair.to_host.cut = True
    started = pair.now
    pair.send_host(Ping())
    while not pair.host.down:
        assert pair.step()
    # 1 transmission + 5 retransmissions, waiting RTO, 2 RTO, 4 RTO... from its floor.
    assert pair.host.retransmissions == MAX_RETRANSMISSIONS
    assert pair.now - started <= sum(
        min(RTO_MAX_NS, RTO_MIN_NS << k) for k in range(1 + MAX_RETRANSMISSIONS)) + MS
    assert "retransmissions" in (pair.host.down_reason or "")
    assert pair.host.next_timeout_ns() is None
    assert pair.host.bytes_to_send(pair.now) == b""
    assert pair.host.receive_bytes(encode_message(0, Ack(1)), pair.now) == []
    with pytest.raises(McuLinkDownError):
        pair.host.send(Ping(), pair.now)


# ---- one link by hand ------------------------------------------------------------------------


def frames_of(data: bytes) -> list[Message]:
    return [decode_message(frame) for frame in FrameDecoder().feed(data)]


def host_after_handshake(now: int = T0) -> McuLink:
    host = McuLink("host")
    assert frames_of(host.bytes_to_send(now)) == [Hello()]
    host.receive_bytes(encode_message(0, Ack(0)) + encode_message(0, REPLY), now + MS)
    assert host.handshake_done
    assert frames_of(host.bytes_to_send()) == [Ack(0)]
    return host


def test_the_host_sends_nothing_but_hello_before_hello_reply() -> None:
    host = McuLink("host")
    host.send(Ping(), T0)
    host.send(Led(1, 2, 3), T0)
    assert host.bytes_to_send() == bytes.fromhex("A5 01 00 10 01 E1 26")
    host.receive_bytes(encode_message(0, Ack(0)), T0 + MS)
    assert host.bytes_to_send() == b""  # HELLO acknowledged, but no HELLO_REPLY yet
    assert not host.handshake_done
    host.receive_bytes(encode_message(0, REPLY), T0 + 2 * MS)
    sent = frames_of(host.bytes_to_send())
    assert sent == [Ack(0), Ping()]


def test_a_protocol_version_mismatch_takes_the_link_down() -> None:
    host = McuLink("host")
    host.bytes_to_send(T0)
    host.receive_bytes(encode_message(0, Ack(0)) + encode_message(0, HelloReply(2, 1, 2000)),
                       T0 + MS)
    assert host.down
    assert "protocol 2" in (host.down_reason or "")
    assert not host.handshake_done


def test_no_hello_reply_or_silence_takes_the_host_link_down() -> None:
    host = McuLink("host", max_retransmissions=1000)
    host.bytes_to_send(T0)
    host.receive_bytes(encode_message(0, Ack(0)), T0 + MS)  # ACK, then nothing
    assert host.next_timeout_ns() == T0 + SILENCE_TIMEOUT_NS
    host.tick(T0 + SILENCE_TIMEOUT_NS - 1)
    assert not host.down
    host.tick(T0 + SILENCE_TIMEOUT_NS)
    assert host.down
    assert "HELLO_REPLY" in (host.down_reason or "")

    host = host_after_handshake()
    host.tick(T0 + MS + SILENCE_TIMEOUT_NS - 1)
    assert not host.down
    host.tick(T0 + MS + SILENCE_TIMEOUT_NS)
    assert host.down
    assert "no frame from the MCU" in (host.down_reason or "")


def test_duplicates_are_acknowledged_and_delivered_once() -> None:
    host = host_after_handshake()
    event = encode_message(1, Event(EventKind.DOCKED, 2))
    assert host.receive_bytes(event, T0 + 5 * MS) == [Event(EventKind.DOCKED, 2)]
    assert host.receive_bytes(event, T0 + 6 * MS) == []  # its ACK was lost: a retransmission
    assert frames_of(host.bytes_to_send()) == [Ack(1), Ack(1)]
    assert host.duplicates == 1
    # The next SEQ is new again, even with the same content.
    assert host.receive_bytes(encode_message(2, Event(EventKind.DOCKED, 2)), T0 + 7 * MS) == [
        Event(EventKind.DOCKED, 2)]


def test_refused_frames_are_nakked_with_their_reason_and_not_delivered() -> None:
    host = host_after_handshake()
    bad = (encode_frame(1, MsgType.STATUS, bytes(11))  # wrong size
           + encode_message(2, Lease(10))  # a host-to-MCU type, from the MCU
           + encode_frame(3, 0x99, b""))  # unknown
    assert host.receive_bytes(bad, T0 + 5 * MS) == []
    assert frames_of(host.bytes_to_send()) == [
        Nak(1, NakReason.BAD_PAYLOAD), Nak(2, NakReason.UNKNOWN_TYPE),
        Nak(3, NakReason.UNKNOWN_TYPE)]
    assert host.rejected == 3
    # A refused SEQ is not recorded as accepted: a good frame with it is new.
    assert host.receive_bytes(encode_message(1, Event(EventKind.POWER_BUTTON)), T0 + 6 * MS) \
        == [Event(EventKind.POWER_BUTTON)]


def test_the_mcu_refuses_everything_but_hello_until_its_first_hello() -> None:
    mcu = McuLink("mcu")
    assert mcu.receive_bytes(encode_message(4, Lease(1000)), T0) == []
    assert frames_of(mcu.bytes_to_send()) == [Nak(4, NakReason.BUSY)]
    mcu.send(Event(EventKind.DOCKED, 1), T0)
    assert mcu.bytes_to_send() == b""  # nothing before a HELLO
    assert mcu.receive_bytes(encode_message(0, Hello()), T0 + MS) == [Hello()]
    assert mcu.handshake_done
    assert frames_of(mcu.bytes_to_send()) == [Ack(0), Event(EventKind.DOCKED, 1)]
    # Without a hello_reply, the owner answers; a HELLO repeating the SEQ is acted on again.
    assert mcu.receive_bytes(encode_message(0, Hello()), T0 + 2 * MS) == [Hello()]
    assert frames_of(mcu.bytes_to_send()) == [Ack(0)]
    assert mcu.receive_bytes(encode_message(0, Hello()), T0 + 3 * MS) == [Hello()]


def test_an_mcu_link_with_hello_reply_answers_each_hello() -> None:
    mcu = McuLink("mcu", hello_reply=REPLY)
    mcu.receive_bytes(encode_message(0, Hello()), T0)
    assert frames_of(mcu.bytes_to_send()) == [Ack(0), REPLY]


def test_a_nak_triggers_an_immediate_retransmission_and_counts() -> None:
    host = host_after_handshake()
    host.send(Ping(), T0 + 10 * MS)
    assert frames_of(host.bytes_to_send()) == [Ping()]
    host.receive_bytes(encode_message(0, Nak(7, NakReason.BAD_CRC)), T0 + 11 * MS)
    assert host.bytes_to_send() == b""  # a NAK for another SEQ is stale
    for attempt in range(1, MAX_RETRANSMISSIONS + 1):
        host.receive_bytes(encode_message(0, Nak(1, NakReason.BUSY)), T0 + (11 + attempt) * MS)
        assert frames_of(host.bytes_to_send()) == [Ping()]
        assert host.retransmissions == attempt
    host.receive_bytes(encode_message(0, Nak(1, NakReason.BUSY)), T0 + 20 * MS)
    assert host.down
    assert "NAK BUSY" in (host.down_reason or "")


def test_a_damaged_frame_is_nakked_once_per_burst() -> None:
    host = host_after_handshake()
    damaged = bytearray(encode_message(1, Event(EventKind.LID_OPENED)))
    damaged[-1] ^= 0xFF
    host.receive_bytes(bytes(damaged) * 3, T0 + 5 * MS)
    assert frames_of(host.bytes_to_send()) == [Nak(1, NakReason.BAD_CRC)]
    assert host.decoder.bad_crcs == 3
    host.receive_bytes(encode_message(1, Event(EventKind.LID_OPENED)) + bytes(damaged),
                       T0 + 6 * MS)
    assert frames_of(host.bytes_to_send()) == [Ack(1), Nak(1, NakReason.BAD_CRC)]
    # Damage to a frame of a type the MCU does not send (noise, most likely) is not NAKed.
    noise = bytearray(encode_frame(9, 0x42, b"\x00"))
    noise[-1] ^= 1
    host.receive_bytes(encode_message(2, Ping()) + bytes(noise), T0 + 7 * MS)
    assert frames_of(host.bytes_to_send()) == [Nak(2, NakReason.UNKNOWN_TYPE)]


def test_an_incomplete_frame_is_abandoned_after_the_idle_gap() -> None:
    """A noise sync with a plausible length holds the real frame behind it; 20 ms of silence
    gives it up, and the real frame is delivered by tick (section 2.4)."""
    host = host_after_handshake()
    now = T0 + 10 * MS
    real = encode_message(1, Event(EventKind.UNDOCKED, 5))
    assert host.receive_bytes(b"\xa5\x3f" + real, now) == []
    assert host.next_timeout_ns() == now + IDLE_GAP_NS
    assert host.tick(now + IDLE_GAP_NS - 1) == []
    assert host.tick(now + IDLE_GAP_NS) == [Event(EventKind.UNDOCKED, 5)]
    assert frames_of(host.bytes_to_send()) == [Ack(1)]
    assert host.decoder.abandoned == 1


# ---- RTO and Karn's rule ----------------------------------------------------------------------


def test_rto_formula_and_bounds() -> None:
    rtt = RttEstimator()
    assert rtt.rto_ns == RTO_INITIAL_NS == 250 * MS
    rtt.sample(100 * MS)  # SRTT 100, RTTVAR 50: 2*100 + 4*50 = 400 ms
    assert (rtt.srtt_ns, rtt.rttvar_ns, rtt.rto_ns) == (100 * MS, 50 * MS, 400 * MS)
    rtt.sample(20 * MS)  # RTTVAR (150 + 80)/4 = 57.5, SRTT (700 + 20)/8 = 90
    assert (rtt.srtt_ns, rtt.rttvar_ns) == (90 * MS, 57_500_000)
    assert rtt.rto_ns == 410 * MS
    fast = RttEstimator()
    fast.sample(1 * MS)
    assert fast.rto_ns == RTO_MIN_NS == 25 * MS
    slow = RttEstimator()
    slow.sample(900 * MS)
    assert slow.rto_ns == RTO_MAX_NS == 1000 * MS
    stats = slow.stats()
    assert (stats.samples, stats.min_ns, stats.max_ns, stats.last_ns) == (
        1, 900 * MS, 900 * MS, 900 * MS)


@given(st.lists(st.integers(0, 10_000 * MS), max_size=50))
def test_rto_stays_within_25_ms_and_1_s(samples: list[int]) -> None:
    rtt = RttEstimator()
    for sample in samples:
        rtt.sample(sample)
        assert RTO_MIN_NS <= rtt.rto_ns <= RTO_MAX_NS


def test_karns_rule_no_sample_from_a_retransmitted_frame() -> None:
    host = host_after_handshake()  # one sample: 1 ms
    assert host.rtt.samples == 1
    start = T0 + 10 * MS
    host.send(Ping(), start)
    host.bytes_to_send()
    deadline = host.next_timeout_ns()
    assert deadline == start + host.rto_ns == start + RTO_MIN_NS
    host.tick(deadline)
    assert frames_of(host.bytes_to_send()) == [Ping()]  # the retransmission
    # The ACK of the first transmission arrives late: which one it answers is unknown.
    host.receive_bytes(encode_message(0, Ack(1)), deadline + 2 * MS)
    assert host.idle
    assert host.rtt.samples == 1
    assert host.acked == 2
    # A clean exchange gives a sample again, with its exact round trip.
    host.send(Ping(), T0 + 100 * MS)
    host.bytes_to_send()
    host.receive_bytes(encode_message(0, Ack(2)), T0 + 103 * MS)
    assert host.rtt.samples == 2
    assert host.rtt.last_ns == 3 * MS


def test_down_after_five_retransmissions_on_rto() -> None:
    host = McuLink("host", silence_timeout_ns=None)
    transmissions = 0
    now = T0
    host.bytes_to_send(now)
    transmissions += 1
    waited = []
    while True:
        deadline = host.next_timeout_ns()
        if deadline is None:
            break
        # doubled with each retransmission of the frame, capped at 1 s (RFC 6298 5.5)
        assert deadline - now == min(RTO_MAX_NS, RTO_INITIAL_NS << (transmissions - 1))
        waited.append(deadline - now)
        now = deadline
        host.tick(now)
        if host.down:
            break
        assert frames_of(host.bytes_to_send()) == [Hello()]
        transmissions += 1
    assert host.down
    assert transmissions == 1 + MAX_RETRANSMISSIONS
    assert now - T0 == sum(waited) == sum(
        min(RTO_MAX_NS, RTO_INITIAL_NS << k) for k in range(1 + MAX_RETRANSMISSIONS))


# ---- the lease rules of section 7.2 -----------------------------------------------------------


def test_a_lease_never_outlives_its_sending_time_plus_duration() -> None:
    host = host_after_handshake()
    asked_at = T0 + 10 * MS
    host.send(Lease(1000), asked_at)
    assert frames_of(host.bytes_to_send()) == [Lease(1000)]
    # Lost: retransmitted one RTO later, with the time it has left.
    host.tick(asked_at + RTO_MIN_NS)
    data = host.bytes_to_send()
    assert frames_of(data) == [Lease(1000 - 25)]
    assert data[2] == 1  # the same SEQ
    host.receive_bytes(encode_message(0, Ack(1)), asked_at + 30 * MS)
    # A lease that waited in the queue is shortened by the wait.
    host.send(Ping(), asked_at + 40 * MS)
    host.bytes_to_send()
    host.send(Lease(300), asked_at + 40 * MS)
    host.receive_bytes(encode_message(0, Ack(2)), asked_at + 140 * MS)
    assert frames_of(host.bytes_to_send()) == [Lease(200)]
    # Nothing left by the time it can go: it goes as a CUT.
    host.tick(asked_at + 140 * MS + RTO_MIN_NS)
    host.tick(asked_at + 400 * MS)
    assert frames_of(host.bytes_to_send()) == [Cut()]


def test_cut_overtakes_the_queue_and_replaces_queued_leases() -> None:
    host = host_after_handshake()
    now = T0 + 10 * MS
    host.send(Ping(), now)  # outstanding from here on
    assert frames_of(host.bytes_to_send()) == [Ping()]
    host.send(Lease(500), now)
    host.send(Led(1, 1, 1), now)
    host.send(Lease(900), now)  # replaces the queued 500
    host.send(Cut(), now)  # jumps ahead, drops the queued lease
    host.send(Cut(), now)  # one queued CUT is enough
    host.send(Lease(800), now)
    sent: list[Message] = []
    seq = 1
    for step in range(1, 10):
        host.receive_bytes(encode_message(0, Ack(seq)), now + step * MS)
        out = frames_of(host.bytes_to_send())
        if not out:
            break
        sent += out
        seq += 1
    assert sent == [Cut(), Led(1, 1, 1), Lease(800 - 3)]


def test_sending_is_checked() -> None:
    host = McuLink("host")
    with pytest.raises(McuEncodeError, match="host link does not send Status"):
        host.send(Status(1, 1, ChargingState.FULL, False, 0, False, 0, False, 0), T0)
    with pytest.raises(McuEncodeError, match="host link does not send Hello"):
        host.send(Hello(), T0)
    with pytest.raises(McuEncodeError, match=r"lease\.duration_ms"):
        host.send(Lease(2001), T0)
    mcu = McuLink("mcu")
    with pytest.raises(McuEncodeError, match="mcu link does not send Ping"):
        mcu.send(Ping(), T0)
    with pytest.raises(McuLinkTimeError):
        McuLink("host").bytes_to_send()
    with pytest.raises(ValueError, match="hello_reply"):
        McuLink("host", hello_reply=REPLY)
    assert issubclass(McuLinkDownError, TabletdError)
    assert issubclass(McuLinkDownError, ConnectionError)


def test_unsent_messages_can_be_carried_to_a_new_link() -> None:
    mcu = McuLink("mcu")
    mcu.receive_bytes(encode_message(0, Hello()), T0)
    for bay in (1, 2, 3):
        mcu.send(Event(EventKind.DOCKED, bay), T0)
    mcu.bytes_to_send()
    assert mcu.unsent_messages() == [Event(EventKind.DOCKED, b) for b in (1, 2, 3)]
    assert McuLink("host").unsent_messages() == []


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_any_bytes_are_absorbed_by_either_link(first: bytes, second: bytes) -> None:
    roles: tuple[Role, ...] = ("host", "mcu")
    for role in roles:
        link = McuLink(role)
        link.receive_bytes(first, T0)
        link.tick(T0 + 30 * MS)
        link.receive_bytes(second, T0 + 31 * MS)
        link.bytes_to_send()
        link.tick(T0 + 60 * MS)
