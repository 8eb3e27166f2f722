#!/usr/bin/env bash
# The whole service delivery system in one command (claim 10): builds the three programs,
# starts the relay (relayd) and two application-server agents (appsrv-agent) on loopback,
# and walks through every claim with the terminal program (sip-client), saying what each
# step does and checking that it did it. Prints the billing report at the end.
#
#   scripts/demo.sh            release build, then the walk-through
#   scripts/demo.sh --debug    use a debug build (quicker to build)
#   scripts/demo.sh --keep     keep the working directory (configs, logs, billing store)
#   scripts/demo.sh --plain    SIP and data in clear (UDP), as before TLS (not for networks)
#
# By default every SIP hop is TLS (sips:) and so is every data connection (TCP/TLS): the
# demo makes its own CA and certificates with the openssl program (Debian's `openssl`), no
# outside CA. Needs Rust (cargo), bash and openssl. Uses the ports of the examples: SIP
# 5060 (relay; TLS 5061), 5080 and 5082 (agents; TLS 5091 and 5093), 5084 (the embedded
# example server; TLS 5095), data gateways 7080, 7082 and 7084, metrics 9060, all on
# 127.0.0.1.
# Stops everything it started, by pid, also when a step fails or on Ctrl-C. Exit status 0
# when every step did what it said, 1 when one did not, 2 for a usage error.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROFILE=release
KEEP=0
TLS=1
for arg in "$@"; do
  case "$arg" in
    --debug) PROFILE=debug ;;
    --keep) KEEP=1 ;;
    --plain) TLS=0 ;;
    -h | --help)
      sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "demo: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

if [[ $TLS -eq 1 ]]; then
  RELAY=sips:127.0.0.1:5061
else
  RELAY=sip:127.0.0.1:5060
fi
DOMAIN=relay.test
METRICS=127.0.0.1:9060
STEP_TIMEOUT=30 # seconds any one wait may take

# Everything this script starts, by pid; stopped in reverse order on exit.
PIDS=()
WORK=""
FAILED=0

# --- narration ----------------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
heading() { printf '\n== %s\n' "$*"; }
# Shows a command the way a person would type it.
shows() { printf '   $ %s\n' "$*"; }
# Indents what a program printed.
indent() { sed 's/^/   | /'; }
ok() { printf '   ok: %s\n' "$*"; }

# Says what went wrong, shows the logs, and stops (the EXIT trap cleans up).
fail() {
  FAILED=1
  printf '\n   FAILED: %s\n' "$*" >&2
  if [[ -n "$WORK" ]]; then
    for log in relayd.log as1.log as2.log quotes.log; do
      if [[ -s "$WORK/$log" ]]; then
        printf '\n   --- last lines of %s:\n' "$log" >&2
        tail -n 15 "$WORK/$log" | sed 's/^/   | /' >&2
      fi
    done
  fi
  exit 1
}

# --- processes ----------------------------------------------------------------------------

# start NAME LOG CMD...: runs CMD in the background in $WORK, output to LOG; remembers its pid.
start() {
  local name=$1 log=$2
  shift 2
  (cd "$WORK" && exec 3>&- 4>&- && exec "$@") >"$WORK/$log" 2>&1 </dev/null &
  PIDS+=("$!")
  LAST_PID=$!
}

# stop_pid PID: SIGTERM, then up to 10 s for it to exit, then SIGKILL.
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  exec 3>&-
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${PIDS[$i]}"
  done
  if [[ -n "$WORK" && -d "$WORK" ]]; then
    if [[ $KEEP -eq 1 || $FAILED -eq 1 || $status -ne 0 ]]; then
      say ""
      say "The working directory is kept: $WORK (configs, logs, billing store)."
    else
      rm -rf "$WORK"
    fi
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'FAILED=1; exit 130' INT TERM

# wait_for SECONDS WHAT CMD...: polls CMD until it succeeds; fails the demo after SECONDS.
wait_for() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      fail "$what: not done within ${seconds} s"
    fi
    sleep 0.1
  done
}

alive() { kill -0 "$1" 2>/dev/null; }

# The relay's metrics (Prometheus text) over plain bash /dev/tcp: no curl needed.
metrics() {
  local host=${METRICS%:*} port=${METRICS##*:}
  (
    exec 5<>"/dev/tcp/$host/$port" || exit 1
    printf 'GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n' "$METRICS" >&5
    cat <&5
  ) 2>/dev/null
}

# server_up SERVICE SERVER-URI: the relay lists that server for that service and it is up.
server_up() {
  metrics | grep -qF "relayd_server_up{service=\"$1\",server=\"$2\"} 1"
}

# port_busy PORT: something already accepts TCP connections on 127.0.0.1:PORT.
port_busy() { (exec 5<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

relayd() { "$BIN/relayd" --config "$WORK/relayd.toml" "$@"; }

# export_records sessions|charges: the billing store as JSON lines.
export_records() { (cd "$WORK" && relayd billing export --format jsonl --records "$1"); }

# The value of a string field in one JSON line: json_field LINE KEY.
json_field() { grep -o "\"$2\":\"[^\"]*\"" <<<"$1" | head -n 1 | cut -d'"' -f4; }

# --- set-up -------------------------------------------------------------------------------

heading "Service relay demo: relay, two application servers and a terminal on 127.0.0.1"
say "The relay (relayd) authenticates terminals, finds an application server for the"
say "service they ask for, relays the session and bills it. Each application server runs"
say "appsrv-agent beside it. The terminal is sip-client. Every step below says what it does,"
say "runs it, and checks that it happened."

command -v cargo >/dev/null 2>&1 || {
  echo "demo: cargo is not installed (https://rustup.rs)" >&2
  exit 1
}
if [[ $TLS -eq 1 ]] && ! command -v openssl >/dev/null 2>&1; then
  echo "demo: the openssl program is needed to make the demo's certificates: install the" >&2
  echo "      Debian package openssl (apt-get install openssl), or run with --plain" >&2
  exit 1
fi

for port in 5060 5061 5080 5082 5084 5091 5093 5095 7080 7082 7084 9060; do
  if port_busy "$port"; then
    echo "demo: port $port on 127.0.0.1 is already in use; stop what runs there first" >&2
    exit 1
  fi
done

heading "Building the three programs ($PROFILE)"
BUILD=(cargo build --workspace --quiet)
[[ $PROFILE == release ]] && BUILD+=(--release)
shows "${BUILD[*]}"
(cd "$ROOT" && "${BUILD[@]}") || fail "the build failed"
# The application server that embeds appsrv-agent as a library (step 6).
EXAMPLE_BUILD=(cargo build -p appsrv-agent --example metered_server --quiet)
[[ $PROFILE == release ]] && EXAMPLE_BUILD+=(--release)
shows "${EXAMPLE_BUILD[*]}"
(cd "$ROOT" && "${EXAMPLE_BUILD[@]}") || fail "the build of the example failed"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
for program in relayd appsrv-agent sip-client examples/metered_server; do
  [[ -x "$BIN/$program" ]] || fail "$BIN/$program was not built"
done
ok "built relayd, appsrv-agent, sip-client and examples/metered_server in $BIN"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/relay-demo.XXXXXX")
unset RUST_LOG
export NO_COLOR=1

# An agent's address as the relay knows it (sips: over TLS): agent_uri PLAIN-PORT TLS-PORT.
agent_uri() {
  if [[ $TLS -eq 1 ]]; then echo "sips:as1@127.0.0.1:$2"; else echo "sip:as1@127.0.0.1:$1"; fi
}
AGENT_TLS=() # appsrv-agent's TLS flags (each agent adds its own --tls-listen)
if [[ $TLS -eq 1 ]]; then
  heading "Certificates (RFC 5922): a CA of the demo's own, and one certificate per party"
  say "Every SIP hop runs TLS (sips:, RFC 5630): the terminal verifies the relay's"
  say "certificate against the CA; the relay and the agents authenticate each other with"
  say "theirs (mutual TLS): an agent takes inquiries only over TLS from the relay's"
  say "certificate. The data connection is TLS too (TCP/TLS in the SDP), so the session token"
  say "never crosses in clear. openssl makes them now, in $WORK/tls:"
  mkdir -p "$WORK/tls"
  (
    cd "$WORK/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
      -subj "/CN=service relay demo CA" -keyout ca-key.pem -out ca.pem \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    for party in relay agent; do
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=$party.$DOMAIN" -keyout "$party-key.pem" -out "$party.csr"
      printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:$party.$DOMAIN,DNS:$DOMAIN" \
        "extendedKeyUsage=serverAuth,clientAuth" "basicConstraints=CA:FALSE" >"$party.ext"
      openssl x509 -req -in "$party.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
        -days 2 -extfile "$party.ext" -out "$party.pem"
    done
  ) >"$WORK/openssl.log" 2>&1 || {
    cat "$WORK/openssl.log" >&2
    fail "openssl could not make the certificates"
  }
  shows "openssl req -x509 ... -out ca.pem; openssl x509 -req ... -out relay.pem (and agent.pem)"
  ok "ca.pem, relay.pem and agent.pem (each naming 127.0.0.1), with their keys"
  AGENT_TLS=(--ca "$WORK/tls/ca.pem" --tls-certificate "$WORK/tls/agent.pem"
    --tls-key "$WORK/tls/agent-key.pem")
fi

heading "The relay's configuration"
say "The demo runs relayd with examples/relayd.toml, changed in three ways (the result is"
say "$WORK/relayd.toml):"
say " - the static server clock-1 (sip:127.0.0.1:5081) is left out: no agent runs there;"
say " - a service 'echo-all' with strategy \"all\" is added: a request for it is forked to"
say "   every server that delivers it (claim 7);"
say " - a service 'quotes' is added, delivered by an application server of its own (step 6)."
say "Billing data goes to $WORK/relayd-data."
# Paragraph mode: drop the paragraph that declares clock-1; then add the fork service.
awk 'BEGIN { RS = ""; ORS = "\n\n" } !/^\[\[servers\]\]\nname = "clock-1"/' \
  "$ROOT/examples/relayd.toml" >"$WORK/relayd.toml"
if ! grep -q '^name = "echo-all"' "$WORK/relayd.toml"; then
  cat >>"$WORK/relayd.toml" <<'EOF'
# Added by scripts/demo.sh: forked to every server that delivers it (claim 7).
[[services]]
name = "echo-all"
strategy = "all"
description = "Echo, from every server at once"
EOF
fi
if ! grep -q '^name = "quotes"' "$WORK/relayd.toml"; then
  cat >>"$WORK/relayd.toml" <<'EOF'
# Added by scripts/demo.sh: served by crates/appsrv-agent/examples/metered_server.rs (step 6).
[[services]]
name = "quotes"
strategy = "first"
description = "A quote per request, charged by the application server"
EOF
fi
if [[ $TLS -eq 1 ]]; then
  say " - a [tls] section: the relay's certificate and key, and the CA it trusts; it listens for"
  say "   TLS on 127.0.0.1:5061, and application servers must register over mutual TLS;"
  say " - the static server echo-1 is reached over TLS (sips:127.0.0.1:5091): an agent with TLS"
  say "   takes inquiries only over TLS from the relay's certificate."
  sed -i 's|^uri = "sip:127.0.0.1:5080"|uri = "sips:127.0.0.1:5091"|' "$WORK/relayd.toml"
  cat >>"$WORK/relayd.toml" <<EOF
# Added by scripts/demo.sh: SIP over TLS on 127.0.0.1:5061, mutual TLS with the agents.
[tls]
certificate = "$WORK/tls/relay.pem"
key = "$WORK/tls/relay-key.pem"
ca = "$WORK/tls/ca.pem"
EOF
fi
shows "relayd --config relayd.toml check-config"
(cd "$WORK" && relayd check-config) 2>&1 | indent || fail "relayd refused its configuration"

heading "Starting the relay and two application servers"
say "relayd listens for SIP on UDP and TCP 127.0.0.1:5060 and serves metrics on $METRICS."
if [[ $TLS -eq 1 ]]; then say "It takes SIP over TLS on 127.0.0.1:5061."; fi
shows "relayd --config relayd.toml"
start relayd relayd.log "$BIN/relayd" --config "$WORK/relayd.toml"
RELAYD_PID=$LAST_PID
relay_ready() {
  alive "$RELAYD_PID" || fail "relayd exited at start (is UDP port 5060 in use?)"
  metrics | grep -q '^relayd_registered_users '
}
wait_for "$STEP_TIMEOUT" "relayd starting" relay_ready
ok "relayd is serving (pid $RELAYD_PID)"

say ""
say "Two agents register the services echo, clock and echo-all with the relay as account"
say "as1, from examples/appsrv.toml. Both charge 1 cent per KiB they deliver (claim 4):"
AGENT_ARGS=(--config "$ROOT/examples/appsrv.toml" --relay "$RELAY" --bytes-per-charge 1024
  --price-per-block 1 --service echo-all=builtin:echo "${AGENT_TLS[@]}")
AS1_URI=$(agent_uri 5080 5091)
AS2_URI=$(agent_uri 5082 5093)
AS1_TLS=()
AS2_TLS=()
if [[ $TLS -eq 1 ]]; then
  say "Over TLS: --relay $RELAY --ca ca.pem --tls-certificate agent.pem --tls-key agent-key.pem."
  AS1_TLS=(--tls-listen 127.0.0.1:5091)
  AS2_TLS=(--tls-listen 127.0.0.1:5093)
fi
shows "appsrv-agent --config examples/appsrv.toml --bytes-per-charge 1024 --service echo-all=builtin:echo"
start as1 as1.log "$BIN/appsrv-agent" "${AGENT_ARGS[@]}" "${AS1_TLS[@]}"
AS1_PID=$LAST_PID
shows "appsrv-agent ... --listen 127.0.0.1:5082 --data-listen 127.0.0.1:7082"
start as2 as2.log "$BIN/appsrv-agent" "${AGENT_ARGS[@]}" "${AS2_TLS[@]}" \
  --listen 127.0.0.1:5082 --data-listen 127.0.0.1:7082
AS2_PID=$LAST_PID
agents_ready() {
  alive "$AS1_PID" || fail "the first appsrv-agent exited at start"
  alive "$AS2_PID" || fail "the second appsrv-agent exited at start"
  server_up echo-all "$AS1_URI" && server_up echo-all "$AS2_URI"
}
wait_for "$STEP_TIMEOUT" "the agents registering" agents_ready
ok "the relay lists both servers ($AS1_URI and $AS2_URI) as up"

# The terminal's settings, as a person would export them.
export SIP_CLIENT_RELAY=$RELAY SIP_CLIENT_DOMAIN=$DOMAIN
: >"$WORK/sip-client.toml"
export SIP_CLIENT_CONFIG="$WORK/sip-client.toml" # no personal config file gets in the way
say ""
say "The terminal's settings:"
shows "export SIP_CLIENT_RELAY=$RELAY SIP_CLIENT_DOMAIN=$DOMAIN"
if [[ $TLS -eq 1 ]]; then
  export SIP_CLIENT_CA="$WORK/tls/ca.pem"
  shows "export SIP_CLIENT_CA=ca.pem    # the CA the relay's certificate is checked against"
fi

# client NAME USER PASSWORD ARGS...: runs sip-client with stdin as given; stdout to NAME.out,
# human status lines to NAME.err, JSON events to NAME.events; returns its exit status.
client() {
  local name=$1 user=$2 password=$3
  shift 3
  (cd "$WORK" && exec 3>&- 4>&- && SIP_CLIENT_PASSWORD=$password exec "$BIN/sip-client" \
    -u "$user" --events-file "$WORK/$name.events" "$@") >"$WORK/$name.out" 2>"$WORK/$name.err"
}

# client_bg NAME USER PASSWORD FIFO ARGS...: the same in the background, reading FIFO (which
# this script holds open); its pid in LAST_PID.
client_bg() {
  local name=$1 user=$2 password=$3 fifo=$4
  shift 4
  (cd "$WORK" && exec 3>&- 4>&- && SIP_CLIENT_PASSWORD=$password exec "$BIN/sip-client" \
    -u "$user" --events-file "$WORK/$name.events" "$@") \
    <"$fifo" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# The number of live sessions the relay counts (its metrics).
live_sessions() { metrics | grep '^relayd_sessions_live ' | cut -d' ' -f2; }

# --- step 1: register ---------------------------------------------------------------------

heading "Step 1 of 8: register"
say "alice's terminal registers: REGISTER, the relay challenges it (401: digest, MD5 and"
say "SHA-256), the terminal answers with her password, the relay binds her address."
shows "SIP_CLIENT_PASSWORD=alice-secret sip-client -u alice register --once"
status=0
client register alice alice-secret register --once || status=$?
indent <"$WORK/register.err"
[[ $status -eq 0 ]] || fail "sip-client register exited with status $status"
grep -q '"event":"registered"' "$WORK/register.events" || fail "no registration reported"
ok "alice is registered (exit status 0)"

# --- step 2: call echo --------------------------------------------------------------------

heading "Step 2 of 8: call the echo service and round-trip data (claims 1, 3)"
say "alice calls sip:echo@relay.test. The relay challenges the INVITE (407), checks that she"
say "subscribes to echo, picks a server by the rules, and inquires of it (its own INVITE)."
say "The server's answer carries a data endpoint and a one-time token; the terminal connects"
say "there directly, and the data never passes through the relay. When the data is done the"
say "session is hung up and the relay writes a time-based billing record."
printf 'Hello from alice, through the service relay.\n' >"$WORK/echo.in"
shows "echo 'Hello from alice, through the service relay.' | sip-client -u alice call echo"
status=0
client echo alice alice-secret call echo --wait-after-eof 2s <"$WORK/echo.in" || status=$?
indent <"$WORK/echo.err"
say "   what came back:"
indent <"$WORK/echo.out"
[[ $status -eq 0 ]] || fail "sip-client call echo exited with status $status"
cmp -s "$WORK/echo.in" "$WORK/echo.out" || fail "the data did not come back unchanged"
echo_call=$(json_field "$(grep '"event":"established"' "$WORK/echo.events")" call_id)
[[ -n "$echo_call" ]] || fail "no session was established"
echo_records() { [[ $(export_records sessions | grep -cF "\"call_id\":\"$echo_call\"") -eq 1 ]]; }
wait_for "$STEP_TIMEOUT" "the echo session's billing record" echo_records
record=$(export_records sessions | grep -F "\"call_id\":\"$echo_call\"")
[[ $(json_field "$record" service) == echo ]] || fail "the record is not for echo: $record"
ok "the data came back unchanged, and the relay billed the session:"
indent <<<"$record"

# --- steps 3 and 4: change and transfer ---------------------------------------------------

heading "Step 3 of 8: change the live session to the clock service (claim 5)"
say "alice calls echo again and keeps the session open. One second in, her terminal sends a"
say "re-INVITE with P-Preferred-Service: clock. The relay finds a clock server, inquires of"
say "it, and moves the session there; the bill splits: echo until now, clock from now on."
mkfifo "$WORK/live.in"
exec 3<>"$WORK/live.in" # held open by this script, so the terminal's input stays open
printf 'Hello again.\n' >&3
shows "sip-client -u alice call echo --then 'after 1s change clock; after 3s transfer clock'"
client_bg live alice alice-secret "$WORK/live.in" call echo \
  --then 'after 1s change clock; after 3s transfer clock'
LIVE_PID=$LAST_PID
changed() {
  alive "$LIVE_PID" || fail "the terminal exited: $(tail -n 3 "$WORK/live.err")"
  grep -q '"event":"changed"' "$WORK/live.events" 2>/dev/null
}
wait_for "$STEP_TIMEOUT" "the change to clock" changed
grep -q '"event":"changed".*"status":200' "$WORK/live.events" ||
  fail "the change was refused: $(grep '"event":"changed"' "$WORK/live.events")"
indent <"$WORK/live.err"
shown_lines=$(wc -l <"$WORK/live.err")
ok "the session now runs the clock service"

heading "Step 4 of 8: transfer the session to the other application server (claim 6)"
say "Three seconds later the terminal sends REFER with Refer-To: sip:clock@relay.test. The"
say "relay answers 202, finds a clock server other than the current one, inquires of it,"
say "reports progress as NOTIFYs, re-INVITEs the terminal with the new server's data"
say "endpoint, and ends the first server's leg. The clock then comes from the other server."
transferred() {
  alive "$LIVE_PID" || fail "the terminal exited: $(tail -n 3 "$WORK/live.err")"
  grep -q '"event":"transferred"' "$WORK/live.events" 2>/dev/null
}
wait_for "$STEP_TIMEOUT" "the transfer" transferred
grep -q '"event":"transferred".*"status":200' "$WORK/live.events" ||
  fail "the transfer failed: $(grep '"event":"transferred"' "$WORK/live.events")"
# Two ticks of the new server's clock after the transfer.
ticks_at_transfer=$(grep -c 'Z$' "$WORK/live.out" || true)
ticks_after_transfer() {
  [[ $(grep -c 'Z$' "$WORK/live.out" || true) -ge $((ticks_at_transfer + 2)) ]]
}
wait_for "$STEP_TIMEOUT" "the new server's clock" ticks_after_transfer
tail -n +"$((shown_lines + 1))" "$WORK/live.err" | indent
shown_lines=$(wc -l <"$WORK/live.err")
say "   what the terminal received (echo, then the clock of each server):"
indent <"$WORK/live.out"
endpoints=$(grep '"event":"data-connected"' "$WORK/live.events" | grep -o '"addr":"[^"]*"' | cut -d'"' -f4 | tr '\n' ' ')
ok "the session moved; its data endpoints, in order: $endpoints"

# --- step 5: application charge -----------------------------------------------------------

heading "Step 5 of 8: an application charge per block of bytes delivered (claim 4)"
say "While that session runs, alice opens a second one to echo and sends 4 KiB through it."
say "The echo server charges 1 cent per KiB it delivers: it sends the relay MESSAGEs"
say "(application/vnd.relay.charge+json), authenticated as its account; the relay commits a"
say "charge record before it answers 200. Then alice ends her input, and the session ends."
head -c 4096 /dev/zero | tr '\0' '.' | fold -w 64 >"$WORK/bulk.in"
charges_before=$(export_records charges | wc -l | tr -d ' ')
mkfifo "$WORK/bulk.fifo"
exec 4<>"$WORK/bulk.fifo"
shows "sip-client -u alice call echo < 4KiB.txt"
client_bg bulk alice alice-secret "$WORK/bulk.fifo" call echo --wait-after-eof 2s
BULK_PID=$LAST_PID
bulk_up() {
  alive "$BULK_PID" || fail "the terminal exited: $(tail -n 3 "$WORK/bulk.err")"
  grep -q '"event":"data-connected"' "$WORK/bulk.events" 2>/dev/null && [[ $(live_sessions) -ge 2 ]]
}
wait_for "$STEP_TIMEOUT" "the second session" bulk_up
cat "$WORK/bulk.in" >&4
# The units of the charge records written since this step began.
new_charges() { export_records charges | tail -n +"$((charges_before + 1))"; }
charged_units() {
  local total=0 n
  while read -r n; do
    [[ -n "$n" ]] && total=$((total + n))
  done < <(new_charges | grep -o '"units":{"units":[0-9]*' | grep -o '[0-9]*$')
  echo "$total"
}
four_units() { [[ $(charged_units) -ge 4 ]]; }
wait_for "$STEP_TIMEOUT" "4 charge units for the 4 KiB" four_units
exec 4>&- # end of alice's input
bulk_done() { ! alive "$BULK_PID"; }
wait_for "$STEP_TIMEOUT" "the second session ending" bulk_done
status=0
wait "$BULK_PID" || status=$?
indent <"$WORK/bulk.err"
[[ $status -eq 0 ]] || fail "sip-client call echo exited with status $status"
cmp -s "$WORK/bulk.in" "$WORK/bulk.out" || fail "the 4 KiB did not come back unchanged"
units=$(charged_units)
[[ $units -eq 4 ]] || fail "expected 4 charge units for 4 KiB, the relay recorded $units"
bulk_call=$(json_field "$(grep '"event":"established"' "$WORK/bulk.events")" call_id)
bulk_session() {
  export_records sessions | grep -F "\"call_id\":\"$bulk_call\"" | head -n 1 |
    grep -o '"session_id":"[^"]*"' | cut -d'"' -f4
}
has_bulk_session() { [[ -n "$(bulk_session)" ]]; }
wait_for "$STEP_TIMEOUT" "the second session's billing record" has_bulk_session
bulk_sid=$(bulk_session)
linked=$(new_charges | grep -cF "\"session_id\":\"$bulk_sid\"" || true)
[[ $linked -eq $(new_charges | wc -l) ]] ||
  fail "every charge should name the session $bulk_sid: $(new_charges)"
ok "the relay recorded 4 units (1 cent each) for alice's session $bulk_sid:"
new_charges | indent

# --- step 6: the application server's own charges ----------------------------------------

heading "Step 6 of 8: charges the application server asked for (claim 4)"
say "An application server also charges for what it delivers by itself: an item, a level, a"
say "request served. crates/appsrv-agent/examples/metered_server.rs is a small one that embeds"
say "appsrv-agent as a library: it registers the service 'quotes' (account as1), is told who"
say "is connected (the agent's JSON preamble), and charges 2 cents per quote it serves, under"
say "its own event ids, before it answers. On 'bye' it hangs up: the agent sends the BYE, and"
say "the relay records the end as the server's (server-bye)."
printf 'as1-secret\n' >"$WORK/as1.password"
QUOTES_ARGS=(--relay "$RELAY" --domain "$DOMAIN" --account as1 --password-file "$WORK/as1.password"
  --listen 127.0.0.1:5084 --data-listen 127.0.0.1:7084 --bytes-per-charge 0 --price-per-block 2
  "${AGENT_TLS[@]}")
if [[ $TLS -eq 1 ]]; then QUOTES_ARGS+=(--tls-listen 127.0.0.1:5095); fi
QUOTES_URI=$(agent_uri 5084 5095)
shows "metered_server --relay $RELAY --domain $DOMAIN --account as1 --password-file as1.password \\"
printf '       %s\n' "--listen 127.0.0.1:5084 --data-listen 127.0.0.1:7084 --bytes-per-charge 0 --price-per-block 2"
start quotes quotes.log "$BIN/examples/metered_server" "${QUOTES_ARGS[@]}"
QUOTES_PID=$LAST_PID
quotes_ready() {
  alive "$QUOTES_PID" || fail "the quotes server exited at start"
  server_up quotes "$QUOTES_URI"
}
wait_for "$STEP_TIMEOUT" "the quotes server registering" quotes_ready
ok "the relay lists $QUOTES_URI as up for quotes"
charges_before=$(export_records charges | wc -l | tr -d ' ')
printf 'quote\nquote\nbye\n' >"$WORK/quotes.in"
shows "printf 'quote\\nquote\\nbye\\n' | sip-client -u bob call quotes"
status=0
client quotes-call bob bob-secret call quotes <"$WORK/quotes.in" || status=$?
indent <"$WORK/quotes-call.err"
say "   what came back:"
indent <"$WORK/quotes-call.out"
[[ $status -eq 0 ]] || fail "sip-client call quotes exited with status $status"
[[ $(grep -c ')$' "$WORK/quotes-call.out" || true) -eq 2 ]] || fail "expected two quotes"
grep -q '"event":"ended".*"by":"remote"' "$WORK/quotes-call.events" ||
  fail "the server did not hang up: $(grep '"event":"ended"' "$WORK/quotes-call.events")"
quotes_call=$(json_field "$(grep '"event":"established"' "$WORK/quotes-call.events")" call_id)
quotes_record() { export_records sessions | grep -F "\"call_id\":\"$quotes_call\"" | head -n 1; }
has_quotes_record() { [[ -n "$(quotes_record)" ]]; }
wait_for "$STEP_TIMEOUT" "the quotes session's billing record" has_quotes_record
record=$(quotes_record)
[[ $(json_field "$record" cause) == server-bye ]] || fail "the record should say server-bye: $record"
quotes_sid=$(json_field "$record" session_id)
quote_charges() { export_records charges | tail -n +"$((charges_before + 1))" | grep -F '"event_id":"app:quote-'; }
two_quote_charges() { [[ $(quote_charges | wc -l) -eq 2 ]]; }
wait_for "$STEP_TIMEOUT" "two charge records for the two quotes" two_quote_charges
[[ $(quote_charges | grep -cF "\"session_id\":\"$quotes_sid\"") -eq 2 ]] ||
  fail "both charges should name the session $quotes_sid: $(quote_charges)"
[[ $(quote_charges | grep -c '"minor":2,') -eq 2 ]] || fail "each quote should cost 2: $(quote_charges)"
ok "two quotes, two charges of 2 cents under the server's own event ids, tied to bob's"
say "       session $quotes_sid, which the server ended (server-bye):"
quote_charges | indent
indent <<<"$record"

# --- step 7: fork -------------------------------------------------------------------------

heading "Step 7 of 8: one request, two sessions (claim 7)"
say "bob calls echo-all. Its strategy is \"all\": the relay inquires of both servers at once"
say "and relays each 200 OK with its own To tag; bob's terminal confirms each, and holds two"
say "sessions, each with its own data connection and its own billing record."
printf 'Hello, both of you.\n' >"$WORK/fork.in"
shows "echo 'Hello, both of you.' | sip-client -u bob call echo-all --label --then 'sessions 2; after 1s bye'"
status=0
client fork bob bob-secret call echo-all --label --then 'sessions 2; after 1s bye' <"$WORK/fork.in" ||
  status=$?
indent <"$WORK/fork.err"
say "   what came back:"
indent <"$WORK/fork.out"
[[ $status -eq 0 ]] || fail "sip-client call echo-all exited with status $status"
sessions=$(grep -c '"event":"established"' "$WORK/fork.events" || true)
[[ $sessions -eq 2 ]] || fail "expected 2 sessions from one request, got $sessions"
[[ $(grep -c 'Hello, both of you.' "$WORK/fork.out" || true) -eq 2 ]] ||
  fail "each session should have echoed the line"
fork_call=$(json_field "$(grep '"event":"established"' "$WORK/fork.events" | head -n 1)" call_id)
fork_records() { [[ $(export_records sessions | grep -cF "\"call_id\":\"$fork_call\"") -eq 2 ]]; }
wait_for "$STEP_TIMEOUT" "two billing records for the forked request" fork_records
servers=$(export_records sessions | grep -F "\"call_id\":\"$fork_call\"" |
  grep -o '"server":"[^"]*"' | sort -u | wc -l | tr -d ' ')
[[ $servers -eq 2 ]] || fail "the two sessions should be on two servers"
ok "two sessions from one INVITE, one on each server, each billed:"
export_records sessions | grep -F "\"call_id\":\"$fork_call\"" | indent

# --- step 8: hang up ----------------------------------------------------------------------

heading "Step 8 of 8: hang up (claim 3)"
say "alice hangs up the session of steps 3 and 4 (SIGTERM, as Ctrl-C would): the terminal"
say "sends BYE; the relay relays it to the server, measures the duration, and commits the"
say "billing record before it answers 200."
shows "kill -TERM <sip-client pid>     # or Ctrl-C in its terminal"
live_call=$(json_field "$(grep '"event":"established"' "$WORK/live.events")" call_id)
kill -TERM "$LIVE_PID"
exited() { ! alive "$LIVE_PID"; }
wait_for "$STEP_TIMEOUT" "the terminal hanging up" exited
status=0
wait "$LIVE_PID" || status=$?
exec 3>&-
tail -n +"$((shown_lines + 1))" "$WORK/live.err" | indent
[[ $status -eq 0 ]] || fail "the terminal exited with status $status after hanging up"
grep -q '"event":"ended".*"by":"local"' "$WORK/live.events" || fail "no BYE was sent"
export_records sessions | grep -F "\"call_id\":\"$live_call\"" >"$WORK/live.records" || true
segments=$(wc -l <"$WORK/live.records" | tr -d ' ')
[[ $segments -eq 3 ]] || fail "expected 3 billing records (echo, clock, clock), got $segments"
causes=$(grep -o '"service":"[^"]*"\|"cause":"[^"]*"' "$WORK/live.records" | cut -d'"' -f4 | paste -sd' ' -)
[[ $causes == "echo changed clock transferred clock caller-bye" ]] ||
  fail "unexpected services and causes of the records: $causes"
clock_servers=$(grep '"service":"clock"' "$WORK/live.records" | grep -o '"server":"[^"]*"' | sort -u | wc -l | tr -d ' ')
[[ $clock_servers -eq 2 ]] || fail "the two clock records should name two servers"
ok "one call, three billing records: echo (ended by the change), clock on the first server"
say "       (ended by the transfer), clock on the second server (ended by alice's BYE):"
indent <"$WORK/live.records"

# --- billing report -----------------------------------------------------------------------

heading "The billing report"
say "Totals per subscriber and per service, from the relay's billing store (SQLite):"
shows "relayd --config relayd.toml billing report"
(cd "$WORK" && relayd billing report) 2>&1 | indent || fail "billing report failed"
shows "relayd --config relayd.toml billing report --by service"
(cd "$WORK" && relayd billing report --by service) 2>&1 | indent || fail "billing report failed"
say "Every record is in CSV or JSON lines too:"
say "   $ relayd --config relayd.toml billing export --format csv --records sessions"

heading "Done"
say "Every step did what it said. The relay, the two agents and any terminal still running"
say "are stopped now. To run the pieces by hand, see README.md (three-terminal walk-through)."
