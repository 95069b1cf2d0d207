"""What every upstream transport shares: the interface, its errors, and what it reports."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Protocol

from .. import wire
from ..forgery import EdnsState, ForgeryFilters
from ..metrics import Metrics
from ..querylog import QueryLog


class UpstreamError(Exception):
    """The upstream gave no usable answer; `reason` is a short label for metrics and logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Forged(UpstreamError):
    """A reply over TCP, TLS or HTTPS the forgery filters condemned: counted as a forgery (by
    upstream and reason), not as an error, and no mark against the upstream's health, which
    answered; the next upstream is asked."""


class Answer(NamedTuple):
    """An upstream's reply to one query.

    `verified` is False for a reply the forgery defences could not vouch for (an OPT-less UDP
    reply released after the hold, before anything was learned, or the answer to a query asked
    without OPT after a FORMERR no trusted path confirmed): good enough for the client who
    waits, never to be cached or learned from.
    """

    data: bytes
    reply: wire.Reply
    verified: bool = True


class Upstream(Protocol):
    name: str
    transport: str
    edns: EdnsState

    async def exchange(self, query: wire.Query, deadline: float, edns: bool = True) -> Answer:
        """The genuine reply to `query`, or UpstreamError; `deadline` is in loop.time().
        `edns=False` asks without an OPT record."""
        ...

    async def close(self) -> None: ...


def os_reason(exc: OSError) -> str:
    """A socket error as a short label for metrics: refused, network-is-unreachable, ..."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    return (exc.strerror or type(exc).__name__).lower().replace(" ", "-")


def matches(reply: wire.Reply, query: wire.Query) -> bool:
    """Same question, the name compared case-insensitively (resolvers may change it: 0x20)."""
    return wire.question_key(reply.question) == query.key


class StreamView(Protocol):
    """What `judge_stream` needs of a TCP, TLS or HTTPS upstream."""

    name: str
    transport: str  # tcp, tls or https
    edns: EdnsState
    telemetry: Telemetry
    filters: ForgeryFilters  # as ForgeryFilters.for_stream gives them


def judge_stream(upstream: StreamView, query: wire.Query, data: bytes,
                 reply: wire.Reply) -> Answer:
    """A reply over TCP, TLS or HTTPS through the filters of its transport (the same verdict
    UDP replies get, with the filters forgery.py gives streams): the answer, whose addresses
    are vouched for as no on-path injector can forge them (and, over TLS or HTTPS, taken off
    the learned list); or Forged, counted and logged."""
    filters = upstream.filters
    reason = filters.verdict(upstream, reply, 0.0)
    if reason:
        upstream.telemetry.forgery(upstream.name, query, reason, reply)
        raise Forged(reason)
    if filters.learner is not None and reply.addresses:
        filters.learner.vouch(reply.addresses, unlearn=upstream.transport != "tcp")
    return Answer(data, reply)


class PollutedNames:
    """Questions an injector has answered before: ask them over TCP from the start next time."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.keys: OrderedDict[bytes, None] = OrderedDict()

    def add(self, key: bytes) -> None:
        self.keys[key] = None
        self.keys.move_to_end(key)
        if len(self.keys) > self.size:
            self.keys.popitem(last=False)

    def __contains__(self, key: bytes) -> bool:
        return key in self.keys


class Telemetry:
    """Where upstreams report forgeries, errors and latency: the counters and the query log."""

    def __init__(self, metrics: Metrics, log: QueryLog) -> None:
        self.metrics = metrics
        self.log = log
        self.counts = metrics.values
        # Counter keys built once per upstream: every query sent and answered counts.
        self.sent_keys: dict[tuple[str, str], tuple] = {}
        self.latency_keys: dict[str, tuple[tuple, tuple]] = {}

    def sent(self, upstream: str, transport: str) -> None:
        key = self.sent_keys.get((upstream, transport))
        if key is None:
            key = self.sent_keys[(upstream, transport)] = self.metrics.key(
                "dnsproxy_upstream_queries_total", upstream=upstream, transport=transport)
        self.counts[key] += 1

    def forgery(self, upstream: str, query: wire.Query, reason: str,
                reply: wire.Reply | None = None) -> None:
        """`reply`, when it could be read: the addresses it carried are what the censor tried."""
        self.metrics.inc("dnsproxy_forgeries_total", upstream=upstream, reason=reason)
        self.log.forgery(upstream, query.name, query.qtype, reason,
                         reply.addresses if reply is not None else ())

    def stray(self, upstream: str, reply: wire.Reply | None, reason: str) -> None:
        """A forgery on a shared socket that no pending query has the ID of: logged with the
        question it claims to answer, if it can be read."""
        self.metrics.inc("dnsproxy_forgeries_total", upstream=upstream, reason=reason)
        if reply is None:
            self.log.forgery(upstream, None, None, reason)
        else:
            qtype = int.from_bytes(reply.question[-4:-2], "big")
            self.log.forgery(upstream, wire.name_to_text(reply.question, 0), qtype, reason,
                             reply.addresses)

    def late(self, upstream: str) -> None:
        """A reply to a query already done: genuine but too late, or answered another way."""
        self.metrics.inc("dnsproxy_upstream_late_replies_total", upstream=upstream)

    def error(self, upstream: str, reason: str) -> None:
        self.metrics.inc("dnsproxy_upstream_errors_total", upstream=upstream, reason=reason)
        self.log.upstream_error(upstream, reason)

    def latency(self, upstream: str, seconds: float) -> None:
        keys = self.latency_keys.get(upstream)
        if keys is None:
            keys = self.latency_keys[upstream] = (
                self.metrics.key("dnsproxy_upstream_latency_seconds_sum", upstream=upstream),
                self.metrics.key("dnsproxy_upstream_latency_seconds_count", upstream=upstream))
        self.counts[keys[0]] += seconds
        self.counts[keys[1]] += 1
        self.log.upstream_reply(upstream, seconds)
