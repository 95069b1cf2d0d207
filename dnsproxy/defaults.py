"""Values both halves of the project agree on: the forwarder serves with them, the host tool
writes firewall rules and compose settings for them. A leaf module (it imports nothing), so
netsetup can use it without importing any stage of the forwarder.
"""

# Clients served when --allow is not given: loopback, RFC 1918, link-local and unique local
# (RFC 4193). Not 100.64.0.0/10: shared address space (RFC 6598) is the ISP's carrier-grade NAT,
# whose other addresses are other customers, not this household.
DEFAULT_ALLOWED = (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
    "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10",
)

DNS_PORT = 53
# Split DNS list files, by the subdirectory of LISTS_DIR they are dropped in, and the option of
# the forwarder each subdirectory's files are given to; mounted read-only at LISTS_MOUNT.
LIST_KINDS = {"domestic-domains": "DOMESTIC_DOMAINS", "foreign-domains": "FOREIGN_DOMAINS",
              "domestic-ips": "DOMESTIC_IPS"}
LISTS_MOUNT = "/etc/dnsproxy/lists"
# Prometheus counters in the container (compose.yaml), read by `netsetup status` from the host.
METRICS_PORT = 9153
# The web page (dashboard and JSON API) in the container, reached from the LAN (netsetup).
WEB_PORT = 80
# Domains that belong to the home, asked of the LAN's own resolver (--local-dns) only, or answered
# NXDOMAIN here without one: the router's DHCP names live under one of them. home.arpa is RFC
# 8375's, internal ICANN's reserved private TLD (2024), lan and localdomain are what routers use.
DEFAULT_LOCAL_DOMAINS = ("lan", "home.arpa", "internal", "localdomain")
