"""A real systemd for the system tests: a cached Debian root, tabletd installed, booted in nspawn.

* :func:`cached_rootfs` builds a minimal bookworm root with mmdebstrap once, under
  ``.cache/system-rootfs/<key>/``, the key being a hash of everything that decides its
  content (suite, mirror, variant, package list). It is built into a temporary directory and
  renamed into place, under a lock, so a half-built root is never reused.
* :func:`prepare_root` copies it (each run works on a fresh copy), installs the project's
  wheels into a venv at /opt/tabletd, creates the users, installs and enables the unit and
  writes /etc/tabletd/tabletd.toml.
* :class:`Container` boots the copy with ``systemd-nspawn -b`` and runs commands inside it
  with ``nsenter`` into the container's PID 1; every wait in it is a bounded poll.

What works on the CI machine is in ``../shared/MACHINE.md``: nspawn needs
``--register=no --keep-unit`` there (PID 1 of the host is not systemd).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

PROJECT = Path(__file__).resolve().parents[2]
CACHE = PROJECT / ".cache" / "system-rootfs"

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
VARIANT = "minbase"
# Everything the root needs; changing this list (or the options below) changes the cache key.
# polkitd: the critical-battery power-off asks logind, which asks polkit (the image's rule).
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "polkitd")
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
)
CACHE_FORMAT = 1  # bump when the way the cache is built changes

UNIT = "tabletd.service"
VENV = "/opt/tabletd"
CONFIG_PATH = "/etc/tabletd/tabletd.toml"
STATE_DIR = "/var/lib/tabletd"
WHEELS_MOUNT = "/mnt/tabletd-wheels"

# Commands run inside the container get a plain, predictable environment.
INNER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "TERM": "dumb",
}

T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[system] {msg}", file=sys.stderr, flush=True)


# ---- the cached root file system ---------------------------------------------------------


def cache_key() -> str:
    spec = {
        "format": CACHE_FORMAT,
        "suite": SUITE,
        "mirror": MIRROR,
        "variant": VARIANT,
        "packages": sorted(PACKAGES),
        "dpkg": list(DPKG_OPTIONS),
        "arch": os.uname().machine,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cached_rootfs(timeout_s: float = 600) -> Path:
    """The minimal root for :data:`PACKAGES`, built once; returns its directory."""
    key = cache_key()
    final = CACHE / f"{SUITE}-{key}"
    with _locked(CACHE / f"{SUITE}-{key}.lock"):
        if (final / "etc" / "os-release").exists():
            return final
        for stale in CACHE.glob(f"tmp-{SUITE}-{key}-*"):  # a build that died half-way
            shutil.rmtree(stale, ignore_errors=True)
        tmp = CACHE / f"tmp-{SUITE}-{key}-{os.getpid()}"
        cmd = [
            "mmdebstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}",
            *(f"--dpkgopt={o}" for o in DPKG_OPTIONS),
            SUITE, str(tmp), MIRROR,
        ]
        log(f"building the root file system (cached afterwards): {' '.join(cmd)}")
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"mmdebstrap failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
                )
            os.rename(tmp, final)  # atomic: the cache entry exists whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"root file system built in {time.monotonic() - started:.1f} s: {final}")
        return final


# ---- the project inside it -----------------------------------------------------------------


def build_wheels(dest: Path, timeout_s: float = 300) -> list[Path]:
    """Wheels of the project and its dependencies, built on the host (same cp311 ABI)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
           "--no-color", "--wheel-dir", str(dest), str(PROJECT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pip wheel failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not any(w.name.startswith("tabletd-") for w in wheels):
        raise RuntimeError(f"pip wheel made no tabletd wheel in {dest}: {wheels}")
    return wheels


def dump_toml(doc: dict[str, Any]) -> str:
    """Enough TOML for tabletd's configuration: tables of strings, numbers and booleans."""
    lines: list[str] = []
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise TypeError(f"top-level {name!r} is not a table")
        lines.append(f"[{name}]")
        for key, value in table.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float):
                text = repr(value)
            elif isinstance(value, str):
                text = json.dumps(value)  # a JSON string is a valid TOML basic string
            else:
                raise TypeError(f"[{name}] {key}: cannot write {type(value).__name__}")
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def device_config(self_grant_s: int) -> str:
    """config/sim.toml, with the state directory of the unit and a self-granted call."""
    doc = tomllib.loads((PROJECT / "config" / "sim.toml").read_text(encoding="utf-8"))
    doc.setdefault("paths", {})["state_dir"] = STATE_DIR
    doc.setdefault("sim", {})["self_grant_s"] = self_grant_s
    # A tablet: the critical-battery power-off really powers off (the container here).
    doc.setdefault("power", {}).update(poweroff="systemd", critical_hold_s=0.0,
                                       shutdown_flush_s=0.0)
    text = "# Written by tests/system from config/sim.toml.\n\n" + dump_toml(doc)
    if tomllib.loads(text) != doc:
        raise AssertionError("dump_toml round trip changed the configuration")
    return text


def nspawn_base() -> list[str]:
    return ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit"]


SETUP_SCRIPT = f"""
set -eu
python3 -m venv {VENV}
{VENV}/bin/pip install --quiet --no-color --disable-pip-version-check \\
    --no-index --find-links {WHEELS_MOUNT} tabletd
getent group gpio >/dev/null || groupadd --system gpio
getent passwd tabletd >/dev/null || useradd --system --user-group --no-create-home \\
    --home-dir /nonexistent --shell /usr/sbin/nologin tabletd
{VENV}/bin/tabletd check-config {CONFIG_PATH}
systemctl enable {UNIT}
"""


def prepare_root(base: Path, root: Path, wheels: Path, *, self_grant_s: int,
                 dropins: dict[str, str] | None = None, timeout_s: float = 180) -> None:
    """A fresh copy of ``base`` at ``root`` with tabletd installed and enabled."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True,
                   timeout=timeout_s)
    etc = root / "etc"
    (etc / "tabletd").mkdir(parents=True, exist_ok=True)
    (etc / "tabletd" / "tabletd.toml").write_text(device_config(self_grant_s), encoding="utf-8")
    shutil.copyfile(PROJECT / "systemd" / UNIT, etc / "systemd" / "system" / UNIT)
    rules = etc / "polkit-1" / "rules.d"
    rules.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROJECT / "systemd" / "tabletd-poweroff.rules",
                    rules / "50-tabletd-poweroff.rules")
    for name, text in (dropins or {}).items():
        d = etc / "systemd" / "system" / f"{UNIT}.d"
        d.mkdir(exist_ok=True)
        (d / name).write_text(text, encoding="utf-8")
    cmd = [*nspawn_base(), "-D", str(root), f"--bind-ro={wheels}:{WHEELS_MOUNT}",
           "--console=pipe", "/bin/sh", "-c", SETUP_SCRIPT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"installing tabletd into {root} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


# ---- what this machine lets a container do --------------------------------------------------

CAP_SYS_RESOURCE = 24


def host_can_grant_rtprio(prio: int) -> bool:
    """Can PID 1 of a container apply ``LimitRTPRIO=prio``?

    Raising RLIMIT_RTPRIO above its hard limit needs CAP_SYS_RESOURCE. Some sandboxes (this
    development machine among them) run everything without it and with a hard limit of 0,
    so no systemd under them can honour LimitRTPRIO=.
    """
    if resource.getrlimit(resource.RLIMIT_RTPRIO)[1] >= prio:
        return True
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


# ---- the booted container ----------------------------------------------------------------------


class WaitTimeout(AssertionError):
    pass


def poll(what: str, probe: Callable[[], T | None], timeout_s: float,
         interval_s: float = 0.1, describe: Callable[[], str] | None = None) -> T:
    """Call ``probe`` until it returns something other than None; bounded by ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value is not None:
                return value
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            extra = f"\nlast error: {last_error!r}" if last_error else ""
            extra += f"\n{describe()}" if describe else ""
            raise WaitTimeout(f"timed out after {timeout_s:.0f} s waiting for {what}{extra}")
        time.sleep(interval_s)  # the poll period, not a wait for a fixed time


@dataclass
class Container:
    root: Path
    console_log: Path
    machine: str
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    pid1: int | None = None
    _log_file: Any = field(default=None, repr=False)

    def boot(self, timeout_s: float = 60) -> None:
        cmd = [*nspawn_base(), "-D", str(self.root), "-M", self.machine, "-b",
               *self.extra_args]
        log(f"booting: {' '.join(cmd)}")
        self._log_file = open(self.console_log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid1 = poll("the container's PID 1", self._find_pid1, timeout_s,
                         describe=self.console_tail)
        poll("systemd inside the container to answer", self._manager_up, timeout_s,
             describe=self.console_tail)

    def _find_pid1(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"systemd-nspawn exited with {self.proc.returncode}\n{self.console_tail()}"
            )
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text(encoding="ascii", errors="replace")
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            nspid = fields.get("NSpid", "").split()
            if (fields.get("PPid", "").strip() == str(self.proc.pid) and len(nspid) > 1
                    and nspid[-1] == "1"):
                return int(entry.name)
        return None

    def _manager_up(self) -> bool | None:
        proc = self.run(["systemctl", "show", "-p", "Version", "--value"], check=False,
                        timeout_s=10)
        return True if proc.returncode == 0 and proc.stdout.strip() else None

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout_s: float = 30,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (all of PID 1's namespaces, as root)."""
        assert self.pid1 is not None, "container not booted"
        full = ["nsenter", "-t", str(self.pid1), "-a", *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout_s,
                              env=INNER_ENV, input=input_text, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited with {proc.returncode} inside the container:\n"
                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
            )
        return proc

    # ---- views ------------------------------------------------------------------------------

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str = UNIT) -> str:
        """This boot's journal for ``unit`` (the daemon's lines and systemd's about it)."""
        return self.run(["journalctl", "--boot", "--unit", unit, "--output", "short-monotonic",
                         "--no-pager", "--quiet"]).stdout

    def read_file(self, path: str) -> str:
        return (self.root / path.lstrip("/")).read_text(encoding="utf-8")

    def events(self) -> list[dict[str, Any]]:
        """The daemon's event store, read inside the container as the tabletd user (so no
        file SQLite creates beside the database belongs to anyone else)."""
        script = (
            "import json, sqlite3, sys\n"
            f"db = sqlite3.connect('file:{STATE_DIR}/events.sqlite?mode=ro', uri=True)\n"
            "rows = db.execute('SELECT seq, kind, fields FROM events ORDER BY seq').fetchall()\n"
            "json.dump([{'seq': s, 'kind': k, 'fields': json.loads(f)} for s, k, f in rows],"
            " sys.stdout)\n"
        )
        out = self.run(["setpriv", "--reuid=tabletd", "--regid=tabletd", "--clear-groups",
                        "/usr/bin/python3", "-c", script]).stdout
        events: list[dict[str, Any]] = json.loads(out)
        return events

    def thread_schedulers(self, pid: int) -> list[tuple[int, int, int]]:
        """(tid, policy, rt_priority) of each thread of ``pid`` (container pid)."""
        out = self.run(["sh", "-c", f"cat /proc/{pid}/task/*/stat"]).stdout
        result = []
        for line in out.splitlines():
            tid = int(line.split(" ", 1)[0])
            rest = line[line.rindex(")") + 2:].split()  # fields 3.. of proc(5)
            result.append((tid, int(rest[38]), int(rest[37])))  # policy (41), rt_priority (40)
        return result

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no console log)"
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        return "container console (last lines):\n" + "\n".join(text.splitlines()[-lines:])

    # ---- teardown ------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 20) -> None:
        """Power the container off; kill it if it does not go within ``timeout_s``."""
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                # SIGTERM to nspawn halts the container's systemd cleanly.
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    log("the container did not power off in time; killing it")
                    if self.pid1 is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.pid1, signal.SIGKILL)  # ends its whole pid namespace
                    proc.kill()
                    proc.wait(timeout=10)
        finally:
            if self._log_file is not None:
                self._log_file.close()
            # nspawn leaves this directory behind when /run is not a tmpfs on the host.
            with contextlib.suppress(OSError):
                os.rmdir(f"/run/systemd/nspawn/propagate/{self.machine}")
