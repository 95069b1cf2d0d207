"""End to end: `make up`, a LAN client resolving both ways, `make down`, the firewall as it was.

The topology (topology.py) has a LAN client and an "internet" resolver in namespaces of their own;
the resolver cannot route back to the appliance subnet, so answers arrive only if the host
masquerades the appliance's queries. Run against this host's engine and against a nested Docker
28 engine (dind.py), where netsetup runs in the nested engine's network namespace
(``nsenter -t PID -n``) and talks to its socket (DOCKER_HOST).

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
from topology import INET_HOST, LAN_CLIENT, LAN_HOST, LAN_NET, Topology

REPO = Path(__file__).resolve().parents[2]
NETSETUP = str(Path(sys.executable).with_name("netsetup"))
IMAGE = "dnsproxy:latest"
ANSWER = "198.51.100.200"

pytestmark = [
    pytest.mark.netns,
    pytest.mark.docker,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("docker") or not shutil.which("dig"),
        reason="needs root, Docker and dig",
    ),
]


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
        """Every table of both iptables flavours, normalized, plus IPv4 forwarding."""
        nft = normalize(self.run("iptables-nft-save").stdout)
        legacy = normalize(self.run("iptables-legacy-save").stdout)
        forward = self.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()
        return {"nft": nft, "legacy": legacy, "ip_forward": forward}


def assert_same_firewall(before: dict, after: dict, *ours: str) -> None:
    """`iptables-save` after equals before, per table.

    Strict under CI, where nothing else runs. On a shared development host other deployments
    may change Docker's rules meanwhile; there, every differing line must at least not be ours
    (no netsetup chain or comment, none of our bridge, subnet, LAN interface or port).
    """
    if os.environ.get("CI") or before == after:
        assert after == before
        return
    assert after["ip_forward"] == before["ip_forward"]
    for flavour in ("nft", "legacy"):
        for table in set(before[flavour]) | set(after[flavour]):
            old, new = set(before[flavour].get(table, [])), set(after[flavour].get(table, []))
            mine = [ln for ln in old ^ new if any(word in ln for word in ("etsetup", *ours))]
            assert not mine, f"{flavour}/{table}: {mine}"


def make(engine: Engine, target: str, **variables: str):
    args = [f"{k}={v}" for k, v in variables.items()]
    return engine.run("make", "-o", "venv", "-o", "deps", "-o", "image", target, *args)


def container_logs(engine: Engine, project: str) -> list[dict]:
    ids = engine.run(
        "docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"
    ).stdout.split()
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


def scenario(engine: Engine, project: str, subnet: str, ip: str, port: int) -> None:
    variables = {
        "PROJECT": project,
        "BRIDGE": f"br-{project}"[:15],
        "SUBNET": subnet,
        "DNS_IP": ip,
        "PORT": str(port),
        "UPSTREAMS": "198.51.100.53",
        "MODE": "both",
    }
    topo = Topology(subnet=subnet, pid=engine.pid)
    topo.create()
    variables |= {"LAN_INTERFACE": topo.lan_if, "LAN_CIDR": LAN_NET}
    before = engine.firewall()
    ours = (variables["BRIDGE"], subnet.rsplit(".", 1)[0] + ".", topo.lan_if, f"{port}")
    upped = False
    try:
        proc = make(engine, "up", **variables)
        upped = True
        assert proc.returncode == 0, proc.stdout + proc.stderr

        # direct mode: the container's own address, routed via the host
        assert wait_answer(topo, ip, "direct.example.test") == ANSWER
        assert topo.dig(ip, "direct-tcp.example.test", tcp=True) == ANSWER
        # port mode: the host's LAN address on the published port
        assert wait_answer(topo, LAN_HOST, "port.example.test", port) == ANSWER
        assert topo.dig(LAN_HOST, "port-tcp.example.test", port, tcp=True) == ANSWER

        # the appliance saw the client's own address in direct mode ...
        logs = container_logs(engine, project)
        direct = [r for r in logs if r.get("name") == "direct.example.test."]
        assert direct and all(r["client"] == LAN_CLIENT for r in direct), logs[-5:]
        # ... and the upstream saw only the host (masqueraded)
        clients = topo.upstream_clients()
        assert clients and set(clients) == {INET_HOST}, clients

        # idempotent: a second `make up` adds nothing
        after_up = engine.firewall()
        proc = make(engine, "up", **variables)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_same_firewall(after_up, engine.firewall(), *ours)

        status = json.loads(engine.run(NETSETUP, "status", "-p", project, "--json").stdout)
        assert status["firewall"]["complete"], status
        assert status["firewall"]["extra"] == [], status
        assert not status["raw_drop"], status["raw_drop"]
        # the appliance's own counters, read over the bridge: the digs above were counted
        counts = status["counts"]
        assert counts["queries"] >= 4 and counts["cache_entries"] >= 1, counts
        assert list(counts["upstream_latency_ms"]) == ["198.51.100.53:53"], counts
        proc = engine.run(NETSETUP, "check", "-p", project)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        # switching to port mode removes the direct-mode chain and its hook; and back
        proc = make(engine, "up", **(variables | {"MODE": "port"}))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        fw = engine.firewall()
        left = [ln for flavour in ("nft", "legacy") for ln in fw[flavour].get("filter", [])
                if f"NETSETUP-{project}" in ln]  # fmt: skip
        assert not left, left
        status = json.loads(engine.run(NETSETUP, "status", "-p", project, "--json").stdout)
        assert status["firewall"]["complete"] and status["firewall"]["extra"] == [], status
        proc = make(engine, "up", **variables)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_same_firewall(after_up, engine.firewall(), *ours)

        # a restart of the container keeps everything working
        ids = engine.run(
            "docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"
        ).stdout.split()
        engine.run("docker", "restart", *ids, check=True)
        assert wait_answer(topo, ip, "after-restart.example.test") == ANSWER

        # a restart of the daemon: Docker re-creates its chains, our hooks stay
        if engine.restart_daemon is not None:
            engine.restart_daemon()
            assert wait_answer(topo, ip, "after-daemon.example.test") == ANSWER
            assert wait_answer(topo, LAN_HOST, "after-daemon-port.example.test", port) == ANSWER
            status = json.loads(engine.run(NETSETUP, "status", "-p", project, "--json").stdout)
            assert status["firewall"]["complete"], status

        # a host reboot: the container comes back by itself, the rules and the state do not
        # (`down --no-deploy` takes exactly those away); status says so, `up` puts them back
        proc = engine.run(NETSETUP, "down", "-p", project, "--no-deploy")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        status = json.loads(engine.run(NETSETUP, "status", "-p", project, "--json").stdout)
        assert not status["up"] and status["service"], status
        proc = make(engine, "up", **variables)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        status = json.loads(engine.run(NETSETUP, "status", "-p", project, "--json").stdout)
        assert status["firewall"]["complete"] and not status["firewall"]["extra"], status
        assert wait_answer(topo, ip, "after-reboot.example.test") == ANSWER

        proc = make(engine, "down", **variables)
        upped = False
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_same_firewall(before, engine.firewall(), *ours)
    finally:
        if upped:
            make(engine, "down", **variables)
        topo.destroy()


@pytest.fixture(scope="module")
def appliance_image() -> str:
    proc = subprocess.run(["make", "-o", "venv", "image"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"make image failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return IMAGE


def test_end_to_end_host_engine(appliance_image: str) -> None:
    scenario(Engine(), project="nstest", subnet="172.31.163.0/24", ip="172.31.163.53", port=5163)


@pytest.mark.nested
def test_end_to_end_nested_docker28(appliance_image: str) -> None:
    if not shutil.which("mmdebstrap") and not dind.image_exists():
        pytest.skip("mmdebstrap missing and no cached nested-engine image")
    dind.build_image()
    nested = dind.start_engine(f"netsetup-test-dind-{os.getpid()}")
    try:
        save = subprocess.Popen(["docker", "save", appliance_image], stdout=subprocess.PIPE)
        nested.docker("load", stdin=save.stdout, check=True, capture_output=True)
        assert save.wait() == 0
        version = nested.docker(
            "version", "--format", "{{.Server.Version}}", capture_output=True, text=True
        ).stdout
        assert version.startswith(dind.ENGINE_MAJOR), version
        engine = Engine(
            pid=nested.dockerd_pid(), env=nested.env(), restart_daemon=nested.restart_daemon
        )
        scenario(engine, project="nsnested", subnet="172.31.53.0/24", ip="172.31.53.53", port=5053)
    finally:
        nested.stop()


def test_failed_up_rolls_back(appliance_image: str, tmp_path: Path) -> None:
    """A failure at the last step (the state file cannot be written) undoes every step before
    it: firewall rules applied, service deployed. The host ends as it started."""
    engine = Engine()
    engine.env["NETSETUP_STATE_DIR"] = "/proc/netsetup-cannot-exist"
    topo = Topology(subnet="172.31.164.0/24")
    topo.create()
    before = engine.firewall()
    try:
        proc = make(
            engine, "up", PROJECT="nsrollback", BRIDGE="br-nsrollback", SUBNET="172.31.164.0/24",
            DNS_IP="172.31.164.53", PORT="5164", UPSTREAMS="198.51.100.53",
            LAN_INTERFACE=topo.lan_if, LAN_CIDR=LAN_NET,
        )  # fmt: skip
        assert proc.returncode != 0
        assert "cannot write state file" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert_same_firewall(before, engine.firewall(), "nsrollback", "172.31.164.", "5164")
        left = engine.run(
            "docker", "ps", "-aq", "--filter", "label=com.docker.compose.project=nsrollback"
        ).stdout.split()
        assert not left, "the service was not removed on rollback"
        nets = engine.run("docker", "network", "ls", "-q", "--filter", "name=nsrollback").stdout
        assert not nets.split(), "the network was not removed on rollback"
    finally:
        engine.run(NETSETUP, "down", "-p", "nsrollback")
        topo.destroy()
