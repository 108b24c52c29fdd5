"""The pod template's side of injection, as pure functions over our own copies of dicts: which
container is the app (``_pick_container``), which port the agent takes and under which name
(``_take_port``: the redirect, or the hand-over renaming the app's port and the probes naming
it), and putting the agent (container, auth volume, init container) into a pod spec and taking
it out again, recording what was created so restore drops exactly that.

Apart from inject.py (the public inject/restore/inject_pod, the restore records, the Service)
so each reads in one sitting; inject.py is the only user of these private helpers.
"""
from __future__ import annotations

from . import inpod
from .agentspec import AGENT_CONTAINER, AUTH_VOLUME, LABEL_AGENT, STREAMS_PORT, agent_container, auth_volume
from .inpod import MODE_REDIRECT

FIRST_AGENT_PORT = 7900
PORT_NAME_MAX = 15  # IANA_SVC_NAME, enforced by the API server


class InjectError(ValueError):
    """The objects cannot be injected as asked; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# small helpers over our own copies


def _ensure(root: dict, path: str, created: list[str], empty) -> object:
    """Walk ``path`` (dotted) creating missing parts; record what we created so restore can drop it."""
    node = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        if node.get(part) is None:
            node[part] = empty() if i == len(parts) - 1 else {}
            sub = ".".join(parts[: i + 1])
            if sub not in created:
                created.append(sub)
        node = node[part]
    return node


def _drop_created(root: dict, created: list[str]) -> None:
    # Deepest first, so a parent we created is seen empty after its child is gone.
    for path in sorted(created, key=lambda p: p.count("."), reverse=True):
        *parents, last = path.split(".")
        node = root
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and last in node and not node[last]:
            del node[last]


def _port_int(value) -> int | str:
    """A targetPort as Kubernetes reads it: digits are a number, anything else a port name."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def _agent_port_name(target: int | str) -> str:
    return target if isinstance(target, str) else f"tpenv-{target}"


def _renamed(name: str) -> str:
    return f"tpx-{name}"[:PORT_NAME_MAX]


def _names(containers: list[dict]) -> str:
    return ", ".join(c["name"] for c in containers) or "none"


# ---------------------------------------------------------------------------------------------
# the pod template (shared by inject and inject_pod)


def _app_containers(spec: dict) -> list[dict]:
    return [c for c in spec.get("containers") or [] if c.get("name") != AGENT_CONTAINER]


def _pick_container(spec: dict, target: int | str, explicit: str | None, where: str) -> dict:
    containers = _app_containers(spec)
    if explicit:
        found = [c for c in containers if c["name"] == explicit]
        if not found:
            raise InjectError(f"{where} has no container named {explicit!r} (containers: {_names(containers)})")
        c = found[0]
        if isinstance(target, str) and not any(p.get("name") == target for p in c.get("ports") or []):
            raise InjectError(f"container {explicit!r} of {where} declares no port named {target!r}; "
                              f"add it to the container's ports or pick another container")
        return c
    if isinstance(target, str):
        found = [c for c in containers if any(p.get("name") == target for p in c.get("ports") or [])]
        if not found:
            raise InjectError(f"no container of {where} declares a port named {target!r} (containers: "
                              f"{_names(containers)}); name the app's port {target!r} in its ports or "
                              f"point the Service's targetPort at a declared port")
    else:
        found = [c for c in containers if any(p.get("containerPort") == target for p in c.get("ports") or [])]
        if not found and len(containers) == 1:
            found = containers  # undeclared ports still receive traffic; one container leaves no doubt
        if not found:
            raise InjectError(f"no container of {where} declares containerPort {target} and it has "
                              f"several containers ({_names(containers)}); pass --container NAME")
    if len(found) > 1:
        raise InjectError(f"port {target!r} is declared by several containers of {where} "
                          f"({_names(found)}); pass --container NAME")
    return found[0]


def _used_ports(spec: dict, settings: dict) -> set[int]:
    used = {settings["ssh_port"], settings["health_port"], STREAMS_PORT}
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        used.update(p.get("containerPort") for p in c.get("ports") or [])
    return used


def _take_port(spec: dict, app: dict, target: int | str, where: str, record: dict, settings: dict) -> dict:
    """Hand ``target`` of container ``app`` to the agent (in our copy); return the port record.

    Redirect mode changes nothing of the app: the init container sends the port's traffic to
    the agent. The hand-over renames a named port (and the probes and hooks naming it)."""
    used = _used_ports(spec, settings) | {e["agent_port"] for e in record["ports"]}
    agent_port = next(p for p in range(FIRST_AGENT_PORT, 65536) if p not in used)
    entry: dict = {"name": _agent_port_name(target), "agent_port": agent_port}
    redirect = record.get("mode") == MODE_REDIRECT
    if isinstance(target, str):
        port = next(p for p in app["ports"] if p.get("name") == target)
        if str(port.get("protocol", "TCP")).upper() != "TCP":
            raise InjectError(f"port {target!r} of container {app['name']!r} is {port['protocol']}; "
                              f"the agent only carries TCP")
        if redirect:
            entry["app_port"] = port["containerPort"]
            return _unique_redirect(entry, record, where)
        new_name = _renamed(target)
        taken = {p.get("name") for c in spec.get("containers") or [] for p in c.get("ports") or []}
        if new_name in taken:
            raise InjectError(f"cannot rename port {target!r} of {where} to {new_name!r}: that name is taken")
        port["name"] = new_name
        entry.update(app_port=port["containerPort"], renamed=new_name)
        probes = inpod.rename_probe_ports(app, target, new_name)
        if probes:
            entry["probes"] = probes
    else:
        declared = [p for p in app.get("ports") or [] if p.get("containerPort") == target]
        if declared and all(str(p.get("protocol", "TCP")).upper() != "TCP" for p in declared):
            raise InjectError(f"port {target} of container {app['name']!r} is {declared[0]['protocol']}; "
                              f"the agent only carries TCP")
        entry["app_port"] = target
        if redirect:
            return _unique_redirect(entry, record, where)
    return entry


def _unique_redirect(entry: dict, record: dict, where: str) -> dict:
    # One app port, one redirect: a second rule for it would never match.
    for e in record["ports"]:
        if e["app_port"] == entry["app_port"]:
            raise InjectError(f"port {entry['app_port']} of {where} is already taken by the agent as "
                              f"{e['name']!r}; intercept it by that name")
    return entry


def _install_agent(tpl: dict, record: dict, settings: dict, created: list[str]) -> None:
    """(Re)build the agent container from the app container and the record, in our copy ``tpl``.

    ``created`` collects the paths (relative to ``tpl``) this call had to create."""
    spec = tpl["spec"]
    app = next(c for c in spec["containers"] if c["name"] == record["container"])
    redirect = record.get("mode") == MODE_REDIRECT
    agent = agent_container(app, record["ports"], settings, spec, redirect)
    containers = spec["containers"]
    index = next((i for i, c in enumerate(containers) if c["name"] == AGENT_CONTAINER), None)
    if index is None:
        containers.append(agent)
    else:
        containers[index] = agent
    if redirect and record.get("via") == inpod.VIA_EPHEMERAL:
        _mark_ephemeral(tpl, created)
    elif redirect:
        _ensure(tpl, "spec.initContainers", created, list)
        inpod.install_init(spec, record["ports"], settings)
    volumes = _ensure(tpl, "spec.volumes", created, list)
    if not any(v.get("name") == AUTH_VOLUME for v in volumes):
        volumes.append(auth_volume())
    _ensure(tpl, "metadata.labels", created, dict)[LABEL_AGENT] = "injected"


def _mark_ephemeral(tpl: dict, created: list[str]) -> None:
    """tpenv adds the redirect to each running pod (inpod.ephemeral_redirect): no init container,
    and the template says so."""
    inpod.uninstall_init(tpl["spec"])
    _ensure(tpl, "metadata.annotations", created, dict)[inpod.ANN_REDIRECT] = inpod.VIA_EPHEMERAL


def _uninstall_agent(tpl: dict, record: dict) -> None:
    spec = tpl.get("spec") or {}
    spec["containers"] = [c for c in spec.get("containers") or [] if c.get("name") != AGENT_CONTAINER]
    inpod.uninstall_init(spec)
    ((tpl.get("metadata") or {}).get("annotations") or {}).pop(inpod.ANN_REDIRECT, None)
    for c in spec["containers"]:
        if c["name"] != record.get("container"):
            continue
        back = {e["renamed"]: e["name"] for e in record.get("ports") or [] if e.get("renamed")}
        for p in c.get("ports") or []:
            if p.get("name") in back:
                p["name"] = back[p["name"]]
        for e in record.get("ports") or []:
            inpod.restore_probe_ports(c, e)
    if isinstance(spec.get("volumes"), list):
        spec["volumes"] = [v for v in spec["volumes"] if v.get("name") != AUTH_VOLUME]
    (tpl.get("metadata") or {}).get("labels", {}).pop(LABEL_AGENT, None)
