"""Special-use names, and the home's names when no resolver of the home is given, answered here.

Every query pays for the check (`homenames.NameTable`): a test of the name's length and one
`endswith` over the table's suffix tails, on the question key's bytes, before the table's walk.
Names the table sends to a group (the LAN's resolver, a zone's) pass on to the zone router.
"""

from __future__ import annotations

from ..homenames import ROUTE, NameTable, rule_reply
from ..metrics import Metrics
from ..pipeline import PassThrough, Request, Response


class SpecialNames(PassThrough):
    name = "special"

    def __init__(self, table: NameTable, metrics: Metrics) -> None:
        self.table = table
        self.tails = table.tails
        self.single_label = table.single_label is not None
        self.metrics = metrics

    def answer(self, request: Request) -> Response | None:
        query = request.query
        key = query.key  # the name, then 4 bytes of type and class
        end = len(key) - 4
        # A single-label name is one label and the root: its first byte says its length.
        if not key.endswith(self.tails, 0, end) and not (self.single_label
                                                          and key[0] + 2 == end):
            return None  # the common case: a name with no rule
        hit = self.table.match(key[:end], query.qtype)
        if hit is None or hit[0].action == ROUTE:
            return None
        rule, apex = hit
        reply, rcode = rule_reply(query, rule, apex)
        self.metrics.inc("dnsproxy_responses_total", reason="local")
        self.metrics.inc("dnsproxy_local_answers_total", why=rule.why)
        return Response(reply, "local", rcode, why=rule.why)
