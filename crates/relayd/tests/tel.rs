//! `tel:` Request-URIs (RFC 3966) through a running relayd: a terminal calls a number, the
//! rules match it and pick a service, and the call is delivered and billed like any other.
//! rsip 0.4 cannot parse `tel:` at all; sip-core carries the URI and reads it itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::billing::field;
use support::relay::{RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sip::SipClient;
use support::sipp::SippOpts;

/// Numbers starting +1555 are the echo service; every other number is unknown.
const NUMBER_RULES: &str = r#"
[[rules]]
name = "echo-numbers"
match = { method = "INVITE", ruri_user = "^\\+1555" }
set = { service = "echo" }

[[rules]]
name = "default"
default = true
"#;

#[test]
fn a_call_to_a_tel_uri_reaches_the_rules_and_is_delivered_and_billed() {
    let mut scene = Scene::new();
    let echo_port = scene.server("echo", "uas_answer.xml", SippOpts::default());
    scene.start_relay(
        &RelayConfig::standard()
            .server(ServerSpec::udp(echo_port, &["echo"]))
            .extra_toml(NUMBER_RULES),
    );
    let relay = scene.relay();
    let alice = SipClient::new(relay.port, "alice");
    assert_eq!(alice.register("alice-secret").code, 200);

    // A global number with visual separators, and the same number as a SIP URI with
    // user=phone (RFC 3261 §19.1.6): both reach the echo rule.
    for uri in [
        "tel:+1-555-123-4567",
        "sip:+15551234567@relay.test;user=phone",
    ] {
        let finals = alice.invite_uri(uri, &["alice-secret"]);
        let codes: Vec<String> = finals.iter().map(|r| r.status()).collect();
        assert_eq!(finals.len(), 2, "{uri}: 407 then a final: {codes:?}");
        assert_eq!(finals[1].code, 200, "{uri}: {codes:?}\n{}", relay.log());
    }
    scene
        .server_named("echo")
        .wait_count("SuccessfulCall", 2, Duration::from_secs(10));
    let records = scene.session_records();
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        assert_eq!(field(r, "service"), "echo", "{r}");
        assert_eq!(field(r, "subscriber"), "alice", "{r}");
    }

    // A number no rule maps names no service: refused, and nothing billed.
    let finals = alice.invite_uri("tel:+4930123456", &["alice-secret"]);
    let last = finals.last().unwrap();
    assert_eq!(last.code, 404, "{}", last.status());
    assert_eq!(scene.session_records().len(), 2);
}
