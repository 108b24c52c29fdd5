"""The app process's env (tpenv.engine.appenv, kits/podexec): parsing, precedence, exec Status."""
from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from tpenv.engine.appenv import merge_app_env, parse_environ
from tpenv.kits.podexec import exec_status, exec_url


def test_environ_is_nul_separated_and_values_keep_newlines_and_equals():
    raw = b"PATH=/usr/bin:/bin\0LANG=C.UTF-8\0CERT=-----BEGIN\nabc=\n-----END\0EMPTY=\0\0junk\0"
    assert parse_environ(raw) == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                                  "CERT": "-----BEGIN\nabc=\n-----END", "EMPTY": ""}


def test_agent_report_is_the_base_and_the_process_is_laid_over_it():
    report = {"GREETING": "hello", "LANG": "C", "HOSTNAME": "pod-1", "ONLY_REPORTED": "x"}
    process = {"GREETING": "hello", "LANG": "C", "HOSTNAME": "pod-1", "PYTHONUNBUFFERED": "1", "PATH": "/bin"}
    assert merge_app_env(report, process) == {**report, "PYTHONUNBUFFERED": "1", "PATH": "/bin"}
    # Where they differ the process is right: HOME follows each container's user (a non-root agent).
    assert merge_app_env({"HOME": "/"}, {"HOME": "/root"}) == {"HOME": "/root"}
    # Unreadable process env: the report alone, never a guess.
    assert merge_app_env(report, None) == report


def test_exec_url_asks_for_stdout_and_stderr_only():
    url = exec_url("https://10.0.0.1:6443/", "team a", "web-1", "app", ["cat", "/proc/1/environ"])
    parts = urlsplit(url)
    assert parts.scheme == "wss" and parts.path == "/api/v1/namespaces/team%20a/pods/web-1/exec"
    q = parse_qs(parts.query)
    assert q == {"container": ["app"], "command": ["cat", "/proc/1/environ"], "stdout": ["true"], "stderr": ["true"]}
    assert "stdin" not in q and "tty" not in q


def test_exec_status_success_failure_and_garbage():
    assert exec_status(b'{"metadata":{},"status":"Success"}') is None
    assert exec_status(b"") is None
    failure = (b'{"status":"Failure","message":"exec: \\"cat\\": executable file not found in $PATH",'
               b'"reason":"InternalError"}')
    assert exec_status(failure) == 'exec: "cat": executable file not found in $PATH'
    assert exec_status(b"not json") == "not json"
