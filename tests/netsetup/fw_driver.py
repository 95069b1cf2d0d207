"""Apply or remove the plan's firewall rules from inside a network namespace.

Backend tests run this under ``ip netns exec`` so that every rule lands in a throwaway namespace
(python-iptables, in particular, works on the namespace of its own process).
Usage: fw_driver.py BACKEND ENGINE MODE apply|remove|state [PROJECT]
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from netsetup_facts import facts, settings

from netsetup.firewall import get_backend
from netsetup.plan import compute_plan


def main() -> None:
    backend_name, engine, mode, action = sys.argv[1:5]
    project = sys.argv[5] if len(sys.argv) > 5 else "dnsapp"
    plan = compute_plan(replace(settings(mode), project=project), facts(engine, backend_name))
    backend = get_backend(backend_name)
    if action == "apply":
        backend.apply(plan.firewall)
    elif action == "remove":
        backend.remove(plan.firewall.chains)
    elif action == "state":
        state = backend.state(plan.firewall)
        print(json.dumps({"complete": state.complete, "empty": state.empty, "extra": state.extra,
                          "hooks_not_first": state.hooks_not_first}))
    else:
        raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    main()
