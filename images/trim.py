"""Trim a freshly bootstrapped Debian root down to what one image needs at run time.

    trim.py ROOT RECIPE_DIR

mmdebstrap calls this as a customize hook (images/bootstrap.sh); it runs on the build host, not
in the chroot, so it can remove the shell, dpkg and coreutils the packages' maintainer scripts
needed during installation. The recipe says what stays: RECIPE_DIR/keep lists the packages
(names separated by spaces or lines, `#` comments), RECIPE_DIR/smoke.py is what the image's
program loads.

The image keeps exactly the packages in keep. Everything else that the "essential" variant and
the dependencies pulled in (perl, debconf, coreutils, util-linux, pygments, rich...) is deleted
file by file from dpkg's own file lists, and its entry is dropped from /var/lib/dpkg/status so the
database stays truthful for image scanners. Then build-only leftovers (caches, test suites, docs)
go. Last, smoke.py runs in the trimmed root, so a Debian dependency change that breaks the image
fails the build instead of the container.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

# Paths (relative to the root) removed after the packages: build-time state, parts of the
# Python stdlib a DNS forwarder never imports, and libperl's Perl modules (keepalived links
# libperl through net-snmp, nothing runs Perl). apt's and dpkg's configuration stays: mmdebstrap
# removes its own files there after this hook, and apt's caches and lists in its cleanup.
DROP_PATHS = [
    "var/cache/debconf", "var/cache/ldconfig", "var/log", "usr/share/man", "usr/share/info",
    "usr/share/locale", "usr/share/lintian", "usr/share/bug", "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/x86_64-linux-gnu/perl", "usr/bin/perl5.36-x86_64-linux-gnu",
    "usr/bin/cpan5.36-x86_64-linux-gnu",
    "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/distutils", "usr/lib/python3.11/venv",
]
# Files matched anywhere under usr/lib/python3*: CPython's own test extension modules.
DROP_GLOBS = ["_test*.cpython-*.so", "_xxtestfuzz*.so", "xxlimited*.so", "_ctypes_test*.so"]

def read_status(root: Path) -> list[str]:
    return (root / "var/lib/dpkg/status").read_text().strip().split("\n\n")


def field(stanza: str, name: str) -> str:
    for line in stanza.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def info_files(info: Path, package: str, arch: str) -> list[Path]:
    """dpkg's control files of one package: <name>.<ext> or <name>:<arch>.<ext> (Multi-Arch)."""
    found = []
    for prefix in (package, f"{package}:{arch}"):
        for path in info.glob(prefix + ".*"):
            if "." not in path.name[len(prefix) + 1 :]:  # python3.list must not match python3.11
                found.append(path)
    return found


def listed_paths(info: Path, package: str, arch: str) -> list[str]:
    for path in info_files(info, package, arch):
        if path.suffix == ".list":
            return path.read_text().splitlines()
    return []


def read_keep(path: Path) -> tuple[set[str], set[str]]:
    """The packages to keep, and the paths (words starting with /) to spare from DROP_PATHS."""
    words = {word for line in path.read_text().splitlines()
             for word in line.split("#", 1)[0].split()}  # fmt: skip
    return {w for w in words if not w.startswith("/")}, {w[1:] for w in words if w.startswith("/")}


def remove_packages(root: Path, keep: set[str]) -> list[str]:
    info = root / "var/lib/dpkg/info"
    stanzas = read_status(root)
    packages = {field(s, "Package"): field(s, "Architecture") for s in stanzas}
    drop = sorted(set(packages) - keep)
    missing = sorted(keep - set(packages))
    if missing:
        sys.exit(f"trim: packages to keep were not installed: {' '.join(missing)}")

    kept_paths = {p for name in keep for p in listed_paths(info, name, packages[name])}
    dirs = set()
    for name in drop:
        arch = packages[name]
        for entry in listed_paths(info, name, arch):
            path = root / entry.lstrip("/")
            if entry in kept_paths or not (path.exists() or path.is_symlink()):
                continue
            if path.is_dir():
                # Directories may be shared; /bin, /lib... are merged-/usr symlinks to directories.
                if not path.is_symlink():
                    dirs.add(path)
                continue
            path.unlink()
        for path in info_files(info, name, arch):
            path.unlink()
    # Deepest first: byte code that py3compile made (dpkg does not list it), then the directory
    # itself if nothing a kept package owns is left in it.
    for path in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        shutil.rmtree(path / "__pycache__", ignore_errors=True)
        # is_dir again: /lib/x and /usr/lib/x are the same directory on a merged-/usr system.
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    kept = [s for s in stanzas if field(s, "Package") in keep]
    (root / "var/lib/dpkg/status").write_text("\n\n".join(kept) + "\n")
    return drop


def remove_leftovers(root: Path, spared: set[str]) -> None:
    for rel in (rel for rel in DROP_PATHS if rel not in spared):
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for pattern in DROP_GLOBS:
        for path in root.glob("usr/lib/python3*/**/" + pattern):
            path.unlink()
    # Test suites shipped inside third-party packages.
    for path in root.glob("usr/lib/python3/dist-packages/**/tests"):
        if path.is_dir():
            shutil.rmtree(path)
    # Recreate the directories the filesystem layout promises, empty.
    for rel in ("var/log", "var/cache"):
        (root / rel).mkdir(parents=True, exist_ok=True)


def prune_bytecode(root: Path, used: set[str]) -> None:
    """Keep the .pyc files of modules loaded at start-up, delete the rest.

    The container's root is read-only, so Python cannot cache byte code at run time: without these
    files every start and every health check would compile the stdlib again (0.36 s instead of
    0.08 s measured). Byte code of all other modules (about 10 MB) is not worth the image size.
    """
    for cache in root.glob("usr/lib/python3*/**/__pycache__"):
        for pyc in cache.iterdir():
            if "/" + str(pyc.relative_to(root)) not in used:
                pyc.unlink()
        if not any(cache.iterdir()):
            cache.rmdir()


# Appended to smoke.py: report the byte code files it used (see prune_bytecode).
REPORT_BYTECODE = (
    "\nimport sys\nprint(*(m.__cached__ for m in list(sys.modules.values())"
    " if getattr(m, '__cached__', None)), sep='\\n')\n"
)


def main() -> None:
    root, recipe = Path(sys.argv[1]), Path(sys.argv[2])
    packages, spared = read_keep(recipe / "keep")
    dropped = remove_packages(root, packages)
    remove_leftovers(root, spared)
    print(f"trim: removed {len(dropped)} packages: {' '.join(dropped)}", file=sys.stderr)
    smoke = subprocess.run(
        ["chroot", str(root), "/usr/bin/python3", "-c",
         (recipe / "smoke.py").read_text() + REPORT_BYTECODE],
        capture_output=True, text=True,
    )  # fmt: skip
    if smoke.returncode != 0:
        sys.exit(f"trim: the smoke test failed in the trimmed root:\n{smoke.stderr}")
    prune_bytecode(root, set(smoke.stdout.split()))


if __name__ == "__main__":
    main()
