"""Reading the host: who we are, which engine and firewall run, where the LAN is.

Everything here only reads. The results feed `compute_plan` as HostFacts, and the pre-flight
checks that refuse to start (not root, no engine, unknown interface, overlapping subnet, taken
port) raise before anything on the host is changed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netsetup import sysctl
from netsetup.errors import (
    AddressTaken,
    InterfaceNotFound,
    NoEngine,
    NotRoot,
    PortTaken,
    SubnetOverlap,
)
from netsetup.plan import IptablesBackend, check_lan_ip6_in, check_lan_ip_in


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRoot("netsetup must run as root (it changes sysctls and the firewall)")


def docker_client() -> Any:
    """A client for the engine DOCKER_HOST names (or the default socket), checked with a ping."""
    import docker  # noqa: PLC0415 - heavy import, only for commands that talk to the engine

    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise NoEngine(f"no Docker engine reachable at {where}: {_short(exc)}") from exc
    return client


@dataclass(frozen=True)
class EngineInfo:
    version: str
    firewall: str  # "iptables" or "nftables"


def engine_info(client: Any) -> EngineInfo:
    version = client.version().get("Version", "0")
    info = client.info()
    # `FirewallBackend` appears in 28.1; older engines always use iptables.
    backend = info.get("FirewallBackend") or {}
    driver = backend.get("Driver", "iptables") if isinstance(backend, dict) else "iptables"
    return EngineInfo(version=version, firewall="nftables" if "nftables" in driver else "iptables")


# Chains the engine creates when it manages iptables: where they are is where its rules are.
ENGINE_CHAINS = ("DOCKER", "DOCKER-USER", "DOCKER-FORWARD", "DOCKER-ISOLATION-STAGE-1")


def iptables_backend(override: str | None = None) -> IptablesBackend:
    """The iptables flavour that holds the host's rules, chosen as kube-proxy's wrapper does.

    `iptables -V` says which flavour *our* binary is, which is not the question: in the host
    service's container it is the image's, and on a host both may be installed. What matters is
    where the engine writes. So each flavour is asked for its rules: the one that holds the
    engine's chains wins; failing that the one with more rules (a firewall manager's); on a
    tie, nf_tables, the default of every current distribution.
    """
    if override and override != "auto":
        return IptablesBackend(override)
    scores = {}
    for flavour in (IptablesBackend.nft, IptablesBackend.legacy):
        dump = _save(flavour)
        engine = any(f":{chain} " in dump for chain in ENGINE_CHAINS)
        rules = sum(line.startswith("-A ") for line in dump.splitlines())
        scores[flavour] = (engine, rules)
    if scores[IptablesBackend.legacy] > scores[IptablesBackend.nft]:
        return IptablesBackend.legacy
    return IptablesBackend.nft


def _save(flavour: IptablesBackend) -> str:
    """``iptables-<flavour>-save``; empty where that flavour is not installed. Without ``-t``:
    naming a table makes the kernel create it, and looking must change nothing."""
    try:
        proc = subprocess.run(
            [f"iptables-{flavour.value}-save"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        return ""
    return proc.stdout if proc.returncode == 0 else ""


@dataclass(frozen=True)
class Lan:
    interface: str
    cidr: str
    address: str


def _ipr() -> Any:
    from pyroute2 import IPRoute  # noqa: PLC0415

    return IPRoute()


def lan(interface: str | None, cidr: str | None) -> Lan:
    """The LAN side: given, or the interface of the default route and its IPv4 network."""
    with _ipr() as ipr:
        if interface is None:
            routes = ipr.get_default_routes(family=socket.AF_INET)
            if not routes:
                raise InterfaceNotFound("no IPv4 default route: pass --lan-interface")
            index = routes[0].get_attr("RTA_OIF")
            links = ipr.get_links(index)
            interface = links[0].get_attr("IFLA_IFNAME")
        found = ipr.link_lookup(ifname=interface)
        if not found:
            raise InterfaceNotFound(f"interface {interface} not found")
        addrs = [
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(family=socket.AF_INET, index=found[0])
        ]
    # a /32 on the LAN interface is a VRRP address (HA) or the like, never the host's own
    addrs = sorted(addrs, key=lambda pair: pair[1] == 32)
    if cidr is not None:
        network = ipaddress.ip_network(cidr, strict=False)
        inside = [a for a, _ in addrs if ipaddress.ip_address(a) in network]
        address = inside[0] if inside else (addrs[0][0] if addrs else "")
        return Lan(interface, str(network), address)
    if not addrs:
        raise InterfaceNotFound(f"interface {interface} has no IPv4 address: pass --lan-cidr")
    address, prefix = addrs[0]
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return Lan(interface, str(network), address)


def lan_gateway(interface: str, cidr: str) -> str | None:
    """The gateway the host's routing table names on the LAN interface, inside the LAN: the
    router, which is normally also the LAN's resolver. The default route's first, then any
    route's. Only read: nothing is asked on the network."""
    lan_net = ipaddress.ip_network(cidr, strict=False)
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            return None
        routes = [r for r in ipr.get_routes(family=socket.AF_INET, table=254)
                  if r.get_attr("RTA_OIF") == found[0] and r.get_attr("RTA_GATEWAY")]
    for route in sorted(routes, key=lambda r: r["dst_len"]):  # the default route first
        gateway = route.get_attr("RTA_GATEWAY")
        if ipaddress.ip_address(gateway) in lan_net:
            return str(gateway)
    return None


def interface_prefixes6(interface: str) -> list[str]:
    """The IPv6 prefixes of the interface's global and unique local addresses (the kernel's
    order), each as NETWORK/LEN; link-local ones are no LAN prefix."""
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            raise InterfaceNotFound(f"interface {interface} not found")
        addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                 for a in ipr.get_addr(family=socket.AF_INET6, index=found[0])]  # fmt: skip
    prefixes: list[str] = []
    for address, length in addrs:
        network = ipaddress.IPv6Network(f"{address}/{length}", strict=False)
        if not ipaddress.IPv6Address(address).is_link_local and str(network) not in prefixes:
            prefixes.append(str(network))
    return prefixes


RTPROT_RA = 9  # linux/rtnetlink.h: a route the kernel learned from a router advertisement


def ra_interfaces(lan_interface: str) -> tuple[str, ...]:
    """Interfaces that configure the host's IPv6 from router advertisements (accept_ra not 0):
    the LAN interface, and every other that holds a route learned from one (its default route,
    or a more specific one). Forwarding would cost each its learned routes (plan.ipv6_sysctls).
    A repeated `up` finds accept_ra at the 2 it set, still not 0: the same interfaces."""
    with _ipr() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        learned = [names.get(route.get_attr("RTA_OIF"))
                   for route in ipr.get_routes(family=socket.AF_INET6, table=254)
                   if route["proto"] == RTPROT_RA]  # fmt: skip
    found: list[str] = []
    for name in [lan_interface, *sorted(n for n in learned if n)]:
        if name in found:
            continue
        try:
            taking = sysctl.get(f"net.ipv6.conf.{name}.accept_ra") != "0"
        except OSError:  # no IPv6 on it (disable_ipv6 at boot): nothing to keep
            taking = False
        if taking:
            found.append(name)
    return tuple(found)


def choose_prefix6(prefixes: list[str], lan_ip6: str, interface: str) -> str:
    """The LAN's IPv6 prefix for LAN_IP6: the first of the interface's prefixes holding it; a
    LAN_IP6 in none of them is refused, naming them. Whether that is a ULA or the ISP's prefix
    is the user's choice of LAN_IP6 (README: a ULA outlives the ISP's prefix changes)."""
    address = ipaddress.IPv6Address(lan_ip6)
    holding = [p for p in prefixes if address in ipaddress.IPv6Network(p)]
    if not holding:
        have = ", ".join(prefixes) or "none"
        raise AddressTaken(
            f"--lan-ip6 {lan_ip6} is on none of {interface}'s IPv6 prefixes ({have}): choose "
            "an address on one (a ULA the router advertises is the robust choice), or give "
            "--lan-cidr6"
        )
    return holding[0]


def host_addresses6() -> set[str]:
    """Every IPv6 address of this host (of its network namespace), on any interface."""
    with _ipr() as ipr:
        return {str(ipaddress.IPv6Address(a.get_attr("IFA_ADDRESS")))
                for a in ipr.get_addr(family=socket.AF_INET6)}  # fmt: skip


def check_lan_ip6(lan_ip6: str, lan_cidr6: str, interface: str, probe: bool = True,
                  peers: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Refuse a LAN_IP6 the host must not claim: outside the LAN's IPv6 prefix, one of its
    anycast addresses, or what check_unclaimed refuses (a duplicate address probe, which sends
    a few solicitations from :: and changes nothing)."""
    from netsetup import ndprobe  # noqa: PLC0415

    check_lan_ip6_in(ipaddress.IPv6Address(lan_ip6), ipaddress.IPv6Network(lan_cidr6))
    check_unclaimed("--lan-ip6", lan_ip6, host_addresses6(), interface, probe, peers,
                    ndprobe.in_use, "a duplicate address probe",
                    "choose a free address")  # fmt: skip


def check_subnet_free(subnet: str, bridge: str | None) -> None:
    """Refuse a subnet that overlaps a route of the host (our own bridge's route excepted)."""
    wanted = ipaddress.ip_network(subnet, strict=False)
    with _ipr() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for route in ipr.get_routes(family=socket.AF_INET, table=254):
            dst = route.get_attr("RTA_DST")
            if dst is None or route["dst_len"] == 0:
                continue  # the default route overlaps everything by design
            dev = names.get(route.get_attr("RTA_OIF"), "?")
            if bridge is not None and dev == bridge:
                continue
            network = ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False)
            if network.overlaps(wanted):
                raise SubnetOverlap(
                    f"appliance subnet {wanted} overlaps the host route {network} dev {dev}: "
                    "choose another --subnet"
                )


def host_addresses() -> set[str]:
    """Every IPv4 address of this host (of its network namespace), on any interface."""
    with _ipr() as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}


def check_lan_ip(lan_ip: str, interface: str, lan_cidr: str, probe: bool = True,
                 peers: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Refuse a LAN_IP the host must not claim: outside the LAN, its network or broadcast
    address, or what check_unclaimed refuses (an ARP probe, which sends a few ARP frames and
    changes nothing)."""
    from netsetup import arpprobe  # noqa: PLC0415

    check_lan_ip_in(ipaddress.IPv4Address(lan_ip), ipaddress.IPv4Network(lan_cidr))
    check_unclaimed("--lan-ip", lan_ip, host_addresses(), interface, probe, peers,
                    arpprobe.in_use, "an ARP probe",
                    "choose a free address (outside the DHCP pool)")  # fmt: skip


def check_unclaimed(option: str, address: str, own: set[str], interface: str, probe: bool,
                    peers: tuple[str, ...], in_use: Callable[[str, str], Any], probe_name: str,
                    advice: str) -> None:  # fmt: skip
    """Refuse an address of this host's (`own`) or one a device on the LAN answers `in_use`'s
    probe for. A repeated `up` finds our own proxy entry and skips the probe: the host itself
    would answer it. With failover `peers` the address is the one they share: held here
    already (keepalived's, this host is master) or by a peer (found by the MAC address each
    peer answers for its own address with), it is no one else's."""
    from netsetup import hostnet  # noqa: PLC0415

    if address in own:
        if peers and holds_vip(interface, address):
            return
        raise AddressTaken(f"{option} {address} is an address of this host: choose a free one")
    if not probe or hostnet.has_proxy(hostnet.ProxyNeighbour(address, interface)):
        return
    claim = in_use(interface, address)
    if claim is not None and claim.mac not in peer_macs(interface, peers):
        raise AddressTaken(f"{option} {address} is in use on {interface}: {claim} answered "
                           f"{probe_name}; {advice}")  # fmt: skip


def holds_vip(interface: str, address: str) -> bool:
    """Whether `address` is on `interface` as a host address (/32, /128) of its own: how
    keepalived adds LAN_IP (and LAN_IP6) on the master; never the host's own LAN address."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    full = 128 if family == socket.AF_INET6 else 32
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            return False
        return any(a.get_attr("IFA_ADDRESS") == address and a["prefixlen"] == full
                   for a in ipr.get_addr(family=family, index=found[0]))  # fmt: skip


def peer_macs(interface: str, peers: tuple[str, ...]) -> set[str]:
    """The MAC addresses the failover peers answer ARP for their own addresses with."""
    from netsetup import arpprobe  # noqa: PLC0415

    return {c.mac for c in (arpprobe.in_use(interface, peer) for peer in peers) if c}


def check_port_free(port: int, option: str = "--port", udp: bool = True) -> None:
    """Refuse a port some process already holds, before compose would fail on it (`option`
    names the setting to change; the web page's port is TCP only, so `udp` False).

    Docker publishes on IPv4 and, where the host has it, IPv6; each family is tried with UDP and
    TCP by binding the wildcard address. UDP binds without SO_REUSEADDR: with it, a holder that
    set it too (many DNS servers do) would share the port silently. TCP keeps SO_REUSEADDR, so a
    connection in TIME_WAIT is not mistaken for a listener.
    """
    families = [(socket.AF_INET, "0.0.0.0", "IPv4")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::", "IPv6"))
    kinds = (socket.SOCK_DGRAM, socket.SOCK_STREAM) if udp else (socket.SOCK_STREAM,)
    for family, wildcard, family_name in families:
        for kind in kinds:
            proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
            try:
                sock = socket.socket(family, kind)
            except OSError as exc:
                if family == socket.AF_INET6 and exc.errno == errno.EAFNOSUPPORT:
                    break  # no IPv6 on this host: nothing can hold the port there
                raise
            with sock:
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # only IPv6 here: the IPv4 wildcard was tried on its own
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((wildcard, port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise PortTaken(
                            f"port {port}/{proto} ({family_name}) is already taken on this host: "
                            f"choose another {option}"
                        ) from exc
                    if family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL:
                        break  # IPv6 disabled
                    raise


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
