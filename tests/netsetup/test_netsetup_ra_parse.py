"""The router advertisement parser and what the survey makes of it, on crafted bytes.

Every advertisement is built here field by field (RFC 4861 4.2, RFC 8106 5.1 and 5.2), so each
case says exactly what it breaks; a broken one must be ignored (None), never raise.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from netsetup.dhcpv6 import Answer, client_id, information_request, parse_reply
from netsetup.ra import (
    Advert,
    DnsServer,
    Survey,
    competing,
    merge,
    parse_ra,
    router_solicitation,
    summary,
    warnings,
)

ROUTER = "fe80::1"
RDNSS1, RDNSS2 = "2001:db8::53", "fd53:1::1"


def header(flags: int = 0, lifetime: int = 1800, code: int = 0) -> bytes:
    """Type 134, code, checksum 0 (the kernel checks it), hop limit 64, flags, lifetime,
    reachable time, retransmission timer."""
    return struct.pack("!BBHBBHII", 134, code, 0, 64, flags, lifetime, 0, 0)


def rdnss(*addresses: str, lifetime: int = 600) -> bytes:
    body = struct.pack("!HI", 0, lifetime)
    body += b"".join(ipaddress.IPv6Address(a).packed for a in addresses)
    return struct.pack("!BB", 25, 1 + 2 * len(addresses)) + body


def dnssl(*names: str, lifetime: int = 600) -> bytes:
    wire = b"".join(
        b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
        for name in names
    )
    body = struct.pack("!HI", 0, lifetime) + wire
    body += b"\0" * (-(len(body) + 2) % 8)
    return struct.pack("!BB", 31, (len(body) + 2) // 8) + body


def prefix_info() -> bytes:
    """A prefix information option (type 3, length 4): skipped, but must be stepped over."""
    return struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 86400, 14400, 0) + bytes(16)


def test_a_full_advertisement_gives_router_flags_servers_and_search_list() -> None:
    packet = (header(flags=0x40, lifetime=1800) + prefix_info() + rdnss(RDNSS1, RDNSS2)
              + dnssl("lan.example", "corp.example"))  # fmt: skip
    advert = parse_ra(packet, "fe80::1%lan0", 255)
    assert advert == Advert(
        router=ROUTER, managed=False, other=True, lifetime=1800,
        dns=(DnsServer(RDNSS1, 600), DnsServer(RDNSS2, 600)),
        search=("lan.example", "corp.example"),
    )  # fmt: skip
    assert advert.dhcpv6 and advert.flags == "O"
    managed = parse_ra(header(flags=0xC0, lifetime=0), ROUTER, 255)
    assert managed is not None and managed.flags == "M+O" and managed.lifetime == 0
    assert managed.dns == () and managed.search == ()


def test_several_rdnss_options_all_count() -> None:
    packet = header() + rdnss(RDNSS1) + rdnss(RDNSS2, lifetime=0)
    advert = parse_ra(packet, ROUTER, None)
    assert advert is not None
    assert advert.dns == (DnsServer(RDNSS1, 600), DnsServer(RDNSS2, 0))


INVALID = [
    ("not an advertisement", struct.pack("!BBHI", 133, 0, 0, 0) + bytes(12), ROUTER, 255),
    ("a code other than 0", header(code=1), ROUTER, 255),
    ("shorter than its header", header()[:15], ROUTER, 255),
    ("empty", b"", ROUTER, 255),
    ("routed here (hop limit below 255)", header() + rdnss(RDNSS1), ROUTER, 254),
    ("a global source", header() + rdnss(RDNSS1), "2001:db8::1", 255),
    ("a source that is no address", header(), "router", 255),
    ("a zero-length option", header() + b"\x19\x00" + rdnss(RDNSS1), ROUTER, 255),
    ("a zero-length option last", header() + rdnss(RDNSS1) + bytes(8), ROUTER, 255),
    ("an option that runs past the end", header() + rdnss(RDNSS1)[:-1], ROUTER, 255),
    ("an option claiming more than the packet", header() + b"\x19\xff" + bytes(6),
     ROUTER, 255),
    ("half an option header", header() + b"\x19", ROUTER, 255),
]


def test_two_advertisements_of_one_router_add_up() -> None:
    """radvd and a DHCPv6 server's own advertisements on one router, or a repeat: the host
    takes the servers of both, so the survey does."""
    first = Advert(ROUTER, False, False, 1800, dns=(DnsServer(RDNSS1, 600),), search=("a.test",))
    second = Advert(ROUTER, False, True, 900, dns=(DnsServer(RDNSS2, 60),
                                                   DnsServer(RDNSS1, 0)))  # fmt: skip
    both = merge(first, second)
    assert both.other and not both.managed and both.lifetime == 900
    assert both.dns == (DnsServer(RDNSS1, 0), DnsServer(RDNSS2, 60))  # the newer lifetime wins
    assert both.search == ("a.test",)
    assert merge(None, first) == first


@pytest.mark.parametrize(("why", "packet", "source", "hops"), INVALID,
                         ids=[case[0] for case in INVALID])  # fmt: skip
def test_an_invalid_advertisement_is_ignored_whole(why, packet, source, hops) -> None:
    assert parse_ra(packet, source, hops) is None, why


def test_a_malformed_dns_option_is_ignored_alone() -> None:
    """RFC 8106: an RDNSS shorter than 3 units (or of an even length, which leaves half an
    address) is ignored, the rest of the advertisement stands; so is a DNSSL whose labels run
    off its end."""
    short = struct.pack("!BBHI", 25, 1, 0, 600)  # no address at all
    even = rdnss(RDNSS2) + bytes(8)
    even = bytes([25, 4]) + even[2:]
    broken_dnssl = struct.pack("!BBHI", 31, 2, 0, 600) + b"\x09example"  # 9 > 7 left
    long_label = struct.pack("!BBHI", 31, 2, 0, 600) + b"\x40" + bytes(7)
    packet = header(flags=0x40) + short + even + broken_dnssl + long_label + rdnss(RDNSS1)
    advert = parse_ra(packet, ROUTER, 255)
    assert advert is not None and advert.other
    assert advert.dns == (DnsServer(RDNSS1, 600),)
    assert advert.search == ()


def test_every_truncation_of_a_good_advertisement_parses_or_is_ignored() -> None:
    """Cut anywhere: no exception, and any prefix that still parses holds no more than the
    whole (an option cut in the middle invalidates the message)."""
    whole = header(0x40) + prefix_info() + rdnss(RDNSS1, RDNSS2) + dnssl("lan.example")
    full = parse_ra(whole, ROUTER, 255)
    assert full is not None
    for cut in range(len(whole)):
        part = parse_ra(whole[:cut], ROUTER, 255)
        if part is not None:
            assert set(part.dns) <= set(full.dns)
    for at in range(len(whole)):  # and every single byte changed
        for value in (0x00, 0xFF):
            parse_ra(whole[:at] + bytes([value]) + whole[at + 1 :], ROUTER, 255)


def test_the_solicitation_is_an_rs_with_nothing_else() -> None:
    assert router_solicitation() == bytes([133, 0, 0, 0, 0, 0, 0, 0])


def survey(*adverts: Advert, note: str = "", answers: tuple[Answer, ...] = (),
           dhcpv6_note: str = "") -> Survey:  # fmt: skip
    return Survey("lan0", tuple(adverts), 0.4, note, dhcpv6=answers, dhcpv6_note=dhcpv6_note)


def test_competing_servers_exclude_the_appliance_and_withdrawn_ones() -> None:
    advert = Advert(ROUTER, False, True, 1800,
                    dns=(DnsServer(RDNSS1, 600), DnsServer("fd00::53", 600),
                         DnsServer("2001:db8::99", 0)))  # fmt: skip
    found = competing(survey(advert), own=frozenset({"fd00:0::53", "192.168.1.53"}))
    assert [(c.router, c.address) for c in found] == [(ROUTER, RDNSS1)]
    assert [c.address for c in competing(survey(advert))] == [RDNSS1, "fd00::53"]


def test_up_warns_with_router_address_and_what_to_change() -> None:
    advert = Advert(ROUTER, False, False, 1800, dns=(DnsServer(RDNSS1, 600),))
    (line,) = warnings(survey(advert))
    assert f"your router {ROUTER} advertises {RDNSS1} as IPv6 DNS server (RDNSS)" in line
    assert "bypass the appliance" in line and "`netsetup routes`" in line
    assert "turn off its RDNSS" in line
    (line,) = warnings(survey(advert), own=frozenset({"fd00::53"}))
    assert "hand out the appliance's IPv6 address fd00::53 instead" in line
    dhcp = Advert("fe80::2", True, False, 1800)
    (line,) = warnings(survey(dhcp, dhcpv6_note="no DHCPv6 reply within 1 s"))
    assert "fe80::2 sets the M flag" in line
    assert "unseen here (no DHCPv6 reply within 1 s)" in line


def test_nothing_to_change_means_no_warning_and_a_quiet_summary() -> None:
    silent = Advert(ROUTER, False, False, 1800)
    only_ours = Advert(ROUTER, False, False, 1800, dns=(DnsServer("fd00::53", 600),))
    own = frozenset({"fd00::53"})
    for found in (survey(), survey(silent), survey(only_ours), survey(note="no IPv6 router "
                                                                        "seen: lan0 is down")):
        assert warnings(found, own) == []
    assert summary(survey()) == "no router advertisement within 3 s on lan0"
    assert summary(survey(silent)) == f"no other DNS server handed out (router {ROUTER})"
    assert summary(survey(only_ours), own) == summary(survey(silent))
    assert summary(survey(note="no IPv6 router seen: x")) == "no IPv6 router seen: x"
    busy = survey(Advert(ROUTER, False, True, 1800, dns=(DnsServer(RDNSS1, 600),)))
    assert summary(busy) == (f"COMPETING: {RDNSS1} (RDNSS of {ROUTER}); {ROUTER} invites "
                             "DHCPv6 (O flag), unseen: see `netsetup routes`")  # fmt: skip


def test_dhcpv6_answers_are_competitors_too_and_settle_the_flag() -> None:
    """A DHCPv6 server that answered says what the O flag leads to: its servers compete
    (the appliance's excepted), and the flag alone warns no more."""
    invites = Advert(ROUTER, False, True, 1800)
    answered = survey(invites, answers=(Answer("fe80::2", (RDNSS2, "fd00::53")),))
    (c,) = competing(answered, own=frozenset({"fd00::53"}))
    assert (c.router, c.address, c.via) == ("fe80::2", RDNSS2, "DHCPv6")
    (line,) = warnings(answered, own=frozenset({"fd00::53"}))
    assert line.startswith(f"the DHCPv6 server fe80::2 hands out {RDNSS2} as IPv6 DNS server")
    assert summary(answered, frozenset({"fd00::53"})) == (
        f"COMPETING: {RDNSS2} (DHCPv6 from fe80::2): see `netsetup routes`")
    only_ours = survey(invites, answers=(Answer("fe80::2", ("fd00::53",)),))
    assert warnings(only_ours, frozenset({"fd00::53"})) == []
    assert summary(only_ours, frozenset({"fd00::53"})).startswith("no other DNS server")


XID = b"\x01\x02\x03"


def reply(*options: tuple[int, bytes], xid: bytes = XID, kind: int = 7) -> bytes:
    return bytes([kind]) + xid + b"".join(struct.pack("!HH", c, len(d)) + d for c, d in options)


def test_the_information_request_asks_for_dns_servers_and_nothing_else() -> None:
    duid = client_id()
    packet = information_request(XID, duid)
    assert packet[0] == 11 and packet[1:4] == XID
    options, pos = {}, 4
    while pos < len(packet):
        code, size = struct.unpack_from("!HH", packet, pos)
        options[code] = packet[pos + 4 : pos + 4 + size]
        pos += 4 + size
    assert options == {1: duid, 8: b"\0\0", 6: struct.pack("!HH", 23, 24)}
    assert duid[:2] == b"\0\x04" and len(duid) == 18  # DUID-UUID: no hardware address


def test_a_dhcpv6_reply_is_parsed_strictly() -> None:
    dns = ipaddress.IPv6Address(RDNSS1).packed + ipaddress.IPv6Address(RDNSS2).packed
    server_id = (2, b"\0\x03\0\x01" + bytes(6))
    assert parse_reply(reply(server_id, (23, dns)), XID) == (RDNSS1, RDNSS2)
    assert parse_reply(reply(server_id), XID) == ()
    assert parse_reply(reply((23, dns + b"\0")), XID) == ()  # no multiple of 16: ignored alone
    assert parse_reply(reply((23, dns), xid=b"\0\0\0"), XID) is None  # not ours
    assert parse_reply(reply((23, dns), kind=2), XID) is None  # an Advertise, not a Reply
    whole = reply(server_id, (23, dns))
    for cut in range(len(whole)):  # cut anywhere: ignored, or fewer servers, never an error
        part = parse_reply(whole[:cut], XID)
        assert part is None or set(part) <= {RDNSS1, RDNSS2}


def test_a_survey_survives_its_record_and_a_damaged_one_reads_as_none() -> None:
    found = survey(Advert(ROUTER, False, True, 1800, dns=(DnsServer(RDNSS1, 600),),
                          search=("lan.example",)))  # fmt: skip
    import json

    assert Survey.from_dict(json.loads(json.dumps(found.as_dict()))) == found
    for bad in (None, {}, "x", {**found.as_dict(), "adverts": [{"router": 1}]},
                {**found.as_dict(), "at": "soon"}):  # fmt: skip
        assert Survey.from_dict(bad) is None


def test_status_shows_the_recorded_line_with_its_age() -> None:
    from netsetup.cli import ipv6_dns_row, status_rows

    assert ipv6_dns_row(None) == "not listened for yet: run netsetup check"
    import time

    row = ipv6_dns_row({"summary": "COMPETING: fd53::1 (RDNSS of fe80::1): see `netsetup "
                                   "routes`", "at": time.time() - 42, "interface": "lan0"})
    assert row.startswith("COMPETING: fd53::1 (RDNSS of fe80::1)")
    assert row.endswith("(42 s ago, on lan0)")
    info = {"up": False, "engine": {"error": "x"}, "iptables": "nft",
            "sysctl": {"net.ipv4.ip_forward": "0"}}  # fmt: skip
    assert dict(status_rows(info))["IPv6 DNS"] == "not listened for yet: run netsetup check"


def test_routes_say_stop_advertising_until_the_appliance_has_an_ipv6_address() -> None:
    from netsetup.routes import ipv6_dns_sections, render_text

    stop = render_text(ipv6_dns_sections(None, "192.168.1.53"))
    for line in ("uci set dhcp.lan.ra_dns='0'", "uci set dhcp.lan.dns_service='0'",
                 "uci -q delete dhcp.lan.dns", "/etc/init.d/odhcpd restart",
                 "/ipv6 nd set [find interface=bridge] advertise-dns=no",
                 "other-configuration=no", "remove the RDNSS { ... }; block",
                 "AdvOtherConfigFlag off;", "ipv6.ignore-auto-dns yes",
                 "[IPv6AcceptRA] UseDNS=no and [DHCPv6] UseDNS=no",
                 'networksetup -setdnsservers "Wi-Fi" 192.168.1.53'):  # fmt: skip
        assert line in stop, line
    assert "fd00" not in stop and "IPv6 DNS: what the LAN's routers" not in stop
    handed = render_text(ipv6_dns_sections("fd00::53", "192.168.1.53", ["heard this"]))
    for line in ("uci add_list dhcp.lan.dns='fd00::53'", "advertise-dns=yes dns=fd00::53",
                 "RDNSS fd00::53 { };", "ipv6.dns fd00::53",
                 'netsh interface ipv6 set dnsservers name="Ethernet" static fd00::53 primary',
                 'networksetup -setdnsservers "Wi-Fi" 192.168.1.53 fd00::53', "heard this"):
        assert line in handed, line
    assert "ra_dns='0'" not in handed and "advertise-dns=no" not in handed
