"""kuberest.ApiGroup sends what the generated kubernetes client would send, and errors alike.

The reference is the generated client itself: for every method tpenv calls, the request our
façade serializes (method, URL, query, body, content type) is compared with the one the
generated ``_<method>_serialize`` builds from the same arguments. A real local HTTP server
then checks the round trip: raw response back, non-2xx as ApiException (wrapped by the kit).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlparse

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tests.unit.kubeconfig_kit import token_kubeconfig
from tpenv.errors import NotFound
from tpenv.kits.kube import Kube, What
from tpenv.kits.kuberest import ApiGroup, plural

BODY = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello"}, "spec": {"ports": [{"port": 80}]}}

# (group base, generated API class, method, positional args, keyword args) — every shape tpenv uses.
CASES = [
    ("/api/v1", "CoreV1Api", "read_namespace", ("team",), {}),
    ("/api/v1", "CoreV1Api", "list_namespace", (), {}),
    ("/api/v1", "CoreV1Api", "read_namespaced_secret", ("tpenv-auth", "team"), {}),
    ("/api/v1", "CoreV1Api", "create_namespaced_secret", ("team", BODY), {}),
    ("/api/v1", "CoreV1Api", "delete_namespaced_secret", ("tpenv-auth", "team"), {}),
    ("/api/v1", "CoreV1Api", "list_namespaced_pod", ("team",), {"label_selector": "app=hello,tier in (a,b)"}),
    ("/api/v1", "CoreV1Api", "list_namespaced_pod", ("team",),
     {"watch": True, "resource_version": "42", "timeout_seconds": 300, "allow_watch_bookmarks": True}),
    ("/api/v1", "CoreV1Api", "list_namespaced_service", ("team",), {}),
    ("/api/v1", "CoreV1Api", "read_namespaced_service", ("hello", "team"), {}),
    ("/api/v1", "CoreV1Api", "replace_namespaced_service", ("hello", "team", BODY), {"dry_run": "All"}),
    ("/api/v1", "CoreV1Api", "list_service_for_all_namespaces", (), {}),
    ("/api/v1", "CoreV1Api", "list_secret_for_all_namespaces", (), {"label_selector": "a=b"}),
    ("/api/v1", "CoreV1Api", "read_namespaced_config_map", ("tpenv-manager", "tpenv"), {}),
    ("/api/v1", "CoreV1Api", "patch_namespaced_config_map", ("tpenv-manager", "tpenv", BODY),
     {"field_manager": "tpenv", "force": True, "_content_type": "application/apply-patch+yaml"}),
    ("/api/v1", "CoreV1Api", "patch_namespaced_service_account", ("sa", "tpenv", [{"op": "add", "path": "/x"}]),
     {"_content_type": "application/json-patch+json"}),
    ("/apis/apps/v1", "AppsV1Api", "read_namespaced_deployment", ("hello", "team"), {}),
    ("/apis/apps/v1", "AppsV1Api", "read_namespaced_stateful_set", ("db", "team"), {}),
    ("/apis/apps/v1", "AppsV1Api", "replace_namespaced_replica_set", ("rs", "team", BODY), {}),
    ("/apis/apps/v1", "AppsV1Api", "list_namespaced_controller_revision", ("team",), {"label_selector": "x"}),
    ("/apis/apps/v1", "AppsV1Api", "delete_namespaced_replica_set", ("rs", "team"),
     {"propagation_policy": "Background"}),
    ("/apis/apps/v1", "AppsV1Api", "list_stateful_set_for_all_namespaces", (), {}),
    ("/apis/discovery.k8s.io/v1", "DiscoveryV1Api", "list_namespaced_endpoint_slice", ("team",),
     {"label_selector": "kubernetes.io/service-name=hello"}),
    ("/apis/rbac.authorization.k8s.io/v1", "RbacAuthorizationV1Api", "read_cluster_role_binding", ("crb",), {}),
    ("/apis/admissionregistration.k8s.io/v1", "AdmissionregistrationV1Api",
     "delete_mutating_webhook_configuration", ("tpenv",), {}),
]


def _generated(api: k8s.ApiClient, cls: str, method: str, args: tuple, kw: dict) -> tuple:
    gen = getattr(k8s, cls)(api)
    fn = getattr(gen, f"_{method}_serialize")
    names = [p for p in fn.__code__.co_varnames[1:fn.__code__.co_argcount]]
    params = dict.fromkeys(names)
    params.update(zip(names, args))
    params.update({k: v for k, v in kw.items() if k != "_content_type"})
    params.update(_request_auth=None, _content_type=kw.get("_content_type"), _headers=None, _host_index=0)
    return fn(**params)


def _shape(req: tuple) -> tuple:
    method, url, headers, body, _post = req
    u = urlparse(url)
    return method, u.path, sorted(parse_qsl(u.query)), body, headers.get("Content-Type")


@pytest.mark.parametrize("base,cls,method,args,kw", CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_requests_equal_the_generated_clients(base, cls, method, args, kw):
    api = k8s.ApiClient(k8s.Configuration(host="https://k8s.example:6443"))
    ours = getattr(ApiGroup(api, base), method).serialize(*args, **dict(kw))
    theirs = _generated(api, cls, method, args, kw)
    m, path, query, body, ctype = _shape(ours)
    gm, gpath, gquery, gbody, gctype = _shape(theirs)
    assert (m, path, query, body) == (gm, gpath, gquery, gbody)
    if body is not None and "_content_type" in kw:
        assert ctype == gctype == kw["_content_type"]


def test_patch_content_type_follows_the_body_when_not_given():
    api = k8s.ApiClient(k8s.Configuration(host="https://k8s.example:6443"))
    core = ApiGroup(api, "/api/v1")
    assert core.patch_namespaced_service.serialize("a", "b", {"x": 1})[2]["Content-Type"] == \
        "application/merge-patch+json"
    assert core.patch_namespaced_service.serialize("a", "b", [{"op": "remove", "path": "/x"}])[2][
        "Content-Type"] == "application/json-patch+json"


def test_names_outside_the_grammar_and_wrong_arity_are_refused():
    core = ApiGroup(k8s.ApiClient(k8s.Configuration(host="https://x")), "/api/v1")
    for bad in ("connect_get_namespaced_pod_portforward", "watch_namespaced_pod", "read_pod_for_all_namespaces"):
        with pytest.raises(AttributeError):
            getattr(core, bad)
    with pytest.raises(TypeError):
        core.read_namespaced_secret("only-a-name")
    with pytest.raises(TypeError):
        core.create_namespaced_secret("ns")  # no body
    assert plural("stateful_set") == "statefulsets" and plural("endpoints") == "endpoints"
    assert plural("ingress") == "ingresses" and plural("mutating_webhook_configuration") == \
        "mutatingwebhookconfigurations"


class _Server:
    """A local HTTP server answering like the API server: one JSON object, or a 404 Status."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes, str | None]] = []
        self.auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                outer.seen.append((self.command, self.path, self.rfile.read(n), self.headers.get("Content-Type")))
                outer.auth.append(self.headers.get("Authorization"))
                if "missing" in self.path:
                    status, body = 404, {"kind": "Status", "code": 404, "message": 'secrets "missing" not found'}
                else:
                    status, body = 200, {"kind": "Secret", "metadata": {"name": "s"}}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer  # noqa: N815

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


async def test_round_trip_through_the_kit_against_a_local_server(tmp_path):
    server = _Server()
    kc = token_kubeconfig(tmp_path / "kubeconfig", server.url, token="t0ken")
    kube = await Kube.load(str(kc))
    try:
        # Stage 1: a read returns the JSON object as a dict, with the kubeconfig's bearer token sent.
        obj = await kube.call(kube.core.read_namespaced_secret, "s", "team", what=What("get", "secrets", "team", "s"))
        assert obj["metadata"]["name"] == "s"
        assert server.seen[-1][:2] == ("GET", "/api/v1/namespaces/team/secrets/s")
        assert server.auth[-1] == "Bearer t0ken"
        # Stage 2: a create carries the body as JSON.
        await kube.call(kube.core.create_namespaced_secret, "team", BODY, what=What("create", "secrets", "team"))
        method, path, body, ctype = server.seen[-1]
        assert (method, path, json.loads(body), ctype) == ("POST", "/api/v1/namespaces/team/secrets", BODY,
                                                           "application/json")
        # Stage 3: a 404 Status becomes NotFound carrying the API server's sentence.
        with pytest.raises(NotFound, match='secrets "missing" not found') as e:
            await kube.call(kube.core.read_namespaced_secret, "missing", "team",
                            what=What("get", "secrets", "team", "missing"))
        assert isinstance(e.value.__cause__, ApiException) and e.value.__cause__.status == 404
    finally:
        await kube.close()
        server.close()
