"""The household stream: Zipf popularity, the TTL mix, the time compression."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from bench import household


def draws(count: int, s: float, seed: int, n: int) -> list[int]:
    return list(itertools.islice(household.zipf_stream(count, s, seed), n))


def test_zipf_stream_follows_the_rank_law():
    ranks = draws(3000, 1.0, seed=7, n=100_000)
    counts = Counter(ranks)
    harmonic = sum(1 / k for k in range(1, 3001))
    assert abs(counts[0] / len(ranks) - 1 / harmonic) < 0.01  # about 11.7%
    assert 1.8 < counts[0] / counts[1] < 2.2  # s = 1: the first twice the second
    assert 2.7 < counts[0] / counts[2] < 3.3
    assert min(ranks) == 0 and max(ranks) <= 2999
    assert len(counts) > 2000  # the long tail is asked too


def test_zipf_exponent_steepens_the_head():
    flat = Counter(draws(1000, 0.5, seed=1, n=20_000))[0]
    steep = Counter(draws(1000, 1.5, seed=1, n=20_000))[0]
    assert steep > 3 * flat


def test_zipf_stream_is_reproducible_by_seed():
    assert draws(500, 1.0, 3, 1000) == draws(500, 1.0, 3, 1000)
    assert draws(500, 1.0, 3, 1000) != draws(500, 1.0, 4, 1000)


def test_ttl_mix_is_parsed_and_normalised():
    assert household.parse_ttl_mix("60:3, 300:5,3600:2") == [(60, 0.3), (300, 0.5), (3600, 0.2)]
    for bad in ("60", "60:0.5,x:1", "0:1", "60:-1", "60:0"):
        with pytest.raises(ValueError):
            household.parse_ttl_mix(bad)


def test_ttls_are_assigned_in_exact_shares_and_scaled():
    mix = household.parse_ttl_mix("60:0.3,300:0.5,3600:0.2")
    ttls = household.assign_ttls(3000, mix, time_scale=20, seed=13)
    assert Counter(ttls) == {3: 900, 15: 1500, 180: 600}
    assert len(set(ttls[:50])) > 1  # shuffled: popularity says nothing about the TTL
    odd = household.assign_ttls(7, mix, time_scale=1, seed=1)
    assert len(odd) == 7 and Counter(odd) == {60: 2, 300: 4, 3600: 1}  # largest remainders


def test_scaled_ttl_never_reaches_zero():
    assert household.scaled_ttl(3600, 20) == 180
    assert household.scaled_ttl(60, 1000) == 1


def test_names_carry_their_ttl_for_the_upstream():
    from bench import authority

    name = household.name_for(41, 15)
    assert name.endswith("." + household.ZONE)
    assert authority.name_ttl(name.encode()) == 15
    assert authority.name_ttl(b"ready.house.test") == authority.DEFAULT_TTL
