"""The `netsetup` command line (Typer): up, down, status, check, routes.

Errors the user can act on (NetsetupError) print one line and exit 2; set NETSETUP_DEBUG=1 to
see a traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from netsetup import check as check_mod
from netsetup import home, host, ra, routes, state, webpage
from netsetup.errors import NetsetupError
from netsetup.plan import Mode, Settings, check_settings, checked_network, parse_modes

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Put the DNS appliance on the LAN: deploy it, route to it, firewall it, check it.",
)
console = Console()

DEFAULT = Settings()

ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="compose project name")]
ComposeOpt = Annotated[Path, typer.Option("--compose-file", "-f", help="compose file")]
FirewallOpt = Annotated[
    str, typer.Option("--firewall", help="auto (from `iptables -V`), nft or legacy")
]


def one_line_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn NetsetupError into one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NetsetupError as exc:
            if os.environ.get("NETSETUP_DEBUG"):
                raise
            print(f"netsetup: error: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except (typer.Exit, SystemExit):
            raise
        except Exception as exc:  # an engine or OS error we did not foresee: still one line
            if os.environ.get("NETSETUP_DEBUG"):
                raise
            print(f"netsetup: error: {type(exc).__name__}: {exc}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


def _split(values: list[str] | None) -> tuple[str, ...]:
    """--upstream may repeat and each may hold a comma- or space-separated list."""
    out: list[str] = []
    for value in values or []:
        out += [v for v in value.replace(",", " ").split() if v]
    return tuple(out)


@app.command()
@one_line_errors
def up(
    mode: Annotated[
        str, typer.Option(help="comma list of port, direct, lan (both = port,direct)")
    ] = "both",
    lan_ip: Annotated[
        str | None, typer.Option(help="lan mode: a free LAN address the appliance answers on")
    ] = None,
    lan_ip6: Annotated[
        str | None,
        typer.Option(help="lan mode over IPv6 too: a free address on the LAN's IPv6 prefix"),
    ] = None,
    lan_cidr6: Annotated[
        str | None,
        typer.Option(help="the LAN's IPv6 prefix (default: the LAN interface's, a ULA first)"),
    ] = None,
    upstream: Annotated[
        list[str] | None, typer.Option(help="upstream resolver (repeat, or comma-separated)")
    ] = None,
    domestic_upstream: Annotated[
        list[str] | None,
        typer.Option(help="split DNS: a domestic resolver (repeat, or comma-separated)"),
    ] = None,
    lists_dir: Annotated[
        str | None,
        typer.Option(help="split DNS lists: files in its domestic-domains/, foreign-domains/ "
                          "and domestic-ips/ (mounted read-only)"),
    ] = None,
    local_dns: Annotated[
        list[str] | None,
        typer.Option(help="the LAN's resolver (the router), asked the home's names only "
                          "(repeat, or comma-separated; the forms of --upstream)"),
    ] = None,
    local_domain: Annotated[
        list[str] | None,
        typer.Option(help="a domain of the home's names (repeat; replaces the defaults lan, "
                          "home.arpa, internal, localdomain)"),
    ] = None,
    local_reverse: Annotated[
        list[str] | None,
        typer.Option(help="a network whose reverse names are the home's, besides the LAN "
                          "served (repeat)"),
    ] = None,
    hosts_file: Annotated[
        str | None,
        typer.Option(help="a file in the /etc/hosts format, answered by the appliance (its "
                          "directory is mounted read-only)"),
    ] = None,
    lan_interface: Annotated[
        str | None, typer.Option(help="LAN interface (default: the default route's)")
    ] = None,
    lan_cidr: Annotated[
        str | None, typer.Option(help="LAN network (default: the LAN interface's)")
    ] = None,
    subnet: Annotated[str, typer.Option(help="appliance subnet")] = DEFAULT.subnet,
    ip: Annotated[str, typer.Option(help="appliance container address")] = DEFAULT.ip,
    subnet6: Annotated[
        str, typer.Option(help="appliance IPv6 subnet (with --lan-ip6)")
    ] = DEFAULT.subnet6,
    ip6: Annotated[
        str, typer.Option(help="appliance container IPv6 address (with --lan-ip6)")
    ] = DEFAULT.ip6,
    port: Annotated[int, typer.Option(help="host port published for port mode")] = DEFAULT.port,
    dry_run: Annotated[bool, typer.Option(help="print the plan, change nothing")] = False,
    project: ProjectOpt = DEFAULT.project,
    service: Annotated[str, typer.Option(help="compose service name")] = DEFAULT.service,
    compose_file: ComposeOpt = Path("compose.yaml"),
    firewall: FirewallOpt = "auto",
    bridge: Annotated[str | None, typer.Option(help="override the bridge name")] = None,
    metrics_from_lan: Annotated[
        bool, typer.Option(help="let the LAN read the metrics port too (default: the host only)")
    ] = False,
    ha_peer: Annotated[
        list[str] | None,
        typer.Option(help="failover: the other host's LAN address, sharing LAN_IP by VRRP "
                          "(repeat, or comma-separated)"),
    ] = None,
    ha_priority: Annotated[
        int, typer.Option(help="failover: this host's VRRP priority (1-254; the higher is "
                               "master when both start)"),
    ] = DEFAULT.ha_priority,
    ha_vrid: Annotated[
        int, typer.Option(help="failover: the VRRP router id the hosts share (1-255)"),
    ] = DEFAULT.ha_vrid,
    web: Annotated[
        bool, typer.Option("--web/--no-web", help="the forwarder's web page (dashboard), open "
                                                  "to the LAN served only"),
    ] = DEFAULT.web,
    web_port: Annotated[
        int, typer.Option(help="port mode: the host port of the web page (TCP)"),
    ] = DEFAULT.web_port,
) -> None:
    """Deploy the appliance and apply the host plan (idempotent; rolls back on failure).

    The web page's password, when one is to be set, comes in the environment as
    NETSETUP_WEB_PASSWORD (the Makefile's WEB_PASSWORD), never as an option `ps` would show."""
    settings = home.checked(check_settings(
        Settings(
            modes=parse_modes(mode),
            lan_ip=lan_ip,
            lan_ip6=lan_ip6,
            lan_cidr6=lan_cidr6,
            subnet6=subnet6,
            ip6=ip6,
            upstreams=_split(upstream),
            domestic_upstreams=_split(domestic_upstream),
            lists_dir=lists_dir,
            lan_interface=lan_interface,
            lan_cidr=lan_cidr,
            subnet=subnet,
            ip=ip,
            port=port,
            project=project,
            service=service,
            metrics_from_lan=metrics_from_lan,
            local_dns=_split(local_dns),
            local_domains=_split(local_domain),
            local_reverse=_split(local_reverse),
            hosts_file=hosts_file,
            ha_peers=_split(ha_peer),
            ha_priority=ha_priority,
            ha_vrid=ha_vrid,
            web=web,
            web_port=web_port,
        )
    ))
    options = host.Options(
        compose_file=compose_file, firewall=firewall, dry_run=dry_run, bridge=bridge,
        web_password=given_web_password(settings),
    )
    upped = host.up(settings, options)
    if dry_run:
        print(upped.text, end="")
    else:
        saved = state.load(project)
        host_address = saved.lan_address if saved else "this host"
        paths = []
        if settings.direct:
            paths.append(f"{settings.ip} port 53 (direct mode: route {settings.subnet} via "
                         f"{host_address}, see `netsetup routes`)")
        if settings.published:
            paths.append(f"{host_address} port {port} (port mode)")
        if settings.lan:
            paths.append(f"{settings.lan_ip} port 53 (LAN address mode: no route needed)")
        if settings.ipv6:
            paths.append(f"{settings.lan_ip6} port 53 over IPv6")
        if settings.ha:
            paths[-1] += f" (shared by VRRP with {', '.join(settings.ha_peers)})"
        print(f"netsetup: up: LAN clients ask {' or '.join(paths)}", file=sys.stderr)
        password = f" (password: {upped.web_password})" if upped.web_password else ""
        for address in webpage.urls(settings, host_address):
            print(f"netsetup: up: web page: {address}{password}", file=sys.stderr)


def given_web_password(settings: Settings) -> str | None:
    """WEB_PASSWORD from the environment (empty: none given), taken out of it so that no
    process `up` starts inherits it; checked before anything is done."""
    text = os.environ.pop(webpage.PASSWORD_ENV, "")
    if not text:
        return None
    if not settings.web:
        print("netsetup: note: WEB_PASSWORD is not used: the web page is off (WEB=0)",
              file=sys.stderr)  # fmt: skip
        return None
    return webpage.checked_password(text)


@app.command()
@one_line_errors
def down(
    project: ProjectOpt = DEFAULT.project,
    compose_file: ComposeOpt = Path("compose.yaml"),
    firewall: FirewallOpt = "auto",
) -> None:
    """Stop the services; the host service removes exactly the rules it added."""
    options = host.Options(compose_file=compose_file, firewall=firewall)
    for line in host.down(project, options):
        print(f"netsetup: {line}", file=sys.stderr)


@app.command()
@one_line_errors
def status(
    project: ProjectOpt = DEFAULT.project,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    firewall: FirewallOpt = "auto",
) -> None:
    """Show the engine, the service and which of our rules are in place."""
    info = host.status(project, host.Options(firewall=firewall))
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    table = Table(title=f"netsetup status: {project}", show_header=False)
    for label, value in status_rows(info):
        table.add_row(label, value)
    console.print(table)


def status_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """`status` as label and value rows, from what host.status found: words, never a
    structure printed as JSON."""
    rows = [("up", str(info["up"]))]
    if not info["up"]:
        rows.append(("host side", "NOT DEPLOYED (no deployment record): run up"))
    engine = info.get("engine") or {}
    if "error" in engine:
        rows.append(("engine", f"unreachable: {engine['error']}"))
    else:
        version, firewall = engine.get("version"), engine.get("firewall")
        rows.append(("engine", f"Docker {version}, firewall {firewall}"))
    svc = info.get("service")
    if svc:
        rows.append(("service", f"{svc['container_name']} {svc['ip']} {svc['health']}"))
        rows.append(("network", f"{svc['network']} {svc['subnet']} bridge {svc['bridge']}"))
        rows.append(("published", ", ".join(svc["published"]) or "-"))
    else:
        rows.append(("service", "not deployed"))
    rows += host_service_rows(info.get("host_service") or {})
    lan = info.get("lan")
    if lan:
        served = lan["served"] or "not served (not private: set LAN_CIDR to serve it)"
        rows.append(("LAN", f"{lan['interface']} {lan['cidr']}, host {lan['address']}, {served}"))
    rows.append(("iptables", info["iptables"]))
    for label, key in (("firewall", "firewall"), ("firewall6", "firewall6")):
        rows += firewall_rows(label, info.get(key))
    for entry, present in (info.get("lan_address") or {}).items():
        rows.append(("  lan mode", f"{entry}: {'present' if present else 'MISSING'}"))
    if info.get("raw_drop"):
        rows.append(("raw DROP", info["raw_drop"][0]))
    planned = info.get("sysctl_plan") or {}
    for key, value in info["sysctl"].items():
        off = f" (the plan sets {planned[key]})" if key in planned and planned[key] != value else ""
        rows.append(("ip_forward" if key == "net.ipv4.ip_forward" else key, value + off))
    rows.append(("IPv6 DNS", ipv6_dns_row(info.get("ipv6_dns"))))
    rows += web_rows(info.get("web"))
    counts = info.get("counts") or {}
    if "error" in counts:
        rows.append(("counts", f"unavailable: {counts['error']}"))
    elif counts:
        rows.append(("queries", f"{counts['queries']} ({counts['cache_hits']} from the cache, "
                                f"{counts['cache_entries']} cached)"))
        for label, group in (("forgeries", "forgeries_discarded"), ("errors", "upstream_errors"),
                             ("latency ms", "upstream_latency_ms")):
            for key, value in counts[group].items() or {"-": ""}.items():
                rows.append((f"  {label}", f"{key} {value}".strip()))
    return rows


def web_rows(web: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Where the LAN opens the web page, and its password (none for a project not deployed)."""
    if not web:
        return []
    if not web.get("on"):
        return [("web page", "off (WEB=0)")]
    rows = [("web page", address) for address in web.get("urls") or []] or [("web page", "-")]
    password = web.get("password") or f"unreadable: {web.get('error') or 'unknown'}"
    return [*rows, ("  password", password)]


def ipv6_dns_row(found: dict[str, Any] | None) -> str:
    """What the LAN's routers hand out over IPv6, as the last `up` or `check` heard it."""
    if not found:
        return "not listened for yet: run netsetup check"
    age = time.time() - float(found.get("at", 0))
    return f"{found.get('summary')} ({age:.0f} s ago, on {found.get('interface')})"


def firewall_rows(label: str, fw: dict | None) -> list[tuple[str, str]]:
    """One family's rows of `status`: its verdict, then each chain and hook (IPv4 as
    "firewall", IPv6 as "firewall6", present only where the plan has IPv6)."""
    rows: list[tuple[str, str]] = []
    if not fw:
        return rows
    not_first = fw.get("hooks_not_first") or {}
    if not_first:
        verdict = ("NOT FIRST: a rule above our hook decides before it (the host service "
                   "moves ours back within seconds, if it runs)")  # fmt: skip
    elif not fw["complete"]:
        verdict = "INCOMPLETE (the host service repairs it within seconds, if it runs)"
    elif fw["extra"]:
        verdict = "STALE pieces of ours not in the plan (the host service removes them)"
    else:
        verdict = "complete"
    rows.append((label, verdict))
    for name, present in {**fw["chains"], **fw["hooks"]}.items():
        word = "present" if present else "MISSING"
        if name in not_first:
            word = f"NOT FIRST, below: {not_first[name]}"
        rows.append((f"  {name}", word))
    for name in fw["extra"]:
        rows.append((f"  {name}", "EXTRA"))
    return rows


def host_service_rows(host_service: dict[str, Any]) -> list[tuple[str, str]]:
    """The host service's container and its last report, as status rows."""
    container, report = host_service.get("container"), host_service.get("report")
    if not container:
        return [("host service", "NOT RUNNING (no container): run up")]
    rows = [("host service", f"{container['name']} {container['status']}, "
                             f"{container['restarts']} restart(s)")]  # fmt: skip
    if not report:
        return [*rows, ("  last sync", "no report yet")]
    age = time.time() - float(report.get("last_sync", 0))
    verdict = "complete" if report.get("complete") else "INCOMPLETE"
    rows.append(("  last sync", f"{age:.0f} s ago ({report.get('syncs')} syncs, {verdict})"))
    first = report.get("first_sync")
    if first:
        ago = time.time() - float(first.get("at", 0))
        found = "; ".join(first.get("found") or []) or "all in place"
        rows.append(("  at start", f"{ago:.0f} s ago, found: {found}"))
    repair = report.get("last_repair")
    repaired = f"{report.get('repairs', 0)}"
    if repair:
        ago = time.time() - float(repair.get("at", 0))
        repaired += f", last {ago:.0f} s ago: {'; '.join(repair.get('what') or [])}"
    rows.append(("  repairs", repaired))
    if report.get("hooks_moved"):
        rows.append(("  hooks moved", f"{report['hooks_moved']} (back to first: another rule "
                                      "had got above one)"))  # fmt: skip
    if report.get("last_error"):
        rows.append(("  last error", str(report["last_error"])))
    return rows + failover_rows(report.get("failover"))


def failover_rows(failover: dict[str, Any] | None) -> list[tuple[str, str]]:
    """With HA: the role, the health keepalived is given, the last transition and why."""
    if not isinstance(failover, dict):
        return []
    role = str(failover.get("role") or "unknown").upper()
    rows = [("failover", f"{role} (health: {failover.get('health') or 'not checked yet'})")]
    last = failover.get("last_transition")
    count = int(failover.get("transitions") or 0)
    if isinstance(last, dict):
        ago = time.time() - float(last.get("at", 0))
        rows.append(("  transitions", f"{count}, last {ago:.0f} s ago: {last.get('from')} -> "
                                      f"{last.get('to')}, {last.get('why')}"))  # fmt: skip
    else:
        rows.append(("  transitions", f"{count}"))
    peers = failover.get("peers") or {}
    for peer, heard in sorted(peers.items()):
        ago = time.time() - float(heard.get("at", 0))
        rows.append((f"  peer {peer}", f"advertised {ago:.1f} s ago, priority "
                                       f"{heard.get('priority')}"))  # fmt: skip
    if not peers:
        rows.append(("  peers", "none heard (a master hears no backup: they stay silent)"))
    return rows


@app.command("check")
@one_line_errors
def check_cmd(
    project: ProjectOpt = DEFAULT.project,
    name: Annotated[
        str, typer.Option(help="name to resolve (default: the appliance's own id.server)")
    ] = "id.server",
    qtype: Annotated[str, typer.Option(help="query type")] = "TXT",
    qclass: Annotated[str, typer.Option(help="query class: CH for id.server, else IN")] = "CH",
    timeout: Annotated[float, typer.Option(help="seconds per query")] = 3.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Query the appliance on every exposed path (container IP:53, host:PORT; UDP and TCP)."""
    saved = state.load(project)
    if saved is None:
        raise NetsetupError(f"project {project} is not deployed: run netsetup up first")
    settings = saved.to_settings()
    lan_hint = saved.lan_cidr if saved.lan_cidr else None
    survey = ra.Background(saved.lan_interface)  # heard while the queries run
    results = [
        check_mod.query(probe, name, qtype, qclass, timeout, lan_hint)
        for probe in check_mod.probes(
            settings.ip, saved.lan_address, settings.port, settings.direct, settings.published,
            settings.lan_ip if settings.lan else None,
        )
    ]
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        table = Table(title=f"netsetup check: {name} {qtype}")
        for column in ("path", "server", "transport", "result", "ms", "answers"):
            table.add_column(column)
        for r in results:
            table.add_row(
                r.path,
                f"{r.server}:{r.port}",
                r.transport,
                ("ok " if r.ok else "FAIL ") + (r.rcode if not r.error else r.error),
                str(r.ms),
                "; ".join(r.answers) or "-",
            )
        console.print(table)
    heard = survey.result()
    line = f"IPv6 DNS: {ra.summary(heard, host.appliance_ipv6(settings))}"
    # --json keeps stdout the list of results it always was
    print(line, file=sys.stderr if as_json else sys.stdout)
    host.record_ipv6_dns(project, heard)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@app.command("routes")
@one_line_errors
def routes_cmd(
    project: ProjectOpt = DEFAULT.project,
    subnet: Annotated[str | None, typer.Option(help="appliance subnet")] = None,
    gateway: Annotated[str | None, typer.Option(help="this host's LAN address")] = None,
    ip: Annotated[str | None, typer.Option(help="appliance container address")] = None,
    port: Annotated[int | None, typer.Option(help="published port (port mode)")] = None,
    lan_interface: Annotated[str | None, typer.Option()] = None,
    lan_cidr: Annotated[str | None, typer.Option()] = None,
    lan_ip: Annotated[
        str | None, typer.Option(help="lan mode's address (default: the deployed one)")
    ] = None,
) -> None:
    """Print what to set where so LAN clients reach the appliance: the DNS server to hand out
    (lan mode), or the routes to its own address (direct mode)."""
    from netsetup import detect

    saved = state.load(project)
    settings = saved.to_settings() if saved else Settings(project=project)
    if subnet is not None or ip is not None:
        given = replace(settings, subnet=subnet or settings.subnet, ip=ip or settings.ip)
        checked = check_settings(given)
        subnet, ip = checked.subnet, checked.ip
    if lan_cidr is not None:
        lan_cidr = checked_network("--lan-cidr", lan_cidr)
    if saved and not (lan_interface or lan_cidr):
        address, cidr = saved.lan_address, saved.lan_cidr
    else:
        lan = detect.lan(lan_interface, lan_cidr)
        address, cidr = lan.address, lan.cidr
    if lan_ip is not None:
        given = replace(settings, modes=(Mode.lan,), lan_ip=lan_ip, lan_cidr=cidr)
        lan_ip = check_settings(given).lan_ip
    lan_mode = bool(lan_ip or (settings.lan and settings.lan_ip))
    sections = routes.route_sections(
        subnet or settings.subnet, gateway or address, ip or settings.ip, cidr,
        port or settings.port, hand_out_dns=not lan_mode,
    )  # fmt: skip
    if lan_mode:
        # lan mode needs no route: what to set comes first, the routed alternatives after
        sections = routes.lan_sections(lan_ip or str(settings.lan_ip), cidr) + sections
    own6 = sorted(host.appliance_ipv6(settings))
    survey = ra.Survey.from_dict(state.load_ipv6_dns(project))
    seen = ra.warnings(survey, frozenset(own6)) if survey else []
    ipv4_dns = (lan_ip or str(settings.lan_ip)) if lan_mode else (ip or settings.ip)
    sections += routes.ipv6_dns_sections(own6[0] if own6 else None, ipv4_dns, seen)
    print(routes.render_text(sections), end="")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
