#!/usr/bin/env bash
# relayd's memory per concurrent session, and how much it gives back once the calls end.
#
#   scripts/bench-memory.sh [CALLS] [RATE] [HOLD_MS]   default 30000 calls, 1000/s, 45000 ms
#
# A sipp terminal places CALLS calls at RATE calls/s through a release relayd (the bench.sh
# configuration: digest on every INVITE, log level warn, in-dialog probes off) to a sipp
# application server, each held HOLD_MS: with CALLS/RATE < HOLD_MS/1000 every call is up at
# once when the last one is placed. relayd's resident memory (VmRSS) is sampled every second.
# It prints RSS at idle (registered, no call), at the peak, per concurrent session
# ((peak - idle) / CALLS), and 60 s after the last call ended, with its ratio to idle.
#
# Environment: AFTER_SECS (60) how long to wait after the last call before the last sample;
# SIPP_BUFFER, PIN, KEEP, RELAYD_BIN as in bench.sh. Needs sipp (Debian package sip-tester).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
ROOT=$(pwd)
SCENARIOS=$ROOT/crates/relayd/tests/scenarios
CALLS=${1:-30000}
RATE=${2:-1000}
HOLD_MS=${3:-45000}
AFTER_SECS=${AFTER_SECS:-60}

need_sipp_and_relayd bench-memory

start_work bench-memory relayd-memory
start_bench_relay

rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$RELAY_PID/status"; }
IDLE=$(rss_kb)

(cd "$WORK" && exec "${LOAD_CPUS[@]}" sipp "127.0.0.1:$RELAY_PORT" -sf "$SCENARIOS/uac_call.xml" -s echo \
    -inf "$WORK/users.csv" -au alice -ap alice-secret -i 127.0.0.1 -r "$RATE" -m "$CALLS" \
    -d "$HOLD_MS" -buff_size "$SIPP_BUFFER" -nostdin -trace_stat -stf "$WORK/uac.csv" -fd 1 \
    >/dev/null 2>"$WORK/uac.stderr") &
UAC_PID=$!
PIDS+=("$UAC_PID")
PEAK=$IDLE
PEAK_AT=0
RUN_TRACE=""
elapsed=0
while kill -0 "$UAC_PID" 2>/dev/null; do
    now=$(rss_kb)
    [ "$now" -gt "$PEAK" ] && PEAK=$now && PEAK_AT=$elapsed
    # Every 5 s: RSS and the live sessions, to see when the peak comes (all calls up, or
    # later, while ended calls' transactions linger).
    if ((elapsed % 5 == 0)); then
        RUN_TRACE="$RUN_TRACE ${elapsed}s:$((now / 1024))M/$(relay_metric sessions_live)"
    fi
    sleep 1
    elapsed=$((elapsed + 1))
done
wait "$UAC_PID" || true
OK=$(sipp_stat "$WORK/uac.csv" 'SuccessfulCall(C)')
FAILED=$(sipp_stat "$WORK/uac.csv" 'FailedCall(C)')
# RSS every 10 s after the last call, to see what is given back when.
TRACE=""
for ((t = 10; t <= AFTER_SECS; t += 10)); do
    sleep 10
    TRACE="$TRACE ${t}s:$(($(rss_kb) / 1024))M/$(relay_metric call_ids_routed)"
done
sleep $((AFTER_SECS % 10))
AFTER=$(rss_kb)

echo "calls: $CALLS at $RATE/s held ${HOLD_MS} ms: $OK completed, $FAILED failed"
echo "relayd RSS idle: $IDLE KiB"
echo "relayd RSS peak: $PEAK KiB, ${PEAK_AT} s after the first call"
echo "relayd RSS while calling (RSS/live sessions):$RUN_TRACE"
awk -v p="$PEAK" -v i="$IDLE" -v n="$CALLS" 'BEGIN { printf "per concurrent session: %.2f KiB\n", (p - i) / n }'
awk -v a="$AFTER" -v i="$IDLE" -v s="$AFTER_SECS" 'BEGIN { printf "relayd RSS %d s after the last call: %d KiB (%.2f x idle)\n", s, a, a / i }'
echo "relayd RSS after the last call (RSS/Call-IDs still routed):$TRACE"
echo "served-index keys (3 per session whose record is not yet committed): $(relay_metric served_index_entries)"
echo "machine: $PIN_NOTE"
