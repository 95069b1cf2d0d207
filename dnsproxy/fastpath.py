"""The compiled UDP cache-hit path (issue #22): `dnsproxy._native`, built from `native/` (Rust,
PyO3) by `make native`. Without it the forwarder runs the pure-Python path, which behaves the
same; `dnsproxy --version` and the start-up log say which one serves.

Why: a cache hit through the event loop costs about 21 µs in its receive and send alone. The
compiled path reads each client-facing UDP socket on a thread of its own that never takes the
GIL: datagrams in batches (`recvmmsg`), hits answered from its copy of the cache
(`sendmmsg`), the access list and the per-client rate limit applied; every other datagram is
queued for the Python pipeline with the client's address (and the rate verdict it took, so
the limit is taken once), and the event loop is woken for them through a socket. A busy event
loop thus does not delay a hit (but see the turns below). It answers only what Python would
answer the same way: an entry of the cache Python fills with verified replies, copied as it
is stored (a bounded number of new entries wait for their first hit) or once Python has
answered a hit from it, and kept in step (stages/cache.py, `mirror`), fresh, near its expiry
or (serve-stale) past it.
For the latter two it asks Python's cache stage for the refresh, once per entry until that is
done, as the stage itself would; the client has its answer meanwhile. A missing or long
expired entry, a refused client, and any query Python's stages answer themselves go to
Python.

Under load the threads stand aside: once one hands the pipeline a datagram before the event
loop took the ones before, the loop, awake anyway, reads the sockets itself through the module
(`FastPath.poll`, hits still answered there) until they have been quiet for QUIET seconds. A
thread reading beside a busy event loop on the same core cost each saturated miss about 1.4
context switches, a sixth of its CPU. At a household's pace the threads read alone. A thread
standing aside still looks at its socket every 10 ms, so a stuck event loop delays a hit by no
more than that.

What hits leave behind reaches Python in batches, every TAKE_INTERVAL seconds and before the
metrics are rendered: their keys for the cache's LRU order, their counts, and, when anything
logs queries, a record of each. Before the cache evicts, it takes the keys alone
(`sync_order`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import deque
from typing import Any

from . import wire
from .config import Settings
from .metrics import Metrics
from .pipeline import Pipeline, Request, Response
from .querylog import NullLog, QueryLog
from .stages.cache import PREFETCH_AT, Cache
from .stages.ratelimit import RateLimit

try:
    from . import _native
except ImportError:  # not built: a plain `pip install` without a Rust toolchain
    _native = None

log = logging.getLogger("dnsproxy")

TAKE_INTERVAL = 0.5  # seconds between batches of hit records, counts and LRU touches
BUDGET = 1024  # datagrams handed to the pipeline per callback: the loop's other work goes on
MAX_WAITING = 4096  # replies queued for a full socket buffer; beyond, dropped
QUIET = 0.005  # seconds without a datagram after which the threads read the sockets again


def available() -> bool:
    return _native is not None


def which(settings: Settings) -> str:
    """Which path answers UDP cache hits, in words for the log and --version."""
    if not settings.native:
        return "Python (--no-native)"
    if _native is None:
        return "Python (the compiled module is not built: make native)"
    return "compiled (dnsproxy._native)"


def networks(allow: list[str]) -> list[tuple[bytes, int]]:
    out = []
    for text in allow:
        network = ipaddress.ip_network(text, strict=False)
        out.append((network.network_address.packed, network.prefixlen))
    return out


class SocketSender:
    """What UdpServer sends through for the datagrams the compiled path hands it: the socket
    itself, each send non-blocking (MSG_DONTWAIT: the socket blocks, for the thread that reads
    it). A reply the socket's buffer cannot take now waits in a queue sent when the socket is
    writable again, as an asyncio transport's would."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock, self.loop = sock, loop
        self.waiting: deque[tuple[bytes, Any]] = deque()

    def sendto(self, data: bytes, address: Any) -> None:
        if not self.waiting:
            try:
                self.sock.sendto(data, socket.MSG_DONTWAIT, address)
                return
            except BlockingIOError:
                self.loop.add_writer(self.sock.fileno(), self._flush)
            except OSError:
                return  # an unreachable client: UDP drops it, as the transport would
        if len(self.waiting) < MAX_WAITING:
            self.waiting.append((data, address))

    def _flush(self) -> None:
        while self.waiting:
            data, address = self.waiting[0]
            try:
                self.sock.sendto(data, socket.MSG_DONTWAIT, address)
            except BlockingIOError:
                return
            except OSError:
                pass
            self.waiting.popleft()
        self.loop.remove_writer(self.sock.fileno())
        self.sock.setblocking(True)  # uvloop's watching made it non-blocking; the thread waits

    def close(self) -> None:
        if self.waiting:
            self.waiting.clear()
            self.loop.remove_writer(self.sock.fileno())


class NativeUdp:
    """One UDP listen socket read by the compiled path's thread: what it does not answer
    reaches `server` (a UdpServer) through HitPath, as if the loop had read it."""

    def __init__(self, hits: HitPath, server: Any, sock: socket.socket,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.hits, self.server, self.sock = hits, server, sock
        self.sender = SocketSender(sock, loop)
        server.connection_made(self.sender)
        sock.setblocking(True)  # the thread waits in its receive; nothing else reads it
        self.number: int | None = hits.fast.listen(sock.fileno())

    def close(self) -> None:
        if self.number is not None:
            self.hits.stop_reading(self)
            self.hits.fast.unlisten(self.number)  # the thread is gone before the socket is
            self.hits.forget(self)
            self.number = None
            self.sender.close()
            self.sock.close()


class SharedBuckets:
    """The rate-limit stage's buckets, kept by the compiled path (stages/ratelimit.py's
    TokenBuckets interface)."""

    def __init__(self, fast: Any) -> None:
        self.fast = fast

    def allow(self, key: str, now: float | None = None) -> bool:
        return self.fast.allow(key, time.monotonic() if now is None else now)


class HitPath:
    """The compiled path's state (one FastPath for every UDP socket) and its batches."""

    def __init__(self, settings: Settings, pipeline: Pipeline, cache: Cache, metrics: Metrics,
                 querylog: QueryLog) -> None:
        assert _native is not None
        self.cache, self.metrics, self.querylog = cache, metrics, querylog
        self.fast = _native.FastPath(networks(settings.allow), 0.0, 0.0, PREFETCH_AT,
                                     not isinstance(querylog, NullLog))
        self.configure(settings, pipeline)
        cache.mirror = self.fast
        cache.sync_mirror = self.sync_order
        metrics.before_render.append(self.take)
        self.udp_queries = metrics.key("dnsproxy_queries_total", transport="udp")
        self.limited = metrics.key("dnsproxy_responses_total", reason="ratelimited")
        self.shed = metrics.key("dnsproxy_overload_total", limit="handoff")
        self.sockets: dict[int, NativeUdp] = {}
        self.handed_on = 0  # datagrams the threads left for the pipeline, in all
        self.loop: asyncio.AbstractEventLoop | None = None
        self.taker: asyncio.TimerHandle | None = None
        self.reading = False  # the event loop reads the sockets (the threads stand aside)
        self.turns = 0  # times it took over, in all
        self.read_since = 0  # datagrams it read since the last quiet check
        self.quiet_check: asyncio.TimerHandle | None = None

    def configure(self, settings: Settings, pipeline: Pipeline) -> None:
        """The settings it applies (at start, and again at each reload): the access list, the
        rate limit, whether to prefetch, serve-stale; the copy of the cache starts empty, since
        a new configuration may answer some cached names otherwise (a hosts file, home names). The
        pipeline's rate-limit stage takes its tokens from the same buckets (one per client,
        whatever the transport, as on the Python path)."""
        fast = self.fast
        fast.set_networks(networks(settings.allow))
        rate = settings.rate_limit
        fast.set_rate(rate, 2 * rate)  # stages/ratelimit.py: the burst is twice the rate
        fast.set_prefetch_at(PREFETCH_AT if settings.prefetch else 1.0)
        fast.set_stale(settings.serve_stale, settings.stale_ttl, float(settings.max_stale))
        fast.clear()
        for stage in pipeline.stages:
            if isinstance(stage, RateLimit):
                stage.buckets = SharedBuckets(fast)

    def listen(self, sock: socket.socket, server: Any,
               loop: asyncio.AbstractEventLoop) -> NativeUdp:
        udp = NativeUdp(self, server, sock, loop)
        self.sockets[udp.number] = udp
        if self.reading:
            loop.add_reader(sock.fileno(), self._readable, udp)
        if self.loop is None:
            self.loop = loop
            loop.add_reader(self.fast.wakeup_fd(), self._handed_on, True)
            self.taker = loop.call_later(TAKE_INTERVAL, self._take_every)
        return udp

    def forget(self, udp: NativeUdp) -> None:
        self.sockets.pop(udp.number, None)

    def _handed_on(self, woken: bool = False) -> None:
        """The datagrams the threads left for the pipeline, BUDGET at a time: the loop's
        other work goes on between batches. `woken`: through the wake-up descriptor."""
        try:
            batch, more, refreshes = self.fast.pending(BUDGET, woken)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # a bug in the module (a Rust panic is a BaseException)
            log.exception("taking the compiled path's datagrams failed; it goes on")
            return
        sockets = self.sockets
        self.handed_on += len(batch)
        try:
            for number, data, address, rate in batch:
                udp = sockets.get(number)
                if udp is not None:
                    udp.server.datagram_received(data, address, rate)
            for key, data, kind in refreshes:  # after the misses: their clients wait
                try:
                    self.cache.refresh_asked(key, data, kind)
                except Exception:  # a bug: this refresh is lost, not the hand-off
                    log.exception("starting a refresh the compiled path asked for failed")
        finally:
            # No wake-up comes for what is left (the threads see Python woken): come back.
            if more and self.loop is not None:
                self.loop.call_soon(self._handed_on)
            self._take_turn()

    # -- taking turns with the threads (see the module's docstring)

    def _take_turn(self) -> None:
        """If a thread handed the turn over (it stands aside), read the sockets here."""
        loop = self.loop
        if loop is None or self.reading or not self.fast.python_reads:
            return
        for udp in self.sockets.values():
            loop.add_reader(udp.sock.fileno(), self._readable, udp)
        self.reading, self.read_since = True, 0
        self.turns += 1
        self.quiet_check = loop.call_later(QUIET, self._check_quiet)

    def _readable(self, udp: NativeUdp) -> None:
        if udp.number is None:
            return
        try:
            read, waiting = self.fast.poll(udp.number)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # a bug in the module (a Rust panic is a BaseException)
            log.exception("reading a UDP socket through the compiled path failed")
            self._give_back()  # the threads read again
            return
        self.read_since += read
        if waiting:
            self._handed_on()

    def _check_quiet(self) -> None:
        self.quiet_check = None
        if self.read_since == 0:
            self._give_back()
        elif self.loop is not None:
            self.read_since = 0
            self.quiet_check = self.loop.call_later(QUIET, self._check_quiet)

    def _give_back(self) -> None:
        """The sockets were quiet: the threads read them again."""
        if self.quiet_check is not None:
            self.quiet_check.cancel()
            self.quiet_check = None
        if self.reading and self.loop is not None:
            for udp in self.sockets.values():
                self.loop.remove_reader(udp.sock.fileno())
                udp.sock.setblocking(True)  # watching it made it non-blocking
        self.reading = False
        self.fast.give_back()

    def stop_reading(self, udp: NativeUdp) -> None:
        """`udp` is closing: the event loop no longer watches its socket."""
        if self.reading and self.loop is not None:
            self.loop.remove_reader(udp.sock.fileno())

    def _take_every(self) -> None:
        self._take_turn()  # a safety net: if the threads stand aside, somebody must read
        self.take()
        self.taker = asyncio.get_running_loop().call_later(TAKE_INTERVAL, self._take_every)

    def sync_order(self) -> None:
        """Before the cache evicts: the keys hit here since they were last taken are made the
        most recent, so that the least recently used goes, as the hits left the order. Their
        counts and records wait for the next take: under a flood of new names this runs at
        every store."""
        keys = self.fast.take_touched()
        if keys:
            self.cache.touch(keys, 0)

    def take(self) -> None:
        """What the hits since the last take left: LRU order, counts, query-log records."""
        keys, records, answered, limited, shed, faults, stale = self.fast.take()
        if shed:
            self.metrics.values[self.shed] += shed
        if faults:
            log.error("the compiled hit path lost %d batches to a fault; it goes on", faults)
        if answered or limited:
            self.metrics.values[self.udp_queries] += answered + limited
            self.metrics.values[self.limited] += limited
            self.cache.touch(keys, answered, stale)
        if records:
            offset = time.time() - time.monotonic()
            querylog = self.querylog
            for at, host, port, data, rcode, reason in records:
                try:
                    query = wire.parse_query(data)
                except wire.WireError:
                    continue
                request = Request(query, (host, port), "udp", at)
                querylog.answered(request, Response(None, reason, rcode), at + offset, at)

    def close(self) -> None:
        self._give_back()
        for udp in list(self.sockets.values()):
            udp.close()
        if self.taker is not None:
            self.taker.cancel()
            self.taker = None
        if self.loop is not None:
            self.loop.remove_reader(self.fast.wakeup_fd())
            self.loop = None
        self.take()
        self.cache.mirror = self.cache.sync_mirror = None
        if self.take in self.metrics.before_render:
            self.metrics.before_render.remove(self.take)
