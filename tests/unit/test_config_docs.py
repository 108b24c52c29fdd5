"""docs/config.md is generated from the models and settings; it must match them."""
from pathlib import Path

from tpenv.config.reference import DOC_FILE, reference_text
from tpenv.settings import env_overrides


def test_reference_is_current():
    assert DOC_FILE == Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert DOC_FILE.read_text() == reference_text(), \
        "docs/config.md is stale: run python -m tpenv.config.reference --write"


def test_reference_names_every_key_and_setting():
    text = reference_text()
    for key in ("`workload`", "`path_regex`", "`rewrite_env`", "`restart`", "`namespaces`", "`local`"):
        assert f"| {key} |" in text
    for var, *_ in env_overrides():
        assert f"| `{var}` |" in text
