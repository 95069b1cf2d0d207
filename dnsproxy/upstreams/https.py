"""DNS over HTTPS (RFC 8484), on httpx: connection reuse, HTTP/2 when `h2` is installed.

httpx is imported only when an https:// upstream is configured, so the forwarder starts without
it otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ssl
import time

from .. import wire
from ..forgery import EdnsState
from .base import Answer, Telemetry, UpstreamError, matches

MEDIA_TYPE = "application/dns-message"


class HttpsUpstream:
    transport = "https"

    def __init__(self, url: str, telemetry: Telemetry, ssl_context: ssl.SSLContext,
                 hijack_threshold: float = 0.0) -> None:
        import httpx

        self.url = url
        self.name = url
        self.telemetry = telemetry
        self.hijack_threshold = hijack_threshold
        self.edns = EdnsState()
        self._httpx = httpx
        http2 = importlib.util.find_spec("h2") is not None
        self.client = httpx.AsyncClient(verify=ssl_context, http2=http2, trust_env=False,
                                        headers={"accept": MEDIA_TYPE,
                                                 "content-type": MEDIA_TYPE})

    async def exchange(self, query: wire.Query, deadline: float, edns: bool = True) -> Answer:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.telemetry.sent(self.name, self.transport)
        # ID 0, as RFC 8484 recommends, so HTTP caches can share the response.
        body = wire.upstream_query(query, 0, edns)
        try:
            response = await asyncio.wait_for(self.client.post(self.url, content=body),
                                               max(deadline - loop.time(), 0))
        except TimeoutError:
            raise self._error("timeout") from None
        except self._httpx.HTTPError as exc:
            raise self._error(type(exc).__name__.lower()) from None
        except (OSError, ssl.SSLError) as exc:
            raise self._error(type(exc).__name__.lower()) from None
        if response.status_code != 200:
            raise self._error(f"http-{response.status_code}")
        data = response.content
        try:
            reply = wire.parse_reply(data)
        except wire.WireError:
            raise self._error("malformed") from None
        if reply.id != 0 or not matches(reply, query):
            raise self._error("mismatch")
        self.telemetry.latency(self.name, time.monotonic() - started)
        return Answer(data, reply)

    def _error(self, reason: str) -> UpstreamError:
        self.telemetry.error(self.name, reason)
        return UpstreamError(reason)

    async def close(self) -> None:
        await self.client.aclose()
