//! SIP transactions (RFC 3261 §17, with RFC 6026's Accepted states), sans-IO.
//!
//! [`TransactionLayer`] holds every client and server transaction of an endpoint. It never
//! touches a socket or a clock: the caller feeds it messages that came off the wire
//! ([`TransactionLayer::handle_message`]), the passing of time
//! ([`TransactionLayer::handle_timeout`]) and the user's requests and responses
//! ([`TransactionLayer::send_request`], [`TransactionLayer::respond`]), then drains
//! [`TransactionLayer::poll_output`] for what to transmit, the events for the user, and
//! finally the next deadline, in the manner of `quinn-proto` and `str0m`.
//!
//! The four state machines live in [`client`] and [`server`]; matching (§17.1.3, §17.2.3) in
//! [`matching`]; timer values and the deadline queue in [`timers`]. Every message is
//! serialised once and its bytes kept for retransmission.

mod client;
mod linger;
mod matching;
mod server;
mod timers;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rsip::{Method, Request, Response, SipMessage};
use tracing::{debug, trace};

use crate::message::{response_for, MessageError, RequestIds, Summary, BRANCH_COOKIE};
use crate::Peer;

use client::ClientTx;
use linger::Lingering;
use matching::{method_key, AckKey, ClientKey, IdHash, ServerKey};
use server::{AckDisposition, ServerTx};
use timers::{Entry, TimerQueue, TxRef};

pub use timers::Timers;

/// Identifies a client transaction of one [`TransactionLayer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientTxId(pub u64);

/// Identifies a server transaction of one [`TransactionLayer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerTxId(pub u64);

/// Bytes to send to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The destination: transport, address and, for a response, the connection its request
    /// came on.
    pub to: Peer,
    /// The serialised message (shared with the transaction's copy for retransmission).
    pub bytes: Bytes,
}

/// Something the user of the transaction layer (the transaction user, TU) must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new server transaction (any method but ACK and a CANCEL that matched).
    Request {
        /// The transaction to answer with [`TransactionLayer::respond`].
        tx: ServerTxId,
        /// The request.
        req: Request,
        /// Where it came from.
        from: Peer,
        /// Its Call-ID and tags, as read here (boxed: an `Event` travels by value).
        ids: Box<RequestIds>,
    },
    /// A CANCEL matching a live INVITE server transaction (§9.2). The user answers `tx`
    /// (200) and the INVITE `invite` (487; [`TxError::AlreadyFinal`] if the INVITE already
    /// has its final response, which the CANCEL then does not change).
    Cancel {
        /// The CANCEL's own (non-INVITE) transaction.
        tx: ServerTxId,
        /// The INVITE transaction it cancels.
        invite: ServerTxId,
        /// The CANCEL request.
        req: Request,
        /// Where it came from.
        from: Peer,
    },
    /// A response for one of our client transactions: 1xx, 2xx (2xx retransmissions in
    /// Accepted state too, RFC 6026 §7.2), 3xx–6xx (only the first; retransmissions
    /// absorbed).
    Response {
        /// The client transaction.
        tx: ClientTxId,
        /// The response.
        resp: Response,
    },
    /// An ACK that matches no server transaction: the ACK for a 2xx (dialog level,
    /// §13.2.2.4 and the note of §17.2.3). If it acknowledges a 2xx we are retransmitting,
    /// the retransmissions have stopped.
    Ack2xx {
        /// The ACK.
        ack: Request,
        /// Where it came from.
        from: Peer,
    },
    /// A response that matches no client transaction (e.g. a 2xx retransmission after
    /// Timer M, or a 2xx from another fork after a non-2xx final): for the user, who may
    /// re-ACK.
    StrayResponse {
        /// The response.
        resp: Response,
        /// Where it came from.
        from: Peer,
    },
    /// Timer B or F fired (or the transport failed, §17.1.4): the user sees it like a 408.
    TimedOut {
        /// The client transaction that gave up.
        tx: ClientTxId,
    },
    /// A 2xx we sent to an INVITE was not ACKed within 64·T1 (§13.3.1.4): the UAS core
    /// should end the dialog (BYE).
    AckTimeout {
        /// The INVITE server transaction.
        tx: ServerTxId,
    },
}

/// What [`TransactionLayer::poll_output`] gives: drain until [`Output::Timeout`].
#[derive(Debug, Clone, PartialEq)]
// Outputs are drained one by one as they are made, never stored in bulk: boxing the
// event would cost an allocation per message for no memory kept.
#[allow(clippy::large_enum_variant)]
pub enum Output {
    /// Bytes to send.
    Transmit(Transmit),
    /// An event for the user.
    Event(Event),
    /// Nothing more for now: call [`TransactionLayer::handle_timeout`] at this instant (if
    /// any) unless a message comes first.
    Timeout(Option<Instant>),
}

/// Why the transaction layer refused a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The transaction does not exist (never did, or has terminated).
    #[error("no such transaction")]
    UnknownTransaction,
    /// The transaction has sent its final response already.
    #[error("the transaction already has a final response")]
    AlreadyFinal,
    /// The request lacks what a transaction needs (Via branch, Call-ID, CSeq…).
    #[error("invalid message: {0}")]
    InvalidMessage(#[from] MessageError),
    /// An ACK is not a transaction: the ACK for a 2xx is sent by the caller itself
    /// (§13.2.2.4), the ACK for a non-2xx by the INVITE client transaction.
    #[error("ACK is not sent through a client transaction")]
    AckNotATransaction,
    /// A client transaction with this branch and method is already running (§17.1.3: the
    /// branch must be fresh).
    #[error("a transaction with this branch and method already exists")]
    DuplicateTransaction,
    /// A response status outside 100–699.
    #[error("invalid status code {0}")]
    InvalidStatus(u16),
}

/// How long a server transaction waits for its transaction user's final response.
///
/// RFC 3261 §17.2 bounds a server transaction only once it has sent its final response;
/// one whose TU never answers would otherwise be kept for ever. At its deadline:
///
/// - an INVITE transaction is answered 408 (Request Timeout) by the layer, with the To tag
///   of the TU's last provisional (or a fresh one), and then ends like any non-2xx: Timer G
///   resends it over UDP, the ACK is absorbed, Timer H or I removes it. Its deadline is
///   counted from the request, and again from a provisional the TU sends once a tenth of it
///   has run (like a proxy's Timer C, §16.8, since a UAS may ring for minutes; not from
///   every provisional, so that a TU passing on many leaves no timer entry for each): it
///   falls between 0.9 and 1 times the deadline after the TU's last provisional;
/// - any other transaction (CANCEL included) is dropped without an answer: its client's
///   Timer F has fired by then, and a 408 to a non-INVITE request is never sent (RFC 4320
///   §4.2).
///
/// Both are counted in [`TransactionLayer::unanswered`]. A later [`TransactionLayer::respond`]
/// gets [`TxError::AlreadyFinal`] or [`TxError::UnknownTransaction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerDeadlines {
    /// An INVITE's deadline, from the request or the TU's last provisional (default 180 s,
    /// the least RFC 3261 §16.8 allows for Timer C). Keep it a tenth above the longest a
    /// TU may wait for a callee between two provisionals.
    pub invite: Duration,
    /// A non-INVITE request's deadline, from the request; `None` (the default): 64·T1,
    /// when the client's Timer F fires.
    pub non_invite: Option<Duration>,
}

impl Default for ServerDeadlines {
    fn default() -> Self {
        ServerDeadlines {
            invite: Duration::from_secs(180),
            non_invite: None,
        }
    }
}

/// The longest deadline run with, so that adding it to an `Instant` cannot overflow.
const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

impl ServerDeadlines {
    /// The values clamped to 1 ms – 24 h.
    fn normalized(self) -> ServerDeadlines {
        let clamp = |d: Duration| d.clamp(Duration::from_millis(1), MAX_DEADLINE);
        ServerDeadlines {
            invite: clamp(self.invite),
            non_invite: self.non_invite.map(clamp),
        }
    }

    /// The non-INVITE deadline with `timers`.
    fn non_invite(&self, timers: &Timers) -> Duration {
        self.non_invite
            .unwrap_or_else(|| timers.transaction_timeout())
    }
}

/// Tables at or under this capacity are left as they are: their room costs little.
const KEEP_CAPACITY: usize = 256;

/// Shrinks `map` to twice its entries once it is under a quarter full and larger than
/// [`KEEP_CAPACITY`].
fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if map.capacity() > KEEP_CAPACITY && map.len() < map.capacity() / 4 {
        map.shrink_to((map.len() * 2).max(KEEP_CAPACITY / 2));
    }
}

/// Whether a timer entry is the live one of its transaction (not re-armed, disarmed, or of
/// a transaction that ended).
fn entry_is_live(
    clients: &HashMap<ClientTxId, Box<ClientTx>, IdHash>,
    servers: &HashMap<ServerTxId, Box<ServerTx>, IdHash>,
    entry: &Entry,
) -> bool {
    match entry.tx {
        TxRef::Client(id) => clients
            .get(&id)
            .is_some_and(|tx| tx.timers.is_live(entry.slot, entry.at)),
        TxRef::Server(id) => servers
            .get(&id)
            .is_some_and(|tx| tx.timers.is_live(entry.slot, entry.at)),
    }
}

/// Whether a transaction lives on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// It goes on.
    Live,
    /// It reached Terminated and is to be removed.
    Terminated,
}

/// What a transaction may touch while it handles an input: the output queue, the timer
/// queue, the timer values and the TU's deadlines.
struct Io<'a> {
    out: &'a mut VecDeque<Output>,
    queue: &'a mut TimerQueue,
    timers: &'a Timers,
    deadlines: &'a ServerDeadlines,
    after_2xx: After2xx,
}

impl Io<'_> {
    fn transmit(&mut self, to: Peer, bytes: Bytes) {
        self.out.push_back(Output::Transmit(Transmit { to, bytes }));
    }

    fn event(&mut self, event: Event) {
        self.out.push_back(Output::Event(event));
    }
}

/// The [`Io`] of a layer: its output queue, timer queue, timer values and deadlines,
/// borrowed field by field (so that a transaction in one of its tables can be borrowed
/// beside it).
macro_rules! io {
    ($layer:ident) => {
        Io {
            out: &mut $layer.out,
            queue: &mut $layer.queue,
            timers: &$layer.timers,
            deadlines: &$layer.deadlines,
            after_2xx: $layer.after_2xx,
        }
    };
}

/// What an INVITE client transaction does once its first 2xx arrived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum After2xx {
    /// RFC 6026 §7.2: it enters Accepted and passes every further 2xx (retransmissions,
    /// other forks) up as its own for 64·T1 (Timer M). For a TU that matches responses to
    /// its transactions only.
    #[default]
    Accepted,
    /// RFC 3261 §17.1.1.2 as first written: it ends at once, and a later 2xx reaches the
    /// TU as a [`Event::StrayResponse`], which a UA core matches to its dialog by Call-ID
    /// and tags and ACKs again (§13.2.2.4). For a TU that does that: it keeps nothing
    /// for the 64·T1 after each answered INVITE.
    Terminate,
}

/// All client and server transactions of one endpoint (or one shard of it).
#[derive(Debug)]
pub struct TransactionLayer {
    timers: Timers,
    deadlines: ServerDeadlines,
    after_2xx: After2xx,
    next_id: u64,
    // Transactions are boxed in their tables: a table grows by doubling into fresh memory
    // while up to 64·T1 of transactions are retained, and moving 16-byte slots instead of
    // whole transactions took most of the page faults of a relay under load off its path.
    clients: HashMap<ClientTxId, Box<ClientTx>, IdHash>,
    client_index: HashMap<ClientKey, ClientTxId>,
    servers: HashMap<ServerTxId, Box<ServerTx>, IdHash>,
    server_index: HashMap<ServerKey, ServerTxId>,
    /// INVITE server transactions retransmitting a 2xx, by the dialog fields of the ACK
    /// they wait for.
    ack_index: HashMap<AckKey, ServerTxId>,
    /// Non-INVITE server transactions that sent their final response over an unreliable
    /// transport, kept compactly for Timer J.
    lingering: Lingering,
    queue: TimerQueue,
    out: VecDeque<Output>,
    dropped: u64,
    unanswered: u64,
}

impl TransactionLayer {
    /// An empty layer running with `timers` (each base value clamped to 1 ms – 1 h, T2 to
    /// at least T1).
    pub fn new(timers: Timers) -> Self {
        TransactionLayer {
            timers: timers.normalized(),
            deadlines: ServerDeadlines::default(),
            after_2xx: After2xx::default(),
            next_id: 0,
            clients: HashMap::default(),
            client_index: HashMap::new(),
            servers: HashMap::default(),
            server_index: HashMap::new(),
            ack_index: HashMap::new(),
            lingering: Lingering::default(),
            queue: TimerQueue::default(),
            out: VecDeque::new(),
            dropped: 0,
            unanswered: 0,
        }
    }

    /// Sets how long server transactions wait for the TU's final response (each clamped
    /// to 1 ms – 24 h). Set it before any request comes: transactions already running keep
    /// the deadline they were given.
    pub fn with_server_deadlines(mut self, deadlines: ServerDeadlines) -> Self {
        self.deadlines = deadlines.normalized();
        self
    }

    /// Sets what an INVITE client transaction does after its first 2xx (see [`After2xx`]).
    /// Set it before any request is sent: transactions already running keep their way.
    pub fn with_after_2xx(mut self, after_2xx: After2xx) -> Self {
        self.after_2xx = after_2xx;
        self
    }

    /// The timer values in use.
    pub fn timers(&self) -> &Timers {
        &self.timers
    }

    /// The server transaction deadlines in use.
    pub fn server_deadlines(&self) -> &ServerDeadlines {
        &self.deadlines
    }

    /// Feeds a message that came off the wire (already parsed by [`crate::wire`]). Never
    /// panics. A message that lacks the headers a transaction keys on, or whose CSeq method
    /// differs from its request method, or with a status outside 100–699, is dropped and
    /// counted in [`TransactionLayer::dropped`].
    pub fn handle_message(&mut self, now: Instant, msg: SipMessage, from: Peer) {
        match msg {
            SipMessage::Request(req) => self.on_request(now, req, from),
            SipMessage::Response(resp) => self.on_response(now, resp, from),
        }
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.lingering.expire(now);
        while let Some(Entry { at, tx, slot }) = self.queue.pop_due(now) {
            let mut io = io!(self);
            match tx {
                TxRef::Client(id) => {
                    let Some(tx) = self.clients.get_mut(&id) else {
                        continue;
                    };
                    if !tx.timers.fire(slot, at) {
                        continue;
                    }
                    if tx.on_timer(now, slot, &mut io) == Fate::Terminated {
                        self.remove_client(id);
                    }
                }
                TxRef::Server(id) => {
                    let Some(tx) = self.servers.get_mut(&id) else {
                        continue;
                    };
                    if !tx.timers.fire(slot, at) {
                        continue;
                    }
                    // The TU's deadline: the Lifetime slot before any final response.
                    if slot == timers::Slot::Lifetime && tx.awaits_final() {
                        self.unanswered += 1;
                    }
                    if tx.on_timer(now, slot, &mut io) == Fate::Terminated {
                        self.remove_server(id);
                    }
                }
            }
        }
        self.give_back_room();
    }

    /// Gives back the room of tables a load peak grew and that are now mostly empty: a
    /// hash map keeps its capacity when entries leave, so without this the memory of the
    /// busiest second would stay for the life of the process. A table shrinks once it is
    /// under a quarter full, to twice its entries, so that a steady load never shrinks and
    /// regrows it.
    fn give_back_room(&mut self) {
        shrink_if_sparse(&mut self.clients);
        shrink_if_sparse(&mut self.client_index);
        shrink_if_sparse(&mut self.servers);
        shrink_if_sparse(&mut self.server_index);
        shrink_if_sparse(&mut self.ack_index);
        // Each transaction has at most two live timer entries.
        let live = 2 * (self.clients.len() + self.servers.len());
        let (clients, servers) = (&self.clients, &self.servers);
        self.queue
            .drop_stale(live, |e| entry_is_live(clients, servers, e));
        self.queue.give_back_room();
    }

    /// Starts a client transaction and sends its request. The request carries its top Via
    /// with a fresh branch already (the caller builds it). Not for ACK
    /// ([`TxError::AckNotATransaction`]: the caller transmits an ACK for a 2xx itself).
    pub fn send_request(
        &mut self,
        now: Instant,
        req: Request,
        to: Peer,
    ) -> Result<ClientTxId, TxError> {
        if req.method == Method::Ack {
            return Err(TxError::AckNotATransaction);
        }
        let mut summary = Summary::of_request(&req)?;
        if summary.cseq_method != req.method {
            return Err(MessageError::Invalid("CSeq").into());
        }
        if summary.branch.is_empty() {
            return Err(MessageError::Missing("Via branch").into());
        }
        if !summary.branch.starts_with(BRANCH_COOKIE) {
            return Err(MessageError::Invalid("Via branch").into());
        }
        let key = ClientKey::new(&mut summary);
        if self.client_index.contains_key(&key) {
            return Err(TxError::DuplicateTransaction);
        }
        let id = ClientTxId(self.fresh_id());
        self.client_index.insert(key.clone(), id);
        let mut io = io!(self);
        let cancelled = (key.method == method_key(Method::Cancel)).then(|| ClientKey {
            branch: key.branch.clone(),
            method: method_key(Method::Invite),
        });
        let tx = ClientTx::start(now, id, key, req, summary.cseq, to, &mut io);
        self.clients.insert(id, Box::new(tx));
        // A CANCEL carries its INVITE's branch (§9.1): that INVITE now waits at most 64·T1
        // more for its final response, then counts as cancelled and ends.
        if let Some(invite) = cancelled.and_then(|k| self.client_index.get(&k).copied()) {
            if let Some(tx) = self.clients.get_mut(&invite) {
                let mut io = io!(self);
                tx.on_cancel_sent(now, &mut io);
            }
        }
        Ok(id)
    }

    /// Sends a response on a server transaction (1xx any number of times, then one final;
    /// a 2xx to an INVITE may be repeated while the transaction is in Accepted, RFC 6026
    /// §8.7, though the layer retransmits it by itself).
    pub fn respond(&mut self, now: Instant, tx: ServerTxId, resp: Response) -> Result<(), TxError> {
        let code = resp.status_code.code();
        if !(100..=699).contains(&code) {
            return Err(TxError::InvalidStatus(code));
        }
        let server = self
            .servers
            .get_mut(&tx)
            .ok_or(TxError::UnknownTransaction)?;
        let mut io = io!(self);
        let fate = server.respond(now, resp, &mut io)?;
        if let Some(key) = server.awaiting_ack() {
            if !self.ack_index.contains_key(key) {
                self.ack_index.insert(key.clone(), tx);
            }
        }
        if fate == Fate::Terminated {
            self.end_server(now, tx);
        }
        Ok(())
    }

    /// Removes a server transaction that reached its end; a non-INVITE one that sent its
    /// final response over an unreliable transport lingers on compactly for Timer J.
    fn end_server(&mut self, now: Instant, id: ServerTxId) {
        let Some(tx) = self.remove_server(id) else {
            return;
        };
        let wait = self.timers.timer_j(tx.from.is_reliable());
        if wait.is_zero() {
            return;
        }
        if let Some((key, to, response)) = tx.completed_non_invite() {
            self.lingering.insert(&key, to, response, now + wait);
        }
    }

    /// Sends a final response on a server transaction and ends the transaction at once:
    /// the stateless UAS of RFC 3261 §8.2.7, whose role is "primarily to handle
    /// unauthenticated requests for which a challenge response is issued", so that a flood
    /// of them leaves no transaction state behind (§26.1.5). The response is not resent
    /// and an ACK for it matches nothing (it goes up as [`Event::Ack2xx`], for the TU to
    /// ignore); a retransmitted request comes to the TU again. To an INVITE only 3xx–6xx
    /// may be sent this way; the To tag should be one the TU derives from the request, so
    /// that a retransmission gets the same (§8.2.7).
    pub fn respond_stateless(&mut self, tx: ServerTxId, resp: Response) -> Result<(), TxError> {
        let server = self
            .servers
            .get_mut(&tx)
            .ok_or(TxError::UnknownTransaction)?;
        let mut io = io!(self);
        server.respond_stateless(resp, &mut io)?;
        self.remove_server(tx);
        Ok(())
    }

    /// The next thing to do: a message to transmit, an event, or (once both are drained)
    /// the next deadline.
    pub fn poll_output(&mut self) -> Output {
        if let Some(output) = self.out.pop_front() {
            return output;
        }
        // Stale entries (re-armed, disarmed, or of a terminated transaction) are dropped
        // here, so the deadline given is a live one.
        let lingering = self.lingering.next_deadline();
        while let Some(entry) = self.queue.peek() {
            if self.is_live(&entry) {
                let at = lingering.map_or(entry.at, |l| l.min(entry.at));
                return Output::Timeout(Some(at));
            }
            self.queue.pop();
        }
        Output::Timeout(lingering)
    }

    /// The transport cannot reach `peer` (a refused connection, an ICMP error, §17.1.4):
    /// every client transaction towards it that still waits for a final response reports
    /// [`Event::TimedOut`] and ends. Peers compare by transport and address.
    pub fn transport_error(&mut self, peer: &Peer) {
        let failed: Vec<ClientTxId> = self
            .clients
            .iter()
            .filter(|(_, tx)| tx.to.transport == peer.transport && tx.to.addr == peer.addr)
            .map(|(id, _)| *id)
            .collect();
        for id in failed {
            let Some(tx) = self.clients.get_mut(&id) else {
                continue;
            };
            let mut io = io!(self);
            if tx.on_transport_error(&mut io) == Fate::Terminated {
                self.remove_client(id);
            }
        }
    }

    /// Number of live transactions (for metrics / tests).
    pub fn len(&self) -> usize {
        self.clients.len() + self.server_len()
    }

    /// Number of live server transactions, those completed and lingering for Timer J
    /// included (for metrics / tests).
    pub fn server_len(&self) -> usize {
        self.servers.len() + self.lingering.len()
    }

    /// Whether no transaction is live.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.servers.is_empty() && self.lingering.is_empty()
    }

    /// Number of messages dropped because they lacked what matching needs (for metrics).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Number of server transactions whose TU gave no final response by its deadline
    /// ([`ServerDeadlines`]): INVITEs answered 408 by the layer, others dropped (for
    /// metrics).
    pub fn unanswered(&self) -> u64 {
        self.unanswered
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    fn drop_message(&mut self, from: &Peer, reason: MessageError) {
        self.dropped += 1;
        debug!(%from, %reason, "message dropped by the transaction layer");
    }

    fn is_live(&self, entry: &Entry) -> bool {
        entry_is_live(&self.clients, &self.servers, entry)
    }

    fn remove_client(&mut self, id: ClientTxId) {
        if let Some(tx) = self.clients.remove(&id) {
            trace!(tx = ?id, "client transaction terminated");
            self.client_index.remove(&tx.key);
        }
    }

    fn remove_server(&mut self, id: ServerTxId) -> Option<Box<ServerTx>> {
        let tx = self.servers.remove(&id)?;
        trace!(tx = ?id, "server transaction terminated");
        self.server_index.remove(&tx.key);
        self.unindex_ack(id, &tx);
        Some(tx)
    }

    fn unindex_ack(&mut self, id: ServerTxId, tx: &ServerTx) {
        if let Some(key) = tx.ack_key() {
            if self.ack_index.get(key) == Some(&id) {
                self.ack_index.remove(key);
            }
        }
    }

    /// §17.1.3: a response goes to the client transaction of its branch and CSeq method,
    /// or up to the user as stray.
    fn on_response(&mut self, now: Instant, resp: Response, from: Peer) {
        let code = resp.status_code.code();
        if !(100..=699).contains(&code) {
            return self.drop_message(&from, MessageError::Invalid("status code"));
        }
        let mut summary = match Summary::of_response(&resp) {
            Ok(summary) => summary,
            Err(e) => return self.drop_message(&from, e),
        };
        let key = ClientKey::new(&mut summary);
        let Some(&id) = self.client_index.get(&key) else {
            trace!(%from, code, "response matches no client transaction");
            self.out
                .push_back(Output::Event(Event::StrayResponse { resp, from }));
            return;
        };
        let Some(tx) = self.clients.get_mut(&id) else {
            return;
        };
        let mut io = io!(self);
        if tx.on_response(now, resp, from, &mut io) == Fate::Terminated {
            self.remove_client(id);
        }
    }

    /// §17.2.3: a request goes to the server transaction of its branch, sent-by and method
    /// (a retransmission), or opens a new one; ACK and CANCEL have rules of their own.
    fn on_request(&mut self, now: Instant, req: Request, from: Peer) {
        let mut summary = match Summary::of_request(&req) {
            Ok(summary) => summary,
            Err(e) => return self.drop_message(&from, e),
        };
        if summary.cseq_method != req.method {
            return self.drop_message(&from, MessageError::Invalid("CSeq"));
        }
        let method = req.method;
        // Read before the keys take their parts of the summary.
        let ids = (method != Method::Ack).then(|| Box::new(RequestIds::of(&summary)));
        let mut key = ServerKey::new(&mut summary, method);
        if method == Method::Ack {
            return self.on_ack(now, key, summary, req, from);
        }
        if let Some(&id) = self.server_index.get(&key) {
            if let Some(tx) = self.servers.get_mut(&id) {
                let mut io = io!(self);
                tx.on_request_retransmission(&mut io);
            }
            return;
        }
        if let Some((to, response)) = self.lingering.response_for(&key) {
            trace!(%method, "request retransmitted: final response again (Timer J)");
            self.out.push_back(Output::Transmit(Transmit {
                to,
                bytes: response,
            }));
            return;
        }
        let id = ServerTxId(self.fresh_id());
        let mut io = io!(self);
        if method == Method::Cancel {
            key.method = method_key(Method::Invite);
            let invite = self.server_index.get(&key).copied();
            key.method = method_key(Method::Cancel);
            if let Some(invite) = invite {
                trace!(tx = ?id, ?invite, "CANCEL for a live INVITE");
                self.server_index.insert(key.clone(), id);
                let tx = ServerTx::non_invite(now, id, key, from, &mut io);
                self.servers.insert(id, Box::new(tx));
                io.event(Event::Cancel {
                    tx: id,
                    invite,
                    req,
                    from,
                });
                return;
            }
        }
        let tx = if method == Method::Invite {
            let trying = response_for(&req, 100, None, None);
            ServerTx::invite(
                now,
                id,
                key.clone(),
                from,
                AckKey::new(&mut summary),
                trying,
                &mut io,
            )
        } else {
            ServerTx::non_invite(now, id, key.clone(), from, &mut io)
        };
        trace!(tx = ?id, %method, %from, "server transaction created");
        let Some(ids) = ids else {
            return;
        };
        io.event(Event::Request {
            tx: id,
            req,
            from,
            ids,
        });
        self.server_index.insert(key, id);
        self.servers.insert(id, Box::new(tx));
    }

    /// An ACK: part of an INVITE server transaction whose non-2xx final it acknowledges
    /// (absorbed), or the ACK for a 2xx (delivered, stopping that 2xx's retransmissions).
    fn on_ack(
        &mut self,
        now: Instant,
        key: ServerKey,
        mut summary: Summary,
        ack: Request,
        from: Peer,
    ) {
        if let Some(&id) = self.server_index.get(&key) {
            // An ACK carries the CSeq number of the INVITE it acknowledges (§17.1.1.3,
            // §13.2.2.4). One with this transaction's branch but another number belongs to
            // another INVITE of the dialog: sipp, ACKing a retransmitted 407 of its first
            // INVITE after its second one was answered 180, copies the Via of that 180.
            // Taken as this transaction's, it would stop the retransmission of a 2xx the
            // terminal never got, and the call would hang.
            let ours = self
                .servers
                .get(&id)
                .and_then(|tx| tx.ack_key())
                .is_none_or(|k| k.cseq == summary.cseq);
            if let Some(tx) = self.servers.get_mut(&id).filter(|_| ours) {
                let mut io = io!(self);
                match tx.on_ack(now, &mut io) {
                    AckDisposition::Absorb(Fate::Live) => {}
                    AckDisposition::Absorb(Fate::Terminated) => {
                        self.remove_server(id);
                    }
                    AckDisposition::Deliver => {
                        let ack_key = tx.ack_key().cloned();
                        if let Some(ack_key) = ack_key {
                            if self.ack_index.get(&ack_key) == Some(&id) {
                                self.ack_index.remove(&ack_key);
                            }
                        }
                        self.out
                            .push_back(Output::Event(Event::Ack2xx { ack, from }));
                    }
                }
                return;
            }
        }
        let ack_key = AckKey::new(&mut summary);
        if let Some(id) = self.ack_index.remove(&ack_key) {
            if let Some(tx) = self.servers.get_mut(&id) {
                let mut io = io!(self);
                tx.on_2xx_ack(now, &mut io);
            }
        }
        self.out
            .push_back(Output::Event(Event::Ack2xx { ack, from }));
    }
}
