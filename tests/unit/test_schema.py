"""schemas/telepresence.schema.json: generated from the models, committed, never stale."""
import json
import subprocess
import sys
from pathlib import Path

from tpenv.config.schema import SCHEMA_FILE, config_schema, schema_text

ROOT = Path(__file__).resolve().parents[2]


# --- stage 1: the committed file is what the models generate ------------------------------------------------------

def test_committed_schema_is_current():
    assert SCHEMA_FILE == ROOT / "schemas" / "telepresence.schema.json"
    assert SCHEMA_FILE.read_text() == schema_text(), \
        "schemas/telepresence.schema.json is stale: run python -m tpenv.config.schema --write"


def test_check_command_agrees():
    ok = subprocess.run([sys.executable, "-m", "tpenv.config.schema", "--check"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


# --- stage 2: the schema says what the models say -----------------------------------------------------------------

def test_every_property_is_documented():
    schema = config_schema()
    for name, node in [("Config", schema), *schema["$defs"].items()]:
        for prop, spec in node.get("properties", {}).items():
            if "$ref" in spec:  # a sub-model: documented by its own docstring
                spec = schema["$defs"][spec["$ref"].rpartition("/")[2]]
            assert spec.get("description"), f"{name}.{prop} has no description"


def test_unknown_keys_are_refused_everywhere():
    schema = config_schema()
    for name, node in [("Config", schema), *schema["$defs"].items()]:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, name


def test_shorthands_are_in_the_schema():
    props = config_schema()["$defs"]["Intercept"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 65535} in props["port"]["anyOf"]
    assert {"type": "boolean"} in props["mount"]["oneOf"]
    assert json.dumps(config_schema()["properties"]["apiVersion"]["const"]) == '"tpenv/v1"'


# --- stage 3: an editor using the schema agrees with tpenv on real files -------------------------------------------

def _yaml(text: str):
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(text)


def test_examples_are_valid_against_the_schema():
    import jsonschema

    validator = jsonschema.Draft202012Validator(config_schema())
    for path in sorted(ROOT.glob("examples/*/telepresence.yaml")):
        assert not list(validator.iter_errors(_yaml(path.read_text()))), path


def test_schema_rejects_what_tpenv_rejects():
    import jsonschema

    validator = jsonschema.Draft202012Validator(config_schema())
    for doc in ["wokload: x", "intercepts: [{workload: w, port: abc}]", "intercepts: [{workload: w, port: 70000}]",
                "connect: {mode: roo}", "intercepts: [{workload: w, port: 1, mount: 5}]"]:
        assert list(validator.iter_errors(_yaml(doc))), doc
