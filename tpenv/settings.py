"""Tunables the engines share: one pydantic model, overridable from the environment.

Every field is ``TPENV_<SECTION>_<FIELD>`` in the environment (``TPENV_AGENT_IMAGE``,
``TPENV_TUNNELS_CONNECT_TIMEOUT``...). The descriptions here are the documentation: they
feed ``tpenv --help`` and docs/config.md, so write them for a user.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tpenv.errors import UsageError

ENV_PREFIX = "TPENV_"


# Kubernetes quantities as the API server writes them back (so a read-back never looks like a
# change that would roll the workload out again): an integer with an optional suffix.
_QUANTITY = r"^[1-9][0-9]*(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
_QUANTITY_OR_NONE = r"^([1-9][0-9]*(m|k|M|G|T|Ki|Mi|Gi|Ti)?)?$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AgentSettings(_Section):
    """The in-pod traffic agent that tpenv injects."""

    image: str = Field("tpenv/agent:dev", description="Container image of the injected agent.")
    image_pull_policy: str = Field(
        "IfNotPresent", description="imagePullPolicy of the agent container (Never on the local test cluster)."
    )
    ssh_port: int = Field(7922, ge=1, le=65535, description=(
        "Agent SSH port, on the pod's loopback only: the injected agent listens there and tpenv dials it "
        "through pods/portforward (the manager's webhook takes it from its own --agent-ssh-port)."))
    health_port: int = Field(7921, ge=1, le=65535, description=(
        "Agent health port (/readyz, /livez for the kubelet's probes); pick another when the app already "
        "uses it (the manager's webhook takes it from its own --agent-health-port)."))
    redirect_via: Literal["ephemeral-container", "init-container"] = Field("ephemeral-container", description=(
        "How a new patch-mode injection installs the in-pod redirect (NET_ADMIN, exits at once): "
        "ephemeral-container: tpenv adds it to each running pod, so the pod starts as fast as without "
        "tpenv (needs the right to patch pods/ephemeralcontainers; without it tpenv uses the init "
        "container); init-container: an init container, which holds the app back one kubelet cycle "
        "(about 1 s) but needs no one to add it to a restarted pod. An agent already injected keeps its way."))
    # No first listener port: the injector picks the agent's listener ports from 7900 up, skipping
    # every port the pod declares, so a setting would only move a search that never collides.
    lease_seconds: float = Field(
        5.0, gt=0, description="Seconds without a ping after which the agent ends a session's intercepts."
    )
    cpu_request: str = Field("10m", pattern=_QUANTITY, description=(
        "CPU the agent container requests (a Kubernetes quantity, e.g. 10m); namespaces with a "
        "ResourceQuota refuse containers without requests."))
    memory_request: str = Field("64Mi", pattern=_QUANTITY, description="Memory the agent container requests (e.g. 64Mi).")
    cpu_limit: str = Field("", pattern=_QUANTITY_OR_NONE, description=(
        "CPU limit of the agent container; empty: none (a CPU limit throttles the app's traffic through it)."))
    memory_limit: str = Field("256Mi", pattern=_QUANTITY_OR_NONE, description=(
        "Memory limit of the agent container (e.g. 256Mi); empty: none."))

    @model_validator(mode="after")
    def _distinct_ports(self) -> "AgentSettings":
        if self.ssh_port == self.health_port:
            raise ValueError(f"TPENV_AGENT_SSH_PORT and TPENV_AGENT_HEALTH_PORT are both {self.ssh_port}: the agent "
                             f"needs two different ports")
        return self

    def resources(self) -> dict:
        """The agent container's ``resources`` as these settings say."""
        limits = {k: v for k, v in (("cpu", self.cpu_limit), ("memory", self.memory_limit)) if v}
        out: dict = {"requests": {"cpu": self.cpu_request, "memory": self.memory_request}}
        if limits:
            out["limits"] = limits
        return out


class TunnelSettings(_Section):
    """Port-forward and SSH connections from the laptop to agents."""

    connect_timeout: float = Field(10.0, gt=0, description="Seconds to wait for a tunnel to an agent to open.")
    retry_initial: float = Field(0.5, gt=0, description="First delay in seconds before reopening a dropped tunnel.")
    retry_max: float = Field(10.0, gt=0, description="Longest delay in seconds between tunnel retries (backoff cap).")
    leave_drain: float = Field(15.0, ge=0, description=(
        "On leave, seconds to let connections and requests already sent to this machine finish before the "
        "tunnel closes (new ones go to the app at once)."))
    streams: int = Field(4, ge=0, le=32, description=(
        "Port-forward streams parked at each intercepted pod's agent: an intercepted connection takes one and its "
        "bytes cross without SSH or other connections in the way; a taken one is replaced at once. While none is "
        "parked, connections ride the tunnel's SSH connection. 0 turns them off."))


class PortForwardSettings(_Section):
    """How tpenv reaches pod ports through the API server (pods/portforward)."""

    protocol: Literal["auto", "websocket", "spdy"] = Field(
        "auto",
        description="Port-forward protocol: auto tries WebSocket and falls back to SPDY/3.1 when the API server "
                    "refuses the WebSocket upgrade, except for the parked streams that carry intercepted "
                    "connections, which try SPDY first (a session each) and fall back to WebSocket; "
                    "websocket or spdy forces one for all.",
    )


class HandlerSettings(_Section):
    """Local processes (``run:``) that serve intercepts."""

    stop_grace: float = Field(3.0, ge=0, description=(
        "Seconds after the first stop signal (SIGINT at the session's end, run.restart_signal before a restart) "
        "before a handler gets SIGTERM."))
    term_grace: float = Field(2.0, ge=0, description="Seconds after SIGTERM before a handler gets SIGKILL.")
    restart_initial: float = Field(0.5, gt=0, description="First delay in seconds before restarting a crashed handler.")
    restart_max: float = Field(30.0, gt=0, description="Longest delay in seconds between crash restarts (backoff cap).")
    debounce: float = Field(0.2, ge=0, description="Seconds of quiet after a file change before a handler restarts.")


class KubeSettings(_Section):
    """Calls to the Kubernetes API server."""

    rollout_timeout: float = Field(120.0, gt=0, description="Seconds to wait for a patched workload's pods to be ready.")
    endpoints_timeout: float = Field(
        30.0, gt=0,
        description="Seconds to wait, after an injecting rollout, until the EndpointSlices of every Service on the "
                    "intercepted port list only the agent's pods as ready, and again until probes from the agents "
                    "prove that new connections to the Service's ClusterIP reach the agents (the intercept says "
                    "ready after that); past either, tpenv says so and goes on.")


class SessionSettings(_Section):
    """Local bookkeeping of running sessions."""

    state_dir: Path = Field(
        Path("~/.cache/tpenv/sessions"),
        validate_default=True,
        description="Directory holding the state of running sessions (used by status and down).",
    )

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class MountSettings(_Section):
    """Mounted volumes: the sshfs liveness probe, unmounting, and sync mode (``mount.mode: sync``)."""

    probe_interval: float = Field(2.0, gt=0, description=(
        "Seconds between two liveness probes of an sshfs mount (a statfs in a child process, which a stuck "
        "mount cannot hold: it is killed after probe_timeout)."))
    probe_timeout: float = Field(5.0, gt=0, description=(
        "Seconds a probe may take before the mount counts as stuck: the mount unit fails with the reason, and "
        "the mount is abandoned (sshfs killed, lazily unmounted) so that nothing waits on it."))
    unmount_timeout: float = Field(5.0, gt=0, description=(
        "Seconds each unmount step (fusermount3 -u, then -uz: lazy) may take at stop before it is given up."))
    cache_seconds: int = Field(1, ge=0, description=(
        "Whole seconds an sshfs mount caches what the pod said: the names and attributes a directory listing "
        "brought (sshfs's directory cache, so a stat of every listed file costs no round trip to the pod), then "
        "the kernel's attribute and name caches (1 s is the kernel's own default for FUSE). A file created, "
        "changed or removed in the pod shows up locally within twice this plus 1 s (both layers back to back, "
        "sshfs counting whole seconds): 3 s at the default. 0: no cache, every stat and lookup asks the pod."))
    read_size: int = Field(64 * 1024, ge=4096, le=64 * 1024, description=(
        "Bytes sshfs asks the pod for in one SFTP read or write request (sshfs's default is 32 KiB, its most "
        "64 KiB). Larger requests mean fewer round trips through the tunnel and less per-request work in the "
        "agent and the pumps for sequential I/O."))
    read_ahead_kb: int = Field(4096, ge=0, description=(
        "KiB the kernel reads ahead of a sequential reader of an sshfs mount (its backing device's read_ahead_kb; "
        "the kernel's default is 128). A sequential read has about this much in flight through the tunnel, so "
        "the default 128 KiB caps it near 128 KiB per round trip. Set only when tpenv may (root: sysfs is "
        "root's); otherwise the kernel's default stays and the mount works the same, only slower to stream "
        "large files. 0: leave it."))
    own_stream: bool = Field(True, description=(
        "Carry a mount's SFTP on a port-forward stream of its own to the agent when the agent offers one "
        "(authenticated by the session's token, like the parked streams): no SSH framing or encryption on top "
        "of the API server's TLS, and no queueing behind the SSH connection's other channels. false: over the "
        "SSH connection's sftp subsystem, as an agent without the feature is always used."))

    sync_interval: float = Field(2.0, gt=0, description=(
        "Seconds between two polls of the pod's volumes in sync mode (changes made in the pod show up locally "
        "within about this long)."))
    sync_debounce: float = Field(0.3, ge=0, description=(
        "Seconds of quiet after a local change before sync mode pushes it to the pod."))
    sync_max_files: int = Field(20000, ge=1, description=(
        "Most files and directories sync mode copies; above it the mount is refused (use sshfs, or a smaller volume)."))
    sync_max_bytes: int = Field(512 * 1024 * 1024, ge=1, description=(
        "Most bytes sync mode copies at the start; above it the mount is refused (use sshfs, or a smaller volume)."))


# Never selectable for webhook injection (agent/tpenv_agent/webhook.py refuses them too).
RESERVED_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease", "tpenv"})


class ManagerSettings(_Section):
    """The optional in-cluster manager (`tpenv manager install|upgrade`): its outbound relay."""

    relay_port: int = Field(8022, ge=1, le=65535, description=(
        "The relay's SSH port on the manager pod's loopback (reached through pods/portforward)."))
    relay_cidrs: list[str] = Field(default_factory=list, description=(
        "Address ranges the relay may connect to, comma-separated (e.g. 10.244.0.0/16,10.96.0.0/12); "
        "empty: the relay reads the cluster's pod and service ranges itself (nodes' podCIDRs, ServiceCIDRs). "
        "Give them when your CNI assigns pod addresses outside the nodes' podCIDRs."))

    cert_lifetime_seconds: int = Field(5 * 365 * 86400, ge=120, description=(
        "Lifetime of the webhook's serving certificate an install makes; the manager renews it itself two "
        "thirds into it, keeping this lifetime (short values are for watching a rotation)."))

    webhook_namespaces: list[str] = Field(default_factory=list, description=(
        "Namespaces whose new pods the webhook may inject (`--webhook-namespace`, repeatable; comma-separated "
        "here). Only these are sent to the webhook, and only in these may the manager create the tpenv-auth "
        "Secret (a Role per namespace). Empty: the webhook injects nowhere. Never kube-system, kube-public, "
        "kube-node-lease or the manager's own namespace tpenv. `upgrade` keeps the installed list unless given."))

    @field_validator("relay_cidrs", "webhook_namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value

    @field_validator("relay_cidrs")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        out = []
        for cidr in value:
            try:
                out.append(str(ipaddress.ip_network(cidr, strict=False)))
            except ValueError as e:
                raise ValueError(f"{cidr!r} is not an address range like 10.96.0.0/12 ({e})") from e
        return out

    @field_validator("webhook_namespaces")
    @classmethod
    def _selectable(cls, value: list[str]) -> list[str]:
        from tpenv.config.models import is_dns_label

        for ns in value:
            if not is_dns_label(ns):
                raise ValueError(f"{ns!r} is not a namespace name (lowercase letters, digits and '-', at most 63)")
            if ns in RESERVED_NAMESPACES:
                raise ValueError(f"{ns!r} is never injected: the control plane's namespaces and the manager's own "
                                 f"({', '.join(sorted(RESERVED_NAMESPACES))}) are always left out")
        return sorted(set(value))


class DoctorSettings(_Section):
    """`tpenv doctor`: how long each check may take."""

    check_timeout: float = Field(30.0, gt=0, description=(
        "Seconds each check of `tpenv doctor` may take (the checks of a group run side by side); one that takes "
        "longer fails with \"no answer within N s\", so a slow API server is reported instead of waited for."))


class Settings(BaseModel):
    """Every tunable of tpenv; defaults suit a laptop against a nearby cluster."""

    model_config = ConfigDict(extra="forbid")

    agent: AgentSettings = Field(default_factory=AgentSettings, description=AgentSettings.__doc__)
    tunnels: TunnelSettings = Field(default_factory=TunnelSettings, description=TunnelSettings.__doc__)
    portforward: PortForwardSettings = Field(default_factory=PortForwardSettings,
                                             description=PortForwardSettings.__doc__)
    handlers: HandlerSettings = Field(default_factory=HandlerSettings, description=HandlerSettings.__doc__)
    kube: KubeSettings = Field(default_factory=KubeSettings, description=KubeSettings.__doc__)
    session: SessionSettings = Field(default_factory=SessionSettings, description=SessionSettings.__doc__)
    mounts: MountSettings = Field(default_factory=MountSettings, description=MountSettings.__doc__)
    manager: ManagerSettings = Field(default_factory=ManagerSettings, description=ManagerSettings.__doc__)
    doctor: DoctorSettings = Field(default_factory=DoctorSettings, description=DoctorSettings.__doc__)


def env_text(value: object) -> str:
    """A default as one would write it in the environment (a list comma-separated; "" when empty)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def env_overrides() -> Iterator[tuple[str, str, str, str, str]]:
    """(env var, section, field, default as env text, description) for every setting, in declaration
    order. The default is the field's real one (a default_factory's too), never pydantic's marker."""
    for section, sfield in Settings.model_fields.items():
        model = sfield.annotation
        for name, field in model.model_fields.items():  # type: ignore[union-attr]
            var = f"{ENV_PREFIX}{section}_{name}".upper()
            yield var, section, name, env_text(field.get_default(call_default_factory=True)), field.description or ""


def load_settings(env: Mapping[str, str] = os.environ) -> Settings:
    """Settings from the defaults and ``TPENV_<SECTION>_<FIELD>`` variables; UsageError when one is wrong."""
    known = {var: (section, name) for var, section, name, _, _ in env_overrides()}
    sections = {f"{ENV_PREFIX}{s}_".upper() for s in Settings.model_fields}
    data: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    for var, value in env.items():
        if var in known:
            section, name = known[var]
            data.setdefault(section, {})[name] = value
        elif any(var.startswith(prefix) for prefix in sections):
            # A typo in a setting name would otherwise be ignored without a word.
            close = difflib.get_close_matches(var, known, n=1)
            problems.append(f"unknown setting {var}" + (f" (did you mean {close[0]}?)" if close else ""))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            if len(err["loc"]) < 2:  # a section's own check across fields: its message names them
                problems.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            section, name = str(err["loc"][0]), str(err["loc"][-1])
            var = f"{ENV_PREFIX}{section}_{name}".upper()
            problems.append(f"{var}={err.get('input')!r}: {err['msg'].lower()}")
    if problems:
        raise UsageError("; ".join(problems), hint="fix or unset these environment variables (see `tpenv --help`)")
    return settings


__all__ = ["Settings", "AgentSettings", "TunnelSettings", "PortForwardSettings", "HandlerSettings", "KubeSettings",
           "SessionSettings", "MountSettings", "load_settings", "env_overrides"]
