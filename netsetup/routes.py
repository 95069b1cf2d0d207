"""What to configure where so that LAN clients reach the appliance's own address (direct mode).

The appliance subnet exists only behind this host, so something must route it here: the LAN's
router (one static route serves every client), each client (a host route of its own), or, for
clients that take no route (phones, TVs), the host itself as their gateway. Port mode needs none
of this, only clients (or a DHCP server) that can name a DNS port, which few can; hence the
DHCP option that hands out the container address on port 53.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    title: str
    where: str
    lines: list[str]


def route_sections(
    subnet: str, gateway: str, appliance_ip: str, lan_cidr: str, port: int,
    hand_out_dns: bool = True,
) -> list[Section]:
    """The routes to the appliance's own address, per router and client. `hand_out_dns` False
    (lan mode: LAN_IP is the DNS server to hand out) keeps the routers' DHCP option 6 and the
    gateway recipe out, so that the printout never names two DNS servers to hand out."""
    net = ipaddress.ip_network(subnet, strict=False)
    base, mask, prefix = str(net.network_address), str(net.netmask), net.prefixlen
    openwrt_dns = [f"uci add_list dhcp.lan.dhcp_option='6,{appliance_ip}'",
                   "uci commit dhcp && /etc/init.d/dnsmasq reload"] if hand_out_dns else []
    routeros_dns = [f"/ip dhcp-server network set [find address={lan_cidr}] "
                    f"dns-server={appliance_ip}"] if hand_out_dns else []
    # In lan mode every client reaches LAN_IP anyway: no gateway recipe naming DNS_IP.
    gateway_recipe = [Section(
        "Clients that take no route",
        "make this host their gateway (DHCP or static settings on the client)",
        [
            f"gateway {gateway}, DNS {appliance_ip}",
            "this host forwards their other traffic to its own default route",
            "(IPv4 forwarding is on while the appliance is up)",
        ],
    )] if hand_out_dns else []
    return [
        Section(
            "Router (generic)",
            "the LAN's router: one static route serves every client",
            [f"destination {net}  gateway {gateway}  (metric 1, on the LAN interface)"],
        ),
        Section(
            "Router: OpenWrt (uci)",
            "ssh to the router",
            [
                "uci add network route",
                "uci set network.@route[-1].interface='lan'",
                f"uci set network.@route[-1].target='{base}'",
                f"uci set network.@route[-1].netmask='{mask}'",
                f"uci set network.@route[-1].gateway='{gateway}'",
                "uci commit network && /etc/init.d/network reload",
                *openwrt_dns,
            ],
        ),
        Section(
            "Router: MikroTik RouterOS",
            "RouterOS terminal",
            [
                f'/ip route add dst-address={net} gateway={gateway} comment="dns appliance"',
                *routeros_dns,
            ],
        ),
        Section(
            "Client: Linux",
            "each client, as root (not persistent; add to the network manager to keep it)",
            [f"ip route add {net} via {gateway}", f"then use {appliance_ip} as DNS server"],
        ),
        Section(
            "Client: Windows",
            "elevated command prompt (-p keeps it across reboots)",
            [f"route -p add {base} mask {mask} {gateway}"],
        ),
        Section(
            "Client: macOS",
            "Terminal",
            [
                f"sudo route -n add -net {base}/{prefix} {gateway}",
                f'persistent: networksetup -setadditionalroutes "Ethernet" {base} {mask} {gateway}',
            ],
        ),
        *gateway_recipe,
        Section(
            "Port mode (no route needed)",
            "clients or forwarders that can name a DNS port",
            [f"server {gateway} port {port}, e.g. dnsmasq: server={gateway}#{port}"],
        ),
    ]


def lan_sections(lan_ip: str, lan_cidr: str) -> list[Section]:
    """Lan mode: LAN_IP is on the clients' own subnet, so the only setting is the DNS server,
    best handed out by the LAN's DHCP server (option 6), else set on each client."""
    return [
        Section(
            "LAN address mode: DHCP (generic)",
            "the router's DHCP settings: every client gets it with its next lease",
            [f"DNS server (DHCP option 6): {lan_ip}  (only this one: a second would be asked "
             "too, and would bypass the appliance)"],
        ),  # fmt: skip
        Section(
            "LAN address mode: OpenWrt (uci)",
            "ssh to the router",
            [
                f"uci add_list dhcp.lan.dhcp_option='6,{lan_ip}'",
                "uci commit dhcp && /etc/init.d/dnsmasq reload",
            ],
        ),
        Section(
            "LAN address mode: MikroTik RouterOS",
            "RouterOS terminal",
            [f"/ip dhcp-server network set [find address={lan_cidr}] dns-server={lan_ip}"],
        ),
        Section(
            "LAN address mode: Linux client",
            "systemd-resolved (per link; IF is the client's LAN interface), or resolv.conf",
            [f"resolvectl dns IF {lan_ip}", f"or in /etc/resolv.conf: nameserver {lan_ip}"],
        ),
        Section(
            "LAN address mode: Windows client",
            "elevated command prompt (the adapter's name as `netsh interface show interface` "
            "prints it)",
            [f'netsh interface ipv4 set dnsservers name="Ethernet" static {lan_ip} primary'],
        ),
        Section(
            "LAN address mode: macOS client",
            "Terminal (the service's name as `networksetup -listallnetworkservices` prints it)",
            [f'networksetup -setdnsservers "Wi-Fi" {lan_ip}'],
        ),
    ]


def ipv6_dns_sections(
    lan_ip6: str | None, ipv4_dns: str, seen: list[str] | None = None
) -> list[Section]:
    """How to keep the LAN's routers from handing out an IPv6 DNS server of their own (RDNSS in
    their advertisements, or DHCPv6), which dual-stack clients ask beside the appliance: stop
    it, or, once the appliance has an IPv6 address (`lan_ip6`), hand that out instead. `seen`
    is what the last survey found (ra.warnings' words), shown first."""
    found = [Section("IPv6 DNS: what the LAN's routers hand out",
                     "seen by the last `netsetup up` or `netsetup check`",
                     seen)] if seen else []  # fmt: skip
    if lan_ip6:
        generic = [f"IPv6 DNS server: {lan_ip6} only, in router advertisements (RDNSS) and "
                   "DHCPv6 alike"]  # fmt: skip
        openwrt = ["uci -q delete dhcp.lan.dns",
                   f"uci add_list dhcp.lan.dns='{lan_ip6}'  # odhcpd: RA (RDNSS) and DHCPv6"]
        routeros = [f"/ipv6 nd set [find interface=bridge] advertise-dns=yes dns={lan_ip6}"]
        radvd = [f"RDNSS {lan_ip6} {{ }};  (the only RDNSS block of the LAN's interface)"]
        linux = [f"nmcli connection modify CONN ipv6.ignore-auto-dns yes ipv6.dns {lan_ip6}",
                 "nmcli connection up CONN"]
        windows = [f'netsh interface ipv6 set dnsservers name="Ethernet" static {lan_ip6} '
                   "primary"]  # fmt: skip
        macos = [f'networksetup -setdnsservers "Wi-Fi" {ipv4_dns} {lan_ip6}',
                 "(servers set by hand replace those the network hands out, IPv6 ones too)"]
    else:
        generic = ["the appliance has no IPv6 address: turn off the router's IPv6 DNS "
                   "announcement (RDNSS in router advertisements, DNS in DHCPv6);",
                   "clients then ask the IPv4 server DHCP hands out, the appliance"]
        openwrt = ["uci set dhcp.lan.ra_dns='0'  # no RDNSS in router advertisements",
                   "uci set dhcp.lan.dns_service='0'  # the router does not announce itself",
                   "uci -q delete dhcp.lan.dns  # nor any other server (RA and DHCPv6)"]
        routeros = ["/ipv6 nd set [find interface=bridge] advertise-dns=no"]
        radvd = ["remove the RDNSS { ... }; block (and DNSSL) of the LAN's interface"]
        linux = ["nmcli connection modify CONN ipv6.ignore-auto-dns yes",
                 "nmcli connection up CONN"]
        windows = ["a static IPv4 DNS server is not enough: Windows still asks the IPv6 one "
                   "the router hands out; change the router"]
        macos = [f'networksetup -setdnsservers "Wi-Fi" {ipv4_dns}',
                 "(servers set by hand replace those the network hands out, IPv6 ones too)"]
    return [
        *found,
        Section("IPv6 DNS: any router", "its IPv6 / LAN settings (\"IPv6 DNS server\", "
                "\"RDNSS\", \"DNS from ISP\")", generic),  # fmt: skip
        Section("IPv6 DNS: OpenWrt (odhcpd, uci)", "ssh to the router", [
            *openwrt,
            "uci commit dhcp && /etc/init.d/odhcpd restart",
        ]),
        Section("IPv6 DNS: MikroTik RouterOS v7",
                "RouterOS terminal (bridge: the LAN's interface there, as in the default "
                "configuration)", [
                    *routeros,
                    "/ipv6 nd set [find interface=bridge] other-configuration=no  # unless a "
                    "DHCPv6 server must serve the LAN: clients ask it for DNS servers too",
                ]),  # fmt: skip
        Section("IPv6 DNS: radvd", "/etc/radvd.conf on the router, then reload radvd", [
            *radvd,
            "AdvOtherConfigFlag off;  unless a DHCPv6 server must serve the LAN",
        ]),
        Section("IPv6 DNS: Linux client",
                "NetworkManager (CONN as `nmcli connection show` names it); systemd-networkd "
                "in the .network file", [
                    *linux,
                    "systemd-networkd: [IPv6AcceptRA] UseDNS=no and [DHCPv6] UseDNS=no",
                ]),  # fmt: skip
        Section("IPv6 DNS: Windows client", "elevated command prompt", windows),
        Section("IPv6 DNS: macOS client",
                "Terminal (the service's name as `networksetup -listallnetworkservices` "
                "prints it)", macos),  # fmt: skip
        Section("IPv6 DNS: phones, TVs", "Android, iOS and the like",
                ["they take what the router hands out: change the router"]),
    ]


def render_text(sections: list[Section]) -> str:
    out: list[str] = []
    for section in sections:
        out.append(f"## {section.title}")
        out.append(f"   ({section.where})")
        out += [f"  {line}" for line in section.lines]
        out.append("")
    return "\n".join(out)
