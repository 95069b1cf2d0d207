"""dnsproxy-bind (native/src/bin) and the forwarder's side of it (listen.py): the listen sockets
bound before Python starts and handed over, so that a query sent while the forwarder starts is
answered rather than refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dnslib import DNSRecord

from dnsproxy import listen

from .fakes import free_port, send_raw
from .process import ROOT, clean_env

LAUNCHER = Path(sys.executable).parent / "dnsproxy-bind"
needs_launcher = pytest.mark.skipif(not LAUNCHER.is_file() and not os.environ.get("CI"),
                                    reason="dnsproxy-bind is not built (make native)")
PROBE = bytes(DNSRecord.question("id.server", "TXT", "CH").pack())  # answered locally


def forwarder(*launcher_args: str, listen_on: list[str]) -> subprocess.Popen:
    """The forwarder started through the launcher; its upstream is never asked (the probe is
    answered locally), and is a port nothing listens on."""
    argv = [str(LAUNCHER), *launcher_args, sys.executable, "-m", "dnsproxy",
            "--upstream", f"127.0.0.1:{free_port()}", "--no-query-log", "--log-level", "warning"]
    for address in listen_on:
        argv += ["--listen", address]
    return subprocess.Popen(argv, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def wait_serving(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, stop(proc)
        try:
            send_raw(port, PROBE, timeout=0.2)
            return
        except OSError:
            pass
    raise AssertionError(f"the forwarder does not answer: {stop(proc)}")


def sockets_on(port: int, address: str = "") -> set[str]:
    """The UDP and TCP sockets bound to `port` (IPv4; on `address` only, as /proc/net writes
    it, if given), as /proc/PID/fd names them."""
    return {f"socket:[{line.split()[9]}]"
            for table in ("/proc/net/udp", "/proc/net/tcp")
            for line in Path(table).read_text().splitlines()[1:]
            if line.split()[1].endswith(f"{address}:{port:04X}")}


@needs_launcher
def test_a_query_sent_while_python_starts_waits_and_is_answered_on_the_passed_socket():
    port = free_port()
    proc = forwarder("--listen", f"127.0.0.1:{port}", listen_on=[f"127.0.0.1:{port}"])
    try:
        deadline = time.monotonic() + 5
        python = os.fsencode(sys.executable)
        while Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] != python:
            # Until the launcher's exec (it binds before): then 3 and 4 are the sockets
            # handed over, and Python has only begun to start. (Mid-exec the file reads empty.)
            assert time.monotonic() < deadline and proc.poll() is None, stop(proc)
            time.sleep(0.001)
        passed = {os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in (3, 4)}
        assert passed == sockets_on(port)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.connect(("127.0.0.1", port))  # a closed port would show as ECONNREFUSED
        client.settimeout(10)
        client.send(PROBE)
        reply = DNSRecord.parse(client.recv(4096))  # not refused, not lost: answered
        assert reply.header.id == DNSRecord.parse(PROBE).header.id
        client.close()
        assert sockets_on(port) == passed  # served on them, nothing bound anew
    finally:
        stop(proc)


@needs_launcher
def test_a_passed_socket_the_configuration_does_not_name_is_closed_first():
    # The launcher holds the wildcard; the forwarder listens on loopback at the same port, which
    # it can bind only once the wildcard socket is gone, and on another port it was not given.
    port, other = free_port(), free_port()
    proc = forwarder("--listen", f"0.0.0.0:{port}",
                     listen_on=[f"127.0.0.1:{port}", f"127.0.0.1:{other}"])
    try:
        wait_serving(proc, port)
        wait_serving(proc, other)
        assert not sockets_on(port, "00000000"), "the passed wildcard sockets are still open"
    finally:
        stop(proc)


@needs_launcher
def test_an_address_the_launcher_cannot_bind_is_left_to_the_command():
    result = subprocess.run(
        [str(LAUNCHER), "--listen", "192.0.2.1:53", sys.executable, "-c", SHOW_PASSED],
        capture_output=True, text=True, timeout=10, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "0 True"
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2 and all("192.0.2.1:53" in line for line in warnings)
    assert "Traceback" not in result.stderr


# The command the launcher runs in the tests below: what it was handed, one line each.
SHOW_PASSED = """
import os, socket
print(os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID") == str(os.getpid()))
for fd in range(3, 3 + int(os.environ.get("LISTEN_FDS") or 0)):
    sock = socket.socket(fileno=fd)
    kind = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    print(fd, kind, *sock.getsockname()[:2], os.get_inheritable(fd))
    sock.detach()
for fd in (5, 6):
    print(fd, os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}")
          else "closed")
"""


@needs_launcher
def test_the_launcher_reads_dnsproxy_listen_when_not_told():
    port = free_port()
    env = clean_env(DNSPROXY_LISTEN=f"127.0.0.1:{port}, [::1]:{port} not-an-address")
    result = subprocess.run([str(LAUNCHER), sys.executable, "-c", SHOW_PASSED],
                            capture_output=True, text=True, timeout=10, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:5] == [
        "4 True", f"3 udp 127.0.0.1 {port} True", f"4 tcp 127.0.0.1 {port} True",
        f"5 udp ::1 {port} True", f"6 tcp ::1 {port} True"]
    assert "not-an-address" in result.stderr and "left to the command" in result.stderr


@needs_launcher
def test_the_sockets_take_3_and_on_whatever_held_those_numbers():
    # 3, 4 and 5 open (as a service manager may leave them): the two sockets go to 3 and 4,
    # 5 stays as it was.
    port = free_port()
    script = (f'exec 3</dev/null 4</dev/null 5</dev/null; exec "{LAUNCHER}" '
              f'--listen 127.0.0.1:{port} "{sys.executable}" -c "$0"')
    result = subprocess.run(["sh", "-c", script, SHOW_PASSED], capture_output=True,
                            text=True, timeout=10, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "2 True", f"3 udp 127.0.0.1 {port} True", f"4 tcp 127.0.0.1 {port} True",
        "5 /dev/null", "6 closed"]


@needs_launcher
def test_with_nothing_to_bind_the_environment_is_left_alone():
    env = clean_env(LISTEN_FDS="1", LISTEN_PID="1")  # a service manager's, for the command
    result = subprocess.run([str(LAUNCHER), sys.executable, "-c",
                             "import os; print(os.environ['LISTEN_FDS'], "
                             "os.environ['LISTEN_PID'])"],
                            capture_output=True, text=True, timeout=10, env=env)
    assert result.returncode == 0 and result.stdout.split() == ["1", "1"], result.stderr


@needs_launcher
@pytest.mark.parametrize("args", [[], ["--listen"], ["--listen", "1.2.3", "true"],
                                  ["--listen", "::1:53", "true"], ["--bogus", "true"]])
def test_bad_launcher_usage_is_one_line_and_status_2(args):
    result = subprocess.run([str(LAUNCHER), *args], capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("dnsproxy-bind: ")


@needs_launcher
def test_a_command_that_cannot_run_is_status_127():
    result = subprocess.run([str(LAUNCHER), "/nonexistent/dnsproxy"], capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 127
    assert "cannot run /nonexistent/dnsproxy" in result.stderr


def test_sockets_passed_to_another_process_are_not_taken():
    environ = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "a:b"}
    assert listen.passed_sockets(environ) == {}
    assert environ == {}  # nothing this process starts sees them either


ADOPT = """
import os, socket
from dnsproxy import listen
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.bind(("::1", 0))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.bind(("127.0.0.1", 0))
tcp.listen()
os.dup2(udp.fileno(), 3)
os.dup2(tcp.fileno(), 4)
environ = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "a:b"}
passed = listen.passed_sockets(environ)
print(environ == {})
print(set(passed) == {listen._key(socket.SOCK_DGRAM, "0:0::1", udp.getsockname()[1]),
                      listen._key(socket.SOCK_STREAM, "127.0.0.1", tcp.getsockname()[1])})
print(sorted(sock.fileno() for sock in passed.values()))
"""


def test_passed_sockets_are_taken_by_what_they_are_bound_to():
    # Real sockets where a launcher puts them (in a process of their own: 3 and 4 are this
    # one's); an IPv6 address written in another form matches.
    result = subprocess.run([sys.executable, "-c", ADOPT], cwd=ROOT, capture_output=True,
                            text=True, timeout=10, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "[3,", "4]"]


def test_no_passed_sockets_without_the_variables():
    assert listen.passed_sockets({}) == {}
    assert listen.passed_sockets({"LISTEN_FDS": "x", "LISTEN_PID": str(os.getpid())}) == {}
