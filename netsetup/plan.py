"""The change `up` makes to the host, computed as data before anything is touched.

`compute_plan(settings, facts)` is a pure function: the same settings and detected host facts
always give the same plan. That is what lets `--dry-run` print exactly what would be applied and
lets golden files pin, per engine version and firewall backend, every rule any host will get.

Why the rules are what they are:

* The appliance network is created with masquerading off (compose.yaml), because Docker's blanket
  ``-s SUBNET ! -o BRIDGE -j MASQUERADE`` would hide nothing we need but cannot be narrowed. We add
  our own: masquerade what leaves the subnet for anywhere *but* the LAN. Upstreams beyond the host
  then see the host's address (they have no route back to the appliance subnet), while LAN clients
  talk to the container with their own address, which the query log records. Port mode needs the
  same rule: with masquerading off the container could not reach an upstream at all.
* Direct mode routes LAN clients to the container address through the host. Docker 20.10-26 set
  the FORWARD policy to DROP and only open published ports; Docker 28 adds a raw-table DROP unless
  the network is ``nat-unprotected``. We accept LAN -> appliance:53 (UDP, TCP) and the replies in a
  chain of our own, jumped to from DOCKER-USER: Docker creates DOCKER-USER but never flushes it, so
  the jump survives a daemon restart (Docker re-creates DOCKER, DOCKER-FORWARD, ... but not this).
  Where the engine manages no iptables chains (Docker 29 with the nftables firewall backend, or
  any engine with ``"iptables": false``) there is no DOCKER-USER; the jump goes at the top of
  FORWARD, and nat-unprotected keeps the engine's own nftables rules from dropping the traffic.
* The nat hook sits first in POSTROUTING, which Docker never flushes either.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from enum import StrEnum

from netsetup.errors import BadInput
from netsetup.firewall.model import Chain, FirewallPlan, Rule

CHAIN_PREFIX = "NETSETUP-"
MAX_CHAIN = 28  # iptables' limit on chain names


def own_chains(project: str) -> list[Chain]:
    """Our chains for one project: the same name in filter and nat, so that `down` of one
    project never touches another's rules."""
    name = (CHAIN_PREFIX + project)[:MAX_CHAIN]
    return [Chain("filter", name), Chain("nat", name)]


OPT_MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
OPT_GATEWAY_MODE = "com.docker.network.bridge.gateway_mode_ipv4"
OPT_BRIDGE_NAME = "com.docker.network.bridge.name"

DNS_PORT = 53


class Mode(StrEnum):
    both = "both"
    port = "port"
    direct = "direct"


class IptablesBackend(StrEnum):
    nft = "nft"
    legacy = "legacy"


@dataclass(frozen=True)
class Settings:
    """What the user asked for (CLI options / Makefile variables)."""

    mode: Mode = Mode.both
    upstreams: tuple[str, ...] = ()
    lan_interface: str | None = None
    lan_cidr: str | None = None
    subnet: str = "172.31.53.0/24"
    ip: str = "172.31.53.53"
    port: int = 5053
    project: str = "dnsapp"
    service: str = "dnsproxy"

    @property
    def direct(self) -> bool:
        return self.mode in (Mode.both, Mode.direct)

    @property
    def published(self) -> bool:
        return self.mode in (Mode.both, Mode.port)


def checked_network(option: str, value: str) -> str:
    """An IPv4 network given on the command line, normalized (host bits cleared)."""
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise BadInput(f"{option} {value!r} is not an IPv4 network (like 172.31.53.0/24)") from None
    if network.version != 4:
        raise BadInput(f"{option} {value}: only IPv4 networks are supported")
    return str(network)


def check_settings(settings: Settings) -> Settings:
    """Refuse malformed or inconsistent addresses and ports before anything is done (exit 2);
    return the settings with networks normalized."""
    subnet = ipaddress.ip_network(checked_network("--subnet", settings.subnet))
    if subnet.num_addresses < 4:
        raise BadInput(f"--subnet {subnet} is too small: it needs a gateway and the appliance")
    try:
        ip = ipaddress.ip_address(settings.ip)
    except ValueError:
        raise BadInput(f"--ip {settings.ip!r} is not an IPv4 address") from None
    if ip.version != 4 or ip not in subnet:
        raise BadInput(f"--ip {ip} is not inside --subnet {subnet}")
    reserved = {
        subnet.network_address: "the network address",
        subnet.broadcast_address: "the broadcast address",
        subnet.network_address + 1: "the gateway (the host's address on the bridge)",
    }
    if ip in reserved:
        raise BadInput(f"--ip {ip} is {reserved[ip]} of --subnet {subnet}: choose another")
    lan_cidr = settings.lan_cidr
    if lan_cidr is not None:
        lan_cidr = checked_network("--lan-cidr", lan_cidr)
    if not 1 <= settings.port <= 65535:
        raise BadInput(f"--port {settings.port} is not a port (1-65535)")
    return replace(settings, subnet=str(subnet), ip=str(ip), lan_cidr=lan_cidr)


@dataclass(frozen=True)
class HostFacts:
    """What detection found on this host (see detect.py); fixed values in golden tests."""

    engine_version: str
    engine_firewall: str  # "iptables" or "nftables" (docker info FirewallBackend, 28.1+)
    iptables: IptablesBackend
    bridge: str
    lan_interface: str
    lan_cidr: str
    lan_address: str
    # Whether FORWARD jumps to a DOCKER-USER chain (read from iptables-save): not so where the
    # engine manages no iptables chains, be it the nftables backend or "iptables": false.
    docker_user: bool = True

    @property
    def engine_major_minor(self) -> tuple[int, int]:
        parts = self.engine_version.split("+")[0].split("-")[0].split(".")
        try:
            return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            return (0, 0)

    @property
    def has_docker_user(self) -> bool:
        return self.engine_firewall == "iptables" and self.docker_user


@dataclass
class Plan:
    settings: Settings
    facts: HostFacts
    sysctls: dict[str, str] = field(default_factory=dict)
    network_options: dict[str, str] = field(default_factory=dict)
    firewall: FirewallPlan = field(default_factory=FirewallPlan)
    # Checks made after deployment, against what the engine actually installed.
    verify_no_raw_drop: bool = False
    notes: list[str] = field(default_factory=list)


def compute_plan(settings: Settings, facts: HostFacts) -> Plan:
    """Derive sysctls, expected network options and firewall rules from settings and facts."""
    subnet = str(ipaddress.ip_network(settings.subnet, strict=False))
    lan = str(ipaddress.ip_network(facts.lan_cidr, strict=False))
    ip = str(ipaddress.ip_address(settings.ip))
    plan = Plan(settings=settings, facts=facts)
    plan.sysctls["net.ipv4.ip_forward"] = "1"
    plan.network_options = {
        OPT_BRIDGE_NAME: facts.bridge,
        OPT_MASQUERADE: "false",
        OPT_GATEWAY_MODE: "nat-unprotected",
    }

    fw = plan.firewall
    fw.owned = own_chains(settings.project)  # what another mode's plan may have left
    forward_chain, nat_chain = (c.name for c in own_chains(settings.project))
    fw.chains.append(Chain("nat", nat_chain))
    fw.rules.append(
        Rule(
            table="nat",
            chain=nat_chain,
            source=subnet,
            destination=lan,
            not_destination=True,
            out_interface=facts.bridge,
            not_out_interface=True,
            target="MASQUERADE",
            comment=f"{settings.project}: appliance to upstreams, not to the LAN",
        )
    )
    fw.hooks.append(
        Rule(
            table="nat",
            chain="POSTROUTING",
            target=nat_chain,
            comment=f"{settings.project}: hook",
            position=1,
        )
    )

    if settings.direct:
        fw.chains.insert(0, Chain("filter", forward_chain))
        for proto in ("udp", "tcp"):
            fw.rules.append(
                Rule(
                    table="filter",
                    chain=forward_chain,
                    destination=ip,
                    in_interface=facts.lan_interface,
                    out_interface=facts.bridge,
                    protocol=proto,
                    dport=DNS_PORT,
                    target="ACCEPT",
                    comment=f"{settings.project}: LAN to appliance DNS/{proto}",
                )
            )
        fw.rules.append(
            Rule(
                table="filter",
                chain=forward_chain,
                source=ip,
                in_interface=facts.bridge,
                out_interface=facts.lan_interface,
                ctstate="RELATED,ESTABLISHED",
                target="ACCEPT",
                comment=f"{settings.project}: appliance replies to the LAN",
            )
        )
        hook_chain = "DOCKER-USER" if facts.has_docker_user else "FORWARD"
        fw.hooks.insert(
            0,
            Rule(
                table="filter",
                chain=hook_chain,
                target=forward_chain,
                comment=f"{settings.project}: hook",
                position=1,
            ),
        )

    major_minor = facts.engine_major_minor
    if major_minor < (27, 1):
        plan.notes.append(
            f"Docker {facts.engine_version} ignores {OPT_GATEWAY_MODE}; it installs no raw-table "
            "DROP, and routed LAN traffic passes the FORWARD DROP policy through our DOCKER-USER "
            "accept (published ports are also accepted by the engine)."
        )
    if major_minor >= (28, 0) and settings.direct:
        plan.verify_no_raw_drop = True
        plan.notes.append(
            f"Docker {facts.engine_version} drops routed traffic to containers in the raw table "
            "unless the network is nat-unprotected; verified after deployment."
        )
    if facts.engine_firewall != "iptables":
        plan.notes.append(
            f"Engine firewall backend is {facts.engine_firewall}: no DOCKER-USER chain, so the "
            "filter hook goes first in FORWARD."
        )
    elif not facts.docker_user:
        plan.notes.append(
            "No DOCKER-USER chain in FORWARD (the engine runs with iptables disabled), so the "
            "filter hook goes first in FORWARD."
        )
    if facts.iptables is IptablesBackend.legacy and facts.engine_firewall == "nftables":
        plan.notes.append(
            "Host iptables is legacy while the engine writes nftables: both rule sets apply."
        )
    return plan


def render_plan(plan: Plan, firewall_text: str) -> str:
    """The human-readable plan: what `--dry-run` prints and golden files pin."""
    s, f = plan.settings, plan.facts
    lines = [
        f"# netsetup plan: mode {s.mode.value}, project {s.project}",
        f"# engine: Docker {f.engine_version}, engine firewall {f.engine_firewall}, "
        f"host iptables {f.iptables.value}",
        f"# LAN: {f.lan_interface} {f.lan_cidr} (host {f.lan_address})",
        f"# appliance: {s.ip} in {s.subnet} on {f.bridge}"
        + (f", published on port {s.port}" if s.published else ""),
        "",
    ]
    for key, value in plan.sysctls.items():
        lines.append(f"sysctl {key} = {value}")
    for key, value in plan.network_options.items():
        lines.append(f"network option {key} = {value}")
    if plan.verify_no_raw_drop:
        lines.append(f"verify: no raw PREROUTING DROP for {s.ip}/32")
    for note in plan.notes:
        lines.append(f"note: {note}")
    lines.append("")
    lines.append(firewall_text.rstrip("\n"))
    return "\n".join(lines) + "\n"
