"""REFERENCE SERVER — development and tests only, never installed on a tablet.

The reference server's SQLite store (``DIR/store.sqlite``; WAL, synchronous=FULL): the
device registry, bookings, staff commands queued for a device, the events tablets sent
(deduplicated on their id, as ``docs/protocol.md`` section 3.1 requires: a duplicate is
counted, never stored twice), and the ``error`` messages tablets answered with.

The command line and the running server are separate processes sharing this file: the CLI
writes bookings and commands, the server polls for them. Every method is one transaction
and is safe to call from several threads (one lock per :class:`Store`).

A booking moves ``booked`` → ``granted`` (grant sent) → ``started`` (start sent, or the
tablet reported ``call_started``) → ``ended`` (the tablet reported ``call_ended``: the
authoritative end, protocol section 5). Staff ending a call before its start makes it
``cancelled``.

Enrolment tokens (``docs/protocol.md`` section 7) are stored as the SHA-256 of the token,
never the token itself, each bound to one device, with an expiry and the time it was used:
:meth:`Store.consume_token` checks and marks it used in one transaction, so a token works
once even with two enrolments racing.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tabletd.devserver import DevServerError, UnknownRecordError

STORE_FILE = "store.sqlite"
BookingState = Literal["booked", "granted", "started", "ended", "cancelled"]
CommandKind = Literal["end", "lock", "unlock"]
OPEN_STATES: tuple[BookingState, ...] = ("booked", "granted", "started")
MIN_TOKEN_TTL_S = 60
MAX_TOKEN_TTL_S = 30 * 86400


class EnrolRefused(DevServerError):
    """An enrolment refused; ``code`` is the protocol's error code (section 7)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id            TEXT PRIMARY KEY,
    registered_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER,
    connected     INTEGER NOT NULL DEFAULT 0,
    software      TEXT,
    boot_id       TEXT,
    locked        INTEGER
);
CREATE TABLE IF NOT EXISTS bookings (
    session_id    TEXT PRIMARY KEY,
    device_id     TEXT NOT NULL REFERENCES devices(id),
    contact       TEXT NOT NULL,
    booked_at_ms  INTEGER NOT NULL,
    start_at_ms   INTEGER NOT NULL,
    duration_s    INTEGER NOT NULL,
    not_before_ms INTEGER NOT NULL,
    not_after_ms  INTEGER NOT NULL,
    state         TEXT NOT NULL
                  CHECK (state IN ('booked', 'granted', 'started', 'ended', 'cancelled')),
    grant_json    TEXT,
    signature     TEXT,
    granted_ms    INTEGER,
    started_ms    INTEGER,
    ended_ms      INTEGER,
    end_reason    TEXT
);
CREATE INDEX IF NOT EXISTS bookings_open ON bookings (state, device_id);
CREATE TABLE IF NOT EXISTS commands (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id     TEXT NOT NULL REFERENCES devices(id),
    kind          TEXT NOT NULL CHECK (kind IN ('end', 'lock', 'unlock')),
    session_id    TEXT,
    reason        TEXT,
    queued_ms     INTEGER NOT NULL,
    sent_ms       INTEGER
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands (sent_ms);
CREATE TABLE IF NOT EXISTS events (
    id            TEXT PRIMARY KEY,
    device_id     TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    session_id    TEXT,
    boot_id       TEXT NOT NULL,
    boot_ns       INTEGER NOT NULL,
    wall_time     TEXT NOT NULL,
    fields        TEXT NOT NULL,
    received_ms   INTEGER NOT NULL,
    duplicates    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_device ON events (device_id, seq);
CREATE TABLE IF NOT EXISTS tablet_errors (
    n             INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id     TEXT NOT NULL,
    code          TEXT NOT NULL,
    detail        TEXT NOT NULL,
    ref           TEXT,
    received_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS enrol_tokens (
    token_sha256  TEXT PRIMARY KEY,
    device_id     TEXT NOT NULL REFERENCES devices(id),
    issued_ms     INTEGER NOT NULL,
    expires_ms    INTEGER NOT NULL,
    used_ms       INTEGER
);
CREATE TABLE IF NOT EXISTS settings (
    name          TEXT PRIMARY KEY,
    value         TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Device:
    id: str
    registered_ms: int
    last_seen_ms: int | None
    connected: bool
    software: str | None
    boot_id: str | None
    locked: bool | None


@dataclass(frozen=True)
class Booking:
    session_id: str
    device_id: str
    contact: str
    booked_at_ms: int
    start_at_ms: int
    duration_s: int
    not_before_ms: int
    not_after_ms: int
    state: BookingState
    grant_json: str | None
    signature: str | None
    granted_ms: int | None
    started_ms: int | None
    ended_ms: int | None
    end_reason: str | None


@dataclass(frozen=True)
class Command:
    id: int
    device_id: str
    kind: CommandKind
    session_id: str | None
    reason: str | None
    queued_ms: int
    sent_ms: int | None


@dataclass(frozen=True)
class EventRecord:
    """One tablet event as the server stores it (the ``event`` message's members)."""

    id: str
    seq: int
    kind: str
    session_id: str | None
    boot_id: str
    boot_ns: int
    wall_time: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class StoredEvent:
    """A stored event: who sent it, the ``event`` message's members, when it was first
    received (server clock) and how many duplicates of it arrived since."""

    device_id: str
    id: str
    seq: int
    kind: str
    session_id: str | None
    boot_id: str
    boot_ns: int
    wall_time: str
    fields: dict[str, Any]
    received_ms: int
    duplicates: int

    @property
    def event(self) -> EventRecord:
        """The event alone, as the tablet sent it."""
        return EventRecord(id=self.id, seq=self.seq, kind=self.kind,
                           session_id=self.session_id, boot_id=self.boot_id,
                           boot_ns=self.boot_ns, wall_time=self.wall_time, fields=self.fields)


@dataclass(frozen=True)
class TabletError:
    device_id: str
    code: str
    detail: str
    ref: str | None
    received_ms: int


class Store:
    """The store file; open with :meth:`open` (or the constructor), close with :meth:`close`.

    Raises :class:`DevServerError` naming the file if it cannot be opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise DevServerError(f"{path}: cannot open the store ({exc})") from exc
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path) -> Store:
        """The store of a server directory made by ``tabletd-devserver init``."""
        if not directory.is_dir():
            raise DevServerError(f"{directory}: no such directory; run "
                                 "`tabletd-devserver init` first")
        return cls(directory / STORE_FILE)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), under this store's lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.execute(sql, params)
            cur.row_factory = sqlite3.Row
            return cur.fetchall()

    # -- settings --------------------------------------------------------------------

    def set_clock_offset_ms(self, offset_ms: int) -> None:
        """Recorded by ``serve`` so that ``book`` computes times on the server's clock."""
        with self._tx() as db:
            db.execute("INSERT INTO settings (name, value) VALUES ('clock_offset_ms', ?) "
                       "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                       (str(offset_ms),))

    def clock_offset_ms(self) -> int:
        rows = self._read("SELECT value FROM settings WHERE name = 'clock_offset_ms'")
        return int(rows[0]["value"]) if rows else 0

    # -- devices ---------------------------------------------------------------------

    def add_device(self, device_id: str, now_ms: int) -> None:
        """Register a device; raises :class:`DevServerError` if it is already registered."""
        try:
            with self._tx() as db:
                db.execute("INSERT INTO devices (id, registered_ms) VALUES (?, ?)",
                           (device_id, now_ms))
        except sqlite3.IntegrityError as exc:
            raise DevServerError(f"device {device_id}: already registered") from exc

    def device(self, device_id: str) -> Device | None:
        rows = self._read("SELECT * FROM devices WHERE id = ?", (device_id,))
        return _device(rows[0]) if rows else None

    def devices(self) -> list[Device]:
        return [_device(r) for r in self._read("SELECT * FROM devices ORDER BY id")]

    def set_connected(self, device_id: str, now_ms: int, *, connected: bool,
                      software: str | None = None, boot_id: str | None = None,
                      locked: bool | None = None) -> None:
        """Record a connection (with what the hello said) or a disconnection."""
        with self._tx() as db:
            if connected:
                db.execute("UPDATE devices SET connected = 1, last_seen_ms = ?, software = ?, "
                           "boot_id = ?, locked = ? WHERE id = ?",
                           (now_ms, software, boot_id, locked, device_id))
            else:
                db.execute("UPDATE devices SET connected = 0, last_seen_ms = ? WHERE id = ?",
                           (now_ms, device_id))

    def reset_connections(self) -> None:
        """At server start: nobody is connected (a previous server may have crashed)."""
        with self._tx() as db:
            db.execute("UPDATE devices SET connected = 0")

    # -- bookings --------------------------------------------------------------------

    def add_booking(self, device_id: str, *, contact: str, booked_at_ms: int,
                    start_at_ms: int, duration_s: int, not_before_ms: int,
                    not_after_ms: int) -> str:
        """Book a call; returns its new session id. Raises :class:`UnknownRecordError` if
        the device is not registered."""
        session_id = "call-" + secrets.token_hex(6)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM devices WHERE id = ?", (device_id,)).fetchone() is None:
                raise UnknownRecordError(f"device {device_id}: not registered "
                                         "(`tabletd-devserver device add`)")
            db.execute(
                "INSERT INTO bookings (session_id, device_id, contact, booked_at_ms, "
                "start_at_ms, duration_s, not_before_ms, not_after_ms, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'booked')",
                (session_id, device_id, contact, booked_at_ms, start_at_ms, duration_s,
                 not_before_ms, not_after_ms))
        return session_id

    def booking(self, session_id: str) -> Booking | None:
        rows = self._read("SELECT * FROM bookings WHERE session_id = ?", (session_id,))
        return _booking(rows[0]) if rows else None

    def bookings(self, device_id: str | None = None) -> list[Booking]:
        if device_id is None:
            rows = self._read("SELECT * FROM bookings ORDER BY start_at_ms")
        else:
            rows = self._read("SELECT * FROM bookings WHERE device_id = ? ORDER BY start_at_ms",
                              (device_id,))
        return [_booking(r) for r in rows]

    def open_bookings(self, now_ms: int) -> list[Booking]:
        """Bookings the scheduler still has work for: not ended, hard end not passed."""
        rows = self._read("SELECT * FROM bookings WHERE state IN ('booked', 'granted', "
                          "'started') AND not_after_ms > ? ORDER BY start_at_ms", (now_ms,))
        return [_booking(r) for r in rows]

    def mark_granted(self, session_id: str, grant_json: str, signature: str,
                     now_ms: int) -> None:
        """Record the signed grant (re-sent identical on every reconnection)."""
        with self._tx() as db:
            db.execute("UPDATE bookings SET state = 'granted', grant_json = ?, signature = ?, "
                       "granted_ms = ? WHERE session_id = ? AND state = 'booked'",
                       (grant_json, signature, now_ms, session_id))

    def mark_started(self, session_id: str, now_ms: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE bookings SET state = 'started', started_ms = ? "
                       "WHERE session_id = ? AND state IN ('booked', 'granted')",
                       (now_ms, session_id))

    def request_end(self, session_id: str, now_ms: int) -> Booking:
        """Staff end a call: before its grant was sent it is simply cancelled; once the
        tablet has the grant an ``end`` command is queued (and a not-yet-started booking
        is cancelled). Returns the booking as it was. Raises :class:`UnknownRecordError`
        for an unknown session, :class:`DevServerError` if it is already over."""
        with self._tx() as db:
            cur = db.execute("SELECT * FROM bookings WHERE session_id = ?", (session_id,))
            cur.row_factory = sqlite3.Row
            row = cur.fetchone()
            if row is None:
                raise UnknownRecordError(f"session {session_id}: no such booking")
            booking = _booking(row)
            if booking.state in ("ended", "cancelled"):
                raise DevServerError(f"session {session_id}: already {booking.state}")
            if booking.state in ("booked", "granted"):
                db.execute("UPDATE bookings SET state = 'cancelled', ended_ms = ?, "
                           "end_reason = 'cancelled' WHERE session_id = ?",
                           (now_ms, session_id))
            if booking.state in ("granted", "started"):
                db.execute("INSERT INTO commands (device_id, kind, session_id, queued_ms) "
                           "VALUES (?, 'end', ?, ?)", (booking.device_id, session_id, now_ms))
        return booking

    # -- commands --------------------------------------------------------------------

    def queue_command(self, device_id: str, kind: CommandKind, now_ms: int, *,
                      reason: str | None = None) -> int:
        """Queue ``lock`` or ``unlock`` (or a bare ``end``) for a device; returns its id.
        Raises :class:`UnknownRecordError` if the device is not registered."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM devices WHERE id = ?", (device_id,)).fetchone() is None:
                raise UnknownRecordError(f"device {device_id}: not registered")
            cur = db.execute("INSERT INTO commands (device_id, kind, reason, queued_ms) "
                             "VALUES (?, ?, ?, ?)", (device_id, kind, reason, now_ms))
            assert cur.lastrowid is not None
            return cur.lastrowid

    def pending_commands(self) -> list[Command]:
        rows = self._read("SELECT * FROM commands WHERE sent_ms IS NULL ORDER BY id")
        return [_command(r) for r in rows]

    def commands(self, device_id: str | None = None) -> list[Command]:
        if device_id is None:
            rows = self._read("SELECT * FROM commands ORDER BY id")
        else:
            rows = self._read("SELECT * FROM commands WHERE device_id = ? ORDER BY id",
                              (device_id,))
        return [_command(r) for r in rows]

    def mark_command_sent(self, command_id: int, now_ms: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE commands SET sent_ms = ? WHERE id = ?", (now_ms, command_id))

    # -- events ----------------------------------------------------------------------

    def add_events(self, device_id: str, events: Sequence[EventRecord],
                   now_ms: int) -> tuple[int, int]:
        """Store a batch of events in one durable transaction; returns ``(new, duplicates)``.

        A duplicate id is counted on the stored row, not stored again. ``call_started`` and
        ``call_ended`` move the matching booking of this device (protocol section 5: the
        tablet's ``call_ended`` is the authoritative end). The caller may acknowledge the
        ids once this returns.
        """
        new = dup = 0
        with self._tx() as db:
            for ev in events:
                cur = db.execute(
                    "INSERT INTO events (id, device_id, seq, kind, session_id, boot_id, "
                    "boot_ns, wall_time, fields, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?) ON CONFLICT (id) DO NOTHING",
                    (ev.id, device_id, ev.seq, ev.kind, ev.session_id, ev.boot_id, ev.boot_ns,
                     ev.wall_time, json.dumps(ev.fields, sort_keys=True), now_ms))
                if cur.rowcount == 0:
                    dup += 1
                    db.execute("UPDATE events SET duplicates = duplicates + 1 WHERE id = ?",
                               (ev.id,))
                    continue
                new += 1
                if ev.session_id is None:
                    continue
                if ev.kind == "call_started":
                    db.execute("UPDATE bookings SET state = 'started', started_ms = "
                               "coalesce(started_ms, ?) WHERE session_id = ? AND device_id = ? "
                               "AND state IN ('booked', 'granted')",
                               (now_ms, ev.session_id, device_id))
                elif ev.kind == "call_ended":
                    reason = ev.fields.get("reason")
                    db.execute("UPDATE bookings SET state = 'ended', ended_ms = ?, "
                               "end_reason = ? WHERE session_id = ? AND device_id = ? "
                               "AND state != 'ended'",
                               (now_ms, reason if isinstance(reason, str) else None,
                                ev.session_id, device_id))
        return new, dup

    def events(self, device_id: str | None = None) -> list[StoredEvent]:
        """Stored events, per device in ``seq`` order."""
        if device_id is None:
            rows = self._read("SELECT * FROM events ORDER BY device_id, seq")
        else:
            rows = self._read("SELECT * FROM events WHERE device_id = ? ORDER BY seq",
                              (device_id,))
        return [_stored_event(r) for r in rows]

    def duplicates_received(self, device_id: str | None = None) -> int:
        """How many event messages repeated an id already stored."""
        if device_id is None:
            rows = self._read("SELECT coalesce(sum(duplicates), 0) AS n FROM events")
        else:
            rows = self._read("SELECT coalesce(sum(duplicates), 0) AS n FROM events "
                              "WHERE device_id = ?", (device_id,))
        return int(rows[0]["n"])

    # -- enrolment tokens (docs/protocol.md section 7) ------------------------------------

    def issue_token(self, device_id: str, now_ms: int, ttl_s: int) -> str:
        """A new one-time enrolment token for ``device_id``, valid ``ttl_s`` seconds.

        The device is registered if it is not yet (a device may be enrolled again, e.g. after
        its storage was replaced: the new certificate is then issued to a new key). Only the
        token's SHA-256 is stored; the token itself is returned once, here.
        """
        if not MIN_TOKEN_TTL_S <= ttl_s <= MAX_TOKEN_TTL_S:
            raise DevServerError(f"token lifetime {ttl_s} s: must be {MIN_TOKEN_TTL_S} to "
                                 f"{MAX_TOKEN_TTL_S} s")
        token = secrets.token_urlsafe(32)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO devices (id, registered_ms) VALUES (?, ?)",
                       (device_id, now_ms))
            db.execute("INSERT INTO enrol_tokens (token_sha256, device_id, issued_ms, "
                       "expires_ms) VALUES (?, ?, ?, ?)",
                       (_token_hash(token), device_id, now_ms, now_ms + ttl_s * 1000))
        return token

    def consume_token(self, token: str, device_id: str, now_ms: int) -> None:
        """Use a token for ``device_id``: it must exist, be this device's, unused and not
        expired; it is then marked used in the same transaction. Raises
        :class:`EnrolRefused` with the protocol's error code otherwise."""
        with self._tx() as db:
            cur = db.execute("SELECT device_id, expires_ms, used_ms FROM enrol_tokens "
                             "WHERE token_sha256 = ?", (_token_hash(token),))
            row = cur.fetchone()
            if row is None:
                raise EnrolRefused("token_invalid", "no such enrolment token on this server")
            owner, expires_ms, used_ms = row
            if owner != device_id:
                raise EnrolRefused("token_wrong_device", f"this token was issued for another "
                                   f"device, not {device_id!r}")
            if used_ms is not None:
                raise EnrolRefused("token_used", "this token was already used; issue a new one")
            if now_ms >= expires_ms:
                raise EnrolRefused("token_expired", "this token has expired; issue a new one")
            db.execute("UPDATE enrol_tokens SET used_ms = ? WHERE token_sha256 = ?",
                       (now_ms, _token_hash(token)))

    # -- tablet errors ---------------------------------------------------------------

    def add_tablet_error(self, device_id: str, code: str, detail: str, ref: str | None,
                         now_ms: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO tablet_errors (device_id, code, detail, ref, received_ms) "
                       "VALUES (?, ?, ?, ?, ?)", (device_id, code, detail, ref, now_ms))

    def tablet_errors(self, device_id: str | None = None) -> list[TabletError]:
        if device_id is None:
            rows = self._read("SELECT * FROM tablet_errors ORDER BY n")
        else:
            rows = self._read("SELECT * FROM tablet_errors WHERE device_id = ? ORDER BY n",
                              (device_id,))
        return [TabletError(r["device_id"], r["code"], r["detail"], r["ref"],
                            r["received_ms"]) for r in rows]


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _device(r: sqlite3.Row) -> Device:
    return Device(id=r["id"], registered_ms=r["registered_ms"], last_seen_ms=r["last_seen_ms"],
                  connected=bool(r["connected"]), software=r["software"], boot_id=r["boot_id"],
                  locked=None if r["locked"] is None else bool(r["locked"]))


def _booking(r: sqlite3.Row) -> Booking:
    return Booking(**{name: r[name] for name in Booking.__dataclass_fields__})


def _command(r: sqlite3.Row) -> Command:
    return Command(**{name: r[name] for name in Command.__dataclass_fields__})


def _stored_event(r: sqlite3.Row) -> StoredEvent:
    values = {name: r[name] for name in StoredEvent.__dataclass_fields__}
    values["fields"] = json.loads(r["fields"])
    return StoredEvent(**values)
