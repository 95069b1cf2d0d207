# What the host service loads, run inside the trimmed root: its stdlib modules, pyroute2,
# python-iptables with every match and target the plan uses (each loads an xtables extension),
# and both iptables flavours. The byte code of what it loads is all that stays (trim.py,
# prune_bytecode).
import importlib
import subprocess

import iptc
import pyroute2  # noqa: F401 - the LAN address mode's netlink

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
