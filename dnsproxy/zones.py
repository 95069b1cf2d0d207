"""Routing by zone: names of the home to the LAN's resolver, a --zone's names to its resolvers.

The zone router is the last link of the chain, in front of the default resolver (the trusted
upstreams, or the split between them and the domestic ones). Per query it finds the name's rule
in the home-name table (`homenames.NameTable`: its most specific suffix); a rule that routes
sends the query to that group only, never to the public upstreams, and its answer is cached as
any other. With split DNS, a listed suffix more specific than the rule's wins (`cn.example.com`
listed domestic beats `--zone example.com=...`); at the same suffix the zone wins.

Each group is an ordinary Forwarder, with hedging and failover among its upstreams. If a group
fails the client gets SERVFAIL: a home name is not asked of the public upstreams instead.
"""

from __future__ import annotations

from . import wire
from .domainlists import DomainLists
from .forwarder import Forwarder
from .homenames import ROUTE, NameTable
from .metrics import Metrics
from .pipeline import Request, Response
from .split import SplitResolver


class ZoneRouter:
    name = "zones"

    def __init__(self, default: Forwarder | SplitResolver, table: NameTable,
                 groups: dict[str, Forwarder], metrics: Metrics) -> None:
        self.default = default
        self.table = table
        self.groups = groups
        self.metrics = metrics
        # Split DNS's lists, when the default resolver splits: the most specific name wins.
        self.lists: DomainLists | None = (default.lists if isinstance(default, SplitResolver)
                                          else None)

    def route(self, query: wire.Query) -> tuple[str, str] | None:
        """The group a query goes to and why, or None for the default resolver."""
        name = query.key[:-4]
        hit = self.table.match(name, query.qtype)
        if hit is None or hit[0].action != ROUTE:
            return None
        rule, apex = hit
        if self.lists is not None and -1 < self.lists.listed_at(name) < apex:
            return None  # a list names a longer suffix: the split decides
        return rule.group, rule.why

    async def resolve(self, request: Request) -> Response:
        routed = self.route(request.query)
        if routed is None:
            return await self.default.resolve(request)
        group, why = routed
        response = await self.groups[group].resolve(request)
        response.group = group
        response.why = why
        self.metrics.inc("dnsproxy_zone_routes_total", group=group, why=why)
        return response

    async def refresh(self, query: wire.Query) -> wire.CachedReply | None:
        routed = self.route(query)
        if routed is None:
            return await self.default.refresh(query)
        return await self.groups[routed[0]].refresh(query)

    async def close(self) -> None:
        await self.default.close()
        for forwarder in self.groups.values():
            await forwarder.close()
