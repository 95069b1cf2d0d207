"""A bounded LRU cache of upstream replies, answered from wire bytes.

Keyed on the question (the name lower-cased, type, class) and the DO and CD bits, so a
DNSSEC-aware client never gets a reply stripped of signatures that was fetched for one that is
not, nor a client relying on validation one fetched with checking disabled. Entries hold the
reply without its OPT record; `wire.client_reply` patches the ID, the question's case and the
aged TTLs for each hit, the same function the miss path uses, so both give the same bytes.

Two bounds hold at once, evicting the least recently used first: the number of entries, and
their bytes (key and stored reply), so a few 64 KiB TCP answers weigh what they really cost.
A reply larger than the whole byte budget is not kept at all.

Popular names should never miss (RFC 8767 style, as unbound and dnsmasq do it):
- serve stale: an expired entry is answered at once, its run-out TTLs showing `stale_ttl`,
  while one refresh goes upstream; it is kept up to `max_stale` past its expiry, and a refresh
  that fails leaves it in place until then;
- prefetch: a hit in the last tenth of an entry's TTL refreshes it before it expires.
Refreshes are deduplicated per key, bounded in number, and go through `refresher` (the
forwarder), which returns only replies the forgery defences verified: as with what `observe`
keeps, nothing else ever enters the cache, so nothing else can be served stale.

A forgery shaped like a genuine reply may pass every defence and be cached. When one of its
addresses becomes known as forged later (learned, listed by a reload, or on the lists when a
cache file is read), `purge` drops every entry carrying it, in any section, and for a while
refuses to store a reply carrying it: a query or refresh already in flight may have been judged
before the address was known (by the configuration a reload replaced, say).

Once the loop serves, such a scan of the whole cache (100k entries) runs in slices of
SCAN_SLICE entries, one per loop step, so queries are answered between them: an injector whose
caught forgery teaches forty addresses must not stop the loop for the length of forty scans.
The addresses are barred at once, so nothing carrying them is stored while the scan runs over
the keys that were cached when it began, and a hit on an entry it has not reached yet is
checked on its own (so none is served once its address is known); addresses coming meanwhile
wait for the next pass, which takes every address that came while the one before ran. A
reload that changes which names go where (`forget_soon`) scans the same way, refusing meanwhile
to store answers for the names it forgets: the old upstreams' answers still in flight would
otherwise come back.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from .. import wire
from ..metrics import Metrics
from ..pipeline import PassThrough, Request, Response

# Refreshes in flight at once: beyond, an expired entry is still served stale, just not
# refreshed by this query (the next one tries again), so a burst cannot flood the upstreams.
MAX_REFRESHES = 100
PREFETCH_AT = 0.9  # of the TTL: the last tenth
# The byte after the question in a cache key, by DO then CD: 1 for DO, 2 for CD.
KEY_SUFFIX = {False: (b"\x00", b"\x02"), True: (b"\x01", b"\x03")}
# Seconds a purged address is kept out of the cache: longer than any query or refresh in flight
# when it was purged may take (their deadline is the --timeout, 2 s by default).
PURGE_GUARD = 60.0
# Above this many barred addresses, a store parses the reply rather than search it for each.
PURGE_SEARCH_MAX = 8
# Entries a scan (purge, forget) looks at per event-loop step once the loop serves. At 100k
# entries (bench/purge.py, a busy 2-core machine): a purge's slice about 0.6 ms, a forget's 1.2,
# the first step (the keys taken too) under 3.5; the whole pass 35-70 ms, for 1 address as for 40.
SCAN_SLICE = 1000

Refresher = Callable[[wire.Query], Awaitable["wire.CachedReply | None"]]


class Mirror(Protocol):
    """The compiled hit path's copy of the entries (dnsproxy._native.FastPath)."""

    def put(self, key: bytes, entry: bytes) -> bool: ...

    def offer(self, key: bytes, entry: bytes) -> bool: ...

    def remove(self, key: bytes) -> None: ...

    def clear(self) -> None: ...

    def refreshed(self, key: bytes) -> None: ...


class Cache(PassThrough):
    name = "cache"

    def __init__(self, size: int, metrics: Metrics, max_ttl: int = 86400,
                 clock=time.monotonic, max_bytes: int = 32 * 1024 * 1024,
                 serve_stale: bool = True, stale_ttl: int = 30, max_stale: int = 86400,
                 prefetch: bool = True) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0  # len(key) + len(entry) over all entries
        self.max_ttl = max_ttl
        self.serve_stale = serve_stale
        self.stale_ttl = stale_ttl
        self.max_stale = max_stale
        self.prefetch = prefetch
        self.refresher: Refresher | None = None  # set once the forwarder is built
        self.refreshing: dict[bytes, asyncio.Task] = {}  # by key: one refresh each at most
        self.metrics = metrics
        self.clock = clock
        # Stamped replies as plain bytes (CachedReply(entry) reads one): untracked by the
        # garbage collector, whose full collections would otherwise walk every entry.
        self.entries: OrderedDict[bytes, bytes] = OrderedDict()
        self.barred: dict[bytes, float] = {}  # purged addresses -> until when (clock) not stored
        # Names being forgotten (a reload rerouted them): what says so, and until when (clock)
        # answers for them are not stored.
        self.rerouting: list[tuple[Callable[[bytes], bool], float]] = []
        self.scans: deque[Scan] = deque()  # the first is running, the others wait their turn
        # The compiled hit path's table (dnsproxy/fastpath.py): a copy of the newest stored
        # entries and of each Python answered a hit from or refreshed (the hot ones), kept in
        # step with `entries`: what is dropped here is removed there.
        self.mirror: Mirror | None = None
        self.sync_mirror: Callable[[], None] | None = None  # its hits' LRU order, brought in
        self.counts = metrics.values
        self.hits = metrics.key("dnsproxy_cache_hits_total")
        self.misses = metrics.key("dnsproxy_cache_misses_total")
        self.stale = metrics.key("dnsproxy_responses_total", reason="stale")
        metrics.gauge("dnsproxy_cache_entries", lambda: len(self.entries))
        metrics.gauge("dnsproxy_cache_bytes", lambda: self.bytes)

    @staticmethod
    def key(query: wire.Query) -> bytes:
        # DO: a validating client must not get a reply stripped of signatures. CD: replies the
        # upstream did not validate must not reach clients that rely on its validation.
        return query.key + KEY_SUFFIX[query.do][bool(query.flags & wire.CD)]

    def answer(self, request: Request) -> Response | None:
        query = request.query
        key = query.key + KEY_SUFFIX[query.do][bool(query.flags & wire.CD)]  # self.key, inlined
        cached = self.entries.get(key)
        if cached is None or (self.scans and self._doomed_meanwhile(key, cached)):
            self.counts[self.misses] += 1
            return None
        stored, ttl = wire.CachedReply.STAMP.unpack_from(cached)
        age = self.clock() - stored
        if age < ttl * PREFETCH_AT:  # the common case, kept short
            self.entries.move_to_end(key)
            self.counts[self.hits] += 1
            if self.mirror is not None and not self.scans:
                self.mirror.put(key, cached)  # the next hit is the compiled path's
            reply = wire.client_reply(cached, query, int(age))
            return Response(reply, "cached", reply[3] & wire.RCODE_MASK)
        return self._ageing(request, key, cached, ttl, age)

    def _ageing(self, request: Request, key: bytes, cached: wire.CachedReply, ttl: int,
                age: float) -> Response | None:
        """An entry near or past its expiry: prefetched, served stale, or dropped."""
        query = request.query
        if age < ttl:
            if self.prefetch:
                self._refresh(key, query, "prefetch")
            reason, stale_ttl = "cached", 0
        elif self.serve_stale and age < ttl + self.max_stale:
            self._refresh(key, query, "stale")
            self.counts[self.stale] += 1
            reason, stale_ttl = "stale", self.stale_ttl
        else:
            self._drop(key)
            self.counts[self.misses] += 1
            return None
        self.entries.move_to_end(key)
        self.counts[self.hits] += 1
        reply = wire.client_reply(cached, query, int(age), stale_ttl)
        return Response(reply, reason, reply[3] & wire.RCODE_MASK)

    def _refresh(self, key: bytes, query: wire.Query, kind: str) -> bool:
        """Fetch `key`'s entry anew unless that is under way; whether it is now. A refresh
        that has ended counts as over even before its done callback ran: the compiled path
        may ask again in between, and must then get a new one."""
        running = self.refreshing.get(key)
        if running is not None and not running.done():
            return True
        if self.refresher is None or len(self.refreshing) >= MAX_REFRESHES:
            return False
        task = asyncio.get_running_loop().create_task(self._fetch(key, query, kind))
        self.refreshing[key] = task
        task.add_done_callback(functools.partial(self._refresh_done, key))
        return True

    def _refresh_done(self, key: bytes, task: asyncio.Task) -> None:
        if self.refreshing.get(key) is task:  # not a newer one started since it ended
            del self.refreshing[key]

    def refresh_asked(self, key: bytes, data: bytes, kind: str) -> None:
        """The compiled path answered `data` from `key`'s entry near or past its expiry
        (`kind`: prefetch, stale): the refresh this stage's own answer would have started,
        unless the entry is gone or fresh again meanwhile. Whatever does not start one (or
        raises) tells the compiled path to ask again at the next hit."""
        started = False
        try:
            cached = self.entries.get(key)
            if cached is None:
                return
            stored, ttl = wire.CachedReply.STAMP.unpack_from(cached)
            if self.clock() - stored < ttl * PREFETCH_AT:
                return
            started = self._refresh(key, wire.parse_query(data), kind)
        finally:
            if not started and self.mirror is not None:
                self.mirror.refreshed(key)

    async def _fetch(self, key: bytes, query: wire.Query, kind: str) -> None:
        stored = False
        try:
            cached = await self.refresher(query)
            # A failure (or a reply not to be cached) leaves the old entry to serve stale.
            stored = cached is not None and self.store(key, cached, hot=True)
            self.metrics.inc("dnsproxy_cache_refreshes_total", kind=kind,
                             result="stored" if stored else "failed")
        finally:
            # A new entry replaced the compiled path's copy; else it asks again when due.
            if not stored and self.mirror is not None:
                self.mirror.refreshed(key)

    def close(self) -> None:
        """Cancel the refreshes in flight: the forwarder they use is closing."""
        for task in list(self.refreshing.values()):
            task.cancel()

    def observe(self, request: Request, response: Response) -> None:
        cached = response.cacheable
        if cached is not None:
            self.store(self.key(request.query), cached)

    def store(self, key: bytes, cached: wire.CachedReply, stored: float | None = None,
              hot: bool = False) -> bool:
        """Keep a verified reply (stamped `stored`, by default now); False if it may not be.
        `hot`: a refresh of an entry clients asked for, copied to the compiled path's table
        whether it has room for new names or not."""
        # The forwarder capped every TTL at max_ttl already; what exceeds it comes from an older
        # configuration (a reload, a cache file) and would show clients more than they may see.
        if self.size <= 0 or not 0 < cached.ttl <= self.max_ttl:
            return False
        if self.barred and self._carries_barred(cached):
            return False
        if self.rerouting and self._rerouted(key):
            return False
        self._drop(key)  # a newer reply replaces the old, whatever their sizes
        weight = len(key) + len(cached)
        if weight > self.max_bytes:
            return False  # it would evict everything else and still not fit
        self._make_room(1, weight)  # before it goes in: it is the most recent
        entry = self.entries[key] = cached.stamped_bytes(self.clock() if stored is None
                                                         else stored)
        self.bytes += weight
        mirror = self.mirror
        if mirror is not None and not self.scans:
            # A name's second ask, its first hit, is then the compiled path's too (a bounded
            # number of new entries wait there for it; hot ones are copied in any case).
            if hot:
                mirror.put(key, entry)
            else:
                mirror.offer(key, entry)
        return True

    def resize(self, size: int, max_bytes: int) -> None:
        """New limits (a reload): what exceeds them goes now, the least recent first, rather
        than being answered on until stores push it out; a size of 0 empties the cache."""
        self.size, self.max_bytes = size, max_bytes
        self._make_room(0, 0)

    def _make_room(self, count: int, weight: int) -> None:
        """The least recently used go, and their copies, until `count` more entries of
        `weight` bytes fit. The compiled path's hits since they were last taken count as
        used: they are brought in first."""
        entries = self.entries
        if len(entries) + count <= self.size and self.bytes + weight <= self.max_bytes:
            return
        if self.sync_mirror is not None:
            self.sync_mirror()
        mirror = self.mirror
        while entries and (len(entries) + count > self.size
                           or self.bytes + weight > self.max_bytes):
            old_key, old = entries.popitem(last=False)
            self.bytes -= len(old_key) + len(old)
            if mirror is not None:
                mirror.remove(old_key)

    def touch(self, keys: list[bytes], hits: int, stale: int = 0) -> None:
        """Hits the compiled path answered (`stale` of them past expiry): counted, and their
        keys made the most recent."""
        self.counts[self.hits] += hits
        self.counts[self.stale] += stale
        entries = self.entries
        for key in keys:
            if key in entries:
                entries.move_to_end(key)

    def forget(self, claimed: Callable[[bytes], bool], why: str) -> int:
        """Drop every entry whose key `claimed` says is no longer the upstreams' to answer
        (names a new configuration sends elsewhere); counted by `why`, the number dropped. A
        scan of the whole cache at once: at start-up, before the loop serves."""
        scan = Scan(why, None, claimed=claimed, keys=list(dict.keys(self.entries)))
        return self._finish(scan, all_at_once=True)

    def forget_soon(self, claimed: Callable[[bytes], bool], why: str, guard: float,
                    done: Callable[[int], None] | None = None) -> None:
        """`forget` in slices on the running loop; answers for the names `claimed` are not
        stored for `guard` seconds (and not before the scan ends), so an old upstream's answer
        in flight does not come back. `done` is told the number dropped."""
        self.rerouting.append((claimed, self.clock() + guard))
        self._queue(Scan(why, None, claimed=claimed, done=[done] if done else []))

    def purge(self, addresses: set[bytes], why: str, guard: bool = True) -> int:
        """Drop every entry carrying one of `addresses` (packed A/AAAA data) in any section,
        and, with `guard`, keep them out for PURGE_GUARD seconds (needless when nothing can
        be in flight: at start-up); counted by `why`, the number dropped. A scan of the whole
        cache at once: at start-up, before the loop serves (else `purge_soon`)."""
        if not addresses:
            return 0
        if guard:
            self._bar(addresses)
        scan = Scan(why, None, addresses=set(addresses), keys=list(dict.keys(self.entries)))
        return self._finish(scan, all_at_once=True)

    def purge_soon(self, addresses: set[bytes], why: str,
                   done: Callable[[int], None] | None = None) -> None:
        """`purge` in slices on the running loop; the addresses are barred at once. Addresses
        given while a pass waits join it; `done` is told what the pass that took them
        dropped (the entries carrying any of its addresses)."""
        if not addresses:
            return
        self._bar(addresses)
        waiting = next((scan for scan in list(self.scans)[1:]
                        if scan.addresses is not None and scan.why == why), None)
        if waiting is not None:
            waiting.addresses |= addresses
            if done is not None:
                waiting.done.append(done)
            return
        self._queue(Scan(why, None, addresses=set(addresses), done=[done] if done else []))

    def _bar(self, addresses: Collection[bytes]) -> None:
        until = self.clock() + PURGE_GUARD
        for address in addresses:
            self.barred[address] = until

    def _queue(self, scan: Scan) -> None:
        if self.mirror is not None:
            # Hits are checked against the scans while they run (_doomed_meanwhile): the
            # compiled path cannot, so it answers nothing until Python has answered it again.
            self.mirror.clear()
        self.scans.append(scan)
        if len(self.scans) == 1:
            self._begin()

    def _begin(self) -> None:
        """The first waiting scan starts: its keys are those cached now (anything stored later
        was refused if it should have gone), its first slice at once."""
        scan = self.scans[0]
        # dict's own view: the OrderedDict's walks its links and looks each key up (7 ms
        # at 100k entries, against 1 ms).
        scan.keys = list(dict.keys(self.entries))
        self._slice()

    def _slice(self) -> None:
        scan = self.scans[0]
        if scan.step(self, SCAN_SLICE):
            asyncio.get_running_loop().call_soon(self._slice)
            return
        self.scans.popleft()
        self._finish(scan)
        if self.scans:
            self._begin()

    def _finish(self, scan: Scan, all_at_once: bool = False) -> int:
        if all_at_once:
            scan.step(self, len(scan.keys))
        if scan.dropped:
            self.metrics.inc("dnsproxy_cache_purged_total", scan.dropped, why=scan.why)
        for done in scan.done:
            done(scan.dropped)
        return scan.dropped

    def _doomed_meanwhile(self, key: bytes, cached: bytes) -> bool:
        """While scans run, a hit the scans have not reached yet is checked on its own: an
        address learned is never served again, not even in the 30 ms a pass over 100k entries
        takes. Dropped and counted as the scan would have."""
        for scan in self.scans:
            if (scan.claimed(key) if scan.claimed is not None
                    else _carries(cached, scan.addresses)):
                self._drop(key)
                scan.dropped += 1
                return True
        return False

    def _rerouted(self, key: bytes) -> bool:
        """Whether a reload's forget refuses this key: until its guard ends, and while its
        scan has not ended."""
        now = self.clock()
        scanning = {scan.claimed for scan in self.scans}
        self.rerouting = [(claimed, until) for claimed, until in self.rerouting
                          if until > now or claimed in scanning]
        return any(claimed(key) for claimed, _ in self.rerouting)

    def _carries_barred(self, cached: wire.CachedReply) -> bool:
        now = self.clock()
        for address, until in list(self.barred.items()):
            if until <= now:
                del self.barred[address]
        return _carries(cached, self.barred.keys())

    def cap_ttls(self, max_ttl: int) -> None:
        """A new --max-ttl (a reload): drop the entries that would exceed it. Only a lower cap
        can find any (none was stored above the old one), and only then is the cache walked:
        every reload would otherwise hold the event loop 30 ms at 100k entries."""
        lowered = max_ttl < self.max_ttl
        self.max_ttl = max_ttl
        if not lowered:
            return
        ttl_of = wire.CachedReply.STAMP.unpack_from
        for key in [key for key, entry in self.entries.items() if ttl_of(entry)[1] > max_ttl]:
            self._drop(key)

    def _drop(self, key: bytes) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(key) + len(entry)
            if self.mirror is not None:
                self.mirror.remove(key)


def _carries(entry: bytes, addresses: Collection[bytes], search: bool = True) -> bool:
    """Whether a stored reply holds an A or AAAA record with one of `addresses`."""
    # For a few addresses, searching the bytes first (in C) spares parsing most entries.
    if search and len(addresses) <= PURGE_SEARCH_MAX and not any(a in entry for a in addresses):
        return False
    try:
        body = wire.CachedReply(entry).body
        return any(address in addresses for address in wire.record_addresses(body))
    except wire.WireError:
        return True  # the cache holds only replies it parsed: this cannot be, so drop it


@dataclass(eq=False)
class Scan:
    """One pass over the keys cached when it began, dropping the entries whose key `claimed`
    names (a forget) or that carry one of `addresses` (a purge); resumed slice by slice."""

    why: str  # the label of dnsproxy_cache_purged_total
    doomed: Callable[[bytes, bytes], bool] | None  # (key, stamped entry): a purge's, once begun
    addresses: set[bytes] | None = None  # packed A/AAAA data; grows until the pass begins
    claimed: Callable[[bytes], bool] | None = None  # a forget's test of a key
    done: list[Callable[[int], None]] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    at: int = 0  # keys[:at] looked at
    dropped: int = 0

    def step(self, cache: Cache, count: int) -> bool:
        """Look at the next `count` keys; whether any are left."""
        entries, end = cache.entries, min(self.at + count, len(self.keys))
        keys = self.keys[self.at:end]
        if self.claimed is not None:  # by key alone: the entry need not be read
            claimed = self.claimed
            doomed = [key for key in keys if claimed(key) and key in entries]
        else:
            if self.doomed is None:
                self.doomed = _carrying(self.addresses)
            test = self.doomed
            doomed = [key for key in keys
                      if (entry := entries.get(key)) is not None and test(key, entry)]
        for key in doomed:
            cache._drop(key)
        self.dropped += len(doomed)
        self.at = end
        if end < len(self.keys):
            return True
        self.keys = []
        return False


def _carrying(addresses: Collection[bytes]) -> Callable[[bytes, bytes], bool]:
    """Whether an entry carries one of `addresses`: one search of its bytes (in C) for all of
    them at once finds the few entries worth parsing."""
    search = re.compile(b"|".join(re.escape(address) for address in addresses)).search
    addresses = set(addresses)
    return lambda key, entry: (search(entry) is not None
                               and _carries(entry, addresses, search=False))
