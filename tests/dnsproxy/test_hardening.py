"""Hostile input, abuse and operations: the server keeps answering, is no open resolver or
amplifier, and tells its operator what happened."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from .fakes import GENUINE, addresses, ask, free_port, send_raw
from .process import DnsproxyProcess

# The compiled UDP hit path and the Python one: the same behaviour (conftest.py).
pytestmark = pytest.mark.both_paths


def test_any_is_answered_minimally_without_asking_upstream(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    reply = ask(proxy.port, "example.com", "ANY")
    assert [QTYPE[rr.rtype] for rr in reply.rr] == ["HINFO"]
    assert b"RFC8482" in reply.rr[0].rdata.data  # dnslib has no HINFO type: raw rdata
    assert upstream.count() == 0


def test_chaos_identity_is_local(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address, "--identity", "lan-dns")
    reply = ask(proxy.port, "id.server", "TXT", qclass="CH")
    assert str(reply.rr[0].rdata) == '"lan-dns"'
    assert upstream.count() == 0


def test_clients_outside_the_allowed_networks_are_refused(upstream, make_proxy):
    # Loopback is allowed by default; narrowing the list makes this client a stranger.
    proxy = make_proxy("--upstream", upstream.address, "--allow", "10.0.0.0/8")
    reply = ask(proxy.port, "example.com")
    assert reply.header.rcode == RCODE.REFUSED and not reply.rr
    assert upstream.count() == 0
    assert proxy.metrics.get("dnsproxy_responses_total", reason="refused") == 1


def test_strangers_get_neither_formerr_nor_a_tcp_slot(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address, "--allow", "10.0.0.0/8")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(b"\x12\x34\x01\x00" + b"\xff" * 20, ("127.0.0.1", proxy.port))
        with pytest.raises(TimeoutError):
            sock.recv(512)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as conn:
        assert conn.recv(10) == b""  # closed at once, before a query is even read
    assert proxy.metrics.total("dnsproxy_malformed_total") == 1


def test_queries_beyond_the_in_flight_cap_are_shed_not_queued(upstream, make_proxy):
    upstream.default.silent = True
    proxy = make_proxy("--upstream", upstream.address, "--max-in-flight", "5", "--timeout", "1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(20):
            sock.sendto(DNSRecord.question(f"hang{i}.example").pack(), ("127.0.0.1", proxy.port))
        time.sleep(0.3)
    assert proxy.metrics.total("dnsproxy_overload_total") == 15
    assert upstream.count() == 5
    reply = ask(proxy.port, "tcp.example", tcp=True)  # over TCP a shed query gets SERVFAIL
    assert reply.header.rcode == RCODE.SERVFAIL


def test_rate_limit_drops_over_udp_and_refuses_over_tcp(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address, "--rate-limit", "2")  # burst 4
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(30):  # all at once: faster than tokens come back
            sock.sendto(DNSRecord.question(f"n{i}.example").pack(), ("127.0.0.1", proxy.port))
        sock.settimeout(0.25)
        try:
            while True:
                sock.recv(4096)
                answered += 1
        except TimeoutError:
            pass
    assert 4 <= answered <= 5
    assert ask(proxy.port, "x.example", tcp=True).header.rcode == RCODE.REFUSED
    time.sleep(1.0)  # tokens come back
    assert addresses(ask(proxy.port, "late.example")) == [GENUINE]


def test_udp_reply_never_exceeds_the_client_buffer(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("big.example", padding=30)
    for edns, size, limit in ((False, 0, 512), (True, 700, 700), (True, 4096, 4096)):
        query = DNSRecord.question("big.example")
        if edns:
            from dnslib import EDNS0
            query.add_ar(EDNS0(udp_len=size))
        raw = send_raw(proxy.port, query.pack())
        assert len(raw) <= limit


def test_malformed_packets_get_formerr_or_nothing_and_never_stop_the_server(upstream,
                                                                           make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    good = DNSRecord.question("ok.example").pack()
    response = DNSRecord.question("ok.example").reply().pack()
    loop_name = good[:12] + b"\xc0\x0c" + good[-4:]  # a pointer to itself
    cases = [b"", b"\x00", good[:11], good[:14], good + b"\xff" * 3, response, loop_name,
             b"\xff" * 512, good[:2] + b"\x00\x00\x00\x05" + good[6:]]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        for case in cases:
            sock.sendto(case, ("127.0.0.1", proxy.port))
            try:
                reply = sock.recv(4096)
            except TimeoutError:
                continue
            parsed = DNSRecord.parse(reply)
            assert parsed.header.id == struct.unpack(">H", case[:2])[0]
    assert addresses(ask(proxy.port, "ok.example")) == [GENUINE]
    assert proxy.metrics.total("dnsproxy_malformed_total") >= 5


def _tcp_query(conn: socket.socket, name: str, qid: int) -> None:
    query = DNSRecord.question(name)
    query.header.id = qid
    data = query.pack()
    conn.sendall(struct.pack(">H", len(data)) + data)


def _tcp_read(conn: socket.socket) -> DNSRecord:
    head = b""
    while len(head) < 2:
        chunk = conn.recv(2 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    length = struct.unpack(">H", head)[0]
    data = b""
    while len(data) < length:
        data += conn.recv(length - len(data))
    return DNSRecord.parse(data)


def test_tcp_pipelined_queries_are_answered_on_one_connection(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("slow.example", delay=0.3)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
        _tcp_query(conn, "slow.example", 1)
        _tcp_query(conn, "fast.example", 2)
        first, second = _tcp_read(conn), _tcp_read(conn)
    # Answered out of order: the fast one did not wait for the slow one.
    assert (first.header.id, second.header.id) == (2, 1)
    assert addresses(first) == addresses(second) == [GENUINE]


def test_half_closed_tcp_client_gets_every_answer_in_flight(upstream, make_proxy):
    """A client pipelines three queries and shuts its sending side: the answers still being
    resolved arrive all the same, then the server closes."""
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("slow.example", delay=0.3)
    upstream.rule("slower.example", delay=0.5)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
        _tcp_query(conn, "slower.example", 1)
        _tcp_query(conn, "slow.example", 2)
        _tcp_query(conn, "fast.example", 3)
        conn.shutdown(socket.SHUT_WR)
        replies = [_tcp_read(conn) for _ in range(3)]
        assert conn.recv(10) == b""  # and then the server closes
    assert sorted(reply.header.id for reply in replies) == [1, 2, 3]
    assert all(addresses(reply) == [GENUINE] for reply in replies)


def test_idle_tcp_connections_do_not_starve_others(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address, "--tcp-max-connections", "20",
                       "--tcp-max-per-client", "100", "--tcp-idle-timeout", "30")
    idle = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(50)]
    try:
        time.sleep(0.3)
        for i in range(5):
            assert addresses(ask(proxy.port, f"busy{i}.example", tcp=True)) == [GENUINE]
        assert addresses(ask(proxy.port, "udp.example")) == [GENUINE]
        # Nobody was turned away: the longest-idle connections made room instead.
        assert proxy.metrics.total("dnsproxy_tcp_connections_rejected_total") == 0
    finally:
        for conn in idle:
            conn.close()


def test_at_its_own_cap_a_clients_longest_idle_connection_makes_room(upstream, make_proxy):
    """A client holding its whole share idle (a leak) can still ask over TCP: its own oldest
    idle connection is closed for the new one, the others stay open."""
    proxy = make_proxy("--upstream", upstream.address, "--tcp-max-per-client", "3")
    held = []
    for _ in range(3):
        held.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
        time.sleep(0.05)  # an order of idleness
    try:
        assert addresses(ask(proxy.port, "fourth.example", tcp=True)) == [GENUINE]
        assert held[0].recv(10) == b""  # closed by the server
        for conn in held[1:]:
            conn.settimeout(0.2)
            with pytest.raises(TimeoutError):
                conn.recv(10)  # still open
        assert proxy.metrics.total("dnsproxy_tcp_connections_rejected_total") == 0
    finally:
        for conn in held:
            conn.close()


def test_one_client_cannot_hold_more_than_its_share(upstream, make_proxy):
    """Busy connections are not given up: with its share all waiting on answers, a client's
    next connection is turned away."""
    upstream.rule("hang.example", silent=True)
    proxy = make_proxy("--upstream", upstream.address, "--tcp-max-per-client", "3",
                       "--timeout", "3")
    held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(3)]
    try:
        for i, conn in enumerate(held):
            _tcp_query(conn, "hang.example", i)
        time.sleep(0.2)
        with pytest.raises((ConnectionError, OSError, struct.error)):
            ask(proxy.port, "fourth.example", tcp=True, timeout=2)
        assert proxy.metrics.total("dnsproxy_tcp_connections_rejected_total") >= 1
    finally:
        for conn in held:
            conn.close()


def test_idle_tcp_connection_is_closed_after_the_timeout(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address, "--tcp-idle-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as conn:
        conn.sendall(b"\x00")  # half a length prefix, then nothing
        started = time.monotonic()
        assert conn.recv(10) == b""
        assert time.monotonic() - started < 2


def test_metrics_endpoint_counts_queries_hits_and_forgeries(upstream, make_proxy):
    port = free_port()
    proxy = make_proxy("--upstream", upstream.address, "--metrics", f"127.0.0.1:{port}")
    upstream.rule("blocked.example", forgeries=("forged-address",), delay=0.05)
    ask(proxy.port, "blocked.example")
    ask(proxy.port, "blocked.example")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines['dnsproxy_queries_total{transport="udp"}'] == "2"
    assert lines["dnsproxy_cache_hits_total"] == "1"
    key = f'dnsproxy_forgeries_total{{reason="forged-address",upstream="{upstream.address}"}}'
    assert lines[key] == "1"
    assert f'dnsproxy_upstream_latency_seconds_count{{upstream="{upstream.address}"}}' in lines


def test_sighup_reloads_upstreams_and_keeps_the_cache(upstream, second_upstream, tmp_path):
    config = tmp_path / "dnsproxy.toml"
    config.write_text(f'upstreams = ["{upstream.address}"]\n')
    second_upstream.default.answers = ["192.0.2.99"]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dnsproxy", "--listen", f"127.0.0.1:{port}",
                             "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_serving(port)
        assert addresses(ask(port, "kept.example")) == [GENUINE]
        config.write_text(f'upstreams = ["{second_upstream.address}"]\n')
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert addresses(ask(port, "kept.example")) == [GENUINE]  # from the cache
        assert addresses(ask(port, "new.example")) == ["192.0.2.99"]  # from the new upstream
        config.write_text("upstreams = [\n")  # broken: the running configuration stays
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert addresses(ask(port, "newer.example")) == ["192.0.2.99"]
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
    assert proc.returncode == 0
    assert "reload failed" in err


def test_a_reload_turning_the_cache_off_stops_answering_from_it(upstream, tmp_path):
    """cache_size = 0 at a SIGHUP: what was cached is no longer answered; every query goes to
    the upstream (the compiled path's copy is emptied at a reload too)."""
    config = tmp_path / "dnsproxy.toml"
    config.write_text(f'upstreams = ["{upstream.address}"]\n')
    port = free_port()
    proc = DnsproxyProcess("--listen", f"127.0.0.1:{port}", "--config", str(config), port=port)
    try:
        for _ in range(3):
            assert addresses(ask(port, "off.example")) == [GENUINE]
        assert upstream.count("off.example") == 1
        config.write_text(f'upstreams = ["{upstream.address}"]\ncache_size = 0\n')
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        for _ in range(2):
            assert addresses(ask(port, "off.example")) == [GENUINE]
        assert upstream.count("off.example") == 3
    finally:
        assert proc.terminate()[0] == 0


def _wait_until_serving(port: int, proc: subprocess.Popen | None = None,
                        timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            said = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""
            raise AssertionError(f"the forwarder exited with {proc.returncode}: {said}")
        try:
            ask(port, "id.server", "TXT", qclass="CH", timeout=0.2)
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the forwarder did not start")


def test_sigterm_stops_within_two_seconds_even_with_queries_in_flight(upstream):
    upstream.default.silent = True
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dnsproxy", "--listen", f"127.0.0.1:{port}",
                             "--upstream", upstream.address, "--timeout", "10"],
                            stderr=subprocess.DEVNULL)
    try:
        _wait_until_serving(port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(20):
                sock.sendto(DNSRecord.question(f"hang{i}.example").pack(), ("127.0.0.1", port))
        time.sleep(0.2)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
        assert time.monotonic() - started < 2
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_client_from_a_public_address_is_refused(upstream, tmp_path):
    """A real client in its own namespace, with a public-range address (198.18.0.0/15, the
    benchmarking range: not private), is refused; one with a private address is served."""
    suffix = str(os.getpid() % 10000)
    ns, host_if, ns_if = f"dpacl{suffix}", f"dpa{suffix}", f"dpb{suffix}"
    port = free_port()

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", "198.18.53.1/24", "dev", host_if)
        sh("ip", "addr", "add", "10.253.0.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", "198.18.53.2/24", "dev", ns_if)
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", "10.253.0.2/24", "dev", ns_if)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        proc = subprocess.Popen([sys.executable, "-m", "dnsproxy", "--listen",
                                 f"0.0.0.0:{port}", "--upstream", upstream.address],
                                stderr=subprocess.PIPE)
        try:
            _wait_until_serving(port, proc)

            def dig(source: str, server: str) -> str:
                return subprocess.run(
                    ["ip", "netns", "exec", ns, "dig", "+tries=1", "+time=2", "-b", source,
                     f"@{server}", "-p", str(port), "ok.example"],
                    capture_output=True, text=True, timeout=10).stdout

            public = dig("198.18.53.2", "198.18.53.1")
            assert "status: REFUSED" in public and GENUINE not in public
            private = dig("10.253.0.2", "10.253.0.1")
            assert "status: NOERROR" in private and GENUINE in private
        finally:
            proc.terminate()
            proc.wait(timeout=5)
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_metrics_are_closed_to_clients_outside_the_allowed_networks(upstream, make_proxy):
    port = free_port()
    make_proxy("--upstream", upstream.address, "--metrics", f"127.0.0.1:{port}",
               "--allow", "10.0.0.0/8")
    with pytest.raises(OSError):  # closed without a response
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def _udp_flood(port: int, source: str, names: list[str], wait: float = 0.3) -> int:
    """Send every name from `source` at once; how many replies came back."""
    replies = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for name in names:
            sock.sendto(DNSRecord.question(name).pack(), ("127.0.0.1", port))
        sock.settimeout(wait)
        try:
            while True:
                sock.recv(4096)
                replies += 1
        except TimeoutError:
            pass
    return replies


def test_one_client_cannot_take_the_whole_in_flight_budget(upstream, make_proxy):
    """A greedy client asking slow names the upstream never answers holds at most its share
    (a quarter of 40 here); another client's miss is still answered."""
    upstream.default.silent = True
    upstream.rule("other.example")  # answered
    proxy = make_proxy("--upstream", upstream.address, "--max-in-flight", "40",
                       "--timeout", "3")
    greedy = [f"slow{i}.example" for i in range(60)]
    assert _udp_flood(proxy.port, "127.0.0.5", greedy, wait=0.3) == 0
    assert addresses(ask(proxy.port, "other.example", timeout=2)) == [GENUINE]
    assert sum(1 for seen in upstream.seen if seen.name.startswith("slow")) == 10
    assert proxy.metrics.get("dnsproxy_overload_total", limit="client") == 50


def test_refused_to_strangers_is_rate_limited_per_network(upstream, make_proxy):
    """REFUSED is as large as the query: a flood from a forged stranger source gets a burst
    of them, then silence, so the appliance reflects nothing worth aiming."""
    proxy = make_proxy("--upstream", upstream.address, "--allow", "10.0.0.0/8")
    names = [f"r{i}.example" for i in range(100)]
    assert 20 <= _udp_flood(proxy.port, "127.0.0.1", names) <= 25  # the burst, then silence
    assert _udp_flood(proxy.port, "127.0.0.9", names[:30]) <= 6  # same /24: its budget is spent
    assert _udp_flood(proxy.port, "127.0.1.1", names[:5]) == 5  # another network is told
    assert upstream.count() == 0
    assert proxy.metrics.get("dnsproxy_responses_total", reason="ratelimited") >= 75


def test_tcp_pipelining_is_capped_per_connection_with_backpressure(upstream, make_proxy):
    """Beyond 16 queries in flight on one connection the server stops reading it (no
    disconnect); each answer that goes out lets one more in."""
    upstream.default.silent = True
    proxy = make_proxy("--upstream", upstream.address, "--timeout", "1")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as conn:
        for qid in range(1, 21):
            _tcp_query(conn, f"p{qid}.example", qid)
        time.sleep(0.4)
        assert upstream.count() == 16  # the other four wait unread in the socket
        answers = [_tcp_read(conn) for _ in range(20)]  # all 20, on the same connection
    assert sorted(a.header.id for a in answers) == list(range(1, 21))
    assert {a.header.rcode for a in answers} == {RCODE.SERVFAIL}
    assert upstream.count() == 20


def test_metrics_listener_caps_its_connections(upstream, make_proxy):
    port = free_port()
    proxy = make_proxy("--upstream", upstream.address, "--metrics", f"127.0.0.1:{port}")
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        time.sleep(0.3)
        closed = 0
        for conn in held:
            conn.settimeout(0.05)
            with contextlib.suppress(TimeoutError):  # one the listener keeps: no answer yet
                closed += conn.recv(10) == b""
        assert closed == 40 - 16
        assert proxy.metrics.get("dnsproxy_metrics_connections_rejected_total") == 24
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.2)  # once they are gone, a scrape gets its answer again
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    assert b"dnsproxy_metrics_connections_rejected_total 24" in text


def test_metrics_listener_closes_idle_connections():
    from dnsproxy.metrics import Metrics, serve_metrics

    async def main() -> float:
        server = await serve_metrics(Metrics(), "127.0.0.1", 0, timeout=0.3)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # the headers never end
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        server.close()
        return time.monotonic() - started

    assert asyncio.run(main()) < 3


@pytest.mark.parametrize(("address", "network"), [
    ("198.51.100.7", "198.51.100"), ("::ffff:198.51.100.7", "::ffff:198.51.100"),
    ("2001:db8:1:2::5", "2001:db8:1::/56"), ("2001:db8:1:2ff::9", "2001:db8:1:200::/56"),
])
def test_refused_budget_is_kept_per_network(address, network):
    from dnsproxy.stages.access import network_of
    assert network_of(address) == network
