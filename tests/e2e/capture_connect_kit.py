"""The connect process of the capture e2e tests: the real outbound core (relay session, resolver)
with the host or ns capture in front, wired as ``tpenv connect`` wires them.

    python -m tests.e2e.capture_connect_kit host --kubeconfig K -n NS [--mapped NS2]   # "ready" once capturing; runs until killed
    python -m tests.e2e.capture_connect_kit ns --kubeconfig K -n NS -- CMD ...         # exits with CMD's status

Run inside the laptop namespace (tests/e2e/laptop_kit.py), as root for host, as any user for ns.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from tpenv.engine.outbound.core import ConnectOptions, OutboundCore
from tpenv.errors import TpenvError
from tpenv.kits.capture import MARK
from tpenv.kits.capture_host import HostCapture
from tpenv.kits.capture_ns import NsCommand
from tpenv.kits.dns_upstream import nameservers
from tpenv.kits.kube import Kube


async def run(a: argparse.Namespace) -> int:
    kube = await Kube.load(a.kubeconfig)
    options = ConnectOptions(namespace=a.namespace, mapped_namespaces=a.mapped,
                             mark=MARK if a.mode == "host" else None, check_routes=a.mode == "host")
    try:
        async with OutboundCore(kube, options) as core:
            if a.mode == "host":
                async with HostCapture(core.cidrs, core.on_connection, dns=core.resolver_address,
                                       nameservers=nameservers(), mark=MARK):
                    print("ready " + " ".join(map(str, core.cidrs)), flush=True)
                    await asyncio.Event().wait()
            return await NsCommand(a.command, core.cidrs, core.on_connection, dns=core.resolver_address,
                                   search=core.search_list).run()
    finally:
        await kube.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["host", "ns"])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("-n", "--namespace", required=True)
    p.add_argument("--mapped", action="append", default=[])
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:split])
    a.command = argv[split + 1:]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(run(a))
    except TpenvError as e:  # as the CLI shows it
        print(f"tpenv: {e}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
