"""`tpenv up` registers its intercept on a pod that is still starting (issue 13, the `up` row):
a new pod's tunnel opens as soon as its agent listens, before the kubelet reports the pod
Ready, so the first request the Service sends that pod reaches the laptop; and a pod held
unready holds nothing up. The real CLI, the real cluster.

The app's readiness probe passes once /tmp/ready exists in its container, so the test decides
when each pod becomes Ready:

1. Deployment slow, ready on demand, and the client pod; a file intercepting slow.
2. `tpenv up` injects the agent. The new pod is held unready, yet its agent already holds the
   intercept (its log says so) and the handler runs; the old pod still serves the cluster.
3. The new pod made ready: the rollout ends, and the laptop answers the cluster's requests.
4. The pod deleted: its successor, held unready, gets the intercept before it is Ready too (a
   restart while `up` runs), and serves the laptop once made ready.
5. A second replica held unready for good: it holds the intercept too, and the intercept stays
   ready and serving.
"""
from __future__ import annotations

import copy
import re

import pytest

from tests.cluster.pytest_plugin import apply, kubectl, kubectl_json, live_pods, wait_until
from tests.e2e.test_up_kit import (UpSession, answered_by_laptop, client, echo_app, intercept_yaml, ready_pods,
                                   wait_client, write_handler)
from tests.e2e.helpers_up import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

NAME = "slow"


def ready_on_demand(name: str) -> list[dict]:
    """The echo app whose pods become Ready only once /tmp/ready exists in the app container."""
    manifests = copy.deepcopy(echo_app(name))
    app = manifests[0]["spec"]["template"]["spec"]["containers"][0]
    app["readinessProbe"] = {"exec": {"command": ["test", "-f", "/tmp/ready"]}, "periodSeconds": 1}
    return manifests


def pods(ns: str) -> list[dict]:
    return live_pods(ns, f"app={NAME}")


def is_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def with_agent(pod: dict) -> bool:
    return any(c["name"] == "tpenv-agent" for c in pod["spec"]["containers"])


def make_ready(ns: str, pod: str) -> None:
    kubectl("exec", pod, "-c", "app", "--", "touch", "/tmp/ready", ns=ns)


def holds_intercept(ns: str, pod: str) -> bool:
    """The pod's agent registered this intercept (its log line, protocol §3)."""
    logs = kubectl("logs", pod, "-c", "tpenv-agent", ns=ns, check=False).stdout
    return re.search(rf"intercept \S+:{NAME} on port", logs) is not None


def unready_agent_pod(ns: str, besides: set[str] = frozenset()) -> str:
    """Wait for a pod with the agent, running and not Ready, other than ``besides``."""
    def find() -> str | None:
        for p in pods(ns):
            if with_agent(p) and p["metadata"]["name"] not in besides and p["status"].get("phase") == "Running":
                return p["metadata"]["name"]
        return None
    return wait_until("a new pod with the agent, running", find, 120, interval=0.2)


def still_unready(ns: str, pod: str) -> None:
    p = kubectl_json("get", "pod", pod, ns=ns)
    assert not is_ready(p), f"{pod} became Ready without /tmp/ready: the probe is not what this test holds"


def test_the_intercept_is_on_a_pod_before_it_is_ready(namespace, tmp_path):
    ns = namespace
    # -- stage 1: slow, ready on demand; the client; the file -------------------------------------
    apply(ready_on_demand(NAME), ns=ns)
    client(ns)
    old = wait_until("slow's first pod running", lambda: next(
        (p["metadata"]["name"] for p in pods(ns) if p["status"].get("phase") == "Running"), None), 120)
    make_ready(ns, old)
    kubectl("rollout", "status", f"deployment/{NAME}", "--timeout=120s", ns=ns, timeout=150)
    wait_client(ns)
    port = free_port()
    write_handler(tmp_path / NAME)
    (tmp_path / "telepresence.yaml").write_text(
        f"apiVersion: tpenv/v1\nnamespace: {ns}\nintercepts:\n" + intercept_yaml(NAME, ns, port, cwd=NAME))
    url = f"http://{NAME}.{ns}/"

    with UpSession(tmp_path) as up:
        # -- stage 2: the injected pod, held unready, already holds the intercept; the handler runs --
        new = unready_agent_pod(ns)
        up.until(f"{new}'s agent holding the intercept", lambda: holds_intercept(ns, new), 60, interval=0.2)
        up.wait_output(rf"\[handler/{NAME}\] running", 60)
        still_unready(ns, new)
        assert ready_pods(ns, NAME) == [old], "the old pod serves until the new one is Ready"

        # -- stage 3: made ready: the rollout ends, the laptop answers --------------------------------
        make_ready(ns, new)
        up.wait_ready(f"intercept/{ns}/{NAME}", f"handler/{NAME}")
        up.until("slow from the laptop", answered_by_laptop(ns, url, name=NAME), 60)

        # -- stage 4: a restart while up runs: the successor holds the intercept before it is Ready ---
        kubectl("delete", "pod", new, "--wait=false", ns=ns)
        succ = unready_agent_pod(ns, besides={new})
        up.until(f"{succ}'s agent holding the intercept", lambda: holds_intercept(ns, succ), 60, interval=0.2)
        still_unready(ns, succ)
        make_ready(ns, succ)
        up.until("slow from the laptop, by the successor", answered_by_laptop(ns, url, name=NAME), 60)

        # -- stage 5: a second replica held unready for good holds nothing up --------------------------
        kubectl("scale", f"deployment/{NAME}", "--replicas=2", ns=ns)
        third = unready_agent_pod(ns, besides={new, succ})
        up.until(f"{third}'s agent holding the intercept", lambda: holds_intercept(ns, third), 60, interval=0.2)
        still_unready(ns, third)
        assert up.unit(f"intercept/{ns}/{NAME}")["state"] == "ready", up.output
        up.until("slow from the laptop with a replica unready", answered_by_laptop(ns, url, name=NAME), 60)
        assert up.stop() == 0, up.output
        # Probing a starting agent dropped many port-forward streams at once: none left a traceback.
        assert "Traceback" not in up.output, up.output
