"""The host service's side of failover (vrrp.py), once a second between its syncs: it decides
whether this host may hold LAN_IP and tells keepalived, and it follows what keepalived did.

Health is a real answer: the appliance answers a query at its own address (the question its own
health check asks, answered without any upstream: nothing leaves the host), and the firewall
plan is in place. One lost query or one failed sync is no failure: a master gives the address up
after FAILS_BEFORE_FAULT bad looks in a row, and with no preemption it does not take it back.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnsproxy import healthcheck
from netsetup import detect, state
from netsetup.vrrp import Vrrp

HEALTH_INTERVAL = 1.0  # seconds between the host service's looks (service.main)
FAILS_BEFORE_FAULT = 2
VRRP_PROTOCOL = 112
VRRP_V3_ADVERT = 0x31  # version 3, type 1


def appliance_answers(ip: str, timeout: float = 0.5) -> bool:
    """Whether the appliance answers, at its own address, what its own health check asks."""
    return bool(healthcheck.check(ip, 53, timeout))


class PeerAdverts:
    """The peers' VRRP advertisements as this host hears them (a raw socket, read without
    waiting at each look): a backup hears the master's every ADVERT_INTERVAL, a master hears
    nothing while its peers are backups (they stay silent) or down."""

    def __init__(self, vrid: int, peers: tuple[str, ...]) -> None:
        self.vrid, self.peers = vrid, frozenset(peers)
        self.last: dict[str, tuple[float, int]] = {}  # peer -> (when, its priority)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTOCOL)
        self.sock.setblocking(False)

    def read(self) -> None:
        while True:
            try:
                packet, (source, _) = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            self.take(packet, source)

    def take(self, packet: bytes, source: str) -> None:
        """One packet as a raw socket gives it (IPv4 header first): kept if it is a VRRPv3
        advertisement of our router id from a peer."""
        header = (packet[0] & 0x0F) * 4 if packet else 0
        if source not in self.peers or len(packet) < header + 3:
            return
        if packet[header] == VRRP_V3_ADVERT and packet[header + 1] == self.vrid:
            self.last[source] = (time.time(), packet[header + 2])

    def seen(self) -> dict[str, dict[str, Any]]:
        """Each peer heard: when last, at which priority (0: it gave the address up)."""
        return {peer: {"at": at, "priority": priority}
                for peer, (at, priority) in self.last.items()}  # fmt: skip

    def close(self) -> None:
        self.sock.close()


@dataclass
class Watch:
    """Health, written where keepalived reads it, and the role (whether this host holds
    LAN_IP) with its transitions, for `netsetup status`."""

    health_file: Path
    adverts: PeerAdverts | None = None
    role: str = ""  # "master" or "backup"; "" before the first look
    health: str = ""  # "ok", or why not
    fails: int = 0  # bad looks in a row
    transitions: int = 0
    last_transition: dict[str, Any] | None = None

    def tick(self, vrrp: Vrrp, appliance_ip: str, plan_in_place: bool) -> bool:
        """One look; whether anything changed (then the report is written again)."""
        problem = ""
        if not plan_in_place:
            problem = "the firewall plan is not in place"
        elif not appliance_answers(appliance_ip):
            problem = f"the appliance at {appliance_ip} does not answer"
        self.fails = self.fails + 1 if problem else 0
        before = self.health  # a role change seen with a recovery was the failure's doing
        health = problem if self.fails >= FAILS_BEFORE_FAULT else "ok"
        if self.health == "" and problem:
            health = problem  # at start, nothing is known good yet
        changed = health != self.health
        if changed:
            write_health(self.health_file, health == "ok")
            self.health = health
        self.listen(vrrp)
        role = "master" if detect.holds_vip(vrrp.interface, vrrp.address) else "backup"
        if role != self.role:
            if self.role:
                self.transitions += 1
                self.last_transition = {"at": time.time(), "from": self.role, "to": role,
                                        "why": self.why(role, before)}  # fmt: skip
            self.role, changed = role, True
        return changed

    def listen(self, vrrp: Vrrp) -> None:
        wanted = (vrrp.vrid, frozenset(vrrp.peers))
        if self.adverts and (self.adverts.vrid, self.adverts.peers) != wanted:
            self.close()  # another router id or other peers: listen for those
        if self.adverts is None:
            self.adverts = PeerAdverts(vrrp.vrid, vrrp.peers)
        self.adverts.read()

    def why(self, role: str, before: str = "") -> str:
        """Why the role changed; `before`: the health at the last look. keepalived acts on a
        bad health between two looks, and the appliance may be answering again by the next,
        which then sees the new role with the health already back."""
        if role == "master":
            return "no peer advertised: it stopped, or cannot be reached"
        if self.health != "ok":
            return f"gave the address up: {self.health}"
        if before not in ("", "ok"):
            return f"gave the address up: {before}"
        return "a peer holds the address"

    def close(self) -> None:
        if self.adverts is not None:
            self.adverts.close()
            self.adverts = None

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "health": self.health, "transitions": self.transitions,
                "last_transition": self.last_transition,
                "peers": self.adverts.seen() if self.adverts else {}}  # fmt: skip


def write_health(path: Path, healthy: bool) -> None:
    """keepalived's track_file: 0 healthy, anything else a fault (written by a rename, so
    keepalived never reads half a file)."""
    state.write_text(path, "0\n" if healthy else "1\n")
