# Shell functions shared by the sipp load benchmarks (scripts/bench.sh for relayd,
# scripts/bench-kamailio.sh for Kamailio), so both compute their figures the same way.
# Sourced, not run.

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

# Call-setup times (ms), one per call, from a sipp -trace_msg file: from the first INVITE
# sent (CSeq 1) to the 200 received for the authenticated INVITE (CSeq 2). The message
# trace is stamped in microseconds; sipp's own response-time counters (rtd="setup" in the
# scenario) read a coarse clock that ticks every 4 ms on a 250 Hz kernel, too coarse here.
setup_times() {
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
