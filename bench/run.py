#!/usr/bin/env python3
"""dnsproxy side by side with its peers: the entry point of `make bench`.

Three workloads, selectable with --workloads:

- saturation (workloads.py): dnsproxy, dnsmasq and unbound on 127.0.0.1, forwarding to one local
  upstream, driven by dnsperf as fast as they go (cache hits, cache misses, a latency probe),
  then dnsproxy's memory, its forgery defences' cost and the appliance container;
- household (household.py): a Zipf-shaped stream at a household's pace against dnsproxy,
  dnsmasq, unbound and smartdns with their stale-serving and prefetch features, through an
  upstream in a network namespace behind a netem delay, with a restart mid-stream. Needs root;
- stall (stall.py): how long dnsproxy's event loop stands still, seen by a steady stream of
  cache hits, while it saves 100k cached entries and reloads lists of 100k names.

The report goes to stdout and bench/results/latest.md (with the household plots beside it).
This file only parses the options and runs the parts in order; see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/run.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import household, report, stall
from bench.servers import ROOT, BenchError, Fleet, say
from bench.workloads import Cpus, Saturation

RESULTS = ROOT / "bench" / "results" / "latest.md"
WORKLOADS = ("saturation", "household", "stall")
SATURATION_SERVERS = ("dnsproxy", "dnsproxy-python", "dnsmasq", "unbound")


def _names(text: str, allowed: tuple[str, ...], what: str, p: argparse.ArgumentParser) -> list:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(names) - set(allowed)
    if unknown:
        p.error(f"unknown {what}: {', '.join(sorted(unknown))} (known: {', '.join(allowed)})")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="dnsproxy against its peers, side by side")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: saturation 1 round of 2 s, 10k names cached; household at "
                   "40 ms only, 5 s warm-up, 20 s measured, 15 s after the restart")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of saturation,household,stall")
    p.add_argument("--output", type=Path, default=RESULTS,
                   help="where the markdown goes (the plots go beside it)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin servers and load to different CPUs (saturation; the "
                   "household run never pins)")

    sat = p.add_argument_group("saturation")
    sat.add_argument("--rounds", type=int, default=3)
    sat.add_argument("--duration", type=float, default=10.0, help="seconds per dnsperf run")
    sat.add_argument("--clients", type=int, default=4, help="dnsperf -c")
    sat.add_argument("--outstanding", type=int, default=200, help="dnsperf -q")
    sat.add_argument("--hot-names", type=int, default=100, help="size of the cache-hit set")
    sat.add_argument("--miss-rate-cap", type=int, default=100_000,
                     help="unique names per second of a miss run (the file's size)")
    sat.add_argument("--probe-qps", type=int, default=2000, help="rate of the latency probe")
    sat.add_argument("--probe-seconds", type=float, default=5.0)
    sat.add_argument("--cache-size", type=int, default=10000,
                     help="dnsmasq's (and in the household run smartdns') cache, in names")
    sat.add_argument("--cached-names", type=int, default=100_000,
                     help="names in dnsproxy's cache for the memory figure")
    sat.add_argument("--servers", default=",".join(SATURATION_SERVERS),
                     help=f"comma-separated subset of {','.join(SATURATION_SERVERS)}")
    sat.add_argument("--no-docker", dest="docker", action="store_false",
                     help="skip the appliance container part")

    hh = p.add_argument_group("household (needs root: network namespace, tc netem)")
    d = household.Settings()
    hh.add_argument("--household-delay", default=None,
                    help="comma-separated upstream delays in ms, one pass each (default 40,150)")
    hh.add_argument("--household-seconds", type=float, default=None,
                    help=f"measured seconds per pass (default {d.seconds:g})")
    hh.add_argument("--household-warmup", type=float, default=None,
                    help=f"seconds of stream before the measured part (default {d.warmup:g})")
    hh.add_argument("--restart-window", type=float, default=None,
                    help="seconds measured after the mid-stream restart, 0 for no restart "
                    f"(default {d.restart_window:g})")
    hh.add_argument("--household-rate", type=float, default=d.rate,
                    help="queries per second to each server")
    hh.add_argument("--household-names", type=int, default=d.names)
    hh.add_argument("--household-zipf", type=float, default=d.zipf, help="Zipf exponent s")
    hh.add_argument("--household-ttls", default=d.ttl_mix,
                    help="real-life TTL mix, SECONDS:SHARE,...")
    hh.add_argument("--household-time-scale", type=float, default=d.time_scale,
                    help="TTLs are divided by this: how much faster than a household the run is")
    hh.add_argument("--household-servers", default=",".join(household.SERVERS),
                    help="comma-separated subset of "
                    f"{','.join(household.SERVERS + household.OPTIONAL)}")
    hh.add_argument("--seed", type=int, default=d.seed, help="of the query stream")

    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.probe_seconds = 1, 2.0, 1.0
        args.cached_names = min(args.cached_names, 10_000)
    quick = {"household_delay": "40", "household_seconds": 20.0, "household_warmup": 5.0,
             "restart_window": 15.0}
    full = {"household_delay": "40,150", "household_seconds": d.seconds,
            "household_warmup": d.warmup, "restart_window": d.restart_window}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workloads = _names(args.workloads, WORKLOADS, "workloads", p)
    args.servers = _names(args.servers, SATURATION_SERVERS, "servers", p)
    args.household_servers = tuple(_names(args.household_servers,
                                          household.SERVERS + household.OPTIONAL,
                                          "household servers", p))
    try:
        args.household_delay = [float(x) for x in args.household_delay.split(",") if x.strip()]
        household.parse_ttl_mix(args.household_ttls)
    except ValueError as exc:
        p.error(str(exc))
    return args


def settings_of(args: argparse.Namespace) -> household.Settings:
    return household.Settings(
        names=args.household_names, zipf=args.household_zipf, rate=args.household_rate,
        ttl_mix=args.household_ttls, time_scale=args.household_time_scale,
        warmup=args.household_warmup, seconds=args.household_seconds,
        restart_window=args.restart_window, seed=args.seed, servers=args.household_servers,
        cache_size=args.cache_size)


def cpus_of(args: argparse.Namespace) -> Cpus:
    """For the saturation run, with two or more cores: the server under test on the last,
    dnsperf and the upstream on CPU 0."""
    count = os.cpu_count() or 1
    if args.pin and count >= 2 and shutil.which("taskset") is not None:
        return Cpus(server=count - 1, load=0)
    return Cpus(server=None, load=None)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # the same clean-up as Ctrl-C: every `finally` runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "saturation" in args.workloads:
        missing = [t for t in ("dnsperf", "dnsmasq", "unbound") if shutil.which(t) is None]
        if missing:
            print(f"bench: missing {', '.join(missing)} (Debian: apt-get install dnsperf "
                  f"dnsmasq-base unbound)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _terminate)
    # Also when started with SIGINT ignored (a background job of a script): Ctrl-C or kill -INT
    # must still remove the namespace and stop the servers.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = report.Report()
    with tempfile.TemporaryDirectory(prefix="dnsbench-") as tmp:
        fleet = Fleet(Path(tmp))
        cpus = cpus_of(args)
        try:
            start = datetime.datetime.now().astimezone()
            digest = report.source_digest()
            out.emit(*report.header(start, report.tool_versions()))
            if "saturation" in args.workloads:
                Saturation(args, fleet, cpus, out.emit).run()
            if "household" in args.workloads:
                household.run(settings_of(args), args.household_delay, fleet, out.emit,
                              args.output.parent)
            if "stall" in args.workloads:
                out.emit(*stall.section(stall.run(stall.Settings(), fleet, Path(tmp))))
            if report.source_digest() != digest:
                say("warning: dnsproxy's sources changed during the run")
                out.emit("**Warning**: dnsproxy's sources changed during this run; servers "
                         "started at different times ran different code. Run it again.", "")
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            say("interrupted; cleaning up")
            return 130
        finally:
            fleet.stop_all()
    say("done")
    text = out.text()
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    say(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
