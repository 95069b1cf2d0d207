"""Shared fixtures for netsetup tests: throwaway network namespaces and iptables dumps."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def netns_exec(ns: str, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], check=check, capture_output=True, text=True, **kw
    )


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace, deleted afterwards with everything in it."""
    needs_root()
    name = f"nstest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def normalize(dump: str) -> dict[str, list[str]]:
    """A save dump as {table: lines}, without comments, timestamps or counters.

    A table that holds only its built-in chains with ACCEPT policy and no rules is dropped: the
    kernel creates such a table the first time any tool looks at it, which is no change of ours.
    """
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in dump.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
            continue
        if line == "COMMIT" or current is None:
            continue
        current.append(re.sub(r"\[\d+:\d+\]", "[0:0]", line))
    return {
        name: lines
        for name, lines in tables.items()
        if any(not (ln.startswith(":") and " ACCEPT " in ln) for ln in lines)
    }
