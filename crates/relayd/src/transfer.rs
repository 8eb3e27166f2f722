//! Transfer to a second application server (claim 6): an in-dialog REFER from the terminal
//! with `Refer-To: <sip:SERVICE@relay>` (RFC 3515). The relay answers 202, searches a second
//! server for that service (not the current one when another exists), inquires of it, and
//! reports its answers to the terminal as NOTIFY `message/sipfrag` (100 Trying, then the
//! final). On success it moves the terminal's session onto the new server — a re-INVITE of
//! the terminal with the new server's SDP (RFC 3725) — and ends the first server's leg with
//! BYE; on failure the session stays on the first server.
//!
//! Billing: one session record per server, the first closed with cause `transferred`.

use std::collections::VecDeque;

use billing::record::EndCause;
use rsip::prelude::*;
use rsip::{Header, Method, Request, Response};
use sip_core::address::ReferTo;
use sip_core::endpoint::IncomingRequest;
use sip_core::uri::Uri;
use tracing::{info, warn};

use crate::b2bua;
use crate::directory::ServerRef;
use crate::in_dialog::send_and_forget;
use crate::leg::{Purpose, ServerLeg};
use crate::routing::{AnswerPurpose, SessionInput};
use crate::session::{fails_over, Call, Side};

/// A transfer waiting for the second server's answer.
pub(crate) struct Pending {
    pub(crate) session: String,
    pub(crate) service: String,
    pub(crate) rest: VecDeque<ServerRef>,
}

/// The service a `Refer-To` names (RFC 3515 §2.1): the user part of a SIP URI addressed to
/// the relay, read with sip-core's parser (name-addr or addr-spec, IPv6 hosts included).
pub fn refer_target(value: &str) -> Option<(String, Uri)> {
    let refer_to = ReferTo::parse(value).ok()?;
    let uri = refer_to.uri().clone();
    if !(uri.is_sip() || uri.is_sips()) {
        return None;
    }
    let service = uri.user()?.to_string();
    (!service.is_empty()).then_some((service, uri))
}

fn refuse(r: &IncomingRequest, code: u16, reason: &str) {
    let _ =
        r.tx.respond(b2bua::local_response(&r.req, code, reason, None));
}

/// Sends a NOTIFY with a `message/sipfrag` status line on session `i`'s terminal dialog
/// (RFC 3515 §2.4.5).
fn notify(call: &mut Call, i: usize, code: u16, reason: &str, last: bool) {
    let state = if last {
        "terminated;reason=noresource"
    } else {
        "active;expires=60"
    };
    let extra = vec![
        Header::Event(rsip::headers::Event::new("refer")),
        Header::SubscriptionState(rsip::headers::SubscriptionState::new(state)),
        Header::ContentType(rsip::headers::ContentType::new(
            "message/sipfrag;version=2.0",
        )),
    ];
    let body = format!("SIP/2.0 {code} {reason}\r\n").into_bytes();
    if let Some((req, peer)) = call.build_request(i, Side::Terminal, Method::Notify, extra, body) {
        send_and_forget(&call.relay, req, peer, "NOTIFY");
    }
}

/// Starts the transfer asked by REFER `r` on session `i`.
pub(crate) async fn start(call: &mut Call, i: usize, r: IncomingRequest) {
    if let Err(e) = call.sessions[i].a_dialog.check_remote_cseq(&r.req) {
        warn!(error = %e, "REFER out of order");
        refuse(&r, 500, "CSeq out of order");
        return;
    }
    let Some((service, uri)) =
        b2bua::other_header(&r.req.headers, "Refer-To").and_then(refer_target)
    else {
        refuse(&r, 400, "Missing or unreadable Refer-To");
        return;
    };
    let relay = call.relay.clone();
    if !relay.names_relay(&uri) {
        refuse(&r, 403, "Refer-To must name a service of this relay");
        return;
    }
    if call.sessions[i].busy {
        refuse(&r, 491, "Request Pending");
        return;
    }
    // The rules run again, as for a new call to the service the Refer-To names.
    let params: Vec<(String, String)> = uri
        .params()
        .map(|(k, v)| (k.to_string(), v.unwrap_or_default().to_string()))
        .collect();
    let service = match relay.decide_again(&call.adm.subscriber, &r.req, &service, &params) {
        Ok(decision) => {
            call.sessions[i].next_plan = Some(decision.plan);
            decision.service
        }
        Err((code, reason)) => {
            refuse(&r, code, reason);
            return;
        }
    };
    let _ =
        r.tx.respond(b2bua::local_response(&r.req, 202, "Accepted", None));
    notify(call, i, 100, "Trying", false);
    let current = call.sessions[i].b.server.clone();
    // The current server is a last resort only when it means a change of service; to
    // transfer a session to the very server it is on would be no transfer.
    let current_last = service != call.sessions[i].service;
    let rest = relay.candidates_away_from(&service, &current, current_last);
    info!(session_id = %call.sessions[i].id, to = %service, candidates = rest.len(), "transfer asked");
    call.sessions[i].busy = true;
    let pending = Pending {
        session: call.sessions[i].id.clone(),
        service,
        rest,
    };
    try_next(call, pending).await;
}

async fn try_next(call: &mut Call, mut pending: Pending) {
    let Some(i) = call.session_index(&pending.session) else {
        return;
    };
    let offer = call.sessions[i].offer.clone();
    while let Some(server) = pending.rest.pop_front() {
        let service = pending.service.clone();
        let next = Pending {
            session: pending.session.clone(),
            service: pending.service.clone(),
            rest: std::mem::take(&mut pending.rest),
        };
        if call
            .start_leg(
                server,
                &service,
                &[],
                offer.clone(),
                Purpose::Transfer(next),
            )
            .await
        {
            return;
        }
    }
    call.sessions[i].busy = false;
    notify(call, i, 480, "Temporarily Unavailable", true);
}

/// The second server answered: move the session onto it.
pub(crate) async fn on_new_server_answer(
    call: &mut Call,
    p: Pending,
    mut leg: ServerLeg,
    resp: Response,
) {
    call.ack_leg(&mut leg).await;
    let Some(i) = call.session_index(&p.session) else {
        call.bye_leg(&mut leg);
        return;
    };
    notify(call, i, 200, "OK", true);
    call.relay.directory.session_started(&leg.server);
    let mut old = std::mem::replace(&mut call.sessions[i].b, leg);
    call.bye_leg(&mut old);
    call.relay.directory.session_ended(&old.server);
    call.sessions[i].busy = false;
    call.sessions[i].service = p.service.clone();
    call.sessions[i].params = Vec::new();
    if let Err(e) = call.new_segment(i, EndCause::Transferred).await {
        warn!(error = %format!("{e:#}"), "billing of the transfer failed");
    }
    info!(session_id = %call.sessions[i].id, server = call.sessions[i].b.server.uri_text(), "session transferred");
    // RFC 3725: the terminal gets the new server's SDP in a re-INVITE.
    let (extra, body) = b2bua::carried_body_of_response(&resp);
    let Some((req, peer)) = call.build_request(i, Side::Terminal, Method::Invite, extra, body)
    else {
        return;
    };
    let me = call.me.clone();
    let ctx = call.relay.endpoint.send_request(req.clone(), peer);
    let session = call.sessions[i].id.clone();
    tokio::spawn(async move {
        let resp = match ctx {
            Ok(mut ctx) => ctx.final_response().await,
            Err(_) => sip_core::endpoint::synthetic_response(503, "Cannot reach the terminal"),
        };
        let _ = me.send(SessionInput::Answered {
            purpose: AnswerPurpose::TerminalReinvite { session },
            sent: req,
            resp,
        });
    });
}

/// The terminal answered the relay's re-INVITE with the new server's SDP: ACK it.
pub(crate) async fn on_terminal_reinvited(
    call: &mut Call,
    session: &str,
    sent: Request,
    resp: Response,
) {
    let Some(i) = call.session_index(session) else {
        return;
    };
    let code = resp.status_code.code();
    if code / 100 != 2 {
        warn!(session_id = %session, code, "terminal refused the new server's SDP");
        return;
    }
    let _ = call.sessions[i].a_dialog.on_response(&resp);
    let local = call.relay.local(call.a.peer);
    match call.sessions[i]
        .a_dialog
        .ack_for_2xx(&sent, &local.via(), Vec::new(), Vec::new())
    {
        Ok(ack) => {
            let _ = call.relay.endpoint.send_stateless(&call.a.peer, ack).await;
        }
        Err(e) => warn!(error = %e, "cannot ACK the terminal"),
    }
    // The terminal's answer is its offer's counterpart now.
    call.sessions[i].offer = b2bua::carried_body_of_response(&resp);
}

/// The second server refused: the next candidate, or the failure reported and the session
/// left on the first server.
pub(crate) async fn on_new_server_failure(
    call: &mut Call,
    p: Pending,
    server: ServerRef,
    code: u16,
    resp: Option<Response>,
) {
    info!(
        server = server.uri_text(),
        code, "server refused the transfer"
    );
    if fails_over(code) && !p.rest.is_empty() {
        try_next(call, p).await;
        return;
    }
    let Some(i) = call.session_index(&p.session) else {
        return;
    };
    call.sessions[i].busy = false;
    let reason = match resp.as_ref().map(|r| &r.status_code) {
        Some(rsip::StatusCode::Other(_, reason)) => reason.clone(),
        _ => sip_core::message::reason_phrase(code).to_string(),
    };
    notify(call, i, code, &reason, true);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn refer_to_names_a_service() {
        let (service, uri) = refer_target("<sip:echo@relay.test>").unwrap();
        assert_eq!(service, "echo");
        assert_eq!(uri.host_port_text(), Some("relay.test"));
        assert_eq!(refer_target("sip:clock@127.0.0.1:5060").unwrap().0, "clock");
        let (service, uri) = refer_target("<sip:news@[::1]:5060;transport=tcp>").unwrap();
        assert_eq!(service, "news");
        assert_eq!(uri.host_port_text(), Some("[::1]:5060"));
        assert!(refer_target("<sip:relay.test>").is_none());
        assert!(refer_target("garbage").is_none());
    }
}
