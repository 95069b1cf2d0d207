"""The processes a benchmark runs: the forwarders under test and the upstreams, and when each is
ready. Also the small /proc readings (memory, CPU) the reports are made of.

Every server is a `Server`: an argv, an address, optional hooks around a restart (unbound's
cache dump and load). A `Fleet` keeps every server started, so one `stop_all()` in a `finally`
stops them all whatever failed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZONE = "bench.test"
ANSWER = "192.0.2.1"  # documentation range: nothing real lives there
LOCALHOST = "127.0.0.1"
DNSPROXY_FLAGS = ["--rate-limit", "0", "--no-query-log"]
DEFENCES_OFF = ["--no-edns-marker", "--no-forged-addresses", "--no-hijack-threshold"]


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Ports, readiness, /proc


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


def self_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
    # What survives a restart, in words for the report, and the hooks that make it survive.
    persistence: str = "none"
    before_stop: Callable[[], None] | None = None
    after_start: Callable[[], None] | None = None
    cpu_spent: float = 0.0  # CPU seconds of earlier processes of this server (restarts)

    def start(self, workdir: Path, probe: str, seconds: float = 15.0) -> None:
        argv = (["taskset", "-c", str(self.cpu)] if self.cpu is not None else []) + self.argv
        self.log = workdir / f"{self.name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd)
        self.pid = self.proc.pid  # taskset execs the command: same PID
        wait_ready(self, probe, seconds)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.cpu_spent += cpu_seconds(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        # Popen.wait(timeout) polls with a back-off up to 50 ms: a server that takes 40 ms to
        # stop (saving its cache while it still answers) would be seen gone up to 25 ms late,
        # and that would count as its downtime in the restart table. Poll every millisecond.
        deadline = time.monotonic() + 5
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                break
            time.sleep(0.001)

    def restart(self, workdir: Path, probe: str) -> tuple[float, float]:
        """Stop and start again on the same port, with the server's own way of keeping its
        cache (if any) around the gap. Returns (time.time() when it stopped answering, when it
        answered again, its cache restored)."""
        if self.before_stop:
            self.before_stop()
        stopped = time.time()
        self.stop()
        self.start(workdir, probe)
        if self.after_start:
            self.after_start()
        return stopped, time.time()

    def cpu_total(self) -> float:
        """CPU seconds of every process this server has run so far."""
        live = 0.0
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                live = cpu_seconds(self.proc.pid)
        return self.cpu_spent + live

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
        time.sleep(0.05)
    raise BenchError(f"{server.name} does not answer on {server.host}:{server.port}")


class Fleet:
    """Every server started in a run, so that all are stopped, in reverse order, at the end."""

    def __init__(self, workdir: Path, probe: str = f"ready.{ZONE}") -> None:
        self.workdir = workdir
        self.probe = probe
        self.servers: list[Server] = []

    def start(self, server: Server, probe: str | None = None,
              workdir: Path | None = None) -> Server:
        say(f"starting {server.name} on {server.host}:{server.port}")
        self.servers.append(server)
        server.start(workdir or self.workdir, probe or self.probe)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()


def _drop_root() -> list[str]:
    return ["--user=nobody", "--group=nogroup"] if os.geteuid() == 0 else []


def upstream_server(host: str, port: int, cpu: int | None) -> Server:
    """dnsmasq answering every name under the zone from its configuration, forwarding nothing."""
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={host}",
            f"--port={port}", f"--address=/{ZONE}/{ANSWER}", "--local-ttl=3600",
            "--cache-size=0", "--pid-file=", "--log-facility=-", *_drop_root()]
    return Server("upstream", argv, host, port, cpu)


def authority_server(host: str, ports: list[int], base: float, log: Path, cpu: int | None,
                     wrap: Callable[[list[str]], list[str]], delay_ms: float = 0.0) -> Server:
    """The household upstream (bench/authority.py), started through `wrap` (the namespace).
    Pinned by taskset inside the namespace: `ip netns exec` must come first. `delay_ms`: the
    upstream holds its replies itself (where netem is missing)."""
    argv = [sys.executable, str(ROOT / "bench" / "authority.py"), "--listen", host,
            "--ports", ",".join(map(str, ports)), "--base", repr(base), "--log", str(log),
            "--delay-ms", f"{delay_ms:g}"]
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return Server("authority", wrap(pin + argv), host, ports[0], None)


def dnsmasq_server(port: int, upstream: tuple[str, int], cpu: int | None,
                   cache_size: int, stale: bool = False) -> Server:
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={LOCALHOST}",
            f"--port={port}", f"--server={upstream[0]}#{upstream[1]}",
            f"--cache-size={cache_size}", "--dns-forward-max=1000", "--pid-file=",
            "--log-facility=-", *_drop_root()]
    if stale:
        argv.append("--use-stale-cache")
    return Server("dnsmasq", argv, LOCALHOST, port, cpu,
                  persistence="none (the cache lives in memory only)")


def dnsmasq_has_stale_cache() -> bool:
    """--use-stale-cache came with dnsmasq 2.90."""
    done = subprocess.run(["dnsmasq", "--help"], capture_output=True, text=True)
    return "--use-stale-cache" in done.stdout


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
    prefetch: {household}
    serve-expired: {household}
    minimal-responses: yes
    access-control: 127.0.0.0/8 allow
    local-zone: "test." nodefault
    msg-cache-size: {msg_cache}m
    rrset-cache-size: {rrset_cache}m
remote-control:
    control-enable: {control}
    control-interface: {control_socket}
    control-use-cert: no
forward-zone:
    name: "."
    forward-addr: {up_host}@{up_port}
"""


def unbound_server(port: int, upstream: tuple[str, int], cpu: int | None,
                   workdir: Path, household: bool = False) -> Server:
    """unbound as a forwarder. With `household`: prefetch and serve-expired on, and a control
    socket, through which its cache is dumped before a restart and loaded after: the persistence
    unbound offers (`unbound-control dump_cache` / `load_cache`)."""
    conf = workdir / ("unbound-household.conf" if household else "unbound.conf")
    control = workdir / "unbound.ctl"
    conf.write_text(UNBOUND_CONF.format(
        host=LOCALHOST, port=port, workdir=workdir, up_host=upstream[0], up_port=upstream[1],
        msg_cache=4, rrset_cache=8, household="yes" if household else "no",
        control="yes" if household else "no", control_socket=control))
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"unbound config rejected: {check.stdout}{check.stderr}")
    server = Server("unbound", ["unbound", "-d", "-c", str(conf)], LOCALHOST, port, cpu)
    if household:
        dump = workdir / "unbound.cache"

        def dump_cache() -> None:
            with open(dump, "wb") as out:
                subprocess.run(["unbound-control", "-c", str(conf), "dump_cache"], stdout=out,
                               stderr=subprocess.DEVNULL, timeout=30, check=True)

        def load_cache() -> None:
            with open(dump, "rb") as source:
                subprocess.run(["unbound-control", "-c", str(conf), "load_cache"], stdin=source,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                               check=True)

        server.persistence = "unbound-control dump_cache before the stop, load_cache after"
        server.before_stop, server.after_start = dump_cache, load_cache
    return server


def dnsproxy_launcher() -> Path | None:
    """`dnsproxy-bind`, which `make native` puts beside the virtualenv's python: the image
    starts the forwarder through it (its listen sockets bound before Python starts), and so
    does the bench, when it is built."""
    launcher = Path(sys.executable).parent / "dnsproxy-bind"
    return launcher if launcher.is_file() else None


def dnsproxy_server(name: str, port: int, upstream: tuple[str, int], cpu: int | None,
                    extra: list[str] = ()) -> Server:
    listen = f"{LOCALHOST}:{port}"
    launcher = dnsproxy_launcher()
    argv = [*([str(launcher), "--listen", listen] if launcher else []),
            sys.executable, "-m", "dnsproxy", "--listen", listen,
            "--upstream", f"{upstream[0]}:{upstream[1]}", *DNSPROXY_FLAGS,
            "--log-level", "warning", *extra]
    server = Server(name, argv, LOCALHOST, port, cpu, cwd=ROOT)
    if "--state-dir" in extra:
        server.persistence = "its cache file under --state-dir (written on SIGTERM, read at start)"
    return server


SMARTDNS_CONF = """\
bind {host}:{port}
server {up_host}:{up_port}
cache-size {cache_size}
prefetch-domain yes
serve-expired yes
# keep the upstream's TTLs: without this, smartdns 40 answered a 3 s record with TTL 600 here
# and never asked again, which no other server does
rr-ttl-min 1
cache-persist yes
cache-file {cache_file}
# no pings or TCP probes to the answers' addresses, no AAAA race: forward and cache only
speed-check-mode none
dualstack-ip-selection no
log-level warn
"""


def smartdns_server(port: int, upstream: tuple[str, int], cpu: int | None, workdir: Path,
                    cache_size: int) -> Server:
    """smartdns (Debian's package) in the foreground with a config of our own, never the system
    service: prefetch-domain and serve-expired on, its cache file (cache-persist) in `workdir`,
    speed checks off (they would probe the answers' addresses)."""
    conf = workdir / "smartdns.conf"
    conf.write_text(SMARTDNS_CONF.format(host=LOCALHOST, port=port, up_host=upstream[0],
                                         up_port=upstream[1], cache_size=cache_size,
                                         cache_file=workdir / "smartdns.cache"))
    return Server("smartdns", ["smartdns", "-f", "-x", "-c", str(conf), "-p", "-"], LOCALHOST,
                  port, cpu, persistence="cache-persist: its cache file, written on exit, read "
                  "at start")


def installed(command: str) -> bool:
    return shutil.which(command) is not None
