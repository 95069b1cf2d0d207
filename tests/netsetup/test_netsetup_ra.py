"""The routers' IPv6 DNS servers, heard on a real switched LAN.

    [router ns] eth0 --+                 radvd (Debian's), or crafted advertisements
                       [switch ns] br0
    [host ns] lan0 ----+                 the host tool's survey (netsetup.ra) runs here

The router runs radvd with a prefix and, per test, an RDNSS of its own and the O flag; the host
side sends its router solicitation and must report the router's link-local address and every
advertised server but the appliance's own, whether its forwarding is off or on (on, Linux
ignores advertisements for its own configuration; the raw socket still hears them). A router
that advertises no server gives no warning; malformed advertisements cost no traceback and
teach nothing; no router, or no link-local address, is one quiet line. `netsetup check` prints
the line and records it, and `netsetup routes` then names the router. radvd is stopped by its
PID and the namespaces are deleted whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import needs_root, netns_exec

pytestmark = pytest.mark.netns
PREFIX, RDNSS, OWN = "fd53:19::/64", "fd53:19::1", "fd53:19::53"
DHCPV6_DNS = "fd53:19::2"
HOST_ADDR = "198.18.19.2"
NETSETUP = str(Path(sys.executable).with_name("netsetup"))
SURVEY = (
    "import json, sys; from netsetup import ra; own = frozenset(sys.argv[2:]); "
    "s = ra.listen(sys.argv[1]); "
    "print(json.dumps({'survey': s.as_dict(), 'warnings': ra.warnings(s, own), "
    "'summary': ra.summary(s, own)}))"
)
# Crafted advertisements from the router's link-local address to all nodes (hop limit 255, the
# kernel fills the checksum): broken ones naming BAD first, then one good one naming RDNSS.
CRAFT = """
import socket, struct, sys, time, ipaddress
def ra(options): return struct.pack('!BBHBBHII', 134, 0, 0, 64, 0x40, 1800, 0, 0) + options
def rdnss(a, units=3):
    body = struct.pack('!HI', 0, 600) + ipaddress.IPv6Address(a).packed
    return struct.pack('!BB', 25, units) + body
bad = 'fd53:19::bad'
broken = [
    ra(b'\\x19\\x00' + rdnss(bad)),             # zero-length option first
    ra(rdnss(bad) + bytes(8)),                  # zero-length option last
    ra(rdnss(bad)[:-3]),                        # truncated
    ra(rdnss(bad, units=200)),                  # longer than the packet
    ra(b'\\x19'),                               # half an option header
    struct.pack('!BBHBBH', 134, 0, 0, 64, 0x40, 1800),  # header cut short
    b'\\x86\\x00\\x00\\x00',
]
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'eth0')
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
index = socket.if_nametoindex('eth0')
print('ready', flush=True)
sys.stdin.readline()
for _ in range(3):
    for packet in broken:
        s.sendto(packet, ('ff02::1', 0, 0, index))
    time.sleep(0.1)
if sys.argv[1] == 'good':
    s.sendto(ra(rdnss(sys.argv[2])), ('ff02::1', 0, 0, index))
"""


@dataclass
class Lan:
    switch: str
    router: str
    host: str
    tmp: Path
    radvd: subprocess.Popen | None = None
    started: list[subprocess.Popen] = field(default_factory=list)

    def router_address(self) -> str:
        out = netns_exec(self.router, "ip", "-6", "-o", "addr", "show", "dev", "eth0",
                         "scope", "link").stdout  # fmt: skip
        return out.split()[3].split("/")[0]

    def start_radvd(self, rdnss: str | None = None, other: bool = False) -> None:
        """radvd on the router: the prefix, an RDNSS if given, the O flag if asked; intervals
        short so that its answer to a solicitation is not held back for long."""
        conf = self.tmp / "radvd.conf"
        conf.write_text(
            "interface eth0 {\n  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n"
            "  MaxRtrAdvInterval 4;\n"
            + ("  AdvOtherConfigFlag on;\n" if other else "")
            + f"  prefix {PREFIX} {{ }};\n"
            + (f"  RDNSS {rdnss} {{ }};\n" if rdnss else "")
            + "};\n"
        )
        conf.chmod(0o644)
        log = open(self.tmp / "radvd.log", "w")  # noqa: SIM115 - the process keeps it
        self.radvd = subprocess.Popen(
            ["ip", "netns", "exec", self.router, "radvd", "-n", "-C", str(conf),
             "-p", str(self.tmp / "radvd.pid"), "-m", "stderr"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.started.append(self.radvd)
        deadline = time.monotonic() + 10  # its first advertisement says it is up
        while "started" not in (self.tmp / "radvd.log").read_text():
            assert self.radvd.poll() is None, (self.tmp / "radvd.log").read_text()
            assert time.monotonic() < deadline, "radvd did not start"
            time.sleep(0.05)

    def start_dhcpv6(self, dns: str) -> None:
        """dnsmasq on the router as a DHCPv6 server handing out `dns` (option 23), as
        OpenWrt's odhcpd does with its O flag; no addresses (`static`, no host configured)
        and no advertisements of its own (an `ra-` mode would send some, with the server)."""
        netns_exec(self.router, "ip", "addr", "add", f"{RDNSS}/64", "dev", "eth0", "nodad")
        log_path = self.tmp / "dnsmasq.log"
        log = open(log_path, "w")  # noqa: SIM115 - the process keeps it
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.router, "dnsmasq", "--keep-in-foreground",
             "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
             "--interface=eth0", f"--dhcp-range={PREFIX.split('/')[0]},static",
             f"--dhcp-option=option6:dns-server,[{dns}]", "--user=root",
             f"--dhcp-leasefile={self.tmp / 'leases'}", f"--pid-file={self.tmp / 'dnsmasq.pid'}",
             "--log-facility=-", "--log-dhcp"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.started.append(proc)
        deadline = time.monotonic() + 10
        while "DHCPv6" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "dnsmasq did not start"
            time.sleep(0.05)

    def stop_radvd(self) -> None:
        if self.radvd is not None and self.radvd.poll() is None:
            self.radvd.terminate()
            self.radvd.wait(10)
        self.radvd = None

    def survey(self, interface: str = "lan0", own: tuple[str, ...] = ()) -> dict:
        proc = netns_exec(self.host, sys.executable, "-c", SURVEY, interface, *own)
        assert "Traceback" not in proc.stderr, proc.stderr
        return json.loads(proc.stdout)


@pytest.fixture
def lan() -> Iterator[Lan]:
    needs_root()
    if subprocess.run(["which", "radvd"], capture_output=True).returncode:
        pytest.skip("radvd is not installed (Debian's radvd package)")
    tag = uuid.uuid4().hex[:6]
    names = (f"nsrasw-{tag}", f"nsrart-{tag}", f"nsrahs-{tag}")
    switch, router, host = names
    tmp = Path(tempfile.mkdtemp(prefix="netsetup-ra-"))
    for ns in names:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    found = Lan(switch, router, host, tmp)
    try:
        netns_exec(switch, "ip", "link", "add", "br0", "type", "bridge")
        netns_exec(switch, "ip", "link", "set", "br0", "up")
        for port, ns, ifname in (("p1", router, "eth0"), ("p2", host, "lan0")):
            netns_exec(switch, "ip", "link", "add", port, "type", "veth", "peer", "name",
                       ifname, "netns", ns)  # fmt: skip
            netns_exec(switch, "ip", "link", "set", port, "master", "br0", "up")
            # no duplicate address detection: the link-local address is usable at once
            netns_exec(ns, "sysctl", "-qw", f"net.ipv6.conf.{ifname}.accept_dad=0")
            netns_exec(ns, "ip", "link", "set", "lo", "up")
            netns_exec(ns, "ip", "link", "set", ifname, "up")
        netns_exec(router, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")  # radvd needs it
        netns_exec(host, "ip", "addr", "add", f"{HOST_ADDR}/24", "dev", "lan0")
        yield found
    finally:
        found.stop_radvd()
        for proc in found.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for ns in names:  # anything of ours still running in them (radvd's helper)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True).stdout.split()  # fmt: skip
            for pid in pids:
                os.kill(int(pid), signal.SIGTERM)
            subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_routers_rdnss_and_address_are_reported(lan: Lan) -> None:
    lan.start_radvd(rdnss=RDNSS, other=True)
    router = lan.router_address()
    for forwarding in ("0", "1"):  # on: the kernel ignores the advertisement, we do not
        netns_exec(lan.host, "sysctl", "-qw", f"net.ipv6.conf.all.forwarding={forwarding}")
        found = lan.survey()
        (advert,) = found["survey"]["adverts"]
        assert advert["router"] == router
        assert [d["address"] for d in advert["dns"]] == [RDNSS]
        assert advert["other"] and not advert["managed"]
        competing, dhcpv6 = found["warnings"]
        assert f"your router {router} advertises {RDNSS} as IPv6 DNS server (RDNSS)" in competing
        assert "`netsetup routes`" in competing
        # no DHCPv6 server here: what DHCPv6 hands out went unseen, and the flag says so
        assert f"your router {router} sets the O flag" in dhcpv6
        assert "unseen here (no DHCPv6 reply within 1 s)" in dhcpv6
        assert found["summary"].startswith(f"COMPETING: {RDNSS} (RDNSS of {router})")
        print(f"forwarding={forwarding}: listened {found['survey']['listened']} s")


def test_the_dhcpv6_servers_dns_is_reported_when_the_o_flag_invites_it(lan: Lan) -> None:
    lan.start_radvd(other=True)
    lan.start_dhcpv6(DHCPV6_DNS)
    router = lan.router_address()
    found = lan.survey()
    assert found["survey"]["dhcpv6"] == [{"server": router, "dns": [DHCPV6_DNS]}]
    (line,) = found["warnings"]  # the server is named; the flag alone warns no more
    assert line.startswith(f"the DHCPv6 server {router} hands out {DHCPV6_DNS} as IPv6 DNS "
                           "server on lan0: dual-stack clients will ask it")  # fmt: skip
    assert lan.survey(own=(DHCPV6_DNS,))["warnings"] == []  # the appliance's own: fine
    # the host's own DHCPv6 client holds port 546: nothing asked, and the report says so
    holder = subprocess.Popen(
        ["ip", "netns", "exec", lan.host, sys.executable, "-c",
         "import socket, sys; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
         "s.bind(('::', 546)); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    lan.started.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    (line,) = lan.survey()["warnings"]
    assert f"your router {router} sets the O flag" in line
    assert "DHCPv6 not asked: port 546 is taken" in line


def test_a_router_with_no_rdnss_gives_no_warning(lan: Lan) -> None:
    lan.start_radvd()
    found = lan.survey()
    assert [a["router"] for a in found["survey"]["adverts"]] == [lan.router_address()]
    assert found["warnings"] == []
    assert found["summary"] == f"no other DNS server handed out (router {lan.router_address()})"


def test_the_appliances_own_address_is_not_competing(lan: Lan) -> None:
    lan.start_radvd(rdnss=OWN)
    found = lan.survey(own=(OWN,))
    assert [d["address"] for d in found["survey"]["adverts"][0]["dns"]] == [OWN]
    assert found["warnings"] == []
    # the same advertisement with nothing of ours: competing
    (warning,) = lan.survey()["warnings"]
    assert f"advertises {OWN} as IPv6 DNS server" in warning


@pytest.mark.parametrize("then", ["good", "nothing"])
def test_malformed_advertisements_cost_no_traceback_and_teach_nothing(lan: Lan, then) -> None:
    crafter = subprocess.Popen(
        ["ip", "netns", "exec", lan.router, sys.executable, "-c", CRAFT, then, RDNSS],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lan.started.append(crafter)
    assert crafter.stdout is not None and crafter.stdin is not None
    assert crafter.stdout.readline().strip() == "ready"
    survey = subprocess.Popen(["ip", "netns", "exec", lan.host, sys.executable, "-c", SURVEY,
                               "lan0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    lan.started.append(survey)
    time.sleep(0.3)  # the solicitation is out and the socket listens
    crafter.stdin.write("go\n")
    crafter.stdin.flush()
    out, err = survey.communicate(timeout=15)
    assert crafter.wait(10) == 0, crafter.stderr.read() if crafter.stderr else ""
    assert survey.returncode == 0 and "Traceback" not in err, err
    found = json.loads(out)
    if then == "good":
        (advert,) = found["survey"]["adverts"]
        assert [d["address"] for d in advert["dns"]] == [RDNSS]  # never fd53:19::bad
    else:
        assert found["survey"]["adverts"] == []
        assert found["summary"] == "no router advertisement within 3 s on lan0"
        assert found["warnings"] == []


def test_no_router_and_no_link_local_address_are_one_quiet_line(lan: Lan) -> None:
    found = lan.survey()
    assert found["summary"] == "no router advertisement within 3 s on lan0"
    assert found["warnings"] == []
    netns_exec(lan.host, "ip", "link", "add", "lan1", "type", "veth", "peer", "name", "lan1p")
    netns_exec(lan.host, "ip", "link", "set", "lan1", "addrgenmode", "none")
    for link in ("lan1p", "lan1"):
        netns_exec(lan.host, "ip", "link", "set", link, "up")
    found = lan.survey("lan1")
    assert found["summary"] == ("no IPv6 router seen: lan1 has no usable IPv6 link-local "
                                "address (yet)")  # fmt: skip
    assert found["warnings"] == []
    netns_exec(lan.host, "sysctl", "-qw", "net.ipv6.conf.lan1.disable_ipv6=1")
    assert lan.survey("lan1")["summary"] == "no IPv6 router seen: lan1 is down or has IPv6 off"
    assert lan.survey("nosuch0")["summary"] == "no IPv6 router seen: no interface nosuch0"


def test_check_prints_the_competing_server_and_routes_names_it(lan: Lan, monkeypatch) -> None:
    """`netsetup check` listens while it queries (the appliance is absent here: its paths
    fail fast), prints the line, keeps it for `status`, which reads it back without listening;
    `routes` then shows what was heard."""
    from netsetup import state
    from netsetup.host import ipv6_dns_status
    from netsetup.plan import HostFacts, IptablesBackend, Settings

    monkeypatch.setenv("NETSETUP_STATE_DIR", str(lan.tmp / "lib"))
    monkeypatch.setenv("NETSETUP_RUN_DIR", str(lan.tmp / "run"))
    facts = HostFacts("28.5.2", "iptables", IptablesBackend.nft, "br-x", "lan0",
                      "198.18.19.0/24", HOST_ADDR)  # fmt: skip
    settings = Settings(project="nsra")
    state.save("nsra", state.Deployment.of(settings, facts, "auto", ""))
    lan.start_radvd(rdnss=RDNSS, other=True)
    router = lan.router_address()
    proc = netns_exec(lan.host, NETSETUP, "check", "-p", "nsra", "--timeout", "1", check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"IPv6 DNS: COMPETING: {RDNSS} (RDNSS of {router})" in proc.stdout, proc.stdout
    shown = ipv6_dns_status("nsra", settings)
    assert shown is not None and shown["interface"] == "lan0"
    assert shown["competing"] == [RDNSS] and shown["dhcpv6"] == [router]
    routes = subprocess.run([NETSETUP, "routes", "-p", "nsra"], capture_output=True, text=True)
    assert routes.returncode == 0, routes.stderr
    assert "IPv6 DNS: what the LAN's routers hand out" in routes.stdout
    assert f"your router {router} advertises {RDNSS}" in routes.stdout
    assert "advertise-dns=no" in routes.stdout and "dhcp.lan.ra_dns='0'" in routes.stdout
