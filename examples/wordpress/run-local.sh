#!/bin/sh
# WordPress on this machine: Debian's wordpress files (unpacked once from the package into
# ~/.cache/tpenv/wordpress-laptop, nothing installed system-wide) served by php-cli's built-in
# server, configured from the environment tpenv gives it (the pod's, see telepresence.yaml).
# `sh run-local.sh --prepare` only unpacks the files (needs the network: apt-get download) and exits.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tree=${TPENV_WORDPRESS_TREE:-${XDG_CACHE_HOME:-$HOME/.cache}/tpenv/wordpress-laptop}
command -v php >/dev/null || { echo "run-local.sh: no php: apt-get install php-cli php-mysql" >&2; exit 1; }
php -m | grep -qx mysqli || { echo "run-local.sh: PHP has no MySQL driver: apt-get install php-mysql" >&2; exit 1; }
if [ ! -f "$tree/usr/share/wordpress/wp-settings.php" ]; then
    mkdir -p "$tree/debs"
    (cd "$tree/debs" && apt-get download -q wordpress wordpress-theme-twentytwentythree >/dev/null) || {
        echo "run-local.sh: could not download Debian's wordpress packages into $tree:" \
             "run \`sh run-local.sh --prepare\` once where apt reaches a Debian mirror" >&2; exit 1; }
    for deb in "$tree"/debs/*.deb; do dpkg-deb -x "$deb" "$tree"; done
fi
[ "${1:-}" = --prepare ] && exit 0
# Debian's wp-config.php looks in /etc/wordpress: this one reads the environment instead.
cp "$here/wp-config-env.php" "$tree/usr/share/wordpress/wp-config-env.php"
cat > "$tree/usr/share/wordpress/wp-config.php" <<'PHP'
<?php
require __DIR__ . '/wp-config-env.php';
if (!defined('ABSPATH')) define('ABSPATH', __DIR__ . '/');
$table_prefix = 'wp_';
require_once ABSPATH . 'wp-settings.php';
PHP
export WORDPRESS_MU_PLUGIN_DIR="$here/${WORDPRESS_MU_PLUGIN_DIR:-mu-plugins}"
exec php -S "127.0.0.1:${PORT:-18080}" -t "$tree/usr/share/wordpress" "$here/router.php"
