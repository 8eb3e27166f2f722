//! The B2BUA core: one task per admitted INVITE (a *call*), from inquiry to bill (DESIGN.md
//! claims 1 and 3). A call holds one session per answered server leg — one in the ordinary
//! case, several when the request is forked ([`crate::fork`]).
//!
//! 1. **Inquiry** — the candidates found in the directory are asked with INVITE legs of the
//!    relay's own, in order (failover) or all at once (fork). The endpoint reports each
//!    leg's answers straight to the call's inbox ([`crate::leg`]).
//!    Provisional answers are relayed to the terminal; a server that fails (silent for the
//!    inquiry timeout, 408, 480, 486, 5xx, 6xx) is replaced by the next candidate. A CANCEL
//!    from the terminal cancels the pending legs.
//! 2. **Response relay** — a server's 2xx (its SDP answer untouched) is relayed to the
//!    terminal with the relay as Contact, so every in-dialog request passes through it.
//! 3. **Confirmation** — the terminal's ACK is relayed as the ACK of the server leg; the
//!    session is journaled in billing and its clock starts.
//! 4. **Disconnection** — a BYE from either side is relayed to the other; the session record
//!    is committed before the BYE is answered. A party that does not answer the relayed BYE
//!    does not hold the session open. In-dialog OPTIONS probes end a session whose terminal
//!    or server vanished (cause `timeout`).
//!
//! Other in-dialog requests of a session, and their ACKs, are relayed between its legs by
//! [`crate::in_dialog`]. Changing a live session's service ([`crate::change`]) and
//! transferring it to a second server ([`crate::transfer`]) reuse the same leg machinery.
//! Everything of one call happens in its task, fed through its inbox by the
//! [`SessionTable`](crate::routing::SessionTable), so no lock is shared between calls.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use billing::record::EndCause;
use rsip::prelude::*;
use rsip::{Header, Method, Request, Response};
use sip_core::dialog::{Dialog, DialogId, DialogState};
use sip_core::endpoint::{IncomingRequest, ServerTx};
use sip_core::{message, Peer};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::b2bua;
use crate::billing_control::{SegmentClock, SessionStart};
use crate::charge::{self, ServedSession};
use crate::directory::{ServerRef, Strategy};
use crate::in_dialog::PendingAck;
use crate::leg::{LegEvent, LegId, PendingLeg, Purpose, ServerLeg};
use crate::relay::Relay;
use crate::routing::{self, AnswerPurpose, Inbox, InboxReceiver, SessionInput};
use crate::{change, fork, transfer};

/// What admission decided for an authenticated INVITE: who, which service, how to search,
/// how to bill.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The authenticated subscriber.
    pub subscriber: String,
    /// The service to deliver.
    pub service: String,
    /// The server selection strategy.
    pub strategy: Strategy,
    /// Service parameters passed on to the server.
    pub params: Vec<(String, String)>,
    /// The tariff plan.
    pub plan: String,
    /// The rule that decided.
    pub rule: String,
}

/// Liveness and timing limits of sessions.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// How long a server may take to answer an inquiry at all (any response) before the
    /// next candidate is tried.
    pub inquiry_timeout: Duration,
    /// How long a server may ring before the inquiry gives up on it.
    pub answer_timeout: Duration,
    /// How long to wait for the terminal's ACK to a 2xx (64·T1).
    pub ack_timeout: Duration,
    /// How often each leg of an established session is probed with OPTIONS; zero disables.
    pub probe_interval: Duration,
    /// How long a forked inquiry waits for answers before cancelling the pending legs.
    pub fork_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            inquiry_timeout: Duration::from_secs(4),
            answer_timeout: Duration::from_secs(120),
            ack_timeout: Duration::from_secs(32),
            probe_interval: Duration::from_secs(30),
            fork_timeout: Duration::from_secs(30),
        }
    }
}

/// Whether a failure from a server makes the inquiry try the next candidate.
pub fn fails_over(code: u16) -> bool {
    matches!(code, 408 | 480 | 486 | 500..=699)
}

/// The terminal's INVITE.
pub(crate) struct TerminalRequest {
    pub(crate) invite: Request,
    pub(crate) tx: ServerTx,
    pub(crate) peer: Peer,
    pub(crate) call_id: String,
    /// Whether the INVITE has had a final response.
    pub(crate) final_sent: bool,
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// The 2xx went to the terminal; waiting for its ACK until the deadline.
    AwaitingAck(tokio::time::Instant),
    /// Confirmed and billed by time.
    Established,
    /// Over.
    Ended,
}

/// One of the two legs of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The terminal's leg (the relay is UAS).
    Terminal,
    /// The application server's leg (the relay is UAC).
    Server,
}

/// One session: a terminal dialog paired with a server leg, billed on its own.
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) a_dialog: Dialog,
    pub(crate) b: ServerLeg,
    pub(crate) service: String,
    pub(crate) params: Vec<(String, String)>,
    pub(crate) state: State,
    pub(crate) pending_ack: Option<PendingAck>,
    /// A change or transfer in progress (another is refused with 491 meanwhile).
    pub(crate) busy: bool,
    /// The terminal's current SDP offer (for a transfer's inquiry).
    pub(crate) offer: (Vec<Header>, Vec<u8>),
    pub(crate) next_probe: Option<tokio::time::Instant>,
    /// When the current billing segment started: the 2xx to the terminal, or the change or
    /// transfer that opened it.
    pub(crate) clock: SegmentClock,
    /// The tariff plan of the current billing segment.
    pub(crate) plan: String,
    /// The plan the rules decided for a change or transfer in progress, which the next
    /// segment is billed on.
    pub(crate) next_plan: Option<String>,
}

/// A call: the terminal's INVITE and every session it gave.
pub(crate) struct Call {
    pub(crate) relay: Arc<Relay>,
    pub(crate) me: Inbox,
    inbox: InboxReceiver,
    pub(crate) a: TerminalRequest,
    pub(crate) adm: Admission,
    candidates: VecDeque<ServerRef>,
    fork: bool,
    fork_deadline: Option<tokio::time::Instant>,
    pub(crate) legs: HashMap<LegId, PendingLeg>,
    /// The id of the next leg started.
    pub(crate) next_leg: u64,
    pub(crate) sessions: Vec<Session>,
    cancelled: bool,
    failures: Vec<(u16, Option<Response>)>,
    /// Every Call-ID routed to this call, unrouted when it ends.
    pub(crate) routed: Vec<String>,
}

/// Starts the call task for an admitted INVITE.
pub fn spawn(relay: Arc<Relay>, incoming: IncomingRequest, adm: Admission) {
    let call_id = match message::Summary::of_request(&incoming.req) {
        Ok(s) => s.call_id,
        Err(_) => return,
    };
    let (me, inbox) = routing::inbox();
    relay.sessions.insert(&call_id, me.clone());
    let span = info_span!("call", call_id = %call_id, service = %adm.service);
    let fork = adm.strategy == Strategy::All;
    let call = Call {
        relay,
        me,
        inbox,
        a: TerminalRequest {
            invite: incoming.req,
            tx: incoming.tx,
            peer: incoming.from,
            call_id: call_id.clone(),
            final_sent: false,
        },
        adm,
        candidates: VecDeque::new(),
        fork,
        fork_deadline: None,
        legs: HashMap::new(),
        next_leg: 0,
        sessions: Vec::new(),
        cancelled: false,
        failures: Vec::new(),
        routed: vec![call_id],
    };
    tokio::spawn(call.run().instrument(span));
}

impl Call {
    async fn run(mut self) {
        self.start_inquiry().await;
        // One timer for the call, moved only when its next deadline changes (a new one per
        // input made a timer-wheel insert and removal per message).
        let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(sleep);
        let mut armed = None;
        while !self.finished() {
            let wake = self.next_deadline();
            if wake != armed {
                armed = wake;
                if let Some(at) = wake {
                    sleep.as_mut().reset(at);
                }
            }
            let input = tokio::select! {
                input = self.inbox.recv() => input,
                () = &mut sleep, if armed.is_some() => {
                    armed = None;
                    self.on_deadline().await;
                    continue;
                }
            };
            let Some(input) = input else { break };
            self.on_input(input).await;
        }
        for call_id in &self.routed {
            self.relay.sessions.remove(call_id);
        }
    }

    fn finished(&self) -> bool {
        self.a.final_sent
            && self.legs.is_empty()
            && self.sessions.iter().all(|s| s.state == State::Ended)
    }

    fn next_deadline(&self) -> Option<tokio::time::Instant> {
        let mut next = self.fork_deadline;
        for leg in self.legs.values() {
            next = Some(next.map_or(leg.deadline, |n| n.min(leg.deadline)));
        }
        for s in &self.sessions {
            let d = match s.state {
                State::AwaitingAck(d) => Some(d),
                State::Established => s.next_probe,
                State::Ended => None,
            };
            next = match (next, d) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        next
    }

    async fn on_deadline(&mut self) {
        let now = tokio::time::Instant::now();
        let overdue: Vec<LegId> = self
            .legs
            .iter()
            .filter(|(_, leg)| leg.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some(leg) = self.legs.get(&id) {
                if leg.heard {
                    // Ringing too long: cancel it (a response came, so CANCEL is allowed).
                    if let Ok(cancel) = sip_core::dialog::cancel_for(&leg.invite) {
                        let _ = self.relay.endpoint.send_request(cancel, leg.peer);
                    }
                }
                info!(to = %leg.peer, "no answer in time");
            }
            self.on_leg(
                id,
                LegEvent::Failed {
                    code: 408,
                    resp: None,
                },
            )
            .await;
        }
        if self.fork_deadline.is_some_and(|d| d <= now) {
            self.fork_deadline = None;
            info!("fork timeout: cancelling the legs still pending");
            self.cancel_pending_legs();
        }
        for i in 0..self.sessions.len() {
            match self.sessions[i].state {
                State::AwaitingAck(d) if d <= now => {
                    // The terminal has the 2xx and its data token: the session was
                    // delivered, and is billed from the 2xx to now.
                    info!(session_id = %self.sessions[i].id, "terminal never acknowledged the 2xx; ending both legs");
                    self.ack_server(i).await;
                    self.end(i, EndCause::Timeout, None).await;
                }
                State::Established if self.sessions[i].next_probe.is_some_and(|d| d <= now) => {
                    self.sessions[i].next_probe = Some(now + self.relay.limits.probe_interval);
                    self.probe(i);
                }
                _ => {}
            }
        }
    }

    pub(crate) fn respond_a(&mut self, resp: Response) {
        if resp.status_code.code() >= 200 {
            self.a.final_sent = true;
        }
        if self.a.tx.respond(resp).is_err() {
            debug!("terminal transaction gone");
        }
    }

    fn refuse_a(&mut self, code: u16, reason: &str) {
        let resp = b2bua::local_response(&self.a.invite, code, reason, Some(&message::new_tag()));
        self.respond_a(resp);
    }

    async fn start_inquiry(&mut self) {
        let candidates =
            self.relay
                .directory
                .candidates(&self.adm.service, self.adm.strategy, Instant::now());
        if candidates.is_empty() {
            info!("no application server available");
            self.refuse_a(480, "No application server available");
            return;
        }
        if self.fork {
            self.fork_deadline = Some(tokio::time::Instant::now() + self.relay.limits.fork_timeout);
            info!(servers = candidates.len(), "forking the inquiry");
            for server in candidates {
                self.start_initial_leg(server).await;
            }
            if self.legs.is_empty() {
                self.refuse_a(480, "No application server available");
            }
        } else {
            self.candidates = candidates.into();
            self.next_candidate().await;
        }
    }

    /// Starts the next sequential candidate, or answers the terminal when none is left.
    async fn next_candidate(&mut self) {
        while let Some(server) = self.candidates.pop_front() {
            if self.start_initial_leg(server).await {
                return;
            }
        }
        let last = self.failures.last().map(|(c, _)| *c);
        let reason = match last {
            Some(code) => format!("No application server available (last answer {code})"),
            None => "No application server available".to_string(),
        };
        self.refuse_a(480, &reason);
    }

    async fn start_initial_leg(&mut self, server: ServerRef) -> bool {
        let service = self.adm.service.clone();
        let params = self.adm.params.clone();
        let (headers, body) = b2bua::carried_body(&self.a.invite);
        let purpose = Purpose::Initial {
            a_tag: message::new_tag(),
        };
        self.start_leg(server, &service, &params, (headers, body), purpose)
            .await
    }

    fn cancel_pending_legs(&mut self) {
        for leg in self.legs.values() {
            if matches!(leg.purpose, Purpose::Initial { .. }) {
                self.cancel_leg(leg);
            }
        }
    }

    async fn on_input(&mut self, input: SessionInput) {
        match input {
            SessionInput::Leg { leg, event } => self.on_leg(leg, event).await,
            SessionInput::Cancel { req, tx, invite: _ } => {
                let _ = tx.respond(b2bua::local_response(&req, 200, "OK", None));
                if !self.a.final_sent && !self.cancelled {
                    info!("terminal cancelled");
                    self.cancelled = true;
                    self.candidates.clear();
                    self.cancel_pending_legs();
                    let no_legs = !self
                        .legs
                        .values()
                        .any(|l| matches!(l.purpose, Purpose::Initial { .. }));
                    if no_legs {
                        self.refuse_a(487, "Request Terminated");
                    }
                }
            }
            SessionInput::Ack(ack) => self.on_ack(ack).await,
            SessionInput::Request(r) => self.on_request(r).await,
            SessionInput::Stray(resp) => {
                // A server re-sent its 2xx after its transaction ended: our ACK was lost.
                if resp.status_code.code() / 100 == 2 {
                    let cid = call_id_of(&resp.headers);
                    if let Some(i) = self
                        .sessions
                        .iter()
                        .position(|s| Some(&s.b.call_id) == cid.as_ref())
                    {
                        self.reack(i).await;
                    }
                }
            }
            SessionInput::Answered {
                purpose,
                sent,
                resp,
            } => match purpose {
                AnswerPurpose::ChangeSameServer {
                    session,
                    reinvite,
                    target,
                } => {
                    change::on_same_server_answer(self, &session, reinvite, target, sent, resp)
                        .await
                }
                AnswerPurpose::TerminalReinvite { session } => {
                    transfer::on_terminal_reinvited(self, &session, sent, resp).await
                }
            },
            SessionInput::Probe { session, alive } => {
                if !alive {
                    if let Some(i) = self.session_index(&session) {
                        info!(session_id = %session, "a leg stopped answering; ending the session");
                        self.end(i, EndCause::Timeout, None).await;
                    }
                }
            }
            SessionInput::Shutdown => {
                self.cancelled = true;
                self.candidates.clear();
                self.cancel_pending_legs();
                if !self.a.final_sent {
                    self.refuse_a(503, "Relay shutting down");
                }
                for i in 0..self.sessions.len() {
                    match self.sessions[i].state {
                        State::Established => self.end(i, EndCause::RelayShutdown, None).await,
                        State::AwaitingAck(_) => {
                            self.ack_server(i).await;
                            self.end(i, EndCause::RelayShutdown, None).await;
                        }
                        State::Ended => {}
                    }
                }
                self.legs.clear();
            }
        }
    }

    pub(crate) fn session_index(&self, id: &str) -> Option<usize> {
        self.sessions.iter().position(|s| s.id == id)
    }

    async fn on_leg(&mut self, id: LegId, event: LegEvent) {
        // A 2xx retransmission of a leg that already became a session.
        if let LegEvent::Answered(resp) = &event {
            let cid = call_id_of(&resp.headers);
            if let Some(i) = self
                .sessions
                .iter()
                .position(|s| Some(&s.b.call_id) == cid.as_ref() && s.b.ack.is_some())
            {
                self.reack(i).await;
                return;
            }
        }
        let Some(leg) = self.legs.get_mut(&id) else {
            // A leg we stopped waiting for answered late: confirm and hang up.
            if let LegEvent::Answered(resp) = event {
                self.hang_up_stray_answer(resp).await;
            }
            return;
        };
        match event {
            LegEvent::Trying => leg.heard(&self.relay.limits),
            LegEvent::Provisional(resp) => {
                leg.provisional = true;
                leg.heard(&self.relay.limits);
                if self.cancelled {
                    // The CANCEL can go now that the leg is proceeding.
                    if let Some(leg) = self.legs.get(&id) {
                        self.cancel_leg(leg);
                    }
                    return;
                }
                if let Purpose::Initial { a_tag } = &leg.purpose {
                    if !self.a.final_sent {
                        let contact = self.relay.local(self.a.peer).contact_header();
                        let a_tag = a_tag.clone();
                        let out = b2bua::relayed_response(
                            &self.a.invite,
                            &resp,
                            Some(&a_tag),
                            Some(contact),
                        );
                        self.respond_a(out);
                    }
                }
            }
            LegEvent::Answered(resp) => {
                let Some(leg) = self.legs.remove(&id) else {
                    return;
                };
                let dialog = match Dialog::uac(&leg.invite, &resp) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, "unusable 2xx from server");
                        self.on_failure(leg, 502, None).await;
                        return;
                    }
                };
                let b = ServerLeg {
                    server: leg.server,
                    invite: leg.invite,
                    peer: leg.peer,
                    call_id: leg.call_id,
                    dialog,
                    ack: None,
                };
                match leg.purpose {
                    Purpose::Initial { a_tag } => self.on_initial_answer(b, a_tag, resp).await,
                    Purpose::Change(p) => change::on_new_server_answer(self, p, b, resp).await,
                    Purpose::Transfer(p) => transfer::on_new_server_answer(self, p, b, resp).await,
                }
            }
            LegEvent::Failed { code, resp } => {
                let Some(leg) = self.legs.remove(&id) else {
                    return;
                };
                self.on_failure(leg, code, resp).await;
            }
        }
    }

    async fn on_failure(&mut self, leg: PendingLeg, code: u16, resp: Option<Response>) {
        match leg.purpose {
            Purpose::Change(p) => {
                return change::on_new_server_failure(self, p, leg.server, code, resp).await
            }
            Purpose::Transfer(p) => {
                return transfer::on_new_server_failure(self, p, leg.server, code, resp).await
            }
            Purpose::Initial { .. } => {}
        }
        info!(server = leg.server.uri_text(), code, "server refused");
        self.failures.push((code, resp.clone()));
        if self.a.final_sent {
            return;
        }
        if self.cancelled {
            if !self
                .legs
                .values()
                .any(|l| matches!(l.purpose, Purpose::Initial { .. }))
            {
                self.refuse_a(487, "Request Terminated");
            }
            return;
        }
        if self.fork {
            let pending = self
                .legs
                .values()
                .any(|l| matches!(l.purpose, Purpose::Initial { .. }));
            if !pending && self.sessions.is_empty() {
                let best = fork::best_response(&self.failures);
                self.answer_with_failure(best);
            }
            return;
        }
        if fails_over(code) {
            self.next_candidate().await;
        } else if let Some(resp) = resp {
            // A refusal another server would give too (403, 404, 488…): relay it.
            let out =
                b2bua::relayed_response(&self.a.invite, &resp, Some(&message::new_tag()), None);
            self.respond_a(out);
        } else {
            self.refuse_a(code, message::reason_phrase(code));
        }
    }

    fn answer_with_failure(&mut self, best: Option<(u16, Option<Response>)>) {
        match best {
            // RFC 3261 §16.7 step 6: the best response itself goes to the terminal.
            Some((_, Some(resp))) => {
                let out =
                    b2bua::relayed_response(&self.a.invite, &resp, Some(&message::new_tag()), None);
                self.respond_a(out);
            }
            Some((code, _)) => self.refuse_a(
                480,
                &format!("No application server available (best answer {code})"),
            ),
            None => self.refuse_a(480, "No application server available"),
        }
    }

    async fn hang_up_stray_answer(&mut self, resp: Response) {
        // Without the leg's INVITE we cannot build a proper ACK; answer with a BYE-less
        // best effort: the server's 2xx times out (Timer L) and it ends the dialog itself.
        debug!(
            code = resp.status_code.code(),
            "late answer of a leg given up on"
        );
    }

    async fn on_initial_answer(&mut self, mut b: ServerLeg, a_tag: String, resp: Response) {
        if self.cancelled || (self.a.final_sent && !self.fork) {
            // CANCEL lost the race with the 2xx (or another candidate already answered):
            // confirm the leg and hang it up.
            self.ack_leg(&mut b).await;
            self.bye_leg(&mut b);
            if !self.a.final_sent {
                self.refuse_a(487, "Request Terminated");
            }
            return;
        }
        let local = self.relay.local(self.a.peer);
        let a_dialog = match Dialog::uas(
            &self.a.invite,
            &a_tag,
            local.contact_uri(),
            DialogState::Confirmed,
        ) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "terminal's INVITE cannot make a dialog");
                self.ack_leg(&mut b).await;
                self.bye_leg(&mut b);
                self.refuse_a(400, "Cannot establish a dialog (Contact missing?)");
                return;
            }
        };
        let answer = b2bua::relayed_response(
            &self.a.invite,
            &resp,
            Some(&a_tag),
            Some(local.contact_header()),
        );
        self.relay.directory.session_started(&b.server);
        let id = format!("s-{}", message::new_tag());
        info!(session_id = %id, server = b.server.uri_text(), "server answered");
        let offer = b2bua::carried_body(&self.a.invite);
        self.sessions.push(Session {
            id,
            a_dialog,
            b,
            service: self.adm.service.clone(),
            params: self.adm.params.clone(),
            state: State::AwaitingAck(tokio::time::Instant::now() + self.relay.limits.ack_timeout),
            pending_ack: None,
            busy: false,
            offer,
            next_probe: None,
            clock: SegmentClock::now(),
            plan: self.adm.plan.clone(),
            next_plan: None,
        });
        let i = self.sessions.len() - 1;
        // The 2xx hands the terminal the service (and its data token): the session is
        // journaled, committed, before it goes out, and billed from here whatever happens
        // next (ACK, BYE before ACK, no ACK at all).
        if let Err(e) = self.journal(i).await {
            warn!(error = %format!("{e:#}"), "cannot journal the session; refusing it");
            self.ack_server(i).await;
            self.bye(i, Side::Server);
            self.relay
                .directory
                .session_ended(&self.sessions[i].b.server);
            self.ended_unbilled(i);
            if !self.a.final_sent {
                self.refuse_a(500, "Billing unavailable");
            }
            return;
        }
        // The server may charge for the session from now on.
        self.index(i);
        // The first 2xx completes the INVITE transaction; further 2xx of a fork go out
        // through the transaction's Accepted state (RFC 6026), each with its own To tag.
        self.a.final_sent = true;
        if self.a.tx.respond(answer).is_err() {
            debug!("terminal transaction gone");
        }
    }

    /// The live session whose terminal dialog the request belongs to: its whole dialog id
    /// (Call-ID, To tag, From tag; RFC 3261 §12.2.2).
    fn session_by_a_tag(&self, req: &Request) -> Option<usize> {
        let id = DialogId::of_incoming_request(req)?;
        self.sessions
            .iter()
            .position(|s| s.a_dialog.id() == &id && s.state != State::Ended)
    }

    /// The live session whose server leg the request belongs to: its whole dialog id, and
    /// sent from the server's address. A Call-ID alone is not enough: whoever learnt one
    /// could otherwise hang up or charge someone else's session.
    fn session_by_b_call_id(&self, req: &Request, from: &Peer) -> Option<usize> {
        let id = DialogId::of_incoming_request(req)?;
        self.sessions.iter().position(|s| {
            s.state != State::Ended
                && s.b.dialog.id() == &id
                && s.b.peer.addr.ip() == from.addr.ip()
        })
    }

    pub(crate) fn is_terminal(&self, req: &Request) -> bool {
        call_id_of(&req.headers).as_deref() == Some(self.a.call_id.as_str())
    }

    async fn on_ack(&mut self, ack: Request) {
        if !self.is_terminal(&ack) {
            return; // servers have no reason to ACK us: we never answer their INVITE with 2xx
        }
        let Some(i) = self.session_by_a_tag(&ack) else {
            return;
        };
        match self.sessions[i].state {
            State::AwaitingAck(_) => {
                let (headers, body) = b2bua::carried_body(&ack);
                let s = &mut self.sessions[i];
                let local = self.relay.local(s.b.peer);
                match s
                    .b
                    .dialog
                    .ack_for_2xx(&s.b.invite, &local.via(), headers, body)
                {
                    Ok(relayed) => {
                        if let Err(e) = self
                            .relay
                            .endpoint
                            .send_stateless(&s.b.peer, relayed.clone())
                            .await
                        {
                            warn!(error = %e, "cannot relay ACK to server");
                        }
                        s.b.ack = Some(relayed);
                    }
                    Err(e) => warn!(error = %e, "cannot build ACK for the server"),
                }
                self.establish(i);
            }
            State::Established => self.relay_ack(i, ack).await,
            State::Ended => {}
        }
    }

    /// Journals session `i` in billing from its clock's start; resolves once committed.
    async fn journal(&self, i: usize) -> anyhow::Result<()> {
        let s = &self.sessions[i];
        let start = SessionStart {
            session_id: s.id.clone(),
            call_id: self.a.call_id.clone(),
            subscriber: self.adm.subscriber.clone(),
            service: s.service.clone(),
            server: s.b.server.uri_text().to_string(),
            plan: s.plan.clone(),
            confirmed_at: s.clock.started_at(),
        };
        self.relay.billing.session_confirmed(start).await
    }

    /// The terminal confirmed session `i` (its ACK, or a BYE proving it had the 2xx): in-dialog
    /// requests and probes may run. Billing started at the 2xx.
    fn establish(&mut self, i: usize) {
        let s = &mut self.sessions[i];
        s.state = State::Established;
        let interval = self.relay.limits.probe_interval;
        s.next_probe = (!interval.is_zero()).then(|| tokio::time::Instant::now() + interval);
        let s = &self.sessions[i];
        info!(session_id = %s.id, server = s.b.server.uri_text(), service = %s.service, subscriber = %self.adm.subscriber, "session established");
    }

    /// Marks session `i` over without a bill: it was never confirmed (or could not be
    /// journaled).
    fn ended_unbilled(&mut self, i: usize) {
        self.sessions[i].state = State::Ended;
        self.relay.served.remove(&self.sessions[i].id);
    }

    /// Makes session `i` findable by charge requests.
    pub(crate) fn index(&self, i: usize) {
        let s = &self.sessions[i];
        self.relay.served.insert(ServedSession {
            session_id: s.id.clone(),
            subscriber: self.adm.subscriber.clone(),
            service: s.service.clone(),
            server: s.b.server.uri_text().to_string(),
            server_call_id: s.b.call_id.clone(),
            terminal_call_id: self.a.call_id.clone(),
        });
    }

    async fn on_request(&mut self, r: IncomingRequest) {
        let from_terminal = self.is_terminal(&r.req);
        let found = if from_terminal {
            self.session_by_a_tag(&r.req)
        } else {
            self.session_by_b_call_id(&r.req, &r.from)
        };
        let Some(i) = found else {
            let code = if r.req.method == Method::Invite && !has_to_tag(&r.req) {
                482
            } else {
                481
            };
            let reason = if code == 482 {
                "Loop Detected"
            } else {
                "Call/Transaction Does Not Exist"
            };
            let _ = r.tx.respond(b2bua::local_response(
                &r.req,
                code,
                reason,
                Some(&message::new_tag()),
            ));
            return;
        };
        let side = if from_terminal {
            Side::Terminal
        } else {
            Side::Server
        };
        if r.req.method == Method::Bye {
            match self.sessions[i].state {
                State::Established => {
                    let cause = if side == Side::Terminal {
                        EndCause::CallerBye
                    } else {
                        EndCause::ServerBye
                    };
                    self.end(i, cause, Some((side, r))).await;
                }
                State::AwaitingAck(_) => {
                    // The 2xx went out, so the session was delivered and is billed from
                    // it: a BYE from the terminal proves it got the 2xx (its ACK was lost
                    // or is late, RFC 3261 §15); one from the server ends what it served.
                    self.ack_server(i).await;
                    let cause = if side == Side::Terminal {
                        EndCause::CallerBye
                    } else {
                        EndCause::ServerBye
                    };
                    self.end(i, cause, Some((side, r))).await;
                }
                State::Ended => {
                    let _ = r.tx.respond(b2bua::local_response(&r.req, 200, "OK", None));
                }
            }
            return;
        }
        if self.sessions[i].state != State::Established {
            let _ =
                r.tx.respond(b2bua::local_response(&r.req, 491, "Request Pending", None));
            return;
        }
        if side == Side::Server && r.req.method == Method::Message && charge::is_charge(&r.req) {
            // Application billing on the leg the relay set up (claim 4).
            if let Some(served) = self.relay.served.find(&self.sessions[i].id) {
                tokio::spawn(charge::handle_in_dialog(self.relay.clone(), r, served));
            }
            return;
        }
        if side == Side::Terminal && r.req.method == Method::Invite {
            if let Some(target) =
                change::requested(&r.req, &self.sessions[i].service, &self.sessions[i].params)
            {
                change::start(self, i, r, target).await;
                return;
            }
            // An offer naming another service is not a change: changes are asked with
            // P-Preferred-Service, checked and billed. Relayed, it would switch the server
            // to a service the relay goes on billing as the old one.
            if let Some(named) = change::sdp_service(&r.req.body) {
                if named != self.sessions[i].service {
                    info!(session_id = %self.sessions[i].id, service = %named, "re-INVITE offer names another service; refused");
                    let _ = r.tx.respond(b2bua::local_response(
                        &r.req,
                        488,
                        "Offer names another service (ask with P-Preferred-Service)",
                        None,
                    ));
                    return;
                }
            }
            self.sessions[i].offer = b2bua::carried_body(&r.req);
        }
        if side == Side::Terminal && r.req.method == Method::Refer {
            transfer::start(self, i, r).await;
            return;
        }
        self.relay_in_dialog(i, side, r);
    }

    /// Ends session `i`: BYE to the legs that did not send one, the record committed, then
    /// the BYE that caused it answered.
    pub(crate) async fn end(
        &mut self,
        i: usize,
        cause: EndCause,
        bye: Option<(Side, IncomingRequest)>,
    ) {
        let ended_at = self.sessions[i].clock.end_at(Instant::now());
        let initiator = bye.as_ref().map(|(side, _)| *side);
        for side in [Side::Terminal, Side::Server] {
            if Some(side) != initiator {
                self.bye(i, side);
            }
        }
        let s = &mut self.sessions[i];
        s.state = State::Ended;
        self.relay.directory.session_ended(&s.b.server);
        self.relay.served.remove(&s.id);
        let billed = self
            .relay
            .billing
            .session_ended(&s.id, cause, ended_at)
            .await;
        match &billed {
            Ok(record) => {
                info!(session_id = %s.id, duration_ms = record.duration_ms, cause = cause.as_str(), "session ended and billed")
            }
            Err(e) => {
                warn!(session_id = %s.id, error = %format!("{e:#}"), "session record not written")
            }
        }
        if let Some((_, r)) = bye {
            let resp = match billed {
                Ok(_) => b2bua::local_response(&r.req, 200, "OK", None),
                // The session stays journaled and is closed by recovery; say so.
                Err(_) => b2bua::local_response(&r.req, 500, "Billing unavailable", None),
            };
            let _ = r.tx.respond(resp);
        }
    }

    /// Closes session `i`'s billing segment with `cause` and opens a new one (a new session
    /// id) for its current service and server: a change or a transfer.
    pub(crate) async fn new_segment(&mut self, i: usize, cause: EndCause) -> anyhow::Result<()> {
        let mono = Instant::now();
        let now = self.sessions[i].clock.end_at(mono);
        let old = self.sessions[i].id.clone();
        self.relay.served.remove(&old);
        self.relay.billing.session_ended(&old, cause, now).await?;
        self.sessions[i].clock = SegmentClock::start(now, mono);
        let new_id = format!("s-{}", message::new_tag());
        if let Some(plan) = self.sessions[i].next_plan.take() {
            self.sessions[i].plan = plan;
        }
        let s = &self.sessions[i];
        let start = SessionStart {
            session_id: new_id.clone(),
            call_id: self.a.call_id.clone(),
            subscriber: self.adm.subscriber.clone(),
            service: s.service.clone(),
            server: s.b.server.uri_text().to_string(),
            plan: s.plan.clone(),
            confirmed_at: now,
        };
        self.sessions[i].id = new_id;
        self.relay.billing.session_confirmed(start).await?;
        self.index(i);
        info!(old = %old, new = %self.sessions[i].id, cause = cause.as_str(), "new billing segment");
        Ok(())
    }
}

pub(crate) fn call_id_of(headers: &rsip::Headers) -> Option<String> {
    headers.iter().find_map(|h| match h {
        Header::CallId(c) => Some(c.value().trim().to_string()),
        _ => None,
    })
}

fn to_tag_of(headers: &rsip::Headers) -> Option<String> {
    headers.iter().find_map(|h| match h {
        Header::To(to) => sip_core::fields::tag_of(to.value())
            .ok()
            .flatten()
            .map(|t| t.into_owned()),
        _ => None,
    })
}

/// Whether a request carries a To tag, i.e. belongs to a dialog (RFC 3261 §12.2).
pub(crate) fn has_to_tag(req: &Request) -> bool {
    to_tag_of(&req.headers).is_some()
}
