"""How a reply arriving over UDP is judged forged.

Each defence is a small filter with one method, `verdict(upstream, reply, elapsed) -> reason or
None`; `ForgeryFilters` runs them in order (the order is data, see `build_filters`) and counts
every discard by upstream and reason. Replies that do not match the query at all (wrong source,
ID or question) never get here: the UDP upstream drops them first as "mismatch".
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import wire
from .statefile import write_atomically

BUILTIN_LIST = Path(__file__).with_name("data") / "forged-addresses.txt"
LEARNED_FILE = "forged-learned.json"  # in the state directory
# Reasons a discarded reply may teach its addresses, once a genuine reply has beaten it: those
# of the listed checks teach nothing new, and a mismatch never reaches the filters.
TEACHING_REASONS = frozenset({"no-edns", "too-fast"})
JSON_STEP = 2048  # addresses encoded at once in the learned file

log = logging.getLogger("dnsproxy")


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


class LearnedAddresses:
    """Addresses of replies proven forged, bounded, used by the address check like the list.

    Proven means: the reply lost to a later genuine reply to the same query (an OPT-less reply
    beaten by one with OPT, a too-fast one beaten by the real one). Guarded against an injector
    that tries to get real addresses blacklisted: an address the winning reply carries, or any
    genuine reply carried lately (a bounded set of those), is never learned, and a genuine reply
    (over TCP, where the UDP check does not apply) carrying a learned address unlearns it.
    """

    def __init__(self, size: int = 4096, genuine_size: int = 65536,
                 on_learn: Callable[[bytes], None] | None = None) -> None:
        self.size = size
        self.genuine_size = genuine_size
        self.addresses: OrderedDict[bytes, None] = OrderedDict()  # oldest learned first
        self.genuine: OrderedDict[bytes, None] = OrderedDict()  # least lately seen first
        self.on_learn = on_learn

    def __contains__(self, address: bytes) -> bool:
        return address in self.addresses

    def __len__(self) -> int:
        return len(self.addresses)

    def saw_genuine(self, addresses: Iterable[bytes]) -> None:
        genuine = self.genuine
        for address in addresses:
            genuine[address] = None
            genuine.move_to_end(address)
            self.addresses.pop(address, None)
        while len(genuine) > self.genuine_size:
            genuine.popitem(last=False)

    def learn(self, losers: Iterable[wire.Reply], winner: wire.Reply) -> int:
        """Learn what the replies that lost to `winner` carried; the number of new addresses."""
        self.saw_genuine(winner.addresses)
        added = 0
        for reply in losers:
            for address in reply.addresses:
                if address in self.genuine or address in self.addresses:
                    continue
                self.addresses[address] = None
                added += 1
                if self.on_learn is not None:
                    self.on_learn(address)
        while len(self.addresses) > self.size:
            self.addresses.popitem(last=False)
        return added

    # --- kept in the state directory ---

    def snapshot(self) -> tuple[list[bytes], list[bytes]]:
        """The learned and the genuine addresses, for `write_learned` in a thread; taken on
        the event loop in under a millisecond. Through dict's own views: walking the
        OrderedDicts' linked lists took 7 ms at 65k addresses. The genuine ones thus come in
        the order first seen rather than last seen."""
        return list(dict.keys(self.addresses)), list(dict.keys(self.genuine))

    def load(self, path: str) -> int:
        """Read a saved file; a missing one is no news, a damaged one ignored with one warning
        (learning starts afresh). The number of learned addresses read."""
        try:
            with open(path, encoding="utf-8") as handle:
                doc = json.load(handle)
            if not isinstance(doc, dict) or doc.get("version") != 1:
                raise ValueError("not a learned-address file of version 1")
            learned = [ipaddress.ip_address(a).packed for a in doc["learned"]]
            genuine = [ipaddress.ip_address(a).packed for a in doc["genuine"]]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("learned forged addresses %s ignored: %s", path, exc)
            return 0
        self.saw_genuine(genuine[-self.genuine_size:])
        for address in learned[-self.size:]:
            if address not in self.genuine:
                self.addresses[address] = None
        return len(self.addresses)


def write_learned(path: str, learned: list[bytes], genuine: list[bytes]) -> None:
    """Atomically (a temporary file renamed over the old one), as the cache file is. Run by the
    writer thread: the JSON is encoded a slice at a time, since json.dumps of 65k addresses in
    one call held the GIL, and so the event loop, 13 ms."""
    def array(addresses: list[bytes]) -> str:
        texts = [str(ipaddress.ip_address(a)) for a in addresses]
        return "[" + ",".join(json.dumps(texts[i:i + JSON_STEP], separators=(",", ":"))[1:-1]
                              for i in range(0, len(texts), JSON_STEP)) + "]"

    doc = f'{{"version":1,"learned":{array(learned)},"genuine":{array(genuine)}}}'
    write_atomically(path, doc.encode())


class ForgedAddresses:
    """An A/AAAA answer with an address injectors are known to use, or one learned from a
    forgery caught earlier, is forged."""

    reason = "forged-address"
    learned_reason = "learned-address"

    def __init__(self, addresses: set[bytes], learned: LearnedAddresses | None = None) -> None:
        self.addresses = addresses
        self.learned = learned

    def verdict(self, upstream: UpstreamView, reply: wire.Reply, elapsed: float) -> str | None:
        if self.addresses and any(a in self.addresses for a in reply.addresses):
            return self.reason
        learned = self.learned
        if learned and any(a in learned for a in reply.addresses):
            return self.learned_reason
        return None


class HijackThreshold:
    """A reply faster than the upstream can physically answer came from something closer."""

    reason = "too-fast"

    def verdict(self, upstream: UpstreamView, reply: wire.Reply, elapsed: float) -> str | None:
        if upstream.hijack_threshold and elapsed < upstream.hijack_threshold:
            return self.reason
        return None


class ForgeryFilters:
    def __init__(self, filters: list[Filter], learner: LearnedAddresses | None = None) -> None:
        self.filters = filters
        # Where UDP exchanges report forgeries beaten by a genuine reply; None: they teach
        # nothing (learning off, or a domestic upstream, whose genuine answers may be poisoned).
        self.learner = learner

    def has(self, kind: type) -> bool:
        return any(isinstance(f, kind) for f in self.filters)

    def without(self, kind: type) -> ForgeryFilters:
        """The same filters but one kind: the EDNS marker means nothing for a query sent
        without OPT."""
        return ForgeryFilters([f for f in self.filters if not isinstance(f, kind)], self.learner)

    def not_teaching(self) -> ForgeryFilters:
        """The same checks, learned addresses included, but reporting nothing to learn."""
        return ForgeryFilters(self.filters)

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


def build_filters(edns_marker: bool, forged: set[bytes] | None, hijack: bool,
                  learned: LearnedAddresses | None = None) -> ForgeryFilters:
    """Cheapest first: the OPT check is one comparison, the address check a set lookup."""
    filters: list[Filter] = []
    if edns_marker:
        filters.append(EdnsMarker())
    if forged or learned is not None:
        filters.append(ForgedAddresses(forged or set(), learned))
    if hijack:
        filters.append(HijackThreshold())
    return ForgeryFilters(filters, learned)
