"""`python3 devspace.py demo`: the main job of tpenv, on the local cluster, in one command.

1. deploys examples/hello (an echo server Deployment and Service, port 80 -> 8080) into the
   namespace `tpenv-demo`, with a client pod to send requests from inside the cluster;
2. runs `tpenv up` on examples/hello/telepresence.yaml: the agent is injected, the
   Service's traffic goes to server.py on this machine, with the pod's env;
3. sends a request from the client pod and shows who answered;
4. keeps `tpenv up` running and says what to try (`--once`: stops it, checks the cluster
   answers again, removes the namespace, and exits 0 only if the laptop had answered).

devspace.py runs this with the project's venv and KUBECONFIG pointing at the cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELLO = HERE / "hello"
NS = "tpenv-demo"
TPENV = str(Path(sys.executable).parent / "tpenv")
LAPTOP = "hello from the laptop"


def say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def kubectl_cmd() -> list[str]:
    # tests/kit is a plain module (no pytest): imported as `tests.kit`, so the repo root goes on the path.
    sys.path.insert(0, str(HERE.parent))
    from tests.kit.kubectl import kubectl_binary  # noqa: PLC0415 - the cluster kit picks the right kubectl

    return [kubectl_binary()]


def kubectl(*args: str, check: bool = True, input: str | None = None, timeout: float = 180) -> str:
    cp = subprocess.run([*KUBECTL, *args], capture_output=True, text=True, input=input, timeout=timeout)
    if check and cp.returncode != 0:
        raise SystemExit(f"demo: kubectl {' '.join(args)} failed:\n{cp.stderr.strip()}")
    return cp.stdout


def in_cluster_get(path: str) -> str:
    """A request from the client pod, as any caller in the cluster would send it."""
    cp = subprocess.run([*KUBECTL, "-n", NS, "exec", "demo-client", "--", "curl", "-s", "-m", "5",
                         f"http://hello.{NS}{path}"], capture_output=True, text=True, timeout=30)
    return cp.stdout.strip() if cp.returncode == 0 else f"(no answer: {cp.stderr.strip() or cp.returncode})"


def who(answer: str) -> str:
    """The cluster's echo answers JSON naming its pod; server.py here answers plain text
    (whatever greeting it has been edited to)."""
    if not answer or answer.startswith("(no answer"):
        return "nobody"
    try:
        return f"the cluster (pod {json.loads(answer)['pod']})"
    except (ValueError, KeyError, TypeError):
        return "this machine"


def ask_until(path: str, side: str, tries: int, delay: float) -> str:
    """Ask from the client pod until ``side`` answers (bounded); the last answer either way.
    A Service change reaches kube-proxy a moment after the API has it, with no event for it."""
    answer = ""
    for _ in range(tries):
        answer = in_cluster_get(path)
        if who(answer).startswith(side):
            break
        time.sleep(delay)
    return answer


def replace_stale_client(image: str) -> None:
    """An earlier run's client pod is reused only while it runs this checkout's image. A bare pod
    with restartPolicy Never does not come back from a node restart (it stays Unknown or Failed for
    good), and `kubectl run` would only say AlreadyExists: the demo then waited on a dead pod."""
    state = kubectl("-n", NS, "get", "pod", "demo-client", "--ignore-not-found",
                    "-o", "jsonpath={.status.phase} {.spec.containers[0].image}", check=False).split()
    if not state or state == ["Running", image]:
        return
    say(f"replacing the previous run's demo-client pod ({' '.join(state)})")
    kubectl("-n", NS, "delete", "pod", "demo-client", "--ignore-not-found", "--grace-period=1",
            "--wait=true", "--timeout=60s", timeout=90)


def deploy() -> None:
    deadline = time.monotonic() + 180
    while kubectl("get", "namespace", NS, "-o", "jsonpath={.status.phase}", check=False) == "Terminating":
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: namespace {NS} is still being deleted from an earlier run; try again later")
        say(f"waiting for the previous run's namespace {NS} to be deleted")
        time.sleep(3)
    say(f"deploying examples/hello into namespace {NS}")
    kubectl("create", "namespace", NS, check=False)
    kubectl("-n", NS, "apply", "-f", str(HELLO / "k8s.yaml"))
    from tests.kit.apps import testapp_image  # noqa: PLC0415 - after kubectl_cmd put the repo on the path

    # The client pod gets this checkout's test app tag; k8s.yaml keeps the documented :dev alias.
    image = testapp_image()
    replace_stale_client(image)
    kubectl("-n", NS, "run", "demo-client", f"--image={image}", "--image-pull-policy=Never",
            "--restart=Never", "--command", "--", "sleep", "infinity", check=False)
    kubectl("-n", NS, "rollout", "status", "deployment/hello", "--timeout=180s", timeout=200)
    kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/demo-client", "--timeout=120s", timeout=150)
    before = ask_until("/", "the cluster", 30, 1.0)  # rolled out is not yet routed
    say(f"before tpenv: GET http://hello.{NS}/ is answered by {who(before)}")


class Up:
    """`tpenv up` as a child: its output passes through, and we watch it for readiness."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        cmd = [TPENV, "up", "-f", str(HELLO / "telepresence.yaml"), "-n", NS]
        say("running: tpenv up -f examples/hello/telepresence.yaml -n " + NS)
        # Its own process group: a Ctrl-C in the terminal reaches only this script, which passes
        # exactly one SIGINT on (stop()). Sharing the group, tpenv up would get the terminal's
        # SIGINT and then ours, and take the second as "force": a hard exit instead of a clean stop.
        self.proc = subprocess.Popen(cmd, cwd=HELLO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     process_group=0)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            sys.stdout.write("  | " + line)
            sys.stdout.flush()
            if "handler/hello started" in line:
                self.ready.set()
        self.ready.set()  # ended: stop waiting either way

    def stop(self) -> int:
        """One SIGINT: tpenv up stops every unit. A second Ctrl-C meanwhile is passed on as its
        second SIGINT (tpenv up's "again to force")."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(90)
        except KeyboardInterrupt:
            self.proc.send_signal(signal.SIGINT)
            return self.proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(prog="devspace.py demo", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true",
                        help="one round trip, then clean up; exit 0 only if the laptop answered")
    args = parser.parse_args()
    with socket.socket() as probe:  # server.py must get 127.0.0.1:8080, where the intercept delivers
        if probe.connect_ex(("127.0.0.1", 8080)) == 0:
            say("127.0.0.1:8080 is in use on this machine (another tpenv up or server?); stop it and try again")
            return 1
    deploy()
    up = Up()
    try:
        return with_up(up, args.once)
    except KeyboardInterrupt:
        # Ctrl-C at any moment once tpenv up runs (while it starts, mid-message): one clean stop.
        # Caught only around the final wait, a Ctrl-C a moment early ended this script with a
        # traceback and left tpenv up running in its own process group, its handler on 8080.
        return up.stop()
    finally:
        if up.proc.poll() is None:  # any other way out of here: tpenv up must not outlive us
            up.stop()


def with_up(up: Up, once: bool) -> int:
    """The round trip with tpenv up running; with ``once``, stop it and check the cluster after."""
    if not up.ready.wait(240) or up.proc.poll() is not None:
        say("tpenv up did not come up; its output is above")
        up.stop()
        return 1
    # The handler has started; give the intercept's first request a few tries while
    # server.py binds its port.
    answer = ask_until("/from-the-cluster", "this machine", 20, 0.5)
    answered = answer.startswith(LAPTOP)
    say(f"with tpenv up: GET http://hello.{NS}/from-the-cluster is answered by {who(answer)}: {answer!r}")
    if once:
        rc = up.stop()
        after = ask_until("/", "the cluster", 30, 1.0)
        say(f"after tpenv up stopped (exit {rc}): answered by {who(after)}")
        kubectl("delete", "namespace", NS, "--wait=false", check=False)
        ok = answered and rc == 0 and who(after).startswith("the cluster")
        say("OK: the laptop answered, and the cluster was left as it was" if ok else "FAILED: see above")
        return 0 if ok else 1
    say(f"""tpenv up keeps running; try, in another shell (export KUBECONFIG={os.environ.get('KUBECONFIG')}):
    - edit examples/hello/server.py (the greeting): the handler restarts; ask again with
        kubectl -n {NS} exec demo-client -- curl -s http://hello.{NS}/
    - delete the pod: kubectl -n {NS} delete pod -l app=hello   (the intercept comes back by itself)
    - add a header match in examples/hello/telepresence.yaml (match: {{headers: auto}}): only your
      requests (x-telepresence-intercept-id) reach this machine, the rest stay in the cluster
    - .venv/bin/tpenv status     (every unit, from another shell)
    - Ctrl-C here, or .venv/bin/tpenv down: the cluster answers again""")
    return up.proc.wait()


KUBECTL = kubectl_cmd()

if __name__ == "__main__":
    sys.exit(main())
