//! Claims 4–7 of the relay across processes (issue 7): `relayd` run as a program, sipp
//! (Debian's `sip-tester`) as the terminal and as several application servers, each on its
//! own UDP port; the billing store read back afterwards with `relayd billing export`.
//!
//! * claim 4 — application billing: charge requests in and out of dialog, answered 200 and
//!   billed once (also when retransmitted or repeated), refused with 400 or 403 otherwise;
//! * claim 5 — service change: the session moves to a server of the new service (or is
//!   re-INVITEd on its own server) and its bill splits in two; refusals leave it as it was;
//! * claim 6 — transfer: REFER, 202, NOTIFY sipfrags, a second server, the terminal
//!   re-INVITEd, the first server's leg ended, one record per server; refusals reported;
//! * claim 7 — forking: one request to three servers giving two sessions; the best final
//!   response when all refuse; CANCEL of every pending leg.
//!
//! Every scenario logs what it saw (status lines, sipfrags, session tokens, which requests a
//! server got) and the test compares those with what the claim says, so a failure names
//! the wrong answer rather than a sipp step number.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::Value;

use support::relay::{server_uri, RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sipp::Transport;
use support::{ALICE, AS1, AS2, BOB, STEP};

/// Collects every mismatch of a test, so one run shows all that is wrong, then fails with
/// them and the logs of every process.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.0.push(what.into());
        }
    }

    fn equal<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, actual: T, expected: T) {
        if actual != expected {
            self.0
                .push(format!("{what}: got {actual:?}, expected {expected:?}"));
        }
    }

    /// Compares what application server `name` saw — the first word of each line it
    /// logged: INVITE, ACK, REINVITE, CANCEL, BYE… — with `expected`, waiting (at most
    /// [`support::STEP`]) until it has logged as many events, so a request still in
    /// flight when the terminal finished is counted.
    fn server_saw(&mut self, scene: &Scene, name: &str, expected: &[&str]) {
        let events = |lines: &[String]| -> Vec<String> {
            lines
                .iter()
                .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
                .collect()
        };
        let seen = events(
            &scene
                .server_named(name)
                .wait_for_log(|l| l.len() >= expected.len()),
        );
        let expected: Vec<String> = expected.iter().map(|e| e.to_string()).collect();
        self.equal(&format!("what {name} saw"), seen, expected);
    }

    fn finish(self, scene: &Scene) {
        assert!(
            self.0.is_empty(),
            "{} finding(s):\n  - {}\n\n{}",
            self.0.len(),
            self.0.join("\n  - "),
            scene.report(None)
        );
    }
}

fn uri(port: u16) -> String {
    server_uri(port, Transport::Udp)
}

/// The logged lines starting with `prefix`, without it.
fn logged(lines: &[String], prefix: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| l.trim().to_string())
        .collect()
}

fn has_line(lines: &[String], prefix: &str) -> bool {
    lines.iter().any(|l| l.starts_with(prefix))
}

/// The session token a terminal logged as `<prefix>token=<token>`.
fn token(lines: &[String], prefix: &str) -> Option<String> {
    logged(lines, prefix)
        .first()
        .and_then(|l| l.strip_prefix("token=").map(str::to_string))
}

fn text<'a>(record: &'a Value, key: &str) -> &'a str {
    record[key].as_str().unwrap_or("<none>")
}

/// (service, server, cause) of each session record, in the store's order.
fn sessions_summary(records: &[Value]) -> Vec<(String, String, String)> {
    records
        .iter()
        .map(|r| {
            (
                text(r, "service").to_string(),
                text(r, "server").to_string(),
                text(r, "cause").to_string(),
            )
        })
        .collect()
}

fn summary(service: &str, port: u16, cause: &str) -> (String, String, String) {
    (service.to_string(), uri(port), cause.to_string())
}

/// Session records that belong to one call must each have their own session id and the
/// terminal's Call-ID, and follow each other in time.
fn check_segments(f: &mut Findings, records: &[Value], call_id: &str) {
    let mut ids: Vec<&str> = records.iter().map(|r| text(r, "session_id")).collect();
    ids.sort_unstable();
    ids.dedup();
    f.equal("distinct session ids", ids.len(), records.len());
    for r in records {
        f.equal("record call_id", text(r, "call_id"), call_id);
        f.equal("record subscriber", text(r, "subscriber"), "alice");
    }
    for pair in records.windows(2) {
        let ended = pair[0]["ended_at_ms"].as_i64().unwrap_or(i64::MAX);
        let started = pair[1]["confirmed_at_ms"].as_i64().unwrap_or(i64::MIN);
        f.check(
            ended <= started,
            format!("segments overlap: one ends at {ended}, the next starts at {started}"),
        );
    }
}

// ---------------------------------------------------------------------------------------
// Claim 4: application billing.

#[test]
fn charge_in_dialog_is_billed_once_despite_a_retransmission_and_a_duplicate() {
    let mut scene = Scene::new();
    let echo = scene.server(
        "echo",
        "server_charge.xml",
        &[("token", "e1"), ("event", "as1-ev-1"), ("amount", "25")],
    );
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .server(ServerSpec::udp(echo, &["echo"]).account("as1"))
            .user(ALICE, &["echo"])
            .account(AS1),
    );
    let mut terminal = scene.terminal("terminal", "terminal_hold.xml", ALICE, "echo", &[]);
    scene.assert_success(&mut terminal);
    let mut f = Findings::default();
    // The relay commits the session record before it answers the server's BYE.
    f.server_saw(
        &scene,
        "echo",
        &[
            "INVITE",
            "ACK",
            "CHARGE",
            "CHARGE",
            "CHARGE",
            "BYE-ANSWERED",
        ],
    );
    let server_log = scene.server_named("echo").log();
    f.equal(
        "answers to the charge, its retransmission and its duplicate",
        logged(&server_log, "CHARGE "),
        vec!["SIP/2.0 200 OK".to_string(); 3],
    );
    f.equal(
        "answer to the server's BYE",
        logged(&server_log, "BYE-ANSWERED "),
        vec!["SIP/2.0 200 OK".to_string()],
    );
    f.check(
        terminal.log().iter().any(|l| l == "BYE"),
        "the terminal was not sent the server's BYE",
    );
    let sessions = scene.session_records();
    f.equal(
        "session records",
        sessions_summary(&sessions),
        vec![summary("echo", echo, "server-bye")],
    );
    let charges = scene.charge_records();
    f.equal("charge records", charges.len(), 1);
    if let (Some(c), Some(s)) = (charges.first(), sessions.first()) {
        f.equal("event id", text(c, "event_id"), "as1-ev-1");
        f.equal(
            "amount",
            &c["amount"],
            &serde_json::json!({"minor": 25, "currency": "EUR"}),
        );
        f.equal("subscriber", text(c, "subscriber"), "alice");
        f.equal("service", text(c, "service"), "echo");
        f.equal(
            "session of the charge",
            text(c, "session_id"),
            text(s, "session_id"),
        );
        f.equal("description", text(c, "description"), "charged in dialog");
        // Charges are keyed by the server's URI, as its session records are.
        f.equal("charging server", text(c, "server").to_string(), uri(echo));
    }
    f.finish(&scene);
}

#[test]
fn charge_out_of_dialog_gets_its_status_and_only_good_charges_are_billed() {
    let mut scene = Scene::new();
    let echo = scene.server("echo", "server_answer.xml", &[("token", "e1")]);
    let clock = scene.server("clock", "server_answer.xml", &[("token", "c1")]);
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .service("clock", "first")
            .server(ServerSpec::udp(echo, &["echo"]).account("as1"))
            .server(ServerSpec::udp(clock, &["clock"]).account("as2"))
            .user(ALICE, &["echo", "clock"])
            .user(BOB, &["echo"])
            .account(AS1)
            .account(AS2)
            .max_charge(1000),
    );
    let mut terminal = scene.terminal("terminal", "terminal_hold.xml", ALICE, "echo", &[]);
    let established = terminal.wait_for_log(|l| has_line(l, "ESTABLISHED"));
    assert!(
        has_line(&established, "ESTABLISHED"),
        "the session was never established\n{}",
        scene.report(Some(&terminal))
    );
    let server_log = scene.server_named("echo").log();
    let leg = logged(&server_log, "INVITE ")
        .first()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .expect("the echo server logged no INVITE");
    let call = terminal.call_id.clone();

    let cases: Vec<(&str, (&str, &str), String, &str)> = vec![
        (
            "by the server leg's Call-ID",
            AS1,
            format!(r#"{{"event_id": "as1-1", "call_id": "{leg}", "amount": 40, "currency": "EUR", "description": "by leg"}}"#),
            "200",
        ),
        (
            "the same event id again",
            AS1,
            format!(r#"{{"event_id": "as1-1", "call_id": "{leg}", "amount": 40, "currency": "EUR", "description": "by leg"}}"#),
            "200",
        ),
        (
            "by units, naming the terminal's Call-ID",
            AS1,
            format!(r#"{{"event_id": "as1-2", "call_id": "{call}", "units": 3, "unit_price": 5, "currency": "EUR", "description": "by units"}}"#),
            "200",
        ),
        (
            "a subscriber the server has served",
            AS1,
            r#"{"event_id": "as1-3", "subscriber": "alice", "amount": 7, "description": "by subscriber"}"#.to_string(),
            "200",
        ),
        (
            "malformed JSON",
            AS1,
            format!(r#"{{"event_id": "as1-4", "call_id": "{leg}", "amount": "#),
            "400",
        ),
        (
            "no event id",
            AS1,
            format!(r#"{{"call_id": "{leg}", "amount": 5}}"#),
            "400",
        ),
        (
            "no amount",
            AS1,
            format!(r#"{{"event_id": "as1-5", "call_id": "{leg}", "currency": "EUR"}}"#),
            "400",
        ),
        (
            "an amount over [billing] max_charge",
            AS1,
            format!(r#"{{"event_id": "as1-6", "call_id": "{leg}", "amount": 1001}}"#),
            "400",
        ),
        (
            "a session another server serves",
            AS2,
            format!(r#"{{"event_id": "as2-1", "call_id": "{leg}", "amount": 5}}"#),
            "403",
        ),
        (
            "a subscriber the server never served",
            AS1,
            r#"{"event_id": "as1-7", "subscriber": "bob", "amount": 5}"#.to_string(),
            "403",
        ),
    ];
    let mut f = Findings::default();
    let charge_each = |f: &mut Findings, cases: &[(&str, (&str, &str), String, &str)]| {
        for (what, account, body, expected) in cases {
            let status = scene.charge(*account, body);
            f.check(
                status.starts_with(&format!("SIP/2.0 {expected} ")),
                format!("charge {what}: got {status:?}, expected {expected}"),
            );
        }
    };
    charge_each(&mut f, &cases);

    terminal.signal_hang_up();
    scene.assert_success(&mut terminal);
    f.server_saw(&scene, "echo", &["INVITE", "ACK", "BYE"]);
    f.server_saw(&scene, "clock", &[]);
    f.equal(
        "the terminal's BYE answered",
        logged(&terminal.log(), "BYE-ANSWERED "),
        vec!["SIP/2.0 200 OK".to_string()],
    );
    let sessions = scene.session_records();
    let session_id = sessions.first().map(|s| text(s, "session_id").to_string());
    // The BYE was answered once the session's record was committed, and the relay keeps
    // ended sessions no longer: a late charge is checked against that record (within
    // [billing] late_charge_grace_secs), for the account of the server that served it only.
    let sid = session_id.clone().unwrap_or_default();
    let late = [
        (
            "a late charge naming the ended session",
            AS1,
            format!(r#"{{"event_id": "as1-8", "session_id": "{sid}", "amount": 9}}"#),
            "200",
        ),
        (
            "a late charge by the ended session's server leg Call-ID",
            AS1,
            format!(r#"{{"event_id": "as1-9", "call_id": "{leg}", "amount": 11}}"#),
            "200",
        ),
        (
            "a late charge for the ended session from another account",
            AS2,
            format!(r#"{{"event_id": "as2-2", "call_id": "{call}", "amount": 5}}"#),
            "403",
        ),
        (
            "a late charge naming no session that ever was",
            AS1,
            r#"{"event_id": "as1-10", "call_id": "no-such-call", "amount": 5}"#.to_string(),
            "403",
        ),
    ];
    charge_each(&mut f, &late);
    f.equal(
        "session records",
        sessions_summary(&sessions),
        vec![summary("echo", echo, "caller-bye")],
    );
    let charges = scene.charge_records();
    let mut got: Vec<(String, i64, Value, Option<String>, String, String)> = charges
        .iter()
        .map(|c| {
            (
                text(c, "event_id").to_string(),
                c["amount"]["minor"].as_i64().unwrap_or(-1),
                c["units"].clone(),
                c["session_id"].as_str().map(str::to_string),
                text(c, "subscriber").to_string(),
                text(c, "server").to_string(),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let server = uri(echo);
    f.equal(
        "charge records (event, amount, units, session, subscriber, server)",
        got,
        vec![
            (
                "as1-1".to_string(),
                40,
                Value::Null,
                session_id.clone(),
                "alice".to_string(),
                server.clone(),
            ),
            (
                "as1-2".to_string(),
                15,
                serde_json::json!({"units": 3, "unit_price_minor": 5}),
                session_id.clone(),
                "alice".to_string(),
                server.clone(),
            ),
            (
                "as1-3".to_string(),
                7,
                Value::Null,
                None,
                "alice".to_string(),
                server.clone(),
            ),
            (
                "as1-8".to_string(),
                9,
                Value::Null,
                session_id.clone(),
                "alice".to_string(),
                server.clone(),
            ),
            (
                "as1-9".to_string(),
                11,
                Value::Null,
                session_id,
                "alice".to_string(),
                server,
            ),
        ],
    );
    f.finish(&scene);
}

// ---------------------------------------------------------------------------------------
// Claim 5: service change.

#[test]
fn change_to_a_service_of_another_server_moves_the_session_and_splits_the_bill() {
    let mut scene = Scene::new();
    let echo = scene.server("echo", "server_answer.xml", &[("token", "e1")]);
    let clock = scene.server("clock", "server_answer.xml", &[("token", "c1")]);
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .service("clock", "first")
            .server(ServerSpec::udp(echo, &["echo"]))
            .server(ServerSpec::udp(clock, &["clock"]))
            .user(ALICE, &["echo", "clock"]),
    );
    let mut terminal = scene.terminal(
        "terminal",
        "terminal_change.xml",
        ALICE,
        "echo",
        &[("target", "clock")],
    );
    scene.assert_success(&mut terminal);

    let mut f = Findings::default();
    // The old leg ended with BYE; the new one was inquired, confirmed and ended by the caller.
    f.server_saw(&scene, "echo", &["INVITE", "ACK", "BYE"]);
    f.server_saw(&scene, "clock", &["INVITE", "ACK", "BYE"]);
    let clock_log = scene.server_named("clock").log();
    let t = terminal.log();
    f.check(
        token(&t, "ANSWERED ").is_some_and(|t| t.starts_with("e1-")),
        "the session did not start on the echo server",
    );
    let changed = logged(&t, "CHANGED ");
    f.check(
        changed.len() == 1
            && changed[0].starts_with("SIP/2.0 200 ")
            && changed[0].contains("token=c1-"),
        format!("the change was not answered 200 with the clock server's SDP: {changed:?}"),
    );
    f.equal(
        "clock server's inquiry",
        logged(&clock_log, "INVITE ")
            .iter()
            .map(|l| {
                l.split_once(' ')
                    .map(|x| x.1.to_string())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>(),
        vec!["service=clock identity=<sip:alice@relay.test>".to_string()],
    );
    let sessions = scene.session_records();
    f.equal(
        "session records",
        sessions_summary(&sessions),
        vec![
            summary("echo", echo, "changed"),
            summary("clock", clock, "caller-bye"),
        ],
    );
    check_segments(&mut f, &sessions, &terminal.call_id);
    f.finish(&scene);
}

#[test]
fn change_to_a_service_of_the_same_server_reinvites_its_leg() {
    let mut scene = Scene::new();
    let both = scene.server("both", "server_answer.xml", &[("token", "b1")]);
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .service("clock", "first")
            .server(ServerSpec::udp(both, &["echo", "clock"]))
            .user(ALICE, &["echo", "clock"]),
    );
    let mut terminal = scene.terminal(
        "terminal",
        "terminal_change.xml",
        ALICE,
        "echo",
        &[("target", "clock")],
    );
    scene.assert_success(&mut terminal);

    let mut f = Findings::default();
    f.server_saw(&scene, "both", &["INVITE", "ACK", "REINVITE", "BYE"]);
    let log = scene.server_named("both").log();
    let changed = logged(&terminal.log(), "CHANGED ");
    f.check(
        changed.len() == 1
            && changed[0].starts_with("SIP/2.0 200 ")
            && changed[0].ends_with("-changed"),
        format!(
            "the change was not answered with the server's answer to its re-INVITE: {changed:?}"
        ),
    );
    f.equal(
        "re-INVITEs (with the asserted service)",
        logged(&log, "REINVITE ")
            .iter()
            .map(|l| {
                l.split_once(' ')
                    .map(|x| x.1.to_string())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>(),
        vec!["service=clock".to_string()],
    );
    let sessions = scene.session_records();
    f.equal(
        "session records",
        sessions_summary(&sessions),
        vec![
            summary("echo", both, "changed"),
            summary("clock", both, "caller-bye"),
        ],
    );
    check_segments(&mut f, &sessions, &terminal.call_id);
    f.finish(&scene);
}

/// A re-INVITE without P-Preferred-Service whose offer names another service
/// (`a=service:clock`) is not a change: relayed, it would switch the server to a service
/// the relay goes on billing as the old one. It is refused with 488 and never reaches the
/// server; a plain re-INVITE is relayed, asserting the session's service.
#[test]
fn a_reinvite_naming_another_service_in_its_sdp_is_refused_and_relayed_ones_assert_the_service() {
    let mut scene = Scene::new();
    let both = scene.server("both", "server_answer.xml", &[("token", "b1")]);
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .service("clock", "first")
            .server(ServerSpec::udp(both, &["echo", "clock"]))
            .user(ALICE, &["echo", "clock"]),
    );
    let mut terminal = scene.terminal(
        "terminal",
        "terminal_sdp_service.xml",
        ALICE,
        "echo",
        &[("target", "clock")],
    );
    scene.assert_success(&mut terminal);

    let mut f = Findings::default();
    let t = terminal.log();
    f.check(
        logged(&t, "SDP-CHANGE ")
            .iter()
            .all(|l| l.starts_with("SIP/2.0 488 ")),
        format!("the SDP-only change was not refused 488: {t:?}"),
    );
    f.check(
        logged(&t, "UPDATED ")
            .iter()
            .all(|l| l.starts_with("SIP/2.0 200 ")),
        format!("the plain re-INVITE was not answered 200: {t:?}"),
    );
    // One re-INVITE reached the server (the plain one), asserting the session's service.
    f.server_saw(&scene, "both", &["INVITE", "ACK", "REINVITE", "BYE"]);
    f.equal(
        "re-INVITEs the server got (with the asserted service)",
        logged(&scene.server_named("both").log(), "REINVITE ")
            .iter()
            .map(|l| {
                l.split_once(' ')
                    .map(|x| x.1.to_string())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>(),
        vec!["service=echo".to_string()],
    );
    f.equal(
        "session records",
        sessions_summary(&scene.session_records()),
        vec![summary("echo", both, "caller-bye")],
    );
    f.finish(&scene);
}

#[test]
fn change_refusals_reach_the_terminal_and_leave_the_session_as_it_was() {
    let mut scene = Scene::new();
    let echo = scene.server("echo", "server_answer.xml", &[("token", "e1")]);
    let clock = scene.server("clock", "server_busy.xml", &[]);
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .service("clock", "first")
            .service("premium", "first")
            .server(ServerSpec::udp(echo, &["echo"]))
            .server(ServerSpec::udp(clock, &["clock"]))
            .user(ALICE, &["echo", "clock"]),
    );
    let mut terminal = scene.terminal(
        "terminal",
        "terminal_change_refused.xml",
        ALICE,
        "echo",
        &[
            ("unknown", "video"),
            ("unsubscribed", "premium"),
            ("refused", "clock"),
        ],
    );
    let status = terminal.wait_exit(STEP);

    let mut f = Findings::default();
    // Only the refusing server was inquired; the session's own leg was never touched.
    f.server_saw(&scene, "echo", &["INVITE", "ACK", "BYE"]);
    f.server_saw(&scene, "clock", &["INVITE", "ACK"]);
    f.check(
        status.success(),
        format!("the terminal's scenario failed ({status})"),
    );
    let t = terminal.log();
    let changes = logged(&t, "CHANGE ");
    let answer = |service: &str| {
        changes
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{service} ")))
            .unwrap_or("<no answer>")
            .to_string()
    };
    f.check(
        answer("video").starts_with("SIP/2.0 404 "),
        format!(
            "change to an unknown service: got {:?}, expected 404",
            answer("video")
        ),
    );
    f.check(
        answer("premium").starts_with("SIP/2.0 403 "),
        format!(
            "change to a service not subscribed: got {:?}, expected 403",
            answer("premium")
        ),
    );
    f.check(
        answer("clock").starts_with("SIP/2.0 486 "),
        format!(
            "change refused by the new server (486 Busy Here): got {:?}, expected the refusal relayed",
            answer("clock")
        ),
    );
    f.equal(
        "the final BYE answered",
        logged(&t, "BYE-ANSWERED "),
        vec!["SIP/2.0 200 OK".to_string()],
    );
    f.equal(
        "session records",
        sessions_summary(&scene.session_records()),
        vec![summary("echo", echo, "caller-bye")],
    );
    f.finish(&scene);
}

// ---------------------------------------------------------------------------------------
// Claim 6: transfer.

#[test]
fn transfer_moves_the_session_to_a_second_server_with_notify_reports() {
    let mut scene = Scene::new();
    let first = scene.server("echo-1", "server_answer.xml", &[("token", "e1")]);
    let second = scene.server("echo-2", "server_answer.xml", &[("token", "e2")]);
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .server(ServerSpec::udp(first, &["echo"]))
            .server(ServerSpec::udp(second, &["echo"]))
            .user(ALICE, &["echo"]),
    );
    let mut terminal = scene.terminal(
        "terminal",
        "terminal_transfer.xml",
        ALICE,
        "echo",
        &[("target", "echo")],
    );
    let status = terminal.wait_exit(STEP);

    let mut f = Findings::default();
    // The first server's leg ended with BYE; the second one took the session to its end.
    f.server_saw(&scene, "echo-1", &["INVITE", "ACK", "BYE"]);
    f.server_saw(&scene, "echo-2", &["INVITE", "ACK", "BYE"]);
    f.check(
        status.success(),
        format!("the terminal's scenario failed ({status})"),
    );
    let t = terminal.log();
    f.check(
        token(&t, "ANSWERED ").is_some_and(|t| t.starts_with("e1-")),
        "the session did not start on the first server",
    );
    f.equal(
        "answer to the REFER",
        logged(&t, "REFER echo "),
        vec!["SIP/2.0 202 Accepted".to_string()],
    );
    let notifies = logged(&t, "NOTIFY ");
    f.equal("NOTIFY count", notifies.len(), 2);
    f.check(
        notifies.first().is_some_and(|n| {
            n.starts_with("SIP/2.0 100 Trying event=refer state=active")
                && n.contains("type=message/sipfrag")
        }),
        format!("first NOTIFY: {:?}", notifies.first()),
    );
    f.check(
        notifies.get(1).is_some_and(|n| {
            n.starts_with("SIP/2.0 200 OK event=refer state=terminated")
                && n.contains("type=message/sipfrag")
        }),
        format!("second NOTIFY: {:?}", notifies.get(1)),
    );
    f.check(
        token(&t, "REINVITED ").is_some_and(|t| t.starts_with("e2-")),
        format!(
            "the terminal was not re-INVITEd with the second server's SDP: {:?}",
            logged(&t, "REINVITED ")
        ),
    );
    f.check(
        has_line(&t, "ACKED"),
        "the relay did not ACK the terminal's 200",
    );
    let sessions = scene.session_records();
    f.equal(
        "session records",
        sessions_summary(&sessions),
        vec![
            summary("echo", first, "transferred"),
            summary("echo", second, "caller-bye"),
        ],
    );
    check_segments(&mut f, &sessions, &terminal.call_id);
    f.finish(&scene);
}

#[test]
fn transfer_refusals_are_reported_and_the_session_stays_on_the_first_server() {
    let mut scene = Scene::new();
    let first = scene.server("echo-1", "server_answer.xml", &[("token", "e1")]);
    let second = scene.server("echo-2", "server_busy.xml", &[]);
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .server(ServerSpec::udp(first, &["echo"]))
            .server(ServerSpec::udp(second, &["echo"]))
            .user(ALICE, &["echo"]),
    );
    let mut terminal = scene.terminal(
        "terminal",
        "terminal_transfer_refused.xml",
        ALICE,
        "echo",
        &[("unknown", "video"), ("target", "echo")],
    );
    let status = terminal.wait_exit(STEP);

    let mut f = Findings::default();
    f.check(
        status.success(),
        format!("the terminal's scenario failed ({status})"),
    );
    let t = terminal.log();
    let refer = |service: &str| {
        logged(&t, &format!("REFER {service} "))
            .first()
            .cloned()
            .unwrap_or_else(|| "<no answer>".into())
    };
    f.check(
        refer("video").starts_with("SIP/2.0 404 "),
        format!(
            "REFER to an unknown service: got {:?}, expected 404",
            refer("video")
        ),
    );
    f.check(
        refer("echo").starts_with("SIP/2.0 202 "),
        format!("REFER to echo: got {:?}, expected 202", refer("echo")),
    );
    let notifies = logged(&t, "NOTIFY ");
    f.check(
        notifies
            .first()
            .is_some_and(|n| n.starts_with("SIP/2.0 100 Trying event=refer")),
        format!("first NOTIFY: {:?}", notifies.first()),
    );
    f.check(
        notifies
            .get(1)
            .is_some_and(|n| n.starts_with("SIP/2.0 486 Busy Here event=refer state=terminated")),
        format!(
            "second NOTIFY: got {:?}, expected the second server's 486 Busy Here",
            notifies.get(1)
        ),
    );
    // The second server was inquired and refused; the session stayed on the first
    // server's leg until the terminal hung up.
    f.server_saw(&scene, "echo-2", &["INVITE", "ACK"]);
    f.server_saw(&scene, "echo-1", &["INVITE", "ACK", "BYE"]);
    f.equal(
        "the final BYE answered",
        logged(&t, "BYE-ANSWERED "),
        vec!["SIP/2.0 200 OK".to_string()],
    );
    f.equal(
        "session records",
        sessions_summary(&scene.session_records()),
        vec![summary("echo", first, "caller-bye")],
    );
    f.finish(&scene);
}

/// A rule that keeps alice's clock calls away from the clock service (sends them to
/// `premium`, which she does not subscribe to) holds for a change and a transfer as it
/// does for a new call: neither may reach clock by another way.
const CLOCK_RESTRICTED: &str = r#"
[[rules]]
name = "no-clock-for-alice"
match = { ruri_user = "^clock$", from_user = "^alice$" }
set = { service = "premium" }

[[rules]]
name = "default"
default = true
"#;

#[test]
fn change_and_transfer_run_the_rules_again() {
    // A change to clock: refused as a call to clock would be (403), clock never inquired.
    let mut scene = Scene::new();
    let echo = scene.server("echo", "server_answer.xml", &[("token", "e1")]);
    let clock = scene.server("clock", "server_answer.xml", &[("token", "c1")]);
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .service("clock", "first")
            .service("premium", "first")
            .server(ServerSpec::udp(echo, &["echo"]))
            .server(ServerSpec::udp(clock, &["clock"]))
            .user(ALICE, &["echo", "clock"])
            .extra_toml(CLOCK_RESTRICTED),
    );
    let mut terminal = scene.terminal(
        "terminal",
        "terminal_change_refused.xml",
        ALICE,
        "echo",
        &[
            ("unknown", "video"),
            ("unsubscribed", "news"),
            ("refused", "clock"),
        ],
    );
    let status = terminal.wait_exit(STEP);
    let mut f = Findings::default();
    f.check(
        status.success(),
        format!("the terminal's scenario failed ({status})"),
    );
    let changes = logged(&terminal.log(), "CHANGE clock ");
    f.check(
        changes.len() == 1 && changes[0].starts_with("SIP/2.0 403 "),
        format!("change to a service a rule keeps alice from: got {changes:?}, expected 403"),
    );
    f.server_saw(&scene, "echo", &["INVITE", "ACK", "BYE"]);
    f.server_saw(&scene, "clock", &[]);
    f.equal(
        "session records",
        sessions_summary(&scene.session_records()),
        vec![summary("echo", echo, "caller-bye")],
    );
    f.finish(&scene);

    // A transfer to clock: refused the same way, the session stays where it was.
    let mut scene = Scene::new();
    let first = scene.server("echo-1", "server_answer.xml", &[("token", "e1")]);
    let second = scene.server("echo-2", "server_busy.xml", &[]);
    let clock = scene.server("clock", "server_answer.xml", &[("token", "c1")]);
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .service("clock", "first")
            .service("premium", "first")
            .server(ServerSpec::udp(first, &["echo"]))
            .server(ServerSpec::udp(second, &["echo"]))
            .server(ServerSpec::udp(clock, &["clock"]))
            .user(ALICE, &["echo", "clock"])
            .extra_toml(CLOCK_RESTRICTED),
    );
    let mut terminal = scene.terminal(
        "terminal",
        "terminal_transfer_refused.xml",
        ALICE,
        "echo",
        &[("unknown", "clock"), ("target", "echo")],
    );
    let status = terminal.wait_exit(STEP);
    let mut f = Findings::default();
    f.check(
        status.success(),
        format!("the terminal's scenario failed ({status})"),
    );
    let refer = logged(&terminal.log(), "REFER clock ");
    f.check(
        refer.len() == 1 && refer[0].starts_with("SIP/2.0 403 "),
        format!("REFER to a service a rule keeps alice from: got {refer:?}, expected 403"),
    );
    f.server_saw(&scene, "clock", &[]);
    f.equal(
        "session records",
        sessions_summary(&scene.session_records()),
        vec![summary("echo", first, "caller-bye")],
    );
    f.finish(&scene);
}

/// The plan a rule sets for a service applies to the segment a change opens on it.
#[test]
fn a_change_is_billed_on_the_plan_the_rules_give_the_new_service() {
    let mut scene = Scene::new();
    let both = scene.server("both", "server_answer.xml", &[("token", "b1")]);
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .service("clock", "first")
            .server(ServerSpec::udp(both, &["echo", "clock"]))
            .user(ALICE, &["echo", "clock"])
            .extra_toml(
                r#"
[[rules]]
name = "clock-is-premium"
match = { ruri_user = "^clock$" }
set = { plan = "premium" }

[[rules]]
name = "default"
default = true
"#,
            ),
    );
    let mut terminal = scene.terminal(
        "terminal",
        "terminal_change.xml",
        ALICE,
        "echo",
        &[("target", "clock")],
    );
    scene.assert_success(&mut terminal);
    let records = scene.session_records();
    let plans: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (text(r, "service"), text(r, "plan")))
        .collect();
    assert_eq!(
        plans,
        [("echo", "basic"), ("clock", "premium")],
        "{records:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// Claim 7: forking.

#[test]
fn fork_to_three_servers_with_one_refusing_gives_two_sessions_and_two_records() {
    let mut scene = Scene::new();
    let a = scene.server("multi-a", "server_answer.xml", &[("token", "fa")]);
    let b = scene.server("multi-b", "server_answer.xml", &[("token", "fb")]);
    let c = scene.server("multi-c", "server_busy.xml", &[]);
    scene.start_relay(
        &RelayConfig::default()
            .service("multi", "all")
            .server(ServerSpec::udp(a, &["multi"]))
            .server(ServerSpec::udp(b, &["multi"]))
            .server(ServerSpec::udp(c, &["multi"]))
            .user(ALICE, &["multi"]),
    );
    let mut terminal = scene.terminal("terminal", "terminal_fork.xml", ALICE, "multi", &[]);
    scene.assert_success(&mut terminal);

    let mut f = Findings::default();
    let t = terminal.log();
    let mut tokens: Vec<String> = logged(&t, "ANSWERED ")
        .iter()
        .map(|l| {
            l.trim_start_matches("token=")
                .split('-')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    tokens.sort();
    f.equal(
        "servers whose 2xx reached the terminal",
        tokens,
        vec!["fa".to_string(), "fb".to_string()],
    );
    f.equal(
        "answers to the two BYEs",
        logged(&t, "BYE-ANSWERED "),
        vec!["SIP/2.0 200 OK".to_string(); 2],
    );
    f.server_saw(&scene, "multi-a", &["INVITE", "ACK", "BYE"]);
    f.server_saw(&scene, "multi-b", &["INVITE", "ACK", "BYE"]);
    f.server_saw(&scene, "multi-c", &["INVITE", "ACK"]);
    f.equal(
        "the refusing server was inquired",
        logged(&scene.server_named("multi-c").log(), "INVITE ")
            .iter()
            .map(|l| {
                l.split_once(' ')
                    .map(|x| x.1.to_string())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>(),
        vec!["service=multi".to_string()],
    );
    let sessions = scene.session_records();
    let mut got = sessions_summary(&sessions);
    got.sort();
    let mut expected = vec![
        summary("multi", a, "caller-bye"),
        summary("multi", b, "caller-bye"),
    ];
    expected.sort();
    f.equal("session records", got, expected);
    let mut ids: Vec<&str> = sessions.iter().map(|r| text(r, "session_id")).collect();
    ids.dedup();
    f.equal("distinct session ids", ids.len(), 2);
    for r in &sessions {
        f.equal(
            "record call_id",
            text(r, "call_id"),
            terminal.call_id.as_str(),
        );
    }
    f.finish(&scene);
}

#[test]
fn fork_where_every_server_refuses_gives_the_best_final_response() {
    let mut scene = Scene::new();
    let busy = scene.server("busy", "server_busy.xml", &[]);
    let unavailable = scene.server("unavailable", "server_unavailable.xml", &[]);
    scene.start_relay(
        &RelayConfig::default()
            .service("multi", "all")
            .server(ServerSpec::udp(busy, &["multi"]))
            .server(ServerSpec::udp(unavailable, &["multi"]))
            .user(ALICE, &["multi"]),
    );
    let mut terminal = scene.terminal("terminal", "terminal_refused.xml", ALICE, "multi", &[]);
    let status = terminal.wait_exit(STEP);

    let mut f = Findings::default();
    f.check(
        status.success(),
        format!("the terminal's scenario failed ({status})"),
    );
    // RFC 3261 §16.7 step 6: among 486 and 503 the lowest class wins.
    f.equal(
        "final response to the terminal",
        logged(&terminal.log(), "FINAL "),
        vec!["SIP/2.0 486 Busy Here".to_string()],
    );
    f.server_saw(&scene, "busy", &["INVITE", "ACK"]);
    f.server_saw(&scene, "unavailable", &["INVITE", "ACK"]);
    f.equal("session records", scene.session_records().len(), 0);
    f.finish(&scene);
}

#[test]
fn fork_cancel_cancels_every_pending_leg() {
    let mut scene = Scene::new();
    let a = scene.server("ring-a", "server_ring.xml", &[]);
    let b = scene.server("ring-b", "server_ring.xml", &[]);
    scene.start_relay(
        &RelayConfig::default()
            .service("multi", "all")
            .server(ServerSpec::udp(a, &["multi"]))
            .server(ServerSpec::udp(b, &["multi"]))
            .user(ALICE, &["multi"]),
    );
    let mut terminal = scene.terminal("terminal", "terminal_cancel.xml", ALICE, "multi", &[]);
    let status = terminal.wait_exit(STEP);

    let mut f = Findings::default();
    f.check(
        status.success(),
        format!("the terminal's scenario failed ({status})"),
    );
    let t = terminal.log();
    f.check(has_line(&t, "RINGING"), "no 180 reached the terminal");
    f.equal(
        "answer to the CANCEL",
        logged(&t, "CANCEL-ANSWERED "),
        vec!["SIP/2.0 200 OK".to_string()],
    );
    f.equal(
        "final response to the INVITE",
        logged(&t, "FINAL "),
        vec!["SIP/2.0 487 Request Terminated".to_string()],
    );
    // Both legs were pending (ringing) and both were cancelled.
    f.server_saw(&scene, "ring-a", &["INVITE", "CANCEL", "ACK"]);
    f.server_saw(&scene, "ring-b", &["INVITE", "CANCEL", "ACK"]);
    f.equal("session records", scene.session_records().len(), 0);
    f.finish(&scene);
}
