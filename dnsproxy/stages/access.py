"""Access control: serve the local networks only, so the appliance is never an open resolver.

Strangers get REFUSED, but only so many per second from one network (a /24, or a /56 for
IPv6), then nothing: a REFUSED is as large as the query, and a flood with a forged source
must not turn the appliance into a reflector aimed at that source.
"""

from __future__ import annotations

import ipaddress

from .. import wire
from ..metrics import Metrics
from ..pipeline import PassThrough, Request, Response
from .ratelimit import TokenBuckets

REFUSED_RATE = 10.0  # REFUSED per second to one stranger network
REFUSED_BURST = 20.0


def network_of(address: str) -> str:
    """The stranger's network a REFUSED budget is kept for: its /24, or /56 for IPv6."""
    if ":" not in address or (address.startswith("::ffff:") and "." in address):
        return address.rpartition(".")[0]  # IPv4, or IPv4-mapped: cheap, no parsing
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return str(ipaddress.ip_network((ip, 56), strict=False))


class AccessControl(PassThrough):
    name = "access"

    def __init__(self, allowed: list[str] | tuple[str, ...], metrics: Metrics) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in allowed]
        self.metrics = metrics
        self.verdicts: dict[str, bool] = {}  # client address -> allowed; a plain dict is fastest
        self.refusals = TokenBuckets(REFUSED_RATE, REFUSED_BURST)  # per stranger network

    def allowed(self, address: str) -> bool:
        verdict = self.verdicts.get(address)
        if verdict is None:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if ip.version == 6 and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            verdict = any(ip in net for net in self.networks)
            if len(self.verdicts) >= 65536:
                self.verdicts.clear()  # a scan of many sources must not grow us without bound
            self.verdicts[address] = verdict
        return verdict

    def answer(self, request: Request) -> Response | None:
        address = request.client[0]
        if self.verdicts.get(address) or self.allowed(address):  # the first: the hot path
            return None
        if not self.refusals.allow(network_of(address), request.started):
            self.metrics.inc("dnsproxy_responses_total", reason="ratelimited")
            return Response(None, "ratelimited", wire.REFUSED)
        self.metrics.inc("dnsproxy_responses_total", reason="refused")
        return Response(wire.response(request.query, wire.REFUSED), "refused", wire.REFUSED)
