"""The query history (dnsproxy/history.py): what the hot path records reaches SQLite in batches
written by the history's own thread, reads back through the page's questions, survives a
restart in a state directory, and stays within its retention and its row bound."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from dnslib import DNSRecord

from dnsproxy import history, wire
from dnsproxy.history import History, QueryFilter
from dnsproxy.pipeline import Request, Response


def ask(log: History, name: str, client: str = "192.168.1.10", qtype: str = "A",
        reason: str = "forwarded", upstream: str | None = "198.51.100.53:53") -> None:  # fmt: skip
    query = wire.parse_query(DNSRecord.question(name, qtype).pack())
    request = Request(query, (client, 40000), "udp", time.monotonic() - 0.002)
    log.query(request, Response(b"", reason, 0, upstream=upstream))


def written(log: History) -> None:
    """Wait until what the hot path appended is in the database (a read runs after a write)."""
    log.submit(lambda db: None).result(5)


@pytest.fixture
def log() -> History:
    h = History(None)
    yield h
    h.close()


def test_the_hot_path_only_appends_and_the_thread_writes(log: History) -> None:
    ask(log, "www.example.test")
    assert len(log.pending) == 1, "recorded, not written yet"
    written(log)
    assert not log.pending
    rows = log.submit(log.queries(QueryFilter())).result(5)
    assert len(rows) == 1
    row = rows[0]
    assert (row["client"], row["name"], row["type"], row["outcome"], row["rcode"]) == (
        "192.168.1.10", "www.example.test.", "A", "forwarded", "NOERROR")
    assert 1.5 <= row["latency_ms"] < 1000
    assert log._thread.name == "dnsproxy-history" and log._thread is not threading.main_thread()


def test_the_health_check_is_not_recorded(log: History) -> None:
    query = wire.parse_query(DNSRecord.question("id.server", "TXT", "CH").pack())
    log.query(Request(query, ("127.0.0.1", 1), "udp", 0.0), Response(b"", "local", 0))
    written(log)
    assert log.submit(log.queries(QueryFilter())).result(5) == []
    assert log.submit(log.summary(0)).result(5)["totals"] == {}


def test_filters_narrow_the_query_log(log: History) -> None:
    ask(log, "www.example.test", client="192.168.1.10")
    ask(log, "mail.example.test", client="192.168.1.11", qtype="AAAA", reason="cached",
        upstream=None)  # fmt: skip
    ask(log, "www.other.test", client="192.168.1.11")
    written(log)

    def names(**wanted: object) -> list[str]:
        rows = log.submit(log.queries(QueryFilter(**wanted))).result(5)  # type: ignore[arg-type]
        return sorted(r["name"] for r in rows)

    assert len(names()) == 3
    assert names(client="192.168.1.11") == ["mail.example.test.", "www.other.test."]
    assert names(name_part="EXAMPLE") == ["mail.example.test.", "www.example.test."]
    assert names(qtype=28) == ["mail.example.test."]
    assert names(outcomes=("cached",)) == ["mail.example.test."]
    assert len(names(outcomes=("cached", "forwarded"))) == 3
    assert names(since=time.time() + 60) == []
    assert len(names(limit=2)) == 2 and len(names(limit=2, offset=2)) == 1


def test_summary_counts_per_minute_by_outcome_forgeries_included(log: History) -> None:
    for _ in range(3):
        ask(log, "a.example.test")
    ask(log, "b.example.test", reason="cached", upstream=None)
    log.forgery("198.51.100.53:53", "blocked.example.test.", 1, "no-edns")
    log.forgery("198.51.100.53:53", "blocked.example.test.", 1, "forged-address")
    log.forgery("203.0.113.53:53", "other.example.test.", 1, "no-edns")
    written(log)
    summary = log.submit(log.summary(time.time() - 3600)).result(5)
    assert summary["totals"] == {"forwarded": 3, "cached": 1, "forgery": 3}
    forged = log.submit(log.forgeries(time.time() - 3600)).result(5)
    assert [f["name"] for f in forged] == ["blocked.example.test.", "other.example.test."]
    assert forged[0]["count"] == 2
    assert forged[0]["reasons"] == ["forged-address", "no-edns"]
    assert forged[0]["upstreams"] == ["198.51.100.53:53"]


def test_a_state_directory_keeps_the_history_across_a_restart(tmp_path: Path) -> None:
    first = History(str(tmp_path))
    ask(first, "kept.example.test")
    first.close()  # the forwarder's stop: what is pending is written
    assert (tmp_path / history.FILE).exists()
    again = History(str(tmp_path))
    try:
        rows = again.submit(again.queries(QueryFilter())).result(5)
        assert [r["name"] for r in rows] == ["kept.example.test."]
    finally:
        again.close()


def test_retention_and_the_row_bound_prune_the_oldest(tmp_path: Path) -> None:
    now = [time.time()]
    log = History(str(tmp_path), days=1, max_rows=3, clock=lambda: now[0])
    try:
        for i in range(5):
            ask(log, f"n{i}.example.test")
        written(log)
        log.submit(log.prune).result(5)
        rows = log.submit(log.queries(QueryFilter())).result(5)
        assert sorted(r["name"] for r in rows) == [f"n{i}.example.test." for i in (2, 3, 4)]
        now[0] += 2 * 86400  # two days later everything is past the retention
        log.submit(log.prune).result(5)
        assert log.submit(log.queries(QueryFilter())).result(5) == []
        assert log.submit(log.summary(0)).result(5)["totals"] == {}
    finally:
        log.close()


def test_a_database_that_cannot_be_opened_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / history.FILE).mkdir()  # a directory where the file should be
    with pytest.raises(sqlite3.Error):
        History(str(tmp_path))


def test_readers_await_without_blocking_the_loop(log: History) -> None:
    ask(log, "async.example.test")

    async def main() -> list[dict]:
        return await log.read(log.queries(QueryFilter()))

    assert [r["name"] for r in asyncio.run(main())] == ["async.example.test."]


def test_forged_addresses_are_kept_with_their_name(log: History) -> None:
    import ipaddress

    forged = [ipaddress.ip_address(a).packed for a in ("203.0.113.66", "159.106.121.75",
                                                       "2001:db8::66")]  # fmt: skip
    log.forgery("198.51.100.53:53", "blocked.example.test.", 1, "forged-address", forged[:2])
    log.forgery("198.51.100.53:53", "blocked.example.test.", 28, "no-edns", forged[2:])
    log.forgery("198.51.100.53:53", None, None, "malformed")
    written(log)
    rows = log.submit(log.forgeries(0)).result(5)
    by_name = {r["name"]: r for r in rows}
    assert by_name["blocked.example.test."]["addresses"] == [
        "159.106.121.75", "203.0.113.66", "2001:db8::66"]
    assert by_name[None]["addresses"] == []


def test_what_is_recorded_while_the_thread_writes_a_batch_is_not_lost(log: History) -> None:
    """The loop's append and the thread's batch interleave: here the thread writes a whole
    batch while a record's arguments are still being read, as a GIL switch allows. With
    lists swapped for empty ones, the record went into a list already written, and was lost."""

    def addresses_read_while_the_thread_writes():
        written(log)  # the thread takes and writes what is pending, now
        yield bytes([159, 106, 121, 75])

    log.forgery("198.51.100.53:53", "before.example.test.", 1, "no-edns")
    log.forgery("198.51.100.53:53", "blocked.example.test.", 1, "forged-address",
                addresses_read_while_the_thread_writes())
    written(log)
    rows = log.submit(log.forgeries(0)).result(5)
    assert {r["name"]: (r["count"], r["addresses"]) for r in rows} == {
        "before.example.test.": (1, []), "blocked.example.test.": (1, ["159.106.121.75"])}


def test_upstream_latency_percentiles_and_errors(log: History) -> None:
    for ms in range(1, 101):  # 1..100 ms: p50 about 50, p95 about 95
        log.upstream_reply("198.51.100.53:53", ms / 1000)
    log.upstream_error("198.51.100.53:53", "timeout")
    log.upstream_error("198.51.100.53:53", "timeout")
    log.upstream_error("203.0.113.53:53", "refused")
    written(log)
    stats = log.submit(log.upstreams(time.time() - 3600, 600)).result(5)
    first = stats["198.51.100.53:53"]
    assert first["replies"] == 100
    assert first["p50_ms"] == pytest.approx(50, rel=0.06)
    assert first["p95_ms"] == pytest.approx(95, rel=0.06)
    assert first["errors"] == {"timeout": 2}
    assert sum(first["step_errors"].values()) == 2
    [point] = first["steps"].values()
    assert point["p50_ms"] == first["p50_ms"]
    assert stats["203.0.113.53:53"] == {**stats["203.0.113.53:53"], "replies": 0,
                                        "p50_ms": None, "errors": {"refused": 1}}


def test_top_names_clients_and_split_decisions(log: History) -> None:
    for _ in range(3):
        ask(log, "a.example.test", client="192.168.1.10")
    ask(log, "b.example.test", client="192.168.1.11")
    query = wire.parse_query(DNSRecord.question("c.example.cn", "A").pack())
    log.query(Request(query, ("192.168.1.11", 1), "udp", time.monotonic()),
              Response(b"", "forwarded", 0, upstream="u", group="domestic", why="listed"))
    written(log)
    assert log.submit(log.top(0, "name", 1)).result(5) == [("a.example.test.", 3)]
    assert log.submit(log.top(0, "client")).result(5) == [("192.168.1.10", 3),
                                                           ("192.168.1.11", 2)]
    assert log.submit(log.splits(0)).result(5) == [
        {"group": "domestic", "why": "listed", "count": 1}]
    with pytest.raises(ValueError):
        log.top(0, "name; DROP TABLE queries")


def test_a_file_of_another_schema_starts_anew(tmp_path: Path) -> None:
    path = tmp_path / history.FILE
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE queries (ts REAL)")  # an older layout
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    log = History(str(tmp_path))
    try:
        ask(log, "new.example.test")
        written(log)
        assert [r["name"] for r in log.submit(log.queries(QueryFilter())).result(5)] == [
            "new.example.test."]
    finally:
        log.close()
