"""Files the forwarder keeps in its state directory (the cache, learned forged addresses)."""

from __future__ import annotations

import contextlib
import os


def write_atomically(path: str, data: bytes) -> None:
    """A temporary file renamed over the old one, so a crash mid-write leaves the previous file
    whole; named by pid, since workers each write their own, then rename."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
