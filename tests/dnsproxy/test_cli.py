"""The new user's check from the issue: start `python -m dnsproxy`, point it at an upstream an
injector races, ask with dig, read the query log, stop it with SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .fakes import FORGED_LISTED, FORGED_UNLISTED, GENUINE, free_port
from .process import DIG, ROOT, DnsproxyProcess, dig, dig_answers, dig_status

pytestmark = pytest.mark.skipif(DIG is None, reason="dig (bind9-dnsutils) is not installed")

QUERY_FIELDS = {"client", "name", "type", "rcode", "upstream", "latency_ms", "cached"}


@pytest.fixture
def running(upstream):
    port = free_port()
    proc = DnsproxyProcess("--listen", f"127.0.0.1:{port}", "--upstream", upstream.address,
                           "--query-log", port=port)
    yield proc
    proc.kill()


def test_dig_always_gets_the_genuine_answer_and_sigterm_stops_it(running, upstream):
    port = running.port
    # A clean name first, as on any network: the forwarder learns the upstream echoes OPT.
    assert dig_answers(dig(port, "clean.example")) == [("clean.example.", "A", GENUINE)]
    names = ["blocked.example", "twitter.example", "Mixed.Example"]
    for name in names:
        # The genuine reply trails the forgeries, over UDP and over TCP (where a forgery
        # sends the forwarder too), so both forgeries are read and judged before it.
        upstream.rule(name, forgeries=("no-edns", "forged-address"), delay=0.05, tcp_delay=0.3)
    for name in names:
        for extra in ((), ("+tcp",), ("+noedns",)):
            output = dig(port, name, *extra)
            assert dig_status(output) == "NOERROR", output
            assert dig_answers(output) == [(name + ".", "A", GENUINE)], output
            assert FORGED_LISTED not in output and FORGED_UNLISTED not in output

    code, elapsed = running.terminate()
    assert code == 0, running.stderr
    assert elapsed < 2.0, (elapsed, running.stderr)
    assert "Traceback" not in running.stderr

    lines = [json.loads(line) for line in running.stdout.splitlines()]
    queries = [line for line in lines if "rcode" in line and line["type"] == "A"]
    forgeries = [line for line in lines if line.get("event") == "forgery"]
    assert len(queries) == 1 + 3 * len(names), running.stdout
    for line in queries:
        assert set(line) >= QUERY_FIELDS, line
        assert line["client"] == "127.0.0.1"
        assert line["rcode"] == "NOERROR"
        assert isinstance(line["latency_ms"], (int, float)) and line["latency_ms"] >= 0
        assert isinstance(line["cached"], bool)
        assert line["upstream"] == (None if line["cached"] else upstream.address)
    by_name = {}
    for line in queries:
        by_name.setdefault(line["name"], []).append(line["cached"])
    assert by_name == {"clean.example.": [False],
                       **{name + ".": [False, True, True] for name in names}}
    # Each polluted name: both forgeries thrown away, each logged with upstream and reason.
    assert {(f["name"], f["reason"]) for f in forgeries} == {
        (name + ".", reason) for name in names for reason in ("no-edns", "forged-address")}
    for line in forgeries:
        assert line["upstream"] == upstream.address
        assert line["type"] == "A"


def test_sigterm_when_idle(running):
    code, elapsed = running.terminate()
    assert code == 0 and elapsed < 2.0
    assert "Traceback" not in running.stderr


def test_sigterm_with_a_query_in_flight(running, upstream):
    """A query waiting on a slow upstream does not hold the shutdown past 2 s."""
    upstream.rule("slow.example", delay=5)
    client = subprocess.Popen([DIG, "@127.0.0.1", "-p", str(running.port),
                               "slow.example", "+time=5", "+tries=1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        waited = time.monotonic() + 3
        while upstream.count("slow.example") == 0 and time.monotonic() < waited:
            time.sleep(0.05)
        assert upstream.count("slow.example") == 1
        code, elapsed = running.terminate()
        assert code == 0 and elapsed < 2.0
    finally:
        client.kill()
        client.wait()


def test_without_the_page_sqlite_is_not_loaded_nor_dnslib_imported(running):
    """Importing the app without them took 25.4 MB instead of 27.2: a household box without the
    page pays for neither."""
    port = running.port
    # started, and has answered
    assert dig_answers(dig(port, "clean.example")) == [("clean.example.", "A", GENUINE)]
    with open(f"/proc/{running.proc.pid}/maps") as maps:
        assert "_sqlite3" not in maps.read()
    probe = ("import sys, dnsproxy.app, dnsproxy.cli; "
             "print(sorted({'sqlite3', 'dnslib'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
