"""The ARP probe on a real link: a veth pair from a "host" namespace to a "LAN" namespace.

A device holding the address (the peer namespace has it on its interface) must be found, with
its MAC address; a free address must not, and the probe must leave the host's neighbour table as
it was (sender 0.0.0.0 teaches nobody anything, and the host's own ARP is not involved).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import needs_root, netns_exec

pytestmark = pytest.mark.netns
HOST_ADDR, PEER_ADDR, TAKEN, FREE = "198.18.7.1", "198.18.7.2", "198.18.7.53", "198.18.7.54"
PROBE = (
    "import json, sys; from netsetup.arpprobe import in_use; "
    "c = in_use('lan0', sys.argv[1]); print(json.dumps(c and [c.mac, c.op]))"
)


@pytest.fixture
def link() -> Iterator[tuple[str, str]]:
    needs_root()
    tag = uuid.uuid4().hex[:6]
    host, peer = f"nsarph-{tag}", f"nsarpp-{tag}"
    for ns in (host, peer):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", host, "link", "add", "lan0", "type", "veth", "peer", "name",
                        "eth0", "netns", peer], check=True)  # fmt: skip
        netns_exec(host, "ip", "addr", "add", f"{HOST_ADDR}/24", "dev", "lan0")
        netns_exec(host, "ip", "link", "set", "lan0", "up")
        netns_exec(peer, "ip", "addr", "add", f"{PEER_ADDR}/24", "dev", "eth0")
        netns_exec(peer, "ip", "addr", "add", f"{TAKEN}/24", "dev", "eth0")
        netns_exec(peer, "ip", "link", "set", "eth0", "up")
        yield host, peer
    finally:
        for ns in (host, peer):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def probe(ns: str, address: str) -> tuple[list[str] | None, float]:
    started = time.monotonic()
    out = netns_exec(ns, sys.executable, "-c", PROBE, address).stdout
    return json.loads(out), time.monotonic() - started


def test_probe_finds_the_device_holding_the_address(link: tuple[str, str]) -> None:
    host, peer = link
    peer_mac = netns_exec(peer, "cat", "/sys/class/net/eth0/address").stdout.strip()
    claim, _ = probe(host, TAKEN)
    assert claim == [peer_mac, "reply"]


def test_probe_finds_a_free_address_free_and_teaches_nothing(link: tuple[str, str]) -> None:
    host, peer = link
    neighbours = netns_exec(host, "ip", "neigh", "show").stdout
    claim, seconds = probe(host, FREE)
    assert claim is None
    assert seconds < 3, seconds
    assert netns_exec(host, "ip", "neigh", "show").stdout == neighbours
    # the peer learnt no binding for 0.0.0.0 or for the host from a probe
    assert HOST_ADDR not in netns_exec(peer, "ip", "neigh", "show").stdout
