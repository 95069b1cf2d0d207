"""`up`, `down` and `status`: detection, plan, compose and the host service put together.

`up` checks everything that can refuse first, then deploys compose.yaml: the forwarder and the
host service (service.py), which applies the plan and keeps it in place from then on. `up` waits
until the service reports the plan applied, so a `make up` that returns has working rules. Each
step pushes its inverse on an undo stack (moby's pattern), and any failure unwinds it, so an
`up` that fails midway leaves the host as it found it. A second `up` changes nothing: the
deployment record is rewritten the same, and compose leaves both containers alone.

Surviving restarts is the service's job: it starts with the containers after a reboot or a
daemon restart and repairs what a firewall reload removed. `down` is compose down; the service
removes its rules on the way out, and `down` sweeps up after one that could not.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netsetup import deploy, detect, hostnet, service, state, sysctl
from netsetup import metrics as appliance_metrics
from netsetup.errors import BadInput, VerifyFailed
from netsetup.firewall import get_backend
from netsetup.firewall.base import FirewallBackend, rule_lines
from netsetup.firewall.iptables_legacy import XTABLES_LOCK
from netsetup.plan import (
    OPT_MASQUERADE,
    HostFacts,
    Plan,
    Settings,
    compute_plan,
    forwarder_allows,
    render_plan,
)

# The host service's name in compose.yaml.
HOST_SERVICE = "netsetup"


@dataclass
class Options:
    compose_file: Path = Path("compose.yaml")
    firewall: str = "auto"
    dry_run: bool = False
    bridge: str | None = None
    timeout: float = 120


@dataclass
class UndoStack:
    steps: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def push(self, what: str, undo: Callable[[], None]) -> None:
        self.steps.append((what, undo))

    def unwind(self) -> None:
        while self.steps:
            what, undo = self.steps.pop()
            try:
                undo()
            except Exception as exc:  # keep unwinding; report what could not be undone
                print(f"netsetup: rollback of {what} failed: {exc}", file=sys.stderr)


def gather_facts(
    client: Any, settings: Settings, options: Options, bridge: str
) -> tuple[HostFacts, FirewallBackend]:
    engine = detect.engine_info(client)
    iptables = detect.iptables_backend(options.firewall)
    lan = detect.lan(settings.lan_interface, settings.lan_cidr)
    facts = HostFacts(
        engine_version=engine.version,
        engine_firewall=engine.firewall,
        iptables=iptables,
        bridge=bridge,
        lan_interface=lan.interface,
        lan_cidr=lan.cidr,
        lan_address=lan.address,
    )
    backend = get_backend(iptables.value)
    facts = replace(facts, docker_user=backend.has_docker_user())
    return facts, backend


def warn_if_forwarding_opens(facts: HostFacts, backend: FirewallBackend) -> None:
    """Turning IPv4 forwarding on makes the host a router between all its interfaces. An engine
    that manages iptables sets FORWARD's policy to DROP when it does so; where none does and
    the policy is ACCEPT, that is a change beyond the appliance the user should know of."""
    if facts.has_docker_user or sysctl.get("net.ipv4.ip_forward") == "1":
        return
    policies = [ln.split()[1] for ln in backend.save("filter").splitlines()
                if ln.startswith(":FORWARD ")]  # fmt: skip
    if policies == ["ACCEPT"]:
        print(
            "netsetup: warning: IPv4 forwarding is off and the FORWARD policy is ACCEPT: turning "
            "forwarding on for the appliance makes this host route between all its networks; "
            "set the policy to DROP (iptables -P FORWARD DROP) unless it should",
            file=sys.stderr,
        )


def describe(plan: Plan, backend: FirewallBackend) -> str:
    return render_plan(plan, backend.describe(plan.firewall))


def raw_drop_lines(backend: FirewallBackend, ip: str) -> list[str]:
    """Docker 28's ``-t raw -A PREROUTING -d IP/32 ! -i BRIDGE -j DROP`` for our container."""
    return [
        line
        for line in rule_lines(backend.save("raw"))
        if f"-d {ip}/32" in line and line.rstrip().endswith("-j DROP")
    ]


def up(settings: Settings, options: Options) -> str:
    """Deploy the forwarder and the host service, wait until the plan is in place; returns the
    rendered plan (printed by the CLI)."""
    if not options.dry_run:
        detect.require_root()
    client = detect.docker_client()
    compose = deploy.Compose(settings, options.compose_file.resolve())
    existing = deploy.inspect(client, settings)
    bridge = (
        options.bridge
        or (existing.bridge if existing else None)
        or compose.configured_bridge()
        or f"br-{settings.project}"
    )
    facts, backend = gather_facts(client, settings, options, bridge)
    warn_if_forwarding_opens(facts, backend)
    plan = compute_plan(settings, facts)
    if settings.lan and plan.served_lan is None:
        raise BadInput(
            f"--mode lan serves the LAN, but the detected LAN {facts.lan_cidr} is not private: "
            f"set LAN_CIDR={facts.lan_cidr} (--lan-cidr) to serve it"
        )
    if plan.served_lan is None:
        print(
            f"netsetup: warning: the detected LAN {facts.lan_cidr} on {facts.lan_interface} is "
            "not a private network (or is carrier-grade NAT), so the appliance does not serve "
            f"it; to serve it, set LAN_CIDR={facts.lan_cidr} (--lan-cidr)",
            file=sys.stderr,
        )
    detect.check_subnet_free(settings.subnet, bridge)
    if settings.lan and settings.lan_ip:
        # Before anything is claimed; a dry run sends no probe (it would not change the host,
        # but a plan is printed from what is known).
        detect.check_lan_ip(settings.lan_ip, facts.lan_interface, facts.lan_cidr,
                            probe=not options.dry_run)  # fmt: skip
    publishing = existing is not None and any(
        p.split("->")[0].endswith(f":{settings.port}") for p in existing.published
    )
    if settings.published and not publishing:
        detect.check_port_free(settings.port)
    allow = forwarder_allows(plan.served_lan, facts.lan_address)
    if options.dry_run:
        served = f" and {', '.join(allow)}" if allow else " only"
        return describe(plan, backend) + f"# forwarder serves: loopback, private ranges{served}\n"

    deployment = state.Deployment.of(
        settings, facts, options.firewall, str(options.compose_file.resolve())
    )
    # Direct mode publishes on loopback only (the host's own checks): a port on the LAN
    # address would be one more way in, and through an engine's userland proxy an open one.
    publish = facts.lan_address if settings.published else ""
    # Legacy tables beside an engine that writes them: share its lock (see iptables_legacy). The
    # engine creates the file at start, before its containers, so the mount finds it after a boot.
    shared_lock = backend.name == "legacy" and facts.has_docker_user
    lock = XTABLES_LOCK if shared_lock else ""
    if lock:
        Path(lock).touch(exist_ok=True)  # as iptables would: a missing source becomes a directory
    compose = deploy.Compose(settings, compose.file, allow, publish, lock)
    undo = UndoStack()
    try:
        # The record first: the host service reads it (a change reaches a running service).
        previous = state.load(settings.project)
        state.save(settings.project, deployment)
        undo.push("deployment record", lambda: restore_record(settings.project, previous))
        running = existing is not None and existing.health in ("healthy", "running")
        if not running:  # before, so that a compose up failing halfway is undone too
            cache = deploy.cache_volume(settings.project)
            if not deploy.volume_exists(client, cache):  # a cache kept by `down` stays
                undo.push("cache volume", lambda: deploy.remove_volume(client, cache))
            undo.push("compose up", lambda: down_services(settings.project, compose))
        compose.up()
        deployed_at = time.time()
        deployed = deploy.wait_healthy(client, settings, options.timeout)
        verify_network(plan, deployed)
        # Only now is it certain the engine had its chance to create its chains (for its first
        # network): none means it runs with "iptables": false and publishes nothing itself.
        if settings.published and not backend.has_docker_user() and facts.engine_firewall == (
            "iptables"
        ):
            raise VerifyFailed(
                'the engine runs with "iptables": false, so it cannot publish port mode in a '
                "way our rules confine (every client would look like its proxy): use "
                "--mode direct (MODE=direct)"
            )
        deploy.wait_synced(settings.project, deployment.fingerprint(), deployed_at, options.timeout)
        if plan.verify_no_raw_drop:
            drops = raw_drop_lines(backend, settings.ip)
            if drops:
                raise VerifyFailed(
                    f"the engine drops routed traffic to {settings.ip} ({drops[0]}): the network "
                    "must have gateway_mode_ipv4=nat-unprotected (recreate it: make down; make up)"
                )
    except BaseException:
        undo.unwind()
        raise
    return describe(plan, backend)


def restore_record(project: str, previous: state.Deployment | None) -> None:
    if previous is None:
        state.delete(project)
    else:
        state.save(project, previous)


def down_services(project: str, compose: deploy.Compose) -> None:
    compose.down()
    sweep(project)


def sweep(project: str) -> None:
    """What a host service left behind (it was killed, or never started): its chains and
    hooks, the sysctls it changed (from its report), the report."""
    record = state.load_sync(project) or {}
    backend = get_backend(record.get("backend") or detect.iptables_backend().value)
    service.remove_host_plan(
        backend, project, record.get("sysctls_before") or {}, state.load(project)
    )


def verify_network(plan: Plan, deployed: deploy.Deployed) -> None:
    """Warn (not fail) when the network differs from what the plan assumes."""
    if deployed.options.get(OPT_MASQUERADE, "true") != "false":
        print(
            f"netsetup: warning: network {deployed.network} masquerades all its traffic "
            "(enable_ip_masquerade is not false): LAN clients will appear as the host",
            file=sys.stderr,
        )
    if deployed.ip and deployed.ip != plan.settings.ip:
        raise VerifyFailed(
            f"container has address {deployed.ip}, expected {plan.settings.ip}: "
            "compose.yaml must fix the address to DNS_IP"
        )


def down(project: str, options: Options) -> list[str]:
    """Stop both services (the host service removes its rules and puts the sysctls back)."""
    detect.require_root()
    saved = state.load(project)
    settings = saved.to_settings() if saved else Settings(project=project)
    compose_file = Path(saved.compose_file) if saved and saved.compose_file else None
    compose = deploy.Compose(settings, (compose_file or options.compose_file).resolve())
    done: list[str] = []
    if compose.file.exists():
        detect.docker_client()
        down_services(project, compose)
        done.append("services stopped and removed (compose down); host rules removed")
    else:
        sweep(project)
        done.append(f"no compose file {compose.file}: host rules removed only")
    state.delete(project)
    return done


def status(project: str, options: Options) -> dict:
    """A snapshot for humans and scripts: engine, services, what the host service reports,
    which pieces of the plan are in place, sysctls, the appliance's counters."""
    saved = state.load(project)
    settings = saved.to_settings() if saved else Settings(project=project)
    out: dict[str, Any] = {"project": project, "state_file": str(state.path_for(project))}
    out["up"] = saved is not None
    try:
        client = detect.docker_client()
        engine = detect.engine_info(client)
        out["engine"] = {"version": engine.version, "firewall": engine.firewall}
        deployed = deploy.inspect(client, settings)
        helper = deploy.inspect_container(client, project, HOST_SERVICE)
    except Exception as exc:
        out["engine"] = {"error": str(exc)}
        deployed, helper = None, None
    out["service"] = deployed.__dict__ if deployed else None
    record = state.load_sync(project)
    out["host_service"] = {"container": helper, "report": record}
    backend_name = (record or {}).get("backend") or (
        saved.firewall if saved and saved.firewall != "auto" else None
    )
    backend = get_backend(backend_name or detect.iptables_backend(options.firewall).value)
    out["iptables"] = backend.name
    if saved:
        facts = saved.facts(detect.IptablesBackend(backend.name), backend.has_docker_user())
        plan = compute_plan(settings, facts)
        fw = backend.state(plan.firewall)
        out["settings"] = saved.settings
        out["lan"] = {
            "interface": saved.lan_interface,
            "cidr": saved.lan_cidr,
            "address": saved.lan_address,
            "served": plan.served_lan,
        }
        out["firewall"] = {
            "complete": fw.complete,
            "extra": fw.extra,
            "chains": fw.chains_present,
            "hooks": fw.hooks_present,
            "hooks_not_first": fw.hooks_not_first,
            "rules": fw.rules_present,
        }
        out["raw_drop"] = raw_drop_lines(backend, settings.ip)
        if plan.neighbours or plan.routes:
            out["lan_address"] = hostnet.state(plan.neighbours, plan.routes)
    out["sysctl"] = {"net.ipv4.ip_forward": sysctl.get("net.ipv4.ip_forward")}
    if deployed and deployed.ip:
        out["counts"] = appliance_metrics.fetch(deployed.ip)
    return out
