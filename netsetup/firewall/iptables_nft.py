"""The nf_tables backend: one ``iptables-restore --noflush`` call per apply or remove.

Where ``iptables -V`` says nf_tables, Docker's rules live in nf_tables and python-iptables cannot
see them, so we write with the nft-backed iptables tools. Everything goes in one restore script,
which the kernel commits as one transaction: either all our chains, rules and hooks are in place
or none is (kube-proxy's approach). ``--noflush`` leaves every chain we do not declare untouched;
declaring one of ours (``:NAME - [0:0]``) flushes it, so rewriting it whole is idempotent.
"""

from __future__ import annotations

import shutil

from netsetup.firewall.base import (
    FirewallBackend,
    declared_chains,
    hooks_below_foreign,
    hooks_into,
    rule_lines,
    run,
)
from netsetup.firewall.model import Chain, FirewallPlan


def _tool(action: str, family: int = 4) -> str:
    """Prefer the explicitly nft-backed binary (``iptables-nft-save``, ``ip6tables-nft-save``);
    plain ``iptables-save`` is nft on such hosts."""
    program = "iptables" if family == 4 else "ip6tables"
    nft = f"{program}-nft-{action}"
    return nft if shutil.which(nft) else f"{program}-{action}"


class NftBackend(FirewallBackend):
    name = "nft"
    describe_kind = "nf_tables; one atomic call"

    def __init__(self, family: int = 4) -> None:
        self.family = family
        self.save_command = [_tool("save", family)]
        self.restore_command = [_tool("restore", family), "--noflush"]

    @property
    def program(self) -> str:
        """The restore tool as the plan names it."""
        return "iptables" if self.family == 4 else "ip6tables"

    def apply_script(self, plan: FirewallPlan, dumps: dict[str, str] | None = None) -> str:
        """The restore script that brings the tables from `dumps` (current state) to the plan.

        Without dumps (describe), a host where nothing of ours is in place yet. With them,
        hooks into our chains the plan does not have are deleted in the same transaction, and
        a planned hook that is there twice, or below a foreign rule, is deleted (every copy)
        and inserted again at its position: one transaction, so it is never absent.
        """
        out: list[str] = []
        for table in plan.tables():
            dump = dumps.get(table, "") if dumps else ""
            lines = rule_lines(dump)
            below = hooks_below_foreign(plan, table, dump)
            planned = {hook.render_append() for hook in plan.hooks_in(table)}
            body = [f":{chain.name} - [0:0]" for chain in plan.chains_in(table)]
            body += [rule.render_append() for rule in plan.rules_in(table)]
            body += ["-D" + line[2:] for line in hooks_into(dump, plan.own_names(table))
                     if line not in planned]  # fmt: skip
            for hook in plan.hooks_in(table):
                line = hook.render_append()
                copies = lines.count(line)
                if copies == 1 and line not in below:
                    continue  # in place
                body += ["-D" + line[2:]] * copies + [hook.render_add()]
            out += [f"*{table}", *body, "COMMIT"]
        return "\n".join(out) + "\n"

    def describe(self, plan: FirewallPlan) -> str:
        header = (f"# firewall: {self.program}-restore --noflush <<EOF "
                  f"({self.describe_kind})")  # fmt: skip
        return header + "\n" + self.apply_script(plan) + "EOF\n"

    def apply(self, plan: FirewallPlan) -> None:
        dumps = {table: self.save(table) for table in plan.tables()}
        run(self.restore_command, stdin=self.apply_script(plan, dumps))

    def remove_script(self, chains: list[Chain]) -> str:
        out: list[str] = []
        tables = list(dict.fromkeys(c.table for c in chains))
        for table in tables:
            dump = self.save(table)
            existing = declared_chains(dump)
            own = {c.name for c in chains if c.table == table}
            present = sorted(name for name in own if name in existing)
            # Declaring a chain of ours flushes it; hooks go next, then the empty chains.
            body = [f":{name} - [0:0]" for name in present]
            body += ["-D" + line[2:] for line in hooks_into(dump, own)]
            body += [f"-X {name}" for name in present]
            if body:
                out += [f"*{table}", *body, "COMMIT"]
        return "\n".join(out) + "\n" if out else ""

    def remove(self, chains: list[Chain]) -> None:
        script = self.remove_script(chains)
        if script:
            run(self.restore_command, stdin=script)
