#!/usr/bin/env bash
# relayd call-rate benchmark: sipp terminals calling a sipp application server through a
# release relayd on loopback, at increasing call rates.
#
#   scripts/bench.sh [RATE...]      default rates: 50 100 200 400 800 1600 3200 (calls/s)
#
# Each call is the full service delivery a terminal sees: INVITE, 407, ACK, INVITE with
# digest, the relay's inquiry of the server (100/180/200), 200, ACK, a short hold, BYE,
# 200, and a session record committed (SQLite, synchronous=FULL) before the 200 to the
# BYE. alice registers once before the runs. For each rate it prints the calls placed,
# completed, failed and billed (session records written), the rate achieved, and the
# call-setup time (first INVITE to the 200, challenge round trip included) at p50, p99,
# mean and max, from the terminal's message trace, and relayd's CPU time per call; then
# the highest rate at which every call completed and was billed, and the highest of those
# it kept pace with (achieved at least 95 % of it). It stops at the first rate where a
# call failed or went unbilled.
#
# Environment: SECONDS_PER_RATE (5) calls are placed for that long at each rate;
# HOLD_MS (100) how long each call is held; PIN=1 runs relayd on CPU 0 and sipp on the
# other CPUs (default 0: all share); SIPP_BUFFER (4194304) sipp's socket buffers; KEEP=1
# keeps the work directory (logs, sipp statistics) and says where it is; RELAYD_BIN runs that
# relayd binary instead of building this tree's (an older build, to compare). Needs sipp
# (Debian package `sip-tester`).
#
# Everything it starts (relayd, sipp) is stopped by pid on exit, also on failure or ^C.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
ROOT=$(pwd)
SCENARIOS=$ROOT/crates/relayd/tests/scenarios

RATES=("$@")
if [ ${#RATES[@]} -eq 0 ]; then RATES=(50 100 200 400 800 1600 3200); fi
SECONDS_PER_RATE=${SECONDS_PER_RATE:-5}
HOLD_MS=${HOLD_MS:-100}

need_sipp_and_relayd bench

start_work bench relayd-bench
start_bench_relay




# Session records in the billing store so far.
records() {
    "$RELAYD" --config "$WORK/relayd.toml" billing export --format csv | tail -n +2 | wc -l
}

run_rates bench "$RELAY_PORT" "$RELAY_PID" "$WORK/relayd.log"

RSS=$(awk '/VmHWM/ { h = $2 " " $3 } /VmRSS/ { r = $2 " " $3 } END { print h " (now " r ")" }' "/proc/$RELAY_PID/status" 2>/dev/null || echo "?")
echo
echo "highest rate with every call completed and billed: $BEST calls/s"
echo "highest such rate kept pace with (achieved >= 95 % of it): $KEPT calls/s"
echo "highest such rate with no retransmission and p99 setup <= 200 ms: $STRICT calls/s"
echo "relayd peak RSS: $RSS"
echo "call setup: first INVITE sent to the 200 received (407 round trip and inquiry"
echo "included), from the terminal's message trace, microsecond timestamps"
echo "machine: $PIN_NOTE"
