"""Shell completion: candidates for the word under the cursor, read from the argparse parser.

The shell scripts (bash, zsh, fish; `tpenv completion SHELL`) hand the command line's words and
the cursor's index to ``tpenv completion --complete INDEX -- WORDS...``, which prints one
candidate per line. Verbs, flags and choices come from the parser itself, so a new flag
completes without touching this file. Values from elsewhere: workload names (WORKLOAD
positionals, ``--agent``) from the cluster, namespaces (``-n``) from the cluster, contexts
(``--context``) from the kubeconfig, intercept names (``leave``, ``env``) from this machine's
running sessions. A cluster that does not answer within CLUSTER_TIMEOUT completes nothing
rather than hanging the shell.
"""
from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

CLUSTER_TIMEOUT = 5.0  # a busy API server still answers a list in this; TAB must not hang longer
_WORKLOAD_ARGS = {"workload", "agent"}  # dests whose values are workload names
_INTERCEPT_ARGS = {("leave", "name"), ("env", "name")}

BASH = r'''# tpenv completion for bash: source <(tpenv completion bash)
_tpenv() {
    local IFS=$'\n'
    COMPREPLY=($(tpenv completion --complete "$COMP_CWORD" -- "${COMP_WORDS[@]}" 2>/dev/null))
}
complete -o default -o nosort -F _tpenv tpenv kubectl-tpenv
'''

ZSH = r'''#compdef tpenv kubectl-tpenv
# tpenv completion for zsh: source <(tpenv completion zsh)
_tpenv() {
    local -a candidates
    candidates=("${(@f)$(tpenv completion --complete $((CURRENT - 1)) -- "${words[@]}" 2>/dev/null)}")
    compadd -a candidates
}
compdef _tpenv tpenv kubectl-tpenv
'''

FISH = r'''# tpenv completion for fish: tpenv completion fish | source
function __tpenv_complete
    set -l words (commandline -opc) (commandline -ct)
    tpenv completion --complete (math (count $words) - 1) -- $words 2>/dev/null
end
complete -c tpenv -f -a '(__tpenv_complete)'
complete -c kubectl-tpenv -f -a '(__tpenv_complete)'
'''

SCRIPTS = {"bash": BASH, "zsh": ZSH, "fish": FISH}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}  # noqa: SLF001 - argparse has no public walk


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:  # noqa: SLF001
        if isinstance(a, argparse._SubParsersAction):  # noqa: SLF001
            return dict(a.choices)
    return {}


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings  # noqa: SLF001
            and not isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001


def _namespace_of(words: Sequence[str]) -> str | None:
    for flag in ("-n", "--namespace"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return None


def _context_of(words: Sequence[str]) -> str | None:
    return words[words.index("--context") + 1] if "--context" in words[:-1] else None


async def _cluster_names(kind: str, words: Sequence[str]) -> list[str]:
    from tpenv.kits.kube import Kube, What

    async with await Kube.load(context=_context_of(words)) as kube:
        if kind == "namespaces":
            data = await kube.call(kube.core.list_namespace, what=What("list", "namespaces"))
            return [n["metadata"]["name"] for n in data["items"]]
        return [w.name for w in await kube.list_workloads(_namespace_of(words) or kube.namespace)]


def _from_cluster(kind: str, words: Sequence[str]) -> list[str]:
    async def bounded() -> list[str]:
        async with asyncio.timeout(CLUSTER_TIMEOUT):
            return await _cluster_names(kind, words)
    try:
        return asyncio.run(bounded())
    except Exception:  # noqa: BLE001 - completion never prints an error into the user's prompt
        return []


def _contexts() -> list[str]:
    try:
        from tpenv.kits import kubepkg
        kubepkg.prepare()
        from kubernetes import config as k8s_config

        contexts, _ = k8s_config.list_kube_config_contexts()
        return [c["name"] for c in contexts]
    except Exception:  # noqa: BLE001
        return []


def _intercept_names() -> list[str]:
    try:
        from tpenv.engine.session import running_intercepts
        from tpenv.settings import load_settings

        return [ic.get("name") for _, ic in asyncio.run(running_intercepts(load_settings())) if ic.get("name")]
    except Exception:  # noqa: BLE001
        return []


def _values(verb: str | None, action: argparse.Action, words: Sequence[str]) -> list[str]:
    if action.choices:
        return [str(c) for c in action.choices]
    if action.dest in _WORKLOAD_ARGS:
        return _from_cluster("workloads", words)
    if action.dest == "namespace":
        return _from_cluster("namespaces", words)
    if action.dest == "kube_context":
        return _contexts()
    if (verb, action.dest) in _INTERCEPT_ARGS:
        return _intercept_names()
    return []  # free text or a file: the shell's own file completion takes over


def candidates(parser: argparse.ArgumentParser, words: Sequence[str], index: int) -> list[str]:
    """What may stand at ``words[index]`` (words[0] is the program), filtered by what is typed."""
    words = list(words[:index + 1]) + [""] * max(0, index + 1 - len(words))
    current, before = words[index], words[1:index]
    verbs = _subparsers(parser)
    verb, active, used_positionals, i = None, parser, 0, 0
    while i < len(before):
        word = before[i]
        opts = _options(active)
        if word == "--":
            return []  # the command to run: the shell's business
        if word in opts:
            i += 2 if _takes_value(opts[word]) else 1
            continue
        if verb is None and word in verbs:
            verb, active = word, verbs[word]
        elif not word.startswith("-"):
            used_positionals += 1
        i += 1
    prev = before[-1] if before else None
    opts = _options(active)
    if prev in opts and _takes_value(opts[prev]) and not (len(before) >= 2 and before[-2] in opts
                                                          and _takes_value(opts[before[-2]])):
        found = _values(verb, opts[prev], words)
    elif current.startswith("-"):
        found = sorted(s for s in opts if s.startswith("--") or len(s) == 2)
    elif verb is None:
        found = list(verbs)
    else:
        positionals = [a for a in _positionals(active) if a.nargs not in ("*", argparse.REMAINDER)]
        found = _values(verb, positionals[used_positionals], words) if used_positionals < len(positionals) else []
    return [c for c in found if c.startswith(current)]
