"""bench/reconnect.py on a small fleet: it runs, both restarts bring every client back, the
planned one with one attempt each after its hint, and its last line is the JSON it promises.
The figures themselves are the benchmark's business, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_small_fleet_planned_and_crash() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "reconnect.py"), "--clients", "20",
         "--down-s", "0.2", "--baselines", "fixed", "--timeout", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode in (0, 1), run.stderr
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert last["targets"]["judged_on"] == "planned"
    planned, crash = last["episodes"]["planned"], last["episodes"]["crash"]
    assert planned["jitter"]["reconnected"] == crash["jitter"]["reconnected"] == 20
    # told to come back after 1 s (0.2 rounded up), all 20 in the first second's slot
    assert planned["jitter"]["hints"] == {"given": 20, "min_s": 1.0, "max_s": 1.0}
    assert planned["jitter"]["attempts_per_client"] == {"mean": 1.0, "max": 1}
    assert crash["jitter"]["hints"]["given"] == 0
    assert set(last["real_over_naive"]["planned"]) == {"fixed"}
    assert last["pass"]["all_reconnected"] is True
    assert "planned: real policy: 20/20 reconnected: PASS" in run.stdout
