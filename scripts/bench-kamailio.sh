#!/usr/bin/env bash
# Reference call-rate benchmark: the load of scripts/bench.sh, run against Kamailio (Debian's
# `kamailio` package) configured as a proxy with digest auth, dialog tracking and
# accounting, on the same machine, so that relayd's figures have a side-by-side number.
#
#   scripts/bench-kamailio.sh [RATE...]   default rates: 50 100 200 400 800 1600 3200 (calls/s)
#
# The same sipp terminal (uac_register.xml once, then uac_bench.xml at each rate) calls the
# same sipp application server (uas_answer.xml) through Kamailio on loopback. Each call:
# INVITE, 407, ACK, INVITE with digest, Kamailio relays it (record-routed, dialog tracked,
# accounting flagged, P-Asserted-Identity/-Service added) to the server, 100/180/200, ACK
# and BYE loose-routed through Kamailio, 200. It prints the table of bench.sh: calls placed,
# completed, failed, billed (here: CDRs Kamailio's acc module wrote for that rate), the rate
# achieved, and call setup (first INVITE to the 200) at p50, p99, mean and max from the
# terminal's message trace; then the highest rate at which every call completed and was
# billed, and, if bench.sh's result file is there, the side-by-side line.
#
# Environment: SECONDS_PER_RATE (5), HOLD_MS (100), PIN (0), SIPP_BUFFER as in bench.sh;
# KAM_CHILDREN (8, the count in Debian's stock kamailio.cfg) UDP worker processes; on a
# 2-CPU machine 2 serve it best (see docs/performance.md); KAM_SHM_MB (2048) its shared
# memory in MB (-m): with 512, Kamailio 5.6 ran out of shared memory above 2800 calls/s
# here, failed calls and then crashed, which measured its configuration, not its speed;
# RELAYD_RESULT
# (target/bench/relayd.last) a file holding bench.sh's output to compare with; KEEP=1 keeps
# the work directory (kamailio.cfg, kamailio.log with the accounting lines, sipp statistics)
# and says where it is.
#
# "Accounting" here is Kamailio's acc module writing to its log (a file): one line per
# INVITE and BYE transaction answered, and one CDR line per dialog when it ends. It is not
# a database commit: acc to SQLite (db_sqlite) loses records under this load in 5.6 (its
# worker processes collide on the database lock and db_sqlite has no busy timeout), so the
# log is the accounting backend that works on one machine without a database server.
#
# Installs kamailio with apt-get, saying so, when missing; needs sipp (sip-tester) as
# bench.sh does. Everything it starts (kamailio, sipp) is stopped by pid on exit, also on
# failure or ^C.
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
KAM_CHILDREN=${KAM_CHILDREN:-8}
KAM_SHM_MB=${KAM_SHM_MB:-2048}
RELAYD_RESULT=${RELAYD_RESULT:-$ROOT/target/bench/relayd.last}

if ! command -v sipp >/dev/null 2>&1; then
    echo "bench-kamailio: sipp not found; install the Debian package sip-tester" >&2
    exit 1
fi

# Debian packages this run needs and does not have.
NEED=()
command -v kamailio >/dev/null 2>&1 || NEED+=(kamailio)
if [ ${#NEED[@]} -gt 0 ]; then
    echo "bench-kamailio: installing ${NEED[*]} (apt-get install -y)" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
    # The package's postinst would start the system service; policy-rc.d usually forbids
    # that in containers, and the script never talks to that instance anyway.
    "${SUDO[@]}" apt-get install -y -q "${NEED[@]}" >&2
fi
KAMAILIO=$(command -v kamailio)
MPATH=$(dirname "$(dpkg -L kamailio | grep -m 1 '/modules/tm\.so$')")
KAM_VERSION=$("$KAMAILIO" -v | awk 'NR == 1 { print $2, $3 }')

start_work bench-kamailio kamailio-bench
KAM_PORT=$(free_port)
AS_PORT=$(free_port)
while [ "$AS_PORT" = "$KAM_PORT" ]; do AS_PORT=$(free_port); done

# The subscriber table (db_text, loaded into memory at start): alice with her password,
# realm relay.test, as in bench.sh's relayd.toml.
mkdir -p "$WORK/db" "$WORK/run"
cat >"$WORK/db/version" <<'EOF'
id(int,auto) table_name(string) table_version(int)
1:subscriber:7
EOF
# db_text allows no empty column: ha1 and ha1b are filled too, though calculate_ha1 makes
# Kamailio digest the plain password on each request (as relayd does).
HA1=$(printf '%s' 'alice:relay.test:alice-secret' | md5sum | cut -d' ' -f1)
HA1B=$(printf '%s' 'alice@relay.test:relay.test:alice-secret' | md5sum | cut -d' ' -f1)
cat >"$WORK/db/subscriber" <<EOF
id(int,auto) username(string) domain(string) password(string) ha1(string) ha1b(string)
1:alice:relay.test:alice-secret:$HA1:$HA1B
EOF

# Kamailio as an authenticating, dialog-tracking, accounting proxy (modelled on the stock
# kamailio.cfg with WITH_AUTH and WITH_ACCDB-style accounting, reduced to this load).
cat >"$WORK/kamailio.cfg" <<EOF
#!KAMAILIO
#!define FLT_ACC 1
#!define FLT_ACCFAILED 3

debug=1
log_stderror=yes
children=$KAM_CHILDREN
disable_tcp=yes
auto_aliases=no
# The receive buffer relayd asks for (4 MiB, capped by net.core.rmem_max): Kamailio probes
# upwards to this limit, 256 KiB by default.
maxbuffer=4194304
alias="relay.test"
listen=udp:127.0.0.1:$KAM_PORT
rundir="$WORK/run"
mpath="$MPATH"

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "sanity.so"
loadmodule "db_text.so"
loadmodule "auth.so"
loadmodule "auth_db.so"
loadmodule "dialog.so"
loadmodule "acc.so"

modparam("usrloc", "db_mode", 0)
modparam("auth_db", "db_url", "text://$WORK/db")
modparam("auth_db", "calculate_ha1", yes)
modparam("auth_db", "password_column", "password")
modparam("auth_db", "load_credentials", "")
modparam("dialog", "db_mode", 0)
modparam("acc", "log_flag", FLT_ACC)
modparam("acc", "failed_transaction_flag", FLT_ACCFAILED)
modparam("acc", "log_level", 1)
modparam("acc", "cdr_enable", 1)
modparam("acc", "cdr_log_enable", 1)

request_route {
    if (!mf_process_maxfwd_header("10")) {
        sl_send_reply("483", "Too Many Hops");
        exit;
    }
    if (!sanity_check("17895", "7")) {
        exit;
    }
    if (has_totag()) {
        route(WITHINDLG);
        exit;
    }
    if (is_method("ACK")) {
        if (t_check_trans()) {
            t_relay();
        }
        exit;
    }
    t_check_trans();
    if (is_method("REGISTER")) {
        if (!auth_check("\$fd", "subscriber", "1")) {
            auth_challenge("\$fd", "1");
            exit;
        }
        consume_credentials();
        if (!save("location")) {
            sl_reply_error();
        }
        exit;
    }
    if (!is_method("INVITE")) {
        sl_send_reply("405", "Method Not Allowed");
        exit;
    }
    if (!auth_check("\$fd", "subscriber", "1")) {
        auth_challenge("\$fd", "1");
        exit;
    }
    consume_credentials();
    if (\$rU != "echo" || !(uri == myself)) {
        sl_send_reply("404", "Not Found");
        exit;
    }
    record_route();
    dlg_manage();
    setflag(FLT_ACC);
    setflag(FLT_ACCFAILED);
    append_hf("P-Asserted-Identity: <sip:\$au@relay.test>\r\n");
    append_hf("P-Asserted-Service: \$rU\r\n");
    \$du = "sip:127.0.0.1:$AS_PORT";
    if (!t_relay()) {
        sl_reply_error();
    }
    exit;
}

route[WITHINDLG] {
    if (loose_route()) {
        if (is_method("BYE")) {
            setflag(FLT_ACC);
            setflag(FLT_ACCFAILED);
        }
        if (!t_relay()) {
            sl_reply_error();
        }
        exit;
    }
    if (is_method("ACK")) {
        if (t_check_trans()) {
            t_relay();
        }
        exit;
    }
    sl_send_reply("404", "Not here");
    exit;
}
EOF

if ! "$KAMAILIO" -c -f "$WORK/kamailio.cfg" >"$WORK/check.log" 2>&1; then
    echo "bench-kamailio: kamailio rejects the generated configuration:" >&2
    tail -20 "$WORK/check.log" >&2
    exit 1
fi

printf 'SEQUENTIAL\nalice;alice-secret\n' >"$WORK/users.csv"

# The server of bench.sh, but echoing the INVITE's Record-Route in its 180 and 200 (RFC 3261
# section 12.1.1): behind relayd, a B2BUA, it never sees one; behind a proxy, the ACK and
# BYE would otherwise not come back through Kamailio.
awk '{ print } /\[last_CSeq:\]/ && ++n <= 2 { sub(/\[last_CSeq:\].*/, "[last_Record-Route:]"); print }' \
    "$SCENARIOS/uas_answer.xml" >"$WORK/uas_answer.xml"
if [ "$(grep -c 'last_Record-Route' "$WORK/uas_answer.xml")" -ne 2 ]; then
    echo "bench-kamailio: uas_answer.xml has changed shape; cannot add Record-Route to it" >&2
    exit 1
fi

(cd "$WORK" && exec "${LOAD_CPUS[@]}" sipp -sf "$WORK/uas_answer.xml" -i 127.0.0.1 -p "$AS_PORT" -aa -buff_size "$SIPP_BUFFER" \
    -nostdin -trace_err -error_file "$WORK/uas-errors.log" >/dev/null 2>"$WORK/uas.stderr") &
UAS_PID=$!
PIDS+=("$UAS_PID")
# -DD: the main process stays in the foreground (its workers are its children and end with
# it); -E: log (accounting and CDRs included) to standard error, here a file; -m: shared
# memory in MB, for the transactions and dialogs of the highest rates.
"${SERVER_CPUS[@]}" "$KAMAILIO" -DD -E -m "$KAM_SHM_MB" -M 16 -f "$WORK/kamailio.cfg" >/dev/null 2>"$WORK/kamailio.log" &
KAM_PID=$!
PIDS+=("$KAM_PID")

# Registering is also the readiness check: sipp retransmits the REGISTER until Kamailio
# answers, for at most 10 s.
mkdir -p "$WORK/register"
(cd "$WORK/register" && exec "${LOAD_CPUS[@]}" sipp "127.0.0.1:$KAM_PORT" -sf "$SCENARIOS/uac_register.xml" \
    -inf "$WORK/users.csv" -au alice -ap alice-secret -i 127.0.0.1 -m 1 -nostdin \
    -timeout 10s -timeout_error >/dev/null 2>&1) &
REG_PID=$!
PIDS+=("$REG_PID")
if ! wait "$REG_PID"; then
    echo "bench-kamailio: alice could not register; kamailio log:" >&2
    tail -20 "$WORK/kamailio.log" >&2
    exit 1
fi




# CDRs written so far: the acc module logs one per ended dialog.
records() {
    grep -c 'start_time=.*end_time=' "$WORK/kamailio.log" || true
}

run_rates bench-kamailio "$KAM_PORT" "$KAM_PID" "$WORK/kamailio.log"

# Kamailio's memory now: proportional set size summed over the main process and its
# workers (each shared page split among the processes that map it), so the shared memory
# pool (-m) is counted once, as far as it was touched.
PSS=0
NPROC=0
for pid in $KAM_PID $(pgrep -P "$KAM_PID" || true); do
    kb=$(awk '/^Pss:/ { print $2 }' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
    PSS=$((PSS + ${kb:-0}))
    NPROC=$((NPROC + 1))
done
echo
echo "highest rate with every call completed and billed: $BEST calls/s"
echo "highest such rate kept pace with (achieved >= 95 % of it): $KEPT calls/s"
echo "highest such rate with no retransmission and p99 setup <= 200 ms: $STRICT calls/s"
echo "kamailio: $KAM_VERSION, $KAM_CHILDREN UDP workers, accounting and CDRs to its log file"
echo "kamailio memory after the runs (PSS summed over its $NPROC processes): $PSS kB"
echo "call setup: first INVITE sent to the 200 received (407 round trip included),"
echo "from the terminal's message trace, microsecond timestamps"
echo "machine: $PIN_NOTE"

# Side by side with relayd, if bench.sh's output was saved (scripts/bench.sh | tee FILE).
if [ -r "$RELAYD_RESULT" ]; then
    RELAYD_BEST=$(sed -n 's/^highest rate with every call completed and billed: \([0-9]*\) calls\/s$/\1/p' "$RELAYD_RESULT" | tail -1)
    RELAYD_KEPT=$(sed -n 's/^highest such rate kept pace with (achieved >= 95 % of it): \([0-9]*\) calls\/s$/\1/p' "$RELAYD_RESULT" | tail -1)
    if [ -n "$RELAYD_BEST" ]; then
        ratio() { awk -v r="$1" -v k="$2" 'BEGIN { if (k > 0) printf "%.2f", r / k; else print "-" }'; }
        echo
        echo "relayd (from $RELAYD_RESULT, $(date -r "$RELAYD_RESULT" '+%F %T')):"
        echo "  every call completed: relayd $RELAYD_BEST, kamailio $BEST calls/s ($BEST_ROW);" \
            "relayd/kamailio = $(ratio "$RELAYD_BEST" "$BEST") (issue 4 asks >= 1.5)"
        echo "  kept pace with:       relayd ${RELAYD_KEPT:-?}, kamailio $KEPT calls/s;" \
            "relayd/kamailio = $(ratio "${RELAYD_KEPT:-0}" "$KEPT")"
    fi
else
    echo "(no relayd result at $RELAYD_RESULT: run scripts/bench.sh | tee $RELAYD_RESULT to compare)"
fi
