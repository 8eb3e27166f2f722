//! What the relay refuses, and how: each refusal is checked by its status code and its
//! reason phrase, as a terminal sees them on the wire (a raw SIP client over UDP answering
//! the digest challenges with `sip_core::digest`, and one refusal driven by sipp). Then
//! failover: a dead or refusing first server does not stop the call, and the bill names the
//! server that delivered it. And the 420 Bad Extension for a request that requires an option
//! tag the relay does not support, before any challenge.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::billing::field;
use support::relay::{server_uri, RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sip::{Response, SipClient};
use support::sipp::{SippOpts, Transport};
use support::{unique, ALICE, BOB, REALM};

fn statuses(finals: &[Response]) -> Vec<String> {
    finals.iter().map(Response::status).collect()
}

/// The last final response of an INVITE whose 407 was answered with the right password.
fn invite_authenticated(client: &SipClient, service: &str, password: &str) -> Response {
    let finals = client.invite(service, &[password]);
    assert_eq!(finals.len(), 2, "407 then a final: {:?}", statuses(&finals));
    assert_eq!(finals[0].code, 407, "{:?}", statuses(&finals));
    finals[1].clone()
}

#[test]
fn unregistered_terminal_is_refused_not_registered() {
    let mut scene = Scene::new();
    scene.start_relay(&RelayConfig::standard());
    let relay = scene.relay();
    let alice = SipClient::new(relay.port, "alice");
    let resp = invite_authenticated(&alice, "echo", "alice-secret");
    assert_eq!(resp.status(), "403 Not registered");
    // Once registered, the same request passes admission (and meets the next check: no
    // server delivers echo in this configuration).
    assert_eq!(alice.register("alice-secret").code, 200);
    let resp = invite_authenticated(&alice, "echo", "alice-secret");
    assert_eq!(resp.code, 480, "{}", resp.status());
    assert!(relay.sessions().is_empty());
}

#[test]
fn service_not_subscribed_and_unknown_service_are_refused() {
    let mut scene = Scene::new();
    scene.start_relay(&RelayConfig::standard());
    let relay = scene.relay();
    let bob = SipClient::new(relay.port, "bob");
    assert_eq!(bob.register("bob-secret").status(), "200 OK");
    // bob subscribes to clock only.
    let resp = invite_authenticated(&bob, "echo", "bob-secret");
    assert_eq!(resp.status(), "403 Service not subscribed");
    let resp = invite_authenticated(&bob, "nosuchservice", "bob-secret");
    assert_eq!(resp.status(), "404 Unknown service");
    // An application-server account authenticates but is no subscriber.
    let as1 = SipClient::new(relay.port, "as1");
    let resp = invite_authenticated(&as1, "echo", "as1-secret");
    assert_eq!(resp.status(), "403 Not a subscriber");
    assert!(relay.sessions().is_empty());
}

#[test]
fn wrong_password_is_challenged_again_then_locked_out_from_that_address_only() {
    let mut scene = Scene::new();
    // max_failures = 3 per (user, source address); over UDP a failure counts half, so six
    // wrong answers lock carol out from 127.0.0.1 (issue 14).
    scene.start_relay(&RelayConfig::standard().max_failures(3));
    let relay = scene.relay();
    let carol = SipClient::new(relay.port, "carol");
    assert_eq!(carol.register("carol-secret").code, 200);
    let wrong = [
        "wrong-1", "wrong-2", "wrong-3", "wrong-4", "wrong-5", "wrong-6",
    ];
    let finals = carol.invite("echo", &wrong);
    assert_eq!(
        statuses(&finals),
        ["407 Proxy Authentication Required"; 7],
        "a wrong password is challenged again"
    );
    // Locked out from this address: even the right password is answered as a wrong one,
    // the answer a name that does not exist gets (no enumeration, no right guess told).
    let finals = carol.invite("echo", &["carol-secret"]);
    assert_eq!(statuses(&finals), ["407 Proxy Authentication Required"; 2]);
    // The lock-out is carol's alone, and her address is not refused for others.
    let alice = SipClient::new(relay.port, "alice");
    assert_eq!(alice.register("alice-secret").code, 200);
    let resp = invite_authenticated(&alice, "echo", "alice-secret");
    assert_eq!(resp.code, 480, "{}", resp.status());
}

#[test]
fn no_server_left_is_480() {
    let mut scene = Scene::new();
    let busy_port = scene.server("busy", "uas_busy.xml", SippOpts::default());
    scene.start_relay(&RelayConfig::standard().server(ServerSpec::udp(busy_port, &["clock"])));
    let relay = scene.relay();
    let alice = SipClient::new(relay.port, "alice");
    assert_eq!(alice.register("alice-secret").code, 200);
    // The only clock server is busy: failed over to nobody.
    let resp = invite_authenticated(&alice, "clock", "alice-secret");
    assert_eq!(
        resp.status(),
        "480 No application server available (last answer 486)"
    );
    scene
        .server_named("busy")
        .wait_count("SuccessfulCall", 1, Duration::from_secs(10));
    // No server delivers echo at all.
    let resp = invite_authenticated(&alice, "echo", "alice-secret");
    assert_eq!(resp.status(), "480 No application server available");
    assert!(relay.sessions().is_empty());
}

/// The same "403 Service not subscribed", seen by sipp: its scenario expects exactly that
/// status and checks the reason with a regexp (a mismatch fails the call, exit 1).
#[test]
fn sipp_terminal_sees_403_service_not_subscribed() {
    let mut scene = Scene::new();
    scene.start_relay(&RelayConfig::standard());
    let mut bob = scene.terminal(
        "bob",
        "uac_not_subscribed.xml",
        BOB,
        "echo",
        SippOpts::default().calls(2),
    );
    let status = bob.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "sipp: {status}\n{}",
        scene.report(Some(&bob))
    );
    let stats = bob.stats().unwrap();
    assert_eq!(stats.count("SuccessfulCall"), 2, "{}", bob.report());
    assert_eq!(
        stats.count("FailedRegexpDoesntMatch"),
        0,
        "{}",
        bob.report()
    );
}

/// Failover calls: three calls to echo, whose first server is `first`, the second the sipp
/// server `second` (on `second_port`), which answers. Every call must complete and be
/// billed to the second.
fn calls_fail_over(scene: &Scene, second: &str, second_port: u16) {
    let mut alice = scene.terminal(
        "alice",
        "uac_call.xml",
        ALICE,
        "echo",
        SippOpts::default()
            .calls(3)
            .args(&["-r", "10", "-d", "100"]),
    );
    let status = alice.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "sipp: {status}\n{}",
        scene.report(Some(&alice))
    );
    let second_uri = server_uri(second_port, Transport::Udp);
    scene
        .server_named(second)
        .wait_count("SuccessfulCall", 3, Duration::from_secs(10));
    let records = scene.session_records();
    assert_eq!(records.len(), 3, "{records:#?}");
    for r in &records {
        assert_eq!(field(r, "server"), second_uri, "{r}");
        assert_eq!(field(r, "cause"), "caller-bye", "{r}");
    }
}

#[test]
fn silent_first_server_fails_over_to_the_second() {
    let mut scene = Scene::new();
    // Nothing listens on the first server's port: the inquiry gets no answer at all.
    let dead_port = support::ports::free_port();
    let live_port = scene.server("live", "uas_answer.xml", SippOpts::default());
    scene.start_relay(
        &RelayConfig::standard()
            .server(ServerSpec::udp(dead_port, &["echo"]))
            .server(ServerSpec::udp(live_port, &["echo"]))
            // Keep the dead server a candidate: each call must try it first and fail over.
            .failure_threshold(100)
            .inquiry_timeout_ms(500),
    );
    calls_fail_over(&scene, "live", live_port);
    let relay = scene.relay();
    let dead_uri = server_uri(dead_port, Transport::Udp);
    let tried_dead = relay
        .log()
        .lines()
        .filter(|l| l.contains("inquiring") && l.contains(&dead_uri))
        .count();
    assert_eq!(
        tried_dead,
        3,
        "each call inquired of the dead server first\n{}",
        relay.log()
    );
}

#[test]
fn refusing_first_server_fails_over_to_the_second() {
    let mut scene = Scene::new();
    let refusing_port = scene.server("refusing", "uas_unavailable.xml", SippOpts::default());
    let live_port = scene.server("live", "uas_answer.xml", SippOpts::default());
    scene.start_relay(
        &RelayConfig::standard()
            .server(ServerSpec::udp(refusing_port, &["echo"]))
            .server(ServerSpec::udp(live_port, &["echo"])),
    );
    calls_fail_over(&scene, "live", live_port);
    // The refusing server really was asked each time (and got its ACK).
    let refusing = scene.server_named("refusing");
    let stats = refusing.wait_count("SuccessfulCall", 3, Duration::from_secs(10));
    assert_eq!(stats.count("FailedCall"), 0, "{}", refusing.report());
}

/// Sends `method` (no body, outside any dialog) to the relay on 127.0.0.1:`port` over UDP
/// with the `extra` header lines, and returns its final response (a raw status line and
/// headers).
fn raw_request(port: u16, method: &str, uri: &str, extra: &str) -> Response {
    let sock = std::net::UdpSocket::bind(("127.0.0.1", 0)).unwrap();
    let local = sock.local_addr().unwrap();
    let req = format!(
        "{method} {uri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@{REALM}>;tag={tag}\r\n\
         To: <{uri}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 {method}\r\n\
         Contact: <sip:alice@{local}>\r\n\
         {extra}Content-Length: 0\r\n\r\n",
        branch = unique("x"),
        tag = unique("t"),
        call_id = unique("ext-"),
    );
    sock.send_to(req.as_bytes(), ("127.0.0.1", port)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65_535];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "no final response to {method}");
        sock.set_read_timeout(Some(left)).unwrap();
        let Ok(n) = sock.recv(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let head = text.split("\r\n\r\n").next().unwrap_or("");
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("").trim_start_matches("SIP/2.0 ");
        let (code, reason) = status.split_once(' ').unwrap_or((status, ""));
        let code: u16 = code.parse().unwrap_or(0);
        if code < 200 {
            continue;
        }
        return Response {
            code,
            reason: reason.to_string(),
            headers: lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                .collect(),
        };
    }
}

#[test]
fn a_required_extension_gets_420_with_unsupported_before_any_challenge() {
    let mut scene = Scene::new();
    scene.start_relay(&RelayConfig::standard());
    let relay = scene.relay();
    let port = relay.port;
    let relay_uri = format!("sip:{REALM}");

    // OPTIONS: 200 without Require (the readiness probe), 420 with one.
    let resp = raw_request(port, "OPTIONS", &relay_uri, "Require: foo\r\n");
    assert_eq!(resp.status(), "420 Bad Extension");
    assert_eq!(resp.header("Unsupported"), Some("foo"));
    let resp = raw_request(port, "OPTIONS", &relay_uri, "Supported: foo, timer\r\n");
    assert_eq!(resp.status(), "200 OK");
    // What it supports, as RFC 3261 §11.2 asks of an answer to OPTIONS.
    assert_eq!(resp.header("Supported"), Some("timer"));
    assert!(resp.header("Allow").is_some_and(|a| a.contains("INVITE")));
    assert_eq!(resp.header("Accept-Encoding"), Some("identity"));

    // INVITE and REGISTER without credentials: 420, not 407/401 (RFC 3261 §16.3 checks
    // Proxy-Require before Proxy-Authorization); the unknown tags listed once each, `timer`
    // (RFC 4028, supported) not among them.
    let resp = raw_request(
        port,
        "INVITE",
        &format!("sip:echo@{REALM}"),
        "Require: timer, 100rel\r\nProxy-Require: bar\r\n",
    );
    assert_eq!(resp.status(), "420 Bad Extension");
    assert_eq!(resp.header("Unsupported"), Some("100rel, bar"));
    assert!(resp.header("Proxy-Authenticate").is_none());
    let resp = raw_request(port, "REGISTER", &relay_uri, "Proxy-Require: sec-agree\r\n");
    assert_eq!(resp.status(), "420 Bad Extension");
    assert_eq!(resp.header("Unsupported"), Some("sec-agree"));
    assert!(resp.header("WWW-Authenticate").is_none());
    // Without Require the same REGISTER is challenged as usual.
    let resp = raw_request(port, "REGISTER", &relay_uri, "");
    assert_eq!(resp.code, 401, "{}", resp.status());
}
