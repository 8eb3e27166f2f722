//! The call: one admitted INVITE from inquiry to bill (DESIGN.md claims 1, 3, 5, 6 and 7), as
//! a sans-IO state machine in the shape of quinn-proto's `Connection`. The driver hands it
//! [`Input`]s with the current time and drains its [`Output`]s — responses, requests and
//! ACKs to send, servers to resolve, billing commands to commit — and wakes it at
//! [`Call::poll_timeout`]. Nothing here awaits, reads a clock or touches a socket: the
//! [`driver`] does, and the unit tests drive a call on a virtual clock instead.
//!
//! A call holds one session per answered server leg — one in the ordinary case, several
//! when the request is forked:
//!
//! 1. **Inquiry** ([`inquiry`](self)) — the candidates the directory gives are asked with
//!    INVITE legs of the relay's own, in order (failover) or all at once (fork).
//!    Provisionals are relayed to the terminal; a server that fails (silent for the
//!    inquiry timeout, 408, 480, 486, 5xx, 6xx) is replaced by the next candidate. A CANCEL
//!    from the terminal cancels the pending legs.
//! 2. **Response relay** — a server's 2xx makes a session, journaled in billing before the
//!    2xx (the terminal's data token) is relayed with the relay as Contact: from then on
//!    the session is billed whatever happens (ACK, BYE before ACK, no ACK at all).
//! 3. **Confirmation** — the terminal's ACK is relayed as the ACK of the server leg.
//! 4. **Disconnection** — a BYE from either side is relayed to the other; the record is
//!    committed before the BYE is answered. In-dialog OPTIONS probes end a session whose
//!    terminal or server vanished.
//!
//! Other in-dialog requests are relayed between the legs ([`in_dialog`](self)); a change of
//! service and a transfer run the rules again and move the session onto another leg
//! (`change`, `transfer`). Segment durations come from the monotonic clock the driver
//! passes in, so a step of the wall clock moves no bill.

mod change;
pub mod driver;
mod env;
mod fork;
mod in_dialog;
mod inquiry;
mod io;
mod leg;
mod limits;
mod session;
mod session_timer;
mod transfer;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::{Instant, SystemTime};

use billing::record::EndCause;
use rsip::{Header, Method, Request, Response};
use sip_core::dialog::session_timer::Negotiated;
use sip_core::dialog::DialogId;
use sip_core::{message, Peer};
use tracing::{debug, info, warn};

pub use change::{parse_preferred, requested, sdp_service, Target};
pub use env::{CallEnv, Redecision};
pub use fork::best_response;
pub use io::{BillingCmd, Incoming, Input, LegEvent, LegId, Output, Token, TxId};
pub use limits::{fails_over, Admission, SessionLimits, SESSION_LIMIT_REASON};
pub use session::Side;
pub use transfer::refer_target;

use crate::b2bua;
use crate::content;
use io::Outbox;
use leg::PendingLeg;
use session::{Billed, Session, State};

/// The terminal's INVITE.
struct Terminal {
    /// The INVITE, while the inquiry runs: every answer to it is built from it. Let go once
    /// its final response went out and no other fork can answer (nothing answers it then;
    /// the 2xx is resent by its transaction, a fork's further 2xx from its own bytes).
    invite: Option<Box<Request>>,
    /// Its Request-URI as it came, which the INVITE of every leg of the call repeats (a
    /// change's and a transfer's too, after the INVITE was let go): text, read again for
    /// each leg, rather than rsip's parsed form of 160 bytes kept for the call's life.
    uri: Box<str>,
    tx: TxId,
    peer: Peer,
    call_id: Box<str>,
    /// Whether the INVITE has had a final response.
    final_sent: bool,
    /// The INVITE's CSeq number, which the ACK of its 2xx carries (kept when the INVITE
    /// is let go, as the terminal may ACK after that).
    cseq: Option<u32>,
}

/// What a pending INVITE leg is for.
enum Purpose {
    /// The terminal's initial request (a session of its own per 2xx).
    Initial {
        /// The To tag the terminal sees for this leg's answers.
        a_tag: String,
    },
    /// A service change onto a new server (claim 5).
    Change(Box<change::Pending>),
    /// A transfer to a second server (claim 6).
    Transfer(transfer::Pending),
}

/// What the call does when a token's answer or commit comes.
enum Waiting {
    /// Relay the answer back on the transaction the request came in (from side `from` of
    /// session `session`).
    Relayed {
        tx: TxId,
        req: Request,
        contact: Option<Header>,
        session: usize,
        from: Side,
    },
    /// The relay's own session refresh on `side` of session `session` (RFC 4028 §10), with
    /// the re-INVITE sent when it was one (its 2xx is ACKed).
    Refresh {
        session: usize,
        side: Side,
        sent: Option<Box<Request>>,
    },
    /// A liveness probe of session `session`.
    Probe { session: usize, side: Side },
    /// A change re-INVITE to the same server.
    ChangeSameServer(Box<change::SameServer>),
    /// The relay's re-INVITE of the terminal after a transfer.
    TerminalReinvite { session: usize, sent: Request },
    /// Session `session` is journaled: its 2xx `answer` may go to the terminal.
    Journaled { session: usize, answer: Response },
    /// A session's record is written (or failed to be): take it out of the served index,
    /// where a charge now finds the record instead, and answer the BYE that ended it.
    Closed {
        session_id: String,
        bye: Option<Incoming>,
    },
    /// Session `session` moved to a new segment, closing segment `closing`: index the new
    /// one instead of the closed one, then `then`.
    Segment {
        session: usize,
        closing: String,
        then: AfterSegment,
    },
}

/// What follows a change's or a transfer's new billing segment.
enum AfterSegment {
    /// Relay the server's answer to the terminal's change re-INVITE.
    Answer {
        reinvite: Box<Incoming>,
        resp: Response,
    },
    /// Re-INVITE the terminal with the new server's SDP (a transfer, RFC 3725).
    Reinvite { resp: Response },
}

/// The call's billing commands: one session's commands are committed one at a time and in
/// order, so that the close of a segment never overtakes its opening; the sessions of a
/// fork are journaled side by side.
#[derive(Default)]
struct BillingQueue {
    /// The command in flight for each session that has one.
    in_flight: Vec<(usize, Token)>,
    /// Commands waiting for their session's command in flight.
    queued: Vec<(usize, Token, BillingCmd)>,
}

/// A call: the terminal's INVITE and every session it gave. See the module documentation.
pub struct Call {
    a: Terminal,
    adm: limits::Admitted,
    /// The wall-clock time at the monotonic instant the call started: records take their
    /// timestamps from here plus monotonic time.
    epoch: (SystemTime, Instant),
    inquiry: inquiry::Inquiry,
    legs: Vec<(LegId, PendingLeg<Purpose>)>,
    sessions: Vec<Session>,
    waiting: io::Awaited<Waiting>,
    billing: BillingQueue,
    out: Outbox,
    shutting_down: bool,
    /// Whether the call still holds, unused, the session slot admission took for it: the
    /// first session keeps it; the inquiry gives it back when it ends without one.
    slot_unused: bool,
    /// The session timer agreed with the terminal from its INVITE (RFC 4028 §9), which
    /// each session's 2xx to it carries.
    a_timer: Option<Negotiated>,
}

impl Call {
    /// A call for the admitted INVITE `invite` (Call-ID `call_id`), starting its inquiry at
    /// monotonic `now`, which is wall-clock `wall`.
    pub fn new(
        invite: Incoming,
        call_id: String,
        adm: Admission,
        env: &dyn CallEnv,
        now: Instant,
        wall: SystemTime,
    ) -> Call {
        let fork = adm.strategy == crate::directory::Strategy::All;
        let mut call = Call {
            a: Terminal {
                cseq: cseq_number(&invite.req),
                uri: invite.req.uri.to_string().into_boxed_str(),
                invite: Some(Box::new(invite.req)),
                tx: invite.tx,
                peer: invite.from,
                call_id: call_id.into(),
                final_sent: false,
            },
            adm: adm.into(),
            epoch: (wall, now),
            inquiry: inquiry::Inquiry::new(fork),
            legs: Vec::new(),
            sessions: Vec::new(),
            waiting: io::Awaited::default(),
            billing: BillingQueue::default(),
            out: Outbox::default(),
            shutting_down: false,
            slot_unused: true,
            a_timer: None,
        };
        if call.negotiate_terminal_timer(env) {
            call.start_inquiry(env, now);
        }
        call.settle(env);
        call
    }

    /// The terminal leg's Call-ID.
    pub fn call_id(&self) -> &str {
        &self.a.call_id
    }

    /// The next thing to do, until there is none.
    pub fn poll_output(&mut self) -> Option<Output> {
        let out = self.out.pop();
        if out.is_none() {
            self.out.shrink();
        }
        out
    }

    /// When [`Call::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.inquiry.fork_deadline;
        let mut earliest = |d: Instant| {
            next = Some(next.map_or(d, |n: Instant| n.min(d)));
        };
        for (_, leg) in &self.legs {
            earliest(leg.deadline);
        }
        for s in &self.sessions {
            match s.state {
                State::AwaitingAck(d) => {
                    earliest(d);
                    if let Some(r) = &s.resend_2xx {
                        earliest(r.at)
                    }
                }
                State::Established => {
                    if let Some(d) = s.next_probe {
                        earliest(d)
                    }
                    if let Some(d) = s.timers.deadline() {
                        earliest(d)
                    }
                }
                State::Journaling | State::Ended => {}
            }
        }
        next
    }

    /// Whether the call is over: the terminal answered, no leg pending, every session ended
    /// and billed, nothing waited for.
    pub fn is_finished(&self) -> bool {
        self.a.final_sent
            && !self.slot_unused
            && self.legs.is_empty()
            && self.sessions.iter().all(|s| s.state == State::Ended)
            && self.waiting.is_empty()
            && self.billing.in_flight.is_empty()
    }

    /// Whether the terminal's INVITE transaction can take nothing more from the call: its
    /// final response went out and no other fork can answer (the driver may let it go).
    pub fn inquiry_over(&self) -> bool {
        self.a.invite.is_none()
    }

    /// How many sessions are live.
    pub fn live_sessions(&self) -> usize {
        self.sessions.iter().filter(|s| s.live()).count()
    }

    /// Takes one input at monotonic `now`.
    pub fn handle(&mut self, input: Input, env: &dyn CallEnv, now: Instant) {
        match input {
            Input::Leg { leg, event } => self.on_leg(leg, event, env, now),
            Input::Resolved { leg, peer } => self.on_resolved(leg, peer, env, now),
            Input::Cancel { tx, req } => self.on_cancel(tx, req),
            Input::Ack { req, dialog } => self.on_ack(req, dialog, env, now),
            Input::Request { incoming, dialog } => self.on_request(incoming, dialog, env, now),
            Input::Stray { resp, dialog } => {
                // A server re-sent a 2xx to an INVITE after its transaction ended: our ACK
                // was lost. (A 2xx to anything else is acknowledged by nothing.)
                if let (2, Some(cseq)) = (resp.status_code.code() / 100, invite_cseq_of(&resp)) {
                    if let Some(i) = self.sessions.iter().position(|s| {
                        s.b.is_acked() && dialog.as_ref().is_some_and(|d| s.b.dialog.id() == d)
                    }) {
                        self.reack(i, cseq, env);
                    }
                }
            }
            Input::Answered { token, resp } => self.on_answered(token, resp, env, now),
            Input::Billed { token, result } => self.on_billed(token, result, env, now),
            Input::Shutdown => self.shutdown(env, now),
            Input::End { session_id } => self.end_by_operator(&session_id, env, now),
        }
        self.settle(env);
    }

    /// Gives back what the call holds only while it may need it: the terminal's INVITE
    /// once the inquiry is over (its responses need only the headers RFC 3261 §8.2.6.2
    /// copies), and the room of emptied tables. A call lives as long as its sessions, so
    /// what it keeps is paid for every concurrent session.
    fn settle(&mut self, env: &dyn CallEnv) {
        let inquiring = !self.a.final_sent
            || self
                .legs
                .iter()
                .any(|(_, l)| matches!(l.purpose, Purpose::Initial { .. }))
            || self.sessions.iter().any(|s| s.state == State::Journaling);
        if !inquiring {
            self.a.invite = None;
            // What is left of the search (candidates not asked, failures heard) answers
            // nothing any more: its room goes back.
            self.inquiry.candidates = VecDeque::new();
            self.inquiry.failures = Vec::new();
        }
        if !inquiring && self.slot_unused {
            // The inquiry ended without a session: the slot admission took goes back.
            self.slot_unused = false;
            env.give_back_session_slot(&self.adm.subscriber);
        }
        if self.legs.is_empty() && self.legs.capacity() > 0 {
            self.legs = Vec::new();
        }
        if self.billing.in_flight.is_empty() && self.billing.in_flight.capacity() > 0 {
            self.billing = BillingQueue::default();
        }
    }

    /// Acts on every deadline that has come by monotonic `now`.
    pub fn handle_timeout(&mut self, env: &dyn CallEnv, now: Instant) {
        self.on_timeout(env, now);
        self.settle(env);
    }

    fn on_timeout(&mut self, env: &dyn CallEnv, now: Instant) {
        let overdue: Vec<LegId> = self
            .legs
            .iter()
            .filter(|(_, leg)| leg.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some(leg) = self.take_leg(id) {
                if leg.heard {
                    // Ringing too long: cancel it (a response came, so CANCEL is allowed).
                    if let Some((cancel, peer)) = leg.cancel() {
                        self.out.send(cancel, peer);
                    }
                }
                info!(server = leg.server.uri_text(), "no answer in time");
                self.on_failure(leg, 408, None, env, now);
            }
        }
        if self.inquiry.fork_deadline.is_some_and(|d| d <= now) {
            self.inquiry.fork_deadline = None;
            info!("fork timeout: cancelling the legs still pending");
            self.cancel_pending_legs();
        }
        for i in 0..self.sessions.len() {
            match self.sessions[i].state {
                State::AwaitingAck(d) if d <= now => {
                    // The terminal has the 2xx and its data token: the session was
                    // delivered, and is billed from the 2xx to now.
                    info!(session_id = %self.sessions[i].id, "terminal never acknowledged the 2xx; ending both legs");
                    self.end(i, EndCause::Timeout, None, env, now);
                }
                State::AwaitingAck(_) => {
                    let peer = self.a.peer;
                    if let Some(r) = self.sessions[i].resend_2xx.as_mut() {
                        if r.at <= now {
                            r.next(now);
                            let msg = r.msg.clone();
                            self.out.push(Output::Stateless { msg, peer });
                        }
                    }
                }
                State::Established => {
                    if self.sessions[i].next_probe.is_some_and(|d| d <= now) {
                        let interval = env.limits().probe_interval;
                        self.sessions[i].next_probe = Some(now + interval);
                        self.probe(i, env);
                    }
                    self.on_session_timers(i, env, now);
                }
                _ => {}
            }
        }
    }

    fn wall_at(&self, now: Instant) -> SystemTime {
        self.epoch.0 + now.saturating_duration_since(self.epoch.1)
    }

    fn who(&self) -> Billed<'_> {
        Billed {
            subscriber: &self.adm.subscriber,
            terminal_call_id: &self.a.call_id,
        }
    }

    fn respond_a(&mut self, resp: Response) {
        if resp.status_code.code() >= 200 {
            self.a.final_sent = true;
        }
        self.out.respond(self.a.tx, resp);
    }

    fn refuse_a(&mut self, code: u16, reason: &str) {
        let Some(invite) = self.a.invite.as_deref() else {
            warn!(code, "the inquiry is over: no INVITE left to refuse");
            return;
        };
        let resp = b2bua::local_response(invite, code, reason, Some(&message::new_tag()));
        self.respond_a(resp);
    }

    /// Relays a server's final refusal to the terminal's INVITE (RFC 3261 §16.7 step 6).
    fn relay_refusal_to_a(&mut self, resp: &Response) {
        let Some(invite) = self.a.invite.as_deref() else {
            warn!("the inquiry is over: no INVITE left to answer");
            return;
        };
        let out = b2bua::relayed_response(invite, resp, Some(&message::new_tag()), None);
        self.respond_a(out);
    }

    /// Answers an in-dialog request with a status of the relay's own.
    fn refuse(&mut self, r: &Incoming, code: u16, reason: &str) {
        self.out
            .respond(r.tx, b2bua::local_response(&r.req, code, reason, None));
    }

    fn take_leg(&mut self, id: LegId) -> Option<PendingLeg<Purpose>> {
        let at = self.legs.iter().position(|(l, _)| *l == id)?;
        Some(self.legs.swap_remove(at).1)
    }

    /// Queues a billing command of session `session` whose commit `then` follows.
    fn bill(&mut self, session: usize, cmd: BillingCmd, then: Waiting) {
        let token = self.out.token();
        self.waiting.insert(token, then);
        if self.billing.in_flight.iter().any(|(s, _)| *s == session) {
            self.billing.queued.push((session, token, cmd));
        } else {
            self.billing.in_flight.push((session, token));
            self.out.push(Output::Bill { token, cmd });
        }
    }

    fn on_billed(
        &mut self,
        token: Token,
        result: Result<(), String>,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        if let Some(at) = self.billing.in_flight.iter().position(|(_, t)| *t == token) {
            let (session, _) = self.billing.in_flight.swap_remove(at);
            let next = self.billing.queued.iter().position(|(s, ..)| *s == session);
            if let Some((session, next, cmd)) = next.map(|at| self.billing.queued.remove(at)) {
                self.billing.in_flight.push((session, next));
                self.out.push(Output::Bill { token: next, cmd });
            }
        }
        let Some(then) = self.waiting.remove(&token) else {
            return;
        };
        match then {
            Waiting::Journaled { session, answer } => {
                self.on_journaled(session, answer, result, env, now)
            }
            Waiting::Closed { session_id, bye } => {
                // Until now a charge for it found it in the index; from now on, its record.
                env.unindex(&session_id);
                match &result {
                    Ok(()) => info!(session_id = %session_id, "session ended and billed"),
                    Err(e) => {
                        warn!(session_id = %session_id, error = %e, "session record not written")
                    }
                }
                if let Some(r) = bye {
                    let resp = match result {
                        Ok(()) => b2bua::local_response(&r.req, 200, "OK", None),
                        // The session stays journaled and is closed by recovery; say so.
                        Err(_) => b2bua::local_response(&r.req, 500, "Billing unavailable", None),
                    };
                    self.out.respond(r.tx, resp);
                }
            }
            Waiting::Segment {
                session,
                closing,
                then,
            } => {
                match result {
                    Ok(()) => {
                        let served = self.sessions[session].served(&self.who());
                        env.index(served);
                        info!(session_id = %self.sessions[session].id, "new billing segment");
                    }
                    Err(e) => warn!(error = %e, "billing of the new segment failed"),
                }
                // After the new one is indexed: the Call-IDs they share lead to it throughout.
                env.unindex(&closing);
                match then {
                    AfterSegment::Answer { reinvite, resp } => {
                        let contact = env.local(reinvite.from).contact_header();
                        let mut out =
                            b2bua::relayed_response(&reinvite.req, &resp, None, Some(contact));
                        let policy = env.limits().session_timer;
                        self.answer_refresh(
                            session,
                            Side::Terminal,
                            &reinvite.req,
                            &mut out,
                            &policy,
                            now,
                        );
                        self.out.respond(reinvite.tx, out);
                    }
                    AfterSegment::Reinvite { resp } => self.reinvite_terminal(session, resp, env),
                }
            }
            other => {
                // Only billing continuations are ever queued with a billing command.
                self.waiting.insert(token, other);
            }
        }
    }

    fn on_answered(&mut self, token: Token, resp: Response, env: &dyn CallEnv, now: Instant) {
        let Some(then) = self.waiting.remove(&token) else {
            return;
        };
        match then {
            Waiting::Relayed {
                tx,
                req,
                contact,
                session,
                from,
            } => {
                let contact = (req.method == Method::Invite).then_some(contact).flatten();
                let mut out = b2bua::relayed_response(&req, &resp, None, contact);
                if self.sessions[session].live() {
                    // A 2xx to a relayed re-INVITE or UPDATE renews both legs (RFC 4028 §10).
                    self.refreshed_by_answer(session, from.other(), req.method, &resp, now);
                    let policy = env.limits().session_timer;
                    self.answer_refresh(session, from, &req, &mut out, &policy, now);
                } else {
                    sip_core::dialog::session_timer::strip(&mut out.headers);
                }
                self.out.respond(tx, out);
            }
            Waiting::Refresh {
                session,
                side,
                sent,
            } => self.on_refresh_answer(session, side, sent, resp, env, now),
            Waiting::Probe { session, side } => {
                let alive = !matches!(resp.status_code.code(), 408 | 481);
                let s = &mut self.sessions[session];
                let leg = match side {
                    Side::Terminal => 0,
                    Side::Server => 1,
                };
                if alive {
                    s.probe_answered[leg] = Some(now);
                } else if s.state == State::Established {
                    // Billed up to the leg's last answer (or the segment's start): what
                    // came after it was not delivered to anyone.
                    let last = s.probe_answered[leg].unwrap_or(s.clock.started_mono());
                    info!(session_id = %s.id, ?side, "a leg stopped answering; ending the session");
                    self.end_until(session, EndCause::Timeout, None, env, now, last);
                }
            }
            Waiting::ChangeSameServer(w) => self.on_change_same_server(*w, resp, now),
            Waiting::TerminalReinvite { session, sent } => {
                self.on_terminal_reinvited(session, sent, resp, env, now)
            }
            other => {
                // Billing continuations come with Billed, not with an answer.
                self.waiting.insert(token, other);
            }
        }
    }

    /// The live session whose terminal dialog has id `id` (RFC 3261 §12.2.2).
    fn session_by_a(&self, id: &DialogId) -> Option<usize> {
        self.sessions
            .iter()
            .position(|s| s.live() && s.a_dialog.id() == id)
    }

    /// The live session whose server leg the request belongs to: its whole dialog id, and
    /// sent from the server's address. A Call-ID alone is not enough: whoever learnt one
    /// could otherwise hang up or charge someone else's session.
    fn session_by_b(&self, id: &DialogId, from: &Peer) -> Option<usize> {
        self.sessions
            .iter()
            .position(|s| s.live() && s.b.dialog.id() == id && s.b.peer.addr.ip() == from.addr.ip())
    }

    fn on_ack(&mut self, ack: Request, dialog: Option<DialogId>, env: &dyn CallEnv, now: Instant) {
        let Some(id) = dialog else { return };
        if *id.call_id != *self.a.call_id {
            // The server's ACK of a 2xx to its own re-INVITE, relayed to the terminal.
            if let Some(i) = self
                .sessions
                .iter()
                .position(|s| s.live() && s.b.dialog.id() == id)
            {
                self.relay_ack(i, Side::Server, ack, env);
            }
            return;
        }
        let Some(i) = self.session_by_a(&id) else {
            return;
        };
        match self.sessions[i].state {
            // The ACK of our 2xx carries the INVITE's CSeq number (RFC 3261 §13.2.2.4); one
            // with another (a terminal ACKing again an earlier challenge, with this dialog's
            // To tag) confirms nothing.
            State::AwaitingAck(_) if cseq_number(&ack) != self.a.cseq => {}
            State::AwaitingAck(_) => {
                let (headers, body) = b2bua::carried_body(&ack);
                let s = &mut self.sessions[i];
                let local = env.local(s.b.peer);
                if let Some(relayed) = s.b.ack(&local, headers, body) {
                    let peer = s.b.peer;
                    self.out.push(Output::Stateless { msg: relayed, peer });
                }
                self.establish(i, env, now);
            }
            State::Established => self.relay_ack(i, Side::Terminal, ack, env),
            State::Journaling | State::Ended => {}
        }
    }

    /// The terminal confirmed session `i`: in-dialog requests and probes may run. Billing
    /// started at the 2xx.
    fn establish(&mut self, i: usize, env: &dyn CallEnv, now: Instant) {
        let interval = env.limits().probe_interval;
        let s = &mut self.sessions[i];
        s.state = State::Established;
        s.resend_2xx = None;
        s.next_probe = (!interval.is_zero()).then(|| now + interval);
        info!(session_id = %s.id, server = s.b.server.uri_text(), service = %s.service, subscriber = %self.adm.subscriber, "session established");
    }

    /// ACKs session `i`'s server leg, unless that was done already.
    fn ack_server(&mut self, i: usize, env: &dyn CallEnv) {
        let s = &mut self.sessions[i];
        if s.b.is_acked() {
            return;
        }
        let local = env.local(s.b.peer);
        if let Some(ack) = s.b.ack(&local, Vec::new(), Vec::new()) {
            let peer = s.b.peer;
            self.out.push(Output::Stateless { msg: ack, peer });
        }
    }

    /// Sends session `i`'s server-leg ACK of the INVITE numbered `cseq` again (its 2xx
    /// came again: our ACK was lost).
    fn reack(&mut self, i: usize, cseq: u32, env: &dyn CallEnv) {
        let b = &mut self.sessions[i].b;
        let local = env.local(b.peer);
        if let Some(ack) = b.ack_again(&local, cseq) {
            let peer = b.peer;
            self.out.push(Output::Stateless { msg: ack, peer });
        }
    }

    fn on_request(
        &mut self,
        r: Incoming,
        dialog: Option<DialogId>,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        let found = dialog.as_ref().and_then(|id| {
            if *id.call_id == *self.a.call_id {
                self.session_by_a(id).map(|i| (i, Side::Terminal))
            } else {
                self.session_by_b(id, &r.from).map(|i| (i, Side::Server))
            }
        });
        let Some((i, side)) = found else {
            let (code, reason) = if r.req.method == Method::Invite && dialog.is_none() {
                (482, "Loop Detected")
            } else {
                (481, "Call/Transaction Does Not Exist")
            };
            self.out.respond(
                r.tx,
                b2bua::local_response(&r.req, code, reason, Some(&message::new_tag())),
            );
            return;
        };
        if r.req.method == Method::Bye {
            match self.sessions[i].state {
                State::Established | State::AwaitingAck(_) => {
                    // Before the ACK too: the 2xx went out, so the session was delivered
                    // and is billed from it. A BYE from the terminal proves it got the 2xx
                    // (its ACK was lost or is late, RFC 3261 §15); one from the server ends
                    // what it served.
                    let cause = match side {
                        Side::Terminal => EndCause::CallerBye,
                        Side::Server => EndCause::ServerBye,
                    };
                    self.end(i, cause, Some((side, r)), env, now);
                }
                State::Journaling => self.sessions[i].deferred_bye = Some(Box::new((side, r))),
                State::Ended => self
                    .out
                    .respond(r.tx, b2bua::local_response(&r.req, 200, "OK", None)),
            }
            return;
        }
        if self.sessions[i].state != State::Established {
            self.out.respond(
                r.tx,
                b2bua::local_response(&r.req, 491, "Request Pending", None),
            );
            return;
        }
        if !self.check_refresh(i, side, &r, env, now) {
            return;
        }
        if side == Side::Server && r.req.method == Method::Message && content::is_charge(&r.req) {
            // Application billing on the leg the relay set up (claim 4).
            let session_id = self.sessions[i].id.clone();
            self.out.push(Output::Charge {
                incoming: r,
                session_id,
            });
            return;
        }
        if side == Side::Terminal && r.req.method == Method::Invite {
            let s = &self.sessions[i];
            if let Some(target) = change::requested(&r.req, &s.service, &s.params) {
                self.start_change(i, r, target, env, now);
                return;
            }
            // An offer naming another service is not a change: changes are asked with
            // P-Preferred-Service, checked and billed. Relayed, it would switch the server
            // to a service the relay goes on billing as the old one.
            if let Some(named) = change::sdp_service(&r.req.body) {
                if *named != *s.service {
                    info!(session_id = %s.id, service = %named, "re-INVITE offer names another service; refused");
                    self.out.respond(
                        r.tx,
                        b2bua::local_response(
                            &r.req,
                            488,
                            "Offer names another service (ask with P-Preferred-Service)",
                            None,
                        ),
                    );
                    return;
                }
            }
            self.sessions[i].offer = b2bua::carried_body(&r.req).into();
        }
        if side == Side::Terminal && r.req.method == Method::Refer {
            self.start_transfer(i, r, env, now);
            return;
        }
        self.relay_in_dialog(i, side, r, env);
    }

    /// Ends session `i`: its server leg ACKed if it was not yet, BYE to the legs that did
    /// not send one, the record committed, then the BYE that caused it answered.
    fn end(
        &mut self,
        i: usize,
        cause: EndCause,
        bye: Option<(Side, Incoming)>,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        self.end_until(i, cause, bye, env, now, now);
    }

    /// Ends session `i` at `now` as [`Call::end`] does, its record ending at monotonic
    /// `billed_until` (a session whose leg vanished is billed up to that leg's last refresh,
    /// RFC 4028; never before its segment started).
    fn end_until(
        &mut self,
        i: usize,
        cause: EndCause,
        bye: Option<(Side, Incoming)>,
        env: &dyn CallEnv,
        now: Instant,
        billed_until: Instant,
    ) {
        let delivered = matches!(
            self.sessions[i].state,
            State::AwaitingAck(_) | State::Established
        );
        self.ack_server(i, env);
        let initiator = bye.as_ref().map(|(side, _)| *side);
        let a_peer = self.a.peer;
        for side in [Side::Terminal, Side::Server] {
            if Some(side) == initiator || (side == Side::Terminal && !delivered) {
                continue;
            }
            if let Some((req, peer)) =
                self.sessions[i].request(side, a_peer, Method::Bye, Vec::new(), Vec::new(), env)
            {
                self.out.send(req, peer);
            }
        }
        let s = &mut self.sessions[i];
        let ended_at = s.clock.end_at(billed_until.min(now));
        s.state = State::Ended;
        s.resend_2xx = None;
        s.pending_ack = None;
        env.session_ended(&s.b.server);
        env.give_back_session_slot(&self.adm.subscriber);
        let session_id = s.id.clone();
        info!(session_id = %session_id, cause = cause.as_str(), "session ending");
        self.bill(
            i,
            BillingCmd::Close {
                session_id: session_id.clone(),
                cause,
                ended_at,
            },
            Waiting::Closed {
                session_id,
                bye: bye.map(|(_, r)| r),
            },
        );
    }

    /// Closes session `i`'s billing segment with `cause` and opens the next one (a new
    /// session id) for its current service and server, then `then`.
    fn new_segment(&mut self, i: usize, cause: EndCause, then: AfterSegment, now: Instant) {
        let closing = self.sessions[i].id.clone();
        let at = self.sessions[i].next_segment(now, format!("s-{}", message::new_tag()));
        let open = self.sessions[i].start(&self.who());
        info!(old = %closing, new = %open.session_id, cause = cause.as_str(), "next billing segment");
        self.bill(
            i,
            BillingCmd::Segment {
                closing: closing.clone(),
                cause,
                at,
                open,
            },
            Waiting::Segment {
                session: i,
                closing,
                then,
            },
        );
    }

    /// Ends the live session `session_id` for an operator (cause `admin`); nothing when it
    /// is not one of this call's live sessions (it ended meanwhile).
    fn end_by_operator(&mut self, session_id: &str, env: &dyn CallEnv, now: Instant) {
        let Some(i) = self.sessions.iter().position(|s| {
            s.id == session_id && matches!(s.state, State::Established | State::AwaitingAck(_))
        }) else {
            debug!(session_id, "no live session of that id to end");
            return;
        };
        info!(session_id, "session ended by an operator");
        self.end(i, EndCause::Admin, None, env, now);
    }

    fn shutdown(&mut self, env: &dyn CallEnv, now: Instant) {
        self.shutting_down = true;
        self.inquiry.cancelled = true;
        self.inquiry.candidates.clear();
        self.cancel_pending_legs();
        self.legs.clear();
        if !self.a.final_sent {
            self.refuse_a(503, "Relay shutting down");
        }
        for i in 0..self.sessions.len() {
            if matches!(
                self.sessions[i].state,
                State::Established | State::AwaitingAck(_)
            ) {
                self.end(i, EndCause::RelayShutdown, None, env, now);
            }
        }
        debug!("call shut down");
    }
}

/// The CSeq number of `req`, when it has a readable one.
/// The CSeq number and method of a message's headers.
fn cseq_in(headers: &rsip::Headers) -> Option<(u32, Method)> {
    headers.iter().find_map(|h| match h {
        Header::CSeq(c) => sip_core::fields::cseq_of(rsip::prelude::UntypedHeader::value(c)),
        _ => None,
    })
}

/// The CSeq number of a response to an INVITE; `None` for a response to another method.
fn invite_cseq_of(resp: &Response) -> Option<u32> {
    cseq_in(&resp.headers).and_then(|(n, m)| (m == Method::Invite).then_some(n))
}

fn cseq_number(req: &Request) -> Option<u32> {
    cseq_in(&req.headers).map(|(n, _)| n)
}
