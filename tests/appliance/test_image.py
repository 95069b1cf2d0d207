"""The appliance image: size, metadata, and that rebuilding it reuses the cached base."""

from __future__ import annotations

import os

import pytest

from .conftest import inspect, make

pytestmark = pytest.mark.docker

MAX_SIZE = 60 * 1000 * 1000
BASE = "dnsproxy-base:bookworm"


def test_image_is_at_most_60_mb(image):
    assert image["Size"] <= MAX_SIZE, f"{image['Size'] / 1e6:.1f} MB"


# Python, both iptables flavours, python-iptables and keepalived: Debian's keepalived links
# net-snmp (and through it libperl) and glib, about 19 MB that no build option of ours removes.
MAX_HOST_SERVICE_SIZE = 80 * 1000 * 1000


def test_host_service_image_is_trimmed_too(image):
    """Its base keeps Python, both iptables flavours, python-iptables and keepalived, and the
    libraries they load, only (images/netsetup)."""
    netsetup = inspect("image", "netsetup:latest")
    assert netsetup["Size"] <= MAX_HOST_SERVICE_SIZE, f"{netsetup['Size'] / 1e6:.1f} MB"
    assert netsetup["Config"]["Entrypoint"] == ["python3", "-m", "netsetup.service"]


def test_image_runs_the_forwarder_as_an_unprivileged_user(image):
    config = image["Config"]
    assert config["Entrypoint"] == ["dnsproxy-bind", "python3", "-m", "dnsproxy"]
    user = config["User"].split(":")[0]
    assert user not in ("", "0", "root")


def test_image_has_the_healthcheck(image):
    test = image["Config"]["Healthcheck"]["Test"]
    assert test == ["CMD", "python3", "-m", "dnsproxy.healthcheck"]


def test_image_logs_queries_by_default(image):
    assert "DNSPROXY_QUERY_LOG=1" in image["Config"]["Env"]


@pytest.mark.skipif(os.environ.get("BASE_IMAGE", BASE) != BASE, reason="BASE_IMAGE is not ours")
def test_rebuild_reuses_the_base(image):
    """A second `make image` must not bootstrap the base again (same image id, told so)."""
    before = inspect("image", BASE)["Id"]
    result = make("image")
    assert "is up to date" in result.stdout
    assert inspect("image", BASE)["Id"] == before
