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


# What the kubernetes package would import that tpenv never uses (tpenv/kits/kubepkg.py): its
# __init__'s watch (pydoc), dynamic, stream (websocket-client); kube_config's OIDC-only imports.
# And jinja2, for a file's env templates, the manager's manifests and --replace only.
NEVER_AT_START = ("kubernetes.watch", "kubernetes.dynamic", "kubernetes.stream", "pydoc", "websocket",
                  "requests", "requests_oauthlib", "oauthlib.oauth2", "jinja2")


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_way_to_the_rollout_loads_none_of_the_kubernetes_package_extras_nor_jinja2():
    code = PATH.replace("{late}", repr(set(NEVER_AT_START)))
    loaded = [m for m in _run(code).split(",") if m]
    assert [m for m in loaded if m in NEVER_AT_START or m.split(".")[0] in ("requests", "websocket")] == []


def test_what_was_left_out_is_there_on_first_use():
    # Stage 1: tpenv's kube kit loaded (the light package), then each left-out name used.
    code = """
import tpenv.kits.kube
import kubernetes, kubernetes.config.kube_config as kc
print(kubernetes.__version__ == __import__("importlib.metadata").metadata.version("kubernetes"))
print(kubernetes.watch.Watch.__module__, callable(kubernetes.stream.stream))
# Stage 2: the OIDC refresh's names resolve to the real ones only now.
import sys
print("requests_oauthlib" in sys.modules, "oauthlib.oauth2.rfc6749" in sys.modules)
print(kc.oauthlib.oauth2.rfc6749.errors.InvalidClientIdError.__module__)
session = kc.OAuth2Session(client_id="x")
print(type(session).__module__)
import requests_oauthlib
print(requests_oauthlib.OAuth2Session is type(session))
"""
    assert _run(code).splitlines() == [
        "True", "kubernetes.watch.watch True", "False False",
        "oauthlib.oauth2.rfc6749.errors", "requests_oauthlib.oauth2_session", "True"]


def test_nothing_changes_when_the_package_is_already_imported():
    code = """
import kubernetes, sys
before = sys.modules["kubernetes"]
import tpenv.kits.kube
print(sys.modules["kubernetes"] is before, "kubernetes.watch" in sys.modules)
"""
    assert _run(code) == "True True"
