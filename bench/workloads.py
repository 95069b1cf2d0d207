"""The saturation workload: dnsperf against each server, rounds alternating between them.

Cache hits (a small hot set, pre-warmed) and cache misses (names never asked before, a fresh set
per round and server) at full speed, and a latency probe at a fixed, moderate rate after each;
then dnsproxy's memory with 100k names cached, the latency its forgery defences add, and the
appliance container in port mode against direct mode. Everything on 127.0.0.1 (and a Docker
bridge network made for the run); the upstream is dnsmasq answering from its configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .report import fmt_ms, fmt_qps, percentile, throughput_table
from .servers import (
    ANSWER,
    DEFENCES_OFF,
    DNSPROXY_FLAGS,
    LOCALHOST,
    ZONE,
    BenchError,
    Fleet,
    Server,
    busy_seconds,
    children_seconds,
    cpu_seconds,
    dnsmasq_server,
    dnsproxy_server,
    free_port,
    proc_status,
    say,
    unbound_server,
    upstream_server,
    wait_ready,
)

IMAGE = "dnsproxy:latest"

# ---------------------------------------------------------------------------------------------
# dnsperf

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


# ---------------------------------------------------------------------------------------------
# The workload


@dataclass
class Cpus:
    """Where the servers and the load run: with two or more cores, the server under test on the
    last one, dnsperf and the upstream on CPU 0; None for no pinning."""

    server: int | None
    load: int | None

    @property
    def pinned(self) -> bool:
        return self.server is not None


class Saturation:
    """The saturation part of the report: every method adds its section to `report`."""

    def __init__(self, args: argparse.Namespace, fleet: Fleet, cpus: Cpus,
                 emit: Callable[..., None]) -> None:
        self.args = args
        self.fleet = fleet
        self.workdir = fleet.workdir
        self.cpus = cpus
        self.emit = emit
        self.nonce = secrets.token_hex(3)
        self.load = Load(args.clients, args.outstanding, cpus.load)
        self.sequence = 0
        self.upstream_qps = 0.0

    def start(self, server: Server) -> Server:
        return self.fleet.start(server, f"ready.{ZONE}")

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
        """Every saturation section, in order."""
        a = self.args
        up_port = free_port()
        upstream = self.start(upstream_server(LOCALHOST, up_port, self.cpus.load))
        up = (LOCALHOST, up_port)

        self.describe()
        self.upstream_capacity(upstream)

        candidates = {
            "dnsproxy": lambda: dnsproxy_server("dnsproxy", free_port(), up, self.cpus.server),
            # the same without the compiled hit path: what it buys, in the same run
            "dnsproxy-python": lambda: dnsproxy_server("dnsproxy-python", free_port(), up,
                                                       self.cpus.server, ["--no-native"]),
            "dnsmasq": lambda: dnsmasq_server(free_port(), up, self.cpus.server, a.cache_size),
            "unbound": lambda: unbound_server(free_port(), up, self.cpus.server, self.workdir),
        }
        servers = [self.start(candidates[name]()) for name in a.servers]
        for server in servers:
            self.warm(server)
        rows = self.rounds(servers, [s.name for s in servers], ["hits", "misses"], upstream)
        memory = {s.name: s.memory() for s in servers}
        for server in servers:
            server.stop()

        reference = "dnsmasq" if "dnsmasq" in a.servers else None
        self.emit("### Forwarders side by side", "")
        self.emit(*throughput_table(rows, reference), "")
        self.emit("Peak memory (VmHWM, after all rounds): " + ", ".join(
            f"{name} {m['VmHWM'] / 1024:.1f} MB" for name, m in memory.items()) + ".", "")

        if "dnsproxy" in a.servers:
            self.cache_memory(up)
            self.defences(up)
        upstream.stop()
        if a.docker:
            self.docker()
        else:
            self.emit("### Appliance container", "", "Skipped (--no-docker).", "")

    def describe(self) -> None:
        a = self.args
        pin = (f"servers pinned to CPU {self.cpus.server}, dnsperf and the upstream to CPU "
               f"{self.cpus.load} (taskset)" if self.cpus.pinned else "no CPU pinning")
        self.emit(
            "## Saturation", "",
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
            "dnsproxy-100k", free_port(), up, self.cpus.server,
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
        self.emit(f"### dnsproxy with {a.cached_names:,} names cached", "",
                  "| cache entries | VmRSS at start | VmHWM | VmRSS | target |",
                  "|---:|---:|---:|---:|---|",
                  f"| {entries:,} | {idle['VmRSS'] / 1024:.1f} MB | {mem['VmHWM'] / 1024:.1f} MB "
                  f"| {mem['VmRSS'] / 1024:.1f} MB | <= 64 MB: {verdict} |", "")

    def defences(self, up: tuple[str, int]) -> None:
        """Latency probes only, twice as many rounds as the main part: the difference sought is
        small against the noise of a shared machine."""
        say("forgery defences on vs off (cache misses, latency probe)")
        on = self.start(dnsproxy_server("defences-on", free_port(), up, self.cpus.server))
        off = self.start(dnsproxy_server("defences-off", free_port(), up, self.cpus.server,
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
        self.emit("### Latency the forgery defences add (cache misses)", "",
                  f"dnsproxy with its defences (the default) against "
                  f"`{' '.join(DEFENCES_OFF)}`; latency probe of unique names at "
                  f"{self.args.probe_qps} queries/s, {2 * self.args.rounds} rounds alternating.",
                  "", *lines, "",
                  f"Added latency: p50 {d50:+.3f} ms, p99 {d99:+.3f} ms "
                  f"(target < 1 ms at p99: {verdict}).", "")

    # -- the container

    def docker(self) -> None:
        title = "### Appliance container: port mode against direct mode"
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
            upstream = self.start(upstream_server(gateway, up_port, self.cpus.load))
            upstream.name = "upstream-bridge"
            host_port = free_port()
            cpuset = [] if self.cpus.server is None else ["--cpuset-cpus", str(self.cpus.server)]
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
                      f"the bridge. The container is limited to CPU {self.cpus.server}; "
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
            for server in [s for s in self.fleet.servers if s.name == "upstream-bridge"]:
                server.stop()
            if made_network:
                subprocess.run(["docker", "network", "rm", name], capture_output=True)


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
