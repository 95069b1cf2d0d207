"""End to end, failover: two hosts (nested Docker 28 engines) share LAN_IP by VRRP (keepalived).

    [client ns] 198.19.53.10 --+
    [router ns] 198.19.53.254 -+-- br0 [switch ns] --+-- 198.19.53.1 [host A: nested engine]
                                                     +-- 198.19.53.2 [host B: nested engine]

Both hosts run `make up MODE=lan LAN_IP=198.19.53.53 HA_PEERS=<the other>`, A with the higher
priority, and LAN_IP6 too; the router's resolver is their upstream. The client asks LAN_IP and
LAN_IP6 ten times a second each throughout, and the gaps between answers are measured: A's
engine stops (its keepalived says so on the way out: the handover is at once), A comes back and
stays backup (no preemption: no second interruption); B's LAN link is cut at the switch
(nothing is said: A takes over after three missed advertisements) and comes back; A's appliance
stops answering (its container stopped): A gives the address up, and keeps it given up once
healthy again; `make down` on the master hands the address over first. The forwarder's web page
at LAN_IP is the master's (its translation happens before the INPUT chain's DROP for the shared
address), with the password both hosts were given, before the first failover and after it.
After `down` on both, each host's firewall, addresses and sysctls are as before.
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

import dind
import pytest
from test_netsetup_e2e import (
    ANSWER,
    IMAGES,
    Engine,
    appliance_image,  # noqa: F401 - the fixture
    make,
    pytestmark,  # noqa: F401 - the same marks and skip conditions
)
from test_netsetup_lan_e2e import assert_logs_in, web_client, web_lines
from topology import ROUTER, resolver, sh

LAN_NET, LAN_IP, CLIENT = "198.19.53.0/24", "198.19.53.53", "198.19.53.10"
LAN_IP6, CLIENT6 = "fd53:19::53", "fd53:19::10"  # LAN_IP6 moves with LAN_IP
HOSTS = {"a": ("198.19.53.1", "150"), "b": ("198.19.53.2", "100")}
HOSTS6 = {"a": "fd53:19::1", "b": "fd53:19::2"}
NETSETUP = str(Path(sys.executable).with_name("netsetup"))
FAILOVER_GAP = 2.0  # seconds: the target for a host that stops or loses its link
NO_GAP = 0.3  # a planned handover, or a host coming back: no more than one lost query
PAIR_SETTLES = 1.0  # seconds: keepalived adding or deleting LAN_IP and LAN_IP6 in turn
PAGE, PAGE_PASSWORD = f"http://{LAN_IP}/", "one page password for both hosts"
PROBE = r"""
import json, os, socket, struct, sys, time
vip, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
sock = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_DGRAM)
question = b"\x05probe\x07example\x04test\x00" + struct.pack(">HH", 1, 1)
answered, qid = [], 0
print("ready", flush=True)
while not os.path.exists(stop):
    started = time.monotonic()
    qid = (qid + 1) & 0xFFFF
    sock.sendto(struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question, (vip, 53))
    sock.settimeout(0.09)
    try:
        while True:
            if sock.recv(512)[:2] == struct.pack(">H", qid):
                answered.append(time.time())
                break
    except OSError:
        pass
    time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
json.dump(answered, open(out, "w"))
"""


@dataclass
class Probe:
    """The client asking `server` every 100 ms; `longest_gap` is the longest silence."""

    ns: str
    server: str
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ha-probe-")))
    proc: subprocess.Popen | None = None
    answered: list[float] = field(default_factory=list)
    started: float = 0.0
    stopped: float = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", PROBE, self.server,
             str(self.directory / "out.json"), str(self.directory / "stop")],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.started = time.time()

    def stop(self) -> list[float]:
        self.stopped = time.time()
        (self.directory / "stop").touch()
        assert self.proc is not None and self.proc.wait(10) == 0
        self.answered = json.loads((self.directory / "out.json").read_text())
        shutil.rmtree(self.directory, ignore_errors=True)
        return self.answered

    def longest_gap(self, since: float | None = None, until: float | None = None) -> float:
        """The longest silence in [since, until] (by default the probe's whole run): between
        answers, from the last answer before the window to the first in it, and from the last
        to the window's end (a silence that never ends counts whole)."""
        since = self.started if since is None else max(since, self.started)
        until = self.stopped if until is None else min(until, self.stopped)
        before = [t for t in self.answered if t < since]  # the silence may have begun earlier
        times = [t for t in self.answered if since <= t <= until]
        edges = [before[-1] if before else since, *times, until]
        return max(b - a for a, b in zip(edges, edges[1:], strict=False))


class Probes:
    """The client asking LAN_IP and LAN_IP6 side by side; gaps are the worse of the two."""

    def __init__(self, ns: str) -> None:
        self.probes = {"IPv4": Probe(ns, LAN_IP), "IPv6": Probe(ns, LAN_IP6)}

    def start(self) -> None:
        for probe in self.probes.values():
            probe.start()
        time.sleep(1)  # answers before the event

    def stop(self) -> None:
        for probe in self.probes.values():
            probe.stop()

    def gaps(self, since: float | None = None, until: float | None = None) -> dict[str, float]:
        return {family: round(probe.longest_gap(since, until), 2)
                for family, probe in self.probes.items()}  # fmt: skip


@dataclass
class Lan:
    """The switch, the client and the router (the hosts' upstream) in namespaces of their own."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    router_proc: subprocess.Popen | None = None
    router_log: str = ""

    @property
    def switch(self) -> str:
        return f"nshasw-{self.tag}"

    @property
    def client(self) -> str:
        return f"nshacl-{self.tag}"

    @property
    def router(self) -> str:
        return f"nshart-{self.tag}"

    def create(self) -> None:
        for ns in (self.switch, self.client, self.router):
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for ns, port, address in ((self.client, "pcl", CLIENT), (self.router, "prt", ROUTER)):
            sh("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name",
               "eth0", "netns", ns)  # fmt: skip
            sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            for link in ("lo", "eth0"):
                sh("ip", "-n", ns, "link", "set", link, "up")
        sh("ip", "-n", self.client, "-6", "addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad")
        self.router_proc, self.router_log = resolver(self.router, ROUTER)

    def plug(self, name: str, pid: int) -> str:
        """Host `name`'s LAN interface, in the netns of `pid`, on switch port `up-NAME`."""
        interface, (address, _) = f"vha{name}{self.tag}"[:15], HOSTS[name]
        sh("ip", "link", "add", interface, "type", "veth", "peer", "name", f"up-{name}",
           "netns", self.switch)  # fmt: skip
        sh("ip", "-n", self.switch, "link", "set", f"up-{name}", "master", "br0", "up")
        sh("ip", "link", "set", interface, "netns", str(pid))
        ns = ["nsenter", "-t", str(pid), "-n"]
        sh(*ns, "ip", "addr", "add", f"{address}/24", "dev", interface)
        sh(*ns, "ip", "-6", "addr", "add", f"{HOSTS6[name]}/64", "dev", interface, "nodad")
        sh(*ns, "ip", "link", "set", interface, "up")
        return interface

    def cut(self, name: str, down: bool = True) -> None:
        """The host's cable, at the switch: its interface loses carrier."""
        sh("ip", "-n", self.switch, "link", "set", f"up-{name}", "down" if down else "up")

    def destroy(self) -> None:
        if self.router_proc is not None:
            self.router_proc.kill()
            self.router_proc.wait()
        for ns in (self.switch, self.client, self.router):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        if self.router_log:
            Path(self.router_log).unlink(missing_ok=True)


@dataclass
class Host:
    name: str
    nested: dind.NestedEngine
    engine: Engine
    interface: str = ""

    @property
    def peer(self) -> str:
        return next(address for n, (address, _) in HOSTS.items() if n != self.name)

    def variables(self) -> dict[str, str]:
        return {
            "PROJECT": "nsha", "BRIDGE": "br-nsha", "SUBNET": "172.31.55.0/24",
            "DNS_IP": "172.31.55.53", "PORT": "5055", "MODE": "lan", "LAN_IP": LAN_IP,
            "LAN_INTERFACE": self.interface, "LAN_CIDR": LAN_NET, "UPSTREAMS": ROUTER,
            "HA_PEERS": self.peer, "HA_PRIORITY": HOSTS[self.name][1], "LAN_IP6": LAN_IP6,
            "SUBNET6": "fd53:55::/64", "DNS_IP6": "fd53:55::53", "WEB_PASSWORD": PAGE_PASSWORD,
        }  # fmt: skip

    def holds(self) -> bool:
        """Whether this host holds LAN_IP and LAN_IP6, which move together. keepalived adds
        (and deletes) them one after the other, so a look can fall between the two: one
        without the other must settle within PAIR_SETTLES seconds."""
        settled = time.monotonic() + PAIR_SETTLES
        while True:
            out = self.engine.run("ip", "-o", "addr", "show", "dev", self.interface).stdout
            ipv4, ipv6 = f" {LAN_IP}/32 " in out, f" {LAN_IP6}/128 " in out
            if ipv4 == ipv6:
                return ipv4
            assert time.monotonic() < settled, f"one address without the other: {out}"
            time.sleep(0.05)

    def failover(self) -> dict:
        report = Path(self.nested.report_dir) / "nsha.sync.json"
        try:
            return json.loads(report.read_text()).get("failover") or {}
        except (OSError, ValueError):
            return {}

    def state(self) -> dict:
        """What `up` may change on this host: firewall, the LAN interface's addresses, sysctls."""
        sysctls = ("net/ipv4/ip_forward", f"net/ipv4/neigh/{self.interface}/proxy_delay",
                   "net/ipv6/conf/all/forwarding", f"net/ipv6/conf/{self.interface}/accept_ra")
        return {
            "firewall": self.engine.firewall(),
            "addresses": self.engine.run("ip", "-o", "addr", "show", "dev", self.interface,
                                         "scope", "global").stdout,  # fmt: skip
            "sysctls": [self.engine.run("cat", f"/proc/sys/{key}").stdout for key in sysctls],
        }


def ip6_policy_aside(after: dict, before: dict) -> dict:
    """An engine that starts while IPv6 forwarding is on sets ip6tables' FORWARD policy to DROP,
    as it does iptables' at every start: the engine's change, which stays after `down`."""
    for flavour in ("nft6", "legacy6"):
        rows = after["firewall"][flavour].get("filter")
        old = before["firewall"][flavour].get("filter")
        if rows and old and ":FORWARD ACCEPT [0:0]" in old:
            after["firewall"][flavour]["filter"] = [
                ":FORWARD ACCEPT [0:0]" if row == ":FORWARD DROP [0:0]" else row for row in rows]
    return after


# A VRRPv3 advertisement for the hosts' router id with the highest priority a backup takes
# over for, sent by the client: a LAN device trying to take LAN_IP.
FORGED_ADVERT = r"""
import socket, struct, sys
vip = socket.inet_aton("198.19.53.53")
advert = struct.pack(">BBBBH", 0x31, 53, 254, 1, 40) + b"\x00\x00" + vip
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
sock.sendto(advert, (sys.argv[1], 0))
"""


def vrrp_dropped(host: Host) -> int:
    """Packets the host's "VRRP from anyone else" rule dropped."""
    out = host.engine.run("iptables", "-w", "-L", "NETSETUP-nsha-IN", "-v", "-x", "-n").stdout
    rows = [ln.split() for ln in out.splitlines() if "VRRP from anyone else" in ln]
    assert len(rows) == 1, out
    return int(rows[0][0])


def wait_for(what: str, done, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def dig(ns: str, server: str = LAN_IP) -> str:
    out = sh("ip", "netns", "exec", ns, "dig", f"@{server}", "www.example.test", "+short",
             "+time=2", "+tries=2", check=False).stdout  # fmt: skip
    return "\n".join(ln for ln in out.splitlines() if ln and not ln.startswith(";"))


@pytest.mark.nested
def test_failover_between_two_hosts(appliance_image: tuple[str, ...]) -> None:  # noqa: F811
    if not shutil.which("mmdebstrap") and not dind.image_exists(dind.image_for("sid")):
        pytest.skip("mmdebstrap missing and no cached nested-engine image")
    if not shutil.which("dig"):
        pytest.fail("dig is not installed (apt-get install bind9-dnsutils)")
    dind.build_image("sid")
    lan, hosts, upped = Lan(), {}, set()
    try:
        lan.create()
        for name in HOSTS:
            nested = dind.start_engine(f"netsetup-test-dind-ha{name}-{os.getpid()}", "sid")
            hosts[name] = Host(name, nested, Engine(pid=nested.dockerd_pid(), env=nested.env()))
            save = subprocess.Popen(["docker", "save", *IMAGES], stdout=subprocess.PIPE)
            nested.docker("load", stdin=save.stdout, check=True, capture_output=True)
            assert save.wait() == 0
            hosts[name].interface = lan.plug(name, nested.dockerd_pid())
        a, b = hosts["a"], hosts["b"]
        before = {name: host.state() for name, host in hosts.items()}

        # A first, with the higher priority: master; then B: backup. Both say so.
        for host, role in ((a, "MASTER"), (b, "BACKUP")):
            proc = make(host.engine, "up", **host.variables())
            upped.add(host.name)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert f"failover: this host is {role}" in proc.stderr, proc.stderr
            assert web_lines(proc.stderr) == {PAGE: PAGE_PASSWORD}, proc.stderr
        assert a.holds() and not b.holds()
        assert dig(lan.client) == ANSWER
        # the page at LAN_IP is the master's: DNATed in PREROUTING, it never reaches INPUT
        assert_logs_in(web_client(lan.client, PAGE, PAGE_PASSWORD))
        assert dig(lan.client, LAN_IP6) == ANSWER
        for host, role in ((a, "MASTER"), (b, "BACKUP")):
            status = host.engine.run(NETSETUP, "status", "-p", "nsha").stdout
            assert "failover" in status and role in status, status
            print(f"host {host.name}:\n{status}")
        # VRRP from anyone but the peer is dropped before keepalived sees it
        assert vrrp_dropped(b) == 0
        sh("ip", "netns", "exec", lan.client, sys.executable, "-c", FORGED_ADVERT, HOSTS["b"][0])
        assert vrrp_dropped(b) == 1
        assert a.holds() and not b.holds()

        # A's engine stops: its keepalived hands the address over on the way out
        probe = Probes(lan.client)
        probe.start()
        stopped = time.time()
        subprocess.run(["docker", "exec", a.nested.name, "pkill", "-x", "dockerd"], check=True)
        wait_for("B to take the address", b.holds, 10)
        took_over = time.time()
        # the supervising loop starts A's engine again; A comes back as backup
        a.nested.wait_ready()
        wait_for("A back as a healthy backup",
                 lambda: a.failover().get("health") == "ok" and a.failover().get("role"), 90)
        time.sleep(3)
        probe.stop()
        assert b.holds() and not a.holds(), "A came back and took the address again"
        assert dig(lan.client, LAN_IP6) == ANSWER  # LAN_IP6 moved with LAN_IP
        assert web_client(lan.client, PAGE, PAGE_PASSWORD)["summary"]["status"] == 200  # B's
        handover, comeback = probe.gaps(stopped, took_over + 1), probe.gaps(took_over + 1)
        print(f"engine stopped: gap {handover} s; A back: gap {comeback} s")
        assert max(handover.values()) <= FAILOVER_GAP  # its appliance stops too: not gapless
        assert max(comeback.values()) <= NO_GAP

        # B's cable is cut at the switch: nothing is said; A takes over on its own
        probe = Probes(lan.client)
        probe.start()
        cut = time.time()
        lan.cut("b")
        wait_for("A to take the address", a.holds, 10)
        took_over = time.time()
        time.sleep(1)
        lan.cut("b", down=False)
        time.sleep(4)
        probe.stop()
        cut_gap, back_gap = probe.gaps(cut, took_over + 1), probe.gaps(took_over + 1)
        print(f"link cut: gap {cut_gap} s; link back: gap {back_gap} s")
        assert max(cut_gap.values()) <= FAILOVER_GAP
        assert max(back_gap.values()) <= NO_GAP
        assert a.holds() and not b.holds()
        assert b.failover().get("transitions", 0) >= 2, b.failover()

        # A's appliance stops answering (its container stopped): A gives the address up
        probe = Probes(lan.client)
        probe.start()
        stopped = time.time()
        a.nested.docker("stop", "nsha_dnsproxy_1", check=True, capture_output=True)
        wait_for("B to take the address", b.holds, 10)
        took_over = time.time()
        assert "does not answer" in a.failover().get("health", ""), a.failover()
        a.nested.docker("start", "nsha_dnsproxy_1", check=True, capture_output=True)
        wait_for("A healthy again", lambda: a.failover().get("health") == "ok", 30)
        time.sleep(2)
        probe.stop()
        dead_gap = probe.gaps(stopped, took_over + 1)
        print(f"appliance stopped: gap {dead_gap} s")
        assert max(dead_gap.values()) <= FAILOVER_GAP + 1.5  # two looks and their timeouts
        assert max(probe.gaps(took_over + 1).values()) <= NO_GAP
        assert b.holds() and not a.holds(), "A took the address back once healthy"
        assert "gave the address up" in (a.failover().get("last_transition") or {}).get("why", "")
        a, b = b, a  # B is the master now

        # planned: `make down` on the master hands the address over first
        probe = Probes(lan.client)
        probe.start()
        started = time.time()
        proc = make(a.engine, "down", **a.variables())
        upped.discard(a.name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{LAN_IP} handed over to the peer" in proc.stdout + proc.stderr
        time.sleep(2)
        probe.stop()
        planned = probe.gaps(started)
        print(f"make down on the master: gap {planned} s")
        assert max(planned.values()) <= NO_GAP
        assert b.holds()

        proc = make(b.engine, "down", **b.variables())
        upped.discard(b.name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for name, host in hosts.items():
            after = host.state()
            if name == "a":  # its engine restarted, with IPv6 forwarding on (ours, then)
                after = ip6_policy_aside(after, before[name])
            assert after == before[name], f"host {name} differs after down"
    finally:
        for name in upped:
            make(hosts[name].engine, "down", **hosts[name].variables())
        for host in hosts.values():
            host.nested.stop()
        lan.destroy()
