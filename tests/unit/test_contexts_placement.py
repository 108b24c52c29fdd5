"""`contexts:` (issue 20): where each unit of `tpenv up` goes (its Kube, namespace, context), the
connection included, and a context whose client cannot be opened failing only its own units.

Real files (kubeconfig, telepresence.yaml), the real loader and the real UpFactory; the Kubes are
loaded from the kubeconfig but never called (nothing talks to a cluster: tests/e2e/test_up_contexts.py
does). Exec plugins are real scripts run by the kubernetes package."""
from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest

from tests.unit.test_contexts import SERVER, config, kubeconfig
from tpenv.engine.contexts import ContextDown, DownSpec
from tpenv.engine.desired import InterceptSpec, UpFactory
from tpenv.engine.forwards import ForwardSpec
from tpenv.engine.outbound.unit import ConnectSpec
from tpenv.engine.up import UpContext
from tpenv.errors import ConfigError, TransientError
from tpenv.kits.kube import Kube
from tpenv.settings import load_settings

OTHER = "https://127.0.0.1:7000"


def uctx() -> UpContext:
    return UpContext(session_id="s", settings=load_settings({}), only=frozenset(), notify=lambda e: None)


async def placed(factory: UpFactory, cfg, unit, ctx: UpContext | None = None) -> tuple[str | None, str, str | None]:
    """(kube context, namespace, context name) of ``unit``, as `tpenv up` places it."""
    ctx = ctx or uctx()
    async with ctx.resources:
        kube, ns, context = await factory.place(cfg, ctx, unit)
        return kube.context, ns, context


ENTRIES = """\
apiVersion: tpenv/v1
contexts:
  admin:
    server: https://127.0.0.1:6443
  team:
    contexts: [laptop-sa]
    namespace: team-ns
"""
FILE = ENTRIES + """\
{top}intercepts:
  - {{workload: web, port: "8080:80"}}
  - {{workload: api, port: "8081:80", namespace: own-ns}}
  - {{workload: job, port: "8082:80", context: team}}
  - {{workload: cron, port: "8083:80", context: team, namespace: own-ns}}
"""


def test_a_units_namespace_is_its_own_then_its_entrys_then_the_files_then_the_kube_contexts(tmp_path):
    kc = tmp_path / "kc"
    kubeconfig(kc, {"laptop-admin": ("local", SERVER, "kube-ns"), "laptop-sa": ("proxied", OTHER, "sa-kube-ns")})
    web, api, job, cron = range(4)

    async def where(top: str = "", **kw) -> list[tuple]:
        cfg = config(tmp_path, FILE.format(top=top))
        factory = UpFactory(load_settings({}), kubeconfig=str(kc), **kw)
        return [await placed(factory, cfg, ic) for ic in cfg.intercepts]

    # -- stage 1: no file namespace: the unit's own, else its entry's, else its kube context's ----
    got = asyncio.run(where())
    assert got[web] == ("laptop-admin", "kube-ns", "admin")  # admin has no namespace: the kube context's
    assert got[api] == ("laptop-admin", "own-ns", "admin")
    assert got[job] == ("laptop-sa", "team-ns", "team")  # the entry's wins over its kube context's
    assert got[cron] == ("laptop-sa", "own-ns", "team")
    # -- stage 2: the file's namespace comes after the entry's, before the kube context's ---------
    got = asyncio.run(where("namespace: file-ns\n"))
    assert [g[1] for g in got] == ["file-ns", "own-ns", "team-ns", "own-ns"]
    # -- stage 3: -n wins over everything --------------------------------------------------------
    got = asyncio.run(where("namespace: file-ns\n", namespace_override="flag-ns"))
    assert {g[1] for g in got} == {"flag-ns"}


CONNECTED = ENTRIES + """\
connect:
  mode: env
  context: team
forwards:
  - {service: db, port: 5432}
"""


def test_the_connection_names_its_context(tmp_path):
    kc = tmp_path / "kc"
    kubeconfig(kc, {"laptop-admin": ("local", SERVER, None), "laptop-sa": ("proxied", OTHER, None)})
    cfg = config(tmp_path, CONNECTED)
    # -- stage 1: `tpenv up` builds the connection in team (its kube context and namespace); its key
    # ends with the context's name, and its spec carries it (status and the connection section show it)
    factory = UpFactory(load_settings({}), kubeconfig=str(kc))
    factory.checked(cfg)

    async def specs() -> dict:
        ctx = uctx()
        async with ctx.resources:
            return await factory(cfg, ctx)

    got = asyncio.run(specs())
    (connect,) = [s for s in got.values() if isinstance(s, ConnectSpec)]
    assert connect.key == ("connect", "team-ns", "team") and connect.context == "team"
    assert connect.kube.context == "laptop-sa"
    (forward,) = [s for s in got.values() if isinstance(s, ForwardSpec)]
    assert forward.context == "admin" and forward.kube.context == "laptop-admin"
    # -- stage 2: an entry only the connection uses is resolved too (else it could not be placed) --
    only_connect = config(tmp_path, CONNECTED.replace("forwards:\n  - {service: db, port: 5432}\n", ""))
    factory = UpFactory(load_settings({}), kubeconfig=str(kc))
    factory.checked(only_connect)
    assert asyncio.run(placed(factory, only_connect, only_connect.connection)) == ("laptop-sa", "team-ns", "team")
    # -- stage 3: `connect: {mode: off}` asks for no connection, so its context need not resolve --
    off = config(tmp_path, CONNECTED.replace("mode: env", "mode: off"))
    assert off.connection is None


def test_a_connection_naming_an_undeclared_context_is_located(tmp_path):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, CONNECTED.replace("context: team", "context: teem"))
    (p,) = e.value.problems
    assert (p.line, p.column) == (10, 12)
    assert "connect.context: no context 'teem' in contexts: (declared: admin, team)" in p.message
    assert p.suggestion == "did you mean 'team'?"
    with pytest.raises(ConfigError) as e:
        config(tmp_path, "connect: {mode: env, context: prod}\n")
    assert "connect.context: 'prod' names no entry: the file declares no contexts:" in e.value.problems[0].message


def test_tpenv_connect_uses_the_connections_entry(tmp_path, monkeypatch):
    from tpenv.cli.context import CliContext
    from tpenv.cli.verbs.connect import _kube_target

    kubeconfig(tmp_path / "kc", {"laptop-admin": ("local", SERVER, None), "laptop-sa": ("proxied", OTHER, None)})
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kc"))
    config(tmp_path, CONNECTED)
    ctx = CliContext(settings=load_settings({}), config_file=tmp_path / "telepresence.yaml")
    cfg = ctx.load_config()
    assert _kube_target(ctx, cfg) == ("laptop-sa", "team-ns")
    # -n comes first; a connection naming no context goes to --context's entry
    config(tmp_path, CONNECTED.replace("  context: team\n", ""))
    ctx = CliContext(settings=load_settings({}), config_file=tmp_path / "telepresence.yaml", namespace="mine",
                     kube_context="team")
    cfg = ctx.load_config()
    assert _kube_target(ctx, cfg) == ("laptop-sa", "mine")


# -- a context whose client cannot be opened ------------------------------------------------------

def exec_kubeconfig(tmp_path: Path) -> tuple[Path, Path]:
    """A kubeconfig whose ``laptop-sa`` authenticates through an exec plugin (a script), and the
    script: failing (as an expired SSO login does) until :func:`plugin_works` fixes it."""
    plugin = tmp_path / "sso-plugin"
    plugin.write_text("#!/bin/sh\necho 'sso: session expired, run sso login' >&2\nexit 1\n")
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    kc = tmp_path / "kc"
    kc.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "laptop-admin",
        "clusters": [{"name": "local", "cluster": {"server": SERVER}}, {"name": "proxied", "cluster": {"server": OTHER}}],
        "users": [{"name": "u", "user": {"token": "t"}},
                  {"name": "sso", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                                                    "command": str(plugin), "interactiveMode": "Never"}}}],
        "contexts": [{"name": "laptop-admin", "context": {"cluster": "local", "user": "u"}},
                     {"name": "laptop-sa", "context": {"cluster": "proxied", "user": "sso", "namespace": "sa-ns"}}]}))
    return kc, plugin


def plugin_works(plugin: Path) -> None:
    answer = {"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
              "status": {"token": "fresh"}}
    plugin.write_text(f"#!/bin/sh\necho '{json.dumps(answer)}'\n")


def test_a_failing_exec_plugin_is_an_error_naming_the_context_and_the_reason(tmp_path):
    kc, plugin = exec_kubeconfig(tmp_path)
    # -- stage 1: the kubernetes package only logs it; Kube.load raises it -----------------------
    with pytest.raises(ConfigError) as e:
        asyncio.run(Kube.load(str(kc), "laptop-sa"))
    assert "kubeconfig context laptop-sa: no credentials: exec: process returned 1" in e.value.message
    assert "sso: session expired" in e.value.message and "exec plugin" in (e.value.hint or "")
    # -- stage 2: once it works, the client carries its token -------------------------------------
    plugin_works(plugin)

    async def token() -> str | None:
        async with await Kube.load(str(kc), "laptop-sa") as kube:
            return kube.bearer_token()

    assert asyncio.run(token()) == "fresh"


# team without its namespace: a down unit's key takes its kube context's (read from the kubeconfig)
TWO_WAYS = ENTRIES.replace("    namespace: team-ns\n", "") + """\
intercepts:
  - {workload: web, port: "8080:80", mount: false}
forwards:
  - {service: db, port: 5432, context: team}
connect:
  mode: env
  context: team
"""


def test_a_context_that_cannot_be_opened_fails_only_its_units_and_is_tried_again(tmp_path):
    kc, plugin = exec_kubeconfig(tmp_path)
    cfg = config(tmp_path, TWO_WAYS)
    factory = UpFactory(load_settings({}), kubeconfig=str(kc))
    factory.checked(cfg)

    async def passes() -> tuple[dict, dict, list]:
        ctx = uctx()
        async with ctx.resources:
            first = await factory(cfg, ctx)  # -- stage 1: team's plugin fails --------------------
            # the down unit fails its start with the reason (status shows it; the reconciler
            # retries it with backoff), and retries come from the next pass
            down = next(s for s in first.values() if isinstance(s, DownSpec) and s.key[0] == "forward")
            unit = down.create(lambda e: None)
            with pytest.raises(TransientError) as e:
                await unit.start()
            await unit.stop()
            plugin_works(plugin)  # -- stage 2: the plugin works again: the next pass opens team -----
            second = await factory(cfg, ctx)
            return first, second, [str(e.value)]

    first, second, errors = asyncio.run(passes())
    # stage 1: the admin context's intercept is there as usual; team's forward and connection stand
    # in under the keys they will have, with the reason
    kinds = {k: type(s).__name__ for k, s in first.items()}
    assert kinds == {("intercept", "default", "web", "8080:80", "admin"): "InterceptSpec",
                     ("forward", "sa-ns", "db", "5432", "team"): "DownSpec",
                     ("connect", "sa-ns", "team"): "DownSpec"}, kinds
    assert "context team: kubeconfig context laptop-sa: no credentials" in errors[0]
    assert "sso: session expired" in errors[0]
    assert isinstance(first[("forward", "sa-ns", "db", "5432", "team")].error, ContextDown)
    # stage 2: the same keys, now the real specs (another hash: the reconciler replaces them)
    kinds = {k: type(s).__name__ for k, s in second.items()}
    assert kinds == {("intercept", "default", "web", "8080:80", "admin"): "InterceptSpec",
                     ("forward", "sa-ns", "db", "5432", "team"): "ForwardSpec",
                     ("connect", "sa-ns", "team"): "ConnectSpec"}, kinds
    key = ("forward", "sa-ns", "db", "5432", "team")
    assert second[key].spec_hash != first[key].spec_hash
    assert isinstance(second[("intercept", "default", "web", "8080:80", "admin")], InterceptSpec)
