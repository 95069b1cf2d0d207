# The DNS appliance: build it, deploy it, test it. `make help` lists the targets; README.md
# describes the settings. Settings are ordinary make variables: `make up PORT=53 UPSTREAMS=...`.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# ---- settings ----------------------------------------------------------------------------------
MODE          ?= both#                    comma list of port, direct, lan (both = port,direct): how LAN clients reach the appliance
LAN_IP        ?=#                         lan mode: a free address on the LAN, answered by the host (port 53)
LAN_IP6       ?=#                         lan mode over IPv6 too: a free address on the LAN's IPv6 prefix (a ULA)
LAN_CIDR6     ?=#                         empty: the LAN interface's IPv6 prefix (a ULA first)
SUBNET6       ?= fd53:53::/64#            the appliance bridge's IPv6 subnet (with LAN_IP6)
DNS_IP6       ?= fd53:53::53#             the container's fixed IPv6 address in SUBNET6
HA_PEERS      ?=#                         failover: the other host's LAN address, sharing LAN_IP (VRRP)
HA_PRIORITY   ?= 100#                     failover: this host's VRRP priority (1-254)
HA_VRID       ?= 53#                      failover: the VRRP router id both hosts use (1-255)
UPSTREAMS     ?=#                         empty: the CONFIG file's, or (netsetup's default) DNS over TLS to public resolvers
DOMESTIC_UPSTREAMS ?=#                    split DNS: domestic resolvers (README); empty: no split
LISTS_DIR     ?=#                         split DNS lists: its domestic-domains/ foreign-domains/ domestic-ips/
CONFIG        ?=#                         optional config file (TOML or CDNS), mounted read-only
LOCAL_DNS     ?=#                         the LAN's resolver (the router), asked the home's names only
LOCAL_DOMAINS ?=#                         the home's domains; empty: lan home.arpa internal localdomain
LOCAL_REVERSE ?=#                         networks whose reverse names are the home's, besides the LAN
HOSTS_FILE    ?=#                         a file in the /etc/hosts format (its directory mounted read-only)
LAN_INTERFACE ?=#                         empty: the host tool picks the default route's interface
LAN_CIDR      ?=#                         empty: the host tool reads it from LAN_INTERFACE
SUBNET        ?= 172.31.53.0/24#          the appliance's own bridge network
DNS_IP        ?= 172.31.53.53#            the container's fixed address in SUBNET (direct mode)
PORT          ?= 5053#                    published on the host for UDP and TCP (port mode)
QUERY_LOG     ?= 1#                       1: one JSON line per query in `make logs`; 0: none
BASE_IMAGE    ?= dnsproxy-base:bookworm#  or python:3.12-slim where a registry is reachable
BRIDGE        ?= br-dnsapp#               the bridge's interface name on the host
PROJECT       ?= dnsapp#                  compose project name
IMAGE         ?= dnsproxy:latest
NETSETUP_IMAGE ?= netsetup:latest#       the host service (rules kept in place, see README)
NETSETUP_BASE  ?= netsetup-base:bookworm
NATIVE_BUILDER ?= dnsproxy-native-builder:bookworm# Debian's rustc and crates: builds native/ offline
METRICS_FROM_LAN ?= 0#                    1: the LAN may also read the metrics port (9153)
WEB           ?= 1#                       1: the forwarder's web page (dashboard), from the LAN only; 0: none
WEB_PORT      ?= 8053#                    port mode: the web page's port on the host (TCP)
WEB_PASSWORD  ?=#                         the web page's password; empty: keep the one it has (`make up` prints it)

VENV   ?= .venv
PYTHON ?= python3
# Compose v2 when present, else docker-compose 1.29; both read compose.yaml.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

# compose.yaml reads these from the environment.
export UPSTREAMS QUERY_LOG SUBNET DNS_IP PORT BRIDGE IMAGE NETSETUP_IMAGE
export COMPOSE_PROJECT_NAME := $(PROJECT)
export CONFIG := $(if $(CONFIG),$(abspath $(CONFIG)))

# Debian packages the targets use, as command:package. Installed when missing, if we are root.
DEB_TOOLS := mmdebstrap:mmdebstrap dig:bind9-dnsutils ip:iproute2 iptables:iptables
# Shell snippet: apt-get install the packages in $$missing as root, else just name them.
APT_INSTALL = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -qq --no-install-recommends $$missing; \
	else \
	    echo "note: missing Debian packages:$$missing (install them, or run as root)"; \
	fi

.PHONY: help venv native deps base image up down reload logs check test lint clean

help:
	@echo "make up      set up, build the image if needed, deploy; prints where it answers"
	@echo "make down    stop the appliance, remove its container and network"
	@echo "make logs    follow the appliance's log (one JSON line per query)"
	@echo "make reload  re-read the config file, the split DNS lists and the hosts file"
	@echo "make check   ask the appliance through every exposed path (dig)"
	@echo "make test    the whole test suite (needs root and Docker for parts of it)"
	@echo "make image   build $(IMAGE) and $(NETSETUP_IMAGE) (and their bases, when changed)"
	@echo "make lint    ruff"
	@echo "settings: MODE LAN_IP UPSTREAMS DOMESTIC_UPSTREAMS LISTS_DIR CONFIG LAN_INTERFACE"
	@echo "          LOCAL_DNS LOCAL_DOMAINS LOCAL_REVERSE HOSTS_FILE"
	@echo "          LAN_CIDR SUBNET DNS_IP PORT QUERY_LOG LAN_IP6 LAN_CIDR6 SUBNET6 DNS_IP6"
	@echo "          HA_PEERS HA_PRIORITY HA_VRID METRICS_FROM_LAN WEB WEB_PORT WEB_PASSWORD"
	@echo "          BASE_IMAGE"

# ---- set-up ------------------------------------------------------------------------------------
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { missing=python3-venv; $(APT_INSTALL); }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[fast,netsetup,test]'
	touch $@

# The compiled UDP cache-hit path (native/, Rust with PyO3), built in place beside the package
# when cargo is here; without it the forwarder runs its Python path (dnsproxy/fastpath.py).
# Also its launcher, dnsproxy-bind, into the virtualenv's bin: it binds the listen sockets
# before Python starts (listen.py), as the image's entrypoint does. Replaced by a rename, never
# rewritten in place: a running forwarder maps the module, and would crash.
NATIVE_SO := dnsproxy/_native$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
NATIVE_BIN := $(VENV)/bin/dnsproxy-bind
native: $(NATIVE_SO) $(NATIVE_BIN)
$(NATIVE_SO) $(NATIVE_BIN) &: native/Cargo.toml $(wildcard native/src/*.rs native/src/bin/*.rs) | venv
	@if command -v cargo >/dev/null; then \
	    PYO3_PYTHON=$(abspath $(VENV))/bin/python cargo build --quiet --release \
	        --manifest-path native/Cargo.toml && \
	    install -m 755 native/target/release/lib_native.so $(NATIVE_SO).new && \
	    mv -f $(NATIVE_SO).new $(NATIVE_SO) && \
	    install -m 755 native/target/release/dnsproxy-bind $(NATIVE_BIN).new && \
	    mv -f $(NATIVE_BIN).new $(NATIVE_BIN); \
	else \
	    echo "note: no cargo here: UDP cache hits run in Python (apt-get install cargo)"; \
	fi

deps:
	@missing=""; \
	for pair in $(DEB_TOOLS); do \
	    command -v "$${pair%%:*}" >/dev/null || missing="$$missing $${pair#*:}"; \
	done; \
	$(COMPOSE) version >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then $(APT_INSTALL); fi

# ---- images ------------------------------------------------------------------------------------
# A base is bootstrapped only when its recipe changed since the image was built (bootstrap.sh
# compares a hash of it); code changes rebuild just the top layers, in seconds.
base:
	@if [ "$(BASE_IMAGE)" = dnsproxy-base:bookworm ]; then images/bootstrap.sh images/base $(BASE_IMAGE); fi
	@images/bootstrap.sh images/native $(NATIVE_BUILDER)
	@images/bootstrap.sh images/netsetup $(NETSETUP_BASE)

# The build context is only what the image needs, streamed as a tarball: no .dockerignore to
# maintain, and the virtualenv and .git never travel to the engine.
image: base
	tar -c --exclude=__pycache__ --exclude='*.pyc' --exclude='_native*.so' --exclude=target \
	    pyproject.toml dnsproxy native images/native/cargo-config.toml images/appliance/Dockerfile \
	    | docker build --quiet -f images/appliance/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	      --build-arg NATIVE_BUILDER=$(NATIVE_BUILDER) -t $(IMAGE) -
	@docker image inspect -f '$(IMAGE): {{.Size}} bytes' $(IMAGE)
	tar -c --exclude=__pycache__ --exclude='*.pyc' netsetup dnsproxy/__init__.py dnsproxy/defaults.py \
	    dnsproxy/healthcheck.py \
	    images/netsetup/Dockerfile \
	    | docker build --quiet -f images/netsetup/Dockerfile --build-arg BASE_IMAGE=$(NETSETUP_BASE) \
	      -t $(NETSETUP_IMAGE) -
	@docker image inspect -f '$(NETSETUP_IMAGE): {{.Size}} bytes' $(NETSETUP_IMAGE)

# ---- deployment --------------------------------------------------------------------------------
# up/down/check go through the host tool (netsetup/), which drives compose and the firewall.
NETSETUP      = $(VENV)/bin/netsetup
NETSETUP_ARGS = --mode $(MODE) $(foreach u,$(UPSTREAMS),--upstream '$(u)') \
                $(foreach u,$(DOMESTIC_UPSTREAMS),--domestic-upstream '$(u)') \
                $(if $(LISTS_DIR),--lists-dir '$(abspath $(LISTS_DIR))') \
                $(foreach u,$(LOCAL_DNS),--local-dns '$(u)') \
                $(foreach d,$(LOCAL_DOMAINS),--local-domain '$(d)') \
                $(foreach n,$(LOCAL_REVERSE),--local-reverse '$(n)') \
                $(if $(HOSTS_FILE),--hosts-file '$(abspath $(HOSTS_FILE))') \
                $(if $(LAN_INTERFACE),--lan-interface $(LAN_INTERFACE)) \
                $(if $(LAN_CIDR),--lan-cidr $(LAN_CIDR)) \
                $(if $(LAN_IP),--lan-ip $(LAN_IP)) \
                $(if $(LAN_IP6),--lan-ip6 $(LAN_IP6) --subnet6 $(SUBNET6) --ip6 $(DNS_IP6)) \
                $(if $(LAN_CIDR6),--lan-cidr6 $(LAN_CIDR6)) \
                $(foreach p,$(HA_PEERS),--ha-peer '$(p)') \
                $(if $(HA_PEERS),--ha-priority $(HA_PRIORITY) --ha-vrid $(HA_VRID)) \
                --subnet $(SUBNET) --ip $(DNS_IP) --port $(PORT) \
                $(if $(filter 1,$(METRICS_FROM_LAN)),--metrics-from-lan) \
                $(if $(filter 0,$(WEB)),--no-web,--web --web-port $(WEB_PORT))

# The web page's password reaches netsetup in its environment: on its command line (which make
# also echoes) `ps` would show it to every user of the host.
up: export NETSETUP_WEB_PASSWORD = $(WEB_PASSWORD)

# netsetup deploys compose.yaml, writes the host's firewall and prints where LAN clients ask.
up: venv deps image
	$(NETSETUP) up $(NETSETUP_ARGS) --project $(PROJECT)

down:
	$(NETSETUP) down --project $(PROJECT)

logs:
	$(COMPOSE) -f compose.yaml logs --follow --tail=100

# Re-read the config file, the split DNS lists and the hosts file (SIGHUP); a bad line keeps the
# ones in use and is logged. Files added to or removed from LISTS_DIR need `make up` (they are
# named at start), as does another HOSTS_FILE; the same one edited, however saved, needs only this.
reload:
	$(COMPOSE) -f compose.yaml kill -s SIGHUP dnsproxy

# Asks CHAOS TXT id.server, which the appliance answers itself: checks every path without sending
# anything upstream. NAME=example.org also resolves a real name through the upstreams.
check:
	$(NETSETUP) check --project $(PROJECT) $(if $(NAME),--name $(NAME) --qtype A --qclass IN)

# ---- quality -----------------------------------------------------------------------------------
test: venv native
	$(VENV)/bin/pytest tests/

lint: venv
	$(VENV)/bin/ruff check .

clean: down
	-docker volume rm $(PROJECT)_cache
	-docker image rm $(IMAGE)

# ---- benchmark ---------------------------------------------------------------------------------
# dnsproxy against its peers on this machine (see bench/README.md): saturation on 127.0.0.1, and
# the household run through a network namespace (root). The report goes to bench/results/latest.md,
# the plots beside it. BENCH_ARGS=--quick for a smoke run, e.g. BENCH_ARGS='--workloads household'.
BENCH_TOOLS := dnsperf:dnsperf dnsmasq:dnsmasq-base unbound:unbound
# smartdns's package enables a system service on port 53 and starts it: install it with service
# starts refused (policy-rc.d) and the boot-time start disabled, as the benchmark runs its own
# process with its own config.
SMARTDNS_INSTALL = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing: smartdns (its service is not started)"; \
	    guard=""; if [ ! -e /usr/sbin/policy-rc.d ]; then guard=/usr/sbin/policy-rc.d; \
	        printf '\043!/bin/sh\nexit 101\n' > $$guard; chmod +x $$guard; fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y -qq --no-install-recommends smartdns; \
	    [ -z "$$guard" ] || rm -f "$$guard"; \
	    if [ -d /run/systemd/system ]; then systemctl disable smartdns >/dev/null 2>&1 || true; fi; \
	else \
	    echo "note: smartdns is not installed; the household run skips it (apt-get install smartdns)"; \
	fi
.PHONY: bench
bench: venv $(VENV)/.bench-installed
	@missing=""; \
	for pair in $(BENCH_TOOLS); do \
	    command -v "$${pair%%:*}" >/dev/null || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then $(APT_INSTALL); fi
	@command -v smartdns >/dev/null || { $(SMARTDNS_INSTALL); }
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

$(VENV)/.bench-installed: pyproject.toml | venv
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	touch $@
