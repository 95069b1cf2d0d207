"""One JSON line per query and per discarded forgery, on standard output.

`docker logs` then shows who asked what. When the log is off, the forwarder holds a `NullLog`,
so the hot path pays one method call and builds no strings.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time
from collections.abc import Iterable
from typing import TextIO

from .pipeline import Request, Response
from .wire import CLASS_CH

LOOPBACK = ("127.0.0.1", "::1")

RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
          16: "BADVERS"}
TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
         33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}


def type_name(qtype: int) -> str:
    return TYPES.get(qtype) or f"TYPE{qtype}"


class QueryLog:
    """Lines are written once per turn of the event loop, not once per query: under load one
    write carries many lines, and a slow reader of stdout costs one stall, not one per query."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.buffer: list[str] = []

    def _write(self, record: dict) -> None:
        self.buffer.append(json.dumps(record, separators=(",", ":")))
        if len(self.buffer) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop running: write now
                self.flush()

    def flush(self) -> None:
        lines, self.buffer = self.buffer, []
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not take the server down

    def query(self, request: Request, response: Response) -> None:
        self.answered(request, response, time.time(), time.monotonic())

    def answered(self, request: Request, response: Response, at: float, done: float) -> None:
        """A query answered at `at` (wall clock), `done` (monotonic): the compiled UDP path's
        hits reach the log this way, in batches, after the fact."""
        q = request.query
        if q.qclass == CLASS_CH and request.client[0] in LOOPBACK:
            return  # the container's health check every few seconds is not client traffic
        record = {
            "ts": round(at, 3),
            "client": request.client[0],
            "port": request.client[1],
            "transport": request.transport,
            "name": q.name,
            "type": type_name(q.qtype),
            "rcode": RCODES.get(response.rcode, str(response.rcode)),
            "reason": response.reason,
            "upstream": response.upstream,
            "cached": response.reason in ("cached", "stale"),  # reason says which
            "latency_ms": round((done - request.started) * 1000, 3),
        }
        if response.group is not None:  # split DNS and zones: which group answered
            record["group"] = response.group
        if response.why is not None:  # and why that group, or why answered here
            record["why"] = response.why
        self._write(record)

    def forgery(self, upstream: str, name: str | None, qtype: int | None, reason: str,
                addresses: Iterable[bytes] = ()) -> None:
        """`name` and `qtype` are None for a forgery whose question could not be read;
        `addresses` are the A/AAAA data it carried (what the censor wanted the client to reach)."""
        self._write({
            "ts": round(time.time(), 3),
            "event": "forgery",
            "upstream": upstream,
            "name": name,
            "type": None if qtype is None else type_name(qtype),
            "reason": reason,
            "addresses": address_texts(addresses),
        })

    def upstream_reply(self, upstream: str, seconds: float) -> None:
        """A genuine reply's latency: the history keeps it, the log line of the query has it."""

    def upstream_error(self, upstream: str, reason: str) -> None:
        """An upstream's failure: the history keeps it; the metrics count it for the log."""


def address_texts(addresses: Iterable[bytes]) -> list[str]:
    """A/AAAA rdata as text, for the rare forgery (never on the hot path)."""
    return [str(ipaddress.ip_address(a)) for a in addresses if len(a) in (4, 16)]


class NullLog(QueryLog):
    def query(self, request: Request, response: Response) -> None:
        pass

    def answered(self, request: Request, response: Response, at: float, done: float) -> None:
        pass

    def forgery(self, upstream: str, name: str | None, qtype: int | None, reason: str,
                addresses: Iterable[bytes] = ()) -> None:
        pass


class Tee(QueryLog):
    """The JSON lines and the page's history, both: each call goes to every log."""

    def __init__(self, *logs: QueryLog) -> None:
        self.logs = logs

    def query(self, request: Request, response: Response) -> None:
        for log in self.logs:
            log.query(request, response)

    def answered(self, request: Request, response: Response, at: float, done: float) -> None:
        for log in self.logs:
            log.answered(request, response, at, done)

    def forgery(self, upstream: str, name: str | None, qtype: int | None, reason: str,
                addresses: Iterable[bytes] = ()) -> None:
        for log in self.logs:
            log.forgery(upstream, name, qtype, reason, addresses)

    def upstream_reply(self, upstream: str, seconds: float) -> None:
        for log in self.logs:
            log.upstream_reply(upstream, seconds)

    def upstream_error(self, upstream: str, reason: str) -> None:
        for log in self.logs:
            log.upstream_error(upstream, reason)

    def flush(self) -> None:
        for log in self.logs:
            log.flush()
