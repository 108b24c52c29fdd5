"""Images of software no one here wrote, for the examples (issue 16): MariaDB and WordPress,
each a Debian bookworm rootfs with the distribution's packages really installed (debootstrap
runs their maintainer scripts: Apache's modules enabled, PHP's MySQL driver registered), plus
the few files in appimages/<name>/ that make them run as the charts run them: non-root, on
unprivileged ports, configured from the environment. Stdlib only, like images.py.

    tpenv/mariadb:10.11      mariadb-server; entrypoint appimages/mariadb/entrypoint.sh
    tpenv/wordpress:6.1      wordpress, apache2, libapache2-mod-php, php-mysql, the default theme;
                             Apache on 8080, config-default.php reading WORDPRESS_* variables

One layer each (the whole rootfs): they share nothing with the Python base worth splitting for.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import images
import oci
from images import PATH_ENV, _cached_image, _cached_layer, _hash, _locked, _tool_hash

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "appimages"
APP_USER = "1001:1001"  # the uid the Bitnami charts run MariaDB and WordPress as

MARIADB_REF = "tpenv/mariadb:10.11"
MARIADB_PACKAGES = ["mariadb-server"]
WORDPRESS_REF = "tpenv/wordpress:6.1"
# php-mysql: the MySQL driver WordPress needs (Debian's wordpress accepts php-mysqlnd instead, but
# debootstrap takes the first alternative). The theme is the one WordPress 6.1 activates on install.
WORDPRESS_PACKAGES = ["wordpress", "apache2", "libapache2-mod-php", "php-mysql", "wordpress-theme-twentytwentythree"]


def _install(src: Path, dest: Path, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def _finish_wordpress(root: Path) -> None:
    """Apache: only our site, only port 8080 (a non-root user cannot bind 80). In the rootfs, not
    the app layer: it removes files."""
    for p in (root / "etc/apache2/sites-enabled").iterdir():
        p.unlink()
    _install(SOURCES / "wordpress/wordpress.conf", root / "etc/apache2/sites-enabled/wordpress.conf")
    (root / "etc/apache2/ports.conf").write_text("# Listen: in sites-enabled/wordpress.conf (8080)\n")
    # What an empty wp-content volume is seeded with (the volume hides the image's own copy).
    shutil.copytree(root / "var/lib/wordpress/wp-content", root / "usr/share/tpenv/wp-content", symlinks=True)


# The app layer: files of appimages/<name>/ -> their place in the image. Small and cheap to
# rebuild: editing an entrypoint does not debootstrap again.
# WordPress's configuration is the example's wp-config-env.php: one file, read by the pod and by
# the laptop's WordPress (examples/wordpress/run-local.sh) alike.
REPO = HERE.parent.parent
APP_FILES = {
    "mariadb": {SOURCES / "mariadb/entrypoint.sh": ("usr/local/bin/tpenv-mariadb", 0o755)},
    "wordpress": {SOURCES / "wordpress/entrypoint.sh": ("usr/local/bin/tpenv-wordpress", 0o755),
                  REPO / "examples/wordpress/wp-config-env.php": ("etc/wordpress/config-default.php", 0o644)},
}


def _build(ref: str, packages: list[str], finish, cmd: list[str], port: str, log) -> Path:
    t0 = time.monotonic()
    name = ref.split("/", 1)[1].split(":", 1)[0]
    # The rootfs is keyed by its packages and what finish() writes (wordpress.conf), not by the app files.
    recipe = _hash(f"{name}-rootfs-v1", *(((SOURCES / name / "wordpress.conf").read_bytes(),) if finish else ()))
    rootfs = images.debian_rootfs(f"rootfs-{name}", packages, recipe, log, finish=finish)
    system = _cached_layer(f"layer-{name}", _hash(f"{name}-layer", rootfs.name, _tool_hash()),
                           lambda lw: lw.add_tarball(rootfs), log)
    files = APP_FILES[name]

    def fill(lw) -> None:
        for src, (dest, mode) in sorted(files.items()):
            lw.add_file(dest, src.read_bytes(), mode)

    key = [f"{name}-app-v2", *(part for src, (dest, mode) in sorted(files.items())
                                for part in (dest, str(mode), src.read_bytes())), _tool_hash()]
    app = _cached_layer(f"layer-{name}-app", _hash(*key), fill, log)
    cfg = oci.image_config([system, app], cmd=cmd, env=[PATH_ENV, "LANG=C.UTF-8"], user=APP_USER,
                           exposed_ports=[port])
    return _cached_image([ref], [system, app], cfg, log, t0)


@_locked
def build_mariadb(log=print) -> Path:
    return _build(MARIADB_REF, MARIADB_PACKAGES, None, ["tpenv-mariadb"], "3306/tcp", log)


@_locked
def build_wordpress(log=print) -> Path:
    return _build(WORDPRESS_REF, WORDPRESS_PACKAGES, _finish_wordpress, ["tpenv-wordpress"], "8080/tcp", log)


def build_all(log=print) -> list[Path]:
    return [build_mariadb(log), build_wordpress(log)]
