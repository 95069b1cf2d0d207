"""The change `up` makes to the host, computed as data before anything is touched.

`compute_plan(settings, facts)` is a pure function: the same settings and detected host facts
always give the same plan. That is what lets `--dry-run` print exactly what would be applied and
lets golden files pin, per engine version and firewall backend, every rule any host will get.

Why the rules are what they are:

* Masquerade, per mode. The appliance network is created with the engine's masquerading off
  (compose.yaml): its blanket ``-s SUBNET ! -o BRIDGE -j MASQUERADE`` cannot be narrowed, and
  the engine puts it back at every daemon start. We add our own, which depends on one property
  of the modes asked for (ModeTraits.lan_routes_subnet): whether the LAN routes the appliance
  subnet via the host.
  - Direct mode needs that route (the user adds it on the LAN's router), so a LAN host can reply
    to the appliance's own address: there we masquerade what leaves the subnet for anywhere but
    the LAN (``! -d LAN``), and an upstream on the LAN (the home router) sees the appliance
    itself. Beyond the LAN upstreams see the host: they have no route back to the subnet.
  - Port and lan mode need no route, and nothing on the LAN has one: an upstream on the LAN
    that saw 172.31.53.53 would send its reply to its default route, and it would be lost
    (measured). There we masquerade everything leaving the subnet other than through its own
    bridge, LAN destinations included.
  Either way the rule changes only connections the appliance starts: NAT is decided on a
  connection's first packet, and a LAN client's query enters the bridge (``-o BRIDGE``, which
  the rule leaves out), so the client's own address reaches the appliance and the reply goes
  back to it, in every mode (the query log, the ACL and the rate limit see each client). The
  rule is what lets the appliance reach any upstream at all, since the engine masquerades
  nothing for this network.
* Default deny (firewall_plan): the filter chain lets into the appliance network only the served
  LAN's DNS and web page and replies to the appliance's own connections, and drops the rest.
  Docker 20.10-26 set the FORWARD policy to DROP and open published ports; Docker 28 with
  ``nat-unprotected`` opens every container port to direct routing, with no port filtering of
  its own: our DROP is what confines it. The chain is jumped to from DOCKER-USER, which Docker
  creates but never flushes. Where the engine manages no iptables chains (Docker 29 with the
  nftables firewall backend, or ``"iptables": false``) there is no DOCKER-USER; the jump goes
  first in FORWARD.
* Every hook goes first in its built-in chain (position 1) and must stay first: a rule above
  it decides before our chain does, so a foreign ``-I DOCKER-USER -j ACCEPT`` would open the
  appliance to everyone. Only another deployment's hook may sit above ours (each one's chain
  decides for its own bridge alone); anything else above is a hook out of place, which
  `status` reports and the host service moves back (firewall/base.py, service.py).
* The nat hook sits first in POSTROUTING, which Docker never flushes either.
* Whatever else removes the rules (a reboot, a firewall reload) is repaired by the host service
  (service.py), which applies this same plan and re-checks it every few seconds.
* IPv6 joins the same plan, not a second copy (Plan.firewall6, firewall6_plan): only where a
  LAN address over IPv6 (LAN_IP6) is asked for, so a host without it gets exactly the rules it
  always had. The same chains by name in ip6tables, the same default deny (only the LAN's IPv6
  prefix reaches the appliance's IPv6 address, and only DNS: the page is IPv4's), the same LAN
  address translation, written by the same backend kind. The engine's IPv6 firewall is its own:
  Docker 20.10 writes no ip6tables by default (no DOCKER-USER there: our hook goes first in
  FORWARD), 27+ does.
  The appliance's own traffic over IPv6 is masqueraded only when an IPv6 upstream is given: its
  upstream traffic stays IPv4 otherwise. Nothing on the LAN routes the appliance's IPv6 subnet
  (direct mode's route is an IPv4 one), so that masquerade leaves no destination out.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace
from enum import StrEnum
from urllib.parse import urlsplit

from dnsproxy.defaults import DEFAULT_ALLOWED, DNS_PORT, METRICS_PORT, WEB_PORT
from netsetup.errors import BadInput
from netsetup.firewall.model import CHAIN_PREFIX, Chain, FirewallPlan, Rule
from netsetup.hostnet import HostRoute, ProxyNeighbour
from netsetup.lists import list_files
from netsetup.vrrp import DEFAULT_PRIORITY, DEFAULT_VRID, Vrrp, check_peers

MAX_CHAIN = 28  # iptables' limit on chain names


# The forwarder serves its page on one address (--web HOST:PORT; compose.web.yaml gives it
# 0.0.0.0:80), so over IPv4 only: LAN_IP6 is DNS's alone, and the IPv6 share of the plan opens
# nothing for the page. Set when the page listens on the container's IPv6 address too: then the
# LAN's IPv6 prefix is let in to it and LAN_IP6:80 translated, as over IPv4.
WEB_OVER_IPV6 = False

INPUT_SUFFIX = "-IN"  # the filter chain for what reaches the host itself (HA: VRRP, the VIP)
LAN_SUFFIX = "-LAN"  # upper case: compose project names are lower case, so no project's own


def own_chains(project: str) -> list[Chain]:
    """Our chains for one project: the same name in filter and nat, so that `down` of one
    project never touches another's rules; plus the nat chain of LAN address mode (listed
    whatever the modes, so `down` removes it after a switch away from lan)."""
    name = (CHAIN_PREFIX + project)[:MAX_CHAIN]
    return [Chain("filter", name), Chain("nat", name), Chain("nat", lan_chain(project)),
            Chain("filter", input_chain(project))]  # fmt: skip


def input_chain(project: str) -> str:
    """The filter chain, hooked from INPUT in HA, for traffic to the host's own addresses."""
    return (CHAIN_PREFIX + project)[: MAX_CHAIN - len(INPUT_SUFFIX)] + INPUT_SUFFIX


def lan_chain(project: str) -> str:
    """The nat chain that translates LAN_IP:53 to the appliance (within iptables' name limit)."""
    return (CHAIN_PREFIX + project)[: MAX_CHAIN - len(LAN_SUFFIX)] + LAN_SUFFIX


OPT_MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
OPT_GATEWAY_MODE = "com.docker.network.bridge.gateway_mode_ipv4"
OPT_GATEWAY_MODE6 = "com.docker.network.bridge.gateway_mode_ipv6"
OPT_BRIDGE_NAME = "com.docker.network.bridge.name"



class Mode(StrEnum):
    """How LAN clients reach the appliance; any combination may be asked for."""

    port = "port"  # the host's LAN address, port PORT (published by the engine)
    direct = "direct"  # the container's own address, routed via the host
    lan = "lan"  # a LAN address of its own (LAN_IP), port 53: proxy ARP plus DNAT

    @property
    def traits(self) -> ModeTraits:
        return MODE_TRAITS[self]


@dataclass(frozen=True)
class ModeTraits:
    """What a mode means for the host, as data: the plan reads these, never a mode's name.
    Settings with several modes have a trait when any of their modes has it."""

    # Clients ask the container's own address (DNS_IP:53), routed to it via the host.
    clients_ask_container: bool = False
    # The engine publishes PORT on the host's LAN address.
    publishes_port: bool = False
    # The host answers ARP for LAN_IP and translates LAN_IP:53 to the appliance.
    claims_lan_ip: bool = False
    # The LAN routes SUBNET via the host (the user added the route on the router, which direct
    # mode needs), so a LAN host can reply to the appliance's own address: the masquerade may
    # leave LAN destinations out. Without it a LAN upstream's reply would be lost.
    lan_routes_subnet: bool = False


MODE_TRAITS: dict[Mode, ModeTraits] = {
    Mode.port: ModeTraits(publishes_port=True),
    Mode.direct: ModeTraits(clients_ask_container=True, lan_routes_subnet=True),
    Mode.lan: ModeTraits(claims_lan_ip=True),
}


DEFAULT_MODES: tuple[Mode, ...] = (Mode.port, Mode.direct)
MODE_ALIASES = {"both": DEFAULT_MODES}


def parse_modes(text: str) -> tuple[Mode, ...]:
    """``port,direct,lan`` (any subset, comma separated; ``both`` = port,direct), in a fixed
    order so equal sets compare and render the same."""
    wanted: set[Mode] = set()
    for word in (w.strip().lower() for w in text.split(",")):
        if word in MODE_ALIASES:
            wanted.update(MODE_ALIASES[word])
            continue
        try:
            wanted.add(Mode(word))
        except ValueError:
            raise BadInput(
                f"--mode {text!r}: {word!r} is not a mode (a comma list of port, direct, lan; "
                "both = port,direct)"
            ) from None
    return tuple(m for m in Mode if m in wanted)


def modes_text(modes: tuple[Mode, ...]) -> str:
    return "both" if modes == DEFAULT_MODES else ",".join(m.value for m in modes)


class IptablesBackend(StrEnum):
    nft = "nft"
    legacy = "legacy"


@dataclass(frozen=True)
class Settings:
    """What the user asked for (CLI options / Makefile variables)."""

    modes: tuple[Mode, ...] = DEFAULT_MODES
    upstreams: tuple[str, ...] = ()
    # Split DNS: the domestic resolvers, and the host directory holding the list files.
    domestic_upstreams: tuple[str, ...] = ()
    lists_dir: str | None = None
    lan_interface: str | None = None
    lan_cidr: str | None = None
    subnet: str = "172.31.53.0/24"
    ip: str = "172.31.53.53"
    port: int = 5053
    project: str = "dnsapp"
    service: str = "dnsproxy"
    # The appliance's metrics port is reachable from the host only, unless this is set.
    metrics_from_lan: bool = False
    # LAN address mode: the address on the LAN the host answers ARP for and DNATs to the appliance.
    lan_ip: str | None = None
    # Names at home (netsetup/home.py): the LAN's resolvers, the domains and reverse networks
    # they answer besides the LAN's own (which netsetup adds), a hosts file on this host.
    local_dns: tuple[str, ...] = ()
    local_domains: tuple[str, ...] = ()
    local_reverse: tuple[str, ...] = ()
    hosts_file: str | None = None
    # The same over IPv6 (proxy NDP): with it, and only with it, the plan has IPv6 rules. The
    # LAN's IPv6 prefix it lies in is the one served over IPv6; the appliance's bridge gets an
    # IPv6 subnet of its own, with the appliance at ip6.
    lan_ip6: str | None = None
    lan_cidr6: str | None = None
    subnet6: str = "fd53:53::/64"
    ip6: str = "fd53:53::53"
    # Failover (netsetup/vrrp.py): the other hosts sharing LAN_IP by VRRP; none, no failover.
    ha_peers: tuple[str, ...] = ()
    ha_priority: int = DEFAULT_PRIORITY
    ha_vrid: int = DEFAULT_VRID
    # The forwarder's web page (dashboard and API) on the appliance's port WEB_PORT, let in from
    # the served LAN only, as DNS is: at the address each mode gives (lan mode: LAN_IP port 80),
    # in port mode published on the host at web_port.
    web: bool = True
    web_port: int = 8053

    @property
    def direct(self) -> bool:
        return any(m.traits.clients_ask_container for m in self.modes)

    @property
    def published(self) -> bool:
        return any(m.traits.publishes_port for m in self.modes)

    @property
    def lan(self) -> bool:
        return any(m.traits.claims_lan_ip for m in self.modes)

    @property
    def lan_routes_subnet(self) -> bool:
        return any(m.traits.lan_routes_subnet for m in self.modes)

    @property
    def mode_text(self) -> str:
        return modes_text(self.modes)

    @property
    def ipv6(self) -> bool:
        """Whether the appliance is reached over IPv6 too (LAN_IP6 given, in lan mode)."""
        return self.lan and self.lan_ip6 is not None

    @property
    def ha(self) -> bool:
        """Whether LAN_IP is a VRRP address shared with other hosts rather than proxied."""
        return self.lan and bool(self.ha_peers)

    @property
    def ipv6_upstreams(self) -> bool:
        """Whether any upstream is an IPv6 address: only then does the appliance's own traffic
        leave over IPv6. A value the forwarder would refuse counts as none (it checks them)."""
        return any(upstream_is_ipv6(u) for u in (*self.upstreams, *self.domestic_upstreams))


def upstream_is_ipv6(spec: str) -> bool:
    """Whether an --upstream value (``IP[:PORT]``, ``[IPv6]:PORT``, ``scheme://...``, see the
    forwarder's parse_spec) names an IPv6 address. Read here rather than with the forwarder's
    parser: the host service's image carries only the constants of the forwarder."""
    scheme, sep, text = spec.strip().partition("://")
    text = text if sep else scheme
    if sep and scheme.lower() == "https":
        try:
            host = urlsplit("https://" + text.partition("#")[0]).hostname or ""
        except ValueError:
            return False
    else:
        text = text.partition("#")[0].rstrip("/")
        if text.startswith("["):
            host = text[1:].partition("]")[0]
        else:
            host = text if text.count(":") > 1 else text.partition(":")[0]
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


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
    check_web_port(settings)
    if not settings.modes:
        raise BadInput("--mode is empty: give a comma list of port, direct, lan")
    lan_ip = check_lan_ip_syntax(settings, subnet, lan_cidr)
    settings = check_ipv6_settings(settings)
    settings = replace(settings, ha_peers=check_peers(
        settings.ha_peers, settings.ha_priority, settings.ha_vrid, lan_ip, lan_cidr))
    lists_dir = settings.lists_dir
    if lists_dir is not None:
        lists_dir = os.path.abspath(lists_dir)
        if not os.path.isdir(lists_dir):
            raise BadInput(f"--lists-dir {settings.lists_dir}: not a directory")
        if list_files(lists_dir) and not settings.domestic_upstreams:
            raise BadInput(f"--lists-dir {settings.lists_dir} holds lists but no "
                           "--domestic-upstream is given: nothing to split between")
    return replace(settings, subnet=str(subnet), ip=str(ip), lan_cidr=lan_cidr, lan_ip=lan_ip,
                   lists_dir=lists_dir)  # fmt: skip


def check_web_port(settings: Settings) -> None:
    """The page's host port (published in every mode on loopback, in port mode on the LAN
    address too) is a port, and not DNS's: both are TCP on the same addresses."""
    if not settings.web:
        return
    if not 1 <= settings.web_port <= 65535:
        raise BadInput(f"--web-port {settings.web_port} is not a port (1-65535)")
    if settings.web_port == settings.port:
        raise BadInput(f"--web-port {settings.web_port} is --port too: the web page needs a "
                       "port of its own (WEB_PORT)")  # fmt: skip


def check_lan_ip_syntax(
    settings: Settings, subnet: ipaddress.IPv4Network, lan_cidr: str | None
) -> str | None:
    """What can be said of --lan-ip before looking at the host (see check_lan_ip for the rest)."""
    if settings.lan_ip is None:
        if settings.lan:
            raise BadInput("--mode lan needs --lan-ip (LAN_IP): a free address on the LAN")
        return None
    if not settings.lan:
        raise BadInput(f"--lan-ip {settings.lan_ip} is given but lan is not in --mode")
    try:
        lan_ip = ipaddress.ip_address(settings.lan_ip)
    except ValueError:
        raise BadInput(f"--lan-ip {settings.lan_ip!r} is not an IPv4 address") from None
    if lan_ip.version != 4:
        raise BadInput(f"--lan-ip {lan_ip}: only IPv4 is supported")
    if lan_ip in subnet:
        raise BadInput(f"--lan-ip {lan_ip} is inside the appliance --subnet {subnet}: "
                       "it must be an address on the LAN")  # fmt: skip
    if lan_cidr is not None:
        check_lan_ip_in(lan_ip, ipaddress.ip_network(lan_cidr))
    return str(lan_ip)


def checked_network6(option: str, value: str) -> ipaddress.IPv6Network:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise BadInput(f"{option} {value!r} is not an IPv6 network (like fd53:53::/64)") from None
    if network.version != 6:
        raise BadInput(f"{option} {value}: an IPv6 network is expected here")
    return network


def check_ipv6_settings(settings: Settings) -> Settings:
    """What can be said of the IPv6 settings before looking at the host (exit 2); they are
    normalized. LAN_IP6 comes with lan mode, as LAN_IP does; LAN_CIDR6 alone means nothing."""
    if settings.lan_ip6 is None:
        if settings.lan_cidr6 is not None:
            raise BadInput(f"--lan-cidr6 {settings.lan_cidr6} is given but no --lan-ip6 (LAN_IP6)")
        return settings
    if not settings.lan:
        raise BadInput(f"--lan-ip6 {settings.lan_ip6} is given but lan is not in --mode")
    subnet6 = checked_network6("--subnet6", settings.subnet6)
    if subnet6.prefixlen > 120:
        raise BadInput(f"--subnet6 {subnet6} is too small: it needs a gateway and the appliance")
    try:
        ip6 = ipaddress.IPv6Address(settings.ip6)
    except ValueError:
        raise BadInput(f"--ip6 {settings.ip6!r} is not an IPv6 address") from None
    if ip6 not in subnet6 or ip6 in (subnet6.network_address, subnet6.network_address + 1):
        raise BadInput(f"--ip6 {ip6} must be a host address inside --subnet6 {subnet6}, "
                       "not its first two (subnet-router anycast, gateway)")  # fmt: skip
    try:
        lan_ip6 = ipaddress.IPv6Address(settings.lan_ip6)
    except ValueError:
        raise BadInput(f"--lan-ip6 {settings.lan_ip6!r} is not an IPv6 address") from None
    if any((lan_ip6.is_link_local, lan_ip6.is_multicast, lan_ip6.is_loopback,
            lan_ip6.is_unspecified)):  # fmt: skip
        raise BadInput(f"--lan-ip6 {lan_ip6} is not a unicast address a LAN prefix holds "
                       "(link-local, multicast, loopback and :: are not)")  # fmt: skip
    if lan_ip6 in subnet6:
        raise BadInput(f"--lan-ip6 {lan_ip6} is inside the appliance --subnet6 {subnet6}: "
                       "it must be an address on the LAN")  # fmt: skip
    lan_cidr6 = None
    if settings.lan_cidr6 is not None:
        lan6 = checked_network6("--lan-cidr6", settings.lan_cidr6)
        check_lan_ip6_in(lan_ip6, lan6)
        lan_cidr6 = str(lan6)
    return replace(settings, lan_ip6=str(lan_ip6), lan_cidr6=lan_cidr6, subnet6=str(subnet6),
                   ip6=str(ip6))  # fmt: skip


def check_lan_ip6_in(lan_ip6: ipaddress.IPv6Address, lan6: ipaddress.IPv6Network) -> None:
    """LAN_IP6 must be a host address of the LAN's IPv6 prefix: not outside it, not its
    subnet-router anycast address (the prefix itself, RFC 4291 2.6.1), not one of the reserved
    subnet anycast addresses (the last 128 of a prefix with 64-bit interface identifiers,
    RFC 2526)."""
    if lan_ip6 not in lan6:
        raise BadInput(f"--lan-ip6 {lan_ip6} is outside the LAN's IPv6 prefix {lan6}: clients "
                       "could not reach it without a route")  # fmt: skip
    if lan_ip6 == lan6.network_address and lan6.prefixlen < 127:
        raise BadInput(f"--lan-ip6 {lan_ip6} is the subnet-router anycast address of {lan6}")
    if lan6.prefixlen <= 64 and int(lan_ip6) & 0xFFFF_FFFF_FFFF_FFFF >= 0xFDFF_FFFF_FFFF_FF80:
        raise BadInput(f"--lan-ip6 {lan_ip6} is a reserved subnet anycast address of {lan6} "
                       "(RFC 2526): choose another")  # fmt: skip


def check_lan_ip_in(lan_ip: ipaddress.IPv4Address, lan: ipaddress.IPv4Network) -> None:
    """LAN_IP must be a host address of the LAN: clients reach it with no route of their own."""
    if lan_ip not in lan:
        raise BadInput(f"--lan-ip {lan_ip} is outside the LAN {lan}: clients could not reach it "
                       "without a route")  # fmt: skip
    if lan.prefixlen < 31 and lan_ip in (lan.network_address, lan.broadcast_address):
        what = "network" if lan_ip == lan.network_address else "broadcast"
        raise BadInput(f"--lan-ip {lan_ip} is the {what} address of the LAN {lan}")


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
    # The same in ip6tables: Docker 20.10 writes none by default ("ip6tables": false), 27+ does.
    docker_user6: bool = False
    # Interfaces that configure the host's own IPv6 from router advertisements (accept_ra not 0:
    # the LAN interface, and any other holding a default route learned from one), read where
    # IPv6 is served: forwarding would make them ignore advertisements (see ipv6_sysctls).
    ra_interfaces: tuple[str, ...] = ()

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

    @property
    def has_docker_user6(self) -> bool:
        return self.engine_firewall == "iptables" and self.docker_user6


@dataclass
class Plan:
    settings: Settings
    facts: HostFacts
    sysctls: dict[str, str] = field(default_factory=dict)
    network_options: dict[str, str] = field(default_factory=dict)
    firewall: FirewallPlan = field(default_factory=FirewallPlan)
    # ip6tables: empty (no chains, nothing applied) unless the settings ask for IPv6.
    firewall6: FirewallPlan = field(default_factory=lambda: FirewallPlan(family=6))
    # Checks made after deployment, against what the engine actually installed.
    verify_no_raw_drop: bool = False
    notes: list[str] = field(default_factory=list)
    # The LAN network the forwarder serves and the firewall lets in; None when the detected LAN
    # is not private and was not given (see lan_to_allow): then only the host reaches it.
    served_lan: str | None = None
    # LAN address mode: the host answers ARP for LAN_IP (NDP for LAN_IP6) and routes it into the
    # bridge (hostnet.py).
    neighbours: list[ProxyNeighbour] = field(default_factory=list)
    routes: list[HostRoute] = field(default_factory=list)
    # With HA_PEERS instead: keepalived holds LAN_IP (and LAN_IP6) on the master (vrrp.py).
    vrrp: Vrrp | None = None


def proxy_delay_key(interface: str, family: int = 4) -> str:
    return f"net.ipv{family}.neigh.{interface}.proxy_delay"


def ipv6_sysctls(facts: HostFacts, proxy_ndp: bool = True) -> dict[str, str]:
    """What LAN_IP6 needs of the kernel, in the order it is set.

    Proxy NDP answers only on an interface that forwards, and the kernel forwards IPv6 only with
    all.forwarding on (which turns every interface's forwarding on). An interface that forwards
    ignores router advertisements unless accept_ra is 2, and turning forwarding on deletes the
    default routes learned from them: the host would lose its own IPv6 default route. So
    accept_ra goes to 2 first, on each interface that takes advertisements. The engine turns
    all.forwarding on itself when it creates an IPv6 network: `up` sets these before it does
    (host.presets), so the values found are the host's own.
    """
    out = {f"net.ipv6.conf.{name}.accept_ra": "2" for name in facts.ra_interfaces}
    out["net.ipv6.conf.all.forwarding"] = "1"
    if proxy_ndp:  # not with HA: the master holds LAN_IP6 itself
        out[f"net.ipv6.conf.{facts.lan_interface}.proxy_ndp"] = "1"
        # as for proxy ARP: a solicitation's answer would wait up to 0.8 s
        out[proxy_delay_key(facts.lan_interface, 6)] = "0"
    return out


def compute_plan(settings: Settings, facts: HostFacts) -> Plan:
    """Derive sysctls, expected network options and firewall rules from settings and facts."""
    plan = Plan(settings=settings, facts=facts)
    plan.sysctls["net.ipv4.ip_forward"] = "1"
    plan.network_options = {
        OPT_BRIDGE_NAME: facts.bridge,
        OPT_MASQUERADE: "false",
        OPT_GATEWAY_MODE: "nat-unprotected",
    }
    plan.served_lan = lan_to_allow(facts.lan_cidr, explicit=settings.lan_cidr is not None)
    plan.firewall = firewall_plan(settings, facts, plan.served_lan)
    if settings.ha and settings.lan_ip:
        plan.vrrp = Vrrp(
            project=settings.project, interface=facts.lan_interface, source=facts.lan_address,
            peers=settings.ha_peers, priority=settings.ha_priority, vrid=settings.ha_vrid,
            address=settings.lan_ip, address6=settings.lan_ip6 if settings.ipv6 else None,
        )  # fmt: skip
    elif settings.lan and settings.lan_ip:
        # Proxy ARP replies wait a random 0-0.8 s (proxy_delay) by default: a client's first
        # query would too. The proxy entry answers for LAN_IP only because the /32 route
        # leaves by the bridge (the kernel's condition for proxying).
        plan.sysctls[proxy_delay_key(facts.lan_interface)] = "0"
        plan.neighbours.append(ProxyNeighbour(settings.lan_ip, facts.lan_interface))
        plan.routes.append(HostRoute(f"{settings.lan_ip}/32", facts.bridge))
    if settings.ipv6:
        # Docker 28 protects IPv6 containers from direct routing as it does IPv4 ones (a raw
        # DROP) unless the network is nat-unprotected for IPv6 too.
        plan.network_options[OPT_GATEWAY_MODE6] = "nat-unprotected"
        plan.firewall6 = firewall6_plan(settings, facts)
        plan.sysctls.update(ipv6_sysctls(facts, proxy_ndp=not settings.ha))
        assert settings.lan_ip6 is not None  # settings.ipv6
        if not settings.ha:
            plan.neighbours.append(ProxyNeighbour(settings.lan_ip6, facts.lan_interface))
            plan.routes.append(HostRoute(f"{settings.lan_ip6}/128", facts.bridge))
    major_minor = facts.engine_major_minor
    if major_minor < (27, 1):
        plan.notes.append(
            f"Docker {facts.engine_version} ignores {OPT_GATEWAY_MODE}; it installs no raw-table "
            "DROP; routed LAN traffic passes its FORWARD DROP policy through our accept rules."
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


def firewall_plan(settings: Settings, facts: HostFacts, served_lan: str | None) -> FirewallPlan:
    """Our chains: masquerade for upstream traffic, and the appliance network's default deny.

    The filter chain sees every routed packet to or from the bridge. It lets in only replies to
    the appliance's own connections and the served LAN's DNS (UDP and TCP) and web page (TCP
    WEB_PORT, unless it is off) to the appliance's address: that covers direct mode and port
    mode alike, since the engine's DNAT of the published ports has already turned host:PORT
    into DNS_IP:53 (and host:WEB_PORT into DNS_IP:80) when the packet gets here. Then
    everything else routed to the network is dropped: the metrics port, other ports (which
    nat-unprotected leaves open to direct routing), and a WAN client that routes the subnet via
    the host or hits a published port on the host's WAN address. The host's own traffic to
    the container does not pass FORWARD, so `netsetup status` still reads the metrics.
    """
    return family_plan(
        settings, facts, family=4, subnet=settings.subnet, ip=settings.ip, served=served_lan,
        docker_user=facts.has_docker_user, masquerade=masquerade(settings, facts),
        lan_ip=settings.lan_ip if settings.lan else None, to_address=settings.ip)  # fmt: skip


def firewall6_plan(settings: Settings, facts: HostFacts) -> FirewallPlan:
    """The IPv6 share of the plan, through the same builder as the IPv4 one: in ip6tables, the
    same chain names, the default deny for the appliance's IPv6 address (only the LAN's IPv6
    prefix, only DNS, and the web page with WEB_OVER_IPV6), the translation of LAN_IP6:53 to it,
    and a masquerade only when an IPv6 upstream is given."""
    project = settings.project
    masq = None
    if settings.ipv6_upstreams:
        masq = Rule(table="nat", chain=own_chains(project)[1].name, source=settings.subnet6,
                    out_interface=facts.bridge, not_out_interface=True, target="MASQUERADE",
                    comment=f"{project}: appliance to IPv6 upstreams")  # fmt: skip
    return family_plan(
        settings, facts, family=6, subnet=settings.subnet6, ip=settings.ip6,
        served=settings.lan_cidr6, docker_user=facts.has_docker_user6, masquerade=masq,
        lan_ip=settings.lan_ip6, to_address=f"[{settings.ip6}]")  # fmt: skip


def family_plan(settings: Settings, facts: HostFacts, *, family: int, subnet: str, ip: str,
                served: str | None, docker_user: bool, masquerade: Rule | None,
                lan_ip: str | None, to_address: str) -> FirewallPlan:  # fmt: skip
    """One address family's chains, rules and hooks (see firewall_plan for why each rule): the
    chains are declared even when a piece is empty, so a change of settings flushes what no
    longer applies in the same apply. `to_address`: the appliance's address as DNAT's
    --to-destination writes it before a port (an IPv6 one in brackets)."""
    bridge, lan_if, project = facts.bridge, facts.lan_interface, settings.project
    web = settings.web and (family == 4 or WEB_OVER_IPV6)
    forward_chain, nat_chain = (c.name for c in own_chains(project)[:2])
    fw = FirewallPlan(family=family)
    fw.chains += [Chain("filter", forward_chain), Chain("nat", nat_chain)]

    def accept(**match: object) -> Rule:
        return Rule(table="filter", chain=forward_chain, target="ACCEPT", **match)  # type: ignore[arg-type]

    fw.rules.append(
        accept(destination=subnet, out_interface=bridge, ctstate="RELATED,ESTABLISHED",
               comment=f"{project}: replies to connections the appliance made")
    )  # fmt: skip
    if served is not None:
        lan_ports = [("udp", DNS_PORT, "DNS/udp"), ("tcp", DNS_PORT, "DNS/tcp")]
        if web:
            lan_ports.append(("tcp", WEB_PORT, "web page"))
        if settings.metrics_from_lan:
            lan_ports.append(("tcp", METRICS_PORT, "metrics"))
        for proto, port, what in lan_ports:
            fw.rules.append(
                accept(source=served, destination=ip, in_interface=lan_if,
                       out_interface=bridge, protocol=proto, dport=port,
                       comment=f"{project}: LAN to appliance {what}")
            )  # fmt: skip
    if not docker_user:
        # Hooked from FORWARD, no engine rules follow ours to let the appliance out; from
        # DOCKER-USER its traffic falls through to the engine's (isolation between networks).
        fw.rules.append(
            accept(source=ip, in_interface=bridge, out_interface=bridge, not_out_interface=True,
                   comment=f"{project}: appliance to upstreams, and its replies")
        )  # fmt: skip
    fw.rules.append(
        Rule(table="filter", chain=forward_chain, target="DROP", in_interface=bridge,
             not_in_interface=True, out_interface=bridge,
             comment=f"{project}: nothing else reaches the appliance network")
    )  # fmt: skip
    if masquerade is not None:
        fw.rules.append(masquerade)
    hook_chain = "DOCKER-USER" if docker_user else "FORWARD"
    fw.hooks.append(
        Rule(table="filter", chain=hook_chain, target=forward_chain,
             comment=f"{project}: hook", position=1)
    )  # fmt: skip
    fw.hooks.append(
        Rule(table="nat", chain="POSTROUTING", target=nat_chain,
             comment=f"{project}: hook", position=1)
    )  # fmt: skip
    # Declared in every mode, empty but for lan mode: a switch away from lan then flushes it and
    # deletes its hooks (no DNAT of the LAN address is left behind) with the same apply.
    fw.chains.append(Chain("nat", lan_chain(project)))
    if lan_ip:
        lan_nat(fw, project, lan_ip, to_address, web=web)
    # Declared in every plan, like the LAN chain: hooked and filled only with HA.
    fw.chains.append(Chain("filter", input_chain(project)))
    if lan_ip and settings.ha:
        ha_input(fw, settings, family, lan_if, lan_ip)
    return fw


def ha_input(fw: FirewallPlan, settings: Settings, family: int, lan_if: str, vip: str) -> None:
    """With HA the master holds LAN_IP as an address of its own, so what reaches it is the
    host's, not routed into the bridge: VRRP is let in from the peers only (on the LAN
    interface), and nothing of the host is reachable at LAN_IP but ICMP (ping, and IPv6's
    neighbour checks). DNS and the web page were translated to the appliance in PREROUTING, so
    they are forwarded into the bridge and never reach INPUT: the DROP below cannot touch them."""
    project, chain = settings.project, input_chain(settings.project)

    def rule(target: str, comment: str, **match: object) -> Rule:
        return Rule(table="filter", chain=chain, target=target, comment=f"{project}: {comment}",
                    **match)  # type: ignore[arg-type]  # fmt: skip

    if family == 4:  # the adverts are IPv4 (LAN_IP6 moves with LAN_IP)
        for peer in settings.ha_peers:
            fw.rules.append(rule("ACCEPT", f"VRRP from peer {peer}", source=peer,
                                 in_interface=lan_if, protocol="vrrp"))  # fmt: skip
        fw.rules.append(rule("DROP", "VRRP from anyone else", in_interface=lan_if,
                             protocol="vrrp"))  # fmt: skip
    fw.rules.append(rule("ACCEPT", "ICMP at the shared address", destination=vip,
                         protocol="icmp" if family == 4 else "ipv6-icmp"))  # fmt: skip
    fw.rules.append(rule("DROP", "nothing else of the host at the shared address",
                         destination=vip))  # fmt: skip
    fw.hooks.append(Rule(table="filter", chain="INPUT", target=chain,
                         comment=f"{project}: HA hook", position=1))  # fmt: skip


def masquerade(settings: Settings, facts: HostFacts) -> Rule:
    """What the appliance sends out of its subnet leaves with the host's address, except, where
    the LAN routes the subnet (direct mode), what goes to the LAN (see the module docstring).
    Only connections the appliance starts are translated: a LAN client's query goes out through
    the bridge, which the rule leaves out, and keeps the client's address."""
    project = settings.project
    rule = Rule(table="nat", chain=own_chains(project)[1].name, source=settings.subnet,
                out_interface=facts.bridge, not_out_interface=True, target="MASQUERADE",
                comment=f"{project}: appliance to upstreams, LAN included")  # fmt: skip
    if not settings.lan_routes_subnet:
        return rule
    return replace(rule, destination=facts.lan_cidr, not_destination=True,
                   comment=f"{project}: appliance to upstreams, not to the LAN")  # fmt: skip


def lan_nat(fw: FirewallPlan, project: str, lan_ip: str, to_address: str, web: bool) -> None:
    """LAN address mode: LAN_IP:53 (and the web page's LAN_IP:80, unless it is off) is
    translated to the appliance, from the LAN (PREROUTING) and from the host itself (OUTPUT).
    The client's address is kept, so the appliance logs and limits it; conntrack undoes the
    translation on the replies. The filter chain's LAN rules (present in every mode) then let
    the translated connections in; nothing else to LAN_IP is translated, so it follows the /32
    route into the bridge and meets the default deny. A chain of its own: MASQUERADE (the other
    nat chain) is valid in POSTROUTING only."""
    chain = lan_chain(project)
    ports = [("udp", DNS_PORT, "DNS/udp"), ("tcp", DNS_PORT, "DNS/tcp")]
    if web:
        ports.append(("tcp", WEB_PORT, "web page"))
    for proto, port, what in ports:
        fw.rules.append(
            Rule(table="nat", chain=chain, destination=lan_ip, protocol=proto, dport=port,
                 target="DNAT", to_destination=f"{to_address}:{port}",
                 comment=f"{project}: LAN address to appliance {what}")
        )  # fmt: skip
    for hook_chain in ("PREROUTING", "OUTPUT"):
        fw.hooks.append(
            Rule(table="nat", chain=hook_chain, target=chain,
                 comment=f"{project}: LAN address hook", position=1)
        )  # fmt: skip


def is_private(cidr: str) -> bool:
    """Inside the forwarder's default clients (loopback, RFC 1918, link-local, ULA)."""
    network = ipaddress.ip_network(cidr, strict=False)
    return any(
        network.version == allowed.version and network.subnet_of(allowed)
        for allowed in (ipaddress.ip_network(a) for a in DEFAULT_ALLOWED)
    )


def lan_to_allow(lan_cidr: str, explicit: bool) -> str | None:
    """The LAN network the appliance serves, or None.

    A LAN given explicitly (--lan-cidr, LAN_CIDR) is served whatever its addresses (offices do
    number LANs publicly). A detected one only when private: on a VPS the default route's
    network is the provider's subnet, and behind carrier-grade NAT (100.64.0.0/10) it is the
    ISP's other customers; neither are our clients.
    """
    network = str(ipaddress.ip_network(lan_cidr, strict=False))
    return network if explicit or is_private(network) else None


def forwarder_allows(served_lan: str | None, host_address: str | None) -> tuple[str, ...]:
    """Whom the forwarder serves besides loopback and the private ranges: the served LAN, and
    the host's own LAN address, which is the host itself (its `check`, its own lookups), served
    even where the LAN around it is not."""
    own = f"{host_address}/32" if host_address else None
    return tuple(n for n in (served_lan, own) if n)


def render_plan(plan: Plan, firewall_text: str, firewall6_text: str = "") -> str:
    """The human-readable plan: what `--dry-run` prints and golden files pin (the IPv6 firewall
    only when the plan has one)."""
    s, f = plan.settings, plan.facts
    lines = [
        f"# netsetup plan: mode {s.mode_text}, project {s.project}",
        f"# engine: Docker {f.engine_version}, engine firewall {f.engine_firewall}, "
        f"host iptables {f.iptables.value}",
        f"# LAN: {f.lan_interface} {f.lan_cidr} (host {f.lan_address})",
        f"# appliance: {s.ip} in {s.subnet} on {f.bridge}"
        + (f", published on port {s.port}" if s.published else ""),
    ]
    if s.lan:
        lines.append(f"# LAN address: {s.lan_ip} port 53 (answered by the host, DNATed)")
    if s.ipv6:
        lines.append(f"# LAN address over IPv6: {s.lan_ip6} port 53 in {s.lan_cidr6}, "
                     f"appliance {s.ip6} in {s.subnet6}")  # fmt: skip
    if s.web:
        lines.append(f"# web page: appliance port {WEB_PORT}"
                     + (f", published on port {s.web_port}" if s.published else "")
                     + (f", LAN address port {WEB_PORT}" if s.lan else ""))  # fmt: skip
    else:
        lines.append("# web page: off")
    lines += [
        "",
    ]
    if plan.served_lan:
        lines.append(f"served: the host and LAN {plan.served_lan}")
    else:
        lines.append(
            f"served: the host only (LAN {f.lan_cidr} is not private: give LAN_CIDR to serve it)"
        )
    for key, value in plan.sysctls.items():
        lines.append(f"sysctl {key} = {value}")
    for key, value in plan.network_options.items():
        lines.append(f"network option {key} = {value}")
    for item in [*plan.neighbours, *plan.routes]:
        lines.append(f"host: {item.render()}")
    if plan.vrrp is not None:
        v = plan.vrrp
        held = " and ".join(a for a in (v.address, v.address6) if a)
        lines.append(f"vrrp: keepalived holds {held} on {v.interface} while master: router id "
                     f"{v.vrid}, priority {v.priority}, unicast from {v.source} to "
                     f"{', '.join(v.peers)}, no preemption")  # fmt: skip
    if plan.verify_no_raw_drop:
        lines.append(f"verify: no raw PREROUTING DROP for {s.ip}/32")
    for note in plan.notes:
        lines.append(f"note: {note}")
    lines.append("")
    lines.append(firewall_text.rstrip("\n"))
    if plan.firewall6.chains:
        lines += ["", firewall6_text.rstrip("\n")]
    return "\n".join(lines) + "\n"
