"""What injection adds inside the pod besides the agent container (docs/protocol.md §1.2), pure:

- the in-pod redirect: ``tpenv-agent init`` (the agent image) redirects inbound TCP to the app's
  port to the agent's, so every path into the pod (Service, headless Service, pod DNS name, pod
  IP) meets the agent and the app keeps its port's name and number (Services and probes stay as
  they are). It runs either as init container ``tpenv-init`` (the webhook, and where the user may
  not add ephemeral containers) or, in patch mode, as ephemeral container ``tpenv-redirect``
  that tpenv adds to each running pod whose template carries annotation ``tpenv.io/redirect:
  ephemeral``: an init container holds the app back one kubelet cycle (about 1 s, issue 13);
  an ephemeral container starts beside the app;
- where the namespace's Pod Security level forbids that init container: the port hand-over
  (the app's port renamed) with the app's probes and lifecycle hooks that name the port
  rewritten to the new name, so the pod stays Ready;
- who opted in to the webhook, and which ports, in tpenv's and in Telepresence's words.

Kept apart from inject.py so each reads in one sitting; inject.py calls these.
"""
from __future__ import annotations

import copy

from .agentspec import listens

INIT_CONTAINER = "tpenv-init"
EPHEMERAL_CONTAINER = "tpenv-redirect"
# On the pod template: tpenv adds the redirect to each pod as an ephemeral container (record["via"]).
ANN_REDIRECT = "tpenv.io/redirect"
VIA_EPHEMERAL = "ephemeral"
VIA_INIT = "init"  # settings["redirect_via"] for the init container (the record then has no "via")
MODE_REDIRECT = "redirect"  # record["mode"]; absent means the hand-over (records older than the redirect)
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
# Levels whose checks refuse a container adding NET_ADMIN (baseline allows only a fixed list of
# capabilities; restricted allows NET_BIND_SERVICE alone).
PSA_FORBIDS_REDIRECT = ("baseline", "restricted")

# Opt-in to the webhook: tpenv's pod label, or Telepresence's pod annotation (both domains it used).
LABEL_INJECT = "tpenv.io/inject-agent"
TP_INJECT = ("telepresence.getambassador.io/inject-traffic-agent", "telepresence.io/inject-traffic-agent")
# Which container ports the agent takes: tpenv's annotation, else Telepresence's (names or numbers,
# an optional /TCP or /UDP suffix, or "all").
ANN_INJECT_PORTS = "tpenv.io/inject-ports"
TP_PORTS = ("telepresence.getambassador.io/inject-container-ports", "telepresence.io/inject-container-ports")
# Telepresence's Service-side selection, read on purpose by no one: it picks Service ports (by
# port name, or targetPort number) and a Service, which the webhook never sees; with the redirect
# the agent takes every TCP port of the app, so whichever port they pick reaches it anyway.
# Telepresence's docs show the singular; its code reads the plural first, the singular deprecated.
TP_SERVICE_SELECTION = tuple(f"{domain}/{name}" for domain in ("telepresence.getambassador.io", "telepresence.io")
                             for name in ("inject-service-ports", "inject-service-port", "inject-service-name"))
ALL_PORTS = "all"  # Telepresence's value for every container port: tpenv's default choice

PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
HOOKS = ("postStart", "preStop")
HANDLERS = ("httpGet", "tcpSocket")  # grpc probes take a number only


def redirect_allowed(namespace: str, labels: dict | None) -> tuple[bool, str]:
    """Whether the namespace lets the redirect's init container in; else why not, in a sentence."""
    level = (labels or {}).get(PSA_ENFORCE, "")
    if level in PSA_FORBIDS_REDIRECT:
        return False, (f"namespace {namespace!r} enforces Pod Security level {level!r}, which forbids the "
                       f"NET_ADMIN capability the in-pod redirect needs")
    return True, ""


def bypass_note(why: str) -> str:
    """What a hand-over intercept cannot take, and why (said once to the user)."""
    return (f"only traffic through a Service with a cluster IP reaches the agent; callers that dial pod "
            f"IPs (headless Services, pod DNS names, client-side balancing) reach the app directly: {why}")


def init_container(entries: list[dict], settings: dict) -> dict:
    """The short-lived privileged step: only NET_ADMIN, root (iptables needs it), gone before the app
    starts. The agent's resources, so a namespace whose quota wants them on every container admits it."""
    args = ["init"]
    for e in entries:
        args += ["--redirect", f"{e['app_port']}:{e['agent_port']}"]
    return {
        "name": INIT_CONTAINER,
        "image": settings["agent_image"],
        "imagePullPolicy": settings["image_pull_policy"],
        "command": ["tpenv-agent"],
        "args": args,
        "securityContext": redirect_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",  # the iptables error shows in `describe`
    } | ({"resources": copy.deepcopy(settings["resources"])} if settings.get("resources") else {})


def redirect_security() -> dict:
    """What the redirect step may do: NET_ADMIN only, as root (iptables needs it), nothing else."""
    return {"runAsUser": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def wants_ephemeral(pod: dict) -> bool:
    """Whether tpenv installs this pod's redirect as an ephemeral container (its template said so)."""
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(ANN_REDIRECT) == VIA_EPHEMERAL


def ephemeral_redirect(pod: dict, agent_name: str) -> dict | None:
    """The ephemeral container that installs the redirect in this running pod, or None when the
    pod wants none or has one already (ephemeral containers are never removed or restarted).

    Built from the pod alone: the agent container ``agent_name`` gives the image and, in its
    ``--listen AGENT_PORT:APP_PORT:NAME`` arguments, the redirects; so whoever adds it (any
    user's tpenv, any version agreeing on the annotation) adds the same. No resources: the API
    server refuses them on ephemeral containers."""
    if redirect_state(pod)[0] != "missing":
        return None
    agent = next((c for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == agent_name), None)
    if agent is None:
        return None
    redirects = [arg for agent_port, app_port, _name in listens(agent)
                 for arg in ("--redirect", f"{app_port}:{agent_port}")]
    if not redirects:
        return None
    return {"name": EPHEMERAL_CONTAINER, "image": agent["image"],
            "imagePullPolicy": agent.get("imagePullPolicy", "IfNotPresent"),
            "command": ["tpenv-agent"], "args": ["init", *redirects],
            "securityContext": redirect_security(), "terminationMessagePolicy": "FallbackToLogsOnError"}


def redirect_state(pod: dict) -> tuple[str, str]:
    """(state, detail) of an ephemeral redirect: ``none`` (the pod installs none this way),
    ``missing`` (not added yet), ``running`` (added, not ended), ``done`` or ``failed`` (with
    the container's message)."""
    if not wants_ephemeral(pod):
        return "none", ""
    if not any(c.get("name") == EPHEMERAL_CONTAINER for c in (pod.get("spec") or {}).get("ephemeralContainers") or []):
        return "missing", ""
    for cs in (pod.get("status") or {}).get("ephemeralContainerStatuses") or []:
        if cs.get("name") != EPHEMERAL_CONTAINER:
            continue
        ended = (cs.get("state") or {}).get("terminated")
        if ended is None:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            return "running", waiting.get("message") or waiting.get("reason") or ""
        if ended.get("exitCode") == 0:
            return "done", ""
        return "failed", (f"exit {ended.get('exitCode')}: {(ended.get('message') or ended.get('reason') or '').strip()}")
    return "running", ""


def install_init(spec: dict, entries: list[dict], settings: dict) -> None:
    """Add or replace tpenv-init in ``spec.initContainers`` (the caller created the list)."""
    inits = spec["initContainers"]
    fresh = init_container(entries, settings)
    index = next((i for i, c in enumerate(inits) if c.get("name") == INIT_CONTAINER), None)
    if index is None:
        inits.append(fresh)
    else:
        inits[index] = fresh


def uninstall_init(spec: dict) -> None:
    if isinstance(spec.get("initContainers"), list):
        spec["initContainers"] = [c for c in spec["initContainers"] if c.get("name") != INIT_CONTAINER]


def _port_holders(app: dict):
    """(path, handler dict) for every probe and hook handler of ``app`` that can name a port."""
    for probe in PROBES:
        for kind in HANDLERS:
            h = (app.get(probe) or {}).get(kind)
            if isinstance(h, dict):
                yield f"{probe}.{kind}", h
    for hook in HOOKS:
        for kind in HANDLERS:
            h = ((app.get("lifecycle") or {}).get(hook) or {}).get(kind)
            if isinstance(h, dict):
                yield f"lifecycle.{hook}.{kind}", h


def rename_probe_ports(app: dict, old: str, new: str) -> list[str]:
    """Point the app's probes and hooks that name port ``old`` at ``new`` (the hand-over renamed
    it; the kubelet resolves names in the container's own ports). Returns the paths changed."""
    changed = []
    for path, h in _port_holders(app):
        if h.get("port") == old:
            h["port"] = new
            changed.append(path)
    return changed


def restore_probe_ports(app: dict, entry: dict) -> None:
    paths = set(entry.get("probes") or [])
    for path, h in _port_holders(app):
        if path in paths and h.get("port") == entry.get("renamed"):
            h["port"] = entry["name"]


def opted_in(pod: dict) -> str | None:
    """How the pod opted in to the webhook (the label or annotation), or None."""
    meta = pod.get("metadata") or {}
    if (meta.get("labels") or {}).get(LABEL_INJECT) == "enabled":
        return f"label {LABEL_INJECT}"
    annotations = meta.get("annotations") or {}
    for key in TP_INJECT:
        if str(annotations.get(key, "")).lower() == "enabled":
            return f"annotation {key}"
    return None


def opted_out(pod: dict) -> str | None:
    """How the pod (or pod template) refuses the agent: tpenv's label or Telepresence's annotation
    set to ``disabled``, as Telepresence's injector reads it; None when it does not."""
    meta = pod.get("metadata") or {}
    if str((meta.get("labels") or {}).get(LABEL_INJECT, "")).lower() == "disabled":
        return f"label {LABEL_INJECT}: disabled"
    annotations = meta.get("annotations") or {}
    for key in TP_INJECT:
        if str(annotations.get(key, "")).lower() == "disabled":
            return f"annotation {key}: disabled"
    return None


def port_annotation(pod: dict) -> tuple[str, str] | None:
    """(annotation name, value) of the ports the pod asks the agent to take, tpenv's first; None
    for none, or for ``all`` (every TCP port of the app: the choice without an annotation)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    for key in (ANN_INJECT_PORTS, *TP_PORTS):
        if annotations.get(key):
            return None if annotations[key].strip().lower() == ALL_PORTS else (key, annotations[key])
    return None


def parse_ports(key: str, raw: str) -> list[int | str]:
    """Comma-separated port names or numbers; Telepresence allows a ``/TCP`` or ``/UDP`` suffix.
    The agent carries TCP only: ``/UDP`` items are left to the app (a chart written for
    Telepresence that lists ``http,dns/UDP`` still gets its TCP port intercepted); a list with
    no TCP item at all is refused, naming what it holds."""
    out: list[int | str] = []
    other: list[str] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        ident, _, proto = item.partition("/")
        if proto and proto.strip().upper() != "TCP":
            other.append(item)
            continue
        ident = ident.strip()
        out.append(int(ident) if ident.isdigit() else ident)
    if not out:
        raise ValueError(f"{key}: {raw!r} names no TCP port ({', '.join(other) or 'nothing'}); the agent only "
                         f"carries TCP: list a TCP port, or remove the annotation")
    return out
