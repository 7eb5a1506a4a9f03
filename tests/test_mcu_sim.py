"""The simulated MCU process, driven over a real pty by a test-side host: an ``McuLink`` on
pyserial, as the daemon will be. Every wait is bounded; the process is stopped in a finally.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial

from tabletd.mcu.codec import (
    ChargingState,
    Cut,
    Event,
    EventKind,
    Lease,
    Message,
    Ping,
    PowerOff,
    Status,
)
from tabletd.mcu.link import McuLink, OutgoingMessage
from tabletd.mcu.pty import open_pty_pair, start_sim_mcu, stop_sim_mcu
from tabletd.mcu.sim import (
    ControlError,
    lease_file_state,
    mv_from_pct,
    pct_from_mv,
    query_state,
    send_control,
)

MS = 1_000_000
S = 1_000_000_000
#: The sim's own lapse lateness allowed (sleeping to the lease's end is ~0.1 ms; the rest is
#: slack for a loaded CI machine).
LAPSE_SLACK_NS = 30 * MS


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class Host:
    """The daemon's side in miniature: pyserial + a host McuLink, pumped by hand."""

    def __init__(self, device: str) -> None:
        self.port = serial.Serial(device, 115200, timeout=0)
        self.link = McuLink("host", silence_timeout_ns=None)
        self.received: list[tuple[int, Message]] = []

    def close(self) -> None:
        self.port.close()

    def send(self, message: OutgoingMessage) -> int:
        """Queue and write at once, with one ``now`` (so a LEASE keeps its whole duration)."""
        now = boot_ns()
        self.link.send(message, now)
        self._write(now)
        return now

    def _write(self, now: int) -> None:
        out = self.link.bytes_to_send(now)
        if out:
            self.port.write(out)

    def step(self, max_wait_s: float = 0.002) -> None:
        now = boot_ns()
        for message in self.link.tick(now):
            self.received.append((now, message))
        self._write(now)
        ready, _, _ = select.select([self.port.fileno()], [], [], max_wait_s)
        if ready:
            data = self.port.read(4096)
            now = boot_ns()
            for message in self.link.receive_bytes(data, now):
                self.received.append((now, message))
            self._write(now)

    def run_until(self, predicate: Callable[[], bool], within_s: float, what: str) -> None:
        deadline = time.monotonic() + within_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {within_s} s: {what}")
            assert not self.link.down, self.link.down_reason
            self.step()

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert not self.link.down, self.link.down_reason
            self.step()

    def handshake(self, within_s: float = 3.0) -> None:
        self.run_until(lambda: self.link.handshake_done, within_s, "HELLO_REPLY")

    def messages(self, kind: type[Message]) -> list[Message]:
        return [m for _, m in self.received if isinstance(m, kind)]

    def statuses(self) -> list[Status]:
        return [m for _, m in self.received if isinstance(m, Status)]

    def latest_status_is(self, predicate: Callable[[Status], bool]) -> bool:
        statuses = self.statuses()
        return bool(statuses) and predicate(statuses[-1])

    def events(self) -> list[Event]:
        return [m for _, m in self.received if isinstance(m, Event)]


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    proc, device = start_sim_mcu(tmp_path, seed=7)
    try:
        yield tmp_path, device
    finally:
        stop_sim_mcu(proc)


@pytest.fixture
def host(sim: tuple[Path, str]) -> Iterator[Host]:
    h = Host(sim[1])
    try:
        h.handshake()
        yield h
    finally:
        h.close()


def lease_log(state_dir: Path) -> list[tuple[int, str, str]]:
    lines = (state_dir / "sim" / "mcu-lease.log").read_text(encoding="ascii").splitlines()
    out = []
    for line in lines:
        stamp, state, reason = line.split(" ", 2)
        out.append((int(stamp), state, reason))
    return out


def field(reason: str, name: str) -> int:
    for word in reason.split():
        if word.startswith(name + "="):
            return int(word.split("=", 1)[1])
    raise AssertionError(f"no {name}= in {reason!r}")


# ---- handshake and STATUS ------------------------------------------------------------------


def test_start_publishes_the_device_and_cuts_the_lease(sim: tuple[Path, str]) -> None:
    state_dir, device = sim
    assert os.path.realpath(device).startswith("/dev/pts/")
    assert not lease_file_state(state_dir)
    assert lease_log(state_dir)[0][1:] == ("off", "start")


def test_handshake(host: Host) -> None:
    assert host.link.peer is not None
    assert host.link.peer.protocol == 1
    assert host.link.peer.max_lease_ms == 2000


def test_status_every_second(host: Host) -> None:
    host.run_until(lambda: len(host.statuses()) >= 4, within_s=4.5, what="4 STATUS")
    times = [t for t, m in host.received if isinstance(m, Status)]
    # The first comes at the handshake, the next ones on the sim's 1 s grid.
    gaps = [(b - a) / S for a, b in itertools.pairwise(times[1:])]
    assert gaps, times
    assert all(0.8 <= g <= 1.2 for g in gaps), gaps
    st = host.statuses()[-1]
    assert st.docked is False and st.dock_bay == 0
    assert st.charging is ChargingState.NOT_CHARGING
    assert 3300 <= st.battery_mv <= 4300
    assert 70 <= st.battery_pct <= 90  # starts at 80 %
    assert 150 <= st.temperature_dc <= 400
    assert st.rail_measured is False and st.lease_remaining_ms == 0


# ---- the lease -----------------------------------------------------------------------------


def test_lease_lapses_by_itself(sim: tuple[Path, str], host: Host) -> None:
    state_dir, _ = sim
    host.send(Lease(200))
    host.run_until(lambda: lease_file_state(state_dir), 1.0, "lease on")
    # The host now stays silent, as a frozen daemon would; the MCU cuts by itself.
    deadline = time.monotonic() + 2.0
    while lease_file_state(state_dir):
        assert time.monotonic() < deadline, "the lease did not lapse"
        time.sleep(0.005)
    log = lease_log(state_dir)
    (on_ns, _, on_reason), (off_ns, off_state, off_reason) = log[-2:]
    assert on_reason.startswith("lease ") and field(on_reason, "ms") == 200
    assert off_state == "off" and off_reason.startswith("expired ")
    assert field(on_reason, "until") == field(off_reason, "until") == on_ns + 200 * MS
    assert 200 * MS <= off_ns - on_ns <= 200 * MS + LAPSE_SLACK_NS, (off_ns - on_ns) / MS
    # The STATUS says so too, on change.
    host.run_until(lambda: host.latest_status_is(lambda s: not s.rail_measured), 1.5,
                   "STATUS after the lapse")


def test_renewed_lease_stays_on(sim: tuple[Path, str], host: Host) -> None:
    state_dir, _ = sim
    host.send(Lease(300))
    host.run_until(lambda: lease_file_state(state_dir), 1.0, "lease on")
    end = time.monotonic() + 1.0
    next_renewal = 0.0
    while time.monotonic() < end:
        assert lease_file_state(state_dir), "the lease lapsed while renewed"
        if time.monotonic() >= next_renewal:
            host.send(Lease(300))
            next_renewal = time.monotonic() + 0.1
        host.step()
    host.run_until(lambda: not lease_file_state(state_dir), 1.5, "lapse after renewals stop")
    log = lease_log(state_dir)
    states = [(state, reason.split()[0]) for _, state, reason in log]
    first_on = states.index(("on", "lease"))
    assert states[first_on + 1:-1] == [("on", "renew")] * (len(states) - first_on - 2)
    assert len(states) - first_on - 2 >= 5
    assert states[-1] == ("off", "expired")
    last_renew_ns, _, last_reason = log[-2]
    assert 300 * MS <= log[-1][0] - last_renew_ns <= 300 * MS + LAPSE_SLACK_NS
    assert field(last_reason, "until") == last_renew_ns + 300 * MS


def test_cut_ends_the_lease_at_once(sim: tuple[Path, str], host: Host) -> None:
    state_dir, _ = sim
    host.send(Lease(2000))
    host.run_until(lambda: lease_file_state(state_dir), 1.0, "lease on")
    sent = host.send(Cut())
    host.run_until(lambda: not lease_file_state(state_dir), 0.5, "lease off after CUT")
    off_ns, state, reason = lease_log(state_dir)[-1]
    assert (state, reason) == ("off", "cut")
    assert off_ns - sent < 100 * MS
    host.run_until(lambda: host.link.idle, 1.0, "CUT acknowledged")


def test_a_new_host_session_ends_the_lease(sim: tuple[Path, str], host: Host) -> None:
    state_dir, device = sim
    host.send(Lease(2000))
    host.run_until(lambda: lease_file_state(state_dir), 1.0, "lease on")
    second = Host(device)  # the daemon restarted: it reopens the port and says HELLO
    try:
        second.handshake()
        assert not lease_file_state(state_dir)
        assert lease_log(state_dir)[-1][1:] == ("off", "hello")
    finally:
        second.close()


def test_status_reports_the_lease(sim: tuple[Path, str], host: Host) -> None:
    host.send(Lease(1500))
    host.run_until(lambda: any(s.lease_remaining_ms > 0 for s in host.statuses()), 1.5,
                   "STATUS with the lease")
    st = next(s for s in host.statuses() if s.lease_remaining_ms > 0)
    assert 1000 <= st.lease_remaining_ms <= 1500
    assert st.rail_measured  # no GPIO rail file in this test: the lease alone decides


# ---- dock, lid, button, battery --------------------------------------------------------------


def test_dock_and_undock_events(sim: tuple[Path, str], host: Host) -> None:
    state_dir, _ = sim
    send_control(state_dir, {"dock": 4})
    host.run_until(lambda: any(s.docked for s in host.statuses()), 2.0, "docked STATUS")
    assert host.events() == [Event(EventKind.DOCKED, 4)]
    st = next(s for s in host.statuses() if s.docked)
    assert st.dock_bay == 4 and st.charging is ChargingState.CHARGING
    send_control(state_dir, {"undock": True})
    host.run_until(lambda: len(host.events()) == 2, 2.0, "UNDOCKED event")
    host.run_until(lambda: host.latest_status_is(lambda s: not s.docked), 2.0, "undocked STATUS")
    assert host.events()[1] == Event(EventKind.UNDOCKED, 4)
    assert host.statuses()[-1].charging is ChargingState.NOT_CHARGING


def test_lid_and_power_button_events(sim: tuple[Path, str], host: Host) -> None:
    state_dir, _ = sim
    send_control(state_dir, {"lid": "open"})
    send_control(state_dir, {"lid": "open"})  # no change, no event
    send_control(state_dir, {"lid": "closed"})
    send_control(state_dir, {"power_button": True})
    host.run_until(lambda: len(host.events()) >= 3, 2.0, "three events")
    host.run_for(0.2)
    assert [e.kind for e in host.events()] == [
        EventKind.LID_OPENED, EventKind.LID_CLOSED, EventKind.POWER_BUTTON]


def test_battery_pct_override_and_charging(sim: tuple[Path, str], host: Host) -> None:
    state_dir, _ = sim
    send_control(state_dir, {"battery_pct": 12})
    host.run_until(lambda: host.latest_status_is(lambda s: s.battery_pct == 12), 2.0, "12 % STATUS")
    st = host.statuses()[-1]
    assert abs(pct_from_mv(st.battery_mv + 30) - 12) <= 1  # load offset while undocked
    send_control(state_dir, {"battery_pct": 100, "dock": 1})
    host.run_until(lambda: host.latest_status_is(lambda s: s.charging is ChargingState.FULL),
                   2.0, "FULL")
    send_control(state_dir, {"charger_fault": True, "battery_pct": 50})
    host.run_until(lambda: host.latest_status_is(lambda s: s.charger_fault), 2.0, "charger fault")
    assert host.statuses()[-1].charging is ChargingState.NOT_CHARGING


def test_power_off_ends_the_lease_then_the_power(sim: tuple[Path, str], host: Host) -> None:
    state_dir, _ = sim
    power = state_dir / "sim" / "mcu-power"
    host.send(Lease(2000))
    host.run_until(lambda: lease_file_state(state_dir), 1.0, "lease on")
    host.send(PowerOff(0))
    host.run_until(lambda: power.read_text().strip() == "off", 1.0, "power off")
    assert lease_log(state_dir)[-1][1:] == ("off", "power_off")
    send_control(state_dir, {"power_button": True})
    assert power.read_text().strip() == "on"


def test_fuel_gauge_round_trip() -> None:
    for pct in range(101):
        assert pct_from_mv(mv_from_pct(pct)) == pct


def test_control_refuses_bad_commands(sim: tuple[Path, str]) -> None:
    state_dir, _ = sim
    for bad in ({"bogus": 1}, {"battery_pct": 101}, {"dock": 0}, {"lid": "ajar"},
                {"noise": 2}, {"undock": 1}, {"dock": 2, "undock": True}):
        with pytest.raises(ControlError):
            send_control(state_dir, bad)
    # A refused command changes nothing, even its valid keys.
    with pytest.raises(ControlError, match="unplug"):
        send_control(state_dir, {"noise": 0.5, "unplug": -1})
    assert query_state(state_dir)["noise"] == 0


# ---- faults ------------------------------------------------------------------------------------


def test_noise_and_drops_the_link_still_delivers(sim: tuple[Path, str], host: Host) -> None:
    state_dir, _ = sim
    send_control(state_dir, {"noise": 0.02, "drop": 0.005})
    send_control(state_dir, {"dock": 2})
    send_control(state_dir, {"undock": True})
    for i in range(30):
        host.send(Ping() if i % 2 else Lease(500))
        host.run_until(lambda: host.link.idle, 3.0, f"message {i} acknowledged")
    host.run_until(lambda: len(host.events()) >= 2, 3.0, "events through the noise")
    host.send(Cut())
    host.run_until(lambda: not lease_file_state(state_dir), 3.0, "CUT through the noise")
    host.run_for(0.3)
    assert host.events() == [Event(EventKind.DOCKED, 2), Event(EventKind.UNDOCKED, 2)]
    state = query_state(state_dir)
    assert state["link"]["bad_crcs"] > 0 or host.link.decoder.bad_crcs > 0
    assert host.link.decoder.bytes_discarded > 0


def test_delay_shows_in_the_round_trip(sim: tuple[Path, str], host: Host) -> None:
    state_dir, _ = sim
    send_control(state_dir, {"delay_ms": 60})
    for _ in range(3):
        sent = host.send(Ping())
        host.run_until(lambda: host.link.idle, 3.0, "PING acknowledged")
        assert boot_ns() - sent >= 60 * MS
    send_control(state_dir, {"delay_ms": 0})
    sent = host.send(Ping())
    host.run_until(lambda: host.link.idle, 3.0, "PING acknowledged")
    assert boot_ns() - sent < 60 * MS


def test_unplug_and_replug(sim: tuple[Path, str]) -> None:
    state_dir, device = sim
    h = Host(device)
    try:
        h.handshake()
        send_control(state_dir, {"unplug": 0.5})
        # The slave hangs up: pyserial's read fails, the published path is gone.
        with pytest.raises(serial.SerialException):
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                h.port.read(4096)
                time.sleep(0.01)
        assert not os.path.lexists(device)
    finally:
        with contextlib.suppress(Exception):
            h.close()
    deadline = time.monotonic() + 3.0
    while not os.path.exists(device):
        assert time.monotonic() < deadline, "not replugged"
        time.sleep(0.01)
    h2 = Host(device)
    try:
        h2.handshake()
        h2.run_until(lambda: bool(h2.statuses()), 2.0, "STATUS after replug")
    finally:
        h2.close()


def test_lease_runs_on_while_unplugged(sim: tuple[Path, str], host: Host) -> None:
    state_dir, _ = sim
    host.send(Lease(300))
    host.run_until(lambda: lease_file_state(state_dir), 1.0, "lease on")
    send_control(state_dir, {"unplug": 2})
    deadline = time.monotonic() + 1.5
    while lease_file_state(state_dir):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert lease_log(state_dir)[-1][2].startswith("expired")


def test_sigterm_cuts_and_cleans_up(tmp_path: Path) -> None:
    proc, device = start_sim_mcu(tmp_path, seed=1)
    try:
        h = Host(device)
        try:
            h.handshake()
            h.send(Lease(2000))
            h.run_until(lambda: lease_file_state(tmp_path), 1.0, "lease on")
        finally:
            h.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert not lease_file_state(tmp_path)
        assert lease_log(tmp_path)[-1][1:] == ("off", "exit")
        assert not os.path.lexists(device)
        assert not (tmp_path / "sim" / "mcu-control.sock").exists()
    finally:
        stop_sim_mcu(proc)


def test_open_pty_pair_passes_bytes() -> None:
    master, slave_path = open_pty_pair()
    try:
        with serial.Serial(slave_path, 115200, timeout=1) as port:
            port.write(b"\xa5\x00\r\n\x11")
            deadline = time.monotonic() + 1.0
            got = b""
            while len(got) < 5 and time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.05)
                if ready:
                    got += os.read(master, 64)
            assert got == b"\xa5\x00\r\n\x11"
            os.write(master, b"\x00\xff\n\r")
            assert port.read(4) == b"\x00\xff\n\r"
    finally:
        os.close(master)
