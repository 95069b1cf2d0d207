"""The host side of the forwarder's web page, as data: the plan's rules for it in every mode and
family, the settings that turn it on and place it (no host touched)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from netsetup_facts import LAN_CIDR6, LAN_IP, LAN_IP6, facts, settings

from dnsproxy.defaults import DNS_PORT, WEB_PORT
from netsetup.errors import BadInput
from netsetup.firewall.model import FirewallPlan, Rule
from netsetup.plan import check_settings, compute_plan, input_chain, lan_chain
from netsetup.state import Deployment

LAN = "192.168.1.0/24"  # netsetup_facts' LAN
MODES = ["port", "direct", "lan", "both", "port,direct,lan", "lan,ipv6", "lan,ha", "lan,ipv6,ha"]


def families(mode: str, web: bool = True) -> list[tuple[FirewallPlan, str, str, str | None]]:
    """Each family's firewall with its served LAN, the appliance's address as DNAT writes it,
    and the LAN address translated to it (None outside lan mode)."""
    s = replace(settings(mode), web=web)
    plan = compute_plan(s, facts("28", "nft"))
    out = [(plan.firewall, LAN, s.ip, s.lan_ip if s.lan else None)]
    if plan.firewall6.chains:
        out.append((plan.firewall6, LAN_CIDR6, f"[{s.ip6}]", s.lan_ip6))
    return out


def web_rules(fw: FirewallPlan) -> list[Rule]:
    return [r for r in fw.rules if r.dport == WEB_PORT]


@pytest.mark.parametrize("mode", MODES)
def test_the_page_is_let_in_from_the_lan_as_dns_is(mode: str) -> None:
    """One filter rule per family: the served LAN to the appliance's port 80 over TCP, with
    exactly the matches of the LAN's DNS/tcp rule (same source, interfaces, destination); in
    lan mode LAN_IP:80 (LAN_IP6:80) is translated to it in the chain that translates DNS."""
    for fw, served, to_address, lan_ip in families(mode):
        (accept,) = [r for r in web_rules(fw) if r.table == "filter"]
        dns = next(r for r in fw.rules_in("filter") if r.dport == DNS_PORT and r.protocol == "tcp")
        assert accept.source == served and accept.target == "ACCEPT"
        assert replace(accept, dport=DNS_PORT, comment=dns.comment) == dns
        assert accept.comment == "dnsapp: LAN to appliance web page"
        # before the default deny, like every rule that lets something in
        drop = next(r for r in fw.rules if r.target == "DROP" and r.chain == accept.chain)
        assert fw.rules.index(accept) < fw.rules.index(drop)
        dnat = [r for r in web_rules(fw) if r.target == "DNAT"]
        if lan_ip is None:
            assert dnat == []
            continue
        (rule,) = dnat
        assert (rule.chain, rule.destination, rule.protocol, rule.to_destination) == (
            lan_chain("dnsapp"), lan_ip, "tcp", f"{to_address}:{WEB_PORT}")  # fmt: skip
        dns_nat = next(r for r in fw.rules if r.target == "DNAT" and r.protocol == "tcp")
        assert dns_nat.chain == rule.chain and dns_nat.destination == rule.destination


@pytest.mark.parametrize("mode", MODES)
def test_without_the_page_its_rules_alone_are_gone(mode: str) -> None:
    """WEB=0: no rule names port 80, and everything else is the plan with the page on."""
    for (on, *_), (off, *_) in zip(families(mode), families(mode, web=False), strict=True):
        assert not web_rules(off)
        assert off.rules == [r for r in on.rules if r.dport != WEB_PORT]
        assert (off.chains, off.hooks) == (on.chains, on.hooks)


@pytest.mark.parametrize("mode", ["lan,ha", "lan,ipv6,ha"])
def test_with_ha_the_page_at_the_shared_address_never_meets_the_input_drop(mode: str) -> None:
    """The master holds LAN_IP itself, and its INPUT chain drops everything at LAN_IP but ICMP.
    The page still answers there: the LAN chain, hooked from PREROUTING, turns LAN_IP:80 into
    the appliance's address before the routing decision, so the connection is forwarded into the
    bridge (our filter chain lets the LAN in) and never reaches INPUT, whose DROP matches LAN_IP
    only. Nothing in the INPUT chain names the page's port."""
    for fw, _, to_address, lan_ip in families(mode):
        assert lan_ip in (LAN_IP, LAN_IP6)
        hooked = {(h.table, h.chain, h.target) for h in fw.hooks}
        assert ("nat", "PREROUTING", lan_chain("dnsapp")) in hooked
        assert ("filter", "INPUT", input_chain("dnsapp")) in hooked
        (dnat,) = [r for r in web_rules(fw) if r.target == "DNAT"]
        assert dnat.to_destination == f"{to_address}:{WEB_PORT}"
        assert not dnat.to_destination.startswith(lan_ip)
        inputs = [r for r in fw.rules if r.chain == input_chain("dnsapp")]
        assert inputs and all(r.dport is None for r in inputs)
        drops = [r for r in inputs if r.target == "DROP" and r.destination]
        assert {r.destination for r in drops} == {lan_ip}
        (accept,) = [r for r in web_rules(fw) if r.table == "filter"]
        assert accept.destination == to_address.strip("[]")


def test_the_page_s_port_is_checked_only_when_the_page_is_on() -> None:
    base = settings("both")
    for port, word in ((0, "is not a port"), (70000, "is not a port"), (5053, "is --port too")):
        with pytest.raises(BadInput, match=f"--web-port {port} {word}"):
            check_settings(replace(base, web_port=port))
        check_settings(replace(base, web=False, web_port=port))  # off: no port of its own
    assert check_settings(replace(base, web_port=8080)).web_port == 8080


def test_a_record_from_before_the_page_reads_as_a_deployment_without_it() -> None:
    """A deployment record older than the page describes containers without one: its plan (the
    host service reads it at every sync) opens nothing for a page; a new record keeps both
    settings, and reads back equal."""
    old = Deployment.from_json('{"settings": {"mode": "both", "ip": "172.31.53.53"}}')
    assert old.to_settings().web is False
    fresh = replace(settings("both"), web_port=8081)
    record = Deployment.of(fresh, facts("28", "nft"), "auto", "")
    assert (record.settings["web"], record.settings["web_port"]) == (True, 8081)
    again = Deployment.from_json(json.dumps({"settings": record.settings}))
    assert again.to_settings() == fresh
