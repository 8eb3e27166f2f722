//! Nothing billed is lost or counted twice when the relay stops with sessions up: killed
//! (SIGKILL), the next start closes the journaled sessions with cause
//! `recovered-after-restart`, exactly once however often it restarts; stopped (SIGTERM),
//! it hangs up both legs of every session, bills them `relay-shutdown` and exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use support::{field, int, Relay, RelaySpec, ServerSpec, Sipp, Transport};

const SESSIONS: usize = 3;

/// A relay with one sipp server, and a sipp terminal holding `SESSIONS` sessions through it
/// until the relay hangs up; returns once the relay logged every one established.
fn sessions_up(dir: &Path) -> (Relay, Sipp, Sipp) {
    let as_port = support::free_port();
    let server = support::uas(dir, "uas", "uas_answer.xml", as_port, Transport::Udp, &[]);
    let relay = Relay::start(
        dir,
        &RelaySpec {
            servers: vec![ServerSpec::new(as_port, Transport::Udp, &["echo"])],
            ..RelaySpec::default()
        },
    );
    let terminal = support::uac(
        dir,
        "uac",
        "uac_held.xml",
        relay.port,
        Transport::Udp,
        support::ALICE_ECHO,
        &["-m", &SESSIONS.to_string(), "-r", "10"],
    );
    relay.wait_for("session established", SESSIONS, Duration::from_secs(15));
    // Up and journaled, but nothing billed while they last.
    assert!(relay.sessions().is_empty(), "{:#?}", relay.sessions());
    (relay, terminal, server)
}

#[test]
fn killed_relay_closes_its_sessions_on_restart_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, mut terminal, mut server) = sessions_up(dir.path());
    let (config, port) = (relay.config.clone(), relay.port);
    relay.kill();
    terminal.kill();
    server.kill();
    // Killed mid-session: nothing was written for these sessions but their journal.
    assert!(support::export(&config, "sessions").is_empty());

    let mut restarted = Relay::start_with(&config, port);
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
    restarted.kill();
    let again = Relay::start_with(&config, port);
    assert_eq!(again.sessions(), records, "{}", again.log());
}

#[test]
fn terminated_relay_hangs_up_bills_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, mut terminal, server) = sessions_up(dir.path());
    let status = relay.terminate(Duration::from_secs(15));
    assert!(status.success(), "relayd exited {status}\n{}", relay.log());

    // Both legs got a BYE: the terminal's scenario ends (successfully) only on the relay's
    // BYE, and so does the server's.
    let ended = terminal.wait_exit(Duration::from_secs(15));
    assert!(
        ended.success(),
        "terminal: {ended}\n{}",
        terminal.evidence()
    );
    assert_eq!(
        terminal.stats().unwrap().count("SuccessfulCall"),
        SESSIONS as u64,
        "{}",
        terminal.evidence()
    );
    let stats = server.wait_count("SuccessfulCall", SESSIONS as u64, Duration::from_secs(15));
    assert_eq!(stats.count("FailedCall"), 0, "{}", server.evidence());

    let records = relay.sessions();
    assert_eq!(records.len(), SESSIONS, "{records:#?}\n{}", relay.log());
    for r in &records {
        assert_eq!(field(r, "cause"), "relay-shutdown", "{r}");
        assert_eq!(field(r, "subscriber"), "alice", "{r}");
    }
    // Closed cleanly: a restart finds nothing left to recover.
    let again = Relay::start_with(&relay.config, relay.port);
    assert_eq!(again.sessions(), records, "{}", again.log());
}
