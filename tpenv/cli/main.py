"""The ``tpenv`` command: builds the parser from the verb modules, runs one, maps errors to exit codes.

This is the only place that turns exceptions into messages: verbs raise TpenvError
subclasses and let them through. Exit codes: 0 ok, ``exc.exit_code`` for our errors
(1 runtime, 2 bad config or usage, 3 not built yet), 130 on Ctrl-C, 70 for a bug.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

from tpenv.cli.context import OUTPUTS, CliContext, dump
from tpenv.cli.verbs import VERBS
from tpenv.errors import ConfigError, TpenvError
from tpenv.logs import setup_logging
from tpenv.settings import env_overrides, load_settings

EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_INTERRUPTED = 130


class _BrokenVerb:
    """Stands in for a verb module that fails to import: that verb exits 70, the others still work."""

    def __init__(self, name: str, exc: Exception) -> None:
        self.name, self.exc = name, exc
        self.HELP = f"(unavailable: {type(exc).__name__}: {exc})"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    async def run(self, args: argparse.Namespace, ctx: CliContext) -> int:
        raise self.exc


def verb_module(name: str) -> ModuleType | _BrokenVerb:
    try:
        return importlib.import_module(f"tpenv.cli.verbs.{name}")
    except Exception as e:  # a bug in one verb's module (or its imports) must not take down `tpenv validate`
        return _BrokenVerb(name, e)


def _common_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # The flags exist on the top parser (tpenv -f x up) and on every verb (tpenv up -f x). On the verb
    # they default to SUPPRESS, so a verb that does not repeat a flag keeps the value given before it.
    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("common options")
    group.add_argument("-f", "--file", type=Path, default=d(Path("telepresence.yaml")), metavar="FILE",
                       help="the config file (default: ./telepresence.yaml)")
    group.add_argument("-n", "--namespace", default=d(None), metavar="NS",
                       help="namespace (default: the file's, else the kube context's)")
    group.add_argument("--context", dest="kube_context", default=d(None), metavar="NAME",
                       help="kube context, or an entry of the file's contexts: (default: TPENV_CONTEXT, "
                            "else the file's, else the current one)")
    group.add_argument("-o", "--output", choices=OUTPUTS, default=d("text"),
                       help="output for people (text) or scripts (json, yaml)")
    group.add_argument("--debug", action="store_true", default=d(False),
                       help="debug logs, the noisy libraries' too, and tracebacks")
    group.add_argument("--agent-image", default=d(None), metavar="REF",
                       help="the traffic agent's image (default: TPENV_AGENT_IMAGE, else the file's agent.image, "
                            "else the built-in one)")


def _settings_epilog() -> str:
    lines = ["settings (environment variables):"]
    for var, _section, _name, default, description in env_overrides():
        lines.append(f"  {var} (default {default or 'empty'})")
        lines.append(f"      {description}")
    lines.append("  TPENV_CONTEXT")
    lines.append("      --context for every command of this shell: a kube context, or an entry of the file's contexts:")
    lines.append("")
    lines.append("exit codes: 0 ok, 1 runtime error, 2 bad config or usage, 3 not built yet, 70 internal error")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpenv", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Develop against a remote Kubernetes cluster from your machine, declared in telepresence.yaml.",
        epilog=_settings_epilog())
    _common_flags(parser, defaults=True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    sub.required = True
    for name in VERBS:
        module = verb_module(name)
        verb = sub.add_parser(name, help=module.HELP, description=module.HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(verb)
        _common_flags(verb, defaults=False)
    return parser


def _report(exc: BaseException, output: str, debug: bool) -> None:
    """Print an error on stderr: one line per problem, the hint below, a traceback only with --debug."""
    err = sys.stderr
    if debug:
        traceback.print_exception(exc, file=err)
    if isinstance(exc, TpenvError):
        if output != "text":
            data = {"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}}
            if isinstance(exc, ConfigError):
                data["error"]["problems"] = [vars(p) for p in exc.problems]
            err.write(dump(data, output))
            return
        lines = exc.message.splitlines() or [type(exc).__name__]
        prefix = "" if isinstance(exc, ConfigError) else "tpenv: error: "
        for line in lines:
            err.write(f"{prefix}{line}\n")
        if exc.hint:
            err.write(f"hint: {exc.hint}\n")
    else:
        err.write(f"tpenv: internal error: {type(exc).__name__}: {exc}\n")
        if not debug:
            err.write("hint: run again with --debug for the traceback, and report it\n")


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; what follows the first ``--`` is the verb's ``command`` (intercept ... -- CMD ARGS)."""
    parser = build_parser()
    head, tail = argv, None
    if "--" in argv:
        i = argv.index("--")
        head, tail = argv[:i], argv[i + 1:]
    args = parser.parse_args(head)
    if tail is not None:
        if not hasattr(args, "command"):
            parser.error(f"tpenv {args.verb} takes no command after --")
        args.command = [*args.command, *tail]
    return args


def run_verb(module: ModuleType, args: argparse.Namespace) -> int:
    """Run one verb module to its exit code; the only place exceptions become messages."""
    try:
        setup_logging(args.debug, json=args.output == "json")
        # TPENV_CONTEXT is --context for a shell (e.g. one terminal per cluster); the flag wins.
        context_by = "--context" if args.kube_context else "TPENV_CONTEXT"
        ctx = CliContext(settings=load_settings(), output=args.output, debug=args.debug, config_file=args.file,
                         namespace=args.namespace, kube_context=args.kube_context or os.environ.get("TPENV_CONTEXT")
                         or None, context_by=context_by,
                         agent_image=getattr(args, "agent_image", None))
        ctx.apply_agent_flag()
        return int(asyncio.run(module.run(args, ctx)) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("tpenv: interrupted\n")
        return EXIT_INTERRUPTED
    except TpenvError as e:
        _report(e, args.output, args.debug)
        return e.exit_code
    except Exception as e:  # a bug: say so plainly, never pretend it was the user's fault
        _report(e, args.output, args.debug)
        return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    return run_verb(verb_module(args.verb), args)


def kubectl_complete() -> int:
    """``kubectl_complete-tpenv ARGS... CURRENT``: kubectl asks a plugin for the candidates of its
    last argument (cobra's protocol: one per line, then ``:4``, "no file completion" directive)."""
    from tpenv.cli.completion import candidates

    words = ["tpenv", *sys.argv[1:]]
    for c in candidates(build_parser(), words, len(words) - 1):
        print(c)
    print(":4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
