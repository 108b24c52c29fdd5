"""API groups as thin REST façades over the ``kubernetes`` package's ``ApiClient``.

``ApiGroup(api_client, "/api/v1").read_namespaced_secret("tpenv-auth", "team")`` sends the
same request as ``CoreV1Api.read_namespaced_secret`` and returns the raw urllib3 response,
exactly like the generated method called with ``_preload_content=False`` (non-2xx raises
``ApiException``). Kubeconfig loading, authentication (client certificates, tokens, exec
plugins), TLS and the connection pool stay the package's: only the generated per-method
wrappers are skipped.

Why: tpenv never deserializes into the generated models (it works on JSON dicts), yet
importing ``core_v1_api``/``apps_v1_api`` imports every model they mention and each method
builds a pydantic validator on first use. Measured on the `tpenv up` path: ~0.5-0.8 s of a
1.6 s start-to-first-answer (bench/up_latency.py). The method names are the generated
client's, parsed by a small grammar, so call sites read the same as with the typed client:

    {verb}_namespaced_{kind}            verb in read/replace/patch/delete: (name, namespace[, body])
                                        verb in list/create:                (namespace[, body])
    list_{kind}_for_all_namespaces      ()
    {verb}_{kind}                       cluster-scoped: (name[, body]) or ([body]) for list/create
    {verb}_namespaced_pod_ephemeralcontainers   the subresource (_SUBRESOURCES), like the generated one

Keyword arguments become query parameters (``label_selector`` → ``labelSelector``, booleans
as ``true``/``false``); ``body=``, ``_request_timeout``, ``_content_type`` and
``_preload_content`` (always raw here) are understood as in the generated client.
"""
from __future__ import annotations

import re
from typing import Any, Callable
from urllib.parse import quote

from tpenv.kits import kubepkg

kubepkg.prepare()  # before the first kubernetes import: see kubepkg
from kubernetes.client.exceptions import ApiException  # noqa: E402

VERBS = ("read", "list", "create", "replace", "patch", "delete")
_HTTP = {"read": "GET", "list": "GET", "create": "POST", "replace": "PUT", "patch": "PATCH", "delete": "DELETE"}
# Resource plurals the "drop underscores, add s" rule gets wrong.
_IRREGULAR = {"endpoints": "endpoints", "ingress": "ingresses", "network_policy": "networkpolicies",
              "pod_security_policy": "podsecuritypolicies", "priority_class": "priorityclasses",
              "storage_class": "storageclasses", "ingress_class": "ingressclasses",
              "runtime_class": "runtimeclasses", "resource_slice": "resourceslices"}
# Subresources reached by a method name, as the generated client names them: kind -> (resource, sub).
_SUBRESOURCES = {"pod_ephemeralcontainers": ("pods", "ephemeralcontainers")}
_NAME = re.compile(r"^(?P<verb>[a-z]+)_(?:(?P<ns>namespaced_)?(?P<kind>[a-z0-9_]+?)(?P<all>_for_all_namespaces)?)$")


def plural(kind: str) -> str:
    """``stateful_set`` → ``statefulsets`` (the URL's resource name)."""
    return _IRREGULAR.get(kind) or kind.replace("_", "") + "s"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def _query_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class ApiGroup:
    """One API group/version (``/api/v1``, ``/apis/apps/v1``, ...) with generated-client method names."""

    def __init__(self, api_client: Any, base: str) -> None:
        self.api_client = api_client
        self.base = base.rstrip("/")
        self._methods: dict[str, Callable[..., Any]] = {}

    def __repr__(self) -> str:
        return f"ApiGroup({self.base})"

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        if attr.startswith("_"):
            raise AttributeError(attr)
        method = self._methods.get(attr)
        if method is None:
            method = self._methods[attr] = self._method(attr)
        return method

    def _method(self, attr: str) -> Callable[..., Any]:
        m = _NAME.match(attr)
        if not m or m["verb"] not in VERBS or (m["all"] and (m["ns"] or m["verb"] != "list")):
            raise AttributeError(f"{self!r} has no method {attr!r} (expected e.g. read_namespaced_pod)")
        verb, namespaced = m["verb"], bool(m["ns"])
        resource, sub = _SUBRESOURCES.get(m["kind"]) or (plural(m["kind"]), None)
        named = verb in ("read", "replace", "patch", "delete")
        body_arg = verb in ("create", "replace", "patch")  # the body is positional (delete's is optional)

        def serialize(*args: Any, **kw: Any) -> tuple[Any, ...]:
            want = int(named) + int(namespaced) + int(body_arg)
            if len(args) != want and not (verb == "delete" and len(args) == want + 1):
                raise TypeError(f"{attr}() takes {want} positional arguments, got {len(args)}")
            rest = list(args)
            name = rest.pop(0) if named else None
            namespace = rest.pop(0) if namespaced else None
            body = rest.pop(0) if rest else kw.pop("body", None)
            path = self.base
            if namespace is not None:
                path += f"/namespaces/{quote(namespace, safe='')}"
            path += f"/{resource}"
            if name is not None:
                path += f"/{quote(name, safe='')}"
            if sub is not None:
                path += f"/{sub}"
            return self._serialize(_HTTP[verb], path, body, kw, patch=verb == "patch")

        def call(*args: Any, **kw: Any) -> Any:
            timeout = kw.pop("_request_timeout", None)
            return self._send(serialize(*args, **kw), timeout)

        call.__name__ = call.__qualname__ = attr
        call.serialize = serialize  # type: ignore[attr-defined]  # the request it would send (tests)
        return call

    def _serialize(self, method: str, path: str, body: Any, kw: dict[str, Any], *, patch: bool) -> tuple[Any, ...]:
        content_type = kw.pop("_content_type", None)
        kw.pop("_preload_content", None)
        query = [(_camel(k), _query_value(v)) for k, v in kw.items() if v is not None]
        headers = {"Accept": "application/json"}
        if body is not None:
            if content_type is None and patch:
                content_type = "application/json-patch+json" if isinstance(body, list) else \
                    "application/merge-patch+json"
            headers["Content-Type"] = content_type or "application/json"
        return self.api_client.param_serialize(
            method=method, resource_path=path, query_params=query, header_params=headers, body=body,
            auth_settings=["BearerToken"])

    def _send(self, request: tuple[Any, ...], timeout: Any) -> Any:
        response = self.api_client.call_api(*request, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response
