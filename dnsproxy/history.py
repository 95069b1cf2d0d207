"""The query history behind the appliance's page: every query and every discarded forgery, and
counts per minute by outcome, in SQLite (Python's sqlite3: a real database, embedded).

The hot path only appends a tuple to a list: no I/O, no lock, no string built. One thread of its
own owns the database: every FLUSH_INTERVAL seconds it takes what was appended and writes it in
one transaction, and once a minute it deletes what is older than the retention and what is over
the row bound, so the file stays bounded whatever the traffic. Readers (the page's API) hand the
thread a function and await its result: nothing touches the disk on the event loop. In a state
directory the history survives restarts; without one it is kept in memory, bounded the same way.

It has the query log's interface (`query`, `forgery`, `flush`), so the forwarder hands it the
same calls; the wiring is the page's (issue #21).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .pipeline import Request, Response
from .querylog import LOOPBACK, RCODES, type_name
from .wire import CLASS_CH

FILE = "history.sqlite3"
FLUSH_INTERVAL = 1.0  # seconds between batch writes
PRUNE_INTERVAL = 60.0  # seconds between retention passes
DEFAULT_DAYS = 7
DEFAULT_MAX_ROWS = 2_000_000  # about 200 MB of queries at most, a busy office's week

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    ts REAL NOT NULL, client TEXT NOT NULL, name TEXT NOT NULL, qtype INTEGER NOT NULL,
    rcode INTEGER NOT NULL, outcome TEXT NOT NULL, upstream TEXT, grp TEXT, why TEXT,
    latency_ms REAL NOT NULL, transport TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS queries_ts ON queries (ts);
CREATE TABLE IF NOT EXISTS forgeries (
    ts REAL NOT NULL, upstream TEXT NOT NULL, name TEXT, qtype INTEGER, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS forgeries_ts ON forgeries (ts);
CREATE TABLE IF NOT EXISTS minutes (
    minute INTEGER NOT NULL, outcome TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (minute, outcome)) WITHOUT ROWID;
"""

T = TypeVar("T")


def _row(recorded: tuple[float, float, Request, Response]) -> tuple | None:
    """A recorded query as the queries table's row; None for the container's health check,
    which is not the household's traffic."""
    at, done, request, response = recorded
    q = request.query
    if q.qclass == CLASS_CH and request.client[0] in LOOPBACK:
        return None
    return (at, request.client[0], q.name, q.qtype, response.rcode, response.reason,
            response.upstream, response.group, response.why,
            round((done - request.started) * 1000, 3), request.transport)
_STOP = object()


@dataclass(frozen=True)
class QueryFilter:
    """What the query log's page narrows to; None matches everything."""

    client: str | None = None
    name_part: str | None = None  # a substring of the name, case-insensitive
    qtype: int | None = None
    outcome: str | None = None
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
        self.pending: list[tuple] = []
        self.pending_forgeries: list[tuple] = []
        self._jobs: queue.Queue = queue.Queue()
        self._pruned = 0.0
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="dnsproxy-history", daemon=True)
        self._thread.start()
        self._ready.result()  # a database that cannot be opened fails here, not later

    # ---- the hot path: one tuple appended ------------------------------------------------

    def query(self, request: Request, response: Response) -> None:
        """The objects themselves, with the two clocks: the thread reads their fields (neither
        changes once answered); the hot path pays for one tuple."""
        self.pending.append((time.time(), time.monotonic(), request, response))

    def forgery(self, upstream: str, name: str | None, qtype: int | None, reason: str) -> None:
        self.pending_forgeries.append((time.time(), upstream, name, qtype, reason))

    def flush(self) -> None:
        """Written by the thread at its next turn (the query log's interface)."""
        self._jobs.put(None)

    # ---- the database's thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self.path)
            db.executescript(SCHEMA)
            if self.path != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a batch
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
        # The loop may append while this runs: the old list, taken whole, is this batch.
        batch, self.pending = self.pending, []
        forged, self.pending_forgeries = self.pending_forgeries, []
        if batch or forged:
            rows = [row for row in map(_row, batch) if row is not None]
            minutes: dict[tuple[int, str], int] = {}
            for row in rows:
                key = (int(row[0] // 60), row[5])
                minutes[key] = minutes.get(key, 0) + 1
            for row in forged:
                key = (int(row[0] // 60), "forgery")
                minutes[key] = minutes.get(key, 0) + 1
            with db:
                db.executemany("INSERT INTO queries VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
                db.executemany("INSERT INTO forgeries VALUES (?,?,?,?,?)", forged)
                db.executemany("INSERT INTO minutes VALUES (?,?,?) ON CONFLICT (minute, outcome) "
                               "DO UPDATE SET n = n + excluded.n",
                               [(m, o, n) for (m, o), n in minutes.items()])  # fmt: skip
        if time.monotonic() - self._pruned >= PRUNE_INTERVAL:
            self.prune(db)

    def prune(self, db: sqlite3.Connection) -> None:
        """Older than the retention, and over the row bound (the oldest first), goes."""
        self._pruned = time.monotonic()
        oldest = self.clock() - self.days * 86400
        with db:
            db.execute("DELETE FROM queries WHERE ts < ?", (oldest,))
            db.execute("DELETE FROM forgeries WHERE ts < ?", (oldest,))
            db.execute("DELETE FROM minutes WHERE minute < ?", (int(oldest // 60),))
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
                              ("outcome = ?", wanted.outcome), ("ts >= ?", wanted.since),
                              ("ts <= ?", wanted.until)):  # fmt: skip
            if value is not None:
                clauses.append(clause)
                args.append(value)
        if wanted.name_part:
            clauses.append("instr(lower(name), ?) > 0")
            args.append(wanted.name_part.lower())
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (f"SELECT ts, client, name, qtype, rcode, outcome, upstream, grp, why, latency_ms, "  # noqa: S608
               f"transport FROM queries {where} ORDER BY ts DESC LIMIT ? OFFSET ?")  # fmt: skip
        args += [max(1, min(wanted.limit, 500)), max(0, wanted.offset)]

        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return [{"ts": ts, "client": client, "name": name, "type": type_name(qtype),
                     "rcode": RCODES.get(rcode, str(rcode)), "outcome": outcome,
                     "upstream": upstream, "group": grp, "why": why, "latency_ms": latency,
                     "transport": transport}
                    for ts, client, name, qtype, rcode, outcome, upstream, grp, why, latency,
                    transport in db.execute(sql, args)]  # fmt: skip

        return run

    def forgeries(self, since: float) -> Callable[[sqlite3.Connection], list[dict[str, Any]]]:
        """Per name the censor forged: how often, why each was recognised, from which
        upstreams, first and last time; the most forged first."""

        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT name, count(*), group_concat(DISTINCT reason), "
                "group_concat(DISTINCT upstream), min(ts), max(ts) FROM forgeries "
                "WHERE ts >= ? GROUP BY name ORDER BY count(*) DESC, max(ts) DESC", (since,))
            return [{"name": name, "count": count, "reasons": sorted(reasons.split(",")),
                     "upstreams": sorted(upstreams.split(",")), "first": first, "last": last}
                    for name, count, reasons, upstreams, first, last in rows]  # fmt: skip

        return run
