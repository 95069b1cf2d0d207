"""The listeners: UDP and TCP on every listen address, feeding the pipeline.

Nothing a client sends may stop or stall the server: undecodable messages get FORMERR (or
nothing, if not even the header is there), TCP connections have an idle timeout, a cap in total
and per client, and at the cap the connection idle longest is closed to make room. One client
may hold only a share of the queries in flight, and one TCP connection at most MAX_PIPELINED:
beyond that the server stops reading it until answers have gone out.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time

from . import wire
from .metrics import Metrics
from .pipeline import Pipeline, Request, Response
from .querylog import NullLog, QueryLog

log = logging.getLogger("dnsproxy")

MAX_TCP_MESSAGE = 65535
MAX_UNREAD_BYTES = 256 * 1024
MAX_PIPELINED = 16  # queries in flight on one TCP connection
# A client may hold at most a quarter of the in-flight budget, and never less than
# MIN_CLIENT_SHARE (nor more than the whole budget): one host asking slow names the upstreams
# never answer then cannot shed everyone else's misses.
CLIENT_SHARE = 4
MIN_CLIENT_SHARE = 8


def client_share(max_in_flight: int) -> int:
    return min(max_in_flight, max(max_in_flight // CLIENT_SHARE, MIN_CLIENT_SHARE))


class Responder:
    """What both transports share: run a request through the pipeline, send, log."""

    def __init__(self, pipeline: Pipeline, metrics: Metrics, querylog: QueryLog,
                 allowed=lambda address: True, max_in_flight: int = 1000) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self.querylog = querylog
        self.allowed = allowed  # the access stage's verdict, for what comes before the pipeline
        self.max_in_flight = max_in_flight
        self.client_share = client_share(max_in_flight)
        self.tasks: dict[asyncio.Task, str] = {}  # in flight -> its client
        self.loop: asyncio.AbstractEventLoop | None = None  # get_running_loop() costs a syscall
        self.held: dict[str, int] = {}  # client address -> its tasks in flight

    def spawn(self, coro, client: str) -> asyncio.Task | None:
        """Run `coro` for `client` unless too much is in flight already, in all or for that
        client (each holds a socket and memory): a flood then costs its sender answers,
        never the process nor the other clients."""
        held = self.held.get(client, 0)
        if held >= self.client_share or len(self.tasks) >= self.max_in_flight:
            coro.close()
            limit = "client" if held >= self.client_share else "total"
            self.metrics.inc("dnsproxy_overload_total", limit=limit)
            return None
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        task = loop.create_task(coro)
        self.tasks[task] = client
        self.held[client] = held + 1
        task.add_done_callback(self.release)
        return task

    def release(self, task: asyncio.Task) -> None:
        """`task` holds nothing any more: called when its answer is out, and again (a no-op
        then) when it is done. A done callback runs only on the loop's next pass; a client
        whose answers just went out and asks again at once must not be counted twice."""
        client = self.tasks.pop(task, None)
        if client is None:
            return
        left = self.held.pop(client) - 1
        if left:
            self.held[client] = left

    def answer_now(self, request: Request) -> Response | None:
        """The stages' answer, if any; a bug in one costs this query a SERVFAIL, no more."""
        try:
            return self.pipeline.answer_now(request)
        except Exception:
            log.exception("a stage failed on a %s query from %s", request.transport,
                          request.client[0])
            return Response(wire.response(request.query, wire.SERVFAIL), "servfail",
                            wire.SERVFAIL)

    async def resolve(self, request: Request) -> Response:
        """The pipeline's answer; a bug anywhere in it costs this query a SERVFAIL, no more."""
        try:
            return await self.pipeline.resolve(request)
        except Exception:
            log.exception("resolving a %s query from %s failed", request.transport,
                          request.client[0])
            return Response(wire.response(request.query, wire.SERVFAIL), "servfail",
                            wire.SERVFAIL)

    def observe(self, request: Request, response: Response) -> None:
        """The stages learn from a response already sent (the cache stores it); a bug in one
        is logged, and the client has its answer all the same."""
        try:
            self.pipeline.observe(request, response)
        except Exception:
            log.exception("a stage failed observing the answer to %s", request.client[0])


class UdpServer(asyncio.DatagramProtocol):
    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.querylog = responder.querylog
        self.log_queries = not isinstance(responder.querylog, NullLog)  # a call saved per query
        self.counter = responder.metrics.values
        self.key_queries = ("dnsproxy_queries_total", (("transport", "udp"),))
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr, rate: bool | None = None) -> None:
        """`rate`: the compiled path's rate verdict for a datagram it handed on (fastpath.py)."""
        self.counter[self.key_queries] += 1
        try:
            query = wire.parse_query(data)
        except wire.WireError:
            self.responder.metrics.inc("dnsproxy_malformed_total", transport="udp")
            reply = wire.header_error(data, wire.FORMERR)
            if reply is not None and self.responder.allowed(addr[0]):
                self.transport.sendto(reply, addr)
            return
        request = Request(query, addr, "udp", time.monotonic(), rate)
        response = self.responder.answer_now(request)
        if response is None:
            self.responder.spawn(self._resolve(request), addr[0])
        else:
            self._send(request, response)

    async def _resolve(self, request: Request) -> None:
        responder = self.responder
        response = await responder.resolve(request)
        self._send(request, response)
        responder.release(asyncio.current_task())  # the answer is out
        responder.observe(request, response)

    def _send(self, request: Request, response: Response) -> None:
        message = response.wire
        if message is not None and self.transport is not None:
            if len(message) > request.query.udp_size:
                message = wire.truncate_for(message, request.query)
            self.transport.sendto(message, request.client)
        if self.log_queries:
            self.querylog.query(request, response)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors about clients that went away are no concern of the server's


class TcpServer:
    def __init__(self, responder: Responder, idle_timeout: float, max_connections: int,
                 max_per_client: int) -> None:
        self.responder = responder
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        # writer -> [client address, last activity, queries in flight]
        self.connections: dict[asyncio.StreamWriter, list] = {}
        # Connections not read until one of their MAX_PIPELINED queries is answered.
        self.waiting: dict[asyncio.StreamWriter, asyncio.Future] = {}

    def _admit(self, writer: asyncio.StreamWriter, client: str) -> bool:
        mine = sum(1 for state in self.connections.values() if state[0] == client)
        # At the client's own cap its own idle connections make room (a leak of its own must
        # not lock it out of TCP); at the global cap anyone's do.
        if mine >= self.max_per_client and not self._close_longest_idle(client):
            return False
        if len(self.connections) >= self.max_connections and not self._close_longest_idle():
            return False
        self.connections[writer] = [client, time.monotonic(), 0]
        return True

    def _close_longest_idle(self, client: str | None = None) -> bool:
        """Close the connection idle longest (of `client`, if given); False if none is idle."""
        idle = [(state[1], w) for w, state in self.connections.items()
                if state[2] == 0 and (client is None or state[0] == client)]
        if not idle:
            return False
        _, writer = min(idle, key=lambda item: item[0])
        writer.close()
        self.connections.pop(writer, None)
        return True

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        metrics = self.responder.metrics
        # Strangers get no connection slot: they could otherwise crowd out the LAN's clients.
        if not self.responder.allowed(peer[0]) or not self._admit(writer, peer[0]):
            metrics.inc("dnsproxy_tcp_connections_rejected_total")
            writer.close()
            return
        state = self.connections[writer]
        in_flight: set[asyncio.Task] = set()
        draining = False  # the client is done sending; the last answer in flight closes

        def settled(task: asyncio.Task) -> None:
            in_flight.discard(task)
            if draining and not in_flight:
                self._close(writer)

        try:
            while True:
                while state[2] >= MAX_PIPELINED:  # backpressure: the client waits, not us
                    await self._room(writer)
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), self.idle_timeout)
                    (length,) = struct.unpack(">H", head)
                    data = await asyncio.wait_for(reader.readexactly(length), self.idle_timeout)
                except asyncio.IncompleteReadError:
                    # The client is done sending (a half-close is the normal end of a
                    # pipelined batch): it still gets what is in flight, then we close.
                    draining = bool(in_flight)
                    break
                except (TimeoutError, ConnectionError):
                    break
                state[1] = time.monotonic()
                metrics.inc("dnsproxy_queries_total", transport="tcp")
                try:
                    query = wire.parse_query(data)
                except wire.WireError:
                    metrics.inc("dnsproxy_malformed_total", transport="tcp")
                    reply = wire.header_error(data, wire.FORMERR)
                    if reply is not None:
                        self._write(writer, reply)
                    break  # a stream that carried garbage cannot be trusted to be framed
                request = Request(query, peer, "tcp", time.monotonic())
                response = self.responder.answer_now(request)
                if response is None:
                    # Pipelined: answer in any order, keep reading meanwhile (RFC 7766 6.2.1.1).
                    state[2] += 1
                    task = self.responder.spawn(self._resolve(writer, request, state), peer[0])
                    if task is not None:
                        in_flight.add(task)
                        task.add_done_callback(settled)
                    else:
                        state[2] -= 1
                        self._finish(writer, request, Response(
                            wire.response(query, wire.SERVFAIL), "overload", wire.SERVFAIL))
                else:
                    self._finish(writer, request, response)
        finally:
            if not draining:
                self._close(writer)

    def _close(self, writer: asyncio.StreamWriter) -> None:
        self.connections.pop(writer, None)
        writer.close()

    async def _resolve(self, writer, request: Request, state: list) -> None:
        try:
            response = await self.responder.resolve(request)
        finally:
            state[2] -= 1
            state[1] = time.monotonic()
            waiter = self.waiting.get(writer)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)  # runs after the answer below is written
        self._finish(writer, request, response)
        self.responder.observe(request, response)

    async def _room(self, writer: asyncio.StreamWriter) -> None:
        self.waiting[writer] = asyncio.get_running_loop().create_future()
        try:
            await self.waiting[writer]
        finally:
            self.waiting.pop(writer, None)

    def _finish(self, writer, request: Request, response: Response) -> None:
        message = response.wire
        if message is not None:
            if len(message) > MAX_TCP_MESSAGE:  # cannot be framed; cutting it would be garbage
                message = wire.response(request.query, wire.SERVFAIL)
            self._write(writer, message)
        self.responder.querylog.query(request, response)

    @staticmethod
    def _write(writer: asyncio.StreamWriter, message: bytes) -> None:
        if writer.is_closing():
            return
        if writer.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            writer.close()  # a client that sends but never reads would grow our memory
            return
        writer.write(struct.pack(">H", len(message)) + message)
