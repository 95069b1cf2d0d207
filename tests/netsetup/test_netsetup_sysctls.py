"""The IPv6 sysctls `up` sets before the engine runs, as logic over a /proc/sys of files: what
is recorded as found, what a repeated `up` keeps, how the host service adopts it, and that the
sweep after a killed service puts it back, forwarding first. The real kernel's side (the host
keeps its RA-learned route) is test_netsetup_lanmode6.py's and the lan e2e's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from netsetup_facts import facts, settings

from netsetup import host, service, state, sysctl
from netsetup.plan import compute_plan

HOST = {"net.ipv4.ip_forward": "1", "net.ipv4.neigh.eth0.proxy_delay": "80",
        "net.ipv6.conf.eth0.accept_ra": "1", "net.ipv6.conf.all.forwarding": "0",
        "net.ipv6.conf.eth0.proxy_ndp": "0", "net.ipv6.neigh.eth0.proxy_delay": "80",
        "net.ipv6.conf.eth0.forwarding": "0"}  # fmt: skip


@pytest.fixture
def proc_sys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "proc-sys"
    monkeypatch.setattr(sysctl, "PROC_SYS", root)
    monkeypatch.setenv("NETSETUP_STATE_DIR", str(tmp_path / "lib"))
    monkeypatch.setenv("NETSETUP_RUN_DIR", str(tmp_path / "run"))
    for key, value in HOST.items():
        path = sysctl._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return root


def now() -> dict[str, str]:
    return {key: sysctl.get(key) for key in HOST}


def plan():
    return compute_plan(settings("lan,ipv6"), facts("20.10"))


def test_up_sets_the_ipv6_keys_and_records_what_it_found(proc_sys: Path) -> None:
    preset = host.presets(plan(), previous=None)
    assert preset.changed == preset.found == {
        "net.ipv6.conf.eth0.accept_ra": "1", "net.ipv6.conf.all.forwarding": "0",
        "net.ipv6.conf.eth0.proxy_ndp": "0", "net.ipv6.neigh.eth0.proxy_delay": "80"}  # fmt: skip
    host.set_sysctls(plan(), preset.changed)
    assert now()["net.ipv6.conf.eth0.accept_ra"] == "2"
    assert now()["net.ipv6.conf.all.forwarding"] == "1"
    assert now()["net.ipv4.neigh.eth0.proxy_delay"] == "80", "IPv4 keys are the service's"

    # a repeated `up` finds its own values: it keeps what the first found, changes nothing
    record = replace(state.Deployment.of(settings("lan,ipv6"), facts("20.10"), "nft", ""),
                     sysctls_found=preset.found)  # fmt: skip
    again = host.presets(plan(), previous=record)
    assert again.found == preset.found and again.changed == {}

    host.restore_sysctls(preset.changed)
    assert now() == HOST


def test_the_service_adopts_what_up_found_and_the_sweep_puts_it_back(
    proc_sys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preset = host.presets(plan(), previous=None)
    host.set_sysctls(plan(), preset.changed)
    record = replace(state.Deployment.of(settings("lan,ipv6"), facts("20.10"), "nft", ""),
                     sysctls_found=preset.found)  # fmt: skip
    svc = service.HostService.__new__(service.HostService)
    svc.project, svc.deployment, svc.sysctls_before = "dnsapp", record, {}
    monkeypatch.setattr(svc, "record", lambda: None)
    found = svc.sync_sysctls(plan())
    # the service changed the IPv4 keys only, and holds the host's own values for all
    assert found == ["sysctl net.ipv4.neigh.eth0.proxy_delay was 80"]
    assert svc.sysctls_before == {**preset.found, "net.ipv4.neigh.eth0.proxy_delay": "80"}

    # killed before it wrote a report: `down`'s sweep has the record's values still
    order: list[str] = []
    real_set = sysctl.set_value
    monkeypatch.setattr(sysctl, "set_value", lambda k, v: order.append(k) or real_set(k, v))

    class NoFirewall:
        name = "nft"

        def remove(self, chains: object) -> None:
            pass

    monkeypatch.setattr(service, "get_backend", lambda name, family=4: NoFirewall())
    service.remove_host_plan(NoFirewall(), "dnsapp", {}, record)  # type: ignore[arg-type]
    assert now() == {**HOST, "net.ipv4.neigh.eth0.proxy_delay": "0"}  # the service's own key
    forwarding, accept_ra = "net.ipv6.conf.all.forwarding", "net.ipv6.conf.eth0.accept_ra"
    assert order.index(forwarding) < order.index(accept_ra), "forwarding goes off first"


def test_an_interface_that_forwarded_on_its_own_is_put_back_after_all(proc_sys: Path) -> None:
    """Writing all.forwarding writes every interface's, and so does putting it back: an
    interface that forwarded while `all` did not (a VPN's, say) is recorded, and put back after
    `all`, also when a repeated `up` keeps the first record."""
    for name, value in (("wg0", "1"),):
        path = proc_sys / "net" / "ipv6" / "conf" / name / "forwarding"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    preset = host.presets(plan(), previous=None)
    assert preset.found["net.ipv6.conf.wg0.forwarding"] == "1"
    assert "net.ipv6.conf.eth0.forwarding" not in preset.found
    keys = list(preset.found)
    wg0, forwarding = "net.ipv6.conf.wg0.forwarding", "net.ipv6.conf.all.forwarding"
    assert keys.index(wg0) < keys.index(forwarding), "recorded first: put back after `all`"
    record = replace(state.Deployment.of(settings("lan,ipv6"), facts("20.10"), "nft", ""),
                     sysctls_found=preset.found)  # fmt: skip
    again = list(host.presets(plan(), previous=record).found)
    assert again.index(wg0) < again.index(forwarding)


@pytest.mark.parametrize("key", ["/etc/crontab", "kernel.panic", "net..x", "net.ipv4/../x"])
def test_only_network_keys_name_a_file(key: str) -> None:
    """A key read back from a report names nothing outside /proc/sys/net."""
    with pytest.raises(ValueError, match="not a network sysctl"):
        sysctl._path(key)
