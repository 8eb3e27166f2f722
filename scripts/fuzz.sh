#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each, on the stable
# toolchain, and fails if any of them crashes.
#
#   scripts/fuzz.sh [SECONDS]            every target, SECONDS each (default 30)
#   FUZZ_TARGETS="wire sdp" scripts/fuzz.sh 60
#
# cargo-fuzz is installed (cargo install --locked cargo-fuzz) when missing. It passes
# nightly-only flags to rustc (-Z…); RUSTC_BOOTSTRAP=1 lets the stable compiler take them,
# and no sanitizer is asked for (-s none: sip-core forbids unsafe code, so AddressSanitizer
# would find nothing that a panic does not show already; debug assertions and overflow
# checks stay on). The build goes to fuzz/target, never the workspace's target/.
#
# Each target starts from its seed corpus (fuzz/corpus/<target>/seed-*, made by
# fuzz/seed.sh) plus whatever earlier local runs added there (ignored by git), with the
# dictionary fuzz/sip.dict. For each target the script prints libFuzzer's runs, executions
# per second, edge coverage (cov), features (ft) and corpus size. On a crash (a panic, a
# timeout of 10 s on one input, or more than 2 GiB of memory) it names the target and the
# input (fuzz/artifacts/<target>/…), shows its start, goes on with the other targets, and
# exits 1 at the end. Replay an input with:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> <input>
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
case "$secs" in
  '' | *[!0-9]*)
    echo "usage: scripts/fuzz.sh [SECONDS]" >&2
    exit 2
    ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
# The fuzz crate has its own target directory (fuzz/target): an outer CARGO_TARGET_DIR
# would mix its instrumented build with the workspace's.
unset CARGO_TARGET_DIR
flags=(-s none)

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"

echo "fuzz: building $(echo $targets | wc -w) targets ($(rustc --version))"
started=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "fuzz: built in $(($(date +%s) - started)) s"

logs="fuzz/target/logs"
mkdir -p "$logs"
failed=()
printf '%-12s %10s %10s %8s %8s %8s\n' target runs exec/s cov ft corpus
for t in $targets; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  marker="$logs/$t.start"
  touch "$marker"
  log="$logs/$t.log"
  status=0
  # -timeout: one input running 10 s is a hang; -rss_limit_mb: libFuzzer's default, said.
  cargo fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -dict="$PWD/fuzz/sip.dict" \
    >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  printf '%-12s %10s %10s %8s %8s %8s\n' "$t" "${runs:--}" "${speed:--}" "${cov:--}" \
    "${ft:--}" "${corp:--}"
  if [ "$status" -ne 0 ]; then
    input=$(find "fuzz/artifacts/$t" -type f -newer "$marker" | head -n 1)
    echo "fuzz: target $t FAILED (exit $status) on input ${input:-(none written)}"
    grep -E "panicked at|ERROR: libFuzzer|SUMMARY" "$log" | head -n 5 | sed 's/^/  /' || true
    if [ -n "$input" ]; then
      echo "  input (first 512 bytes):"
      head -c 512 "$input" | od -c | head -n 20 | sed 's/^/    /'
      echo "  replay: RUSTC_BOOTSTRAP=1 cargo fuzz run -s none $t $input"
    fi
    echo "  log: $log"
    failed+=("$t")
  fi
done

total=$(echo $targets | wc -w)
echo "fuzz: ${secs} s each; crashed: ${failed[*]:-none}"
echo "fuzz: $((total - ${#failed[@]})) passed, ${#failed[@]} failed"
[ "${#failed[@]}" -eq 0 ]
