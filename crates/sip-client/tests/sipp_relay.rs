//! sip-client against sipp standing in for the relay (a peer we did not write), with a data
//! server standing in for the application server's gateway. Each test runs one sipp
//! scenario from tests/scenarios and the real `sip-client` binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, UdpSocket};

use common::{client, DataServer, LossyHop, Run, Sipp, DOMAIN, PASSWORD, USER};
use sip_core::digest::{self, Credentials};

/// Finds `MARK <credentials>` in sipp's log and checks the digest against the password,
/// for `method`: the digest computed by the client is the one RFC 7616 defines.
fn verify_logged_digest(logs: &str, mark: &str, method: &str) -> Credentials {
    let start = logs
        .find(mark)
        .unwrap_or_else(|| panic!("{mark} not logged by sipp: {logs}"))
        + mark.len();
    let rest = logs[start..].trim_start();
    let end = rest
        .find(" PPS ")
        .or_else(|| rest.find(" FROM "))
        .unwrap_or(rest.len());
    let value = rest[..end].lines().next().unwrap().trim();
    let creds = Credentials::parse(value).unwrap();
    assert_eq!(creds.username, USER);
    assert_eq!(creds.realm, DOMAIN);
    assert_eq!(
        creds.algorithm,
        digest::Algorithm::Sha256,
        "SHA-256 is preferred over MD5"
    );
    let ha1 = digest::ha1(creds.algorithm, USER, DOMAIN, PASSWORD);
    assert_eq!(
        creds.expected_response(&ha1, method).unwrap(),
        creds.response,
        "wrong digest in {value}"
    );
    let wrong = digest::ha1(creds.algorithm, USER, DOMAIN, "not-the-password");
    assert_ne!(
        creds.expected_response(&wrong, method).unwrap(),
        creds.response
    );
    creds
}

#[test]
fn register_answers_the_401_and_exits_with_once() {
    let mut sipp = Sipp::start("register_401.xml", "u1", &[]);
    let home = tempfile::tempdir().unwrap();
    let run = Run::of(client(&sipp.relay("u1"), home.path()).args(["register", "--once"]));
    run.expect_code(0);
    assert!(
        run.stderr
            .contains("registered sip:alice@relay.test for 120 s"),
        "{}",
        run.stderr
    );
    sipp.expect_success();
    let creds = verify_logged_digest(&sipp.logs(), "AUTHORIZATION ", "REGISTER");
    assert_eq!(creds.uri, "sip:relay.test");
    assert_eq!(creds.nonce, "fixednonce0001");
}

/// Over IPv6: sipp is the registrar on `::1` and the client is given
/// `--relay sip:[::1]:PORT`. The client binds IPv6 and its REGISTERs carry a bracketed Via
/// and Contact `<sip:alice@[::1]:PORT>` (sipp's regexps); the 401 is answered with a
/// digest that verifies; the 200 echoes our Contact with `expires=120` and no Expires
/// header, so `for 120 s` shows that the client found its own IPv6 Contact in the answer.
#[test]
fn register_over_ipv6_answers_the_401_with_a_bracketed_contact() {
    let mut sipp = Sipp::start_on("::1", "register_401_ipv6.xml", "u1", &[], &[]);
    let relay = sipp.relay("u1");
    assert!(relay.starts_with("sip:[::1]:"), "{relay}");
    let home = tempfile::tempdir().unwrap();
    let run = Run::of(client(&relay, home.path()).args(["--json", "register", "--once"]));
    run.expect_code(0);
    let events: Vec<serde_json::Value> = run
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["event"], "registered", "{}", run.stderr);
    assert_eq!(events[0]["expires"], 120, "{}", run.stderr);
    let contact = events[0]["contact"].as_str().unwrap();
    assert!(contact.starts_with("sip:alice@[::1]:"), "{contact}");
    sipp.expect_success();
    assert!(
        sipp.logs().contains(&format!("CONTACT <{contact}>")),
        "{}",
        sipp.logs()
    );
    let creds = verify_logged_digest(&sipp.logs(), "AUTHORIZATION ", "REGISTER");
    assert_eq!(creds.uri, "sip:relay.test");
}

#[test]
fn register_finds_the_relay_by_srv_from_the_config_file() {
    let mut sipp = Sipp::start("register_401.xml", "u1", &[]);
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("client.toml");
    std::fs::write(
        &config,
        format!(
            "user = \"alice\"\nrelay = \"sip:relay.test\"\n[dns]\na = {{ \"host.relay.test\" = [\"127.0.0.1\"] }}\n\
             [[dns.naptr]]\ndomain = \"relay.test\"\nservice = \"SIP+D2U\"\nreplacement = \"_sip._udp.relay.test\"\n\
             [[dns.srv]]\nname = \"_sip._udp.relay.test\"\nport = {}\ntarget = \"host.relay.test\"\n",
            sipp.port
        ),
    )
    .unwrap();
    let mut cmd = assert_cmd::Command::cargo_bin("sip-client").unwrap();
    cmd.env_clear()
        .env("HOME", home.path())
        .env("SIP_CLIENT_PASSWORD", PASSWORD)
        .args([
            "--config",
            config.to_str().unwrap(),
            "--timer-t1-ms",
            "50",
            "--json",
            "register",
            "--once",
        ])
        .timeout(std::time::Duration::from_secs(15));
    let run = Run::of(&mut cmd);
    run.expect_code(0);
    let events: Vec<serde_json::Value> = run
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["event"], "registered");
    assert_eq!(events[0]["expires"], 120);
    assert_eq!(events[0]["aor"], "sip:alice@relay.test");
    assert_eq!(events.last().unwrap()["event"], "exit");
    sipp.expect_success();
}

#[test]
fn call_answers_407_shows_provisionals_and_round_trips_data() {
    let data = DataServer::start(&[("tok-407", "")]);
    let port = data.port.to_string();
    let mut sipp = Sipp::start(
        "call_407.xml",
        "u1",
        &[("data_port", &port), ("token", "tok-407")],
    );
    let home = tempfile::tempdir().unwrap();
    let run = Run::of(
        client(&sipp.relay("u1"), home.path())
            .args(["call", "echo", "--no-register"])
            .write_stdin("hi\n"),
    );
    run.expect_code(0);
    assert_eq!(run.stdout, "hi\n");
    for line in [
        "100 Trying",
        "180 Ringing",
        "[1] established: 200 OK (echo)",
        "[1] ended by local: data finished (200)",
    ] {
        assert!(
            run.stderr.contains(line),
            "missing {line:?} in:\n{}",
            run.stderr
        );
    }
    sipp.expect_success();
    assert_eq!(data.seen(), ["tok-407"]);
    let creds = verify_logged_digest(&sipp.logs(), "AUTHORIZATION ", "INVITE");
    assert_eq!(creds.uri, "sip:echo@relay.test");
    // The ACK for the 2xx carries the INVITE's credentials (RFC 3261 §13.2.2.4).
    assert!(sipp.logs().contains("ACK-AUTH Digest username=\"alice\""));
}

#[test]
fn call_over_tcp_with_json_events() {
    let data = DataServer::start(&[("tok-tcp", "")]);
    let port = data.port.to_string();
    let mut sipp = Sipp::start(
        "basic_call.xml",
        "t1",
        &[("data_port", &port), ("token", "tok-tcp")],
    );
    let home = tempfile::tempdir().unwrap();
    let run = Run::of(
        client(&sipp.relay("t1"), home.path())
            .args(["--json", "call", "echo", "--no-register"])
            .write_stdin("over tcp\n"),
    );
    run.expect_code(0);
    assert_eq!(run.stdout, "over tcp\n");
    sipp.expect_success();
    let events: Vec<serde_json::Value> = run
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "provisional",
            "established",
            "data-connected",
            "data-closed",
            "ended",
            "exit"
        ],
        "{}",
        run.stderr
    );
    assert_eq!(events[0]["status"], 100);
    assert_eq!(events[1]["session"], 1);
    assert_eq!(events[1]["status"], 200);
    assert_eq!(events[4]["by"], "local");
    assert_eq!(events[5]["code"], 0);
}

/// A call over IPv6 end to end: sipp is the relay on `::1`, the data server listens on
/// `[::1]`, and the client is given `--relay sip:[::1]:PORT` and no domain (so the service
/// is requested as `sip:echo@[::1]`). sipp checks the INVITE's Request-URI, bracketed Via,
/// From and Contact, and the SDP offer's `o=`/`c=` `IN IP6 ::1`; it answers with an IPv6
/// SDP; the client pipes its data over IPv6 to the data server and hangs up with a BYE to
/// the relay's IPv6 Contact (checked by sipp too).
#[test]
fn call_over_ipv6_offers_ip6_and_pipes_data_over_ipv6() {
    let data = DataServer::start_on("::1", &[("tok-v6", "")]);
    let port = data.port.to_string();
    let mut sipp = Sipp::start_on(
        "::1",
        "basic_call_ipv6.xml",
        "u1",
        &[("data_port", &port), ("token", "tok-v6")],
        &[],
    );
    let home = tempfile::tempdir().unwrap();
    let mut cmd = assert_cmd::Command::cargo_bin("sip-client").unwrap();
    cmd.env_clear()
        .env("HOME", home.path())
        .env("SIP_CLIENT_PASSWORD", PASSWORD)
        .args([
            "-u",
            USER,
            "--relay",
            &sipp.relay("u1"),
            "--timer-t1-ms",
            "50",
        ])
        .args(["call", "echo", "--no-register"])
        .write_stdin("over ipv6\n")
        .timeout(std::time::Duration::from_secs(15));
    let run = Run::of(&mut cmd);
    run.expect_code(0);
    assert_eq!(run.stdout, "over ipv6\n");
    assert!(
        run.stderr.contains("[1] established: 200 OK (echo)"),
        "{}",
        run.stderr
    );
    sipp.expect_success();
    assert!(
        sipp.logs().contains("OFFER-CONN c=IN IP6 ::1"),
        "{}",
        sipp.logs()
    );
    assert_eq!(data.seen(), ["tok-v6"]);
    let peers = data.peers.lock().unwrap().clone();
    assert!(
        peers.len() == 1 && peers[0].ip() == std::net::Ipv6Addr::LOCALHOST,
        "{peers:?}"
    );
}

#[test]
fn refusals_exit_3_with_the_sip_status() {
    for (code, reason) in [
        ("403", "Service not subscribed"),
        ("404", "Not Found"),
        ("480", "Temporarily Unavailable"),
        ("486", "Busy Here"),
    ] {
        let mut sipp =
            Sipp::start_with("refuse.xml", "u1", &[("reason", reason)], &[("CODE", code)]);
        let home = tempfile::tempdir().unwrap();
        let run =
            Run::of(client(&sipp.relay("u1"), home.path()).args(["call", "echo", "--no-register"]));
        run.expect_code(3);
        let expected = format!("refused by the relay: {code} {reason}");
        assert!(
            run.stderr.contains(&expected),
            "missing {expected:?} in:\n{}",
            run.stderr
        );
        sipp.expect_success();
    }
}

#[test]
fn a_second_407_after_credentials_is_authentication_failure() {
    let mut sipp = Sipp::start("wrong_password.xml", "u1", &[]);
    let home = tempfile::tempdir().unwrap();
    let run =
        Run::of(client(&sipp.relay("u1"), home.path()).args(["call", "echo", "--no-register"]));
    run.expect_code(4);
    assert!(
        run.stderr.contains("authentication failed"),
        "{}",
        run.stderr
    );
    sipp.expect_success();
}

#[test]
fn no_answer_at_all_is_exit_5_after_timer_b() {
    // A relay that never answers: Timer B (64·T1 = 3.2 s with T1 = 50 ms).
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay = format!("sip:{}", silent.local_addr().unwrap());
    let home = tempfile::tempdir().unwrap();
    let run = Run::of(client(&relay, home.path()).args(["call", "echo", "--no-register"]));
    run.expect_code(5);
    assert!(run.stderr.contains("no answer"), "{}", run.stderr);
    // The INVITE was retransmitted (Timer A): more than one arrived.
    silent.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let mut invites = 0;
    while let Ok((n, _)) = silent.recv_from(&mut buf) {
        if buf[..n].starts_with(b"INVITE ") {
            invites += 1;
        }
    }
    assert!(invites > 1, "{invites} INVITE(s) received");
}

#[test]
fn ringing_without_answer_is_cancelled_and_exit_5() {
    let mut sipp = Sipp::start("ring_cancel.xml", "u1", &[]);
    let home = tempfile::tempdir().unwrap();
    let run = Run::of(client(&sipp.relay("u1"), home.path()).args([
        "call",
        "echo",
        "--no-register",
        "--answer-timeout",
        "300ms",
    ]));
    run.expect_code(5);
    assert!(run.stderr.contains("180 Ringing"), "{}", run.stderr);
    assert!(run.stderr.contains("no answer"), "{}", run.stderr);
    sipp.expect_success();
}

#[test]
fn bye_from_the_relay_ends_the_call_with_exit_0() {
    let mut sipp = Sipp::start("bye_from_peer.xml", "u1", &[]);
    let home = tempfile::tempdir().unwrap();
    let run =
        Run::of(client(&sipp.relay("u1"), home.path()).args(["call", "echo", "--no-register"]));
    run.expect_code(0);
    assert!(
        run.stderr.contains("[1] no data endpoint"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("[1] ended by remote: BYE"),
        "{}",
        run.stderr
    );
    sipp.expect_success();
}

#[test]
fn a_forked_answer_gives_two_sessions_each_with_its_data() {
    let data = DataServer::start(&[("tok-a", ""), ("tok-b", "")]);
    let port = data.port.to_string();
    let mut sipp = Sipp::start(
        "fork.xml",
        "u1",
        &[
            ("data_port", &port),
            ("token", "tok-a"),
            ("token2", "tok-b"),
        ],
    );
    let home = tempfile::tempdir().unwrap();
    let run = Run::of(
        client(&sipp.relay("u1"), home.path())
            .args([
                "call",
                "echo",
                "--no-register",
                "--label",
                "--then",
                "sessions 2",
            ])
            .write_stdin("hi\n"),
    );
    run.expect_code(0);
    let mut lines: Vec<&str> = run.stdout.lines().collect();
    lines.sort();
    assert_eq!(lines, ["[1] hi", "[2] hi"], "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("[2] established"), "{}", run.stderr);
    let mut seen = data.seen();
    seen.sort();
    assert_eq!(seen, ["tok-a", "tok-b"]);
    // The scenario received two ACKs and two BYEs.
    sipp.expect_success();
}

#[test]
fn change_sends_a_reinvite_with_the_preferred_service_and_reconnects() {
    let data = DataServer::start(&[("tok-1", ""), ("tok-clock", "clock\n")]);
    let port = data.port.to_string();
    let mut sipp = Sipp::start(
        "change.xml",
        "u1",
        &[
            ("data_port", &port),
            ("token", "tok-1"),
            ("token2", "tok-clock"),
        ],
    );
    let home = tempfile::tempdir().unwrap();
    let run = Run::of(
        client(&sipp.relay("u1"), home.path())
            .args([
                "call",
                "echo",
                "--no-register",
                "--then",
                "after 100ms change clock",
            ])
            .write_stdin("hi\n"),
    );
    run.expect_code(0);
    assert_eq!(run.stdout, "hi\nclock\n", "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("[1] changed to clock: 200 OK"),
        "{}",
        run.stderr
    );
    assert_eq!(data.seen(), ["tok-1", "tok-clock"]);
    sipp.expect_success();
    assert!(sipp.logs().contains("CHANGE"));
}

#[test]
fn transfer_sends_refer_follows_notify_and_takes_the_new_endpoint() {
    let data = DataServer::start(&[("tok-1", ""), ("tok-2", "transferred\n")]);
    let port = data.port.to_string();
    let mut sipp = Sipp::start(
        "transfer.xml",
        "u1",
        &[
            ("data_port", &port),
            ("token", "tok-1"),
            ("token2", "tok-2"),
        ],
    );
    let home = tempfile::tempdir().unwrap();
    let run = Run::of(
        client(&sipp.relay("u1"), home.path())
            .args(["call", "echo", "--no-register", "--then", "transfer echo"])
            .write_stdin("hi\n"),
    );
    run.expect_code(0);
    assert_eq!(run.stdout, "hi\ntransferred\n", "stderr:\n{}", run.stderr);
    for line in [
        "[1] transfer: 202 Accepted",
        "[1] transfer: 100 Trying",
        "[1] transferred to echo: 200 OK",
    ] {
        assert!(
            run.stderr.contains(line),
            "missing {line:?} in:\n{}",
            run.stderr
        );
    }
    assert_eq!(data.seen(), ["tok-1", "tok-2"]);
    sipp.expect_success();
}

#[test]
fn a_data_token_refused_by_the_gateway_is_exit_6() {
    let data = DataServer::start(&[("the-right-one", "")]);
    let port = data.port.to_string();
    let mut sipp = Sipp::start(
        "basic_call.xml",
        "u1",
        &[("data_port", &port), ("token", "a-wrong-one")],
    );
    let home = tempfile::tempdir().unwrap();
    let run = Run::of(
        client(&sipp.relay("u1"), home.path())
            .args(["call", "echo", "--no-register"])
            .write_stdin("x"),
    );
    run.expect_code(6);
    assert!(run.stderr.contains("ERR unknown token"), "{}", run.stderr);
    // The session was hung up properly.
    sipp.expect_success();
}

fn call_through_lossy_hop(drop: &str) {
    let data = DataServer::start(&[("tok-loss", "")]);
    let port = data.port.to_string();
    let mut sipp = Sipp::start(
        "basic_call.xml",
        "u1",
        &[("data_port", &port), ("token", "tok-loss")],
    );
    let server: SocketAddr = format!("127.0.0.1:{}", sipp.port).parse().unwrap();
    let hop = LossyHop::start(server, &[drop]);
    let home = tempfile::tempdir().unwrap();
    let relay = format!("sip:127.0.0.1:{}", hop.port);
    let run = Run::of(
        client(&relay, home.path())
            .args(["call", "echo", "--no-register"])
            .write_stdin("hi\n"),
    );
    run.expect_code(0);
    assert_eq!(run.stdout, "hi\n");
    sipp.expect_success();
    let dropped = hop.dropped.lock().unwrap().clone();
    assert_eq!(dropped.len(), 1, "nothing was dropped: {dropped:?}");
    assert!(dropped[0].starts_with(drop));
}

#[test]
fn the_first_invite_lost_is_retransmitted() {
    call_through_lossy_hop("INVITE ");
}

#[test]
fn the_first_2xx_lost_is_retransmitted_and_acked() {
    call_through_lossy_hop("SIP/2.0 200");
}

#[test]
fn register_keeps_refreshing_and_unregisters_on_sigterm() {
    let mut sipp = Sipp::start("register_refresh.xml", "u1", &[]);
    let home = tempfile::tempdir().unwrap();
    let mut client = common::Interactive::spawn(&sipp.relay("u1"), home.path(), &["register"]);
    // Granted 2 s: refreshed after 1 s, the same Call-ID.
    client.wait_stderr("registered sip:alice@relay.test for 2 s");
    let err = client.stderr();
    let first = err.find("for 2 s").unwrap();
    common::wait_for(std::time::Duration::from_secs(8), "the refresh", || {
        client.stderr()[first + 1..].contains("registered sip:alice@relay.test for 2 s")
    });
    client.signal("TERM");
    assert_eq!(client.wait_exit(), Some(0), "stderr:\n{}", client.stderr());
    assert!(
        client.stderr().contains("unregistered (200)"),
        "{}",
        client.stderr()
    );
    sipp.expect_success();
    assert_eq!(sipp.logs().matches("AUTHORIZATION Digest").count(), 3);
}

#[test]
fn ctrl_c_hangs_up_with_bye() {
    let mut sipp = Sipp::start(
        "basic_call.xml",
        "u1",
        &[("data_port", "9"), ("token", "unused")],
    );
    let home = tempfile::tempdir().unwrap();
    let mut client = common::Interactive::spawn(
        &sipp.relay("u1"),
        home.path(),
        &["call", "echo", "--no-register", "--no-data"],
    );
    client.wait_stderr("[1] established: 200 OK");
    client.signal("INT");
    assert_eq!(client.wait_exit(), Some(0), "stderr:\n{}", client.stderr());
    assert!(
        client
            .stderr()
            .contains("[1] ended by local: hung up (200)"),
        "{}",
        client.stderr()
    );
    sipp.expect_success();
}

#[test]
fn escapes_on_stdin_give_status_and_hang_up() {
    let data = DataServer::start(&[("tok-esc", "")]);
    let port = data.port.to_string();
    let mut sipp = Sipp::start(
        "basic_call.xml",
        "u1",
        &[("data_port", &port), ("token", "tok-esc")],
    );
    let home = tempfile::tempdir().unwrap();
    let mut client = common::Interactive::spawn(
        &sipp.relay("u1"),
        home.path(),
        &["call", "echo", "--no-register", "--escapes"],
    );
    client.wait_stderr("[1] data connected");
    client.write("hello\n~~tilde\n");
    client.wait_stdout("hello\n~tilde\n");
    client.write("~s\n");
    client.wait_stderr("[1] echo, up ");
    client.write("~?\n");
    client.wait_stderr("~t [@N] SERVICE");
    client.write("~.\n");
    assert_eq!(client.wait_exit(), Some(0), "stderr:\n{}", client.stderr());
    assert_eq!(client.stdout(), "hello\n~tilde\n");
    assert!(
        client
            .stderr()
            .contains("[1] ended by local: hung up (200)"),
        "{}",
        client.stderr()
    );
    sipp.expect_success();
}
