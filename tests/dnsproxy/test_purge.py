"""A forgery shaped like a genuine reply (OPT, on time, an address on no list yet) passes every
defence and is cached. Once its address becomes known as forged, the cached entry goes: when the
address is learned, when a reload lists it, and when a cache file brings it back after a
restart; and a refresh in flight across a reload does not put it back."""

from __future__ import annotations

import json
import logging
import signal
import time

import pytest

from dnsproxy.stages import cache as cache_stage

from .fakes import FORGED_UNLISTED, GENUINE, addresses, ask, free_port
from .process import DnsproxyProcess
from .test_forgery import teach_edns
from .test_learned_forgeries import catch_opt_less_forgery, learned, slip_forgery

# The compiled UDP hit path and the Python one: the same behaviour (conftest.py).
pytestmark = pytest.mark.both_paths


def start(upstream, *extra: str) -> DnsproxyProcess:
    port = free_port()
    return DnsproxyProcess("--listen", f"127.0.0.1:{port}", "--upstream", upstream.address,
                           *extra, port=port)


def slip_into_the_cache(port: int, upstream) -> None:
    """The genuine-shaped forgery is the answer, and the next query is answered from the
    cache with it."""
    upstream.rule("slipped.example", forgeries=("too-fast",), delay=0.05)
    assert addresses(ask(port, "slipped.example")) == [FORGED_UNLISTED]
    assert addresses(ask(port, "slipped.example")) == [FORGED_UNLISTED]
    assert upstream.count("slipped.example", "udp") == 1


@pytest.mark.parametrize("stale", [pytest.param(False, id="fresh"),
                                   pytest.param(True, id="expired-served-stale")])
def test_learning_an_address_drops_the_cached_forgery_that_carried_it(upstream, make_proxy,
                                                                        stale):
    """Learned from a provable forgery for another name: the cached entry goes, and is
    neither served fresh nor stale."""
    proxy = make_proxy("--upstream", upstream.address, *(["--max-ttl", "1"] if stale else []))
    teach_edns(proxy, upstream)
    slip_forgery(proxy, upstream)
    assert addresses(ask(proxy.port, "slipped.example")) == [FORGED_UNLISTED]  # the cache
    assert upstream.count("slipped.example") == 1
    if stale:
        time.sleep(1.2)
    catch_opt_less_forgery(proxy, upstream)
    assert learned(proxy) == {FORGED_UNLISTED}
    # Asked again: the upstream's forgery is caught now, and the genuine answer comes.
    assert addresses(ask(proxy.port, "slipped.example")) == [GENUINE]
    assert upstream.count("slipped.example", "udp") == 2  # not from the cache
    assert proxy.metrics.get("dnsproxy_responses_total", reason="stale") == 0
    assert proxy.metrics.get("dnsproxy_cache_purged_total", why="learned") == 1


def test_a_forgery_carrying_forty_addresses_purges_them_in_one_pass(upstream, make_proxy,
                                                                   monkeypatch, caplog):
    """An injector's caught forgery carries 40 addresses, each of which a cached answer holds
    too: every such entry goes, in one pass over the cache (run in many slices here), and the
    entries carrying none of them stay and are answered from the cache."""
    monkeypatch.setattr(cache_stage, "SCAN_SLICE", 3)  # the pass spans many loop steps
    caplog.set_level(logging.INFO, logger="dnsproxy")
    forty = tuple(f"203.0.113.{100 + i}" for i in range(40))
    proxy = make_proxy("--upstream", upstream.address)
    teach_edns(proxy, upstream)
    for i, address in enumerate(forty):
        upstream.rule(f"carrier{i}.example", answers=[address])
        assert addresses(ask(proxy.port, f"carrier{i}.example")) == [address]
    assert addresses(ask(proxy.port, "bystander.example")) == [GENUINE]
    upstream.rule("caught.example", forgeries=("no-edns",), forged_answers=forty, delay=0.05)
    assert addresses(ask(proxy.port, "caught.example")) == [GENUINE]
    assert learned(proxy) == set(forty)
    while proxy.service.cache.scans:  # the pass's slices, queries answered between them
        proxy.sync()
    assert proxy.metrics.get("dnsproxy_forged_learned_total") == 40
    assert proxy.metrics.get("dnsproxy_cache_purged_total", why="learned") == 40
    assert addresses(ask(proxy.port, "bystander.example")) == [GENUINE]
    assert upstream.count("bystander.example") == 1  # the cache answered
    for i in range(40):
        upstream.rule(f"carrier{i}.example")  # now answered with GENUINE
        assert addresses(ask(proxy.port, f"carrier{i}.example")) == [GENUINE]
        assert upstream.count(f"carrier{i}.example", "udp") == 2
    lines = [record.getMessage() for record in caplog.records]
    assert sum(line.startswith("forged address learned: ") for line in lines) == 40
    assert [line for line in lines if "carrying forged addresses" in line] == [
        "cache: 40 entries carrying forged addresses dropped (learned)"]  # one pass


def test_a_reload_listing_an_address_drops_the_cached_forgery(upstream, tmp_path):
    """The operator adds the address to --forged-addresses-file and sends SIGHUP."""
    listed = tmp_path / "forged.txt"
    listed.write_text("# nothing yet\n")
    proc = start(upstream, "--forged-addresses-file", str(listed))
    try:
        slip_into_the_cache(proc.port, upstream)
        listed.write_text(f"{FORGED_UNLISTED}\n")
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert addresses(ask(proc.port, "slipped.example")) == [GENUINE]
        assert upstream.count("slipped.example", "udp") == 2
    finally:
        code, _ = proc.terminate()
    assert code == 0
    assert "cache: 1 entry carrying forged addresses dropped (listed)" in proc.stderr


def test_a_refresh_in_flight_across_a_reload_does_not_bring_it_back(upstream, tmp_path):
    """The expired forgery is served stale and refreshed; the refresh's reply (poisoned at its
    source, and slow) comes after the reload listed its address, judged by the configuration
    it was asked with: it must not be stored."""
    listed = tmp_path / "forged.txt"
    listed.write_text("")
    proc = start(upstream, "--forged-addresses-file", str(listed), "--max-ttl", "1")
    try:
        slip_into_the_cache(proc.port, upstream)
        time.sleep(1.2)
        upstream.rule("slipped.example", answers=[FORGED_UNLISTED], delay=1.0)
        assert addresses(ask(proc.port, "slipped.example")) == [FORGED_UNLISTED]  # stale
        listed.write_text(f"{FORGED_UNLISTED}\n")
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(1.4)  # the refresh's reply has come meanwhile
        assert upstream.count("slipped.example", "udp") == 2
        upstream.rule("slipped.example")
        assert addresses(ask(proc.port, "slipped.example")) == [GENUINE]
        assert upstream.count("slipped.example", "udp") == 3
    finally:
        assert proc.terminate()[0] == 0


@pytest.mark.parametrize("how", ["listed", "learned"])
def test_a_cache_file_does_not_bring_back_a_forgery_now_known(upstream, tmp_path, how):
    """Saved while its address was on no list; at the next start the address is listed (or
    in the learned file): the entry is not served."""
    state = tmp_path / "state"
    first = start(upstream, "--state-dir", str(state))
    try:
        slip_into_the_cache(first.port, upstream)
    finally:
        assert first.terminate()[0] == 0
    extra = ["--state-dir", str(state)]
    if how == "listed":
        extra += ["--forged-address", FORGED_UNLISTED]
    else:
        (state / "forged-learned.json").write_text(json.dumps(
            {"version": 2, "learned": [FORGED_UNLISTED], "genuine": []}))
    upstream.rule("slipped.example")  # the injector gone: only the cache could give it
    second = start(upstream, *extra)
    try:
        assert addresses(ask(second.port, "slipped.example")) == [GENUINE]
        assert upstream.count("slipped.example", "udp") == 2
    finally:
        assert second.terminate()[0] == 0
    assert "cache: 1 entry carrying forged addresses dropped (loaded)" in second.stderr
