"""Firewall rules as values, shared by every backend.

A rule is data (table, chain, matches, target, comment) rather than a command line, so the plan can
be printed, compared with golden files and handed to either backend: the nf_tables one renders it
as an ``iptables-restore`` line, the legacy one turns it into a python-iptables rule. Only the
matches this tool needs are modelled; each renders in the order ``iptables-save`` prints it, so a
rendered rule can be found verbatim in a save dump (that is how backends tell what is present).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Every rule we write carries a comment starting with this tag: a reader of `iptables-save`
# sees who put it there, and `status` finds our rules by it.
COMMENT_TAG = "netsetup"
# Every chain of ours starts with this, one per project (plan.own_chains).
CHAIN_PREFIX = "NETSETUP-"


def is_netsetup_hook(target: str, comment: str | None) -> bool:
    """A jump into a chain of any deployment of ours (this project's or another's), as our
    tools write it: such a rule may sit above a hook of ours, anything else may not."""
    return target.startswith(CHAIN_PREFIX) and (comment or "").startswith(f"{COMMENT_TAG}:")


@dataclass(frozen=True)
class Chain:
    """A chain of our own: created by `up`, flushed and rewritten as a whole, deleted by `down`."""

    table: str
    name: str


@dataclass(frozen=True)
class Rule:
    """One iptables rule. Fields prefixed ``not_`` negate the match of the same name."""

    table: str
    chain: str
    target: str
    comment: str
    source: str | None = None
    not_source: bool = False
    destination: str | None = None
    not_destination: bool = False
    in_interface: str | None = None
    not_in_interface: bool = False
    out_interface: str | None = None
    not_out_interface: bool = False
    protocol: str | None = None
    dport: int | None = None
    ctstate: str | None = None
    # DNAT's --to-destination (ADDRESS:PORT, or [ADDRESS]:PORT for IPv6), printed after the
    # target as iptables-save does.
    to_destination: str | None = None
    # Position for rules in chains we do not own (hooks): 1 means "first", None means append.
    position: int | None = None

    def spec(self) -> list[str]:
        """The rule's match and target arguments, in iptables-save order (without -A/-I)."""
        args: list[str] = []

        def neg(flag: bool) -> list[str]:
            return ["!"] if flag else []

        if self.source:
            args += [*neg(self.not_source), "-s", _cidr(self.source)]
        if self.destination:
            args += [*neg(self.not_destination), "-d", _cidr(self.destination)]
        if self.in_interface:
            args += [*neg(self.not_in_interface), "-i", self.in_interface]
        if self.out_interface:
            args += [*neg(self.not_out_interface), "-o", self.out_interface]
        if self.protocol:
            args += ["-p", self.protocol]
        if self.protocol and self.dport is not None:
            args += ["-m", self.protocol, "--dport", str(self.dport)]
        if self.ctstate:
            args += ["-m", "conntrack", "--ctstate", self.ctstate]
        args += ["-m", "comment", "--comment", _quote(f"{COMMENT_TAG}: {self.comment}")]
        args += ["-j", self.target]
        if self.to_destination:
            args += ["--to-destination", self.to_destination]
        return args

    def render_append(self) -> str:
        """The rule as iptables-save prints it: ``-A CHAIN ...``."""
        return " ".join(["-A", self.chain, *self.spec()])

    def render_add(self) -> str:
        """The restore line that adds the rule: insert at its position, or append."""
        if self.position is not None:
            return " ".join(["-I", self.chain, str(self.position), *self.spec()])
        return self.render_append()


@dataclass
class FirewallPlan:
    """Our chains with their full contents, plus the hooks that jump into them from built-ins.

    Own chains are rewritten whole on every `up` (idempotent by construction); hooks are the only
    rules placed in chains we do not own, added once and only when missing.
    """

    chains: list[Chain] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    hooks: list[Rule] = field(default_factory=list)
    # 4: iptables, 6: ip6tables. The two families' tables are separate: the same chain name
    # in each, written by the same backend kind for the family (firewall.get_backend).
    family: int = 4

    def tables(self) -> list[str]:
        seen: list[str] = []
        for item in [*self.chains, *self.rules, *self.hooks]:
            if item.table not in seen:
                seen.append(item.table)
        return seen

    def own_names(self, table: str) -> set[str]:
        return {c.name for c in self.chains_in(table)}

    def chains_in(self, table: str) -> list[Chain]:
        return [c for c in self.chains if c.table == table]

    def rules_in(self, table: str) -> list[Rule]:
        return [r for r in self.rules if r.table == table]

    def hooks_in(self, table: str) -> list[Rule]:
        return [r for r in self.hooks if r.table == table]


def _cidr(address: str) -> str:
    """iptables-save prints a host address as /32 (ip6tables-save as /128); keep ours in the
    same shape."""
    if "/" in address:
        return address
    return f"{address}/128" if ":" in address else f"{address}/32"


def _quote(text: str) -> str:
    """Quote a comment the way iptables-save does (only when it contains spaces or quotes)."""
    if any(ch in text for ch in " \"'\\"):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text
