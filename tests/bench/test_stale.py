"""How an answer is judged stale: the time the upstream encoded in it against the name's TTL,
and the client's parsing of replies."""

from __future__ import annotations

from dnslib import CNAME, QTYPE, RR, A, DNSRecord

from bench import authority, household


def test_encoded_time_round_trips_within_a_tick():
    base = 1_000_000.0
    for offset in (0.0, 12.34, 6000.0):
        address = authority.encode_time(base + offset, base)
        assert address >> 16 == (198 << 8) | 19  # 198.19.0.0/16
        made = authority.decode_time(address, base, received=base + offset + 0.05)
        assert abs(made - (base + offset)) <= authority.TICK


def test_decoding_survives_the_wrap_of_the_encoding():
    base = 0.0
    period = authority.TICKS * authority.TICK
    now = base + period + 100.0  # a second lap
    made = authority.decode_time(authority.encode_time(now, base), base, received=now + 1)
    assert abs(made - now) <= authority.TICK


def test_an_address_not_made_by_the_upstream_is_not_judged():
    assert authority.decode_time((192 << 24) | (2 << 8) | 1, 0.0, 10.0) is None


def test_stale_means_received_after_expiry_plus_slack():
    made, ttl, one_way = 100.0, 3, 0.04
    edge = made + ttl + one_way + household.SLACK
    assert not household.is_stale(edge - 0.01, made, ttl, one_way)
    assert household.is_stale(edge + 0.01, made, ttl, one_way)


def test_first_a_skips_a_cname_and_reads_the_address_and_ttl():
    query = DNSRecord.question("www.example.test")
    reply = query.reply()
    reply.add_answer(RR("www.example.test", QTYPE.CNAME, rdata=CNAME("cdn.example.test"), ttl=9))
    reply.add_answer(RR("cdn.example.test", QTYPE.A, rdata=A("198.19.1.2"), ttl=42))
    packet = reply.pack()
    offset = 12 + len(b"\x03www\x07example\x04test\x00") + 4
    assert household.first_a(packet, offset) == ((198 << 24) | (19 << 16) | (1 << 8) | 2, 42)
    assert household.first_a(packet[:-3], offset) is None  # cut short
    assert household.first_a(query.reply().pack(), offset) is None  # no answer


def records(rows: list[tuple[float, float | None, int, int]]) -> household.Records:
    """(sent, received or None, name index, address) rows."""
    rec = household.Records()
    for sent, received, name, address in rows:
        rec.send_ns.append(int(sent * 1e9))
        rec.due_ns.append(int(sent * 1e9) - 1000)  # a microsecond late
        rec.recv_ns.append(int(received * 1e9) if received else 0)
        rec.name.append(name)
        rec.rcode.append(0 if received else -1)
        rec.address.append(address)
    return rec


def test_analysis_counts_stale_waited_timeouts_first_asks_and_upstream():
    base = 1000.0
    ttls = [3, 180]
    fresh = authority.encode_time(1010.0, base)  # made at 1010
    rec = records([
        (1009.0, 1009.05, 0, fresh),   # before the window: not counted, but name 0 is now seen
        (1010.0, 1010.0002, 0, fresh),  # hit, fresh
        (1014.0, 1014.0002, 0, fresh),  # hit, but 4 s after a 3 s TTL: stale
        (1015.0, 1015.041, 1, authority.encode_time(1015.0, base)),  # first ask, waited
        (1016.0, None, 1, -1),          # timeout
        (1020.0, 1020.0001, 1, fresh),  # after the window
    ])
    window = household.analyse(rec, 1010.0, 1020.0, ttls=ttls, base=base, delay=0.04,
                               timeout=2.0, arrivals=[1009.0, 1015.0, 1015.5, 1021.0])
    assert window.summary.count == 4
    assert (window.answered, window.timeouts, window.stale) == (3, 1, 1)
    assert (window.waited, window.first_asks, window.upstream) == (1, 1, 2)
    assert window.latencies[-1] == 2000.0  # a timeout counts as the timeout
    assert abs(window.summary.p50 - 0.2) < 1e-6
    # names asked before: the two hits (0.2 ms each) and the timeout of name 1 (2000 ms)
    assert abs(window.repeat_mean - (0.2 + 0.2 + 2000.0) / 3) < 1e-6
    assert household.unanswered(rec, 1010.0, 1020.0) == 1
    assert abs(window.max_lag - 1e-6) < 1e-9
    # the one answered first ask took 41 ms against a 40 ms upstream
    assert abs(window.miss_added - 1.0) < 1e-6


def test_a_late_answer_is_a_timeout():
    rec = records([(10.0, 12.5, 0, -1)])
    window = household.analyse(rec, 0, 20, ttls=[60], base=0.0, delay=0.04, timeout=2.0,
                               arrivals=[])
    assert (window.answered, window.timeouts) == (0, 1)

