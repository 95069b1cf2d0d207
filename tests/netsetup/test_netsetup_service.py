"""The host service as a process, inside a throwaway network namespace.

What the appliance relies on after a reboot or a firewall reload, proved on real iptables and
the namespace's own sysctls: started with a deployment record, the service applies the plan and
turns forwarding on; a flush is put back within a few syncs and counted; SIGTERM leaves the
tables and the sysctl exactly as they were before it started. The end-to-end tests show the
same inside the containers, more slowly; this one covers each iptables flavour, the flavour
detection, and an engine that runs with `"iptables": false`.
"""

from __future__ import annotations

import os
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


class Service:
    """`python -m netsetup.service` in the namespace, as its container runs it."""

    def __init__(self, ns: str) -> None:
        env = os.environ | {"NETSETUP_PROJECT": PROJECT, "NETSETUP_SYNC_INTERVAL": "0.2"}
        self.report_path = state.sync_path_for(PROJECT)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "netsetup.service"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def report(self) -> dict:
        return state.load_sync(PROJECT) or {}

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


def reload_firewall(ns: str, flavour: str, saved: str) -> None:
    """What ufw or firewalld do on reload: load their own saved ruleset, which lacks ours."""
    netns_exec(ns, RESTORE[flavour], input=saved)


@pytest.mark.parametrize(
    ("engine", "firewall", "flavour"),
    [
        ("20.10", "auto", "nft"),  # "auto": the service finds the flavour Docker's rules are in
        ("28", "auto", "legacy"),
        ("28-noiptables", "nft", "nft"),  # no DOCKER-USER: hooked from FORWARD itself
    ],
)
def test_service_applies_repairs_and_removes(
    netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    engine: str, firewall: str, flavour: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("NETSETUP_STATE_DIR", str(tmp_path / "lib"))
    monkeypatch.setenv("NETSETUP_RUN_DIR", str(tmp_path / "run"))
    docker_like(netns, flavour, "none" if engine.endswith("-noiptables") else "iptables")
    saved = netns_exec(netns, SAVE[flavour]).stdout
    before, forwarding_before = save(netns, flavour), forwarding(netns)
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
        if forwarding_before != "1":
            assert f"sysctl net.ipv4.ip_forward was {forwarding_before}" in found, found
        applied = save(netns, flavour)
        assert applied != before

        reload_firewall(netns, flavour, saved)
        assert save(netns, flavour) == before
        report = service.wait(lambda r: r["repairs"] == 1 and r["complete"])
        assert report["last_repair"]["what"], report
        assert save(netns, flavour) == applied  # put back exactly, in the same places
        time.sleep(0.6)  # three more syncs find nothing to do
        assert service.report()["repairs"] == 1
    finally:
        code, out = service.stop()
    assert code == 0, out
    assert "repaired:" in out and "removed the host plan" in out, out
    assert not service.report_path.exists()
    assert save(netns, flavour) == before
    assert forwarding(netns) == forwarding_before


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
