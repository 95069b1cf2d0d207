"""The deployed appliance (`make up`), against the real engine.

The tests run in file order on one deployment: first what it serves, then how it is confined,
last its life cycle (restart after a crash, stop on SIGTERM, `make down`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .conftest import (
    BRIDGE,
    CACHE_VOLUME,
    DNS_IP,
    FAKE_ANSWER,
    NETWORK,
    PORT,
    PROJECT,
    SUBNET,
    UPSTREAM_IP,
    UPSTREAM_NAME,
    appliance_id,
    dig,
    health,
    inspect,
    make,
    remove_fake_upstream,
    run,
    upstream_log,
    wait_for,
)

pytestmark = pytest.mark.docker

# The two ways LAN clients reach it: the published port on the host, and the container's address.
PATHS = {"port": ("127.0.0.1", PORT), "direct": (DNS_IP, 53)}
NET_BIND_SERVICE = 1 << 10


def unique_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}.appliance.test"


def proc_status(container: str) -> dict[str, str]:
    """/proc/1/status of the container's main process, read from inside."""
    script = "print(open('/proc/1/status').read())"
    out = run("docker", "exec", container, "python3", "-c", script).stdout
    return dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_answers_with_the_upstreams_answer(appliance, path, tcp):
    name = unique_name()
    assert dig(*PATHS[path], name, "A", tcp=tcp) == [FAKE_ANSWER]
    assert f"{name}." in upstream_log()


def test_answers_id_server_itself(appliance):
    """The health check's question is answered locally: it never reaches the upstream."""
    assert dig("127.0.0.1", PORT, "-c", "CH", "-t", "TXT", "id.server") != []
    assert "id.server" not in upstream_log()


def test_logs_one_json_line_per_query(appliance):
    name = unique_name()
    dig("127.0.0.1", PORT, name, "A")
    lines = run("docker", "logs", appliance).stdout.splitlines()
    entries = [json.loads(line) for line in lines if f'"{name}.' in line]
    assert len(entries) == 1, lines[-5:]
    assert entries[0]["client"]  # who asked


def test_network_is_the_fixed_unmasqueraded_bridge(appliance):
    network = inspect("network", NETWORK)
    options = network["Options"]
    assert options["com.docker.network.bridge.name"] == BRIDGE
    assert options["com.docker.network.bridge.enable_ip_masquerade"] == "false"
    assert options["com.docker.network.bridge.gateway_mode_ipv4"] == "nat-unprotected"
    assert [c["Subnet"] for c in network["IPAM"]["Config"]] == [SUBNET]
    address = inspect("container", appliance)["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
    assert address == DNS_IP
    assert Path("/sys/class/net", BRIDGE).exists()
    if shutil.which("iptables"):
        # The engine's own rule would hide LAN clients' addresses (direct mode needs them). The
        # host tool's rule, which spares LAN destinations (! -d LAN), is allowed.
        nat = run("iptables", "-t", "nat", "-S", "POSTROUTING").stdout.splitlines()
        assert f"-A POSTROUTING -s {SUBNET} ! -o {BRIDGE} -j MASQUERADE" not in nat


def test_runs_as_non_root(appliance):
    uids = proc_status(appliance)["Uid"].split()
    assert uids and all(uid != "0" for uid in uids), uids


def test_has_only_net_bind_service(appliance):
    host_config = inspect("container", appliance)["HostConfig"]
    assert [c.removeprefix("CAP_") for c in host_config["CapDrop"]] == ["ALL"]
    assert [c.removeprefix("CAP_") for c in host_config["CapAdd"]] == ["NET_BIND_SERVICE"]
    status = proc_status(appliance)
    assert int(status["CapBnd"], 16) == NET_BIND_SERVICE
    assert int(status["CapEff"], 16) & ~NET_BIND_SERVICE == 0


def test_root_filesystem_is_read_only(appliance):
    assert inspect("container", appliance)["HostConfig"]["ReadonlyRootfs"] is True
    script = (
        "import sys\n"
        "written = []\n"
        "for path in ('/probe', '/tmp/probe', '/app/probe', '/etc/probe', '/var/tmp/probe'):\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "        written.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(*written)\n"
    )
    # As root inside the container too: read-only must not depend on file permissions.
    for user in ("", "0"):
        args = ["--user", user] if user else []
        result = run("docker", "exec", *args, appliance, "python3", "-c", script)
        assert result.stdout.strip() == "", f"writable as user {user or 'default'}: {result.stdout}"


def test_query_log_can_be_turned_off(appliance):
    make("up", QUERY_LOG="0")  # compose recreates the container with the new environment
    container = appliance_id()
    env = inspect("container", container)["Config"]["Env"]
    assert "DNSPROXY_QUERY_LOG=0" in env
    name = unique_name()
    wait_for(lambda: dig("127.0.0.1", PORT, name, "A") == [FAKE_ANSWER], 20, "an answer")
    assert name not in run("docker", "logs", container).stdout


def test_a_cdns_config_file_works_unchanged(appliance, tmp_path):
    """A CDNS user's file, as is: it listens on 127.0.0.1:1053, which inside the container
    would hide the server; the appliance still serves port 53, and takes the file's servers."""
    config = tmp_path / "cdns.json"
    config.write_text(
        '{\n  "global": {"daemon": true, "log": "syslog:daemon", "log_debug": false},\n'
        '  // CDNS: local listen address and the upstreams\n'
        '  "cdns": {"listen_ip": "127.0.0.1", "listen_port": 1053, "timeout": 2,\n'
        f'    "servers": [{{"ip_port": "{UPSTREAM_IP}:53", "hijack_threshold": 0}}]}}\n}}\n')
    config.chmod(0o644)
    try:
        make("up", CONFIG=str(config), UPSTREAMS="")
        container = appliance_id()
        assert "DNSPROXY_UPSTREAMS=" in inspect("container", container)["Config"]["Env"]
        wait_for(lambda: health(container) == "healthy", 60, "the appliance to become healthy")
        name = unique_name()
        wait_for(lambda: dig("127.0.0.1", PORT, name, "A") == [FAKE_ANSWER], 20, "an answer")
    finally:
        make("up")  # back to the module's settings


def test_restarts_after_the_main_process_is_killed(appliance):
    """A crash brings it back at the same address. (`docker kill` would not do: the engine
    counts it as a manual stop, which `unless-stopped` respects; so kill the process itself.)"""
    container = appliance_id()
    before = inspect("container", container)
    os.kill(before["State"]["Pid"], signal.SIGKILL)

    def restarted_address() -> str | None:
        now = inspect("container", container)
        again = now["RestartCount"] > before["RestartCount"] and now["State"]["Running"]
        # The engine reports Running a moment before it reattaches the network.
        return again and now["NetworkSettings"]["Networks"][NETWORK]["IPAddress"] or None

    address = wait_for(restarted_address, 30, "the restart policy to restart the container")
    assert address == DNS_IP
    name = unique_name()
    wait_for(lambda: dig(DNS_IP, 53, name, "A") == [FAKE_ANSWER], 20, "answers after the restart")


def test_stops_within_two_seconds_on_sigterm(appliance):
    container = appliance_id()
    wait_for(lambda: dig("127.0.0.1", PORT, "-c", "CH", "-t", "TXT", "id.server"), 20, "serving")
    start = time.monotonic()
    run("docker", "stop", "--time", "10", container)  # SIGTERM, then SIGKILL after 10 s
    elapsed = time.monotonic() - start
    state = inspect("container", container)["State"]
    assert state["ExitCode"] == 0, "not a clean exit: killed, or failed on SIGTERM"
    assert elapsed < 2.0, f"docker stop took {elapsed:.1f} s"
    run("docker", "start", container)


def test_the_cache_survives_a_restart(appliance):
    """Names asked before a restart are answered after it with the upstream unreachable: the
    cache went to the named volume on SIGTERM and came back at start."""
    container = appliance_id()
    mounts = {m["Destination"]: m for m in inspect("container", container)["Mounts"]}
    assert mounts["/var/lib/dnsproxy"]["Type"] == "volume", mounts
    name = unique_name()
    wait_for(lambda: dig(DNS_IP, 53, name, "A") == [FAKE_ANSWER], 20, "an answer")
    run("docker", "pause", UPSTREAM_NAME)  # still there, answering nothing
    try:
        run("docker", "restart", "--time", "10", container)
        wait_for(lambda: health(container) == "healthy", 60, "healthy after the restart")
        assert dig(DNS_IP, 53, name, "A") == [FAKE_ANSWER]
        assert dig(DNS_IP, 53, unique_name(), "A") == []  # the upstream is really out of reach
    finally:
        run("docker", "unpause", UPSTREAM_NAME)


def test_make_down_removes_container_and_network(appliance):
    remove_fake_upstream()  # not part of the deployment; it would keep the network in use
    make("down")
    project = f"label=com.docker.compose.project={PROJECT}"
    assert run("docker", "ps", "-aq", "--filter", project).stdout.split() == []
    assert subprocess.run(["docker", "network", "inspect", NETWORK],
                          capture_output=True).returncode != 0
    assert not Path("/sys/class/net", BRIDGE).exists()
    # the cache stays for the next `make up`, as across a reboot; `make clean` would remove it
    assert run("docker", "volume", "inspect", CACHE_VOLUME, check=False).returncode == 0
