#!/usr/bin/env bash
# relayd against Kamailio, side by side in alternating rounds: on a shared machine whose
# speed drifts (a VM's CPUs), one run of each says little; several rounds, each running both
# back to back, say how the ratio holds.
#
#   scripts/bench-compare.sh [ROUNDS]          default 3 rounds
#
# Each round runs scripts/bench.sh (relayd) and then scripts/bench-kamailio.sh on the same
# load (see those scripts), and keeps their outputs in target/bench/compare-DATE/. It prints,
# per round, the highest rate at which every call completed and was billed and the highest
# that was also kept pace with (achieved >= 95 % of it), for both servers, their ratios, and
# each side's CPU and the load generator's CPU per call at that side's highest clean rate.
#
# Environment: RELAYD_RATES and KAM_RATES, the rate ladders (calls/s); KAM_CHILDREN (4: in
# issue 13's measurement 4 UDP workers did better on this box than 1, 2 and 8), KAM_SHM_MB (2048: with 512, Kamailio 5.6 ran out of
# shared memory above 2800 calls/s and crashed); SECONDS_PER_RATE, HOLD_MS, PIN, SIPP_TRACE
# as in bench.sh. Needs sipp (Debian package sip-tester); bench-kamailio.sh installs kamailio.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
RELAYD_RATES=${RELAYD_RATES:-"4000 4400 4800 5200 5600 6000 6400"}
KAM_RATES=${KAM_RATES:-"2400 2800 3200 3600 4000 4400"}
export KAM_CHILDREN=${KAM_CHILDREN:-4}
export KAM_SHM_MB=${KAM_SHM_MB:-2048}
OUT=target/bench/compare-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"

best() { sed -n 's/^highest rate with every call completed and billed: \([0-9]*\) calls\/s$/\1/p' "$1" | tail -1; }
kept() { sed -n 's/^highest such rate kept pace with (achieved >= 95 % of it): \([0-9]*\) calls\/s$/\1/p' "$1" | tail -1; }
strict() { sed -n 's/^highest such rate with no retransmission and p99 setup <= 200 ms: \([0-9]*\) calls\/s$/\1/p' "$1" | tail -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
# The cpu/call and load/call columns of the row for rate $2 in output $1.
cpu_at() { awk -v r="$2/s" '$1 == r { print $11 " " $12 }' "$1"; }

rows=()
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round of $ROUNDS: relayd" >&2
    # shellcheck disable=SC2086
    scripts/bench.sh $RELAYD_RATES >"$OUT/relayd-$round.txt" 2>&1 || true
    cp "$OUT/relayd-$round.txt" target/bench/relayd.last
    echo "== round $round of $ROUNDS: kamailio ($KAM_CHILDREN workers)" >&2
    # shellcheck disable=SC2086
    scripts/bench-kamailio.sh $KAM_RATES >"$OUT/kamailio-$round.txt" 2>&1 || true
    rb=$(best "$OUT/relayd-$round.txt"); rk=$(kept "$OUT/relayd-$round.txt")
    kb=$(best "$OUT/kamailio-$round.txt"); kk=$(kept "$OUT/kamailio-$round.txt")
    rs=$(strict "$OUT/relayd-$round.txt"); ks=$(strict "$OUT/kamailio-$round.txt")
    # CPU per call of both at 2000 calls/s, when the ladders had that rate (issue 13's
    # comparison point).
    read -r r2k _ <<<"$(cpu_at "$OUT/relayd-$round.txt" 2000)"
    read -r k2k _ <<<"$(cpu_at "$OUT/kamailio-$round.txt" 2000)"
    read -r rcpu rload <<<"$(cpu_at "$OUT/relayd-$round.txt" "${rb:-0}")"
    read -r kcpu kload <<<"$(cpu_at "$OUT/kamailio-$round.txt" "${kb:-0}")"
    rows+=("$(printf '%5s %8s %8s %8s %8s %7s %7s %9s %9s %9s %9s %8s %8s %7s %9s %9s' "$round" \
        "${rb:-0}" "${rk:-0}" "${kb:-0}" "${kk:-0}" "$(ratio "${rb:-0}" "${kb:-0}")" \
        "$(ratio "${rk:-0}" "${kk:-0}")" "${rcpu:--}" "${kcpu:--}" "${rload:--}" "${kload:--}" \
        "${rs:-0}" "${ks:-0}" "$(ratio "${rs:-0}" "${ks:-0}")" "${r2k:--}" "${k2k:--}")")
done

echo
echo "relayd against Kamailio $(kamailio -v 2>/dev/null | awk 'NR == 1 { print $3 }') ($KAM_CHILDREN workers, ${KAM_SHM_MB} MB shared memory), calls/s; outputs in $OUT"
printf '%5s %8s %8s %8s %8s %7s %7s %9s %9s %9s %9s %8s %8s %7s %9s %9s\n' round "relayd" "r.kept" "kamailio" "k.kept" ratio "kept" "r.cpu" "k.cpu" "r.load" "k.load" "r.strict" "k.strict" "strict" "r.cpu2k" "k.cpu2k"
for row in "${rows[@]}"; do echo "$row"; done
echo "(ratio: highest rates with every call completed and billed; kept: also kept pace with;"
echo " cpu: the server's CPU per call, load: the two sipps' CPU per call, each at its own highest clean rate;"
echo " strict: highest clean rate with no retransmission by the terminal and p99 setup <= 200 ms (issue 13);"
echo " cpu2k: the server's CPU per call at 2000 calls/s, when the ladder has that rate)"
