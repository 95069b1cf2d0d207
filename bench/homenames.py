#!/usr/bin/env python3
"""What the names-at-home stages cost every query: the special-names check and the hosts lookup,
on ordinary names (the common case: neither answers), beside an empty stage for scale; and the
cost of a name they do answer.

The stages run as the forwarder runs them, on queries parsed from wire bytes; the settings are a
household's (the default local domains, a LAN's reverse zone, the LAN's resolver, one zone, the
private relay names blocked) and a hosts file of 1,000 names. Nothing is sent anywhere.

Usage: python bench/homenames.py [--queries N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from dnslib import DNSRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnsproxy import homenames, hosts, wire  # noqa: E402
from dnsproxy.config import build_settings  # noqa: E402
from dnsproxy.metrics import Metrics  # noqa: E402
from dnsproxy.pipeline import PassThrough, Request  # noqa: E402
from dnsproxy.stages.hosts import HostsAnswers  # noqa: E402
from dnsproxy.stages.special import SpecialNames  # noqa: E402

SUFFIXES = ("com", "net", "org", "example.com", "co.uk", "icloud.com")


def label(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                   for _ in range(rng.randint(3, 12)))


def requests(names: list[str], qtype: str = "A") -> list[Request]:
    return [Request(wire.parse_query(DNSRecord.question(name, qtype).pack()), ("127.0.0.1", 5),
                    "udp", 0.0) for name in names]


def per_call(stage, items: list[Request], repeat: int = 5) -> float:
    """Best of `repeat` passes over `items`, in microseconds per call."""
    answer = stage.answer
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for item in items:
            answer(item)
        best = min(best, time.perf_counter() - started)
    return best / len(items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    args = parser.parse_args()
    rng = random.Random(18)
    settings = build_settings({
        "upstreams": ["127.0.0.2"], "local_dns": ["127.0.0.3"],
        "local_reverse": ["192.168.1.0/24", "2001:db8:1::/48"],
        "zones": ["corp.example=127.0.0.4"], "block_private_relay": True}, {})
    metrics = Metrics()
    special = SpecialNames(homenames.build_table(settings), metrics)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "hosts")
        with open(path, "w") as out:
            out.writelines(f"192.168.1.{i % 250 + 2} host{i}.lan\n" for i in range(1000))
        table = hosts.load([path])
    hosts_stage = HostsAnswers(table, metrics, hosts.HOSTS_TTL)
    ordinary = requests([f"{label(rng)}.{label(rng)}.{rng.choice(SUFFIXES)}"
                         for _ in range(args.queries)])
    answered = requests([f"x{i}.invalid" for i in range(args.queries // 10)])
    from_hosts = requests([f"host{i % 1000}.lan" for i in range(args.queries // 10)])
    print(f"{len(special.table.rules)} suffixes in the table, {len(special.tails)} tails; "
          f"{len(table.entries)} hosts entries")
    print(f"empty stage (the call alone):   {per_call(PassThrough(), ordinary):.2f} µs")
    print(f"special names, ordinary name:   {per_call(special, ordinary):.2f} µs")
    print(f"hosts, ordinary name:           {per_call(hosts_stage, ordinary):.2f} µs")
    print(f"special names, NXDOMAIN here:   {per_call(special, answered):.2f} µs")
    print(f"hosts, A answered:              {per_call(hosts_stage, from_hosts):.2f} µs")


if __name__ == "__main__":
    main()
