"""Benchmark: from a state change in the daemon to the screen showing it.

Run from the repository root, with the project installed (and Debian's chromium)::

    python bench/screen.py                # defaults: 50 calls, 3 changes each
    python bench/screen.py --help         # --calls, --size

What it measures (issue 6, item 6)
----------------------------------
The real :class:`tabletd.daemon.Daemon` runs in this process on simulated hardware
(``config/sim.toml``, status API on a free loopback port, the real CLOCK_BOOTTIME). Debian's
chromium, driven by Playwright, shows the screen (``/``) at ``--size``. For each call the bench
feeds the session machine three inputs, one at a time, each once the previous screen is
showing:

* ``GrantReceived`` (window open)  -> ``upcoming``
* ``StartCall``                    -> ``live`` (the relative's media is not running: no server)
* ``EndByServer``                  -> ``ended``

The start of each sample is ``time.time_ns()`` just before ``Daemon.submit``; its end is the
instant the page stamps when it shows that screen: ``performance.timeOrigin +
performance.now()`` in the first animation frame after it rendered the pushed status
(``window.tabletd.stats.shown``), i.e. just before that frame is painted. The two clocks are
aligned first: 30 round trips read the page's clock between two reads of this process's, and
the one with the shortest round trip gives the offset (its half round trip is printed as the
alignment's uncertainty).

**Baseline, same run:** a bare ``websockets`` client on ``/v1/status/stream`` in this process,
stamping ``time.time_ns()`` when the message with the new screen arrives. The page's figure
minus the baseline's is what the browser adds (parse, render, the frame); the ratio is
printed too.

Targets: p50 <= 50 ms and p99 <= 250 ms (the ended screen within 250 ms of the cut).

How to read it
--------------
A table of p50 / p99 / max in milliseconds per change, for the screen and the bare client,
then one JSON line with every figure, the targets and the verdicts. Exit status 0 when every
target is met, 1 otherwise. A benchmark, not a timed test: other work on the machine shows up
in the tails; headless chromium here renders in software (``--disable-gpu``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import summary
from playwright.async_api import Page, async_playwright
from websockets.asyncio.client import connect

from tabletd.clock import NS_PER_MS, NS_PER_S
from tabletd.config import Config, load_config
from tabletd.daemon import Daemon
from tabletd.session import EndByServer, Grant, GrantReceived, LinkChanged, StartCall

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SIM_CONFIG = Path(__file__).resolve().parent.parent / "config" / "sim.toml"
TARGET_P50_MS = 50.0
TARGET_P99_MS = 250.0
CHANGES = ("upcoming", "live", "ended")


def bench_config() -> Config:
    """config/sim.toml with the status API on a free loopback port."""
    cfg = load_config(SIM_CONFIG)
    return dataclasses.replace(cfg, status_api=dataclasses.replace(cfg.status_api, port=0))


class BareClient:
    """The baseline: stamps the arrival of each new screen on the push channel."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, int]] = []
        self.new = asyncio.Event()

    async def arrival_of(self, screen: str, after: int) -> int:
        """When ``screen`` arrived, among the arrivals from index ``after``."""
        while (t := next((t for s, t in self.arrivals[after:] if s == screen), None)) is None:
            await asyncio.wait_for(self.new.wait(), 5)
            self.new.clear()
        return t

    async def run(self, url: str) -> None:
        async with connect(url) as ws:
            last = None
            async for message in ws:
                screen = json.loads(message)["screen"]
                if screen != last:
                    self.arrivals.append((screen, time.time_ns()))
                    self.new.set()
                    last = screen


async def clock_offset_ms(page: Page, rounds: int = 30) -> tuple[float, float]:
    """The page's epoch ms minus ours, from the round trip with the least uncertainty."""
    best: tuple[float, float] | None = None
    for _ in range(rounds):
        t0 = time.time_ns()
        page_ms = float(await page.evaluate("performance.timeOrigin + performance.now()"))
        t1 = time.time_ns()
        half = (t1 - t0) / 2 / NS_PER_MS
        offset = page_ms - (t0 + t1) / 2 / NS_PER_MS
        if best is None or half < best[1]:
            best = (offset, half)
    assert best is not None
    return best


async def shown_count(page: Page) -> int:
    return int(await page.evaluate("window.tabletd.stats.screensShown"))


async def wait_shown(page: Page, screen: str, after: int, within: float = 5.0) -> float:
    """The page's stamp of the first showing of ``screen`` numbered above ``after`` (the page
    keeps its last 100 screens, each numbered)."""
    end = time.monotonic() + within
    query = (f"window.tabletd.stats.shown.filter(e => e.n > {after} && e.screen === {screen!r})"
             ".map(e => e.at)")
    while True:
        stamps: list[float] = await page.evaluate(query)
        if stamps:
            return stamps[0]
        if time.monotonic() > end:
            raise TimeoutError(f"the page did not show {screen!r} within {within} s")
        await asyncio.sleep(0.005)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    w, h = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(bench_config(), Path(tmp) / "state", environ={})
        task = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 10)
        port = daemon.status_server.port
        bare = BareClient()
        bare_task = asyncio.create_task(bare.run(f"ws://127.0.0.1:{port}/v1/status/stream"))
        page_ms: dict[str, list[float]] = {c: [] for c in CHANGES}
        bare_ms: dict[str, list[float]] = {c: [] for c in CHANGES}
        try:
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = await browser.new_page(viewport={"width": w, "height": h})
                await page.goto(f"http://127.0.0.1:{port}/")
                await wait_shown(page, "idle", 0)
                offset, uncertainty = await clock_offset_ms(page)
                daemon.submit(LinkChanged(True))
                for n in range(1, args.calls + 1):
                    now = daemon.clock.boot_ns()
                    sid = f"bench-{n}"
                    grant = Grant(sid, daemon.cfg.device.id, "bench", now - NS_PER_S,
                                  now + 3600 * NS_PER_S, 600 * NS_PER_S)
                    for change, event in zip(CHANGES, (GrantReceived(grant), StartCall(sid),
                                                       EndByServer(sid)), strict=True):
                        seen = len(bare.arrivals)
                        before = await shown_count(page)
                        t0 = time.time_ns()
                        daemon.submit(event)
                        shown = await wait_shown(page, change, before)
                        page_ms[change].append(shown - offset - t0 / NS_PER_MS)
                        arrived = await bare.arrival_of(change, seen)
                        bare_ms[change].append((arrived - t0) / NS_PER_MS)
                await browser.close()
        finally:
            bare_task.cancel()
            daemon.request_stop()
            await task
    return {"page": page_ms, "bare": bare_ms, "offset_uncertainty_ms": uncertainty}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=50, help="calls, 3 screen changes each")
    p.add_argument("--size", default="800x480", help="the page's viewport, WxH")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls {args.calls}: must be at least 1")
    if not Path(CHROMIUM).exists():
        print(f"bench/screen.py: {CHROMIUM} is missing (bash tools/dev test installs it)",
              file=sys.stderr)
        return 2
    print(f"screen benchmark: {args.calls} calls x {len(CHANGES)} changes, page {args.size}")
    res = asyncio.run(run(args))
    every_page = [v for c in CHANGES for v in res["page"][c]]
    every_bare = [v for c in CHANGES for v in res["bare"][c]]
    print(f"  clock alignment uncertainty: +/- {res['offset_uncertainty_ms']:.3f} ms\n")
    print(f"  {'change -> shown (ms)':<24} {'who':<12} {'p50':>8} {'p99':>8} {'max':>8}")
    rows = [(c, res["page"][c], res["bare"][c]) for c in CHANGES]
    rows.append(("all", every_page, every_bare))
    for change, page_v, bare_v in rows:
        for who, values in (("screen", page_v), ("bare client", bare_v)):
            s = summary(values)
            print(f"  {change:<24} {who:<12} {s['p50']:>8.2f} {s['p99']:>8.2f} {s['max']:>8.2f}")
    page_s, bare_s = summary(every_page), summary(every_bare)
    ratio = round(page_s["p50"] / bare_s["p50"], 1) if bare_s["p50"] > 0 else None
    ok_p50 = page_s["p50"] <= TARGET_P50_MS
    ok_p99 = page_s["p99"] <= TARGET_P99_MS
    print(f"\n  screen p50 {page_s['p50']:.2f} ms (target <= {TARGET_P50_MS:g}): "
          f"{'PASS' if ok_p50 else 'FAIL'}; p99 {page_s['p99']:.2f} ms "
          f"(target <= {TARGET_P99_MS:g}): {'PASS' if ok_p99 else 'FAIL'}; "
          f"screen / bare client p50: {ratio}")
    out = {
        "bench": "screen", "calls": args.calls, "size": args.size,
        "screen_ms": page_s, "bare_client_ms": bare_s, "ratio_p50": ratio,
        "per_change_screen_ms": {c: summary(res["page"][c]) for c in CHANGES},
        "clock_uncertainty_ms": round(res["offset_uncertainty_ms"], 3),
        "targets": {"screen_p50_ms": TARGET_P50_MS, "screen_p99_ms": TARGET_P99_MS},
        "pass": {"screen_p50": ok_p50, "screen_p99": ok_p99},
    }
    print(json.dumps(out, separators=(",", ":")))
    return 0 if ok_p50 and ok_p99 else 1


if __name__ == "__main__":
    sys.exit(main())
