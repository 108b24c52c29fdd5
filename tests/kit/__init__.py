"""What the tests and the benchmarks (bench/) share: plain modules, no tests and no fixtures.

Benchmarks import these rather than test modules or the pytest plugin, so a test module can
change (or be collected) without the bench depending on it, and the bench's needs stay visible.

- ``kubectl``: the kubectl of the test cluster (``kubectl``, ``kubectl_json``, ``apply``,
  ``kubectl_binary``, ``TEST_LABEL``);
- ``apps``: the echo app the intercept scenarios deploy and the local handler `run:` starts.
"""
