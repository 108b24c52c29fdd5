"""Whatever bytes are in telepresence.yaml, loading ends in a Config or a ConfigError, never anything else.

Hypothesis feeds random documents, random structures built from the real key names, and
mutations of real files (the examples and the DESIGN sketch): deleted lines, renamed keys,
swapped value types, garbled indentation, inserted bytes.
"""
import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from tpenv.config import Config, load_config
from tpenv.config.schema import config_schema
from tpenv.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SKETCH = """\
apiVersion: tpenv/v1
context: kind-dev
namespace: default
connect:
  mode: auto
  namespaces: [default, wordpress]
forwards:
  - service: wordpress-mariadb
    namespace: wordpress
    port: 3306
    local: 13306
intercepts:
  - name: wordpress
    workload: deployment/wordpress
    port: 8080:http
    match:
      headers: {x-dev: alice}
      path_prefix: /api
    env:
      file: wordpress.env
      set: {LOG_LEVEL: debug, HOST: "${HOSTNAME:-x}"}
      rewrite:
        MARIADB_HOST: "{{ value }}.{{ namespace }}"
    mount:
      path: ./wordpress.vol
      rewrite_env: [AWS_WEB_IDENTITY_TOKEN_FILE]
    run:
      command: [php, -S, 0.0.0.0:8080]
      cwd: .
      watch: ["*.yaml"]
"""
SOURCES = [SKETCH] + [p.read_text() for p in sorted(ROOT.glob("examples/*/telepresence.yaml"))]


def _key_names(schema: dict) -> list[str]:
    names = set()
    for node in [schema, *schema.get("$defs", {}).values()]:
        names.update(node.get("properties", {}))
    return sorted(names)


KEYS = _key_names(config_schema())
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 70000), st.floats(allow_nan=False),
                    st.text(max_size=20), st.sampled_from(["8080:http", "auto", "deployment/x", "{{ value }}",
                                                           "${HOME}", "${", "(", "**/*", "off", "docker"]))
DOCS = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5)), max_leaves=25)
VALUES = ["[]", "{}", "null", "1", "true", "'x'", "-1", "[1, 2]", "{a: b}", "&a x", "*a", "!!binary aGk=",
          "2020-01-01", "${X}", "${", "|\n  text", "!custom x", "? [a]\n  : b", "~", "0x1F", ".inf"]


def load_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "telepresence.yaml"
        path.write_bytes(data)
        (Path(d) / "a.yaml").write_text("")  # something for watch globs to find
        try:
            assert isinstance(load_config(path, environ={"HOME": "/h"}), Config)
        except ConfigError as e:
            assert e.problems and all(p.line >= 0 and p.column >= 0 for p in e.problems)
            assert str(e)


@st.composite
def mutated(draw) -> bytes:
    lines = draw(st.sampled_from(SOURCES)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "rename", "swap", "indent", "bytes", "duplicate"]))
        line = lines[i]
        if op == "delete":
            del lines[i]
        elif op == "rename" and ":" in line:
            key, _, rest = line.partition(":")
            indent = key[:len(key) - len(key.lstrip(" -"))]
            lines[i] = indent + draw(st.sampled_from(KEYS) | st.text(max_size=10)) + ":" + rest
        elif op == "swap" and ":" in line:
            key, _, _ = line.partition(":")
            lines[i] = key + ": " + draw(st.sampled_from(VALUES))
        elif op == "indent":
            lines[i] = " " * draw(st.integers(0, 9)) + line.lstrip(" ")
        elif op == "duplicate":
            lines.insert(i, line)
        else:
            text = "\n".join(lines).encode()
            pos = draw(st.integers(0, len(text)))
            return text[:pos] + draw(st.binary(min_size=1, max_size=8)) + text[pos:]
    return "\n".join(lines).encode()


# --- stage 1: the real files load, so the mutations start from something valid -----------------------------------

def test_sources_are_valid():
    for source in SOURCES:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "a.yaml").write_text("")
            (Path(d) / "server.py").write_text("")
            path = Path(d) / "telepresence.yaml"
            path.write_text(source)
            load_config(path, environ={})


# --- stage 2: random input ---------------------------------------------------------------------------------------

@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(data):
    load_bytes(data)


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list("abc:-[]{}'\"#&*!|>%@`,? \n\t0123456789$")), max_size=200))
def test_random_yaml_punctuation(text):
    load_bytes(text.encode())


@SETTINGS
@given(DOCS)
def test_random_structures_with_real_keys(doc):
    buf = io.StringIO()
    YAML().dump(doc, buf)
    load_bytes(buf.getvalue().encode())


# --- stage 3: mutations of real files -----------------------------------------------------------------------------

@SETTINGS
@given(mutated())
def test_mutated_real_files(data):
    load_bytes(data)
