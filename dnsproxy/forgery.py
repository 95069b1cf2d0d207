"""How a reply is judged forged, on every transport, and what a caught forgery teaches.

Each defence is a small filter with one method, `verdict(upstream, reply, elapsed) -> reason or
None`; `ForgeryFilters` runs them in order (the order is data, see `build_filters`). Replies that
do not match the query at all (wrong source, ID or question) never get here: the transports drop
them first as "mismatch". The same `ForgeryFilters.verdict` judges every transport; which
filters a transport gets is decided here (`for_stream`), not in the transports:

- UDP (the first ask): every filter. An on-path injector races the genuine reply here.
- TCP (the UDP upstream's retry, `tcp://` upstreams): the address lists, shipped, operator's
  and learned. An injector cannot write into a TCP stream it does not sit in, so the EDNS
  marker and the hijack threshold, which tell a racing injector from the upstream, say nothing
  here; but the upstream itself may be poisoned (a domestic resolver hands out over TCP the very
  answer the injector gave it over UDP), and its reply carries the injector's addresses then.
- TLS and HTTPS: the shipped and the operator's lists, not the learned one. The operator's word
  holds everywhere (a domestic DoT resolver can lie too, and an operator who lists an address
  means "never serve it"). The learned list is what an injector taught us over UDP: applied to a
  channel it cannot touch, it would let an injector that got a real address learned (see below)
  make that address unreachable even over the one path it cannot reach.

A reply any filter condemns is discarded and counted (`dnsproxy_forgeries_total`, by upstream
and reason) and logged, on every transport alike; over TCP, TLS and HTTPS the next upstream is
asked (the UDP upstream's own TCP retry keeps listening on UDP instead, as when TCP fails).

What is learned, and what shields an address from being learned
---------------------------------------------------------------

`LearnedAddresses` learns the addresses of a forgery that is *proven*: a UDP reply the EDNS
marker or the hijack threshold discarded (or an OPT-less reply held, then beaten by one with
OPT) that lost to a later accepted reply to the same query. The injector chooses what it puts
in its forgeries, so learning alone would let it blacklist any real address. An address is
therefore shielded from learning when a reply the defences can vouch for carried it:

1. A reply over TCP, TLS or HTTPS that the filters above accepted shields its addresses for
   good (a bounded set, the least lately seen go first): an on-path injector cannot forge it.
2. The UDP reply that beat a caught forgery shields its addresses from that race's losers only.
   It is most likely genuine, but it may be a forgery that slipped (OPT, on time) winning
   against the injector's own OPT-less one; a shield for good would let one slipped forgery
   keep its address off the learned list forever. Within its own race it still keeps a genuine
   upstream that varies its replies (an anycast node without EDNS, a misjudged threshold) from
   teaching its own addresses.
3. A UDP reply that merely passed the filters shields nothing: a forgery shaped like a genuine
   reply passes them too, and would shield the very address a later provable forgery exposes.

A learned address is unlearned only by the trusted group's encrypted upstreams (TLS, HTTPS):
their reply carrying it is served, since the learned list does not judge that channel, and it
takes the address off the list and shields it (`vouch(..., unlearn=True)`, counted and logged).
Neither an on-path injector nor a poisoned resolver can speak there, so this is how a real
address an injector managed to get learned heals itself. A plaintext reply never unlearns: the
TCP reply carrying a learned address is discarded (a domestic resolver hands out over TCP the
very answer the injector gave it over UDP), and the domestic group vouches for nothing at all.
Without an encrypted upstream, what protects a real address is the shield above (taken before
any forgery used it) and the learned list's bound (the oldest of 4096 go first).

Only the trusted group teaches and shields (`ForgeryFilters.learner`): the domestic group's
accepted answers for blocked names are poisoned at their source, so they vouch for nothing.
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
# What the learned-address file says: version 1 counted every verified reply as a shield, slipped
# forgeries included, so its shields are not read (its learned addresses are).
LEARNED_VERSION = 2
JSON_STEP = 2048  # addresses encoded at once in the learned file

log = logging.getLogger("dnsproxy")


class UpstreamView(Protocol):
    """What the filters know of the upstream a reply claims to come from. Only UDP upstreams
    have a hijack threshold: the filters that read it never judge another transport."""

    name: str
    hijack_threshold: float  # seconds; 0 turns the check off
    edns: EdnsState


# What a server that does not know OPT answers a query carrying one (RFC 6891 section 7).
OPT_REFUSALS = (wire.FORMERR, wire.NOTIMP)


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
    """Addresses of replies proven forged, bounded, used by the address check like the list;
    and the addresses shielded from learning. The rules, and why, are in the module docstring.
    """

    def __init__(self, size: int = 4096, genuine_size: int = 65536,
                 on_learn: Callable[[list[bytes]], None] | None = None,
                 on_unlearn: Callable[[bytes], None] | None = None) -> None:
        self.size = size
        self.genuine_size = genuine_size
        self.addresses: OrderedDict[bytes, None] = OrderedDict()  # oldest learned first
        # Carried by a reply over TCP, TLS or HTTPS the filters accepted; least lately first.
        self.genuine: OrderedDict[bytes, None] = OrderedDict()
        self.on_learn = on_learn
        self.on_unlearn = on_unlearn

    def __contains__(self, address: bytes) -> bool:
        return address in self.addresses

    def __len__(self) -> int:
        return len(self.addresses)

    def vouch(self, addresses: Iterable[bytes], unlearn: bool = False) -> None:
        """What an accepted reply over a channel no on-path injector can forge carried: never
        learned from now on. A learned address stays learned unless `unlearn` (an encrypted
        reply of the trusted group; see the module docstring)."""
        genuine, learned = self.genuine, self.addresses
        for address in addresses:
            if address in learned:
                if not unlearn:
                    continue
                del learned[address]
                if self.on_unlearn is not None:
                    self.on_unlearn(address)
            genuine[address] = None
            genuine.move_to_end(address)
        while len(genuine) > self.genuine_size:
            genuine.popitem(last=False)

    def learn(self, losers: Iterable[wire.Reply], winner: wire.Reply) -> int:
        """Learn what the replies that lost to `winner` carried, but what `winner` carries
        too; the number of new addresses. `winner` shields only within this race: over UDP it
        may be a slipped forgery, and one over TCP was vouched for by its transport already."""
        shielded = winner.addresses
        added: list[bytes] = []
        for reply in losers:
            for address in reply.addresses:
                if (address in shielded or address in self.genuine
                        or address in self.addresses):
                    continue
                self.addresses[address] = None
                added.append(address)
        while len(self.addresses) > self.size:
            self.addresses.popitem(last=False)
        # Told once for the race: what follows (a purge of the cache) is one pass for all.
        if added and self.on_learn is not None:
            self.on_learn(added)
        return len(added)

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
            version = doc.get("version") if isinstance(doc, dict) else None
            if version not in (1, LEARNED_VERSION):
                raise ValueError(f"not a learned-address file of version {LEARNED_VERSION}")
            learned = [ipaddress.ip_address(a).packed for a in doc["learned"]]
            genuine = [ipaddress.ip_address(a).packed for a in doc["genuine"]]
            if version == 1:
                genuine = []  # shields of the old rule: a slipped forgery may have given one
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("learned forged addresses %s ignored: %s", path, exc)
            return 0
        self.vouch(genuine[-self.genuine_size:])
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

    doc = (f'{{"version":{LEARNED_VERSION},"learned":{array(learned)},'
           f'"genuine":{array(genuine)}}}')
    write_atomically(path, doc.encode())


class ForgedAddresses:
    """An A/AAAA answer with an address injectors are known to use (shipped or the operator's),
    or one learned from a forgery caught earlier, is forged."""

    reason = "forged-address"
    learned_reason = "learned-address"

    def __init__(self, addresses: set[bytes], learned: LearnedAddresses | None = None) -> None:
        self.addresses = addresses
        self.learned = learned

    def without_learned(self) -> ForgedAddresses:
        """The shipped and operator's lists only: for encrypted transports."""
        return ForgedAddresses(self.addresses)

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
        # Where UDP exchanges report forgeries beaten by a genuine reply, and stream transports
        # vouch for what they accepted; None: they teach nothing (learning off, or a domestic
        # upstream, whose accepted answers may be poisoned).
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

    def for_stream(self, encrypted: bool) -> ForgeryFilters:
        """What judges a reply over TCP (`encrypted` False), TLS or HTTPS: the address lists,
        the learned one over TCP only; the same learner, to vouch for what passes. See the
        module docstring for why."""
        kept: list[Filter] = []
        for f in self.filters:
            if isinstance(f, ForgedAddresses):
                kept.append(f.without_learned() if encrypted else f)
        return ForgeryFilters(kept, self.learner)

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
