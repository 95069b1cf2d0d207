"""Files the forwarder keeps in its state directory (the cache, learned forged addresses)."""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomically(path: str, data: bytes | bytearray) -> None:
    """A temporary file renamed over the old one, so a crash mid-write leaves the previous file
    whole. The temporary file's name is made unique by mkstemp: workers (processes sharing the
    state directory) and threads may write the same path at once, and each then renames a file
    of its own, whole; the last rename wins."""
    folder, name = os.path.split(path)
    handle, temporary = tempfile.mkstemp(prefix=f"{name}.", suffix=".tmp", dir=folder or ".")
    try:
        with open(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


RELEASE_STEP = 4096


def release(*items: list) -> None:
    """Empty big lists of references a few thousand at a time: dropping 100k at once is one
    call that holds the GIL about a millisecond (cold), in a thread as much as on the loop."""
    for references in items:
        while references:
            del references[-RELEASE_STEP:]
