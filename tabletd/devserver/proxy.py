"""A TCP fault proxy for the demo and the tests (development only, never on a tablet).

It sits between the tablet and the reference server on loopback and misbehaves on demand,
like a bad network: ``pass`` (forward), ``blackhole`` (accept and forward nothing, as when a
cable is cut or an access point vanishes: only keepalive timeouts notice), ``reset`` (abort
every connection and refuse new ones), ``delay`` (hold each chunk ``delay_s``), ``split``
(forward in 1-7 byte pieces, so frames arrive cut at every possible place), ``throttle``
(at most ``rate_bps`` bytes per second each way: a slow link).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from typing import Literal

Mode = Literal["pass", "blackhole", "reset", "delay", "split", "throttle"]
RECEIVE_BUFFER = 32_768


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1",
                 port: int = 0, seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.rate_bps = 0
        self.connections = 0
        self._rng = random.Random(seed)  # noqa: S311 (split sizes, not secrets)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        # Set on the listener so accepted sockets inherit it before the window is advertised:
        # a middlebox with modest buffers, so that "throttle" means a slow link, not a deep
        # buffer in front of one.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        listener.bind((self.host, self.port))
        self._server = await asyncio.start_server(self._client, sock=listener)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.set_mode("reset")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def set_mode(self, mode: Mode, delay_s: float = 0.0, rate_bps: int = 16_384) -> None:
        self.mode = mode
        self.delay_s = delay_s
        self.rate_bps = rate_bps
        if mode == "reset":
            for w in list(self._writers):
                _abort(w)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.mode == "reset":
                _abort(writer)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                _abort(writer)
                return
            self._writers.add(up_writer)
            self.connections += 1
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pump(reader, up_writer))
                    tg.create_task(self._pump(up_reader, writer))
            except* (OSError, ConnectionError, _PumpDone):
                pass
            finally:
                self._writers.discard(up_writer)
                _abort(up_writer)
        finally:
            self._writers.discard(writer)
            _abort(writer)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            data = await src.read(4096 if self.mode == "throttle" else 65536)
            if not data:
                raise _PumpDone
            if self.mode == "blackhole":
                continue
            if self.mode == "throttle":
                await asyncio.sleep(len(data) / max(1, self.rate_bps))
            if self.mode == "delay":
                await asyncio.sleep(self.delay_s)
            if self.mode == "split":
                i = 0
                while i < len(data):
                    n = self._rng.randint(1, 7)
                    dst.write(data[i:i + n])
                    await dst.drain()
                    i += n
            else:
                dst.write(data)
                await dst.drain()


class _PumpDone(Exception):
    """One direction reached end of file: tear the pair down."""


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a middlebox dropping state would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
