"""A per-client token bucket: the appliance is no amplifier, and one host cannot flood it.

Over UDP an over-limit query is dropped (answering would still reflect traffic); over TCP, where
the source address is proven, it is refused.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from .. import wire
from ..metrics import Metrics
from ..pipeline import PassThrough, Request, Response


class TokenBuckets:
    """One token bucket per key (a client, a network); beyond `max_keys` the least recently
    seen key is forgotten, so a scan of many sources cannot grow the table without bound."""

    def __init__(self, rate: float, burst: float, max_keys: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, stamp]

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_keys:
                self.buckets.popitem(last=False)
            bucket = self.buckets[key] = [self.burst, now]
        else:
            self.buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1:
            bucket[0] -= 1
            return True
        return False


class RateLimit(PassThrough):
    name = "ratelimit"

    def __init__(self, rate: float, burst: float, metrics: Metrics, max_clients: int = 65536):
        self.metrics = metrics
        self.buckets = TokenBuckets(rate, burst, max_clients)

    def answer(self, request: Request) -> Response | None:
        rate = request.rate  # the compiled UDP path's verdict: that client's UDP bucket is its
        if rate if rate is not None else self.buckets.allow(request.client[0], request.started):
            return None
        self.metrics.inc("dnsproxy_responses_total", reason="ratelimited")
        if request.transport == "tcp":
            return Response(wire.response(request.query, wire.REFUSED), "ratelimited", wire.REFUSED)
        return Response(None, "ratelimited", wire.REFUSED)
