"""Benchmark: how late does tabletd cut the camera rail, and how fast does it start?

Run from the repository root, with the project installed::

    python bench/cutoff.py                # defaults: 200 sessions per condition, 20 starts
    python bench/cutoff.py --help         # counts, call lengths, blocking time, burners

What it measures (BRIEF invariant 3; issue 2, item 10)
------------------------------------------------------
1. **Cut-off lateness.** The real :class:`tabletd.daemon.Daemon` runs in this process on
   simulated hardware (``config/sim.toml``, a temporary state directory, status API on port
   0). For each session the bench reports the link up (as the demo does), feeds
   ``GrantReceived`` + ``StartCall`` for a short call (30-60 ms by default) and reads the
   rail guard's own record of the cut: ``guard.last_cut.lateness_ns``, the instant stamped
   right after the enable pin was driven low, minus the deadline, both on CLOCK_BOOTTIME.
   This is the official figure. Beside it, "sim enable pin low" is the same cut timed at the
   moment the simulated enable pin changed, *before* the sim board mirrors the rail to a
   file (``<state dir>/sim/rail``, for other processes): the difference is that file I/O,
   which real GPIO does not have. Three conditions, each with a fresh daemon:

   * ``normal``       - nothing else going on;
   * ``loop_blocked`` - the asyncio loop is blocked across every deadline by a GIL-holding
     pure-Python busy loop (``--block-ms``, centred on the deadline): only the enforcement
     thread can cut on time;
   * ``cpu_busy``     - ``--burners`` CPU-burner processes (default: one per core) run for the
     whole condition; they are always killed at the end.
   * ``loop_blocked_cpu_busy`` (only with ``--combined``) - both at once. The enforcement
     thread runs at SCHED_FIFO but is a Python thread: it must take the GIL from the
     normal-priority loop thread, which the burners may keep off the CPU.

   Target in every condition: p99 <= 5 ms and max <= 20 ms.

2. **Baseline: coreutils ``timeout``**, what a user would reach for: ``timeout D sleep 10``
   with the same call lengths and the same count, lateness = the moment ``waitpid`` returns
   minus (spawn instant + D), on the same clock. Its conditions: ``normal``; ``child_busy``
   (the supervised child is a CPU-bound shell loop across the deadline - the nearest
   analogue of a blocked loop, since blocking *this* process's loop does not touch an
   external timer); ``cpu_busy`` (the same burners). The ratios are tabletd / timeout
   (below 1: tabletd cuts sooner).

3. **Start-up.** ``tabletd run`` is spawned (the venv's entry point) with ``NOTIFY_SOCKET``
   on an AF_UNIX datagram socket this bench binds; time from spawn to the READY=1 datagram
   (target: median <= 0.5 s) and the daemon's VmRSS once ready (target: every start
   <= 40 MB); each daemon is then stopped with SIGTERM (the time to exit is shown too).
   Beside it, with the same interpreter, a bare ``python -c 'import asyncio, websockets'``:
   its spawn-to-exit time and its VmRSS after the imports.

How to read it
--------------
The table gives p50 / p99 / max in milliseconds (start-up in seconds), the target and
PASS/FAIL; "cut by" tells which layer turned the rail off (``thread``: the enforcement
thread, ``loop``: the asyncio core). The last line printed is one JSON object with every
figure, the targets and the pass/fail verdicts, for machines to read. The exit status is 0
when every target is met, 1 otherwise. This is a benchmark, not a timed test: figures
depend on the machine (core count, RT scheduling permission and the load average are
printed): other work on the machine shows up as tails. Where the "sim enable pin low" rows
pass and the official rows do not, the gap is the simulated board's rail-file mirror.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchlib import summary

try:
    from tabletd.clock import NS_PER_MS, NS_PER_S
    from tabletd.config import Config, load_config
    from tabletd.daemon import Daemon
    from tabletd.logs import setup_logging
    from tabletd.session import (
        Action,
        Grant,
        GrantReceived,
        LinkChanged,
        RailOn,
        Record,
        StartCall,
    )
except ImportError as exc:  # pragma: no cover - a usage error, said plainly
    raise SystemExit(f"bench/cutoff.py: {exc}; run it with the interpreter tabletd is "
                     "installed in, e.g. .venv/bin/python bench/cutoff.py") from None

REPO = Path(__file__).resolve().parent.parent
SIM_CONFIG = REPO / "config" / "sim.toml"

TARGET_P99_MS = 5.0
TARGET_MAX_MS = 20.0
TARGET_READY_S = 0.5
TARGET_RSS_MB = 40.0

CONDITIONS = ("normal", "loop_blocked", "cpu_busy")
COMBINED = "loop_blocked_cpu_busy"  # opt-in (--combined): both at once, tabletd only
TIMEOUT_CONDITIONS = {"normal": "normal", "loop_blocked": "child_busy", "cpu_busy": "cpu_busy"}


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


# ---- statistics ---------------------------------------------------------------------------



# ---- CPU burners --------------------------------------------------------------------------


@contextlib.contextmanager
def burners(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` pure-CPU processes for the duration of the block; always killed."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.2)  # let them reach full speed
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in procs:
            p.wait()


def busy(seconds: float) -> None:
    """Hold the GIL in pure Python: the worst case for the enforcement thread."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1


# ---- 1. tabletd cut-off lateness ------------------------------------------------------------


@dataclasses.dataclass
class CutResult:
    lateness_ms: list[float]
    pin_ms: list[float]  # deadline to the simulated enable pin going low (sim only)
    by: Counter[str]
    missed: int  # sessions without a deadline cut record (must be 0)
    rail_on_after: int  # sessions where the rail was still on after the call (must be 0)
    seconds: float


def bench_config(sim_config: Path, realtime_priority: int | None) -> Config:
    cfg = load_config(sim_config)
    if cfg.hardware.backend != "sim":
        raise SystemExit(f"{sim_config}: the bench needs [hardware] backend = \"sim\"")
    cfg = dataclasses.replace(
        cfg,
        status_api=dataclasses.replace(cfg.status_api, port=0),
        sim=dataclasses.replace(cfg.sim, self_grant_s=0),
    )
    if realtime_priority is not None:
        cfg = dataclasses.replace(
            cfg, enforcement=dataclasses.replace(cfg.enforcement,
                                                 realtime_priority=realtime_priority)
        )
    return cfg


async def run_sessions(cfg: Config, durations_ms: Sequence[float], block_ms: float,
                       state_root: str | None = None) -> CutResult:
    """One fresh daemon; one short call per duration; ``block_ms`` > 0 blocks the loop across
    each deadline. Returns the guard's measured lateness of each cut."""
    with tempfile.TemporaryDirectory(prefix="tabletd-bench-", dir=state_root) as tmp:
        daemon = Daemon(cfg, Path(tmp), environ={})
        rail_on_until: list[int] = []
        live, ended = asyncio.Event(), asyncio.Event()

        def observe(action: Action, now: int) -> None:  # called on the loop, by _apply
            if isinstance(action, RailOn):
                rail_on_until.append(action.until_ns)
                live.set()
            elif isinstance(action, Record) and action.kind == "call_ended":
                ended.set()

        daemon.on_action = observe
        runner = asyncio.create_task(daemon.run(), name="daemon")
        ready = asyncio.create_task(daemon.ready.wait())
        done, _ = await asyncio.wait({runner, ready}, timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        if runner in done or ready not in done:
            ready.cancel()
            if runner in done:
                runner.result()  # raise the daemon's error
            raise RuntimeError("daemon did not become ready within 10 s")
        guard = daemon.guard
        assert guard is not None and daemon.hardware is not None
        # Secondary figure: when the simulated enable pin itself went low. The sim mirrors the
        # rail to a file (for other processes) after that and before the guard stamps its
        # CutRecord; this separates the enforcement latency from the mirror's file I/O.
        pin_low: list[int] = []
        world = daemon.hardware.sim
        if world is not None:
            mirror = world.rail_changed

            def rail_changed(on: bool) -> None:
                if not on:
                    pin_low.append(time.clock_gettime_ns(time.CLOCK_BOOTTIME))
                mirror(on)

            world.rail_changed = rail_changed  # type: ignore[method-assign]
        result = CutResult([], [], Counter(), 0, 0, 0.0)
        t_start = time.monotonic()
        try:
            for i, dur_ms in enumerate(durations_ms):
                rail_on_until.clear()
                pin_low.clear()
                live.clear()
                ended.clear()
                now = daemon.clock.boot_ns()
                grant = Grant(
                    session_id=f"bench-{i}",
                    device_id=cfg.device.id,
                    contact_label="bench",
                    not_before_ns=now,
                    not_after_ns=now + 60 * NS_PER_S,
                    max_duration_ns=int(dur_ms * NS_PER_MS),
                )
                daemon.submit(LinkChanged(True))  # stands in for the central link; idempotent
                daemon.submit(GrantReceived(grant))
                daemon.submit(StartCall(grant.session_id))
                # Wait for the machine to power the rail (RailOn carries the deadline).
                try:
                    await asyncio.wait_for(live.wait(), 2)
                except TimeoutError:
                    raise RuntimeError(f"session {i} never went live "
                                       f"(state {daemon.machine.state})") from None
                deadline = daemon.machine.snapshot.deadline_ns
                assert deadline is not None and rail_on_until[-1] == deadline
                if block_ms > 0:
                    lead_s = (deadline - daemon.clock.boot_ns()) / NS_PER_S - block_ms / 2000
                    if lead_s > 0:
                        await asyncio.sleep(lead_s)
                    busy(block_ms / 1000)  # deliberately blocks the loop across the deadline
                else:
                    await asyncio.sleep(max(0.0, (deadline - daemon.clock.boot_ns()) / NS_PER_S))
                # Let the machine see the end of the call (state ENDED, rail off).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), 2)
                cut = guard.last_cut
                if guard.rail_on:
                    result.rail_on_after += 1
                if cut is None or cut.lateness_ns is None or cut.due_ns != deadline:
                    result.missed += 1
                    continue
                result.lateness_ms.append(cut.lateness_ns / NS_PER_MS)
                if pin_low:
                    result.pin_ms.append((pin_low[0] - deadline) / NS_PER_MS)
                result.by[cut.by] += 1
        finally:
            result.seconds = time.monotonic() - t_start
            daemon.request_stop()
            await runner
        return result


# ---- 2. coreutils timeout baseline ----------------------------------------------------------


def run_timeouts(durations_ms: Sequence[float], child: Sequence[str]) -> tuple[list[float], int]:
    """``timeout D <child>`` per duration; lateness = waitpid return - (spawn + D), in ms.
    Returns the latenesses and how many did not end by timeout (exit status other than 124)."""
    out: list[float] = []
    odd = 0
    env = dict(os.environ)
    for dur_ms in durations_ms:
        arg = f"{dur_ms / 1000:.4f}"
        start = boot_ns()
        pid = os.posix_spawnp("timeout", ["timeout", arg, *child], env)
        _, status = os.waitpid(pid, 0)
        end = boot_ns()
        if os.waitstatus_to_exitcode(status) != 124:
            odd += 1
        out.append((end - (start + int(float(arg) * NS_PER_S))) / NS_PER_MS)
    return out, odd


# ---- 3. start to READY=1, RSS -------------------------------------------------------------


def vmrss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {value!r} as TOML")


def write_run_config(sim_config: Path, dest: Path, state_dir: Path) -> None:
    """The sim config with the status API on port 0 and the state dir in ``state_dir``."""
    import tomllib

    data = tomllib.loads(sim_config.read_text(encoding="utf-8"))
    data.setdefault("status_api", {})["port"] = 0
    data.setdefault("paths", {})["state_dir"] = str(state_dir)
    lines = ["# written by bench/cutoff.py"]
    for table, values in data.items():
        if not isinstance(values, dict):
            raise TypeError(f"{sim_config}: top-level key {table!r} is not a table")
        lines.append(f"\n[{table}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    load_config(dest)  # fail here, with the config's own message, if it is wrong


def tabletd_command() -> list[str]:
    exe = Path(sys.executable).parent / "tabletd"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tabletd"]


@dataclasses.dataclass
class StartResult:
    ready_s: list[float]
    rss_mb: list[float]
    stop_s: list[float]
    bare_s: list[float]
    bare_rss_mb: list[float]


def one_start(cmd: list[str], workdir: Path, index: int) -> tuple[float, float, float]:
    """Spawn the daemon; return (spawn-to-READY s, RSS MB once ready, SIGTERM-to-exit s)."""
    state_dir = workdir / f"state-{index}"
    config = workdir / f"run-{index}.toml"
    write_run_config(SIM_CONFIG, config, state_dir)
    sock_path = workdir / f"notify-{index}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    env = {k: v for k, v in os.environ.items()
           if k not in ("WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "LISTEN_FDS")}
    env["NOTIFY_SOCKET"] = str(sock_path)
    with open(workdir / f"daemon-{index}.log", "wb") as log_file:
        t0 = time.monotonic()
        proc = subprocess.Popen([*cmd, "run", "--config", str(config),
                                 "--state-dir", str(state_dir)],
                                env=env, stdout=log_file, stderr=log_file)
        try:
            while True:
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    raise RuntimeError(f"no READY=1 within 10 s; see {log_file.name}") from None
                if b"READY=1" in data.split(b"\n"):
                    ready = time.monotonic() - t0
                    break
            rss = vmrss_kb(proc.pid) / 1024
            t1 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=10)
            stopped = time.monotonic() - t1
            if code != 0:
                raise RuntimeError(f"tabletd run exited {code} on SIGTERM; see {log_file.name}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            sock.close()
    return ready, rss, stopped


BARE_SCRIPT = (
    "import asyncio, websockets\n"
    "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))\n"
)


def one_bare() -> tuple[float, float]:
    """``python -c 'import asyncio, websockets'``: (spawn-to-exit s, VmRSS MB after imports)."""
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", BARE_SCRIPT], capture_output=True, check=True)
    return time.monotonic() - t0, int(out.stdout.split()[0]) / 1024


def run_starts(count: int) -> StartResult:
    cmd = tabletd_command()
    res = StartResult([], [], [], [], [])
    with tempfile.TemporaryDirectory(prefix="tabletd-bench-start-") as tmp:
        for i in range(count):  # interleaved, so both see the same machine state
            ready, rss, stopped = one_start(cmd, Path(tmp), i)
            res.ready_s.append(ready)
            res.rss_mb.append(rss)
            res.stop_s.append(stopped)
            bare, bare_rss = one_bare()
            res.bare_s.append(bare)
            res.bare_rss_mb.append(bare_rss)
    return res


# ---- report ---------------------------------------------------------------------------------


def rt_available(priority: int) -> bool:
    """Whether this process may use SCHED_FIFO at ``priority`` (as the guard thread asks)."""
    if priority <= 0:
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError:
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return True


def fmt(stats: dict[str, float], unit_digits: int = 3) -> str:
    return "  ".join(f"{stats[k]:>8.{unit_digits}f}" for k in ("p50", "p99", "max"))


def ratio(a: float, b: float) -> float | None:
    return None if b <= 0 else round(a / b, 4)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=200,
                   help="sessions (and timeout runs) per condition (default 200)")
    p.add_argument("--min-ms", type=float, default=30.0, help="shortest call (default 30)")
    p.add_argument("--max-ms", type=float, default=60.0, help="longest call (default 60)")
    p.add_argument("--block-ms", type=float, default=30.0,
                   help="loop_blocked: how long the loop is blocked, centred on the deadline "
                        "(default 30)")
    p.add_argument("--burners", type=int, default=max(2, os.cpu_count() or 2),
                   help="cpu_busy: CPU-burner processes (default: one per core, at least 2)")
    p.add_argument("--starts", type=int, default=20,
                   help="daemon starts for READY/RSS (default 20)")
    p.add_argument("--realtime-priority", type=int, default=None,
                   help="override [enforcement] realtime_priority (0: normal scheduling)")
    p.add_argument("--combined", action="store_true",
                   help=f"also run {COMBINED}: the loop blocked across each deadline while "
                        "the burners run (tabletd only; judged against the same targets)")
    p.add_argument("--state-root", default=None,
                   help="where the temporary state directories go (default: the system "
                        "temp dir); the sim mirrors the rail to a file there")
    p.add_argument("--seed", type=int, default=1, help="call-length random seed (default 1)")
    args = p.parse_args(argv)
    if args.count < 2 or args.starts < 2:
        p.error("--count and --starts must be at least 2")
    if not 0 < args.min_ms <= args.max_ms:
        p.error("need 0 < --min-ms <= --max-ms")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("error")
    cfg = bench_config(SIM_CONFIG, args.realtime_priority)
    rng = random.Random(args.seed)
    durations = [rng.uniform(args.min_ms, args.max_ms) for _ in range(args.count)]
    prio = cfg.enforcement.realtime_priority
    t_all = time.monotonic()
    load_before = os.getloadavg()[0]
    print(f"tabletd cut-off bench: {args.count} calls of {args.min_ms:g}-{args.max_ms:g} ms per "
          f"condition; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}; enforcement "
          f"thread SCHED_FIFO {prio} "
          f"({'allowed' if rt_available(prio) else 'NOT available: normal scheduling'})",
          flush=True)
    print(f"  load average before: {load_before:.2f} (other work on this machine skews "
          "every figure)", flush=True)

    cuts: dict[str, CutResult] = {}
    timeouts: dict[str, tuple[list[float], int]] = {}
    sh_busy = ["sh", "-c", "while :; do :; done"]
    conditions = [*CONDITIONS, *([COMBINED] if args.combined else [])]
    for cond in conditions:
        print(f"  running {cond} ...", flush=True)
        with contextlib.ExitStack() as stack:
            if cond.endswith("cpu_busy"):
                stack.enter_context(burners(args.burners))
            block = args.block_ms if cond.startswith("loop_blocked") else 0.0
            cuts[cond] = asyncio.run(run_sessions(cfg, durations, block, args.state_root))
            if cond in TIMEOUT_CONDITIONS:
                child = sh_busy if cond == "loop_blocked" else ["sleep", "10"]
                timeouts[TIMEOUT_CONDITIONS[cond]] = run_timeouts(durations, child)
    print("  running start-up ...", flush=True)
    starts = run_starts(args.starts)

    figures: dict[str, Any] = {}
    passes: dict[str, bool] = {}
    print()
    print("cut-off lateness, deadline to rail off (ms)")
    print(f"  {'what':<42} {'runs':>5}  {'p50':>8}  {'p99':>8}  {'max':>8}  {'verdict':<8} notes")
    for cond in conditions:
        r = cuts[cond]
        s = summary(r.lateness_ms)
        figures[f"cutoff_{cond}_ms"] = s
        ok = (r.missed == 0 and r.rail_on_after == 0 and len(r.lateness_ms) == args.count
              and s["p99"] <= TARGET_P99_MS and s["max"] <= TARGET_MAX_MS)
        passes[f"cutoff_{cond}"] = ok
        by = ", ".join(f"{k} {v}" for k, v in sorted(r.by.items()))
        notes = f"cut by {by}"
        if r.missed or r.rail_on_after:
            notes += f"; MISSED {r.missed}, rail on after {r.rail_on_after}"
        print(f"  {'tabletd ' + cond:<42} {len(r.lateness_ms):>5}  {fmt(s)}  "
              f"{'PASS' if ok else 'FAIL':<8} {notes}")
    for cond in conditions:
        r = cuts[cond]
        s = summary(r.pin_ms)
        figures[f"pin_low_{cond}_ms"] = s
        print(f"  {'  sim enable pin low ' + cond:<42} {len(r.pin_ms):>5}  {fmt(s)}  "
              f"{'-':<8} same cuts, before the sim's rail-file mirror")
    for cond in CONDITIONS:
        tcond = TIMEOUT_CONDITIONS[cond]
        values, odd = timeouts[tcond]
        s = summary(values)
        figures[f"timeout_{tcond}_ms"] = s
        notes = "baseline" + (f"; {odd} not ended by timeout" if odd else "")
        print(f"  {'coreutils timeout ' + tcond:<42} {len(values):>5}  {fmt(s)}  {'-':<8} {notes}")
    print(f"  targets: p99 <= {TARGET_P99_MS:g} ms, max <= {TARGET_MAX_MS:g} ms in every "
          "tabletd condition")

    print()
    print("tabletd / timeout (below 1: tabletd is less late)")
    print(f"  {'pair':<42} {'p50':>8}  {'p99':>8}  {'max':>8}")
    ratios: dict[str, dict[str, float | None]] = {}
    for cond in CONDITIONS:
        tcond = TIMEOUT_CONDITIONS[cond]
        a, b = figures[f"cutoff_{cond}_ms"], figures[f"timeout_{tcond}_ms"]
        rr = {k: ratio(a[k], b[k]) for k in ("p50", "p99", "max")}
        ratios[f"{cond}_vs_{tcond}"] = rr
        cells = "  ".join("       -" if v is None else f"{v:>8.3f}" for v in rr.values())
        print(f"  {cond + ' / ' + tcond:<42} {cells}")
    figures["ratio_tabletd_over_timeout"] = ratios

    print()
    print("start-up (s) and memory (MB)")
    print(f"  {'what':<42} {'runs':>5}  {'p50':>8}  {'p99':>8}  {'max':>8}  verdict")
    ready = summary(starts.ready_s)
    rss = summary(starts.rss_mb, 1)
    stop = summary(starts.stop_s)
    bare = summary(starts.bare_s)
    bare_rss = summary(starts.bare_rss_mb, 1)
    passes["ready"] = ready["p50"] <= TARGET_READY_S
    passes["rss"] = rss["max"] <= TARGET_RSS_MB  # every start
    n = args.starts
    print(f"  {'tabletd run: spawn to READY=1 (s)':<42} {n:>5}  {fmt(ready)}  "
          f"{'PASS' if passes['ready'] else 'FAIL'} (target p50 <= {TARGET_READY_S:g} s; "
          f"first start: {starts.ready_s[0]:.3f} s)")
    print(f"  {'tabletd run: VmRSS once ready (MB)':<42} {n:>5}  {fmt(rss, 1)}  "
          f"{'PASS' if passes['rss'] else 'FAIL'} (target <= {TARGET_RSS_MB:g} MB)")
    print(f"  {'tabletd run: SIGTERM to exit (s)':<42} {n:>5}  {fmt(stop)}  -")
    print(f"  {'bare python import asyncio,websockets (s)':<42} {n:>5}  {fmt(bare)}  -")
    print(f"  {'bare python: VmRSS after imports (MB)':<42} {n:>5}  {fmt(bare_rss, 1)}  -")
    figures.update({
        "ready_s": ready,
        "ready_first_s": round(starts.ready_s[0], 3),
        "ready_rss_mb": rss,
        "stop_s": stop,
        "bare_python_start_s": bare,
        "bare_python_rss_mb": bare_rss,
    })

    elapsed = time.monotonic() - t_all
    print(f"\ntotal {elapsed:.1f} s; overall: {'PASS' if all(passes.values()) else 'FAIL'}")
    out = {
        **figures,
        "targets": {
            "cutoff_p99_ms": TARGET_P99_MS,
            "cutoff_max_ms": TARGET_MAX_MS,
            "ready_s_p50": TARGET_READY_S,
            "ready_rss_mb_max": TARGET_RSS_MB,
        },
        "pass": {**passes, "all": all(passes.values())},
        "runs": {
            "sessions_per_condition": args.count,
            "call_ms": [args.min_ms, args.max_ms],
            "block_ms": args.block_ms,
            "burners": args.burners,
            "starts": args.starts,
            "cpus": os.cpu_count(),
            "realtime_priority": prio,
            "cut_by": {c: dict(cuts[c].by) for c in conditions},
            "missed": {c: cuts[c].missed for c in conditions},
            "load_avg_1m_before": round(load_before, 2),
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "elapsed_s": round(elapsed, 1),
        },
    }
    print(json.dumps(out, separators=(",", ":")))
    return 0 if all(passes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
