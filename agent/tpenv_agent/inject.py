"""Agent injection as pure functions over plain dicts (docs/protocol.md §1).

    inject(workload, service, port, *, container=None, settings)  -> (workload', service' | None, record)
    restore(workload, service)                                     -> (workload', service' | None)
    inject_pod(pod, settings)                                      -> pod'   (the manager's webhook)

Nothing here mutates its inputs: every function deep-copies first and edits its own copy.

The sidecar container is built in Python here, not rendered from ``templates/``: this module runs
inside the agent image (the webhook), which ships without jinja2 or a YAML parser, and the client
imports the same code, so patch mode and webhook mode cannot drift apart. ``templates/`` holds
only the manager's install manifests, which only the client renders.

``settings`` keys (all optional): ``agent_image`` (default ``tpenv/agent:<version>``),
``image_pull_policy`` (default ``IfNotPresent``), ``lease`` (seconds, default 5), ``ssh_port``
(default 7922, on the pod's loopback) and ``health_port`` (default 7921: /readyz, /livez),
``resources`` (the agent container's ``resources``, default :data:`DEFAULT_RESOURCES`), ``redirect``
(default True: the in-pod redirect, inpod.py; False: the port hand-over, for namespaces whose
Pod Security level forbids it; ``redirect_off`` then says why, and the record keeps it),
``redirect_via`` (``init``, the default: init container ``tpenv-init``; ``ephemeral``: tpenv adds
ephemeral container ``tpenv-redirect`` to each running pod, patch mode only, inpod.py).

Restore records, kept as JSON annotations so ``restore`` needs nothing but the objects:

- workload ``tpenv.io/restore``: ``{"v": 1, "container": <app container>, "mode"?: "redirect",
  "via"?: "ephemeral",
  "why"?: <why not redirect>, "ports": [{"name", "agent_port", "app_port", "renamed"?, "probes"?}],
  "created": [<dotted paths of dicts/lists inject created, removed again when empty>]}``
- Service ``tpenv.io/restore-service``: ``{"v": 1, "ports": [{"port", "protocol",
  "targetPort"}], "created": [...]}``; ``targetPort: null`` means the key was absent.
"""
from __future__ import annotations

import copy
import json
from importlib import metadata

from . import inpod
from .agentspec import (AGENT_CONTAINER, AGENT_UID, AUTH_SECRET, DEFAULT_RESOURCES, HEALTH_PORT, LABEL_AGENT, SSH_PORT,
                        agent_container, agent_security, auth_volume)
from .podspec import (InjectError, _agent_port_name, _app_containers, _drop_created, _ensure, _install_agent,
                      _mark_ephemeral, _pick_container, _port_int, _take_port, _uninstall_agent)
from .inpod import ANN_INJECT_PORTS, INIT_CONTAINER, LABEL_INJECT, MODE_REDIRECT

FIRST_AGENT_PORT = 7900

ANN_RESTORE = "tpenv.io/restore"
ANN_RESTORE_SERVICE = "tpenv.io/restore-service"
ANN_INJECT_CONTAINER = "tpenv.io/inject-container"  # webhook: which container is the app
ANN_DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "ReplicaSet")

PORT_NAME_MAX = 15  # IANA_SVC_NAME, enforced by the API server


def _version() -> str:
    try:
        return metadata.version("tpenv")
    except metadata.PackageNotFoundError:
        return "dev"


def default_settings() -> dict:
    return {"agent_image": f"tpenv/agent:{_version()}", "image_pull_policy": "IfNotPresent", "lease": 5,
            "ssh_port": SSH_PORT, "health_port": HEALTH_PORT,
            "resources": copy.deepcopy(DEFAULT_RESOURCES), "redirect": True, "redirect_off": ""}


def _settings(settings: dict | None) -> dict:
    merged = default_settings()
    merged.update({k: v for k, v in (settings or {}).items() if v is not None})
    ports = [merged["ssh_port"], merged["health_port"]]
    if not all(isinstance(p, int) and 0 < p < 65536 for p in ports) or ports[0] == ports[1]:
        raise InjectError(f"the agent's ssh_port and health_port must be two different ports 1-65535, "
                          f"not {ports[0]!r} and {ports[1]!r}")
    return merged


# ---------------------------------------------------------------------------------------------
# records


def _read(obj: dict, key: str) -> dict | None:
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(key)
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise InjectError(f"annotation {key} is not valid JSON; remove it by hand (kubectl annotate "
                          f"... {key}-) and inject again") from e
    if not isinstance(record, dict) or record.get("v") != 1:
        raise InjectError(f"annotation {key} has an unknown format (written by a newer tpenv?)")
    return record


def _write(obj: dict, key: str, record: dict) -> None:
    # The record's own container (metadata.annotations) may be created here: record it first.
    if ((obj.get("metadata") or {}).get("annotations")) is None and "metadata.annotations" not in record["created"]:
        record["created"].append("metadata.annotations")
    annotations = _ensure(obj, "metadata.annotations", [], dict)
    annotations[key] = json.dumps(record, separators=(",", ":"), sort_keys=True)


def _where(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', 'object')}/{meta.get('name') or meta.get('generateName') or '?'}"


# ---------------------------------------------------------------------------------------------
# the Service


def _service_port(service: dict, port: str | int) -> dict:
    ports = (service.get("spec") or {}).get("ports") or []
    key = _port_int(port) if isinstance(port, str) else port
    found = [p for p in ports if (p.get("name") == key if isinstance(key, str) else p.get("port") == key)]
    if not found:
        listed = ", ".join(f"{p.get('name') or '-'}={p.get('port')}" for p in ports) or "none"
        raise InjectError(f"{_where(service)} exposes no port {port!r} (its ports: {listed}); "
                          f"give a Service port name or number")
    sp = found[0]
    if str(sp.get("protocol", "TCP")).upper() != "TCP":
        raise InjectError(f"port {port!r} of {_where(service)} is {sp['protocol']}; the agent only carries TCP")
    return sp


def _rewrite_service(svc: dict, sp: dict, new_target: str) -> None:
    record = _read(svc, ANN_RESTORE_SERVICE) or {"v": 1, "ports": [], "created": []}
    if not any(e["port"] == sp["port"] and e["protocol"] == sp.get("protocol", "TCP") for e in record["ports"]):
        record["ports"].append({"port": sp["port"], "protocol": sp.get("protocol", "TCP"),
                                "targetPort": sp.get("targetPort")})
    sp["targetPort"] = new_target
    _write(svc, ANN_RESTORE_SERVICE, record)


# ---------------------------------------------------------------------------------------------
# public API


def inject(workload: dict, service: dict, port: str | int, *, container: str | None = None,
           settings: dict | None = None) -> tuple[dict, dict | None, dict]:
    """Add (or extend) the agent so it takes Service port ``port`` of ``service`` from ``workload``.

    Returns (patched workload, patched Service or None when the Service needs no change, the
    workload's restore record). Injecting a port the agent already serves changes nothing,
    unless the agent is stale (other settings, or the app's env/mounts changed): then only the
    agent container is rebuilt.
    """
    settings = _settings(settings)
    wl = copy.deepcopy(workload)
    svc = copy.deepcopy(service)
    where = _where(wl)
    if wl.get("kind") not in WORKLOAD_KINDS:
        raise InjectError(f"cannot inject into {where}: only {', '.join(WORKLOAD_KINDS)} are supported")
    tpl = (wl.get("spec") or {}).get("template")
    if not isinstance(tpl, dict) or not (tpl.get("spec") or {}).get("containers"):
        raise InjectError(f"{where} has no pod template with containers")
    refusal = inpod.opted_out(tpl)
    if refusal:  # the owner said no: patching it in anyway would override their choice
        raise InjectError(f"{where} opts out of the agent (its pod template's {refusal}); remove that, or "
                          f"set it to enabled, to intercept it")
    sp = _service_port(svc, port)
    target = _port_int(sp.get("targetPort", sp["port"]))
    record = _read(wl, ANN_RESTORE)
    if record is None:
        if any(c.get("name") == AGENT_CONTAINER for c in tpl["spec"]["containers"]):
            raise InjectError(f"{where} has a {AGENT_CONTAINER} container but no {ANN_RESTORE} annotation, so "
                              f"tpenv cannot tell what it changed; remove that container by hand and inject again")
        record = _new_record(settings)
    redirect = record.get("mode") == MODE_REDIRECT
    if (svc.get("spec") or {}).get("clusterIP") == "None":
        _check_headless(svc, tpl["spec"], target, where, redirect, record.get("why") or "")
    name = _agent_port_name(target)
    wl_changed = not any(e["name"] == name for e in record["ports"])
    if wl_changed:
        try:
            app = _pick_container(tpl["spec"], target, container, where)
        except InjectError:
            if container or not record["container"] or isinstance(target, str):
                raise
            # An undeclared numeric port on a pod of several containers: the served one is the guess.
            app = _pick_container(tpl["spec"], target, record["container"], where)
        if record["container"] not in (None, app["name"]):
            raise InjectError(f"the agent in {where} already serves container {record['container']!r}; "
                              f"port {port!r} belongs to {app['name']!r}: one agent serves one container")
        record["ports"].append(_take_port(tpl["spec"], app, target, where, record, settings))
        record["container"] = app["name"]
        # One list of created paths, relative to the workload; the template's carry its prefix.
        prefix = "spec.template."
        tpl_created = [p[len(prefix):] for p in record["created"] if p.startswith(prefix)]
        _install_agent(tpl, record, settings, tpl_created)
        record["created"] = [p for p in record["created"] if not p.startswith(prefix)]
        record["created"] += [prefix + p for p in tpl_created]
        _ensure(wl, "metadata.labels", record["created"], dict)[LABEL_AGENT] = "injected"
        _write(wl, ANN_RESTORE, record)
    else:
        wl_changed = _refresh_agent(tpl, record, settings)
    svc_changed = isinstance(target, int) and not redirect
    if svc_changed:
        _rewrite_service(svc, sp, name)
    return (wl if wl_changed else copy.deepcopy(workload)), (svc if svc_changed else None), record


def _new_record(settings: dict) -> dict:
    record: dict = {"v": 1, "container": None, "ports": [], "created": []}
    if settings.get("redirect", True):
        record["mode"] = MODE_REDIRECT
        if settings.get("redirect_via") == inpod.VIA_EPHEMERAL:
            record["via"] = inpod.VIA_EPHEMERAL
    elif settings.get("redirect_off"):
        record["why"] = settings["redirect_off"]
    return record


def _check_headless(svc: dict, spec: dict, target: int | str, where: str, redirect: bool, why: str) -> None:
    """Callers of a headless Service dial its targetPort on pod IPs: only the redirect reaches them,
    and only for a port some container of the pod declares (else nothing would ever listen there)."""
    if not redirect:
        raise InjectError(f"{_where(svc)} is headless: callers connect to pod IPs on the app's own port, which "
                          f"only the in-pod redirect can take, and {why or 'it is off'}; intercept through a "
                          f"Service with a cluster IP selecting the same pods")
    declared = [(c["name"], p) for c in _app_containers(spec) for p in c.get("ports") or []
                if (p.get("name") == target if isinstance(target, str) else p.get("containerPort") == target)
                and str(p.get("protocol", "TCP")).upper() == "TCP"]
    if not declared:
        listed = ", ".join(f"{c['name']}:{p.get('containerPort')}/{p.get('protocol', 'TCP')}"
                           for c in _app_containers(spec) for p in c.get("ports") or []) or "none"
        name = (svc.get("metadata") or {}).get("name") or "?"  # objects from a list carry no kind
        raise InjectError(f"headless Service/{name} targets port {target!r}, which no container of {where} "
                          f"exposes (its ports: {listed}): callers dial that port on pod IPs and nothing listens "
                          f"there; point the Service's targetPort at a port the app exposes")


def _covers(actual, wanted) -> bool:
    """Whether ``actual`` holds everything ``wanted`` sets. The API server adds defaults
    (probe timeouts, fieldRef apiVersion, terminationMessagePath...) but never drops our fields."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(k in actual and _covers(actual[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(actual, list) and len(actual) == len(wanted) and all(map(_covers, actual, wanted))
    return actual == wanted


def _refresh_agent(tpl: dict, record: dict, settings: dict) -> bool:
    """Rebuild the agent in our copy if it is stale (another image, the app's env or mounts changed)."""
    containers = tpl["spec"]["containers"]
    app = next((c for c in containers if c["name"] == record["container"]), None)
    index = next((i for i, c in enumerate(containers) if c["name"] == AGENT_CONTAINER), None)
    if app is None or index is None:
        raise InjectError(f"the pod template lost its {'app' if app is None else 'agent'} container since "
                          f"injection; run `tpenv uninstall --agent` for this workload, then inject again")
    redirect = record.get("mode") == MODE_REDIRECT
    fresh = agent_container(app, record["ports"], settings, tpl["spec"], redirect)
    init_ok = True
    if redirect and record.get("via") == inpod.VIA_EPHEMERAL:
        inits = tpl["spec"].get("initContainers") or []
        marked = ((tpl.get("metadata") or {}).get("annotations") or {}).get(inpod.ANN_REDIRECT) == inpod.VIA_EPHEMERAL
        init_ok = marked and not any(c.get("name") == INIT_CONTAINER for c in inits)
        if not init_ok:  # someone edited the template: put the marker back, the init container out
            _mark_ephemeral(tpl, [])  # as before: the refresh rewrites no record
    elif redirect:
        inits = tpl["spec"].get("initContainers") or []
        current = next((c for c in inits if c.get("name") == INIT_CONTAINER), None)
        init_ok = current is not None and _covers(current, inpod.init_container(record["ports"], settings))
        if not init_ok and current is not None:
            inpod.install_init(tpl["spec"], record["ports"], settings)
    if _covers(containers[index], fresh) and init_ok:
        return False
    containers[index] = fresh
    return True


def restore(workload: dict, service: dict | None = None) -> tuple[dict, dict | None]:
    """Undo every ``inject`` on these objects, from their annotations. Service is None if unchanged."""
    wl = copy.deepcopy(workload)
    record = _read(wl, ANN_RESTORE)
    if record is not None:
        tpl = wl["spec"]["template"]
        _uninstall_agent(tpl, record)
        wl["metadata"].get("labels", {}).pop(LABEL_AGENT, None)
        wl["metadata"]["annotations"].pop(ANN_RESTORE, None)
        _drop_created(wl, record["created"])
    if service is None:
        return wl, None
    svc = copy.deepcopy(service)
    srecord = _read(svc, ANN_RESTORE_SERVICE)
    if srecord is None:
        return wl, None
    for sp in (svc.get("spec") or {}).get("ports") or []:
        for e in srecord["ports"]:
            if e["port"] == sp.get("port") and e["protocol"] == sp.get("protocol", "TCP"):
                if e["targetPort"] is None:
                    sp.pop("targetPort", None)
                else:
                    sp["targetPort"] = e["targetPort"]
    svc["metadata"]["annotations"].pop(ANN_RESTORE_SERVICE, None)
    _drop_created(svc, srecord["created"])
    return wl, svc


def _pod_targets(pod: dict, app: dict, redirect: bool, why: str) -> list[int | str]:
    """The ports the agent takes: the pod's port annotation (tpenv's, else Telepresence's), else
    every TCP port of the app (with the redirect) or every named one (the hand-over: a numeric
    port would need a Service rewrite, and the webhook never sees Services)."""
    given = inpod.port_annotation(pod)
    if given:
        try:
            targets = inpod.parse_ports(*given)
        except ValueError as e:
            raise InjectError(str(e)) from e
    else:
        tcp = [p for p in app.get("ports") or [] if str(p.get("protocol", "TCP")).upper() == "TCP"]
        targets = [p.get("name") or p["containerPort"] for p in tcp if redirect or p.get("name")]
        if not targets:
            listed = ", ".join(f"{p.get('containerPort')}/{p.get('protocol', 'TCP')}" for p in app.get("ports") or [])
            what = "TCP port" if redirect or not tcp else "named TCP port"
            raise InjectError(f"container {app['name']!r} has no {what} to give the agent (its ports: "
                              f"{listed or 'none'}); the agent carries TCP only; list ports in {ANN_INJECT_PORTS}")
    numeric = [t for t in targets if isinstance(t, int)]
    if numeric and not redirect:
        raise InjectError(f"port {numeric[0]} is a number, which needs the in-pod redirect, and {why or 'it is off'}; "
                          f"name the container port and point the Service's targetPort at the name")
    return targets


def inject_pod(pod: dict, settings: dict | None = None) -> dict:
    """The webhook's injection: the pod as it should be created (a new dict; unchanged if already injected).

    App container: annotation ``tpenv.io/inject-container``, else ``kubectl.kubernetes.io/default-container``,
    else the first container. Ports: annotation ``tpenv.io/inject-ports``, else Telepresence's
    ``inject-container-ports`` (comma-separated container port names or numbers; ``all`` = none
    given), else every TCP port of the app container with the in-pod redirect, or every named TCP
    port where the namespace forbids the redirect (the hand-over).
    """
    settings = _settings(settings)
    p = copy.deepcopy(pod)
    spec = p.get("spec") or {}
    if any(c.get("name") == AGENT_CONTAINER for c in spec.get("containers") or []):
        return p  # already injected (patch mode, or the API server re-invoked us)
    containers = _app_containers(spec)
    if not containers:
        raise InjectError("the pod has no containers")
    annotations = (p.get("metadata") or {}).get("annotations") or {}
    name = annotations.get(ANN_INJECT_CONTAINER) or annotations.get(ANN_DEFAULT_CONTAINER) or containers[0]["name"]
    where = "the pod"
    app = _pick_container(spec, 0, name, where)
    record = _new_record(settings)
    record["container"] = app["name"]
    for target in _pod_targets(p, app, bool(settings.get("redirect", True)), settings.get("redirect_off") or ""):
        if isinstance(target, str) and not any(q.get("name") == target for q in app.get("ports") or []):
            raise InjectError(f"container {app['name']!r} declares no port named {target!r} "
                              f"(from the pod annotation {(inpod.port_annotation(p) or ('?',))[0]})")
        if _agent_port_name(target) not in {e["name"] for e in record["ports"]}:
            record["ports"].append(_take_port(spec, app, target, where, record, settings))
    _install_agent(p, record, settings, record["created"])
    _write(p, ANN_RESTORE, record)
    return p


__all__ = [
    "InjectError", "inject", "restore", "inject_pod", "agent_container", "agent_security", "auth_volume",
    "default_settings", "DEFAULT_RESOURCES", "AGENT_UID", "SSH_PORT", "HEALTH_PORT",
    "AGENT_CONTAINER", "AUTH_SECRET", "LABEL_AGENT", "LABEL_INJECT", "ANN_RESTORE", "ANN_RESTORE_SERVICE",
    "ANN_INJECT_PORTS", "ANN_INJECT_CONTAINER", "WORKLOAD_KINDS", "INIT_CONTAINER", "MODE_REDIRECT",
]
