"""Fixtures for the appliance tests: the real image, deployed with the real Makefile and
compose.yaml on the real Docker engine, forwarding to a fake upstream on the appliance's network.

Everything runs under its own compose project, port, subnet and bridge name, so a deployment the
user made with `make up` is never touched. No packet leaves the host: the only upstream is the fake.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_UPSTREAM_SCRIPT = Path(__file__).with_name("fake_upstream.py")

PROJECT = "dnsapp-test"
PORT = 25353
SUBNET = "172.31.233.0/24"
DNS_IP = "172.31.233.53"
BRIDGE = "br-dnsapp-t"
NETWORK = f"{PROJECT}_dnsnet"  # compose names networks <project>_<name> (v1 and v2)
CACHE_VOLUME = f"{PROJECT}_cache"  # and volumes likewise
UPSTREAM_IP = "172.31.233.10"
UPSTREAM_NAME = f"{PROJECT}-upstream"
FAKE_ANSWER = "198.51.100.7"  # what fake_upstream.py answers for *.appliance.test
IMAGE = "dnsproxy:latest"

# The variables `make up` and `make down` get in every test.
MAKE_SETTINGS = {
    "PROJECT": PROJECT,
    "PORT": str(PORT),
    "WEB_PORT": str(PORT + 1),  # the web page's (port mode), beside a deployment of the host's own
    "SUBNET": SUBNET,
    "DNS_IP": DNS_IP,
    "BRIDGE": BRIDGE,
    "UPSTREAMS": UPSTREAM_IP,
    "IMAGE": IMAGE,
    "QUERY_LOG": "1",
    "CONFIG": "",
}


def run(*cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        output = f"{result.stdout}\n{result.stderr}".strip()
        pytest.fail(f"{' '.join(cmd)} failed with {result.returncode}:\n{output}")
    return result


def make(*targets: str, timeout: float = 900, **overrides: str) -> subprocess.CompletedProcess:
    settings = {**MAKE_SETTINGS, **overrides}
    args = [f"{key}={value}" for key, value in settings.items()]
    return run("make", "--no-print-directory", "-C", str(REPO), *targets, *args, timeout=timeout)


def inspect(kind: str, name: str) -> dict:
    return json.loads(run("docker", kind, "inspect", name).stdout)[0]


def appliance_id() -> str:
    """The appliance's container, found by compose's labels (the same in v1 and v2)."""
    out = run("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
              "--filter", "label=com.docker.compose.service=dnsproxy").stdout.split()
    assert len(out) == 1, f"expected one appliance container, found {out}"
    return out[0]


def dig(server: str, port: int, *query: str, tcp: bool = False) -> list[str]:
    """`dig +short` through one path; [] when nothing answered."""
    result = run("dig", f"@{server}", "-p", str(port), "+tcp" if tcp else "+notcp",
                 "+time=2", "+tries=1", "+short", *query, check=False, timeout=10)
    return result.stdout.split() if result.returncode == 0 else []


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def health(container: str) -> str:
    state = inspect("container", container)["State"]
    return state.get("Health", {}).get("Status", "none") if state["Running"] else "not running"


def remove_fake_upstream() -> None:
    run("docker", "rm", "-f", UPSTREAM_NAME, check=False)


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skip where there is no engine, unless the run requires one (.ci/run sets
    DNSAPP_REQUIRE_DOCKER, so CI fails instead of silently skipping)."""
    usable = shutil.which("docker") and run("docker", "info", check=False).returncode == 0
    if not usable:
        if os.environ.get("DNSAPP_REQUIRE_DOCKER"):
            pytest.fail("the Docker engine is not usable")
        pytest.skip("needs the Docker engine")
    if os.geteuid() != 0 and os.environ.get("DNSAPP_REQUIRE_DOCKER"):
        pytest.fail("the appliance tests need root (they build the base with mmdebstrap)")
    if not shutil.which("dig"):
        pytest.fail("dig is missing: apt-get install bind9-dnsutils")


@pytest.fixture(scope="session")
def image(docker_engine) -> dict:
    """`make image`, as a user runs it; returns the image's `docker image inspect`."""
    make("image", timeout=1800)
    return inspect("image", IMAGE)


@pytest.fixture(scope="module")
def appliance(image) -> Iterator[str]:
    """`make up` with the fake upstream; yields the appliance's container id once it is healthy."""
    remove_fake_upstream()
    make("down")  # leftovers of an interrupted run
    run("docker", "volume", "rm", CACHE_VOLUME, check=False)
    make("up")
    # The fake joins the appliance's network (which `make up` made) at the address the appliance
    # was told to forward to. It runs in the appliance image: that has Python and dnslib already.
    run("docker", "run", "-d", "--name", UPSTREAM_NAME, "--network", NETWORK, "--ip", UPSTREAM_IP,
        "--no-healthcheck", "--read-only", "--cap-drop", "ALL",
        "-v", f"{FAKE_UPSTREAM_SCRIPT}:/fake_upstream.py:ro",
        "--entrypoint", "python3", IMAGE, "/fake_upstream.py")
    wait_for(lambda: "fake upstream ready" in upstream_log(), 20, "the fake upstream")
    container = appliance_id()
    wait_for(lambda: health(container) == "healthy", 60, "the appliance to become healthy")
    try:
        yield container
    finally:
        remove_fake_upstream()
        make("down")
        run("docker", "volume", "rm", CACHE_VOLUME, check=False)


def upstream_log() -> str:
    return run("docker", "logs", UPSTREAM_NAME).stdout
