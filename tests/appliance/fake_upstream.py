"""A fake authoritative upstream for the appliance tests, run in a container beside it.

Answers A queries under appliance.test with ANSWER and everything else with NXDOMAIN, over UDP and
TCP on port 53, and prints each question on stdout so a test can see what reached the upstream.
Uses only dnslib, so it runs in the appliance image itself (no other image to build or pull).
"""

import sys
import time

from dnslib import EDNS0, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

ZONE = "appliance.test."
ANSWER = "198.51.100.7"  # documentation range: never a real host


class Resolver(BaseResolver):
    def resolve(self, request, handler):
        reply = request.reply()  # sets QR, AA, RD/RA and the question
        qname, qtype = request.q.qname, request.q.qtype
        if qname.matchSuffix(ZONE) and qtype == QTYPE.A:
            reply.add_answer(RR(qname, QTYPE.A, rdata=A(ANSWER), ttl=60))
        elif not qname.matchSuffix(ZONE):
            reply.header.rcode = RCODE.NXDOMAIN
        if any(rr.rtype == QTYPE.OPT for rr in request.ar):
            reply.add_ar(EDNS0(udp_len=1232))  # answer EDNS with EDNS, as real servers do
        print(f"query {handler.protocol} {qname} {QTYPE[qtype]}", flush=True)
        return reply


def main() -> None:
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")
    servers = [DNSServer(Resolver(), address="0.0.0.0", port=53, tcp=tcp, logger=quiet)
               for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    print("fake upstream ready", flush=True)
    while all(server.isAlive() for server in servers):
        time.sleep(1)
    sys.exit(1)


if __name__ == "__main__":
    main()
