"""Doctor's cluster/webhook check, and so `tpenv status`'s warnings, on pods that opted in but run
without the agent (issue 17): found whichever way they opted in (tpenv's label, Telepresence's
annotation under either domain), named with the webhook's reason, and given a fix that fits
(a refused pod is not fixed by deleting it). A stand-in for the API answers the calls the check
makes; the real cluster is tests/e2e/test_webhook_gitops.py's job."""
from __future__ import annotations

import base64
import datetime as dt
import json
from types import SimpleNamespace
from typing import Any

from tpenv.engine.doctor.webhook import manager_warnings, webhook
from tpenv.errors import Forbidden, NotFound
from tpenv.settings import Settings

NS = "shop"
UDP_REASON = ("container 'dns' has no TCP port to give the agent (its ports: 5353/UDP); the agent carries "
              "TCP only; list ports in tpenv.io/inject-ports")


def certificate() -> str:
    """A self-signed PEM valid for a year, base64 as the API returns Secret data and caBundle."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tpenv-manager.tpenv.svc")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=365))
            .sign(key, hashes.SHA256()))
    return base64.b64encode(cert.public_bytes(serialization.Encoding.PEM)).decode()


def pod(name: str, *, ns: str = NS, labels: dict | None = None, annotations: dict | None = None,
        agent: bool = False, owner: str | None = None) -> dict[str, Any]:
    containers = [{"name": "app"}] + ([{"name": "tpenv-agent"}] if agent else [])
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}",
                            "labels": {**(labels or {}), **({"pod-template-hash": "7d9f"} if owner else {})},
                            "annotations": annotations or {}}
    if owner:
        meta["ownerReferences"] = [{"kind": "ReplicaSet", "name": f"{owner}-7d9f", "controller": True}]
    return {"metadata": meta, "spec": {"containers": containers}}


class FakeKube:
    """The API as the check sees it: a manager, its webhook selecting ``selected``, pods per namespace.
    ``forbidden`` namespaces refuse a pod list; ``secrets`` are the namespaces with tpenv-auth."""

    def __init__(self, pods: list[dict], *, selected: list[str] | None = None, forbidden: set[str] = frozenset(),
                 secrets: set[str] = frozenset({NS})) -> None:
        self.pods, self.forbidden, self.secrets = pods, forbidden, secrets
        self.selected = [NS] if selected is None else selected
        self.listed: list[tuple[str | None, str | None]] = []  # (namespace, label selector) per list call
        self.cert = certificate()
        self.core = self.apps = self.admission = self

    def __getattr__(self, method: str):  # the API method handed to call(): call() dispatches on its name
        def fn(*a: Any, **kw: Any) -> Any:
            return self.answer(method, *a, **kw)
        fn.__name__ = method
        return fn

    async def call(self, fn: Any, *args: Any, what: Any, **kw: Any) -> Any:
        return fn(*args, **kw)

    def answer(self, method: str, *args: Any, **kw: Any) -> Any:
        if method == "read_namespaced_deployment":
            return {"spec": {"replicas": 1, "template": {"spec": {"containers": [{"image": "tpenv/agent:x"}]}}},
                    "status": {"readyReplicas": 1}}
        if method == "read_mutating_webhook_configuration":
            return {"webhooks": [{"clientConfig": {"caBundle": self.cert}, "namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": self.selected}]}}]}
        if method == "read_namespaced_secret":
            name, ns = args
            if name == "tpenv-manager-tls":
                return {"data": {"tls.crt": self.cert}}
            if ns in self.secrets:
                return {}
            raise NotFound(f"secret {name} in {ns}")
        if method == "list_namespaced_pod":
            (ns,) = args
            self.listed.append((ns, kw.get("label_selector")))
            if ns in self.forbidden:
                raise Forbidden(f"list pods in {ns}")
            return {"items": [p for p in self.pods if p["metadata"]["namespace"] == ns]}
        if method == "list_pod_for_all_namespaces":
            self.listed.append((None, kw.get("label_selector")))
            key, _, value = kw["label_selector"].partition("=")
            return {"items": [p for p in self.pods if p["metadata"]["labels"].get(key) == value]}
        if method == "create_namespaced_pod":  # the dry-run round trip: the webhook injects
            body = {"spec": {"containers": [{"name": "app"}, {"name": "tpenv-agent"}]}}
            return SimpleNamespace(data=json.dumps(body), headers={})
        raise AssertionError(f"unexpected API call {method}")


async def test_pods_opted_in_by_telepresences_annotation_are_listed_with_the_reason():
    kube = FakeKube([
        pod("dns-1", annotations={"telepresence.getambassador.io/inject-traffic-agent": "enabled",
                                  "tpenv.io/not-injected": UDP_REASON}, owner="dns"),
        pod("old-1", annotations={"telepresence.io/inject-traffic-agent": "enabled"}),
        pod("labelled-1", labels={"tpenv.io/inject-agent": "enabled"}),
        pod("fine-1", annotations={"telepresence.getambassador.io/inject-traffic-agent": "enabled"}, agent=True),
        pod("plain-1"),
        pod("off-1", annotations={"telepresence.getambassador.io/inject-traffic-agent": "disabled"}),
    ])
    # Stage 1: the check warns, naming each opted-in pod without the agent, and only those.
    out = await webhook(kube, NS, Settings())()
    assert out.status == "warn", out
    assert "3 opted-in pod(s) started without the agent" in out.detail, out.detail
    assert f"{NS}/dns-1 ({UDP_REASON})" in out.detail
    assert f"{NS}/old-1 (the webhook was not reached)" in out.detail
    assert f"{NS}/labelled-1 (the webhook was not reached)" in out.detail
    for name in ("fine-1", "plain-1", "off-1"):
        assert name not in out.detail, out.detail
    # Stage 2: the fix deletes only the pods the webhook never saw (the refused one would be refused again).
    assert out.fix == f"kubectl -n {NS} delete pod old-1 labelled-1 (their workloads recreate them, injected)", out.fix
    # Stage 3: found by listing the namespace (an annotation cannot be selected on), not by a label selector.
    assert (NS, None) in kube.listed


async def test_only_refused_pods_get_a_fix_that_is_not_a_delete():
    kube = FakeKube([pod("dns-1", annotations={"telepresence.getambassador.io/inject-traffic-agent": "enabled",
                                               "tpenv.io/not-injected": UDP_REASON})])
    out = await webhook(kube, NS, Settings())()
    assert out.status == "warn" and UDP_REASON in out.detail
    assert "delete" not in out.fix and "pod template" in out.fix, out.fix


async def test_status_shows_the_same_warning():
    kube = FakeKube([pod("dns-1", annotations={"telepresence.getambassador.io/inject-traffic-agent": "enabled",
                                               "tpenv.io/not-injected": UDP_REASON})])
    (finding,) = await manager_warnings(kube, NS, Settings())
    assert finding.name == "cluster/webhook" and f"{NS}/dns-1 ({UDP_REASON})" in finding.detail


async def test_selected_namespaces_are_searched_and_a_forbidden_one_is_skipped():
    kube = FakeKube([pod("a-1", ns="web", annotations={"telepresence.io/inject-traffic-agent": "enabled"}),
                     pod("b-1", ns="secret", annotations={"telepresence.io/inject-traffic-agent": "enabled"})],
                    selected=[NS, "web", "secret"], forbidden={"secret"})
    out = await webhook(kube, NS, Settings())()
    assert "web/a-1 (the webhook was not reached)" in out.detail and "b-1" not in out.detail, out.detail
    assert {ns for ns, _ in kube.listed} == {NS, "web", "secret"}


async def test_secret_missing_under_annotated_agents_names_their_workload():
    # tpenv-auth deleted where a pod opted in by annotation runs the agent: the fix restarts that
    # workload by name (a label selector would miss it), the Deployment named from its ReplicaSet.
    kube = FakeKube([pod("web-7d9f-x", annotations={"telepresence.io/inject-traffic-agent": "enabled"},
                         agent=True, owner="web")], secrets=set())
    out = await webhook(kube, NS, Settings())()
    assert f"Secret tpenv-auth is missing in {NS}" in out.detail, out.detail
    assert out.fix == f"kubectl -n {NS} rollout restart deployment/web", out.fix


async def test_an_install_without_explicit_selection_is_searched_by_label_and_the_current_namespace():
    kube = FakeKube([pod("labelled-1", ns="web", labels={"tpenv.io/inject-agent": "enabled"}),
                     pod("tp-1", annotations={"telepresence.io/inject-traffic-agent": "enabled"})])
    kube.answer_config = kube.answer
    old = {"webhooks": [{"clientConfig": {"caBundle": kube.cert}, "namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["tpenv", "kube-system"]}]}}]}
    kube.answer = lambda method, *a, **kw: old if method == "read_mutating_webhook_configuration" \
        else kube.answer_config(method, *a, **kw)
    out = await webhook(kube, NS, Settings())()
    assert "web/labelled-1" in out.detail and f"{NS}/tp-1" in out.detail, out.detail
    assert (None, "tpenv.io/inject-agent=enabled") in kube.listed and (NS, None) in kube.listed
