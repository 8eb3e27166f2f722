//! Application billing of a running agent: bytes delivered through the data gateway become
//! charge MESSAGEs to the relay stand-in, which challenges them (407, digest checked with
//! sip-core's server side), fails the first authenticated attempt of each (500), refuses the
//! second as for a session it no longer holds (403), and accepts the third, which must name
//! the subscriber alone. Every charge must keep its event id and body (but for the Call-ID
//! dropped after the 403) until accepted, and the units must add up to the whole blocks
//! delivered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{call_id, header, present_token, Agent, Relay};
use rsip::prelude::*;
use rsip::{Header, Method};
use sip_core::digest::{Credentials, DigestServer, StoredCredential};
use sip_core::message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[derive(Default)]
struct Seen {
    /// Per event id: the bodies of its authenticated attempts.
    attempts: HashMap<String, Vec<serde_json::Value>>,
    confirmed: HashMap<String, u64>,
    challenged: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_are_authenticated_retried_with_one_event_id_and_add_up() {
    let mut relay = Relay::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[billing]\nretry_initial_ms = 50\nretry_max_secs = 1\ncurrency = \"EUR\"\n",
    )
    .unwrap();
    let uri = relay.uri();
    let agent = Agent::start(&[
        "--config",
        config.to_str().unwrap(),
        "--relay",
        &uri,
        "--domain",
        "relay.test",
        "--no-register",
        "--service",
        "echo=builtin:echo",
        "--bytes-per-charge",
        "1000",
        "--price-per-block",
        "5",
    ])
    .await;
    let leg = relay.call(agent.sip, "echo", "alice").await;
    let (mut data, line) = present_token(agent.data, leg.answer.token.as_deref().unwrap()).await;
    assert_eq!(line, "OK");
    // 2500 bytes echoed: two whole blocks of 1000 delivered.
    data.write_all(&[7u8; 2500]).await.unwrap();
    let mut back = vec![0u8; 2500];
    tokio::time::timeout(common::WAIT, data.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();

    let server = DigestServer::new("relay.test", [5u8; 32], Duration::from_secs(300));
    let stored = StoredCredential::from_password("as1", "relay.test", "as1-secret");
    let mut seen = Seen::default();
    while seen.confirmed.values().sum::<u64>() < 2 {
        let r = relay.next_request().await;
        assert_eq!(r.req.method, Method::Message, "unexpected {}", r.req);
        assert_eq!(r.req.uri.to_string(), "sip:charge@relay.test");
        assert_eq!(
            header(&r.req, "Content-Type").as_deref(),
            Some("application/vnd.relay.charge+json")
        );
        let creds = r.req.headers.iter().find_map(|h| match h {
            Header::ProxyAuthorization(v) => Some(Credentials::parse(v.value()).unwrap()),
            _ => None,
        });
        let Some(creds) = creds else {
            seen.challenged += 1;
            let mut resp = message::response_for(&r.req, 407, None, Some(&message::new_tag()));
            for v in server.challenge(now_unix(), false) {
                resp.headers.push(Header::ProxyAuthenticate(
                    rsip::headers::ProxyAuthenticate::new(v),
                ));
            }
            r.tx.respond(resp).unwrap();
            continue;
        };
        server
            .verify(
                &creds,
                "MESSAGE",
                |user| (user == "as1").then(|| stored.clone()),
                now_unix(),
            )
            .expect("charge credentials do not verify");
        let body: serde_json::Value = serde_json::from_slice(&r.req.body).unwrap();
        let event_id = body["event_id"].as_str().unwrap().to_string();
        assert!(
            !seen.confirmed.contains_key(&event_id),
            "{event_id} sent again after its 200"
        );
        let attempts = seen.attempts.entry(event_id.clone()).or_default();
        attempts.push(body.clone());
        let code = match attempts.len() {
            1 => 500,
            2 => 403,
            _ => 200,
        };
        if code == 200 {
            seen.confirmed
                .insert(event_id, body["units"].as_u64().unwrap());
        }
        r.tx.respond(message::response_for(
            &r.req,
            code,
            None,
            Some(&message::new_tag()),
        ))
        .unwrap();
    }
    assert!(seen.challenged >= 1, "the first charge was not challenged");
    for (event_id, attempts) in &seen.attempts {
        assert!(event_id.starts_with("as1-"), "{event_id}");
        assert_eq!(attempts.len(), 3, "{event_id}: 500, 403, then 200");
        assert_eq!(attempts[0], attempts[1], "a retry changed the charge");
        let body = &attempts[0];
        assert_eq!(body["call_id"], call_id(&leg).as_str());
        let mut for_subscriber = body.clone();
        for_subscriber.as_object_mut().unwrap().remove("call_id");
        assert_eq!(
            attempts[2], for_subscriber,
            "after the 403: the same charge, subscriber only"
        );
        assert_eq!(body["subscriber"], "alice");
        assert_eq!(body["unit_price"], 5);
        assert_eq!(body["currency"], "EUR");
    }
    assert_eq!(seen.confirmed.values().sum::<u64>(), 2);
    agent.wait_for("charge confirmed by the relay").await;
}

/// Charges toward an IPv6 relay: the relay stand-in listens on `[::1]` and the agent is
/// given `--relay sip:[::1]:PORT` (no `--domain`: the charge URI is the relay's IPv6
/// address). The SDP answer names the gateway in IPv6, the data goes over IPv6, and each
/// charge MESSAGE arrives over IPv6 with every address bracketed; the agent then hangs up
/// toward the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_reach_an_ipv6_relay() {
    let mut relay = Relay::bind_on("[::1]:0").await;
    let uri = relay.uri();
    assert!(uri.starts_with("sip:[::1]:"), "{uri}");
    let agent = Agent::start(&[
        "--relay",
        &uri,
        "--no-register",
        "--listen",
        "[::1]:0",
        "--data-listen",
        "[::1]:0",
        "--service",
        "echo=builtin:echo",
        "--bytes-per-charge",
        "1000",
    ])
    .await;
    let leg = relay.call(agent.sip, "echo", "alice").await;
    assert_eq!(leg.answer.socket_addr(), agent.data);
    assert!(leg.answer.addr.is_ipv6() && leg.answer.origin.addr.is_ipv6());
    let (mut data, line) = present_token(agent.data, leg.answer.token.as_deref().unwrap()).await;
    assert_eq!(line, "OK");
    data.write_all(&[7u8; 2500]).await.unwrap();
    let mut back = vec![0u8; 2500];
    tokio::time::timeout(common::WAIT, data.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    let charge_uri = format!("sip:charge@{}", relay.addr);
    let mut units = 0;
    while units < 2 {
        let r = relay.next_request().await;
        assert_eq!(r.req.method, Method::Message, "unexpected {}", r.req);
        assert!(r.from.addr.is_ipv6(), "{}", r.from);
        assert_eq!(r.req.uri.to_string(), charge_uri);
        let via = header(&r.req, "Via").unwrap();
        assert!(
            via.starts_with(&format!("SIP/2.0/UDP {};", agent.sip)),
            "{via}"
        );
        let from = header(&r.req, "From").unwrap();
        assert!(
            from.starts_with(&format!("<sip:as1@{}>;tag=", relay.addr)),
            "{from}"
        );
        let body: serde_json::Value = serde_json::from_slice(&r.req.body).unwrap();
        units += body["units"].as_u64().unwrap();
        r.tx.respond(message::response_for(
            &r.req,
            200,
            None,
            Some(&message::new_tag()),
        ))
        .unwrap();
    }
    assert_eq!(units, 2);
    agent.wait_for("charge confirmed by the relay").await;
    data.shutdown().await.unwrap();
    relay.expect_bye(&call_id(&leg)).await;
}

/// A charge left in the spool by an earlier run (a crash before the relay confirmed it) is
/// sent at start with its event id unchanged, and leaves the spool once confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_left_in_the_spool_are_sent_at_start() {
    let mut relay = Relay::bind().await;
    let spool = tempfile::tempdir().unwrap();
    let leftover = serde_json::json!({
        "event_id": "as1-0badc0de-000042",
        "subscriber": "alice",
        "units": 4,
        "unit_price": 5,
        "currency": "EUR",
        "description": "4 x 1000 bytes delivered (echo, call earlier)"
    });
    let file = spool.path().join("as1-0badc0de-000042.json");
    std::fs::write(&file, serde_json::to_vec(&leftover).unwrap()).unwrap();
    let uri = relay.uri();
    let agent = Agent::start(&[
        "--relay",
        &uri,
        "--domain",
        "relay.test",
        "--no-register",
        "--service",
        "echo=builtin:echo",
        "--spool-dir",
        spool.path().to_str().unwrap(),
    ])
    .await;
    let server = DigestServer::new("relay.test", [6u8; 32], Duration::from_secs(300));
    loop {
        let r = relay.next_request().await;
        assert_eq!(r.req.method, Method::Message);
        if !r
            .req
            .headers
            .iter()
            .any(|h| matches!(h, Header::ProxyAuthorization(_)))
        {
            let mut resp = message::response_for(&r.req, 407, None, Some(&message::new_tag()));
            for v in server.challenge(now_unix(), false) {
                resp.headers.push(Header::ProxyAuthenticate(
                    rsip::headers::ProxyAuthenticate::new(v),
                ));
            }
            r.tx.respond(resp).unwrap();
            continue;
        }
        let body: serde_json::Value = serde_json::from_slice(&r.req.body).unwrap();
        assert_eq!(body, leftover, "the spooled charge changed");
        r.tx.respond(message::response_for(
            &r.req,
            200,
            None,
            Some(&message::new_tag()),
        ))
        .unwrap();
        break;
    }
    agent.wait_for("charge confirmed by the relay").await;
    assert!(!file.exists(), "a confirmed charge stayed in the spool");
}
