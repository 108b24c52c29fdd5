"""telepresence.yaml that is wrong: every problem at its exact file:line:column, with its own message."""
from pathlib import Path

import pytest

from tpenv.config import load_config
from tpenv.errors import ConfigError, Problem


def problems(tmp_path: Path, text: str, environ: dict | None = None) -> list[str]:
    """Every problem of ``text`` as "F:line:col: message (suggestion)"."""
    path = tmp_path / "telepresence.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    assert info.value.exit_code == 2
    return [str(p).replace(str(path), "F") for p in info.value.problems]


HEAD = "intercepts:\n  - workload: web\n"  # an intercept missing only what each test adds


# --- stage 1: the file itself -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.problems == [Problem(str(tmp_path / "nope.yaml"), 0, 0, "no such file")]
    assert "tpenv init" in info.value.hint


def test_yaml_syntax_error(tmp_path):
    assert problems(tmp_path, "intercepts:\n  - workload: [web\n") == [
        "F:3:1: invalid YAML: while parsing a flow sequence expected ',' or ']', but got '<stream end>'"]


@pytest.mark.parametrize("value", ["+_", "-_", "0x_"])
def test_scalar_ruamel_cannot_construct(tmp_path, value):
    # ruamel.yaml's int pattern matches these, then its int constructor raises IndexError:
    # found by the property test; the user gets the scalar's position and what to do.
    [message] = problems(tmp_path, f"namespace: a\nintercepts:\n  - workload: {value}\n")
    assert message.startswith(f"F:3:15: invalid YAML: {value!r} cannot be read as a value")
    assert message.endswith("quote it")


def test_duplicate_yaml_key(tmp_path):
    [message] = problems(tmp_path, "namespace: a\nnamespace: b\n")
    assert message.startswith('F:2:1: invalid YAML: while constructing a mapping found duplicate key "namespace"')


def test_not_utf8(tmp_path):
    path = tmp_path / "telepresence.yaml"
    path.write_bytes(b"namespace: a\nname\xffspace: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [f"{path}:2:5: the file is not UTF-8 text"]


def test_top_level_must_be_a_mapping(tmp_path):
    assert problems(tmp_path, "- a\n- b\n") == ["F:1:1: expected a mapping at the top level, got a list"]


# --- stage 2: keys and types --------------------------------------------------------------------------------------

def test_misspelt_keys_get_a_suggestion(tmp_path):
    assert problems(tmp_path, "namespase: a\nintercepts:\n  - wokload: web\n    port: 1\n") == [
        "F:1:1: unknown key 'namespase' (did you mean 'namespace'?)",
        "F:3:5: missing required key 'workload' in intercepts[0]",
        "F:3:5: unknown key 'wokload' in intercepts[0] (did you mean 'workload'?)",
    ]


def test_unknown_key_without_close_match_lists_the_allowed_ones(tmp_path):
    assert problems(tmp_path, "connect: {zzz: 1}\n") == [
        "F:1:11: unknown key 'zzz' in connect (allowed: mode, context, mapped_namespaces, namespaces, also_proxy, never_proxy, allow_conflicting_subnets, excluded_suffixes)"]


def test_misspelt_enum_values_get_a_suggestion(tmp_path):
    text = "connect:\n  mode: roo\n" + HEAD + "    port: 1\n    env: {format: dockr}\n"
    assert problems(tmp_path, text) == [
        "F:2:9: connect.mode: 'roo' is not one of 'auto', 'host', 'ns', 'env', 'off', 'root', 'rootless' (did you mean 'root'?)",
        "F:6:19: intercepts[0].env.format: 'dockr' is not one of 'docker', 'sh', 'json', 'compose' "
        "(did you mean 'docker'?)",
    ]


def test_wrong_types(tmp_path):
    text = HEAD + "    port: 1\n    run:\n      command: [python3, 3]\n      watch: notalist\n"
    assert problems(tmp_path, text) == [
        "F:5:26: intercepts[0].run.command[1]: expected a string, got a number 3",
        "F:6:14: intercepts[0].run.watch: expected a list, got a string 'notalist'",
    ]


def test_bad_names_are_shown_at_the_key(tmp_path):
    text = HEAD + "    port: 1\n    env:\n      set:\n        GOOD: x\n        BAD NAME: y\n"
    assert problems(tmp_path, text) == [
        "F:7:9: intercepts[0].env.set.BAD NAME: 'BAD NAME' is not a valid environment variable name"]


def test_unknown_workload_kind(tmp_path):
    assert problems(tmp_path, "intercepts:\n  - workload: deploymnet/web\n    port: 1\n") == [
        "F:2:15: intercepts[0].workload: unknown workload kind 'deploymnet': "
        "expected deployment/, statefulset/ or replicaset/ (did you mean 'deployment'?)"]


# --- stage 3: ports -----------------------------------------------------------------------------------------------

def test_port_abc(tmp_path):
    assert problems(tmp_path, HEAD + "    port: abc\n") == [
        "F:3:11: intercepts[0].port: 'abc' is not a port: expected LOCAL[:REMOTE], e.g. 8080, 8080:80 or 8080:http"]


@pytest.mark.parametrize("port,message", [
    ("0", "port 0 is out of range (1-65535)"),
    ("70000", "port 70000 is out of range (1-65535)"),
    ("'8080:99999'", "port 99999 is out of range (1-65535)"),
    ("'8080:Web_Port'", "'Web_Port' is not a port name: lowercase letters, digits and '-', at most 15 characters"),
])
def test_ports_out_of_range(tmp_path, port, message):
    assert problems(tmp_path, HEAD + f"    port: {port}\n") == [f"F:3:11: intercepts[0].port: {message}"]


def test_forward_port_out_of_range(tmp_path):
    assert problems(tmp_path, "forwards:\n  - {service: db, port: 5432, local: 65536}\n") == [
        "F:2:38: forwards[0].local: port 65536 is out of range (1-65535)"]


def test_duplicate_local_ports_across_intercepts_and_forwards(tmp_path):
    text = ("intercepts:\n  - {name: a, workload: a, port: 8080}\n  - {name: b, workload: b, port: '8080:http'}\n"
            "forwards:\n  - {service: db, port: 8080}\n")
    assert problems(tmp_path, text) == [
        "F:3:34: intercepts[1]: local port 8080 is already used by intercepts[0] (line 2) "
        "(each intercept and forward needs its own local port)",
        "F:5:25: forwards[0]: local port 8080 is already used by intercepts[0] (line 2) "
        "(each intercept and forward needs its own local port)",
    ]


def test_duplicate_intercept_names(tmp_path):
    text = "intercepts:\n  - {name: web, workload: a, port: 1}\n  - {name: web, workload: b, port: 2}\n" \
           "  - {workload: deployment/web, port: 3}\n"
    assert problems(tmp_path, text) == [
        "F:3:12: intercepts[1]: duplicate intercept name 'web' (first at line 2) (give each intercept its own `name:`)",
        "F:4:16: intercepts[2]: duplicate intercept name 'web' (first at line 2) (give each intercept its own `name:`)",
    ]


# --- stage 4: match rules -----------------------------------------------------------------------------------------

def test_bad_header_regex(tmp_path):
    text = HEAD + "    port: 1\n    match:\n      headers: {x-dev: 'ali(ce'}\n"
    assert problems(tmp_path, text) == [
        "F:5:24: intercepts[0].match.headers.x-dev: 'ali(ce' is not a valid regular expression: "
        "missing ), unterminated subpattern at position 3"]


def test_two_path_rules(tmp_path):
    text = HEAD + "    port: 1\n    match:\n      path_prefix: /a\n      path_regex: /b.*\n"
    assert problems(tmp_path, text) == [
        "F:4:5: intercepts[0].match: path_prefix and path_regex are both given: use at most one path rule"]


def test_headers_of_the_wrong_kind(tmp_path):
    assert problems(tmp_path, HEAD + "    port: 1\n    match: {headers: [a]}\n") == [
        "F:4:13: intercepts[0].match.headers: expected a mapping of header name to regex, or 'auto'"]


# --- stage 5: env templates and ${VAR} ----------------------------------------------------------------------------

def test_rewrite_template_that_does_not_compile(tmp_path):
    text = HEAD + "    port: 1\n    env:\n      rewrite: {DB: '{{ value '}\n"
    assert problems(tmp_path, text) == [
        "F:5:21: intercepts[0].env.rewrite.DB: template '{{ value ' does not compile: "
        "unexpected end of template, expected 'end of print statement'."]


def test_rewrite_template_with_an_unknown_variable(tmp_path):
    text = HEAD + "    port: 1\n    env:\n      rewrite: {DB: '{{ valeu }}.{{ namespace }}'}\n"
    assert problems(tmp_path, text) == [
        "F:5:21: intercepts[0].env.rewrite.DB: template '{{ valeu }}.{{ namespace }}' uses unknown variable "
        "'valeu'; known: value, name, namespace, env, mount_root, intercept_id (did you mean 'value'?)"]


def test_unset_environment_variable(tmp_path):
    assert problems(tmp_path, "namespace: ${TEAM_NS}\n") == [
        "F:1:12: namespace: environment variable TEAM_NS is not set (set it, or give a default: ${TEAM_NS:-default})"]


def test_malformed_reference(tmp_path):
    assert problems(tmp_path, "namespace: ${TEAM NS}\n") == [
        "F:1:12: namespace: malformed reference '${TEAM NS}': write ${NAME} or ${NAME:-default}"]


# --- stage 6: run paths on disk -----------------------------------------------------------------------------------

def test_watch_glob_matching_nothing(tmp_path):
    (tmp_path / "app.py").write_text("")
    text = HEAD + "    port: 1\n    run:\n      command: [python3, app.py]\n      watch: ['*.py', 'src/**/*.go']\n"
    assert problems(tmp_path, text) == [
        "F:6:23: intercepts[0].run.watch[1]: 'src/**/*.go' matches no file under '.' "
        "(globs are relative to run.cwd; ** matches any depth)"]


def test_missing_cwd(tmp_path):
    text = HEAD + "    port: 1\n    run: {command: make, cwd: nowhere}\n"
    assert problems(tmp_path, text) == ["F:4:31: intercepts[0].run.cwd: directory 'nowhere' does not exist"]


# --- stage 7: everything at once, in file order -------------------------------------------------------------------

def test_all_problems_are_reported_together(tmp_path):
    text = "namespace: Bad_NS\nintercepts:\n  - workload: web\n    port: abc\n    mach: {}\n" \
           "forwards:\n  - {service: db, port: http}\n"
    assert problems(tmp_path, text) == [
        "F:1:12: namespace: 'Bad_NS' is not a valid namespace name: lowercase letters, digits and '-', "
        "at most 63 characters",
        "F:4:11: intercepts[0].port: 'abc' is not a port: expected LOCAL[:REMOTE], e.g. 8080, 8080:80 or 8080:http",
        "F:5:5: unknown key 'mach' in intercepts[0] (did you mean 'match'?)",
        "F:7:5: forwards[0]: 'local' is required when port is a name ('http')",
    ]


# --- stage 8: a template that fails only when rendered is located too ---------------------------------------------

def test_render_time_error_is_located(tmp_path):
    from tpenv.config import render_env

    path = tmp_path / "telepresence.yaml"
    path.write_text(HEAD + "    port: 1\n    env:\n      rewrite:\n        URL: '{{ env.NOPE }}'\n")
    ic = load_config(path).intercepts[0]
    with pytest.raises(ConfigError) as info:
        render_env({}, ic, None, "s:web")
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.column) == (str(path), 6, 14)
    assert problem.message.startswith("env.rewrite.URL: template failed: UndefinedError")
