"""Command line: ``tabletd run | cutoff | status | check-config | provision | selftest | demo``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tabletd import __version__
from tabletd.clock import BootClock, boot_id
from tabletd.config import Config, load_config
from tabletd.errors import ConfigError, StateFileError, TabletdError
from tabletd.events import EventStore
from tabletd.hardware import open_backlight, open_rail
from tabletd.logs import setup_logging
from tabletd.persistence import StateFile, snapshot_to_json

log = logging.getLogger("tabletd.cutoff")

EX_OK = 0
EX_FAILURE = 1
EX_NOT_RUNNING = 3  # LSB "program is not running", as systemctl status uses it
EX_CONFIG = 78  # sysexits EX_CONFIG: systemd's RestartPreventExitStatus=78


def state_dir_for(args: argparse.Namespace, cfg: Config) -> Path:
    """``--state-dir``, else systemd's $STATE_DIRECTORY, else ``[paths] state_dir``."""
    if args.state_dir:
        return Path(args.state_dir)
    from_systemd = os.environ.get("STATE_DIRECTORY")
    if from_systemd:
        return Path(from_systemd.split(":")[0])
    return Path(cfg.paths.state_dir)


def _config_problems(exc: ConfigError) -> int:
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    return EX_CONFIG


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        return _config_problems(exc)
    print(f"{args.file}: OK (device {cfg.device.id}, backend {cfg.hardware.backend})")
    return EX_OK


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from tabletd.daemon import Daemon

    setup_logging(cfg.logging.level)
    daemon = Daemon(cfg, state_dir_for(args, cfg))
    return asyncio.run(daemon.run())


def cmd_cutoff(args: argparse.Namespace, cfg: Config) -> int:
    """Cut the rail and blank the screen now. Idempotent, no network, fast.

    When a daemon holds the pins, it is asked to cut (SIGUSR1) and locks itself; otherwise
    this process claims the rail lines, driving them off, and checks the sense input.
    """
    from tabletd.daemon import DaemonPaths, running_daemon_pid

    setup_logging(cfg.logging.level)
    state_dir = state_dir_for(args, cfg)
    pid = running_daemon_pid(DaemonPaths(state_dir))
    if pid is not None:
        return _cutoff_via_daemon(cfg, pid)
    state_dir.mkdir(parents=True, exist_ok=True)
    rail, world = open_rail(cfg, state_dir)  # claiming the line drives it low
    try:
        time.sleep(cfg.gpio.sense_timeout_ms / 1000)
        sensed = rail.sensed
    finally:
        rail.close()
        if world is not None:
            world.close()
    status = 0
    problems: list[str] = []
    if sensed:
        problems.append(f"rail sense GPIO{cfg.gpio.rail_sense} still reads ON after the cut")
        status = EX_FAILURE
    try:
        open_backlight(cfg, world).set(False)
    except TabletdError as exc:
        problems.append(str(exc))
    store = EventStore(state_dir / "events.sqlite")
    try:
        event = store.append(
            "cutoff",
            {
                "by": "cutoff_command",
                "service_result": os.environ.get("SERVICE_RESULT"),
                "exit_code": os.environ.get("EXIT_CODE"),
                "exit_status": os.environ.get("EXIT_STATUS"),
                "sense_on": sensed,
            },
            boot=boot_id(),
            boot_ns=BootClock().boot_ns(),
        )
    finally:
        store.close()
    log.warning("cutoff: camera rail commanded off (%s)", event.fields["service_result"]
                or "by hand", extra={"EVENT": "cutoff", "EVENT_ID": event.id})
    for p in problems:
        print(f"tabletd cutoff: {p}", file=sys.stderr)
    print("camera rail off" if not sensed else "camera rail commanded off; SENSE STILL ON")
    return status


def _cutoff_via_daemon(cfg: Config, pid: int) -> int:
    """The daemon holds the pins: ask it (SIGUSR1; it cuts and locks), then confirm."""
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            status = fetch_status(cfg, timeout_s=0.5)
        except (urllib.error.URLError, OSError):
            status = None
        if status is not None and status["rail"] == "off":
            print(f"the running daemon (pid {pid}) cut the rail and locked the tablet")
            return EX_OK
        time.sleep(0.02)
    print(f"tabletd cutoff: asked the daemon (pid {pid}) to cut, but its status API did not "
          "confirm the rail off within 2 s", file=sys.stderr)
    return EX_FAILURE


def fetch_status(cfg: Config, timeout_s: float = 2.0) -> dict[str, Any]:
    url = f"http://{_host(cfg.status_api.host)}:{cfg.status_api.port}/v1/status"
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: dict[str, Any] = json.load(resp)
        return body


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    try:
        status = fetch_status(cfg)
    except (urllib.error.URLError, OSError) as exc:
        state_dir = state_dir_for(args, cfg)
        persisted: Any = None
        try:
            loaded = StateFile(state_dir).load()
            if loaded is not None:
                persisted = {"boot_id": loaded[0], "snapshot": snapshot_to_json(loaded[1])}
        except StateFileError as err:
            persisted = {"error": str(err)}
        if args.json:
            print(json.dumps({"running": False, "error": str(exc), "persisted": persisted}))
        else:
            print(f"tabletd is not running (status API: {exc})")
            if persisted is not None:
                print(f"last persisted state: {json.dumps(persisted)}")
        return EX_NOT_RUNNING
    if args.json:
        print(json.dumps(status, sort_keys=True))
        return EX_OK
    session = status.get("session")
    print(f"device    {status['device_id']}")
    print(f"state     {status['state']}  (screen: {status['screen']})")
    print(f"rail      {status['rail']}")
    print(f"link      {'connected' if status['link']['connected'] else 'down'}")
    print(f"locked    {status['locked']}" + (f" ({status['locked_reason']})"
                                             if status.get("locked_reason") else ""))
    print(f"fault     {status['fault'] or '-'}")
    if session:
        rem = session.get("remaining_ms")
        left = "-" if rem is None else f"{rem // 60000}:{rem // 1000 % 60:02d}"
        print(f"session   {session['id']} {session['state']}, remaining {left}")
    return EX_OK


def cmd_provision(args: argparse.Namespace, cfg: Config) -> int:
    """First-boot provisioning (``tabletd/provision.py``); 0 done, 1 with the problems."""
    from tabletd.provision import ProvisionError, provision

    try:
        done = provision(cfg, Path(args.file))
    except ProvisionError as exc:
        for problem in exc.problems:
            print(f"tabletd provision: {problem}", file=sys.stderr)
        return EX_FAILURE
    print(f"provisioned as {done.device_id}: key {done.key}, certificate {done.cert}, "
          f"CA {done.ca}, overlay {done.overlay}")
    if not done.removed_file:
        print(f"tabletd provision: provisioned, but {args.file} could not be deleted: delete "
              "it by hand (its token is spent)", file=sys.stderr)
        return EX_FAILURE
    print(f"{args.file} deleted; restart tabletd to use the new identity "
          "(systemctl restart tabletd)")
    return EX_OK


def cmd_selftest(args: argparse.Namespace, cfg: Config) -> int:
    """The field self-test (``tabletd/selftest.py``); 0 if every check passed, else 1."""
    from tabletd.selftest import SelfTest, render_json, render_table

    results = SelfTest(cfg, state_dir_for(args, cfg), min_free_mb=args.min_free_mb).run()
    print(render_json(results) if args.json else render_table(results))
    return EX_OK if all(r.ok for r in results) else EX_FAILURE


def _megabytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tabletd", description=__doc__)
    p.add_argument("--version", action="version", version=f"tabletd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", required=True, help="TOML configuration file")
        sp.add_argument("--state-dir", help="state directory (default: $STATE_DIRECTORY, "
                        "then [paths] state_dir)")
        return sp

    with_config("run", "run the daemon in the foreground (systemd runs this)")
    with_config("cutoff", "cut the camera rail and blank the screen now")
    st = with_config("status", "show the running daemon's state")
    st.add_argument("--json", action="store_true", help="print the status object as JSON")
    demo = with_config("demo", "one booked call end to end: reference server, fault proxy, "
                       "daemon on simulated hardware")
    demo.add_argument("--call-seconds", type=int, default=60, help="length of the call (>= 10)")
    demo.add_argument("--cut-seconds", type=float, default=10.0,
                      help="how long the network is cut in the middle of the call")
    demo.add_argument("--start-in", type=float, default=3.0,
                      help="seconds from booking to the call's start")
    pv = with_config("provision", "first boot: enrol with the server, store this tablet's "
                     "identity (docs/field-guide.md)")
    pv.add_argument("--file", default="/boot/firmware/tabletd-provision.toml",
                    help="the provisioning file (default: %(default)s)")
    stt = with_config("selftest", "check every part and say what to fix (exit 1 on any "
                      "failure)")
    stt.add_argument("--json", action="store_true", help="print the results as JSON")
    stt.add_argument("--min-free-mb", type=_megabytes, default=64, metavar="MB",
                     help="the least free space the state directory must have (default 64)")
    cc = sub.add_parser("check-config", help="validate a configuration file (exit 78 if bad)")
    cc.add_argument("file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return cmd_check_config(args)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return _config_problems(exc)
    try:
        if args.command == "run":
            return cmd_run(args, cfg)
        if args.command == "cutoff":
            return cmd_cutoff(args, cfg)
        if args.command == "status":
            return cmd_status(args, cfg)
        if args.command == "provision":
            return cmd_provision(args, cfg)
        if args.command == "selftest":
            return cmd_selftest(args, cfg)
        try:
            from tabletd.demo import run_demo
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("tabletd.devserver"):
                raise
            print("tabletd demo: the demo needs the reference central server "
                  "(tabletd.devserver), which is never installed on a tablet image: run it "
                  "on a development machine", file=sys.stderr)
            return EX_FAILURE
        return run_demo(cfg, args)
    except TabletdError as exc:
        print(f"tabletd {args.command}: {exc}", file=sys.stderr)
        return EX_FAILURE
