//! The tokio shell around the sans-IO [`TransactionLayer`]: it owns the transports and the
//! timers, parses what arrives through the [`wire`](crate::wire) layer, and gives a
//! transaction user an async API.
//!
//! State is sharded by Call-ID: each shard is one task owning one `TransactionLayer`, fed by a
//! channel, so every message of a call meets the same state and no global lock sits on the
//! path of a message. Parsing happens in the receiving task, before the shard is chosen.
//!
//! The user gets:
//! - a stream of [`EndpointEvent`]s: new requests (each with a [`ServerTx`] handle to answer
//!   it), CANCELs, ACKs for 2xx and stray responses (which belong to no transaction), and
//!   2xx responses that were never ACKed;
//! - [`Endpoint::send_request`], returning a [`ClientTx`] that yields the responses;
//! - [`Endpoint::send_stateless`] for what is sent outside a transaction (the ACK for a 2xx).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use rsip::prelude::*;
use rsip::{Header, Request, Response, SipMessage};
use tokio::sync::mpsc;
use tracing::{debug, trace, warn};

use crate::message;
use crate::peer::{Peer, Transport};
use crate::transaction::{ClientTxId, Event, Output, ServerTxId, Timers, TransactionLayer};
use crate::transport::{Sink, TransportConfig, TransportError, Transports};
use crate::wire;

/// How an endpoint is set up.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Sockets to open and their limits.
    pub transport: TransportConfig,
    /// Transaction timer values (T1, T2, T4).
    pub timers: Timers,
    /// Number of shards (tasks each owning part of the transaction state). 0 picks twice the
    /// number of CPUs.
    pub shards: usize,
    /// How many events may wait for the user before new requests are refused with 503.
    pub event_queue: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            transport: TransportConfig::default(),
            timers: Timers::default(),
            shards: 0,
            event_queue: 16 * 1024,
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
}

/// A handle to answer one server transaction. Cheap to clone.
#[derive(Clone)]
pub struct ServerTx {
    id: ServerTxId,
    shard: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for ServerTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ServerTx").field(&self.id).finish()
    }
}

impl PartialEq for ServerTx {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.shard.same_channel(&other.shard)
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
        self.shard
            .send(Command::Respond { tx: self.id, resp })
            .map_err(|_| EndpointError::Closed)
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
}

enum Command {
    Incoming {
        msg: SipMessage,
        from: Peer,
    },
    Send {
        req: Request,
        to: Peer,
        events: mpsc::UnboundedSender<Box<ClientEvent>>,
    },
    Respond {
        tx: ServerTxId,
        resp: Response,
    },
}

struct Shared {
    shards: Vec<mpsc::UnboundedSender<Command>>,
    stats: EndpointStats,
    transports: std::sync::OnceLock<Transports>,
}

impl Shared {
    fn shard_for(&self, call_id: &str) -> &mpsc::UnboundedSender<Command> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        call_id.hash(&mut h);
        let n = self.shards.len().max(1);
        &self.shards[(h.finish() as usize) % n]
    }
}

/// The SIP endpoint: transports, sharded transaction state and the user's API. Cheap to
/// clone; the endpoint runs until every clone and the event receiver are dropped.
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
        match wire::parse(&bytes) {
            Ok(msg) => {
                shared.stats.parsed.fetch_add(1, Ordering::Relaxed);
                let Some(call_id) = call_id_of(&msg) else {
                    shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let (msg, from) = stamp(msg, from);
                let _ = shared
                    .shard_for(&call_id)
                    .send(Command::Incoming { msg, from });
            }
            Err(err) => {
                let reply = wire::reject(&bytes, &err);
                match (reply, shared.transports.get()) {
                    (Some(reply), Some(transports)) => {
                        shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        debug!(%from, error = %err, "malformed request answered");
                        let transports = transports.clone();
                        tokio::spawn(async move {
                            let _ = transports.send(&from, reply).await;
                        });
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

fn call_id_of(msg: &SipMessage) -> Option<String> {
    msg.headers().iter().find_map(|h| match h {
        Header::CallId(c) => Some(c.value().trim().to_string()),
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
    /// events for its user.
    pub async fn bind(
        config: EndpointConfig,
    ) -> Result<(Endpoint, mpsc::Receiver<EndpointEvent>), EndpointError> {
        let n = if config.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4)
        } else {
            config.shards
        };
        let (event_tx, event_rx) = mpsc::channel(config.event_queue.max(1));
        let mut senders = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            receivers.push(rx);
        }
        let shared = Arc::new(Shared {
            shards: senders,
            stats: EndpointStats::default(),
            transports: std::sync::OnceLock::new(),
        });
        let sink = Arc::new(EndpointSink(Arc::downgrade(&shared)));
        let transports = Transports::bind(config.transport.clone(), sink).await?;
        let _ = shared.transports.set(transports.clone());
        for (i, rx) in receivers.into_iter().enumerate() {
            let shard = Shard {
                layer: TransactionLayer::new(config.timers),
                rx,
                me: shared.shards[i].clone(),
                events: event_tx.clone(),
                transports: transports.clone(),
                clients: HashMap::new(),
                shared: Arc::downgrade(&shared),
            };
            tokio::spawn(shard.run());
        }
        Ok((Endpoint { shared, transports }, event_rx))
    }

    /// Starts a client transaction for `req` towards `to`. The request must carry its top Via
    /// with a fresh branch (see [`Endpoint::via`]); an ACK is not a transaction (use
    /// [`Endpoint::send_stateless`]).
    pub fn send_request(&self, req: Request, to: Peer) -> Result<ClientTx, EndpointError> {
        let summary = message::Summary::of_request(&req)?;
        let (events, rx) = mpsc::unbounded_channel();
        self.shared
            .shard_for(&summary.call_id)
            .send(Command::Send { req, to, events })
            .map_err(|_| EndpointError::Closed)?;
        Ok(ClientTx { rx })
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
}

struct Shard {
    layer: TransactionLayer,
    rx: mpsc::UnboundedReceiver<Command>,
    me: mpsc::UnboundedSender<Command>,
    events: mpsc::Sender<EndpointEvent>,
    transports: Transports,
    clients: HashMap<ClientTxId, mpsc::UnboundedSender<Box<ClientEvent>>>,
    shared: Weak<Shared>,
}

/// How often a shard forgets client transactions whose user has gone.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

impl Shard {
    async fn run(mut self) {
        let mut next_sweep = tokio::time::Instant::now() + SWEEP_EVERY;
        loop {
            let deadline = self.drain().await;
            let wake = match deadline {
                Some(d) => tokio::time::Instant::from_std(d).min(next_sweep),
                None => next_sweep,
            };
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => {
                    let now = tokio::time::Instant::now();
                    self.layer.handle_timeout(now.into_std());
                    if now >= next_sweep {
                        self.clients.retain(|_, tx| !tx.is_closed());
                        next_sweep = now + SWEEP_EVERY;
                    }
                }
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        let now = tokio::time::Instant::now().into_std();
        match cmd {
            Command::Incoming { msg, from } => self.layer.handle_message(now, msg, from),
            Command::Send { req, to, events } => match self.layer.send_request(now, req, to) {
                Ok(id) => {
                    self.clients.insert(id, events);
                }
                Err(e) => {
                    let _ = events.send(Box::new(ClientEvent::Failed(e.to_string())));
                }
            },
            Command::Respond { tx, resp } => {
                if let Err(e) = self.layer.respond(now, tx, resp) {
                    warn!(?tx, error = %e, "response not sent");
                }
            }
        }
    }

    /// Sends everything the layer has to send and hands its events out; returns the next
    /// deadline.
    async fn drain(&mut self) -> Option<std::time::Instant> {
        loop {
            match self.layer.poll_output() {
                Output::Transmit(t) => {
                    trace!(to = %t.to, len = t.bytes.len(), "transmit");
                    if t.to.transport == Transport::Udp {
                        if let Err(e) = self.transports.send(&t.to, t.bytes).await {
                            debug!(to = %t.to, error = %e, "send failed");
                        }
                    } else {
                        // A stream send may have to connect first: never hold up the shard.
                        let transports = self.transports.clone();
                        tokio::spawn(async move {
                            if let Err(e) = transports.send(&t.to, t.bytes).await {
                                debug!(to = %t.to, error = %e, "send failed");
                            }
                        });
                    }
                }
                Output::Event(e) => self.event(e),
                Output::Timeout(deadline) => return deadline,
            }
        }
    }

    fn server_tx(&self, id: ServerTxId) -> ServerTx {
        ServerTx {
            id,
            shard: self.me.clone(),
        }
    }

    fn event(&mut self, event: Event) {
        let user = match event {
            Event::Request { tx, req, from } => {
                let handle = self.server_tx(tx);
                match self
                    .events
                    .try_send(EndpointEvent::Request(IncomingRequest {
                        req,
                        from,
                        tx: handle,
                    })) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(EndpointEvent::Request(r))) => {
                        self.overloaded(tx, &r.req);
                    }
                    Err(_) => {}
                }
                return;
            }
            Event::Cancel {
                tx,
                invite,
                req,
                from,
            } => EndpointEvent::Cancel {
                req,
                from,
                tx: self.server_tx(tx),
                invite: self.server_tx(invite),
            },
            Event::Ack2xx { ack, from } => EndpointEvent::Ack { ack, from },
            Event::StrayResponse { resp, from } => EndpointEvent::StrayResponse { resp, from },
            Event::AckTimeout { tx } => EndpointEvent::AckTimeout {
                tx: self.server_tx(tx),
            },
            Event::Response { tx, resp } => {
                let code = resp.status_code.code();
                let method_invite = resp.headers.iter().any(|h| {
                    matches!(h, Header::CSeq(c)
                        if matches!(crate::fields::cseq_of(c.value()), Some((_, rsip::Method::Invite))))
                });
                if let Some(user) = self.clients.get(&tx) {
                    let _ = user.send(Box::new(ClientEvent::Response(resp)));
                }
                // After a final response nothing more comes, except further 2xx to an INVITE.
                if code >= 300 || (code >= 200 && !method_invite) {
                    self.clients.remove(&tx);
                }
                return;
            }
            Event::TimedOut { tx } => {
                if let Some(user) = self.clients.remove(&tx) {
                    let _ = user.send(Box::new(ClientEvent::TimedOut));
                }
                return;
            }
        };
        // ACKs, CANCELs and stray responses belong to calls already under way: losing one
        // would lose a confirmation or a hang-up. When the queue is full they wait for room
        // in a task of their own (new requests are the ones refused with 503).
        if let Err(mpsc::error::TrySendError::Full(user)) = self.events.try_send(user) {
            if let Some(shared) = self.shared.upgrade() {
                shared.stats.overloaded.fetch_add(1, Ordering::Relaxed);
            }
            let events = self.events.clone();
            tokio::spawn(async move {
                let _ = events.send(user).await;
            });
        }
    }

    fn overloaded(&mut self, tx: ServerTxId, req: &Request) {
        if let Some(shared) = self.shared.upgrade() {
            shared.stats.overloaded.fetch_add(1, Ordering::Relaxed);
        }
        if req.method == rsip::Method::Ack {
            return;
        }
        let mut resp = message::response_for(
            req,
            503,
            Some("Server overloaded"),
            Some(&message::new_tag()),
        );
        resp.headers
            .push(Header::RetryAfter(rsip::headers::RetryAfter::new("5")));
        let now = tokio::time::Instant::now().into_std();
        if let Err(e) = self.layer.respond(now, tx, resp) {
            debug!(error = %e, "503 not sent");
        }
    }
}
