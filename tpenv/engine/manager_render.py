"""The manager's manifests, rendered (pure): settings -> template values -> validated manifest dicts.

Manifests come from ``templates/manager/*.yaml.j2`` (Jinja2, values through ``tojson``), are
parsed with ruamel.yaml and validated; nothing here formats YAML by hand. Every object carries
``app.kubernetes.io/managed-by: tpenv``. manager.py applies them; chart.py turns the same
context into the Helm chart.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from tpenv.engine.manager_tls import CERT_LIFETIME, NAME, generate_tls
from tpenv.engine.teammode import NAMESPACE
from tpenv.errors import PermanentError
from tpenv_agent.inject import DEFAULT_RESOURCES, HEALTH_PORT, SSH_PORT
from tpenv.settings import ManagerSettings, Settings

if TYPE_CHECKING:
    import jinja2

MANAGED_BY = {"app.kubernetes.io/managed-by": "tpenv"}
# tpenv/templates is a symlink to the top-level templates/ (DESIGN layout), so wheels carry it too.
TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "manager"
RELAY_PORT = 8022  # the relay's SSH port on the manager pod's loopback (docs/protocol.md §7)
# The per-namespace Role/RoleBinding that lets the manager create tpenv-auth (25-webhook-rbac).
AUTH_COMPONENT = {"app.kubernetes.io/component": "webhook-auth"}


class TemplateError(PermanentError):
    """A manager template renders to something that is not a valid manifest: a bug in templates/."""


# ---------------------------------------------------------------------------------------------
# settings


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("tpenv")
    except metadata.PackageNotFoundError:
        return "dev"


def manager_values(settings: Settings | dict) -> dict[str, Any]:
    """The values the templates need, from tpenv's Settings model or a plain dict.

    Plain dict keys: ``agent_image``, ``image_pull_policy``, ``lease``, ``ssh_port`` and
    ``health_port`` (the injected agent's, defaults 7922 and 7921), and optionally
    ``manager_image`` (default: the agent image; one image, two roles), ``relay_port`` (default
    8022) and ``relay_cidrs`` (the ranges the relay may dial; default: none given, the relay
    discovers the cluster's pod and service ranges itself).
    """
    relay_port, relay_cidrs = RELAY_PORT, []
    if isinstance(settings, dict):
        agent_image = settings.get("agent_image") or f"tpenv/agent:{_version()}"
        pull = settings.get("image_pull_policy") or "IfNotPresent"
        lease = settings.get("lease", 5)
        image = settings.get("manager_image") or agent_image
        relay_port = int(settings.get("relay_port") or RELAY_PORT)
        relay_cidrs = [str(c) for c in settings.get("relay_cidrs") or []]
        resources = settings.get("resources") or DEFAULT_RESOURCES
        ssh_port, health_port = settings.get("ssh_port") or SSH_PORT, settings.get("health_port") or HEALTH_PORT
        cert_lifetime = int(settings.get("cert_lifetime_seconds") or CERT_LIFETIME.total_seconds())
        webhook_namespaces = ManagerSettings(webhook_namespaces=settings.get("webhook_namespaces") or []
                                             ).webhook_namespaces
    else:  # tpenv.settings.Settings
        agent_image, pull = settings.agent.image, settings.agent.image_pull_policy
        lease, image = settings.agent.lease_seconds, settings.agent.image
        relay_port, relay_cidrs = settings.manager.relay_port, list(settings.manager.relay_cidrs)
        resources = settings.agent.resources()
        ssh_port, health_port = settings.agent.ssh_port, settings.agent.health_port
        cert_lifetime = settings.manager.cert_lifetime_seconds
        webhook_namespaces = list(settings.manager.webhook_namespaces)
    return {"webhook_namespaces": webhook_namespaces,"agent_image": agent_image, "agent_image_pull_policy": pull, "image": image, "agent_resources": resources,
            "image_pull_policy": pull, "lease": max(1, round(float(lease))),
            "relay_port": relay_port, "relay_cidrs": relay_cidrs,
            "agent_ssh_port": ssh_port, "agent_health_port": health_port, "cert_lifetime": cert_lifetime}


# ---------------------------------------------------------------------------------------------
# rendering (pure)


def _environment() -> jinja2.Environment:
    import jinja2  # here: the manager's manifests only, and jinja2 is heavy for every start
    # StrictUndefined: a value a template expects but we forgot is an error, not an empty string.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              autoescape=False, keep_trailing_newline=True)


def _validate(doc: Any, source: str) -> dict:
    if not isinstance(doc, dict):
        raise TemplateError(f"{source}: a document is not a mapping")
    for key in ("apiVersion", "kind"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise TemplateError(f"{source}: a document has no {key}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise TemplateError(f"{source}: {doc['kind']} has no metadata.name")
    labels = doc["metadata"].get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") != "tpenv":
        raise TemplateError(f"{source}: {doc['kind']}/{name} is not labelled app.kubernetes.io/managed-by: tpenv")
    return doc


def manager_context(settings: Settings | dict, *, team_mode: bool, tls: dict[str, bytes] | None = None,
                    namespace: str = NAMESPACE) -> dict[str, Any]:
    """What the templates are rendered with (also the Helm chart's starting point, tpenv.engine.chart)."""
    values = manager_values(settings)
    tls = tls if tls is not None else generate_tls(namespace, lifetime=dt.timedelta(seconds=values["cert_lifetime"]))
    selector = {"app.kubernetes.io/name": NAME}
    return {
        **values,
        "namespace": namespace,
        "team_mode": team_mode,
        "version": _version(),
        "selector": selector,
        "labels": {**selector, "app.kubernetes.io/part-of": "tpenv", **MANAGED_BY},
        "auth_labels": {**selector, "app.kubernetes.io/part-of": "tpenv", **MANAGED_BY, **AUTH_COMPONENT},
        "tls": {k: base64.b64encode(v).decode() for k, v in tls.items()},
        "tls_checksum": hashlib.sha256(tls["tls.crt"] + tls["ca.crt"]).hexdigest()[:16],
    }


def render_context(context: dict[str, Any]) -> list[dict]:
    """Every template rendered with ``context``, in apply order (plain dicts, validated)."""
    env = _environment()
    yaml = YAML(typ="safe", pure=True)
    docs: list[dict] = []
    for name in sorted(env.list_templates(filter_func=lambda n: n.endswith(".yaml.j2"))):
        text = env.get_template(name).render(**context)
        try:
            loaded = list(yaml.load_all(text))
        except YAMLError as e:
            raise TemplateError(f"templates/manager/{name}: not valid YAML after rendering: {e}") from e
        docs += [_validate(d, f"templates/manager/{name}") for d in loaded if d is not None]
    return docs


def render_manager(settings: Settings | dict, *, team_mode: bool, tls: dict[str, bytes] | None = None,
                   namespace: str = NAMESPACE) -> list[dict]:
    """Every manifest of the manager install, in apply order (plain dicts, validated)."""
    return render_context(manager_context(settings, team_mode=team_mode, tls=tls, namespace=namespace))


def to_yaml_stream(docs: list[dict]) -> str:
    """The manifests as one YAML stream (``---`` separated), for ``--dry-run`` and GitOps."""
    out = io.StringIO()
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.explicit_start = True
    yaml.dump_all(docs, out)
    return out.getvalue()
