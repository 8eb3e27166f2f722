//! Nothing billed is lost or counted twice when the relay stops with sessions up: killed
//! (SIGKILL), the next start closes the journaled sessions with cause
//! `recovered-after-restart`, exactly once however often it restarts; stopped (SIGTERM),
//! it hangs up both legs of every session, bills them `relay-shutdown` and exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::billing::{field, int};
use support::relay::{RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sipp::{Sipp, SippOpts};
use support::ALICE;

const SESSIONS: usize = 3;

/// A relay with one sipp server ("uas"), and a sipp terminal holding `SESSIONS` sessions
/// through it until the relay hangs up; returns once the relay logged every one
/// established.
fn sessions_up(scene: &mut Scene) -> Sipp {
    let as_port = scene.server("uas", "uas_answer.xml", SippOpts::default());
    scene.start_relay(&RelayConfig::standard().server(ServerSpec::udp(as_port, &["echo"])));
    let terminal = scene.terminal(
        "uac",
        "uac_held.xml",
        ALICE,
        "echo",
        SippOpts::default()
            .calls(SESSIONS as u64)
            .args(&["-r", "10"]),
    );
    let relay = scene.relay();
    relay.wait_for("session established", SESSIONS, Duration::from_secs(15));
    // Up and journaled, but nothing billed while they last.
    assert!(relay.sessions().is_empty(), "{:#?}", relay.sessions());
    terminal
}

#[test]
fn killed_relay_closes_its_sessions_on_restart_exactly_once() {
    let mut scene = Scene::new();
    let mut terminal = sessions_up(&mut scene);
    scene.relay_mut().kill();
    terminal.kill();
    scene.server_named_mut("uas").kill();
    // Killed mid-session: nothing was written for these sessions but their journal.
    assert!(scene.session_records().is_empty());

    scene.restart_relay();
    let restarted = scene.relay();
    let records = restarted.sessions();
    assert_eq!(records.len(), SESSIONS, "{records:#?}\n{}", restarted.log());
    let mut call_ids = HashSet::new();
    for r in &records {
        assert_eq!(field(r, "cause"), "recovered-after-restart", "{r}");
        assert_eq!(field(r, "subscriber"), "alice", "{r}");
        assert_eq!(field(r, "service"), "echo", "{r}");
        assert!(int(r, "ended_at_ms") >= int(r, "confirmed_at_ms"), "{r}");
        call_ids.insert(field(r, "call_id").to_string());
    }
    assert_eq!(
        call_ids.len(),
        SESSIONS,
        "one record per session: {records:#?}"
    );

    // Killed again and restarted: the recovered sessions are not closed a second time.
    scene.restart_relay();
    let again = scene.relay();
    assert_eq!(again.sessions(), records, "{}", again.log());
}

#[test]
fn terminated_relay_hangs_up_bills_and_exits_zero() {
    let mut scene = Scene::new();
    let mut terminal = sessions_up(&mut scene);
    let status = scene.relay_mut().terminate(Duration::from_secs(15));
    assert!(
        status.success(),
        "relayd exited {status}\n{}",
        scene.relay().log()
    );

    // Both legs got a BYE: the terminal's scenario ends (successfully) only on the relay's
    // BYE, and so does the server's.
    let ended = terminal.wait_exit(Duration::from_secs(15));
    assert!(ended.success(), "terminal: {ended}\n{}", terminal.report());
    assert_eq!(
        terminal.stats().unwrap().count("SuccessfulCall"),
        SESSIONS as u64,
        "{}",
        terminal.report()
    );
    let server = scene.server_named("uas");
    let stats = server.wait_count("SuccessfulCall", SESSIONS as u64, Duration::from_secs(15));
    assert_eq!(stats.count("FailedCall"), 0, "{}", server.report());

    let records = scene.session_records();
    assert_eq!(
        records.len(),
        SESSIONS,
        "{records:#?}\n{}",
        scene.relay().log()
    );
    for r in &records {
        assert_eq!(field(r, "cause"), "relay-shutdown", "{r}");
        assert_eq!(field(r, "subscriber"), "alice", "{r}");
    }
    // Closed cleanly: a restart finds nothing left to recover.
    scene.restart_relay();
    let again = scene.relay();
    assert_eq!(again.sessions(), records, "{}", again.log());
}

/// Liveness (issue 4): a terminal that vanishes mid-session stops answering the relay's
/// in-dialog OPTIONS probes; the relay ends the session, hangs up the server and bills it
/// with cause `timeout` instead of letting it run for ever.
#[test]
fn a_vanished_terminal_is_detected_by_probes_and_billed_timeout() {
    let mut scene = Scene::new();
    let as_port = scene.server("uas", "uas_answer.xml", SippOpts::default());
    // Probes every second; T1 = 50 ms makes a probe's timeout (64·T1) 3.2 s.
    scene.start_relay(
        &RelayConfig::standard()
            .server(ServerSpec::udp(as_port, &["echo"]))
            .probe_interval_secs(1)
            .t1_ms(50),
    );
    let mut terminal = scene.terminal(
        "uac",
        "uac_held.xml",
        ALICE,
        "echo",
        SippOpts::default().calls(1),
    );
    let relay = scene.relay();
    relay.wait_for("session established", 1, Duration::from_secs(15));
    terminal.kill();
    relay.wait_for("a leg stopped answering", 1, Duration::from_secs(20));
    relay.wait_for("session ended and billed", 1, Duration::from_secs(10));
    let records = relay.sessions();
    assert_eq!(records.len(), 1, "{records:#?}\n{}", relay.log());
    assert_eq!(field(&records[0], "cause"), "timeout", "{}", records[0]);
    assert_eq!(field(&records[0], "subscriber"), "alice");
}
