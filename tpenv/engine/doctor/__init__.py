"""tpenv doctor: named checks, each timed, each saying what is wrong and the command that fixes it.

A check is an async function ``(Ctx) -> Outcome``. The runner (:func:`run_checks`) runs the
checks of one group concurrently, each under its own timeout, and turns every outcome (or the
exception a check raised, or its timeout) into a :class:`Finding` with the time it took. A check
that can repair what it found returns a ``repair`` coroutine function; ``--fix`` runs those
(only for failures and warnings) and records what they changed.

Statuses: ``ok``; ``warn`` (works, but something is off or a feature is limited: exit 0);
``fail`` (something tpenv needs is broken: exit 1); ``skip`` (not applicable here, with why).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tpenv.errors import TpenvError

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
CHECK_TIMEOUT = 30.0  # the default of settings.doctor.check_timeout, which the CLI passes


@dataclass
class Outcome:
    """What one check found."""

    status: str
    detail: str
    fix: str | None = None  # the exact command (or step) that fixes it
    repair: Callable[[], Awaitable[list[str]]] | None = None  # --fix: does it, returns what it changed


@dataclass
class Finding:
    """One check's line in the report."""

    name: str
    status: str
    detail: str
    seconds: float
    fix: str | None = None
    fixable: bool = False
    changed: list[str] = field(default_factory=list)
    repair: Callable[[], Awaitable[list[str]]] | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 3),
                "fix": self.fix, "fixable": self.fixable, "changed": self.changed}


Check = Callable[[], Awaitable[Outcome]]


async def run_check(name: str, check: Check, timeout: float = CHECK_TIMEOUT) -> Finding:
    """One check, timed; its exceptions become a failure naming them (a check never ends doctor)."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            out = await check()
    except TimeoutError:
        out = Outcome(FAIL, f"no answer within {timeout:g}s")
    except TpenvError as e:
        out = Outcome(FAIL, e.message, fix=e.hint)
    except Exception as e:  # noqa: BLE001 - a bug in one check must not hide the others' results
        out = Outcome(FAIL, f"the check itself failed: {type(e).__name__}: {e}")
    return Finding(name, out.status, out.detail, time.monotonic() - start, fix=out.fix,
                   fixable=out.repair is not None and out.status in (FAIL, WARN), repair=out.repair)


async def run_checks(checks: Sequence[tuple[str, Check]], timeout: float = CHECK_TIMEOUT) -> list[Finding]:
    """A group of independent checks, concurrently; findings in the order given."""
    return list(await asyncio.gather(*(run_check(name, fn, timeout) for name, fn in checks)))


async def repair(findings: Sequence[Finding]) -> None:
    """``--fix``: run each fixable finding's repair; what it changed goes into ``changed``."""
    for f in findings:
        if not f.fixable or f.repair is None:
            continue
        try:
            f.changed = await f.repair()
            f.status, f.detail = OK, f"repaired: {f.detail}"
        except TpenvError as e:
            f.detail += f" (--fix failed: {e.message})"


def exit_code(findings: Sequence[Finding]) -> int:
    return 1 if any(f.status == FAIL for f in findings) else 0


__all__ = ["OK", "WARN", "FAIL", "SKIP", "Outcome", "Finding", "Check", "run_check", "run_checks", "repair",
           "exit_code"]
