"""The UDP upstream's socket pool, with real sockets on loopback: queries share a socket (and so
a source port) up to its rotation limits, each with an ID no other query on it has had; replies
find their query by ID, out of order, and a forged or stray reply on a shared socket is dropped
without disturbing the other queries; an ICMP error fails only the query it quotes.

Each test runs on the default event loop and on uvloop (what the service runs on), whose
datagram transports report socket errors differently."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time

import pytest
from dnslib import EDNS0, QTYPE, RR, A, DNSRecord

from dnsproxy import wire
from dnsproxy.forgery import build_filters, load_forged_addresses
from dnsproxy.metrics import Metrics
from dnsproxy.querylog import NullLog
from dnsproxy.upstreams import PollutedNames, Telemetry, UdpUpstream, UpstreamError, udp

from .fakes import FORGED_LISTED, GENUINE, FakeUpstream, addresses, ask, free_port


def _uvloop_run(main):
    uvloop = pytest.importorskip("uvloop")
    return uvloop.run(main)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run a coroutine to completion on the event loop under test."""
    return asyncio.run if request.param == "asyncio" else _uvloop_run


class Pool:
    """A UdpUpstream with the default defences, and the counters it reports to."""

    def __init__(self, host: str, port: int, **options) -> None:
        self.metrics = Metrics()
        filters = build_filters(True, load_forged_addresses(), hijack=False)
        self.polluted = PollutedNames()
        self.upstream = UdpUpstream(host, port, Telemetry(self.metrics, NullLog()), filters,
                                    self.polluted, **options)

    async def ask(self, name: str, timeout: float = 3.0) -> wire.Reply:
        query = wire.parse_query(bytes(DNSRecord.question(name).pack()))
        deadline = asyncio.get_running_loop().time() + timeout
        return (await self.upstream.exchange(query, deadline)).reply

    def forgeries(self, reason: str) -> float:
        return sum(v for (n, labels), v in self.metrics.values.items()
                   if n == "dnsproxy_forgeries_total" and ("reason", reason) in labels)


def ports(upstream: FakeUpstream, names: list[str]) -> list[int]:
    by_name = {s.name: s.client[1] for s in upstream.seen}
    return [by_name[name + "."] for name in names]


# --- reuse and rotation ---


def test_queries_share_a_source_port_up_to_the_rotation_limit(upstream, run):
    async def main():
        pool = Pool(upstream.host, upstream.port, max_uses=4)
        for i in range(10):
            await pool.ask(f"n{i}.example")
        await pool.upstream.close()

    run(main())
    seen = [(s.client[1], s.id) for s in upstream.seen]
    assert len(seen) == 10
    by_socket = [seen[0:4], seen[4:8], seen[8:10]]
    assert [len({port for port, _ in group}) for group in by_socket] == [1, 1, 1]
    assert len({group[0][0] for group in by_socket}) == 3  # a new port after every 4 queries
    for group in by_socket:  # never two queries with one ID on one socket
        assert len({qid for _, qid in group}) == len(group)


def test_queries_at_once_beyond_the_limit_spread_over_sockets(upstream, run):
    """Ten queries at once, four per socket: three sockets, none carrying more than four."""
    upstream.default.delay = 0.2  # all ten are pending together

    async def main():
        pool = Pool(upstream.host, upstream.port, max_uses=4)
        await asyncio.gather(*(pool.ask(f"p{i}.example") for i in range(10)))
        await pool.upstream.close()

    run(main())
    per_port: dict[int, int] = {}
    for seen in upstream.seen:
        per_port[seen.client[1]] = per_port.get(seen.client[1], 0) + 1
    assert sorted(per_port.values()) == [2, 4, 4]


def test_a_socket_is_given_new_queries_for_max_age_only(upstream, run):
    async def main():
        pool = Pool(upstream.host, upstream.port, max_age=0.3)
        await pool.ask("first.example")
        await pool.ask("second.example")
        await asyncio.sleep(0.4)
        await pool.ask("third.example")
        await pool.upstream.close()

    run(main())
    first, second, third = ports(upstream, ["first.example", "second.example", "third.example"])
    assert first == second
    assert third != first


def test_a_retired_socket_is_closed_once_its_queries_are_done(upstream, run):
    async def main():
        pool = Pool(upstream.host, upstream.port, max_uses=2)
        for i in range(6):
            await pool.ask(f"c{i}.example")
        await asyncio.sleep(0.05)  # closing is one loop turn
        still_open = set(pool.upstream.sockets)
        spare = pool.upstream.spare
        await pool.upstream.close()
        await asyncio.sleep(0.05)
        return still_open, spare, len(pool.upstream.sockets)

    still_open, spare, after_close = run(main())
    # All three that carried their two queries are closed; what is left is the one opened
    # ahead for the next query, not used yet.
    assert still_open == {spare}
    assert spare.uses == 0
    assert after_close == 0


def test_retired_sockets_leave_no_cycles_for_the_collector(upstream, run):
    """Hundreds of sockets a second are opened and closed under load: each must be freed by
    reference counting when closed, not left as a cycle for the garbage collector."""

    async def main():
        pool = Pool(upstream.host, upstream.port, max_uses=2)
        for i in range(20):
            await pool.ask(f"g{i}.example")
        await pool.upstream.close()
        await asyncio.sleep(0.05)

    gc.collect()
    gc.disable()
    try:
        run(main())
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, udp._Socket)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


# --- concurrent queries on one socket ---


def test_concurrent_queries_get_distinct_ids_and_their_own_replies_out_of_order(upstream, run):
    names = [f"o{i}.example" for i in range(6)]
    for i, name in enumerate(names):  # the first asked is answered last
        upstream.rule(name, answers=[f"192.0.2.{100 + i}"], delay=0.05 * (len(names) - i))

    async def main():
        pool = Pool(upstream.host, upstream.port)
        tasks = []
        for name in names:
            tasks.append(asyncio.ensure_future(pool.ask(name)))
            await asyncio.sleep(0.005)  # asked in this order
        replies = await asyncio.gather(*tasks)
        await pool.upstream.close()
        return replies, pool

    replies, pool = run(main())
    got = [[wire_address(r) for r in [reply]] for reply in replies]
    assert got == [[f"192.0.2.{100 + i}"] for i in range(len(names))]
    assert len(set(ports(upstream, names))) == 1  # all on one socket
    assert len({s.id for s in upstream.seen}) == len(names)
    assert pool.forgeries("mismatch") == 0


def wire_address(reply: wire.Reply) -> str:
    assert len(reply.addresses) == 1
    return socket.inet_ntoa(reply.addresses[0])


def test_an_id_is_never_given_twice_on_one_socket(upstream, run, monkeypatch):
    """The random source repeats itself (as it may, one time in 65536): the second query on the
    socket skips the ID the first one had, even after the first is done, so a late reply to
    the first can never pass for the second's."""
    drawn = iter([7, 7, 7, 9, 9, 7, 11])
    monkeypatch.setattr(udp._ids, "next", lambda: next(drawn))
    upstream.default.delay = 0.1

    async def main():
        pool = Pool(upstream.host, upstream.port)
        await asyncio.gather(pool.ask("x1.example"), pool.ask("x2.example"))
        await pool.ask("x3.example")
        await pool.upstream.close()

    run(main())
    assert sorted(s.id for s in upstream.seen) == [7, 9, 11]
    assert len({s.client for s in upstream.seen}) == 1


# --- forged and stray replies on a shared socket ---


def forged_reply(qid: int, name: str, address: str) -> bytes:
    """A reply with our OPT echoed, as a careful injector would write it."""
    forged = DNSRecord.question(name)
    forged.header.id = qid
    reply = forged.reply()
    reply.add_answer(RR(name, QTYPE.A, ttl=3600, rdata=A(address)))
    reply.add_ar(EDNS0(udp_len=1232))
    return bytes(reply.pack())


def test_forged_replies_on_a_shared_socket_leave_the_other_queries_alone(upstream, run):
    """Two queries wait on one socket. Forged: A's ID with B's question, an ID never sent with
    A's question, and B's own ID and question with a known forged address. Each is dropped;
    only B, whose reply was forged in full, is checked over TCP and marked polluted; A gets its
    genuine reply over UDP as if nothing happened."""
    upstream.rule("a.example", answers=["192.0.2.1"], delay=0.6)
    upstream.rule("b.example", answers=["192.0.2.2"], delay=0.6)

    async def main():
        pool = Pool(upstream.host, upstream.port)
        task_a = asyncio.ensure_future(pool.ask("a.example"))
        task_b = asyncio.ensure_future(pool.ask("b.example"))
        for _ in range(100):
            if upstream.count("a.example") and upstream.count("b.example"):
                break
            await asyncio.sleep(0.01)
        seen = {s.name: s for s in upstream.seen}
        a, b = seen["a.example."], seen["b.example."]
        assert a.client == b.client  # one socket
        unused = next(i for i in range(1, 65536) if i not in (a.id, b.id))
        for data in (forged_reply(a.id, "b.example", "192.0.2.66"),
                     forged_reply(unused, "a.example", "192.0.2.66"),
                     forged_reply(b.id, "b.example", FORGED_LISTED)):
            upstream.udp.sendto(data, a.client)
        reply_a, reply_b = await asyncio.gather(task_a, task_b)
        for _ in range(300):  # B's genuine UDP reply comes after TCP answered it
            if pool.metrics.total("dnsproxy_upstream_late_replies_total"):
                break
            await asyncio.sleep(0.01)
        await pool.upstream.close()
        return reply_a, reply_b, pool

    reply_a, reply_b, pool = run(main())
    assert wire_address(reply_a) == "192.0.2.1"
    assert wire_address(reply_b) == "192.0.2.2"
    assert pool.forgeries("mismatch") == 2
    assert pool.forgeries("forged-address") == 1
    assert upstream.count("a.example", "tcp") == 0
    assert upstream.count("b.example", "tcp") == 1
    assert list(pool.polluted.keys) == [query_key("b.example")]  # B only
    # B's genuine UDP reply arrived after TCP had answered: late, not a forgery.
    assert pool.metrics.total("dnsproxy_upstream_late_replies_total") == 1


def query_key(name: str) -> bytes:
    return wire.parse_query(bytes(DNSRecord.question(name).pack())).key


# --- ICMP errors ---


class RawUpstream:
    """An upstream the test drives by hand: it can read a query, stop listening (so the next
    datagram to its port draws ICMP port unreachable), listen again and answer late."""

    def __init__(self, host: str = "127.0.0.6") -> None:
        self.host = host
        self.port = free_port(host)
        self.sock = self._bind()

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.host, self.port))
        sock.setblocking(False)
        return sock

    async def receive(self) -> tuple[bytes, tuple]:
        for _ in range(300):
            with contextlib.suppress(BlockingIOError):
                return self.sock.recvfrom(512)
            await asyncio.sleep(0.01)
        raise AssertionError("no query arrived")

    def stop(self) -> None:
        self.sock.close()

    def listen_again(self) -> None:
        self.sock = self._bind()

    def answer(self, data: bytes, client: tuple, address: str) -> None:
        query = DNSRecord.parse(data)
        reply = query.reply()
        reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=300, rdata=A(address)))
        reply.add_ar(EDNS0(udp_len=1232))
        self.sock.sendto(bytes(reply.pack()), client)


def test_icmp_error_fails_the_queries_on_its_socket_and_retires_it(run):
    """A waits on a socket; the upstream's port closes; B, sent on the same socket, draws ICMP
    port unreachable, which the kernel reports on the socket, naming no query: both fail at
    once (not at the 3 s deadline), and the next query goes out on a new port."""
    raw = RawUpstream()

    async def main():
        pool = Pool(raw.host, raw.port)
        task_a = asyncio.ensure_future(pool.ask("a.example"))
        _, first = await raw.receive()
        raw.stop()
        started = time.monotonic()
        results = await asyncio.gather(task_a, pool.ask("b.example"), return_exceptions=True)
        elapsed = time.monotonic() - started
        raw.listen_again()
        task_c = asyncio.ensure_future(pool.ask("c.example"))
        query_c, second = await raw.receive()
        raw.answer(query_c, second, "192.0.2.3")
        reply_c = await task_c
        await pool.upstream.close()
        return results, elapsed, first, second, reply_c, pool

    try:
        results, elapsed, first, second, reply_c, pool = run(main())
    finally:
        raw.stop()
    assert [getattr(r, "reason", r) for r in results] == ["refused", "refused"]
    assert elapsed < 1.0
    assert second != first  # the refused socket was retired
    assert wire_address(reply_c) == "192.0.2.3"
    assert pool.metrics.get("dnsproxy_upstream_errors_total", upstream=pool.upstream.name,
                            reason="refused") == 2


def test_icmp_error_leaves_queries_on_other_sockets_alone(run):
    """One socket per query (max_uses=1): the ICMP error B draws fails B only; A, waiting on
    its own socket, is answered when the port listens again."""
    raw = RawUpstream()

    async def main():
        pool = Pool(raw.host, raw.port, max_uses=1)
        task_a = asyncio.ensure_future(pool.ask("a.example"))
        query_a, client_a = await raw.receive()
        raw.stop()
        with pytest.raises(UpstreamError) as failed:
            await pool.ask("b.example")
        raw.listen_again()
        raw.answer(query_a, client_a, "192.0.2.1")
        reply_a = await task_a
        await pool.upstream.close()
        return failed.value, reply_a

    try:
        error, reply_a = run(main())
    finally:
        raw.stop()
    assert error.reason == "refused"
    assert wire_address(reply_a) == "192.0.2.1"


def test_icmp_error_spares_a_query_that_tcp_may_still_answer(upstream, run):
    """A forged reply sent A's question over TCP as well (slow here); the port then refuses
    B on the same socket: B fails, A waits on and gets TCP's answer."""
    upstream.rule("a.example", forgeries=("forged-address",), delay=5, tcp_delay=0.5)

    async def main():
        pool = Pool(upstream.host, upstream.port)
        task_a = asyncio.ensure_future(pool.ask("a.example"))
        for _ in range(100):
            if upstream.count("a.example", "tcp"):
                break
            await asyncio.sleep(0.01)
        upstream.close_udp()  # TCP stays
        with pytest.raises(UpstreamError) as failed:
            await pool.ask("b.example")
        reply_a = await task_a
        await pool.upstream.close()
        return failed.value, reply_a

    error, reply_a = run(main())
    assert error.reason == "refused"
    assert wire_address(reply_a) == GENUINE


def test_a_socket_that_got_refused_serves_again_once_the_port_answers(make_proxy):
    """Through the forwarder: ICMP refused gives SERVFAIL at once, and the same socket (an
    error is no reason to drop it) carries the next query normally once the port answers."""
    raw = RawUpstream("127.0.0.7")
    raw.stop()
    proxy = make_proxy("--upstream", f"{raw.host}:{raw.port}", "--timeout", "2")
    try:
        started = time.monotonic()
        assert ask(proxy.port, "dead.example").header.rcode == 2  # SERVFAIL, at once
        assert time.monotonic() - started < 1.0
        fake = FakeUpstream(raw.host, port=raw.port)
        try:
            assert addresses(ask(proxy.port, "alive.example")) == [GENUINE]
        finally:
            fake.close()
        proxy.sync()
        assert len(proxy.service.forwarding.forwarder.upstreams[0].sockets) == 1
    finally:
        raw.stop()
