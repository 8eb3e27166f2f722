//! Session timers (RFC 4028) between the real relay and the `appsrv-agent` binary, and the
//! agent's `481` for dialogs it does not know (issue 14, finding 9).
//!
//! relayd runs with a 10 s session interval (`[session] session_expires_secs = 10`,
//! `min_se_secs = 2`: under RFC 4028's 90 s, which the configuration allows for tests), so
//! it refreshes the agent's leg with UPDATE every 5 s. A session with `sip-client` as
//! alice's terminal is established; the agent sees it refreshed; relayd is then killed
//! (SIGKILL, by the pid this test started). With nobody refreshing, the agent ends the
//! session within the interval (it gives up `min(32 s, SE/3)` before its end, RFC 4028
//! §10), tells the application server (`session-expired` on its events stream) and frees
//! the capacity slot. In-dialog OPTIONS, BYE and UPDATE for a dialog it does not know get
//! `481`; an OPTIONS outside any dialog (a health probe) still gets `200`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod relay_system;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_system::{free_port, json_lines, read_text, text, wait_until, World, STEP};
use serde_json::Value;

/// The control API token of this test.
const TOKEN: &str = "s3cret-token-0123456789";
/// The relay's session interval in this test, seconds.
const SESSION_EXPIRES: u64 = 10;

/// A GET on the agent's control API; the JSON body.
fn api_get(port: u16, path: &str) -> Option<Value> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(body.trim()).ok()
}

/// Follows the agent's events stream (`GET /v1/events`) into a shared text, from a thread
/// of its own that ends when the stream does (or the agent is killed with the world).
fn follow_events(port: u16) -> Arc<Mutex<String>> {
    let seen = Arc::new(Mutex::new(String::new()));
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .unwrap();
    let out = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    seen
}

/// The number of live sessions the agent lists.
fn live_sessions(control_port: u16) -> Option<usize> {
    Some(
        api_get(control_port, "/v1/sessions")?["sessions"]
            .as_array()?
            .len(),
    )
}

/// Sends `request` (CRLF text) to the agent over UDP from a socket of its own; the status
/// line of the answer (provisional answers skipped).
fn ask(agent: u16, method: &str, to_tag: Option<&str>) -> String {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let me = socket.local_addr().unwrap();
    let to_tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    let request = format!(
        "{method} sip:as1@127.0.0.1:{agent} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {me};branch=z9hG4bK-probe-{method}-{n}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=probe\r\n\
         To: <sip:as1@127.0.0.1:{agent}>{to_tag}\r\n\
         Call-ID: never-seen-{method}-{n}@127.0.0.1\r\nCSeq: 7 {method}\r\n\
         Content-Length: 0\r\n\r\n",
        n = me.port()
    );
    socket
        .send_to(request.as_bytes(), ("127.0.0.1", agent))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let (len, _) = socket.recv_from(&mut buf).expect("the agent answered");
        let text = String::from_utf8_lossy(&buf[..len]).to_string();
        let status = text.lines().next().unwrap_or_default().to_string();
        if !status.starts_with("SIP/2.0 1") {
            return status;
        }
    }
}

#[test]
fn the_agent_ends_a_session_the_relay_stopped_refreshing_and_481s_unknown_dialogs() {
    let mut world = World::start_with(
        &["echo"],
        &format!("[session]\nsession_expires_secs = {SESSION_EXPIRES}\nmin_se_secs = 2\n\n"),
    );
    let relayd = 0;
    let control_port = free_port();
    std::fs::write(world.dir().join("control.token"), format!("{TOKEN}\n")).unwrap();
    let sip_port = free_port();
    let data_port = free_port();
    let config = world.dir().join("agent.toml");
    std::fs::write(
        &config,
        world.agent_toml(
            sip_port,
            data_port,
            "[[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n",
            &format!(
                "[limits]\ncapacity = 1\n\n[sessions]\nmin_se_secs = 2\n\n\
                 [control]\nlisten = \"127.0.0.1:{control_port}\"\ntoken_file = \"control.token\"\n"
            ),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&relay_system::programs().agent);
    cmd.arg("--config").arg(&config).env("NO_COLOR", "1");
    cmd.env_remove("RUST_LOG");
    world.spawn("agent", cmd, false);
    world.wait_server_up("echo", &format!("sip:as1@127.0.0.1:{sip_port}"));

    // A session, kept open by the terminal's stdin.
    let cmd = world.client_cmd("alice", &["call", "echo"]);
    let client = world.spawn("alice", cmd, true);
    let _stdin = world.proc(client).take_stdin().unwrap();
    world.wait_client_event("alice", "established", |_| true);
    assert!(
        wait_until(STEP, || live_sessions(control_port) == Some(1)),
        "the agent does not list the session\n{}",
        world.report()
    );
    let agent_log = world.dir().join("agent.err");
    let refreshes = || read_text(&agent_log).matches("session refreshed").count();
    // Refreshed by the relay past one whole interval (3 refreshes, 15 s > 10 s): alive.
    assert!(
        wait_until(Duration::from_secs(3 * SESSION_EXPIRES), || refreshes()
            >= 3),
        "the relay did not refresh the session\n{}",
        world.report()
    );
    assert_eq!(
        live_sessions(control_port),
        Some(1),
        "a refreshed session lives on\n{}",
        world.report()
    );
    assert!(!read_text(&agent_log).contains("session timer expired"));

    // The relay crashes: nobody refreshes any more.
    let events = follow_events(control_port);
    assert!(world.proc(relayd).signal("KILL"), "cannot kill relayd");
    let killed = Instant::now();
    assert!(
        world.proc(relayd).wait_timeout(STEP).is_some(),
        "relayd did not die"
    );
    let expired = wait_until(Duration::from_secs(2 * SESSION_EXPIRES), || {
        live_sessions(control_port) == Some(0)
    });
    let after = killed.elapsed();
    assert!(
        expired,
        "the agent kept the session of a dead relay\n{}",
        world.report()
    );
    // Within the interval from the last refresh (at most one second late: the agent looks
    // once a second).
    assert!(
        after <= Duration::from_secs(SESSION_EXPIRES + 1),
        "ended {after:?} after the relay died\n{}",
        world.report()
    );
    let log = read_text(&agent_log);
    assert!(log.contains("session timer expired"), "{log}");
    // The application server is told, on its events stream, why.
    let mut ended: Option<Value> = None;
    wait_until(STEP, || {
        ended = json_lines(&events.lock().unwrap())
            .into_iter()
            .find(|e| text(e, "event") == "ended");
        ended.is_some()
    });
    let ended = ended.unwrap_or_else(|| panic!("no `ended` event\n{}", world.report()));
    assert_eq!(text(&ended, "cause"), "session-expired", "{ended}");

    // Dialogs the agent does not know: 481 (RFC 3261 §12.2.2), whatever the method; an
    // OPTIONS outside any dialog is a health probe: 200.
    assert_eq!(
        ask(sip_port, "OPTIONS", Some("gone")),
        "SIP/2.0 481 Call/Transaction Does Not Exist"
    );
    assert_eq!(
        ask(sip_port, "BYE", Some("gone")),
        "SIP/2.0 481 Call/Transaction Does Not Exist"
    );
    assert_eq!(
        ask(sip_port, "UPDATE", Some("gone")),
        "SIP/2.0 481 Call/Transaction Does Not Exist"
    );
    assert_eq!(ask(sip_port, "OPTIONS", None), "SIP/2.0 200 OK");
}
