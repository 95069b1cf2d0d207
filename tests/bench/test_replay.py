"""The household client over real sockets, against the upstream itself (no forwarder between):
every query sent at its rate is answered and recorded, and the analysis agrees with what the
upstream counted."""

from __future__ import annotations

import itertools
import time

from bench import household


def replay(targets, names, rate, seconds, timeout=0.5):
    client = household.Replay(targets, names, household.zipf_stream(len(names), 1.0, 5), rate,
                              timeout)
    start = time.time() + 0.1
    client.start(start)
    time.sleep(seconds + 0.1)
    client.stop()
    return client, start


def test_replay_sends_the_same_stream_to_every_target_at_the_rate(start_authority):
    up = start_authority(count=2)
    ttls = [60] * 40
    names = [household.name_for(rank, ttl) for rank, ttl in enumerate(ttls)]
    client, start = replay([("127.0.0.1", p) for p in up.ports], names, rate=200, seconds=1.0)
    arrivals = household.read_arrivals_from(up.arrivals(), up.ports)
    first, second = client.records
    assert 180 <= len(first.send_ns) <= 225  # 200 per second each, for about a second
    assert list(first.name) == list(second.name)[:len(first.name)]
    for index, rec in enumerate(client.records):
        window = household.analyse(rec, start, start + 5, ttls=ttls, base=up.base, delay=0.0,
                                   timeout=0.5, arrivals=arrivals[up.ports[index]])
        assert window.timeouts == 0 and window.answered == len(rec.send_ns)
        assert window.stale == 0 and window.errors == 0
        assert window.upstream == window.answered  # the client asked the upstream itself
        assert window.summary.p50 < 5.0
        assert window.first_asks == len(set(rec.name))


def test_replay_measures_the_upstream_delay(start_authority):
    up = start_authority(delay_ms=30)
    names = [household.name_for(rank, 60) for rank in range(10)]
    client, start = replay([("127.0.0.1", up.ports[0])], names, rate=100, seconds=0.5)
    (rec,) = client.records
    window = household.analyse(rec, start, start + 5, ttls=[60] * 10, base=up.base, delay=0.03,
                               timeout=0.5, arrivals=[])
    assert window.answered == len(rec.send_ns) > 0
    assert window.waited == window.answered
    assert 29.0 <= window.summary.p50 < 60.0


def test_a_silent_target_gives_timeouts():
    from bench.servers import free_port

    port = free_port()  # nothing listens: ICMP port unreachable, no answers
    names = [household.name_for(0, 60)]
    client, start = replay([("127.0.0.1", port)], names, rate=50, seconds=0.3, timeout=0.2)
    (rec,) = client.records
    window = household.analyse(rec, start, start + 5, ttls=[60], base=0.0, delay=0.0,
                               timeout=0.2, arrivals=[])
    assert window.answered == 0 and window.timeouts == len(rec.send_ns) > 0
    assert household.unanswered(rec, start, start + 5) == window.timeouts


def test_the_order_rotates_between_targets():
    """Query k goes first to target k mod n: nobody is always first."""
    sent: list[int] = []
    client = household.Replay([("127.0.0.1", 9), ("127.0.0.1", 9), ("127.0.0.1", 9)],
                              ["a.house.test"], itertools.repeat(0), rate=1000)

    def note_then_stop(target, name, due):  # instead of sending: the order only
        sent.append(target)
        if len(sent) >= 9:
            client._stop_sending.set()

    client._send = note_then_stop
    client._send_all(time.time())
    assert sent[:9] == [0, 1, 2, 1, 2, 0, 2, 0, 1]
