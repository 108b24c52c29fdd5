"""The `forwards:` and `connect:` sections of telepresence.yaml: how this machine reaches cluster services."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from tpenv.config.fields import (_PORT_NAME, ContextName, Namespace, PortNumber, ServiceName, _by_kind, _fail,
                                 is_dns_label)


def _port_name(value: str) -> str:
    if len(value) > 15 or not _PORT_NAME.fullmatch(value):
        raise _fail(f"{value!r} is not a port name: lowercase letters, digits and '-', at most 15 characters")
    return value


def _numeric_port(value: Any) -> Any:
    return int(value) if isinstance(value, str) and value.isdecimal() else value


ServicePort = Annotated[Annotated[Union[
    Annotated[PortNumber, Tag("int")],
    Annotated[str, AfterValidator(_port_name), Tag("str")],
], Discriminator(_by_kind(int=int, str=str), custom_error_type="tpenv",
                 custom_error_message="expected a port number or name")], BeforeValidator(_numeric_port)]


class Forward(BaseModel):
    """A cluster service port reachable on a local port."""

    model_config = ConfigDict(extra="forbid")

    service: ServiceName = Field(description="Name of the Service.")
    context: ContextName | None = Field(None, description=(
        "Name of the `contexts:` entry whose cluster holds the Service; default: the default context."))
    namespace: Namespace | None = Field(None, description=(
        "Namespace of the Service; default: its context's namespace, else the file's."))
    port: ServicePort = Field(description="Service port, by number or name.")
    local: PortNumber | None = Field(None, description="Local port; default: the same number as `port`.")

    @model_validator(mode="after")
    def _local_default(self) -> "Forward":
        if self.local is None:
            if isinstance(self.port, str):
                raise _fail(f"'local' is required when port is a name ({self.port!r})")
            self.local = self.port
        return self


def _cidr(value: str) -> str:
    import ipaddress

    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _fail(f"{value!r} is not a CIDR", "e.g. 10.96.0.0/12, fd00::/108 or a single address 192.168.5.7") from None
    return value.strip()


def _suffix(value: str) -> str:
    bare = value.strip().strip(".").lower()
    if not bare or not all(is_dns_label(label) for label in bare.split(".")):
        raise _fail(f"{value!r} is not a DNS suffix", "e.g. .com or .corp.example")
    return "." + bare


Cidr = Annotated[str, AfterValidator(_cidr)]
CONNECT_MODES = ("auto", "host", "ns", "env", "off")
LEGACY_MODES = {"root": "host", "rootless": "ns"}  # today's files keep working; docs say the new names
DEFAULT_EXCLUDED_SUFFIXES = [".com", ".io", ".net", ".org", ".arpa", ".ru"]


class Connect(BaseModel):
    """Outbound access (`tpenv connect`): this machine's processes reach cluster services by name and address."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "host", "ns", "env", "off", "root", "rootless"] = Field("auto", description=(
        "host: the cluster's ranges redirected to tpenv and its resolver for the whole machine (needs root); "
        "ns: each command tpenv starts runs in its own network namespace, no root needed; "
        "env: a local SOCKS5/HTTP proxy and port maps given to the command in its env, no namespaces; "
        "auto: host with root, else ns where user namespaces are allowed, else env; off: no outbound access. "
        "The older values root (= host) and rootless (= ns, falling back to env) still work."))
    context: ContextName | None = Field(None, description=(
        "Name of the `contexts:` entry whose cluster this machine reaches (its relay, its Services by name), "
        "with that entry's credentials; default: the default context."))
    mapped_namespaces: list[Namespace] | None = Field(None, description=(
        "Namespaces whose short service names (`svc`) resolve here, after the intercepted workloads' and the "
        "file's namespace; default: the file's namespace only (Telepresence's --mapped-namespaces)."))
    namespaces: list[Namespace] | None = Field(None, description="Older name of `mapped_namespaces`.")
    also_proxy: list[Cidr] = Field(default_factory=list, description=(
        "More address ranges sent to the cluster besides its discovered pod and service ranges (--also-proxy)."))
    never_proxy: list[Cidr] = Field(default_factory=list, description=(
        "Address ranges never sent to the cluster, even inside its ranges (--never-proxy)."))
    allow_conflicting_subnets: bool = Field(False, description=(
        "Send the cluster's ranges to the cluster even where they overlap a local route, e.g. a VPN; default: "
        "an overlap is an error naming it (--allow-conflicting-subnets)."))
    excluded_suffixes: list[Annotated[str, AfterValidator(_suffix)]] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDED_SUFFIXES), description=(
            "Names ending in these never go to the cluster's DNS (Telepresence's defaults)."))

    @model_validator(mode="after")
    def _one_list(self) -> "Connect":
        if self.namespaces is not None and self.mapped_namespaces is not None:
            raise _fail("give mapped_namespaces or namespaces, not both", "namespaces is the older name: drop it")
        return self

    @property
    def capture(self) -> str:
        """The mode with the older names mapped: auto, host, ns, env or off."""
        return LEGACY_MODES.get(self.mode, self.mode)

    @property
    def mapped(self) -> list[str]:
        return list(self.mapped_namespaces if self.mapped_namespaces is not None else self.namespaces or [])
