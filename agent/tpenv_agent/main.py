"""``tpenv-agent ROLE ...``: one image, two roles (``sidecar``, ``manager``)."""
from __future__ import annotations

import asyncio
import sys

USAGE = "usage: tpenv-agent {sidecar|manager} [options]  (tpenv-agent ROLE --help for options)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    role, rest = argv[0], argv[1:]
    if role == "sidecar":
        from .sidecar import run_sidecar
        return asyncio.run(run_sidecar(rest))
    if role == "manager":
        # Built separately (manager.py); the sidecar must run without it.
        try:
            from .manager import run_manager
        except ImportError:
            print("tpenv-agent manager: this build has no manager role (tpenv_agent/manager.py is missing)",
                  file=sys.stderr)
            return 3
        return asyncio.run(run_manager(rest)) or 0
    print(f"tpenv-agent: unknown role {role!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
