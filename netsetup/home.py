"""Names at home, the host side: what `up` checks and hands the forwarder for the LAN's own names.

The forwarder does the work (README "Names at home"): names under the local domains, single-label
names and the reverse zones of the LAN are asked of the LAN's resolver (LOCAL_DNS, normally the
router) only, or answered NXDOMAIN without one; a hosts file answers what it names. Here, three
things only:

* the settings are checked before anything is deployed, with the forwarder's own parsers, so a
  bad LOCAL_DNS or a bad hosts line is one line and exit status 2 rather than a forwarder that
  exits after it starts (and a rollback);
* the LAN the appliance serves is added to the reverse networks: its PTR names are the router's;
* the hosts file's directory, not the file, is what compose mounts: a bind mount of one file
  holds its inode, and an editor that saves by writing a new file and renaming it over the old
  one would leave the forwarder reading the old file at every reload.

The forwarder's modules are imported inside the functions: this module runs on the host only
(`up`), and the host service's image carries none of them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import replace
from pathlib import Path

from netsetup.errors import BadInput
from netsetup.plan import Settings

# Where compose.yaml mounts the hosts file's directory in the forwarder's container.
HOSTS_MOUNT = "/etc/dnsproxy/hosts.d"


def checked(settings: Settings) -> Settings:
    """Refuse what the forwarder would refuse at start (exit 2, nothing changed); return the
    settings with the networks normalized and the hosts file as an absolute, resolved path."""
    from dnsproxy.domainlists import to_wire  # noqa: PLC0415 - host side only, see above
    from dnsproxy.homenames import reverse_zones  # noqa: PLC0415
    from dnsproxy.upstreams import parse_spec  # noqa: PLC0415

    for spec in settings.local_dns:
        try:
            parsed = parse_spec(spec)
        except ValueError as exc:
            raise BadInput(f"--local-dns: {exc}") from None
        if parsed.needs_bootstrap:  # nothing the LAN's resolver group holds could look it up
            raise BadInput(f"--local-dns {spec}: a DoH server by name needs its address, "
                           f"as {parsed.url}#IP")  # fmt: skip
    for name in settings.local_domains:
        try:
            to_wire(name)
        except ValueError as exc:
            raise BadInput(f"--local-domain {name!r}: {exc}") from None
    networks = []
    for cidr in settings.local_reverse:
        try:
            reverse_zones(cidr)
        except ValueError as exc:
            raise BadInput(f"--local-reverse {exc}") from None
        networks.append(str(ipaddress.ip_network(cidr.strip(), strict=False)))
    hosts_file = checked_hosts_file(settings.hosts_file) if settings.hosts_file else None
    return replace(settings, local_reverse=tuple(networks), hosts_file=hosts_file)


def checked_hosts_file(given: str) -> str:
    """The hosts file as the forwarder will read it: a regular file of good lines, readable by
    the container's unprivileged user (so by others), in a directory it may enter."""
    from dnsproxy.hosts import HostsError, load  # noqa: PLC0415

    path = os.path.realpath(given)
    if not os.path.exists(path):
        raise BadInput(f"--hosts-file {given}: no such file")
    if not os.path.isfile(path):
        raise BadInput(f"--hosts-file {given}: not a regular file")
    mode, folder = os.stat(path).st_mode, os.stat(os.path.dirname(path)).st_mode
    if not mode & stat.S_IROTH or not folder & stat.S_IXOTH:
        raise BadInput(f"--hosts-file {given}: the appliance runs as an unprivileged user and "
                       f"could not read it: chmod o+r {path}, o+x its directory")  # fmt: skip
    try:
        load([path])
    except HostsError as exc:
        raise BadInput(str(exc)) from None
    return path


def compose_variables(settings: Settings, served_lan: str | None) -> dict[str, str]:
    """What compose.yaml hands the forwarder as DNSPROXY_LOCAL_DNS, ..., DNSPROXY_HOSTS, and the
    directory it mounts. Every one is set, empty when not asked for (compose then gives the
    forwarder nothing, and the config file's settings apply), so nothing leaks in from the
    environment `up` runs in."""
    hosts_dir, hosts = "", ""
    if settings.hosts_file:
        hosts_dir = os.path.dirname(settings.hosts_file)
        hosts = f"{HOSTS_MOUNT}/{os.path.basename(settings.hosts_file)}"
    return {
        "LOCAL_DNS": ",".join(settings.local_dns),
        "LOCAL_DOMAINS": ",".join(settings.local_domains),
        "LOCAL_REVERSE": ",".join(reverse_networks(settings, served_lan)),
        "HOSTS_DIR": hosts_dir,
        "HOSTS": hosts,
    }


def reverse_networks(settings: Settings, served_lan: str | None) -> list[str]:
    """The networks whose reverse names are the home's: the LAN served, its IPv6 prefix (with
    LAN_IP6), then LOCAL_REVERSE."""
    lan = [n for n in (served_lan, settings.lan_cidr6 if settings.ipv6 else None) if n]
    return list(dict.fromkeys([*lan, *settings.local_reverse]))


def config_sets(key: str, config: str | None) -> bool:
    """Whether the config file (TOML) sets `key`: a light look at its lines, for notes only."""
    if not config:
        return False
    try:
        text = Path(config).read_text(errors="replace")
    except OSError:
        return False
    return re.search(rf"^\s*{re.escape(key)}\s*=", text, re.MULTILINE) is not None


def notes(settings: Settings, served_lan: str | None, gateway: str | None,
          config: str | None) -> list[str]:  # fmt: skip
    """What `up` tells a user about names at home: where the LAN's names go when no resolver of
    the LAN is named (the gateway is the likely one: asked of nobody, read from the routing
    table), and that a config file's local_reverse gives way to the LAN's network."""
    out = []
    if not settings.local_dns and not config_sets("local_dns", config):
        reverse = f", reverse lookups of {served_lan}" if served_lan else ""
        give = (f"LOCAL_DNS={gateway} (your LAN's gateway)" if gateway
                else "LOCAL_DNS=<your router's address>")  # fmt: skip
        out.append(f"home names (printer.lan{reverse}) are answered NXDOMAIN here; to resolve "
                   f"them, give {give}")  # fmt: skip
    if reverse_networks(settings, served_lan) and config_sets("local_reverse", config):
        out.append("the config file's local_reverse is replaced by the LAN's network and "
                   "LOCAL_REVERSE: give its networks as LOCAL_REVERSE")  # fmt: skip
    return out


def upstreams_on_the_lan(settings: Settings, lan_cidr: str) -> list[str]:
    """The upstreams of every group (UPSTREAMS, DOMESTIC_UPSTREAMS, LOCAL_DNS) inside the LAN:
    with direct mode among the modes the appliance's queries reach them with its own address
    (plan.masquerade), and their replies come back only if they route the subnet via the host."""
    from dnsproxy.upstreams import parse_spec  # noqa: PLC0415 - host side only, see above

    lan = ipaddress.ip_network(lan_cidr, strict=False)
    found = []
    for spec in [*settings.upstreams, *settings.domestic_upstreams, *settings.local_dns]:
        try:
            parsed = parse_spec(spec)
            host = parsed.bootstrap or parsed.host
            if ipaddress.ip_address(host) in lan:
                found.append(host)
        except ValueError:
            continue  # a name (DoH), or refused elsewhere
    return list(dict.fromkeys(found))

