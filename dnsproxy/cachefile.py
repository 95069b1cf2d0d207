"""The cache kept across restarts: `cache.bin` in the state directory.

A restart (a new image, a host reboot) would otherwise start every household name with a
miss. The file holds the cache's entries as they are in memory, with each entry's time of
storing turned from the monotonic clock (meaningless in another process) into Unix time, so a
later start can age the TTLs by the time that has passed.

Format, version 1, all integers big-endian:

    magic     8 bytes   b"DNSPXCA\\n"
    version   u16       1
    count     u32       number of entries
    entries   count times:
        key length u16, entry length u32, key, entry
        (key: the cache key, the question lower-cased plus one byte of DO and CD bits;
         entry: a wire.CachedReply whose `stored` field is Unix time)
    crc32     u32       of every byte before it

The entries are in the order they were stored, least recently stored first (see `snapshot`).
A file that is truncated, damaged (bad checksum, an entry that does not parse as the reply to
its key) or foreign (other magic or version) is ignored as a whole with one warning: a cache is
only worth what it saves, never a reason not to start. Only what the cache held is written,
and the cache holds only replies the forgery defences verified.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass

from . import wire
from .stages.cache import Cache
from .statefile import write_atomically

log = logging.getLogger("dnsproxy")

FILE_NAME = "cache.bin"
MAGIC = b"DNSPXCA\n"
VERSION = 1
HEAD = struct.Struct(">8sHI")
ITEM = struct.Struct(">HI")
CRC = struct.Struct(">I")


class CacheFileError(ValueError):
    pass


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


@dataclass(frozen=True)
class Snapshot:
    """The cache's entries at one moment, and that moment on both clocks: what `write` needs,
    so it can run in a thread while the cache goes on changing."""

    keys: list[bytes]
    entries: list[bytes]  # stamped replies (wire.CachedReply's layout): references, not copies
    wall: float  # time.time() ...
    mono: float  # ... and the cache's clock, at the same moment


def snapshot(cache: Cache) -> Snapshot:
    """Taken on the event loop: two lists of references, about 2 ms at 100k entries.

    Read through dict's own views, in the order entries were stored, not the LRU order the
    OrderedDict keeps in its linked list: walking that costs a lookup per entry, 20-50 ms at
    100k once hits have shuffled it, and every query would wait meanwhile. A restart thus
    begins with the least recently stored first; the first hit moves an entry back to the end.
    """
    entries = cache.entries
    return Snapshot(list(dict.keys(entries)), list(dict.values(entries)), time.time(),
                    cache.clock())


def encode(snap: Snapshot) -> bytearray:
    """The file's bytes, each entry's time of storing turned into Unix time. Grown in place
    rather than joined from a list of 300k parts: in a thread, a list that size is what the
    garbage collector, run by whichever thread allocates, walks while holding the GIL."""
    wall, mono = snap.wall, snap.mono
    item = ITEM.pack
    out = bytearray(HEAD.pack(MAGIC, VERSION, len(snap.keys)))
    stamp = wire.CachedReply.STAMP
    for key, entry in zip(snap.keys, snap.entries, strict=True):
        stored, ttl = stamp.unpack_from(entry)
        shifted = stamp.pack(wall - (mono - stored), ttl) + entry[stamp.size:]
        out += item(len(key), len(shifted))
        out += key
        out += shifted
    out += CRC.pack(zlib.crc32(out))
    return out


def write(snap: Snapshot, path: str) -> int:
    """Write a snapshot atomically (a temporary file renamed over the old one, so a crash
    mid-write leaves the previous file whole); the number of entries written."""
    write_atomically(path, encode(snap))
    return len(snap.keys)


def save(cache: Cache, path: str) -> int:
    """Snapshot and write at once, for callers with no event loop to spare."""
    return write(snapshot(cache), path)


def parse(data: bytes) -> list[tuple[bytes, wire.CachedReply]]:
    """The entries of a cache file, in its order, or CacheFileError saying what is wrong."""
    if len(data) < HEAD.size + CRC.size:
        raise CacheFileError("too short")
    magic, version, count = HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CacheFileError("not a dnsproxy cache file")
    if version != VERSION:
        raise CacheFileError(f"version {version}, this dnsproxy reads {VERSION}")
    if CRC.unpack_from(data, len(data) - CRC.size)[0] != zlib.crc32(data[:-CRC.size]):
        raise CacheFileError("checksum mismatch (truncated or damaged)")
    entries = []
    off, end = HEAD.size, len(data) - CRC.size
    for _ in range(count):
        if off + ITEM.size > end:
            raise CacheFileError("fewer entries than announced")
        key_len, entry_len = ITEM.unpack_from(data, off)
        off += ITEM.size
        if off + key_len + entry_len > end:
            raise CacheFileError("an entry runs past the end")
        key = data[off:off + key_len]
        entry = wire.CachedReply(data[off + key_len:off + key_len + entry_len])
        off += key_len + entry_len
        _check(key, entry)
        entries.append((key, entry))
    if off != end:
        raise CacheFileError("bytes after the last entry")
    return entries


def _check(key: bytes, entry: wire.CachedReply) -> None:
    """An entry must be what the cache itself would store for that key: a reply to the key's
    question whose TTL offsets lie inside it. Anything else could break or mislead a hit."""
    try:
        if len(entry) < wire.CachedReply.HEAD.size:
            raise CacheFileError("an entry shorter than its head")
        body, offsets = entry.body, entry.offsets
        reply = wire.parse_reply(body)
    except (struct.error, wire.WireError) as exc:
        raise CacheFileError(f"an entry does not parse: {exc}") from None
    if wire.question_key(reply.question) != key[:-1]:
        raise CacheFileError("an entry answers another question than its key")
    if sorted(offsets) != sorted(off for off, _ in reply.ttls):
        raise CacheFileError("an entry's TTL offsets do not match its records")


def load(cache: Cache, path: str) -> int:
    """Fill the cache from the file, ageing every entry by the time since it was stored and
    leaving out those past expiry (and past max_stale when serving stale); the number kept.
    A missing file is no news; a bad one is ignored with one warning."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("cache file %s ignored: %s", path, exc.strerror)
        return 0
    try:
        entries = parse(data)
    except CacheFileError as exc:
        log.warning("cache file %s ignored: %s", path, exc)
        return 0
    wall, mono = time.time(), cache.clock()
    grace = cache.max_stale if cache.serve_stale else 0
    kept = 0
    for key, entry in entries:  # in the file's order: least recently stored first
        age = max(wall - entry.stored, 0.0)  # a clock set back makes nothing younger
        if age < entry.ttl + grace:
            kept += cache.store(key, entry, stored=mono - age)
    return kept
