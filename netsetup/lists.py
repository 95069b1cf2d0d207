"""The split-DNS list files a user dropped into LISTS_DIR, found by the folder they lie in."""

from __future__ import annotations

import os

from dnsproxy.defaults import LIST_KINDS, LISTS_MOUNT


def list_files(lists_dir: str) -> dict[str, list[str]]:
    """The list files in LISTS_DIR's subdirectories (domestic-domains/, foreign-domains/,
    domestic-ips/), as paths inside the container, by the forwarder option they go to. Files
    are named by where they lie, so lists are dropped in as downloaded, never renamed."""
    found: dict[str, list[str]] = {}
    for folder, variable in LIST_KINDS.items():
        path = os.path.join(lists_dir, folder)
        if not os.path.isdir(path):
            continue
        names = sorted(name for name in os.listdir(path)
                       if not name.startswith(".") and os.path.isfile(os.path.join(path, name)))
        if names:
            found[variable] = [f"{LISTS_MOUNT}/{folder}/{name}" for name in names]
    return found
