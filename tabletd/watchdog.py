"""Enforcement layers that do not depend on the asyncio loop (BRIEF invariant 3).

Layer (a) is the session machine on the loop. This module holds the rest that live inside
the daemon process:

* :class:`RailGuard` - the only owner of the rail-enable line, and layer (b): a thread of its
  own, independent of the event loop, that cuts the rail at the instant the last ``RailOn``
  allowed, and checks in closed loop that the sense input follows the enable line. Cutting
  is idempotent, so whichever of the loop and the thread comes first wins and the other is a
  no-op: a blocked loop can never extend a call.
* :class:`SystemdWatchdog` - layer (c): WATCHDOG=1 at half of WATCHDOG_USEC, sent *from the
  loop*, so a blocked loop stops petting and systemd kills and restarts the daemon, after
  which ``ExecStopPost=tabletd cutoff`` (layer e) and the start-up cut hold the rail off.
* :class:`DeviceWatchdog` - layer (d): ``/dev/watchdog`` petted from the loop; if the whole
  system hangs the SoC resets, and the hardware pull-down holds the rail off.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tabletd.clock import NS_PER_MS, NS_PER_S, Clock
from tabletd.errors import HardwareError
from tabletd.hardware.rail import KillSwitch

# The two sense mismatches, the fault's detail (the screen maps each to its code: tabletd.ui).
SENSE_READS_ON = "rail sense reads on while the rail is commanded off"
SENSE_READS_OFF = "rail sense reads off while the rail is commanded on"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CutRecord:
    """One transition of the rail to off: when, why, by which layer, and when it was due."""

    at_ns: int
    reason: str
    by: str  # "thread" | "loop" | "inhibit" | "fault" | "stop"
    due_ns: int | None = None

    @property
    def lateness_ns(self) -> int | None:
        return None if self.due_ns is None else self.at_ns - self.due_ns


class RailGuard:
    """Thread-safe owner of the rail; runs the enforcement thread.

    ``on_fault(detail)`` and ``on_cut(record)`` are called from the guard's thread (or
    whichever thread cut): they must only hand over, e.g. with ``call_soon_threadsafe``.
    """

    def __init__(
        self,
        rail: KillSwitch,
        clock: Clock,
        *,
        sense_timeout_ms: int = 50,
        sense_poll_ms: int = 500,
        realtime_priority: int = 0,
        on_fault: Callable[[str], None] | None = None,
        on_cut: Callable[[CutRecord], None] | None = None,
    ) -> None:
        self._rail = rail
        self._clock = clock
        self._sense_timeout_ns = sense_timeout_ms * NS_PER_MS
        self._sense_poll_ns = sense_poll_ms * NS_PER_MS
        self._priority = realtime_priority
        self._on_fault = on_fault
        self._on_cut = on_cut
        self._cond = threading.Condition(threading.Lock())
        self._until: int | None = None
        self._until_cause = "deadline"
        self._inhibits: set[str] = set()
        self._fault: str | None = None
        self._check_at: int | None = None
        self._last_cut: CutRecord | None = None
        self._power_asked_ns = 0  # when power() was last called, granted or not
        self._stopping = False
        self._checked_once = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rail-enforcer", daemon=True)
        # Fail closed (invariant 4): off before anything else, confirmed by the first check.
        rail.drive(False)
        self._check_at = clock.boot_ns() + self._sense_timeout_ns

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_first_check(self, timeout_s: float) -> str | None:
        """Block until the start-up sense check ran; returns the fault, if any."""
        if not self._checked_once.wait(timeout_s):
            raise HardwareError("rail enforcement thread did not start")
        return self._fault

    def stop(self) -> CutRecord | None:
        """Cut, then stop the thread. Idempotent."""
        with self._cond:
            record = self._cut_locked("daemon_stop", None, "stop")
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)
        return record

    # ---- commands ------------------------------------------------------------------------

    def power(self, until_ns: int, cause: str = "deadline") -> bool:
        """Power the rail until ``until_ns`` (CLOCK_BOOTTIME), when the thread cuts with
        reason ``cause``. Returns False, rail off, when refused: past ``until``, inhibited,
        faulted or stopping."""
        with self._cond:
            now = self._clock.boot_ns()
            self._power_asked_ns = now
            if self._fault or self._inhibits or self._stopping or now >= until_ns:
                return False
            self._until = until_ns
            self._until_cause = cause
            if not self._rail.commanded:
                self._rail.drive(True)
                self._check_at = now + self._sense_timeout_ns
            self._cond.notify_all()
            return True

    def cut(self, reason: str, due_ns: int | None = None) -> CutRecord | None:
        """Cut the rail now (idempotent). Returns the record of the cut that turned it off,
        which may be an earlier one (the thread's, at the deadline); None if it never was on."""
        with self._cond:
            return self._cut_locked(reason, due_ns, "loop")

    def inhibit(self, name: str) -> None:
        """Cut at once and refuse power until :meth:`release` (privacy, tamper): this path
        does not wait for the loop."""
        with self._cond:
            self._inhibits.add(name)
            self._cut_locked(name, None, "inhibit")

    def release(self, name: str) -> None:
        with self._cond:
            self._inhibits.discard(name)

    def clear_fault(self) -> bool:
        """Clear a latched fault if the sense now agrees (rail off, sense off)."""
        with self._cond:
            if self._rail.commanded or self._rail.sensed:
                return False
            self._fault = None
            return True

    # ---- views ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the enforcement thread died: the daemon must stop petting systemd."""
        return self._thread.is_alive()

    @property
    def rail_on(self) -> bool:
        with self._cond:  # consistent with last_cut: a cut and its record go together
            return self._rail.commanded

    @property
    def until_ns(self) -> int | None:
        return self._until

    @property
    def fault(self) -> str | None:
        return self._fault

    @property
    def last_cut(self) -> CutRecord | None:
        return self._last_cut

    # ---- internals ----------------------------------------------------------------------

    def _cut_locked(self, reason: str, due_ns: int | None, by: str) -> CutRecord | None:
        self._until = None
        if not self._rail.commanded:
            # Already off: the cut that did it, if it happened since power was last asked
            # for (else the rail was never on for this call: no record to attach to it).
            last = self._last_cut
            return last if last is not None and last.at_ns >= self._power_asked_ns else None
        self._rail.drive(False)
        now = self._clock.boot_ns()
        record = CutRecord(now, reason, by, due_ns)
        self._last_cut = record
        self._check_at = now + self._sense_timeout_ns
        self._cond.notify_all()
        if self._on_cut is not None:
            self._on_cut(record)
        return record

    def _check_sense_locked(self) -> str | None:
        commanded, sensed = self._rail.commanded, self._rail.sensed
        self._check_at = None
        if commanded == sensed or self._fault is not None:
            return None
        detail = SENSE_READS_ON if sensed else SENSE_READS_OFF  # commanded is the other
        self._fault = detail
        self._cut_locked("fault", None, "fault")
        return detail

    def _run(self) -> None:
        _raise_priority(self._priority)
        next_poll = self._clock.boot_ns() + self._sense_poll_ns
        while True:
            fault = None
            with self._cond:
                if self._stopping:
                    return
                now = self._clock.boot_ns()
                if self._until is not None and now >= self._until:
                    self._cut_locked(self._until_cause, self._until, "thread")
                if self._check_at is not None and now >= self._check_at:
                    fault = self._check_sense_locked()
                    self._checked_once.set()
                elif now >= next_poll:
                    fault = self._check_sense_locked()
                    next_poll = now + self._sense_poll_ns
                wake = min(
                    t for t in (self._until, self._check_at, next_poll) if t is not None
                )
                if fault is None:
                    self._cond.wait(timeout=max(0, wake - now) / NS_PER_S)
            if fault is not None:
                log.critical("rail fault: %s", fault, extra={"EVENT": "fault"})
                if self._on_fault is not None:
                    self._on_fault(fault)


def _raise_priority(priority: int) -> None:
    """SCHED_FIFO for the calling thread, so a busy machine cannot delay the cut."""
    if priority <= 0:
        return
    try:
        # pid 0 is the calling thread on Linux, not the whole process.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:
        log.warning("enforcement thread stays at normal priority (SCHED_FIFO %d: %s)",
                    priority, exc.strerror)


class SystemdWatchdog:
    """Reads WATCHDOG_USEC / WATCHDOG_PID; ``interval_s`` is None when systemd asked for none."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.interval_s = int(usec) / 2_000_000


WDIOC_SETTIMEOUT = 0xC0045706  # _IOWR('W', 6, int)


class DeviceWatchdog:
    """``/dev/watchdog``: opened (which arms it), petted, and disarmed by the magic close on
    an orderly stop only. Raises :class:`HardwareError` naming the device if it cannot open."""

    def __init__(self, path: str, timeout_s: int) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise HardwareError(f"watchdog {path}: cannot open: {exc.strerror}") from exc
        if stat.S_ISCHR(os.fstat(self._fd).st_mode):
            try:
                fcntl.ioctl(self._fd, WDIOC_SETTIMEOUT, struct.pack("i", timeout_s))
            except OSError as exc:
                log.warning("watchdog %s: cannot set timeout %d s: %s", path, timeout_s,
                            exc.strerror)

    def pet(self) -> None:
        os.write(self._fd, b"\0")

    def close(self, *, disarm: bool) -> None:
        """``disarm`` writes the magic 'V' first: only on an orderly stop."""
        with contextlib.suppress(OSError):
            if disarm:
                os.write(self._fd, b"V")
            os.close(self._fd)
