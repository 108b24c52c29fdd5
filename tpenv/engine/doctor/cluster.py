"""Doctor's checks of the cluster: the API server, the current user's rights, the agent image,
and (webhook.py) the manager with its webhook.

The rights are asked in rights.py (one SelfSubjectAccessReview per right tpenv uses). The agent
image is looked up in the nodes' image lists first; when it is not listed (the kubelet reports at
most 50 images per node) a short-lived probe pod with that image says for real whether it can be
pulled. The manager's checks live in webhook.py;
the overlap of the cluster's ranges with this machine's routes is checked here too.
"""
from __future__ import annotations

import ipaddress
import secrets
import socket
from typing import Any

from tpenv.engine.doctor import FAIL, OK, SKIP, WARN, Check, Outcome
from tpenv.engine.doctor.rights import rights
from tpenv.engine.doctor.webhook import manager, webhook
from tpenv.errors import Forbidden, NotFound, TpenvError
from tpenv.kits.kube import Kube, What
from tpenv.kits.kuberest import ApiGroup
from tpenv.settings import Settings


async def api_server(kube: Kube) -> Outcome:
    version = await kube.call(_version_call(kube), what=What("get", "version"))
    return Outcome(OK, f"{kube.host} (context {kube.context}), Kubernetes {version.get('gitVersion', '?')}")


def _version_call(kube: Kube):
    def call(**kw: Any) -> Any:  # GET /version: not a resource, so no ApiGroup method for it
        request = kube.api.param_serialize(method="GET", resource_path="/version", header_params={
            "Accept": "application/json"}, auth_settings=["BearerToken"])
        response = kube.api.call_api(*request, _request_timeout=kw.get("_request_timeout"))
        if not 200 <= response.status <= 299:
            from kubernetes.client.exceptions import ApiException

            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response
    return call


def _node_has(nodes: list[dict[str, Any]], image: str) -> bool:
    """Listed on some node. Not listed proves nothing (the kubelet lists 50 images at most, and
    reports a new one with a lag): the probe pod decides then."""
    wanted = {image, f"docker.io/{image}", f"docker.io/library/{image}"}
    return any(wanted & set(i.get("names") or []) for node in nodes for i in (node.get("status") or {}).get("images") or [])


async def _probe_pod(kube: Kube, namespace: str, image: str, pull: str) -> tuple[bool, str]:
    """Run a pod with ``image`` until its container is created (image there) or the image
    cannot be had (ErrImagePull, ErrImageNeverPull, ...); the pod is deleted in any case."""
    name = f"tpenv-doctor-image-{secrets.token_hex(3)}"
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "tpenv"}},
           "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0, "activeDeadlineSeconds": 120,
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "probe", "image": image, "imagePullPolicy": pull,
                                    "command": ["true"],
                                    "securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                                        "allowPrivilegeEscalation": False}}]}}
    await kube.call(kube.core.create_namespaced_pod, namespace, pod, what=What("create", "pods", namespace))
    try:
        async with kube.watch(kube.core.list_namespaced_pod, namespace, field_selector=f"metadata.name={name}",
                              what=What("watch", "pods", namespace)) as events:
            async for _, obj in events:
                for cs in (obj.get("status") or {}).get("containerStatuses") or []:
                    state = cs.get("state") or {}
                    reason = (state.get("waiting") or {}).get("reason") or ""
                    if reason in ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"):
                        return False, f"{reason}: {(state.get('waiting') or {}).get('message', '')}".strip()
                    if "running" in state or "terminated" in state or reason == "CreateContainerError":
                        return True, "a probe pod started it"
        return False, "the probe pod's watch ended"
    finally:
        try:
            await kube.call(kube.core.delete_namespaced_pod, name, namespace, grace_period_seconds=0,
                            what=What("delete", "pods", namespace, name))
        except (NotFound, Forbidden):
            pass  # a user who may create but not delete pods: it ran `true` and stays Completed


def agent_image(kube: Kube, namespace: str, settings: Settings) -> Check:
    async def check() -> Outcome:
        image, pull = settings.agent.image, settings.agent.image_pull_policy
        fix = (f"make {image} available to the nodes (push it to a registry they pull from, or on a local "
               f"cluster import it: ctr -n k8s.io images import agent.tar), or pick another with "
               f"--agent-image REF / TPENV_AGENT_IMAGE / agent: {{image: REF}}")
        try:
            nodes = (await kube.call(kube.core.list_node, what=What("list", "nodes")))["items"]
        except Forbidden:
            nodes = []
        if _node_has(nodes, image):
            return Outcome(OK, f"{image} is on the nodes (imagePullPolicy {pull})")
        # Not listed is no proof: a node reports its images with a lag (an image imported a
        # moment ago is missing from its status for up to a minute), so the probe pod decides.
        try:
            ok, how = await _probe_pod(kube, namespace, image, pull)
        except Forbidden:
            return Outcome(WARN, f"{image}: not listed on the nodes, and you may not create a probe pod in "
                                 f"{namespace!r} to try it", fix=fix)
        if ok:
            return Outcome(OK, f"{image} (imagePullPolicy {pull}): {how}")
        return Outcome(FAIL, f"{image} (imagePullPolicy {pull}) cannot be had: {how}", fix=fix)
    return check


# Interfaces a cluster node itself routes its pods through: their routes are the cluster's, not a conflict.
_CLUSTER_IFACES = ("cni", "flannel", "veth", "cali", "cilium", "tunl", "vxlan", "kube", "weave", "lxc")
_RTF_REJECT = 0x0200


def local_routes(text: str | None = None) -> list[tuple[ipaddress.IPv4Network, str]]:
    """(network, interface) of this machine's IPv4 routes (``text``: /proc/net/route's, read when
    not given), minus the default route, reject (unreachable) routes and routes over a cluster
    node's own pod interfaces."""
    out: list[tuple[ipaddress.IPv4Network, str]] = []
    if text is None:
        try:
            text = open("/proc/net/route").read()
        except OSError:
            return out
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        iface, dest, flags, mask = f[0], int(f[1], 16), int(f[3], 16), int(f[7], 16)
        if mask == 0 or flags & _RTF_REJECT or iface.startswith(_CLUSTER_IFACES):
            continue
        net = ipaddress.IPv4Network((socket.ntohl(dest), bin(mask).count("1")), strict=False)
        out.append((net, iface))
    return out


def cidr_overlap(kube: Kube) -> Check:
    async def check() -> Outcome:
        ranges: list[str] = []
        try:
            nodes = (await kube.call(kube.core.list_node, what=What("list", "nodes")))["items"]
            ranges += [c for n in nodes for c in (n.get("spec") or {}).get("podCIDRs") or []]
        except Forbidden:
            pass
        try:
            cidrs = await kube.call(ApiGroup(kube.api, "/apis/networking.k8s.io/v1").list_servicecidr,
                                    what=What("list", "servicecidrs"))
            ranges += [c for s in cidrs.get("items") or [] for c in (s.get("spec") or {}).get("cidrs") or []]
        except TpenvError:
            pass
        nets = [ipaddress.ip_network(r, strict=False) for r in ranges]
        nets = [n for n in nets if n.version == 4]
        if not nets:
            return Outcome(SKIP, "the cluster's pod and service ranges are not readable (nodes, servicecidrs)")
        routes = local_routes()
        clashes = [f"{n} overlaps {net} (dev {iface})" for n in nets for net, iface in routes if n.overlaps(net)]
        if clashes:
            return Outcome(WARN, "cluster ranges overlap this machine's routes: " + "; ".join(clashes) +
                                 " (tpenv connect cannot reach those cluster addresses)",
                           fix="connect from a network without that route, or ask for the cluster's ranges to move")
        return Outcome(OK, f"{', '.join(map(str, nets))}: no local route overlaps")
    return check


def cluster_checks(kube: Kube, namespace: str, settings: Settings) -> list[tuple[str, Check]]:
    return [("cluster/rights", rights(kube, namespace)), ("cluster/cidrs", cidr_overlap(kube)),
            ("cluster/agent-image", agent_image(kube, namespace, settings)),
            ("cluster/manager", manager(kube)), ("cluster/webhook", webhook(kube, namespace, settings))]
