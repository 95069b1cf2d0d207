"""Learned forged addresses: an injector's address, caught once, is known from then on, even in
a forgery shaped like a genuine reply (OPT, on time) that no packet-level check catches."""

from __future__ import annotations

import ipaddress
import json
import logging

import pytest

from .fakes import FORGED_UNLISTED, GENUINE, ProxyThread, addresses, ask
from .test_forgery import forgeries, teach_edns

OTHER_GENUINE = "192.0.2.20"


def learned(proxy) -> set[str]:
    proxy.sync()
    return {str(ipaddress.ip_address(a)) for a in proxy.service.learned.forged.addresses}


def catch_opt_less_forgery(proxy, upstream, name: str = "caught.example") -> None:
    """An OPT-less forgery carrying FORGED_UNLISTED loses to the genuine reply."""
    upstream.rule(name, forgeries=("no-edns",), delay=0.05)
    assert addresses(ask(proxy.port, name)) == [GENUINE]
    assert forgeries(proxy, "no-edns") == 1


def genuine_shaped_forgery(upstream, name: str = "later.example") -> None:
    """OPT present, on time, no hijack threshold set: only the learned list can catch it."""
    upstream.rule(name, forgeries=("too-fast",), delay=0.05)


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


@pytest.mark.parametrize("seen_first", [pytest.param(True, id="seen-genuine-first"),
                                        pytest.param(False, id="control-not-seen")])
def test_an_address_a_genuine_reply_carried_is_never_learned(upstream, make_proxy, seen_first):
    """An injector forges OPT-less replies carrying a real address, hoping to get it
    blacklisted: once a genuine reply carried it, it is never learned."""
    proxy = make_proxy("--upstream", upstream.address)
    if seen_first:
        teach_edns(proxy, upstream)  # clean.example: GENUINE, in a genuine reply
    upstream.rule("bait.example", answers=[OTHER_GENUINE], forgeries=("no-edns",),
                  forged_answer=GENUINE, delay=0.05)
    assert addresses(ask(proxy.port, "bait.example")) == [OTHER_GENUINE]
    if not seen_first:  # the guard is what keeps it out: without a genuine sighting it is in
        assert learned(proxy) == {GENUINE}
        return
    assert learned(proxy) == set()
    assert addresses(ask(proxy.port, "clean2.example")) == [GENUINE]


def test_a_genuine_tcp_answer_unlearns_an_address(upstream, make_proxy):
    """Learned wrongly (never seen genuine before): the UDP reply carrying it is dropped, the
    TCP retry brings it in a reply no injector can forge, and it is unlearned."""
    proxy = make_proxy("--upstream", upstream.address)
    upstream.rule("bait.example", answers=[OTHER_GENUINE], forgeries=("no-edns",),
                  forged_answer=GENUINE, delay=0.05)
    ask(proxy.port, "bait.example")
    assert learned(proxy) == {GENUINE}
    assert addresses(ask(proxy.port, "clean.example")) == [GENUINE]
    assert learned(proxy) == set()


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
