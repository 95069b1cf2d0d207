#!/usr/bin/env python3
"""What recording a query for the appliance's page costs the hot path (issue #21: at most 1 µs):
History.query, which appends one tuple, beside the query log off (NullLog: the call alone) and
the JSON query log's line; then the CPU the history's thread spends writing, which is off the
event loop but is the forwarder's CPU all the same: batches of a second at the household rate
(300 queries), names Zipf-distributed over 3,000 as a household asks them, into a database file
in a temporary directory as in the state directory. Queries are parsed from wire bytes, as the
forwarder gets them. Nothing is sent anywhere.

Usage: python bench/history.py [--queries N]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from dnslib import DNSRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnsproxy import wire  # noqa: E402
from dnsproxy.history import History  # noqa: E402
from dnsproxy.pipeline import Request, Response  # noqa: E402
from dnsproxy.querylog import NullLog, QueryLog  # noqa: E402


def per_call(record, items: list[tuple[Request, Response]], repeat: int = 5) -> float:
    """Best of `repeat` passes over `items`, in microseconds per call."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for request, response in items:
            record(request, response)
        best = min(best, time.perf_counter() - started)
    return best / len(items) * 1e6


BATCH = 300  # a second of queries at the household run's rate


def thread_cpu(history: History) -> float:
    """CPU seconds the history's own thread has used (its /proc task stat)."""
    tid = history._thread.native_id
    with open(f"/proc/self/task/{tid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    args = parser.parse_args()
    rng = random.Random(13)
    weights = [1 / rank for rank in range(1, 3001)]  # Zipf, s = 1
    names = rng.choices(range(3000), weights, k=args.queries)
    items = [(Request(wire.parse_query(DNSRecord.question(f"n{n}.example.test", "A").pack()),
                      (f"192.168.1.{i % 200 + 2}", 40000 + i % 20000), "udp", time.monotonic()),
              Response(b"", "forwarded" if i % 3 else "cached", 0, upstream="198.51.100.53:53"))
             for i, n in enumerate(names)]  # fmt: skip
    with tempfile.TemporaryDirectory() as state:
        history = History(state)
        try:
            null = per_call(NullLog().query, items)
            recorded = per_call(history.query, items)
            history.submit(lambda db: None).result()  # written now: not while the next is timed
            json_log = QueryLog(io.StringIO())
            logged = per_call(json_log.query, items)
            history.submit(lambda db: None).result()
            before = thread_cpu(history)
            started = time.perf_counter()
            for k in range(0, len(items), BATCH):
                for request, response in items[k:k + BATCH]:
                    history.query(request, response)
                history.submit(lambda db: None).result()  # one batch written
            wall = time.perf_counter() - started
            spent = thread_cpu(history) - before
        finally:
            history.close()
    print(f"query log off (the call alone):   {null:.2f} µs")
    print(f"history: record a query:          {recorded:.2f} µs  ({recorded - null:+.2f} µs)")
    print(f"JSON query log line, for scale:   {logged:.2f} µs")
    print(f"history's thread, batch writes:   {spent / len(items) * 1e6:.2f} µs of CPU a query "
          f"({len(items)} in batches of {BATCH}, {wall * 1000:.0f} ms, off the event loop)")


if __name__ == "__main__":
    main()
