"""DNS over TCP and over TLS (RFC 7766, RFC 7858): one kept-open, pipelined connection.

Queries on a connection are told apart by ID, so many can be in flight at once; a connection the
server closed while idle is replaced and the query sent again once.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import struct
import time

from .. import wire
from ..forgery import EdnsState
from .base import Telemetry, UpstreamError, hostport, matches, os_reason

MAX_PENDING = 4096  # queries in flight on one connection


class ConnectionLost(Exception):
    pass


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

    async def exchange(self, query: wire.Query, deadline: float) -> tuple[bytes, wire.Reply]:
        if len(self.pending) >= MAX_PENDING:
            raise UpstreamError("too-many-pending")
        loop = asyncio.get_running_loop()
        qid = secrets.randbits(16)
        while qid in self.pending:
            qid = secrets.randbits(16)
        future = loop.create_future()
        self.pending[qid] = (future, query)
        packet = wire.upstream_query(query, qid)
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
                    self.owner.telemetry.forgery(self.owner.name, query, "mismatch")
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
    def __init__(self, host: str, port: int, telemetry: Telemetry, *,
                 ssl_context: ssl.SSLContext | None = None, server_name: str | None = None,
                 name: str | None = None, idle_timeout: float = 10.0,
                 hijack_threshold: float = 0.0, error_prefix: str = "") -> None:
        self.host = host
        self.port = port
        self.telemetry = telemetry
        self.ssl_context = ssl_context
        self.server_name = server_name
        self.transport = "tls" if ssl_context else "tcp"
        self.name = name or f"{self.transport}://{hostport(host, port)}"
        self.idle_timeout = idle_timeout
        self.hijack_threshold = hijack_threshold
        self.error_prefix = error_prefix  # "tcp-" when a UDP upstream falls back to us
        self.edns = EdnsState()
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task | None = None

    async def _connection(self, deadline: float) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting),
                                          max(deadline - loop.time(), 0))
        except TimeoutError:
            raise UpstreamError("connect-timeout") from None
        except ssl.SSLError as exc:
            raise UpstreamError(f"tls: {exc.reason or exc}") from None
        except OSError as exc:
            raise UpstreamError(os_reason(exc)) from None

    async def _open(self) -> _Connection:
        kwargs = {}
        if self.ssl_context is not None:
            kwargs = {"ssl": self.ssl_context, "server_hostname": self.server_name or self.host}
        reader, writer = await asyncio.open_connection(self.host, self.port, **kwargs)
        # Set here, not by the waiter: a waiter cancelled meanwhile must not orphan it.
        self._conn = _Connection(reader, writer, self)
        return self._conn

    async def exchange(self, query: wire.Query, deadline: float) -> tuple[bytes, wire.Reply]:
        try:
            return await self._exchange(query, deadline)
        except UpstreamError as exc:
            self.telemetry.error(self.name, self.error_prefix + exc.reason)
            raise

    async def _exchange(self, query: wire.Query, deadline: float) -> tuple[bytes, wire.Reply]:
        started = time.monotonic()
        self.telemetry.sent(self.name, self.transport)
        for attempt in (1, 2):
            conn = await self._connection(deadline)
            try:
                result = await conn.exchange(query, deadline)
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

