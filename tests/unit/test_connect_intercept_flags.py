"""intercept --connect (issue 18): which connect: settings CMD runs under, the usage errors said
before anything starts; and the pieces of ns mode under `tpenv up` that need no cluster: the
handler's argv wrapped at each start, and the wrapper's SOCKS5 client against tpenv's own proxy."""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from tpenv.cli.verbs.intercept import add_arguments, connect_section
from tpenv.config import load_config
from tpenv.errors import UsageError
from tpenv.kits.ns_handler import socks_connect
from tpenv.kits.proxy_server import ProxyServer


def parse(*argv: str) -> argparse.Namespace:
    """The verb's flags; ``-- CMD`` after them (the CLI's main splits it off the same way)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(list(argv[:split]))
    args.command = list(argv[split + 1:])
    return args


def ctx_for(tmp_path: Path, text: str | None = None) -> SimpleNamespace:
    f = tmp_path / "telepresence.yaml"
    if text is not None:
        f.write_text(text)
    return SimpleNamespace(config_file=f, load_config=lambda: load_config(f))


def test_without_flag_or_section_cmd_is_not_connected(tmp_path):
    assert connect_section(parse("wp", "--", "true"), ctx_for(tmp_path)) is None


def test_the_flag_picks_the_mode_and_the_file_gives_the_rest(tmp_path):
    ctx = ctx_for(tmp_path, "connect:\n  mode: env\n  mapped_namespaces: [other]\n")
    # Stage 1: the file's section alone connects, in its mode.
    assert connect_section(parse("wp", "--", "true"), ctx).mode == "env"
    # Stage 2: the flag overrides the mode and keeps the section's other settings.
    section = connect_section(parse("wp", "--connect", "ns", "--", "true"), ctx)
    assert (section.mode, section.mapped) == ("ns", ["other"])
    # Stage 3: --connect off wins over the file.
    assert connect_section(parse("wp", "--connect", "off", "--", "true"), ctx) is None


def test_connect_needs_a_command_and_no_container(tmp_path):
    with pytest.raises(UsageError, match="--connect needs `-- CMD`"):
        connect_section(parse("wp", "--connect", "env"), ctx_for(tmp_path))
    with pytest.raises(UsageError, match="--docker-run cannot run connected"):
        connect_section(parse("wp", "--connect", "env", "--docker-run", "--", "img"), ctx_for(tmp_path))


async def test_the_handler_argv_is_wrapped_at_each_start():
    from tpenv.engine.handlers import HandlerSpec

    seen: list[list[str]] = []
    spec = HandlerSpec(name="h", argv=("true",), cwd=Path("/"), restart="never",
                       wrap=lambda argv: seen.append(argv) or ["sh", "-c", "exit 7"])
    unit = spec.create(lambda event: None)
    await unit._spawn()
    assert await unit.proc.wait() == 7 and seen == [["true"]]


async def test_the_ns_wrapper_dials_an_address_through_the_proxy():
    # Stage 1: a local server standing for a cluster address, and tpenv's proxy whose dial reaches it.
    async def serve(reader, writer):
        writer.write(b"hello " + await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dialed = []

    async def dial(host, p):
        dialed.append((host, p))
        return await asyncio.open_connection("127.0.0.1", port)

    # Stage 2: the wrapper's SOCKS5 CONNECT by address carries bytes both ways.
    async with ProxyServer(dial) as proxy:
        reader, writer = await socks_connect(("127.0.0.1", proxy.port), "10.96.3.4", 80)
        writer.write(b"db\n")
        assert await asyncio.wait_for(reader.read(), 10) == b"hello db\n"
        writer.close()
    server.close()
    assert dialed == [("10.96.3.4", 80)]
