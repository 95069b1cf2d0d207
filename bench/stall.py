#!/usr/bin/env python3
"""How long dnsproxy's event loop stalls while it saves a full cache and reloads big lists.

Every query waits while the loop is busy, so the stall is what a client feels: measured from
outside, as the longest latency of a steady stream of cache hits (one query a millisecond by
default) while the forwarder saves 100,000 cached entries to its state directory and while it
reloads (SIGHUP) split lists of 100,000 names.

What runs, all on 127.0.0.1: the upstream (authority.py, two ports: the trusted and the
domestic group), and dnsproxy started with a crafted cache file of `--entries` entries in its
`--state-dir` (it reads them at start), lists of `--names` names and 10,000 ranges
(lists.py), `--cache-save-interval` 3 s and the debug log. The client (household.Replay)
asks the first 100 cached names in turn. The run follows the log: half a second after each
periodic save ("entries saved") it sends SIGHUP and waits for the reload's line; the next save
is due 3 s after the last one ended, so saves and reloads never overlap.

Windows, by the log's timestamps (millisecond precision): a save spans from its line less the
time the writing took (the line says; older versions do not, then one second) to its line, 50
ms more on either side (the snapshot just before the writing); a reload from the SIGHUP to its
line. Queries sent in a window are that event's; those
sent outside every window, after a second of warm-up, are the baseline. The stall of an event
is the longest latency among its queries answered; those unanswered within 2 s are counted
apart (a stall long enough fills the socket's receive buffer, and the kernel drops the rest).

Usage: python bench/stall.py [--entries N] [--names N] [--rate QPS] [--events N]
                             [--source DIR]
`--source` runs another checkout's dnsproxy (its `python -m dnsproxy`, with this interpreter)
against the same load, for a before/after comparison. Also run by `bench/run.py --workloads
stall`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import random
import re
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `dnsproxy` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import lists as list_files
from bench.household import Records, Replay
from bench.report import Summary, fmt_ms
from bench.servers import (
    DNSPROXY_FLAGS,
    LOCALHOST,
    ROOT,
    BenchError,
    Fleet,
    Server,
    authority_server,
    free_port,
    say,
)

ZONE = "stall.test"
HOT = 100  # cached names the stream asks, in turn
TTL = 86400  # of every crafted entry: never near expiry, so a hit never refreshes
SAVE_INTERVAL = 3.0  # seconds: room for one reload between two saves
TIMEOUT = 2.0  # seconds: a query unanswered this long counts as unanswered
WARMUP = 1.0  # seconds of stream before the baseline counts
LOOKBACK = 1.0  # seconds before a save's line, when the line does not say how long it took
MARGIN = 0.05  # seconds added to either side of a window: the log's clock is in milliseconds
PAUSE = 0.5  # seconds from a save's line to the SIGHUP: the two windows never overlap
RANGES = 10_000
TARGET_MS = 5.0

SAVED = re.compile(r"cache: (\d+) entries saved to \S+(?: in (\d+) ms)?")
RELOADED = re.compile(r"configuration reloaded|reload failed")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class Settings:
    entries: int = 100_000  # in the cache file read at start, then saved
    names: int = 100_000  # in the split lists, then reloaded
    rate: float = 1000.0  # queries per second of the stream
    events: int = 3  # saves, and as many reloads
    source: Path = ROOT  # the checkout whose dnsproxy runs


@dataclass
class Event:
    kind: str  # "save" or "reload"
    start: float  # time.time() seconds
    end: float
    detail: str = ""  # from the log line: entries saved, or how the reload ended


@dataclass
class Stretch:
    """What the client saw for the queries sent in one window."""

    queries: int = 0
    unanswered: int = 0  # within TIMEOUT: lost, most likely, while the loop stood still
    latencies: list[float] = field(default_factory=list)  # ms, of the answered ones

    @property
    def worst(self) -> float:
        return max(self.latencies, default=float("nan"))


@dataclass
class Result:
    settings: Settings
    baseline: Stretch
    events: list[tuple[Event, Stretch]]
    loaded: str  # the forwarder's own lines about what it read at start


# ---------------------------------------------------------------------------------------------
# The files the forwarder starts with


def qname_wire(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"


def hot_name(index: int) -> str:
    return f"c{index}.{ZONE}"


def write_cache_file(path: str, count: int) -> None:
    """A cache file as dnsproxy writes it, `count` A answers stored now with TTL one day:
    through dnsproxy's own cache and file code, so the format is the one under test."""
    from dnsproxy import cachefile, wire
    from dnsproxy.metrics import Metrics
    from dnsproxy.stages.cache import Cache

    cache = Cache(count, Metrics(), max_bytes=1 << 40)
    for index in range(count):
        name = qname_wire(hot_name(index))
        question = name + b"\x00\x01\x00\x01"
        query = struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0) + question
        reply = (struct.pack(">HHHHHH", 0, 0x8180, 1, 1, 0, 0) + question + b"\xc0\x0c"
                 + struct.pack(">HHIH", 1, 1, TTL, 4) + bytes([192, 0, 2, index % 250 + 1]))
        key = wire.parse_query(query).key + b"\x00"  # neither DO nor CD
        cache.store(key, wire.strip_opt(reply, wire.parse_reply(reply)))
    cachefile.save(cache, path)


# ---------------------------------------------------------------------------------------------
# The log


def log_time(line: str) -> float | None:
    """The time.time() of a line in dnsproxy's log format (local time, milliseconds)."""
    match = STAMP.match(line)
    if match is None:
        return None
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def save_event(line: str) -> Event | None:
    """The window of a save from its log line: back by the duration the line gives."""
    match = SAVED.search(line)
    at = log_time(line)
    if match is None or at is None:
        return None
    took = int(match.group(2)) / 1000 if match.group(2) else LOOKBACK
    return Event("save", at - took - MARGIN, at + MARGIN, f"{match.group(1)} entries")


class LogTail:
    """The lines a server appends to its log, read as they come."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
        self.lines: list[str] = []
        self.partial = ""

    def close(self) -> None:
        self.handle.close()

    def wait_for(self, pattern: re.Pattern, seconds: float) -> str:
        """The next line matching `pattern`; the lines before it are passed over."""
        deadline = time.monotonic() + seconds
        while True:
            while self.lines:
                line = self.lines.pop(0)
                if pattern.search(line):
                    return line
            *self.lines, self.partial = (self.partial + self.handle.read()).split("\n")
            if not self.lines:
                if time.monotonic() > deadline:
                    raise BenchError(f"no log line matching {pattern.pattern!r} "
                                     f"within {seconds:g} s")
                time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Analysis


def stretch(rec: Records, windows: list[tuple[float, float]], inside: bool = True,
            after: float = 0.0) -> Stretch:
    """The queries sent in any of `windows` (or, with inside=False, in none of them and after
    `after`), and the latencies in ms of those answered within TIMEOUT."""
    spans = [(int(a * 1e9), int(b * 1e9)) for a, b in windows]
    floor = int(after * 1e9)
    out = Stretch()
    for seq, sent in enumerate(rec.send_ns):
        hit = any(lo <= sent < hi for lo, hi in spans)
        if hit != inside or sent < floor:
            continue
        out.queries += 1
        got = rec.recv_ns[seq]
        if not got or got - sent > TIMEOUT * 1e9:
            out.unanswered += 1
        else:
            out.latencies.append(max((got - sent) / 1e6, 0.0))
    return out


def analyse(rec: Records, events: list[Event], started: float) -> tuple[Stretch, list]:
    windows = [(event.start, event.end) for event in events]
    baseline = stretch(rec, windows, inside=False, after=started + WARMUP)
    return baseline, [(event, stretch(rec, [(event.start, event.end)])) for event in events]


# ---------------------------------------------------------------------------------------------
# The run


def run(settings: Settings, fleet: Fleet, workdir: Path) -> Result:
    state = workdir / "stall-state"
    state.mkdir(exist_ok=True)
    say(f"stall: crafting a cache file of {settings.entries} entries and lists of "
        f"{settings.names} names")
    write_cache_file(str(state / "cache.bin"), settings.entries)
    folder = workdir / "stall-lists"
    folder.mkdir(exist_ok=True)
    list_files.write_lists(str(folder), settings.names, RANGES, random.Random(17))
    ports = [free_port(), free_port()]
    upstream = authority_server(LOCALHOST, ports, time.time(), workdir / "stall-up.json", None,
                                lambda argv: argv)
    authority = fleet.start(upstream, probe=f"up.{ZONE}")
    port = free_port()
    argv = [sys.executable, "-m", "dnsproxy", "--listen", f"{LOCALHOST}:{port}",
            "--upstream", f"{LOCALHOST}:{ports[0]}",
            "--domestic-upstream", f"{LOCALHOST}:{ports[1]}",
            "--domestic-domains", str(folder / "domestic.conf"),
            "--foreign-domains", str(folder / "foreign.txt"),
            "--domestic-ips", str(folder / "ranges.txt"),
            "--state-dir", str(state), "--cache-size", str(settings.entries * 2),
            "--cache-bytes", str(1 << 30), "--cache-save-interval", str(SAVE_INTERVAL),
            *DNSPROXY_FLAGS, "--log-level", "debug"]
    server = Server("dnsproxy-stall", argv, LOCALHOST, port, cwd=settings.source)
    fleet.start(server, probe=hot_name(0), workdir=workdir)
    tail = LogTail(server.log)
    replay = Replay([(LOCALHOST, port)], [hot_name(i) for i in range(HOT)],
                    itertools.cycle(range(HOT)), settings.rate, TIMEOUT)
    started = time.time() + 0.2
    events: list[Event] = []
    try:
        replay.start(started)
        for _ in range(settings.events):
            line = tail.wait_for(SAVED, SAVE_INTERVAL + 30)
            event = save_event(line)
            if event is None:
                raise BenchError(f"cannot read the save's log line: {line}")
            events.append(event)
            time.sleep(PAUSE)
            sent = time.time()
            os.kill(server.pid, signal.SIGHUP)
            line = tail.wait_for(RELOADED, 30)
            end = log_time(line) or time.time()
            events.append(Event("reload", sent - MARGIN, end + MARGIN,
                                "reloaded" if "reloaded" in line else "failed"))
        time.sleep(0.5)
    finally:
        replay.stop()
        tail.close()
        server.stop()
        authority.stop()
    start_lines = server.log.read_text().split("serving on", 1)[0].splitlines()
    loaded = "; ".join(line.split(" ", 3)[-1] for line in start_lines
                       if "entries read" in line or "split DNS:" in line)
    baseline, stretches = analyse(replay.records[0], events, started)
    return Result(settings, baseline, stretches, loaded)


# ---------------------------------------------------------------------------------------------
# The report


def worst_of(result: Result, kind: str) -> float:
    return max((part.worst for event, part in result.events if event.kind == kind),
               default=float("nan"))


def section(result: Result) -> list[str]:
    s = result.settings
    lines = ["## Event-loop stall: saving the cache, reloading the lists", "",
             f"dnsproxy from `{s.source}` with {s.entries:,} entries cached and lists of "
             f"{s.names:,} names; {s.rate:g} cache-hit queries/s. The stall of an event is the "
             f"longest latency of the queries sent during it (target < {TARGET_MS:g} ms); the "
             "baseline is the same stream between events: what the machine itself adds.",
             f"It read: {result.loaded or '(nothing logged)'}.", "",
             "| window | queries | p50 ms | p99 ms | longest ms | unanswered |",
             "|---|---:|---:|---:|---:|---:|"]

    def row(label: str, part: Stretch) -> str:
        summary = Summary.of(part.latencies)
        return (f"| {label} | {part.queries} | {fmt_ms(summary.p50)} | {fmt_ms(summary.p99)} "
                f"| {fmt_ms(part.worst)} | {part.unanswered} |")

    lines.append(row("baseline (no save, no reload)", result.baseline))
    for kind in ("save", "reload"):
        events = [(event, part) for event, part in result.events if event.kind == kind]
        for index, (event, part) in enumerate(events, 1):
            lines.append(row(f"{kind} {index} ({event.detail})", part))
    lost = sum(part.unanswered for _, part in result.events)
    lines += ["", f"Longest stall: saving {fmt_ms(worst_of(result, 'save'))} ms, reloading "
              f"{fmt_ms(worst_of(result, 'reload'))} ms, against "
              f"{fmt_ms(result.baseline.worst)} ms between events (target < {TARGET_MS:g} ms)"
              + (f"; {lost} queries unanswered during the events." if lost else "."), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Settings()
    parser.add_argument("--entries", type=int, default=d.entries)
    parser.add_argument("--names", type=int, default=d.names)
    parser.add_argument("--rate", type=float, default=d.rate, help="queries per second")
    parser.add_argument("--events", type=int, default=d.events, help="saves, and reloads")
    parser.add_argument("--source", type=Path, default=d.source,
                        help="the checkout whose dnsproxy runs (default: this one)")
    args = parser.parse_args(argv)
    settings = Settings(args.entries, args.names, args.rate, args.events,
                        args.source.resolve())
    if not (settings.source / "dnsproxy" / "__main__.py").is_file():
        parser.error(f"--source {args.source}: no dnsproxy package there")
    with tempfile.TemporaryDirectory(prefix="dnsstall-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            result = run(settings, fleet, Path(tmp))
        except BenchError as exc:
            print(f"stall: {exc}", file=sys.stderr)
            return 1
        finally:
            fleet.stop_all()
    print("\n".join(section(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
