"""An upstream that answers with an error, or whose TCP is blocked: the client still gets the
genuine answer wherever one can be had, and the EDNS marker is not weakened on the way."""

from __future__ import annotations

import pytest
from dnslib import RCODE

from .fakes import GENUINE, addresses, ask
from .test_forgery import forgeries, teach_edns

# --- a polluted name whose TCP path fails ---


@pytest.mark.parametrize("how", ["refused", "reset", "silent"])
def test_polluted_name_falls_back_to_udp_when_tcp_fails(upstream, make_proxy, how):
    """The injector forges over UDP, so the name is asked over TCP next time; TCP is blocked
    (refused), reset, or answers too late: UDP with every defence still brings the genuine
    answer."""
    proxy = make_proxy("--upstream", upstream.address, "--cache-size", "0")
    teach_edns(proxy, upstream)
    if how == "refused":
        upstream.close_tcp()
    upstream.rule("blocked.example", forgeries=("forged-address",), delay=0.1,
                  tcp_reset=how == "reset", tcp_delay=5 if how == "silent" else 0)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]  # now polluted
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert upstream.count("blocked.example", "udp") == 2
    assert forgeries(proxy, "forged-address") == 2  # the second forgery was caught too


# --- SERVFAIL and REFUSED: ask the next upstream ---


@pytest.mark.parametrize("rcode", [RCODE.SERVFAIL, RCODE.REFUSED])
def test_error_from_the_first_upstream_asks_the_next(upstream, second_upstream, make_proxy,
                                                     rcode):
    upstream.default.rcode = rcode
    upstream.default.answers = []
    proxy = make_proxy("--upstream", upstream.address, "--upstream", second_upstream.address,
                       "--hedge-delay", "1.5", "--timeout", "3")
    reply = ask(proxy.port, "error.example")
    assert reply.header.rcode == RCODE.NOERROR
    assert addresses(reply) == [GENUINE]
    assert upstream.count("error.example") == 1
    assert second_upstream.count("error.example") == 1


@pytest.mark.parametrize("rcode", [RCODE.SERVFAIL, RCODE.REFUSED])
def test_error_from_every_upstream_is_passed_on(upstream, second_upstream, make_proxy, rcode):
    for server in (upstream, second_upstream):
        server.default.rcode = rcode
        server.default.answers = []
    proxy = make_proxy("--upstream", upstream.address, "--upstream", second_upstream.address)
    assert ask(proxy.port, "error.example").header.rcode == rcode


# --- FORMERR to a query with OPT (RFC 6891 section 7) ---


def test_upstream_that_rejects_opt_is_asked_without_it_and_remembered(upstream, make_proxy):
    upstream.default.formerr_on_opt = True
    proxy = make_proxy("--upstream", upstream.address)
    reply = ask(proxy.port, "old.example")
    assert reply.header.rcode == RCODE.NOERROR
    assert addresses(reply) == [GENUINE]
    # Over UDP with OPT, checked over TCP with OPT (the marker), then again without OPT.
    assert [(s.transport, s.has_opt) for s in upstream.seen] == [
        ("udp", True), ("tcp", True), ("udp", False)]
    assert addresses(ask(proxy.port, "next.example")) == [GENUINE]
    assert [(s.transport, s.has_opt) for s in upstream.seen[3:]] == [("udp", False)]


def test_forged_formerr_does_not_talk_the_forwarder_out_of_opt(upstream, make_proxy):
    """An injector poses as a server that knows no EDNS: its OPT-less FORMERR is discarded by
    the marker like any other OPT-less forgery, and the next query still carries OPT."""
    proxy = make_proxy("--upstream", upstream.address)
    teach_edns(proxy, upstream)
    upstream.rule("blocked.example", forgeries=("formerr",), delay=0.05)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert forgeries(proxy, "no-edns") == 1
    assert addresses(ask(proxy.port, "after.example")) == [GENUINE]
    assert all(s.has_opt for s in upstream.seen)


def test_forged_formerr_before_anything_is_learned(upstream, make_proxy):
    """Nothing learned yet: the forged FORMERR is held, TCP (with OPT) settles it."""
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("blocked.example", forgeries=("formerr",), delay=0.05)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert addresses(ask(proxy.port, "after.example")) == [GENUINE]
    assert all(s.has_opt for s in upstream.seen)


@pytest.mark.parametrize("tcp", [pytest.param("refused", id="tcp-refused"),
                                 pytest.param("slow", id="tcp-slower-than-the-hold")])
def test_upstream_that_rejects_opt_answers_clients_when_tcp_cannot_confirm_in_time(
        upstream, make_proxy, tcp):
    """An old server FORMERRs every query with OPT, nothing is learned of it yet, and TCP
    (which would confirm the FORMERR out of an injector's reach) is blocked or slower than the
    usual hold. Every client still gets its answer. A held FORMERR waits for TCP (it is of no
    use to the client): when TCP confirms, no OPT is remembered and answers are cached; when
    TCP cannot, each query is asked again without OPT, unverified, and nothing is remembered."""
    upstream.default.formerr_on_opt = True
    if tcp == "refused":
        upstream.close_tcp()
    else:
        upstream.default.tcp_delay = 0.7  # the hold is 0.5 s
    proxy = make_proxy("--upstream", upstream.address)
    for i in range(3):
        reply = ask(proxy.port, f"old{i}.example")
        assert reply.header.rcode == RCODE.NOERROR
        assert addresses(reply) == [GENUINE]
    edns = proxy.service.forwarding.forwarder.upstreams[0].edns
    if tcp == "refused":  # unconfirmed: OPT every time, nothing cached
        assert edns.no_opt_until == 0
        assert [s.has_opt for s in upstream.seen] == [True, False] * 3
        assert ask(proxy.port, "old0.example").header.rcode == RCODE.NOERROR
        assert upstream.count("old0.example", "udp") == 4
    else:  # confirmed over TCP once: remembered
        assert edns.no_opt_until > 0
        assert [(s.transport, s.has_opt) for s in upstream.seen] == [
            ("udp", True), ("tcp", True), ("udp", False), ("udp", False), ("udp", False)]


def test_forged_formerr_with_tcp_blocked_does_not_talk_the_forwarder_out_of_opt(upstream,
                                                                                  make_proxy):
    """The injector forges a FORMERR and blocks TCP, before anything is learned: the genuine
    reply still wins, and OPT stays."""
    upstream.close_tcp()
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("blocked.example", forgeries=("formerr",), delay=0.05)
    assert addresses(ask(proxy.port, "blocked.example")) == [GENUINE]
    assert forgeries(proxy, "no-edns") == 1
    assert addresses(ask(proxy.port, "after.example")) == [GENUINE]
    assert all(s.has_opt for s in upstream.seen)
    assert proxy.service.forwarding.forwarder.upstreams[0].edns.no_opt_until == 0

