"""LAN address mode on real links: the host service applies the plan in a "host" namespace.

    [client ns] 198.18.60.10/24 --veth-- lan0 198.18.60.1/24 [host ns] br0 172.31.99.1/24
        --veth-- 172.31.99.53 [appliance ns] a DNS responder (fake_upstream.py) on port 53

The client has its own subnet's route and nothing else, as a phone on a home LAN. With the plan
in place it asks LAN_IP (198.18.60.53, an address no interface holds) on port 53, UDP and TCP,
and the responder, standing in for the container, sees the client's own address; the client's
neighbour table has the host's MAC for LAN_IP (proxy ARP: so it works where the host is on
Wi-Fi); the host itself asks LAN_IP too; another port on LAN_IP reaches nothing although the
appliance listens there. A flushed proxy entry is put back; the service's stop leaves the
tables, proxy entries, routes and sysctls as they were. The checks `up` makes before claiming
an address run here too: an address a device holds is refused with one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
LAN, HOST_LAN, CLIENT, LAN_IP = "198.18.60.0/24", "198.18.60.1", "198.18.60.10", "198.18.60.53"
OTHER_LAN_IP = "198.18.60.54"
SUBNET, GATEWAY, DNS_IP = "172.31.99.0/24", "172.31.99.1", "172.31.99.53"
RESPONDER = str(Path(__file__).parent / "fake_upstream.py")
NAME, ANSWER = "www.example.test", "198.51.100.200"
SYSCTLS = ("net/ipv4/ip_forward", "net/ipv4/neigh/lan0/proxy_delay")
LISTEN = (
    "import socket, sys; s = socket.create_server(('0.0.0.0', 8080)); print('ready', flush=True)"
    "\nwhile True: s.accept()[0].close()"
)


@dataclass
class Lan:
    host: str
    client: str
    appliance: str
    log: Path

    def dig(self, ns: str, tcp: bool = False) -> str:
        cmd = ["dig", f"@{LAN_IP}", NAME, "A", "+short", "+time=2", "+tries=2"]
        out = netns_exec(ns, *cmd, *(["+tcp"] if tcp else []), check=False).stdout
        return "\n".join(ln for ln in out.splitlines() if ln and not ln.startswith(";"))

    def getent(self, ns: str) -> str:
        """`getent ahosts` through glibc's stub resolver; `ip netns exec` puts
        /etc/netns/NS/resolv.conf in place of /etc/resolv.conf for the command."""
        conf = Path("/etc/netns") / ns
        conf.mkdir(parents=True, exist_ok=True)
        try:
            (conf / "resolv.conf").write_text(f"nameserver {LAN_IP}\noptions timeout:2\n")
            out = netns_exec(ns, "getent", "ahostsv4", NAME, check=False).stdout
        finally:
            (conf / "resolv.conf").unlink(missing_ok=True)
            conf.rmdir()
        return sorted({line.split()[0] for line in out.splitlines()} or {""})[0]

    def clients(self) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [json.loads(line)["client"] for line in lines]

    def snapshot(self) -> tuple:
        """What the plan may change in the host namespace."""
        tables = normalize(netns_exec(self.host, "iptables-nft-save").stdout)
        proxies = netns_exec(self.host, "ip", "neigh", "show", "proxy").stdout
        routes = netns_exec(self.host, "ip", "-4", "route", "show", "table", "all").stdout
        sysctls = [netns_exec(self.host, "cat", f"/proc/sys/{k}").stdout for k in SYSCTLS]
        return tables, proxies, routes, sysctls


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    needs_root()
    tag = uuid.uuid4().hex[:6]
    net = Lan(f"nslh-{tag}", f"nslc-{tag}", f"nsla-{tag}", tmp_path / "responder.jsonl")
    procs: list[subprocess.Popen] = []
    for ns in (net.host, net.client, net.appliance):
        sh("ip", "netns", "add", ns)
    try:
        h, c, a = net.host, net.client, net.appliance
        sh("ip", "-n", h, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
           "netns", c)  # fmt: skip
        sh("ip", "-n", h, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", h, "link", "add", "vapp", "type", "veth", "peer", "name", "eth0",
           "netns", a)  # fmt: skip
        sh("ip", "-n", h, "link", "set", "vapp", "master", "br0")
        sh("ip", "-n", h, "addr", "add", f"{HOST_LAN}/24", "dev", "lan0")
        sh("ip", "-n", h, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
        sh("ip", "-n", c, "addr", "add", f"{CLIENT}/24", "dev", "eth0")
        sh("ip", "-n", a, "addr", "add", f"{DNS_IP}/24", "dev", "eth0")
        for ns, links in ((h, ("lo", "lan0", "br0", "vapp")), (c, ("lo", "eth0")),
                          (a, ("lo", "eth0"))):  # fmt: skip
            for link in links:
                sh("ip", "-n", ns, "link", "set", link, "up")
        sh("ip", "-n", a, "route", "add", "default", "via", GATEWAY)
        docker_like(h, "nft")
        # what the engine adds for its network: what leaves the bridge for elsewhere passes
        netns_exec(h, "iptables-nft", "-A", "FORWARD", "-i", "br0", "!", "-o", "br0",
                   "-j", "ACCEPT")  # fmt: skip
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", a, sys.executable, RESPONDER, DNS_IP, "53", str(net.log)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        ))  # fmt: skip
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", a, sys.executable, "-c", LISTEN],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        ))  # fmt: skip
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield net
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for ns in (net.host, net.client, net.appliance):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def deployment(modes: str = "lan", lan_ip: str = LAN_IP) -> state.Deployment:
    settings = Settings(
        modes=parse_modes(modes), lan_ip=lan_ip if "lan" in modes else None,
        upstreams=("198.51.100.53",), lan_cidr=LAN,
        subnet=SUBNET, ip=DNS_IP, project="dnsapp",
    )  # fmt: skip
    facts = HostFacts(
        engine_version="28.5.2", engine_firewall="iptables", iptables=IptablesBackend.nft,
        bridge="br0", lan_interface="lan0", lan_cidr=LAN, lan_address=HOST_LAN,
    )  # fmt: skip
    return state.Deployment.of(settings, facts, "nft", "")


@pytest.fixture
def own_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployment record and service report in the test's own directories, which the
    service's process inherits."""
    monkeypatch.setenv("NETSETUP_STATE_DIR", str(tmp_path / "lib"))
    monkeypatch.setenv("NETSETUP_RUN_DIR", str(tmp_path / "run"))


def apply_then_kill(lan: Lan, record: state.Deployment) -> None:
    """The service applies `record`'s plan and is killed: nothing of it is cleaned up."""
    state.save("dnsapp", record)
    service = Service(lan.host)
    try:
        service.wait(lambda r: r["complete"])
    finally:
        service.proc.kill()
        service.proc.wait()


def sweep(lan: Lan) -> None:
    """What `netsetup down` does for a service that could not clean up."""
    netns_exec(lan.host, sys.executable, "-c", "from netsetup.host import sweep; sweep('dnsapp')")


def tcp_connects(ns: str, address: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=2)"
    return netns_exec(ns, sys.executable, "-c", code, check=False).returncode == 0


def test_lan_address_serves_the_lan_and_the_host_and_goes_away(
    lan: Lan, own_state: None
) -> None:
    before = lan.snapshot()
    # without the plan nothing answers on LAN_IP, and the appliance's other port is open
    assert lan.dig(lan.client) == ""
    assert tcp_connects(lan.client, DNS_IP, 8080) is False  # no route to the subnet
    assert tcp_connects(lan.host, DNS_IP, 8080)  # the listener is there
    state.save("dnsapp", deployment())
    service = Service(lan.host)
    try:
        service.wait(lambda r: r["complete"])
        assert lan.dig(lan.client) == ANSWER
        assert lan.dig(lan.client, tcp=True) == ANSWER
        assert set(lan.clients()) == {CLIENT}, "the appliance must see the client's own address"
        host_mac = netns_exec(lan.host, "cat", "/sys/class/net/lan0/address").stdout.strip()
        neigh = netns_exec(lan.client, "ip", "neigh", "show", LAN_IP).stdout
        assert f"lladdr {host_mac}" in neigh, neigh
        assert netns_exec(lan.client, "ip", "route").stdout.count("\n") == 1  # its subnet only
        assert lan.dig(lan.host) == ANSWER  # the host asks LAN_IP itself (nat OUTPUT)
        assert not tcp_connects(lan.client, LAN_IP, 8080), "only DNS is exposed on LAN_IP"

        netns_exec(lan.host, "ip", "neigh", "del", "proxy", LAN_IP, "dev", "lan0")
        report = service.wait(lambda r: r["repairs"] >= 1 and r["complete"])
        assert any("proxy" in what for what in report["last_repair"]["what"]), report
        netns_exec(lan.client, "ip", "neigh", "flush", "dev", "eth0")
        assert lan.dig(lan.client) == ANSWER
        # the client's system resolver (glibc) with LAN_IP as its only name server
        assert lan.getent(lan.client) == ANSWER

        # a switch to direct mode takes LAN_IP away whole: entry, route, DNAT and its hooks
        syncs = service.report()["syncs"]
        state.save("dnsapp", deployment("direct"))
        service.wait(lambda r: r["syncs"] > syncs + 1 and r["complete"])
        assert netns_exec(lan.host, "ip", "neigh", "show", "proxy").stdout == ""
        assert LAN_IP not in netns_exec(lan.host, "ip", "route").stdout
        nat = netns_exec(lan.host, "iptables-nft-save", "-t", "nat").stdout
        assert "DNAT" not in nat and "-j NETSETUP-dnsapp-LAN" not in nat, nat
        netns_exec(lan.client, "ip", "neigh", "flush", "dev", "eth0")
        assert lan.dig(lan.client) == ""
    finally:
        code, out = service.stop()
    assert code == 0, out
    after = lan.snapshot()
    for what, was, now in zip(("tables", "proxy entries", "routes", "sysctls"), before, after,
                              strict=True):  # fmt: skip
        assert now == was, f"{what} differ after stop"
    assert lan.dig(lan.client) == ""


def check_lan_ip(ns: str, address: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from netsetup import detect; from netsetup.errors import NetsetupError\n"
        f"try: detect.check_lan_ip({address!r}, 'lan0', {LAN!r})\n"
        "except NetsetupError as exc: sys.exit(f'refused: {exc}')"
    )
    return netns_exec(ns, sys.executable, "-c", code, check=False)


def test_addresses_in_use_are_refused(lan: Lan) -> None:
    """`up`'s checks before claiming LAN_IP: a device's address (found by the ARP probe), the
    host's own, the broadcast address and one outside the LAN are refused; a free one is not."""
    started = time.monotonic()
    proc = check_lan_ip(lan.host, CLIENT)
    assert proc.returncode == 1 and "in use on lan0" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 5
    for address, words in ((HOST_LAN, "address of this host"), ("198.18.60.255", "broadcast"),
                           ("198.18.61.53", "outside the LAN")):  # fmt: skip
        proc = check_lan_ip(lan.host, address)
        assert proc.returncode == 1 and words in proc.stderr, (address, proc.stderr)
    assert check_lan_ip(lan.host, LAN_IP).returncode == 0


def test_down_sweeps_after_a_killed_service(
    lan: Lan, own_state: None
) -> None:
    """A service that could not clean up (killed): `down`'s sweep removes the proxy entry, the
    route and the chains from what the deployment record says, and puts proxy_delay back."""
    before = lan.snapshot()
    apply_then_kill(lan, deployment())
    assert lan.snapshot() != before  # the kill left everything in place
    sweep(lan)
    after = lan.snapshot()
    for what, was, now in zip(("tables", "proxy entries", "routes", "sysctls"), before, after,
                              strict=True):  # fmt: skip
        assert now == was, f"{what} differ after the sweep"


def test_entries_of_an_old_lan_ip_are_removed_after_a_killed_service(
    lan: Lan, own_state: None
) -> None:
    """The service applied LAN_IP and was killed; the record then moved to another address
    while none ran. The old proxy entry would keep claiming an address on the LAN: the next
    service's first sync removes it (its report named it), and so does `down`'s sweep."""
    before = lan.snapshot()

    def proxies() -> str:
        return netns_exec(lan.host, "ip", "neigh", "show", "proxy").stdout

    apply_then_kill(lan, deployment())
    state.save("dnsapp", deployment(lan_ip=OTHER_LAN_IP))
    service = Service(lan.host)
    try:  # the killed one's report says complete too: wait for this one's
        report = service.wait(lambda r: r["pid"] == service.proc.pid and r["complete"])
        assert LAN_IP not in proxies() and OTHER_LAN_IP in proxies()
        routes = netns_exec(lan.host, "ip", "-4", "route", "show").stdout
        assert f"{LAN_IP} dev" not in routes and f"{OTHER_LAN_IP} dev br0" in routes
        assert any("stale" in what and LAN_IP in what for what in report["first_sync"]["found"])
    finally:
        code, out = service.stop()
    assert code == 0, out
    assert lan.snapshot() == before

    apply_then_kill(lan, deployment())
    state.save("dnsapp", deployment(lan_ip=OTHER_LAN_IP))
    sweep(lan)
    assert lan.snapshot() == before
