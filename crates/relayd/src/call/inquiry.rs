//! The inquiry (claims 1, 3 and 7): the terminal's INVITE asked of the candidate servers —
//! one after another on failure, or all at once when the service forks — with provisionals
//! relayed, a CANCEL from the terminal passed on, and each 2xx made a session: journaled in
//! billing first, then relayed to the terminal. Here too start the legs of a change and a
//! transfer, and their answers and failures are handed to those.

use std::collections::VecDeque;
use std::time::Instant;

use rsip::{Request, Response};
use sip_core::dialog::session_timer::{self, Negotiated};
use sip_core::dialog::{Dialog, DialogState};
use sip_core::{message, Peer};
use tracing::{debug, info, warn};

use super::env::CallEnv;
use super::fork;
use super::io::{BillingCmd, LegEvent, LegId, Output, TxId};
use super::leg::{self, Acked, LegPlan, PendingLeg, ServerLeg};
use super::limits::fails_over;
use super::session::{Resend2xx, Session, State};
use super::session_timer::Timers;
use super::{Call, Purpose, Waiting};
use crate::b2bua;
use crate::billing_control::SegmentClock;
use crate::directory::ServerRef;

/// Where the initial inquiry stands.
pub(super) struct Inquiry {
    /// The candidates not yet asked (sequential search).
    pub(super) candidates: VecDeque<ServerRef>,
    /// Whether every candidate is asked at once.
    pub(super) fork: bool,
    /// When a fork stops waiting for answers.
    pub(super) fork_deadline: Option<Instant>,
    /// Whether the terminal cancelled (or the relay is shutting down).
    pub(super) cancelled: bool,
    /// The failures so far, for the final answer (RFC 3261 §16.7 step 6).
    pub(super) failures: Vec<(u16, Option<Response>)>,
}

impl Inquiry {
    pub(super) fn new(fork: bool) -> Inquiry {
        Inquiry {
            candidates: VecDeque::new(),
            fork,
            fork_deadline: None,
            cancelled: false,
            failures: Vec::new(),
        }
    }
}

impl Call {
    pub(super) fn start_inquiry(&mut self, env: &dyn CallEnv, now: Instant) {
        let candidates = env.candidates(&self.adm.service, self.adm.strategy);
        if candidates.is_empty() {
            info!("no application server available");
            self.refuse_a(480, "No application server available");
            return;
        }
        if self.inquiry.fork {
            self.inquiry.fork_deadline = Some(now + env.limits().fork_timeout);
            info!(servers = candidates.len(), "forking the inquiry");
            for server in candidates {
                self.start_initial_leg(server, env, now);
            }
        } else {
            self.inquiry.candidates = candidates.into();
            self.next_candidate(env, now);
        }
    }

    /// Starts the next sequential candidate, or answers the terminal when none is left.
    fn next_candidate(&mut self, env: &dyn CallEnv, now: Instant) {
        if let Some(server) = self.inquiry.candidates.pop_front() {
            self.start_initial_leg(server, env, now);
            return;
        }
        let reason = match self.inquiry.failures.last() {
            Some((code, _)) => format!("No application server available (last answer {code})"),
            None => "No application server available".to_string(),
        };
        self.refuse_a(480, &reason);
    }

    fn start_initial_leg(&mut self, server: ServerRef, env: &dyn CallEnv, now: Instant) {
        let plan = LegPlan {
            service: self.adm.service.to_string(),
            params: self.adm.params.to_vec(),
            offer: self
                .a
                .invite
                .as_deref()
                .map(b2bua::carried_body)
                .unwrap_or_default(),
        };
        let purpose = Purpose::Initial {
            a_tag: message::new_tag(),
        };
        self.start_leg(server, plan, purpose, env, now);
    }

    /// Starts a leg to `server`: resolved first, then its INVITE sent.
    pub(super) fn start_leg(
        &mut self,
        server: ServerRef,
        plan: LegPlan,
        purpose: Purpose,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        let id = self.out.leg();
        info!(server = server.uri_text(), service = %plan.service, "inquiring");
        self.out.push(Output::Resolve {
            leg: id,
            server: server.clone(),
        });
        self.legs.push((
            id,
            PendingLeg::new(server, plan, purpose, now, &env.limits()),
        ));
    }

    pub(super) fn on_resolved(
        &mut self,
        id: LegId,
        peer: Option<Peer>,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        let Some((_, leg)) = self.legs.iter_mut().find(|(l, _)| *l == id) else {
            return;
        };
        // The plan stays with the leg until it ends: a `422` asks it again (RFC 4028 §7.3).
        let (Some(peer), Some(plan)) = (peer, leg.plan.clone()) else {
            warn!(
                server = leg.server.uri_text(),
                "cannot resolve application server"
            );
            self.leg_failed(id, 503, None, env, now);
            return;
        };
        let local = env.local(peer);
        // The terminal's Max-Forwards goes on while its INVITE is there (the inquiry); a
        // change's or transfer's leg starts afresh.
        let max_forwards = self.a.invite.as_deref().and_then(|i| {
            i.headers
                .iter()
                .find(|h| matches!(h, rsip::Header::MaxForwards(_)))
                .cloned()
        });
        let invite = match leg::inquiry(
            &self.a.uri,
            max_forwards,
            plan,
            &self.adm.subscriber,
            env.realm(),
            &leg.server,
            &local,
            &env.limits().session_timer,
            leg.session_expires,
        ) {
            Ok(invite) => invite,
            Err(e) => {
                warn!(error = %e, "cannot build inquiry");
                self.leg_failed(id, 500, None, env, now);
                return;
            }
        };
        let Ok(summary) = message::Summary::of_request(&invite) else {
            self.leg_failed(id, 500, None, env, now);
            return;
        };
        leg.sent = Some((invite.clone(), peer));
        self.out.push(Output::Route {
            call_id: summary.call_id,
        });
        self.out.push(Output::Invite {
            leg: id,
            req: invite,
            peer,
        });
    }

    fn leg_failed(
        &mut self,
        id: LegId,
        code: u16,
        resp: Option<Response>,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        if let Some(leg) = self.take_leg(id) {
            self.on_failure(leg, code, resp, env, now);
        }
    }

    pub(super) fn cancel_pending_legs(&mut self) {
        for (_, leg) in &self.legs {
            if matches!(leg.purpose, Purpose::Initial { .. }) {
                if let Some((cancel, peer)) = leg.cancel() {
                    self.out.send(cancel, peer);
                }
            }
        }
    }

    fn initial_legs_pending(&self) -> bool {
        self.legs
            .iter()
            .any(|(_, l)| matches!(l.purpose, Purpose::Initial { .. }))
    }

    pub(super) fn on_cancel(&mut self, tx: TxId, req: Request) {
        self.out
            .respond(tx, b2bua::local_response(&req, 200, "OK", None));
        if self.a.final_sent || self.inquiry.cancelled {
            return;
        }
        info!("terminal cancelled");
        self.inquiry.cancelled = true;
        self.inquiry.candidates.clear();
        self.cancel_pending_legs();
        // A session being journaled has won the race: its 2xx goes out when committed.
        let journaling = self.sessions.iter().any(|s| s.state == State::Journaling);
        if !self.initial_legs_pending() && !journaling {
            self.refuse_a(487, "Request Terminated");
        }
    }

    pub(super) fn on_leg(&mut self, id: LegId, event: LegEvent, env: &dyn CallEnv, now: Instant) {
        if let LegEvent::Answered(_) = &event {
            // A 2xx retransmission of a leg that already became a session: our ACK was lost.
            if let Some(i) = self
                .sessions
                .iter()
                .position(|s| s.b.id == id && s.b.is_acked())
            {
                let cseq = self.sessions[i].b.invite_cseq;
                self.reack(i, cseq, env);
                return;
            }
        }
        let Some(at) = self.legs.iter().position(|(l, _)| *l == id) else {
            if let LegEvent::Answered(resp) = event {
                debug!(
                    code = resp.status_code.code(),
                    "late answer of a leg given up on"
                );
            }
            return;
        };
        let limits = env.limits();
        match event {
            LegEvent::Trying => self.legs[at].1.heard(&limits),
            LegEvent::Provisional(resp) => {
                let leg = &mut self.legs[at].1;
                leg.provisional = true;
                leg.heard(&limits);
                if self.inquiry.cancelled {
                    // The CANCEL can go now that the leg is proceeding.
                    if let Some((cancel, peer)) = self.legs[at].1.cancel() {
                        self.out.send(cancel, peer);
                    }
                    return;
                }
                if let Purpose::Initial { a_tag } = &self.legs[at].1.purpose {
                    if let (false, Some(invite)) = (self.a.final_sent, self.a.invite.as_deref()) {
                        let contact = env.local(self.a.peer).contact_header();
                        let out =
                            b2bua::relayed_response(invite, &resp, Some(a_tag), Some(contact));
                        self.respond_a(out);
                    }
                }
            }
            LegEvent::Answered(resp) => {
                let leg = self.legs.swap_remove(at).1;
                let Some((invite, peer)) = leg.sent else {
                    return;
                };
                let dialog = match Dialog::uac(&invite, &resp) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, "unusable 2xx from server");
                        let leg = PendingLeg {
                            sent: Some((invite, peer)),
                            ..leg
                        };
                        self.on_failure(leg, 502, None, env, now);
                        return;
                    }
                };
                let b = ServerLeg {
                    id,
                    server: leg.server,
                    // Dialog::uac took the INVITE's number as the dialog's local one.
                    invite_cseq: dialog.local_seq().unwrap_or(1),
                    peer,
                    dialog,
                    acked: Acked::No,
                    timer: Negotiated::from_2xx(&session_timer::read(&resp.headers)),
                };
                match leg.purpose {
                    Purpose::Initial { a_tag } => self.on_initial_answer(b, a_tag, resp, env, now),
                    Purpose::Change(p) => self.on_change_answer(*p, b, resp, env, now),
                    Purpose::Transfer(p) => self.on_transfer_answer(p, b, resp, env, now),
                }
            }
            LegEvent::Failed { code, resp } => self.leg_failed(id, code, resp, env, now),
        }
    }

    pub(super) fn on_failure(
        &mut self,
        leg: PendingLeg<Purpose>,
        code: u16,
        resp: Option<Response>,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        let Some(leg) = self.retry_interval_too_small(leg, code, resp.as_ref(), env, now) else {
            return;
        };
        match leg.purpose {
            Purpose::Change(p) => {
                return self.on_change_failure(*p, &leg.server, code, resp, env, now)
            }
            Purpose::Transfer(p) => {
                return self.on_transfer_failure(p, &leg.server, code, resp, env, now)
            }
            Purpose::Initial { .. } => {}
        }
        info!(server = leg.server.uri_text(), code, "server refused");
        self.inquiry.failures.push((code, resp.clone()));
        if self.a.final_sent {
            return;
        }
        let journaling = self.sessions.iter().any(|s| s.state == State::Journaling);
        if self.inquiry.cancelled {
            if !self.initial_legs_pending() && !journaling {
                self.refuse_a(487, "Request Terminated");
            }
            return;
        }
        if self.inquiry.fork {
            if !self.initial_legs_pending() && !self.sessions.iter().any(|s| s.live()) {
                let best = fork::best_response(&self.inquiry.failures);
                self.answer_with_failure(best);
            }
            return;
        }
        if journaling {
            return;
        }
        if fails_over(code) {
            self.next_candidate(env, now);
        } else if let Some(resp) = resp {
            // A refusal another server would give too (403, 404, 488…): relay it.
            self.relay_refusal_to_a(&resp);
        } else {
            self.refuse_a(code, message::reason_phrase(code));
        }
    }

    fn answer_with_failure(&mut self, best: Option<(u16, Option<Response>)>) {
        match best {
            // RFC 3261 §16.7 step 6: the best response itself goes to the terminal.
            Some((_, Some(resp))) => self.relay_refusal_to_a(&resp),
            Some((code, _)) => self.refuse_a(
                480,
                &format!("No application server available (best answer {code})"),
            ),
            None => self.refuse_a(480, "No application server available"),
        }
    }

    /// A session slot for a new session: the one admission took, while unused, else one
    /// more of the subscriber's if it holds fewer than its limit.
    fn take_session_slot(&mut self, env: &dyn CallEnv) -> bool {
        if self.slot_unused {
            self.slot_unused = false;
            return true;
        }
        env.take_session_slot(&self.adm.subscriber, self.adm.session_limit)
    }

    /// Confirms and hangs up a server leg the call has no use for.
    pub(super) fn hang_up_leg(&mut self, mut b: ServerLeg, env: &dyn CallEnv) {
        let local = env.local(b.peer);
        if let Some(ack) = b.ack(&local, Vec::new(), Vec::new()) {
            self.out.push(Output::Stateless {
                msg: ack,
                peer: b.peer,
            });
        }
        if let Some(bye) = b.bye(&local, Vec::new()) {
            self.out.send(bye, b.peer);
        }
    }

    fn on_initial_answer(
        &mut self,
        b: ServerLeg,
        a_tag: String,
        resp: Response,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        let taken = self.a.final_sent || self.sessions.iter().any(|s| s.live());
        if self.inquiry.cancelled || (taken && !self.inquiry.fork) {
            // CANCEL lost the race with the 2xx (or another candidate already answered):
            // confirm the leg and hang it up.
            self.hang_up_leg(b, env);
            if !self.a.final_sent
                && !self.initial_legs_pending()
                && !self.sessions.iter().any(|s| s.state == State::Journaling)
            {
                self.refuse_a(487, "Request Terminated");
            }
            return;
        }
        let local = env.local(self.a.peer);
        let Some(a_invite) = self.a.invite.as_deref() else {
            // Not reached: an answer of the inquiry comes while it runs.
            self.hang_up_leg(b, env);
            return;
        };
        let offer = b2bua::carried_body(a_invite);
        let a_dialog = match Dialog::uas(
            a_invite,
            &a_tag,
            local.contact_uri(),
            DialogState::Confirmed,
        ) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "terminal's INVITE cannot make a dialog");
                self.hang_up_leg(b, env);
                self.refuse_a(400, "Cannot establish a dialog (Contact missing?)");
                return;
            }
        };
        let mut answer =
            b2bua::relayed_response(a_invite, &resp, Some(&a_tag), Some(local.contact_header()));
        // The terminal's leg has its own session timer (RFC 4028 §9), not the server's.
        let a_timer = self.a_timer;
        match &a_timer {
            Some(n) => n.stamp_2xx(&mut answer.headers),
            None => session_timer::strip(&mut answer.headers),
        }
        if !self.take_session_slot(env) {
            // A further answer of a forked request, past the subscriber's limit: each
            // session counts (see crate::subscriber_sessions).
            info!(server = b.server.uri_text(), subscriber = %self.adm.subscriber, limit = self.adm.session_limit, "answer past the subscriber's session limit; hanging it up");
            self.hang_up_leg(b, env);
            if !self.a.final_sent
                && !self.initial_legs_pending()
                && !self.sessions.iter().any(|s| s.state == State::Journaling)
            {
                self.refuse_a(486, super::SESSION_LIMIT_REASON);
            }
            return;
        }
        env.session_started(&b.server);
        let id = format!("s-{}", message::new_tag());
        info!(session_id = %id, server = b.server.uri_text(), "server answered");
        // Room for this one session only: a Vec grows from nothing to four elements, and a
        // session is near a kilobyte, paid for as long as the call lives — most calls have
        // one session.
        self.sessions.reserve_exact(1);
        self.sessions.push(Session {
            id,
            a_dialog,
            b,
            service: self.adm.service.clone(),
            params: self.adm.params.clone(),
            state: State::Journaling,
            pending_ack: None,
            busy: false,
            offer: offer.into(),
            next_probe: None,
            probe_answered: [None, None],
            clock: SegmentClock::start(self.wall_at(now), now),
            plan: self.adm.plan.clone(),
            next_plan: None,
            deferred_bye: None,
            resend_2xx: None,
            timers: Timers::default(),
        });
        let i = self.sessions.len() - 1;
        let b_timer = self.sessions[i].b.timer;
        let a_sdp = b2bua::carried_body_of_response(&resp);
        self.sessions[i].timers.start(a_timer, b_timer, a_sdp, now);
        // The 2xx hands the terminal the service (and its data token): the session is
        // journaled, committed, before it goes out, and billed from here whatever happens
        // next (ACK, BYE before ACK, no ACK at all).
        let start = self.sessions[i].start(&self.who());
        self.bill(
            i,
            BillingCmd::Open(start),
            Waiting::Journaled { session: i, answer },
        );
    }

    pub(super) fn on_journaled(
        &mut self,
        i: usize,
        answer: Response,
        result: Result<(), String>,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        if let Err(e) = result {
            warn!(error = %e, "cannot journal the session; refusing it");
            self.ack_server(i, env);
            let s = &mut self.sessions[i];
            let local = env.local(s.b.peer);
            if let Some(bye) = s.b.bye(&local, Vec::new()) {
                let peer = s.b.peer;
                self.out.send(bye, peer);
            }
            let s = &mut self.sessions[i];
            s.state = State::Ended;
            env.session_ended(&s.b.server);
            env.give_back_session_slot(&self.adm.subscriber);
            if let Some((_, bye)) = s.deferred_bye.take().map(|b| *b) {
                self.out
                    .respond(bye.tx, b2bua::local_response(&bye.req, 200, "OK", None));
            }
            if !self.a.final_sent
                && !self.initial_legs_pending()
                && !self.sessions.iter().any(|s| s.live())
            {
                self.refuse_a(500, "Billing unavailable");
            }
            return;
        }
        if self.shutting_down {
            // The terminal was told already; the journaled session ends at once.
            self.end(i, billing::record::EndCause::RelayShutdown, None, env, now);
            return;
        }
        debug!(session_id = %self.sessions[i].id, "journaled; relaying the 2xx");
        // The server may charge for the session from now on.
        let served = self.sessions[i].served(&self.who());
        env.index(served);
        self.sessions[i].state = State::AwaitingAck(now + env.limits().ack_timeout);
        if self.a.final_sent {
            // A further 2xx of a fork, with its own To tag: the UAS core passes it to the
            // transport itself and resends it until its ACK comes (RFC 3261 §13.3.1.4),
            // whether or not the INVITE transaction still lingers after the first ACK.
            let msg = message::to_bytes(answer);
            let peer = self.a.peer;
            if !peer.is_reliable() {
                let interval = env.limits().ack_timeout / 64;
                self.sessions[i].resend_2xx = Some(Box::new(Resend2xx {
                    msg: msg.clone(),
                    at: now + interval,
                    interval,
                }));
            }
            self.out.push(Output::Stateless { msg, peer });
        } else {
            // The first 2xx completes the INVITE transaction, which resends it until the
            // ACK.
            self.a.final_sent = true;
            self.out.respond(self.a.tx, answer);
        }
        if let Some((side, bye)) = self.sessions[i].deferred_bye.take().map(|b| *b) {
            let cause = match side {
                super::Side::Terminal => billing::record::EndCause::CallerBye,
                super::Side::Server => billing::record::EndCause::ServerBye,
            };
            self.end(i, cause, Some((side, bye)), env, now);
        }
    }
}
