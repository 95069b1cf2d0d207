"""The query history behind the appliance's page: every query and every discarded forgery, and
counts per minute by outcome, in SQLite (Python's sqlite3: a real database, embedded).

The hot path only appends a tuple to a deque: no I/O, no lock, no string built. One thread of its
own owns the database: every FLUSH_INTERVAL seconds it takes what was appended and writes it in
one transaction, and once a minute it deletes what is older than the retention and what is over
the row bound, so the file stays bounded whatever the traffic. Readers (the page's API) hand the
thread a function and await its result: nothing touches the disk on the event loop. In a state
directory the history survives restarts; without one it is kept in memory, bounded the same way.

It has the query log's interface (`query`, `forgery`, `upstream_reply`, `upstream_error`,
`flush`), so the forwarder hands it the same calls (querylog.Tee when the JSON log is on too).
Upstream latency is kept as a histogram per minute (buckets a factor LATENCY_STEP wide), so any
window's percentiles are a sum of rows, whatever the traffic.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import math
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from .pipeline import Request, Response
from .querylog import LOOPBACK, RCODES, address_texts, type_name
from .wire import CLASS_CH

FILE = "history.sqlite3"
FLUSH_INTERVAL = 1.0  # seconds between batch writes
PRUNE_INTERVAL = 60.0  # seconds between retention passes
DEFAULT_DAYS = 7
NAMES_KEPT = 8192  # names as text the writer keeps between batches
FORGERY_SLACK = 0.05  # seconds: a forgery and the query it answered, recorded a moment apart
DEFAULT_MAX_ROWS = 2_000_000  # about 200 MB of queries at most, a busy office's week

# Bumped when a table changes: an older file's history is dropped (it is a record, not state).
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    ts REAL NOT NULL, client TEXT NOT NULL, name TEXT NOT NULL, qtype INTEGER NOT NULL,
    rcode INTEGER NOT NULL, outcome TEXT NOT NULL, upstream TEXT, grp TEXT, why TEXT,
    latency_ms REAL NOT NULL, transport TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS queries_ts ON queries (ts);
CREATE TABLE IF NOT EXISTS forgeries (
    ts REAL NOT NULL, upstream TEXT NOT NULL, name TEXT, qtype INTEGER, reason TEXT NOT NULL,
    addresses TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS forgeries_ts ON forgeries (ts);
CREATE TABLE IF NOT EXISTS minutes (
    minute INTEGER NOT NULL, outcome TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (minute, outcome)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS upstream_latency (
    minute INTEGER NOT NULL, upstream TEXT NOT NULL, bucket INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (minute, upstream, bucket)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS upstream_errors (
    minute INTEGER NOT NULL, upstream TEXT NOT NULL, reason TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (minute, upstream, reason)) WITHOUT ROWID;
"""
TABLES = ("queries", "forgeries", "minutes", "upstream_latency", "upstream_errors")
# Latency buckets: bucket b holds [LATENCY_FLOOR * STEP**b, LATENCY_FLOOR * STEP**(b+1)) ms; a
# percentile is read as the bucket's geometric middle, within 5 % of the true value.
LATENCY_FLOOR_MS = 0.05
LATENCY_STEP = 1.1

T = TypeVar("T")


def latency_bucket(ms: float) -> int:
    return max(0, int(math.log(max(ms, LATENCY_FLOOR_MS) / LATENCY_FLOOR_MS, LATENCY_STEP)))


def bucket_ms(bucket: int) -> float:
    """The bucket's geometric middle."""
    return LATENCY_FLOOR_MS * LATENCY_STEP ** (bucket + 0.5)


def percentile(histogram: dict[int, int], fraction: float) -> float | None:
    """The value below which `fraction` of the counts lie, from bucket counts."""
    total = sum(histogram.values())
    if not total:
        return None
    rank, seen = fraction * total, 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_ms(bucket)
    return bucket_ms(max(histogram))


def _rows(batch: list[tuple[float, float, Request, Response]],
          names: dict[bytes, str]) -> list[tuple]:
    """Recorded queries as the queries table's rows, leaving out the container's health check
    (not the household's traffic). `names`: question bytes -> the name as text, kept between
    batches, since a household asks the same names over and over."""
    rows = []
    append = rows.append
    for at, done, request, response in batch:
        q = request.query
        if q.qclass == CLASS_CH and request.client[0] in LOOPBACK:
            continue
        name = names.get(q.question)
        if name is None:
            if len(names) >= NAMES_KEPT:
                names.clear()
            name = names[q.question] = q.name
        append((at, request.client[0], name, q.qtype, response.rcode, response.reason,
                response.upstream, response.group, response.why,
                round((done - request.started) * 1000, 3), request.transport))
    return rows


_STOP = object()


def _drain(pending: deque[tuple]) -> list[tuple]:
    """The items in `pending` now, taken out; what the loop appends meanwhile stays for the
    next batch (append and popleft are atomic). The thread must be the only one to take."""
    take = pending.popleft
    return [take() for _ in range(len(pending))]


def open_database(path: str) -> sqlite3.Connection:
    """The history's database, its tables made; a file of another schema version starts anew."""
    db = sqlite3.connect(path)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        with db:
            for table in TABLES:
                db.execute(f"DROP TABLE IF EXISTS {table}")  # noqa: S608 - fixed names
    db.executescript(SCHEMA)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    if path != ":memory:":
        db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a batch
        # No fsync per batch (WAL syncs at checkpoints): a power cut may lose the last
        # seconds of history, never the file; a batch a second costs half the CPU.
        db.execute("PRAGMA synchronous=NORMAL")
    return db


def _address_order(text: str) -> tuple[int, int]:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return (0, 0)
    return (address.version, int(address))


@dataclass(frozen=True)
class QueryFilter:
    """What the query log's page narrows to; None matches everything."""

    client: str | None = None
    name_part: str | None = None  # a substring of the name, case-insensitive
    qtype: int | None = None
    outcomes: tuple[str, ...] = ()  # the forwarder's reasons, any of them
    since: float | None = None
    until: float | None = None
    limit: int = 50
    offset: int = 0


class History:
    def __init__(self, state_dir: str | None, days: int = DEFAULT_DAYS,
                 max_rows: int = DEFAULT_MAX_ROWS,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.path = os.path.join(state_dir, FILE) if state_dir else ":memory:"
        self.days, self.max_rows, self.clock = days, max_rows, clock
        # Appended on the loop, drained by the thread. Deques, not lists swapped for empty
        # ones: an append loads the list, then evaluates its arguments (the GIL may switch
        # at any call there), and could land in a list the thread had already written.
        self.pending: deque[tuple] = deque()
        self.pending_forgeries: deque[tuple] = deque()
        self.pending_upstreams: deque[tuple] = deque()  # (time, upstream, seconds or error)
        self._jobs: queue.Queue = queue.Queue()
        self._pruned = 0.0
        self._names: dict[bytes, str] = {}  # the writer thread's (see _rows)
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="dnsproxy-history", daemon=True)
        self._thread.start()
        self._ready.result()  # a database that cannot be opened fails here, not later

    # ---- the hot path: one tuple appended ------------------------------------------------

    def query(self, request: Request, response: Response) -> None:
        """The objects themselves, with the two clocks: the thread reads their fields (neither
        changes once answered); the hot path pays for one tuple."""
        self.pending.append((time.time(), time.monotonic(), request, response))

    def answered(self, request: Request, response: Response, at: float, done: float) -> None:
        """The query log's interface: a query answered earlier (the compiled path's hits)."""
        self.pending.append((at, done, request, response))

    def forgery(self, upstream: str, name: str | None, qtype: int | None, reason: str,
                addresses: Iterable[bytes] = ()) -> None:
        self.pending_forgeries.append((time.time(), upstream, name, qtype, reason,
                                       ",".join(address_texts(addresses))))

    def upstream_reply(self, upstream: str, seconds: float) -> None:
        self.pending_upstreams.append((time.time(), upstream, seconds))

    def upstream_error(self, upstream: str, reason: str) -> None:
        self.pending_upstreams.append((time.time(), upstream, reason))

    def flush(self) -> None:
        """Written by the thread at its next turn (the query log's interface)."""
        self._jobs.put(None)

    # ---- the database's thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            db = open_database(self.path)
        except sqlite3.Error as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        while True:
            try:
                job = self._jobs.get(timeout=FLUSH_INTERVAL)
            except queue.Empty:
                job = None
            self._write(db)
            if job is _STOP:
                break
            if job is not None:
                function, future = job
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function(db))
                    except Exception as exc:  # noqa: BLE001 - the reader gets it
                        future.set_exception(exc)
        db.close()

    def _write(self, db: sqlite3.Connection) -> None:
        # What is there now is this batch; what the loop appends meanwhile waits for the next.
        batch, forged, upstreams = (_drain(self.pending), _drain(self.pending_forgeries),
                                    _drain(self.pending_upstreams))
        if upstreams:
            self._write_upstreams(db, upstreams)
        if batch or forged:
            rows = _rows(batch, self._names)
            minutes: dict[tuple[int, str], int] = {}
            for row in rows:
                key = (int(row[0] // 60), row[5])
                minutes[key] = minutes.get(key, 0) + 1
            for row in forged:
                key = (int(row[0] // 60), "forgery")
                minutes[key] = minutes.get(key, 0) + 1
            with db:
                db.executemany("INSERT INTO queries VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
                db.executemany("INSERT INTO forgeries VALUES (?,?,?,?,?,?)", forged)
                db.executemany("INSERT INTO minutes VALUES (?,?,?) ON CONFLICT (minute, outcome) "
                               "DO UPDATE SET n = n + excluded.n",
                               [(m, o, n) for (m, o), n in minutes.items()])  # fmt: skip
        if time.monotonic() - self._pruned >= PRUNE_INTERVAL:
            self.prune(db)

    @staticmethod
    def _write_upstreams(db: sqlite3.Connection, events: list[tuple]) -> None:
        latency: dict[tuple[int, str, int], int] = {}
        errors: dict[tuple[int, str, str], int] = {}
        for at, upstream, what in events:
            minute = int(at // 60)
            if isinstance(what, str):
                key = (minute, upstream, what)
                errors[key] = errors.get(key, 0) + 1
            else:
                bucket = (minute, upstream, latency_bucket(what * 1000))
                latency[bucket] = latency.get(bucket, 0) + 1
        with db:
            db.executemany("INSERT INTO upstream_latency VALUES (?,?,?,?) ON CONFLICT "
                           "(minute, upstream, bucket) DO UPDATE SET n = n + excluded.n",
                           [(*key, n) for key, n in latency.items()])
            db.executemany("INSERT INTO upstream_errors VALUES (?,?,?,?) ON CONFLICT "
                           "(minute, upstream, reason) DO UPDATE SET n = n + excluded.n",
                           [(*key, n) for key, n in errors.items()])  # fmt: skip

    def prune(self, db: sqlite3.Connection) -> None:
        """Older than the retention, and over the row bound (the oldest first), goes."""
        self._pruned = time.monotonic()
        oldest = self.clock() - self.days * 86400
        with db:
            db.execute("DELETE FROM queries WHERE ts < ?", (oldest,))
            db.execute("DELETE FROM forgeries WHERE ts < ?", (oldest,))
            for table in ("minutes", "upstream_latency", "upstream_errors"):
                db.execute(f"DELETE FROM {table} WHERE minute < ?",  # noqa: S608 - fixed names
                           (int(oldest // 60),))
            for table in ("queries", "forgeries"):
                db.execute(f"DELETE FROM {table} WHERE rowid <= "  # noqa: S608 - fixed names
                           f"(SELECT max(rowid) FROM {table}) - ?", (self.max_rows,))  # fmt: skip

    def submit(self, function: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Run `function(db)` in the database's thread, after what is pending is written."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((function, future))
        return future

    async def read(self, function: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.wrap_future(self.submit(function))

    def close(self) -> None:
        """Write what is pending and stop the thread (the forwarder's stop)."""
        self._jobs.put(_STOP)
        self._thread.join()

    # ---- what the page asks ------------------------------------------------------------------

    def summary(self, since: float) -> Callable[[sqlite3.Connection], dict[str, Any]]:
        """Totals by outcome since `since`, and the counts per minute by outcome."""

        def run(db: sqlite3.Connection) -> dict[str, Any]:
            rows = db.execute("SELECT minute, outcome, n FROM minutes WHERE minute >= ? "
                              "ORDER BY minute", (int(since // 60),)).fetchall()  # fmt: skip
            totals: dict[str, int] = {}
            for _, outcome, n in rows:
                totals[outcome] = totals.get(outcome, 0) + n
            return {"totals": totals, "minutes": [list(row) for row in rows]}

        return run

    def queries(self, wanted: QueryFilter) -> Callable[[sqlite3.Connection], list[dict[str, Any]]]:
        """The newest queries first, narrowed by `wanted`."""
        clauses, args = [], []
        for clause, value in (("client = ?", wanted.client), ("qtype = ?", wanted.qtype),
                              ("ts >= ?", wanted.since), ("ts <= ?", wanted.until)):  # fmt: skip
            if value is not None:
                clauses.append(clause)
                args.append(value)
        if wanted.outcomes:
            clauses.append(f"outcome IN ({','.join('?' * len(wanted.outcomes))})")
            args.extend(wanted.outcomes)
        if wanted.name_part:
            clauses.append("instr(lower(name), ?) > 0")
            args.append(wanted.name_part.lower())
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (f"SELECT ts, client, name, qtype, rcode, outcome, upstream, grp, why, latency_ms, "  # noqa: S608
               f"transport FROM queries {where} ORDER BY ts DESC LIMIT ? OFFSET ?")  # fmt: skip
        args += [max(1, min(wanted.limit, 500)), max(0, wanted.offset)]

        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = [{"ts": ts, "client": client, "name": name, "type": type_name(qtype),
                     "rcode": RCODES.get(rcode, str(rcode)), "outcome": outcome,
                     "upstream": upstream, "group": grp, "why": why, "latency_ms": latency,
                     "transport": transport, "forgeries": []}
                    for ts, client, name, qtype, rcode, outcome, upstream, grp, why, latency,
                    transport in db.execute(sql, args)]  # fmt: skip
            if rows:
                self._forgeries_while_asked(db, rows)
            return rows

        return run

    @staticmethod
    def _forgeries_while_asked(db: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
        """Each row's forgeries: those for its name that came while it waited for its answer
        (the page says which queries the censor tried to poison). One read for the page."""
        oldest = min(r["ts"] - r["latency_ms"] / 1000 for r in rows) - FORGERY_SLACK
        newest = max(r["ts"] for r in rows) + FORGERY_SLACK
        names = {r["name"] for r in rows}
        by_name: dict[str, list[tuple[float, str]]] = {}
        for ts, name, reason in db.execute(
                "SELECT ts, name, reason FROM forgeries WHERE ts BETWEEN ? AND ?",
                (oldest, newest)):  # fmt: skip
            if name in names:
                by_name.setdefault(name, []).append((ts, reason))
        for row in rows:
            start = row["ts"] - row["latency_ms"] / 1000 - FORGERY_SLACK
            row["forgeries"] = sorted({reason for ts, reason in by_name.get(row["name"], ())
                                       if start <= ts <= row["ts"] + FORGERY_SLACK})

    def forgeries(self, since: float, limit: int = 100,
                  ) -> Callable[[sqlite3.Connection], list[dict[str, Any]]]:
        """Per name the censor forged: how often, why each was recognised, from which
        upstreams, first and last time; the most forged first."""

        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT name, count(*), group_concat(DISTINCT reason), "
                "group_concat(DISTINCT upstream), group_concat(DISTINCT nullif(addresses, '')), "
                "min(ts), max(ts) FROM forgeries WHERE ts >= ? GROUP BY name "
                "ORDER BY count(*) DESC, max(ts) DESC LIMIT ?", (since, limit))
            return [{"name": name, "count": count, "reasons": sorted(reasons.split(",")),
                     "upstreams": sorted(upstreams.split(",")),
                     "addresses": sorted(set((addresses or "").split(",")) - {""},
                                         key=_address_order),
                     "first": first, "last": last}
                    for name, count, reasons, upstreams, addresses, first, last
                    in rows]  # fmt: skip

        return run

    def top(self, since: float, column: str, limit: int = 10,
            ) -> Callable[[sqlite3.Connection], list[tuple[str, int]]]:
        """The most asked names, or the busiest clients, since `since`."""
        if column not in ("name", "client"):
            raise ValueError(column)
        sql = (f"SELECT {column}, count(*) FROM queries WHERE ts >= ? "  # noqa: S608 - checked
               f"GROUP BY {column} ORDER BY count(*) DESC, {column} LIMIT ?")

        def run(db: sqlite3.Connection) -> list[tuple[str, int]]:
            return [(value, n) for value, n in db.execute(sql, (since, limit))]

        return run

    def splits(self, since: float) -> Callable[[sqlite3.Connection], list[dict[str, Any]]]:
        """Which group answered and why (split DNS, the home's names, zones), with counts."""

        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute("SELECT grp, why, count(*) FROM queries WHERE ts >= ? AND "
                              "grp IS NOT NULL GROUP BY grp, why ORDER BY count(*) DESC",
                              (since,))  # fmt: skip
            return [{"group": grp, "why": why, "count": n} for grp, why, n in rows]

        return run

    def upstreams(self, since: float, step: int = 600,
                  ) -> Callable[[sqlite3.Connection], dict[str, dict[str, Any]]]:
        """Per upstream since `since`: replies, p50 and p95 latency, errors by reason, and per
        `step` seconds the p50, p95 and error count (the page's plot over time)."""
        first = int(since // 60)

        def run(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}

            def entry(upstream: str) -> dict[str, Any]:
                return out.setdefault(upstream, {"replies": 0, "errors": {}, "_all": {},
                                                 "_steps": {}, "_step_errors": {}})

            for minute, upstream, bucket, n in db.execute(
                    "SELECT minute, upstream, bucket, n FROM upstream_latency WHERE minute >= ?",
                    (first,)):  # fmt: skip
                e = entry(upstream)
                e["replies"] += n
                e["_all"][bucket] = e["_all"].get(bucket, 0) + n
                steps = e["_steps"].setdefault(int(minute * 60 // step), {})
                steps[bucket] = steps.get(bucket, 0) + n
            for minute, upstream, reason, n in db.execute(
                    "SELECT minute, upstream, reason, n FROM upstream_errors WHERE minute >= ?",
                    (first,)):  # fmt: skip
                e = entry(upstream)
                e["errors"][reason] = e["errors"].get(reason, 0) + n
                index = int(minute * 60 // step)
                e["_step_errors"][index] = e["_step_errors"].get(index, 0) + n
            for e in out.values():
                histogram, steps = e.pop("_all"), e.pop("_steps")
                e["p50_ms"] = percentile(histogram, 0.5)
                e["p95_ms"] = percentile(histogram, 0.95)
                e["steps"] = {index * step: {"p50_ms": percentile(h, 0.5),
                                             "p95_ms": percentile(h, 0.95)}
                              for index, h in sorted(steps.items())}
                e["step_errors"] = {index * step: n
                                    for index, n in sorted(e.pop("_step_errors").items())}
            return out

        return run
