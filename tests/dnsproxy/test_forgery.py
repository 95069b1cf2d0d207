"""Each forgery defence against a simulated injector on loopback: the client gets the genuine
answer, the forgery is counted by upstream and reason, and logged."""

from __future__ import annotations

import pytest

from .fakes import FORGED_LISTED, FORGED_UNLISTED, GENUINE, addresses, ask


def forgeries(proxy, reason: str | None = None) -> float:
    if reason is None:
        return proxy.metrics.total("dnsproxy_forgeries_total")
    return sum(v for (n, labels), v in proxy.metrics.values.items()
               if n == "dnsproxy_forgeries_total" and ("reason", reason) in labels)


def teach_edns(proxy, upstream) -> None:
    """One clean query: the forwarder learns from real traffic that the upstream echoes OPT."""
    assert addresses(ask(proxy.port, "clean.example")) == [GENUINE]
    assert upstream.count("clean.example") == 1


def test_no_edns_forgery_is_dropped_once_upstream_is_known_to_echo_opt(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    teach_edns(proxy, upstream)
    upstream.rule("blocked.example", forgeries=("no-edns",), delay=0.05)
    reply = ask(proxy.port, "blocked.example")
    assert addresses(reply) == [GENUINE]
    assert forgeries(proxy, "no-edns") == 1
    logged = [line for line in proxy.log_lines() if line.get("event") == "forgery"]
    assert logged == [{**logged[0], "upstream": upstream.address, "name": "blocked.example.",
                       "type": "A", "reason": "no-edns"}]


def test_no_edns_forgery_before_anything_is_learned(upstream, make_proxy):
    """The very first query is polluted: the OPT-less reply is held, the genuine one wins."""
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("blocked.example", forgeries=("no-edns",), delay=0.1)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert forgeries(proxy, "no-edns") == 1


def test_held_forgery_is_counted_when_the_tcp_retry_answers_first(upstream, make_proxy):
    """Nothing learned yet; an OPT-less forgery is held, a second forgery sends the question
    over TCP, and TCP's reply (with OPT) arrives before the genuine UDP one: the held reply is
    known forged then, and counted."""
    proxy = make_proxy("--upstream", upstream.address)
    # TCP answers after both forgeries (or the second goes unread) and before the genuine UDP.
    upstream.rule("blocked.example", forgeries=("no-edns", "forged-address"), delay=0.4,
                  tcp_delay=0.1)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert upstream.count("blocked.example", "tcp") == 1
    assert forgeries(proxy, "no-edns") == 1
    assert forgeries(proxy, "forged-address") == 1


def test_slow_upstream_cannot_be_raced_before_anything_is_learned(upstream, make_proxy):
    """The upstream is slower than the hold (0.5 s), as far-away resolvers are: the held
    forgery must not be released as the answer, nor teach that the upstream lacks EDNS."""
    proxy = make_proxy("--upstream", upstream.address, "--cache-size", "0")
    for i in range(4):
        upstream.rule(f"slow{i}.example", forgeries=("no-edns",), delay=0.8)
        assert addresses(ask(proxy.port, f"slow{i}.example")) == [GENUINE]
    assert proxy.service.forwarding.forwarder.upstreams[0].edns.speaks_edns is True


def test_known_forged_address_is_dropped(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("blocked.example", forgeries=("forged-address",), delay=0.05)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert forgeries(proxy, "forged-address") == 1


def test_forged_address_from_option_and_file(upstream, make_proxy, tmp_path):
    listed = tmp_path / "forged.txt"
    listed.write_text("# ours\n203.0.113.66\n")
    proxy = make_proxy("--upstream", upstream.address, "--forged-addresses-file", str(listed))
    upstream.rule("blocked.example", forgeries=("too-fast",), delay=0.05)  # 203.0.113.66
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert forgeries(proxy, "forged-address") == 1


def test_too_fast_reply_is_dropped_with_hijack_threshold(upstream, make_proxy, tmp_path):
    config = tmp_path / "dnsproxy.toml"
    # Wide margins: the forgery well inside the threshold, however slow the fake, the genuine
    # reply well outside it.
    config.write_text(f'[[upstream]]\naddress = "{upstream.address}"\nhijack_threshold = 150\n')
    proxy = make_proxy("--config", str(config))
    upstream.rule("blocked.example", forgeries=("too-fast",), delay=0.4)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert forgeries(proxy, "too-fast") == 1


@pytest.mark.parametrize("kind", ["wrong-id", "wrong-question"])
def test_replies_not_matching_the_query_are_ignored(upstream, make_proxy, kind):
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("blocked.example", forgeries=(kind,), delay=0.05)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert forgeries(proxy, "mismatch") == 1


def test_reply_from_another_port_never_reaches_the_forwarder(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("blocked.example", forgeries=("other-port",), delay=0.05)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert FORGED_UNLISTED not in proxy.log.getvalue()


def test_all_forgeries_combined(upstream, make_proxy, tmp_path):
    """Every kind at once, before the genuine reply. The margins are wide so that a loaded
    machine cannot reorder them: the too-fast forgery is judged well inside the threshold, and
    the TCP retry (asked once a forgery is seen) answers only after the genuine UDP reply, since
    an answer by TCP first would leave later forgeries unread and uncounted."""
    config = tmp_path / "dnsproxy.toml"
    config.write_text(f'[[upstream]]\naddress = "{upstream.address}"\nhijack_threshold = 100\n')
    proxy = make_proxy("--config", str(config))
    upstream.default.delay = 0.2  # a real far-away resolver: slower than the threshold
    teach_edns(proxy, upstream)
    kinds = ("no-edns", "forged-address", "too-fast", "wrong-id", "wrong-question", "other-port")
    upstream.rule("blocked.example", forgeries=kinds, delay=0.3, tcp_delay=0.8)
    for _ in range(3):  # every query, not the first only; the cache must hold only the genuine
        assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    counts = {reason: forgeries(proxy, reason)
              for reason in ("no-edns", "forged-address", "too-fast", "mismatch")}
    assert counts == {"no-edns": 1, "forged-address": 1, "too-fast": 1, "mismatch": 2}


def test_polluted_name_is_asked_over_tcp_and_udp_silence_is_survived(upstream, make_proxy):
    """The injector forges and the genuine UDP reply is lost: TCP still brings the answer,
    and the next query for that name goes straight to TCP."""
    proxy = make_proxy("--upstream", upstream.address, "--cache-size", "0")
    teach_edns(proxy, upstream)
    # Forge, and hold the genuine UDP reply past the deadline: only TCP can answer in time.
    upstream.rule("blocked.example", forgeries=("forged-address",), delay=5)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert upstream.count("blocked.example", "tcp") == 1
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert upstream.count("blocked.example", "udp") == 1  # not asked over UDP again
    assert upstream.count("blocked.example", "tcp") == 2


def test_defences_can_be_switched_off(upstream, make_proxy):
    """With the address check off, the forgery reaches the client: the switch works, and
    the test above is not passing by accident."""
    proxy = make_proxy("--upstream", upstream.address, "--no-forged-addresses",
                       "--no-tcp-for-polluted")
    upstream.rule("blocked.example", forgeries=("forged-address",), delay=0.05)
    assert addresses(ask(proxy.port, "blocked.example")) == [FORGED_LISTED]
    assert forgeries(proxy) == 0


def test_forged_replies_are_never_cached(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("blocked.example", forgeries=("forged-address", "no-edns"), delay=0.05)
    ask(proxy.port, "blocked.example")
    cached = ask(proxy.port, "blocked.example")
    assert addresses(cached) == [GENUINE]
    assert [line["reason"] for line in proxy.log_lines() if "rcode" in line] == [
        "forwarded", "cached"]


# --- the address lists judge TCP replies too ---


def forgery_lines(proxy) -> list[tuple[str, str]]:
    return [(line["upstream"], line["reason"]) for line in proxy.log_lines()
            if line.get("event") == "forgery"]


def test_tcp_upstream_reply_with_a_listed_address_is_discarded(upstream, second_upstream,
                                                               make_proxy):
    """A resolver asked over TCP hands out the injector's address as well as over UDP when
    its own cache was poisoned: the reply is discarded, counted, and the next upstream asked
    at once (no hedge delay to wait out), and it costs the first no health."""
    upstream.rule("poisoned.example", answers=[FORGED_LISTED])
    proxy = make_proxy("--upstream", f"tcp://{upstream.address}",
                       "--upstream", second_upstream.address, "--hedge-delay", "1.5")
    assert addresses(ask(proxy.port, "poisoned.example")) == [GENUINE]
    assert second_upstream.count("poisoned.example") == 1
    assert forgery_lines(proxy) == [(f"tcp://{upstream.address}", "forged-address")]
    assert upstream_errors(proxy) == 0
    first = proxy.service.forwarding.forwarder.upstreams[0]
    assert proxy.service.forwarding.forwarder.health[id(first)].failures == 0


def test_tcp_retry_reply_with_a_listed_address_keeps_udp_listening(upstream, make_proxy):
    """An OPT-less forgery sends the question over TCP at once; TCP's reply carries a listed
    address (a resolver poisoned at its source): discarded, and the genuine UDP reply that
    follows is the answer, as when TCP fails."""
    proxy = make_proxy("--upstream", upstream.address)
    teach_edns(proxy, upstream)
    upstream.rule("blocked.example", forgeries=("no-edns",), delay=0.3,
                  stream_answers=[FORGED_LISTED])
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert upstream.count("blocked.example", "tcp") == 1
    assert forgery_lines(proxy) == [(upstream.address, "no-edns"),
                                    (upstream.address, "forged-address")]


def test_tcp_first_reply_with_a_listed_address_falls_back_to_udp(upstream, make_proxy):
    """A polluted name is asked over TCP first; a condemned TCP reply is TCP failing: UDP,
    with every defence, still brings the genuine answer."""
    proxy = make_proxy("--upstream", upstream.address, "--cache-size", "0")
    teach_edns(proxy, upstream)
    upstream.rule("blocked.example", forgeries=("no-edns",), delay=0.3, tcp_delay=0.6)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]  # now polluted
    upstream.rule("blocked.example", stream_answers=[FORGED_LISTED])
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert upstream.count("blocked.example", "tcp") == 2
    assert upstream.count("blocked.example", "udp") == 2
    assert forgeries(proxy, "forged-address") == 1


def test_the_operator_list_judges_tcp_replies(upstream, second_upstream, make_proxy, tmp_path):
    listed = tmp_path / "forged.txt"
    listed.write_text(f"{FORGED_UNLISTED}\n")
    upstream.rule("poisoned.example", answers=[FORGED_UNLISTED])
    proxy = make_proxy("--upstream", f"tcp://{upstream.address}",
                       "--upstream", second_upstream.address, "--forged-addresses-file",
                       str(listed))
    assert addresses(ask(proxy.port, "poisoned.example")) == [GENUINE]
    assert forgeries(proxy, "forged-address") == 1


def upstream_errors(proxy) -> float:
    return proxy.metrics.total("dnsproxy_upstream_errors_total")
