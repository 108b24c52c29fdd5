"""The ``ns`` capture of ``tpenv connect -- CMD`` (no root): CMD runs in its own user, network and
mount namespaces, where all its TCP and DNS is captured and served by this process, outside.

    code = await NsCommand(["curl", "http://hello.shop/"], ["10.96.0.0/16"], on_connection,
                           dns=("127.0.0.1", 5353)).run()

Inside (:mod:`tpenv.kits.capture_ns_inside`): loopback, a default route through it, one nftables
REDIRECT of every non-loopback TCP connection to a listener, DNS sockets on 127.0.0.1:53, and a
bind-mounted resolv.conf (``nameserver 127.0.0.1``) and nsswitch.conf (``hosts: files dns``).
The listening sockets are created inside (so they belong to CMD's network stack) and passed out
over a unix socket: this process accepts on them directly, reads each connection's original
destination (SO_ORIGINAL_DST), and hands cluster destinations to the core's callback; every other
destination is dialled from here, the host's namespace, as CMD would have. DNS queries go to the
core's resolver. Works for any binary, static ones included: nothing is preloaded.

Inbound (``inbound=[port]``: an intercept's local port, the handler running inside): tpenv
listens on the host's 127.0.0.1:port, where the intercept's tunnels deliver, and for each
connection asks a dialer left inside the namespace (over the same control socket) for a socket
connected to the namespace's own 127.0.0.1:port, passed back with SCM_RIGHTS; the two are spliced.

Nothing on the host changes: no root, no rule, no link, no file outside a private temp dir.
IPv4 TCP and DNS are carried; other UDP and IPv6 have no route out of the namespace.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tpenv.errors import MissingTool, PermanentError
from tpenv.kits.aio import unit_logger
from tpenv.kits.capture import CaptureListener, OnConnection, networks, router
from tpenv.kits.procs import dies_with_us
from tpenv.kits.splice import splice

UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--mount", "--propagation", "private"]
DNS_TIMEOUT = 10.0
DIAL_TIMEOUT = 10.0  # s: the dialer inside answers at once, unless the namespace is gone


def userns_problem(proc_sys: str | Path = "/proc/sys") -> str | None:
    """Why unprivileged user namespaces cannot be made here, with how to allow them; None if no
    known setting forbids them."""
    root = Path(proc_sys)

    def read(rel: str) -> str | None:
        try:
            return (root / rel).read_text().strip()
        except OSError:
            return None

    if read("kernel/unprivileged_userns_clone") == "0":
        return ("unprivileged user namespaces are disabled (sysctl kernel.unprivileged_userns_clone = 0); "
                "enable them: `sudo sysctl -w kernel.unprivileged_userns_clone=1` (to keep it, put "
                "`kernel.unprivileged_userns_clone = 1` in /etc/sysctl.d/99-userns.conf)")
    if read("user/max_user_namespaces") == "0":
        return ("user namespaces are disabled (sysctl user.max_user_namespaces = 0); enable them: "
                "`sudo sysctl -w user.max_user_namespaces=15000` (to keep it, put "
                "`user.max_user_namespaces = 15000` in /etc/sysctl.d/99-userns.conf)")
    if read("kernel/apparmor_restrict_unprivileged_userns") == "1":
        return ("AppArmor restricts unprivileged user namespaces (sysctl "
                "kernel.apparmor_restrict_unprivileged_userns = 1, the Ubuntu 23.10+ default); allow them: "
                "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or an AppArmor profile "
                f"granting `userns,` to {sys.executable}")
    return None


def resolv_conf(host_resolv_conf: str | Path = "/etc/resolv.conf", search: Iterable[str] = ()) -> str:
    """The namespace's resolv.conf: our resolver first and only; ``search`` (the cluster's, as in
    a pod: ``svc.cluster.local`` names of the connected namespaces) before the host's search
    domains; the host's options."""
    domains, kept = list(search), []
    with contextlib.suppress(OSError):
        for line in Path(host_resolv_conf).read_text().splitlines():
            words = line.split()
            if words[:1] in (["search"], ["domain"]):
                domains += [d for d in words[1:] if d not in domains]
            elif words[:1] == ["options"]:
                kept.append(line.strip())
    lines = ["# tpenv connect: names through tpenv's resolver", "nameserver 127.0.0.1"]
    if domains:
        lines.append("search " + " ".join(domains))
    return "\n".join([*lines, *kept]) + "\n"


def nsswitch_conf(host_nsswitch: str | Path = "/etc/nsswitch.conf") -> str:
    """The host's nsswitch.conf with ``hosts: files dns``: modules such as ``resolve`` (D-Bus to
    systemd-resolved) or ``mdns`` would answer from outside the namespace, past our resolver."""
    lines = []
    with contextlib.suppress(OSError):
        lines = [ln for ln in Path(host_nsswitch).read_text().splitlines() if not ln.strip().startswith("hosts:")]
    return "\n".join([*lines, "hosts: files dns"]) + "\n"


async def probe() -> None:
    """Fail early, and say why, when this machine does not let us make the namespaces."""
    if shutil.which("unshare") is None:
        raise MissingTool("`unshare` is not installed", hint="install util-linux")
    proc = await asyncio.create_subprocess_exec(*UNSHARE, "--", "true", stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        why = userns_problem()
        raise PermanentError(f"cannot create a user namespace for `tpenv connect -- CMD`: "
                             f"{err.decode(errors='replace').strip()}",
                             hint=why or "check that unprivileged user namespaces are allowed on this machine, "
                                         "or run `sudo tpenv connect` (host mode)")


class _DnsUdp(asyncio.DatagramProtocol):
    """Queries from the namespace's 127.0.0.1:53, each forwarded to the resolver, answered back."""

    def __init__(self, target: tuple[str, int], log: Any) -> None:
        self.target, self.log = target, log
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._forward(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _forward(self, data: bytes, addr: Any) -> None:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()

        class One(asyncio.DatagramProtocol):
            def datagram_received(self, reply: bytes, _a: Any) -> None:
                if not answer.done():
                    answer.set_result(reply)

        transport, _ = await loop.create_datagram_endpoint(One, remote_addr=self.target)
        try:
            transport.sendto(data)
            reply = await asyncio.wait_for(answer, DNS_TIMEOUT)
        except asyncio.TimeoutError:
            self.log.warning("the resolver did not answer a query within %gs", DNS_TIMEOUT)
            return
        finally:
            transport.close()
        if self.transport is not None:
            self.transport.sendto(reply, addr)


class NsCommand:
    """One command in its own namespaces; ``run()`` returns its exit status."""

    def __init__(self, command: list[str], cidrs: Iterable[Any], on_connection: OnConnection, *,
                 dns: tuple[str, int], search: Iterable[str] = (), env: dict[str, str] | None = None,
                 cwd: str | None = None, inbound: Iterable[int] = ()) -> None:
        if not command:
            raise PermanentError("no command to run: write it after `--`, e.g. `tpenv connect -- curl ...`")
        self.command, self.dns, self.search, self.env, self.cwd = list(command), dns, list(search), env, cwd
        self.route = router(networks(cidrs), on_connection)
        self.log = unit_logger("capture", "ns")
        self.inbound = sorted(set(inbound))
        self.proc: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._dial_lock = asyncio.Lock()

    def send_signal(self, sig: int) -> None:
        """To CMD (once it runs): how the caller stops it (Ctrl-C, `tpenv leave`)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def run(self) -> int:
        await probe()
        files = tempfile.mkdtemp(prefix="tpenv-ns-")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        served: list[Any] = []
        try:
            Path(files, "resolv.conf").write_text(resolv_conf(search=self.search))
            Path(files, "nsswitch.conf").write_text(nsswitch_conf())
            # CMD (the end of this exec chain) dies with us: a kill -9 of the caller (tpenv connect,
            # or the ns handler wrapper that tpenv up stops with SIGKILL past its grace) would
            # otherwise leave it running, orphaned in namespaces no one serves. The parent-death
            # signal survives the execs and the user namespaces (same kernel uid, see
            # docs/connect.md).
            prefix, preexec = dies_with_us()
            self.proc = await asyncio.create_subprocess_exec(
                *prefix, *UNSHARE, "--", sys.executable, "-m", "tpenv.kits.capture_ns_inside", "--control",
                str(theirs.fileno()), "--files", files, "--uid", str(os.getuid()), "--gid", str(os.getgid()),
                *(["--dialer"] if self.inbound else []), "--", *self.command, pass_fds=(theirs.fileno(),), env=self.env, cwd=self.cwd,
                preexec_fn=preexec)
            theirs.close()  # the child's copy is its own: EOF here means it is gone
            header, fds = await self._receive(ours)
            capture = socket.socket(fileno=fds[0])
            dns_udp, dns_tcp = socket.socket(fileno=fds[1]), socket.socket(fileno=fds[2])
            listener = CaptureListener(capture, self.route, self.log)
            await listener.start()
            served.append(listener)
            dns_udp.setblocking(False)
            udp_transport, udp = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _DnsUdp(self.dns, self.log), sock=dns_udp)
            served.append(udp_transport)
            dns_tcp.setblocking(False)
            served.append(await asyncio.start_server(self._dns_tcp, sock=dns_tcp))
            self._control = ours
            for port in self.inbound:
                try:
                    served.append(await asyncio.start_server(lambda r, w, port=port: self._inbound(r, w, port),
                                                             "127.0.0.1", port))
                except OSError as e:
                    raise PermanentError(f"cannot listen on 127.0.0.1:{port} for the command in its namespace: "
                                         f"{e.strerror or e}", hint="stop what listens there, or pick another "
                                                                    "local port") from e
            self.log.info("running %s in its own namespaces (capture port %s inside)", self.command[0],
                          header.get("capture_port"))
            await asyncio.get_running_loop().sock_sendall(ours, b"go")
            return await self.proc.wait()
        finally:
            ours.close()
            with contextlib.suppress(OSError):
                theirs.close()
            for s in served:
                s.close()
            for s in served:
                if isinstance(s, CaptureListener):
                    await s.wait_closed()
            if self.proc is not None and self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            shutil.rmtree(files, ignore_errors=True)

    async def _receive(self, ours: socket.socket) -> tuple[dict[str, Any], list[int]]:
        loop = asyncio.get_running_loop()
        ours.setblocking(True)
        msg, fds, _, _ = await loop.run_in_executor(None, socket.recv_fds, ours, 65536, 3)
        ours.setblocking(False)
        try:
            header = json.loads(msg or b"{}")
        except ValueError:
            header = {"error": f"unreadable message {msg[:80]!r}"}
        if "error" in header or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            assert self.proc is not None
            code = await self.proc.wait()
            why = header.get("error") or f"the namespace helper exited with status {code} before it was ready"
            hint = userns_problem()
            if "libnftables" in why:
                hint = "install nftables (Debian/Ubuntu: `apt-get install nftables`)"
            raise PermanentError(f"cannot prepare the namespaces of `tpenv connect -- CMD`: {why}", hint=hint)
        return header, fds

    async def _inbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        """A connection for CMD's port: the dialer inside connects, we splice."""
        try:
            sock = await self._dial_inside(port)
        except OSError as e:
            self.log.info("inbound to port %d inside: %s", port, e)
            sock = None
        if sock is None:
            writer.close()  # nothing listens inside yet: as a refused connection would be
            return
        up_r, up_w = await asyncio.open_connection(sock=sock)
        await splice(reader, writer, up_r, up_w)

    async def _dial_inside(self, port: int) -> socket.socket | None:
        """One request at a time on the control socket: ``D`` + port, answered ``k`` with the
        connected socket's fd, or ``e`` (refused inside)."""
        control = self._control
        if control is None:
            return None
        loop = asyncio.get_running_loop()
        async with self._dial_lock:
            await loop.sock_sendall(control, b"D" + port.to_bytes(2, "big"))
            readable = loop.create_future()
            loop.add_reader(control.fileno(), lambda: readable.done() or readable.set_result(None))
            try:
                await asyncio.wait_for(readable, DIAL_TIMEOUT)
            finally:
                loop.remove_reader(control.fileno())
            msg, fds, _, _ = socket.recv_fds(control, 16, 1)
        if msg[:1] != b"k" or not fds:
            for fd in fds:
                os.close(fd)
            return None
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(False)
        return sock

    async def _dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.dns)
        except OSError as e:
            self.log.warning("cannot reach the resolver at %s:%d: %s", *self.dns, e)
            writer.close()
            return
        await splice(reader, writer, up_r, up_w)


__all__ = ["NsCommand", "probe", "userns_problem", "resolv_conf", "nsswitch_conf"]
