"""Forwarding through real sockets: failover, deadlines, TCP, truncation, EDNS, IPv6."""

from __future__ import annotations

import socket
import time

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from .fakes import GENUINE, FakeUpstream, addresses, ask, free_port


def closed_port_address(host: str = "127.0.0.4") -> str:
    """A loopback address and port nobody listens on: UDP there gets ICMP port unreachable."""
    return f"{host}:{free_port(host)}"


def timed_ask(port: int, name: str, **kwargs):
    started = time.monotonic()
    reply = ask(port, name, **kwargs)
    return reply, time.monotonic() - started


# --- failover and deadlines ---


def test_silent_first_upstream_is_hedged_around(upstream, second_upstream, make_proxy):
    upstream.default.silent = True
    proxy = make_proxy("--upstream", upstream.address, "--upstream", second_upstream.address,
                       "--timeout", "2")
    reply, elapsed = timed_ask(proxy.port, "hedge.example")
    assert addresses(reply) == [GENUINE]
    assert elapsed < 1.0  # the hedge delay (0.3 s), far from the 2 s deadline
    assert upstream.count("hedge.example") == 1
    assert second_upstream.count("hedge.example") == 1
    assert [line["upstream"] for line in proxy.log_lines()] == [second_upstream.address]


def test_refusing_first_upstream_fails_over_at_once(second_upstream, make_proxy):
    dead = closed_port_address()
    proxy = make_proxy("--upstream", dead, "--upstream", second_upstream.address,
                       "--hedge-delay", "1.5", "--timeout", "3")
    reply, elapsed = timed_ask(proxy.port, "refused.example")
    assert addresses(reply) == [GENUINE]
    assert elapsed < 1.0  # ICMP refused: no need to wait for the 1.5 s hedge
    assert proxy.metrics.get("dnsproxy_upstream_errors_total", upstream=dead,
                             reason="refused") == 1


def test_all_upstreams_silent_gives_servfail_by_the_deadline_then_recovers(
        upstream, second_upstream, make_proxy):
    upstream.default.silent = True
    second_upstream.default.silent = True
    proxy = make_proxy("--upstream", upstream.address, "--upstream", second_upstream.address,
                       "--timeout", "1")
    reply, elapsed = timed_ask(proxy.port, "down.example")
    assert reply.header.rcode == RCODE.SERVFAIL  # never NXDOMAIN
    assert reply.rr == []
    assert 0.9 <= elapsed < 1.5
    assert upstream.count("down.example") == 1 and second_upstream.count("down.example") == 1
    # Nothing was cached: once the upstreams are back, so are the answers.
    upstream.default.silent = False
    second_upstream.default.silent = False
    reply = ask(proxy.port, "down.example")
    assert reply.header.rcode == RCODE.NOERROR and addresses(reply) == [GENUINE]


def test_all_upstreams_refusing_gives_servfail(make_proxy):
    proxy = make_proxy("--upstream", closed_port_address("127.0.0.4"),
                       "--upstream", closed_port_address("127.0.0.5"), "--timeout", "1")
    for tcp in (False, True):
        reply, elapsed = timed_ask(proxy.port, "nobody.example", tcp=tcp)
        assert reply.header.rcode == RCODE.SERVFAIL
        assert elapsed < 1.5
    assert [line["rcode"] for line in proxy.log_lines()] == ["SERVFAIL", "SERVFAIL"]


def test_single_dead_upstream_comes_back(upstream, make_proxy):
    upstream.default.silent = True
    proxy = make_proxy("--upstream", upstream.address, "--timeout", "0.5")
    for _ in range(3):  # enough failures to be marked down
        assert ask(proxy.port, "flaky.example").header.rcode == RCODE.SERVFAIL
    upstream.default.silent = False
    assert addresses(ask(proxy.port, "flaky.example")) == [GENUINE]


def test_slow_upstream_is_still_answered(upstream, make_proxy):
    upstream.rule("slow.example", delay=0.5)
    proxy = make_proxy("--upstream", upstream.address)
    reply, elapsed = timed_ask(proxy.port, "slow.example")
    assert addresses(reply) == [GENUINE]
    assert elapsed < 2.5


def test_two_healthy_upstreams_only_the_first_is_asked(upstream, second_upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address, "--upstream", second_upstream.address,
                       "--cache-size", "0")
    for i in range(5):
        assert addresses(ask(proxy.port, f"n{i}.example")) == [GENUINE]
    assert upstream.count() == 5
    assert second_upstream.count() == 0


# --- TCP ---


def test_truncated_udp_reply_is_retried_over_tcp(upstream, make_proxy):
    upstream.rule("tc.example", truncate_udp=True, answers=[GENUINE, "192.0.2.11"])
    proxy = make_proxy("--upstream", upstream.address)
    reply = ask(proxy.port, "tc.example")
    assert reply.header.tc == 0
    assert addresses(reply) == [GENUINE, "192.0.2.11"]
    assert upstream.count("tc.example", "udp") == 1
    assert upstream.count("tc.example", "tcp") == 1


def test_tcp_upstream(upstream, make_proxy):
    upstream.default.silent_udp = True
    proxy = make_proxy("--upstream", f"tcp://{upstream.address}")
    for tcp in (False, True):
        assert addresses(ask(proxy.port, "stream.example", tcp=tcp, do=tcp)) == [GENUINE]
    assert upstream.count(transport="udp") == 0
    assert upstream.count("stream.example", "tcp") == 2
    assert [line["upstream"] for line in proxy.log_lines()] == [f"tcp://{upstream.address}"] * 2


@pytest.mark.parametrize(("edns", "bufsize", "padding"), [(True, 1232, 10), (False, 512, 4)])
def test_reply_larger_than_client_buffer_is_truncated_then_served_over_tcp(
        upstream, make_proxy, edns, bufsize, padding):
    upstream.rule("big.example", padding=padding)
    proxy = make_proxy("--upstream", upstream.address)
    query = DNSRecord.question("big.example", "A")
    from dnslib import EDNS0

    if edns:
        query.add_ar(EDNS0(udp_len=bufsize))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(bytes(query.pack()), ("127.0.0.1", proxy.port))
        raw = sock.recv(65535)
    assert len(raw) <= bufsize
    cut = DNSRecord.parse(raw)
    assert cut.header.tc == 1 and cut.header.id == query.header.id
    assert cut.rr == []
    assert [rr.rtype == QTYPE.OPT for rr in cut.ar] == ([True] if edns else [])
    full = ask(proxy.port, "big.example", tcp=True, edns=edns, bufsize=bufsize)
    assert full.header.tc == 0
    assert len(full.rr) == padding + 1
    assert addresses(full) == [GENUINE]
    assert len(full.pack()) > bufsize
    assert upstream.count("big.example") == 1  # the TCP retry was a cache hit


def test_reply_that_fits_is_not_truncated(upstream, make_proxy):
    upstream.rule("mid.example", padding=4)  # about 700 bytes
    proxy = make_proxy("--upstream", upstream.address)
    reply = ask(proxy.port, "mid.example", bufsize=1232)
    assert reply.header.tc == 0 and len(reply.rr) == 5


# --- EDNS ---


@pytest.mark.parametrize("do", [True, False])
def test_clients_do_bit_is_carried_upstream(upstream, make_proxy, do):
    proxy = make_proxy("--upstream", upstream.address)
    reply = ask(proxy.port, "do.example", do=do, bufsize=4096)
    (seen,) = upstream.seen
    assert seen.has_opt and seen.do is do
    # Upstream we advertise our own buffer (DNS flag day 2020), whatever the client's was.
    assert seen.udp_size == 1232
    (opt,) = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    assert bool(opt.ttl & 0x8000) is do


def test_upstream_gets_opt_even_when_the_client_sent_none(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    reply = ask(proxy.port, "plain.example", edns=False)
    assert addresses(reply) == [GENUINE]
    assert reply.ar == []  # no OPT for a client that sent none
    (seen,) = upstream.seen
    assert seen.has_opt and not seen.do


def test_client_random_ports_and_ids_upstream(upstream, make_proxy):
    """Sockets are pooled (test_udp_pool has the rotation limits): 30 misses in a row share a
    port or two, and every query has its own random ID, not a counter."""
    proxy = make_proxy("--upstream", upstream.address, "--cache-size", "0")
    n = 30
    for i in range(n):
        ask(proxy.port, f"r{i}.example")
    ports = {s.client[1] for s in upstream.seen}
    ids = [s.id for s in upstream.seen]
    assert len(upstream.seen) == n
    assert len(ports) <= 2  # two only if a socket's 2 s ran out during the run
    assert len(set(ids)) >= n - 1  # never repeated on one socket
    steps = {(b - a) & 0xFFFF for a, b in zip(ids, ids[1:], strict=False)}
    assert len(steps) > 1  # not a counter


# --- what passes through ---


def test_aaaa_passed_through(upstream, make_proxy):
    upstream.rule("v6.example", answers=["2001:db8::53", "2001:db8::54"])
    proxy = make_proxy("--upstream", upstream.address)
    reply = ask(proxy.port, "v6.example", "AAAA")
    assert addresses(reply) == ["2001:db8::53", "2001:db8::54"]
    assert all(rr.rtype == QTYPE.AAAA for rr in reply.rr)


def test_cname_chain_passed_through(upstream, make_proxy):
    upstream.rule("alias.example", cname="target.example.", answers=[GENUINE])
    proxy = make_proxy("--upstream", upstream.address)
    reply = ask(proxy.port, "alias.example")
    assert [(str(rr.rname), QTYPE[rr.rtype], str(rr.rdata)) for rr in reply.rr] == [
        ("alias.example.", "CNAME", "target.example."),
        ("target.example.", "A", GENUINE),
    ]


def test_nxdomain_with_soa_passed_through(upstream, make_proxy):
    upstream.rule("gone.example", rcode=RCODE.NXDOMAIN)
    proxy = make_proxy("--upstream", upstream.address)
    reply = ask(proxy.port, "gone.example")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert [QTYPE[rr.rtype] for rr in reply.auth] == ["SOA"]
    assert str(reply.auth[0].rdata.mname) == "ns.example."
    assert proxy.log_lines()[-1]["rcode"] == "NXDOMAIN"


# --- IPv6 ---


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback (::1) here")
def test_ipv6_on_both_sides(make_proxy):
    up = FakeUpstream("::1")
    try:
        up.rule("six.example", answers=["2001:db8::6"])
        proxy = make_proxy("--upstream", up.address, host="::1")
        assert up.address.startswith("[::1]:")
        for tcp in (False, True):
            reply = ask(proxy.port, "six.example", "AAAA", host="::1", tcp=tcp)
            assert addresses(reply) == ["2001:db8::6"]
        assert up.count("six.example", "udp") == 1
        assert up.seen[0].client[0] == "::1"
        assert [line["client"] for line in proxy.log_lines()] == ["::1", "::1"]
    finally:
        up.close()


def test_health_backoff_survives_thousands_of_failures():
    """A flood of queries to a dead upstream counts failures into the thousands: the backoff
    must stay bounded (it once overflowed a float and turned every answer into a traceback)."""
    from dnsproxy.forwarder import MAX_DOWN_SECONDS, Health

    health = Health()
    for _ in range(5000):
        health.failed(1000.0)
    assert health.down_until == 1000.0 + MAX_DOWN_SECONDS
    health.succeeded()
    assert (health.failures, health.down_until) == (0, 0.0)


def test_silent_first_upstream_loses_its_place(upstream, second_upstream, make_proxy):
    """Hedged around three times, a black-holed first upstream is put to the back: later
    queries go to the second at once instead of waiting out the hedge delay each time."""
    upstream.default.silent = True
    proxy = make_proxy("--upstream", upstream.address, "--upstream", second_upstream.address)
    for i in range(3):
        assert addresses(ask(proxy.port, f"hedge{i}.example")) == [GENUINE]
    asked_before = upstream.count()
    for i in range(3):
        reply, elapsed = timed_ask(proxy.port, f"later{i}.example")
        assert addresses(reply) == [GENUINE]
        assert elapsed < 0.2  # no hedge delay: the second upstream is asked first
    assert upstream.count() == asked_before


def test_stalled_tcp_connection_is_replaced(upstream, make_proxy):
    """A query that times out on a connection that has not delivered a byte since gives the
    connection up (it may be half-open); the next query opens a fresh one."""
    upstream.rule("stall.example", silent=True)
    proxy = make_proxy("--upstream", f"tcp://{upstream.address}", "--timeout", "1")
    assert ask(proxy.port, "stall.example").header.rcode == RCODE.SERVFAIL
    assert addresses(ask(proxy.port, "after.example")) == [GENUINE]
    ports = {seen.client[1] for seen in upstream.seen if seen.transport == "tcp"}
    assert len(ports) == 2
