"""What the forwarder learns of an upstream's EDNS (whether it echoes our OPT record) comes from
genuine replies only, and stays learned: not lost to a reload, not undone by timeouts, and an
OPT-less reply it could not verify is never cached."""

from __future__ import annotations

import signal
import time

from .fakes import FORGED_UNLISTED, GENUINE, addresses, ask, free_port
from .process import DnsproxyProcess


def probe_hold(port: int) -> list[str]:
    """An injector's OPT-less forgery, the genuine UDP reply 0.7 s later (after the 0.5 s hold)
    and TCP too slow to settle it: what the client gets shows whether the forwarder knew the
    upstream echoes OPT (then it discards the forgery and waits) or not (it releases it)."""
    return addresses(ask(port, "probe.example"))


def rule_probe(upstream) -> None:
    upstream.rule("probe.example", forgeries=("no-edns",), delay=0.7, tcp_delay=5)


def test_released_opt_less_reply_is_not_cached(upstream, make_proxy):
    """Nothing learned yet, TCP too slow: the held OPT-less forgery is released to the waiting
    client, as designed, but it must not be cached for the next one."""
    proxy = make_proxy("--upstream", upstream.address, "--timeout", "1.2")
    rule_probe(upstream)
    assert probe_hold(proxy.port) == [FORGED_UNLISTED]
    upstream.rule("probe.example")  # no injector now: a genuine answer at once
    assert probe_hold(proxy.port) == [GENUINE]
    assert upstream.count("probe.example", "udp") == 2  # asked again, not served from cache


def test_opt_less_reply_released_at_the_deadline_is_not_cached(upstream, make_proxy):
    """The same, when the deadline comes before the hold ends: the held forgery is what the
    client gets at the deadline, and still not what the next client gets."""
    proxy = make_proxy("--upstream", upstream.address, "--timeout", "0.2")  # the hold is 0.5 s
    upstream.rule("probe.example", forgeries=("no-edns",), delay=5, tcp_delay=5)
    started = time.monotonic()
    assert probe_hold(proxy.port) == [FORGED_UNLISTED]
    assert time.monotonic() - started < 0.45  # released by the deadline, not by the hold
    upstream.rule("probe.example")
    assert probe_hold(proxy.port) == [GENUINE]
    assert upstream.count("probe.example", "udp") == 2


def test_timeouts_do_not_unlearn_edns(upstream, make_proxy):
    """An injector forges OPT-less replies and drops the genuine ones (over TCP too) for a
    while: the queries fail, but the forwarder must not forget that the upstream echoes OPT,
    or the next forgery would be held and released."""
    proxy = make_proxy("--upstream", upstream.address, "--timeout", "1.2", "--cache-size", "0")
    assert addresses(ask(proxy.port, "clean.example")) == [GENUINE]
    for i in range(6):
        upstream.rule(f"dropped{i}.example", forgeries=("no-edns",), delay=5, tcp_delay=5)
        assert ask(proxy.port, f"dropped{i}.example").header.rcode == 2  # SERVFAIL
    assert proxy.service.forwarding.forwarder.upstreams[0].edns.speaks_edns is True
    rule_probe(upstream)
    assert probe_hold(proxy.port) == [GENUINE]


def test_genuine_opt_less_replies_over_tcp_do_relearn(upstream, make_proxy):
    """The other way round: an upstream replaced by one that drops OPT is relearned from its
    genuine (TCP) replies, so the marker does not discard every UDP reply forever."""
    proxy = make_proxy("--upstream", upstream.address, "--cache-size", "0",
                       "--no-tcp-for-polluted")
    assert addresses(ask(proxy.port, "clean.example")) == [GENUINE]
    upstream.default.edns = False
    for i in range(3):
        assert addresses(ask(proxy.port, f"plain{i}.example")) == [GENUINE]
    assert proxy.service.forwarding.forwarder.upstreams[0].edns.speaks_edns is False
    assert addresses(ask(proxy.port, "after.example")) == [GENUINE]
    assert upstream.count("after.example", "tcp") == 0  # UDP accepted again


def test_sighup_keeps_what_was_learned(upstream, tmp_path):
    """The real process: learn that the upstream echoes OPT, reload, and the forgery is still
    discarded rather than held and released."""
    config = tmp_path / "dnsproxy.toml"
    config.write_text(f'upstreams = ["{upstream.address}"]\ntimeout = 1.2\n')
    port = free_port()
    proc = DnsproxyProcess("--listen", f"127.0.0.1:{port}", "--config", str(config), port=port)
    try:
        assert addresses(ask(port, "clean.example")) == [GENUINE]
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        rule_probe(upstream)
        assert probe_hold(port) == [GENUINE]
    finally:
        code, _ = proc.terminate()
    assert code == 0
    assert "configuration reloaded" in proc.stderr


def test_released_opt_less_reply_is_never_served_stale(upstream, make_proxy):
    """The released, unverified reply is not in the cache, so when the upstream falls silent
    there is nothing stale to serve: the client gets SERVFAIL, not the forgery again."""
    proxy = make_proxy("--upstream", upstream.address, "--timeout", "1.2")
    rule_probe(upstream)
    assert probe_hold(proxy.port) == [FORGED_UNLISTED]
    upstream.rule("probe.example", silent=True)
    assert ask(proxy.port, "probe.example").header.rcode == 2  # SERVFAIL
    assert proxy.metrics.get("dnsproxy_responses_total", reason="stale") == 0
    assert not proxy.service.cache.entries
