"""The report's statistics and household tables, from made-up measurements."""

from __future__ import annotations

import math

import pytest

from bench import household, report
from bench.report import Summary


def test_percentile_is_nearest_rank():
    values = list(range(1, 11))
    assert report.percentile(values, 50) == 5
    assert report.percentile(values, 95) == 10
    assert report.percentile(values, 10) == 1
    assert report.percentile(list(range(1, 101)), 99) == 99
    assert report.percentile([7.0], 99) == 7.0
    assert math.isnan(report.percentile([], 50))
    assert report.percentile([3, 1, 2], 50) == 2  # unsorted input


def test_summary_counts_everything_it_is_given():
    s = Summary.of([0.1, 0.2, 0.3, 2000.0])
    assert s.count == 4 and s.p50 == 0.2 and s.p99 == 2000.0
    assert s.mean == pytest.approx(500.15)
    assert math.isnan(Summary.of([]).mean)


def test_number_formats():
    assert report.fmt_ms(0.12345) == "0.123"
    assert report.fmt_ms(41.66) == "41.7"
    assert report.fmt_ms(2000.0) == "2,000"
    assert report.fmt_ms(float("nan")) == "-"
    assert report.fmt_share(0, 10) == "0"
    assert report.fmt_share(1, 8) == "1 (12.5%)"
    assert report.fmt_share(3, 0) == "-"


def window(mean, p50, p95, *, count=1000, stale=0, waited=0, upstream=0, first=0,
           repeat=None, miss=0.3, hits=(float("nan"), float("nan"))):
    return household.Window(Summary(count, mean, p50, p95, p95), [p50] * 10, answered=count,
                            stale=stale, waited=waited, upstream=upstream, first_asks=first,
                            repeat_mean=mean / 2 if repeat is None else repeat,
                            repeat_p50=hits[0], repeat_p95=hits[1], miss_added=miss)


def result(delay, servers):
    return household.PassResult(delay, 120, 60, servers, other_load=0.1, max_lag=0.001,
                                kernel_stamps=True, netem=True)


def test_household_table_has_a_row_per_server():
    r = result(40, [household.ServerResult("dnsproxy", "a file",
                                           window(0.5, 0.1, 0.4, stale=20, waited=5,
                                                  upstream=321, hits=(0.02, 0.15)), 0.05),
                    household.ServerResult("dnsmasq", "none", window(2.0, 0.08, 40.0), 0.02)])
    table = report.household_table(r)
    assert table[0].startswith("| server | queries | mean ms | mean ms, names asked before |")
    assert len(table) == 4
    assert table[2] == ("| dnsproxy | 1,000 | 0.500 | 0.250 | 0.020 / 0.150 | 0.100 | 0.400 | "
                        "0.400 | 0.300 | 5 (0.5%) | 20 (2.0%) | 0 | 0 | 321 | 5.0% |")


def test_targets_are_judged_against_the_best_peer():
    mine = household.ServerResult("dnsproxy", "a file",
                                  window(0.9, 0.1, 0.8, miss=0.2, hits=(0.02, 0.05)), 0.05,
                                  restart=window(0.5, 0.3, 0.9), unanswered=2)
    peers = [household.ServerResult("unbound", "dump", window(2.0, 0.1, 40.0), 0.02),
             household.ServerResult("dnsmasq", "none",
                                    window(3.0, 0.1, 41.0, miss=0.15, hits=(0.02, 0.06)), 0.02,
                                    restart=window(4.0, 0.1, 41.0), unanswered=3)]
    text = "\n".join(report.targets(result(40, [mine, *peers])))
    assert "best peer's (unbound) 2.000 ms: 0.45× (target <= 0.5×: meets)" in text
    assert "without first asks (which no cache can answer): 0.450 ms against unbound's " \
        "1.000 ms: 0.45×" in text
    assert "p95 0.800 ms (target < 1 ms at 40 ms: meets)" in text
    assert ("a miss (a first ask) took 0.200 ms beyond the upstream's delay, dnsmasq's "
            "0.150 ms: +0.050 ms (target within 0.2 ms of dnsmasq's: meets; issue 22: within "
            "0.1 ms: meets)") in text
    assert ("a hit (a name asked before): p50 0.020 ms and p95 0.050 ms, dnsmasq's 0.020 and "
            "0.060 ms (issue 22: at most dnsmasq's: meets)") in text
    assert "the restart left 2 queries unanswered, dnsmasq's 3 (issue 22" in text
    assert "p50 0.300 ms" in text and "MISSES" not in text
    slow = household.ServerResult("dnsproxy", "a file",
                                  window(1.5, 0.1, 1.2, miss=0.5, hits=(0.03, 0.05)), 0.05,
                                  restart=window(3.0, 1.5, 41.0), unanswered=4)
    text = "\n".join(report.targets(result(40, [slow, *peers])))
    # mean, hit p50, the miss (twice: 0.2 and 0.1 ms), p95, after the restart, unanswered
    assert text.count("MISSES") == 7
    assert "set at 40 ms" in "\n".join(report.targets(result(150, [slow, *peers])))


def test_the_history_is_judged_against_dnsproxy_without_it():
    """dnsproxy+history is dnsproxy's own control, not a peer: within 5 % of it, or MISSES."""
    mine = household.ServerResult("dnsproxy", "a file", window(1.0, 0.1, 0.5), 0.040)
    fast = household.ServerResult("dnsproxy+history", "a file", window(0.1, 0.05, 0.2), 0.041)
    peer = household.ServerResult("dnsmasq", "none", window(1.5, 0.1, 40.0), 0.02)
    text = "\n".join(report.targets(result(40, [mine, fast, peer])))
    assert "best peer's (dnsmasq)" in text
    assert ("with the page's history on: CPU 4.10 % of a core against 4.00 % (+2.5 %), mean "
            "0.100 ms against 1.000 ms (-90.0 %) (target within 5 %: meets)") in text
    costly = household.ServerResult("dnsproxy+history", "a file", window(1.0, 0.1, 0.5), 0.045)
    text = "\n".join(report.targets(result(40, [mine, costly, peer])))
    assert "(+12.5 %)" in text and "within 5 %: MISSES" in text


def test_restart_table_says_when_a_restart_failed():
    ok = household.ServerResult("dnsproxy", "a file", window(1, 1, 1), 0.0,
                                restart=window(0.4, 0.2, 0.6, upstream=12), downtime=0.7,
                                unanswered=130)
    bad = household.ServerResult("smartdns", "cache-persist", window(1, 1, 1), 0.0,
                                 restart_error="does not answer")
    table = report.restart_table(result(40, [ok, bad]))
    assert "| dnsproxy | a file | 0.70 s | 130 | 1,000 | 0.400 | 0.200 | 0.600 |" in table[2]
    assert "failed: does not answer" in table[3]


def test_the_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    r = result(40, [household.ServerResult("dnsproxy", "a file", window(1, 0.1, 1), 0.0,
                                           restart=window(1, 0.2, 1))])
    path = tmp_path / "plot.png"
    assert report.plot_household(r, path) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
