"""The daemon's end of the power/dock MCU link (``docs/mcu-protocol.md``), over pyserial.

One session at a time, forever: open the port, run the sans-I/O :class:`McuLink` (handshake,
reliability), hand STATUS and EVENT messages to the host, and keep the camera-rail lease
alive while the host asks for it. A failure (unplugged adapter, link down after its
retransmissions) closes the port; the next attempt waits a full-jitter backoff.

The lease is the layer that holds when Linux itself hangs (BRIEF invariant 3): every LEASE
asks for at most ``lease_ms`` and never past the rail's end, so if renewals stop - the daemon
frozen, the kernel hung - the MCU cuts the rail by itself, on its own clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Protocol

import serial

from tabletd.clock import NS_PER_MS, NS_PER_S, Clock
from tabletd.config import McuConfig
from tabletd.link.backoff import Backoff
from tabletd.mcu.codec import Cut, Event, Lease, Message, PowerOff, Status
from tabletd.mcu.link import McuLink, McuLinkDownError

log = logging.getLogger(__name__)

MAX_WAIT_NS = 100 * NS_PER_MS
ACK_POLL_S = 0.01  # how often power_off() looks for its ACK


class McuHost(Protocol):
    """What the MCU link needs from the daemon; every method runs on the loop."""

    def mcu_link_changed(self, up: bool) -> None: ...

    def mcu_status(self, status: Status) -> None: ...

    def mcu_event(self, event: Event) -> None: ...


class McuClient:
    def __init__(self, cfg: McuConfig, host: McuHost, clock: Clock) -> None:
        self.cfg = cfg
        self.host = host
        self.clock = clock
        self.backoff = Backoff(0.2, 10.0)
        self.up = False
        self.sessions = 0
        self.leases_sent = 0
        self._link: McuLink | None = None
        self._lease_until: int | None = None
        self._next_renew = 0
        self._wake = asyncio.Event()
        self._empty_reads = 0

    def lease(self, until_ns: int | None) -> None:
        """Keep the rail leased until ``until_ns`` (CLOCK_BOOTTIME), or cut now (None)."""
        link = self._link
        self._lease_until = until_ns
        self._next_renew = 0
        if until_ns is None and link is not None and link.handshake_done:
            link.send(Cut(), self.clock.boot_ns())
        self._wake.set()

    async def power_off(self, delay_s: int, timeout_s: float = 2.0) -> bool:
        """Ask the MCU to cut the tablet's power in ``delay_s`` (the lease ends at once) and
        wait, at most ``timeout_s``, for its ACK; returns whether it came. Sent only on a live
        link: without one the MCU's own brown-out protection is what holds."""
        link = self._link
        self._lease_until = None
        if link is None or not link.handshake_done:
            return False
        link.send(PowerOff(delay_s), self.clock.boot_ns())
        self._wake.set()
        for _ in range(int(timeout_s / ACK_POLL_S)):
            if self._link is not link or link.down:
                return False
            if not any(isinstance(m, PowerOff) for m in link.unsent_messages()):
                log.warning("mcu: power off in %d s", delay_s, extra={"EVENT": "mcu_power_off"})
                return True
            await asyncio.sleep(ACK_POLL_S)
        return False

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except (OSError, serial.SerialException, McuLinkDownError) as exc:
                log.warning("mcu: %s", exc, extra={"EVENT": "mcu_link_failed"})
            await asyncio.sleep(self.backoff.next_delay())

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        port = serial.Serial(self.cfg.port, 115200, timeout=0, write_timeout=0)
        fd = port.fileno()
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)
        link = McuLink("host")
        self._link = link
        self._next_renew = 0
        self._empty_reads = 0
        try:
            while True:
                now = self.clock.boot_ns()
                if readable.is_set():
                    readable.clear()
                    self._read(fd, link, now)
                self._step(fd, link, now)
                deadlines = [now + MAX_WAIT_NS, link.next_timeout_ns()]
                if self._lease_until is not None:
                    deadlines.append(self._next_renew)
                wake = min(d for d in deadlines if d is not None)
                self._wake.clear()
                waits = [asyncio.ensure_future(readable.wait()),
                         asyncio.ensure_future(self._wake.wait())]
                try:
                    await asyncio.wait(waits, timeout=max(0, wake - now) / NS_PER_S,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
        finally:
            loop.remove_reader(fd)
            port.close()
            self._link = None
            if self.up:
                self.up = False
                self.host.mcu_link_changed(False)

    def _read(self, fd: int, link: McuLink, now: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            data = b""
        # A pty can report readiness with nothing to read; a hung-up one does so for ever:
        # give up after a burst of those, and reopen.
        self._empty_reads = 0 if data else self._empty_reads + 1
        if self._empty_reads > 100:
            raise OSError(f"{self.cfg.port}: hung up")
        if data:
            self._deliver(link.receive_bytes(data, now))

    def _step(self, fd: int, link: McuLink, now: int) -> None:
        """Timers, the handshake's outcome, lease renewal, then whatever must be written."""
        self._deliver(link.tick(now))
        if link.handshake_done and not self.up:
            self.up = True
            self.sessions += 1
            self.backoff.reset()
            log.info("mcu: link up (%s)", link.peer, extra={"EVENT": "mcu_link_up"})
            self.host.mcu_link_changed(True)
        if link.handshake_done:
            self._renew(link, now)
        out = link.bytes_to_send(now)
        if out:
            os.write(fd, out)
        if link.down:
            raise McuLinkDownError(link.down_reason or "link down")

    def _renew(self, link: McuLink, now: int) -> None:
        until = self._lease_until
        if until is None or now < self._next_renew:
            return
        left_ms = (until - now) // NS_PER_MS
        if left_ms < 1:
            return  # the lease runs out by itself at the rail's end
        # Never past the rail's end, never more than lease_ms: renewals keep it alive.
        link.send(Lease(min(self.cfg.lease_ms, left_ms)), now)
        self.leases_sent += 1
        self._next_renew = now + self.cfg.lease_ms * NS_PER_MS // 3

    def _deliver(self, messages: list[Message]) -> None:
        for msg in messages:
            if isinstance(msg, Status):
                self.host.mcu_status(msg)
            elif isinstance(msg, Event):
                self.host.mcu_event(msg)
