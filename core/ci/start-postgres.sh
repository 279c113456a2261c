#!/usr/bin/env bash
# A PostgreSQL server for the store's tests on this (Debian 12) machine, without systemd.
#
#   core/ci/start-postgres.sh --install   # as root: install Debian's postgresql if missing, start
#   core/ci/start-postgres.sh             # start it (or find it running); print its URL
#   core/ci/start-postgres.sh --stop      # stop it (the data directory is kept)
#
# The server runs as user `postgres` when the script runs as root (PostgreSQL refuses to run as
# root), else as the calling user. It has its own data directory (initdb'd on first use, not
# Debian's /etc/postgresql cluster), listens on 127.0.0.1 only, on GATEWAY_PG_PORT (default
# 54329), and has the role `gateway` (password `gateway`, CREATEDB: each test makes its own
# database) and the database `gateway_test`. Durability is off (fsync, full-page writes,
# synchronous commit): it is a throwaway server for tests, never for data.
#
# Idempotent: a second run finds the server answering and only makes sure the role and the
# database exist. It prints the URL on stdout, the one the tests read from
# GATEWAY_TEST_POSTGRES_URL, whose default is this URL:
#   postgresql+psycopg://gateway:gateway@127.0.0.1:54329/gateway_test
# and writes it to DIR/url. DIR is GATEWAY_PG_DIR, default /var/lib/gateway-ci/postgres as
# root, else /tmp/gateway-ci-postgres-<uid>; the server's log is DIR/postgres.log.
# Exits non-zero, with the reason, when the server does not come up.
set -euo pipefail

PORT="${GATEWAY_PG_PORT:-54329}"
ROLE=gateway
PASSWORD=gateway
DATABASE=gateway_test
if [ "$(id -u)" = 0 ]; then
    DIR="${GATEWAY_PG_DIR:-/var/lib/gateway-ci/postgres}"
    RUN_AS=postgres
else
    DIR="${GATEWAY_PG_DIR:-/tmp/gateway-ci-postgres-$(id -u)}"
    RUN_AS="$(id -un)"
fi
DATA="$DIR/data"
URL="postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"

log() { echo "start-postgres: $*" >&2; }

install_packages() {
    find_bin && return 0
    if [ "$(id -u)" != 0 ]; then
        log "PostgreSQL is not installed; as root: apt-get install -y postgresql"
        exit 1
    fi
    log "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt/dpkg run (up to 10 minutes) instead of failing on its lock.
    local apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
    "${apt[@]}" update
    # policy-rc.d: the package's postinst must not try to start Debian's own cluster.
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    "${apt[@]}" install -y --no-install-recommends postgresql >/dev/null
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    find_bin || { log "postgresql installed, but no initdb/pg_ctl under /usr/lib/postgresql"; exit 1; }
}

# PGBIN: the newest /usr/lib/postgresql/<version>/bin with the server (Debian's layout).
find_bin() {
    local bin
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
    [ -n "$bin" ] && [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] || return 1
    PGBIN="$bin"
}

# Run a command as the server's user, in a directory it can read.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        (cd / && runuser -u "$RUN_AS" -- "$@")
    else
        "$@"
    fi
}

# psql as the superuser, over the Unix socket in DIR.
psql_admin() {
    as_owner "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U "$RUN_AS" "$@"
}

ready() { as_owner "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 1 >/dev/null 2>&1; }

stop_server() {
    if [ -f "$DATA/postmaster.pid" ]; then
        as_owner "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null || true
    fi
}

case "${1:-}" in
--install) install_packages ;;
--stop)
    find_bin || exit 0
    stop_server
    exit 0
    ;;
"") find_bin || { log "PostgreSQL is not installed; run: $0 --install (as root)"; exit 1; } ;;
*)
    sed -n '2,21p' "$0" >&2
    exit 2
    ;;
esac

# ---------------------------------------------------------------------------------------------
# The data directory, made once
mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown "$RUN_AS:" "$DIR"
chmod 0700 "$DIR"
if [ ! -s "$DATA/PG_VERSION" ]; then
    log "initdb in $DATA"
    rm -rf "$DATA"
    as_owner "$PGBIN/initdb" -D "$DATA" -U "$RUN_AS" -E UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 >"$DIR/initdb.log" 2>&1 ||
        { log "initdb failed:"; tail -n 20 "$DIR/initdb.log" >&2; exit 1; }
fi

# ---------------------------------------------------------------------------------------------
# The server
if ! ready; then
    # A server of this directory that runs but does not answer on PORT (another port, or
    # stuck) is stopped first; pg_ctl removes a stale postmaster.pid by itself.
    if as_owner "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        log "restarting the server of $DATA (it does not answer on 127.0.0.1:$PORT)"
        stop_server
    fi
    log "starting PostgreSQL ($("$PGBIN/postgres" --version)) on 127.0.0.1:$PORT"
    # setsid: the server leaves this script's session, so nothing that ends ours ends it.
    if ! as_owner setsid -w "$PGBIN/pg_ctl" -D "$DATA" -l "$DIR/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories='$DIR' \
            -c fsync=off -c full_page_writes=off -c synchronous_commit=off \
            -c max_connections=200" start >/dev/null; then
        log "PostgreSQL did not start; the end of its log:"
        tail -n 20 "$DIR/postgres.log" >&2 || true
        exit 1
    fi
fi
for _ in $(seq 100); do
    ready && break
    sleep 0.1
done
if ! ready; then
    log "PostgreSQL does not answer on 127.0.0.1:$PORT; the end of its log:"
    tail -n 20 "$DIR/postgres.log" >&2 || true
    exit 1
fi
if [ ! -S "$DIR/.s.PGSQL.$PORT" ]; then
    log "another server answers on 127.0.0.1:$PORT, not the one of $DATA; stop it or choose" \
        "another port with GATEWAY_PG_PORT (and GATEWAY_TEST_POSTGRES_URL for the tests)"
    exit 1
fi

# ---------------------------------------------------------------------------------------------
# The tests' role and database (idempotent)
psql_admin -d postgres <<SQL
SELECT format('CREATE ROLE %I LOGIN CREATEDB PASSWORD %L', '$ROLE', '$PASSWORD')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') \gexec
ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
SELECT format('CREATE DATABASE %I OWNER %I', '$DATABASE', '$ROLE')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DATABASE') \gexec
SQL

echo "$URL" >"$DIR/url"
chmod 0644 "$DIR/url"
log "PostgreSQL is up: $URL (log: $DIR/postgres.log)"
echo "$URL"
