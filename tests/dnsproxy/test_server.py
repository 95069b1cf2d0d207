"""The UDP listener's accounting of what a client holds in flight (server.py), on a real event
loop with a pipeline that answers at once."""

from __future__ import annotations

import asyncio

from dnslib import DNSRecord

from dnsproxy import wire
from dnsproxy.metrics import Metrics
from dnsproxy.pipeline import Response
from dnsproxy.querylog import NullLog
from dnsproxy.server import MIN_CLIENT_SHARE, Responder, UdpServer


class Immediate:
    """A pipeline whose every query is a miss answered without waiting on anything."""

    def answer_now(self, request):
        return None

    async def resolve(self, request):
        return Response(wire.response(request.query, wire.NXDOMAIN), "forwarded", wire.NXDOMAIN)


class Sent:
    def __init__(self) -> None:
        self.replies: list[bytes] = []

    def sendto(self, data: bytes, address) -> None:
        self.replies.append(data)


def test_a_client_asking_again_as_its_answers_go_out_is_not_shed() -> None:
    """The client's whole share is answered; in the same pass of the loop, before the tasks'
    done callbacks run, it asks as much again (as a client at full speed does, through the
    compiled path's batches): none of it may be shed as over its share."""
    metrics = Metrics()
    responder = Responder(Immediate(), metrics, NullLog(), max_in_flight=MIN_CLIENT_SHARE)
    server = UdpServer(responder)
    sent = Sent()
    server.connection_made(sent)
    queries = [DNSRecord.question(f"n{i}.test").pack() for i in range(2 * MIN_CLIENT_SHARE)]
    client = ("192.0.2.7", 5300)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for data in queries[:MIN_CLIENT_SHARE]:
            server.datagram_received(data, client)
        # After the tasks' steps (which answer) and before their done callbacks.
        loop.call_soon(lambda: [server.datagram_received(data, client)
                                for data in queries[MIN_CLIENT_SHARE:]])
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert metrics.total("dnsproxy_overload_total") == 0
    assert len(sent.replies) == 2 * MIN_CLIENT_SHARE
    assert responder.held == {} and responder.tasks == {}
