#!/usr/bin/env bash
# Real SIP terminals through relayd: each client of the interoperability table registers
# (digest), calls the echo service, holds the call, hangs up. One line per client:
#   PASS client
#   FAIL client: reason
# Exit status 0 when every client passed, 1 otherwise (2: bad usage or set-up).
#
#   scripts/interop.sh [--start] [--relay HOST:PORT] [--domain DOMAIN] [--user USER]
#                      [--password PASSWORD] [--service SERVICE] [--hold SECS]
#                      [--clients "baresip linphone pjsua2 sipsak sipp"] [--keep]
#
# Defaults are those of examples/relayd.toml: relay 127.0.0.1:5060 (UDP), domain relay.test,
# alice / alice-secret, service echo, a 2 s hold. Against a running relay the echo service's
# server must answer an audio offer (e.g. sipp with crates/relayd/tests/interop/echo_uas.xml
# on 127.0.0.1:5080; appsrv-agent refuses audio with 488).
#
# --start: starts relayd itself on examples/relayd.toml, unchanged but for its data_dir (a
# temporary directory), and a sipp echo server on 127.0.0.1:5080 in place of the static echo
# server; then also checks that each call left exactly one session record for USER/SERVICE
# (`relayd billing export`). It needs the ports of the example free (5060, 5080, 9060) and
# relayd on PATH or built in target/release or target/debug (RELAYD=path overrides).
#
# The drivers are crates/relayd/tests/interop/*_call.py, the same ones the tests
# (cargo test -p relayd --test interop) run. pjsua2's runs under the first python of:
# $INTEROP_PYTHON, the venv .ci/run makes (${XDG_CACHE_HOME:-~/.cache}/service-relay/
# interop-venv), python3.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
drivers=$root/crates/relayd/tests/interop

relay=127.0.0.1:5060
domain=relay.test
user=alice
password=alice-secret
service=echo
hold=2
clients="baresip linphone pjsua2 sipsak sipp"
start=0
keep=0

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --start) start=1 ;;
    --keep) keep=1 ;;
    --relay) relay=$2; shift ;;
    --domain) domain=$2; shift ;;
    --user) user=$2; shift ;;
    --password) password=$2; shift ;;
    --service) service=$2; shift ;;
    --hold) hold=$2; shift ;;
    --clients) clients=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "interop: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

python=python3
venv_python=${XDG_CACHE_HOME:-$HOME/.cache}/service-relay/interop-venv/bin/python
if [ -n "${INTEROP_PYTHON:-}" ]; then
  python=$INTEROP_PYTHON
elif [ -x "$venv_python" ]; then
  python=$venv_python
fi
if ! command -v python3 >/dev/null 2>&1 && [ "$python" = python3 ]; then
  echo "interop: python3 not found (Debian package python3)" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/interop.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ "$keep" = 1 ]; then echo "interop: files kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

config=""
relayd_bin=""
if [ "$start" = 1 ]; then
  relay_host=${relay%:*}
  relay_port=${relay##*:}
  if [ "$relay" != "127.0.0.1:5060" ]; then
    echo "interop: --start runs examples/relayd.toml as shipped: its relay is 127.0.0.1:5060" >&2
    exit 2
  fi
  relayd_bin=${RELAYD:-}
  for candidate in "$(command -v relayd 2>/dev/null)" target/release/relayd target/debug/relayd; do
    [ -z "$relayd_bin" ] && [ -n "$candidate" ] && [ -x "$candidate" ] && relayd_bin=$candidate
  done
  if [ -z "$relayd_bin" ]; then
    echo "interop: no relayd binary (cargo build -p relayd, or RELAYD=path)" >&2
    exit 2
  fi
  relayd_bin=$(cd "$(dirname "$relayd_bin")" && pwd)/$(basename "$relayd_bin")
  if ! command -v sipp >/dev/null 2>&1; then
    echo "interop: --start needs sipp for the echo server (Debian package sip-tester)" >&2
    exit 2
  fi
  config=$work/relayd.toml
  sed "s|^data_dir = .*|data_dir = \"$work/relayd-data\"|" examples/relayd.toml >"$config"
  (cd "$work" && exec sipp -sf "$drivers/echo_uas.xml" -i 127.0.0.1 -p 5080 -mi 127.0.0.1 \
      -rtp_echo -aa -nostdin -trace_msg -message_file "$work/echo.messages" \
      >"$work/echo.out" 2>&1) &
  pids+=($!)
  (cd "$work" && RUST_LOG=info,relayd=debug NO_COLOR=1 exec "$relayd_bin" --config "$config" run \
      >/dev/null 2>"$work/relayd.log") &
  pids+=($!)
  ready=0
  for _ in $(seq 1 100); do
    if grep -q "relayd serving" "$work/relayd.log" 2>/dev/null; then ready=1; break; fi
    kill -0 "${pids[1]}" 2>/dev/null || break
    sleep 0.1
  done
  if [ "$ready" != 1 ]; then
    echo "interop: relayd did not start:" >&2
    tail -n 20 "$work/relayd.log" >&2
    exit 2
  fi
fi

sessions() {
  "$relayd_bin" --config "$config" billing export --format jsonl --records sessions 2>/dev/null \
    | grep -c "\"subscriber\":\"$user\".*\"service\":\"$service\"\|\"service\":\"$service\".*\"subscriber\":\"$user\""
}

failed=0
for client in $clients; do
  case "$client" in
    baresip|linphone|pjsua2|sipsak|sipp) ;;
    *) echo "FAIL $client: no such client (baresip linphone pjsua2 sipsak sipp)"; failed=1; continue ;;
  esac
  dir=$work/$client
  mkdir -p "$dir"
  before=0
  [ -n "$config" ] && before=$(sessions)
  py=python3
  [ "$client" = pjsua2 ] && py=$python
  timeout -k 5 60 "$py" "$drivers/${client}_call.py" --relay "$relay" --domain "$domain" \
    --user "$user" --password "$password" --service "$service" --hold "$hold" \
    --workdir "$dir" >"$dir/events.jsonl" 2>"$dir/driver.log"
  rc=$?
  result=$(tail -n 1 "$dir/events.jsonl")
  reason=""
  if [ "$rc" != 0 ]; then
    reason=$(printf '%s' "$result" | sed -n 's/.*"reason": "\(.*\)"}$/\1/p')
    [ -z "$reason" ] && reason="driver exited $rc"
  elif ! grep -q '"event": "established"' "$dir/events.jsonl"; then
    reason="no established event"
  elif [ -n "$config" ]; then
    after=""
    for _ in $(seq 1 50); do
      after=$(sessions)
      [ "$after" -gt "$before" ] && break
      sleep 0.1
    done
    if [ "$after" -ne $((before + 1)) ]; then
      reason="$((after - before)) session records for $user/$service, wanted 1"
    fi
  fi
  if [ -z "$reason" ]; then
    echo "PASS $client"
  else
    echo "FAIL $client: $reason"
    failed=1
  fi
done
exit "$failed"
