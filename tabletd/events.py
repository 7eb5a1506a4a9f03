"""The durable event store and outbox (BRIEF invariant 6; issue 3, item 4).

Every event is committed before anything reports it. SQLite in WAL mode with
synchronous=FULL, so a committed event survives a crash or a power cut. The same table is
the outbox: the link delivers from it in ``seq`` order (:meth:`EventStore.pending`), at
least once, and deletes an event only when the server acknowledges its id
(:meth:`EventStore.ack`). ``seq`` is ``AUTOINCREMENT``: it is never reused, even after the
newest rows are deleted, so it never goes backwards on the wire.

Capacity policy (also in ``docs/events.md``, section "Outbox")
--------------------------------------------------------------
The outbox holds at most ``capacity`` events (default :data:`DEFAULT_CAPACITY`, 10,000),
except that **a protected event is never dropped**. Every kind is either

* **protected** - call, cutoff, custody and audit records: the kinds in
  :data:`PROTECTED_KINDS`, any kind starting with one of :data:`PROTECTED_PREFIXES`, and
  **any kind not listed in** :data:`TELEMETRY_KINDS` (fail safe: an unknown record is never
  dropped); or
* **telemetry** - exactly the kinds in :data:`TELEMETRY_KINDS`.

When an event is appended to a store that already holds ``capacity`` events or more:

1. the oldest telemetry events are deleted first, as many as needed to make room (each one
   is counted in ``evicted_telemetry``);
2. a protected event is then appended in every case, even past ``capacity`` (once all
   telemetry is gone the store grows beyond ``capacity``; only protected events are there);
3. a telemetry event that finds ``capacity`` or more *protected* events in the store is not
   stored: it is dropped and counted in ``dropped_telemetry``. :meth:`EventStore.append`
   then returns it with ``stored=False`` and ``seq=0``.

So after every append: the store holds at most ``capacity`` events, or every event in it is
protected. Both counters are kept in the table ``outbox_counters`` of the same file, updated
in the same transaction as the append, and so survive restarts. When
:meth:`EventStore.full_of_protected` is true the daemon must refuse new calls (each call
adds protected records that could not be delivered) and say why.

Concurrency: the daemon and ``tabletd cutoff`` may append to the same file at once. Each
append and each ack is one ``BEGIN IMMEDIATE`` transaction: SQLite serialises the writers,
waiting up to ``timeout`` seconds (5 s) for the lock.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import uuid
from collections.abc import Iterable, Mapping
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
CREATE INDEX IF NOT EXISTS events_kind_seq ON events (kind, seq);
CREATE TABLE IF NOT EXISTS outbox_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO outbox_counters (name, value) VALUES ('dropped_telemetry', 0);
INSERT OR IGNORE INTO outbox_counters (name, value) VALUES ('evicted_telemetry', 0);
"""

DEFAULT_CAPACITY = 10_000
"""Default bound of the outbox, in events (a few MB of SQLite at most)."""

PROTECTED_KINDS: frozenset[str] = frozenset({
    # calls
    "call_scheduled", "call_started", "call_ended", "call_start_refused",
    "call_link_lost", "call_link_restored", "call_interrupted",
    "grant_refused", "end_refused",
    # cutoff
    "rail_cut", "cutoff",
    # custody
    "docked", "undocked", "locked", "unlocked", "unlock_refused",
    # audit
    "privacy_engaged", "privacy_released", "tamper_opened", "tamper_closed",
    "fault", "state_file_corrupt",
})
"""Kinds that are never dropped. Listed for the reader: any kind that is not in
:data:`TELEMETRY_KINDS` is protected too."""

PROTECTED_PREFIXES: tuple[str, ...] = ("call_", "rail_", "cutoff", "tamper_", "privacy_")
"""A kind starting with one of these is protected, even if listed as telemetry."""

TELEMETRY_KINDS: frozenset[str] = frozenset({
    "input_refused",  # an input the state did not accept (e.g. a repeated start): no effect
    # an invalid frame from the server: the server already got an `error` reply for it, and
    # a hostile server flooding garbage must not fill the outbox and so block calls
    "protocol_error",
    "link_up", "link_down",  # the central link's state
    "battery",  # power readings from the dock MCU
    "mcu_link_up", "mcu_link_down",  # the UART link to the MCU (a loose one may flap)
})
"""The only kinds that may be evicted or dropped when the outbox is full."""


def is_protected(kind: str) -> bool:
    """Whether events of ``kind`` are never dropped (see the module docstring)."""
    return kind.startswith(PROTECTED_PREFIXES) or kind not in TELEMETRY_KINDS


# The telemetry kinds as the SQL sees them (a prefix always wins, as in is_protected).
_TELEMETRY = tuple(sorted(k for k in TELEMETRY_KINDS if not is_protected(k)))
_IS_TELEMETRY_SQL = f"kind IN ({', '.join('?' * len(_TELEMETRY))})"
_COLUMNS = "seq, id, kind, session_id, boot_id, boot_ns, wall_time, fields"
_ACK_CHUNK = 500  # ids per DELETE statement (well under SQLite's variable limit)


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
    stored: bool = True
    """False only for a telemetry event dropped by the capacity policy (then ``seq`` is 0)."""


def _row(r: tuple[Any, ...]) -> StoredEvent:
    return StoredEvent(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]))


class EventStore:
    """Durable, bounded outbox. Safe to use from several processes (the daemon and
    ``tabletd cutoff``): SQLite serialises the writers."""

    def __init__(self, path: Path, *, capacity: int = DEFAULT_CAPACITY,
                 timeout: float = 5.0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"outbox capacity must be a positive integer, not {capacity!r}")
        self.path = path
        self.capacity = capacity
        self._db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    # -- writing ------------------------------------------------------------------------

    def append(self, kind: str, fields: Mapping[str, Any], *, boot: str, boot_ns: int
               ) -> StoredEvent:
        """Commit one event (fsync'd on return) and return it with its id and sequence.

        Applies the capacity policy: may evict the oldest telemetry events; a telemetry
        event that finds the store full of protected events is not stored and comes back
        with ``stored=False`` and ``seq=0``. A protected event is always stored.
        """
        event_id = str(uuid.uuid4())
        session_id = fields.get("session_id")
        wall = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        body = json.dumps(dict(fields), sort_keys=True, default=str)
        protected = is_protected(kind)
        with self._write():
            total = self._count()
            if total >= self.capacity:
                telemetry = self._telemetry_count()
                if not protected and total - telemetry >= self.capacity:
                    self._bump("dropped_telemetry", 1)
                    return StoredEvent(0, event_id, kind, session_id, boot, boot_ns, wall,
                                       dict(fields), stored=False)
                evict = min(total - self.capacity + 1, telemetry)
                if evict > 0:
                    self._db.execute(
                        f"DELETE FROM events WHERE seq IN (SELECT seq FROM events"  # noqa: S608
                        f" WHERE {_IS_TELEMETRY_SQL} ORDER BY seq LIMIT ?)",
                        (*_TELEMETRY, evict),
                    )
                    self._bump("evicted_telemetry", evict)
            cur = self._db.execute(
                "INSERT INTO events (id, kind, session_id, boot_id, boot_ns, wall_time, fields)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event_id, kind, session_id, boot, boot_ns, wall, body),
            )
            seq = cur.lastrowid
        assert seq is not None
        return StoredEvent(seq, event_id, kind, session_id, boot, boot_ns, wall, dict(fields))

    def ack(self, ids: Iterable[str]) -> int:
        """Delete the events with these ids (the server has stored them durably).

        Unknown ids (already acknowledged, or never ours) are ignored. Returns how many
        events were deleted. One transaction, committed on return.
        """
        if isinstance(ids, str | bytes):
            raise TypeError("ack() takes an iterable of event ids, not a single string")
        wanted = list(dict.fromkeys(ids))
        for i in wanted:
            if not isinstance(i, str):
                raise TypeError(f"event ids are strings, not {type(i).__name__}: {i!r}")
        if not wanted:
            return 0
        deleted = 0
        with self._write():
            for start in range(0, len(wanted), _ACK_CHUNK):
                chunk = wanted[start:start + _ACK_CHUNK]
                cur = self._db.execute(
                    f"DELETE FROM events WHERE id IN ({', '.join('?' * len(chunk))})",  # noqa: S608
                    chunk,
                )
                deleted += cur.rowcount
        return deleted

    # -- reading ------------------------------------------------------------------------

    def all(self) -> list[StoredEvent]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM events ORDER BY seq").fetchall()  # noqa: S608
        return [_row(r) for r in rows]

    def pending(self, limit: int, after_seq: int | None = None) -> list[StoredEvent]:
        """Up to ``limit`` unacknowledged events in ``seq`` order, those after ``after_seq``
        only when it is given. The same events come back until they are acknowledged."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an integer >= 0, not {limit!r}")
        if after_seq is not None and (isinstance(after_seq, bool)
                                      or not isinstance(after_seq, int)):
            raise ValueError(f"after_seq must be an integer or None, not {after_seq!r}")
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
            (-1 if after_seq is None else after_seq, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def count(self) -> int:
        """How many events are waiting for an ack."""
        return self._count()

    def appended_total(self) -> int:
        """How many events were ever stored in this file (acknowledged ones included)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'"
                               ).fetchone()
        return 0 if row is None else int(row[0])

    def oldest_seq(self) -> int | None:
        """The ``seq`` of the oldest unacknowledged event, or None when the outbox is empty."""
        value = self._db.execute("SELECT MIN(seq) FROM events").fetchone()[0]
        return None if value is None else int(value)

    def protected_count(self) -> int:
        """How many protected events are waiting (unknown kinds count as protected)."""
        return self._count() - self._telemetry_count()

    def full_of_protected(self) -> bool:
        """True when ``capacity`` or more protected events wait for an ack.

        Then no telemetry can be stored, and protected events are only stored by going past
        the bound. The daemon must refuse new calls while this is true (a call adds
        protected records: scheduled, started, rail cut, ended) and say why, e.g. on the
        screen and in the status API: "event backlog full: waiting for the server". It
        becomes false again as the server acknowledges events.
        """
        return self.protected_count() >= self.capacity

    @property
    def dropped_telemetry(self) -> int:
        """Telemetry events never stored because the outbox was full of protected events
        (persisted; survives restarts; shared by every process using the file)."""
        return self._counter("dropped_telemetry")

    @property
    def evicted_telemetry(self) -> int:
        """Stored telemetry events deleted, oldest first, to make room (persisted)."""
        return self._counter("evicted_telemetry")

    def close(self) -> None:
        self._db.close()

    # -- internals ----------------------------------------------------------------------

    def _write(self) -> _Transaction:
        return _Transaction(self._db)

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def _telemetry_count(self) -> int:
        sql = f"SELECT COUNT(*) FROM events WHERE {_IS_TELEMETRY_SQL}"  # noqa: S608
        return int(self._db.execute(sql, _TELEMETRY).fetchone()[0])

    def _counter(self, name: str) -> int:
        row = self._db.execute(
            "SELECT value FROM outbox_counters WHERE name = ?", (name,)).fetchone()
        return 0 if row is None else int(row[0])

    def _bump(self, name: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO outbox_counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): takes the write lock
    first, so a count-then-write cannot race another process."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (e.g. on SQLITE_FULL).
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
