"""The session state file: atomic, fsync'd, tagged with the boot id (issue: persistence).

Within the same boot a restarted daemon gets its deadline back; after a reboot the boot id
differs and any session is over (the CLOCK_BOOTTIME numbers in it mean nothing any more).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tabletd.errors import StateFileError
from tabletd.session import EndReason, Grant, Snapshot, State

FORMAT = 1


def snapshot_to_json(snap: Snapshot) -> dict[str, Any]:
    d = asdict(snap)
    d["state"] = str(snap.state)
    d["end_reason"] = None if snap.end_reason is None else str(snap.end_reason)
    return d


def snapshot_from_json(d: Any) -> Snapshot:
    """Raises :class:`StateFileError` naming the field that is wrong."""
    if not isinstance(d, dict):
        raise StateFileError("snapshot: not an object")
    try:
        grant = d.get("grant")
        return Snapshot(
            state=State(d["state"]),
            grant=None if grant is None else Grant(**grant),
            started_ns=_opt_int(d, "started_ns"),
            deadline_ns=_opt_int(d, "deadline_ns"),
            end_reason=None if d.get("end_reason") is None else EndReason(d["end_reason"]),
            locked_reason=d.get("locked_reason"),
            fault_detail=d.get("fault_detail"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"snapshot: {exc}") from exc


def _opt_int(d: dict[str, Any], key: str) -> int | None:
    v = d.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise StateFileError(f"snapshot: {key} = {v!r}: not an integer")
    return v


def owner_when_root(directory: Path) -> tuple[int, int] | None:
    """Run as root, files made in ``directory`` go to its owner (the daemon's user, who
    must still open them); else None, nothing to change."""
    if os.geteuid() != 0:
        return None
    st = directory.stat()
    return st.st_uid, st.st_gid


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash or power cut leaves the old content or
    the new, never a mix: temp file, fsync, rename, fsync the directory. Mode 0600."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateFile:
    """``session.json`` in the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "session.json"

    def save(self, snap: Snapshot, boot: str) -> None:
        """Write atomically: temp file, fsync, rename, fsync the directory."""
        body = json.dumps({"format": FORMAT, "boot_id": boot, "snapshot": snapshot_to_json(snap)},
                          sort_keys=True)
        write_atomically(self.path, body.encode())

    def load(self) -> tuple[str, Snapshot] | None:
        """(boot id, snapshot), None if there is no file; raises :class:`StateFileError`."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"{self.path}: cannot read: {exc.strerror}") from exc
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StateFileError(f"{self.path}: not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StateFileError(f"{self.path}: unknown format")
        boot = doc.get("boot_id")
        if not isinstance(boot, str):
            raise StateFileError(f"{self.path}: boot_id missing")
        try:
            return boot, snapshot_from_json(doc.get("snapshot"))
        except StateFileError as exc:
            raise StateFileError(f"{self.path}: {exc}") from exc
