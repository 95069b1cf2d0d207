"""The appliance's page (dnsproxy/web) over real sockets: a forwarder on loopback answers real
queries from a fake upstream that also plays the injector, and the page and its JSON API are
asked over HTTP. Who may see it (access list, loopback only, password, sessions, the limit on
wrong passwords) and what it shows (totals, forgeries with their addresses, upstreams, the
query log and its filters, history kept across a restart)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from dnsproxy.web import auth, server, views

from .fakes import FORGED_LISTED, FORGED_UNLISTED, ProxyThread, ask, free_port

BLOCKED = "blocked.example.test"


class Page:
    """A forwarder with its page on loopback, and an HTTP client for it."""

    def __init__(self, make_proxy, upstream, state: Path, *options: str,
                 password: bool = True) -> None:
        self.web_port = free_port()
        self.password_file = state / "web-password"
        extra = ["--web-password-file", str(self.password_file)] if password else []
        self.proxy: ProxyThread = make_proxy(
            "--upstream", upstream.address, "--web", f"127.0.0.1:{self.web_port}",
            "--state-dir", str(state), *extra, *options)
        self.base = f"http://127.0.0.1:{self.web_port}"

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def client(self, source: str = "127.0.0.1") -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=source)
        return httpx.Client(base_url=self.base, transport=transport, follow_redirects=False,
                            timeout=5)

    def logged_in(self, source: str = "127.0.0.1") -> httpx.Client:
        client = self.client(source)
        response = client.post("/login", data={"password": self.password, "next": "/"})
        assert response.status_code == 303, response.text
        return client

    def recorded(self) -> None:
        """Wait until the history has written what was asked (its thread writes in batches)."""
        self.proxy.sync()
        self.proxy.service.history.submit(lambda db: None).result(5)


def censor_forges_blocked(upstream) -> None:
    """Two forgeries for BLOCKED, then the genuine reply. The first sends the forwarder to TCP
    too; TCP answers late, so the second forgery is always judged (not taken for a late reply
    to a query already answered): the CI's browser test once lost it to a quick TCP answer."""
    upstream.rule(BLOCKED, forgeries=("no-edns", "forged-address"), tcp_delay=0.5)


@pytest.fixture
def page(make_proxy, upstream, tmp_path) -> Page:
    censor_forges_blocked(upstream)
    return Page(make_proxy, upstream, tmp_path)


def traffic(page: Page) -> None:
    """Two clients, one name the censor forges."""
    ask(page.proxy.port, "www.example.test", source="127.0.0.21")
    ask(page.proxy.port, "www.example.test", source="127.0.0.21")  # from the cache
    ask(page.proxy.port, "mail.example.test", "AAAA", source="127.0.0.22")
    ask(page.proxy.port, BLOCKED, source="127.0.0.22")
    page.recorded()


# ---- who may see it --------------------------------------------------------------------------


def test_a_password_is_generated_and_required(page: Page) -> None:
    assert page.password_file.stat().st_mode & 0o777 == 0o600
    assert len(page.password) >= 16
    with page.client() as client:
        response = client.get("/")
        assert response.status_code == 303
        assert response.headers["location"] == "/login?next=/"
        assert client.get("/api/summary").status_code == 401
        assert client.get("/login").status_code == 200
        wrong = client.post("/login", data={"password": "not-it"})
        assert wrong.status_code == 401 and "session" not in str(wrong.cookies)
        assert "Wrong password" in wrong.text
        right = client.post("/login", data={"password": page.password, "next": "/queries"})
        assert right.status_code == 303 and right.headers["location"] == "/queries"
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert client.get("/api/summary").status_code == 200
        assert client.get("/").status_code == 200


def test_a_login_goes_on_to_this_page_only(page: Page) -> None:
    with page.client() as client:
        for target in ("//evil.example/", "https://evil.example/", "\\\\evil"):
            response = client.post("/login", data={"password": page.password, "next": target})
            assert response.headers["location"] == "/"


def test_wrong_passwords_are_limited_per_client(page: Page) -> None:
    with page.client("127.0.0.31") as guesser:
        for _ in range(auth.LoginLimiter().per_client):
            assert guesser.post("/login", data={"password": "guess"}).status_code == 401
        blocked = guesser.post("/login", data={"password": page.password})
        assert blocked.status_code == 429, "the right password too, once over the limit"
        assert "try again in" in blocked.text
    with page.client("127.0.0.32") as other:  # another client is not held up
        assert other.post("/login", data={"password": page.password}).status_code == 303


def test_a_new_password_ends_old_sessions(page: Page) -> None:
    client = page.logged_in()
    old = page.password
    page.password_file.write_text("a-new-password\n")
    assert client.get("/api/summary").status_code == 401
    assert client.post("/login", data={"password": old}).status_code == 401
    assert client.post("/login", data={"password": "a-new-password"}).status_code == 303
    assert client.get("/api/summary").status_code == 200


def test_logging_out_needs_the_form_token(page: Page) -> None:
    client = page.logged_in()
    assert client.post("/logout", data={"csrf": "forged"}).status_code == 403
    assert client.get("/api/summary").status_code == 200
    html = client.get("/").text
    token = html.split('name="csrf" value="')[1].split('"')[0]
    assert client.post("/logout", data={"csrf": token}).status_code == 303
    assert client.get("/api/summary").status_code == 401


def test_a_stranger_gets_nothing(make_proxy, upstream, tmp_path) -> None:
    """Outside the access list: the connection closes with no byte of HTTP, as its queries
    get no answer."""
    page = Page(make_proxy, upstream, tmp_path, "--allow", "127.0.0.1/32")
    with socket.create_connection(("127.0.0.1", page.web_port), timeout=3,
                                  source_address=("127.0.0.41", 0)) as conn:
        conn.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            data = conn.recv(4096)
        except ConnectionResetError:
            data = b""
    assert data == b""
    with page.client() as client:  # the allowed address is served
        assert client.get("/login").status_code == 200


def test_without_a_password_file_the_page_is_the_hosts_only(make_proxy, upstream,
                                                             tmp_path) -> None:
    page = Page(make_proxy, upstream, tmp_path, password=False)
    with page.client() as client:
        assert client.get("/").status_code == 200  # loopback: no login
        assert client.get("/api/summary").status_code == 200
        assert client.get("/login").status_code == 303
    assert not page.password_file.exists()


@pytest.mark.parametrize(("peer", "status"), [("192.168.1.20", 403), ("127.0.0.1", 200),
                                               ("::1", 200), ("fd00::20", 403)])
def test_the_loopback_gate(peer: str, status: int) -> None:
    """Without a password file, a LAN client is turned away with a reason (this needs a
    non-loopback peer, which loopback sockets cannot give: the request is made in memory)."""
    from unittest import mock

    sources = mock.Mock(identity="test")
    gate = server.Page(sources, allowed=lambda address: True, password_file=None)
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (
        (peer, 5555) if key == "peername" else default)
    request = make_mocked_request("GET", "/api/summary", transport=transport)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="the page")

    response = asyncio.run(gate.gates(request, handler))
    assert response.status == status


# ---- what it shows ---------------------------------------------------------------------------


def test_the_summary_counts_outcomes_and_forgeries(page: Page) -> None:
    traffic(page)
    summary = page.logged_in().get("/api/summary").json()
    assert summary["queries"] == 4
    assert summary["outcomes"]["cached"] == 1 and summary["outcomes"]["forwarded"] == 3
    assert summary["forgeries"] == 2
    series = summary["series"]
    assert sum(sum(counts) for counts in series["counts"].values()) == 4
    assert {c["client"] for c in summary["top_clients"]} == {"127.0.0.21", "127.0.0.22"}
    assert summary["top_names"][0] == {"name": "www.example.test.", "count": 2}


def test_the_censor_panel_has_the_forged_name_and_addresses(page: Page) -> None:
    traffic(page)
    client = page.logged_in()
    forged = client.get("/api/forgeries").json()
    [entry] = forged["names"]
    assert entry["name"] == BLOCKED + "."
    assert entry["count"] == 2
    assert entry["reasons"] == ["forged-address", "no-edns"]
    assert set(entry["addresses"]) == {FORGED_LISTED, FORGED_UNLISTED}
    assert FORGED_UNLISTED in forged["learned"], "the OPT-less forgery lost to the genuine one"
    html = client.get("/").text  # JavaScript off: the numbers and tables are in the HTML
    censor = html.split('id="censor"')[1].split("</section>")[0]
    assert BLOCKED in censor and FORGED_LISTED in censor and "no EDNS record" in censor


def test_the_upstreams_panel(page: Page, upstream) -> None:
    traffic(page)
    [entry] = page.logged_in().get("/api/upstreams").json()["upstreams"]
    assert entry["name"] == upstream.address and entry["health"] == "up"
    # Three names asked upstream; the OPT-less forgery's check over TCP is a reply too when it
    # lands before the genuine UDP reply ends the exchange (a race on loopback).
    assert entry["replies"] in (3, 4)
    assert 0 < entry["p50_ms"] <= entry["p95_ms"] < 1000
    assert entry["steps"], "latency over time"


def test_the_query_log_filters_and_pages(page: Page) -> None:
    traffic(page)
    client = page.logged_in()

    def names(**args: str) -> list[str]:
        response = client.get("/api/queries", params=args)
        assert response.status_code == 200, response.text
        return [row["name"] for row in response.json()["queries"]]

    assert len(names()) == 4
    assert names(client="127.0.0.22") == [BLOCKED + ".", "mail.example.test."]
    assert names(name="MAIL") == ["mail.example.test."]
    assert names(type="AAAA") == ["mail.example.test."]
    assert names(outcome="cached") == ["www.example.test."]
    assert names(since=str(time.time() + 60)) == []
    first = client.get("/api/queries", params={"limit": "3"}).json()
    assert len(first["queries"]) == 3 and first["next_offset"] == 3
    rest = client.get("/api/queries", params={"limit": "3", "offset": "3"}).json()
    assert len(rest["queries"]) == 1 and rest["next_offset"] is None
    bad = client.get("/api/queries", params={"type": "BOGUS"})
    assert bad.status_code == 400 and "type" in bad.json()["error"]
    html = client.get("/queries", params={"client": "127.0.0.22"}).text
    assert BLOCKED in html and "www.example.test" not in html
    rows = client.get("/api/queries").json()["queries"]
    forged = {row["name"]: row["forgeries"] for row in rows}
    assert forged[BLOCKED + "."] == ["forged-address", "no-edns"], "the query they came for"
    assert forged["mail.example.test."] == [], "not a neighbour's"
    assert html.count("forgery caught") == 1
    assert client.get("/queries", params={"since": "yesterday"}).status_code == 400


def test_times_read_in_the_viewers_zone(page: Page) -> None:
    traffic(page)
    client = page.logged_in()
    assert "Times in UTC." in client.get("/queries").text
    client.cookies.set("tz", "330")
    html = client.get("/queries").text
    assert "Times in UTC+05:30." in html
    local = time.strftime("%H:%M", time.gmtime(time.time() + 330 * 60))
    assert local in html


def test_history_survives_a_restart(make_proxy, upstream, tmp_path) -> None:
    first = Page(make_proxy, upstream, tmp_path)
    ask(first.proxy.port, "kept.example.test", source="127.0.0.23")
    first.recorded()
    first.proxy.close()
    second = Page(make_proxy, upstream, tmp_path)
    rows = second.logged_in().get("/api/queries").json()["queries"]
    assert [r["name"] for r in rows] == ["kept.example.test."]


def test_headers_and_weight(page: Page) -> None:
    traffic(page)
    client = page.logged_in()
    response = client.get("/")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    weight = len(response.content) + sum(
        len(client.get(f"/static/{name}").content) for name in server.STATIC)
    assert weight < 300_000
    assert client.get("/static/../auth.py").status_code == 404


def test_malformed_http_does_not_stop_the_page(page: Page) -> None:
    for junk in (b"\x00\xff" * 50 + b"\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                 b"POST /login HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", page.web_port), timeout=3) as conn:
            conn.sendall(junk)
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                conn.recv(4096)
    with page.client() as client:
        assert client.get("/login").status_code == 200
    assert ask(page.proxy.port, "www.example.test").header.rcode == 0


# ---- pure parts ------------------------------------------------------------------------------


def test_query_filter_reads_parameters() -> None:
    wanted = views.query_filter({"client": " 192.168.1.5 ", "name": "Example", "type": "aaaa",
                                 "outcome": "failed", "since": "2026-12-05T10:00",
                                 "limit": "9999"}, offset_minutes=60)  # fmt: skip
    assert wanted.client == "192.168.1.5" and wanted.name_part == "example"
    assert wanted.qtype == 28 and set(wanted.outcomes) == {"servfail", "overload", "formerr"}
    assert wanted.since == 1796464800 - 3600  # 10:00 at UTC+01:00 is 09:00 UTC
    assert wanted.limit == 200
    for bad in ({"type": "XYZ"}, {"outcome": "nope"}, {"until": "soon"}, {"limit": "many"}):
        with pytest.raises(views.BadFilter):
            views.query_filter(bad)


def test_the_limiter_forgets_after_its_window() -> None:
    now = [0.0]
    limiter = auth.LoginLimiter(per_client=2, overall=3, window=60, clock=lambda: now[0])
    limiter.failed("a")
    limiter.failed("a")
    assert limiter.wait("a") == 60 and limiter.wait("b") == 0
    limiter.failed("b")
    assert limiter.wait("c") == 60, "every client together"
    now[0] = 61
    assert limiter.wait("a") == 0 and limiter.wait("c") == 0


def test_sessions_expire() -> None:
    now = [0.0]
    sessions = auth.Sessions(clock=lambda: now[0])
    token = sessions.open("pw")
    assert sessions.get(token, "pw") is not None
    assert sessions.get(token, "other") is None, "a new password ends it"
    token = sessions.open("pw")
    now[0] = auth.SESSION_IDLE + 1
    assert sessions.get(token, "pw") is None
    assert sessions.get("made-up", "pw") is None
