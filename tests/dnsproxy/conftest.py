from __future__ import annotations

import os

import pytest

from dnsproxy import fastpath

from .fakes import FakeUpstream, ProxyThread


@pytest.fixture
def upstream():
    server = FakeUpstream("127.0.0.2")
    yield server
    server.close()


@pytest.fixture
def second_upstream():
    server = FakeUpstream("127.0.0.3")
    yield server
    server.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module marked `both_paths` runs each test that makes a forwarder twice: with the
    compiled UDP hit path and with the Python one (dnsproxy/fastpath.py)."""
    if (metafunc.definition.get_closest_marker("both_paths")
            and "make_proxy" in metafunc.fixturenames):
        metafunc.parametrize("hit_path", ["native", "python"], indirect=True)


@pytest.fixture
def hit_path(request) -> str:
    """Which path answers UDP cache hits: "native", "python", or "default" (native if built)."""
    path = getattr(request, "param", "default")
    if path == "native" and not fastpath.available():
        if os.environ.get("CI"):
            pytest.fail("the compiled hit path is not built (make native)")
        pytest.skip("the compiled hit path is not built (make native)")
    return path


@pytest.fixture
def make_proxy(hit_path):
    proxies: list[ProxyThread] = []

    def make(*options: str, **kwargs) -> ProxyThread:
        if hit_path != "default":
            options = (*options, "--native" if hit_path == "native" else "--no-native")
        proxy = ProxyThread(*options, **kwargs)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
