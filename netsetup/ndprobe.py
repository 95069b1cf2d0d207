"""Whether some device on the LAN already uses an IPv6 address: duplicate address detection.

Before the host starts answering neighbour solicitations for LAN_IP6 (proxy NDP), `up` asks
the LAN whether anyone holds it, as arpprobe.py does for LAN_IP. The probe is RFC 4862's: a
neighbour solicitation for the address from the unspecified address (::) to its
solicited-node multicast group, with no link-layer address option, so that it teaches no
neighbour cache a binding. A device holding the address answers with a neighbour advertisement
to all nodes; a packet whose IPv6 source is the address is a device using it too. One that is
itself probing for it sends a solicitation naming it as target from ::, which we leave alone.
Sent on an AF_PACKET socket bound to the LAN interface (needs CAP_NET_RAW), the frame built
here: the kernel's own neighbour discovery is not involved, so nothing is cached or changed on
the host.
"""

from __future__ import annotations

import ipaddress
import struct

from netsetup.arpprobe import PROBES, Claim, probe

ETH_P_IPV6 = 0x86DD
IPPROTO_ICMPV6 = 58
NEIGHBOR_SOLICITATION, NEIGHBOR_ADVERTISEMENT = 135, 136
HOP_LIMIT = 255  # RFC 4861: neighbour discovery packets with any other hop limit are dropped
UNSPECIFIED = bytes(16)
# RFC 4862 sends DupAddrDetectTransmits (1) solicitations and waits RetransTimer (1 s); as
# arpprobe.py does for ARP, a few shorter rounds (its PROBES and timing) keep `up` quick and
# give a busy device more chances.


def solicited_node(address: bytes) -> bytes:
    """ff02::1:ffXX:XXXX, the multicast group of every address ending in the same 24 bits."""
    return bytes.fromhex("ff02" + "0000" * 4 + "0001ff") + address[13:]


def multicast_mac(group: bytes) -> bytes:
    """The Ethernet address of an IPv6 multicast group: 33:33 and its last 32 bits."""
    return b"\x33\x33" + group[12:]


def icmpv6_checksum(source: bytes, destination: bytes, message: bytes) -> int:
    """RFC 4443's checksum: over the IPv6 pseudo-header and the message."""
    data = source + destination + struct.pack("!I3xB", len(message), IPPROTO_ICMPV6) + message
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def probe_frame(source_mac: bytes, target: str) -> bytes:
    """The Ethernet frame of a DAD probe for TARGET: a neighbour solicitation from ::."""
    address = ipaddress.IPv6Address(target).packed
    group = solicited_node(address)
    message = struct.pack("!BBH4x", NEIGHBOR_SOLICITATION, 0, 0) + address
    checksum = icmpv6_checksum(UNSPECIFIED, group, message)
    message = message[:2] + struct.pack("!H", checksum) + message[4:]
    ipv6 = struct.pack("!IHBB", 6 << 28, len(message), IPPROTO_ICMPV6, HOP_LIMIT)
    ipv6 += UNSPECIFIED + group
    return multicast_mac(group) + source_mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + message


def claim_in(frame: bytes, target: bytes, own_mac: bytes) -> Claim | None:
    """The claim a received frame makes on `target`, if any."""
    if len(frame) < 54 or frame[12:14] != struct.pack("!H", ETH_P_IPV6):
        return None
    sender_mac, ipv6 = frame[6:12], frame[14:]
    if sender_mac == own_mac or ipv6[0] >> 4 != 6:
        return None
    mac = ":".join(f"{b:02x}" for b in sender_mac)
    icmp = ipv6[40:]
    advertisement = ipv6[6] == IPPROTO_ICMPV6 and icmp[:1] == bytes([NEIGHBOR_ADVERTISEMENT])
    if advertisement and icmp[8:24] == target:
        return Claim(mac, "advertisement")
    if ipv6[8:24] == target:
        return Claim(mac, "in use")
    return None


def in_use(interface: str, address: str, probes: int = PROBES) -> Claim | None:
    """Send `probes` DAD probes for `address` on `interface`; the first device that claims the
    address, or None when nothing did within the wait."""
    target = ipaddress.IPv6Address(address).packed
    return probe(interface, ETH_P_IPV6, lambda mac: probe_frame(mac, address),
                 lambda frame, mac: claim_in(frame, target, mac), probes)  # fmt: skip
