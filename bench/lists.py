#!/usr/bin/env python3
"""What split DNS lists cost: the load time of 100,000 domains and 10,000 address ranges, and
the cost of one lookup of each kind the split makes per query.

The lists are generated (random labels under a few made-up suffixes, random ranges), in the
formats people download: dnsmasq `server=/name/addr` lines for the domestic names, plain names
for the foreign ones, CIDR lines for the ranges. Nothing is sent anywhere.

Usage: python bench/lists.py [--domains N] [--ranges N] [--lookups N]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnsproxy import domainlists  # noqa: E402
from dnsproxy.domainlists import to_wire  # noqa: E402

SUFFIXES = ("example", "test", "invalid", "example.com", "example.net")


def label(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                   for _ in range(rng.randint(4, 14)))


def write_lists(folder: str, domains: int, ranges: int, rng: random.Random) -> list[str]:
    names = [f"{label(rng)}.{rng.choice(SUFFIXES)}" for _ in range(domains)]
    half = domains // 2
    with open(os.path.join(folder, "domestic.conf"), "w") as out:
        out.writelines(f"server=/{name}/192.0.2.53\n" for name in names[:half])
    with open(os.path.join(folder, "foreign.txt"), "w") as out:
        out.writelines(f"{name}\n" for name in names[half:])
    with open(os.path.join(folder, "ranges.txt"), "w") as out:
        for _ in range(ranges):
            prefix = rng.randint(12, 24)
            address = ipaddress.ip_address(rng.getrandbits(32))
            out.write(f"{ipaddress.ip_network(f'{address}/{prefix}', strict=False)}\n")
    return names


def per_call(function, items: list, repeat: int = 3) -> float:
    """Best of `repeat` passes over `items`, in microseconds per call."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, time.perf_counter() - started)
    return best / len(items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=100_000)
    parser.add_argument("--ranges", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=100_000)
    args = parser.parse_args()
    rng = random.Random(12)
    with tempfile.TemporaryDirectory() as folder:
        names = write_lists(folder, args.domains, args.ranges, rng)
        loads = []
        for _ in range(3):
            started = time.perf_counter()
            lists = domainlists.load([os.path.join(folder, "domestic.conf")],
                                     [os.path.join(folder, "foreign.txt")],
                                     [os.path.join(folder, "ranges.txt")])
            loads.append(time.perf_counter() - started)
    # Query names as the forwarder holds them (lower-cased wire form): listed names three
    # labels deep, and unlisted ones, which walk every suffix before missing.
    listed = [to_wire(f"www.cdn.{rng.choice(names)}") for _ in range(args.lookups)]
    unlisted = [to_wire(f"www.{label(rng)}.{label(rng)}.org") for _ in range(args.lookups)]
    packed = [rng.getrandbits(32).to_bytes(4, "big") for _ in range(args.lookups)]
    hits = sum(lists.group_of(name) is not None for name in listed)
    print(f"lists: {lists.loaded.domains} domains, {args.ranges} ranges "
          f"({len(lists.v4[0])} after merging)")
    each = ", ".join(f"{t * 1000:.0f}" for t in loads)
    print(f"load: {min(loads) * 1000:.0f} ms (best of 3: {each})")
    print(f"lookup, listed name 4 labels deep: {per_call(lists.group_of, listed):.2f} µs "
          f"({hits} of {len(listed)} found)")
    print(f"lookup, unlisted name:             {per_call(lists.group_of, unlisted):.2f} µs")
    print(f"address in domestic ranges:        {per_call(lists.is_domestic, packed):.2f} µs")


if __name__ == "__main__":
    main()
