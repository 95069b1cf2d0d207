"""DNS over HTTPS (RFC 8484), on httpx: connection reuse, HTTP/2 when `h2` is installed.

httpx is imported only when an https:// upstream is configured, so the forwarder starts without
it otherwise. A server given by host name is never looked up through the system resolver:
the request goes to its address (given in the spec, or found by a Bootstrap through the other
upstreams) with the name in SNI, in the certificate check (httpx's `sni_hostname` request
extension) and in the Host header. Replies are judged by the forgery filters encrypted
transports get (forgery.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import ssl
import time

from .. import wire
from ..forgery import EdnsState, ForgeryFilters
from .base import Answer, Telemetry, UpstreamError, judge_stream, matches
from .bootstrap import Bootstrap

MEDIA_TYPE = "application/dns-message"


class HttpsUpstream:
    transport = "https"

    def __init__(self, url: str, telemetry: Telemetry, ssl_context: ssl.SSLContext,
                 filters: ForgeryFilters, address: str | None = None) -> None:
        import httpx

        self.url = url
        self.name = url
        self._url = httpx.URL(url)
        self.address = address  # where the named server is, when the spec says
        try:
            ipaddress.ip_address(self._url.host)
            self.by_name = False
        except ValueError:
            self.by_name = True  # needs an address or a bootstrap: never the system resolver
        self.bootstrap: Bootstrap | None = None  # how to find it otherwise (set by the caller)
        self.telemetry = telemetry
        self.filters = filters.for_stream(encrypted=True)
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
            response = await asyncio.wait_for(self._post(body, deadline),
                                               max(deadline - loop.time(), 0))
        except TimeoutError:
            raise self._error("timeout") from None
        except UpstreamError as exc:
            raise self._error(exc.reason) from None
        except self._httpx.HTTPError as exc:
            connect_failed = (self._httpx.ConnectError, self._httpx.ConnectTimeout)
            if self.bootstrap is not None and isinstance(exc, connect_failed):
                self.bootstrap.forget()  # the address may have moved: look it up again
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
        return judge_stream(self, query, data, reply)

    async def _post(self, body: bytes, deadline: float):
        if self.address is None and self.bootstrap is None:
            if self.by_name:
                raise UpstreamError("no-bootstrap")
            return await self.client.post(self.url, content=body)  # the URL holds an address
        address = self.address or await self.bootstrap.locate(deadline)
        host = self._url.host
        return await self.client.post(self._url.copy_with(host=address), content=body,
                                      headers={"host": self._url.netloc.decode("ascii")},
                                      extensions={"sni_hostname": host})

    def _error(self, reason: str) -> UpstreamError:
        self.telemetry.error(self.name, reason)
        return UpstreamError(reason)

    async def close(self) -> None:
        await self.client.aclose()
