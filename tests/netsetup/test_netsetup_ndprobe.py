"""The IPv6 duplicate address probe on a real link: a veth pair from a "host" namespace to a
"LAN" namespace, as test_netsetup_arpprobe.py does for IPv4.

A device holding the address (the peer has it on its interface) must be found by its neighbour
advertisement, with its MAC address; a free address must not, and the probe must leave both
neighbour tables as they were (a solicitation from :: teaches nobody anything, and the host's
own neighbour discovery is not involved).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import needs_root, netns_exec

from netsetup.ndprobe import claim_in, icmpv6_checksum, probe_frame, solicited_node

PEER_ADDR, TAKEN, FREE = "fd00:7::2", "fd00:7::53", "fd00:7::54"
PROBE = (
    "import json, sys; from netsetup.ndprobe import in_use; "
    "c = in_use('lan0', sys.argv[1]); print(json.dumps(c and [c.mac, c.op]))"
)


def test_the_probe_is_rfc_4862s() -> None:
    """From ::, to the solicited-node group and its MAC, hop limit 255, a valid checksum."""
    mac = bytes.fromhex("020000000001")
    frame = probe_frame(mac, "fd00:7::12:3456")
    group = ipaddress.IPv6Address(frame[38:54])
    assert group == ipaddress.IPv6Address("ff02::1:ff12:3456")
    assert frame[:6] == bytes.fromhex("3333ff123456") and frame[6:12] == mac
    assert frame[20] == 58 and frame[21] == 255 and frame[22:38] == bytes(16)
    icmp = frame[54:]
    assert icmp[0] == 135 and len(icmp) == 24
    assert icmpv6_checksum(bytes(16), group.packed, icmp) == 0  # the checksum checks out
    assert solicited_node(ipaddress.IPv6Address("fd00::abcd:ef01").packed)[13:] == b"\xcd\xef\x01"
    # our own probe, or another device's probe for the same address, is no claim
    target = ipaddress.IPv6Address("fd00:7::12:3456").packed
    assert claim_in(frame, target, mac) is None
    assert claim_in(probe_frame(bytes.fromhex("020000000002"), "fd00:7::12:3456"), target,
                    mac) is None  # fmt: skip


@pytest.fixture
def link() -> Iterator[tuple[str, str]]:
    needs_root()
    tag = uuid.uuid4().hex[:6]
    host, peer = f"nsndh-{tag}", f"nsndp-{tag}"
    for ns in (host, peer):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", host, "link", "add", "lan0", "type", "veth", "peer", "name",
                        "eth0", "netns", peer], check=True)  # fmt: skip
        netns_exec(host, "ip", "link", "set", "lan0", "up")
        for address in (PEER_ADDR, TAKEN):
            netns_exec(peer, "ip", "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
        netns_exec(peer, "ip", "link", "set", "eth0", "up")
        # A device on a LAN has long been up: wait until the link carries frames both ways
        # (the kernel's own link-local DAD on lan0 has finished) and the peer has joined the
        # address's solicited-node group.
        deadline = time.monotonic() + 5
        while (netns_exec(host, "ip", "-6", "addr", "show", "dev", "lan0", "tentative").stdout
               or "ff02::1:ff00:53" not in netns_exec(peer, "ip", "-6", "maddr", "show",
                                                      "dev", "eth0").stdout):  # fmt: skip
            assert time.monotonic() < deadline, "the link did not come up"
            time.sleep(0.05)
        yield host, peer
    finally:
        for ns in (host, peer):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def probe(ns: str, address: str) -> tuple[list[str] | None, float]:
    started = time.monotonic()
    out = netns_exec(ns, sys.executable, "-c", PROBE, address).stdout
    return json.loads(out), time.monotonic() - started


@pytest.mark.netns
def test_probe_finds_the_device_holding_the_address(link: tuple[str, str]) -> None:
    host, peer = link
    peer_mac = netns_exec(peer, "cat", "/sys/class/net/eth0/address").stdout.strip()
    claim, _ = probe(host, TAKEN)
    assert claim == [peer_mac, "advertisement"]


@pytest.mark.netns
def test_probe_finds_a_free_address_free_and_teaches_nothing(link: tuple[str, str]) -> None:
    host, peer = link
    before = [netns_exec(ns, "ip", "-6", "neigh", "show").stdout for ns in (host, peer)]
    claim, seconds = probe(host, FREE)
    assert claim is None
    assert seconds < 3, seconds
    assert [netns_exec(ns, "ip", "-6", "neigh", "show").stdout for ns in (host, peer)] == before


@pytest.mark.netns
def test_a_lan_ip6_a_device_holds_is_refused_in_one_line(link: tuple[str, str]) -> None:
    """The check `up` makes before claiming LAN_IP6 names the device that answered."""
    host, peer = link
    peer_mac = netns_exec(peer, "cat", "/sys/class/net/eth0/address").stdout.strip()
    code = ("import sys; from netsetup.detect import check_lan_ip6; from netsetup.errors import "
            "NetsetupError\ntry: check_lan_ip6(sys.argv[1], 'fd00:7::/64', 'lan0')\n"
            "except NetsetupError as e: print(e)")  # fmt: skip
    refused = netns_exec(host, sys.executable, "-c", code, TAKEN).stdout.strip()
    assert refused == (f"--lan-ip6 {TAKEN} is in use on lan0: {peer_mac} (advertisement) "
                       "answered a duplicate address probe; choose a free address")  # fmt: skip
    assert netns_exec(host, sys.executable, "-c", code, FREE).stdout.strip() == ""
