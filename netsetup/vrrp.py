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
- Health is a real answer, decided by the host service (service.py) at every sync: the
  appliance answers a query at its own address, and the firewall plan is in place. It writes
  "0" or "1" to HEALTH_FILE, which keepalived watches (track_file, weight 0: non-zero is FAULT,
  and a faulty master gives the address up). keepalived itself runs no script.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netsetup.errors import BadInput

ADVERT_INTERVAL = 0.4  # seconds
DEFAULT_VRID = 53
DEFAULT_PRIORITY = 100
# Where the host service reports health, as keepalived's container sees it (compose.ha.yaml
# mounts the host's run directory there, as for the host service).
RUN_DIR_IN_CONTAINER = "/run/netsetup"
CONFIG_IN_CONTAINER = "/etc/keepalived/keepalived.conf"


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
    if not 1 <= priority <= 254:
        raise BadInput(f"--ha-priority {priority} is not a VRRP priority (1-254)")
    if not 1 <= vrid <= 255:
        raise BadInput(f"--ha-vrid {vrid} is not a VRRP router id (1-255)")
    return tuple(dict.fromkeys(out))


HEALTH_INTERVAL = 1.0  # seconds between the host service's checks (service.main)
_QUESTION = b"\x02id\x06server\x00" + struct.pack(">HH", 16, 3)  # CHAOS TXT id.server


def appliance_answers(ip: str, timeout: float = 0.5) -> bool:
    """Whether the appliance answers a query at its own address: the question its health check
    asks, answered without any upstream, so no packet leaves the host."""
    qid = secrets.randbits(16)
    query = struct.pack(">HHHHHH", qid, 0, 1, 0, 0, 0) + _QUESTION
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((ip, 53))
            sock.send(query)
            reply = sock.recv(512)
        except OSError:
            return False
    if len(reply) < 12:
        return False
    rid, flags, _, answers = struct.unpack(">HHHH", reply[:8])
    return rid == qid and bool(flags & 0x8000) and flags & 0xF == 0 and answers >= 1


def holds(interface: str, address: str) -> bool:
    """Whether `address` is an address of `interface` here: keepalived adds it on the master."""
    from pyroute2 import IPRoute  # noqa: PLC0415 - loaded late, like hostnet

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            return False
        return any(a.get_attr("IFA_ADDRESS") == address
                   for a in ipr.get_addr(family=socket.AF_INET, index=found[0]))  # fmt: skip


VRRP_PROTOCOL = 112


class PeerAdverts:
    """The peers' VRRP advertisements as this host hears them (a raw socket, read without
    waiting at each look): a backup hears the master's every ADVERT_INTERVAL, a master hears
    nothing while its peers are backups (they stay silent) or down."""

    def __init__(self, vrid: int) -> None:
        self.vrid = vrid
        self.last: dict[str, tuple[float, int]] = {}  # peer -> (when, its priority)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTOCOL)
        self.sock.setblocking(False)

    def read(self) -> None:
        while True:
            try:
                packet, (source, _) = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            header = (packet[0] & 0x0F) * 4  # the IPv4 header comes with a raw socket
            if len(packet) >= header + 3 and packet[header + 1] == self.vrid:
                self.last[source] = (time.time(), packet[header + 2])

    def seen(self) -> dict[str, dict[str, Any]]:
        """Each peer heard: when last, at which priority (0: it gave the address up)."""
        return {peer: {"at": at, "priority": priority}
                for peer, (at, priority) in self.last.items()}  # fmt: skip

    def close(self) -> None:
        self.sock.close()


@dataclass
class Watch:
    """The host service's side of failover, once a second: it decides health (the appliance
    answers, the plan is in place) and writes it where keepalived reads it, and it follows the
    role (whether this host holds LAN_IP) for `netsetup status`."""

    health_file: Path
    adverts: PeerAdverts | None = None
    role: str = ""  # "master" or "backup"; "" before the first look
    health: str = ""  # "ok", or why not
    transitions: int = 0
    last_transition: dict[str, Any] | None = None

    def tick(self, vrrp: Vrrp, appliance_ip: str, plan_in_place: bool) -> bool:
        """One look; whether anything changed (then the report is written again)."""
        health = "ok"
        if not plan_in_place:
            health = "the firewall plan is not in place"
        elif not appliance_answers(appliance_ip):
            health = f"the appliance at {appliance_ip} does not answer"
        changed = health != self.health
        if changed:
            write_health(self.health_file, health == "ok")
            self.health = health
        if self.adverts is None:
            self.adverts = PeerAdverts(vrrp.vrid)
        self.adverts.read()
        role = "master" if holds(vrrp.interface, vrrp.address) else "backup"
        if role != self.role:
            if self.role:
                self.transitions += 1
                self.last_transition = {"at": time.time(), "from": self.role, "to": role,
                                        "why": self.why(role)}  # fmt: skip
            self.role, changed = role, True
        return changed

    def why(self, role: str) -> str:
        if role == "master":
            return "no peer advertised: it stopped, or cannot be reached"
        if self.health != "ok":
            return f"gave the address up: {self.health}"
        return "a peer holds the address"

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "health": self.health, "transitions": self.transitions,
                "last_transition": self.last_transition,
                "peers": self.adverts.seen() if self.adverts else {}}  # fmt: skip


def write_health(path: Path, healthy: bool) -> None:
    """keepalived's track_file: 0 healthy, anything else a fault. A new file renamed over the
    old, so keepalived never reads half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("0\n" if healthy else "1\n")
    tmp.replace(path)
