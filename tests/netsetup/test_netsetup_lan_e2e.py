"""End to end, LAN address mode: `make up MODE=lan LAN_IP=...` on a switched LAN, `make down`.

The LAN is a bridge with the host's LAN port and two clients (topology.py, `switch`); one has no
route but its own subnet. Both ask LAN_IP, an address no interface holds, on port 53: the host
answers ARP for it and hands the queries to the container, which sees each client's own
address. A device already holding LAN_IP makes `up` refuse with one line and change nothing; a
stranger on the WAN side that routes the LAN via the host gets no answer from LAN_IP; `make down`
leaves firewall, proxy entries, routes and sysctls as they were. On this host's engine the LAN
also has an IPv6 router (radvd) advertising a DNS server of its own: `up` names it, with the
router. Run against this host's engine and a nested Docker 28 (dind.py), like
test_netsetup_e2e.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import dind
import pytest
from test_netsetup_e2e import (
    ANSWER,
    IMAGES,
    Engine,
    appliance_image,  # noqa: F401 - the fixture
    assert_nothing_answers,
    assert_same_firewall,
    container_logs,
    make,
    pytestmark,  # noqa: F401 - the same marks and skip conditions
)
from topology import INET_HOST, LAN_CLIENT, LAN_CLIENT2, LAN_NET, ROUTER_RDNSS, Topology

LAN_IP = "198.19.53.53"


def host_state(engine: Engine, topo: Topology) -> dict:
    """All `up` may change on the host: firewall, neighbour proxies, routes, sysctls."""
    sysctls = ("net/ipv4/ip_forward", f"net/ipv4/neigh/{topo.lan_if}/proxy_delay")
    return {
        "firewall": engine.firewall(),
        "proxies": engine.run("ip", "neigh", "show", "proxy").stdout,
        "routes": engine.run("ip", "-4", "route", "show", "table", "all").stdout,
        "sysctls": [engine.run("cat", f"/proc/sys/{key}").stdout for key in sysctls],
    }


def getent(topo: Topology, ns: str, name: str) -> str:
    """The client's system resolver (glibc), with resolv.conf naming LAN_IP: `ip netns exec`
    puts /etc/netns/NS/resolv.conf in place of /etc/resolv.conf."""
    conf = Path("/etc/netns") / ns
    conf.mkdir(parents=True, exist_ok=True)
    try:
        (conf / "resolv.conf").write_text(f"nameserver {LAN_IP}\noptions timeout:2 attempts:3\n")
        out = subprocess.run(["ip", "netns", "exec", ns, "getent", "ahostsv4", name],
                             capture_output=True, text=True).stdout  # fmt: skip
    finally:
        (conf / "resolv.conf").unlink(missing_ok=True)
        conf.rmdir()
    return " ".join(sorted({line.split()[0] for line in out.splitlines()}))


def lan_scenario(engine: Engine, project: str, subnet: str, ip: str) -> None:
    # The LAN's IPv6 router (radvd) on this host's engine only: the survey is the host
    # tool's, the same on every engine, and a nested run would only cost time.
    topo = Topology(subnet=subnet, pid=engine.pid, switch=True, router=engine.pid is None)
    topo.create()
    variables = {
        "PROJECT": project, "BRIDGE": f"br-{project}"[:15], "SUBNET": subnet, "DNS_IP": ip,
        "PORT": "5153", "UPSTREAMS": "198.51.100.53", "MODE": "lan", "LAN_IP": LAN_IP,
        "LAN_INTERFACE": topo.lan_if, "LAN_CIDR": LAN_NET,
    }  # fmt: skip
    ours = (variables["BRIDGE"], subnet.rsplit(".", 1)[0] + ".", topo.lan_if, LAN_IP)
    engine.run("docker", "volume", "rm", "-f", f"{project}_cache")
    before = host_state(engine, topo)
    upped = False
    try:
        # a device already uses LAN_IP: refused with one line, nothing changed
        topo.hold(LAN_IP)
        proc = make(engine, "up", **variables)
        assert proc.returncode != 0, proc.stdout
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("netsetup: error")]
        assert len(errors) == 1 and "in use" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert host_state(engine, topo) == before
        topo.release(LAN_IP)

        proc = make(engine, "up", **variables)
        upped = True
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if topo.router:  # the router's own IPv6 DNS server is named, with the router
            assert (f"your router {topo.router_address()} advertises {ROUTER_RDNSS} as IPv6 "
                    "DNS server (RDNSS)") in proc.stderr, proc.stderr  # fmt: skip
            assert "sets the O flag" in proc.stderr, proc.stderr
        for ns in (topo.lan_ns, topo.lan2_ns):  # the second knows no route but its subnet
            assert topo.dig(LAN_IP, f"udp-{ns}.example.test", ns=ns) == ANSWER
            assert topo.dig(LAN_IP, f"tcp-{ns}.example.test", tcp=True, ns=ns) == ANSWER
        assert getent(topo, topo.lan2_ns, "glibc.example.test") == ANSWER
        # the host itself asks LAN_IP too
        own = engine.run("dig", f"@{LAN_IP}", "host.example.test", "+short", "+time=2").stdout
        assert own.split() == [ANSWER], own

        # the appliance saw each client's own address; the upstream only the host's
        seen = {r["client"] for r in container_logs(engine, project)
                if str(r.get("name", "")).startswith(("udp-", "tcp-"))}  # fmt: skip
        assert seen == {LAN_CLIENT, LAN_CLIENT2}, seen
        assert set(topo.upstream_clients()) == {INET_HOST}

        # a stranger on the WAN side routing the LAN via the host: no answer from LAN_IP
        assert_nothing_answers(topo.dig_full(topo.wan_ns, LAN_IP, "wan.example.test"))
        assert_nothing_answers(topo.dig_full(topo.wan_ns, LAN_IP, "wan-tcp.example.test",
                                             tcp=True))  # fmt: skip

        proc = make(engine, "down", **variables)
        upped = False
        assert proc.returncode == 0, proc.stdout + proc.stderr
        after = host_state(engine, topo)
        assert_same_firewall(before.pop("firewall"), after.pop("firewall"), *ours)
        assert after == before
    finally:
        if upped:
            make(engine, "down", **variables)
        engine.run("docker", "volume", "rm", "-f", f"{project}_cache")
        topo.destroy()


def test_lan_mode_host_engine(appliance_image: tuple[str, ...]) -> None:  # noqa: F811
    lan_scenario(Engine(), project="nslan", subnet="172.31.165.0/24", ip="172.31.165.53")


@pytest.mark.nested
def test_lan_mode_nested_docker28(appliance_image: tuple[str, ...]) -> None:  # noqa: F811
    if not shutil.which("mmdebstrap") and not dind.image_exists(dind.image_for("sid")):
        pytest.skip("mmdebstrap missing and no cached nested-engine image")
    dind.build_image("sid")
    name = f"netsetup-test-dind-lan-{os.getpid()}"
    nested = dind.start_engine(name, "sid")
    try:
        save = subprocess.Popen(["docker", "save", *IMAGES], stdout=subprocess.PIPE)
        nested.docker("load", stdin=save.stdout, check=True, capture_output=True)
        assert save.wait() == 0
        engine = Engine(pid=nested.dockerd_pid(), env=nested.env())
        lan_scenario(engine, project="nslannest", subnet="172.31.54.0/24", ip="172.31.54.53")
    finally:
        nested.stop()
