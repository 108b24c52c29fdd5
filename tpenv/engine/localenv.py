"""What a local command keeps of this machine's environment when it runs with a pod's.

A handler (``tpenv up``'s ``run:``) and ``tpenv intercept -- CMD`` get the app container's env,
but a few variables describe the machine a process runs on, not the app: the pod's ``PATH``
names the image's directories, its ``HOME`` is the container user's (``/`` for a uid the image
has no entry for, as the charts' uid 1001), its ``TMPDIR``/``XDG_RUNTIME_DIR`` do not exist
here. With the pod's values a local script writes its caches under ``/`` and finds the wrong
programs (seen with examples/wordpress/run-local.sh: ``~/.cache`` became ``/.cache``). These
are kept from this machine, or left unset when it has none; the env file still holds the pod's
values (it describes the pod). A name the config's ``env.set`` or ``env.rewrite`` gives is the
user's explicit choice and is kept as given.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Mapping

# Variables of this machine a local command needs to run at all; the pod's values would break it.
KEEP_LOCAL = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TMPDIR", "LANG", "DISPLAY",
              "SSH_AUTH_SOCK", "XDG_RUNTIME_DIR", "VIRTUAL_ENV", "PYTHONPATH")


def command_env(app_env: Mapping[str, str], explicit: Collection[str] = (),
                local: Mapping[str, str] | None = None) -> dict[str, str]:
    """``app_env`` with :data:`KEEP_LOCAL` taken from ``local`` (default: this process's
    environment), except the names in ``explicit`` (set by the user's config)."""
    local = os.environ if local is None else local
    env = dict(app_env)
    for name in KEEP_LOCAL:
        if name in explicit:
            continue
        if name in local:
            env[name] = local[name]
        else:
            env.pop(name, None)
    return env
