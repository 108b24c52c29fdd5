"""The live view of `tpenv up` in a terminal: a table of every unit under the scrolling output.

Only when stderr is a TTY and the output mode is text: scripts and CI get plain lines.
The table is re-rendered twice a second from the reconciler's ``snapshot()`` (a render
loop, not a readiness poll), by a task on the event loop rather than rich's refresh thread:
the units' states are only ever read where they are written, so a row never shows a state
half-updated or older than the unit's. Log records and handler output keep scrolling above it: while
the view runs, our logging handler writes to rich's proxy of stderr, and handler lines go to
``sys.stdout``, which rich redirects too.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from tpenv.engine.up import age_text

_STYLE = {"ready": "green", "starting": "yellow", "pending": "yellow", "failed": "bold red",
          "stopping": "magenta", "stopped": "dim"}


def render_units(snapshot: dict[str, Any], now: float | None = None) -> Any:
    """A rich Table of the snapshot's units (pure: tests render it to text)."""
    from rich.table import Table

    now = time.time() if now is None else now
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    units = snapshot.get("units", [])
    # A context column only when the file names contexts: one cluster needs no column.
    with_context = any(u.get("context") for u in units)
    cols = ("unit", "context", "state", "since", "restarts", "note") if with_context else \
        ("unit", "state", "since", "restarts", "note")
    for col in cols:
        table.add_column(col, no_wrap=col != "note", overflow="fold")
    for u in units:
        note = u.get("last_error") if u["state"] == "failed" else (u.get("detail") or "")
        row = [u["name"], f"[{_STYLE.get(u['state'], '')}]{u['state']}[/]", age_text(now - u["since"]),
               str(u.get("restarts") or ""), note or ""]
        if with_context:
            row.insert(1, u.get("context") or "")
        table.add_row(*row)
    if snapshot.get("config_error"):
        row = ["config", "[bold red]invalid[/]", "", "", str(snapshot["config_error"]).splitlines()[0]]
        table.add_row(*(row[:1] + [""] + row[1:] if with_context else row))
    return table


class LiveView:
    """``async with LiveView(snapshot):`` shows the table while the session runs (TTY only)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], *, stream: Any = None, enabled: bool | None = None,
                 refresh_per_second: float = 2.0) -> None:
        self.snapshot = snapshot
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.refresh_per_second = refresh_per_second
        self._live: Any = None
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []
        self._refresher: asyncio.Task | None = None

    def __rich__(self) -> Any:
        return render_units(self.snapshot())

    async def __aenter__(self) -> "LiveView":
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.stream)
        self._live = Live(self, console=console, auto_refresh=False,
                          redirect_stdout=True, redirect_stderr=True, transient=False)
        self._live.start()
        self._refresher = asyncio.create_task(self._refresh(), name="liveview/refresh")
        # Logging handlers captured the real stderr when they were made: point them at rich's
        # proxy so records print above the table instead of through it.
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and h.stream in (sys.__stderr__, self.stream):
                self._handlers.append((h, h.setStream(sys.stderr)))
        return self

    async def _refresh(self) -> None:
        while self._live is not None:
            self._live.refresh()
            await asyncio.sleep(1.0 / self.refresh_per_second)

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Safe twice; puts the logging streams back."""
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        for h, old in self._handlers:
            h.setStream(old)
        self._handlers.clear()
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()
