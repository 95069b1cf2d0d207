"""A bounded LRU cache of upstream replies, answered from wire bytes.

Keyed on the question (the name lower-cased, type, class) and the DO and CD bits, so a
DNSSEC-aware client never gets a reply stripped of signatures that was fetched for one that is
not, nor a client relying on validation one fetched with checking disabled. Entries hold the
reply without its OPT record; `wire.client_reply` patches the ID, the question's case and the
aged TTLs for each hit, the same function the miss path uses, so both give the same bytes.

Two bounds hold at once, evicting the least recently used first: the number of entries, and
their bytes (key and stored reply), so a few 64 KiB TCP answers weigh what they really cost.
A reply larger than the whole byte budget is not kept at all.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from .. import wire
from ..metrics import Metrics
from ..pipeline import PassThrough, Request, Response


class Cache(PassThrough):
    name = "cache"

    def __init__(self, size: int, metrics: Metrics, max_ttl: int = 86400,
                 clock=time.monotonic, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0  # len(key) + len(entry) over all entries
        self.max_ttl = max_ttl
        self.metrics = metrics
        self.clock = clock
        self.entries: OrderedDict[bytes, wire.CachedReply] = OrderedDict()  # stamped replies
        self.counts = metrics.values
        self.hits = metrics.key("dnsproxy_cache_hits_total")
        self.misses = metrics.key("dnsproxy_cache_misses_total")
        metrics.gauge("dnsproxy_cache_entries", lambda: len(self.entries))
        metrics.gauge("dnsproxy_cache_bytes", lambda: self.bytes)

    @staticmethod
    def key(query: wire.Query) -> bytes:
        # DO: a validating client must not get a reply stripped of signatures. CD: replies the
        # upstream did not validate must not reach clients that rely on its validation.
        return query.key + bytes(((1 if query.do else 0) | (2 if query.flags & wire.CD else 0),))

    def answer(self, request: Request) -> Response | None:
        query = request.query
        key = self.key(query)
        cached = self.entries.get(key)
        if cached is None:
            self.counts[self.misses] += 1
            return None
        stored, ttl = wire.CachedReply.STAMP.unpack_from(cached)
        age = self.clock() - stored
        if age >= ttl or age >= self.max_ttl:
            self._drop(key)
            self.counts[self.misses] += 1
            return None
        self.entries.move_to_end(key)
        self.counts[self.hits] += 1
        reply = wire.client_reply(cached, query, int(age))
        return Response(reply, "cached", reply[3] & wire.RCODE_MASK)

    def observe(self, request: Request, response: Response) -> None:
        cached = response.cacheable
        if cached is None or self.size <= 0:
            return
        ttl = min(cached.ttl, self.max_ttl)
        if ttl <= 0:
            return
        key = self.key(request.query)
        self._drop(key)  # a newer reply replaces the old, whatever their sizes
        weight = len(key) + len(cached)
        if weight > self.max_bytes:
            return  # it would evict everything else and still not fit
        self.entries[key] = cached.stamped(self.clock())
        self.bytes += weight
        while len(self.entries) > self.size or self.bytes > self.max_bytes:
            old_key, old = self.entries.popitem(last=False)
            self.bytes -= len(old_key) + len(old)

    def _drop(self, key: bytes) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(key) + len(entry)
