//! The embedded example (`examples/metered_server.rs`: an application server that runs the
//! agent as a library and charges per request it serves), end to end through the real
//! relay: relayd, the example, and `sip-client` as alice's terminal, each a process.
//!
//! alice asks for two quotes and says bye: she gets two quotes, the relay stores two charge
//! records of one unit each, under the server's event ids and tied to her session, and the
//! server's hang-up reaches her as BYE and the record as `server-bye`. The example's stdout
//! tells the session's events (started, connected, ended by `server-hang-up`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod relay_system;

use std::io::Write as _;
use std::process::Command;

use relay_system::{example, free_port, json_lines, text, wait_until, World, STEP};

#[test]
fn the_embedded_example_charges_per_request_through_the_relay() {
    let example = example("metered_server");
    let mut world = World::start(&["quotes"]);
    let sip_port = free_port();
    let data_port = free_port();
    let config = world.dir().join("agent.toml");
    std::fs::write(
        &config,
        world
            .agent_toml(sip_port, data_port, "", "")
            .replace("[billing]\n", "[billing]\nprice_per_block = 4\n"),
    )
    .unwrap();
    let mut cmd = Command::new(&example);
    cmd.arg("--config").arg(&config).env("NO_COLOR", "1");
    cmd.env("RUST_LOG", "info,appsrv_agent=debug");
    world.spawn("server", cmd, false);
    let agent_uri = format!("sip:as1@127.0.0.1:{sip_port}");
    world.wait_server_up("quotes", &agent_uri);

    let cmd = world.client_cmd("alice", &["call", "quotes"]);
    let client = world.spawn("alice", cmd, true);
    let mut stdin = world.proc(client).take_stdin().unwrap();
    stdin.write_all(b"quote\nquote\nbye\n").unwrap();
    let established = world.wait_client_event("alice", "established", |_| true);
    let call_id = text(&established, "call_id").to_string();
    let ended = world.wait_client_event("alice", "ended", |_| true);
    assert_eq!(text(&ended, "by"), "remote", "the server hung up: {ended}");
    let status = world.wait_exit(client);
    assert!(status.success(), "sip-client: {status}\n{}", world.report());
    drop(stdin);
    let out = world.stdout_of("alice");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "two quotes and bye: {out:?}");
    assert!(
        lines[0].contains("(Dijkstra)") && lines[1].contains("(Beck)"),
        "{out:?}"
    );
    assert_eq!(lines[2], "bye");

    let sessions = world.wait_records("sessions", 1, |r| text(r, "call_id") == call_id);
    assert_eq!(text(&sessions[0], "cause"), "server-bye", "{}", sessions[0]);
    let relay_session = text(&sessions[0], "session_id").to_string();
    let charges = world.wait_records("charges", 2, |r| text(r, "server") == agent_uri);
    assert_eq!(world.export("charges").len(), 2);
    let mut ids: Vec<String> = charges
        .iter()
        .map(|c| text(c, "event_id").to_string())
        .collect();
    ids.sort();
    assert!(
        ids[0].starts_with("app:quote-") && ids[0].ends_with("-1"),
        "{ids:?}"
    );
    assert!(ids[1].ends_with("-2"), "{ids:?}");
    for c in &charges {
        assert_eq!(text(c, "session_id"), relay_session, "{c}");
        assert_eq!(c["amount"]["minor"], 4);
        assert_eq!(c["units"]["units"], 1);
        assert_eq!(text(c, "subscriber"), "alice");
    }

    // The example's own view: events and confirmed charges.
    let told = wait_until(STEP, || {
        json_lines(&world.stdout_of("server"))
            .iter()
            .any(|e| text(e, "event") == "ended")
    });
    assert!(
        told,
        "no ended event on the example's stdout\n{}",
        world.report()
    );
    let printed = json_lines(&world.stdout_of("server"));
    let names: Vec<&str> = printed
        .iter()
        .map(|e| text(e, "event"))
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(names, ["started", "connected", "ended"], "{printed:#?}");
    let ended = printed
        .iter()
        .find(|e| text(e, "event") == "ended")
        .unwrap();
    assert_eq!(text(ended, "cause"), "server-hang-up");
    let confirmed = printed
        .iter()
        .filter(|e| e["confirmed"] == true && e["amount"] == 4)
        .count();
    assert_eq!(confirmed, 2, "{printed:#?}");
}
