"""The host side of the forwarder's web page, with no host touched: the plan's rules for it in
every mode and family, the settings that turn it on and place it, the compose overlay that
serves and publishes it."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from netsetup_facts import LAN_CIDR6, LAN_IP, LAN_IP6, facts, settings

from dnsproxy.defaults import DNS_PORT, WEB_PORT
from netsetup.deploy import Compose, compose_command
from netsetup.detect import check_port_free
from netsetup.errors import BadInput, NetsetupError, PortTaken
from netsetup.firewall import get_backend
from netsetup.firewall.model import FirewallPlan, Rule
from netsetup.host import compose_for
from netsetup.plan import Settings, check_settings, compute_plan, input_chain, lan_chain
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


# ---- compose: the overlay, read only with the page on --------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def config_of(s: Settings) -> tuple[Compose, str]:
    """The compose run `up` makes for `s` on netsetup_facts' host, and `compose config`'s text
    for it (the files read, no engine asked)."""
    try:
        compose_command()
    except NetsetupError:
        pytest.skip("no compose tool")
    host_facts = facts("28", "nft")
    compose = compose_for(s, REPO / "compose.yaml", compute_plan(s, host_facts), host_facts,
                          get_backend("nft"))  # fmt: skip
    proc = compose.run("config", check=False)
    assert proc.returncode == 0, proc.stderr
    return compose, proc.stdout


def published(config: str) -> set[str]:
    """The forwarder's published ports as compose renders them, in the short form (1.29) or
    rebuilt from the long one (Compose v2)."""
    found, lines = set(), config.splitlines()
    for number, line in enumerate(lines):
        text = line.strip().removeprefix("- ")
        if text.count(":") == 2 and text.endswith(("/tcp", "/udp")):
            found.add(text.strip("'\""))
        elif text.startswith("target: "):  # v2: mode, host_ip, target, published, protocol
            block = dict(ln.strip().removeprefix("- ").split(": ", 1)
                         for ln in lines[number - 2:number + 3] if ": " in ln)  # fmt: skip
            found.add(f"{block.get('host_ip')}:{block.get('published', '').strip(chr(34))}:"
                      f"{block['target']}/{block.get('protocol', 'tcp')}")
    return found


def test_the_page_is_configured_and_published_as_dns_is() -> None:
    """With the page on compose reads compose.web.yaml too: the forwarder serves the page on
    the container's port 80 with its password in the state volume, and WEB_PORT is published as
    PORT is (port mode: the host's LAN address; loopback always). With LAN_IP6 it listens on
    IPv6 too. Off, nothing of it is read, and nothing publishes port 80."""
    compose, config = config_of(settings("port"))
    assert compose.overlays == (REPO / "compose.web.yaml",)
    assert compose.variables["WEB_PORT"] == "8053" and "WEB_LISTEN" not in compose.variables
    assert "DNSPROXY_WEB: 0.0.0.0:80" in config
    assert "DNSPROXY_WEB_PASSWORD_FILE: /var/lib/dnsproxy/web-password" in config
    assert {"192.168.1.2:8053:80/tcp", "127.0.0.1:8053:80/tcp",
            "192.168.1.2:5053:53/tcp"} <= published(config)  # fmt: skip

    # direct mode publishes on loopback only, the page as DNS
    _, config = config_of(replace(settings("direct"), web_port=8099))
    ports = published(config)
    assert {"127.0.0.2:8099:80/tcp", "127.0.0.1:8099:80/tcp"} <= ports, ports
    assert not [p for p in ports if p.startswith("192.168.1.2:")], ports

    compose, config = config_of(settings("lan,ipv6"))
    assert compose.overlays[-1] == REPO / "compose.web.yaml"
    assert "DNSPROXY_WEB: 0.0.0.0:80,[::]:80" in config

    compose, config = config_of(replace(settings("port"), web=False))
    assert compose.overlays == () and "WEB_PORT" not in compose.variables
    assert "DNSPROXY_WEB" not in config
    assert not [p for p in published(config) if p.endswith(":80/tcp")], config


def test_the_page_s_port_taken_is_named_as_its_own_and_only_over_tcp() -> None:
    """A TCP listener on WEB_PORT refuses `up` naming --web-port; a UDP socket there does not
    (the page is TCP only), where it would for DNS's --port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("0.0.0.0", 0))
        port = holder.getsockname()[1]
        check_port_free(port, "--web-port (WEB_PORT)", udp=False)
        with pytest.raises(PortTaken, match="choose another --port$"):
            check_port_free(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortTaken, match=rf"{port}/tcp .* choose another --web-port"):
            check_port_free(port, "--web-port (WEB_PORT)", udp=False)
