//! The data gateway: the TCP port named in the SDP answer, where terminals bring their
//! application data (`docs/protocol.md`, "Data connection").
//!
//! A terminal connects and sends its session token as the first line. [`TokenTable`] holds
//! the tokens the agent handed out: each is good once, and only for the configured time after
//! its 200 OK was sent (a terminal may connect before the relay's ACK reaches the agent). An
//! unknown, used or expired token, or a line that is not a token, gets `ERR <reason>` and the
//! connection is closed: nothing is forwarded. A good token opens the service backend — a
//! `tcp://` backend is first told who is connected, in the format its service configures
//! ([`crate::preamble`]) — then gets `OK`, and from then on the bytes are spliced both ways
//! between the terminal and the backend, counted per session, and each completed block of
//! bytes delivered to the terminal becomes a charge.
//!
//! The connection ends when the backend closes its side (after the terminal's end of input,
//! for the built-ins), when either side fails, or when the session closes it
//! ([`CloseSignal`]): at once (BYE from the relay, shutdown, a newer data connection of the
//! same session), or — when the application server hung up — after the backend's last
//! bytes reached the terminal: the backend is told the end of input, what it still sends is
//! delivered until it closes or falls quiet for [`DRAIN_QUIET`] (for at most
//! [`DRAIN_LIMIT`]), and then the terminal's
//! connection is held open until the session's BYE has gone out (at most [`PARK_LIMIT`]), so
//! that the terminal hears the server's BYE before it sees its data connection close (a
//! terminal that sees it close first hangs up itself). The session layer hears of every
//! attachment and end as a [`GatewayEvent`].
//!
//! A connection that has not yet presented a good token costs a descriptor and a task and
//! proves nothing, so those are capped (issue 14, finding 6; RFC 3261 §26.1.5 on flooding):
//! at most [`PendingCaps::overall`] connections wait for their token line at once, and
//! [`PendingCaps::per_address`] from one address (IPv4, or IPv6 /64). One past a cap is
//! closed at once, without a byte read or written, and counted in [`GatewayStats`]; the
//! token line is due within [`Timeouts::handshake`]. A connection leaves the count once its
//! token is taken (a spliced connection belongs to a session the relay admitted) or once its
//! refusal has been drained.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sip_core::limits::{CapRefusal, ConnectionCaps, ConnectionPermit};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::backend::{Backend, BackendStream};
use crate::charging::{ChargeRequest, ChargeSink, Price};
use crate::inflight::InFlight;
use crate::preamble::{self, PreambleFormat, SessionContext};

/// The longest token line accepted, newline included.
pub const MAX_TOKEN_LINE: usize = 256;
/// Splice buffer size, per direction.
const BUF: usize = 16 * 1024;
/// How long a data connection closed with [`CloseSignal::Drain`] may still deliver the
/// backend's bytes.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// A draining backend that sends nothing for this long has said all it had to say.
pub const DRAIN_QUIET: Duration = Duration::from_millis(250);

/// How long a drained connection holds the terminal's side open, waiting for the session's
/// BYE to go out.
pub const PARK_LIMIT: Duration = Duration::from_secs(10);

/// What the session wants of a data connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseSignal {
    /// Keep it open.
    Open,
    /// Stop taking the terminal's bytes, tell the backend the end of input, deliver what the
    /// backend still sends until it closes or falls quiet ([`DRAIN_QUIET`]; at most
    /// [`DRAIN_LIMIT`]), then hold the terminal's side open until [`CloseSignal::Now`] (at
    /// most [`PARK_LIMIT`]).
    Drain,
    /// Close now.
    Now,
}

/// Bytes through one session's data connections, and the charge units already requested.
#[derive(Debug, Default)]
pub struct Counters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    charged_units: AtomicU64,
}

impl Counters {
    /// Counts bytes from the terminal to the backend.
    pub fn add_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts bytes delivered to the terminal; returns how many whole `block`s were completed
    /// by them and not yet charged (0 when `block` is 0). Safe under concurrent calls: each
    /// unit is returned once.
    pub fn add_out(&self, n: u64, block: u64) -> u64 {
        let total = self
            .bytes_out
            .fetch_add(n, Ordering::Relaxed)
            .saturating_add(n);
        if block == 0 {
            return 0;
        }
        let done = total / block;
        let before = self.charged_units.fetch_max(done, Ordering::Relaxed);
        done.saturating_sub(before)
    }

    /// Bytes received from the terminal.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    /// Bytes delivered to the terminal.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }

    /// Charge units requested so far.
    pub fn charged_units(&self) -> u64 {
        self.charged_units.load(Ordering::Relaxed)
    }
}

/// How a session's delivered bytes are charged.
#[derive(Debug, Clone)]
pub struct Billing {
    /// Bytes per unit (greater than 0).
    pub block: u64,
    /// Where charge requests go.
    pub sink: ChargeSink,
    /// The subscriber the relay asserted.
    pub subscriber: String,
    /// The service delivered.
    pub service: String,
    /// The session's charges not yet answered by the relay.
    pub outstanding: Arc<InFlight>,
}

/// What a token opens: one data connection of one session.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The session's Call-ID (the relay's leg to us).
    pub call_id: String,
    /// Which data connection of the session this is (a re-INVITE opens a new one).
    pub slot: u64,
    /// The backend to splice to.
    pub backend: Backend,
    /// What a `tcp://` backend is told first.
    pub preamble: PreambleFormat,
    /// Who is connected, for the preamble.
    pub context: Arc<SessionContext>,
    /// The session's byte counters.
    pub counters: Arc<Counters>,
    /// Tells when the session closes this connection (its sender going away closes it at
    /// once).
    pub close: watch::Receiver<CloseSignal>,
    /// Counts the session's data connections still delivering, for its BYE to wait on.
    pub open: Arc<InFlight>,
    /// Charging, when on.
    pub billing: Option<Billing>,
}

/// Why a token was refused; the text is sent to the terminal after `ERR `.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such token (never issued, or its session has ended).
    Unknown,
    /// The token was used already.
    Used,
    /// The token was not used in time.
    Expired,
    /// The first line is not a token.
    Malformed,
    /// No token line in time.
    Timeout,
}

impl Refusal {
    /// The reason sent to the terminal and logged.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown token",
            Refusal::Used => "token already used",
            Refusal::Expired => "token expired",
            Refusal::Malformed => "malformed token line",
            Refusal::Timeout => "no token in time",
        }
    }
}

#[derive(Debug)]
struct Entry {
    binding: Binding,
    expires_at: Instant,
    used: bool,
}

/// The tokens handed out and not yet forgotten (sans-IO: every call takes the time).
///
/// Tokens are 128-bit random strings; the table is a `HashMap` with a randomly keyed hash, so
/// the time a lookup takes tells an attacker nothing useful about other tokens.
#[derive(Debug)]
pub struct TokenTable {
    entries: Mutex<HashMap<String, Entry>>,
    ttl: Duration,
}

impl TokenTable {
    /// A table whose tokens must be used within `ttl` of being issued.
    pub fn new(ttl: Duration) -> TokenTable {
        TokenTable {
            entries: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave a map half-updated in a way that
        // matters here; carry on with the data.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands out `token` for `binding` at `now`.
    pub fn issue(&self, token: String, binding: Binding, now: Instant) {
        self.lock().insert(
            token,
            Entry {
                binding,
                expires_at: now + self.ttl,
                used: false,
            },
        );
    }

    /// Uses `token` at `now`: its binding the first time, within the time allowed; a
    /// refusal otherwise.
    pub fn claim(&self, token: &str, now: Instant) -> Result<Binding, Refusal> {
        let mut entries = self.lock();
        let entry = entries.get_mut(token).ok_or(Refusal::Unknown)?;
        if entry.used {
            return Err(Refusal::Used);
        }
        if now >= entry.expires_at {
            return Err(Refusal::Expired);
        }
        entry.used = true;
        Ok(entry.binding.clone())
    }

    /// Forgets every token of a session (it ended).
    pub fn revoke_call(&self, call_id: &str) {
        self.lock().retain(|_, e| e.binding.call_id != call_id);
    }

    /// Forgets the tokens that expired unused by `now`; returns their sessions and slots.
    pub fn sweep(&self, now: Instant) -> Vec<(String, u64)> {
        let mut expired = Vec::new();
        self.lock().retain(|_, e| {
            let keep = e.used || now < e.expires_at;
            if !keep {
                expired.push((e.binding.call_id.clone(), e.binding.slot));
            }
            keep
        });
        expired
    }

    /// How many tokens are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a data connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The backend closed its side (the service ended).
    BackendClosed,
    /// Reading from or writing to the terminal failed.
    TerminalError(String),
    /// Reading from or writing to the backend failed.
    BackendError(String),
    /// The backend could not be opened.
    BackendUnavailable(String),
    /// The session closed the connection.
    Closed,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::BackendClosed => f.write_str("backend closed"),
            EndReason::TerminalError(e) => write!(f, "terminal connection failed: {e}"),
            EndReason::BackendError(e) => write!(f, "backend connection failed: {e}"),
            EndReason::BackendUnavailable(e) => write!(f, "backend unavailable: {e}"),
            EndReason::Closed => f.write_str("closed by the session"),
        }
    }
}

/// What the gateway tells the session layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// A terminal presented a good token; its bytes now flow.
    Attached {
        /// The session.
        call_id: String,
        /// The data connection.
        slot: u64,
        /// The terminal's address.
        peer: SocketAddr,
    },
    /// A data connection of a session ended.
    Ended {
        /// The session.
        call_id: String,
        /// The data connection.
        slot: u64,
        /// Why.
        reason: EndReason,
    },
}

/// Timeouts of the data port.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For the token line.
    pub handshake: Duration,
    /// For opening a TCP backend.
    pub backend_connect: Duration,
}

/// The caps on data connections that have not yet presented a good token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingCaps {
    /// Connections waiting for their token at once, from every address together.
    pub overall: usize,
    /// Connections waiting for their token at once from one address (IPv4, or IPv6 /64).
    pub per_address: usize,
}

impl Default for PendingCaps {
    /// The defaults of `[data] max_pending_connections` and `max_pending_per_address`: 256
    /// overall, 16 per address.
    fn default() -> Self {
        PendingCaps {
            overall: crate::config::DEFAULT_MAX_PENDING_CONNECTIONS,
            per_address: crate::config::DEFAULT_MAX_PENDING_PER_ADDRESS,
        }
    }
}

/// Counters of the data port, for logs (and whoever embeds the agent).
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Connections closed at once: [`PendingCaps::overall`] were waiting for their token.
    pub refused_overall: AtomicU64,
    /// Connections closed at once: their address had [`PendingCaps::per_address`] waiting.
    pub refused_per_address: AtomicU64,
    /// Connections refused for sending no token line within [`Timeouts::handshake`].
    pub token_timeouts: AtomicU64,
    /// TLS handshakes on the data port that failed or did not finish within
    /// [`Timeouts::handshake`] (the connection is closed without a token read).
    pub tls_failures: AtomicU64,
}

/// How often a refusal by a cap is logged at `warn` (each is counted).
const CAP_WARN_EVERY: Duration = Duration::from_secs(60);

/// The data port.
pub struct Gateway {
    listener: TcpListener,
    tokens: Arc<TokenTable>,
    events: mpsc::UnboundedSender<GatewayEvent>,
    timeouts: Timeouts,
    pending: Arc<ConnectionCaps>,
    stats: Arc<GatewayStats>,
    tls: Option<sip_core::tls::TlsAcceptor>,
}

impl Gateway {
    /// Listens on `addr`.
    pub async fn bind(
        addr: SocketAddr,
        tokens: Arc<TokenTable>,
        events: mpsc::UnboundedSender<GatewayEvent>,
        timeouts: Timeouts,
    ) -> std::io::Result<Gateway> {
        let caps = PendingCaps::default();
        Ok(Gateway {
            listener: TcpListener::bind(addr).await?,
            tokens,
            events,
            timeouts,
            pending: ConnectionCaps::new(caps.overall, caps.per_address),
            stats: Arc::new(GatewayStats::default()),
            tls: None,
        })
    }

    /// The same gateway speaking TLS on every data connection (`TCP/TLS` in SDP, RFC 4572
    /// §7): the handshake, then the token line, both within [`Timeouts::handshake`] of the
    /// accept. The acceptor asks no client certificate: a terminal proves itself by the
    /// token, which TLS keeps from anyone on the path.
    pub fn with_tls(self, acceptor: sip_core::tls::TlsAcceptor) -> Gateway {
        Gateway {
            tls: Some(acceptor),
            ..self
        }
    }

    /// The same gateway with `caps` on connections waiting for their token (instead of
    /// [`PendingCaps::default`]).
    pub fn with_pending_caps(self, caps: PendingCaps) -> Gateway {
        Gateway {
            pending: ConnectionCaps::new(caps.overall, caps.per_address),
            ..self
        }
    }

    /// The data port's counters.
    pub fn stats(&self) -> Arc<GatewayStats> {
        self.stats.clone()
    }

    /// A handle on the count of connections waiting for their token right now.
    pub fn pending(&self) -> Arc<ConnectionCaps> {
        self.pending.clone()
    }

    /// The address listened on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts data connections until `shutdown` turns true. Connections already spliced
    /// stay until their session closes them.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut warned: Option<Instant> = None;
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let permit = match self.pending.admit(peer.ip()) {
                            Ok(permit) => permit,
                            Err(refusal) => {
                                self.refused(peer, refusal, &mut warned);
                                // Dropped: closed without a byte read or written.
                                drop(stream);
                                continue;
                            }
                        };
                        let conn = Connection {
                            tokens: self.tokens.clone(),
                            events: self.events.clone(),
                            timeouts: self.timeouts,
                            peer,
                            stats: self.stats.clone(),
                            tls: self.tls.clone(),
                        };
                        tokio::spawn(conn.serve(stream, permit));
                    }
                    Err(e) => {
                        // Out of descriptors and the like: wait a little rather than spin.
                        warn!(error = %e, "data port accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Counts a connection refused by a cap, and logs it (at `warn` once a minute, else at
    /// `debug`: a flood must not flood the log too).
    fn refused(&self, peer: SocketAddr, refusal: CapRefusal, warned: &mut Option<Instant>) {
        let counter = match refusal {
            CapRefusal::Overall => &self.stats.refused_overall,
            CapRefusal::PerSource => &self.stats.refused_per_address,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        if warned.is_none_or(|at| now.duration_since(at) >= CAP_WARN_EVERY) {
            *warned = Some(now);
            warn!(
                %peer,
                reason = %refusal,
                waiting = self.pending.total(),
                refused_overall = self.stats.refused_overall.load(Ordering::Relaxed),
                refused_per_address = self.stats.refused_per_address.load(Ordering::Relaxed),
                "data connection refused: too many waiting for their token \
                 (logged once a minute; every refusal is counted)"
            );
        } else {
            debug!(%peer, reason = %refusal, "data connection refused: too many waiting for their token");
        }
    }
}

struct Connection {
    tokens: Arc<TokenTable>,
    events: mpsc::UnboundedSender<GatewayEvent>,
    timeouts: Timeouts,
    peer: SocketAddr,
    stats: Arc<GatewayStats>,
    tls: Option<sip_core::tls::TlsAcceptor>,
}

impl Connection {
    /// Serves one data connection; `pending` is its place among those waiting for a token,
    /// given back once the token is taken or the refusal drained. Over TLS the handshake
    /// comes first, within the same deadline as the token line.
    async fn serve(self, stream: TcpStream, pending: ConnectionPermit) {
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr();
        let Some(acceptor) = self.tls.clone() else {
            let deadline = tokio::time::Instant::now() + self.timeouts.handshake;
            return self.serve_stream(stream, local, pending, deadline).await;
        };
        let deadline = tokio::time::Instant::now() + self.timeouts.handshake;
        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => self.serve_stream(tls, local, pending, deadline).await,
            Ok(Err(e)) => {
                self.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                debug!(peer = %self.peer, error = %e, "data connection: TLS handshake failed");
            }
            Err(_) => {
                self.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                debug!(peer = %self.peer, "data connection: TLS handshake not finished in time");
            }
        }
    }

    async fn serve_stream<S>(
        self,
        mut stream: S,
        local: std::io::Result<SocketAddr>,
        pending: ConnectionPermit,
        deadline: tokio::time::Instant,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let peer = self.peer;
        let (token, leftover) =
            match tokio::time::timeout_at(deadline, read_token_line(&mut stream)).await {
                Ok(Ok(line)) => line,
                Ok(Err(refusal)) => return refuse(stream, peer, refusal).await,
                Err(_) => {
                    self.stats.token_timeouts.fetch_add(1, Ordering::Relaxed);
                    return refuse(stream, peer, Refusal::Timeout).await;
                }
            };
        let binding = match self.tokens.claim(&token, Instant::now()) {
            Ok(b) => b,
            Err(refusal) => return refuse(stream, peer, refusal).await,
        };
        drop(pending);
        let call_id = binding.call_id.clone();
        let slot = binding.slot;
        let opened = match binding.backend.open(self.timeouts.backend_connect).await {
            Ok(mut b) => tell_backend(&mut b, &binding, peer, local)
                .await
                .map(|()| b),
            Err(e) => Err(e),
        };
        let backend = match opened {
            Ok(b) => b,
            Err(e) => {
                warn!(%call_id, %peer, backend = %binding.backend, error = %e, "backend unavailable");
                let _ = stream.write_all(b"ERR backend unavailable\n").await;
                let _ = stream.shutdown().await;
                self.ended(call_id, slot, EndReason::BackendUnavailable(e.to_string()));
                return;
            }
        };
        if let Err(e) = stream.write_all(b"OK\n").await {
            self.ended(call_id, slot, EndReason::TerminalError(e.to_string()));
            return;
        }
        info!(%call_id, %peer, slot, backend = %binding.backend, "data connection open");
        let _ = self.events.send(GatewayEvent::Attached {
            call_id: call_id.clone(),
            slot,
            peer,
        });
        let reason = splice(stream, backend, leftover, &binding).await;
        info!(
            %call_id,
            %peer,
            slot,
            %reason,
            bytes_in = binding.counters.bytes_in(),
            bytes_out = binding.counters.bytes_out(),
            "data connection closed"
        );
        self.ended(call_id, slot, reason);
    }

    fn ended(&self, call_id: String, slot: u64, reason: EndReason) {
        let _ = self.events.send(GatewayEvent::Ended {
            call_id,
            slot,
            reason,
        });
    }
}

/// Sends a `tcp://` backend the session's preamble, if its service has one (built-in
/// services need none).
async fn tell_backend(
    backend: &mut BackendStream,
    binding: &Binding,
    terminal: SocketAddr,
    gateway: std::io::Result<SocketAddr>,
) -> std::io::Result<()> {
    if !matches!(binding.backend, Backend::Tcp { .. }) || binding.preamble == PreambleFormat::None {
        return Ok(());
    }
    let bytes = preamble::encode(binding.preamble, &binding.context, terminal, gateway?);
    backend.write_all(&bytes).await?;
    debug!(
        call_id = %binding.call_id,
        preamble = %binding.preamble,
        bytes = bytes.len(),
        "preamble sent to the backend"
    );
    Ok(())
}

/// How long a refused connection is drained after the `ERR` line, and how much of it.
const DRAIN_TIME: Duration = Duration::from_secs(2);
const DRAIN_BYTES: usize = 1024 * 1024;

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    refusal: Refusal,
) {
    warn!(%peer, reason = refusal.reason(), "data connection refused");
    let line = format!("ERR {}\n", refusal.reason());
    let _ = stream.write_all(line.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Closing a socket with unread input resets the connection, which can destroy the ERR
    // line before the terminal reads it: read (and discard) what the terminal still sends,
    // for a bounded time and amount.
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < DRAIN_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

/// Reads the first line: the token, and whatever came after it in the same reads (data
/// that must reach the backend first).
async fn read_token_line<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<(String, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; MAX_TOKEN_LINE];
    loop {
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let rest = buf.split_off(pos + 1);
            let line = std::str::from_utf8(&buf[..pos])
                .map_err(|_| Refusal::Malformed)?
                .trim();
            if line.is_empty() || !line.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Refusal::Malformed);
            }
            return Ok((line.to_string(), rest));
        }
        if buf.len() >= MAX_TOKEN_LINE {
            return Err(Refusal::Malformed);
        }
        let room = MAX_TOKEN_LINE - buf.len();
        let n = stream
            .read(&mut chunk[..room])
            .await
            .map_err(|_| Refusal::Malformed)?;
        if n == 0 {
            return Err(Refusal::Malformed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Which side of a splice failed.
enum Failure {
    Terminal(std::io::Error),
    Backend(std::io::Error),
}

impl From<Failure> for EndReason {
    fn from(f: Failure) -> EndReason {
        match f {
            Failure::Terminal(e) => EndReason::TerminalError(e.to_string()),
            Failure::Backend(e) => EndReason::BackendError(e.to_string()),
        }
    }
}

/// Returns once the session asks the connection to drain or close (never when the sender
/// went away: the splice's own watch handles that).
async fn drain_asked(close: &mut watch::Receiver<CloseSignal>) {
    loop {
        if *close.borrow_and_update() != CloseSignal::Open {
            return;
        }
        if close.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Copies bytes both ways until the backend closes, a side fails, or the session closes the
/// connection. The terminal's end of input is passed on to the backend (half-close), and so
/// is a drain asked by the session ([`CloseSignal::Drain`]); the backend's end of output is
/// passed on to the terminal, except during a drain (see the module documentation).
pub async fn splice<T>(
    terminal: T,
    backend: BackendStream,
    leftover: Vec<u8>,
    binding: &Binding,
) -> EndReason
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut t_r, mut t_w) = tokio::io::split(terminal);
    let (mut b_r, mut b_w) = tokio::io::split(backend);
    let counters = &binding.counters;
    let mut up_close = binding.close.clone();
    let up = async {
        if !leftover.is_empty() {
            b_w.write_all(&leftover).await.map_err(Failure::Backend)?;
            counters.add_in(leftover.len() as u64);
        }
        let mut buf = vec![0u8; BUF];
        loop {
            let n = tokio::select! {
                read = t_r.read(&mut buf) => read.map_err(Failure::Terminal)?,
                () = drain_asked(&mut up_close) => 0,
            };
            if n == 0 {
                b_w.shutdown().await.map_err(Failure::Backend)?;
                return Ok::<(), Failure>(());
            }
            b_w.write_all(&buf[..n]).await.map_err(Failure::Backend)?;
            counters.add_in(n as u64);
        }
    };
    let down_close = binding.close.clone();
    let down = async {
        let mut buf = vec![0u8; BUF];
        loop {
            let n = b_r.read(&mut buf).await.map_err(Failure::Backend)?;
            if n == 0 {
                if *down_close.borrow() == CloseSignal::Open {
                    let _ = t_w.shutdown().await;
                }
                return Ok::<(), Failure>(());
            }
            t_w.write_all(&buf[..n]).await.map_err(Failure::Terminal)?;
            let block = binding.billing.as_ref().map_or(0, |b| b.block);
            let units = counters.add_out(n as u64, block);
            if let (Some(billing), true) = (&binding.billing, units > 0) {
                debug!(call_id = %binding.call_id, units, "charge units completed");
                billing.sink.charge(ChargeRequest {
                    event_id: None,
                    call_id: Some(binding.call_id.clone()),
                    subscriber: billing.subscriber.clone(),
                    price: Price::Units {
                        units,
                        unit_price: None,
                    },
                    currency: None,
                    description: format!(
                        "{units} x {} bytes delivered ({}, call {})",
                        billing.block, billing.service, binding.call_id
                    ),
                    guard: Some(billing.outstanding.begin()),
                    reply: None,
                });
            }
        }
    };
    tokio::pin!(up, down);
    let mut close = binding.close.clone();
    if *close.borrow_and_update() != CloseSignal::Open {
        return EndReason::Closed;
    }
    let delivering = binding.open.begin();
    let mut up_done = false;
    let mut drain_until: Option<tokio::time::Instant> = None;
    // While draining: the bytes delivered at the last look, and when to look again.
    let mut quiet = (0u64, tokio::time::Instant::now());
    loop {
        let wake = drain_until.map_or_else(tokio::time::Instant::now, |until| until.min(quiet.1));
        tokio::select! {
            r = &mut down => match r {
                Ok(()) if drain_until.is_some() => break,
                Ok(()) => return EndReason::BackendClosed,
                Err(f) => return f.into(),
            },
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(f) => return f.into(),
            },
            changed = close.changed() => {
                match (changed.is_ok(), *close.borrow_and_update()) {
                    (false, _) | (true, CloseSignal::Now) => return EndReason::Closed,
                    (true, CloseSignal::Drain) => {
                        if drain_until.is_none() {
                            debug!(call_id = %binding.call_id, "draining the backend's last bytes");
                            let now = tokio::time::Instant::now();
                            drain_until = Some(now + DRAIN_LIMIT);
                            quiet = (counters.bytes_out(), now + DRAIN_QUIET);
                        }
                    }
                    (true, CloseSignal::Open) => {}
                }
            }
            () = tokio::time::sleep_until(wake), if drain_until.is_some() => {
                let now = tokio::time::Instant::now();
                let delivered = counters.bytes_out();
                if drain_until.is_some_and(|until| now >= until) || delivered == quiet.0 {
                    break;
                }
                quiet = (delivered, now + DRAIN_QUIET);
            }
        }
    }
    // Drained: the backend's bytes are delivered. The terminal's side stays open (the
    // futures holding it are not dropped) until the session's BYE has gone out.
    drop(delivering);
    let parked = async {
        while close.changed().await.is_ok() {
            if *close.borrow_and_update() == CloseSignal::Now {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(PARK_LIMIT, parked).await;
    EndReason::Closed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn binding(
        call_id: &str,
        slot: u64,
        backend: Backend,
    ) -> (Binding, watch::Sender<CloseSignal>) {
        let (close_tx, close) = watch::channel(CloseSignal::Open);
        (
            Binding {
                call_id: call_id.into(),
                slot,
                backend,
                preamble: PreambleFormat::None,
                context: Arc::new(SessionContext {
                    session_id: call_id.into(),
                    subscriber: "alice".into(),
                    service: "echo".into(),
                    params: Vec::new(),
                }),
                counters: Arc::new(Counters::default()),
                close,
                open: Arc::new(InFlight::default()),
                billing: None,
            },
            close_tx,
        )
    }

    #[test]
    fn tokens_are_good_once_and_only_in_time() {
        let t0 = Instant::now();
        let table = TokenTable::new(Duration::from_secs(30));
        let (b, _c) = binding("call-1", 1, Backend::Echo);
        table.issue("tok-1".into(), b.clone(), t0);
        table.issue("tok-2".into(), b.clone(), t0);
        assert_eq!(table.claim("nope", t0).unwrap_err(), Refusal::Unknown);
        let got = table.claim("tok-1", t0 + Duration::from_secs(29)).unwrap();
        assert_eq!(got.call_id, "call-1");
        assert_eq!(
            table
                .claim("tok-1", t0 + Duration::from_secs(29))
                .unwrap_err(),
            Refusal::Used
        );
        assert_eq!(
            table
                .claim("tok-2", t0 + Duration::from_secs(30))
                .unwrap_err(),
            Refusal::Expired
        );
        // The sweep forgets the expired unused token, keeps the used one.
        assert_eq!(
            table.sweep(t0 + Duration::from_secs(31)),
            vec![("call-1".to_string(), 1)]
        );
        assert_eq!(table.claim("tok-2", t0).unwrap_err(), Refusal::Unknown);
        assert_eq!(table.claim("tok-1", t0).unwrap_err(), Refusal::Used);
        table.revoke_call("call-1");
        assert!(table.is_empty());
    }

    #[test]
    fn counters_charge_each_block_once() {
        let c = Counters::default();
        assert_eq!(c.add_out(3, 4), 0);
        assert_eq!(c.add_out(5, 4), 2);
        assert_eq!(c.add_out(1, 4), 0);
        assert_eq!(c.add_out(100, 0), 0);
        assert_eq!(c.bytes_out(), 109);
        assert_eq!(c.charged_units(), 2);
        c.add_in(7);
        assert_eq!(c.bytes_in(), 7);
    }

    #[tokio::test]
    async fn token_lines_are_read_with_what_follows() {
        let mut input: &[u8] = b"abc123\r\nhello";
        assert_eq!(
            read_token_line(&mut input).await.unwrap(),
            ("abc123".to_string(), b"hello".to_vec())
        );
        for bad in [&b"\n"[..], b"two words\n", b"no newline", b"\xff\xfe\n"] {
            let mut input = bad;
            assert_eq!(
                read_token_line(&mut input).await.unwrap_err(),
                Refusal::Malformed
            );
        }
        let long = vec![b'a'; MAX_TOKEN_LINE + 10];
        let mut input = &long[..];
        assert_eq!(
            read_token_line(&mut input).await.unwrap_err(),
            Refusal::Malformed
        );
    }

    struct Harness {
        addr: SocketAddr,
        tokens: Arc<TokenTable>,
        events: mpsc::UnboundedReceiver<GatewayEvent>,
        _shutdown: watch::Sender<bool>,
    }

    async fn harness() -> Harness {
        let tokens = Arc::new(TokenTable::new(Duration::from_secs(30)));
        let (tx, events) = mpsc::unbounded_channel();
        let timeouts = Timeouts {
            handshake: Duration::from_secs(5),
            backend_connect: Duration::from_secs(5),
        };
        let gw = Gateway::bind("127.0.0.1:0".parse().unwrap(), tokens.clone(), tx, timeouts)
            .await
            .unwrap();
        let addr = gw.local_addr().unwrap();
        let (shutdown_tx, shutdown) = watch::channel(false);
        tokio::spawn(gw.run(shutdown));
        Harness {
            addr,
            tokens,
            events,
            _shutdown: shutdown_tx,
        }
    }

    async fn read_all(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn bad_tokens_are_refused_and_nothing_is_forwarded() {
        let h = harness().await;
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(b"0123456789abcdef\nsecret data").await.unwrap();
        // More than the token line's worth: still a clean ERR line, not a reset.
        s.write_all(&vec![b'x'; 100_000]).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_all(&mut s).await, "ERR unknown token\n");
    }

    #[tokio::test]
    async fn a_good_token_splices_to_echo_counts_and_charges() {
        let mut h = harness().await;
        let (sink, mut charges) = ChargeSink::channel();
        let (mut b, _close) = binding("call-7", 1, Backend::Echo);
        let outstanding = Arc::new(InFlight::default());
        b.billing = Some(Billing {
            block: 4,
            sink,
            subscriber: "alice".into(),
            service: "echo".into(),
            outstanding: outstanding.clone(),
        });
        let counters = b.counters.clone();
        h.tokens.issue("good".into(), b, Instant::now());
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(b"good\nhello ").await.unwrap();
        let mut ok = [0u8; 3];
        s.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"OK\n");
        s.write_all(b"world").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_all(&mut s).await, "hello world");
        match h.events.recv().await.unwrap() {
            GatewayEvent::Attached { call_id, slot, .. } => {
                assert_eq!((call_id.as_str(), slot), ("call-7", 1))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            h.events.recv().await.unwrap(),
            GatewayEvent::Ended {
                call_id: "call-7".into(),
                slot: 1,
                reason: EndReason::BackendClosed
            }
        );
        assert_eq!((counters.bytes_in(), counters.bytes_out()), (11, 11));
        assert!(
            outstanding.count() >= 1,
            "queued charges count as outstanding"
        );
        let mut units = 0;
        while let Ok(c) = charges.try_recv() {
            assert_eq!(
                (c.call_id.as_deref(), c.subscriber.as_str()),
                (Some("call-7"), "alice")
            );
            let Price::Units { units: n, .. } = c.price else {
                panic!("{:?}", c.price)
            };
            units += n;
        }
        assert_eq!(units, 2, "11 bytes in blocks of 4: two whole blocks");
        assert_eq!(
            outstanding.count(),
            0,
            "the charges were dropped, so answered"
        );
        // The same token again.
        let mut again = TcpStream::connect(h.addr).await.unwrap();
        again.write_all(b"good\n").await.unwrap();
        assert_eq!(read_all(&mut again).await, "ERR token already used\n");
    }

    #[tokio::test]
    async fn the_session_can_close_a_live_connection() {
        let mut h = harness().await;
        let (b, close) = binding("call-9", 3, Backend::Clock);
        h.tokens.issue("clock-token".into(), b, Instant::now());
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(b"clock-token\n").await.unwrap();
        assert!(matches!(
            h.events.recv().await.unwrap(),
            GatewayEvent::Attached { .. }
        ));
        close.send_replace(CloseSignal::Now);
        let text = read_all(&mut s).await;
        assert!(text.starts_with("OK\n"), "{text}");
        assert_eq!(
            h.events.recv().await.unwrap(),
            GatewayEvent::Ended {
                call_id: "call-9".into(),
                slot: 3,
                reason: EndReason::Closed
            }
        );
    }

    #[tokio::test]
    async fn a_tcp_backend_hears_the_preamble_before_the_terminal() {
        let mut h = harness().await;
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = backend.local_addr().unwrap().port();
        let (mut b, _close) = binding(
            "call-3@relay",
            1,
            Backend::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
        );
        b.preamble = PreambleFormat::Json;
        b.context = Arc::new(SessionContext {
            session_id: "call-3@relay".into(),
            subscriber: "alice".into(),
            service: "game".into(),
            params: vec![("level".into(), Some("2".into()))],
        });
        h.tokens.issue("t3".into(), b, Instant::now());
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        let terminal = s.local_addr().unwrap();
        s.write_all(b"t3\nfirst bytes").await.unwrap();
        let (mut server, _) = backend.accept().await.unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"first bytes") {
            let mut buf = [0u8; 512];
            let n = server.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "backend closed early: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        let newline = got.iter().position(|b| *b == b'\n').unwrap();
        let p = preamble::JsonPreamble::parse(&got[..=newline]).unwrap();
        assert_eq!(
            (
                p.session_id.as_str(),
                p.subscriber.as_str(),
                p.service.as_str()
            ),
            ("call-3@relay", "alice", "game")
        );
        assert_eq!(p.params.get("level"), Some(&Some("2".to_string())));
        assert_eq!(p.terminal, terminal);
        assert_eq!(p.gateway, h.addr);
        assert_eq!(&got[newline + 1..], b"first bytes");
        let mut ok = [0u8; 3];
        s.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"OK\n");
        // The backend closes: the connection ends, the terminal sees the end.
        drop(server);
        assert!(matches!(
            h.events.recv().await.unwrap(),
            GatewayEvent::Attached { .. }
        ));
        assert!(read_all(&mut s).await.is_empty());
    }

    #[tokio::test]
    async fn a_drain_delivers_the_backends_last_bytes_then_closes() {
        let mut h = harness().await;
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = backend.local_addr().unwrap().port();
        let (b, close) = binding(
            "call-4",
            1,
            Backend::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
        );
        let open = b.open.clone();
        h.tokens.issue("t4".into(), b, Instant::now());
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(b"t4\n").await.unwrap();
        let (mut server, _) = backend.accept().await.unwrap();
        assert!(matches!(
            h.events.recv().await.unwrap(),
            GatewayEvent::Attached { .. }
        ));
        assert_eq!(open.count(), 1, "the connection counts as open");
        // The server writes its last words and hangs up at once.
        server.write_all(b"last words\n").await.unwrap();
        close.send_replace(CloseSignal::Drain);
        // The backend hears the end of input, then closes; the terminal gets every byte.
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        server.write_all(b"and a postscript\n").await.unwrap();
        drop(server);
        let mut got = vec![0u8; "OK\nlast words\nand a postscript\n".len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"OK\nlast words\nand a postscript\n");
        // Delivered: no longer counted, but the terminal's side is held open until the
        // session says so (its BYE has gone out).
        tokio::time::timeout(Duration::from_secs(5), open.settled())
            .await
            .unwrap();
        let mut one = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut one))
                .await
                .is_err(),
            "the terminal's side closed before the BYE"
        );
        close.send_replace(CloseSignal::Now);
        assert!(read_all(&mut s).await.is_empty());
        assert!(matches!(
            h.events.recv().await.unwrap(),
            GatewayEvent::Ended {
                reason: EndReason::Closed,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_gives_up_on_a_backend_that_never_closes() {
        let (binding, close) = binding("call-8", 1, Backend::Echo);
        let (terminal, mut far_end) = tokio::io::duplex(1024);
        let (backend, _keep) = tokio::io::duplex(1024);
        let task =
            tokio::spawn(
                async move { splice(terminal, Box::new(backend), Vec::new(), &binding).await },
            );
        close.send_replace(CloseSignal::Drain);
        let reason = tokio::time::timeout(DRAIN_LIMIT + PARK_LIMIT + DRAIN_LIMIT, task)
            .await
            .expect("the drain outlived its limit")
            .unwrap();
        assert_eq!(reason, EndReason::Closed);
        let mut rest = Vec::new();
        far_end.read_to_end(&mut rest).await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_backend_is_reported() {
        let mut h = harness().await;
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let backend = Backend::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let (b, _close) = binding("call-5", 1, backend);
        h.tokens.issue("t5".into(), b, Instant::now());
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(b"t5\n").await.unwrap();
        assert_eq!(read_all(&mut s).await, "ERR backend unavailable\n");
        assert!(matches!(
            h.events.recv().await.unwrap(),
            GatewayEvent::Ended {
                reason: EndReason::BackendUnavailable(_),
                ..
            }
        ));
    }
}
