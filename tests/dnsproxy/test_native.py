"""The compiled UDP hit path (native/, dnsproxy/fastpath.py) against the Python one it stands in
for: it reads a query exactly as `wire.parse_query` does (and refuses what it refuses), a hit's
reply is byte for byte what `wire.client_reply` and `truncate_for` make, crafted and random
datagrams through a real socket never stop it, and what it does not answer reaches Python."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import select
import socket
import struct
import threading
import time

import pytest
from dnslib import EDNS0, QTYPE, RR, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsproxy import fastpath, wire
from dnsproxy.stages.cache import KEY_SUFFIX

from .fakes import GENUINE, ProxyThread, addresses, ask

pytestmark = pytest.mark.skipif(not fastpath.available() and not os.environ.get("CI"),
                                reason="the compiled hit path is not built (make native)")

LOOPBACK = [(bytes([127, 0, 0, 0]), 8), (bytes(15) + b"\x01", 128)]


def native():
    from dnsproxy import _native

    return _native


def fast_path(rate: float = 0.0, record: bool = True):
    return native().FastPath(LOOPBACK, rate, 2 * rate, 0.9, record)


def python_fields(data: bytes) -> tuple | None:
    try:
        q = wire._parse_query(data)
    except (wire.WireError, struct.error):
        return None
    return (q.id, q.flags, 12 + len(q.question), q.edns, q.do, q.udp_size, q.edns_version)


def query_bytes(name: str, qtype: str = "A", edns: int | None = 1232, do: bool = False,
                flags: int = 0x0100, qid: int = 0x4242) -> bytes:
    record = DNSRecord.question(name, qtype)
    if edns is not None:
        record.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    data = bytearray(record.pack())
    struct.pack_into(">HH", data, 0, qid, flags)
    return bytes(data)


# ---- reading queries -------------------------------------------------------------------------


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_are_read_as_python_reads_them(data: bytes) -> None:
    assert native().parse_query(data) == python_fields(data)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from([query_bytes("www.Example.test"), query_bytes("a.b", "AAAA", None),
                        query_bytes("x.test", edns=4096, do=True)]),
       st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=4),
       st.integers(0, 80))  # fmt: skip
def test_mutated_queries_are_read_as_python_reads_them(base: bytes, flips, cut: int) -> None:
    data = bytearray(base)
    for index, value in flips:
        if index < len(data):
            data[index] = value
    data = bytes(data[:len(data) - cut % 8])
    assert native().parse_query(data) == python_fields(data)


@pytest.mark.parametrize("crafted", [
    b"",  # nothing
    b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6,  # a question count, no question
    query_bytes("a.test")[:-3],  # cut inside the OPT record
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\xc0\x0c\x00\x01\x00\x01",  # pointer loop
    b"\x12\x34\x01\x00\x00\x01\xff\xff\xff\xff\xff\xff\x01a\x00\x00\x01\x00\x01",  # huge counts
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x3fa" + b"a" * 70,  # label past the end
    b"\x12\x34\x81\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01",  # a response
], ids=["empty", "no-question", "cut-opt", "pointer-loop", "huge-counts", "long-label",
        "response"])  # fmt: skip
def test_crafted_queries_are_refused_as_python_refuses_them(crafted: bytes) -> None:
    assert native().parse_query(crafted) is None
    assert python_fields(crafted) is None


def test_opt_in_the_answer_section_is_read_as_python_reads_it() -> None:
    """An OPT record anywhere counts (when there is an additional section), as in Python."""
    base = query_bytes("a.test")
    opt = base[-11:]
    a_record = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x7f\x00\x00\x01"
    moved = bytearray(base[:-11]) + opt + a_record
    struct.pack_into(">HHH", moved, 6, 1, 0, 1)  # the OPT first (as an answer), then an A
    assert native().parse_query(bytes(moved)) == python_fields(bytes(moved))


# ---- a hit's reply, byte for byte -------------------------------------------------------------


def cached_reply(name: str, ttl: int = 300, addresses: int = 1) -> wire.CachedReply:
    reply = DNSRecord.question(name).reply()
    for i in range(addresses):
        reply.add_answer(RR(name, QTYPE.A, rdata=A(f"192.0.2.{i % 250 + 1}"), ttl=ttl))
    reply.add_ar(EDNS0(udp_len=1232))
    data = reply.pack()
    return wire.strip_opt(data, wire.parse_reply(data))


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(["www.example.test", "WWW.Example.TEST", "mail.example.test"]),
       edns=st.sampled_from([None, 512, 1232, 4096]), do=st.booleans(),
       flags=st.sampled_from([0x0000, 0x0100, 0x0110, 0x0120, 0x0130]),
       age=st.integers(0, 269), addresses=st.sampled_from([1, 3, 40]))  # fmt: skip
def test_a_hit_is_what_the_python_path_sends(name, edns, do, flags, age, addresses) -> None:
    cached = cached_reply("www.example.test" if name.lower().startswith("www") else
                          "mail.example.test", addresses=addresses)
    data = query_bytes(name, edns=edns, do=do and edns is not None, flags=flags,
                       qid=random.randrange(65536))
    query = wire.parse_query(data)
    key = query.key + KEY_SUFFIX[query.do][bool(query.flags & wire.CD)]
    stored = 1000.0
    fast = fast_path()
    assert fast.put(key, cached.stamped_bytes(stored))
    reply, _ = fast.answer(data, "127.0.0.1", 5353, stored + age + 0.5)
    assert reply == wire.truncate_for(wire.client_reply(cached, query, age), query)


def test_near_expiry_and_stale_are_answered_and_each_refresh_asked_once() -> None:
    cached = cached_reply("www.example.test", ttl=100)
    data = query_bytes("www.example.test")
    query = wire.parse_query(data)
    key = query.key + b"\x00"
    fast = fast_path()
    fast.set_stale(True, 30, 1000.0)
    fast.put(key, cached.stamped_bytes(1000.0))

    def python(age: int, stale_ttl: int = 0) -> bytes:  # what the cache stage sends
        return wire.truncate_for(wire.client_reply(cached, query, age, stale_ttl), query)

    assert fast.answer(data, "127.0.0.1", 1, 1000.0 + 89.5)[0] == python(89)
    assert fast.pending(0)[2] == []
    assert fast.answer(data, "127.0.0.1", 1, 1000.0 + 95)[0] == python(95)  # prefetch window
    assert fast.pending(0)[2] == [(key, data, "prefetch")]
    assert fast.answer(data, "127.0.0.1", 1, 1000.0 + 99)[0] == python(99)
    assert fast.answer(data, "127.0.0.1", 1, 1000.0 + 150)[0] == python(150, 30)  # stale
    assert fast.pending(0)[2] == [], "asked once while Python refreshes"
    fast.refreshed(key)  # Python's refresh failed: the next hit asks again
    assert fast.answer(data, "127.0.0.1", 1, 1000.0 + 160)[0] == python(160, 30)
    assert fast.pending(0)[2] == [(key, data, "stale")]
    _, records, answered, _, _, _, stale = fast.take()
    assert [r[5] for r in records] == ["cached"] * 3 + ["stale"] * 2
    assert (answered, stale) == (5, 2)
    assert fast.answer(data, "127.0.0.1", 1, 1000.0 + 100 + 1000)[0] is None, "past max_stale"
    fast.set_stale(False, 30, 1000.0)
    assert fast.answer(data, "127.0.0.1", 1, 1000.0 + 150)[0] is None, "serve-stale off"
    fast.put(key, cached.stamped_bytes(1000.0))  # a new entry: its refresh not asked yet
    assert fast.answer(data, "127.0.0.1", 1, 1000.0 + 95)[0] == python(95)
    assert fast.pending(0)[2] == [(key, data, "prefetch")]


def test_a_future_stamp_missing_entry_and_refused_client_go_to_python() -> None:
    cached = cached_reply("www.example.test", ttl=100)
    data = query_bytes("www.example.test")
    query = wire.parse_query(data)
    fast = fast_path()
    fast.put(query.key + b"\x00", cached.stamped_bytes(1000.0))
    assert fast.answer(data, "127.0.0.1", 1, 999.0)[0] is None
    assert fast.answer(query_bytes("other.test"), "127.0.0.1", 1, 1000.0)[0] is None
    assert fast.answer(data, "192.168.1.5", 1, 1000.0)[0] is None, "not on the access list"
    fast.remove(query.key + b"\x00")
    assert fast.answer(data, "127.0.0.1", 1, 1000.0)[0] is None


def test_new_entries_wait_for_their_first_hit_in_a_bounded_number() -> None:
    """`offer` (a newly stored entry) copies it, but at most `eager` such copies wait for
    their first hit: the oldest unhit one makes way. A hit entry, or one `put` (a hit or a
    refresh on the Python side: a hot one), stays."""
    fast = fast_path()
    assert fast.eager == native().EAGER_COPIES
    fast.eager = 2
    names = ["a.test", "b.test", "c.test", "d.test", "e.test"]
    keys = [wire.parse_query(query_bytes(name)).key + b"\x00" for name in names]
    entries = [cached_reply(name).stamped_bytes(1000.0) for name in names]

    def answered(name: str) -> bool:
        return fast.answer(query_bytes(name), "127.0.0.1", 1, 1000.0)[0] is not None

    assert fast.offer(keys[0], entries[0]) and fast.offer(keys[1], entries[1])
    assert answered("a.test")  # hit: a stays from now on
    assert fast.offer(keys[2], entries[2])  # a is hit, so b and c may wait
    assert fast.offer(keys[3], entries[3])  # b, the oldest unhit, makes way
    assert len(fast) == 3 and not answered("b.test")
    assert fast.put(keys[4], entries[4])  # hot: it never makes way
    assert answered("c.test")
    assert fast.offer(keys[1], entries[1])  # c is hit: d and b wait
    assert [answered(name) for name in names] == [True] * 5
    fast.eager = 0  # none wait: a new entry waits for its first hit in Python
    fast.remove(keys[1])  # as the cache stage drops an entry it replaces
    assert not fast.offer(keys[1], entries[1]) and not answered("b.test")
    fast.clear()
    fast.eager = 1
    assert fast.offer(keys[1], entries[1]) and answered("b.test")


def test_what_python_answers_itself_goes_to_python() -> None:
    fast = fast_path()
    chaos = bytes(DNSRecord.question("id.server", "TXT", "CH").pack())
    badvers = bytearray(query_bytes("www.example.test"))
    badvers[-5] = 1  # the OPT's version byte (TTL's second byte)
    assert wire.parse_query(bytes(badvers)).edns_version == 1
    notify = query_bytes("www.example.test", flags=0x2000)  # opcode NOTIFY
    for data in (chaos, bytes(badvers), notify):
        assert fast.answer(data, "127.0.0.1", 1, 0.0)[0] is None


def test_the_rate_limit_is_one_bucket_per_client() -> None:
    cached = cached_reply("www.example.test")
    data = query_bytes("www.example.test")
    query = wire.parse_query(data)
    fast = fast_path(rate=2.0)  # burst 4
    fast.put(query.key + b"\x00", cached.stamped_bytes(0.0))
    verdicts = [fast.answer(data, "127.0.0.1", 1, 1.0)[0] for _ in range(6)]
    assert [isinstance(v, bytes) for v in verdicts] == [True] * 4 + [False] * 2
    assert verdicts[4] == "limited"
    assert not fast.allow("127.0.0.1", 1.0), "TCP shares the client's bucket"
    assert fast.allow("127.0.0.2", 1.0)
    assert isinstance(fast.answer(data, "127.0.0.1", 1, 2.0)[0], bytes), "tokens came back"
    keys, records, answered, limited, shed, faults, stale = fast.take()
    assert keys == [query.key + b"\x00"] and (answered, limited) == (5, 2)
    assert (shed, faults) == (0, 0)
    assert [r[5] for r in records] == ["cached"] * 4 + ["ratelimited"] * 2 + ["cached"]
    assert isinstance(fast.answer(data, "127.0.0.2", 1, 2.0)[0], bytes)
    assert fast.take()[0] == [query.key + b"\x00"], "listed again after a take, once"


def test_the_keys_hit_are_taken_alone_before_an_eviction() -> None:
    """`take_touched`: the keys hit since the last take, each once; the counts and records
    stay for `take`, which lists none of those keys again, but a key hit after it."""
    data = query_bytes("www.example.test")
    key = wire.parse_query(data).key + b"\x00"
    fast = fast_path()
    fast.put(key, cached_reply("www.example.test").stamped_bytes(0.0))
    for _ in range(2):
        assert isinstance(fast.answer(data, "127.0.0.1", 1, 1.0)[0], bytes)
    assert fast.take_touched() == [key]
    assert fast.take_touched() == []
    keys, records, answered, *_ = fast.take()
    assert (keys, len(records), answered) == ([], 2, 2)
    assert isinstance(fast.answer(data, "127.0.0.1", 1, 2.0)[0], bytes)
    assert fast.take()[0] == [key]


# ---- a real socket ------------------------------------------------------------------------------


@contextlib.contextmanager
def read_by(fast, sock: socket.socket):
    """`sock` read by a thread of the compiled path while the block runs."""
    sock.setblocking(True)
    number = fast.listen(sock.fileno())
    try:
        yield number
    finally:
        fast.unlisten(number)


def handed_on(fast, expected: int, timeout: float = 2.0) -> list:
    """What the reader threads left for Python, waiting on the wake-up descriptor as the
    event loop does, until `expected` datagrams came (or the time ran out)."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < expected:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fast.wakeup_fd()], [], [], left)
        if ready:
            batch, more, _ = fast.pending(1024)
            got.extend(batch)
            while more:
                batch, more, _ = fast.pending(1024)
                got.extend(batch)
    return got


def holding_a_hit():
    """A fast path holding a fresh entry: (it, a query the entry answers, the reply it sends)."""
    cached = cached_reply("www.example.test")
    fast = fast_path()
    hit = query_bytes("www.example.test")
    query = wire.parse_query(hit)
    fast.put(query.key + b"\x00", cached.stamped_bytes(time.monotonic()))
    return fast, hit, wire.client_reply(cached, query)


def test_datagrams_on_a_socket_hits_answered_the_rest_handed_on() -> None:
    fast, hit, answer = holding_a_hit()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("127.0.0.1", 0))
        client.settimeout(2)
        with read_by(fast, server) as number:
            for data in (hit, query_bytes("miss.test"), b"junk", hit):
                client.sendto(data, server.getsockname())
            replies = [client.recv(4096) for _ in range(2)]
            rest = handed_on(fast, 2)
            assert [data for _, data, _, _ in rest] == [query_bytes("miss.test"), b"junk"]
            assert all(n == number for n, _, _, _ in rest)
            assert all(address == ("127.0.0.1", client.getsockname()[1])
                       for _, _, address, _ in rest)
            assert all(reply == answer for reply in replies)
            assert handed_on(fast, 1, timeout=0.1) == []
        client.sendto(hit, server.getsockname())  # no thread reads it now
        with pytest.raises(TimeoutError):
            client.settimeout(0.2)
            client.recv(4096)
    assert fast.take()[2] == 2


def test_a_non_blocking_socket_is_refused_and_unlisten_frees_the_thread_at_once() -> None:
    fast = fast_path()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        with pytest.raises(ValueError, match="blocking"):
            fast.listen(server.fileno())
        server.setblocking(True)
        number = fast.listen(server.fileno())
        time.sleep(0.05)  # the thread waits in its receive now
        started = time.monotonic()
        fast.unlisten(number)
        assert time.monotonic() - started < 0.5


def thread_cpu_ticks(name: str) -> int:
    """CPU ticks (user + system) this process's threads named `name` used so far."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/self/task/{task}/comm") as comm:
                if comm.read().strip() != name:
                    continue
            with open(f"/proc/self/task/{task}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def test_the_thread_stands_aside_while_python_reads_and_reads_again_after() -> None:
    """Once the thread hands Python a datagram before it took the one before (load), Python
    reads the socket (`poll`, hits still answered by the module) and the thread only looks
    every few ms; after `give_back` it
    waits in its receive again, even on a socket the event loop's watching left non-blocking,
    without spinning."""
    fast, hit, answer = holding_a_hit()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("127.0.0.1", 0))
        client.settimeout(2)
        with read_by(fast, server) as number:
            assert not fast.python_reads
            client.sendto(query_bytes("miss.test"), server.getsockname())
            time.sleep(0.05)
            assert not fast.python_reads, "one datagram for an idle Python is no load"
            client.sendto(query_bytes("miss2.test"), server.getsockname())
            time.sleep(0.05)  # read by the thread before Python takes the first
            assert len(handed_on(fast, 2)) == 2
            assert fast.python_reads, "the second came before Python took the first"
            server.setblocking(False)  # as an event loop watching it leaves it
            assert fast.poll(number) == (0, False)
            polled, got = 0, []
            for data in [hit] * 20 + [query_bytes("other.test")]:
                client.sendto(data, server.getsockname())
                deadline = time.monotonic() + 1
                while time.monotonic() < deadline:  # the thread may look in first
                    read, waiting = fast.poll(number)
                    polled += read
                    if waiting:
                        got += fast.pending(10, False)[0]
                    with contextlib.suppress(BlockingIOError):
                        if data == hit:
                            assert client.recv(4096, socket.MSG_DONTWAIT) == \
                                answer
                            break
                    if got:
                        break
            got += handed_on(fast, 1 - len(got), timeout=0.1) if not got else []
            assert [data for _, data, _, _ in got] == [query_bytes("other.test")]
            assert polled > 0, "the thread read everything"
            fast.give_back()
            assert not fast.python_reads
            name = f"dnsproxy-udp{number}"
            before = thread_cpu_ticks(name)
            time.sleep(0.5)
            assert thread_cpu_ticks(name) - before <= 2, "the thread spins"
            client.sendto(hit, server.getsockname())
            assert client.recv(4096) == answer


def test_a_new_turn_wakes_python_even_when_it_is_woken_already() -> None:
    """The hand-over comes after the batch is queued: an event loop that took the batch and
    looked for the turn just before must be woken again to see it, or nobody reads."""
    fast = fast_path()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("127.0.0.1", 0))
        with read_by(fast, server):
            client.sendto(query_bytes("miss.test"), server.getsockname())
            assert select.select([fast.wakeup_fd()], [], [], 2)[0], "woken for the datagram"
            os.read(fast.wakeup_fd(), 256)  # seen, but not yet taken: Python is still woken
            client.sendto(query_bytes("miss2.test"), server.getsockname())
            assert select.select([fast.wakeup_fd()], [], [], 2)[0], "not woken for the turn"
            assert fast.python_reads
            assert len(handed_on(fast, 2)) == 2


def test_a_busy_event_loop_delays_a_hit_by_a_few_ms_at_most() -> None:
    """Python takes nothing handed on (its loop is busy, though it is its turn to read): the
    thread still answers hits, looking every few ms, and what waits for Python stops at
    MAX_PENDING, the rest counted as shed."""
    fast, hit, _ = holding_a_hit()
    limit = native().MAX_PENDING
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("127.0.0.1", 0))
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        client.settimeout(2)
        with read_by(fast, server):
            sent = 0
            while sent < limit + 500:
                for _ in range(100):
                    client.sendto(query_bytes(f"miss{sent}.test"), server.getsockname())
                    sent += 1
                time.sleep(0.005)  # the kernel's buffer is not what sheds them
            started = time.monotonic()
            client.sendto(hit, server.getsockname())
            assert client.recv(4096)[:2] == hit[:2]
            assert time.monotonic() - started < 0.2  # the thread looks every 10 ms
            rest = handed_on(fast, limit + 500, timeout=0.5)
    assert len(rest) == limit
    assert fast.take()[4] == sent - limit


def test_random_and_mutated_datagrams_never_stop_it() -> None:
    """The fuzz of tests/dnsproxy/test_fuzz.py at the compiled path, through a real socket:
    every datagram is read, none crashes it, and a hit is still answered after them."""
    rng = random.Random(22)
    cached = cached_reply("www.example.test", addresses=3)
    hit = query_bytes("www.example.test")
    query = wire.parse_query(hit)
    fast = fast_path(rate=0.0)
    fast.put(query.key + b"\x00", cached.stamped_bytes(time.monotonic()))
    seeds = [hit, query_bytes("a.test", "AAAA", None), query_bytes("b.test", edns=4096, do=True)]
    sent = handed = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("127.0.0.1", 0))
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        client.setblocking(False)
        reader = read_by(fast, server)
        reader.__enter__()
        for _round in range(40):
            for _ in range(250):
                if rng.random() < 0.3:
                    data = rng.randbytes(rng.randrange(0, 200))
                else:
                    data = bytearray(rng.choice(seeds))
                    for _ in range(rng.randrange(1, 6)):
                        data[rng.randrange(len(data))] = rng.randrange(256)
                    data = bytes(data[:rng.randrange(1, len(data) + 1)])
                client.sendto(data, server.getsockname())
                sent += 1
            time.sleep(0.01)
            handed += len(handed_on(fast, 1, timeout=0.01))
            while True:  # what it answered, read off so the client's buffer stays open
                try:
                    client.recv(65535)
                except BlockingIOError:
                    break
        client.setblocking(True)
        client.settimeout(2)
        client.sendto(hit, server.getsockname())
        assert client.recv(4096) == wire.client_reply(cached, query)
        reader.__exit__(None, None, None)
    keys, records, answered, limited, shed, faults, stale = fast.take()
    handed += len(handed_on(fast, 1, timeout=0.01))
    assert sent == 10_000
    assert faults == 0 and shed == 0
    assert answered + handed >= 9_000, "nearly every datagram read: answered or handed on"


def test_a_burst_of_misses_is_read_by_the_event_loop_which_then_gives_the_socket_back(
        upstream) -> None:
    """Misses coming faster than Python takes them: the event loop reads the socket itself
    while the burst lasts, every query is answered, and once the socket is quiet the thread
    reads it again, the socket blocking as its receive needs."""
    native()
    upstream.rule("hot.example", ttl=300)
    pytest.importorskip("uvloop")
    # uvloop: watching a socket makes it non-blocking, which the thread's receive must undo.
    proxy = ProxyThread("--upstream", upstream.address, "--native", uvloop=True)
    try:
        hit_path = proxy.service.hit_path
        assert addresses(ask(proxy.port, "hot.example")) == [GENUINE]
        # The event loop busy while the burst comes, so that it surely falls behind: sent by
        # this thread, sharing the GIL with it, the burst could otherwise trickle in, each
        # datagram taken before the next came (about one run in fifteen).
        stalled = threading.Event()
        proxy.loop.call_soon_threadsafe(lambda: (stalled.set(), time.sleep(0.3)))
        assert stalled.wait(5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            for i in range(100):  # within one client's share of queries in flight
                client.sendto(query_bytes(f"burst{i}.example", qid=i), ("127.0.0.1", proxy.port))
            ids = {DNSRecord.parse(client.recv(4096)).header.id for _ in range(100)}
        assert ids == set(range(100))
        assert hit_path.turns >= 1, "the event loop never read the socket itself"
        deadline = time.monotonic() + 2
        while hit_path.reading:
            assert time.monotonic() < deadline, "the socket was never given back"
            time.sleep(0.01)
        assert not hit_path.fast.python_reads
        for udp in hit_path.sockets.values():  # the flag itself: Python's view may differ
            assert not fcntl.fcntl(udp.sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        before = hit_path.handed_on
        assert addresses(ask(proxy.port, "hot.example")) == [GENUINE]
        assert hit_path.handed_on == before, "the thread answers the hit"
    finally:
        proxy.close()


def test_an_entry_hit_only_here_outlives_one_not_asked_again_when_the_cache_evicts(
        upstream) -> None:
    """Python's cache sees the compiled path's hits only when it takes them (every half
    second); before it evicts, it takes the keys hit since (`sync_order`), so the least
    recently used entry goes as the clients left the order, even between two takes."""
    native()
    for name in ("a.example", "b.example", "c.example"):
        upstream.rule(name, ttl=300)
    proxy = ProxyThread("--upstream", upstream.address, "--native", "--cache-size", "2")
    try:
        hit_path = proxy.service.hit_path
        proxy.loop.call_soon_threadsafe(lambda: hit_path.taker.cancel())  # no take in between
        for name in ("a.example", "b.example"):
            assert addresses(ask(proxy.port, name)) == [GENUINE]
            proxy.sync(take=False)
        before = hit_path.handed_on
        assert addresses(ask(proxy.port, "a.example")) == [GENUINE]
        assert hit_path.handed_on == before, "the thread answers a's first hit"
        assert addresses(ask(proxy.port, "c.example")) == [GENUINE]  # full: one must go
        proxy.sync(take=False)
        assert addresses(ask(proxy.port, "a.example")) == [GENUINE]
        assert addresses(ask(proxy.port, "b.example")) == [GENUINE]
        assert upstream.count("a.example") == 1, "a went, though hit after b was stored"
        assert upstream.count("b.example") == 2
    finally:
        proxy.close()
