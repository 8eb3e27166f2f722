//! A relay that refuses the agent's address or account for too many failed authentication
//! attempts (issue 14, finding 2) costs the agent neither its registration nor a charge.
//!
//! The relay stand-in answers every authenticated REGISTER and charge MESSAGE first as
//! relayd refuses a failing source (`503 Too many failed attempts` with `Retry-After: 1`),
//! then as relays did before (`403 Too many failed attempts`), and only then accepts it.
//! The agent must retry both — the charge with its event id, body and session unchanged
//! (the 403 is not the "session no longer known" one), the REGISTER until bound — and log
//! no refusal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{header, present_token, Agent, Relay};
use rsip::prelude::*;
use rsip::{Header, Method, Request, Response};
use sip_core::digest::{Credentials, DigestServer, StoredCredential};
use sip_core::message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The answer to the `n`th authenticated attempt (from 1): the lock-out refusals first.
fn refusal_then_ok(req: &Request, n: usize) -> Response {
    let tag = message::new_tag();
    match n {
        1 => {
            let mut resp =
                message::response_for(req, 503, Some("Too many failed attempts"), Some(&tag));
            resp.headers
                .push(Header::RetryAfter(rsip::headers::RetryAfter::new("1")));
            resp
        }
        2 => message::response_for(req, 403, Some("Too many failed attempts"), Some(&tag)),
        _ => message::response_for(req, 200, None, Some(&tag)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lockout_refusal_loses_neither_the_registration_nor_a_charge() {
    let mut relay = Relay::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[billing]\nretry_initial_ms = 50\nretry_max_secs = 2\ncurrency = \"EUR\"\n",
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
    data.write_all(&[7u8; 2000]).await.unwrap();
    let mut back = vec![0u8; 2000];
    tokio::time::timeout(common::WAIT, data.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();

    let server = DigestServer::new("relay.test", [9u8; 32], Duration::from_secs(300));
    let stored = StoredCredential::from_password("as1", "relay.test", "as1-secret");
    let mut registers = 0usize;
    let mut charges: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    let mut confirmed = 0u64;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while registers < 3 || confirmed < 2 {
        let r = tokio::time::timeout_at(deadline, relay.next_request())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "registered after {registers} attempts, {confirmed} units confirmed\n{}",
                    agent.log()
                )
            });
        let (kind, header_name) = match r.req.method {
            Method::Register => (401, "Authorization"),
            Method::Message => (407, "Proxy-Authorization"),
            _ => {
                r.tx.respond(message::response_for(&r.req, 200, None, None))
                    .unwrap();
                continue;
            }
        };
        let creds = header(&r.req, header_name).map(|v| Credentials::parse(&v).unwrap());
        let Some(creds) = creds else {
            let mut resp = message::response_for(&r.req, kind, None, Some(&message::new_tag()));
            for v in server.challenge(now_unix(), false) {
                resp.headers.push(if kind == 401 {
                    Header::WwwAuthenticate(rsip::headers::WwwAuthenticate::new(v))
                } else {
                    Header::ProxyAuthenticate(rsip::headers::ProxyAuthenticate::new(v))
                });
            }
            r.tx.respond(resp).unwrap();
            continue;
        };
        let method = r.req.method.to_string();
        server
            .verify(
                &creds,
                &method,
                |user| (user == "as1").then(|| stored.clone()),
                now_unix(),
            )
            .expect("the agent's credentials verify");
        let n = if r.req.method == Method::Register {
            registers += 1;
            registers
        } else {
            let body: serde_json::Value = serde_json::from_slice(&r.req.body).unwrap();
            let id = body["event_id"].as_str().unwrap().to_string();
            let attempts = charges.entry(id).or_default();
            attempts.push(body.clone());
            if attempts.len() >= 3 {
                confirmed += body["units"].as_u64().unwrap();
            }
            attempts.len()
        };
        r.tx.respond(refusal_then_ok(&r.req, n)).unwrap();
    }
    agent.wait_for("registered with the relay").await;
    agent.wait_for("charge confirmed by the relay").await;
    assert_eq!(confirmed, 2, "both blocks charged");
    for (id, attempts) in &charges {
        assert_eq!(attempts.len(), 3, "{id}: 503, 403, then 200");
        assert!(
            attempts.iter().all(|a| a == &attempts[0]),
            "{id}: the charge went out unchanged, session included: {attempts:#?}"
        );
        assert_eq!(
            attempts[0]["call_id"],
            common::call_id(&leg).as_str(),
            "{id}"
        );
    }
    let log = agent.log();
    assert!(!log.contains("relay refused the charge"), "{log}");
    assert!(
        log.contains("Too many failed attempts"),
        "the refusals are logged as failures to retry: {log}"
    );
}
