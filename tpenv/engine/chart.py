"""The manager's Helm chart, generated from templates/manager (one source with `tpenv manager install`).

The Jinja2 templates are rendered once with sentinel strings where a chart value goes; the
rendered objects are dumped as YAML (every string double-quoted, so a Helm expression can stand
in a string's place) and each sentinel becomes its Helm expression. What Jinja decides rather
than substitutes is found by rendering twice: team mode (the scalars that differ between
``team_mode`` on and off become a ``ternary``), the relay ranges (the argument pair a sentinel
range produced becomes a ``range``). TLS: the chart makes its CA and serving certificate at
install with Helm's ``genCA``/``genSignedCert`` (the same names as generate_tls), so the Secret,
the webhook's caBundle and the checksum annotation come from one place in one file.

``tpenv manager chart DIR`` writes Chart.yaml, values.yaml (documented) and templates/manager.yaml.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from tpenv.engine.manager_render import TemplateError, _version, manager_context, render_context
from tpenv.engine.manager_tls import NAME
from tpenv.engine.teammode import NAMESPACE
from tpenv.settings import RESERVED_NAMESPACES, Settings

_DEFAULTS = Settings()  # the chart's defaults are `tpenv manager install`'s
# value key (dotted, in values.yaml) -> (sentinel, default, description)
VALUES: dict[str, tuple[str, Any, str]] = {
    "agent.image": ("__TPENV_AGENT_IMAGE__", _DEFAULTS.agent.image,
                    "Image of the traffic agent the webhook injects (TPENV_AGENT_IMAGE)."),
    "agent.pullPolicy": ("__TPENV_AGENT_PULL__", _DEFAULTS.agent.image_pull_policy,
                         "imagePullPolicy of the injected agent (TPENV_AGENT_IMAGE_PULL_POLICY)."),
    "agent.leaseSeconds": ("__TPENV_LEASE__", max(1, round(_DEFAULTS.agent.lease_seconds)),
                           "Seconds an intercept outlives its client's last ping (TPENV_AGENT_LEASE_SECONDS)."),
    "agent.sshPort": ("__TPENV_AGENT_SSH_PORT__", _DEFAULTS.agent.ssh_port,
                      "The agent's SSH port on the pod's loopback; clients set the same TPENV_AGENT_SSH_PORT."),
    "agent.healthPort": ("__TPENV_AGENT_HEALTH_PORT__", _DEFAULTS.agent.health_port,
                         "The agent's /readyz and /livez port; clients set the same TPENV_AGENT_HEALTH_PORT."),
    "manager.image": ("__TPENV_MANAGER_IMAGE__", "",
                      "Image of the manager (empty: the agent image: one image, two roles)."),
    "manager.pullPolicy": ("__TPENV_MANAGER_PULL__", _DEFAULTS.agent.image_pull_policy,
                           "imagePullPolicy of the manager (the agent's, as `tpenv manager install` does)."),
    "relay.port": ("__TPENV_RELAY_PORT__", _DEFAULTS.manager.relay_port,
                   "The relay's SSH port on the manager pod's loopback (TPENV_MANAGER_RELAY_PORT)."),
}
TEAM_MODE = "__TPENV_TEAM_MODE__"
WEBHOOK_NS = "__TPENV_WEBHOOK_NS__"
RELAY_CIDR = "__TPENV_RELAY_CIDR__"
TLS = {"ca.crt": "__TPENV_CA_CRT__", "tls.crt": "__TPENV_TLS_CRT__", "tls.key": "__TPENV_TLS_KEY__"}
CHECKSUM = "__TPENV_TLS_CHECKSUM__"
CERT_DAYS = 5 * 365  # as generate_tls


def _expr(key: str) -> str:
    if key == "manager.image":
        return "{{ .Values.manager.image | default .Values.agent.image }}"
    return "{{ .Values.%s }}" % key


def _context(team_mode: bool, cidrs: list[str]) -> dict[str, Any]:
    ctx = manager_context({"agent_image": "x"}, team_mode=team_mode, tls={k: b"-" for k in TLS})
    ctx.update(agent_image=VALUES["agent.image"][0], agent_image_pull_policy=VALUES["agent.pullPolicy"][0],
               image=VALUES["manager.image"][0], image_pull_policy=VALUES["manager.pullPolicy"][0],
               lease=VALUES["agent.leaseSeconds"][0], relay_port=VALUES["relay.port"][0], relay_cidrs=cidrs,
               agent_ssh_port=VALUES["agent.sshPort"][0], agent_health_port=VALUES["agent.healthPort"][0],
               tls=dict(TLS), tls_checksum=CHECKSUM, webhook_namespaces=[WEBHOOK_NS])
    return ctx


def _mark_differences(a: Any, b: Any, sentinel: str) -> Any:
    """``a`` with every scalar that differs in ``b`` replaced by ``sentinel`` (they must be booleans as text)."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _mark_differences(a[k], b[k], sentinel) for k in a}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [_mark_differences(x, y, sentinel) for x, y in zip(a, b)]
    if a == b:
        return a
    if {str(a).lower(), str(b).lower()} != {"true", "false"}:
        raise TemplateError(f"team mode changes {a!r} into {b!r}: the chart generator only turns booleans into a value")
    return sentinel


def _quoted(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _quoted(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_quoted(v) for v in node]
    return DoubleQuotedScalarString(node) if isinstance(node, str) else node


def _dump(docs: list[dict]) -> str:
    yaml = YAML()
    yaml.width = 1 << 16
    yaml.explicit_start = True
    buf = io.StringIO()
    yaml.dump_all([_quoted(d) for d in docs], buf)
    return buf.getvalue()


def manifest_template() -> str:
    """templates/manager.yaml of the chart."""
    on = render_context(_context(True, [RELAY_CIDR]))
    off = render_context(_context(False, [RELAY_CIDR]))
    if len(on) != len(off):
        raise TemplateError("team mode changes which objects are rendered: the chart generator cannot express it")
    docs = [_mark_differences(a, b, TEAM_MODE) for a, b in zip(off, on)]
    # The per-namespace Roles (25-webhook-rbac), rendered once for the sentinel namespace, become
    # a range over webhook.namespaces, after everything else.
    per_ns = [d for d in docs if d["metadata"].get("namespace") == WEBHOOK_NS]
    docs = [d for d in docs if d["metadata"].get("namespace") != WEBHOOK_NS]
    text = _dump(docs)
    # The webhook entries exist only when a namespace is selected (the configuration is the last
    # document: 70-webhook sorts last); otherwise `webhooks: []`, as `tpenv manager install`.
    head, sep, entries = text.rpartition("\nwebhooks:\n")
    if not sep or "\n---" in entries:
        raise TemplateError("the chart generator did not find the webhook entries at the end of the manifests")
    text = (head + "\nwebhooks:\n{{- if .Values.webhook.namespaces }}\n" + entries.rstrip("\n")
            + "\n{{- else }}\n  []\n{{- end }}\n")
    values = re.compile(r'^(?P<indent> *)- "' + WEBHOOK_NS + r'"\n', re.M)
    text = values.sub(lambda m: ("{{- range .Values.webhook.namespaces }}\n"
                                 f'{m["indent"]}- {{{{ . | quote }}}}\n'
                                 "{{- end }}\n"), text)
    # What is left is the ConfigMap's record of the selection (joined with commas).
    text = text.replace(f'"{WEBHOOK_NS}"', '{{ join "," .Values.webhook.namespaces | quote }}')
    text += ("{{- range $ns := .Values.webhook.namespaces }}\n"
             + _dump(per_ns).replace(f'"{WEBHOOK_NS}"', "{{ $ns | quote }}") + "{{- end }}\n")
    # The relay ranges: the (--relay-cidr, sentinel) pair, once per range given.
    pair = re.compile(r'^(?P<indent> *)- "--relay-cidr"\n(?P=indent)- "' + RELAY_CIDR + r'"\n', re.M)
    if len(pair.findall(text)) != 1:
        raise TemplateError("the chart generator did not find the --relay-cidr argument pair once")
    text = pair.sub(lambda m: ("{{- range .Values.relay.cidrs }}\n"
                               f'{m["indent"]}- "--relay-cidr"\n{m["indent"]}- {{{{ . | quote }}}}\n'
                               "{{- end }}\n"), text)
    for key, (sentinel, _, _) in VALUES.items():
        text = text.replace(sentinel, _expr(key))
    text = text.replace(TEAM_MODE, '{{ ternary "true" "false" .Values.teamMode }}')
    text = text.replace(TLS["ca.crt"], "{{ $ca.Cert | b64enc }}").replace(TLS["tls.crt"], "{{ $cert.Cert | b64enc }}")
    text = text.replace(TLS["tls.key"], "{{ $cert.Key | b64enc }}")
    text = text.replace(CHECKSUM, "{{ print $cert.Cert $ca.Cert | sha256sum | trunc 16 }}")
    leftover = re.findall(r"__TPENV_[A-Z_]+__", text)
    if leftover:
        raise TemplateError(f"chart generator: sentinels left in the chart: {sorted(set(leftover))}")
    dns = [NAME, f"{NAME}.{NAMESPACE}", f"{NAME}.{NAMESPACE}.svc", f"{NAME}.{NAMESPACE}.svc.cluster.local"]
    head = ("{{- /* Generated by `tpenv manager chart` from tpenv's templates/manager; do not edit. */}}\n"
            f'{{{{- $ca := genCA "tpenv-manager-ca" {CERT_DAYS} }}}}\n'
            f'{{{{- $cert := genSignedCert "{dns[2]}" nil (list {" ".join(json.dumps(d) for d in dns)})'
            f" {CERT_DAYS} $ca }}}}\n"
            "{{- range .Values.webhook.namespaces }}\n{{- if has . (list %s) }}\n{{- fail (printf "
            "\"webhook.namespaces: %%s is never injected (the control plane's namespaces and tpenv's own are always "
            "left out)\" .) }}\n{{- end }}\n{{- end }}\n" % " ".join(json.dumps(n) for n in sorted(RESERVED_NAMESPACES)))
    return head + text


def values_yaml() -> str:
    lines = ["# Values of the tpenv manager chart (generated by `tpenv manager chart`; the same settings as",
             "# `tpenv manager install`: TPENV_AGENT_* and TPENV_MANAGER_*). The manager always lives in",
             f"# namespace {NAMESPACE} (created by the chart): install the release anywhere else, e.g. default.", ""]
    tree: dict[str, dict[str, tuple[Any, str]]] = {}
    for key, (_, default, description) in VALUES.items():
        group, _, leaf = key.partition(".")
        tree.setdefault(group, {})[leaf] = (default, description)
    tree["webhook"] = {"namespaces": ([], "Namespaces whose new pods the webhook may inject (`--webhook-namespace`); "
                                          "only these, never kube-system, kube-public, kube-node-lease or tpenv. "
                                          "Empty: the webhook injects nowhere.")}
    tree["relay"]["cidrs"] = ([], "Address ranges the relay may dial (empty: the cluster's pod and service ranges, "
                                  "which the relay reads itself).")
    for group, leaves in tree.items():
        lines.append(f"{group}:")
        for leaf, (default, description) in leaves.items():
            lines.append(f"  # {description}")
            shown = '""' if default == "" else ("[]" if default == [] else
                                                 (f'"{default}"' if isinstance(default, str) else str(default)))
            lines.append(f"  {leaf}: {shown}")
    lines += ["# Personal header intercepts by default for every client of this cluster (`--team-mode`).",
              "teamMode: false", ""]
    return "\n".join(lines)


def chart_yaml() -> str:
    version = _version()
    semver = version if re.fullmatch(r"\d+\.\d+\.\d+.*", version) else "0.0.0-dev"
    return ("apiVersion: v2\n"
            "name: tpenv-manager\n"
            "description: The tpenv manager (agent injection webhook and outbound relay), the same objects as "
            "`tpenv manager install`.\n"
            "type: application\n"
            f"version: {semver}\n"
            f'appVersion: "{version}"\n')


def write_chart(directory: Path) -> list[Path]:
    """Write the chart into ``directory`` (created); returns the files written."""
    files = {"Chart.yaml": chart_yaml(), "values.yaml": values_yaml(), "templates/manager.yaml": manifest_template()}
    written = []
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
