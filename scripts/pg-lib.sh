# A PostgreSQL server for the scripts (scripts/demo-cluster.sh, scripts/bench-cluster.sh):
# Debian's `postgresql` binaries (initdb, postgres) run in a directory of the script's own,
# on a free loopback port, as the `postgres` user when the script runs as root (the server
# refuses root). Sourced, not run; the caller owns WORK and PIDS (stopped by pid on exit).

# The newest /usr/lib/postgresql/<version>/bin with initdb and postgres, or $PG_BIN.
pg_bin_dir() {
    if [ -n "${PG_BIN:-}" ]; then
        echo "$PG_BIN"
        return
    fi
    local d best=""
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && best=$d
    done
    [ -n "$best" ] || return 1
    echo "$best"
}

# Starts PostgreSQL in $WORK/pg (synchronous_commit=on, fsync=on: what a billing relay
# needs), appends its pid to PIDS, and sets PG_PORT, PG_PID and PG_URL (database `relayd`,
# user `relayd`, trust authentication on loopback only). Exits naming the package when the
# binaries are missing.
start_postgres() {
    local bin as=()
    if ! bin=$(pg_bin_dir); then
        echo "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: install Debian's package postgresql (or set PG_BIN)" >&2
        exit 1
    fi
    mkdir -p "$WORK/pg"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$WORK/pg"
        # The server's user must reach its directory through WORK (mktemp makes it 0700).
        chmod o+x "$WORK"
        # setpriv execs the server itself (runuser would fork), so PG_PID is the server's.
        as=(setpriv --reuid=postgres --regid=postgres --init-groups)
    fi
    (cd "$WORK/pg" && "${as[@]}" env LC_ALL=C "$bin/initdb" -D "$WORK/pg/data" --auth=trust \
        --username=relayd --encoding=UTF8 --no-sync >"$WORK/pg/initdb.log" 2>&1) || {
        echo "initdb failed:" >&2
        tail -5 "$WORK/pg/initdb.log" >&2
        exit 1
    }
    PG_PORT=$(free_port)
    (cd "$WORK/pg" && exec "${as[@]}" "$bin/postgres" -D "$WORK/pg/data" -p "$PG_PORT" \
        -c listen_addresses=127.0.0.1 -c unix_socket_directories= \
        -c synchronous_commit=on -c fsync=on -c max_connections=100 \
        >"$WORK/pg/postgres.log" 2>&1) &
    PG_PID=$!
    PIDS+=("$PG_PID")
    local i
    for i in $(seq 1 300); do
        if grep -q "ready to accept connections" "$WORK/pg/postgres.log" 2>/dev/null; then
            break
        fi
        if ! kill -0 "$PG_PID" 2>/dev/null; then
            echo "PostgreSQL did not start:" >&2
            tail -5 "$WORK/pg/postgres.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    grep -q "ready to accept connections" "$WORK/pg/postgres.log" || {
        echo "PostgreSQL not ready after 30 s" >&2
        exit 1
    }
    "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U relayd relayd
    PG_URL="postgres://relayd@127.0.0.1:$PG_PORT/relayd"
}

# CPU ticks (user + system) of the PostgreSQL server and all its backends so far (its
# direct children: bench-lib.sh's tree_ticks).
postgres_ticks() { tree_ticks "$PG_PID"; }
