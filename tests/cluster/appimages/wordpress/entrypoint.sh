#!/bin/sh
# WordPress (Debian's package) under Apache, non-root. An empty wp-content volume is seeded
# with the image's own wp-content first, as the official image seeds its volume.
set -eu
content=${WORDPRESS_CONTENT_DIR:-/var/lib/wordpress/wp-content}
if [ -z "$(ls -A "$content" 2>/dev/null)" ]; then
    echo "wordpress: seeding $content"
    # -R, not -a: the volume's root is not ours to set times or owners on. -L: the theme is a link
    # into Debian's theme package; the volume gets its files, so whoever mounts the volume
    # elsewhere (a laptop through tpenv) finds the theme in it rather than a dangling link.
    cp -R -L /usr/share/tpenv/wp-content/. "$content/"
fi
export APACHE_RUN_DIR=/tmp/apache2/run APACHE_LOCK_DIR=/tmp/apache2/lock APACHE_LOG_DIR=/tmp/apache2/log
export APACHE_PID_FILE=/tmp/apache2/run/apache2.pid APACHE_RUN_USER=www-data APACHE_RUN_GROUP=www-data
mkdir -p "$APACHE_RUN_DIR" "$APACHE_LOCK_DIR" "$APACHE_LOG_DIR"
exec apache2 -DFOREGROUND
