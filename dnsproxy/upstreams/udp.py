"""Plain DNS over UDP, where injectors strike, with every defence against them.

Each query gets its own connected socket: the kernel picks a random source port and drops
datagrams from any other address and port, and we pick a random ID. A reply that fails a check
is discarded and we keep listening, because the injector's forgery arrives first and the
genuine reply after it. Once a forgery is seen, the same question also goes out over TCP, which
an injector cannot answer in-path without also forging the TCP stream; later queries for that
name go over TCP first, and back to UDP with every defence when TCP fails (blocked or reset):
an answer the defences accept beats a certain SERVFAIL.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time

from .. import wire
from ..forgery import TEACHING_REASONS, EdnsMarker, EdnsState, ForgeryFilters
from .base import Answer, PollutedNames, Telemetry, UpstreamError, hostport, matches, os_reason
from .stream import StreamUpstream


class UdpUpstream:
    transport = "udp"

    def __init__(self, host: str, port: int, telemetry: Telemetry, filters: ForgeryFilters,
                 polluted: PollutedNames, *, hijack_threshold: float = 0.0,
                 tcp_for_polluted: bool = True, edns_grace: float = 0.5,
                 name: str | None = None) -> None:
        self.address = (host, port)
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.name = name or hostport(host, port)
        self.telemetry = telemetry
        self.filters = filters
        self.polluted = polluted
        self.hijack_threshold = hijack_threshold
        self.tcp_for_polluted = tcp_for_polluted
        self.edns_grace = edns_grace
        self.edns = EdnsState()
        # Holding OPT-less replies only serves the EDNS-marker defence.
        self.hold_plain = filters.has(EdnsMarker)
        self.filters_without_opt = filters.without(EdnsMarker)  # for queries sent without OPT
        # Same server over TCP: for truncated replies and for names an injector targets.
        self.tcp = StreamUpstream(host, port, telemetry, name=self.name, error_prefix="tcp-")

    async def exchange(self, query: wire.Query, deadline: float, edns: bool = True) -> Answer:
        if self.tcp_for_polluted and query.key in self.polluted:
            loop = asyncio.get_running_loop()
            # TCP gets half the time left: the other half is for UDP should TCP fail.
            tcp_deadline = loop.time() + max(deadline - loop.time(), 0) / 2
            try:
                return await self.tcp.exchange(query, tcp_deadline, edns)
            except UpstreamError:
                pass  # counted by the stream upstream as "tcp-<reason>"
        return await _Exchange(self, query, edns).run(deadline)

    async def close(self) -> None:
        await self.tcp.close()


class _Exchange:
    """One query to one UDP upstream, from send to the genuine reply or the deadline."""

    def __init__(self, upstream: UdpUpstream, query: wire.Query, edns: bool) -> None:
        self.up = upstream
        self.query = query
        self.edns = edns  # sent with OPT: only then does the EDNS marker mean anything
        self.filters = upstream.filters if edns else upstream.filters_without_opt
        self.loop = asyncio.get_running_loop()
        self.result: asyncio.Future = self.loop.create_future()
        self.sock: socket.socket | None = None
        self.qid = secrets.randbits(16)
        self.sent_at = 0.0
        self.held: tuple[bytes, wire.Reply] | None = None
        self.hold_timer: asyncio.TimerHandle | None = None
        self.tcp_task: asyncio.Task | None = None
        self.losers: list[wire.Reply] = []  # discarded replies that may teach, once beaten

    async def run(self, deadline: float) -> Answer:
        up = self.up
        sock = self.sock = socket.socket(up.family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            try:
                sock.connect(up.address)
                sock.send(wire.upstream_query(self.query, self.qid, self.edns))
            except OSError as exc:
                up.telemetry.error(up.name, os_reason(exc))
                raise UpstreamError(os_reason(exc)) from None
            self.sent_at = time.monotonic()
            up.telemetry.sent(up.name, "udp")
            self.loop.add_reader(sock.fileno(), self._readable)
            try:
                result = await asyncio.wait_for(self.result, max(deadline - self.loop.time(), 0))
            except TimeoutError:
                if self.held is not None:
                    return Answer(*self.held, verified=False)  # as in _release_held
                # Learn nothing from a timeout: an injector can drop genuine replies.
                up.telemetry.error(up.name, "timeout")
                raise UpstreamError("timeout") from None
            up.telemetry.latency(up.name, time.monotonic() - self.sent_at)
            return result
        finally:
            self.loop.remove_reader(sock.fileno())
            sock.close()
            if self.hold_timer is not None:
                self.hold_timer.cancel()
            if self.tcp_task is not None and not self.tcp_task.done():
                self.tcp_task.cancel()

    def _readable(self) -> None:
        while not self.result.done():
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP port unreachable and the like
                if self.tcp_task is None:
                    self.up.telemetry.error(self.up.name, os_reason(exc))
                    self.result.set_exception(UpstreamError(os_reason(exc)))
                return
            self._judge(data)

    def _judge(self, data: bytes) -> None:
        up, query = self.up, self.query
        try:
            reply = wire.parse_reply(data)
        except wire.WireError:
            up.telemetry.forgery(up.name, query, "malformed")
            return
        if reply.id != self.qid or not matches(reply, query):
            up.telemetry.forgery(up.name, query, "mismatch")
            return
        reason = self.filters.verdict(up, reply, time.monotonic() - self.sent_at)
        if reason:
            if reason in TEACHING_REASONS:
                self.losers.append(reply)
            self._discard(reason)
            return
        if reply.truncated:
            self._ask_over_tcp()
            return
        if reply.opt is None and up.edns.speaks_edns is None and up.hold_plain and self.edns:
            # Unknown yet whether this upstream echoes OPT: the first OPT-less reply may be
            # an injector's. Hold the latest one briefly and ask over TCP, whose reply
            # settles it; a genuine OPT reply over UDP overrides it too.
            if self.held is not None:
                self.losers.append(self.held[1])
                self._discard("superseded")
            self.held = (data, reply)
            if self.hold_timer is None:
                self.hold_timer = self.loop.call_later(up.edns_grace, self._release_held)
            self._ask_over_tcp()
            return
        self.result.set_result(self._accept(data, reply))

    def _accept(self, data: bytes, reply: wire.Reply) -> Answer:
        """The genuine reply (over UDP or the TCP retry): it also settles what was held."""
        losers = self.losers
        if self.held is not None and reply is not self.held[1] and reply.opt is not None:
            # The upstream does echo OPT: the OPT-less reply we held was forged.
            self._count_forgery("no-edns")
            losers = [*losers, self.held[1]]
        if self.filters.learner is not None:
            self.filters.learner.learn(losers, reply)
        if self.edns:  # a query without OPT gets a reply without one: that teaches nothing
            self.up.edns.saw_genuine(reply.opt is not None)
        return Answer(data, reply)

    def _release_held(self) -> None:
        # Nothing better came: answer with it, but neither learn from nor cache a reply that
        # may be forged (three such would otherwise switch the EDNS defence off for good).
        if self.held is not None and not self.result.done():
            self.result.set_result(Answer(*self.held, verified=False))

    def _discard(self, reason: str) -> None:
        self._count_forgery(reason)
        # An OPT-less reply discarded always gets checked over TCP, the defence switch aside:
        # only a genuine reply can tell that the upstream has stopped echoing OPT.
        if self.up.tcp_for_polluted or reason == EdnsMarker.reason:
            self._ask_over_tcp()

    def _count_forgery(self, reason: str) -> None:
        up = self.up
        up.telemetry.forgery(up.name, self.query, reason)
        up.polluted.add(self.query.key)

    def _ask_over_tcp(self) -> None:
        if self.tcp_task is not None:
            return
        deadline = self.loop.time() + 3600  # bounded by the caller's wait, which cancels us
        self.tcp_task = self.loop.create_task(
            self.up.tcp.exchange(self.query, deadline, self.edns))
        self.tcp_task.add_done_callback(self._tcp_done)

    def _tcp_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        failed = task.exception() is not None  # read even when unused: no "never retrieved"
        if self.result.done():
            return
        if not failed:
            answer = task.result()
            self.result.set_result(self._accept(answer.data, answer.reply))
        # Otherwise TCP failed too (the stream upstream counted it as "tcp-<reason>"): keep
        # listening on UDP until the deadline.
