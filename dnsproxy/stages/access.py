"""Access control: serve the local networks only, so the appliance is never an open resolver."""

from __future__ import annotations

import ipaddress

from .. import wire
from ..metrics import Metrics
from ..pipeline import PassThrough, Request, Response


class AccessControl(PassThrough):
    name = "access"

    def __init__(self, allowed: list[str] | tuple[str, ...], metrics: Metrics) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in allowed]
        self.metrics = metrics
        self.verdicts: dict[str, bool] = {}  # client address -> allowed; a plain dict is fastest

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
        if self.allowed(request.client[0]):
            return None
        self.metrics.inc("dnsproxy_responses_total", reason="refused")
        return Response(wire.response(request.query, wire.REFUSED), "refused", wire.REFUSED)
