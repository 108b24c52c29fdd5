"""What every verb gets besides its arguments: settings, output mode, and the config file."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel

from tpenv.config import Config, load_config
from tpenv.config.models import is_dns_label
from tpenv.errors import UsageError
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
    kube_context: str | None = None
    stdout: TextIO | None = None

    def emit(self, text: str, data: object) -> None:
        """Print ``text`` for people, or ``data`` as JSON/YAML for scripts (-o)."""
        out = self.stdout or sys.stdout
        if self.output == "text":
            out.write(text if text.endswith("\n") or not text else text + "\n")
        else:
            out.write(dump(data, self.output))
        out.flush()

    def load_config(self) -> Config:
        """The config file with the -n / --context flags applied; ConfigError when it is wrong."""
        config = load_config(self.config_file)
        if self.namespace:
            if not is_dns_label(self.namespace):
                raise UsageError(f"-n {self.namespace!r}: not a valid namespace name",
                                 hint="lowercase letters, digits and '-', at most 63 characters")
            config.namespace = self.namespace
        if self.kube_context:
            config.context = self.kube_context
        return config
