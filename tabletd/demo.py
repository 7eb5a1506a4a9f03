"""The in-process demo on simulated hardware (until the link exists).

A short granted call goes live; shortly before its deadline the asyncio loop is blocked by a
CPU-bound task, across the deadline; the enforcement thread still cuts on time. Everything
is printed as a timeline with the measured lateness, then the durable event log.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path

from tabletd.clock import NS_PER_MS, NS_PER_S
from tabletd.config import Config
from tabletd.daemon import Daemon
from tabletd.events import EventStore
from tabletd.logs import setup_logging
from tabletd.session import (
    Action,
    Grant,
    GrantReceived,
    LinkChanged,
    Persist,
    RailOff,
    RailOn,
    Record,
    SetBacklight,
    SetLed,
    ShowScreen,
    StartCall,
)


def run_demo(cfg: Config, args: argparse.Namespace) -> int:
    setup_logging("warning")
    if cfg.hardware.backend != "sim":
        print("the demo runs on simulated hardware only: use config/sim.toml")
        return 2
    with tempfile.TemporaryDirectory(prefix="tabletd-demo-") as tmp:
        state_dir = Path(args.state_dir) if args.state_dir else Path(tmp)
        cfg = dataclasses.replace(
            cfg, status_api=dataclasses.replace(cfg.status_api, port=0),
            sim=dataclasses.replace(cfg.sim, self_grant_s=0),
        )
        return asyncio.run(_scenario(cfg, state_dir, args.call_seconds, args.block_seconds))


def _describe(action: Action) -> str | None:
    match action:
        case RailOn(until_ns=until):
            return f"machine: rail ON until boot+{until / NS_PER_S:.3f}s"
        case RailOff(reason=reason):
            return f"machine: rail OFF ({reason})"
        case Record(kind=kind):
            return f"event:   {kind}"
        case ShowScreen(screen=screen):
            return f"screen:  {screen}"
        case SetLed(colour=colour):
            return f"led:     {colour}"
        case SetBacklight() | Persist():
            return None
    return None


async def _scenario(cfg: Config, state_dir: Path, call_s: float, block_s: float) -> int:
    daemon = Daemon(cfg, state_dir, environ={})
    t0 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def say(text: str, at_ns: int | None = None) -> None:
        at = (at_ns if at_ns is not None else time.clock_gettime_ns(time.CLOCK_BOOTTIME)) - t0
        print(f"  {at / NS_PER_S:8.3f}s  {text}", flush=True)

    def observe(action: Action, now: int) -> None:
        text = _describe(action)
        if text:
            say(text, now)

    daemon.on_action = observe
    print("tabletd demo: one call on simulated hardware; the event loop will be blocked "
          f"for {block_s:.1f}s across the deadline\n")
    runner = asyncio.create_task(daemon.run())
    await daemon.ready.wait()
    assert daemon.guard is not None and daemon.hardware is not None
    world = daemon.hardware.sim
    assert world is not None
    say(f"daemon ready, rail {'ON' if world.rail_file_state() else 'off'} (sense confirmed)")
    now = daemon.clock.boot_ns()
    grant = Grant(
        session_id="demo-call-1",
        device_id=cfg.device.id,
        contact_label="Relative (demo)",
        not_before_ns=now,
        not_after_ns=now + int((call_s + 60) * NS_PER_S),
        max_duration_ns=int(call_s * NS_PER_S),
    )
    say(f"grant received: {call_s:.1f}s call (verified grants come from the link)")
    daemon.submit(LinkChanged(True))  # stands in for the central link (a later issue)
    daemon.submit(GrantReceived(grant))
    daemon.submit(StartCall(grant.session_id))
    await asyncio.sleep(0.05)
    deadline = daemon.machine.snapshot.deadline_ns
    assert deadline is not None
    say(f"deadline fixed at boot+{deadline / NS_PER_S:.3f}s (CLOCK_BOOTTIME)")
    await asyncio.sleep(max(0.0, (deadline - daemon.clock.boot_ns()) / NS_PER_S - block_s / 2))
    say(f"event loop BLOCKED by a CPU-bound task for {block_s:.1f}s")
    _busy(block_s)  # deliberately blocks this loop: the point of the demo
    say("event loop free again")
    await asyncio.sleep(0.1)
    cut = daemon.guard.last_cut
    rail_now = world.rail_file_state()
    daemon.request_stop()
    await runner
    print("\nresult")
    if cut is None or cut.lateness_ns is None:
        print("  no deadline cut was recorded: FAILED")
        return 1
    print(f"  rail cut by the {cut.by} layer at boot+{cut.at_ns / NS_PER_S:.3f}s, "
          f"{cut.lateness_ns / NS_PER_MS:.3f} ms after the deadline (budget 20 ms)")
    print(f"  rail now: {'ON' if rail_now else 'off'}")
    print("\ndurable event log (events.sqlite)")
    store = EventStore(daemon.paths.events)  # the daemon closed its own on stop
    for ev in store.all():
        print(f"  #{ev.seq:<3} {ev.kind:<18} {dict(ev.fields)}")
    store.close()
    ok = cut.lateness_ns <= 20 * NS_PER_MS and not rail_now
    verdict = "OK" if ok else "FAILED"
    print(f"\n{verdict}: the call ended at its deadline while the loop was blocked")
    return 0 if ok else 1


def _busy(seconds: float) -> None:
    """Hold the GIL in pure Python, the worst case for the enforcement thread."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
