"""tpenv's exception tree. Every error tpenv raises on purpose is one of these.

    TpenvError                      base; ``exit_code`` and ``hint`` drive the CLI's message
    ├── ConfigError                 telepresence.yaml or flags are wrong (exit 2); holds Problems
    ├── UsageError                  a CLI invocation that cannot work as given (exit 2)
    ├── NotBuiltYet                 a verb whose engine is not built yet (exit 3)
    ├── PermanentError              retrying will not help (exit 1)
    │   ├── NotFound                workload / service / namespace / port missing
    │   ├── Forbidden               RBAC refuses the action
    │   ├── Conflict                another session holds the intercept
    │   ├── MissingTool             a local program or kernel feature is absent (sshfs, FUSE)
    │   ├── ExecFailed              a command run in a pod failed (kits/podexec.py)
    │   ├── DependencyCycle         units depend on each other in a circle (engine/plan.py)
    │   └── TemplateError           a manager template renders to no valid manifest (engine/manager.py)
    └── TransientError              worth retrying after ``retry_after`` seconds (exit 1)
        ├── ClusterUnreachable      API server down or network cut
        ├── TunnelDropped           port-forward or SSH connection lost
        │   ├── PortNotListening    nothing listens on the pod's port (yet) (kits/pf_common.py)
        │   ├── WebSocketRefused    the API server refused the WebSocket upgrade (kits/pf_common.py)
        │   ├── SpdyRefused         the API server refused the SPDY upgrade (kits/spdy_upgrade.py)
        │   ├── UpgradeRefused      a non-101 answer to a WebSocket upgrade, before it is mapped (kits/ws_client.py)
        │   ├── WebSocketProtocolError  the server broke RFC 6455 (kits/ws_frames.py)
        │   └── SpdyProtocolError   the peer broke SPDY/3 (kits/spdy_frames.py)
        ├── RolloutStalled          pods did not become ready in time
        ├── ContextDown             a kube context's client cannot be opened (engine/contexts.py)
        └── UpdateConflict          an update from a stale copy (409): read the object again, redo

The classes named with a module live next to the code that raises them; tests/unit/test_errors_tree.py
fails when a class raised in tpenv/ is outside this tree or missing from this drawing.

Errors from kubernetes, asyncssh, websockets and the OS are wrapped at the edges with
``raise ... from e``; only the CLI maps these to messages and exit codes.
"""
from __future__ import annotations

from dataclasses import dataclass


class TpenvError(Exception):
    """Base of every error tpenv raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Problem:
    """One problem in a config file: where, what, and what to do."""

    file: str
    line: int  # 1-based; 0 when the problem is the whole file (missing, unreadable)
    column: int  # 1-based; 0 with line 0
    message: str
    suggestion: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        text = f"{where}: {self.message}"
        if self.suggestion:
            text += f" ({self.suggestion})"
        return text


class ConfigError(TpenvError):
    """The configuration is invalid; carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | str, *, hint: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [Problem("<config>", 1, 1, problems)]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems), hint=hint)


class UsageError(TpenvError):
    exit_code = 2


class NotBuiltYet(TpenvError):
    """A verb that exists in the CLI but whose engine does not exist yet. Never pretends to work."""

    exit_code = 3


class PermanentError(TpenvError):
    """Retrying will not help until something changes."""


class NotFound(PermanentError):
    pass


class Forbidden(PermanentError):
    pass


class Conflict(PermanentError):
    pass


class MissingTool(PermanentError):
    pass


class TransientError(TpenvError):
    """Worth retrying; ``retry_after`` is the suggested first delay in seconds."""

    retry_after: float = 1.0

    def __init__(self, message: str, *, hint: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, hint=hint)
        if retry_after is not None:
            self.retry_after = retry_after


class ClusterUnreachable(TransientError):
    retry_after = 2.0


class TunnelDropped(TransientError):
    retry_after = 0.5


class RolloutStalled(TransientError):
    retry_after = 5.0


class UpdateConflict(TransientError):
    """The API server refused an update made from a stale copy (HTTP 409): read again, redo."""

    retry_after = 0.2


__all__ = [
    "TpenvError", "Problem", "UpdateConflict", "ConfigError", "UsageError", "NotBuiltYet", "PermanentError", "NotFound",
    "Forbidden", "Conflict", "MissingTool", "TransientError", "ClusterUnreachable", "TunnelDropped",
    "RolloutStalled",
]
