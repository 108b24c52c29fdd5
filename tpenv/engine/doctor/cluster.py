"""Doctor's checks of the cluster: the API server, the current user's rights, the agent image,
and the manager with its webhook.

Rights are asked with SelfSubjectAccessReview, one per (verb, resource) tpenv uses, so the
answer is the API server's own RBAC decision for exactly this user (impersonation and
ServiceAccount tokens included). The agent image is looked up in the nodes' image lists first;
when it is not listed (the kubelet reports at most 50 images per node) a short-lived probe pod
with that image says for real whether it can be pulled. The webhook is exercised with a
server-side dry-run of a pod that opts in: the API server calls the webhook, which patches the
pod, and nothing is stored.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import secrets
import socket
from typing import Any

from tpenv.engine.doctor import FAIL, OK, SKIP, WARN, Check, Outcome
from tpenv.engine.teammode import NAMESPACE as MANAGER_NS
from tpenv.errors import Forbidden, NotFound, TpenvError
from tpenv.kits.kube import Kube, What, pod_is_ready, wrap_api_error
from tpenv.kits.kuberest import ApiGroup
from tpenv_agent.inject import AGENT_CONTAINER, LABEL_INJECT
from tpenv.settings import Settings

MANAGER = "tpenv-manager"
WEBHOOK = "tpenv-agent-injector"
TLS_SECRET = "tpenv-manager-tls"
CERT_WARN_BEFORE = dt.timedelta(days=30)
# (verb, group, resource, subresource, why): every right `tpenv intercept`/`up` uses in the
# workload's namespace. tpenv never execs into pods, so pods/exec is not asked.
RIGHTS = (
    ("get", "", "pods", "", "see the workload's pods"),
    ("watch", "", "pods", "", "follow pod restarts"),
    ("create", "", "pods", "portforward", "reach the agent (its SSH listens on the pod's loopback)"),
    ("list", "", "services", "", "find the Service of the workload"),
    ("update", "", "services", "", "point a numeric targetPort at the agent"),
    ("get", "", "secrets", "", "read the agent's auth Secret tpenv-auth"),
    ("create", "", "secrets", "", "create tpenv-auth on first use"),
    ("update", "apps", "deployments", "", "inject the agent (patch mode)"),
    ("update", "apps", "statefulsets", "", "inject the agent into StatefulSets"),
    ("list", "apps", "replicasets", "", "find a workload's pods and old revisions"),
)


def _authz(kube: Kube) -> ApiGroup:
    return ApiGroup(kube.api, "/apis/authorization.k8s.io/v1")


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


async def whoami(kube: Kube) -> str | None:
    """The user name the API server sees (SelfSubjectReview), or None where it is not served."""
    try:
        review = await kube.call(ApiGroup(kube.api, "/apis/authentication.k8s.io/v1").create_self_subject_review,
                                 {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
                                 what=What("create", "selfsubjectreviews"))
    except TpenvError:
        return None
    return ((review.get("status") or {}).get("userInfo") or {}).get("username")


async def can_i(kube: Kube, namespace: str, verb: str, group: str, resource: str, sub: str = "") -> bool:
    attrs = {"namespace": namespace, "verb": verb, "group": group, "resource": resource}
    if sub:
        attrs["subresource"] = sub
    review = await kube.call(_authz(kube).create_self_subject_access_review,
                             {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                              "spec": {"resourceAttributes": attrs}},
                             what=What("create", "selfsubjectaccessreviews"))
    return bool((review.get("status") or {}).get("allowed"))


def _subject_flag(user: str | None) -> str:
    if user and user.startswith("system:serviceaccount:"):
        _, _, ns, name = user.split(":", 3)
        return f"--serviceaccount={ns}:{name}"
    return f"--user={user or 'YOUR-USER'}"


def rights(kube: Kube, namespace: str) -> Check:
    async def check() -> Outcome:
        answers = await asyncio.gather(*(can_i(kube, namespace, v, g, r, s) for v, g, r, s, _ in RIGHTS))
        missing = [(v, g, r, s, why) for (v, g, r, s, why), ok in zip(RIGHTS, answers) if not ok]
        if not missing:
            return Outcome(OK, f"{len(RIGHTS)} rights in namespace {namespace!r}: "
                               + ", ".join(f"{v} {r}{'/' + s if s else ''}" for v, _, r, s, _ in RIGHTS))
        user = await whoami(kube)
        lines = [f"{v} {r}{'/' + s if s else ''} ({why})" for v, _, r, s, why in missing]
        verbs = sorted({v for v, *_ in missing})
        resources = sorted({(f"{r}.{g}" if g else r) + (f"/{s}" if s else "") for _, g, r, s, _ in missing})
        fix = (f"kubectl create role tpenv-user -n {namespace} --verb={','.join(verbs)} "
               f"--resource={','.join(resources)} && kubectl create rolebinding tpenv-user -n {namespace} "
               f"--role=tpenv-user {_subject_flag(user)}   (run by a cluster admin)")
        return Outcome(FAIL, f"{user or 'you'} may not, in namespace {namespace!r}: " + "; ".join(lines), fix=fix)
    return check


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


async def _manager_deployment(kube: Kube) -> dict[str, Any] | None:
    try:
        return await kube.call(kube.apps.read_namespaced_deployment, MANAGER, MANAGER_NS,
                               what=What("get", "deployments", MANAGER_NS, MANAGER))
    except NotFound:
        return None


def manager(kube: Kube) -> Check:
    async def check() -> Outcome:
        try:
            dep = await _manager_deployment(kube)
        except Forbidden:
            return Outcome(SKIP, f"you may not read deployment/{MANAGER} in {MANAGER_NS!r}")
        if dep is None:
            return Outcome(SKIP, "not installed (optional: webhook injection and the outbound relay need it; "
                                 "`tpenv manager install`)")
        want = (dep.get("spec") or {}).get("replicas", 1)
        ready = (dep.get("status") or {}).get("readyReplicas") or 0
        if want == 0:
            return Outcome(FAIL, f"deployment/{MANAGER} in {MANAGER_NS!r} is scaled to 0: no webhook injection, "
                                 "no relay", fix=f"kubectl -n {MANAGER_NS} scale deployment/{MANAGER} --replicas=1")
        if ready < 1:
            pods = (await kube.call(kube.core.list_namespaced_pod, MANAGER_NS,
                                    label_selector="app.kubernetes.io/name=tpenv-manager",
                                    what=What("list", "pods", MANAGER_NS)))["items"]
            why = _pod_trouble(pods)
            return Outcome(FAIL, f"deployment/{MANAGER}: 0 of {want} pods ready ({why})",
                           fix=f"kubectl -n {MANAGER_NS} describe pods -l app.kubernetes.io/name=tpenv-manager; "
                               f"then kubectl -n {MANAGER_NS} rollout restart deployment/{MANAGER}")
        image = dep["spec"]["template"]["spec"]["containers"][0].get("image")
        return Outcome(OK, f"deployment/{MANAGER}: {ready}/{want} ready, image {image}")
    return check


def _pod_trouble(pods: list[dict[str, Any]]) -> str:
    for p in pods:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason"):
                return f"{p['metadata']['name']}: {waiting['reason']}"
    return "no pod" if not pods else "not ready"


def _cert_expiry(pem_b64: str) -> dt.datetime | None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(base64.b64decode(pem_b64))
    except ValueError:
        return None
    return cert.not_valid_after_utc


def _dry_run_pod(namespace: str, image: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "tpenv-doctor-webhook-probe", "labels": {LABEL_INJECT: "enabled"}},
            "spec": {"containers": [{"name": "app", "image": image,
                                     "ports": [{"name": "http", "containerPort": 8080}]}]}}


async def _webhook_round_trip(kube: Kube, namespace: str, image: str) -> tuple[bool, str]:
    """A server-side dry-run create of a pod that opts in: (the webhook patched it, its warnings)."""
    def call() -> tuple[dict[str, Any], str]:
        try:
            resp = kube.core.create_namespaced_pod(namespace, _dry_run_pod(namespace, image), dry_run="All",
                                                   _request_timeout=(10, 30))
        except Exception as e:  # noqa: BLE001 - wrapped below
            wrapped = wrap_api_error(e, What("create", "pods", namespace))
            raise wrapped from e
        return json.loads(resp.data), resp.headers.get("Warning", "")
    pod, warning = await asyncio.to_thread(call)
    injected = any(c.get("name") == AGENT_CONTAINER for c in pod["spec"].get("containers") or [])
    return injected, warning


def webhook(kube: Kube, namespace: str, settings: Settings) -> Check:
    async def check() -> Outcome:
        try:
            if await _manager_deployment(kube) is None:
                return Outcome(SKIP, "no manager, no webhook")
        except Forbidden:
            return Outcome(SKIP, f"you may not read deployment/{MANAGER} in {MANAGER_NS!r}")
        try:
            config = await kube.call(kube.admission.read_mutating_webhook_configuration, WEBHOOK,
                                     what=What("get", "mutatingwebhookconfigurations", None, WEBHOOK))
        except NotFound:
            return Outcome(FAIL, f"the manager is installed but MutatingWebhookConfiguration {WEBHOOK} is missing",
                           fix="tpenv manager upgrade")
        notes, fix = [], None
        ca = ((config.get("webhooks") or [{}])[0].get("clientConfig") or {}).get("caBundle")
        expiry = _cert_expiry(ca) if ca else None
        now = dt.datetime.now(dt.timezone.utc)
        try:
            tls = await kube.call(kube.core.read_namespaced_secret, TLS_SECRET, MANAGER_NS,
                                  what=What("get", "secrets", MANAGER_NS, TLS_SECRET))
            serving = _cert_expiry((tls.get("data") or {}).get("tls.crt", ""))
            expiry = min(e for e in (expiry, serving) if e) if (expiry or serving) else None
        except (NotFound, Forbidden):
            pass
        if expiry is None:
            return Outcome(FAIL, "the webhook's certificate cannot be read (caBundle missing or not PEM)",
                           fix="tpenv manager upgrade")
        if expiry <= now:
            return Outcome(FAIL, f"the webhook's certificate expired on {expiry:%Y-%m-%d}", fix="tpenv manager upgrade")
        if expiry - now < CERT_WARN_BEFORE:
            notes.append(f"certificate expires {expiry:%Y-%m-%d %H:%M:%S} UTC (the manager renews it itself two "
                         "thirds into its lifetime; if it does not, see its log)")
            fix = f"kubectl -n {MANAGER_NS} logs deployment/{MANAGER} | grep tls/rotate; or tpenv manager upgrade"
        # Pods that opted in but came up without the agent: the webhook was not reached when they were made.
        try:
            optins = (await kube.call(kube.core.list_pod_for_all_namespaces, label_selector=f"{LABEL_INJECT}=enabled",
                                      what=What("list", "pods")))["items"]
        except Forbidden:
            optins = (await kube.call(kube.core.list_namespaced_pod, namespace,
                                      label_selector=f"{LABEL_INJECT}=enabled",
                                      what=What("list", "pods", namespace)))["items"]
        missed = [_missed(p) for p in optins if not p["metadata"].get("deletionTimestamp")
                  and not any(c.get("name") == AGENT_CONTAINER for c in p["spec"].get("containers") or [])]
        gone = await _auth_missing(kube, optins)
        if namespace in (MANAGER_NS, "kube-system"):
            return Outcome(SKIP, f"namespace {namespace!r} is never injected; certificate valid until "
                                 f"{expiry:%Y-%m-%d}")
        selected = _selected(config)
        if namespace not in selected:
            return Outcome(WARN, f"namespace {namespace!r} is not selected for injection (selected: "
                                 f"{', '.join(selected) or 'none'}): its pods never get the agent from the webhook"
                                 + ("; " + "; ".join(notes) if notes else ""),
                           fix=f"tpenv manager upgrade --webhook-namespace {namespace}"
                               + "".join(f" --webhook-namespace {n}" for n in selected))
        try:
            injected, warning = await _webhook_round_trip(kube, namespace, settings.agent.image)
        except Forbidden:
            injected, warning = None, ""
        if injected is False:
            why = (f" (it said: {warning})" if warning
                   else " (it did not answer: failurePolicy Ignore let the pod through)")
            started = (f"; {len(missed)} opted-in pod(s) started without the agent: " + ", ".join(missed[:5])
                       if missed else "")
            return Outcome(FAIL, f"the webhook did not inject a dry-run pod in {namespace!r}{why}{started}",
                           fix=f"kubectl -n {MANAGER_NS} get pods,endpointslices; kubectl -n {MANAGER_NS} logs "
                               f"deployment/{MANAGER}; then kubectl -n {MANAGER_NS} rollout restart "
                               f"deployment/{MANAGER}")
        if missed:
            notes.append(f"{len(missed)} opted-in pod(s) started without the agent: " + ", ".join(missed[:5]))
            names = [m.split(" ", 1)[0] for m in missed[:5]]
            fix = fix or "kubectl delete pod " + " ".join(names) + " (their workload recreates them, injected)"
        if gone:
            notes.append(f"Secret tpenv-auth is missing in {', '.join(gone)}, where pods run the agent: new SSH "
                         "sessions to them fail (the manager makes it again at the next injection)")
            fix = fix or " && ".join(f"kubectl -n {ns} rollout restart deployment -l {LABEL_INJECT}=enabled"
                                     for ns in gone)
        detail = (f"{'dry-run injection works' if injected else 'reachability not tried (no right to create pods)'}; "
                  f"certificate valid until {expiry:%Y-%m-%d}")
        return Outcome(WARN if notes else OK, detail + ("; " + "; ".join(notes) if notes else ""), fix=fix)
    return check


def _selected(config: dict[str, Any]) -> list[str]:
    """The namespaces the webhook configuration sends to the manager (namespaceSelector ``In``)."""
    for hook in config.get("webhooks") or []:
        for expr in (hook.get("namespaceSelector") or {}).get("matchExpressions") or []:
            if expr.get("key") == "kubernetes.io/metadata.name" and expr.get("operator") == "In":
                return list(expr.get("values") or [])
    return []


STATUS_TIMEOUT = 10.0  # `tpenv status` must stay quick when the cluster is slow or unreachable


async def manager_warnings(kube: Kube, namespace: str, settings: Settings) -> list[Any]:
    """What `tpenv status` shows about the manager and its webhook: the doctor's two checks,
    only when they warn or fail (a cluster without the manager shows nothing)."""
    from tpenv.engine.doctor import run_checks

    found = await run_checks([("cluster/manager", manager(kube)), ("cluster/webhook", webhook(kube, namespace, settings))],
                             timeout=STATUS_TIMEOUT)
    return [f for f in found if f.status in (WARN, FAIL)]


def _missed(pod: dict[str, Any]) -> str:
    """``ns/name``, with the webhook's reason when it gave one (the pod annotation)."""
    why = (pod["metadata"].get("annotations") or {}).get("tpenv.io/not-injected")
    where = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
    return f"{where} ({why})" if why else f"{where} (the webhook was not reached)"


async def _auth_missing(kube: Kube, pods: list[dict[str, Any]]) -> list[str]:
    """Namespaces where an opted-in pod runs the agent but Secret tpenv-auth is gone."""
    out = []
    for ns in sorted({p["metadata"]["namespace"] for p in pods
                      if any(c.get("name") == AGENT_CONTAINER for c in p["spec"].get("containers") or [])}):
        try:
            await kube.call(kube.core.read_namespaced_secret, "tpenv-auth", ns, what=What("get", "secrets", ns))
        except NotFound:
            out.append(ns)
        except Forbidden:
            continue
    return out


# Interfaces a cluster node itself routes its pods through: their routes are the cluster's, not a conflict.
_CLUSTER_IFACES = ("cni", "flannel", "veth", "cali", "cilium", "tunl", "vxlan", "kube", "weave", "lxc")
_RTF_REJECT = 0x0200


def local_routes() -> list[tuple[ipaddress.IPv4Network, str]]:
    """(network, interface) of this machine's IPv4 routes, minus the default route, reject
    (unreachable) routes and routes over a cluster node's own pod interfaces."""
    out = []
    try:
        lines = open("/proc/net/route").read().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
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
