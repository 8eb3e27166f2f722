//! The agent's SIP user agent and its live sessions: one place that reads the relay's
//! requests and the data gateway's events and keeps every session's dialog, service,
//! token and data connection.
//!
//! A session is keyed by the Call-ID of the relay's leg (the relay is a B2BUA: every leg
//! has its own). Its life:
//! * **INVITE** from the relay (anything else from elsewhere gets `403`): decided by
//!   [`inquiry::decide`]; yes is a `200` with the SDP answer and a token issued to the data
//!   gateway at once (a terminal may connect before the ACK reaches us), no is the refusal's
//!   code and reason. The session counts against capacity from the 200 on.
//! * **ACK**: the session is live.
//! * **re-INVITE**: [`inquiry::decide_change`]; yes is a `200` with a new answer (a new token
//!   for a new data connection, which replaces the old one once it is used, or
//!   `a=connection:existing` when the terminal keeps its connection), no is a refusal that
//!   leaves the session as it was.
//! * **Session timer** (RFC 4028): the relay asks for one on its INVITE; the agent grants
//!   it with the relay as refresher (an interval under `[sessions] min_se_secs` gets `422`
//!   with `Min-SE`, a longer one than `session_expires_secs` is reduced), and every 2xx
//!   to a re-INVITE or UPDATE renews it. A session the relay stops refreshing (it crashed)
//!   is ended `min(32 s, SE/3)` before the interval runs out (§10): BYE, the application
//!   server told (`session-expired`), its capacity freed. The agent never refreshes itself:
//!   a relay asking it to (`refresher=uas`, or no `Supported: timer`) gets no timer.
//! * **In-dialog requests for dialogs the agent does not know** (OPTIONS, BYE, re-INVITE,
//!   UPDATE, MESSAGE…) get `481`, so that the relay's probes and refreshes notice a session
//!   the agent lost (RFC 3261 §12.2.2).
//! * **BYE** from the relay: `200`, the data connection is closed and the tokens revoked. A
//!   `Reason` header naming `transferred` or `changed` tells that the relay moved the session
//!   to another server.
//! * The **data connection ends** from the application side (the backend closed, a side
//!   failed), its token **expires unused**, or the **application server hangs up**
//!   ([`Command::HangUp`]): the agent sends BYE. A BYE waits for the ACK of our 2xx
//!   (RFC 3261 §15) or the ACK's timeout.
//! * **Shutdown**: every session is ended with BYE; new INVITEs get `503`.
//!
//! Every step is told as a [`SessionEvent`] on the core's broadcast channel; the application
//! server's [`Command`]s (list, look up, hang up) arrive on the core's command channel, so the
//! sessions keep one owner. Sessions that ended stay known for [`RECENT_GRACE`] (subscriber
//! only), so that a charge for a session that just ended still finds it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rsip::prelude::*;
use rsip::{Header, Method, Request, Response};
use sip_core::dialog::session_timer::{self, Negotiated, UasAnswer};
use sip_core::dialog::{Dialog, DialogId, DialogState, ViaSpec};
use sip_core::endpoint::{Endpoint, EndpointEvent, IncomingRequest, ServerTx};
use sip_core::message;
use sip_core::resolve::{self, SystemDns};
use sip_core::sdp::{new_session_token, AppSdp, Connection};
use sip_core::uri::Uri;
use sip_core::Peer;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::charging::ChargeSink;
use crate::config::Config;
use crate::events::{now_ms, EndCause, SessionEvent, SessionInfo, SessionState};
use crate::gateway::{
    Billing, Binding, CloseSignal, Counters, GatewayEvent, TokenTable, DRAIN_LIMIT,
};
use crate::inflight::InFlight;
use crate::inquiry::{self, Accepted, Load, Params, Refusal, RelaySources};
use crate::preamble::{param_map, SessionContext};
use crate::registration::{RegistrationHandle, USER_AGENT};

/// The methods we answer, for `Allow`.
const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE";
/// How often expired tokens are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long our BYE waits for the session's charges to be answered, so that they reach
/// the relay while it still holds the session.
const CHARGE_SETTLE: Duration = Duration::from_secs(3);
/// How long an ended session stays known to charges (the relay's default
/// `late_charge_grace_secs`).
pub const RECENT_GRACE: Duration = Duration::from_secs(600);
/// The most ended sessions remembered at once.
const RECENT_MAX: usize = 100_000;

/// The relay's final answer to our BYE (`None`: the session ended otherwise before our BYE
/// went out), or why there is none.
pub type HangUpResult = Result<Option<u16>, HangUpError>;

/// Why a hang-up asked by the application server did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HangUpError {
    /// No live session has this id.
    #[error("no live session {0:?}")]
    NotFound(String),
    /// The BYE could not be built or sent.
    #[error("the BYE could not be sent: {0}")]
    Bye(String),
    /// The agent is stopping.
    #[error("the agent is shutting down")]
    Stopped,
}

/// A session as a charge needs it.
#[derive(Debug, Clone)]
pub struct SessionRef {
    /// The subscriber the relay asserted.
    pub subscriber: String,
    /// Its charges not yet answered, while the session is live (`None` once it ended): a
    /// charge counted there holds the session's BYE back a little, so that it reaches the
    /// relay while the relay still holds the session.
    pub outstanding: Option<Arc<InFlight>>,
}

/// What the application server asks of the session core.
#[derive(Debug)]
pub enum Command {
    /// The live sessions.
    List {
        /// Where the answer goes.
        reply: oneshot::Sender<Vec<SessionInfo>>,
    },
    /// One session, live or ended within [`RECENT_GRACE`], for a charge.
    Lookup {
        /// Its id.
        session_id: String,
        /// Where the answer goes.
        reply: oneshot::Sender<Option<SessionRef>>,
    },
    /// End a live session with BYE.
    HangUp {
        /// Its id.
        session_id: String,
        /// Why, for the BYE's `Reason` and the logs.
        reason: String,
        /// Told once the relay answered the BYE.
        reply: oneshot::Sender<HangUpResult>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// 200 sent, ACK not yet received.
    Pending,
    /// ACKed.
    Live,
}

#[derive(Debug)]
struct Session {
    dialog: Dialog,
    service: String,
    subscriber: String,
    /// The service parameters the relay asserted.
    params: Params,
    state: State,
    /// The last INVITE (initial or re-INVITE) answered with a 2xx.
    invite_tx: ServerTx,
    /// Where the INVITE came from: the fallback target for our BYE.
    peer: Peer,
    /// The last SDP answer sent.
    answer: AppSdp,
    counters: Arc<Counters>,
    /// Its charges the relay has not answered yet.
    outstanding: Arc<InFlight>,
    /// The data connection whose token is out and unused.
    pending_slot: Option<(u64, String)>,
    /// The data connection carrying bytes.
    active_slot: Option<u64>,
    /// Closing signals of the session's data connections.
    closers: HashMap<u64, watch::Sender<CloseSignal>>,
    /// Its data connections still open (the BYE waits for a drain to finish).
    connections: Arc<InFlight>,
    started: Instant,
    started_ms: u64,
    /// The terminal's address on the data connection carrying bytes.
    terminal: Option<SocketAddr>,
    /// Set when the session must end but our 2xx is not ACKed yet.
    ending: Option<(EndCause, String)>,
    /// The application server waiting for this session's BYE to be answered.
    hang_up: Option<oneshot::Sender<HangUpResult>>,
    /// The session timer agreed with the relay (RFC 4028), the relay refreshing.
    timer: Option<Negotiated>,
    /// The last refresh: the INVITE's 200, then each 2xx to a re-INVITE or UPDATE.
    refreshed_at: Instant,
}

impl Session {
    /// When the session is over unless the relay refreshes it (RFC 4028 §10: the side
    /// that does not refresh gives up `min(32 s, SE/3)` before the interval ends).
    fn expires_at(&self) -> Option<Instant> {
        self.timer
            .map(|n| self.refreshed_at + session_timer::expiry_guard(n.secs))
    }
}

impl Session {
    fn close_slot(&mut self, slot: u64) {
        if let Some(closer) = self.closers.remove(&slot) {
            closer.send_replace(CloseSignal::Now);
        }
    }

    /// Closes every data connection: `Drain` lets the backend's last bytes through first.
    /// The signals stay with the session (a drained connection waits for `Now`).
    fn close_all(&mut self, how: CloseSignal) {
        for closer in self.closers.values() {
            closer.send_replace(how);
        }
        self.pending_slot = None;
        self.active_slot = None;
    }

    fn info(&self, session_id: &str) -> SessionInfo {
        SessionInfo {
            session_id: session_id.to_string(),
            subscriber: self.subscriber.clone(),
            service: self.service.clone(),
            params: param_map(&self.params),
            state: match self.state {
                State::Pending => SessionState::Pending,
                State::Live => SessionState::Live,
            },
            terminal: self.terminal,
            started_at_ms: self.started_ms,
            bytes_in: self.counters.bytes_in(),
            bytes_out: self.counters.bytes_out(),
        }
    }
}

/// Sessions that ended lately, by id: their subscriber, for late charges.
#[derive(Debug, Default)]
struct Recent {
    by_id: HashMap<String, String>,
    order: VecDeque<(Instant, String)>,
}

impl Recent {
    fn insert(&mut self, now: Instant, session_id: &str, subscriber: &str) {
        self.forget_expired(now);
        if self.order.len() >= RECENT_MAX {
            if let Some((_, old)) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        self.by_id
            .insert(session_id.to_string(), subscriber.to_string());
        self.order.push_back((now, session_id.to_string()));
    }

    fn forget_expired(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < RECENT_GRACE {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.by_id.remove(&id);
            }
        }
    }
}

/// What the core needs from the rest of the agent.
pub struct CoreParts {
    /// The configuration.
    pub config: Arc<Config>,
    /// The SIP endpoint.
    pub endpoint: Endpoint,
    /// Whom to accept requests from.
    pub relay: RelaySources,
    /// The registration task's handle.
    pub registration: RegistrationHandle,
    /// The data gateway's tokens.
    pub tokens: Arc<TokenTable>,
    /// Where charges go (`None`: billing off).
    pub charges: Option<ChargeSink>,
    /// Our Contact URI for dialogs (sip-core's: an IPv6 host in brackets).
    pub contact: Uri,
    /// Our `host:port` for Via headers.
    pub sent_by: String,
    /// The data gateway address written in SDP answers.
    pub data_addr: SocketAddr,
    /// Where session events go.
    pub events: broadcast::Sender<SessionEvent>,
}

/// The session core.
pub struct Core {
    parts: CoreParts,
    sessions: HashMap<String, Session>,
    recent: Recent,
    load: Load,
    next_slot: u64,
    byes: JoinSet<()>,
    accepting: bool,
}

impl Core {
    /// A core with no session.
    pub fn new(parts: CoreParts) -> Core {
        Core {
            parts,
            sessions: HashMap::new(),
            recent: Recent::default(),
            load: Load::default(),
            next_slot: 1,
            byes: JoinSet::new(),
            accepting: true,
        }
    }

    /// Serves SIP and gateway events and the application server's commands until
    /// `shutdown` turns true; then ends every session with BYE and waits up to `bye_timeout`
    /// for the relay's answers.
    pub async fn run(
        mut self,
        mut sip: mpsc::Receiver<EndpointEvent>,
        mut gateway: mpsc::UnboundedReceiver<GatewayEvent>,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
        bye_timeout: Duration,
    ) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = sip.recv() => match event {
                    Some(event) => self.on_sip(event),
                    None => break,
                },
                Some(event) = gateway.recv() => self.on_gateway(event),
                Some(command) = commands.recv() => self.on_command(command),
                _ = sweep.tick() => self.on_sweep(Instant::now()),
                Some(_) = self.byes.join_next(), if !self.byes.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        self.accepting = false;
        let ids: Vec<String> = self.sessions.keys().cloned().collect();
        if !ids.is_empty() {
            info!(sessions = ids.len(), "ending live sessions");
        }
        for id in ids {
            self.end(&id, EndCause::Shutdown, "agent shutting down", true);
        }
        commands.close();
        while let Ok(command) = commands.try_recv() {
            self.on_command(command);
        }
        let deadline = tokio::time::Instant::now() + bye_timeout;
        while !self.byes.is_empty() || self.sessions.values().any(|s| s.ending.is_some()) {
            tokio::select! {
                Some(_) = self.byes.join_next(), if !self.byes.is_empty() => {}
                Some(event) = sip.recv() => self.on_sip(event),
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(left = self.byes.len(), "shutdown: not every BYE was answered in time");
                    break;
                }
            }
        }
    }

    fn on_sip(&mut self, event: EndpointEvent) {
        match event {
            EndpointEvent::Request(r) => self.on_request(r),
            EndpointEvent::Ack { ack, from } => self.on_ack(&ack, &from),
            EndpointEvent::Cancel {
                req, tx, invite, ..
            } => {
                respond(&tx, reply(&req, 200, None, None));
                // Our INVITEs are answered at once: a CANCEL only finds one still open if the
                // answer is being built, and a 2xx already sent wins (RFC 3261 §9.2).
                if !self.sessions.values().any(|s| s.invite_tx == invite) {
                    let _ = invite.respond(reply(&req, 487, None, Some(&message::new_tag())));
                }
            }
            EndpointEvent::AckTimeout { tx } => {
                let id = self
                    .sessions
                    .iter()
                    .find(|(_, s)| s.invite_tx == tx)
                    .map(|(id, _)| id.clone());
                if let Some(id) = id {
                    warn!(call_id = %id, "no ACK for our 2xx");
                    if let Some(s) = self.sessions.get_mut(&id) {
                        // The transaction is over: a BYE may go now (RFC 3261 §15).
                        s.state = State::Live;
                    }
                    self.end(&id, EndCause::NoAck, "no ACK", true);
                }
            }
            EndpointEvent::StrayResponse { resp, from } => {
                debug!(%from, status = resp.status_code.code(), "stray response ignored");
            }
        }
    }

    fn on_request(&mut self, r: IncomingRequest) {
        let IncomingRequest { req, from, tx, .. } = r;
        let call_id = call_id_of(&req);
        let in_dialog = DialogId::of_incoming_request(&req).is_some();
        if in_dialog && req.method != Method::Ack && self.dialog_of(&req).is_none() {
            // A dialog we do not know (never had, or lost in a restart): 481, never 200, so
            // that the relay's probes and refreshes end a session we no longer hold.
            debug!(%call_id, %from, method = %req.method, "in-dialog request for no session: 481");
            respond(&tx, reply(&req, 481, None, None));
            return;
        }
        if req.method == Method::Options {
            let mut resp = reply(&req, 200, None, Some(&message::new_tag()));
            resp.headers.push(Header::Accept(rsip::headers::Accept::new(
                "application/sdp",
            )));
            respond(&tx, resp);
            if self.parts.config.relay.register
                && self.parts.relay.allows(&from)
                && !self.parts.registration.is_registered()
            {
                info!("probed by the relay while not registered: registering now");
                self.parts.registration.kick();
            }
            return;
        }
        if !self.parts.relay.allows(&from) {
            warn!(%call_id, %from, method = %req.method, "request from outside the relay refused");
            respond(
                &tx,
                reply(
                    &req,
                    403,
                    Some("Only the relay may send requests"),
                    Some(&message::new_tag()),
                ),
            );
            return;
        }
        match (req.method, in_dialog) {
            (Method::Invite, false) => self.on_invite(req, from, tx, call_id),
            (Method::Invite, true) => self.on_reinvite(req, tx, call_id),
            (Method::Update, true) => self.on_update(req, tx),
            (Method::Bye, true) => self.on_bye(req, tx, call_id),
            (Method::Bye, false) => respond(&tx, reply(&req, 481, None, Some(&message::new_tag()))),
            (_, true) if self.dialog_of(&req).is_none() => {
                respond(&tx, reply(&req, 481, None, None));
            }
            (_, in_dialog) => {
                let tag = (!in_dialog).then(message::new_tag);
                let mut resp = reply(&req, 405, None, tag.as_deref());
                resp.headers
                    .push(Header::Allow(rsip::headers::Allow::new(ALLOW)));
                respond(&tx, resp);
            }
        }
    }

    /// The session an in-dialog request belongs to (Call-ID and both tags match).
    fn dialog_of(&self, req: &Request) -> Option<&str> {
        let id = DialogId::of_incoming_request(req)?;
        let (key, s) = self.sessions.get_key_value(&id.call_id)?;
        (s.dialog.id() == id).then_some(key.as_str())
    }

    fn on_invite(&mut self, req: Request, from: Peer, tx: ServerTx, call_id: String) {
        let tag = message::new_tag();
        if !self.accepting {
            respond(&tx, reply(&req, 503, Some("Shutting down"), Some(&tag)));
            return;
        }
        if self.sessions.contains_key(&call_id) {
            respond(
                &tx,
                reply(&req, 482, Some("Call-ID already in use"), Some(&tag)),
            );
            return;
        }
        let timer = match self.timer_for(&req) {
            Ok(timer) => timer,
            Err(resp) => {
                info!(%call_id, "session interval too small: 422");
                respond(&tx, with_tag(resp, &tag));
                return;
            }
        };
        let accepted = match inquiry::decide(&req, &self.parts.config, &self.load) {
            Ok(a) => a,
            Err(refusal) => {
                info!(%call_id, code = refusal.code, reason = %refusal.reason, "inquiry refused");
                respond(&tx, refusal_reply(&req, &refusal, Some(&tag)));
                return;
            }
        };
        let dialog = match Dialog::uas(
            &req,
            &tag,
            self.parts.contact.to_rsip(),
            DialogState::Confirmed,
        ) {
            Ok(d) => d,
            Err(e) => {
                let refusal = Refusal {
                    code: 400,
                    reason: format!("Cannot make a dialog: {e}"),
                };
                respond(&tx, refusal_reply(&req, &refusal, Some(&tag)));
                return;
            }
        };
        let counters = Arc::new(Counters::default());
        let outstanding = Arc::new(InFlight::default());
        let connections = Arc::new(InFlight::default());
        let (slot, token, closer) =
            self.issue(&call_id, &accepted, &counters, &outstanding, &connections);
        let mut answer = inquiry::answer(
            self.parts.data_addr,
            Some(&token),
            &accepted.service.name,
            None,
        );
        // With TLS to the relay the data gateway speaks only TLS: say so (TCP/TLS).
        answer.tls = self.parts.config.tls.is_some();
        let ok = ok_reply(&req, &tag, &self.parts.contact, &answer, timer.as_ref());
        if let Err(e) = tx.respond(ok) {
            warn!(%call_id, error = %e, "cannot answer the inquiry");
            self.parts.tokens.revoke_call(&call_id);
            return;
        }
        info!(
            %call_id,
            service = %accepted.service.name,
            subscriber = %accepted.subscriber,
            params = ?accepted.params,
            "inquiry accepted"
        );
        self.load.add(&accepted.service.name);
        let started_ms = now_ms();
        self.emit(SessionEvent::Started {
            session_id: call_id.clone(),
            subscriber: accepted.subscriber.clone(),
            service: accepted.service.name.clone(),
            params: param_map(&accepted.params),
            at_ms: started_ms,
        });
        self.sessions.insert(
            call_id,
            Session {
                dialog,
                service: accepted.service.name,
                subscriber: accepted.subscriber,
                params: accepted.params,
                state: State::Pending,
                invite_tx: tx,
                peer: from,
                answer,
                counters,
                outstanding,
                pending_slot: Some((slot, token)),
                active_slot: None,
                closers: HashMap::from([(slot, closer)]),
                connections,
                started: Instant::now(),
                started_ms,
                terminal: None,
                ending: None,
                hang_up: None,
                timer,
                refreshed_at: Instant::now(),
            },
        );
    }

    fn emit(&self, event: SessionEvent) {
        // No subscriber is fine: nobody listens.
        let _ = self.parts.events.send(event);
    }

    /// Hands the data gateway a token for a new data connection of a session.
    fn issue(
        &mut self,
        call_id: &str,
        accepted: &Accepted,
        counters: &Arc<Counters>,
        outstanding: &Arc<InFlight>,
        connections: &Arc<InFlight>,
    ) -> (u64, String, watch::Sender<CloseSignal>) {
        let slot = self.next_slot;
        self.next_slot += 1;
        let token = new_session_token();
        let (closer, close) = watch::channel(CloseSignal::Open);
        let billing = match (
            &self.parts.charges,
            self.parts.config.billing.bytes_per_charge,
        ) {
            (Some(sink), block) if block > 0 => Some(Billing {
                block,
                sink: sink.clone(),
                subscriber: accepted.subscriber.clone(),
                service: accepted.service.name.clone(),
                outstanding: outstanding.clone(),
            }),
            _ => None,
        };
        let binding = Binding {
            call_id: call_id.to_string(),
            slot,
            backend: accepted.service.backend.clone(),
            preamble: accepted.service.preamble,
            context: Arc::new(SessionContext {
                session_id: call_id.to_string(),
                subscriber: accepted.subscriber.clone(),
                service: accepted.service.name.clone(),
                params: accepted.params.clone(),
            }),
            counters: counters.clone(),
            close,
            open: connections.clone(),
            billing,
        };
        self.parts
            .tokens
            .issue(token.clone(), binding, Instant::now());
        (slot, token, closer)
    }

    fn on_ack(&mut self, ack: &Request, from: &Peer) {
        let Some(id) = self.dialog_of(ack).map(str::to_string) else {
            debug!(%from, "ACK for no session");
            return;
        };
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.state == State::Pending {
            s.state = State::Live;
            info!(call_id = %id, service = %s.service, subscriber = %s.subscriber, "session established");
            if let Some((cause, reason)) = s.ending.take() {
                self.end(&id, cause, &reason, true);
            }
        }
    }

    fn on_reinvite(&mut self, req: Request, tx: ServerTx, call_id: String) {
        let Some(id) = self.dialog_of(&req).map(str::to_string) else {
            respond(&tx, reply(&req, 481, None, None));
            return;
        };
        let config = self.parts.config.clone();
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.state == State::Pending || s.ending.is_some() {
            respond(&tx, reply(&req, 491, None, None));
            return;
        }
        if let Err(e) = s.dialog.check_remote_cseq(&req) {
            respond(&tx, reply(&req, 500, Some(&e.to_string()), None));
            return;
        }
        let timer = match self.timer_for(&req) {
            Ok(timer) => timer,
            Err(resp) => {
                respond(&tx, resp);
                return;
            }
        };
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let accepted = match inquiry::decide_change(
            &req,
            &s.service,
            &s.subscriber,
            &config,
            &self.load,
        ) {
            Ok(a) => a,
            Err(refusal) => {
                info!(%call_id, code = refusal.code, reason = %refusal.reason, "change refused; session unchanged");
                respond(&tx, refusal_reply(&req, &refusal, None));
                return;
            }
        };
        let _ = s.dialog.refresh_from_request(&req);
        let changed = accepted.service.name != s.service;
        let keeps_connection = !changed
            && s.active_slot.is_some()
            && accepted
                .offer
                .as_ref()
                .is_none_or(|o| o.connection == Some(Connection::Existing));
        let counters = s.counters.clone();
        let outstanding = s.outstanding.clone();
        let connections = s.connections.clone();
        let previous = s.answer.clone();
        let answer = if keeps_connection {
            inquiry::answer(
                self.parts.data_addr,
                None,
                &accepted.service.name,
                Some(&previous),
            )
        } else {
            let (slot, token, closer) =
                self.issue(&id, &accepted, &counters, &outstanding, &connections);
            let answer = inquiry::answer(
                self.parts.data_addr,
                Some(&token),
                &accepted.service.name,
                Some(&previous),
            );
            let Some(s) = self.sessions.get_mut(&id) else {
                return;
            };
            if let Some((old, _)) = s.pending_slot.replace((slot, token)) {
                // A token handed out by an earlier re-INVITE and never used: withdrawn.
                s.close_slot(old);
            }
            s.closers.insert(slot, closer);
            answer
        };
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let tag = s.dialog.id().local_tag.to_owned();
        // A re-INVITE refreshes the session (RFC 4028 §10); one without the extension's
        // fields leaves the interval as it was.
        let timer = timer.or(s.timer);
        let ok = ok_reply(&req, &tag, &self.parts.contact, &answer, timer.as_ref());
        if let Err(e) = tx.respond(ok) {
            warn!(%call_id, error = %e, "cannot answer the re-INVITE");
            return;
        }
        s.timer = timer;
        s.refreshed_at = Instant::now();
        if changed {
            info!(%call_id, from = %s.service, to = %accepted.service.name, "service changed");
            self.load.switch(&s.service, &accepted.service.name);
            let event = SessionEvent::Changed {
                session_id: id.clone(),
                from: std::mem::replace(&mut s.service, accepted.service.name),
                to: s.service.clone(),
                params: param_map(&accepted.params),
                at_ms: now_ms(),
            };
            s.params = accepted.params;
            let _ = self.parts.events.send(event);
        } else {
            info!(%call_id, service = %s.service, keeps_connection, "session updated");
        }
        s.answer = answer;
        s.invite_tx = tx;
    }

    /// The session timer for the relay's INVITE or re-INVITE `req` (RFC 4028 §9), or the
    /// `422` with our `Min-SE` when its interval is too small (§6). `None` when the relay
    /// asked for none, or asked us to refresh: the agent never refreshes itself.
    fn timer_for(&self, req: &Request) -> Result<Option<Negotiated>, Response> {
        match self
            .parts
            .config
            .sessions
            .answer(&session_timer::read(&req.headers))
        {
            UasAnswer::TooSmall(min_se) => {
                let mut resp = reply(req, 422, Some("Session Interval Too Small"), None);
                resp.headers.push(session_timer::min_se_header(min_se));
                Err(resp)
            }
            UasAnswer::Timer(n) if !n.we_refresh => Ok(Some(n)),
            UasAnswer::Timer(_) | UasAnswer::None => Ok(None),
        }
    }

    /// An UPDATE from the relay (RFC 3311): without a body, a session refresh (RFC 4028
    /// §10), answered 200 with the interval agreed; an offer in it is not taken (`488`:
    /// offers come in re-INVITEs).
    fn on_update(&mut self, req: Request, tx: ServerTx) {
        let Some(id) = self.dialog_of(&req).map(str::to_string) else {
            respond(&tx, reply(&req, 481, None, None));
            return;
        };
        let timer = match self.timer_for(&req) {
            Ok(timer) => timer,
            Err(resp) => {
                respond(&tx, resp);
                return;
            }
        };
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if let Err(e) = s.dialog.check_remote_cseq(&req) {
            respond(&tx, reply(&req, 500, Some(&e.to_string()), None));
            return;
        }
        if !req.body.is_empty() {
            respond(&tx, reply(&req, 488, Some("Offers go in re-INVITEs"), None));
            return;
        }
        let _ = s.dialog.refresh_from_request(&req);
        let timer = timer.or(s.timer);
        let mut resp = reply(&req, 200, None, None);
        if let Some(n) = &timer {
            n.stamp_2xx(&mut resp.headers);
        }
        respond(&tx, resp);
        s.timer = timer;
        s.refreshed_at = Instant::now();
        debug!(call_id = %id, "session refreshed");
    }

    fn on_bye(&mut self, req: Request, tx: ServerTx, call_id: String) {
        let Some(id) = self.dialog_of(&req).map(str::to_string) else {
            respond(&tx, reply(&req, 481, None, None));
            return;
        };
        if let Some(s) = self.sessions.get_mut(&id) {
            if let Err(e) = s.dialog.check_remote_cseq(&req) {
                respond(&tx, reply(&req, 500, Some(&e.to_string()), None));
                return;
            }
            // A BYE ends the session even before our 2xx was ACKed.
            s.state = State::Live;
            s.ending = None;
        }
        respond(&tx, reply(&req, 200, None, None));
        let cause = relay_end_cause(&req);
        let reason = match cause {
            EndCause::Transferred => "BYE from the relay: transferred to another server",
            EndCause::Changed => "BYE from the relay: changed to another server's service",
            _ => "BYE from the relay",
        };
        self.end(&call_id, cause, reason, false);
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::List { reply } => {
                let mut list: Vec<SessionInfo> =
                    self.sessions.iter().map(|(id, s)| s.info(id)).collect();
                list.sort_by_key(|s| s.started_at_ms);
                let _ = reply.send(list);
            }
            Command::Lookup { session_id, reply } => {
                let found = match self.sessions.get(&session_id) {
                    Some(s) => Some(SessionRef {
                        subscriber: s.subscriber.clone(),
                        outstanding: Some(s.outstanding.clone()),
                    }),
                    None => self
                        .recent
                        .by_id
                        .get(&session_id)
                        .map(|subscriber| SessionRef {
                            subscriber: subscriber.clone(),
                            outstanding: None,
                        }),
                };
                let _ = reply.send(found);
            }
            Command::HangUp {
                session_id,
                reason,
                reply,
            } => {
                if !self.accepting {
                    let _ = reply.send(Err(HangUpError::Stopped));
                    return;
                }
                let Some(s) = self.sessions.get_mut(&session_id) else {
                    let _ = reply.send(Err(HangUpError::NotFound(session_id)));
                    return;
                };
                if s.hang_up.is_some() || s.ending.is_some() {
                    // Already on its way out: this caller hears the same BYE's answer.
                    if let Some(earlier) = s.hang_up.replace(reply) {
                        let _ = earlier.send(Ok(None));
                    }
                    return;
                }
                info!(call_id = %session_id, %reason, "the application server ends the session");
                s.hang_up = Some(reply);
                self.end(
                    &session_id,
                    EndCause::ServerHangUp,
                    &format!("ended by the application server: {reason}"),
                    true,
                );
            }
        }
    }

    fn on_gateway(&mut self, event: GatewayEvent) {
        match event {
            GatewayEvent::Attached {
                call_id,
                slot,
                peer,
            } => {
                let Some(s) = self.sessions.get_mut(&call_id) else {
                    return;
                };
                if s.pending_slot.as_ref().is_some_and(|(p, _)| *p == slot) {
                    s.pending_slot = None;
                    if let Some(old) = s.active_slot.replace(slot) {
                        debug!(%call_id, old, new = slot, "new data connection replaces the old one");
                        s.close_slot(old);
                    }
                    s.terminal = Some(peer);
                    debug!(%call_id, slot, %peer, "data connection attached");
                    self.emit(SessionEvent::Connected {
                        session_id: call_id,
                        terminal: peer,
                        at_ms: now_ms(),
                    });
                } else {
                    // A connection the session no longer wants (withdrawn token).
                    s.close_slot(slot);
                }
            }
            GatewayEvent::Ended {
                call_id,
                slot,
                reason,
            } => {
                let Some(s) = self.sessions.get_mut(&call_id) else {
                    return;
                };
                s.closers.remove(&slot);
                let was_active = s.active_slot == Some(slot);
                let was_pending = s.pending_slot.as_ref().is_some_and(|(p, _)| *p == slot);
                if was_active {
                    s.active_slot = None;
                    s.terminal = None;
                }
                if was_pending {
                    s.pending_slot = None;
                }
                if (was_active || was_pending)
                    && s.active_slot.is_none()
                    && s.pending_slot.is_none()
                {
                    self.end(&call_id, EndCause::DataClosed, &reason.to_string(), true);
                }
            }
        }
    }

    fn on_sweep(&mut self, now: Instant) {
        self.recent.forget_expired(now);
        let expired: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.state == State::Live && s.ending.is_none())
            .filter(|(_, s)| s.expires_at().is_some_and(|at| at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for call_id in expired {
            warn!(%call_id, "session timer expired: the relay stopped refreshing the session");
            self.end(
                &call_id,
                EndCause::SessionExpired,
                "session timer expired (the relay stopped refreshing)",
                true,
            );
        }
        for (call_id, slot) in self.parts.tokens.sweep(now) {
            let Some(s) = self.sessions.get_mut(&call_id) else {
                continue;
            };
            if s.pending_slot.as_ref().is_some_and(|(p, _)| *p == slot) {
                s.pending_slot = None;
                s.closers.remove(&slot);
                warn!(%call_id, slot, "session token expired unused");
                if s.active_slot.is_none() {
                    self.end(
                        &call_id,
                        EndCause::TokenExpired,
                        "no data connection in time",
                        true,
                    );
                }
            }
        }
    }

    /// Ends a session: closes its data connection, revokes its tokens, frees its place and,
    /// when `bye`, sends BYE to the relay (after the ACK of our 2xx, RFC 3261 §15).
    fn end(&mut self, call_id: &str, cause: EndCause, reason: &str, bye: bool) {
        let Some(s) = self.sessions.get_mut(call_id) else {
            return;
        };
        // What the application server sent before it hung up still reaches the terminal.
        s.close_all(if cause == EndCause::ServerHangUp {
            CloseSignal::Drain
        } else {
            CloseSignal::Now
        });
        self.parts.tokens.revoke_call(call_id);
        if bye && s.state == State::Pending {
            if s.ending.is_none() {
                debug!(%call_id, %reason, "session to end once our 2xx is ACKed");
                s.ending = Some((cause, reason.to_string()));
            }
            return;
        }
        let Some(mut s) = self.sessions.remove(call_id) else {
            return;
        };
        self.load.remove(&s.service);
        self.recent.insert(Instant::now(), call_id, &s.subscriber);
        if cause == EndCause::Transferred {
            self.emit(SessionEvent::Transferred {
                session_id: call_id.to_string(),
                at_ms: now_ms(),
            });
        }
        self.emit(SessionEvent::Ended {
            session_id: call_id.to_string(),
            cause,
            reason: reason.to_string(),
            at_ms: now_ms(),
        });
        info!(
            %call_id,
            service = %s.service,
            subscriber = %s.subscriber,
            %cause,
            %reason,
            duration_ms = s.started.elapsed().as_millis() as u64,
            bytes_in = s.counters.bytes_in(),
            bytes_out = s.counters.bytes_out(),
            charged_units = s.counters.charged_units(),
            "session ended"
        );
        let done = s.hang_up.take();
        let closers: Vec<watch::Sender<CloseSignal>> = s.closers.drain().map(|(_, c)| c).collect();
        if bye {
            let bye = Bye {
                call_id: call_id.to_string(),
                dialog: s.dialog,
                fallback: s.peer,
                reason: reason.to_string(),
                outstanding: s.outstanding,
                connections: s.connections,
                closers,
                done,
            };
            self.send_bye(bye);
        } else {
            for closer in closers {
                closer.send_replace(CloseSignal::Now);
            }
            if let Some(done) = done {
                let _ = done.send(Ok(None));
            }
        }
    }

    /// Sends a BYE on an ended session's dialog, once its charges are answered (or after
    /// [`CHARGE_SETTLE`]) and its data connections have closed (a drain takes at most
    /// [`DRAIN_LIMIT`]).
    fn send_bye(&mut self, bye: Bye) {
        let endpoint = self.parts.endpoint.clone();
        let sent_by = self.parts.sent_by.clone();
        let Bye {
            call_id,
            mut dialog,
            fallback,
            reason,
            outstanding,
            connections,
            closers,
            done,
        } = bye;
        self.byes.spawn(async move {
            if connections.count() > 0 {
                debug!(%call_id, "BYE waits for the data connection to close");
                let limit = DRAIN_LIMIT + Duration::from_millis(500);
                if tokio::time::timeout(limit, connections.settled()).await.is_err() {
                    debug!(%call_id, "data connection still open; BYE goes now");
                }
            }
            if outstanding.count() > 0 {
                debug!(%call_id, charges = outstanding.count(), "BYE waits for the session's charges");
                if tokio::time::timeout(CHARGE_SETTLE, outstanding.settled()).await.is_err() {
                    debug!(%call_id, "charges still unanswered; BYE goes now");
                }
            }
            // Read by sip-core's parser: an IPv6 next hop is an rsip carrier.
            let target = dialog.next_hop_uri();
            let peer = match resolve::resolve(&target, &SystemDns).await {
                Ok(targets) => targets.first().map_or(fallback, |t| t.peer()),
                Err(e) => {
                    debug!(%call_id, %target, error = %e, "BYE target unresolvable; using the INVITE's source");
                    fallback
                }
            };
            let via = ViaSpec {
                transport: peer.transport,
                sent_by,
            };
            let text: String = reason.chars().filter(|c| *c != '"' && *c != '\\' && !c.is_control()).collect();
            let extra = vec![Header::Other(
                "Reason".into(),
                format!("Q.850;cause=16;text=\"{text}\""),
            )];
            let req = match dialog.request(Method::Bye, &via, extra, Vec::new()) {
                Ok(r) => r,
                Err(e) => {
                    warn!(%call_id, error = %e, "cannot build the BYE");
                    if let Some(done) = done {
                        let _ = done.send(Err(HangUpError::Bye(e.to_string())));
                    }
                    return;
                }
            };
            info!(%call_id, to = %peer, %reason, "sending BYE");
            let result = match endpoint.send_request(req, peer) {
                Ok(mut tx) => {
                    let resp = tx.final_response().await;
                    let code = resp.status_code.code();
                    debug!(%call_id, status = code, "BYE answered");
                    Ok(Some(code))
                }
                Err(e) => {
                    warn!(%call_id, error = %e, "cannot send the BYE");
                    Err(HangUpError::Bye(e.to_string()))
                }
            };
            // The terminal has been told: its data connection may close now.
            for closer in closers {
                closer.send_replace(CloseSignal::Now);
            }
            if let Some(done) = done {
                let _ = done.send(result);
            }
        });
    }
}

/// What a BYE needs of the session it ends.
struct Bye {
    call_id: String,
    dialog: Dialog,
    fallback: Peer,
    reason: String,
    outstanding: Arc<InFlight>,
    connections: Arc<InFlight>,
    /// The signals of its data connections: `Now` once the BYE is answered.
    closers: Vec<watch::Sender<CloseSignal>>,
    /// The application server waiting for the BYE's answer.
    done: Option<oneshot::Sender<HangUpResult>>,
}

/// Why the relay's BYE ends the session: its `Reason` header's text naming `transferred`
/// or `changed` (the relay's own end causes) tells that the session moved to another server.
fn relay_end_cause(req: &Request) -> EndCause {
    for value in sip_core::address::header_values(&req.headers, "Reason") {
        let value = value.to_ascii_lowercase();
        if value.contains("transferred") {
            return EndCause::Transferred;
        }
        if value.contains("changed") {
            return EndCause::Changed;
        }
    }
    EndCause::RelayBye
}

fn call_id_of(req: &Request) -> String {
    req.headers
        .iter()
        .find_map(|h| match h {
            Header::CallId(c) => Some(c.value().trim().to_string()),
            _ => None,
        })
        .unwrap_or_default()
}

/// `resp` with our To tag (a refusal of a dialog-creating request, RFC 3261 §8.2.6.2).
fn with_tag(req_resp: Response, tag: &str) -> Response {
    let mut resp = req_resp;
    for h in resp.headers.iter_mut() {
        if let Header::To(to) = h {
            if !to.value().contains(";tag=") {
                *to = rsip::headers::To::new(format!("{};tag={tag}", to.value()));
            }
        }
    }
    resp
}

fn respond(tx: &ServerTx, resp: Response) {
    if let Err(e) = tx.respond(resp) {
        warn!(error = %e, "response not sent");
    }
}

/// A response with our Server header.
fn reply(req: &Request, code: u16, reason: Option<&str>, to_tag: Option<&str>) -> Response {
    let mut resp = message::response_for(req, code, reason, to_tag);
    resp.headers
        .push(Header::Server(rsip::headers::Server::new(USER_AGENT)));
    resp
}

fn refusal_reply(req: &Request, refusal: &Refusal, to_tag: Option<&str>) -> Response {
    let mut resp = reply(req, refusal.code, Some(&refusal.reason), to_tag);
    match refusal.code {
        415 => resp.headers.push(Header::Accept(rsip::headers::Accept::new(
            "application/sdp",
        ))),
        405 => resp
            .headers
            .push(Header::Allow(rsip::headers::Allow::new(ALLOW))),
        _ => {}
    }
    resp
}

/// The 200 to an INVITE: Record-Route copied (RFC 3261 §12.1.1), our Contact, the SDP, and
/// the session timer agreed (RFC 4028 §9), if any.
fn ok_reply(
    req: &Request,
    tag: &str,
    contact: &Uri,
    sdp: &AppSdp,
    timer: Option<&Negotiated>,
) -> Response {
    let mut resp = reply(req, 200, None, Some(tag));
    if let Some(n) = timer {
        n.stamp_2xx(&mut resp.headers);
    }
    for h in req.headers.iter() {
        if let Header::RecordRoute(_) = h {
            resp.headers.push(h.clone());
        }
    }
    resp.headers
        .push(Header::Contact(rsip::headers::Contact::new(format!(
            "<{contact}>"
        ))));
    resp.headers
        .push(Header::Allow(rsip::headers::Allow::new(ALLOW)));
    resp.headers
        .push(Header::ContentType(rsip::headers::ContentType::new(
            "application/sdp",
        )));
    let body = sdp.to_string().into_bytes();
    message::set_content_length(&mut resp.headers, body.len());
    resp.body = body;
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use rsip::SipMessage;

    fn invite() -> Request {
        let text = "INVITE sip:echo@127.0.0.1:5080 SIP/2.0\r\n\
            Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx1\r\n\
            Record-Route: <sip:p1.relay.test;lr>\r\n\
            From: <sip:alice@relay.test>;tag=a1\r\nTo: <sip:echo@127.0.0.1:5080>\r\n\
            Call-ID: leg-9\r\nCSeq: 1 INVITE\r\nContact: <sip:relay@127.0.0.1:5060>\r\n\
            Content-Length: 0\r\n\r\n";
        match SipMessage::try_from(text).unwrap() {
            SipMessage::Request(r) => r,
            _ => unreachable!(),
        }
    }

    fn text(resp: Response) -> String {
        String::from_utf8(message::to_bytes(resp).to_vec()).unwrap()
    }

    #[test]
    fn the_200_carries_contact_record_route_and_the_sdp() {
        let req = invite();
        let contact = Uri::parse("sip:as1@127.0.0.1:5080").unwrap();
        let sdp = inquiry::answer(
            "127.0.0.1:7080".parse().unwrap(),
            Some("abcd"),
            "echo",
            None,
        );
        let out = text(ok_reply(&req, "t9", &contact, &sdp, None));
        assert!(out.starts_with("SIP/2.0 200 OK\r\n"), "{out}");
        assert!(
            out.contains("To: <sip:echo@127.0.0.1:5080>;tag=t9\r\n"),
            "{out}"
        );
        assert!(
            out.contains("Record-Route: <sip:p1.relay.test;lr>\r\n"),
            "{out}"
        );
        assert!(
            out.contains("Contact: <sip:as1@127.0.0.1:5080>\r\n"),
            "{out}"
        );
        assert!(out.contains("Content-Type: application/sdp\r\n"), "{out}");
        let body = sdp.to_string();
        assert!(
            out.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{out}"
        );
        assert!(out.ends_with(&body), "{out}");
    }

    #[tokio::test]
    async fn an_inquiry_over_ipv6_is_answered_with_bracketed_contact_and_ip6_sdp() {
        let wire = "INVITE sip:echo@[::1]:5080 SIP/2.0\r\n\
            Via: SIP/2.0/UDP [::1]:5060;branch=z9hG4bKx6;rport\r\n\
            From: <sip:relay@[::1]:5060>;tag=r6\r\nTo: <sip:echo@[::1]:5080>\r\n\
            Call-ID: leg-6\r\nCSeq: 1 INVITE\r\nContact: <sip:relay@[::1]:5060>\r\n\
            Content-Length: 0\r\n\r\n";
        let req = match sip_core::wire::parse(wire.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            _ => unreachable!(),
        };
        let contact = Uri::parse("sip:as1@[::1]:5080").unwrap();
        let sdp = inquiry::answer("[::1]:7080".parse().unwrap(), Some("abcd"), "echo", None);
        let out = text(ok_reply(&req, "t6", &contact, &sdp, None));
        assert!(out.contains("Contact: <sip:as1@[::1]:5080>\r\n"), "{out}");
        assert!(
            out.contains("To: <sip:echo@[::1]:5080>;tag=t6\r\n"),
            "{out}"
        );
        assert!(out.contains("c=IN IP6 ::1\r\n"), "{out}");
        // The dialog takes our Contact as an rsip carrier, and its BYE goes to the relay's
        // IPv6 Contact.
        let dialog = Dialog::uas(&req, "t6", contact.to_rsip(), DialogState::Confirmed).unwrap();
        assert_eq!(dialog.local_target().to_string(), "sip:as1@[::1]:5080");
        let hop = dialog.next_hop_uri();
        let targets = resolve::resolve(&hop, &SystemDns).await.unwrap();
        assert_eq!(targets[0].addr, "[::1]:5060".parse().unwrap());
    }

    #[test]
    fn refusals_keep_their_reason_phrase() {
        let req = invite();
        let busy = Refusal {
            code: 486,
            reason: "Service echo at capacity".into(),
        };
        let out = text(refusal_reply(&req, &busy, Some("t1")));
        assert!(
            out.starts_with("SIP/2.0 486 Service echo at capacity\r\n"),
            "{out}"
        );
        assert!(out.contains(&format!("Server: {USER_AGENT}\r\n")), "{out}");
        let media = Refusal {
            code: 415,
            reason: "Only application/sdp bodies".into(),
        };
        let out = text(refusal_reply(&req, &media, Some("t1")));
        assert!(out.contains("Accept: application/sdp\r\n"), "{out}");
    }
}
