"""Reading the list formats people download, and the lookups the split makes of them."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from dnsproxy import domainlists
from dnsproxy.domainlists import DOMESTIC, FOREIGN, ListError, to_wire

GFWLIST = """[AutoProxy 0.2.9]
! Checksum: none
! a comment
||blocked.example
||cdn.blocked.example^
|http://page.example/some/path
|https://whole.example/
.dot.example
@@||allowed.example
/^https?:\\/\\/[^\\/]+regex\\.example/
*.wild.example
keyword.example/path
"""


def lookup(lists, name: str) -> str | None:
    return lists.group_of(to_wire(name))


def test_formats_and_the_most_specific_match(tmp_path):
    domestic = tmp_path / "accelerated-domains.china.conf"
    domestic.write_text("# comment\nserver=/shop.example/192.0.2.114\n"
                        "server=/a.example/b.example/1.2.3.4#53\n"
                        "ipset=/set.example/chnset\n"
                        "plain.example  # trailing comment\n"
                        "cn.blocked.example\n")
    foreign = tmp_path / "gfwlist.txt"
    foreign.write_text(GFWLIST)
    lists = domainlists.load([str(domestic)], [str(foreign)])
    assert lookup(lists, "shop.example") == DOMESTIC
    assert lookup(lists, "deep.www.Shop.Example.") == DOMESTIC
    assert lookup(lists, "b.example") == DOMESTIC
    assert lookup(lists, "set.example") == DOMESTIC
    assert lookup(lists, "plain.example") == DOMESTIC
    assert lookup(lists, "www.blocked.example") == FOREIGN
    assert lookup(lists, "x.cn.blocked.example") == DOMESTIC  # more specific than blocked.example
    assert lookup(lists, "whole.example") == FOREIGN
    assert lookup(lists, "dot.example") == FOREIGN
    assert lookup(lists, "cdn.blocked.example") == FOREIGN
    assert lookup(lists, "example") is None
    assert lookup(lists, "noshop.example") is None  # a suffix is whole labels only
    for skipped in ("page.example", "allowed.example", "wild.example", "keyword.example"):
        assert lookup(lists, skipped) is None
    assert lists.loaded.skipped == 5  # path, exception, regex, wildcard, keyword with a path


def test_a_name_on_both_lists_is_foreign(tmp_path):
    (tmp_path / "d").write_text("both.example\n")
    (tmp_path / "f").write_text("both.example\n")
    lists = domainlists.load([str(tmp_path / "d")], [str(tmp_path / "f")])
    assert lookup(lists, "both.example") == FOREIGN


def test_base64_gfwlist_is_decoded(tmp_path):
    encoded = tmp_path / "gfwlist.b64"
    encoded.write_text("\n".join(base64.b64encode(GFWLIST.encode()).decode()[i:i + 64]
                                 for i in range(0, 400, 64)) + "\n"
                       + base64.b64encode(GFWLIST.encode()).decode()[400:] + "\n")
    lists = domainlists.load(foreign_domains=[str(encoded)])
    assert lookup(lists, "blocked.example") == FOREIGN


@pytest.mark.parametrize("line, why", [
    ("bad name.example", "not a domain name: 'bad name.example'"),
    ("a..example", "not a domain name: 'a..example'"),
    ("-lead.example", "not a domain name: '-lead.example'"),
    ("server=shop.example", "expected server=/name/..."),
    ("conf-dir=/etc", "unknown dnsmasq option 'conf-dir'"),
    ("x" * 64 + ".example", "not a domain name"),
])
def test_a_bad_line_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "list.txt"
    path.write_text(f"good.example\n{line}\n")
    with pytest.raises(ListError) as caught:
        domainlists.load([str(path)])
    assert str(caught.value).startswith(f"{path}:2: {why}")


def test_ranges_merge_and_match(tmp_path):
    path = tmp_path / "chnroute.txt"
    path.write_text("# ranges\n198.51.100.0/25\n198.51.100.128/25\n10.0.0.0/8\n"
                    "198.51.100.5\n2001:db8::/32\n")
    lists = domainlists.load(domestic_ips=[str(path)])
    assert lists.v4 == ([int(ipaddress.ip_address("10.0.0.0")),
                         int(ipaddress.ip_address("198.51.100.0"))],
                        [int(ipaddress.ip_address("10.255.255.255")),
                         int(ipaddress.ip_address("198.51.100.255"))])
    inside = ["198.51.100.0", "198.51.100.255", "10.1.2.3", "2001:db8::1"]
    outside = ["198.51.101.0", "9.255.255.255", "11.0.0.0", "2001:db9::1", "0.0.0.0"]
    for text in inside:
        assert lists.is_domestic(ipaddress.ip_address(text).packed), text
    for text in outside:
        assert not lists.is_domestic(ipaddress.ip_address(text).packed), text
    path.write_text("198.51.100.0/33\n")
    with pytest.raises(ListError, match=r":1: not an address range: '198.51.100.0/33'"):
        domainlists.load(domestic_ips=[str(path)])


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(ListError, match="cannot read domestic domains file .*missing"):
        domainlists.load([str(tmp_path / "missing")])
