//! Background duties of the running relay: OPTIONS health probes of application servers
//! (a server that stops answering is taken out of the directory and put back when it answers
//! again), expiry of registrations and of dynamically registered servers, refresh of live
//! sessions' last-seen time in the billing journal, and pruning of used nonces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rsip::{Header, Method, Request};
use sip_core::message;
use tracing::{debug, info};

use crate::b2bua::LocalAddr;
use crate::directory::{HealthChange, ServerRef};
use crate::relay::Relay;

/// An out-of-dialog OPTIONS probe to `server` (RFC 3261 §11).
pub fn options_probe(
    local: &LocalAddr,
    server: &ServerRef,
    realm: &str,
) -> Result<Request, rsip::Error> {
    let uri = server.uri().clone();
    let mut headers = rsip::Headers::default();
    headers.push(local.via().header());
    headers.push(Header::MaxForwards(rsip::headers::MaxForwards::from(70u32)));
    headers.push(Header::From(rsip::headers::From::from(format!(
        "<sip:relay@{realm}>;tag={}",
        message::new_tag()
    ))));
    headers.push(Header::To(rsip::headers::To::from(format!("<{uri}>"))));
    headers.push(Header::CallId(rsip::headers::CallId::from(
        message::new_call_id(&local.addr.ip().to_string()),
    )));
    headers.push(Header::CSeq(rsip::headers::CSeq::from(rsip::typed::CSeq {
        seq: 1,
        method: Method::Options,
    })));
    headers.push(local.contact_header());
    message::set_content_length(&mut headers, 0);
    Ok(Request {
        method: Method::Options,
        uri,
        version: rsip::Version::V2,
        headers,
        body: Vec::new(),
    })
}

async fn probe(relay: Arc<Relay>, server: ServerRef) {
    let Some(peer) = relay.resolve_server(&server).await else {
        relay.directory.probe_result(&server, false, Instant::now());
        return;
    };
    let local = relay.local(peer.transport);
    let Ok(req) = options_probe(&local, &server, &relay.realm) else {
        return;
    };
    let Ok(mut ctx) = relay.endpoint.send_request(req, peer) else {
        return;
    };
    // Any final answer proves the server alive (RFC 3261 §11.2); only silence does not.
    let alive = tokio::time::timeout(Duration::from_secs(5), ctx.final_response())
        .await
        .is_ok_and(|r| r.status_code.code() != 408 && r.status_code.code() != 503);
    match relay.directory.probe_result(&server, alive, Instant::now()) {
        Some(HealthChange::Down) => info!(
            server = server.uri_text(),
            "application server stopped answering; taken out"
        ),
        Some(HealthChange::Up) => info!(
            server = server.uri_text(),
            "application server answers again; put back"
        ),
        None => debug!(server = server.uri_text(), alive, "probe"),
    }
}

/// Probes servers as they fall due, until the relay stops.
pub async fn probe_loop(relay: Arc<Relay>) {
    loop {
        let now = Instant::now();
        for server in relay.directory.probe_due(now) {
            tokio::spawn(probe(relay.clone(), server));
        }
        let next = relay
            .directory
            .next_probe(Instant::now())
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::time::sleep(next).await;
    }
}

/// Expires registrations, dynamic servers and used nonces once a second.
pub async fn expiry_loop(relay: Arc<Relay>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        let now = Instant::now();
        for gone in relay.registrar.expire(now) {
            if !gone.services.is_empty() {
                relay.directory.remove_dynamic(&gone.user, &gone.uri_text);
            }
            debug!(user = %gone.user, contact = %gone.uri_text, "binding expired");
        }
        for gone in relay.directory.expire(now) {
            info!(
                server = gone.uri_text(),
                "dynamic application server expired"
            );
        }
        n += 1;
        if n % 60 == 0 {
            relay.auth.prune();
        }
    }
}
