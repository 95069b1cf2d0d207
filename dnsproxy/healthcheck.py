"""Container health check: ask the server itself for CHAOS TXT id.server.

The forwarder answers that locally, so a health check never sends a packet off the host.
Usage: python3 -m dnsproxy.healthcheck [HOST:PORT]   (default 127.0.0.1:53); exit 0 if healthy.
"""

from __future__ import annotations

import secrets
import socket
import struct
import sys

QUESTION = b"\x02id\x06server\x00" + struct.pack(">HH", 16, 3)  # TXT, CH


def check(host: str = "127.0.0.1", port: int = 53, timeout: float = 2.0) -> bool:
    qid = secrets.randbits(16)
    query = struct.pack(">HHHHHH", qid, 0, 1, 0, 0, 0) + QUESTION
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            sock.send(query)
            reply = sock.recv(512)
        except OSError:
            return False
    if len(reply) < 12:
        return False
    rid, flags, _, ancount = struct.unpack(">HHHH", reply[:8])
    return rid == qid and flags & 0x8000 and flags & 0xF == 0 and ancount >= 1


def main() -> int:
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:53"
    host, _, port = target.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return 0 if check(host, int(port or 53)) else 1


if __name__ == "__main__":
    sys.exit(main())
