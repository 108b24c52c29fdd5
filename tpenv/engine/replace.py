"""Replace mode (Telepresence's ``replace``): the app container stops running in the cluster while
the intercept lasts, every one of its TCP ports goes to this machine, and it comes back exactly as
it was on leave, on Ctrl-C, and on kill -9 of the client (docs/protocol.md §1.4).

- :func:`plan_replace` (pure): inject the agent (in-pod redirect) on the Service port and every
  other TCP port of the app container, then ``tpenv_agent.replace.replace``: the app container
  becomes a placeholder running ``tpenv-agent pause``; the restore is a JSON Patch back to the
  object as it was read.
- :func:`start_replace`: refusals first (another session's intercepts on the pods, webhook mode,
  no redirect), a server-side dry run, then the restore right (templates/replace: a
  ServiceAccount whose Role may only patch this workload, its token bound to a Secret mounted
  into the agent container alone), the replace, and the wait for the rollout.
- :meth:`Replacement.end`: the same patch from the client, the rollout back, the right removed.
  A client that never gets there (kill -9) leaves it to the agent (tpenv_agent/restorer.py).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tpenv.engine.agentquery import agent_intercepts, auth_material
from tpenv.engine.agent_removal import has_agent
from tpenv.engine.agents import Progress, agent_port_name, wait_endpoints, wait_rollout, webhook_mode
from tpenv.engine.injection import MANAGED_BY, inject_settings
from tpenv.engine.redirect import redirect_choice
from tpenv.errors import Conflict, NotFound, PermanentError, UpdateConflict, UsageError
from tpenv.kits.aio import unit_logger
from tpenv.kits.kube import _PLURAL, Kube, What, Workload
from tpenv.settings import Settings
from tpenv_agent.inject import InjectError, _settings, inject
from tpenv_agent.inpod import VIA_INIT
from tpenv_agent.replace import ANN_REPLACE, pod_replaced, replace, restore_names

TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "replace"
REPLACE_OF = "tpenv.io/replace-of"  # label of the restore right's objects: the workload's name
TOKEN_SECONDS = 7 * 24 * 3600  # the API server may shorten it; bound to the Secret, revoked with it


@dataclass(frozen=True)
class ReplacePlan:
    workload: dict  # the object to write: agent on every app port, the app container a placeholder
    patch: list  # JSON Patch from ``workload`` back to the object as it was read
    record: dict  # the agent's restore record: every taken port
    ports: list[dict] = field(default_factory=list)  # the record's entries, {name, agent_port, app_port}


def plan_replace(workload: dict, service: dict, port: str | int, settings: Settings | dict, *, session: str,
                 container: str | None = None, redirect: tuple[bool, str] = (True, "")) -> ReplacePlan:
    """Pure: what to write to replace the app of ``workload`` (Service port ``port`` first)."""
    name = f"{workload.get('kind', 'workload')}/{(workload.get('metadata') or {}).get('name', '?')}"
    # The init container: a replaced pod without its redirect would send callers to the placeholder.
    opts = {**inject_settings(settings), "redirect": redirect[0], "redirect_off": redirect[1],
            "redirect_via": VIA_INIT}
    try:
        wl, _svc, record = inject(workload, service, port, container=container, settings=opts)
        if record.get("mode") != "redirect":
            raise InjectError(f"replace needs the in-pod redirect (every port of the app goes to the agent "
                              f"inside the pod), and {record.get('why') or redirect[1] or 'it is off'}")
        app = next(c for c in wl["spec"]["template"]["spec"]["containers"] if c["name"] == record["container"])
        for p in app.get("ports") or []:
            if str(p.get("protocol", "TCP")).upper() != "TCP" or p["containerPort"] in \
                    {e["app_port"] for e in record["ports"]}:
                continue
            # Every other port of the app, as if a Service targeted its number: the redirect takes
            # it, nothing outside the pod changes (no Service is written in redirect mode).
            n = p["containerPort"]
            pseudo = {"metadata": {"name": "replace"}, "spec": {"ports": [{"port": n, "targetPort": n}]}}
            wl, _svc, record = inject(wl, pseudo, n, container=record["container"], settings=opts)
        replaced, patch = replace(wl, _settings(opts), session=session, before=workload)
    except InjectError as e:
        raise PermanentError(f"cannot replace the app of {name}: {e}",
                             hint="intercept without --replace, or fix the workload as the message says") from e
    return ReplacePlan(replaced, patch, record, list(record["ports"]))


def render_restore(namespace: str, w: Workload, restore: dict, ca: str) -> list[dict]:
    """The restore right's manifests (templates/replace/restore.yaml.j2), parsed."""
    import jinja2  # here: rendered only by --replace, and jinja2 is heavy for every start
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             autoescape=False, keep_trailing_newline=True)
    text = env.get_template("restore.yaml.j2").render(
        name=restore_names(w.name), namespace=namespace, workload=w.name, plural=_PLURAL[w.kind],
        labels={**MANAGED_BY, REPLACE_OF: w.name}, restore=restore, ca=ca)
    return [d for d in YAML(typ="safe", pure=True).load_all(text) if d]


def _token_request(kube: Kube, sa: str, namespace: str, body: dict):
    """``create serviceaccounts/token`` (a subresource the ApiGroup grammar does not name)."""
    g = kube.core

    def call(**kw: Any) -> Any:
        path = f"{g.base}/namespaces/{namespace}/serviceaccounts/{sa}/token"
        return g._send(g._serialize("POST", path, body, {}, patch=False), kw.get("_request_timeout"))

    return call


@dataclass
class Replacement:
    """A replace in force; :meth:`end` undoes it (safe twice)."""

    kube: Kube
    workload: Workload
    plan: ReplacePlan
    rollout_timeout: float  # settings.kube.rollout_timeout, for the rollout back
    ended: bool = False

    async def end(self, progress: Progress | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        say = progress or unit_logger("replace", self.workload.name).info
        w = self.workload
        try:
            await self.kube.call(self.kube._patcher(w.kind), w.name, w.namespace, self.plan.patch,
                                 what=What("patch", _PLURAL[w.kind], w.namespace, w.name))
            say(f"Restoring the app of {w.ref}")
        except (UpdateConflict, UsageError, NotFound):
            # The patch's `test` failed: the agent restored it already (the client was away too long).
            say(f"{w.ref} was already restored")
        try:
            await wait_rollout(self.kube, w, "", timeout=self.rollout_timeout, progress=say,
                               serves=lambda p: pod_replaced(p) is None, what="with the app back")
        finally:
            await remove_restore_right(self.kube, w)


async def remove_restore_right(kube: Kube, w: Workload) -> None:
    name, ns = restore_names(w.name), w.namespace
    for group, snake, plural in RESTORE_KINDS:
        try:
            await kube.call(getattr(getattr(kube, group), f"delete_namespaced_{snake}"), name, ns,
                            what=What("delete", plural, ns, name))
        except NotFound:
            pass


async def sweep_restore_rights(kube: Kube) -> list[str]:
    """``uninstall --everything``: every restore right left in the cluster (a replace whose client
    and agent both died before leave), in any namespace. Only objects carrying tpenv's labels
    (managed-by tpenv and the replace-of label) and the tpenv-restore- name: a same-named object
    someone else made stays. Returns ``ns/kind/name`` deleted."""
    selector = ",".join([*(f"{k}={v}" for k, v in MANAGED_BY.items()), REPLACE_OF])
    out = []
    for group, snake, plural in RESTORE_KINDS:
        api = getattr(kube, group)
        found = await kube.call(getattr(api, f"list_{snake}_for_all_namespaces"), label_selector=selector,
                                what=What("list", plural))
        for item in found.get("items", []):
            name, ns = item["metadata"]["name"], item["metadata"]["namespace"]
            if not name.startswith("tpenv-restore-") or item["metadata"].get("deletionTimestamp"):
                continue
            try:
                await kube.call(getattr(api, f"delete_namespaced_{snake}"), name, ns,
                                what=What("delete", plural, ns, name))
            except NotFound:
                continue
            out.append(f"{ns}/{plural[:-1]}/{name}")
    return out


async def undo_replace(kube: Kube, w: Workload) -> Workload:
    """``uninstall``: a workload still replaced (its client gone, its agent not restored yet, e.g.
    its pods never became ready) is restored from its Secret's patch first; returned as it now is."""
    if ANN_REPLACE not in (w.obj["metadata"].get("annotations") or {}):
        return w
    name = restore_names(w.name)
    try:
        secret = await kube.call(kube.core.read_namespaced_secret, name, w.namespace,
                                 what=What("get", "secrets", w.namespace, name))
        spec = json.loads(base64.b64decode(secret["data"]["restore.json"]))
    except (NotFound, KeyError, ValueError) as e:
        raise PermanentError(f"{w.ref} is replaced but its restore Secret {name} is gone or unreadable",
                             hint=f"restore its pod template by hand (kubectl rollout undo {w.ref} -n {w.namespace})"
                             ) from e
    try:
        await kube.call(kube._patcher(w.kind), w.name, w.namespace, spec["patch"],
                        what=What("patch", _PLURAL[w.kind], w.namespace, w.name))
    except (UpdateConflict, UsageError):
        pass  # restored meanwhile (its `test` failed)
    return await kube.reload(w)


RESTORE_KINDS = (("core", "secret", "secrets"), ("rbac", "role_binding", "rolebindings"),
                 ("rbac", "role", "roles"), ("core", "service_account", "serviceaccounts"))


async def _create_or_replace(kube: Kube, doc: dict) -> dict:
    kind, ns, name = doc["kind"], doc["metadata"]["namespace"], doc["metadata"]["name"]
    group = kube.rbac if doc["apiVersion"].startswith("rbac") else kube.core
    snake = {"ServiceAccount": "service_account", "Role": "role", "RoleBinding": "role_binding",
             "Secret": "secret"}[kind]
    plural = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings",
              "Secret": "secrets"}[kind]
    try:  # a leftover of a replace whose client died is taken over, not refused
        await kube.call(getattr(group, f"delete_namespaced_{snake}"), name, ns, what=What("delete", plural, ns, name))
    except NotFound:
        pass
    return await kube.call(getattr(group, f"create_namespaced_{snake}"), ns, doc, what=What("create", plural, ns, name))


async def refuse_if_shared(kube: Kube, w: Workload, settings: Settings) -> None:
    """Replace stops the app for everyone: refused while the pods run other tpenv intercepts."""
    if not has_agent(w.obj):
        return
    material = await auth_material(kube, w.namespace)
    port = settings.agent.ssh_port
    held = await agent_intercepts(kube, w, material, port)
    if isinstance(held, str):
        raise PermanentError(f"cannot replace the app of {w.ref}: cannot tell whether its pods run other "
                             f"intercepts ({held})", hint="try again once its pods are ready")
    if held:
        who = ", ".join(f"{ic.get('intercept_id')} (held by {ic.get('owner', '?')}, port {ic.get('port')})"
                        for ic in held)
        raise Conflict(f"cannot replace the app of {w.ref}: its pods run other tpenv intercepts: {who}; "
                       f"replace would stop the app they pass unmatched traffic to",
                       hint="ask them to leave first (tpenv leave NAME), or intercept without --replace")


async def start_replace(kube: Kube, w: Workload, service: dict, sp: dict, settings: Settings, *, session: str,
                        container: str | None, progress: Progress) -> Replacement:
    """Refuse, or replace the app of ``w`` and wait until every pod runs the placeholder."""
    if webhook_mode(w):
        raise UsageError(f"cannot replace the app of {w.ref}: its agent is injected by the manager's webhook "
                         f"(GitOps mode), whose pods tpenv does not rewrite",
                         hint="intercept without --replace")
    if ANN_REPLACE in (w.obj["metadata"].get("annotations") or {}):
        holder = json.loads(w.obj["metadata"]["annotations"][ANN_REPLACE]).get("session", "?")
        raise Conflict(f"{w.ref} is already replaced by session {holder}",
                       hint="wait for it to end (its agent restores the app once its client is gone)")
    await refuse_if_shared(kube, w, settings)
    redirect = await redirect_choice(kube, w, settings, container)
    plan = plan_replace(w.obj, service, sp.get("name") or sp["port"], settings, session=session,
                        container=container, redirect=redirect)
    await kube.replace_workload(w, plan.workload, dry_run=True)  # RBAC, admission, validation: before any change
    from tpenv.engine.tunnels import ensure_auth_material

    await ensure_auth_material(kube, w.namespace)
    ca = (await kube.call(kube.core.read_namespaced_config_map, "kube-root-ca.crt", w.namespace,
                          what=What("get", "configmaps", w.namespace, "kube-root-ca.crt")))["data"]["ca.crt"]
    restore = {"workload": f"/apis/apps/v1/namespaces/{w.namespace}/{_PLURAL[w.kind]}/{w.name}",
               "secret": f"/api/v1/namespaces/{w.namespace}/secrets/{restore_names(w.name)}",
               "patch": plan.patch}
    docs = render_restore(w.namespace, w, restore, ca)
    try:
        created = {d["kind"]: await _create_or_replace(kube, d) for d in docs}
        secret = created["Secret"]
        name = restore_names(w.name)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": TOKEN_SECONDS, "audiences": None,
                         "boundObjectRef": {"kind": "Secret", "apiVersion": "v1", "name": name,
                                            "uid": secret["metadata"]["uid"]}}}
        token = (await kube.call(_token_request(kube, name, w.namespace, body),
                                 what=What("create", "serviceaccounts/token", w.namespace, name)))["status"]["token"]
        await kube.call(kube.core.patch_namespaced_secret, name, w.namespace,
                        {"data": {"token": base64.b64encode(token.encode()).decode()}},
                        what=What("patch", "secrets", w.namespace, name))
        progress(f"Replacing the app of {w.ref}: container {plan.record['container']!r} stops, ports "
                 f"{', '.join(str(e['app_port']) for e in plan.ports)} go to this machine")
        w = await kube.replace_workload(w, plan.workload)
    except BaseException:
        await remove_restore_right(kube, w)
        raise
    rep = Replacement(kube, w, plan, float(settings.kube.rollout_timeout))
    try:
        w = await wait_rollout(kube, w, "", timeout=rep.rollout_timeout,
                               progress=progress, serves=lambda p: pod_replaced(p) == session,
                               what="with the app replaced")
        rep.workload = w
        entry = next(e for e in plan.ports if e["name"] == agent_port_name(sp))
        await wait_endpoints(kube, w, service, sp, entry["app_port"], entry["name"], progress=progress,
                             timeout=settings.kube.endpoints_timeout, app_port=int(entry["app_port"]))
    except BaseException:
        await rep.end(progress)
        raise
    return rep


__all__ = ["ReplacePlan", "Replacement", "plan_replace", "render_restore", "start_replace", "refuse_if_shared",
           "remove_restore_right", "undo_replace"]
