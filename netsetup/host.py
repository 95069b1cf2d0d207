"""`up`, `down` and `status`: detection, plan and backends put together.

`up` checks everything that can refuse first, then applies step by step; each applied step
pushes its inverse on an undo stack (moby's pattern), and any failure unwinds the stack, so an
`up` that fails midway leaves the host as it found it. A second `up` changes nothing: own chains
are rewritten with identical contents, hooks are added only when missing, sysctls already at
their value are not written, and compose leaves a running service alone.

Surviving restarts: the container keeps its fixed address, so the rules stay valid; a Docker
daemon restart re-creates the engine's chains but never flushes DOCKER-USER or the built-in
POSTROUTING, where our hooks are. Anything else that flushes the tables is repaired by running
`up` again (`status` reports missing hooks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netsetup import deploy, detect, state, sysctl
from netsetup import metrics as appliance_metrics
from netsetup.errors import VerifyFailed
from netsetup.firewall import get_backend
from netsetup.firewall.base import FirewallBackend, rule_lines
from netsetup.plan import (
    OPT_MASQUERADE,
    HostFacts,
    Plan,
    Settings,
    compute_plan,
    own_chains,
    render_plan,
)


@dataclass
class Options:
    compose_file: Path = Path("compose.yaml")
    firewall: str = "auto"
    deploy: bool = True
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
    """Deploy and apply; returns the rendered plan (printed by the CLI)."""
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
    # The forwarder serves a LAN given explicitly whatever its addresses (offices do use public
    # ranges), a detected one only when private (not a VPS provider's subnet).
    allowed_lan = deploy.lan_to_allow(facts.lan_cidr, explicit=settings.lan_cidr is not None)
    if allowed_lan is None:
        print(
            f"netsetup: warning: the detected LAN {facts.lan_cidr} on {facts.lan_interface} is "
            "not a private network, so the appliance does not serve it; to serve it, set "
            f"LAN_CIDR={facts.lan_cidr} (--lan-cidr)",
            file=sys.stderr,
        )
    settings = replace(settings, lan_cidr=allowed_lan)
    compose = deploy.Compose(settings, options.compose_file.resolve())
    detect.check_subnet_free(settings.subnet, bridge)
    publishing = existing is not None and any(
        p.split("->")[0].endswith(f":{settings.port}") for p in existing.published
    )
    if settings.published and not publishing and options.deploy:
        detect.check_port_free(settings.port)
    plan = compute_plan(settings, facts)
    if options.dry_run:
        served = f" and {allowed_lan}" if allowed_lan else " only"
        return describe(plan, backend) + f"# forwarder serves: loopback, private ranges{served}\n"

    undo = UndoStack()
    try:
        previous = state.load(settings.project)
        before = dict(previous.sysctls_before) if previous else {}
        for key, value in plan.sysctls.items():
            old = sysctl.set_value(key, value)
            if old != value:
                before.setdefault(key, old)
                undo.push(f"sysctl {key}", lambda k=key, o=old: sysctl.set_value(k, o))

        if options.deploy:
            running = existing is not None and existing.health in ("healthy", "running")
            compose.up()
            if not running:
                undo.push("compose up", compose.down)
            deployed = deploy.wait_healthy(client, settings, options.timeout)
            # The engine may have created its chains only now (its first network).
            deployed_facts = replace(
                facts, bridge=deployed.bridge, docker_user=backend.has_docker_user()
            )
            if deployed_facts != facts:
                facts = deployed_facts
                plan = compute_plan(settings, facts)
            verify_network(plan, deployed)

        fw_before = backend.state(plan.firewall)
        backend.apply(plan.firewall)
        if not fw_before.complete:
            undo.push("firewall", lambda: backend.remove(own_chains(settings.project)))

        if plan.verify_no_raw_drop:
            drops = raw_drop_lines(backend, settings.ip)
            if drops:
                raise VerifyFailed(
                    f"the engine drops routed traffic to {settings.ip} ({drops[0]}): the network "
                    "must have gateway_mode_ipv4=nat-unprotected (recreate it: make down; make up)"
                )

        state.save(
            settings.project,
            state.State(
                settings=state.settings_dict(settings),
                lan_interface=facts.lan_interface,
                lan_cidr=facts.lan_cidr,
                lan_address=facts.lan_address,
                firewall=backend.name,
                sysctls_before=before,
                compose_file=str(options.compose_file.resolve()),
            ),
        )
    except BaseException:
        undo.unwind()
        raise
    return describe(plan, backend)


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


def down(project: str, options: Options, settings: Settings | None = None) -> list[str]:
    """Remove what `up` added: hooks and own chains, sysctls put back, the service stopped."""
    detect.require_root()
    saved = state.load(project)
    done: list[str] = []
    backend_name = options.firewall
    if backend_name == "auto":
        backend_name = saved.firewall if saved and saved.firewall else None
    backend = get_backend(backend_name or detect.iptables_backend().value)
    backend.remove(own_chains(project))
    done.append(f"firewall rules removed ({backend.name})")
    if saved:
        for key, old in saved.sysctls_before.items():
            sysctl.set_value(key, old)
            done.append(f"sysctl {key} = {old} restored")
    if options.deploy:
        use = settings or (saved.to_settings() if saved else Settings(project=project))
        compose_file = Path(saved.compose_file) if saved and saved.compose_file else None
        compose = deploy.Compose(use, (compose_file or options.compose_file).resolve())
        if compose.file.exists():
            detect.docker_client()
            compose.down()
            done.append("service stopped and removed (compose down)")
    state.delete(project)
    return done


def status(project: str, options: Options) -> dict:
    """A snapshot for humans and scripts: engine, service, firewall pieces, sysctls."""
    saved = state.load(project)
    settings = saved.to_settings() if saved else Settings(project=project)
    out: dict[str, Any] = {"project": project, "state_file": str(state.path_for(project))}
    out["up"] = saved is not None
    try:
        client = detect.docker_client()
        engine = detect.engine_info(client)
        out["engine"] = {"version": engine.version, "firewall": engine.firewall}
        deployed = deploy.inspect(client, settings)
    except Exception as exc:
        out["engine"] = {"error": str(exc)}
        deployed = None
    out["service"] = deployed.__dict__ if deployed else None
    backend_name = saved.firewall if saved and saved.firewall else None
    backend = get_backend(backend_name or detect.iptables_backend(options.firewall).value)
    out["iptables"] = backend.name
    if saved:
        facts = HostFacts(
            engine_version=out["engine"].get("version", "0"),
            engine_firewall=out["engine"].get("firewall", "iptables"),
            iptables=detect.iptables_backend(backend.name),
            bridge=deployed.bridge if deployed else f"br-{project}",
            lan_interface=saved.lan_interface,
            lan_cidr=saved.lan_cidr,
            lan_address=saved.lan_address,
            docker_user=backend.has_docker_user(),
        )
        plan = compute_plan(settings, facts)
        fw = backend.state(plan.firewall)
        out["settings"] = saved.settings
        out["lan"] = {
            "interface": saved.lan_interface,
            "cidr": saved.lan_cidr,
            "address": saved.lan_address,
        }
        out["firewall"] = {
            "complete": fw.complete,
            "extra": fw.extra,
            "chains": fw.chains_present,
            "hooks": fw.hooks_present,
            "rules": fw.rules_present,
        }
        out["raw_drop"] = raw_drop_lines(backend, settings.ip)
    out["sysctl"] = {"net.ipv4.ip_forward": sysctl.get("net.ipv4.ip_forward")}
    if deployed and deployed.ip:
        out["counts"] = appliance_metrics.fetch(deployed.ip)
    return out
