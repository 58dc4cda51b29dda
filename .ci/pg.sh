#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests, on loopback, in a temporary data directory.
#   .ci/pg.sh start   → prints "export DORA_TUNE_TEST_PG_URL=postgresql+psycopg://…" (eval it); the server runs on
#   .ci/pg.sh stop DIR    stop it and delete DIR (the directory printed as DORA_TUNE_TEST_PG_DIR)
#   .ci/pg.sh halt DIR    stop it at once (as a crash would), keeping its data; .ci/pg.sh resume DIR starts it again
# Uses the machine's PostgreSQL binaries (pg_ctl/initdb on PATH or under /usr/lib/postgresql/*/bin). As root, the
# server runs as the "postgres" user (initdb refuses root). Exits 1 with a message when no server can be started.
set -euo pipefail

find_bin() {
    local name=$1 found
    found=$(command -v "$name" 2>/dev/null || true)
    if [ -z "$found" ]; then
        found=$(ls -d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    [ -n "$found" ] || { echo "pg.sh: no $name (install PostgreSQL's server binaries)" >&2; exit 1; }
    echo "$found"
}

as_owner() {  # run a command as the data directory's owner
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

case "${1:-}" in
start)
    initdb=$(find_bin initdb)
    pg_ctl=$(find_bin pg_ctl)
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        echo "pg.sh: running as root and there is no 'postgres' user to run the server as" >&2
        exit 1
    fi
    dir=$(mktemp -d /tmp/dora-tune-pg.XXXXXX)
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$initdb" -D "$dir/data" -U dora --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" start >/dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    echo "export DORA_TUNE_TEST_PG_URL=postgresql+psycopg://dora@127.0.0.1:$port/postgres"
    echo "export DORA_TUNE_TEST_PG_DIR=$dir"
    ;;
halt)
    dir=${2:?usage: pg.sh halt DIR}
    as_owner "$(find_bin pg_ctl)" -D "$dir/data" -m immediate -w stop >/dev/null
    ;;
resume)
    dir=${2:?usage: pg.sh resume DIR}
    port=$(cat "$dir/port")
    as_owner "$(find_bin pg_ctl)" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" start >/dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    ;;
stop)
    dir=${2:?usage: pg.sh stop DIR}
    pg_ctl=$(find_bin pg_ctl)
    as_owner "$pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start | stop DIR | halt DIR | resume DIR" >&2
    exit 2
    ;;
esac
