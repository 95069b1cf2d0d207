#!/usr/bin/env bash
# DNS protocol compliance: ISC's genreport (recursive mode; FULL, COMMON and TYPE tests) against
# dnsproxy, dnsmasq and unbound, each forwarding to the same knot authoritative server that
# serves an unsigned zone (example.test) and a signed one (signed.test). Everything runs in a
# network namespace of its own with only a loopback interface: nothing can leave the machine.
#
#   bench/compliance.sh /path/to/genreport [dnsproxy dnsmasq unbound]
#
# Needs root (for the namespace), knotd (Debian: knot, its service left stopped), dnsmasq, unbound, and this
# repository's virtualenv (make venv). genreport is not packaged: see bench/README.md.
# Prints, per server, a table of every test and its result for each zone, then the tests
# dnsproxy fails where another server passes.
set -euo pipefail

usage() { echo "usage: $0 GENREPORT [SERVER...]   (servers: dnsproxy dnsmasq unbound)" >&2; exit 2; }
[ $# -ge 1 ] || usage
GENREPORT=$(readlink -f "$1") || usage
shift
if [ $# -gt 0 ]; then SERVERS=("$@"); else SERVERS=(dnsproxy dnsmasq unbound); fi
[ -x "$GENREPORT" ] || { echo "$0: $GENREPORT is not an executable" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: needs root for a network namespace" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || { echo "$0: no virtualenv: run make venv" >&2; exit 2; }
for tool in knotd dnsmasq unbound unbound-checkconf ip; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing (Debian: knot dnsmasq unbound iproute2)" >&2; exit 2; }
done

# Each server on its own loopback address, all on port 53, inside the namespace.
declare -A ADDRESS=([knot]=127.0.0.10 [dnsproxy]=127.0.0.11 [dnsmasq]=127.0.0.12 [unbound]=127.0.0.13)
for server in "${SERVERS[@]}"; do
    [ -n "${ADDRESS[$server]:-}" ] && [ "$server" != knot ] || usage
done
NS="dnscompliance$$"
WORK=$(mktemp -d /tmp/compliance.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
in_ns() { ip netns exec "$NS" "$@"; }  # not for background jobs: $! must be the server

ip netns add "$NS"
in_ns ip link set lo up

# --- the authoritative server --------------------------------------------------------------
mkdir -p "$WORK/knot"
for zone in example.test signed.test; do
    cat > "$WORK/knot/$zone.zone" <<EOF
\$ORIGIN $zone.
\$TTL 3600
@       SOA   ns.$zone. hostmaster.$zone. 1 7200 3600 1209600 300
@       NS    ns.$zone.
ns      A     ${ADDRESS[knot]}
@       A     192.0.2.1
@       AAAA  2001:db8::1
@       MX    10 mail.$zone.
@       TXT   "compliance test zone"
mail    A     192.0.2.25
www     CNAME $zone.
EOF
done
cat > "$WORK/knot/knot.conf" <<EOF
server:
    listen: ${ADDRESS[knot]}@53
    rundir: "$WORK/knot"
log:
  - target: stderr
    any: warning
database:
    storage: "$WORK/knot"
policy:
  - id: quick
    algorithm: ecdsap256sha256
    nsec3: off
template:
  - id: default
    storage: "$WORK/knot"
    zonefile-sync: -1
zone:
  - domain: example.test
    file: example.test.zone
  - domain: signed.test
    file: signed.test.zone
    dnssec-signing: on
    dnssec-policy: quick
EOF
ip netns exec "$NS" knotd -c "$WORK/knot/knot.conf" 2> "$WORK/knot.log" &
PIDS+=($!)

# --- the forwarders ------------------------------------------------------------------------
start_dnsproxy() {
    (cd "$ROOT" && exec ip netns exec "$NS" "$PYTHON" -m dnsproxy \
        --listen "${ADDRESS[dnsproxy]}:53" --upstream "${ADDRESS[knot]}:53" \
        --rate-limit 0 --log-level warning) 2> "$WORK/dnsproxy.log" &
    PIDS+=($!)
}

start_dnsmasq() {
    ip netns exec "$NS" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --no-poll \
        --bind-interfaces --listen-address="${ADDRESS[dnsmasq]}" --port=53 \
        --server="${ADDRESS[knot]}#53" --pid-file= --user=nobody --group=nogroup \
        --log-facility=- 2> "$WORK/dnsmasq.log" &
    PIDS+=($!)
}

start_unbound() {
    cat > "$WORK/unbound.conf" <<EOF
server:
    interface: ${ADDRESS[unbound]}@53
    do-ip6: no
    num-threads: 1
    username: ""
    chroot: ""
    directory: "$WORK"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    module-config: "validator iterator"
    do-not-query-localhost: no
    access-control: 127.0.0.0/8 allow
    local-zone: "test." nodefault
    domain-insecure: "test."
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: ${ADDRESS[knot]}@53
EOF
    unbound-checkconf "$WORK/unbound.conf" >/dev/null
    ip netns exec "$NS" unbound -d -c "$WORK/unbound.conf" 2> "$WORK/unbound.log" &
    PIDS+=($!)
}

for server in "${SERVERS[@]}"; do "start_$server"; done

# Wait until every server answers SOA for both zones (knot signs signed.test on start).
ready() {
    in_ns "$PYTHON" - "$@" <<'EOF'
import socket, sys
from dnslib import DNSRecord
for address in sys.argv[1:]:
    for zone in ("example.test", "signed.test"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            sock.sendto(DNSRecord.question(zone, "SOA").pack(), (address, 53))
            try:
                if DNSRecord.parse(sock.recv(4096)).header.rcode != 0:
                    sys.exit(1)
            except OSError:
                sys.exit(1)
EOF
}
addresses=("${ADDRESS[knot]}")
for server in "${SERVERS[@]}"; do addresses+=("${ADDRESS[$server]}"); done
for _ in $(seq 60); do
    ready "${addresses[@]}" && break
    sleep 0.5
done
if ! ready "${addresses[@]}"; then
    echo "$0: the servers did not all come up; their logs:" >&2
    tail -n 5 "$WORK"/*.log >&2
    exit 1
fi

# --- the tests -----------------------------------------------------------------------------
# -R recursive mode; -t the TYPE tests, then -f (FULL, which includes EDNS) and -c (COMMON):
# -t resets the selection, so it comes first. -s serial, -o in input order.
for server in "${SERVERS[@]}"; do
    for zone in example.test signed.test; do
        echo "$zone $server ${ADDRESS[$server]}"
    done | in_ns "$GENREPORT" -R -t -f -c -s -o > "$WORK/$server.report"
done

echo "# genreport -R -t -f -c, as printed"
for server in "${SERVERS[@]}"; do cat "$WORK/$server.report"; done
"$PYTHON" - "$WORK" "${SERVERS[@]}" <<'EOF'
"""genreport prints one line per zone and server: `zone. @address (server): test=result ...`
(TYPE tests as `TYPE=result`). Make a table per server, then list dnsproxy's shortfalls."""
import re
import sys
from pathlib import Path

work, servers = Path(sys.argv[1]), sys.argv[2:]
results: dict[str, dict[str, dict[str, str]]] = {}  # server -> test -> zone -> result
order: list[str] = []
for server in servers:
    for line in (work / f"{server}.report").read_text().splitlines():
        match = re.match(r"(\S+)\. @\S+ \(([^)]*)\): (.*)", line)
        if not match:
            continue
        zone, _, rest = match.groups()
        for item in rest.split():
            test, _, result = item.partition("=")
            if test not in order:
                order.append(test)
            results.setdefault(server, {}).setdefault(test, {})[zone] = result

zones = ["example.test", "signed.test"]
def passed(result: str | None) -> bool:
    # "ok" plus what was merely seen (nsid, expire, cookie, subnet, "yes" for a signed zone)
    return result is not None and "ok" in result.split(",")

for server in servers:
    rows = results.get(server, {})
    failed = sum(1 for test in order for zone in zones if not passed(rows.get(test, {}).get(zone)))
    print(f"\n## {server}: {failed} failed of {len(order) * len(zones)}\n")
    print(f"| test | {' | '.join(zones)} |")
    print(f"|---|{'---|' * len(zones)}")
    for test in order:
        cells = [rows.get(test, {}).get(zone, "-") for zone in zones]
        print(f"| {test} | {' | '.join(cells)} |")

if "dnsproxy" in servers and len(servers) > 1:
    print("\n## dnsproxy fails, another server passes\n")
    short = []
    for test in order:
        for zone in zones:
            ours = results.get("dnsproxy", {}).get(test, {}).get(zone)
            peers = [s for s in servers if s != "dnsproxy"
                     and passed(results.get(s, {}).get(test, {}).get(zone))]
            if peers and not passed(ours):
                short.append(f"- {test} ({zone}): dnsproxy {ours or 'no result'}; "
                             f"passed by {', '.join(peers)}")
    print("\n".join(short) if short else "none")
EOF
