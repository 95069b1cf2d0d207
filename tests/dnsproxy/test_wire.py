"""dnsproxy.wire, the byte-level hot path, checked against dnslib's full parse.

The last tests hold issue 5's property: a cache hit gives the same bytes as the forwarded reply
for the same query, but for the ID (and the question's case, which is the client's own).
"""

from __future__ import annotations

import struct

import pytest
from dnslib import (
    AAAA,
    CNAME,
    EDNS0,
    MX,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TXT,
    A,
    DNSHeader,
    DNSQuestion,
    DNSRecord,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnsproxy import wire
from dnsproxy.metrics import Metrics
from dnsproxy.pipeline import Request, Response
from dnsproxy.stages.cache import Cache

from .fakes import GENUINE, ask, send_raw


def query_bytes(name: str = "www.Example.com", qtype: str = "A", *, edns: bool = True,
                do: bool = False, bufsize: int = 4096, qid: int = 4242, qclass: str = "IN",
                rd: bool = True) -> bytes:
    q = DNSRecord(DNSHeader(id=qid, rd=int(rd)), q=DNSQuestion(name, getattr(QTYPE, qtype),
                                                                 {"IN": 1, "CH": 3}[qclass]))
    if edns:
        q.add_ar(EDNS0(udp_len=bufsize, flags="do" if do else ""))
    return bytes(q.pack())


def records(data: bytes) -> list[tuple]:
    """Every non-OPT record of a message, as comparable tuples (name lower-cased)."""
    msg = DNSRecord.parse(data)
    out = []
    for section, rrs in (("an", msg.rr), ("ns", msg.auth), ("ar", msg.ar)):
        for rr in rrs:
            if rr.rtype == QTYPE.OPT:
                continue
            out.append((section, str(rr.rname).lower(), rr.rtype, rr.rclass, rr.ttl,
                        str(rr.rdata)))
    return out


def opts(data: bytes) -> list:
    return [rr for rr in DNSRecord.parse(data).ar if rr.rtype == QTYPE.OPT]


def upstream_reply(query: bytes, *, answers=(("A", GENUINE, 300),), auth=(), extra=(),
                   rcode: int = 0, edns: bool = True, ext_rcode: int = 0,
                   tc: bool = False) -> bytes:
    """What an upstream would answer to `query` (dnslib compresses names, as servers do)."""
    q = DNSRecord.parse(query)
    reply = q.reply()
    reply.header.rcode = rcode
    reply.header.tc = int(tc)
    for section, items in ((reply.add_answer, answers), (reply.add_auth, auth),
                           (reply.add_ar, extra)):
        for item in items:
            section(make_rr(q.q.qname, *item))
    if edns:
        reply.add_ar(EDNS0(udp_len=1232, ext_rcode=ext_rcode))
    return bytes(reply.pack())


def make_rr(owner, rtype: str, value, ttl: int) -> RR:
    rdata = {"A": A, "AAAA": AAAA, "CNAME": CNAME, "TXT": TXT}.get(rtype)
    if rtype == "SOA":
        ttl_soa, minimum = ttl, value
        return RR(owner, QTYPE.SOA, ttl=ttl_soa,
                  rdata=SOA("ns.example.", "admin.example.", (1, 3600, 600, 86400, minimum)))
    if rtype == "MX":
        return RR(owner, QTYPE.MX, ttl=ttl, rdata=MX(value))
    return RR(owner, getattr(QTYPE, rtype), ttl=ttl, rdata=rdata(value))


# --- parse_query ---


@pytest.mark.parametrize(("bufsize", "expected"), [(4096, 4096), (1232, 1232), (100, 512)])
def test_parse_query_reads_edns_size(bufsize, expected):
    q = wire.parse_query(query_bytes(bufsize=bufsize))
    assert q.edns and q.udp_size == expected


def test_parse_query_without_edns_allows_512():
    q = wire.parse_query(query_bytes(edns=False))
    assert (q.edns, q.do, q.udp_size) == (False, False, 512)


@pytest.mark.parametrize("do", [True, False])
def test_parse_query_reads_do_bit(do):
    assert wire.parse_query(query_bytes(do=do)).do is do


def test_parse_query_keeps_question_case_and_lowers_key():
    data = query_bytes("WwW.ExAmPle.COM", "AAAA", qid=777)
    q = wire.parse_query(data)
    assert q.id == 777
    assert q.question == data[12:12 + len(q.question)]
    assert b"WwW" in q.question and b"ExAmPle" in q.question
    assert q.key == q.question.lower()
    assert q.key == wire.parse_query(query_bytes("www.example.com", "AAAA")).key
    assert (q.qtype, q.qclass) == (QTYPE.AAAA, 1)
    assert q.name == "WwW.ExAmPle.COM."
    assert q.flags & wire.RD


def test_parse_query_key_differs_by_type_and_class():
    a = wire.parse_query(query_bytes("x.example", "A")).key
    aaaa = wire.parse_query(query_bytes("x.example", "AAAA")).key
    chaos = wire.parse_query(query_bytes("x.example", "A", qclass="CH")).key
    assert len({a, aaaa, chaos}) == 3


def test_a_repeated_query_is_read_the_same_under_its_own_id():
    """Repeated queries are parsed once (the bytes after the ID are remembered): the second
    copy must still carry its own ID, and a query differing anywhere else is parsed anew."""
    first = wire.parse_query(bytes(query_bytes("memo.example", qid=1)))
    again = wire.parse_query(bytes(query_bytes("memo.example", qid=2)))
    assert (first.id, again.id) == (1, 2)
    assert again == wire.Query(2, *[getattr(first, f) for f in (
        "flags", "question", "key", "qtype", "qclass", "edns", "do", "udp_size",
        "edns_version")])
    with_do = wire.parse_query(bytes(query_bytes("memo.example", qid=3, do=True)))
    no_edns = wire.parse_query(bytes(query_bytes("memo.example", qid=4, edns=False)))
    upper = wire.parse_query(bytes(query_bytes("MEMO.example", qid=5)))
    assert (with_do.do, no_edns.edns, upper.question[:5]) == (True, False, b"\x04MEMO")


def test_remembered_queries_stay_bounded():
    for i in range(wire.PARSED_MAX + 10):
        wire.parse_query(bytes(query_bytes(f"n{i}.bounded.example")))
    assert 0 < len(wire._parsed) <= wire.PARSED_MAX
    large = bytes(query_bytes("x" * 60 + "." + "y" * 60 + ".example"))
    assert len(large) > wire.PARSED_MAX_BYTES
    wire.parse_query(large)
    assert large[2:] not in wire._parsed


def _with_header(data: bytes, **fields) -> bytes:
    qid, flags, qd, an, ns, ar = struct.unpack_from(">HHHHHH", data)
    values = {"id": qid, "flags": flags, "qd": qd, "an": an, "ns": ns, "ar": ar, **fields}
    return struct.pack(">HHHHHH", *values.values()) + data[12:]


def _long_name_query(total_labels_bytes: int) -> bytes:
    """A query whose name has label bytes (length octets included) of the given total."""
    labels = b""
    while len(labels) + 64 <= total_labels_bytes:
        labels += b"\x3f" + b"a" * 63
    rest = total_labels_bytes - len(labels)
    if rest:
        labels += bytes([rest - 1]) + b"b" * (rest - 1)
    return struct.pack(">HHHHHH", 1, wire.RD, 1, 0, 0, 0) + labels + b"\x00" + b"\x00\x01\x00\x01"


@pytest.mark.parametrize(("data", "why"), [
    (b"", "empty"),
    (query_bytes()[:11], "shorter than a header"),
    (_with_header(query_bytes(), flags=wire.QR | wire.RD), "QR set"),
    (_with_header(query_bytes(), qd=0), "no question"),
    (_with_header(query_bytes(), qd=2), "two questions"),
    (struct.pack(">HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x03www\xc0\x0c\x00\x01\x00\x01",
     "compression in the question"),
    (struct.pack(">HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x07example\x03co", "label past the end"),
    (struct.pack(">HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x07example\x00\x00\x01", "no class"),
    (_long_name_query(255), "name of 256 bytes"),
    (query_bytes()[:-3], "OPT record cut short"),
])
def test_parse_query_rejects(data, why):
    with pytest.raises(wire.WireError):
        wire.parse_query(data)


def test_parse_query_accepts_name_of_exactly_255_bytes():
    q = wire.parse_query(_long_name_query(254))
    assert len(q.question) == 255 + 4


# --- parse_reply ---


def test_parse_reply_ttl_offsets_point_at_every_ttl():
    query = query_bytes("a.example")
    data = upstream_reply(query, answers=(("CNAME", "b.example.", 100), ("A", GENUINE, 200)),
                          auth=(("SOA", 60, 300),), extra=(("AAAA", "2001:db8::1", 400),))
    reply = wire.parse_reply(data)
    assert [ttl for _, ttl in reply.ttls] == [100, 200, 300, 400]
    for offset, ttl in reply.ttls:
        assert struct.unpack_from(">I", data, offset)[0] == ttl
    assert reply.counts == (1, 2, 1, 2)


def test_parse_reply_finds_the_opt_record():
    data = upstream_reply(query_bytes(), ext_rcode=1)
    reply = wire.parse_reply(data)
    start, end = reply.opt
    assert end == len(data)  # dnslib puts it last
    assert data[start] == 0 and struct.unpack_from(">H", data, start + 1)[0] == QTYPE.OPT
    assert reply.ext_rcode == 1
    assert wire.parse_reply(upstream_reply(query_bytes(), edns=False)).opt is None


def test_parse_reply_takes_addresses_from_the_answer_section_only():
    data = upstream_reply(query_bytes(), answers=(("A", "192.0.2.1", 60),
                                                  ("AAAA", "2001:db8::2", 60),
                                                  ("TXT", "1.2.3.4", 60)),
                          auth=(("A", "198.51.100.1", 60),),
                          extra=(("A", "198.51.100.2", 60), ("AAAA", "2001:db8::3", 60)))
    reply = wire.parse_reply(data)
    assert reply.addresses == [bytes([192, 0, 2, 1]),
                               bytes.fromhex("20010db8000000000000000000000002")]


@pytest.mark.parametrize(("soa_ttl", "minimum", "expected"), [(300, 60, 60), (30, 600, 30)])
def test_parse_reply_negative_ttl_is_min_of_soa_ttl_and_minimum(soa_ttl, minimum, expected):
    data = upstream_reply(query_bytes(), answers=(), auth=(("SOA", minimum, soa_ttl),),
                          rcode=RCODE.NXDOMAIN)
    reply = wire.parse_reply(data)
    assert reply.negative_ttl == expected
    assert reply.rcode == RCODE.NXDOMAIN and reply.answers == 0


def test_parse_reply_ignores_soa_outside_the_authority_section():
    data = upstream_reply(query_bytes(), answers=(), extra=(("SOA", 5, 5),))
    assert wire.parse_reply(data).negative_ttl is None


def test_parse_reply_reads_top_bit_ttl_as_zero():
    data = bytearray(upstream_reply(query_bytes(), answers=(("A", GENUINE, 300),)))
    offset = wire.parse_reply(bytes(data)).ttls[0][0]
    struct.pack_into(">I", data, offset, 0x80000001)
    assert wire.parse_reply(bytes(data)).ttls[0][1] == 0


@pytest.mark.parametrize("cut", [1, 5, 11])
def test_parse_reply_rejects_truncated_records(cut):
    data = upstream_reply(query_bytes(), edns=False)
    with pytest.raises(wire.WireError):
        wire.parse_reply(data[:-cut])


def test_parse_reply_rejects_a_query_and_repeated_opt():
    with pytest.raises(wire.WireError):
        wire.parse_reply(query_bytes())
    data = DNSRecord.parse(upstream_reply(query_bytes()))
    data.add_ar(EDNS0(udp_len=512))
    with pytest.raises(wire.WireError):
        wire.parse_reply(bytes(data.pack()))


def _opt_moved(data: bytes, section: str) -> bytes:
    """`data` (our OPT last) with the OPT moved to just after the question: the first record
    of the answer section ("an"), or of the authority section ("ns", for a reply with no
    answers)."""
    qid, flags, qd, an, ns, ar = struct.unpack_from(">HHHHHH", data)
    reply = wire.parse_reply(data)
    start, end = reply.opt
    qend = 12 + len(reply.question)
    body = data[12:qend] + data[start:end] + data[qend:start] + data[end:]
    counts = (an + 1, ns) if section == "an" else (an, ns + 1)
    return struct.pack(">HHHHHH", qid, flags, qd, *counts, ar - 1) + body


@pytest.mark.parametrize("section", ["an", "ns"])
@pytest.mark.parametrize("extra", [(), (("AAAA", "2001:db8::1", 50),)])
def test_parse_reply_rejects_opt_outside_the_additional_section(section, extra):
    """RFC 6891 6.1.1. Accepted, it passed the EDNS marker, and strip_opt cut it out of the
    wrong section: struct.error with ARCOUNT 0, a record moved between sections otherwise."""
    data = upstream_reply(query_bytes(), answers=() if section == "ns" else
                          (("A", GENUINE, 300),), extra=extra)
    moved = _opt_moved(data, section)
    assert DNSRecord.parse(moved).header.ar == len(extra)
    with pytest.raises(wire.WireError):
        wire.parse_reply(moved)


# --- strip_opt, client_reply ---


def forward(reply_data: bytes, client_query: bytes, age: int = 0) -> bytes:
    """The miss path's transformation of an upstream reply for a client."""
    cached = wire.strip_opt(reply_data, wire.parse_reply(reply_data))
    return wire.client_reply(cached, wire.parse_query(client_query), age)


def test_strip_opt_removes_only_the_opt_record():
    data = upstream_reply(query_bytes(), answers=(("A", GENUINE, 300),),
                          extra=(("AAAA", "2001:db8::1", 50),))
    cached = wire.strip_opt(data, wire.parse_reply(data))
    assert opts(cached.body) == []
    assert records(cached.body) == records(data)
    assert DNSRecord.parse(cached.body).header.ar == 1
    for offset, ttl in cached.ttls:
        assert struct.unpack_from(">I", cached.body, offset)[0] == ttl


def test_parse_query_key_folds_the_name_only():
    """0x41 is 'A' and HTTPS's type code: folding the type bytes made HTTPS and TYPE97 one."""
    https = wire.parse_query(query_bytes("Example.com", "HTTPS"))
    raw97 = bytearray(query_bytes("example.COM", "A"))
    struct.pack_into(">H", raw97, 12 + len(b"\x07example\x03com\x00"), 97)
    type97 = wire.parse_query(bytes(raw97))
    assert https.key[:-4] == type97.key[:-4] == b"\x07example\x03com\x00"
    assert https.key != type97.key


def test_strip_opt_keeps_pointers_that_point_past_the_opt():
    """A record after the OPT may be compressed against a name that also follows the OPT:
    cutting the OPT out would leave that pointer aimed at the wrong bytes."""
    q = DNSRecord.parse(query_bytes())
    reply = q.reply()
    reply.add_answer(make_rr(q.q.qname, "A", GENUINE, 300))
    reply.add_ar(EDNS0(udp_len=1232))
    reply.add_ar(make_rr("ns1.elsewhere.test.", "A", "198.51.100.7", 77))
    reply.add_ar(make_rr("ns1.elsewhere.test.", "AAAA", "2001:db8::7", 77))  # a pointer
    data = bytes(reply.pack())
    assert data.count(b"\x03ns1") == 1  # dnslib did compress the second owner
    cached = wire.strip_opt(data, wire.parse_reply(data))
    assert records(cached.body) == records(data)
    assert opts(cached.body) == []


@pytest.mark.parametrize(("do", "ad", "keeps_ad"), [(False, False, False), (True, False, True),
                                                    (False, True, True)])
def test_ad_bit_reaches_only_clients_that_understand_it(do, ad, keeps_ad):
    data = bytearray(upstream_reply(query_bytes()))
    struct.pack_into(">H", data, 2, struct.unpack_from(">H", data, 2)[0] | wire.AD)
    client = bytearray(query_bytes(do=do))
    if ad:
        struct.pack_into(">H", client, 2, struct.unpack_from(">H", client, 2)[0] | wire.AD)
    out = forward(bytes(data), bytes(client))
    assert bool(struct.unpack_from(">H", out, 2)[0] & wire.AD) is keeps_ad


def test_client_buffer_is_capped():
    assert wire.parse_query(query_bytes(bufsize=65000)).udp_size == wire.MAX_UDP_REPLY


def test_strip_opt_with_opt_in_the_middle_fixes_ttl_offsets():
    """OPT need not be last: records after it move, and so must their TTL offsets."""
    q = DNSRecord.parse(query_bytes())
    reply = q.reply()
    reply.add_answer(make_rr(q.q.qname, "A", GENUINE, 300))
    reply.add_ar(EDNS0(udp_len=1232))
    reply.add_ar(make_rr("extra.example.", "A", "198.51.100.7", 77))
    data = bytes(reply.pack())
    cached = wire.strip_opt(data, wire.parse_reply(data))
    assert records(cached.body) == records(data)
    assert sorted(ttl for _, ttl in cached.ttls) == [77, 300]
    for offset, ttl in cached.ttls:
        assert struct.unpack_from(">I", cached.body, offset)[0] == ttl


@pytest.mark.parametrize("upstream_edns", [True, False])
@pytest.mark.parametrize(("client_edns", "do"), [(True, True), (True, False), (False, False)])
def test_client_reply_opt_only_when_the_client_sent_edns(upstream_edns, client_edns, do):
    upstream_query = query_bytes("host.example")
    data = upstream_reply(upstream_query, edns=upstream_edns)
    client = query_bytes("HOST.example", edns=client_edns, do=do, qid=9)
    out = forward(data, client)
    msg = DNSRecord.parse(out)
    assert msg.header.id == 9
    assert str(msg.q.qname) == "HOST.example."
    assert records(out) == records(data)
    found = opts(out)
    if client_edns:
        assert len(found) == 1
        assert bool(found[0].ttl & wire.DO_BIT) is do
        assert msg.header.ar == 1
    else:
        assert found == [] and msg.header.ar == 0


def test_client_reply_ages_ttls_and_floors_at_zero():
    data = upstream_reply(query_bytes(), answers=(("A", GENUINE, 300), ("A", "192.0.2.11", 5)),
                          auth=(("SOA", 60, 100),))
    aged = DNSRecord.parse(forward(data, query_bytes(), age=10))
    assert [rr.ttl for rr in aged.rr] == [290, 0]
    assert [rr.ttl for rr in aged.auth] == [90]
    fresh = DNSRecord.parse(forward(data, query_bytes(), age=0))
    assert [rr.ttl for rr in fresh.rr] == [300, 5]


def test_client_reply_takes_rd_from_the_client_and_keeps_the_rest():
    data = upstream_reply(query_bytes(rd=True), rcode=RCODE.NXDOMAIN, answers=(),
                          auth=(("SOA", 60, 60),))
    out = DNSRecord.parse(forward(data, query_bytes(rd=False)))
    assert out.header.rd == 0 and out.header.qr == 1 and out.header.ra == 1
    assert out.header.rcode == RCODE.NXDOMAIN


def test_strip_opt_caps_every_ttl_at_max_ttl():
    data = upstream_reply(query_bytes(), answers=(("A", GENUINE, 604800), ("A", "192.0.2.11", 5)),
                          auth=(("SOA", 86400, 604800),))
    cached = wire.strip_opt(data, wire.parse_reply(data), max_ttl=60)
    assert [ttl for _, ttl in cached.ttls] == [60, 5, 60]
    assert cached.ttl == 5
    assert wire.strip_opt(data, wire.parse_reply(data)).ttls[0][1] == 604800  # no cap given


def test_client_reply_flags_are_a_recursive_servers():
    """AA clear, RA set, RD and CD the client's, Z zero: whatever the upstream set."""
    data = bytearray(upstream_reply(query_bytes()))
    struct.pack_into(">H", data, 2, wire.QR | wire.AA | 0x0040 | wire.CD)  # RA, RD clear
    client = bytearray(query_bytes())
    out = forward(bytes(data), bytes(client))
    assert struct.unpack_from(">H", out, 2)[0] == wire.QR | wire.RA | wire.RD
    struct.pack_into(">H", client, 2, wire.CD)
    out = forward(bytes(data), bytes(client))
    assert struct.unpack_from(">H", out, 2)[0] == wire.QR | wire.RA | wire.CD


def test_client_reply_passes_the_extended_rcode_on():
    data = upstream_reply(query_bytes(), ext_rcode=1)  # BADVERS-style upper bits
    (opt,) = opts(forward(data, query_bytes()))
    assert opt.ttl >> 24 == 1


# --- truncate_for ---


def test_truncate_for_leaves_a_fitting_reply_alone():
    data = forward(upstream_reply(query_bytes()), query_bytes())
    assert wire.truncate_for(data, wire.parse_query(query_bytes())) == data


@pytest.mark.parametrize(("edns", "bufsize"), [(True, 1232), (True, 4096), (False, 512)])
def test_truncate_for_cuts_to_header_question_and_opt(edns, bufsize):
    client = query_bytes("Big.example", "TXT", edns=edns, bufsize=bufsize, do=True, qid=31)
    q = wire.parse_query(client)
    answers = tuple(("TXT", "x" * 200, 60) for _ in range(bufsize // 200 + 2))
    data = forward(upstream_reply(query_bytes("big.example", "TXT"), answers=answers), client)
    assert len(data) > q.udp_size
    cut = wire.truncate_for(data, q)
    assert len(cut) <= q.udp_size
    msg = DNSRecord.parse(cut)
    assert msg.header.tc == 1 and msg.header.id == 31
    assert msg.rr == [] and msg.auth == []
    assert str(msg.q.qname) == "Big.example."
    if edns:
        (opt,) = opts(cut)
        assert opt.ttl & wire.DO_BIT
    else:
        assert opts(cut) == []


def test_truncate_for_keeps_the_extended_rcode():
    client = query_bytes("big.example", "TXT", bufsize=512)
    answers = tuple(("TXT", "x" * 200, 60) for _ in range(4))
    data = forward(upstream_reply(query_bytes("big.example", "TXT"), answers=answers,
                                  ext_rcode=1), client)
    cut = wire.truncate_for(data, wire.parse_query(client))
    assert DNSRecord.parse(cut).header.tc == 1
    (opt,) = opts(cut)
    assert opt.ttl >> 24 == 1


# --- cache_ttl ---


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"answers": (("A", GENUINE, 300), ("A", "192.0.2.11", 40))}, 40),
    ({"answers": (("A", GENUINE, 300),), "auth": (("SOA", 60, 20),)}, 20),  # every RR counts
    ({"answers": (), "auth": (("SOA", 60, 300),)}, 60),  # NODATA
    ({"answers": (), "auth": (("SOA", 600, 30),), "rcode": RCODE.NXDOMAIN}, 30),
    ({"answers": (), "rcode": RCODE.NXDOMAIN}, 0),  # no SOA: not cached (RFC 2308 5)
    ({"answers": ()}, 0),
    ({"rcode": RCODE.SERVFAIL}, 0),
    ({"rcode": RCODE.REFUSED}, 0),
    ({"tc": True}, 0),
    ({"answers": (("A", GENUINE, 0),)}, 0),
    # RFC 2308 5: a CNAME in front of a negative answer bounds it with its own TTL ...
    ({"answers": (("CNAME", "gone.example.", 30),), "auth": (("SOA", 600, 300),),
      "rcode": RCODE.NXDOMAIN}, 30),
    # ... and NODATA behind a CNAME is bounded by the SOA's MINIMUM, not only its TTL.
    ({"answers": (("CNAME", "alias.example.", 3000),), "auth": (("SOA", 60, 3000),)}, 60),
])
def test_cache_ttl(kwargs, expected):
    data = upstream_reply(query_bytes(), **kwargs)
    assert wire.cache_ttl(wire.parse_reply(data)) == expected


def test_cache_ttl_ignores_the_opt_records_ttl_field():
    data = upstream_reply(query_bytes(), answers=(("A", GENUINE, 300),))  # OPT "ttl" is 0
    assert wire.cache_ttl(wire.parse_reply(data)) == 300


# --- other messages the forwarder writes ---


def test_upstream_query_always_carries_opt_and_our_own_id():
    for client in (query_bytes(edns=False), query_bytes(do=True, bufsize=4096)):
        q = wire.parse_query(client)
        out = DNSRecord.parse(wire.upstream_query(q, 0xBEEF))
        assert out.header.id == 0xBEEF and out.header.rd == 1
        (opt,) = opts(wire.upstream_query(q, 0xBEEF))
        assert opt.rclass == wire.UPSTREAM_UDP_SIZE
        assert bool(opt.ttl & wire.DO_BIT) is q.do
        assert str(out.q.qname) == "www.Example.com."


def test_response_and_header_error():
    q = wire.parse_query(query_bytes(qid=5, do=True))
    msg = DNSRecord.parse(wire.response(q, wire.SERVFAIL))
    assert (msg.header.id, msg.header.rcode, msg.header.qr) == (5, RCODE.SERVFAIL, 1)
    assert len(opts(wire.response(q, wire.SERVFAIL))) == 1
    err = wire.header_error(query_bytes(qid=6)[:14], wire.FORMERR)
    assert DNSRecord.parse(err).header.rcode == RCODE.FORMERR
    assert DNSRecord.parse(err).header.ra == 1
    assert wire.header_error(b"\x00" * 5, wire.FORMERR) is None
    assert wire.header_error(_with_header(query_bytes(), flags=wire.QR), wire.FORMERR) is None


def test_response_carries_an_extended_rcode_in_a_version_0_opt():
    raw = bytearray(query_bytes(qid=8, do=True))
    struct.pack_into(">B", raw, len(raw) - 5, 1)  # the OPT's version byte
    q = wire.parse_query(bytes(raw))
    assert q.edns_version == 1
    out = wire.response(q, wire.BADVERS)
    (opt,) = opts(out)
    assert (DNSRecord.parse(out).header.rcode, opt.ttl) == (0, 1 << 24 | wire.DO_BIT)


@pytest.mark.parametrize("with_opt", [False, True])
def test_header_error_answers_other_opcodes_notimp_without_ra(with_opt):
    flags = 15 << 11 | wire.RD | wire.CD
    data = struct.pack(">HHHHHH", 9, flags, 0, 0, 0, 1 if with_opt else 0)
    if with_opt:
        data += wire.opt_record(True)
    out = wire.header_error(data, wire.FORMERR)
    assert struct.unpack_from(">HH", out) == (9, wire.QR | 15 << 11 | wire.NOTIMP)
    assert [opt.ttl for opt in opts(out)] == ([wire.DO_BIT] if with_opt else [])


# --- issue 5: the fast path gives the slow path's bytes ---


def cache_hit(cache: Cache, client_query: bytes) -> bytes | None:
    q = wire.parse_query(client_query)
    response = cache.answer(Request(q, ("127.0.0.1", 5300), "udp", 0.0))
    return None if response is None else response.wire


def patched(data: bytes, client_query: bytes) -> bytes:
    """`data` as another client would get it: its ID and its question's case."""
    q = wire.parse_query(client_query)
    return struct.pack(">H", q.id) + data[2:12] + q.question + data[12 + len(q.question):]


labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                 min_size=1, max_size=20)
names = st.lists(labels, min_size=1, max_size=4).map(".".join)
ttls = st.integers(min_value=0, max_value=2**31 - 1)
rr_items = st.one_of(
    st.tuples(st.just("A"), st.ip_addresses(v=4).map(str), ttls),
    st.tuples(st.just("AAAA"), st.ip_addresses(v=6).map(str), ttls),
    st.tuples(st.just("TXT"), st.text(alphabet="abc xyz", max_size=40), ttls),
    st.tuples(st.just("CNAME"), names.map(lambda n: n + "."), ttls),
    st.tuples(st.just("MX"), names.map(lambda n: n + "."), ttls),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=names, answers=st.lists(rr_items, max_size=5),
       auth=st.lists(st.tuples(st.just("SOA"), ttls, ttls), max_size=1),
       extra=st.lists(rr_items, max_size=3),
       rcode=st.sampled_from([RCODE.NOERROR, RCODE.NXDOMAIN]),
       upstream_edns=st.booleans(), client_edns=st.booleans(), do=st.booleans(),
       id1=st.integers(0, 0xFFFF), id2=st.integers(0, 0xFFFF), swap=st.booleans())
def test_cache_hit_bytes_equal_forwarded_bytes(name, answers, auth, extra, rcode, upstream_edns,
                                               client_edns, do, id1, id2, swap):
    first = query_bytes(name, edns=client_edns, do=do, qid=id1)
    second = query_bytes(name.swapcase() if swap else name.upper(), edns=client_edns, do=do,
                         qid=id2)
    data = upstream_reply(first, answers=answers, auth=auth, extra=extra, rcode=rcode,
                          edns=upstream_edns)
    reply = wire.parse_reply(data)
    cached = wire.strip_opt(data, reply)
    q1 = wire.parse_query(first)
    forwarded = wire.client_reply(cached, q1)
    # The forwarded reply is the upstream's, record for record.
    assert records(forwarded) == records(data)
    now = [100.0]
    cache = Cache(16, Metrics(), max_ttl=2**31, clock=lambda: now[0], serve_stale=False)
    cache.observe(Request(q1, ("127.0.0.1", 5300), "udp", 0.0),
                  Response(forwarded, "forwarded", reply.rcode, "up", cacheable=cached))
    hit = cache_hit(cache, second)
    if wire.cache_ttl(reply) == 0:
        assert hit is None
        return
    assert hit == patched(forwarded, second)
    # ... and the same client asking again gets exactly the forwarded bytes.
    assert cache_hit(cache, first) == forwarded
    # Later, the same bytes with every TTL aged, none below zero.
    now[0] += 7
    aged = cache_hit(cache, first)
    if aged is not None:
        assert len(aged) == len(forwarded)
        before, after = records(forwarded), records(aged)
        assert [r[:4] + r[5:] for r in before] == [r[:4] + r[5:] for r in after]
        assert [r[4] for r in after] == [max(r[4] - 7, 0) for r in before]


def test_end_to_end_cache_hit_bytes_equal_miss_bytes(upstream, make_proxy):
    """Two clients, different IDs and case: the hit is the miss with ID and case patched."""
    upstream.rule("same.example", answers=[GENUINE, "192.0.2.11"], cname=None, ttl=300)
    proxy = make_proxy("--upstream", upstream.address)

    first = query_bytes("SaMe.example", qid=0x1111, do=True)
    second = query_bytes("sAmE.EXAMPLE", qid=0x2222, do=True)
    miss = send_raw(proxy.port, first)
    hit = send_raw(proxy.port, second)
    assert upstream.count("same.example") == 1
    assert [line["reason"] for line in proxy.log_lines()] == ["forwarded", "cached"]
    assert DNSRecord.parse(miss).header.id == 0x1111
    assert hit == patched(miss, second)
    assert hit != miss
    # Over TCP as well: the same bytes, framed.
    assert send_raw(proxy.port, first, tcp=True) == miss
    assert upstream.count("same.example") == 1


def test_end_to_end_hit_and_miss_agree_without_edns(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)

    first = query_bytes("plain.example", edns=False, qid=1)
    miss = send_raw(proxy.port, first)
    second = query_bytes("PLAIN.example", edns=False, qid=2)
    assert send_raw(proxy.port, second) == patched(miss, second)
    assert opts(miss) == []
    assert upstream.seen[0].has_opt  # the upstream still got our OPT
    assert ask(proxy.port, "plain.example").header.rcode == RCODE.NOERROR


# --- issue 10, item 1: where an OPT record may sit ---


def _raw_rr(rtype: str, value: str, ttl: int) -> bytes:
    """A record owned by the question's name (a pointer to offset 12, which stays put whatever
    is inserted after the question), rdata uncompressed."""
    rdata = {"A": lambda v: bytes(map(int, v.split("."))),
             "AAAA": lambda v: bytes.fromhex(v),
             "TXT": lambda v: bytes([len(v)]) + v.encode()}[rtype](value)
    return b"\xc0\x0c" + struct.pack(">HHIH", getattr(QTYPE, rtype), 1, ttl, len(rdata)) + rdata


raw_rrs = st.one_of(
    st.tuples(st.just("A"), st.ip_addresses(v=4).map(str), ttls),
    st.tuples(st.just("AAAA"), st.ip_addresses(v=6).map(lambda a: a.packed.hex()), ttls),
    st.tuples(st.just("TXT"), st.text(alphabet="abc xyz", max_size=40), ttls),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sections=st.lists(st.lists(raw_rrs, max_size=3), min_size=3, max_size=3),
       opt_section=st.integers(0, 2), opt_index=st.integers(0, 3), second_opt=st.booleans())
def test_opt_is_accepted_once_and_in_the_additional_section_only(sections, opt_section,
                                                                 opt_index, second_opt):
    """Wherever the OPT sits, parse_reply accepts the reply only if it is the one OPT and in
    the additional section; then strip_opt keeps every other record in its own section."""
    question = wire.parse_query(query_bytes("opt.example", edns=False)).question
    built = [[_raw_rr(*item) for item in section] for section in sections]
    opt_rr = wire.opt_record(False)
    built[opt_section].insert(min(opt_index, len(built[opt_section])), opt_rr)
    if second_opt:
        built[2].append(opt_rr)
    counts = [len(section) for section in built]
    data = (struct.pack(">HHHHHH", 1, wire.QR | wire.RD | wire.RA, 1, *counts) + question
            + b"".join(b"".join(section) for section in built))
    if opt_section != 2 or second_opt:
        with pytest.raises(wire.WireError):
            wire.parse_reply(data)
        return
    reply = wire.parse_reply(data)
    cached = wire.strip_opt(data, reply)
    body = wire.parse_reply(cached.body)
    assert body.counts == (1, counts[0], counts[1], counts[2] - 1) and body.opt is None
    assert records(cached.body) == records(data)
    assert [off for off, _ in body.ttls] == list(cached.offsets)
