//! Background duties of the running relay: OPTIONS health probes of application servers
//! (a server that stops answering is taken out of the directory and put back when it answers
//! again; any final response, 404 or 501 included, is an answer; servers configured with
//! `probe = false` are never probed), expiry of registrations and of dynamically registered
//! servers, refresh of live sessions' last-seen time in the billing journal, and pruning of
//! used nonces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rsip::{Header, Method, Request};
use sip_core::endpoint::{ClientEvent, ClientTx};
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
    let uri = server.uri().to_rsip();
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

/// How long a probe waits for a final response before it counts as unanswered, whatever
/// the transaction timeout (64·T1).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What came of one OPTIONS probe (RFC 3261 §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// A final response from the server itself, whatever its status: 200, but also 404,
    /// 405, 501, 503… (a server that answers at all is alive, as with Kamailio's
    /// `ds_ping_reply_codes`; RFC 3261 §11.2 lets a UAS refuse OPTIONS as any request).
    Answered(u16),
    /// No final response: the transaction timed out (Timer F, RFC 3261 §17.1.2.2, which
    /// the endpoint reports apart from a 408 the server sent) or [`PROBE_TIMEOUT`] passed.
    Silent,
    /// The probe could not be sent or the transport failed (RFC 3261 §8.1.3.1).
    Failed(String),
}

impl ProbeAnswer {
    /// Whether the answer shows the server alive: any final response it sent.
    pub fn is_alive(&self) -> bool {
        matches!(self, ProbeAnswer::Answered(_))
    }
}

impl std::fmt::Display for ProbeAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeAnswer::Answered(code) => write!(f, "{code}"),
            ProbeAnswer::Silent => f.write_str("no answer"),
            ProbeAnswer::Failed(reason) => write!(f, "failed: {reason}"),
        }
    }
}

/// Reads the client transaction of a probe up to its outcome. The endpoint's
/// `final_response` turns a timeout into a local 408 and a failure into a local 503, which
/// cannot be told from a server's own 408 or 503; the events themselves can.
async fn probe_answer(ctx: &mut ClientTx) -> ProbeAnswer {
    loop {
        match ctx.recv().await {
            Some(ClientEvent::Response(r)) if r.status_code.code() >= 200 => {
                return ProbeAnswer::Answered(r.status_code.code())
            }
            Some(ClientEvent::Response(_)) => continue,
            Some(ClientEvent::TimedOut) => return ProbeAnswer::Silent,
            Some(ClientEvent::Failed(e)) => return ProbeAnswer::Failed(e),
            None => return ProbeAnswer::Failed("transaction ended".into()),
        }
    }
}

async fn probe(relay: Arc<Relay>, server: ServerRef) {
    let Some(peer) = relay.resolve_server(&server).await else {
        let change = relay.directory.probe_result(&server, false, Instant::now());
        if let (Some(change), Some(cluster)) = (change, &relay.cluster) {
            cluster.publish_health(server.uri_text(), change);
        }
        return;
    };
    let local = relay.local(peer);
    let Ok(req) = options_probe(&local, &server, &relay.realm) else {
        return;
    };
    let answer = match relay.endpoint.send_request(req, peer) {
        Ok(mut ctx) => tokio::time::timeout(PROBE_TIMEOUT, probe_answer(&mut ctx))
            .await
            .unwrap_or(ProbeAnswer::Silent),
        Err(e) => ProbeAnswer::Failed(e.to_string()),
    };
    let alive = answer.is_alive();
    if let ProbeAnswer::Failed(reason) = &answer {
        debug!(server = server.uri_text(), reason, "probe not sent");
    }
    let change = relay.directory.probe_result(&server, alive, Instant::now());
    if let (Some(change), Some(cluster)) = (change, &relay.cluster) {
        cluster.publish_health(server.uri_text(), change);
    }
    match change {
        Some(HealthChange::Down) => info!(
            server = server.uri_text(),
            "application server stopped answering; taken out"
        ),
        Some(HealthChange::Up) => info!(
            server = server.uri_text(),
            "application server answers again; put back"
        ),
        None => debug!(server = server.uri_text(), alive, answer = %answer, "probe"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_final_answer_is_alive_silence_and_failures_are_not() {
        for code in [200, 404, 405, 408, 480, 501, 503, 603] {
            assert!(ProbeAnswer::Answered(code).is_alive(), "{code}");
        }
        assert!(!ProbeAnswer::Silent.is_alive());
        assert!(!ProbeAnswer::Failed("connection refused".into()).is_alive());
        assert_eq!(ProbeAnswer::Answered(404).to_string(), "404");
        assert_eq!(ProbeAnswer::Silent.to_string(), "no answer");
    }
}
