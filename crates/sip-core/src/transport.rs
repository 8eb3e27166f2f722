//! UDP, TCP and TLS transports on tokio (RFC 3261 §18, §26.2): the sockets, the connection
//! table and the stream framing. What arrives is handed, unparsed, to a [`Sink`] (the endpoint); what leaves
//! is a finished byte string for a [`Peer`].
//!
//! TCP connections are framed by Content-Length with [`StreamDecoder`] (§18.3); a connection
//! that sends a frame over the size limit, or an unframeable stream, is closed. A response goes
//! back on the connection its request came on (§18.2.2); a request to a TCP peer reuses a
//! connection to that address or opens one.
//!
//! TLS (RFC 3261 §26.2.1, RFC 5630) is TCP with rustls on top, configured by a
//! [`TlsSetup`](crate::tls::TlsSetup): the same framing, caps and deadlines, plus a handshake
//! that must finish within [`TransportConfig::message_timeout`] of the accept (or
//! [`TransportConfig::connect_timeout`] of the connect). An opened connection verifies the
//! server's certificate against the trusted CAs and the name the caller expects for that
//! address ([`Transports::expect_name`], else the IP address itself: RFC 5922 §7.1); an
//! accepted one asks for a client certificate as configured, and the certificate a peer
//! presented is kept with the connection ([`Transports::peer_certificate`]).
//!
//! A stream transport must expect peers that hold resources without using them (RFC 3261
//! §26.1.5; RFC 5626 §4.4 on the cost of flows), so every connection is bounded:
//!
//! * **Caps.** Connections accepted at once are capped overall and per source (an IPv4
//!   address or an IPv6 /64, [`crate::limits`]); one past a cap is closed at once and
//!   counted. Connections the transports open themselves are not capped (they follow the
//!   user's own requests).
//! * **A deadline per message.** A message must arrive whole within
//!   [`TransportConfig::message_timeout`] of its first byte — and an accepted connection's
//!   first message within it of the accept. The deadline is not moved by bytes arriving, so a
//!   peer trickling a byte at a time (slowloris) is closed when it passes.
//! * **Idle connections.** One with no complete message (or keep-alive) for
//!   [`TransportConfig::idle_timeout`] is closed; a partial message does not count.
//! * **Writes.** One frame's write may block for [`TransportConfig::write_timeout`] at most,
//!   then the connection is closed; a frame for a connection whose queue is full (its peer
//!   does not read) closes it too, so no sender ever waits on a peer. Nothing waits forever
//!   and no task is spawned per message.
//! * **Buffers.** A connection's read buffer holds at most one message of
//!   [`TransportConfig::max_message`] bytes (and what came with it in one read); one grown
//!   past [`READ_BUF_KEEP`] is given back once it is empty.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::framing::{Frame, StreamDecoder};
use crate::limits::{CapRefusal, ConnectionCaps, ConnectionPermit};
use crate::peer::{ConnId, Peer, Transport};
use crate::tls::TlsSetup;

/// Where the transports deliver what they receive: one call per complete message (a UDP
/// datagram or a TCP frame). Called from the receiving task; it must not block.
pub trait Sink: Send + Sync + 'static {
    /// Takes one received message, unparsed.
    fn deliver(&self, from: Peer, bytes: Bytes);
}

/// Sees every message the transports receive and every one they send, as it is on the wire
/// (a trace of recent messages, see [`Transports::set_tap`]). Called inline on the
/// receiving or sending path: it must be quick and must not block. Without a tap the
/// transports make no copy and call nothing.
pub trait Tap: Send + Sync + 'static {
    /// A message received from `from` (before it is handed to the [`Sink`]).
    fn received(&self, from: &Peer, bytes: &Bytes);
    /// A message sent to `to`; `at` is when its sending began (the answer to it may be
    /// received, and seen, before this call).
    fn sent(&self, to: &Peer, bytes: &Bytes, at: std::time::SystemTime);
}

/// Listening addresses and limits of the transports.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// UDP addresses to bind (port 0 picks a free port).
    pub udp: Vec<SocketAddr>,
    /// TCP addresses to listen on (port 0 picks a free port).
    pub tcp: Vec<SocketAddr>,
    /// TLS addresses to listen on (port 0 picks a free port; 5061 is the default port of
    /// SIP over TLS, RFC 3261 §19.1.2). Needs [`TransportConfig::tls_setup`] with a
    /// certificate.
    pub tls: Vec<SocketAddr>,
    /// The TLS certificate, key, trusted CAs and client-certificate policy. With it (and a CA)
    /// TLS connections can be opened even when nothing listens for TLS.
    pub tls_setup: Option<TlsSetup>,
    /// The local address TLS connections we open are bound to (port 0: the port of the first
    /// UDP socket). For a party with no certificate, which cannot accept TLS: its Contact
    /// names this address, and the peer that accepted the connection finds it there, so
    /// requests come back on the same connection (connection reuse, RFC 5923 §1; RFC 5626
    /// §3 for why a client cannot be reached otherwise). `None`: an ephemeral port.
    pub tls_connect_from: Option<SocketAddr>,
    /// The largest message accepted on a stream or datagram, in bytes.
    pub max_message: usize,
    /// A TCP connection with no complete message or keep-alive for this long is closed.
    pub idle_timeout: Duration,
    /// On a stream connection this party opened: a double-CRLF ping (RFC 5626 §3.5.1) once
    /// nothing was sent on it for this long, so that the peer (and any NAT between) keeps it
    /// open while a long session is silent, and requests can come back on it. `None`: no
    /// pings. Keep it below the peer's idle timeout (ours: [`TransportConfig::idle_timeout`]).
    pub keepalive: Option<Duration>,
    /// How long a whole message may take to arrive on a stream, from its first byte (for an
    /// accepted connection's first message, from the accept). Bytes arriving do not move it.
    pub message_timeout: Duration,
    /// How long writing one frame to a stream may block before the connection is closed.
    pub write_timeout: Duration,
    /// Stream connections accepted and open at once, from every source together; one more
    /// is closed at once (0: no cap).
    pub max_connections: usize,
    /// Stream connections accepted and open at once from one source (an IPv4 address or an
    /// IPv6 /64); one more is closed at once (0: no cap).
    pub max_connections_per_source: usize,
    /// How long an outgoing TCP connect may take.
    pub connect_timeout: Duration,
    /// The receive buffer asked for each UDP socket, in bytes (the kernel caps it at
    /// `net.core.rmem_max`): what absorbs a burst of datagrams while the receiving task
    /// waits for a core. 0 keeps the system default.
    pub udp_recv_buffer: usize,
    /// The send buffer asked for each UDP socket, in bytes (capped at
    /// `net.core.wmem_max`); 0 keeps the system default.
    pub udp_send_buffer: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            udp: Vec::new(),
            tcp: Vec::new(),
            tls: Vec::new(),
            tls_setup: None,
            tls_connect_from: None,
            max_message: StreamDecoder::DEFAULT_MAX,
            idle_timeout: Duration::from_secs(300),
            keepalive: Some(Duration::from_secs(100)),
            message_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_source: 64,
            connect_timeout: Duration::from_secs(5),
            udp_recv_buffer: 4 << 20,
            udp_send_buffer: 1 << 20,
        }
    }
}

/// What went wrong sending or binding.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding a listening socket failed.
    #[error("cannot bind {transport} on {addr}")]
    Bind {
        /// The transport being bound.
        transport: Transport,
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// No socket of the needed transport (or address family) is open.
    #[error("no {0} transport is configured")]
    NoTransport(Transport),
    /// The message is larger than a datagram may carry.
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    /// TLS listening addresses are configured without a certificate and key.
    #[error("TLS listening addresses need a TLS certificate and key")]
    NoCertificate,
    /// The TLS handshake with a peer failed (its certificate is not trusted, does not name the
    /// host expected, or the handshake did not finish in time).
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        /// The peer address.
        addr: SocketAddr,
        /// What went wrong.
        source: io::Error,
    },
    /// Connecting to a stream peer failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The peer address.
        addr: SocketAddr,
        /// The OS error (or a timeout).
        source: io::Error,
    },
    /// The connection named by the peer is gone.
    #[error("connection to {0} is closed")]
    ConnectionClosed(SocketAddr),
    /// The connection's queue was full — its peer does not read what is sent to it — so it
    /// was closed.
    #[error("connection to {0} closed: its peer does not read")]
    QueueFull(SocketAddr),
    /// Sending on a socket failed.
    #[error("send to {addr} failed")]
    Send {
        /// The peer address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

/// Why [`Transports::try_send`] did not send.
#[derive(Debug)]
pub enum TrySendError {
    /// Sending now would have to wait (a full UDP socket buffer, or a stream connection
    /// still to open): the message, to be sent with [`Transports::send`].
    WouldBlock(Bytes),
    /// The send failed (counted in [`TransportStats::send_errors`]).
    Failed(TransportError),
}

/// Counters kept by the transports, for metrics.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Datagrams and frames received.
    pub received: AtomicU64,
    /// Messages sent.
    pub sent: AtomicU64,
    /// Stream connections closed for a framing error (too large, bad Content-Length).
    pub framing_errors: AtomicU64,
    /// Sends that failed.
    pub send_errors: AtomicU64,
    /// TCP connections accepted or opened.
    pub connections: AtomicU64,
    /// TCP connections open right now (accepted and opened).
    pub connections_open: AtomicU64,
    /// Connections closed at once because every connection allowed was taken
    /// ([`TransportConfig::max_connections`]).
    pub refused_overall: AtomicU64,
    /// Connections closed at once because their source held as many as one may
    /// ([`TransportConfig::max_connections_per_source`]).
    pub refused_per_source: AtomicU64,
    /// Connections closed because a message did not arrive whole in time
    /// ([`TransportConfig::message_timeout`]).
    pub message_timeouts: AtomicU64,
    /// Connections closed for being idle ([`TransportConfig::idle_timeout`]).
    pub idle_closed: AtomicU64,
    /// Connections closed because a write blocked too long
    /// ([`TransportConfig::write_timeout`]).
    pub write_timeouts: AtomicU64,
    /// Connections closed because their send queue was full (the peer does not read).
    pub queue_full: AtomicU64,
    /// TLS handshakes that failed or did not finish in time (accepted and opened).
    pub tls_handshake_failures: AtomicU64,
    /// Double-CRLF keep-alive pings received and answered with a pong (RFC 5626 §3.5.1).
    pub pings_answered: AtomicU64,
}

/// The open transports: a cheap handle that can be cloned into every task that sends.
#[derive(Clone)]
pub struct Transports {
    inner: Arc<Inner>,
}

struct Conn {
    peer_addr: SocketAddr,
    transport: Transport,
    /// The end-entity certificate a TLS peer presented (verified by the handshake).
    peer_cert: Option<CertificateDer<'static>>,
    tx: mpsc::Sender<Bytes>,
    /// Never sent on: dropping it (removing the entry) tells the connection's tasks to end.
    _close: watch::Sender<()>,
}

struct Inner {
    config: TransportConfig,
    /// The UDP sockets with their local addresses (read once: a `getsockname` per send
    /// showed in profiles).
    udp: Vec<(Arc<UdpSocket>, SocketAddr)>,
    tcp_local: Vec<SocketAddr>,
    tls_local: Vec<SocketAddr>,
    /// Where opened TLS connections are bound ([`TransportConfig::tls_connect_from`]).
    tls_connect_from: Option<SocketAddr>,
    /// The TLS settings, when configured.
    tls: Option<TlsSetup>,
    /// The names TLS connections opened to an address must show (RFC 5922 §7.1).
    tls_names: Mutex<HashMap<SocketAddr, ServerName<'static>>>,
    conns: Mutex<ConnTable>,
    next_conn: AtomicU64,
    sink: Arc<dyn Sink>,
    /// What sees every message in and out, once set.
    tap: std::sync::OnceLock<Arc<dyn Tap>>,
    stats: TransportStats,
    /// The caps on accepted connections.
    caps: Arc<ConnectionCaps>,
    /// When a refusal by a cap was last logged at `warn` (one a minute at most).
    cap_warned: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct ConnTable {
    by_id: HashMap<ConnId, Conn>,
    by_addr: HashMap<(Transport, SocketAddr), ConnId>,
}

/// How many frames may wait for one connection's writer; one more closes the connection
/// (its peer does not read).
const CONN_QUEUE: usize = 256;

/// The read buffer a connection starts with, in bytes.
const READ_BUF: usize = 4 * 1024;

/// A connection's read buffer grown past this many bytes (by a large message) is given back
/// once it is empty.
pub const READ_BUF_KEEP: usize = 16 * 1024;

/// How often a refusal by a connection cap is logged at `warn` (each is counted).
const CAP_WARN_EVERY: Duration = Duration::from_secs(60);

impl Transports {
    /// Binds every configured socket and starts the receiving tasks, which hand messages to
    /// `sink`. Must be called inside a tokio runtime.
    pub async fn bind(
        config: TransportConfig,
        sink: Arc<dyn Sink>,
    ) -> Result<Transports, TransportError> {
        let mut udp = Vec::new();
        for addr in &config.udp {
            let socket = bind_udp(*addr, &config).map_err(|source| TransportError::Bind {
                transport: Transport::Udp,
                addr: *addr,
                source,
            })?;
            let local = socket.local_addr().map_err(|source| TransportError::Bind {
                transport: Transport::Udp,
                addr: *addr,
                source,
            })?;
            udp.push((Arc::new(socket), local));
        }
        let mut listeners = Vec::new();
        let mut tcp_local = Vec::new();
        for addr in &config.tcp {
            let listener =
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| TransportError::Bind {
                        transport: Transport::Tcp,
                        addr: *addr,
                        source,
                    })?;
            let local = listener
                .local_addr()
                .map_err(|source| TransportError::Bind {
                    transport: Transport::Tcp,
                    addr: *addr,
                    source,
                })?;
            tcp_local.push(local);
            listeners.push(listener);
        }
        let mut tls_listeners = Vec::new();
        let mut tls_local = Vec::new();
        let acceptor = match (&config.tls_setup, config.tls.is_empty()) {
            (_, true) => None,
            (Some(setup), false) => Some(setup.acceptor().ok_or(TransportError::NoCertificate)?),
            (None, false) => return Err(TransportError::NoCertificate),
        };
        for addr in &config.tls {
            let bind_error = |source| TransportError::Bind {
                transport: Transport::Tls,
                addr: *addr,
                source,
            };
            let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
            tls_local.push(listener.local_addr().map_err(bind_error)?);
            tls_listeners.push(listener);
        }
        let tls_connect_from = config.tls_connect_from.map(|mut from| {
            if from.port() == 0 {
                if let Some((_, local)) = udp.iter().find(|(_, l)| l.is_ipv4() == from.is_ipv4()) {
                    from.set_port(local.port());
                }
            }
            from
        });
        let inner = Arc::new(Inner {
            tls_connect_from,
            udp,
            tcp_local,
            tls_local,
            tls: config.tls_setup.clone(),
            tls_names: Mutex::new(HashMap::new()),
            conns: Mutex::new(ConnTable::default()),
            next_conn: AtomicU64::new(1),
            sink,
            tap: std::sync::OnceLock::new(),
            stats: TransportStats::default(),
            caps: ConnectionCaps::new(config.max_connections, config.max_connections_per_source),
            cap_warned: Mutex::new(None),
            config,
        });
        for (socket, _) in &inner.udp {
            tokio::spawn(udp_recv_loop(Arc::downgrade(&inner), socket.clone()));
        }
        for listener in listeners {
            tokio::spawn(accept_loop(Arc::downgrade(&inner), listener, None));
        }
        if let Some(acceptor) = acceptor {
            for listener in tls_listeners {
                tokio::spawn(accept_loop(
                    Arc::downgrade(&inner),
                    listener,
                    Some(acceptor.clone()),
                ));
            }
        }
        Ok(Transports { inner })
    }

    /// The local address of the first socket of a transport (useful after binding port 0).
    pub fn local_addr(&self, transport: Transport) -> Option<SocketAddr> {
        match transport {
            Transport::Udp => self.inner.udp.first().map(|(_, local)| *local),
            Transport::Tcp => self.inner.tcp_local.first().copied(),
            Transport::Tls => self.inner.tls_local.first().copied(),
        }
    }

    /// The transports that are open, UDP first.
    pub fn transports(&self) -> Vec<Transport> {
        let mut out = Vec::new();
        if !self.inner.udp.is_empty() {
            out.push(Transport::Udp);
        }
        if !self.inner.tcp_local.is_empty() {
            out.push(Transport::Tcp);
        }
        if !self.inner.tls_local.is_empty() {
            out.push(Transport::Tls);
        }
        out
    }

    /// Every local address we listen on, with its transport.
    pub fn local_addrs(&self) -> Vec<(Transport, SocketAddr)> {
        let mut out: Vec<_> = self
            .inner
            .udp
            .iter()
            .map(|(_, a)| (Transport::Udp, *a))
            .collect();
        out.extend(self.inner.tcp_local.iter().map(|a| (Transport::Tcp, *a)));
        out.extend(self.inner.tls_local.iter().map(|a| (Transport::Tls, *a)));
        out
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &TransportStats {
        &self.inner.stats
    }

    /// Sends one finished message to a peer. For TCP, the peer's connection is used when it
    /// names one that is still open; otherwise a connection to the address is reused or
    /// opened. A message for a closed named connection whose peer is not reachable otherwise
    /// (RFC 3261 §18.2.2 would open a new connection to the Via's sent-by) is opened anew to
    /// the same address.
    pub async fn send(&self, to: &Peer, bytes: Bytes) -> Result<(), TransportError> {
        let tapped = self
            .inner
            .tap
            .get()
            .map(|tap| (tap, bytes.clone(), std::time::SystemTime::now()));
        let result = match to.transport {
            Transport::Udp => self.send_udp(to.addr, &bytes).await,
            Transport::Tcp | Transport::Tls => self.send_stream(to, bytes).await,
        };
        match &result {
            Ok(()) => {
                if let Some((tap, bytes, at)) = tapped {
                    tap.sent(to, &bytes, at);
                }
                self.inner.stats.sent.fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => self.inner.stats.send_errors.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// Sets what sees every message in and out from now on ([`Tap`]). Only the first call
    /// sets it; `false` when a tap was set already.
    pub fn set_tap(&self, tap: Arc<dyn Tap>) -> bool {
        self.inner.tap.set(tap).is_ok()
    }

    /// Sends one finished message now if that needs no waiting: a UDP datagram, or a frame
    /// for a TCP connection that is open and has room in its queue. Otherwise the message
    /// comes back as [`TrySendError::WouldBlock`], for [`Transports::send`] in a task.
    pub fn try_send(&self, to: &Peer, bytes: Bytes) -> Result<(), TrySendError> {
        let tapped = self
            .inner
            .tap
            .get()
            .map(|tap| (tap, bytes.clone(), std::time::SystemTime::now()));
        let result = match to.transport {
            Transport::Udp => match self.udp_socket(to.addr, bytes.len()) {
                Ok(socket) => match socket.try_send_to(&bytes, to.addr) {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Err(TrySendError::WouldBlock(bytes))
                    }
                    Err(source) => Err(TransportError::Send {
                        addr: to.addr,
                        source,
                    }),
                },
                Err(e) => Err(e),
            },
            Transport::Tcp | Transport::Tls => {
                let Some((id, tx)) = self.open_conn(to) else {
                    return Err(TrySendError::WouldBlock(bytes));
                };
                self.queue(id, &tx, to.addr, bytes)
            }
        };
        match result {
            Ok(()) => {
                if let Some((tap, bytes, at)) = tapped {
                    tap.sent(to, &bytes, at);
                }
                self.inner.stats.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.inner.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                Err(TrySendError::Failed(e))
            }
        }
    }

    /// The UDP socket to send a datagram of `len` bytes to `addr` from: one of the same
    /// address family, else the first.
    fn udp_socket(&self, addr: SocketAddr, len: usize) -> Result<&UdpSocket, TransportError> {
        if len > 65_507 {
            return Err(TransportError::TooLarge(len));
        }
        self.inner
            .udp
            .iter()
            .find(|(_, local)| local.is_ipv4() == addr.is_ipv4())
            .or_else(|| self.inner.udp.first())
            .map(|(socket, _)| socket.as_ref())
            .ok_or(TransportError::NoTransport(Transport::Udp))
    }

    async fn send_udp(&self, addr: SocketAddr, bytes: &[u8]) -> Result<(), TransportError> {
        self.udp_socket(addr, bytes.len())?
            .send_to(bytes, addr)
            .await
            .map(|_| ())
            .map_err(|source| TransportError::Send { addr, source })
    }

    /// The queue of an open connection to `to`: the one it names, else one to its address.
    fn open_conn(&self, to: &Peer) -> Option<(ConnId, mpsc::Sender<Bytes>)> {
        let table = lock(&self.inner.conns);
        // A connection of another transport is never used (a TLS peer's message must not
        // leave in clear on a TCP connection to the same address).
        to.conn
            .and_then(|id| table.by_id.get(&id).map(|c| (id, c)))
            .filter(|(_, c)| c.transport == to.transport)
            .or_else(|| {
                table
                    .by_addr
                    .get(&(to.transport, to.addr))
                    .and_then(|id| table.by_id.get(id).map(|c| (*id, c)))
            })
            .map(|(id, c)| (id, c.tx.clone()))
    }

    /// Puts a frame on connection `id`'s queue without waiting: a full queue means its peer
    /// does not read what it is sent, and the connection is closed.
    fn queue(
        &self,
        id: ConnId,
        tx: &mpsc::Sender<Bytes>,
        addr: SocketAddr,
        bytes: Bytes,
    ) -> Result<(), TransportError> {
        match tx.try_send(bytes) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.inner.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                warn!(%addr, queued = CONN_QUEUE, "tcp peer does not read what it is sent; closing");
                close_conn(&self.inner, id);
                Err(TransportError::QueueFull(addr))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(TransportError::ConnectionClosed(addr))
            }
        }
    }

    /// Opens a TCP or TLS connection to `to` unless one is open, sending nothing (nothing to
    /// do for UDP). For a client that tries targets in turn (RFC 3263 §4.3): a refused
    /// connection, or a failed TLS handshake, is reported here at once rather than as a
    /// transaction timeout; the connection opened is the one the request then leaves on.
    pub async fn ensure_connected(&self, to: &Peer) -> Result<(), TransportError> {
        if to.transport == Transport::Udp || self.open_conn(to).is_some() {
            return Ok(());
        }
        self.connect(to.transport, to.addr).await.map(|_| ())
    }

    async fn send_stream(&self, to: &Peer, bytes: Bytes) -> Result<(), TransportError> {
        let (id, tx) = match self.open_conn(to) {
            Some(open) => open,
            None => self.connect(to.transport, to.addr).await?,
        };
        self.queue(id, &tx, to.addr, bytes)
    }

    async fn connect(
        &self,
        transport: Transport,
        addr: SocketAddr,
    ) -> Result<(ConnId, mpsc::Sender<Bytes>), TransportError> {
        // Fail before connecting when TLS cannot be spoken at all.
        let tls = match transport {
            Transport::Tls => Some(
                self.inner
                    .tls
                    .as_ref()
                    .ok_or(TransportError::NoTransport(Transport::Tls))?,
            ),
            _ => None,
        };
        let timeout = self.inner.config.connect_timeout;
        let from = if tls.is_some() {
            self.inner.tls_connect_from
        } else {
            None
        };
        let stream = tokio::time::timeout(timeout, connect_from(from, addr))
            .await
            .map_err(|_| TransportError::Connect {
                addr,
                source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|source| TransportError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let Some(tls) = tls else {
            let (r, w) = stream.into_split();
            let halves: Halves = (Box::new(r), Box::new(w));
            return Ok(spawn_connection(
                &self.inner,
                halves,
                Transport::Tcp,
                addr,
                None,
                None,
            ));
        };
        let name = self.expected_name(addr);
        let handshake = tls.connector().connect(name, stream);
        let stream = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                self.inner
                    .stats
                    .tls_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!(%addr, error = %source, "TLS handshake failed");
                return Err(TransportError::Handshake { addr, source });
            }
            Err(_) => {
                self.inner
                    .stats
                    .tls_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Err(TransportError::Handshake {
                    addr,
                    source: io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"),
                });
            }
        };
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        let (r, w) = tokio::io::split(stream);
        let halves: Halves = (Box::new(r), Box::new(w));
        Ok(spawn_connection(
            &self.inner,
            halves,
            Transport::Tls,
            addr,
            None,
            cert,
        ))
    }

    /// The name a TLS connection opened to `addr` must show in its certificate: one set by
    /// [`Transports::expect_name`], else the IP address (RFC 5922 §7.1: the host part of the
    /// URI that was resolved to `addr`).
    fn expected_name(&self, addr: SocketAddr) -> ServerName<'static> {
        let names = self
            .inner
            .tls_names
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        names
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }

    /// Sets the name (a DNS name from a URI's host, RFC 5922 §7.1) that the certificate of a
    /// TLS connection opened to `addr` must show; by default it must show the IP address. For
    /// a caller that resolved a `sips:` URI with a domain name to `addr`.
    pub fn expect_name(&self, addr: SocketAddr, name: ServerName<'static>) {
        self.inner
            .tls_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, name);
    }

    /// The end-entity certificate the peer of TLS connection `conn` presented, when it is
    /// open and the peer presented one. The TLS handshake already verified it against the
    /// trusted CAs (RFC 5922 §7.2: a server that asked for a client certificate knows its
    /// peer by it); whose it is, is read from its subjectAltName
    /// ([`TlsSetup::certificate_names`]).
    pub fn peer_certificate(&self, conn: ConnId) -> Option<CertificateDer<'static>> {
        lock(&self.inner.conns)
            .by_id
            .get(&conn)
            .and_then(|c| c.peer_cert.clone())
    }

    /// The TLS settings, when configured (for a program's other TLS connections, such as the
    /// application data connection).
    pub fn tls_setup(&self) -> Option<&TlsSetup> {
        self.inner.tls.as_ref()
    }

    /// Stream connections accepted and open right now (those the caps count).
    pub fn accepted_connections(&self) -> usize {
        self.inner.caps.total()
    }
}

/// A TCP connection to `to`, from `from` when given (its address reusable, so that a
/// connection to another peer can be bound there too).
async fn connect_from(from: Option<SocketAddr>, to: SocketAddr) -> io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect(to).await;
    };
    let socket = if from.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(from)?;
    socket.connect(to).await
}

fn lock(m: &Mutex<ConnTable>) -> std::sync::MutexGuard<'_, ConnTable> {
    // A panic while holding this lock cannot leave the table inconsistent (each operation is a
    // single insert or remove), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A non-blocking UDP socket bound to `addr` with the configured buffer sizes. A size the
/// kernel refuses is logged and left at its default: the socket still works.
fn bind_udp(addr: SocketAddr, config: &TransportConfig) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if config.udp_recv_buffer > 0 {
        if let Err(e) = socket.set_recv_buffer_size(config.udp_recv_buffer) {
            warn!(%addr, error = %e, "cannot set the UDP receive buffer size");
        }
    }
    if config.udp_send_buffer > 0 {
        if let Err(e) = socket.set_send_buffer_size(config.udp_send_buffer) {
            warn!(%addr, error = %e, "cannot set the UDP send buffer size");
        }
    }
    debug!(
        %addr,
        recv_buffer = socket.recv_buffer_size().unwrap_or(0),
        send_buffer = socket.send_buffer_size().unwrap_or(0),
        "udp socket buffers"
    );
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

async fn udp_recv_loop(inner: std::sync::Weak<Inner>, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP port-unreachable surfaces here on some systems: not fatal.
                debug!(error = %e, "udp recv error");
                continue;
            }
        };
        let Some(inner) = inner.upgrade() else { return };
        inner.stats.received.fetch_add(1, Ordering::Relaxed);
        if len > inner.config.max_message {
            inner.stats.framing_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let bytes = Bytes::copy_from_slice(&buf[..len]);
        if let Some(tap) = inner.tap.get() {
            tap.received(&Peer::udp(from), &bytes);
        }
        inner.sink.deliver(Peer::udp(from), bytes);
    }
}

/// A stream connection's two halves (TCP, or TLS over TCP).
type Halves = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

async fn accept_loop(
    inner: Weak<Inner>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "tcp accept failed");
                // Out of descriptors and the like: back off briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(inner) = inner.upgrade() else { return };
        let permit = match inner.caps.admit(addr.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                refuse_connection(&inner, addr, refusal);
                // Dropping the stream closes it: nothing is read from it or kept for it.
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match &tls {
            None => {
                let (r, w) = stream.into_split();
                let halves: Halves = (Box::new(r), Box::new(w));
                spawn_connection(&inner, halves, Transport::Tcp, addr, Some(permit), None);
            }
            Some(acceptor) => {
                // The handshake runs in its own task, holding its place under the caps, and
                // must finish within the message deadline.
                let deadline = inner.config.message_timeout;
                let handshake = acceptor.accept(stream);
                let weak = Arc::downgrade(&inner);
                tokio::spawn(async move {
                    let result = tokio::time::timeout(deadline, handshake).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let stream = match result {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            inner
                                .stats
                                .tls_handshake_failures
                                .fetch_add(1, Ordering::Relaxed);
                            debug!(%addr, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            inner
                                .stats
                                .tls_handshake_failures
                                .fetch_add(1, Ordering::Relaxed);
                            inner.stats.message_timeouts.fetch_add(1, Ordering::Relaxed);
                            debug!(%addr, "TLS handshake not finished in time; closing");
                            return;
                        }
                    };
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.clone().into_owned());
                    let (r, w) = tokio::io::split(stream);
                    let halves: Halves = (Box::new(r), Box::new(w));
                    spawn_connection(&inner, halves, Transport::Tls, addr, Some(permit), cert);
                });
            }
        }
    }
}

/// Counts a connection refused by a cap, and logs it (at `warn` once a minute, else at
/// `debug`: a flood must not flood the log too).
fn refuse_connection(inner: &Inner, addr: SocketAddr, refusal: CapRefusal) {
    let counter = match refusal {
        CapRefusal::Overall => &inner.stats.refused_overall,
        CapRefusal::PerSource => &inner.stats.refused_per_source,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    let loud = {
        let mut warned = inner.cap_warned.lock().unwrap_or_else(|p| p.into_inner());
        let due = warned.is_none_or(|at| now.duration_since(at) >= CAP_WARN_EVERY);
        if due {
            *warned = Some(now);
        }
        due
    };
    let (overall, per_source) = (
        inner.stats.refused_overall.load(Ordering::Relaxed),
        inner.stats.refused_per_source.load(Ordering::Relaxed),
    );
    if loud {
        warn!(%addr, reason = %refusal, refused_overall = overall, refused_per_address = per_source,
            "tcp connection refused (logged once a minute; every refusal is counted)");
    } else {
        debug!(%addr, reason = %refusal, "tcp connection refused");
    }
}

/// Removes connection `id` from the table, which tells its tasks to end: the writer sends
/// what is queued (each frame within the write timeout) and closes, the reader stops.
fn close_conn(inner: &Inner, id: ConnId) {
    let removed = {
        let mut table = lock(&inner.conns);
        let conn = table.by_id.remove(&id);
        if let Some(conn) = &conn {
            let key = (conn.transport, conn.peer_addr);
            if table.by_addr.get(&key) == Some(&id) {
                table.by_addr.remove(&key);
            }
        }
        conn
    };
    // Dropped outside the lock.
    drop(removed);
}

/// What a connection holds until both its tasks have ended: its place under the caps (for
/// an accepted one) and its count among the open connections.
struct Held {
    inner: Weak<Inner>,
    _permit: Option<ConnectionPermit>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Registers a connection in the table and starts its reader and writer tasks. `permit` is
/// its place under the caps when it was accepted (`None`: we opened it).
fn spawn_connection(
    inner: &Arc<Inner>,
    (reader, writer): Halves,
    transport: Transport,
    addr: SocketAddr,
    permit: Option<ConnectionPermit>,
    peer_cert: Option<CertificateDer<'static>>,
) -> (ConnId, mpsc::Sender<Bytes>) {
    // Counted from 1: zero is the `None` of an `Option<ConnId>` (8 bytes, not 16, in every
    // Peer).
    let n = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let id = ConnId(std::num::NonZeroU64::new(n).unwrap_or(std::num::NonZeroU64::MIN));
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    let (close, closed) = watch::channel(());
    let accepted = permit.is_some();
    {
        let mut table = lock(&inner.conns);
        table.by_id.insert(
            id,
            Conn {
                peer_addr: addr,
                transport,
                peer_cert,
                tx: tx.clone(),
                _close: close,
            },
        );
        table.by_addr.insert((transport, addr), id);
    }
    inner.stats.connections.fetch_add(1, Ordering::Relaxed);
    inner.stats.connections_open.fetch_add(1, Ordering::Relaxed);
    let held = Arc::new(Held {
        inner: Arc::downgrade(inner),
        _permit: permit,
    });
    tokio::spawn(conn_writer(
        Arc::downgrade(inner),
        Writer {
            writer,
            rx,
            closed: closed.clone(),
            id,
            addr,
            timeout: inner.config.write_timeout,
            // Only the party that opened a connection pings on it (RFC 5626 §4.4.1).
            keepalive: inner.config.keepalive.filter(|_| !accepted),
            _held: held.clone(),
        },
    ));
    tokio::spawn(conn_reader(
        Arc::downgrade(inner),
        Reader {
            reader,
            transport,
            id,
            addr,
            tx: tx.clone(),
            closed,
            accepted,
            _held: held,
        },
    ));
    (id, tx)
}

/// What a connection's writer task owns.
struct Writer {
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    rx: mpsc::Receiver<Bytes>,
    closed: watch::Receiver<()>,
    id: ConnId,
    addr: SocketAddr,
    timeout: Duration,
    /// Ping after this long without a write (a connection we opened).
    keepalive: Option<Duration>,
    _held: Arc<Held>,
}

/// A double-CRLF keep-alive ping (RFC 5626 §3.5.1).
const PING: &[u8] = b"\r\n\r\n";

/// Why a writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteEnd {
    /// Every sender is gone.
    Done,
    /// The connection was closed (by its reader, or by a sender finding its queue full).
    Closed,
    /// A write failed.
    Failed,
    /// A write blocked past the write timeout.
    TimedOut,
}

/// How long a closed connection's writer may still spend sending what was queued.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);

async fn conn_writer(inner: Weak<Inner>, mut w: Writer) {
    let addr = w.addr;
    let mut ping_at = w.keepalive.map(|k| Instant::now() + k);
    let end = loop {
        let bytes = tokio::select! {
            bytes = w.rx.recv() => match bytes {
                Some(bytes) => bytes,
                None => break WriteEnd::Done,
            },
            _ = w.closed.changed() => break WriteEnd::Closed,
            () = sleep_until_some(ping_at) => Bytes::from_static(PING),
        };
        ping_at = w.keepalive.map(|k| Instant::now() + k);
        // A blocked write ends at the write timeout, or when the connection is closed.
        tokio::select! {
            written = tokio::time::timeout(w.timeout, w.writer.write_all(&bytes)) => match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(%addr, error = %e, "tcp write failed; closing");
                    break WriteEnd::Failed;
                }
                Err(_) => break WriteEnd::TimedOut,
            },
            _ = w.closed.changed() => break WriteEnd::Closed,
        }
    };
    match end {
        WriteEnd::Closed => {
            // Send what is already queued (answers to the last requests), for a bounded time.
            let flush = async {
                while let Ok(bytes) = w.rx.try_recv() {
                    if w.writer.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(FLUSH_ON_CLOSE.min(w.timeout), flush).await;
        }
        WriteEnd::TimedOut | WriteEnd::Failed => {
            if let Some(inner) = inner.upgrade() {
                if end == WriteEnd::TimedOut {
                    inner.stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
                    warn!(%addr, timeout = ?w.timeout, "tcp write blocked too long (the peer does not read); closing");
                }
                close_conn(&inner, w.id);
            }
        }
        WriteEnd::Done => {}
    }
    let _ = tokio::time::timeout(FLUSH_ON_CLOSE.min(w.timeout), w.writer.shutdown()).await;
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a connection's reader task owns.
struct Reader {
    reader: Box<dyn AsyncRead + Send + Unpin>,
    transport: Transport,
    id: ConnId,
    addr: SocketAddr,
    /// The connection's queue, for keep-alive pongs.
    tx: mpsc::Sender<Bytes>,
    closed: watch::Receiver<()>,
    /// Accepted (its first message is due within the message timeout of the accept), not
    /// opened by us.
    accepted: bool,
    _held: Arc<Held>,
}

/// Why a reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    Closed,
    Eof,
    Error,
    Idle,
    MessageTimeout,
    Framing,
}

async fn conn_reader(inner: Weak<Inner>, mut r: Reader) {
    let (max, idle, message_timeout) = match inner.upgrade() {
        Some(i) => (
            i.config.max_message,
            i.config.idle_timeout,
            i.config.message_timeout,
        ),
        None => return,
    };
    let mut decoder = StreamDecoder::new(max);
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let peer = Peer {
        transport: r.transport,
        addr: r.addr,
        conn: Some(r.id),
    };
    let addr = r.addr;
    let start = Instant::now();
    let mut idle_at = start + idle;
    // The deadline of the message under way: for an accepted connection, its first one is
    // due from the accept.
    let mut message_by = r.accepted.then_some(start + message_timeout);
    let end = 'conn: loop {
        let wake = message_by.unwrap_or(idle_at);
        tokio::select! {
            read = r.reader.read_buf(&mut buf) => match read {
                Ok(0) => break ReadEnd::Eof,
                Ok(_) => {}
                Err(e) => {
                    debug!(%addr, error = %e, "tcp read failed");
                    break ReadEnd::Error;
                }
            },
            _ = r.closed.changed() => break ReadEnd::Closed,
            () = tokio::time::sleep_until(wake) => {
                break if message_by.is_some() { ReadEnd::MessageTimeout } else { ReadEnd::Idle };
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Frame::Message(bytes))) => {
                    inner.stats.received.fetch_add(1, Ordering::Relaxed);
                    idle_at = Instant::now() + idle;
                    message_by = None;
                    if let Some(tap) = inner.tap.get() {
                        tap.received(&peer, &bytes);
                    }
                    inner.sink.deliver(peer, bytes);
                }
                Ok(Some(Frame::Ping)) => {
                    idle_at = Instant::now() + idle;
                    message_by = None;
                    // RFC 5626 §3.5.1: a double-CRLF ping is answered with a single CRLF pong.
                    let _ = r.tx.try_send(Bytes::from_static(b"\r\n"));
                    inner.stats.pings_answered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => break,
                Err(e) => {
                    inner.stats.framing_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(%addr, error = %e, "tcp framing error; closing connection");
                    break 'conn ReadEnd::Framing;
                }
            }
        }
        if buf.iter().all(|b| matches!(b, b'\r' | b'\n')) {
            // Nothing but line breaks: a single-CRLF pong to our ping, or the start of the
            // peer's ping (RFC 5626 §3.5.1), not a message under way. Either is a sign of
            // life.
            idle_at = Instant::now() + idle;
            if buf.is_empty() && buf.capacity() > READ_BUF_KEEP {
                buf = BytesMut::with_capacity(READ_BUF);
            }
        } else if message_by.is_none() {
            // The first bytes of a message: the whole of it is due within the timeout.
            message_by = Some(Instant::now() + message_timeout);
        }
    };
    if let Some(inner) = inner.upgrade() {
        match end {
            ReadEnd::MessageTimeout => {
                inner.stats.message_timeouts.fetch_add(1, Ordering::Relaxed);
                debug!(%addr, pending = buf.len(), timeout = ?message_timeout, "tcp message not complete in time; closing");
            }
            ReadEnd::Idle => {
                inner.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                debug!(%addr, "tcp connection idle; closing");
            }
            _ => {}
        }
        close_conn(&inner, r.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn udp_sockets_get_the_buffer_sizes_asked_for() {
        // Small sizes, below any system default and rmem_max: Linux doubles what it is
        // given, so a socket left at its default (208 KiB and up) would be far above this.
        let config = TransportConfig {
            udp_recv_buffer: 4096,
            udp_send_buffer: 4096,
            ..TransportConfig::default()
        };
        let socket = bind_udp("127.0.0.1:0".parse().unwrap(), &config).unwrap();
        let sock = socket2::SockRef::from(&socket);
        assert!(sock.recv_buffer_size().unwrap() <= 16 * 1024);
        assert!(sock.send_buffer_size().unwrap() <= 16 * 1024);
        let default = bind_udp(
            "127.0.0.1:0".parse().unwrap(),
            &TransportConfig {
                udp_recv_buffer: 0,
                udp_send_buffer: 0,
                ..TransportConfig::default()
            },
        )
        .unwrap();
        assert!(
            socket2::SockRef::from(&default).recv_buffer_size().unwrap()
                > sock.recv_buffer_size().unwrap(),
            "0 keeps the larger system default"
        );
    }
}
