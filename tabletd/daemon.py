"""The I/O shell around the session machine: hardware, enforcement, persistence, systemd.

Start-up order is the fail-closed order (BRIEF invariant 4): claim the rail and drive it off;
start the enforcement thread and wait for its first sense check; restore persisted state;
read the switches; only then serve status and send READY=1.

One ``asyncio.TaskGroup`` owns every task. Inputs from other threads (switch callbacks, the
enforcement thread) arrive through :meth:`Daemon.submit`, which is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from tabletd import __version__
from tabletd.clock import NS_PER_MS, NS_PER_S, BootClock, Clock, boot_id
from tabletd.config import Config
from tabletd.errors import HardwareError, StateFileError, TabletdError
from tabletd.events import EventStore
from tabletd.hardware import Hardware, open_hardware, open_media
from tabletd.hardware.camera import MediaSource
from tabletd.link import messages as msgs
from tabletd.link.client import LinkClient
from tabletd.link.grants import (
    ClockMapping,
    GrantBody,
    GrantRefused,
    GrantVerifier,
    NonceStore,
    NonceStoreError,
    load_public_key,
)
from tabletd.mcu.client import McuClient
from tabletd.mcu.codec import Event as McuEvent
from tabletd.mcu.codec import EventKind as McuEventKind
from tabletd.mcu.codec import Status as McuStatus
from tabletd.mcu.pty import start_sim_mcu, stop_sim_mcu
from tabletd.media.frames import MediaFrame, Stream, encode_frame
from tabletd.media.uplink import UplinkQueue
from tabletd.persistence import StateFile
from tabletd.power import Critical, PowerMonitor
from tabletd.sdnotify import Notifier
from tabletd.session import (
    Action,
    BatteryChanged,
    DockChanged,
    EndByServer,
    GrantReceived,
    Input,
    LinkChanged,
    LockRequested,
    MediaFailed,
    Persist,
    Policy,
    PrivacyChanged,
    RailFaultDetected,
    RailOff,
    RailOn,
    Record,
    SessionMachine,
    SetBacklight,
    SetLed,
    ShowScreen,
    StartCall,
    State,
    TamperChanged,
    Tick,
    UnlockRequested,
)
from tabletd.statusapi import StatusHub, StatusServer
from tabletd.ui import fault_code
from tabletd.watchdog import CutRecord, DeviceWatchdog, RailGuard, SystemdWatchdog

log = logging.getLogger(__name__)

# A GIL-holding busy loop gives the enforcement thread the interpreter after at most this
# long (CPython's default is 5 ms, the whole p99 budget of invariant 3).
SWITCH_INTERVAL_S = 0.0005
FLUSH_POLL_S = 0.05  # the orderly power-off checks this often whether the outbox is empty

LOCK_NAME = "tabletd.lock"


@dataclass(frozen=True)
class DaemonPaths:
    state_dir: Path

    @property
    def lock(self) -> Path:
        return self.state_dir / LOCK_NAME

    @property
    def events(self) -> Path:
        return self.state_dir / "events.sqlite"


def acquire_instance_lock(paths: DaemonPaths) -> int:
    """Hold ``tabletd.lock`` (flock) for the daemon's lifetime, with our pid in it.

    Raises :class:`TabletdError` if another daemon holds it: two daemons must never drive
    one rail.
    """
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TabletdError(f"another tabletd holds {paths.lock}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def running_daemon_pid(paths: DaemonPaths) -> int | None:
    """The pid of the daemon holding the instance lock, or None if none does."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise TabletdError(f"{paths.lock}: {exc.strerror} (run as the tabletd user or root)"
                           ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class Daemon:
    """One tablet's daemon. ``run()`` returns the process exit code."""

    def __init__(
        self,
        cfg: Config,
        state_dir: Path,
        *,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.paths = DaemonPaths(state_dir)
        self.clock = clock or BootClock()
        self.notifier = notifier or Notifier(environ)
        self.environ = dict(os.environ if environ is None else environ)
        self.boot = boot_id()
        self.machine = SessionMachine(Policy(
            device_id=cfg.device.id,
            link_grace_ns=int(cfg.session.link_grace_s * NS_PER_S),
            calls_while_docked=cfg.session.calls_while_docked,
        ))
        self.hub: StatusHub | None = None
        self.hardware: Hardware | None = None
        self.guard: RailGuard | None = None
        self.store: EventStore | None = None
        self.state_file = StateFile(state_dir)
        self.status_server: StatusServer | None = None
        self.ready = asyncio.Event()
        self._queue: asyncio.Queue[Input] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._status_line = ""
        self._device_watchdog: DeviceWatchdog | None = None
        self._previous_sigusr1: Any = None
        self.link: LinkClient | None = None
        self.mcu: McuClient | None = None
        self._mcu_status: McuStatus | None = None
        self._sim_mcu: subprocess.Popen[bytes] | None = None
        self.power = PowerMonitor(cfg.power)
        self._power_off: asyncio.Task[None] | None = None  # the one orderly power-off
        self._verifier: GrantVerifier | None = None
        self._nonces: NonceStore | None = None
        self._mapping: ClockMapping | None = None
        self._accepted_body: GrantBody | None = None  # a re-sent identical grant is no replay
        self._camera: MediaSource | None = None
        self._microphone: MediaSource | None = None
        self._media_running = False
        self._media_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="media")
        self.on_action: Callable[[Action, int], None] | None = None  # observers (the demo)

    # ---- thread-safe entry points ------------------------------------------------------

    def submit(self, inp: Input) -> None:
        """Queue an input for the session machine; callable from any thread."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("daemon not running")
        loop.call_soon_threadsafe(self._queue.put_nowait, inp)

    def request_stop(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._stop.set)

    # ---- main ---------------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.paths.state_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = acquire_instance_lock(self.paths)
        self.notifier.send(STATUS="starting: cutting the camera rail")
        try:
            await self._start()
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._core(), name="core")
                    tg.create_task(self._pet_watchdogs(), name="watchdogs")
                    assert self.status_server is not None
                    tg.create_task(self.status_server.serve_forever(), name="status-api")
                    tg.create_task(self._until_stopped(), name="stop")
                    if self.link is not None:
                        tg.create_task(self.link.run(), name="link")
                    if self.mcu is not None:
                        tg.create_task(self.mcu.run(), name="mcu")
            except* _Stopped:
                pass
            return 0
        finally:
            self._shutdown()
            os.close(lock_fd)

    async def _start(self) -> None:
        cfg = self.cfg
        self.hardware = hw = open_hardware(cfg, self.paths.state_dir)
        self.guard = guard = RailGuard(
            hw.rail, self.clock,
            sense_timeout_ms=cfg.gpio.sense_timeout_ms,
            sense_poll_ms=cfg.gpio.sense_poll_ms,
            realtime_priority=cfg.enforcement.realtime_priority,
            on_fault=lambda detail: self.submit(RailFaultDetected(detail)),
            on_cut=self._cut_from_any_thread,
        )
        guard.start()
        self.store = EventStore(self.paths.events)
        if cfg.link.url:
            try:
                self._nonces = NonceStore(self.paths.state_dir)
            except NonceStoreError as exc:
                # Without the replay set any old grant could be replayed (invariant 5): run,
                # report, and refuse every grant until an engineer repairs it.
                log.critical("%s: every grant will be refused", exc,
                             extra={"EVENT": "nonce_store_corrupt"})
                self._record("nonce_store_corrupt", {"detail": str(exc)[:512]})
            else:
                self._verifier = GrantVerifier(load_public_key(cfg.link.grant_public_key),
                                               cfg.device.id, self._nonces)
            self.link = LinkClient(cfg.link, self, self.store, self.clock,
                                   uplink=UplinkQueue(cfg.media.uplink_max_bytes))
            self._camera, self._microphone = open_media(cfg)
        if cfg.hardware.backend == "sim" and cfg.sim.mcu:
            self._sim_mcu, port = await asyncio.to_thread(
                start_sim_mcu, self.paths.state_dir, tied=True)
            self.mcu = McuClient(dataclasses.replace(cfg.mcu, port=port), self, self.clock)
        elif cfg.mcu.port:
            self.mcu = McuClient(cfg.mcu, self, self.clock)
        fault = await asyncio.to_thread(guard.wait_first_check, 2.0)
        self._restore()
        if fault is not None:
            self._handle(RailFaultDetected(fault))
        # The switches' positions at start go straight in (not queued): READY's status
        # must already show them. Later changes come from gpiozero's thread.
        self._inhibit("privacy", hw.privacy.active)
        self._inhibit("tamper", hw.tamper.active)
        self._handle(PrivacyChanged(hw.privacy.active))
        self._handle(TamperChanged(hw.tamper.active))
        hw.privacy.on_change(self._privacy_changed)
        hw.tamper.on_change(self._tamper_changed)
        self._handle(LinkChanged(False))  # until the link's welcome says otherwise
        if cfg.watchdog.device:  # opened (armed) only once everything else is up
            self._device_watchdog = DeviceWatchdog(cfg.watchdog.device, cfg.watchdog.timeout_s)
        self.hub = StatusHub(self.status)
        self.status_server = StatusServer(self.hub, cfg.status_api.host, cfg.status_api.port)
        await self.status_server.start()
        self._previous_sigusr1 = signal.signal(signal.SIGUSR1, self._on_sigusr1)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.ready.set()
        self._update_status_line(force=True, ready=True)
        # READY goes out with the rail off; only then may the (simulated) board's own
        # inputs, standing in for the server, reach the machine.
        for inp in hw.scripted_inputs(self.clock.boot_ns(), self.boot):
            self.submit(inp)
        log.info("ready: tabletd %s, device %s, %s, status API on %s:%d", __version__,
                 cfg.device.id, self._status_line, cfg.status_api.host,
                 self.status_server.port, extra={"EVENT": "ready"})

    def _restore(self) -> None:
        try:
            loaded = self.state_file.load()
        except StateFileError as exc:
            # Fail closed: the rail is off and stays off without a session; a grant cannot
            # be replayed (the link layer keeps the nonces), so nothing can lengthen a call.
            log.error("%s; starting with no session", exc, extra={"EVENT": "state_corrupt"})
            self._record("state_file_corrupt", {"detail": str(exc)})
            loaded = None
        if loaded is None:
            self._apply(self.machine.restore(self.machine.snapshot, same_boot=True,
                                             now=self.clock.boot_ns()))
            return
        boot, snap = loaded
        self._apply(self.machine.restore(snap, same_boot=boot == self.boot,
                                         now=self.clock.boot_ns()))

    def _shutdown(self) -> None:
        self.notifier.send(STOPPING="1", STATUS="stopping: camera rail off")
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
        if self.guard is not None:
            record = self.guard.stop()
            if record is not None and record.by == "stop":
                self._record("rail_cut", _cut_fields(record))
        if self._device_watchdog is not None:
            # Disarm (magic close) only on an orderly stop; after a crash it keeps counting.
            self._device_watchdog.close(disarm=self._stop.is_set())
        self._media_off()
        self._media_worker.shutdown(wait=True, cancel_futures=False)
        if self.hardware is not None:
            self.hardware.close()
        if self._sim_mcu is not None:
            stop_sim_mcu(self._sim_mcu)
        if self.store is not None:
            self.store.close()
        log.info("stopped; camera rail off", extra={"EVENT": "stopped"})

    # ---- tasks ----------------------------------------------------------------------------

    async def _until_stopped(self) -> None:
        await self._stop.wait()
        raise _Stopped

    async def _core(self) -> None:
        while True:
            deadline = self.machine.next_deadline()
            inp: Input
            if deadline is None:
                inp = await self._queue.get()
            else:
                delay = max(0, deadline - self.clock.boot_ns()) / NS_PER_S
                try:
                    async with asyncio.timeout(delay):
                        inp = await self._queue.get()
                except TimeoutError:
                    inp = Tick()
            self._handle_guarded(inp)

    def _handle_guarded(self, inp: Input) -> None:
        try:
            self._handle(inp)
        except Exception:
            # Invariant 4: on any unexpected error, the rail is cut first.
            self._emergency_cut("internal_error", f"internal error handling {inp!r}")
            raise

    async def _pet_watchdogs(self) -> None:
        """Layers (c) and (d): petted from the loop, so a blocked loop stops petting.

        Also watches layer (b): if the enforcement thread died, cut and fail the daemon.
        """
        sd = SystemdWatchdog(self.environ)
        dev = self._device_watchdog
        assert self.guard is not None
        period = min(i for i in (sd.interval_s, self.cfg.watchdog.timeout_s / 3 if dev else None,
                                 1.0) if i)
        while True:
            if not self.guard.alive:
                self._emergency_cut("enforcement_thread_died", "the enforcement thread died")
                raise HardwareError("the rail enforcement thread died")
            if sd.interval_s:
                self.notifier.send(WATCHDOG="1")
            if dev is not None:
                dev.pet()
            self._update_status_line()
            await asyncio.sleep(period)

    # ---- input/action plumbing --------------------------------------------------------------

    def _handle(self, inp: Input) -> None:
        now = self.clock.boot_ns()
        self._apply(self.machine.handle(inp, now))

    def _apply(self, actions: list[Action]) -> None:
        assert self.guard is not None and self.hardware is not None
        cut: CutRecord | None = None
        for action in actions:
            if self.on_action is not None:
                self.on_action(action, self.clock.boot_ns())
            match action:
                case RailOff(reason=reason, due_ns=due):
                    cut = self.guard.cut(reason, due)
                    if self.mcu is not None:
                        self.mcu.lease(None)
                    self._media_off()  # after the cut: teardown never delays it
                    if cut is not None:
                        self._record("rail_cut", {**_cut_fields(cut), **self._session_field()})
                case RailOn(until_ns=until, cause=cause):
                    if self.guard.power(until, cause):
                        if self.mcu is not None:
                            self.mcu.lease(until)
                        self._media_on(until)
                    else:
                        log.warning("rail power refused by the guard (until %d)", until,
                                    extra={"EVENT": "rail_refused"})
                case Record(kind=kind, fields=fields):
                    if kind == "call_ended" and cut is not None:
                        fields = {**fields, **_cut_fields(cut, prefix="cutoff_")}
                    self._record(kind, fields)
                case Persist(snapshot=snap):
                    self.state_file.save(snap, self.boot)
                case SetLed(colour=colour):
                    self.hardware.led.show(colour)
                case SetBacklight(on=on):
                    try:
                        self.hardware.backlight.set(on)
                    except HardwareError as exc:
                        log.error("%s", exc, extra={"EVENT": "backlight_error"})
                case ShowScreen(screen=screen):
                    log.info("screen: %s", screen, extra={"EVENT": "screen"})
        if self.hub is not None:
            self.hub.changed()
        self._update_status_line()

    def _record(self, kind: str, fields: dict[str, Any] | Any) -> None:
        assert self.store is not None
        event = self.store.append(kind, fields, boot=self.boot, boot_ns=self.clock.boot_ns())
        if not event.stored:  # telemetry, and the outbox is full of protected records
            log.debug("telemetry %s dropped: outbox full", kind)
            return
        if self.link is not None:
            self.link.outbox_changed()
        extra = {"EVENT": kind, "EVENT_ID": event.id}
        if event.session_id:
            extra["SESSION_ID"] = event.session_id
        log.info("event %s %s", kind, dict(fields), extra=extra)

    def _session_field(self) -> dict[str, str]:
        grant = self.machine.snapshot.grant
        return {} if grant is None else {"session_id": grant.session_id}

    def _inhibit(self, name: str, active: bool) -> None:
        assert self.guard is not None
        if active:
            self.guard.inhibit(name)
        else:
            self.guard.release(name)

    def _privacy_changed(self, engaged: bool) -> None:
        """From gpiozero's thread: the guard cuts at once, the machine hears it next."""
        self._inhibit("privacy", engaged)
        self.submit(PrivacyChanged(engaged))

    def _tamper_changed(self, opened: bool) -> None:
        self._inhibit("tamper", opened)
        self.submit(TamperChanged(opened))

    def _emergency_cut(self, reason: str, why: str) -> None:
        """Cut first; then try to record it (invariant 6), though the store may be what
        failed: the cut never depends on the record."""
        assert self.guard is not None
        cut = self.guard.cut(reason)
        log.critical("%s; camera rail cut", why, exc_info=sys.exc_info()[0] is not None,
                     extra={"EVENT": "fault"})
        if cut is not None:
            try:
                self._record("rail_cut", {**_cut_fields(cut), **self._session_field()})
            except Exception:
                log.exception("could not record the emergency cut")

    def _cut_from_any_thread(self, record: CutRecord) -> None:
        loop = self._loop
        if loop is not None and self.hub is not None:
            loop.call_soon_threadsafe(self.hub.changed)

    def _on_sigusr1(self, signum: int, frame: FrameType | None) -> None:
        """SIGUSR1 from ``tabletd cutoff`` while we hold the pins.

        A plain signal handler (not the loop's), so a busy loop does not delay it; it only
        starts a thread, because the main thread may be inside the guard's lock right now
        (the lock is not reentrant, and a cut in the middle of ``power()`` could be undone).
        """
        threading.Thread(target=self._engineer_cutoff, name="engineer-cutoff").start()

    def _engineer_cutoff(self) -> None:
        assert self.guard is not None and self.hardware is not None
        self.guard.cut("engineer_cutoff")
        self.submit(LockRequested("engineer_cutoff"))
        with contextlib.suppress(HardwareError):
            self.hardware.backlight.set(False)

    # ---- the link's host (tabletd.link.client.LinkHost); all on the loop --------------------
    # Inputs go through the queue like every other (submit), never straight into the
    # machine: the core task must see them to re-arm its deadline timer.

    def hello(self) -> msgs.Hello:
        assert self.store is not None
        snap = self.machine.snapshot
        session = None
        if snap.grant is not None and snap.state in (State.SCHEDULED, State.LIVE, State.ENDED):
            remaining = self.machine.remaining_ns(self.clock.boot_ns())
            session = msgs.SessionSummary(
                id=snap.grant.session_id,
                state=str(snap.state),  # type: ignore[arg-type]  # one of the three, above
                remaining_ms=None if remaining is None else remaining // NS_PER_MS,
            )
        return msgs.Hello(
            device_id=self.cfg.device.id, software=__version__, boot_id=self.boot,
            session=session, locked=snap.state in (State.LOCKED, State.FAULT),
            outbox=msgs.OutboxSummary(pending=self.store.count(),
                                      oldest_seq=self.store.oldest_seq()),
        )

    def link_changed(self, up: bool, mapping: ClockMapping | None) -> None:
        self._mapping = mapping
        if mapping is not None and self._nonces is not None:
            # Forget nonces whose grants have certainly ended, even by the earliest reading.
            self._nonces.prune(mapping.server_now_ms_earliest(self.clock.boot_ns()))
        self.submit(LinkChanged(up))

    def on_server_message(self, msg: msgs.ServerMessage) -> msgs.ErrorMsg | None:
        match msg:
            case msgs.GrantMsg(body=body, signature=signature):
                return self._grant(body, signature)
            case msgs.Start(session_id=sid):
                self.submit(StartCall(sid))
            case msgs.End(session_id=sid):
                self.submit(EndByServer(sid))
            case msgs.Lock(reason=reason):
                self.submit(LockRequested(reason))
            case msgs.Unlock():
                self.submit(UnlockRequested())
        return None

    def on_protocol_error(self, exc: msgs.ProtocolError) -> None:
        self._record("protocol_error", {"code": exc.code, "detail": exc.detail[:512],
                                        "ref": exc.ref})

    # ---- the MCU's host (tabletd.mcu.client.McuHost); all on the loop -----------------------

    def mcu_link_changed(self, up: bool) -> None:
        assert self.mcu is not None  # its port: the simulated MCU's pty with [sim] mcu
        self._record("mcu_link_up" if up else "mcu_link_down", {"port": self.mcu.cfg.port})
        if self.hub is not None:
            self.hub.changed()

    def mcu_status(self, status: McuStatus) -> None:
        before = self._mcu_status
        self._mcu_status = status
        if before is None or before.docked != status.docked or (
                before.dock_bay != status.dock_bay):
            self.submit(DockChanged(status.docked, _bay(status.dock_bay), status.battery_pct))
        for action in self.power.update(status, self.clock.boot_ns()):
            if isinstance(action, Critical):  # once: the monitor latches it
                # at once, not queued: the call ends before the power-off starts
                self._handle_guarded(BatteryChanged(True, action.pct))
                self._power_off = asyncio.create_task(self._orderly_power_off(action.pct),
                                                      name="power-off")
                self._power_off.add_done_callback(_report_power_off_crash)
            else:
                self._record(action.kind, action.fields)
        if self.hub is not None:
            self.hub.changed()

    def mcu_event(self, event: McuEvent) -> None:
        if event.kind in (McuEventKind.DOCKED, McuEventKind.UNDOCKED):
            pct = None if self._mcu_status is None else self._mcu_status.battery_pct
            self.submit(DockChanged(event.kind is McuEventKind.DOCKED, _bay(event.bay), pct))
        else:
            self._record("mcu_event", {"kind": event.kind.name.lower()})

    async def _orderly_power_off(self, pct: int) -> None:
        """Critical battery: the call is already over (the machine heard BatteryChanged);
        give the outbox a moment to reach the server, have the MCU cut the power after a
        delay long enough for Linux to stop cleanly, then ask for the power-off (protects the
        storage: a brown-out mid-write is what this avoids)."""
        cfg = self.cfg.power
        assert self.store is not None
        log.critical("battery critical (%d %%): powering off", pct,
                     extra={"EVENT": "power_off"})
        try:
            self._record("power_off", {"reason": "low_battery", "pct": pct,
                                       "power_cut_delay_s": cfg.power_cut_delay_s})
            if self.hub is not None:
                self.hub.changed()
            for _ in range(int(cfg.shutdown_flush_s / FLUSH_POLL_S)):
                if not (self.store.count() and self.link is not None and self.link.connected):
                    break
                await asyncio.sleep(FLUSH_POLL_S)
        except Exception:  # the record or the outbox failed: the power still goes off in order
            log.exception("power-off: recording or flushing failed; powering off all the same",
                          extra={"EVENT": "power_off_record_failed"})
        if self.mcu is not None and not await self.mcu.power_off(cfg.power_cut_delay_s):
            log.error("the MCU did not acknowledge POWER_OFF: powering off all the same",
                      extra={"EVENT": "mcu_power_off_unacked"})
        if cfg.poweroff == "exit":
            log.warning("power off: [power] poweroff = \"exit\": stopping the daemon only")
            self.request_stop()
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                "systemctl", "poweroff", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            detail = (err.decode("utf-8", "replace").strip()[:512] or
                      f"exit status {proc.returncode}") if proc.returncode else ""
        except OSError as exc:  # no systemctl at all
            detail = f"systemctl: {exc.strerror or exc}"
        if detail:
            log.error("systemctl poweroff failed (%s): the MCU cuts the power in %d s",
                      detail, cfg.power_cut_delay_s, extra={"EVENT": "power_off_failed"})
            self._record("power_off_failed", {"detail": detail})

    def media_allowed(self) -> bool:
        assert self.guard is not None
        return self.guard.rail_on and self.machine.state is State.LIVE

    def on_media(self, frame: MediaFrame) -> None:
        """The relative's media: to the local screen only while live (invariant 7)."""
        if (self.media_allowed() and self.status_server is not None
                and self.status_server.media.listened):
            self.status_server.media.publish(encode_frame(frame))

    # ---- media: started with the rail, stopped after the cut --------------------------------

    def _media_on(self, until_ns: int) -> None:
        if self.link is None or self._camera is None:
            return  # no link: nowhere to send media, so the camera stays off
        # Nothing captured at or after the rail's end is ever queued (invariant 7).
        self.link.uplink.set_deadline(until_ns // 1000)
        if self._media_running:
            return
        self._media_running = True
        loop = self._loop
        assert loop is not None
        sources = [s for s in (self._camera, self._microphone) if s is not None]

        def on_frame(frame: MediaFrame) -> None:
            loop.call_soon_threadsafe(self._media_frame, frame)

        def on_fault(detail: str) -> None:
            self.submit(MediaFailed(detail))

        def start() -> None:
            for source in sources:
                source.start(on_frame, on_fault)

        # One worker thread runs every start and stop, in order, off the loop: a device that
        # hangs can delay its own start, never the loop or the cut.
        self._media_worker.submit(start)

    def _media_off(self) -> None:
        if self.status_server is not None:
            self.status_server.media.clear()
            self.status_server.own.clear()
        if self.link is not None:
            self.link.uplink.clear()
            self.link.uplink.set_deadline(0)  # everything is "after the deadline" until on
        if not self._media_running:
            return
        self._media_running = False
        sources = [s for s in (self._camera, self._microphone) if s is not None]

        def stop() -> None:
            for source in sources:
                try:
                    source.stop()
                except Exception:
                    log.exception("stopping %s failed", type(source).__name__)

        self._media_worker.submit(stop)

    def _media_frame(self, frame: MediaFrame) -> None:
        if self.link is None or not self.media_allowed():
            return  # produced after the cut (or before the loop heard of it): dropped
        self.link.push_media(frame)
        if (frame.stream is Stream.VIDEO and self.status_server is not None
                and self.status_server.own.listened):
            self.status_server.own.publish(encode_frame(frame))  # the screen's own preview
        if self.link.uplink.want_keyframe and self._camera is not None:
            self._camera.request_keyframe()
            self.link.uplink.keyframe_requested()

    def _grant(self, body: GrantBody, signature: str) -> msgs.ErrorMsg | None:
        """Link-level checks (signature, binding, clock, replay; invariant 5), then the
        session machine's own (busy, locked, window), which it records as events."""
        assert self.store is not None
        if body == self._accepted_body:
            return None  # the server re-sent the grant we hold (docs/protocol.md 3.3)
        if self._verifier is None:
            refusal = GrantRefused("refused", "replay protection unavailable (see the journal)")
        else:
            try:
                grant = self._verifier.verify(body, signature, self._mapping,
                                              self.clock.boot_ns())
            except GrantRefused as exc:
                refusal = exc
            else:
                if not self.store.full_of_protected():
                    self._accepted_body = body
                    self.submit(GrantReceived(grant))
                    return None
                refusal = GrantRefused("refused",
                                       "the outbox is full of undelivered call records")
        if refusal.code in ("bad_signature", "bad_message"):
            # Not genuinely signed: says nothing about a call. Telemetry, so that a flood of
            # forgeries can neither grow the outbox without bound nor block calls.
            self._record("protocol_error", {"code": refusal.code,
                                            "detail": refusal.detail[:512],
                                            "ref": body.grant_id})
        else:
            self._record("grant_refused", {"session_id": body.grant_id,
                                           "reason": refusal.code,
                                           "detail": refusal.detail[:512]})
        return msgs.ErrorMsg(code=refusal.code, detail=refusal.detail[:1024],
                             ref=body.grant_id)

    # ---- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The status object of ``docs/status-api.md``."""
        assert self.guard is not None
        m = self.machine
        snap = m.snapshot
        now = self.clock.boot_ns()
        session = None
        if snap.grant is not None:
            remaining = m.remaining_ns(now)
            session = {
                "id": snap.grant.session_id,
                "state": str(snap.state),
                "contact": snap.grant.contact_label,
                "remaining_ms": None if remaining is None else remaining // NS_PER_MS,
                "deadline_boot_ns": snap.deadline_ns,
                "started_boot_ns": snap.started_ns,
                "not_before_boot_ns": snap.grant.not_before_ns,
                "not_after_boot_ns": snap.grant.not_after_ns,
                "end_reason": None if snap.end_reason is None else str(snap.end_reason),
                "starts_in_ms": (max(0, snap.grant.not_before_ns - now) // NS_PER_MS
                                 if snap.state is State.SCHEDULED else None),
            }
        last = self.guard.last_cut
        mapping = self._mapping
        return {
            "version": 1,
            "device_id": self.cfg.device.id,
            "state": str(snap.state),
            "screen": str(m.screen()),
            "rail": "on" if self.guard.rail_on else "off",
            "session": session,
            "link": {"connected": m.link_up},
            "locked": snap.state in (State.LOCKED, State.FAULT),
            "locked_reason": snap.locked_reason,
            "fault": snap.fault_detail,
            "fault_code": fault_code(snap.fault_detail),
            "privacy": m.privacy,
            "tamper_open": m.tamper_open,
            "docked": m.docked,
            "outbox": self._outbox_status(),
            "power": self._power_status(),
            "last_cut": None if last is None else _cut_fields(last),
            "server_time_ms": None if mapping is None else mapping.server_now_ms_earliest(now),
            "ui": {"language": self.cfg.ui.language},
        }

    def _power_status(self) -> dict[str, Any] | None:
        """The MCU's last STATUS; None without an MCU or before its first report."""
        s = self._mcu_status
        if self.mcu is None or s is None:
            return None
        return {"link": self.mcu.up, "battery_pct": s.battery_pct, "battery_mv": s.battery_mv,
                "charging": s.charging.name.lower(), "charger_fault": s.charger_fault,
                "temperature_c": s.temperature_dc / 10, "rail_measured": s.rail_measured,
                "lease_remaining_ms": s.lease_remaining_ms, "dock_bay": _bay(s.dock_bay),
                "battery_low": self.power.low, "battery_critical": self.power.critical,
                "power_off": None if self._power_off is None else "low_battery"}

    def _outbox_status(self) -> dict[str, Any]:
        """Undelivered events; ``calls_refused`` says why no call can be booked (invariant 6:
        a full outbox of call records refuses new calls rather than lose a record)."""
        assert self.store is not None
        full = self.store.full_of_protected()
        return {"pending": self.store.count(), "calls_refused": full,
                "reason": "event backlog full: waiting for the server" if full else None}

    def _update_status_line(self, *, force: bool = False, ready: bool = False) -> None:
        line = self._describe()
        if line != self._status_line or force:
            self._status_line = line
            if ready:
                self.notifier.send(READY="1", STATUS=line)
            else:
                self.notifier.send(STATUS=line)

    def _describe(self) -> str:
        m = self.machine
        snap = m.snapshot
        rail = "camera on" if self.guard is not None and self.guard.rail_on else "camera off"
        if snap.state is State.LIVE and snap.deadline_ns is not None:
            left = max(0, snap.deadline_ns - self.clock.boot_ns()) // NS_PER_S
            link = "link up" if m.link_up else "LINK LOST"
            return f"call live, ends in {left // 60}:{left % 60:02d}, {rail}, {link}"
        if snap.state is State.LOCKED:
            return f"LOCKED ({snap.locked_reason}), {rail}"
        if snap.state is State.FAULT:
            return f"FAULT: {snap.fault_detail}; {rail}"
        if snap.state is State.SCHEDULED:
            return f"call booked, {rail}"
        if snap.state is State.ENDED:
            return f"call ended ({snap.end_reason}), {rail}"
        return f"idle, {rail}"


class _Stopped(Exception):
    """Raised inside the TaskGroup to end it on SIGTERM."""


def _report_power_off_crash(task: asyncio.Task[None]) -> None:
    """The power-off task is not in the task group (it must not stop the daemon): an
    unexpected error in it is logged at once, not lost until garbage collection. The MCU's
    POWER_OFF, if it was sent, still cuts the power."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("orderly power-off failed: %r", exc, exc_info=exc,
                  extra={"EVENT": "power_off_failed"})


def _bay(bay: int) -> str | None:
    return None if bay == 0 else str(bay)


def _cut_fields(cut: CutRecord, prefix: str = "") -> dict[str, Any]:
    lateness = cut.lateness_ns
    return {
        f"{prefix}reason": cut.reason,
        f"{prefix}by": cut.by,
        f"{prefix}lateness_ms": None if lateness is None else round(lateness / NS_PER_MS, 3),
    }
