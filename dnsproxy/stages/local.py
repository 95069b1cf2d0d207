"""Questions answered here without asking anyone.

- CHAOS-class identity queries (id.server, hostname.bind, version.bind, version.server): the
  container's health check uses them, so checking health never sends a packet off the host.
- ANY (RFC 8482): a single synthesized HINFO, so the appliance is no amplifier.
- Anything but a standard QUERY: NOTIMP.
- EDNS above version 0: BADVERS (RFC 6891 6.1.3), before anything is asked or looked up.
"""

from __future__ import annotations

from .. import wire
from ..metrics import Metrics
from ..pipeline import PassThrough, Request, Response

IDENTITY_NAMES = {b"\x02id\x06server\x00", b"\x08hostname\x04bind\x00",
                  b"\x07version\x04bind\x00", b"\x07version\x06server\x00"}


class LocalAnswers(PassThrough):
    name = "local"

    def __init__(self, identity: str, metrics: Metrics) -> None:
        self.identity = identity
        self.metrics = metrics

    def answer(self, request: Request) -> Response | None:
        q = request.query
        if q.flags & wire.OPCODE_MASK:
            return self._reply(q, wire.NOTIMP)
        if q.edns_version:
            return self._reply(q, wire.BADVERS)
        if q.qclass == wire.CLASS_CH:
            name = q.key[:-4]
            if name in IDENTITY_NAMES and q.qtype in (wire.TYPE_TXT, wire.TYPE_ANY):
                rr = wire.resource_record(wire.TYPE_TXT, wire.CLASS_CH, 0,
                                          wire.character_strings(self.identity))
                return self._reply(q, wire.NOERROR, rr, 1)
            return self._reply(q, wire.REFUSED)
        if q.qtype == wire.TYPE_ANY:
            rr = wire.resource_record(wire.TYPE_HINFO, q.qclass, 3600,
                                      wire.character_strings("RFC8482", ""))
            return self._reply(q, wire.NOERROR, rr, 1)
        return None

    def _reply(self, q: wire.Query, rcode: int, answers: bytes = b"", count: int = 0) -> Response:
        self.metrics.inc("dnsproxy_responses_total", reason="local")
        return Response(wire.response(q, rcode, answers, count, authoritative=bool(count)),
                        "local", rcode)
