//! IPv6 through a running relayd (RFC 3261 §19.1.1 and §20.42, RFC 5118): a sipp terminal
//! on `::1` registers and calls a sipp application server on `::1` through a relay listening
//! on both 127.0.0.1 and [::1]. The relay must speak from its IPv6 address on both legs (Via
//! and Contact with a bracketed host), read IPv6 Contacts and Vias (`received=::1`), resolve a
//! server configured as `sip:[::1]:PORT`, and bill the call like any other. rsip 0.4 cannot
//! parse an IPv6 reference at all; every one of these reads goes through sip-core.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use support::billing::field;
use support::relay::{RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sip::SipClient;
use support::sipp::{SippOpts, Transport};
use support::ALICE;

const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Contacts from the IPv6 loopback are allowed, as an operator would write it.
const V6_CONTACTS: &str = "[registrar]\nallowed_contact_nets = [\"127.0.0.0/8\", \"::1/128\"]\n";

/// The URI of the application server on [::1]:`port` over `transport`.
fn v6_server(port: u16, transport: Transport) -> ServerSpec {
    let mut spec = ServerSpec::new(port, transport, &["echo"]);
    spec.uri = format!("sip:[::1]:{port}{}", transport.uri_param());
    spec
}

/// One call over [::1] on both legs, `transport` on both.
fn a_call_over_ipv6(transport: Transport) {
    let mut scene = Scene::new();
    let as_port = scene.server(
        "uas",
        "uas_answer.xml",
        SippOpts::default().over(transport).on(V6),
    );
    scene.start_relay(
        &RelayConfig::standard()
            .dual_stack()
            .server(v6_server(as_port, transport))
            .extra_toml(V6_CONTACTS),
    );
    let relay_port = scene.relay().port;

    let mut terminal = scene.terminal(
        "uac",
        "uac_call.xml",
        ALICE,
        "echo",
        SippOpts::default()
            .over(transport)
            .on(V6)
            .args(&["-d", "500"]),
    );
    scene.assert_success(&mut terminal);
    let server = scene.server_named("uas");
    server.wait_count("SuccessfulCall", 1, Duration::from_secs(10));

    // The inquiry left from the relay's IPv6 address: its Via and Contact say so, and the
    // Request-URI names the server by its IPv6 reference.
    let inquiry = server.messages();
    let via = format!(
        "Via: SIP/2.0/{} [::1]:{relay_port};branch=",
        transport.via_name()
    );
    assert!(inquiry.contains(&via), "no `{via}` in\n{inquiry}");
    let contact = format!("Contact: <sip:relay@[::1]:{relay_port}");
    assert!(inquiry.contains(&contact), "no `{contact}` in\n{inquiry}");
    let ruri = format!("INVITE sip:echo@[::1]:{as_port}");
    assert!(inquiry.contains(&ruri), "no `{ruri}` in\n{inquiry}");

    // The terminal got the relay's IPv6 Contact and the server's IPv6 SDP answer.
    let seen = terminal.messages();
    assert!(seen.contains(&contact), "no `{contact}` in\n{seen}");
    assert!(seen.contains("c=IN IP6 ::1"), "no IP6 answer in\n{seen}");

    let records = scene.session_records();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(field(&records[0], "service"), "echo");
    assert_eq!(field(&records[0], "subscriber"), "alice");
    let server_uri = field(&records[0], "server");
    assert_eq!(
        server_uri,
        format!("sip:[::1]:{as_port}{}", transport.uri_param())
    );
}

#[test]
fn a_call_over_ipv6_udp_is_relayed_from_the_relays_ipv6_address_and_billed() {
    a_call_over_ipv6(Transport::Udp);
}

#[test]
fn a_call_over_ipv6_tcp_is_relayed_from_the_relays_ipv6_address_and_billed() {
    a_call_over_ipv6(Transport::Tcp);
}

/// `allowed_contact_nets` takes IPv6 networks: a Contact on ::1 is refused while only
/// 127.0.0.0/8 is allowed, and accepted once ::1/128 is in the list.
#[test]
fn allowed_contact_nets_take_ipv6_networks() {
    let mut scene = Scene::new();
    scene.start_relay(
        &RelayConfig::standard()
            .dual_stack()
            .extra_toml("[registrar]\nallowed_contact_nets = [\"127.0.0.0/8\"]\n"),
    );
    let alice = SipClient::at(V6, scene.relay().port, "alice");
    let refused = alice.register("alice-secret");
    assert_eq!(refused.code, 403, "{}", refused.status());
    let v4 = SipClient::new(scene.relay().port, "alice");
    assert_eq!(v4.register("alice-secret").code, 200);

    let mut scene = Scene::new();
    scene.start_relay(
        &RelayConfig::standard()
            .dual_stack()
            .extra_toml("[registrar]\nallowed_contact_nets = [\"10.0.0.0/8\", \"::1/128\"]\n"),
    );
    let alice = SipClient::at(V6, scene.relay().port, "alice");
    let accepted = alice.register("alice-secret");
    assert_eq!(accepted.code, 200, "{}", accepted.status());
    let contact = accepted.header("Contact").unwrap_or_default();
    assert!(contact.contains("@[::1]:"), "{contact}");
}
