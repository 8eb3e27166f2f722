#!/usr/bin/env bash
# Two relays on one PostgreSQL against one relay on SQLite, on the same load (issue 15):
# sipp terminals calling a sipp application server through release relayd builds on
# loopback, at increasing call rates.
#
#   scripts/bench-cluster.sh [RATE...]      default rates: 100 200 400 800 1600 (calls/s)
#
# First one relay with its SQLite store (the default configuration) takes each rate from
# one sipp terminal; then two relays, A and B, sharing one PostgreSQL database (`[storage]
# backend = "postgres"`, synchronous_commit=on, fsync=on) take it from two terminals, half
# each. alice registers once, through the first relay (so B admits calls from a
# registration it learnt from the database). Every call is the full delivery of
# scripts/bench.sh (challenge, inquiry, 200, ACK, hold, BYE, a session record committed
# before the 200 to the BYE). For each rate it prints the calls completed, failed and
# billed (records in the shared store), the rate achieved, the call-setup percentiles, and
# the CPU time per call of everything serving it: the relay, or both relays and every
# PostgreSQL process. All share this machine's CPUs with the load generator.
#
# Environment: as scripts/bench.sh (SECONDS_PER_RATE, HOLD_MS, PIN, SIPP_BUFFER, KEEP,
# RELAYD_BIN). Needs sipp (Debian package `sip-tester`) and PostgreSQL (Debian package
# `postgresql`). Everything it starts is stopped by pid on exit, also on failure or ^C.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
# shellcheck source=scripts/pg-lib.sh
. scripts/pg-lib.sh
ROOT=$(pwd)
SCENARIOS=$ROOT/crates/relayd/tests/scenarios

RATES=("$@")
if [ ${#RATES[@]} -eq 0 ]; then RATES=(100 200 400 800 1600); fi
SECONDS_PER_RATE=${SECONDS_PER_RATE:-5}
HOLD_MS=${HOLD_MS:-100}

need_sipp_and_relayd bench-cluster

start_work bench-cluster relayd-bench-cluster

echo "== one relay, SQLite"
start_bench_relay
records() {
    "$RELAYD" --config "$WORK/relayd.toml" billing export --format csv | tail -n +2 | wc -l
}
run_rates bench-cluster "$RELAY_PORT" "$RELAY_PID" "$WORK/relayd.log"
SINGLE_BEST=$BEST
SINGLE_KEPT=$KEPT
kill "$RELAY_PID"
wait "$RELAY_PID" 2>/dev/null || true

echo
echo "== two relays, one PostgreSQL"
start_postgres
extra_ticks() { postgres_ticks; }
PORT_A=$(free_port)
PORT_B=$(free_port)
for node in a b; do
    port_var=PORT_${node^^}
    write_bench_config "$WORK/relayd-$node.toml" "${!port_var}" "$(free_port)" \
        "data_dir = \"$WORK/data-$node\"
backend = \"postgres\"
url = \"$PG_URL\"
node = \"relay-$node\""
done
start_bench_relayd "$WORK/relayd-a.toml" "$WORK/relayd-a.log"
PID_A=$STARTED_PID
register_alice "$PORT_A" "$WORK/relayd-a.log"
start_bench_relayd "$WORK/relayd-b.toml" "$WORK/relayd-b.log"
PID_B=$STARTED_PID
records() {
    "$RELAYD" --config "$WORK/relayd-b.toml" billing export --format csv | tail -n +2 | wc -l
}
# B is ready once it answers; an OPTIONS from sipp would need a scenario: wait for its port.
for _ in $(seq 1 100); do
    if ss -Hlun "sport = :$PORT_B" | grep -q .; then break; fi
    sleep 0.1
done
run_rates bench-cluster "$PORT_A $PORT_B" "$PID_A $PID_B" "$WORK/relayd-b.log"

echo
echo "one relay on SQLite: every call completed and billed up to $SINGLE_BEST calls/s (kept pace up to $SINGLE_KEPT)"
echo "two relays on one PostgreSQL: up to $BEST calls/s (kept pace up to $KEPT)"
echo "cpu/call: the relay's CPU per completed call; for two relays, both relays' and every"
echo "PostgreSQL process's together"
echo "machine: $PIN_NOTE"
