#!/usr/bin/env bash
# Billing store throughput: session and charge records per second through the
# group-commit writer, SQLite in WAL mode with synchronous=FULL, on this machine.
#
#   scripts/bench-billing.sh [--sessions N] [--callers C] [--dir DIR]
#
# The database goes into a fresh temporary directory (under DIR if given: point it at
# the disk you want measured; a tmpfs would skip the real fsync) and is removed after.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p billing --example billing_bench
exec target/release/examples/billing_bench "$@"
