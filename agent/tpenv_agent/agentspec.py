"""The injected agent's container and volume (docs/protocol.md §1), as pure functions over dicts.

``agent_container(app, entries, settings, pod_spec, redirect)``: the sidecar serving ``entries``
(the taken ports) for app container ``app``: its command line (listeners, the SSH and health
ports of the settings, auth dir, mounts, lease), probes, the app's env and volume mounts, a
non-root security context borrowed from the app (``agent_security``), resources.
``auth_volume()``: Secret ``tpenv-auth`` as a volume.

Apart from inject.py (which decides which ports the agent takes and keeps restore records)
because what the agent container looks like is one concern, read on its own when the pod spec
is questioned; inject.py re-exports these names.
"""
from __future__ import annotations

import copy

AGENT_CONTAINER = "tpenv-agent"
LABEL_AGENT = "tpenv.io/agent"  # on a workload tpenv injected (patch mode)
AUTH_VOLUME = "tpenv-auth"
AUTH_SECRET = "tpenv-auth"
AUTH_DIR = "/tpenv/auth"
MOUNTS_ROOT = "/tpenv/mounts"
# The agent's own ports: defaults of the ``ssh_port``/``health_port`` settings (the client's
# TPENV_AGENT_SSH_PORT/TPENV_AGENT_HEALTH_PORT, the manager's --agent-ssh-port/--agent-health-port),
# which the client dials and the kubelet probes, so they travel with the injection, never apart.
SSH_HOST = "127.0.0.1"  # loopback only (protocol §1): reached through pods/portforward
SSH_PORT = 7922
# Where clients park port-forward streams (streams.py), on the loopback too. A fixed port, not
# port 0: an ephemeral one could be the very port the app binds after the agent started.
STREAMS_PORT = 7923
HEALTH_PORT = 7921

# The agent's user when the app gives none to borrow (the image's USER, "nonroot" by convention).
AGENT_UID = 65532
# Small but set: namespaces with a ResourceQuota refuse pods whose containers have none. Written
# the way the API server writes quantities, so a read-back never looks like a change.
DEFAULT_RESOURCES = {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}

def _mount_copy(mount: dict) -> dict:
    m = {k: copy.deepcopy(v) for k, v in mount.items() if k != "mountPropagation"}  # Bidirectional needs privileged
    m["mountPath"] = MOUNTS_ROOT + "/" + mount["mountPath"].lstrip("/")
    return m


def _env_copy(env: dict, app: str) -> dict:
    # A resourceFieldRef without containerName means "this container": pin it to the app's.
    env = copy.deepcopy(env)  # never share sub-objects between the app and the agent
    ref = (env.get("valueFrom") or {}).get("resourceFieldRef")
    if ref is not None and not ref.get("containerName"):
        ref["containerName"] = app
    return env


def agent_security(app: dict, pod_spec: dict | None = None) -> dict:
    """The agent's securityContext: what Pod Security ``restricted`` asks (non-root, no
    capabilities, no escalation, RuntimeDefault seccomp) and a read-only root filesystem.

    It runs as the app's own user and group when the app (container, else pod) names a non-root
    one, so it reads and writes the app's volumes as the app does; otherwise as AGENT_UID. Volumes
    the kubelet manages get the pod's fsGroup for every container, the agent included. What the
    agent then cannot read (files only root may read, when the app runs as root) is said in
    docs/protocol.md §1."""
    pod_sc = (pod_spec or {}).get("securityContext") or {}
    app_sc = app.get("securityContext") or {}
    uid = app_sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = app_sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    borrowed = isinstance(uid, int) and uid > 0
    return {
        "runAsNonRoot": True,
        "runAsUser": uid if borrowed else AGENT_UID,
        "runAsGroup": gid if borrowed and isinstance(gid, int) else AGENT_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def agent_container(app: dict, entries: list[dict], settings: dict, pod_spec: dict | None = None,
                    redirect: bool = False) -> dict:
    """The sidecar for app container ``app`` serving ``entries`` (records of taken ports);
    ``pod_spec``: the pod's spec, for the user the app runs as.

    With the redirect, the agent declares no ports: Services keep targeting the app's port (the
    redirect brings its traffic here), and a second port of the same name would be refused."""
    args = ["sidecar", "--container", app["name"]]
    for e in entries:
        args += ["--listen", f"{e['agent_port']}:{e['app_port']}:{e['name']}"]
    health = settings["health_port"]
    args += ["--ssh", f"{SSH_HOST}:{settings['ssh_port']}", "--health", f"0.0.0.0:{health}", "--auth-dir", AUTH_DIR,
             "--mounts", MOUNTS_ROOT, "--lease", str(settings["lease"])]
    probe = lambda path: {"httpGet": {"path": path, "port": health}, "periodSeconds": 5}  # noqa: E731
    c: dict = {
        "name": AGENT_CONTAINER,
        "image": settings["agent_image"],
        "imagePullPolicy": settings["image_pull_policy"],
        # command as well as args: the container must not depend on the image's ENTRYPOINT.
        "command": ["tpenv-agent"],
        "args": args,
    }
    if not redirect:
        c["ports"] = [{"name": e["name"], "containerPort": e["agent_port"], "protocol": "TCP"} for e in entries]
    if app.get("env"):
        c["env"] = [_env_copy(e, app["name"]) for e in app["env"]]
    if app.get("envFrom"):
        c["envFrom"] = copy.deepcopy(app["envFrom"])
    c["volumeMounts"] = [_mount_copy(m) for m in app.get("volumeMounts") or []]
    c["volumeMounts"].append({"name": AUTH_VOLUME, "mountPath": AUTH_DIR, "readOnly": True})
    c["readinessProbe"] = probe("/readyz")
    c["livenessProbe"] = probe("/livez")
    c["securityContext"] = agent_security(app, pod_spec)
    if settings.get("resources"):
        c["resources"] = copy.deepcopy(settings["resources"])
    return c


def listens(agent: dict) -> list[tuple[str, str, str]]:
    """(agent port, app port, name) of each ``--listen AGENT_PORT:APP_PORT:NAME`` of an agent
    container as :func:`agent_container` writes them (read back from a pod, as strings)."""
    args = [a for a in agent.get("args") or [] if isinstance(a, str)]
    out = []
    for value in (args[i + 1] for i, a in enumerate(args[:-1]) if a == "--listen"):
        agent_port, _, rest = value.partition(":")
        app_port, _, name = rest.partition(":")
        out.append((agent_port, app_port, name))
    return out


def auth_volume() -> dict:
    items = [{"key": "ca.pub", "path": "ca.pub"}, {"key": "host_key", "path": "host_key"}]
    return {"name": AUTH_VOLUME, "secret": {"secretName": AUTH_SECRET, "items": items}}
