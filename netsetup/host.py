"""`up`, `down` and `status`: detection, plan, compose and the host service put together.

`up` runs in three parts. The preflight checks everything that can refuse, changing nothing.
The transaction writes the deployment record and deploys compose.yaml: the forwarder and the
host service (service.py), which applies the plan and keeps it in place from then on. The
verification waits until the service reports the plan applied and the forwarder is healthy, so a
`make up` that returns has working rules. Each step of the transaction pushes its inverse on an
undo stack (moby's pattern), and any failure up to the end of the verification unwinds it: a
first `up` that fails leaves the host as it found it, and one over a running deployment puts
that deployment back as it was (its record, its containers deployed with the variables they had,
its plan applied by the service). A second `up` changes nothing: the deployment record is
rewritten the same, and compose leaves both containers alone.

Surviving restarts is the service's job: it starts with the containers after a reboot or a
daemon restart and repairs what a firewall reload removed. `down` is compose down; the service
removes its rules on the way out, and `down` sweeps up after one that could not, even when
compose itself fails.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netsetup import deploy, detect, home, hostnet, ra, service, state, sysctl, vrrp, webpage
from netsetup import metrics as appliance_metrics
from netsetup.errors import BadInput, NetsetupError, VerifyFailed
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
    # WEB_PASSWORD, written into the forwarder once it is healthy; never in the record.
    web_password: str | None = None


@dataclass(frozen=True)
class Upped:
    """What `up` hands the CLI: the rendered plan, and the web page's password as the running
    forwarder has it (None: the page is off, a dry run, or the password could not be read)."""

    text: str
    web_password: str | None = None


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
    # ip6tables is read only where IPv6 is asked for: no IPv4-only host has it touched.
    docker_user6 = settings.ipv6 and get_backend(iptables.value, 6).has_docker_user()
    ra_taking = detect.ra_interfaces(lan.interface) if settings.ipv6 else ()
    facts = replace(facts, docker_user=backend.has_docker_user(), docker_user6=docker_user6,
                    ra_interfaces=ra_taking)  # fmt: skip
    return facts, backend


def warn_if_forwarding_opens(settings: Settings, facts: HostFacts,
                             backend: FirewallBackend) -> None:  # fmt: skip
    """Turning forwarding on makes the host a router between all its interfaces. An engine that
    manages iptables sets FORWARD's policy to DROP when it does so; where none does and the
    policy is ACCEPT, that is a change beyond the appliance the user should know of. IPv6 too,
    where LAN_IP6 is served, whatever the engine: `up` turns IPv6 forwarding on before the
    engine would (host.presets), so no engine sets that policy."""
    families = [(4, "net.ipv4.ip_forward", facts.has_docker_user, backend)]
    if settings.ipv6:
        families.append((6, "net.ipv6.conf.all.forwarding", False, get_backend(backend.name, 6)))
    for family, key, engine_guards, tables in families:
        if engine_guards or sysctl.get(key) == "1":
            continue
        policies = [ln.split()[1] for ln in tables.save("filter").splitlines()
                    if ln.startswith(":FORWARD ")]  # fmt: skip
        if policies == ["ACCEPT"]:
            command = "iptables" if family == 4 else "ip6tables"
            print(
                f"netsetup: warning: IPv{family} forwarding is off and the FORWARD policy is "
                "ACCEPT: turning forwarding on for the appliance makes this host route between "
                f"all its networks; set the policy to DROP ({command} -P FORWARD DROP) unless "
                "it should",
                file=sys.stderr,
            )


def describe(plan: Plan, backend: FirewallBackend) -> str:
    return render_plan(plan, backend.describe(plan.firewall),
                       get_backend(backend.name, 6).describe(plan.firewall6))  # fmt: skip


def raw_drop_lines(backend: FirewallBackend, ip: str) -> list[str]:
    """Docker 28's ``-t raw -A PREROUTING -d IP/32 ! -i BRIDGE -j DROP`` for our container."""
    return [
        line
        for line in rule_lines(backend.save("raw"))
        if f"-d {ip}/32" in line and line.rstrip().endswith("-j DROP")
    ]


@dataclass(frozen=True)
class Preflight:
    """What `up` found and decided before changing anything on the host."""

    settings: Settings
    client: Any
    existing: deploy.Deployed | None  # the forwarder's container as it was, if any
    facts: HostFacts
    backend: FirewallBackend
    plan: Plan
    allow: tuple[str, ...]  # what the forwarder serves besides its defaults

    @property
    def running(self) -> bool:
        """A deployment runs, healthy or not: one a failed `up` puts back as it was."""
        return self.existing is not None and self.existing.running


def up(settings: Settings, options: Options) -> Upped:
    """Deploy the forwarder and the host service, wait until the plan is in place, settle the
    web page's password; returns the rendered plan (printed by the CLI) and the password."""
    if not options.dry_run:
        detect.require_root()
    found = preflight(settings, options)
    tell_home_names(found)
    if options.dry_run:
        served = f" and {', '.join(found.allow)}" if found.allow else " only"
        return Upped(describe(found.plan, found.backend)
                     + f"# forwarder serves: loopback, private ranges{served}\n"
                     + home_names_line(found))  # fmt: skip
    # Who else hands out DNS over IPv6, heard while compose and the waits run.
    survey = ra.Background(found.facts.lan_interface)
    undo = UndoStack()
    try:
        deploying = deploy_services(found, options, undo)
        verify(found, deploying.deployment, deploying.at, options.timeout)
    except BaseException:
        undo.unwind()
        raise
    if deploying.restart_vrrp is not None:
        deploying.restart_vrrp.run("restart", VRRP_SERVICE)
    warn_ipv6_dns(settings, survey.result())
    if found.plan.vrrp is not None:
        tell_failover_role(settings.project, found.plan.vrrp)
    password = web_password(found.client, settings, options.web_password)
    return Upped(describe(found.plan, found.backend), password)


def web_password(client: Any, settings: Settings, given: str | None) -> str | None:
    """Once the forwarder is healthy: WEB_PASSWORD written into it when given and new, and the
    password it has read back. One that cannot be read or written is a warning, not a failed
    `up`: the deployment answers DNS, and `netsetup status` shows the password later."""
    if not settings.web:
        return None
    try:
        container = deploy.find_container(client, settings.project, settings.service)
        if container is None:
            raise LookupError(f"no container of service {settings.service}")
        password = webpage.settle_password(container, given)
    except Exception as exc:
        print(f"netsetup: warning: web page: the password could not be "
              f"{'set' if given else 'read'}: {exc}", file=sys.stderr)  # fmt: skip
        return None
    if password is None:
        print(f"netsetup: warning: web page: the forwarder has not written its password "
              f"({webpage.PASSWORD_PATH}) yet: `netsetup status` shows it once it has",
              file=sys.stderr)  # fmt: skip
    elif given is not None and password != given:
        print("netsetup: warning: web page: WEB_PASSWORD was written, but the forwarder's file "
              "holds another: the page takes the one shown", file=sys.stderr)  # fmt: skip
    return password


def tell_failover_role(project: str, held: vrrp.Vrrp, timeout: float = 10.0) -> None:
    """Which role this host took: master once it holds LAN_IP; backup once it has been healthy
    for longer than a backup waits for a master's advertisement without taking over."""
    deadline = time.monotonic() + timeout
    healthy_since = None
    health = None
    while time.monotonic() < deadline:
        if detect.holds_vip(held.interface, held.address):
            print(f"netsetup: up: failover: this host is MASTER: it holds {held.address}",
                  file=sys.stderr)  # fmt: skip
            return
        report = state.load_sync(project) or {}
        health = (report.get("failover") or {}).get("health")
        if health == "ok":
            healthy_since = healthy_since or time.monotonic()
            if time.monotonic() - healthy_since > vrrp.MASTER_DOWN + 1:
                peers = ", ".join(held.peers)
                print(f"netsetup: up: failover: this host is BACKUP: a peer ({peers}) holds "
                      f"{held.address}", file=sys.stderr)  # fmt: skip
                return
        time.sleep(0.2)
    print(f"netsetup: warning: failover: this host does not take {held.address}: "
          f"{health or 'the host service has not judged its health yet'}", file=sys.stderr)


def appliance_ipv6(settings: Settings) -> frozenset[str]:
    """The appliance's IPv6 address on the LAN, LAN_IP6: the one a router should hand out, so
    no competitor when it does."""
    return frozenset([settings.lan_ip6]) if settings.ipv6 and settings.lan_ip6 else frozenset()


def warn_ipv6_dns(settings: Settings, survey: ra.Survey) -> None:
    """Warn of every DNS server the LAN's routers hand out over IPv6 besides the appliance
    (never a failure: the deployment works, the LAN leaks around it), and keep what was heard
    for `status` and `routes`."""
    for line in ra.warnings(survey, appliance_ipv6(settings)):
        print(f"netsetup: warning: {line}", file=sys.stderr)
    record_ipv6_dns(settings.project, survey)


def record_ipv6_dns(project: str, survey: ra.Survey) -> None:
    """Keep a survey for `status` and `routes`; one that cannot be kept costs a warning only."""
    try:
        state.save_ipv6_dns(project, survey.as_dict())
    except NetsetupError as exc:
        print(f"netsetup: warning: {exc}", file=sys.stderr)


def preflight(settings: Settings, options: Options) -> Preflight:
    """Everything that can refuse, before the host is touched: detection, the plan, the LAN it
    serves, and the subnet, LAN_IP and port free."""
    client = detect.docker_client()
    existing = deploy.inspect(client, settings)
    check_network_family(settings, existing)
    check_failover_switch(settings, existing)
    bridge = (
        options.bridge
        or (existing.bridge if existing else None)
        or deploy.Compose.for_settings(settings, options.compose_file.resolve()).configured_bridge()
        or f"br-{settings.project}"
    )
    facts, backend = gather_facts(client, settings, options, bridge)
    if settings.ipv6 and settings.lan_cidr6 is None:
        prefixes = detect.interface_prefixes6(facts.lan_interface)
        assert settings.lan_ip6 is not None  # settings.ipv6
        lan_cidr6 = detect.choose_prefix6(prefixes, settings.lan_ip6, facts.lan_interface)
        settings = replace(settings, lan_cidr6=lan_cidr6)
    plan = compute_plan(settings, facts)
    check_lan_served(settings, plan, facts)
    check_claims(settings, facts, existing, probe=not options.dry_run)
    warn_if_forwarding_opens(settings, facts, backend)  # only once nothing refuses
    allow = allowed(settings, plan, facts)
    return Preflight(settings, client, existing, facts, backend, plan, allow)


def check_network_family(settings: Settings, existing: deploy.Deployed | None) -> None:
    """The engine cannot give a running network IPv6, nor take it away: compose would fail
    halfway. Refused here, in one line, with what to do."""
    if existing is None or existing.ipv6 == settings.ipv6:
        return
    change = "serve LAN_IP6" if settings.ipv6 else "stop serving LAN_IP6"
    has = "has no" if settings.ipv6 else "has an"
    raise BadInput(f"to {change}, the network {existing.network} ({has} IPv6 subnet) must be "
                   "created anew: run `make down`, then `make up` again")  # fmt: skip


def check_failover_switch(settings: Settings, existing: deploy.Deployed | None) -> None:
    """Starting or stopping to share LAN_IP by VRRP changes who holds it (a proxy entry, or
    keepalived's address) and which services run: done on a running deployment, the old
    holder could outlive the change. Refused in one line, with what to do."""
    previous = state.load(settings.project)
    if existing is None or not existing.running or previous is None:
        return
    if previous.to_settings().ha != settings.ha:
        change = "share LAN_IP with HA_PEERS" if settings.ha else "stop sharing LAN_IP"
        raise BadInput(f"to {change} on a running deployment, run `make down`, then `make up` "
                       "again")  # fmt: skip


def tell_home_names(found: Preflight) -> None:
    """The notes of home.notes, one line each: the gateway is named as the likely LOCAL_DNS."""
    settings, facts, served = found.settings, found.facts, found.plan.served_lan
    gateway = None if settings.local_dns else detect.lan_gateway(facts.lan_interface,
                                                                  facts.lan_cidr)  # fmt: skip
    for note in home.notes(settings, served, gateway, os.environ.get("CONFIG")):
        print(f"netsetup: note: {note}", file=sys.stderr)
    on_lan = home.upstreams_on_the_lan(settings, facts.lan_cidr) if settings.direct else []
    if on_lan:
        print(f"netsetup: warning: {', '.join(on_lan)} on the LAN: in direct mode the appliance "
              f"asks it from its own address, so it must route {settings.subnet} via this host "
              "(`netsetup routes`); without that route use MODE=port or lan", file=sys.stderr)


def home_names_line(found: Preflight) -> str:
    """The dry run's account of what the forwarder is given for names at home."""
    variables = home.compose_variables(found.settings, found.plan.served_lan)
    given = [f"{key} {value}" for key, value in variables.items()
             if value and key != "HOSTS_DIR"]  # fmt: skip
    return f"# forwarder home names: {'; '.join(given) or 'the defaults'}\n"


def check_lan_served(settings: Settings, plan: Plan, facts: HostFacts) -> None:
    """A detected LAN that is not private is not served: refused in lan mode (which exists to
    serve it), a warning otherwise."""
    if plan.served_lan is not None:
        return
    if settings.lan:
        raise BadInput(
            f"--mode lan serves the LAN, but the detected LAN {facts.lan_cidr} is not private: "
            f"set LAN_CIDR={facts.lan_cidr} (--lan-cidr) to serve it"
        )
    print(
        f"netsetup: warning: the detected LAN {facts.lan_cidr} on {facts.lan_interface} is "
        "not a private network (or is carrier-grade NAT), so the appliance does not serve "
        f"it; to serve it, set LAN_CIDR={facts.lan_cidr} (--lan-cidr)",
        file=sys.stderr,
    )


def check_claims(
    settings: Settings, facts: HostFacts, existing: deploy.Deployed | None, probe: bool
) -> None:
    """What the deployment claims on the host is free: the subnet, LAN_IP (probed on the LAN
    unless a dry run), the published ports, DNS's and the web page's (unless this deployment
    already publishes them)."""
    detect.check_subnet_free(settings.subnet, facts.bridge)
    check_peers_on_lan(settings, facts)
    if settings.lan and settings.lan_ip:
        detect.check_lan_ip(settings.lan_ip, facts.lan_interface, facts.lan_cidr, probe=probe,
                            peers=settings.ha_peers)  # fmt: skip
    if settings.ipv6 and settings.lan_ip6 and settings.lan_cidr6:
        detect.check_lan_ip6(settings.lan_ip6, settings.lan_cidr6, facts.lan_interface,
                             probe=probe, peers=settings.ha_peers)  # fmt: skip

    def publishing(port: int) -> bool:
        return existing is not None and any(
            p.split("->")[0].endswith(f":{port}") for p in existing.published
        )

    if settings.published and not publishing(settings.port):
        detect.check_port_free(settings.port)
    if settings.published and settings.web and not publishing(settings.web_port):
        detect.check_port_free(settings.web_port, "--web-port (WEB_PORT)", udp=False)


def check_peers_on_lan(settings: Settings, facts: HostFacts) -> None:
    """The failover peers are other hosts of this LAN (checked against the LAN found here,
    which the settings alone may not have known)."""
    lan = ipaddress.ip_network(facts.lan_cidr, strict=False)
    for peer in settings.ha_peers:
        if ipaddress.ip_address(peer) not in lan:
            raise BadInput(f"--ha-peer {peer} is outside the LAN {lan} on "
                           f"{facts.lan_interface}: VRRP peers share the LAN")  # fmt: skip
        if peer == facts.lan_address:
            raise BadInput(f"--ha-peer {peer} is this host's own address: give the other "
                           "host's")  # fmt: skip
    if settings.ha and settings.lan_ip == facts.lan_address:
        raise BadInput(f"--lan-ip {settings.lan_ip} is this host's own address: the hosts share "
                       "another, free one")  # fmt: skip


def xtables_lock_for(facts: HostFacts, backend: FirewallBackend) -> str:
    """Legacy tables beside an engine that writes them: the host service shares its lock (see
    iptables_legacy); elsewhere no lock of the host's is needed."""
    return XTABLES_LOCK if backend.name == "legacy" and facts.has_docker_user else ""


def allowed(settings: Settings, plan: Plan, facts: HostFacts) -> tuple[str, ...]:
    """Whom the forwarder serves besides its defaults: the served LAN and the host, and over
    IPv6 the LAN's IPv6 prefix (a global one is outside the defaults)."""
    allow = forwarder_allows(plan.served_lan, facts.lan_address)
    if settings.ipv6 and settings.lan_cidr6:
        allow = (*allow, settings.lan_cidr6)
    return allow


def compose_for(
    settings: Settings, file: Path, plan: Plan, facts: HostFacts, backend: FirewallBackend
) -> deploy.Compose:
    """The compose run that deploys `settings` on this host."""
    allow = allowed(settings, plan, facts)
    # Direct mode publishes on loopback only (the host's own checks): a port on the LAN
    # address would be one more way in, and through an engine's userland proxy an open one.
    publish = facts.lan_address if settings.published else ""
    return deploy.Compose.for_settings(
        settings, file, allow, publish, xtables_lock_for(facts, backend), plan.served_lan
    )


def deploy_services(found: Preflight, options: Options, undo: UndoStack) -> Deploying:
    """Write the deployment record and run compose up, each step's inverse pushed on `undo`."""
    settings, project = found.settings, found.settings.project
    compose = compose_for(settings, options.compose_file.resolve(), found.plan, found.facts,
                          found.backend)  # fmt: skip
    deployment = state.Deployment.of(
        settings, found.facts, options.firewall, str(compose.file), compose.variables
    )
    lock = xtables_lock_for(found.facts, found.backend)
    if lock:  # the engine creates it at start, before its containers, so a boot finds it too
        Path(lock).touch(exist_ok=True)  # as iptables would: a missing source becomes a directory
    # The record first: the host service reads it (a change reaches a running service).
    previous = state.load(project)
    preset = presets(found.plan, previous)
    deployment = replace(deployment, sysctls_found=preset.found)
    state.save(project, deployment)
    if preset.changed:
        undo.push("sysctls", lambda: restore_sysctls(preset.changed))
        set_sysctls(found.plan, preset.changed)
    if found.running and previous is not None:
        # A repeated `up`: whatever fails from here on, the deployment that ran is put back.
        undo.push(
            "the previous deployment",
            lambda: put_back(found.client, previous, found.backend, options.timeout),
        )
    else:
        undo.push("deployment record", lambda: restore_record(project, previous))
    if not found.running:  # before, so that a compose up failing halfway is undone too
        cache = deploy.cache_volume(project)
        if not deploy.volume_exists(found.client, cache):  # a cache kept by `down` stays
            undo.push("cache volume", lambda: deploy.remove_volume(found.client, cache))
        undo.push("compose up", lambda: down_services(project, compose))
    reconfigured = write_keepalived_config(found.plan, undo) and found.running
    compose.up()
    return Deploying(deployment, time.time(), compose if reconfigured else None)


@dataclass(frozen=True)
class Deploying:
    """What deploy_services did: the record, when compose was done, and the compose run whose
    keepalived must read a changed configuration once `up` succeeded (it reads it at start
    only; restarted before, a failed `up` would leave it running the one put back)."""

    deployment: state.Deployment
    at: float
    restart_vrrp: deploy.Compose | None = None


VRRP_SERVICE = "vrrp"  # compose.ha.yaml


def write_keepalived_config(plan: Plan, undo: UndoStack) -> bool:
    """keepalived's configuration beside the deployment record (HA only), its inverse on
    `undo`; whether it changed."""
    if plan.vrrp is None:
        return False
    path = state.keepalived_path_for(plan.settings.project)
    text = plan.vrrp.render()
    try:
        old = path.read_text()
    except OSError:
        old = None
    if old == text:
        return False
    state.write_text(path, text)

    def put_back() -> None:
        if old is None:
            path.unlink(missing_ok=True)
        else:
            state.write_text(path, old)

    undo.push("keepalived configuration", put_back)
    return True


@dataclass(frozen=True)
class Presets:
    found: dict[str, str]  # every key set before the engine, with the host's own value
    changed: dict[str, str]  # those this `up` changes, with the value it finds


def presets(plan: Plan, previous: state.Deployment | None) -> Presets:
    """The plan's IPv6 sysctls, which `up` sets itself before compose runs: the engine turns
    IPv6 forwarding on when it creates an IPv6 network, and the interfaces that take router
    advertisements must have accept_ra at 2 before that (plan.ipv6_sysctls). The host service
    then finds them set; the record tells it, and `down`, what the host had. A key a previous
    `up` set keeps the value that one found."""
    kept = previous.sysctls_found if previous else {}
    # an interface's own forwarding a first `up` kept: first, so put back after `all`
    found = {key: value for key, value in kept.items()
             if key.endswith(".forwarding") and key not in plan.sysctls}  # fmt: skip
    changed: dict[str, str] = {}
    for key, value in plan.sysctls.items():
        if not key.startswith("net.ipv6."):
            continue
        if key in kept:
            found[key] = kept[key]
        elif (now := sysctl.get(key)) != value:
            if key == ALL_FORWARDING:
                # Writing `all` writes every interface's forwarding, and so does putting it
                # back: an interface that forwarded on its own is recorded before it, so that
                # it is put back after it (restores run in reverse).
                for name in sysctl.interfaces(6):
                    own = f"net.ipv6.conf.{name}.forwarding"
                    try:
                        value_now = sysctl.get(own)
                    except OSError:  # gone since it was listed
                        continue
                    if own not in kept and value_now != now:
                        found[own] = changed[own] = value_now
            found[key] = changed[key] = now
    return Presets(found, changed)


ALL_FORWARDING = "net.ipv6.conf.all.forwarding"


def set_sysctls(plan: Plan, keys: dict[str, str]) -> None:
    for key, value in plan.sysctls.items():  # the plan's order: accept_ra before forwarding
        if key in keys:
            sysctl.set_value(key, value)


def restore_sysctls(values: dict[str, str]) -> None:
    for key, value in reversed(values.items()):  # forwarding off before accept_ra back
        sysctl.set_value(key, value)


def verify(
    found: Preflight, deployment: state.Deployment, deployed_at: float, timeout: float
) -> None:
    """What makes a deployment work: the engine can publish the way the plan needs, the host
    service applied this record's plan, the forwarder is healthy at its fixed address, and
    the engine does not drop what is routed to it."""
    settings, backend = found.settings, found.backend
    # Only now is it certain the engine had its chance to create its chains (for its first
    # network): none means it runs with "iptables": false and publishes nothing itself.
    if (settings.published and not backend.has_docker_user()
            and found.facts.engine_firewall == "iptables"):  # fmt: skip
        raise VerifyFailed(
            'the engine runs with "iptables": false, so it cannot publish port mode in a '
            "way our rules confine (every client would look like its proxy): use "
            "--mode direct (MODE=direct)"
        )
    # The host side first: a failure after it (the forwarder refusing its settings) is one the
    # rollback has to undo the host service's work for.
    deploy.wait_synced(settings.project, deployment.fingerprint(), deployed_at, timeout)
    deployed = deploy.wait_healthy(found.client, settings, timeout, before=found.existing)
    verify_network(found.plan, deployed)
    if found.plan.verify_no_raw_drop:
        drops = raw_drop_lines(backend, settings.ip)
        if drops:
            raise VerifyFailed(
                f"the engine drops routed traffic to {settings.ip} ({drops[0]}): the network "
                "must have gateway_mode_ipv4=nat-unprotected (recreate it: make down; make up)"
            )


def restore_record(project: str, previous: state.Deployment | None) -> None:
    if previous is None:
        state.delete(project)
    else:
        state.save(project, previous)


def recorded_compose(deployment: state.Deployment, backend: FirewallBackend) -> deploy.Compose:
    """The compose run a record describes: the variables `up` gave compose, or for a record of
    an older netsetup that did not keep them, those its settings give on this host."""
    settings = deployment.to_settings()
    file = Path(deployment.compose_file or "compose.yaml").resolve()
    if deployment.environment:
        return deploy.Compose(settings.project, file, dict(deployment.environment),
                              deploy.overlays_for(settings, file))  # fmt: skip
    facts = deployment.facts(detect.IptablesBackend(backend.name), backend.has_docker_user())
    return compose_for(settings, file, compute_plan(settings, facts), facts, backend)


def put_back(
    client: Any, previous: state.Deployment, backend: FirewallBackend, timeout: float
) -> None:
    """Undo a repeated `up`: the previous record, its containers deployed again with the
    variables it was deployed with, its plan applied by the host service (which reads the
    record at every sync and removes what the failed one's plan added), all waited for, so
    that a failed `up` returns with the deployment that ran before running again."""
    print("netsetup: up failed: putting the previous deployment back", file=sys.stderr)
    settings = previous.to_settings()
    restore_record(settings.project, previous)
    recorded_compose(previous, backend).up()
    since = time.time()
    deploy.wait_synced(settings.project, previous.fingerprint(), since, timeout)
    deploy.wait_healthy(client, settings, timeout)


def down_services(project: str, compose: deploy.Compose) -> None:
    """compose down, then the sweep, which runs whatever compose did."""
    try:
        compose.down()
    finally:
        sweep(project)
        state.health_path_for(project).unlink(missing_ok=True)


def sweep(project: str, deployment: state.Deployment | None = None) -> None:
    """What a host service left behind (it was killed, or never started): its chains and
    hooks, the proxy entries and routes of `deployment` (by default the record's) and of its
    report, the sysctls it changed (from its report), the report."""
    record = state.load_sync(project) or {}
    backend = get_backend(record.get("backend") or detect.iptables_backend().value)
    service.remove_host_plan(
        backend, project, record.get("sysctls_before") or {}, deployment or state.load(project)
    )


def verify_network(plan: Plan, deployed: deploy.Deployed) -> None:
    """Warn (not fail) when the network differs from what the plan assumes."""
    if deployed.options.get(OPT_MASQUERADE, "true") != "false":
        print(
            f"netsetup: warning: network {deployed.network} has the engine's own masquerade "
            "(enable_ip_masquerade is not false): the appliance's traffic to the LAN is "
            "masqueraded in every mode, and the engine re-adds that rule at each daemon start",
            file=sys.stderr,
        )
    if deployed.ip and deployed.ip != plan.settings.ip:
        raise VerifyFailed(
            f"container has address {deployed.ip}, expected {plan.settings.ip}: "
            "compose.yaml must fix the address to DNS_IP"
        )


def down(project: str, options: Options) -> list[str]:
    """Stop both services (the host service removes its rules and puts the sysctls back), then
    sweep the host for one that could not. The sweep runs even when compose fails (a compose
    file broken since, an engine that does not answer): compose's error is raised after it."""
    detect.require_root()
    saved = state.load(project)
    settings = saved.to_settings() if saved else Settings(project=project)
    compose_file = Path(saved.compose_file) if saved and saved.compose_file else None
    compose = deploy.Compose.for_settings(
        settings, (compose_file or options.compose_file).resolve()
    )
    if not compose.file.exists():
        remove_deployment(project, saved)
        return [f"no compose file {compose.file}: host rules removed only"]
    said = []
    try:
        detect.docker_client()
        if saved is not None and settings.ha and hand_over(compose, settings, saved):
            said.append(f"{settings.lan_ip} handed over to the peer")
        compose.down()
    finally:
        remove_deployment(project, saved)
    return [*said, "services stopped and removed (compose down); host rules removed"]


def hand_over(compose: deploy.Compose, settings: Settings, saved: state.Deployment) -> bool:
    """A master leaving on purpose: keepalived stops first (it tells the peers, priority 0),
    and the appliance and its rules stay until a peer surely holds LAN_IP (as long as a backup
    waits for a silent master), answering the clients that still send here meanwhile: a
    planned handover without a gap. Whether this host was master."""
    assert settings.lan_ip is not None  # settings.ha
    if not detect.holds_vip(saved.lan_interface, settings.lan_ip):
        return False
    compose.run("stop", VRRP_SERVICE, check=False)
    time.sleep(vrrp.MASTER_DOWN + 0.2)
    return True


def remove_deployment(project: str, saved: state.Deployment | None) -> None:
    """The record first: a host service that compose could not stop then has no plan to put
    back at its next sync; then the sweep, with the record's proxy entries and routes; then
    the health the host service gave keepalived (HA)."""
    state.delete(project)
    sweep(project, saved)
    state.health_path_for(project).unlink(missing_ok=True)


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
        client, deployed, helper = None, None, None
    out["service"] = deployed.__dict__ if deployed else None
    record = state.load_sync(project)
    out["host_service"] = {"container": helper, "report": record}
    backend_name = (record or {}).get("backend") or (
        saved.firewall if saved and saved.firewall != "auto" else None
    )
    backend = get_backend(backend_name or detect.iptables_backend(options.firewall).value)
    out["iptables"] = backend.name
    if saved:
        backend6 = get_backend(backend.name, 6)
        facts = saved.facts(detect.IptablesBackend(backend.name), backend.has_docker_user(),
                            settings.ipv6 and backend6.has_docker_user())  # fmt: skip
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
        if plan.firewall6.chains:
            fw6 = backend6.state(plan.firewall6)
            out["firewall6"] = {
                "complete": fw6.complete, "extra": fw6.extra, "chains": fw6.chains_present,
                "hooks": fw6.hooks_present, "hooks_not_first": fw6.hooks_not_first,
                "rules": fw6.rules_present,
            }  # fmt: skip
        out["raw_drop"] = raw_drop_lines(backend, settings.ip)
        if plan.neighbours or plan.routes:
            out["lan_address"] = hostnet.state(plan.neighbours, plan.routes)
        out["sysctl_plan"] = plan.sysctls
    out["sysctl"] = {key: read_sysctl(key)
                     for key in out.get("sysctl_plan") or ["net.ipv4.ip_forward"]}  # fmt: skip
    out["ipv6_dns"] = ipv6_dns_status(project, settings)
    if deployed and deployed.ip:
        out["counts"] = appliance_metrics.fetch(deployed.ip)
    if saved:
        out["web"] = web_status(settings, saved.lan_address, client)
    return out


def web_status(settings: Settings, host_address: str, client: Any) -> dict[str, Any]:
    """The web page as status shows it: where the LAN opens it and its password, read from
    the running forwarder now (no waiting: status stays quick)."""
    if not settings.web:
        return {"on": False}
    info: dict[str, Any] = {"on": True, "urls": webpage.urls(settings, host_address),
                            "password": None}  # fmt: skip
    try:
        container = client and deploy.find_container(client, settings.project, settings.service)
        if client is None:
            info["error"] = "the engine is unreachable"
        elif container is None:
            info["error"] = "no forwarder container"
        elif (password := webpage.read_password(container)) is None:
            info["error"] = "the forwarder has not written it yet"
        else:
            info["password"] = password
    except Exception as exc:
        info["error"] = str(exc)
    return info


def read_sysctl(key: str) -> str:
    try:
        return sysctl.get(key)
    except (OSError, ValueError):
        return "unreadable"


def ipv6_dns_status(project: str, settings: Settings) -> dict[str, Any] | None:
    """What the last `up` or `check` heard from the LAN's routers, as status shows it: read
    from its record, not heard afresh, so that status stays quick and sends nothing onto the
    LAN (`netsetup check` listens again)."""
    survey = ra.Survey.from_dict(state.load_ipv6_dns(project))
    if survey is None:
        return None
    own = appliance_ipv6(settings)
    return {
        "summary": ra.summary(survey, own),
        "at": survey.at,
        "interface": survey.interface,
        "competing": [c.address for c in ra.competing(survey, own)],
        "dhcpv6": [a.router for a in ra.dhcpv6_routers(survey)],
    }
