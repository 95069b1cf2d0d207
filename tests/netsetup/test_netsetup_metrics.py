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


def test_fetch_ignores_proxy_variables(monkeypatch) -> None:
    """The counters are read straight from the container's address, whatever http_proxy says."""
    import http.server
    import threading

    from netsetup.metrics import fetch

    body = Metrics()
    body.inc("dnsproxy_queries_total", 3, transport="udp")
    text = body.render().encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        for name in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens: refused
        summary = fetch("127.0.0.1", server.server_address[1])
        assert summary.get("queries") == 3, summary
    finally:
        server.shutdown()
        server.server_close()
