"""The household workload: what a home network feels, not how fast a server can go.

A stream of A queries at a fixed, moderate rate over a few thousand names with Zipf popularity
(s ~ 1) and a mix of TTLs, replayed against every server at once (each query goes to server A,
then B, C, D, a fraction of an interval apart, the order rotating), through an upstream in a
network namespace behind `tc netem` (see netns.py, authority.py). Time is compressed: TTLs are
divided by `time_scale`, so a run of minutes sees entries expire many times over, as a
household does over hours at a rate `time_scale` times lower.

The client records every query itself: send time just before the send, receive time from the
kernel (SO_TIMESTAMPNS) where available, so the client's own scheduling does not count. A query
unanswered within the timeout counts as the timeout in the statistics, and as a timeout.

An answer is *stale* when it arrives later than its data's expiry: the upstream encodes in each
A address when it made the answer (authority.py), the name carries its TTL, so
`received > made + TTL + slack` (slack: the one-way delay the reply spent in netem before the
forwarder's clock could start, plus a quarter second for the encoding's tenths and the
forwarders' whole-second clocks). This needs no knowledge of each server's stale TTL.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import platform
import random
import select
import socket
import struct
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import authority
from .report import Summary
from .servers import (
    BenchError,
    Fleet,
    Server,
    authority_server,
    busy_seconds,
    dnsmasq_has_stale_cache,
    dnsmasq_server,
    dnsproxy_server,
    free_port,
    installed,
    say,
    self_seconds,
    smartdns_server,
    unbound_server,
)

ZONE = "house.test"
PROBE = f"ready.{ZONE}"
# dnsproxy+history: dnsproxy with its page on (--web), so recording every query in the history;
# issue #21 wants it within 5 % of dnsproxy without. dnsproxy-python: the pure-Python path
# (--no-native), not in a default run; asked for by name to compare the two paths.
SERVERS = ("dnsproxy", "dnsproxy+history", "dnsmasq", "unbound", "smartdns")
OPTIONAL = ("dnsproxy-python",)
FIRST_PORT = 5301  # the authority's ports inside the namespace, one per server
SLACK = 0.25  # seconds, beyond the one-way delay (see the module docstring)
# Linux's SO_TIMESTAMPNS; the value is the same on the architectures listed.
SO_TIMESTAMPNS = 35
TIMESTAMP_MACHINES = {"x86_64", "aarch64", "i686", "armv7l", "riscv64", "ppc64le", "s390x"}


# ---------------------------------------------------------------------------------------------
# The stream


def parse_ttl_mix(text: str) -> list[tuple[int, float]]:
    """'60:0.3,300:0.5,3600:0.2' -> [(60, 0.3), (300, 0.5), (3600, 0.2)], shares normalised."""
    mix = []
    for item in text.split(","):
        ttl, _, share = item.strip().partition(":")
        if not share:
            raise ValueError(f"TTL mix item {item!r}: want SECONDS:SHARE")
        mix.append((int(ttl), float(share)))
    total = sum(share for _, share in mix)
    if total <= 0 or any(ttl <= 0 or share < 0 for ttl, share in mix):
        raise ValueError(f"TTL mix {text!r}: TTLs must be positive, shares not negative")
    return [(ttl, share / total) for ttl, share in mix]


def scaled_ttl(real: int, time_scale: float) -> int:
    """A real-world TTL compressed by the run's time scale, at least one second."""
    return max(1, round(real / time_scale))


def assign_ttls(count: int, mix: list[tuple[int, float]], time_scale: float,
                seed: int) -> list[int]:
    """Scaled TTLs for `count` names in exactly the mix's shares (largest remainders), shuffled
    so that popularity and TTL are independent."""
    exact = [share * count for _, share in mix]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(mix)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[:count - sum(counts)]:
        counts[i] += 1
    ttls = [scaled_ttl(ttl, time_scale) for (ttl, _), n in zip(mix, counts, strict=True)
            for _ in range(n)]
    random.Random(seed).shuffle(ttls)
    return ttls


def name_for(rank: int, ttl: int) -> str:
    """The name of the rank-th most popular name (from 0); the authority reads the TTL in it."""
    return f"h{rank}-t{ttl}.{ZONE}"


def zipf_cumulative(count: int, s: float) -> list[float]:
    """Cumulative Zipf weights: name k (from 0) is asked in proportion to 1 / (k + 1) ** s."""
    return list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(count)))


def zipf_stream(count: int, s: float, seed: int) -> Iterator[int]:
    """An endless, reproducible stream of name ranks drawn from Zipf(s) over `count` names."""
    cumulative = zipf_cumulative(count, s)
    total = cumulative[-1]
    rng = random.Random(seed)
    while True:
        yield min(count - 1, bisect.bisect_right(cumulative, rng.random() * total))


# ---------------------------------------------------------------------------------------------
# Reading replies


def first_a(packet: bytes, offset: int) -> tuple[int, int] | None:
    """(address as an integer, TTL) of the first A record in the answer section, which starts
    at `offset` (just after the question); None if there is none or the packet is short."""
    try:
        count = struct.unpack_from(">H", packet, 6)[0]
        pos = offset
        for _ in range(count):
            while True:  # the owner name: labels, then an end or a pointer
                length = packet[pos]
                if length == 0:
                    pos += 1
                    break
                if length & 0xC0 == 0xC0:
                    pos += 2
                    break
                pos += 1 + length
            rtype, _rclass, ttl, rdlength = struct.unpack_from(">HHIH", packet, pos)
            pos += 10
            if rtype == 1 and rdlength == 4:
                return struct.unpack_from(">I", packet, pos)[0], ttl
            pos += rdlength
    except (IndexError, struct.error):
        return None
    return None


def is_stale(received: float, made: float, ttl: int, one_way_delay: float) -> bool:
    """True when an answer arrived later than its data's expiry, beyond the slack."""
    return received > made + ttl + one_way_delay + SLACK


# ---------------------------------------------------------------------------------------------
# The client


@dataclass
class Records:
    """Every query sent to one server, by sequence number (its ID is the low 16 bits)."""

    send_ns: array = field(default_factory=lambda: array("q"))
    due_ns: array = field(default_factory=lambda: array("q"))  # when it should have been sent
    recv_ns: array = field(default_factory=lambda: array("q"))  # 0: no answer (yet)
    name: array = field(default_factory=lambda: array("l"))
    rcode: array = field(default_factory=lambda: array("b"))  # -1: no answer
    address: array = field(default_factory=lambda: array("q"))  # -1: no A record
    pending: dict[int, int] = field(default_factory=dict)  # ID -> sequence number
    mismatched: int = 0


class Replay:
    """Sends the stream to every target at `rate` queries per second each and records replies.

    Two threads: the sender sleeps until each query's time (time.sleep is precise to tens of
    microseconds, an event loop's timers only to a millisecond), the receiver waits on epoll and
    takes the kernel's receive timestamp. Query k goes to the targets in a rotating order,
    spread over the interval, so the servers never handle the same query at the same instant.
    """

    def __init__(self, targets: list[tuple[str, int]], names: list[str], stream: Iterator[int],
                 rate: float, timeout: float = 2.0) -> None:
        self.targets = targets
        self.qnames = [b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\x00"
                       for n in names]
        self.stream = stream
        self.interval = 1.0 / rate
        self.timeout = timeout
        self.records = [Records() for _ in targets]
        self.sockets: list[socket.socket] = []
        self.kernel_stamps = False
        self._stop_sending = threading.Event()
        self._stop_receiving = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, at: float) -> None:
        """Open the sockets and begin sending at `at` (time.time())."""
        stamps = sys.platform == "linux" and platform.machine() in TIMESTAMP_MACHINES
        for host, port in self.targets:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if stamps:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                except OSError:
                    stamps = False
            sock.connect((host, port))  # connected: only that server's replies, ICMP errors
            sock.setblocking(False)
            self.sockets.append(sock)
        self.kernel_stamps = stamps
        self._threads = [threading.Thread(target=self._receive, name="replay-recv", daemon=True),
                         threading.Thread(target=self._send_all, args=(at,),
                                          name="replay-send", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop sending, give the last queries the timeout to be answered, stop receiving."""
        self._stop_sending.set()
        self._threads[1].join()
        time.sleep(self.timeout)
        self._stop_receiving.set()
        self._threads[0].join()
        for sock in self.sockets:
            sock.close()

    def _send_all(self, at: float) -> None:
        count = len(self.targets)
        step = self.interval / count
        for k in itertools.count():
            if self._stop_sending.is_set():
                return
            name = next(self.stream)
            due = at + k * self.interval
            for j in range(count):
                wait = due + j * step - time.time()
                if wait > 0:
                    time.sleep(wait)
                self._send((k + j) % count, name, due + j * step)

    def _send(self, target: int, name: int, due: float) -> None:
        rec = self.records[target]
        seq = len(rec.send_ns)
        qid = seq & 0xFFFF
        packet = (struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + self.qnames[name]
                  + b"\x00\x01\x00\x01")
        rec.name.append(name)
        rec.recv_ns.append(0)
        rec.rcode.append(-1)
        rec.address.append(-1)
        rec.send_ns.append(0)
        rec.due_ns.append(int(due * 1e9))
        rec.pending[qid] = seq  # an older query with this ID is long past its timeout
        rec.send_ns[seq] = time.time_ns()
        # A server that is down (ICMP port unreachable) gives no answer: a timeout.
        with contextlib.suppress(OSError):
            self.sockets[target].send(packet)

    def _receive(self) -> None:
        poller = select.epoll()
        by_fd = {}
        for index, sock in enumerate(self.sockets):
            poller.register(sock.fileno(), select.EPOLLIN)
            by_fd[sock.fileno()] = index
        space = socket.CMSG_SPACE(16)
        try:
            while not self._stop_receiving.is_set():
                for fd, _ in poller.poll(0.1):
                    index = by_fd[fd]
                    sock = self.sockets[index]
                    while True:
                        try:
                            data, ancillary, _, _ = sock.recvmsg(4096, space)
                        except (BlockingIOError, InterruptedError):
                            break
                        except ConnectionRefusedError:
                            continue  # the error of an earlier send; read on
                        except OSError:
                            break
                        stamp = 0
                        for level, kind, value in ancillary:
                            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                                sec, nsec = struct.unpack("qq", value[:16])
                                stamp = sec * 1_000_000_000 + nsec
                        self._take(index, data, stamp or time.time_ns())
        finally:
            poller.close()

    def _take(self, target: int, data: bytes, stamp: int) -> None:
        rec = self.records[target]
        if len(data) < 12:
            return
        seq = rec.pending.get(struct.unpack_from(">H", data)[0])
        if seq is None:
            rec.mismatched += 1
            return
        qname = self.qnames[rec.name[seq]]
        if data[12:12 + len(qname)].lower() != qname:
            rec.mismatched += 1
            return
        del rec.pending[struct.unpack_from(">H", data)[0]]
        rec.recv_ns[seq] = stamp
        rec.rcode[seq] = data[3] & 0x0F
        found = first_a(data, 12 + len(qname) + 4)
        if found is not None:
            rec.address[seq] = found[0]


# ---------------------------------------------------------------------------------------------
# Analysis


@dataclass
class Window:
    """What one server's client saw for the queries sent in one stretch of time."""

    summary: Summary
    latencies: list[float]  # ms, timeouts as the timeout
    answered: int = 0
    timeouts: int = 0
    errors: int = 0  # answered with an rcode other than NOERROR
    stale: int = 0
    waited: int = 0  # answered only after an upstream round trip (>= half the delay)
    upstream: int = 0  # queries the server sent the upstream meanwhile
    first_asks: int = 0  # queries for a name never asked before in the stream
    max_lag: float = 0.0  # seconds the client sent a query after its time, at most
    repeat_mean: float = float("nan")  # ms, over the queries for names asked before
    repeat_p50: float = float("nan")  # their median and 95th percentile: a cache hit's latency
    repeat_p95: float = float("nan")
    # ms a first ask took beyond the upstream's own delay (median): the server's cost of a miss
    # at this rate, the same path for every server
    miss_added: float = float("nan")


def analyse(rec: Records, start: float, end: float, *, ttls: list[int], base: float,
            delay: float, timeout: float, arrivals: list[float]) -> Window:
    """Statistics of the queries sent in [start, end) (time.time() seconds)."""
    lo, hi = int(start * 1e9), int(end * 1e9)
    latencies: list[float] = []
    answered = timeouts = errors = stale = waited = first = 0
    lag = 0
    repeats: list[float] = []
    misses: list[float] = []
    limit_ms = timeout * 1000
    seen: set[int] = set()
    for seq in range(len(rec.send_ns)):
        sent = rec.send_ns[seq]
        name = rec.name[seq]
        new = name not in seen
        seen.add(name)
        if not lo <= sent < hi:
            continue
        first += new
        lag = max(lag, sent - rec.due_ns[seq])
        got = rec.recv_ns[seq]
        latency = (got - sent) / 1e6 if got else None
        if latency is None or latency > limit_ms:
            timeouts += 1
            latencies.append(limit_ms)
            if not new:
                repeats.append(limit_ms)
            continue
        latencies.append(max(latency, 0.0))
        if new:
            misses.append(latency - delay * 1000)
        else:
            repeats.append(max(latency, 0.0))
        answered += 1
        if rec.rcode[seq] != 0:
            errors += 1
        if latency >= delay * 1000 / 2:
            waited += 1
        address = rec.address[seq]
        if address >= 0:
            received = got / 1e9
            made = authority.decode_time(address, base, received)
            if made is not None and is_stale(received, made, ttls[name], delay):
                stale += 1
    upstream = bisect.bisect_left(arrivals, end) - bisect.bisect_left(arrivals, start)
    again = Summary.of(repeats)
    return Window(Summary.of(latencies), latencies, answered, timeouts, errors, stale, waited,
                  upstream, first, lag / 1e9, again.mean, again.p50, again.p95,
                  Summary.of(misses).p50)


def unanswered(rec: Records, start: float, end: float) -> int:
    lo, hi = int(start * 1e9), int(end * 1e9)
    return sum(1 for seq in range(len(rec.send_ns))
               if lo <= rec.send_ns[seq] < hi and not rec.recv_ns[seq])


# ---------------------------------------------------------------------------------------------
# One pass: one delay, every server, the restart


@dataclass
class ServerResult:
    name: str
    persistence: str
    steady: Window
    cpu_share: float  # of one core, over the measured window
    restart: Window | None = None
    restart_error: str = ""
    downtime: float = 0.0
    unanswered: int = 0


@dataclass
class PassResult:
    delay_ms: float
    seconds: float
    restart_window: float
    servers: list[ServerResult]
    other_load: float
    max_lag: float  # seconds behind its schedule the client fell, in the measured window
    kernel_stamps: bool
    netem: bool  # False: the upstream held its replies itself
    plot_note: str = ""


@dataclass
class Settings:
    """The household options, as parsed by run.py."""

    names: int = 3000
    zipf: float = 1.0
    rate: float = 300.0
    ttl_mix: str = "60:0.3,300:0.5,3600:0.2"
    time_scale: float = 20.0
    warmup: float = 30.0
    seconds: float = 120.0
    restart_window: float = 60.0
    timeout: float = 2.0
    seed: int = 13
    servers: tuple[str, ...] = SERVERS
    cache_size: int = 10000


def available(names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(servers that can run, a line for each that cannot)."""
    runnable, notes = [], []
    commands = {"dnsproxy": None, "dnsproxy+history": None, "dnsproxy-python": None,
                "dnsmasq": "dnsmasq",
                "unbound": "unbound", "smartdns": "smartdns"}
    for name in names:
        command = commands[name]
        if command and not installed(command):
            hint = " (Debian: smartdns; do not start its service)" if name == "smartdns" else ""
            notes.append(f"{name}: skipped, `{command}` is not installed{hint}.")
            continue
        if name == "dnsmasq" and not dnsmasq_has_stale_cache():
            notes.append("dnsmasq: skipped, this version has no --use-stale-cache (2.90+).")
            continue
        runnable.append(name)
    return runnable, notes


class HouseholdPass:
    """Runs one delay: the authority in the namespace, the servers on the host, the replay."""

    def __init__(self, settings: Settings, fleet: Fleet, namespace, servers: list[str],
                 workdir: Path) -> None:
        self.s = settings
        self.fleet = fleet
        self.ns = namespace
        self.names = servers
        self.workdir = workdir
        mix = parse_ttl_mix(settings.ttl_mix)
        self.ttls = assign_ttls(settings.names, mix, settings.time_scale, settings.seed)

    def build(self, name: str, upstream: tuple[str, int], home: Path) -> Server:
        cpu = None  # see run(): no pinning here
        port = free_port()
        if name in ("dnsproxy", "dnsproxy+history", "dnsproxy-python"):
            state = home / f"{name}-state"
            state.mkdir()
            extra = {"dnsproxy+history": ["--web", f"127.0.0.1:{free_port()}"],
                     "dnsproxy-python": ["--no-native"]}.get(name, [])
            return dnsproxy_server(name, port, upstream, cpu, ["--state-dir", str(state), *extra])
        if name == "dnsmasq":
            return dnsmasq_server(port, upstream, cpu, self.s.cache_size, stale=True)
        if name == "unbound":
            return unbound_server(port, upstream, cpu, home, household=True)
        if name == "smartdns":
            return smartdns_server(port, upstream, cpu, home, self.s.cache_size)
        raise BenchError(f"unknown server {name}")

    def run(self, delay_ms: float) -> PassResult:
        s = self.s
        delay = delay_ms / 1000
        home = self.workdir / f"household-{delay_ms:g}ms"
        home.mkdir()
        netem = self.ns.set_delay(delay_ms)
        ports = [FIRST_PORT + i for i in range(len(self.names))]
        base = time.time()
        log = home / "authority.json"
        auth = authority_server(self.ns.inner_ip, ports, base, log, None, self.ns.exec_argv,
                                0.0 if netem else delay_ms)
        servers: list[Server] = []
        replay = None
        try:
            self.fleet.start(auth, PROBE, home)
            for name, port in zip(self.names, ports, strict=True):
                servers.append(self.fleet.start(self.build(name, (self.ns.inner_ip, port), home),
                                                PROBE, home))
            names = [name_for(rank, ttl) for rank, ttl in enumerate(self.ttls)]
            replay = Replay([(x.host, x.port) for x in servers], names,
                            zipf_stream(s.names, s.zipf, s.seed), s.rate, s.timeout)
            t0 = time.time() + 0.5
            measured, restart_at = t0 + s.warmup, t0 + s.warmup + s.seconds
            say(f"household, upstream {delay_ms:g} ms: {s.rate:g} queries/s to each of "
                f"{', '.join(self.names)}; warm-up {s.warmup:g} s, measured {s.seconds:g} s"
                + (f", then a restart and {s.restart_window:g} s" if s.restart_window else ""))
            replay.start(t0)
            sleep_until(measured)
            cpu0 = [x.cpu_total() for x in servers] + [auth.cpu_total()]
            busy0, self0 = busy_seconds(), self_seconds()
            sleep_until(restart_at)
            cpu1 = [x.cpu_total() for x in servers] + [auth.cpu_total()]
            busy1, self1 = busy_seconds(), self_seconds()
            sleep_until(restart_at + s.timeout)  # the measured queries' answers are all in
            restarts = self.restart_all(servers, home) if s.restart_window else {}
            if restarts:
                ready = [r[1] for r in restarts.values() if isinstance(r, tuple)]
                sleep_until(max(ready, default=time.time()) + s.restart_window)
            replay.stop()
            stamps = replay.kernel_stamps
            records = replay.records
            replay = None
        finally:
            if replay is not None:
                replay.stop()
            for server in reversed(servers):
                server.stop()
            auth.stop()
        arrivals = read_arrivals(log, ports)
        wall = restart_at - measured
        spent = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
        other = max(0.0, (busy1 - busy0) - (self1 - self0) - sum(spent)) / wall
        results = []
        for index, server in enumerate(servers):
            common = dict(ttls=self.ttls, base=base, delay=delay, timeout=s.timeout,
                          arrivals=arrivals[ports[index]])
            steady = analyse(records[index], measured, restart_at, **common)
            result = ServerResult(server.name, server.persistence, steady, spent[index] / wall)
            outcome = restarts.get(server.name)
            if isinstance(outcome, tuple):
                stopped, ready = outcome
                result.downtime = ready - stopped
                result.unanswered = unanswered(records[index], stopped, ready)
                result.restart = analyse(records[index], ready, ready + s.restart_window,
                                         **common)
            elif outcome is not None:
                result.restart_error = outcome
            results.append(result)
            mismatched = records[index].mismatched
            if mismatched:
                say(f"  {server.name}: {mismatched} replies matched no query")
        lag = max((r.steady.max_lag for r in results), default=0.0)
        return PassResult(delay_ms, s.seconds, s.restart_window, results, other, lag, stamps,
                          netem)

    def restart_all(self, servers: list[Server], home: Path) -> dict[str, tuple | str]:
        """Every server restarted at the same moment of the stream, each in a thread of its
        own: {name: (stopped at, answering again at)} or {name: what went wrong}."""
        outcome: dict[str, tuple | str] = {}

        def one(server: Server) -> None:
            try:
                outcome[server.name] = server.restart(home, PROBE)
            except Exception as exc:  # reported in the table; the run goes on
                outcome[server.name] = str(exc).splitlines()[0][:120]

        say(f"  restarting {', '.join(x.name for x in servers)}")
        threads = [threading.Thread(target=one, args=(x,)) for x in servers]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except KeyboardInterrupt:
            # Let the restarts finish, so that the caller's clean-up stops the new processes.
            for thread in threads:
                thread.join()
            raise
        for name, result in outcome.items():
            if isinstance(result, tuple):
                say(f"  {name} answering again after {result[1] - result[0]:.2f} s")
            else:
                say(f"  {name} restart failed: {result}")
        return outcome


def read_arrivals(log: Path, ports: list[int]) -> dict[int, list[float]]:
    """Arrival times at the authority, sorted, by port (UDP and TCP together)."""
    try:
        data = json.loads(log.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"the authority left no readable log ({exc})") from exc
    return read_arrivals_from(data, ports)


def read_arrivals_from(data: dict[str, list[float]], ports: list[int]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {port: [] for port in ports}
    for key, times in data.items():
        port = int(key.split("/")[0])
        out.setdefault(port, []).extend(times)
    return {port: sorted(times) for port, times in out.items()}


def sleep_until(when: float) -> None:
    while (left := when - time.time()) > 0:
        time.sleep(min(left, 1.0))


# ---------------------------------------------------------------------------------------------
# The whole household part of the report


def describe(s: Settings, servers: list[str], notes: list[str], kernel_stamps: bool,
             netem: bool | None) -> list[str]:
    mix = ", ".join(f"{share:.0%} {ttl} s" for ttl, share in parse_ttl_mix(s.ttl_mix))
    scaled = ", ".join(f"{scaled_ttl(ttl, s.time_scale)} s" for ttl, _ in
                       parse_ttl_mix(s.ttl_mix))
    stamp = ("the kernel's receive timestamp (SO_TIMESTAMPNS)" if kernel_stamps
             else "the receiving thread's clock")
    lines = [
        "## Household", "",
        f"- Stream: A queries at a fixed {s.rate:g} per second to each server, over "
        f"{s.names:,} names with Zipf popularity (s = {s.zipf:g}); TTLs {mix} in real life, "
        f"divided by {s.time_scale:g} ({scaled}): the run is a household asking "
        f"{s.rate / s.time_scale:g} queries/s, {s.time_scale:g} times faster. Same stream for "
        f"every server, one run: each query goes to every server in turn, the order rotating, "
        f"a fraction of an interval apart.",
        f"- Measured: {s.seconds:g} s after a warm-up of {s.warmup:g} s. Latency is the "
        f"client's, from just before the send to {stamp}; a query unanswered within "
        f"{s.timeout:g} s counts as a timeout and as {s.timeout:g} s in the statistics.",
        "- Upstream: a small authoritative server (bench/authority.py) in a network namespace "
        "of its own, one veth pair away, a port per forwarder, so each forwarder's upstream "
        "queries are counted at the upstream. The delay: "
        + ("`tc netem delay` on its interface." if netem else
           "this kernel has no netem (sch_netem), so the upstream holds each reply for the "
           "delay itself (asyncio timer, about 1 ms resolution); the forwarders see the same "
           "round trip." if netem is False else "-"),
        f"- Stale: an answer received more than its TTL (+ the one-way delay + {SLACK:g} s) after "
        "the upstream made it; the upstream encodes the time in each A address. *Waited on "
        "upstream*: answers that took at least half the upstream round trip.",
        "- Servers: dnsproxy (defaults, so serve-stale and prefetch; `--rate-limit 0 "
        "--no-query-log --state-dir`; dnsproxy+history the same with its page on, `--web`, "
        "so every query is recorded in the history, nobody looking; dnsproxy-python the same "
        "without its compiled path, `--no-native`, when asked for), dnsmasq "
        "`--use-stale-cache --cache-size="
        f"{s.cache_size}`, unbound (`prefetch: yes`, `serve-expired: yes`, one thread), smartdns "
        f"(`prefetch-domain yes`, `serve-expired yes`, `cache-persist yes`, `rr-ttl-min 1` so "
        f"that it keeps the upstream's TTLs, `speed-check-mode none`, `cache-size "
        f"{s.cache_size}`). Running: {', '.join(servers) or 'none'}. Not pinned to CPUs.",
    ]
    lines += [f"- {note}" for note in notes]
    return lines + [""]


def run(settings: Settings, delays: list[float], fleet: Fleet, emit,
        plot_dir: Path) -> list[PassResult]:
    """Every delay in turn, in one namespace made (and removed) here; the report sections go to
    `emit`, the plots to `plot_dir`.

    Nothing is pinned to a CPU here, unlike the saturation run: four servers on one core queue
    behind each other (a waking server waits for another's time slice), which doubled the
    share of cache hits slower than half a millisecond in a trial; at these rates every process
    is mostly idle and the scheduler spreads them best."""
    from . import netns, report

    servers, notes = available(settings.servers)
    reason = netns.unavailable()
    if reason or not servers:
        why = reason or "no server to run"
        say(f"household part skipped: {why}")
        emit("## Household", "", f"Skipped: {why}.", *[f"- {note}" for note in notes], "")
        return []
    for note in notes:
        say(note)
    namespace = netns.Namespace()
    outcomes: list[tuple[float, PassResult | str]] = []
    try:
        namespace.open()
        household = HouseholdPass(settings, fleet, namespace, servers, fleet.workdir)
        for delay in delays:
            try:
                outcomes.append((delay, household.run(delay)))
            except BenchError as exc:
                say(f"household pass at {delay:g} ms failed: {exc}")
                outcomes.append((delay, str(exc)))
    finally:
        namespace.close()
    results = [r for _, r in outcomes if isinstance(r, PassResult)]
    emit(*describe(settings, servers, notes, bool(results) and
                   all(r.kernel_stamps for r in results),
                   all(r.netem for r in results) if results else None))
    for delay, result in outcomes:
        if isinstance(result, str):
            emit(f"### Upstream {delay:g} ms away", "", f"Failed: {result}", "")
            continue
        png = plot_dir / f"household-{result.delay_ms:g}ms.png"
        result.plot_note = report.plot_household(result, png) or ""
        emit(*report.household_section(result, None if result.plot_note else png.name))
    return results
