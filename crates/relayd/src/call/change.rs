//! Service change (claim 5): an in-dialog re-INVITE from the terminal whose
//! `P-Preferred-Service` names another service (or other parameters). The relay runs the
//! rules again for the service asked (they may restrict it, redirect it or bill it on
//! another plan), searches a server for the result and inquires of it: a re-INVITE on the
//! same server leg when that server delivers the changed service, otherwise a new leg to
//! the server found (the RFC 3725 third-party call control pattern), the old leg ended once
//! the new one is up. The terminal gets the server's answer. On refusal the terminal gets
//! the error and the session is left exactly as it was.
//!
//! Billing: the old segment is closed with cause `changed` and a new one opens on the new
//! service's tariff, committed before the terminal hears the 2xx. A re-INVITE with no
//! service change is relayed as it is (`in_dialog`) and bills nothing new.

use std::collections::VecDeque;
use std::time::Instant;

use billing::record::EndCause;
use rsip::{Header, Method, Request, Response};
use tracing::{info, warn};

use super::env::CallEnv;
use super::io::Incoming;
use super::leg::{LegPlan, ServerLeg};
use super::limits::fails_over;
use super::session::{PendingAck, Side};
use super::{AfterSegment, Call, Purpose, Waiting};
use crate::b2bua;
use crate::directory::ServerRef;

/// The service a change asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The service id.
    pub service: String,
    /// Its parameters.
    pub params: Vec<(String, String)>,
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

/// A change onto a new server, waiting for its answer.
pub(super) struct Pending {
    session: usize,
    reinvite: Incoming,
    target: Target,
    rest: VecDeque<ServerRef>,
}

/// A change re-INVITE to the same server, waiting for its answer.
pub(super) struct SameServer {
    session: usize,
    reinvite: Incoming,
    target: Target,
    sent: Request,
}

/// The value of `P-Asserted-Service` for a target: the service id with its parameters.
fn asserted(target: &Target) -> String {
    b2bua::asserted_service(&target.service, &target.params)
}

impl Call {
    /// Starts the change asked by re-INVITE `r` on session `i`.
    pub(super) fn start_change(
        &mut self,
        i: usize,
        r: Incoming,
        target: Target,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        if self.sessions[i].busy {
            self.refuse(&r, 491, "Request Pending");
            return;
        }
        if let Err(e) = self.sessions[i].a_dialog.check_remote_cseq(&r.req) {
            warn!(error = %e, "re-INVITE out of order");
            self.refuse(&r, 500, "CSeq out of order");
            return;
        }
        // The rules run again, as for a new call to the service asked: they may redirect
        // it, restrict it or bill it on another plan.
        let target = match env.decide_again(
            &self.adm.subscriber,
            &r.req,
            &target.service,
            &target.params,
        ) {
            Ok(decision) => {
                self.sessions[i].next_plan = Some(decision.plan.into());
                Target {
                    service: decision.service,
                    params: decision.params,
                }
            }
            Err((code, reason)) => {
                self.refuse(&r, code, reason);
                return;
            }
        };
        let current = self.sessions[i].b.server.clone();
        info!(session_id = %self.sessions[i].id, from = %self.sessions[i].service, to = %target.service, "service change asked");
        self.sessions[i].busy = true;
        if env.serves(&current, &target.service) {
            // Re-INVITE on the same leg, asserting the changed service.
            let (mut extra, body) = b2bua::carried_body(&r.req);
            extra.push(Header::Other(
                "P-Asserted-Service".into(),
                asserted(&target),
            ));
            let a_peer = self.a.peer;
            let Some((req, peer)) =
                self.sessions[i].request(Side::Server, a_peer, Method::Invite, extra, body, env)
            else {
                self.sessions[i].give_up_move();
                self.refuse(&r, 500, "Cannot build the re-INVITE");
                return;
            };
            let token = self.out.send_waiting(req.clone(), peer);
            self.waiting.insert(
                token,
                Waiting::ChangeSameServer(Box::new(SameServer {
                    session: i,
                    reinvite: r,
                    target,
                    sent: req,
                })),
            );
            return;
        }
        let rest = env.candidates_away_from(&target.service, &current, false);
        let pending = Pending {
            session: i,
            reinvite: r,
            target,
            rest,
        };
        self.try_next_change(pending, env, now);
    }

    fn try_next_change(&mut self, mut pending: Pending, env: &dyn CallEnv, now: Instant) {
        let Some(server) = pending.rest.pop_front() else {
            self.sessions[pending.session].give_up_move();
            self.refuse(
                &pending.reinvite,
                480,
                "No application server available for the changed service",
            );
            return;
        };
        let plan = LegPlan {
            service: pending.target.service.clone(),
            params: pending.target.params.clone(),
            offer: b2bua::carried_body(&pending.reinvite.req),
        };
        self.start_leg(server, plan, Purpose::Change(Box::new(pending)), env, now);
    }

    /// The same server answered the change re-INVITE.
    pub(super) fn on_change_same_server(&mut self, w: SameServer, resp: Response, now: Instant) {
        let i = w.session;
        self.sessions[i].busy = false;
        if !self.sessions[i].live() {
            self.refuse(&w.reinvite, 481, "Call/Transaction Does Not Exist");
            return;
        }
        if resp.status_code.code() / 100 != 2 {
            info!(session_id = %self.sessions[i].id, code = resp.status_code.code(), "server refused the change; session unchanged");
            self.sessions[i].next_plan = None;
            self.out.respond(
                w.reinvite.tx,
                b2bua::relayed_response(&w.reinvite.req, &resp, None, None),
            );
            return;
        }
        self.refreshed_by_answer(i, Side::Server, Method::Invite, &resp, now);
        let s = &mut self.sessions[i];
        let _ = s.b.dialog.on_response(&resp);
        s.service = w.target.service.as_str().into();
        s.params = w.target.params.as_slice().into();
        s.offer = b2bua::carried_body(&w.reinvite.req).into();
        s.pending_ack = Some(Box::new(PendingAck {
            from: Side::Terminal,
            sent: w.sent,
        }));
        info!(session_id = %s.id, service = %w.target.service, "service changed on the same server");
        self.new_segment(
            i,
            EndCause::Changed,
            AfterSegment::Answer {
                reinvite: Box::new(w.reinvite),
                resp,
            },
            now,
        );
    }

    /// A new server answered the change inquiry: it replaces the old leg.
    pub(super) fn on_change_answer(
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
            self.refuse(&p.reinvite, 481, "Call/Transaction Does Not Exist");
            return;
        }
        self.move_to_leg(i, leg, "changed", env, now);
        let s = &mut self.sessions[i];
        s.busy = false;
        s.service = p.target.service.as_str().into();
        s.params = p.target.params.as_slice().into();
        s.offer = b2bua::carried_body(&p.reinvite.req).into();
        info!(session_id = %s.id, server = s.b.server.uri_text(), service = %p.target.service, "service changed onto another server");
        self.new_segment(
            i,
            EndCause::Changed,
            AfterSegment::Answer {
                reinvite: Box::new(p.reinvite),
                resp,
            },
            now,
        );
    }

    /// Moves session `i` onto a new server leg (ACKed here) and hangs up the old one with a
    /// `Reason` saying `why` (`changed`, `transferred`).
    pub(super) fn move_to_leg(
        &mut self,
        i: usize,
        mut leg: ServerLeg,
        why: &str,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        // The new leg's session timer is what its own 2xx agreed to.
        self.sessions[i].timers.new_server_leg(leg.timer, now);
        let local = env.local(leg.peer);
        if let Some(ack) = leg.ack(&local, Vec::new(), Vec::new()) {
            self.out.push(super::Output::Stateless {
                msg: ack,
                peer: leg.peer,
            });
        }
        env.session_started(&leg.server);
        let old = std::mem::replace(&mut self.sessions[i].b, leg);
        env.session_ended(&old.server);
        let mut old = old;
        let local = env.local(old.peer);
        if let Some(bye) = old.bye(&local, vec![super::leg::moved_on(why)]) {
            self.out.send(bye, old.peer);
        }
    }

    /// A new server refused the change inquiry: the next candidate, or the refusal relayed.
    pub(super) fn on_change_failure(
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
            code, "server refused the change"
        );
        if fails_over(code) && !p.rest.is_empty() {
            self.try_next_change(p, env, now);
            return;
        }
        self.sessions[p.session].give_up_move();
        match resp {
            Some(resp) => self.out.respond(
                p.reinvite.tx,
                b2bua::relayed_response(&p.reinvite.req, &resp, None, None),
            ),
            None => self.refuse(
                &p.reinvite,
                480,
                &format!(
                    "No application server available for the changed service (last answer {code})"
                ),
            ),
        }
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
