"""The Kubernetes kit: kubeconfig loading, an async face over the sync API client, workload lookup.

Everything the engines need from the API server goes through :class:`Kube`:

- kubeconfig and context loading is the ``kubernetes`` package's own (client certificates,
  bearer tokens, exec plugins, auth providers), so tpenv authenticates exactly like kubectl;
  :meth:`Kube.auth_headers` and :meth:`Kube.ssl_context` hand the same credentials to the
  port-forward transport, re-reading exec-plugin tokens when they expire;
- API calls run the sync client in a worker thread (``asyncio.to_thread``); objects come back
  as plain JSON dicts (camelCase, as ``kubectl get -o json`` shows them), because that is what
  the injector patches and what a byte-for-byte restore compares;
- watches are async iterators, each fed by one daemon thread (a watch is one long HTTP response);
- API errors are wrapped at this edge: 404 → NotFound, 401/403 → Forbidden naming the verb and
  resource (with the ``kubectl auth can-i`` line to check it), connection errors and 5xx →
  ClusterUnreachable.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Any, Callable

import urllib3

from tpenv.kits import kubepkg

kubepkg.prepare()  # before the first kubernetes import: see kubepkg
from kubernetes import client as k8s  # noqa: E402
from kubernetes import config as k8s_config  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402
from kubernetes.config.config_exception import ConfigException  # noqa: E402

from tpenv import logs
from tpenv.kits.kuberest import ApiGroup
from tpenv.kits.kubeconfig import load_errors
from tpenv.kits.kubeobjects import Workload, pod_is_ready, selector_string, service_selects  # noqa: F401 - the kit's API
from tpenv.kits.kubewatch import Watch, tracked  # noqa: F401 - tracked: the kit's API, used with watch()
from tpenv.errors import ClusterUnreachable, ConfigError, Forbidden, NotFound, TransientError, UpdateConflict, UsageError

log = logging.getLogger("tpenv.kube")

# The workload kinds tpenv intercepts, by the names a user may type (kubectl's short names too).
WORKLOAD_KINDS: dict[str, str] = {
    "deployment": "Deployment", "deployments": "Deployment", "deploy": "Deployment",
    "statefulset": "StatefulSet", "statefulsets": "StatefulSet", "sts": "StatefulSet",
    "replicaset": "ReplicaSet", "replicasets": "ReplicaSet", "rs": "ReplicaSet",
}
# Lookup order for a bare name: the same as Telepresence ("Using Deployment hello").
_BARE_NAME_ORDER = ("Deployment", "StatefulSet", "ReplicaSet")
_PLURAL = {"Deployment": "deployments", "StatefulSet": "statefulsets", "ReplicaSet": "replicasets"}


@dataclass(frozen=True)
class What:
    """What an API call does, for error messages: ``verb`` on ``resource`` (``name``) in ``namespace``."""

    verb: str
    resource: str
    namespace: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        text = f"{self.verb} {self.resource}"
        if self.name:
            text += f" {self.name!r}"
        if self.namespace:
            text += f" in namespace {self.namespace!r}"
        return text

    def can_i(self) -> str:
        ns = f" -n {self.namespace}" if self.namespace else ""
        return f"kubectl auth can-i {self.verb} {self.resource}{ns}"


def _api_message(e: ApiException) -> str:
    """The API server's own sentence from a Status body, else the HTTP reason."""
    try:
        body = json.loads(e.body or b"{}")
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except (ValueError, TypeError):
        pass
    return str(e.reason or e.status)


def wrap_api_error(e: Exception, what: What) -> Exception:
    """Map an exception from the kubernetes client to tpenv's tree (the caller raises it ``from e``)."""
    if isinstance(e, ApiException):
        msg = _api_message(e)
        if e.status == 404:
            return NotFound(f"{what}: not found ({msg})",
                            hint="check the name and the namespace (-n), e.g. with kubectl get")
        if e.status in (401, 403):
            return Forbidden(f"forbidden: cannot {what} ({msg})",
                             hint=f"check your rights with: {what.can_i()}")
        if e.status == 409:
            return UpdateConflict(f"{what}: conflict ({msg})")
        if e.status == 422 or e.status == 400:
            return UsageError(f"{what}: rejected by the API server ({msg})")
        if e.status == 0 or e.status >= 500:
            return ClusterUnreachable(f"{what}: the API server answered {e.status} ({msg})")
        return TransientError(f"{what}: HTTP {e.status} ({msg})")
    if isinstance(e, (urllib3.exceptions.HTTPError, OSError)):
        return ClusterUnreachable(f"{what}: cannot reach the API server ({e.__class__.__name__}: {e})",
                                  hint="is the cluster up and your kubeconfig's server address right?")
    return e


class Kube:
    """One cluster connection: a loaded kubeconfig context and the API groups tpenv uses."""

    def __init__(self, cfg: k8s.Configuration, *, context: str | None, namespace: str) -> None:
        self.cfg = cfg
        self.context = context
        self.namespace = namespace
        self.api = k8s.ApiClient(cfg)
        # Thin façades with the generated client's method names (see kuberest: the generated
        # API classes cost ~0.5 s of imports and validator builds on every start).
        self.core = ApiGroup(self.api, "/api/v1")
        self.apps = ApiGroup(self.api, "/apis/apps/v1")
        self.discovery = ApiGroup(self.api, "/apis/discovery.k8s.io/v1")
        self.rbac = ApiGroup(self.api, "/apis/rbac.authorization.k8s.io/v1")
        self.admission = ApiGroup(self.api, "/apis/admissionregistration.k8s.io/v1")
        self._watches: set[Watch] = set()
        self._closed = False

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    async def load(cls, config_file: str | None = None, context: str | None = None) -> "Kube":
        """Load a kubeconfig (``$KUBECONFIG`` / ``~/.kube/config`` by default) and a context."""
        return await asyncio.to_thread(cls._load_sync, config_file, context)

    @classmethod
    def _load_sync(cls, config_file: str | None, context: str | None) -> "Kube":
        cfg = k8s.Configuration()
        try:
            # Runs exec plugins and writes inline CA/cert data to temp files; hence the thread.
            with load_errors() as failed:  # a failing exec plugin is only logged by the package
                k8s_config.load_kube_config(config_file=config_file, context=context, client_configuration=cfg)
            contexts, active = k8s_config.list_kube_config_contexts(config_file=config_file)
            if failed:
                raise ConfigError(f"kubeconfig context {context or active['name']}: no credentials: "
                                  f"{'; '.join(failed)}", hint="its users[].user.exec plugin failed: "
                                  "`kubectl --context NAME get namespaces` runs it too")
        except ConfigException as e:
            raise ConfigError(f"kubeconfig: {e}",
                              hint="set KUBECONFIG or pass --context; `kubectl config get-contexts` lists them") from e
        except OSError as e:
            raise ConfigError(f"kubeconfig: cannot read it ({e})", hint="set KUBECONFIG to your cluster's config") from e
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        namespace = (chosen.get("context") or {}).get("namespace") or "default"
        log.debug("[kube/%s] server %s, namespace %s", chosen["name"], cfg.host, namespace)
        return cls(cfg, context=chosen["name"], namespace=namespace)

    # -- credentials for other transports (port-forward) ---------------------------------------

    @property
    def host(self) -> str:
        return self.cfg.host.rstrip("/")

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that authenticate like the API client does (refreshes expired exec tokens)."""
        headers: dict[str, str] = {}
        for setting in self.cfg.auth_settings().values():
            if setting["in"] == "header" and setting["value"]:
                headers[setting["key"]] = setting["value"]
        if self.cfg.username and self.cfg.password and "authorization" not in {k.lower() for k in headers}:
            headers["authorization"] = self.cfg.get_basic_auth_token()
        # Whatever logs these headers later (websockets prints its handshake at DEBUG) prints ***.
        logs.secret(*headers.values(), *(v.partition(" ")[2] for v in headers.values()))
        return headers

    def bearer_token(self) -> str | None:
        """The bearer token this kubeconfig authenticates with, if it uses one (agents ask the
        cluster who it belongs to: docs/protocol.md §2.1); None for client certificates."""
        for k, v in self.auth_headers().items():
            if k.lower() == "authorization" and v[:7].lower() == "bearer ":
                return v[7:].strip() or None
        return None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the kubeconfig (CA, client certificate); None for a plain http server."""
        if not self.host.startswith("https"):
            return None
        ctx = ssl.create_default_context(cafile=self.cfg.ssl_ca_cert) if self.cfg.ssl_ca_cert \
            else ssl.create_default_context()
        if not self.cfg.verify_ssl:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cfg.cert_file:
            ctx.load_cert_chain(self.cfg.cert_file, self.cfg.key_file)
        return ctx

    @property
    def proxy(self) -> str | None:
        """The kubeconfig's ``proxy-url`` for this cluster, if any."""
        return getattr(self.cfg, "proxy", None) or None

    @property
    def tls_server_name(self) -> str | None:
        return getattr(self.cfg, "tls_server_name", None)

    # -- calls ---------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., Any], *args: Any, what: What, **kw: Any) -> Any:
        """Run one sync API call in a thread; JSON dict result; errors wrapped."""
        return await asyncio.to_thread(self._call_sync, fn, args, kw, what)

    async def found(self, fn: Callable[..., Any], *args: Any, what: What, **kw: Any) -> bool:
        """:meth:`call` for its effect: False when the object is not there (404), True otherwise.
        For a read, whether it exists; for a delete, whether there was anything to delete."""
        try:
            await self.call(fn, *args, what=what, **kw)
        except NotFound:
            return False
        return True

    @staticmethod
    def _call_sync(fn: Callable[..., Any], args: tuple, kw: dict, what: What) -> Any:
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=(10, 60), **kw)
            data = resp.data
        except Exception as e:  # noqa: BLE001 - classified by wrap_api_error
            wrapped = wrap_api_error(e, what)
            if wrapped is e:
                raise
            raise wrapped from e
        return json.loads(data) if data else None

    # -- workloads -----------------------------------------------------------------------------

    async def get_workload(self, ref: str, namespace: str | None = None) -> Workload:
        """``name``, ``deployment/name``, ``statefulset/name`` or ``replicaset/name`` → Workload."""
        ns = namespace or self.namespace
        kind, name = parse_workload_ref(ref)
        # The namespace check beside the first read, not before it (a round trip on `up`'s way to
        # the rollout); a missing namespace is still the error said, whatever the read found.
        ns_check = asyncio.ensure_future(self.require_namespace(ns))
        try:
            kinds = [kind] if kind else list(_BARE_NAME_ORDER)
            for k in kinds:
                try:
                    obj = await self.call(self._getter(k), name, ns, what=What("get", _PLURAL[k], ns, name))
                except NotFound:
                    continue
                await ns_check
                return Workload(k, name, ns, obj)
            await ns_check
        finally:
            if not ns_check.done():
                ns_check.cancel()
            elif not ns_check.cancelled():
                ns_check.exception()  # read: a failed check under another error is not "never retrieved"
        tried = "/".join(_PLURAL[k] for k in kinds)
        raise NotFound(f"no workload {ref!r} in namespace {ns!r} (looked for {tried})",
                       hint=f"list them with: kubectl get {','.join(_PLURAL[k] for k in kinds)} -n {ns}")

    def _getter(self, kind: str) -> Callable[..., Any]:
        return {"Deployment": self.apps.read_namespaced_deployment,
                "StatefulSet": self.apps.read_namespaced_stateful_set,
                "ReplicaSet": self.apps.read_namespaced_replica_set}[kind]

    def _patcher(self, kind: str) -> Callable[..., Any]:
        return {"Deployment": self.apps.patch_namespaced_deployment,
                "StatefulSet": self.apps.patch_namespaced_stateful_set,
                "ReplicaSet": self.apps.patch_namespaced_replica_set}[kind]

    def _replacer(self, kind: str) -> Callable[..., Any]:
        return {"Deployment": self.apps.replace_namespaced_deployment,
                "StatefulSet": self.apps.replace_namespaced_stateful_set,
                "ReplicaSet": self.apps.replace_namespaced_replica_set}[kind]

    def _lister(self, kind: str) -> Callable[..., Any]:
        return {"Deployment": self.apps.list_namespaced_deployment,
                "StatefulSet": self.apps.list_namespaced_stateful_set,
                "ReplicaSet": self.apps.list_namespaced_replica_set}[kind]

    async def reload(self, w: Workload) -> Workload:
        obj = await self.call(self._getter(w.kind), w.name, w.namespace,
                              what=What("get", _PLURAL[w.kind], w.namespace, w.name))
        return Workload(w.kind, w.name, w.namespace, obj)

    async def replace_workload(self, w: Workload, obj: dict[str, Any], *, dry_run: bool = False) -> Workload:
        """PUT the whole object (carries resourceVersion: a concurrent edit fails instead of being lost).

        ``dry_run``: the API server checks RBAC, admission and validation but stores nothing."""
        kw = {"dry_run": "All"} if dry_run else {}
        new = await self.call(self._replacer(w.kind), w.name, w.namespace, obj,
                              what=What("update", _PLURAL[w.kind], w.namespace, w.name), **kw)
        return Workload(w.kind, w.name, w.namespace, new)

    async def list_workloads(self, namespace: str | None = None) -> list[Workload]:
        """Deployments, StatefulSets and the ReplicaSets no Deployment owns."""
        ns = namespace or self.namespace
        out: list[Workload] = []
        for kind in _BARE_NAME_ORDER:
            data = await self.call(self._lister(kind), ns, what=What("list", _PLURAL[kind], ns))
            for obj in data.get("items", []):
                if kind == "ReplicaSet" and obj["metadata"].get("ownerReferences"):
                    continue
                out.append(Workload(kind, obj["metadata"]["name"], ns, obj))
        return out

    async def require_namespace(self, namespace: str) -> None:
        try:
            await self.call(self.core.read_namespace, namespace, what=What("get", "namespaces", None, namespace))
        except NotFound as e:
            raise NotFound(f"namespace {namespace!r} does not exist",
                           hint="pick an existing one with -n; `kubectl get namespaces` lists them") from e
        except Forbidden:
            pass  # a user may work in a namespace without the right to read Namespace objects

    async def services_for(self, w: Workload) -> list[dict[str, Any]]:
        """Services in the workload's namespace whose selector picks its pods."""
        data = await self.call(self.core.list_namespaced_service, w.namespace,
                               what=What("list", "services", w.namespace))
        return [s for s in data.get("items", []) if service_selects(s, w.template_labels)]

    async def pods_of(self, w: Workload) -> list[dict[str, Any]]:
        data = await self.call(self.core.list_namespaced_pod, w.namespace, label_selector=w.selector,
                               what=What("list", "pods", w.namespace))
        return data.get("items", [])

    async def ready_pods(self, w: Workload) -> list[dict[str, Any]]:
        return [p for p in await self.pods_of(w) if pod_is_ready(p)]

    # -- watches -------------------------------------------------------------------------------

    def watch(self, fn: Callable[..., Any], *args: Any, what: What, **kw: Any) -> Watch:
        """An async iterator of ``(type, object dict)`` events of a list call's watch.

        Use as ``async with kube.watch(...) as events: async for kind, obj in events``. The thread
        re-opens the watch when the server ends it (its timeout) and ends on close().
        """
        w = Watch(fn, args, kw, what, wrap=wrap_api_error, on_close=self._watches.discard)
        self._watches.add(w)
        return w

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in list(self._watches):
            await w.close()
        await asyncio.to_thread(self.api.close)

    async def __aenter__(self) -> "Kube":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def parse_workload_ref(ref: str) -> tuple[str | None, str]:
    """``deployment/hello`` → ("Deployment", "hello"); ``hello`` → (None, "hello")."""
    if "/" not in ref:
        return None, ref
    kind, _, name = ref.partition("/")
    canonical = WORKLOAD_KINDS.get(kind.lower().split(".")[0])
    if not canonical or not name:
        raise UsageError(f"{ref!r} is not a workload I can intercept",
                         hint="use NAME, deployment/NAME, statefulset/NAME or replicaset/NAME")
    return canonical, name
