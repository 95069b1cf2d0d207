"""Firewall backends: one rule model (model.py), one backend per way of writing it.

iptables_nft writes through the nf_tables-backed ``iptables-restore``; iptables_legacy writes with
python-iptables, which only sees the legacy tables. Which one a host needs is where its engine's
rules are (detect.iptables_backend); `get_backend` picks one by name and address family: IPv6
rules go to ip6tables of the same flavour, through the same restore code (legacy IPv6 too: see
iptables_legacy.LegacyRestoreBackend for why not python-iptables).
"""

from __future__ import annotations

from netsetup.firewall.base import FirewallBackend


def get_backend(name: str, family: int = 4) -> FirewallBackend:
    """The backend `name` for one address family: 4 writes iptables, 6 ip6tables (the same
    flavour as the engine's: Docker uses the ip6tables beside the iptables it uses)."""
    if family not in (4, 6):
        raise ValueError(f"unknown address family {family!r}")
    if name == "nft":
        from netsetup.firewall.iptables_nft import NftBackend

        return NftBackend(family)
    if name == "legacy":
        from netsetup.firewall.iptables_legacy import LegacyBackend, LegacyRestoreBackend

        return LegacyBackend() if family == 4 else LegacyRestoreBackend()
    raise ValueError(f"unknown firewall backend {name!r}")
