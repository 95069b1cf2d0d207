"""The client-facing sockets, bound before anything else is loaded.

A restart refuses queries only while no process holds the port: from the old process's last
moment to the new one's bind. So `dnsproxy` binds right after reading its settings, before it
imports the forwarder, reads the cache file or the configuration's files; queries that come
meanwhile wait in the kernel's buffers and are answered once it serves. This module imports
nothing heavier than `socket` for that reason.

Earlier still: sockets a launcher bound before Python started are adopted, passed the way
systemd's socket activation passes them (descriptors from 3 on, `LISTEN_FDS`, `LISTEN_PID`).
The image starts the forwarder through `dnsproxy-bind` (native/src/bin), which binds within a
millisecond of its start; a systemd socket unit works the same way.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings


class ListenError(Exception):
    """A listen address is taken or not ours: reported in one line, exit status 1."""


def bind_socket(host: str, port: int, kind: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # [::] serves IPv6 only, so 0.0.0.0 can be listed beside it without a clash.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(512)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


Listener = tuple[socket.socket, socket.socket]  # UDP and TCP on one listen address

FIRST_PASSED_FD = 3  # SD_LISTEN_FDS_START
Key = tuple[int, bytes, int]  # socket type, packed address, port


def _key(kind: int, host: str, port: int) -> Key:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return kind, socket.inet_pton(family, host.partition("%")[0]), port  # fe80::1%eth0


def passed_sockets(environ: dict[str, str] | None = None) -> dict[Key, socket.socket]:
    """The listening sockets a launcher passed this process, by what they are bound to; the
    protocol's variables are removed, so that nothing this process starts takes them for its
    own. Descriptors that are not UDP or TCP sockets are left alone."""
    environ = os.environ if environ is None else environ
    count, pid = environ.pop("LISTEN_FDS", ""), environ.pop("LISTEN_PID", "")
    environ.pop("LISTEN_FDNAMES", None)
    if not (count.isdigit() and pid.isdigit()) or int(pid) != os.getpid():
        return {}
    passed: dict[Key, socket.socket] = {}
    for fd in range(FIRST_PASSED_FD, FIRST_PASSED_FD + int(count)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type not in (
                socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock.detach()
            continue
        host, port = sock.getsockname()[:2]
        passed[_key(sock.type, host, port)] = sock
    return passed


def _adopt(sock: socket.socket) -> socket.socket:
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def bind_listeners(settings: Settings, reuse_port: bool = False,
                   passed: dict[Key, socket.socket] | None = None) -> list[Listener]:
    """Every listen address's sockets, bound (TCP listening): done first at start, before the
    cache file and the configuration's files are read, so that queries wait in the kernel's
    buffers meanwhile rather than being refused. A socket in `passed` (passed_sockets) bound
    to a listen address is used as it is; the other passed sockets are closed first, as not
    this configuration's (one could hold a wildcard address a listen address lies in).
    ListenError for an address that is taken or not ours, with nothing left bound."""
    addresses = settings.listen_addresses()
    wanted = {_key(kind, host, port) for host, port in addresses
              for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM)}
    passed = dict(passed or {})
    for key in [key for key in passed if key not in wanted]:
        passed.pop(key).close()  # first: it may hold a wildcard a listen address lies in
    bound: list[Listener] = []

    def socket_for(host: str, port: int, kind: int) -> socket.socket:
        sock = passed.pop(_key(kind, host, port), None)
        if sock is not None:
            return _adopt(sock)
        try:
            return bind_socket(host, port, kind, reuse_port)
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None

    try:
        for host, port in addresses:
            udp = socket_for(host, port, socket.SOCK_DGRAM)
            try:
                tcp = socket_for(host, port, socket.SOCK_STREAM)
            except ListenError:
                udp.close()
                raise
            bound.append((udp, tcp))
    except ListenError:
        for sock in [*passed.values(), *(s for pair in bound for s in pair)]:
            sock.close()
        raise
    return bound
