"""Domain and address lists for split DNS: which names go to which upstream group, and which
answer addresses count as domestic.

Domains are kept in one dict from the name in wire form (lower-cased, length-prefixed labels)
to its group, so a lookup walks the query's own bytes label by label, longest suffix first, and
the first hit is the most specific match: a handful of dict probes, no decoding, no regex. A
name on both lists is foreign: the trusted path never gives a poisoned answer, the domestic one
may. Address ranges are merged into sorted (start, end) pairs per family and found by bisection.

Domain files accept one name a line, `#` comments, dnsmasq lines (`server=/a.com/b.org/1.2.3.4`,
also `ipset=` and `nftset=`), and the plain domains of a decoded (or base64) gfwlist:
`||name`, `|http://name/...`, `.name`. gfwlist rules that map to no whole domain (exceptions,
regexes, wildcards, URL paths, comments) are skipped and counted. Anything else is an error,
reported as `FILE:LINE: why`.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import heapq
import io
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

DOMESTIC = "domestic"
FOREIGN = "foreign"

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\Z")  # one match per name, not one per label
DNSMASQ_KEYS = ("server", "ipset", "nftset")  # the ones domain lists ship as
GFWLIST_HEADER = "[AutoProxy"
SORT_STEP = 2048  # ranges sorted at once, then merged: a short hold of the GIL each


class ListError(ValueError):
    """A line that is neither a domain nor something we knowingly skip: `FILE:LINE: why`."""


def to_wire(name: str) -> bytes:
    """`Example.COM.` -> b'\\x07example\\x03com\\x00'; ValueError saying why when it is no name."""
    text = name.strip().rstrip(".").lower()
    if not text:
        raise ValueError("empty name")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"not a domain name: {name!r}") from None
    if not NAME.match(text):
        raise ValueError(f"not a domain name: {name!r}")
    wire = "".join([chr(len(label)) + label for label in text.split(".")]).encode("latin-1")
    if len(wire) > 254:
        raise ValueError(f"name longer than 255 bytes: {name!r}")
    return wire + b"\0"


@dataclass
class Loaded:
    """What was read, for the start-up log line."""

    domains: int = 0
    ranges: int = 0
    skipped: int = 0  # gfwlist rules with no whole-domain meaning
    files: list[str] = field(default_factory=list)


# The names are spread over this many dicts (a power of two), by hash: a reload builds them in
# a thread, and one dict of 100k names doubling its table held the GIL, and so the event loop,
# 5 ms in one piece (at 87k names); an eighth of that grows in steps under a millisecond.
SHARDS = 8


class DomainLists:
    """The groups of names and the domestic address ranges; immutable once built."""

    def __init__(self) -> None:
        self.shards: tuple[dict[bytes, str], ...] = tuple({} for _ in range(SHARDS))
        self.v4: tuple[list[int], list[int]] = ([], [])  # starts, ends
        self.v6: tuple[list[int], list[int]] = ([], [])
        self.loaded = Loaded()

    def group_of(self, qname: bytes) -> str | None:
        """The group of the most specific listed suffix of `qname` (a lower-cased wire name,
        as the question key holds it), or None when no suffix is listed."""
        if not self.loaded.domains:
            return None
        shards = self.shards
        off = 0
        end = len(qname)
        while off < end:
            suffix = qname[off:] if off else qname
            hit = shards[hash(suffix) & (SHARDS - 1)].get(suffix)  # bytes keep their hash
            if hit is not None:
                return hit
            length = qname[off]
            if not length:
                return None
            off += 1 + length
        return None

    def listed_at(self, qname: bytes) -> int:
        """The offset in `qname` of its most specific listed suffix, -1 when none is listed:
        how specific the lists are about a name, for the zone router to compare with."""
        shards = self.shards
        off = 0
        end = len(qname)
        while self.loaded.domains and off < end:
            suffix = qname[off:] if off else qname
            if suffix in shards[hash(suffix) & (SHARDS - 1)]:
                return off
            length = qname[off]
            if not length:
                break
            off += 1 + length
        return -1

    def is_domestic(self, address: bytes) -> bool:
        """Whether a packed A or AAAA address lies in a domestic range."""
        starts, ends = self.v4 if len(address) == 4 else self.v6
        value = int.from_bytes(address, "big")
        index = bisect.bisect_right(starts, value) - 1
        return index >= 0 and value <= ends[index]

    def covers(self, address: bytes) -> bool:
        """Whether any range of the address's family is listed."""
        return bool((self.v4 if len(address) == 4 else self.v6)[0])


def _decode_gfwlist(text: str) -> str:
    """gfwlist ships base64-encoded; a file that decodes to an AutoProxy list is read as such.
    Judged by its head first: a plain list of 100k names is never split and joined whole."""
    if GFWLIST_HEADER in text[:200]:
        return text
    head = "".join(text.lstrip()[:4096].split())
    if not head or not re.fullmatch(r"[A-Za-z0-9+/=]+", head):
        return text
    compact = "".join(text.split())
    if len(compact) % 4:
        return text
    try:
        decoded = base64.b64decode(compact, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return text
    return decoded if decoded.lstrip().startswith(GFWLIST_HEADER) else text


def _gfwlist_host(line: str) -> str | None:
    """The whole domain an AutoProxy rule names, or None for one that names no whole domain."""
    if line.startswith(("!", "[", "@@", "/")) or "*" in line:
        return None
    if line.startswith("||"):
        host = line[2:]
    elif line.startswith("|"):
        host = line[1:]
        for scheme in ("http://", "https://"):
            if host.startswith(scheme):
                host = host[len(scheme):]
                break
        else:
            return None
        if "/" in host.rstrip("/"):
            return None  # a URL path: one page, not the whole name
    elif line.startswith("."):
        host = line[1:]
    else:
        return None
    host = host.rstrip("^/")
    if "/" in host or not host:
        return None
    return host.split(":", 1)[0]


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) one at a time. A reload parses in a thread that shares the GIL with
    the event loop: splitlines() on 100k lines is one call holding it for milliseconds, and a
    list of 100k tuples is what the garbage collector walks, holding it too."""
    return enumerate(io.StringIO(text, newline=None), 1)


def domain_lines(path: str, text: str, loaded: Loaded) -> Iterator[tuple[int, str]]:
    """(line number, name) for every name in a domain file, one at a time; the rules skipped
    are counted in `loaded`."""
    text = _decode_gfwlist(text)
    gfwlist = text.lstrip().startswith(GFWLIST_HEADER)
    for number, raw in _lines(text):
        line = raw.strip()
        if gfwlist and line.startswith(("!", "[")):
            continue  # AutoProxy comments and header: "#" is not a comment there
        if "#" in line and not gfwlist:
            line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() in DNSMASQ_KEYS:
            parts = value.strip().split("/")
            if len(parts) < 3 or parts[0] != "" or not any(parts[1:-1]):
                raise ListError(f"{path}:{number}: expected {key.strip()}=/name/...")
            for name in parts[1:-1]:
                if name:
                    yield number, name
            continue
        if sep:
            raise ListError(f"{path}:{number}: unknown dnsmasq option {key.strip()!r}")
        if line[0] in "|.!@[/" or "*" in line or (gfwlist and "/" in line):
            host = _gfwlist_host(line)
            if host is None:
                loaded.skipped += 1
                continue
            line = host
        yield number, line


def read_text(path: str, what: str, error: type[ValueError] = ListError) -> str:
    """A list file's text, or `error` in one line: unreadable, or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise error(f"cannot read {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None


def parse_range(text: str) -> tuple[int, int, int]:
    """`ADDRESS[/PREFIX]` -> (first, last, IP version); host bits set are allowed, as in most
    published range lists. inet_pton rather than ipaddress: ten times faster per line."""
    address, _, prefix = text.partition("/")
    try:
        packed, bits, version = socket.inet_pton(socket.AF_INET, address), 32, 4
    except OSError:
        try:
            packed, bits, version = socket.inet_pton(socket.AF_INET6, address), 128, 6
        except OSError:
            raise ValueError(text) from None
    length = bits
    if prefix:
        if not prefix.isdigit() or int(prefix) > bits:
            raise ValueError(text)
        length = int(prefix)
    host = (1 << (bits - length)) - 1
    start = int.from_bytes(packed, "big") & ~host
    return start, start | host, version


def _merged(packed: list[int], bits: int) -> tuple[list[int], list[int]]:
    """Sorted, overlapping or adjacent ranges joined: one bisection finds any address. Each
    range comes packed in one int (`first << bits | last`: no tuples for the collector to
    walk), sorted in steps and merged, so no single call holds the GIL long."""
    mask = (1 << bits) - 1
    runs = [sorted(packed[i:i + SORT_STEP]) for i in range(0, len(packed), SORT_STEP)]
    starts: list[int] = []
    ends: list[int] = []
    for pair in heapq.merge(*runs):
        start, end = pair >> bits, pair & mask
        if ends and start <= ends[-1] + 1:
            if end > ends[-1]:
                ends[-1] = end
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


def load(domestic_domains: list[str] = (), foreign_domains: list[str] = (),
         domestic_ips: list[str] = ()) -> DomainLists:
    """Read every file; ListError on the first bad line, naming its file and line."""
    lists = DomainLists()
    loaded = lists.loaded
    # Domestic first, foreign after: a name on both ends up foreign (see the module's doc).
    for group, paths in ((DOMESTIC, domestic_domains), (FOREIGN, foreign_domains)):
        for path in paths:
            text = read_text(path, f"{group} domains")
            loaded.files.append(path)
            for number, name in domain_lines(path, text, loaded):
                try:
                    wire_name = to_wire(name)
                except ValueError as exc:
                    raise ListError(f"{path}:{number}: {exc}") from None
                lists.shards[hash(wire_name) & (SHARDS - 1)][wire_name] = group
    loaded.domains = sum(len(shard) for shard in lists.shards)
    v4: list[int] = []
    v6: list[int] = []
    for path in domestic_ips:
        loaded.files.append(path)
        for number, raw in _lines(read_text(path, "domestic ranges")):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                start, end, version = parse_range(line)
            except ValueError:
                raise ListError(f"{path}:{number}: not an address range: {line!r}") from None
            if version == 4:
                v4.append(start << 32 | end)
            else:
                v6.append(start << 128 | end)
            loaded.ranges += 1
    lists.v4 = _merged(v4, 32)
    lists.v6 = _merged(v6, 128)
    return lists
