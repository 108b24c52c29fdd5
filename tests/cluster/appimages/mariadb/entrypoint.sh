#!/bin/sh
# MariaDB as database charts run it: non-root (any uid), data in $MARIADB_DATA (a PVC), the
# database and user named in the env (the password from a Secret) made at the first start and
# kept in step at every start (--init-file: idempotent statements, run before connections).
set -eu
data=${MARIADB_DATA:-/var/lib/mysql}
: "${MARIADB_DATABASE:?set MARIADB_DATABASE}" "${MARIADB_USER:?set MARIADB_USER}" "${MARIADB_PASSWORD:?set MARIADB_PASSWORD}"
# Names go into SQL as identifiers: only what needs no quoting is accepted.
for name in "$MARIADB_DATABASE" "$MARIADB_USER"; do
    case "$name" in
        *[!A-Za-z0-9_]* | "") echo "mariadb: '$name': use letters, digits and _ only" >&2; exit 2 ;;
    esac
done
if [ ! -d "$data/mysql" ]; then
    echo "mariadb: initializing $data"
    # --skip-name-resolve --force: the pod's hostname need not resolve (it does not in every cluster).
    if ! out=$(mariadb-install-db --datadir="$data" --auth-root-authentication-method=socket --skip-test-db \
            --skip-name-resolve --force --user="$(id -u)" 2>&1); then
        printf '%s\n' "$out" >&2
        exit 1
    fi
fi
# The password as a SQL string literal: backslashes and quotes escaped.
pw=$(printf '%s' "$MARIADB_PASSWORD" | sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g")
run=${TMPDIR:-/tmp}/mariadb
mkdir -p "$run"
umask 077
cat > "$run/init.sql" <<SQL
CREATE DATABASE IF NOT EXISTS \`$MARIADB_DATABASE\`;
CREATE USER IF NOT EXISTS '$MARIADB_USER'@'%' IDENTIFIED BY '$pw';
ALTER USER '$MARIADB_USER'@'%' IDENTIFIED BY '$pw';
GRANT ALL ON \`$MARIADB_DATABASE\`.* TO '$MARIADB_USER'@'%';
SQL
exec mariadbd --datadir="$data" --bind-address=0.0.0.0 --port="${MARIADB_PORT:-3306}" \
    --socket="$run/mysqld.sock" --pid-file="$run/mysqld.pid" --init-file="$run/init.sql" \
    --skip-name-resolve
