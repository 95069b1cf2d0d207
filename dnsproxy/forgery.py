"""How a reply arriving over UDP is judged forged.

Each defence is a small filter with one method, `verdict(upstream, reply, elapsed) -> reason or
None`; `ForgeryFilters` runs them in order (the order is data, see `build_filters`) and counts
every discard by upstream and reason. Replies that do not match the query at all (wrong source,
ID or question) never get here: the UDP upstream drops them first as "mismatch".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import wire

BUILTIN_LIST = Path(__file__).with_name("data") / "forged-addresses.txt"


class UpstreamView(Protocol):
    """What the filters know of the upstream a reply claims to come from."""

    name: str
    hijack_threshold: float  # seconds; 0 turns the check off
    edns: EdnsState


@dataclass(slots=True)
class EdnsState:
    """Whether an upstream echoes our OPT record, learned from its genuine replies only.

    It starts unknown; one genuine reply with an OPT settles it to True. An OPT-less reply from
    an unknown upstream is held a moment while the question also goes over TCP, which an
    injector cannot answer in-path: only genuine replies teach, in either direction, and after
    several in a row without an OPT we conclude the upstream does not speak EDNS. Timeouts and
    discarded replies teach nothing: an injector that drops genuine replies must not be able to
    switch the check off. One object per upstream, kept across reloads.
    """

    speaks_edns: bool | None = None
    plain_replies: int = 0  # genuine OPT-less replies in a row
    # Until then (time.monotonic()) ask without OPT: the upstream answered a query with one
    # FORMERR or NOTIMP, over a path the defences trust (RFC 6891 section 7).
    no_opt_until: float = 0.0
    PLAIN_REPLIES_TO_DECIDE: int = field(default=3, repr=False)
    NO_OPT_SECONDS: float = field(default=900.0, repr=False)  # then try OPT again

    def saw_genuine(self, has_opt: bool) -> None:
        if has_opt:
            self.speaks_edns = True
            self.plain_replies = 0
            return
        self.plain_replies += 1
        if self.plain_replies >= self.PLAIN_REPLIES_TO_DECIDE:
            self.speaks_edns = False  # also a resolver replaced by one that drops OPT

    def asks_with_opt(self, now: float) -> bool:
        return now >= self.no_opt_until

    def refused_opt(self, now: float) -> None:
        """A trusted FORMERR/NOTIMP to a query with OPT: ask without it for a while."""
        self.no_opt_until = now + self.NO_OPT_SECONDS


class Filter(Protocol):
    reason: str

    def verdict(self, upstream: UpstreamView, reply: wire.Reply, elapsed: float) -> str | None: ...


class EdnsMarker:
    """A reply without OPT from an upstream that answers with one is forged."""

    reason = "no-edns"

    def verdict(self, upstream: UpstreamView, reply: wire.Reply, elapsed: float) -> str | None:
        if reply.opt is None and upstream.edns.speaks_edns:
            return self.reason
        return None


class ForgedAddresses:
    """An A/AAAA answer with an address injectors are known to use is forged."""

    reason = "forged-address"

    def __init__(self, addresses: set[bytes]) -> None:
        self.addresses = addresses

    def verdict(self, upstream: UpstreamView, reply: wire.Reply, elapsed: float) -> str | None:
        if self.addresses and any(a in self.addresses for a in reply.addresses):
            return self.reason
        return None


class HijackThreshold:
    """A reply faster than the upstream can physically answer came from something closer."""

    reason = "too-fast"

    def verdict(self, upstream: UpstreamView, reply: wire.Reply, elapsed: float) -> str | None:
        if upstream.hijack_threshold and elapsed < upstream.hijack_threshold:
            return self.reason
        return None


class ForgeryFilters:
    def __init__(self, filters: list[Filter]) -> None:
        self.filters = filters

    def has(self, kind: type) -> bool:
        return any(isinstance(f, kind) for f in self.filters)

    def without(self, kind: type) -> ForgeryFilters:
        """The same filters but one kind: the EDNS marker means nothing for a query sent
        without OPT."""
        return ForgeryFilters([f for f in self.filters if not isinstance(f, kind)])

    def verdict(self, upstream: UpstreamView, reply: wire.Reply, elapsed: float) -> str | None:
        for f in self.filters:
            reason = f.verdict(upstream, reply, elapsed)
            if reason:
                return reason
        return None


def load_forged_addresses(extra: list[str] = (), files: list[str] = (),
                          builtin: bool = True) -> set[bytes]:
    """The shipped list plus the user's, as packed bytes (what the reply walker yields)."""
    lines: list[tuple[str, str]] = []
    if builtin:
        text = BUILTIN_LIST.read_text(encoding="utf-8")
        lines += [("built-in list", line) for line in text.splitlines()]
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                lines += [(path, line) for line in handle.read().splitlines()]
        except OSError as exc:
            raise ValueError(f"cannot read forged-address file {path}: {exc.strerror}") from None
    lines += [("option", item) for item in extra]
    out: set[bytes] = set()
    for origin, line in lines:
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            out.add(ipaddress.ip_address(text).packed)
        except ValueError:
            raise ValueError(f"{origin}: not an IP address: {text!r}") from None
    return out


def build_filters(edns_marker: bool, forged: set[bytes] | None, hijack: bool) -> ForgeryFilters:
    """Cheapest first: the OPT check is one comparison, the address check a set lookup."""
    filters: list[Filter] = []
    if edns_marker:
        filters.append(EdnsMarker())
    if forged:
        filters.append(ForgedAddresses(forged))
    if hijack:
        filters.append(HijackThreshold())
    return ForgeryFilters(filters)
