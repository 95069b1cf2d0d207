"""Hosts files (the /etc/hosts format), as answers ready to send.

A line is `ADDRESS NAME [ALIAS...]`, `#` starts a comment. Every name answers A or AAAA with
the addresses the files give it (in file order), and every address answers PTR with the first
name given to it (the canonical name of its first line). A name without an address of the
asked type has no record of it: NODATA, never forwarded, so a name the user pinned to an IPv4
address is not answered with a public AAAA. Names compare case-insensitively.

The records are built at load time, keyed on the lower-cased wire name (as the question key
holds it), so an answer is a dict lookup and a concatenation. A bad line is reported as
`FILE:LINE: why`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from . import wire
from .domainlists import read_text, to_wire

TYPE_PTR = 12
HOSTS_TTL = 60  # seconds: a SIGHUP's changes reach clients within a minute


class HostsError(ValueError):
    """A line that is not `ADDRESS NAME...`, or a file that cannot be read."""


@dataclass
class HostsTable:
    # Name (wire, lower-cased) -> {qtype: (records, count)}; a name's other types are NODATA.
    entries: dict[bytes, dict[int, tuple[bytes, int]]] = field(default_factory=dict)
    names: int = 0  # names with addresses (for the start-up log)
    addresses: int = 0
    files: list[str] = field(default_factory=list)


def _address(text: str) -> bytes:
    """Packed; an IPv6 zone (`fe80::1%eth0`, as some systems' files have) is dropped."""
    return ipaddress.ip_address(text).packed


def load(paths: list[str], ttl: int = HOSTS_TTL) -> HostsTable:
    """Read every file; HostsError on the first bad line, naming its file and line."""
    forward: dict[bytes, list[bytes]] = {}  # name -> addresses, in file order
    pointers: dict[bytes, bytes] = {}  # address -> the first name given to it
    packed_of: dict[str, bytes] = {}  # blocking lists repeat one address thousands of times
    table = HostsTable()
    for path in paths:
        table.files.append(path)
        for number, raw in enumerate(read_text(path, "hosts", HostsError).splitlines(), 1):
            fields = raw.split("#", 1)[0].split()
            if not fields:
                continue
            text = fields[0]
            packed = packed_of.get(text)
            if packed is None:
                try:
                    packed = packed_of[text] = _address(text)
                except ValueError:
                    raise HostsError(f"{path}:{number}: not an IP address: {text!r}") from None
            if len(fields) == 1:
                raise HostsError(f"{path}:{number}: {text} has no name")
            names = []
            for name in fields[1:]:
                try:
                    names.append(to_wire(name))
                except ValueError as exc:
                    raise HostsError(f"{path}:{number}: {exc}") from None
            pointers.setdefault(packed, names[0])
            for name in names:
                known = forward.setdefault(name, [])
                if packed not in known:
                    known.append(packed)
    for name, addresses in forward.items():
        entry: dict[int, tuple[bytes, int]] = {}
        for rtype, size in ((wire.TYPE_A, 4), (wire.TYPE_AAAA, 16)):
            of_type = [a for a in addresses if len(a) == size]
            if of_type:
                entry[rtype] = (b"".join(wire.resource_record(rtype, wire.CLASS_IN, ttl, a)
                                         for a in of_type), len(of_type))
        table.entries[name] = entry
    for packed, name in pointers.items():
        reverse = to_wire(ipaddress.ip_address(packed).reverse_pointer)
        record = wire.resource_record(TYPE_PTR, wire.CLASS_IN, ttl, name)
        table.entries.setdefault(reverse, {})[TYPE_PTR] = (record, 1)
    table.names = len(forward)
    table.addresses = len(pointers)
    return table
