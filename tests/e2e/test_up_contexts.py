"""`contexts:` (issue 20): one committed telepresence.yaml, found in a reader's kubeconfig whose
context names it never mentions, with units in two contexts at once. The real CLI against the
real cluster.

The reader's kubeconfig (written per test) holds two contexts for the local cluster that differ
in user, namespace and name: ``my-admin`` (the admin's credentials, namespace A, the API server's
own URL) and ``my-sa`` (a ServiceAccount token whose Role covers namespace B alone, reaching
the API server through an ApiProxy the test can take away). The file calls them ``cluster``
(matched by server URL) and ``team`` (matched by candidate context names)."""
from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cluster.pytest_plugin import apply, kubectl, wait_until
from tests.e2e.helpers_up import TPENV, free_port, http_json
from tests.e2e.test_intercept_kit import spec_of, tpenv_env
from tests.e2e.test_up_kit import (ApiProxy, UpSession, answered_by_laptop, client, deploy, extra_namespace,
                                   ready_pods, wait_client, write_handler)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SA = "limited"


def limited_service_account(ns: str) -> str:
    """A ServiceAccount allowed what a forward needs in ``ns`` and nothing elsewhere; its token."""
    apply([
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SA}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": SA},
         "rules": [{"apiGroups": [""], "resources": ["services", "pods", "endpoints"],
                    "verbs": ["get", "list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
                   {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": SA},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SA},
         "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": ns}]},
    ], ns=ns)
    return kubectl("create", "token", SA, "--duration=1h", ns=ns).stdout.strip()


def reader_kubeconfig(admin: Path, out: Path, proxy: ApiProxy, *, ns_admin: str, ns_sa: str, token: str,
                      sa_via_proxy: bool = True) -> tuple[Path, str]:
    """The reader's kubeconfig (``my-admin`` current, ``my-sa``) and the API server's URL."""
    proxied = yaml.safe_load(proxy.kubeconfig.read_text())  # absolute paths, server = the proxy
    ctx = next(c["context"] for c in proxied["contexts"] if c["name"] == proxied["current-context"])
    via = next(c["cluster"] for c in proxied["clusters"] if c["name"] == ctx["cluster"])
    user = next(u["user"] for u in proxied["users"] if u["name"] == ctx["user"])
    server = f"https://{proxy.target[0]}:{proxy.target[1]}"
    direct = dict(via, server=server)
    out.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "my-admin",
        "clusters": [{"name": "laptop", "cluster": direct},
                     {"name": "laptop-via-proxy", "cluster": via if sa_via_proxy else direct}],
        "users": [{"name": "admin", "user": user}, {"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "my-admin", "context": {"cluster": "laptop", "user": "admin", "namespace": ns_admin}},
                     {"name": "my-sa", "context": {"cluster": "laptop-via-proxy", "user": "sa",
                                                   "namespace": ns_sa}}]}))
    return out, server


def file_with(tmp_path: Path, server: str, units: str, *, extra_entries: str = "", cluster_ns: str | None = None
              ) -> Path:
    path = tmp_path / "telepresence.yaml"
    path.write_text(
        "apiVersion: tpenv/v1\n"
        "contexts:\n"
        f"  cluster:\n    server: {server}\n" + (f"    namespace: {cluster_ns}\n" if cluster_ns else "") +
        "  team:\n    contexts: [ci-runner, my-sa]\n" + extra_entries + units)
    return path


def web_intercept(port: int, *, context: str | None = None) -> str:
    return ("intercepts:\n  - name: web\n    workload: deployment/web\n"
            + (f"    context: {context}\n" if context else "")
            + f"    port: {port}:web\n    mount: false\n"
            f"    env: {{set: {{PORT: \"{port}\", NAME: web}}}}\n"
            "    run: {command: [python3, server.py], cwd: web}\n")


@contextlib.contextmanager
def two_contexts(tmp_path: Path, kubeconfig: Path, ns_admin: str) -> Iterator[dict]:
    """Namespace B with the ServiceAccount and Service db; the reader's kubeconfig; the proxy."""
    with extra_namespace("ctx") as ns_sa:
        token = limited_service_account(ns_sa)
        deploy("db", ns_sa, wait=False)
        proxy = ApiProxy(kubeconfig, tmp_path / "proxied-kubeconfig")
        proxy.start()
        try:
            kc, server = reader_kubeconfig(kubeconfig, tmp_path / "reader-kubeconfig", proxy, ns_admin=ns_admin,
                                           ns_sa=ns_sa, token=token)
            yield {"ns_sa": ns_sa, "kubeconfig": kc, "server": server, "proxy": proxy, "token": token}
        finally:
            proxy.stop()


def test_units_in_two_contexts_with_their_own_credentials_and_outages(namespace, kubeconfig, tmp_path):
    ns = namespace
    # -- stage 1: web (to intercept) and a client in A; B holds db and the ServiceAccount ----------
    deploy("web", ns, wait=False)
    client(ns)
    # The admin's kube context says namespace default: A reaches the cluster entry's units only
    # through the entry's own `namespace:` (else web would be looked for in default).
    with two_contexts(tmp_path, kubeconfig, "default") as c:
        ns_sa = c["ns_sa"]
        port, local_db, local_denied = free_port(), free_port(), free_port()
        write_handler(tmp_path / "web")
        # web in the default context (`cluster`, the first entry: the admin, its entry's namespace A);
        # db in `team` (the ServiceAccount, its context's namespace B); and db of A in `team`,
        # which the ServiceAccount may not read: proof that `team` units use the token.
        file_with(tmp_path, c["server"], web_intercept(port) + (
            "forwards:\n"
            f"  - service: db\n    context: team\n    port: 80\n    local: {local_db}\n"
            f"  - service: web\n    context: team\n    namespace: {ns}\n    port: 80\n    local: {local_denied}\n"),
            cluster_ns=ns)
        kubectl("rollout", "status", "deployment/web", "--timeout=120s", ns=ns, timeout=150)
        kubectl("rollout", "status", "deployment/db", "--timeout=120s", ns=ns_sa, timeout=150)
        wait_client(ns)

        with UpSession(tmp_path, env={"KUBECONFIG": str(c["kubeconfig"])}) as up:
            # -- stage 2: both serve at once, each unit keyed and shown with its context ----------
            units = up.wait_ready(f"intercept/{ns}/web/{port}:web/cluster", f"forward/{ns_sa}/db/80/team",
                                  "handler/web")
            assert units[f"forward/{ns_sa}/db/80/team"]["context"] == "team"
            assert units[f"intercept/{ns}/web/{port}:web/cluster"]["context"] == "cluster"
            up.until("web from the laptop", answered_by_laptop(ns, f"http://web.{ns}/", name="web"), 90)
            db_url = f"http://127.0.0.1:{local_db}/"
            answer = up.until("db through the team forward", lambda: http_json(db_url), 60)
            assert answer["source"] == "cluster" and answer["pod"] in ready_pods(ns_sa, "db")

            # -- stage 3: the team forward into A is refused to the ServiceAccount, by name -------
            denied = up.until("the team forward into A refused", lambda: (lambda u: u if u and u["state"] in (
                "failed", "pending") and u.get("last_error") else None)(up.unit(f"forward/{ns}/web/80/team")), 90)
            assert f"system:serviceaccount:{ns_sa}:{SA}" in denied["last_error"], denied
            status = up.tpenv("status")
            assert status.returncode == 0 and "context team" in status.stdout and "context cluster" in status.stdout
            # `tpenv list` (no --context: the file's default entry, found in the kubeconfig, in the
            # entry's namespace A, not the kube context's default) names it too.
            listed = up.tpenv("list", timeout=120)
            assert listed.returncode == 0 and "Context       : cluster" in listed.stdout, listed.stdout + listed.stderr
            assert "web: intercepted" in listed.stdout, listed.stdout

            # -- stage 4: the team context's API access goes away: only its units degrade ---------
            handler_pid = up.handler_pid("web")
            c["proxy"].stop()
            up.until("the team forward failed", lambda: (up.unit(f"forward/{ns_sa}/db/80/team") or {}).get(
                "state") in ("failed", "pending", "starting"), 90)
            for _ in range(3):  # the other context keeps serving, untouched
                assert answered_by_laptop(ns, f"http://web.{ns}/", name="web")(), up.output
            assert up.unit(f"intercept/{ns}/web/{port}:web/cluster")["state"] == "ready"
            assert up.handler_pid("web") == handler_pid

            # -- stage 5: access returns: the team forward heals by itself --------------------------
            c["proxy"].start()
            up.wait_ready(f"forward/{ns_sa}/db/80/team", timeout=150)
            assert up.until("db again", lambda: http_json(db_url), 60)["pod"] in ready_pods(ns_sa, "db")
            assert up.unit(f"intercept/{ns}/web/{port}:web/cluster")["state"] == "ready"

            # -- stage 6: a pod restart on team's side: db moves to the new pod; the cluster
            #    context's units were never restarted, through the outage or this ------------------
            old = ready_pods(ns_sa, "db")
            kubectl("delete", "pod", *old, "--wait=false", ns=ns_sa)
            up.until("db from its new pod", lambda: (lambda a: a if a.get("pod") not in old else None)(
                http_json(db_url)), 120)
            assert up.unit(f"intercept/{ns}/web/{port}:web/cluster")["restarts"] == 0
            assert up.handler_pid("web") == handler_pid
            assert up.stop() == 0, up.output


def test_context_flag_and_tpenv_context_choose_the_default(namespace, kubeconfig, tmp_path):
    ns = namespace
    with two_contexts(tmp_path, kubeconfig, ns) as c:
        ns_sa = c["ns_sa"]
        local = free_port()
        # A forward naming no context: where it goes is the default context's business.
        file_with(tmp_path, c["server"], f"forwards:\n  - service: db\n    port: 80\n    local: {local}\n")
        kubectl("rollout", "status", "deployment/db", "--timeout=120s", ns=ns_sa, timeout=150)
        env = {"KUBECONFIG": str(c["kubeconfig"])}

        def forward_under(*args: str, extra: dict[str, str] | None = None) -> dict:
            with UpSession(tmp_path, *args, env={**env, **(extra or {})}) as up:
                unit = up.until("the forward's unit", lambda: up.unit("forward/"), 60)
                name = unit["name"]
                if name == f"forward/{ns_sa}/db/80/{unit['context']}":  # in B: it serves
                    up.wait_ready(name)
                    assert http_json(f"http://127.0.0.1:{local}/")["pod"] in ready_pods(ns_sa, "db")
                assert up.stop() == 0, up.output
                return unit

        # -- stage 1: no choice: the first entry (the admin; its context's namespace A) -----------
        assert forward_under()["name"] == f"forward/{ns}/db/80/cluster"
        # -- stage 2: --context names an entry: team (the ServiceAccount, namespace B) -------------
        assert forward_under("--context", "team")["name"] == f"forward/{ns_sa}/db/80/team"
        # -- stage 3: TPENV_CONTEXT does the same, and --context wins over it ---------------------
        assert forward_under(extra={"TPENV_CONTEXT": "team"})["name"] == f"forward/{ns_sa}/db/80/team"
        assert forward_under("--context", "cluster", extra={"TPENV_CONTEXT": "team"})["context"] == "cluster"
        # -- stage 4: a kubeconfig context that is no entry of the file is accepted as it is ------
        assert forward_under("--context", "my-sa")["name"] == f"forward/{ns_sa}/db/80/my-sa"


def run_up_once(tmp_path: Path, kc: Path) -> subprocess.CompletedProcess:
    """`tpenv up` that is expected to exit by itself (bad input), with the reader's kubeconfig.
    One that keeps running instead is ended after a minute (returncode None, its output kept),
    so the caller can still look at what it started."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    argv = [TPENV, "up", "--plain"]
    try:
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={**tpenv_env(state), "KUBECONFIG": str(kc)})
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        return subprocess.CompletedProcess(argv, None, text(e.stdout), text(e.stderr))


def where_in(path: Path, line_text: str) -> tuple[int, int]:
    """Line and column (1-based) of the value after ``line_text``'s key, on the line that is
    exactly ``line_text`` (for a key alone, ``  name:``, the key's own column)."""
    lines = path.read_text().splitlines()
    n = lines.index(line_text)
    key, _, value = line_text.partition(": ")
    return n + 1, (len(key) + 3 if value else len(line_text) - len(line_text.lstrip()) + 1)


def test_bad_contexts_exit_2_located_and_start_nothing(namespace, kubeconfig, tmp_path):
    ns = namespace
    deploy("web", ns, wait=False)
    with extra_namespace("ctx") as ns_sa:
        token = limited_service_account(ns_sa)
        proxy = ApiProxy(kubeconfig, tmp_path / "proxied-kubeconfig")  # not started: only its address
        # Here both contexts reach the API server by its own URL: a server match finds two.
        kc, server = reader_kubeconfig(kubeconfig, tmp_path / "reader-kubeconfig", proxy, ns_admin=ns,
                                       ns_sa=ns_sa, token=token, sa_via_proxy=False)
        kubectl("rollout", "status", "deployment/web", "--timeout=120s", ns=ns, timeout=150)
        write_handler(tmp_path / "web")
        port, local = free_port(), free_port()
        # In every case the web intercept is healthy (entry `admin`, found by its candidate name
        # my-admin): only the forward's context is bad. So "nothing started" below proves that
        # the whole file is refused before any unit starts, not just the broken one.
        healthy = "  admin:\n    contexts: [my-admin]\n"
        cases = [
            # -- an entry matching nothing: at its line, with the contexts the kubeconfig has -----
            ("nothing", "gone", "  gone:\n    server: https://127.0.0.1:1\n", "  gone:",
             ["contexts.gone: no context of your kubeconfig matches (server https://127.0.0.1:1)",
              "your kubeconfig has: my-admin (cluster laptop", "my-sa (cluster laptop-via-proxy"]),
            # -- an entry matching two (both contexts on one server): them, and all there are -----
            ("two", "cluster", "", "  cluster:",
             ["contexts.cluster: 2 contexts of your kubeconfig match", ": my-admin, my-sa; your kubeconfig has: "
              "my-admin (cluster laptop", "my-sa (cluster laptop-via-proxy"]),
            # -- a unit naming a context the file does not declare -------------------------------
            ("undeclared", "staging", "", "    context: staging",
             ["forwards[0].context: no context 'staging' in contexts: (declared: cluster, team, admin)"]),
        ]
        for case, context, entries, at, expected in cases:
            path = file_with(tmp_path, server, web_intercept(port, context="admin") + (
                f"forwards:\n  - service: web\n    context: {context}\n    port: 80\n    local: {local}\n"),
                extra_entries=healthy + entries)
            line, col = where_in(path, at)
            cp = run_up_once(tmp_path, kc)
            # -- nothing started: no session left, web untouched (no agent), no handler ------------
            containers = [ct["name"] for ct in spec_of("deployment", "web", ns)["template"]["spec"]["containers"]]
            assert containers == ["app"], f"{case}: {containers}\n{cp.stdout}{cp.stderr}"
            assert not list((tmp_path / "state").glob("*.json")), f"{case}: a session ran\n{cp.stdout}{cp.stderr}"
            assert "[handler/" not in cp.stdout + cp.stderr, f"{case}:\n{cp.stdout}{cp.stderr}"
            # -- exit 2, located, naming what there is --------------------------------------------
            assert cp.returncode == 2, f"{case}: exit {cp.returncode}\n{cp.stdout}{cp.stderr}"
            where = f"{path.name}:{line}:{col}: "  # as given: `tpenv up` reads ./telepresence.yaml
            assert any(ln.startswith(where) for ln in cp.stderr.splitlines()), f"{case}: no line at {where}\n{cp.stderr}"
            for text in expected:
                assert text in cp.stderr, f"{case}: {text!r} not in\n{cp.stderr}"


def sso_plugin(path: Path, token: str | None) -> None:
    """An exec credential plugin (as `aws eks get-token` or an SSO helper is): it hands out
    ``token``, or, with None, fails as an expired login does."""
    if token is None:
        path.write_text("#!/bin/sh\necho 'sso: session expired, run sso login' >&2\nexit 1\n")
    else:
        answer = {"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": {"token": token}}
        path.write_text(f"#!/bin/sh\ncat <<'JSON'\n{json.dumps(answer)}\nJSON\n")
    path.chmod(0o755)


def test_a_context_whose_exec_plugin_fails_degrades_alone_and_heals(namespace, kubeconfig, tmp_path):
    ns = namespace
    # -- stage 1: web in A (the admin's `cluster`); db in B, reached by `team`, whose kubeconfig
    # user is an exec plugin handing out the ServiceAccount's token; the plugin fails for now ---
    deploy("web", ns, wait=False)
    with two_contexts(tmp_path, kubeconfig, ns) as c:
        ns_sa = c["ns_sa"]
        plugin = tmp_path / "sso-plugin"
        sso_plugin(plugin, None)
        kc = yaml.safe_load(c["kubeconfig"].read_text())
        (sa,) = [u for u in kc["users"] if u["name"] == "sa"]
        sa["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": str(plugin),
                               "interactiveMode": "Never"}}
        c["kubeconfig"].write_text(yaml.safe_dump(kc))
        local_web, local_db = free_port(), free_port()
        file_with(tmp_path, c["server"], "forwards:\n"
                  f"  - service: web\n    port: 80\n    local: {local_web}\n"
                  f"  - service: db\n    context: team\n    port: 80\n    local: {local_db}\n")
        kubectl("rollout", "status", "deployment/web", "--timeout=120s", ns=ns, timeout=150)
        kubectl("rollout", "status", "deployment/db", "--timeout=120s", ns=ns_sa, timeout=150)

        with UpSession(tmp_path, env={"KUBECONFIG": str(c["kubeconfig"])}) as up:
            # -- stage 2: the admin's forward serves; team's fails with the plugin's reason, under
            # the key it will have (its kube context's namespace B) ------------------------------
            up.wait_ready(f"forward/{ns}/web/80/cluster")
            assert http_json(f"http://127.0.0.1:{local_web}/")["pod"] in ready_pods(ns, "web")
            failed = up.until("team's forward failed with the reason", lambda: (lambda u: u if u and "sso: session "
                              "expired" in (u.get("last_error") or "") else None)(up.unit(f"forward/{ns_sa}/db/80/team")),
                              60)
            assert failed["state"] == "failed" and "context team" in failed["last_error"], failed
            assert up.unit(f"forward/{ns}/web/80/cluster")["state"] == "ready"
            # -- stage 3: the login is renewed: the next retry opens team, and db serves -----------
            sso_plugin(plugin, c["token"])
            up.wait_ready(f"forward/{ns_sa}/db/80/team", timeout=120)
            assert http_json(f"http://127.0.0.1:{local_db}/")["pod"] in ready_pods(ns_sa, "db")
            assert up.unit(f"forward/{ns}/web/80/cluster")["restarts"] == 0
            assert up.stop() == 0, up.output
