"""Assembling the forwarder from Settings, and running it until it is told to stop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import ipaddress
import logging
import os
import resource
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import cachefile, domainlists, fastpath, homenames, hosts, routingfile
from .config import ConfigError, Settings, build_settings, parse_listen
from .forgery import (
    LEARNED_FILE,
    EdnsState,
    ForgeryFilters,
    LearnedAddresses,
    build_filters,
    load_forged_addresses,
    write_learned,
)
from .forwarder import Forwarder
from .listen import Listener, ListenError, bind_listeners
from .metrics import Metrics, serve_metrics
from .pipeline import Pipeline
from .querylog import NullLog, QueryLog, Tee
from .server import Responder, TcpServer, UdpServer
from .split import SplitResolver
from .stages.access import AccessControl
from .stages.cache import Cache
from .stages.hosts import HostsAnswers
from .stages.local import LocalAnswers
from .stages.ratelimit import RateLimit
from .stages.special import SpecialNames
from .statefile import release
from .upstreams import (
    PollutedNames,
    Telemetry,
    Upstream,
    UpstreamSpec,
    build_upstream,
    client_ssl_context,
)
from .upstreams.bootstrap import Bootstrap
from .zones import ZoneRouter

if TYPE_CHECKING:
    from .history import History

log = logging.getLogger("dnsproxy")


# What a reload cannot change: sockets, the log, the process layout, the TCP and load limits.
RESTART_ONLY = ("listen", "metrics", "query_log", "workers", "tcp_idle_timeout",
                "tcp_max_connections", "tcp_max_per_client", "max_in_flight", "state_dir",
                "cache_save_interval", "web", "web_password_file", "history_days")


@dataclass
class Learned:
    """What real traffic taught about the upstreams: a reload keeps it, or a SIGHUP would
    reopen the window in which an OPT-less forgery is held and may be released."""

    edns: dict[str, EdnsState] = field(default_factory=dict)  # by upstream name
    polluted: PollutedNames = field(default_factory=PollutedNames)
    # Addresses of forgeries beaten by a genuine reply (kept in the state directory too).
    forged: LearnedAddresses = field(default_factory=LearnedAddresses)


@dataclass
class Forwarding:
    """The parts that a reload replaces; the cache lives outside so a reload keeps it."""

    pipeline: Pipeline
    forwarder: Forwarder  # the trusted upstreams (--upstream)
    access: AccessControl  # also guards the metrics endpoint
    resolver: Forwarder | SplitResolver | ZoneRouter  # the last link (zones in front)
    forged: set[bytes] = field(default_factory=set)  # the shipped and operator's lists
    home: homenames.NameTable | None = None  # names at home: where each goes


def configure_cache(cache: Cache, settings: Settings) -> None:
    cache.resize(settings.cache_size, settings.cache_bytes)
    cache.cap_ttls(settings.max_ttl)
    cache.serve_stale = settings.serve_stale
    cache.stale_ttl = settings.stale_ttl
    cache.max_stale = settings.max_stale
    cache.prefetch = settings.prefetch


def build_group(specs: list[UpstreamSpec], settings: Settings, telemetry: Telemetry,
                filters: ForgeryFilters, learned: Learned,
                ssl_context: ssl.SSLContext | None) -> list[Upstream]:
    """One group of upstreams, each with every defence; DoH servers by host name are looked
    up through the group's upstreams that need no look-up."""
    upstreams = [build_upstream(spec, telemetry, filters=filters, polluted=learned.polluted,
                                ssl_context=ssl_context,
                                tcp_for_polluted=settings.tcp_for_polluted,
                                edns=learned.edns.get(spec.name))
                 for spec in specs]
    pairs = list(zip(upstreams, specs, strict=True))
    direct = [upstream for upstream, spec in pairs if not spec.needs_bootstrap]
    for upstream, spec in pairs:
        if spec.needs_bootstrap:
            upstream.bootstrap = Bootstrap(spec.host, direct)
    return upstreams


def load_lists(settings: Settings) -> domainlists.DomainLists:
    started = time.perf_counter()
    try:
        lists = domainlists.load(settings.domestic_domains, settings.foreign_domains,
                                 settings.domestic_ips)
    except domainlists.ListError as exc:
        raise ConfigError(str(exc)) from None
    loaded = lists.loaded
    log.info("split DNS: %d names, %d address ranges from %d files in %.0f ms "
             "(%d gfwlist rules skipped)", loaded.domains, loaded.ranges, len(loaded.files),
             (time.perf_counter() - started) * 1000, loaded.skipped)
    return lists


def load_home_names(settings: Settings) -> tuple[homenames.NameTable, hosts.HostsTable | None]:
    try:
        table = homenames.build_table(settings)
        hosts_table = hosts.load(settings.hosts) if settings.hosts else None
    except ValueError as exc:  # a bad hosts line: FILE:LINE: why
        raise ConfigError(str(exc)) from None
    return table, hosts_table


def log_home_names(settings: Settings, hosts_table: hosts.HostsTable | None) -> None:
    """What was configured, once the whole configuration is built (a bad setting must stay
    the only line); nothing for the defaults."""
    if hosts_table is not None:
        log.info("hosts: %d names, %d addresses from %d files", hosts_table.names,
                 hosts_table.addresses, len(hosts_table.files))
    if settings.local_dns:
        home = ", ".join([*settings.local_domains, *settings.local_reverse, "single-label names"])
        log.info("names at home (%s) go to %s only", home,
                 ", ".join(spec.name for spec in settings.local_dns))


def build_home_groups(settings: Settings, telemetry: Telemetry, filters: ForgeryFilters,
                      learned: Learned, ssl_context: ssl.SSLContext | None,
                      ) -> dict[str, Forwarder]:
    """The groups the zone router sends to: the LAN's resolvers (--local-dns) and each zone's."""
    groups: dict[str, Forwarder] = {}
    zones = homenames.zone_groups(settings)
    for group, specs in [(homenames.LOCAL_GROUP, settings.local_dns), *zones.items()]:
        if not specs:
            continue
        if group == homenames.LOCAL_GROUP:
            # A resolver on the LAN is no injector's target, and answers fast, often without
            # OPT: the checks of port, ID and question only; nothing learned, nothing retried.
            members = build_group(specs, settings, telemetry, build_filters(False, None, False),
                                  Learned(edns=learned.edns), ssl_context)
        else:  # a zone's resolver may be anywhere: every defence, teaching nothing
            members = build_group(specs, settings, telemetry, filters.not_teaching(), learned,
                                  ssl_context)
        groups[group] = Forwarder(members, metrics=telemetry.metrics, timeout=settings.timeout,
                                  hedge_delay=settings.hedge_delay, max_ttl=settings.max_ttl)
    return groups


@dataclass
class Prepared:
    """What a configuration needs from files: read in a thread on a reload (the lists of 100k
    names take 0.4 s to parse), so the event loop only builds and swaps the objects."""

    settings: Settings
    forged: set[bytes]  # the shipped list (unless turned off) and the operator's
    lists: domainlists.DomainLists | None  # split DNS only
    home: homenames.NameTable  # names at home: where each goes (homenames.py)
    hosts: hosts.HostsTable | None  # --hosts files
    ssl_context: ssl.SSLContext | None  # only when encrypting: the system's CAs cost megabytes


def prepare(settings: Settings) -> Prepared:
    """Read every file the settings name; ConfigError on the first problem. Touches nothing the
    event loop owns, so a reload runs it in a thread."""
    home, hosts_table = load_home_names(settings)  # first: a bad line costs nothing else
    try:
        forged = load_forged_addresses(settings.forged_address, settings.forged_addresses_file,
                                       builtin=settings.forged_addresses)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    lists = load_lists(settings) if settings.domestic_upstreams else None
    ssl_context = None
    zone_specs = [spec for specs in homenames.zone_groups(settings).values() for spec in specs]
    if any(spec.scheme in ("tls", "https")
           for spec in [*settings.upstreams, *settings.domestic_upstreams,
                        *settings.local_dns, *zone_specs]):
        try:
            ssl_context = client_ssl_context(settings.ca_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ca_file {settings.ca_file}: {exc}") from None
    return Prepared(settings, forged, lists, home, hosts_table, ssl_context)


def read_configuration(cli: dict) -> Prepared:
    """A reload's reading: the settings' layers, then the files they name (in a thread)."""
    return prepare(build_settings(cli))


def build_forwarding(prepared: Prepared, metrics: Metrics, querylog: QueryLog,
                     cache: Cache, learned: Learned) -> Forwarding:
    """The objects of a configuration, on the event loop: cheap, and they belong to it."""
    settings, forged = prepared.settings, prepared.forged
    learner = learned.forged if settings.learn_forged_addresses else None
    # --no-forged-addresses drops the shipped list; addresses the user adds still count.
    filters = build_filters(settings.edns_marker, forged, settings.hijack_threshold, learner)
    telemetry = Telemetry(metrics, querylog)
    upstreams = build_group(settings.upstreams, settings, telemetry, filters, learned,
                            prepared.ssl_context)
    forwarder = Forwarder(upstreams, metrics, settings.timeout, settings.hedge_delay,
                          max_ttl=settings.max_ttl)
    resolver: Forwarder | SplitResolver | ZoneRouter = forwarder
    domestic: list[Upstream] = []
    if prepared.lists is not None:
        # The domestic group checks learned addresses but teaches nothing: its verified
        # answers for blocked names are poisoned, and must not count as genuine.
        domestic = build_group(settings.domestic_upstreams, settings, telemetry,
                               filters.not_teaching(), learned, prepared.ssl_context)
        resolver = SplitResolver(
            forwarder, Forwarder(domestic, metrics, settings.timeout, settings.hedge_delay,
                                 max_ttl=settings.max_ttl),
            prepared.lists, metrics, trust_empty=settings.domestic_trust_empty)
    # Names at home: the LAN's resolver and the zones' go in front of all that.
    home = prepared.home
    groups = (build_home_groups(settings, telemetry, filters, learned, prepared.ssl_context)
              if home.routes() else {})
    if groups:
        resolver = ZoneRouter(resolver, home, groups, metrics)
    home_upstreams = [upstream for group in groups.values() for upstream in group.upstreams]
    # What was learned of upstreams no longer configured goes.
    learned.edns = {upstream.name: upstream.edns
                    for upstream in [*upstreams, *domestic, *home_upstreams]}
    configure_cache(cache, settings)
    cache.refresher = resolver.refresh  # refreshes started from now on use the new upstreams
    access = AccessControl(settings.allow, metrics)
    # The order of the chain, and why:
    stages = [
        access,  # strangers cost nothing and learn nothing
        *([RateLimit(settings.rate_limit, 2 * settings.rate_limit, metrics)]
          if settings.rate_limit else []),  # before any work, cached answers included
        LocalAnswers(settings.identity, metrics),  # health checks and ANY never leave the host
        # The user's own names, then special-use names and home names that never leave.
        *([HostsAnswers(prepared.hosts, metrics, hosts.HOSTS_TTL)] if prepared.hosts else []),
        SpecialNames(home, metrics),
        cache,  # only then the cache; what it misses goes to the forwarder (forgery filters inside)
    ]
    log_home_names(settings, prepared.hosts)
    return Forwarding(Pipeline(stages, resolver), forwarder, access, resolver, forged, home)


@dataclass
class StateSnapshot:
    """What a save writes, taken on the event loop in a few milliseconds (references to the
    cache's immutable entries, copies of the learned lists): the writer thread then never
    reads a structure the loop is changing."""

    cache: cachefile.Snapshot
    learned: tuple[list[bytes], list[bytes]] | None  # learned and genuine, when kept
    routing: routingfile.Routing  # what the cache's answers were asked under


class Service:
    """Listeners plus the current Forwarding; SIGHUP swaps the latter, keeping the cache.

    Nothing slow runs on the event loop once it serves: a save is a snapshot on the loop,
    serialised and written by one writer thread; a reload reads its files in a thread and only
    builds and swaps the objects on the loop. Every query waits while the loop is busy: saving
    100k entries on it took about 200 ms, reloading 100k names about 0.4 s.
    """

    def __init__(self, settings: Settings, cli_overrides: dict | None = None,
                 reuse_port: bool = False) -> None:
        self.settings = settings
        self.cli_overrides = cli_overrides or {}  # re-applied on reload: the command line wins
        self.reuse_port = reuse_port
        self.metrics = Metrics()
        self.started = time.time()
        # The page's history, when there is a page: in the state directory, or in memory.
        self.history: History | None = None
        if settings.web:
            from .history import History  # sqlite3 takes 1.3 MB: only with the page

            self.history = History(settings.state_dir, settings.history_days)
        self.querylog = query_log(settings, self.history)
        self.web = None  # the page's runner, once started
        self.hit_path: fastpath.HitPath | None = None  # the compiled UDP hit path, when built
        self.cache = Cache(settings.cache_size, self.metrics)
        self.learned = Learned()
        self.learned.forged.on_learn = self._learned_forged
        self.learned.forged.on_unlearn = self._unlearned_forged
        self.metrics.gauge("dnsproxy_forged_learned", lambda: len(self.learned.forged))
        self.forwarding = build_forwarding(prepare(settings), self.metrics, self.querylog,
                                           self.cache, self.learned)
        self.cache_file = cachefile.path_in(settings.state_dir) if settings.state_dir else None
        if self.cache_file:
            kept = cachefile.load(self.cache, self.cache_file)  # after the cache's settings
            log.info("cache: %d entries read from %s", kept, self.cache_file)
        self.learned_file = (os.path.join(settings.state_dir, LEARNED_FILE)
                             if settings.state_dir else None)
        if self.learned_file:
            count = self.learned.forged.load(self.learned_file)
            if count:
                log.info("forged addresses: %d learned ones read from %s", count,
                         self.learned_file)
        # The routing the cache's answers were asked under: the current one, once what the
        # last change of routing made wrong is forgotten (saved beside the cache file).
        self.cache_routing = routingfile.routing_of(settings)
        self.routing_file = routingfile.path_in(settings.state_dir) if settings.state_dir else None
        if self.cache_file:
            self._purge({*self.forwarding.forged, *self.learned.forged.addresses}, "loaded")
            self._forget_loaded_routing()
        self.saver: asyncio.Task | None = None
        # One thread writes every save, in the order they were taken: two saves never run at
        # once, and a later one (the last, at stop) is written after an earlier one in flight.
        self.writer = concurrent.futures.ThreadPoolExecutor(1, "dnsproxy-save")
        # A reload in progress, and whether a SIGHUP came meanwhile (one more is due).
        self.reloading: asyncio.Task | None = None
        self.reload_again = False
        self.responder = Responder(self.forwarding.pipeline, self.metrics, self.querylog,
                                   allowed=self.allowed,
                                   max_in_flight=settings.max_in_flight)
        self.transports: list = []
        self.servers: list[asyncio.AbstractServer] = []
        # Resolvers replaced by a reload, closed once their queries end.
        self.retired: list[Forwarder | SplitResolver] = []
        self.closing: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()

    def _learned_forged(self, addresses: list[bytes]) -> None:
        """A race's new learned addresses: each counted and logged, the cache purged of them
        in one pass (in slices: one forgery may carry dozens)."""
        self.metrics.inc("dnsproxy_forged_learned_total", len(addresses))
        for address in addresses:
            log.info("forged address learned: %s", ipaddress.ip_address(address))
        self.cache.purge_soon(set(addresses), "learned", self._purged("learned"))

    def _unlearned_forged(self, address: bytes) -> None:
        self.metrics.inc("dnsproxy_forged_unlearned_total")
        log.warning("learned forged address %s unlearned: an encrypted upstream answered with it",
                    ipaddress.ip_address(address))

    def _forget_loaded_routing(self) -> None:
        """At start-up, before serving: the cache file's answers were asked under the routing
        saved beside it. If that differs from the current one, what either table routes goes
        (a zone removed: its resolver's answers; a zone added: the public upstreams'). With
        no routing saved, what the current table routes goes."""
        saved = routingfile.load(self.routing_file) if self.routing_file else None
        if saved == self.cache_routing:
            return
        old = routingfile.table_of(saved) if saved is not None else None
        new = self.forwarding.home
        if old is None and (new is None or not new.routes()):
            return
        self._log_rerouted(self.cache.forget(rerouted_by(old, new), "rerouted"))

    def _forget_rerouted(self, old: homenames.NameTable | None, routing: routingfile.Routing,
                         guard: float) -> None:
        """A reload changed the routing: cached answers for names the old table or the new one
        routes (to the LAN's resolver, a zone's) came from the wrong place (a public upstream's
        NXDOMAIN for printer.lan, or a removed zone's answer for wiki.corp.example): they go,
        in slices. Answers for them are not stored for `guard` seconds: the old resolvers'
        queries in flight (their deadline is the timeout) would bring them back."""

        def done(dropped: int) -> None:
            self._log_rerouted(dropped)
            self.cache_routing = routing

        if not any(table is not None and table.routes() for table in (old, self.forwarding.home)):
            self.cache_routing = routing  # nothing was or is routed: nothing to scan for
            return
        self.cache.forget_soon(rerouted_by(old, self.forwarding.home), "rerouted", guard, done)

    @staticmethod
    def _log_rerouted(dropped: int) -> None:
        if dropped:
            log.info("cache: %d %s for names now routed elsewhere dropped", dropped,
                     "entry" if dropped == 1 else "entries")

    def _purge(self, addresses: set[bytes], why: str) -> None:
        """Cached replies carrying addresses now known as forged go (see stages/cache.py):
        those the operator listed by a reload ("listed", in slices), or, at start-up, those on
        the lists that a cache file brought back ("loaded", at once: nothing is served yet)."""
        if why == "loaded":
            self._purged(why)(self.cache.purge(addresses, why, guard=False))
        else:
            self.cache.purge_soon(addresses, why, self._purged(why))

    @staticmethod
    def _purged(why: str) -> Callable[[int], None]:
        def done(dropped: int) -> None:
            if dropped:
                log.warning("cache: %d %s carrying forged addresses dropped (%s)", dropped,
                            "entry" if dropped == 1 else "entries", why)
        return done

    def allowed(self, address: str) -> bool:
        """The current access control (a reload replaces it), for what precedes the pipeline."""
        return self.forwarding.access.allowed(address)

    async def start(self, listeners: list[Listener] | None = None) -> None:
        """Serve on `listeners` (bound by bind_listeners before this Service was built, so that
        queries waited in the kernel meanwhile), or on sockets bound now."""
        loop = asyncio.get_running_loop()
        s = self.settings
        tcp = TcpServer(self.responder, s.tcp_idle_timeout, s.tcp_max_connections,
                        s.tcp_max_per_client)
        if s.native and fastpath.available():
            self.hit_path = fastpath.HitPath(s, self.forwarding.pipeline, self.cache,
                                             self.metrics, self.querylog)
        log.info("UDP cache hits: %s", fastpath.which(s))
        for udp_sock, tcp_sock in listeners or bind_listeners(s, self.reuse_port):
            if self.hit_path is not None:
                self.transports.append(
                    self.hit_path.listen(udp_sock, UdpServer(self.responder), loop))
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: UdpServer(self.responder), sock=udp_sock)
                self.transports.append(transport)
            self.servers.append(await asyncio.start_server(tcp.handle, sock=tcp_sock))
        if self.cache_file:
            self.saver = loop.create_task(self._save_every(s.cache_save_interval))
        if s.metrics:
            host, port = parse_listen(s.metrics)
            try:
                self.servers.append(await serve_metrics(self.metrics, host, port, self.allowed))
            except OSError as exc:
                raise ListenError(f"cannot serve metrics on {s.metrics}: {exc.strerror}") from None
        if s.web:
            await self.start_web(s.web, s.web_password_file)

    async def start_web(self, listen: str, password_file: str | None) -> None:
        """The page (dnsproxy/web), with a password file created when missing."""
        from . import web  # aiohttp and Jinja2 are imported only when there is a page
        from .web.auth import ensure_password_file

        if password_file and ensure_password_file(password_file):
            log.info("web: a password was generated in %s", password_file)
        assert self.history is not None
        sources = web.Sources(self.history, self.upstream_states, self.learned_forged,
                              lambda: len(self.cache.entries), self.settings.identity,
                              self.started)
        host, port = parse_listen(listen)
        try:
            self.web = await web.serve_web(sources, host, port, self.allowed, password_file)
        except OSError as exc:
            raise ListenError(f"cannot serve the page on {listen}: {exc.strerror}") from None
        log.info("web: page on http://%s/ (%s)", listen if port != 80 else host,
                 "password in " + password_file if password_file else "loopback clients only")

    def upstream_states(self) -> list[dict]:
        """Each configured upstream's health now, for the page."""
        now = time.monotonic()
        states = []
        for group, forwarder in forwarder_groups(self.forwarding.resolver):
            for upstream in forwarder.upstreams:
                health = forwarder.health[id(upstream)]
                resting = health.down_until - now
                states.append({"name": upstream.name, "group": group,
                               "transport": upstream.transport,
                               "health": "down" if resting > 0 else "up",
                               "down_for": max(0.0, resting), "failures": health.failures})
        return states

    def learned_forged(self) -> list[str]:
        return [str(ipaddress.ip_address(a)) for a in list(self.learned.forged.addresses)]

    # --- keeping the state across restarts ---

    async def _save_every(self, interval: float) -> None:
        """A crash or a kill loses at most `interval` (plus one save) of what the cache learned.
        Each save is awaited before the next interval starts, so none is ever due while another
        runs: none is skipped, and a slow disk stretches the interval rather than piling up."""
        while True:
            await asyncio.sleep(interval)
            await self.save_state()

    async def save_state(self) -> None:
        """The cache and the learned forged addresses: what a restart must not forget.
        Snapshot here, on the loop; serialise, write and fsync in the writer thread."""
        snapshot = self.snapshot_state()
        written = asyncio.get_running_loop().run_in_executor(self.writer, self.write_state,
                                                             snapshot)
        # Shielded: a saver cancelled at stop leaves the write to end whole, and the final
        # save, queued behind it in the writer, is written after it.
        await asyncio.shield(written)

    def snapshot_state(self) -> StateSnapshot:
        learned = self.learned.forged.snapshot() if self.learned_file else None
        return StateSnapshot(cachefile.snapshot(self.cache), learned, self.cache_routing)

    def write_state(self, snapshot: StateSnapshot) -> None:
        """In the writer thread: reads the snapshot and the file names, nothing else. Empties
        the snapshot when done, in steps, so that freeing it later costs the loop nothing."""
        try:
            self._write_state(snapshot)
        finally:
            release(snapshot.cache.keys, snapshot.cache.entries, *(snapshot.learned or ()))

    def _write_state(self, snapshot: StateSnapshot) -> None:
        if self.learned_file and snapshot.learned is not None:
            try:
                write_learned(self.learned_file, *snapshot.learned)
            except OSError as exc:
                log.warning("cannot save learned forged addresses to %s: %s",
                            self.learned_file, exc.strerror)
        started = time.perf_counter()
        try:
            count = cachefile.write(snapshot.cache, self.cache_file)
        except OSError as exc:
            log.warning("cannot save the cache to %s: %s", self.cache_file, exc.strerror)
            return
        if self.routing_file:  # after the cache file: never older than its answers' routing
            try:
                routingfile.write(snapshot.routing, self.routing_file)
            except OSError as exc:
                log.warning("cannot save the routing to %s: %s", self.routing_file,
                            exc.strerror)
        log.debug("cache: %d entries saved to %s in %.0f ms", count, self.cache_file,
                  (time.perf_counter() - started) * 1000)

    # --- SIGHUP ---

    def reload(self) -> None:
        """Re-read the configuration; on any error keep running with the old one. One reload
        at a time: SIGHUPs during one ask for one more after it (the files may have changed
        since it read them), however many they are."""
        if self.reloading is not None:
            self.reload_again = True
            return
        self.reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        try:
            while True:
                self.reload_again = False
                try:
                    await self._reload_once()
                except Exception:  # a bug, not a bad file: said loudly, the service goes on
                    log.exception("reload failed, keeping the running configuration")
                if not self.reload_again:
                    return
        finally:
            self.reloading = None

    async def _reload_once(self) -> None:
        cli = {**self.cli_overrides, "config": self.settings.config}
        try:
            # The files are read and parsed in a thread (the loop keeps answering meanwhile);
            # the objects are built on the loop, whose resources some of them will hold.
            prepared = await asyncio.to_thread(read_configuration, cli)
            forwarding = build_forwarding(prepared, self.metrics, self.querylog, self.cache,
                                          self.learned)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        settings = prepared.settings
        old = self.forwarding
        self.forwarding = forwarding
        self.responder.pipeline = forwarding.pipeline
        if self.hit_path is not None:
            self.hit_path.configure(prepared.settings, forwarding.pipeline)
        self._purge(forwarding.forged - old.forged, "listed")
        routing = routingfile.routing_of(settings)
        if routing != routingfile.routing_of(self.settings):
            self._forget_rerouted(old.home, routing, settings.timeout + 1)
        restart_only = [name for name in RESTART_ONLY
                        if getattr(settings, name) != getattr(self.settings, name)]
        if restart_only:
            log.warning("changed settings that take effect only after a restart: %s",
                        ", ".join(restart_only))
        self.settings = settings
        # Queries in flight still use the old upstreams: close them once those are over.
        self.retired.append(old.resolver)
        asyncio.get_running_loop().call_later(settings.timeout + 1, self._close_retired,
                                              old.resolver)
        log.info("configuration reloaded: %d upstreams", len(settings.upstreams))

    def _close_retired(self, forwarder: Forwarder | SplitResolver) -> None:
        if forwarder in self.retired:
            self.retired.remove(forwarder)
            task = asyncio.get_running_loop().create_task(forwarder.close())
            self.closing.add(task)  # a reference, so the task is not collected half-way
            task.add_done_callback(self.closing.discard)

    async def stop(self) -> None:
        """What a restart must keep is saved while the sockets still answer (from the cache,
        mostly): they close only then, so a restart refuses queries only between this
        process's last moment and the next one's first (bind_listeners)."""
        if self.reloading is not None:
            self.reloading.cancel()  # its thread may finish reading; nothing is swapped in
        if self.saver is not None:
            self.saver.cancel()
        if self.responder.tasks:
            await asyncio.wait(list(self.responder.tasks), timeout=0.5)
        if self.cache_file:
            # After the last answers: what they taught is kept too. The writer takes it after
            # a save still in flight, so this newest snapshot is the one left on disk.
            await self.save_state()
        for transport in self.transports:
            transport.close()
        for server in self.servers:
            server.close()
        for task in list(self.responder.tasks):
            task.cancel()
        self.cache.close()
        if self.hit_path is not None:
            self.hit_path.close()  # its last records, before the log's last flush
        self.writer.shutdown()
        for forwarder in [self.forwarding.resolver, *self.retired]:
            await forwarder.close()
        if self.closing:
            await asyncio.wait(self.closing, timeout=0.5)
        if self.web is not None:
            await self.web.cleanup()
        self.querylog.flush()
        if self.history is not None:
            await asyncio.to_thread(self.history.close)  # what is pending is written


def query_log(settings: Settings, history: History | None) -> QueryLog:
    """Where each query is recorded: the JSON lines, the page's history, both, or nowhere."""
    logs = [log for log in (QueryLog() if settings.query_log else None, history) if log]
    if not logs:
        return NullLog()
    return logs[0] if len(logs) == 1 else Tee(*logs)  # type: ignore[return-value]


def forwarder_groups(resolver: Forwarder | SplitResolver | ZoneRouter,
                     ) -> list[tuple[str | None, Forwarder]]:
    """The forwarders behind the last link, by group (None: no groups, no split)."""
    if isinstance(resolver, ZoneRouter):
        return [*forwarder_groups(resolver.default), *resolver.groups.items()]
    if isinstance(resolver, SplitResolver):
        return list(resolver.groups.items())
    return [(None, resolver)]


def rerouted_by(old: homenames.NameTable | None,
                new: homenames.NameTable | None) -> Callable[[bytes], bool]:
    """Whether a cache key is a question the old table or the new one sends to a group."""
    tables = [table.routes_key for table in (old, new) if table is not None and table.routes()]
    if len(tables) == 1:
        return tables[0]
    if not tables:
        return lambda key: False
    first, second = tables  # unrolled: a scan asks this of every cached key
    return lambda key: first(key) or second(key)


def raise_open_file_limit() -> None:
    """Every query in flight holds a socket: 1024 files (a common soft limit) is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# The cyclic collector's first generation: a query's objects (task, coroutines, futures) are
# freed by reference counting as soon as it is answered, but with hundreds in flight the default
# threshold (700 allocations) ran collections that found them alive, promoted them and walked
# them again: an eighth of the CPU time of a burst of cache misses. The hot paths make no
# reference cycles, so a larger threshold holds back no garbage (peak memory did not grow).
GC_THRESHOLD = (10_000, 10, 10)


# How long a thread holds the GIL before one that waits for it may take it (Python's default is
# 5 ms). It matters only while the writer or a reload's thread runs beside the loop: the loop
# then waits for the GIL up to this long after each of its system calls (receive, send, poll).
# Measured in bench/stall.py: 0.5 ms left the longest reload stall at 5.0-5.7 ms, 0.1 ms at
# 3.8-4.5 ms.
SWITCH_INTERVAL = 0.0001


def tune_gc() -> None:
    """What start-up built (modules, the configuration, the cache read from disk) lives as long
    as the process: frozen, the collector never walks it again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def serve(settings: Settings, cli_overrides: dict | None = None,
                reuse_port: bool = False, listeners: list[Listener] | None = None) -> None:
    raise_open_file_limit()
    service = Service(settings, cli_overrides, reuse_port)
    await service.start(listeners)
    tune_gc()
    sys.setswitchinterval(SWITCH_INTERVAL)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    listening = ", ".join(settings.listen)
    upstreams = ", ".join(spec.name for spec in settings.upstreams)
    if settings.domestic_upstreams:
        upstreams += " (trusted), split with " + ", ".join(
            spec.name for spec in settings.domestic_upstreams) + " (domestic)"
    log.info("serving on %s, forwarding to %s", listening, upstreams)
    await service.stopping.wait()
    await service.stop()


def run(settings: Settings, cli_overrides: dict | None = None, reuse_port: bool = False,
        listeners: list[Listener] | None = None) -> None:
    """Serve on `listeners` (bound now if not given: see listen.py); on uvloop when it is
    installed: about three times the packets per second."""
    if listeners is None:
        listeners = bind_listeners(settings, reuse_port)
    main = serve(settings, cli_overrides, reuse_port, listeners)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    if hasattr(uvloop, "run"):
        uvloop.run(main)
    else:  # uvloop before 0.18 (Debian bookworm's)
        uvloop.install()
        asyncio.run(main)
