"""The household upstream over real sockets: per-name TTLs, the time in the address, OPT
echoed, TCP, the optional reply delay, and the arrivals it logs per port."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

from dnslib import EDNS0, QTYPE, DNSRecord

from bench import authority

from .conftest import udp_exchange


def test_a_answer_has_the_names_ttl_and_the_time_it_was_made(start_authority):
    up = start_authority()
    before = time.time()
    reply = DNSRecord.parse(udp_exchange(up.ports[0], DNSRecord.question("h7-t15.house.test")
                                         .pack()))
    after = time.time()
    assert reply.header.rcode == 0 and reply.header.aa
    (record,) = reply.rr
    assert record.ttl == 15 and str(record.rname) == "h7-t15.house.test."
    made = authority.decode_time(int(ipaddress.IPv4Address(str(record.rdata))), up.base, after)
    assert before - authority.TICK <= made <= after


def test_opt_is_echoed_only_when_asked(start_authority):
    up = start_authority()
    plain = DNSRecord.question("a-t60.house.test")
    with_opt = DNSRecord.question("a-t60.house.test")
    with_opt.add_ar(EDNS0(udp_len=1232))
    assert not [r for r in DNSRecord.parse(udp_exchange(up.ports[0], plain.pack())).ar
                if r.rtype == QTYPE.OPT]
    assert [r for r in DNSRecord.parse(udp_exchange(up.ports[0], with_opt.pack())).ar
            if r.rtype == QTYPE.OPT]


def test_other_types_get_an_empty_noerror(start_authority):
    up = start_authority()
    reply = DNSRecord.parse(udp_exchange(up.ports[0],
                                         DNSRecord.question("a-t60.house.test", "AAAA").pack()))
    assert reply.header.rcode == 0 and reply.rr == []


def test_tcp_is_served_and_counted_apart(start_authority):
    up = start_authority()
    query = DNSRecord.question("t-t30.house.test").pack()
    with socket.create_connection(("127.0.0.1", up.ports[0]), timeout=2) as conn:
        conn.sendall(struct.pack(">H", len(query)) + query)
        size = struct.unpack(">H", conn.recv(2))[0]
        reply = DNSRecord.parse(conn.recv(size))
    assert reply.rr[0].ttl == 30
    arrivals = up.arrivals()
    assert len(arrivals[f"{up.ports[0]}/tcp"]) == 1


def test_arrivals_are_logged_per_port_on_sigterm(start_authority):
    up = start_authority(count=2)
    for _ in range(3):
        udp_exchange(up.ports[0], DNSRecord.question("x-t3.house.test").pack())
    udp_exchange(up.ports[1], DNSRecord.question("y-t3.house.test").pack())
    arrivals = up.arrivals()
    # the readiness probe went to the last port
    assert len(arrivals[f"{up.ports[0]}/udp"]) == 3
    assert len(arrivals[f"{up.ports[1]}/udp"]) == 2
    assert all(up.base <= t <= time.time() for t in arrivals[f"{up.ports[0]}/udp"])


def test_delay_holds_each_reply(start_authority):
    up = start_authority(delay_ms=80)
    started = time.monotonic()
    udp_exchange(up.ports[0], DNSRecord.question("d-t3.house.test").pack())
    assert 0.075 <= time.monotonic() - started < 0.5
