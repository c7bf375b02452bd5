"""The run directory: a lock, a SQLite ledger of units, and atomic outputs.

Everything a resumed run needs is here. The ledger is the truth about what finished: an output
is written under a temporary name and renamed only when complete, so a crash never leaves a
half-written file that counts as done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, TypeVar

from runner.errors import RunLockedError, StorageError
from runner.jsondata import Json, JsonObject
from runner.lifecycle import UnitState

LEDGER = "ledger.sqlite"
SUMMARY = "summary.json"
RAY_PIDS = "ray-processes.json"


@dataclass(slots=True)
class UnitRow:
    """One unit's ledger record."""

    stage: str
    unit: str
    fingerprint: str
    state: UnitState
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    duration: float | None = None
    worker: str | None = None
    error: str | None = None
    # what the kind gave and got back: JSON when read from the ledger
    input: object = None
    result: object = None
    # the Ray node the unit ran on (its id) and that node's IP
    node_id: str | None = None
    node_ip: str | None = None


@dataclass(slots=True)
class Event:
    """A moment in a unit's life worth drawing: an attempt that ended early or that a later
    attempt replaced (kind `attempt`, from `started` to `time`, outcome in `detail`), a
    `preempted` or `retry` mark."""

    stage: str
    unit: str
    kind: str
    time: float
    lane: str | None = None
    detail: str | None = None
    started: float | None = None
    # the IP of the node it happened on, where known
    node: str | None = None


@dataclass(frozen=True, slots=True)
class PriorUnit:
    """What the ledger remembers of a unit, enough to decide run or skip."""

    fingerprint: str
    state: UnitState


@dataclass(frozen=True, slots=True)
class Prior:
    """What the ledger remembers of a stage's units: done ones by fingerprint, the rest whole."""

    done: dict[str, str]
    others: dict[str, PriorUnit]

    def get(self, unit: str) -> PriorUnit | None:
        fingerprint = self.done.get(unit)
        if fingerprint is not None:
            return PriorUnit(fingerprint, UnitState.done)
        return self.others.get(unit)


@dataclass(frozen=True)
class StageRecord:
    """What the ledger remembers of a stage: its fingerprint and the config it hashed."""

    fingerprint: str
    config: JsonObject
    state: str
    # `units_digest` of the stage's units when the stage ended with every one of them done
    units: str | None = None


# a value SQLite gives back or takes as a parameter
SqlValue = str | bytes | int | float | None
R = TypeVar("R")


class StageRow(TypedDict):
    """A stage's row in `Ledger.stages`: its summary is the JSON text the ledger keeps."""

    stage: str
    kind: str
    state: str
    started: float | None
    ended: float | None
    summary: str | None


class LastRun(TypedDict):
    """The latest run attempt's record (`Ledger.last_run`)."""

    started: float
    ended: float | None
    exit_code: int | None
    pid: int | None


class RunRow(LastRun):
    """One run attempt's record (`Ledger.runs`), with what it did."""

    id: int
    summary: Json


class EventRow(TypedDict):
    """One recorded event (`Ledger.events`), the fields of `Event`."""

    stage: str
    unit: str
    kind: str
    time: float
    lane: str | None
    detail: str | None
    started: float | None
    node: str | None


class SpanRow(TypedDict):
    """A unit's (or an earlier attempt's) span on a timeline (`Ledger.spans_by_worker`)."""

    unit: str
    state: str
    attempts: int
    started: float
    ended: float
    worker: str | None
    node_id: str | None
    node_ip: str | None


class FullSpanRow(SpanRow):
    """A span with the unit's duration and error (`Ledger.spans`)."""

    duration: float | None
    error: str | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS stages (
    stage TEXT PRIMARY KEY, kind TEXT, fingerprint TEXT, config TEXT, state TEXT,
    started REAL, ended REAL, summary TEXT, units_digest TEXT
);
CREATE TABLE IF NOT EXISTS units (
    stage TEXT, unit TEXT, fingerprint TEXT, state TEXT, attempts INTEGER,
    started REAL, ended REAL, duration REAL, worker TEXT, error TEXT, input TEXT, result TEXT,
    node_id TEXT, node_ip TEXT,
    PRIMARY KEY (stage, unit)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started REAL, ended REAL, exit_code INTEGER, pid INTEGER,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS events (
    stage TEXT, unit TEXT, kind TEXT, time REAL, lane TEXT, detail TEXT, started REAL, node TEXT
);
CREATE TABLE IF NOT EXISTS log (stage TEXT, run INTEGER, record TEXT);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, digest TEXT
);
"""
# A unit's row holds its last attempt. When a later attempt of the run starts it again (a
# resume after Ctrl-C, a rerun of a failed unit, `run.fresh`), the attempt it replaces is kept
# as an `attempt` event, so the run's record keeps every attempt. A `pending` row with an end
# is a done one that `supersede` set back.
_KEEP_ATTEMPTS = """
CREATE TRIGGER IF NOT EXISTS earlier_attempt BEFORE UPDATE OF started ON units
WHEN OLD.ended IS NOT NULL AND OLD.started IS NOT NULL AND NEW.started IS NOT OLD.started
BEGIN
    INSERT INTO events (stage, unit, kind, time, lane, detail, started, node)
    VALUES (OLD.stage, OLD.unit, 'attempt', OLD.ended, OLD.worker,
            CASE OLD.state WHEN 'pending' THEN 'done' ELSE OLD.state END, OLD.started,
            OLD.node_ip);
END;
"""
_UNIT_COLUMNS = (
    "stage",
    "unit",
    "fingerprint",
    "state",
    "attempts",
    "started",
    "ended",
    "duration",
    "worker",
    "error",
    "input",
    "result",
    "node_id",
    "node_ip",
)
# an upsert, not INSERT OR REPLACE: a replaced row is updated in place, which the trigger sees
_WRITE_UNITS = (
    f"INSERT INTO units ({', '.join(_UNIT_COLUMNS)}) VALUES ({','.join('?' * 14)}) "
    "ON CONFLICT (stage, unit) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in _UNIT_COLUMNS[2:])
)


def storage_error(root: Path, exc: BaseException, path: Path | None = None) -> StorageError:
    """One message for a run directory that cannot be written, whatever layer noticed; it
    names the file (`path`) when one output could not be written."""
    reason = _reason(exc)
    where = f"run directory {root}" if path is None else str(path)
    return StorageError(
        f"{where}: cannot write ({reason}); the run stopped and the ledger keeps "
        "every unit finished so far: make room or choose a writable run.dir, then run again"
    )


def _reason(exc: BaseException) -> str:
    """The system's words for the error (pyarrow's OSError has its own text as `strerror`,
    with the errno inside: `Error writing bytes to file. Detail: [errno 28] ...`)."""
    found = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
    if found:
        return os.strerror(int(found.group(1)))
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0]


class Ledger:
    """SQLite ledger of stages and units; safe to share between the run's threads."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self._path, self._readonly = path, readonly
        self._lock = threading.Lock()
        # the id of the run attempt this runner records (`start_run`), for the stages' logs
        self.run_id: int | None = None
        # the first write that failed (a full disk, a read-only directory); later writes are
        # skipped: every committed transaction is whole, so the ledger stays consistent
        self.failure: StorageError | None = None
        # told once, on the first failed write, so the run can stop cleanly
        self.on_failure: Callable[[], None] | None = None
        try:
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise storage_error(path.parent, exc) from None

    @contextmanager
    def _writing(self) -> Iterator[bool]:
        """Guard one write: yields False once the ledger has failed (skip it); a failure is
        recorded, reported once to `on_failure`, and rolled back, never raised into a stage."""
        if self._readonly or self.failure is not None:
            yield False
            return
        try:
            yield True
        except (sqlite3.Error, OSError) as exc:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            self.failure = storage_error(self._path.parent, exc)
            if self.on_failure is not None:
                self.on_failure()

    def fail(self, error: StorageError) -> None:
        """An output of the run could not be written: the run stops as for a failed ledger
        write (the first failure is the one reported); the ledger keeps what it committed."""
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = error
        if first and self.on_failure is not None:
            self.on_failure()

    def close(self) -> None:
        self._db.close()

    def _has(self, table: str, column: str) -> bool:
        """Whether the ledger's `table` has `column` (a ledger of an older runner may not);
        the caller holds the lock."""
        return column in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}

    def _migrate(self) -> None:
        """Add the columns a ledger written by an older runner lacks."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(units)")}
        for column in ("node_id", "node_ip"):
            if column not in have:
                self._db.execute(f"ALTER TABLE units ADD COLUMN {column} TEXT")
        for table, column in (("stages", "units_digest"), ("runs", "summary"), ("events", "node")):
            if not self._has(table, column):
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        self._db.executescript(_KEEP_ATTEMPTS)

    def stage(self, stage: str) -> StageRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM stages WHERE stage=?", (stage,)).fetchone()
        if row is None:
            return None
        units = row[8] if len(row) > 8 else None  # older ledgers lack the column
        return StageRecord(row[2], json.loads(row[3]), row[4], units)

    def stages(self) -> list[StageRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT stage, kind, state, started, ended, summary FROM stages ORDER BY started"
            ).fetchall()
        return [
            StageRow(stage=s, kind=k, state=st, started=a, ended=e, summary=sm)
            for s, k, st, a, e, sm in rows
        ]

    def save_stage(
        self,
        stage: str,
        kind: str,
        fingerprint: str,
        config: Mapping[str, object],
        state: str,
        started: float | None = None,
        ended: float | None = None,
        summary: Mapping[str, object] | None = None,
        units: str | None = None,
    ) -> None:
        """Record a stage; `units` (a `units_digest`) only when every unit of its plan is done:
        any other record, a running one included, forgets it. Without a `summary` the one
        recorded before is kept (an attempt that ran none of its units has nothing to add)."""
        with self._lock, self._writing() as ok:
            if not ok:
                return
            self._db.execute(
                "INSERT OR REPLACE INTO stages (stage, kind, fingerprint, config, state, started, "
                "ended, summary, units_digest) VALUES (?,?,?,?,?,?,?,"
                "COALESCE(?, (SELECT summary FROM stages WHERE stage=?)),?)",
                (
                    stage,
                    kind,
                    fingerprint,
                    json.dumps(config, sort_keys=True, default=str),
                    state,
                    started,
                    ended,
                    json.dumps(summary) if summary else None,
                    stage,
                    units,
                ),
            )

    def prior_units(self, stage: str) -> dict[str, PriorUnit]:
        with self._lock:
            rows = self._db.execute(
                "SELECT unit, fingerprint, state FROM units WHERE stage=?", (stage,)
            ).fetchall()
        return {u: PriorUnit(fp, _STATES[s]) for u, fp, s in rows}

    def prior(self, stage: str) -> Prior:
        """What a plan compares with: the fingerprints of the stage's done units (a plain dict,
        built by SQLite, no object per unit) and the few units that did not finish."""
        with self._lock:
            done = dict(
                self._db.execute(
                    "SELECT unit, fingerprint FROM units WHERE stage=? AND state='done'", (stage,)
                )
            )
            others = self._db.execute(
                "SELECT unit, fingerprint, state FROM units WHERE stage=? AND state!='done'",
                (stage,),
            ).fetchall()
        return Prior(done, {u: PriorUnit(fp, _STATES[s]) for u, fp, s in others})

    def write(self, rows: Iterable[UnitRow]) -> None:
        """Upsert unit records in one transaction (callers batch them)."""
        dump = _dump
        params = [
            (
                r.stage,
                r.unit,
                r.fingerprint,
                r.state.value,
                r.attempts,
                r.started,
                r.ended,
                r.duration,
                r.worker,
                r.error,
                dump(r.input),
                dump(r.result),
                r.node_id,
                r.node_ip,
            )
            for r in rows
        ]
        if not params:
            return
        with self._lock, self._writing() as ok:
            if not ok:
                return
            self._db.execute("BEGIN")
            self._db.executemany(_WRITE_UNITS, params)
            self._db.execute("COMMIT")

    def rows(
        self,
        stage: str,
        units: Iterable[str] | None = None,
        unfinished: bool = False,
        state: UnitState | None = None,
        by_start: bool = False,
        limit: int | None = None,
    ) -> Iterator[UnitRow]:
        """Unit records of a stage (all, those named, those not done, or those in `state`), in
        ledger order or, `by_start`, by start (never started last), at most `limit` of them:
        the filters and the order are SQLite's, so a status of a million units reads a page."""
        query = "SELECT * FROM units WHERE stage=?" + (" AND state != 'done'" if unfinished else "")
        params: tuple[SqlValue, ...] = (stage,)
        if state is not None:
            query += " AND state = ?"
            params += (state.value,)
        if by_start:
            query += " ORDER BY started IS NULL, started, unit"
        if limit is not None:
            query += " LIMIT ?"
            params += (limit,)
        with self._lock:
            found = self._db.execute(query, params).fetchall()
        wanted = set(units) if units is not None else None
        for r in found:
            if wanted is None or r[1] in wanted:
                yield UnitRow(
                    r[0],
                    r[1],
                    r[2],
                    _STATES[r[3]],
                    r[4],
                    r[5],
                    r[6],
                    r[7],
                    r[8],
                    r[9],
                    _load(r[10]),
                    _load(r[11]),
                    *(r[12:14] if len(r) > 12 else (None, None)),  # older ledgers lack nodes
                )

    def start_run(self) -> float:
        """Record that a run attempt starts now; return its start time."""
        now = time.time()
        with self._lock, self._writing() as ok:
            if ok:
                cursor = self._db.execute(
                    "INSERT INTO runs (started, pid) VALUES (?, ?)", (now, os.getpid())
                )
                self.run_id = cursor.lastrowid
        return now

    def end_run(
        self, started: float, exit_code: int, summary: Mapping[str, object] | None = None
    ) -> None:
        """Record the attempt's end, its exit code and what it did (`summary`)."""
        with self._lock, self._writing() as ok:
            if not ok:
                return
            self._db.execute(
                "UPDATE runs SET ended=?, exit_code=?, summary=? WHERE started=?",
                (time.time(), exit_code, json.dumps(summary) if summary else None, started),
            )

    def last_run(self) -> LastRun | None:
        """The latest run's record (started, ended, exit_code, pid), or None."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT started, ended, exit_code, pid FROM runs ORDER BY id DESC LIMIT 1"
                ).fetchone()
            except sqlite3.OperationalError:
                return None
        if not row:
            return None
        return LastRun(started=row[0], ended=row[1], exit_code=row[2], pid=row[3])

    def runs(self) -> list[RunRow]:
        """Every attempt of the run, first first: id, started, ended, exit_code, pid and
        summary (what it did, None when its runner never ended it)."""
        keys = ("id", "started", "ended", "exit_code", "pid", "summary")
        with self._lock:
            have = {r[1] for r in self._db.execute("PRAGMA table_info(runs)")}
            if not have:
                return []
            columns = [k if k in have else "NULL" for k in keys]
            rows = self._db.execute(f"SELECT {', '.join(columns)} FROM runs ORDER BY id").fetchall()
        return [
            RunRow(id=i, started=s, ended=e, exit_code=c, pid=p, summary=_load(sm))
            for i, s, e, c, p, sm in rows
        ]

    def add_events(self, events: Iterable[Event]) -> None:
        params = [
            (e.stage, e.unit, e.kind, e.time, e.lane, e.detail, e.started, e.node) for e in events
        ]
        if params:
            with self._lock, self._writing() as ok:
                if ok:
                    self._db.executemany(
                        "INSERT INTO events (stage, unit, kind, time, lane, detail, started, "
                        "node) VALUES (?,?,?,?,?,?,?,?)",
                        params,
                    )

    def events(self, since: float = 0.0, moments: bool = False) -> list[EventRow]:
        """The recorded events since `since`; with `moments`, all but the `attempt` ones."""
        keys = ("stage", "unit", "kind", "time", "lane", "detail", "started", "node")
        with self._lock:
            have = {r[1] for r in self._db.execute("PRAGMA table_info(events)")}
            if not have:  # a ledger written before events existed
                return []
            columns = [k if k in have else "NULL" for k in keys]  # older ledgers lack nodes
            query = f"SELECT {', '.join(columns)} FROM events WHERE time >= ?"
            if moments:
                query += " AND kind != 'attempt'"
            rows = self._db.execute(query, (since,)).fetchall()
        return [
            EventRow(stage=s, unit=u, kind=k, time=t, lane=la, detail=d, started=st, node=n)
            for s, u, k, t, la, d, st, n in rows
        ]

    def event_counts(self, since: float = 0.0) -> dict[tuple[str, str, str], int]:
        """How many events of each (stage, kind, detail) were recorded since `since`, counted
        by SQLite: the summary's preemptions by reason and requeues, and the report's."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT stage, kind, COALESCE(detail, ''), COUNT(*) FROM events "
                    "WHERE time >= ? GROUP BY stage, kind, detail",
                    (since,),
                ).fetchall()
            except sqlite3.OperationalError:
                return {}
        found: dict[tuple[str, str, str], int] = {}
        for stage, kind, detail, n in rows:
            found[(stage, kind, detail)] = found.get((stage, kind, detail), 0) + n
        return found

    def attempt_count(self, stage: str, since: float) -> int:
        """How many earlier attempts of the stage's units (`attempt` events) ended since `since`."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM events WHERE stage=? AND kind='attempt' AND time >= ? "
                "AND started IS NOT NULL",
                (stage, since),
            ).fetchone()
        return int(row[0])

    def attempts_by_lane(self, stage: str, since: float) -> Iterator[SpanRow]:
        """The earlier attempts of the stage's units as `spans_by_worker` rows (state from the
        event's detail, the lane as worker), in the same order, a chunk at a time."""
        with self._lock:
            node = "node" if self._has("events", "node") else "NULL"
        query = (
            f"SELECT unit, COALESCE(detail, 'done'), 0, started, time, lane, NULL, {node} "
            "FROM events WHERE stage=? AND kind='attempt' AND time >= ? AND started IS NOT NULL "
            "ORDER BY lane, started, unit"
        )
        for chunk in self._chunks(query, (stage, since), _span):
            yield from chunk

    def add_log(self, stage: str, record: Mapping[str, object]) -> None:
        """Keep one record of a stage's own event log (a roles stage's `events.jsonl`), under
        the run attempt that wrote it."""
        text = json.dumps(record, default=str)
        with self._lock, self._writing() as ok:
            if ok:
                self._db.execute(
                    "INSERT INTO log (stage, run, record) VALUES (?,?,?)",
                    (stage, self.run_id, text),
                )

    def log(self, stage: str) -> list[JsonObject]:
        """The stage's event log over every attempt, in the order it was written; each record
        says which attempt (`attempt`, the run's id) wrote it."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT run, record FROM log WHERE stage=? ORDER BY rowid", (stage,)
                ).fetchall()
            except sqlite3.OperationalError:  # a ledger written before logs were kept
                return []
        return [{**json.loads(record), "attempt": run} for run, record in rows]

    def logged_stages(self) -> list[str]:
        """The stages that have an event log."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT DISTINCT stage FROM log").fetchall()
            except sqlite3.OperationalError:
                return []
        return sorted(r[0] for r in rows)

    def spans(self, stage: str, since: float) -> list[FullSpanRow]:
        """Unit, state, attempts, started, ended, worker (and node_id, node_ip where the ledger
        has them, else None) of the units that ran since `since`: what a timeline or a trace
        needs, without decoding every unit's input and result."""
        keys = ["unit", "state", "attempts", "started", "ended", "worker"]
        with self._lock:
            have = {r[1] for r in self._db.execute("PRAGMA table_info(units)")}
            nodes = [k if k in have else "NULL" for k in ("node_id", "node_ip")]
            rows = self._db.execute(
                f"SELECT {', '.join(keys + nodes)}, duration, error FROM units "
                "WHERE stage=? AND started >= ? AND ended IS NOT NULL",
                (stage, since),
            ).fetchall()
        return [FullSpanRow(**_span(*r[:8]), duration=r[8], error=r[9]) for r in rows]

    def span_count(self, stage: str, since: float) -> int:
        """How many units of the stage ran since `since` (what `spans` would return)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM units WHERE stage=? AND started >= ? AND ended IS NOT NULL",
                (stage, since),
            ).fetchone()
        return int(row[0])

    def spans_by_worker(self, stage: str, since: float) -> Iterator[SpanRow]:
        """What `spans` returns but `duration` and `error`, ordered by worker then start and
        read a chunk at a time, so a stage of a million units is drawn without holding a
        million rows."""
        keys = ["unit", "state", "attempts", "started", "ended", "worker"]
        with self._lock:
            have = {r[1] for r in self._db.execute("PRAGMA table_info(units)")}
        nodes = [k if k in have else "NULL" for k in ("node_id", "node_ip")]
        query = (
            f"SELECT {', '.join(keys + nodes)} FROM units "
            "WHERE stage=? AND started >= ? AND ended IS NOT NULL ORDER BY worker, started, unit"
        )
        for chunk in self._chunks(query, (stage, since), _span):
            yield from chunk

    def result_rows(self, stage: str) -> Iterator[list[tuple[SqlValue, ...]]]:
        """The stage's units as (unit, input, result, state, attempts, duration, worker, error)
        tuples, input and result as the JSON text the ledger keeps, a chunk at a time: what a
        results table is built from, column by column."""
        yield from self._chunks(
            "SELECT unit, input, result, state, attempts, duration, worker, error "
            "FROM units WHERE stage=?",
            (stage,),
            _columns,
        )

    def _chunks(
        self,
        query: str,
        params: tuple[SqlValue, ...],
        make: Callable[..., R],
        size: int = 50_000,
    ) -> Iterator[list[R]]:
        """A query's rows in lists of `size`, each row made into what `make` builds from its
        columns (SQLite's rows are untyped: `make` says what the query's columns are), the
        lock held only while each list is read."""
        with self._lock:
            cursor = self._db.execute(query, params)
        while True:
            with self._lock:
                chunk = cursor.fetchmany(size)
            if not chunk:
                return
            yield [make(*r) for r in chunk]

    def file_digest(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The content digest recorded for a file with this size and mtime, if any."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT digest FROM files WHERE path=? AND size=? AND mtime_ns=?",
                    (path, size, mtime_ns),
                ).fetchone()
            except sqlite3.OperationalError:  # a ledger written before digests were kept
                return None
        return row[0] if row else None

    def save_file_digest(self, path: str, size: int, mtime_ns: int, digest: str) -> None:
        with self._lock, self._writing() as ok:
            if ok:
                self._db.execute(
                    "INSERT OR REPLACE INTO files VALUES (?,?,?,?)", (path, size, mtime_ns, digest)
                )

    def supersede(self, stages: Iterable[str]) -> None:
        """A fresh run starts over: what earlier runs finished in these stages stops counting as
        done, so an interrupted fresh run is never completed with an older run's results."""
        names = list(stages)
        marks = ",".join("?" * len(names))
        with self._lock, self._writing() as ok:
            if ok:
                self._db.execute("BEGIN")
                self._db.execute(
                    f"UPDATE units SET state='pending' WHERE state='done' AND stage IN ({marks})",
                    names,
                )
                self._db.execute(
                    f"UPDATE stages SET units_digest=NULL WHERE stage IN ({marks})", names
                )
                self._db.execute("COMMIT")

    def counts(self, stage: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) FROM units WHERE stage=? GROUP BY state", (stage,)
            ).fetchall()
        return {s: n for s, n in rows}


# one encoder for every row: `json.dumps(value, default=str)` builds a new one per call
_ENCODE = json.JSONEncoder(default=str).encode
_STATES = {s.value: s for s in UnitState}


def _dump(value: object) -> str | None:
    """A value as the ledger keeps it (JSON text); integers, the commonest pool payload and
    result, skip the encoder."""
    if value is None:
        return None
    if type(value) is int:
        return str(value)
    return _ENCODE(value)


def _load(text: str | None) -> Json:
    found: Json = None if text is None else json.loads(text)
    return found


def _span(
    unit: str,
    state: str,
    attempts: int,
    started: float,
    ended: float,
    worker: str | None,
    node_id: str | None,
    node_ip: str | None,
) -> SpanRow:
    """A span from the columns a span query selects, in its order."""
    return SpanRow(
        unit=unit,
        state=state,
        attempts=attempts,
        started=started,
        ended=ended,
        worker=worker,
        node_id=node_id,
        node_ip=node_ip,
    )


def _columns(*row: SqlValue) -> tuple[SqlValue, ...]:
    """A row as SQLite gives it."""
    return row


def hold(root: Path, what: str, instead: str) -> int:
    """Create `root` and take its lock (a run's directory, a sweep's), or fail at once naming
    the runner that holds it; the lock's descriptor (closing it releases the lock)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise storage_error(root, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(
            f"{what} {root} is in use by another runner (pid {holder}); "
            f"wait for it to finish or {instead}"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise storage_error(root, exc) from None
    return fd


def in_use(root: Path) -> bool:
    """Whether a runner holds `root`'s lock (a run starting or running), found by asking for a
    shared lock without waiting, released at once."""
    try:
        fd = os.open(root / ".lock", os.O_RDONLY)
    except OSError:
        return False  # no run ever took it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the shared lock, if it was taken
    return False


class RunStore:
    """One run directory, held by one runner at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock_fd: int | None = None
        self.ledger: Ledger | None = None

    def open(self) -> Ledger:
        """Create the directory, take the lock (or fail at once), clear what a killed runner
        left half-written (`sweep_temporaries`), open the ledger."""
        self._lock_fd = hold(self.root, "run directory", "set run.dir to another directory")
        sweep_temporaries(self.root)
        try:
            self.ledger = Ledger(self.root / LEDGER)
        except OSError as exc:
            self.close()
            raise storage_error(self.root, exc) from None
        except StorageError:
            self.close()
            raise
        return self.ledger

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def stage_dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path


def read_ledger(root: Path) -> Ledger | None:
    """The ledger of a run directory for reading (status), without taking the lock."""
    path = root / LEDGER
    return Ledger(path, readonly=True) if path.exists() else None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it over `path` only if the block succeeds.

    The block only writes the temporary file, so an `OSError` in it (a full disk, a read-only
    directory) is the output's own: it ends as one `StorageError` naming `path`, the earlier
    `path` (if any) untouched, the temporary file removed. A writer killed meanwhile (SIGKILL,
    the OOM killer) leaves it behind: the next run of the directory removes it
    (`sweep_temporaries`)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise storage_error(path.parent, exc, path) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# `atomic_path`'s temporary file: `.NAME.tmp-PID`, PID its writer's
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")
# how deep under the run directory outputs are written: `<stage>/shards/<file>`
_OUTPUT_DEPTH = 2


def sweep_temporaries(root: Path) -> list[Path]:
    """Remove the temporary files of `atomic_path` that a killed writer (a runner, or a task
    of its run, SIGKILLed mid-write) left in the run directory `root`, down to the stages'
    folders; the paths removed. Called with the directory's lock held, before anything of the
    run starts: no writer of this run is at work, and a file whose writer still runs on this
    host (another runner's, in a run directory nested in this one) is left alone."""
    removed: list[Path] = []
    folders = [root]
    for depth in range(_OUTPUT_DEPTH + 1):
        below: list[Path] = []
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    below.append(Path(entry.path))
                elif (found := _TEMPORARY.match(entry.name)) and not _alive(int(found[1])):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
        folders = below if depth < _OUTPUT_DEPTH else []
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a pid we may not signal runs too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
