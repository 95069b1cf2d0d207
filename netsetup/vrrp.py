"""Two hosts, one LAN address: LAN_IP held by keepalived (VRRP) on whichever host is master.

With HA_PEERS, LAN_IP (and LAN_IP6) is no proxy entry any more but a VRRP virtual address:
keepalived, Debian's, runs beside the host service (a compose service of its own, from the same
image, `compose.ha.yaml`) and adds the address to the LAN interface of the current master. Both
hosts keep the whole plan in place, the translation of LAN_IP:53 to their own appliance
included, so whichever holds the address answers; the standby's appliance runs, its cache warm.

Why each choice:
- Unicast advertisements to the peers: multicast is often filtered on Wi-Fi and by switches'
  IGMP snooping. The firewall takes VRRP only from the peers (plan.ha_input).
- Every host starts as BACKUP with `nopreempt`: a master that comes back after a reboot does not
  take the address again, which would be a second interruption.
- Advertisements every ADVERT_INTERVAL s: a backup takes over after three missed ones plus its
  skew time (RFC 5798), about 1.4 s, inside the 2 s a client asking every 100 ms should see at
  worst. A master that stops (`make down`, the engine stopping) says so with priority 0, and the
  backup takes over at once.
- Health is a real answer, decided by the host service once a second (failover.py): the
  appliance answers a query at its own address, and the firewall plan is in place. It writes
  "0" or "1" to the health file, which keepalived watches (track_file, weight 0: non-zero is
  FAULT, and a faulty master gives the address up). keepalived itself runs no script, and sees
  of the host's run directory only the directory of that file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from netsetup.errors import BadInput

ADVERT_INTERVAL = 0.4  # seconds
# How long a backup waits for a silent master before it takes over: three advertisements (RFC
# 5798; the skew time, under one more, comes on top).
MASTER_DOWN = 3 * ADVERT_INTERVAL
DEFAULT_VRID = 53
DEFAULT_PRIORITY = 100
# Where the host service reports health, as keepalived's container sees it: compose.ha.yaml
# mounts there the one directory of the host's run directory that holds it (state.health_dir).
RUN_DIR_IN_CONTAINER = "/run/netsetup"


def health_file(project: str, run_dir: str = RUN_DIR_IN_CONTAINER) -> str:
    return f"{run_dir}/{project}.health"


@dataclass(frozen=True)
class Vrrp:
    """One VRRP instance: this host's side of the pair. `render` gives keepalived.conf."""

    project: str
    interface: str
    source: str  # this host's LAN address: the adverts' source, what the peers let in
    peers: tuple[str, ...]
    priority: int
    vrid: int
    address: str  # LAN_IP
    address6: str | None = None  # LAN_IP6, moved with it

    def render(self) -> str:
        name = self.project
        peers = "\n".join(f"        {peer}" for peer in self.peers)
        lines = [
            f"# netsetup: {name}: LAN_IP {self.address} held by VRRP (written by `netsetup up`)",
            "global_defs {",
            f"    router_id {name}",
            "    vrrp_version 3",
            # a master announces the address at once, and once more a second later (a client
            # that missed the first); no burst minutes later
            "    vrrp_garp_master_delay 1",
            "    vrrp_garp_master_repeat 2",
            "    vrrp_garp_master_refresh 0",
            "}",
            f"track_file {name}_health {{",
            f'    file "{health_file(name)}"',
            "    weight 0",
            "    init_file 1",  # not healthy until the host service says so
            "}",
            f"vrrp_instance {name} {{",
            "    state BACKUP",
            "    nopreempt",
            f"    interface {self.interface}",
            f"    virtual_router_id {self.vrid}",
            f"    priority {self.priority}",
            f"    advert_int {ADVERT_INTERVAL}",
            f"    unicast_src_ip {self.source}",
            "    unicast_peer {",
            peers,
            "    }",
            "    check_unicast_src",
            "    virtual_ipaddress {",
            f"        {self.address}/32 dev {self.interface}",
            "    }",
        ]
        if self.address6:
            lines += [
                "    virtual_ipaddress_excluded {",
                f"        {self.address6}/128 dev {self.interface}",
                "    }",
            ]
        lines += [
            "    track_file {",
            f"        {name}_health",
            "    }",
            "}",
        ]
        return "\n".join(lines) + "\n"


def check_peers(peers: tuple[str, ...], priority: int, vrid: int, lan_ip: str | None,
                lan_cidr: str | None) -> tuple[str, ...]:  # fmt: skip
    """What can be said of HA_PEERS, HA_PRIORITY and HA_VRID before looking at the host; the
    peers normalized."""
    if not 1 <= priority <= 254:
        raise BadInput(f"--ha-priority {priority} is not a VRRP priority (1-254)")
    if not 1 <= vrid <= 255:
        raise BadInput(f"--ha-vrid {vrid} is not a VRRP router id (1-255)")
    if not peers:
        return ()
    if lan_ip is None:
        raise BadInput("--ha-peer needs lan mode with --lan-ip (LAN_IP): the address the hosts "
                       "share")  # fmt: skip
    out: list[str] = []
    for peer in peers:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            raise BadInput(f"--ha-peer {peer!r} is not an IPv4 address") from None
        if address.version != 4:
            raise BadInput(f"--ha-peer {peer}: the peers' IPv4 LAN addresses are expected")
        if str(address) == lan_ip:
            raise BadInput(f"--ha-peer {peer} is LAN_IP itself: give the other host's own "
                           "LAN address")  # fmt: skip
        if lan_cidr is not None and address not in ipaddress.ip_network(lan_cidr):
            raise BadInput(f"--ha-peer {peer} is outside the LAN {lan_cidr}: VRRP peers share "
                           "the LAN")  # fmt: skip
        out.append(str(address))
    return tuple(dict.fromkeys(out))

