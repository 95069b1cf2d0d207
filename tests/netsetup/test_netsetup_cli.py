"""The CLI's refusals: one line, exit status 2, no traceback, and nothing on the host changed.

Each case runs the installed `netsetup` as a separate process, as a user would, and compares
the firewall and the engine's containers/networks before and after.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from netsetup import state
from netsetup.cli import status_rows
from netsetup.deploy import compose_env
from netsetup.hostnet import HostRoute, ProxyNeighbour
from netsetup.plan import Settings, forwarder_allows, lan_to_allow
from netsetup.routes import render_text, route_sections
from netsetup.service import entries_from_json, entries_to_json

NETSETUP = str(Path(sys.executable).with_name("netsetup"))


def host_snapshot() -> tuple:
    """What a refused `up` could have changed: our firewall pieces, the project's containers and
    networks, IPv4 forwarding, the deployment record and the service's report, where the code
    keeps them (the CLI runs with this process's environment). (Narrower than a whole-host
    dump, so that other work on the same engine does not make the comparison flaky.)"""
    fw = [
        line
        for cmd in (["iptables-nft-save"], ["iptables-legacy-save"])
        for line in subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()
        if "netsetup" in line.lower()
    ]
    label = f"label=com.docker.compose.project={PROJECT}"
    docker = [
        subprocess.run(
            ["docker", kind, "ls", "-aq" if kind == "container" else "-q", "--filter", label],
            capture_output=True,
            text=True,
        ).stdout
        for kind in ("container", "network")
    ]
    files = [path.read_text() if path.exists() else None
             for path in (state.path_for(PROJECT), state.sync_path_for(PROJECT))]  # fmt: skip
    return fw, docker, Path("/proc/sys/net/ipv4/ip_forward").read_text(), files


def run_cli(*args: str, env: dict | None = None, user: str | None = None):
    cmd = [NETSETUP, *args]
    if user:
        cmd = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *cmd]
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd="/"
    )


def assert_refused(proc, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0]


needs_engine = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("docker") is None, reason="needs root and a Docker engine"
)
PROJECT = "nsrefuse"
SAFE = [
    "--upstream", "198.51.100.53", "--compose-file", "/nonexistent/compose.yaml",
    "--project", PROJECT,
]  # fmt: skip


def test_not_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    before = host_snapshot()
    assert_refused(run_cli("up", *SAFE, user="65534"), "root")
    assert host_snapshot() == before


@needs_engine
def test_no_engine() -> None:
    before = host_snapshot()
    proc = run_cli("up", *SAFE, env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert_refused(proc, "no Docker engine")
    assert host_snapshot() == before


@needs_engine
def test_interface_not_found() -> None:
    before = host_snapshot()
    assert_refused(run_cli("up", *SAFE, "--lan-interface", "nosuch0"), "nosuch0")
    assert host_snapshot() == before


@needs_engine
def test_subnet_overlaps_host_route() -> None:
    before = host_snapshot()
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "scope", "link"], capture_output=True, text=True
    ).stdout.split()
    if not routes:
        pytest.skip("host has no link-scope route")
    net = routes[0]
    ip = str(ipaddress.ip_network(net).network_address + 2)  # valid in the subnet, not .1
    proc = run_cli("up", *SAFE, "--lan-interface", "lo", "--lan-cidr", "127.0.0.0/8",
                   "--subnet", net, "--ip", ip)  # fmt: skip
    assert_refused(proc, "overlaps")
    assert host_snapshot() == before


@needs_engine
def test_port_taken() -> None:
    before = host_snapshot()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        proc = run_cli(
            "up", *SAFE, "--lan-interface", "lo", "--lan-cidr", "127.0.0.0/8",
            "--subnet", "172.31.254.0/24", "--ip", "172.31.254.53", "--port", str(port),
        )  # fmt: skip
    assert_refused(proc, "port", str(port))
    assert host_snapshot() == before


BAD_INPUT = [
    (["--subnet", "172.31.300.0/24"], "--subnet"),
    (["--subnet", "fd53::/64", "--ip", "fd53::53"], "IPv4"),
    (["--subnet", "172.31.254.0/24", "--ip", "172.31.254.999"], "--ip"),
    (["--subnet", "172.31.254.0/24", "--ip", "172.31.99.53"], "not inside"),
    (["--subnet", "172.31.254.0/24", "--ip", "172.31.254.0"], "network address"),
    (["--subnet", "172.31.254.0/24", "--ip", "172.31.254.255"], "broadcast"),
    (["--subnet", "172.31.254.0/24", "--ip", "172.31.254.1"], "gateway"),
    (["--subnet", "172.31.254.0/24", "--ip", "172.31.254.53", "--lan-cidr", "lan"], "--lan-cidr"),
    (["--subnet", "172.31.254.0/24", "--ip", "172.31.254.53", "--port", "70000"], "--port"),
]


@needs_engine
@pytest.mark.parametrize(("args", "word"), BAD_INPUT, ids=[w for _, w in BAD_INPUT])
def test_bad_input_refused(args: list[str], word: str) -> None:
    """Malformed or inconsistent --subnet, --ip, --lan-cidr: one line, exit 2, nothing changed."""
    before = host_snapshot()
    assert_refused(run_cli("up", *SAFE, "--lan-interface", "lo", *args), word)
    assert host_snapshot() == before


def test_routes_bad_input_refused() -> None:
    gateway = ["--gateway", "10.1.1.1"]
    assert_refused(run_cli("routes", "--subnet", "10.0.0.0/33", *gateway), "--subnet")
    assert_refused(run_cli("routes", "--lan-cidr", "x", *gateway), "--lan-cidr")


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def _unused_port_below_ephemeral() -> int:
    """A port free on every family and protocol, below the kernel's ephemeral range.

    A port the kernel handed out (bind to port 0) can also be held by another process's socket on
    a specific address, say a connected UDP socket on a bridge's address: binding loopback then
    works, the wildcard check does not, even after the holder closes. Picking below the ephemeral
    range, and checking first, keeps other processes' outgoing sockets off the port.
    """
    from netsetup.detect import check_port_free
    from netsetup.errors import PortTaken

    for port in random.sample(range(20000, 32000), 50):
        try:
            check_port_free(port)
        except PortTaken:
            continue
        return port
    raise AssertionError("no free port found in 20000-32000")


@pytest.mark.parametrize(
    ("family", "kind", "address", "reuse"),
    [
        (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", False),
        (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", True),  # hidden by SO_REUSEADDR before
        (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", False),
        (socket.AF_INET6, socket.SOCK_DGRAM, "::1", False),
        (socket.AF_INET6, socket.SOCK_DGRAM, "::1", True),
        (socket.AF_INET6, socket.SOCK_STREAM, "::1", False),
    ],
    ids=["udp4", "udp4-reuseaddr", "tcp4", "udp6", "udp6-reuseaddr", "tcp6"],
)
def test_port_taken_any_family_and_protocol(family, kind, address, reuse) -> None:
    from netsetup.detect import check_port_free
    from netsetup.errors import PortTaken

    if family == socket.AF_INET6 and not _ipv6():
        pytest.skip("no IPv6 on this host")
    port = _unused_port_below_ephemeral()
    with socket.socket(family, kind) as holder:
        if reuse:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        holder.bind((address, port))
        if kind == socket.SOCK_STREAM:
            holder.listen()
        with pytest.raises(PortTaken, match=str(port)):
            check_port_free(port)
    check_port_free(port)  # released: free again


@needs_engine
def test_dry_run_prints_plan_and_changes_nothing() -> None:
    before = host_snapshot()
    proc = run_cli(
        "up", *SAFE, "--dry-run", "--lan-interface", "lo", "--lan-cidr", "127.0.0.0/8",
        "--subnet", "172.31.254.0/24", "--ip", "172.31.254.53", "--port", "5999",
        "--bridge", "br-dryrun", "--mode", "direct",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "-A NETSETUP-nsrefuse -s 127.0.0.0/8 -d 172.31.254.53/32 -i lo -o br-dryrun -p udp"
        in proc.stdout
    )
    assert "! -i br-dryrun -o br-dryrun" in proc.stdout and "-j DROP" in proc.stdout
    assert "MASQUERADE" in proc.stdout
    assert host_snapshot() == before


def test_lan_to_allow_only_explicit_or_private() -> None:
    # detected and public (a VPS provider's /20): not served
    assert lan_to_allow("203.0.112.7/20", explicit=False) is None
    # given explicitly: served whatever its addresses
    assert lan_to_allow("198.19.53.0/24", explicit=True) == "198.19.53.0/24"
    # detected and private: inside the defaults already, adding it changes nothing
    assert lan_to_allow("192.168.1.7/24", explicit=False) == "192.168.1.0/24"
    # detected and carrier-grade NAT: the ISP's other customers, not served
    assert lan_to_allow("100.64.3.0/24", explicit=False) is None
    # public but overlapping no private range is not "inside": 172.32/16 is outside 172.16/12
    assert lan_to_allow("172.32.0.0/16", explicit=False) is None
    # the host's own LAN address is served beside the LAN, and without it when it is not
    assert forwarder_allows("198.19.53.0/24", "198.19.53.1") == ("198.19.53.0/24",
                                                                 "198.19.53.1/32")
    assert forwarder_allows(None, "203.0.112.7") == ("203.0.112.7/32",)
    assert forwarder_allows(None, None) == ()
    assert "ALLOW" not in compose_env(Settings())
    allow = compose_env(Settings(), ("198.19.53.0/24", "198.19.53.1/32"))["ALLOW"]
    assert allow.endswith(" 198.19.53.0/24 198.19.53.1/32") and "100.64" not in allow


@needs_engine
def test_detected_public_lan_is_not_served_without_lan_cidr(netns: str) -> None:
    """In a namespace whose only LAN is public (198.18.7.0/24), a dry run without --lan-cidr
    warns, naming LAN_CIDR, and the forwarder keeps its defaults; with it, the LAN is served."""
    for cmd in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum0p"],
        ["ip", "addr", "add", "198.18.7.1/24", "dev", "dum0"],
        ["ip", "link", "set", "dum0", "up"],
    ):
        subprocess.run(["ip", "netns", "exec", netns, *cmd], check=True)
    args = ["up", *SAFE, "--dry-run", "--lan-interface", "dum0", "--subnet", "172.31.254.0/24",
            "--ip", "172.31.254.53", "--port", "5999", "--bridge", "br-dryrun"]  # fmt: skip
    env = {**os.environ}
    proc = subprocess.run(["ip", "netns", "exec", netns, NETSETUP, *args],
                          capture_output=True, text=True, env=env, cwd="/")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "LAN_CIDR=198.18.7.0/24" in warnings[0], proc.stderr
    # the host's own address is the host: served, so `check` from it is answered
    assert "# forwarder serves: loopback, private ranges and 198.18.7.1/32\n" in proc.stdout

    proc = subprocess.run(
        ["ip", "netns", "exec", netns, NETSETUP, *args, "--lan-cidr", "198.18.7.0/24"],
        capture_output=True, text=True, env=env, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    assert ("# forwarder serves: loopback, private ranges and 198.18.7.0/24, 198.18.7.1/32\n"
            in proc.stdout)


def test_routes_forms() -> None:
    text = render_text(
        route_sections("172.31.53.0/24", "192.168.1.2", "172.31.53.53", "192.168.1.0/24", 5053)
    )
    assert "ip route add 172.31.53.0/24 via 192.168.1.2" in text
    assert "route -p add 172.31.53.0 mask 255.255.255.0 192.168.1.2" in text
    assert "/ip route add dst-address=172.31.53.0/24 gateway=192.168.1.2" in text
    assert "uci set network.@route[-1].gateway='192.168.1.2'" in text
    assert "sudo route -n add -net 172.31.53.0/24 192.168.1.2" in text
    assert "gateway 192.168.1.2, DNS 172.31.53.53" in text


def test_upstreams_default_only_when_neither_option_nor_config_names_any(monkeypatch) -> None:
    from netsetup.deploy import DEFAULT_UPSTREAMS

    monkeypatch.setenv("CONFIG", "")
    monkeypatch.setenv("UPSTREAMS", "")
    assert compose_env(Settings())["UPSTREAMS"] == ",".join(DEFAULT_UPSTREAMS)
    assert all(u.startswith("tls://") for u in DEFAULT_UPSTREAMS)  # never plain to the world
    assert compose_env(Settings(upstreams=("192.0.2.53",)))["UPSTREAMS"] == "192.0.2.53"
    monkeypatch.setenv("CONFIG", "/etc/dnsproxy.toml")
    assert compose_env(Settings())["UPSTREAMS"] == ""  # the file names them


@needs_engine
def test_status_shows_fields_not_json() -> None:
    """The engine is a line of words ("Docker 20.10.24, firewall iptables"), not a JSON string
    inside the table; a project that is not deployed says what to run."""
    proc = run_cli("status", "-p", "nsstatusnone")
    assert proc.returncode == 0, proc.stderr
    assert "{" not in proc.stdout, proc.stdout
    assert "Docker " in proc.stdout and ", firewall " in proc.stdout, proc.stdout
    assert "NOT RUNNING" in proc.stdout and "run up" in proc.stdout, proc.stdout


def test_status_rows_are_words_for_every_part() -> None:
    """What host.status finds for a deployed project, as status prints it: the engine, the
    counters and the firewall's pieces as words and numbers, no structure dumped as JSON."""
    info = {
        "up": True,
        "engine": {"version": "28.5.2", "firewall": "nftables"},
        "service": {"container_name": "dnsapp-dnsproxy-1", "ip": "172.31.53.53",
                    "health": "healthy", "network": "dnsapp_dnsnet",
                    "subnet": "172.31.53.0/24", "bridge": "br-dnsapp",
                    "published": ["198.19.53.1:5053->53/udp"]},
        "host_service": {"container": {"name": "dnsapp-netsetup-1", "status": "running",
                                       "restarts": 0}, "report": None},
        "iptables": "nf_tables",
        "lan": {"interface": "eth0", "cidr": "203.0.113.0/24", "address": "203.0.113.7",
                "served": None},
        "firewall": {"complete": False, "extra": [], "chains": {"filter/NETSETUP-dnsapp": True},
                     "hooks": {"nat/POSTROUTING -> NETSETUP-dnsapp": False}, "rules": {}},
        "sysctl": {"net.ipv4.ip_forward": "1"},
        "counts": {"queries": 12, "cache_hits": 5, "cache_entries": 7,
                   "forgeries_discarded": {"no-edns": 3}, "upstream_errors": {},
                   "upstream_latency_ms": {"p50": 41.5}},
    }
    rows = dict(status_rows(json.loads(json.dumps(info))))  # as --json would carry it
    assert rows["engine"] == "Docker 28.5.2, firewall nftables"
    assert rows["service"] == "dnsapp-dnsproxy-1 172.31.53.53 healthy"
    assert rows["published"] == "198.19.53.1:5053->53/udp"
    assert rows["LAN"] == ("eth0 203.0.113.0/24, host 203.0.113.7, "
                           "not served (not private: set LAN_CIDR to serve it)")
    assert rows["firewall"].startswith("INCOMPLETE")
    assert rows["  nat/POSTROUTING -> NETSETUP-dnsapp"] == "MISSING"
    assert rows["queries"] == "12 (5 from the cache, 7 cached)"
    assert rows["  forgeries"] == "no-edns 3" and rows["  errors"] == "-"
    assert rows["  last sync"] == "no report yet"
    for label, value in status_rows(info):
        assert "{" not in value and "'" not in value, (label, value)  # no dict or list dumped
    unreachable = dict(status_rows({**info, "up": False, "engine": {"error": "no socket"},
                                    "service": None, "firewall": None, "counts": None}))
    assert unreachable["engine"] == "unreachable: no socket"
    assert unreachable["host side"].endswith("run up")
    assert unreachable["service"] == "not deployed"


LAN_MODE_BAD = [
    (["--mode", "port,bogus"], "not a mode"),
    (["--mode", ""], "--mode"),
    (["--mode", "lan"], "needs --lan-ip"),
    (["--lan-ip", "192.168.1.53"], "lan is not in --mode"),
    (["--mode", "lan", "--lan-ip", "192.168.1.300"], "not an IPv4 address"),
    (["--mode", "lan", "--lan-ip", "fd00::53"], "only IPv4"),
    (["--mode", "lan", "--lan-ip", "172.31.254.60"], "inside the appliance --subnet"),
    (["--mode", "lan", "--lan-ip", "10.9.9.9", "--lan-cidr", "192.168.1.0/24"], "outside the LAN"),
    (["--mode", "port,lan", "--lan-ip", "192.168.1.255", "--lan-cidr", "192.168.1.0/24"],
     "broadcast address"),
    (["--mode", "lan", "--lan-ip", "192.168.1.0", "--lan-cidr", "192.168.1.0/24"],
     "network address"),
]  # fmt: skip

LAN4 = ["--mode", "lan", "--lan-ip", "192.168.1.53", "--lan-cidr", "192.168.1.0/24"]
LAN_IP6_BAD = [
    (["--lan-ip6", "fd00:1::53"], "lan is not in --mode"),
    ([*LAN4, "--lan-cidr6", "fd00:1::/64"], "no --lan-ip6"),
    ([*LAN4, "--lan-ip6", "192.168.1.54"], "not an IPv6 address"),
    ([*LAN4, "--lan-ip6", "fe80::53"], "not a unicast address a LAN prefix holds"),
    ([*LAN4, "--lan-ip6", "fd53:53::99"], "inside the appliance --subnet6"),
    ([*LAN4, "--lan-ip6", "fd00:2::53", "--lan-cidr6", "fd00:1::/64"], "outside the LAN's IPv6"),
    ([*LAN4, "--lan-ip6", "fd00:1::", "--lan-cidr6", "fd00:1::/64"], "subnet-router anycast"),
    ([*LAN4, "--lan-ip6", "fd00:1::ffff:ffff:ffff:fffe", "--lan-cidr6", "fd00:1::/64"],
     "reserved subnet anycast"),
    ([*LAN4, "--lan-ip6", "fd00:1::53", "--lan-cidr6", "192.168.1.0/24"], "IPv6 network is"),
    ([*LAN4, "--lan-ip6", "fd00:1::53", "--ip6", "fd99::53"], "inside --subnet6"),
    ([*LAN4, "--lan-ip6", "fd00:1::53", "--subnet6", "172.31.1.0/24"], "IPv6 network is"),
]  # fmt: skip


HA_BAD = [
    (["--ha-peer", "192.168.1.21"], "needs lan mode"),
    ([*LAN4, "--ha-peer", "printer"], "not an IPv4 address"),
    ([*LAN4, "--ha-peer", "fd00::21"], "IPv4 LAN addresses"),
    ([*LAN4, "--ha-peer", "192.168.1.53"], "is LAN_IP itself"),
    ([*LAN4, "--ha-peer", "192.168.2.21"], "outside the LAN"),
    ([*LAN4, "--ha-peer", "192.168.1.21", "--ha-priority", "255"], "not a VRRP priority"),
    ([*LAN4, "--ha-peer", "192.168.1.21", "--ha-vrid", "0"], "not a VRRP router id"),
]  # fmt: skip


WEB_BAD = [
    (["--web-port", "0"], "--web-port 0 is not a port (1-65535)"),
    (["--web-port", "70000"], "--web-port 70000 is not a port"),
    (["--port", "5099", "--web-port", "5099"], "--web-port 5099 is --port too"),
    (["--web-port", "5053"], "--web-port 5053 is --port too"),  # the default --port
]  # fmt: skip


@pytest.mark.parametrize(("args", "word"), WEB_BAD, ids=[w for _, w in WEB_BAD])
def test_web_port_refused(args: list[str], word: str) -> None:
    """A WEB_PORT that is no port, or DNS's own: one line, exit 2, before the host is looked
    at; with the page off (WEB=0) it is not the page's, and not checked."""
    proc = run_cli("up", *SAFE, "--subnet", "172.31.254.0/24", "--ip", "172.31.254.53", *args)
    assert_refused(proc, word)


@pytest.mark.parametrize(("password", "word"), [("two\nlines", "line break"),
                                                (" padded", "blank")])  # fmt: skip
def test_web_password_refused_and_never_on_the_command_line(password: str, word: str) -> None:
    """WEB_PASSWORD comes in the environment (NETSETUP_WEB_PASSWORD), not as an option `ps`
    would show; one the forwarder could not read back as given is refused in one line."""
    proc = run_cli("up", *SAFE, "--subnet", "172.31.254.0/24", "--ip", "172.31.254.53",
                   env={"NETSETUP_WEB_PASSWORD": password})  # fmt: skip
    assert_refused(proc, "WEB_PASSWORD", word)
    assert "--web-password" not in run_cli("up", "--help").stdout


@pytest.mark.parametrize(("args", "word"), HA_BAD, ids=[w for _, w in HA_BAD])
def test_failover_settings_refused(args: list[str], word: str) -> None:
    """Malformed or misplaced HA_PEERS and their companions: one line, exit 2, nothing done."""
    proc = run_cli("up", *SAFE, "--subnet", "172.31.254.0/24", "--ip", "172.31.254.53", *args)
    assert_refused(proc, word)


@pytest.mark.parametrize(("args", "word"), LAN_IP6_BAD, ids=[w for _, w in LAN_IP6_BAD])
def test_lan_ip6_refused(args: list[str], word: str) -> None:
    """Malformed or misplaced LAN_IP6 values: one line, exit 2, before the host is looked at."""
    proc = run_cli("up", *SAFE, "--subnet", "172.31.254.0/24", "--ip", "172.31.254.53", *args)
    assert_refused(proc, word)


@pytest.mark.parametrize(("args", "word"), LAN_MODE_BAD, ids=[w for _, w in LAN_MODE_BAD])
def test_mode_list_and_lan_ip_refused(args: list[str], word: str) -> None:
    """Malformed mode lists and LAN_IP values are refused before the host is looked at."""
    proc = run_cli("up", *SAFE, "--subnet", "172.31.254.0/24", "--ip", "172.31.254.53", *args)
    assert_refused(proc, word)


@needs_engine
@pytest.mark.parametrize(
    ("lan_ip", "word"), [("127.0.0.1", "address of this host"), ("10.9.9.9", "outside the LAN")]
)
def test_lan_ip_checked_against_the_host(lan_ip: str, word: str) -> None:
    """What only the host can tell: the detected LAN (lo's 127.0.0.0/8) and its own addresses."""
    before = host_snapshot()
    proc = run_cli("up", *SAFE, "--lan-interface", "lo", "--subnet", "172.31.254.0/24",
                   "--ip", "172.31.254.53", "--mode", "lan", "--lan-ip", lan_ip)  # fmt: skip
    assert_refused(proc, word)
    assert host_snapshot() == before


@needs_engine
def test_dry_run_in_lan_mode_shows_the_lan_address_pieces() -> None:
    before = host_snapshot()
    proc = run_cli(
        "up", *SAFE, "--dry-run", "--lan-interface", "lo", "--lan-cidr", "127.0.0.0/8",
        "--subnet", "172.31.254.0/24", "--ip", "172.31.254.53", "--bridge", "br-dryrun",
        "--mode", "direct,lan", "--lan-ip", "127.0.0.77",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "# netsetup plan: mode direct,lan" in proc.stdout
    assert "host: ip neigh add proxy 127.0.0.77 dev lo" in proc.stdout
    assert "host: ip route add 127.0.0.77/32 dev br-dryrun" in proc.stdout
    assert "sysctl net.ipv4.neigh.lo.proxy_delay = 0" in proc.stdout
    assert "-j DNAT --to-destination 172.31.254.53:53" in proc.stdout
    assert "-I PREROUTING 1" in proc.stdout and "-I OUTPUT 1" in proc.stdout
    assert host_snapshot() == before


@needs_engine
def test_dry_run_with_lan_ip6_shows_the_ipv6_plan_and_serves_its_prefix() -> None:
    """LAN_IP6 with a given prefix: the ip6tables share of the plan is printed after the
    iptables one, and the forwarder serves the prefix (a global one is outside its defaults);
    a LAN_IP6 on none of the interface's prefixes is refused in one line."""
    before = host_snapshot()
    args = ["up", *SAFE, "--dry-run", "--lan-interface", "lo", "--lan-cidr", "127.0.0.0/8",
            "--subnet", "172.31.254.0/24", "--ip", "172.31.254.53", "--bridge", "br-dryrun",
            "--mode", "lan", "--lan-ip", "127.0.0.77", "--lan-ip6", "2001:db8:77::53"]  # fmt: skip
    proc = run_cli(*args, "--lan-cidr6", "2001:db8:77::/64")
    assert proc.returncode == 0, proc.stderr
    ipv6 = proc.stdout.split("# firewall: ip6tables-")[1]
    assert "-s 2001:db8:77::/64 -d fd53:53::53/128 -i lo -o br-dryrun -p udp" in ipv6
    assert "-d 2001:db8:77::53/128 -p tcp -m tcp --dport 53" in ipv6
    assert "--to-destination [fd53:53::53]:53" in ipv6
    served = next(ln for ln in proc.stdout.splitlines() if ln.startswith("# forwarder serves:"))
    assert served.endswith("2001:db8:77::/64"), "the forwarder serves the prefix"
    assert_refused(run_cli(*args), "on none of lo's IPv6 prefixes")
    assert host_snapshot() == before


def test_modes_parse_render_and_old_records_load() -> None:
    from netsetup.plan import Mode, parse_modes
    from netsetup.state import Deployment

    assert parse_modes("both") == parse_modes("direct,port") == (Mode.port, Mode.direct)
    assert parse_modes("lan, port") == (Mode.port, Mode.lan)
    assert Settings(modes=parse_modes("port,direct")).mode_text == "both"
    assert Settings(modes=parse_modes("lan,direct")).mode_text == "direct,lan"
    # a record written before lan mode: "mode" was one word and there was no lan_ip
    old = Deployment.from_json('{"settings": {"mode": "direct", "ip": "172.31.53.53"}}')
    assert old.to_settings().modes == (Mode.direct,) and old.to_settings().lan_ip is None
    settings = Settings(modes=parse_modes("port,lan"), lan_ip="192.168.1.53")
    again = Deployment.from_json(json.dumps({"settings": Deployment.of(
        settings, _facts(), "auto", "").settings}))  # fmt: skip
    assert again.to_settings() == settings


def _facts():
    from netsetup.plan import HostFacts, IptablesBackend

    return HostFacts("28.5.2", "iptables", IptablesBackend.nft, "br-x", "eth0",
                     "192.168.1.0/24", "192.168.1.2")  # fmt: skip


def test_routes_in_lan_mode_name_the_dns_server_to_hand_out() -> None:
    proc = run_cli("routes", "--project", "nsnone", "--gateway", "192.168.1.2",
                   "--lan-interface", "lo", "--lan-cidr", "192.168.1.0/24",
                   "--lan-ip", "192.168.1.53")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "DNS server (DHCP option 6): 192.168.1.53" in text
    assert "uci add_list dhcp.lan.dhcp_option='6,192.168.1.53'" in text
    assert "[find address=192.168.1.0/24] dns-server=192.168.1.53" in text
    assert 'networksetup -setdnsservers "Wi-Fi" 192.168.1.53' in text
    assert 'set dnsservers name="Ethernet" static 192.168.1.53 primary' in text
    assert text.index("LAN address mode") < text.index("Router (generic)")
    # one DNS server to hand out: the routed alternatives do not name the container's too
    assert text.count("dhcp_option") == 1 and text.count("dns-server=") == 1, text
    assert "dhcp_option='6,172.31.53.53'" not in text and "DNS 172.31.53.53" not in text
    assert "route add dst-address=172.31.53.0/24" in text  # the routes themselves stay
    outside = run_cli("routes", "--project", "nsnone", "--gateway", "192.168.1.2",
                      "--lan-interface", "lo", "--lan-cidr", "192.168.1.0/24",
                      "--lan-ip", "192.168.2.53")  # fmt: skip
    assert_refused(outside, "outside the LAN")


def test_split_dns_lists_are_passed_by_their_folder(tmp_path, monkeypatch) -> None:
    """Lists dropped into LISTS_DIR's folders as downloaded reach the forwarder as paths in
    the container; no LISTS_DIR, no list variables (compose mounts /dev/null)."""
    from netsetup.errors import BadInput
    from netsetup.plan import check_settings

    for variable in ("DOMESTIC_UPSTREAMS", "LISTS_DIR", "DOMESTIC_DOMAINS", "FOREIGN_DOMAINS",
                     "DOMESTIC_IPS"):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "domestic-domains").mkdir()
    (tmp_path / "domestic-domains" / "accelerated-domains.china.conf").write_text("")
    (tmp_path / "domestic-domains" / "apple.china.conf").write_text("")
    (tmp_path / "domestic-domains" / ".hidden").write_text("")
    (tmp_path / "domestic-ips").mkdir()
    (tmp_path / "domestic-ips" / "chnroute.txt").write_text("")
    settings = check_settings(Settings(domestic_upstreams=("192.0.2.53", "192.0.2.54"),
                                       lists_dir=str(tmp_path)))
    env = compose_env(settings)
    assert env["DOMESTIC_UPSTREAMS"] == "192.0.2.53,192.0.2.54"
    assert env["LISTS_DIR"] == str(tmp_path)
    assert env["DOMESTIC_DOMAINS"] == ("/etc/dnsproxy/lists/domestic-domains/"
                                       "accelerated-domains.china.conf,"
                                       "/etc/dnsproxy/lists/domestic-domains/apple.china.conf")
    assert env["DOMESTIC_IPS"] == "/etc/dnsproxy/lists/domestic-ips/chnroute.txt"
    assert "FOREIGN_DOMAINS" not in env
    plain = compose_env(Settings())
    assert not {"DOMESTIC_UPSTREAMS", "LISTS_DIR", "DOMESTIC_DOMAINS"} & set(plain)
    with pytest.raises(BadInput, match="no --domestic-upstream"):
        check_settings(Settings(lists_dir=str(tmp_path)))
    with pytest.raises(BadInput, match="not a directory"):
        check_settings(Settings(domestic_upstreams=("192.0.2.53",),
                                lists_dir=str(tmp_path / "missing")))


def test_applied_entries_round_trip_through_the_report_and_bad_ones_mean_none() -> None:
    """The service's report lists the proxy entries and routes it applied, for a later service
    or `down`'s sweep to remove; a report of another shape, or naming what is no address of
    ours to remove, yields nothing rather than a failing sweep."""
    entries = ([ProxyNeighbour("198.18.60.53", "lan0")], [HostRoute("198.18.60.53/32", "br0")])
    assert entries_from_json(json.loads(json.dumps(entries_to_json(*entries)))) == entries
    for bad in (None, {}, "text", {"neighbours": 3, "routes": []},
                {"neighbours": [["x"]], "routes": []},
                {"neighbours": [["not-an-address", "lan0"]], "routes": []},
                {"neighbours": [], "routes": [["198.18.60.0/24", "br0"]]},
                {"neighbours": [], "routes": [["198.18.60.53", ""]]}):
        assert entries_from_json(bad) == ([], []), bad


def test_compose_runs_with_the_recorded_variables_and_no_others(tmp_path, monkeypatch) -> None:
    """What a record keeps is what compose gets: a variable the file reads that the record does
    not hold is unset, not inherited (a rollback must not deploy the failed up's CONFIG)."""
    from netsetup.deploy import Compose, compose_variables

    file = tmp_path / "compose.yaml"
    file.write_text("a: ${CONFIG:-/dev/null}\nb: ${PORT}:53 $IMAGE $$LITERAL ${MISSING?set it}\n")
    assert compose_variables(file) == {"CONFIG", "PORT", "IMAGE", "MISSING"}
    monkeypatch.setenv("CONFIG", "/etc/new.conf")
    monkeypatch.setenv("UNRELATED", "kept")
    recorded = Compose.for_settings(Settings(port=5099), file).variables
    assert recorded["CONFIG"] == "/etc/new.conf" and recorded["PORT"] == "5099"
    assert "UNRELATED" not in recorded and "MISSING" not in recorded
    env = Compose("p", file, {"PORT": "5053"}).environment()
    assert env["PORT"] == "5053" and env["UNRELATED"] == "kept"
    assert "CONFIG" not in env and "IMAGE" not in env


def test_status_says_a_hook_below_a_foreign_rule_is_not_complete() -> None:
    """Every piece present but a foreign rule above our filter hook: status names the rule and
    does not call the firewall complete; the host service's count of moved hooks shows."""
    hook = "filter/DOCKER-USER -> NETSETUP-dnsapp"
    info = {
        "up": True, "engine": {"error": "no socket"}, "service": None,
        "host_service": {"container": {"name": "dnsapp-netsetup-1", "status": "running",
                                       "restarts": 0},
                         "report": {"last_sync": 0, "syncs": 9, "complete": True, "repairs": 1,
                                    "hooks_moved": 1}},
        "iptables": "nft",
        "firewall": {"complete": False, "extra": [], "chains": {"filter/NETSETUP-dnsapp": True},
                     "hooks": {hook: True}, "rules": {},
                     "hooks_not_first": {hook: "-A DOCKER-USER -j ACCEPT"}},
        "sysctl": {"net.ipv4.ip_forward": "1"},
    }  # fmt: skip
    rows = dict(status_rows(info))
    assert rows["firewall"].startswith("NOT FIRST"), rows
    assert "complete" not in rows["firewall"]
    assert rows[f"  {hook}"] == "NOT FIRST, below: -A DOCKER-USER -j ACCEPT"
    assert rows["  hooks moved"].startswith("1 "), rows


@pytest.mark.parametrize(("health", "running", "expected"), [
    ("healthy", True, True), ("starting", True, True), ("unhealthy", True, True),
    ("exited", False, False),
])
def test_a_running_deployment_is_one_to_put_back_whatever_its_health(
    health: str, running: bool, expected: bool
) -> None:
    """A failed repeated `up` puts back what ran before: a forwarder still starting after a
    reboot, or unhealthy, ran too (taking it for absent would tear the household's DNS down)."""
    from netsetup.deploy import Deployed
    from netsetup.host import Preflight

    existing = Deployed("dnsapp-dnsproxy-1", "172.31.53.53", "dnsapp_dnsnet", "br-dnsapp",
                        "172.31.53.0/24", {}, health, [], running=running)
    found = Preflight(Settings(), None, existing, None, None, None, ())  # type: ignore[arg-type]
    assert found.running is expected


# ---- names at home (README "Names at home") ---------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def home_hosts(tmp_path: Path, text: str = "192.168.1.30 laptop.lan laptop\n") -> Path:
    """A hosts file in a directory of its own, both readable by the appliance's user."""
    folder = tmp_path / "home"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    file = folder / "hosts"
    file.write_text(text)
    file.chmod(0o644)
    return file


def rendered(compose) -> dict[str, str]:
    """The forwarder's environment and volumes as compose renders compose.yaml with a run's
    variables (`compose config`: the file read, no engine asked), as {name or target: value}."""
    from netsetup.deploy import compose_command
    from netsetup.errors import DeployFailed

    try:
        command = compose_command()
    except DeployFailed:
        pytest.skip("no compose")
    proc = subprocess.run([*command, "-f", str(compose.file), "config"], capture_output=True,
                          text=True, env=compose.environment())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found, lines = {}, proc.stdout.splitlines()
    for number, line in enumerate(lines):
        text = line.strip().removeprefix("- ")
        key, sep, value = text.partition(": ")
        if key.startswith("DNSPROXY_") and sep:
            found[key] = value.strip("'\"")
        elif text.endswith(":ro") and text.count(":") == 2:  # docker-compose 1.29: SRC:DST:ro
            source, target, _ = text.split(":")
            found[target] = f"{source} ro"
        elif key == "target":  # Compose v2: type, source, target, read_only, one per line
            block = " ".join(lines[number - 2:number + 3])
            source = block.split("source: ", 1)[1].split()[0]
            found[value] = f"{source} ro" if "read_only: true" in block else source
    return found


def test_home_names_reach_compose_and_the_record(tmp_path, monkeypatch) -> None:
    """LOCAL_DNS, LOCAL_DOMAINS and LOCAL_REVERSE reach the forwarder's environment, the LAN it
    serves first among the reverse networks; the hosts file's directory is mounted read-only
    and the forwarder is told the file's path in it. Without them the forwarder gets nothing
    (its defaults or the config file's), whatever the environment `up` runs in holds, but the
    LAN's reverse network. The deployment record keeps both, for the host service and a
    rollback."""
    from netsetup import home
    from netsetup.firewall import get_backend
    from netsetup.host import compose_for, recorded_compose
    from netsetup.plan import check_settings, compute_plan

    facts, backend, file = _facts(), get_backend("nft"), REPO / "compose.yaml"
    hosts = home_hosts(tmp_path)
    settings = home.checked(check_settings(Settings(
        upstreams=("192.0.2.53",), local_dns=("192.168.1.1", "tcp://192.168.1.2"),
        local_domains=("lan", "fritz.box"), local_reverse=("2001:db8:1::1/56",),
        hosts_file=str(hosts))))  # fmt: skip
    compose = compose_for(settings, file, compute_plan(settings, facts), facts, backend)
    env = rendered(compose)
    assert env["DNSPROXY_LOCAL_DNS"] == "192.168.1.1,tcp://192.168.1.2"
    assert env["DNSPROXY_LOCAL_DOMAINS"] == "lan,fritz.box"
    assert env["DNSPROXY_LOCAL_REVERSE"] == "192.168.1.0/24,2001:db8:1::/56"
    assert env["DNSPROXY_HOSTS"] == "/etc/dnsproxy/hosts.d/hosts"
    assert env["/etc/dnsproxy/hosts.d"] == f"{hosts.parent} ro"

    record = state.Deployment.of(settings, facts, "auto", str(file), compose.variables)
    again = state.Deployment.from_json(json.dumps(dataclasses.asdict(record)))
    assert again.to_settings() == settings
    assert recorded_compose(again, backend).variables == compose.variables

    for variable, leaked in (("LOCAL_DNS", "10.9.9.9"), ("LOCAL_DOMAINS", "corp"),
                             ("HOSTS_DIR", "/etc"), ("HOSTS", "/etc/dnsproxy/hosts.d/x")):
        monkeypatch.setenv(variable, leaked)
    plain = Settings(upstreams=("192.0.2.53",))
    env = rendered(compose_for(plain, file, compute_plan(plain, facts), facts, backend))
    assert env["DNSPROXY_LOCAL_DNS"] == env["DNSPROXY_LOCAL_DOMAINS"] == env["DNSPROXY_HOSTS"] == ""
    assert env["DNSPROXY_LOCAL_REVERSE"] == "192.168.1.0/24"
    assert env["/etc/dnsproxy/hosts.d"] == "/dev/null ro"


def test_make_passes_the_home_names_to_netsetup() -> None:
    """The make variables become netsetup's options: each resolver and domain its own option,
    the hosts file as an absolute path (compose mounts it from anywhere)."""
    proc = subprocess.run(
        ["make", "-n", "-o", "venv", "-o", "deps", "-o", "image", "up",
         "LOCAL_DNS=192.168.1.1 tls://192.168.1.2#router.lan", "LOCAL_DOMAINS=lan fritz.box",
         "LOCAL_REVERSE=2001:db8:1::/56", "HOSTS_FILE=./hosts"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert ("--local-dns '192.168.1.1' --local-dns 'tls://192.168.1.2#router.lan' "
            "--local-domain 'lan' --local-domain 'fritz.box' "
            "--local-reverse '2001:db8:1::/56' "
            f"--hosts-file '{REPO}/hosts'") in proc.stdout, proc.stdout  # fmt: skip


HOME_BAD = [
    (["--local-dns", "printer"], "--local-dns: bad upstream 'printer'"),
    (["--local-dns", "https://dns.example/dns-query"], "https://dns.example/dns-query#IP"),
    (["--local-domain", "a..b"], "--local-domain 'a..b'"),
    (["--local-reverse", "192.168.1.0/33"], "--local-reverse '192.168.1.0/33' is not a network"),
    (["--hosts-file", "{tmp}/missing"], "no such file"),
    (["--hosts-file", "{tmp}"], "not a regular file"),
    (["--hosts-file", "{bad}"], "hosts:2: not an IP address: 'laptop.lan'"),
    (["--hosts-file", "{private}"], "chmod o+r"),
]  # fmt: skip


@needs_engine
@pytest.mark.parametrize(("args", "word"), HOME_BAD, ids=[w for _, w in HOME_BAD])
def test_home_names_bad_input_refused(tmp_path, args: list[str], word: str) -> None:
    """What the forwarder would refuse at start is refused before anything is done: one line,
    exit 2, nothing changed (not a forwarder that exits after it starts, and a rollback)."""
    bad = home_hosts(tmp_path, "192.168.1.30 laptop.lan\nlaptop.lan 192.168.1.31\n")
    (tmp_path / "other").mkdir()
    private = home_hosts(tmp_path / "other")
    private.chmod(0o600)
    args = [a.format(tmp=tmp_path, bad=bad, private=private) for a in args]
    before = host_snapshot()
    assert_refused(run_cli("up", *SAFE, "--lan-interface", "lo", "--subnet", "172.31.254.0/24",
                           "--ip", "172.31.254.53", *args), word)  # fmt: skip
    assert host_snapshot() == before


@needs_engine
def test_up_names_the_gateway_as_the_likely_local_dns(netns: str, tmp_path) -> None:
    """Without LOCAL_DNS, `up` says in one line that the home's names get NXDOMAIN and names
    the LAN's gateway, read from the routing table, as the resolver to give; given one, it
    says nothing. The dry run shows what the forwarder is given."""
    for cmd in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum0p"],
        ["ip", "addr", "add", "192.168.77.2/24", "dev", "dum0"],
        ["ip", "link", "set", "dum0p", "up"],
        ["ip", "link", "set", "dum0", "up"],
        ["ip", "route", "add", "default", "via", "192.168.77.1", "dev", "dum0"],
    ):
        subprocess.run(["ip", "netns", "exec", netns, *cmd], check=True)
    hosts = home_hosts(tmp_path)
    args = ["up", *SAFE, "--dry-run", "--lan-interface", "dum0", "--subnet", "172.31.254.0/24",
            "--ip", "172.31.254.53", "--port", "5999", "--bridge", "br-dryrun"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "CONFIG"}

    def dry_run(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ip", "netns", "exec", netns, NETSETUP, *args, *extra],
                              capture_output=True, text=True, env=env, cwd="/")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc

    proc = dry_run()
    assert proc.stderr.splitlines() == [
        "netsetup: note: home names (printer.lan, reverse lookups of 192.168.77.0/24) are "
        "answered NXDOMAIN here; to resolve them, give LOCAL_DNS=192.168.77.1 (your LAN's "
        "gateway)"
    ], proc.stderr
    assert "# forwarder home names: LOCAL_REVERSE 192.168.77.0/24\n" in proc.stdout

    proc = dry_run("--local-dns", "192.168.77.1", "--hosts-file", str(hosts))
    # The default modes include direct, which leaves the LAN out of the masquerade: the router
    # must route the subnet, and `up` says so.
    assert proc.stderr.splitlines() == [
        "netsetup: warning: 192.168.77.1 on the LAN: in direct mode the appliance asks it from "
        "its own address, so it must route 172.31.254.0/24 via this host (`netsetup routes`); "
        "without that route use MODE=port or lan"], proc.stderr
    assert ("# forwarder home names: LOCAL_DNS 192.168.77.1; LOCAL_REVERSE 192.168.77.0/24; "
            "HOSTS /etc/dnsproxy/hosts.d/hosts\n") in proc.stdout, proc.stdout
    proc = dry_run("--local-dns", "192.168.77.1", "--mode", "port")
    assert proc.stderr == ""


def test_home_notes_heed_the_config_file(tmp_path) -> None:
    """A config file that names the LAN's resolver gets no gateway hint; one with reverse
    networks is told they give way to the LAN's (the environment beats the file)."""
    from netsetup.home import notes

    config = tmp_path / "dnsproxy.toml"
    config.write_text('upstreams = ["192.0.2.53"]\nlocal_dns = ["192.168.1.1"]\n')
    assert notes(Settings(), "192.168.1.0/24", "192.168.1.1", str(config)) == []
    config.write_text('upstreams = ["192.0.2.53"]\nlocal_reverse = ["2001:db8:1::/56"]\n')
    said = notes(Settings(local_dns=("192.168.1.1",)), "192.168.1.0/24", None, str(config))
    assert len(said) == 1 and "give its networks as LOCAL_REVERSE" in said[0], said
    assert notes(Settings(local_dns=("192.168.1.1",)), None, None, str(config)) == []


def test_upstreams_on_the_lan_are_found_in_every_group() -> None:
    """Direct mode leaves the LAN out of the masquerade: `up` warns of every upstream there."""
    from netsetup.home import upstreams_on_the_lan

    settings = Settings(upstreams=("tls://192.168.1.1#router.lan", "198.51.100.53"),
                        domestic_upstreams=("192.168.1.2:5353",),
                        local_dns=("192.168.1.1", "https://dns.lan/dns-query#192.168.1.3"))
    assert upstreams_on_the_lan(settings, "192.168.1.0/24") == [
        "192.168.1.1", "192.168.1.2", "192.168.1.3"]
    assert upstreams_on_the_lan(settings, "10.0.0.0/8") == []
