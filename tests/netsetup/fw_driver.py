"""Apply or remove the plan's firewall rules from inside a network namespace.

Backend tests run this under ``ip netns exec`` so that every rule lands in a throwaway namespace
(python-iptables, in particular, works on the namespace of its own process).
Usage: fw_driver.py BACKEND ENGINE MODE apply|remove|state [PROJECT]
Both families: the IPv6 plan is applied and checked where the mode asks for IPv6 (netsetup_facts),
and removed always, as `down` does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from netsetup_facts import facts, settings

from netsetup.firewall import get_backend
from netsetup.plan import compute_plan, own_chains


def main() -> None:
    backend_name, engine, mode, action = sys.argv[1:5]
    project = sys.argv[5] if len(sys.argv) > 5 else "dnsapp"
    plan = compute_plan(replace(settings(mode), project=project), facts(engine, backend_name))
    backend, backend6 = get_backend(backend_name), get_backend(backend_name, 6)
    if action == "apply":
        backend.apply(plan.firewall)
        if plan.firewall6.chains:
            backend6.apply(plan.firewall6)
    elif action == "remove":
        backend.remove(plan.firewall.chains)
        backend6.remove(own_chains(project))
    elif action == "state":
        state = backend.state(plan.firewall)
        found = {"complete": state.complete, "empty": state.empty, "extra": state.extra,
                 "hooks_not_first": state.hooks_not_first}  # fmt: skip
        if plan.firewall6.chains:
            state6 = backend6.state(plan.firewall6)
            found |= {"complete6": state6.complete, "extra6": state6.extra}
        print(json.dumps(found))
    else:
        raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    main()
