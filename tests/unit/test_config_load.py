"""telepresence.yaml that is right: what the models make of it (defaults, shorthands, ${VAR})."""
from pathlib import Path

import pytest

from tpenv.config import Config, load_config
from tpenv.config.models import PERSONAL_HEADER, PortMap

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "telepresence.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- stage 1: the smallest file, and the defaults DESIGN promises -------------------------------------------------

def test_empty_file_is_a_valid_config_with_nothing_to_do(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.intercepts == [] and config.forwards == []
    assert config.api_version == "tpenv/v1" and config.connect.mode == "auto"


def test_intercept_defaults(tmp_path):
    ic = load_config(write(tmp_path, "intercepts:\n  - workload: web\n    port: 8080\n")).intercepts[0]
    assert ic.name == "web"  # the workload's name
    assert ic.port == PortMap(local=8080, remote=None)
    assert ic.match is None  # all TCP
    assert ic.mount.path is True and ic.env.format == "docker" and ic.run is None


# --- stage 2: the shorthands a user writes --------------------------------------------------------------------------

@pytest.mark.parametrize("text,local,remote", [
    ("8080", 8080, None), ("'8080'", 8080, None), ("8080:http", 8080, "http"), ("'8080:80'", 8080, 80),
    ("'9000:grpc-api'", 9000, "grpc-api"),
])
def test_port_forms(tmp_path, text, local, remote):
    ic = load_config(write(tmp_path, f"intercepts:\n  - workload: web\n    port: {text}\n")).intercepts[0]
    assert (ic.port.local, ic.port.remote) == (local, remote)


@pytest.mark.parametrize("workload,kind,name", [
    ("web", None, "web"), ("deployment/web", "deployment", "web"), ("statefulset/db", "statefulset", "db"),
    ("replicaset/web-7d9f", "replicaset", "web-7d9f"), ("deploy/web", "deployment", "web"),
])
def test_workload_forms(tmp_path, workload, kind, name):
    ic = load_config(write(tmp_path, f"intercepts:\n  - workload: {workload}\n    port: 1\n")).intercepts[0]
    assert (ic.workload_kind, ic.workload_name, ic.name) == (kind, name, name)


def test_mount_shorthands(tmp_path):
    text = ("intercepts:\n"
            "  - {name: a, workload: a, port: 1, mount: false}\n"
            "  - {name: b, workload: b, port: 2, mount: ./vol}\n"
            "  - {name: c, workload: c, port: 3, mount: {path: ./v, rewrite_env: [TOKEN_FILE]}}\n")
    a, b, c = load_config(write(tmp_path, text)).intercepts
    assert a.mount.path is False and b.mount.path == "./vol"
    assert (c.mount.path, c.mount.rewrite_env) == ("./v", ["TOKEN_FILE"])


def test_match_headers_auto_is_the_personal_header(tmp_path):
    text = "intercepts:\n  - workload: web\n    port: 1\n    match: {headers: auto, path_prefix: /api}\n"
    match = load_config(write(tmp_path, text)).intercepts[0].match
    assert match.wire("s1:web") == {"headers": {PERSONAL_HEADER: r"s1:web"}, "path": {"prefix": "/api"}}


def test_env_set_values_become_strings(tmp_path):
    text = "intercepts:\n  - workload: web\n    port: 1\n    env: {set: {PORT: 8080, DEBUG: true, RATIO: 0.5}}\n"
    assert load_config(write(tmp_path, text)).intercepts[0].env.set == {"PORT": "8080", "DEBUG": "true",
                                                                         "RATIO": "0.5"}


def test_run_command_forms_and_cwd_relative_to_the_file(tmp_path):
    (tmp_path / "svc").mkdir()
    (tmp_path / "svc" / "main.py").write_text("")
    text = ("intercepts:\n  - workload: web\n    port: 1\n"
            "    run: {command: 'python3 main.py', cwd: svc, watch: ['**/*.py'], restart: always}\n")
    config = load_config(write(tmp_path, text))
    run = config.intercepts[0].run
    assert run.argv() == ["sh", "-c", "python3 main.py"] and run.restart == "always"
    assert config.resolve(run.cwd) == (tmp_path / "svc").resolve()


def test_forward_local_defaults_to_the_port(tmp_path):
    text = "forwards:\n  - {service: db, namespace: data, port: 5432}\n  - {service: web, port: http, local: 9000}\n"
    db, web = load_config(write(tmp_path, text)).forwards
    assert (db.local, web.port, web.local) == (5432, "http", 9000)


# --- stage 3: ${VAR} from the environment -------------------------------------------------------------------------

def test_env_references_expand(tmp_path):
    text = ("namespace: ${NS}\nintercepts:\n  - workload: web\n    port: ${PORT:-8080}\n"
            "    env: {set: {A: 'x${EMPTY:-d}y', B: '$${NOT_EXPANDED}'}}\n")
    config = load_config(write(tmp_path, text), environ={"NS": "team-a", "EMPTY": ""})
    ic = config.intercepts[0]
    assert config.namespace == "team-a" and ic.port.local == 8080
    assert ic.env.set == {"A": "xdy", "B": "${NOT_EXPANDED}"}


def test_namespace_inheritance(tmp_path):
    text = "namespace: team\nintercepts:\n  - {name: a, workload: a, port: 1}\n" \
           "  - {name: b, workload: b, port: 2, namespace: other}\n"
    config = load_config(write(tmp_path, text))
    assert [config.namespace_of(ic) for ic in config.intercepts] == ["team", "other"]


# --- stage 4: the DESIGN sketch and the shipped examples load -----------------------------------------------------

def test_design_sketch_loads(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "index.php").write_text("")
    text = """\
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
    workload: wordpress
    namespace: wordpress
    port: 8080:http
    match:
      headers: {x-dev: alice}
      path_prefix: /api
    env:
      file: wordpress.env
      format: docker
      set: {LOG_LEVEL: debug}
      rewrite:
        MARIADB_HOST: "{{ value }}.{{ namespace }}"
    mount:
      path: ./wordpress.vol
      rewrite_env: [AWS_WEB_IDENTITY_TOKEN_FILE]
    run:
      command: [php, -S, 0.0.0.0:8080]
      watch: ["src/**/*.php"]
      ignore: ["vendor/**"]
"""
    config = load_config(write(tmp_path, text))
    assert isinstance(config, Config) and config.intercepts[0].port == PortMap(local=8080, remote="http")


@pytest.mark.parametrize("path", sorted(ROOT.glob("examples/*/telepresence.yaml")), ids=lambda p: p.parent.name)
def test_examples_load(path):
    assert load_config(path).intercepts


def test_hello_example_is_what_the_demo_expects():
    ic = load_config(ROOT / "examples" / "hello" / "telepresence.yaml").intercepts[0]
    assert (ic.name, ic.workload_name, ic.port.local, ic.port.remote) == ("hello", "hello", 8080, 80)
    assert ic.run.argv() == ["python3", "server.py"] and ic.run.watch == ["*.py"] and ic.env.file
