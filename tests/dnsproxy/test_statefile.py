"""The atomic writer of the state directory's files, with two writers of one path at once (the
writer thread and another, workers of one state directory)."""

from __future__ import annotations

import os
import threading

from dnsproxy import statefile


def test_two_writers_of_one_path_at_once_each_rename_a_whole_file(tmp_path, monkeypatch):
    """Both writers have written their temporary file before either renames it (they meet at
    fsync): each must have had a file of its own, so the path ends up whole, and nothing is
    left behind."""
    path = tmp_path / "cache.bin"
    both_written = threading.Barrier(2, timeout=5)
    real_fsync = os.fsync

    def fsync_when_both_wrote(fd: int) -> None:
        both_written.wait()
        real_fsync(fd)

    monkeypatch.setattr(statefile.os, "fsync", fsync_when_both_wrote)
    payloads = [b"a" * 100_000, b"b" * 200_000]
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        try:
            statefile.write_atomically(str(path), data)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert path.read_bytes() in payloads
    assert os.listdir(tmp_path) == ["cache.bin"]


def test_release_empties_lists_in_steps():
    items = [object() for _ in range(statefile.RELEASE_STEP * 2 + 5)]
    other = list(range(3))
    statefile.release(items, other)
    assert items == [] and other == []
