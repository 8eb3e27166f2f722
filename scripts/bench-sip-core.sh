#!/usr/bin/env bash
# Micro-benchmark of sip-core's hot path: a datagram through the wire layer into a server
# transaction, answered, output drained. Prints messages per second per benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(cargo bench -p sip-core --bench parse_transaction -- --noplot 2>&1 | tee /dev/stderr)
echo
echo "== sip-core parse + transaction throughput (one core) =="
# criterion prints e.g. "thrpt:  [412.3 Kelem/s 415.0 Kelem/s 417.9 Kelem/s]"
echo "$out" | awk '/^parse\+transaction\//{name=$1} /thrpt:/{sub(/elem\/s/, " messages/s", $5); print name": "$4" "$5" (median)"}'
