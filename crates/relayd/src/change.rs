//! Service change (claim 5): an in-dialog re-INVITE from the terminal whose
//! `P-Preferred-Service` names another service (or other parameters). The relay checks the
//! subscription, searches a server for the changed service and inquires of it: a re-INVITE
//! on the same server leg when that server delivers the changed service, otherwise a new leg
//! to the server found (the RFC 3725 third-party call control pattern), the old leg ended
//! once the new one is up. The terminal gets the server's answer. On refusal the terminal
//! gets the error and the session is left exactly as it was.
//!
//! Billing: the old segment is closed with cause `changed` and a new one opens on the new
//! service's tariff, committed before the terminal hears the 2xx. A re-INVITE with no
//! service change is relayed as it is ([`crate::in_dialog`]) and bills nothing new.

use std::collections::VecDeque;

use billing::record::EndCause;
use rsip::{Header, Method, Request, Response};
use sip_core::endpoint::IncomingRequest;
use tracing::{info, warn};

use crate::b2bua;
use crate::directory::ServerRef;
use crate::in_dialog::PendingAck;
use crate::leg::{Purpose, ServerLeg};
use crate::routing::{AnswerPurpose, SessionInput};
use crate::session::{fails_over, Call, Side};

/// The service a change asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The service id.
    pub service: String,
    /// Its parameters.
    pub params: Vec<(String, String)>,
}

/// A change onto a new server, waiting for its answer.
pub(crate) struct Pending {
    pub(crate) session: String,
    pub(crate) reinvite: IncomingRequest,
    pub(crate) target: Target,
    pub(crate) rest: VecDeque<ServerRef>,
}

/// Parses `P-Preferred-Service: service[;name=value…]` (RFC 6050's header, with the relay's
/// plain service ids and parameters).
pub fn parse_preferred(value: &str) -> Option<Target> {
    let mut parts = value.split(';');
    let service = parts.next()?.trim();
    if service.is_empty()
        || !service
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.!~*'".contains(c))
    {
        return None;
    }
    let params = parts
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => (p.trim().to_string(), String::new()),
        })
        .collect();
    Some(Target {
        service: service.to_string(),
        params,
    })
}

/// The change a terminal's re-INVITE asks for: `Some` when its `P-Preferred-Service` names
/// a service or parameters other than the session's.
pub fn requested(req: &Request, service: &str, params: &[(String, String)]) -> Option<Target> {
    let value = b2bua::other_header(&req.headers, "P-Preferred-Service")?;
    let target = parse_preferred(value)?;
    (target.service != service || target.params != params).then_some(target)
}

/// The service an SDP body names (`a=service:<id>`, at session or media level), if any.
pub fn sdp_service(body: &[u8]) -> Option<String> {
    let sdp = sip_core::sdp::Sdp::parse(body).ok()?;
    let named = sdp
        .session_attribute(sip_core::sdp::SERVICE_ATTR)
        .or_else(|| {
            sdp.media_of_type("application")
                .find_map(|m| m.attribute(sip_core::sdp::SERVICE_ATTR))
        })?;
    Some(named.trim().to_string())
}

fn refuse(r: &IncomingRequest, code: u16, reason: &str) {
    let _ =
        r.tx.respond(b2bua::local_response(&r.req, code, reason, None));
}

/// Starts the change asked by re-INVITE `r` on session `i`.
pub(crate) async fn start(call: &mut Call, i: usize, r: IncomingRequest, target: Target) {
    if call.sessions[i].busy {
        refuse(&r, 491, "Request Pending");
        return;
    }
    if let Err(e) = call.sessions[i].a_dialog.check_remote_cseq(&r.req) {
        warn!(error = %e, "re-INVITE out of order");
        refuse(&r, 500, "CSeq out of order");
        return;
    }
    let relay = call.relay.clone();
    // The rules run again, as for a new call to the service asked: they may redirect it,
    // restrict it or bill it on another plan.
    let target = match relay.decide_again(
        &call.adm.subscriber,
        &r.req,
        &target.service,
        &target.params,
    ) {
        Ok(decision) => {
            call.sessions[i].next_plan = Some(decision.plan);
            Target {
                service: decision.service,
                params: decision.params.into_iter().collect(),
            }
        }
        Err((code, reason)) => {
            refuse(&r, code, reason);
            return;
        }
    };
    let session = call.sessions[i].id.clone();
    let current = call.sessions[i].b.server.clone();
    info!(session_id = %session, from = %call.sessions[i].service, to = %target.service, "service change asked");
    let same_server = relay
        .directory
        .servers_of(&target.service)
        .iter()
        .any(|s| s.uri_text() == current.uri_text());
    call.sessions[i].busy = true;
    if same_server {
        // Re-INVITE on the same leg, asserting the changed service.
        let (mut extra, body) = b2bua::carried_body(&r.req);
        extra.push(Header::Other(
            "P-Asserted-Service".into(),
            asserted(&target),
        ));
        let Some((req, peer)) = call.build_request(i, Side::Server, Method::Invite, extra, body)
        else {
            call.sessions[i].busy = false;
            refuse(&r, 500, "Cannot build the re-INVITE");
            return;
        };
        let me = call.me.clone();
        let ctx = relay.endpoint.send_request(req.clone(), peer);
        tokio::spawn(async move {
            let resp = match ctx {
                Ok(mut ctx) => ctx.final_response().await,
                Err(_) => sip_core::endpoint::synthetic_response(503, "Cannot reach the server"),
            };
            let purpose = AnswerPurpose::ChangeSameServer {
                session,
                reinvite: r,
                target,
            };
            let _ = me.send(SessionInput::Answered {
                purpose,
                sent: req,
                resp,
            });
        });
        return;
    }
    let rest = relay.candidates_away_from(&target.service, &current, false);
    let offer = b2bua::carried_body(&r.req);
    let pending = Pending {
        session,
        reinvite: r,
        target,
        rest,
    };
    try_next(call, pending, offer).await;
}

/// The value of `P-Asserted-Service` for a target: the service id with its parameters.
fn asserted(target: &Target) -> String {
    b2bua::asserted_service(&target.service, &target.params)
}

async fn try_next(call: &mut Call, mut pending: Pending, offer: (Vec<Header>, Vec<u8>)) {
    while let Some(server) = pending.rest.pop_front() {
        let service = pending.target.service.clone();
        let params = pending.target.params.clone();
        // start_leg takes the pending change along; on a failure to send it comes back.
        if call
            .start_leg(
                server,
                &service,
                &params,
                offer.clone(),
                Purpose::Change(Pending {
                    session: pending.session.clone(),
                    reinvite: pending.reinvite.clone(),
                    target: pending.target.clone(),
                    rest: std::mem::take(&mut pending.rest),
                }),
            )
            .await
        {
            return;
        }
    }
    if let Some(i) = call.session_index(&pending.session) {
        call.sessions[i].busy = false;
    }
    refuse(
        &pending.reinvite,
        480,
        "No application server available for the changed service",
    );
}

/// The same server answered the change re-INVITE.
pub(crate) async fn on_same_server_answer(
    call: &mut Call,
    session: &str,
    reinvite: IncomingRequest,
    target: Target,
    sent: Request,
    resp: Response,
) {
    let Some(i) = call.session_index(session) else {
        refuse(&reinvite, 481, "Call/Transaction Does Not Exist");
        return;
    };
    call.sessions[i].busy = false;
    if resp.status_code.code() / 100 != 2 {
        info!(session_id = %session, code = resp.status_code.code(), "server refused the change; session unchanged");
        let _ = reinvite
            .tx
            .respond(b2bua::relayed_response(&reinvite.req, &resp, None, None));
        return;
    }
    let _ = call.sessions[i].b.dialog.on_response(&resp);
    call.sessions[i].service = target.service.clone();
    call.sessions[i].params = target.params.clone();
    call.sessions[i].offer = b2bua::carried_body(&reinvite.req);
    if let Err(e) = call.new_segment(i, EndCause::Changed).await {
        warn!(error = %format!("{e:#}"), "billing of the change failed");
    }
    call.sessions[i].pending_ack = Some(PendingAck {
        from: Side::Terminal,
        sent,
    });
    let contact = call.relay.local(reinvite.from).contact_header();
    info!(session_id = %call.sessions[i].id, service = %target.service, "service changed on the same server");
    let _ = reinvite.tx.respond(b2bua::relayed_response(
        &reinvite.req,
        &resp,
        None,
        Some(contact),
    ));
}

/// A new server answered the change inquiry: it replaces the old leg.
pub(crate) async fn on_new_server_answer(
    call: &mut Call,
    p: Pending,
    mut leg: ServerLeg,
    resp: Response,
) {
    let Some(i) = call.session_index(&p.session) else {
        call.ack_leg(&mut leg).await;
        call.bye_leg(&mut leg);
        return;
    };
    call.ack_leg(&mut leg).await;
    call.relay.directory.session_started(&leg.server);
    let mut old = std::mem::replace(&mut call.sessions[i].b, leg);
    call.bye_leg(&mut old);
    call.relay.directory.session_ended(&old.server);
    let s = &mut call.sessions[i];
    s.busy = false;
    s.service = p.target.service.clone();
    s.params = p.target.params.clone();
    s.offer = b2bua::carried_body(&p.reinvite.req);
    if let Err(e) = call.new_segment(i, EndCause::Changed).await {
        warn!(error = %format!("{e:#}"), "billing of the change failed");
    }
    info!(session_id = %call.sessions[i].id, server = call.sessions[i].b.server.uri_text(), service = %p.target.service, "service changed onto another server");
    let contact = call.relay.local(p.reinvite.from).contact_header();
    let _ = p.reinvite.tx.respond(b2bua::relayed_response(
        &p.reinvite.req,
        &resp,
        None,
        Some(contact),
    ));
}

/// A new server refused the change inquiry: the next candidate, or the refusal relayed.
pub(crate) async fn on_new_server_failure(
    call: &mut Call,
    p: Pending,
    server: ServerRef,
    code: u16,
    resp: Option<Response>,
) {
    info!(
        server = server.uri_text(),
        code, "server refused the change"
    );
    if fails_over(code) && !p.rest.is_empty() {
        let offer = b2bua::carried_body(&p.reinvite.req);
        try_next(call, p, offer).await;
        return;
    }
    if let Some(i) = call.session_index(&p.session) {
        call.sessions[i].busy = false;
    }
    match resp {
        Some(resp) => {
            let _ =
                p.reinvite
                    .tx
                    .respond(b2bua::relayed_response(&p.reinvite.req, &resp, None, None));
        }
        _ => refuse(
            &p.reinvite,
            480,
            &format!(
                "No application server available for the changed service (last answer {code})"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn preferred_service_with_parameters() {
        let t = parse_preferred("clock;tz=utc;verbose").unwrap();
        assert_eq!(t.service, "clock");
        assert_eq!(
            t.params,
            vec![
                ("tz".into(), "utc".into()),
                ("verbose".into(), String::new())
            ]
        );
        assert_eq!(asserted(&t), "clock;tz=utc;verbose");
    }

    #[test]
    fn garbage_is_no_change() {
        assert!(parse_preferred("").is_none());
        assert!(parse_preferred("<sip:x>").is_none());
        assert!(parse_preferred("a b").is_none());
    }
}
