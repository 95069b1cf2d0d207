"""What an upstream is, as the settings write it: `parse_spec` reads one `--upstream` value
into an `UpstreamSpec` (forms in upstreams/__init__.py). Apart from the transports so that
reading the settings stays light: `dnsproxy` binds its sockets right after (listen.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit


def hostport(host: str, port: int) -> str:
    """How an address is written in specs, logs and metrics: IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


DEFAULT_PORTS = {"udp": 53, "tcp": 53, "tls": 853, "https": 443}


@dataclass(frozen=True)
class UpstreamSpec:
    scheme: str  # udp, tcp, tls, https
    host: str
    port: int
    server_name: str | None = None  # tls: the name to verify; https: unused
    url: str | None = None  # https only
    hijack_threshold: float = 0.0  # seconds; udp only
    bootstrap: str | None = None  # https by host name: the address to connect to

    @property
    def needs_bootstrap(self) -> bool:
        """DoH by host name with no address given: looked up through the other upstreams."""
        return self.scheme == "https" and self.bootstrap is None and not _is_ip(self.host)

    @property
    def name(self) -> str:
        if self.url:
            return self.url
        address = hostport(self.host, self.port)
        return address if self.scheme == "udp" else f"{self.scheme}://{address}"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _bootstrap(text: str, host: str, spec: str) -> str | None:
    """The `#IP` or `#[IPv6]` after a DoH URL: where the server named in it is reached."""
    if not text:
        return None
    address = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if not _is_ip(address):
        raise ValueError(f"bad upstream {spec!r}: {text!r} after '#' is not an IP address")
    if _is_ip(host):
        raise ValueError(f"bad upstream {spec!r}: '#address' is for a host name, "
                         f"and {host!r} is an address already")
    return str(ipaddress.ip_address(address))


def _split_hostport(text: str, default_port: int, spec: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad upstream {spec!r}: unbalanced brackets")
        port_text = rest[1:]
    elif text.count(":") > 1:  # a bare IPv6 address, no port
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad upstream {spec!r}: {host!r} is not an IP address") from None
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad upstream {spec!r}: port {port_text!r}")
        port = int(port_text)
    return str(ip), port


def parse_spec(spec: str, hijack_threshold_ms: float = 0.0) -> UpstreamSpec:
    """Read one --upstream value; ValueError with a one-line message when it is not valid.

    A hijack threshold is for UDP only: it tells an injector racing the genuine reply from the
    upstream, and no injector races a TCP, TLS or HTTPS reply. Accepted there, it would be
    silently ignored, so it is refused."""
    text = spec.strip()
    if not text:
        raise ValueError("empty upstream")
    scheme = "udp"
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"bad upstream {spec!r}: unknown scheme {scheme!r} "
                             "(use udp, tcp, tls or https)")
    if hijack_threshold_ms and scheme != "udp":
        raise ValueError(f"bad upstream {spec!r}: hijack_threshold is for plain UDP upstreams "
                         f"only (no injector races a {scheme} reply)")
    threshold = hijack_threshold_ms / 1000
    if scheme == "https":
        text, _, bootstrap = text.partition("#")
        parts = urlsplit("https://" + text)
        if not parts.hostname:
            raise ValueError(f"bad upstream {spec!r}: no host")
        try:
            port = parts.port or 443
        except ValueError:
            raise ValueError(f"bad upstream {spec!r}: bad port") from None
        url = f"https://{text}" if parts.path else f"https://{text}/dns-query"
        return UpstreamSpec("https", parts.hostname, port, url=url,
                            bootstrap=_bootstrap(bootstrap, parts.hostname, spec))
    text, _, server_name = text.partition("#")
    text = text.rstrip("/")
    host, port = _split_hostport(text, DEFAULT_PORTS[scheme], spec)
    if server_name and scheme != "tls":
        raise ValueError(f"bad upstream {spec!r}: '#name' is only for tls://")
    return UpstreamSpec(scheme, host, port, server_name or None, hijack_threshold=threshold)
