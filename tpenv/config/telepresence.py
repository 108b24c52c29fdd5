"""Telepresence 2.31 ``WorkstationState`` manifests (the ``telepresence apply -f`` format) read
as telepresence.yaml.

:func:`translate` maps a manifest (plain data, positions in a Locator) to tpenv's own shape and
returns the positions of the result, so that every later problem (pydantic's, the checks') is
still reported at the line of the manifest the value came from. Each field either maps to one
of tpenv's (the table in docs/config.md, generated from :data:`MAPPING`), is harmless and
noted as ignored (a warning with file:line:column), or changes what Telepresence would do in a
way tpenv cannot: a problem at its line, and the file is refused. Nothing is dropped silently.

Schema: telepresence's pkg/client/cli/manifest/state.schema.yaml (apiVersion
telepresence.io/v1alpha1); handler processes are the attachments' ``command``.
"""
from __future__ import annotations

from typing import Any

from tpenv.errors import Problem

API_VERSION = "telepresence.io/v1alpha1"
KIND = "WorkstationState"

# (WorkstationState field, tpenv field or None, note): docs/config.md's mapping table.
MAPPING: list[tuple[str, str | None, str]] = [
    ("connection.context", "context", ""),
    ("connection.namespace", "namespace", ""),
    ("connection.mappedNamespaces", "connect.namespaces", ""),
    ("connection.name", None, "ignored (warning): a tpenv session has its own id"),
    ("connection.managerNamespace", None, "ignored (warning): tpenv's optional manager lives in namespace `tpenv`"),
    ("connection.kubeconfig, kubeFlags", None, "refused: use KUBECONFIG and `--context`"),
    ("connection.alsoProxy, neverProxy, allowConflictingSubnets, vnat, proxyVia, rerouteLocal, rerouteRemote", None,
     "refused: tpenv connect routes the cluster's own ranges only"),
    ("attachments[].type: intercept", "intercepts[]", "`replace`, `ingest`, `wiretap`: refused"),
    ("attachments[].name", "intercepts[].name", ""),
    ("attachments[].workload", "intercepts[].workload", "default: the attachment's name, as in Telepresence"),
    ("attachments[].namespace", "intercepts[].namespace", ""),
    ("attachments[].service", "intercepts[].service", ""),
    ("attachments[].ports: [\"L:R\"]", "intercepts[].port: L:R", "one port per attachment (more: refused, "
                                                                   "write one attachment per port)"),
    ("attachments[].httpHeaders: [\"name=regex\"]", "intercepts[].match.headers: {name: regex}",
     "`auto` → `headers: auto`"),
    ("attachments[].httpPathEqualities / httpPathPrefixes / httpPathRegexps (one)",
     "intercepts[].match.path_equal / path_prefix / path_regex", "more than one path: refused"),
    ("attachments[].env.file, env.syntax", "intercepts[].env.file, env.format",
     "syntax docker, compose, sh, json; others refused"),
    ("attachments[].env.json", "intercepts[].env.file + format: json", "refused together with env.file"),
    ("attachments[].mount.enabled: false", "intercepts[].mount: false", ""),
    ("attachments[].mount.path", "intercepts[].mount.path", ""),
    ("attachments[].mount.readOnly, localMountPort", None, "refused"),
    ("attachments[].env, mount: not a mapping, or another key", None, "refused (Telepresence's schema rejects it too)"),
    ("attachments[].command", "intercepts[].run.command", "tpenv supervises it (restarts, file watch)"),
    ("attachments[].mechanism: tcp\\|http, address: 127.0.0.1, nodeAgent: false", None, "accepted (tpenv's behaviour)"),
    ("attachments[].plaintext", None, "ignored (warning)"),
    ("attachments[].container, metadata, toPod, nodeAgent: true, other address/mechanism", None, "refused"),
]

_ENV_KEYS = ("file", "syntax", "json")
_MOUNT_KEYS = ("enabled", "path", "readOnly", "localMountPort")
_ENV_SYNTAX = {"docker": "docker", "compose": "compose", "sh": "sh", "json": "json"}
_PATHS = {"httpPathEqualities": "path_equal", "httpPathPrefixes": "path_prefix", "httpPathRegexps": "path_regex"}
_REFUSED_CONNECTION = {
    "kubeconfig": "use the KUBECONFIG environment variable",
    "kubeFlags": "put these in your kubeconfig context and pass --context",
    **{k: "tpenv connect routes the cluster's own pod and service ranges only" for k in
       ("alsoProxy", "neverProxy", "allowConflictingSubnets", "vnat", "proxyVia", "rerouteLocal", "rerouteRemote")},
}
_IGNORED_CONNECTION = {"name": "a tpenv session has its own id",
                       "managerNamespace": "tpenv's optional manager lives in namespace tpenv"}


def is_workstation_state(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == KIND


class _Out:
    """The translated document and the positions of its values, copied from the manifest's."""

    def __init__(self, loc: Any) -> None:
        from tpenv.config.located import Locator

        self.src = loc
        self.loc = Locator(loc.file)
        self.loc.values[()] = loc.values.get((), (1, 1))
        self.problems: list[Problem] = []
        self.notes: list[Problem] = []

    def place(self, dest: tuple, src: tuple) -> None:
        """``dest`` in the translation is reported where ``src`` is in the manifest."""
        if src in self.src.values:
            self.loc.values[dest] = self.src.values[src]
        if src in self.src.keys:
            self.loc.keys[dest] = self.src.keys[src]
        if src in self.src.containers:
            self.loc.containers.add(dest)

    def refuse(self, src: tuple, what: str, hint: str | None = None) -> None:
        self.problems.append(self.src.problem(src, f"WorkstationState: {what}", hint, key=True))

    def note(self, src: tuple, what: str) -> None:
        self.notes.append(self.src.problem(src, f"WorkstationState: {what}", key=True))


def _port(value: Any) -> str:
    return str(value)


def _intercept(out: _Out, att: dict[str, Any], j: int, i: int) -> dict[str, Any]:
    src = ("attachments", j)
    ic: dict[str, Any] = {}
    dest = ("intercepts", i)
    out.place(dest, src)

    def put(key: str, value: Any, field: str, *sub: str) -> None:
        ic[key] = value
        out.place((*dest, key, *sub), (*src, field))

    put("name", att.get("name"), "name")
    put("workload", att.get("workload") or att.get("name"), "workload" if "workload" in att else "name")
    for key in ("namespace", "service"):
        if key in att:
            put(key, att[key], key)
    ports = att.get("ports")
    if ports is None:
        out.refuse(src, f"attachments[{j}] ({att.get('name')}): no ports", "say which: ports: [\"8080:http\"]")
    elif isinstance(ports, list) and ports:
        ic["port"] = _port(ports[0])
        out.place((*dest, "port"), (*src, "ports", 0))
        for k in range(1, len(ports)):
            out.refuse((*src, "ports", k), f"attachments[{j}].ports[{k}]: one port per intercept in tpenv",
                       "write one attachment (or intercept) per port")
    else:
        put("port", ports, "ports")
    match: dict[str, Any] = {}
    headers = att.get("httpHeaders") or []
    if headers == ["auto"]:
        match["headers"] = "auto"
        out.place((*dest, "match", "headers"), (*src, "httpHeaders", 0))
    elif headers:
        rules = {}
        for k, h in enumerate(headers):
            name, sep, regex = str(h).partition("=")
            if not sep:
                out.refuse((*src, "httpHeaders", k), f"attachments[{j}].httpHeaders[{k}]: {h!r} is not NAME=REGEX")
                continue
            rules[name] = regex
            out.place((*dest, "match", "headers", name), (*src, "httpHeaders", k))
        match["headers"] = rules
    for field, key in _PATHS.items():
        values = att.get(field) or []
        if values:
            match[key] = values[0]
            out.place((*dest, "match", key), (*src, field, 0))
        for k in range(1, len(values)):
            out.refuse((*src, field, k), f"attachments[{j}].{field}[{k}]: tpenv takes one path rule per intercept")
    if match:
        ic["match"] = match
        out.place((*dest, "match"), src)
    env = att.get("env") or {}
    if not isinstance(env, dict):
        out.refuse((*src, "env"), f"attachments[{j}].env: expected a mapping (file, syntax, json)",
                   "e.g. env: {file: app.env, syntax: docker}")
        env = {}
    for key in env:
        if key not in _ENV_KEYS:
            out.refuse((*src, "env", key), f"unknown key {key!r} in env (Telepresence's env has "
                                           f"{', '.join(_ENV_KEYS)})")
    if env:
        spec: dict[str, Any] = {}
        if "file" in env:
            spec["file"] = env["file"]
            out.place((*dest, "env", "file"), (*src, "env", "file"))
        if "syntax" in env:
            fmt = _ENV_SYNTAX.get(env["syntax"])
            if fmt is None:
                out.refuse((*src, "env", "syntax"), f"env.syntax {env['syntax']!r} is not one tpenv writes",
                           "use docker, compose, sh or json")
            else:
                spec["format"] = fmt
                out.place((*dest, "env", "format"), (*src, "env", "syntax"))
        if "json" in env:
            if "file" in env:
                out.refuse((*src, "env", "json"), "env.json and env.file together: tpenv writes one env file",
                           "keep one of them")
            else:
                spec.update(file=env["json"], format="json")
                out.place((*dest, "env", "file"), (*src, "env", "json"))
        ic["env"] = spec
    mount = att.get("mount")
    if mount is not None and not isinstance(mount, dict):
        out.refuse((*src, "mount"), f"attachments[{j}].mount: expected a mapping (enabled, path, readOnly, "
                                    "localMountPort)", "mount: {enabled: false}, or mount: {path: ./app.vol}")
    elif isinstance(mount, dict):
        for key in mount:
            if key not in _MOUNT_KEYS:
                out.refuse((*src, "mount", key), f"unknown key {key!r} in mount (Telepresence's mount has "
                                                 f"{', '.join(_MOUNT_KEYS)})")
        if mount.get("enabled") is False:
            put("mount", False, "mount")
        elif "path" in mount:
            ic["mount"] = {"path": mount["path"]}
            out.place((*dest, "mount", "path"), (*src, "mount", "path"))
        for key in ("readOnly", "localMountPort"):
            if key in mount and mount[key] not in (False, None):
                out.refuse((*src, "mount", key), f"mount.{key} is not supported by tpenv",
                           "remove it (tpenv mounts read-write with sshfs, or copies with mode: sync)")
    if "command" in att:
        ic["run"] = {"command": att["command"]}
        out.place((*dest, "run", "command"), (*src, "command"))
    # What tpenv does anyway, what it ignores, and what it cannot do.
    if att.get("mechanism", "tcp") not in ("tcp", "http"):
        out.refuse((*src, "mechanism"), f"mechanism {att['mechanism']!r} is not supported", "remove it")
    if att.get("address", "127.0.0.1") not in ("127.0.0.1", "localhost"):
        out.refuse((*src, "address"), "tpenv forwards to 127.0.0.1 only", "remove address")
    if att.get("nodeAgent"):
        out.refuse((*src, "nodeAgent"), "node-scoped agents are not supported", "remove nodeAgent")
    if "plaintext" in att:
        out.note((*src, "plaintext"), "plaintext is ignored (tpenv relays the bytes as they are)")
    for key, hint in (("container", "tpenv picks the container serving the port (`tpenv intercept --container`)"),
                      ("metadata", "tpenv has no API server to read it from"),
                      ("toPod", "forward pod ports with `forwards:` instead")):
        if key in att:
            out.refuse((*src, key), f"{key} is not supported", hint)
    known = {"type", "name", "workload", "namespace", "service", "ports", "httpHeaders", *_PATHS, "env", "mount",
             "command", "mechanism", "address", "nodeAgent", "plaintext", "container", "metadata", "toPod"}
    for key in att:
        if key not in known:
            out.refuse((*src, key), f"unknown key {key!r} in an intercept attachment")
    return ic


def translate(data: dict[str, Any], loc: Any) -> tuple[dict[str, Any], Any, list[Problem], list[Problem]]:
    """(tpenv data, its Locator, problems, notes) for a WorkstationState manifest."""
    out = _Out(loc)
    doc: dict[str, Any] = {"apiVersion": "tpenv/v1"}
    if data.get("apiVersion") != API_VERSION:
        out.refuse(("apiVersion",), f"apiVersion {data.get('apiVersion')!r}: tpenv reads {API_VERSION}")
    conn = data.get("connection") or {}
    for key, dest in (("context", ("context",)), ("namespace", ("namespace",))):
        if key in conn:
            doc[dest[0]] = conn[key]
            out.place(dest, ("connection", key))
    if "mappedNamespaces" in conn:
        doc["connect"] = {"namespaces": conn["mappedNamespaces"]}
        out.place(("connect", "namespaces"), ("connection", "mappedNamespaces"))
    for key, why in _IGNORED_CONNECTION.items():
        if key in conn:
            out.note(("connection", key), f"connection.{key} is ignored: {why}")
    for key, hint in _REFUSED_CONNECTION.items():
        if key in conn:
            out.refuse(("connection", key), f"connection.{key} is not supported", hint)
    for key in conn:
        if key not in {"context", "namespace", "mappedNamespaces", *_IGNORED_CONNECTION, *_REFUSED_CONNECTION}:
            out.refuse(("connection", key), f"unknown key {key!r} in connection")
    intercepts = []
    for j, att in enumerate(data.get("attachments") or []):
        if not isinstance(att, dict):
            out.refuse(("attachments", j), f"attachments[{j}]: expected a mapping")
            continue
        if att.get("type") != "intercept":
            out.refuse(("attachments", j, "type"), f"attachment type {att.get('type')!r} is not supported: tpenv "
                                                   "intercepts", "use type: intercept")
            continue
        intercepts.append(_intercept(out, att, j, len(intercepts)))
    doc["intercepts"] = intercepts
    out.place(("intercepts",), ("attachments",))
    for key in data:
        if key not in ("apiVersion", "kind", "connection", "attachments"):
            out.refuse((key,), f"unknown top-level key {key!r}")
    return doc, out.loc, out.problems, out.notes
