"""The field self-test: ``tabletd selftest [--json]`` (issue 7; ``docs/field-guide.md``).

Theory of operation
-------------------
Each check gives a :class:`CheckResult`: pass or fail, what was measured, and on failure the
fix to try. The checks run in this order:

``storage``, ``disk_space``
    The state directory takes a write, fsync and read back; its file system is not
    read-only; ``events.sqlite`` passes SQLite's ``quick_check``; ``statvfs`` shows at least
    ``min_free_mb`` free for the daemon's user.
``clock``
    The kernel's own verdict on wall time (``adjtimex``): trusted when the state is not
    ``TIME_ERROR`` and ``STA_UNSYNC`` is clear, i.e. an NTP client (systemd-timesyncd) has
    synchronised it. This is what ``timedatectl``'s ``NTPSynchronized`` reports.
``server``
    With no daemon running: a real connection as the daemon makes it (mutual TLS with the
    device certificate, the pinned CA, subprotocol ``tabletd.v1``), ``hello``, and a
    ``welcome`` within 10 s. With the daemon running, a second connection would replace the
    daemon's on the server, so the check asks the daemon's status API whether its link is up.
``inputs``, ``backlight``, ``mcu``, ``battery``, ``rail``, ``camera``
    The hardware. These claim the pins, the UART and the camera, which the daemon owns: they
    run only while no daemon holds ``tabletd.lock``, and the self-test holds that lock
    meanwhile, so the daemon cannot start half-way. With the daemon running, each fails with
    "stop it first" (``systemctl stop tabletd``).

Powering the rail outside a call (BRIEF invariant 1) is the one thing the self-test does
that the daemon never would, so it is bounded and recorded:

- it is refused while the privacy switch is engaged or the case is open;
- a ``selftest_rail_on`` event is committed to the outbox **before** the rail is powered (if
  it cannot be, the rail is not powered), and ``selftest_rail_off`` after the cut, with the
  time it was on; the server learns of both like any other event;
- the ``rail`` check powers it only until the sense input follows (at most
  ``sense_timeout_ms``), the ``camera`` check only until the first frame (at most
  :data:`CAMERA_TIMEOUT_S`); the GPIO cut is in a ``finally``;
- with an MCU (which gates the rail in hardware: GPIO AND lease), the lease is granted first,
  confirmed by a STATUS, and ends by itself at that bound plus :data:`LEASE_MARGIN_S`, or
  ``[mcu] lease_ms`` after renewals stop (this process dies); CUT follows every cut, and the
  self-test waits for the MCU to confirm the last one before it exits.

Run as root (the engineer's shell), the files it may create in the state directory
(``tabletd.lock``, ``events.sqlite`` and its WAL) are given to the directory's owner, the
daemon's user, so that the daemon can still open them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from tabletd import __version__
from tabletd.clock import NS_PER_MS, NS_PER_S, BootClock, Clock, boot_id
from tabletd.config import Config
from tabletd.daemon import DaemonPaths, acquire_instance_lock, running_daemon_pid
from tabletd.errors import StateFileError, TabletdError
from tabletd.events import EventStore
from tabletd.hardware import Hardware, open_hardware, open_media
from tabletd.hardware.camera import MediaSource
from tabletd.link.client import SUBPROTOCOL, LinkSetupError, link_ssl_context
from tabletd.link.messages import (
    ErrorMsg,
    Hello,
    OutboxSummary,
    ProtocolError,
    Welcome,
    decode_server_message,
    encode,
)
from tabletd.mcu.client import McuClient
from tabletd.mcu.codec import ChargingState, Event, Status
from tabletd.mcu.pty import start_sim_mcu, stop_sim_mcu
from tabletd.media.frames import MediaFrame
from tabletd.persistence import StateFile, owner_when_root, write_atomically
from tabletd.session import State

CAMERA_TIMEOUT_S = 8.0  # the first frame: 5 s for the device to open, then a frame period
MCU_TIMEOUT_S = 3.0  # a STATUS comes every second; the handshake takes a few ms
SERVER_TIMEOUT_S = 10.0
# The lease outlives the check's bound by this: a lease shows only in the periodic STATUS
# (every 1 s +- 100 ms, docs/mcu-protocol.md 6.3), which must confirm it before the GPIO goes on.
LEASE_MARGIN_S = 1.5
MAX_TEMPERATURE_DC = 600  # 60 degrees C
TIME_ERROR = 5  # adjtimex(2) clock state: not synchronised
STA_UNSYNC = 0x0040


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str  # what was measured, or why the check did not run
    fix: str | None = None  # on failure: what to try


# -- the clock ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelClock:
    """What ``adjtimex(2)`` says about the wall clock."""

    state: int  # TIME_OK 0 ... TIME_ERROR 5
    status: int  # STA_* bits
    maxerror_us: int

    @property
    def trusted(self) -> bool:
        return self.state != TIME_ERROR and not self.status & STA_UNSYNC


class _Timex(ctypes.Structure):
    """``struct timex`` of <sys/timex.h> (Linux, LP64 and ILP32 alike: longs throughout)."""

    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long), ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int), ("_reserved", ctypes.c_int * 11),
    ]


def kernel_clock() -> KernelClock:
    """Read the kernel's clock discipline (modes = 0: read only, no privilege needed)."""
    tx = _Timex()
    libc = ctypes.CDLL(None, use_errno=True)
    state = libc.adjtimex(ctypes.byref(tx))
    if state < 0:
        raise OSError(ctypes.get_errno(), "adjtimex failed")
    return KernelClock(state=int(state), status=int(tx.status), maxerror_us=int(tx.maxerror))


# -- the MCU, as the self-test sees it -----------------------------------------------------


class _McuWatch:
    """The :class:`~tabletd.mcu.client.McuHost` of the self-test: remembers the STATUS."""

    def __init__(self) -> None:
        self.up = False
        self.status: Status | None = None
        self.changed = asyncio.Event()

    def mcu_link_changed(self, up: bool) -> None:
        self.up = up
        self.changed.set()

    def mcu_status(self, status: Status) -> None:
        self.status = status
        self.changed.set()

    def mcu_event(self, event: Event) -> None:
        """Dock, lid and button events mean nothing to the self-test."""

    async def until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return False
        return True


# -- the self-test --------------------------------------------------------------------------


def default_camera(cfg: Config) -> MediaSource:
    return open_media(cfg)[0]


class SelfTest:
    """``run()`` returns every check's result (see the module docstring).

    ``clock_reader`` and ``camera_factory`` are the seams for the tests: the kernel's clock
    state cannot be changed without changing the machine's, and a simulated camera that
    fails is made by the test.
    """

    def __init__(self, cfg: Config, state_dir: Path, *, min_free_mb: int = 64,
                 clock_reader: Callable[[], KernelClock] = kernel_clock,
                 camera_factory: Callable[[Config], MediaSource] = default_camera,
                 clock: Clock | None = None) -> None:
        if min_free_mb < 0:
            raise ValueError(f"min_free_mb = {min_free_mb}: must be 0 or more")
        self.cfg = cfg
        self.state_dir = state_dir
        self.paths = DaemonPaths(state_dir)
        self.min_free_mb = min_free_mb
        self.clock_reader = clock_reader
        self.camera_factory = camera_factory
        self.clock = clock or BootClock()
        self.rail_on_ms: list[float] = []  # each time the rail was powered, how long

    def run(self) -> list[CheckResult]:
        """Every check. Raises :class:`TabletdError` if SIGTERM or SIGHUP (an engineer's
        dropped session) interrupts it: the rail is cut first, in the checks' ``finally``."""
        try:
            return asyncio.run(self._run())
        except asyncio.CancelledError:
            raise TabletdError("interrupted (SIGTERM or SIGHUP): the rail was cut, the "
                               "checks not finished") from None

    async def _run(self) -> list[CheckResult]:
        task = asyncio.current_task()
        assert task is not None
        if threading.current_thread() is threading.main_thread():  # the CLI: signals go here
            for sig in (signal.SIGTERM, signal.SIGHUP):  # cancelled, so every `finally` cuts
                asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        results = [self._storage(), self._disk_space(), self._clock()]
        daemon_pid = running_daemon_pid(self.paths)
        results.append(await self._server(daemon_pid))
        if daemon_pid is not None:
            why = (f"not run: the daemon (pid {daemon_pid}) owns the hardware, and only a "
                   "live call may power the camera rail")
            fix = "systemctl stop tabletd; run the self-test again; systemctl start tabletd"
            return results + [CheckResult(name, False, why, fix) for name in HARDWARE_CHECKS]
        try:
            lock_fd = acquire_instance_lock(self.paths)
            self._give_back(self.paths.lock)
        except (TabletdError, OSError) as exc:
            fix = "stop whatever holds it (systemctl stop tabletd) and run again"
            return results + [CheckResult(name, False, f"not run: {exc}", fix)
                              for name in HARDWARE_CHECKS]
        try:
            results += await self._hardware()
        finally:
            os.close(lock_fd)
        return results

    # ---- storage, clock ------------------------------------------------------------------

    def _storage(self) -> CheckResult:
        fix = ("the data partition may be failing or full: check `dmesg` for I/O errors and "
               "`journalctl -u tabletd`; replace the SD card if errors persist")
        probe = self.state_dir / "selftest.probe"
        data = os.urandom(4096)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            if os.statvfs(self.state_dir).f_flag & os.ST_RDONLY:
                return CheckResult("storage", False, f"{self.state_dir}: mounted read-only",
                                   fix)
            write_atomically(probe, data)
            if probe.read_bytes() != data:
                return CheckResult("storage", False, f"{probe}: read back differs from what "
                                   "was written", fix)
        except OSError as exc:
            return CheckResult("storage", False, f"{self.state_dir}: {exc}", fix)
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        events = self.paths.events
        if events.exists():
            try:
                db = sqlite3.connect(f"file:{events}?mode=ro", uri=True, timeout=5.0)
                try:
                    verdict = db.execute("PRAGMA quick_check").fetchone()[0]
                finally:
                    db.close()
            except sqlite3.Error as exc:
                verdict = str(exc)
            if verdict != "ok":
                return CheckResult(
                    "storage", False, f"{events}: damaged ({verdict})",
                    f"the undelivered events in it are lost: move {events} aside (keep it "
                    "for the server team) and restart tabletd, which starts a new one")
        return CheckResult("storage", True, f"{self.state_dir}: write, fsync and read back "
                           "OK" + ("; events.sqlite intact" if events.exists() else ""))

    def _disk_space(self) -> CheckResult:
        try:
            st = os.statvfs(self.state_dir)
        except OSError as exc:
            return CheckResult("disk_space", False, f"{self.state_dir}: {exc}",
                               "is the data partition mounted?")
        free_mb = st.f_bavail * st.f_frsize // 1_000_000
        detail = f"{self.state_dir}: {free_mb} MB free (needs {self.min_free_mb} MB)"
        if free_mb < self.min_free_mb:
            return CheckResult("disk_space", False, detail,
                               "free space on the data partition: `du -sh /var/lib/tabletd/*`;"
                               " a large events.sqlite means events are not being delivered "
                               "(check the server check)")
        return CheckResult("disk_space", True, detail)

    def _clock(self) -> CheckResult:
        try:
            k = self.clock_reader()
        except OSError as exc:
            return CheckResult("clock", False, f"adjtimex: {exc}", "report this tablet")
        wall = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        if k.trusted:
            return CheckResult("clock", True, f"synchronised (max error {k.maxerror_us} us), "
                               f"wall clock {wall}")
        return CheckResult(
            "clock", False, f"NOT synchronised (adjtimex state {k.state}, STA_UNSYNC "
            f"{'set' if k.status & STA_UNSYNC else 'clear'}), wall clock {wall}",
            "the tablet has no battery clock: give it network access to an NTP server "
            "(`timedatectl timesync-status`, `journalctl -u systemd-timesyncd`)")

    # ---- the server -----------------------------------------------------------------------

    async def _server(self, daemon_pid: int | None) -> CheckResult:
        link = self.cfg.link
        if not link.url:
            return CheckResult("server", False, "no [link] url: this tablet is not provisioned",
                               "provision it (docs/field-guide.md, `tabletd provision`)")
        if daemon_pid is not None:
            return await asyncio.to_thread(self._server_via_daemon, daemon_pid)
        fix = (f"check the network and that {link.url} is reachable from here; "
               "`journalctl -u tabletd EVENT=link_failed` shows the daemon's attempts")
        try:
            tls = link_ssl_context(link)
            async with asyncio.timeout(SERVER_TIMEOUT_S), connect(
                link.url, ssl=tls, subprotocols=[SUBPROTOCOL], proxy=None,
                open_timeout=SERVER_TIMEOUT_S, close_timeout=2,
            ) as ws:
                t0 = self.clock.boot_ns()
                await ws.send(encode(self._hello()))
                answer = decode_server_message(await ws.recv())
                rtt_ms = (self.clock.boot_ns() - t0) / NS_PER_MS
        except LinkSetupError as exc:
            return CheckResult("server", False, str(exc), "re-provision the tablet (its "
                               "identity files are missing or damaged): docs/field-guide.md")
        except ssl.SSLError as exc:
            return CheckResult("server", False, f"{link.url}: TLS handshake failed: {exc}",
                               "the server's certificate must chain to [link] ca_file and the "
                               "clock must be right (see the clock check); the device "
                               "certificate may have been revoked or replaced: re-provision")
        except TimeoutError:
            return CheckResult("server", False, f"{link.url}: no welcome within "
                               f"{SERVER_TIMEOUT_S:g} s", fix)
        except (OSError, WebSocketException, ProtocolError) as exc:
            return CheckResult("server", False, f"{link.url}: {type(exc).__name__}: {exc}",
                               fix)
        if isinstance(answer, ErrorMsg):
            return CheckResult("server", False, f"{link.url}: the server refused this tablet: "
                               f"{answer.code}: {answer.detail}",
                               "the server does not know this device id or certificate: "
                               "re-provision it")
        if not isinstance(answer, Welcome):
            return CheckResult("server", False, f"{link.url}: expected welcome, got "
                               f"{type(answer).__name__}", fix)
        return CheckResult("server", True, f"{link.url}: TLS and hello/welcome OK "
                           f"({rtt_ms:.0f} ms)")

    def _server_via_daemon(self, pid: int) -> CheckResult:
        from tabletd.cli import fetch_status

        try:
            up = bool(fetch_status(self.cfg)["link"]["connected"])
        except (OSError, KeyError, TypeError, ValueError) as exc:
            return CheckResult("server", False, f"the daemon (pid {pid}) did not answer on "
                               f"its status API: {exc}", "journalctl -u tabletd")
        if up:
            return CheckResult("server", True, f"the running daemon's link to "
                               f"{self.cfg.link.url} is up")
        return CheckResult("server", False, f"the running daemon's link to "
                           f"{self.cfg.link.url} is down",
                           "journalctl -u tabletd EVENT=link_failed says why")

    def _hello(self) -> Hello:
        locked = False
        with contextlib.suppress(StateFileError):
            loaded = StateFile(self.state_dir).load()
            locked = loaded is not None and loaded[1].state in (State.LOCKED, State.FAULT)
        return Hello(device_id=self.cfg.device.id, software=f"{__version__} selftest",
                     boot_id=boot_id(), session=None, locked=locked,
                     outbox=OutboxSummary(pending=0, oldest_seq=None))

    # ---- the hardware -----------------------------------------------------------------------

    async def _hardware(self) -> list[CheckResult]:
        try:
            hw = open_hardware(self.cfg, self.state_dir)
        except TabletdError as exc:
            return [CheckResult(name, False, f"not run: {exc}", "check the GPIO wiring and "
                                "that nothing else claims the pins") for name in HARDWARE_CHECKS]
        watch = _McuWatch()
        mcu_cfg, sim_mcu = self.cfg.mcu, None
        if self.cfg.hardware.backend == "sim" and self.cfg.sim.mcu:  # as the daemon does
            sim_mcu, port = await asyncio.to_thread(  # its log would interleave the table
                start_sim_mcu, self.state_dir, tied=True, stderr=subprocess.DEVNULL)
            mcu_cfg = dataclasses.replace(mcu_cfg, port=port)
        mcu = McuClient(mcu_cfg, watch, self.clock) if mcu_cfg.port else None
        mcu_task = asyncio.create_task(mcu.run(), name="selftest-mcu") if mcu else None
        try:
            results = [self._inputs(hw), self._backlight(hw)]
            results += await self._mcu(watch, mcu)
            leased = (mcu, watch) if mcu is not None and watch.up else None
            results.append(await self._rail(hw, leased))
            results.append(await self._camera(hw, leased))
            return results
        finally:
            hw.close()  # the rail off first
            if mcu is not None and watch.up:  # the last CUT reaches the MCU before we go
                watch.status = None
                mcu.lease(None)
                await watch.until(lambda: bool(watch.status
                                               and not watch.status.lease_remaining_ms),
                                  MCU_TIMEOUT_S)
            if mcu_task is not None:
                mcu_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await mcu_task
            if sim_mcu is not None:
                stop_sim_mcu(sim_mcu)

    def _inputs(self, hw: Hardware) -> CheckResult:
        g = self.cfg.gpio
        privacy, tamper = hw.privacy.active, hw.tamper.active
        detail = (f"privacy switch (GPIO{g.privacy}) {'ENGAGED' if privacy else 'open'}, "
                  f"case (tamper GPIO{g.tamper}) {'OPEN' if tamper else 'closed'}")
        fixes = []
        if privacy:
            fixes.append("open the privacy switch (while engaged, the camera is forbidden)")
        if tamper:
            fixes.append("close the case; if it is closed, check the tamper switch and its "
                         "wiring")
        return CheckResult("inputs", not fixes, detail, "; ".join(fixes) or None)

    def _backlight(self, hw: Hardware) -> CheckResult:
        bl = hw.backlight
        if bl.path is None:
            return CheckResult("backlight", False, "no /sys/class/backlight/*/bl_power",
                               "check the display cable and its overlay in config.txt, or set "
                               "[backlight] path")
        before = bl.on
        try:
            bl.set(True)
            lit = bl.on
            if before is False:
                bl.set(False)
        except TabletdError as exc:
            return CheckResult("backlight", False, str(exc), "check [backlight] path")
        if not lit:
            return CheckResult("backlight", False, f"{bl.path}: wrote on, read back "
                               f"{'nothing' if lit is None else 'off'}", "check the display")
        return CheckResult("backlight", True, f"{bl.path}: switched on and read back")

    async def _mcu(self, watch: _McuWatch, mcu: McuClient | None) -> list[CheckResult]:
        if mcu is None:
            why = "no MCU: [mcu] port is empty"
            fix = ("set [mcu] port (the reference board: /dev/serial0; simulated board: "
                   "[sim] mcu = true)")
            return [CheckResult("mcu", False, why, fix),
                    CheckResult("battery", False, f"not run: {why}", fix)]
        if not await watch.until(lambda: watch.up and watch.status is not None,
                                 MCU_TIMEOUT_S):
            why = (f"no handshake and STATUS from the MCU on {mcu.cfg.port} within "
                   f"{MCU_TIMEOUT_S:g} s")
            fix = ("check that the MCU is powered and its UART wired to the board; "
                   "`journalctl -u tabletd EVENT=mcu_link_failed`")
            return [CheckResult("mcu", False, why, fix),
                    CheckResult("battery", False, "not run: no STATUS from the MCU", fix)]
        return [await self._lease(watch, mcu), self._battery(watch)]

    async def _lease(self, watch: _McuWatch, mcu: McuClient) -> CheckResult:
        """A short lease, seen running in STATUS, then CUT and seen ended. The GPIO stays
        off meanwhile, so the rail is not powered."""
        watch.status = None  # only a STATUS sent after the LEASE counts
        mcu.lease(self.clock.boot_ns() + 2 * NS_PER_S)
        leased = await watch.until(lambda: bool(watch.status and watch.status.lease_remaining_ms),
                                   MCU_TIMEOUT_S)
        watch.status = None
        mcu.lease(None)
        cut = await watch.until(
            lambda: bool(watch.status and not watch.status.lease_remaining_ms), MCU_TIMEOUT_S)
        if leased and cut:
            return CheckResult("mcu", True, f"{mcu.cfg.port}: link up, lease granted "
                               "then cut, as STATUS reported")
        return CheckResult("mcu", False, f"{mcu.cfg.port}: the MCU's STATUS did not show "
                           f"the lease {'end after CUT' if leased else 'start'}",
                           "the MCU firmware may be outdated: check its version "
                           "(docs/mcu-protocol.md)")

    def _battery(self, watch: _McuWatch) -> CheckResult:
        st = watch.status
        assert st is not None
        charging = st.charging is not ChargingState.NOT_CHARGING
        detail = (f"{st.battery_pct}% ({st.battery_mv} mV), {st.charging.name.lower()}, "
                  f"{st.temperature_dc / 10:.1f} C" + (", CHARGER FAULT" if st.charger_fault
                                                        else ""))
        if st.charger_fault:
            return CheckResult("battery", False, detail, "check the dock contacts and the "
                               "charger; replace the battery if the fault persists")
        if st.temperature_dc > MAX_TEMPERATURE_DC:
            return CheckResult("battery", False, detail, "let the tablet cool down; replace "
                               "the battery if it stays hot")
        if st.battery_pct < self.cfg.power.low_battery_pct and not charging:
            return CheckResult("battery", False, detail, "dock the tablet to charge it")
        return CheckResult("battery", True, detail)

    async def _rail(self, hw: Hardware, mcu: _Leased) -> CheckResult:
        g = self.cfg.gpio
        if hw.privacy.active or hw.tamper.active:
            return CheckResult("rail", False, "not run: the privacy switch is engaged or the "
                               "case is open", "see the inputs check")
        if hw.rail.sensed:
            return CheckResult("rail", False, f"sense GPIO{g.rail_sense} reads ON while the "
                               "rail is commanded off", "the rail switch or its sense line is "
                               "stuck: report this tablet (do not use it)")
        limit_s = g.sense_timeout_ms / 1000
        try:
            async with self._powered(hw, mcu, "rail", limit_s):
                # on this thread, blocking the loop for at most limit_s: the shortest rail
                # time (the lease was confirmed and outlives it; nothing to renew meanwhile)
                came_on = _poll(lambda: hw.rail.sensed, limit_s)
        except TabletdError as exc:
            return CheckResult("rail", False, f"not run: {exc}", "see the storage check")
        went_off = _poll(lambda: not hw.rail.sensed, limit_s)
        detail = (f"sense GPIO{g.rail_sense} {'followed' if came_on else 'did NOT follow'} "
                  f"on, {'followed' if went_off else 'did NOT follow'} off (within "
                  f"{g.sense_timeout_ms} ms); rail powered {self.rail_on_ms[-1]:.1f} ms")
        if came_on and went_off:
            return CheckResult("rail", True, detail)
        return CheckResult("rail", False, detail, "the rail switch, its sense line or the "
                           f"GPIO{g.rail_enable}/GPIO{g.rail_sense} wiring is faulty: report "
                           "this tablet (do not use it)")

    async def _camera(self, hw: Hardware, mcu: _Leased) -> CheckResult:
        if hw.privacy.active or hw.tamper.active:
            return CheckResult("camera", False, "not run: the privacy switch is engaged or the "
                               "case is open", "see the inputs check")
        camera = self.camera_factory(self.cfg)
        got = threading.Event()
        frames: list[int] = []

        def on_frame(frame: MediaFrame) -> None:
            frames.append(len(frame.payload))
            got.set()

        started = False
        try:
            try:
                async with self._powered(hw, mcu, "camera", CAMERA_TIMEOUT_S):
                    if not await asyncio.to_thread(_poll, lambda: hw.rail.sensed,
                                                   self.cfg.gpio.sense_timeout_ms / 1000):
                        return CheckResult("camera", False, "not run: the rail did not come "
                                           "on", "see the rail check")
                    camera.start(on_frame)
                    started = True
                    await asyncio.to_thread(
                        _wait_frame, got, lambda: camera.health.fault is not None,
                        CAMERA_TIMEOUT_S)
            finally:
                if started:  # after the cut, as MediaSource.stop expects (as the daemon does)
                    camera.stop()
        except TabletdError as exc:
            return CheckResult("camera", False, f"not run: {exc}", "see the storage check")
        fault = camera.health.fault
        if frames:
            return CheckResult("camera", True, f"first frame ({frames[0]} bytes) after the rail "
                               f"came on; rail powered {self.rail_on_ms[-1]:.0f} ms")
        return CheckResult("camera", False, f"no frame within {CAMERA_TIMEOUT_S:g} s"
                           + (f": {fault}" if fault else ""),
                           "check the camera's ribbon cable (CSI) and `rpicam-hello "
                           "--list-cameras`; journalctl -u tabletd EVENT=media_fault")

    @contextlib.asynccontextmanager
    async def _powered(self, hw: Hardware, mcu: _Leased, check: str,
                       limit_s: float) -> AsyncIterator[None]:
        """The rail on for the body, cut in a ``finally``; recorded before and after. With
        an MCU, its lease is granted first (seen in STATUS) and ends by itself at most
        ``limit_s`` + :data:`LEASE_MARGIN_S` later, or ``[mcu] lease_ms`` after this
        process stops renewing it. Raises :class:`TabletdError`, the rail untouched, if the
        audit event cannot be committed or the MCU does not grant the lease."""
        store = self._audit_store()
        try:
            limit_ms = int(limit_s * 1000) + 1
            if mcu is not None:
                client, watch = mcu
                watch.status = None  # only a STATUS sent after the LEASE confirms it
                client.lease(self.clock.boot_ns() + int((limit_s + LEASE_MARGIN_S) * NS_PER_S))
                if not await watch.until(
                        lambda: bool(watch.status and watch.status.lease_remaining_ms),
                        MCU_TIMEOUT_S):
                    client.lease(None)
                    raise TabletdError("the MCU did not grant the rail lease")
            self._record(store, "selftest_rail_on", {"check": check, "limit_ms": limit_ms})
            on_ns = self.clock.boot_ns()
            try:
                hw.rail.drive(True)
                yield
            finally:
                hw.rail.drive(False)
                off_ns = self.clock.boot_ns()
                if mcu is not None:
                    mcu[0].lease(None)
                self.rail_on_ms.append((off_ns - on_ns) / NS_PER_MS)
                self._record(store, "selftest_rail_off", {
                    "check": check, "on_ms": round(self.rail_on_ms[-1], 3),
                    "sense_on_after_cut": hw.rail.sensed})
        finally:
            store.close()
            events = self.paths.events
            self._give_back(events, Path(f"{events}-wal"), Path(f"{events}-shm"))

    def _give_back(self, *paths: Path) -> None:
        """Run as root, files created here go to the state directory's owner (the daemon's
        user), or the daemon could no longer open its own lock and outbox."""
        owner = owner_when_root(self.state_dir)
        if owner is None:
            return
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, *owner)

    def _audit_store(self) -> EventStore:
        try:
            return EventStore(self.paths.events)
        except (sqlite3.Error, OSError) as exc:
            raise TabletdError(f"{self.paths.events}: cannot record the audit event, so the "
                               f"rail stays off: {exc}") from exc

    def _record(self, store: EventStore, kind: str, fields: dict[str, Any]) -> None:
        try:
            store.append(kind, fields, boot=boot_id(), boot_ns=self.clock.boot_ns())
        except sqlite3.Error as exc:
            raise TabletdError(f"{self.paths.events}: cannot record {kind}, so the rail "
                               f"stays off: {exc}") from exc


_Leased = tuple[McuClient, _McuWatch] | None  # the MCU whose lease the rail needs, if any
HARDWARE_CHECKS = ("inputs", "backlight", "mcu", "battery", "rail", "camera")


def _poll(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll a hardware level every 0.5 ms for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)
    return True


def _wait_frame(got: threading.Event, failed: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not got.wait(0.05) and not failed() and time.monotonic() < deadline:
        pass


# -- output -----------------------------------------------------------------------------------


def render_table(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  result  detail"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {'PASS' if r.ok else 'FAIL':<6}  {r.detail}")
        if r.fix:
            lines.append(f"{'':<{width}}  fix:    {r.fix}")
    failed = [r.name for r in results if not r.ok]
    lines.append("")
    lines.append(f"FAILED: {', '.join(failed)}" if failed
                 else f"all {len(results)} checks passed")
    return "\n".join(lines)


def render_json(results: list[CheckResult]) -> str:
    return json.dumps({"ok": all(r.ok for r in results),
                       "checks": [asdict(r) for r in results]}, sort_keys=True)
