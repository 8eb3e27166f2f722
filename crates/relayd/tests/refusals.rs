//! What the relay refuses, and how: each refusal is checked by its status code and its
//! reason phrase, as a terminal sees them on the wire (a raw SIP client over UDP answering
//! the digest challenges with `sip_core::digest`, and one refusal driven by sipp). Then
//! failover: a dead or refusing first server does not stop the call, and the bill names the
//! server that delivered it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::billing::field;
use support::relay::{server_uri, RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sip::{Response, SipClient};
use support::sipp::{SippOpts, Transport};
use support::{ALICE, BOB};

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
fn wrong_password_is_challenged_again_then_locked_out() {
    let mut scene = Scene::new();
    // max_failures = 3: two wrong answers are challenged again, the third locks carol out.
    scene.start_relay(&RelayConfig::standard().max_failures(3));
    let relay = scene.relay();
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
