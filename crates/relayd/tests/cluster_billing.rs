//! Issue 15, "a dead relay's sessions": two relays (nodes `relay-a` and `relay-b`) keep
//! their billing in one real PostgreSQL database (`[storage] backend = "postgres"`, a
//! short lease, a touch every second). A session is established through A and A is
//! killed (SIGKILL) mid-session: once A's lease has expired, B closes the session, once,
//! with end cause `relay-lost`, billed up to A's last touch (never past A's death); A,
//! restarted on the same node name and database, recovers nothing and bills nothing
//! again. And `relayd billing report` and `export` on B show what A billed.
//!
//! Every wait is on a condition (a log line, the journal, the export) and bounded; every
//! process is killed by its guard.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use billing::postgresql::PostgresStore;
use billing::store::{JournaledSession, Store as _};
use serde_json::Value;
use support::billing::{field, int};
use support::pg_server;
use support::ports::free_port;
use support::relay::{relayd_cmd, RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sipp::SippOpts;
use support::{wait_until, ALICE, AS1, STEP};

/// `[storage] lease_secs` of both relays: short, so the test waits little, yet four touches
/// (a touch delayed by a loaded machine does not lose a live relay its sessions); at least twice
/// the touch interval (1 s), as the configuration requires.
const LEASE_SECS: i64 = 4;

/// Milliseconds since the Unix epoch, as records carry them.
fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A relay named `node` on the database at `url`, renewing its lease every second.
fn clustered(config: RelayConfig, url: &str, node: &str) -> RelayConfig {
    config
        .storage_toml(&format!(
            "backend = \"postgres\"\nurl = {url:?}\nnode = {node:?}\nlease_secs = {LEASE_SECS}"
        ))
        .extra_toml("[billing]\ntouch_interval_secs = 1")
}

/// The sessions journaled open in the database at `url`.
fn journal(url: &str) -> Vec<JournaledSession> {
    PostgresStore::connect_read_only(url)
        .unwrap_or_else(|e| panic!("cannot open the billing database: {e}"))
        .journal()
        .unwrap()
}

/// The records of session `session_id` among `records`.
fn records_of<'a>(records: &'a [Value], session_id: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| field(r, "session_id") == session_id)
        .collect()
}

#[test]
fn a_killed_relays_session_is_billed_once_by_another_as_relay_lost() {
    let server = pg_server::shared();
    let url = server.fresh_database();
    let mut a = Scene::new();
    let as_port = a.server("uas", "uas_answer.xml", SippOpts::default());
    a.start_relay(&clustered(
        RelayConfig::standard().server(ServerSpec::udp(as_port, &["echo"])),
        &url,
        "relay-a",
    ));
    let mut b = Scene::new();
    b.start_relay(&clustered(RelayConfig::standard(), &url, "relay-b"));

    // A session through A, held until the relay hangs up.
    let _terminal = a.terminal("uac", "uac_held.xml", ALICE, "echo", SippOpts::default());
    a.relay()
        .wait_for("session established", 1, Duration::from_secs(15));
    // Journaled under A's node. While A lives it renews its lease: wait until the session
    // has lived past a whole lease (and B's claims ran meanwhile): B leaves it alone.
    let lived = (LEASE_SECS + 1) * 1000;
    let mut open = Vec::new();
    let renewed = wait_until(Duration::from_millis(lived as u64) + STEP, || {
        open = journal(&url);
        open.len() == 1 && open[0].last_seen_ms - open[0].session.confirmed_at_ms > lived
    });
    assert!(
        renewed,
        "A did not renew its lease: {open:#?}\n{}\n{}",
        a.report(None),
        b.report(None)
    );
    let session = open[0].session.clone();
    assert_eq!(session.node, "relay-a");
    assert_eq!(b.relay().count("relay-lost"), 0, "{}", b.relay().log());
    let seen_before_kill = open[0].last_seen_ms;

    a.relay_mut().kill();
    let kill_ms = now_ms();
    assert!(
        a.session_records().is_empty() && b.session_records().is_empty(),
        "a record before the session ended"
    );

    // B closes it once A's lease has expired, and logs it.
    let b_relay = b.relay();
    b_relay.wait_for(
        "relay-lost",
        1,
        Duration::from_secs(LEASE_SECS as u64) + STEP,
    );
    let seen_at_ms = now_ms();
    let records = b.session_records();
    let lost = records_of(&records, &session.session_id);
    assert_eq!(lost.len(), 1, "{records:#?}\n{}", b_relay.log());
    let r = lost[0];
    assert_eq!(field(r, "cause"), "relay-lost", "{r}");
    assert_eq!(field(r, "call_id"), session.call_id, "{r}");
    assert_eq!(field(r, "subscriber"), "alice", "{r}");
    let (confirmed, ended) = (int(r, "confirmed_at_ms"), int(r, "ended_at_ms"));
    assert_eq!(confirmed, session.confirmed_at_ms, "{r}");
    // Billed up to A's last touch: at least the one seen, never past A's death.
    assert!(
        seen_before_kill <= ended && ended <= kill_ms,
        "ended at {ended}: not A's last touch (seen {seen_before_kill}, killed {kill_ms}): {r}"
    );
    assert_eq!(int(r, "duration_ms"), ended - confirmed, "{r}");
    assert!(
        seen_at_ms - ended >= LEASE_SECS * 1000,
        "closed before A's lease of {LEASE_SECS} s expired: {r}"
    );
    assert!(
        b_relay
            .log()
            .lines()
            .any(|l| l.contains("relay-lost") && l.contains(&session.session_id)),
        "B's log does not name the session it closed\n{}",
        b_relay.log()
    );
    assert!(journal(&url).is_empty(), "{:#?}", journal(&url));

    // A comes back on the same node name and database: its recovery finds nothing of its
    // own left, and nothing is billed twice.
    a.restart_relay();
    let a_relay = a.relay();
    a_relay.wait_for("billing recovery done", 1, STEP);
    let recovery = a_relay
        .log()
        .lines()
        .find(|l| l.contains("billing recovery done"))
        .map(str::to_string)
        .unwrap();
    assert!(
        recovery.contains("node=relay-a") && recovery.contains("count=0"),
        "{recovery}"
    );
    let after = a.session_records();
    assert_eq!(
        records_of(&after, &session.session_id),
        [r],
        "billed again after A came back\n{}",
        a_relay.log()
    );
    assert_eq!(after, records, "{}", a_relay.log());
}

#[test]
fn billing_report_on_one_relay_shows_what_another_billed() {
    let server = pg_server::shared();
    let url = server.fresh_database();
    let mut a = Scene::new();
    let as_port = a.server("uas", "uas_answer.xml", SippOpts::default());
    a.start_relay(&clustered(
        RelayConfig::standard().server(ServerSpec::udp(as_port, &["echo"]).account("as1")),
        &url,
        "relay-a",
    ));
    let mut b = Scene::new();
    b.start_relay(&clustered(RelayConfig::standard(), &url, "relay-b"));

    let mut register = a.terminal(
        "register",
        "uac_register.xml",
        ALICE,
        "echo",
        SippOpts::default(),
    );
    a.assert_success(&mut register);
    let mut call = a.terminal(
        "uac",
        "uac_load.xml",
        ALICE,
        "echo",
        SippOpts::default().calls(1).args(&["-d", "1500"]),
    );
    a.assert_success(&mut call);
    let call_id = call
        .log()
        .iter()
        .find_map(|l| l.strip_prefix("COMPLETED ").map(|c| c.trim().to_string()))
        .unwrap_or_else(|| panic!("the call did not complete\n{}", call.report()));

    // B, which took no call, exports A's record and reports it.
    let records = b.session_records();
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(field(r, "call_id"), call_id, "{r}");
    assert_eq!(field(r, "cause"), "caller-bye", "{r}");
    assert!(int(r, "duration_ms") >= 1500, "{r}");
    let charge = int(&r["charge"], "minor");

    let out = relayd_cmd(&b.relay().config)
        .args(["billing", "report", "--by", "subscriber"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let alice: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("alice "))
        .unwrap_or_else(|| panic!("no line for alice in B's report:\n{text}"))
        .split_whitespace()
        .collect();
    // subscriber, currency, sessions, duration, session charges, charges, amounts, total
    assert_eq!(alice[1], "EUR", "{text}");
    assert_eq!(alice[2], "1", "{text}");
    assert_eq!(alice[4], charge.to_string(), "{text}");
    assert_eq!(alice[7], charge.to_string(), "{text}");

    // The server's last charge, sent after the BYE to B, which never saw the call: B finds
    // the ended session in the shared records and bills it to that session.
    let status = b.charge(
        AS1,
        &format!(r#"{{"event_id": "late-1", "call_id": "{call_id}", "amount": 25}}"#),
    );
    assert!(
        status.starts_with("SIP/2.0 200 "),
        "late charge on B: {status}"
    );
    let charges = b.charge_records();
    assert_eq!(charges.len(), 1, "{charges:#?}");
    assert_eq!(field(&charges[0], "session_id"), field(r, "session_id"));
    assert_eq!(int(&charges[0]["amount"], "minor"), 25);
}

#[test]
fn a_database_that_cannot_be_reached_is_named_by_its_key_and_file() {
    let dir = support::TestDir::new("relayd-test-");
    // Nothing listens on this port.
    let url = format!("postgres://relayd@127.0.0.1:{}/relayd", free_port());
    let config = dir.path().join("relayd.toml");
    std::fs::write(
        &config,
        clustered(RelayConfig::standard(), &url, "relay-a").to_toml(free_port(), dir.path()),
    )
    .unwrap();
    let expected = format!("storage.url in {}", config.display());
    for args in [&["billing", "report"][..], &["run"][..]] {
        let out = relayd_cmd(&config).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "relayd {args:?} succeeded\n{stderr}");
        assert!(
            stderr.contains(&expected) && stderr.contains("127.0.0.1"),
            "relayd {args:?} does not name the key, file and database:\n{stderr}"
        );
    }
}
