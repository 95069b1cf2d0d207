"""The reply cache, through a running forwarder and a fake upstream on loopback."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import time

import pytest
from dnslib import AAAA, CNAME, NS, QTYPE, RCODE, RR, TXT, A, DNSRecord

from dnsproxy import wire
from dnsproxy.metrics import Metrics
from dnsproxy.pipeline import Request, Response
from dnsproxy.stages import cache as cache_stage
from dnsproxy.stages.cache import Cache

from .fakes import GENUINE, addresses, ask, send_raw

# The compiled UDP hit path and the Python one: the same behaviour (conftest.py).
pytestmark = pytest.mark.both_paths


def reasons(proxy) -> list[str]:
    return [line["reason"] for line in proxy.log_lines() if "rcode" in line]


def test_hit_counts_ttl_down(upstream, make_proxy):
    upstream.rule("ttl.example", ttl=300)
    proxy = make_proxy("--upstream", upstream.address)
    first = ask(proxy.port, "ttl.example")
    assert [rr.ttl for rr in first.rr] == [300]
    time.sleep(1.1)
    second = ask(proxy.port, "ttl.example")
    assert addresses(second) == [GENUINE]
    assert upstream.count("ttl.example") == 1
    assert 0 < second.rr[0].ttl <= 299
    assert reasons(proxy) == ["forwarded", "cached"]


def test_entry_expires_after_its_ttl(upstream, make_proxy):
    upstream.rule("short.example", ttl=1)
    proxy = make_proxy("--upstream", upstream.address, "--no-serve-stale")
    ask(proxy.port, "short.example")
    ask(proxy.port, "short.example")
    assert upstream.count("short.example") == 1
    time.sleep(1.2)
    assert addresses(ask(proxy.port, "short.example")) == [GENUINE]
    assert upstream.count("short.example") == 2


def test_max_ttl_caps_how_long_an_entry_is_kept(upstream, make_proxy):
    upstream.rule("long.example", ttl=3600)
    proxy = make_proxy("--upstream", upstream.address, "--max-ttl", "1", "--no-serve-stale")
    ask(proxy.port, "long.example")
    time.sleep(1.2)
    ask(proxy.port, "long.example")
    assert upstream.count("long.example") == 2


def test_cache_is_a_bounded_lru(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address, "--cache-size", "2")
    ask(proxy.port, "a.example")
    ask(proxy.port, "b.example")
    ask(proxy.port, "a.example")  # a is now the most recently used
    ask(proxy.port, "c.example")  # evicts b
    assert [upstream.count(n) for n in ("a.example", "b.example", "c.example")] == [1, 1, 1]
    ask(proxy.port, "a.example")
    ask(proxy.port, "c.example")
    assert upstream.count("a.example") == 1 and upstream.count("c.example") == 1
    ask(proxy.port, "b.example")
    assert upstream.count("b.example") == 2
    assert len(proxy.service.cache.entries) == 2


@pytest.mark.parametrize(("soa_ttl", "minimum"), [(300, 1), (1, 300)])
def test_nxdomain_is_cached_for_min_of_soa_ttl_and_minimum(upstream, make_proxy, soa_ttl,
                                                           minimum):
    """RFC 2308 5: the negative TTL is the lesser of the SOA's TTL and its MINIMUM; either
    way round, the entry lives one second, not 300."""
    upstream.rule("missing.example", rcode=RCODE.NXDOMAIN, ttl=soa_ttl, soa_minimum=minimum)
    proxy = make_proxy("--upstream", upstream.address, "--no-serve-stale")
    for _ in range(2):
        reply = ask(proxy.port, "missing.example")
        assert reply.header.rcode == RCODE.NXDOMAIN
        assert reply.rr == []
        assert [QTYPE[rr.rtype] for rr in reply.auth] == ["SOA"]
        assert reply.auth[0].rdata.times[-1] == minimum
    assert upstream.count("missing.example") == 1
    assert reasons(proxy) == ["forwarded", "cached"]
    time.sleep(1.2)
    assert ask(proxy.port, "missing.example").header.rcode == RCODE.NXDOMAIN
    assert upstream.count("missing.example") == 2


def test_nodata_is_cached(upstream, make_proxy):
    upstream.rule("nodata.example", answers=[], ttl=300, soa_minimum=300)
    proxy = make_proxy("--upstream", upstream.address)
    for _ in range(3):
        reply = ask(proxy.port, "nodata.example", "AAAA")
        assert reply.header.rcode == RCODE.NOERROR and reply.rr == []
        assert [QTYPE[rr.rtype] for rr in reply.auth] == ["SOA"]
    assert upstream.count("nodata.example") == 1


def test_servfail_from_upstream_is_not_cached(upstream, make_proxy):
    upstream.rule("broken.example", rcode=RCODE.SERVFAIL, answers=[])
    proxy = make_proxy("--upstream", upstream.address)
    for _ in range(2):
        assert ask(proxy.port, "broken.example").header.rcode == RCODE.SERVFAIL
    assert upstream.count("broken.example") == 2
    assert len(proxy.service.cache.entries) == 0


def test_key_is_case_insensitive_and_each_client_gets_its_own_case(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    first = ask(proxy.port, "EXAMPLE.com")
    second = ask(proxy.port, "example.COM")
    assert upstream.count("example.com") == 1
    assert str(first.q.qname) == "EXAMPLE.com."
    assert str(second.q.qname) == "example.COM."
    assert addresses(first) == addresses(second) == [GENUINE]


@pytest.mark.parametrize("first", [True, False])
def test_do_bit_is_part_of_the_key(upstream, make_proxy, first):
    """A reply fetched without DO (no signatures) never answers a DO query, and back."""
    proxy = make_proxy("--upstream", upstream.address)
    ask(proxy.port, "signed.example", do=first)
    ask(proxy.port, "signed.example", do=not first)
    assert [s.do for s in upstream.seen] == [first, not first]
    ask(proxy.port, "signed.example", do=True)
    ask(proxy.port, "signed.example", do=False)
    assert upstream.count("signed.example") == 2


def test_type_is_part_of_the_key(upstream, make_proxy):
    upstream.rule("dual.example", answers=[GENUINE, "2001:db8::10"])
    proxy = make_proxy("--upstream", upstream.address)
    assert addresses(ask(proxy.port, "dual.example", "A")) == [GENUINE]
    assert addresses(ask(proxy.port, "dual.example", "AAAA")) == ["2001:db8::10"]
    assert upstream.count("dual.example") == 2


def test_every_reply_carries_the_clients_own_id(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    for qid in (1, 2, 0xFFFF, 0, 12345):
        for tcp in (False, True):
            query = DNSRecord.question("ids.example", "A")
            query.header.id = qid
            reply = DNSRecord.parse(send_raw(proxy.port, bytes(query.pack()), tcp=tcp))
            assert reply.header.id == qid
            assert addresses(reply) == [GENUINE]
    assert upstream.count("ids.example") == 1


def test_cache_size_zero_disables_the_cache(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address, "--cache-size", "0")
    for _ in range(3):
        assert addresses(ask(proxy.port, "nocache.example")) == [GENUINE]
    assert upstream.count("nocache.example") == 3
    assert "cached" not in reasons(proxy)


BIG_PADDING = 400  # TXT records of 140 characters: a reply of about 61 KB, only over TCP


def _big(upstream, *names: str) -> None:
    for name in names:  # large answers come over TCP, as they do in life
        upstream.rule(name, padding=BIG_PADDING, truncate_udp=True)


def test_cache_is_bounded_in_bytes_as_well_as_entries(upstream, make_proxy):
    _big(upstream, "big0.example", "big1.example", "big2.example")
    proxy = make_proxy("--upstream", upstream.address, "--cache-bytes", "150000")  # two fit
    for name in ("big0.example", "big1.example", "big0.example", "big2.example"):
        reply = ask(proxy.port, name, "TXT", tcp=True)
        assert len(reply.rr) == BIG_PADDING
    # big1 was the least recently used when big2 came: it went, big0 and big2 stayed.
    before = {n: upstream.count(n, "tcp") for n in ("big0.example", "big1.example",
                                                     "big2.example")}
    for name in ("big0.example", "big2.example", "big1.example"):
        ask(proxy.port, name, "TXT", tcp=True)
    after = {n: upstream.count(n, "tcp") for n in before}
    assert after == {**before, "big1.example": before["big1.example"] + 1}
    held = proxy.metrics.gauges["dnsproxy_cache_bytes"]()
    assert 2 * 60000 < held <= 150000  # a 61 KB answer counts as 61 KB
    assert proxy.metrics.gauges["dnsproxy_cache_entries"]() == 2


def test_reply_larger_than_the_byte_budget_is_not_cached(upstream, make_proxy):
    _big(upstream, "huge.example")
    proxy = make_proxy("--upstream", upstream.address, "--cache-bytes", "50000")
    ask(proxy.port, "small.example")
    for _ in range(2):
        assert len(ask(proxy.port, "huge.example", "TXT", tcp=True).rr) == BIG_PADDING
    assert upstream.count("huge.example", "tcp") == 2  # asked again: never kept
    ask(proxy.port, "small.example")
    assert upstream.count("small.example", "udp") == 1  # and it evicted nothing
    assert proxy.metrics.gauges["dnsproxy_cache_bytes"]() < 1000


# --- serve stale, refresh behind; prefetch ---


def wait_for(condition, timeout: float = 5.0) -> None:
    """Refreshes run behind the answer: wait for what they do, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def refreshes(proxy, kind: str, result: str) -> float:
    return proxy.metrics.get("dnsproxy_cache_refreshes_total", kind=kind, result=result)


def test_stale_entry_is_answered_with_the_stale_ttl_and_refreshed_once(upstream, make_proxy):
    upstream.rule("stale.example", ttl=1)
    proxy = make_proxy("--upstream", upstream.address, "--stale-ttl", "7", "--no-prefetch")
    assert [rr.ttl for rr in ask(proxy.port, "stale.example").rr] == [1]
    time.sleep(1.2)
    upstream.rule("stale.example", ttl=1, delay=0.5)  # the refresh takes a while to answer
    for _ in range(4):  # all while the one refresh is on its way
        reply = ask(proxy.port, "stale.example")
        assert addresses(reply) == [GENUINE]
        assert [rr.ttl for rr in reply.rr] == [7]
    wait_for(lambda: refreshes(proxy, "stale", "stored") == 1)
    assert upstream.count("stale.example") == 2  # the first miss, and one refresh
    refreshed = ask(proxy.port, "stale.example")  # fresh again, from the refresh
    assert [rr.ttl for rr in refreshed.rr] == [1]
    assert upstream.count("stale.example") == 2
    assert reasons(proxy) == ["forwarded", *["stale"] * 4, "cached"]
    assert [line["cached"] for line in proxy.log_lines() if "rcode" in line][1] is True
    assert proxy.metrics.get("dnsproxy_responses_total", reason="stale") == 4


def handed_on(proxy) -> int:
    """Datagrams the compiled path left for the pipeline so far (0 on the Python path)."""
    proxy.sync()
    hit_path = proxy.service.hit_path
    return hit_path.handed_on if hit_path is not None else 0


def test_a_names_first_hit_is_answered_from_the_copy_stored_with_it(upstream, make_proxy):
    # The compiled path takes an upstream's answer as the cache stores it: the name's second
    # ask, a household's most common first hit, is not handed to Python.
    upstream.rule("second.example", ttl=60)
    proxy = make_proxy("--upstream", upstream.address)
    assert addresses(ask(proxy.port, "second.example")) == [GENUINE]
    wait_for(lambda: proxy.metrics.gauges["dnsproxy_cache_entries"]() == 1)  # stored after
    before = handed_on(proxy)
    for _ in range(2):
        assert addresses(ask(proxy.port, "second.example")) == [GENUINE]
    assert handed_on(proxy) == before
    assert reasons(proxy) == ["forwarded", "cached", "cached"]
    assert upstream.count("second.example") == 1


def hot_then_stale(upstream, make_proxy, name: str, *options: str):
    """A forwarder whose entry for `name` (TTL 1 s) was hit while fresh, so the compiled path
    holds a copy, and has just expired."""
    upstream.rule(name, ttl=1)
    proxy = make_proxy("--upstream", upstream.address, "--no-prefetch", *options)
    for _ in range(3):
        ask(proxy.port, name)
    time.sleep(1.2)
    return proxy


def test_a_hot_entry_gone_stale_is_answered_at_once_and_refreshed_once(upstream, make_proxy):
    # The compiled path answers the stale hits itself; the cache stage does the one refresh.
    proxy = hot_then_stale(upstream, make_proxy, "hot.example", "--stale-ttl", "7")
    upstream.rule("hot.example", ttl=1, delay=0.5)
    before = handed_on(proxy)
    for _ in range(4):  # all while the one refresh is on its way
        reply = ask(proxy.port, "hot.example")
        assert addresses(reply) == [GENUINE] and [rr.ttl for rr in reply.rr] == [7]
    assert handed_on(proxy) == before, "the compiled path answers stale hits itself"
    wait_for(lambda: refreshes(proxy, "stale", "stored") == 1)
    assert upstream.count("hot.example") == 2
    assert [rr.ttl for rr in ask(proxy.port, "hot.example").rr] == [1]  # the refreshed entry
    assert upstream.count("hot.example") == 2
    assert reasons(proxy) == ["forwarded", "cached", "cached", *["stale"] * 4, "cached"]
    assert proxy.metrics.get("dnsproxy_responses_total", reason="stale") == 4
    assert proxy.metrics.get("dnsproxy_cache_hits_total") == 7


def test_a_hot_entry_whose_refresh_fails_is_refreshed_again(upstream, make_proxy):
    proxy = hot_then_stale(upstream, make_proxy, "flaky.example", "--timeout", "0.5")
    upstream.rule("flaky.example", silent=True)
    for attempt in range(1, 3):
        reply = ask(proxy.port, "flaky.example")
        assert addresses(reply) == [GENUINE] and [rr.ttl for rr in reply.rr] == [30]
        wait_for(lambda attempt=attempt: refreshes(proxy, "stale", "failed") == attempt)
    assert upstream.count("flaky.example") == 3


def test_failing_refresh_keeps_the_stale_answer(upstream, make_proxy):
    upstream.rule("down.example", ttl=1)
    proxy = make_proxy("--upstream", upstream.address, "--timeout", "0.5")
    ask(proxy.port, "down.example")
    time.sleep(1.2)
    upstream.rule("down.example", silent=True)  # the upstream is gone
    for attempt in range(1, 3):
        reply = ask(proxy.port, "down.example")
        assert addresses(reply) == [GENUINE] and [rr.ttl for rr in reply.rr] == [30]
        wait_for(lambda attempt=attempt: refreshes(proxy, "stale", "failed") == attempt)
    assert upstream.count("down.example") == 3
    assert reasons(proxy) == ["forwarded", "stale", "stale"]


def test_entry_is_not_served_past_max_stale(upstream, make_proxy):
    upstream.rule("old.example", ttl=1)
    proxy = make_proxy("--upstream", upstream.address, "--max-stale", "1", "--timeout", "0.5")
    ask(proxy.port, "old.example")
    upstream.rule("old.example", silent=True)
    time.sleep(2.2)  # expired a second ago, and as long past max_stale
    assert ask(proxy.port, "old.example").header.rcode == RCODE.SERVFAIL
    assert reasons(proxy) == ["forwarded", "servfail"]


def test_no_serve_stale_asks_upstream_and_waits(upstream, make_proxy):
    upstream.rule("plain.example", ttl=1)
    proxy = make_proxy("--upstream", upstream.address, "--no-serve-stale")
    ask(proxy.port, "plain.example")
    time.sleep(1.2)
    assert [rr.ttl for rr in ask(proxy.port, "plain.example").rr] == [1]
    assert upstream.count("plain.example") == 2
    assert reasons(proxy) == ["forwarded", "forwarded"]


def test_prefetch_refreshes_once_in_the_last_tenth_of_the_ttl(upstream, make_proxy):
    upstream.rule("popular.example", ttl=2)
    proxy = make_proxy("--upstream", upstream.address, "--no-serve-stale")
    ask(proxy.port, "popular.example")
    ask(proxy.port, "popular.example")  # early in its TTL: no prefetch
    assert upstream.count("popular.example") == 1
    time.sleep(1.85)  # in the last tenth
    upstream.rule("popular.example", ttl=2, delay=0.1)
    for _ in range(3):  # answered from the cache, one prefetch for them all
        assert addresses(ask(proxy.port, "popular.example")) == [GENUINE]
    wait_for(lambda: refreshes(proxy, "prefetch", "stored") == 1)
    assert upstream.count("popular.example") == 2
    time.sleep(0.3)  # the first answer's TTL is over: the prefetched one serves
    assert [rr.ttl for rr in ask(proxy.port, "popular.example").rr] in ([1], [2])
    assert upstream.count("popular.example") == 2
    assert reasons(proxy) == ["forwarded", *["cached"] * 5]


def test_lowered_max_ttl_drops_what_would_exceed_it():
    """The forwarder caps TTLs when it stores; an entry from an older --max-ttl (a reload, a
    cache file) must not show clients more than the new cap allows: it is dropped, not kept."""
    def cached(name: str, ttl: int) -> tuple[bytes, wire.CachedReply]:
        query = DNSRecord.question(name)
        reply = query.reply()
        reply.add_answer(RR(name, rdata=A(GENUINE), ttl=ttl))
        data = reply.pack()
        key = Cache.key(wire.parse_query(query.pack()))
        return key, wire.strip_opt(data, wire.parse_reply(data))

    cache = Cache(16, Metrics(), max_ttl=86400)
    for name, ttl in (("long.example", 3600), ("short.example", 30)):
        assert cache.store(*cached(name, ttl))
    cache.cap_ttls(60)
    assert [wire.CachedReply(e).ttl for e in cache.entries.values()] == [30]
    assert not cache.store(*cached("long.example", 3600))  # nor does it come back in
    # Held as plain bytes, which the cyclic collector does not track: a full collection would
    # otherwise walk every entry of a large cache on the event loop.
    assert not any(gc.is_tracked(entry) for entry in cache.entries.values())


# --- purge: entries carrying an address now known as forged (pure logic, no sockets) ---

FORGED = "203.0.113.66"


def _stored(cache: Cache, name: str, build) -> bytes:
    """Store the reply `build(record, qname)` fills in for an A question about `name`."""
    query = DNSRecord.question(name, "A")
    record = query.reply()
    build(record, query.q.qname)
    data = bytes(record.pack())
    reply = wire.parse_reply(data)
    key = wire.question_key(reply.question) + b"\x00"
    assert cache.store(key, wire.strip_opt(data, reply))
    return key


def test_purge_drops_every_entry_carrying_the_address_in_any_section():
    cache = Cache(100, Metrics())
    keys = {
        "behind-cname": _stored(cache, "cdn.example", lambda r, q: (
            r.add_answer(RR(q, QTYPE.CNAME, ttl=60, rdata=CNAME("edge.example"))),
            r.add_answer(RR("edge.example", QTYPE.A, ttl=60, rdata=A(FORGED))))),
        "glue": _stored(cache, "glue.example", lambda r, q: (
            r.add_auth(RR(q, QTYPE.NS, ttl=60, rdata=NS("ns.glue.example"))),
            r.add_answer(RR(q, QTYPE.A, ttl=60, rdata=A(GENUINE))),
            r.add_ar(RR("ns.glue.example", QTYPE.A, ttl=60, rdata=A(FORGED))))),
        "aaaa": _stored(cache, "six.example", lambda r, q: (
            r.add_answer(RR(q, QTYPE.AAAA, ttl=60, rdata=AAAA("2001:db8::66"))))),
        # The address's four bytes inside a TXT string: no A record, so it stays.
        "bytes-in-txt": _stored(cache, "txt.example", lambda r, q: (
            r.add_answer(RR(q, QTYPE.TXT, ttl=60, rdata=TXT(bytes([203, 0, 113, 66])))))),
        "clean": _stored(cache, "clean.example", lambda r, q: (
            r.add_answer(RR(q, QTYPE.A, ttl=60, rdata=A(GENUINE))))),
    }
    forged = {ipaddress.ip_address(FORGED).packed, ipaddress.ip_address("2001:db8::66").packed}
    assert cache.purge(forged, "learned") == 3
    assert set(cache.entries) == {keys["bytes-in-txt"], keys["clean"]}
    assert cache.metrics.get("dnsproxy_cache_purged_total", why="learned") == 3
    assert cache.bytes == sum(len(k) + len(e) for k, e in cache.entries.items())
    # Kept out for a while: a reply judged before the address was known is not stored.
    assert not cache.store(keys["behind-cname"], _entry_for("cdn.example", FORGED))
    assert cache.store(keys["clean"], _entry_for("clean.example", GENUINE))


def _entry_for(name: str, address: str) -> wire.CachedReply:
    query = DNSRecord.question(name, "A")
    record = query.reply()
    record.add_answer(RR(query.q.qname, QTYPE.A, ttl=60, rdata=A(address)))
    data = bytes(record.pack())
    return wire.strip_opt(data, wire.parse_reply(data))


def test_addresses_learned_while_a_purge_runs_are_all_purged(monkeypatch):
    """A purge on the serving loop runs in slices. Addresses learned while one runs (two
    learns here, between its slices) wait for the next pass over the whole cache, which takes
    them both; each is barred at once, so no reply carrying one is stored meanwhile, and no
    entry carrying any of them is left."""
    monkeypatch.setattr(cache_stage, "SCAN_SLICE", 4)
    first, second, third = "203.0.113.1", "203.0.113.2", "203.0.113.3"
    cache = Cache(1000, Metrics())
    carriers = {address: [] for address in (first, second, third)}
    for i in range(60):  # one entry in five carries one of the addresses
        address = (first, second, third, GENUINE, GENUINE)[i % 5]
        key = _stored(cache, f"n{i}.example", lambda r, q, a=address: (
            r.add_answer(RR(q, QTYPE.A, ttl=60, rdata=A(a)))))
        if address != GENUINE:
            carriers[address].append(key)
    packed = {address: ipaddress.ip_address(address).packed for address in carriers}
    told: list[tuple[str, int]] = []
    refused: list[bool] = []
    served: list[bool] = []

    def ask(name: str) -> None:  # the pipeline's question to the cache, as a query would
        query = wire.parse_query(DNSRecord.question(name, "A").pack())
        served.append(cache.answer(Request(query, ("127.0.0.1", 53), "udp", 0.0)) is not None)

    async def learn_three() -> None:
        loop = asyncio.get_running_loop()
        cache.purge_soon({packed[first]}, "learned", lambda n: told.append((first, n)))
        assert cache.scans, "a cache of 60 entries takes more than one slice of 4"
        # A hit the pass has not reached yet is not served: n55 carries the first address.
        ask("n55.example")
        ask("n58.example")  # GENUINE: served
        # Between the first pass's slices: two more learns, and a reply carrying one of them.
        loop.call_soon(cache.purge_soon, {packed[second]}, "learned",
                       lambda n: told.append((second, n)))
        loop.call_soon(cache.purge_soon, {packed[third]}, "learned",
                       lambda n: told.append((third, n)))
        loop.call_soon(lambda: refused.append(not cache.store(
            carriers[third][0], _entry_for("n2.example", third))))
        while cache.scans:
            await asyncio.sleep(0)

    asyncio.run(learn_three())
    assert refused == [True]
    assert served == [False, True]
    assert not any(key in cache.entries for keys in carriers.values() for key in keys)
    assert len(cache.entries) == 24  # the GENUINE ones
    # The first pass took the first address; the next took both that came during it.
    assert told == [(first, 12), (second, 24), (third, 24)]
    assert cache.metrics.get("dnsproxy_cache_purged_total", why="learned") == 36
    assert cache.metrics.get("dnsproxy_cache_misses_total") == 1


class DictMirror:
    """The compiled path's copy of the cache, as a dict (stages/cache.py's Mirror)."""

    def __init__(self, room: int = 0) -> None:
        self.entries: dict[bytes, bytes] = {}
        self.room = room

    def put(self, key: bytes, entry: bytes) -> bool:
        self.entries[key] = entry
        return True

    def offer(self, key: bytes, entry: bytes) -> bool:
        if len(self.entries) >= self.room and key not in self.entries:
            return False
        return self.put(key, entry)

    def remove(self, key: bytes) -> None:
        self.entries.pop(key, None)

    def refreshed(self, key: bytes) -> None:
        pass

    def clear(self) -> None:
        self.entries.clear()


def test_the_compiled_copy_holds_only_what_the_cache_holds() -> None:
    """Pure logic: whatever the cache drops (replaced, evicted, capped, purged), its copy for
    the compiled hit path loses too; it takes an entry when stored while it has room, else
    once Python answered a hit from it, or a refresh stored it."""
    def reply(name: str, address: str, ttl: int = 300) -> wire.CachedReply:
        record = DNSRecord.question(name).reply()
        record.add_answer(RR(name, rdata=A(address), ttl=ttl))
        data = record.pack()
        return wire.strip_opt(data, wire.parse_reply(data))

    def hit(name: str) -> None:
        query = wire.parse_query(DNSRecord.question(name).pack())
        assert cache.answer(Request(query, ("127.0.0.1", 1), "udp", 0.0)) is not None

    def key(name: str) -> bytes:
        return Cache.key(wire.parse_query(DNSRecord.question(name).pack()))

    cache = Cache(2, Metrics())
    mirror = cache.mirror = DictMirror()  # no room for new entries
    cache.store(key("a.test"), reply("a.test", "192.0.2.1"))
    assert mirror.entries == {}, "no room: stored waits for its first hit"
    hit("a.test")
    assert set(mirror.entries) == {key("a.test")}
    cache.store(key("a.test"), reply("a.test", "192.0.2.2"))  # a refresh replaces it
    assert mirror.entries == {}
    hit("a.test")
    cache.store(key("b.test"), reply("b.test", "192.0.2.3"))
    cache.store(key("c.test"), reply("c.test", "192.0.2.4"))  # evicts a, the oldest
    assert key("a.test") not in cache.entries and mirror.entries == {}
    hit("b.test")
    cache.cap_ttls(60)  # a reload lowers --max-ttl: b (300 s) goes
    assert key("b.test") not in cache.entries and mirror.entries == {}
    cache.store(key("d.test"), reply("d.test", "192.0.2.5", ttl=30))
    hit("d.test")
    cache.purge({bytes([192, 0, 2, 5])}, "listed", guard=False)
    assert mirror.entries == {}
    # An upstream's answer waits for its first hit; a refresh's is copied at once.
    e_query = wire.parse_query(DNSRecord.question("e.test").pack())
    cache.observe(Request(e_query, ("127.0.0.1", 1), "udp", 0.0),
                  Response(None, "forwarded", 0, cacheable=reply("e.test", "192.0.2.6", ttl=30)))
    assert mirror.entries == {}

    async def refresher(query: wire.Query) -> wire.CachedReply:
        return reply("e.test", "192.0.2.7", ttl=30)

    cache.refresher = refresher
    asyncio.run(cache._fetch(key("e.test"), e_query, "stale"))
    assert mirror.entries == {key("e.test"): cache.entries[key("e.test")]}
    assert bytes([192, 0, 2, 7]) in mirror.entries[key("e.test")]
    # With room, a new entry is copied as it is stored; a replaced one anew, room or not.
    mirror.room = 2
    cache.store(key("f.test"), reply("f.test", "192.0.2.8", ttl=30))
    assert set(mirror.entries) == {key("e.test"), key("f.test")}
    cache.store(key("g.test"), reply("g.test", "192.0.2.9", ttl=30))  # evicts e; f is held
    assert set(mirror.entries) == {key("f.test"), key("g.test")}
    cache.store(key("h.test"), reply("h.test", "192.0.2.10", ttl=30))  # evicts f
    assert set(mirror.entries) == {key("g.test"), key("h.test")}


def stored(name: str) -> tuple[bytes, wire.CachedReply]:
    """A verified reply for `name`, with its cache key, as the forwarder would store it."""
    record = DNSRecord.question(name).reply()
    record.add_answer(RR(name, rdata=A("192.0.2.1"), ttl=300))
    data = record.pack()
    query = wire.parse_query(DNSRecord.question(name).pack())
    return Cache.key(query), wire.strip_opt(data, wire.parse_reply(data))


def test_the_compiled_hits_are_brought_in_before_a_new_entry_goes_in() -> None:
    """Pure logic: the compiled path's hits since the last take came before the new entry, so
    the cache brings them in before it stores it: the new entry is the most recent, kept and
    copied, and the least recent of the rest goes, with its copy."""
    cache = Cache(2, Metrics())
    mirror = cache.mirror = DictMirror(room=10)
    (a, a_reply), (b, b_reply), (c, c_reply) = map(stored, ["a.test", "b.test", "c.test"])
    cache.store(a, a_reply)
    cache.store(b, b_reply)
    cache.sync_mirror = lambda: cache.touch([a], 1)  # a hit meanwhile
    cache.store(c, c_reply)
    assert list(cache.entries) == [a, c]  # not taking the hit: [b, c]; after c went in: [c, a]
    assert set(mirror.entries) == {a, c}


def test_lower_limits_at_a_reload_evict_at_once_and_zero_empties_the_cache() -> None:
    """Pure logic: a reload lowering --cache-size or --cache-bytes drops what exceeds them
    there and then, the least recent first (the compiled path's hits counted in), copies and
    all; 0 turns the cache off, entries included, rather than leaving them answered."""
    cache = Cache(10, Metrics())
    mirror = cache.mirror = DictMirror(room=10)
    items = dict(map(stored, ["a.test", "b.test", "c.test", "d.test"]))
    a, b, c, d = items
    for key, cached in items.items():
        cache.store(key, cached)
    cache.sync_mirror = lambda: cache.touch([a], 1)  # a hit by the compiled path meanwhile
    cache.resize(3, cache.max_bytes)
    assert list(cache.entries) == [c, d, a] and set(mirror.entries) == {a, c, d}
    cache.resize(3, cache.bytes - 1)  # a byte too few: the least recent goes
    assert list(cache.entries) == [d, a] and set(mirror.entries) == {a, d}
    assert cache.bytes == sum(len(k) + len(v) for k, v in cache.entries.items())
    cache.resize(0, cache.max_bytes)
    assert not cache.entries and not mirror.entries and cache.bytes == 0
    assert not cache.store(b, items[b])


def test_a_refresh_asked_as_the_last_one_ends_is_started() -> None:
    """Pure logic: the compiled path may ask for a refresh between the end of a failed one and
    its done callback; that one must start (and stay listed), or the entry's flag in the
    compiled path stays set and the entry is served stale, never refreshed."""
    now = [0.0]
    cache = Cache(10, Metrics(), clock=lambda: now[0])
    cache.mirror = DictMirror()
    name = "late.test"
    data = DNSRecord.question(name).pack()
    key = Cache.key(wire.parse_query(data))
    record = DNSRecord.question(name).reply()
    record.add_answer(RR(name, rdata=A("192.0.2.1"), ttl=30))
    packed = record.pack()
    assert cache.store(key, wire.strip_opt(packed, wire.parse_reply(packed)))
    now[0] = 100.0  # stale
    calls: list[int] = []
    hold = asyncio.Event()

    async def refresher(query: wire.Query) -> None:
        calls.append(1)
        if len(calls) == 2:
            await hold.wait()
        return None  # failed

    cache.refresher = refresher

    async def main() -> None:
        cache.refresh_asked(key, data, "stale")
        await asyncio.sleep(0)  # the first runs and fails; its done callback is yet to run
        cache.refresh_asked(key, data, "stale")
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(calls) == 2 and key in cache.refreshing, "the second one is listed"
        hold.set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert not cache.refreshing

    asyncio.run(main())
