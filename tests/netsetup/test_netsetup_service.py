"""The host service as a process, inside a throwaway network namespace.

What the appliance relies on after a reboot or a firewall reload, proved on real iptables and
the namespace's own sysctls: started with a deployment record, the service applies the plan and
turns forwarding on; a flush is put back within a few syncs and counted; SIGTERM leaves the
tables and the sysctl exactly as they were before it started. The end-to-end tests show the
same inside the containers, more slowly; this one covers each iptables flavour, the flavour
detection, and an engine that runs with `"iptables": false`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import netns_exec
from netsetup_facts import facts, settings
from test_netsetup_backends import CLI, SAVE, docker_like, save

from netsetup import state

pytestmark = pytest.mark.netns
PROJECT = "dnsapp"
FORWARDING = "/proc/sys/net/ipv4/ip_forward"
RESTORE = {"nft": "iptables-nft-restore", "legacy": "iptables-legacy-restore"}
NETSETUP = str(Path(sys.executable).with_name("netsetup"))


class Service:
    """`python -m netsetup.service` in the namespace, as its container runs it."""

    def __init__(self, ns: str, project: str = PROJECT) -> None:
        env = os.environ | {"NETSETUP_PROJECT": project, "NETSETUP_SYNC_INTERVAL": "0.2"}
        self.project = project
        self.report_path = state.sync_path_for(project)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "netsetup.service"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def report(self) -> dict:
        return state.load_sync(self.project) or {}

    def wait(self, done, seconds: float = 10.0) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            report = self.report()
            if report and done(report):
                return report
            assert self.proc.poll() is None, self.proc.communicate()[0]
            time.sleep(0.05)
        raise AssertionError(f"the service did not get there: {self.report()}")

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        return self.proc.returncode, out


def forwarding(ns: str) -> str:
    return netns_exec(ns, "cat", FORWARDING).stdout.strip()


def host_forwarding_off(ns: str) -> None:
    """A host that does not route (a new namespace here starts with forwarding on)."""
    netns_exec(ns, "sh", "-c", f"echo 0 > {FORWARDING}")
    assert forwarding(ns) == "0"


def reload_firewall(ns: str, flavour: str, saved: str) -> None:
    """What ufw or firewalld do on reload: load their own saved ruleset, which lacks ours."""
    netns_exec(ns, RESTORE[flavour], input=saved)


@pytest.fixture
def own_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployment record and report in the test's own directories (the processes inherit)."""
    monkeypatch.setenv("NETSETUP_STATE_DIR", str(tmp_path / "lib"))
    monkeypatch.setenv("NETSETUP_RUN_DIR", str(tmp_path / "run"))


@pytest.mark.parametrize(
    ("engine", "firewall", "flavour"),
    [
        ("20.10", "auto", "nft"),  # "auto": the service finds the flavour Docker's rules are in
        ("28", "auto", "legacy"),
        ("28-noiptables", "nft", "nft"),  # no DOCKER-USER: hooked from FORWARD itself
    ],
)
def test_service_applies_repairs_and_removes(
    netns: str, own_state: None, engine: str, firewall: str, flavour: str
) -> None:
    docker_like(netns, flavour, "none" if engine.endswith("-noiptables") else "iptables")
    host_forwarding_off(netns)
    saved = netns_exec(netns, SAVE[flavour]).stdout
    before = save(netns, flavour)
    deployment = state.Deployment.of(settings("both"), facts(engine, flavour), firewall, "")
    state.save(PROJECT, deployment)

    service = Service(netns)
    try:
        report = service.wait(lambda r: r["complete"])
        assert (report["backend"], report["repairs"]) == (flavour, 0), report
        assert report["deployment"] == deployment.fingerprint(), report
        found = report["first_sync"]["found"]
        assert any(f"NETSETUP-{PROJECT}" in piece for piece in found), found
        assert forwarding(netns) == "1"
        assert "sysctl net.ipv4.ip_forward was 0" in found, found
        applied = save(netns, flavour)
        assert applied != before

        reload_firewall(netns, flavour, saved)
        assert save(netns, flavour) == before
        report = service.wait(lambda r: r["repairs"] == 1 and r["complete"])
        assert report["last_repair"]["what"], report
        assert save(netns, flavour) == applied  # put back exactly, in the same places
        syncs = report["syncs"]  # three more syncs, done, find nothing to do
        report = service.wait(lambda r: r["syncs"] >= syncs + 3)
        assert report["repairs"] == 1, report
    finally:
        code, out = service.stop()
    assert code == 0, out
    assert "repaired:" in out and "removed the host plan" in out, out
    assert not service.report_path.exists()
    assert save(netns, flavour) == before
    assert forwarding(netns) == "0"


def test_kill_during_the_first_sync_keeps_the_hosts_forwarding(
    netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_state: None
) -> None:
    """SIGKILL in the middle of the first sync, right after the service turned forwarding on:
    its report already holds the host's value, so `down`'s sweep puts it back.

    The service is stopped there by the iptables lock, which its legacy backend takes before it
    writes (the lock file is the test's own, through XTABLES_LOCKFILE): it has set the sysctls
    and waits for the lock, and the test kills it once forwarding is on."""
    lock = tmp_path / "xtables.lock"
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lock))
    docker_like(netns, "legacy")
    host_forwarding_off(netns)
    before = save(netns, "legacy")
    record = state.Deployment.of(settings("both"), facts("20.10", "legacy"), "legacy", "")
    state.save(PROJECT, record)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        service = Service(netns)
        try:
            deadline = time.monotonic() + 10
            while forwarding(netns) != "1":
                assert time.monotonic() < deadline, service.report()
                assert service.proc.poll() is None, service.proc.communicate()[0]
                time.sleep(0.02)
        finally:
            service.proc.kill()
            service.proc.wait()
    assert save(netns, "legacy") == before  # it was stopped before its firewall step
    proc = netns_exec(netns, NETSETUP, "down", "-p", PROJECT, "-f", "/nonexistent/compose.yaml")
    assert "host rules removed only" in proc.stderr, proc.stderr
    assert forwarding(netns) == "0"
    assert save(netns, "legacy") == before


@pytest.mark.skipif(
    not (shutil.which("docker-compose") or shutil.which("docker")), reason="needs compose"
)
def test_down_sweeps_when_compose_fails(
    netns: str, tmp_path: Path, own_state: None
) -> None:  # fmt: skip
    """The compose file broke since `up`: compose down fails, and `down` still removes what a
    host service that could not clean up left (it was killed), then reports compose's failure
    in one line and a non-zero exit."""
    project = "nsdownfail"  # not a project of a real deployment on this engine, whatever happens
    docker_like(netns, "nft")
    host_forwarding_off(netns)
    before = save(netns, "nft")
    broken = tmp_path / "compose.yaml"
    broken.write_text("services: [\n")
    record = state.Deployment.of(dataclasses.replace(settings("both"), project=project),
                                 facts("20.10", "nft"), "nft", str(broken))  # fmt: skip
    state.save(project, record)
    service = Service(netns, project)
    try:
        service.wait(lambda r: r["complete"])
    finally:
        service.proc.kill()
        service.proc.wait()
    assert save(netns, "nft") != before and forwarding(netns) == "1"
    proc = netns_exec(netns, NETSETUP, "down", "-p", project, check=False)
    assert proc.returncode != 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "compose down failed" in lines[0], proc.stderr
    assert save(netns, "nft") == before
    assert forwarding(netns) == "0"
    assert not state.path_for(project).exists() and not state.sync_path_for(project).exists()


@pytest.mark.parametrize(("engine", "flavour"), [("28", "nft"), ("28-noiptables", "legacy")])
def test_service_moves_our_hook_back_first(
    netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str, flavour: str
) -> None:
    """A foreign ACCEPT inserted above our filter hook (in DOCKER-USER, or in FORWARD where we
    hook there) would let everything through: the next sync moves ours back first, counts it
    and logs one line naming the rule. A rule that comes back is moved again, once per sync:
    counted each time, no loop in between."""
    monkeypatch.setenv("NETSETUP_STATE_DIR", str(tmp_path / "lib"))
    monkeypatch.setenv("NETSETUP_RUN_DIR", str(tmp_path / "run"))
    docker_user = not engine.endswith("-noiptables")
    docker_like(netns, flavour, "iptables" if docker_user else "none")
    hook_chain = "DOCKER-USER" if docker_user else "FORWARD"
    deployment = state.Deployment.of(settings("both"), facts(engine, flavour), flavour, "")
    state.save(PROJECT, deployment)
    foreign = ["-I", hook_chain, "-j", "ACCEPT"]
    moved = f"filter/{hook_chain} -> NETSETUP-{PROJECT} not first, moved back above: " \
            f"-A {hook_chain} -j ACCEPT"  # fmt: skip

    def first_in_chain() -> str:
        rules = save(netns, flavour)["filter"]
        return next(ln for ln in rules if ln.startswith(f"-A {hook_chain} "))

    service = Service(netns)
    try:
        service.wait(lambda r: r["complete"])
        netns_exec(netns, CLI[flavour], *foreign)
        report = service.wait(lambda r: r.get("hooks_moved") == 1 and r["complete"])
        assert report["repairs"] == 1 and report["last_repair"]["what"] == [moved], report
        assert first_in_chain().endswith(f"-j NETSETUP-{PROJECT}")
        netns_exec(netns, CLI[flavour], *foreign)  # it climbs again: moved again
        report = service.wait(lambda r: r.get("hooks_moved") == 2 and r["complete"])
        syncs = report["syncs"]
        report = service.wait(lambda r: r["syncs"] >= syncs + 3)
        assert (report["hooks_moved"], report["repairs"]) == (2, 2), report
        assert first_in_chain().endswith(f"-j NETSETUP-{PROJECT}")
    finally:
        code, out = service.stop()
    assert code == 0, out
    logged = [ln for ln in out.splitlines() if "not first" in ln]
    assert logged == [f"netsetup-service: repaired: {moved}"] * 2, out


RESTORE6 = {"nft": "ip6tables-nft-restore", "legacy": "ip6tables-legacy-restore"}


@pytest.mark.parametrize(("engine", "flavour"), [("20.10", "nft"), ("28", "legacy")])
def test_service_keeps_the_ipv6_plan_and_drops_it_when_ipv6_is_off(
    netns: str, own_state: None, engine: str, flavour: str
) -> None:
    """The IPv6 share of the plan (LAN_IP6 given) is applied, repaired after an ip6tables
    reload and checked by the same service as IPv4; a record without IPv6 takes the IPv6
    chains away at the next sync, the IPv4 ones staying; stop leaves ip6tables as it was."""
    from test_netsetup_backends import CLI6, save6  # noqa: PLC0415

    docker_like(netns, flavour)
    if engine == "28":
        for args in (["-N", "DOCKER-USER"], ["-A", "DOCKER-USER", "-j", "RETURN"],
                     ["-A", "FORWARD", "-j", "DOCKER-USER"]):  # fmt: skip
            netns_exec(netns, CLI6[flavour], *args)
    # the interfaces the plan names (LAN_IP's proxy entry and route need them)
    netns_exec(netns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer")
    netns_exec(netns, "ip", "link", "add", "br-dnsapp", "type", "bridge")
    for link in ("eth0", "br-dnsapp"):
        netns_exec(netns, "ip", "link", "set", link, "up")
    saved6 = netns_exec(netns, f"ip6tables-{flavour}-save").stdout
    before6 = save6(netns, flavour)
    record = state.Deployment.of(settings("lan,ipv6"), facts(engine, flavour), flavour, "")
    state.save(PROJECT, record)

    service = Service(netns)
    try:
        report = service.wait(lambda r: r["complete"])
        found = report["first_sync"]["found"]
        assert any(piece.startswith("ipv6 ") for piece in found), found
        applied6 = save6(netns, flavour)
        hook_chain = "DOCKER-USER" if engine == "28" else "FORWARD"
        hooks = [ln for ln in applied6["filter"] if ln.startswith(f"-A {hook_chain} ")]
        assert hooks[0].endswith("-j NETSETUP-dnsapp"), applied6
        assert any("-j DNAT --to-destination [fd53:53::53]:53" in ln for ln in applied6["nat"])

        # a firewall reload, IPv6 side: every table flushed, the saved ruleset loaded
        for table in ("filter", "nat"):
            netns_exec(netns, CLI6[flavour], "-t", table, "-F")
            netns_exec(netns, CLI6[flavour], "-t", table, "-X")
        netns_exec(netns, RESTORE6[flavour], input=saved6)
        report = service.wait(lambda r: r["repairs"] == 1 and r["complete"])
        assert any(w.startswith("ipv6 ") for w in report["last_repair"]["what"]), report
        assert save6(netns, flavour) == applied6

        state.save(PROJECT, state.Deployment.of(settings("lan"), facts(engine, flavour),
                                                flavour, ""))  # fmt: skip
        service.wait(lambda r: r["repairs"] == 2 and r["complete"])
        assert save6(netns, flavour) == before6, "IPv6 switched off: its chains stay"
        assert "NETSETUP-dnsapp" in "\n".join(save(netns, flavour)["filter"])
    finally:
        code, out = service.stop()
    assert code == 0, out
    assert save6(netns, flavour) == before6
