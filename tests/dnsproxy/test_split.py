"""Split DNS against two fake groups on loopback: a domestic resolver that answers domestic names
inside a test "domestic" range and blocked foreign names with a poisoned address (OPT present,
on time: no packet-level defence sees it), and a trusted resolver behind the injector."""

from __future__ import annotations

import json
import signal
import time

import pytest

from .fakes import GENUINE, FakeUpstream, addresses, ask, free_port
from .process import DnsproxyProcess, run_dnsproxy

DOMESTIC_RANGE = "198.51.100.0/24"
NEAR = "198.51.100.7"  # a domestic CDN node: inside the range
POISONED = "203.0.113.99"  # what the domestic resolver says for blocked names
TRANSPORTS = [pytest.param(False, id="udp"), pytest.param(True, id="tcp")]


@pytest.fixture
def domestic():
    server = FakeUpstream("127.0.0.4")
    server.default.answers = [NEAR]
    yield server
    server.close()


@pytest.fixture
def lists(tmp_path):
    domestic_domains = tmp_path / "accelerated-domains.conf"
    domestic_domains.write_text("# dnsmasq style, as the domestic lists ship\n"
                                "server=/shop.example/192.0.2.114\n"
                                "server=/video.example/192.0.2.114\n")
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("blocked.example\n||tube.example^\n")
    ranges = tmp_path / "domestic-ips.txt"
    ranges.write_text(f"{DOMESTIC_RANGE}\n2001:db8:1::/48\n")
    return {"domestic": domestic_domains, "foreign": foreign, "ips": ranges}


def split_options(upstream, domestic, lists, *extra: str) -> list[str]:
    return ["--upstream", upstream.address, "--domestic-upstream", domestic.address,
            "--domestic-domains", str(lists["domestic"]), "--foreign-domains",
            str(lists["foreign"]), "--domestic-ips", str(lists["ips"]), *extra]


def decisions(proxy) -> dict[tuple[str, str], float]:
    return {(dict(labels)["group"], dict(labels)["why"]): v
            for (name, labels), v in proxy.metrics.values.items()
            if name == "dnsproxy_split_decisions_total"}


def logged(proxy, name: str) -> list[tuple[str, str]]:
    return [(line.get("group"), line.get("why")) for line in proxy.log_lines()
            if line.get("name") == name + "." and "rcode" in line]


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_listed_domestic_name_is_asked_of_the_domestic_group_only(upstream, domestic, lists,
                                                                  make_proxy, tcp):
    proxy = make_proxy(*split_options(upstream, domestic, lists))
    assert addresses(ask(proxy.port, "www.shop.example", tcp=tcp)) == [NEAR]
    assert domestic.count("www.shop.example") == 1
    assert upstream.count("www.shop.example") == 0
    assert logged(proxy, "www.shop.example") == [("domestic", "listed")]
    assert decisions(proxy) == {("domestic", "listed"): 1}


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_listed_foreign_name_is_asked_of_the_trusted_group_only(upstream, domestic, lists,
                                                                make_proxy, tcp):
    domestic.rule("blocked.example", answers=[POISONED])
    upstream.rule("blocked.example", forgeries=("no-edns",), delay=0.05)  # the injector
    proxy = make_proxy(*split_options(upstream, domestic, lists))
    assert addresses(ask(proxy.port, "blocked.example", tcp=tcp)) == [GENUINE]
    assert addresses(ask(proxy.port, "www.tube.example", tcp=tcp)) == [GENUINE]
    assert domestic.count() == 0
    assert logged(proxy, "blocked.example") == [("trusted", "listed")]


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_unlisted_name_with_a_domestic_answer_in_range_is_answered_domestic(
        upstream, domestic, lists, make_proxy, tcp):
    upstream.rule("news.example", delay=0.1)  # far away, as trusted resolvers are
    proxy = make_proxy(*split_options(upstream, domestic, lists))
    assert addresses(ask(proxy.port, "news.example", tcp=tcp)) == [NEAR]
    assert domestic.count("news.example") == 1
    assert logged(proxy, "news.example") == [("domestic", "in-range")]


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_unlisted_name_with_a_poisoned_domestic_answer_is_answered_trusted(
        upstream, domestic, lists, make_proxy, tcp):
    domestic.rule("social.example", answers=[POISONED])  # OPT present, on time
    upstream.rule("social.example", forgeries=("no-edns",), delay=0.1)
    proxy = make_proxy(*split_options(upstream, domestic, lists))
    assert addresses(ask(proxy.port, "social.example", tcp=tcp)) == [GENUINE]
    assert logged(proxy, "social.example") == [("trusted", "out-of-range")]
    assert decisions(proxy) == {("trusted", "out-of-range"): 1}


def test_without_the_split_the_poisoned_domestic_answer_would_reach_the_client(
        domestic, make_proxy):
    """The fake really poisons: asked alone, the domestic resolver's answer is the client's."""
    domestic.rule("social.example", answers=[POISONED])
    proxy = make_proxy("--upstream", domestic.address)
    assert addresses(ask(proxy.port, "social.example")) == [POISONED]


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_domestic_group_dead_gives_the_trusted_answer(upstream, domestic, lists, make_proxy,
                                                      tcp):
    domestic.default.silent = True
    proxy = make_proxy(*split_options(upstream, domestic, lists, "--timeout", "1"))
    started = time.monotonic()
    assert addresses(ask(proxy.port, "news.example", tcp=tcp)) == [GENUINE]
    assert time.monotonic() - started < 0.9  # the grace after the trusted reply, no more
    assert logged(proxy, "news.example") == [("trusted", "domestic-slow")]
    # A listed domestic name too: the trusted answer rather than SERVFAIL.
    assert addresses(ask(proxy.port, "www.shop.example", tcp=tcp)) == [GENUINE]


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_trusted_group_dead_gives_the_domestic_answer(upstream, domestic, lists, make_proxy,
                                                      tcp):
    upstream.default.silent = True
    domestic.rule("faraway.example", answers=["192.0.2.55"])  # out of range, but all we have
    proxy = make_proxy(*split_options(upstream, domestic, lists, "--timeout", "1"))
    assert addresses(ask(proxy.port, "faraway.example", tcp=tcp)) == ["192.0.2.55"]
    assert logged(proxy, "faraway.example") == [("domestic", "trusted-failed")]
    # A fallback answer is not cached: the next query asks again.
    assert addresses(ask(proxy.port, "faraway.example", tcp=tcp)) == ["192.0.2.55"]
    assert domestic.count("faraway.example") == 2


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_the_verdict_is_cached_and_the_next_query_asks_one_group(upstream, domestic, lists,
                                                                 make_proxy, tcp):
    domestic.rule("social.example", answers=[POISONED])
    proxy = make_proxy(*split_options(upstream, domestic, lists, "--cache-size", "0"))
    for _ in range(2):
        assert addresses(ask(proxy.port, "news.example", tcp=tcp)) == [NEAR]
        assert addresses(ask(proxy.port, "social.example", tcp=tcp)) == [GENUINE]
    assert (domestic.count("news.example"), upstream.count("news.example")) == (2, 1)
    assert (domestic.count("social.example"), upstream.count("social.example")) == (1, 2)
    assert logged(proxy, "news.example") == [("domestic", "in-range"), ("domestic", "verdict")]
    assert logged(proxy, "social.example") == [("trusted", "out-of-range"),
                                               ("trusted", "verdict")]


def test_empty_domestic_answer_counts_only_with_the_switch(upstream, domestic, lists,
                                                          make_proxy):
    domestic.rule("intranet.example", rcode=3)
    upstream.rule("intranet.example", answers=["192.0.2.77"])
    plain = make_proxy(*split_options(upstream, domestic, lists))
    assert addresses(ask(plain.port, "intranet.example")) == ["192.0.2.77"]
    trusting = make_proxy(*split_options(upstream, domestic, lists, "--domestic-trust-empty"))
    reply = ask(trusting.port, "intranet.example")
    assert reply.header.rcode == 3 and addresses(reply) == []
    assert logged(trusting, "intranet.example") == [("domestic", "empty")]


def test_the_chosen_reply_is_what_is_cached(upstream, domestic, lists, make_proxy):
    proxy = make_proxy(*split_options(upstream, domestic, lists))
    assert addresses(ask(proxy.port, "news.example")) == [NEAR]
    assert addresses(ask(proxy.port, "news.example")) == [NEAR]
    assert [line["reason"] for line in proxy.log_lines() if "rcode" in line] == [
        "forwarded", "cached"]
    assert domestic.count("news.example") == 1


def test_a_bad_list_line_is_one_line_and_exit_2(upstream, domestic, tmp_path):
    bad = tmp_path / "domestic.txt"
    bad.write_text("good.example\n\nnot a name\n")
    result = run_dnsproxy("--listen", f"127.0.0.1:{free_port()}", "--upstream", upstream.address,
                          "--domestic-upstream", domestic.address, "--domestic-domains", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"dnsproxy: error: {bad}:3: not a domain name: 'not a name'"]


def test_lists_without_domestic_upstreams_are_refused(upstream, lists):
    result = run_dnsproxy("--listen", f"127.0.0.1:{free_port()}", "--upstream", upstream.address,
                          "--domestic-domains", str(lists["domestic"]))
    assert result.returncode == 2
    assert "without domestic_upstreams" in result.stderr


def test_sighup_reloads_the_lists_and_keeps_them_on_a_bad_line(upstream, domestic, lists):
    port = free_port()
    proc = DnsproxyProcess("--listen", f"127.0.0.1:{port}", "--cache-size", "0", "--query-log",
                           *split_options(upstream, domestic, lists), port=port)
    try:
        domestic.rule("later.example", answers=[POISONED])
        upstream.rule("later.example", answers=["192.0.2.88"])
        domestic.rule("chat.example", answers=[POISONED])
        assert addresses(ask(port, "www.shop.example")) == [NEAR]
        lists["domestic"].write_text("server=/later.example/192.0.2.114\n")
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while addresses(ask(port, "later.example")) != [POISONED]:
            assert time.monotonic() < deadline, "the new list was not loaded"
            time.sleep(0.1)
        # shop.example is no longer listed: unlisted, in range, still domestic (the query log
        # below says why; whether the trusted group was asked too is a race the domestic
        # answer may win before the trusted query leaves)
        assert addresses(ask(port, "www.shop.example")) == [NEAR]
        # A bad line: the lists in use stay.
        lists["domestic"].write_text("server=/chat.example/192.0.2.114\nbad..name\n")
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(2)  # a failed reload changes nothing to wait on; its line is checked below
        assert addresses(ask(port, "later.example")) == [POISONED]  # still listed domestic
        assert addresses(ask(port, "chat.example")) == [GENUINE]  # the new line never came in
    finally:
        proc.terminate()
    assert f"{lists['domestic']}:2: not a domain name: 'bad..name'" in proc.stderr
    assert "keeping the running configuration" in proc.stderr
    shop = [(line.get("group"), line.get("why")) for line in map(json.loads, (
        ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
        if line.get("name") == "www.shop.example."]  # fmt: skip
    assert shop == [("domestic", "listed"), ("domestic", "in-range")], shop


def test_an_answer_of_a_family_no_range_covers_proves_nothing(upstream, domestic, lists,
                                                              make_proxy):
    """IPv4 ranges only (as most lists are): a domestic AAAA answer is neither in nor out of
    range, so the trusted answer is used and the verdict the A answer gave stays."""
    lists["ips"].write_text(f"{DOMESTIC_RANGE}\n")
    domestic.default.answers = [NEAR, "2001:db8:1::7"]
    upstream.default.answers = [GENUINE, "2001:db8:2::10"]
    proxy = make_proxy(*split_options(upstream, domestic, lists, "--cache-size", "0"))
    assert addresses(ask(proxy.port, "news.example", "AAAA")) == ["2001:db8:2::10"]
    assert addresses(ask(proxy.port, "news.example")) == [NEAR]
    assert addresses(ask(proxy.port, "news.example", "AAAA")) == ["2001:db8:1::7"]
    assert logged(proxy, "news.example") == [("trusted", "unranged"), ("domestic", "in-range"),
                                             ("domestic", "verdict")]
