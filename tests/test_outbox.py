"""The durable outbox (tabletd/events.py; BRIEF invariant 6; issue 3, item 4)."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from tabletd.events import (
    DEFAULT_CAPACITY,
    PROTECTED_KINDS,
    TELEMETRY_KINDS,
    EventStore,
    StoredEvent,
    is_protected,
)

REPO = Path(__file__).resolve().parent.parent
TELEMETRY = "input_refused"
PROTECTED = "call_ended"
UNKNOWN = "some_future_kind"


def add(store: EventStore, kind: str = PROTECTED, **fields: object) -> StoredEvent:
    return store.append(kind, fields, boot="boot-1", boot_ns=123)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "events.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[EventStore]:
    s = EventStore(path)
    yield s
    s.close()


def ids(events: list[StoredEvent]) -> list[str]:
    return [e.id for e in events]


# -- order, at-least-once, ack -------------------------------------------------------------


def test_pending_in_seq_order_with_limit_and_after(store: EventStore) -> None:
    made = [add(store, n=i) for i in range(10)]
    assert [e.seq for e in made] == sorted(e.seq for e in made)
    assert ids(store.pending(10)) == ids(made)
    assert ids(store.pending(3)) == ids(made[:3])
    assert ids(store.pending(3, after_seq=made[4].seq)) == ids(made[5:8])
    assert store.pending(5, after_seq=made[-1].seq) == []
    assert store.pending(0) == []
    got = store.pending(1)[0]
    assert (got.kind, got.fields, got.boot_id, got.boot_ns, got.wall_time) == (
        PROTECTED, {"n": 0}, "boot-1", 123, made[0].wall_time)


def test_pending_repeats_until_acked(store: EventStore) -> None:
    made = [add(store, n=i) for i in range(5)]
    first = store.pending(3)
    assert store.pending(3) == first  # at least once: nothing is consumed by reading
    assert store.ack([first[0].id, first[2].id]) == 2
    assert ids(store.pending(10)) == [made[1].id, made[3].id, made[4].id]
    assert store.count() == 3
    assert store.oldest_seq() == made[1].seq


def test_ack_ignores_unknown_and_repeated_ids(store: EventStore) -> None:
    a, b = add(store), add(store)
    assert store.ack(["not-an-id", a.id, a.id]) == 1
    assert store.ack([a.id]) == 0  # already acknowledged
    assert store.ack([]) == 0
    assert store.ack(iter([b.id])) == 1  # any iterable
    assert store.count() == 0
    assert store.oldest_seq() is None


def test_ack_of_more_than_one_chunk(store: EventStore) -> None:
    made = [add(store, n=i) for i in range(1200)]
    assert store.ack([e.id for e in made[:1100]] + ["x"] * 50) == 1100
    assert ids(store.pending(1000)) == ids(made[1100:])


def test_seq_never_goes_back_after_ack_and_reopen(path: Path) -> None:
    s = EventStore(path)
    last = [add(s) for _ in range(3)][-1]
    s.ack(e.id for e in s.all())
    s.close()
    s = EventStore(path)
    assert add(s).seq > last.seq  # AUTOINCREMENT: a seq is never reused
    s.close()


def test_bad_arguments(store: EventStore, path: Path) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.pending(-1)
    with pytest.raises(ValueError, match="after_seq"):
        store.pending(1, after_seq="3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="single string"):
        store.ack("abc")
    with pytest.raises(TypeError, match="strings"):
        store.ack([1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="capacity"):
        EventStore(path, capacity=0)


def test_opens_a_store_written_before_the_outbox(path: Path) -> None:
    """A file with only the old ``events`` table (no index, no counters) still works."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL"
               " UNIQUE, kind TEXT NOT NULL, session_id TEXT, boot_id TEXT NOT NULL, boot_ns"
               " INTEGER NOT NULL, wall_time TEXT NOT NULL, fields TEXT NOT NULL)")
    db.execute("INSERT INTO events (id, kind, session_id, boot_id, boot_ns, wall_time, fields)"
               " VALUES ('old-1', 'rail_cut', NULL, 'b', 1, 'w', '{\"by\": \"loop\"}')")
    db.commit()
    db.close()
    s = EventStore(path)
    assert [(e.id, e.fields) for e in s.pending(5)] == [("old-1", {"by": "loop"})]
    assert s.dropped_telemetry == 0
    assert add(s).seq == 2
    s.close()


# -- the capacity policy -------------------------------------------------------------------


def test_classes() -> None:
    assert not PROTECTED_KINDS & TELEMETRY_KINDS
    assert all(is_protected(k) for k in PROTECTED_KINDS)
    assert not any(is_protected(k) for k in TELEMETRY_KINDS)
    for kind in ("call_anything_new", "rail_whatever", "tamper_x", "privacy_y", UNKNOWN, ""):
        assert is_protected(kind), kind
    assert DEFAULT_CAPACITY == 10_000
    assert EventStore.__init__.__kwdefaults__["capacity"] == DEFAULT_CAPACITY  # type: ignore[index]


def test_telemetry_is_evicted_oldest_first(path: Path) -> None:
    s = EventStore(path, capacity=4)
    t = [add(s, TELEMETRY, n=i) for i in range(3)]
    p = add(s, PROTECTED)
    t4 = add(s, TELEMETRY, n=3)  # full: the oldest telemetry goes
    assert ids(s.all()) == [t[1].id, t[2].id, p.id, t4.id]
    p2 = add(s, UNKNOWN)  # unknown kinds are protected, and also evict telemetry
    assert ids(s.all()) == [t[2].id, p.id, t4.id, p2.id]
    assert s.evicted_telemetry == 2
    assert s.dropped_telemetry == 0
    assert not s.full_of_protected()
    s.close()


def test_protected_never_dropped_and_telemetry_dropped_when_full(path: Path) -> None:
    s = EventStore(path, capacity=3)
    t = add(s, TELEMETRY)
    p = [add(s, PROTECTED, n=i) for i in range(2)]
    assert not s.full_of_protected()
    p.append(add(s, "tamper_opened"))  # evicts the telemetry event
    assert ids(s.all()) == ids(p)
    assert s.full_of_protected()
    more = [add(s, k) for k in ("rail_cut", UNKNOWN, "cutoff", "locked")]
    assert all(e.stored and e.seq > 0 for e in more)
    assert ids(s.all()) == ids(p + more)  # past capacity: protected is never dropped
    dropped = add(s, TELEMETRY, n=99)
    assert (dropped.stored, dropped.seq, dropped.kind, dropped.fields) == (
        False, 0, TELEMETRY, {"n": 99})
    assert dropped.id not in ids(s.all())
    assert s.count() == 7
    assert s.dropped_telemetry == 1
    assert s.evicted_telemetry == 1
    assert t.id not in ids(s.all())
    s.close()
    s = EventStore(path, capacity=3)  # the counters survive a restart
    assert (s.dropped_telemetry, s.evicted_telemetry) == (1, 1)
    add(s, TELEMETRY)
    assert s.dropped_telemetry == 2
    # acks make room again
    s.ack(e.id for e in s.pending(5))
    assert not s.full_of_protected()
    assert add(s, TELEMETRY).stored
    s.close()


def test_full_of_protected_counts_unknown_kinds(path: Path) -> None:
    s = EventStore(path, capacity=2)
    add(s, UNKNOWN)
    add(s, TELEMETRY)
    assert not s.full_of_protected()
    add(s, UNKNOWN)
    assert s.full_of_protected()
    assert s.protected_count() == 2
    s.close()


# -- durability ----------------------------------------------------------------------------


def test_survives_close_and_reopen(path: Path) -> None:
    s = EventStore(path)
    made = [add(s, n=i) for i in range(5)]
    s.ack([made[0].id])
    s.close()
    s = EventStore(path)
    assert s.pending(10) == made[1:]
    assert s.count() == 4
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from tabletd.events import EventStore
    store = EventStore(Path(sys.argv[1]))
    mode, run = sys.argv[2], int(sys.argv[3])
    if mode == "self":
        for n in range(3):
            e = store.append("call_ended", {"run": run, "n": n}, boot="b", boot_ns=n)
        os.kill(os.getpid(), signal.SIGKILL)  # right after append returned
    n = 0
    while True:
        e = store.append("call_ended", {"run": run, "n": n}, boot="b", boot_ns=n)
        os.write(1, (e.id + "\\n").encode())
        n += 1
""")


def test_sigkill_right_after_append(path: Path) -> None:
    for run in range(4):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), "self", str(run)],
                              cwd=REPO, capture_output=True, timeout=60, check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    s = EventStore(path)
    got = [(e.fields["run"], e.fields["n"]) for e in s.all()]
    assert got == [(r, n) for r in range(4) for n in range(3)]
    s.close()


def test_sigkill_by_another_process_loses_nothing_reported(path: Path) -> None:
    reported: list[str] = []
    for run in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), "loop", str(run)],
                                cwd=REPO, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        for _ in range(5 + 7 * run):
            line = proc.stdout.readline().decode().strip()
            assert line, "child died"
            reported.append(line)
        proc.send_signal(signal.SIGKILL)  # while it is probably in the middle of an append
        proc.wait(timeout=30)
        proc.stdout.close()
    s = EventStore(path)
    stored = ids(s.all())
    assert set(reported) <= set(stored)  # every event reported as committed is there
    assert len(stored) == len(set(stored))
    seqs = [e.seq for e in s.all()]
    assert seqs == sorted(seqs)
    s.close()


# -- two writers ---------------------------------------------------------------------------


def test_two_stores_on_one_file_interleave(path: Path) -> None:
    a, b = EventStore(path), EventStore(path)
    made = []
    for i in range(20):
        made.append(add(a, n=i, w="a"))
        made.append(add(b, n=i, w="b"))
        if i % 5 == 4:
            assert b.ack([made[-4].id]) == 1  # one store acks what the other wrote
            made.pop(-4)
    assert ids(a.pending(100)) == ids(b.pending(100)) == ids(made)
    assert len(set(ids(made))) == len(made)
    assert [e.seq for e in made] == sorted({e.seq for e in made})
    a.close()
    b.close()


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tabletd.events import EventStore
    store = EventStore(Path(sys.argv[1]), capacity=int(sys.argv[4]))
    for n in range(int(sys.argv[3])):
        store.append("rail_cut" if n % 2 else "input_refused", {"w": sys.argv[2], "n": n},
                     boot="b", boot_ns=n)
    store.close()
""")


def test_two_processes_append_concurrently(path: Path) -> None:
    per_writer = 150
    EventStore(path).close()  # create the file first (WAL mode switch)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), w, str(per_writer),
                               str(DEFAULT_CAPACITY)], cwd=REPO) for w in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=120) == 0
    s = EventStore(path)
    events = s.all()
    assert len(events) == 2 * per_writer
    assert len({e.id for e in events}) == len(events)
    for w in ("a", "b"):
        assert [e.fields["n"] for e in events if e.fields["w"] == w] == list(range(per_writer))
    s.close()


def test_two_processes_respect_capacity_together(path: Path) -> None:
    per_writer, capacity = 100, 40
    EventStore(path, capacity=capacity).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), w, str(per_writer),
                               str(capacity)], cwd=REPO) for w in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=120) == 0
    s = EventStore(path, capacity=capacity)
    events = s.all()
    protected = [e for e in events if e.kind == "rail_cut"]
    assert len(protected) == per_writer  # every protected event of both writers is there
    assert len(events) == max(capacity, len(protected))
    assert s.evicted_telemetry + s.dropped_telemetry == per_writer - (len(events) - len(protected))
    s.close()


# -- stateful: the outbox against a model --------------------------------------------------

KINDS = [TELEMETRY, "link_up", PROTECTED, "rail_cut", UNKNOWN]


class OutboxModel(RuleBasedStateMachine):
    """EventStore against a list: append (two writers), ack, pending, reopen."""

    CAPACITY = 4
    acked = Bundle("acked")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-"))
        self.path = self.dir / "events.sqlite"
        self.stores = [EventStore(self.path, capacity=self.CAPACITY)]
        self.model: list[tuple[int, str, str]] = []  # (seq, id, kind) in order
        self.dropped = 0
        self.evicted = 0
        self.max_seq = 0

    def teardown(self) -> None:
        for s in self.stores:
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        assert self.stores[0].count() == 0

    def _model_append(self, kind: str) -> bool:
        if len(self.model) >= self.CAPACITY:
            telemetry = [m for m in self.model if not is_protected(m[2])]
            if not is_protected(kind) and len(self.model) - len(telemetry) >= self.CAPACITY:
                self.dropped += 1
                return False
            gone = {m[1] for m in telemetry[:len(self.model) - self.CAPACITY + 1]}
            self.evicted += len(gone)
            self.model = [m for m in self.model if m[1] not in gone]
        return True

    @rule(kind=st.sampled_from(KINDS), writer=st.integers(0, 1))
    def append(self, kind: str, writer: int) -> None:
        if writer >= len(self.stores):
            self.stores.append(EventStore(self.path, capacity=self.CAPACITY))
        expect_stored = self._model_append(kind)
        e = add(self.stores[writer], kind)
        assert e.stored == expect_stored
        if e.stored:
            assert e.seq > self.max_seq
            self.max_seq = e.seq
            self.model.append((e.seq, e.id, kind))
        else:
            assert e.seq == 0

    @rule(target=acked, data=st.data())
    def ack(self, data: st.DataObject) -> object:
        known = [m[1] for m in self.model]
        chosen = data.draw(st.lists(st.sampled_from(known), unique=True) if known
                           else st.just([]))
        extra = data.draw(st.lists(st.sampled_from(["nope", "x-1"]), max_size=2))
        store = data.draw(st.sampled_from(self.stores))
        assert store.ack(chosen + extra) == len(chosen)
        self.model = [m for m in self.model if m[1] not in set(chosen)]
        return multiple(*chosen)

    @rule(old=consumes(acked))
    def ack_again(self, old: str) -> None:
        assert self.stores[0].ack([old]) == 0

    @rule(limit=st.integers(0, 6), after=st.one_of(st.none(), st.integers(-1, 40)))
    def pending(self, limit: int, after: int | None) -> None:
        want = [m for m in self.model if after is None or m[0] > after][:limit]
        got = self.stores[-1].pending(limit, after_seq=after)
        assert [(e.seq, e.id, e.kind) for e in got] == want

    @rule()
    def reopen(self) -> None:
        for s in self.stores:
            s.close()
        self.stores = [EventStore(self.path, capacity=self.CAPACITY)]

    @precondition(lambda self: len(self.stores) > 1)
    @rule()
    def close_second_writer(self) -> None:
        self.stores.pop().close()

    @invariant()
    def matches_model(self) -> None:
        s = self.stores[0]
        assert [(e.seq, e.id, e.kind) for e in s.all()] == self.model
        assert s.count() == len(self.model)
        assert s.oldest_seq() == (self.model[0][0] if self.model else None)
        n_protected = sum(is_protected(m[2]) for m in self.model)
        assert s.full_of_protected() == (n_protected >= self.CAPACITY)
        assert (s.dropped_telemetry, s.evicted_telemetry) == (self.dropped, self.evicted)
        assert len(self.model) <= self.CAPACITY or n_protected == len(self.model)


OutboxModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOutboxModel = OutboxModel.TestCase



def test_docs_list_the_same_classes() -> None:
    """docs/events.md, "Capacity policy", names exactly the kinds of each class."""
    import re

    text = (REPO / "docs" / "events.md").read_text()
    rows = {line.split("|")[1].strip().split(":")[0].strip("* "): line.split("|")[2]
            for line in text.splitlines()
            if line.startswith(("| **protected**", "| **telemetry**"))}
    listed = {k: set(re.findall(r"`([a-z_]+)`", v.split(". Also")[0]))
              for k, v in rows.items()}
    assert listed == {"protected": set(PROTECTED_KINDS), "telemetry": set(TELEMETRY_KINDS)}
