//! One live session: the dialog of one 2xx to our INVITE, its data connection, and what
//! happens to it — change (re-INVITE, claim 5), transfer (REFER and its NOTIFYs, then the
//! relay's re-INVITE with the new server's SDP, claim 6), BYE either way, in-dialog OPTIONS.
//!
//! A session is a task that owns its [`Dialog`]. It reacts to inputs one at a time:
//! requests routed to it, responses to its own requests (forwarded by small tasks that
//! await the transactions), data-connection events and commands. So a NOTIFY arriving while
//! the REFER is still unanswered is handled like any other input. One local operation
//! (change, transfer, bye) runs at a time; others wait in a queue, except BYE, which goes
//! at once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rsip::prelude::*;
use rsip::{Header, Method, Request, Response};
use sip_core::dialog::{Dialog, DialogError};
use sip_core::endpoint::{ClientEvent, ClientTx, IncomingRequest, ServerTx};
use sip_core::message;
use sip_core::sdp::{AppSdp, SdpError, APP_PROTO};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::auth::{with_credentials, AuthError, Kind};
use crate::data::{self, Counters, DataError, PipeEnd};
use crate::events::{Event, Events};
use crate::headers;
use crate::input::{InputHub, InputSub};
use crate::output::Output;
use crate::router::{Router, SessionInput};
use crate::script::Action;
use crate::service::ServiceRequest;
use crate::ua::Ua;

/// How long opening a data connection (connect, token, `OK`) may take.
const DATA_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// After a BYE from the server, how long the data connection may still drain.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// How many challenges one in-dialog request may answer.
const MAX_AUTH_TRIES: u8 = 3;

/// What every session of a call shares.
pub struct Shared {
    /// The user agent.
    pub ua: Ua,
    /// Where events go.
    pub events: Events,
    /// Where data goes.
    pub output: Output,
    /// stdin, when sessions read it.
    pub input: Option<Arc<InputHub>>,
    /// Whether to open data connections at all (`--no-data` clears it).
    pub data: bool,
    /// After stdin EOF, how long to wait for the server.
    pub wait_after_eof: Duration,
    /// True once the `--then` script is over (or when there is none).
    pub script_done: watch::Receiver<bool>,
    /// Where a session reports its end.
    pub reports: mpsc::UnboundedSender<Report>,
    /// The dialog routing table.
    pub router: Router,
}

/// A session's end, for the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The session number.
    pub id: u32,
    /// Its contribution to the exit status (0, or data connection failed).
    pub exit: u8,
}

/// How a session starts: the 2xx that made it, and what we sent.
pub struct Start {
    /// Session number.
    pub id: u32,
    /// The dialog (confirmed).
    pub dialog: Dialog,
    /// The INVITE the 2xx answers.
    pub invite: Request,
    /// The ACK we sent for it (sent again when the 2xx comes again).
    pub ack: Request,
    /// The SDP answer.
    pub answer: Vec<u8>,
    /// The service requested.
    pub service: ServiceRequest,
    /// Our SDP offer.
    pub offer: AppSdp,
    /// Told once the ACK is on its way: the session does nothing before (its data
    /// connection may be refused at once, and a BYE must not overtake the ACK, RFC 3261
    /// §13.2.2.4), though it is routed to already.
    pub acked: oneshot::Receiver<()>,
}

/// Starts a session task; returns the sender to route its inputs to (already in the
/// router).
pub fn spawn(shared: Arc<Shared>, start: Start) -> mpsc::UnboundedSender<SessionInput> {
    let (tx, rx) = mpsc::unbounded_channel();
    shared
        .router
        .insert(start.dialog.id().to_owned(), tx.clone());
    let (internal_tx, internal_rx) = mpsc::unbounded_channel();
    let input = shared.input.as_ref().map(|h| Arc::new(h.subscribe()));
    let session = Session {
        id: start.id,
        dialog: start.dialog,
        invite_cseq: headers::cseq(&start.invite.headers)
            .map(|c| c.0)
            .unwrap_or(0),
        ack: start.ack,
        service: start.service,
        local_sdp: start.offer,
        started: Instant::now(),
        op: None,
        queue: VecDeque::new(),
        last_reinvite_ack: None,
        pending_answer_in_ack: false,
        pending_reinvite_tx: None,
        transfer_service: None,
        data: DataState::default(),
        counters: Arc::new(Counters::default()),
        input,
        internal_tx,
        exit: 0,
        ended: false,
        remote_bye: false,
        shared,
    };
    tokio::spawn(session.run(rx, internal_rx, start.answer, start.acked));
    tx
}

/// What the helper tasks tell the session.
enum Internal {
    Response { cseq: u32, resp: Response },
    Data { gen: u64, ev: DataEvent },
}

enum DataEvent {
    Connected(SocketAddr),
    Failed(DataError),
    Ended(PipeEnd),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DataStatus {
    None(String),
    Connecting(SocketAddr),
    Connected(SocketAddr),
    Closed,
    Failed,
}

struct DataState {
    gen: u64,
    task: Option<JoinHandle<()>>,
    /// The data endpoint, its token, and whether it speaks TLS (`TCP/TLS`).
    endpoint: Option<(SocketAddr, String, bool)>,
    status: DataStatus,
    /// The server finished (or our wait after EOF ran out): hang up when nothing else is
    /// pending.
    finished: bool,
}

impl Default for DataState {
    fn default() -> Self {
        DataState {
            gen: 0,
            task: None,
            endpoint: None,
            status: DataStatus::None("not connected".into()),
            finished: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OpKind {
    Change(ServiceRequest),
    Transfer(ServiceRequest),
    Bye(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The request is out, no final response yet.
    Sent,
    /// REFER accepted (202): waiting for the NOTIFYs.
    TransferAccepted,
    /// The final NOTIFY said 2xx: waiting for the relay's re-INVITE, until the deadline.
    AwaitingReinvite(Instant),
}

struct Op {
    kind: OpKind,
    req: Request,
    cseq: u32,
    creds: Vec<Header>,
    auth_tries: u8,
    stage: Stage,
    waiters: Vec<oneshot::Sender<()>>,
}

struct Session {
    id: u32,
    dialog: Dialog,
    invite_cseq: u32,
    ack: Request,
    service: ServiceRequest,
    local_sdp: AppSdp,
    started: Instant,
    op: Option<Op>,
    queue: VecDeque<(OpKind, oneshot::Sender<()>)>,
    last_reinvite_ack: Option<(u32, Request)>,
    /// We answered an offerless re-INVITE with an offer: the answer comes in the ACK.
    pending_answer_in_ack: bool,
    pending_reinvite_tx: Option<ServerTx>,
    transfer_service: Option<ServiceRequest>,
    data: DataState,
    counters: Arc<Counters>,
    input: Option<Arc<InputSub>>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    exit: u8,
    ended: bool,
    remote_bye: bool,
    shared: Arc<Shared>,
}

impl Session {
    async fn run(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<SessionInput>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
        answer: Vec<u8>,
        acked: oneshot::Receiver<()>,
    ) {
        // Sent or not, the ACK has left the caller's hands when this resolves.
        let _ = acked.await;
        self.apply_remote_sdp(&answer, true);
        let mut script_done = self.shared.script_done.clone();
        while !self.ended {
            let waiting_script = self.data.finished && !*script_done.borrow();
            let reinvite_deadline = match self.op.as_ref().map(|o| o.stage) {
                Some(Stage::AwaitingReinvite(d)) => Some(d),
                _ => None,
            };
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(i) => self.on_input(i).await,
                    None => self.end("local", "client shutting down".into(), None),
                },
                Some(ev) = internal.recv() => self.on_internal(ev).await,
                changed = script_done.changed(), if waiting_script => {
                    if changed.is_err() {
                        // The script runner is gone: treat as done.
                        self.data.finished = true;
                    }
                    self.maybe_hang_up();
                }
                _ = sleep_until_opt(reinvite_deadline), if reinvite_deadline.is_some() => {
                    tracing::info!(session = self.id, "no re-INVITE after the transfer");
                    self.complete_op();
                }
            }
        }
        if let Some(mut task) = self.data.task.take() {
            if self.remote_bye {
                let _ = tokio::time::timeout(DRAIN_GRACE, &mut task).await;
            }
            task.abort();
        }
        self.shared.output.end(self.id).await;
        self.shared.router.remove(&self.dialog.id().to_owned());
        for (_, w) in self.queue.drain(..) {
            let _ = w.send(());
        }
        let _ = self.shared.reports.send(Report {
            id: self.id,
            exit: self.exit,
        });
    }

    fn ua(&self) -> &Ua {
        &self.shared.ua
    }

    fn emit(&self, e: Event) {
        self.shared.events.emit(e);
    }

    async fn on_input(&mut self, input: SessionInput) {
        match input {
            SessionInput::Request(r) => self.on_request(r),
            SessionInput::Ack(ack) => self.on_ack(&ack),
            SessionInput::Stray2xx(resp) => self.on_2xx_again(&resp).await,
            SessionInput::AckTimeout(tx) => {
                if self.pending_reinvite_tx.as_ref() == Some(&tx) {
                    self.pending_reinvite_tx = None;
                    self.start_bye("no ACK for our 2xx");
                }
            }
            SessionInput::Command(action, done) => self.on_command(action, done),
        }
    }

    async fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Response { cseq, resp } => self.on_response(cseq, resp).await,
            Internal::Data { gen, ev } if gen == self.data.gen => self.on_data(ev),
            Internal::Data { .. } => {}
        }
    }

    // -----------------------------------------------------------------------------
    // Commands and local operations.

    fn on_command(&mut self, action: Action, done: oneshot::Sender<()>) {
        match action {
            Action::Change(_, s) => self.enqueue(OpKind::Change(s), done),
            Action::Transfer(_, s) => self.enqueue(OpKind::Transfer(s), done),
            Action::Bye(_) => {
                if let Some(op) = &mut self.op {
                    if matches!(op.kind, OpKind::Bye(_)) {
                        op.waiters.push(done);
                        return;
                    }
                }
                self.start_bye("hung up");
                match &mut self.op {
                    Some(op) => op.waiters.push(done),
                    None => {
                        let _ = done.send(());
                    }
                }
            }
            Action::Status(_) => {
                self.emit(self.status_event());
                let _ = done.send(());
            }
            Action::Help | Action::Wait(_) | Action::Sessions(_) => {
                let _ = done.send(());
            }
        }
    }

    fn status_event(&self) -> Event {
        let data = match &self.data.status {
            DataStatus::None(why) => format!("none ({why})"),
            DataStatus::Connecting(a) => format!("connecting to {a}"),
            DataStatus::Connected(a) => format!("connected to {a}"),
            DataStatus::Closed => "closed".into(),
            DataStatus::Failed => "failed".into(),
        };
        Event::Status {
            session: self.id,
            service: self.service.to_string(),
            call_id: self.dialog.id().call_id.to_owned(),
            data,
            sent: self.counters.sent.load(Ordering::Relaxed),
            received: self.counters.received.load(Ordering::Relaxed),
            seconds: self.started.elapsed().as_secs(),
        }
    }

    fn enqueue(&mut self, kind: OpKind, done: oneshot::Sender<()>) {
        if self.op.is_some() {
            self.queue.push_back((kind, done));
        } else {
            self.start_op(kind, vec![done]);
        }
    }

    /// Hangs up now: a pending operation is dropped (its waiters released).
    fn start_bye(&mut self, reason: &str) {
        if self.ended || matches!(self.op.as_ref().map(|o| &o.kind), Some(OpKind::Bye(_))) {
            return;
        }
        let waiters = self.op.take().map(|o| o.waiters).unwrap_or_default();
        self.start_op(OpKind::Bye(reason.to_string()), waiters);
    }

    fn build(&mut self, kind: &OpKind) -> Result<Request, DialogError> {
        let via = self.ua().via().clone();
        match kind {
            OpKind::Change(service) => {
                let mut sdp = self.local_sdp.clone();
                sdp.origin.session_version += 1;
                sdp.service = Some(service.name.clone());
                let body = sdp.to_string().into_bytes();
                self.dialog.request(
                    Method::Invite,
                    &via,
                    vec![
                        headers::other("P-Preferred-Service", service.header_value()),
                        headers::allow(),
                        headers::content_type_header("application/sdp"),
                    ],
                    body,
                )
            }
            OpKind::Transfer(service) => {
                let domain = self.ua().account().domain.clone();
                let aor = self.ua().account().aor();
                self.dialog.request(
                    Method::Refer,
                    &via,
                    vec![
                        headers::other("Refer-To", format!("<{}>", service.uri(&domain))),
                        headers::other("Referred-By", format!("<{aor}>")),
                    ],
                    Vec::new(),
                )
            }
            OpKind::Bye(_) => self
                .dialog
                .request(Method::Bye, &via, Vec::new(), Vec::new()),
        }
    }

    fn start_op(&mut self, kind: OpKind, waiters: Vec<oneshot::Sender<()>>) {
        if let OpKind::Transfer(s) = &kind {
            self.transfer_service = Some(s.clone());
        }
        let req = match self.build(&kind) {
            Ok(r) => r,
            Err(e) => {
                self.shared
                    .events
                    .notice(format!("[{}] cannot send the request: {e}", self.id));
                for w in waiters {
                    let _ = w.send(());
                }
                if matches!(kind, OpKind::Bye(_)) {
                    self.end("local", format!("cannot send BYE: {e}"), None);
                }
                return;
            }
        };
        let cseq = headers::cseq(&req.headers).map(|c| c.0).unwrap_or(0);
        self.op = Some(Op {
            kind,
            req: req.clone(),
            cseq,
            creds: Vec::new(),
            auth_tries: 0,
            stage: Stage::Sent,
            waiters,
        });
        self.send_tracked(req, cseq);
    }

    /// Sends a request of this dialog and forwards its responses to the session.
    fn send_tracked(&mut self, req: Request, cseq: u32) {
        let peer = self.ua().peer_for(&self.dialog.next_hop_uri());
        let invite = req.method == Method::Invite;
        match self.ua().send(req, peer) {
            Ok(tx) => {
                let itx = self.internal_tx.clone();
                let linger = self.ua().transaction_timeout();
                tokio::spawn(forward(tx, cseq, invite, linger, itx));
            }
            Err(e) => {
                let resp = local_response(503, &e.to_string());
                let _ = self.internal_tx.send(Internal::Response { cseq, resp });
            }
        }
    }

    /// The operation is over: release its waiters, start the next queued one, and hang up
    /// if the data connection finished meanwhile.
    fn complete_op(&mut self) {
        if let Some(op) = self.op.take() {
            for w in op.waiters {
                let _ = w.send(());
            }
        }
        if self.ended {
            return;
        }
        if let Some((kind, done)) = self.queue.pop_front() {
            self.start_op(kind, vec![done]);
        } else {
            self.maybe_hang_up();
        }
    }

    /// A 408 or 481 to an in-dialog request means the dialog is gone (RFC 3261 §12.2.1.2):
    /// ends the session and says so.
    fn end_if_dialog_gone(&mut self, code: u16, reason: &str) -> bool {
        if !matches!(code, 408 | 481) {
            return false;
        }
        self.op = None;
        self.end(
            "local",
            format!("dialog gone ({code} {reason})"),
            Some(code),
        );
        true
    }

    async fn on_response(&mut self, cseq: u32, resp: Response) {
        let (code, reason) = headers::status(&resp);
        // The REFER's 2xx may come after the NOTIFYs it started (they may cross on the
        // wire, RFC 6665 §4.1.2.4): the transfer has moved on, but its acceptance is still
        // reported.
        let late_refer_2xx = (200..300).contains(&code)
            && self.op.as_ref().is_some_and(|o| {
                o.cseq == cseq && o.stage != Stage::Sent && matches!(o.kind, OpKind::Transfer(_))
            });
        if late_refer_2xx {
            self.emit(Event::TransferProgress {
                session: self.id,
                status: code,
                reason,
            });
            return;
        }
        let current = self
            .op
            .as_ref()
            .is_some_and(|o| o.cseq == cseq && o.stage == Stage::Sent);
        if !current {
            if (200..300).contains(&code) {
                self.on_2xx_again(&resp).await;
            }
            return;
        }
        if code < 200 {
            return;
        }
        if Kind::of_status(code).is_some() && self.retry_with_credentials(&resp) {
            return;
        }
        let Some(op) = self.op.as_mut() else { return };
        match op.kind.clone() {
            OpKind::Change(service) => {
                if (200..300).contains(&code) {
                    let _ = self.dialog.on_response(&resp);
                    let req = op.req.clone();
                    self.send_ack_for(&req, cseq).await;
                    self.local_sdp.origin.session_version += 1;
                    self.local_sdp.service = Some(service.name.clone());
                    self.service = service.clone();
                    self.emit(Event::Changed {
                        session: self.id,
                        service: service.to_string(),
                        status: code,
                        reason,
                    });
                    self.apply_remote_sdp(&resp.body, false);
                } else {
                    self.emit(Event::Changed {
                        session: self.id,
                        service: service.to_string(),
                        status: code,
                        reason: reason.clone(),
                    });
                    if self.end_if_dialog_gone(code, &reason) {
                        return;
                    }
                }
                self.complete_op();
            }
            OpKind::Transfer(service) => {
                if (200..300).contains(&code) {
                    op.stage = Stage::TransferAccepted;
                    self.emit(Event::TransferProgress {
                        session: self.id,
                        status: code,
                        reason,
                    });
                } else {
                    self.emit(Event::Transferred {
                        session: self.id,
                        service: service.to_string(),
                        status: code,
                        reason: reason.clone(),
                    });
                    if self.end_if_dialog_gone(code, &reason) {
                        return;
                    }
                    self.complete_op();
                }
            }
            OpKind::Bye(why) => {
                self.end("local", why, Some(code));
            }
        }
    }

    /// Answers a 401/407 to the current operation's request with a fresh request of the
    /// same kind. False when the challenge cannot or must not be answered.
    fn retry_with_credentials(&mut self, resp: &Response) -> bool {
        let Some(op) = self.op.as_ref() else {
            return false;
        };
        if op.auth_tries >= MAX_AUTH_TRIES {
            return false;
        }
        let header = match self.ua().authenticate(&op.req, resp) {
            Ok(h) => h,
            Err(AuthError::Rejected { .. }) => {
                self.shared.events.notice(format!(
                    "[{}] credentials refused for {}",
                    self.id, op.req.method
                ));
                return false;
            }
            Err(AuthError::NoChallenge(why)) => {
                tracing::debug!(why, "challenge not answered");
                return false;
            }
        };
        let kind = op.kind.clone();
        let mut creds = op.creds.clone();
        creds.push(header);
        let tries = op.auth_tries + 1;
        let mut req = match self.build(&kind) {
            Ok(r) => r,
            Err(_) => return false,
        };
        for c in &creds {
            req = with_credentials(req, c.clone());
        }
        let cseq = headers::cseq(&req.headers).map(|c| c.0).unwrap_or(0);
        if let Some(op) = self.op.as_mut() {
            op.req = req.clone();
            op.cseq = cseq;
            op.creds = creds;
            op.auth_tries = tries;
        }
        self.send_tracked(req, cseq);
        true
    }

    async fn send_ack_for(&mut self, invite: &Request, cseq: u32) {
        let via = self.ua().via().clone();
        match self
            .dialog
            .ack_for_2xx(invite, &via, Vec::new(), Vec::new())
        {
            Ok(ack) => {
                let peer = self.ua().peer_for(&self.dialog.next_hop_uri());
                self.ua().send_ack(ack.clone(), peer).await;
                self.last_reinvite_ack = Some((cseq, ack));
            }
            Err(e) => tracing::warn!(error = %e, "cannot build the ACK"),
        }
    }

    /// A 2xx to one of our INVITEs came again (its ACK was lost): ACK it again.
    async fn on_2xx_again(&mut self, resp: &Response) {
        let Some((cseq, method)) = headers::cseq(&resp.headers) else {
            return;
        };
        if method != Method::Invite {
            return;
        }
        let ack = if cseq == self.invite_cseq {
            Some(self.ack.clone())
        } else {
            self.last_reinvite_ack
                .as_ref()
                .filter(|(c, _)| *c == cseq)
                .map(|(_, a)| a.clone())
        };
        if let Some(ack) = ack {
            tracing::debug!(session = self.id, cseq, "2xx again: ACK again");
            let peer = self.ua().peer_for(&self.dialog.next_hop_uri());
            self.ua().send_ack(ack, peer).await;
        }
    }

    // -----------------------------------------------------------------------------
    // Requests from the far end.

    fn respond(&self, r: &IncomingRequest, code: u16, extra: Vec<Header>, body: Vec<u8>) {
        let mut resp = message::response_for(&r.req, code, None, None);
        for h in extra {
            resp.headers.push(h);
        }
        message::set_content_length(&mut resp.headers, body.len());
        resp.body = body;
        self.ua().respond(&r.tx, resp);
    }

    fn contact(&self) -> Header {
        Header::Contact(rsip::headers::Contact::new(format!(
            "<{}>",
            self.ua().contact()
        )))
    }

    fn on_request(&mut self, r: IncomingRequest) {
        if let Err(e) = self.dialog.check_remote_cseq(&r.req) {
            tracing::debug!(error = %e, "in-dialog request refused");
            self.respond(&r, 500, Vec::new(), Vec::new());
            return;
        }
        match r.req.method {
            Method::Bye => {
                self.respond(&r, 200, Vec::new(), Vec::new());
                self.remote_bye = true;
                self.end("remote", "BYE".into(), None);
            }
            Method::Invite => self.on_reinvite(r),
            Method::Notify => self.on_notify(r),
            Method::Options | Method::Info => {
                self.respond(&r, 200, vec![headers::allow()], Vec::new());
            }
            _ => self.respond(&r, 405, vec![headers::allow()], Vec::new()),
        }
    }

    /// A re-INVITE from the relay: after a transfer it carries the new server's SDP.
    fn on_reinvite(&mut self, r: IncomingRequest) {
        let ours_pending = self
            .op
            .as_ref()
            .is_some_and(|o| matches!(o.kind, OpKind::Change(_)) && o.stage == Stage::Sent);
        if ours_pending {
            // RFC 3261 §14.2: a re-INVITE crossing ours.
            self.respond(&r, 491, Vec::new(), Vec::new());
            return;
        }
        let _ = self.dialog.refresh_from_request(&r.req);
        let offerless = r.req.body.is_empty();
        if !offerless {
            if let Err(e) = Self::check_sdp(&r.req.body) {
                self.respond(
                    &r,
                    488,
                    vec![headers::other("Warning", format!("399 sip-client \"{e}\""))],
                    Vec::new(),
                );
                return;
            }
        }
        let body = self.local_sdp.to_string().into_bytes();
        self.respond(
            &r,
            200,
            vec![
                self.contact(),
                headers::allow(),
                headers::content_type_header("application/sdp"),
            ],
            body,
        );
        self.pending_reinvite_tx = Some(r.tx.clone());
        if offerless {
            self.pending_answer_in_ack = true;
        } else {
            self.apply_remote_sdp(&r.req.body, false);
        }
        let transfer_pending = self
            .op
            .as_ref()
            .is_some_and(|o| matches!(o.kind, OpKind::Transfer(_)));
        if transfer_pending {
            self.complete_op();
        }
    }

    /// A body we can answer: an SDP, with or without our application media.
    fn check_sdp(body: &[u8]) -> Result<(), SdpError> {
        match AppSdp::parse(body) {
            Ok(_) | Err(SdpError::NoApplicationMedia) | Err(SdpError::UnsupportedTransport(_)) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn on_ack(&mut self, ack: &Request) {
        self.pending_reinvite_tx = None;
        if self.pending_answer_in_ack {
            self.pending_answer_in_ack = false;
            self.apply_remote_sdp(&ack.body, false);
        }
    }

    /// NOTIFY of the implicit subscription of our REFER (RFC 3515 §2.4.4): its
    /// `message/sipfrag` body is the status line of the new server's answer.
    fn on_notify(&mut self, r: IncomingRequest) {
        self.respond(&r, 200, Vec::new(), Vec::new());
        let event = headers::first(&r.req.headers, "Event")
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !event.starts_with("refer") {
            return;
        }
        let Some((status, reason)) = parse_sipfrag(&r.req.body) else {
            tracing::debug!("NOTIFY without a sipfrag status line");
            return;
        };
        self.emit(Event::TransferProgress {
            session: self.id,
            status,
            reason: reason.clone(),
        });
        if status < 200 {
            return;
        }
        let service = self
            .transfer_service
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        self.emit(Event::Transferred {
            session: self.id,
            service,
            status,
            reason,
        });
        let transferring = self
            .op
            .as_ref()
            .is_some_and(|o| matches!(o.kind, OpKind::Transfer(_)));
        if !transferring {
            return;
        }
        if (200..300).contains(&status) {
            let deadline = Instant::now() + self.ua().transaction_timeout();
            if let Some(op) = self.op.as_mut() {
                op.stage = Stage::AwaitingReinvite(deadline);
            }
        } else {
            self.complete_op();
        }
    }

    // -----------------------------------------------------------------------------
    // Data connection.

    /// Reads the far end's SDP and (re)connects the data connection when its endpoint or
    /// token changed.
    fn apply_remote_sdp(&mut self, body: &[u8], initial: bool) {
        if !self.shared.data {
            if initial {
                self.data.status = DataStatus::None("--no-data".into());
            }
            return;
        }
        let endpoint = match AppSdp::parse(body) {
            Err(e) => Err(format!("{e}")),
            Ok(sdp) if sdp.port == 0 => Err("the data stream was refused (port 0)".to_string()),
            Ok(sdp) if !sdp.proto.eq_ignore_ascii_case(APP_PROTO) => {
                Err(format!("media format {} is not {APP_PROTO}", sdp.proto))
            }
            // The SIP leg is TLS: the token must not cross in clear.
            Ok(sdp) if !sdp.tls && data::tls_required() => Err(
                "the data endpoint is plain TCP but the SIP leg is TLS: refusing to send the \
                 token in clear (TCP/TLS expected)"
                    .to_string(),
            ),
            Ok(sdp) if sdp.tls && !data::tls_available() => {
                Err("the data endpoint asks TLS (TCP/TLS): give --ca FILE to verify it".to_string())
            }
            Ok(sdp) => match sdp.token.clone() {
                None => Err("no a=session-token".to_string()),
                Some(t) => Ok((sdp.socket_addr(), t, sdp.tls)),
            },
        };
        match endpoint {
            Err(reason) => {
                let have_one = matches!(
                    self.data.status,
                    DataStatus::Connecting(_) | DataStatus::Connected(_)
                );
                if initial || !have_one {
                    self.emit(Event::NoDataEndpoint {
                        session: self.id,
                        reason: reason.clone(),
                    });
                    self.data.status = DataStatus::None(reason);
                }
            }
            Ok(ep) => {
                let live = matches!(
                    self.data.status,
                    DataStatus::Connecting(_) | DataStatus::Connected(_)
                );
                if live && self.data.endpoint.as_ref() == Some(&ep) {
                    return;
                }
                self.connect(ep);
            }
        }
    }

    fn connect(&mut self, (addr, token, tls): (SocketAddr, String, bool)) {
        if let Some(old) = self.data.task.take() {
            old.abort();
        }
        self.data.gen += 1;
        self.data.endpoint = Some((addr, token.clone(), tls));
        self.data.status = DataStatus::Connecting(addr);
        self.data.finished = false;
        let gen = self.data.gen;
        let itx = self.internal_tx.clone();
        let input = self.input.clone();
        let output = self.shared.output.clone();
        let counters = self.counters.clone();
        let wait = self.shared.wait_after_eof;
        let id = self.id;
        self.data.task = Some(tokio::spawn(async move {
            let send = |ev| {
                let _ = itx.send(Internal::Data { gen, ev });
            };
            match data::open(addr, &token, tls, DATA_OPEN_TIMEOUT).await {
                Err(e) => send(DataEvent::Failed(e)),
                Ok((stream, leftover)) => {
                    send(DataEvent::Connected(addr));
                    let end = data::pipe(stream, leftover, input, output, id, counters, wait).await;
                    send(DataEvent::Ended(end));
                }
            }
        }));
    }

    fn on_data(&mut self, ev: DataEvent) {
        match ev {
            DataEvent::Connected(addr) => {
                self.data.status = DataStatus::Connected(addr);
                self.emit(Event::DataConnected {
                    session: self.id,
                    addr: addr.to_string(),
                });
            }
            DataEvent::Failed(e) => {
                self.data.status = DataStatus::Failed;
                self.data.task = None;
                self.emit(Event::DataFailed {
                    session: self.id,
                    reason: e.to_string(),
                });
                self.exit = crate::EXIT_DATA_FAILED;
                self.start_bye("data connection failed");
            }
            DataEvent::Ended(end) => {
                self.data.status = DataStatus::Closed;
                self.data.task = None;
                if let PipeEnd::Failed(e) = &end {
                    tracing::info!(session = self.id, error = %e, "data connection broke");
                }
                self.emit(Event::DataClosed {
                    session: self.id,
                    sent: self.counters.sent.load(Ordering::Relaxed),
                    received: self.counters.received.load(Ordering::Relaxed),
                });
                self.data.finished = true;
                self.maybe_hang_up();
            }
        }
    }

    /// Hangs up once the data connection is finished, no change or transfer is under way
    /// (it may bring a new data endpoint), and the script is done.
    fn maybe_hang_up(&mut self) {
        if self.ended || !self.data.finished || self.op.is_some() || !self.queue.is_empty() {
            return;
        }
        if !*self.shared.script_done.borrow() {
            return;
        }
        self.start_bye("data finished");
    }

    fn end(&mut self, by: &str, reason: String, status: Option<u16>) {
        if self.ended {
            return;
        }
        self.ended = true;
        if let Some(op) = self.op.take() {
            for w in op.waiters {
                let _ = w.send(());
            }
        }
        self.emit(Event::Ended {
            session: self.id,
            by: by.into(),
            reason,
            status,
        });
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// Forwards a transaction's responses to the session; after a final response to an
/// INVITE, 2xx retransmissions are forwarded for `linger` (Timer M) more.
async fn forward(
    mut tx: ClientTx,
    cseq: u32,
    invite: bool,
    linger: Duration,
    itx: mpsc::UnboundedSender<Internal>,
) {
    let mut final_seen = false;
    loop {
        let ev = if final_seen {
            match tokio::time::timeout(linger, tx.recv()).await {
                Ok(ev) => ev,
                Err(_) => return,
            }
        } else {
            tx.recv().await
        };
        let resp = match ev {
            None => return,
            Some(ClientEvent::Response(r)) => r,
            Some(ClientEvent::TimedOut) => local_response(408, "Request Timeout"),
            Some(ClientEvent::Failed(e)) => local_response(503, &e),
        };
        let code = resp.status_code.code();
        if itx.send(Internal::Response { cseq, resp }).is_err() {
            return;
        }
        if code >= 200 {
            if !invite || code >= 300 {
                return;
            }
            final_seen = true;
        }
    }
}

/// A response made up locally (a timeout or a send failure), with a CSeq-less header set.
fn local_response(code: u16, reason: &str) -> Response {
    Response {
        status_code: message::status(code, Some(reason)),
        version: rsip::Version::V2,
        headers: rsip::Headers::default(),
        body: Vec::new(),
    }
}

/// The status of a `message/sipfrag` body (RFC 3420): its first line, `SIP/2.0 200 OK`.
pub fn parse_sipfrag(body: &[u8]) -> Option<(u16, String)> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text.lines().next()?.trim();
    let rest = line.strip_prefix("SIP/2.0")?.trim_start();
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    let code: u16 = code.parse().ok()?;
    (100..700)
        .contains(&code)
        .then(|| (code, reason.trim().to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn sipfrag_status_lines() {
        assert_eq!(
            parse_sipfrag(b"SIP/2.0 100 Trying\r\n"),
            Some((100, "Trying".into()))
        );
        assert_eq!(parse_sipfrag(b"SIP/2.0 200 OK"), Some((200, "OK".into())));
        assert_eq!(parse_sipfrag(b"SIP/2.0 603"), Some((603, String::new())));
        assert_eq!(parse_sipfrag(b"HTTP/1.1 200 OK"), None);
        assert_eq!(parse_sipfrag(b"SIP/2.0 99 Low"), None);
        assert_eq!(parse_sipfrag(&[0xff, 0xfe]), None);
    }
}
