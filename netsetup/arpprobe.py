"""Whether some device on the LAN already uses an IPv4 address: an ARP probe (RFC 5227).

Before the host starts answering ARP for LAN_IP, `up` asks the LAN whether anyone holds it. A
probe is an ARP request for the address with sender address 0.0.0.0, so that it teaches no
neighbour cache a binding; a device holding the address replies (Linux does, so do the usual
stacks), and one that is itself probing for it sends a request naming it as target, which we
leave alone; a request or reply with the address as *sender* is a device using it. Sent on an
AF_PACKET socket bound to the LAN interface (needs CAP_NET_RAW): the kernel's own ARP is not
involved, so nothing is cached or changed on the host.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST, ARP_REPLY = 1, 2
BROADCAST = b"\xff" * 6
PACKET_OUTGOING = 4  # sll_pkttype of frames this host sent itself
# RFC 5227 sends 3 probes 1-2 s apart and waits 2 s more; a LAN answers in milliseconds, so
# fewer and shorter here keep `up` quick while a busy or sleepy device still gets 3 chances.
PROBES = 3
INTERVAL = 0.35
WAIT_AFTER = 0.6


@dataclass(frozen=True)
class Claim:
    """A device that answered for the address."""

    mac: str
    op: str  # ARP: "reply" or "request"; IPv6: "advertisement" or "in use"

    def __str__(self) -> str:
        return f"{self.mac} ({self.op})"


def mac_of(sock: socket.socket) -> bytes:
    """The MAC address of the interface a packet socket is bound to, from the kernel itself
    (not /sys, which shows another network namespace's interfaces under `nsenter -n`)."""
    return sock.getsockname()[4]


def probe_frame(source_mac: bytes, target: str) -> bytes:
    """Ethernet broadcast ARP request: who has TARGET, from SOURCE_MAC with sender IP 0.0.0.0."""
    eth = BROADCAST + source_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, ARP_REQUEST)
    arp += source_mac + bytes(4) + bytes(6) + socket.inet_aton(target)
    return eth + arp


def claim_in(frame: bytes, target: bytes, own_mac: bytes) -> Claim | None:
    """The claim a received frame makes on `target`, if any."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_P_ARP):
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4) or op not in (ARP_REQUEST, ARP_REPLY):
        return None
    sender_mac, sender_ip = frame[22:28], frame[28:32]
    if sender_ip != target or sender_mac == own_mac:
        return None
    mac = ":".join(f"{b:02x}" for b in sender_mac)
    return Claim(mac, "reply" if op == ARP_REPLY else "request")


def in_use(interface: str, address: str, probes: int = PROBES) -> Claim | None:
    """Send `probes` ARP probes for `address` on `interface`; the first device that claims the
    address, or None when nothing did within the wait."""
    target = ipaddress.IPv4Address(address).packed
    return probe(interface, ETH_P_ARP, lambda mac: probe_frame(mac, address),
                 lambda frame, mac: claim_in(frame, target, mac), probes)  # fmt: skip


def probe(interface: str, ethertype: int, frame_from: Callable[[bytes], bytes],
          claim_from: Callable[[bytes, bytes], Claim | None], probes: int = PROBES,
          ) -> Claim | None:  # fmt: skip
    """Send `probes` frames (built from this interface's MAC) a second or so apart on a packet
    socket for `ethertype`, and listen after each: the first claim `claim_from(frame, own MAC)`
    finds in what others sent, or None. Shared by the ARP probe and IPv6's (ndprobe.py)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype)) as sock:
        sock.bind((interface, ethertype))
        own_mac = mac_of(sock)
        frame = frame_from(own_mac)
        for n in range(probes):
            sock.send(frame)
            deadline = time.monotonic() + (INTERVAL if n < probes - 1 else WAIT_AFTER)
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                data, meta = sock.recvfrom(2048)
                if meta[2] == PACKET_OUTGOING:
                    continue
                claim = claim_from(data, own_mac)
                if claim:
                    return claim
    return None
