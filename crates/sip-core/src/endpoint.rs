//! The tokio shell around the sans-IO [`TransactionLayer`]: it owns the transports and the
//! timers, parses what arrives through the [`wire`](crate::wire) layer, and gives a
//! transaction user an async API.
//!
//! State is sharded by Call-ID: each shard is one `TransactionLayer` behind its own lock, so
//! every message of a call meets the same state and no global lock sits on the path of a
//! message. The layer is driven inline by whoever has input for it — the receiving task with
//! a parsed message, a transaction user answering a request or starting one — and by one
//! timer task per shard that sleeps until the layer's next deadline. What the layer gives
//! back is taken out under the lock and acted on after it: datagrams are sent without
//! waiting (a send that would wait, or a stream connection still to open, goes to a task of
//! its own), events handed to the user's [`EventSink`]. A message thus reaches the user with
//! no hop between tasks, and a response leaves from the task that sent it.
//!
//! The user gets:
//! - a stream of [`EndpointEvent`]s: new requests (each with a [`ServerTx`] handle to answer
//!   it), CANCELs, ACKs for 2xx and stray responses (which belong to no transaction), and
//!   2xx responses that were never ACKed;
//! - [`Endpoint::send_request`], returning a [`ClientTx`] that yields the responses;
//! - [`Endpoint::send_stateless`] for what is sent outside a transaction (the ACK for a 2xx).
//!
//! Two limits guard the endpoint against a flood (RFC 3261 §26.1.5). With
//! [`EndpointConfig::rate_limit`] set, requests (ACK aside) are counted per source address
//! before they are parsed ([`crate::rate`]); one past the limit is answered
//! `503 Service Unavailable` with `Retry-After` (§21.5.4) outside any transaction, or, past the
//! answers allowed a second, dropped. And a message that cannot leave at once (a full UDP
//! socket buffer, a stream connection still to open) waits in a task of its own, but no more
//! than [`EndpointConfig::max_pending_sends`] of them at once: past that it is dropped and
//! counted (the transaction layer retransmits over UDP).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use rsip::prelude::*;
use rsip::{Header, Request, Response, SipMessage};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, trace, warn};

use crate::message::{self, RequestIds};
use crate::peer::{Peer, Transport};
use crate::rate::{RateLimit, RateLimiter, Verdict};
use crate::transaction::{
    After2xx, ClientTxId, Event, Output, ServerDeadlines, ServerTxId, Timers, TransactionLayer,
    Transmit,
};
use crate::transport::{Sink, TransportConfig, TransportError, Transports, TrySendError};
use crate::wire;

/// How an endpoint is set up.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Sockets to open and their limits.
    pub transport: TransportConfig,
    /// Transaction timer values (T1, T2, T4).
    pub timers: Timers,
    /// How long a server transaction waits for the user's final response before the
    /// transaction layer answers an INVITE 408 itself or drops another request (see
    /// [`ServerDeadlines`]); counted in [`EndpointStats::unanswered`].
    pub server_deadlines: ServerDeadlines,
    /// Number of shards (tasks each owning part of the transaction state). 0 picks twice the
    /// number of CPUs.
    pub shards: usize,
    /// How many events may wait for the user before new requests are refused with 503.
    pub event_queue: usize,
    /// The limit on requests per source address ([`crate::rate`]); `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// How many messages that could not be sent at once may wait for their socket at the
    /// same time, each in a task; past it they are dropped and counted.
    pub max_pending_sends: usize,
    /// What an INVITE client transaction does after its first 2xx ([`After2xx`]): with
    /// `Terminate`, later 2xx come as [`EndpointEvent::StrayResponse`] and the
    /// [`ClientTx`] gets the first one only.
    pub after_2xx: After2xx,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            transport: TransportConfig::default(),
            timers: Timers::default(),
            server_deadlines: ServerDeadlines::default(),
            shards: 0,
            event_queue: 16 * 1024,
            rate_limit: None,
            max_pending_sends: 4096,
            after_2xx: After2xx::default(),
        }
    }
}

/// Why the endpoint could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The transports could not be opened.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The request lacks what a transaction needs (Via branch, Call-ID, CSeq…).
    #[error("cannot send request: {0}")]
    Invalid(#[from] message::MessageError),
    /// The endpoint has shut down.
    #[error("endpoint is closed")]
    Closed,
}

/// Something the transaction user must act on.
#[derive(Debug)]
pub enum EndpointEvent {
    /// A new request, with the handle to answer it.
    Request(IncomingRequest),
    /// A CANCEL for a pending INVITE (RFC 3261 §9.2): answer `tx` with 200 and the INVITE's
    /// transaction `invite` with 487 if it has no final response yet.
    Cancel {
        /// The CANCEL.
        req: Request,
        /// Where it came from.
        from: Peer,
        /// The CANCEL's own transaction.
        tx: ServerTx,
        /// The INVITE transaction it cancels.
        invite: ServerTx,
    },
    /// An ACK for a 2xx (RFC 3261 §13.2.2.4): not part of any transaction.
    Ack {
        /// The ACK.
        ack: Request,
        /// Where it came from.
        from: Peer,
    },
    /// A response that matches no client transaction, such as a 2xx retransmitted after the
    /// transaction ended (the user may ACK it again).
    StrayResponse {
        /// The response.
        resp: Response,
        /// Where it came from.
        from: Peer,
    },
    /// A 2xx we sent was never ACKed within 64·T1 (RFC 3261 §13.3.1.4): the dialog should be
    /// ended with a BYE.
    AckTimeout {
        /// The INVITE transaction whose 2xx went unacknowledged.
        tx: ServerTx,
    },
}

/// A request that opened a server transaction. Cloning it clones the handle, not the
/// transaction: only one final response can be sent.
#[derive(Debug, Clone)]
pub struct IncomingRequest {
    /// The request, with RFC 3581 `received`/`rport` stamped on its top Via.
    pub req: Request,
    /// Where responses go: the source address (with the port the Via asks for) and, on a
    /// stream, the connection it arrived on.
    pub from: Peer,
    /// The handle to answer it.
    pub tx: ServerTx,
    /// Its Call-ID and tags, as the transaction layer read them (nobody reads them again).
    pub ids: RequestIds,
}

impl IncomingRequest {
    /// Answers the request `503 Server overloaded` with `Retry-After: 5` (RFC 3261 §21.5.4):
    /// what a user with no room for it does. An ACK gets no answer.
    pub fn refuse_overloaded(&self) {
        if self.req.method == rsip::Method::Ack {
            return;
        }
        let mut resp = message::response_for(
            &self.req,
            503,
            Some("Server overloaded"),
            Some(&message::new_tag()),
        );
        resp.headers
            .push(Header::RetryAfter(rsip::headers::RetryAfter::new("5")));
        let _ = self.tx.respond(resp);
    }

    /// The To tag of a response to this request sent with
    /// [`ServerTx::respond_stateless`]: the same for each retransmission of it (RFC 3261
    /// §8.2.7; see [`message::stateless_tag`]).
    pub fn stateless_tag(&self) -> String {
        let cseq = self.req.headers.iter().find_map(|h| match h {
            Header::CSeq(c) => Some(c.value()),
            _ => None,
        });
        message::stateless_tag(&self.ids, cseq.unwrap_or_default())
    }
}

/// A handle to answer one server transaction. Cheap to clone.
#[derive(Clone)]
pub struct ServerTx {
    id: ServerTxId,
    shard: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServerTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ServerTx").field(&self.id).finish()
    }
}

impl PartialEq for ServerTx {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.shard == other.shard && Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl ServerTx {
    /// The transaction's id within its shard.
    pub fn id(&self) -> ServerTxId {
        self.id
    }

    /// Sends a response on the transaction: any number of provisionals, then one final.
    /// A response the transaction cannot take (a second final) is logged and dropped.
    pub fn respond(&self, resp: Response) -> Result<(), EndpointError> {
        let id = self.id;
        self.shared.run(self.shard, |state, now| {
            if let Err(e) = state.layer.respond(now, id, resp) {
                warn!(tx = ?id, error = %e, "response not sent");
            }
        });
        Ok(())
    }

    /// Sends a final response and ends the transaction at once, keeping nothing of it: the
    /// stateless UAS of RFC 3261 §8.2.7, for challenges and refusals of requests not yet
    /// authenticated (see [`TransactionLayer::respond_stateless`]). A response it cannot
    /// send so (a provisional, a 2xx to an INVITE, a second final) is logged and dropped.
    pub fn respond_stateless(&self, resp: Response) {
        let id = self.id;
        self.shared.run(self.shard, |state, _now| {
            if let Err(e) = state.layer.respond_stateless(id, resp) {
                warn!(tx = ?id, error = %e, "stateless response not sent");
            }
        });
    }
}

/// What a client transaction reports to its user.
#[derive(Debug)]
pub enum ClientEvent {
    /// A response: provisionals, then a final; for an INVITE, 2xx retransmissions and the
    /// 2xx of other forks follow the first final.
    Response(Response),
    /// No final response came in time (Timer B or F): to be treated as a 408.
    TimedOut,
    /// The transaction could not be started or sent.
    Failed(String),
}

/// Where a client transaction's events go when its user takes them inline (see
/// [`Endpoint::send_request_to`]): called from the task that produced each event (a
/// receiving task or a timer task), after the shard's lock is released. It must not block.
pub trait ClientSink: Send + Sync + 'static {
    /// Takes one event of the transaction: provisionals, then its final response (for an
    /// INVITE, 2xx retransmissions and other forks' 2xx until Timer M), or a timeout.
    fn deliver(&self, event: ClientEvent);
    /// Whether the user has gone: the shard then stops keeping its handle.
    fn is_closed(&self) -> bool;
}

/// The sink behind a [`ClientTx`]: a queue its user reads.
struct ClientQueue(mpsc::UnboundedSender<Box<ClientEvent>>);

impl ClientSink for ClientQueue {
    fn deliver(&self, event: ClientEvent) {
        let _ = self.0.send(Box::new(event));
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The user's end of a client transaction.
#[derive(Debug)]
pub struct ClientTx {
    // Boxed events: a tokio channel allocates 32 slots at a time, and a slot holding a
    // whole response made that 3.5 KB per transaction, for as long as the transaction lives.
    rx: mpsc::UnboundedReceiver<Box<ClientEvent>>,
}

impl ClientTx {
    /// The next thing the transaction reports; `None` once it can report nothing more.
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        self.rx.recv().await.map(|e| *e)
    }

    /// Waits for the final response, skipping provisionals. A timeout or failure becomes a
    /// locally generated 408 or 503, as RFC 3261 §8.1.3.1 has the UA do.
    pub async fn final_response(&mut self) -> Response {
        loop {
            match self.recv().await {
                Some(ClientEvent::Response(r)) if r.status_code.code() >= 200 => return r,
                Some(ClientEvent::Response(_)) => continue,
                Some(ClientEvent::TimedOut) => return synthetic_response(408, "Request Timeout"),
                Some(ClientEvent::Failed(e)) => return synthetic_response(503, &e),
                None => return synthetic_response(503, "Transaction ended"),
            }
        }
    }
}

/// A response generated locally for a request that got none (RFC 3261 §8.1.3.1: a timeout
/// is treated as a 408, a transport failure as a 503): no headers, only the status.
pub fn synthetic_response(code: u16, reason: &str) -> Response {
    Response {
        status_code: message::status(code, Some(reason)),
        version: rsip::Version::V2,
        headers: rsip::Headers::default(),
        body: Vec::new(),
    }
}

/// Counters kept by the endpoint, for metrics.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Messages parsed and handed to the transaction layer.
    pub parsed: AtomicU64,
    /// Malformed requests answered with 400 or 501.
    pub rejected: AtomicU64,
    /// Malformed messages dropped without an answer.
    pub dropped: AtomicU64,
    /// Requests refused with 503 because the user's queue was full.
    pub overloaded: AtomicU64,
    /// Requests over the per-address rate limit answered 503 with Retry-After.
    pub rate_limited: AtomicU64,
    /// Requests over the per-address rate limit dropped unanswered (past the answers allowed
    /// a second).
    pub rate_dropped: AtomicU64,
    /// Messages dropped because [`EndpointConfig::max_pending_sends`] were already waiting
    /// for their sockets.
    pub sends_dropped: AtomicU64,
    /// Server transactions the user gave no final response by their deadline
    /// ([`EndpointConfig::server_deadlines`]): INVITEs the endpoint answered 408, other
    /// requests dropped.
    pub unanswered: AtomicU64,
}

/// Where an endpoint hands its [`EndpointEvent`]s: called inline, from the task that
/// produced the event (a receiving task, a timer task, or a transaction user's), after the
/// shard's lock is released, so it may call back into the endpoint. It must not block.
pub trait EventSink: Send + Sync + 'static {
    /// Takes one event. A new request given back (`Err`) means the user is overloaded: the
    /// endpoint answers it 503 with Retry-After. Other events given back are dropped.
    #[allow(clippy::result_large_err)]
    fn deliver(&self, event: EndpointEvent) -> Result<(), EndpointEvent>;
}

/// The sink of [`Endpoint::bind`]: a bounded queue read by the user. New requests are given
/// back when it is full; ACKs, CANCELs and stray responses belong to calls already under
/// way (losing one would lose a confirmation or a hang-up), so when it is full they wait
/// for room in a task of their own.
struct QueueSink {
    tx: mpsc::Sender<EndpointEvent>,
}

impl EventSink for QueueSink {
    fn deliver(&self, event: EndpointEvent) -> Result<(), EndpointEvent> {
        match self.tx.try_send(event) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(event @ EndpointEvent::Request(_))) => Err(event),
            Err(mpsc::error::TrySendError::Full(event)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(event).await;
                });
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }
}

/// One shard of the transaction state: the layer behind its lock, and the bell of its timer
/// task.
struct Shard {
    state: Mutex<ShardState>,
    /// Rung when the layer's next deadline moved earlier than the one the timer task sleeps
    /// until.
    timer: Notify,
}

struct ShardState {
    layer: TransactionLayer,
    /// The users of the shard's client transactions.
    clients: HashMap<ClientTxId, Arc<dyn ClientSink>>,
    /// The deadline the timer task sleeps until.
    armed: Option<std::time::Instant>,
}

/// What a shard's layer gave back, taken out under the lock and acted on after it.
#[derive(Default)]
struct Outbox {
    transmits: Vec<Transmit>,
    events: Vec<EndpointEvent>,
    client_events: Vec<(Arc<dyn ClientSink>, ClientEvent)>,
    /// The timer task must look at the deadline again.
    ring_timer: bool,
}

struct Shared {
    shards: Vec<Shard>,
    stats: EndpointStats,
    transports: std::sync::OnceLock<Transports>,
    sink: Arc<dyn EventSink>,
    rate: Option<RateLimiter>,
    /// Messages waiting in tasks for their sockets ([`Shared::send_later`]).
    pending_sends: Arc<std::sync::atomic::AtomicUsize>,
    max_pending_sends: usize,
    /// Whether an INVITE client transaction ends at its first 2xx.
    after_2xx: After2xx,
}

impl Shared {
    fn shard_for(&self, call_id: &str) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        call_id.hash(&mut h);
        (h.finish() as usize) % self.shards.len().max(1)
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, ShardState> {
        // Every operation on the state is a call into the sans-IO layer, which does not
        // panic on input; a poisoned lock is still consistent enough to go on.
        self.shards[shard]
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` on shard `shard`'s state under its lock, takes out what the layer gave back,
    /// and acts on it after the lock is released.
    fn run<R>(
        self: &Arc<Self>,
        shard: usize,
        op: impl FnOnce(&mut ShardState, std::time::Instant) -> R,
    ) -> R {
        let mut out = Outbox::default();
        let result = {
            let mut state = self.lock(shard);
            let now = std::time::Instant::now();
            let result = op(&mut state, now);
            self.take_output(shard, &mut state, &mut out);
            result
        };
        self.act(shard, out);
        result
    }

    /// Drains the layer's output into `out`, until its next deadline.
    fn take_output(self: &Arc<Self>, shard: usize, state: &mut ShardState, out: &mut Outbox) {
        loop {
            match state.layer.poll_output() {
                Output::Transmit(t) => out.transmits.push(t),
                Output::Event(e) => self.take_event(shard, state, e, out),
                Output::Timeout(deadline) => {
                    if let Some(d) = deadline {
                        out.ring_timer = state.armed.is_none_or(|armed| d < armed);
                    }
                    state.armed = deadline;
                    return;
                }
            }
        }
    }

    fn server_tx(self: &Arc<Self>, shard: usize, id: ServerTxId) -> ServerTx {
        ServerTx {
            id,
            shard,
            shared: Arc::clone(self),
        }
    }

    fn take_event(
        self: &Arc<Self>,
        shard: usize,
        state: &mut ShardState,
        event: Event,
        out: &mut Outbox,
    ) {
        let user = match event {
            Event::Request { tx, req, from, ids } => EndpointEvent::Request(IncomingRequest {
                req,
                from,
                tx: self.server_tx(shard, tx),
                ids: *ids,
            }),
            Event::Cancel {
                tx,
                invite,
                req,
                from,
            } => EndpointEvent::Cancel {
                req,
                from,
                tx: self.server_tx(shard, tx),
                invite: self.server_tx(shard, invite),
            },
            Event::Ack2xx { ack, from } => EndpointEvent::Ack { ack, from },
            Event::StrayResponse { resp, from } => EndpointEvent::StrayResponse { resp, from },
            Event::AckTimeout { tx } => EndpointEvent::AckTimeout {
                tx: self.server_tx(shard, tx),
            },
            Event::Response { tx, resp } => {
                let code = resp.status_code.code();
                let method_invite = resp.headers.iter().any(|h| {
                    matches!(h, Header::CSeq(c)
                        if matches!(crate::fields::cseq_of(c.value()), Some((_, rsip::Method::Invite))))
                });
                // After a final response nothing more comes, except further 2xx to an INVITE
                // whose transaction goes on to Accepted.
                let more = method_invite && self.after_2xx == After2xx::Accepted;
                let user = if code >= 300 || (code >= 200 && !more) {
                    state.clients.remove(&tx)
                } else {
                    state.clients.get(&tx).cloned()
                };
                if let Some(user) = user {
                    out.client_events.push((user, ClientEvent::Response(resp)));
                }
                return;
            }
            Event::TimedOut { tx } => {
                if let Some(user) = state.clients.remove(&tx) {
                    out.client_events.push((user, ClientEvent::TimedOut));
                }
                return;
            }
        };
        out.events.push(user);
    }

    /// Acts on what a shard's layer gave back: sends, then hands out events.
    fn act(self: &Arc<Self>, shard: usize, out: Outbox) {
        if out.ring_timer {
            self.shards[shard].timer.notify_one();
        }
        if let Some(transports) = self.transports.get() {
            for t in out.transmits {
                trace!(to = %t.to, len = t.bytes.len(), "transmit");
                match transports.try_send(&t.to, t.bytes) {
                    Ok(()) => {}
                    Err(TrySendError::Failed(e)) => debug!(to = %t.to, error = %e, "send failed"),
                    Err(TrySendError::WouldBlock(bytes)) => {
                        // A full socket buffer, or a stream connection to open: never hold
                        // up the task that drives the layer.
                        self.send_later(transports, t.to, bytes);
                    }
                }
            }
        }
        for (user, event) in out.client_events {
            user.deliver(event);
        }
        for event in out.events {
            match self.sink.deliver(event) {
                Ok(()) => {}
                Err(EndpointEvent::Request(r)) => self.overloaded(&r),
                Err(_) => {
                    self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Sends `bytes` to `to` from a task of its own (it could not leave at once), unless
    /// [`EndpointConfig::max_pending_sends`] are waiting already: then it is dropped and
    /// counted. Each waits at most the transport's connect or write timeout.
    fn send_later(&self, transports: &Transports, to: Peer, bytes: Bytes) {
        let pending = Arc::clone(&self.pending_sends);
        if pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending_sends {
            pending.fetch_sub(1, Ordering::AcqRel);
            self.stats.sends_dropped.fetch_add(1, Ordering::Relaxed);
            debug!(%to, "too many sends waiting; message dropped");
            return;
        }
        let transports = transports.clone();
        tokio::spawn(async move {
            if let Err(e) = transports.send(&to, bytes).await {
                debug!(%to, error = %e, "send failed");
            }
            pending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Sends `bytes` to `to` now if it can leave without waiting, else from a task
    /// ([`Shared::send_later`]).
    fn send_now_or_later(&self, transports: &Transports, to: Peer, bytes: Bytes) {
        match transports.try_send(&to, bytes) {
            Ok(()) => {}
            Err(TrySendError::Failed(e)) => debug!(%to, error = %e, "send failed"),
            Err(TrySendError::WouldBlock(bytes)) => self.send_later(transports, to, bytes),
        }
    }

    /// Whether a message from `from` may go on, under the per-address rate limit: a request
    /// (not an ACK, not a response) over it is answered 503 with Retry-After or dropped,
    /// and counted. Looks at the start line only; parses only to answer.
    fn within_rate(&self, from: Peer, bytes: &Bytes) -> bool {
        let Some(rate) = &self.rate else {
            return true;
        };
        if !counts_for_rate(bytes) {
            return true;
        }
        match rate.check(from.addr.ip(), std::time::Instant::now()) {
            Verdict::Pass => true,
            Verdict::Drop => {
                self.stats.rate_dropped.fetch_add(1, Ordering::Relaxed);
                trace!(%from, "over the rate limit; dropped");
                false
            }
            Verdict::Refuse { retry_after } => {
                let answered = match (wire::parse(bytes), self.transports.get()) {
                    (Ok(SipMessage::Request(req)), Some(transports)) => {
                        let to = response_peer(&req, from);
                        let mut resp = message::response_for(
                            &req,
                            503,
                            Some("Too many requests"),
                            Some(&message::new_tag()),
                        );
                        resp.headers
                            .push(Header::RetryAfter(rsip::headers::RetryAfter::new(
                                retry_after.to_string(),
                            )));
                        // Never waits: an answer that cannot leave at once is not sent.
                        transports
                            .try_send(&to, message::to_bytes(SipMessage::Response(resp)))
                            .is_ok()
                    }
                    _ => false,
                };
                let counter = if answered {
                    &self.stats.rate_limited
                } else {
                    &self.stats.rate_dropped
                };
                counter.fetch_add(1, Ordering::Relaxed);
                debug!(%from, retry_after, answered, "over the rate limit; refused");
                false
            }
        }
    }

    /// Answers a request the user had no room for (see [`IncomingRequest::refuse_overloaded`])
    /// and counts it.
    fn overloaded(self: &Arc<Self>, r: &IncomingRequest) {
        self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
        r.refuse_overloaded();
    }

    /// The timer task of one shard: sleeps until the layer's next deadline (or until an
    /// earlier one is rung in), fires the timers due, and now and then forgets client
    /// transactions whose user has gone.
    async fn timers(self: Arc<Self>, shard: usize) {
        let mut next_sweep = tokio::time::Instant::now() + SWEEP_EVERY;
        loop {
            let armed = self.lock(shard).armed;
            let wake = match armed {
                Some(d) => tokio::time::Instant::from_std(d).min(next_sweep),
                None => next_sweep,
            };
            tokio::select! {
                _ = self.shards[shard].timer.notified() => continue,
                _ = tokio::time::sleep_until(wake) => {}
            }
            let now = tokio::time::Instant::now();
            let sweep = now >= next_sweep;
            if sweep {
                next_sweep = now + SWEEP_EVERY;
            }
            self.run(shard, |state, _| {
                let before = state.layer.unanswered();
                state.layer.handle_timeout(now.into_std());
                let unanswered = state.layer.unanswered().saturating_sub(before);
                if unanswered > 0 {
                    self.stats
                        .unanswered
                        .fetch_add(unanswered, Ordering::Relaxed);
                }
                if sweep {
                    state.clients.retain(|_, tx| !tx.is_closed());
                }
            });
        }
    }
}

/// The SIP endpoint: transports, sharded transaction state and the user's API. Cheap to
/// clone.
#[derive(Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
    transports: Transports,
}

struct EndpointSink(Weak<Shared>);

impl Sink for EndpointSink {
    fn deliver(&self, from: Peer, bytes: Bytes) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            // A keep-alive (RFC 5626 §4.4.1 CRLF on UDP): nothing to do.
            return;
        }
        if !shared.within_rate(from, &bytes) {
            return;
        }
        match wire::parse(&bytes) {
            Ok(msg) => {
                shared.stats.parsed.fetch_add(1, Ordering::Relaxed);
                let Some(shard) = call_id_of(&msg).map(|cid| shared.shard_for(cid)) else {
                    shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let (msg, from) = stamp(msg, from);
                shared.run(shard, |state, now| {
                    state.layer.handle_message(now, msg, from)
                });
            }
            Err(err) => {
                let reply = wire::reject(&bytes, &err);
                match (reply, shared.transports.get()) {
                    (Some(reply), Some(transports)) => {
                        shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        debug!(%from, error = %err, "malformed request answered");
                        shared.send_now_or_later(transports, from, reply);
                    }
                    _ => {
                        shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        debug!(%from, error = %err, "malformed message dropped");
                    }
                }
            }
        }
    }
}

/// Whether a message counts against the per-address rate limit: anything but a response
/// (`SIP/2.0 …`) or an ACK (which gets no answer, and losing one would lose a confirmation).
fn counts_for_rate(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&[][..], |i| &bytes[i..]);
    !(start.starts_with(b"SIP/") || start.starts_with(b"ACK "))
}

fn call_id_of(msg: &SipMessage) -> Option<&str> {
    msg.headers().iter().find_map(|h| match h {
        Header::CallId(c) => Some(c.value().trim()),
        _ => None,
    })
}

/// Stamps RFC 3581 `received`/`rport` on a request's top Via and works out where its
/// responses go (RFC 3261 §18.2.2): the source address when `rport` was asked for or the
/// transport is a stream, else the source IP with the Via's sent-by port.
fn stamp(msg: SipMessage, from: Peer) -> (SipMessage, Peer) {
    match msg {
        SipMessage::Request(mut req) => {
            let target = response_peer(&req, from);
            message::stamp_received(&mut req, from.addr);
            (SipMessage::Request(req), target)
        }
        other => (other, from),
    }
}

fn response_peer(req: &Request, from: Peer) -> Peer {
    if from.transport.is_reliable() {
        return from;
    }
    let Some(via) = req.headers.iter().find_map(|h| match h {
        Header::Via(v) => Some(v),
        _ => None,
    }) else {
        return from;
    };
    // Whether rport was asked for, and the sent-by port: in one pass, or through rsip.
    let (asks_rport, port) = match message::top_via(via.value()) {
        Some(view) => (view.param("rport").is_some(), view.port),
        None => {
            let Ok(via) = rsip::typed::Via::try_from(via.clone()) else {
                return from;
            };
            let asks_rport = via.params.iter().any(|p| match p {
                rsip::Param::Other(name, _) => name.value().eq_ignore_ascii_case("rport"),
                _ => false,
            });
            (asks_rport, via.uri.host_with_port.port.map(|p| *p.value()))
        }
    };
    if asks_rport {
        return from;
    }
    Peer {
        addr: SocketAddr::new(
            from.addr.ip(),
            port.unwrap_or(from.transport.default_port()),
        ),
        ..from
    }
}

impl Endpoint {
    /// Opens the transports and starts the shards. Returns the endpoint and the stream of
    /// events for its user (a queue of `config.event_queue` events: new requests beyond it
    /// are answered 503).
    pub async fn bind(
        config: EndpointConfig,
    ) -> Result<(Endpoint, mpsc::Receiver<EndpointEvent>), EndpointError> {
        let (tx, rx) = mpsc::channel(config.event_queue.max(1));
        let endpoint = Endpoint::bind_with_sink(config, Arc::new(QueueSink { tx })).await?;
        Ok((endpoint, rx))
    }

    /// Opens the transports and starts the shards, handing events to `sink` inline, from
    /// the task that produced each (see [`EventSink`]): no queue and no task between a
    /// message and its user. `config.event_queue` is not used.
    pub async fn bind_with_sink(
        config: EndpointConfig,
        sink: Arc<dyn EventSink>,
    ) -> Result<Endpoint, EndpointError> {
        let n = if config.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4)
        } else {
            config.shards
        };
        let shards = (0..n)
            .map(|_| Shard {
                state: Mutex::new(ShardState {
                    layer: TransactionLayer::new(config.timers)
                        .with_server_deadlines(config.server_deadlines)
                        .with_after_2xx(config.after_2xx),
                    clients: HashMap::new(),
                    armed: None,
                }),
                timer: Notify::new(),
            })
            .collect();
        let shared = Arc::new(Shared {
            shards,
            stats: EndpointStats::default(),
            transports: std::sync::OnceLock::new(),
            sink,
            rate: config.rate_limit.clone().map(RateLimiter::new),
            pending_sends: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            max_pending_sends: config.max_pending_sends,
            after_2xx: config.after_2xx,
        });
        let receiver = Arc::new(EndpointSink(Arc::downgrade(&shared)));
        let transports = Transports::bind(config.transport.clone(), receiver).await?;
        let _ = shared.transports.set(transports.clone());
        for i in 0..n {
            tokio::spawn(Arc::clone(&shared).timers(i));
        }
        Ok(Endpoint { shared, transports })
    }

    /// Starts a client transaction for `req` towards `to`. The request must carry its top Via
    /// with a fresh branch (see [`Endpoint::via`]); an ACK is not a transaction (use
    /// [`Endpoint::send_stateless`]).
    pub fn send_request(&self, req: Request, to: Peer) -> Result<ClientTx, EndpointError> {
        let (events, rx) = mpsc::unbounded_channel();
        self.send_request_to(req, to, Arc::new(ClientQueue(events)))?;
        Ok(ClientTx { rx })
    }

    /// Starts a client transaction whose events go to `sink` inline, with no task or queue
    /// of the endpoint's in between (as [`Endpoint::send_request`] otherwise). A request the
    /// transaction layer refuses reaches the sink as [`ClientEvent::Failed`].
    pub fn send_request_to(
        &self,
        req: Request,
        to: Peer,
        sink: Arc<dyn ClientSink>,
    ) -> Result<(), EndpointError> {
        let summary = message::Summary::of_request(&req)?;
        let shard = self.shared.shard_for(&summary.call_id);
        let refused = self.shared.run(shard, |state, now| {
            match state.layer.send_request(now, req, to) {
                Ok(id) => {
                    state.clients.insert(id, Arc::clone(&sink));
                    None
                }
                Err(e) => Some(e.to_string()),
            }
        });
        if let Some(e) = refused {
            sink.deliver(ClientEvent::Failed(e));
        }
        Ok(())
    }

    /// Sends a message outside any transaction: the ACK for a 2xx, or a stateless response.
    pub async fn send_stateless(
        &self,
        to: &Peer,
        msg: impl Into<SipMessage>,
    ) -> Result<(), EndpointError> {
        self.transports
            .send(to, message::to_bytes(msg))
            .await
            .map_err(EndpointError::from)
    }

    /// A top Via header for a request leaving on `transport`: our sent-by, a fresh branch and
    /// `rport` (RFC 3581).
    pub fn via(&self, transport: Transport) -> Header {
        let addr = self
            .transports
            .local_addr(transport)
            .or_else(|| self.transports.local_addr(Transport::Udp));
        let sent_by = addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "127.0.0.1".into());
        Header::Via(rsip::headers::Via::new(format!(
            "SIP/2.0/{} {};branch={};rport",
            transport.via_name(),
            sent_by,
            message::new_branch()
        )))
    }

    /// The local address of a transport's first socket.
    pub fn local_addr(&self, transport: Transport) -> Option<SocketAddr> {
        self.transports.local_addr(transport)
    }

    /// The open transports and their sockets.
    pub fn transports(&self) -> &Transports {
        &self.transports
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &EndpointStats {
        &self.shared.stats
    }

    /// Source addresses the rate limit tracks right now (0 without a limit).
    pub fn rate_tracked_sources(&self) -> usize {
        self.shared.rate.as_ref().map_or(0, RateLimiter::tracked)
    }

    /// Transactions alive right now, client and server, over every shard (each shard's
    /// lock taken in turn, briefly): what the endpoint keeps for messages in flight.
    pub fn transactions(&self) -> usize {
        (0..self.shared.shards.len())
            .map(|shard| self.shared.lock(shard).layer.len())
            .sum()
    }

    /// Messages waiting in tasks for their sockets right now (at most
    /// [`EndpointConfig::max_pending_sends`]).
    pub fn pending_sends(&self) -> usize {
        self.shared.pending_sends.load(Ordering::Relaxed)
    }
}

/// How often a shard forgets client transactions whose user has gone.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
