//! Issue 15, "N relays on one database": two relays (nodes `relay-a` and `relay-b`) keep
//! their shared state in one real PostgreSQL database (`[storage] backend = "postgres"`)
//! and serve as one — a terminal registered through A calls through B, an agent registered
//! with A serves a call B admits (established and billed by B), and a server one relay's
//! probes take out is out for the other.
//!
//! The programs run as processes (relayd, appsrv-agent, sip-client) over TCP: an agent
//! takes requests over TCP from its relay's address whatever the port, so relay B, on the
//! same host, may open its own connection to the agent's Contact.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod system_support;

use std::sync::Arc;

use support::pg_server;
use support::sipp::Transport;
use support::{wait_until, ALICE, STEP};
use system_support::{server_listed_at, server_up_at, text, System};

/// Every echo service of the system's agents, as the relays' metrics label them.
const SERVICES: [&str; 3] = ["echo", "clock", "echo-all"];

/// A system of relay A with one agent (as1) registered with it over TCP, and relay B on
/// the same fresh database; returns once B lists the agent up for every service, which it
/// can only know from the database. The server handle keeps PostgreSQL running: the last
/// one dropped stops it.
fn two_relays() -> (System, usize, Arc<pg_server::PgServer>) {
    let server = pg_server::shared();
    let url = server.fresh_database();
    let mut system = System::start_on_database(Transport::Tcp, 1, &url);
    let b = system.start_peer("relay-b");
    let agent = system.agents[0].uri();
    let metrics = system.peers[b].metrics_port;
    let known = wait_until(STEP, || {
        SERVICES.iter().all(|s| server_up_at(metrics, s, &agent))
    });
    assert!(
        known,
        "relay B never listed {agent}, registered with A, as up\n{}",
        system.report()
    );
    (system, b, server)
}

#[test]
fn a_terminal_registered_through_a_calls_through_b() {
    let (system, b, _server) = two_relays();
    let b_port = system.peers[b].port;

    // Without a registration B refuses the call (403 Not registered): the check is real.
    let refused = system
        .client("unregistered", ALICE)
        .through(b_port)
        .args(["call", "echo", "--no-register"])
        .run(b"");
    assert_ne!(
        refused.status.code(),
        Some(0),
        "a call from a terminal registered nowhere went through: {refused:#?}"
    );

    let registered = system
        .client("register-a", ALICE)
        .args(["register", "--once"])
        .run(b"");
    registered.assert_code(0, &system);

    // B learns of the registration by the database within a second; the client does not
    // register again, so only what A shared admits it.
    let input = b"registered through A, calling through B\n";
    let mut call = None;
    let through = wait_until(STEP, || {
        let run = system
            .client("call-b", ALICE)
            .through(b_port)
            .args(["call", "echo", "--no-register", "--wait-after-eof", "3s"])
            .run(input);
        let ok = run.status.code() == Some(0);
        call = Some(run);
        ok
    });
    let call = call.unwrap();
    assert!(
        through,
        "the call through B failed: {call:#?}\n{}",
        system.report()
    );
    assert_eq!(
        String::from_utf8_lossy(&call.stdout),
        String::from_utf8_lossy(input)
    );
    let call_id = call.call_id();
    let peer = &system.peers[b];
    let mut records = Vec::new();
    let billed = wait_until(STEP, || {
        records = peer
            .sessions()
            .into_iter()
            .filter(|r| text(r, "call_id") == call_id)
            .collect();
        !records.is_empty()
    });
    assert!(
        billed,
        "B billed no session for {call_id}\n{}",
        system.report()
    );
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(text(&records[0], "subscriber"), "alice");
}

#[test]
fn an_agent_registered_with_a_serves_a_call_admitted_by_b() {
    let (system, b, _server) = two_relays();
    let peer = &system.peers[b];
    let agent = &system.agents[0];

    // The terminal registers with B and calls through B; the only server is the agent,
    // which registered with A alone.
    let input = b"served by the agent of relay A\n";
    let call = system
        .client("call-b", ALICE)
        .through(peer.port)
        .args(["call", "echo", "--wait-after-eof", "3s"])
        .run(input);
    call.assert_code(0, &system);
    assert_eq!(
        String::from_utf8_lossy(&call.stdout),
        String::from_utf8_lossy(input)
    );
    assert_eq!(call.events_named("established").len(), 1, "{call:#?}");

    let call_id = call.call_id();
    let mut records = Vec::new();
    let billed = wait_until(STEP, || {
        records = peer
            .sessions()
            .into_iter()
            .filter(|r| text(r, "call_id") == call_id)
            .collect();
        !records.is_empty()
    });
    assert!(
        billed,
        "B billed no session for {call_id}\n{}",
        system.report()
    );
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(text(&records[0], "server"), agent.uri());
    assert_eq!(text(&records[0], "service"), "echo");
}

#[test]
fn a_server_taken_out_by_one_relays_probes_is_out_for_the_other() {
    let server = pg_server::shared();
    let url = server.fresh_database();
    // A probes hourly; B every second and takes a server out at the first miss.
    let mut system = System::start_on_database(Transport::Tcp, 1, &url);
    let b = system.start_peer_with("relay-b", |config| {
        config.replacen(
            "[directory]\nprobe_interval_secs = 3600\n",
            "[directory]\nprobe_interval_secs = 1\nfailure_threshold = 1\n",
            1,
        )
    });
    let agent = system.agents[0].uri();
    let b_metrics = system.peers[b].metrics_port;
    let known = wait_until(STEP, || server_up_at(b_metrics, "echo", &agent));
    assert!(known, "B never listed {agent} as up\n{}", system.report());

    system.agents[0].kill();
    let out_on_b = wait_until(STEP, || {
        server_listed_at(b_metrics, "echo", &agent) && !server_up_at(b_metrics, "echo", &agent)
    });
    assert!(
        out_on_b,
        "B's probes never took {agent} out\n{}",
        system.report()
    );
    // A has not probed since the start (hourly): it knows only from B.
    let out_on_a = wait_until(STEP, || {
        server_listed_at(system.metrics_port, "echo", &agent) && !system.server_up("echo", &agent)
    });
    assert!(
        out_on_a,
        "the server B took out is still up on A\n{}",
        system.report()
    );
}

#[test]
fn failed_attempts_on_both_relays_add_up_to_a_lock_out_on_both() {
    // `[auth] max_failures` is 5 (the default): a user is locked out from a source at the
    // fifth failure within the window, wherever the relays saw them.
    const MAX_FAILURES: i64 = 5;
    let (system, b, _server) = two_relays();
    let peer = &system.peers[b];
    let failures = |port| System::metric_at(port, "relayd_auth_failures_total").unwrap_or(0);
    let lockouts = |port| System::metric_at(port, "relayd_auth_user_lockouts_total").unwrap_or(0);
    let wrong = |name: &str, port: u16| {
        let run = system
            .client(name, ALICE)
            .through(port)
            .password("not-her-password")
            .args(["register", "--once"])
            .run(b"");
        assert_ne!(
            run.status.code(),
            Some(0),
            "a wrong password registered: {run:#?}"
        );
    };

    wrong("wrong-a-1", system.port);
    wrong("wrong-a-2", system.port);
    let on_a = failures(system.metrics_port);
    assert!(
        (1..MAX_FAILURES).contains(&on_a),
        "A counted {on_a} failures"
    );
    assert_eq!(lockouts(system.metrics_port), 0);

    // B locks her out before it has seen five failures itself: A's count with it.
    let mut n = 0;
    while lockouts(peer.metrics_port) == 0 && n < MAX_FAILURES {
        n += 1;
        wrong(&format!("wrong-b-{n}"), peer.port);
    }
    let on_b = failures(peer.metrics_port);
    assert_eq!(
        lockouts(peer.metrics_port),
        1,
        "B never locked her out\n{}",
        system.report()
    );
    assert!(
        on_b < MAX_FAILURES,
        "B saw {on_b} failures itself: the lock-out proves nothing\n{}",
        system.report()
    );

    // A locks her out too, from B's failures, though it saw fewer than five itself.
    let locked_on_a = wait_until(STEP, || lockouts(system.metrics_port) == 1);
    assert!(locked_on_a, "A never locked her out\n{}", system.report());
    assert_eq!(failures(system.metrics_port), on_a);
    let right = system
        .client("right-a", ALICE)
        .args(["register", "--once"])
        .run(b"");
    assert_ne!(
        right.status.code(),
        Some(0),
        "the right password registered through A during the lock-out: {right:#?}"
    );
}

#[test]
fn sharing_resumes_after_the_relays_lose_their_database_connections() {
    let (system, b, _server) = two_relays();
    let peer = &system.peers[b];
    let url = std::fs::read_to_string(&system.config)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("url = ")
                .map(|u| u.trim_matches('"').to_string())
        })
        .unwrap();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let cut = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'relayd shared state' \
             AND datname = current_database()",
            &[],
        )
        .unwrap();
    assert_eq!(cut.len(), 2, "one shared-state connection per relay");
    let reconnected = wait_until(STEP, || {
        system.relay_log().contains("shared state reachable again")
            && peer.relay.log().contains("shared state reachable again")
    });
    assert!(
        reconnected,
        "the relays did not connect again\n{}",
        system.report()
    );

    // A registration through A after the cut admits a call through B.
    system
        .client("register-a", ALICE)
        .args(["register", "--once"])
        .run(b"")
        .assert_code(0, &system);
    let mut call = None;
    let through = wait_until(STEP, || {
        let run = system
            .client("call-b", ALICE)
            .through(peer.port)
            .args(["call", "echo", "--no-register", "--wait-after-eof", "1s"])
            .run(b"after the cut\n");
        let ok = run.status.code() == Some(0);
        call = Some(run);
        ok
    });
    assert!(
        through,
        "the call through B failed: {:#?}\n{}",
        call,
        system.report()
    );
}
