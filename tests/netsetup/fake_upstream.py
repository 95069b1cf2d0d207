"""A tiny authoritative DNS server standing in for "the internet" in end-to-end tests.

It answers A queries for names under `example.test.` with 198.51.100.200 (NXDOMAIN otherwise),
over UDP and TCP, echoing EDNS when the query has it, and appends one JSON line per query with
the source address to a log file: that is how the test sees whether the appliance's queries
arrive masqueraded (from the host's address) or not.

Given a ZONE and an ANSWER, it serves only that zone, with that address, and answers REFUSED
for every other name, as a router serving its own names would: a forwarder that asks it first
then asks its next upstream at once (REFUSED costs an upstream no health), so the answer's
address tells which of the two answered.

Playing the censor on the path, it answers a UDP question for any name that starts with
`blocked.` twice: at once a forged reply (no EDNS record, the address FORGED, which is on the
forwarder's shipped forged list), then, FORGED_DELAY later, the genuine one.

`--host NAME=ADDRESS` (repeatable) adds a device the way a router knows its DHCP clients: A
for NAME, PTR for ADDRESS's reverse name, whatever else it serves.
Usage: fake_upstream.py LISTEN_IP PORT LOGFILE [--host NAME=ADDRESS]... [ZONE ANSWER]
"""

from __future__ import annotations

import ipaddress
import json
import socket
import socketserver
import struct
import sys
import threading
import time

from dnslib import PTR, QTYPE, RCODE, RR, A, DNSRecord

ZONE = "example.test."
ANSWER = "198.51.100.200"
FORGED = "159.106.121.75"
FORGED_DELAY = 0.03  # seconds between the forgery and the genuine reply


def censored(data: bytes) -> bytes | None:
    """The injector's forgery for a question it censors, or None."""
    request = DNSRecord.parse(data)
    if not str(request.q.qname).lower().startswith("blocked."):
        return None
    forged = request.reply()
    forged.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(FORGED), ttl=300))
    return forged.pack()


def host_records(hosts: list[str]) -> dict[tuple[str, int], RR]:
    """NAME=ADDRESS pairs as their A and PTR records, by (lower-cased name, type)."""
    records = {}
    for pair in hosts:
        name, _, address = pair.partition("=")
        name = name.lower().rstrip(".") + "."
        pointer = ipaddress.ip_address(address).reverse_pointer + "."
        records[(name, QTYPE.A)] = RR(name, QTYPE.A, rdata=A(address), ttl=60)
        records[(pointer, QTYPE.PTR)] = RR(pointer, QTYPE.PTR, rdata=PTR(name), ttl=60)
    return records


def answer(data: bytes, client: str, log_path: str, zone: str = ZONE, address: str = ANSWER,
           outside: int = RCODE.NXDOMAIN, devices: dict | None = None) -> bytes:  # fmt: skip
    request = DNSRecord.parse(data)
    name = str(request.q.qname)
    with open(log_path, "a") as log:
        log.write(json.dumps({"client": client, "name": name}) + "\n")
    reply = request.reply()
    device = (devices or {}).get((name.lower(), request.q.qtype))
    if device is not None:
        reply.add_answer(device)
    elif name.lower().endswith(zone) and request.q.qtype == QTYPE.A:
        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=60))
    elif not name.lower().endswith(zone):
        reply.header.rcode = outside
    for opt in request.ar:
        if opt.rtype == QTYPE.OPT:
            reply.add_ar(opt)
    return reply.pack()


def main() -> None:
    host, port, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    args, hosts = sys.argv[4:], []
    while args[:1] == ["--host"]:
        hosts.append(args[1])
        args = args[2:]
    served: dict = {"devices": host_records(hosts)}
    if len(args) == 2:
        served |= {"zone": args[0].lower(), "address": args[1], "outside": RCODE.REFUSED}

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            forged = censored(data)
            if forged is not None:
                sock.sendto(forged, self.client_address)
                time.sleep(FORGED_DELAY)
            sock.sendto(answer(data, self.client_address[0], log_path, **served),
                        self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                data = self.rfile.read(struct.unpack("!H", head)[0])
                out = answer(data, self.client_address[0], log_path, **served)
                self.wfile.write(struct.pack("!H", len(out)) + out)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class UdpServer(socketserver.ThreadingUDPServer):
        address_family = family
        allow_reuse_address = True

    class TcpServer(socketserver.ThreadingTCPServer):
        address_family = family
        allow_reuse_address = True

    udp = UdpServer((host, port), Udp)
    tcp = TcpServer((host, port), Tcp)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    print("ready", flush=True)
    udp.serve_forever()


if __name__ == "__main__":
    main()
