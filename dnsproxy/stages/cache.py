"""A bounded LRU cache of upstream replies, answered from wire bytes.

Keyed on the lower-cased question (name, type, class) and the DO bit, so a DNSSEC-aware client
never gets a reply stripped of signatures that was fetched for one that is not. Entries hold the
reply without its OPT record; `wire.client_reply` patches the ID, the question's case and the
aged TTLs for each hit, the same function the miss path uses, so both give the same bytes.
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
                 clock=time.monotonic) -> None:
        self.size = size
        self.max_ttl = max_ttl
        self.metrics = metrics
        self.clock = clock
        # key -> (CachedReply, stored at, expires at)
        self.entries: OrderedDict[bytes, tuple[wire.CachedReply, float, float]] = OrderedDict()
        self.counts = metrics.values
        self.hits = metrics.key("dnsproxy_cache_hits_total")
        self.misses = metrics.key("dnsproxy_cache_misses_total")
        metrics.gauge("dnsproxy_cache_entries", lambda: len(self.entries))

    @staticmethod
    def key(query: wire.Query) -> bytes:
        return query.key + (b"\x01" if query.do else b"\x00")

    def answer(self, request: Request) -> Response | None:
        query = request.query
        key = query.key + (b"\x01" if query.do else b"\x00")
        entry = self.entries.get(key)
        if entry is None:
            self.counts[self.misses] += 1
            return None
        cached, stored, expires = entry
        now = self.clock()
        if now >= expires:
            del self.entries[key]
            self.counts[self.misses] += 1
            return None
        self.entries.move_to_end(key)
        self.counts[self.hits] += 1
        reply = wire.client_reply(cached, query, int(now - stored))
        return Response(reply, "cached", cached.rcode)

    def observe(self, request: Request, response: Response) -> None:
        cached = response.cacheable
        if cached is None or self.size <= 0:
            return
        ttl = min(cached.ttl, self.max_ttl)
        if ttl <= 0:
            return
        now = self.clock()
        key = self.key(request.query)
        self.entries[key] = (cached, now, now + ttl)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
