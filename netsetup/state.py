"""What `up` deployed, and what the host service reports, kept where each belongs.

The deployment (the user's settings plus what detection found on the host) outlives a reboot as
the containers do, so it lives under /var/lib; `up` writes it, the host service reads it (the
directory is mounted read-only into its container) at every sync, and `down`, `status` and
`check` read it too. So a service started by hand (`docker compose up`) or after a reboot
keeps the plan `up` decided, and a changed setting reaches it without recreating it. It also
holds the variables compose was given, so that an `up` that fails can deploy the previous
record's containers again as they were.
The service's sync record (last sync, repairs, the sysctl values it replaced) describes rules
that vanish with a reboot, so it lives under /run, which does too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from netsetup.errors import NetsetupError
from netsetup.plan import HostFacts, IptablesBackend, Settings, parse_modes


def state_dir() -> Path:
    return Path(os.environ.get("NETSETUP_STATE_DIR", "/var/lib/netsetup"))


def run_dir() -> Path:
    return Path(os.environ.get("NETSETUP_RUN_DIR", "/run/netsetup"))


# Settings held as tuples, written as lists (JSON) and read back as tuples: a record gives back
# the settings it was written from, equal to them.
TUPLE_SETTINGS = ("upstreams", "domestic_upstreams", "local_dns", "local_domains", "local_reverse",
                  "ha_peers")  # fmt: skip


@dataclass(frozen=True)
class Deployment:
    settings: dict = field(default_factory=dict)
    bridge: str = ""
    lan_interface: str = ""
    lan_cidr: str = ""
    lan_address: str = ""
    engine_version: str = "0"
    engine_firewall: str = "iptables"
    firewall: str = "auto"  # iptables flavour: auto (detected by the service), nft or legacy
    compose_file: str = ""
    # The variables compose_file reads, as `up` gave them to compose (deploy.Compose): with the
    # file, what deploys these containers again. The settings alone do not say it all: CONFIG,
    # QUERY_LOG or IMAGE come from the environment `up` ran in.
    environment: dict[str, str] = field(default_factory=dict)
    ra_interfaces: list[str] = field(default_factory=list)  # HostFacts.ra_interfaces
    # Sysctls `up` set itself before the engine could change them (host.presets), with
    # the values it found: the host service adopts them as its own finds, `down` puts them back.
    sysctls_found: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls, settings: Settings, facts: HostFacts, firewall: str, compose_file: str,
        environment: dict[str, str] | None = None,
    ) -> Deployment:
        data = asdict(settings)
        del data["modes"]
        # "mode" as a comma list ("both" for the default): a record older than lan mode reads
        # the same way, and an older netsetup still reads a record of the old modes.
        data["mode"] = settings.mode_text
        for key in TUPLE_SETTINGS:
            data[key] = list(getattr(settings, key))
        return cls(
            settings=data, bridge=facts.bridge, lan_interface=facts.lan_interface,
            lan_cidr=facts.lan_cidr, lan_address=facts.lan_address,
            engine_version=facts.engine_version, engine_firewall=facts.engine_firewall,
            firewall=firewall, compose_file=compose_file, environment=dict(environment or {}),
            ra_interfaces=list(facts.ra_interfaces),
        )  # fmt: skip

    def to_settings(self) -> Settings:
        data = dict(self.settings)
        data["modes"] = parse_modes(str(data.pop("mode", "both")))
        for key in TUPLE_SETTINGS:
            data[key] = tuple(data.get(key, ()))
        # A record written before the web page describes a deployment without one: its plan
        # opens no port for it, whatever the default now is.
        data.setdefault("web", False)
        known = {f.name for f in fields(Settings)}
        return Settings(**{k: v for k, v in data.items() if k in known})

    def facts(
        self, iptables: IptablesBackend, docker_user: bool, docker_user6: bool = False
    ) -> HostFacts:
        """Host facts for the plan: the deployment's, with what must be read live."""
        return HostFacts(
            engine_version=self.engine_version, engine_firewall=self.engine_firewall,
            iptables=iptables, bridge=self.bridge, lan_interface=self.lan_interface,
            lan_cidr=self.lan_cidr, lan_address=self.lan_address, docker_user=docker_user,
            docker_user6=docker_user6, ra_interfaces=tuple(self.ra_interfaces),
        )  # fmt: skip

    def fingerprint(self) -> str:
        """Names this record in the service's report, so `up` can tell when the service runs
        with what it just wrote."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> Deployment:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def path_for(project: str) -> Path:
    return state_dir() / f"{project}.json"


def sync_path_for(project: str) -> Path:
    return run_dir() / f"{project}.sync.json"


def load(project: str) -> Deployment | None:
    try:
        return Deployment.from_json(path_for(project).read_text())
    except (OSError, ValueError, TypeError):
        return None


def save(project: str, deployment: Deployment) -> None:
    write_json(path_for(project), asdict(deployment))


def delete(project: str) -> None:
    """The deployment record, what was heard on its LAN with it, its keepalived.conf."""
    path_for(project).unlink(missing_ok=True)
    ipv6_dns_path_for(project).unlink(missing_ok=True)
    keepalived_path_for(project).unlink(missing_ok=True)


def keepalived_path_for(project: str) -> Path:
    """keepalived's configuration (HA), written by `up` beside the record; compose.ha.yaml
    mounts it by this name."""
    return state_dir() / f"{project}.keepalived.conf"


def health_dir_for(project: str) -> Path:
    """The one directory of the run directory keepalived's container sees (compose.ha.yaml):
    the health file's, and nothing of the host service's report."""
    return run_dir() / f"vrrp-{project}"


def health_path_for(project: str) -> Path:
    """The host service's verdict for keepalived (failover.py): "0" healthy, "1" not."""
    return health_dir_for(project) / f"{project}.health"


def ipv6_dns_path_for(project: str) -> Path:
    """What the last `up` or `check` heard from the LAN's routers (ra.Survey): a moment's
    view of the LAN, kept for `status` and `routes`, which do not listen themselves."""
    return run_dir() / f"{project}.ipv6-dns.json"


def load_ipv6_dns(project: str) -> dict[str, Any] | None:
    try:
        data = json.loads(ipv6_dns_path_for(project).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_ipv6_dns(project: str, survey: dict[str, Any]) -> None:
    write_json(ipv6_dns_path_for(project), survey)


def load_sync(project: str) -> dict[str, Any] | None:
    """The host service's last report, or None when it has not written one (not running)."""
    try:
        data = json.loads(sync_path_for(project).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Atomically (a new file renamed over the old): a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise NetsetupError(f"cannot write state file {path}: {exc.strerror}") from exc
