"""Kernel settings through /proc/sys, in the network namespace of the calling process.

Reading /proc/sys/net from a process shows that process's namespace, so netsetup run under
``nsenter -n`` changes the settings of that namespace only. `set_value` returns the previous value
so that `down` can put back exactly what was there. The host service runs in a container whose
/proc/sys is read-only; it gets the host's /proc/sys/net bind-mounted elsewhere and names that
root in NETSETUP_PROC_SYS (only net.* is writable there).
"""

from __future__ import annotations

import os
from pathlib import Path

PROC_SYS = Path(os.environ.get("NETSETUP_PROC_SYS", "/proc/sys"))


def _path(key: str) -> Path:
    """The file of a dotted key. Per-interface keys (net.ipv4.conf.IF.x, net.ipv4.neigh.IF.x)
    keep the dots of the interface name: a VLAN is eth0.100, whose directory is "eth0.100"."""
    parts = key.split(".")
    if len(parts) > 5 and parts[0] == "net" and parts[2] in ("conf", "neigh"):
        parts = [*parts[:3], ".".join(parts[3:-1]), parts[-1]]
    return PROC_SYS.joinpath(*parts)


def get(key: str) -> str:
    return _path(key).read_text().strip()


def set_value(key: str, value: str) -> str:
    """Write `value`; return the old value (unchanged settings are not written)."""
    old = get(key)
    if old != value:
        _path(key).write_text(value + "\n")
    return old
