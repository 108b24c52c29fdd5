"""Logging: the [kind/name] prefix, JSON lines, and the noisy libraries kept quiet unless --debug."""
import io
import json
import logging

import pytest

from tpenv.logs import NOISY, setup_logging, unit_logger


@pytest.fixture
def stream():
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", *NOISY)}
    yield io.StringIO()
    for handler in list(root.handlers):  # setup_logging marks its handler; leave pytest's alone
        if getattr(handler, "_tpenv_handler", False):
            root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


# --- stage 1: text ------------------------------------------------------------------------------------------------

def test_text_lines_carry_the_unit_prefix(stream):
    setup_logging(debug=False, json=False, stream=stream)
    unit_logger("intercept", "web").info("ready on %d", 8080)
    assert stream.getvalue().rstrip().endswith("INFO    [intercept/web] ready on 8080")


def test_second_setup_replaces_the_first(stream):
    setup_logging(debug=False, json=False, stream=stream)
    setup_logging(debug=False, json=False, stream=stream)
    unit_logger("tunnel", "p").warning("once")
    assert stream.getvalue().count("once") == 1


# --- stage 2: JSON ------------------------------------------------------------------------------------------------

def test_json_lines(stream):
    setup_logging(debug=False, json=True, stream=stream)
    unit_logger("handler", "web").warning("exited with %s", 1)
    logging.getLogger("tpenv").info("plain")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["level"], first["unit"], first["message"]) == ("warning", "handler/web", "exited with 1")
    assert (second["unit"], second["message"]) == (None, "plain")
    assert first["ts"].endswith("+00:00")


def test_json_exceptions(stream):
    setup_logging(debug=False, json=True, stream=stream)
    try:
        raise ValueError("bad")
    except ValueError:
        unit_logger("x", "y").exception("failed")
    record = json.loads(stream.getvalue())
    assert record["level"] == "error" and "ValueError: bad" in record["exc"]


# --- stage 3: --debug decides the noisy libraries and the level ---------------------------------------------------

def test_noisy_layers_only_with_debug(stream):
    setup_logging(debug=False, json=False, stream=stream)
    assert all(logging.getLogger(n).getEffectiveLevel() == logging.WARNING for n in NOISY)
    unit_logger("a", "b").debug("hidden")
    logging.getLogger("asyncssh").info("hidden too")
    assert stream.getvalue() == ""
    setup_logging(debug=True, json=False, stream=stream)
    assert all(logging.getLogger(n).getEffectiveLevel() == logging.DEBUG for n in NOISY)
    logging.getLogger("asyncssh").debug("shown")
    assert "shown" in stream.getvalue()


# --- stage 4: secrets never printed (issue 12) ---------------------------------------------------------------------

JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6Ij.eyJhdWQiOlsiaHR0cHM6Ly9rdWJl.c2lnbmF0dXJlLXBhcnQtX2FiYw"


@pytest.mark.parametrize("json_lines", [False, True])
def test_tokens_keys_and_registered_values_are_masked_at_debug(stream, json_lines):
    from tpenv import logs
    setup_logging(debug=True, json=json_lines, stream=stream)
    logs.secret("Zq-registered-secret", "ab")  # "ab": too short to mask anything
    logs.secret_env({"DB_PASSWORD": "hunter2-pw", "GREETING": "hello-there"})
    # What websockets prints at DEBUG: its handshake headers, one per line.
    logging.getLogger("websockets.client").debug("> Authorization: Bearer %s", "opaque-token-123")
    logging.getLogger("websockets.client").debug("> GET /api HTTP/1.1\n> authorization: bearer %s", JWT)
    unit_logger("handler", "web").info("running: curl -H %s", "Zq-registered-secret")
    unit_logger("intercept", "web").info("env: DB_PASSWORD=hunter2-pw GREETING=hello-there ab")
    unit_logger("tunnel", "p").debug("key -----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----")
    out = stream.getvalue()
    for leaked in ("opaque-token-123", JWT, "Zq-registered-secret", "hunter2-pw", "AAAA"):
        assert leaked not in out
    assert "hello-there" in out and " ab" in out  # neither a secret-named variable nor long enough
    assert out.count("***") >= 5
