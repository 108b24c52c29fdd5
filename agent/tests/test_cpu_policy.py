"""main.cpu_policy: the sidecar runs SCHED_BATCH so a woken agent does not preempt the app it
shares a CPU with (issue #13). Each case runs in its own process: the policy is the process's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1]
# Set the policy, then report it for this thread and for a thread started afterwards.
CHILD = """
import json, os, sys, threading
from tpenv_agent.main import cpu_policy
why = cpu_policy(sys.argv[1] if len(sys.argv) > 1 else None)
later = []
t = threading.Thread(target=lambda: later.append(os.sched_getscheduler(0)))
t.start(); t.join()
print(json.dumps({"why": why, "main": os.sched_getscheduler(0), "thread": later[0]}))
"""


def policy(*args: str, env: dict | None = None) -> dict:
    cp = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=60,
                        cwd=AGENT, env={**os.environ, "PYTHONPATH": str(AGENT), **(env or {})})
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def test_default_is_batch_for_every_thread():
    got = policy(env={"TPENV_AGENT_SCHED": ""})
    assert got == {"why": None, "main": os.SCHED_BATCH, "thread": os.SCHED_BATCH}


def test_normal_keeps_the_kernel_default():
    got = policy(env={"TPENV_AGENT_SCHED": "normal"})
    assert got["main"] == got["thread"] == os.SCHED_OTHER and "normal" in got["why"]


def test_unknown_choice_is_named_and_changes_nothing():
    got = policy("fifo")
    assert got["main"] == os.SCHED_OTHER and "'fifo' is not one of batch, normal" in got["why"]
