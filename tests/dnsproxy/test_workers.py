"""--workers N: several processes share the listen sockets (SO_REUSEPORT), each with its own
cache; SIGTERM stops them all."""

from __future__ import annotations

import signal
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
