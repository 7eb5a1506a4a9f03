"""The README's main command, shortened: a booked call through a network cut, nothing lost."""

from __future__ import annotations

import pytest

from tabletd.cli import main

from .conftest import SIM_CONFIG


@pytest.mark.timeout(90)
def test_demo_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--config", str(SIM_CONFIG), "--call-seconds", "10",
                 "--cut-seconds", "5", "--start-in", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert ">>> network CUT" in out and "event call_link_lost" in out
    assert "OK: the call ended at its deadline through a network cut" in out
    assert "0 pending" in out
    # the simulated MCU (config/sim.toml) reports the battery, and docking reaches the server
    assert "| bat 80% |" in out
    assert "custody event at the server: docked in bay 2, battery 80 %" in out
