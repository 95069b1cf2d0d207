"""Fuzzing: hostile bytes never crash, stall or grow the forwarder.

FUZZ_EXAMPLES sets the volume (default 100000 per test); a longer hand run:
    FUZZ_EXAMPLES=2000000 pytest tests/dnsproxy/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import sys
import time

from dnslib import EDNS0, QTYPE, RR, A, DNSRecord
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
    reply.add_answer(RR("www.example.com", QTYPE.A, ttl=60, rdata=A("192.0.2.1")))
    # Replies with an OPT record, first last, then between two records: a mutated count
    # moves it into another section, which is how an OPT in the answer section slipped by.
    with_opt = DNSRecord.parse(reply.pack())
    with_opt.add_ar(EDNS0(udp_len=1232))
    opt_between = DNSRecord.parse(with_opt.pack())
    opt_between.add_ar(RR("ns.example.com", QTYPE.A, ttl=30, rdata=A("192.0.2.2")))
    return [DNSRecord.question("example.com").pack(), query.pack(), reply.pack(),
            with_opt.pack(), opt_between.pack(),
            bytes(12) + b"\xc0\x0c\x00\x01\x00\x01",  # compression loop in the question
            struct.pack(">HHHHHH", 1, 0, 1, 0, 0, 3) + b"\x00\x00\x01\x00\x01" + b"\x00" * 33]


SEEDS = _seeds()


def recount(rng: random.Random, data: bytearray) -> None:
    """The same records dealt anew among answer, authority and additional: an OPT record then
    lands outside the additional section, or a record beside it moves, which byte changes alone
    almost never do (they must change two counts together)."""
    total = sum(struct.unpack_from(">HHH", data, 6))
    an = rng.randrange(total + 1)
    ns = rng.randrange(total - an + 1)
    struct.pack_into(">HHH", data, 6, an, ns, total - an - ns)


def mutate(rng: random.Random) -> bytes:
    """A mutation of a valid message (records dealt to other sections, bytes changed, cut,
    extended), or plain noise."""
    if rng.random() < 0.2:
        return rng.randbytes(rng.randrange(700))
    data = bytearray(rng.choice(SEEDS))
    if rng.random() < 0.25:
        recount(rng, data)
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


def _sections(msg: DNSRecord) -> list[tuple[str, int, str]]:
    """Every non-OPT record with its section: a record must never change sections."""
    return [(section, rr.rtype, str(rr.rname).lower())
            for section, rrs in (("an", msg.rr), ("ns", msg.auth), ("ar", msg.ar))
            for rr in rrs if rr.rtype != QTYPE.OPT]


def _check_stripped(data: bytes, parsed: wire.Reply) -> None:
    """strip_opt raises nothing but WireError, and what it keeps re-parses with consistent
    counts and TTLs; so does the client's copy. Whatever dnslib reads of the original, the
    client's copy reads the same, section by section, minus the OPT."""
    try:
        cached = wire.strip_opt(data, parsed, max_ttl=86400)
    except wire.WireError:
        return
    body = wire.parse_reply(cached.body)  # a WireError here is a bug, and fails the test
    qd, an, ns, ar = parsed.counts
    assert body.counts == (qd, an, ns, ar - (parsed.opt is not None))
    assert body.opt is None
    assert len(cached.offsets) == an + ns + body.counts[3]
    assert [off for off, _ in body.ttls] == list(cached.offsets)
    assert all(ttl <= 86400 for _, ttl in cached.ttls)
    for edns in (True, False):  # the last, OPT-less, is compared with dnslib below
        query = wire.Query(7, 0x0100, parsed.question, wire.question_key(parsed.question),
                           CLIENT.qtype, CLIENT.qclass, edns, False, 512)
        out = wire.client_reply(cached, query, 1)
        again = wire.parse_reply(out)
        assert again.counts == body.counts[:3] + (body.counts[3] + edns,)
        assert (again.opt is not None) is edns
        assert wire.parse_reply(wire.truncate_for(out, query)).counts[1:3] in (
            again.counts[1:3], (0, 0))
    if parsed.end != len(data):
        return  # dnslib reads some rdata past its length, into bytes we rightly drop
    try:
        original = DNSRecord.parse(data)
    except Exception:
        return  # beyond what dnslib reads; our own checks above still held
    assert _sections(DNSRecord.parse(out)) == _sections(original)


@FUZZ
@given(batches)
def test_wire_parsers_raise_only_wire_errors(batch: list[bytes]) -> None:
    """Only the module's own WireError may escape a parser, and a reply it accepts must
    survive every later step of the forwarder with its sections intact."""
    for data in batch:
        for parse in (wire.parse_query, wire.parse_reply):
            try:
                parsed = parse(data)
            except wire.WireError:
                continue
            if parse is wire.parse_reply:
                assert wire.cache_ttl(parsed) >= 0
                _check_stripped(data, parsed)
            else:
                wire.response(parsed, wire.SERVFAIL)
        wire.header_error(data, wire.FORMERR)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _ask_as_stub(port: int, name: str, source: str, tries: int = 3):
    for _ in range(tries - 1):
        with contextlib.suppress(TimeoutError):
            return ask(port, name, timeout=2, source=source)
    return ask(port, name, timeout=2, source=source)


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
        # The flooder may have spent its share of the in-flight budget; a neighbour has not. It
        # retries as a stub does: its first datagram may queue behind the flood's last ones.
        neighbour = "127.0.0.3"
        assert addresses(_ask_as_stub(port, "after.example", neighbour)) == [GENUINE]
        for conn in conns:
            conn.close()
        time.sleep(0.2)
        assert addresses(
            ask(port, "after-tcp.example", tcp=True, timeout=3, source=neighbour)
        ) == [GENUINE]
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
