"""The benchmark's upstream (bench/authority.py) as a real process on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.servers import answers, free_port

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "authority.py"


@dataclass
class Authority:
    proc: subprocess.Popen
    ports: list[int]
    base: float
    log: Path

    def arrivals(self) -> dict[str, list[float]]:
        """Stop it (SIGTERM) and read what it wrote."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(5)
        return json.loads(self.log.read_text())


@pytest.fixture
def start_authority(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(count: int = 1, delay_ms: float = 0.0) -> Authority:
        ports = [free_port() for _ in range(count)]
        base = time.time()
        log = tmp_path / f"arrivals-{len(procs)}.json"
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--listen", "127.0.0.1", "--ports",
                                 ",".join(map(str, ports)), "--base", repr(base), "--log",
                                 str(log), "--delay-ms", str(delay_ms)])
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not answers("127.0.0.1", ports[-1], "up.house.test"):
            assert proc.poll() is None and time.monotonic() < deadline, "authority not up"
            time.sleep(0.05)
        return Authority(proc, ports, base, log)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def udp_exchange(port: int, packet: bytes, timeout: float = 2.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, ("127.0.0.1", port))
        return sock.recv(4096)
