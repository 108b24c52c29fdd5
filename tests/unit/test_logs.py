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
