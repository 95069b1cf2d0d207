"""Backends applied and removed for real, inside a throwaway network namespace.

Each test builds Docker's chains the way the engine leaves them (FORWARD policy DROP,
DOCKER-USER ending in RETURN, a Docker MASQUERADE rule), applies the plan twice, checks nothing
was added the second time, removes it and compares `iptables-save` per table with the state
before. Every rule touched lives in the namespace and disappears with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import netns_exec, normalize
from netsetup_facts import facts, settings

from netsetup import state as records
from netsetup.firewall.base import forward_jumps_to_docker_user

DRIVER = str(Path(__file__).parent / "fw_driver.py")
SAVE = {"nft": "iptables-nft-save", "legacy": "iptables-legacy-save"}
CLI = {"nft": "iptables-nft", "legacy": "iptables-legacy"}
SAVE6 = {"nft": "ip6tables-nft-save", "legacy": "ip6tables-legacy-save"}
CLI6 = {"nft": "ip6tables-nft", "legacy": "ip6tables-legacy"}

pytestmark = pytest.mark.netns


def docker_like(ns: str, backend: str, engine_firewall: str = "iptables") -> None:
    ipt = CLI[backend]
    netns_exec(ns, ipt, "-P", "FORWARD", "DROP")
    if engine_firewall == "iptables":
        netns_exec(ns, ipt, "-N", "DOCKER-USER")
        netns_exec(ns, ipt, "-A", "DOCKER-USER", "-j", "RETURN")
        netns_exec(ns, ipt, "-A", "FORWARD", "-j", "DOCKER-USER")
    netns_exec(
        ns, ipt, "-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "!", "-o", "docker0",
        "-j", "MASQUERADE",
    )  # fmt: skip


def driver(
    ns: str, backend: str, engine: str, mode: str, action: str, project: str = "dnsapp"
) -> str:
    return netns_exec(ns, sys.executable, DRIVER, backend, engine, mode, action, project).stdout


def save(ns: str, backend: str) -> dict[str, list[str]]:
    return normalize(netns_exec(ns, SAVE[backend]).stdout)


@pytest.mark.parametrize("backend", ["nft", "legacy"])
@pytest.mark.parametrize(
    ("engine", "mode"),
    [("20.10", "both"), ("28", "direct"), ("28", "port"), ("28", "port,lan"), ("28", "lan,ha")],
)
def test_apply_twice_then_remove_restores_tables(
    netns: str, backend: str, engine: str, mode: str
) -> None:
    docker_like(netns, backend)
    before = save(netns, backend)

    driver(netns, backend, engine, mode, "apply")
    once = save(netns, backend)
    assert json.loads(driver(netns, backend, engine, mode, "state"))["complete"]
    driver(netns, backend, engine, mode, "apply")
    assert save(netns, backend) == once, "a second apply changed the tables"

    comments = [ln for t in once.values() for ln in t if ln.startswith("-A") and "NETSETUP" in ln]
    assert comments and all('--comment "netsetup: ' in ln for ln in comments)
    if mode != "port":
        # the hook comes before Docker's RETURN in DOCKER-USER
        user = [ln for ln in once["filter"] if ln.startswith("-A DOCKER-USER")]
        assert user[0].endswith("-j NETSETUP-dnsapp")

    driver(netns, backend, engine, mode, "remove")
    assert save(netns, backend) == before
    driver(netns, backend, engine, mode, "remove")  # removing again is a no-op
    assert save(netns, backend) == before


@pytest.mark.parametrize("backend", ["nft", "legacy"])
@pytest.mark.parametrize("engine", ["29-nftables", "28-noiptables"])
def test_no_docker_user_hooks_from_forward(netns: str, backend: str, engine: str) -> None:
    """No DOCKER-USER (engine nftables backend, or "iptables": false): hook from FORWARD."""
    docker_like(netns, backend, engine_firewall="nftables")
    before = save(netns, backend)
    driver(netns, backend, engine, "both", "apply")
    forward = [ln for ln in save(netns, backend)["filter"] if ln.startswith("-A FORWARD")]
    assert forward[0].endswith("-j NETSETUP-dnsapp")
    driver(netns, backend, engine, "both", "remove")
    assert save(netns, backend) == before


def save6(ns: str, backend: str) -> dict[str, list[str]]:
    return normalize(netns_exec(ns, SAVE6[backend]).stdout)


@pytest.mark.parametrize("backend", ["nft", "legacy"])
@pytest.mark.parametrize(("engine", "mode"), [("20.10", "lan,ipv6"), ("28", "port,lan,ipv6up")])
def test_ipv6_plan_applied_twice_then_removed(
    netns: str, backend: str, engine: str, mode: str
) -> None:
    """The IPv6 share of the plan goes to ip6tables through the same backend: hooked from
    FORWARD where the engine writes no ip6tables (20.10), from DOCKER-USER where it does (28);
    idempotent; removed to the byte, IPv4 tables included."""
    docker_like(netns, backend)
    if engine == "28":
        ipt6 = CLI6[backend]
        netns_exec(netns, ipt6, "-P", "FORWARD", "DROP")
        netns_exec(netns, ipt6, "-N", "DOCKER-USER")
        netns_exec(netns, ipt6, "-A", "DOCKER-USER", "-j", "RETURN")
        netns_exec(netns, ipt6, "-A", "FORWARD", "-j", "DOCKER-USER")
    before, before6 = save(netns, backend), save6(netns, backend)

    driver(netns, backend, engine, mode, "apply")
    once6 = save6(netns, backend)
    state = json.loads(driver(netns, backend, engine, mode, "state"))
    assert state["complete"] and state["complete6"] and not state["extra6"]
    driver(netns, backend, engine, mode, "apply")
    assert save6(netns, backend) == once6, "a second apply changed ip6tables"

    hook_chain = "DOCKER-USER" if engine == "28" else "FORWARD"
    hooks = [ln for ln in once6["filter"] if ln.startswith(f"-A {hook_chain}")]
    assert hooks[0].endswith("-j NETSETUP-dnsapp")
    assert any("-d fd53:53::53/128" in ln and "--dport 53" in ln and ln.endswith("-j ACCEPT")
               for ln in once6["filter"])  # fmt: skip
    assert any("--to-destination [fd53:53::53]:53" in ln for ln in once6["nat"])
    masquerade = [ln for ln in once6["nat"] if ln.endswith("-j MASQUERADE")]
    assert bool(masquerade) == mode.endswith("ipv6up"), "IPv6 masquerade only for IPv6 upstreams"

    driver(netns, backend, engine, mode, "remove")
    assert (save(netns, backend), save6(netns, backend)) == (before, before6)


def test_docker_user_detected_from_the_dump() -> None:
    with_user = "*filter\n:FORWARD DROP [0:0]\n:DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\n"
    assert forward_jumps_to_docker_user(with_user)
    assert not forward_jumps_to_docker_user("*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n")
    # a chain left behind that FORWARD no longer jumps to would not see forwarded traffic
    assert not forward_jumps_to_docker_user(
        "*filter\n:FORWARD ACCEPT [0:0]\n:DOCKER-USER - [0:0]\n"
    )


def test_remove_finds_hooks_moved_by_the_engine(netns: str) -> None:
    """After a daemon restart Docker re-inserts its own rules above ours: removal still works."""
    docker_like(netns, "nft")
    before = save(netns, "nft")
    driver(netns, "nft", "20.10", "both", "apply")
    netns_exec(netns, "iptables-nft", "-t", "nat", "-I", "POSTROUTING", "-j", "RETURN")
    driver(netns, "nft", "20.10", "both", "apply")
    nat = [ln for ln in save(netns, "nft")["nat"] if "-j NETSETUP-dnsapp" in ln]
    assert len(nat) == 1, "a moved hook was added a second time"
    netns_exec(netns, "iptables-nft", "-t", "nat", "-D", "POSTROUTING", "-j", "RETURN")
    driver(netns, "nft", "20.10", "both", "remove")
    assert save(netns, "nft") == before


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_every_mode_keeps_the_default_deny(netns: str, backend: str) -> None:
    """Port mode needs the filter chain as much as direct mode (the published port is DNATed to
    the container and routed like direct traffic): switching modes keeps it, whole and exact.
    Only the masquerade follows the modes (the LAN is left out only where direct mode's route
    is), rewritten in place."""
    docker_like(netns, backend)
    before = save(netns, backend)
    driver(netns, backend, "28", "both", "apply")
    both = save(netns, backend)
    assert any(ln.endswith("-j DROP") and "NETSETUP-dnsapp" in ln for ln in both["filter"])
    for mode in ("port", "direct"):
        driver(netns, backend, "28", mode, "apply")
        found = json.loads(driver(netns, backend, "28", mode, "state"))
        assert found["complete"] and found["extra"] == [], (mode, found)
        tables = save(netns, backend)
        assert tables["filter"] == both["filter"], f"{mode}: the filter table changed"
        changed = [ln for ln in tables["nat"] if ln not in both["nat"]]
        assert all("-j MASQUERADE" in ln for ln in changed), (mode, changed)
        assert len(changed) == (1 if mode == "port" else 0), (mode, changed)
        assert len(tables["nat"]) == len(both["nat"]), mode
    driver(netns, backend, "28", "direct", "remove")
    assert save(netns, backend) == before


def test_apply_replaces_a_hook_from_the_wrong_chain(netns: str) -> None:
    """A hook into our chain from a chain the plan does not hook from (the engine's firewall
    changed) is removed by the next apply, not left beside the new one."""
    docker_like(netns, "nft")
    before = save(netns, "nft")
    driver(netns, "nft", "28", "both", "apply")
    netns_exec(netns, "iptables-nft", "-I", "FORWARD", "1", "-m", "comment", "--comment",
               "netsetup: dnsapp: hook", "-j", "NETSETUP-dnsapp")  # fmt: skip
    assert json.loads(driver(netns, "nft", "28", "both", "state"))["extra"]
    driver(netns, "nft", "28", "both", "apply")
    hooks = [ln for ln in save(netns, "nft")["filter"] if ln.endswith("-j NETSETUP-dnsapp")]
    assert len(hooks) == 1 and hooks[0].startswith("-A DOCKER-USER"), hooks
    driver(netns, "nft", "28", "both", "remove")
    assert save(netns, "nft") == before


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_a_rule_slipped_into_our_chain_is_reported_and_removed(netns: str, backend: str) -> None:
    """Our chain holds the plan's rules and nothing else: an ACCEPT another tool inserted
    ahead of our DROP (or a rule of earlier settings) makes the state inexact, and the next
    apply rewrites the chain as planned."""
    docker_like(netns, backend)
    driver(netns, backend, "28", "both", "apply")
    planned = save(netns, backend)
    netns_exec(netns, CLI[backend], "-I", "NETSETUP-dnsapp", "1", "-j", "ACCEPT")
    state = json.loads(driver(netns, backend, "28", "both", "state"))
    assert state["complete"]
    assert state["extra"] == ["filter/NETSETUP-dnsapp: rules differ from the plan"]
    driver(netns, backend, "28", "both", "apply")
    assert save(netns, backend) == planned


def test_legacy_writes_wait_for_the_xtables_lock(netns: str, tmp_path) -> None:
    """A legacy commit replaces the whole table: while another writer (`iptables --wait`, as
    the engine runs it) holds the lock, ours waits, and goes on once it is released."""
    docker_like(netns, "legacy")
    before = save(netns, "legacy")
    lock = tmp_path / "xtables.lock"
    env = os.environ | {"XTABLES_LOCKFILE": str(lock)}
    held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        writer = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, DRIVER, "legacy", "28", "both", "apply"],
            env=env,
        )  # fmt: skip
        with contextlib.suppress(subprocess.TimeoutExpired):
            writer.wait(1.5)
        assert writer.poll() is None, "applied while another writer held the lock"
        assert save(netns, "legacy") == before
        # the lock is iptables' own: iptables-legacy --wait gives up on it the same way
        proc = netns_exec(netns, "iptables-legacy", "-w", "1", "-N", "PROBE", env=env, check=False)
        assert proc.returncode != 0 and "holding the xtables lock" in proc.stderr, proc.stderr
    finally:
        os.close(held)  # the other writer is done
    assert writer.wait(10) == 0
    assert save(netns, "legacy") != before


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(
    ("engine", "policy", "warned"),
    [("28-noiptables", "ACCEPT", True), ("28-noiptables", "DROP", False), ("28", "ACCEPT", False)],
)
def test_warns_when_forwarding_would_route_everything(
    netns: str, engine: str, policy: str, warned: bool, family: int
) -> None:
    """Forwarding off, no engine to set FORWARD to DROP, policy ACCEPT: `up` says what turning
    forwarding on would open; for IPv6 where LAN_IP6 is served, in ip6tables, with any engine
    (`up` turns IPv6 forwarding on before the engine could set the policy)."""
    warned = warned or (family == 6 and policy == "ACCEPT")
    key = "net/ipv4/ip_forward" if family == 4 else "net/ipv6/conf/all/forwarding"
    netns_exec(netns, "sh", "-c", f"echo 0 > /proc/sys/{key}")
    if family == 6:  # IPv4 already forwards here: its warning is not the one under test
        netns_exec(netns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
    netns_exec(netns, (CLI if family == 4 else CLI6)["nft"], "-P", "FORWARD", policy)
    mode = "lan" if family == 4 else "lan,ipv6"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from netsetup_facts import facts, settings; from netsetup.firewall import get_backend;"
        "from netsetup.host import warn_if_forwarding_opens;"
        "warn_if_forwarding_opens(settings(sys.argv[3]), facts(sys.argv[2]), get_backend('nft'))"
    )
    here = str(Path(__file__).parent)
    proc = netns_exec(netns, sys.executable, "-c", code, here, engine, mode)
    warning = f"IPv{family} forwarding is off and the FORWARD policy is ACCEPT"
    assert (warning in proc.stderr) == warned, proc.stderr
    assert proc.stderr.count("FORWARD policy") == warned, proc.stderr  # the other family is fine
    assert netns_exec(netns, "cat", f"/proc/sys/{key}").stdout.strip() == "0"


def status_in(ns: str) -> dict:
    """`netsetup status --json` run in the namespace, with no engine to ask (the firewall part
    reads only the deployment record and the namespace's tables)."""
    env = os.environ | {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    netsetup = str(Path(sys.executable).with_name("netsetup"))
    return json.loads(netns_exec(ns, netsetup, "status", "-p", "dnsapp", "--json", env=env).stdout)


@pytest.mark.parametrize("backend", ["nft", "legacy"])
@pytest.mark.parametrize("engine", ["28", "28-noiptables"])
def test_a_rule_above_our_hook_is_reported_and_our_hook_moved_back_first(
    netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, engine: str
) -> None:
    """A foreign ACCEPT inserted above our filter hook decides before our chain: everything
    routed to the appliance would pass. `status` must not call that complete; it names the
    rule, and the next apply moves our hook back first (nat hooks alike). Another deployment's
    hook above ours is not foreign: the two stay as they are, no moving back and forth."""
    monkeypatch.setenv("NETSETUP_STATE_DIR", str(tmp_path / "lib"))
    monkeypatch.setenv("NETSETUP_RUN_DIR", str(tmp_path / "run"))
    docker_user = engine == "28"
    docker_like(netns, backend, "iptables" if docker_user else "nftables")
    hook_chain = "DOCKER-USER" if docker_user else "FORWARD"
    mode = "port,direct,lan"
    deployment = records.Deployment.of(settings(mode), facts(engine, backend), backend, "")
    records.save("dnsapp", deployment)
    before = save(netns, backend)

    def found(project: str = "dnsapp") -> dict:
        return json.loads(driver(netns, backend, engine, mode, "state", project))

    def first_rules(table: str, chain: str) -> list[str]:
        lines = [ln for ln in save(netns, backend)[table] if ln.startswith(f"-A {chain} ")]
        return [ln.split(" -j ")[-1] for ln in lines][:3]

    driver(netns, backend, engine, mode, "apply")
    driver(netns, backend, engine, mode, "apply", "other")  # its hooks go above ours
    assert found()["complete"] and found()["hooks_not_first"] == {}
    assert status_in(netns)["firewall"]["complete"]

    ipt = CLI[backend]
    netns_exec(netns, ipt, "-I", hook_chain, "-j", "ACCEPT")
    netns_exec(netns, ipt, "-t", "nat", "-I", "POSTROUTING", "-j", "ACCEPT")
    not_first = {
        f"filter/{hook_chain} -> NETSETUP-dnsapp": f"-A {hook_chain} -j ACCEPT",
        "nat/POSTROUTING -> NETSETUP-dnsapp": "-A POSTROUTING -j ACCEPT",
    }
    assert found() == {"complete": False, "empty": False, "extra": [],
                       "hooks_not_first": not_first}  # fmt: skip
    status = status_in(netns)["firewall"]
    assert not status["complete"] and status["hooks_not_first"] == not_first, status

    driver(netns, backend, engine, mode, "apply")
    assert first_rules("filter", hook_chain) == ["NETSETUP-dnsapp", "ACCEPT", "NETSETUP-other"]
    assert first_rules("nat", "POSTROUTING") == ["NETSETUP-dnsapp", "ACCEPT", "NETSETUP-other"]
    assert found()["complete"] and status_in(netns)["firewall"]["complete"]
    # the other deployment moves its own back above the ACCEPT: above ours, which stays
    assert not found("other")["complete"]
    driver(netns, backend, engine, mode, "apply", "other")
    settled = save(netns, backend)
    assert first_rules("filter", hook_chain) == ["NETSETUP-other", "NETSETUP-dnsapp", "ACCEPT"]
    for project in ("dnsapp", "other"):
        assert found(project)["complete"], project
        driver(netns, backend, engine, mode, "apply", project)
        assert save(netns, backend) == settled, f"{project}: a settled apply moved something"

    for project in ("dnsapp", "other"):
        driver(netns, backend, engine, mode, "remove", project)
    netns_exec(netns, ipt, "-D", hook_chain, "-j", "ACCEPT")
    netns_exec(netns, ipt, "-t", "nat", "-D", "POSTROUTING", "-j", "ACCEPT")
    assert save(netns, backend) == before
