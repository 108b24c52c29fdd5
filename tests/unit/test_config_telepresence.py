"""Telepresence WorkstationState manifests read as telepresence.yaml: each field mapped, refused
at its line, or noted at its line; `tpenv init --from-telepresence` writes the equivalent."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tpenv.config import load_config
from tpenv.config.loader import translated_workstation_state
from tpenv.config.reference import reference_text
from tpenv.config.telepresence import MAPPING
from tpenv.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TPENV = Path(sys.executable).parent / "tpenv"

FULL = """\
apiVersion: telepresence.io/v1alpha1
kind: WorkstationState
connection:
  name: dev
  context: kind-dev
  namespace: team
  mappedNamespaces: [team, shared]
attachments:
  - type: intercept
    name: api
    workload: api-server
    namespace: backend
    service: api
    ports: ["9090:http"]
    httpHeaders: ["x-dev=alice", "x-env=dev.*"]
    httpPathPrefixes: [/v2]
    env: {file: api.env, syntax: compose}
    mount: {path: ./api.vol}
    command: [python3, -m, http.server, "9090"]
    mechanism: http
    address: 127.0.0.1
  - type: intercept
    name: web
    ports: [8080]
    httpHeaders: [auto]
    env: {json: web.json}
    mount: {enabled: false}
"""


# --- stage 1: every supported field lands where the mapping table says ---------------------------------------------

def test_a_full_manifest_maps_field_by_field(tmp_path):
    path = tmp_path / "dev.yaml"
    path.write_text(FULL)
    config = load_config(path)
    assert (config.context, config.namespace, config.connect.namespaces) == ("kind-dev", "team", ["team", "shared"])
    api, web = config.intercepts
    assert (api.name, api.workload, api.namespace, api.service) == ("api", "api-server", "backend", "api")
    assert (api.port.local, api.port.remote) == (9090, "http")
    assert api.match.headers == {"x-dev": "alice", "x-env": "dev.*"} and api.match.path_prefix == "/v2"
    assert (api.env.file, api.env.format) == ("api.env", "compose")
    assert str(api.mount.path) == "./api.vol" and api.run.command == ["python3", "-m", "http.server", "9090"]
    assert (web.workload, web.port.local, web.match.headers, web.mount.path) == ("web", 8080, "auto", False)
    assert (web.env.file, web.env.format) == ("web.json", "json")


def test_the_documented_example_is_the_hello_intercept():
    ws = load_config(ROOT / "examples" / "hello" / "workstation-state.yaml").intercepts[0]
    native = load_config(ROOT / "examples" / "hello" / "telepresence.yaml").intercepts[0]
    for field in ("name", "port", "match", "mount"):
        assert getattr(ws, field) == getattr(native, field), field
    assert (ws.workload, ws.env.file, ws.run.command) == ("hello", native.env.file, native.run.command)


# --- stage 2: what tpenv cannot do is refused at its line; harmless fields are noted -------------------------------

@pytest.mark.parametrize("extra,line,col,needle", [
    ("    toPod: [\"5432\"]\n", 8, 5, "toPod is not supported"),
    ("    container: app\n", 8, 5, "container is not supported"),
    ("    ports: [\"8080:80\", \"8443:443\"]\n", 8, 24, "one port per intercept"),
    ("    nodeAgent: true\n", 8, 5, "node-scoped agents"),
    ("    mount: {readOnly: true}\n", 8, 13, "mount.readOnly is not supported"),
    ("    env: {syntax: csh}\n", 8, 11, "env.syntax 'csh'"),
    ("    speed: fast\n", 8, 5, "unknown key 'speed'"),
    ("    env: {file: a.env, expand: true}\n", 8, 24, "unknown key 'expand' in env"),
    ("    env: a.env\n", 8, 5, "env: expected a mapping"),
    ("    mount: {path: ./v, remote: /data}\n", 8, 24, "unknown key 'remote' in mount"),
    ("    mount: false\n", 8, 5, "mount: expected a mapping"),
])
def test_unsupported_fields_are_errors_at_their_line(tmp_path, extra, line, col, needle):
    base = ("apiVersion: telepresence.io/v1alpha1\nkind: WorkstationState\nconnection:\n  namespace: team\n"
            "attachments:\n  - type: intercept\n    name: api\n")
    if "ports:" not in extra:
        extra += "    ports: [\"8080:80\"]\n"
    path = tmp_path / "dev.yaml"
    path.write_text(base + extra)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    [problem] = [p for p in e.value.problems if needle in p.message]
    assert (problem.file, problem.line, problem.column) == (str(path), line, col)


def test_other_attachment_types_and_connection_routing_are_refused(tmp_path):
    path = tmp_path / "dev.yaml"
    path.write_text("apiVersion: telepresence.io/v1alpha1\nkind: WorkstationState\nconnection:\n"
                    "  alsoProxy: [10.0.0.0/8]\nattachments:\n  - type: replace\n    name: api\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert [(p.line, p.column) for p in e.value.problems] == [(4, 3), (6, 5)]
    assert "connection.alsoProxy is not supported" in e.value.problems[0].message
    assert "attachment type 'replace' is not supported" in e.value.problems[1].message


def test_harmless_fields_are_warnings_at_their_line(tmp_path, caplog):
    path = tmp_path / "dev.yaml"
    path.write_text(FULL.replace("    mechanism: http\n", "    plaintext: true\n"))
    with caplog.at_level(logging.WARNING, logger="tpenv.config"):
        config = load_config(path)
    assert [str(n).split(": ", 1)[0] for n in config._notes] == [f"{path}:4:3", f"{path}:20:5"]
    assert any("connection.name is ignored" in r.getMessage() for r in caplog.records)


def test_a_tpenv_value_error_points_into_the_manifest(tmp_path):
    path = tmp_path / "dev.yaml"
    path.write_text(FULL.replace('"9090:http"', '"x:http"'))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert [(p.line, p.column) for p in e.value.problems] == [(14, 13)]


# --- stage 3: init --from-telepresence, and the docs' table --------------------------------------------------------

def test_init_from_telepresence_writes_the_equivalent_file(tmp_path):
    (tmp_path / "dev.yaml").write_text(FULL)
    cp = subprocess.run([str(TPENV), "-f", "telepresence.yaml", "init", "--from-telepresence", "dev.yaml"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    # The fields it ignores are said on stderr at their line, never dropped silently.
    assert "dev.yaml:4:3: WorkstationState: connection.name is ignored" in cp.stderr, cp.stderr
    written = load_config(tmp_path / "telepresence.yaml")
    assert written.model_dump() == load_config(tmp_path / "dev.yaml").model_dump()
    again = subprocess.run([str(TPENV), "init", "--from-telepresence", "dev.yaml"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "never overwrites" in again.stderr


def test_init_from_telepresence_says_every_ignored_field_at_its_line(tmp_path):
    (tmp_path / "dev.yaml").write_text(FULL.replace("    mechanism: http\n", "    plaintext: true\n")
                                       .replace("  name: dev\n", "  name: dev\n  managerNamespace: ambassador\n"))
    cp = subprocess.run([str(TPENV), "init", "--from-telepresence", "dev.yaml"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    said = [line.split("WARNING ", 1)[1] for line in cp.stderr.splitlines() if "WARNING " in line]
    assert [s.split(": WorkstationState: ")[0] for s in said] == ["dev.yaml:4:3", "dev.yaml:5:3", "dev.yaml:21:5"]
    assert ["is ignored" in s for s in said] == [True, True, True]
    assert "managerNamespace" in said[1] and "plaintext" in said[2]


def test_init_from_a_file_that_is_not_a_manifest_says_so(tmp_path):
    (tmp_path / "x.yaml").write_text("apiVersion: tpenv/v1\n")
    with pytest.raises(ConfigError, match="expected kind: WorkstationState"):
        translated_workstation_state(tmp_path / "x.yaml")


def test_docs_carry_the_mapping_table():
    text = reference_text()
    assert "## Telepresence WorkstationState manifests" in text
    assert all(f"`{source}`" in text for source, _, _ in MAPPING)
