"""Who holds what: the intercepts on this agent, their match rules and the routing decision.

The registry is plain synchronous state, so a routing decision is one function call made at
the instant a connection, request or stream arrives: whatever rule holds then decides, and
work already routed keeps going where it went (the contract's "in flight finish where they
were going").
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable


class ControlError(Exception):
    """An answer ``{"ok": false, "error": {code, message}}`` on the control channel."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PortSpec:
    """One ``--listen AGENT_PORT:APP_PORT[:NAME]``; agent_port is the bound one once listening."""

    agent_port: int
    app_port: int
    name: str

    @classmethod
    def parse(cls, text: str) -> "PortSpec":
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0].isdigit() or not parts[1].isdigit():
            raise ValueError(f"--listen wants AGENT_PORT:APP_PORT[:NAME], got {text!r}")
        name = parts[2] if len(parts) == 3 else parts[1]
        return cls(int(parts[0]), int(parts[1]), name)


class Match:
    """A header/path rule (§3): every listed header must fullmatch, and the path rule too."""

    def __init__(self, spec: dict[str, Any]) -> None:
        if not isinstance(spec, dict):
            raise ControlError("bad-request", "match must be null or an object")
        headers = spec.get("headers") or {}
        if not isinstance(headers, dict):
            raise ControlError("bad-request", "match.headers must be an object")
        try:
            self.headers = [(str(k).lower().encode("latin-1"), re.compile(str(v)))
                            for k, v in headers.items()]
        except (re.error, UnicodeEncodeError) as e:
            raise ControlError("bad-request", f"bad header rule: {e}") from e
        self.path_kind: str | None = None
        self.path_value: str = ""
        self.path_re: re.Pattern[str] | None = None
        path = spec.get("path")
        if path is not None:
            if not isinstance(path, dict) or len(path) != 1:
                raise ControlError("bad-request", "match.path must be {equal|prefix|regex: str}")
            (kind, value), = path.items()
            if kind not in ("equal", "prefix", "regex") or not isinstance(value, str):
                raise ControlError("bad-request", "match.path must be {equal|prefix|regex: str}")
            self.path_kind, self.path_value = kind, value
            if kind == "regex":
                try:
                    self.path_re = re.compile(value)
                except re.error as e:
                    raise ControlError("bad-request", f"bad path regex: {e}") from e
        self.spec = {"headers": {str(k): str(v) for k, v in headers.items()}, "path": path}

    def matches(self, headers: dict[bytes, list[bytes]], path: bytes) -> bool:
        """``headers``: lower-case name -> values. A header matches if any of its values does."""
        for name, rx in self.headers:
            values = headers.get(name)
            if not values or not any(rx.fullmatch(v.decode("latin-1")) for v in values):
                return False
        if self.path_kind is None:
            return True
        # Rules look at the path only, not the query string (what users write rules about).
        p = path.split(b"?", 1)[0].decode("latin-1")
        if self.path_kind == "equal":
            return p == self.path_value
        if self.path_kind == "prefix":
            return p.startswith(self.path_value)
        assert self.path_re is not None
        return self.path_re.fullmatch(p) is not None


@dataclass(eq=False)
class Intercept:
    intercept_id: str
    session: str
    port: PortSpec
    match: Match | None          # None: all TCP
    forward: tuple[str, int]     # the client's tcpip-forward (listen_host, listen_port)
    owner: Any                   # the control channel that registered it (ends with it)
    since: float = field(default_factory=time.time)
    # Opens a channel to the client: async (orig_host, orig_port) -> (reader, writer).
    opener: Callable[..., Any] | None = None
    ended: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "intercept_id": self.intercept_id,
            "session": self.session,
            "port": self.port.name,
            "match": self.match.spec if self.match else None,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
        }


class Registry:
    def __init__(self, ports: list[PortSpec]) -> None:
        self.ports = ports
        self._by_id: dict[str, Intercept] = {}
        self.on_end: list[Callable[[Intercept], None]] = []

    def find_port(self, port: Any) -> PortSpec:
        """``port`` as the client gives it: the --listen name, or the app port number."""
        for p in self.ports:
            if str(port) == p.name or str(port) == str(p.app_port):
                return p
        raise ControlError("not-found", f"no agent listener for port {port!r}")

    def add(self, icpt: Intercept) -> Intercept:
        if icpt.match is None:
            for other in self._by_id.values():
                # Also within one session: one port has at most one all-TCP holder.
                if other.port is icpt.port and other.match is None and other.intercept_id != icpt.intercept_id:
                    raise ControlError(
                        "conflict",
                        f"port {icpt.port.name} is already intercepted (all TCP) by {other.intercept_id}")
        old = self._by_id.pop(icpt.intercept_id, None)
        if old is not None:
            self._end(old)
        self._by_id[icpt.intercept_id] = icpt
        return icpt

    def remove(self, intercept_id: str) -> Intercept:
        icpt = self._by_id.pop(intercept_id, None)
        if icpt is None:
            raise ControlError("not-found", f"no intercept {intercept_id}")
        self._end(icpt)
        return icpt

    def remove_owned_by(self, owner: Any) -> list[Intercept]:
        gone = [i for i in self._by_id.values() if i.owner is owner]
        for i in gone:
            del self._by_id[i.intercept_id]
            self._end(i)
        return gone

    def _end(self, icpt: Intercept) -> None:
        icpt.ended = True
        for cb in self.on_end:
            cb(icpt)

    def all(self) -> list[Intercept]:
        return list(self._by_id.values())

    # --- routing -----------------------------------------------------------------------

    def on_port(self, port: PortSpec) -> tuple[list[Intercept], Intercept | None]:
        """(header intercepts in registration order, the all-TCP holder or None)."""
        header, holder = [], None
        for i in self._by_id.values():
            if i.port is port:
                if i.match is None:
                    holder = i
                else:
                    header.append(i)
        return header, holder

    def route_request(self, port: PortSpec, headers: dict[bytes, list[bytes]], path: bytes) -> Intercept | None:
        """Header intercepts first, then the all-TCP holder; None means the app."""
        header, holder = self.on_port(port)
        for i in header:
            if i.match is not None and i.match.matches(headers, path):
                return i
        return holder
