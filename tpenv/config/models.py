"""The pydantic models of telepresence.yaml: the truth about what the file may say.

This module holds the file itself (Config), its `contexts:` and `agent:` sections, and re-exports the rest:
the `intercepts:` entries live in intercept.py, `forwards:` and `connect:` in network.py, and the small
validated strings they share in fields.py. Every field carries a description (it becomes the JSON Schema
and docs/config.md). Validators raise ``_fail`` errors whose context carries a ``suggestion``; the loader
(loader.py) turns every pydantic error into a located ``Problem``. Checks that need the whole file
(duplicate names and ports, watch globs on disk) live in checks.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, model_validator

# The sections live in their own modules; their names are re-exported here, where callers have always found them.
from tpenv.config.fields import ContextName, Namespace, _fail, did_you_mean, is_dns_label
from tpenv.config.intercept import (ENV_FORMATS, MOUNT_MODES, PERSONAL_HEADER, TEMPLATE_VARIABLES, WORKLOAD_KINDS,
                                    EnvSpec, Intercept, Match, MountSpec, PortMap, RunSpec, compile_regex,
                                    compile_template, parse_port)
from tpenv.config.network import CONNECT_MODES, DEFAULT_EXCLUDED_SUFFIXES, LEGACY_MODES, Connect, Forward
from tpenv.errors import Problem

API_VERSION = "tpenv/v1"


def is_image_ref(value: str) -> bool:
    """Loosely an image reference: non-empty, no whitespace (the registry has the last word)."""
    return bool(value) and not any(c.isspace() for c in value)


def _image_ref(value: str) -> str:
    if not is_image_ref(value):
        raise _fail(f"{value!r} is not an image reference", "e.g. registry.example.com/tpenv/agent:0.1.0")
    return value


class AgentConfig(BaseModel):
    """The traffic agent tpenv injects, for this project; read at start. --agent-image and TPENV_AGENT_* win over it."""

    model_config = ConfigDict(extra="forbid")

    image: Annotated[str, AfterValidator(_image_ref)] | None = Field(None, description=(
        "Container image of the agent (e.g. your registry's copy of agent/Dockerfile's build); "
        "default: the setting agent.image."))
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(None, description=(
        "imagePullPolicy of the agent container; default: the setting agent.image_pull_policy."))



class KubeContext(BaseModel):
    """How to find one cluster in each reader's kubeconfig, without naming the reader's own context.

    Every key given narrows the reader's kubeconfig contexts, in this order: `server`, `cluster`,
    then the first of `contexts` that is left; exactly one context must remain."""

    model_config = ConfigDict(extra="forbid")

    server: str | None = Field(None, description=(
        "API server URL, as in the kubeconfig's clusters[].cluster.server (e.g. https://10.0.0.1:6443)."))
    cluster: str | None = Field(None, description="Name of the cluster in the kubeconfig (clusters[].name).")
    contexts: list[str] = Field(default_factory=list, description=(
        "Candidate kubeconfig context names, in order of preference: the first the reader has is used."))
    namespace: Namespace | None = Field(None, description=(
        "Namespace of the units in this context; default: the file's namespace, else the kube context's."))
    default: bool = Field(False, description=(
        "The context of units that name none (at most one entry); default: the first entry. "
        "--context and TPENV_CONTEXT win over it."))

    @model_validator(mode="after")
    def _says_how(self) -> "KubeContext":
        if self.server is None and self.cluster is None and not self.contexts:
            raise _fail("a context entry needs at least one of server, cluster, contexts",
                        "e.g. server: https://203.0.113.10:6443 (see `kubectl config view --minify`)")
        return self


class Config(BaseModel):
    """telepresence.yaml: what `tpenv up` brings up and keeps up."""

    model_config = ConfigDict(extra="forbid", title="telepresence.yaml")

    api_version: Literal["tpenv/v1"] = Field(API_VERSION, alias="apiVersion", description="Version of this format.")
    context: str | None = Field(None, description=(
        "Kubeconfig context of every unit, for a file used by one person; default: the current context. "
        "A file shared by a team uses `contexts:` instead."))
    contexts: dict[ContextName, KubeContext] = Field(default_factory=dict, description=(
        "Named clusters, each found in the reader's kubeconfig by server URL, cluster name or candidate "
        "context names; units choose one with `context:`."))
    namespace: Namespace | None = Field(None, description="Default namespace; default: the context's namespace.")
    connect: Connect = Field(default_factory=Connect, description=Connect.__doc__)
    agent: AgentConfig = Field(default_factory=AgentConfig, description=AgentConfig.__doc__)
    forwards: list[Forward] = Field(default_factory=list, description="Service ports made reachable on local ports.")
    intercepts: list[Intercept] = Field(default_factory=list, description="Workload ports sent to this machine.")
    _source: Path | None = PrivateAttr(None)
    _locator: Any = PrivateAttr(None)  # the loader's positions, for problems found after loading
    _notes: list[Any] = PrivateAttr(default_factory=list)  # located warnings (ignored WorkstationState fields)

    @model_validator(mode="after")
    def _one_way_to_name_contexts(self) -> "Config":
        if self.context is not None and self.contexts:
            raise _fail("give either context (one kubeconfig context) or contexts (named clusters), not both",
                        "with contexts:, choose the default with `default: true` on an entry, or --context NAME")
        defaults = [name for name, entry in self.contexts.items() if entry.default]
        if len(defaults) > 1:
            raise _fail(f"contexts: {', '.join(defaults)} all say default: true; at most one may")
        return self

    @property
    def connection(self) -> Connect | None:
        """The ``connect:`` section when the file asks for a connection (given, and not ``off``)."""
        if "connect" not in self.model_fields_set or self.connect.capture == "off":
            return None
        return self.connect

    @property
    def default_context(self) -> str | None:
        """The entry units use when they name none: the one with ``default: true``, else the first."""
        for name, entry in self.contexts.items():
            if entry.default:
                return name
        return next(iter(self.contexts), None)

    def problem(self, path: tuple, message: str, suggestion: str | None = None) -> Any:
        """A located Problem at ``path`` of the file this was loaded from (1:1 when built in code)."""
        if self._locator is not None:
            return self._locator.problem(path, message, suggestion)
        return Problem(str(self._source or "telepresence.yaml"), 1, 1, message, suggestion)

    @property
    def source(self) -> Path | None:
        """The file this was loaded from (None when built in code)."""
        return self._source

    def resolve(self, path: str | Path) -> Path:
        """A path from the file, relative to the file's directory (or the working directory)."""
        base = self._source.parent if self._source else Path.cwd()
        return (base / Path(path).expanduser()).resolve()

    def namespace_of(self, item: Intercept | Forward) -> str | None:
        """The item's namespace, else the file's; None means the kube context's namespace."""
        return item.namespace or self.namespace

    def intercept(self, name: str) -> Intercept:
        for ic in self.intercepts:
            if ic.name == name:
                return ic
        raise KeyError(name)


__all__ = ["Config", "KubeContext", "AgentConfig", "Intercept", "Match", "EnvSpec", "MountSpec", "RunSpec", "Forward",
           "Connect", "PortMap", "parse_port", "is_dns_label", "is_image_ref", "compile_regex", "compile_template",
           "did_you_mean", "API_VERSION", "PERSONAL_HEADER", "TEMPLATE_VARIABLES", "ENV_FORMATS", "WORKLOAD_KINDS",
           "MOUNT_MODES", "CONNECT_MODES", "LEGACY_MODES", "DEFAULT_EXCLUDED_SUFFIXES"]
