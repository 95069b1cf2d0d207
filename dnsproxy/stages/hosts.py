"""Names from hosts files (--hosts), answered here: the user's own names win over any resolver's.

One dict lookup per query on the question's name. A name of the files answers every type: its
addresses for A and AAAA, the PTR name for its address's reverse name, NODATA (with an SOA at
the name) for anything else, so nothing about it is asked elsewhere.
"""

from __future__ import annotations

from .. import wire
from ..homenames import local_reply, soa_record
from ..hosts import HostsTable
from ..metrics import Metrics
from ..pipeline import PassThrough, Request, Response


class HostsAnswers(PassThrough):
    name = "hosts"

    def __init__(self, table: HostsTable, metrics: Metrics, ttl: int) -> None:
        self.entries = table.entries
        self.metrics = metrics
        self.ttl = ttl

    def answer(self, request: Request) -> Response | None:
        query = request.query
        entry = self.entries.get(query.key[:-4])
        if entry is None:
            return None
        found = entry.get(query.qtype) if query.qclass == wire.CLASS_IN else None
        if found is not None:
            reply = local_reply(query, wire.NOERROR, *found)
        else:
            reply = local_reply(query, wire.NOERROR, authority=soa_record(query, 0, self.ttl))
        self.metrics.inc("dnsproxy_responses_total", reason="local")
        self.metrics.inc("dnsproxy_local_answers_total", why="hosts")
        return Response(reply, "local", wire.NOERROR, why="hosts")
