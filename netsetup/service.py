"""The host service: applies the host plan, keeps it in place, removes it on stop.

It runs in a container of its own next to the forwarder (compose.yaml: host network, NET_ADMIN
and NET_RAW only, restart unless-stopped), so whatever brings the forwarder back after a reboot
or a daemon restart brings this back too. Like kube-proxy it does not trust that rules stay put:
every few seconds it compares the host with the plan (the same compute_plan and backends `up`
uses, nothing written twice) and puts back what is missing, since a firewall reload (ufw,
firewalld, `iptables -F`, a reboot) takes our rules away without telling anyone; a hook that
another rule got above is moved back first (a foreign ACCEPT there would open the appliance).
Each repair is one log line and a count in the sync record that `netsetup status` shows (moved
hooks have their own count too). What the first sync
found is recorded too: after a reboot or a daemon restart that is the repair that mattered.

IPv6 is the same plan's other family (Plan.firewall6), written to ip6tables by the backend of the
same flavour, checked and repaired in the same sync; where the plan has none, the IPv6 chains a
previous plan had are removed at the first sync and whenever IPv6 is switched off.

On SIGTERM (compose down, docker stop, shutdown) it removes exactly its chains and hooks and puts
back the sysctls it changed. The sysctl values it found are kept in the sync record, written
before it changes them, so a restarted service (a crash, an image update, a kill in the middle
of its first sync) does not mistake its own "1" for the host's value, and `down`'s sweep puts
the host's back; so are the proxy entries and routes it applied, so that one started after the
record changed (another LAN_IP while no service ran) removes the old ones, and `down`'s sweep
does too.

    python -m netsetup.service     (NETSETUP_PROJECT names the deployment record to read)
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from netsetup import detect, failover, hostnet, ra, state, sysctl
from netsetup.errors import NetsetupError
from netsetup.firewall import get_backend
from netsetup.firewall.base import FirewallBackend, FirewallState, declared_chains
from netsetup.hostnet import HostRoute, ProxyNeighbour
from netsetup.plan import IptablesBackend, Plan, compute_plan, own_chains

DEFAULT_INTERVAL = 5.0


def log(message: str) -> None:
    print(f"netsetup-service: {message}", flush=True)


def missing_pieces(fw: FirewallState) -> list[str]:
    """What a sync found out of place, in words for the log line; a hook not first names the
    rule that was above it."""
    pieces = [f"{name} missing" for group in (fw.chains_present, fw.hooks_present)
              for name, present in group.items() if not present]  # fmt: skip
    pieces += [f"{name} not first, moved back above: {line}"
               for name, line in fw.hooks_not_first.items()]  # fmt: skip
    rules = sum(not present for present in fw.rules_present.values())
    if rules and not pieces:
        pieces.append(f"{rules} rule(s) missing")
    return pieces + [f"{name} (stale)" for name in fw.extra]


@dataclass
class HostService:
    backend: FirewallBackend
    project: str
    # ip6tables, of the backend's flavour (by default from its name).
    backend6: FirewallBackend | None = None
    deployment: state.Deployment | None = None
    syncs: int = 0
    repairs: int = 0
    # Hooks moved back first because another rule had got above them (each also makes its
    # sync a repair). One that climbs again every sync is a tool fighting for the top: it is
    # moved once per sync, counted and logged each time, never in a loop of its own.
    hooks_moved: int = 0
    errors: int = 0
    last_repair: dict[str, Any] | None = None
    first_sync: dict[str, Any] | None = None
    last_error: str = ""
    sysctls_before: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    complete: bool = False
    # Neighbour proxy entries and routes of the last plan: those a new plan drops (a switch
    # away from lan mode, another LAN_IP) are removed at the next sync.
    neighbours: list[ProxyNeighbour] = field(default_factory=list)
    routes: list[HostRoute] = field(default_factory=list)
    # Whether the last sync applied IPv6 rules: if the next plan has none, they are removed.
    ipv6_applied: bool = False
    # The last sync's plan, and with HA the watch of health and role (failover.Watch).
    plan_now: Plan | None = None
    ha_watch: failover.Watch | None = None
    # Syncs in a row that did not leave the plan in place: one may be a passing lock or a
    # reload under way; two, and this host is not fit to hold LAN_IP (failover.py).
    incomplete_syncs: int = 0

    def __post_init__(self) -> None:
        if self.backend6 is None:
            self.backend6 = get_backend(self.backend.name, 6)

    @property
    def ip6(self) -> FirewallBackend:
        assert self.backend6 is not None  # set in __post_init__
        return self.backend6

    def plan(self, deployment: state.Deployment) -> Plan:
        # Whether FORWARD passes DOCKER-USER is read every time: a flush may have taken the
        # engine's jump away, and then our hook belongs first in FORWARD until it is back.
        settings = deployment.to_settings()
        facts = deployment.facts(
            detect.IptablesBackend(self.backend.name), self.backend.has_docker_user(),
            settings.ipv6 and self.ip6.has_docker_user(),
        )  # fmt: skip
        return compute_plan(settings, facts)

    def sync(self) -> list[str]:
        """Bring the host to the plan; return what had to be put back (empty: all in place)."""
        deployment = state.load(self.project)
        if deployment is None:
            raise NetsetupError(
                f"no deployment record {state.path_for(self.project)}: deploy with `make up`"
            )
        self.deployment = deployment
        self.complete = False  # a report written mid-sync (below) must not claim this record
        plan = self.plan(deployment)
        self.plan_now = plan
        found = self.sync_sysctls(plan)
        exact = True
        for backend, firewall, family in ((self.backend, plan.firewall, ""),
                                          (self.ip6, plan.firewall6, "ipv6 ")):  # fmt: skip
            if not firewall.chains:
                continue
            fw = backend.state(firewall)
            if not fw.exact:
                found += [family + piece for piece in missing_pieces(fw)]
                backend.apply(firewall)
                self.hooks_moved += len(fw.hooks_not_first)
                fw = backend.state(firewall)
            exact = exact and fw.exact
        if plan.firewall6.chains:
            self.ipv6_applied = True
        elif self.ipv6_applied or self.syncs == 0:
            # IPv6 switched off (here, or before this service started): its chains go.
            found += self.remove_ipv6()
            self.ipv6_applied = False
        found += self.sync_host_entries(plan)
        self.complete = exact
        self.incomplete_syncs = 0 if exact else self.incomplete_syncs + 1
        self.syncs += 1
        return found

    def remove_ipv6(self) -> list[str]:
        """Remove our ip6tables chains and hooks, if there are any; say so if there were."""
        chains = own_chains(self.project)
        present = [f"ipv6 {c.table}/{c.name} (stale)" for c in chains
                   if c.name in declared_chains(self.ip6.save(c.table))]  # fmt: skip
        if present:
            self.ip6.remove(chains)
        return present

    def sync_sysctls(self, plan: Plan) -> list[str]:
        """Set the plan's sysctls; put back those it no longer sets (a switch away from lan
        mode). A value found is reported before it is changed: a service killed right after
        the change (SIGKILL, an out-of-memory kill) leaves in its report what the host had,
        for the next service or `down`'s sweep to put back."""
        found = []
        # what `up` set itself before the engine ran, with the value it found (host.presets)
        set_by_up = self.deployment.sysctls_found if self.deployment else {}
        for key, value in plan.sysctls.items():
            old = sysctl.get(key)
            if key not in self.sysctls_before:  # one kept stays: the value now may be ours
                original = set_by_up.get(key, old)
                if original != value:
                    self.sysctls_before[key] = original
                    self.record()
            if old != value:
                sysctl.set_value(key, value)
                found.append(f"sysctl {key} was {old}")
                if key.endswith(".accept_ra") and value == "2":
                    # After a boot the engine may have turned forwarding on first, and the
                    # host's RA-learned routes are gone: ask for an advertisement now rather
                    # than wait minutes for the next.
                    ra.solicit(key.removeprefix("net.ipv6.conf.").removesuffix(".accept_ra"))
        for key in [k for k in self.sysctls_before if k not in plan.sysctls]:
            sysctl.set_value(key, self.sysctls_before[key])
            found.append(f"sysctl {key} put back to {self.sysctls_before.pop(key)}")
            self.record()
        return found

    def sync_host_entries(self, plan: Plan) -> list[str]:
        """Put back missing proxy entries and routes (a flush, an interface that went down and
        up); remove those the plan no longer has."""
        dropped_n = [n for n in self.neighbours if n not in plan.neighbours]
        dropped_r = [r for r in self.routes if r not in plan.routes]
        found = [f"{item.render()} (stale)" for item in [*dropped_n, *dropped_r]]
        hostnet.remove(dropped_n, dropped_r)
        planned = (list(plan.neighbours), list(plan.routes))
        if planned != (self.neighbours, self.routes):
            # Reported before they are applied: a kill in between must not orphan them.
            self.neighbours, self.routes = planned
            self.record()
        found += [f"{what} missing" for what in hostnet.apply(plan.neighbours, plan.routes)]
        return found

    def step(self) -> None:
        """One sync, logged and recorded; a failure is reported and retried, never fatal."""
        first = self.syncs == 0
        try:
            found = self.sync()
        except Exception as exc:  # noqa: BLE001 - whatever a sync hits, the loop goes on
            self.errors += 1
            self.incomplete_syncs += 1
            self.last_error = str(exc)
            self.complete = False
            log(f"sync failed (retrying): {exc}")
        else:
            self.last_error = ""
            if first:
                self.first_sync = {"at": time.time(), "found": found}
                log(f"applied the plan ({self.backend.name}): " + ("; ".join(found) or "in place"))
            elif found:
                self.repairs += 1
                self.last_repair = {"at": time.time(), "what": found}
                log(f"repaired: {'; '.join(found)}")
        self.record()

    def watch_failover(self) -> None:
        """With HA, one look at health and role (failover.Watch), reported when either
        changed. Without (any more), a keepalived still running is told to give up."""
        plan = self.plan_now
        if plan is None or plan.vrrp is None:
            if self.ha_watch is not None:
                failover.write_health(self.ha_watch.health_file, healthy=False)
                self.ha_watch.close()
                self.ha_watch = None
            return
        if self.ha_watch is None:
            self.ha_watch = failover.Watch(state.health_path_for(self.project))
        try:
            changed = self.ha_watch.tick(plan.vrrp, plan.settings.ip,
                                         plan_in_place=self.incomplete_syncs < 2)
        except OSError as exc:  # the run directory, netlink: the next look tries again
            log(f"failover check failed: {exc}")
            return
        if changed:
            if self.ha_watch.last_transition and self.syncs:
                log(f"failover: {self.ha_watch.role}: {self.ha_watch.last_transition['why']}")
            self.record()

    def record(self) -> None:
        state.write_json(
            state.sync_path_for(self.project),
            {
                "pid": os.getpid(),
                "deployment": self.deployment.fingerprint() if self.deployment else None,
                "started": self.started, "last_sync": time.time(), "syncs": self.syncs,
                "first_sync": self.first_sync,
                "repairs": self.repairs, "last_repair": self.last_repair,
                "hooks_moved": self.hooks_moved,
                "errors": self.errors, "last_error": self.last_error,
                "complete": self.complete, "backend": self.backend.name,
                "sysctls_before": self.sysctls_before,
                "host_entries": entries_to_json(self.neighbours, self.routes),
                "failover": self.ha_watch.as_dict() if self.ha_watch else None,
            },
        )  # fmt: skip

    def stop(self) -> None:
        if self.ha_watch is not None:  # a keepalived still running gives the address up
            failover.write_health(self.ha_watch.health_file, healthy=False)
            self.ha_watch.close()
        deployment = state.load(self.project) or self.deployment
        remove_host_plan(self.backend, self.project, self.sysctls_before, deployment)
        hostnet.remove(self.neighbours, self.routes)  # in case the last report was not written
        log("removed the host plan")


def entries_to_json(neighbours: list[ProxyNeighbour], routes: list[HostRoute]) -> dict:
    """For the report: what a later service or `down`'s sweep must be able to remove."""
    return {"neighbours": [[n.address, n.interface] for n in neighbours],
            "routes": [[r.destination, r.interface] for r in routes]}  # fmt: skip


def entries_from_json(data: Any) -> tuple[list[ProxyNeighbour], list[HostRoute]]:
    """What a report says was applied; nothing from a report of another shape (an older one),
    and no entry that is not an address (a host route for routes) on an interface name."""
    try:
        neighbours = [ProxyNeighbour(str(a), str(i)) for a, i in data["neighbours"]]
        routes = [HostRoute(str(d), str(i)) for d, i in data["routes"]]
        for n in neighbours:
            ipaddress.ip_address(n.address)
        for r in routes:
            network = ipaddress.ip_network(r.destination)
            if network.prefixlen != network.max_prefixlen:
                raise ValueError(r.destination)
        if not all(e.interface for e in [*neighbours, *routes]):
            raise ValueError("no interface")
    except (KeyError, TypeError, ValueError):
        return [], []
    return neighbours, routes


def host_entries(
    deployment: state.Deployment | None,
) -> tuple[list[ProxyNeighbour], list[HostRoute]]:
    """The proxy entries and routes a deployment's plan holds (they depend on no live fact)."""
    if deployment is None:
        return [], []
    plan = compute_plan(deployment.to_settings(), deployment.facts(IptablesBackend.nft, True))
    return plan.neighbours, plan.routes


def remove_host_plan(
    backend: FirewallBackend,
    project: str,
    sysctls_before: dict[str, str],
    deployment: state.Deployment | None = None,
) -> None:
    """Remove exactly what the plan added, put the sysctls back as they were found, drop the
    report: the service on its way out, or `netsetup down` for a service that could not. Proxy
    entries and routes are found from the deployment record and from the last report (which
    names a LAN_IP the record may no longer hold, after a killed service); firewall pieces by
    name, in both families (ip6tables whether or not the record asks for IPv6: a record may
    have changed since)."""
    # A netlink failure, or a record this version cannot read, must not keep the firewall and
    # sysctls from being put back: every step runs, and the first failure is raised at the end
    # (the report stays for a later sweep).
    failed: list[Exception] = []
    report = state.load_sync(project) or {}
    for step in (lambda: hostnet.remove(*host_entries(deployment)),
                 lambda: hostnet.remove(*entries_from_json(report.get("host_entries"))),
                 lambda: backend.remove(own_chains(project)),
                 lambda: get_backend(backend.name, 6).remove(own_chains(project))):  # fmt: skip
        try:
            step()
        except (NetsetupError, OSError) as exc:
            failed.append(exc)
    # what `up` set before the engine ran, for a service that never adopted it (killed first)
    set_by_up = deployment.sysctls_found if deployment else {}
    for key, old in reversed({**set_by_up, **sysctls_before}.items()):  # forwarding first
        try:
            sysctl.set_value(key, old)
        except (ValueError, OSError) as exc:  # a key of a report tampered with, a gone link
            failed.append(NetsetupError(f"sysctl {key}: {exc}"))
    if failed:
        raise failed[0]
    state.sync_path_for(project).unlink(missing_ok=True)


def main() -> int:
    project = os.environ.get("NETSETUP_PROJECT", "dnsapp")
    try:
        interval = float(os.environ.get("NETSETUP_SYNC_INTERVAL", DEFAULT_INTERVAL))
        deployment = state.load(project)
        override = deployment.firewall if deployment else "auto"
        backend = get_backend(detect.iptables_backend(override).value)
    except (NetsetupError, ValueError) as exc:
        print(f"netsetup-service: error: {exc}", file=sys.stderr)
        return 2
    service = HostService(backend, project)
    previous = state.load_sync(project)
    if previous:  # a restart, not a boot: keep what the host had before our first change
        service.sysctls_before = dict(previous.get("sysctls_before") or {})
        # and what was applied: the first sync removes what the plan has dropped meanwhile
        service.neighbours, service.routes = entries_from_json(previous.get("host_entries"))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    log(f"project {project}, iptables {backend.name}, re-checking every {interval:g} s")
    # Syncs every `interval`; with HA, health and role once a second between them.
    next_sync = 0.0
    while not stopping.is_set():
        if time.monotonic() >= next_sync:
            service.step()
            next_sync = time.monotonic() + interval
        service.watch_failover()
        wait = next_sync - time.monotonic()
        stopping.wait(min(wait, failover.HEALTH_INTERVAL) if service.ha_watch else wait)
    try:
        service.stop()
    except (NetsetupError, OSError) as exc:
        print(f"netsetup-service: error: removing the host plan failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
