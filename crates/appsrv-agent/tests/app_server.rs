//! An application server in another language behind the agent, end to end through the real
//! relay: relayd, the `appsrv-agent` binary, `sip-client` as alice's terminal, and
//! `tests/backends/app_server.py` (Python's standard library only) as the `tcp://` backend
//! of the service `game` and the client of the agent's control API — each its own process.
//!
//! * The backend reads the session preamble, checks subscriber and service, is refused by
//!   the API without the token (or with another) and for a session that is not this
//!   server's, asks for two charges — the second twice with the same event id — and the
//!   relay's billing store holds exactly two charge records, each tied to the session.
//! * The backend ends the session through the API: the terminal sees BYE, the relay writes
//!   the session record with the server's end cause (`server-bye`), the agent closes the
//!   backend connection, and the events stream says `ended` (`server-hang-up`); a charge for
//!   the subscriber out of session is then stored without a session.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod relay_system;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;

use relay_system::{free_port, python, text, wait_until, World, STEP};
use serde_json::Value;

/// The control API token of these tests.
const TOKEN: &str = "s3cret-token-0123456789";

/// The Python application server, as a path.
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/backends/app_server.py")
}

/// What a test started: the world and the indexes of its processes.
struct Game {
    world: World,
    backend: usize,
    agent_uri: String,
}

/// Starts relayd (service `game`), the Python backend in `mode` with `preamble`, and the
/// agent serving `game` with that backend and preamble and its control API; returns once
/// the relay lists the agent as up.
fn start_game(mode: &str, preamble: &str) -> Game {
    let python = python();
    let mut world = World::start(&["game"]);
    let control_port = free_port();
    let token_file = world.dir().join("control.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut cmd = Command::new(python);
    cmd.arg(script())
        .args(["--api", &format!("127.0.0.1:{control_port}")])
        .arg("--token-file")
        .arg(&token_file)
        .args(["--preamble", preamble])
        .args(["--subscriber", "alice", "--service", "game", "--mode", mode]);
    let backend = world.spawn("backend", cmd, false);
    let listening = world.wait_json_line("backend", |v| text(v, "step") == "listening");
    let backend_port = listening["port"].as_u64().unwrap();

    let sip_port = free_port();
    let data_port = free_port();
    let services = format!(
        "[[services]]\nname = \"game\"\nbackend = \"tcp://127.0.0.1:{backend_port}\"\n\
         preamble = \"{preamble}\"\n"
    );
    let control = format!(
        "[control]\nlisten = \"127.0.0.1:{control_port}\"\ntoken_file = \"control.token\"\n"
    );
    let config = world.dir().join("agent.toml");
    std::fs::write(
        &config,
        world.agent_toml(sip_port, data_port, &services, &control),
    )
    .unwrap();
    let mut cmd = Command::new(&relay_system::programs().agent);
    cmd.arg("--config").arg(&config).env("NO_COLOR", "1");
    cmd.env_remove("RUST_LOG");
    world.spawn("agent", cmd, false);
    let agent_uri = format!("sip:as1@127.0.0.1:{sip_port}");
    world.wait_server_up("game", &agent_uri);
    Game {
        world,
        backend,
        agent_uri,
    }
}

/// The backend's JSON lines so far.
fn backend_lines(world: &World) -> Vec<Value> {
    relay_system::json_lines(&world.stdout_of("backend"))
}

/// Waits for the backend to exit and asserts it reported success.
fn assert_backend_ok(world: &mut World, backend: usize) {
    let status = world.wait_exit(backend);
    let lines = backend_lines(world);
    assert!(
        status.success() && lines.iter().any(|l| text(l, "result") == "ok"),
        "the Python application server failed ({status}): {lines:#?}\n{}",
        world.report()
    );
}

#[test]
fn a_python_application_server_reads_the_preamble_and_charges_through_the_api() {
    let Game {
        mut world,
        backend,
        agent_uri,
    } = start_game("charges", "json");
    let cmd = world.client_cmd("alice", &["call", "game", "--wait-after-eof", "5s"]);
    let client = world.spawn("alice", cmd, true);
    let mut stdin = world.proc(client).take_stdin().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    let established = world.wait_client_event("alice", "established", |_| true);
    let call_id = text(&established, "call_id").to_string();

    // The backend's charges are confirmed before it tells the terminal.
    let told = wait_until(STEP, || world.stdout_of("alice").contains("charged 2\n"));
    assert!(
        told,
        "the terminal never heard from the backend\n{}",
        world.report()
    );
    drop(stdin);
    let status = world.wait_exit(client);
    assert!(status.success(), "sip-client: {status}\n{}", world.report());
    assert!(world.stdout_of("alice").contains("hello\n"), "no echo");
    assert_backend_ok(&mut world, backend);

    // What the backend saw and was answered.
    let lines = backend_lines(&world);
    let preamble = lines
        .iter()
        .find(|l| text(l, "step") == "preamble")
        .unwrap();
    let session_id = text(&preamble["session"], "session_id").to_string();
    assert_eq!(preamble["session"]["version"], 1);
    assert!(
        text(&preamble["session"], "terminal").starts_with("127.0.0.1:"),
        "{preamble}"
    );
    for step in [
        "refused-without-token",
        "listed",
        "refused-foreign-session",
        "refused-reused-event-id",
    ] {
        assert!(
            lines.iter().any(|l| text(l, "step") == step),
            "no {step}: {lines:#?}"
        );
    }
    let receipts: Vec<&Value> = lines
        .iter()
        .filter(|l| text(l, "step") == "charged")
        .map(|l| &l["answer"])
        .collect();
    assert_eq!(receipts.len(), 3, "{lines:#?}");
    assert_eq!(text(receipts[0], "relay_event_id"), "app:level-1");
    assert_eq!(receipts[0]["amount"], 25);
    assert_eq!(
        receipts[1], receipts[2],
        "the same answer twice for one event id"
    );
    assert_eq!(receipts[1]["amount"], 10);
    assert_eq!(text(receipts[1], "session_id"), session_id);

    // The relay's store: the session, and two charge records tied to it.
    let sessions = world.wait_records("sessions", 1, |r| text(r, "call_id") == call_id);
    let relay_session = text(&sessions[0], "session_id").to_string();
    assert_eq!(text(&sessions[0], "server"), agent_uri);
    let charges = world.wait_records("charges", 2, |r| text(r, "server") == agent_uri);
    // Settle: nothing more arrives (the duplicate is stored once).
    let all = world.export("charges");
    assert_eq!(all.len(), 2, "exactly two charge records: {all:#?}");
    let mut ids: Vec<&str> = charges.iter().map(|c| text(c, "event_id")).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["app:item-7", "app:level-1"]);
    for c in &charges {
        assert_eq!(text(c, "session_id"), relay_session, "{c}");
        assert_eq!(text(c, "subscriber"), "alice");
        assert_eq!(text(c, "service"), "game");
        assert_eq!(c["amount"]["currency"], "EUR");
        match text(c, "event_id") {
            "app:level-1" => {
                assert_eq!(c["amount"]["minor"], 25);
                assert_eq!(text(c, "description"), "level 1 unlocked");
            }
            _ => {
                assert_eq!(c["amount"]["minor"], 10);
                assert_eq!(c["units"]["units"], 2);
                assert_eq!(c["units"]["unit_price_minor"], 5);
            }
        }
    }
}

#[test]
fn ending_a_session_through_the_api_hangs_up_the_terminal_and_closes_the_backend() {
    let Game {
        mut world,
        backend,
        agent_uri,
    } = start_game("end", "proxy-v2");
    let cmd = world.client_cmd("alice", &["call", "game"]);
    let client = world.spawn("alice", cmd, true);
    // Input stays open: only the server's BYE can end this session.
    let _stdin = world.proc(client).take_stdin().unwrap();
    let established = world.wait_client_event("alice", "established", |_| true);
    let call_id = text(&established, "call_id").to_string();

    let ended = world.wait_client_event("alice", "ended", |_| true);
    assert_eq!(text(&ended, "by"), "remote", "{ended}");
    let status = world.wait_exit(client);
    assert!(status.success(), "sip-client: {status}\n{}", world.report());
    assert_backend_ok(&mut world, backend);

    let lines = backend_lines(&world);
    let preamble = lines
        .iter()
        .find(|l| text(l, "step") == "preamble")
        .unwrap();
    assert!(
        text(&preamble["session"], "gateway").starts_with("127.0.0.1:"),
        "PROXY v2 destination: {preamble}"
    );
    for step in [
        "ended",
        "backend-closed",
        "ended-event",
        "end-again-refused",
    ] {
        assert!(
            lines.iter().any(|l| text(l, "step") == step),
            "no {step}: {lines:#?}"
        );
    }
    let answer = &lines.iter().find(|l| text(l, "step") == "ended").unwrap()["answer"];
    assert_eq!(
        answer["bye_status"], 200,
        "the relay answered the BYE: {answer}"
    );

    let sessions = world.wait_records("sessions", 1, |r| text(r, "call_id") == call_id);
    assert_eq!(text(&sessions[0], "server"), agent_uri);
    assert_eq!(
        text(&sessions[0], "cause"),
        "server-bye",
        "the record says the server ended it: {:#}",
        sessions[0]
    );
    let log = world.report();
    assert!(
        log.contains("the application server ends the session"),
        "the agent logged the hang-up:\n{log}"
    );

    // The charge out of session: the subscriber alone.
    let renewal = world.wait_records("charges", 1, |r| text(r, "event_id") == "app:renewal-1");
    assert!(renewal[0]["session_id"].is_null(), "{}", renewal[0]);
    assert_eq!(text(&renewal[0], "subscriber"), "alice");
    assert_eq!(text(&renewal[0], "server"), agent_uri);
    assert_eq!(renewal[0]["amount"]["minor"], 99);
}
