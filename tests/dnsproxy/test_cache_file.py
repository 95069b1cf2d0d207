"""The cache kept across restarts, through the real process: saved on SIGTERM and every
--cache-save-interval, read at start with TTLs aged, a bad file ignored with one warning."""

from __future__ import annotations

import struct
import time
import zlib

import pytest
from dnslib import RR, A, DNSRecord

from dnsproxy import cachefile, wire
from dnsproxy.metrics import Metrics
from dnsproxy.stages.cache import Cache

from .fakes import FORGED_UNLISTED, GENUINE, addresses, ask, free_port
from .process import DnsproxyProcess


def start(upstream, state_dir, *extra: str) -> DnsproxyProcess:
    port = free_port()
    return DnsproxyProcess("--listen", f"127.0.0.1:{port}", "--upstream", upstream.address,
                           "--state-dir", str(state_dir), "--timeout", "1", *extra, port=port)


def saved_names(state_dir) -> list[str]:
    data = (state_dir / cachefile.FILE_NAME).read_bytes()
    return [str(DNSRecord.parse(entry.body).q.qname) for _, entry in cachefile.parse(data)]


def warnings(proc: DnsproxyProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "WARNING" in line]


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


def test_cache_survives_a_restart_with_ttls_aged(upstream, state):
    upstream.rule("kept.example", ttl=300)
    upstream.rule("brief.example", ttl=1)
    first = start(upstream, state, "--max-stale", "1")
    try:
        assert addresses(ask(first.port, "kept.example")) == [GENUINE]
        assert addresses(ask(first.port, "brief.example")) == [GENUINE]
    finally:
        assert first.terminate()[0] == 0
    assert sorted(saved_names(state)) == ["brief.example.", "kept.example."]
    upstream.rule("kept.example", silent=True)  # only the saved cache can answer now
    upstream.rule("brief.example", silent=True)
    time.sleep(2.1)  # brief.example: expired and past --max-stale
    second = start(upstream, state, "--max-stale", "1")
    try:
        reply = ask(second.port, "kept.example")
        assert addresses(reply) == [GENUINE]
        assert 290 <= reply.rr[0].ttl <= 298  # aged by the time the process was down
        assert ask(second.port, "brief.example").header.rcode == 2  # dropped, so SERVFAIL
    finally:
        second.terminate()
    assert upstream.count("kept.example") == 1
    assert warnings(second) == []


def test_cache_is_saved_periodically_not_only_on_exit(upstream, state):
    proc = start(upstream, state, "--cache-save-interval", "0.3")
    try:
        ask(proc.port, "often.example")
        deadline = time.monotonic() + 5
        while not (state / cachefile.FILE_NAME).exists():
            assert time.monotonic() < deadline, "never saved"
            time.sleep(0.05)
    finally:
        proc.kill()  # no SIGTERM: only the periodic save can have written it
    assert saved_names(state) == ["often.example."]


def test_forged_replies_are_never_stored(upstream, state):
    """Nothing learned yet, TCP too slow: the held OPT-less forgery is released to the client
    unverified; it must not reach the file, while the genuine answer before it does."""
    proc = start(upstream, state)
    try:
        upstream.rule("probe.example", forgeries=("no-edns",), delay=0.7, tcp_delay=5)
        assert addresses(ask(proc.port, "probe.example")) == [FORGED_UNLISTED]
        assert addresses(ask(proc.port, "clean.example")) == [GENUINE]
    finally:
        assert proc.terminate()[0] == 0
    assert saved_names(state) == ["clean.example."]


def valid_file() -> bytes:
    """A cache file as the forwarder writes it, holding one answer."""
    query = DNSRecord.question("saved.example")
    reply = query.reply()
    reply.add_answer(RR("saved.example", rdata=A(GENUINE), ttl=300))
    data = reply.pack()
    cache = Cache(10, Metrics())
    cache.store(wire.parse_query(query.pack()).key + b"\0",
                wire.strip_opt(data, wire.parse_reply(data)))
    return _written(cache)


def _written(cache: Cache) -> bytes:
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        path = cachefile.path_in(directory)
        cachefile.save(cache, path)
        with open(path, "rb") as handle:
            return handle.read()


def _reversioned(data: bytes) -> bytes:
    """Another version, with a checksum that matches it: only the version is wrong."""
    body = data[:8] + struct.pack(">H", 99) + data[10:-4]
    return body + struct.pack(">I", zlib.crc32(body))


DAMAGE = {
    "garbage": lambda data: b"\x00\x01 not a cache at all",
    "empty": lambda data: b"",
    "truncated": lambda data: data[:len(data) // 2],
    "flipped byte": lambda data: data[:30] + bytes([data[30] ^ 0xFF]) + data[31:],
    "foreign magic": lambda data: b"SQLite f" + data[8:],
    "other version": _reversioned,
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_bad_cache_file_is_ignored_with_one_warning(upstream, state, kind):
    state.mkdir()
    (state / cachefile.FILE_NAME).write_bytes(DAMAGE[kind](valid_file()))
    proc = start(upstream, state)
    try:
        assert addresses(ask(proc.port, "saved.example")) == [GENUINE]
    finally:
        proc.terminate()
    assert upstream.count("saved.example") == 1  # nothing was read: asked upstream
    assert len(warnings(proc)) == 1 and "cache file" in warnings(proc)[0], proc.stderr
    assert saved_names(state) == ["saved.example."]  # and the next save replaces it


def test_a_valid_file_is_read(upstream, state):
    """The counterpart of the damaged files: the same file undamaged answers at once."""
    state.mkdir()
    (state / cachefile.FILE_NAME).write_bytes(valid_file())
    proc = start(upstream, state)
    try:
        assert addresses(ask(proc.port, "saved.example")) == [GENUINE]
    finally:
        proc.terminate()
    assert upstream.count("saved.example") == 0
    assert warnings(proc) == []
