"""The `intercepts:` entries of telepresence.yaml: port, match, env, mount, run, and the intercept itself."""
from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

if TYPE_CHECKING:
    import jinja2

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PrivateAttr, Tag,
                      WithJsonSchema, model_validator)

from tpenv.config.fields import (_DNS_LABEL, _DNS_SUBDOMAIN, _HEADER_NAME, _PORT_NAME, ContextName, EnvName, Namespace,
                                 PortNumber, ServiceName, _by_kind, _fail, _port_number, did_you_mean)

PERSONAL_HEADER = "x-telepresence-intercept-id"  # same name as Telepresence, so existing tooling keeps working
TEMPLATE_VARIABLES = ("value", "name", "namespace", "env", "mount_root", "intercept_id")
WORKLOAD_KINDS = {"deployment": "deployment", "deploy": "deployment", "statefulset": "statefulset",
                  "sts": "statefulset", "replicaset": "replicaset", "rs": "replicaset"}
ENV_FORMATS = ("docker", "sh", "json", "compose")



class PortMap(BaseModel):
    """A local port and the workload's port it takes traffic from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local: PortNumber = Field(description="Port on this machine where the handler listens.")
    remote: Union[PortNumber, str, None] = Field(
        None, description="Service port name or number to intercept; empty: the workload's only port.")

    def __str__(self) -> str:
        return f"{self.local}:{self.remote}" if self.remote is not None else str(self.local)


_PORT_HELP = "expected LOCAL[:REMOTE], e.g. 8080, 8080:80 or 8080:http"


def parse_port(value: Any) -> Any:
    """``8080`` | ``"8080"`` | ``"8080:http"`` | ``"8080:80"`` → PortMap fields; also used by the CLI's --port."""
    if isinstance(value, (PortMap, dict)):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _fail(f"{value!r} is not a port: {_PORT_HELP}")
    local, sep, remote = str(value).strip().partition(":")
    if not local.isdecimal() or (sep and not remote):
        raise _fail(f"{str(value)!r} is not a port: {_PORT_HELP}")
    result: dict[str, Any] = {"local": _port_number(int(local))}
    if sep:
        if remote.isdecimal():
            result["remote"] = _port_number(int(remote))
        elif len(remote) > 15 or not _PORT_NAME.fullmatch(remote):
            raise _fail(f"{remote!r} is not a port name: lowercase letters, digits and '-', at most 15 characters")
        else:
            result["remote"] = remote
    return result


PortSpec = Annotated[PortMap, BeforeValidator(parse_port), WithJsonSchema({
    "description": "LOCAL[:REMOTE]: the local port, and the service port (name or number) it takes over.",
    "anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535},
              {"type": "string", "pattern": r"^[0-9]{1,5}(:([0-9]{1,5}|[a-z0-9]([-a-z0-9]*[a-z0-9])?))?$"}],
})]


# --- match --------------------------------------------------------------------------------------------------------

def _header_name(value: str) -> str:
    if not _HEADER_NAME.fullmatch(value):
        raise _fail(f"{value!r} is not a valid HTTP header name")
    return value


@functools.lru_cache(maxsize=512)
def compile_regex(source: str) -> re.Pattern[str]:
    return re.compile(source)


def _regex(value: str) -> str:
    try:
        compile_regex(value)
    except (re.error, RecursionError, OverflowError) as e:
        raise _fail(f"{value!r} is not a valid regular expression: {e}") from e
    return value


Regex = Annotated[str, AfterValidator(_regex)]
HeaderRules = Annotated[Union[
    Annotated[dict[Annotated[str, AfterValidator(_header_name)], Regex], Tag("mapping")],
    Annotated[Literal["auto"], Tag("auto")],
], Discriminator(_by_kind(mapping=dict, auto=str), custom_error_type="tpenv",
                 custom_error_message="expected a mapping of header name to regex, or 'auto'")]


class Match(BaseModel):
    """Which HTTP requests go to this machine; every rule given must match. Absent: all TCP traffic."""

    model_config = ConfigDict(extra="forbid")

    headers: HeaderRules | None = Field(None, description=(
        "Header name → regex the whole value must match (names are case-insensitive). "
        f"'auto': the personal header {PERSONAL_HEADER}: <intercept id>."))
    path_prefix: str | None = Field(None, description="Requests whose path starts with this prefix.")
    path_equal: str | None = Field(None, description="Requests whose path is exactly this.")
    path_regex: Regex | None = Field(None, description="Requests whose whole path matches this regex.")

    @model_validator(mode="after")
    def _one_path_rule(self) -> "Match":
        given = [k for k in ("path_prefix", "path_equal", "path_regex") if getattr(self, k) is not None]
        if len(given) > 1:
            raise _fail(f"{' and '.join(given)} are both given: use at most one path rule")
        for key in ("path_prefix", "path_equal"):
            value = getattr(self, key)
            if value is not None and not value.startswith("/"):
                raise _fail(f"{key} {value!r} must start with '/'", f"did you mean '/{value}'?")
        return self

    def header_rules(self, intercept_id: str) -> dict[str, str]:
        """The header regexes with 'auto' resolved to the personal header of ``intercept_id``."""
        if self.headers == "auto":
            return {PERSONAL_HEADER: re.escape(intercept_id)}
        return dict(self.headers or {})

    def wire(self, intercept_id: str) -> dict[str, Any]:
        """This rule as the control channel's ``match`` object (docs/protocol.md §3)."""
        path = None
        for kind in ("equal", "prefix", "regex"):
            value = getattr(self, f"path_{kind}")
            if value is not None:
                path = {kind: value}
        return {"headers": self.header_rules(intercept_id), "path": path}


# `match: {...}` selects requests; `match: all` takes every connection, even where the cluster's manager
# makes personal intercepts the default (team mode).
MatchField = Annotated[Union[
    Annotated[Match, Tag("mapping")],
    Annotated[Literal["all"], Tag("all")],
], Discriminator(_by_kind(mapping=(dict, Match), all=str), custom_error_type="tpenv",
                 custom_error_message="expected a mapping of HTTP rules (headers, path_*), or 'all'")]


# --- env ----------------------------------------------------------------------------------------------------------

@functools.cache
def _jinja() -> "jinja2.sandbox.SandboxedEnvironment":
    # Imported here, on the first templated env value: jinja2 is a sixth of the config's import
    # time, and most files have no template (every command's start, `tpenv up`'s way to its write).
    import jinja2.sandbox
    return jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                               keep_trailing_newline=True)


@functools.lru_cache(maxsize=512)
def compile_template(source: str) -> jinja2.Template:
    return _jinja().from_string(source)


def _template(source: str) -> str:
    import jinja2.meta
    try:
        ast = _jinja().parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise _fail(f"template {source!r} does not compile: {e.message}") from e
    unknown = sorted(jinja2.meta.find_undeclared_variables(ast) - set(TEMPLATE_VARIABLES))
    if unknown:
        raise _fail(f"template {source!r} uses unknown variable '{unknown[0]}'; known: {', '.join(TEMPLATE_VARIABLES)}",
                    did_you_mean(unknown[0], TEMPLATE_VARIABLES))
    compile_template(source)
    return source


def _env_value(value: Any) -> Any:
    # YAML reads `PORT: 8080` and `DEBUG: true` as numbers and booleans; env values are strings.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


Template = Annotated[str, AfterValidator(_template)]
EnvValue = Annotated[str, BeforeValidator(_env_value)]


class EnvSpec(BaseModel):
    """The handler's environment: the app container's, then `set`, then `rewrite`; written to `file`.
    The handler keeps this machine's PATH, HOME, USER, TMPDIR... unless `set`/`rewrite` names them."""

    model_config = ConfigDict(extra="forbid")

    file: str | None = Field(None, description="Also write the environment to this file (relative to the config file).")
    format: Literal["docker", "sh", "json", "compose"] = Field(
        "docker", description="Syntax of `file`: docker (--env-file), sh (`. file`), json, compose (.env).")
    set: dict[EnvName, EnvValue] = Field(default_factory=dict, description="Variables to set or override.")
    rewrite: dict[EnvName, Template] = Field(default_factory=dict, description=(
        "Variable → Jinja2 template giving its new value. Variables: " + ", ".join(TEMPLATE_VARIABLES)
        + " (value: the variable's current value, '' when unset; env: the whole environment so far)."))
    # rewrite key → (file, line, col), filled by the loader so render-time errors are located too
    _where: dict[str, tuple[str, int, int]] = PrivateAttr(default_factory=dict)


# --- mount --------------------------------------------------------------------------------------------------------

MountPath = Annotated[Union[
    Annotated[bool, Tag("bool")],
    Annotated[str, Tag("str")],
], Discriminator(_by_kind(bool=bool, str=str), custom_error_type="tpenv",
                 custom_error_message="expected a directory, true (a temporary directory) or false (no mount)")]




MOUNT_MODES = ("auto", "sshfs", "sync")


class MountSpec(BaseModel):
    """The app container's volumes, mounted on this machine (`mount: false` for none)."""

    model_config = ConfigDict(extra="forbid")

    path: MountPath = Field(True, description=(
        "Local directory for the volumes (relative to the config file); true: a temporary directory; false: no mount."))
    mode: Literal["auto", "sshfs", "sync"] = Field("auto", description=(
        "sshfs: a live FUSE mount (needs sshfs and /dev/fuse); sync: a local copy kept in step both ways "
        "(local changes pushed at once, the pod's polled every TPENV_MOUNTS_SYNC_INTERVAL seconds; a file changed "
        "on both sides keeps the local copy, with a warning), for machines without FUSE; auto: sshfs, and where "
        "it cannot run an error saying what to install or to choose sync (a mount not asked for is left out)."))
    rewrite_env: list[EnvName] = Field(default_factory=list, description=(
        "Variables holding paths inside the container; their values get the local mount root as prefix."))


def _mount_shorthand(value: Any) -> Any:
    return value if isinstance(value, MountSpec) else MountSpec(path=value)


# `mount: false`, `mount: ./dir` and `mount: {path: ..., rewrite_env: [...]}` all say the same kind of thing.
MountField = Annotated[Union[
    Annotated[MountSpec, Tag("mapping")],
    Annotated[bool, Tag("bool")],
    Annotated[str, Tag("str")],
], Discriminator(_by_kind(mapping=(dict, MountSpec), bool=bool, str=str), custom_error_type="tpenv",
                 custom_error_message="expected a mapping (path, mode, rewrite_env), a directory, true or false"),
    AfterValidator(_mount_shorthand)]


# --- run ----------------------------------------------------------------------------------------------------------

Command = Annotated[Union[
    Annotated[list[str], Tag("list")],
    Annotated[str, Tag("str")],
], Discriminator(_by_kind(list=list, str=str), custom_error_type="tpenv",
                 custom_error_message="expected a command: a list of strings, or one string for the shell")]


def _nonempty_command(value: list[str] | str) -> list[str] | str:
    if not value or (isinstance(value, str) and not value.strip()):
        raise _fail("the command is empty")
    return value


class RunSpec(BaseModel):
    """The local process serving the intercept, supervised by tpenv."""

    model_config = ConfigDict(extra="forbid")

    command: Annotated[Command, AfterValidator(_nonempty_command)] = Field(
        description="The program and its arguments; one string runs through `sh -c`.")
    cwd: str = Field(".", description="Working directory, relative to the config file.")
    watch: list[str] = Field(default_factory=list, description=(
        "Globs (relative to cwd, ** for any depth): a change to a matching file restarts the process. The watcher "
        "never enters the intercept's mount directory nor its env file (tpenv writes those), nor any other mount "
        "point under cwd unless a glob names a path inside it by its leading directories (data/**/*.json "
        "watches a mount at data); symlinked directories are not followed; .git, __pycache__, node_modules, "
        ".venv and editor swap files are never reported."))
    ignore: list[str] = Field(default_factory=list, description=(
        "Globs (relative to cwd) whose changes are ignored; a directory glob (vendor/ or vendor/**) is not "
        "walked into at all."))
    restart: Literal["on-failure", "always", "never"] = Field(
        "on-failure", description="When the process exits: restart on a non-zero exit, always, or never.")
    restart_signal: Literal["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2"] = Field(
        "SIGTERM", description=(
            "Signal sent to the process group to stop it before a restart caused by a saved file; after "
            "TPENV_HANDLERS_STOP_GRACE seconds it gets SIGTERM, then SIGKILL. SIGTERM ends most servers quietly; "
            "SIGINT makes Python print a KeyboardInterrupt traceback at every save. When the session ends "
            "(Ctrl-C, `tpenv down`) the process gets SIGINT first, as Ctrl-C in a terminal would."))

    def argv(self) -> list[str]:
        return ["sh", "-c", self.command] if isinstance(self.command, str) else list(self.command)


# --- intercepts, forwards, connect --------------------------------------------------------------------------------

def _workload(value: str) -> str:
    kind, sep, name = value.rpartition("/")
    if sep and kind.lower() not in WORKLOAD_KINDS:
        raise _fail(f"unknown workload kind {kind!r}: expected deployment/, statefulset/ or replicaset/",
                    did_you_mean(kind.lower(), ["deployment", "statefulset", "replicaset"]))
    if not name or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise _fail(f"{name!r} is not a valid workload name: lowercase letters, digits, '-' and '.'")
    return value


def _name(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise _fail(f"{value!r} is not a valid intercept name: lowercase letters, digits and '-', at most 63 characters")
    return value


class Intercept(BaseModel):
    """Traffic of one workload port, sent to a process on this machine."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, AfterValidator(_name)] | None = Field(
        None, description="Name of the intercept (`tpenv leave NAME`); default: the workload's name.")
    workload: Annotated[str, AfterValidator(_workload)] = Field(description=(
        "The workload: NAME, deployment/NAME, statefulset/NAME or replicaset/NAME."))
    context: ContextName | None = Field(None, description=(
        "Name of the `contexts:` entry whose cluster holds the workload; default: the default context."))
    namespace: Namespace | None = Field(None, description=(
        "Namespace of the workload; default: its context's namespace, else the file's."))
    port: PortSpec = Field(description="LOCAL[:REMOTE]: local port, and the service port (name or number) taken over.")
    service: ServiceName | None = Field(None, description="Service to intercept when several select the workload.")
    match: MatchField | None = Field(None, description=(
        "HTTP rules selecting the requests to intercept; 'all': every TCP connection, even in team mode; "
        f"absent: every TCP connection, or only requests with your personal header ({PERSONAL_HEADER}) when "
        "the cluster's manager runs in team mode."))
    mode: Literal["intercept", "mirror", "replace"] = Field("intercept", description=(
        "intercept: the matched traffic goes to this machine instead of the app; mirror: the app in the "
        "cluster keeps answering every request and this machine gets a copy of each matched HTTP/1.x request, "
        "its answers discarded (Telepresence's wiretap); a slow or stopped handler never slows the app, "
        "copies it cannot take are dropped and counted in `tpenv status`; replace (Telepresence's replace): the "
        "app container stops running in the cluster while the intercept lasts (a queue consumer or cron in it "
        "no longer competes), every one of its TCP ports comes to this machine (the intercepted one to the "
        "local port, the others to the same port number here), and it comes back as it was on leave, Ctrl-C, "
        "or, by its agent, when this machine is gone (kill -9); needs the in-pod redirect, no `match`, and "
        "no other session's intercept on the workload."))
    force: bool = Field(False, description=(
        "Take the intercept over from another user: end their intercept that holds this port for all TCP "
        "(or has this intercept's id). The agent allows it only to a user the cluster lets force "
        "intercepts.tpenv.io in the namespace (RBAC: apiGroups [tpenv.io], resources [intercepts], verbs "
        "[force]); never lets a header rule take another user's personal traffic. `tpenv intercept --force`."))
    env: EnvSpec = Field(default_factory=EnvSpec, description=EnvSpec.__doc__)
    mount: MountField = Field(default_factory=MountSpec, description=(
        MountSpec.__doc__ + " Not given: mounted where sshfs and FUSE are, else left out with a note saying how "
        "to get them; given, a mount that cannot be made is an error."))
    run: RunSpec | None = Field(None, description="The handler process; absent: run it yourself.")

    @model_validator(mode="after")
    def _replace_takes_all(self) -> "Intercept":
        # The app stops in replace mode: traffic a rule leaves unmatched would have no one to answer it.
        if self.mode == "replace" and self.match is not None and self.match != "all":
            raise _fail("mode replace takes every connection of every port of the app: it cannot have a 'match' "
                        "rule (the app no longer runs to answer what the rule leaves out)",
                        "drop 'match', or use mode: intercept for a header rule")
        return self

    @model_validator(mode="after")
    def _default_name(self) -> "Intercept":
        if self.name is None:
            self.name = self.workload_name
        return self

    @property
    def workload_kind(self) -> str | None:
        """deployment, statefulset, replicaset, or None (any kind, looked up in that order)."""
        kind, sep, _ = self.workload.rpartition("/")
        return WORKLOAD_KINDS[kind.lower()] if sep else None

    @property
    def workload_name(self) -> str:
        return self.workload.rpartition("/")[2]
