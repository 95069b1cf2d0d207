"""The legacy backend: python-iptables (libiptc) for hosts whose iptables is legacy.

libiptc works on a copy of a whole table and commits it in one call, so with autocommit off each
table changes all or nothing, like the nft backend's restore. It sees only the legacy tables,
which is where Docker writes when the host's `iptables` is iptables-legacy.

A legacy commit replaces the whole table, so two writers at once lose one's change: the engine
adding a container's rules at boot while the host service puts ours back would lose the engine's.
iptables itself serializes writers with flock on /run/xtables.lock (`iptables --wait`, as Docker
calls it); libiptc does not, so the read-modify-commit below holds the same lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from netsetup.errors import FirewallFailed
from netsetup.firewall.base import FirewallBackend
from netsetup.firewall.iptables_nft import NftBackend
from netsetup.firewall.model import COMMENT_TAG, Chain, FirewallPlan, Rule, is_netsetup_hook


def _iptc() -> Any:
    try:
        import iptc  # noqa: PLC0415 - imported late: loading libiptc fails on hosts without it
    except Exception as exc:  # pragma: no cover - depends on the host's libraries
        raise FirewallFailed(f"python-iptables unavailable: {exc}") from exc
    return iptc


# iptables' own default and variable; the host service's container has the host's file mounted.
XTABLES_LOCK = "/run/xtables.lock"
LOCK_WAIT = 10.0  # seconds; iptables --wait waits forever, a sync rather retries later


@contextmanager
def xtables_lock(wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the lock iptables writers share, as `iptables --wait` does."""
    path = os.environ.get("XTABLES_LOCKFILE", XTABLES_LOCK)
    try:
        # A directory stands in where a bind mount found no file: flock works on it too.
        flags = os.O_RDONLY if os.path.isdir(path) else os.O_RDWR | os.O_CREAT
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise FirewallFailed(f"cannot open the xtables lock {path}: {exc.strerror}") from exc
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FirewallFailed(
                        f"another program has held the xtables lock {path} for {wait:g} s"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _neg(value: str, negate: bool) -> str:
    return f"!{value}" if negate else value


def to_iptc(rule: Rule) -> Any:
    """Build the python-iptables rule matching `rule` (same fields as the restore rendering)."""
    iptc = _iptc()
    r = iptc.Rule()
    if rule.source:
        r.src = _neg(rule.source, rule.not_source)
    if rule.destination:
        r.dst = _neg(rule.destination, rule.not_destination)
    if rule.in_interface:
        r.in_interface = _neg(rule.in_interface, rule.not_in_interface)
    if rule.out_interface:
        r.out_interface = _neg(rule.out_interface, rule.not_out_interface)
    if rule.protocol:
        # python-iptables knows a few protocols by name (tcp, udp, icmp...); others, such as
        # vrrp, by number, from /etc/protocols as iptables itself reads it
        r.protocol = (rule.protocol if rule.protocol in r.protocols.values()
                      else str(socket.getprotobyname(rule.protocol)))  # fmt: skip
        if rule.dport is not None:
            match = r.create_match(rule.protocol)
            match.dport = str(rule.dport)
    if rule.ctstate:
        match = r.create_match("conntrack")
        match.ctstate = rule.ctstate
    match = r.create_match("comment")
    match.comment = f"{COMMENT_TAG}: {rule.comment}"
    r.target = iptc.Target(r, rule.target)
    if rule.to_destination:
        r.target.to_destination = rule.to_destination
    return r


def _comment(r: Any) -> str | None:
    for match in r.matches:
        if match.name == "comment":
            return match.comment
    return None


class LegacyBackend(FirewallBackend):
    name = "legacy"
    save_command = ["iptables-legacy-save"]

    @contextmanager
    def _table(self, name: str) -> Iterator[Any]:
        """A table with autocommit off: changes are committed together, or dropped on error."""
        iptc = _iptc()
        with xtables_lock():
            table = iptc.Table(name)
            table.autocommit = False
            table.refresh()  # read under the lock: what we commit is what was there
            try:
                yield table
                table.commit()
            except Exception as exc:
                table.refresh()  # discard the uncommitted copy
                raise FirewallFailed(f"python-iptables, table {name}: {exc}") from exc
            finally:
                table.autocommit = True

    def describe(self, plan: FirewallPlan) -> str:
        out = ["# firewall: python-iptables, one commit per table"]
        for table in plan.tables():
            for chain in plan.chains_in(table):
                out.append(f"{table}: create or flush chain {chain.name}")
            for rule in plan.rules_in(table):
                out.append(f"{table}: {rule.render_append()}")
            for hook in plan.hooks_in(table):
                out.append(f"{table}: unless present: {hook.render_add()}")
            out.append(f"{table}: commit")
        return "\n".join(out) + "\n"

    def loaded(self, table: str) -> bool:
        """Legacy tables in use in this namespace; opening any other would load it."""
        try:
            names = Path("/proc/net/ip_tables_names").read_text().split()
        except OSError:
            return False
        return table in names

    def apply(self, plan: FirewallPlan) -> None:
        iptc = _iptc()
        for table_name in plan.tables():
            own = plan.own_names(table_name)
            wanted = {
                (hook.chain, hook.target, f"{COMMENT_TAG}: {hook.comment}")
                for hook in plan.hooks_in(table_name)
            }
            with self._table(table_name) as table:
                for chain in plan.chains_in(table_name):
                    if table.is_chain(chain.name):
                        iptc.Chain(table, chain.name).flush()
                    else:
                        table.create_chain(chain.name)
                for rule in plan.rules_in(table_name):
                    iptc.Chain(table, rule.chain).append_rule(to_iptc(rule))
                # Hooks into our chains: delete those the plan does not have; find the planned
                # ones, and which have a foreign rule above their first copy (base.py).
                found: dict[tuple[str, str, str | None], list[Any]] = {}
                below: set[tuple[str, str, str | None]] = set()
                for chain in table.chains:
                    if chain.name in own:
                        continue
                    foreign_above = False
                    for r in list(chain.rules):
                        target, comment = r.target.name, _comment(r)
                        if target not in own:
                            foreign_above |= not is_netsetup_hook(target, comment)
                            continue
                        key = (chain.name, target, comment)
                        if key not in wanted:
                            chain.delete_rule(r)
                            continue
                        if key not in found and foreign_above:
                            below.add(key)
                        found.setdefault(key, []).append(r)
                # One copy in place stays; otherwise every copy goes and one is inserted at its
                # position, in the same commit (never absent in between).
                for hook in plan.hooks_in(table_name):
                    key = (hook.chain, hook.target, f"{COMMENT_TAG}: {hook.comment}")
                    copies = found.get(key, [])
                    if len(copies) == 1 and not (hook.position == 1 and key in below):
                        continue
                    chain = iptc.Chain(table, hook.chain)
                    for r in copies:
                        chain.delete_rule(r)
                    if hook.position is None:
                        chain.append_rule(to_iptc(hook))
                    else:
                        chain.insert_rule(to_iptc(hook), position=hook.position - 1)

    def remove(self, chains: list[Chain]) -> None:
        iptc = _iptc()
        for table_name in dict.fromkeys(c.table for c in chains):
            own = {c.name for c in chains if c.table == table_name}
            with self._table(table_name) as table:
                for chain in table.chains:
                    if chain.name in own:
                        continue
                    for r in list(chain.rules):
                        if r.target.name in own:
                            chain.delete_rule(r)
                for name in sorted(own):
                    if table.is_chain(name):
                        iptc.Chain(table, name).flush()
                        table.delete_chain(name)


class LegacyRestoreBackend(NftBackend):
    """Legacy ip6tables, written by ``ip6tables-legacy-restore --noflush`` (the nf_tables
    backend's script, the legacy tools): one commit per table, all or nothing.

    Not python-iptables: libxtables registers an extension for the address family current when
    it is first loaded, so in one process whichever family loads DNAT first keeps it, and the
    other's ``Target(rule, "DNAT")`` fails with "can't find target DNAT" (checked with
    python-iptables 1.2.0 and iptables 1.8.9, in both orders). The host service writes both
    families every sync, so IPv6 goes through the tool. ``--wait`` takes the xtables lock that
    LegacyBackend holds by hand, so the two never write at once.
    """

    name = "legacy"
    describe_kind = "legacy tables; one commit per table"

    def __init__(self) -> None:
        super().__init__(6)
        self.save_command = ["ip6tables-legacy-save"]
        self.restore_command = ["ip6tables-legacy-restore", "--noflush", "--wait"]

    @property
    def program(self) -> str:
        return "ip6tables-legacy"

    def loaded(self, table: str) -> bool:
        try:
            return table in Path("/proc/net/ip6_tables_names").read_text().split()
        except OSError:
            return False

    def save(self, table: str) -> str:
        # Reading a legacy table that is not loaded would load it: nothing of ours is there.
        return super().save(table) if self.loaded(table) else ""

    def remove(self, chains: list[Chain]) -> None:
        # Every `down` removes both families; on a host that never had legacy IPv6 rules
        # nothing is read or loaded.
        super().remove([c for c in chains if self.loaded(c.table)])
