//! What the relay refuses, and how: each refusal is checked by its status code and its
//! reason phrase, as a terminal sees them on the wire (a raw SIP client over UDP answering
//! the digest challenges with `sip_core::digest`, and one refusal driven by sipp). Then
//! failover: a dead or refusing first server does not stop the call, and the bill names the
//! server that delivered it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{field, Relay, RelaySpec, Response, ServerSpec, SipClient, Transport};

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
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), &RelaySpec::default());
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
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), &RelaySpec::default());
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
fn wrong_password_is_challenged_again_then_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    // max_failures = 3: two wrong answers are challenged again, the third locks carol out.
    let relay = Relay::start(
        dir.path(),
        &RelaySpec {
            max_failures: 3,
            ..RelaySpec::default()
        },
    );
    let carol = SipClient::new(relay.port, "carol");
    assert_eq!(carol.register("carol-secret").code, 200);
    let finals = carol.invite("echo", &["wrong-1", "wrong-2", "wrong-3"]);
    assert_eq!(
        statuses(&finals),
        [
            "407 Proxy Authentication Required",
            "407 Proxy Authentication Required",
            "407 Proxy Authentication Required",
            "403 Too many failed attempts",
        ]
    );
    // Locked: even the right password is refused now, without a new challenge.
    let resp = invite_authenticated(&carol, "echo", "carol-secret");
    assert_eq!(resp.status(), "403 Too many failed attempts");
    // The lockout is carol's alone.
    let alice = SipClient::new(relay.port, "alice");
    assert_eq!(alice.register("alice-secret").code, 200);
    let resp = invite_authenticated(&alice, "echo", "alice-secret");
    assert_eq!(resp.code, 480, "{}", resp.status());
}

#[test]
fn no_server_left_is_480() {
    let dir = tempfile::tempdir().unwrap();
    let busy_port = support::free_port();
    let busy = support::uas(
        dir.path(),
        "busy",
        "uas_busy.xml",
        busy_port,
        Transport::Udp,
        &[],
    );
    let relay = Relay::start(
        dir.path(),
        &RelaySpec {
            servers: vec![ServerSpec::new(busy_port, Transport::Udp, &["clock"])],
            ..RelaySpec::default()
        },
    );
    let alice = SipClient::new(relay.port, "alice");
    assert_eq!(alice.register("alice-secret").code, 200);
    // The only clock server is busy: failed over to nobody.
    let resp = invite_authenticated(&alice, "clock", "alice-secret");
    assert_eq!(
        resp.status(),
        "480 No application server available (last answer 486)"
    );
    busy.wait_count("SuccessfulCall", 1, Duration::from_secs(10));
    // No server delivers echo at all.
    let resp = invite_authenticated(&alice, "echo", "alice-secret");
    assert_eq!(resp.status(), "480 No application server available");
    assert!(relay.sessions().is_empty());
}

/// The same "403 Service not subscribed", seen by sipp: its scenario expects exactly that
/// status and checks the reason with a regexp (a mismatch fails the call, exit 1).
#[test]
fn sipp_terminal_sees_403_service_not_subscribed() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), &RelaySpec::default());
    let mut bob = support::uac(
        dir.path(),
        "bob",
        "uac_not_subscribed.xml",
        relay.port,
        Transport::Udp,
        support::Caller {
            user: "bob",
            password: "bob-secret",
            service: "echo",
        },
        &["-m", "2"],
    );
    let status = bob.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "sipp: {status}\n{}", bob.evidence());
    let stats = bob.stats().unwrap();
    assert_eq!(stats.count("SuccessfulCall"), 2, "{}", bob.evidence());
    assert_eq!(
        stats.count("FailedRegexpDoesntMatch"),
        0,
        "{}",
        bob.evidence()
    );
}

/// Failover calls: three calls to echo, whose first server is `first`, the second a sipp
/// server that answers. Every call must complete and be billed to the second.
fn calls_fail_over(dir: &std::path::Path, relay: &Relay, second: &support::Sipp, second_uri: &str) {
    let mut alice = support::uac(
        dir,
        "alice",
        "uac_call.xml",
        relay.port,
        Transport::Udp,
        support::ALICE_ECHO,
        &["-m", "3", "-r", "10", "-d", "100"],
    );
    let status = alice.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "sipp: {status}\n{}\n--- relayd ---\n{}",
        alice.evidence(),
        relay.log()
    );
    second.wait_count("SuccessfulCall", 3, Duration::from_secs(10));
    let records = relay.sessions();
    assert_eq!(records.len(), 3, "{records:#?}");
    for r in &records {
        assert_eq!(field(r, "server"), second_uri, "{r}");
        assert_eq!(field(r, "cause"), "caller-bye", "{r}");
    }
}

#[test]
fn silent_first_server_fails_over_to_the_second() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on the first server's port: the inquiry gets no answer at all.
    let dead_port = support::free_port();
    let live_port = support::free_port();
    let live = support::uas(
        dir.path(),
        "live",
        "uas_answer.xml",
        live_port,
        Transport::Udp,
        &[],
    );
    let relay = Relay::start(
        dir.path(),
        &RelaySpec {
            servers: vec![
                ServerSpec::new(dead_port, Transport::Udp, &["echo"]),
                ServerSpec::new(live_port, Transport::Udp, &["echo"]),
            ],
            // Keep the dead server a candidate: each call must try it first and fail over.
            failure_threshold: 100,
            inquiry_timeout_ms: 500,
            ..RelaySpec::default()
        },
    );
    let live_uri = ServerSpec::new(live_port, Transport::Udp, &[]).uri;
    calls_fail_over(dir.path(), &relay, &live, &live_uri);
    let dead_uri = ServerSpec::new(dead_port, Transport::Udp, &[]).uri;
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
    let dir = tempfile::tempdir().unwrap();
    let refusing_port = support::free_port();
    let live_port = support::free_port();
    let refusing = support::uas(
        dir.path(),
        "refusing",
        "uas_unavailable.xml",
        refusing_port,
        Transport::Udp,
        &[],
    );
    let live = support::uas(
        dir.path(),
        "live",
        "uas_answer.xml",
        live_port,
        Transport::Udp,
        &[],
    );
    let relay = Relay::start(
        dir.path(),
        &RelaySpec {
            servers: vec![
                ServerSpec::new(refusing_port, Transport::Udp, &["echo"]),
                ServerSpec::new(live_port, Transport::Udp, &["echo"]),
            ],
            ..RelaySpec::default()
        },
    );
    let live_uri = ServerSpec::new(live_port, Transport::Udp, &[]).uri;
    calls_fail_over(dir.path(), &relay, &live, &live_uri);
    // The refusing server really was asked each time (and got its ACK).
    let stats = refusing.wait_count("SuccessfulCall", 3, Duration::from_secs(10));
    assert_eq!(stats.count("FailedCall"), 0, "{}", refusing.evidence());
}
