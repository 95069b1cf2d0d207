"""One JSON line per query and per discarded forgery, on standard output.

`docker logs` then shows who asked what. When the log is off, the forwarder holds a `NullLog`,
so the hot path pays one method call and builds no strings.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
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
        q = request.query
        if q.qclass == CLASS_CH and request.client[0] in LOOPBACK:
            return  # the container's health check every few seconds is not client traffic
        record = {
            "ts": round(time.time(), 3),
            "client": request.client[0],
            "port": request.client[1],
            "transport": request.transport,
            "name": q.name,
            "type": type_name(q.qtype),
            "rcode": RCODES.get(response.rcode, str(response.rcode)),
            "reason": response.reason,
            "upstream": response.upstream,
            "cached": response.reason in ("cached", "stale"),  # reason says which
            "latency_ms": round((time.monotonic() - request.started) * 1000, 3),
        }
        if response.group is not None:  # split DNS and zones: which group answered
            record["group"] = response.group
        if response.why is not None:  # and why that group, or why answered here
            record["why"] = response.why
        self._write(record)

    def forgery(self, upstream: str, name: str | None, qtype: int | None, reason: str) -> None:
        """`name` and `qtype` are None for a forgery whose question could not be read."""
        self._write({
            "ts": round(time.time(), 3),
            "event": "forgery",
            "upstream": upstream,
            "name": name,
            "type": None if qtype is None else type_name(qtype),
            "reason": reason,
        })


class NullLog(QueryLog):
    def query(self, request: Request, response: Response) -> None:
        pass

    def forgery(self, upstream: str, name: str | None, qtype: int | None, reason: str) -> None:
        pass
