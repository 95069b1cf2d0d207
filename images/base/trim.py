"""Trim a freshly bootstrapped Debian root down to what the appliance needs at run time.

mmdebstrap calls this as a customize hook with the root directory as the only argument; it runs on
the build host (not in the chroot), so it can remove the shell, dpkg and coreutils the packages'
maintainer scripts needed during installation.

The image keeps exactly the packages in KEEP. Everything else that the "essential" variant and the
dependencies of python3-httpx pulled in (perl, debconf, coreutils, util-linux, pygments, rich...)
is deleted file by file from dpkg's own file lists, and its entry is dropped from
/var/lib/dpkg/status so the database stays truthful for image scanners. Then build-only leftovers
(caches, test suites, docs) go. Last, a smoke test imports what the forwarder imports, so a Debian
dependency change that breaks the trimmed image fails the build instead of the container.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

# Packages the running appliance needs. Shared libraries are listed explicitly (rather than derived
# from Depends) because the point is to cut dependencies that only matter at install time.
KEEP = {
    # identity of the system: /etc/os-release, /etc/passwd and /etc/group
    "base-files", "base-passwd",
    # a tiny /bin/sh: RUN steps of the appliance Dockerfile and `docker exec ... sh` for debugging
    "dash",
    # the C runtime and the libraries CPython's stdlib modules link against
    "libc6", "libgcc-s1", "gcc-12-base", "zlib1g", "libssl3", "libffi8", "libexpat1",
    "libbz2-1.0", "liblzma5", "libcrypt1", "libdb5.3", "libgdbm6", "libncursesw6", "libtinfo6",
    "libnsl2", "libtirpc3", "libtirpc-common", "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3",
    "libkrb5support0", "libkeyutils1", "libcom-err2", "libreadline8", "readline-common",
    "libsqlite3-0", "libuuid1", "media-types",
    # Python and the forwarder's dependencies
    "python3", "python3-minimal", "python3.11", "python3.11-minimal", "libpython3-stdlib",
    "libpython3.11-minimal", "libpython3.11-stdlib",
    "python3-dnslib", "python3-uvloop", "libuv1",
    "python3-httpx", "python3-httpcore", "python3-h11", "python3-anyio", "python3-sniffio",
    "python3-idna", "python3-certifi", "python3-rfc3986",
    # /etc/ssl/certs/ca-certificates.crt, for DoT/DoH to public resolvers
    "ca-certificates",
}

# Paths (relative to the root) removed after the packages: build-time state and parts of the
# Python stdlib a DNS forwarder never imports. apt's and dpkg's configuration stays: mmdebstrap
# removes its own files there after this hook, and apt's caches and lists in its cleanup.
DROP_PATHS = [
    "var/cache/debconf", "var/cache/ldconfig", "var/log", "usr/share/man", "usr/share/info",
    "usr/share/locale", "usr/share/lintian", "usr/share/bug", "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/distutils", "usr/lib/python3.11/venv",
]
# Files matched anywhere under usr/lib/python3*: CPython's own test extension modules.
DROP_GLOBS = ["_test*.cpython-*.so", "_xxtestfuzz*.so", "xxlimited*.so", "_ctypes_test*.so"]

# What the forwarder imports at start-up (httpx only for https:// upstreams, but it must work).
# Keep this list in step with dnsproxy/: it also decides which byte code stays (prune_bytecode).
SMOKE_TEST = (
    "import argparse, asyncio, collections, contextlib, dataclasses, enum, functools, importlib,"
    " importlib.resources, importlib.util, ipaddress, json, logging, os, re, secrets, signal,"
    " socket, ssl, struct, time, tomllib, typing, urllib.parse;"
    "import dnslib, uvloop, httpx;"
    "ctx = ssl.create_default_context(cafile='/etc/ssl/certs/ca-certificates.crt');"
    "assert ctx.cert_store_stats()['x509_ca'] > 50, 'CA bundle is empty';"
    # Report the byte code files that start-up used (see prune_bytecode).
    "import sys; print(*(m.__cached__ for m in list(sys.modules.values())"
    " if getattr(m, '__cached__', None)), sep='\\n')"
)


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


def remove_packages(root: Path) -> list[str]:
    info = root / "var/lib/dpkg/info"
    stanzas = read_status(root)
    packages = {field(s, "Package"): field(s, "Architecture") for s in stanzas}
    drop = sorted(set(packages) - KEEP)
    missing = sorted(KEEP - set(packages))
    if missing:
        sys.exit(f"trim: packages to keep were not installed: {' '.join(missing)}")

    kept_paths = {p for name in KEEP for p in listed_paths(info, name, packages[name])}
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
    kept = [s for s in stanzas if field(s, "Package") in KEEP]
    (root / "var/lib/dpkg/status").write_text("\n\n".join(kept) + "\n")
    return drop


def remove_leftovers(root: Path) -> None:
    for rel in DROP_PATHS:
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


def main() -> None:
    root = Path(sys.argv[1])
    dropped = remove_packages(root)
    remove_leftovers(root)
    print(f"trim: removed {len(dropped)} packages: {' '.join(dropped)}", file=sys.stderr)
    smoke = subprocess.run(
        ["chroot", str(root), "/usr/bin/python3", "-c", SMOKE_TEST],
        check=True, capture_output=True, text=True,
    )
    prune_bytecode(root, set(smoke.stdout.split()))


if __name__ == "__main__":
    main()
