"""What every verb gets besides its arguments: settings, output mode, and the config file."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel

from tpenv.config import Config, load_config
from tpenv.config.models import is_dns_label, is_image_ref
from tpenv.errors import ConfigError, UsageError
from tpenv.settings import Settings

OUTPUTS = ("text", "json", "yaml")


def plain(data: Any) -> Any:
    """``data`` as JSON-able values: models dumped by alias, paths as strings."""
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json", by_alias=True)
    if isinstance(data, dict):
        return {str(k): plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple, set)):
        return [plain(v) for v in data]
    if isinstance(data, Path):
        return str(data)
    return data


def dump(data: Any, output: str) -> str:
    if output == "yaml":
        from io import StringIO

        from ruamel.yaml import YAML

        yaml = YAML(typ="safe", pure=True)
        yaml.default_flow_style = False
        yaml.sort_base_mapping_type_on_output = False  # keep the order the verb chose, like JSON does
        buf = StringIO()
        yaml.dump(plain(data), buf)
        return buf.getvalue()
    return json.dumps(plain(data), indent=2, ensure_ascii=False) + "\n"


@dataclass
class CliContext:
    settings: Settings
    output: str = "text"
    debug: bool = False
    config_file: Path = Path("telepresence.yaml")
    namespace: str | None = None
    kube_context: str | None = None  # --context, else TPENV_CONTEXT
    context_by: str = "--context"  # which of the two set kube_context (for messages)
    agent_image: str | None = None  # --agent-image
    stdout: TextIO | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    _agent_from_file: bool = False

    def apply_agent_flag(self) -> None:
        """--agent-image wins over everything (the environment, the file)."""
        if self.agent_image is not None:
            if not is_image_ref(self.agent_image):
                raise UsageError(f"--agent-image {self.agent_image!r}: not an image reference",
                                 hint="e.g. --agent-image registry.example.com/tpenv/agent:0.1.0")
            self.settings.agent.image = self.agent_image

    def _apply_agent_config(self, config: Config) -> None:
        """The file's ``agent:`` section, where neither the flag nor the environment set the value.

        Read once, when tpenv starts: a later edit of it does not swap the agent under running
        intercepts (restart tpenv for that)."""
        if self._agent_from_file:
            return
        self._agent_from_file = True
        if config.agent.image and self.agent_image is None and "TPENV_AGENT_IMAGE" not in self.environ:
            self.settings.agent.image = config.agent.image
        if config.agent.image_pull_policy and "TPENV_AGENT_IMAGE_PULL_POLICY" not in self.environ:
            self.settings.agent.image_pull_policy = config.agent.image_pull_policy

    def emit(self, text: str, data: object) -> None:
        """Print ``text`` for people, or ``data`` as JSON/YAML for scripts (-o)."""
        out = self.stdout or sys.stdout
        if self.output == "text":
            out.write(text if text.endswith("\n") or not text else text + "\n")
        else:
            out.write(dump(data, self.output))
        out.flush()

    def apply_project_agent(self, warn: Callable[[str], None]) -> None:
        """For verbs driven by flags (intercept): the file's ``agent:`` section, when the file is
        there, so `tpenv intercept` and `tpenv up` in one project run the same agent. A file that
        does not load is the file's problem, not the intercept's: one warning, and on we go."""
        if not self.config_file.is_file():
            return
        try:
            config = load_config(self.config_file)  # the file alone: -n/--context are the verb's to check
        except ConfigError as e:
            first = (e.message.splitlines() or [""])[0]
            warn(f"{self.config_file}: not read ({first}); its agent: section does not apply")
            return
        self._apply_agent_config(config)

    def cluster_context(self) -> str | None:
        """The kubeconfig context of verbs that work on one cluster (list, intercept, uninstall,
        manager): --context / TPENV_CONTEXT, where a name of the file's ``contexts:`` is found in
        the kubeconfig, and without either the file's default entry. Without a file, or one without
        ``contexts:``, the flag as given (None: the current context)."""
        return self.cluster_target()[0]

    def cluster_target(self) -> tuple[str | None, str | None]:
        """:meth:`cluster_context`, and the namespace a unit naming none would get there in a file
        with ``contexts:`` (the entry's, else the file's; None: the kube context's). ``-n`` is
        the verb's to put first."""
        if not self.config_file.is_file():
            return self.kube_context, None
        try:
            config = load_config(self.config_file)
        except ConfigError:
            return self.kube_context, None  # the file's problems are `tpenv validate`'s to report
        if not config.contexts:
            return self.kube_context, None
        from tpenv.engine.contexts import default_target  # the kube kit: only for verbs that need it
        target = default_target(config, selected=self.kube_context, selected_by=self.context_by)
        return target.kube_context, target.namespace or config.namespace

    def load_config(self) -> Config:
        """The config file with the -n / --context flags applied; ConfigError when it is wrong."""
        config = load_config(self.config_file)
        if self.namespace:
            if not is_dns_label(self.namespace):
                raise UsageError(f"-n {self.namespace!r}: not a valid namespace name",
                                 hint="lowercase letters, digits and '-', at most 63 characters")
            config.namespace = self.namespace
        if self.kube_context and not config.contexts:
            config.context = self.kube_context  # with contexts:, `up` resolves the name (engine/contexts.py)
        self._apply_agent_config(config)
        return config
