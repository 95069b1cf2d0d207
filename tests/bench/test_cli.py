"""The benchmark's options, and reading dnsperf's output."""

from __future__ import annotations

import pytest

from bench import household, run, workloads

DNSPERF = """\
DNS Performance Testing Tool
Statistics:

  Queries sent:         20000
  Queries completed:    19990 (99.95%)
  Queries lost:         10 (0.05%)

  Response codes:       NOERROR 19980 (99.95%), SERVFAIL 10 (0.05%)
  Average packet size:  request 33, response 49
  Run time (s):         2.000100
  Queries per second:   9994.500275

  Average Latency (s):  0.000400 (min 0.000100, max 0.003000)
> NOERROR h1.bench.test A 0.000120
> NOERROR h2.bench.test A 0.000250
"""


def test_dnsperf_output_is_read():
    perf = workloads.parse_dnsperf(DNSPERF)
    assert (perf.sent, perf.completed, perf.lost, perf.noerror) == (20000, 19990, 10, 19980)
    assert perf.qps == pytest.approx(9994.500275)
    assert perf.avg_latency == pytest.approx(0.0004)
    assert perf.latencies == [0.00012, 0.00025]
    assert not perf.exhausted


def test_defaults_run_every_workload_and_both_delays():
    args = run.parse_args([])
    assert args.workloads == ["saturation", "household", "stall"]
    assert args.household_delay == [40.0, 150.0]
    assert (args.household_seconds, args.restart_window) == (120.0, 60.0)


def test_quick_shortens_both_but_keeps_what_was_asked_for():
    args = run.parse_args(["--quick"])
    assert (args.rounds, args.duration) == (1, 2.0)
    assert args.household_delay == [40.0] and args.household_seconds == 20.0
    args = run.parse_args(["--quick", "--household-delay", "150", "--household-seconds", "30"])
    assert args.household_delay == [150.0] and args.household_seconds == 30.0


def test_unknown_names_are_refused():
    for argv in (["--workloads", "saturation,burst"], ["--household-servers", "bind"],
                 ["--household-ttls", "60"]):
        with pytest.raises(SystemExit):
            run.parse_args(argv)


def test_the_pure_python_path_runs_in_the_household_only_when_named(tmp_path):
    assert "dnsproxy-python" not in run.parse_args([]).household_servers
    args = run.parse_args(["--household-servers", "dnsproxy,dnsproxy-python,dnsmasq"])
    assert args.household_servers == ("dnsproxy", "dnsproxy-python", "dnsmasq")
    assert household.available(("dnsproxy-python",))[0] == ["dnsproxy-python"]
    hh = household.HouseholdPass(household.Settings(), None, None, ["dnsproxy-python"], tmp_path)
    server = hh.build("dnsproxy-python", ("127.0.0.1", 5301), tmp_path)
    assert "--no-native" in server.argv and server.name == "dnsproxy-python"
