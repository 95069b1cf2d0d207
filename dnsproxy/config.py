"""Settings, from four layers: defaults < config file < environment < command line.

The config file is TOML with the keys below, or a CDNS configuration file read unchanged (JSON
with // comments: `global.*` is accepted and ignored, `cdns.listen_ip`, `cdns.listen_port`,
`cdns.timeout`, `cdns.servers[].ip_port`, `cdns.servers[].hijack_threshold` in milliseconds).
Every problem is a ConfigError whose message is one line naming the setting.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from . import homenames
from .defaults import DEFAULT_ALLOWED, DEFAULT_LOCAL_DOMAINS
from .upstreamspec import UpstreamSpec, parse_spec


class ConfigError(ValueError):
    pass


@dataclass
class Settings:
    listen: list[str] = field(default_factory=lambda: ["0.0.0.0:53"])
    upstreams: list[UpstreamSpec] = field(default_factory=list)
    # Split DNS: without domestic upstreams, none of it is in the chain.
    domestic_upstreams: list[UpstreamSpec] = field(default_factory=list)
    domestic_domains: list[str] = field(default_factory=list)  # files
    foreign_domains: list[str] = field(default_factory=list)  # files
    domestic_ips: list[str] = field(default_factory=list)  # files of CIDR ranges
    domestic_trust_empty: bool = False  # a domestic NXDOMAIN/NODATA for an unlisted name wins
    learn_forged_addresses: bool = True  # learn the addresses of replies proven forged
    timeout: float = 2.0
    cache_size: int = 10000  # replies; 0 turns the cache off
    cache_bytes: int = 32 * 1024 * 1024  # what the cached replies may take in all
    max_ttl: int = 86400
    serve_stale: bool = True  # answer expired entries while refreshing them (RFC 8767)
    stale_ttl: int = 30  # the TTL a stale answer shows
    max_stale: int = 86400  # how long past its expiry an entry may still be served
    prefetch: bool = True  # refresh an entry asked for in the last tenth of its TTL
    state_dir: str | None = None  # where the cache is kept across restarts
    cache_save_interval: float = 300.0  # seconds between saves of the cache to state_dir
    query_log: bool = False
    ca_file: str | None = None
    allow: list[str] = field(default_factory=lambda: list(DEFAULT_ALLOWED))
    rate_limit: float = 500.0  # queries per second per client; 0 turns it off
    metrics: str | None = None
    # The appliance's page (dnsproxy/web): where it listens; without a password file, for
    # loopback clients only. The history behind it is kept history_days (in state_dir).
    web: str | None = None
    web_password_file: str | None = None
    history_days: int = 7
    workers: int = 1
    native: bool = True  # UDP cache hits in compiled code, when it is built (fastpath.py)
    edns_marker: bool = True
    forged_addresses: bool = True
    hijack_threshold: bool = True
    tcp_for_polluted: bool = True
    forged_address: list[str] = field(default_factory=list)
    forged_addresses_file: list[str] = field(default_factory=list)
    hedge_delay: float = 0.3
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 256
    tcp_max_per_client: int = 32
    max_in_flight: int = 1000  # queries waiting on upstreams at once
    identity: str = "dnsproxy"
    # Names at home (README "Names at home", dnsproxy/homenames.py).
    local_dns: list[UpstreamSpec] = field(default_factory=list)  # the LAN's resolver(s)
    local_domains: list[str] = field(default_factory=lambda: list(DEFAULT_LOCAL_DOMAINS))
    local_reverse: list[str] = field(default_factory=list)  # CIDRs whose PTR names are the LAN's
    zones: list[str] = field(default_factory=list)  # NAME=SPEC
    hosts: list[str] = field(default_factory=list)  # files in the /etc/hosts format
    block_ddr: bool = True  # resolver.arpa: NODATA, so DDR clients keep asking us
    block_doh_canary: bool = True  # use-application-dns.net: NXDOMAIN, Firefox keeps its DoH off
    block_private_relay: bool = False  # iCloud Private Relay's names: NXDOMAIN
    config: str | None = None  # the file these came from, for reloads

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [parse_listen(item) for item in self.listen]


FIELD_TYPES = {f.name: f.type for f in fields(Settings)}
LIST_KEYS = {"listen", "upstreams", "allow", "forged_address", "forged_addresses_file",
             "domestic_upstreams", "domestic_domains", "foreign_domains", "domestic_ips",
             "local_dns", "local_domains", "local_reverse", "zones", "hosts"}
UPSTREAM_KEYS = ("upstreams", "domestic_upstreams", "local_dns")
BOOL_KEYS = {"query_log", "edns_marker", "forged_addresses", "hijack_threshold", "tcp_for_polluted",
             "serve_stale", "prefetch", "domestic_trust_empty", "learn_forged_addresses",
             "block_ddr", "block_doh_canary", "block_private_relay", "native"}
FLOAT_KEYS = {"timeout", "rate_limit", "hedge_delay", "tcp_idle_timeout", "cache_save_interval"}
INT_KEYS = {"cache_size", "cache_bytes", "max_ttl", "workers", "tcp_max_connections",
            "tcp_max_per_client", "max_in_flight", "stale_ttl", "max_stale", "history_days"}
# Limits where zero would mean "nothing at all" rather than "off": a server that sheds every
# query (max_in_flight = 0) or accepts no TCP connection is a misconfiguration, not a setting.
# The others take 0 as documented: cache_size (cache off), rate_limit (no limit), hedge_delay
# (ask every upstream at once), max_stale (an entry is served stale only while its refresh is
# being decided: never, in effect). A stale TTL of 0 would tell clients not to keep the answer
# and ask again at once, which is what serving stale is meant to spare.
ABOVE_ZERO = {"timeout", "tcp_idle_timeout", "max_ttl", "workers", "tcp_max_connections",
              "tcp_max_per_client", "max_in_flight", "cache_bytes", "stale_ttl",
              "cache_save_interval", "history_days"}
STR_KEYS = {"ca_file", "metrics", "identity", "state_dir", "web", "web_password_file"}
# Environment names where the plural reads better than the setting's own name. The switch
# `forged_addresses` (the built-in list on or off) then needs a name of its own: two settings
# read from one variable would make either unusable from the environment.
ENV_NAMES = {"upstreams": "DNSPROXY_UPSTREAMS", "forged_address": "DNSPROXY_FORGED_ADDRESSES",
             "forged_addresses": "DNSPROXY_BUILTIN_FORGED_ADDRESSES"}


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` (the port is required)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port = rest[1:] if sep and rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ConfigError(f"listen address {text!r}: write IPv6 as [addr]:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"listen address {text!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"listen address {text!r}: expected HOST:PORT")
    return str(ip), int(port)


def _split(value: str) -> list[str]:
    return [part for part in value.replace(",", " ").split() if part]


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _coerce(key: str, value: Any) -> Any:
    """One raw value (TOML, environment or argparse) into the setting's type."""
    if key in LIST_KEYS:
        if isinstance(value, str):
            return _split(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        return value
    if key in BOOL_KEYS:
        return _bool(key, value)
    if key in FLOAT_KEYS or key in INT_KEYS:
        return _number(key, value)
    if key in STR_KEYS:
        return None if value in (None, "") else str(value)
    raise ConfigError(f"unknown setting {key!r}")


def _number(key: str, value: Any) -> float | int:
    """A number within its limits: never negative, nan or infinite; above zero where zero
    would disable the server rather than a feature (ABOVE_ZERO)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if key in INT_KEYS:
            if isinstance(value, float):
                raise ValueError
            number: float | int = int(value)
        else:
            number = float(value)
        if not math.isfinite(number) or number < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a non-negative number, got {value!r}") from None
    if key in ABOVE_ZERO and number <= 0:
        raise ConfigError(f"{key} must be above zero, got {value!r}")
    return number


def _upstream(item: Any, origin: str) -> UpstreamSpec:
    hijack_ms = 0.0
    if isinstance(item, dict):
        unknown = set(item) - {"address", "hijack_threshold"}
        if unknown or "address" not in item:
            raise ConfigError(f"{origin}: an upstream table takes 'address' and "
                              f"'hijack_threshold' (ms), got {sorted(item)}")
        address = item["address"]
        try:
            hijack_ms = float(item.get("hijack_threshold", 0))
            if not math.isfinite(hijack_ms) or hijack_ms < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{origin}: hijack_threshold must be a non-negative number of ms, "
                              f"got {item.get('hijack_threshold')!r}") from None
    else:
        address = item
    if not isinstance(address, str):
        raise ConfigError(f"{origin}: upstream must be a string, got {address!r}")
    try:
        return parse_spec(address, hijack_ms)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def strip_json_comments(text: str) -> str:
    """CDNS files are JSON with // and /* */ comments; strings may contain either.

    Comments become spaces (newlines stay), so a JSON error's line and column still point
    into the file as the user wrote it.
    """
    out = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif text.startswith("//", i) or text.startswith("/*", i):
            if text[i + 1] == "/":
                end = text.find("\n", i)
                end = n if end < 0 else end
            else:
                end = text.find("*/", i + 2)
                end = n if end < 0 else end + 2
            out.append("".join(c if c == "\n" else " " for c in text[i:end]))
            i = end
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def from_cdns(doc: dict, path: str) -> dict[str, Any]:
    cdns = doc.get("cdns")
    if not isinstance(cdns, dict):
        raise ConfigError(f"{path}: no 'cdns' section")
    raw: dict[str, Any] = {}
    ip = cdns.get("listen_ip", "127.0.0.1")
    port = cdns.get("listen_port", 53)
    raw["listen"] = [f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"]
    if "timeout" in cdns:
        raw["timeout"] = cdns["timeout"]
    servers = cdns.get("servers", [])
    if not isinstance(servers, list):
        raise ConfigError(f"{path}: cdns.servers must be a list")
    upstreams = []
    for index, server in enumerate(servers):
        if not isinstance(server, dict) or "ip_port" not in server:
            raise ConfigError(f"{path}: cdns.servers[{index}] needs an 'ip_port'")
        upstreams.append({"address": server["ip_port"],
                          "hijack_threshold": server.get("hijack_threshold", 0)})
    raw["upstreams"] = upstreams
    return raw


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as toml_error:
        try:
            doc = json.loads(strip_json_comments(text))
        except json.JSONDecodeError as json_error:
            where = f"{json_error.msg} at line {json_error.lineno} column {json_error.colno}"
            if text.lstrip()[:1] in ("{", "[", "/"):  # meant as JSON: TOML's view is noise
                raise ConfigError(f"{path}: not valid JSON: {where}") from None
            raise ConfigError(f"{path}: neither TOML ({toml_error}) nor a CDNS JSON file "
                              f"({where})") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: not a CDNS configuration") from None
        return from_cdns(doc, path)
    if "cdns" in doc:
        return from_cdns(doc, path)
    raw = {key.replace("-", "_"): value for key, value in doc.items()}
    unknown = set(raw) - set(FIELD_TYPES) - {"upstream"}
    if unknown:
        raise ConfigError(f"{path}: unknown setting {sorted(unknown)[0]!r}")
    if "upstream" in raw:  # [[upstream]] tables read naturally in TOML
        tables = raw.pop("upstream")
        listed = raw.get("upstreams", [])
        raw["upstreams"] = ((_split(listed) if isinstance(listed, str) else list(listed))
                            + (tables if isinstance(tables, list) else [tables]))
    return raw


def from_environment(environ: dict[str, str]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for key in FIELD_TYPES:
        name = ENV_NAMES.get(key, "DNSPROXY_" + key.upper())
        if name in environ and environ[name].strip() != "":
            raw[key] = environ[name]
    return raw


def build_settings(cli: dict[str, Any], environ: dict[str, str] | None = None) -> Settings:
    """Merge the layers; `cli` holds only the options given on the command line."""
    environ = dict(os.environ) if environ is None else environ
    env = from_environment(environ)
    config_path = cli.get("config") or env.get("config")
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_path:
        layers.append((config_path, read_file(config_path)))
    layers += [("environment", env), ("command line", cli)]
    values: dict[str, Any] = {}
    for origin, raw in layers:
        for key, value in raw.items():
            if key == "config":
                continue
            if key in UPSTREAM_KEYS:
                items = _split(value) if isinstance(value, str) else value
                if not isinstance(items, list):
                    raise ConfigError(f"{origin}: {key} must be a list")
                values[key] = [_upstream(item, origin) for item in items]
            else:
                try:
                    values[key] = _coerce(key, value)
                except ConfigError as exc:
                    raise ConfigError(f"{origin}: {exc}") from None
    settings = Settings(**values, config=config_path)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    if not settings.upstreams:
        raise ConfigError("no upstream: give --upstream (or DNSPROXY_UPSTREAMS, or a config file)")
    if not settings.listen:
        raise ConfigError("no listen address")
    if not settings.domestic_upstreams:
        for key in ("domestic_domains", "foreign_domains", "domestic_ips"):
            if getattr(settings, key):
                raise ConfigError(f"{key} given without domestic_upstreams "
                                  "(--domestic-upstream): nothing to split between")
    if all(spec.needs_bootstrap for spec in settings.upstreams):
        # Not the system resolver: in a polluted network it is the injector's path.
        spec = settings.upstreams[0]
        raise ConfigError(f"upstream {spec.url}: no other upstream can look up {spec.host}; "
                          f"give its address as {spec.url}#IP")
    settings.listen_addresses()
    for network in settings.allow:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"allow: {network!r} is not a network") from None
    if settings.metrics:
        parse_listen(settings.metrics)
    validate_web(settings)
    if settings.ca_file and not os.path.isfile(settings.ca_file):
        raise ConfigError(f"ca_file: no such file {settings.ca_file}")
    if settings.state_dir:
        path = settings.state_dir
        try:
            os.makedirs(path, exist_ok=True)  # a fresh volume may not have it yet
        except OSError as exc:
            raise ConfigError(f"state_dir {path}: {exc.strerror}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"state_dir {path}: not writable")
    validate_home(settings)


def validate_web(settings: Settings) -> None:
    """The page: one process (the history is the process's), a password file that can be read
    or, when missing, created at start in a directory that exists."""
    if settings.web_password_file and not settings.web:
        raise ConfigError("web_password_file given without web (--web HOST:PORT)")
    if not settings.web:
        return
    parse_listen(settings.web)
    if settings.workers > 1:
        raise ConfigError("web needs workers = 1: each worker keeps a history of its own")
    path = settings.web_password_file
    if path is None:
        return
    if os.path.isdir(path):
        raise ConfigError(f"web_password_file {path}: a directory")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as file:
                first = file.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"web_password_file {path}: {getattr(exc, 'strerror', exc)}"
                              ) from None
        if not first:
            raise ConfigError(f"web_password_file {path}: empty (the password is its first "
                              "line; remove the file to have one generated)")
    elif not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"web_password_file {path}: no such directory")


def validate_home(settings: Settings) -> None:
    """Names at home: every name, network and zone readable; the LAN's resolvers without a
    hijack threshold (nothing on the LAN races a reply, and a router answers in microseconds)."""
    try:
        homenames.build_table(settings)
        zones = homenames.zone_groups(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for spec in settings.local_dns:
        if spec.hijack_threshold:
            raise ConfigError(f"local_dns {spec.name}: no hijack_threshold for a resolver on "
                              "the LAN, whose answers come in microseconds")
    for key, specs in [("local_dns", settings.local_dns), *(
            (f"zones {name}", group) for name, group in zones.items())]:
        if specs and all(spec.needs_bootstrap for spec in specs):
            raise ConfigError(f"{key}: no other upstream of the group can look up "
                              f"{specs[0].host}; give its address as {specs[0].url}#IP")
