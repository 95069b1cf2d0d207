"""Counters for everything the forwarder decides, exposed in the Prometheus text format.

Counting is a dict increment on the hot path; rendering happens only when someone scrapes.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

HELP = {
    "dnsproxy_queries_total": "Queries received, by transport.",
    "dnsproxy_responses_total": "Responses sent, by how they were produced (cache hits: "
                                "only the stale ones).",
    "dnsproxy_cache_hits_total": "Queries answered from the cache, stale answers included.",
    "dnsproxy_cache_refreshes_total": "Cache entries fetched anew before or after expiry, "
                                      "by kind (prefetch, stale) and result (stored, failed).",
    "dnsproxy_cache_misses_total": "Queries the cache could not answer.",
    "dnsproxy_forgeries_total": "Forged replies discarded, by upstream and reason.",
    "dnsproxy_upstream_queries_total": "Queries sent upstream, by upstream and transport.",
    "dnsproxy_upstream_errors_total": "Upstream failures, by upstream and reason.",
    "dnsproxy_upstream_late_replies_total": "UDP replies to queries already answered (over "
                                            "TCP, past the deadline) or given up, dropped.",
    "dnsproxy_upstream_latency_seconds_sum": "Total latency of genuine upstream replies.",
    "dnsproxy_upstream_latency_seconds_count": "Genuine upstream replies timed.",
    "dnsproxy_malformed_total": "Messages from clients that were not a usable query.",
    "dnsproxy_tcp_connections_rejected_total": "TCP connections closed for exceeding a limit.",
    "dnsproxy_metrics_connections_rejected_total": "Metrics connections closed at the cap.",
    "dnsproxy_cache_entries": "Replies held in the cache.",
    "dnsproxy_cache_bytes": "Bytes the cached replies take (keys and stored messages).",
    "dnsproxy_cache_purged_total": "Cached replies dropped because an address they carry became "
                                   "known as forged, by why (learned, listed by a reload, "
                                   "loaded from the cache file).",
    "dnsproxy_split_decisions_total": "Split DNS: queries answered by each upstream group "
                                      "(domestic, trusted), by why that group.",
    "dnsproxy_forged_learned": "Forged addresses learned from replies that lost to a genuine "
                               "one, used like the shipped list.",
    "dnsproxy_forged_learned_total": "Addresses added to the learned forged list.",
    "dnsproxy_forged_unlearned_total": "Learned forged addresses taken off the list by an "
                                       "encrypted upstream's answer.",
    "dnsproxy_overload_total": "Queries not taken on because too many were in flight.",
    "dnsproxy_local_answers_total": "Names answered here, by why: hosts, localhost, rfc6303, "
                                    "local-domain, single-label, ddr, canary, ...",
    "dnsproxy_zone_routes_total": "Queries sent to the LAN's resolver (group local) or a "
                                  "zone's, by why: local-domain, single-label, local-reverse, "
                                  "zone.",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.values: defaultdict[tuple[str, tuple], float] = defaultdict(float)
        self.gauges: dict[str, object] = {}  # name -> callable returning the current value
        # Called before each render: counts kept elsewhere come in (fastpath.py's batches).
        self.before_render: list = []

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self.values[(name, tuple(sorted(labels.items())))] += amount

    def key(self, name: str, **labels: str) -> tuple:
        """A counter's key, for hot paths: `metrics.values[key] += 1` skips building it."""
        return (name, tuple(sorted(labels.items())))

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0)

    def total(self, name: str) -> float:
        return sum(v for (n, _), v in self.values.items() if n == name)

    def gauge(self, name: str, read) -> None:
        self.gauges[name] = read

    def render(self) -> str:
        for bring_in in self.before_render:
            bring_in()
        lines: list[str] = []
        seen: set[str] = set()
        items = sorted(self.values.items())
        items += [((name, ()), read()) for name, read in self.gauges.items()]
        for (name, labels), value in items:
            if name not in seen:
                seen.add(name)
                kind = "gauge" if name in self.gauges else "counter"
                if name.endswith(("_sum", "_count")):
                    kind = "untyped"
                lines.append(f"# HELP {name} {HELP.get(name, name)}")
                lines.append(f"# TYPE {name} {kind}")
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}" if labels else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


MAX_METRICS_CONNECTIONS = 16  # a scraper needs one; more are someone holding sockets
METRICS_TIMEOUT = 5.0  # seconds for a request to arrive, and again for its answer to leave


async def serve_metrics(metrics: Metrics, host: str, port: int, allowed=lambda address: True,
                        max_connections: int = MAX_METRICS_CONNECTIONS,
                        timeout: float = METRICS_TIMEOUT) -> asyncio.AbstractServer:
    """A minimal HTTP endpoint: every GET gets the current counters.

    `allowed(address)` is the resolver's own access control: whoever may not ask us names may
    not read what others asked either. At most `max_connections` are open at once (others
    are closed at once) and none stays longer than `timeout` idle, so open sockets cannot
    pile up on this port.
    """
    active: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("",)
        if not allowed(peer[0]) or len(active) >= max_connections:
            if len(active) >= max_connections:
                metrics.inc("dnsproxy_metrics_connections_rejected_total")
            writer.close()
            return
        active.add(writer)
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            if request.startswith(b"GET "):
                body = metrics.render().encode()
                head = ("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            else:
                body = b""
                head = ("HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n"
                        "Connection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), timeout)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            active.discard(writer)
            writer.close()

    return await asyncio.start_server(handle, host, port)
