"""Saving the state and reloading the configuration never hold the event loop: the files are
written, read and parsed in threads while queries go on being answered.

Each slow step is held on purpose, deterministically: a save by a hook around the cache file's
atomic writer (the forwarder in-process, its sockets real), a reload by a named pipe in place of
a list file (the real process, the real SIGHUP), whose read blocks until the test feeds it.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import threading
import time

import pytest

from dnsproxy import cachefile, routingfile

from .fakes import GENUINE, FakeUpstream, ProxyThread, addresses, ask, free_port
from .process import DnsproxyProcess

# What the domestic resolver answers for every name: outside the domestic range, so it is used
# only for a name listed domestic; any other name gets the trusted group's GENUINE.
POISONED = "203.0.113.99"
HOLD_SECONDS = 10  # how long a held step waits for the test at most (a failing test ends)


class HeldWrites:
    """The cache file's atomic writer, made to wait for the test at its first call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.real = cachefile.write_atomically
        monkeypatch.setattr(cachefile, "write_atomically", self.write)

    def write(self, path: str, data: bytes) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.released.wait(HOLD_SECONDS)
        self.real(path, data)


def saved_names(path) -> list[str]:
    from dnslib import DNSRecord

    entries = cachefile.parse(path.read_bytes())  # raises on a file not whole
    return sorted(str(DNSRecord.parse(entry.body).q.qname) for _, entry in entries)


@pytest.fixture
def held(monkeypatch):
    writes = HeldWrites(monkeypatch)
    yield writes
    writes.released.set()  # whatever failed, the forwarder's thread may go on


def test_queries_are_answered_while_the_cache_is_being_written(upstream, tmp_path, held):
    state = tmp_path / "state"
    proxy = ProxyThread("--upstream", upstream.address, "--state-dir", str(state),
                        "--cache-save-interval", "0.2")
    try:
        assert addresses(ask(proxy.port, "first.example")) == [GENUINE]
        assert held.entered.wait(HOLD_SECONDS), "no save began"
        # The save is under way and held: the loop answers from the cache and forwards.
        assert addresses(ask(proxy.port, "first.example", timeout=2)) == [GENUINE]
        assert addresses(ask(proxy.port, "second.example", timeout=2)) == [GENUINE]
        assert not (state / cachefile.FILE_NAME).exists()
        held.released.set()
    finally:
        held.released.set()
        proxy.close()
    assert saved_names(state / cachefile.FILE_NAME) == ["first.example.", "second.example."]


def test_a_stop_during_a_save_leaves_the_newest_file_whole(upstream, tmp_path, held):
    """The final save waits for the one in flight and is written after it: the file on disk is
    whole, holds what was cached during the held save, and no temporary file is left."""
    state = tmp_path / "state"
    proxy = ProxyThread("--upstream", upstream.address, "--state-dir", str(state),
                        "--cache-save-interval", "0.2")
    try:
        assert addresses(ask(proxy.port, "before.example")) == [GENUINE]
        assert held.entered.wait(HOLD_SECONDS), "no save began"
        assert addresses(ask(proxy.port, "during.example", timeout=2)) == [GENUINE]
        proxy.loop.call_soon_threadsafe(proxy.service.stopping.set)  # what SIGTERM does
        deadline = time.monotonic() + HOLD_SECONDS
        while not proxy.service.saver.done():  # stop() cancelled it, then took the last save
            assert time.monotonic() < deadline, "the stop did not begin"
            time.sleep(0.01)
        held.released.set()
        proxy.thread.join(HOLD_SECONDS)
        assert not proxy.thread.is_alive()
    finally:
        held.released.set()
        proxy.close()
    assert saved_names(state / cachefile.FILE_NAME) == ["before.example.", "during.example."]
    assert sorted(os.listdir(state)) == sorted([cachefile.FILE_NAME, "forged-learned.json",
                                                routingfile.FILE_NAME])


# --- reloads: a named pipe in place of the domestic list ---


@pytest.fixture
def domestic():
    server = FakeUpstream("127.0.0.4")
    server.default.answers = [POISONED]
    yield server
    server.close()


@pytest.fixture
def split(tmp_path, upstream, domestic):
    """A forwarder with split DNS: `shop.example` listed domestic, the rest unlisted; no cache,
    so every answer says which group the name went to."""
    files = {"domestic": tmp_path / "domestic.conf", "foreign": tmp_path / "foreign.txt",
             "ips": tmp_path / "ips.txt"}
    files["domestic"].write_text("server=/shop.example/192.0.2.114\n")
    files["foreign"].write_text("blocked.example\n")
    files["ips"].write_text("198.51.100.0/24\n")
    port = free_port()
    proc = DnsproxyProcess("--listen", f"127.0.0.1:{port}", "--upstream", upstream.address,
                           "--domestic-upstream", domestic.address,
                           "--domestic-domains", str(files["domestic"]),
                           "--foreign-domains", str(files["foreign"]),
                           "--domestic-ips", str(files["ips"]), "--cache-size", "0",
                           port=port)
    proc.files = files
    yield proc
    proc.kill()


def pipe_in_place_of(path, tag: str = "pipe") -> str:
    """The list file becomes a new named pipe, with a second name that stays when the first is
    replaced again: a reload that opened this pipe reads it whatever the path holds later."""
    path.unlink()
    os.mkfifo(path)
    alias = f"{path}.{tag}"
    os.link(path, alias)
    return alias


def reader_waiting(pipe: str) -> int:
    """Once a reload has opened the pipe for reading: the writing end (opening it without a
    reader fails with ENXIO)."""
    deadline = time.monotonic() + HOLD_SECONDS
    while True:
        try:
            return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def feed(fd: int, text: str) -> None:
    os.set_blocking(fd, True)
    os.write(fd, text.encode())
    os.close(fd)


def wait_listed(port: int, suffix: str) -> None:
    """Until names under `suffix` are listed domestic (a new name each time: no verdict on it
    is remembered), as a reload that read the list makes them."""
    deadline = time.monotonic() + HOLD_SECONDS
    for attempt in itertools.count():
        if addresses(ask(port, f"n{attempt}.{suffix}")) == [POISONED]:
            return
        assert time.monotonic() < deadline, f"{suffix} never became listed"
        time.sleep(0.05)


def test_queries_are_answered_while_a_reload_reads_the_lists(split):
    port = split.port
    assert addresses(ask(port, "www.shop.example")) == [POISONED]  # listed domestic
    pipe = pipe_in_place_of(split.files["domestic"])
    split.proc.send_signal(signal.SIGHUP)
    writer = reader_waiting(pipe)  # the reload is reading the list, and waits for the rest
    try:
        # The running lists answer meanwhile.
        assert addresses(ask(port, "www.shop.example", timeout=2)) == [POISONED]
        assert addresses(ask(port, "unlisted.example", timeout=2)) == [GENUINE]
    finally:
        feed(writer, "server=/later.example/192.0.2.114\n")
    wait_listed(port, "later.example")
    assert addresses(ask(port, "www.shop.example")) == [GENUINE]  # no longer listed
    code, _ = split.terminate()
    assert code == 0
    assert split.stderr.count("configuration reloaded") == 1


def test_sighups_during_a_reload_make_one_more_reload(split):
    port = split.port
    pipe = pipe_in_place_of(split.files["domestic"], "first")
    split.proc.send_signal(signal.SIGHUP)
    first = reader_waiting(pipe)
    try:
        for _ in range(2):  # each handled while the first reload waits: answered after it
            split.proc.send_signal(signal.SIGHUP)
            assert addresses(ask(port, "unlisted.example", timeout=2)) == [GENUINE]
        # What the next reload opens: a pipe of its own, so only it can be its reader.
        pipe = pipe_in_place_of(split.files["domestic"], "second")
    finally:
        feed(first, "server=/first.example/192.0.2.114\n")
    second = reader_waiting(pipe)  # one more reload, reading the list afresh
    # From now on the list is a plain file: a third reload would not wait, and would log.
    split.files["domestic"].unlink()
    split.files["domestic"].write_text("server=/second.example/192.0.2.114\n")
    feed(second, "server=/second.example/192.0.2.114\n")
    wait_listed(port, "second.example")
    assert addresses(ask(port, "www.first.example")) == [GENUINE]  # the first list is gone
    code, _ = split.terminate()
    assert code == 0
    assert split.stderr.count("configuration reloaded") == 2


# --- restarts: what arrives while the forwarder stops or starts ---


def test_a_stop_answers_until_its_last_save_is_written(upstream, tmp_path, held):
    """SIGTERM: the final save is written while the sockets still answer (from the cache); they
    close only once it is on disk."""
    state = tmp_path / "state"
    proxy = ProxyThread("--upstream", upstream.address, "--state-dir", str(state))
    try:
        assert addresses(ask(proxy.port, "kept.example")) == [GENUINE]
        proxy.loop.call_soon_threadsafe(proxy.service.stopping.set)  # what SIGTERM does
        assert held.entered.wait(HOLD_SECONDS), "the final save did not begin"
        assert addresses(ask(proxy.port, "kept.example", timeout=2)) == [GENUINE]
        held.released.set()
        proxy.thread.join(HOLD_SECONDS)
        assert not proxy.thread.is_alive()
        with pytest.raises(OSError):  # refused, or no answer: the socket is closed now
            ask(proxy.port, "kept.example", timeout=0.5)
    finally:
        held.released.set()
        proxy.close()
    assert saved_names(state / cachefile.FILE_NAME) == ["kept.example."]


def test_a_starting_forwarder_keeps_the_queries_that_come_early(upstream, tmp_path):
    """The sockets are bound before the configuration's files are read (a hosts file that is a
    named pipe holds the start here): a query sent meanwhile waits in the kernel and is
    answered once the forwarder serves, rather than refused."""
    import socket
    import subprocess
    import sys

    from dnslib import DNSRecord

    from .process import ROOT, clean_env

    hosts = tmp_path / "hosts"
    os.mkfifo(hosts)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dnsproxy", "--listen", f"127.0.0.1:{port}",
                             "--upstream", upstream.address, "--hosts", str(hosts)],
                            cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    writer = None
    try:
        writer = reader_waiting(str(hosts))  # the start is held, reading the hosts file
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(HOLD_SECONDS)
            query = DNSRecord.question("early.lan", "A")
            client.sendto(query.pack(), ("127.0.0.1", port))
            time.sleep(0.2)  # the query is in; without a bound socket it would be refused now
            feed(writer, "192.0.2.7 early.lan\n")
            writer = None
            reply = DNSRecord.parse(client.recv(4096))
        assert reply.header.id == query.header.id
        assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.7"]
    finally:
        if writer is not None:
            feed(writer, "")
        proc.terminate()
        proc.communicate(timeout=HOLD_SECONDS)
