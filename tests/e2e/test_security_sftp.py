"""Issue 12, Done-when 1: the agent's file service never leads out of the app's volumes.

The store app (an emptyDir at /data, a projected token) with links planted in its volume by the
app itself: absolute ones to the pod's service-account token and to the agent's SSH host key,
and one through /proc/self/root. Two kinds of client try to read through them:

- the developer's own sshfs mount (`tpenv intercept --mount`, sshfs follows links on the agent);
- a raw SFTP session over a port-forward, made with the namespace's Secret, which also tries
  `..`, `/proc/self/root` spelled out, and a chain of links it makes itself.

Every attempt is refused; the volume's own files stay readable and writable.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import os

import asyncssh
import pytest

from test_intercept_env_mount import store_app
from test_intercept_kit import Intercepting, wait_for
from tests.cluster.pytest_plugin import kubectl, kubectl_json
from tpenv.kits.agent_client import open_ssh
from tpenv.kits.kube import Kube
from tpenv.kits.portforward import PodTunnel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
HOST_KEY = "/tpenv/auth/host_key"
PLANT = (f"ln -sf {SA_TOKEN} /data/sa-token; ln -sf {HOST_KEY} /data/host-key; "
         f"ln -sf /proc/self/root{HOST_KEY} /data/proc-root; ln -sfn /tpenv /data/tpenv-dir")


def refused_locally(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.read()
    except OSError as e:
        return e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.ELOOP, errno.EIO)
    return False


async def raw_sftp_attacks(kubeconfig: str, ns: str, pod: str) -> None:
    auth = kubectl_json("get", "secret", "tpenv-auth", ns=ns)["data"]
    ca_key, host_pub = (base64.b64decode(auth[k]) for k in ("ca_key", "host_key.pub"))
    kube = await Kube.load(kubeconfig)
    try:
        conn = await open_ssh("attacker", ca_key=ca_key, host_key=host_pub, host="agent", port=7922,
                              tunnel=PodTunnel(kube, ns, pod))
        async with conn, conn.start_sftp_client() as sftp:
            refusals = (asyncssh.SFTPPermissionDenied, asyncssh.SFTPNoSuchFile, asyncssh.SFTPFailure)
            attempts = ["/data/sa-token", "/data/host-key", "/data/proc-root", "/data/tpenv-dir/auth/host_key",
                        "/../auth/host_key", "/data/../../auth/host_key", "/../../var/run/secrets/kubernetes.io/"
                        "serviceaccount/token", f"/proc/self/root{HOST_KEY}", f"/proc/self/root{SA_TOKEN}"]
            # A chain the client builds itself, each link harmless when made.
            await sftp.symlink("..", "/data/up1")
            await sftp.symlink("up1/..", "/data/up2")
            await sftp.symlink("up2/..", "/data/up3")
            await sftp.symlink("/", "/data/slash")
            attempts += ["/data/up3/auth/host_key", "/data/up2/../auth/host_key", f"/data/slash{SA_TOKEN}"]
            for path in attempts:
                with pytest.raises(refusals):
                    async with sftp.open(path) as f:
                        leaked = await f.read()
                        pytest.fail(f"read {path} through SFTP: {leaked[:40]!r}")
            with pytest.raises(refusals):
                await sftp.listdir("/data/up3")
            with pytest.raises(refusals):
                async with sftp.open("/data/up3/escaped", "w") as f:
                    await f.write("out")
            # The volume's own files: readable and writable in the same session.
            async with sftp.open("/data/cluster.txt") as f:
                assert await f.read() == "written in the cluster\n"
            async with sftp.open("/data/raw.txt", "w") as f:
                await f.write("written over raw sftp\n")
    finally:
        await kube.close()


def test_links_in_a_volume_never_reach_the_agent_or_the_pod_secrets(namespace, tmp_path, kubeconfig):
    ns = namespace
    store_app(ns)
    vol = tmp_path / "store.vol"
    run = Intercepting(tmp_path, "store", "--port", "18484:web", "-n", ns, "--mount", str(vol))
    try:
        # Stage 1: intercept with an sshfs mount; the app plants its links in /data.
        info = run.ready()
        pod = info["pods"][0]
        kubectl("exec", pod, "-c", "app", "--", "sh", "-c", PLANT, ns=ns)
        wait_for("the planted links seen through the mount", lambda: os.path.islink(vol / "data" / "host-key")
                 or (vol / "data" / "host-key").exists() or "host-key" in os.listdir(vol / "data"), 30)

        # Stage 2: through the developer's own mount (sshfs follows links on the agent): refused.
        for name in ("sa-token", "host-key", "proc-root"):
            assert refused_locally(str(vol / "data" / name)), f"{name} was readable through the mount"
        assert refused_locally(str(vol / "data" / "tpenv-dir" / "auth" / "host_key"))

        # Stage 3: a raw SFTP session with the namespace's Secret: planted links, `..`,
        # /proc/self/root, a client-made chain: all refused; the volume itself still served.
        asyncio.run(raw_sftp_attacks(str(kubeconfig), ns, pod))

        # Stage 4: the volume still works both ways through the mount, and nothing escaped.
        assert (vol / "data" / "cluster.txt").read_text() == "written in the cluster\n"
        (vol / "data" / "laptop.txt").write_text("written on the laptop\n")
        out = kubectl("exec", pod, "-c", "app", "--", "cat", "/data/laptop.txt", "/data/raw.txt", ns=ns).stdout
        assert out == "written on the laptop\nwritten over raw sftp\n"
    finally:
        run.stop()
