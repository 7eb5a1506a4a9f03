"""REFERENCE SERVER — development and tests only, never installed on a tablet.

The server side of ``docs/protocol.md`` version 1, over ``websockets``' asyncio API.

Theory of operation
-------------------
:class:`DevServer` listens with TLS that requires a client certificate chaining to the
development CA (``ssl.CERT_REQUIRED``, protocol section 1) and selects the subprotocol
``tabletd.v1`` (a client offering anything else is refused with HTTP 400 by websockets).
The device id is the client certificate's CN.

Each connection: the first message must be a ``hello`` whose ``device_id`` equals the CN of
a registered device, else the server answers ``error`` (``refused`` or ``bad_message``) and
closes with 1008. Otherwise it answers ``welcome`` carrying ``server_time_ms`` read while
answering (section 2). From then on every text frame is decoded with the strict codec
(:func:`tabletd.link.messages.decode_device_message`); an invalid one is answered with
``error`` and the connection stays up (section 3). Events are queued to a per-connection
writer that commits them in batches (one durable SQLite transaction per batch, duplicates
counted, not stored again) and only then sends one ``ack`` for the batch (section 3.3).

One scheduler task wakes every ``tick_s`` (50 ms), reads the store (the CLI books and queues
commands from another process) and, for each connected device: signs and sends the
``grant`` of a booking when due (:mod:`.policy`), re-sends a stored grant byte-identical on a
new connection unless the tablet's hello shows it already holds that session, sends
``start`` at the booked start, and sends queued ``end``/``lock``/``unlock`` commands.

``clock_offset_ms`` skews the server clock (every ``_ms`` time it sends or stores) to test
tablets against a server an hour ahead or behind.

Media (section 6, :mod:`.media`): binary frames are decoded with
:func:`tabletd.media.frames.decode_frame`; an invalid one is counted and answered with
``error`` ``bad_message`` at most once per second per connection, and the connection stays.
A session is live on the server from the ``start`` it sends or the tablet's
``call_started`` (whichever first) to the tablet's ``call_ended`` or the booking's start +
duration + 50 ms. While it is live, its uplink is recorded, without re-encoding, into
``DIR/recordings/<session_id>.ts`` (:mod:`.recorder`), and with ``downlink=True`` a
synthetic "family" stream is sent to the tablet (:mod:`.downlink`). Frames arriving outside
the window are counted against the device's last session, never recorded.

Stopping (section 1): :meth:`DevServer.stop` stops accepting, then closes every welcomed
connection with ``retry_after=N`` in its reason, N spread at ``readmit_per_s`` (100) tablets a
second, live calls first (:meth:`DevServer.readmission_hints`); 1012 and N from
``restart_in_s`` for a restart, else 1001 and N from 0. :meth:`DevServer.abort` drops every
connection with no close frame instead, as a crash would.

Enrolment (section 7): with ``enrol_port`` set, a second listener takes enrolments over
TLS that authenticates the server only (the tablet has no certificate yet), subprotocol
``tabletd.enrol.v1`` (websockets refuses a client that does not offer it: HTTP 400). One
``enrol`` message per connection: the CSR must be signed by its key and name the device
(CN); the certificate is signed first, then the one-time token is consumed (bound to the
device, unexpired, unused: :meth:`Store.consume_token`), and only then is the certificate
sent. Anything refused is answered ``error`` with the section's code and closed with 1008.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tabletd.devserver import DevServerError, ca, policy
from tabletd.devserver.downlink import EncodedLoop, encode_loop, send_downlink
from tabletd.devserver.media import SessionMedia
from tabletd.devserver.store import (
    Booking,
    Command,
    EnrolRefused,
    EventRecord,
    Store,
    StoredEvent,
    TabletError,
)
from tabletd.link import messages
from tabletd.link.grants import sign_grant
from tabletd.link.messages import (
    Ack,
    DeviceMessage,
    End,
    ErrorMsg,
    EventMsg,
    GrantMsg,
    Hello,
    Lock,
    ProtocolError,
    Start,
    Unlock,
    Welcome,
    decode_device_message,
    encode,
    error_for,
)
from tabletd.media.frames import MAX_BINARY_FRAME, decode_frame
from tabletd.provision import (
    ENROL_MAX_MESSAGE,
    ENROL_SUBPROTOCOL,
    EnrolMessageError,
    EnrolRequest,
    decode_request,
    encode_enrol_error,
    encode_enrolled,
)

log = logging.getLogger("tabletd.devserver")

SUBPROTOCOL = Subprotocol(messages.SUBPROTOCOL)
MAX_FRAME = messages.MAX_MESSAGE_BYTES  # section 1: larger text frames close with 1009
MAX_MEDIA_FRAME = MAX_BINARY_FRAME  # section 6.1: larger binary frames close with 1009
CLOSE_TOO_BIG = 1009
MEDIA_ERROR_INTERVAL_NS = 1_000_000_000  # section 6.1: at most one `error` per second
RECORDINGS = "recordings"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
HELLO_TIMEOUT_S = 10.0
MAX_ACK_IDS = messages.MAX_ACK_IDS  # section 3.2: an ack carries 1 to 1000 ids
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001  # section 1: the server stops
CLOSE_RESTART = 1012  # section 1: the server restarts (RFC 6455 registry: service restart)
READMIT_PER_S = 100.0  # section 1: tablets told to come back per second when stopping
MAX_RETRY_AFTER_S = messages.MAX_RETRY_AFTER_S  # section 1: retry_after=N, N in 0..3600


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(eq=False)
class _Connection:
    """One welcomed tablet connection and what was sent on it."""

    device_id: str
    ws: ServerConnection
    session_id: str | None  # the tablet's current session, from its hello
    session_state: str | None
    grants_sent: set[str] = field(default_factory=set)
    starts_sent: set[str] = field(default_factory=set)
    pending: list[EventRecord] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    media_error_ns: int | None = None  # when the last media `error` was sent (monotonic)


class DevServer:
    """The reference central server on ``host:port`` for the server directory ``directory``
    (made by ``tabletd-devserver init``; see :mod:`tabletd.devserver`).

    Use ``await start()`` / ``await stop()`` or ``async with``. :attr:`port` is the bound
    port (useful with ``port=0``). The test verbs (:meth:`book`, :meth:`end`, :meth:`lock`,
    :meth:`unlock`) write to the store exactly as the CLI does; the scheduler delivers.
    Raises :class:`DevServerError` from :meth:`start` if the directory's CA, keys or store
    are unusable.

    ``record`` (default on) records each live session's uplink (:meth:`recording_path`,
    :meth:`media`, :meth:`frames_after_deadline`); ``downlink`` (default off, so that a
    client reading only text frames is not disturbed) sends the synthetic family stream
    while a session is live.
    """

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 0,
                 clock_offset_ms: int = 0, *, tick_s: float = 0.05,
                 wall_ms: Callable[[], int] = wall_clock_ms, downlink: bool = False,
                 record: bool = True, enrol_port: int | None = None,
                 readmit_per_s: float = READMIT_PER_S) -> None:
        if not readmit_per_s > 0:
            raise DevServerError(f"readmit_per_s must be > 0, got {readmit_per_s!r}")
        self.directory = Path(directory)
        self.readmit_per_s = readmit_per_s  # the spread of the reconnection hints on stop
        self.host = host
        self._port = port
        self._enrol_port = enrol_port  # None: no enrolment listener
        self._enrol_server: Server | None = None
        self.enrolments = 0  # certificates issued by enrolment
        self.clock_offset_ms = clock_offset_ms
        self.tick_s = tick_s
        self._wall_ms = wall_ms
        self._connections: dict[str, _Connection] = {}
        self._server: Server | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._store: Store | None = None  # reads and light writes on the loop
        self._event_store: Store | None = None  # event batches, from a worker thread
        self.messages_refused = 0  # invalid tablet messages, text or binary
        self.downlink = downlink  # send the synthetic family stream while a call is live
        self.record = record  # record live sessions' uplink
        self.media_refused = 0  # invalid binary frames (also counted in messages_refused)
        self.media_received = 0  # valid binary frames, from every device
        self.media_outside_call = 0  # valid frames from a device that had no session yet
        self._live: dict[str, SessionMedia] = {}  # device id -> its live session
        self._last_media: dict[str, SessionMedia] = {}  # device id -> its latest session
        self._media: dict[str, SessionMedia] = {}  # session id -> its media, kept
        self._downlink_media: asyncio.Future[EncodedLoop] | None = None

    # -- life cycle ------------------------------------------------------------------

    def now_ms(self) -> int:
        """The server's clock (skewed by ``clock_offset_ms``), ms since the epoch."""
        return self._wall_ms() + self.clock_offset_ms

    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        sock = next(iter(self._server.sockets))
        return int(sock.getsockname()[1])

    @property
    def enrol_port(self) -> int | None:
        """The enrolment listener's bound port (None without one)."""
        if self._enrol_server is None:
            return self._enrol_port
        return int(next(iter(self._enrol_server.sockets)).getsockname()[1])

    @property
    def store(self) -> Store:
        if self._store is None:
            raise DevServerError("the reference server is not started")
        return self._store

    async def start(self) -> None:
        """Open the store, load the keys, listen, start the scheduler."""
        self._grant_key = ca.load_grant_key(self.directory)
        tls = self.ssl_context()
        self._store = Store.open(self.directory)
        self._event_store = Store.open(self.directory)
        self._store.reset_connections()
        self._store.set_clock_offset_ms(self.clock_offset_ms)
        if self.downlink:  # encode the family loop once, in a worker thread
            self._downlink_media = asyncio.ensure_future(asyncio.to_thread(encode_loop))
        self._server = await serve(
            self._handle, self.host, self._port, ssl=tls, subprotocols=[SUBPROTOCOL],
            max_size=MAX_MEDIA_FRAME, ping_interval=20, ping_timeout=20, close_timeout=2,
            server_header="tabletd-devserver (REFERENCE SERVER, development only)",
        )
        if self._enrol_port is not None:
            self._enrol_server = await serve(
                self._handle_enrol, self.host, self._enrol_port, ssl=self.ssl_context(
                    client_cert=False), subprotocols=[ENROL_SUBPROTOCOL],
                max_size=ENROL_MAX_MESSAGE, close_timeout=2,
                server_header="tabletd-devserver (REFERENCE SERVER, development only)")
            log.info("enrolment listening on %s:%d", self.host, self.enrol_port)
        self._scheduler = asyncio.create_task(self._schedule(), name="devserver-scheduler")
        log.info("reference server listening on %s:%d (clock offset %+d ms)", self.host,
                 self.port, self.clock_offset_ms)

    def readmission_hints(self, restart_in_s: int = 0) -> list[tuple[_Connection, int]]:
        """Each connected tablet and the ``retry_after`` it is told when the server stops
        (protocol section 1): ``restart_in_s`` plus its place in the queue divided by
        :attr:`readmit_per_s`, tablets in a live call first (their media is cut until they
        are back). With the tablet's jitter on top, a fleet of any size returns at about
        ``readmit_per_s`` a second instead of in one wave."""
        queue = sorted(self._connections.values(), key=lambda c: c.device_id not in self._live)
        return [(conn, min(MAX_RETRY_AFTER_S, restart_in_s + int(k / self.readmit_per_s)))
                for k, conn in enumerate(queue)]

    async def stop(self, *, restart_in_s: int | None = None) -> None:
        """Stop accepting, tell every tablet when to come back and close its connection,
        stop the scheduler, close the store. Idempotent.

        Each tablet's close reason is ``retry_after=N`` from :meth:`readmission_hints`; the
        code is 1012 (service restart) when ``restart_in_s`` says the server will be back
        in that many seconds, else 1001 (going away, hints from 0)."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        code = CLOSE_GOING_AWAY if restart_in_s is None else CLOSE_RESTART
        base = max(0, min(MAX_RETRY_AFTER_S, restart_in_s or 0))
        if self._server is not None:
            self._server.server.close()  # no new connection while the fleet is told
            hints = self.readmission_hints(base)
            if hints:
                log.info("stopping: %d tablets told to come back in %d to %d s", len(hints),
                         hints[0][1], max(n for _, n in hints))
            results = await asyncio.gather(
                *(conn.ws.close(code, f"retry_after={n}") for conn, n in hints),
                return_exceptions=True)
            for (conn, _), result in zip(hints, results, strict=True):
                if isinstance(result, BaseException):  # closing the others goes on
                    log.warning("stopping: closing %s failed: %r", conn.device_id, result)
        await self._close_listeners(code, f"retry_after={base}")
        now = time.monotonic_ns()
        for media in list(self._live.values()):
            self._end_live(media, now, "server_stopped")
        tasks: list[asyncio.Future[Any]] = [
            m.downlink_task for m in self._media.values() if m.downlink_task is not None]
        if self._downlink_media is not None:
            self._downlink_media.cancel()
            tasks.append(self._downlink_media)
            self._downlink_media = None
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for store in (self._store, self._event_store):
            if store is not None:
                store.close()
        self._store = self._event_store = None

    async def _close_listeners(self, code: int, reason: str) -> None:
        """Close both listeners and what they still hold: an open connection with ``code``
        and ``reason``, a handshake in progress with HTTP 503."""
        for listener in (self._server, self._enrol_server):
            if listener is not None:
                listener.close(code=code, reason=reason)
                await listener.wait_closed()
        self._server = self._enrol_server = None

    async def abort(self) -> None:
        """As a crash of the server would: stop listening and drop every open connection
        (tablets and enrolments) with no close frame, so no hint (the tablets see the
        connection end, 1006); then stop the scheduler and close the store. For testing and
        measuring the tablets' own reconnection."""
        for listener in (self._server, self._enrol_server):
            if listener is not None:
                listener.server.close()
                for ws in listener.connections:
                    ws.transport.abort()
        await self._close_listeners(CLOSE_GOING_AWAY, "")
        await self.stop()

    async def __aenter__(self) -> DevServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def ssl_context(self, *, client_cert: bool = True) -> ssl.SSLContext:
        """Server TLS: the server identity, client certificates required from the dev CA
        (``client_cert=False``, for enrolment: none asked for)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED if client_cert else ssl.CERT_NONE
        cert, key, ca_file = (self.directory / ca.SERVER_CERT, self.directory / ca.SERVER_KEY,
                              self.directory / ca.CA_CERT)
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise DevServerError(f"{cert} / {key}: cannot load the server identity ({exc}); "
                                 "run `tabletd-devserver init` first") from exc
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise DevServerError(f"{ca_file}: cannot load the CA ({exc})") from exc
        return ctx

    # -- test verbs (the CLI does the same on the store) -----------------------------

    def book(self, device_id: str, in_s: float, duration_s: int,
             contact: str = "Relative") -> str:
        """Book a call starting ``in_s`` seconds from now; returns its session id."""
        return book(self.store, device_id, now_ms=self.now_ms(), in_s=in_s,
                    duration_s=duration_s, contact=contact)

    def end(self, session_id: str) -> None:
        """Staff end (or cancel) a call; see :meth:`Store.request_end`."""
        self.store.request_end(session_id, self.now_ms())

    def lock(self, device_id: str, reason: str = "staff") -> None:
        self.store.queue_command(device_id, "lock", self.now_ms(), reason=reason)

    def unlock(self, device_id: str) -> None:
        self.store.queue_command(device_id, "unlock", self.now_ms())

    def events(self, device_id: str | None = None) -> list[StoredEvent]:
        return self.store.events(device_id)

    @property
    def duplicates_received(self) -> int:
        return self.store.duplicates_received()

    def tablet_errors(self, device_id: str | None = None) -> list[TabletError]:
        """The ``error`` messages tablets sent (refused grants, bad messages...)."""
        return self.store.tablet_errors(device_id)

    def booking(self, session_id: str) -> Booking | None:
        return self.store.booking(session_id)

    def connected(self, device_id: str) -> bool:
        return device_id in self._connections

    # -- media (docs/protocol.md section 6) ------------------------------------------

    def recording_path(self, session_id: str) -> Path:
        """Where a session's uplink is recorded (the file exists once a keyframe came):
        ``DIR/recordings/<session_id>.ts``, or ``<session_id>-N.ts`` if a previous run of
        the server had already recorded that session (a file is never overwritten)."""
        media = self._media.get(session_id)
        if media is not None and media.recording is not None:
            return media.recording
        return self.directory / RECORDINGS / f"{session_id}.ts"

    def _fresh_recording_path(self, session_id: str) -> Path | None:
        if not self.record or not _SAFE_NAME.fullmatch(session_id):
            return None
        path = self.directory / RECORDINGS / f"{session_id}.ts"
        n = 0
        while path.exists():
            n += 1
            path = path.with_name(f"{session_id}-{n}.ts")
        return path

    def media(self, session_id: str) -> SessionMedia | None:
        """A session's media counters, recorder and downlink state (kept after its end)."""
        return self._media.get(session_id)

    def live_session(self, device_id: str) -> str | None:
        """The session live on the server for this device, if any."""
        media = self._live.get(device_id)
        return media.session_id if media is not None else None

    def frames_after_deadline(self, session_id: str) -> int:
        """Frames of this session captured at or after the tablet's deadline
        (``capture_us * 1000 >= deadline_ns`` of its ``call_started`` event). 0 for an
        unknown session."""
        media = self._media.get(session_id)
        return media.captured_after_deadline if media is not None else 0

    def frames_arrived_after_deadline(self, session_id: str) -> int:
        """Frames of this session that reached the server after the booking's start +
        duration + 50 ms (server clock)."""
        media = self._media.get(session_id)
        return media.arrived_after_deadline if media is not None else 0

    # -- enrolment (docs/protocol.md section 7) ------------------------------------------

    async def _handle_enrol(self, ws: ServerConnection) -> None:
        """One enrolment: ``enrol`` in, ``enrolled`` or ``error`` out, then close."""
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                first = await ws.recv()
        except TimeoutError:
            await ws.close(CLOSE_POLICY, "no enrol message")
            return
        except ConnectionClosed:
            return
        try:
            req = decode_request(first)
            cert_pem = await asyncio.to_thread(self._enrol, req)
        except (EnrolMessageError, EnrolRefused) as exc:
            log.warning("enrolment refused: %s: %s", exc.code, exc.detail)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode_enrol_error(exc.code, exc.detail))
            await ws.close(CLOSE_POLICY, exc.code)
            return
        except DevServerError as exc:  # the store or the CA, not the tablet's request
            log.error("enrolment failed: %s", exc)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode_enrol_error("internal", str(exc)))
            await ws.close(CLOSE_POLICY, "internal")
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(encode_enrolled(req.device_id, cert_pem))
            await ws.close(1000, "enrolled")

    def _enrol(self, req: EnrolRequest) -> str:
        """Check the CSR, sign it, then spend the token; the certificate PEM."""
        csr_pem = req.csr_pem.encode("utf-8")
        try:
            named = ca.csr_common_name(csr_pem)
            if named != req.device_id:
                raise ca.CsrError(f"the CSR's subject CN is {named!r}, not the device id "
                                  f"{req.device_id!r}")
            cert = ca.sign_csr(self.directory, csr_pem, req.device_id)
        except ca.CsrError as exc:
            raise EnrolRefused("bad_csr", str(exc)) from exc
        self.store.consume_token(req.token, req.device_id, self.now_ms())
        self.enrolments += 1
        log.info("enrolled %s: certificate issued", req.device_id)
        return cert.decode("ascii")

    # -- one connection --------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        cn = _peer_common_name(ws)
        hello = await self._receive_hello(ws, cn)
        if hello is None:
            return
        assert cn is not None
        session = hello.session
        conn = _Connection(cn, ws, session_id=session.id if session else None,
                           session_state=session.state if session else None)
        await asyncio.to_thread(self._events().set_connected, cn, self.now_ms(),
                                connected=True, software=hello.software,
                                boot_id=hello.boot_id, locked=hello.locked)
        try:
            await ws.send(encode(Welcome(server_time_ms=self.now_ms())))
        except ConnectionClosed:
            return
        previous = self._connections.get(cn)
        self._connections[cn] = conn
        log.info("device %s connected (software %s, session %s)", cn, hello.software,
                 conn.session_id)
        if previous is not None:
            await previous.ws.close(1000, "replaced by a newer connection")
        if session is not None and session.state == "live":
            self._go_live(conn, session.id)  # a reconnection during the call
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._write_events(conn), name=f"events-{cn}")
                await self._receive(conn)
                writer.cancel()
        finally:
            if conn.pending:  # stored, never acknowledged: the tablet sends them again
                await asyncio.to_thread(self._events().add_events, cn, conn.pending,
                                        self.now_ms())
            live = self._live.get(cn)
            if (live is not None and live.downlink_conn is conn
                    and live.downlink_task is not None):
                live.downlink_task.cancel()
            if self._connections.get(cn) is conn:
                del self._connections[cn]
                if self._event_store is not None:
                    await asyncio.to_thread(self._event_store.set_connected, cn,
                                            self.now_ms(), connected=False)
            log.info("device %s disconnected (%s)", cn, ws.close_reason or ws.close_code)

    async def _receive_hello(self, ws: ServerConnection, cn: str | None) -> Hello | None:
        """The first message, if it is an acceptable hello; else answer, close, None."""
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                first = await ws.recv()
        except TimeoutError:
            await ws.close(CLOSE_POLICY, "no hello")
            return None
        except ConnectionClosed:
            return None
        problem: ErrorMsg | None = None
        try:
            msg = self._decode(first)
        except ProtocolError as exc:
            problem = error_for(exc)
        else:
            if not isinstance(msg, Hello):
                problem = ErrorMsg(code="bad_message", ref=None,
                                   detail=f"expected hello first, got {_type_name(msg)}")
            elif cn is None or self.store.device(cn) is None:
                problem = ErrorMsg(code="refused", ref=None,
                                   detail=f"device {cn!r} is not registered on this server")
            elif msg.device_id != cn:
                problem = ErrorMsg(code="refused", ref=None,
                                   detail=f"hello device_id {msg.device_id!r} differs from "
                                          f"the certificate's CN {cn!r}")
            else:
                return msg
        log.warning("refusing connection from %s: %s", cn, problem.detail)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(encode(problem))
        await ws.close(CLOSE_POLICY, problem.code)
        return None

    async def _receive(self, conn: _Connection) -> None:
        """Every frame until the connection closes; nothing malformed ends it."""
        with contextlib.suppress(ConnectionClosed):
            async for data in conn.ws:
                if isinstance(data, bytes):
                    await self._on_media(conn, data)
                    continue
                if len(data) > MAX_FRAME // 4 and len(data.encode("utf-8")) > MAX_FRAME:
                    await conn.ws.close(CLOSE_TOO_BIG, "message too big")
                    return
                try:
                    msg = self._decode(data)
                except ProtocolError as exc:
                    await self._refuse(conn, error_for(exc))
                    continue
                if isinstance(msg, EventMsg):
                    self._on_call_event(conn, msg)
                    conn.pending.append(_event_record(msg))
                    conn.wake.set()
                elif isinstance(msg, ErrorMsg):
                    log.warning("device %s answered error %s: %s (ref %s)", conn.device_id,
                                msg.code, msg.detail, msg.ref)
                    await asyncio.to_thread(self._events().add_tablet_error, conn.device_id,
                                            msg.code, msg.detail, msg.ref, self.now_ms())
                else:
                    await self._refuse(conn, ErrorMsg(
                        code="bad_message", ref=None,
                        detail=f"{_type_name(msg)} is only valid as the first message"))

    async def _refuse(self, conn: _Connection, error: ErrorMsg) -> None:
        self.messages_refused += 1
        log.warning("device %s sent an invalid message: %s: %s", conn.device_id, error.code,
                    error.detail)
        await conn.ws.send(encode(error))

    async def _on_media(self, conn: _Connection, data: bytes) -> None:
        """One binary frame: decode, attribute to the device's session, record if live."""
        now = time.monotonic_ns()
        try:
            frame = decode_frame(data)
        except ProtocolError as exc:
            self.messages_refused += 1
            self.media_refused += 1
            if (conn.media_error_ns is None
                    or now - conn.media_error_ns >= MEDIA_ERROR_INTERVAL_NS):
                conn.media_error_ns = now
                log.warning("device %s sent an invalid media frame: %s", conn.device_id,
                            exc.detail)
                await conn.ws.send(encode(error_for(exc)))
            return
        self.media_received += 1
        live = self._live.get(conn.device_id)
        if live is not None and live.past_deadline(now):
            self._end_live(live, now, "deadline")
        media = self._last_media.get(conn.device_id)
        if media is None:
            self.media_outside_call += 1
            return
        media.on_frame(frame, now)

    def _on_call_event(self, conn: _Connection, msg: EventMsg) -> None:
        """``call_started``/``call_ended`` open and close the session's media window."""
        sid = msg.session_id
        if sid is None:
            return
        if msg.kind == "call_started":
            media = self._go_live(conn, sid)
            if media is not None:
                media.set_tablet_times(_int_field(msg, "started_ns"),
                                       _int_field(msg, "deadline_ns"))
        elif msg.kind == "call_ended":
            media = self._media.get(sid)
            if media is not None and media.device_id == conn.device_id:
                reason = msg.fields.get("reason")
                self._end_live(media, time.monotonic_ns(),
                               reason if isinstance(reason, str) else "call_ended")

    def _go_live(self, conn: _Connection, sid: str) -> SessionMedia | None:
        """Open (or resume on a new connection) the media window of a started booking.
        None if the booking is not this device's, is over, or its window already closed."""
        media = self._media.get(sid)
        if media is None:
            booking = self.store.booking(sid)
            if (booking is None or booking.device_id != conn.device_id
                    or booking.state in ("ended", "cancelled")):
                return None
            now_ms = self.now_ms()
            now = time.monotonic_ns()
            started_ms = booking.started_ms if booking.started_ms is not None else now_ms
            deadline = now + (started_ms + booking.duration_s * 1000 - now_ms) * 1_000_000
            if now > deadline:
                return None
            previous = self._live.get(conn.device_id)
            if previous is not None:
                self._end_live(previous, now, "superseded")
            media = SessionMedia(sid, conn.device_id, self._fresh_recording_path(sid),
                                 live_from_ns=now,
                                 deadline_mono_ns=deadline)
            self._media[sid] = media
            self._live[conn.device_id] = self._last_media[conn.device_id] = media
            log.info("session %s of %s is live on the server (%.1f s left)", sid,
                     conn.device_id, (deadline - now) / 1e9)
        if not media.live:
            return None
        if self.downlink and (media.downlink_task is None or media.downlink_task.done()
                              or media.downlink_conn is not conn):
            if media.downlink_task is not None:
                media.downlink_task.cancel()
            media.downlink_conn = conn
            media.downlink_task = asyncio.create_task(self._send_downlink(conn, media),
                                                      name=f"downlink-{sid}")
        return media

    def _end_live(self, media: SessionMedia, now: int, reason: str) -> None:
        if media.live:
            log.info("session %s media window closed (%s): %d frames received, %d recorded",
                     media.session_id, reason, media.frames_received, media.frames_recorded)
        media.end(now, reason)
        if self._live.get(media.device_id) is media:
            del self._live[media.device_id]

    async def _send_downlink(self, conn: _Connection, media: SessionMedia) -> None:
        if self._downlink_media is None:
            return
        try:
            loop_media = await asyncio.shield(self._downlink_media)
        except Exception:
            log.exception("cannot encode the synthetic downlink; session %s gets none",
                          media.session_id)
            return
        with contextlib.suppress(ConnectionClosed):
            await send_downlink(conn.ws.send, loop_media, media.deadline_mono_ns,
                                media.downlink)

    @staticmethod
    def _decode(data: str | bytes) -> DeviceMessage:
        if isinstance(data, bytes):
            raise ProtocolError("bad_message", "binary frames are reserved for media "
                                "(docs/protocol.md section 6)")
        return decode_device_message(data)

    async def _write_events(self, conn: _Connection) -> None:
        """Commit queued events in batches, then acknowledge each batch (section 3.3)."""
        store = self._events()
        with contextlib.suppress(ConnectionClosed):
            while True:
                await conn.wake.wait()
                conn.wake.clear()
                while conn.pending:
                    batch = conn.pending[:MAX_ACK_IDS]
                    await asyncio.to_thread(store.add_events, conn.device_id, batch,
                                            self.now_ms())
                    del conn.pending[:len(batch)]
                    ids = tuple(dict.fromkeys(ev.id for ev in batch))  # once each
                    await conn.ws.send(encode(Ack(ids=ids)))

    def _events(self) -> Store:
        if self._event_store is None:
            raise DevServerError("the reference server is not started")
        return self._event_store

    # -- the scheduler ---------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            try:
                await self._tick()
            except ConnectionClosed:
                pass  # that device's connection handler cleans up
            except Exception:
                log.exception("scheduler tick failed; continuing")
            await asyncio.sleep(self.tick_s)

    async def _tick(self) -> None:
        now_ns = time.monotonic_ns()
        for media in list(self._live.values()):
            if media.past_deadline(now_ns):
                self._end_live(media, now_ns, "deadline")
        if not self._connections:
            return
        store = self.store
        now = self.now_ms()
        for booking in store.open_bookings(now):
            conn = self._connections.get(booking.device_id)
            if conn is not None:
                await self._deliver_booking(conn, booking, now)
        for command in store.pending_commands():
            conn = self._connections.get(command.device_id)
            if conn is not None:
                await conn.ws.send(encode(_command_message(command)))
                store.mark_command_sent(command.id, self.now_ms())
                log.info("sent %s to %s", command.kind, command.device_id)

    async def _deliver_booking(self, conn: _Connection, booking: Booking, now: int) -> None:
        sid = booking.session_id
        tablet_has_it = conn.session_id == sid
        if policy.grant_due(booking, now):
            body = policy.new_grant(booking, now)
            signature = sign_grant(body, self._grant_key)
            self.store.mark_granted(sid, policy.grant_to_json(body), signature, now)
            await conn.ws.send(encode(GrantMsg(body=body, signature=signature)))
            conn.grants_sent.add(sid)
            log.info("sent grant %s to %s", sid, conn.device_id)
            booking = self.store.booking(sid) or booking
        elif (booking.state == "granted" and sid not in conn.grants_sent
              and not tablet_has_it and booking.grant_json and booking.signature):
            body = policy.grant_from_json(booking.grant_json)
            await conn.ws.send(encode(GrantMsg(body=body, signature=booking.signature)))
            conn.grants_sent.add(sid)
            log.info("re-sent grant %s to %s", sid, conn.device_id)
        delivered = sid in conn.grants_sent or tablet_has_it
        if not (delivered and policy.start_due(booking, now)) or sid in conn.starts_sent:
            return
        if booking.state == "granted" or (
                booking.state == "started" and tablet_has_it
                and conn.session_state == "scheduled"):
            await conn.ws.send(encode(Start(session_id=sid)))
            conn.starts_sent.add(sid)
            self.store.mark_started(sid, now)
            log.info("sent start %s to %s", sid, conn.device_id)
            self._go_live(conn, sid)


def book(store: Store, device_id: str, *, now_ms: int, in_s: float, duration_s: int,
         contact: str) -> str:
    """Book a call on the store (server clock ``now_ms``); returns the session id.

    Raises :class:`DevServerError` for bounds (:func:`policy.plan_booking`) and
    :class:`~tabletd.devserver.UnknownRecordError` for an unregistered device.
    """
    plan = policy.plan_booking(now_ms, in_s, duration_s, contact)
    return store.add_booking(device_id, contact=plan.contact, booked_at_ms=plan.booked_at_ms,
                             start_at_ms=plan.start_at_ms, duration_s=plan.duration_s,
                             not_before_ms=plan.not_before_ms, not_after_ms=plan.not_after_ms)


def _command_message(command: Command) -> End | Lock | Unlock:
    if command.kind == "end":
        if command.session_id is None:
            raise DevServerError(f"command {command.id}: end without a session id")
        return End(session_id=command.session_id)
    if command.kind == "lock":
        return Lock(reason=command.reason or "staff")
    return Unlock()


def _event_record(msg: EventMsg) -> EventRecord:
    return EventRecord(id=msg.id, seq=msg.seq, kind=msg.kind, session_id=msg.session_id,
                       boot_id=msg.boot_id, boot_ns=msg.boot_ns, wall_time=msg.wall_time,
                       fields=dict(msg.fields))




def _int_field(msg: EventMsg, name: str) -> int | None:
    value = msg.fields.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _type_name(msg: object) -> str:
    return str(getattr(msg, "type", type(msg).__name__))


def _peer_common_name(ws: ServerConnection) -> str | None:
    """The client certificate's subject CN (the device id, protocol section 1)."""
    ssl_object = ws.transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return ca.device_common_name(x509.load_der_x509_certificate(der))
