"""What every firewall backend offers, and the helpers that read an ``iptables-save`` dump.

A backend applies a whole FirewallPlan atomically (own chains rewritten, missing hooks added,
hooks that another rule got above moved back first) and removes by name: hooks are found as rules
in chains we do not own that jump to a chain of ours, so `down` needs no record of what `up` did
and removes exactly our rules even after a daemon restart reordered them.

A hook counts as first when nothing but other hooks of ours (another deployment's) comes before
it in its chain: those decide for their own bridge only, and treating them as foreign would set
two deployments moving their hooks above each other forever. Moving a hook is a delete and an
insert at position 1 in the same table commit, so there is no moment without it.
"""

from __future__ import annotations

import shlex
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from netsetup.errors import FirewallFailed
from netsetup.firewall.model import Chain, FirewallPlan, Rule, is_netsetup_hook


@dataclass
class FirewallState:
    """What of a plan is in place: used by `status` and by tests of idempotence."""

    chains_present: dict[str, bool]
    hooks_present: dict[str, bool]
    rules_present: dict[str, bool]
    # What of ours differs from the plan (a hook from the wrong chain or twice, rules in our
    # chain the plan does not have or in another order): `apply` puts it right.
    extra: list[str] = field(default_factory=list)
    # Hooks present but not first, each with the first foreign rule above it: that rule decides
    # before our chain can (an ACCEPT there opens the appliance). `apply` moves them back.
    hooks_not_first: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.hooks_not_first and all(
            [
                *self.chains_present.values(),
                *self.hooks_present.values(),
                *self.rules_present.values(),
            ]
        )

    @property
    def exact(self) -> bool:
        """Everything planned is in place and nothing else of ours is."""
        return self.complete and not self.extra

    @property
    def empty(self) -> bool:
        return not self.extra and not any(
            [
                *self.chains_present.values(),
                *self.hooks_present.values(),
                *self.rules_present.values(),
            ]
        )


class FirewallBackend(ABC):
    name: str
    save_command: list[str]
    family: int = 4  # 4: iptables, 6: ip6tables

    @abstractmethod
    def describe(self, plan: FirewallPlan) -> str:
        """Exactly what `apply` would do on a host where none of the plan is in place yet."""

    @abstractmethod
    def apply(self, plan: FirewallPlan) -> None:
        """Rewrite our chains, add missing hooks and remove hooks into them the plan does not
        have, all or nothing per table; a re-run changes nothing."""

    @abstractmethod
    def remove(self, chains: list[Chain]) -> None:
        """Delete every hook into the given chains, then the chains; absent ones are skipped."""

    def save(self, table: str) -> str:
        """``iptables-save -t TABLE`` for this backend, empty when the table is not loaded (or,
        for ip6tables, the tool is not installed: then nothing of ours is there either)."""
        try:
            proc = subprocess.run(
                [*self.save_command, "-t", table], capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            if self.family == 4:
                raise
            return ""
        if proc.returncode != 0:
            return ""
        return proc.stdout

    def loaded(self, table: str) -> bool:
        """Whether the table exists; a table that does not holds nothing of ours."""
        return True

    def has_docker_user(self) -> bool:
        """Whether forwarded traffic passes DOCKER-USER (see forward_jumps_to_docker_user)."""
        return self.loaded("filter") and forward_jumps_to_docker_user(self.save("filter"))

    def state(self, plan: FirewallPlan) -> FirewallState:
        chains: dict[str, bool] = {}
        hooks: dict[str, bool] = {}
        rules: dict[str, bool] = {}
        extra: list[str] = []
        not_first: dict[str, str] = {}
        for table in plan.tables():
            dump = self.save(table)
            extra += [f"{table}/{line}" for line in stale_hooks(plan, table, dump)]
            below = hooks_below_foreign(plan, table, dump)
            for chain in plan.chains_in(table):
                chains[f"{table}/{chain.name}"] = chain.name in declared_chains(dump)
                # Our chain must hold the plan's rules in order and nothing else: a rule left
                # from other settings, or one another tool slipped in, is repaired too.
                actual = [ln for ln in rule_lines(dump) if ln.split()[1] == chain.name]
                planned = [r.render_append() for r in plan.rules_in(table) if r.chain == chain.name]
                if chain.name in declared_chains(dump) and actual != planned:
                    extra.append(f"{table}/{chain.name}: rules differ from the plan")
            lines = set(rule_lines(dump))
            for hook in plan.hooks_in(table):
                name = hook_name(hook)
                hooks[name] = hook.render_append() in lines
                if hook.render_append() in below:
                    not_first[name] = below[hook.render_append()]
            for rule in plan.rules_in(table):
                rules[f"{table}/{rule.render_append()}"] = rule.render_append() in lines
        return FirewallState(chains, hooks, rules, extra, not_first)


def hook_name(hook: Rule) -> str:
    """How status and the service's log name a hook: ``filter/DOCKER-USER -> NETSETUP-x``."""
    return f"{hook.table}/{hook.chain} -> {hook.target}"


def declared_chains(dump: str) -> set[str]:
    """Names of all chains (built-in and user) declared in a save dump."""
    return {line[1:].split()[0] for line in dump.splitlines() if line.startswith(":")}


def rule_lines(dump: str) -> list[str]:
    return [line for line in dump.splitlines() if line.startswith("-A ")]


def forward_jumps_to_docker_user(filter_dump: str) -> bool:
    """Whether DOCKER-USER exists and FORWARD jumps to it, so a hook there sees forwarded
    traffic; not so with ``"iptables": false`` or the engine's nftables backend."""
    if "DOCKER-USER" not in declared_chains(filter_dump):
        return False
    for line in rule_lines(filter_dump):
        words = shlex.split(line)
        if words[1] == "FORWARD" and words[-2:] == ["-j", "DOCKER-USER"]:
            return True
    return False


def hooks_into(dump: str, own: set[str]) -> list[str]:
    """Rule lines (``-A CHAIN ...``) in chains we do not own that jump into one of ours."""
    found = []
    for line in rule_lines(dump):
        words = shlex.split(line)
        chain = words[1]
        if chain in own:
            continue
        if "-j" in words and words[words.index("-j") + 1] in own:
            found.append(line)
    return found


def target_and_comment(line: str) -> tuple[str, str | None]:
    """A save line's jump target and comment (without the quotes iptables-save adds)."""
    words = shlex.split(line)
    target = words[words.index("-j") + 1] if "-j" in words else ""
    comment = words[words.index("--comment") + 1] if "--comment" in words else None
    return target, comment


def hooks_below_foreign(plan: FirewallPlan, table: str, dump: str) -> dict[str, str]:
    """Planned hooks that must be first (position 1) but have a foreign rule above their first
    copy: the hook's line, with the first such rule (the one that decides first)."""
    below: dict[str, str] = {}
    lines = rule_lines(dump)
    for hook in plan.hooks_in(table):
        line = hook.render_append()
        if hook.position != 1 or line not in lines:
            continue
        for above in lines[: lines.index(line)]:
            if above.split()[1] == hook.chain and not is_netsetup_hook(*target_and_comment(above)):
                below[line] = above
                break
    return below


def stale_hooks(plan: FirewallPlan, table: str, dump: str) -> list[str]:
    """Hook lines into our chains in `table` other than the planned hooks: from a chain the plan
    no longer hooks from (the engine's firewall changed), or a duplicate."""
    wanted = {hook.render_append() for hook in plan.hooks_in(table)}
    kept: set[str] = set()
    hooks = []
    for line in hooks_into(dump, plan.own_names(table)):
        if line in wanted and line not in kept:
            kept.add(line)
        else:
            hooks.append(line)
    return hooks


def run(cmd: list[str], stdin: str | None = None) -> str:
    """Run a firewall tool; a failure becomes one clear line naming the tool and its message."""
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise FirewallFailed(f"{cmd[0]} not found: install iptables") from exc
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise FirewallFailed(f"{' '.join(cmd)} failed: {message[0] if message else 'no output'}")
    return proc.stdout
