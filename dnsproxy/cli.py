"""The command line: `dnsproxy` / `python -m dnsproxy`.

Every option is also a setting of the config file and an environment variable
(`DNSPROXY_<NAME>`); the command line wins. A bad setting prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import NoReturn

from .config import ConfigError, build_settings

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dnsproxy", description="A pollution-resistant DNS forwarder.",
                argument_default=argparse.SUPPRESS)
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="serve UDP and TCP here; repeatable; IPv6 as [::]:53 (default 0.0.0.0:53)")
    p.add_argument("--upstream", dest="upstreams", action="append", metavar="SPEC",
                   help="IP[:PORT], [IPv6]:PORT, udp://, tcp://, tls://IP[:853][#name], "
                        "https://HOST/PATH; repeatable")
    p.add_argument("--domestic-upstream", dest="domestic_upstreams", action="append",
                   metavar="SPEC", help="split DNS: a domestic resolver (same forms as "
                   "--upstream, which stays the trusted group); repeatable")
    p.add_argument("--domestic-domains", action="append", metavar="FILE",
                   help="names (and their subdomains) asked of the domestic upstreams only: one "
                        "a line, or dnsmasq server=/name/addr lines; repeatable")
    p.add_argument("--foreign-domains", action="append", metavar="FILE",
                   help="names asked of the trusted upstreams only: one a line, or a gfwlist; "
                        "repeatable")
    p.add_argument("--domestic-ips", action="append", metavar="FILE",
                   help="ranges (CIDR a line, IPv4 and IPv6) a domestic answer must lie in to "
                        "be used for an unlisted name; repeatable")
    p.add_argument("--domestic-trust-empty", action=argparse.BooleanOptionalAction,
                   help="an unlisted name's domestic NXDOMAIN/NODATA is used (default off)")
    p.add_argument("--learn-forged-addresses", action=argparse.BooleanOptionalAction,
                   help="add the addresses of replies proven forged to the forged list, kept "
                        "in --state-dir (default on)")
    p.add_argument("--config", metavar="FILE", help="TOML settings, or a CDNS config file")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="deadline per query, then SERVFAIL (default 2)")
    p.add_argument("--cache-size", type=int, metavar="N",
                   help="replies cached, 0 for none (default 10000)")
    p.add_argument("--cache-bytes", type=int, metavar="BYTES",
                   help="bytes the cached replies may take in all (default 32 MiB)")
    p.add_argument("--max-ttl", type=int, metavar="SECONDS", help="cap on cached TTLs")
    p.add_argument("--serve-stale", action=argparse.BooleanOptionalAction,
                   help="answer expired entries at once while refreshing them (default on)")
    p.add_argument("--stale-ttl", type=int, metavar="SECONDS",
                   help="TTL of a stale answer (default 30)")
    p.add_argument("--max-stale", type=int, metavar="SECONDS",
                   help="how long past expiry an entry may be served stale (default 86400)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction,
                   help="refresh entries asked for in the last tenth of their TTL (default on)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep the cache here across restarts (default: nowhere)")
    p.add_argument("--cache-save-interval", type=float, metavar="SECONDS",
                   help="save the cache to --state-dir this often, and on exit (default 300)")
    p.add_argument("--query-log", action=argparse.BooleanOptionalAction,
                   help="one JSON line per query and per discarded forgery on stdout")
    p.add_argument("--ca-file", metavar="FILE", help="trust only this CA for tls:// and https://")
    p.add_argument("--allow", action="append", metavar="CIDR",
                   help="networks served (default: loopback and private ranges); repeatable")
    p.add_argument("--rate-limit", type=float, metavar="QPS",
                   help="queries per second per client, 0 for none (default 500)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    p.add_argument("--web", metavar="HOST:PORT",
                   help="serve the appliance's page here (loopback clients only without "
                        "--web-password-file)")
    p.add_argument("--web-password-file", metavar="FILE",
                   help="the page's password, its first line; created with a generated one "
                        "when missing")
    p.add_argument("--history-days", type=int, metavar="DAYS",
                   help="days of query history the page keeps, in --state-dir (default 7)")
    p.add_argument("--native", action=argparse.BooleanOptionalAction,
                   help="answer UDP cache hits in compiled code when it is built (default on)")
    p.add_argument("--version", action="store_true",
                   help="print the version and which path answers UDP cache hits")
    p.add_argument("--workers", type=int, metavar="N",
                   help="processes sharing the listen sockets (SO_REUSEPORT)")
    p.add_argument("--edns-marker", action=argparse.BooleanOptionalAction,
                   help="discard OPT-less replies from upstreams that send OPT (default on)")
    p.add_argument("--forged-addresses", action=argparse.BooleanOptionalAction,
                   help="discard answers with known injected addresses, on every transport "
                        "(default on)")
    p.add_argument("--forged-address", action="append", metavar="IP",
                   help="add an address to the forged list; repeatable")
    p.add_argument("--forged-addresses-file", action="append", metavar="FILE",
                   help="add addresses from a file, one per line")
    p.add_argument("--hijack-threshold", action=argparse.BooleanOptionalAction,
                   help="discard UDP replies faster than an upstream's hijack_threshold "
                        "(default on)")
    p.add_argument("--tcp-for-polluted", action=argparse.BooleanOptionalAction,
                   help="ask names seen polluted over TCP (default on)")
    p.add_argument("--hedge-delay", type=float, metavar="SECONDS",
                   help="ask the next upstream too after this long (default 0.3)")
    p.add_argument("--tcp-idle-timeout", type=float, metavar="SECONDS")
    p.add_argument("--tcp-max-connections", type=int, metavar="N")
    p.add_argument("--tcp-max-per-client", type=int, metavar="N")
    p.add_argument("--max-in-flight", type=int, metavar="N",
                   help="queries waiting on upstreams at once; beyond, new ones are shed")
    p.add_argument("--identity", metavar="TEXT", help="answer to CHAOS TXT id.server")
    p.add_argument("--local-dns", dest="local_dns", action="append", metavar="SPEC",
                   help="the LAN's resolver (the router; same forms as --upstream): the only "
                        "one asked for local domains, single-label names and --local-reverse "
                        "zones; without it they get NXDOMAIN here; repeatable")
    p.add_argument("--local-domain", dest="local_domains", action="append", metavar="NAME",
                   help="a domain of the home; repeatable (default lan, home.arpa, internal, "
                        "localdomain)")
    p.add_argument("--local-reverse", action="append", metavar="CIDR",
                   help="the LAN's network: its reverse zones are the home's; repeatable")
    p.add_argument("--zone", dest="zones", action="append", metavar="NAME=SPEC",
                   help="ask this resolver (same forms as --upstream) for NAME and its "
                        "subdomains; repeatable")
    p.add_argument("--hosts", action="append", metavar="FILE",
                   help="answer A, AAAA and PTR from a file in the /etc/hosts format, re-read "
                        "on SIGHUP; repeatable")
    p.add_argument("--block-ddr", action=argparse.BooleanOptionalAction,
                   help="answer resolver.arpa with NODATA, so DDR clients keep asking us "
                        "(default on)")
    p.add_argument("--block-doh-canary", action=argparse.BooleanOptionalAction,
                   help="answer use-application-dns.net with NXDOMAIN, so Firefox keeps its "
                        "own DNS over HTTPS off (default on)")
    p.add_argument("--block-private-relay", action=argparse.BooleanOptionalAction,
                   help="answer iCloud Private Relay's names with NXDOMAIN (default off)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _worker(settings, cli: dict) -> None:
    from .app import run
    from .listen import ListenError

    try:
        run(settings, cli, True)
    except ConfigError as exc:
        print(f"dnsproxy: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except ListenError as exc:
        print(f"dnsproxy: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


def _run_workers(settings, cli: dict, count: int) -> int:
    """N processes, each with its own sockets on the same ports (SO_REUSEPORT) and own cache.

    Limits that are per client (rate, TCP connections) apply per worker. The first worker to
    end ends them all: half a service that looks whole is worse than a clear failure.
    """
    import multiprocessing  # here: the single process binds before anything heavy (listen.py)
    import multiprocessing.connection

    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_worker, args=(settings, cli), daemon=True)
                for _ in range(count)]
    for child in children:
        child.start()

    def forward(signum, _frame):
        for child in children:
            if child.pid:
                os.kill(child.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    by_sentinel = {child.sentinel: child for child in children}
    first = by_sentinel[multiprocessing.connection.wait(list(by_sentinel))[0]]
    for child in children:
        if child.is_alive():
            os.kill(child.pid, signal.SIGTERM)
    for child in children:
        child.join(5)
    code = first.exitcode or 0
    return code if code >= 0 else 1  # killed by a signal: a failure all the same


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    if args.pop("version", False):
        from . import __version__, fastpath
        from .config import Settings

        native = args.get("native", True)
        print(f"dnsproxy {__version__}; UDP cache hits: "
              f"{fastpath.which(Settings(native=native))}")
        return 0
    logging.basicConfig(level=args.pop("log_level").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = build_settings(args)
    except ConfigError as exc:
        print(f"dnsproxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .listen import ListenError, bind_listeners, passed_sockets

    passed = passed_sockets()  # a launcher's (dnsproxy-bind, systemd)
    try:
        if settings.workers > 1:
            for sock in passed.values():  # each worker binds its own (SO_REUSEPORT)
                sock.close()
            return _run_workers(settings, args, settings.workers)
        # Before the forwarder's imports: see listen.py.
        listeners = bind_listeners(settings, passed=passed)
        from .app import run

        run(settings, args, listeners=listeners)
    except ConfigError as exc:
        print(f"dnsproxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ListenError as exc:
        print(f"dnsproxy: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    _exit_at_once()


def _exit_at_once() -> NoReturn:
    """Leave without the interpreter's teardown, once the service has stopped: it saved and
    flushed all it keeps, and its sockets are closed. The teardown (freeing every object, about
    6 ms) would only delay the exit a supervisor waits for before it starts the next process,
    with the port closed all the while."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
