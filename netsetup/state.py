"""What `up` changed that cannot be read back from the host, kept for `down` and `status`.

Firewall rules need no record: our chains and the hooks into them are found by name. A sysctl's
previous value, the settings `up` ran with and whether `up` started the service can only be
remembered. The file lives under /run, which like the firewall rules does not outlive a reboot.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from netsetup.errors import NetsetupError
from netsetup.plan import Mode, Settings


def state_dir() -> Path:
    return Path(os.environ.get("NETSETUP_STATE_DIR", "/run/netsetup"))


@dataclass
class State:
    settings: dict = field(default_factory=dict)
    lan_interface: str = ""
    lan_cidr: str = ""
    lan_address: str = ""
    firewall: str = ""
    # sysctl key -> value before the first `up` changed it
    sysctls_before: dict[str, str] = field(default_factory=dict)
    compose_file: str = ""

    def to_settings(self) -> Settings:
        data = dict(self.settings)
        data["mode"] = Mode(data.get("mode", "both"))
        data["upstreams"] = tuple(data.get("upstreams", ()))
        return Settings(**data)


def settings_dict(settings: Settings) -> dict:
    data = asdict(settings)
    data["mode"] = settings.mode.value
    data["upstreams"] = list(settings.upstreams)
    return data


def path_for(project: str) -> Path:
    return state_dir() / f"{project}.json"


def load(project: str) -> State | None:
    path = path_for(project)
    try:
        return State(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def save(project: str, state: State) -> None:
    path = path_for(project)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        raise NetsetupError(f"cannot write state file {path}: {exc.strerror}") from exc


def delete(project: str) -> None:
    path_for(project).unlink(missing_ok=True)
