"""The last link of the chain: ask the upstreams, within one deadline per query.

Upstreams are tried in order of health, hedged: the best one is asked first; if it fails, or has
not answered within `hedge_delay`, the next is asked too, and the first genuine reply wins. So a
healthy first upstream carries all the traffic, and a dead or slow one costs a client at most the
hedge delay. An upstream that fails several times in a row is put to the back of the line for a
while (growing up to a minute) and gets its place back with its first genuine reply. With no
genuine reply by the deadline the client gets SERVFAIL, never NXDOMAIN.

An upstream's SERVFAIL, REFUSED, FORMERR or NOTIMP is its own trouble, which the next may not
share: it counts as "ask the next", and reaches the client only when every upstream says so
(it proves the upstream reachable, so it costs no health). So is a TCP, TLS or HTTPS reply the
forgery filters condemned (Forged): never passed on, whatever the others say.

An upstream that answers a query with OPT by FORMERR or NOTIMP without one is asked again
without OPT (RFC 6891 section 7). Only a refusal the defences verified (over TCP, where no
injector reaches, or from an upstream known not to echo OPT) is remembered for a while, so an
injector cannot talk the forwarder out of the EDNS marker; an unconfirmed one (TCP failed)
gets the waiting client the answer without OPT, unverified: not cached, nothing remembered.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from . import wire
from .forgery import OPT_REFUSALS
from .metrics import Metrics
from .pipeline import Request, Response
from .upstreams import Answer, Forged, Upstream, UpstreamError

FAILS_BEFORE_DOWN = 3
MAX_DOWN_SECONDS = 60.0
REJECTIONS = frozenset({wire.SERVFAIL, wire.REFUSED, wire.FORMERR, wire.NOTIMP})


@dataclass(slots=True)
class Health:
    failures: int = 0
    down_until: float = 0.0

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.failures >= FAILS_BEFORE_DOWN:
            # Capped exponent: a flood of timeouts counts failures into the thousands.
            backoff = 2.0 ** min(self.failures - FAILS_BEFORE_DOWN + 2, 8)
            self.down_until = now + min(MAX_DOWN_SECONDS, backoff)

    def succeeded(self) -> None:
        self.failures = 0
        self.down_until = 0.0


class Rejected(UpstreamError):
    """The upstream answered, with an error another upstream may not share."""

    def __init__(self, answer: Answer, upstream: Upstream) -> None:
        super().__init__(f"rcode-{answer.reply.rcode}")
        self.answer = answer
        self.upstream = upstream


class Forwarder:
    name = "forward"

    def __init__(self, upstreams: list[Upstream], metrics: Metrics, timeout: float = 2.0,
                 hedge_delay: float = 0.3, max_ttl: int = wire.MAX_TTL) -> None:
        if not upstreams:
            raise ValueError("no upstreams")
        self.upstreams = upstreams
        self.health = {id(u): Health() for u in upstreams}
        self.metrics = metrics
        self.timeout = timeout
        self.hedge_delay = hedge_delay
        self.max_ttl = max_ttl  # the most any TTL a client sees may say
        self.counts = metrics.values
        self.forwarded = metrics.key("dnsproxy_responses_total", reason="forwarded")
        self.loop: asyncio.AbstractEventLoop | None = None  # get_running_loop() costs a syscall

    def ranked(self, now: float) -> list[Upstream]:
        """Healthy upstreams in configured order, then resting ones, soonest back first."""
        if len(self.upstreams) == 1:
            return self.upstreams
        return sorted(self.upstreams, key=lambda u: max(self.health[id(u)].down_until - now, 0))

    async def resolve(self, request: Request) -> Response:
        query = request.query
        try:
            answer, upstream, cached = await self.fetch(query, request.started)
        except (UpstreamError, wire.WireError):  # the latter: a reply even dnslib cannot rebuild
            self.metrics.inc("dnsproxy_responses_total", reason="servfail")
            return Response(wire.response(query, wire.SERVFAIL), "servfail", wire.SERVFAIL)
        self.counts[self.forwarded] += 1
        # Only what the defences accepted may be cached: an unverified reply serves this client.
        return Response(wire.client_reply(cached, query), "forwarded", answer.reply.rcode,
                        upstream.name, cacheable=cached if answer.verified else None)

    async def refresh(self, query: wire.Query) -> wire.CachedReply | None:
        """A cache entry fetched anew for no waiting client (serve-stale, prefetch): the reply
        if the defences verified it and it may be cached, else None, and no response counted,
        since none is sent."""
        try:
            answer, _, cached = await self.fetch(query, time.monotonic())
        except (UpstreamError, wire.WireError):
            return None
        return cached if answer.verified else None

    async def fetch(self, query: wire.Query,
                    started: float) -> tuple[Answer, Upstream, wire.CachedReply]:
        """The winning answer within the query's deadline (also what the split resolver asks
        of each group); UpstreamError when there is none."""
        loop = self.loop or self._running_loop()
        deadline = loop.time() + self.timeout - (time.monotonic() - started)
        answer, upstream = await self._race(query, deadline)
        return answer, upstream, wire.strip_opt(answer.data, answer.reply, self.max_ttl)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        self.loop = asyncio.get_running_loop()
        return self.loop

    async def _exchange(self, upstream: Upstream, query: wire.Query, deadline: float) -> Answer:
        """One question to one upstream; again without OPT if the upstream chokes on OPT."""
        edns = upstream.edns.asks_with_opt(time.monotonic())
        answer = await upstream.exchange(query, deadline, edns)
        reply = answer.reply
        if not edns or reply.opt is not None or reply.rcode not in OPT_REFUSALS:
            return answer
        loop = self.loop or self._running_loop()
        if deadline <= loop.time():  # released at the deadline: no time to ask again
            return answer
        plain = await upstream.exchange(query, deadline, edns=False)
        if plain.reply.rcode in OPT_REFUSALS:  # OPT was not what it minded
            return plain
        if answer.verified:
            upstream.edns.refused_opt(time.monotonic())
            return plain
        # The refusal may be an injector's: this client gets the answer, nothing more.
        return plain._replace(verified=False)

    async def _ask(self, upstream: Upstream, query: wire.Query,
                   deadline: float) -> tuple[Answer, Upstream]:
        health = self.health[id(upstream)]
        try:
            answer = await self._exchange(upstream, query, deadline)
        except Forged:
            raise  # it answered: no mark against its health
        except UpstreamError:
            health.failed(time.monotonic())
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a transport bug must cost one query, not the server
            health.failed(time.monotonic())
            raise UpstreamError(type(exc).__name__) from exc
        health.succeeded()
        if answer.reply.rcode in REJECTIONS:
            raise Rejected(answer, upstream)
        return answer, upstream

    async def _race(self, query: wire.Query, deadline: float) -> tuple[Answer, Upstream]:
        order = self.ranked(time.monotonic())
        if len(order) == 1:
            try:
                return await self._ask(order[0], query, deadline)
            except Rejected as rejected:
                return rejected.answer, rejected.upstream
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()
        launched: dict[asyncio.Task, Upstream] = {}
        rejections: list[Rejected] = []
        next_index = 0

        def launch() -> None:
            nonlocal next_index
            task = loop.create_task(self._ask(order[next_index], query, deadline))
            pending.add(task)
            launched[task] = order[next_index]
            next_index += 1

        launch()
        try:
            while pending:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                wait = min(self.hedge_delay, remaining) if next_index < len(order) else remaining
                done, pending = await asyncio.wait(pending, timeout=wait,
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if next_index < len(order):
                        launch()
                    continue
                winners = [task for task in done if task.exception() is None]
                if winners:
                    self._blame_the_silent(winners[0], pending, launched)
                    return winners[0].result()
                rejections += [task.exception() for task in done
                               if isinstance(task.exception(), Rejected)]
                if next_index < len(order):
                    launch()
        finally:
            for task in pending:
                task.cancel()
        if len(rejections) == len(order):  # every upstream said so: pass the first one on
            return rejections[0].answer, rejections[0].upstream
        raise UpstreamError("all upstreams failed")

    def _blame_the_silent(self, winner: asyncio.Task, pending: set[asyncio.Task],
                          launched: dict[asyncio.Task, Upstream]) -> None:
        """An upstream asked before the winner and still silent failed this query, though its
        task is about to be cancelled: without this a black-holed first upstream would never
        lose its place, and every query would wait out the hedge delay."""
        now = time.monotonic()
        order = list(launched)
        for task in order[:order.index(winner)]:
            if task in pending:
                self.health[id(launched[task])].failed(now)

    async def close(self) -> None:
        for upstream in self.upstreams:
            await upstream.close()
