"""Deploying the service with compose, and finding what the engine made of it.

compose.yaml stays the single definition of the services (the forwarder and the host service)
and the network; netsetup only runs compose (v1 `docker-compose` or v2 `docker compose`,
whichever this host has) with the settings as environment variables, waits for the host service
to report its first sync and the forwarder to be healthy, then reads the network (bridge name,
subnet, options) and the container (address, health) through the Docker SDK.

What compose deploys is decided by the compose file and the variables it reads, nothing else: a
Compose holds those variables as `up` gave them, and the deployment record keeps them, so the
deployment a record describes can be deployed again exactly (a failed `up` puts it back).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnsproxy.defaults import DEFAULT_ALLOWED
from netsetup import home, state
from netsetup.errors import DeployFailed
from netsetup.lists import list_files
from netsetup.plan import OPT_BRIDGE_NAME, Settings


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and (
        subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    raise DeployFailed("neither docker-compose nor `docker compose` is installed")


# A real user's upstreams when neither --upstream nor a config file names any: encrypted, so the
# on-path injector this appliance exists to defeat cannot touch them. Tests always name their own.
DEFAULT_UPSTREAMS = ("tls://1.1.1.1#cloudflare-dns.com", "tls://9.9.9.9#dns.quad9.net")


def compose_env(
    settings: Settings, allow: tuple[str, ...] = (), publish_address: str = "",
    xtables_lock: str = "", served_lan: str | None = None,
) -> dict[str, str]:
    """The variables compose.yaml reads; the Makefile passes the same names. `allow` is what the
    forwarder serves besides its defaults (the served LAN, the host's own address);
    `publish_address` the host's LAN address, the only one port mode listens on; `xtables_lock`
    the host's iptables lock file, for a host service writing legacy tables beside the engine;
    `served_lan` the LAN served, whose reverse names are the home's."""
    env = dict(os.environ)
    env.update(
        {
            "SUBNET": settings.subnet,
            "DNS_IP": settings.ip,
            "PORT": str(settings.port),
        }
    )
    if settings.upstreams:
        env["UPSTREAMS"] = ",".join(settings.upstreams)
    elif not env.get("CONFIG"):
        env["UPSTREAMS"] = ",".join(DEFAULT_UPSTREAMS)
    if settings.domestic_upstreams:
        env["DOMESTIC_UPSTREAMS"] = ",".join(settings.domestic_upstreams)
    if settings.lists_dir:
        env["LISTS_DIR"] = settings.lists_dir
        for variable, paths in list_files(settings.lists_dir).items():
            env[variable] = ",".join(paths)
    env.update(home.compose_variables(settings, served_lan))
    if allow:
        env["ALLOW"] = " ".join([*DEFAULT_ALLOWED, *allow])
    if publish_address:
        env["PUBLISH_ADDRESS"] = publish_address
    if xtables_lock:
        env["XTABLES_LOCK"] = xtables_lock
    if settings.ipv6:
        env["SUBNET6"] = settings.subnet6
        env["DNS_IP6"] = settings.ip6
    if settings.web:
        env["WEB_PORT"] = str(settings.web_port)
    env["NETSETUP_PROJECT"] = settings.project
    env["NETSETUP_STATE_DIR"] = str(state.state_dir())
    env["NETSETUP_RUN_DIR"] = str(state.run_dir())
    return env


# ${NAME}, ${NAME:-default}, ${NAME?error} and $NAME, but not $$ (a literal dollar sign).
_VARIABLE = re.compile(r"(?<!\$)\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def compose_variables(file: Path) -> set[str]:
    """The variables a compose file reads: the part of the environment that decides what
    compose deploys (none for a file that cannot be read: compose up refuses it anyway)."""
    try:
        text = file.read_text()
    except OSError:
        return set()
    return set(_VARIABLE.findall(text.replace("$$", "")))


# Beside the compose file, added to it only when their setting is given (compose files cannot
# be conditional): with LAN_IP6 the appliance network's IPv6 subnet and the container's IPv6
# address; with HA_PEERS keepalived, which holds LAN_IP; with the web page (WEB, on by
# default) the forwarder's page and its published port.
IPV6_OVERLAY = "compose.ipv6.yaml"
HA_OVERLAY = "compose.ha.yaml"
WEB_OVERLAY = "compose.web.yaml"


def overlays_for(settings: Settings, file: Path) -> tuple[Path, ...]:
    """The files compose reads after `file` for these settings."""
    wanted = ((IPV6_OVERLAY, settings.ipv6), (HA_OVERLAY, settings.ha),
              (WEB_OVERLAY, settings.web))  # fmt: skip
    return tuple(file.with_name(name) for name, given in wanted if given)


@dataclass(frozen=True)
class Compose:
    """One project's compose file and the values of the variables it reads."""

    project: str
    file: Path
    # Every variable the file reads that was set; one missing here is unset when compose runs,
    # whatever this process's environment holds (a rollback must not inherit the failed
    # `up`'s CONFIG, say).
    variables: dict[str, str] = field(default_factory=dict)
    # Files read after `file`, each overriding what it names (overlays_for).
    overlays: tuple[Path, ...] = ()

    @classmethod
    def for_settings(
        cls, settings: Settings, file: Path, allow: tuple[str, ...] = (),
        publish_address: str = "", xtables_lock: str = "", served_lan: str | None = None,
    ) -> Compose:  # fmt: skip
        """The variables compose_env gives, as the file reads them."""
        env = compose_env(settings, allow, publish_address, xtables_lock, served_lan)
        overlays = overlays_for(settings, file)
        names = set().union(*(compose_variables(f) for f in (file, *overlays)))
        return cls(settings.project, file, {k: env[k] for k in sorted(names) if k in env},
                   overlays)  # fmt: skip

    def environment(self) -> dict[str, str]:
        names = set().union(*(compose_variables(f) for f in (self.file, *self.overlays)))
        names |= set(self.variables)
        return {k: v for k, v in os.environ.items() if k not in names} | self.variables

    def _cmd(self, *args: str) -> list[str]:
        files = [arg for f in (self.file, *self.overlays) for arg in ("-f", str(f))]
        return [*compose_command(), "-p", self.project, *files, *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self._cmd(*args),
            env=self.environment(),
            capture_output=True,
            text=True,
            cwd=self.file.parent,
        )
        if check and proc.returncode != 0:
            raise DeployFailed(f"compose {args[0]} failed: {last_line(proc)}")
        return proc

    def configured_bridge(self) -> str | None:
        """The bridge name compose.yaml fixes, read from `compose config` (no YAML library)."""
        if not self.file.exists():
            return None
        proc = self.run("config", check=False)
        match = re.search(rf"{re.escape(OPT_BRIDGE_NAME)}['\"]?:\s*['\"]?([\w.-]+)", proc.stdout)
        return match.group(1) if match else None

    def up(self) -> None:
        for file in (self.file, *self.overlays):
            if not file.exists():
                raise DeployFailed(f"compose file {file} not found")
        proc = self.run("up", "-d", check=False)
        if proc.returncode != 0 and "ContainerConfig" in proc.stderr + proc.stdout:
            # docker-compose 1.29 cannot recreate a container on engines 25+ (their image
            # inspect lacks ContainerConfig): remove the services' containers, then create them.
            self.run("rm", "--stop", "--force")
            proc = self.run("up", "-d", check=False)
        if proc.returncode != 0:
            raise DeployFailed(f"compose up failed: {last_line(proc)}")

    def down(self) -> None:
        self.run("down", "--remove-orphans")


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def cache_volume(project: str) -> str:
    """The forwarder's cache across restarts (compose.yaml's `cache`, named as compose does)."""
    return f"{project}_cache"


def volume_exists(client: Any, name: str) -> bool:
    return bool(client.volumes.list(filters={"name": f"^{name}$"}))


def remove_volume(client: Any, name: str) -> None:
    for volume in client.volumes.list(filters={"name": f"^{name}$"}):
        volume.remove(force=True)


def find_container(client: Any, project: str, service: str) -> Any | None:
    found = client.containers.list(
        all=True,
        filters={
            "label": [
                f"com.docker.compose.project={project}",
                f"com.docker.compose.service={service}",
            ]
        },
    )
    return found[0] if found else None


def inspect_container(client: Any, project: str, service: str) -> dict[str, Any] | None:
    """Name, state and restart count of one service's container, for `status`."""
    container = find_container(client, project, service)
    if container is None:
        return None
    info = container.attrs["State"]
    return {
        "name": container.name,
        "status": info.get("Status", "unknown"),
        "started": info.get("StartedAt", ""),
        "restarts": container.attrs.get("RestartCount", 0),
    }


@dataclass(frozen=True)
class Deployed:
    """What the engine made of compose.yaml: the facts the host plan is computed from."""

    container_name: str
    ip: str
    network: str
    bridge: str
    subnet: str
    options: dict[str, str]
    health: str
    published: list[str]
    container_id: str = ""
    # Restarts by the restart policy: the forwarder's process exited (a setting it refuses).
    restarts: int = 0
    # Running (or being restarted by its policy), whatever its health: a container still
    # "starting" after a reboot, or "unhealthy", is a deployment a failed `up` must put back.
    running: bool = False
    ipv6: bool = False  # the network has an IPv6 subnet (compose.ipv6.yaml)


def inspect(client: Any, settings: Settings) -> Deployed | None:
    container = find_container(client, settings.project, settings.service)
    if container is None:
        return None
    container.reload()
    networks = container.attrs["NetworkSettings"]["Networks"] or {}
    chosen = None
    for name, endpoint in networks.items():
        net = client.networks.get(endpoint.get("NetworkID") or name)
        subnets = [c.get("Subnet") for c in (net.attrs.get("IPAM", {}).get("Config") or [])]
        if settings.subnet in subnets or chosen is None:
            chosen = (net, endpoint, subnets)
    if chosen is None:
        return None
    net, endpoint, subnets = chosen
    options = net.attrs.get("Options") or {}
    state = container.attrs["State"]
    health = (state.get("Health") or {}).get("Status") or state.get("Status", "unknown")
    ports = container.attrs["NetworkSettings"].get("Ports") or {}
    published = [
        f"{b.get('HostIp') or '0.0.0.0'}:{b['HostPort']}->{key}"
        for key, binds in ports.items()
        for b in binds or []
    ]
    return Deployed(
        container_name=container.name,
        ip=endpoint.get("IPAddress", ""),
        network=net.name,
        bridge=options.get(OPT_BRIDGE_NAME) or f"br-{net.id[:12]}",
        subnet=subnets[0] if subnets else "",
        options=dict(options),
        health=health,
        running=bool(state.get("Running") or state.get("Restarting")),
        published=published,
        container_id=container.id,
        restarts=int(container.attrs.get("RestartCount") or 0),
        ipv6=bool(net.attrs.get("EnableIPv6")),
    )


def wait_healthy(
    client: Any, settings: Settings, timeout: float = 90, before: Deployed | None = None
) -> Deployed:
    """Wait until the container is healthy (or running, when the image has no health check).

    A container that restarts meanwhile fails at once rather than at the timeout: its process
    exited, as the forwarder does on a setting or config file it refuses, and will again.
    `before` is the container as it was before compose up: restarts it had then do not count.
    """
    deadline = time.monotonic() + timeout
    last: Deployed | None = None
    while time.monotonic() < deadline:
        last = inspect(client, settings)
        if last is not None:
            if last.health in ("healthy", "running"):
                return last
            same = before is not None and before.container_id == last.container_id
            restarts = last.restarts - (before.restarts if before and same else 0)
            if restarts > 0:
                raise DeployFailed(
                    f"service {settings.service} exits after it starts (restarted {restarts} "
                    f"times): see `docker logs {last.container_name}`"
                )
            if last.health in ("exited", "dead", "unhealthy"):
                break
        time.sleep(1)
    state = last.health if last else "missing"
    raise DeployFailed(f"service {settings.service} is {state} after deployment: see docker logs")


def wait_synced(project: str, fingerprint: str, since: float, timeout: float = 60) -> dict:
    """Wait until the host service, reading this deployment record, has applied the plan in a
    sync after `since` (a time.time()): a report left by a service that was killed says
    nothing about now."""
    deadline = time.monotonic() + timeout
    record = None
    while time.monotonic() < deadline:
        record = state.load_sync(project)
        if (record and record.get("deployment") == fingerprint and record.get("complete")
                and float(record.get("last_sync", 0)) > since):  # fmt: skip
            return record
        time.sleep(0.5)
    why = (record or {}).get("last_error") or "no report from it"
    raise DeployFailed(
        f"the host service did not apply the plan within {timeout:g} s ({why}): "
        f"see `docker logs {project}_netsetup_1` or `{project}-netsetup-1`"
    )
