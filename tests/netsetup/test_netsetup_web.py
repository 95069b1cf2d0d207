"""The host side of the forwarder's web page, with no host touched: the plan's rules for it in
every mode and family, the settings that turn it on and place it, the compose overlay that
serves and publishes it, its password carried through the engine's archive calls, where `up`
and `status` say it is."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from netsetup_facts import LAN_CIDR6, LAN_IP, LAN_IP6, facts, settings

from dnsproxy.defaults import DNS_PORT, WEB_PORT
from netsetup import plan as plan_mod
from netsetup import webpage
from netsetup.cli import status_rows
from netsetup.deploy import Compose, compose_command
from netsetup.detect import check_port_free
from netsetup.errors import BadInput, NetsetupError, PortTaken
from netsetup.firewall import get_backend
from netsetup.firewall.model import FirewallPlan, Rule
from netsetup.host import compose_for
from netsetup.plan import Settings, check_settings, compute_plan, input_chain, lan_chain
from netsetup.state import Deployment

LAN = "192.168.1.0/24"  # netsetup_facts' LAN
MODES = ["port", "direct", "lan", "both", "port,direct,lan", "lan,ipv6", "lan,ha", "lan,ipv6,ha"]


def families(mode: str, web: bool = True) -> list[tuple[FirewallPlan, str, str, str | None]]:
    """Each family's firewall with its served LAN, the appliance's address as DNAT writes it,
    and the LAN address translated to it (None outside lan mode); IPv6 only where the page is
    served over it (plan.WEB_OVER_IPV6)."""
    s = replace(settings(mode), web=web)
    plan = compute_plan(s, facts("28", "nft"))
    out = [(plan.firewall, LAN, s.ip, s.lan_ip if s.lan else None)]
    if plan.firewall6.chains and plan_mod.WEB_OVER_IPV6:
        out.append((plan.firewall6, LAN_CIDR6, f"[{s.ip6}]", s.lan_ip6))
    return out


def web_rules(fw: FirewallPlan) -> list[Rule]:
    return [r for r in fw.rules if r.dport == WEB_PORT]


@pytest.mark.parametrize("mode", MODES)
def test_the_page_is_let_in_from_the_lan_as_dns_is(mode: str) -> None:
    """One filter rule per family: the served LAN to the appliance's port 80 over TCP, with
    exactly the matches of the LAN's DNS/tcp rule (same source, interfaces, destination); in
    lan mode LAN_IP:80 (LAN_IP6:80) is translated to it in the chain that translates DNS."""
    for fw, served, to_address, lan_ip in families(mode):
        (accept,) = [r for r in web_rules(fw) if r.table == "filter"]
        dns = next(r for r in fw.rules_in("filter") if r.dport == DNS_PORT and r.protocol == "tcp")
        assert accept.source == served and accept.target == "ACCEPT"
        assert replace(accept, dport=DNS_PORT, comment=dns.comment) == dns
        assert accept.comment == "dnsapp: LAN to appliance web page"
        # before the default deny, like every rule that lets something in
        drop = next(r for r in fw.rules if r.target == "DROP" and r.chain == accept.chain)
        assert fw.rules.index(accept) < fw.rules.index(drop)
        dnat = [r for r in web_rules(fw) if r.target == "DNAT"]
        if lan_ip is None:
            assert dnat == []
            continue
        (rule,) = dnat
        assert (rule.chain, rule.destination, rule.protocol, rule.to_destination) == (
            lan_chain("dnsapp"), lan_ip, "tcp", f"{to_address}:{WEB_PORT}")  # fmt: skip
        dns_nat = next(r for r in fw.rules if r.target == "DNAT" and r.protocol == "tcp")
        assert dns_nat.chain == rule.chain and dns_nat.destination == rule.destination


@pytest.mark.parametrize("over_ipv6", [False, True])
def test_the_page_is_ipv4_s_until_the_forwarder_listens_on_ipv6(monkeypatch, over_ipv6: bool
                                                                ) -> None:  # fmt: skip
    """The forwarder serves its page on one address, IPv4's: with LAN_IP6 the IPv6 plan opens
    nothing for it, and LAN_IP6 is not shown as its address. Switched on (WEB_OVER_IPV6), the
    IPv6 share gets what IPv4 has: the LAN prefix let in, LAN_IP6:80 translated."""
    monkeypatch.setattr(plan_mod, "WEB_OVER_IPV6", over_ipv6)
    for mode in ("lan,ipv6", "port,direct,lan,ipv6", "lan,ipv6,ha"):
        fw6 = compute_plan(settings(mode), facts("28", "nft")).firewall6
        rules = {(r.table, r.source, r.destination, r.to_destination) for r in web_rules(fw6)}
        expected = {("filter", LAN_CIDR6, "fd53:53::53", None),
                    ("nat", None, LAN_IP6, "[fd53:53::53]:80")}  # fmt: skip
        assert rules == (expected if over_ipv6 else set()), mode
        shown = webpage.urls(settings(mode), "192.168.1.2")
        assert (f"http://[{LAN_IP6}]/" in shown) is over_ipv6 and f"http://{LAN_IP}/" in shown


@pytest.mark.parametrize("mode", MODES)
def test_without_the_page_its_rules_alone_are_gone(mode: str) -> None:
    """WEB=0: no rule names port 80, and everything else is the plan with the page on."""
    for (on, *_), (off, *_) in zip(families(mode), families(mode, web=False), strict=True):
        assert not web_rules(off)
        assert off.rules == [r for r in on.rules if r.dport != WEB_PORT]
        assert (off.chains, off.hooks) == (on.chains, on.hooks)


@pytest.mark.parametrize("mode", ["lan,ha", "lan,ipv6,ha"])
def test_with_ha_the_page_at_the_shared_address_never_meets_the_input_drop(mode: str) -> None:
    """The master holds LAN_IP itself, and its INPUT chain drops everything at LAN_IP but ICMP.
    The page still answers there: the LAN chain, hooked from PREROUTING, turns LAN_IP:80 into
    the appliance's address before the routing decision, so the connection is forwarded into the
    bridge (our filter chain lets the LAN in) and never reaches INPUT, whose DROP matches LAN_IP
    only. Nothing in the INPUT chain names the page's port."""
    for fw, _, to_address, lan_ip in families(mode):
        assert lan_ip in (LAN_IP, LAN_IP6)
        hooked = {(h.table, h.chain, h.target) for h in fw.hooks}
        assert ("nat", "PREROUTING", lan_chain("dnsapp")) in hooked
        assert ("filter", "INPUT", input_chain("dnsapp")) in hooked
        (dnat,) = [r for r in web_rules(fw) if r.target == "DNAT"]
        assert dnat.to_destination == f"{to_address}:{WEB_PORT}"
        assert not dnat.to_destination.startswith(lan_ip)
        inputs = [r for r in fw.rules if r.chain == input_chain("dnsapp")]
        assert inputs and all(r.dport is None for r in inputs)
        drops = [r for r in inputs if r.target == "DROP" and r.destination]
        assert {r.destination for r in drops} == {lan_ip}
        (accept,) = [r for r in web_rules(fw) if r.table == "filter"]
        assert accept.destination == to_address.strip("[]")


def test_the_page_s_port_is_checked_only_when_the_page_is_on() -> None:
    base = settings("both")
    for port, word in ((0, "is not a port"), (70000, "is not a port"), (5053, "is --port too")):
        with pytest.raises(BadInput, match=f"--web-port {port} {word}"):
            check_settings(replace(base, web_port=port))
        check_settings(replace(base, web=False, web_port=port))  # off: no port of its own
    assert check_settings(replace(base, web_port=8080)).web_port == 8080


def test_a_record_from_before_the_page_reads_as_a_deployment_without_it() -> None:
    """A deployment record older than the page describes containers without one: its plan (the
    host service reads it at every sync) opens nothing for a page; a new record keeps both
    settings, and reads back equal."""
    old = Deployment.from_json('{"settings": {"mode": "both", "ip": "172.31.53.53"}}')
    assert old.to_settings().web is False
    fresh = replace(settings("both"), web_port=8081)
    record = Deployment.of(fresh, facts("28", "nft"), "auto", "")
    assert (record.settings["web"], record.settings["web_port"]) == (True, 8081)
    again = Deployment.from_json(json.dumps({"settings": record.settings}))
    assert again.to_settings() == fresh


# ---- compose: the overlay, read only with the page on --------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def config_of(s: Settings) -> tuple[Compose, str]:
    """The compose run `up` makes for `s` on netsetup_facts' host, and `compose config`'s text
    for it (the files read, no engine asked)."""
    try:
        compose_command()
    except NetsetupError:
        pytest.skip("no compose tool")
    host_facts = facts("28", "nft")
    compose = compose_for(s, REPO / "compose.yaml", compute_plan(s, host_facts), host_facts,
                          get_backend("nft"))  # fmt: skip
    proc = compose.run("config", check=False)
    assert proc.returncode == 0, proc.stderr
    return compose, proc.stdout


def published(config: str) -> set[str]:
    """The forwarder's published ports as compose renders them, in the short form (1.29) or
    rebuilt from the long one (Compose v2)."""
    found, lines = set(), config.splitlines()
    for number, line in enumerate(lines):
        text = line.strip().removeprefix("- ")
        if text.count(":") == 2 and text.endswith(("/tcp", "/udp")):
            found.add(text.strip("'\""))
        elif text.startswith("target: "):  # v2: mode, host_ip, target, published, protocol
            block = dict(ln.strip().removeprefix("- ").split(": ", 1)
                         for ln in lines[number - 2:number + 3] if ": " in ln)  # fmt: skip
            found.add(f"{block.get('host_ip')}:{block.get('published', '').strip(chr(34))}:"
                      f"{block['target']}/{block.get('protocol', 'tcp')}")
    return found


def test_the_page_is_configured_and_published_as_dns_is() -> None:
    """With the page on compose reads compose.web.yaml too: the forwarder serves the page on
    the container's port 80 with its password in the state volume, and WEB_PORT is published as
    PORT is (port mode: the host's LAN address; loopback always). Off, nothing of it is read,
    and nothing publishes port 80."""
    compose, config = config_of(settings("port"))
    assert compose.overlays == (REPO / "compose.web.yaml",)
    assert compose.variables["WEB_PORT"] == "8053"
    assert "DNSPROXY_WEB: 0.0.0.0:80" in config
    assert "DNSPROXY_WEB_PASSWORD_FILE: /var/lib/dnsproxy/web-password" in config
    assert {"192.168.1.2:8053:80/tcp", "127.0.0.1:8053:80/tcp",
            "192.168.1.2:5053:53/tcp"} <= published(config)  # fmt: skip

    # direct mode publishes on loopback only, the page as DNS
    _, config = config_of(replace(settings("direct"), web_port=8099))
    ports = published(config)
    assert {"127.0.0.2:8099:80/tcp", "127.0.0.1:8099:80/tcp"} <= ports, ports
    assert not [p for p in ports if p.startswith("192.168.1.2:")], ports

    compose, config = config_of(settings("lan,ipv6"))
    assert compose.overlays[-1] == REPO / "compose.web.yaml"
    assert "DNSPROXY_WEB: 0.0.0.0:80\n" in config  # one address: IPv4's

    compose, config = config_of(replace(settings("port"), web=False))
    assert compose.overlays == () and "WEB_PORT" not in compose.variables
    assert "DNSPROXY_WEB" not in config
    assert not [p for p in published(config) if p.endswith(":80/tcp")], config


def test_the_page_s_port_taken_is_named_as_its_own_and_only_over_tcp() -> None:
    """A TCP listener on WEB_PORT refuses `up` naming --web-port; a UDP socket there does not
    (the page is TCP only), where it would for DNS's --port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("0.0.0.0", 0))
        port = holder.getsockname()[1]
        check_port_free(port, "--web-port (WEB_PORT)", udp=False)
        with pytest.raises(PortTaken, match="choose another --port$"):
            check_port_free(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortTaken, match=rf"{port}/tcp .* choose another --web-port"):
            check_port_free(port, "--web-port (WEB_PORT)", udp=False)


# ---- the password, through the engine's archive calls --------------------------------------------


class Missing(Exception):
    """What docker's SDK raises for a path the container does not have (NotFound, a 404)."""

    status_code = 404


class FakeContainer:
    """docker's Container as far as the password needs it: get_archive and put_archive, on
    files held in memory. The forwarder writes its own file after `appears_after` reads."""

    def __init__(self, own: str | None = None, appears_after: int = 0) -> None:
        self.files: dict[str, bytes] = {}
        self.own, self.appears_after = own, appears_after
        self.reads, self.puts = 0, []

    def get_archive(self, path: str):
        self.reads += 1
        if self.own is not None and self.reads > self.appears_after:
            self.files.setdefault(path, f"{self.own}\n".encode())
        if path not in self.files:
            raise Missing(path)
        data = self.files[path]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:  # as the engine answers: the base name
            member = tarfile.TarInfo(path.rsplit("/", 1)[-1])
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        raw = buffer.getvalue()
        return iter([raw[:100], raw[100:]]), {"name": member.name, "size": len(data)}

    def put_archive(self, path: str, data: bytes) -> bool:
        self.puts.append((path, data))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                handle = tar.extractfile(member)
                assert handle is not None
                self.files[f"{path}/{member.name}"] = handle.read()
        return True


class Clock:
    """time.monotonic and time.sleep for the retries, without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_password_archive_is_the_file_the_forwarder_makes() -> None:
    """One member, named as the forwarder's file, a regular file of the appliance's user and
    group with mode 0600, holding the password on its one line; read back as it was given."""
    data = webpage.password_archive("correct horse", mtime=1_700_000_000)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        (member,) = tar.getmembers()
        content = tar.extractfile(member).read()  # type: ignore[union-attr]
    assert member.name == "web-password" and member.isfile()
    assert (member.mode, member.uid, member.gid) == (0o600, 10053, 10053)
    assert member.mtime == 1_700_000_000
    assert content == b"correct horse\n"
    assert webpage.password_from_archive(data) == "correct horse"
    assert f"{webpage.PASSWORD_DIR}/{member.name}" == webpage.PASSWORD_PATH


def test_what_is_no_password_reads_as_none() -> None:
    """An empty file (the forwarder still writing it), no file, not a tar: no password; of a
    longer file only the first line counts."""
    def archive(text: bytes, name: str = "web-password") -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            member = tarfile.TarInfo(name)
            member.size = len(text)
            tar.addfile(member, io.BytesIO(text))
        return buffer.getvalue()

    assert webpage.password_from_archive(archive(b"")) is None
    assert webpage.password_from_archive(archive(b"\n")) is None
    assert webpage.password_from_archive(archive(b"pw", name="other")) is None
    assert webpage.password_from_archive(b"not a tar archive") is None
    assert webpage.password_from_archive(archive(b"first\r\nsecond\n")) == "first"


def test_a_given_password_is_written_once_the_forwarder_made_its_own() -> None:
    """`up` waits for the forwarder's own file (it may still be creating it at start, and would
    write over an earlier one), then replaces it with WEB_PASSWORD into the state directory,
    and reads back what the forwarder now has."""
    clock = Clock()
    container = FakeContainer(own="generated", appears_after=3)
    got = webpage.settle_password(container, "mine", sleep=clock.sleep, clock=clock)
    assert got == "mine" and container.reads == 5  # three misses, the forwarder's, ours
    ((path, data),) = container.puts
    assert path == "/var/lib/dnsproxy" and webpage.password_from_archive(data) == "mine"
    assert container.files["/var/lib/dnsproxy/web-password"] == b"mine\n"


def test_the_same_or_no_password_given_writes_nothing() -> None:
    clock = Clock()
    same = FakeContainer(own="mine")
    assert webpage.settle_password(same, "mine", sleep=clock.sleep, clock=clock) == "mine"
    none = FakeContainer(own="generated")
    assert webpage.settle_password(none, None, sleep=clock.sleep, clock=clock) == "generated"
    assert same.puts == none.puts == []


def test_a_password_never_written_is_none_after_the_wait_and_other_errors_raise() -> None:
    """No file within the wait: None (a warning for `up`, not a failure); given one then, it is
    written all the same. An engine error that is not a missing file is raised."""
    clock = Clock()
    silent = FakeContainer()
    assert webpage.settle_password(silent, None, timeout=2, sleep=clock.sleep, clock=clock) is None
    assert clock.now >= 2 and silent.reads > 1
    assert webpage.settle_password(silent, "mine", timeout=2, sleep=clock.sleep,
                                   clock=clock) == "mine"  # fmt: skip

    class Broken(FakeContainer):
        def get_archive(self, path: str):
            raise OSError("engine went away")

    with pytest.raises(OSError, match="went away"):
        webpage.read_password(Broken(), timeout=5, sleep=clock.sleep, clock=clock)


@pytest.mark.parametrize(("text", "word"), [
    ("", "is empty"), ("two\nlines", "line break"), ("cr\r", "line break"),
    (" padded", "blank"), ("padded\t", "blank"),
])  # fmt: skip
def test_a_password_the_forwarder_could_not_read_back_is_refused(text: str, word: str) -> None:
    with pytest.raises(BadInput, match=word):
        webpage.checked_password(text)
    assert webpage.checked_password("a b c") == "a b c"


@pytest.mark.parametrize(("mode", "expected"), [
    ("lan", ["http://192.168.1.53/"]),
    ("lan,ipv6", ["http://192.168.1.53/"]),  # the page is IPv4's (WEB_OVER_IPV6)
    ("direct", ["http://172.31.53.53/"]),
    ("port", ["http://192.168.1.2:8053/"]),
    ("both", ["http://172.31.53.53/", "http://192.168.1.2:8053/"]),
    ("port,direct,lan,noweb", []),
])  # fmt: skip
def test_the_page_is_where_each_mode_puts_it(mode: str, expected: list[str]) -> None:
    assert webpage.urls(settings(mode), "192.168.1.2") == expected


def test_status_rows_show_where_the_page_is_and_its_password() -> None:
    urls = ["http://172.31.53.53/", "http://192.168.1.2:8053/"]
    rows = status_rows({**STATUS, "web": {"on": True, "urls": urls, "password": "pw"}})
    assert [r for r in rows if r[0] in ("web page", "  password")] == [
        ("web page", urls[0]), ("web page", urls[1]), ("  password", "pw")]
    rows = dict(status_rows({**STATUS, "web": {"on": True, "urls": urls[:1], "password": None,
                                               "error": "the forwarder has not written it yet"}}))
    assert rows["  password"] == "unreadable: the forwarder has not written it yet"
    assert dict(status_rows({**STATUS, "web": {"on": False}}))["web page"] == "off (WEB=0)"
    assert "web page" not in dict(status_rows(STATUS))  # not deployed: nothing to say


STATUS = {"up": True, "engine": {"version": "28.5.2", "firewall": "iptables"}, "service": None,
          "host_service": {}, "iptables": "nft", "sysctl": {}}


def test_make_gives_netsetup_the_page_s_settings_and_the_password_in_its_environment(
    tmp_path: Path,
) -> None:
    """WEB and WEB_PORT become options; WEB_PASSWORD reaches netsetup's environment only, never
    its command line (`ps` shows that to every user) nor what make echoes."""
    fake = tmp_path / "netsetup"
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "env: ${NETSETUP_WEB_PASSWORD-unset}"\n')
    fake.chmod(0o755)

    def up(*variables: str) -> str:
        proc = subprocess.run(["make", "-o", "venv", "-o", "deps", "-o", "image", "up",
                               f"NETSETUP={fake}", *variables],
                              capture_output=True, text=True, cwd=REPO)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = up("WEB_PASSWORD=s3cret word")
    assert "env: s3cret word\n" in out
    assert out.count("s3cret") == 1, out  # the environment's line alone
    assert " --web --web-port 8053 " in out
    out = up("WEB=0", "WEB_PORT=8099")
    assert " --no-web " in out and "8099" not in out and "env: \n" in out
    assert " --web --web-port 8099 " in up("WEB_PORT=8099")
