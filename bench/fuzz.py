#!/usr/bin/env python3
"""A million malformed and mutated datagrams at the forwarder's UDP port (issue #22): the real
`python -m dnsproxy` on 127.0.0.1, with its compiled hit path (or `--no-native`), an upstream
that answers everything (bench/servers.py's dnsmasq, on loopback too). Reports whether it still
answers, its resident memory before, during and after, and its CPU. Nothing leaves the host.

The datagrams: a third random bytes, the rest queries for cached and uncached names with bytes
flipped, cut short, or lengthened, plus crafted ones (a pointer loop, huge counts, OPT records
in every section). tests/dnsproxy/test_native.py runs the same kinds 10,000 times in the suite.

Usage: python bench/fuzz.py [--datagrams N] [--no-native]
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.servers import (  # noqa: E402
    LOCALHOST,
    answers,
    dns_query,
    dnsproxy_server,
    free_port,
    proc_status,
    upstream_server,
)

CRAFTED = [
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\xc0\x0c\x00\x01\x00\x01",  # pointer loop
    b"\x12\x34\x01\x00\x00\x01\xff\xff\xff\xff\xff\xff\x01a\x00\x00\x01\x00\x01",  # huge counts
    b"\x12\x34\x01\x00\x00\x01\x00\x01\x00\x01\x00\x01\x01a\x00\x00\x01\x00\x01"
    + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00") * 3,  # OPT in every section
    b"\x12\x34\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01",  # a response
]


def datagrams(rng: random.Random, seeds: list[bytes]):
    while True:
        roll = rng.random()
        if roll < 0.33:
            yield rng.randbytes(rng.randrange(0, 300))
        elif roll < 0.36:
            yield rng.choice(CRAFTED)
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 5)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[:rng.randrange(1, len(data))]
            elif rng.random() < 0.1:
                data += rng.randbytes(rng.randrange(1, 100))
            if len(data) >= 2:
                struct.pack_into(">H", data, 0, rng.randrange(65536))
            yield bytes(data)


PACE = 300  # datagrams between pauses of 10 ms: about 30,000 a second


def read_metric(port: int, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5).read()
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def rss_kb(pid: int) -> int:
    return proc_status(pid).get("VmRSS", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datagrams", type=int, default=1_000_000)
    parser.add_argument("--native", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dnsfuzz-"))
    up_port = free_port()
    upstream = upstream_server(LOCALHOST, up_port, None)
    port, metrics_port = free_port(), free_port()
    server = dnsproxy_server("dnsproxy", port, (LOCALHOST, up_port), None,
                             ["--metrics", f"{LOCALHOST}:{metrics_port}",
                              *([] if args.native else ["--no-native"])])
    try:
        upstream.start(work, "ready.bench.test")
        server.start(work, "ready.bench.test")
        names = [f"n{i}.bench.test" for i in range(200)]
        for name in names:  # cached, and hit once through Python: the compiled copy has them
            answers(LOCALHOST, port, name)
            answers(LOCALHOST, port, name)
        seeds = [dns_query(name) for name in names[:100]] + [dns_query(f"u{i}.bench.test")
                                                              for i in range(100)]
        version = subprocess.run([sys.executable, "-m", "dnsproxy", "--version",
                                  *([] if args.native else ["--no-native"])],
                                 capture_output=True, text=True).stdout.strip()
        before = rss_kb(server.pid)
        cpu0 = server.cpu_total()
        rng = random.Random(22)
        peak = before
        started = time.perf_counter()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            source = datagrams(rng, seeds)
            for sent in range(1, args.datagrams + 1):
                try:
                    sock.sendto(next(source), (LOCALHOST, port))
                except BlockingIOError:
                    time.sleep(0.001)
                if sent % PACE == 0:
                    time.sleep(0.01)  # about what the Python path reads: most are for it
                    while True:  # read off what came back
                        try:
                            sock.recv(65535)
                        except (BlockingIOError, ConnectionRefusedError):
                            break
                if sent % 100_000 == 0:
                    peak = max(peak, rss_kb(server.pid))
                    time.sleep(0.05)
        wall = time.perf_counter() - started
        time.sleep(1)
        alive = server.proc.poll() is None
        still = alive and all(answers(LOCALHOST, port, name) for name in names[:20])
        read = read_metric(metrics_port, 'dnsproxy_queries_total{transport="udp"}') if alive else 0
        cached = read_metric(metrics_port, "dnsproxy_cache_entries") if alive else 0
        after = rss_kb(server.pid) if alive else 0
        cpu = server.cpu_total() - cpu0
    finally:
        server.stop()
        upstream.stop()
    print(f"{version}")
    print(f"{args.datagrams:,} datagrams sent in {wall:.1f} s, {read:,.0f} read by the server "
          f"(the rest dropped by the kernel, its buffer full); server CPU {cpu:.1f} s")
    print(f"still running: {alive}; still answering: {still}")
    print(f"resident memory: {before / 1024:.1f} MB before, {peak / 1024:.1f} MB at most "
          f"during, {after / 1024:.1f} MB after; {cached:,.0f} names cached (mutated names the "
          f"upstream answered; the cache is bounded)")


if __name__ == "__main__":
    main()
