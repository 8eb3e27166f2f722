# Shell functions shared by the sipp load benchmarks (scripts/bench.sh for relayd,
# scripts/bench-kamailio.sh for Kamailio), so both compute their figures the same way.
# Sourced, not run.

# The socket buffers of the sipp terminal and server (sipp's -buff_size; the kernel caps it at
# net.core.rmem_max): with sipp's 64 KiB default the load generator itself drops datagrams
# in bursts, and the retransmissions that follow measure sipp, not the server under test.
SIPP_BUFFER=${SIPP_BUFFER:-4194304}

# PIN=1 runs the server under test on CPU 0 alone and the sipp terminal and server on the
# others (taskset); PIN=0 (the default) lets all of them share every CPU. Both benchmarks pin
# the same way. On a 2-CPU machine pinning gives the load generator a single core, which
# tops out near 3000 calls/s with its message trace on: a server faster than that measures
# sipp, so the default shares.
PIN=${PIN:-0}
if [ "$PIN" = 1 ] && { [ "$(nproc)" -lt 2 ] || ! command -v taskset >/dev/null 2>&1; }; then
    echo "PIN=1 needs two CPUs and taskset; sharing the CPUs instead" >&2
    PIN=0
fi
if [ "$PIN" = 1 ]; then
    SERVER_CPUS=(taskset -c 0)
    LOAD_CPUS=(taskset -c "1-$(($(nproc) - 1))")
    PIN_NOTE="server on CPU 0 alone, sipp on CPU 1-$(($(nproc) - 1)) (PIN=0 to share)"
else
    SERVER_CPUS=()
    LOAD_CPUS=()
    PIN_NOTE="$(nproc) CPU(s) shared by the server and both sipps (PIN=1 to separate)"
fi

# Checks that sipp is installed ($1 names the script in what it says), and sets RELAYD: the
# binary in RELAYD_BIN, else a release build of this tree (built now, into
# ${CARGO_TARGET_DIR:-target}/release).
need_sipp_and_relayd() {
    if ! command -v sipp >/dev/null 2>&1; then
        echo "$1: sipp not found; install the Debian package sip-tester" >&2
        exit 1
    fi
    if [ -n "${RELAYD_BIN:-}" ]; then
        RELAYD=$RELAYD_BIN
    else
        echo "building relayd (release)..." >&2
        cargo build --release --quiet -p relayd
        RELAYD=${CARGO_TARGET_DIR:-$ROOT/target}/release/relayd
    fi
}

# Creates the work directory WORK (named after $2) and PIDS, the processes to stop; on exit,
# also on failure or ^C, stops them by pid and removes WORK unless KEEP=1 ($1 names the
# script in what it says).
start_work() {
    BENCH_NAME=$1
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$2.XXXXXX")
    PIDS=()
    trap cleanup_work EXIT
    trap 'exit 130' INT TERM
}

cleanup_work() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "$BENCH_NAME: work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}

# A loopback port free for UDP and TCP (asks the kernel; python3 if there, else a guess).
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 - <<'EOF'
import socket
while True:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        t.close(); u.close()
    print(port); break
EOF
    else
        echo $((20000 + RANDOM % 20000))
    fi
}

# Column $2 of the last line of a sipp statistics file, by header name.
sipp_stat() {
    awk -F';' -v col="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
        NF > 1 { v = $c } END { print (v == "" ? 0 : v) }' "$1"
}

# How the sipp terminal traces its messages for the call-setup times: `short` (the default,
# sipp's -trace_shortmsg: one line per message, microsecond timestamps) or `full`
# (-trace_msg: every message whole). Both cost sipp about the same CPU per call (measured
# 142 and 152 us at 2400 calls/s, within the noise); the short trace is a tenth of the disk.
SIPP_TRACE=${SIPP_TRACE:-short}

# Call-setup times (ms), one per call, from the terminal's message trace ($1, in the
# SIPP_TRACE format): from the first INVITE sent (CSeq 1) to the 200 received for the
# authenticated INVITE (CSeq 2). Both traces are stamped in microseconds; sipp's own
# response-time counters (rtd="setup" in the scenario) read a coarse clock that ticks every
# 4 ms on a 250 Hz kernel, too coarse here.
setup_times() {
    if [ "$SIPP_TRACE" = short ]; then
        # date, time, epoch seconds, S(ent)/R(eceived), Call-ID, "CSeq:N METHOD", first line
        awk -F'\t' '
            $4 == "S" && $6 == "CSeq:1 INVITE" && $7 ~ /^INVITE / && !($5 in t0) { t0[$5] = $3 }
            $4 == "R" && $6 == "CSeq:2 INVITE" && $7 ~ /^SIP\/2\.0 200/ && ($5 in t0) && !($5 in t1) { t1[$5] = $3 }
            END { for (c in t1) printf "%.3f\n", (t1[c] - t0[c]) * 1000 }' "$1"
        return
    fi
    awk '
        function flush() {
            if (first == "") return
            if (dir == "out" && first ~ /^INVITE / && cseq == "1 INVITE" && !(cid in t0)) t0[cid] = ts
            if (dir == "in" && first ~ /^SIP\/2\.0 200/ && cseq == "2 INVITE" && (cid in t0) && !(cid in t1)) t1[cid] = ts
            first = ""
        }
        { sub(/\r$/, "") }
        /^-----------+ [0-9]+-[0-9]+-[0-9]+ [0-9:.]+$/ {
            flush(); split($3, t, ":"); ts = t[1] * 3600 + t[2] * 60 + t[3]
            state = "kind"; next
        }
        state == "kind" { dir = ($0 ~ / sent /) ? "out" : "in"; state = "gap"; next }
        state == "gap" { state = "start"; next }
        state == "start" { first = $0; cid = ""; cseq = ""; state = "headers"; next }
        state == "headers" && /^Call-ID:/ { cid = $2 }
        state == "headers" && /^CSeq:/ { cseq = $2 " " $3 }
        END {
            flush()
            for (c in t1) { d = t1[c] - t0[c]; if (d < 0) d += 86400; printf "%.3f\n", d * 1000 }
        }' "$1"
}

# sipp's options for the terminal's message trace, written to $1.
trace_options() {
    if [ "$SIPP_TRACE" = short ]; then
        echo "-trace_shortmsg -shortmessage_file $1"
    else
        echo "-trace_msg -message_file $1"
    fi
}

# CPU time (clock ticks, user + system) used so far by process $1 and its direct children:
# relayd is one process, Kamailio a main process with its workers.
tree_ticks() {
    local pid total=0 t
    for pid in "$1" $(pgrep -P "$1" || true); do
        t=$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

# p50, p99, mean and max of numbers on standard input.
summary() {
    sort -g | awk '
        { v[NR] = $1; sum += $1 }
        END {
            if (NR == 0) { print "- - - -"; exit }
            i50 = int(NR * 0.50 + 0.999999); i99 = int(NR * 0.99 + 0.999999)
            printf "%.2f %.2f %.2f %.2f\n", v[i50], v[i99], sum / NR, v[NR]
        }'
}

# Warm-up before the measured rates: WARMUP_SECONDS (10) of calls at half the first rate,
# not counted, so that neither server is measured while it first faults in its memory pools
# or fills its caches (Kamailio's first rate ran at a p50 of 60-350 ms without it, and
# relayd's at a higher CPU per call). 0 skips it.
WARMUP_SECONDS=${WARMUP_SECONDS:-10}

warm_up() {
    local port=$1 rate calls dir="$WORK/warm-up"
    [ "$WARMUP_SECONDS" -gt 0 ] || return 0
    rate=$(( ${RATES[0]} / 2 > 0 ? ${RATES[0]} / 2 : 1 ))
    calls=$((rate * WARMUP_SECONDS))
    mkdir -p "$dir"
    (cd "$dir" && exec "${LOAD_CPUS[@]}" timeout -k 5 "$((WARMUP_SECONDS + 60))" \
        sipp "127.0.0.1:$port" -sf "$SCENARIOS/uac_bench.xml" -buff_size "$SIPP_BUFFER" \
        -inf "$WORK/users.csv" -au alice -ap alice-secret -s echo -i 127.0.0.1 \
        -r "$rate" -m "$calls" -d "$HOLD_MS" -l 20000 -nostdin \
        -trace_stat -stf "$dir/stats.csv" -fd 1 \
        -timeout "$((WARMUP_SECONDS + 30))s" >"$dir/screen.txt" 2>&1) &
    local pid=$!
    PIDS+=("$pid")
    wait "$pid" || true
    echo "warm-up (not counted): $calls calls at $rate/s, $(sipp_stat "$dir/stats.csv" 'SuccessfulCall(C)') completed"
}

# The sipp terminal runs under time(1) (-f "%U %S": its user and system CPU seconds), so
# that the load generator's own CPU per call can be printed beside the server's.
if [ ! -x /usr/bin/time ]; then
    echo "bench: /usr/bin/time not found (Debian package time): load/call counts the sipp server only" >&2
fi

# Drives the sipp terminal (uac_bench.xml, alice registered) at each of RATES against
# 127.0.0.1:$2 and prints a row per rate: calls completed, failed and billed (by the
# caller's `records` function), the rate achieved, and call-setup percentiles. $2 may name
# several ports ("5060 5070", several relays serving as one): each gets its own sipp
# terminal at an equal share of the rate, and the row counts them together. $3 names the
# process(es) under test, whose CPU time is counted per call (with the caller's
# `extra_ticks`, when it defines one: a database server's, say). Stops at the first rate
# with a failed or unbilled call, or when a process under test dies, showing the tail of
# log $4. Uses RATES, SECONDS_PER_RATE, HOLD_MS, WORK, SCENARIOS, PIDS and UAS_PID (the sipp
# application server) of the caller; sets BEST (the highest clean rate), BEST_ROW (its
# percentiles) and KEPT (the highest clean rate the server kept pace with: achieved at
# least 95 % of it, the rest being the last calls' hold time; above it calls queue and
# setup times grow), and STRICT (issue 13's criterion: the highest clean rate at which the
# sipp terminal also retransmitted nothing and the p99 setup time was at most 200 ms).
run_rates() {
    local name=$1 log=$4
    local -a ports targets
    read -r -a ports <<<"$2"
    read -r -a targets <<<"$3"
    local row='%8s %6s %9s %6s %6s %9s %7s %7s %7s %7s %8s %9s %8s\n'
    local hz
    hz=$(getconf CLK_TCK)
    # shellcheck disable=SC2059
    printf "$row" "rate" "calls" "completed" "failed" "billed" "achieved" "p50 ms" "p99 ms" "mean ms" "max ms" "cpu/call" "load/call" "retrans"
    BEST=0
    BEST_ROW=""
    KEPT=0
    STRICT=0
    local port
    for port in "${ports[@]}"; do
        warm_up "$port"
    done
    local billed_before
    billed_before=$(records)
    local RATE
    for RATE in "${RATES[@]}"; do
        local n=${#ports[@]}
        local share=$(((RATE + n - 1) / n))
        local calls=$((share * SECONDS_PER_RATE * n)) dir="$WORK/rate-$RATE" start end rc=0
        mkdir -p "$dir"
        start=$(date +%s.%N)
        local ticks_before uas_before
        ticks_before=$(target_ticks "${targets[@]}")
        uas_before=$(tree_ticks "$UAS_PID")
        # sipp's own -timeout does not always end it when calls are stuck (seen at 3200/s, a
        # sipp left waiting for ten minutes): timeout(1) bounds it, and exits 124 if it had to.
        local -a uacs=()
        local k=0
        for port in "${ports[@]}"; do
            local timed=()
            [ ! -x /usr/bin/time ] || timed=(/usr/bin/time -f "%U %S" -o "$dir/uac-$k.time")
            (cd "$dir" && exec "${LOAD_CPUS[@]}" "${timed[@]}" timeout -k 5 "$((SECONDS_PER_RATE + 60))" \
                sipp "127.0.0.1:$port" -sf "$SCENARIOS/uac_bench.xml" -buff_size "$SIPP_BUFFER" \
                -inf "$WORK/users.csv" -au alice -ap alice-secret -s echo -i 127.0.0.1 \
                -r "$share" -m "$((share * SECONDS_PER_RATE))" -d "$HOLD_MS" -l 20000 -nostdin \
                -trace_stat -stf "$dir/stats-$k.csv" -fd 1 $(trace_options "$dir/messages-$k.log") \
                -trace_err -error_file "$dir/errors-$k.log" \
                -timeout "$((SECONDS_PER_RATE + 30))s" >"$dir/screen-$k.txt" 2>&1) &
            uacs+=($!)
            PIDS+=($!)
            k=$((k + 1))
        done
        local uac
        for uac in "${uacs[@]}"; do
            wait "$uac" || rc=$?
        done
        end=$(date +%s.%N)
        local ticks_after uas_after cpu load
        ticks_after=$(target_ticks "${targets[@]}")
        uas_after=$(tree_ticks "$UAS_PID")
        local ok=0 failed=0 retrans=0 billed_now billed achieved p50 p99 mean max uac_cpu=0 f
        for f in "$dir"/stats-*.csv; do
            ok=$((ok + $(sipp_stat "$f" 'SuccessfulCall(C)')))
            failed=$((failed + $(sipp_stat "$f" 'FailedCall(C)')))
            # Requests the terminal had to send again: the server (or the path to it) lost or
            # delayed something.
            retrans=$((retrans + $(sipp_stat "$f" 'Retransmissions(C)')))
        done
        for f in "$dir"/uac-*.time; do
            [ -e "$f" ] || continue
            uac_cpu=$(awk -v u="$uac_cpu" '{ u += $1 + $2 } END { print u }' "$f")
        done
        billed_now=$(records)
        billed=$((billed_now - billed_before))
        billed_before=$billed_now
        achieved=$(awk -v n="$ok" -v a="$start" -v b="$end" 'BEGIN { printf "%.0f/s", n / (b - a) }')
        read -r p50 p99 mean max <<<"$(for f in "$dir"/messages-*.log; do setup_times "$f"; done | summary)"
        # CPU time the server(s) under test spent per completed call (all of it counted, the
        # tail of the previous rate's calls included), in microseconds.
        cpu=$(awk -v t="$((ticks_after - ticks_before))" -v hz="$hz" -v n="$ok" \
            'BEGIN { if (n > 0) printf "%.0fus", t * 1e6 / hz / n; else print "-" }')
        # CPU time the load generator (the sipp terminals and the sipp server) spent per
        # completed call: on a shared machine, what it takes is not left to the server.
        load=$(awk -v t="$((uas_after - uas_before))" -v hz="$hz" -v n="$ok" -v u="$uac_cpu" \
            'BEGIN { if (n > 0) printf "%.0fus", (t / hz + u) * 1e6 / n; else print "-" }')
        [ "${KEEP:-0}" = 1 ] || rm -f "$dir"/messages-*.log
        # shellcheck disable=SC2059
        printf "$row" "$RATE/s" "$calls" "$ok" "$failed" "$billed" "$achieved" "$p50" "$p99" "$mean" "$max" "$cpu" "$load" "$retrans"
        local target
        for target in "${targets[@]}"; do
            if ! kill -0 "$target" 2>/dev/null; then
                echo "$name: a server under test (pid $target) died; log tail:" >&2
                tail -20 "$log" >&2
                exit 1
            fi
        done
        if [ "$rc" -ne 0 ] || [ "$failed" -ne 0 ] || [ "$ok" -ne "$calls" ]; then
            echo "$name: failed calls at $RATE calls/s (sipp exit $rc); first errors:" >&2
            cat "$dir"/errors-*.log 2>/dev/null | grep -m 3 -E 'Aborting|Failed|timeout|Timeout' | cut -c1-200 >&2 || true
            break
        fi
        if [ "$billed" -ne "$ok" ]; then
            echo "$name: at $RATE calls/s, $((ok - billed)) completed calls were not billed" >&2
            break
        fi
        BEST=$RATE
        BEST_ROW="p50 $p50 ms, p99 $p99 ms"
        if awk -v n="$ok" -v a="$start" -v b="$end" -v r="$RATE" 'BEGIN { exit !(n / (b - a) >= 0.95 * r) }'; then
            KEPT=$RATE
        fi
        if [ "$retrans" -eq 0 ] && awk -v p="$p99" 'BEGIN { exit !(p != "" && p + 0 <= 200) }'; then
            STRICT=$RATE
        fi
    done
}

# CPU ticks of the processes under test (each with its direct children), plus the caller's
# `extra_ticks` when it defines one.
target_ticks() {
    local pid total=0
    for pid in "$@"; do
        total=$((total + $(tree_ticks "$pid")))
    done
    if declare -F extra_ticks >/dev/null; then
        total=$((total + $(extra_ticks)))
    fi
    echo "$total"
}

# Starts the benchmark setup in WORK (after start_work): a sipp application server answering
# on a free port (AS_PORT, pid UAS_PID), a relayd ($RELAYD) configured with one service on it,
# subscriber alice, digest, log level warn and in-dialog probes off (RELAY_PORT, pid
# RELAY_PID), and alice registered, which is also the readiness check. $SCENARIOS names the
# sipp scenarios. Its metrics are on METRICS_PORT (see relay_metric). Exits naming the
# failure when alice cannot register.
start_bench_relay() {
    RELAY_PORT=$(free_port)
    AS_PORT=$(free_port)
    while [ "$AS_PORT" = "$RELAY_PORT" ]; do AS_PORT=$(free_port); done
    METRICS_PORT=$(free_port)
    write_bench_config "$WORK/relayd.toml" "$RELAY_PORT" "$METRICS_PORT" "data_dir = \"$WORK/data\""
    start_bench_server
    start_bench_relayd "$WORK/relayd.toml" "$WORK/relayd.log"
    RELAY_PID=$STARTED_PID
    register_alice "$RELAY_PORT" "$WORK/relayd.log"
}

# Writes a benchmark relay's configuration to $1: SIP on UDP 127.0.0.1:$2, metrics on $3,
# `[storage]` lines $4, the sipp application server on AS_PORT serving `echo`, alice, and
# BENCH_EXTRA_TOML at the end (e.g. $'[trace]\nmessages = 0' to measure without the trace).
write_bench_config() {
    cat >"$1" <<EOF
[listen]
udp = "127.0.0.1:$2"
tcp = []

[relay]
realm = "relay.test"

[storage]
$4

[log]
level = "warn"

[metrics]
listen = "127.0.0.1:$3"

[session]
probe_interval_secs = 0

[[services]]
name = "echo"

[[users]]
name = "alice"
password = "alice-secret"
plan = "basic"
services = ["echo"]

# One subscriber places every call of the benchmark: lift the per-subscriber limit (10).
[[classes]]
name = "*"
max_sessions = 100000

[[servers]]
uri = "sip:127.0.0.1:$AS_PORT"
services = ["echo"]

[[tariffs]]
name = "default"
rate = 2
currency = "EUR"
${BENCH_EXTRA_TOML:-}
EOF
    printf 'SEQUENTIAL\nalice;alice-secret\n' >"$WORK/users.csv"
}

# Starts the sipp application server on AS_PORT (pid UAS_PID), before any relay, so that a
# relay's first probe finds it.
start_bench_server() {
    (cd "$WORK" && exec "${LOAD_CPUS[@]}" sipp -sf "$SCENARIOS/uas_answer.xml" -i 127.0.0.1 -p "$AS_PORT" -aa -buff_size "$SIPP_BUFFER" \
        -nostdin -trace_err -error_file "$WORK/uas-errors.log" >/dev/null 2>"$WORK/uas.stderr") &
    UAS_PID=$!
    PIDS+=("$UAS_PID")
}

# Starts $RELAYD on configuration $1, logging to $2; sets STARTED_PID (also in PIDS).
start_bench_relayd() {
    "${SERVER_CPUS[@]}" "$RELAYD" --config "$1" run >/dev/null 2>"$2" &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

# Registers alice through the relay on UDP port $1 (log $2 shown on failure). Registering
# is also the readiness check: sipp retransmits the REGISTER until the relay answers, for at
# most 10 s.
register_alice() {
    mkdir -p "$WORK/register-$1"
    (cd "$WORK/register-$1" && exec "${LOAD_CPUS[@]}" sipp "127.0.0.1:$1" -sf "$SCENARIOS/uac_register.xml" \
        -inf "$WORK/users.csv" -au alice -ap alice-secret -i 127.0.0.1 -m 1 -nostdin \
        -timeout 10s -timeout_error >/dev/null 2>&1) &
    local reg=$!
    PIDS+=("$reg")
    if ! wait "$reg"; then
        echo "$BENCH_NAME: alice could not register with 127.0.0.1:$1; relayd log:" >&2
        tail -20 "$2" >&2
        exit 1
    fi
}

# The value of relayd's metric relayd_$1 (started by start_bench_relay), or "?".
relay_metric() {
    curl -s "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null |
        awk -v m="relayd_$1" '$1 == m { print $2; found = 1 } END { if (!found) print "?" }'
}
