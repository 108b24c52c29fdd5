"""Doctor's checks of the manager and its webhook: the Deployment's pods, the webhook's configuration
and certificates, the namespaces it selects, opted-in pods (by tpenv's label or Telepresence's
annotation) that came up without the agent, with the webhook's reason, or without Secret
tpenv-auth; and the same two checks, quick, for `tpenv status` (manager_warnings).

The webhook is exercised with a server-side dry-run of a pod that opts in: the API server calls
the webhook, which patches the pod, and nothing is stored.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from typing import Any

from tpenv.engine.doctor import FAIL, OK, SKIP, WARN, Check, Outcome
from tpenv.engine.teammode import NAMESPACE as MANAGER_NS
from tpenv.errors import Forbidden, NotFound
from tpenv.kits.kube import Kube, What, wrap_api_error
from tpenv.engine.injection import runs_agent
from tpenv_agent.inject import LABEL_INJECT
from tpenv_agent.inpod import opted_in
from tpenv_agent.webhook import ANN_NOT_INJECTED
from tpenv.settings import Settings

MANAGER = "tpenv-manager"
WEBHOOK = "tpenv-agent-injector"
TLS_SECRET = "tpenv-manager-tls"
CERT_WARN_BEFORE = dt.timedelta(days=30)


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
    injected = runs_agent(pod)
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
        # Pods that opted in (either way) but came up without the agent: refused, or the webhook
        # was not reached when they were made.
        selected = _selected(config)
        optins = await _opted_in_pods(kube, namespace, selected)
        without = [p for p in optins if not p["metadata"].get("deletionTimestamp") and not runs_agent(p)]
        missed = [_missed(p) for p in without]
        gone = await _auth_missing(kube, optins)
        if namespace in (MANAGER_NS, "kube-system"):
            return Outcome(SKIP, f"namespace {namespace!r} is never injected; certificate valid until "
                                 f"{expiry:%Y-%m-%d}")
        if selected is not None and namespace not in selected:
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
            # A refused pod would be refused again: its reason says what to change. One the webhook
            # never saw gets the agent when its workload makes it again.
            unreached = [p for p in without if not (p["metadata"].get("annotations") or {}).get(ANN_NOT_INJECTED)]
            fix = fix or (_delete_fix(unreached[:5]) if unreached else
                          "change what the reason names in the pod template, or drop its opt-in to the webhook")
        if gone:
            notes.append(f"Secret tpenv-auth is missing in {', '.join(gone)}, where pods run the agent: new SSH "
                         "sessions to them fail (the manager makes it again at the next injection)")
            fix = fix or _restart_fix(optins, gone)
        detail = (f"{'dry-run injection works' if injected else 'reachability not tried (no right to create pods)'}; "
                  f"certificate valid until {expiry:%Y-%m-%d}")
        return Outcome(WARN if notes else OK, detail + ("; " + "; ".join(notes) if notes else ""), fix=fix)
    return check


def _selected(config: dict[str, Any]) -> list[str] | None:
    """The namespaces the webhook configuration sends to the manager (namespaceSelector ``In``);
    [] with no entry; None for an install from before explicit selection (every namespace but an
    exclusion list), which `tpenv manager upgrade` turns into a selection."""
    hooks = config.get("webhooks") or []
    for hook in hooks:
        for expr in (hook.get("namespaceSelector") or {}).get("matchExpressions") or []:
            if expr.get("key") == "kubernetes.io/metadata.name" and expr.get("operator") == "In":
                return list(expr.get("values") or [])
    return None if hooks else []


STATUS_TIMEOUT = 10.0  # `tpenv status` must stay quick when the cluster is slow or unreachable


async def manager_warnings(kube: Kube, namespace: str, settings: Settings) -> list[Any]:
    """What `tpenv status` shows about the manager and its webhook: the doctor's two checks,
    only when they warn or fail (a cluster without the manager shows nothing)."""
    from tpenv.engine.doctor import run_checks

    found = await run_checks([("cluster/manager", manager(kube)), ("cluster/webhook", webhook(kube, namespace, settings))],
                             timeout=STATUS_TIMEOUT)
    return [f for f in found if f.status in (WARN, FAIL)]


async def _opted_in_pods(kube: Kube, namespace: str, selected: list[str] | None) -> list[dict[str, Any]]:
    """Pods that opted in to the webhook, by tpenv's label or by Telepresence's annotation, in the
    namespaces the webhook serves and the current one.

    The API selects on labels only, so the annotation is found by listing those namespaces' pods
    and asking ``opted_in``, the webhook's own test. Not by having the webhook label the pods it
    refuses: a pod it never saw (manager down, ``failurePolicy: Ignore``) would carry no such
    label, and that pod is what this check is for. The selection is a short explicit list, so the
    listing stays bounded; an install from before explicit selection (None: nearly every
    namespace) is searched cluster-wide by the label, plus the current namespace in full.
    """
    found: dict[str, dict[str, Any]] = {}
    if selected is None:
        try:
            labelled = await kube.call(kube.core.list_pod_for_all_namespaces, label_selector=f"{LABEL_INJECT}=enabled",
                                       what=What("list", "pods"))
            found.update((p["metadata"]["uid"], p) for p in labelled["items"])
        except Forbidden:
            pass
    for ns in sorted({*(selected or []), namespace}):
        try:
            pods = (await kube.call(kube.core.list_namespaced_pod, ns, what=What("list", "pods", ns)))["items"]
        except (Forbidden, NotFound):
            continue  # not ours to read, or deleted since it was selected: nothing to say there
        found.update((p["metadata"]["uid"], p) for p in pods if opted_in(p))
    return list(found.values())


def _missed(pod: dict[str, Any]) -> str:
    """``ns/name``, with the webhook's reason when it gave one (the pod annotation)."""
    why = (pod["metadata"].get("annotations") or {}).get(ANN_NOT_INJECTED)
    where = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
    return f"{where} ({why})" if why else f"{where} (the webhook was not reached)"


def _delete_fix(pods: list[dict[str, Any]]) -> str:
    """Delete the pods, per namespace: their workloads make them again, through the webhook."""
    by_ns: dict[str, list[str]] = {}
    for p in pods:
        by_ns.setdefault(p["metadata"]["namespace"], []).append(p["metadata"]["name"])
    return " && ".join(f"kubectl -n {ns} delete pod {' '.join(names)}" for ns, names in sorted(by_ns.items())) \
        + " (their workloads recreate them, injected)"


def _workload(pod: dict[str, Any]) -> str | None:
    """``deployment/NAME`` or ``statefulset/NAME`` that runs the pod (a ReplicaSet's name is its
    Deployment's plus the pod-template-hash), or None for a bare pod."""
    ctrl = next((o for o in pod["metadata"].get("ownerReferences") or [] if o.get("controller")), None)
    if ctrl is None:
        return None
    hash_ = (pod["metadata"].get("labels") or {}).get("pod-template-hash")
    if ctrl["kind"] == "ReplicaSet" and hash_ and ctrl["name"].endswith(f"-{hash_}"):
        return f"deployment/{ctrl['name'][: -len(hash_) - 1]}"
    return f"{ctrl['kind'].lower()}/{ctrl['name']}"


def _restart_fix(pods: list[dict[str, Any]], namespaces: list[str]) -> str:
    """Restart the workloads of the injected pods in ``namespaces``: the next injection makes the
    Secret again (by name, since pods opted in by annotation carry no label to select on)."""
    out = []
    for ns in namespaces:
        names = sorted({w for p in pods if p["metadata"]["namespace"] == ns and runs_agent(p) and (w := _workload(p))})
        if names:
            out.append(f"kubectl -n {ns} rollout restart {' '.join(names)}")
    return " && ".join(out) or "delete the pods that run the agent; their workloads recreate them"


async def _auth_missing(kube: Kube, pods: list[dict[str, Any]]) -> list[str]:
    """Namespaces where an opted-in pod runs the agent but Secret tpenv-auth is gone."""
    out = []
    for ns in sorted({p["metadata"]["namespace"] for p in pods
                      if runs_agent(p)}):
        try:
            await kube.call(kube.core.read_namespaced_secret, "tpenv-auth", ns, what=What("get", "secrets", ns))
        except NotFound:
            out.append(ns)
        except Forbidden:
            continue
    return out
