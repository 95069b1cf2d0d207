from __future__ import annotations

import pytest

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


@pytest.fixture
def make_proxy():
    proxies: list[ProxyThread] = []

    def make(*options: str, **kwargs) -> ProxyThread:
        proxy = ProxyThread(*options, **kwargs)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
