"""The tpenv-auth keys (docs/protocol.md §2) work with the client's and the agent's SSH code.
One maker (tpenv_agent/authkeys.py) for both writers of the Secret: the manager in webhook mode,
the client in patch mode."""
from __future__ import annotations

import subprocess
import sys

import asyncssh

from tpenv.engine.injection import auth_secret_manifest
from tpenv.kits.agent_client import issue_session_key, make_auth_material
from tpenv_agent.incluster import auth_material


def test_material_signs_session_certificates_the_host_accepts():
    assert make_auth_material is auth_material  # one maker: the client's name for the manager's
    for material in (auth_material(), make_auth_material()):
        assert set(material) == {"ca_key", "ca.pub", "host_key", "host_key.pub"}
        key, cert = issue_session_key(material["ca_key"], "sess-1")
        ca_pub = asyncssh.import_public_key(material["ca.pub"])
        assert cert.signing_key.public_data == ca_pub.public_data and cert.principals == ["sess-1"]
        host = asyncssh.import_private_key(material["host_key"])
        assert host.public_data == asyncssh.import_public_key(material["host_key.pub"]).public_data


def test_every_call_makes_new_keys_and_both_writers_fill_the_same_secret_shape():
    a, b = auth_secret_manifest("ns", auth_material()), auth_secret_manifest("ns", make_auth_material())
    assert a["metadata"] == b["metadata"] and set(a["data"]) == set(b["data"])
    assert all(a["data"][k] != b["data"][k] for k in a["data"])


def test_making_the_keys_before_the_workloads_write_leaves_asyncssh_for_later():
    # A first intercept in a namespace makes the Secret before it writes the workload
    # (engine/tunnels.ensure_auth_material): asyncssh's import belongs after that write.
    code = ("import sys, tpenv.engine.tunnels as t, tpenv_agent.authkeys as k; k.auth_material(); "
            "print(sorted(m for m in ('asyncssh', 'websockets', 'tpenv.kits.agent_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
