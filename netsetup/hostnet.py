"""Neighbour proxy entries and host routes: LAN address mode's share of the plan, and its backend.

LAN address mode makes the host answer ARP for LAN_IP with its own MAC address. The kernel does
that for a proxy entry (``ip neigh add proxy LAN_IP dev LAN_IF``) only when its route to LAN_IP
leaves by another interface, hence the host route ``LAN_IP/32 dev BRIDGE``; that route also
sends whatever for LAN_IP is not DNATed (anything but DNS) into the bridge, where the filter
chain's default deny drops it. LAN_IP6 gets the same pair: a proxy NDP entry (the kernel answers
neighbour solicitations for it where the interface forwards and has proxy_ndp on) and a /128
route into the bridge, for the same reason: without it, what is not DNATed would be routed back
out of the LAN interface it came in by. All are values here, like firewall rules
(firewall/model.py): the plan lists them, `--dry-run` prints them, and this backend applies,
checks and removes them through netlink (pyroute2), idempotently: adding what is there or
deleting what is not is a no-op.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from netsetup.errors import NetsetupError

NTF_PROXY = 0x08  # linux/neighbour.h: the entry is a proxy entry (pneigh)
NDA_DST = 1
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30  # linux/rtnetlink.h
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
SCOPE_LINK = 253  # a route with no gateway; deletion must name it (pyroute2 sends 0 otherwise)
RTPROT_STATIC = 4  # routes we add are "static", as `ip route add` marks them


class HostNetFailed(NetsetupError):
    """A netlink change was refused (no such interface, no permission)."""


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _ip(family: int) -> str:
    return "ip -6" if family == socket.AF_INET6 else "ip"


@dataclass(frozen=True)
class ProxyNeighbour:
    """The host answers ARP (IPv4) or neighbour solicitations (IPv6) for `address` on
    `interface` with its own MAC address."""

    address: str  # as ipaddress prints it: what the kernel's entries are compared with
    interface: str

    @property
    def family(self) -> int:
        return family_of(self.address)

    def render(self) -> str:
        return f"{_ip(self.family)} neigh add proxy {self.address} dev {self.interface}"


@dataclass(frozen=True)
class HostRoute:
    """A host route ``destination dev interface`` (no gateway)."""

    destination: str  # ADDRESS/32 or ADDRESS/128
    interface: str

    @property
    def family(self) -> int:
        return family_of(self.destination)

    @property
    def scope(self) -> int:
        """IPv4 routes without a gateway are scope link; IPv6 ones universe, as `ip` makes
        them (deletion must name the scope: pyroute2 sends 0 otherwise)."""
        return SCOPE_LINK if self.family == socket.AF_INET else 0

    def render(self) -> str:
        return f"{_ip(self.family)} route add {self.destination} dev {self.interface}"


@contextmanager
def _ipr() -> Iterator[Any]:
    from pyroute2 import IPRoute  # noqa: PLC0415 - loaded late, like detect.py

    with IPRoute() as ipr:
        yield ipr


def _index(ipr: Any, interface: str) -> int | None:
    found = ipr.link_lookup(ifname=interface)
    return found[0] if found else None


def proxy_entries(ipr: Any = None) -> set[tuple[str, int]]:
    """Every proxy entry of this namespace, IPv4 and IPv6, as (address, interface index).

    The kernel lists proxy entries only for a dump request whose ndmsg flags are exactly
    NTF_PROXY; pyroute2's dump does not put the flags in the request (0.9 filters replies on
    our side instead), so this one request is made on a plain netlink socket. Family
    AF_UNSPEC: the kernel walks the ARP and the NDP table both.
    """
    request = struct.pack("=BxxxiHBB", socket.AF_UNSPEC, 0, 0, NTF_PROXY, 0)
    header = struct.pack("=IHHII", 16 + len(request), RTM_GETNEIGH,
                         NLM_F_REQUEST | NLM_F_DUMP, 1, 0)  # fmt: skip
    found: set[tuple[str, int]] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.send(header + request)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + 16)[0]
                    raise HostNetFailed(f"listing proxy neighbours: {os.strerror(code)}")
                if kind == RTM_NEWNEIGH:
                    found |= _proxy_entry(data[offset + 16 : offset + length])
                offset += (length + 3) & ~3
                if length == 0:
                    break


def _proxy_entry(body: bytes) -> set[tuple[str, int]]:
    family, index, _state, flags, _type = struct.unpack_from("=BxxxiHBB", body)
    offset = 12
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if length < 4:
            break
        size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
        if kind == NDA_DST and size and flags & NTF_PROXY:
            address = socket.inet_ntop(family, body[offset + 4 : offset + 4 + size])
            return {(address, index)}
        offset += (length + 3) & ~3
    return set()


def has_proxy(entry: ProxyNeighbour) -> bool:
    with _ipr() as ipr:
        index = _index(ipr, entry.interface)
    return index is not None and (entry.address, index) in proxy_entries()


def _route_present(ipr: Any, route: HostRoute, index: int) -> bool:
    address, prefix = route.destination.split("/")
    for msg in ipr.get_routes(family=route.family, table=254):
        if (
            msg["dst_len"] == int(prefix)
            and msg.get_attr("RTA_DST") == address
            and msg.get_attr("RTA_OIF") == index
        ):
            return True
    return False


def state(neighbours: list[ProxyNeighbour], routes: list[HostRoute]) -> dict[str, bool]:
    """Which of the planned entries are in place, by their rendered command."""
    out: dict[str, bool] = {}
    with _ipr() as ipr:
        proxies = proxy_entries()
        for entry in neighbours:
            index = _index(ipr, entry.interface)
            out[entry.render()] = index is not None and (entry.address, index) in proxies
        for route in routes:
            index = _index(ipr, route.interface)
            out[route.render()] = index is not None and _route_present(ipr, route, index)
    return out


def apply(neighbours: list[ProxyNeighbour], routes: list[HostRoute]) -> list[str]:
    """Add what is missing; return what was added (empty: all was in place)."""
    added: list[str] = []
    with _ipr() as ipr:
        proxies = proxy_entries()
        for entry in neighbours:
            index = _require(ipr, entry.interface, entry.render())
            if (entry.address, index) not in proxies:
                _call(entry.render(), ipr.neigh, "add", dst=entry.address, ifindex=index,
                      flags=NTF_PROXY, family=entry.family)  # fmt: skip
                added.append(entry.render())
        for route in routes:
            index = _require(ipr, route.interface, route.render())
            if not _route_present(ipr, route, index):
                # "replace": a route to the same /32 by another device is ours to correct
                _call(route.render(), ipr.route, "replace", dst=route.destination, oif=index,
                      family=route.family, scope=route.scope, proto=RTPROT_STATIC)  # fmt: skip
                added.append(route.render())
    return added


def remove(neighbours: list[ProxyNeighbour], routes: list[HostRoute]) -> None:
    """Delete the given entries; absent ones (or gone with their interface) are skipped."""
    with _ipr() as ipr:
        proxies = proxy_entries()
        for entry in neighbours:
            index = _index(ipr, entry.interface)
            if index is not None and (entry.address, index) in proxies:
                _call(entry.render(), ipr.neigh, "del", dst=entry.address, ifindex=index,
                      flags=NTF_PROXY, family=entry.family, missing_ok=True)  # fmt: skip
        for route in routes:
            index = _index(ipr, route.interface)
            if index is not None and _route_present(ipr, route, index):
                _call(route.render(), ipr.route, "del", dst=route.destination, oif=index,
                      family=route.family, scope=route.scope, missing_ok=True)  # fmt: skip


def _require(ipr: Any, interface: str, what: str) -> int:
    index = _index(ipr, interface)
    if index is None:
        raise HostNetFailed(f"{what}: interface {interface} not found")
    return index


def _call(what: str, func: Any, *args: Any, missing_ok: bool = False, **kwargs: Any) -> None:
    from pyroute2 import NetlinkError  # noqa: PLC0415

    try:
        func(*args, **kwargs)
    except NetlinkError as exc:
        if missing_ok and exc.code in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
            return
        raise HostNetFailed(f"{what} failed: {exc.args[-1] if exc.args else exc}") from exc
