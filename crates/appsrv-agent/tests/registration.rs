//! Registration of a running agent with the relay's registrar.
//!
//! (The registration against a `relayd` built from this workspace, and the agent showing up
//! in its directory, is to be added once relayd serves SIP.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    assert_sipp_ok, free_udp_port, header, run_sipp_uas, run_sipp_uas_on, sipp, Agent, Relay,
};
use rsip::prelude::*;
use rsip::{Header, Method};
use sip_core::digest::{Credentials, DigestServer, StoredCredential};
use sip_core::message;
use sip_core::Peer;

/// sipp as the registrar: the agent registers its services (Contact parameters checked),
/// answers sipp's MD5 digest challenge correctly (sipp's verifyauth), and on SIGTERM
/// unregisters with `Expires: 0` in the same registration, then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_digest_to_sipp_and_unregisters_on_sigterm() {
    sipp();
    let port = free_udp_port("127.0.0.1");
    let registrar = tokio::spawn(run_sipp_uas("register_uas.xml", port));
    // sipp should listen before the agent's first REGISTER (a lost one would only be
    // retransmitted later): wait until it has bound its port.
    common::wait_port_bound(port).await;
    let relay = format!("sip:127.0.0.1:{port}");
    let mut agent = Agent::start(&[
        "--relay",
        &relay,
        "--domain",
        "relay.test",
        "--service",
        "echo=builtin:echo",
        "--service",
        "clock=builtin:clock",
        "--capacity",
        "7",
    ])
    .await;
    agent.wait_for("registered with the relay").await;
    agent.sigterm();
    let out = registrar.await.unwrap();
    assert_sipp_ok(&out, "register_uas", &agent);
    let status = agent.wait_exit().await;
    assert!(status.success(), "agent exit {status:?}:\n{}", agent.log());
    agent.wait_for("unregistered from the relay").await;
}

/// The same over IPv6: sipp is the registrar on `::1`, the agent is given
/// `--relay sip:[::1]:PORT` (no `--domain`, so the registrar URI is the relay's IPv6
/// address) and listens on `[::1]`. sipp checks `REGISTER sip:[::1]:PORT`, a bracketed
/// Via and the Contact `<sip:as1@[::1]:PORT>` with the services, verifies the digest, and
/// takes the unregistration on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_over_ipv6_to_sipp_and_unregisters_on_sigterm() {
    sipp();
    let port = free_udp_port("::1");
    let registrar = tokio::spawn(run_sipp_uas_on("register_uas_ipv6.xml", "::1", port));
    common::wait_port_bound_on("::1", port).await;
    let relay = format!("sip:[::1]:{port}");
    let mut agent = Agent::start(&[
        "--relay",
        &relay,
        "--listen",
        "[::1]:0",
        "--data-listen",
        "[::1]:0",
        "--service",
        "echo=builtin:echo",
        "--service",
        "clock=builtin:clock",
        "--capacity",
        "7",
    ])
    .await;
    assert!(agent.sip.is_ipv6(), "{}", agent.sip);
    let registered = agent.wait_for("registered with the relay").await;
    assert!(registered.contains(&relay), "{registered}");
    agent.sigterm();
    let out = registrar.await.unwrap();
    assert_sipp_ok(&out, "register_uas_ipv6", &agent);
    let status = agent.wait_exit().await;
    assert!(status.success(), "agent exit {status:?}:\n{}", agent.log());
    agent.wait_for("unregistered from the relay").await;
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A registrar built on sip-core: the agent registers with digest (SHA-256 chosen over MD5),
/// refreshes before the granted lifetime ends, registers again with the new challenge of a
/// relay that restarted (new nonce key, old credentials refused), answers the relay's
/// OPTIONS probe, and unregisters on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_and_recovers_after_a_relay_restart() {
    let mut relay = Relay::bind().await;
    let uri = relay.uri();
    let mut agent = Agent::start(&[
        "--relay",
        &uri,
        "--domain",
        "relay.test",
        "--service",
        "echo=builtin:echo",
        "--service",
        "clock=builtin:clock",
    ])
    .await;
    let stored = StoredCredential::from_password("as1", "relay.test", "as1-secret");
    let mut server = DigestServer::new("relay.test", [1u8; 32], Duration::from_secs(300));
    let mut bindings = 0;
    let mut restarted = false;
    let mut call_ids = std::collections::HashSet::new();
    while bindings < 2 {
        let r = relay.next_request().await;
        assert_eq!(r.req.method, Method::Register, "unexpected {}", r.req);
        assert_eq!(r.req.uri.to_string(), "sip:relay.test");
        let contact = header(&r.req, "Contact").unwrap();
        assert!(
            contact.starts_with(&format!("<sip:as1@{}>", agent.sip))
                && contact.contains("services=\"echo,clock\""),
            "{contact}"
        );
        assert!(header(&r.req, "To").unwrap().contains("sip:as1@relay.test"));
        call_ids.insert(header(&r.req, "Call-ID").unwrap());
        let creds = r.req.headers.iter().find_map(|h| match h {
            Header::Authorization(v) => Some(Credentials::parse(v.value()).unwrap()),
            _ => None,
        });
        let verified = creds.as_ref().map(|c| {
            server.verify(
                c,
                "REGISTER",
                |u| (u == "as1").then(|| stored.clone()),
                now_unix(),
            )
        });
        match verified {
            Some(Ok(v)) => {
                assert_eq!(v.algorithm, sip_core::digest::Algorithm::Sha256);
                bindings += 1;
                let mut resp = message::response_for(&r.req, 200, None, Some("reg"));
                // A short lifetime, so the refresh comes soon.
                resp.headers
                    .push(Header::Contact(rsip::headers::Contact::new(format!(
                        "<sip:as1@{}>;expires=2",
                        agent.sip
                    ))));
                r.tx.respond(resp).unwrap();
                if bindings == 1 {
                    // The relay restarts: new nonce key, bindings forgotten.
                    server = DigestServer::new("relay.test", [2u8; 32], Duration::from_secs(300));
                    restarted = true;
                }
            }
            _ => {
                let mut resp = message::response_for(&r.req, 401, None, Some("reg"));
                for v in server.challenge(now_unix(), false) {
                    resp.headers.push(Header::WwwAuthenticate(
                        rsip::headers::WwwAuthenticate::new(v),
                    ));
                }
                r.tx.respond(resp).unwrap();
            }
        }
    }
    assert!(restarted);
    assert_eq!(
        call_ids.len(),
        1,
        "one Call-ID for the whole registration (RFC 3261 §10.2.4)"
    );
    agent.wait_for_nth("registered with the relay", 2).await;

    // The relay's health probe.
    let probe = format!(
        "OPTIONS sip:{sip} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch={b};rport\r\nMax-Forwards: 70\r\n\
         From: <sip:relay@relay.test>;tag=p1\r\nTo: <sip:{sip}>\r\nCall-ID: probe-1\r\n\
         CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        sip = agent.sip,
        me = relay.addr,
        b = message::new_branch()
    );
    let probe = match rsip::SipMessage::try_from(probe.as_str()).unwrap() {
        rsip::SipMessage::Request(r) => r,
        _ => unreachable!(),
    };
    let mut tx = relay
        .endpoint
        .send_request(probe, Peer::udp(agent.sip))
        .unwrap();
    let resp = tokio::time::timeout(common::WAIT, tx.final_response())
        .await
        .unwrap();
    assert_eq!(resp.status_code.code(), 200);

    agent.sigterm();
    loop {
        let r = relay.next_request().await;
        assert_eq!(r.req.method, Method::Register);
        let expires = header(&r.req, "Expires").unwrap();
        r.tx.respond(message::response_for(&r.req, 200, None, Some("reg")))
            .unwrap();
        if expires == "0" {
            break;
        }
        // A refresh that crossed the SIGTERM: answered, and the next must unregister.
    }
    let status = agent.wait_exit().await;
    assert!(status.success(), "agent exit {status:?}:\n{}", agent.log());
}
