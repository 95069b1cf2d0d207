"""End to end, LAN address mode: `make up MODE=lan LAN_IP=...` on a switched LAN, `make down`.

The LAN is a bridge with the host's LAN port, two clients and the LAN's router (topology.py,
`switch`, `router`); one client has no route but its own subnet. Both ask LAN_IP, an address no
interface holds, on port 53: the host answers ARP for it and hands the queries to the
container, which sees each client's own address. The upstream is the "internet" resolver; the
router, which has no route to the appliance subnet, is the LAN's resolver for the home's names
as a new user would set it up (`LOCAL_DNS=<the router>`, with a `HOSTS_FILE`): it answers
because the appliance's queries reach it with the host's address. A client resolves the router's
printer and its reverse name (the LAN's network is a `--local-reverse` netsetup adds), the hosts
file's names, and a public name; the internet resolver hears none of the home's names; an edited
hosts file, saved as editors do (a new file renamed over the old), is read by `make reload`.
A device already holding LAN_IP makes `up` refuse with one line and change nothing; a
stranger on the WAN side that routes the LAN via the host gets no answer from LAN_IP; `make down`
leaves firewall, proxy entries, routes and sysctls as they were. The forwarder's web page is at
http://LAN_IP/, where `up` says, with the password it prints: the LAN's clients log in with it
and read the API, a wrong password gets no session, the stranger gets no answer on port 80
(nor the LAN at LAN_IP6: the page is IPv4's); a second `up` with WEB_PASSWORD replaces it in the
running forwarder. On this
host's engine the router also advertises IPv6 with a DNS server of its own: `up` names it, with
the router. Run against this host's engine and a nested Docker 28 (dind.py), like
test_netsetup_e2e.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

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
    status_of,
)
from topology import (
    INET_HOST6,
    INET_RESOLVER,
    INET_RESOLVER6,
    LAN_CLIENT,
    LAN_CLIENT2,
    LAN_CLIENT2_6,
    LAN_CLIENT6,
    LAN_HOST,
    LAN_NET,
    PRINTER,
    PRINTER_NAME,
    ROUTER,
    ROUTER_RDNSS,
    WAN_CLIENT6,
    Topology,
)

from dnsproxy.web.server import COOKIE as SESSION_COOKIE

LAN_IP = "198.19.53.53"
LAN_IP6 = "fd53:19::53"  # on the prefix the router advertises
LAPTOP, TABLET = "198.19.53.30", "198.19.53.31"  # named by the hosts file, first and after an edit
WEB_CLIENT = str(Path(__file__).with_name("web_client.py"))
NEW_PASSWORD = "a new page password"  # WEB_PASSWORD of the second `up`


def host_state(engine: Engine, topo: Topology) -> dict:
    """All `up` may change on the host: firewall (both families), neighbour proxies, routes,
    sysctls. A learned route's remaining lifetime is no change of ours, nor the kernel's own
    link-local routes (a new link's appear once its address passed DAD)."""
    lan = topo.lan_if
    sysctls = ("net/ipv4/ip_forward", f"net/ipv4/neigh/{lan}/proxy_delay",
               "net/ipv6/conf/all/forwarding", "net/ipv6/conf/default/forwarding",
               f"net/ipv6/conf/{lan}/forwarding",
               f"net/ipv6/conf/{lan}/accept_ra", f"net/ipv6/conf/{lan}/proxy_ndp",
               f"net/ipv6/neigh/{lan}/proxy_delay")  # fmt: skip
    routes6 = engine.run("ip", "-6", "route", "show", "table", "all").stdout
    return {
        "firewall": engine.firewall(),
        "proxies": engine.run("ip", "neigh", "show", "proxy").stdout,
        "proxies6": engine.run("ip", "-6", "neigh", "show", "proxy").stdout,
        "routes": engine.run("ip", "-4", "route", "show", "table", "all").stdout,
        "routes6": [re.sub(r" expires \d+sec", "", line) for line in routes6.splitlines()
                    if not ("fe80::" in line and "proto kernel" in line)],
        "sysctls": [engine.run("cat", f"/proc/sys/{key}").stdout for key in sysctls],
    }


def default_route6(engine: Engine) -> str:
    return engine.run("ip", "-6", "route", "show", "default").stdout


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


def reverse(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer + "."


def save_as_editors_do(path: Path, text: str) -> None:
    """A new file renamed over the old one: the old file's inode is gone from the directory."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    new.chmod(0o644)
    os.replace(new, path)


def wait_dig(topo: Topology, name: str, expected: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while (out := topo.dig(LAN_IP, name)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return out


def check_home_names(engine: Engine, project: str, topo: Topology, hosts_file: Path,
                     variables: dict[str, str], internet: str) -> None:  # fmt: skip
    """The router's device and its reverse name come from the router, the hosts file's names
    from the appliance, a public name from the internet resolver, which hears none of the
    others; the query log says why each went where it went."""
    assert topo.dig(LAN_IP, PRINTER_NAME) == PRINTER
    assert topo.dig(LAN_IP, PRINTER, qtype="PTR") == f"{PRINTER_NAME}."
    assert topo.dig(LAN_IP, "laptop.lan") == LAPTOP
    assert topo.dig(LAN_IP, LAPTOP, qtype="PTR") == "laptop.lan."
    assert topo.dig(LAN_IP, "public.example.test") == ANSWER
    save_as_editors_do(hosts_file, f"{TABLET} tablet.lan\n")
    proc = make(engine, "reload", **variables)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert wait_dig(topo, "tablet.lan", TABLET) == TABLET

    home = {f"{PRINTER_NAME}.", reverse(PRINTER), "laptop.lan.", reverse(LAPTOP), "tablet.lan."}
    assert not home & topo.names_asked(), topo.names_asked()
    assert topo.names_asked(of_router=True) == {f"{PRINTER_NAME}.", reverse(PRINTER)}
    logged = {(r["name"], r["type"]): r for r in container_logs(engine, project) if "name" in r}
    router = f"{ROUTER}:53"
    expected = {
        (f"{PRINTER_NAME}.", "A"): ("forwarded", router, "local", "local-domain"),
        (reverse(PRINTER), "PTR"): ("forwarded", router, "local", "local-reverse"),
        ("laptop.lan.", "A"): ("local", None, None, "hosts"),
        (reverse(LAPTOP), "PTR"): ("local", None, None, "hosts"),
        ("tablet.lan.", "A"): ("local", None, None, "hosts"),
        ("public.example.test.", "A"): ("forwarded", internet, None, None),
    }
    for key, decision in expected.items():
        record = logged[key]
        got = (record["reason"], record["upstream"], record.get("group"), record.get("why"))
        assert got == decision, record


def web_lines(stderr: str) -> dict[str, str | None]:
    """`make up`'s lines for the web page, as {address: the password it printed}."""
    found = {}
    for line in stderr.splitlines():
        match = re.fullmatch(r"netsetup: up: web page: (\S+)(?: \(password: (.*)\))?", line)
        if match:
            found[match[1]] = match[2]
    return found


def web_client(ns: str, url: str, password: str, wrong: str = "not the password") -> dict:
    """What the page answered a browser's steps from namespace `ns` (web_client.py)."""
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, WEB_CLIENT, url, password,
                           wrong], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, (url, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def assert_logs_in(steps: dict) -> None:
    """The page, or a redirect to its login form; the form; a login that sets the session cookie
    (HttpOnly, SameSite=Strict) and leads back to the page; the API in JSON with that session
    only; a wrong password gets no cookie."""
    root = steps["root"]
    assert root["status"] == 200 or (root["status"] == 303 and urlsplit(
        root["location"]).path == "/login"), root  # fmt: skip
    assert steps["login_page"]["status"] == 200, steps["login_page"]
    login = steps["login"]
    session = login["cookies"].get(SESSION_COOKIE)
    assert login["status"] == 303 and session and session["value"], login
    assert session["httponly"] and session["samesite"] == "Strict", login
    assert steps["summary"]["status"] == 200 and steps["summary"]["json"] == "dict", steps
    assert steps["summary_without"]["status"] == 401, steps["summary_without"]
    assert steps["wrong"]["status"] != 303 and not steps["wrong"]["cookies"], steps["wrong"]


def check_web_page(engine: Engine, project: str, topo: Topology, up_stderr: str,
                   variables: dict[str, str]) -> None:  # fmt: skip
    """The page where `up` said, with the password it printed; only from the LAN; then a new
    WEB_PASSWORD, written into the running forwarder (no restart), the only one that logs in."""
    url = f"http://{LAN_IP}/"
    pages = web_lines(up_stderr)
    assert list(pages) == [url], up_stderr  # IPv4 only: the forwarder serves it on 0.0.0.0:80
    password = pages[url]
    assert password, up_stderr
    status = status_of(engine, project)
    assert status["web"] == {"on": True, "urls": [url], "password": password}, status["web"]
    assert_logs_in(web_client(topo.lan_ns, url, password))
    # the client that knows no route but its subnet
    assert web_client(topo.lan2_ns, url, password)["summary"]["status"] == 200
    # LAN_IP6 is DNS's alone: its port 80 meets the default deny
    assert not topo.tcp_connects(topo.lan_ns, LAN_IP6, 80)
    # a stranger on the WAN side: nothing answers on port 80, at any of the appliance's addresses
    for server in (LAN_IP, variables["DNS_IP"], LAN_IP6, variables["DNS_IP6"]):
        assert not topo.tcp_connects(topo.wan_ns, server, 80), server

    running = status["service"]["container_id"]
    proc = make(engine, "up", **variables, WEB_PASSWORD=NEW_PASSWORD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert web_lines(proc.stderr) == {url: NEW_PASSWORD}, proc.stderr
    assert NEW_PASSWORD not in proc.stdout, "make echoed the password"
    steps = web_client(topo.lan_ns, url, NEW_PASSWORD, wrong=password)
    assert_logs_in(steps)  # the old password, as the wrong one, gets no session
    assert status_of(engine, project)["service"]["container_id"] == running


def lan_scenario(engine: Engine, project: str, subnet: str, ip: str, subnet6: str,
                 shared: Path) -> None:  # fmt: skip
    """`shared`: a directory this process and the engine see at the same path (the hosts
    file's, which netsetup checks here and the engine mounts)."""
    # The router also advertises IPv6 (radvd); a nested engine's host takes its default route
    # from it (this host's namespace is the machine's: its routes are not the test's). On this
    # host's engine the internet resolver is reached over IPv6 only, an IPv6 upstream.
    topo = Topology(subnet=subnet, pid=engine.pid, switch=True, router=True, ipv6_router=True,
                    host_takes_ra=engine.pid is not None, subnet6=subnet6,
                    inet6=engine.pid is None)  # fmt: skip
    upstream = f"[{INET_RESOLVER6}]:53" if topo.inet6 else INET_RESOLVER
    topo.create()
    hosts_file = shared / "home" / "hosts"
    hosts_file.parent.mkdir()
    hosts_file.parent.chmod(0o755)  # the appliance's unprivileged user enters it
    save_as_editors_do(hosts_file, f"{LAPTOP} laptop.lan laptop\n")
    variables = {
        "PROJECT": project, "BRIDGE": f"br-{project}"[:15], "SUBNET": subnet, "DNS_IP": ip,
        "PORT": "5153", "WEB_PORT": "8153", "UPSTREAMS": upstream, "MODE": "lan", "LAN_IP": LAN_IP,
        "LAN_INTERFACE": topo.lan_if, "LAN_CIDR": LAN_NET, "LOCAL_DNS": ROUTER,
        "HOSTS_FILE": str(hosts_file), "LAN_IP6": LAN_IP6, "SUBNET6": subnet6,
        "DNS_IP6": subnet6.replace("::/64", "::53"),
    }  # fmt: skip
    ours = (variables["BRIDGE"], subnet.rsplit(".", 1)[0] + ".", topo.lan_if, LAN_IP)
    engine.run("docker", "volume", "rm", "-f", f"{project}_cache")
    if topo.host_takes_ra:
        deadline = time.monotonic() + 15
        while "proto ra" not in default_route6(engine) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "proto ra" in default_route6(engine), "the router's advertisement was not heard"
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

        # every route the host loses while `up` runs (forwarding turned on before accept_ra is
        # 2 deletes the learned default route; the next advertisement would bring it back)
        monitor = subprocess.Popen([*engine.prefix(), "ip", "-6", "monitor", "route"],
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        proc = make(engine, "up", **variables)
        upped = True
        monitor.terminate()
        deleted = [ln for ln in monitor.communicate()[0].splitlines()
                   if ln.startswith("Deleted default")]  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not deleted, f"the host lost its IPv6 default route: {deleted}"
        # the router's own IPv6 DNS server is named, with the router
        assert (f"your router {topo.router_address()} advertises {ROUTER_RDNSS} as IPv6 "
                "DNS server (RDNSS)") in proc.stderr, proc.stderr  # fmt: skip
        assert "sets the O flag" in proc.stderr, proc.stderr
        assert f"hand out the appliance's IPv6 address {LAN_IP6} instead" in proc.stderr
        assert f"or {LAN_IP6} port 53 over IPv6" in proc.stderr, proc.stderr
        if topo.host_takes_ra:  # forwarding is on, and the host kept its own default route
            assert "proto ra" in default_route6(engine), default_route6(engine)
        for ns in (topo.lan_ns, topo.lan2_ns):  # the second knows no route but its subnet
            assert topo.dig(LAN_IP, f"udp-{ns}.example.test", ns=ns) == ANSWER
            assert topo.dig(LAN_IP, f"tcp-{ns}.example.test", tcp=True, ns=ns) == ANSWER
            # and over IPv6, by LAN_IP6 on the prefix
            assert topo.dig(LAN_IP6, f"udp6-{ns}.example.test", ns=ns) == ANSWER
            assert topo.dig(LAN_IP6, f"tcp6-{ns}.example.test", tcp=True, ns=ns) == ANSWER
        assert getent(topo, topo.lan2_ns, "glibc.example.test") == ANSWER
        # the host itself asks LAN_IP too
        for server in (LAN_IP, LAN_IP6):
            own = engine.run("dig", f"@{server}", "host.example.test", "+short",
                             "+time=2").stdout  # fmt: skip
            assert own.split() == [ANSWER], (server, own)

        check_home_names(engine, project, topo, hosts_file, variables,
                         upstream if topo.inet6 else f"{INET_RESOLVER}:53")
        check_web_page(engine, project, topo, proc.stderr, variables)
        if topo.inet6:  # the IPv6 upstream, which knows no route back, was asked masqueraded
            assert set(topo.upstream_clients()) == {INET_HOST6}, topo.upstream_clients()
        # the appliance saw each client's own address; the router, the LAN's resolver with
        # no route to the appliance subnet, saw the host's (masqueraded: else its replies
        # would have gone to its default route)
        seen = {r["client"] for r in container_logs(engine, project)
                if str(r.get("name", "")).startswith(("udp-", "tcp-"))}  # fmt: skip
        assert seen == {LAN_CLIENT, LAN_CLIENT2}, seen
        seen6 = {r["client"] for r in container_logs(engine, project)
                 if str(r.get("name", "")).startswith(("udp6-", "tcp6-"))}  # fmt: skip
        assert seen6 == {LAN_CLIENT6, LAN_CLIENT2_6}, seen6
        assert topo.router_clients() == {LAN_HOST}

        # a stranger on the WAN side routing the LAN via the host: no answer from LAN_IP
        assert_nothing_answers(topo.dig_full(topo.wan_ns, LAN_IP, "wan.example.test"))
        assert_nothing_answers(topo.dig_full(topo.wan_ns, LAN_IP, "wan-tcp.example.test",
                                             tcp=True))  # fmt: skip
        # nor over IPv6, by LAN_IP6 or by the appliance's own IPv6 address
        for server in (LAN_IP6, variables["DNS_IP6"]):
            for tcp in (False, True):
                assert_nothing_answers(topo.dig_full(topo.wan_ns, server, "wan6.example.test",
                                                     tcp=tcp))  # fmt: skip
        # the forwarder serves the LAN's prefix only: the stranger was not even refused
        assert WAN_CLIENT6 not in {r.get("client") for r in container_logs(engine, project)}

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


def test_lan_mode_host_engine(appliance_image: tuple[str, ...], tmp_path: Path) -> None:  # noqa: F811
    lan_scenario(Engine(), project="nslan", subnet="172.31.165.0/24", ip="172.31.165.53",
                 subnet6="fd53:165::/64", shared=tmp_path)


@pytest.mark.nested
@pytest.mark.parametrize("suite", ["sid", "trixie"])  # Docker 28.5 and 26.1
def test_lan_mode_nested_engine(appliance_image: tuple[str, ...], suite: str) -> None:  # noqa: F811
    if not shutil.which("mmdebstrap") and not dind.image_exists(dind.image_for(suite)):
        pytest.skip("mmdebstrap missing and no cached nested-engine image")
    dind.build_image(suite)
    name = f"netsetup-test-dind-lan-{suite}-{os.getpid()}"
    nested = dind.start_engine(name, suite)
    try:
        save = subprocess.Popen(["docker", "save", *IMAGES], stdout=subprocess.PIPE)
        nested.docker("load", stdin=save.stdout, check=True, capture_output=True)
        assert save.wait() == 0
        engine = Engine(pid=nested.dockerd_pid(), env=nested.env())
        lan_scenario(engine, project="nslannest", subnet="172.31.54.0/24", ip="172.31.54.53",
                     subnet6="fd53:54::/64", shared=Path(nested.report_dir))
    finally:
        nested.stop()
