# What the host service loads, run inside the trimmed root: its stdlib modules, pyroute2,
# python-iptables with every match and target the plan uses (each loads an xtables extension),
# and both iptables flavours; then keepalived. The byte code of what it loads is all that stays
# (trim.py, prune_bytecode).
import ctypes
import importlib
import subprocess
import tempfile

import iptc
from pyroute2 import IPRoute  # the LAN address mode's netlink

for name in (
    "contextlib", "dataclasses", "enum", "fcntl", "hashlib", "ipaddress", "json", "os", "re",
    "shlex", "signal", "sys", "threading", "time", "typing",
):  # fmt: skip
    importlib.import_module(name)

rule = iptc.Rule()
rule.protocol = "udp"
rule.create_match("udp").dport = "53"
rule.create_match("conntrack").ctstate = "RELATED,ESTABLISHED"
rule.create_match("comment").comment = "netsetup: smoke"
for target in ("ACCEPT", "DROP", "MASQUERADE", "RETURN"):
    rule.target = iptc.Target(rule, target)
for tool in ("iptables-nft-save", "iptables-nft-restore", "iptables-legacy-save",
             "ip6tables-nft-save", "ip6tables-nft-restore", "ip6tables-legacy-save",
             "ip6tables-legacy-restore"):  # fmt: skip
    subprocess.run([tool, "--version"], check=True, stdout=subprocess.DEVNULL)

# keepalived, the failover's VRRP engine (issue #20): its libraries load, and it accepts a
# configuration like the one netsetup writes (VRRPv3, unicast, a track file). One keyword a line:
# keepalived reads a keyword and its arguments up to the end of the line, so `;` separates
# nothing and a second keyword on the line is silently ignored (`{ file X weight 0 }` keeps
# weight 1). `-t` rejects an interface that does not exist and the build host's are unknown: in
# a network namespace of this process's own, a veth pair makes eth0 (veth rather than dummy,
# which some kernels lack).
KEEPALIVED_CONF = """\
global_defs {
  router_id dnsapp
  enable_script_security
  vrrp_version 3
}
track_file appliance {
  file "/run/netsetup/dnsapp.health"
  weight 0
}
vrrp_instance dnsapp {
  state BACKUP
  nopreempt
  interface eth0
  virtual_router_id 53
  priority 150
  advert_int 0.5
  unicast_src_ip 192.168.1.2
  unicast_peer { 192.168.1.21 }
  virtual_ipaddress { 192.168.1.53/24 dev eth0 }
  track_file { appliance }
}
"""
subprocess.run(["keepalived", "--version"], check=True, stderr=subprocess.DEVNULL)
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(CLONE_NEWNET) != 0:
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) for keepalived -t")
with IPRoute() as ipr:
    ipr.link("add", ifname="eth0", kind="veth", peer="eth1")
with tempfile.NamedTemporaryFile("w", suffix=".conf") as conf:
    conf.write(KEEPALIVED_CONF)
    conf.flush()
    test = subprocess.run(["keepalived", "-t", "-f", conf.name], capture_output=True, text=True)
assert test.returncode == 0, f"keepalived -t failed (exit {test.returncode}):\n{test.stderr}"
