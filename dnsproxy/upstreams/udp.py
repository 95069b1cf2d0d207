"""Plain DNS over UDP, where injectors strike, with every defence against them.

Queries go out on a small pool of connected sockets per upstream: the kernel picks each one's
source port at random and drops datagrams from any other address and port, and every query gets
a random ID that no other query on its socket has had. A socket carries at most `max_uses`
queries and is given new ones for at most `max_age` seconds, then retired (closed once its last
query is done), so a source port never stays in use for long: the port is half of what a blind
spoofer must guess, and a fixed one would leave only the ID. Opening a socket per query cost more
than the rest of a cache miss together (socket, connect, event-loop registration, close).

Replies are told apart by ID, then checked against the question that ID was sent with. A reply
that fails a check is discarded and we keep listening, because the injector's forgery arrives
first and the genuine reply after it. Once a forgery is seen, the same question also goes out
over TCP, which an injector cannot answer in-path without also forging the TCP stream; later
queries for that name go over TCP first, and back to UDP with every defence when TCP fails
(blocked or reset): an answer the defences accept beats a certain SERVFAIL. The TCP reply is
judged too, by the filters forgery.py gives TCP (the address lists): one they condemn counts as
a forgery and as TCP failing, so UDP keeps listening until the deadline.

A FORMERR or NOTIMP without OPT to a query with OPT (an old server, RFC 6891 section 7, or an
injector trying to talk us out of the EDNS marker) is held like any OPT-less reply while TCP
settles it, but longer: it is of no use to the client, and TCP confirming it lets the forwarder
ask without OPT and remember that. When TCP cannot (it fails), it is released after the usual
hold, unverified: the forwarder then asks this one query without OPT and remembers nothing.

ICMP errors on a shared socket: the kernel reports "port unreachable" on a connected socket as
one pending error that names no datagram, so it cannot be pinned on one query. (Linux would
queue the quoted datagram with IP_RECVERR, but libuv reads that queue itself and uvloop then
crashes on the entry, so we do not ask for it.) An ICMP error therefore fails every query waiting
on that socket, except those a TCP retry may still answer, and retires the socket: the upstream
refused traffic from this port, and failing over at once beats waiting out the deadline. A forged
ICMP error needs the port and costs those queries an answer from this upstream, never a forged
answer, and the next queries go out on a fresh port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable

from .. import wire
from ..forgery import OPT_REFUSALS, TEACHING_REASONS, EdnsMarker, EdnsState, ForgeryFilters
from ..upstreamspec import hostport
from .base import Answer, PollutedNames, Telemetry, UpstreamError, matches, os_reason
from .stream import StreamUpstream

MAX_USES = 64  # queries one socket carries; also bounds its pending IDs far below 65536
MAX_AGE = 2.0  # seconds a socket is given new queries


class _Ids:
    """Random 16-bit IDs from the system's CSPRNG, fetched 256 at a time: one getrandom call
    per query was a syscall on every cache miss. A forked worker starts a batch of its own."""

    def __init__(self) -> None:
        self.batch: list[int] = []
        os.register_at_fork(after_in_child=self.batch.clear)

    def next(self) -> int:
        if not self.batch:
            self.batch = list(memoryview(os.urandom(512)).cast("H"))
        return self.batch.pop()


_ids = _Ids()


class UdpUpstream:
    transport = "udp"

    def __init__(self, host: str, port: int, telemetry: Telemetry, filters: ForgeryFilters,
                 polluted: PollutedNames, *, hijack_threshold: float = 0.0,
                 tcp_for_polluted: bool = True, edns_grace: float = 0.5,
                 name: str | None = None, max_uses: int = MAX_USES,
                 max_age: float = MAX_AGE) -> None:
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
        self.tcp = StreamUpstream(host, port, telemetry, filters, name=self.name,
                                  error_prefix="tcp-")
        self.max_uses = max_uses
        self.max_age = max_age
        self.loop: asyncio.AbstractEventLoop | None = None  # get_running_loop() costs a syscall
        self.active: _Socket | None = None  # where new queries go
        self.spare: _Socket | None = None  # the next active one, opened ahead
        self.sockets: set[_Socket] = set()  # every socket not yet closed, retired ones too

    def exchange(self, query: wire.Query, deadline: float,
                 edns: bool = True) -> Awaitable[Answer]:
        # A plain function returning the coroutine: one frame less on every resume of a miss.
        if self.tcp_for_polluted and query.key in self.polluted:
            return self._tcp_first(query, deadline, edns)
        return _Exchange(self, query, edns).run(deadline)

    async def _tcp_first(self, query: wire.Query, deadline: float, edns: bool) -> Answer:
        loop = asyncio.get_running_loop()
        # TCP gets half the time left: the other half is for UDP should TCP fail.
        tcp_deadline = loop.time() + max(deadline - loop.time(), 0) / 2
        try:
            return await self.tcp.exchange(query, tcp_deadline, edns)
        except UpstreamError:
            pass  # counted by the stream upstream as "tcp-<reason>", or as a forgery
        return await _Exchange(self, query, edns).run(deadline)

    def take_socket(self) -> _Socket:
        """A socket with room for one more query, which holds it until `release`."""
        sock = self.active
        now = time.monotonic()
        if (sock is None or sock.retired or sock.uses >= self.max_uses
                or now - sock.opened >= self.max_age):
            if sock is not None:
                sock.retire()
            sock, self.spare = self.spare, None
            if sock is None or sock.retired or now - sock.opened >= self.max_age:
                if sock is not None:
                    sock.retire()
                sock = self._open()  # OSError if even connect() fails
            self.active = sock
        sock.uses += 1
        sock.holders += 1
        if self.spare is None and (4 * sock.uses >= 3 * self.max_uses
                                   or 4 * (now - sock.opened) >= 3 * self.max_age):
            # The next one, opened ahead (that takes a loop turn): at rotation it is ready,
            # and no query waits on it.
            with contextlib.suppress(OSError):
                self.spare = self._open()
        return sock

    def _open(self) -> _Socket:
        sock = _Socket(self)
        self.sockets.add(sock)
        return sock

    async def close(self) -> None:
        for sock in list(self.sockets):
            sock.retire(force=True)
        self.active = self.spare = None
        await self.tcp.close()


class _Socket(asyncio.DatagramProtocol):
    """One connected UDP socket shared by up to `max_uses` queries, told apart by ID."""

    def __init__(self, upstream: UdpUpstream) -> None:
        self.up = upstream
        self.pending: dict[int, _Exchange] = {}  # by ID: the queries waiting on a reply
        self.used: dict[int, bytes] = {}  # every ID sent on this socket -> its question key
        self.uses = 0  # queries given this socket
        self.holders = 0  # of those, not yet done with it
        self.opened = time.monotonic()
        self.retired = False
        self.transport: asyncio.DatagramTransport | None = None
        self.sending_id = -1  # the query being sent, if any
        self.send_error: OSError | None = None
        sock = socket.socket(upstream.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(upstream.address)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        loop = asyncio.get_running_loop()
        # Shared by every query that takes this socket before it is ready (one loop turn).
        self.ready = loop.create_task(self._endpoint(loop, sock))
        self.ready.add_done_callback(self._opened)

    async def _endpoint(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        # Returns nothing: a task holding (transport, self) as its result would be a cycle
        # that only the cyclic collector frees, a few hundred of them a second under load.
        await loop.create_datagram_endpoint(lambda: self, sock=sock)

    # -- the pool's bookkeeping

    def _opened(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.sock.close()
            self.connection_lost(None)  # the same clean-up; its queries see the exception

    def new_id(self, key: bytes) -> int:
        """An ID no other query on this socket has had: a late reply to an earlier query can
        then never pass for the reply to this one."""
        qid = _ids.next()
        while qid in self.used:
            qid = _ids.next()
        self.used[qid] = key
        return qid

    def release(self, exchange: _Exchange) -> None:
        if self.pending.get(exchange.qid) is exchange:
            del self.pending[exchange.qid]
        self.holders -= 1
        if self.holders == 0 and (self.retired or self.uses >= self.up.max_uses):
            self.retire()

    def retire(self, force: bool = False) -> None:
        """No new queries; closed once the last one is done (or now, when forced)."""
        self.retired = True
        if self.up.active is self:
            self.up.active = None
        if self.up.spare is self:
            self.up.spare = None
        if (self.holders == 0 or force) and self.transport is not None:
            self.transport.close()
        elif force:
            self.ready.cancel()

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        if self.retired and self.holders == 0:  # every query that took it gave up meanwhile
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.retired = True
        self.up.sockets.discard(self)
        if self.up.active is self:
            self.up.active = None
        if self.up.spare is self:
            self.up.spare = None
        for exchange in list(self.pending.values()):
            exchange.fail(UpstreamError("closed"))
        self.transport = None  # it refers back to us: freed now rather than by the collector
        self.used.clear()

    # -- sending and receiving

    def send(self, data: bytes, qid: int) -> OSError | None:
        """Send one query; the error, if it could not be sent.

        The kernel reports an ICMP error on a connected socket at its next operation, which may
        be this send: then the datagram did not go out, and a second try does. The error was
        about the datagrams sent before. If the second try fails too, the error is this send's
        own (no route, no buffer space) and concerns no other query.
        """
        error = self._send_once(data, qid)
        if error is None:
            return None
        retry = self._send_once(data, qid)
        if retry is None:
            self._refused(error, spare=qid)
        return retry

    def _send_once(self, data: bytes, qid: int) -> OSError | None:
        self.send_error = None
        self.sending_id = qid
        try:
            self.transport.sendto(data)  # a failure comes back through error_received
        except OSError as exc:
            self.send_error = exc
        finally:
            self.sending_id = -1
        return self.send_error

    def datagram_received(self, data: bytes, addr) -> None:
        exchange = self.pending.get(data[0] << 8 | data[1]) if len(data) >= 2 else None
        if exchange is not None:
            exchange.judge(data)
        else:
            self._stray(data)

    def _stray(self, data: bytes) -> None:
        """A reply no pending query has the ID of: a forgery, or a late genuine reply."""
        up = self.up
        try:
            reply = wire.parse_reply(data)
        except wire.WireError:
            up.telemetry.stray(up.name, None, "malformed")
            return
        if self.used.get(reply.id) == wire.question_key(reply.question):
            # The answer to a query already done (by TCP, by a forgery the defences let
            # through, or past its deadline): nothing to learn, nothing forged.
            up.telemetry.late(up.name)
            return
        up.telemetry.stray(up.name, reply, "mismatch")

    def error_received(self, exc: OSError) -> None:
        """ICMP port unreachable and the like, or a failed send (which send() sorts out)."""
        if self.sending_id >= 0:
            self.send_error = exc
            return
        self._refused(exc)

    def _refused(self, exc: OSError, spare: int = -1) -> None:
        """An error no datagram can be told from: see the module's docstring."""
        for exchange in list(self.pending.values()):
            if exchange.qid != spare:
                exchange.fail_icmp(exc)
        self.retire()


class _Expired(Exception):
    """The deadline passed with no accepted reply."""


class _Exchange:
    """One query to one UDP upstream, from send to the genuine reply or the deadline."""

    __slots__ = ("up", "query", "edns", "filters", "loop", "result", "qid", "sent_at", "held",
                 "hold_timer", "hold_ends", "tcp_task", "losers", "deadline")

    def __init__(self, upstream: UdpUpstream, query: wire.Query, edns: bool) -> None:
        self.up = upstream
        self.query = query
        self.edns = edns  # sent with OPT: only then does the EDNS marker mean anything
        self.filters = upstream.filters if edns else upstream.filters_without_opt
        loop = upstream.loop
        if loop is None:
            loop = upstream.loop = asyncio.get_running_loop()
        self.loop = loop
        self.result: asyncio.Future = loop.create_future()
        self.qid = -1
        self.sent_at = 0.0
        self.held: tuple[bytes, wire.Reply] | None = None
        self.hold_timer: asyncio.TimerHandle | None = None
        self.hold_ends = 0.0  # loop time the usual hold ends
        self.deadline = 0.0
        self.tcp_task: asyncio.Task | None = None
        self.losers: list[wire.Reply] = []  # discarded replies that may teach, once beaten

    async def run(self, deadline: float) -> Answer:
        up = self.up
        self.deadline = deadline
        try:
            sock = up.take_socket()
        except OSError as exc:
            up.telemetry.error(up.name, os_reason(exc))
            raise UpstreamError(os_reason(exc)) from None
        timer = None
        try:
            if sock.transport is None:
                try:  # shielded: one query giving up must not cancel the opening for all
                    await asyncio.shield(sock.ready)
                except OSError as exc:
                    up.telemetry.error(up.name, os_reason(exc))
                    raise UpstreamError(os_reason(exc)) from None
            if sock.transport is None or sock.transport.is_closing():
                raise UpstreamError("closed")
            self.qid = sock.new_id(self.query.key)
            sock.pending[self.qid] = self
            error = sock.send(wire.upstream_query(self.query, self.qid, self.edns), self.qid)
            if error is not None:
                up.telemetry.error(up.name, os_reason(error))
                raise UpstreamError(os_reason(error))
            self.sent_at = time.monotonic()
            up.telemetry.sent(up.name, "udp")
            timer = self.loop.call_at(deadline, self._expire)
            try:
                result = await self.result
            except _Expired:
                if self.held is not None:
                    return Answer(*self.held, verified=False)  # as in _release_held
                # Learn nothing from a timeout: an injector can drop genuine replies.
                up.telemetry.error(up.name, "timeout")
                raise UpstreamError("timeout") from None
            up.telemetry.latency(up.name, time.monotonic() - self.sent_at)
            return result
        finally:
            sock.release(self)
            if self.result.done() and not self.result.cancelled():
                self.result.exception()  # retrieved even when cancelled meanwhile: no warning
            if timer is not None:
                timer.cancel()
            if self.hold_timer is not None:
                self.hold_timer.cancel()
            if self.tcp_task is not None and not self.tcp_task.done():
                self.tcp_task.cancel()

    def _expire(self) -> None:
        if not self.result.done():
            self.result.set_exception(_Expired())

    def fail(self, error: UpstreamError) -> None:
        if not self.result.done():
            self.result.set_exception(error)

    def fail_icmp(self, exc: OSError) -> None:
        """ICMP port unreachable and the like; ignored while TCP may still answer."""
        if self.tcp_task is None and not self.result.done():
            self.up.telemetry.error(self.up.name, os_reason(exc))
            self.result.set_exception(UpstreamError(os_reason(exc)))

    def judge(self, data: bytes) -> None:
        if self.result.done():
            return
        up, query = self.up, self.query
        try:
            reply = wire.parse_reply(data)
        except wire.WireError:
            up.telemetry.forgery(up.name, query, "malformed")
            return
        if reply.id != self.qid or not matches(reply, query):
            up.telemetry.forgery(up.name, query, "mismatch", reply)
            return
        reason = self.filters.verdict(up, reply, time.monotonic() - self.sent_at)
        if reason:
            if reason in TEACHING_REASONS:
                self.losers.append(reply)
            self._discard(reason, reply)
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
                self._discard("superseded", self.held[1])
            self.held = (data, reply)
            if self.hold_timer is None:
                self.hold_ends = self.loop.time() + up.edns_grace
                hold = up.edns_grace
                if reply.rcode in OPT_REFUSALS:  # see the module docstring
                    hold = max(hold, (self.deadline - self.loop.time()) / 2)
                self.hold_timer = self.loop.call_later(hold, self._release_held)
            self._ask_over_tcp()
            return
        self.result.set_result(self._accept(data, reply))

    def _accept(self, data: bytes, reply: wire.Reply) -> Answer:
        """The genuine reply (over UDP or the TCP retry): it also settles what was held."""
        losers = self.losers
        if self.held is not None and reply is not self.held[1] and reply.opt is not None:
            # The upstream does echo OPT: the OPT-less reply we held was forged.
            self._count_forgery("no-edns", self.held[1])
            losers = [*losers, self.held[1]]
        if losers and self.filters.learner is not None:
            self.filters.learner.learn(losers, reply)
        if self.edns:  # a query without OPT gets a reply without one: that teaches nothing
            self.up.edns.saw_genuine(reply.opt is not None)
        return Answer(data, reply)

    def _release_held(self) -> None:
        # Nothing better came: answer with it, but neither learn from nor cache a reply that
        # may be forged (three such would otherwise switch the EDNS defence off for good).
        if self.held is not None and not self.result.done():
            self.result.set_result(Answer(*self.held, verified=False))

    def _discard(self, reason: str, reply: wire.Reply) -> None:
        self._count_forgery(reason, reply)
        # An OPT-less reply discarded always gets checked over TCP, the defence switch aside:
        # only a genuine reply can tell that the upstream has stopped echoing OPT.
        if self.up.tcp_for_polluted or reason == EdnsMarker.reason:
            self._ask_over_tcp()

    def _count_forgery(self, reason: str, reply: wire.Reply) -> None:
        up = self.up
        up.telemetry.forgery(up.name, self.query, reason, reply)
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
            return
        # TCP failed too, or its reply was condemned (the stream upstream counted it): keep
        # listening on UDP until the deadline. A held OPT refusal waits for TCP no longer.
        held = self.held
        if held is not None and held[1].rcode in OPT_REFUSALS and self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = self.loop.call_at(self.hold_ends, self._release_held)
