"""The tablet's screen (issue 6) in a real headless browser: Debian's chromium driven by
Playwright, against the real daemon on simulated hardware.

Every screen is rendered at 800x480 and 1280x800 in French and English, its text checked,
its layout checked to fit, and screenshotted into ``$TABLETD_ARTIFACTS/screens`` (default
``build/artifacts/screens``). Without chromium these tests fail: ``tools/dev`` installs it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from playwright.async_api import Browser, Page, async_playwright
from websockets.asyncio.client import connect

from tabletd import ui
from tabletd.clock import NS_PER_S, BootClock
from tabletd.config import parse_config
from tabletd.errors import ConfigError
from tabletd.link.grants import ClockMapping
from tabletd.mcu.pty import start_sim_mcu, stop_sim_mcu
from tabletd.mcu.sim import send_control
from tabletd.session import (
    EndReason,
    Grant,
    GrantReceived,
    LinkChanged,
    StartCall,
    State,
    Tick,
)
from tabletd.statusapi import UI_CSP

from .conftest import REPO, sim_config, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--autoplay-policy=no-user-gesture-required"]
SIZES = {"800x480": (800, 480), "1280x800": (1280, 800)}
LANGS = ("fr", "en")
TZ = "Europe/Paris"
UI_DIR = REPO / "tabletd" / "ui"
TEXTS: dict[str, dict[str, str]] = {
    lang: json.loads((UI_DIR / "lang" / f"{lang}.json").read_text()) for lang in LANGS}


def artifacts() -> Path:
    base = Path(os.environ.get("TABLETD_ARTIFACTS", REPO / "build" / "artifacts"))
    path = base / "screens"
    path.mkdir(parents=True, exist_ok=True)
    return path


def t(lang: str, key: str, **values: object) -> str:
    return TEXTS[lang][key].format(**values)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium; a missing browser is a failure, never a skip."""
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: run `bash tools/dev test`"
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


class Screens:
    """One page per size and language, all on the same daemon."""

    def __init__(self, pages: dict[tuple[str, str], Page]) -> None:
        self.pages = pages
        self.requests: list[str] = []

    @classmethod
    async def open(cls, browser: Browser, port: int, *, default_lang: str = "fr") -> Screens:
        pages: dict[tuple[str, str], Page] = {}
        screens = cls(pages)
        for lang in LANGS:
            for size, (w, h) in SIZES.items():
                ctx = await browser.new_context(viewport={"width": w, "height": h},
                                                timezone_id=TZ)
                page = await ctx.new_page()
                page.on("request", lambda r: screens.requests.append(r.url))
                query = "" if lang == default_lang else f"?lang={lang}"
                await page.goto(f"http://127.0.0.1:{port}/{query}")
                pages[lang, size] = page
        return screens

    async def check(self, name: str, expected: dict[str, list[str]], *,
                    shot: str | None = None) -> None:
        """Wait for screen ``name`` on every page; check its texts and fit; screenshot it."""
        for (lang, size), page in self.pages.items():
            await page_wait(page, f"document.body.dataset.screen === {name!r}")
            for text in expected[lang]:
                await page_wait(page, f"document.body.innerText.includes({json.dumps(text)})")
            await check_fits(page, f"{name} {lang} {size}")
            await page.screenshot(path=artifacts() / f"{shot or name}-{lang}-{size}.png")


async def page_wait(page: Page, condition: str, within: float = 5.0) -> None:
    """Poll a JS condition on the page. (Playwright's wait_for_function evaluates strings,
    which the page's Content-Security-Policy forbids, rightly.)"""
    end = time.monotonic() + within
    while not await page.evaluate(condition):
        if time.monotonic() > end:
            shown = await page.evaluate("document.body.innerText")
            raise AssertionError(f"not within {within} s: {condition}; the page shows {shown!r}")
        await asyncio.sleep(0.01)


async def check_fits(page: Page, where: str) -> None:
    """No scrollbars, and no visible element cut by the viewport or by its own box."""
    problems = await page.evaluate("""() => {
        const d = document.documentElement, out = [];
        if (d.scrollWidth > innerWidth || d.scrollHeight > innerHeight)
            out.push(`document ${d.scrollWidth}x${d.scrollHeight}`);
        for (const el of document.querySelectorAll("#screen *")) {
            if (!el.getClientRects().length || getComputedStyle(el).visibility === "hidden")
                continue;
            const r = el.getBoundingClientRect();
            if (r.left < -0.5 || r.top < -0.5 || r.right > innerWidth + 0.5
                || r.bottom > innerHeight + 0.5)
                out.push(`${el.id || el.tagName} at ${r.left},${r.top},${r.right},${r.bottom}`);
            if (el.textContent.trim() && !el.children.length && el.scrollWidth > el.clientWidth + 1)
                out.push(`${el.id || el.tagName} text wider than its box`);
        }
        return out;
    }""")
    assert not problems, f"{where}: does not fit: {problems}"


class JumpClock:
    """CLOCK_BOOTTIME that runs (the daemon's threads need it to) and can jump ahead, so a
    20-minute call can reach its last minute at once."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def boot_ns(self) -> int:
        return BootClock().boot_ns() + self.offset_ns

    def advance(self, seconds: float) -> None:
        self.offset_ns += int(seconds * NS_PER_S)


def make_grant(now: int, sid: str, starts_in_s: float, duration_s: float) -> Grant:
    nb = now + int(starts_in_s * NS_PER_S)
    return Grant(sid, "tablet-sim-0001", "Papa", nb, nb + 3600 * NS_PER_S,
                 int(duration_s * NS_PER_S))


@pytest.mark.timeout(90)
async def test_every_screen_in_both_languages_and_sizes(
        browser: Browser, start_daemon, tmp_path: Path) -> None:
    # 1. idle and docked, with the simulated power/dock MCU on a real pty (battery shown)
    state = tmp_path / "mcu-state"
    mcu, device = start_sim_mcu(state, extra_args=["--battery-pct", "80",
                                                   "--drain-pct-per-min", "0"],
                                stderr=subprocess.DEVNULL)
    # this MCU, not the one config/sim.toml has the daemon start: its battery does not drain
    run = await start_daemon(sim_config(mcu={"port": device}, sim={"mcu": False}),
                             state_dir=state)
    try:
        d = run.daemon
        await wait_for(lambda: d.status()["power"] is not None, within=10)
        screens = await Screens.open(browser, d.status_server.port)
        await screens.check("idle", {lang: [t(lang, "idle_title"), t(lang, "battery", pct=80)]
                                     for lang in LANGS})
        send_control(state, {"dock": 2})
        await screens.check("docked", {lang: [t(lang, "docked_title"),
                                              t(lang, "battery", pct=80)] for lang in LANGS})
    finally:
        await run.stop()  # before its MCU goes
        stop_sim_mcu(mcu)

    # 2. a call, on a fake clock: upcoming, live, the warning, a link loss, the end
    clock = JumpClock()
    run = await start_daemon(sim_config(sim={"mcu": False}), state_dir=tmp_path / "call",
                             clock=clock)
    d = run.daemon
    screens = await Screens.open(browser, d.status_server.port)
    paris = dt.datetime(2026, 11, 27, 14, 0, tzinfo=ZoneInfo(TZ))
    now = clock.boot_ns()
    # the server reads 14:00:00.700 now; the call is booked for 14:05:00.200
    d.link_changed(True, ClockMapping(int(paris.timestamp() * 1000) + 700, now, now))
    d.submit(GrantReceived(make_grant(now, "call-1", starts_in_s=299.5, duration_s=1200)))
    await screens.check("upcoming", {
        "fr": ["Appel avec Papa", "à 14:05 dans 5 min"],
        "en": ["Call with Papa", "at 14:05 in 5 min"]})

    clock.advance(300)
    d.submit(StartCall("call-1"))
    await wait_for(lambda: d.machine.state is State.LIVE)
    await screens.check("live", {lang: [t(lang, "live_remaining"), "19:5"] for lang in LANGS})
    for page in screens.pages.values():
        assert await page.is_hidden("#warning") and await page.is_hidden("#link-lost")

    clock.advance(1200 - 50)  # 50 s left: the daemon's next push carries it
    d.submit(Tick())
    await screens.check("live", {lang: [t(lang, "live_warning"), "00:4"] for lang in LANGS},
                        shot="live-warning")

    d.submit(LinkChanged(False))
    await screens.check("live", {
        "fr": ["Réseau perdu — votre temps continue de s'écouler"],
        "en": ["Network lost — your time keeps running"]}, shot="live-link-lost")
    d.submit(LinkChanged(True))

    clock.advance(60)
    d.submit(Tick())
    await wait_for(lambda: d.machine.state is State.ENDED)
    assert d.machine.snapshot.end_reason is EndReason.DEADLINE
    await screens.check("ended", {lang: [t(lang, "ended_title"), t(lang, "reason_deadline")]
                                  for lang in LANGS})

    # 3. the tablet locked (case opened), then a rail fault (sense stuck on)
    assert d.hardware.sim is not None
    d.hardware.sim.set_tamper_open(True)
    await screens.check("locked", {lang: [t(lang, "locked_title"), t(lang, "locked_tamper")]
                                   for lang in LANGS})
    d.hardware.sim.set_sense_fault("stuck_on")
    await screens.check("fault", {lang: [t(lang, "fault_title"), "Code E101"]
                                  for lang in LANGS})
    assert d.status()["fault_code"] == "E101"

    # 4. the daemon stops: the page says so, and comes back by itself
    await run.stop()
    await screens.check("offline", {lang: [t(lang, "offline_title")] for lang in LANGS})

    # nothing outside the daemon's origin, nothing that can be pressed
    origin = f"http://127.0.0.1:{d.status_server.port}/"
    outside = [u for u in screens.requests if not u.startswith(origin)]
    assert not outside, outside
    page = next(iter(screens.pages.values()))
    controls = await page.evaluate(
        "document.querySelectorAll('button, input, select, textarea, form, a[href]').length")
    assert controls == 0


def test_texts_fault_codes_and_docs_agree() -> None:
    """Both languages have the same texts; every end reason the daemon can report has words
    (the page falls back to a neutral sentence, never a code word, for one it does not
    know); docs/ui.md lists every fault code and every French text."""
    for lang in LANGS:
        assert TEXTS[lang].keys() == TEXTS["fr"].keys(), f"{lang}.json keys differ from fr"
        for reason in [*EndReason, "low_battery"]:
            assert f"reason_{reason}" in TEXTS[lang], (lang, reason)
    doc = (REPO / "docs" / "ui.md").read_text()
    for code in [*ui.FAULT_CODES.values(), ui.UNKNOWN_FAULT]:
        assert f"`{code}`" in doc, f"fault code {code} missing from docs/ui.md"
    for key, text in TEXTS["fr"].items():
        assert text in doc, f"the French text of {key} is missing from docs/ui.md"


def test_ui_language_is_configured_and_checked() -> None:
    text = '[device]\nid = "t1"\n[ui]\nlanguage = "{}"\n'
    assert parse_config(text.format("en"), "f.toml").ui.language == "en"
    assert parse_config('[device]\nid = "t1"\n', "f.toml").ui.language == "fr"
    with pytest.raises(ConfigError) as exc:
        parse_config(text.format("de"), "f.toml")
    assert exc.value.problems == ["f.toml: [ui] language = 'de': must be one of 'fr', 'en'"]


def test_fault_codes_match_the_rail_guards_words() -> None:
    assert ui.fault_code(None) is None
    assert ui.fault_code("rail sense reads on while the rail is commanded off") == "E101"
    assert ui.fault_code("rail sense reads off while the rail is commanded on") == "E102"
    assert ui.fault_code("something new") == ui.UNKNOWN_FAULT


async def test_the_page_is_served_from_the_package_under_a_strict_policy(
        start_daemon) -> None:
    run = await start_daemon()
    port = run.daemon.status_server.port

    def get(path: str) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    results = await asyncio.gather(*(asyncio.to_thread(get, p) for p in (
        "/", "/ui/app.js", "/ui/app.css", "/ui/lang/fr.json", "/ui/lang/en.json",
        "/ui/../statusapi.py", "/ui/index.html", "/ui/lang/de.json", "/ui/")))
    for code, headers, body in results[:5]:
        assert code == 200 and body
        assert headers["Content-Security-Policy"] == UI_CSP
        assert headers["Cache-Control"] == "no-store"
    assert results[0][1]["Content-Type"] == "text/html; charset=utf-8"
    assert results[0][2] == (UI_DIR / "index.html").read_bytes()
    for code, _, body in results[5:]:
        assert code == 404, body
        assert json.loads(body)["error"].startswith("no such path")
    assert not re.search(rb"https?://", results[0][2] + results[1][2] + results[2][2]), \
        "an external resource in the page"


@pytest.mark.timeout(30)
async def test_countdown_never_above_the_daemons_and_within_one_second(
        browser: Browser, start_daemon) -> None:
    run = await start_daemon()  # the real CLOCK_BOOTTIME
    d = run.daemon
    page = await browser.new_page(viewport={"width": 800, "height": 480})
    await page.goto(f"http://127.0.0.1:{d.status_server.port}/")
    now = d.clock.boot_ns()
    d.submit(LinkChanged(True))
    d.submit(GrantReceived(make_grant(now, "call-2", starts_in_s=-1, duration_s=125)))
    d.submit(StartCall("call-2"))
    await page_wait(page, "document.body.dataset.screen === 'live'")
    for _ in range(12):  # over about 3 s: several pushes and the local countdown between them
        before = d.status()["session"]["remaining_ms"]
        page_ms, text = await page.evaluate(
            "[window.tabletd.remainingMs(), document.getElementById('countdown').textContent]")
        after = d.status()["session"]["remaining_ms"]
        m, s = (int(x) for x in text.split(":"))
        shown_ms = (m * 60 + s) * 1000
        assert shown_ms <= before, (text, before)  # never more than the daemon enforces
        assert after - 1000 <= page_ms <= before, (page_ms, before, after)
        # rounded down to the second, one tick (50 ms) ahead, the delivery margin (100 ms)
        assert after - shown_ms < 1000 + 50 + 100 + 20, (text, after)
        await asyncio.sleep(0.25)
    await page.close()


@pytest.mark.timeout(30)
async def test_connected_screens_do_not_hold_up_the_daemons_stop(start_daemon) -> None:
    """The server's handlers wait on the hub or the media queue: each is raced against its
    connection's close, so a screen still connected never delays the stop (it used to wait up
    to 30 s for the status channel, and forever for the media channel)."""
    run = await start_daemon()
    port = run.daemon.status_server.port
    async with connect(f"ws://127.0.0.1:{port}/v1/status/stream") as status_ws, \
            connect(f"ws://127.0.0.1:{port}/v1/media/stream") as media_ws:
        await status_ws.recv()
        started = time.monotonic()
        assert await asyncio.wait_for(run.stop(), 5) == 0
        assert time.monotonic() - started < 2
        await media_ws.wait_closed()
        await status_ws.wait_closed()
