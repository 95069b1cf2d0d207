"""Kernel settings through /proc/sys, in the network namespace of the calling process.

Reading /proc/sys/net from a process shows that process's namespace, so netsetup run under
``nsenter -n`` changes the settings of that namespace only. `set_value` returns the previous value
so that `down` can put back exactly what was there. The host service runs in a container whose
/proc/sys is read-only; it gets the host's /proc/sys/net bind-mounted elsewhere and names that
root in NETSETUP_PROC_SYS (only net.* is writable there).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROC_SYS = Path(os.environ.get("NETSETUP_PROC_SYS", "/proc/sys"))


_KEY = re.compile(r"net(\.[A-Za-z0-9_@-]+){2,}")


def _path(key: str) -> Path:
    """The file of a dotted key. Per-interface keys (net.ipv4.conf.IF.x, net.ipv4.neigh.IF.x)
    keep the dots of the interface name: a VLAN is eth0.100, whose directory is "eth0.100".
    Only net.* keys, as names: a key read back from a report must not name any other file."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a network sysctl: {key!r}")
    parts = key.split(".")
    if len(parts) > 5 and parts[0] == "net" and parts[2] in ("conf", "neigh"):
        parts = [*parts[:3], ".".join(parts[3:-1]), parts[-1]]
    return PROC_SYS.joinpath(*parts)


def interfaces(family: int) -> list[str]:
    """The interfaces /proc/sys lists for the family (its conf directory), but `all` and
    `default`, and any whose name would not make a key (_KEY)."""
    conf = PROC_SYS / "net" / f"ipv{family}" / "conf"
    try:
        names = [p.name for p in conf.iterdir() if p.name not in ("all", "default")]
    except OSError:
        return []
    return sorted(n for n in names if _KEY.fullmatch(f"net.ipv{family}.conf.{n}.forwarding"))


def get(key: str) -> str:
    return _path(key).read_text().strip()


def set_value(key: str, value: str) -> str:
    """Write `value`; return the old value (unchanged settings are not written)."""
    old = get(key)
    if old != value:
        _path(key).write_text(value + "\n")
    return old
