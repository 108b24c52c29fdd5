"""The ``kubernetes`` package, imported without what tpenv never uses (issue 13).

Every tpenv command that talks to a cluster imports ``kubernetes.client`` (``Configuration``,
``ApiClient``) and ``kubernetes.config`` (the kubeconfig loader). Two things in the package cost
a start more than the rest of it, for code tpenv never runs:

- ``kubernetes/__init__.py`` imports ``watch`` (which imports ``pydoc``), ``dynamic``,
  ``stream`` (websocket-client), ``leaderelection``, ``informer`` and ``utils``. tpenv's watches,
  streams and port-forwards are its own (kits/kubewatch.py, kits/portforward.py). Here the
  package module is made from its spec without running that file; a submodule is imported on
  first attribute access (``kubernetes.watch``), so code that does use one still finds it.
- ``kubernetes.config.kube_config`` imports requests-oauthlib (and with it requests) and
  oauthlib only to refresh an OIDC auth-provider token. ``OAuth2Session`` is a stand-in that
  imports the real class when a refresh calls it; ``oauthlib.oauth2`` loads on first use.

Measured with ``python -X importtime`` (tests/unit/test_up_imports.py keeps them out): about a
sixth of `tpenv --help`'s start. :func:`prepare` must run before the first ``kubernetes``
import; each tpenv module that imports the package calls it first. It does nothing when the
package is already imported (by another library, or in full by a test).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

# What kubernetes/__init__.py would have imported, loaded on attribute access instead.
_ON_DEMAND = ("client", "config", "dynamic", "watch", "stream", "utils", "leaderelection", "informer")


def prepare() -> None:
    """Make ``import kubernetes``, ``kubernetes.client`` and ``kubernetes.config`` light."""
    if "kubernetes" in sys.modules:
        return
    spec = importlib.util.find_spec("kubernetes")
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed: the import itself will say so
    package = importlib.util.module_from_spec(spec)  # __path__ and __spec__ set, __init__ not run

    def __getattr__(name: str) -> Any:
        if name in _ON_DEMAND:
            return importlib.import_module(f"kubernetes.{name}")
        if name == "__version__":
            from importlib.metadata import version
            return version("kubernetes")
        raise AttributeError(f"module 'kubernetes' has no attribute {name!r}")

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]  # PEP 562
    sys.modules["kubernetes"] = package
    _import_kube_config()


def _import_kube_config() -> None:
    """kube_config imported with stand-ins for its OIDC-only imports, which leave sys.modules right
    after: kube_config keeps what it bound, and a later real import gets the real modules."""
    if "kubernetes.config.kube_config" in sys.modules:
        return
    stand_ins = {}
    if "requests_oauthlib" not in sys.modules:
        # Its name is taken during kube_config's import (``from requests_oauthlib import ...``).
        stand_ins["requests_oauthlib"] = types.ModuleType("requests_oauthlib")
        stand_ins["requests_oauthlib"].OAuth2Session = _oauth2_session  # type: ignore[attr-defined]
    if "oauthlib.oauth2" not in sys.modules:
        # Only looked into when an OIDC refresh fails (``except oauthlib.oauth2.rfc6749...``).
        stand_ins["oauthlib.oauth2"] = _on_first_use("oauthlib.oauth2")
    parent = importlib.import_module("oauthlib") if "oauthlib.oauth2" in stand_ins else None
    sys.modules.update(stand_ins)
    if parent is not None:
        parent.oauth2 = stand_ins["oauthlib.oauth2"]  # type: ignore[attr-defined]
    try:
        importlib.import_module("kubernetes.config.kube_config")
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def _oauth2_session(*args: Any, **kw: Any) -> Any:
    """kube_config's ``OAuth2Session``: the real one, imported on the first OIDC token refresh."""
    from requests_oauthlib import OAuth2Session
    return OAuth2Session(*args, **kw)


def _on_first_use(name: str) -> types.ModuleType:
    """A module whose attributes are the real ``name``'s, imported on the first lookup (by then
    the stand-in has left sys.modules, so the import finds the real one)."""
    module = types.ModuleType(name)

    def __getattr__(attr: str) -> Any:
        return getattr(importlib.import_module(name), attr)

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return module
