#!/usr/bin/env python3
"""Side by side: dnsproxy, dnsmasq and unbound, all forwarding to one local upstream.

Everything listens on 127.0.0.1 (and, for the container part, on a Docker bridge network made for
the run); no query leaves the machine. One run starts:

- the upstream: dnsmasq answering every name under bench.test from its configuration (A 192.0.2.1,
  TTL 3600, with an OPT echo), so it never has to ask anyone;
- the three forwarders under test, each forwarding only to that upstream;

then, in rounds that alternate between the servers (A B C A B C ...), runs dnsperf for cache hits
(a small hot set of names, pre-warmed) and cache misses (names never asked before: a fresh set per
round and server), and a latency probe at a fixed, moderate rate. Then dnsproxy's memory with 100k
names cached, the latency its forgery defences add, and the appliance container in port mode
against direct mode (if the image exists). The result is a markdown report on stdout and in
bench/results/latest.md.

Usage: python bench/run.py [--quick] [--rounds N] [--duration S] [--clients C] [--outstanding Q]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.md"
ZONE = "bench.test"
ANSWER = "192.0.2.1"  # documentation range: nothing real lives there
LOCALHOST = "127.0.0.1"
IMAGE = "dnsproxy:latest"
DNSPROXY_FLAGS = ["--rate-limit", "0", "--no-query-log"]
DEFENCES_OFF = ["--no-edns-marker", "--no-forged-addresses", "--no-hijack-threshold"]


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Small helpers: ports, readiness, /proc


def free_port(host: str = LOCALHOST) -> int:
    """A port free for both UDP and TCP on `host`."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise BenchError(f"no free port on {host}")


def dns_query(name: str, qid: int = 0x4242) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


def answers(host: str, port: int, name: str, timeout: float = 0.5) -> bool:
    """True when the server at host:port gives a NOERROR reply with an answer for `name`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(dns_query(name), (host, port))
            data, _ = sock.recvfrom(4096)
        except OSError:
            return False
    return len(data) >= 12 and data[3] & 0x0F == 0 and struct.unpack(">H", data[6:8])[0] > 0


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS (kB) of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time processes spent on all cores (user, nice, system, steal; not interrupts,
    which the kernel does not charge to any process, ours included)."""
    with open("/proc/stat") as handle:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (
            int(x) for x in handle.readline().split()[1:9])
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    name: str
    argv: list[str]
    host: str
    port: int
    cpu: int | None = None
    cwd: Path | None = None
    proc: subprocess.Popen | None = None
    pid: int | None = None  # the process whose memory and CPU we read
    log: Path | None = None

    def start(self, workdir: Path, probe: str) -> None:
        argv = (["taskset", "-c", str(self.cpu)] if self.cpu is not None else []) + self.argv
        self.log = workdir / f"{self.name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd)
        self.pid = self.proc.pid  # taskset execs the command: same PID
        wait_ready(self, probe)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def memory(self) -> dict[str, int]:
        return proc_status(self.pid)


def wait_ready(server: Server, probe: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            tail = server.log.read_text(errors="replace")[-2000:] if server.log else ""
            raise BenchError(f"{server.name} exited with {server.proc.returncode}:\n{tail}")
        if answers(server.host, server.port, probe):
            return
        time.sleep(0.1)
    raise BenchError(f"{server.name} does not answer on {server.host}:{server.port}")


def upstream_server(host: str, port: int, cpu: int | None) -> Server:
    """dnsmasq answering every name under the zone from its configuration, forwarding nothing."""
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={host}",
            f"--port={port}", f"--address=/{ZONE}/{ANSWER}", "--local-ttl=3600",
            "--cache-size=0", "--pid-file=", "--log-facility=-"]
    if os.geteuid() == 0:
        argv += ["--user=nobody", "--group=nogroup"]
    return Server("upstream", argv, host, port, cpu)


def dnsmasq_server(port: int, upstream: tuple[str, int], cpu: int | None,
                   cache_size: int) -> Server:
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={LOCALHOST}",
            f"--port={port}", f"--server={upstream[0]}#{upstream[1]}",
            f"--cache-size={cache_size}", "--dns-forward-max=1000", "--pid-file=",
            "--log-facility=-"]
    if os.geteuid() == 0:
        argv += ["--user=nobody", "--group=nogroup"]
    return Server("dnsmasq", argv, LOCALHOST, port, cpu)


UNBOUND_CONF = """\
server:
    interface: {host}@{port}
    port: {port}
    do-ip6: no
    num-threads: 1
    username: ""
    chroot: ""
    directory: "{workdir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    module-config: "iterator"
    do-not-query-localhost: no
    prefetch: no
    minimal-responses: yes
    access-control: 127.0.0.0/8 allow
    local-zone: "test." nodefault
    msg-cache-size: {msg_cache}m
    rrset-cache-size: {rrset_cache}m
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: {up_host}@{up_port}
"""


def unbound_server(port: int, upstream: tuple[str, int], cpu: int | None,
                   workdir: Path) -> Server:
    conf = workdir / "unbound.conf"
    conf.write_text(UNBOUND_CONF.format(host=LOCALHOST, port=port, workdir=workdir,
                                        up_host=upstream[0], up_port=upstream[1],
                                        msg_cache=4, rrset_cache=8))
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"unbound config rejected: {check.stdout}{check.stderr}")
    return Server("unbound", ["unbound", "-d", "-c", str(conf)], LOCALHOST, port, cpu)


def dnsproxy_server(name: str, port: int, upstream: tuple[str, int], cpu: int | None,
                    extra: list[str] = ()) -> Server:
    argv = [sys.executable, "-m", "dnsproxy", "--listen", f"{LOCALHOST}:{port}",
            "--upstream", f"{upstream[0]}:{upstream[1]}", *DNSPROXY_FLAGS,
            "--log-level", "warning", *extra]
    return Server(name, argv, LOCALHOST, port, cpu, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Perf:
    qps: float = 0.0
    sent: int = 0
    completed: int = 0
    lost: int = 0
    noerror: int = 0
    runtime: float = 0.0
    avg_latency: float = 0.0
    latencies: list[float] = field(default_factory=list)
    exhausted: bool = False  # the query file ran out before the time limit
    server_cpu: float | None = None  # share of one core the server used
    upstream_cpu: float | None = None
    other_cpu: float | None = None  # what else ran on the machine meanwhile, in cores


def write_names(path: Path, prefix: str, count: int) -> Path:
    with open(path, "w") as handle:
        for start in range(0, count, 65536):
            handle.write("".join(f"{prefix}{i}.{ZONE} A\n"
                                 for i in range(start, min(count, start + 65536))))
    return path


def parse_dnsperf(text: str) -> Perf:
    perf = Perf()
    for line in text.splitlines():
        if line.startswith("> "):
            parts = line.split()
            with contextlib.suppress(ValueError, IndexError):
                perf.latencies.append(float(parts[-1]))
            continue
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key == "Queries sent":
            perf.sent = int(value.split()[0])
        elif key == "Queries completed":
            perf.completed = int(value.split()[0])
        elif key == "Queries lost":
            perf.lost = int(value.split()[0])
        elif key == "Queries per second":
            perf.qps = float(value)
        elif key == "Run time (s)":
            perf.runtime = float(value)
        elif key == "Average Latency (s)":
            perf.avg_latency = float(value.split()[0])
        elif key == "Response codes":
            for item in value.split(","):
                bits = item.split()
                if bits and bits[0] == "NOERROR":
                    perf.noerror = int(bits[1])
        elif "end of file" in line:
            perf.exhausted = True
    return perf


@dataclass
class Load:
    clients: int
    outstanding: int
    cpu: int | None

    def run(self, host: str, port: int, datafile: Path, seconds: float, *, once: bool = False,
            max_qps: int | None = None, verbose: bool = False, clients: int | None = None,
            outstanding: int | None = None, watch: list[int | None] = ()) -> Perf:
        argv = (["taskset", "-c", str(self.cpu)] if self.cpu is not None else []) + [
            "dnsperf", "-s", host, "-p", str(port), "-d", str(datafile), "-l", str(seconds),
            "-c", str(clients or self.clients), "-q", str(outstanding or self.outstanding),
            "-t", "2"]
        if once:
            argv += ["-n", "1"]
        if max_qps:
            argv += ["-Q", str(max_qps)]
        if verbose:
            argv += ["-v"]
        before = [cpu_seconds(pid) if pid else None for pid in watch]
        busy, load = busy_seconds(), children_seconds()
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True)
        wall = time.monotonic() - started
        busy, load = busy_seconds() - busy, children_seconds() - load
        after = [cpu_seconds(pid) if pid else None for pid in watch]
        if done.returncode != 0:
            raise BenchError(f"dnsperf failed ({done.returncode}): {done.stderr[-2000:]}")
        perf = parse_dnsperf(done.stdout)
        shares = [None if b is None else (a - b) / max(perf.runtime or wall, 1e-9)
                  for a, b in zip(after, before, strict=True)]
        if shares:
            perf.server_cpu = shares[0]
        if len(shares) > 1:
            perf.upstream_cpu = shares[1]
        ours = load + sum((a - b) for a, b in zip(after, before, strict=True) if b is not None)
        perf.other_cpu = max(0.0, busy - ours) / wall
        return perf


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class Row:
    label: str
    runs: list[Perf] = field(default_factory=list)
    probes: list[Perf] = field(default_factory=list)

    def qps(self) -> list[float]:
        return [p.qps for p in self.runs]

    def median_qps(self) -> float:
        return statistics.median(self.qps()) if self.runs else float("nan")

    def latency(self, pct: float) -> float:
        """Median over rounds of the probe's percentile, in ms."""
        values = [percentile(p.latencies, pct) * 1000 for p in self.probes if p.latencies]
        return statistics.median(values) if values else float("nan")

    def losses(self) -> str:
        sent = sum(p.sent for p in self.runs + self.probes)
        bad = sum(p.lost + (p.completed - p.noerror) for p in self.runs + self.probes)
        return "0" if bad == 0 else f"{bad} ({100 * bad / max(sent, 1):.2f}%)"

    def cpu(self, attr: str) -> str:
        values = [getattr(p, attr) for p in self.runs if getattr(p, attr) is not None]
        return f"{100 * statistics.median(values):.0f}%" if values else "-"

    def per_core(self) -> str:
        values = [p.qps / p.server_cpu for p in self.runs if p.server_cpu]
        return fmt_qps(statistics.median(values)) if values else "-"

    def other(self) -> str:
        values = [p.other_cpu for p in self.runs if p.other_cpu is not None]
        return f"{statistics.median(values):.2f}" if values else "-"


def fmt_qps(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ms(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


def throughput_table(rows: dict[str, dict[str, Row]], reference: str | None) -> list[str]:
    out = ["| workload | server | queries/s (median) | min – max | vs " + (reference or "-")
           + " | p50 ms | p99 ms | server CPU | queries per CPU-second | upstream CPU | other load"
           " | lost/errors |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workload, by_server in rows.items():
        ref = by_server.get(reference) if reference else None
        for name, row in by_server.items():
            if not row.runs:
                continue
            ratio = (f"{row.median_qps() / ref.median_qps():.2f}×"
                     if ref is not None and ref.runs and ref.median_qps() else "-")
            out.append(f"| {workload} | {name} | {fmt_qps(row.median_qps())} | "
                       f"{fmt_qps(min(row.qps()))} – {fmt_qps(max(row.qps()))} | {ratio} | "
                       f"{fmt_ms(row.latency(50))} | {fmt_ms(row.latency(99))} | "
                       f"{row.cpu('server_cpu')} | {row.per_core()} | {row.cpu('upstream_cpu')} | "
                       f"{row.other()} | "
                       f"{row.losses()} |")
    return out


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        total = int(handle.readline().split()[1])
        mem = f", {total / 1024 / 1024:.0f} GB RAM"
    return (f"{model}, {os.cpu_count()} cores{mem}, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def source_digest() -> str:
    """A digest of dnsproxy's sources: a run during which they changed measured two versions."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "dnsproxy").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def tool_versions() -> str:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else "?"

    help_text = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True)
    dnsperf = next((line for line in (help_text.stdout + help_text.stderr).splitlines()
                    if line.startswith("Version")), "?")
    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio default loop (uvloop not installed)"
    rev = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "dnsproxy"],
                           capture_output=True, text=True).stdout.strip()
    rev += " with uncommitted changes" if dirty else ""
    return (f"dnsproxy {rev} on {loop}; dnsmasq {first_line(['dnsmasq', '--version']).split()[2]}; "
            f"unbound {first_line(['unbound', '-V']).split()[-1]}; dnsperf {dnsperf.split()[-1]}")


# ---------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.nonce = secrets.token_hex(3)
        cpus = os.cpu_count() or 1
        pin = args.pin and cpus >= 2 and shutil.which("taskset") is not None
        self.pinned = pin
        self.server_cpu = cpus - 1 if pin else None
        self.load_cpu = 0 if pin else None
        self.load = Load(args.clients, args.outstanding, self.load_cpu)
        self.servers: list[Server] = []
        self.lines: list[str] = []
        self.sequence = 0

    # -- plumbing

    def start(self, server: Server) -> Server:
        say(f"starting {server.name} on {server.host}:{server.port}")
        self.servers.append(server)
        server.start(self.workdir, f"ready.{ZONE}")
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def miss_file(self, tag: str, count: int) -> Path:
        self.sequence += 1
        prefix = f"m{self.nonce}{self.sequence}{re.sub(r'[^a-z0-9]', '', tag.lower())}-"
        return write_names(self.workdir / "misses.txt", prefix, count)

    def hot_file(self) -> Path:
        path = self.workdir / "hot.txt"
        if not path.exists():
            write_names(path, f"h{self.nonce}-", self.args.hot_names)
        return path

    def warm(self, server: Server) -> None:
        """Every hot name asked once, then checked to be answered."""
        self.load.run(server.host, server.port, self.hot_file(), 10, once=True,
                      clients=1, outstanding=20)
        time.sleep(0.2)

    def measure(self, row: Row, server: Server, workload: str, upstream: Server | None) -> None:
        a = self.args
        watch = [server.pid, upstream.pid if upstream else None]
        if workload == "hits":
            perf = self.load.run(server.host, server.port, self.hot_file(), a.duration,
                                 watch=watch)
        else:
            path = self.miss_file(row.label, int(a.miss_rate_cap * a.duration))
            perf = self.load.run(server.host, server.port, path, a.duration, once=True,
                                 watch=watch)
        row.runs.append(perf)
        cpu = f", server CPU {100 * perf.server_cpu:.0f}%" if perf.server_cpu is not None else ""
        say(f"  {workload:6} {row.label:14} {perf.qps:10,.0f} q/s{cpu}"
            + (" (query file ran out)" if perf.exhausted else ""))

    def probe(self, row: Row, server: Server, workload: str) -> None:
        a = self.args
        if workload == "hits":
            path = self.hot_file()
            once = False
        else:
            path = self.miss_file(row.label + "p", int(a.probe_qps * a.probe_seconds * 1.5))
            once = True
        perf = self.load.run(server.host, server.port, path, a.probe_seconds, once=once,
                             max_qps=a.probe_qps, verbose=True, clients=1, outstanding=100)
        row.probes.append(perf)

    def rounds(self, servers: list[Server], labels: list[str], workloads: list[str],
               upstream: Server | None) -> dict[str, dict[str, Row]]:
        rows = {w: {label: Row(label) for label in labels} for w in workloads}
        for number in range(self.args.rounds):
            say(f"round {number + 1}/{self.args.rounds}")
            for workload in workloads:
                for server, label in zip(servers, labels, strict=True):
                    self.measure(rows[workload][label], server, workload, upstream)
                for server, label in zip(servers, labels, strict=True):
                    self.probe(rows[workload][label], server, workload)
        return rows

    # -- the parts

    def run(self) -> None:
        a = self.args
        start = datetime.datetime.now().astimezone()
        digest = source_digest()
        up_port = free_port()
        upstream = self.start(upstream_server(LOCALHOST, up_port, self.load_cpu))
        up = (LOCALHOST, up_port)

        self.header(start)
        self.upstream_capacity(upstream)

        candidates = {
            "dnsproxy": lambda: dnsproxy_server("dnsproxy", free_port(), up, self.server_cpu),
            "dnsmasq": lambda: dnsmasq_server(free_port(), up, self.server_cpu, a.cache_size),
            "unbound": lambda: unbound_server(free_port(), up, self.server_cpu, self.workdir),
        }
        servers = [self.start(candidates[name]()) for name in a.servers]
        for server in servers:
            self.warm(server)
        rows = self.rounds(servers, [s.name for s in servers], ["hits", "misses"], upstream)
        memory = {s.name: s.memory() for s in servers}
        for server in servers:
            server.stop()

        reference = "dnsmasq" if "dnsmasq" in a.servers else None
        self.emit("## Forwarders side by side", "")
        self.emit(*throughput_table(rows, reference), "")
        self.emit("Peak memory (VmHWM, after all rounds): " + ", ".join(
            f"{name} {m['VmHWM'] / 1024:.1f} MB" for name, m in memory.items()) + ".", "")

        if "dnsproxy" in a.servers:
            self.cache_memory(up)
            self.defences(up)
        if a.docker:
            self.docker()
        else:
            self.emit("## Appliance container", "", "Skipped (--no-docker).", "")
        if source_digest() != digest:
            say("warning: dnsproxy's sources changed during the run")
            self.emit("**Warning**: dnsproxy's sources changed during this run; servers "
                      "started at different times ran different code. Run it again.", "")
        say("done")

    def header(self, start: datetime.datetime) -> None:
        a = self.args
        pin = (f"servers pinned to CPU {self.server_cpu}, dnsperf and the upstream to CPU "
               f"{self.load_cpu} (taskset)" if self.pinned else "no CPU pinning")
        self.emit(
            "# DNS forwarder benchmark", "",
            f"- Date: {start:%Y-%m-%d %H:%M %Z}",
            f"- Machine: {machine()}",
            f"- Software: {tool_versions()}",
            f"- Load: dnsperf over UDP, -c {a.clients} -q {a.outstanding}, {a.duration:g} s per "
            f"run, {a.rounds} rounds alternating between servers; {pin}.",
            f"- Cache hits: {a.hot_names} names, pre-warmed. Cache misses: names never asked "
            f"before (a fresh set per round and server), each answered by the upstream.",
            f"- Latency: a separate probe at a fixed {a.probe_qps} queries/s for "
            f"{a.probe_seconds:g} s (dnsperf -v, per-query times); p50/p99 are the median over "
            f"rounds. Queries/s: median over rounds, with min – max.",
            "- Server/upstream CPU: share of one core each used during the run; queries per "
            "CPU-second: queries/s divided by the server's CPU share (its speed per core, less "
            "sensitive to a load generator that cannot keep up). Other load: CPU "
            "(in cores) used meanwhile by everything outside the benchmark: if it is high, the "
            "machine was busy and the run is noisy.",
            f"- dnsproxy runs with `{' '.join(DNSPROXY_FLAGS)}` (its default per-client limit of "
            f"500 queries/s would throttle the single benchmark client; query log off), one "
            f"worker, default cache (10000). dnsmasq: `--cache-size={a.cache_size} "
            f"--dns-forward-max=1000`. unbound: one thread, iterator only, forward-zone \".\".",
            f"- Upstream: dnsmasq answering every name under {ZONE} from its configuration "
            f"(A {ANSWER}, TTL 3600, OPT echoed); all forwarders use it.", "")

    def upstream_capacity(self, upstream: Server) -> None:
        """The upstream must be faster than any forwarder: measure it alone."""
        a = self.args
        runs = []
        for _ in range(min(a.rounds, 2)):
            path = self.miss_file("up", int(a.miss_rate_cap * a.duration))
            runs.append(self.load.run(upstream.host, upstream.port, path, a.duration, once=True,
                                      watch=[upstream.pid]))
        qps = statistics.median(p.qps for p in runs)
        say(f"upstream alone: {qps:,.0f} q/s")
        self.upstream_qps = qps
        self.emit(f"Upstream capacity, asked directly with the cache-miss workload: "
                  f"{fmt_qps(qps)} queries/s (the forwarders' miss rates must stay well below "
                  f"this; the upstream CPU column shows its load during each run).", "")

    def cache_memory(self, up: tuple[str, int]) -> None:
        a = self.args
        say(f"dnsproxy memory with {a.cached_names:,} names cached")
        metrics_port = free_port()
        server = self.start(dnsproxy_server(
            "dnsproxy-100k", free_port(), up, self.server_cpu,
            ["--cache-size", str(a.cached_names * 2), "--metrics", f"{LOCALHOST}:{metrics_port}"]))
        idle = server.memory()
        path = self.miss_file("fill", a.cached_names)
        entries = 0
        for _ in range(4):  # a lost query is asked again on the next pass; hits cost nothing
            self.load.run(server.host, server.port, path, 120, once=True)
            entries = cache_entries(metrics_port)
            if entries >= a.cached_names:
                break
        mem = server.memory()
        server.stop()
        verdict = "meets" if mem["VmHWM"] <= 64 * 1024 else "MISSES"
        self.emit(f"## dnsproxy with {a.cached_names:,} names cached", "",
                  "| cache entries | VmRSS at start | VmHWM | VmRSS | target |",
                  "|---:|---:|---:|---:|---|",
                  f"| {entries:,} | {idle['VmRSS'] / 1024:.1f} MB | {mem['VmHWM'] / 1024:.1f} MB "
                  f"| {mem['VmRSS'] / 1024:.1f} MB | <= 64 MB: {verdict} |", "")

    def defences(self, up: tuple[str, int]) -> None:
        """Latency probes only, twice as many rounds as the main part: the difference sought is
        small against the noise of a shared machine."""
        say("forgery defences on vs off (cache misses, latency probe)")
        on = self.start(dnsproxy_server("defences-on", free_port(), up, self.server_cpu))
        off = self.start(dnsproxy_server("defences-off", free_port(), up, self.server_cpu,
                                         DEFENCES_OFF))
        rows = {"on": Row("defences on"), "off": Row("defences off")}
        for number in range(2 * self.args.rounds):
            pairs = [("on", on), ("off", off)]
            for key, server in pairs if number % 2 == 0 else reversed(pairs):
                self.probe(rows[key], server, "misses")
        on.stop()
        off.stop()
        lines = ["| dnsproxy | p50 ms (median) | p99 ms (median) | p99 per round, ms | "
                 "lost/errors |", "|---|---:|---:|---|---:|"]
        for row in rows.values():
            per_round = ", ".join(f"{percentile(p.latencies, 99) * 1000:.2f}"
                                  for p in row.probes)
            lines.append(f"| {row.label} | {fmt_ms(row.latency(50))} | "
                         f"{fmt_ms(row.latency(99))} | {per_round} | {row.losses()} |")
        d50 = rows["on"].latency(50) - rows["off"].latency(50)
        d99 = rows["on"].latency(99) - rows["off"].latency(99)
        verdict = "meets" if d99 < 1.0 else "MISSES"
        self.emit("## Latency the forgery defences add (cache misses)", "",
                  f"dnsproxy with its defences (the default) against "
                  f"`{' '.join(DEFENCES_OFF)}`; latency probe of unique names at "
                  f"{self.args.probe_qps} queries/s, {2 * self.args.rounds} rounds alternating.",
                  "", *lines, "",
                  f"Added latency: p50 {d50:+.3f} ms, p99 {d99:+.3f} ms "
                  f"(target < 1 ms at p99: {verdict}).", "")

    # -- the container

    def docker(self) -> None:
        title = "## Appliance container: port mode against direct mode"
        reason = docker_unavailable()
        if reason:
            say(f"container part skipped: {reason}")
            self.emit(title, "", f"Skipped: {reason}.", "")
            return
        say("container: port mode against direct mode")
        name = f"dnsbench-{os.getpid()}-{self.nonce}"
        made_network = False
        container = None
        try:
            run(["docker", "network", "create", "--driver", "bridge", name])
            made_network = True
            info = json.loads(run(["docker", "network", "inspect", name]))[0]
            gateway = info["IPAM"]["Config"][0]["Gateway"]
            up_port = free_port(gateway)
            upstream = self.start(upstream_server(gateway, up_port, self.load_cpu))
            upstream.name = "upstream-bridge"
            host_port = free_port()
            cpuset = [] if self.server_cpu is None else ["--cpuset-cpus", str(self.server_cpu)]
            run(["docker", "run", "-d", "--name", name, "--network", name, *cpuset,
                 "-e", "DNSPROXY_QUERY_LOG=0",
                 "-p", f"{LOCALHOST}:{host_port}:53/udp", "-p", f"{LOCALHOST}:{host_port}:53/tcp",
                 IMAGE, "--listen", "0.0.0.0:53", "--upstream", f"{gateway}:{up_port}",
                 *DNSPROXY_FLAGS])
            container = name
            state = json.loads(run(["docker", "inspect", name]))[0]
            address = state["NetworkSettings"]["Networks"][name]["IPAddress"]
            pid = state["State"]["Pid"]
            port_mode = Server("port mode", [], LOCALHOST, host_port, pid=pid)
            direct = Server("direct mode", [], address, 53, pid=pid)
            for server in (port_mode, direct):
                wait_ready(server, f"ready.{ZONE}", 30)
            self.warm(direct)
            rows = self.rounds([port_mode, direct], ["port mode", "direct mode"],
                               ["hits", "misses"], upstream)
            mem = proc_status(pid)
            self.emit(title, "",
                      f"`{IMAGE}` on a bridge network made for the run; port mode asks the "
                      f"published port on {LOCALHOST}, direct mode the container's address on "
                      f"the bridge. The container is limited to CPU {self.server_cpu}; "
                      f"server CPU counts the dnsproxy process only (not docker-proxy).", "",
                      *throughput_table(rows, "direct mode"), "",
                      f"Container dnsproxy peak memory (VmHWM): {mem['VmHWM'] / 1024:.1f} MB.", "")
        except (BenchError, subprocess.CalledProcessError, KeyError, IndexError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            say(f"container part failed: {detail}")
            self.emit(title, "", f"Failed: {str(detail).strip()}", "")
        finally:
            if container:
                subprocess.run(["docker", "rm", "-f", container], capture_output=True)
            for server in [s for s in self.servers if s.name == "upstream-bridge"]:
                server.stop()
            if made_network:
                subprocess.run(["docker", "network", "rm", name], capture_output=True)

    # -- output

    def emit(self, *lines: str) -> None:
        self.lines.extend(lines)


def run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "the Docker engine does not answer"
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        return f"image {IMAGE} not found (build it with `make image`)"
    return None


def cache_entries(port: int) -> int:
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("dnsproxy_cache_entries"):
                return int(float(line.split()[-1]))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="dnsproxy against dnsmasq and unbound, side by side")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run: 1 round of 2 s, 10k names cached")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per dnsperf run")
    p.add_argument("--clients", type=int, default=4, help="dnsperf -c")
    p.add_argument("--outstanding", type=int, default=200, help="dnsperf -q")
    p.add_argument("--hot-names", type=int, default=100, help="size of the cache-hit set")
    p.add_argument("--miss-rate-cap", type=int, default=100_000,
                   help="unique names per second of a miss run (the file's size)")
    p.add_argument("--probe-qps", type=int, default=2000, help="rate of the latency probe")
    p.add_argument("--probe-seconds", type=float, default=5.0)
    p.add_argument("--cache-size", type=int, default=10000, help="dnsmasq's cache, in names")
    p.add_argument("--cached-names", type=int, default=100_000,
                   help="names in dnsproxy's cache for the memory figure")
    p.add_argument("--servers", default="dnsproxy,dnsmasq,unbound",
                   help="comma-separated subset of dnsproxy,dnsmasq,unbound")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin servers and load to different CPUs")
    p.add_argument("--no-docker", dest="docker", action="store_false",
                   help="skip the appliance container part")
    p.add_argument("--output", type=Path, default=RESULTS, help="where the markdown goes")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.probe_seconds = 1, 2.0, 1.0
        args.cached_names = min(args.cached_names, 10_000)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - {"dnsproxy", "dnsmasq", "unbound"}
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("dnsperf", "dnsmasq", "unbound") if shutil.which(t) is None]
    if missing:
        print(f"bench: missing {', '.join(missing)} (Debian: apt-get install dnsperf "
              f"dnsmasq-base unbound)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dnsbench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            bench.run()
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        finally:
            bench.stop_all()
    report = "\n".join(bench.lines)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    say(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
