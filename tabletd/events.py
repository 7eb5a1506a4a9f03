"""The durable event store (BRIEF invariant 6): every event is committed before anything
reports it. SQLite in WAL mode with synchronous=FULL, so a committed event survives a crash
or a power cut. The link issue delivers from this table, in ``seq`` order, and deletes on ack.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL,
    session_id TEXT,
    boot_id    TEXT NOT NULL,
    boot_ns    INTEGER NOT NULL,
    wall_time  TEXT NOT NULL,
    fields     TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    id: str
    kind: str
    session_id: str | None
    boot_id: str
    boot_ns: int
    wall_time: str
    fields: Mapping[str, Any]


class EventStore:
    """Append-only, durable. Safe to use from several processes (the daemon and
    ``tabletd cutoff``): SQLite serialises the writers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def append(self, kind: str, fields: Mapping[str, Any], *, boot: str, boot_ns: int
               ) -> StoredEvent:
        """Commit one event (fsync'd on return) and return it with its id and sequence."""
        event_id = str(uuid.uuid4())
        session_id = fields.get("session_id")
        wall = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        body = json.dumps(dict(fields), sort_keys=True, default=str)
        cur = self._db.execute(
            "INSERT INTO events (id, kind, session_id, boot_id, boot_ns, wall_time, fields)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event_id, kind, session_id, boot, boot_ns, wall, body),
        )
        seq = cur.lastrowid
        assert seq is not None
        return StoredEvent(seq, event_id, kind, session_id, boot, boot_ns, wall, dict(fields))

    def all(self) -> list[StoredEvent]:
        rows = self._db.execute(
            "SELECT seq, id, kind, session_id, boot_id, boot_ns, wall_time, fields"
            " FROM events ORDER BY seq"
        ).fetchall()
        return [
            StoredEvent(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7])) for r in rows
        ]

    def close(self) -> None:
        self._db.close()
