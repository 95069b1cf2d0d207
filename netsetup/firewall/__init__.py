"""Firewall backends: one rule model (model.py), one backend per way of writing it.

iptables_nft writes through the nf_tables-backed ``iptables-restore``; iptables_legacy writes with
python-iptables, which only sees the legacy tables. Which one a host needs is where its engine's
rules are (detect.iptables_backend); `get_backend` picks one by name.
"""

from __future__ import annotations

from netsetup.firewall.base import FirewallBackend


def get_backend(name: str) -> FirewallBackend:
    if name == "nft":
        from netsetup.firewall.iptables_nft import NftBackend

        return NftBackend()
    if name == "legacy":
        from netsetup.firewall.iptables_legacy import LegacyBackend

        return LegacyBackend()
    raise ValueError(f"unknown firewall backend {name!r}")
