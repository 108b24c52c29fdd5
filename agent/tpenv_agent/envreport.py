"""The app container's environment as the app sees it (contract §5).

The agent container got the app's env at injection, plus what Kubernetes adds to every
container, plus the agent image's own variables. The image's variables are recorded at
image build in ``/etc/tpenv/image-env.json``: a list of names (contract), or an object
name -> value, in which case a variable whose value differs from the image's was set by the
pod spec and is kept.
"""
from __future__ import annotations

import json
import os

DEFAULT_IMAGE_ENV = "/etc/tpenv/image-env.json"


def load_image_env(path: str) -> dict[str, str | None]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    if isinstance(data, dict):
        return {str(k): (None if v is None else str(v)) for k, v in data.items()}
    return {str(k): None for k in data}


def app_env(image_env: dict[str, str | None], environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ if environ is None else environ)
    out = {}
    for name, value in environ.items():
        if name in image_env and (image_env[name] is None or image_env[name] == value):
            continue
        out[name] = value
    return out
