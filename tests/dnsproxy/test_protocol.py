"""Protocol correctness against exact upstream bytes (issue 10).

Each upstream reply here is written byte by byte (`Behaviour.craft`), so a test can send what no
well-behaved server would, or header flags dnslib would set its own way: an authoritative
upstream's AA without RA, a CD bit dropped, an OPT record in the answer section. Client queries
are written the same way, for flags, opcodes and EDNS versions dnslib's helpers do not offer.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from dnsproxy import wire

from .fakes import GENUINE, addresses, send_raw

# The compiled UDP hit path and the Python one: the same behaviour (conftest.py).
pytestmark = pytest.mark.both_paths

PTR = b"\xc0\x0c"  # the question's name
OPCODE_STATUS = 2 << 11
OPCODE_15 = 15 << 11
Z_FLAG = 0x0040  # reserved: zero in every reply


def name(text: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in text.split(".")) + b"\0"


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack(">HHIH", rtype, 1, ttl, len(rdata)) + rdata


def opt(*, udp_size: int = 1232, ext_rcode: int = 0, version: int = 0, do: bool = False) -> bytes:
    ttl = ext_rcode << 24 | version << 16 | (wire.DO_BIT if do else 0)
    return b"\0" + struct.pack(">HHIH", QTYPE.OPT, udp_size, ttl, 0)


def a_record(ttl: int = 300) -> bytes:
    return rr(PTR, QTYPE.A, ttl, socket.inet_aton(GENUINE))


def soa(owner: str, ttl: int, minimum: int) -> bytes:
    rdata = name("ns." + owner) + name("admin." + owner) + struct.pack(">5I", 1, 3600, 600,
                                                                       86400, minimum)
    return rr(name(owner), QTYPE.SOA, ttl, rdata)


ECHOED_OPT = opt()


def crafted(flags: int = wire.QR | wire.RD | wire.RA, an=(), ns=(), ar=(ECHOED_OPT,)):
    """An upstream reply to whatever was asked: its ID and question, then these exact bytes."""
    def make(query: bytes) -> bytes:
        q = wire.parse_query(query)
        head = struct.pack(">HHHHHH", q.id, flags, 1, len(an), len(ns), len(ar))
        return head + q.question + b"".join(an) + b"".join(ns) + b"".join(ar)
    return make


def client_query(qname: str, qtype: int = QTYPE.A, *, flags: int = wire.RD, edns: bool = True,
                 do: bool = False, version: int = 0, udp_size: int = 1232,
                 qid: int = 0x4D2) -> bytes:
    head = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0)
    query = head + name(qname) + struct.pack(">HH", qtype, 1)
    return query + (opt(udp_size=udp_size, version=version, do=do) if edns else b"")


def header_flags(reply: bytes) -> int:
    return struct.unpack_from(">H", reply, 2)[0]


def the_opt(reply: bytes):
    (record,) = [r for r in DNSRecord.parse(reply).ar if r.rtype == QTYPE.OPT]
    return record


# --- item 1: an OPT record outside the additional section is malformed ---


def test_opt_in_the_answer_section_is_dropped_never_cached_nor_learned(upstream, make_proxy):
    """Before: the OPT was cut out, the A record after it moved into the answer section, the
    client got it and it was cached; and the reply taught the upstream speaks EDNS."""
    upstream.rule("opt-first.example", craft=crafted(an=(opt(),), ar=(a_record(),)))
    proxy = make_proxy("--upstream", upstream.address, "--timeout", "0.6")
    for _ in range(2):
        reply = DNSRecord.parse(send_raw(proxy.port, client_query("opt-first.example")))
        assert reply.header.rcode == RCODE.SERVFAIL and reply.rr == []
    assert upstream.count("opt-first.example", "udp") == 2  # nothing was cached
    assert proxy.metrics.get("dnsproxy_forgeries_total", upstream=upstream.address,
                             reason="malformed") == 2
    (udp_upstream,) = proxy.service.forwarding.forwarder.upstreams
    assert udp_upstream.edns.speaks_edns is None


def test_lone_opt_in_the_answer_section_costs_no_traceback(upstream, make_proxy, caplog):
    """ARCOUNT 0 and the OPT in the answer: stripping it raised struct.error."""
    upstream.rule("opt-only.example", craft=crafted(an=(opt(),), ar=()))
    proxy = make_proxy("--upstream", upstream.address, "--timeout", "0.6")
    reply = DNSRecord.parse(send_raw(proxy.port, client_query("opt-only.example")))
    assert reply.header.rcode == RCODE.SERVFAIL
    proxy.sync()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# --- item 6: a CNAME in front of a negative answer bounds its cache time ---


@pytest.mark.parametrize(("rcode", "cname_ttl", "soa_ttl", "minimum"), [
    (RCODE.NXDOMAIN, 1, 300, 300),  # the CNAME expires first
    (RCODE.NOERROR, 300, 300, 1),  # NODATA: the SOA's MINIMUM, not its TTL, bounds it
])
def test_negative_answer_behind_a_cname_is_kept_no_longer_than_either(
        upstream, make_proxy, rcode, cname_ttl, soa_ttl, minimum):
    upstream.rule("alias.example", craft=crafted(
        flags=wire.QR | wire.RD | wire.RA | rcode,
        an=(rr(PTR, QTYPE.CNAME, cname_ttl, name("gone.example")),),
        ns=(soa("example", soa_ttl, minimum),)))
    proxy = make_proxy("--upstream", upstream.address, "--no-serve-stale")
    first = DNSRecord.parse(send_raw(proxy.port, client_query("alias.example")))
    assert first.header.rcode == rcode and len(first.rr) == 1
    send_raw(proxy.port, client_query("alias.example"))
    assert upstream.count("alias.example") == 1  # cached
    time.sleep(1.2)
    send_raw(proxy.port, client_query("alias.example"))
    assert upstream.count("alias.example") == 2  # expired after a second, not five minutes


# --- item 8: BADVERS, extended rcodes through truncation, --max-ttl ---


@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize("do", [False, True])
def test_edns_version_1_gets_badvers_with_an_opt_of_version_0(upstream, make_proxy, tcp, do):
    proxy = make_proxy("--upstream", upstream.address)
    raw = send_raw(proxy.port, client_query("example.test", QTYPE.SOA, version=1, do=do),
                   tcp=tcp)
    reply = DNSRecord.parse(raw)
    record = the_opt(raw)
    assert (reply.header.rcode, record.ttl >> 24) == (0, 1)  # 16 = 1 << 4 | 0
    assert (record.ttl >> 16) & 0xFF == 0, "the OPT must say version 0"
    assert bool(record.ttl & wire.DO_BIT) is do
    assert reply.rr == [] and reply.auth == []
    assert header_flags(raw) & wire.RA
    assert upstream.count() == 0
    assert proxy.log_lines()[-1]["rcode"] == "BADVERS"


def test_truncated_reply_keeps_the_extended_rcode(upstream, make_proxy):
    padding = tuple(rr(PTR, QTYPE.TXT, 60, b"\x40" + b"x" * 64) for _ in range(12))
    upstream.rule("big.example", craft=crafted(flags=wire.QR | wire.RD | wire.RA | 7,
                                               an=padding, ar=(opt(ext_rcode=1),)))
    proxy = make_proxy("--upstream", upstream.address)
    raw = send_raw(proxy.port, client_query("big.example", QTYPE.TXT, udp_size=512))
    assert len(raw) <= 512 and header_flags(raw) & wire.TC
    assert header_flags(raw) & wire.RCODE_MASK == 7
    assert the_opt(raw).ttl >> 24 == 1  # 23 (BADCOOKIE) = 1 << 4 | 7


def test_max_ttl_caps_the_ttls_clients_see(upstream, make_proxy):
    upstream.rule("week.example", ttl=604800)
    upstream.rule("nowhere.example", rcode=RCODE.NXDOMAIN, ttl=604800, soa_minimum=604800)
    proxy = make_proxy("--upstream", upstream.address, "--max-ttl", "60")
    for label in ("forwarded", "cached"):
        reply = DNSRecord.parse(send_raw(proxy.port, client_query("week.example")))
        assert addresses(reply) == [GENUINE]
        assert 0 < reply.rr[0].ttl <= 60, label
        negative = DNSRecord.parse(send_raw(proxy.port, client_query("nowhere.example")))
        assert negative.header.rcode == RCODE.NXDOMAIN
        assert 0 < negative.auth[0].ttl <= 60, label
    assert upstream.count("week.example") == 1 and upstream.count("nowhere.example") == 1


# --- items 16 and 19: header flags are ours, whatever the upstream's ---


AUTHORITATIVE = wire.QR | wire.AA  # an authoritative server: AA set, RA and RD clear


@pytest.mark.parametrize("rd", [True, False])
def test_aa_clear_ra_set_rd_copied_forwarded_and_cached(upstream, make_proxy, rd):
    upstream.rule("auth.example", craft=crafted(flags=AUTHORITATIVE, an=(a_record(),)))
    proxy = make_proxy("--upstream", upstream.address)
    for label in ("forwarded", "cached"):
        raw = send_raw(proxy.port, client_query("auth.example", flags=wire.RD if rd else 0,
                                                edns=False))
        flags = header_flags(raw)
        assert addresses(DNSRecord.parse(raw)) == [GENUINE], label
        assert not flags & wire.AA, f"{label}: AA relayed"
        assert flags & wire.RA, f"{label}: RA missing"
        assert bool(flags & wire.RD) is rd, label
    assert upstream.count("auth.example") == 1


def test_cd_is_copied_from_the_query_when_the_upstream_drops_it(upstream, make_proxy):
    upstream.rule("signed.example", craft=crafted(flags=wire.QR | wire.RD | wire.RA,
                                                  an=(a_record(),), ar=(opt(do=True),)))
    proxy = make_proxy("--upstream", upstream.address)
    for label in ("forwarded", "cached"):
        raw = send_raw(proxy.port, client_query("signed.example", flags=wire.RD | wire.CD,
                                                do=True))
        assert header_flags(raw) & wire.CD, f"{label}: CD not echoed"
        assert the_opt(raw).ttl & wire.DO_BIT
    assert upstream.seen[0].do and upstream.count("signed.example") == 1
    # ... and a client without CD does not get the upstream's CD either.
    upstream.rule("cd-set.example", craft=crafted(flags=wire.QR | wire.RA | wire.CD,
                                                  an=(a_record(),)))
    raw = send_raw(proxy.port, client_query("cd-set.example"))
    assert not header_flags(raw) & wire.CD


# --- item 18: opcodes other than QUERY ---


ALL_FLAGS = wire.TC | wire.RD | wire.RA | Z_FLAG | wire.AD | wire.CD | wire.AA


@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize(("query", "opt_do"), [
    (struct.pack(">HHHHHH", 77, OPCODE_15 | wire.RD, 0, 0, 0, 0), None),  # dig +opcode=15
    (struct.pack(">HHHHHH", 77, OPCODE_15 | ALL_FLAGS, 0, 0, 0, 0), None),  # and every flag
    (struct.pack(">HHHHHH", 77, OPCODE_15 | wire.RD, 0, 0, 0, 1) + opt(do=True), True),
    (client_query("x.example", flags=OPCODE_STATUS | wire.RD, qid=77), False),  # a question
    (client_query("x.example", flags=OPCODE_STATUS | wire.RD, edns=False, qid=77), None),
], ids=["opcode15", "opcode15-all-flags", "opcode15-opt", "status-question-opt",
        "status-question"])
def test_other_opcodes_get_notimp_without_ra(upstream, make_proxy, query, opt_do, tcp):
    """Opcode 15 has no question: it got FORMERR, with RA, where NOTIMP was due."""
    proxy = make_proxy("--upstream", upstream.address)
    raw = send_raw(proxy.port, query, tcp=tcp)
    flags = header_flags(raw)
    assert struct.unpack_from(">H", raw)[0] == 77
    assert flags & wire.QR
    assert flags & wire.OPCODE_MASK == query[2] << 8 & wire.OPCODE_MASK  # the opcode echoed
    assert flags & wire.RCODE_MASK == wire.NOTIMP
    assert not flags & ALL_FLAGS, f"flags {flags:#06x}: only QUERY defines them"
    found = [r.ttl for r in DNSRecord.parse(raw).ar if r.rtype == QTYPE.OPT]
    assert found == ([] if opt_do is None else [wire.DO_BIT if opt_do else 0])
    assert upstream.count() == 0
