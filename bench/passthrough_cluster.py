#!/usr/bin/env python3
"""Issue 4's passthrough cost, in the cluster: the same in-cluster requests to the app directly
and through the traffic agent in passthrough, interleaved in rounds, in one run.

The agent is injected by the real machinery (a first `tpenv intercept`, left at once), then the
client pod sends 1 KiB keep-alive requests at a fixed rate (p50/p99), closed-loop requests on
16 connections (req/s) and bulk transfers (MB/s) to Service `bench-direct` (app port) and
Service `bench-app` (the agent's port) of the same pods. Targets: <= 0.3 ms added at p50,
>= 85% of the throughput without the agent.

    python3 devspace.py bench --only passthrough [--quick]     (the same thing)
    .venv/bin/python bench/passthrough_cluster.py [--quick | --smoke] [--profile]

It is bench/run.py with `--only passthrough`; the figures are its "(a)" and "(d)" rows.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py)

if __name__ == "__main__":
    sys.exit(run.main(["--only", "passthrough", *sys.argv[1:]]))
