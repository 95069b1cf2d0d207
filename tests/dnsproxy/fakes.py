"""Real-socket stand-ins for the network around the forwarder, on 127.0.0.0/8 only.

`FakeUpstream` is an authoritative server on UDP and TCP whose behaviour is set per name: answer,
delay, echo OPT or not, truncate, stay silent, and, playing the on-path injector, send forged
replies of each kind before the genuine one. It records every query it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import random
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSQuestion, DNSRecord

from dnsproxy.app import Service
from dnsproxy.config import build_settings

_random = random.Random()  # its own: tests that seed the module's generator do not pin ports

GENUINE = "192.0.2.10"
FORGED_LISTED = "159.106.121.75"  # on the shipped forged-address list
FORGED_UNLISTED = "203.0.113.66"  # forged, but on no list: only the other defences catch it

FORGERY_KINDS = ("no-edns", "forged-address", "too-fast", "wrong-id", "wrong-question",
                 "other-port")


@dataclass
class Behaviour:
    answers: list[str] = field(default_factory=lambda: [GENUINE])
    ttl: int = 300
    rcode: int = 0
    edns: bool = True  # echo an OPT record, as real resolvers do
    delay: float = 0.0  # before the genuine UDP reply
    tcp_delay: float = 0.0
    forgeries: tuple[str, ...] = ()  # sent at once, before the genuine reply (UDP only)
    truncate_udp: bool = False
    silent_udp: bool = False
    silent: bool = False
    cname: str | None = None  # answer with a CNAME to this name, then the address
    padding: int = 0  # extra TXT answers, to make a large reply
    soa_minimum: int = 60  # the SOA MINIMUM field of negative answers (RFC 2308)
    # The exact reply bytes, made from the query's bytes (UDP and TCP): for replies no
    # well-behaved server writes, and header flags dnslib would set its own way.
    craft: Callable[[bytes], bytes] | None = None
    formerr_on_opt: bool = False  # an old server: FORMERR without OPT to a query with OPT
    tcp_reset: bool = False  # reset the TCP connection instead of answering (a middlebox)
    forged_answer: str | None = None  # the address the forgeries carry, if not the usual
    forged_answers: tuple[str, ...] = ()  # the addresses, when the forgeries carry several
    # The answers over TCP and TLS, if not the UDP ones: a resolver poisoned at its source
    # hands the injector's address out over a stream too.
    stream_answers: list[str] | None = None


@dataclass
class Seen:
    transport: str
    client: tuple
    name: str
    qtype: str
    has_opt: bool
    do: bool
    id: int
    udp_size: int = 0  # the EDNS buffer size the query advertised, 0 without OPT


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.2", default: Behaviour | None = None,
                 port: int = 0) -> None:
        self.host = host
        self.default = default or Behaviour()
        self.rules: dict[str, Behaviour] = {}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.udp.bind((host, port))
        self.port = self.udp.getsockname()[1]
        self.spoofer = socket.socket(family, socket.SOCK_DGRAM)
        self.spoofer.bind((host, 0))
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream.serve_stream(self.request, self.client_address)

        server_class = type("TCPServer", (socketserver.ThreadingTCPServer,),
                            {"address_family": family, "allow_reuse_address": True,
                             "daemon_threads": True})
        self.tcp = server_class((host, self.port), Handler)
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True),
                        threading.Thread(target=self.tcp.serve_forever, args=(0.05,), daemon=True)]
        self.running = True
        self.tcp_open = True
        for thread in self.threads:
            thread.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def rule(self, name: str, **behaviour) -> Behaviour:
        self.rules[name.lower().rstrip(".") + "."] = b = Behaviour(**behaviour)
        return b

    def count(self, name: str | None = None, transport: str | None = None) -> int:
        with self.lock:
            return sum(1 for s in self.seen
                       if (name is None or s.name.lower() == name.lower().rstrip(".") + ".")
                       and (transport is None or s.transport == transport))

    def close(self) -> None:
        self.running = False
        self.close_tcp()
        self.udp.close()
        self.spoofer.close()

    def close_udp(self) -> None:
        """Stop listening on UDP: datagrams to the port draw ICMP port unreachable from now on."""
        with contextlib.suppress(OSError):
            self.udp.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recvfrom
        self.udp.close()
        self.threads[0].join(2)

    def close_tcp(self) -> None:
        """Stop listening on TCP: connections are refused from now on (TCP/53 blocked)."""
        if self.tcp_open:
            self.tcp_open = False
            self.tcp.shutdown()
            self.tcp.server_close()

    # --- building replies ---

    def _behaviour(self, name: str) -> Behaviour:
        return self.rules.get(name.lower(), self.default)

    def _record(self, data: bytes, client, transport: str) -> tuple[DNSRecord, Behaviour]:
        query = DNSRecord.parse(data)
        name = str(query.q.qname)
        opt = [r for r in query.ar if r.rtype == QTYPE.OPT]
        do = bool(opt and (opt[0].ttl & 0x8000))
        with self.lock:
            self.seen.append(Seen(transport, client, name, QTYPE[query.q.qtype], bool(opt), do,
                                  query.header.id, opt[0].rclass if opt else 0))
        return query, self._behaviour(name)

    def genuine(self, query: DNSRecord, b: Behaviour, truncated: bool = False) -> bytes:
        reply = query.reply()
        reply.header.rcode = b.rcode
        qname = query.q.qname
        if b.formerr_on_opt and any(r.rtype == QTYPE.OPT for r in query.ar):
            reply.header.rcode = RCODE.FORMERR
            return reply.pack()
        if truncated:
            reply.header.tc = 1
        elif b.rcode == RCODE.NXDOMAIN or not b.answers:
            reply.add_auth(RR(qname, QTYPE.SOA, ttl=b.ttl, rdata=SOA(
                "ns.example.", "admin.example.", (1, 3600, 600, 86400, b.soa_minimum))))
        else:
            owner = qname
            if b.cname:
                reply.add_answer(RR(qname, QTYPE.CNAME, ttl=b.ttl, rdata=CNAME(b.cname)))
                owner = b.cname
            for address in b.answers:
                if ":" in address:
                    if query.q.qtype in (QTYPE.AAAA, QTYPE.ANY):
                        reply.add_answer(RR(owner, QTYPE.AAAA, ttl=b.ttl, rdata=AAAA(address)))
                elif query.q.qtype in (QTYPE.A, QTYPE.ANY):
                    reply.add_answer(RR(owner, QTYPE.A, ttl=b.ttl, rdata=A(address)))
            for i in range(b.padding):
                reply.add_answer(RR(owner, QTYPE.TXT, ttl=b.ttl, rdata=_txt(f"pad{i:04d}" * 20)))
        if b.edns and any(r.rtype == QTYPE.OPT for r in query.ar):
            reply.add_ar(EDNS0(udp_len=1232))
        return reply.pack()

    @staticmethod
    def forged(query: DNSRecord, kind: str, address: str | None = None,
               several: tuple[str, ...] = ()) -> bytes:
        reply = query.reply()
        if kind == "formerr":  # posing as a server that does not know EDNS
            reply.header.rcode = RCODE.FORMERR
            return reply.pack()
        address = address or (FORGED_LISTED if kind == "forged-address" else FORGED_UNLISTED)
        for each in several or (address,):
            reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=3600, rdata=A(each)))
        if kind == "wrong-id":
            reply.header.id = (query.header.id + 1) & 0xFFFF
        if kind == "wrong-question":  # reply() shares the question object: replace, not edit
            reply.questions = [DNSQuestion("other." + str(query.q.qname), query.q.qtype)]
        if kind != "no-edns":
            reply.add_ar(EDNS0(udp_len=1232))  # a smarter injector: only other checks catch it
        return reply.pack()

    # --- serving ---

    def _serve_udp(self) -> None:
        while self.running:
            try:
                data, client = self.udp.recvfrom(65535)
            except OSError:
                return
            if not data and self.udp.fileno() < 0:
                return  # closed by close_udp
            try:
                query, b = self._record(data, client, "udp")
            except Exception:
                continue
            if b.silent or b.silent_udp:
                continue
            if b.craft is not None:
                self._send_udp(b.craft(data), client)
                continue
            for kind in b.forgeries:
                sock = self.spoofer if kind == "other-port" else self.udp
                sock.sendto(self.forged(query, kind, b.forged_answer, b.forged_answers), client)
            reply = self.genuine(query, b, truncated=b.truncate_udp)
            if b.delay:
                threading.Timer(b.delay, self._send_udp, (reply, client)).start()
            else:
                self._send_udp(reply, client)

    def _send_udp(self, reply: bytes, client) -> None:
        with contextlib.suppress(OSError):
            self.udp.sendto(reply, client)

    def serve_stream(self, conn: socket.socket, client, transport: str = "tcp") -> None:
        """Length-prefixed DNS on a connected stream: plain TCP, or TLS for a DoT fake."""
        conn.settimeout(10)
        try:
            while True:
                head = _recv_exact(conn, 2)
                if not head:
                    return
                data = _recv_exact(conn, struct.unpack(">H", head)[0])
                query, b = self._record(data, client, transport)
                if b.silent:
                    continue
                if b.tcp_reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()  # linger 0: an RST, not a FIN
                    return
                if b.tcp_delay:
                    time.sleep(b.tcp_delay)
                if b.stream_answers is not None:
                    b = dataclasses.replace(b, answers=b.stream_answers)
                reply = b.craft(data) if b.craft is not None else self.genuine(query, b)
                conn.sendall(struct.pack(">H", len(reply)) + reply)
        except (OSError, ValueError):
            return


def _txt(text: str):
    from dnslib import TXT
    return TXT(text)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            return b""
        out += chunk
    return out


# --- the forwarder, in-process, on its own event loop thread ---


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for UDP and TCP on every address of `host`'s family, below the kernel's
    ephemeral range (32768 and up here).

    A port from bind(0) on loopback may be held on another address (a connected UDP socket's,
    Docker's), so a server that binds the wildcard fails on it; and the kernel may hand it to
    another process's outgoing socket before the test binds it. Neither happens below the
    ephemeral range, checked on the wildcard."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    for port in _random.sample(range(20000, 32768), 200):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as udp, \
                    socket.socket(family, socket.SOCK_STREAM) as tcp:
                udp.bind((wildcard, port))
                tcp.bind((wildcard, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


class ProxyThread:
    """A running forwarder built from command-line style options; `log` holds the query log."""

    def __init__(self, *options: str, host: str = "127.0.0.1", environ: dict | None = None,
                 uvloop: bool = False):
        """`uvloop`: on uvloop's event loop, as the forwarder runs outside the tests."""
        from dnsproxy.cli import parser

        self.host = host
        self.port = free_port(host)
        listen = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        args = vars(parser().parse_args(["--listen", listen, "--query-log", *options]))
        args.pop("log_level", None)
        self.settings = build_settings(args, environ or {})
        self.log = io.StringIO()
        if uvloop:
            import uvloop as module

            self.loop = module.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(5):
            raise RuntimeError("forwarder did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.service = Service(self.settings)
        querylog = self.service.querylog
        for log in getattr(querylog, "logs", (querylog,)):  # a Tee with the page's history
            log.stream = self.log
        self.loop.run_until_complete(self.service.start())
        self.ready.set()
        self.loop.run_until_complete(self.service.stopping.wait())
        self.loop.run_until_complete(self.service.stop())

    @property
    def metrics(self):
        self.sync()
        return self.service.metrics

    def sync(self, take: bool = True) -> None:
        """Wait until the forwarder's loop has finished what it was doing: a reply is sent a
        moment before its query-log line is written, and the client may read in between.
        `take`: the compiled path's hits taken too (their LRU order, counts and records)."""
        done = threading.Event()

        def settle() -> None:
            if take and self.service.hit_path is not None:
                self.service.hit_path.take()  # the compiled path's hits, at once
            self.loop.call_soon(done.set)  # after the log's flush, which take() scheduled

        self.loop.call_soon_threadsafe(settle)
        done.wait(5)

    def log_lines(self) -> list[dict]:
        import json
        self.sync()
        return [json.loads(line) for line in self.log.getvalue().splitlines() if line]

    def close(self) -> None:
        if self.loop.is_closed():  # closed already (a test that restarts it)
            return
        self.loop.call_soon_threadsafe(self.service.stopping.set)
        self.thread.join(5)
        self.loop.close()


def ask(port: int, name: str, qtype: str = "A", host: str = "127.0.0.1", tcp: bool = False,
        edns: bool = True, do: bool = False, bufsize: int = 1232, timeout: float = 5.0,
        qclass: str = "IN", source: str | None = None) -> DNSRecord:
    """A client query, the way a stub resolver sends one (from `source`, if given)."""
    query = DNSRecord.question(name, qtype, qclass)
    if edns:
        query.add_ar(EDNS0(udp_len=bufsize, flags="do" if do else ""))
    raw = send_raw(port, query.pack(), host=host, tcp=tcp, timeout=timeout, source=source)
    reply = DNSRecord.parse(raw)
    assert reply.header.id == query.header.id
    return reply


def send_raw(port: int, data: bytes, host: str = "127.0.0.1", tcp: bool = False,
             timeout: float = 5.0, source: str | None = None) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind = None if source is None else (source, 0)
    if tcp:
        with socket.create_connection((host, port), timeout=timeout, source_address=bind) as conn:
            conn.sendall(struct.pack(">H", len(data)) + data)
            length = struct.unpack(">H", _recv_exact(conn, 2))[0]
            return _recv_exact(conn, length)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        if bind is not None:
            sock.bind(bind)
        sock.sendto(data, (host, port))
        return sock.recv(65535)


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]
