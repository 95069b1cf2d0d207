"""End to end: `make up`, a LAN client resolving both ways, `make down`, the firewall as it was.

The topology (topology.py) has a LAN client and an "internet" resolver in namespaces of their own;
the resolver cannot route back to the appliance subnet, so answers arrive only if the host
masquerades the appliance's queries. Run against this host's engine and against nested Docker 28
and 26 engines (dind.py; 28 also with `"iptables": false`), where netsetup runs in the nested
engine's network namespace (``nsenter -t PID -n``) and talks to its socket (DOCKER_HOST).

`make` runs with ``-o venv -o deps -o image``: the test runs inside the virtualenv it would
rebuild, and the image is built (host) or loaded (nested) once by a fixture beforehand.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dind
import pytest
from conftest import normalize
from topology import (
    INET_HOST,
    LAN_CLIENT,
    LAN_HOST,
    LAN_NET,
    ROUTER,
    ROUTER_ANSWER,
    ROUTER_ZONE,
    WAN_HOST,
    Topology,
)

from netsetup import state

REPO = Path(__file__).resolve().parents[2]
NETSETUP = str(Path(sys.executable).with_name("netsetup"))
IMAGES = ("dnsproxy:latest", "netsetup:latest")
METRICS_PORT = 9153
ANSWER = "198.51.100.200"

pytestmark = [
    pytest.mark.netns,
    pytest.mark.docker,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("docker") or not shutil.which("dig"),
        reason="needs root, Docker and dig",
    ),
]


FLAVOURS = (("nft", "iptables-nft-save"), ("legacy", "iptables-legacy-save"),
            ("nft6", "ip6tables-nft-save"), ("legacy6", "ip6tables-legacy-save"))  # fmt: skip


@dataclass
class Engine:
    """Where the appliance runs: this host's engine, or a nested one (pid of its netns)."""

    pid: int | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    restart_daemon: Callable[[], None] | None = None

    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n"] if self.pid else []

    def run(self, *cmd: str, check: bool = False, timeout: float = 600):
        return subprocess.run(
            [*self.prefix(), *cmd],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            cwd=REPO,
        )

    def firewall(self) -> dict:
        """Every table of both iptables flavours, for IPv4 and IPv6, normalized, plus IPv4
        forwarding."""
        tables = {flavour: normalize(self.run(command).stdout) for flavour, command in FLAVOURS}
        forward = self.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()
        return {**tables, "ip_forward": forward}


def assert_same_firewall(
    before: dict, after: dict, *ours: str, engine_restarted: bool = False
) -> None:
    """`iptables-save` after equals before, per table.

    Strict under CI, where nothing else runs. On a shared development host other deployments
    may change Docker's rules meanwhile; there, every differing line must at least not be ours
    (no netsetup chain or comment, none of our bridge, subnet, LAN interface or port).
    A restarted engine writes its own rules again in an order of its choosing (its networks'
    rules swap places): then the engine's lines are compared as a set, ours still in order.
    """
    if engine_restarted:
        before, after = _engine_order_aside(before), _engine_order_aside(after)
    if os.environ.get("CI") or before == after:
        assert after == before
        return
    assert after["ip_forward"] == before["ip_forward"]
    for flavour, _ in FLAVOURS:
        for table in set(before[flavour]) | set(after[flavour]):
            old, new = set(before[flavour].get(table, [])), set(after[flavour].get(table, []))
            mine = [ln for ln in old ^ new if any(word in ln for word in ("etsetup", *ours))]
            assert not mine, f"{flavour}/{table}: {mine}"


def _engine_order_aside(firewall: dict) -> dict:
    def canonical(lines: list[str]) -> dict[str, list[str]]:
        return {"all": sorted(lines), "ours": [ln for ln in lines if "etsetup" in ln]}

    return {
        flavour: {table: canonical(lines) for table, lines in tables.items()}
        if isinstance(tables, dict) else tables
        for flavour, tables in firewall.items()
    }


def make(engine: Engine, target: str, **variables: str):
    args = [f"{k}={v}" for k, v in variables.items()]
    return engine.run("make", "-o", "venv", "-o", "deps", "-o", "image", target, *args)


def container_logs(engine: Engine, project: str) -> list[dict]:
    ids = engine.run(
        "docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
        "--filter", "label=com.docker.compose.service=dnsproxy",
    ).stdout.split()  # fmt: skip
    assert ids, "appliance container not found"
    out = engine.run("docker", "logs", ids[0])
    records = []
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def wait_answer(topo: Topology, server: str, name: str, port: int = 53, tcp: bool = False) -> str:
    deadline = time.monotonic() + 30
    out = ""
    while time.monotonic() < deadline:
        out = topo.dig(server, name, port, tcp=tcp)
        if out:
            break
        time.sleep(1)
    return out


def status_of(engine: Engine, project: str) -> dict:
    proc = engine.run(NETSETUP, "status", "-p", project, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def remove_our_rules(engine: Engine, project: str) -> None:
    """What a firewall reload or a reboot does to us: our chains and hooks are gone."""
    code = (
        "import sys; from netsetup.detect import iptables_backend;"
        "from netsetup.firewall import get_backend; from netsetup.plan import own_chains;"
        "get_backend(iptables_backend().value).remove(own_chains(sys.argv[1]))"
    )
    engine.run(sys.executable, "-c", code, project, check=True)
    left = [ln for flavour in ("nft", "legacy") for rows in engine.firewall()[flavour].values()
            for ln in rows if f"NETSETUP-{project}" in ln]  # fmt: skip
    assert not left, left


def assert_nothing_answers(out: str) -> None:
    """dig got no reply at all: not REFUSED, not anything (a status line means a reply)."""
    assert "status:" not in out and ("timed out" in out or "no servers" in out), out


def assert_exposure(topo: Topology, ip: str, port: int, metrics_from_lan: bool = False) -> None:
    """Only the LAN reaches only DNS: packets from the WAN side get nothing back."""
    assert "status: NOERROR" in topo.dig_full(topo.lan_ns, ip, "lan-ok.example.test")
    # a stranger routing the appliance subnet via the host: no answer, not even REFUSED
    assert_nothing_answers(topo.dig_full(topo.wan_ns, ip, "wan.example.test"))
    assert_nothing_answers(topo.dig_full(topo.wan_ns, ip, "wan-tcp.example.test", tcp=True))
    # the published port, on the host's WAN address and (routed to it) on its LAN address
    assert_nothing_answers(topo.dig_full(topo.wan_ns, WAN_HOST, "wan-port.example.test", port))
    assert_nothing_answers(topo.dig_full(topo.wan_ns, LAN_HOST, "wan-lan.example.test", port))
    # the metrics port: not from the WAN, from the LAN only when asked for
    assert not topo.tcp_connects(topo.wan_ns, ip, METRICS_PORT)
    assert topo.tcp_connects(topo.lan_ns, ip, METRICS_PORT) == metrics_from_lan


def wait_repaired(topo: Topology, ip: str, name: str, timeout: float = 30) -> float:
    """Seconds until a fresh name resolves from the LAN again, with no command typed."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if topo.dig(ip, name) == ANSWER:
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{name}: no answer within {timeout} s")


def sync_report(engine: Engine, project: str) -> dict:
    """The host service's last report (state.write_json replaces it whole)."""
    run_dir = engine.env.get("NETSETUP_RUN_DIR", "/run/netsetup")
    return json.loads(Path(run_dir, f"{project}.sync.json").read_text())


def foreign_accept_is_moved_below(
    engine: Engine, topo: Topology, project: str, ip: str, status: dict
) -> None:
    """Another tool inserts an ACCEPT above our filter hook, which would let anyone reach the
    appliance: within a sync the host service puts our hook back first, counts it and names the
    rule; then a stranger on the WAN side still gets no answer. The ACCEPT is removed after.
    `status`: what `netsetup status` said before."""
    (hook,) = [name for name in status["firewall"]["hooks"] if name.startswith("filter/")]
    chain = hook.split("/")[1].split()[0]  # DOCKER-USER, or FORWARD where the engine has none
    iptables = {"nft": "iptables-nft", "legacy": "iptables-legacy"}[status["iptables"]]
    moved = sync_report(engine, project).get("hooks_moved", 0)
    engine.run(iptables, "-w", "-I", chain, "-j", "ACCEPT", check=True)
    try:
        deadline = time.monotonic() + 20  # the service syncs every 5 s
        report = sync_report(engine, project)
        while report.get("hooks_moved", 0) <= moved and time.monotonic() < deadline:
            time.sleep(0.2)
            report = sync_report(engine, project)
        assert report.get("hooks_moved", 0) == moved + 1 and report["complete"], report
        assert any(f"above: -A {chain} -j ACCEPT" in w for w in report["last_repair"]["what"])
        # the forwarder would answer REFUSED within milliseconds: one second is plenty
        assert_nothing_answers(topo.dig_full(topo.wan_ns, ip, "wan-bypass.example.test",
                                             seconds=1))  # fmt: skip
    finally:
        engine.run(iptables, "-w", "-D", chain, "-j", "ACCEPT")


def scenario(
    engine: Engine, project: str, subnet: str, ip: str, port: int, port_mode: bool = True,
    after_reboot: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """The household's life: up, both modes answer, a foreign ACCEPT above our hook, reload,
    reboot, mode switch, down.

    The first upstream is the LAN's router (topology.py), which serves its own names only and
    refuses the rest, so those go to the "internet" resolver. With direct mode it has the route
    the user adds for it and sees the appliance's own address; in port mode alone it has none
    and must see the host's (masqueraded), or its replies would be lost.

    Without `port_mode` (an engine with `"iptables": false`) it runs direct mode alone, after
    checking that the default (both modes) is refused with one line and changes nothing.
    `after_reboot` checks more once everything came back.
    """
    variables = {
        "PROJECT": project,
        "BRIDGE": f"br-{project}"[:15],
        "SUBNET": subnet,
        "DNS_IP": ip,
        "PORT": str(port),
        "WEB_PORT": str(port + 3000),  # the web page's, beside a deployment of the host's own
        "UPSTREAMS": f"{ROUTER} 198.51.100.53",
        "MODE": "both" if port_mode else "direct",
    }
    topo = Topology(subnet=subnet, pid=engine.pid, switch=True, router=True, router_zone=True)
    topo.create()
    topo.route_on_router()  # direct mode is asked for: the LAN routes the subnet
    variables |= {"LAN_INTERFACE": topo.lan_if, "LAN_CIDR": LAN_NET}
    before = engine.firewall()
    ours = (variables["BRIDGE"], subnet.rsplit(".", 1)[0] + ".", topo.lan_if, f"{port}")
    # `make down` keeps the cache, as a reboot does: an earlier run's would answer the names
    # this one needs resolved through the upstream (after a flush, say) without it.
    engine.run("docker", "volume", "rm", "-f", f"{project}_cache")
    upped = False
    try:
        if not port_mode:
            proc = make(engine, "up", **(variables | {"MODE": "both"}))
            assert proc.returncode != 0, proc.stdout
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("netsetup: error")]
            assert len(errors) == 1 and '"iptables": false' in errors[0], proc.stderr
            assert "Traceback" not in proc.stderr
            assert_same_firewall(before, engine.firewall(), *ours)
        proc = make(engine, "up", **variables)
        upped = True
        assert proc.returncode == 0, proc.stdout + proc.stderr

        # direct mode: the container's own address, routed via the host
        assert wait_answer(topo, ip, "direct.example.test") == ANSWER
        assert topo.dig(ip, "direct-tcp.example.test", tcp=True) == ANSWER
        # the router, an upstream on the LAN, answers its own names; it routes the subnet, so
        # the appliance's queries reach it unmasqueraded
        assert topo.dig(ip, f"direct.{ROUTER_ZONE}") == ROUTER_ANSWER
        assert topo.router_clients(f"direct.{ROUTER_ZONE}") == {ip}
        if port_mode:  # the host's LAN address on the published port
            assert wait_answer(topo, LAN_HOST, "port.example.test", port) == ANSWER
            assert topo.dig(LAN_HOST, "port-tcp.example.test", port, tcp=True) == ANSWER

        # the appliance saw the client's own address in direct mode ...
        logs = container_logs(engine, project)
        direct = [r for r in logs if r.get("name") == "direct.example.test."]
        assert direct and all(r["client"] == LAN_CLIENT for r in direct), logs[-5:]
        # ... and the upstream saw only the host (masqueraded)
        clients = topo.upstream_clients()
        assert clients and set(clients) == {INET_HOST}, clients
        assert_exposure(topo, ip, port)

        # idempotent: a second `make up` adds nothing and leaves the services alone
        after_up = engine.firewall()
        started = status_of(engine, project)["host_service"]["container"]["started"]
        proc = make(engine, "up", **variables)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_same_firewall(after_up, engine.firewall(), *ours)
        status = status_of(engine, project)
        assert status["host_service"]["container"]["started"] == started, status
        assert status["firewall"]["complete"], status
        assert status["firewall"]["extra"] == [], status
        assert not status["raw_drop"], status["raw_drop"]
        assert status["host_service"]["report"]["repairs"] == 0, status
        # the appliance's own counters, read over the bridge: the digs above were counted
        counts = status["counts"]
        assert counts["queries"] >= (4 if port_mode else 2), counts
        assert counts["cache_entries"] >= 1, counts
        assert "198.51.100.53:53" in counts["upstream_latency_ms"], counts
        proc = engine.run(NETSETUP, "check", "-p", project)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        foreign_accept_is_moved_below(engine, topo, project, ip, status)

        # a flush while running (a firewall reload): repaired with no command typed
        remove_our_rules(engine, project)
        wait_repaired(topo, ip, "after-flush.example.test")
        status = status_of(engine, project)
        report = status["host_service"]["report"]
        assert report["repairs"] >= 1 and report["last_repair"]["what"], report
        assert status["firewall"]["complete"] and not status["firewall"]["extra"], status
        assert_same_firewall(after_up, engine.firewall(), *ours)

        # a reboot: rules and /run gone, the containers start again; all comes back by itself
        remove_our_rules(engine, project)
        run_dir = engine.env.get("NETSETUP_RUN_DIR", "/run/netsetup")
        Path(run_dir, f"{project}.sync.json").unlink(missing_ok=True)
        ids = engine.run(
            "docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"
        ).stdout.split()
        restarted = engine.restart_daemon is not None
        if restarted:
            engine.restart_daemon()  # the nested engine: its daemon restarts the containers
        else:
            engine.run("docker", "restart", *ids, check=True)
        wait_repaired(topo, ip, "after-reboot.example.test")
        if port_mode:
            assert wait_answer(topo, LAN_HOST, "after-reboot-port.example.test", port) == ANSWER
        status = status_of(engine, project)
        assert status["firewall"]["complete"] and not status["firewall"]["extra"], status
        # the restarted service says what it put back when it started
        assert status["host_service"]["report"]["first_sync"]["found"], status
        assert_exposure(topo, ip, port)
        if after_reboot is not None:
            after_reboot()

        # switching to port mode and back keeps the guarantees; the metrics switch opens 9153
        switched = {"MODE": "port"} if port_mode else {}
        proc = make(engine, "up", **(variables | switched | {"METRICS_FROM_LAN": "1"}))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if port_mode:
            assert wait_answer(topo, LAN_HOST, "port-only.example.test", port) == ANSWER
            # port mode alone: nothing routes the subnet, the router sees the host
            topo.route_on_router(present=False)
            name = f"port-only.{ROUTER_ZONE}"
            assert topo.dig(LAN_HOST, name, port) == ROUTER_ANSWER
            assert topo.router_clients(name) == {LAN_HOST}
            topo.route_on_router()
        assert_exposure(topo, ip, port, metrics_from_lan=True)
        proc = make(engine, "up", **variables)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert wait_answer(topo, ip, "back.example.test") == ANSWER
        assert_same_firewall(after_up, engine.firewall(), *ours, engine_restarted=restarted)

        proc = make(engine, "down", **variables)
        upped = False
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_same_firewall(before, engine.firewall(), *ours, engine_restarted=restarted)
        left = engine.run(
            "docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"
        ).stdout.split()
        assert not left, "a service was left behind"
    finally:
        if upped:
            make(engine, "down", **variables)
        engine.run("docker", "volume", "rm", "-f", f"{project}_cache")
        topo.destroy()


@pytest.fixture(scope="module")
def appliance_image() -> tuple[str, ...]:
    proc = subprocess.run(["make", "-o", "venv", "image"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"make image failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return IMAGES


def test_end_to_end_host_engine(appliance_image: tuple[str, ...]) -> None:
    scenario(Engine(), project="nstest", subnet="172.31.163.0/24", ip="172.31.163.53", port=5163)


def nested_scenario(
    suite: str, dockerd_args: str = "", port_mode: bool = True, legacy_iptables: bool = False
) -> None:
    """The scenario on the nested engine of a Debian suite (dind.py), started with
    `dockerd_args` (and iptables-legacy)."""
    if not shutil.which("mmdebstrap") and not dind.image_exists(dind.image_for(suite)):
        pytest.skip("mmdebstrap missing and no cached nested-engine image")
    dind.build_image(suite)
    name = f"netsetup-test-dind-{os.getpid()}"
    nested = dind.start_engine(name, suite, dockerd_args, legacy_iptables)

    def shares_the_lock() -> None:
        """The daemon restarted without /run/xtables.lock (dind.py): it made the file before it
        started the containers, so the host service's mount found a file (a missing source
        would have become a directory, and iptables would fail on it), and that mount is it."""
        lock = subprocess.run(["docker", "exec", name, "stat", "-c", "%F", "/run/xtables.lock"],
                              capture_output=True, text=True)  # fmt: skip
        assert lock.stdout.strip() == "regular empty file", lock
        ids = nested.docker("ps", "-q", "--filter", "label=com.docker.compose.service=netsetup",
                            capture_output=True, text=True).stdout.split()  # fmt: skip
        mounts = json.loads(nested.docker("inspect", "-f", "{{json .Mounts}}", *ids,
                                          capture_output=True, text=True).stdout)  # fmt: skip
        sources = {m["Destination"]: m["Source"] for m in mounts}
        assert sources.get("/run/xtables.lock") == "/run/xtables.lock", sources
    try:
        save = subprocess.Popen(["docker", "save", *IMAGES], stdout=subprocess.PIPE)
        nested.docker("load", stdin=save.stdout, check=True, capture_output=True)
        assert save.wait() == 0
        version = nested.docker(
            "version", "--format", "{{.Server.Version}}", capture_output=True, text=True
        ).stdout
        assert version.startswith(dind.ENGINES[suite]), version
        engine = Engine(
            pid=nested.dockerd_pid(), env=nested.env(), restart_daemon=nested.restart_daemon
        )
        scenario(
            engine, project="nsnested", subnet="172.31.53.0/24", ip="172.31.53.53", port=5053,
            port_mode=port_mode, after_reboot=shares_the_lock if legacy_iptables else None,
        )  # fmt: skip
    finally:
        nested.stop()


@pytest.mark.nested
@pytest.mark.parametrize("suite", list(dind.ENGINES), ids=lambda s: f"docker{dind.ENGINES[s][:-1]}")
def test_end_to_end_nested_engine(appliance_image: tuple[str, ...], suite: str) -> None:
    nested_scenario(suite)


@pytest.mark.nested
def test_end_to_end_nested_engine_legacy_iptables(appliance_image: tuple[str, ...]) -> None:
    """Legacy tables: the host service shares the engine's xtables lock, from boot on."""
    nested_scenario("sid", legacy_iptables=True)


@pytest.mark.nested
def test_end_to_end_nested_engine_without_iptables(appliance_image: tuple[str, ...]) -> None:
    """`"iptables": false`: the engine writes no rule; ours alone route, confine, masquerade."""
    nested_scenario("sid", dockerd_args="--iptables=false", port_mode=False)


def project_objects(engine: Engine, project: str) -> list[str]:
    """The project's containers, networks and cache volume, as the engine lists them."""
    label = f"label=com.docker.compose.project={project}"
    found = []
    for cmd in (["ps", "-aq", "--filter", label], ["network", "ls", "-q", "--filter", label],
                ["volume", "ls", "-q", "--filter", f"name={project}_cache"]):  # fmt: skip
        found += engine.run("docker", *cmd).stdout.split()
    return found


def forwarder_config(engine: Engine, project: str) -> str:
    """The host file the running forwarder has as its config file (/dev/null when none)."""
    ids = engine.run(
        "docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
        "--filter", "label=com.docker.compose.service=dnsproxy",
    ).stdout.split()  # fmt: skip
    assert len(ids) == 1, ids
    mounts = json.loads(engine.run("docker", "inspect", "-f", "{{json .Mounts}}", ids[0]).stdout)
    return {m["Destination"]: m["Source"] for m in mounts}["/etc/dnsproxy/dnsproxy.conf"]


def assert_failed_late(proc: subprocess.CompletedProcess) -> None:
    """`up` failed where it waits for the forwarder: after compose started both containers and
    the host service reported the plan applied (host.verify waits for that first)."""
    assert proc.returncode != 0, proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("netsetup: error")]
    assert len(errors) == 1 and "dnsproxy exits after it starts" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_failed_up_rolls_back(appliance_image: tuple[str, ...], tmp_path: Path) -> None:
    """An `up` that fails late undoes everything it did. The failure: a config file the
    forwarder refuses (it exits at start), with a setting that changes the host plan too
    (METRICS_FROM_LAN), so the host service has applied another plan by then.

    A first `up` leaves the host as it started: no rule, container, network, volume or record.
    A repeated `up` over a running deployment puts that deployment back as it was: its record,
    its rules, its containers answering with its settings (no config file)."""
    engine = Engine()
    project, subnet, ip, port = "nsrollback", "172.31.164.0/24", "172.31.164.53", 5164
    topo = Topology(subnet=subnet)
    topo.create()
    variables = {
        "PROJECT": project, "BRIDGE": f"br-{project}", "SUBNET": subnet, "DNS_IP": ip,
        "PORT": str(port), "WEB_PORT": str(port + 3000), "UPSTREAMS": "198.51.100.53",
        "LAN_INTERFACE": topo.lan_if, "LAN_CIDR": LAN_NET,
    }  # fmt: skip
    refused = tmp_path / "dnsproxy.conf"
    refused.write_text("this is [not a config file\n")
    failing = variables | {"CONFIG": str(refused), "METRICS_FROM_LAN": "1"}
    ours = (project, subnet.rsplit(".", 1)[0] + ".", topo.lan_if, str(port))
    record = state.path_for(project)
    engine.run("docker", "volume", "rm", "-f", f"{project}_cache")
    before = engine.firewall()
    try:
        assert_failed_late(make(engine, "up", **failing))
        assert_same_firewall(before, engine.firewall(), *ours)
        assert not project_objects(engine, project), "a container, network or volume was left"
        assert not record.exists()

        proc = make(engine, "up", **variables)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert wait_answer(topo, ip, "first.example.test") == ANSWER
        running, saved = engine.firewall(), record.read_text()
        report = status_of(engine, project)["host_service"]["report"]

        assert_failed_late(make(engine, "up", **failing))
        assert record.read_text() == saved
        assert forwarder_config(engine, project) == "/dev/null"
        assert wait_answer(topo, ip, "put-back.example.test") == ANSWER
        assert topo.dig(LAN_HOST, "put-back-port.example.test", port) == ANSWER
        assert_same_firewall(running, engine.firewall(), *ours)
        status = status_of(engine, project)
        assert status["host_service"]["report"]["deployment"] == report["deployment"], status
        assert status["firewall"]["complete"] and not status["firewall"]["extra"], status

        proc = make(engine, "down", **variables)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_same_firewall(before, engine.firewall(), *ours)
    finally:
        engine.run(NETSETUP, "down", "-p", project)
        engine.run("docker", "volume", "rm", "-f", f"{project}_cache")
        topo.destroy()
