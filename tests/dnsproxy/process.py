"""The forwarder as a user runs it: `python -m dnsproxy` in a subprocess, asked with `dig`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dnslib import DNSRecord

from .fakes import send_raw

ROOT = Path(__file__).resolve().parents[2]
DIG = shutil.which("dig")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any DNSPROXY_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNSPROXY_")}
    env.update(extra)
    return env


def run_dnsproxy(*args: str, env: dict[str, str] | None = None,
                 timeout: float = 10) -> subprocess.CompletedProcess:
    """Run to completion (for commands that must fail at once)."""
    return subprocess.run([sys.executable, "-m", "dnsproxy", *args], cwd=ROOT,
                          env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)


class DnsproxyProcess:
    """A running `python -m dnsproxy`, ready once it answers CHAOS TXT id.server (answered
    locally, so waiting for it sends nothing upstream)."""

    def __init__(self, *args: str, port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.proc = subprocess.Popen([sys.executable, "-m", "dnsproxy", *args], cwd=ROOT,
                                     env=env or clean_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.stdout = self.stderr = ""
        probe = bytes(DNSRecord.question("id.server", "TXT", "CH").pack())
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise RuntimeError(f"dnsproxy exited with {self.proc.returncode}: {err}")
            try:
                send_raw(port, probe, timeout=0.2)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError("dnsproxy did not start") from None

    def terminate(self, timeout: float = 5) -> tuple[int, float]:
        """SIGTERM; the exit code and how long it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.proc.returncode, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate()


def dig(port: int, name: str, *options: str, host: str = "127.0.0.1") -> str:
    """dig's full output for one question to the forwarder (and only to it)."""
    result = subprocess.run([DIG, f"@{host}", "-p", str(port), name, "+time=3", "+tries=1",
                             *options], capture_output=True, text=True, timeout=15)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def dig_status(output: str) -> str:
    for line in output.splitlines():
        if "status:" in line:
            return line.split("status:", 1)[1].split(",", 1)[0].strip()
    raise AssertionError(f"no status in dig output:\n{output}")


def dig_answers(output: str) -> list[tuple[str, str, str]]:
    """(name, type, data) of every record in the ANSWER SECTION."""
    answers, inside = [], False
    for line in output.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            inside = True
            continue
        if inside:
            if not line.strip():
                break
            fields = line.split()
            answers.append((fields[0], fields[3], " ".join(fields[4:])))
    return answers
