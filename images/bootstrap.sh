#!/usr/bin/env bash
# Build a base image from Debian packages, without any container registry: mmdebstrap bootstraps
# a bookworm root with the packages a recipe directory lists, images/trim.py cuts it down to the
# packages the recipe keeps (if it has a keep file), and `docker import` turns the tarball into
# an image.
#
#   images/bootstrap.sh RECIPE_DIR TAG     (FORCE=1 rebuilds)
#
#   images/base      dnsproxy-base:bookworm   the forwarder's base: Python, dnslib, uvloop, httpx
#   images/native    dnsproxy-native-builder:bookworm  rustc, cargo, packaged crates (no keep:
#                                             a build stage, not trimmed)
#   images/netsetup  netsetup-base:bookworm   the host service's: Python, iptables, python-iptables,
#                                             keepalived
#
# RECIPE_DIR/packages names the packages, comma separated; RECIPE_DIR/keep and smoke.py tell
# trim.py what stays. The image carries a label with a hash of the recipe, of this script and of
# trim.py; when an image with the same hash exists the script does nothing, so code changes never
# pay for a new bootstrap.
# MIRROR=URI overrides the Debian mirror, which is otherwise read from this machine's apt sources.
set -euo pipefail

RECIPE_DIR=$(cd "${1:?usage: bootstrap.sh RECIPE_DIR TAG}" && pwd)
TAG=${2:?usage: bootstrap.sh RECIPE_DIR TAG}
SUITE=bookworm # the keep lists name bookworm's packages (python3.11, gcc-12-base)
LABEL=org.dnsproxy.base.recipe
shopt -s nullglob
TRIM=$(cd "$(dirname "$0")" && pwd)/trim.py
RECIPE=$(cat "$0" "$TRIM" "$RECIPE_DIR"/packages "$RECIPE_DIR"/keep* "$RECIPE_DIR"/*.py \
    | sha256sum | cut -c1-16)
PACKAGES=$(tr -d ' \n' <"$RECIPE_DIR/packages")
hooks=()
if [[ -f $RECIPE_DIR/keep ]]; then
    hooks+=(--customize-hook="python3 '$TRIM' \"\$1\" '$RECIPE_DIR'")
fi

current=$(docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$TAG" 2>/dev/null || true)
if [[ $current == "$RECIPE" && -z ${FORCE:-} ]]; then
    echo "base image $TAG is up to date (recipe $RECIPE)"
    exit 0
fi

# First URI of an enabled `deb` source for SUITE in the machine's apt configuration (deb822
# .sources files and one-line sources.list files alike).
apt_uri() {
    local suite=$1 f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        awk -v suite="$suite" 'BEGIN { RS = ""; FS = "\n" }
            {
                types = uris = suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    split($i, kv, /:[ \t]*/)
                    key = tolower(kv[1]); val = substr($i, length(kv[1]) + 2)
                    gsub(/^[ \t]+|[ \t]+$/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled == "no" || (" " types " ") !~ / deb /) next
                n = split(suites, s, /[ \t]+/)
                for (i = 1; i <= n; i++) if (s[i] == suite) { split(uris, u, /[ \t]+/); print u[1]; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        # deb [options] URI SUITE COMPONENTS...
        sed -E 's/#.*//; s/\[[^]]*\]//' "$f" | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2 }'
    done
}

MIRROR=${MIRROR:-$(apt_uri "$SUITE" | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${SECURITY_MIRROR:-$(apt_uri "$SUITE-security" | head -n1)}
sources=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main")
if [[ -n $SECURITY ]]; then
    sources+=("deb $SECURITY $SUITE-security main")
else
    echo "warning: no $SUITE-security source in this machine's apt configuration" >&2
fi

command -v mmdebstrap >/dev/null || {
    echo "mmdebstrap is missing: apt-get install mmdebstrap (make deps does it)" >&2
    exit 1
}
old=$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)
echo "bootstrapping $TAG from $MIRROR (recipe $RECIPE)"
start=$SECONDS
# A tarball first, not a pipe: `docker import` would happily tag a truncated stream.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The essential variant plus the runtime packages; maintainer scripts need the essential tools,
# trim.py removes them afterwards. Docs, manuals and translations are never unpacked. A mirror
# caught mid-sync fails `apt-get update` once in a while: one more try before giving up.
bootstrap() {
    mmdebstrap --variant=essential --quiet --aptopt='Acquire::Retries "3"' \
        --include="$PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        "${hooks[@]}" \
        "$SUITE" "$work/root.tar" "${sources[@]}"
}
bootstrap || { echo "bootstrap failed; trying once more" >&2; bootstrap; }
docker import \
    --change "LABEL $LABEL=$RECIPE" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$work/root.tar" "$TAG" >/dev/null

echo "built $TAG in $((SECONDS - start)) s"
new=$(docker image inspect -f '{{.Id}}' "$TAG")
# The previous base is now untagged; drop it unless a container or image still uses it.
if [[ -n $old && $old != "$new" ]]; then
    docker image rm "$old" >/dev/null 2>&1 || true
fi
