"""The local cluster's storage: rancher's local-path-provisioner as the default StorageClass.

`cluster up` renders templates/cluster/local-path-provisioner.yaml.j2 (Jinja2), parses it
(YAML) and applies the objects with kubectl, then waits for the provisioner's rollout, so a
PersistentVolumeClaim made right after `up` binds. Claims become directories under
$STATE/local-path on the host (the node), kept across `cluster down`/`up` like etcd's data.

Jinja2 and PyYAML are the only non-stdlib imports of the cluster code: the machine's python3
has both; else the project's .venv (`python3 devspace.py setup`) renders in a child process.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TEMPLATE = REPO / "templates" / "cluster" / "local-path-provisioner.yaml.j2"
NAMESPACE = "local-path-storage"
STORAGE_CLASS = "local-path"
PROVISIONER = "rancher.io/local-path"


def render(image: str, node_path: str) -> list[dict]:
    """The provisioner's objects, rendered and parsed (a pure function of its arguments)."""
    import jinja2
    import yaml

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    text = env.from_string(TEMPLATE.read_text()).render(
        namespace=NAMESPACE, storage_class=STORAGE_CLASS, provisioner=PROVISIONER, image=image, node_path=node_path)
    return [d for d in yaml.safe_load_all(text) if d]


def _render_anywhere(image: str, node_path: str) -> list[dict]:
    try:
        return render(image, node_path)
    except ImportError:
        pass
    venv_py = REPO / ".venv" / "bin" / "python"
    if not venv_py.exists():
        raise RuntimeError("rendering the storage manifests needs Jinja2 and PyYAML: `pip install jinja2 pyyaml` "
                           "for this python3, or run `python3 devspace.py setup` first")
    out = subprocess.run([str(venv_py), str(Path(__file__)), "render", image, node_path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def install(kubectl, image: str, node_path: Path, log=print) -> None:
    """Apply the provisioner and its StorageClass, and wait until it runs (idempotent)."""
    node_path.mkdir(parents=True, exist_ok=True)
    objs = _render_anywhere(image, str(node_path))
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    r = kubectl("-n", NAMESPACE, "rollout", "status", "deployment/local-path-provisioner", "--timeout=180s",
                check=False)
    if r.returncode != 0:
        pods = kubectl("-n", NAMESPACE, "get", "pods", "-o", "wide", check=False).stdout
        raise RuntimeError(f"the local-path provisioner did not become ready in 180s: {r.stderr.strip()}\n{pods}")
    log(f"storage: StorageClass {STORAGE_CLASS} (default) -> {node_path}")


if __name__ == "__main__" and sys.argv[1:2] == ["render"]:
    print(json.dumps(render(sys.argv[2], sys.argv[3])))
