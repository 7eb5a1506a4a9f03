"""REFERENCE SERVER — development and tests only, never installed on a tablet.

``tabletd-devserver``: the reference central server's command line. ``serve`` runs the
server; every other subcommand works on the server directory's store and exits, and the
running server picks bookings and commands up from the store within 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tabletd.devserver import BANNER, DevServerError, ca
from tabletd.devserver.store import Store
from tabletd.provision import FILE_FORMAT

log = logging.getLogger("tabletd.devserver")

EX_OK = 0
EX_FAILURE = 1

DESCRIPTION = f"""{BANNER}.

The tabletd reference central server (docs/protocol.md, server side): a development CA,
a device registry, call booking with signed grants, staff end/lock/unlock, and an event
store that deduplicates. `serve` runs the server; the other subcommands change or read
its store (DIR/store.sqlite) and the running server picks changes up within 50 ms.

Typical use:
  tabletd-devserver init srv
  tabletd-devserver device add srv tablet-1     # prints the tablet's [link] config
  tabletd-devserver serve srv --port 8443 &
  tabletd-devserver book srv tablet-1 --in 10 --duration 60 --contact "Marie"
  tabletd-devserver events srv

Provisioning a tablet by enrolment instead (docs/field-guide.md):
  tabletd-devserver provisioning-file srv tablet-2 --out tabletd-provision.toml
  # copy it to the tablet's boot partition; `serve` also listens for enrolment on 8444
"""

DEFAULT_URL = "wss://127.0.0.1:8443/"
DEFAULT_ENROL_URL = "wss://127.0.0.1:8444/"
DEFAULT_TOKEN_TTL_S = 86400


def _now_ms() -> int:
    return int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)


def _fmt_ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    ca.init(directory)
    Store.open(directory).close()
    print(f"{directory}: development CA, server certificate (127.0.0.1, localhost), grant "
          "signing key and store created")
    print(f"grant public key: {ca.grant_public_key_b64(directory)}")
    return EX_OK


def cmd_device_add(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    device_id = ca.check_device_id(args.device_id)
    with Store.open(directory) as store:
        if store.device(device_id) is not None:
            raise DevServerError(f"device {device_id}: already registered")
        key_path, cert_path = ca.issue_device(directory, device_id)
        store.add_device(device_id, _now_ms())
    print(f"device {device_id} registered; its identity is in {key_path.parent}/")
    print("tablet configuration:")
    print("[device]")
    print(f'id = "{device_id}"')
    print("[link]")
    print('url = "wss://127.0.0.1:8443/"')
    print(f'ca_file = "{(key_path.parent / ca.CA_CERT).resolve()}"')
    print(f'cert_file = "{cert_path.resolve()}"')
    print(f'key_file = "{key_path.resolve()}"')
    print(f'grant_public_key = "{ca.grant_public_key_b64(directory)}"')
    return EX_OK


def cmd_token(args: argparse.Namespace) -> int:
    device_id = ca.check_device_id(args.device_id)
    with Store.open(Path(args.dir)) as store:
        token = store.issue_token(device_id, _now_ms() + store.clock_offset_ms(), args.ttl)
    print(token)
    print(f"one-time enrolment token for {device_id}, valid {args.ttl} s (server time)",
          file=sys.stderr)
    return EX_OK


def provisioning_file_text(directory: Path, device_id: str, token: str, *, url: str,
                           enrol_url: str) -> str:
    """A provisioning file (``tabletd/provision.py``, field guide) for ``device_id``."""
    try:
        ca_pem = (directory / ca.CA_CERT).read_text(encoding="ascii")
    except OSError as exc:
        raise DevServerError(f"{directory / ca.CA_CERT}: cannot read ({exc.strerror}); run "
                             "`tabletd-devserver init` first") from exc
    return (
        "# tabletd provisioning file: copy to the boot partition as\n"
        "# /boot/firmware/tabletd-provision.toml. It holds a one-time token: keep it private;\n"
        "# the tablet deletes it once provisioned.\n"
        f"format = {FILE_FORMAT}\n\n"
        f"[device]\nid = {json.dumps(device_id)}\n\n"
        f"[server]\nurl = {json.dumps(url)}\nenrol_url = {json.dumps(enrol_url)}\n"
        f"grant_public_key = {json.dumps(ca.grant_public_key_b64(directory))}\n"
        f'ca = """\n{ca_pem}"""\n\n'
        f"[enrolment]\ntoken = {json.dumps(token)}\n"
    )


def cmd_provisioning_file(args: argparse.Namespace) -> int:
    directory, out = Path(args.dir), Path(args.out)
    device_id = ca.check_device_id(args.device_id)
    fd = ca.create_secret_file(out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            with Store.open(directory) as store:
                token = store.issue_token(device_id, _now_ms() + store.clock_offset_ms(),
                                          args.ttl)
            f.write(provisioning_file_text(directory, device_id, token, url=args.url,
                                           enrol_url=args.enrol_url))
    except BaseException:
        out.unlink()  # no half-written file holding a token
        raise
    print(f"{out}: provisioning file for {device_id} (token valid {args.ttl} s); copy it to "
          "the tablet's boot partition as tabletd-provision.toml")
    return EX_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from tabletd.devserver.server import DevServer

    if args.restart_in is not None and not 0 <= args.restart_in <= 3600:
        raise DevServerError(f"--restart-in must be within 0..3600 s, got {args.restart_in}")
    if not args.readmit_per_s > 0:
        raise DevServerError(f"--readmit-per-s must be > 0, got {args.readmit_per_s:g}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = DevServer(Path(args.dir), host=args.host, port=args.port,
                       clock_offset_ms=args.clock_offset_ms, downlink=args.downlink,
                       enrol_port=None if args.enrol_port == 0 else args.enrol_port,
                       readmit_per_s=args.readmit_per_s)

    async def run() -> None:
        await server.start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # not a cancellation: that would close
            loop.add_signal_handler(sig, stopping.set)  # with 1001 and no hint first
        enrolment = (f", enrolment on wss://{args.host}:{server.enrol_port}/"
                     if server.enrol_port is not None else ", no enrolment")
        print(f"{BANNER}\nlistening on wss://{args.host}:{server.port}/{enrolment} "
              f"(clock offset {args.clock_offset_ms:+d} ms); Ctrl-C stops", flush=True)
        try:
            await stopping.wait()
            log.info("stopping%s", "" if args.restart_in is None
                     else f" for a restart of about {args.restart_in} s")
        finally:
            await server.stop(restart_in_s=args.restart_in)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return EX_OK


def cmd_book(args: argparse.Namespace) -> int:
    from tabletd.devserver.server import book

    with Store.open(Path(args.dir)) as store:
        now = _now_ms() + store.clock_offset_ms()  # the server's (possibly skewed) clock
        session_id = book(store, args.device, now_ms=now, in_s=args.in_s,
                          duration_s=args.duration, contact=args.contact)
        booking = store.booking(session_id)
    assert booking is not None
    print(session_id)
    print(f"  device {booking.device_id}, contact {booking.contact!r}, starts "
          f"{_fmt_ms(booking.start_at_ms)} for {booking.duration_s} s, hard end "
          f"{_fmt_ms(booking.not_after_ms)} (server time)", file=sys.stderr)
    return EX_OK


def cmd_end(args: argparse.Namespace) -> int:
    with Store.open(Path(args.dir)) as store:
        before = store.request_end(args.session_id, _now_ms() + store.clock_offset_ms())
    if before.state == "booked":
        print(f"{args.session_id}: cancelled (its grant was never sent)")
    elif before.state == "granted":
        print(f"{args.session_id}: cancelled; `end` queued for {before.device_id}")
    else:
        print(f"{args.session_id}: `end` queued for {before.device_id}")
    return EX_OK


def cmd_lock(args: argparse.Namespace) -> int:
    with Store.open(Path(args.dir)) as store:
        store.queue_command(args.device, "lock", _now_ms() + store.clock_offset_ms(),
                            reason=args.reason)
    print(f"{args.device}: `lock` queued ({args.reason})")
    return EX_OK


def cmd_unlock(args: argparse.Namespace) -> int:
    with Store.open(Path(args.dir)) as store:
        store.queue_command(args.device, "unlock", _now_ms() + store.clock_offset_ms())
    print(f"{args.device}: `unlock` queued")
    return EX_OK


def cmd_events(args: argparse.Namespace) -> int:
    with Store.open(Path(args.dir)) as store:
        events = store.events(args.device)
        duplicates = store.duplicates_received(args.device)
    if args.json:
        for stored in events:
            print(json.dumps(asdict(stored), sort_keys=True))
        return EX_OK
    for ev in events:
        fields = " ".join(f"{k}={v}" for k, v in sorted(ev.fields.items()))
        print(f"{ev.device_id} #{ev.seq:<5} {ev.kind:<16} {ev.session_id or '-':<18} "
              f"{fields}")
    print(f"{len(events)} events, {duplicates} duplicates received", file=sys.stderr)
    return EX_OK


def cmd_devices(args: argparse.Namespace) -> int:
    with Store.open(Path(args.dir)) as store:
        devices = store.devices()
    for d in devices:
        state = "connected" if d.connected else "offline"
        locked = {None: "-", True: "locked", False: "unlocked"}[d.locked]
        print(f"{d.id:<20} {state:<10} last seen {_fmt_ms(d.last_seen_ms)}  {locked:<8} "
              f"software {d.software or '-'}")
    if not devices:
        print("no devices; add one with `tabletd-devserver device add DIR ID`",
              file=sys.stderr)
    return EX_OK


def cmd_bookings(args: argparse.Namespace) -> int:
    with Store.open(Path(args.dir)) as store:
        bookings = store.bookings(args.device)
    for b in bookings:
        print(f"{b.session_id:<18} {b.device_id:<16} {b.state:<9} start "
              f"{_fmt_ms(b.start_at_ms)} {b.duration_s:>5} s  {b.contact!r}"
              + (f"  end: {b.end_reason}" if b.end_reason else ""))
    return EX_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tabletd-devserver", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a server directory: CA, server cert, grant key")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("device", help="manage devices")
    device_sub = p.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    p = device_sub.add_parser("add", help="register a device and issue its key and "
                              "certificate into DIR/devices/ID/")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.set_defaults(func=cmd_device_add)

    p = _add_serve_command(sub)
    _add_enrolment_commands(sub, serve=p)

    p = sub.add_parser("book", help="book a call; prints its session id")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--in", dest="in_s", type=float, required=True, metavar="SECONDS",
                   help="the call starts (server sends `start`) this many seconds from now")
    p.add_argument("--duration", type=int, required=True, metavar="SECONDS",
                   help="the call's length once started (1-7200)")
    p.add_argument("--contact", default="Relative", metavar="LABEL",
                   help="the relative's label shown on the tablet (at most 64 characters)")
    p.set_defaults(func=cmd_book)

    p = sub.add_parser("end", help="staff end (or cancel) a call")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("session_id", metavar="SESSION_ID")
    p.set_defaults(func=cmd_end)

    p = sub.add_parser("lock", help="lock a tablet (ends any call)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--reason", default="staff", metavar="R")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("unlock", help="unlock a tablet")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("device", metavar="DEVICE")
    p.set_defaults(func=cmd_unlock)

    p = sub.add_parser("events", help="events received from tablets (deduplicated)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--device", metavar="D")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("devices", help="registered devices and their link state")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("bookings", help="booked calls and their state")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--device", metavar="D")
    p.set_defaults(func=cmd_bookings)
    return parser


def _add_serve_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                       ) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help=f"run the server ({BANNER})")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--clock-offset-ms", type=int, default=0, metavar="N",
                   help="skew the server clock by N ms (e.g. 3600000: an hour ahead)")
    p.add_argument("--downlink", action="store_true",
                   help="send a synthetic family stream (H.264 640x360 15 fps, Opus tone) "
                        "to a tablet while its call is live")
    p.add_argument("--restart-in", type=int, default=None, metavar="SECONDS",
                   help="this stop is a restart: tell the tablets (close 1012) to come back "
                        "after SECONDS (0-3600), spread at --readmit-per-s; without it, close "
                        "1001 and hints from 0")
    p.add_argument("--readmit-per-s", type=float, default=100.0, metavar="N",
                   help="on stop, tell at most N tablets per second to come back "
                        "(default 100)")
    return p


def _add_enrolment_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], *,
                            serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--enrol-port", type=int, default=8444, metavar="P",
                       help="port of the enrolment endpoint (server-authenticated TLS only; "
                            "0: none). Default 8444")
    serve.set_defaults(func=cmd_serve)
    ttl_help = (f"the token's lifetime in seconds (60 to 2592000, default "
                f"{DEFAULT_TOKEN_TTL_S})")
    p = sub.add_parser("token", help="issue a one-time enrolment token for a device "
                       "(registers it if need be)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--ttl", type=int, default=DEFAULT_TOKEN_TTL_S, metavar="SECONDS",
                   help=ttl_help)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("provisioning-file", help="issue a token and write a tablet's "
                       "provisioning file (tabletd-provision.toml)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (mode 0600)")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the link URL (default {DEFAULT_URL})")
    p.add_argument("--enrol-url", default=DEFAULT_ENROL_URL,
                   help=f"the enrolment URL (default {DEFAULT_ENROL_URL})")
    p.add_argument("--ttl", type=int, default=DEFAULT_TOKEN_TTL_S, metavar="SECONDS",
                   help=ttl_help)
    p.set_defaults(func=cmd_provisioning_file)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except DevServerError as exc:
        print(f"tabletd-devserver: {exc}", file=sys.stderr)
        return EX_FAILURE
    return code
