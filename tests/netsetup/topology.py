"""The end-to-end topology: a LAN client and an "internet" resolver in namespaces of their own.

    [lan ns] client 198.19.53.10 --veth-- 198.19.53.1 [engine's netns] 198.51.100.1 --veth--
    198.51.100.53 [inet ns] fake authoritative server
                                           [engine's netns] 203.0.113.1 --veth--
    203.0.113.10 [wan ns] a stranger on the host's internet side

The stranger routes the appliance subnet via the host, as a hostile neighbour on the WAN could:
whatever it reaches there (no answer must come back) is exposed to the internet.

With `switch`, the LAN is a Linux bridge in a namespace of its own (a "switch") with three ports:
the host's LAN interface, the client above, and a second client (198.19.53.11) that knows no
route but its own subnet, as a phone on a home LAN; it can also hold an address (`hold`), as a
device already using it would. With `router` too, a fourth port is the LAN's router
(198.19.53.254) running a resolver of its own, as a home router does: it knows no route to the
appliance subnet unless `route_on_router` adds the one direct mode asks the user for. It
answers what the "internet" resolver does, or with `router_zone` only the names under
ROUTER_ZONE, with ROUTER_ANSWER, and REFUSED for the rest (fake_upstream.py); and, as a home
router knows its DHCP clients, PRINTER_NAME (A PRINTER) and PRINTER's reverse name. With
`ipv6_router` as well, the router also runs radvd (Debian's), advertising an IPv6 prefix, a DNS
server of its own (RDNSS) and the O flag, as a dual-stack home router does; the host and the
clients have fixed addresses on that prefix, and the stranger an IPv6 one, routing the prefix
and `subnet6` via the host. With `host_takes_ra` the host's LAN interface takes its IPv6 default
route from the router's advertisements; never in this host's own namespace, whose routes are
the machine's.

The engine's netns is the host's (pid None) or a nested engine's (the pid of its dockerd). The
client routes the appliance subnet via the host, as the LAN's router would; the resolver has
only its connected route, so it cannot reach the appliance subnet: answers reach the appliance
only if the host masquerades its queries. 192.0.2.0/24 is avoided because hosts here may use it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# The LAN is deliberately not in a private range (198.18.0.0/15, set aside for tests): offices
# do number LANs that way, and the forwarder serves only private clients unless netsetup tells
# it the LAN. Answers here prove it does.
LAN_NET, LAN_HOST, LAN_CLIENT = "198.19.53.0/24", "198.19.53.1", "198.19.53.10"
LAN_CLIENT2 = "198.19.53.11"
ROUTER = "198.19.53.254"  # the LAN's router, also a resolver (with `router`)
ROUTER_ZONE, ROUTER_ANSWER = "home.example.test.", "198.51.100.254"  # with `router_zone`
# With `ipv6_router`: the LAN's IPv6 prefix (the router's RDNSS is its own address there), the
# host's and the clients' fixed addresses on it, the stranger's and the host's WAN side
ROUTER_PREFIX, ROUTER_RDNSS = "fd53:19::/64", "fd53:19::1"
LAN_HOST6, LAN_CLIENT6, LAN_CLIENT2_6 = "fd53:19::2", "fd53:19::10", "fd53:19::11"
WAN_HOST6, WAN_CLIENT6 = "2001:db8:53::1", "2001:db8:53::10"
PRINTER_NAME, PRINTER = "printer.lan", "198.19.53.20"  # a device the router names (with `router`)
INET_HOST, INET_RESOLVER = "198.51.100.1", "198.51.100.53"
INET_HOST6, INET_RESOLVER6 = "2001:db8:51::1", "2001:db8:51::53"  # with `inet6`
WAN_HOST, WAN_CLIENT = "203.0.113.1", "203.0.113.10"
FAKE_UPSTREAM = str(Path(__file__).parent / "fake_upstream.py")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@dataclass
class Topology:
    subnet: str
    pid: int | None = None  # netns of the engine; None for this host's
    switch: bool = False  # the LAN as a bridge with two clients (see above)
    router: bool = False  # and a router with a resolver on it (needs `switch`)
    router_zone: bool = False  # which serves ROUTER_ZONE only (see above)
    ipv6_router: bool = False  # and advertises IPv6 with radvd (see above; needs `router`)
    host_takes_ra: bool = False  # the host learns its default route from it (needs a `pid`)
    subnet6: str = "fd53:53::/64"  # the appliance's IPv6 subnet, which the stranger routes
    inet6: bool = False  # the "internet" resolver answers on INET_RESOLVER6, over IPv6 only
    radvd: subprocess.Popen | None = None
    radvd_dir: str = ""
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    upstream_proc: subprocess.Popen | None = None
    upstream_log: str = ""
    router_proc: subprocess.Popen | None = None
    router_log: str = ""

    @property
    def lan_ns(self) -> str:
        return f"nslan-{self.tag}"

    @property
    def inet_ns(self) -> str:
        return f"nsinet-{self.tag}"

    @property
    def wan_ns(self) -> str:
        return f"nswan-{self.tag}"

    @property
    def switch_ns(self) -> str:
        return f"nssw-{self.tag}"

    @property
    def lan2_ns(self) -> str:
        return f"nslan2-{self.tag}"

    @property
    def router_ns(self) -> str:
        return f"nsrt-{self.tag}"

    @property
    def namespaces(self) -> tuple[str, ...]:
        extra = (self.switch_ns, self.lan2_ns) if self.switch else ()
        extra += (self.router_ns,) if self.router else ()
        return (self.lan_ns, self.inet_ns, self.wan_ns, *extra)

    @property
    def wan_if(self) -> str:
        return f"vw{self.tag}"

    @property
    def lan_if(self) -> str:
        return f"vl{self.tag}"

    @property
    def inet_if(self) -> str:
        return f"vi{self.tag}"

    def in_engine_ns(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", *cmd] if self.pid else list(cmd)

    def engine_sh(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh(*self.in_engine_ns(*cmd), check=check)

    def _pair(self, host_if: str, ns: str, host_addr: str, ns_addr: str) -> None:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", host_if + "p")
        sh("ip", "link", "set", host_if + "p", "netns", ns)
        if self.pid:
            sh("ip", "link", "set", host_if, "netns", str(self.pid))
        self.engine_sh("ip", "addr", "add", f"{host_addr}/24", "dev", host_if)
        self.engine_sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", host_if + "p", "name", "eth0")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_addr}/24", "dev", "eth0")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")

    def _switch_port(self, ns: str, port: str, addr: str) -> None:
        """A client `ns` with `addr` on eth0, plugged into the switch's bridge as `port`."""
        sh("ip", "-n", self.switch_ns, "link", "add", port, "type", "veth", "peer", "name",
           "eth0", "netns", ns)  # fmt: skip
        sh("ip", "-n", self.switch_ns, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        for link in ("lo", "eth0"):
            sh("ip", "-n", ns, "link", "set", link, "up")

    def _switched_lan(self) -> None:
        sh("ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch_ns, "link", "set", "br0", "up")
        # the host's LAN interface: its peer is the switch's uplink port
        sh("ip", "link", "add", self.lan_if, "type", "veth", "peer", "name", "uplink",
           "netns", self.switch_ns)  # fmt: skip
        sh("ip", "-n", self.switch_ns, "link", "set", "uplink", "master", "br0", "up")
        if self.pid:
            sh("ip", "link", "set", self.lan_if, "netns", str(self.pid))
        self.engine_sh("ip", "addr", "add", f"{LAN_HOST}/24", "dev", self.lan_if)
        self.engine_sh("ip", "link", "set", self.lan_if, "up")
        self._switch_port(self.lan_ns, "port1", LAN_CLIENT)
        self._switch_port(self.lan2_ns, "port2", LAN_CLIENT2)
        if self.router:
            self._switch_port(self.router_ns, "port3", ROUTER)
            if self.ipv6_router:
                self._ipv6_router()

    def _ipv6_router(self) -> None:
        """radvd on the router, advertising an IPv6 prefix, a DNS server of its own (RDNSS) and
        the O flag, as a dual-stack home router does. The host's LAN interface hears it (the
        survey's raw socket does); it takes no address from it (autoconf 0: its own is fixed),
        and its default route only with `host_takes_ra` (accept_ra 1, a Linux host's default);
        else accept_ra 0 keeps the host's routes as they were."""
        assert self.pid or not self.host_takes_ra, "the machine's own routes are not the test's"
        self.engine_sh("sysctl", "-qw", f"net.ipv6.conf.{self.lan_if}.autoconf=0")
        self.engine_sh("sysctl", "-qw",
                       f"net.ipv6.conf.{self.lan_if}.accept_ra={int(self.host_takes_ra)}")
        self.engine_sh("ip", "-6", "addr", "add", f"{LAN_HOST6}/64", "dev", self.lan_if, "nodad")
        for ns, address in ((self.lan_ns, LAN_CLIENT6), (self.lan2_ns, LAN_CLIENT2_6),
                            (self.router_ns, ROUTER_RDNSS)):  # fmt: skip
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=0")
            sh("ip", "-n", ns, "-6", "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
        ns = self.router_ns
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.radvd_dir = tempfile.mkdtemp(prefix="netsetup-radvd-")
        conf = Path(self.radvd_dir) / "radvd.conf"
        conf.write_text(
            "interface eth0 {\n  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n"
            "  MaxRtrAdvInterval 4;\n  AdvOtherConfigFlag on;\n"
            f"  prefix {ROUTER_PREFIX} {{ }};\n  RDNSS {ROUTER_RDNSS} {{ }};\n}};\n"
        )
        self.radvd = subprocess.Popen(
            ["ip", "netns", "exec", ns, "radvd", "-n", "-C", str(conf),
             "-p", str(Path(self.radvd_dir) / "radvd.pid"), "-m", "stderr"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def router_address(self) -> str:
        """The router's IPv6 link-local address, the source of its advertisements."""
        out = sh("ip", "-n", self.router_ns, "-6", "-o", "addr", "show", "dev", "eth0",
                 "scope", "link").stdout  # fmt: skip
        return out.split()[3].split("/")[0]

    def route_on_router(self, present: bool = True) -> None:
        """The route direct mode asks the user to add on the LAN's router: SUBNET via the host
        (or, not `present`, taken away)."""
        sh("ip", "-n", self.router_ns, "route", "add" if present else "del", self.subnet, "via",
           LAN_HOST)  # fmt: skip

    def hold(self, address: str) -> None:
        """The second client takes `address` too, as a device already using it."""
        sh("ip", "-n", self.lan2_ns, "addr", "add", f"{address}/24", "dev", "eth0")

    def release(self, address: str) -> None:
        sh("ip", "-n", self.lan2_ns, "addr", "del", f"{address}/24", "dev", "eth0")

    def create(self) -> None:
        """Everything above; a step that fails takes down what the earlier ones made, so a test
        that could not set up leaves no namespace, link or process behind."""
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise

    def _create(self) -> None:
        for ns in self.namespaces:
            sh("ip", "netns", "add", ns)
        if self.switch:
            self._switched_lan()
        else:
            self._pair(self.lan_if, self.lan_ns, LAN_HOST, LAN_CLIENT)
        self._pair(self.inet_if, self.inet_ns, INET_HOST, INET_RESOLVER)
        self._pair(self.wan_if, self.wan_ns, WAN_HOST, WAN_CLIENT)
        if self.ipv6_router:  # the stranger over IPv6 too
            self.engine_sh("ip", "-6", "addr", "add", f"{WAN_HOST6}/64", "dev", self.wan_if,
                           "nodad")  # fmt: skip
            sh("ip", "-n", self.wan_ns, "-6", "addr", "add", f"{WAN_CLIENT6}/64", "dev", "eth0",
               "nodad")  # fmt: skip
            for prefix in (ROUTER_PREFIX, self.subnet6):
                sh("ip", "-n", self.wan_ns, "-6", "route", "add", prefix, "via", WAN_HOST6)
        # the LAN's router would route the appliance subnet to the host; the client does it here
        sh("ip", "netns", "exec", self.lan_ns, "ip", "route", "add", self.subnet, "via", LAN_HOST)
        sh("ip", "netns", "exec", self.wan_ns, "ip", "route", "add", self.subnet, "via", WAN_HOST)
        # and the LAN too: the host's LAN address is reachable from its WAN side (Linux answers
        # for any of its addresses on any interface) unless a rule says otherwise
        sh("ip", "netns", "exec", self.wan_ns, "ip", "route", "add", LAN_NET, "via", WAN_HOST)
        if self.inet6:  # it knows its own prefix only, as on IPv4
            self.engine_sh("ip", "-6", "addr", "add", f"{INET_HOST6}/64", "dev", self.inet_if,
                           "nodad")  # fmt: skip
            sh("ip", "-n", self.inet_ns, "-6", "addr", "add", f"{INET_RESOLVER6}/64", "dev",
               "eth0", "nodad")  # fmt: skip
        self.upstream_proc, self.upstream_log = resolver(
            self.inet_ns, INET_RESOLVER6 if self.inet6 else INET_RESOLVER)
        if self.router:
            zone = (ROUTER_ZONE, ROUTER_ANSWER) if self.router_zone else ()
            self.router_proc, self.router_log = resolver(self.router_ns, ROUTER, *zone,
                                                         hosts={PRINTER_NAME: PRINTER})

    def destroy(self) -> None:
        if self.radvd is not None:
            self.radvd.terminate()
            try:
                self.radvd.wait(5)
            except subprocess.TimeoutExpired:
                self.radvd.kill()
            shutil.rmtree(self.radvd_dir, ignore_errors=True)
        for proc in (self.upstream_proc, self.router_proc):
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for ifname in (self.lan_if, self.inet_if, self.wan_if):
            self.engine_sh("ip", "link", "del", ifname, check=False)
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
        for log in (self.upstream_log, self.router_log):
            if log:
                Path(log).unlink(missing_ok=True)

    def dig(self, server: str, name: str, port: int = 53, tcp: bool = False,
            ns: str | None = None, qtype: str = "A") -> str:  # fmt: skip
        """Answers only (dig +short) from the client, or from namespace `ns`; qtype PTR asks
        the reverse name of the address `name` (dig -x)."""
        question = ["-x", name] if qtype == "PTR" else [name, qtype]
        cmd = ["ip", "netns", "exec", ns or self.lan_ns, "dig", f"@{server}", "-p", str(port),
               *question, "+short", "+time=2", "+tries=3"]  # fmt: skip
        if tcp:
            cmd.append("+tcp")
        out = sh(*cmd, check=False).stdout
        # +short still prints errors (";; communications error ..."): keep only answers
        return "\n".join(ln for ln in out.splitlines() if ln and not ln.startswith(";")).strip()

    def dig_full(self, ns: str, server: str, name: str, port: int = 53, tcp: bool = False,
                 seconds: int = 2) -> str:  # fmt: skip
        """dig's whole output from namespace `ns`, one try of `seconds`: a status line if
        anything answered."""
        cmd = ["ip", "netns", "exec", ns, "dig", f"@{server}", "-p", str(port), name, "A",
               f"+time={seconds}", "+tries=1", "+retry=0"]  # fmt: skip
        if tcp:
            cmd.append("+tcp")
        return sh(*cmd, check=False).stdout

    def tcp_connects(self, ns: str, server: str, port: int) -> bool:
        """Whether a TCP connection from `ns` to server:port is accepted within 2 s."""
        code = f"import socket; socket.create_connection(({server!r}, {port}), timeout=2)"
        proc = sh("ip", "netns", "exec", ns, sys.executable, "-c", code, check=False)
        return proc.returncode == 0

    def upstream_clients(self) -> list[str]:
        return [client for client, _ in queries_in(self.upstream_log)]

    def names_asked(self, of_router: bool = False) -> set[str]:
        """The names the internet resolver (or the router's) was asked, lower-cased."""
        log = self.router_log if of_router else self.upstream_log
        return {name.lower() for _, name in queries_in(log)}

    def router_clients(self, name: str | None = None) -> set[str]:
        """The addresses the router's resolver was asked `name` (any name: None) from."""
        return {client for client, asked in queries_in(self.router_log)
                if name is None or asked.lower() == name.lower()}  # fmt: skip

    def wait_dig(self, server: str, name: str, port: int = 53, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            out = self.dig(server, name, port)
            if out:
                return out
            time.sleep(1)
        return out


def resolver(ns: str, address: str, *zone: str,
             hosts: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:  # fmt: skip
    """The fake resolver (fake_upstream.py) on address:53 in namespace `ns`, and its query log;
    `zone`: the zone and the answer it serves alone; `hosts`: devices it names (A and PTR)."""
    fd, log = tempfile.mkstemp(prefix="netsetup-upstream-", suffix=".jsonl")
    os.close(fd)
    devices = [arg for name, ip in (hosts or {}).items() for arg in ("--host", f"{name}={ip}")]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, FAKE_UPSTREAM, address, "53", log,
         *devices, *zone],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc, log


def queries_in(log: str) -> list[tuple[str, str]]:
    """(client address, name) of each query a fake resolver logged."""
    records = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    return [(r["client"], r["name"]) for r in records]
