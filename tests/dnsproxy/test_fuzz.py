"""Fuzzing: hostile bytes never crash, stall or grow the forwarder.

FUZZ_EXAMPLES sets the volume (default 100000 per test); a longer hand run:
    FUZZ_EXAMPLES=2000000 pytest tests/dnsproxy/test_fuzz.py
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import time

from dnslib import EDNS0, DNSRecord
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dnsproxy import wire

from .fakes import GENUINE, addresses, ask, free_port

# Hypothesis picks a seed per example; each example expands it into a batch of mutations, so
# the volume is in the hundred thousands without paying Hypothesis's cost per input.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100000"))
BATCH = 500
FUZZ = settings(max_examples=max(EXAMPLES // BATCH, 1), deadline=None, database=None,
                phases=[Phase.generate], suppress_health_check=list(HealthCheck))


def _seeds() -> list[bytes]:
    query = DNSRecord.question("www.example.com", "AAAA")
    query.add_ar(EDNS0(udp_len=4096, flags="do"))
    reply = DNSRecord.question("www.example.com").reply()
    reply.add_answer(*DNSRecord.question("a").reply().rr)
    return [DNSRecord.question("example.com").pack(), query.pack(), reply.pack(),
            bytes(12) + b"\xc0\x0c\x00\x01\x00\x01",  # compression loop in the question
            struct.pack(">HHHHHH", 1, 0, 1, 0, 0, 3) + b"\x00\x00\x01\x00\x01" + b"\x00" * 33]


SEEDS = _seeds()


def mutate(rng: random.Random) -> bytes:
    """A mutation of a valid message (bytes changed, cut, extended), or plain noise."""
    if rng.random() < 0.2:
        return rng.randbytes(rng.randrange(700))
    data = bytearray(rng.choice(SEEDS))
    for _ in range(rng.randrange(7)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    if rng.random() < 0.5:
        del data[rng.randrange(len(data) + 1):]
    return bytes(data) + rng.randbytes(rng.randrange(3) * rng.randrange(20))


def _batch(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [mutate(rng) for _ in range(BATCH)]


batches = st.integers(0, 2**64).map(_batch)


CLIENT = wire.parse_query(DNSRecord.question("x.example").pack())


def _check_client_reply(data: bytes, parsed: wire.Reply) -> None:
    """Whatever dnslib can read, the client's copy must read the same, minus the OPT."""
    try:
        original = DNSRecord.parse(data)
    except Exception:
        return  # beyond what dnslib reads; the forwarder only has to stay up
    try:
        cached = wire.strip_opt(data, parsed)
    except wire.WireError:
        return
    query = wire.Query(7, 0x0100, parsed.question, wire.question_key(parsed.question),
                       CLIENT.qtype, CLIENT.qclass, False, False, 512)
    out = DNSRecord.parse(wire.client_reply(cached, query, 1))
    def rrs(msg):
        return [(rr.rtype, str(rr.rname).lower()) for rr in msg.rr + msg.auth + msg.ar
                if rr.rtype != 41]
    assert rrs(out) == rrs(original)


@FUZZ
@given(batches)
def test_wire_parsers_raise_only_wire_errors(batch: list[bytes]) -> None:
    for data in batch:
        for parse in (wire.parse_query, wire.parse_reply):
            try:
                parsed = parse(data)
            except wire.WireError:
                continue
            if parse is wire.parse_reply:
                assert wire.cache_ttl(parsed) >= 0
                _check_client_reply(data, parsed)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_server_survives_a_flood_of_hostile_packets(upstream):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dnsproxy", "--listen", f"127.0.0.1:{port}",
                             "--upstream", upstream.address, "--rate-limit", "0",
                             "--timeout", "1", "--tcp-idle-timeout", "1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                assert addresses(ask(port, "warm.example", timeout=0.2)) == [GENUINE]
                break
            except OSError:
                assert time.monotonic() < deadline, "the forwarder did not start"
        rss_before = _rss_kib(proc.pid)
        sent = {"udp": 0}
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setblocking(False)

        @FUZZ
        @given(batches)
        def flood(batch: list[bytes]) -> None:
            for data in batch:
                try:
                    udp.sendto(data, ("127.0.0.1", port))
                except BlockingIOError:
                    time.sleep(0.001)
                sent["udp"] += 1
            while True:  # replies we do not read would only fill our own buffer
                try:
                    udp.recv(65535)
                except BlockingIOError:
                    break
            time.sleep(0.002)  # let the server drain its socket rather than drop
            assert proc.poll() is None, "the forwarder died"

        flood()
        # TCP: garbage frames, half-sent frames, lengths that lie, connections left idle.
        conns = []
        for i in range(300):
            conn = socket.create_connection(("127.0.0.1", port), timeout=2)
            payload = SEEDS[i % len(SEEDS)]
            if i % 3 == 0:
                conn.sendall(struct.pack(">H", 65535) + payload)  # says more than it sends
            elif i % 3 == 1:
                conn.sendall(b"\x00")  # half a length prefix
            else:
                conn.sendall(struct.pack(">H", len(payload)) + payload[::-1])
            conns.append(conn)
        assert addresses(ask(port, "after.example", timeout=3)) == [GENUINE]
        for conn in conns:
            conn.close()
        time.sleep(0.2)
        assert addresses(ask(port, "after-tcp.example", tcp=True, timeout=3)) == [GENUINE]
        time.sleep(2.5)  # in-flight upstream queries and idle connections time out
        rss_after = _rss_kib(proc.pid)
        assert addresses(ask(port, "finally.example", timeout=3)) == [GENUINE]
        assert proc.poll() is None
        print(f"fuzz: {sent['udp']} UDP datagrams, 300 TCP connections; "
              f"RSS {rss_before} KiB before, {rss_after} KiB after")
        assert rss_after - rss_before < 20 * 1024, (rss_before, rss_after)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=5)
    assert "Traceback" not in err, err
