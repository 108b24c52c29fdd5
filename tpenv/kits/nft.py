"""nftables from inside the tpenv process: libnftables (the library behind the ``nft`` command)
through ctypes, so the netlink socket that creates a table is one this process holds.

Why in-process: a table created with ``flags owner`` belongs to the netlink socket that created
it, and the kernel deletes it, with every chain and rule in it, when that socket closes -- which
includes the process being killed with SIGKILL. One ``Nft`` context keeps one socket for its life
(checked: a table added by it disappears the moment the process is killed with -9).

    with Nft() as nft:
        nft.create_owned_table("ip", "tpenv")          # text: nftables 1.0.6 ignores JSON table flags
        nft.apply([{"add": {"chain": {...}}}, ...])    # JSON commands: no rule built by string formatting
        tables = nft.tables()                          # [{"family", "name", "flags": [...]}, ...]

Errors are :class:`~tpenv.errors.PermanentError` with libnftables' own message; a missing library
is :class:`~tpenv.errors.MissingTool` saying which package installs it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
from typing import Any

from tpenv.errors import MissingTool, PermanentError

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4
INSTALL_HINT = "install nftables (Debian/Ubuntu: `apt-get install nftables`, Fedora: `dnf install nftables`)"

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _load() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise MissingTool(f"libnftables is not installed ({e})", hint=INSTALL_HINT) from e
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        lib.nft_ctx_new.restype, lib.nft_ctx_new.argtypes = vp, [ctypes.c_uint32]
        lib.nft_ctx_free.restype, lib.nft_ctx_free.argtypes = None, [vp]
        lib.nft_ctx_buffer_output.argtypes = lib.nft_ctx_buffer_error.argtypes = [vp]
        lib.nft_ctx_output_set_flags.argtypes = [vp, ctypes.c_uint]
        lib.nft_ctx_output_get_flags.restype, lib.nft_ctx_output_get_flags.argtypes = ctypes.c_uint, [vp]
        lib.nft_run_cmd_from_buffer.restype, lib.nft_run_cmd_from_buffer.argtypes = ctypes.c_int, [vp, cp]
        for f in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, f).restype, getattr(lib, f).argtypes = cp, [vp]
        _lib = lib
        return lib


def available() -> bool:
    """Whether libnftables can be loaded (not whether the kernel lets us use it)."""
    try:
        _load()
        return True
    except MissingTool:
        return False


class Nft:
    """One libnftables context = one netlink socket, open until ``close()`` (safe twice).
    Not thread-safe: one caller at a time (calls are short and synchronous)."""

    def __init__(self) -> None:
        self._lib = _load()
        self._ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not self._ctx:
            raise PermanentError("libnftables could not create a context")
        self._lib.nft_ctx_buffer_output(self._ctx)
        self._lib.nft_ctx_buffer_error(self._ctx)

    def __enter__(self) -> "Nft":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def close(self) -> None:
        """Free the context: its socket closes, and every table it owns is deleted by the kernel."""
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def _run(self, command: str, *, as_json: bool) -> str:
        if self._ctx is None:
            raise PermanentError("the nftables context is closed")
        flags = self._lib.nft_ctx_output_get_flags(self._ctx)
        # In libnftables 1.0.x the JSON output flag also selects the JSON parser for input.
        flags = flags | NFT_CTX_OUTPUT_JSON if as_json else flags & ~NFT_CTX_OUTPUT_JSON
        self._lib.nft_ctx_output_set_flags(self._ctx, flags)
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
        out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace").strip()
        if rc != 0:
            why = err or f"libnftables returned {rc}"
            hint = None
            if "Operation not permitted" in why:
                hint = "this needs CAP_NET_ADMIN in the network namespace (root, or root of a user namespace)"
            raise PermanentError(f"nftables refused the change: {why}", hint=hint)
        return out

    def apply(self, commands: list[dict[str, Any]]) -> None:
        """Run JSON commands (``[{"add": {...}}, ...]``) as one transaction: all or nothing."""
        self._run(json.dumps({"nftables": commands}), as_json=True)

    def create_owned_table(self, family: str, name: str) -> None:
        """A new table owned by this context's socket. Text, not JSON: libnftables 1.0.6 drops the
        ``flags`` of a JSON table (checked: such a table survived kill -9 of its creator)."""
        if family not in ("ip", "ip6", "inet") or not name.replace("_", "").replace("-", "").isalnum():
            raise PermanentError(f"bad table {family} {name}")
        self._run(f"add table {family} {name} {{ flags owner; }}", as_json=False)

    def delete_table(self, family: str, name: str) -> None:
        self.apply([{"delete": {"table": {"family": family, "name": name}}}])

    def tables(self) -> list[dict[str, Any]]:
        """Every table of this network namespace: family, name and flags (``owner`` among them for
        owned ones; 1.0.6 does not print flags in JSON, so they are read from the text form)."""
        text = self._run("list tables", as_json=False)
        found = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "table":
                found.append({"family": parts[1], "name": parts[2]})
        for t in found:
            listing = self._run(f"list table {t['family']} {t['name']}", as_json=False)
            t["flags"] = [f.strip(" ;") for line in listing.splitlines() if line.strip().startswith("flags ")
                          for f in line.strip()[len("flags "):].split(",")]
        return found

    def ruleset(self) -> str:
        """The whole ruleset as ``nft list ruleset`` prints it (snapshots in tests and ``doctor``)."""
        return self._run("list ruleset", as_json=False)


__all__ = ["Nft", "available", "INSTALL_HINT"]
