"""The optional in-cluster manager: render its manifests, install, upgrade and uninstall them.

    render_manager(settings, *, team_mode, tls=None) -> [manifest dicts]     pure
    await install(kube, settings, *, team_mode)      create-or-replace every object
    await upgrade(kube, settings, *, team_mode=None) the same on an existing install (keeps team mode)
    await uninstall(kube)                            delete every object, webhook first

Manifests are rendered from ``templates/manager/*.yaml.j2`` and validated in manager_render.py
(re-exported here); nothing formats YAML by hand. Objects are written with server-side apply (field
manager ``tpenv``, forced), which creates or replaces in one call and leaves fields other
controllers own alone.

Ownership (issue 12): every object is annotated ``tpenv.io/install-id`` (one id per install,
kept by upgrades) and ``tpenv.io/ownership``: ``created`` when the install made it, ``adopted``
when it existed before (an admin's own ``tpenv`` namespace, say). ``uninstall`` deletes what it
created and only releases what it adopted (drops its own fields by an empty server-side apply),
so a namespace that was there before, with whatever else lives in it, stays.

The TLS material (CA + serving certificate for ``tpenv-manager.tpenv.svc``, lifetime
``TPENV_MANAGER_CERT_LIFETIME_SECONDS``) is generated with ``cryptography`` at the first install
and reused by later installs and upgrades while it has more than 30 days left, so an upgrade
never races a new caBundle against an old serving pod. Between upgrades the manager renews it
itself, two thirds into its lifetime (tpenv_agent.certrotate).
"""
from __future__ import annotations

import uuid
from typing import Any

# Rendering lives in manager_render.py, the TLS material in manager_tls.py; callers keep finding
# their names here.
from tpenv.engine.manager_render import (AUTH_COMPONENT, MANAGED_BY, RELAY_PORT, TemplateError, manager_values,
                                         render_manager, to_yaml_stream)
from tpenv.engine.manager_tls import CERT_LIFETIME, generate_tls, reusable_tls
from tpenv.engine.teammode import CONFIGMAP, NAMESPACE
from tpenv.errors import Forbidden, NotFound, TpenvError
from tpenv.kits.kube import Kube, What
from tpenv.settings import Settings

TLS_SECRET = "tpenv-manager-tls"
WEBHOOK = "tpenv-agent-injector"
FIELD_MANAGER = "tpenv"
RELAY_CLIENT_ROLE = "tpenv-relay-client"
AUTH_ROLE = "tpenv-manager-auth"  # the per-namespace Role that lets the manager create tpenv-auth


# ---------------------------------------------------------------------------------------------
# applying (Kubernetes API, through tpenv.kits.kube)


# kind -> (the kube kit's API group, the snake_case name in its methods, namespaced)
_KINDS = {
    "Namespace": ("core", "namespace", False),
    "ServiceAccount": ("core", "service_account", True),
    "ClusterRole": ("rbac", "cluster_role", False),
    "ClusterRoleBinding": ("rbac", "cluster_role_binding", False),
    "Role": ("rbac", "role", True),
    "RoleBinding": ("rbac", "role_binding", True),
    "ConfigMap": ("core", "config_map", True),
    "Secret": ("core", "secret", True),
    "Deployment": ("apps", "deployment", True),
    "Service": ("core", "service", True),
    "MutatingWebhookConfiguration": ("admission", "mutating_webhook_configuration", False),
}


def _kinds(kube: Kube) -> dict[str, tuple[Any, Any, Any, bool]]:
    """kind -> (patch, delete, read, namespaced) of the kube kit's API groups.

    The kubernetes client names them ``{verb}_namespaced_{name}`` or ``{verb}_{name}``: the
    table says the group and name once, not three method names a kind."""
    out = {}
    for kind, (group, name, namespaced) in _KINDS.items():
        api, stem = getattr(kube, group), f"namespaced_{name}" if namespaced else name
        out[kind] = (getattr(api, f"patch_{stem}"), getattr(api, f"delete_{stem}"), getattr(api, f"read_{stem}"),
                     namespaced)
    return out


def _ref(doc: dict) -> tuple[str, str, str | None]:
    meta = doc["metadata"]
    return doc["kind"], meta["name"], meta.get("namespace")


async def _read(kube: Kube, kind: str, name: str, namespace: str | None) -> dict | None:
    _, _, read, namespaced = _kinds(kube)[kind]
    args = (name, namespace) if namespaced else (name,)
    try:
        return await kube.call(read, *args, what=What("get", kind.lower() + "s", namespace, name))
    except NotFound:
        return None


async def _apply(kube: Kube, doc: dict) -> None:
    kind, name, namespace = _ref(doc)
    patch, _, _, namespaced = _kinds(kube)[kind]
    args = (name, namespace, doc) if namespaced else (name, doc)
    await kube.call(patch, *args, field_manager=FIELD_MANAGER, force=True,
                    _content_type="application/apply-patch+yaml",
                    what=What("apply", kind.lower() + "s", namespace, name))


async def _current(kube: Kube, namespace: str) -> tuple[dict[str, bytes] | None, bool | None, list[str]]:
    """(reusable TLS material, installed team mode, selected webhook namespaces) of an existing
    install; TLS and team mode None if absent."""
    secret = await _read(kube, "Secret", TLS_SECRET, namespace)
    cm = await _read(kube, "ConfigMap", CONFIGMAP, namespace)
    data = {} if cm is None else (cm.get("data") or {})
    team = None if cm is None else (data.get("team_mode") == "true")
    selected = [n for n in (data.get("webhook_namespaces") or "").split(",") if n]
    return reusable_tls(secret, namespace), team, selected


def _with_namespaces(settings: Settings | dict, selected: list[str]) -> Settings | dict:
    if isinstance(settings, dict):
        return {**settings, "webhook_namespaces": selected}
    copy = settings.model_copy(deep=True)
    copy.manager.webhook_namespaces = selected
    return copy


async def _check_namespaces(kube: Kube, docs: list[dict]) -> None:
    """Refuse, before anything is applied, a selected namespace that does not exist."""
    for doc in docs:
        if doc["kind"] == "Role" and doc["metadata"]["name"] == AUTH_ROLE:
            ns = doc["metadata"]["namespace"]
            if await _read(kube, "Namespace", ns, None) is None:
                raise NotFound(f"--webhook-namespace {ns}: namespace {ns!r} does not exist; nothing was changed",
                               hint=f"create it first (kubectl create namespace {ns}) or leave it out")


async def _auth_objects(kube: Kube, namespace: str = NAMESPACE) -> list[dict]:
    """The per-namespace Roles/RoleBindings of 25-webhook-rbac found in the cluster (any namespace;
    without the right to list them everywhere: those of the namespaces the ConfigMap records)."""
    selector = ",".join(f"{k}={v}" for k, v in {**MANAGED_BY, **AUTH_COMPONENT}.items())
    refs: list[tuple[str, str]] = []
    try:
        for kind, lister in (("Role", kube.rbac.list_role_for_all_namespaces),
                             ("RoleBinding", kube.rbac.list_role_binding_for_all_namespaces)):
            items = (await kube.call(lister, label_selector=selector, what=What("list", kind.lower() + "s")))["items"]
            refs += [(kind, i["metadata"]["namespace"]) for i in items if i["metadata"]["name"] == AUTH_ROLE]
    except Forbidden:
        _, _, selected = await _current(kube, namespace)
        refs = [(kind, ns) for ns in selected for kind in ("Role", "RoleBinding")]
    return [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind,
             "metadata": {"name": AUTH_ROLE, "namespace": ns}} for kind, ns in refs]


async def _delete(kube: Kube, doc: dict) -> str | None:
    """Delete what an install created, release what it adopted; ``kind/name`` when deleted."""
    kind, name, ns = _ref(doc)
    _, delete, _, namespaced = _kinds(kube)[kind]
    args = (name, ns) if namespaced else (name,)
    existing = await _read(kube, kind, name, ns)
    if existing is None:
        return None
    meta = existing.get("metadata") or {}
    ownership = (meta.get("annotations") or {}).get(ANN_OWNERSHIP)
    if ownership == "adopted":
        await _release(kube, doc)
        return None
    if ownership != "created" and (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") != "tpenv":
        return None  # not made by any tpenv install: not ours to delete
    try:
        await kube.call(delete, *args, propagation_policy="Foreground" if kind == "Namespace" else "Background",
                        what=What("delete", kind.lower() + "s", ns, name))
    except NotFound:
        return None
    return f"{kind}/{name}" + (f" -n {ns}" if kind in ("Role", "RoleBinding") and ns != NAMESPACE else "")


async def _prune_auth(kube: Kube, docs: list[dict], namespace: str) -> None:
    """Remove the Secret-creating Role of namespaces no longer selected (an upgrade that drops one)."""
    wanted = {_ref(d) for d in docs}
    for doc in await _auth_objects(kube, namespace):
        if _ref(doc) not in wanted:
            await _delete(kube, doc)


async def _apply_all(kube: Kube, docs: list[dict], namespace: str) -> None:
    await _check_namespaces(kube, docs)
    await _mark_ownership(kube, docs)
    for doc in docs:
        await _apply(kube, doc)
    await _prune_auth(kube, docs, namespace)


ANN_INSTALL_ID = "tpenv.io/install-id"
ANN_OWNERSHIP = "tpenv.io/ownership"  # created | adopted


async def _mark_ownership(kube: Kube, docs: list[dict]) -> None:
    """Annotate each manifest with the install id and whether the install created the object or
    found it there (kept across upgrades: an object once adopted stays adopted)."""
    found = [await _read(kube, *_ref(doc)) for doc in docs]
    ids = [((f.get("metadata") or {}).get("annotations") or {}).get(ANN_INSTALL_ID) for f in found if f]
    install_id = next((i for i in ids if i), None) or uuid.uuid4().hex[:12]
    for doc, existing in zip(docs, found):
        meta = (existing or {}).get("metadata") or {}
        recorded = (meta.get("annotations") or {}).get(ANN_OWNERSHIP)
        if existing is None:
            ownership = "created"
        elif recorded:
            ownership = recorded
        else:  # there before us; an install by a tpenv without this annotation labelled its own
            legacy = (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") == "tpenv"
            ownership = "created" if legacy else "adopted"
        doc["metadata"].setdefault("annotations", {}).update({ANN_INSTALL_ID: install_id, ANN_OWNERSHIP: ownership})


async def install(kube: Kube, settings: Settings | dict, *, team_mode: bool, namespace: str = NAMESPACE) -> list[dict]:
    """Create or replace every object of the manager; returns the manifests applied."""
    tls, _, _ = await _current(kube, namespace)
    docs = render_manager(settings, team_mode=team_mode, tls=tls, namespace=namespace)
    await _apply_all(kube, docs, namespace)
    return docs


async def upgrade(kube: Kube, settings: Settings | dict, *, team_mode: bool | None = None,
                  keep_webhook_namespaces: bool = False, namespace: str = NAMESPACE) -> list[dict]:
    """Re-apply the manager with these settings; team mode stays as installed unless given, and
    the selected webhook namespaces too with ``keep_webhook_namespaces``."""
    tls, installed_team, selected = await _current(kube, namespace)
    if keep_webhook_namespaces:  # those deleted since are left out (their Role went with them)
        settings = _with_namespaces(settings, [n for n in selected if await _read(kube, "Namespace", n, None)])
    if installed_team is None:
        raise NotFound(f"the tpenv manager is not installed (no ConfigMap {CONFIGMAP} in namespace {namespace})",
                       hint="install it with: tpenv manager install")
    team = installed_team if team_mode is None else team_mode
    docs = render_manager(settings, team_mode=team, tls=tls, namespace=namespace)
    await _apply_all(kube, docs, namespace)
    return docs


async def uninstall(kube: Kube, namespace: str = NAMESPACE) -> list[str]:
    """Delete every object the install makes (absent ones are skipped); returns ``kind/name`` deleted.

    The webhook goes first, so no pod creation is sent to a manager being removed, then the
    Roles that let the manager create Secrets in the selected namespaces; the namespace goes
    last and takes what is left in it. The tpenv-auth Secrets the manager
    created in workload namespaces stay: agents still running mount them (``tpenv uninstall
    --everything`` removes them).
    """
    docs = render_manager({}, team_mode=False, tls=_PLACEHOLDER_TLS, namespace=namespace)
    # The per-namespace Roles live outside the manager's namespace: found by label, removed
    # right after the webhook (whose deletion stops new injections) and before the rest.
    docs[-1:-1] = await _auth_objects(kube, namespace)
    deleted = []
    for doc in reversed(docs):
        name = await _delete(kube, doc)
        if name:
            deleted.append(name)
    return deleted


async def _release(kube: Kube, doc: dict) -> None:
    """Give back an adopted object: an apply of nothing but its name, as field manager tpenv,
    removes every field only tpenv set (our labels, annotations, ...); the rest stays. Where
    that is refused (a required field only we set), our ownership annotations are dropped."""
    kind, name, ns = _ref(doc)
    bare = {"apiVersion": doc["apiVersion"], "kind": kind, "metadata": {"name": name, **({"namespace": ns} if ns else {})}}
    try:
        await _apply(kube, bare)
    except TpenvError:
        patch, _, _, namespaced = _kinds(kube)[kind]
        drop = {"metadata": {"annotations": {ANN_OWNERSHIP: None, ANN_INSTALL_ID: None}}}
        args = (name, ns, drop) if namespaced else (name, drop)
        await kube.call(patch, *args, _content_type="application/merge-patch+json",
                        what=What("patch", kind.lower() + "s", ns, name))


# Names are all uninstall needs; rendering with placeholder material avoids generating keys.
_PLACEHOLDER_TLS = {"ca.crt": b"-", "tls.crt": b"-", "tls.key": b"-"}


__all__ = ["render_manager", "to_yaml_stream", "install", "upgrade", "uninstall", "generate_tls", "reusable_tls",
           "manager_values", "TemplateError", "NAMESPACE", "CONFIGMAP", "WEBHOOK", "RELAY_PORT", "RELAY_CLIENT_ROLE",
           "CERT_LIFETIME", "MANAGED_BY"]
