#!/usr/bin/env python3
"""The household benchmark's upstream: a tiny authoritative server, cheap and stateless.

Why not dnsmasq: the household run needs three things dnsmasq cannot give at once. Each name
carries its own TTL (the label `t<seconds>` in the name sets it, so no per-name table is kept);
each answer says when it was made (its A address encodes the time, so the client can tell a
stale answer from a fresh one without trusting any forwarder's TTL arithmetic); and each
forwarder gets a port of its own, so the upstream queries of each are counted exactly.

Every A query is answered with one A record in 198.19.0.0/16 (the benchmark range of RFC 2544:
nothing real lives there): the low 16 bits are tenths of a second since `--base`, modulo
TICKS. Other types get an empty NOERROR. An OPT in the query is echoed, as a real resolver
would, so forwarders that learn EDNS support keep their defaults. UDP and TCP on every port.

`--delay-ms` holds every reply that long before sending it: the stand-in for `tc netem` on a
kernel built without sch_netem (asyncio's timers are good to about a millisecond).

On SIGTERM it writes the arrival time of every query, by port and transport, to `--log` (JSON).
Standard library only: it runs inside a network namespace under the venv's interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import struct
import sys
import time

PREFIX = (198 << 24) | (19 << 16)  # 198.19.0.0/16
TICK = 0.1  # seconds per unit of the encoded time
TICKS = 1 << 16  # the encoding wraps after 6553.6 s, far longer than one run
DEFAULT_TTL = 60
TTL_LABEL = re.compile(rb"(?:^|[-.])t(\d{1,7})(?:[-.]|$)")


def name_ttl(qname: bytes) -> int:
    """The TTL a name asks for: the `t<seconds>` part of its first label (text form, lower
    case), else DEFAULT_TTL."""
    first = qname.split(b".", 1)[0]
    match = TTL_LABEL.search(first)
    return int(match.group(1)) if match else DEFAULT_TTL


def encode_time(now: float, base: float) -> int:
    """The A address (as an integer) that says `now`, in TICKs since `base`."""
    return PREFIX | (int((now - base) / TICK) % TICKS)


def decode_time(address: int, base: float, received: float) -> float | None:
    """When the upstream made an answer with this address: the latest time the encoding allows
    that is not after `received` (plus a tick of slack). None if the address is not ours."""
    if address >> 16 != PREFIX >> 16:
        return None
    ticks = address & 0xFFFF
    made = base + ticks * TICK
    period = TICKS * TICK
    if received + TICK >= made:
        made += ((received + TICK - made) // period) * period
    return made


def read_question(packet: bytes) -> tuple[bytes, int, int] | None:
    """(name in text form, lower case; qtype; offset after the question), or None."""
    if len(packet) < 17 or struct.unpack_from(">H", packet, 4)[0] != 1:
        return None
    labels, pos = [], 12
    while True:
        if pos >= len(packet):
            return None
        length = packet[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:
            return None  # no compression in a question we accept
        labels.append(packet[pos + 1:pos + 1 + length])
        pos += 1 + length
    if pos + 4 > len(packet):
        return None
    qtype = struct.unpack_from(">H", packet, pos)[0]
    return b".".join(labels).lower(), qtype, pos + 4


def has_opt(packet: bytes, offset: int) -> bool:
    """True if the first additional record (a query has no answer or authority) is an OPT."""
    if struct.unpack_from(">H", packet, 10)[0] == 0:
        return False
    # OPT's owner is the root: one zero byte, then TYPE 41.
    return packet[offset:offset + 3] == b"\x00\x00\x29"


OPT_RR = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"  # root, OPT, 1232 bytes, no options


def answer(packet: bytes, base: float, now: float) -> bytes | None:
    """The reply to one query, or None for something that is not a query we can read."""
    if len(packet) < 12 or packet[2] & 0x80:
        return None
    question = read_question(packet)
    if question is None:
        return None
    qname, qtype, end = question
    opt = has_opt(packet, end)
    flags = 0x8400 | (packet[2] & 0x01) << 8  # QR, AA, RD copied
    body = packet[12:end]
    if qtype == 1:
        rdata = struct.pack(">I", encode_time(now, base))
        record = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, name_ttl(qname), 4) + rdata
        head = struct.pack(">HHHHHH", struct.unpack_from(">H", packet)[0], flags, 1, 1, 0, opt)
        return head + body + record + (OPT_RR if opt else b"")
    head = struct.pack(">HHHHHH", struct.unpack_from(">H", packet)[0], flags, 1, 0, 0, opt)
    return head + body + (OPT_RR if opt else b"")


class Authority:
    """The server: one UDP endpoint and one TCP listener per port, a log of arrivals."""

    def __init__(self, host: str, ports: list[int], base: float, delay: float = 0.0) -> None:
        self.host = host
        self.ports = ports
        self.base = base
        self.delay = delay  # seconds each reply is held
        self.arrivals: dict[str, list[float]] = {}

    def note(self, port: int, transport: str) -> None:
        self.arrivals.setdefault(f"{port}/{transport}", []).append(time.time())

    def reply(self, packet: bytes) -> bytes | None:
        return answer(packet, self.base, time.time())

    async def serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        closers = []
        for port in self.ports:
            transport, _ = await loop.create_datagram_endpoint(
                lambda port=port: _Udp(self, port), local_addr=(self.host, port))
            closers.append(transport.close)
            server = await asyncio.start_server(
                lambda r, w, port=port: self._tcp(r, w, port), self.host, port,
                reuse_address=True)
            closers.append(server.close)
        await stop.wait()
        for close in closers:
            close()

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   port: int) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                size = struct.unpack(">H", await reader.readexactly(2))[0]
                packet = await reader.readexactly(size)
                self.note(port, "tcp")
                reply = self.reply(packet)
                if reply is not None:
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    writer.write(struct.pack(">H", len(reply)) + reply)
                    await writer.drain()
        writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, authority: Authority, port: int) -> None:
        self.authority = authority
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.authority.note(self.port, "udp")
        reply = self.authority.reply(data)
        if reply is None:
            return
        if self.authority.delay:
            asyncio.get_running_loop().call_later(self.authority.delay, self.transport.sendto,
                                                  reply, addr)
        else:
            self.transport.sendto(reply, addr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="address to serve on")
    p.add_argument("--ports", required=True, help="comma-separated ports, one per forwarder")
    p.add_argument("--base", type=float, required=True, help="epoch the encoded time counts from")
    p.add_argument("--log", required=True, help="where the arrivals go on SIGTERM (JSON)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="hold each reply this long")
    args = p.parse_args(argv)
    authority = Authority(args.listen, [int(x) for x in args.ports.split(",")], args.base,
                          args.delay_ms / 1000)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await authority.serve(stop)

    asyncio.run(run())
    with open(args.log, "w") as handle:
        json.dump(authority.arrivals, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
