"""An intercept's units during its agent's rollout and while pods start (engine/intercepts.py,
issue 13's `up` row), as pure logic over pod dicts and a fake reconciler:

- which pods get a tunnel: every started pod whose agent serves the port, Ready or not yet (a
  starting tunnel waits for the agent's banner); not a pod whose agent is stuck, not yet on a
  node, or being deleted; the env is read from the first Ready pod, else the first started one;
- the intercept is ready once at least one tunnel is and every Ready pod's is: a pod still
  starting (or never going to) holds nothing up;
- during our rollout, the handler may start (``serving``) as soon as the first new pod's tunnel
  and the env are ready, and the rollout's own error (the workload restored) is what the wait
  raises when it fails.
"""
from __future__ import annotations

import asyncio

import pytest

from tpenv.config.models import Intercept
from tpenv.engine.agents import AgentReady, pod_started
from tpenv.engine.intercepts import InterceptRun, Resolved
from tpenv.engine.units import State, UnitState
from tpenv.errors import RolloutStalled
from tpenv.kits.kube import Workload
from tpenv.settings import Settings

WAIT = 10.0


def pod(name: str, *, ready: bool = False, node: bool = True, agent: str | None = "running", deleting: bool = False,
        serves: bool = True, phase: str | None = None) -> dict:
    """A pod of the workload: ``agent`` is the agent container's state (running, a waiting
    reason, or None before the kubelet reported any)."""
    containers = [{"name": "app"}]
    if serves:
        containers.append({"name": "tpenv-agent", "args": ["sidecar", "--listen", "7900:8080:http"]})
    statuses = []
    if agent == "running":
        statuses.append({"name": "tpenv-agent", "state": {"running": {}}, "ready": ready})
    elif agent is not None:
        statuses.append({"name": "tpenv-agent", "state": {"waiting": {"reason": agent}}, "ready": False})
    return {"metadata": {"name": name, "uid": f"uid-{name}", "namespace": "shop",
                         **({"deletionTimestamp": "2026-12-03T00:00:00Z"} if deleting else {})},
            "spec": {"containers": containers, **({"nodeName": "n1"} if node else {})},
            "status": {"phase": phase or ("Running" if ready or agent == "running" else "Pending"),
                       "containerStatuses": statuses,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def run_with(pods: list[dict]) -> InterceptRun:
    ic = Intercept.model_validate({"name": "cart", "workload": "cart", "port": "8080:http"})
    run = InterceptRun(None, ic, "shop", "s1", Settings())
    w = Workload("Deployment", "cart", "shop", {"spec": {"replicas": 2, "template": {}}})
    svc = {"metadata": {"name": "cart"}, "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80, "targetPort": "http"}]}}
    agent = AgentReady(w, svc, {"container": "app", "ports": []}, "http", "app", True)
    run.resolved = Resolved(w, svc, svc["spec"]["ports"][0], agent)
    run.material = {}
    run._pods = {p["metadata"]["uid"]: p for p in pods}
    return run


def test_a_pod_starts_once_on_a_node_until_it_ends_or_its_agent_is_stuck():
    assert pod_started(pod("a", agent=None))  # scheduled; the kubelet has not reported yet
    assert pod_started(pod("a", agent="ContainerCreating")) and pod_started(pod("a", ready=True))
    assert not pod_started(pod("a", node=False, agent=None))
    assert not pod_started(pod("a", agent="ImagePullBackOff")) and not pod_started(pod("a", agent="CrashLoopBackOff"))
    assert not pod_started(pod("a", deleting=True)) and not pod_started(pod("a", phase="Succeeded"))


def test_tunnels_for_started_pods_the_env_from_the_first_ready_one():
    pods = [pod("d-ready", ready=True), pod("b-starting", agent="ContainerCreating"), pod("a-stuck", agent="ErrImagePull"),
            pod("c-unscheduled", node=False, agent=None), pod("e-deleting", ready=True, deleting=True),
            pod("f-old", ready=True, serves=False)]
    run = run_with(pods)
    specs = run.desired()
    tunnels = {k[2]: s for k, s in specs.items() if k[0] == "tunnel"}
    # Stage 1: the Ready pod and the starting one get tunnels; only the starting one waits for its agent.
    assert sorted(tunnels) == ["b-starting", "d-ready"]
    assert tunnels["b-starting"].starting and not tunnels["d-ready"].starting
    # Stage 2: "starting" is not part of the spec: the pod becoming Ready keeps its session.
    assert tunnels["b-starting"].spec_hash == run_with([pod("b-starting", ready=True)]).desired()[
        ("tunnel", "shop", "b-starting")].spec_hash
    # Stage 3: the env from the first Ready pod by name, not from the first started one.
    env = next(s for k, s in specs.items() if k[0] == "intercept")
    assert env.pod == "d-ready"
    # Stage 4: while no pod is Ready (our rollout), from the first started one.
    env = next(s for k, s in run_with([pod("b"), pod("a", agent="ContainerCreating")]).desired().items()
               if k[0] == "intercept")
    assert env.pod == "a"


class FakeUnit:
    def __init__(self, state: State) -> None:
        self._state = UnitState(state)

    def health(self) -> UnitState:
        return self._state


class FakeRec:
    """The reconciler's face that wait_ready and is_ready use: specs, running units, wait_until."""

    def __init__(self, run: InterceptRun) -> None:
        self.specs = run.desired()
        # The env unit is an EnvMountUnit in life; its state is all is_ready reads.
        run.env_unit = lambda: self.running.get(run.key)
        self.running: dict = {}
        self.errors: dict = {}
        self._permanent: set = set()
        self.changed = asyncio.Condition()

    def set(self, key, state: State) -> None:
        self.running[key] = FakeUnit(state)

    async def poke(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_until(self, predicate, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                async with self.changed:
                    await self.changed.wait_for(lambda: predicate(self))
        except TimeoutError:
            return predicate(self)
        return True

    def snapshot(self) -> dict:
        return {"units": []}

    def notify(self, event) -> None:
        pass


def test_ready_needs_every_ready_pods_tunnel_and_one_at_least():
    run = run_with([pod("a", ready=True), pod("b", agent="ContainerCreating")])
    run.rec = rec = FakeRec(run)
    env = next(k for k in rec.specs if k[0] == "intercept")
    a, b = ("tunnel", "shop", "a"), ("tunnel", "shop", "b")
    rec.set(env, State.READY)
    rec.set(b, State.STARTING)
    # Stage 1: the Ready pod's tunnel is not up: not ready, whatever the starting one does.
    rec.set(a, State.STARTING)
    assert not run.is_ready()
    # Stage 2: it is: ready, the starting pod (maybe crash-looping) holds nothing up.
    rec.set(a, State.READY)
    assert run.is_ready()
    # Stage 3: during a rollout no pod is Ready: the first started pod's tunnel is enough.
    run2 = run_with([pod("b", agent="ContainerCreating"), pod("c", agent="ContainerCreating")])
    run2.rec = rec2 = FakeRec(run2)
    rec2.set(next(k for k in rec2.specs if k[0] == "intercept"), State.READY)
    assert not run2.is_ready()
    rec2.set(("tunnel", "shop", "b"), State.READY)
    assert run2.is_ready()


async def test_during_the_rollout_the_handler_starts_and_the_rollouts_error_is_raised():
    run = run_with([pod("b", agent="ContainerCreating")])
    run.rec = rec = FakeRec(run)
    loop = asyncio.get_running_loop()
    rollout: asyncio.Future = loop.create_future()
    run._settling = asyncio.ensure_future(asyncio.shield(rollout))
    served: list[bool] = []
    waiting = asyncio.ensure_future(run.wait_ready(WAIT, serving=lambda: served.append(True)))
    # Stage 1: the new pod's tunnel and the env come up before the rollout ends: serve now.
    rec.set(next(k for k in rec.specs if k[0] == "intercept"), State.READY)
    rec.set(("tunnel", "shop", "b"), State.READY)
    await rec.poke()
    async with asyncio.timeout(WAIT):
        while not served:
            await asyncio.sleep(0.01)  # the fake has no event of its own for the callback
    assert not waiting.done()
    # Stage 2: the rollout stalls (ensure_agent restored the workload): that error ends the wait.
    rollout.set_exception(RolloutStalled("the rollout of deployment/cart stalled: x; deployment/cart was "
                                         "restored as it was"))
    with pytest.raises(RolloutStalled, match="restored"):
        await asyncio.wait_for(waiting, WAIT)
