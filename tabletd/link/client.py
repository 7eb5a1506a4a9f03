"""The tablet's end of the central link (``docs/protocol.md``), on websockets' asyncio API.

One connection at a time, forever: connect (mutual TLS, pinned CA, subprotocol
``tabletd.v1``), ``hello`` / ``welcome`` (which also gives the clock mapping), then two
tasks under one TaskGroup: the sender drains the durable outbox in ``seq`` order with at most
``window`` events unacknowledged, the receiver hands server messages to the host (the
daemon). Any failure closes the connection; the next attempt waits a full-jitter backoff.

Nothing received can crash a task: every frame is decoded by the strict codec, and whatever
fails validation is answered with an ``error`` and reported to the host as an event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
import socket
import ssl
import time
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.typing import Subprotocol

from tabletd.clock import Clock
from tabletd.config import LinkConfig
from tabletd.errors import TabletdError
from tabletd.events import EventStore, StoredEvent
from tabletd.link.backoff import Backoff
from tabletd.link.grants import ClockMapping
from tabletd.link.messages import (
    MAX_RETRY_AFTER_S,
    Ack,
    EncodeError,
    ErrorMsg,
    EventMsg,
    Hello,
    ProtocolError,
    ServerMessage,
    Welcome,
    decode_server_message,
    encode,
    error_for,
)
from tabletd.media.frames import MAX_BINARY_FRAME, MediaFrame, decode_frame, encode_frame
from tabletd.media.uplink import UplinkQueue

log = logging.getLogger(__name__)

SUBPROTOCOL = Subprotocol("tabletd.v1")
WELCOME_TIMEOUT_S = 10.0
# Bytes that may wait below the uplink queue (websockets' buffer, then the kernel's). Kept
# small so that a slow link pushes back on the queue, which drops to a keyframe, instead of
# megabytes of media piling up in socket buffers as seconds of delay (protocol 6.3).
WRITE_LIMIT = 16_384
SEND_BUFFER = 32_768
_RETRY_AFTER = re.compile(r"retry_after=(\d+)", re.ASCII)


class LinkSetupError(TabletdError, ValueError):
    """The link's own files (CA, certificate, key) are missing or unusable."""


class LinkHost(Protocol):
    """What the link needs from the daemon. Every method runs on the loop."""

    def hello(self) -> Hello:
        """The ``hello`` for a new connection (session summary, outbox position)."""
        ...

    def link_changed(self, up: bool, mapping: ClockMapping | None) -> None:
        """The link came up (``welcome`` received, with its clock mapping) or went down."""
        ...

    def on_server_message(self, msg: ServerMessage) -> ErrorMsg | None:
        """A valid grant/start/end/lock/unlock; returns an ``error`` to send back, if any."""
        ...

    def on_protocol_error(self, exc: ProtocolError) -> None:
        """An invalid frame from the server (to be recorded as an event)."""
        ...

    def media_allowed(self) -> bool:
        """True only while a call is live with the rail on (invariant 7): checked again
        for every uplink frame, just before it is sent."""
        ...

    def on_media(self, frame: MediaFrame) -> None:
        """A downlink frame (the relative's media); the host drops it unless live."""
        ...


def link_ssl_context(cfg: LinkConfig) -> ssl.SSLContext | None:
    """The link's TLS: the pinned CA only, this device's certificate and key (protocol
    section 1); None for ``ws://``, allowed only with ``insecure_dev``. Raises
    :class:`LinkSetupError` naming the files when they are unusable."""
    if cfg.url.startswith("ws://"):
        if not cfg.insecure_dev:
            raise LinkSetupError("ws:// refused: [link] insecure_dev is not set")
        return None
    try:
        # cafile given: only that CA is trusted, never the system store (pinning).
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise LinkSetupError(
            f"link TLS files (ca {cfg.ca_file}, cert {cfg.cert_file}, key "
            f"{cfg.key_file}): {exc}") from exc
    return ctx


def _bound_send_buffer(ws: ClientConnection) -> None:
    sock = ws.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


class _Closed(Exception):
    """The receiver saw the connection end: tears the connection's TaskGroup down."""


def _encode_event(ev: StoredEvent) -> str:
    """The event's frame. One that breaks the protocol's bounds still goes out, with its
    fields replaced by the reason, so that it is delivered and acknowledged, not stuck at the
    head of the outbox forever (invariant 6: nothing silently dropped)."""
    msg = EventMsg(id=ev.id, seq=ev.seq, kind=ev.kind, session_id=ev.session_id,
                   boot_id=ev.boot_id, boot_ns=ev.boot_ns, wall_time=ev.wall_time,
                   fields=dict(ev.fields))
    try:
        return encode(msg)
    except EncodeError as exc:
        log.error("event %s does not fit the protocol: %s", ev.id, exc,
                  extra={"EVENT": "event_unencodable", "EVENT_ID": ev.id})
        return encode(dataclasses.replace(
            msg, session_id=None, fields={"unencodable": str(exc)[:200]}))


class LinkClient:
    """Run with :meth:`run` (forever); call :meth:`outbox_changed` after each new event."""

    def __init__(self, cfg: LinkConfig, host: LinkHost, store: EventStore, clock: Clock, *,
                 uplink: UplinkQueue | None = None, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.host = host
        self.store = store
        self.clock = clock
        self.backoff = Backoff(cfg.backoff_base_s, cfg.backoff_cap_s, rng or random.Random())  # noqa: S311 (jitter, not secrets)
        self.connected = False
        self.mapping: ClockMapping | None = None
        self.attempts = 0
        self.sessions = 0  # connections that reached ``welcome``
        self.events_sent = 0
        self.events_acked = 0
        self._wake = asyncio.Event()
        self._inflight: set[str] = set()
        # The uplink media queue, in memory only (invariant 7), bounded (protocol 6.3).
        self.uplink = uplink if uplink is not None else UplinkQueue(max_bytes=524_288)
        self._media_wake = asyncio.Event()
        self.media_sent = 0
        self.media_received = 0
        self._media_errors_at = 0.0
        self._welcomed = False
        self._retry_after: float | None = None

    def _note_retry_after(self, exc: BaseException | None) -> None:
        """A ``retry_after=N`` in the server's close reason is waited before the next
        jittered delay."""
        if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
            m = _RETRY_AFTER.search(exc.rcvd.reason)
            if m:
                hint = float(min(int(m.group(1)), MAX_RETRY_AFTER_S))  # section 1: 0-3600
                self._retry_after = max(self._retry_after or 0.0, hint)

    def outbox_changed(self) -> None:
        self._wake.set()

    def push_media(self, frame: MediaFrame) -> None:
        """Queue an uplink frame (on the loop); the sender drains the queue while connected."""
        self.uplink.push(frame, self.clock.boot_ns() // 1000)
        self._media_wake.set()

    # ---- the reconnect loop ------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self.attempts += 1
            self._retry_after = None
            self._welcomed = False
            try:
                await self._connection()
            except* _Closed as group:
                self._note_retry_after(group.exceptions[0].__cause__)
            except* (OSError, TimeoutError, WebSocketException, ProtocolError,
                     LinkSetupError) as group:
                exc = group.exceptions[0]
                self._note_retry_after(exc)
                log.warning("link: %s: %s", type(exc).__name__, exc,
                            extra={"EVENT": "link_failed"})
            retry_after = self._retry_after
            if self._welcomed:
                self.backoff.reset()
            delay = self.backoff.next_delay(retry_after)
            log.info("link: next attempt in %.2f s", delay, extra={"EVENT": "link_backoff"})
            await asyncio.sleep(delay)

    # ---- one connection ------------------------------------------------------------------

    async def _connection(self) -> None:
        """One connection; always ends by raising (``_Closed`` once it was established)."""
        cfg = self.cfg
        tls = link_ssl_context(cfg)
        if tls is None:
            log.warning("link: INSECURE ws:// connection to %s ([link] insecure_dev = true; "
                        "development only)", cfg.url, extra={"EVENT": "link_insecure"})
        async with connect(
            cfg.url, ssl=tls, subprotocols=[SUBPROTOCOL],
            ping_interval=cfg.ping_interval_s, ping_timeout=cfg.ping_timeout_s,
            max_size=MAX_BINARY_FRAME, open_timeout=10, close_timeout=2,
            write_limit=WRITE_LIMIT,
            # Never through a proxy from the environment: the tablet talks to its server
            # directly, and an HTTPS_PROXY slipped into the unit must not reroute the link.
            proxy=None,
        ) as ws:
            _bound_send_buffer(ws)
            if ws.subprotocol != SUBPROTOCOL:
                raise ProtocolError("bad_message", f"server chose subprotocol {ws.subprotocol!r}")
            t0 = self.clock.boot_ns()
            await ws.send(encode(self.host.hello()))
            async with asyncio.timeout(WELCOME_TIMEOUT_S):
                first = await ws.recv()
            t1 = self.clock.boot_ns()
            welcome = decode_server_message(first)
            if not isinstance(welcome, Welcome):
                raise ProtocolError("bad_message",
                                    f"expected welcome, got {type(welcome).__name__}")
            self.mapping = ClockMapping.from_exchange(t0, t1, welcome.server_time_ms,
                                                      cfg.max_rtt_ms)
            if self.mapping is None:
                log.warning("link: round trip %.1f ms > %d ms: no clock mapping, no grants",
                            (t1 - t0) / 1e6, cfg.max_rtt_ms, extra={"EVENT": "link_no_clock"})
            self._welcomed = True
            if welcome.retry_after_s is not None:
                self._retry_after = float(welcome.retry_after_s)
            self.sessions += 1
            self.connected = True
            self._inflight.clear()
            log.info("link: connected to %s", cfg.url, extra={"EVENT": "link_up"})
            self.host.link_changed(True, self.mapping)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._send_events(ws), name="link-send")
                    tg.create_task(self._send_media(ws), name="link-media")
                    tg.create_task(self._receive(ws), name="link-receive")
            finally:
                self.connected = False
                self.host.link_changed(False, None)
                log.info("link: disconnected", extra={"EVENT": "link_down"})

    async def _send_events(self, ws: ClientConnection) -> None:
        """At least once, in order: everything pending is (re)sent on each connection."""
        last_seq: int | None = None
        while True:
            self._wake.clear()
            room = self.cfg.window - len(self._inflight)
            batch: list[StoredEvent] = []
            if room > 0:
                batch = self.store.pending(room, after_seq=last_seq)
            for ev in batch:
                await ws.send(_encode_event(ev))
                self._inflight.add(ev.id)
                last_seq = ev.seq
                self.events_sent += 1
            if not batch:
                await self._wake.wait()

    async def _send_media(self, ws: ClientConnection) -> None:
        """A slow link blocks in ``send``; meanwhile the queue drops by its policy, so the
        delay never grows past 2 s (protocol 6.3)."""
        while True:
            self._media_wake.clear()
            frame = self.uplink.pop()
            if frame is None:
                await self._media_wake.wait()
                continue
            if not self.host.media_allowed():
                continue  # the call ended between queueing and sending: never sent
            await ws.send(encode_frame(frame))
            self.media_sent += 1

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                reply = self._handle_frame(data)
                if reply is not None:
                    await ws.send(encode(reply))
        except ConnectionClosed as exc:
            raise _Closed from exc
        raise _Closed from ws.close_exc

    def _handle_frame(self, data: str | bytes) -> ErrorMsg | None:
        if isinstance(data, bytes):
            return self._handle_media(data)
        try:
            msg = decode_server_message(data)
        except ProtocolError as exc:
            self.host.on_protocol_error(exc)
            return error_for(exc)
        if isinstance(msg, Ack):
            acked = self.store.ack(msg.ids)
            self.events_acked += acked
            self._inflight.difference_update(msg.ids)
            self._wake.set()
            return None
        if isinstance(msg, ErrorMsg):
            log.warning("link: server error %s: %s", msg.code, msg.detail,
                        extra={"EVENT": "link_server_error"})
            return None
        if isinstance(msg, Welcome):
            err = ProtocolError("bad_message", "welcome already received")
            self.host.on_protocol_error(err)
            return error_for(err)
        return self.host.on_server_message(msg)

    def _handle_media(self, data: bytes) -> ErrorMsg | None:
        try:
            frame = decode_frame(data)
        except ProtocolError as exc:
            # A broken media stream would flood the outbox and the server: one error (and
            # one event) per second at most (protocol 6.1).
            now = time.monotonic()
            if now - self._media_errors_at < 1.0:
                return None
            self._media_errors_at = now
            self.host.on_protocol_error(exc)
            return error_for(exc)
        self.media_received += 1
        self.host.on_media(frame)
        return None

