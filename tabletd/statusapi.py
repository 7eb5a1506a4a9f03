"""The local status API: loopback only, read-only (issue "Core", item 8).

``GET /v1/status`` answers the status object as JSON. ``/v1/status/stream`` is a websocket
that carries the same object on every change (and every second while a call is live, for
``remaining_ms``). Nothing received on it is acted upon: no request here can start or extend
a call. The object's schema is in ``docs/status-api.md``.

``GET /`` and ``GET /ui/...`` serve the tablet's screen (:mod:`tabletd.ui`, ``docs/ui.md``):
static files from the package, under a Content-Security-Policy that allows nothing but this
origin, so the page can load no external resource.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tabletd import ui

STATUS_PATH = "/v1/status"
STREAM_PATH = "/v1/status/stream"
MEDIA_PATH = "/v1/media/stream"
SELF_PATH = "/v1/media/self"  # the tablet's own camera, for the screen's small preview
UI_PREFIX = "/ui/"
# The page may talk to its own origin only (websockets included: CSP 3 'self' matches ws:).
UI_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
          "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
MEDIA_QUEUE_FRAMES = 64  # per subscriber; a slow one loses frames, never slows the others


class StatusHub:
    """Holds how to build the status object and wakes the push clients when it changes."""

    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        self._build = build
        self.version = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def status(self) -> dict[str, Any]:
        return self._build()

    def changed(self) -> None:
        """Call on the loop after anything in the status may have changed."""
        self.version += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_changed(self, since: int, timeout_s: float) -> None:
        """Return once ``version`` has passed ``since``, or after ``timeout_s``."""
        if self.version > since:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            return
        finally:
            self._waiters.discard(waiter)


def _json_response(status: HTTPStatus, body: Any) -> Response:
    data = json.dumps(body, sort_keys=True).encode()
    headers = Headers([
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
    ])
    return Response(status.value, status.phrase, headers, data)


def _asset_response(asset: ui.Asset) -> Response:
    headers = Headers([
        ("Content-Type", asset.content_type),
        ("Content-Length", str(len(asset.body))),
        ("Cache-Control", "no-store"),
        ("Content-Security-Policy", UI_CSP),
        ("X-Content-Type-Options", "nosniff"),
        ("Connection", "close"),
    ])
    return Response(HTTPStatus.OK.value, HTTPStatus.OK.phrase, headers, asset.body)


class MediaHub:
    """The relative's media (downlink), fanned out to local subscribers (the screen).

    Only the daemon publishes, and only while a call is live (invariant 7); nothing is
    buffered beyond each subscriber's small queue, and nothing is written anywhere.
    """

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self.dropped = 0

    @property
    def listened(self) -> bool:
        """Someone subscribes: only then is a frame worth encoding for the hub."""
        return bool(self._subscribers)

    def publish(self, frame: bytes) -> None:
        for q in self._subscribers:
            if q.full():
                self.dropped += 1
            else:
                q.put_nowait(frame)

    def clear(self) -> None:
        """At the cut: frames still queued for a slow subscriber are dropped, not shown."""
        for q in self._subscribers:
            while not q.empty():
                q.get_nowait()

    def subscribe(self) -> asyncio.Queue[bytes]:
        q: asyncio.Queue[bytes] = asyncio.Queue(MEDIA_QUEUE_FRAMES)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[bytes]) -> None:
        self._subscribers.discard(q)


class StatusServer:
    def __init__(self, hub: StatusHub, host: str, port: int,
                 media: MediaHub | None = None) -> None:
        self.hub = hub
        self.media = media or MediaHub()
        self.own = MediaHub()
        self.host = host
        self.port = port
        self._server: Server | None = None

    async def start(self) -> None:
        self._server = await serve(
            self._connection, self.host, self.port,
            process_request=self._route, max_size=1024, max_queue=4,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path in (STREAM_PATH, MEDIA_PATH, SELF_PATH):
            return None  # go on with the websocket handshake
        if path == STATUS_PATH:
            if request.headers.get("Upgrade"):
                return _json_response(HTTPStatus.BAD_REQUEST,
                                      {"error": f"use {STREAM_PATH} for the push channel"})
            return _json_response(HTTPStatus.OK, self.hub.status())
        if path == "/":
            return _asset_response(ui.index())
        asset = ui.asset(path[len(UI_PREFIX):]) if path.startswith(UI_PREFIX) else None
        if asset is not None:
            return _asset_response(asset)
        return _json_response(HTTPStatus.NOT_FOUND,
                              {"error": f"no such path {path!r}",
                               "paths": [STATUS_PATH, STREAM_PATH, MEDIA_PATH, SELF_PATH]})

    async def _connection(self, ws: ServerConnection) -> None:
        """Serve one websocket until it closes. Its work waits on the hub or the media queue,
        not on the socket, so it is raced against the close: a client that goes, or the
        server closing at the daemon's stop, ends the handler at once (``Server.wait_closed``
        waits for every handler)."""
        path = "" if ws.request is None else ws.request.path.split("?", 1)[0]
        if path in (MEDIA_PATH, SELF_PATH):
            work = asyncio.create_task(self._media(ws, self.media if path == MEDIA_PATH
                                                   else self.own))
        else:
            work = asyncio.create_task(self._stream(ws))
        closed = asyncio.create_task(ws.wait_closed())
        try:
            await asyncio.wait({work, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()
            closed.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await work

    async def _media(self, ws: ServerConnection, hub: MediaHub) -> None:
        """Binary frames in the format of ``docs/protocol.md`` section 6.1, as received."""
        q = hub.subscribe()
        try:
            while True:
                await ws.send(await q.get())
        finally:
            hub.unsubscribe(q)

    async def _stream(self, ws: ServerConnection) -> None:
        last = None
        while True:
            seen = self.hub.version
            status = self.hub.status()
            body = json.dumps(status, sort_keys=True)
            if body != last:
                await ws.send(body)
                last = body
            live = status.get("session") is not None and status["session"]["state"] == "live"
            await self.hub.wait_changed(seen, 1.0 if live else 30.0)
