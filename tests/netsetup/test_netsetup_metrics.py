"""`netsetup status` reads the appliance's counters: parse what dnsproxy really renders."""

from dnsproxy.metrics import Metrics
from netsetup.metrics import parse, summarize


def test_summary_of_rendered_counters() -> None:
    metrics = Metrics()
    metrics.inc("dnsproxy_queries_total", 5, transport="udp")
    metrics.inc("dnsproxy_queries_total", 2, transport="tcp")
    metrics.inc("dnsproxy_cache_hits_total", 3)
    metrics.inc("dnsproxy_forgeries_total", upstream="192.0.2.1:53", reason="no-edns")
    metrics.inc("dnsproxy_forgeries_total", 2, upstream="192.0.2.1:53", reason="forged-address")
    metrics.inc("dnsproxy_upstream_errors_total", upstream="tls://192.0.2.2:853", reason="timeout")
    metrics.inc("dnsproxy_upstream_latency_seconds_sum", 0.5, upstream="192.0.2.1:53")
    metrics.inc("dnsproxy_upstream_latency_seconds_count", 4, upstream="192.0.2.1:53")
    metrics.gauge("dnsproxy_cache_entries", lambda: 9)
    summary = summarize(parse(metrics.render()))
    assert summary == {
        "queries": 7,
        "cache_hits": 3,
        "cache_entries": 9,
        "forgeries_discarded": {"192.0.2.1:53 forged-address": 2, "192.0.2.1:53 no-edns": 1},
        "upstream_errors": {"tls://192.0.2.2:853 timeout": 1},
        "upstream_latency_ms": {"192.0.2.1:53": 125.0},
    }
