"""`netsetup check` against misbehaving servers on loopback: every failure is a sentence.

Each fake below does one thing a broken path does (closes the connection, stops mid-frame,
answers from the wrong port first, refuses), on a real socket.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from dnslib import RCODE, RR, A, DNSRecord

from netsetup.check import Probe, query


def reply_to(data: bytes, address: str = "192.0.2.10", rcode: int = 0) -> bytes:
    request = DNSRecord.parse(data)
    reply = request.reply()
    reply.header.rcode = rcode
    if rcode == 0:
        reply.add_answer(RR(request.q.qname, rdata=A(address), ttl=60))
    return reply.pack()


def serve_tcp(handler: Callable[[socket.socket], None]) -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                handler(conn)

    threading.Thread(target=loop, daemon=True).start()
    try:
        yield port
    finally:
        listener.close()


def read_frame(conn: socket.socket) -> bytes:
    (length,) = struct.unpack("!H", conn.recv(2))
    return conn.recv(length)


@pytest.fixture
def closes_at_once() -> Iterator[int]:
    yield from serve_tcp(lambda conn: None)


@pytest.fixture
def closes_mid_frame() -> Iterator[int]:
    def handler(conn: socket.socket) -> None:
        answer = reply_to(read_frame(conn))
        conn.sendall(struct.pack("!H", len(answer)) + answer[:5])  # then close

    yield from serve_tcp(handler)


def serve_udp(handler: Callable[[socket.socket, bytes, tuple], None]) -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            try:
                data, client = sock.recvfrom(4096)
            except OSError:
                return
            handler(sock, data, client)

    threading.Thread(target=loop, daemon=True).start()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def udp_with_a_forgery_first() -> Iterator[int]:
    """Answers each query twice: first from another port (as an off-path spoofer might, with
    the right ID), then from the port that was asked."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", 0))

        def handler(sock: socket.socket, data: bytes, client: tuple) -> None:
            other.sendto(reply_to(data, "203.0.113.66"), client)
            sock.sendto(reply_to(data), client)

        yield from serve_udp(handler)


@pytest.fixture
def refuses() -> Iterator[int]:
    yield from serve_udp(lambda sock, data, client: sock.sendto(
        reply_to(data, rcode=RCODE.REFUSED), client))


def probe(port: int, transport: str) -> Probe:
    return Probe("port", "127.0.0.1", port, transport)


def test_connection_closed_without_an_answer(closes_at_once: int) -> None:
    result = query(probe(closes_at_once, "tcp"), "example.test", "A", "IN", timeout=2)
    assert not result.ok
    assert result.error == "connection closed without an answer"


def test_connection_closed_mid_frame(closes_mid_frame: int) -> None:
    result = query(probe(closes_mid_frame, "tcp"), "example.test", "A", "IN", timeout=2)
    assert not result.ok
    assert result.error == "connection closed without an answer"


def test_nothing_listening_is_said_so() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        result = query(probe(port, "tcp"), "example.test", "A", "IN", timeout=2)
    assert result.error.startswith("connection refused")


def test_udp_reply_from_another_port_is_not_taken(udp_with_a_forgery_first: int) -> None:
    result = query(probe(udp_with_a_forgery_first, "udp"), "example.test", "A", "IN", timeout=2)
    assert result.ok, result
    assert result.answers == ["example.test. 192.0.2.10"], result.answers


def test_refused_names_the_fix(refuses: int) -> None:
    result = query(
        probe(refuses, "udp"), "example.test", "A", "IN", timeout=2, lan_hint="198.19.53.0/24"
    )
    assert not result.ok and result.rcode == "REFUSED"
    assert "127.0.0.1 is not in the networks the appliance serves" in result.error
    assert "LAN_CIDR=198.19.53.0/24" in result.error
