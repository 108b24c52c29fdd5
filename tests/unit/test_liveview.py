"""The live view's table, rendered to text, and its TTY-only switch."""
from __future__ import annotations

import io
import logging

from rich.console import Console

from tpenv.engine.liveview import LiveView, render_units

SNAPSHOT = {"units": [
    {"name": "intercept/dev/hello/8080:80", "state": "ready", "since": 100.0, "restarts": 0, "detail": None,
     "last_error": None},
    {"name": "handler/hello", "state": "failed", "since": 190.0, "restarts": 2, "detail": "retry in 2.0s",
     "last_error": "exited with code 1"},
], "config_error": "telepresence.yaml:4:7: unknown key 'prot' (did you mean 'port'?)"}


def text_of(renderable) -> str:
    out = io.StringIO()
    Console(file=out, width=140, color_system=None).print(renderable)
    return out.getvalue()


def test_table_shows_state_age_restarts_and_the_error_of_a_failed_unit():
    lines = [line.split() for line in text_of(render_units(SNAPSHOT, now=200.0)).splitlines()]
    assert lines[0] == ["unit", "state", "since", "restarts", "note"]
    assert lines[1] == ["intercept/dev/hello/8080:80", "ready", "100s"]
    assert lines[2] == ["handler/hello", "failed", "10s", "2", "exited", "with", "code", "1"]
    assert lines[3][:2] == ["config", "invalid"] and "telepresence.yaml:4:7:" in lines[3]


async def test_not_a_tty_means_no_live_view_and_logging_untouched():
    stream = io.StringIO()  # isatty() is False
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        async with LiveView(lambda: SNAPSHOT, stream=stream) as view:
            assert not view.enabled and view._live is None
            assert handler.stream is stream
        view.close()  # safe twice
        assert stream.getvalue() == ""
    finally:
        logging.getLogger().removeHandler(handler)
