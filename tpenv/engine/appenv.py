"""The app process's own environment, read in its container, added to the agent's report.

The agent reports the pod spec's view of the app's env (docs/protocol.md §5): literal values,
refs, envFrom, the kubelet's variables. What the app's *image* sets (``ENV`` in its Dockerfile:
``LANG``, ``JAVA_HOME``, ``PYTHONUNBUFFERED``, ``PATH``...) never reaches the agent, whose own
image has its own values. Only the app's container can show them, so we read
``/proc/1/environ`` there (``pods/exec``), falling back to ``env -0`` (what the runtime gives
every process of the container) when PID 1 is not readable; a container with neither ``cat``
nor ``env`` (distroless) cannot be read.

Precedence: the agent's report is the base; the process's values are laid over it. Both see the
same pod spec, so they differ only where the container runtime sets a variable per container
(``HOME`` follows the container's user: the agent runs as another user than the app) or where the
image sets one: there the process is right, since it is what the app sees. A name only the report
has stays.

Never guessed: when the read fails, the env is the agent's report alone and :func:`read_app_env`
says why (which right is missing, or what the image lacks) and what is then missing.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tpenv.errors import Forbidden, TpenvError, TransientError
from tpenv.kits.podexec import ExecFailed, exec_output
from tpenv.kits.portforward import KubeAccess

READERS = (["cat", "/proc/1/environ"], ["env", "-0"])
EXEC_ATTEMPTS = 4  # a cut exec stream or an API server that did not answer: run the read again
MISSING = "variables the app's image sets (ENV in its Dockerfile, e.g. LANG, PATH) are missing from the env"


@dataclass(frozen=True)
class AppEnv:
    """What the app process sees (``env``, None when unreadable), or why it could not be read."""

    env: dict[str, str] | None
    why_not: str | None = None


def parse_environ(raw: bytes) -> dict[str, str]:
    """``/proc/PID/environ`` (or ``env -0``): NUL-separated ``NAME=value``; values may hold newlines."""
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep and name:
            out[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return out


def merge_app_env(report: dict[str, str], process: dict[str, str] | None) -> dict[str, str]:
    """The agent's report with the process's variables laid over it (the image's ENV, HOME...)."""
    return {**report, **(process or {})}


async def read_app_env(kube: KubeAccess, namespace: str, pod: str, container: str) -> AppEnv:
    """The app process's environment in ``container`` of ``pod``; ``why_not`` when it cannot be read."""
    failures: list[str] = []
    for argv in READERS:
        try:
            raw = await _exec_again_when_cut(kube, namespace, pod, container, argv)
        except Forbidden:
            return AppEnv(None, f"no right to exec in pod {pod} (create pods/exec in namespace {namespace}): "
                                f"{MISSING}; `kubectl auth can-i create pods/exec -n {namespace}` checks it")
        except ExecFailed as e:
            failures.append(str(e))
            continue
        except TpenvError as e:
            return AppEnv(None, f"cannot read the app's environment in container {container} of pod {pod} "
                                f"({e}): {MISSING}")
        env = parse_environ(raw)
        if env:
            return AppEnv(env)
        failures.append(f"{' '.join(argv)}: no output")
    return AppEnv(None, f"cannot read the app's environment in container {container} of pod {pod} (its image "
                        f"has neither `cat` nor `env`, or PID 1 is not readable: {failures[-1]}): {MISSING}")


async def _exec_again_when_cut(kube: KubeAccess, namespace: str, pod: str, container: str, argv: list[str]) -> bytes:
    """``exec_output``, run again when its stream was cut or the API server did not answer: a
    read of the environment changes nothing, so running it twice is safe; without this one cut
    stream (an API server busy rolling, a kubelet restart) would leave the env without the image's
    ENV for the whole intercept."""
    for attempt in range(EXEC_ATTEMPTS):
        try:
            return await exec_output(kube, namespace, pod, container, argv)
        except TransientError as e:
            if attempt == EXEC_ATTEMPTS - 1:
                raise
            await asyncio.sleep(e.retry_after * 2 ** attempt)  # a retry's backoff, not a wait for readiness
    raise AssertionError("unreachable")
