"""DNS messages at the byte level, for the per-query hot path.

A full dnslib parse costs tens of microseconds; the forwarder only needs the header, the question,
where the OPT record and the TTLs sit, and the A/AAAA addresses of an answer. This module finds
those in one pass over the bytes and builds the few messages the forwarder writes itself. dnslib is
used elsewhere, where a message is rare or its meaning matters more than its speed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

HEADER = struct.Struct(">HHHHHH")
RR_FIXED = struct.Struct(">HHIH")  # type, class, ttl, rdlength
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
Z = 0x0040
AD = 0x0020
CD = 0x0010
OPCODE_MASK = 0x7800
RCODE_MASK = 0x000F

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16  # an extended rcode: its upper 8 bits travel in the OPT record (RFC 6891 6.1.3)

TYPE_A, TYPE_SOA, TYPE_HINFO, TYPE_TXT = 1, 6, 13, 16
TYPE_AAAA, TYPE_OPT, TYPE_ANY = 28, 41, 255
CLASS_IN, CLASS_CH = 1, 3

DO_BIT = 0x8000
# The EDNS buffer we advertise upstream: the DNS flag day 2020 value, which avoids IP fragmentation.
UPSTREAM_UDP_SIZE = 1232
MAX_TTL = 0x7FFFFFFF
MAX_UDP_REPLY = 4096


class WireError(ValueError):
    """The bytes are not a DNS message we can work with."""


@dataclass(slots=True)
class Query:
    """What the forwarder needs of a client's query, found without a full parse."""

    id: int
    flags: int
    question: bytes  # name, type and class exactly as the client sent them
    key: bytes  # the question lower-cased: names compare case-insensitively
    qtype: int
    qclass: int
    edns: bool
    do: bool
    udp_size: int  # the most a UDP reply to this client may carry
    edns_version: int = 0  # above 0 we answer BADVERS: we speak EDNS version 0 only

    @property
    def name(self) -> str:
        return name_to_text(self.question, 0)


@dataclass(slots=True)
class Reply:
    """The layout of a reply: where its TTLs and OPT record are, and what it answers."""

    id: int
    flags: int
    question: bytes
    counts: tuple[int, int, int, int]
    ttls: list[tuple[int, int]] = field(default_factory=list)  # (offset, ttl) of every non-OPT RR
    opt: tuple[int, int] | None = None  # byte range of the OPT record
    ext_rcode: int = 0
    addresses: list[bytes] = field(default_factory=list)  # rdata of A/AAAA in the answer section
    negative_ttl: int | None = None  # from the SOA in the authority section (RFC 2308)
    end: int = 0  # offset just past the last record

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK

    @property
    def truncated(self) -> bool:
        return bool(self.flags & TC)

    @property
    def answers(self) -> int:
        return self.counts[1]


def skip_name(data: bytes, off: int) -> int:
    """Offset just past the name at `off`; pointers are not followed, so loops cannot hang us."""
    end = len(data)
    while True:
        if off >= end:
            raise WireError("name runs past the end of the message")
        length = data[off]
        if length == 0:
            return off + 1
        if length & 0xC0 == 0xC0:
            if off + 2 > end:
                raise WireError("truncated compression pointer")
            return off + 2
        if length & 0xC0:
            raise WireError("unknown label type")
        off += 1 + length


def name_to_text(data: bytes, off: int) -> str:
    """The presentation form of an uncompressed name (a question's), for logs."""
    labels = []
    while True:
        length = data[off]
        if length == 0 or length & 0xC0:
            break
        labels.append(data[off + 1 : off + 1 + length].decode("ascii", "backslashreplace"))
        off += 1 + length
    return ".".join(labels) + "."


def question_key(question: bytes) -> bytes:
    """Names compare case-insensitively (RFC 4343); the type and class bytes must not be folded,
    or HTTPS (0x0041) would be the same question as TYPE97 (0x0061)."""
    return question[:-4].lower() + question[-4:]


def _question_end(data: bytes) -> int:
    """End of the single question at offset 12, which must not use compression."""
    off = 12
    end = len(data)
    total = 0
    while True:
        if off >= end:
            raise WireError("question runs past the end of the message")
        length = data[off]
        if length == 0:
            off += 1
            break
        if length & 0xC0:
            raise WireError("compressed or unknown label in the question")
        total += length + 1
        if total > 254:
            raise WireError("name longer than 255 bytes")
        off += 1 + length
    if off + 4 > end:
        raise WireError("question lacks type and class")
    return off + 4


# Clients ask the same names in the same bytes, only the ID differs: what a query says besides
# its ID is kept for the last thousand small queries, so a repeated one is read at the cost of a
# dict look-up. Only small ones, and few: the memory this takes stays near a third of a megabyte.
PARSED_MAX = 1024
PARSED_MAX_BYTES = 128
_parsed: dict[bytes, tuple] = {}  # a query's bytes after the ID -> Query's other fields


def parse_query(data: bytes) -> Query:
    """Read a client's query; raise WireError for anything that is not one standard query."""
    remembered = type(data) is bytes and len(data) <= PARSED_MAX_BYTES
    if remembered:
        fields = _parsed.get(data[2:])
        if fields is not None:
            return Query(data[0] << 8 | data[1], *fields)
    query = _parse_query(data)
    if remembered:
        if len(_parsed) >= PARSED_MAX:
            _parsed.clear()  # a flood of unique names must not grow it: start afresh
        _parsed[data[2:]] = (query.flags, query.question, query.key, query.qtype, query.qclass,
                             query.edns, query.do, query.udp_size, query.edns_version)
    return query


def _parse_query(data: bytes) -> Query:
    if len(data) < 12:
        raise WireError("shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & QR:
        raise WireError("a response, not a query")
    if qdcount != 1:
        raise WireError(f"{qdcount} questions")
    qend = _question_end(data)
    question = bytes(data[12:qend])  # hashable even when handed a bytearray
    qtype, qclass = struct.unpack_from(">HH", data, qend - 4)
    edns = False
    do = False
    udp_size = 512
    version = 0
    if arcount:
        off = qend
        for _ in range(ancount + nscount + arcount):
            start = off
            off = skip_name(data, off)
            if off + 10 > len(data):
                raise WireError("record header runs past the end")
            rtype, rclass, ttl, rdlen = RR_FIXED.unpack_from(data, off)
            off += 10 + rdlen
            if off > len(data):
                raise WireError("record data runs past the end")
            if rtype == TYPE_OPT:
                if data[start] != 0 or edns:
                    raise WireError("malformed or repeated OPT record")
                edns = True
                do = bool(ttl & DO_BIT)
                version = (ttl >> 16) & 0xFF
                # Honour the client's buffer, but never send fragments-prone giants.
                udp_size = min(max(512, rclass), MAX_UDP_REPLY)
    return Query(qid, flags, question, question_key(question), qtype, qclass, edns, do, udp_size,
                 version)


def parse_reply(data: bytes) -> Reply:
    """Walk a reply once, noting what the forwarder checks, caches and patches."""
    if len(data) < 12:
        raise WireError("shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if not flags & QR:
        raise WireError("a query, not a response")
    if qdcount != 1:
        raise WireError(f"{qdcount} questions in a reply")
    qend = _question_end(data)
    reply = Reply(qid, flags, data[12:qend], (qdcount, ancount, nscount, arcount))
    end = len(data)
    off = qend
    ttls = reply.ttls
    answer_end = ancount
    authority_end = ancount + nscount
    for index in range(ancount + nscount + arcount):
        start = off
        off = skip_name(data, off)
        if off + 10 > end:
            raise WireError("record header runs past the end")
        rtype, rclass, ttl, rdlen = RR_FIXED.unpack_from(data, off)
        rdata = off + 10
        off = rdata + rdlen
        if off > end:
            raise WireError("record data runs past the end")
        if rtype == TYPE_OPT:
            # RFC 6891 6.1.1: at most one, in the additional section. Accepting one elsewhere
            # would let it pass the EDNS marker and, cut out, shift a record between sections.
            if index < authority_end:
                raise WireError("OPT record outside the additional section")
            if reply.opt is not None:
                raise WireError("repeated OPT record")
            reply.opt = (start, off)
            reply.ext_rcode = ttl >> 24
            continue
        if ttl > MAX_TTL:  # RFC 2181 8: a TTL with the top bit set means zero
            ttl = 0
        ttls.append((rdata - 6, ttl))
        if index < answer_end:
            if rclass == CLASS_IN and (
                (rtype == TYPE_A and rdlen == 4) or (rtype == TYPE_AAAA and rdlen == 16)
            ):
                reply.addresses.append(data[rdata:off])
        elif index < authority_end and rtype == TYPE_SOA and rdlen >= 20:
            minimum = U32.unpack_from(data, off - 4)[0]
            reply.negative_ttl = min(ttl, minimum)
    reply.end = off
    return reply


def record_addresses(data: bytes) -> list[bytes]:
    """The rdata of every A and AAAA record in a message, whatever its section: the addresses
    a stored reply would hand a client, glue and addresses behind a CNAME included. For the
    rare scan of the cache when an address becomes known as forged, not for the hot path."""
    if len(data) < 12:
        raise WireError("shorter than a DNS header")
    counts = HEADER.unpack_from(data)[3:]
    off = _question_end(data)
    found = []
    for _ in range(sum(counts)):
        off = skip_name(data, off)
        if off + 10 > len(data):
            raise WireError("record header runs past the end")
        rtype, rclass, _, rdlen = RR_FIXED.unpack_from(data, off)
        rdata = off + 10
        off = rdata + rdlen
        if off > len(data):
            raise WireError("record data runs past the end")
        if rclass == CLASS_IN and ((rtype == TYPE_A and rdlen == 4)
                                   or (rtype == TYPE_AAAA and rdlen == 16)):
            found.append(data[rdata:off])
    return found


def opt_record(do: bool, ext_rcode: int = 0, udp_size: int = UPSTREAM_UDP_SIZE) -> bytes:
    """An OPT pseudo-record with no options (RFC 6891)."""
    return b"\x00" + RR_FIXED.pack(TYPE_OPT, udp_size, (ext_rcode << 24) | (DO_BIT if do else 0), 0)


OUR_OPT = {do: opt_record(do) for do in (False, True)}  # the usual two, built once
OPT_SIZE = len(OUR_OPT[False])
OPT_HEAD = OUR_OPT[False][:3]  # root owner, type OPT


def upstream_query(query: Query, qid: int, edns: bool = True) -> bytes:
    """The query we send upstream: the client's question under our own ID, with an OPT.

    The OPT record is the EDNS marker: genuine EDNS-speaking resolvers echo one, injectors that
    answer from a template do not. `edns=False` only for an upstream that answered an OPT with
    FORMERR or NOTIMP (RFC 6891 section 7).
    """
    flags = query.flags & (RD | CD | AD | OPCODE_MASK)
    if not edns:
        return HEADER.pack(qid, flags, 1, 0, 0, 0) + query.question
    return HEADER.pack(qid, flags, 1, 0, 0, 1) + query.question + OUR_OPT[query.do]


class CachedReply(bytes):
    """A reply with its OPT record removed, ready to be patched for any client.

    One bytes object, because a cache holds a hundred thousand of them: a fixed head (when the
    cache stored it, how long it may be kept, extended rcode, rcode, number of TTLs), the
    offsets of the TTLs in the message (u16 each), then the message. Objects and lists per
    entry would triple the memory a full cache takes.
    """

    __slots__ = ()
    HEAD = struct.Struct(">dIBBH")  # stored at, ttl, ext_rcode, rcode, TTL count
    STAMP = struct.Struct(">dI")  # the head's first two fields: what an expiry check needs

    @classmethod
    def build(cls, message: bytes, offsets: list[int], ext_rcode: int, ttl: int, rcode: int,
              stored: float = 0.0) -> CachedReply:
        head = cls.HEAD.pack(stored, ttl, ext_rcode, rcode, len(offsets))
        return cls(head + struct.pack(f">{len(offsets)}H", *offsets) + message)

    def stamped(self, stored: float) -> CachedReply:
        return CachedReply(self.stamped_bytes(stored))

    def stamped_bytes(self, stored: float) -> bytes:
        """The same, as plain bytes: what a cache holds. An instance of a subclass of bytes is
        tracked by the cyclic garbage collector, plain bytes are not; a hundred thousand of
        them made every full collection walk the whole cache (20 ms at 100k entries, on the
        event loop)."""
        return self.STAMP.pack(stored, self.ttl) + self[self.STAMP.size:]

    @property
    def stored(self) -> float:
        return self.HEAD.unpack_from(self)[0]

    @property
    def ttl(self) -> int:
        return self.HEAD.unpack_from(self)[1]

    @property
    def ext_rcode(self) -> int:
        return self.HEAD.unpack_from(self)[2]

    @property
    def rcode(self) -> int:
        return self.HEAD.unpack_from(self)[3]

    @property
    def offsets(self) -> tuple[int, ...]:
        count = self.HEAD.unpack_from(self)[4]
        return struct.unpack_from(f">{count}H", self, self.HEAD.size)

    @property
    def body(self) -> bytes:
        """The message itself."""
        return bytes(self[self.HEAD.size + 2 * len(self.offsets):])

    @property
    def ttls(self) -> list[tuple[int, int]]:
        """(offset, ttl) of every record's TTL in `body`."""
        body = self.body
        return [(off, U32.unpack_from(body, off)[0]) for off in self.offsets]


def strip_opt(data: bytes, reply: Reply, max_ttl: int = MAX_TTL) -> CachedReply:
    """Remove the upstream's OPT record: the client gets one of ours, or none if it sent none.

    Every TTL is capped at `max_ttl` here, once per upstream reply, so forwarded and cached
    replies alike show clients no more than the time we would keep the answer.

    Cutting bytes out is safe only when the OPT is the last record: a compression pointer in a
    later record could point past it. Replies with OPT elsewhere (rare) are rebuilt by dnslib.
    """
    if reply.opt is not None and reply.opt[1] != reply.end:
        data, ext_rcode = _rebuilt_without_opt(data), reply.ext_rcode
        reply = parse_reply(data)
        reply.ext_rcode = ext_rcode
    # Bytes past the last record go: our OPT, appended for the client, must follow a record.
    body = bytearray(data[:reply.end])
    offsets = [off for off, _ in reply.ttls]
    if reply.opt is not None:
        start, end = reply.opt
        cut = end - start
        del body[start:end]
        U16.pack_into(body, 10, reply.counts[3] - 1)
        offsets = [off - cut if off > start else off for off in offsets]
    for off, (_, ttl) in zip(offsets, reply.ttls, strict=True):
        U32.pack_into(body, off, min(ttl, max_ttl))  # a TTL with the top bit set is stored as 0
    return CachedReply.build(bytes(body), offsets, reply.ext_rcode,
                             min(cache_ttl(reply), max_ttl), reply.rcode)


def _rebuilt_without_opt(data: bytes) -> bytes:
    from dnslib import DNSRecord  # the rare path only
    from dnslib.dns import DNSError

    try:
        record = DNSRecord.parse(data)
        record.ar = [rr for rr in record.ar if rr.rtype != TYPE_OPT]
        record.set_header_qa()
        return bytes(record.pack())
    except (DNSError, ValueError, IndexError) as exc:
        raise WireError(f"cannot rebuild the reply without its OPT: {exc}") from None


def cache_ttl(reply: Reply) -> int:
    """Seconds a reply may be cached; 0 when it must not be (RFC 2308 for negative answers)."""
    rcode = reply.rcode
    if reply.truncated or rcode not in (NOERROR, NXDOMAIN):
        return 0
    negative = reply.negative_ttl
    if negative is None and (rcode == NXDOMAIN or reply.answers == 0):
        return 0  # RFC 2308 5: a negative answer without an SOA is not cached
    lowest = min(ttl for _, ttl in reply.ttls) if reply.ttls else 0
    # A CNAME in front of NXDOMAIN or NODATA counts too: the SOA's negative TTL and every
    # record's own TTL bound the time (RFC 2308 5).
    return lowest if negative is None else min(lowest, negative)


_HEAD_SIZE = CachedReply.HEAD.size
_EXT_AT = CachedReply.STAMP.size  # in the head: ext_rcode, rcode, TTL count follow the stamp
_EXT_COUNT = struct.Struct(">BxH")
_ID_FLAGS = struct.Struct(">HH")


def client_reply(cached: CachedReply, query: Query, age: int = 0, stale_ttl: int = 0) -> bytes:
    """The cached reply as this client must see it: its ID, its question's case, aged TTLs, OPT.

    The one function both the cache-hit path and the forwarded path use, so both give the same
    bytes. A record whose TTL has run out by `age` shows `stale_ttl` (RFC 8767 4: an expired
    entry served while it is refreshed); on a fresh hit every TTL is above the age anyway.
    """
    ext_rcode, count = _EXT_COUNT.unpack_from(cached, _EXT_AT)
    start = _HEAD_SIZE + 2 * count
    buf = bytearray(cached[start:])  # for messages this small a slice beats a memoryview
    # We are a recursive service and no authority: RA set, AA clear, whatever the upstream
    # said (RFC 1035 4.1.1); RD and CD are the client's own (RFC 4035 3.2.2), Z is zero.
    query_flags = query.flags
    flags = ((U16.unpack_from(buf, 2)[0] & ~(AA | RD | CD | Z)) | RA
             | (query_flags & (RD | CD)))
    if not (query.do or query_flags & AD):
        flags &= ~AD  # RFC 6840 5.8: AD only for clients that show they understand it
    _ID_FLAGS.pack_into(buf, 0, query.id, flags)
    question = query.question
    buf[12 : 12 + len(question)] = question
    if age:
        for (off,) in U16.iter_unpack(cached[_HEAD_SIZE:start]):
            ttl = U32.unpack_from(buf, off)[0]
            U32.pack_into(buf, off, ttl - age if ttl > age else stale_ttl)
    if query.edns:
        U16.pack_into(buf, 10, U16.unpack_from(buf, 10)[0] + 1)
        buf += OUR_OPT[query.do] if ext_rcode == 0 else opt_record(query.do, ext_rcode)
    return bytes(buf)


def truncate_for(reply: bytes, query: Query) -> bytes:
    """A UDP reply cut to the client's buffer: header with TC, the question and our OPT.

    Every reply we send an EDNS client ends with our own option-less OPT, which carries the
    extended rcode: that record is kept as it is, so the cut reply keeps the full rcode.
    """
    if len(reply) <= query.udp_size:
        return reply
    flags = U16.unpack_from(reply, 2)[0] | TC
    out = HEADER.pack(query.id, flags, 1, 0, 0, 1 if query.edns else 0) + query.question
    if query.edns:
        tail = reply[-OPT_SIZE:]
        out += tail if tail[:3] == OPT_HEAD else opt_record(query.do)
    return out


def _reply_flags(query_flags: int, rcode: int) -> int:
    """Header flags of a reply we write: RA, RD and CD are defined for QUERY only, so a reply to
    any other opcode carries the opcode and the rcode alone."""
    opcode = query_flags & OPCODE_MASK
    if opcode:
        return QR | opcode | (rcode & RCODE_MASK)
    return QR | RA | (query_flags & (RD | CD)) | (rcode & RCODE_MASK)


def response(query: Query, rcode: int, answers: bytes = b"", ancount: int = 0,
             authoritative: bool = False) -> bytes:
    """A reply we write ourselves: errors, BADVERS, RFC 8482 ANY answers, CHAOS identity.

    `rcode` may be extended (BADVERS): its upper bits go in the OPT record, which an EDNS
    query always gets, of version 0 whatever the client's (RFC 6891 6.1.3).
    """
    flags = _reply_flags(query.flags, rcode)
    if authoritative:
        flags |= AA
    out = HEADER.pack(query.id, flags, 1, ancount, 0, 1 if query.edns else 0)
    out += query.question + answers
    if query.edns:
        out += opt_record(query.do, rcode >> 4)
    return out


def header_error(data: bytes, rcode: int) -> bytes | None:
    """`rcode` (FORMERR) for a message whose question we could not read; None if not even a
    header. An opcode other than QUERY gets NOTIMP instead: a message of a kind we do not
    implement is not ours to call malformed (opcode 15 has no question at all). Either reply
    carries an OPT if the client sent one we can find (RFC 6891 7)."""
    if len(data) < 12:
        return None
    qid, flags = struct.unpack_from(">HH", data)
    if flags & QR:
        return None  # never answer a response: that is how reflection loops start
    if flags & OPCODE_MASK:
        rcode = NOTIMP
    do = _client_opt_do(data)
    out = HEADER.pack(qid, _reply_flags(flags, rcode), 0, 0, 0, 0 if do is None else 1)
    return out if do is None else out + opt_record(do)


def _client_opt_do(data: bytes) -> bool | None:
    """The DO bit of the OPT record in a message we could not otherwise read, None if it has no
    OPT we can find: the rare error path only, never a query we answer normally."""
    try:
        qdcount, ancount, nscount, arcount = struct.unpack_from(">HHHH", data, 4)
        off = 12
        for _ in range(qdcount):
            off = skip_name(data, off) + 4
        for _ in range(ancount + nscount + arcount):
            start = off
            off = skip_name(data, off)
            rtype, _, ttl, rdlen = RR_FIXED.unpack_from(data, off)
            off += 10 + rdlen
            if rtype == TYPE_OPT and data[start] == 0 and off <= len(data):
                return bool(ttl & DO_BIT)
    except (WireError, struct.error):
        pass
    return None


def character_strings(*texts: str) -> bytes:
    out = b""
    for text in texts:
        raw = text.encode()[:255]
        out += bytes([len(raw)]) + raw
    return out


def resource_record(rtype: int, rclass: int, ttl: int, rdata: bytes) -> bytes:
    """A record whose owner is the question's name (a pointer to offset 12)."""
    return b"\xc0\x0c" + RR_FIXED.pack(rtype, rclass, ttl, len(rdata)) + rdata
