"""The host service's side of failover, as logic: health written for keepalived, the role and
its transitions counted and explained. The real keepalived, its address and the gaps a client
sees are test_netsetup_ha_e2e.py's."""

from __future__ import annotations

from pathlib import Path

import pytest

from netsetup import detect, failover, vrrp
from netsetup.cli import failover_rows

HELD = vrrp.Vrrp(
    project="dnsapp", interface="eth0", source="192.168.1.2", peers=("192.168.1.21",),
    priority=150, vrid=53, address="192.168.1.53",
)


class Host:
    """What the watch looks at: whether the appliance answers, whether LAN_IP is here."""

    answers = True
    holds = False


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Host:
    state = Host()
    monkeypatch.setattr(failover, "appliance_answers", lambda ip, timeout=0.5: state.answers)
    monkeypatch.setattr(detect, "holds_vip", lambda interface, address: state.holds)

    class NoAdverts:
        def __init__(self, vrid: int, peers: tuple[str, ...]) -> None:
            self.vrid, self.peers = vrid, frozenset(peers)

        def read(self) -> None:
            pass

        def seen(self) -> dict:
            return {}

        def close(self) -> None:
            pass

    monkeypatch.setattr(failover, "PeerAdverts", NoAdverts)
    return state


def test_health_is_written_for_keepalived_after_two_bad_looks(host: Host, tmp_path: Path) -> None:
    """One lost query is no failure (a master would give the address up for it, and with no
    preemption not take it back); two in a row are. Health comes back at once."""
    watch = failover.Watch(tmp_path / "dnsapp.health")
    assert watch.tick(HELD, "172.31.53.53", plan_in_place=True)  # the first look is news
    assert (tmp_path / "dnsapp.health").read_text() == "0\n"
    assert not watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    host.answers = False
    assert not watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    assert (tmp_path / "dnsapp.health").read_text() == "0\n"
    assert watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    assert (tmp_path / "dnsapp.health").read_text() == "1\n"
    assert watch.health == "the appliance at 172.31.53.53 does not answer"
    host.answers = True
    assert watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    assert (tmp_path / "dnsapp.health").read_text() == "0\n"
    watch.tick(HELD, "172.31.53.53", plan_in_place=False)
    watch.tick(HELD, "172.31.53.53", plan_in_place=False)
    assert (tmp_path / "dnsapp.health").read_text() == "1\n"
    assert watch.health == "the firewall plan is not in place"
    assert not list(tmp_path.glob("*.tmp")), "written by a rename, nothing left beside it"


def test_a_host_that_starts_unhealthy_says_so_at_once(host: Host, tmp_path: Path) -> None:
    host.answers = False
    watch = failover.Watch(tmp_path / "dnsapp.health")
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    assert (tmp_path / "dnsapp.health").read_text() == "1\n"


def test_transitions_are_counted_and_explained(host: Host, tmp_path: Path) -> None:
    watch = failover.Watch(tmp_path / "dnsapp.health")
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    assert (watch.role, watch.transitions) == ("backup", 0)  # where it started is no transition
    host.holds = True
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    assert watch.transitions == 1 and watch.last_transition is not None
    assert watch.last_transition["to"] == "master"
    assert "no peer advertised" in watch.last_transition["why"]
    host.answers = False
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)  # unhealthy: keepalived gives up
    host.holds = False
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    assert watch.transitions == 2 and watch.last_transition["to"] == "backup"
    assert watch.last_transition["why"].startswith("gave the address up: the appliance")
    host.answers = True
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    assert watch.transitions == 2  # healthy again, still backup: nothing moved

    rows = dict(failover_rows(watch.as_dict()))
    assert rows["failover"] == "BACKUP (health: ok)"
    assert "2, last" in rows["  transitions"] and "master -> backup" in rows["  transitions"]
    assert "none heard" in rows["  peers"]
    assert failover_rows(None) == []


@pytest.mark.parametrize(("peers", "priority", "vrid", "words"), [
    ((), 100, 53, None),
    (("192.168.1.21", "192.168.1.21"), 100, 53, None),
    (("192.168.1.21",), 0, 53, "not a VRRP priority"),
    (("192.168.1.21",), 100, 256, "not a VRRP router id"),
    ((), 999, 53, "not a VRRP priority"),  # checked with no peer too
    (("router",), 100, 53, "not an IPv4 address"),
    (("192.168.1.53",), 100, 53, "is LAN_IP itself"),
    (("10.0.0.21",), 100, 53, "outside the LAN"),
])  # fmt: skip
def test_peers_are_checked_and_normalized(peers: tuple[str, ...], priority: int, vrid: int,
                                          words: str | None) -> None:  # fmt: skip
    if words is None:
        assert vrrp.check_peers(peers, priority, vrid, "192.168.1.53", "192.168.1.0/24") == \
            tuple(dict.fromkeys(peers))  # fmt: skip
    else:
        with pytest.raises(vrrp.BadInput, match=words):
            vrrp.check_peers(peers, priority, vrid, "192.168.1.53", "192.168.1.0/24")


def test_only_the_peers_v3_advertisements_of_our_router_id_are_kept() -> None:
    adverts = failover.PeerAdverts.__new__(failover.PeerAdverts)
    adverts.vrid, adverts.peers, adverts.last = 53, frozenset({"192.168.1.21"}), {}
    ip = bytes([0x45]) + bytes(19)  # an IPv4 header of 20 bytes, as a raw socket gives it

    def advert(version_type: int = 0x31, vrid: int = 53, priority: int = 100) -> bytes:
        return ip + bytes([version_type, vrid, priority, 1])

    adverts.take(advert(priority=0), "192.168.1.21")
    assert adverts.seen()["192.168.1.21"]["priority"] == 0
    for packet, source in ((advert(priority=200), "192.168.1.99"),  # not a peer
                           (advert(vrid=54, priority=200), "192.168.1.21"),  # another group
                           (advert(0x21, priority=200), "192.168.1.21"),  # VRRPv2
                           (ip[:10], "192.168.1.21")):  # fmt: skip
        adverts.take(packet, source)
    assert list(adverts.seen()) == ["192.168.1.21"]
    assert adverts.seen()["192.168.1.21"]["priority"] == 0


def test_a_give_up_seen_only_once_the_appliance_is_back_is_still_a_give_up(
        host: Host, tmp_path: Path) -> None:
    """keepalived acts on the health file between two looks: the look that first sees the
    address gone may already find the appliance answering again (restarted meanwhile)."""
    host.holds = True
    watch = failover.Watch(tmp_path / "dnsapp.health")
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    host.answers = False
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)  # unhealthy: keepalived gives up
    host.holds, host.answers = False, True  # both before the next look
    watch.tick(HELD, "172.31.53.53", plan_in_place=True)
    assert watch.health == "ok" and watch.last_transition["to"] == "backup"
    assert watch.last_transition["why"] == ("gave the address up: the appliance at "
                                            "172.31.53.53 does not answer")
