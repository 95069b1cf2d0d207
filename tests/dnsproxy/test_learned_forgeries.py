"""Learned forged addresses: an injector's address, caught once, is known from then on, even in
a forgery shaped like a genuine reply (OPT, on time) that no packet-level check catches; what
shields an address from being learned (forgery.py says why)."""

from __future__ import annotations

import ipaddress
import json
import logging

import pytest

from dnsproxy.forgery import LearnedAddresses, write_learned

from .fakes import FORGED_UNLISTED, GENUINE, FakeUpstream, ProxyThread, addresses, ask
from .test_forgery import forgeries, teach_edns

OTHER_GENUINE = "192.0.2.20"


def learned(proxy) -> set[str]:
    proxy.sync()
    return {str(ipaddress.ip_address(a)) for a in proxy.service.learned.forged.addresses}


def catch_opt_less_forgery(proxy, upstream, name: str = "caught.example") -> None:
    """An OPT-less forgery carrying FORGED_UNLISTED loses to the genuine reply."""
    caught = forgeries(proxy, "no-edns")
    upstream.rule(name, forgeries=("no-edns",), delay=0.05)
    assert addresses(ask(proxy.port, name)) == [GENUINE]
    assert forgeries(proxy, "no-edns") == caught + 1


def genuine_shaped_forgery(upstream, name: str = "later.example") -> None:
    """OPT present, on time, no hijack threshold set: only the learned list can catch it."""
    upstream.rule(name, forgeries=("too-fast",), delay=0.05)


def slip_forgery(proxy, upstream, name: str = "slipped.example") -> None:
    """A genuine-shaped forgery carrying FORGED_UNLISTED, before that address is known: it
    passes every defence (the EDNS marker is known, so this is no held reply)."""
    genuine_shaped_forgery(upstream, name)
    assert addresses(ask(proxy.port, name)) == [FORGED_UNLISTED]


@pytest.mark.parametrize("known", [pytest.param(True, id="dropped-by-marker"),
                                   pytest.param(False, id="held-then-superseded")])
@pytest.mark.parametrize("tcp", [pytest.param(False, id="udp"), pytest.param(True, id="tcp")])
def test_caught_address_drops_a_later_genuine_shaped_forgery(upstream, make_proxy, known, tcp):
    proxy = make_proxy("--upstream", upstream.address)
    if known:
        teach_edns(proxy, upstream)
    catch_opt_less_forgery(proxy, upstream)
    assert learned(proxy) == {FORGED_UNLISTED}
    assert proxy.metrics.get("dnsproxy_forged_learned_total") == 1
    genuine_shaped_forgery(upstream)
    assert addresses(ask(proxy.port, "later.example", tcp=tcp)) == [GENUINE]
    assert forgeries(proxy, "learned-address") == 1
    assert "dnsproxy_forged_learned 1" in proxy.metrics.render()


def test_without_learning_the_genuine_shaped_forgery_gets_through(upstream, make_proxy):
    """The control: the forgery above really is caught by nothing else."""
    proxy = make_proxy("--upstream", upstream.address, "--no-learn-forged-addresses")
    catch_opt_less_forgery(proxy, upstream)
    genuine_shaped_forgery(upstream)
    assert addresses(ask(proxy.port, "later.example")) == [FORGED_UNLISTED]


@pytest.mark.parametrize("seen", [pytest.param(True, id="seen-over-tcp-first"),
                                  pytest.param(False, id="control-not-seen")])
def test_an_address_a_tcp_reply_carried_is_never_learned(upstream, make_proxy, seen):
    """An injector forges OPT-less replies carrying a real address, hoping to get it
    blacklisted: once a reply no injector can forge (TCP) carried it, it is never learned."""
    proxy = make_proxy("--upstream", upstream.address)
    teach_edns(proxy, upstream)  # GENUINE over UDP: that alone shields nothing
    if seen:
        upstream.rule("big.example", truncate_udp=True)  # fetched over TCP
        assert addresses(ask(proxy.port, "big.example")) == [GENUINE]
        assert upstream.count("big.example", "tcp") == 1
    upstream.rule("bait.example", answers=[OTHER_GENUINE], forgeries=("no-edns",),
                  forged_answer=GENUINE, delay=0.05)
    assert addresses(ask(proxy.port, "bait.example")) == [OTHER_GENUINE]
    assert learned(proxy) == (set() if seen else {GENUINE})


def test_a_slipped_forgery_does_not_shield_its_address(upstream, make_proxy):
    """A forgery shaped like a genuine reply passes the filters over UDP: its address must not
    join the shielded ones, or the later provable forgery carrying it would teach nothing."""
    proxy = make_proxy("--upstream", upstream.address)
    teach_edns(proxy, upstream)
    slip_forgery(proxy, upstream)
    catch_opt_less_forgery(proxy, upstream)
    assert learned(proxy) == {FORGED_UNLISTED}
    assert proxy.metrics.get("dnsproxy_forged_learned_total") == 1


def test_a_forgery_that_beat_a_forgery_shields_only_its_own_race(upstream, make_proxy):
    """Two forgeries to one query, both carrying one address: the OPT-less one is caught, the
    genuine-shaped one wins. Nothing is learned from that race (the winner carries the address),
    but it shields nothing either: the next provable forgery carrying it teaches it."""
    proxy = make_proxy("--upstream", upstream.address)
    teach_edns(proxy, upstream)
    # TCP (asked after the first forgery) answers late: the second forgery is read first.
    upstream.rule("twice.example", forgeries=("no-edns", "too-fast"), delay=0.05, tcp_delay=0.5)
    assert addresses(ask(proxy.port, "twice.example")) == [FORGED_UNLISTED]
    assert forgeries(proxy, "no-edns") == 1
    assert learned(proxy) == set()
    catch_opt_less_forgery(proxy, upstream)  # a forgery lost to the genuine reply this time
    assert learned(proxy) == {FORGED_UNLISTED}


def test_a_tcp_reply_carrying_a_learned_address_unlearns_nothing(upstream, make_proxy):
    """A resolver poisoned at its source hands the injector's address out over TCP too: its
    TCP reply is judged by the learned list like a UDP one, discarded, and the address stays
    learned; the next upstream answers."""
    clean = FakeUpstream("127.0.0.3")
    try:
        proxy = make_proxy("--upstream", upstream.address, "--upstream", clean.address)
        teach_edns(proxy, upstream)
        catch_opt_less_forgery(proxy, upstream)
        upstream.rule("poisoned.example", answers=[FORGED_UNLISTED])  # over UDP and TCP
        assert addresses(ask(proxy.port, "poisoned.example")) == [GENUINE]  # from `clean`
        assert upstream.count("poisoned.example", "tcp") == 1
        assert clean.count("poisoned.example") == 1
        assert learned(proxy) == {FORGED_UNLISTED}
        assert forgeries(proxy, "learned-address") == 2  # the UDP reply and the TCP one
    finally:
        clean.close()


def test_the_learned_list_survives_a_restart(upstream, tmp_path, caplog):
    state = tmp_path / "state"
    first = ProxyThread("--upstream", upstream.address, "--state-dir", str(state))
    try:
        catch_opt_less_forgery(first, upstream)
    finally:
        first.close()
    saved = json.loads((state / "forged-learned.json").read_text())
    assert saved["learned"] == [FORGED_UNLISTED]
    second = ProxyThread("--upstream", upstream.address, "--state-dir", str(state))
    try:
        genuine_shaped_forgery(upstream)
        assert addresses(ask(second.port, "later.example")) == [GENUINE]
        assert forgeries(second, "learned-address") == 1
    finally:
        second.close()
    # A damaged file: one warning, learning starts afresh, the server starts all the same.
    (state / "forged-learned.json").write_text('{"version": 1, "learned": ["not an ad')
    with caplog.at_level(logging.WARNING, logger="dnsproxy"):
        third = ProxyThread("--upstream", upstream.address, "--state-dir", str(state))
    try:
        upstream.rule("again.example", forgeries=("too-fast",), delay=0.05)
        assert addresses(ask(third.port, "again.example")) == [FORGED_UNLISTED]
    finally:
        third.close()
    warnings = [r.getMessage() for r in caplog.records if "learned forged" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_a_version_1_file_keeps_its_learned_addresses_not_its_shields(tmp_path):
    """Version 1 shielded the addresses of every verified reply, slipped forgeries included:
    its learned addresses are read, its shields are not."""
    path = tmp_path / "forged-learned.json"
    path.write_text(json.dumps({"version": 1, "learned": [FORGED_UNLISTED],
                                "genuine": [GENUINE, "203.0.113.99"]}))
    learner = LearnedAddresses()
    assert learner.load(str(path)) == 1
    assert FORGED_UNLISTED in {str(ipaddress.ip_address(a)) for a in learner.addresses}
    assert not learner.genuine
    write_learned(str(path), *learner.snapshot())
    saved = json.loads(path.read_text())
    assert (saved["version"], saved["learned"], saved["genuine"]) == (2, [FORGED_UNLISTED], [])
    assert LearnedAddresses().load(str(path)) == 1
