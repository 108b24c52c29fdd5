"""Who holds what: the intercepts on this agent, their match rules and the routing decision.

The registry is plain synchronous state, so a routing decision is one function call made at
the instant a connection, request or stream arrives: whatever rule holds then decides, and
work already routed keeps going where it went (the contract's "in flight finish where they
were going").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .kubelet import is_probe

try:
    import re2 as _re2
except ImportError:  # pragma: no cover - the image and pyproject install it; fail loudly when used
    _re2 = None

# The header a personal intercept matches on (Telepresence's): its value is the intercept id.
PERSONAL_HEADER = "x-telepresence-intercept-id"


def compile_rule(pattern: str, what: str) -> Any:
    """A header or path pattern, compiled with RE2: matching takes time linear in the input,
    whatever the pattern (``(a+)+$`` cannot stall the agent's one event loop, i.e. every
    request of the app). RE2 has no backreferences or lookaround: such a pattern is refused."""
    if _re2 is None:
        raise ControlError("internal", "the agent image lacks google-re2 (pip install google-re2)")
    options = _re2.Options()
    options.log_errors = False
    try:
        compiled = _re2.compile(pattern, options)  # also what refuses a bad literal escape
    except Exception as e:  # re2.error: the message names what RE2 does not support
        raise ControlError("bad-request", f"bad {what} {pattern!r}: {e} (patterns are RE2: no "
                                          "backreferences or lookaround)") from None
    text = literal_text(pattern)
    return compiled if text is None else Literal(text)


# RE2's operators; outside them a character stands for itself.
_OPERATORS = frozenset(".+*?()|[]{}^$")


def literal_text(pattern: str) -> str | None:
    """The one string ``pattern`` fullmatches when it has no operator, else None. A backslash
    before an ASCII character that is not a letter or digit is that character (RE2's rule for
    every one of them, punctuation, space and controls alike; what ``re.escape`` writes: the
    personal header's rule is ``re.escape(<intercept id>)``); before anything else it may be a
    class (``\\d``) or an escape, so the pattern stays a regex."""
    out: list[str] = []
    escaped = False
    for c in pattern:
        if escaped:
            if not c.isascii() or c.isalnum():
                return None
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in _OPERATORS:
            return None
        else:
            out.append(c)
    return None if escaped else "".join(out)


class Literal:
    """A rule with no operator, matched by string equality. The rules run on every request a
    header intercept or a mirror sees, and the RE2 binding's ``fullmatch`` costs about 7 us
    per match (it builds a Python match object), more than the rest of the routing decision.
    Same interface as a compiled pattern as the registry uses it: truthy when it matches."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def fullmatch(self, value: str) -> bool | None:
        return True if value == self.text else None


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
            self.headers = [(str(k).lower().encode("latin-1"), compile_rule(str(v), f"header rule {k}"))
                            for k, v in headers.items()]
        except UnicodeEncodeError as e:
            raise ControlError("bad-request", f"bad header rule: {e}") from e
        self.path_kind: str | None = None
        self.path_value: str = ""
        self.path_re: Any = None
        path = spec.get("path")
        if path is not None:
            if not isinstance(path, dict) or len(path) != 1:
                raise ControlError("bad-request", "match.path must be {equal|prefix|regex: str}")
            (kind, value), = path.items()
            if kind not in ("equal", "prefix", "regex") or not isinstance(value, str):
                raise ControlError("bad-request", "match.path must be {equal|prefix|regex: str}")
            self.path_kind, self.path_value = kind, value
            if kind == "regex":
                self.path_re = compile_rule(value, "path regex")
        self.spec = {"headers": {str(k): str(v) for k, v in headers.items()}, "path": path}

    def personal_rule(self) -> Any:
        """The compiled rule on the personal header, or None."""
        return next((rx for name, rx in self.headers if name == PERSONAL_HEADER.encode()), None)

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
    user: str = ""               # who holds it: the Kubernetes user the cluster verified, or
    verified: bool = False       # "session <id>" when the session could not be verified
    since: float = field(default_factory=time.time)
    # Opens a channel to the client: async (orig_host, orig_port) -> (reader, writer).
    opener: Callable[..., Any] | None = None
    ended: bool = False
    # Mirror mode: the app keeps answering; matched HTTP requests are copied to the client (mirror.py).
    mirror: bool = False
    mirror_stats: dict[str, int] = field(default_factory=lambda: {"sent": 0, "dropped": 0})

    def __post_init__(self) -> None:
        rule = self.match.personal_rule() if self.match is not None else None
        self._personal = self.intercept_id if rule is not None and rule.fullmatch(self.intercept_id) else None

    def personal_id(self) -> str | None:
        """This intercept's own id when its rule takes requests whose personal header carries
        that id, else None."""
        return self._personal

    def describe(self) -> dict[str, Any]:
        out = {
            "intercept_id": self.intercept_id,
            "session": self.session,
            "owner": self.user or f"session {self.session}",
            "verified": self.verified,
            "port": self.port.name,
            "match": self.match.spec if self.match else None,
            "mode": "mirror" if self.mirror else "intercept",
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
        }
        if self.mirror:
            out["mirror"] = dict(self.mirror_stats)
        return out


class Registry:
    def __init__(self, ports: list[PortSpec]) -> None:
        self.ports = ports
        self._by_id: dict[str, Intercept] = {}
        self.on_end: list[Callable[[Intercept], None]] = []
        # Whether intercepts take traffic yet (the sidecar: once the kubelet has probed it,
        # kubelet.py); until then on_port shows none, so every connection and request is the app's.
        self.taking: Callable[[], bool] = lambda: True
        # Called once an intercept is registered (the listeners arm their raw HTTP/1 splices).
        self.on_add: list[Callable[[Intercept], None]] = []

    def find_port(self, port: Any) -> PortSpec:
        """``port`` as the client gives it: the --listen name, or the app port number."""
        for p in self.ports:
            if str(port) == p.name or str(port) == str(p.app_port):
                return p
        raise ControlError("not-found", f"no agent listener for port {port!r}")

    def add(self, icpt: Intercept, *, force: bool = False) -> Intercept:
        """Register ``icpt``, replacing the intercept of the same id only if the same user holds
        it (or ``force``: the caller checked the user's RBAC right to). Refused: a second all-TCP
        holder of a port, and a header rule that would take another user's personal traffic."""
        old = self._by_id.get(icpt.intercept_id)
        if old is not None and old.user != icpt.user and not force:
            raise ControlError("forbidden", f"intercept {icpt.intercept_id} is held by {_holder(old)}: only they "
                                            "can replace it (or a user allowed to force intercepts.tpenv.io)")
        displaced = []
        if icpt.match is None and not icpt.mirror:
            for other in self._by_id.values():
                # Also within one session: one port has at most one all-TCP holder.
                if other.port is icpt.port and other.match is None and not other.mirror \
                        and other.intercept_id != icpt.intercept_id:
                    if force and other.user != icpt.user:
                        displaced.append(other)  # taken over: the caller checked the right to force
                        continue
                    raise ControlError(
                        "conflict",
                        f"port {icpt.port.name} is already intercepted (all TCP) by {other.intercept_id} "
                        f"(held by {_holder(other)})"
                        + ("" if other.user == icpt.user else "; a user allowed to force intercepts.tpenv.io "
                                                               "can take it over (--force)"))
        elif icpt.match is not None:  # a mirror's rule too: copies of someone's personal traffic are theirs
            rule = icpt.match.personal_rule()
            for other in self._by_id.values():
                if (rule is not None and other.port is icpt.port and other.user != icpt.user
                        and other.intercept_id != icpt.intercept_id and other.personal_id() is not None
                        and rule.fullmatch(other.personal_id())):
                    raise ControlError(
                        "conflict",
                        f"header rule {PERSONAL_HEADER}={icpt.match.spec['headers'].get(PERSONAL_HEADER, '')!r} "
                        f"would take the personal traffic of {other.intercept_id}, held by {_holder(other)}: "
                        "match your own intercept id, or another header")
        self._by_id.pop(icpt.intercept_id, None)
        if old is not None:
            self._end(old)
        for other in displaced:
            del self._by_id[other.intercept_id]
            self._end(other)
        self._by_id[icpt.intercept_id] = icpt
        for cb in self.on_add:
            cb(icpt)
        return icpt

    def takes_from_others(self, icpt: Intercept) -> bool:
        """Whether registering ``icpt`` needs ``force``: it replaces another user's intercept of
        the same id, or takes a port another user holds for all TCP."""
        old = self._by_id.get(icpt.intercept_id)
        if old is not None and old.user != icpt.user:
            return True
        return icpt.match is None and not icpt.mirror and any(
            o.port is icpt.port and o.match is None and not o.mirror and o.user != icpt.user
            and o.intercept_id != icpt.intercept_id for o in self._by_id.values())

    def remove(self, intercept_id: str, *, user: str | None = None, force: bool = False) -> Intercept:
        """End an intercept; with ``user``, only if that user holds it (or ``force``)."""
        icpt = self._by_id.get(intercept_id)
        if icpt is None:
            raise ControlError("not-found", f"no intercept {intercept_id}")
        if user is not None and icpt.user != user and not force:
            raise ControlError("forbidden", f"intercept {intercept_id} is held by {_holder(icpt)}: only they "
                                            "can end it (or a user allowed to force intercepts.tpenv.io)")
        del self._by_id[intercept_id]
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
        """(intercepts that need each request looked at: header and mirror ones, in registration
        order; the all-TCP holder or None). A mirror never holds: the app keeps the connection."""
        header, holder = [], None
        if not self.taking():
            return header, holder
        for i in self._by_id.values():
            if i.port is port:
                if i.match is None and not i.mirror:
                    holder = i
                else:
                    header.append(i)
        return header, holder

    def route_request(self, port: PortSpec, headers: dict[bytes, list[bytes]], path: bytes) -> Intercept | None:
        """Header intercepts first, then the all-TCP holder; None means the app. A request
        carrying a personal header goes first to the intercept it names, whatever was registered
        before it: a broader rule never takes another developer's personal traffic. Mirrors never route.
        The kubelet's probes always go to the app (kubelet.py)."""
        if is_probe(headers):
            return None
        header, holder = self.on_port(port)
        named = headers.get(PERSONAL_HEADER.encode())
        if named:
            wanted = {v.decode("latin-1") for v in named}
            for i in header:
                if not i.mirror and i.personal_id() in wanted and i.match is not None and i.match.matches(headers, path):
                    return i
        for i in header:
            if not i.mirror and i.match is not None and i.match.matches(headers, path):
                return i
        return holder

    def mirrors(self, port: PortSpec, headers: dict[bytes, list[bytes]], path: bytes) -> list[Intercept]:
        """The mirror intercepts that want a copy of this request (no rule: every request but the
        kubelet's probes)."""
        if is_probe(headers):
            return []
        return [i for i in self._by_id.values() if i.port is port and i.mirror
                and (i.match is None or i.match.matches(headers, path))]


def _holder(icpt: Intercept) -> str:
    return icpt.user if icpt.verified else f"{icpt.user or 'session ' + icpt.session} (unverified)"
