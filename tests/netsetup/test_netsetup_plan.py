"""The plan's rules that depend on the modes asked for, checked as data (no host touched)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from netsetup_facts import facts, settings

from netsetup.firewall.model import Rule
from netsetup.plan import MODE_TRAITS, OPT_GATEWAY_MODE6, Mode, compute_plan, upstream_is_ipv6


def masquerade_rules(mode: str) -> list[Rule]:
    plan = compute_plan(settings(mode), facts("28", "nft"))
    return [r for r in plan.firewall.rules if r.target == "MASQUERADE"]


@pytest.mark.parametrize(
    ("mode", "lan_left_out"),
    [
        # direct mode: the LAN routes the subnet, so a LAN upstream can reply to the appliance
        ("direct", True), ("both", True), ("direct,lan", True), ("port,direct,lan", True),
        # port and lan mode: nothing on the LAN routes the subnet, so the LAN is masqueraded too
        ("port", False), ("lan", False), ("port,lan", False),
    ],
)  # fmt: skip
def test_masquerade_leaves_the_lan_out_only_where_it_routes_the_subnet(
    mode: str, lan_left_out: bool
) -> None:
    (rule,) = masquerade_rules(mode)
    # everything the appliance sends out of its subnet, other than through its own bridge
    assert (rule.table, rule.source, rule.out_interface, rule.not_out_interface) == (
        "nat", "172.31.53.0/24", "br-dnsapp", True,
    )  # fmt: skip
    if lan_left_out:
        assert (rule.destination, rule.not_destination) == ("192.168.1.0/24", True)
    else:
        assert rule.destination is None and not rule.not_destination


def test_the_masquerade_reads_the_modes_traits() -> None:
    """The rule follows the trait, not a mode's name: only direct mode says the LAN routes the
    subnet, and settings with several modes have it when any of them does."""
    assert [m for m in Mode if MODE_TRAITS[m].lan_routes_subnet] == [Mode.direct]
    assert all(m.traits is MODE_TRAITS[m] for m in Mode)
    assert settings("port,direct").lan_routes_subnet
    assert not settings("port,lan").lan_routes_subnet


@pytest.mark.parametrize(
    ("spec", "ipv6"),
    [
        ("[2001:db8::53]:53", True), ("2001:db8::53", True),
        ("tls://[2001:db8::1]:853#dns.example", True), ("https://[2001:db8::1]/dns-query", True),
        ("udp://[fd00::1]", True), ("198.51.100.53", False), ("198.51.100.53:5353", False),
        ("tls://192.0.2.1#dns.example", False), ("https://dns.example/dns-query", False),
        ("not an address", False),
    ],
)  # fmt: skip
def test_ipv6_upstreams_are_told_from_the_spec(spec: str, ipv6: bool) -> None:
    assert upstream_is_ipv6(spec) is ipv6


def test_no_ipv6_settings_no_ipv6_rules() -> None:
    """Existing users: without LAN_IP6 the plan has no IPv6 piece at all, whatever the mode
    and upstreams (an IPv6 upstream alone does not turn it on)."""
    for mode in ("both", "port", "lan", "port,direct,lan"):
        plan = compute_plan(replace(settings(mode), upstreams=("[2001:db8::53]:53",)),
                            facts("28", "nft"))  # fmt: skip
        assert plan.firewall6.chains == [] and plan.firewall6.rules == []
        assert OPT_GATEWAY_MODE6 not in plan.network_options


def test_ipv6_default_deny_lets_only_the_lan_prefix_and_dns_in() -> None:
    """Only DNS: the web page is served over IPv4 only (plan.WEB_OVER_IPV6)."""
    plan = compute_plan(settings("lan,ipv6"), facts("20.10", "nft"))
    fw = plan.firewall6
    assert fw.family == 6
    accepts = [r for r in fw.rules if r.table == "filter" and r.target == "ACCEPT"]
    lan_rules = [r for r in accepts if r.source == "fd00:1::/64"]
    assert sorted((r.protocol, r.dport, r.destination) for r in lan_rules) == [
        ("tcp", 53, "fd53:53::53"), ("udp", 53, "fd53:53::53"),
    ]  # fmt: skip
    drop = [r for r in fw.rules if r.target == "DROP"]
    assert len(drop) == 1 and fw.rules.index(drop[0]) == len(fw.rules_in("filter")) - 1
    assert not [r for r in fw.rules if r.target == "MASQUERADE"], "no IPv6 upstream: no masquerade"
    dnat = [r for r in fw.rules if r.target == "DNAT"]
    assert {(r.destination, r.to_destination) for r in dnat} == {("fd00:1::53", "[fd53:53::53]:53")}
