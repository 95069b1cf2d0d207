"""Where a DNS-over-HTTPS server given by host name is, asked of the forwarder's own upstreams.

Never of the system resolver: in a polluted network that is the very path the injector
answers, and a forged address for the DoH server would cost every query (the certificate
check refuses the impostor, so nothing is answered at all). The upstreams asked are the other
configured ones, with every forgery defence of theirs; the answer is kept for its TTL (within
MIN_TTL and MAX_TTL) and forgotten when connecting to it fails.
"""

from __future__ import annotations

import asyncio
import time

from .. import wire
from .base import Upstream, UpstreamError

MIN_TTL = 60  # a DoH server's address asked again at most once a minute...
MAX_TTL = 3600  # ...and at least once an hour


class Bootstrap:
    def __init__(self, host: str, upstreams: list[Upstream], clock=time.monotonic) -> None:
        self.host = host
        self.upstreams = upstreams
        self.clock = clock
        self.address: str | None = None
        self.expires = 0.0
        self.pending: asyncio.Task | None = None  # one look-up shared by concurrent queries

    async def locate(self, deadline: float) -> str:
        """The server's address; UpstreamError when no upstream gave one by `deadline`."""
        if self.address is not None and self.clock() < self.expires:
            return self.address
        if self.pending is None or self.pending.done():
            self.pending = asyncio.get_running_loop().create_task(self._look_up(deadline))
            # Retrieved here too, in case every query waiting on it gave up first.
            self.pending.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(self.pending)

    def forget(self) -> None:
        """Connecting failed: the next query looks the name up again."""
        self.address = None

    async def _look_up(self, deadline: float) -> str:
        # dnslib takes 1.4 MB once imported: only a forwarder with a DoH server named by host
        # name ever gets here.
        from dnslib import QTYPE, DNSError, DNSRecord

        for qtype in (QTYPE.A, QTYPE.AAAA):
            query = wire.parse_query(DNSRecord.question(self.host, QTYPE[qtype]).pack())
            for upstream in self.upstreams:
                try:
                    answer = await upstream.exchange(query, deadline)
                except UpstreamError:
                    continue
                if not answer.verified or answer.reply.rcode != wire.NOERROR:
                    continue  # unvouched for, or SERVFAIL, REFUSED, NXDOMAIN: ask the next
                try:
                    answers = DNSRecord.parse(answer.data).rr
                except DNSError:
                    continue
                records = [rr for rr in answers if rr.rtype == qtype]
                if records:
                    ttl = min(max(min(rr.ttl for rr in records), MIN_TTL), MAX_TTL)
                    self.address, self.expires = str(records[0].rdata), self.clock() + ttl
                    return self.address
                break  # a genuine answer without addresses of this type: try the other type
        raise UpstreamError("bootstrap")
