"""A network namespace for the household run's upstream, one veth pair away, behind netem.

The upstream lives in a namespace of its own so that `tc netem` can delay its replies on its own
interface without touching the host's loopback (where the forwarders and the client talk). The
host side keeps 198.18.N.1/30, the namespace 198.18.N.2/30 (RFC 2544's benchmark range); N is
the first /30 not already in use. Needs root. Everything is removed by `close()`, which the
caller runs in a `finally` (deleting the namespace also deletes both ends of the veth pair).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess

from .servers import BenchError, say

PREFIX = "dnsbench"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why the namespace cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespace, veth pair, tc netem)"
    for tool in ("ip", "tc"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"no `{tool}` command (Debian: iproute2)"
    return None


def free_link() -> tuple[str, str]:
    """A /30 in 198.18.0.0/24 no interface holds an address of: (host address, namespace
    address)."""
    used = set()
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).ip)
    for net in ipaddress.ip_network("198.18.0.0/24").subnets(new_prefix=30):
        host, inner = list(net.hosts())
        if host not in used and inner not in used:
            return str(host), str(inner)
    raise BenchError("no free /30 in 198.18.0.0/24")


class Namespace:
    """The namespace, its veth pair and the netem qdisc on the namespace's end."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"{PREFIX}-{tag}"
        self.host_if = f"dbh{tag}"  # interface names: at most 15 characters
        self.inner_if = f"dbn{tag}"
        self.host_ip, self.inner_ip = "", ""
        self.delay_ms: float | None = None
        self.made = False

    def open(self) -> Namespace:
        self.host_ip, self.inner_ip = free_link()
        say(f"namespace {self.name}: host {self.host_ip}, upstream {self.inner_ip}")
        _ip("netns", "add", self.name)
        self.made = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.inner_if)
        _ip("link", "set", self.inner_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.inner_ip}/30", "dev", self.inner_if)
        _ip("-n", self.name, "link", "set", self.inner_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def set_delay(self, ms: float) -> bool:
        """Delay everything the upstream sends (its replies) by `ms` with netem: the round trip
        the forwarders see. A large queue limit, so netem never drops at these rates. False when
        the kernel has no netem (then the upstream has to hold its replies itself)."""
        verb = "change" if self.delay_ms is not None else "add"
        done = subprocess.run(["ip", "netns", "exec", self.name, "tc", "qdisc", verb, "dev",
                               self.inner_if, "root", "netem", "delay", f"{ms:g}ms",
                               "limit", "100000"], capture_output=True, text=True)
        if done.returncode != 0:
            if "unknown" in done.stderr.lower() and self.delay_ms is None:
                return False  # "Specified qdisc kind is unknown": built without sch_netem
            raise BenchError(f"tc netem on {self.inner_if}: {done.stderr.strip()}")
        self.delay_ms = ms
        return True

    def exec_argv(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace (ip netns exec execs it: the PID stays the same)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        """Remove the namespace (and with it the veth pair and the qdisc). Idempotent."""
        if not self.made:
            return
        _ip("netns", "del", self.name, check=False)
        if _ip("link", "show", self.host_if, check=False).returncode == 0:
            _ip("link", "del", self.host_if, check=False)
        self.made = False
        say(f"namespace {self.name} removed")
