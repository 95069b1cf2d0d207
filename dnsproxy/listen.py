"""The client-facing sockets, bound before anything else is loaded.

A restart refuses queries only while no process holds the port: from the old process's last
moment to the new one's bind. So `dnsproxy` binds right after reading its settings, before it
imports the forwarder, reads the cache file or the configuration's files; queries that come
meanwhile wait in the kernel's buffers and are answered once it serves. This module imports
nothing heavier than `socket` for that reason.
"""

from __future__ import annotations

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


def bind_listeners(settings: Settings, reuse_port: bool = False) -> list[Listener]:
    """Every listen address's sockets, bound (TCP listening): done first at start, before the
    cache file and the configuration's files are read, so that queries wait in the kernel's
    buffers meanwhile rather than being refused. ListenError for an address that is taken or
    not ours, with nothing left bound."""
    bound: list[Listener] = []
    try:
        for host, port in settings.listen_addresses():
            try:
                udp = bind_socket(host, port, socket.SOCK_DGRAM, reuse_port)
            except OSError as exc:
                raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            try:
                tcp = bind_socket(host, port, socket.SOCK_STREAM, reuse_port)
            except OSError as exc:
                udp.close()
                raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            bound.append((udp, tcp))
    except ListenError:
        for pair in bound:
            for sock in pair:
                sock.close()
        raise
    return bound
