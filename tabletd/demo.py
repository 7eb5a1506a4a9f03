"""The demo: one booked call, end to end, on one machine (the README's main command).

It starts the reference central server (``tabletd.devserver``: a development CA, mutual TLS,
grant signing, booking), a TCP fault proxy, and the daemon on simulated hardware whose link
goes through the proxy. It books a call, shows a live view (countdown, link, rail, events),
cuts the network in the middle of the call, and shows the call still ending at its deadline
and every event reaching the server after the link comes back. It ends with a summary:
cut-off lateness, events sent and acknowledged, nothing lost.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av

from tabletd.clock import NS_PER_S
from tabletd.config import Config, LinkConfig
from tabletd.daemon import Daemon
from tabletd.devserver import ca
from tabletd.devserver.proxy import FaultProxy
from tabletd.devserver.server import DevServer
from tabletd.devserver.store import Store
from tabletd.logs import setup_logging
from tabletd.mcu.sim import send_control
from tabletd.session import Action, RailOff, RailOn, Record, State

VIEW_PERIOD_S = 1.0


def run_demo(cfg: Config, args: argparse.Namespace) -> int:
    setup_logging("error")
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    if cfg.hardware.backend != "sim":
        print("the demo runs on simulated hardware only: use config/sim.toml")
        return 2
    with tempfile.TemporaryDirectory(prefix="tabletd-demo-") as tmp:
        return asyncio.run(_Demo(cfg, Path(tmp), args).run())


class _Demo:
    def __init__(self, cfg: Config, tmp: Path, args: argparse.Namespace) -> None:
        self.base_cfg = cfg
        self.tmp = tmp
        self.call_s: int = max(10, int(args.call_seconds))
        self.cut_s: float = args.cut_seconds
        self.start_in_s: float = args.start_in
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"  {time.monotonic() - self.t0:6.1f}s  {text}", flush=True)

    async def run(self) -> int:
        device = self.base_cfg.device.id
        srv_dir = self.tmp / "server"
        print("tabletd demo: the REFERENCE central server, a fault proxy and the daemon on "
              "simulated hardware,\nall on this machine (loopback, mutual TLS).\n")
        ca.init(srv_dir)
        key, cert = ca.issue_device(srv_dir, device)
        with Store.open(srv_dir) as store:
            store.add_device(device, 0)
        server = DevServer(srv_dir, tick_s=0.02)
        await server.start()
        proxy = FaultProxy("127.0.0.1", server.port)
        await proxy.start()
        self.say(f"reference server on 127.0.0.1:{server.port}; proxy on 127.0.0.1:{proxy.port}")
        cfg = dataclasses.replace(
            self.base_cfg,
            status_api=dataclasses.replace(self.base_cfg.status_api, port=0),
            session=dataclasses.replace(self.base_cfg.session, link_grace_s=4.0),
            sim=dataclasses.replace(self.base_cfg.sim, self_grant_s=0),
            link=LinkConfig(
                url=f"wss://127.0.0.1:{proxy.port}/", ca_file=str(srv_dir / ca.CA_CERT),
                cert_file=str(cert), key_file=str(key),
                grant_public_key=ca.grant_public_key_b64(srv_dir),
                ping_interval_s=1.5, ping_timeout_s=1.5, backoff_base_s=0.2, backoff_cap_s=2,
            ),
        )
        daemon = Daemon(cfg, self.tmp / "state", environ={})
        daemon.on_action = self._observe
        runner = asyncio.create_task(daemon.run())
        try:
            return await self._scenario(daemon, server, proxy, device, runner)
        finally:
            daemon.request_stop()
            await runner
            await proxy.close()
            await server.stop()

    def _observe(self, action: Action, now: int) -> None:
        match action:
            case RailOn(cause="deadline"):
                self.say("rail ON until the deadline: camera and microphone powered")
            case RailOn(cause="link_grace"):
                self.say("link lost: rail stays on only for the link grace, then off")
            case RailOff(reason=reason):
                self.say(f"rail OFF ({reason})")
            case Record(kind=kind, fields=fields) if kind.startswith("call_"):
                detail = fields.get("reason") or fields.get("contact") or ""
                self.say(f"event {kind} {detail}".rstrip())

    async def _scenario(self, daemon: Daemon, server: DevServer, proxy: FaultProxy,
                        device: str, runner: asyncio.Task[int]) -> int:
        await daemon.ready.wait()
        await _until(lambda: daemon.machine.link_up, 15)
        self.say("daemon ready, link up (hello/welcome: clock mapped), rail off")
        session = server.book(device, in_s=self.start_in_s, duration_s=self.call_s)
        self.say(f"booked {session}: {self.call_s} s call, starting in {self.start_in_s:.0f} s")
        await _until(lambda: daemon.machine.state is State.LIVE, self.start_in_s + 15)
        cut_at = daemon.clock.boot_ns() + int((self.call_s - self.cut_s) / 2 * NS_PER_S)
        view = asyncio.create_task(self._view(daemon, server))
        try:
            await asyncio.sleep(max(0, cut_at - daemon.clock.boot_ns()) / NS_PER_S)
            self.say(f">>> network CUT for {self.cut_s:.0f} s (the proxy drops every byte)")
            proxy.set_mode("blackhole")
            await asyncio.sleep(self.cut_s)
            proxy.set_mode("reset")
            proxy.set_mode("pass")
            self.say(">>> network back")
            await _until(lambda: daemon.machine.state is State.ENDED,
                         self.call_s + 30)
            await _until(lambda: daemon.machine.link_up and daemon.store is not None
                         and daemon.store.count() == 0, 30)
            if daemon.mcu is not None:
                self.say(">>> a guard docks the tablet in bay 2 (the simulated MCU reports it)")
                await asyncio.to_thread(send_control, daemon.paths.state_dir, {"dock": 2})
                await _until(lambda: any(e.kind == "docked" for e in server.events(device)), 15)
                docked = next(e for e in server.events(device) if e.kind == "docked")
                self.say(f"custody event at the server: docked in bay {docked.fields['bay']}, "
                         f"battery {docked.fields['battery_pct']} %")
        finally:
            view.cancel()
        return self._summary(daemon, server, device, session)

    async def _view(self, daemon: Daemon, server: DevServer) -> None:
        while True:
            st = daemon.status()
            sess = st["session"] or {}
            rem = sess.get("remaining_ms")
            left = "--:--" if rem is None else f"{rem // 60000:02d}:{rem // 1000 % 60:02d}"
            link = daemon.link
            assert link is not None and daemon.store is not None
            up = "up  " if st["link"]["connected"] else "DOWN"
            rail = "ON " if st["rail"] == "on" else "off"
            power = st["power"]
            battery = "--" if power is None else f"{power['battery_pct']:>2}"
            self.say(f"[{st['state']:<9}] {left} left | link {up} | rail {rail} | bat "
                     f"{battery}% | outbox "
                     f"{daemon.store.count():>2} | sent {link.events_sent:>2} acked "
                     f"{link.events_acked:>2} | server has "
                     f"{len(server.events(daemon.cfg.device.id)):>2}")
            await asyncio.sleep(VIEW_PERIOD_S)

    def _summary(self, daemon: Daemon, server: DevServer, device: str, session: str) -> int:
        assert daemon.store is not None and daemon.link is not None
        received = server.events(device)
        kinds = [e.kind for e in received]
        ended = next((e for e in received if e.kind == "call_ended"), None)
        appended = daemon.store.appended_total()
        pending = daemon.store.count()
        late = None if ended is None else ended.fields.get("cutoff_lateness_ms")
        lost = "lost and restored during the call" if "call_link_lost" in kinds else "never lost"
        print("\nsummary")
        print(f"  call ended: {ended.fields['reason'] if ended else 'NOT REPORTED'}; the rail "
              f"was cut {late} ms after the deadline (budget 20 ms), as the tablet reported")
        print(f"  link: {daemon.link.sessions} connections, {lost}")
        print(f"  events: {appended} recorded, {daemon.link.events_sent} sent, "
              f"{daemon.link.events_acked} acknowledged, {pending} pending; the server stored "
              f"{len(received)} distinct ({server.duplicates_received} duplicates discarded)")
        recording = server.recording_path(session)
        video = _decodable_video_frames(recording) if recording is not None else 0
        after = server.frames_after_deadline(session)
        print(f"  media: {daemon.link.media_sent} frames sent; the server recorded {video} "
              f"decodable video frames ({recording.name if recording else 'no file'}), "
              f"{after} captured after the deadline; nothing stored on the tablet")
        ok = (ended is not None and ended.fields["reason"] == "deadline" and late is not None
              and late <= 20 and pending == 0 and len(received) == appended and video > 0
              and after == 0)
        print(f"\n{'OK' if ok else 'FAILED'}: "
              + ("the call ended at its deadline through a network cut, and nothing was lost"
                 if ok else "see above"))
        return 0 if ok else 1


def _decodable_video_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


async def _until(predicate: Callable[[], bool], within_s: float) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 (watching the daemon from outside)
            await asyncio.sleep(0.05)
