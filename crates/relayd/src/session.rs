//! The B2BUA session: one task per admitted INVITE, from inquiry to bill (DESIGN.md claims 1
//! and 3).
//!
//! 1. **Inquiry** — the candidates found in the directory are asked in order with an INVITE
//!    leg of the relay's own; provisional answers are relayed to the terminal, and a server
//!    that fails (no answer in time, 408, 480, 486, 5xx, 6xx) is replaced by the next. A
//!    CANCEL from the terminal cancels the server leg.
//! 2. **Response relay** — the server's 2xx (with its SDP answer untouched) is relayed to
//!    the terminal with the relay as Contact, so every in-dialog request passes through it.
//! 3. **Confirmation** — the terminal's ACK is relayed as the ACK of the server leg; the
//!    session is journaled in billing and its clock starts.
//! 4. **Disconnection** — a BYE from either side is relayed to the other; the session record
//!    is committed before the BYE is answered. A party that does not answer the relayed BYE
//!    does not hold the session open. In-dialog OPTIONS probes end a session whose terminal
//!    or server vanished (cause `timeout`).
//!
//! Everything of one session happens in its task, fed by the [`SessionTable`] through an
//! inbox, so its signalling is one place to read and no lock is shared between sessions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use billing::record::EndCause;
use rsip::prelude::*;
use rsip::{Header, Method, Request, Response};
use sip_core::dialog::{cancel_for, Dialog, DialogState};
use sip_core::endpoint::{ClientEvent, ClientTx, IncomingRequest, ServerTx};
use sip_core::{message, Peer};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::b2bua::{self, Inquiry};
use crate::billing_control::SessionStart;
use crate::charge::{self, ServedSession};
use crate::directory::{ServerRef, Strategy};
use crate::relay::Relay;

/// What the dispatcher hands to a session.
#[derive(Debug)]
pub enum SessionInput {
    /// A request on one of the session's Call-IDs (in-dialog request, or a re-sent INVITE).
    Request(IncomingRequest),
    /// A CANCEL for the terminal's INVITE.
    Cancel {
        /// The CANCEL request.
        req: Request,
        /// The CANCEL's transaction (answer 200).
        tx: ServerTx,
        /// The INVITE's transaction (answer 487 if still pending).
        invite: ServerTx,
    },
    /// An ACK for a 2xx on one of the session's Call-IDs.
    Ack(Request),
    /// A response that matched no transaction (a server re-sending its 2xx).
    Stray(Response),
    /// The result of a liveness probe of one leg.
    Probe {
        /// Which leg was probed.
        side: Side,
        /// Whether it answered.
        alive: bool,
    },
    /// The relay is shutting down: end the session now.
    Shutdown,
}

/// One of the two legs of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The terminal's leg (the relay is UAS).
    Terminal,
    /// The application server's leg (the relay is UAC).
    Server,
}

/// Routes messages to live sessions by Call-ID. Sharded, so dispatching takes one small
/// lock among many and sessions never contend with each other.
pub struct SessionTable {
    shards: Vec<Mutex<HashMap<String, mpsc::UnboundedSender<SessionInput>>>>,
}

const TABLE_SHARDS: usize = 64;

impl Default for SessionTable {
    fn default() -> Self {
        SessionTable {
            shards: (0..TABLE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }
}

impl SessionTable {
    fn shard(
        &self,
        call_id: &str,
    ) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<SessionInput>>> {
        let h = call_id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        self.shards[h % TABLE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Routes `call_id` to a session's inbox.
    pub fn insert(&self, call_id: &str, inbox: mpsc::UnboundedSender<SessionInput>) {
        self.shard(call_id).insert(call_id.to_string(), inbox);
    }

    /// Stops routing `call_id`.
    pub fn remove(&self, call_id: &str) {
        self.shard(call_id).remove(call_id);
    }

    /// The inbox of the session owning `call_id`.
    pub fn get(&self, call_id: &str) -> Option<mpsc::UnboundedSender<SessionInput>> {
        self.shard(call_id).get(call_id).cloned()
    }

    /// Hands `input` to the session owning `call_id`; gives it back when there is none.
    pub fn deliver(&self, call_id: &str, input: SessionInput) -> Result<(), SessionInput> {
        match self.get(call_id) {
            Some(tx) => tx.send(input).map_err(|e| e.0),
            None => Err(input),
        }
    }

    /// Tells every session to end (relay shutdown).
    pub fn shutdown_all(&self) {
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(|p| p.into_inner());
            for tx in map.values() {
                let _ = tx.send(SessionInput::Shutdown);
            }
        }
    }

    /// How many Call-IDs are routed (two or more per session).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no Call-ID is routed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            inquiry_timeout: Duration::from_secs(4),
            answer_timeout: Duration::from_secs(120),
            ack_timeout: Duration::from_secs(32),
            probe_interval: Duration::from_secs(30),
        }
    }
}

/// The terminal's leg.
struct TerminalLeg {
    invite: Request,
    tx: ServerTx,
    peer: Peer,
    call_id: String,
    tag: String,
    dialog: Option<Dialog>,
}

/// An application server's leg.
struct ServerLeg {
    server: ServerRef,
    invite: Request,
    peer: Peer,
    call_id: String,
    ctx: ClientTx,
    dialog: Dialog,
    ack: Option<Request>,
}

/// A re-INVITE relayed from one side whose 2xx the other side's ACK must follow.
struct PendingAck {
    /// The side whose ACK we wait for (the side that sent the re-INVITE).
    from: Side,
    /// The re-INVITE we sent on the other side.
    sent: Request,
}

struct Session {
    relay: Arc<Relay>,
    id: String,
    adm: Admission,
    inbox: mpsc::UnboundedReceiver<SessionInput>,
    me: mpsc::UnboundedSender<SessionInput>,
    a: TerminalLeg,
    routed: Vec<String>,
    pending_ack: Option<PendingAck>,
}

/// Whether a failure from a server makes the inquiry try the next candidate.
fn fails_over(code: u16) -> bool {
    matches!(code, 408 | 480 | 486 | 500..=699)
}

/// Starts the session task for an admitted INVITE.
pub fn spawn(relay: Arc<Relay>, incoming: IncomingRequest, adm: Admission) {
    let call_id = match message::Summary::of_request(&incoming.req) {
        Ok(s) => s.call_id,
        Err(_) => return,
    };
    let (me, inbox) = mpsc::unbounded_channel();
    relay.sessions.insert(&call_id, me.clone());
    let id = format!("s-{}", message::new_tag());
    let span = info_span!("session", session_id = %id, call_id = %call_id);
    let session = Session {
        relay,
        id,
        adm,
        inbox,
        me,
        a: TerminalLeg {
            invite: incoming.req,
            tx: incoming.tx,
            peer: incoming.from,
            call_id: call_id.clone(),
            tag: message::new_tag(),
            dialog: None,
        },
        routed: vec![call_id],
        pending_ack: None,
    };
    tokio::spawn(session.run().instrument(span));
}

impl Session {
    async fn run(mut self) {
        if let Some(mut b) = self.inquire().await {
            if self.wait_ack(&mut b).await {
                self.established(b).await;
            }
        }
        for call_id in &self.routed {
            self.relay.sessions.remove(call_id);
        }
    }

    fn respond_a(&self, resp: Response) {
        if self.a.tx.respond(resp).is_err() {
            debug!("terminal transaction gone");
        }
    }

    fn refuse_a(&self, code: u16, reason: &str) {
        self.respond_a(b2bua::local_response(
            &self.a.invite,
            code,
            reason,
            Some(&self.a.tag),
        ));
    }

    /// Asks the candidates in turn; returns the server leg that answered 2xx (already
    /// relayed to the terminal), or `None` when the terminal got a final failure.
    async fn inquire(&mut self) -> Option<ServerLeg> {
        let relay = self.relay.clone();
        let candidates =
            relay
                .directory
                .candidates(&self.adm.service, self.adm.strategy, Instant::now());
        if candidates.is_empty() {
            info!(service = %self.adm.service, "no application server available");
            self.refuse_a(480, "No application server available");
            return None;
        }
        let mut last: Option<u16> = None;
        for server in candidates {
            let Some(peer) = relay.resolve_server(&server).await else {
                warn!(
                    server = server.uri_text(),
                    "cannot resolve application server"
                );
                continue;
            };
            let local = relay.local(peer.transport);
            let hostport = server.uri().host_with_port.to_string();
            let invite = match b2bua::inquiry_invite(&Inquiry {
                service: &self.adm.service,
                params: &self.adm.params,
                subscriber: &self.adm.subscriber,
                realm: &relay.realm,
                server_hostport: &hostport,
                terminal_request: &self.a.invite,
                local: &local,
            }) {
                Ok(inv) => inv,
                Err(e) => {
                    warn!(error = %e, "cannot build inquiry");
                    continue;
                }
            };
            let Ok(summary) = message::Summary::of_request(&invite) else {
                continue;
            };
            relay.sessions.insert(&summary.call_id, self.me.clone());
            self.routed.push(summary.call_id.clone());
            let ctx = match relay.endpoint.send_request(invite.clone(), peer) {
                Ok(ctx) => ctx,
                Err(e) => {
                    warn!(error = %e, "cannot send inquiry");
                    continue;
                }
            };
            info!(server = server.uri_text(), service = %self.adm.service, "inquiring");
            match self
                .inquire_one(&server, invite, peer, summary.call_id, ctx)
                .await
            {
                Inquired::Answered(leg) => return Some(*leg),
                Inquired::Done => return None,
                Inquired::Failed(code) => {
                    if code == 408 {
                        relay.directory.probe_result(&server, false, Instant::now());
                    }
                    last = Some(code);
                }
            }
        }
        let reason = match last {
            Some(code) => format!("No application server available (last answer {code})"),
            None => "No application server available".to_string(),
        };
        self.refuse_a(480, &reason);
        None
    }

    async fn inquire_one(
        &mut self,
        server: &ServerRef,
        invite: Request,
        peer: Peer,
        call_id: String,
        mut ctx: ClientTx,
    ) -> Inquired {
        let limits = self.relay.limits;
        let started = tokio::time::Instant::now();
        let mut deadline = started + limits.inquiry_timeout;
        let mut cancelled = false;
        loop {
            tokio::select! {
                ev = ctx.recv() => {
                    let resp = match ev {
                        Some(ClientEvent::Response(r)) => r,
                        Some(ClientEvent::TimedOut) | None => {
                            if cancelled { self.refuse_a(487, "Request Terminated"); return Inquired::Done; }
                            return Inquired::Failed(408);
                        }
                        Some(ClientEvent::Failed(e)) => {
                            warn!(error = %e, "inquiry failed");
                            if cancelled { self.refuse_a(487, "Request Terminated"); return Inquired::Done; }
                            return Inquired::Failed(503);
                        }
                    };
                    let code = resp.status_code.code();
                    match code {
                        100..=199 => {
                            // Any answer proves the server alive: now it may ring up to the answer timeout.
                            deadline = started + limits.answer_timeout;
                            if code > 100 && !cancelled {
                                let contact = self.relay.local(self.a.peer.transport).contact_header();
                                self.respond_a(b2bua::relayed_response(&self.a.invite, &resp, Some(&self.a.tag), Some(contact)));
                            }
                        }
                        200..=299 => {
                            let dialog = match Dialog::uac(&invite, &resp) {
                                Ok(d) => d,
                                Err(e) => {
                                    warn!(error = %e, "unusable 2xx from server");
                                    return Inquired::Failed(502);
                                }
                            };
                            let mut leg = ServerLeg { server: server.clone(), invite, peer, call_id, ctx, dialog, ack: None };
                            if cancelled {
                                // CANCEL lost the race with the 2xx: confirm and hang up the leg.
                                self.ack_server(&mut leg).await;
                                self.bye(Side::Server, &mut leg);
                                self.refuse_a(487, "Request Terminated");
                                return Inquired::Done;
                            }
                            let contact = self.relay.local(self.a.peer.transport).contact_header();
                            let answer = b2bua::relayed_response(&self.a.invite, &resp, Some(&self.a.tag), Some(contact));
                            let local = self.relay.local(self.a.peer.transport).contact_uri();
                            match Dialog::uas(&self.a.invite, &self.a.tag, local, DialogState::Confirmed) {
                                Ok(d) => self.a.dialog = Some(d),
                                Err(e) => {
                                    warn!(error = %e, "terminal's INVITE cannot make a dialog");
                                    self.ack_server(&mut leg).await;
                                    self.bye(Side::Server, &mut leg);
                                    self.refuse_a(400, "Cannot establish a dialog (Contact missing?)");
                                    return Inquired::Done;
                                }
                            }
                            self.relay.directory.session_started(&leg.server);
                            info!(server = leg.server.uri_text(), "server answered");
                            self.respond_a(answer);
                            return Inquired::Answered(Box::new(leg));
                        }
                        _ => {
                            if cancelled {
                                self.refuse_a(487, "Request Terminated");
                                return Inquired::Done;
                            }
                            if fails_over(code) {
                                info!(server = server.uri_text(), code, "server refused; trying the next");
                                return Inquired::Failed(code);
                            }
                            // A refusal that another server would give too (403, 404, 488…).
                            self.respond_a(b2bua::relayed_response(&self.a.invite, &resp, Some(&self.a.tag), None));
                            return Inquired::Done;
                        }
                    }
                }
                input = self.inbox.recv() => match input {
                    Some(SessionInput::Cancel { req, tx, invite: _ }) => {
                        let _ = tx.respond(b2bua::local_response(&req, 200, "OK", None));
                        if !cancelled {
                            cancelled = true;
                            self.cancel_server(&invite, peer);
                        }
                    }
                    Some(SessionInput::Shutdown) => {
                        if !cancelled {
                            cancelled = true;
                            self.cancel_server(&invite, peer);
                        }
                    }
                    Some(SessionInput::Request(r)) => self.refuse_early(r),
                    Some(_) => {}
                    None => return Inquired::Done,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    info!(server = server.uri_text(), "no answer in time; trying the next");
                    self.cancel_server(&invite, peer);
                    if cancelled { self.refuse_a(487, "Request Terminated"); return Inquired::Done; }
                    return Inquired::Failed(408);
                }
            }
        }
    }

    /// A request on the session before it is established: the terminal cannot send in-dialog
    /// requests yet (no dialog), and the server leg has no dialog for us either.
    fn refuse_early(&self, r: IncomingRequest) {
        let code = if r.req.method == Method::Invite {
            491
        } else {
            481
        };
        let reason = if code == 491 {
            "Request Pending"
        } else {
            "Call/Transaction Does Not Exist"
        };
        let _ =
            r.tx.respond(b2bua::local_response(&r.req, code, reason, None));
    }

    fn cancel_server(&self, invite: &Request, peer: Peer) {
        match cancel_for(invite) {
            Ok(cancel) => {
                if let Err(e) = self.relay.endpoint.send_request(cancel, peer) {
                    warn!(error = %e, "cannot send CANCEL");
                }
            }
            Err(e) => warn!(error = %e, "cannot build CANCEL"),
        }
    }

    async fn ack_server(&self, leg: &mut ServerLeg) {
        let local = self.relay.local(leg.peer.transport);
        match leg
            .dialog
            .ack_for_2xx(&leg.invite, &local.via(), Vec::new(), Vec::new())
        {
            Ok(ack) => {
                if let Err(e) = self
                    .relay
                    .endpoint
                    .send_stateless(&leg.peer, ack.clone())
                    .await
                {
                    warn!(error = %e, "cannot send ACK to server");
                }
                leg.ack = Some(ack);
            }
            Err(e) => warn!(error = %e, "cannot build ACK"),
        }
    }

    /// Waits for the terminal's ACK and relays it to the server; `true` once confirmed.
    async fn wait_ack(&mut self, b: &mut ServerLeg) -> bool {
        let deadline = tokio::time::Instant::now() + self.relay.limits.ack_timeout;
        loop {
            tokio::select! {
                input = self.inbox.recv() => match input {
                    Some(SessionInput::Ack(ack)) if self.is_terminal(&ack) => {
                        let local = self.relay.local(b.peer.transport);
                        let (headers, body) = b2bua::carried_body(&ack);
                        match b.dialog.ack_for_2xx(&b.invite, &local.via(), headers, body) {
                            Ok(relayed) => {
                                if let Err(e) = self.relay.endpoint.send_stateless(&b.peer, relayed.clone()).await {
                                    warn!(error = %e, "cannot relay ACK to server");
                                }
                                b.ack = Some(relayed);
                            }
                            Err(e) => warn!(error = %e, "cannot build ACK for the server"),
                        }
                        return true;
                    }
                    Some(SessionInput::Request(r)) if r.req.method == Method::Bye => {
                        // BYE before ACK (RFC 3261 §15): end both legs; nothing was confirmed.
                        let side = if self.is_terminal(&r.req) { Side::Terminal } else { Side::Server };
                        self.ack_server(b).await;
                        if side == Side::Terminal { self.bye(Side::Server, b); } else { self.bye(Side::Terminal, b); }
                        let _ = r.tx.respond(b2bua::local_response(&r.req, 200, "OK", None));
                        self.relay.directory.session_ended(&b.server);
                        return false;
                    }
                    Some(SessionInput::Request(r)) => self.refuse_early(r),
                    Some(SessionInput::Cancel { req, tx, .. }) => {
                        // Too late: the INVITE has its final response (RFC 3261 §9.2).
                        let _ = tx.respond(b2bua::local_response(&req, 200, "OK", None));
                    }
                    Some(SessionInput::Shutdown) | None => {
                        self.ack_server(b).await;
                        self.bye(Side::Server, b);
                        self.bye(Side::Terminal, b);
                        self.relay.directory.session_ended(&b.server);
                        return false;
                    }
                    Some(_) => {}
                },
                _ = b.ctx.recv() => {} // the server re-sending its 2xx until the ACK we relay
                _ = tokio::time::sleep_until(deadline) => {
                    info!("terminal never acknowledged the 2xx; ending both legs");
                    self.ack_server(b).await;
                    self.bye(Side::Server, b);
                    self.bye(Side::Terminal, b);
                    self.relay.directory.session_ended(&b.server);
                    return false;
                }
            }
        }
    }

    fn is_terminal(&self, req: &Request) -> bool {
        req.headers.iter().any(|h| match h {
            Header::CallId(c) => c.value().trim() == self.a.call_id,
            _ => false,
        })
    }

    /// The confirmed session: relays in-dialog traffic until a BYE, a failed probe or
    /// shutdown ends it, then bills it.
    async fn established(&mut self, mut b: ServerLeg) {
        let confirmed_at = SystemTime::now();
        let start = SessionStart {
            session_id: self.id.clone(),
            call_id: self.a.call_id.clone(),
            subscriber: self.adm.subscriber.clone(),
            service: self.adm.service.clone(),
            server: b.server.uri_text().to_string(),
            plan: self.adm.plan.clone(),
            confirmed_at,
        };
        if let Err(e) = self.relay.billing.session_confirmed(start).await {
            // A session that cannot be billed is not delivered.
            warn!(error = %format!("{e:#}"), "cannot journal the session; ending it");
            self.bye(Side::Server, &mut b);
            self.bye(Side::Terminal, &mut b);
            self.relay.directory.session_ended(&b.server);
            return;
        }
        self.relay.served.insert(ServedSession {
            session_id: self.id.clone(),
            subscriber: self.adm.subscriber.clone(),
            service: self.adm.service.clone(),
            server: b.server.uri_text().to_string(),
            server_call_id: b.call_id.clone(),
            terminal_call_id: self.a.call_id.clone(),
        });
        info!(server = b.server.uri_text(), service = %self.adm.service, subscriber = %self.adm.subscriber, "session established");
        let interval = self.relay.limits.probe_interval;
        let probing = !interval.is_zero();
        let mut probe = tokio::time::interval_at(
            tokio::time::Instant::now() + interval.max(Duration::from_millis(1)),
            interval.max(Duration::from_millis(1)),
        );
        loop {
            tokio::select! {
                input = self.inbox.recv() => {
                    let Some(input) = input else { return };
                    match input {
                        SessionInput::Request(r) => {
                            let side = if self.is_terminal(&r.req) { Side::Terminal } else { Side::Server };
                            if r.req.method == Method::Bye {
                                let cause = if side == Side::Terminal { EndCause::CallerBye } else { EndCause::ServerBye };
                                self.end(&mut b, cause, Some((side, r))).await;
                                return;
                            }
                            if side == Side::Server && r.req.method == Method::Message && charge::is_charge(&r.req) {
                                // Application billing on the leg the relay set up (claim 4).
                                if let Some(served) = self.relay.served.find(&self.id) {
                                    tokio::spawn(charge::handle_in_dialog(self.relay.clone(), r, served));
                                }
                                continue;
                            }
                            self.relay_in_dialog(&mut b, side, r);
                        }
                        SessionInput::Ack(ack) => self.relay_ack(&mut b, ack).await,
                        SessionInput::Stray(resp) => {
                            // The server re-sent its 2xx: our ACK was lost.
                            if resp.status_code.code() / 100 == 2 {
                                if let Some(ack) = b.ack.clone() {
                                    let _ = self.relay.endpoint.send_stateless(&b.peer, ack).await;
                                }
                            }
                        }
                        SessionInput::Cancel { req, tx, .. } => {
                            let _ = tx.respond(b2bua::local_response(&req, 200, "OK", None));
                        }
                        SessionInput::Probe { side, alive } => {
                            if !alive {
                                info!(?side, "leg stopped answering; ending the session");
                                self.end(&mut b, EndCause::Timeout, None).await;
                                return;
                            }
                        }
                        SessionInput::Shutdown => {
                            self.end(&mut b, EndCause::RelayShutdown, None).await;
                            return;
                        }
                    }
                }
                ev = b.ctx.recv() => {
                    if let Some(ClientEvent::Response(resp)) = ev {
                        if resp.status_code.code() / 100 == 2 {
                            if let Some(ack) = b.ack.clone() {
                                let _ = self.relay.endpoint.send_stateless(&b.peer, ack).await;
                            }
                        }
                    }
                }
                _ = probe.tick(), if probing => self.probe(&mut b),
            }
        }
    }

    /// Sends an in-dialog OPTIONS on each leg; the answers come back as [`SessionInput::Probe`].
    fn probe(&mut self, b: &mut ServerLeg) {
        for side in [Side::Terminal, Side::Server] {
            let Some((req, peer)) =
                self.build_request(side, b, Method::Options, Vec::new(), Vec::new())
            else {
                continue;
            };
            let Ok(mut ctx) = self.relay.endpoint.send_request(req, peer) else {
                continue;
            };
            let me = self.me.clone();
            tokio::spawn(async move {
                let resp = ctx.final_response().await;
                let alive = !matches!(resp.status_code.code(), 408 | 481);
                let _ = me.send(SessionInput::Probe { side, alive });
            });
        }
    }

    /// Builds a request on one leg's dialog with the relay's Via for that leg.
    fn build_request(
        &mut self,
        side: Side,
        b: &mut ServerLeg,
        method: Method,
        extra: Vec<Header>,
        body: Vec<u8>,
    ) -> Option<(Request, Peer)> {
        let (dialog, peer) = match side {
            Side::Terminal => (self.a.dialog.as_mut()?, self.a.peer),
            Side::Server => (&mut b.dialog, b.peer),
        };
        let local = self.relay.local(peer.transport);
        match dialog.request(method, &local.via(), extra, body) {
            Ok(req) => Some((req, peer)),
            Err(e) => {
                warn!(error = %e, "cannot build in-dialog request");
                None
            }
        }
    }

    /// Relays an in-dialog request (re-INVITE, INFO, OPTIONS, UPDATE, MESSAGE, NOTIFY…) to
    /// the other leg and its final answer back.
    fn relay_in_dialog(&mut self, b: &mut ServerLeg, from: Side, r: IncomingRequest) {
        let dialog = match from {
            Side::Terminal => self.a.dialog.as_mut(),
            Side::Server => Some(&mut b.dialog),
        };
        if let Some(dialog) = dialog {
            if let Err(e) = dialog.check_remote_cseq(&r.req) {
                debug!(error = %e, "in-dialog request out of order");
                let _ = r.tx.respond(b2bua::local_response(
                    &r.req,
                    500,
                    "CSeq out of order",
                    None,
                ));
                return;
            }
        }
        let to = match from {
            Side::Terminal => Side::Server,
            Side::Server => Side::Terminal,
        };
        let (mut extra, body) = b2bua::carried_body(&r.req);
        for h in r.req.headers.iter() {
            if let Header::Other(name, _) = h {
                if [
                    "Event",
                    "Subscription-State",
                    "Refer-To",
                    "Referred-By",
                    "P-Preferred-Service",
                ]
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n))
                {
                    extra.push(h.clone());
                }
            }
            if matches!(h, Header::Event(_) | Header::SubscriptionState(_)) {
                extra.push(h.clone());
            }
        }
        let method = r.req.method;
        let Some((req, peer)) = self.build_request(to, b, method, extra, body) else {
            let _ = r.tx.respond(b2bua::local_response(
                &r.req,
                500,
                "Cannot relay the request",
                None,
            ));
            return;
        };
        if method == Method::Invite {
            self.pending_ack = Some(PendingAck {
                from,
                sent: req.clone(),
            });
        }
        let contact = self.relay.local(r.from.transport).contact_header();
        let ctx = self.relay.endpoint.send_request(req, peer);
        tokio::spawn(async move {
            let resp = match ctx {
                Ok(mut ctx) => ctx.final_response().await,
                Err(e) => {
                    let _ = r.tx.respond(b2bua::local_response(
                        &r.req,
                        500,
                        &format!("Cannot relay: {e}"),
                        None,
                    ));
                    return;
                }
            };
            let contact = (method == Method::Invite).then_some(contact);
            let _ =
                r.tx.respond(b2bua::relayed_response(&r.req, &resp, None, contact));
        });
    }

    /// Relays the ACK for a relayed re-INVITE's 2xx; ignores re-sent ACKs of the initial INVITE.
    async fn relay_ack(&mut self, b: &mut ServerLeg, ack: Request) {
        let from = if self.is_terminal(&ack) {
            Side::Terminal
        } else {
            Side::Server
        };
        let Some(pending) = self.pending_ack.take() else {
            return;
        };
        if pending.from != from {
            self.pending_ack = Some(pending);
            return;
        }
        let (headers, body) = b2bua::carried_body(&ack);
        let (dialog, peer) = match from {
            Side::Terminal => (&b.dialog, b.peer),
            Side::Server => match self.a.dialog.as_ref() {
                Some(d) => (d, self.a.peer),
                None => return,
            },
        };
        let local = self.relay.local(peer.transport);
        match dialog.ack_for_2xx(&pending.sent, &local.via(), headers, body) {
            Ok(relayed) => {
                let _ = self.relay.endpoint.send_stateless(&peer, relayed).await;
            }
            Err(e) => warn!(error = %e, "cannot relay ACK"),
        }
    }

    /// Sends BYE on one leg without waiting for its answer: a party that does not answer does
    /// not keep the session open (the transaction retransmits and times out on its own).
    fn bye(&mut self, side: Side, b: &mut ServerLeg) {
        if let Some((req, peer)) = self.build_request(side, b, Method::Bye, Vec::new(), Vec::new())
        {
            match self.relay.endpoint.send_request(req, peer) {
                Ok(ctx) => {
                    tokio::spawn(async move {
                        let mut ctx = ctx;
                        let resp = ctx.final_response().await;
                        debug!(?side, code = resp.status_code.code(), "BYE answered");
                    });
                }
                Err(e) => warn!(error = %e, "cannot send BYE"),
            }
        }
    }

    /// Ends the session: BYE to the legs that did not send one, the record committed, then the
    /// BYE that caused it answered.
    async fn end(
        &mut self,
        b: &mut ServerLeg,
        cause: EndCause,
        bye: Option<(Side, IncomingRequest)>,
    ) {
        let ended_at = SystemTime::now();
        let initiator = bye.as_ref().map(|(side, _)| *side);
        for side in [Side::Terminal, Side::Server] {
            if Some(side) != initiator {
                self.bye(side, b);
            }
        }
        self.relay.directory.session_ended(&b.server);
        self.relay.served.remove(&self.id);
        let billed = self
            .relay
            .billing
            .session_ended(&self.id, cause, ended_at)
            .await;
        match &billed {
            Ok(record) => info!(
                duration_ms = record.duration_ms,
                cause = cause.as_str(),
                "session ended and billed"
            ),
            Err(e) => warn!(error = %format!("{e:#}"), "session record not written"),
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
}

enum Inquired {
    Answered(Box<ServerLeg>),
    Failed(u16),
    Done,
}
