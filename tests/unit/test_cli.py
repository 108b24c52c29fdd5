"""The tpenv command as a user runs it: the console script in a subprocess, its exit codes and output."""
import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tpenv.cli.main import EXIT_INTERNAL, EXIT_INTERRUPTED, build_parser, main, run_verb, verb_module
from tpenv.cli.verbs import VERBS
from tpenv.errors import NotBuiltYet

ROOT = Path(__file__).resolve().parents[2]
TPENV = Path(sys.executable).parent / "tpenv"


def tpenv(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([str(TPENV), *args], cwd=cwd, env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=60)


# --- stage 1: validate and schema, the verbs that work today ------------------------------------------------------

def test_validate_passes_on_every_example():
    examples = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("examples/*/telepresence.yaml"))
    assert examples
    examples.append("examples/hello/workstation-state.yaml")  # Telepresence's apply -f format, read as it is
    result = tpenv("validate", *examples)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(examples)
    assert all(line.startswith(f"{e}: ok (") for line, e in zip(lines, examples))


def test_validate_reads_telepresence_yaml_in_the_current_directory():
    result = tpenv("validate", cwd=ROOT / "examples" / "hello")
    assert (result.returncode, result.stdout) == (0, "telepresence.yaml: ok (1 intercepts, 0 forwards)\n")


def test_validate_bad_file_exit_2_every_problem_no_traceback(tmp_path):
    (tmp_path / "telepresence.yaml").write_text("intercepts:\n  - workload: web\n    port: abc\n    mach: {}\n")
    result = tpenv("validate", "-f", "telepresence.yaml", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "telepresence.yaml:3:11: intercepts[0].port: 'abc' is not a port: expected LOCAL[:REMOTE], "
        "e.g. 8080, 8080:80 or 8080:http",
        "telepresence.yaml:4:5: unknown key 'mach' in intercepts[0] (did you mean 'match'?)",
        "hint: `tpenv schema` prints every key the file may have",
    ]


def test_validate_missing_file(tmp_path):
    result = tpenv("validate", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "telepresence.yaml: no such file",
        "hint: create one with `tpenv init WORKLOAD`, or point at it with -f FILE"]


def test_validate_json_output_for_scripts(tmp_path):
    (tmp_path / "t.yaml").write_text("namespace: Bad\n")
    result = tpenv("-o", "json", "validate", "-f", "t.yaml", cwd=tmp_path)
    assert result.returncode == 2
    error = json.loads(result.stderr)["error"]
    assert error["type"] == "ConfigError"
    assert error["problems"] == [{"file": "t.yaml", "line": 1, "column": 12, "suggestion": None, "message":
                                  "namespace: 'Bad' is not a valid namespace name: lowercase letters, digits and "
                                  "'-', at most 63 characters"}]
    ok = tpenv("validate", "-o", "json", cwd=ROOT / "examples" / "hello")
    assert json.loads(ok.stdout) == {"ok": True, "files": [
        {"file": "telepresence.yaml", "intercepts": ["hello"], "forwards": []}]}


def test_schema_prints_the_committed_schema():
    result = tpenv("schema")
    assert result.returncode == 0
    assert result.stdout == (ROOT / "schemas" / "telepresence.schema.json").read_text()


# --- stage 2: verbs whose engine is not built say so and exit 3 ----------------------------------------------------
# Other developers replace these stub files one by one; a replaced verb (its docstring no longer says
# "stub until") drops out of this test and is tested beside its engine.

STUBS = {
    "up": ([], "issue 6"), "down": ([], "issue 6"), "status": ([], "issue 6"), "list": ([], "issue 5"),
    "intercept": (["hello", "--port", "8080:80", "--http-header", "auto", "--", "python3", "server.py"], "issue 5"),
    "leave": (["hello"], "issue 5"), "connect": ([], "a later issue"), "quit": ([], "a later issue"),
    "env": (["hello", "--format", "json"], "issue 5"), "init": (["hello"], "issue 5"),
    "uninstall": (["--all-agents"], "issue 5"), "manager": (["install", "--dry-run"], "issue 4"),
}


def is_stub(verb: str) -> bool:
    return "stub until" in (verb_module(verb).__doc__ or "")


def test_every_verb_is_covered_and_built():
    # Every verb is built now (connect, quit and doctor were the last stubs): none may say
    # "not built yet" again without this test naming it.
    assert set(STUBS) | {"validate", "schema", "doctor", "completion"} == set(VERBS)
    assert [v for v in sorted(VERBS) if is_stub(v)] == []


# --- stage 3: the parser: global flags anywhere, usage errors exit 2 ----------------------------------------------

def test_global_flags_before_or_after_the_verb():
    parser = build_parser()
    before = parser.parse_args(["-f", "a.yaml", "-n", "ns", "--context", "c", "-o", "yaml", "--debug", "status"])
    after = parser.parse_args(["status", "-f", "a.yaml", "-n", "ns", "--context", "c", "-o", "yaml", "--debug"])
    for args in (before, after):
        assert (str(args.file), args.namespace, args.kube_context, args.output, args.debug) == \
               ("a.yaml", "ns", "c", "yaml", True)


@pytest.mark.parametrize("args,needle", [
    (["uninstall"], "one of the arguments --agent --all-agents --everything is required"),
    (["uninstall", "--agent", "web", "--everything"], "not allowed with argument"),
    (["manager", "reinstall"], "invalid choice: 'reinstall'"),
    (["-o", "xml", "status"], "invalid choice: 'xml'"),
    (["up", "--", "cmd"], "tpenv up takes no command after --"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_exit_2_without_traceback(args, needle):
    result = tpenv(*args)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_help_lists_verbs_and_settings():
    result = tpenv("--help")
    assert result.returncode == 0
    for verb in VERBS:
        assert f"    {verb} " in result.stdout
    assert "TPENV_AGENT_IMAGE (default tpenv/agent:dev)" in result.stdout


def test_bad_setting_in_the_environment_exits_2():
    result = tpenv("schema", env={"TPENV_AGENT_SSH_PORT": "abc"})
    assert result.returncode == 2 and result.stderr.startswith("tpenv: error: TPENV_AGENT_SSH_PORT='abc': ")


# --- stage 4: how run_verb maps what a verb raises (pure logic, a verb module stand-in) ---------------------------

def args_for(output: str = "text", debug: bool = False) -> argparse.Namespace:
    return argparse.Namespace(output=output, debug=debug, file=Path("t.yaml"), namespace=None, kube_context=None)


def verb_raising(exc: BaseException) -> types.SimpleNamespace:
    async def run(args, ctx):
        raise exc
    return types.SimpleNamespace(run=run)


def test_internal_error_is_70_with_one_line(capsys):
    assert run_verb(verb_raising(RuntimeError("boom")), args_for()) == EXIT_INTERNAL
    assert capsys.readouterr().err.splitlines() == [
        "tpenv: internal error: RuntimeError: boom", "hint: run again with --debug for the traceback, and report it"]


def test_internal_error_with_debug_shows_the_traceback(capsys):
    assert run_verb(verb_raising(RuntimeError("boom")), args_for(debug=True)) == EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_is_130(capsys):
    assert run_verb(verb_raising(KeyboardInterrupt()), args_for()) == EXIT_INTERRUPTED


def test_our_errors_use_their_exit_code_and_hint(capsys):
    assert run_verb(verb_raising(NotBuiltYet("not yet", hint="wait")), args_for()) == 3
    assert capsys.readouterr().err == "tpenv: error: not yet\nhint: wait\n"


# --- stage 5: the context verbs build on ---------------------------------------------------------------------------

def test_context_applies_namespace_and_context_flags():
    from tpenv.cli.context import CliContext
    from tpenv.settings import load_settings

    ctx = CliContext(settings=load_settings({}), config_file=ROOT / "examples" / "hello" / "telepresence.yaml",
                     namespace="team-a", kube_context="kind-dev")
    config = ctx.load_config()
    assert (config.namespace, config.context) == ("team-a", "kind-dev")


def test_context_refuses_a_bad_namespace_flag():
    from tpenv.cli.context import CliContext
    from tpenv.errors import UsageError
    from tpenv.settings import load_settings

    ctx = CliContext(settings=load_settings({}), config_file=ROOT / "examples" / "hello" / "telepresence.yaml",
                     namespace="Team_A")
    with pytest.raises(UsageError, match="not a valid namespace name"):
        ctx.load_config()


@pytest.mark.parametrize("output,parse", [("json", json.loads), ("yaml", None)])
def test_emit_formats(output, parse, capsys):
    import io

    from tpenv.cli.context import CliContext
    from tpenv.settings import load_settings

    out = io.StringIO()
    CliContext(settings=load_settings({}), output=output, stdout=out).emit("ignored", {"z": [1, Path("/x")], "a": 2})
    if parse:
        assert parse(out.getvalue()) == {"z": [1, "/x"], "a": 2}
    else:
        assert out.getvalue() == "z:\n- 1\n- /x\na: 2\n"  # the verb's order, not sorted


def test_a_verb_that_fails_to_import_only_breaks_itself(capsys):
    import tpenv.cli.main as cli_main

    broken = cli_main._BrokenVerb("up", ImportError("no module named kubernetes"))
    assert "unavailable: ImportError" in broken.HELP
    assert run_verb(broken, args_for()) == EXIT_INTERNAL
    assert capsys.readouterr().err.startswith("tpenv: internal error: ImportError: no module named kubernetes\n")


def test_agent_image_precedence_flag_env_file(tmp_path):
    from tpenv.cli.context import CliContext
    from tpenv.settings import load_settings

    f = tmp_path / "telepresence.yaml"
    f.write_text("apiVersion: tpenv/v1\nagent:\n  image: reg.example/agent:file\n  image_pull_policy: Always\n")

    def ctx(environ: dict, flag: str | None = None) -> CliContext:
        c = CliContext(settings=load_settings(environ), config_file=f, agent_image=flag, environ=environ)
        c.apply_agent_flag()
        c.load_config()
        return c

    # The file alone; the environment over the file; the flag over both.
    assert (ctx({}).settings.agent.image, ctx({}).settings.agent.image_pull_policy) == \
        ("reg.example/agent:file", "Always")
    env = {"TPENV_AGENT_IMAGE": "reg.example/agent:env", "TPENV_AGENT_IMAGE_PULL_POLICY": "Never"}
    assert (ctx(env).settings.agent.image, ctx(env).settings.agent.image_pull_policy) == \
        ("reg.example/agent:env", "Never")
    assert ctx(env, "reg.example/agent:flag").settings.agent.image == "reg.example/agent:flag"
    # Read once, at start: a reload with another image does not swap the agent mid-session.
    c = ctx({})
    f.write_text("apiVersion: tpenv/v1\nagent:\n  image: reg.example/agent:edited\n")
    c.load_config()
    assert c.settings.agent.image == "reg.example/agent:file"


def test_agent_image_errors(tmp_path, capsys):
    from tpenv.config import load_config
    from tpenv.errors import ConfigError

    assert main(["--agent-image", "has space", "list"]) == 2
    assert "--agent-image 'has space': not an image reference" in capsys.readouterr().err
    f = tmp_path / "telepresence.yaml"
    f.write_text("apiVersion: tpenv/v1\nagent:\n  image: 'a b'\n  image_pull_policy: Sometimes\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    got = sorted((p.line, p.message) for p in e.value.problems)
    assert [line for line, _ in got] == [3, 4], got
    assert "'a b' is not an image reference" in got[0][1] and "Sometimes" in got[1][1], got


def test_project_agent_section_for_flag_driven_verbs(tmp_path):
    from tpenv.cli.context import CliContext
    from tpenv.settings import load_settings

    f = tmp_path / "telepresence.yaml"
    f.write_text("apiVersion: tpenv/v1\nagent:\n  image: reg.example/agent:file\n")
    warnings: list[str] = []
    # The file's section applies; a bad -n is the verb's to report, not a reason to skip the file.
    ctx = CliContext(settings=load_settings({}), config_file=f, namespace="Not_A_Namespace", environ={})
    ctx.apply_project_agent(warnings.append)
    assert ctx.settings.agent.image == "reg.example/agent:file" and warnings == []
    # A file that does not load: one warning naming it, the default image kept.
    f.write_text("apiVersion: tpenv/v1\nagent: [1]\n")
    ctx = CliContext(settings=load_settings({}), config_file=f, environ={})
    ctx.apply_project_agent(warnings.append)
    assert ctx.settings.agent.image == load_settings({}).agent.image
    assert len(warnings) == 1 and warnings[0].startswith(f"{f}: not read (") and "agent: section" in warnings[0]
