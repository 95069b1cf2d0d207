"""The chain every query passes through, and the vocabulary its stages share.

A stage either answers a request at once (`answer` returns a Response) or passes it on (returns
None). Only the last link, the resolver, may wait on the network, so a request that a stage can
answer (refused, rate-limited, cached, local) never costs an asyncio task. Once the resolver's
response has gone out, every stage may `observe` it: that is how the cache learns what the
upstreams said, after the client has its answer rather than before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .wire import Query


@dataclass(slots=True)
class Request:
    query: Query
    client: tuple  # (address, port) as the socket reported it
    transport: str  # "udp" or "tcp"
    started: float  # time.monotonic() at arrival
    # The client's rate limit as the compiled UDP path took it (True: within it, False: over);
    # None: not taken yet, the rate-limit stage's to take.
    rate: bool | None = None


@dataclass(slots=True)
class Response:
    """What goes back to the client; `wire` is None when nothing is to be sent (rate-limited)."""

    wire: bytes | None
    reason: str  # cached, forwarded, local, refused, ratelimited, servfail, formerr
    rcode: int
    upstream: str | None = None
    cacheable: object | None = None  # a wire.CachedReply the cache may keep
    group: str | None = None  # split DNS: the upstream group that answered (domestic, trusted)
    why: str | None = None  # and why that group (listed, verdict, in-range, ...)


class Stage(Protocol):
    name: str

    def answer(self, request: Request) -> Response | None: ...

    def observe(self, request: Request, response: Response) -> None: ...


class Resolver(Protocol):
    async def resolve(self, request: Request) -> Response: ...


class PassThrough:
    """Base for stages that only answer, or only observe."""

    name = "stage"

    def answer(self, request: Request) -> Response | None:
        return None

    def observe(self, request: Request, response: Response) -> None:
        return None


class Pipeline:
    """Stages in order, then the resolver. The order is data: see `build_pipeline`."""

    def __init__(self, stages: list[Stage], resolver: Resolver) -> None:
        self.stages = stages
        self.resolver = resolver
        # Only stages that override observe() are called on the way back.
        self._observers = [s for s in reversed(stages)
                           if type(s).observe is not PassThrough.observe]

    def answer_now(self, request: Request) -> Response | None:
        for stage in self.stages:
            response = stage.answer(request)
            if response is not None:
                return response
        return None

    async def resolve(self, request: Request) -> Response:
        """The resolver's response; the caller sends it, then calls `observe`."""
        return await self.resolver.resolve(request)

    def observe(self, request: Request, response: Response) -> None:
        for stage in self._observers:
            stage.observe(request, response)
