"""The LAN's IPv6 prefix for LAN_IP6: read from the LAN interface, chosen, and checked.

The prefix is what the IPv6 default deny lets in and what the forwarder serves, so it must be
the one LAN_IP6 lies on: a home LAN has the ISP's global prefix and, often, a ULA the router
advertises beside it.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import netns_exec

from netsetup.detect import choose_prefix6
from netsetup.errors import AddressTaken

GLOBAL, ULA = "2001:db8:1::/64", "fd00:1::/64"


@pytest.mark.parametrize(
    ("prefixes", "lan_ip6", "chosen"),
    [
        ([GLOBAL, ULA], "fd00:1::53", ULA),
        ([GLOBAL, ULA], "2001:db8:1::53", GLOBAL),
        # nested prefixes: the first the interface lists
        (["fd00:1::/48", ULA], "fd00:1::53", "fd00:1::/48"),
    ],
)  # fmt: skip
def test_the_prefix_holding_lan_ip6_is_chosen(
    prefixes: list[str], lan_ip6: str, chosen: str
) -> None:
    assert choose_prefix6(prefixes, lan_ip6, "eth0") == chosen


def test_lan_ip6_on_no_prefix_is_refused_naming_them() -> None:
    with pytest.raises(AddressTaken, match=r"fd00:9::53 is on none of eth0's IPv6 prefixes "
                                           r"\(2001:db8:1::/64, fd00:1::/64\)"):  # fmt: skip
        choose_prefix6([GLOBAL, ULA], "fd00:9::53", "eth0")
    with pytest.raises(AddressTaken, match=r"\(none\)"):
        choose_prefix6([], "fd00:9::53", "eth0")


@pytest.mark.netns
def test_prefixes_are_read_from_the_interface(netns: str) -> None:
    """Global and unique local prefixes, in the kernel's order; never the link-local one."""
    netns_exec(netns, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p")
    netns_exec(netns, "ip", "link", "set", "lan0", "up")
    for address in ("fd00:1::2/64", "2001:db8:1::2/64", "2001:db8:1::3/64", "fe80::99/64"):
        netns_exec(netns, "ip", "-6", "addr", "add", address, "dev", "lan0", "nodad")
    code = ("from netsetup.detect import interface_prefixes6 as p; import sys;"
            "print(' '.join(sorted(p(sys.argv[1]))))")  # fmt: skip
    out = netns_exec(netns, sys.executable, "-c", code, "lan0").stdout.split()
    assert out == [GLOBAL, ULA]


REPO = Path(__file__).resolve().parents[2]


def compose_tool() -> None:
    from netsetup.deploy import compose_command  # noqa: PLC0415
    from netsetup.errors import NetsetupError  # noqa: PLC0415

    try:
        compose_command()
    except NetsetupError:
        pytest.skip("no compose tool")


def test_the_ipv6_overlay_is_read_only_with_lan_ip6_and_keeps_the_whole_network() -> None:
    """With LAN_IP6 compose reads compose.ipv6.yaml after compose.yaml: the network gets its IPv6
    subnet and keeps every option of the base file (docker-compose 1.29 replaces a network an
    overlay names rather than merging it), the container keeps its IPv4 address beside its
    IPv6 one, and the forwarder listens on IPv6 too. Without LAN_IP6 nothing of it is read."""
    compose_tool()
    from netsetup.deploy import Compose  # noqa: PLC0415
    from netsetup.plan import Settings, parse_modes  # noqa: PLC0415

    lan = Settings(modes=parse_modes("lan"), lan_ip="192.168.1.53", upstreams=("192.0.2.53",))
    plain = Compose.for_settings(lan, REPO / "compose.yaml")
    assert plain.overlays == (REPO / "compose.web.yaml",) and "SUBNET6" not in plain.variables
    assert "enable_ipv6" not in plain.run("config").stdout

    ipv6 = replace(lan, lan_ip6="fd00:1::53", lan_cidr6="fd00:1::/64", subnet6="fd53:99::/64",
                   ip6="fd53:99::53")  # fmt: skip
    compose = Compose.for_settings(ipv6, REPO / "compose.yaml")
    assert compose.overlays == (REPO / "compose.ipv6.yaml", REPO / "compose.web.yaml")
    assert (compose.variables["SUBNET6"], compose.variables["DNS_IP6"]) == (
        "fd53:99::/64", "fd53:99::53")  # fmt: skip
    config = compose.run("config").stdout
    for line in ("enable_ipv6: true", "subnet: 172.31.53.0/24", "subnet: fd53:99::/64",
                 "com.docker.network.bridge.name: br-dnsapp",
                 "com.docker.network.bridge.enable_ip_masquerade: 'false'",
                 "com.docker.network.bridge.gateway_mode_ipv4: nat-unprotected",
                 "com.docker.network.bridge.gateway_mode_ipv6: nat-unprotected",
                 "ipv4_address: 172.31.53.53", "ipv6_address: fd53:99::53",
                 "DNSPROXY_LISTEN: 0.0.0.0:53,[::]:53",
                 "DNSPROXY_WEB: 0.0.0.0:80"):  # fmt: skip
        assert line in config.replace('"false"', "'false'"), line


def test_the_lan_s_ipv6_prefix_is_one_of_the_home_s_reverse_zones() -> None:
    """With LAN_IP6 the prefix's reverse names are the home's, as the LAN's IPv4 ones are:
    asked of LOCAL_DNS, never of the public upstream."""
    from netsetup_facts import settings  # noqa: PLC0415

    from netsetup.home import reverse_networks  # noqa: PLC0415

    assert reverse_networks(settings("lan,ipv6"), "192.168.1.0/24") == [
        "192.168.1.0/24", "fd00:1::/64"]  # fmt: skip
    assert reverse_networks(settings("lan"), "192.168.1.0/24") == ["192.168.1.0/24"]
