"""LAN_IP6 on real links: the host service applies the IPv6 plan in a "host" namespace.

    [client ns] fd60::10 --+
                           +-- lanbr fd60::254 [router ns] radvd: fd60::/64, default route, RDNSS
    [host ns] lan0 --------+
    [host ns] fd60::1 lan0, br0 fd53:99::1 --veth-- fd53:99::53 [appliance ns] DNS responder
    [host ns] wan0 2001:db8:77::1 --veth-- 2001:db8:77::10 [wan ns] a stranger

The router is a home router with its switch built in: a bridge whose ports are the host's LAN
interface and the client. The host takes its IPv6 default route from the router's
advertisements (accept_ra 1, as a Linux host has by default), as a dual-stack home LAN gives
one. With the plan in place the client asks LAN_IP6 (fd60::53, an address no interface holds)
on port 53, UDP and TCP; the responder, standing in for the container, sees the client's own
address; the client's neighbour table has the host's MAC for LAN_IP6 (proxy NDP); the host asks
LAN_IP6 too; another port reaches nothing; the stranger, routing the LAN's prefix and the
appliance's via the host, gets nothing. Forwarding is on for all of it, and yet the host keeps
its RA-learned default route: accept_ra goes to 2 first. The service's stop leaves ip6tables,
proxy entries, routes and every sysctl as they were.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import needs_root, netns_exec, normalize
from test_netsetup_backends import docker_like
from test_netsetup_service import Service

from netsetup import state
from netsetup.plan import HostFacts, IptablesBackend, Settings, parse_modes

pytestmark = pytest.mark.netns
PREFIX, HOST6, CLIENT6, ROUTER6 = "fd60::/64", "fd60::1", "fd60::10", "fd60::254"
LAN_IP6 = "fd60::53"
SUBNET6, GATEWAY6, DNS_IP6 = "fd53:99::/64", "fd53:99::1", "fd53:99::53"
WAN_HOST6, STRANGER6 = "2001:db8:77::1", "2001:db8:77::10"
# IPv4 is the plan's too (LAN_IP6 comes with LAN_IP): a LAN and a subnet of its own
LAN, HOST_LAN, LAN_IP = "198.18.62.0/24", "198.18.62.1", "198.18.62.53"
SUBNET, GATEWAY, DNS_IP = "172.31.98.0/24", "172.31.98.1", "172.31.98.53"
RESPONDER = str(Path(__file__).parent / "fake_upstream.py")
NAME, ANSWER = "www.example.test", "198.51.100.200"
SYSCTLS = ("net/ipv6/conf/all/forwarding", "net/ipv6/conf/lan0/forwarding",
           "net/ipv6/conf/lan0/accept_ra", "net/ipv6/conf/lan0/proxy_ndp",
           "net/ipv6/neigh/lan0/proxy_delay", "net/ipv4/ip_forward")  # fmt: skip
DEFAULT_LIFETIME = 6  # the router's: RAs ignored for longer than this lose the route
LISTEN = (
    "import socket, sys; s = socket.create_server(('::', 8080), family=socket.AF_INET6);"
    "print('ready', flush=True)\nwhile True: s.accept()[0].close()"
)


@dataclass
class Lan6:
    host: str
    client: str
    router: str
    appliance: str
    wan: str
    log: Path

    def dig(self, ns: str, server: str = LAN_IP6, tcp: bool = False, tries: int = 2) -> str:
        cmd = ["dig", f"@{server}", NAME, "A", "+short", "+time=2", f"+tries={tries}"]
        out = netns_exec(ns, *cmd, *(["+tcp"] if tcp else []), check=False).stdout
        return "\n".join(ln for ln in out.splitlines() if ln and not ln.startswith(";"))

    def clients(self) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [json.loads(line)["client"] for line in lines]

    def default_route(self) -> str:
        """The host's IPv6 default route, as the kernel lists it (empty: none)."""
        return netns_exec(self.host, "ip", "-6", "route", "show", "default").stdout.strip()

    def snapshot(self) -> tuple:
        """What the plan may change in the host namespace; a learned route's remaining lifetime
        is no change of ours, nor the kernel's own link-local routes (a new link's appear once
        its address passed DAD, which may be after the fixture is done)."""
        tables = normalize(netns_exec(self.host, "ip6tables-nft-save").stdout)
        proxies = netns_exec(self.host, "ip", "-6", "neigh", "show", "proxy").stdout
        listed = netns_exec(self.host, "ip", "-6", "route", "show", "table", "all").stdout
        routes = [re.sub(r" expires \d+sec", "", line) for line in listed.splitlines()
                  if not ("fe80::" in line and "proto kernel" in line)]  # fmt: skip
        sysctls = [netns_exec(self.host, "cat", f"/proc/sys/{k}").stdout for k in SYSCTLS]
        return tables, proxies, routes, sysctls


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def addr6(ns: str, address: str, dev: str) -> None:
    sh("ip", "-n", ns, "-6", "addr", "add", address, "dev", dev, "nodad")


def radvd(ns: str, directory: str) -> subprocess.Popen:
    """The router's advertisements: the prefix, itself as default router and DNS server."""
    conf = Path(directory) / "radvd.conf"
    conf.write_text(
        "interface lanbr {\n  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n  MaxRtrAdvInterval 4;\n"
        f"  AdvDefaultLifetime {DEFAULT_LIFETIME};\n  prefix {PREFIX} {{ AdvAutonomous off; }};\n"
        f"  RDNSS {ROUTER6} {{ }};\n}};\n"
    )
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, "radvd", "-n", "-C", str(conf),
         "-p", str(Path(directory) / "radvd.pid"), "-m", "stderr"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture
def lan6(tmp_path: Path) -> Iterator[Lan6]:
    needs_root()
    if shutil.which("radvd") is None:
        pytest.fail("radvd is not installed (apt-get install radvd)")
    tag = uuid.uuid4().hex[:6]
    net = Lan6(*(f"ns6{role}-{tag}" for role in "hcraw"), tmp_path / "responder.jsonl")  # type: ignore[call-arg]
    namespaces = (net.host, net.client, net.router, net.appliance, net.wan)
    procs: list[subprocess.Popen] = []
    radvd_dir = tempfile.mkdtemp(prefix="netsetup-radvd-")
    for ns in namespaces:
        sh("ip", "netns", "add", ns)
    try:
        h, c, r, a, w = namespaces
        # the router: a bridge for its LAN ports, forwarding as a router does
        sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        sh("ip", "-n", r, "link", "add", "lanbr", "type", "bridge")
        sh("ip", "-n", r, "link", "add", "p-host", "type", "veth", "peer", "name", "lan0",
           "netns", h)  # fmt: skip
        sh("ip", "-n", r, "link", "add", "p-client", "type", "veth", "peer", "name", "eth0",
           "netns", c)  # fmt: skip
        for port in ("p-host", "p-client"):
            sh("ip", "-n", r, "link", "set", port, "master", "lanbr")
        addr6(r, f"{ROUTER6}/64", "lanbr")
        # the host: takes advertisements (but no address from them: its own is fixed)
        for key, value in (("accept_ra", "1"), ("autoconf", "0"), ("forwarding", "0")):
            sh("ip", "netns", "exec", h, "sysctl", "-qw", f"net.ipv6.conf.default.{key}={value}")
            sh("ip", "netns", "exec", h, "sysctl", "-qw", f"net.ipv6.conf.all.{key}={value}")
        sh("ip", "netns", "exec", c, "sysctl", "-qw", "net.ipv6.conf.all.accept_ra=0")
        sh("ip", "netns", "exec", c, "sysctl", "-qw", "net.ipv6.conf.default.accept_ra=0")
        sh("ip", "-n", h, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", h, "link", "add", "vapp", "type", "veth", "peer", "name", "eth0",
           "netns", a)  # fmt: skip
        sh("ip", "-n", h, "link", "set", "vapp", "master", "br0")
        sh("ip", "-n", h, "link", "add", "wan0", "type", "veth", "peer", "name", "eth0",
           "netns", w)  # fmt: skip
        addr6(h, f"{HOST6}/64", "lan0")
        addr6(h, f"{GATEWAY6}/64", "br0")
        addr6(h, f"{WAN_HOST6}/64", "wan0")
        sh("ip", "-n", h, "addr", "add", f"{HOST_LAN}/24", "dev", "lan0")
        sh("ip", "-n", h, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
        addr6(c, f"{CLIENT6}/64", "eth0")
        addr6(a, f"{DNS_IP6}/64", "eth0")
        sh("ip", "-n", a, "addr", "add", f"{DNS_IP}/24", "dev", "eth0")
        addr6(w, f"{STRANGER6}/64", "eth0")
        for ns, links in ((r, ("lo", "lanbr", "p-host", "p-client")), (c, ("lo", "eth0")),
                          (h, ("lo", "lan0", "br0", "vapp", "wan0")), (a, ("lo", "eth0")),
                          (w, ("lo", "eth0"))):  # fmt: skip
            for link in links:
                sh("ip", "-n", ns, "link", "set", link, "up")
        sh("ip", "-n", a, "-6", "route", "add", "default", "via", GATEWAY6)
        sh("ip", "-n", a, "route", "add", "default", "via", GATEWAY)
        # the stranger routes the LAN's prefix and the appliance's via the host
        for prefix in (PREFIX, SUBNET6):
            sh("ip", "-n", w, "-6", "route", "add", prefix, "via", WAN_HOST6)
        docker_like(h, "nft")
        netns_exec(h, "iptables-nft", "-A", "FORWARD", "-i", "br0", "!", "-o", "br0",
                   "-j", "ACCEPT")  # fmt: skip
        procs.append(radvd(r, radvd_dir))
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", a, sys.executable, RESPONDER, DNS_IP6, "53", str(net.log)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        ))  # fmt: skip
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", a, sys.executable, "-c", LISTEN],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        ))  # fmt: skip
        for proc in procs[1:]:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 15
        while "proto ra" not in net.default_route() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "proto ra" in net.default_route(), "the router's advertisement was not heard"
        yield net
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(radvd_dir, ignore_errors=True)
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def ra_interfaces(ns: str) -> list[str]:
    code = "from netsetup.detect import ra_interfaces; print(*ra_interfaces('lan0'))"
    return netns_exec(ns, sys.executable, "-c", code).stdout.split()


def deployment(ra_taking: tuple[str, ...]) -> state.Deployment:
    settings = Settings(
        modes=parse_modes("lan"), lan_ip=LAN_IP, lan_cidr=LAN, lan_ip6=LAN_IP6,
        lan_cidr6=PREFIX, subnet6=SUBNET6, ip6=DNS_IP6, upstreams=("198.51.100.53",),
        subnet=SUBNET, ip=DNS_IP, project="dnsapp",
    )  # fmt: skip
    facts = HostFacts(
        engine_version="20.10.24", engine_firewall="iptables", iptables=IptablesBackend.nft,
        bridge="br0", lan_interface="lan0", lan_cidr=LAN, lan_address=HOST_LAN,
        ra_interfaces=ra_taking,
    )  # fmt: skip
    return state.Deployment.of(settings, facts, "nft", "")


@pytest.fixture
def own_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETSETUP_STATE_DIR", str(tmp_path / "lib"))
    monkeypatch.setenv("NETSETUP_RUN_DIR", str(tmp_path / "run"))


def tcp_connects(ns: str, address: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=2)"
    return netns_exec(ns, sys.executable, "-c", code, check=False).returncode == 0


def check_lan_ip6(ns: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from netsetup import detect; from netsetup.errors import NetsetupError\n"
        f"try: detect.check_lan_ip6({LAN_IP6!r}, {PREFIX!r}, 'lan0')\n"
        "except NetsetupError as exc: sys.exit(f'refused: {exc}')"
    )
    return netns_exec(ns, sys.executable, "-c", code, check=False)


def test_lan_ip6_serves_the_lan_keeps_the_host_s_route_and_goes_away(
    lan6: Lan6, own_state: None
) -> None:
    before = lan6.snapshot()
    learned = lan6.default_route()
    assert lan6.dig(lan6.client, tries=1) == ""  # nothing answers on LAN_IP6 without the plan
    assert tcp_connects(lan6.host, DNS_IP6, 8080)  # the appliance's other port is open
    assert ra_interfaces(lan6.host) == ["lan0"]
    state.save("dnsapp", deployment(("lan0",)))
    service = Service(lan6.host)
    try:
        service.wait(lambda r: r["complete"])
        applied = time.monotonic()
        # forwarding is on, and the default route the router advertised is still there
        assert netns_exec(lan6.host, "cat", f"/proc/sys/{SYSCTLS[1]}").stdout.strip() == "1"
        assert "proto ra" in lan6.default_route(), "forwarding cost the host its default route"

        assert lan6.dig(lan6.client) == ANSWER
        assert lan6.dig(lan6.client, tcp=True) == ANSWER
        assert set(lan6.clients()) == {CLIENT6}, "the appliance must see the client's address"
        host_mac = netns_exec(lan6.host, "cat", "/sys/class/net/lan0/address").stdout.strip()
        neigh = netns_exec(lan6.client, "ip", "-6", "neigh", "show", LAN_IP6).stdout
        assert f"lladdr {host_mac}" in neigh, neigh
        assert lan6.dig(lan6.host) == ANSWER  # the host asks LAN_IP6 itself (nat OUTPUT)
        assert not tcp_connects(lan6.client, LAN_IP6, 8080), "only DNS is exposed on LAN_IP6"
        # the stranger gets nothing, by LAN_IP6 or by the appliance's own address
        for server in (LAN_IP6, DNS_IP6):
            assert lan6.dig(lan6.wan, server, tries=1) == ""
            assert lan6.dig(lan6.wan, server, tcp=True, tries=1) == ""
        assert set(lan6.clients()) == {CLIENT6, GATEWAY6}, lan6.clients()
        # a repeated `up` checks LAN_IP6 again: the host's own proxy entry is no other device
        proc = check_lan_ip6(lan6.host)
        assert proc.returncode == 0, proc.stderr

        netns_exec(lan6.host, "ip", "-6", "neigh", "del", "proxy", LAN_IP6, "dev", "lan0")
        report = service.wait(lambda r: r["repairs"] >= 1 and r["complete"])
        assert any("proxy" in what for what in report["last_repair"]["what"]), report
        netns_exec(lan6.client, "ip", "-6", "neigh", "flush", "dev", "eth0")
        assert lan6.dig(lan6.client) == ANSWER

        # advertisements are still taken: the route outlives its lifetime, renewed
        time.sleep(max(0.0, applied + DEFAULT_LIFETIME + 2 - time.monotonic()))
        assert "proto ra" in lan6.default_route(), "the host stopped taking advertisements"
    finally:
        code, out = service.stop()
    assert code == 0, out
    after = lan6.snapshot()
    for what, was, now in zip(("ip6tables", "proxy entries", "routes", "sysctls"), before,
                              after, strict=True):  # fmt: skip
        assert now == was, f"{what} differ after stop"
    assert lan6.default_route().split(" expires")[0] == learned.split(" expires")[0]
    assert lan6.dig(lan6.client) == ""


def test_a_lan_ip6_a_device_holds_is_refused(lan6: Lan6) -> None:
    """The duplicate address probe finds the client's address; a free one passes."""
    code = (
        "import sys; from netsetup import detect; from netsetup.errors import NetsetupError\n"
        f"try: detect.check_lan_ip6(sys.argv[1], {PREFIX!r}, 'lan0')\n"
        "except NetsetupError as exc: sys.exit(f'refused: {exc}')"
    )
    proc = netns_exec(lan6.host, sys.executable, "-c", code, CLIENT6, check=False)
    assert proc.returncode == 1 and "in use on lan0" in proc.stderr, proc.stderr
    assert check_lan_ip6(lan6.host).returncode == 0
