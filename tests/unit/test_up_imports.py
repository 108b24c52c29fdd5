"""`tpenv up` and `tpenv intercept` reach the workload's write without loading what only the tunnels
need (asyncssh, cryptography, dnspython, websockets): those load while the rollout runs
(tpenv/engine/lateimports.py, issue 13). A module-level import slipped back in fails here."""
from __future__ import annotations

import subprocess
import sys

LATE_ONLY = ("asyncssh", "cryptography", "dns", "websockets", "tpenv.kits.agent_client", "tpenv.kits.portforward")

# What the CLI imports before `up` or `intercept` writes the workload: the parser (every verb's
# module), the verbs' engines, and the injection path.
PATH = """
import sys
import tpenv.cli.main as main
main.build_parser()
import tpenv.engine.desired, tpenv.engine.up, tpenv.engine.liveview, tpenv.engine.intercept_unit
import tpenv.engine.agents, tpenv.engine.ephemeral, tpenv.engine.redirect, tpenv.engine.intercepts
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in {late} or m in {late})))
"""


def _loaded() -> list[str]:
    code = PATH.replace("{late}", repr(set(LATE_ONLY)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def test_the_way_to_the_rollout_loads_none_of_the_tunnels_libraries():
    assert _loaded() == []


def test_the_late_list_loads_what_the_tunnels_need():
    # dnspython is `connect`'s alone (outbound/), loaded only for a file with a connect section.
    tunnels = tuple(m for m in LATE_ONLY if m != "dns")
    code = ("import sys, tpenv.engine.lateimports as l; l._import_all(); "
            f"print(all(m in sys.modules for m in {tunnels!r}))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"
