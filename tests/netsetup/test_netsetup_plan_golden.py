"""Golden files pin the plan per engine version and host firewall backend.

A reviewer reads tests/netsetup/golden/*.txt to see every rule any host will get. After an
intended change, regenerate them explicitly: NETSETUP_UPDATE_GOLDEN=1 pytest tests/netsetup.
A missing golden file fails the test; nothing is ever written silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from netsetup_facts import BACKENDS, ENGINES, facts, settings

from netsetup.firewall import get_backend
from netsetup.plan import compute_plan, render_plan

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("NETSETUP_UPDATE_GOLDEN") == "1"

CASES = [(engine, backend, "both") for engine in ENGINES for backend in BACKENDS] + [
    (engine, "nft", mode) for engine in ("20.10", "28") for mode in ("port", "direct")
] + [
    # LAN address mode: alone, and with the others, on both firewall backends
    ("28", "nft", "lan"), ("28", "legacy", "port,direct,lan"), ("20.10", "nft", "direct,lan"),
] + [
    # A LAN address over IPv6 too: engines without ip6tables of their own (20.10, 26) and with
    # (28, 29), both backends; an IPv6 upstream adds the IPv6 masquerade
    ("20.10", "nft", "lan,ipv6"), ("20.10", "legacy", "port,direct,lan,ipv6"),
    ("26", "nft", "lan,ipv6up"), ("28", "nft", "lan,ipv6"), ("28", "legacy", "lan,ipv6up"),
    ("29-nftables", "nft", "lan,ipv6"),
] + [
    # Failover: LAN_IP held by VRRP, not proxied; over IPv6 too
    ("20.10", "nft", "lan,ha"), ("28", "legacy", "port,lan,ha"), ("28", "nft", "lan,ipv6,ha"),
] + [
    # The web page is on in every case above; off, every mode and IPv6 lose its rules
    ("28", "nft", "port,direct,lan,noweb"), ("20.10", "legacy", "port,direct,lan,ipv6,noweb"),
]
KEEPALIVED = ["lan,ha", "lan,ipv6,ha"]  # the keepalived.conf each gives


def golden_name(engine: str, backend: str, mode: str) -> str:
    return f"plan-docker{engine}-{backend}-{mode.replace(',', '+')}.txt"


def rendered(engine: str, backend: str, mode: str) -> str:
    plan = compute_plan(settings(mode), facts(engine, backend))
    return render_plan(plan, get_backend(backend).describe(plan.firewall),
                       get_backend(backend, 6).describe(plan.firewall6))  # fmt: skip


@pytest.mark.parametrize(("engine", "backend", "mode"), CASES)
def test_plan_matches_golden(engine: str, backend: str, mode: str) -> None:
    path = GOLDEN / golden_name(engine, backend, mode)
    text = rendered(engine, backend, mode)
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path.name} missing: run with NETSETUP_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"plan differs from {path.name}"


@pytest.mark.parametrize("mode", KEEPALIVED)
def test_keepalived_config_matches_golden(mode: str) -> None:
    plan = compute_plan(settings(mode), facts("28", "nft"))
    assert plan.vrrp is not None
    path = GOLDEN / f"keepalived-{mode.replace(',', '+')}.conf"
    text = plan.vrrp.render()
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path.name} missing: run with NETSETUP_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"keepalived.conf differs from {path.name}"


def test_no_stale_golden_files() -> None:
    expected = {golden_name(e, b, m) for e, b, m in CASES}
    assert {p.name for p in GOLDEN.glob("plan-*.txt")} == expected
    expected = {f"keepalived-{m.replace(',', '+')}.conf" for m in KEEPALIVED}
    assert {p.name for p in GOLDEN.glob("keepalived-*.conf")} == expected
