"""Layers (c) and (d): the systemd watchdog settings and /dev/watchdog petting; log fields."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tabletd.errors import HardwareError
from tabletd.logs import FieldsFormatter, under_journald
from tabletd.watchdog import DeviceWatchdog, SystemdWatchdog


def test_systemd_watchdog_interval_is_half_of_usec() -> None:
    assert SystemdWatchdog({"WATCHDOG_USEC": "5000000"}).interval_s == 2.5
    pid = str(os.getpid())
    assert SystemdWatchdog({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": pid}).interval_s == 2.5
    # for another process (a child that inherited the variables): not ours to pet
    assert SystemdWatchdog({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}).interval_s is None
    assert SystemdWatchdog({}).interval_s is None
    assert SystemdWatchdog({"WATCHDOG_USEC": "garbage"}).interval_s is None


def test_device_watchdog_pets_and_disarms_only_on_orderly_stop(tmp_path: Path) -> None:
    dev = tmp_path / "watchdog"
    dev.touch()  # a regular file records what a driver would receive
    wd = DeviceWatchdog(str(dev), 15)
    wd.pet()
    wd.pet()
    wd.close(disarm=False)
    assert dev.read_bytes() == b"\0\0"
    dev2 = tmp_path / "watchdog2"
    dev2.touch()
    wd = DeviceWatchdog(str(dev2), 15)
    wd.close(disarm=True)
    assert dev2.read_bytes() == b"V"  # the magic close


def test_device_watchdog_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HardwareError, match=r"watchdog .*/nope: cannot open"):
        DeviceWatchdog(str(tmp_path / "nope"), 15)


def test_text_logs_carry_journal_fields() -> None:
    record = logging.LogRecord("tabletd.daemon", logging.INFO, "f.py", 1, "call ended", None,
                               None)
    record.EVENT = "call_ended"
    record.SESSION_ID = "s1"
    text = FieldsFormatter().format(record)
    assert text.endswith("call ended [EVENT=call_ended SESSION_ID=s1]")


def test_journald_detected_only_for_our_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not under_journald()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not under_journald()
