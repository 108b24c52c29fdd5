"""keep_heap (main.py): buffers the size of uvloop's reads, allocated and freed over and over,
must not fault in fresh pages each time (issue #13, the agent's CPU per GB on uvloop)."""
from __future__ import annotations

import subprocess
import sys

import pytest

# In a child: the mallopt settings are process-wide and must not leak into the test process.
CHILD = """
import collections, resource, sys
from tpenv_agent.main import keep_heap
if sys.argv[1] == "keep" and not keep_heap():
    print("no-mallopt"); sys.exit(0)
buf = bytearray(256000)
queued = collections.deque()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(500):
    # What uvloop does per read: a new bytes copied from its buffer, held by the peer's write
    # queue until sent (0 to 3 of them alive at a time).
    queued.append(bytes(buf))
    while len(queued) > i % 4:
        queued.popleft()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    return out.stdout.strip()


def test_read_sized_buffers_reuse_the_heap_after_keep_heap():
    kept = faults("keep")
    if kept == "no-mallopt":
        pytest.skip("no glibc mallopt here")
    # 500 buffers of 63 pages each: fresh pages every time would be ~31000 faults.
    assert int(kept) < 2000, kept
    # And the default really is the costly one (else this test would prove nothing).
    assert int(faults("default")) > 10000
