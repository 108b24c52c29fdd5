"""`tpenv intercept` flags mean what the same keys mean in telepresence.yaml."""
import os

import pytest

from tpenv.cli.main import parse
from tpenv.config.flags import intercept_from_flags
from tpenv.config.models import PortMap
from tpenv.errors import UsageError


def flags(*argv: str):
    return intercept_from_flags(parse(["intercept", *argv]), namespace="team")


# --- stage 1: the flags users know from Telepresence --------------------------------------------------------------

def test_plain_intercept_defaults_like_telepresence():
    ic = flags("hello")
    assert (ic.name, ic.workload, ic.port, ic.match, ic.run, ic.namespace) == \
           ("hello", "hello", PortMap(local=8080), None, None, "team")
    assert ic.mount.path is True


def test_every_flag():
    ic = flags("deployment/web", "--port", "9000:http", "--service", "web-svc", "--http-header", "x-dev=alice",
               "--http-header", "x-env=dev.*", "--http-path-prefix", "/api", "--env-file", "web.env",
               "--env-syntax", "sh", "--mount", "false", "--", "python3", "app.py", "--debug")
    assert ic.port == PortMap(local=9000, remote="http") and ic.service == "web-svc"
    assert ic.match.wire("s:web") == {"headers": {"x-dev": "alice", "x-env": "dev.*"}, "path": {"prefix": "/api"}}
    assert (ic.env.file, ic.env.format, ic.mount.path) == (os.path.abspath("web.env"), "sh", False)
    assert ic.run.argv() == ["python3", "app.py", "--debug"] and ic.run.cwd == os.getcwd()


def test_header_auto_and_mount_dir():
    ic = flags("web", "--http-header", "auto", "--mount", "vol")
    assert ic.match.headers == "auto" and ic.mount.path == os.path.abspath("vol")


def test_docker_run_leaves_the_command_to_the_verb():
    assert flags("web", "--docker-run", "--", "-p", "8080:8080", "img").run is None


# --- stage 2: bad flags name the flag -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["web", "--port", "abc"], "--port: 'abc' is not a port: expected LOCAL[:REMOTE], e.g. 8080, 8080:80 or 8080:http"),
    (["web", "--http-header", "x-dev"], "--http-header 'x-dev': expected NAME=REGEX, or 'auto' or 'all' alone"),
    (["web", "--http-header", "auto", "--http-header", "a=b"], "--http-header 'auto': expected NAME=REGEX, or 'auto' or 'all' alone"),
    (["web", "--http-header", "x=("], "--http-header: '(' is not a valid regular expression: "
                                      "missing ), unterminated subpattern at position 0"),
    (["web", "--http-path-prefix", "api"], "--http-path-prefix: path_prefix 'api' must start with '/'"),
    (["Web!"], "WORKLOAD: 'Web!' is not a valid workload name: lowercase letters, digits, '-' and '.'"),
])
def test_bad_flags(argv, message):
    with pytest.raises(UsageError) as info:
        flags(*argv)
    assert info.value.message == message and info.value.exit_code == 2
