//! Issue 14, finding 10 and a smaller item of 11, through the real relayd with sipp
//! (Debian's `sip-tester`) as terminals and application server:
//!
//! * one subscriber may hold only as many sessions as its class allows (`[[classes]]
//!   max_sessions`): with a limit of 2 for alice's class, two sessions held, a third INVITE
//!   is refused `486 Too many sessions` before any server is asked, and counted in
//!   `relayd_subscriber_limit_refusals_total`; bob (another class) calls meanwhile; once
//!   one of alice's sessions ends, her next call is admitted;
//! * an INVITE whose Call-ID the billing journal could not keep (over 256 bytes) is refused
//!   `400` at admission, before any challenge or server.
//!
//! Every wait is on a condition and bounded (`support::STEP`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::time::Duration;

use support::billing::field;
use support::ports::free_port;
use support::relay::{RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sipp::Sipp;
use support::{unique, wait_until, ALICE, BOB, STEP};

/// Alice in class "gold" limited to 2 sessions; bob in the default class (10).
fn users_and_classes(metrics_port: u16) -> String {
    format!(
        "[[users]]\nname = \"{alice}\"\npassword = \"{alice_pw}\"\nplan = \"basic\"\n\
         class = \"gold\"\nservices = [\"echo\"]\n\n\
         [[users]]\nname = \"{bob}\"\npassword = \"{bob_pw}\"\nplan = \"basic\"\n\
         services = [\"echo\"]\n\n\
         [[classes]]\nname = \"gold\"\nmax_sessions = 2\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        alice = ALICE.0,
        alice_pw = ALICE.1,
        bob = BOB.0,
        bob_pw = BOB.1,
    )
}

/// The relay's metrics page (`GET /metrics`), empty if it cannot be read.
fn metrics(port: u16) -> String {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

/// The value of metric `name` (a line `name value`).
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The rest of each line of `lines` that starts with `prefix`.
fn logged(lines: &[String], prefix: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix).map(|r| r.trim().to_string()))
        .collect()
}

/// Starts a terminal holding a session to echo as `user` and waits until it is
/// established (terminal_hold.xml logs ESTABLISHED once its in-dialog OPTIONS came back).
fn held(scene: &Scene, name: &str, user: support::Credentials<'_>) -> Sipp {
    let terminal = scene.terminal(name, "terminal_hold.xml", user, "echo", &[]);
    let lines = terminal.wait_for_log(|l| l.iter().any(|x| x == "ESTABLISHED"));
    assert!(
        lines.iter().any(|x| x == "ESTABLISHED"),
        "{name}: no session established\n{}",
        scene.report(Some(&terminal))
    );
    terminal
}

/// Ends a held session with the terminal's BYE and waits for the relay's 200 (sent only
/// once the record is committed, and after the subscriber's slot was given back).
fn hang_up(scene: &Scene, terminal: &mut Sipp) {
    terminal.signal_hang_up();
    scene.assert_success(terminal);
    assert_eq!(
        logged(&terminal.log(), "BYE-ANSWERED "),
        ["SIP/2.0 200 OK"],
        "{}",
        terminal.report()
    );
}

/// The INVITEs the echo server was asked.
fn invites_at_server(scene: &Scene) -> usize {
    logged(&scene.server_named("echo").log(), "INVITE ").len()
}

#[test]
fn a_subscriber_over_its_class_limit_is_refused_486_until_a_session_ends() {
    let mut scene = Scene::new();
    let echo = scene.server("echo", "server_answer.xml", &[("token", "e")]);
    let metrics_port = free_port();
    scene.start_relay(
        &RelayConfig::default()
            .service("echo", "first")
            .server(ServerSpec::udp(echo, &["echo"]))
            .extra_toml(&users_and_classes(metrics_port)),
    );

    let mut first = held(&scene, "alice-1", ALICE);
    let mut second = held(&scene, "alice-2", ALICE);
    assert_eq!(invites_at_server(&scene), 2);

    // The third: refused at admission, before any server is asked.
    let mut third = scene.terminal("alice-3", "terminal_refused.xml", ALICE, "echo", &[]);
    scene.assert_success(&mut third);
    assert_eq!(
        logged(&third.log(), "FINAL "),
        ["SIP/2.0 486 Too many sessions"],
        "{}",
        scene.report(Some(&third))
    );
    assert_eq!(invites_at_server(&scene), 2, "the server was not asked");
    let relay = scene.relay();
    assert_eq!(
        relay.count("refused: the subscriber holds as many sessions as its class allows"),
        1,
        "{}",
        relay.log()
    );
    let page = metrics(metrics_port);
    assert_eq!(
        metric(&page, "relayd_subscriber_limit_refusals_total"),
        Some(1),
        "{page}"
    );
    assert_eq!(
        metric(&page, "relayd_subscribers_with_sessions"),
        Some(1),
        "{page}"
    );

    // Another subscriber is unaffected while alice is at her limit.
    let mut bob = held(&scene, "bob", BOB);
    hang_up(&scene, &mut bob);

    // One of alice's sessions ends: her next call is admitted.
    hang_up(&scene, &mut first);
    let mut fourth = held(&scene, "alice-4", ALICE);
    assert_eq!(invites_at_server(&scene), 4, "bob's and alice's fourth");

    hang_up(&scene, &mut second);
    hang_up(&scene, &mut fourth);

    let records = scene.session_records();
    let per = |who: &str| {
        records
            .iter()
            .filter(|r| field(r, "subscriber") == who)
            .count()
    };
    assert_eq!((per("alice"), per("bob")), (3, 1), "{records:#?}");
    assert!(
        records.iter().all(|r| field(r, "cause") == "caller-bye"),
        "{records:#?}"
    );
    let mut page = String::new();
    let settled = wait_until(STEP, || {
        page = metrics(metrics_port);
        metric(&page, "relayd_subscribers_with_sessions") == Some(0)
    });
    assert!(settled, "every slot given back\n{page}");
    assert_eq!(
        metric(&page, "relayd_subscriber_limit_refusals_total"),
        Some(1),
        "{page}"
    );
}

/// An INVITE with Call-ID `call_id` from a raw UDP socket (no credentials); the status line
/// of the relay's first final answer.
fn invite_with_call_id(relay_port: u16, call_id: &str) -> String {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let local = sock.local_addr().unwrap();
    let request = format!(
        "INVITE sip:echo@relay.test SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@relay.test>;tag={tag}\r\n\
         To: <sip:echo@relay.test>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:alice@{local}>\r\n\
         Content-Length: 0\r\n\r\n",
        branch = unique("b"),
        tag = unique("t"),
    );
    let deadline = std::time::Instant::now() + STEP;
    let mut buf = vec![0u8; 65_535];
    while std::time::Instant::now() < deadline {
        // Sent again each round, as a UDP client retransmits (the relay answers once per
        // transaction and again on each retransmission).
        sock.send_to(request.as_bytes(), (Ipv4Addr::LOCALHOST, relay_port))
            .unwrap();
        while let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let status = text.lines().next().unwrap_or_default().to_string();
            if !status.starts_with("SIP/2.0 1") {
                return status;
            }
        }
    }
    panic!("no final answer from the relay on {relay_port}");
}

#[test]
fn an_invite_whose_call_id_the_journal_cannot_keep_is_refused_400_at_admission() {
    let mut scene = Scene::new();
    let echo = scene.server("echo", "server_answer.xml", &[("token", "e")]);
    scene.start_relay(
        &RelayConfig::standard()
            .server(ServerSpec::udp(echo, &["echo"]))
            .inquiry_timeout_ms(5000),
    );
    let port = scene.relay().port;
    let long = format!("{}@terminal", "x".repeat(257));
    assert_eq!(
        invite_with_call_id(port, &long),
        "SIP/2.0 400 Call-ID too long (at most 256 bytes)"
    );
    // 256 bytes is still taken: it is challenged like any INVITE.
    let longest = "y".repeat(256);
    assert_eq!(
        invite_with_call_id(port, &longest),
        "SIP/2.0 407 Proxy Authentication Required"
    );
    assert_eq!(invites_at_server(&scene), 0, "no server was asked");
}
