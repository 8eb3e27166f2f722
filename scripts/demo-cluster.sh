#!/usr/bin/env bash
# Several relays as one service (issue 15): one PostgreSQL, two relays (A and B) sharing it,
# one application-server agent registered with A only, and a terminal (sip-client) that
# registers with A and calls through B. B is killed (SIGKILL) in the middle of the call: A
# closes the session B left open and bills it, end cause relay-lost, once B's lease ran out.
# The bill is shown from A.
#
#   scripts/demo-cluster.sh            release build, then the walk-through
#   scripts/demo-cluster.sh --debug    a debug build (quicker to build)
#   scripts/demo-cluster.sh --keep     keep the working directory (configs, logs, database)
#
# Needs Rust (cargo) and PostgreSQL's server binaries (Debian's package `postgresql`); run as
# root, the database server runs as the `postgres` user. Everything listens on free loopback
# ports; everything it starts is stopped by pid on exit, also when a step fails or on Ctrl-C.
# Exit status 0 when every step did what it said, 1 when one did not, 2 for a usage error.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROFILE=release
KEEP=0
for arg in "$@"; do
    case "$arg" in
        --debug) PROFILE=debug ;;
        --keep) KEEP=1 ;;
        -h | --help)
            sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "demo-cluster: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
# shellcheck source=scripts/pg-lib.sh
. "$ROOT/scripts/pg-lib.sh"

STEP_TIMEOUT=30 # seconds any one wait may take
LEASE=6         # [storage] lease_secs of both relays
TOUCH=2         # [billing] touch_interval_secs: each touch renews a relay's lease

say() { printf '%s\n' "$*"; }
heading() { printf '\n== %s\n' "$*"; }
shows() { printf '   $ %s\n' "$*"; }
indent() { sed 's/^/   | /'; }
ok() { printf '   ok: %s\n' "$*"; }
fail() {
    printf '\n   FAILED: %s\n' "$*" >&2
    local log
    for log in relay-a.log relay-b.log agent.log call.err; do
        if [[ -s "$WORK/$log" ]]; then
            printf '\n   --- last lines of %s:\n' "$log" >&2
            tail -n 15 "$WORK/$log" | sed 's/^/   | /' >&2
        fi
    done
    KEEP=1
    exit 1
}
# wait_for SECONDS WHAT CMD...: polls CMD until it succeeds; fails the demo after SECONDS.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || fail "$what: not done within ${seconds} s"
        sleep 0.2
    done
}
alive() { kill -0 "$1" 2>/dev/null; }
# metrics PORT: a relay's Prometheus text, over bash's /dev/tcp.
metrics() {
    (
        exec 5<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&5
        cat <&5
    ) 2>/dev/null
}
# server_up METRICS-PORT: that relay lists the agent's clock service as up.
server_up() { metrics "$1" | grep -qF "relayd_server_up{service=\"clock\",server=\"$AGENT_URI\"} 1"; }

heading "Two relays, one database: a terminal registered with one relay calls through the other"
command -v cargo >/dev/null 2>&1 || {
    echo "demo-cluster: cargo is not installed (https://rustup.rs)" >&2
    exit 1
}
pg_bin_dir >/dev/null || {
    echo "demo-cluster: PostgreSQL not found: install Debian's package postgresql" >&2
    exit 1
}
BUILD=(cargo build --quiet -p relayd -p appsrv-agent -p sip-client)
[[ $PROFILE == release ]] && BUILD+=(--release)
shows "${BUILD[*]}"
(cd "$ROOT" && "${BUILD[@]}") || fail "the build failed"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
RELAYD=$BIN/relayd # started by start_bench_relayd

start_work demo-cluster relay-demo-cluster
if [[ $KEEP -eq 1 ]]; then export KEEP; fi
unset RUST_LOG
export NO_COLOR=1

heading "PostgreSQL: the one database both relays share"
start_postgres
ok "PostgreSQL on 127.0.0.1:$PG_PORT (synchronous_commit=on), database relayd"

PORT_A=$(free_port)
PORT_B=$(free_port)
METRICS_A=$(free_port)
METRICS_B=$(free_port)
AGENT_PORT=$(free_port)
DATA_PORT=$(free_port)
AGENT_URI="sip:as1@127.0.0.1:$AGENT_PORT"
for node in a b; do
    port_var=PORT_${node^^}
    metrics_var=METRICS_${node^^}
    cat >"$WORK/relay-$node.toml" <<TOML
[listen]
udp = "127.0.0.1:${!port_var}"
tcp = "127.0.0.1:${!port_var}"

[relay]
realm = "relay.test"

[storage]
data_dir = "$WORK/data-$node"
backend = "postgres"
url = "$PG_URL"
node = "relay-$node"
lease_secs = $LEASE

[billing]
touch_interval_secs = $TOUCH

[metrics]
listen = "127.0.0.1:${!metrics_var}"

[directory]
probe_interval_secs = 2

[[services]]
name = "clock"
description = "Sends the time once a second"

[[users]]
name = "alice"
password = "alice-secret"
plan = "basic"
services = ["clock"]

[[server_accounts]]
name = "as1"
password = "as1-secret"
services = ["*"]

[[tariffs]]
name = "default"
rate = 2
currency = "EUR"
TOML
done
cat >"$WORK/agent.toml" <<TOML
[relay]
uri = "sip:127.0.0.1:$PORT_A"
domain = "relay.test"
account = "as1"
password = "as1-secret"
# B may send inquiries too: the agent accepts them as the relay's.
others = ["sip:127.0.0.1:$PORT_B"]

[sip]
listen = "127.0.0.1:$AGENT_PORT"

[data]
listen = "127.0.0.1:$DATA_PORT"

[[services]]
name = "clock"
backend = "builtin:clock"
TOML

heading "Relays A and B, and an application server registered with A only"
say "Both relays have [storage] backend = \"postgres\", the same url, and a node name each;"
say "what one learns (registrations, servers, their health) it writes to the database and"
say "the other hears of it (LISTEN/NOTIFY). Each holds a lease on the sessions it journals,"
say "renewed every $TOUCH s; $LEASE s after a relay's last renewal another may bill its sessions."
for node in a b; do
    shows "relayd --config relay-$node.toml"
    start_bench_relayd "$WORK/relay-$node.toml" "$WORK/relay-$node.log"
    declare "PID_${node^^}=$STARTED_PID"
done
shows "appsrv-agent --config agent.toml      # registers with A; relay.others names B"
"$BIN/appsrv-agent" --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1 </dev/null &
AGENT_PID=$!
PIDS+=("$AGENT_PID")
wait_for "$STEP_TIMEOUT" "relay A listing the agent's clock service as up" server_up "$METRICS_A"
ok "A lists $AGENT_URI for clock (it registered there)"
wait_for "$STEP_TIMEOUT" "relay B learning of the agent from the database" server_up "$METRICS_B"
ok "B lists it too, though the agent never spoke to B"

heading "The terminal registers with A, then calls through B"
export SIP_CLIENT_CONFIG="$WORK/sip-client.toml" SIP_CLIENT_DOMAIN=relay.test SIP_CLIENT_PASSWORD=alice-secret
: >"$SIP_CLIENT_CONFIG"
shows "sip-client -u alice -r sip:127.0.0.1:$PORT_A register --once"
(cd "$WORK" && "$BIN/sip-client" -u alice -r "sip:127.0.0.1:$PORT_A" register --once) \
    >"$WORK/register.out" 2>"$WORK/register.err" </dev/null || {
    indent <"$WORK/register.err"
    fail "alice could not register with A"
}
indent <"$WORK/register.err"
mkfifo "$WORK/call.in"
exec 3<>"$WORK/call.in" # held open: the call's input never ends by itself
shows "sip-client -u alice -r sip:127.0.0.1:$PORT_B call clock --no-register"
(cd "$WORK" && exec "$BIN/sip-client" -u alice -r "sip:127.0.0.1:$PORT_B" \
    --events-file "$WORK/call.events" call clock --no-register) \
    <"$WORK/call.in" >"$WORK/call.out" 2>"$WORK/call.err" &
CALL_PID=$!
PIDS+=("$CALL_PID")
# ticks N: the clock sent at least N lines (one a second).
ticks() { [[ -f "$WORK/call.out" && $(wc -l <"$WORK/call.out") -ge $1 ]]; }
ticking() { ticks 2; }
wait_for "$STEP_TIMEOUT" "the clock service's first ticks" ticking
CALL_ID=$(grep -o '"call_id":"[^"]*"' "$WORK/call.events" | head -n 1 | cut -d'"' -f4)
indent <"$WORK/call.err"
say "   what the clock sends:"
head -n 2 "$WORK/call.out" | indent
ok "B admitted alice on A's registration and reached the agent A knows (Call-ID $CALL_ID)"

heading "Relay B dies in the middle of the call"
say "A few seconds in (B renews its lease meanwhile, so the session is seen alive):"
wait_for "$STEP_TIMEOUT" "the clock's sixth tick" ticks 6
shows "kill -KILL $PID_B"
kill -KILL "$PID_B"
wait "$PID_B" 2>/dev/null || true
killed_at=$SECONDS
say "B journaled the session in the database when it started and renewed its lease every"
say "$TOUCH s; nobody renews it now. A claims sessions whose lease ran out ($LEASE s) and bills"
say "each up to the last time B was seen alive, once."
lost() {
    "$RELAYD" --config "$WORK/relay-a.toml" billing export --format jsonl 2>/dev/null |
        grep -F "\"$CALL_ID\"" | grep -q relay-lost
}
wait_for $((LEASE + 4 * TOUCH + STEP_TIMEOUT)) "relay A billing B's session" lost
ok "A billed the session $((SECONDS - killed_at)) s after B died:"
"$RELAYD" --config "$WORK/relay-a.toml" billing export --format jsonl | grep -F "\"$CALL_ID\"" | indent
kill -TERM "$CALL_PID" 2>/dev/null || true

heading "The bill, from relay A (B's records are A's too: one database)"
shows "relayd --config relay-a.toml billing report"
"$RELAYD" --config "$WORK/relay-a.toml" billing report | indent
say ""
say "Everything started here is stopped now."
