"""DNS over TCP and over TLS (RFC 7766, RFC 7858): one kept-open, pipelined connection.

Queries on a connection are told apart by ID, so many can be in flight at once; a connection the
server closed while idle is replaced and the query sent again once. Opening one is bounded on
its own (the connect, then the TLS handshake): an attempt lost in a black hole fails within
seconds and the next query tries afresh, instead of every query waiting on the kernel's SYN
retries or a handshake that never ends.

Every reply is judged by the forgery filters its transport gets (forgery.py): an on-path
injector cannot write into the stream, but the server may hand out a poisoned answer all the
same. A condemned reply fails the query as Forged, and the next upstream is asked.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import struct
import time

from .. import wire
from ..forgery import EdnsState, ForgeryFilters
from ..upstreamspec import hostport
from .base import (
    Answer,
    Forged,
    Telemetry,
    UpstreamError,
    judge_stream,
    matches,
    os_reason,
)

MAX_PENDING = 4096  # queries in flight on one connection
# Seconds an attempt to open a connection may take, each step: far beyond a sane round trip,
# short enough that a black-holed attempt gives way to a new one soon after the path recovers.
CONNECT_TIMEOUT = 1.0
HANDSHAKE_TIMEOUT = 1.0


class ConnectionLost(Exception):
    pass


def _reason(exc: Exception) -> UpstreamError:
    """A failed attempt to connect, as an UpstreamError with a short label."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, ssl.SSLError):
        return UpstreamError(f"tls: {exc.reason or exc}")
    return UpstreamError(os_reason(exc))


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 owner: StreamUpstream) -> None:
        self.reader = reader
        self.writer = writer
        self.owner = owner
        self.pending: dict[int, tuple[asyncio.Future, wire.Query]] = {}
        self.closed = False
        self.last_read = time.monotonic()
        self.reading = asyncio.get_running_loop().create_task(self._read_loop())

    async def exchange(self, query: wire.Query, deadline: float,
                       edns: bool = True) -> tuple[bytes, wire.Reply]:
        if len(self.pending) >= MAX_PENDING:
            raise UpstreamError("too-many-pending")
        loop = asyncio.get_running_loop()
        qid = secrets.randbits(16)
        while qid in self.pending:
            qid = secrets.randbits(16)
        future = loop.create_future()
        self.pending[qid] = (future, query)
        packet = wire.upstream_query(query, qid, edns)
        sent = time.monotonic()
        try:
            self.writer.write(struct.pack(">H", len(packet)) + packet)
            return await asyncio.wait_for(future, max(deadline - loop.time(), 0))
        except TimeoutError:
            if self.last_read < sent:
                # Not a byte since we asked: a half-open connection (NAT state lost, peer
                # gone) would otherwise swallow every query until the kernel gives up.
                self.reading.cancel()
            raise
        finally:
            self.pending.pop(qid, None)

    async def _read_loop(self) -> None:
        idle = self.owner.idle_timeout
        try:
            while True:
                try:
                    head = await asyncio.wait_for(self.reader.readexactly(2), idle)
                except TimeoutError:
                    if self.pending:
                        continue
                    break  # idle: let it go rather than hold the server's resources
                (length,) = struct.unpack(">H", head)
                data = await asyncio.wait_for(self.reader.readexactly(length), idle)
                self.last_read = time.monotonic()
                try:
                    reply = wire.parse_reply(data)
                except wire.WireError:
                    continue
                entry = self.pending.get(reply.id)
                if entry is None or entry[0].done():
                    continue
                future, query = entry
                if not matches(reply, query):
                    self.owner.telemetry.forgery(self.owner.name, query, "mismatch", reply)
                    continue
                future.set_result((data, reply))
        except (asyncio.IncompleteReadError, OSError, ssl.SSLError, TimeoutError):
            pass
        finally:
            self.closed = True
            for future, _ in self.pending.values():
                if not future.done():
                    future.set_exception(ConnectionLost())
            self.writer.close()


class StreamUpstream:
    def __init__(self, host: str, port: int, telemetry: Telemetry, filters: ForgeryFilters, *,
                 ssl_context: ssl.SSLContext | None = None, server_name: str | None = None,
                 name: str | None = None, idle_timeout: float = 10.0,
                 error_prefix: str = "") -> None:
        self.host = host
        self.port = port
        self.telemetry = telemetry
        self.ssl_context = ssl_context
        self.server_name = server_name
        self.transport = "tls" if ssl_context else "tcp"
        self.name = name or f"{self.transport}://{hostport(host, port)}"
        self.idle_timeout = idle_timeout
        self.filters = filters.for_stream(encrypted=ssl_context is not None)
        self.error_prefix = error_prefix  # "tcp-" when a UDP upstream falls back to us
        self.edns = EdnsState()
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task | None = None

    async def _connection(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            ours = self._connecting is None or self._connecting.done()
            if ours:
                self._connecting = loop.create_task(self._open())
                # Read its outcome even when every waiter gave up first: no "never retrieved".
                self._connecting.add_done_callback(
                    lambda task: task.cancelled() or task.exception())
            try:
                return await asyncio.wait_for(asyncio.shield(self._connecting),
                                              max(deadline - loop.time(), 0))
            except TimeoutError:
                raise UpstreamError("connect-timeout") from None
            except (UpstreamError, OSError) as exc:
                if ours:
                    raise _reason(exc) from None
                # An attempt begun for an earlier query failed: this one gets its own, as the
                # path may have recovered meanwhile.

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (self.host, self.port)),
                                       CONNECT_TIMEOUT)
            except TimeoutError:
                raise UpstreamError("connect-timeout") from None
            kwargs = {}
            if self.ssl_context is not None:
                kwargs = {"ssl": self.ssl_context,
                          "server_hostname": self.server_name or self.host}
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(sock=sock, **kwargs), HANDSHAKE_TIMEOUT)
            except TimeoutError:
                raise UpstreamError("handshake-timeout") from None
        except BaseException:
            sock.close()
            raise
        # Set here, not by the waiter: a waiter cancelled meanwhile must not orphan it.
        self._conn = _Connection(reader, writer, self)
        return self._conn

    async def exchange(self, query: wire.Query, deadline: float, edns: bool = True) -> Answer:
        try:
            return judge_stream(self, query, *await self._exchange(query, deadline, edns))
        except Forged:
            raise  # counted as a forgery
        except UpstreamError as exc:
            self.telemetry.error(self.name, self.error_prefix + exc.reason)
            raise

    async def _exchange(self, query: wire.Query, deadline: float,
                        edns: bool) -> tuple[bytes, wire.Reply]:
        started = time.monotonic()
        self.telemetry.sent(self.name, self.transport)
        for attempt in (1, 2):
            conn = await self._connection(deadline)
            try:
                result = await conn.exchange(query, deadline, edns)
            except ConnectionLost:
                if attempt == 2:
                    raise UpstreamError("connection-lost") from None
                continue
            except TimeoutError:
                raise UpstreamError("timeout") from None
            self.telemetry.latency(self.name, time.monotonic() - started)
            return result
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.reading.cancel()
            await asyncio.gather(self._conn.reading, return_exceptions=True)

