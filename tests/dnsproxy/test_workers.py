"""--workers N: several processes share the listen sockets (SO_REUSEPORT), each with its own
cache; SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from .fakes import GENUINE, addresses, ask, free_port


def test_two_workers_share_the_port_and_stop_together(upstream):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dnsproxy", "--listen", f"127.0.0.1:{port}",
                             "--upstream", upstream.address, "--workers", "2"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                ask(port, "id.server", "TXT", qclass="CH", timeout=0.2)
                break
            except OSError:
                assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.5)  # both workers bound
        for _ in range(40):  # each from a new source port: the kernel spreads them
            assert addresses(ask(port, "shared.example")) == [GENUINE]
        # Each worker has its own cache: the name was fetched once per worker, not once.
        assert upstream.count("shared.example") == 2
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 2
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
        assert time.monotonic() - started < 2
        assert proc.returncode == 0
        for child in children:
            assert subprocess.run(["kill", "-0", child], capture_output=True).returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_that_cannot_listen_fail_in_one_line():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: the workers cannot share it
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "dnsproxy", "--listen",
                               f"127.0.0.1:{port}", "--upstream", "127.0.0.2", "--workers", "2"],
                              capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("dnsproxy: error: cannot listen") for line in lines)
    assert "Traceback" not in proc.stderr


def test_a_worker_that_dies_takes_the_service_down(upstream):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dnsproxy", "--listen", f"127.0.0.1:{port}",
                             "--upstream", upstream.address, "--workers", "2"],
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == 1
        assert subprocess.run(["kill", "-0", children[1]], capture_output=True).returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
