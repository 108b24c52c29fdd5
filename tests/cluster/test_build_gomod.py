"""The Go wrapper modules: the committed Kubernetes go.mod is exactly what build.py generates
from the tag's own go.mod, so bumping K8S_VERSION is `regenerate_k8s_gomod()`, never hand edits."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import build

TAG_GOMOD_SAMPLE = """module k8s.io/kubernetes

go 1.24.0

require (
\tgithub.com/spf13/cobra v1.9.1
\tk8s.io/api v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
)
"""


def test_generator_pins_every_staging_module_to_the_matching_v0_version():
    out = build.k8s_wrapper_gomod(TAG_GOMOD_SAMPLE, "v1.34.4")
    assert "require k8s.io/kubernetes v1.34.4" in out
    assert "\tk8s.io/api => k8s.io/api v0.34.4\n" in out
    assert "\tk8s.io/client-go => k8s.io/client-go v0.34.4\n" in out
    assert "./staging" not in out
    assert "go 1.24.0" in out


def test_committed_k8s_gomod_matches_the_tags_gomod():
    # Stage 1: the tag's go.mod, from the module cache (or the Go module proxy on a fresh machine).
    cp = subprocess.run([build.go_binary(), "mod", "download", "-json", f"k8s.io/kubernetes@{build.K8S_VERSION}"],
                        env=build.go_env(), cwd="/", capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stderr
    tag_gomod = Path(json.loads(cp.stdout)["GoMod"]).read_text()

    # Stage 2: regenerate and compare with the committed file.
    committed = (build.GOMOD_DIR / "k8s" / "go.mod").read_text()
    assert build.k8s_wrapper_gomod(tag_gomod) == committed, \
        "tests/cluster/gomod/k8s/go.mod is stale: run build.regenerate_k8s_gomod()"
