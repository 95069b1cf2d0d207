"""Who else hands out a DNS server over IPv6 on the LAN: the routers' advertisements, read.

A dual-stack client takes DNS servers from three places: DHCP (IPv4), the routers'
advertisements (RDNSS options, RFC 8106) and DHCPv6, which it asks when an advertisement sets
the M (managed) or O (other configuration) flag. Android, iOS, Windows, macOS and Linux ask an
IPv6 server beside, or before, the IPv4 one, so a home router that advertises its own (or the
ISP's) server takes lookups past the appliance. DHCP option 6 pointing at the appliance does not
change that, and nothing on the host shows it: hence this survey.

The host sends one router solicitation to the link's routers (ff02::2, hop limit 255: link-local
multicast, it leaves no link) and reads the advertisements that arrive on a raw ICMPv6 socket
bound to the LAN interface, for at most LISTEN seconds, and SETTLE seconds after the first one.
The kernel delivers every advertisement on the interface to such a socket, whether it was sent
to all nodes (ff02::1) or to our link-local address, and whatever the interface's forwarding
and accept_ra settings make of it (a host with forwarding on ignores advertisements for its
own configuration unless accept_ra is 2; the packets still arrive). Nothing is joined, nothing
on the host is changed.

Each advertisement is checked as a host checks it (RFC 4861 6.1.2: hop limit 255, code 0, a
link-local source, options with a non-zero length that fit) and parsed with every length
checked: one that fails is ignored as a host would ignore it, never an error. Where one sets
the M or O flag, clients ask DHCPv6 for DNS servers too, so the survey asks as well (one
Information-Request, dhcpv6.py, at most dhcpv6.WAIT seconds more); where it cannot (the host's
own DHCPv6 client holds the port) or nobody answers, the report says those servers went unseen.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import struct
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from netsetup import dhcpv6

ICMP6_RS, ICMP6_RA = 133, 134
OPT_RDNSS, OPT_DNSSL = 25, 31  # RFC 8106
ICMP6_FILTER = 1  # <netinet/icmp6.h>, level IPPROTO_ICMPV6 (Python has no name for it)
ALL_ROUTERS = "ff02::2"
ND_HOP_LIMIT = 255  # RFC 4861: a neighbour discovery packet with less came from off the link
RA_HEADER = 16  # type, code, checksum, hop limit, flags, router lifetime, reachable, retrans
FLAG_MANAGED, FLAG_OTHER = 0x80, 0x40
# Routers answer a solicitation after a random delay of up to 0.5 s (RFC 4861
# MAX_RA_DELAY_TIME), later if they advertised less than MinDelayBetweenRAs (3 s) ago.
LISTEN = 3.0
SETTLE = 0.6  # after the first advertisement: the other routers' answers to the same solicitation


@dataclass(frozen=True)
class DnsServer:
    """An RDNSS address and how long the router says to use it (0: stop using it)."""

    address: str
    lifetime: int


@dataclass(frozen=True)
class Advert:
    """What one router advertised that concerns DNS."""

    router: str  # its link-local address, the advertisement's source
    managed: bool  # M: addresses from DHCPv6 (and DNS servers with them)
    other: bool  # O: other configuration, DNS servers among it, from DHCPv6
    lifetime: int  # router lifetime, seconds (0: not a default router)
    dns: tuple[DnsServer, ...] = ()
    search: tuple[str, ...] = ()  # DNSSL domains

    @property
    def dhcpv6(self) -> bool:
        return self.managed or self.other

    @property
    def flags(self) -> str:
        return "+".join(f for f, on in (("M", self.managed), ("O", self.other)) if on)


def _dnssl_names(data: bytes) -> tuple[str, ...] | None:
    """The domain names of a DNSSL option's name field (RFC 1035 labels, no compression,
    zero padding at the end); None if a label overruns the field or is too long."""
    names: list[str] = []
    labels: list[str] = []
    pos = 0
    while pos < len(data):
        size = data[pos]
        pos += 1
        if size == 0:
            if labels:
                names.append(".".join(labels))
                labels = []
            continue  # the end of a name, or padding
        if size > 63 or pos + size > len(data):
            return None
        labels.append(data[pos : pos + size].decode("ascii", "replace"))
        pos += size
    return None if labels else tuple(names)  # a name left open ran off the end


def parse_ra(packet: bytes, source: str, hop_limit: int | None = None) -> Advert | None:
    """The advertisement in an ICMPv6 message (from its type field on), or None when it is not
    a valid one: a host would ignore it, and so do we. `hop_limit` is the IPv6 header's,
    where the caller knows it."""
    try:
        router = ipaddress.IPv6Address(source.split("%", 1)[0])
    except ValueError:
        return None
    if not router.is_link_local or (hop_limit is not None and hop_limit != ND_HOP_LIMIT):
        return None
    if len(packet) < RA_HEADER or packet[0] != ICMP6_RA or packet[1] != 0:
        return None
    flags = packet[5]
    (lifetime,) = struct.unpack_from("!H", packet, 6)
    dns: list[DnsServer] = []
    search: list[str] = []
    pos = RA_HEADER
    while pos < len(packet):
        if pos + 2 > len(packet):
            return None  # half an option header
        kind, units = packet[pos], packet[pos + 1]
        end = pos + units * 8
        if units == 0 or end > len(packet):
            return None  # RFC 4861: a zero length makes the whole message invalid
        body = packet[pos:end]
        # RFC 8106: an RDNSS of length 3, 5, 7...; one of another length is ignored alone.
        if kind == OPT_RDNSS and units >= 3 and units % 2 == 1:
            (seconds,) = struct.unpack_from("!I", body, 4)
            for at in range(8, len(body), 16):
                address = ipaddress.IPv6Address(body[at : at + 16])
                dns.append(DnsServer(str(address), seconds))
        elif kind == OPT_DNSSL and units >= 2:
            names = _dnssl_names(body[8:])
            search += names or ()
        pos = end
    return Advert(
        router=str(router),
        managed=bool(flags & FLAG_MANAGED),
        other=bool(flags & FLAG_OTHER),
        lifetime=lifetime,
        dns=tuple(dns),
        search=tuple(search),
    )


def merge(known: Advert | None, advert: Advert) -> Advert:
    """Two advertisements from one router (a repeat, or two daemons on it, or options split
    over messages): a host takes the servers of each, so the survey keeps both's servers and
    flags; the newer lifetimes win."""
    if known is None:
        return advert
    dns = {d.address: d for d in (*known.dns, *advert.dns)}
    search = dict.fromkeys((*known.search, *advert.search))
    return replace(advert, managed=known.managed or advert.managed,
                   other=known.other or advert.other, dns=tuple(dns.values()),
                   search=tuple(search))  # fmt: skip


@dataclass(frozen=True)
class Survey:
    """What listening on one interface found: the advertisements (the last one of each
    router), or `note`, why nothing could be listened for; the DHCPv6 servers' answers where
    an advertisement invited DHCPv6, or `dhcpv6_note`, why there are none."""

    interface: str
    adverts: tuple[Advert, ...] = ()
    listened: float = 0.0  # seconds
    note: str = ""
    at: float = field(default_factory=time.time)
    dhcpv6: tuple[dhcpv6.Answer, ...] = ()
    dhcpv6_note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Survey | None:
        """A survey as as_dict wrote it; None for anything else (a damaged record)."""
        try:
            adverts = tuple(
                Advert(
                    router=str(a["router"]), managed=bool(a["managed"]),
                    other=bool(a["other"]), lifetime=int(a["lifetime"]),
                    dns=tuple(DnsServer(str(d["address"]), int(d["lifetime"]))
                              for d in a["dns"]),
                    search=tuple(str(s) for s in a["search"]),
                )  # fmt: skip
                for a in data["adverts"]
            )
            answers = tuple(dhcpv6.Answer(str(a["server"]), tuple(str(d) for d in a["dns"]))
                            for a in data.get("dhcpv6", ()))  # fmt: skip
            return cls(str(data["interface"]), adverts, float(data["listened"]),
                       str(data["note"]), float(data["at"]), answers,
                       str(data.get("dhcpv6_note", "")))  # fmt: skip
        except (TypeError, KeyError, ValueError, AttributeError):
            return None


def _only(kind: int) -> bytes:
    """An ICMP6_FILTER passing one message type (Linux: a set bit blocks its type)."""
    words = [0xFFFFFFFF] * 8
    words[kind >> 5] &= ~(1 << (kind & 31))
    return struct.pack("=8I", *words)


def _hop_limit(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_HOPLIMIT and len(data) >= 4:
            return struct.unpack("=i", data[:4])[0]
    return None


def router_solicitation() -> bytes:
    """Type 133, code 0, checksum left to the kernel, reserved; no source link-layer address
    option (optional, RFC 4861 4.1): a router that answers by unicast resolves us first."""
    return struct.pack("!BBHI", ICMP6_RS, 0, 0, 0)


def solicit(interface: str) -> bool:
    """One router solicitation on `interface`, not waiting for the answer (the kernel takes
    the advertisement it brings); whether it was sent."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
            index = socket.if_nametoindex(interface)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ND_HOP_LIMIT)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            sock.sendto(router_solicitation(), (ALL_ROUTERS, 0, 0, index))
    except OSError:
        return False
    return True


QUIET_ERRORS = {
    errno.EADDRNOTAVAIL: "{iface} has no usable IPv6 link-local address (yet)",
    errno.ENETUNREACH: "{iface} is down or has IPv6 off",
    errno.ENETDOWN: "{iface} is down",
    errno.EAFNOSUPPORT: "this host has no IPv6",
    errno.ENODEV: "no interface {iface}",
    errno.EPERM: "listening needs root (CAP_NET_RAW)",
    errno.EACCES: "listening needs root (CAP_NET_RAW)",
}


def _quiet(interface: str, exc: OSError) -> Survey:
    text = QUIET_ERRORS.get(exc.errno or 0, "{iface}: " + (exc.strerror or str(exc)))
    return Survey(interface, note="no IPv6 router seen: " + text.format(iface=interface))


def listen(interface: str, listen_for: float = LISTEN, settle: float = SETTLE) -> Survey:
    """Solicit the routers on `interface` and collect their advertisements, then, if one
    invites DHCPv6, ask its DHCPv6 servers; never raises for what the host or the link lacks
    (no IPv6, no link-local address yet, no router): that is a survey with a note, or with no
    advertisements."""
    started = time.monotonic()
    heard = _advertisements(interface, listen_for, settle)
    if not any(a.dhcpv6 for a in heard.adverts):
        return heard
    answers, note = dhcpv6.ask(interface)
    return replace(heard, listened=round(time.monotonic() - started, 2), dhcpv6=answers,
                   dhcpv6_note=note)  # fmt: skip


def _advertisements(interface: str, listen_for: float, settle: float) -> Survey:
    started = time.monotonic()
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    except OSError as exc:
        return _quiet(interface, exc)
    adverts: dict[str, Advert] = {}
    with sock:
        try:
            index = socket.if_nametoindex(interface)
        except OSError:
            return _quiet(interface, OSError(errno.ENODEV, "no such interface"))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, _only(ICMP6_RA))
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ND_HOP_LIMIT)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            sock.sendto(router_solicitation(), (ALL_ROUTERS, 0, 0, index))
        except OSError as exc:
            return _quiet(interface, exc)
        deadline = started + listen_for
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            try:
                packet, ancillary, _, address = sock.recvmsg(65535, socket.CMSG_SPACE(4))
            except OSError:
                continue
            advert = parse_ra(packet, address[0], _hop_limit(ancillary))
            if advert is None:
                continue
            if not adverts:
                deadline = min(deadline, time.monotonic() + settle)
            adverts[advert.router] = merge(adverts.get(advert.router), advert)
    return Survey(interface, tuple(adverts.values()), round(time.monotonic() - started, 2))


# ---- what the survey means for the appliance -----------------------------------------------


@dataclass(frozen=True)
class Competitor:
    """A DNS server handed out on the LAN that is not the appliance."""

    router: str  # the advertising router, or the DHCPv6 server
    address: str
    via: str  # "RDNSS" or "DHCPv6"


def competing(survey: Survey, own: frozenset[str] = frozenset()) -> list[Competitor]:
    """Every DNS server advertised (RDNSS, with a lifetime) or handed out by DHCPv6, other
    than the appliance's own addresses (`own`, IPv6 addresses in any notation)."""
    mine = {ipaddress.IPv6Address(a) for a in own if ":" in a}
    found = [Competitor(a.router, d.address, "RDNSS")
             for a in survey.adverts for d in a.dns if d.lifetime]  # fmt: skip
    found += [Competitor(a.server, d, "DHCPv6") for a in survey.dhcpv6 for d in a.dns]
    seen: list[Competitor] = []
    for c in found:
        if ipaddress.IPv6Address(c.address) not in mine and c not in seen:
            seen.append(c)
    return seen


def dhcpv6_routers(survey: Survey) -> list[Advert]:
    """The routers that invite DHCPv6 while what DHCPv6 hands out went unseen (nobody
    answered, or we could not ask)."""
    return [] if survey.dhcpv6 else [a for a in survey.adverts if a.dhcpv6]


def _own_text(own: frozenset[str]) -> str:
    return " or ".join(sorted(a for a in own if ":" in a))


def warnings(survey: Survey, own: frozenset[str] = frozenset()) -> list[str]:
    """What `up` warns of: each competing server with its router or DHCPv6 server, each
    router inviting DHCPv6 whose answer went unseen; nothing when there is nothing to change
    (or nothing could be heard)."""
    mine = _own_text(own)
    instead = (f"or hand out the appliance's IPv6 address {mine} instead" if mine
               else "so that only the appliance remains")  # fmt: skip
    unseen = f"unseen here ({survey.dhcpv6_note})" if survey.dhcpv6_note else "unseen here"
    lines = []
    for c in competing(survey, own):
        who = (f"your router {c.router} advertises {c.address} as IPv6 DNS server (RDNSS)"
               if c.via == "RDNSS" else
               f"the DHCPv6 server {c.router} hands out {c.address} as IPv6 DNS server")
        lines.append(f"{who} on {survey.interface}: dual-stack clients will ask it and bypass "
                     f"the appliance; turn off its RDNSS / DHCPv6 DNS, {instead}: see "
                     "`netsetup routes`")  # fmt: skip
    for advert in dhcpv6_routers(survey):
        lines.append(
            f"your router {advert.router} sets the {advert.flags} flag on {survey.interface}: "
            f"clients also ask DHCPv6 for DNS servers, {unseen}; "
            "make it hand out no DNS server but the appliance's: see `netsetup routes`"
        )
    return lines


def summary(survey: Survey, own: frozenset[str] = frozenset()) -> str:
    """One line for `status` and `check`."""
    if survey.note:
        return survey.note
    if not survey.adverts:
        return f"no router advertisement within {LISTEN:g} s on {survey.interface}"
    parts = []
    for c in competing(survey, own):
        source = f"RDNSS of {c.router}" if c.via == "RDNSS" else f"DHCPv6 from {c.router}"
        parts.append(f"COMPETING: {c.address} ({source})")
    for advert in dhcpv6_routers(survey):
        why = f": {survey.dhcpv6_note}" if survey.dhcpv6_note else ""
        parts.append(f"{advert.router} invites DHCPv6 ({advert.flags} flag), unseen{why}")
    if not parts:
        routers = ", ".join(a.router for a in survey.adverts)
        return f"no other DNS server handed out (router {routers})"
    return "; ".join(parts) + ": see `netsetup routes`"


class Background:
    """A survey run in a thread while `up` waits for the services, so that it costs `up` no
    time of its own; `result()` waits for it (at most LISTEN seconds in all)."""

    def __init__(self, interface: str) -> None:
        import threading  # noqa: PLC0415 - only `up` runs a survey beside other work

        self._survey: Survey | None = None
        self._interface = interface
        self._thread = threading.Thread(target=self._run, name="ra-survey", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._survey = listen(self._interface)
        except Exception as exc:  # a survey never fails `up`
            self._survey = Survey(self._interface, note=f"no IPv6 router seen: {exc}")

    def result(self) -> Survey:
        self._thread.join(LISTEN + dhcpv6.WAIT + 1)
        return self._survey or Survey(self._interface, note="no IPv6 router seen: no answer")
