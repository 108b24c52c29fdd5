"""tpenv intercept: stub until issue 5 replaces this file."""
from __future__ import annotations

import argparse

from tpenv.errors import NotBuiltYet

HELP = "Send a workload port's traffic (all of it, or matching HTTP requests) to a local port."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", metavar="WORKLOAD",
                        help="NAME, deployment/NAME, statefulset/NAME or replicaset/NAME")
    parser.add_argument("--port", metavar="L[:R]", help="local port, and the service port (name or number) taken over")
    parser.add_argument("--service", metavar="NAME", help="the service, when several select the workload")
    parser.add_argument("--http-header", action="append", default=[], metavar="K=V",
                        help="only requests whose header K matches regex V (repeatable); 'auto': your personal header")
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--http-path-prefix", metavar="P", help="only requests whose path starts with P")
    path.add_argument("--http-path-equal", metavar="P", help="only requests whose path is P")
    path.add_argument("--http-path-regex", metavar="RE", help="only requests whose path matches RE")
    parser.add_argument("--env-file", metavar="F", help="write the app's environment to F")
    parser.add_argument("--env-syntax", choices=("docker", "sh", "json", "compose"), default="docker",
                        help="syntax of --env-file (default: docker)")
    parser.add_argument("--env-json", metavar="F", help="write the app's environment to F as JSON")
    parser.add_argument("--mount", metavar="DIR|true|false", default="true",
                        help="mount the app's volumes at DIR (true: a temporary directory; false: no mount)")
    parser.add_argument("--docker-run", action="store_true", help="CMD is `docker run` arguments; tpenv adds the env")
    parser.add_argument("command", nargs="*", metavar="-- CMD ARGS",
                        help="run CMD with the intercept's env; the intercept ends when it exits")


async def run(args: argparse.Namespace, ctx) -> int:
    raise NotBuiltYet("tpenv intercept is not built yet (issue 5)")
