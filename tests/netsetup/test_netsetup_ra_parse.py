"""The router advertisement parser and what the survey makes of it, on crafted bytes.

Every advertisement is built here field by field (RFC 4861 4.2, RFC 8106 5.1 and 5.2), so each
case says exactly what it breaks; a broken one must be ignored (None), never raise.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from netsetup.ra import (
    Advert,
    DnsServer,
    Survey,
    competing,
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


@pytest.mark.parametrize(
    ("why", "packet", "source", "hops"),
    [
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
    ],
)
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


def survey(*adverts: Advert, note: str = "") -> Survey:
    return Survey("lan0", tuple(adverts), 0.4, note)


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
    (line,) = warnings(survey(dhcp))
    assert "fe80::2 sets the M flag" in line and "cannot see" in line


def test_nothing_to_change_means_no_warning_and_a_quiet_summary() -> None:
    silent = Advert(ROUTER, False, False, 1800)
    only_ours = Advert(ROUTER, False, False, 1800, dns=(DnsServer("fd00::53", 600),))
    own = frozenset({"fd00::53"})
    for found in (survey(), survey(silent), survey(only_ours), survey(note="no IPv6 router "
                                                                        "seen: lan0 is down")):
        assert warnings(found, own) == []
    assert summary(survey()) == "no router advertisement within 3 s on lan0"
    assert summary(survey(silent)) == f"no other DNS server advertised (router {ROUTER})"
    assert summary(survey(only_ours), own) == summary(survey(silent))
    assert summary(survey(note="no IPv6 router seen: x")) == "no IPv6 router seen: x"
    busy = survey(Advert(ROUTER, False, True, 1800, dns=(DnsServer(RDNSS1, 600),)))
    assert summary(busy).startswith(f"COMPETING: {RDNSS1} (RDNSS of {ROUTER}); {ROUTER} "
                                    "invites DHCPv6 (O flag)")  # fmt: skip


def test_a_survey_survives_its_record_and_a_damaged_one_reads_as_none() -> None:
    found = survey(Advert(ROUTER, False, True, 1800, dns=(DnsServer(RDNSS1, 600),),
                          search=("lan.example",)))  # fmt: skip
    import json

    assert Survey.from_dict(json.loads(json.dumps(found.as_dict()))) == found
    for bad in (None, {}, "x", {**found.as_dict(), "adverts": [{"router": 1}]},
                {**found.as_dict(), "at": "soon"}):  # fmt: skip
        assert Survey.from_dict(bad) is None
