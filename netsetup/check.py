"""Resolve through every exposed path, as a LAN client would, and report each.

Direct mode is the container's own address on port 53; port mode is the host's LAN address on the
published port. Each path is tried over UDP and TCP, since a forwarder that answers UDP but whose
TCP path is blocked fails clients on every truncated reply.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from dnslib import QTYPE, RCODE, DNSRecord


@dataclass(frozen=True)
class Probe:
    path: str  # "direct" or "port"
    server: str
    port: int
    transport: str  # "udp" or "tcp"


@dataclass(frozen=True)
class Result:
    path: str
    server: str
    port: int
    transport: str
    ok: bool
    rcode: str
    answers: list[str]
    ms: float
    error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def probes(
    direct_ip: str | None, host_ip: str | None, port: int, direct: bool, published: bool
) -> list[Probe]:
    out: list[Probe] = []
    for transport in ("udp", "tcp"):
        if direct and direct_ip:
            out.append(Probe("direct", direct_ip, 53, transport))
        if published and host_ip:
            out.append(Probe("port", host_ip, port, transport))
    return sorted(out, key=lambda p: (p.path, p.transport))


def query(
    probe: Probe, name: str, qtype: str = "TXT", qclass: str = "CH", timeout: float = 3.0
) -> Result:
    """One query; the default (CHAOS TXT id.server) is answered by the appliance itself, so a
    check sends nothing upstream unless a real name is asked for."""
    request = DNSRecord.question(name, qtype, qclass)
    start = time.monotonic()
    try:
        raw = request.send(probe.server, probe.port, tcp=probe.transport == "tcp", timeout=timeout)
        reply = DNSRecord.parse(raw)
    except Exception as exc:
        return Result(
            probe.path, probe.server, probe.port, probe.transport, False, "-", [],
            round((time.monotonic() - start) * 1000, 1), error=str(exc) or type(exc).__name__,
        )  # fmt: skip
    ms = round((time.monotonic() - start) * 1000, 1)
    rcode = RCODE.get(reply.header.rcode)
    answers = [f"{rr.rname} {QTYPE.get(rr.rtype)} {rr.rdata}" for rr in reply.rr]
    ok = reply.header.id == request.header.id and rcode in ("NOERROR", "NXDOMAIN")
    return Result(
        probe.path, probe.server, probe.port, probe.transport, ok, str(rcode), answers, ms
    )
