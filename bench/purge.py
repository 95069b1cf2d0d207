#!/usr/bin/env python3
"""How long a purge of learned forged addresses holds dnsproxy's event loop, at a full cache.

A caught forgery teaches its addresses (one, or dozens); the cache then drops every entry
carrying any of them, in one pass over the whole cache, a slice of entries per loop step
(stages/cache.py). Measured here: the longest step (what a query waiting behind it feels) and
the whole pass from the purge to its end, for 1 and for 40 addresses, on the loops the forwarder
runs on (asyncio, and uvloop when installed). The cache holds `--entries` A answers (one or two
addresses each, as the forwarder stores them); one in a thousand carries a forged address.
Also a reload's forget after a change of routing: every key tested against the old and the new
table of names at home (a household's: the LAN's resolver, one zone). Nothing is sent anywhere.

Usage: python bench/purge.py [--entries N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnsproxy import homenames, wire  # noqa: E402
from dnsproxy.app import rerouted_by  # noqa: E402
from dnsproxy.config import build_settings  # noqa: E402
from dnsproxy.metrics import Metrics  # noqa: E402
from dnsproxy.stages import cache as cache_stage  # noqa: E402
from dnsproxy.stages.cache import Cache  # noqa: E402

TTL = 86400


def forged(index: int) -> bytes:
    return bytes([203, 0, 113, index + 1])


def fill(count: int, forgeries: int) -> Cache:
    """`count` entries; every thousandth carries one of the `forgeries` forged addresses."""
    cache = Cache(count, Metrics(), max_bytes=1 << 40)
    for index in range(count):
        labels = [f"n{index}", "example", "com"]
        name = b"".join(bytes([len(label)]) + label.encode() for label in labels) + b"\x00"
        question = name + b"\x00\x01\x00\x01"
        query = struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0) + question
        addresses = [bytes([192, 0, 2 + index % 50, index % 250 + 1])]
        if index % 2:
            addresses.append(bytes([198, 51, 100, index % 199 + 1]))
        if index % 1000 == 0:
            addresses[0] = forged(index // 1000 % forgeries)
        answers = b"".join(b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, TTL, 4) + address
                           for address in addresses)
        reply = (struct.pack(">HHHHHH", 0, 0x8180, 1, len(addresses), 0, 0) + question
                 + answers)
        key = wire.parse_query(query).key + b"\x00"
        cache.store(key, wire.strip_opt(reply, wire.parse_reply(reply)))
    return cache


async def one_pass(cache: Cache, addresses: set[bytes] | None) -> tuple[float, float, int]:
    """The longest step (the first: the keys taken and a slice, within `purge_soon`; or a
    later slice) and the whole pass (seconds), and the entries dropped."""
    slices: list[float] = []
    original = cache._slice

    def timed() -> None:
        started = time.perf_counter()
        original()
        slices.append(time.perf_counter() - started)

    cache._slice = timed
    finished = asyncio.get_running_loop().create_future()
    table = homenames.build_table(build_settings(
        {"upstreams": ["127.0.0.2"], "local_dns": ["127.0.0.4"],
         "zones": ["corp.example=127.0.0.5"]}, {}))
    claimed = rerouted_by(table, table)  # the old table and the new
    started = time.perf_counter()
    if addresses is None:
        cache.forget_soon(claimed, "rerouted", 3.0, finished.set_result)
    else:
        cache.purge_soon(addresses, "learned", finished.set_result)
    first = time.perf_counter() - started
    dropped = await finished
    whole = time.perf_counter() - started
    del cache._slice  # the wrapper refers to the cache: no cycle left for the collector
    return max(first, *slices[1:]), whole, dropped


def run(loop_name: str, new_loop, entries: int, rounds: int) -> None:
    for count in (1, 40, 0):
        longest, total, dropped_counts = [], [], []
        for _ in range(rounds):
            cache = fill(entries, max(count, 1))
            gc.collect()  # not in the middle of a pass: the forwarder freezes what it starts with
            loop = new_loop()
            try:
                worst, whole, dropped = loop.run_until_complete(
                    one_pass(cache, {forged(i) for i in range(count)} if count else None))
            finally:
                loop.close()
            longest.append(worst)
            total.append(whole)
            dropped_counts.append(dropped)
        what = f"{count:2} addresses" if count else "forget (2 tables)"
        print(f"{loop_name:8} {entries} entries, {what}: longest step "
              f"{statistics.median(longest) * 1000:.2f} ms (max {max(longest) * 1000:.2f}), "
              f"whole pass {statistics.median(total) * 1000:.0f} ms, "
              f"{dropped_counts[0]} dropped, slice {cache_stage.SCAN_SLICE} entries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    run("asyncio", asyncio.new_event_loop, args.entries, args.rounds)
    try:
        import uvloop
    except ImportError:
        return
    run("uvloop", uvloop.new_event_loop, args.entries, args.rounds)


if __name__ == "__main__":
    main()
