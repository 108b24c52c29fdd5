"""One handler of ``tpenv up`` in ns mode: ``python -m tpenv.kits.ns_handler --socks H:P --dns
H:P --cidr C... --search D... --inbound PORT... -- CMD``, started by the handler unit in CMD's
place (tpenv.engine.outbound.nsmode). CMD runs in its own namespaces (tpenv.kits.capture_ns);
its connections to the cluster's ranges go through the SOCKS5 proxy of the ``tpenv up`` process
(by address: the relay dials it), its DNS to that process's resolver, everything else is dialled
from here as CMD would have. SIGINT/SIGTERM are passed on to CMD (the handler unit stops it so);
the exit status is CMD's.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
from typing import Any

from tpenv.errors import TpenvError
from tpenv.kits.capture_ns import NsCommand
from tpenv.kits.splice import splice


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


async def socks_connect(proxy: tuple[str, int], ip: str, port: int) -> tuple[Any, Any]:
    """A SOCKS5 CONNECT (RFC 1928, no authentication) to ``ip:port`` through ``proxy``."""
    reader, writer = await asyncio.open_connection(*proxy)
    try:
        writer.write(b"\x05\x01\x00")
        if await reader.readexactly(2) != b"\x05\x00":
            raise ConnectionRefusedError("the proxy refused the handshake")
        addr = ipaddress.ip_address(ip)
        writer.write(b"\x05\x01\x00" + (b"\x01" if addr.version == 4 else b"\x04") + addr.packed
                     + port.to_bytes(2, "big"))
        head = await reader.readexactly(4)
        if head[1] != 0:
            raise ConnectionRefusedError(f"the proxy answered code {head[1]} for {ip}:{port}")
        size = {1: 4, 4: 16}.get(head[3]) or (await reader.readexactly(1))[0]
        await reader.readexactly(size + 2)  # the bound address: not ours to use
        return reader, writer
    except BaseException:
        writer.close()
        raise


async def run(a: argparse.Namespace) -> int:
    proxy = _address(a.socks)

    async def on_connection(ip: str, port: int, reader: Any, writer: Any) -> None:
        try:
            up_r, up_w = await socks_connect(proxy, ip, port)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            return
        await splice(reader, writer, up_r, up_w)

    ns = NsCommand(a.command, a.cidr, on_connection, dns=_address(a.dns), search=a.search, inbound=a.inbound)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, ns.send_signal, sig)
    return await ns.run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tpenv-ns-handler")
    p.add_argument("--socks", required=True)
    p.add_argument("--dns", required=True)
    p.add_argument("--cidr", action="append", default=[])
    p.add_argument("--search", action="append", default=[])
    p.add_argument("--inbound", action="append", type=int, default=[])
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    a.command = a.command[1:] if a.command[:1] == ["--"] else a.command
    try:
        code = asyncio.run(run(a))
    except TpenvError as e:  # as the CLI shows it: the handler's output is tpenv up's
        print(f"tpenv: {e}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return 1
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
