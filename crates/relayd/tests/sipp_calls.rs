//! Calls through relayd driven by sipp, a third-party SIP implementation, on both ends: a
//! sipp terminal (registers, INVITE with the 407 answered, ACK, holds, BYE) and a sipp
//! application server (answers the relay's inquiry, checks the asserted identity and
//! service). Every call must complete on both ends and be billed once, with the duration
//! the terminal held it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::billing::{field, int};
use support::relay::{server_uri, RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sip::SipClient;
use support::sipp::{SippOpts, Transport};
use support::ALICE;

const CALLS: u64 = 10;
const HOLD_MS: i64 = 1000;

/// N calls at 10 per second, each held 1 s, over `transport` on both legs.
fn calls_complete_and_are_billed(transport: Transport) {
    let mut scene = Scene::new();
    let as_port = scene.server("uas", "uas_answer.xml", SippOpts::default().over(transport));
    scene.start_relay(&RelayConfig::standard().server(ServerSpec::new(
        as_port,
        transport,
        &["echo"],
    )));

    let mut terminal = scene.terminal(
        "uac",
        "uac_call.xml",
        ALICE,
        "echo",
        SippOpts::default().over(transport).calls(CALLS).args(&[
            "-r",
            "10",
            "-d",
            &HOLD_MS.to_string(),
        ]),
    );
    let status = terminal.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "sipp terminal: {status}\n{}",
        scene.report(Some(&terminal))
    );
    let stats = terminal.stats().unwrap();
    assert_eq!(
        stats.count("SuccessfulCall"),
        CALLS,
        "{}",
        terminal.report()
    );

    // The server saw every call through to the BYE, and its check_it regexps on
    // P-Asserted-Identity / P-Asserted-Service held for each (a failed check_it does not
    // stop a sipp call: it is counted as failed at the call's end, so look at the counters).
    let server = scene.server_named("uas");
    let server_stats = server.wait_count("SuccessfulCall", CALLS, Duration::from_secs(10));
    assert_eq!(server_stats.count("FailedCall"), 0, "{}", server.report());
    assert_eq!(
        server_stats.count("FailedRegexpDoesntMatch"),
        0,
        "{}",
        server.report()
    );
    assert!(
        !server.errors().contains("Failed regexp match"),
        "{}",
        server.report()
    );

    let records = scene.session_records();
    assert_eq!(records.len() as u64, CALLS, "{records:#?}");
    let mut call_ids = HashSet::new();
    for r in &records {
        let d = int(r, "duration_ms");
        assert!(
            (d - HOLD_MS).abs() <= 100,
            "duration {d} ms is not the {HOLD_MS} ms held: {r}"
        );
        assert_eq!(field(r, "cause"), "caller-bye", "{r}");
        assert_eq!(field(r, "subscriber"), "alice", "{r}");
        assert_eq!(field(r, "service"), "echo", "{r}");
        assert_eq!(field(r, "server"), server_uri(as_port, transport), "{r}");
        call_ids.insert(field(r, "call_id").to_string());
    }
    assert_eq!(
        call_ids.len() as u64,
        CALLS,
        "one record per call: {records:#?}"
    );
}

#[test]
fn calls_over_udp_complete_and_are_billed_once_each() {
    calls_complete_and_are_billed(Transport::Udp);
}

#[test]
fn calls_over_tcp_complete_and_are_billed_once_each() {
    calls_complete_and_are_billed(Transport::Tcp);
}

/// The server scenario's identity check is not a formality: an inquiry without
/// P-Asserted-Identity sent straight to the same sipp server is counted as a failed call
/// with a regexp mismatch. (So the zero failures above mean the relay asserted it.)
#[test]
fn server_scenario_counts_a_missing_asserted_identity_as_a_failure() {
    let mut scene = Scene::new();
    let as_port = scene.server("uas", "uas_answer.xml", SippOpts::default());
    // A client posing as the relay but asserting nothing: it gets its 200 (sipp goes on
    // after a failed check), ACKs and hangs up, so the call reaches its end and is judged.
    let impostor = SipClient::new(as_port, "relay");
    let finals = impostor.invite("echo", &[]);
    assert_eq!(finals.last().map(|r| r.code), Some(200), "{finals:?}");
    let server = scene.server_named("uas");
    let stats = server.wait_count("FailedCall", 1, Duration::from_secs(10));
    assert_eq!(
        stats.count("FailedRegexpDoesntMatch"),
        1,
        "{}",
        server.report()
    );
    assert_eq!(stats.count("SuccessfulCall"), 0, "{}", server.report());
    assert!(
        server.errors().contains("Failed regexp match"),
        "{}",
        server.report()
    );
}
