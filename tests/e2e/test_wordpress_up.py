"""The seed's WordPress on the laptop (issue 16, Done-when 2-4): `tpenv up` in a copy of
examples/wordpress/, run as the seed's user would, from the developer's machine (a network
namespace that reaches the API server and nothing else of the cluster: tests/e2e/laptop_kit.py).

- Done-when 2: a request to the wordpress Service from a pod, carrying the personal header, is
  answered by the laptop's WordPress (Debian's files, php -S, examples/wordpress/run-local.sh),
  which reads the same database through the pod's own ``WORDPRESS_DB_HOST=mariadb`` (connect in
  ns mode: the handler in its own namespaces, ``mariadb`` resolved and dialled through the
  manager's relay) and serves a file uploaded in the cluster from the mounted wp-content volume;
  a request without the header is answered by the cluster's WordPress.
- Done-when 3: an edit of the example's must-use plugin changes the laptop's next answer only.
- Done-when 4: Ctrl-C: header or not, the cluster answers; the database kept its data; nothing
  of tpenv is left on the laptop, and in the cluster only the agent (in passthrough); after
  `tpenv uninstall --all-agents` nothing at all.

The connect unit needs the manager (cluster-wide): run under ``flock /tmp/tpenv-clusterwide.lock``.
The manager is installed for this module if it was absent (and removed afterwards), kept if it
was there.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import signal
import string
import subprocess
import sys
from pathlib import Path

import pytest

from connect_kit import install_manager
from laptop_kit import sh
from test_connect_capture import laptop  # noqa: F401  (fixture: the laptop namespace)
from test_up_kit import UpSession
from test_webhook_injection import agent_image, cli_env, tpenv  # noqa: F401  (module fixtures, reused)
from test_wordpress import EXAMPLE, _curl, _deploy, _install_site, _sql, app_images_imported  # noqa: F401
from tests.cluster.pytest_plugin import kubectl, kubectl_json, live_pods, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

HEADER = "x-telepresence-intercept-id"
HELLO = "hello from the laptop"


@pytest.fixture(scope="module")
def manager_as_found(cli_env):  # noqa: F811
    """The manager (its relay carries the handler's connections to mariadb): installed when
    absent and removed afterwards; kept as it is when someone had installed it."""
    there = kubectl("get", "deployment", "tpenv-manager", ns="tpenv", check=False).returncode == 0
    if there:
        kubectl("rollout", "status", "deployment/tpenv-manager", "--timeout=180s", ns="tpenv", timeout=200)
    else:
        install_manager(cli_env)
    try:
        yield
    finally:
        if not there:
            tpenv("manager", "uninstall", env=cli_env)


@pytest.fixture(scope="module")
def laptop_wordpress_files() -> None:
    """Debian's WordPress files, unpacked by the example's own script (it downloads them with
    apt-get: done here, on the host, since the laptop namespace reaches no package mirror)."""
    if not shutil.which("php"):
        pytest.fail("no php: python3 devspace.py setup installs php-cli and php-mysql", pytrace=False)
    cp = subprocess.run(["sh", str(EXAMPLE / "run-local.sh"), "--prepare"], capture_output=True, text=True,
                        timeout=600)
    assert cp.returncode == 0, f"run-local.sh --prepare: {cp.stdout}{cp.stderr}"


def _page(ns: str, path: str = "/", *headers: str) -> tuple[dict[str, str], str]:
    """One GET from the client pod, redirects followed (the header too: same host): (the
    response headers, lower-cased names, the last response's winning; body)."""
    args = ["-L", "-D", "/dev/stderr"]
    for h in headers:
        args += ["-H", h]
    cp = kubectl("exec", "client", "--", "curl", "-sS", "--max-time", "60", *args, f"http://wordpress{path}",
                 ns=ns, timeout=120, check=False)
    head = {k.strip().lower(): v.strip() for k, _, v in
            (line.partition(":") for line in cp.stderr.splitlines()[1:] if ":" in line)}
    return head, cp.stdout if cp.returncode == 0 else ""


def _by_laptop(ns: str, path: str, header: str, *must: str):
    def check():
        head, body = _page(ns, path, header)
        return body if head.get("x-served-by") == "laptop" and all(m in body for m in must) else None
    return check


def _by_cluster(ns: str, path: str, *headers: str, must: tuple[str, ...] = ()):
    def check():
        head, body = _page(ns, path, *headers)
        return body if body and "x-served-by" not in head and HELLO not in body \
            and all(m in body for m in must) else None
    return check


def _example_copy(dest: Path, ns: str) -> Path:
    """examples/wordpress/ as a user has it, its namespace the test's."""
    shutil.copytree(EXAMPLE, dest)
    cfg = dest / "telepresence.yaml"
    text = cfg.read_text()
    assert "\nnamespace: default\n" in text
    cfg.write_text(text.replace("\nnamespace: default\n", f"\nnamespace: {ns}\n"))
    return dest


def _tpenv_objects(ns: str) -> list[str]:
    """Whatever in the namespace carries tpenv's name in its name, labels or annotations."""
    kinds = "deployments,statefulsets,replicasets,services,secrets,configmaps,serviceaccounts,roles,rolebindings"
    found = []
    for obj in kubectl_json("get", kinds, ns=ns)["items"]:
        meta = obj["metadata"]
        marks = [meta["name"], *(meta.get("labels") or {}), *(meta.get("annotations") or {})]
        if obj["kind"] in ("Deployment", "StatefulSet"):
            tmpl = obj["spec"]["template"]
            marks += [*(tmpl["metadata"].get("labels") or {}), *(tmpl["metadata"].get("annotations") or {}),
                      *(c["name"] for c in tmpl["spec"]["containers"])]
        hits = [m for m in marks if "tpenv" in m]
        if hits:
            found.append(f"{obj['kind']}/{meta['name']}: {hits}")
    return found


def _db_reachable(lap) -> bool:
    """A connection to mariadb:3306 from the laptop, as the laptop's WordPress would open it."""
    probe = "import socket; socket.create_connection(('mariadb', 3306), timeout=5).close()"
    return lap.run(sys.executable, "-c", probe).returncode == 0


def _containers(ns: str, app: str) -> list[list[str]]:
    return [[c["name"] for c in p["spec"]["containers"]] for p in live_pods(ns, f"app={app}")]


def test_wordpress_intercepted_to_the_laptop(app_images_imported, manager_as_found, laptop_wordpress_files,  # noqa: F811
                                            laptop, cli_env, namespace, tmp_path):  # noqa: F811
    ns, lap = namespace, laptop
    title = "tpenv seed " + "".join(random.choices(string.ascii_lowercase, k=8))

    # Stage 1: the cluster's site, installed by its own installer (as test_wordpress.py), and a file
    # uploaded into wp-content in the cluster.
    _deploy(ns)
    _install_site(ns, title)
    template_before = kubectl_json("get", "deployment", "wordpress", ns=ns)["spec"]["template"]
    pod = kubectl_json("get", "pods", "-l", "app=wordpress", ns=ns)["items"][0]["metadata"]["name"]
    kubectl("exec", pod, "--", "sh", "-c", "mkdir -p /var/lib/wordpress/wp-content/uploads/2026 && "
            "echo uploaded-in-cluster > /var/lib/wordpress/wp-content/uploads/2026/hello.txt", ns=ns)
    # From the laptop, without tpenv, the database is out of reach by its short name.
    assert not _db_reachable(lap)

    # Stage 2: `tpenv up` in a copy of the example, from the laptop.
    work = _example_copy(tmp_path / "wordpress", ns)
    up = UpSession(work, env={"KUBECONFIG": str(lap.kubeconfig)}, prefix=lap.argv())
    try:
        with up:
            up.wait_ready(f"connect/{ns}", "intercept/", "mount/", "handler/wordpress", timeout=400)
            env = dict(line.split("=", 1) for line in (work / "wordpress.env").read_text().splitlines()
                       if "=" in line and not line.startswith("#"))
            assert env["WORDPRESS_DB_HOST"] == "mariadb", env  # the pod's value, unchanged
            personal = f"{HEADER}: {env['TELEPRESENCE_INTERCEPT_ID']}"

            # Stage 3 (Done-when 2): the personal header reaches the laptop's WordPress, which read the
            # title from the cluster's database through `mariadb`, and serves the cluster's upload
            # from the mounted volume; no header: the cluster's WordPress.
            page = up.until("the laptop's WordPress answering the header",
                            _by_laptop(ns, "/", personal, title, f"{HELLO} v1"), 300, interval=2)
            assert re.search(r"<title>[^<]*" + re.escape(title), page), page[:2000]
            upload = up.until("the upload served by the laptop from the mount",
                              _by_laptop(ns, "/wp-content/uploads/2026/hello.txt", personal), 120, interval=2)
            assert upload == "uploaded-in-cluster\n"
            up.until("the cluster's WordPress answering without the header", _by_cluster(ns, "/", must=(title,)), 120)
            # The same database, live: a post written in the cluster now is on the laptop's next page.
            post = "written in the cluster " + "".join(random.choices(string.ascii_lowercase, k=6))
            post_id = _sql(ns, "INSERT INTO wp_posts (post_author, post_date, post_date_gmt, post_content, "
                               "post_title, post_excerpt, post_status, post_name, to_ping, pinged, post_modified, "
                               "post_modified_gmt, post_content_filtered, post_type) VALUES (1, NOW(), "
                               f"UTC_TIMESTAMP(), 'body', '{post}', '', 'publish', 'tpenv-post', '', '', NOW(), "
                               "UTC_TIMESTAMP(), '', 'post'); SELECT LAST_INSERT_ID()")
            post_page = f"/?p={post_id}"
            up.until("the post on the laptop's page", _by_laptop(ns, post_page, personal, post), 120, interval=2)

            # Stage 4 (Done-when 3): the must-use plugin edited on the laptop: its next answer changes,
            # the cluster's does not (it never had the plugin).
            plugin = work / "mu-plugins" / "tpenv-hello.php"
            plugin.write_text(plugin.read_text().replace(f"{HELLO} v1", f"{HELLO} v2"))
            up.until("the laptop's answer after the edit", _by_laptop(ns, "/", personal, f"{HELLO} v2"), 120)
            assert _by_cluster(ns, "/", must=(title,))() and _by_cluster(ns, post_page, must=(post,))(), \
                "the cluster's answer changed"

            # Stage 5 (Done-when 4): Ctrl-C.
            up.signal(signal.SIGINT)
            assert up.wait(180) == 0, up.output
        print("tpenv up's output:\n" + "\n".join(line for line in up.lines if "Accepted" not in line
                                                    and "Closing" not in line))
    except BaseException:
        print("tpenv up's output:\n" + up.output)
        raise

    # Header or not, the cluster answers; the database kept the title and the post.
    for headers in ((), (personal,)):
        wait_until(f"the cluster answering {headers or 'without a header'}",
                   _by_cluster(ns, "/", *headers, must=(title,)), 120, interval=2)
        assert _by_cluster(ns, post_page, *headers, must=(post,))(), f"the post, {headers or 'without a header'}"
    assert _sql(ns, "SELECT option_value FROM wp_options WHERE option_name='blogname'") == title
    assert _sql(ns, f"SELECT COUNT(*) FROM wp_posts WHERE post_title='{post}'") == "1"
    # Nothing of tpenv on the laptop: no process left in its namespace (handler, sshfs, dialers).
    left = sh("ip", "netns", "pids", lap.name).stdout.split()  # asked from the host: not itself inside
    assert not left, [Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ") for p in left]
    assert not _db_reachable(lap)
    # In the cluster: the agent only, serving the cluster (above), holding no intercept.
    assert _containers(ns, "wordpress") == [["wordpress", "tpenv-agent"]], _containers(ns, "wordpress")
    listing = tpenv("-n", ns, "-o", "json", "list", env=cli_env)
    assert listing.returncode == 0, listing.stderr
    print("tpenv list after Ctrl-C:", listing.stdout)
    data = json.loads(listing.stdout)
    rows = [w for w in (data if isinstance(data, list) else data["workloads"]) if w["name"] == "wordpress"]
    assert rows and not rows[0].get("intercepts"), rows

    # Stage 6: `tpenv uninstall`: nothing of tpenv at all, the workload as it was.
    cp = tpenv("-n", ns, "uninstall", "--all-agents", env=cli_env)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    wait_until("the pods without the agent", lambda: _containers(ns, "wordpress") == [["wordpress"]], 300)
    assert kubectl_json("get", "deployment", "wordpress", ns=ns)["spec"]["template"] == template_before
    # The namespace's Secret tpenv-auth (the agents' SSH CA) went with the last pod mounting it.
    assert f"deleted Secret {ns}/tpenv-auth" in cp.stdout + cp.stderr, cp.stdout + cp.stderr
    assert _tpenv_objects(ns) == []
    wait_until("the cluster's WordPress answering after uninstall", _by_cluster(ns, post_page, must=(title, post)),
               300, interval=2)
