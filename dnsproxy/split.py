"""Split DNS: the domestic or the trusted upstream group, chosen per name by list and by answer.

A domestic resolver gives nearby CDN addresses for domestic names, but its answers for blocked
foreign names are poisoned upstream of it: OPT present, on time, so no packet-level defence sees
them. The trusted group (the ordinary --upstream) answers clean but far away. So, per query:

- a name on a list (its most specific listed suffix) goes to that group only;
- a name the verdict cache knows goes to the group decided last time, only;
- any other name is asked of both groups at once. The domestic reply wins if it carries
  addresses and all of them lie in the domestic ranges (or, with `trust_empty`, if it is
  NXDOMAIN or NODATA); otherwise the trusted reply is used. A domestic reply with addresses
  decides the name's verdict for a while, so its next query asks one group only.

If the chosen group fails, or stays silent for half the deadline, the other group is asked and
its answer used rather than SERVFAIL; such a fallback is neither cached nor remembered as a
verdict (it may be the poisoned answer the split avoids, and the failure is likely to pass).
Each group is an ordinary Forwarder, with all its per-upstream defences, hedging and failover.
Without domestic upstreams this module is not in the chain: no list lookup at all.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from . import wire
from .domainlists import DOMESTIC, DomainLists
from .forwarder import REJECTIONS, Forwarder
from .metrics import Metrics
from .pipeline import Request, Response
from .upstreams import Answer, Upstream, UpstreamError

TRUSTED = "trusted"  # the group of --upstream, which foreign-listed names go to
VERDICTS = 10000  # names whose verdict is remembered
VERDICT_SECONDS = 1800.0  # how long: a CDN may move a name abroad, a list may change

Fetched = tuple[Answer, Upstream, wire.CachedReply]
Decision = tuple[str, str, Fetched, bool]  # group, why, its answer, whether it may be cached


class GroupFailed(UpstreamError):
    """No usable answer from a group; `fetched` holds its rejection (SERVFAIL...) if any."""

    def __init__(self, reason: str, fetched: Fetched | None = None) -> None:
        super().__init__(reason)
        self.fetched = fetched


class SplitResolver:
    name = "split"

    def __init__(self, trusted: Forwarder, domestic: Forwarder, lists: DomainLists,
                 metrics: Metrics, trust_empty: bool = False,
                 grace: float | None = None) -> None:
        self.groups = {TRUSTED: trusted, DOMESTIC: domestic}
        self.lists = lists
        self.metrics = metrics
        self.trust_empty = trust_empty
        # Once the trusted reply is in, how much longer the domestic one is awaited: a
        # domestic resolver is near and answers first; one that is dead costs this, no more.
        self.grace = trusted.hedge_delay if grace is None else grace
        self.verdicts: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    # --- the decision ---

    def known_group(self, query: wire.Query) -> tuple[str | None, str]:
        """The group a list or a remembered verdict names for the query, and why."""
        name = query.key[:-4]
        listed = self.lists.group_of(name)
        if listed is not None:
            return (DOMESTIC if listed == DOMESTIC else TRUSTED), "listed"
        verdict = self.verdicts.get(name)
        if verdict is not None:
            if verdict[1] > time.monotonic():
                self.verdicts.move_to_end(name)
                return verdict[0], "verdict"
            del self.verdicts[name]
        return None, ""

    def judge(self, reply: wire.Reply) -> str:
        """in-range, out-of-range, unranged, empty or no-addresses: what a domestic reply shows.
        Only addresses of a family the ranges cover are judged: with IPv4 ranges alone (as
        most lists are), an AAAA answer proves nothing either way."""
        if reply.addresses:
            lists = self.lists
            judged = [a for a in reply.addresses if lists.covers(a)]
            if not judged:
                return "unranged"
            return "in-range" if all(lists.is_domestic(a) for a in judged) else "out-of-range"
        if reply.answers == 0 and reply.rcode in (wire.NOERROR, wire.NXDOMAIN):
            return "empty"
        return "no-addresses"

    def _remember(self, query: wire.Query, group: str) -> None:
        self.verdicts[query.key[:-4]] = (group, time.monotonic() + VERDICT_SECONDS)
        self.verdicts.move_to_end(query.key[:-4])
        if len(self.verdicts) > VERDICTS:
            self.verdicts.popitem(last=False)

    # --- asking ---

    async def _fetch(self, group: str, query: wire.Query, started: float) -> Fetched:
        try:
            fetched = await self.groups[group].fetch(query, started)
        except wire.WireError as exc:
            raise GroupFailed("malformed") from exc
        except GroupFailed:
            raise
        except UpstreamError as exc:
            raise GroupFailed(exc.reason) from exc
        if fetched[0].reply.rcode in REJECTIONS:  # every upstream of the group refused
            raise GroupFailed(f"rcode-{fetched[0].reply.rcode}", fetched)
        return fetched

    async def decide(self, query: wire.Query, started: float) -> Decision:
        """Which group answered, why, what it said, and whether the answer may be cached;
        GroupFailed when neither group answered."""
        group, why = self.known_group(query)
        if group is None:
            return await self._both(query, started)
        return await self._one(group, why, query, started)

    async def _one(self, group: str, why: str, query: wire.Query, started: float) -> Decision:
        """The group the name belongs to; the other one too once the first has failed or been
        silent for half the deadline: a dead group costs a client that long, not a SERVFAIL,
        and a live one is the only one asked."""
        other = DOMESTIC if group == TRUSTED else TRUSTED
        loop = asyncio.get_running_loop()
        first = loop.create_task(self._fetch(group, query, started))
        second: asyncio.Task | None = None
        try:
            patience = started + self.groups[group].timeout / 2 - time.monotonic()
            await asyncio.wait((first,), timeout=max(patience, 0))
            if not first.done() or first.exception() is not None:
                second = loop.create_task(self._fetch(other, query, started))
                await asyncio.wait((first, second), return_when=asyncio.FIRST_COMPLETED)
            if first.done() and first.exception() is None:
                return group, why, first.result(), True
            assert second is not None
            late = "failed" if first.done() else "slow"
            try:
                return other, f"{group}-{late}", await second, False
            except GroupFailed:
                if not first.done():
                    await asyncio.wait((first,))
                    if first.exception() is None:
                        return group, why, first.result(), True
                raise first.exception() from None
        finally:
            _settle(first, second)

    async def _both(self, query: wire.Query, started: float) -> Decision:
        loop = asyncio.get_running_loop()
        domestic = loop.create_task(self._fetch(DOMESTIC, query, started))
        trusted = loop.create_task(self._fetch(TRUSTED, query, started))
        try:
            await asyncio.wait((domestic, trusted), return_when=asyncio.FIRST_COMPLETED)
            if not domestic.done():  # the trusted group came first: a reply, or a failure
                wait = self.grace if trusted.exception() is None else None
                await asyncio.wait((domestic,), timeout=wait)
            if domestic.done() and domestic.exception() is None:
                fetched = domestic.result()
                why = self.judge(fetched[0].reply)
                if why in ("in-range", "out-of-range"):
                    self._remember(query, DOMESTIC if why == "in-range" else TRUSTED)
                if why == "in-range" or (why == "empty" and self.trust_empty):
                    return DOMESTIC, why, fetched, True
            elif domestic.done():
                why = "domestic-failed"
            else:
                why = "domestic-slow"
            try:
                return TRUSTED, why, await trusted, True  # the trusted answer is clean
            except GroupFailed:
                if domestic.done() and domestic.exception() is None:
                    # Maybe poisoned, and the outage likely passes: served, not kept.
                    return DOMESTIC, "trusted-failed", domestic.result(), False
                raise
        finally:
            _settle(domestic, trusted)

    # --- the resolver interface (as Forwarder's) ---

    async def resolve(self, request: Request) -> Response:
        query = request.query
        try:
            group, why, (answer, upstream, cached), keep = await self.decide(query,
                                                                             request.started)
        except GroupFailed as failed:
            self.metrics.inc("dnsproxy_split_decisions_total", group="none", why="failed")
            if failed.fetched is not None:  # an upstream's own SERVFAIL/REFUSED, passed on
                answer, upstream, cached = failed.fetched
                self.metrics.inc("dnsproxy_responses_total", reason="forwarded")
                return Response(wire.client_reply(cached, query), "forwarded",
                                answer.reply.rcode, upstream.name)
            self.metrics.inc("dnsproxy_responses_total", reason="servfail")
            return Response(wire.response(query, wire.SERVFAIL), "servfail", wire.SERVFAIL)
        self.metrics.inc("dnsproxy_split_decisions_total", group=group, why=why)
        self.metrics.inc("dnsproxy_responses_total", reason="forwarded")
        return Response(wire.client_reply(cached, query), "forwarded", answer.reply.rcode,
                        upstream.name, cacheable=cached if keep and answer.verified else None,
                        group=group, why=why)

    async def refresh(self, query: wire.Query) -> wire.CachedReply | None:
        try:
            _, _, (answer, _, cached), keep = await self.decide(query, time.monotonic())
        except GroupFailed:
            return None
        return cached if keep and answer.verified else None

    async def close(self) -> None:
        for forwarder in self.groups.values():
            await forwarder.close()



def _settle(*tasks: asyncio.Task | None) -> None:
    """Cancel what still runs; read the outcome of what ended, so none is "never retrieved"."""
    for task in tasks:
        if task is None:
            continue
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()
