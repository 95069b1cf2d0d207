"""Names that belong to the home, or to no one: which of them never leave, and where the rest go.

One table maps name suffixes (lower-cased wire form, as the question key holds them) to a rule:
answer here (NXDOMAIN, NODATA, localhost's addresses) or ask one group of resolvers (the LAN's
own, --local-dns, or a --zone's). A name's rule is that of its most specific suffix in the table;
at the same suffix a --zone beats a home name (--local-domain, --local-reverse), which beats a
built-in special-use name. The special-names stage answers the "here" rules before the cache,
the zone router sends the others; both read the same table, so they cannot disagree.

Built in, each from its RFC: `localhost` (RFC 6761: the loopback addresses), `invalid` (RFC
6761) and `local` (multicast DNS's, RFC 6762) NXDOMAIN, the reverse zones of private and special
ranges (RFC 6303 and the IANA registry of locally-served zones) NXDOMAIN, and the bypass guards:
`resolver.arpa` NODATA (RFC 9462: DDR clients then keep asking us), Firefox's canary
`use-application-dns.net` NXDOMAIN, iCloud Private Relay's names NXDOMAIN (opt-in).

The check every query pays is one `endswith` over a tuple of suffix tails and a length test for
single-label names: no decoding, no walk unless a tail matches.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from . import wire
from .domainlists import to_wire
from .upstreamspec import UpstreamSpec, parse_spec

# What a rule does.
ROUTE = "route"  # ask the rule's group
NXDOMAIN = "nxdomain"
NODATA = "nodata"
LOCALHOST = "localhost"  # A 127.0.0.1, AAAA ::1, NODATA for other types

LOCAL_GROUP = "local"  # the group of --local-dns, as the query log and metrics name it

TYPE_NS, TYPE_PTR, TYPE_DS, TYPE_RRSIG, TYPE_NSEC, TYPE_DNSKEY = 2, 12, 43, 46, 47, 48
TYPE_NSEC3, TYPE_NSEC3PARAM, TYPE_CDS, TYPE_CDNSKEY = 50, 51, 59, 60
# A single-label name asked with these types is a top-level domain's delegation or its DNSSEC
# chain (a validating stub asks `com. DS`): not a home name, so it goes where it always went.
DELEGATION_TYPES = frozenset({TYPE_NS, wire.TYPE_SOA, TYPE_DS, TYPE_RRSIG, TYPE_NSEC,
                              TYPE_DNSKEY, TYPE_NSEC3, TYPE_NSEC3PARAM, TYPE_CDS, TYPE_CDNSKEY})

# Private and special-purpose ranges whose reverse zones are served locally (RFC 6303, RFC 7793
# for 100.64/10, the IANA registry of locally-served zones; fc00::/7 whole, as unique local).
SPECIAL_NETWORKS = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "0.0.0.0/8",
    "127.0.0.0/8", "169.254.0.0/16", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",
    "255.255.255.255/32", "::/128", "::1/128", "fc00::/7", "fe80::/10", "2001:db8::/32",
)
PRIVATE_RELAY_NAMES = ("mask.icloud.com", "mask-h2.icloud.com")  # Apple's names to block it
DOH_CANARY = "use-application-dns.net"
DDR_ZONE = "resolver.arpa"

# At the same suffix, the higher rank wins: what the user named beats what is built in.
BUILT_IN, HOME, ZONE = 0, 1, 2

NEGATIVE_TTL = 300  # seconds: short, so a router added later is asked soon
LOCALHOST_TTL = 300
ARPA = b"\x04arpa\x00"


@dataclass(frozen=True, slots=True)
class Rule:
    action: str  # ROUTE, NXDOMAIN, NODATA, LOCALHOST
    why: str  # for the query log and metrics: local-domain, rfc6303, ddr, zone, ...
    group: str | None = None  # ROUTE: the group asked
    rank: int = BUILT_IN
    # Whether the rule is about a zone, whose top exists (NODATA there), rather than a name to
    # deny outright with everything below it (the canary, Private Relay's names).
    zone: bool = True


class NameTable:
    """Suffix -> rule, plus the rule for single-label names; immutable once built."""

    def __init__(self, rules: dict[bytes, Rule], single_label: Rule | None) -> None:
        self.rules = rules
        self.single_label = single_label
        # What a name must end with to have any rule: the suffixes themselves, those under
        # arpa (hundreds of reverse zones) folded into one. Byte-wise, not label-aligned: a
        # hit only means "walk the labels", which settles it.
        self.tails = tuple(sorted({ARPA if suffix.endswith(ARPA) else suffix
                                   for suffix in rules}))

    def match(self, name: bytes, qtype: int) -> tuple[Rule, int] | None:
        """The rule for `name` (a lower-cased wire name) and the offset in it of the zone the
        rule is about (its apex: where the negative answer's SOA is owned), or None."""
        if name.endswith(self.tails):
            rules = self.rules
            off = 0
            end = len(name)
            while off < end:  # longest suffix first: the first hit is the most specific
                rule = rules.get(name[off:] if off else name)
                if rule is not None:
                    return rule, off
                length = name[off]
                if not length:
                    break
                off += 1 + length
        if (self.single_label is not None and name[0] + 2 == len(name)
                and qtype not in DELEGATION_TYPES):
            return self.single_label, len(name) - 1  # the zone is the root
        return None

    def routes_key(self, key: bytes) -> bool:
        """Whether the table sends a question to a group, given as a cache key (the question
        key, then one byte for DO and CD): what a change of routing may have cached from
        elsewhere. Names it answers itself need no forgetting: the special-names stage answers
        them before the cache is asked, so a cached answer for them is never served. The
        special-names stage's quick test first: a scan asks this of every cached key."""
        end = len(key) - 5  # the name's end: type, class and the DO/CD byte follow
        if not key.endswith(self.tails, 0, end) and not (self.single_label is not None
                                                          and key[0] + 2 == end):
            return False
        hit = self.match(key[:end], int.from_bytes(key[end:end + 2], "big"))
        return hit is not None and hit[0].action == ROUTE

    def routes(self) -> bool:
        """Whether any name is sent to a group (else the zone router has nothing to do)."""
        return (any(rule.action == ROUTE for rule in self.rules.values())
                or (self.single_label is not None and self.single_label.action == ROUTE))


def reverse_zones(cidr: str) -> list[bytes]:
    """The reverse zones (wire names) that hold the PTR names of a network: one when its prefix
    ends on an octet (IPv4) or nibble (IPv6) boundary, else every zone at the next boundary
    (192.168.0.0/23: 0.168.192.in-addr.arpa and 1.168.192.in-addr.arpa). Host bits are
    ignored. ValueError for what is no network, or one covering every address."""
    try:
        network = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{cidr!r} is not a network") from None
    if network.prefixlen == 0:
        raise ValueError(f"{cidr!r} covers every address")
    step, units = (8, 4) if network.version == 4 else (4, 32)
    boundary = -(-network.prefixlen // step) * step
    kept = boundary // step  # the octets or nibbles the zone names
    zones = []
    for subnet in network.subnets(new_prefix=boundary):
        labels = subnet.network_address.reverse_pointer.split(".")
        zones.append(to_wire(".".join(labels[units - kept:])))
    return zones


def parse_zone(text: str) -> tuple[bytes, str, UpstreamSpec]:
    """`NAME=SPEC` -> (the name in wire form, as text with its final dot, the upstream).
    ValueError saying why for anything else."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip() or not spec.strip():
        raise ValueError(f"expected NAME=SPEC, got {text!r}")
    wire_name = to_wire(name)
    return wire_name, wire.name_to_text(wire_name, 0), parse_spec(spec)


class HomeSettings(Protocol):
    """What of the settings this module reads (config.Settings has all of it)."""

    local_dns: list[UpstreamSpec]
    local_domains: list[str]
    local_reverse: list[str]
    zones: list[str]
    block_ddr: bool
    block_doh_canary: bool
    block_private_relay: bool


def zone_groups(settings: HomeSettings) -> dict[str, list[UpstreamSpec]]:
    """Every --zone's upstreams by zone (as text): `a=X` and `a=Y` make one group of two."""
    groups: dict[str, list[UpstreamSpec]] = {}
    for text in settings.zones:
        _, name, spec = parse_zone(text)
        groups.setdefault(name, []).append(spec)
    return groups


def build_table(settings: HomeSettings) -> NameTable:
    """The table for these settings; ValueError (naming the setting) for a bad name, network
    or zone."""
    rules: dict[bytes, Rule] = {}

    def put(names: Iterable[bytes], rule: Rule) -> None:
        for name in names:
            held = rules.get(name)
            if held is None or rule.rank >= held.rank:
                rules[name] = rule

    put([to_wire("localhost")], Rule(LOCALHOST, "localhost"))
    put([to_wire("invalid")], Rule(NXDOMAIN, "invalid"))
    put([to_wire("local")], Rule(NXDOMAIN, "mdns"))
    put([zone for cidr in SPECIAL_NETWORKS for zone in reverse_zones(cidr)],
        Rule(NXDOMAIN, "rfc6303"))
    if settings.block_ddr:
        put([to_wire(DDR_ZONE)], Rule(NODATA, "ddr"))
    if settings.block_doh_canary:
        put([to_wire(DOH_CANARY)], Rule(NXDOMAIN, "canary", zone=False))
    if settings.block_private_relay:
        put([to_wire(name) for name in PRIVATE_RELAY_NAMES],
            Rule(NXDOMAIN, "private-relay", zone=False))

    def home(why: str) -> Rule:  # the LAN's resolver's, or nobody's
        if settings.local_dns:
            return Rule(ROUTE, why, LOCAL_GROUP, HOME)
        return Rule(NXDOMAIN, why, rank=HOME)

    domains = []
    for name in settings.local_domains:
        try:
            domains.append(to_wire(name))
        except ValueError as exc:
            raise ValueError(f"local_domains: {exc}") from None
    put(domains, home("local-domain"))
    for cidr in settings.local_reverse:
        try:
            put(reverse_zones(cidr), home("local-reverse"))
        except ValueError as exc:
            raise ValueError(f"local_reverse: {exc}") from None
    for text in settings.zones:
        try:
            wire_name, name, _ = parse_zone(text)
        except ValueError as exc:
            raise ValueError(f"zones: {exc}") from None
        put([wire_name], Rule(ROUTE, "zone", name, ZONE))
    return NameTable(rules, home("single-label"))


# --- the answers given here ---

U16 = struct.Struct(">H")
SOA_FIXED = struct.Struct(">IIIII")  # serial, refresh, retry, expire, minimum
NOBODY = b"\x06nobody\x07invalid\x00"  # the SOA's mailbox, as RFC 6303 writes it
LOOPBACK = {wire.TYPE_A: bytes([127, 0, 0, 1]), wire.TYPE_AAAA: bytes(15) + b"\x01"}


def soa_record(query: wire.Query, apex: int, ttl: int) -> bytes:
    """The SOA of the zone at offset `apex` of the question's name, compressed against it (RFC
    6303 section 3's values), whose TTL and MINIMUM make the negative-caching time (RFC 2308)."""
    at_root = query.question[apex] == 0
    owner = b"\x00" if at_root else U16.pack(0xC000 | (12 + apex))
    rdata = owner + NOBODY + SOA_FIXED.pack(1, 3600, 1200, 604800, ttl)
    return owner + wire.RR_FIXED.pack(wire.TYPE_SOA, wire.CLASS_IN, ttl, len(rdata)) + rdata


def local_reply(query: wire.Query, rcode: int, answers: bytes = b"", ancount: int = 0,
                authority: bytes = b"") -> bytes:
    """A reply written here, as the forwarder's others are: RA set, AA clear, RD and CD the
    client's, our OPT record if the client sent one."""
    flags = wire.QR | wire.RA | (query.flags & (wire.RD | wire.CD)) | rcode
    out = wire.HEADER.pack(query.id, flags, 1, ancount, 1 if authority else 0,
                           1 if query.edns else 0)
    out += query.question + answers + authority
    if query.edns:
        out += wire.OUR_OPT[query.do]
    return out


def rule_reply(query: wire.Query, rule: Rule, apex: int) -> tuple[bytes, int]:
    """The reply and its rcode for a rule answered here (not ROUTE). The top of a zone exists
    (RFC 6303 section 3): it gets NODATA, not NXDOMAIN, which would tell a resolver that
    nothing lies below it (RFC 8020), the LAN's reverse zone or the hosts file's names included."""
    if rule.action == NXDOMAIN and (apex != 0 or not rule.zone):
        return local_reply(query, wire.NXDOMAIN,
                           authority=soa_record(query, apex, NEGATIVE_TTL)), wire.NXDOMAIN
    if rule.action == LOCALHOST and query.qclass == wire.CLASS_IN:
        address = LOOPBACK.get(query.qtype)
        if address is not None:
            record = wire.resource_record(query.qtype, wire.CLASS_IN, LOCALHOST_TTL, address)
            return local_reply(query, wire.NOERROR, record, 1), wire.NOERROR
    # NODATA: the name is there, without records of this type.
    return local_reply(query, wire.NOERROR,
                       authority=soa_record(query, apex, NEGATIVE_TTL)), wire.NOERROR
