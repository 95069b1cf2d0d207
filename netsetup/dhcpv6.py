"""Which DNS servers the LAN's DHCPv6 servers hand out: one Information-Request, answered.

A router advertisement with the M or O flag set sends clients to DHCPv6, and the DNS servers
option (23, RFC 3646) of its reply is one more server they ask beside the appliance, invisible
in the advertisement itself. An Information-Request (RFC 8415 18.2.6) asks for configuration
only: no address is leased, the server keeps no state of us. It goes once to
All_DHCP_Relay_Agents_and_Servers (ff02::1:2, link-local multicast: it leaves no link) from port
546 on the LAN interface; the replies are read for at most WAIT seconds, SETTLE after the first.

Port 546 is the DHCPv6 client port: where the host runs a DHCPv6 client of its own on the
interface, the port is taken and nothing is asked (the survey says so); we never share it, so
that no reply meant for that client is taken from it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import time
import uuid
from dataclasses import dataclass

MSG_INFORMATION_REQUEST, MSG_REPLY = 11, 7
OPT_CLIENTID, OPT_ORO, OPT_ELAPSED_TIME = 1, 6, 8
OPT_DNS_SERVERS, OPT_DOMAIN_LIST = 23, 24
DUID_UUID = 4  # RFC 6355: needs no hardware address, and names this run only
ALL_SERVERS = "ff02::1:2"
CLIENT_PORT, SERVER_PORT = 546, 547
WAIT = 1.0  # RFC 8415 INF_TIMEOUT: a client retransmits after 1 s
SETTLE = 0.3


@dataclass(frozen=True)
class Answer:
    """One DHCPv6 server's reply: its (link-local) address and the DNS servers it hands out."""

    server: str
    dns: tuple[str, ...]


def information_request(xid: bytes, client_id: bytes) -> bytes:
    """The request: transaction id, client identifier, elapsed time 0, and the options we ask
    for (DNS servers, domain search list)."""
    def option(code: int, data: bytes) -> bytes:
        return struct.pack("!HH", code, len(data)) + data

    return (bytes([MSG_INFORMATION_REQUEST]) + xid
            + option(OPT_CLIENTID, client_id)
            + option(OPT_ELAPSED_TIME, b"\0\0")
            + option(OPT_ORO, struct.pack("!HH", OPT_DNS_SERVERS, OPT_DOMAIN_LIST)))  # fmt: skip


def parse_reply(packet: bytes, xid: bytes) -> tuple[str, ...] | None:
    """The DNS servers of a Reply to our request, or None when it is none: another message
    type or transaction, or options that run past the end (a malformed message is ignored
    whole). A DNS servers option whose length is no multiple of 16 is ignored alone."""
    if len(packet) < 4 or packet[0] != MSG_REPLY or packet[1:4] != xid:
        return None
    servers: list[str] = []
    pos = 4
    while pos < len(packet):
        if pos + 4 > len(packet):
            return None
        code, size = struct.unpack_from("!HH", packet, pos)
        data = packet[pos + 4 : pos + 4 + size]
        if len(data) != size:
            return None
        if code == OPT_DNS_SERVERS and size % 16 == 0:
            servers += [str(ipaddress.IPv6Address(data[at : at + 16]))
                        for at in range(0, size, 16)]  # fmt: skip
        pos += 4 + size
    return tuple(servers)


def client_id() -> bytes:
    return struct.pack("!H", DUID_UUID) + uuid.uuid4().bytes


NOTES = {
    errno.EADDRINUSE: "port 546 is taken (this host's own DHCPv6 client?)",
    errno.EPERM: "asking needs root",
    errno.EACCES: "asking needs root",
}


def ask(interface: str, wait: float = WAIT) -> tuple[tuple[Answer, ...], str]:
    """Ask once on `interface`; the answers, and a note when there are none (why)."""
    xid = os.urandom(3)
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError as exc:
        return (), f"DHCPv6 not asked: {exc.strerror or exc}"
    answers: dict[str, Answer] = {}
    with sock:
        try:
            index = socket.if_nametoindex(interface)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            sock.bind(("::", CLIENT_PORT))
            sock.sendto(information_request(xid, client_id()),
                        (ALL_SERVERS, SERVER_PORT, 0, index))  # fmt: skip
        except OSError as exc:
            why = NOTES.get(exc.errno or 0, exc.strerror or str(exc))
            return (), f"DHCPv6 not asked: {why}"
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            try:
                packet, address = sock.recvfrom(65535)
            except OSError:
                continue
            if address[1] != SERVER_PORT:
                continue
            servers = parse_reply(packet, xid)
            if servers is None:
                continue
            if not answers:
                deadline = min(deadline, time.monotonic() + SETTLE)
            server = address[0].split("%", 1)[0]
            answers[server] = Answer(server, servers)
    if not answers:
        return (), f"no DHCPv6 reply within {wait:g} s"
    return tuple(answers.values()), ""
