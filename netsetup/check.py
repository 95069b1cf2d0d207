"""Resolve through every exposed path, as a LAN client would, and report each in words.

Direct mode is the container's own address on port 53; port mode is the host's LAN address on the
published port. Each path is tried over UDP and TCP, since a forwarder that answers UDP but whose
TCP path is blocked fails clients on every truncated reply.

The queries go through dnspython's client, which checks a UDP reply's source and ID and reads a
TCP frame whole or fails; every failure becomes a sentence saying what happened and, where we
can tell, what to do about it.
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass


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
    direct_ip: str | None, host_ip: str | None, port: int, direct: bool, published: bool,
    lan_ip: str | None = None,
) -> list[Probe]:
    """Every path the modes expose; LAN_IP (lan mode) is asked through the host's own nat
    OUTPUT hook, the same translation LAN clients get in PREROUTING."""
    out: list[Probe] = []
    for transport in ("udp", "tcp"):
        if lan_ip:
            out.append(Probe("lan", lan_ip, 53, transport))
        if direct and direct_ip:
            out.append(Probe("direct", direct_ip, 53, transport))
        if published and host_ip:
            out.append(Probe("port", host_ip, port, transport))
    return sorted(out, key=lambda p: (p.path, p.transport))


def failure_text(exc: BaseException, timeout: float) -> str:
    """What went wrong, in words (never "unpack requires a buffer of 2 bytes")."""
    if isinstance(exc, dns.exception.Timeout | socket.timeout | TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens there, or a firewall rejects it"
    if isinstance(exc, EOFError | ConnectionResetError | BrokenPipeError):
        return "connection closed without an answer"
    if isinstance(exc, dns.query.BadResponse):
        return "the reply does not match the question"
    if isinstance(exc, dns.exception.FormError):  # also ShortHeader, TrailingJunk
        return f"malformed reply: {exc}"
    if isinstance(exc, OSError):
        return f"network error: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def refused_text(source: str | None, lan_hint: str | None) -> str:
    who = f"this host's address {source}" if source else "this host's address"
    fix = f"; set LAN_CIDR={lan_hint} (--lan-cidr) and run up again" if lan_hint else ""
    return f"REFUSED: {who} is not in the networks the appliance serves{fix}"


def query(
    probe: Probe,
    name: str,
    qtype: str = "TXT",
    qclass: str = "CH",
    timeout: float = 3.0,
    lan_hint: str | None = None,
) -> Result:
    """One query; the default (CHAOS TXT id.server) is answered by the appliance itself, so a
    check sends nothing upstream unless a real name is asked for. `lan_hint` is the LAN to name
    when the appliance refuses us."""
    request = dns.message.make_query(name, qtype, dns.rdataclass.from_text(qclass))
    start = time.monotonic()

    def result(ok: bool, rcode: str, answers: list[str], error: str = "") -> Result:
        ms = round((time.monotonic() - start) * 1000, 1)
        return Result(probe.path, probe.server, probe.port, probe.transport, ok, rcode,
                      answers, ms, error)  # fmt: skip

    try:
        if probe.transport == "tcp":
            reply = dns.query.tcp(request, probe.server, timeout=timeout, port=probe.port)
        else:
            # ignore_unexpected: a datagram from another address or with another ID is skipped,
            # as a resolver would, rather than taken for the answer.
            reply = dns.query.udp(request, probe.server, timeout=timeout, port=probe.port,
                                  ignore_unexpected=True)  # fmt: skip
    except Exception as exc:  # every failure is a result, never a traceback
        return result(False, "-", [], failure_text(exc, timeout))
    rcode = dns.rcode.to_text(reply.rcode())
    answers = [f"{rrset.name} {rr}" for rrset in reply.answer for rr in rrset]
    if reply.rcode() == dns.rcode.REFUSED:
        return result(False, rcode, answers, refused_text(local_address(probe), lan_hint))
    return result(rcode in ("NOERROR", "NXDOMAIN"), rcode, answers)


def local_address(probe: Probe) -> str | None:
    """The source address this host uses towards the probe's server (what the appliance sees
    in port mode)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((probe.server, probe.port))
            return sock.getsockname()[0]
    except OSError:
        return None
