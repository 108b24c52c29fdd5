"""Issue 12, Done-when 6: `--debug` prints neither the bearer token nor the app's secrets.

A developer authenticated by a ServiceAccount token (so there is a bearer token to leak: the
websockets library prints its handshake headers at DEBUG) intercepts the store app, whose
DB_PASSWORD comes from a Secret, with `--debug`, an env file, a mount and a command; a handler
command line carries a `${VAR}` the config loader expands. Neither the token, nor the secret
value, nor the expanded value appears anywhere in the output, while the env file (the
developer's own copy) does hold the secret, so the value really went through tpenv.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from security_kit import user_kubeconfig
from test_intercept_env_mount import store_app
from test_intercept_kit import tpenv, tpenv_env, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SECRET_VALUE = "s3cr3t value"  # store-secret's password (test_intercept_env_mount.store_app)
HANDLER_SECRET = "handler-arg-Zq81xx"


def test_debug_output_holds_no_token_and_no_secret_value(namespace, tmp_path, kubeconfig):
    ns = namespace
    store_app(ns)
    dev_config, token = user_kubeconfig(ns, "dev-logs", kubeconfig, tmp_path)
    env = {"KUBECONFIG": str(dev_config), "API_KEY": HANDLER_SECRET}

    # Stage 1: a one-shot intercept with --debug as the token user: env file, mount, a command.
    cp = tpenv(tmp_path, "--debug", "intercept", "store", "--port", "18585:web", "-n", ns,
               "--env-file", "store.env", "--env-syntax", "json", "--mount", str(tmp_path / "vol"),
               "--", sys.executable, "-c", "import os; assert os.environ['DB_PASSWORD']",
               timeout=400, env=env)
    out = cp.stdout + cp.stderr
    # The env really carried the secret (so its absence from the log means something), and the
    # debug output really is the noisy one (the libraries' lines are in it).
    assert json.loads((tmp_path / "store.env").read_text())["DB_PASSWORD"] == SECRET_VALUE
    assert "DEBUG" in out and len(out.splitlines()) > 20, out[-2000:]

    # Stage 2: neither the token (whole or its signature) nor the secret value.
    assert token not in out and token.rsplit(".", 1)[-1] not in out
    assert SECRET_VALUE not in out

    # Stage 3: `tpenv up` with a handler whose argv carries an expanded ${API_KEY}.
    marker = tmp_path / "handler-ran"
    (tmp_path / "telepresence.yaml").write_text(json.dumps({
        "apiVersion": "tpenv/v1", "namespace": ns,
        "intercepts": [{"name": "store", "workload": "store", "port": "18586:web", "env": {"file": "up.env"},
                        "mount": {"path": False},
                        "run": {"command": [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('ran')",
                                            str(marker), "${API_KEY}"], "restart": "never"}}]}))
    log = tmp_path / "up.log"
    with open(log, "w") as sink:
        up = subprocess.Popen([sys.executable, "-m", "tpenv.cli.main", "--debug", "up", "--plain"], cwd=tmp_path,
                              env={**tpenv_env(tmp_path), **env}, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for("the handler to run", marker.exists, 300)
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(120)
    out = log.read_text()
    assert "DEBUG" in out and "running (pid" in out, out[-3000:]
    assert HANDLER_SECRET not in out and token not in out and SECRET_VALUE not in out
