"""``tpenv-agent manager``: the HTTPS mutating webhook that injects the agent at pod creation, and
the outbound relay for developer machines (docs/protocol.md §7, :mod:`tpenv_agent.relay`).

    tpenv-agent manager --tls-dir DIR [--listen HOST:PORT] [--port-file PATH]
                        [--agent-image REF] [--agent-pull-policy P] [--lease S]
                        [--relay HOST:PORT|off] [--relay-auth-dir DIR] [--relay-cidr CIDR ...]
                        [--relay-port-file PATH]

The serving certificate is renewed by the manager itself two thirds into its lifetime
(certrotate.py), in the cluster only.

Webhook routes: ``POST /mutate`` (AdmissionReview v1, answered by webhook.mutate) and ``GET
/healthz``. ``--tls-dir`` holds ``tls.crt`` and ``tls.key`` (the install's Secret, mounted); the
API server checks them against the caBundle of the webhook configuration. With ``--listen
HOST:0`` the kernel picks the port: the bound address is printed as ``listening on
https://HOST:PORT`` on stdout and, with ``--port-file``, written there (tests use both).

When a pod gets an agent, the manager makes sure its namespace has the ``tpenv-auth`` Secret
(docs/protocol.md §2) before answering, asked at every injection and backed off on failure
(authsecrets.py): a Secret it cannot make means no agent for that pod, said in a warning, an
annotation and Events, never a pod stuck waiting for its volume. That is the webhook's only
side effect, skipped for dry-run requests (``sideEffects: NoneOnDryRun``). It needs the
in-cluster service account (incluster.py: the API calls and the Secret); outside a cluster it is
skipped.

The relay (SSH, default ``127.0.0.1:8022``: the pod's loopback, reached through
``pods/portforward``) runs in the same process as its own task; a relay that fails is logged
and retried and never takes the webhook down. Its SSH keys: ``--relay-auth-dir`` (``ca.pub``
and ``host_key``, tests), else Secret ``tpenv-auth`` of the manager's own namespace, created
at start when missing and read through the API (one Secret, ``get`` by name: see
20-rbac.yaml.j2). Allowed destinations: ``--relay-cidr`` (repeatable, taken literally), else the
ranges discovered from the API. Outside a cluster without ``--relay-auth-dir`` the relay is off.
Once listening it prints ``relay listening on ssh://HOST:PORT`` (and ``--relay-port-file``).

HTTP/1.1 only, by design: the API server's webhook client speaks it when ALPN offers nothing
else, and a small reader keeps this stdlib-only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from .authsecrets import AuthSecrets
from .bind import listen_socket
from .incluster import (SA_DIR, api_call, api_get_or_none, create_auth_secret, in_cluster, own_addresses,
                        relay_auth_material)
from .inject import default_settings
from .inpod import opted_in
from .reporting import Policies, Refusals
from .webhook import mutate, refusal

log = logging.getLogger("tpenv_agent.manager")

MAX_BODY = 8 * 1024 * 1024  # AdmissionReviews of big pods stay well under this
HEADER_LIMIT = 100
# The API server keeps idle connections for reuse; a bound on idleness (and on a slow sender)
# keeps a stuck or hostile client from holding a connection forever.
IDLE_TIMEOUT = 120.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = default_settings()
    p = argparse.ArgumentParser(prog="tpenv-agent manager", description=__doc__.split("\n\n")[0])
    p.add_argument("--tls-dir", required=True, type=Path, help="directory with tls.crt and tls.key")
    p.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT to serve HTTPS on (PORT 0: any)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--agent-image", default=os.environ.get("TPENV_AGENT_IMAGE") or defaults["agent_image"])
    p.add_argument("--agent-pull-policy", default=defaults["image_pull_policy"])
    p.add_argument("--lease", type=int, default=defaults["lease"])
    p.add_argument("--agent-ssh-port", type=int, default=defaults["ssh_port"],
                   help="the injected agent's SSH port, on the pod's loopback (the client's TPENV_AGENT_SSH_PORT)")
    p.add_argument("--agent-health-port", type=int, default=defaults["health_port"],
                   help="the injected agent's /readyz and /livez port (the client's TPENV_AGENT_HEALTH_PORT)")
    p.add_argument("--agent-resources", type=json.loads, default=defaults["resources"],
                   help="the injected agent container's resources, as JSON ({\"requests\": {...}, \"limits\": {...}})")
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                   help="seconds a connection may sit between requests before it is closed")
    p.add_argument("--relay", default="127.0.0.1:8022",
                   help="HOST:PORT of the outbound relay's SSH server (PORT 0: any), or 'off'")
    p.add_argument("--relay-auth-dir", type=Path,
                   help="ca.pub and host_key for the relay (default: Secret tpenv-auth of the manager's namespace)")
    p.add_argument("--relay-cidr", action="append", default=[], metavar="CIDR",
                   help="a range the relay may dial (repeatable); default: the cluster's pod and service "
                        "ranges, discovered from the API")
    p.add_argument("--relay-port-file", type=Path, help="write the relay's bound port here once listening")
    p.add_argument("--webhook-config", default="tpenv-agent-injector",
                   help="the MutatingWebhookConfiguration whose caBundle a certificate rotation updates")
    p.add_argument("--tls-secret", default="tpenv-manager-tls",
                   help="the Secret holding --tls-dir's material, rewritten by a rotation ('off': no rotation)")
    p.add_argument("--tls-work-dir", type=Path, default=Path("/tpenv/run"),
                   help="a writable directory (an emptyDir) for a rotated certificate's files")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv[1:] if argv[:1] == ["manager"] else argv)


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 over TLS, just enough for the API server's webhook calls


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    line = await reader.readline()
    if not line:
        return None
    method, target, _version = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    for _ in range(HEADER_LIMIT):
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise ValueError("too many headers")
    length = int(headers.get("content-length") or 0)
    if length > MAX_BODY:
        raise ValueError("body too large")
    body = await reader.readexactly(length) if length else b""
    return method, target.split("?", 1)[0], headers, body


def _response(status: int, reason: str, body: bytes, ctype: str, close: bool) -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n")
    return head.encode("latin-1") + body


class Manager:
    def __init__(self, settings: dict, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.settings = settings
        self.idle_timeout = idle_timeout
        api = api_call if in_cluster() else None
        self.auth = AuthSecrets(create_auth_secret) if api is not None else None
        self.policies, self.refusals = Policies(api), Refusals(api)

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes, str]:
        if path == "/healthz" and method == "GET":
            return 200, "OK", b"ok\n", "text/plain"
        if path == "/mutate" and method == "POST":
            try:
                review = json.loads(body)
            except ValueError:
                return 400, "Bad Request", b"AdmissionReview JSON expected\n", "text/plain"
            request = review.get("request") or {}
            # The namespace's Pod Security decides between the redirect and the hand-over.
            pod = request.get("object") if isinstance(request.get("object"), dict) else {}
            redirect, why = await self.policies.redirect(request["namespace"]) \
                if request.get("namespace") and opted_in(pod) else (True, "")
            answer, injected = mutate(review, {**self.settings, "redirect": redirect, "redirect_off": why})
            if injected and request.get("namespace") and self.auth is not None:
                # The pod will mount tpenv-auth: it must exist before the pod does (authsecrets.py).
                problem = await self.auth.ensure(request["namespace"])
                if problem is not None:
                    answer, injected = refusal(review, problem), False
            where = f"{request.get('namespace', '?')}/{(request.get('object') or {}).get('metadata', {}).get('generateName', '?')}"
            log.info("[webhook/mutate] pod %s: %s", where, "agent injected" if injected else
                     "; ".join(answer["response"].get("warnings") or ["unchanged"]))
            if answer["response"].get("warnings") and request.get("namespace") and not request.get("dryRun"):
                self.refusals.refused(request["namespace"])
            return 200, "OK", json.dumps(answer).encode(), "application/json"
        return 404, "Not Found", b"not found\n", "text/plain"

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await asyncio.wait_for(_read_request(reader), self.idle_timeout)
                if request is None:
                    break
                method, path, headers, body = request
                status, reason, payload, ctype = await self.route(method, path, body)
                close = headers.get("connection", "").lower() == "close"
                writer.write(_response(status, reason, payload, ctype, close))
                await writer.drain()
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, ValueError, TimeoutError) as e:
            log.debug("[webhook/conn] dropped: %s", type(e).__name__)
        finally:
            writer.close()


# ---------------------------------------------------------------------------------------------
# the relay's task


RELAY_RETRY_MAX = 30.0


async def _start_relay(args: argparse.Namespace) -> "Any":
    """The Relay, listening; None when the relay is off. Raises on a setup failure (retried)."""
    from . import relay as r
    from . import relay_policy as rp
    from .relay_resolve import cluster_domain, nameservers as relay_nameservers
    from .sshd import auth_from_material, read_auth

    if args.relay == "off":
        log.info("[relay/server] off (--relay off)")
        return None
    if args.relay_auth_dir:
        host_key, authorized = read_auth(str(args.relay_auth_dir))
    elif in_cluster():
        namespace = (SA_DIR / "namespace").read_text().strip()
        material = await asyncio.to_thread(relay_auth_material, namespace)
        host_key, authorized = auth_from_material(material["ca.pub"], material["host_key"])
    else:
        log.warning("[relay/server] off: not in a cluster and no --relay-auth-dir")
        return None
    if args.relay_cidr:
        policy: Any = rp.StaticPolicy(rp.Policy(rp.parse_cidrs(args.relay_cidr), explicit=True))
    elif in_cluster():
        policy = rp.ApiPolicy(api_get_or_none, own=own_addresses())
    else:
        policy = rp.StaticPolicy(rp.Policy(()))
        log.warning("[relay/server] no --relay-cidr and no API to discover ranges from: every destination is refused")
    log.info("[relay/ranges] %s", (await policy.current()).describe())
    host, _, port = args.relay.rpartition(":")
    relay = r.Relay(host_key, authorized, policy, domain=cluster_domain(), nameservers=relay_nameservers())
    bound = await relay.start(host.strip("[]"), int(port))
    if args.relay_port_file:
        args.relay_port_file.write_text(f"{bound}\n")
    print(f"relay listening on ssh://{host}:{bound}", flush=True)
    log.info("[relay/server] listening on %s:%d", host, bound)
    return relay


async def run_relay(args: argparse.Namespace, stop: asyncio.Event) -> str:
    """Start the relay (retrying setup failures with backoff) and serve until ``stop``; returns how
    it ended, for the guard's log line."""
    from asyncssh import KeyImportError

    delay = 1.0
    while True:  # the first attempt is made even when stop is already set: its outcome gets logged
        try:
            relay = await _start_relay(args)
        except (OSError, ValueError, KeyImportError) as e:  # URLError and HTTPError are OSErrors
            if stop.is_set():
                return f"stopped before it started ({type(e).__name__}: {e})"
            log.warning("[relay/server] could not start (retrying in %.0fs): %s: %s", delay, type(e).__name__, e)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, RELAY_RETRY_MAX)
            continue
        if relay is None:
            return "off"
        async with relay:
            await stop.wait()
        return "stopped"


def _guard(task: asyncio.Task) -> None:
    """The relay task's end, logged: a relay that dies must say why (the webhook goes on)."""
    if task.cancelled():
        log.info("[relay/server] task cancelled")
    elif task.exception() is not None:
        e = task.exception()
        log.error("[relay/server] task failed: %s: %s", type(e).__name__, e, exc_info=e)
    else:
        log.info("[relay/server] task ended: %s", task.result())


# ---------------------------------------------------------------------------------------------


def tls_context(tls_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def injection_settings(args: argparse.Namespace) -> dict:
    """The webhook's inject_pod settings from the manager's command line (rendered from the client's settings)."""
    return {"agent_image": args.agent_image, "image_pull_policy": args.agent_pull_policy, "lease": args.lease,
            "resources": args.agent_resources, "ssh_port": args.agent_ssh_port, "health_port": args.agent_health_port}


async def run_manager(argv: list[str]) -> int:
    """Serve the webhook until SIGTERM/SIGINT. ``argv``: the arguments after ``manager``."""
    args = parse_args(argv)
    try:
        from . import log as agent_log

        agent_log.setup(args.log_level)
    except ImportError:  # the sidecar's log module is optional for this role
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    settings = injection_settings(args)
    try:
        ctx = tls_context(args.tls_dir)
    except (OSError, ssl.SSLError) as e:
        print(f"tpenv-agent manager: cannot load tls.crt/tls.key from {args.tls_dir}: {e}", file=sys.stderr)
        return 2
    host, _, port = args.listen.rpartition(":")
    manager = Manager(settings, args.idle_timeout)
    server = await asyncio.start_server(manager.serve_connection, sock=listen_socket(host, int(port)), ssl=ctx)
    bound = server.sockets[0].getsockname()[1]
    # Handlers before the readiness line: a SIGTERM right after "listening" must stop us
    # gracefully (relay task ended and logged), not kill us with the default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.port_file:
        args.port_file.write_text(f"{bound}\n")
    print(f"listening on https://{host}:{bound}", flush=True)
    log.info("[webhook/server] listening on %s:%d, injecting %s", host, bound, settings["agent_image"])
    relay_task = asyncio.ensure_future(run_relay(args, stop))
    relay_task.add_done_callback(_guard)
    rotate_task = None
    if in_cluster() and args.tls_secret != "off":
        from .certrotate import Rotator, read_material

        rotator = Rotator(ctx, read_material(args.tls_dir), (SA_DIR / "namespace").read_text().strip(), api_call,
                          args.tls_work_dir, args.webhook_config, args.tls_secret)
        rotate_task = asyncio.ensure_future(rotator.run(stop))
        rotate_task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or log.error(
            "[tls/rotate] task failed: %s", t.exception(), exc_info=t.exception()))
    async with server:
        await stop.wait()
    log.info("[webhook/server] stopped")
    try:
        await asyncio.wait_for(relay_task, 10)
    except Exception:  # noqa: BLE001 - the guard has logged it
        pass
    return 0


if __name__ == "__main__":  # python -m tpenv_agent.manager, for tests and debugging
    sys.exit(asyncio.run(run_manager(sys.argv[1:])))
