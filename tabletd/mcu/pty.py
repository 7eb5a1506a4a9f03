"""Pseudo-terminals for the simulated MCU, and a launcher for its process.

A pty pair stands in for the UART: the simulated MCU holds the master side, the daemon opens
the slave side with pyserial at 115200 8N1 (a pty ignores the baud rate and passes every byte;
its modem-line ioctls fail, which pyserial tolerates on open).

The simulated MCU publishes its slave under a stable path, a symlink like socat's ``link=``,
so that an *unplug* (a new pty pair, a new ``/dev/pts/N``) looks to the daemon like a USB
serial adapter coming back under the same name.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import termios
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import IO

READY_PREFIX = "ready "
"""The one line the simulated MCU prints on stdout once its pty and control socket exist."""


@dataclass
class PtyPair:
    """Both ends of a raw pty. ``slave_fd`` is kept open by its owner: while no process holds
    the slave, reading the master fails with EIO and poll() reports a hang-up."""

    master_fd: int
    slave_fd: int
    slave_path: str

    def close(self) -> None:
        """Close both ends; whoever holds the slave open sees a hang-up (EIO on read)."""
        for fd in (self.master_fd, self.slave_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def open_pty() -> PtyPair:
    """A raw (no echo, no line editing, no CR/NL translation), 8N1, close-on-exec pty pair
    whose master is non-blocking."""
    master_fd, slave_fd = os.openpty()  # both are non-inheritable (PEP 446)
    try:
        tty.setraw(slave_fd, termios.TCSANOW)
        attrs = termios.tcgetattr(slave_fd)
        attrs[2] = (attrs[2] & ~(termios.CSIZE | termios.PARENB | termios.CSTOPB)) | termios.CS8
        attrs[4] = attrs[5] = termios.B115200
        termios.tcsetattr(slave_fd, termios.TCSANOW, attrs)
        os.set_blocking(master_fd, False)
        return PtyPair(master_fd, slave_fd, os.ttyname(slave_fd))
    except BaseException:
        os.close(master_fd)
        os.close(slave_fd)
        raise


def open_pty_pair() -> tuple[int, str]:
    """``(master_fd, slave_path)`` of a fresh raw pty; the caller owns ``master_fd``.

    The slave is closed here (its raw settings stay with the pty): until a process opens
    ``slave_path``, reading ``master_fd`` raises ``OSError(EIO)``. Use :func:`open_pty` to
    keep the slave open as well.
    """
    pair = open_pty()
    os.close(pair.slave_fd)
    return pair.master_fd, pair.slave_path


# ---- the simulated MCU as a child process ------------------------------------------------


def start_sim_mcu(
    state_dir: Path | str,
    seed: int = 0,
    *,
    extra_args: list[str] | None = None,
    ready_timeout_s: float = 10.0,
    stderr: int | IO[bytes] | None = None,
    tied: bool = False,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m tabletd.mcu.sim`` and wait until it is ready.

    Returns the process and the device path to open with pyserial (a symlink,
    ``<state_dir>/sim/mcu-tty``, to the pty slave). Its log goes to ``stderr`` (inherited if
    ``None``); stdout carries only the ready line. ``extra_args`` go to its command line
    (``--battery-pct``, ``--dock``, ``--drain-pct-per-min``, ...). ``tied``: its stdin is a
    pipe from this process, and it exits as soon as this process is gone, however it dies
    (SIGKILL included). Stop it with :func:`stop_sim_mcu`.
    """
    state = Path(state_dir)
    device = state / "sim" / "mcu-tty"
    args = [
        sys.executable, "-m", "tabletd.mcu.sim",
        "--port", str(device), "--state-dir", str(state), "--seed", str(seed),
        *(extra_args or []), *(["--exit-with-stdin"] if tied else []),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr,
                            stdin=subprocess.PIPE if tied else subprocess.DEVNULL)
    try:
        line = _read_line(proc, ready_timeout_s)
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"simulated MCU did not start: {line!r}")
        return proc, line[len(READY_PREFIX):]
    except BaseException:
        stop_sim_mcu(proc)
        raise


def stop_sim_mcu(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> int:
    """SIGTERM (the sim cuts its lease and removes its files), then SIGKILL if need be."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # in case a test froze it
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    for pipe in (proc.stdout, proc.stdin):
        if pipe is not None:
            pipe.close()
    return proc.returncode


def _read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"simulated MCU not ready within {timeout_s} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(
                    f"simulated MCU exited before it was ready (status {proc.wait()})"
                )
            buf += chunk
    return buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
