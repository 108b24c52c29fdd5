"""The first program inside the namespaces of ``tpenv connect -- CMD`` (ns mode): it prepares the
namespace, hands its sockets to tpenv outside, then becomes CMD.

Started by :mod:`tpenv.kits.capture_ns` as
``unshare --user --map-root-user --net --mount --propagation private -- python -m
tpenv.kits.capture_ns_inside --control FD --files DIR --uid U --gid G -- CMD...``. It is root of
the new user namespace, which owns the new network and mount namespaces, so everything below is
allowed without any privilege on the machine (and touches nothing outside the namespaces):

1. loopback up, and default routes through it (IPv4 source 127.0.0.1) so that a connect to any
   address gets as far as the nat hook instead of failing with "network unreachable";
2. one nftables table: every TCP connection not to loopback is REDIRECTed to a listener on
   127.0.0.1 (conntrack keeps the original destination);
3. DNS: a UDP socket and a TCP listener on 127.0.0.1:53;
4. DIR's ``resolv.conf`` (nameserver 127.0.0.1) and ``nsswitch.conf`` (``hosts: files dns``)
   bind-mounted over /etc's;
5. the three sockets go to tpenv over the control socket (SCM_RIGHTS): tpenv serves them from the
   host's namespace, where it reaches the relay and the rest of the world;
6. when tpenv answers ``go``, CMD is executed in a nested user namespace that maps the caller's
   own uid and gid back, so CMD runs as the user, without CAP_NET_ADMIN: it cannot undo 1-4.

With ``--dialer`` (an intercepted handler, which listens inside), a child stays behind before
the exec, in the namespace, on the control socket: for each ``D`` + port it connects to
127.0.0.1:port here and passes the socket out (``k`` with SCM_RIGHTS, ``e`` when refused), which
is how tpenv, outside, delivers the intercept's connections to CMD. It ends when tpenv closes
the control socket (CMD exited, or tpenv is gone).

Errors go to tpenv as ``{"error": ...}`` on the control socket, and the exit status is 125.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import subprocess
import sys

MS_BIND = 4096
TABLE = "tpenv"


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")


def _bind_mount(source: str, target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    real = os.path.realpath(target)  # /etc/resolv.conf is often a symlink (systemd-resolved)
    if not os.path.exists(real):
        raise RuntimeError(f"cannot replace {target}: {real} does not exist")
    if libc.mount(source.encode(), real.encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise RuntimeError(f"bind mount of {source} on {real} failed: {os.strerror(err)}")


def _network(capture_port: int) -> None:
    from tpenv.kits.nft import Nft

    _ip("link", "set", "lo", "up")
    _ip("route", "add", "default", "dev", "lo", "src", "127.0.0.1")
    with Nft() as nft:  # a plain table: the namespace, and the table with it, ends with CMD
        nft.apply([
            {"add": {"table": {"family": "ip", "name": TABLE}}},
            {"add": {"chain": {"family": "ip", "table": TABLE, "name": "output", "type": "nat", "hook": "output",
                               "prio": -100, "policy": "accept"}}},
            {"add": {"rule": {"family": "ip", "table": TABLE, "chain": "output", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                           "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}}, {"return": None}]}}},
            {"add": {"rule": {"family": "ip", "table": TABLE, "chain": "output", "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                {"redirect": {"port": capture_port}}]}}},
        ])


def _listen(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(512)
    return sock


def prepare(control: socket.socket, files: str) -> None:
    capture = _listen(socket.SOCK_STREAM, 0)
    dns_udp, dns_tcp = _listen(socket.SOCK_DGRAM, 53), _listen(socket.SOCK_STREAM, 53)
    _network(capture.getsockname()[1])
    _bind_mount(os.path.join(files, "resolv.conf"), "/etc/resolv.conf")
    _bind_mount(os.path.join(files, "nsswitch.conf"), "/etc/nsswitch.conf")
    header = json.dumps({"capture_port": capture.getsockname()[1]}).encode()
    socket.send_fds(control, [header], [capture.fileno(), dns_udp.fileno(), dns_tcp.fileno()])
    for s in (capture, dns_udp, dns_tcp):
        s.close()  # tpenv holds them now; CMD must not inherit them


def dialer(control: socket.socket) -> None:
    """The child left inside with ``--dialer`` (see the module's doc)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # CMD's stdin/stdout are not ours to hold open
        os.dup2(devnull, fd)
    while True:
        request = control.recv(3, socket.MSG_WAITALL)
        if len(request) < 3 or request[:1] != b"D":
            return  # tpenv closed its end: CMD is done
        port = int.from_bytes(request[1:], "big")
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            control.sendall(b"e")
            continue
        socket.send_fds(control, [b"k"], [conn.fileno()])
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tpenv-ns-inside")
    p.add_argument("--control", type=int, required=True)
    p.add_argument("--files", required=True)
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--dialer", action="store_true")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    control = socket.socket(fileno=a.control)
    try:
        prepare(control, a.files)
    except Exception as e:  # reported by tpenv outside, with what to do
        control.sendall(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        return 125
    if control.recv(16) != b"go":
        return 125  # tpenv went away before starting CMD
    if a.dialer and os.fork() == 0:
        try:
            dialer(control)
        finally:
            os._exit(0)
    control.close()
    # Back to the caller's own uid/gid, in a nested user namespace without our capabilities.
    argv_exec = ["unshare", "--user", f"--map-user={a.uid}", f"--map-group={a.gid}", "--", *command]
    try:
        os.execvp(argv_exec[0], argv_exec)
    except OSError as e:
        print(f"tpenv: cannot run {command[0]!r}: {e}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
