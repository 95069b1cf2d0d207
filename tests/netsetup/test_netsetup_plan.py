"""The plan's rules that depend on the modes asked for, checked as data (no host touched)."""

from __future__ import annotations

import pytest
from netsetup_facts import facts, settings

from netsetup.firewall.model import Rule
from netsetup.plan import MODE_TRAITS, Mode, compute_plan


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
