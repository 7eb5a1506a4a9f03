"""Benchmark: how many durable events per second the outbox takes, and what each one costs.

Run from the repository root, with the project installed::

    python bench/outbox.py                # defaults: 2,000 appends, a 5,000-event drain
    python bench/outbox.py --help         # counts, batch size, the directory to write in

What it measures (BRIEF invariant 6; issue 3, items 4 and 8)
------------------------------------------------------------
The real :class:`tabletd.events.EventStore` (SQLite, WAL, ``synchronous=FULL``), in a fresh
file in a temporary directory (``--dir``: put it on the filesystem you care about, e.g. the
tablet's ``/var/lib/tabletd``), one writer, one event per transaction (batch size 1, as the
daemon records them). Each row is timed per call with ``time.perf_counter_ns``:

1. **durable append** - ``EventStore.append`` of a typical ``call_ended``-sized event
   (~200 bytes of JSON): committed and fsync'd when it returns. Events per second
   (count / wall time of the whole run) and the cost of one append (p50 / p99 / max, µs).
2. **baseline: the same append with ``synchronous=OFF``**, measured in the same run on the
   same kind of file: the exact same code path (count, eviction check, ``BEGIN IMMEDIATE``,
   ``INSERT``, ``COMMIT``), only the fsyncs are skipped. The ratio durable / baseline is
   the price of durability on this machine's storage.
3. **durable append into a full outbox** - the store holds ``capacity`` events (10,000, a
   quarter of them telemetry), so every append also deletes the oldest telemetry event:
   the worst case of the capacity policy, with the largest table to count.
4. **pending + ack** - the drain the link does: ``pending(batch)`` then ``ack`` of those
   ids (one transaction, fsync'd), until a pre-filled outbox is empty. Events per second,
   and the cost of one pending+ack round (µs).

Targets, and why
----------------
* **durable appends >= 200 events/s.** The daemon records a handful of events per call
  (scheduled, started, rail cut, ended) and a few per switch, dock or link change: real
  rates are a few per second at most. 200/s leaves two orders of magnitude for bursts and
  for slow flash storage (an SD card's fsync is several ms).
* **append p99 <= 20 ms.** The daemon appends from its asyncio loop, which also serves the
  link and the status API; 20 ms is the brief's cut-off bound, the longest stall we accept
  anywhere on the loop (the rail's enforcement does not depend on it: see docs/events.md).
* **pending + ack >= 1,000 events/s** (batches of 64, the protocol's window): a full
  10,000-event backlog drains in at most 10 s of local work after a reconnection.

How to read it
--------------
A table, then one JSON line (the last line printed) with every figure, the targets and the
verdicts. Exit status 0 when every target is met, 1 otherwise. Figures depend on the
storage under ``--dir`` (tmpfs makes fsync free: the directory's filesystem is printed) and
on other I/O on the machine. This is a benchmark, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchlib import summary

from tabletd.events import DEFAULT_CAPACITY, EventStore

TARGET_EVENTS_PER_S = 200.0
TARGET_P99_US = 20_000.0
TARGET_DRAIN_PER_S = 1_000.0

FIELDS = {  # a typical call_ended
    "session_id": "booking-2026-11-27-000123",
    "reason": "deadline",
    "duration_ms": 1_200_000,
    "cutoff_reason": "deadline",
    "cutoff_by": "thread",
    "cutoff_lateness_ms": 1.234,
}
BOOT = "3f2c9d6e-8a41-4a5e-9a54-1b7c2d9e0f11"



def fmt(stats: dict[str, float]) -> str:
    return "  ".join(f"{stats[k]:>9.1f}" for k in ("p50", "p99", "max"))


def time_appends(store: EventStore, count: int, kinds: Sequence[str]) -> tuple[float, list[float]]:
    """Append ``count`` events; return (events per second, per-append cost in µs)."""
    costs: list[float] = []
    t0 = time.perf_counter_ns()
    for n in range(count):
        a = time.perf_counter_ns()
        store.append(kinds[n % len(kinds)], FIELDS, boot=BOOT, boot_ns=n)
        costs.append((time.perf_counter_ns() - a) / 1_000)
    elapsed = (time.perf_counter_ns() - t0) / 1e9
    return count / elapsed, costs


def fill(path: Path, count: int, telemetry_every: int = 0) -> None:
    """Pre-fill an outbox quickly (synchronous=OFF), then leave it for a durable reopen."""
    store = EventStore(path)
    store._db.execute("PRAGMA synchronous=OFF")
    store._db.execute("BEGIN")
    for n in range(count):
        kind = "input_refused" if telemetry_every and n % telemetry_every == 0 else "call_ended"
        store._db.execute(
            "INSERT INTO events (id, kind, session_id, boot_id, boot_ns, wall_time, fields)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (f"fill-{n}", kind, FIELDS["session_id"], BOOT, n, "2026-11-27T08:00:00.000+00:00",
             json.dumps(FIELDS, sort_keys=True)),
        )
    store._db.execute("COMMIT")
    store.close()


def filesystem_of(path: Path) -> str:
    try:
        out = subprocess.run(["df", "--output=fstype,source", str(path)], capture_output=True,
                             text=True, timeout=5, check=True).stdout.split("\n")[1].split()
        return f"{out[0]} ({out[1]})"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--appends", type=int, default=2000,
                        help="durable appends to time (default 2000)")
    parser.add_argument("--baseline-appends", type=int, default=5000,
                        help="synchronous=OFF appends to time (default 5000)")
    parser.add_argument("--full-appends", type=int, default=1000,
                        help="appends into a full outbox (default 1000)")
    parser.add_argument("--drain", type=int, default=5000,
                        help="events to drain with pending+ack (default 5000)")
    parser.add_argument("--batch", type=int, default=64, help="pending+ack batch (default 64)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to create the files (default: a new temporary directory)")
    args = parser.parse_args(argv)
    for name in ("appends", "baseline_appends", "full_appends", "drain", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    t_all = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="tabletd-bench-outbox-", dir=args.dir))
    fs = filesystem_of(workdir)
    print(f"outbox benchmark: {workdir} on {fs}; SQLite {sqlite3.sqlite_version}; "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}")
    try:
        # 1. durable appends, single writer, batch size 1
        store = EventStore(workdir / "durable.sqlite")
        time_appends(store, 20, ["call_ended"])  # warm-up: file growth, page cache
        durable_rate, durable_costs = time_appends(store, args.appends, ["call_ended"])
        store.close()

        # 2. baseline: the same code path, synchronous=OFF, same run
        store = EventStore(workdir / "nosync.sqlite")
        store._db.execute("PRAGMA synchronous=OFF")
        time_appends(store, 20, ["call_ended"])
        base_rate, base_costs = time_appends(store, args.baseline_appends, ["call_ended"])
        store.close()

        # 3. durable appends into a full outbox (evicting telemetry every time)
        full_path = workdir / "full.sqlite"
        fill(full_path, DEFAULT_CAPACITY, telemetry_every=4)
        store = EventStore(full_path)
        assert store.count() == DEFAULT_CAPACITY
        evicted0 = store.evicted_telemetry
        full_rate, full_costs = time_appends(store, args.full_appends,
                                             ["call_ended", "input_refused"])
        assert store.count() == DEFAULT_CAPACITY
        evicted = store.evicted_telemetry - evicted0
        store.close()

        # 4. pending + ack drain
        drain_path = workdir / "drain.sqlite"
        fill(drain_path, args.drain)
        store = EventStore(drain_path)
        rounds: list[float] = []
        drained = 0
        after: int | None = None
        rng = random.Random(7)
        t0 = time.perf_counter_ns()
        while True:
            a = time.perf_counter_ns()
            batch = store.pending(args.batch, after_seq=after)
            if not batch:
                break
            ids = [e.id for e in batch]
            rng.shuffle(ids)  # acks need not come in order
            drained += store.ack(ids)
            rounds.append((time.perf_counter_ns() - a) / 1_000)
            after = batch[-1].seq
        drain_rate = drained / ((time.perf_counter_ns() - t0) / 1e9)
        assert drained == args.drain and store.count() == 0
        store.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    durable = summary(durable_costs, 1)
    base = summary(base_costs, 1)
    full = summary(full_costs, 1)
    drain = summary(rounds, 1)
    ratio = round(durable_rate / base_rate, 4) if base_rate > 0 else None
    passes = {
        "durable_events_per_s": durable_rate >= TARGET_EVENTS_PER_S,
        "durable_p99_us": durable["p99"] <= TARGET_P99_US,
        "full_outbox_p99_us": full["p99"] <= TARGET_P99_US,
        "drain_events_per_s": drain_rate >= TARGET_DRAIN_PER_S,
    }

    def verdict(key: str) -> str:
        return "PASS" if passes[key] else "FAIL"

    print()
    print(f"  {'what':<52} {'count':>6} {'events/s':>10}  {'p50 µs':>9}  {'p99 µs':>9}"
          f"  {'max µs':>9}")
    print(f"  {'durable append (synchronous=FULL, 1 per commit)':<52} {args.appends:>6} "
          f"{durable_rate:>10.0f}  {fmt(durable)}")
    print(f"  {'baseline: same append, synchronous=OFF':<52} {args.baseline_appends:>6} "
          f"{base_rate:>10.0f}  {fmt(base)}")
    print(f"  {'durable append, full outbox (10,000; evicting)':<52} {args.full_appends:>6} "
          f"{full_rate:>10.0f}  {fmt(full)}")
    print(f"  {f'pending({args.batch}) + ack, per round':<52} {drained:>6} "
          f"{drain_rate:>10.0f}  {fmt(drain)}")
    print()
    print(f"  durable / baseline throughput: {ratio} (the price of fsync: "
          f"{durable['p50'] - base['p50']:.1f} µs per event at p50)")
    print(f"  durable events/s {durable_rate:.0f}: {verdict('durable_events_per_s')} "
          f"(target >= {TARGET_EVENTS_PER_S:g})")
    print(f"  durable append p99 {durable['p99']:.1f} µs: {verdict('durable_p99_us')} "
          f"(target <= {TARGET_P99_US:g} µs)")
    print(f"  full-outbox append p99 {full['p99']:.1f} µs: {verdict('full_outbox_p99_us')} "
          f"(target <= {TARGET_P99_US:g} µs; {evicted} telemetry events evicted)")
    print(f"  pending+ack {drain_rate:.0f} events/s: {verdict('drain_events_per_s')} "
          f"(target >= {TARGET_DRAIN_PER_S:g})")
    elapsed = time.monotonic() - t_all
    print(f"\ntotal {elapsed:.1f} s; overall: {'PASS' if all(passes.values()) else 'FAIL'}")
    out = {
        "durable_events_per_s": round(durable_rate, 1),
        "durable_append_us": durable,
        "baseline_sync_off_events_per_s": round(base_rate, 1),
        "baseline_sync_off_append_us": base,
        "durable_over_baseline": ratio,
        "full_outbox_events_per_s": round(full_rate, 1),
        "full_outbox_append_us": full,
        "full_outbox_evicted": evicted,
        "drain_events_per_s": round(drain_rate, 1),
        "drain_round_us": drain,
        "targets": {
            "durable_events_per_s_min": TARGET_EVENTS_PER_S,
            "append_p99_us_max": TARGET_P99_US,
            "drain_events_per_s_min": TARGET_DRAIN_PER_S,
        },
        "pass": {**passes, "all": all(passes.values())},
        "runs": {
            "appends": args.appends,
            "baseline_appends": args.baseline_appends,
            "full_appends": args.full_appends,
            "capacity": DEFAULT_CAPACITY,
            "drain": args.drain,
            "batch": args.batch,
            "filesystem": fs,
            "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(),
            "elapsed_s": round(elapsed, 1),
        },
    }
    print(json.dumps(out, separators=(",", ":")))
    return 0 if all(passes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
