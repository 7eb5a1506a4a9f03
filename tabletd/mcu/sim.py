"""The simulated power/dock microcontroller: a separate process on a real pty.

Run it as ``python -m tabletd.mcu.sim --port PATH --state-dir DIR [--seed N]`` (or with
:func:`tabletd.mcu.pty.start_sim_mcu`). It opens a raw pty pair, keeps the master, and
publishes the slave as a symlink at ``PATH`` (socat's ``link=`` habit): the daemon opens
``PATH`` with pyserial at 115200 8N1. It speaks ``docs/mcu-protocol.md`` with an ``"mcu"``
:class:`~tabletd.mcu.link.McuLink`, then prints ``ready PATH`` on stdout.

What it simulates
-----------------
- **The camera-rail lease**, really enforced on its own clock (CLOCK_BOOTTIME, which is
  monotonic): a LEASE sets ``lease_until = now + duration``, a CUT or POWER_OFF ends it, and
  the lease lapses by itself: the main loop sleeps exactly until ``lease_until`` (select()
  has a microsecond timeout) and nothing in the loop blocks, so the lapse is seen whatever
  the daemon is doing, SIGSTOP included. Each change of state is one ``pwrite`` of a
  fixed-length value (``b"on \\n"`` or ``b"off\\n"``, like :mod:`tabletd.hardware.sim`'s
  rail file) to ``<state-dir>/sim/mcu-lease``, and one line appended (and flushed) to
  ``<state-dir>/sim/mcu-lease.log``::

      <CLOCK_BOOTTIME ns> on lease ms=<N> until=<ns>     the lease starts
      <CLOCK_BOOTTIME ns> on renew ms=<N> until=<ns>     a LEASE while one runs (file unchanged)
      <CLOCK_BOOTTIME ns> off expired until=<ns> late_us=<n>
      <CLOCK_BOOTTIME ns> off cut | power_off | start | exit

  The time of an ``on`` line is the base of its ``until``; the time of an ``off`` line is
  read after the ``pwrite``. So ``off - on`` of one lease is at least its duration, and
  ``off - until`` is the lapse's lateness as the rest of the system could see it.
- **The measured rail** (STATUS ``rail_measured``): the lease AND the simulated GPIO rail
  (``<state-dir>/sim/rail``, written by :mod:`tabletd.hardware.sim`; taken as on if absent).
- **Battery**: a charge that drains while undocked and charges while docked (rates from
  the command line), a battery voltage from an open-circuit-voltage table (plus a charge
  or load offset) and the percentage from that voltage, as a fuel gauge does; charging
  state NOT_CHARGING / CHARGING / FULL; a charger fault (injected) stops charging.
- **Temperature**: ambient, warmer while charging (first-order lag), with seeded jitter.
- **Dock, lid, power button**: EVENTs on change, and a STATUS on every change of
  percentage, charging state, charger fault, dock, measured rail or lease state; a STATUS
  every second anyway. POWER_OFF cuts the lease at once and, after its delay, writes
  ``off`` to ``<state-dir>/sim/mcu-power`` (the power button writes ``on`` again). LED
  writes ``"r g b"`` to ``<state-dir>/sim/mcu-led``.

Control and fault injection
---------------------------
A UNIX datagram socket, ``<state-dir>/sim/mcu-control.sock``, takes one JSON object per
datagram; its keys are applied together, and a client with a bound address gets a reply
``{"ok": true, "state": {...}}`` or ``{"ok": false, "error": "..."}``
(:func:`send_control` does it all)::

    {"dock": 3}  {"undock": true}  {"battery_pct": 12}  {"lid": "open" | "closed"}
    {"power_button": true}  {"charger_fault": true}  {"temperature_dc": 300}
    {"noise": 0.01}   each byte, either way, is followed by a random byte with this probability
    {"drop": 0.05}    each outgoing byte is dropped with this probability
    {"delay_ms": 40}  outgoing bytes reach the wire this much later
    {"unplug": 2.5}   the pty is closed (the daemon sees a hang-up) and the device path
                      removed; after that many seconds a new pty appears under the same path
    {"query": true}   nothing: just the reply with the state

The lease keeps running while unplugged: the MCU is still powered, only the UART is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import logging
import os
import random
import select
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tabletd.mcu.codec import (
    MAX_LEASE_MS,
    PROTOCOL_VERSION,
    ChargingState,
    Cut,
    Event,
    EventKind,
    Hello,
    HelloReply,
    Lease,
    Led,
    McuEncodeError,
    Ping,
    PowerOff,
    Status,
)
from tabletd.mcu.link import McuLink
from tabletd.mcu.pty import READY_PREFIX, PtyPair, open_pty

log = logging.getLogger("tabletd.mcu.sim")

MS: Final = 1_000_000
S: Final = 1_000_000_000
#: The simulated firmware's version, in HELLO_REPLY.
FIRMWARE_VERSION: Final = 0x0100
STATUS_PERIOD_NS: Final = 1 * S
STATUS_MIN_GAP_NS: Final = 100 * MS
#: How often battery, temperature and the GPIO rail file are sampled.
PHYSICS_PERIOD_NS: Final = 100 * MS
CONTROL_SOCKET: Final = "mcu-control.sock"
LEASE_FILE: Final = "mcu-lease"
LEASE_LOG: Final = "mcu-lease.log"
#: Open-circuit voltage of the cell (percent, millivolts): a typical Li-ion curve.
OCV_TABLE: Final = (
    (0, 3300), (5, 3550), (10, 3650), (20, 3700), (40, 3760),
    (60, 3860), (80, 3980), (100, 4180),
)
CHARGE_OFFSET_MV: Final = 80  # the terminal voltage rises while charging ...
LOAD_OFFSET_MV: Final = 30  # ... and sags under the tablet's load
AMBIENT_DC: Final = 250
CHARGING_WARMTH_DC: Final = 60
THERMAL_TAU_S: Final = 60.0


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def mv_from_pct(pct: float) -> float:
    """The open-circuit voltage at a state of charge (linear between table points)."""
    pct = min(100.0, max(0.0, pct))
    for (p0, v0), (p1, v1) in itertools.pairwise(OCV_TABLE):
        if pct <= p1:
            return v0 + (v1 - v0) * (pct - p0) / (p1 - p0)
    return float(OCV_TABLE[-1][1])


def pct_from_mv(mv: float) -> int:
    """The fuel gauge's percentage from an open-circuit voltage (the table inverted)."""
    if mv <= OCV_TABLE[0][1]:
        return 0
    for (p0, v0), (p1, v1) in itertools.pairwise(OCV_TABLE):
        if mv <= v1:
            return round(p0 + (p1 - p0) * (mv - v0) / (v1 - v0))
    return 100


class ControlError(ValueError):
    """A control command the simulated MCU refuses; the message says why."""


@dataclass
class Faults:
    noise: float = 0.0
    drop: float = 0.0
    delay_ns: int = 0


class SimMcu:
    """The simulated MCU's state and its single-threaded event loop (see the module doc)."""

    def __init__(
        self,
        port: Path,
        state_dir: Path,
        *,
        seed: int = 0,
        drain_pct_per_min: float = 0.5,
        charge_pct_per_min: float = 2.0,
        battery_pct: float = 80.0,
        dock_bay: int = 0,
        baud: int = 0,
        parent_fd: int | None = None,
    ) -> None:
        self.port = port
        # A pipe from the process that started us (the daemon, with [sim] mcu = true): its
        # end-of-file means that process is gone, however it died, and so must we.
        self.parent_fd = parent_fd
        # A pty passes bytes at memory speed; with a baud rate, each outgoing byte takes its
        # 10 bit times (8N1) on the "wire", one after the other, as on the real UART.
        self.baud = baud
        self._wire_free_ns = 0
        self.dir = state_dir / "sim"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)  # noqa: S311 - simulation, not secrets
        self.drain_per_ns = drain_pct_per_min / 60 / S
        self.charge_per_ns = charge_pct_per_min / 60 / S
        self.faults = Faults()

        # The world.
        self.charge_pct = float(battery_pct)
        self.docked = dock_bay > 0
        self.dock_bay = dock_bay
        self.lid_open = False
        self.charger_fault = False
        self.ambient_dc = AMBIENT_DC
        self.temperature = float(AMBIENT_DC)
        self.gpio_rail = True
        self.powered = True
        self.power_off_at: int | None = None
        self.lease_until: int | None = None

        # The wire.
        self.pty: PtyPair | None = None
        self.unplugged_until: int | None = None
        self.link = self._new_link()
        self.held_events: list[Event] = []
        self.out_queue: deque[tuple[int, bytes]] = deque()
        self.last_status_key: tuple[object, ...] | None = None
        self.last_status_ns: int | None = None
        self.status_retry_ns: int | None = None  # a change held back by the 100 ms spacing

        self.lease_fd = os.open(self.dir / LEASE_FILE,
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.lease_log = open(self.dir / LEASE_LOG, "a", encoding="ascii")  # noqa: SIM115
        self.power_fd = os.open(self.dir / "mcu-power",
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.pwrite(self.power_fd, b"on \n", 0)
        self._write_lease(False, "start")

        sock_path = self.dir / CONTROL_SOCKET
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.control.bind(str(sock_path))
        self.control.setblocking(False)

        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.stopping = False

    # ---- the lease ------------------------------------------------------------------------

    def _write_lease(self, on: bool, reason: str, at_ns: int | None = None) -> None:
        os.pwrite(self.lease_fd, b"on \n" if on else b"off\n", 0)
        stamp = at_ns if at_ns is not None else boot_ns()
        self.lease_log.write(f"{stamp} {'on' if on else 'off'} {reason}\n")
        self.lease_log.flush()

    def grant_lease(self, duration_ms: int, now: int) -> None:
        until = now + duration_ms * MS
        renewal = self.lease_until is not None
        self.lease_until = until
        if renewal:
            # Not a change of state: the file keeps its value, the log records the renewal.
            self.lease_log.write(f"{now} on renew ms={duration_ms} until={until}\n")
            self.lease_log.flush()
        else:
            self._write_lease(True, f"lease ms={duration_ms} until={until}", at_ns=now)

    def end_lease(self, reason: str) -> None:
        if self.lease_until is not None:
            self.lease_until = None
            self._write_lease(False, reason)
            log.info("lease off: %s", reason)

    def check_lease(self) -> None:
        """Lapse the lease if its time has come: the first thing after every wake-up."""
        until = self.lease_until
        if until is not None:
            now = boot_ns()
            if now >= until:
                self.lease_until = None
                os.pwrite(self.lease_fd, b"off\n", 0)
                off = boot_ns()
                self.lease_log.write(
                    f"{off} off expired until={until} late_us={(off - until) // 1000}\n")
                self.lease_log.flush()
                log.info("lease lapsed %.3f ms late", (off - until) / MS)

    # ---- the link -------------------------------------------------------------------------

    def _new_link(self) -> McuLink:
        reply = HelloReply(PROTOCOL_VERSION, FIRMWARE_VERSION, MAX_LEASE_MS)
        return McuLink("mcu", hello_reply=reply, silence_timeout_ns=None)

    def _replace_link(self, why: str) -> None:
        """A fresh link that waits for a HELLO; EVENTs not yet acknowledged are kept."""
        log.info("link reset: %s", why)
        self.held_events = [m for m in self.link.unsent_messages() if isinstance(m, Event)] + (
            self.held_events)
        self.link = self._new_link()

    def emit_event(self, kind: EventKind, bay: int = 0) -> None:
        log.info("event %s bay %d", kind.name, bay)
        self.held_events.append(Event(kind, bay))

    def status(self, now: int) -> Status:
        pct = pct_from_mv(mv_from_pct(self.charge_pct))
        remaining = 0
        if self.lease_until is not None:
            remaining = max(0, min(MAX_LEASE_MS, (self.lease_until - now) // MS))
        return Status(
            battery_mv=round(self._terminal_mv()),
            battery_pct=pct,
            charging=self._charging_state(),
            charger_fault=self.charger_fault,
            temperature_dc=round(self.temperature),
            docked=self.docked,
            dock_bay=self.dock_bay if self.docked else 0,
            rail_measured=self.lease_until is not None and self.gpio_rail,
            lease_remaining_ms=remaining,
        )

    def _status_key(self, st: Status) -> tuple[object, ...]:
        # Section 6.3: a STATUS on a change of these (the bay goes with docked).
        return (st.battery_pct, st.charging, st.charger_fault, st.docked, st.dock_bay,
                st.rail_measured)

    def _pump_messages(self, now: int, periodic: bool = False) -> None:
        """Queue held EVENTs and a STATUS (periodic, or on change) once a host said HELLO."""
        if self.link.down:
            self._replace_link(self.link.down_reason or "down")
        if not self.link.handshake_done:
            return
        for event in self.held_events:
            self.link.send(event, now)
        self.held_events.clear()
        st = self.status(now)
        key = self._status_key(st)
        if not periodic and key == self.last_status_key:
            self.status_retry_ns = None
            return
        last = self.last_status_ns
        if last is not None and now - last < STATUS_MIN_GAP_NS:
            self.status_retry_ns = last + STATUS_MIN_GAP_NS  # never two within 100 ms
            return
        self.status_retry_ns = None
        self.last_status_key = key
        self.last_status_ns = now
        self.link.send(st, now)

    def handle_message(self, message: object, now: int) -> None:
        if isinstance(message, Lease):
            if self.powered:
                self.grant_lease(message.duration_ms, now)
        elif isinstance(message, Cut):
            self.end_lease("cut")
        elif isinstance(message, PowerOff):
            self.end_lease("power_off")
            self.power_off_at = now + message.delay_s * S
            log.info("power off in %d s", message.delay_s)
        elif isinstance(message, Led):
            (self.dir / "mcu-led").write_text(f"{message.r} {message.g} {message.b}\n",
                                             encoding="ascii")
        elif isinstance(message, Hello):
            # Section 5 and 7.1 rule 6: a new host session starts with the rail off.
            log.info("HELLO from the host (protocol %d)", message.protocol)
            self.end_lease("hello")
            self.last_status_key = None  # and gets a STATUS at once
        elif isinstance(message, Ping):
            pass

    # ---- the wire -------------------------------------------------------------------------

    def plug(self) -> None:
        self.pty = open_pty()
        tmp = self.port.with_name(self.port.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.pty.slave_path)
        tmp.replace(self.port)
        self.unplugged_until = None
        log.info("pty %s published as %s", self.pty.slave_path, self.port)

    def unplug(self, seconds: float, now: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.port.unlink()
        if self.pty is not None:
            self.pty.close()
            self.pty = None
        self.out_queue.clear()
        self.unplugged_until = now + int(seconds * S)
        log.info("unplugged for %.3f s", seconds)

    def _noisy(self, data: bytes) -> bytes:
        p = self.faults.noise
        if p <= 0 or not data:
            return data
        out = bytearray()
        for byte in data:
            out.append(byte)
            if self.rng.random() < p:
                out.append(self.rng.randrange(256))
        return bytes(out)

    def _transmit(self, data: bytes, now: int) -> None:
        if not data:
            return
        if self.faults.drop > 0:
            data = bytes(b for b in data if self.rng.random() >= self.faults.drop)
        data = self._noisy(data)
        if self.pty is None or not data:
            return  # unplugged: the bytes go nowhere
        release = now + self.faults.delay_ns
        if self.out_queue:
            release = max(release, self.out_queue[-1][0])
        if self.baud:
            release = max(release, self._wire_free_ns) + len(data) * 10 * S // self.baud
            self._wire_free_ns = release
        self.out_queue.append((release, data))
        self._flush_out(now)

    def _flush_out(self, now: int) -> None:
        while self.out_queue and self.out_queue[0][0] <= now:
            _, data = self.out_queue.popleft()
            if self.pty is None:
                continue
            # Nobody reading and the pty's buffer full: the bytes are lost, as on a UART.
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self.pty.master_fd, data)

    def _read_port(self) -> None:
        assert self.pty is not None
        try:
            data = os.read(self.pty.master_fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # pragma: no cover - we hold the slave, so no EIO
            log.warning("pty read failed: %s", exc)
            return
        now = boot_ns()
        for message in self.link.receive_bytes(self._noisy(data), now):
            self.handle_message(message, now)

    # ---- control --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        st = self.status(boot_ns())
        return {
            "battery_mv": st.battery_mv, "battery_pct": st.battery_pct,
            "charging": st.charging.name.lower(), "charger_fault": st.charger_fault,
            "temperature_dc": st.temperature_dc, "docked": st.docked, "dock_bay": st.dock_bay,
            "lid": "open" if self.lid_open else "closed", "lease": self.lease_until is not None,
            "lease_remaining_ms": st.lease_remaining_ms, "rail_measured": st.rail_measured,
            "powered": self.powered, "handshake_done": self.link.handshake_done,
            "power_off_in_ms": None if self.power_off_at is None
            else max(0, (self.power_off_at - boot_ns()) // MS),
            "plugged": self.pty is not None, "noise": self.faults.noise,
            "drop": self.faults.drop, "delay_ms": self.faults.delay_ns // MS,
            "port": str(self.port),
            "link": {"sent": self.link.sent, "retransmissions": self.link.retransmissions,
                     "naks_sent": self.link.naks_sent, "delivered": self.link.delivered,
                     "bad_crcs": self.link.decoder.bad_crcs},
        }

    def apply_control(self, cmd: object, now: int) -> None:
        """Validate every key of ``cmd`` first, then apply them all; raises ControlError."""
        _validate_control(cmd)
        assert isinstance(cmd, dict)
        self._apply_control(cmd, now)

    def _apply_control(self, cmd: dict[str, Any], now: int) -> None:
        if "noise" in cmd:
            self.faults.noise = float(cmd["noise"])
        if "drop" in cmd:
            self.faults.drop = float(cmd["drop"])
        if "delay_ms" in cmd:
            self.faults.delay_ns = int(float(cmd["delay_ms"]) * MS)
        if "battery_pct" in cmd:
            self.charge_pct = float(cmd["battery_pct"])
        if "charger_fault" in cmd:
            self.charger_fault = cmd["charger_fault"]
        if "temperature_dc" in cmd:
            self.ambient_dc = self.temperature = cmd["temperature_dc"]
        if cmd.get("undock") and self.docked:
            self.emit_event(EventKind.UNDOCKED, self.dock_bay)
            self.docked, self.dock_bay = False, 0
        if "dock" in cmd and (not self.docked or self.dock_bay != cmd["dock"]):
            if self.docked:
                self.emit_event(EventKind.UNDOCKED, self.dock_bay)
            self.docked, self.dock_bay = True, cmd["dock"]
            self.emit_event(EventKind.DOCKED, self.dock_bay)
        if "lid" in cmd and (cmd["lid"] == "open") != self.lid_open:
            self.lid_open = cmd["lid"] == "open"
            self.emit_event(EventKind.LID_OPENED if self.lid_open else EventKind.LID_CLOSED)
        if cmd.get("power_button"):
            self.emit_event(EventKind.POWER_BUTTON)
            if not self.powered:
                self.powered = True
                os.pwrite(self.power_fd, b"on \n", 0)
        if "unplug" in cmd and float(cmd["unplug"]) > 0:
            self.unplug(float(cmd["unplug"]), now)

    def _serve_control(self) -> None:
        while True:
            try:
                data, addr = self.control.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            now = boot_ns()
            try:
                self.apply_control(json.loads(data), now)
                reply: dict[str, Any] = {"ok": True, "state": self.state()}
            except (ControlError, ValueError) as exc:
                reply = {"ok": False, "error": str(exc)}
                log.warning("control refused: %s", exc)
            if addr:
                with contextlib.suppress(OSError):
                    self.control.sendto(json.dumps(reply).encode(), addr)

    # ---- physics --------------------------------------------------------------------------

    def _charging_state(self) -> ChargingState:
        if not self.docked or self.charger_fault:
            return ChargingState.NOT_CHARGING
        return ChargingState.FULL if self.charge_pct >= 100 else ChargingState.CHARGING

    def _terminal_mv(self) -> float:
        offset = (CHARGE_OFFSET_MV if self._charging_state() is ChargingState.CHARGING
                  else -LOAD_OFFSET_MV if not self.docked else 0)
        return mv_from_pct(self.charge_pct) + offset

    def physics(self, dt_ns: int) -> None:
        charging = self._charging_state()
        if charging is ChargingState.CHARGING:
            self.charge_pct = min(100.0, self.charge_pct + self.charge_per_ns * dt_ns)
        elif not self.docked:
            self.charge_pct = max(0.0, self.charge_pct - self.drain_per_ns * dt_ns)
        target = self.ambient_dc + (CHARGING_WARMTH_DC if charging is ChargingState.CHARGING
                                    else 0)
        alpha = min(1.0, dt_ns / S / THERMAL_TAU_S)
        self.temperature += (target - self.temperature) * alpha + self.rng.uniform(-0.5, 0.5)
        try:
            self.gpio_rail = (self.dir / "rail").read_text(encoding="ascii").strip() == "on"
        except (FileNotFoundError, UnicodeDecodeError):
            self.gpio_rail = True

    # ---- the loop -------------------------------------------------------------------------

    def _timers(self, now: int) -> None:
        """Replug after an unplug, power off after POWER_OFF's delay."""
        if self.unplugged_until is not None and now >= self.unplugged_until:
            self.plug()
            self._replace_link("replugged")
        if self.power_off_at is not None and now >= self.power_off_at:
            self.power_off_at = None
            self.powered = False
            os.pwrite(self.power_fd, b"off\n", 0)
            log.info("tablet power off")

    def run(self) -> None:
        self.plug()
        signal.set_wakeup_fd(self.wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        sys.stdout.write(f"{READY_PREFIX}{self.port}\n")
        sys.stdout.flush()
        now = boot_ns()
        next_status = now + STATUS_PERIOD_NS
        last_physics = now
        try:
            while not self.stopping:
                self.check_lease()
                now = boot_ns()
                self._timers(now)
                for message in self.link.tick(now):
                    self.handle_message(message, now)
                periodic = now >= next_status
                if periodic:
                    next_status = max(next_status + STATUS_PERIOD_NS, now)
                if now - last_physics >= PHYSICS_PERIOD_NS:
                    self.physics(now - last_physics)
                    last_physics = now
                self._pump_messages(now, periodic)
                self._transmit(self.link.bytes_to_send(now), now)
                self._flush_out(now)

                # Sleep until the earliest of: the lease's end, the link's timer, the
                # next STATUS or physics step, delayed output, replug; or input.
                deadlines = [next_status, last_physics + PHYSICS_PERIOD_NS]
                for deadline in (self.lease_until, self.link.next_timeout_ns(),
                                 self.unplugged_until, self.power_off_at, self.status_retry_ns,
                                 self.out_queue[0][0] if self.out_queue else None):
                    if deadline is not None:
                        deadlines.append(deadline)
                timeout = max(0, min(deadlines) - boot_ns()) / S
                fds = [self.control.fileno(), self.wake_r]
                if self.parent_fd is not None:
                    fds.append(self.parent_fd)
                if self.pty is not None:
                    fds.append(self.pty.master_fd)
                ready, _, _ = select.select(fds, [], [], timeout)
                self.check_lease()
                if self.wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 512)
                if self.pty is not None and self.pty.master_fd in ready:
                    self._read_port()
                if self.control.fileno() in ready:
                    self._serve_control()
                if self.parent_fd in ready and not os.read(self.parent_fd, 512):
                    log.info("the process that started the simulated MCU is gone: exiting")
                    self.stopping = True
        finally:
            self.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def close(self) -> None:
        """Cut the lease (a stopped MCU powers nothing) and remove the published files."""
        self.lease_until = None
        self._write_lease(False, "exit")
        with contextlib.suppress(FileNotFoundError):
            self.port.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / CONTROL_SOCKET).unlink()
        if self.pty is not None:
            self.pty.close()
            self.pty = None
        self.control.close()
        self.lease_log.close()
        os.close(self.lease_fd)
        os.close(self.power_fd)


def _validate_control(cmd: object) -> None:
    if not isinstance(cmd, dict) or not cmd:
        raise ControlError("command: must be a non-empty JSON object")
    known = {"dock", "undock", "battery_pct", "lid", "power_button", "noise", "drop",
             "delay_ms", "unplug", "charger_fault", "temperature_dc", "query"}
    unknown = sorted(set(cmd) - known)
    if unknown:
        raise ControlError(f"command: unknown key(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(known))}")
    if "dock" in cmd and "undock" in cmd:
        raise ControlError("command: dock and undock together")
    if "dock" in cmd:
        _int_in("dock", cmd["dock"], 1, 255)
    for key in ("undock", "power_button", "charger_fault", "query"):
        if key in cmd and not isinstance(cmd[key], bool):
            raise ControlError(f"{key}: must be true or false, got {cmd[key]!r}")
    if "battery_pct" in cmd:
        _number_in("battery_pct", cmd["battery_pct"], 0, 100)
    if "lid" in cmd and cmd["lid"] not in ("open", "closed"):
        raise ControlError(f"lid: must be \"open\" or \"closed\", got {cmd['lid']!r}")
    for key in ("noise", "drop"):
        if key in cmd:
            _number_in(key, cmd[key], 0, 1)
    if "delay_ms" in cmd:
        _number_in("delay_ms", cmd["delay_ms"], 0, 60_000)
    if "unplug" in cmd:
        _number_in("unplug", cmd["unplug"], 0, 3600)
    if "temperature_dc" in cmd:
        _int_in("temperature_dc", cmd["temperature_dc"], -400, 1250)


def _number_in(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            low <= value <= high):
        raise ControlError(f"{key}: must be a number from {low} to {high}, got {value!r}")
    return float(value)


def _int_in(key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ControlError(f"{key}: must be an integer from {low} to {high}, got {value!r}")
    return value


# ---- the client side ------------------------------------------------------------------------


def control_path(state_dir: Path | str) -> Path:
    """Where the simulated MCU's control socket is."""
    return Path(state_dir) / "sim" / CONTROL_SOCKET


def _control(state_dir: Path | str, cmd: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("")  # Linux autobind: an abstract address the reply can come back to
        sock.settimeout(timeout_s)
        sock.sendto(json.dumps(cmd).encode(), str(control_path(state_dir)))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(
                f"simulated MCU did not answer {cmd!r} within {timeout_s} s") from None
    reply: dict[str, Any] = json.loads(data)
    if not reply.get("ok"):
        raise ControlError(f"simulated MCU refused {cmd!r}: {reply.get('error')}")
    return reply


def send_control(state_dir: Path | str, cmd: dict[str, Any], timeout_s: float = 2.0) -> None:
    """Send one control command to the simulated MCU and wait until it is applied.

    Raises :class:`ControlError` if the MCU refuses it (the message says why),
    :class:`TimeoutError` if it does not answer, ``OSError`` if it is not running.
    """
    _control(state_dir, cmd, timeout_s)


def query_state(state_dir: Path | str, timeout_s: float = 2.0) -> dict[str, Any]:
    """The simulated MCU's state, as the ``state`` of a ``{"query": true}`` reply."""
    state: dict[str, Any] = _control(state_dir, {"query": True}, timeout_s)["state"]
    return state


def lease_file_state(state_dir: Path | str) -> bool:
    """The MCU's lease as another process sees it (``<state-dir>/sim/mcu-lease``)."""
    path = Path(state_dir) / "sim" / LEASE_FILE
    return path.read_text(encoding="ascii").strip() == "on"


# ---- the process ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tabletd.mcu.sim",
        description="Simulated power/dock MCU on a pty (development and tests only).")
    parser.add_argument("--port", required=True, type=Path,
                        help="path to publish the pty slave at (a symlink)")
    parser.add_argument("--state-dir", required=True, type=Path,
                        help="the daemon's state directory; files go to <state-dir>/sim/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random faults")
    parser.add_argument("--battery-pct", type=float, default=80.0)
    parser.add_argument("--dock", type=int, default=0, metavar="BAY",
                        help="start docked in this bay (0: undocked)")
    parser.add_argument("--drain-pct-per-min", type=float, default=0.5)
    parser.add_argument("--charge-pct-per-min", type=float, default=2.0)
    parser.add_argument("--baud", type=int, default=0,
                        help="pace outgoing bytes at this UART rate, 8N1 (0: pty speed)")
    parser.add_argument("--realtime-priority", type=int, default=0, metavar="N",
                        help="run at SCHED_FIFO priority N (1-99), as firmware owns its timer; "
                        "needs CAP_SYS_NICE (0: normal scheduling)")
    parser.add_argument("--exit-with-stdin", action="store_true",
                        help="exit when stdin reaches end-of-file (the parent died)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="mcu-sim %(levelname)s %(message)s", stream=sys.stderr)
    if not 0 <= args.battery_pct <= 100:
        parser.error("--battery-pct: must be 0 to 100")
    if not 0 <= args.dock <= 255:
        parser.error("--dock: must be 0 to 255")
    if not 0 <= args.baud <= 4_000_000:
        parser.error("--baud: must be 0 to 4000000")
    if not 0 <= args.realtime_priority <= 99:
        parser.error("--realtime-priority: must be 0 to 99")
    if args.realtime_priority:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.realtime_priority))
        except PermissionError:
            log.warning("no SCHED_FIFO (needs CAP_SYS_NICE): the lease timer runs at normal "
                        "priority")
    if args.port.exists() and not args.port.is_symlink():
        parser.error(f"--port: {args.port} exists and is not a symlink: give the path where "
                     "the simulated MCU publishes its pty (it creates the symlink)")
    # One simulated MCU per state directory: a successor (a daemon restarted after SIGKILL)
    # waits here until the previous one has cut its lease and removed its files.
    (args.state_dir / "sim").mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(args.state_dir / "sim" / "mcu.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                      0o600)
    deadline = time.monotonic() + 5
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                print(f"mcu-sim: cannot start: another simulated MCU holds {args.state_dir}",
                      file=sys.stderr)
                return 1
            time.sleep(0.01)
    try:
        sim = SimMcu(args.port, args.state_dir, seed=args.seed,
                     drain_pct_per_min=args.drain_pct_per_min,
                     charge_pct_per_min=args.charge_pct_per_min,
                     battery_pct=args.battery_pct, dock_bay=args.dock, baud=args.baud,
                     parent_fd=sys.stdin.fileno() if args.exit_with_stdin else None)
    except (OSError, McuEncodeError) as exc:
        print(f"mcu-sim: cannot start: {exc}", file=sys.stderr)
        return 1
    sim.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
