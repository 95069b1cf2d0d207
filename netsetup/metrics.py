"""The appliance's counters, read from its Prometheus endpoint, for `netsetup status`.

The endpoint listens inside the container (METRICS_PORT, not published); the host reaches it
over the bridge at the container's own address.
"""

from __future__ import annotations

import re
import urllib.request
from collections import defaultdict

from dnsproxy.defaults import METRICS_PORT

_LINE = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            labels = dict(_LABEL.findall(match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def summarize(samples: list[tuple[str, dict[str, str], float]]) -> dict:
    """What an operator looks at first: traffic, cache, forgeries and upstream health."""
    totals: defaultdict[str, float] = defaultdict(float)
    forgeries: defaultdict[str, float] = defaultdict(float)
    errors: defaultdict[str, float] = defaultdict(float)
    latency: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, labels, value in samples:
        totals[name] += value
        if name == "dnsproxy_forgeries_total":
            forgeries[f"{labels.get('upstream')} {labels.get('reason')}"] += value
        elif name == "dnsproxy_upstream_errors_total":
            errors[f"{labels.get('upstream')} {labels.get('reason')}"] += value
        elif name == "dnsproxy_upstream_latency_seconds_sum":
            latency[labels.get("upstream", "?")][0] += value
        elif name == "dnsproxy_upstream_latency_seconds_count":
            latency[labels.get("upstream", "?")][1] += value
    return {
        "queries": int(totals["dnsproxy_queries_total"]),
        "cache_hits": int(totals["dnsproxy_cache_hits_total"]),
        "cache_entries": int(totals["dnsproxy_cache_entries"]),
        "forgeries_discarded": {k: int(v) for k, v in sorted(forgeries.items())},
        "upstream_errors": {k: int(v) for k, v in sorted(errors.items())},
        "upstream_latency_ms": {k: round(s / n * 1000, 2) for k, (s, n) in latency.items() if n},
    }


def fetch(address: str, port: int = METRICS_PORT, timeout: float = 2.0) -> dict:
    """The summary, or {"error": ...} when the endpoint cannot be read."""
    url = f"http://{address}:{port}/metrics"
    # The container's address is reached over the local bridge: never through a proxy that
    # http_proxy / HTTP_PROXY may name (it could not reach the bridge, and would see the counters).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return summarize(parse(response.read().decode()))
    except OSError as exc:
        return {"error": f"{url}: {getattr(exc, 'reason', exc)}"}
