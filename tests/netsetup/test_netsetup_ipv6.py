"""The LAN's IPv6 prefix for LAN_IP6: read from the LAN interface, chosen, and checked.

The prefix is what the IPv6 default deny lets in and what the forwarder serves, so it must be
the one LAN_IP6 lies on: a home LAN has the ISP's global prefix and, often, a ULA the router
advertises beside it.
"""

from __future__ import annotations

import sys

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
