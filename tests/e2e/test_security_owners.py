"""Issue 12, Done-when 3: intercepts belong to the Kubernetes user the cluster verified.

Two developers, alice and bob: two ServiceAccount tokens bound to the same Role (so both may
read Secret tpenv-auth, sign SSH certificates for any session id, port-forward). Alice holds a
personal intercept of backend. Bob tries what the shared Secret used to allow:

- a header rule `x-telepresence-intercept-id=.*` (it would take alice's personal traffic):
  refused, naming alice;
- replacing and ending alice's intercept from a session forged with alice's session id (a
  certificate he signs himself), with and without `force`: refused, naming alice;

and then holds his own personal intercept beside alice's: each gets only their own requests.
`tpenv list` shows each intercept's owner as the cluster knows them.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import os

import pytest

from security_kit import user_kubeconfig
from test_intercept_kit import Intercepting, client_pod, curl, tpenv, wait_for
from test_intercept_personal import HEADER, LocalEcho, deploy, who
from tests.cluster.pytest_plugin import kubectl_json
from tpenv.errors import Forbidden
from tpenv.kits.agent_client import AgentSession
from tpenv.kits.kube import Kube
from tpenv.kits.portforward import PodTunnel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@contextlib.contextmanager
def as_user(kubeconfig):
    """Environment of the tpenv processes started inside: this user's kubeconfig only."""
    before = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    try:
        yield
    finally:
        os.environ["KUBECONFIG"] = before or ""


async def forged_session_attacks(bob_config, ns: str, pod: str, alice_id: str) -> list[str]:
    """Bob, with the namespace's Secret, signs a certificate for alice's session and tries to
    replace and end her intercept; returns the refusals' messages."""
    session, name = alice_id.split(":", 1)
    secret = kubectl_json("get", "secret", "tpenv-auth", ns=ns)["data"]
    material = {k: base64.b64decode(secret[k]) for k in ("ca_key", "host_key.pub")}
    kube = await Kube.load(str(bob_config))
    tunnel = PodTunnel(kube, ns, pod)
    refusals: list[str] = []
    try:
        async with AgentSession(session, ca_key=material["ca_key"], host_key_pub=material["host_key.pub"],
                                host=pod, port=7922, tunnel=tunnel, token=kube.bearer_token()) as forged:
            assert forged.info["user"] == f"system:serviceaccount:{ns}:bob" and forged.info["verified"]
            for attempt in (lambda: forged.intercept(name, "http", None, 9),
                            lambda: forged.intercept(name, "http", None, 9, force=True),
                            lambda: forged.leave(name),
                            lambda: forged.leave(name, force=True)):
                with pytest.raises(Forbidden) as e:
                    await attempt()
                refusals.append(str(e.value))
            held = await forged.list()
            assert [(i["intercept_id"], i["owner"]) for i in held] == [(alice_id, f"system:serviceaccount:{ns}:alice")]
    finally:
        tunnel.close()
        await kube.close()
    return refusals


def test_only_the_verified_owner_replaces_or_ends_an_intercept(namespace, tmp_path, kubeconfig):
    ns = namespace
    deploy(ns)
    client_pod(ns)
    alice_config, _ = user_kubeconfig(ns, "alice", kubeconfig, tmp_path)
    bob_config, _ = user_kubeconfig(ns, "bob", kubeconfig, tmp_path)
    alice_user, bob_user = f"system:serviceaccount:{ns}:alice", f"system:serviceaccount:{ns}:bob"
    alice, bob = LocalEcho("laptop-alice"), LocalEcho("laptop-bob")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = b = None
    try:
        # Stage 1: alice's personal intercept, as alice.
        with as_user(alice_config):
            a = Intercepting(tmp_path / "a", "backend", "--port", f"{alice.port}:http", "--http-header", "auto",
                             "--mount", "false", "-n", ns)
        info_a = a.ready()
        alice_id = info_a["id"]
        wait_for("alice's answer", lambda: who(curl(ns, f"http://backend.{ns}/", f"{HEADER}: {alice_id}"))
                 == "laptop-alice", 60)

        # Stage 2: bob's header rule that would take alice's personal traffic: refused, naming her.
        cp = tpenv(tmp_path / "b", "intercept", "backend", "--name", "greedy", "--port", f"{bob.port}:http",
                   "--http-header", f"{HEADER}=.*", "--mount", "false", "-n", ns, "--", "true",
                   env={"KUBECONFIG": str(bob_config)}, check=False, timeout=300)
        assert cp.returncode != 0 and alice_user in cp.stderr and alice_id in cp.stderr, cp.stderr

        # Stage 3: bob forges alice's session id: replace and end, with and without force: refused.
        refusals = asyncio.run(forged_session_attacks(bob_config, ns, info_a["pods"][0], alice_id))
        assert len(refusals) == 4 and all(alice_user in r or "may not force" in r for r in refusals), refusals
        assert sum("may not force" in r for r in refusals) == 2, refusals
        assert who(curl(ns, f"http://backend.{ns}/", f"{HEADER}: {alice_id}")) == "laptop-alice"

        # Stage 4: bob's own personal intercept beside alice's: each gets their own requests.
        with as_user(bob_config):
            b = Intercepting(tmp_path / "b", "backend", "--name", "mine", "--port", f"{bob.port}:http",
                             "--http-header", "auto", "--mount", "false", "-n", ns)
        bob_id = b.ready()["id"]
        assert who(curl(ns, f"http://backend.{ns}/", f"{HEADER}: {bob_id}")) == "laptop-bob"
        assert who(curl(ns, f"http://backend.{ns}/", f"{HEADER}: {alice_id}")) == "laptop-alice"
        assert who(curl(ns, f"http://backend.{ns}/")).startswith("backend-")

        # Stage 5: `tpenv list` shows each intercept's owner as the cluster verified them.
        listed = tpenv(tmp_path / "a", "list", "-n", ns, env={"KUBECONFIG": str(alice_config)}).stdout
        assert f"Owner         : {alice_user}" in listed and f"Owner         : {bob_user}" in listed, listed
    finally:
        for run in (b, a):
            if run is not None:
                run.stop()
        alice.close()
        bob.close()
