"""Upstream resolvers, one type per transport, and the factory that reads their specs.

Spec forms: `IP`, `IP:PORT`, `[IPv6]:PORT` and `udp://...` (UDP with every forgery defence and a
TCP retry), `tcp://IP[:PORT]`, `tls://IP[:853][#server-name]` (RFC 7858), `https://HOST[:PORT]/PATH`
(RFC 8484), `https://NAME[:PORT]/PATH#IP` (connect to IP, verify the certificate for NAME).
"""

from __future__ import annotations

import ssl

from ..forgery import EdnsState
from ..upstreamspec import UpstreamSpec, parse_spec
from .base import Answer, Forged, PollutedNames, Telemetry, Upstream, UpstreamError
from .https import HttpsUpstream
from .stream import StreamUpstream
from .udp import UdpUpstream

__all__ = ["Answer", "Forged", "PollutedNames", "Telemetry", "Upstream", "UpstreamError",
           "UpstreamSpec", "parse_spec", "HttpsUpstream", "StreamUpstream", "UdpUpstream"]

def build_upstream(spec: UpstreamSpec, telemetry: Telemetry, *, filters, polluted: PollutedNames,
                   ssl_context: ssl.SSLContext | None, tcp_for_polluted: bool = True,
                   edns: EdnsState | None = None) -> Upstream:
    """The upstream for `spec`; `edns` is what an earlier one of the same name learned (a reload
    must not forget which upstreams echo OPT: that would reopen the window the hold guards).
    Every transport gets `filters`, and takes from them what applies to it (forgery.py)."""
    upstream: Upstream
    if spec.scheme == "udp":
        upstream = UdpUpstream(spec.host, spec.port, telemetry, filters, polluted,
                               hijack_threshold=spec.hijack_threshold,
                               tcp_for_polluted=tcp_for_polluted, name=spec.name)
    elif spec.scheme == "tcp":
        upstream = StreamUpstream(spec.host, spec.port, telemetry, filters, name=spec.name)
    elif spec.scheme == "tls":
        upstream = StreamUpstream(spec.host, spec.port, telemetry, filters,
                                  ssl_context=ssl_context, server_name=spec.server_name,
                                  name=spec.name)
    else:
        upstream = HttpsUpstream(spec.url or "", telemetry, ssl_context, filters,
                                 address=spec.bootstrap)
    if edns is not None:
        upstream.edns = edns
    return upstream


def client_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """System trust store, or only the given CA for private upstreams."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
