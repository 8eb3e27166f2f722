//! Transfer to a second application server (claim 6): an in-dialog REFER from the terminal
//! with `Refer-To: <sip:SERVICE@relay>` (RFC 3515). The relay runs the rules again for that
//! service, answers 202, searches a second server for it (not the current one when another
//! exists), inquires of it, and reports its answers to the terminal as NOTIFY
//! `message/sipfrag` (100 Trying, then the final). On success it moves the terminal's
//! session onto the new server — a re-INVITE of the terminal with the new server's SDP
//! (RFC 3725) — and ends the first server's leg with BYE; on failure the session stays on
//! the first server.
//!
//! Billing: one session record per server, the first closed with cause `transferred`.

use std::collections::VecDeque;
use std::time::Instant;

use billing::record::EndCause;
use rsip::prelude::*;
use rsip::{Header, Method, Request, Response};
use sip_core::address::ReferTo;
use sip_core::uri::Uri;
use tracing::{info, warn};

use super::env::CallEnv;
use super::io::Incoming;
use super::leg::{LegPlan, ServerLeg};
use super::limits::fails_over;
use super::session::Side;
use super::{AfterSegment, Call, Purpose, Waiting};
use crate::b2bua;
use crate::directory::ServerRef;

/// A transfer waiting for the second server's answer.
pub(super) struct Pending {
    session: usize,
    service: String,
    rest: VecDeque<ServerRef>,
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

impl Call {
    /// Sends a NOTIFY with a `message/sipfrag` status line on session `i`'s terminal
    /// dialog (RFC 3515 §2.4.5).
    fn notify(&mut self, i: usize, code: u16, reason: &str, last: bool, env: &dyn CallEnv) {
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
        let a_peer = self.a.peer;
        if let Some((req, peer)) =
            self.sessions[i].request(Side::Terminal, a_peer, Method::Notify, extra, body, env)
        {
            self.out.send(req, peer);
        }
    }

    /// Starts the transfer asked by REFER `r` on session `i`.
    pub(super) fn start_transfer(
        &mut self,
        i: usize,
        r: Incoming,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        if let Err(e) = self.sessions[i].a_dialog.check_remote_cseq(&r.req) {
            warn!(error = %e, "REFER out of order");
            self.refuse(&r, 500, "CSeq out of order");
            return;
        }
        let Some((service, uri)) =
            b2bua::other_header(&r.req.headers, "Refer-To").and_then(refer_target)
        else {
            self.refuse(&r, 400, "Missing or unreadable Refer-To");
            return;
        };
        if !env.names_relay(&uri) {
            self.refuse(&r, 403, "Refer-To must name a service of this relay");
            return;
        }
        if self.sessions[i].busy {
            self.refuse(&r, 491, "Request Pending");
            return;
        }
        // The rules run again, as for a new call to the service the Refer-To names.
        let params: Vec<(String, String)> = uri
            .params()
            .map(|(k, v)| (k.to_string(), v.unwrap_or_default().to_string()))
            .collect();
        let service = match env.decide_again(&self.adm.subscriber, &r.req, &service, &params) {
            Ok(decision) => {
                self.sessions[i].next_plan = Some(decision.plan.into());
                decision.service
            }
            Err((code, reason)) => {
                self.refuse(&r, code, reason);
                return;
            }
        };
        self.refuse(&r, 202, "Accepted");
        self.notify(i, 100, "Trying", false, env);
        let current = self.sessions[i].b.server.clone();
        // The current server is a last resort only when it means a change of service; to
        // transfer a session to the very server it is on would be no transfer.
        let current_last = *service != *self.sessions[i].service;
        let rest = env.candidates_away_from(&service, &current, current_last);
        info!(session_id = %self.sessions[i].id, to = %service, candidates = rest.len(), "transfer asked");
        self.sessions[i].busy = true;
        let pending = Pending {
            session: i,
            service,
            rest,
        };
        self.try_next_transfer(pending, env, now);
    }

    fn try_next_transfer(&mut self, mut pending: Pending, env: &dyn CallEnv, now: Instant) {
        let i = pending.session;
        let Some(server) = pending.rest.pop_front() else {
            self.sessions[i].give_up_move();
            self.notify(i, 480, "Temporarily Unavailable", true, env);
            return;
        };
        let plan = LegPlan {
            service: pending.service.clone(),
            params: Vec::new(),
            offer: self.sessions[i].offer.parts(),
        };
        self.start_leg(server, plan, Purpose::Transfer(pending), env, now);
    }

    /// The second server answered: move the session onto it.
    pub(super) fn on_transfer_answer(
        &mut self,
        p: Pending,
        leg: ServerLeg,
        resp: Response,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        let i = p.session;
        if !self.sessions[i].live() {
            self.hang_up_leg(leg, env);
            return;
        }
        self.notify(i, 200, "OK", true, env);
        self.move_to_leg(i, leg, "transferred", env, now);
        let s = &mut self.sessions[i];
        s.busy = false;
        s.service = p.service.into();
        s.params = Box::default();
        info!(session_id = %s.id, server = s.b.server.uri_text(), "session transferred");
        self.new_segment(
            i,
            EndCause::Transferred,
            AfterSegment::Reinvite { resp },
            now,
        );
    }

    /// RFC 3725: the terminal gets the new server's SDP in a re-INVITE.
    pub(super) fn reinvite_terminal(&mut self, i: usize, resp: Response, env: &dyn CallEnv) {
        if !self.sessions[i].live() {
            return;
        }
        let (extra, body) = b2bua::carried_body_of_response(&resp);
        self.sessions[i]
            .timers
            .keep_sdp((extra.clone(), body.clone()));
        let a_peer = self.a.peer;
        let Some((req, peer)) =
            self.sessions[i].request(Side::Terminal, a_peer, Method::Invite, extra, body, env)
        else {
            return;
        };
        let token = self.out.send_waiting(req.clone(), peer);
        self.waiting.insert(
            token,
            Waiting::TerminalReinvite {
                session: i,
                sent: req,
            },
        );
    }

    /// The terminal answered the relay's re-INVITE with the new server's SDP: ACK it.
    pub(super) fn on_terminal_reinvited(
        &mut self,
        i: usize,
        sent: Request,
        resp: Response,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        let code = resp.status_code.code();
        if code / 100 != 2 {
            warn!(session_id = %self.sessions[i].id, code, "terminal refused the new server's SDP");
            return;
        }
        if !self.sessions[i].live() {
            return;
        }
        let a_peer = self.a.peer;
        let s = &mut self.sessions[i];
        let _ = s.a_dialog.on_response(&resp);
        let local = env.local(a_peer);
        match s
            .a_dialog
            .ack_for_2xx(&sent, &local.via(), Vec::new(), Vec::new())
        {
            Ok(ack) => self.out.ack(ack, a_peer),
            Err(e) => warn!(error = %e, "cannot ACK the terminal"),
        }
        // The terminal's answer is its offer's counterpart now.
        self.sessions[i].offer = b2bua::carried_body_of_response(&resp).into();
        self.refreshed_by_answer(i, Side::Terminal, Method::Invite, &resp, now);
    }

    /// The second server refused: the next candidate, or the failure reported and the
    /// session left on the first server.
    pub(super) fn on_transfer_failure(
        &mut self,
        p: Pending,
        server: &ServerRef,
        code: u16,
        resp: Option<Response>,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        info!(
            server = server.uri_text(),
            code, "server refused the transfer"
        );
        if fails_over(code) && !p.rest.is_empty() {
            self.try_next_transfer(p, env, now);
            return;
        }
        let i = p.session;
        self.sessions[i].give_up_move();
        if !self.sessions[i].live() {
            return;
        }
        let reason = match resp.as_ref().map(|r| &r.status_code) {
            Some(rsip::StatusCode::Other(_, reason)) => reason.clone(),
            _ => sip_core::message::reason_phrase(code).to_string(),
        };
        self.notify(i, code, &reason, true, env);
    }
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
