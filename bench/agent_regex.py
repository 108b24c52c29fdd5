"""A catastrophic header pattern cannot raise the app's p99 (issue 12), measured locally in one run.

A real sidecar process in front of the test app, with one header intercept whose pattern is
``(a+)+$`` (exponential backtracking in a backtracking engine). Callers of the app measure
request latency (sequential keep-alive requests, no intercept header) in rounds that alternate:

- control: meanwhile, another caller sends requests with the same N-byte header under a name
  no rule looks at (``x-pad``): the same load on the agent, no pattern run;
- attack: instead, requests whose ``x-dev`` header is ``a`` * N + ``!`` (the pattern's worst
  case), one after another on its own connection.

With RE2 (linear time) the attack costs one scan of the header per request; with Python's ``re``
a 30-character header would already hold the agent's one event loop for seconds, i.e. every
request of the app. Prints a table and one JSON line; the row is the ratio
p99(attack) / p99(control), measured in the same run (1 = the pattern costs nothing visible).

    .venv/bin/python bench/agent_regex.py [--rounds 6] [--requests 300] [--header-len 8000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "agent" / "tests"))
from agent_testkit import App, Http1, RawSession, auth_material, run_agent  # noqa: E402
from agent_local import keepalive_latencies, pct  # noqa: E402

PATTERN = "(a+)+$"


async def attacker(port: int, name: str, header: str, stop: asyncio.Event) -> int:
    sent = 0
    async with Http1(port) as c:
        while not stop.is_set():
            status, _, body = await c.request("/", headers={name: header})
            assert status == 200 and json.loads(body)["who"] == "app", body[:80]  # not matched: the app
            sent += 1
    return sent


async def main(args: argparse.Namespace) -> dict:
    m = auth_material()
    with tempfile.TemporaryDirectory() as tmp:
        async with App("app") as app, App("laptop") as laptop, \
                run_agent(Path(tmp), m, [f"0:{app.port}:http"]) as agent:
            port = agent.listeners["http"]
            async with RawSession(agent, m, "bench") as s:
                answer = await s.intercept("evil", "http", {"headers": {"x-dev": PATTERN}}, laptop.port)
                assert answer["ok"], answer
                header = "a" * args.header_len + "!"
                got: dict[str, list[float]] = {"base": [], "control": [], "attack": []}
                sent = {"control": 0, "attack": 0}
                await keepalive_latencies(port, 50, "/")  # warm-up: pools, caches
                for _ in range(args.rounds):  # interleaved, so background load hits all alike
                    got["base"] += await keepalive_latencies(port, args.requests, "/")
                    for phase, name in (("control", "x-pad"), ("attack", "x-dev")):
                        stop = asyncio.Event()
                        other = asyncio.ensure_future(attacker(port, name, header, stop))
                        got[phase] += await keepalive_latencies(port, args.requests, "/")
                        stop.set()
                        sent[phase] += await other
    row: dict = {"pattern": PATTERN, "header_len": args.header_len, "attack_requests": sent["attack"],
                 "control_requests": sent["control"]}
    for phase, samples in got.items():
        row[f"p50_{phase}_ms"], row[f"p99_{phase}_ms"] = pct(samples, 50) * 1e3, pct(samples, 99) * 1e3
    row["p99_ratio"] = row["p99_attack_ms"] / row["p99_control_ms"]
    return row


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--header-len", type=int, default=8000)
    r = asyncio.run(main(ap.parse_args()))
    print(f"{'':26}{'p50 ms':>10}{'p99 ms':>10}")
    for phase, label in (("base", "alone"), ("control", f"+ x-pad ({r['control_requests']} req)"),
                         ("attack", f"+ x-dev ({r['attack_requests']} req)")):
        print(f"{label:26}{r[f'p50_{phase}_ms']:>10.2f}{r[f'p99_{phase}_ms']:>10.2f}")
    print(f"p99 ratio attack/control: {r['p99_ratio']:.2f}  ({PATTERN!r} vs {r['header_len']}-byte header)")
    print(json.dumps(r))
