#!/usr/bin/env python3
"""What recording a query for the appliance's page costs the hot path (issue #21: at most 1 µs):
History.query, which appends one tuple, beside the query log off (NullLog: the call alone) and
the JSON query log's line; then how long the history's thread takes to write the batch, which
is off the event loop. Queries are parsed from wire bytes, as the forwarder gets them; the
database is in memory. Nothing is sent anywhere.

Usage: python bench/history.py [--queries N]
"""

from __future__ import annotations

import argparse
import io
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    args = parser.parse_args()
    items = [(Request(wire.parse_query(DNSRecord.question(f"n{i}.example.test", "A").pack()),
                      (f"192.168.1.{i % 200 + 2}", 40000 + i % 20000), "udp", time.monotonic()),
              Response(b"", "forwarded" if i % 3 else "cached", 0, upstream="198.51.100.53:53"))
             for i in range(args.queries)]  # fmt: skip
    history = History(None)
    try:
        null = per_call(NullLog().query, items)
        recorded = per_call(history.query, items)
        history.pending.clear()
        json_log = QueryLog(io.StringIO())
        logged = per_call(json_log.query, items)
        for request, response in items:
            history.query(request, response)
        started = time.perf_counter()
        history.submit(lambda db: None).result()
        wrote = time.perf_counter() - started
    finally:
        history.close()
    print(f"query log off (the call alone):   {null:.2f} µs")
    print(f"history: record a query:          {recorded:.2f} µs  ({recorded - null:+.2f} µs)")
    print(f"JSON query log line, for scale:   {logged:.2f} µs")
    print(f"history's thread, batch write:    {wrote / len(items) * 1e6:.2f} µs a query "
          f"({len(items)} in {wrote * 1000:.0f} ms, off the event loop)")


if __name__ == "__main__":
    main()
