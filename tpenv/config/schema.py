"""The JSON Schema of telepresence.yaml, generated from the models.

    python -m tpenv.config.schema            print it
    python -m tpenv.config.schema --write    regenerate schemas/telepresence.schema.json
    python -m tpenv.config.schema --check    exit 1 when the committed file is stale

Editors pick it up with ``# yaml-language-server: $schema=<path or URL>`` at the top of the file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tpenv.config.models import Config

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "telepresence.schema.json"


def config_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(by_alias=True, mode="validation")
    # No $id: there is no published URL yet; editors use a file path (see docs/config.md).
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = schema_text()
    if "--write" in argv:
        SCHEMA_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA_FILE}")
    elif "--check" in argv:
        current = SCHEMA_FILE.read_text(encoding="utf-8") if SCHEMA_FILE.exists() else ""
        if current != text:
            print(f"{SCHEMA_FILE} is stale: run python -m tpenv.config.schema --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
