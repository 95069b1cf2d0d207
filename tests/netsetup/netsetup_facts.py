"""Fixed host facts per engine version and firewall backend, for golden and backend tests.

The engines are the ones the plan must serve: 20.10 (Debian bookworm), 26.1 (trixie), 28.5 (sid)
and 29 (iptables or, experimentally, native nftables as the engine's firewall); "28-noiptables" is
Docker 28 with ``"iptables": false`` in daemon.json, which creates no DOCKER-USER chain.
Engines from 27 on write ip6tables too (DOCKER-USER there); 20.10 and 26 do not by default.

A mode may carry words that are not modes: ``ipv6`` adds a LAN address over IPv6 (LAN_IP6 on
the LAN's IPv6 prefix), ``ipv6up`` that and an IPv6 upstream, ``ha`` a peer sharing LAN_IP by
VRRP (HA_PEERS), ``noweb`` no web page (WEB=0; it is on otherwise).
"""

from __future__ import annotations

from netsetup.plan import HostFacts, IptablesBackend, Settings, parse_modes

ENGINES: dict[str, tuple[str, str]] = {
    "20.10": ("20.10.24+dfsg1", "iptables"),
    "26": ("26.1.5+dfsg1", "iptables"),
    "28": ("28.5.2+dfsg3", "iptables"),
    "28-noiptables": ("28.5.2+dfsg3", "iptables"),
    "29": ("29.0.1", "iptables"),
    "29-nftables": ("29.0.1", "nftables"),
}

BACKENDS = ("nft", "legacy")


def facts(engine: str = "20.10", backend: str = "nft") -> HostFacts:
    version, engine_firewall = ENGINES[engine]
    return HostFacts(
        engine_version=version,
        engine_firewall=engine_firewall,
        iptables=IptablesBackend(backend),
        bridge="br-dnsapp",
        lan_interface="eth0",
        lan_cidr="192.168.1.0/24",
        lan_address="192.168.1.2",
        docker_user=not engine.endswith("-noiptables"),
        docker_user6=int(engine.split("-")[0].split(".")[0]) >= 27
        and not engine.endswith("-noiptables"),
        ra_interfaces=("eth0",),  # the LAN interface takes router advertisements (read for IPv6)
    )


LAN_IP = "192.168.1.53"  # LAN address mode's address in the facts' LAN
LAN_CIDR6 = "fd00:1::/64"  # the LAN's IPv6 prefix (a ULA the router advertises)
LAN_IP6 = "fd00:1::53"
UPSTREAM6 = "[2001:db8::53]:53"


HA_PEER = "192.168.1.21"  # the other host sharing LAN_IP (with "ha")


def settings(mode: str = "both") -> Settings:
    words = mode.split(",")
    ipv6 = "ipv6" in words or "ipv6up" in words
    extra = ("ipv6", "ipv6up", "ha", "noweb")
    modes = parse_modes(",".join(w for w in words if w not in extra))
    return Settings(
        modes=modes,
        lan_ip=LAN_IP if "lan" in modes else None,
        lan_ip6=LAN_IP6 if ipv6 else None,
        lan_cidr6=LAN_CIDR6 if ipv6 else None,
        upstreams=("198.51.100.53", UPSTREAM6) if "ipv6up" in words else ("198.51.100.53",),
        subnet="172.31.53.0/24",
        ip="172.31.53.53",
        port=5053,
        project="dnsapp",
        ha_peers=(HA_PEER,) if "ha" in words else (),
        ha_priority=150,
        web="noweb" not in words,
    )
