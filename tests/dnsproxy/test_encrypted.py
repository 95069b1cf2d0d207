"""Encrypted upstreams against local servers with a test CA: DNS over TLS (RFC 7858) and DNS
over HTTPS (RFC 8484). The DNS answers come from a FakeUpstream's reply builder."""

from __future__ import annotations

import http.server
import os
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
import time
import uuid

import pytest
from dnslib import RCODE

from .fakes import FORGED_LISTED, GENUINE, FakeUpstream, addresses, ask

trustme = pytest.importorskip("trustme")

SERVER_NAME = "dns.test"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(SERVER_NAME, "localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def other_ca_file(tmp_path):
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


class _Tls:
    """What both servers share: the TLS handshake per connection, done in its own thread."""

    def __init__(self, context: ssl.SSLContext, brain: FakeUpstream) -> None:
        self.context = context
        self.brain = brain
        self.handshakes = 0
        self.failed_handshakes = 0
        self.alpn: list[str | None] = []
        self.lock = threading.Lock()

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket | None:
        try:
            conn = self.context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError):
            with self.lock:
                self.failed_handshakes += 1
            return None
        with self.lock:
            self.handshakes += 1
            self.alpn.append(conn.selected_alpn_protocol())
        return conn

    def answer(self, data: bytes, client, transport: str) -> bytes:
        query, behaviour = self.brain._record(data, client, transport)
        return self.brain.genuine(query, behaviour)


class DotServer(_Tls):
    """DNS over TLS on 127.0.0.1: TCP framing inside TLS, many queries per connection."""

    def __init__(self, context: ssl.SSLContext, brain: FakeUpstream, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        super().__init__(context, brain)
        self.stall = False  # accept, then never answer the handshake (a broken middlebox)
        tls = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                if tls.stall:
                    while self.request.recv(4096):  # until the client gives up
                        pass
                    return
                conn = tls.wrap(self.request)
                if conn is not None:
                    tls.brain.serve_stream(conn, self.client_address, "tls")

        server_class = type("DotTCPServer", (socketserver.ThreadingTCPServer,),
                            {"allow_reuse_address": True, "daemon_threads": True})
        self.server = server_class((host, port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DohServer(_Tls):
    """DNS over HTTPS on 127.0.0.1 (or `host`), HTTP/1.1 with keep-alive. Its context offers
    only http/1.1 in ALPN, so httpx (which offers h2 too when the h2 package is installed) must
    fall back. `hosts` holds the Host header of every request, `sni` the name of every TLS
    handshake."""

    def __init__(self, context: ssl.SSLContext, brain: FakeUpstream,
                 host: str = "127.0.0.1") -> None:
        super().__init__(context, brain)
        self.requests: list[dict] = []
        self.hosts: list[str | None] = []
        self.sni: list[str | None] = []
        context.sni_callback = lambda _conn, name, _context: self.sni.append(name)
        tls = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                conn = tls.wrap(self.request)
                if conn is None:
                    raise ConnectionAbortedError("handshake failed")
                self.request = self.connection = conn
                super().setup()

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with tls.lock:
                    tls.requests.append({"path": self.path, "version": self.request_version,
                                         "type": self.headers.get("content-type"),
                                         "id": struct.unpack(">H", body[:2])[0]})
                    tls.hosts.append(self.headers.get("host"))
                if self.path != "/dns-query":
                    self.send_error(404)
                    return
                reply = tls.answer(body, self.client_address, "https")
                self.send_response(200)
                self.send_header("content-type", "application/dns-message")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request, client_address) -> None:
                pass  # failed handshakes are counted, not printed

        self.server = Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dot(server_context, upstream):
    server = DotServer(server_context, upstream)
    yield server
    server.close()


@pytest.fixture
def doh(ca, upstream):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(SERVER_NAME, "localhost", "127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])  # no h2: httpx must fall back to HTTP/1.1
    server = DohServer(context, upstream)
    yield server
    server.close()


def upstream_errors(proxy, name: str) -> dict[str, float]:
    """dnsproxy_upstream_errors_total for one upstream, by reason."""
    return {dict(labels)["reason"]: v for (n, labels), v in proxy.metrics.values.items()
            if n == "dnsproxy_upstream_errors_total" and ("upstream", name) in labels}


# --- DNS over TLS ---


def test_dot_answers_with_server_name(dot, upstream, make_proxy, ca_file):
    spec = f"tls://127.0.0.1:{dot.port}#{SERVER_NAME}"
    proxy = make_proxy("--upstream", spec, "--ca-file", ca_file)
    reply = ask(proxy.port, "private.example")
    assert addresses(reply) == [GENUINE]
    assert upstream.count("private.example", "tls") == 1
    assert upstream.count(transport="udp") == 0
    assert proxy.log_lines()[-1]["upstream"] == f"tls://127.0.0.1:{dot.port}"
    assert upstream_errors(proxy, f"tls://127.0.0.1:{dot.port}") == {}


def test_dot_verifies_the_ip_address_without_a_name(dot, upstream, make_proxy, ca_file):
    proxy = make_proxy("--upstream", f"tls://127.0.0.1:{dot.port}", "--ca-file", ca_file)
    assert addresses(ask(proxy.port, "byip.example")) == [GENUINE]


def test_dot_reuses_one_connection(dot, upstream, make_proxy, ca_file):
    proxy = make_proxy("--upstream", f"tls://127.0.0.1:{dot.port}#{SERVER_NAME}",
                       "--ca-file", ca_file, "--cache-size", "0")
    for i in range(6):
        assert addresses(ask(proxy.port, f"q{i}.example", tcp=bool(i % 2))) == [GENUINE]
    assert upstream.count(transport="tls") == 6
    assert dot.handshakes == 1
    assert len({s.client for s in upstream.seen}) == 1


@pytest.mark.parametrize("problem", ["wrong-name", "untrusted-ca"])
def test_dot_that_cannot_be_verified_gives_servfail(dot, upstream, make_proxy, ca_file,
                                                    other_ca_file, problem):
    name = "wrong.test" if problem == "wrong-name" else SERVER_NAME
    trust = ca_file if problem == "wrong-name" else other_ca_file
    proxy = make_proxy("--upstream", f"tls://127.0.0.1:{dot.port}#{name}",
                       "--ca-file", trust, "--timeout", "1")
    reply = ask(proxy.port, "private.example")
    assert reply.header.rcode == RCODE.SERVFAIL
    assert upstream.count() == 0  # no query ever reached the server
    assert dot.handshakes == 0
    errors = upstream_errors(proxy, f"tls://127.0.0.1:{dot.port}")
    assert sum(errors.values()) >= 1
    assert all(reason.startswith("tls") for reason in errors), errors


def test_dot_handshake_that_never_ends_is_given_up_and_retried(dot, upstream, make_proxy,
                                                               ca_file):
    """The server accepts but never completes the handshake, then the path recovers: the
    stuck attempt is given up on its own bound, and the next query connects afresh (it used
    to wait on the stuck one for a minute)."""
    dot.stall = True
    proxy = make_proxy("--upstream", f"tls://127.0.0.1:{dot.port}#{SERVER_NAME}",
                       "--ca-file", ca_file, "--timeout", "1")
    assert ask(proxy.port, "stuck.example").header.rcode == RCODE.SERVFAIL
    dot.stall = False
    assert addresses(ask(proxy.port, "recovered.example")) == [GENUINE]
    assert dot.handshakes == 1


HOLE = "198.18.99.2"  # an address whose packets vanish, until it becomes the host's own


@pytest.fixture
def black_hole():
    """A route into a veth whose other end sits in a namespace with no address: a SYN sent
    there is dropped without a word, as behind a firewall's DROP. Yields the function that
    ends the outage: HOLE becomes the host's own address, where a server can listen. Needs
    root."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    tag = uuid.uuid4().hex[:6]
    ns, near, far = f"dphole-{tag}", f"dph{tag}", f"dpi{tag}"

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("cannot make a network namespace here")
    try:
        sh("ip", "link", "add", near, "type", "veth", "peer", "name", far)
        sh("ip", "link", "set", far, "netns", ns)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", far, "up")
        sh("ip", "addr", "add", "198.18.99.1/30", "dev", near)
        sh("ip", "link", "set", near, "up")
        # no ARP to wait on (its failure would be an error, not silence)
        sh("ip", "neigh", "replace", HOLE, "lladdr", "02:00:00:00:99:02", "dev", near)
        yield lambda: sh("ip", "addr", "add", f"{HOLE}/32", "dev", near)
    finally:
        subprocess.run(["ip", "link", "del", near], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_dot_connect_that_never_completes_is_given_up_and_retried(black_hole, server_context,
                                                                   upstream, make_proxy,
                                                                   ca_file):
    """SYNs black-holed for 12 s, then the path recovers: each connect attempt is given up on
    its own bound, so the first query after the recovery connects afresh. Without the bound
    every query waited on the first attempt, whose SYN retries by then came several seconds
    apart (Linux: at 1, 2, 3, 4, 5, 7, 11, 19 s with tcp_syn_linear_timeouts, at 1, 3, 7, 15 s
    without), and the upstream stayed dead after the recovery."""
    proxy = make_proxy("--upstream", f"tls://{HOLE}:853#{SERVER_NAME}", "--ca-file", ca_file,
                       "--timeout", "1")
    started = time.monotonic()
    stuck = 0
    while time.monotonic() - started < 12:
        assert ask(proxy.port, f"stuck{stuck}.example").header.rcode == RCODE.SERVFAIL
        stuck += 1
    black_hole()  # the path recovers
    dot = DotServer(server_context, upstream, port=853, host=HOLE)
    try:
        assert addresses(ask(proxy.port, "recovered.example")) == [GENUINE]
        assert dot.handshakes == 1
        errors = upstream_errors(proxy, f"tls://{HOLE}:853")
        assert errors == {"connect-timeout": stuck}, errors
    finally:
        dot.close()


# --- what the forgery filters make of encrypted replies (forgery.py) ---


@pytest.mark.parametrize("kind", ["tls", "https"])
def test_an_encrypted_reply_with_a_listed_address_is_discarded(dot, doh, upstream,
                                                              second_upstream, make_proxy,
                                                              ca_file, kind):
    """No injector reaches an encrypted reply, but the server may be poisoned at its source
    (a domestic DoT resolver): the shipped list judges it, and the next upstream is asked."""
    name = (f"tls://127.0.0.1:{dot.port}" if kind == "tls"
            else f"https://127.0.0.1:{doh.port}/dns-query")
    spec = f"{name}#{SERVER_NAME}" if kind == "tls" else name
    upstream.rule("poisoned.example", answers=[FORGED_LISTED])
    proxy = make_proxy("--upstream", spec, "--upstream", second_upstream.address,
                       "--ca-file", ca_file, "--hedge-delay", "1.5")
    assert addresses(ask(proxy.port, "poisoned.example")) == [GENUINE]
    assert upstream.count("poisoned.example", kind) == 1
    assert second_upstream.count("poisoned.example") == 1
    assert proxy.metrics.get("dnsproxy_forgeries_total", upstream=name,
                             reason="forged-address") == 1
    assert upstream_errors(proxy, name) == {}


def test_an_encrypted_reply_is_not_judged_by_learned_addresses_and_unlearns_them(
        dot, upstream, second_upstream, make_proxy, ca_file):
    """An address learned over UDP (here one an injector got learned, real for another name)
    does not condemn a DoT reply, the one path the injector cannot touch: that answer is
    served, and it takes the address off the learned list, so the plain upstreams may answer
    with it again (a real address an injector got blacklisted heals itself)."""
    spec = f"tls://127.0.0.1:{dot.port}#{SERVER_NAME}"
    proxy = make_proxy("--upstream", second_upstream.address, "--upstream", spec,
                       "--ca-file", ca_file)
    second_upstream.rule("bait.example", answers=["192.0.2.20"], forgeries=("no-edns",),
                         forged_answer=GENUINE, delay=0.05)
    assert addresses(ask(proxy.port, "bait.example")) == ["192.0.2.20"]
    learned = proxy.service.learned.forged
    assert len(learned) == 1  # GENUINE: never carried by a TCP or TLS reply before
    # The UDP upstream's answers with GENUINE are condemned now, over UDP and TCP alike; the
    # DoT upstream (the same brain) answers with it and is believed.
    assert addresses(ask(proxy.port, "real.example")) == [GENUINE]
    assert upstream.count("real.example", "tls") == 1
    assert proxy.metrics.get("dnsproxy_forgeries_total", upstream=second_upstream.address,
                             reason="learned-address") == 2
    proxy.sync()
    assert len(learned) == 0
    assert proxy.metrics.get("dnsproxy_forged_unlearned_total") == 1
    # Unlearned and shielded: the UDP upstream's answer carrying it is taken at once.
    assert addresses(ask(proxy.port, "again.example")) == [GENUINE]
    assert upstream.count("again.example", "tls") == 0


# --- DNS over HTTPS ---


def test_doh_answers(doh, upstream, make_proxy, ca_file):
    url = f"https://{SERVER_NAME}:{doh.port}/dns-query"
    proxy = make_proxy("--upstream", url + "#127.0.0.1", "--ca-file", ca_file)
    reply = ask(proxy.port, "web.example", do=True)
    assert addresses(reply) == [GENUINE]
    assert upstream.count("web.example", "https") == 1
    assert upstream.seen[0].has_opt and upstream.seen[0].do
    assert doh.requests == [{"path": "/dns-query", "version": "HTTP/1.1",
                             "type": "application/dns-message", "id": 0}]
    assert doh.alpn == ["http/1.1"]  # httpx offered h2 too, and fell back
    assert proxy.log_lines()[-1]["upstream"] == url


def test_doh_reuses_one_connection(doh, upstream, make_proxy, ca_file):
    proxy = make_proxy("--upstream", f"https://{SERVER_NAME}:{doh.port}/dns-query#127.0.0.1",
                       "--ca-file", ca_file, "--cache-size", "0")
    for i in range(5):
        assert addresses(ask(proxy.port, f"w{i}.example")) == [GENUINE]
    assert len(doh.requests) == 5
    assert doh.handshakes == 1


def test_doh_with_untrusted_ca_gives_servfail(doh, upstream, make_proxy, other_ca_file):
    url = f"https://{SERVER_NAME}:{doh.port}/dns-query"
    proxy = make_proxy("--upstream", url + "#127.0.0.1", "--ca-file", other_ca_file,
                       "--timeout", "1")
    assert ask(proxy.port, "web.example").header.rcode == RCODE.SERVFAIL
    assert doh.requests == []
    assert sum(upstream_errors(proxy, url).values()) >= 1


def test_doh_http_error_gives_servfail(doh, upstream, make_proxy, ca_file):
    url = f"https://{SERVER_NAME}:{doh.port}/wrong-path"
    proxy = make_proxy("--upstream", url + "#127.0.0.1", "--ca-file", ca_file, "--timeout", "1")
    assert ask(proxy.port, "web.example").header.rcode == RCODE.SERVFAIL
    assert proxy.metrics.get("dnsproxy_upstream_errors_total", upstream=url,
                             reason="http-404") == 1


# --- DNS over HTTPS by host name: never through the system resolver ---

DOH_NAME = "dns.example"  # resolvable nowhere but through the forwarder's own upstreams


@pytest.fixture(params=["127.0.0.1", "::1"])
def doh_by_name(request, ca, upstream):
    """A DoH server whose certificate names only DOH_NAME: reached by address, it verifies
    only if the client sends and checks the name."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(DOH_NAME).configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])
    server = DohServer(context, upstream, host=request.param)
    server.address = request.param
    yield server
    server.close()


def test_doh_by_name_connects_to_the_bootstrap_address(doh_by_name, upstream, make_proxy,
                                                       ca_file):
    doh = doh_by_name
    url = f"https://{DOH_NAME}:{doh.port}/dns-query"
    bootstrap = f"[{doh.address}]" if ":" in doh.address else doh.address
    proxy = make_proxy("--upstream", f"{url}#{bootstrap}", "--ca-file", ca_file)
    assert addresses(ask(proxy.port, "web.example")) == [GENUINE]
    assert addresses(ask(proxy.port, "web2.example")) == [GENUINE]
    assert doh.hosts == [f"{DOH_NAME}:{doh.port}"] * 2  # Host: the name, not the address
    assert doh.sni == [DOH_NAME]  # one connection, verified for the name
    assert proxy.log_lines()[-1]["upstream"] == url


def test_doh_by_name_is_looked_up_through_the_other_upstreams(doh, upstream, second_upstream,
                                                              make_proxy, ca_file):
    """No address given: the plain upstream (with its defences) says where the DoH server's
    name is; the system resolver, which knows nothing of it, is never asked."""
    second_upstream.default.silent = True  # only the DoH server answers the client's names
    second_upstream.rule(SERVER_NAME, answers=["127.0.0.1"])
    url = f"https://{SERVER_NAME}:{doh.port}/dns-query"
    proxy = make_proxy("--upstream", url, "--upstream", second_upstream.address,
                       "--ca-file", ca_file, "--hedge-delay", "1")
    for name in ("web.example", "web2.example"):
        assert addresses(ask(proxy.port, name)) == [GENUINE]
    assert second_upstream.count(SERVER_NAME) == 1  # looked up once, then kept for its TTL
    assert second_upstream.count("web.example") == 0  # the DoH server answered at once
    assert doh.hosts == [f"{SERVER_NAME}:{doh.port}"] * 2
    assert doh.sni == [SERVER_NAME]
    assert [line["upstream"] for line in proxy.log_lines()] == [url, url]
