"""The stall benchmark's pure parts: its crafted cache file, the log lines it follows, and how
it attributes each query to a save, a reload or the baseline."""

from __future__ import annotations

import datetime
import re

import pytest

from bench import stall
from bench.household import Records
from dnsproxy import cachefile, wire
from dnsproxy.metrics import Metrics
from dnsproxy.stages.cache import Cache

LINE_TIME = "2026-12-02 10:00:05,250"


def at(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_the_crafted_cache_file_is_read_whole_by_dnsproxy(tmp_path):
    path = str(tmp_path / "cache.bin")
    stall.write_cache_file(path, 50)
    cache = Cache(100, Metrics())
    assert cachefile.load(cache, path) == 50
    query = wire.parse_query(stall.qname_wire(stall.hot_name(7)).join(
        [b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00", b"\x00\x01\x00\x01"]))
    assert Cache.key(query) in cache.entries


def test_a_save_reaches_back_by_the_time_its_line_gives():
    event = stall.save_event(f"{LINE_TIME} DEBUG cache: 100000 entries saved to /s/cache.bin "
                             "in 120 ms")
    assert event.start == pytest.approx(at(LINE_TIME) - 0.120 - stall.MARGIN, abs=1e-6)
    assert event.end == pytest.approx(at(LINE_TIME) + stall.MARGIN, abs=1e-6)
    assert event.detail == "100000 entries"
    # An older line, without the time it took: a fixed look back.
    older = stall.save_event(f"{LINE_TIME} DEBUG cache: 3 entries saved to /s/cache.bin")
    assert older.start == pytest.approx(at(LINE_TIME) - stall.LOOKBACK - stall.MARGIN, abs=1e-6)
    assert stall.save_event(f"{LINE_TIME} INFO configuration reloaded: 1 upstreams") is None


def test_the_log_is_followed_line_by_line(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(f"{LINE_TIME} INFO serving\n{LINE_TIME} DEBUG cache: 1 entries saved to x\n"
                   f"{LINE_TIME} INFO configuration rel")
    tail = stall.LogTail(log)
    try:
        assert "saved" in tail.wait_for(stall.SAVED, 1)
        with open(log, "a") as out:
            out.write("oaded: 1 upstreams\n")
        assert tail.wait_for(stall.RELOADED, 1).endswith("configuration reloaded: 1 upstreams")
        with pytest.raises(stall.BenchError):
            tail.wait_for(re.compile("never"), 0.05)
    finally:
        tail.close()


def records(queries: list[tuple[float, float | None]]) -> Records:
    """Sent at, answered after (seconds), or None for no answer."""
    rec = Records()
    for sent, latency in queries:
        rec.send_ns.append(int(sent * 1e9))
        rec.recv_ns.append(int((sent + latency) * 1e9) if latency is not None else 0)
    return rec


def test_each_query_counts_for_the_window_it_was_sent_in():
    started = 1000.0
    rec = records([
        (1000.5, 0.050),  # warm-up: in no part
        (1002.0, 0.001),  # baseline
        (1003.0, 0.300),  # the save
        (1003.2, None),  # the save: unanswered
        (1005.0, 0.002),  # baseline
        (1006.0, 0.040),  # the reload
    ])
    events = [stall.Event("save", 1002.9, 1003.5), stall.Event("reload", 1005.9, 1006.5)]
    baseline, parts = stall.analyse(rec, events, started)
    assert (baseline.queries, baseline.worst) == (2, pytest.approx(2.0))
    (save, during_save), (reload, during_reload) = parts
    assert (save.kind, during_save.queries, during_save.unanswered) == ("save", 2, 1)
    assert during_save.worst == pytest.approx(300.0)
    assert during_reload.worst == pytest.approx(40.0)
    result = stall.Result(stall.Settings(), baseline, parts, "cache: 2 entries read")
    text = "\n".join(stall.section(result))
    assert "saving 300.0 ms, reloading 40.0 ms" in text
    assert "1 queries unanswered" in text
