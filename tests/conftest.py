"""Suite-wide pytest setup: the cluster fixtures (kubeconfig, namespace, kubectl) for every test.

The repo root goes on sys.path so tests can write ``from tests.cluster.pytest_plugin import kubectl``
however pytest was started.

SIGINT is made handled here whatever the suite inherited: started as a background job of a
non-interactive shell (``nohup ... &`` in a script, some CI runners), every process starts with
SIGINT ignored, and the children the tests stop "with Ctrl-C" (tpenv connect, the demo, the
handlers) inherit that across exec and never stop. A handled signal is reset to the default on
exec, as a terminal's foreground job has it.
"""
import signal
import sys
from pathlib import Path

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = ["tests.cluster.pytest_plugin"]
