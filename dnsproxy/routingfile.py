"""Which names went where when the cache file was written, kept beside it in the state directory.

A cache file holds the answers of the routing it was written under: a zone's resolver's answers
for its names, the public upstreams' for the rest. Started with a routing that differs (a zone
removed from the configuration, say), the forwarder must not serve them: it forgets what the old
table or the new one routes (`homenames.NameTable.routes_key`). This file says what the old one
was; written after the cache file, by the same thread, so a cache file is never newer than the
routing it names (a crash between the two leaves an older routing: more is forgotten, not less).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

from . import homenames
from .statefile import write_atomically
from .upstreamspec import UpstreamSpec

log = logging.getLogger("dnsproxy")

FILE_NAME = "routing.json"
VERSION = 1

Routing = dict  # the JSON object: version, local_dns, local_domains, local_reverse, zones


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def routing_of(settings: homenames.HomeSettings) -> Routing:
    """The settings that decide which names go to which group of upstreams (see homenames.py),
    as they read back from the file, so that equal means equal: when a reload or a restart
    changes them, cached answers of the old routing may be wrong."""
    return json.loads(json.dumps({
        "version": VERSION,
        "local_dns": [dataclasses.asdict(spec) for spec in settings.local_dns],
        "local_domains": list(settings.local_domains),
        "local_reverse": list(settings.local_reverse),
        "zones": list(settings.zones)}))


def write(routing: Routing, path: str) -> None:
    write_atomically(path, json.dumps(routing, sort_keys=True).encode())


def load(path: str) -> Routing | None:
    """The routing saved, or None when there is none to trust (missing, unreadable, another
    version): the caller then knows nothing of what the cache file's answers came from."""
    try:
        with open(path, "rb") as handle:
            routing = json.loads(handle.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("routing file %s ignored: %s", path, getattr(exc, "strerror", None) or exc)
        return None
    if not isinstance(routing, dict) or routing.get("version") != VERSION:
        log.warning("routing file %s ignored: not version %d", path, VERSION)
        return None
    return routing


@dataclass
class SavedRouting:
    """A saved routing as the settings `homenames.build_table` reads. The blocking switches
    only add names the table answers itself, which need no forgetting: left off."""

    local_dns: list[UpstreamSpec]
    local_domains: list[str]
    local_reverse: list[str]
    zones: list[str]
    block_ddr: bool = False
    block_doh_canary: bool = False
    block_private_relay: bool = False


def table_of(routing: Routing) -> homenames.NameTable | None:
    """The home table of a saved routing, by homenames' own builder; None if it cannot be
    built (a file edited by hand, a format changed)."""
    try:
        return homenames.build_table(SavedRouting(
            [UpstreamSpec(**spec) for spec in routing["local_dns"]],
            [str(name) for name in routing["local_domains"]],
            [str(cidr) for cidr in routing["local_reverse"]],
            [str(zone) for zone in routing["zones"]]))
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("saved routing ignored: %s", exc)
        return None
