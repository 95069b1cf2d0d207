"""Names at home (issue 18): the LAN's names go to the LAN's resolver only, special-use names are
answered here, hosts files answer their names, zones go to their own resolvers; and none of it
reaches the public upstream.

A fake router (--local-dns) answers fast and without OPT, as home routers do; a fake office
resolver serves a --zone; the `upstream` fixture plays the public upstream, whose record of
what it received must stay empty for every home name, over UDP and TCP alike.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import pytest
from dnslib import EDNS0, PTR, QTYPE, RCODE, RR, DNSRecord

from dnsproxy import homenames, hosts, routingfile
from dnsproxy.config import ConfigError, build_settings
from dnsproxy.domainlists import to_wire

from .fakes import (
    FORGED_LISTED,
    GENUINE,
    Behaviour,
    FakeUpstream,
    addresses,
    ask,
    free_port,
    send_raw,
)
from .process import DnsproxyProcess, clean_env, run_dnsproxy
from .test_config import cli, expect_usage_error

LAN_ADDRESS = "192.168.1.20"
OFFICE_ADDRESS = "10.8.0.44"
NEAR = "192.0.2.77"  # the domestic resolver's answer (split DNS)

HOSTS = """\
# the household's own names
192.168.1.30   Laptop.lan laptop   # IPv4 only
192.168.1.31   tv.lan
2001:db8:1::31 tv.lan
"""


@pytest.fixture
def router():
    server = FakeUpstream("127.0.0.4", default=Behaviour(answers=[LAN_ADDRESS], edns=False))
    yield server
    server.close()


@pytest.fixture
def office():
    server = FakeUpstream("127.0.0.5", default=Behaviour(answers=[OFFICE_ADDRESS]))
    yield server
    server.close()


@pytest.fixture
def hosts_file(tmp_path):
    path = tmp_path / "hosts"
    path.write_text(HOSTS)
    return path


def ptr_reply(target: str):
    """A router's PTR answer (no OPT), for `Behaviour.craft`."""
    def make(data: bytes) -> bytes:
        query = DNSRecord.parse(data)
        reply = query.reply()
        reply.add_answer(RR(query.q.qname, QTYPE.PTR, ttl=60, rdata=PTR(target)))
        return reply.pack()
    return make


def answers(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr]


def soa_owner(reply: DNSRecord) -> str | None:
    soas = [rr for rr in reply.auth if rr.rtype == QTYPE.SOA]
    assert len(soas) <= 1
    return str(soas[0].rname) if soas else None


def logged(proxy, name: str, qtype: str | None = None) -> list[tuple]:
    return [(line["reason"], line.get("group"), line.get("why")) for line in proxy.log_lines()
            if line.get("name") == name.rstrip(".") + "."
            and qtype in (None, line.get("type"))]


# (name, type, rcode, answers, who is asked, SOA owner of a negative answer, reason, group, why)
CASES = [
    ("printer.lan", "A", "NOERROR", [LAN_ADDRESS], "router", None,
     "forwarded", "local", "local-domain"),
    ("Printer.Home.Arpa", "AAAA", "NOERROR", [], "router", None,
     "forwarded", "local", "local-domain"),
    ("nas", "A", "NOERROR", [LAN_ADDRESS], "router", None,
     "forwarded", "local", "single-label"),
    ("20.1.168.192.in-addr.arpa", "PTR", "NOERROR", ["printer.lan."], "router", None,
     "forwarded", "local", "local-reverse"),
    ("20.2.168.192.in-addr.arpa", "PTR", "NXDOMAIN", [], None, "168.192.in-addr.arpa.",
     "local", None, "rfc6303"),
    ("9.0.0.10.in-addr.arpa", "PTR", "NXDOMAIN", [], None, "10.in-addr.arpa.",
     "local", None, "rfc6303"),
    ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.e.f.ip6.arpa", "PTR",
     "NXDOMAIN", [], None, "8.e.f.ip6.arpa.", "local", None, "rfc6303"),
    ("localhost", "A", "NOERROR", ["127.0.0.1"], None, None, "local", None, "localhost"),
    ("app.localhost", "AAAA", "NOERROR", ["::1"], None, None, "local", None, "localhost"),
    ("localhost", "MX", "NOERROR", [], None, "localhost.", "local", None, "localhost"),
    ("printer.invalid", "A", "NXDOMAIN", [], None, "invalid.", "local", None, "invalid"),
    ("printer.local", "A", "NXDOMAIN", [], None, "local.", "local", None, "mdns"),
    ("_dns.resolver.arpa", "SVCB", "NOERROR", [], None, "resolver.arpa.", "local", None, "ddr"),
    ("use-application-dns.net", "A", "NXDOMAIN", [], None, "use-application-dns.net.",
     "local", None, "canary"),
    ("mask.icloud.com", "A", "NXDOMAIN", [], None, "mask.icloud.com.",
     "local", None, "private-relay"),
    ("mask-h2.icloud.com", "AAAA", "NXDOMAIN", [], None, "mask-h2.icloud.com.",
     "local", None, "private-relay"),
    ("laptop.lan", "A", "NOERROR", ["192.168.1.30"], None, None, "local", None, "hosts"),
    ("LAPTOP", "A", "NOERROR", ["192.168.1.30"], None, None, "local", None, "hosts"),
    ("laptop.lan", "AAAA", "NOERROR", [], None, "laptop.lan.", "local", None, "hosts"),
    ("tv.lan", "AAAA", "NOERROR", ["2001:db8:1::31"], None, None, "local", None, "hosts"),
    ("30.1.168.192.in-addr.arpa", "PTR", "NOERROR", ["laptop.lan."], None, None,
     "local", None, "hosts"),
    ("1.3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR",
     "NOERROR", ["tv.lan."], None, None, "local", None, "hosts"),
    ("wiki.corp.example", "A", "NOERROR", [OFFICE_ADDRESS], "office", None,
     "forwarded", "corp.example.", "zone"),
]


def home_options(upstream, router, office, hosts_file, *extra: str) -> list[str]:
    return ["--upstream", upstream.address, "--local-dns", router.address,
            "--local-reverse", "192.168.1.0/24", "--zone", f"corp.example={office.address}",
            "--hosts", str(hosts_file), "--block-private-relay", *extra]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_every_kind_of_home_name_and_none_reaches_the_public_upstream(
        upstream, router, office, hosts_file, make_proxy, tcp):
    router.rule("20.1.168.192.in-addr.arpa", craft=ptr_reply("printer.lan"))
    router.rule("printer.home.arpa", answers=[])  # NODATA from the router, passed on
    proxy = make_proxy(*home_options(upstream, router, office, hosts_file))
    for name, qtype, rcode, expected, asked, soa, reason, group, why in CASES:
        reply = ask(proxy.port, name, qtype, tcp=tcp)
        assert RCODE[reply.header.rcode] == rcode, name
        assert answers(reply) == expected, name
        if soa is not None:  # a negative answer written here: the zone's SOA, for caching
            assert soa_owner(reply) == soa, name
            assert reply.auth[0].ttl == homenames.NEGATIVE_TTL or why == "hosts", name
        assert logged(proxy, name, qtype) == [(reason, group, why)], name
        for server, role in ((router, "router"), (office, "office")):
            assert server.count(name) == (1 if asked == role else 0), (name, role)
    assert upstream.seen == []  # the public upstream heard of none of them
    # Each decision is counted.
    metrics = proxy.metrics
    assert metrics.get("dnsproxy_local_answers_total", why="rfc6303") == 3
    assert metrics.get("dnsproxy_local_answers_total", why="hosts") == 6
    assert metrics.get("dnsproxy_zone_routes_total", group="local", why="local-domain") == 2
    assert metrics.get("dnsproxy_zone_routes_total", group="corp.example.", why="zone") == 1


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_without_a_local_dns_home_names_get_nxdomain_here(upstream, make_proxy, tcp):
    proxy = make_proxy("--upstream", upstream.address, "--local-reverse", "192.168.1.0/24",
                       "--local-reverse", "2001:db8:1::/48")
    cases = [("printer.lan", "A", "lan.", "local-domain"),
             ("printer.internal", "AAAA", "internal.", "local-domain"),
             ("router.localdomain", "A", "localdomain.", "local-domain"),
             ("nas", "A", ".", "single-label"),
             ("nas", "HTTPS", ".", "single-label"),
             ("20.1.168.192.in-addr.arpa", "PTR", "1.168.192.in-addr.arpa.", "local-reverse"),
             ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR",
              "1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.", "local-reverse")]
    for name, qtype, soa, why in cases:
        reply = ask(proxy.port, name, qtype, tcp=tcp)
        assert RCODE[reply.header.rcode] == "NXDOMAIN", name
        assert (answers(reply), soa_owner(reply)) == ([], soa), name
        assert logged(proxy, name)[-1] == ("local", None, why)
    # The top of each zone exists (RFC 6303, RFC 8020): NODATA, so nothing below it is hidden.
    for name, soa in (("lan", "lan."), ("1.168.192.in-addr.arpa", "1.168.192.in-addr.arpa."),
                      ("168.192.in-addr.arpa", "168.192.in-addr.arpa.")):
        reply = ask(proxy.port, name, "A", tcp=tcp)
        assert RCODE[reply.header.rcode] == "NOERROR", name
        assert (answers(reply), soa_owner(reply)) == ([], soa), name
    assert upstream.seen == []
    # A top-level domain's delegation is not a home name: a validating stub's DS query passes.
    assert ask(proxy.port, "com", "DS", tcp=tcp).header.rcode == RCODE.NOERROR
    assert [(s.name, s.qtype) for s in upstream.seen] == [("com.", "DS")]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize(("edns", "do"), [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("rd", [True, False])
def test_answers_written_here_are_protocol_correct(upstream, hosts_file, make_proxy, tcp,
                                                    edns, do, rd):
    """As every reply of the forwarder: RA set, AA clear, RD the client's, our OPT (with the
    client's DO) exactly when the client sent one; the question's case kept."""
    proxy = make_proxy("--upstream", upstream.address, "--hosts", str(hosts_file))
    for name, qtype in (("LocalHost", "A"), ("x.Invalid", "A"), ("_dns.resolver.arpa", "SVCB"),
                        ("nas", "A"), ("Laptop.LAN", "A"), ("laptop.lan", "AAAA")):
        query = DNSRecord.question(name, qtype)
        query.header.rd = int(rd)
        if edns:
            query.add_ar(EDNS0(udp_len=1232, flags="do" if do else ""))
        reply = DNSRecord.parse(send_raw(proxy.port, query.pack(), tcp=tcp))
        assert reply.header.id == query.header.id
        assert (reply.header.qr, reply.header.ra, reply.header.aa) == (1, 1, 0), name
        assert reply.header.rd == int(rd), name
        assert str(reply.q.qname) == name + "."
        opts = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
        assert len(opts) == (1 if edns else 0), name
        if edns:
            assert bool(opts[0].ttl & 0x8000) == do
    assert upstream.seen == []


def test_the_most_specific_of_zones_local_domains_and_split_lists_wins(
        upstream, router, office, make_proxy, tmp_path):
    domestic = FakeUpstream("127.0.0.6", default=Behaviour(answers=[NEAR]))
    try:
        listed = tmp_path / "domestic.txt"
        listed.write_text("cn.corp.example\nexample.org\n")
        ranges = tmp_path / "ranges.txt"
        ranges.write_text("192.0.2.0/24\n")
        proxy = make_proxy(
            "--upstream", upstream.address, "--local-dns", router.address,
            "--zone", f"corp.example={office.address}",
            "--zone", f"office.lan={office.address}",
            "--zone", f"sub.example.org={office.address}",
            "--local-domain", "lan", "--local-domain", "local",
            "--domestic-upstream", domestic.address, "--domestic-domains", str(listed),
            "--domestic-ips", str(ranges))
        expected = {
            "wiki.corp.example": (OFFICE_ADDRESS, "corp.example.", "zone"),  # zone
            "www.cn.corp.example": (NEAR, "domestic", "listed"),  # list more specific
            "a.sub.example.org": (OFFICE_ADDRESS, "sub.example.org.", "zone"),  # zone more
            "www.example.org": (NEAR, "domestic", "listed"),
            "printer.office.lan": (OFFICE_ADDRESS, "office.lan.", "zone"),  # zone beats lan
            "printer.lan": (LAN_ADDRESS, "local", "local-domain"),
            "printer.local": (LAN_ADDRESS, "local", "local-domain"),  # named: beats mdns
        }
        for name, (address, group, why) in expected.items():
            assert addresses(ask(proxy.port, name)) == [address], name
            assert logged(proxy, name) == [("forwarded", group, why)], name
        assert upstream.seen == []
        assert router.count() == 2 and office.count() == 3 and domestic.count() == 2
    finally:
        domestic.close()


def test_a_zone_on_the_very_name_of_a_local_domain_wins(upstream, router, office, make_proxy):
    proxy = make_proxy("--upstream", upstream.address, "--local-dns", router.address,
                       "--zone", f"lan={office.address}")
    assert addresses(ask(proxy.port, "printer.lan")) == [OFFICE_ADDRESS]
    assert addresses(ask(proxy.port, "printer.home.arpa")) == [LAN_ADDRESS]
    assert router.count("printer.lan") == 0 and upstream.seen == []


def test_a_private_relay_name_is_forwarded_unless_opted_in(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address)
    assert addresses(ask(proxy.port, "mask.icloud.com")) == [GENUINE]
    assert upstream.count("mask.icloud.com") == 1


def test_each_bypass_guard_can_be_switched_off(upstream, make_proxy):
    proxy = make_proxy("--upstream", upstream.address, "--no-block-ddr",
                       "--no-block-doh-canary")
    assert ask(proxy.port, "_dns.resolver.arpa", "SVCB").header.rcode == RCODE.NOERROR
    assert addresses(ask(proxy.port, "use-application-dns.net")) == [GENUINE]
    assert upstream.count("_dns.resolver.arpa") == 1
    assert upstream.count("use-application-dns.net") == 1


def test_a_lan_resolver_answering_fast_without_opt_is_not_judged_forged(
        upstream, router, make_proxy):
    """Home routers answer in microseconds, often without OPT, sometimes with an address that
    happens to be on a forged list: none of that is a forgery on the LAN. The checks that are
    no judgement (source port, ID, question) stay: mismatched replies are still dropped."""
    router.rule("first.lan", answers=[LAN_ADDRESS], edns=True)  # OPT once: learned if judged
    router.rule("sinkhole.lan", answers=[FORGED_LISTED])
    router.rule("spoofed.lan", answers=[LAN_ADDRESS],
                forgeries=("wrong-id", "wrong-question", "other-port"))
    proxy = make_proxy("--upstream", upstream.address, "--local-dns", router.address)
    for name, address in (("first.lan", LAN_ADDRESS), ("second.lan", LAN_ADDRESS),
                          ("third.lan", LAN_ADDRESS), ("sinkhole.lan", FORGED_LISTED),
                          ("spoofed.lan", LAN_ADDRESS), ("second.lan", LAN_ADDRESS)):
        assert addresses(ask(proxy.port, name)) == [address], name
    assert router.count(transport="tcp") == 0  # nothing held, nothing retried over TCP
    forgeries = [line for line in proxy.log_lines() if line.get("event") == "forgery"]
    assert {(f["name"], f["reason"]) for f in forgeries} == {("spoofed.lan.", "mismatch")}
    assert logged(proxy, "second.lan")[-1] == ("cached", None, None)  # verified: cached
    assert upstream.seen == []


def test_a_local_dns_that_fails_gives_servfail_never_the_public_answer(upstream, make_proxy):
    silent = FakeUpstream("127.0.0.4", default=Behaviour(silent=True))
    try:
        proxy = make_proxy("--upstream", upstream.address, "--local-dns", silent.address,
                           "--timeout", "0.5")
        assert ask(proxy.port, "printer.lan").header.rcode == RCODE.SERVFAIL
        assert logged(proxy, "printer.lan") == [("servfail", "local", "local-domain")]
        assert upstream.seen == []
    finally:
        silent.close()


# --- settings: options, TOML keys, DNSPROXY_ variables ---


def test_home_settings_from_every_layer(tmp_path):
    path = tmp_path / "home.toml"
    path.write_text("""\
upstreams = ["127.0.0.2"]
local_dns = ["127.0.0.4", "tcp://127.0.0.5"]
local_domains = ["lan", "fritz.box"]
local_reverse = ["192.168.178.0/24", "fd00:1::/64"]
zones = ["corp.example=10.8.0.1", "corp.example=tls://10.8.0.2#dns.corp.example"]
hosts = ["/etc/hosts"]
block_ddr = false
block_doh_canary = false
block_private_relay = true
""")
    s = build_settings(cli("--config", str(path)), {})
    assert [spec.name for spec in s.local_dns] == ["127.0.0.4:53", "tcp://127.0.0.5:53"]
    assert s.local_domains == ["lan", "fritz.box"]
    assert s.local_reverse == ["192.168.178.0/24", "fd00:1::/64"]
    assert [spec.name for spec in homenames.zone_groups(s)["corp.example."]] == [
        "10.8.0.1:53", "tls://10.8.0.2:853"]
    assert s.hosts == ["/etc/hosts"]
    assert (s.block_ddr, s.block_doh_canary, s.block_private_relay) == (False, False, True)
    s = build_settings({}, {
        "DNSPROXY_UPSTREAMS": "127.0.0.2", "DNSPROXY_LOCAL_DNS": "127.0.0.4",
        "DNSPROXY_LOCAL_DOMAINS": "lan, fritz.box", "DNSPROXY_LOCAL_REVERSE": "10.1.0.0/16",
        "DNSPROXY_ZONES": "corp.example=10.8.0.1 vpn.example=10.8.0.3",
        "DNSPROXY_HOSTS": "/etc/hosts", "DNSPROXY_BLOCK_DDR": "0",
        "DNSPROXY_BLOCK_DOH_CANARY": "no", "DNSPROXY_BLOCK_PRIVATE_RELAY": "1"})
    assert [spec.name for spec in s.local_dns] == ["127.0.0.4:53"]
    assert (s.local_domains, s.local_reverse) == (["lan", "fritz.box"], ["10.1.0.0/16"])
    assert list(homenames.zone_groups(s)) == ["corp.example.", "vpn.example."]
    assert (s.hosts, s.block_ddr, s.block_doh_canary, s.block_private_relay) == (
        ["/etc/hosts"], False, False, True)
    s = build_settings(cli("--upstream", "127.0.0.2", "--local-dns", "127.0.0.4",
                           "--local-domain", "fritz.box", "--local-reverse", "10.1.0.0/16",
                           "--zone", "corp.example=10.8.0.1", "--hosts", "/etc/hosts",
                           "--no-block-ddr", "--no-block-doh-canary",
                           "--block-private-relay"), {})
    assert (s.local_domains, s.local_reverse, s.zones, s.hosts) == (
        ["fritz.box"], ["10.1.0.0/16"], ["corp.example=10.8.0.1"], ["/etc/hosts"])
    assert (s.block_ddr, s.block_doh_canary, s.block_private_relay) == (False, False, True)


def test_home_defaults():
    s = build_settings(cli("--upstream", "127.0.0.2"), {})
    assert s.local_domains == ["lan", "home.arpa", "internal", "localdomain"]
    assert (s.local_dns, s.local_reverse, s.zones, s.hosts) == ([], [], [], [])
    assert (s.block_ddr, s.block_doh_canary, s.block_private_relay) == (True, True, False)


def test_a_hijack_threshold_for_the_lan_resolver_is_refused(tmp_path):
    path = tmp_path / "home.toml"
    path.write_text('upstreams = ["127.0.0.2"]\n'
                    'local_dns = [{address = "127.0.0.4", hijack_threshold = 5}]\n')
    with pytest.raises(ConfigError, match="local_dns 127.0.0.4:53: no hijack_threshold"):
        build_settings(cli("--config", str(path)), {})


@pytest.mark.parametrize(("args", "fragment"), [
    (["--local-reverse", "10.0.0.0/33"], "local_reverse: '10.0.0.0/33' is not a network"),
    (["--local-reverse", "lan"], "local_reverse: 'lan' is not a network"),
    (["--local-reverse", "0.0.0.0/0"], "covers every address"),
    (["--zone", "corp.example"], "zones: expected NAME=SPEC, got 'corp.example'"),
    (["--zone", "=127.0.0.5"], "zones: expected NAME=SPEC"),
    (["--zone", "bad..name=127.0.0.5"], "zones: not a domain name: 'bad..name'"),
    (["--zone", "corp.example=office.example"], "'office.example' is not an IP address"),
    (["--zone", "corp.example=https://dns.corp.example/dns-query"], "give its address"),
    (["--local-domain", "a b"], "local_domains: not a domain name: 'a b'"),
    (["--local-domain", "."], "local_domains: empty name"),
    (["--local-dns", "ftp://127.0.0.4"], "unknown scheme 'ftp'"),
    (["--local-dns", "https://router.lan/dns-query"], "local_dns: no other upstream"),
    (["--hosts", "/nonexistent/hosts"], "cannot read hosts file /nonexistent/hosts"),
])
def test_bad_home_settings_are_one_line_and_exit_2(args, fragment):
    listen = f"127.0.0.1:{free_port()}"
    expect_usage_error(run_dnsproxy("--listen", listen, "--upstream", "127.0.0.2", *args),
                       fragment)


def test_a_bad_hosts_line_at_start_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("192.168.1.30 laptop.lan\n\n192.168.1.300 tv.lan\n")
    result = run_dnsproxy("--listen", f"127.0.0.1:{free_port()}", "--upstream", "127.0.0.2",
                          "--hosts", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"dnsproxy: error: {bad}:3: not an IP address: '192.168.1.300'"]


def test_sighup_rereads_the_hosts_file_and_keeps_it_on_a_bad_line(upstream, hosts_file):
    port = free_port()
    proc = DnsproxyProcess("--listen", f"127.0.0.1:{port}", "--upstream", upstream.address,
                           "--hosts", str(hosts_file), "--query-log", port=port,
                           env=clean_env())
    try:
        assert addresses(ask(port, "laptop.lan")) == ["192.168.1.30"]
        hosts_file.write_text("192.168.1.40 laptop.lan\n192.168.1.41 phone.lan\n")
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while addresses(ask(port, "laptop.lan")) != ["192.168.1.40"]:
            assert time.monotonic() < deadline, "the new hosts file was not read"
            time.sleep(0.1)
        assert addresses(ask(port, "phone.lan")) == ["192.168.1.41"]
        assert answers(ask(port, "41.1.168.192.in-addr.arpa", "PTR")) == ["phone.lan."]
        # A bad line: the file in use stays.
        hosts_file.write_text("192.168.1.50 laptop.lan\nphone.lan 192.168.1.41\n")
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(2)  # a failed reload changes nothing to wait on; its line is checked below
        assert addresses(ask(port, "laptop.lan")) == ["192.168.1.40"]
        assert addresses(ask(port, "phone.lan")) == ["192.168.1.41"]
    finally:
        proc.terminate()
    failed = [line for line in proc.stderr.splitlines() if "reload failed" in line]
    assert len(failed) == 1, proc.stderr
    assert failed[0].endswith(f"{hosts_file}:2: not an IP address: 'phone.lan'")
    assert upstream.seen == []
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {line["why"] for line in lines if "why" in line} == {"hosts"}


def zone_config(path, upstream, office, zoned: bool) -> None:
    zones = f'zones = ["corp.example={office.address}"]\n' if zoned else ""
    path.write_text(f'upstreams = ["{upstream.address}"]\n{zones}')


def test_a_reload_removing_a_zone_forgets_its_cached_answers(upstream, office, tmp_path):
    """The zone's resolver answered wiki.corp.example and it was cached; the zone is removed
    from the configuration (SIGHUP): the next query goes to the public upstream."""
    config = tmp_path / "dnsproxy.toml"
    zone_config(config, upstream, office, zoned=True)
    port = free_port()
    proc = DnsproxyProcess("--listen", f"127.0.0.1:{port}", "--config", str(config), port=port)
    try:
        assert addresses(ask(port, "wiki.corp.example")) == [OFFICE_ADDRESS]
        assert addresses(ask(port, "wiki.corp.example")) == [OFFICE_ADDRESS]  # cached
        assert addresses(ask(port, "www.example")) == [GENUINE]
        zone_config(config, upstream, office, zoned=False)
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # the reload reads the file in a thread, then swaps
        assert addresses(ask(port, "wiki.corp.example")) == [GENUINE]
        assert addresses(ask(port, "www.example")) == [GENUINE]  # not routed: kept
    finally:
        assert proc.terminate()[0] == 0
    assert office.count("wiki.corp.example", "udp") == 1
    assert upstream.count("wiki.corp.example", "udp") == 1
    assert upstream.count("www.example", "udp") == 1
    assert "cache: 1 entry for names now routed elsewhere dropped" in proc.stderr


def test_an_answer_of_a_removed_zone_in_flight_across_the_reload_is_not_cached(
        upstream, office, tmp_path):
    """The zone's resolver is slow; while it is asked, a reload removes the zone. Its answer,
    coming after the swap, still reaches the client that asked, but is not cached."""
    config = tmp_path / "dnsproxy.toml"
    zone_config(config, upstream, office, zoned=True)
    office.rule("slow.corp.example", answers=[OFFICE_ADDRESS], delay=1.2)
    port = free_port()
    proc = DnsproxyProcess("--listen", f"127.0.0.1:{port}", "--config", str(config), port=port)
    try:
        asked = concurrent.futures.ThreadPoolExecutor(1).submit(ask, port, "slow.corp.example")
        time.sleep(0.1)
        zone_config(config, upstream, office, zoned=False)
        proc.proc.send_signal(signal.SIGHUP)
        assert addresses(asked.result(5)) == [OFFICE_ADDRESS]
        assert addresses(ask(port, "slow.corp.example")) == [GENUINE]
    finally:
        assert proc.terminate()[0] == 0
    assert "configuration reloaded" in proc.stderr
    assert office.count("slow.corp.example", "udp") == 1
    assert upstream.count("slow.corp.example", "udp") == 1


def test_a_restart_with_a_zone_removed_forgets_its_cached_answers(upstream, office, tmp_path):
    """The cache file holds the zone's resolver's answer; the next start has no such zone:
    the routing saved beside the cache file tells, and the public upstream is asked."""
    state = tmp_path / "state"
    port = free_port()
    common = ("--listen", f"127.0.0.1:{port}", "--upstream", upstream.address,
              "--state-dir", str(state))
    first = DnsproxyProcess(*common, "--zone", f"corp.example={office.address}", port=port)
    try:
        assert addresses(ask(port, "wiki.corp.example")) == [OFFICE_ADDRESS]
        assert addresses(ask(port, "www.example")) == [GENUINE]
    finally:
        assert first.terminate()[0] == 0
    second = DnsproxyProcess(*common, port=port)
    try:
        assert addresses(ask(port, "wiki.corp.example")) == [GENUINE]
        assert addresses(ask(port, "www.example")) == [GENUINE]
    finally:
        assert second.terminate()[0] == 0
    assert office.count("wiki.corp.example", "udp") == 1
    assert upstream.count("wiki.corp.example", "udp") == 1
    assert upstream.count("www.example", "udp") == 1  # from the cache file: not routed
    assert "cache: 1 entry for names now routed elsewhere dropped" in second.stderr
    # The same routing again: nothing more is forgotten.
    third = DnsproxyProcess(*common, port=port)
    try:
        assert addresses(ask(port, "wiki.corp.example")) == [GENUINE]
    finally:
        assert third.terminate()[0] == 0
    assert upstream.count("wiki.corp.example", "udp") == 1
    assert "now routed elsewhere" not in third.stderr


# --- the pure parts ---


@pytest.mark.parametrize(("cidr", "zones"), [
    ("192.168.1.0/24", ["1.168.192.in-addr.arpa"]),
    ("192.168.1.77/24", ["1.168.192.in-addr.arpa"]),  # host bits: the network meant
    ("10.0.0.0/8", ["10.in-addr.arpa"]),
    ("192.168.0.0/23", ["0.168.192.in-addr.arpa", "1.168.192.in-addr.arpa"]),
    ("172.16.0.0/12", [f"{n}.172.in-addr.arpa" for n in range(16, 32)]),
    # Inside one octet: a zone per address, so the other half of the /24 is not claimed.
    ("192.168.1.128/25", [f"{n}.1.168.192.in-addr.arpa" for n in range(128, 256)]),
    ("192.168.1.5/32", ["5.1.168.192.in-addr.arpa"]),
    ("2001:db8:1::/48", ["1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"]),
    ("fc00::/7", ["c.f.ip6.arpa", "d.f.ip6.arpa"]),
    ("fe80::/10", ["8.e.f.ip6.arpa", "9.e.f.ip6.arpa", "a.e.f.ip6.arpa", "b.e.f.ip6.arpa"]),
    ("2001:db8:1:2::/63", ["2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
                           "3.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"]),
])
def test_reverse_zones_of_a_network(cidr, zones):
    assert homenames.reverse_zones(cidr) == [to_wire(zone) for zone in zones]


def test_the_built_in_reverse_zones_are_those_of_rfc_6303():
    s = build_settings(cli("--upstream", "127.0.0.2"), {})
    table = homenames.build_table(s)
    built_in = {suffix for suffix, rule in table.rules.items() if rule.why == "rfc6303"}
    for zone in ("10.in-addr.arpa", "16.172.in-addr.arpa", "31.172.in-addr.arpa",
                 "168.192.in-addr.arpa", "64.100.in-addr.arpa", "127.100.in-addr.arpa",
                 "254.169.in-addr.arpa", "127.in-addr.arpa", "0.in-addr.arpa",
                 "2.0.192.in-addr.arpa", "100.51.198.in-addr.arpa", "113.0.203.in-addr.arpa",
                 "255.255.255.255.in-addr.arpa", "d.f.ip6.arpa", "8.e.f.ip6.arpa",
                 "b.e.f.ip6.arpa", "8.b.d.0.1.0.0.2.ip6.arpa", "0." * 32 + "ip6.arpa",
                 "1." + "0." * 31 + "ip6.arpa"):
        assert to_wire(zone) in built_in, zone
    assert to_wire("15.172.in-addr.arpa") not in built_in
    assert to_wire("128.100.in-addr.arpa") not in built_in
    assert len(built_in) == 1 + 16 + 1 + 64 + 1 + 1 + 1 + 3 + 1 + 2 + 2 + 4 + 1


def test_hosts_file_reading(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("""\
127.0.0.1 localhost
::1       localhost ip6-localhost   # two names
fe80::1%lo0 Router.LAN
192.168.1.9 nas.lan nas
192.168.1.10 nas.lan
0.0.0.0 ads.example
192.168.1.9 old-nas.lan
""")
    table = hosts.load([str(path)])
    entries = table.entries
    assert set(entries[to_wire("localhost")]) == {1, 28}
    assert set(entries[to_wire("router.lan")]) == {28}  # the zone dropped, the case folded
    assert entries[to_wire("nas.lan")][1][1] == 2 and entries[to_wire("nas")][1][1] == 1
    # The PTR of an address names its first line's first name.
    ptr = entries[to_wire("9.1.168.192.in-addr.arpa")][hosts.TYPE_PTR][0]
    assert ptr.endswith(b"\x00\x09" + to_wire("nas.lan"))  # rdlength 9, the name
    assert (table.names, table.addresses) == (7, 6)


@pytest.mark.parametrize(("line", "why"), [
    ("192.168.1.300 tv.lan", "not an IP address: '192.168.1.300'"),
    ("tv.lan 192.168.1.3", "not an IP address: 'tv.lan'"),
    ("192.168.1.3", "192.168.1.3 has no name"),
    ("192.168.1.3 bad..name", "not a domain name: 'bad..name'"),
])
def test_a_bad_hosts_line_says_file_line_and_why(tmp_path, line, why):
    path = tmp_path / "hosts"
    path.write_text(f"# header\n{line}\n")
    with pytest.raises(hosts.HostsError) as caught:
        hosts.load([str(path)])
    assert str(caught.value) == f"{path}:2: {why}"


def test_the_table_says_which_cached_questions_it_routes():
    """What forgetting after a change of routing needs: whether a cache key (question key, then
    a DO/CD byte) is one the table sends to a group. Those it answers itself are not: their
    answer comes before the cache's."""
    def key(name: str, qtype: int = 1) -> bytes:
        return to_wire(name) + qtype.to_bytes(2, "big") + b"\x00\x01" + b"\x00"

    s = build_settings(cli("--upstream", "127.0.0.2", "--local-dns", "127.0.0.4",
                           "--zone", "corp.example=127.0.0.5"), {})
    table = homenames.build_table(s)
    assert table.routes_key(key("printer.lan")) and table.routes_key(key("nas"))
    assert table.routes_key(key("wiki.corp.example", 28))
    assert not table.routes_key(key("x.invalid")) and not table.routes_key(key("localhost", 28))
    assert not table.routes_key(key("example.org")) and not table.routes_key(key("com", 43))
    alone = homenames.build_table(build_settings(cli("--upstream", "127.0.0.2"), {}))
    assert not alone.routes_key(key("printer.lan"))  # NXDOMAIN here: nothing to forget


@pytest.mark.parametrize("saved", [pytest.param(True, id="routing-saved"),
                                   pytest.param(False, id="no-routing-file")])
def test_answers_cached_before_a_name_was_routed_home_are_forgotten(upstream, office, tmp_path,
                                                                    saved):
    """A cache file from before a --zone was set holds the public upstream's answer for a name
    under it: at the next start that entry goes, and the zone's resolver answers. Also when
    the cache file has no routing beside it (an older version's): what is routed now goes."""
    state = tmp_path / "state"
    port = free_port()
    common = ("--listen", f"127.0.0.1:{port}", "--upstream", upstream.address,
              "--state-dir", str(state))
    first = DnsproxyProcess(*common, port=port)
    try:
        assert addresses(ask(port, "intranet.corp.example")) == [GENUINE]
    finally:
        assert first.terminate()[0] == 0
    if not saved:
        (state / routingfile.FILE_NAME).unlink()
    second = DnsproxyProcess(*common, "--zone", f"corp.example={office.address}", port=port)
    try:
        assert addresses(ask(port, "intranet.corp.example")) == [OFFICE_ADDRESS]
        assert office.count("intranet.corp.example", "udp") == 1
    finally:
        assert second.terminate()[0] == 0
    assert upstream.count("intranet.corp.example", "udp") == 1
    assert "cache: 1 entry for names now routed elsewhere dropped" in second.stderr
