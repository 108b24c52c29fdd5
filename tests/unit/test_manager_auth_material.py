"""The tpenv-auth keys the manager makes in webhook mode work with the client's SSH code, exactly
like the ones a client makes in patch mode (docs/protocol.md §2: one format, two makers)."""
from __future__ import annotations

import asyncssh

from tpenv.engine.injection import auth_secret_manifest
from tpenv.kits.agent_client import issue_session_key, make_auth_material
from tpenv_agent.incluster import auth_material


def test_manager_material_signs_session_certificates_the_host_accepts():
    material = auth_material()
    assert set(material) == {"ca_key", "ca.pub", "host_key", "host_key.pub"}
    key, cert = issue_session_key(material["ca_key"], "sess-1")
    ca_pub = asyncssh.import_public_key(material["ca.pub"])
    assert cert.signing_key.public_data == ca_pub.public_data and cert.principals == ["sess-1"]
    host = asyncssh.import_private_key(material["host_key"])
    assert host.public_data == asyncssh.import_public_key(material["host_key.pub"]).public_data


def test_both_makers_fill_the_same_secret_shape():
    a = auth_secret_manifest("ns", auth_material())
    b = auth_secret_manifest("ns", make_auth_material())
    assert a["metadata"] == b["metadata"] and set(a["data"]) == set(b["data"])
