//! UDP and TCP transports on tokio (RFC 3261 §18): the sockets, the connection table and the
//! stream framing. What arrives is handed, unparsed, to a [`Sink`] (the endpoint); what leaves
//! is a finished byte string for a [`Peer`].
//!
//! TCP connections are framed by Content-Length with [`StreamDecoder`]; a connection that
//! sends a frame over the size limit, or an unframeable stream, is closed; an idle connection is
//! closed after the configured time. A response goes back on the connection its request came on
//! (§18.2.2); a request to a TCP peer reuses a connection to that address or opens one.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::framing::{Frame, StreamDecoder};
use crate::peer::{ConnId, Peer, Transport};

/// Where the transports deliver what they receive: one call per complete message (a UDP
/// datagram or a TCP frame). Called from the receiving task; it must not block.
pub trait Sink: Send + Sync + 'static {
    /// Takes one received message, unparsed.
    fn deliver(&self, from: Peer, bytes: Bytes);
}

/// Listening addresses and limits of the transports.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// UDP addresses to bind (port 0 picks a free port).
    pub udp: Vec<SocketAddr>,
    /// TCP addresses to listen on (port 0 picks a free port).
    pub tcp: Vec<SocketAddr>,
    /// The largest message accepted on a stream or datagram, in bytes.
    pub max_message: usize,
    /// A TCP connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
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
            max_message: StreamDecoder::DEFAULT_MAX,
            idle_timeout: Duration::from_secs(300),
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
    /// Sending now would have to wait (a full socket buffer or connection queue, or a
    /// connection still to open): the message, to be sent with [`Transports::send`].
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
}

/// The open transports: a cheap handle that can be cloned into every task that sends.
#[derive(Clone)]
pub struct Transports {
    inner: Arc<Inner>,
}

struct Conn {
    peer_addr: SocketAddr,
    tx: mpsc::Sender<Bytes>,
}

struct Inner {
    config: TransportConfig,
    /// The UDP sockets with their local addresses (read once: a `getsockname` per send
    /// showed in profiles).
    udp: Vec<(Arc<UdpSocket>, SocketAddr)>,
    tcp_local: Vec<SocketAddr>,
    conns: Mutex<ConnTable>,
    next_conn: AtomicU64,
    sink: Arc<dyn Sink>,
    stats: TransportStats,
}

#[derive(Default)]
struct ConnTable {
    by_id: HashMap<ConnId, Conn>,
    by_addr: HashMap<SocketAddr, ConnId>,
}

/// How many frames may wait for one connection's writer before senders see back-pressure.
const CONN_QUEUE: usize = 256;

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
        let inner = Arc::new(Inner {
            config,
            udp,
            tcp_local,
            conns: Mutex::new(ConnTable::default()),
            next_conn: AtomicU64::new(1),
            sink,
            stats: TransportStats::default(),
        });
        for (socket, _) in &inner.udp {
            tokio::spawn(udp_recv_loop(Arc::downgrade(&inner), socket.clone()));
        }
        for listener in listeners {
            tokio::spawn(accept_loop(Arc::downgrade(&inner), listener));
        }
        Ok(Transports { inner })
    }

    /// The local address of the first socket of a transport (useful after binding port 0).
    pub fn local_addr(&self, transport: Transport) -> Option<SocketAddr> {
        match transport {
            Transport::Udp => self.inner.udp.first().map(|(_, local)| *local),
            Transport::Tcp => self.inner.tcp_local.first().copied(),
            Transport::Tls => None,
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
        let result = match to.transport {
            Transport::Udp => self.send_udp(to.addr, &bytes).await,
            Transport::Tcp => self.send_tcp(to, bytes).await,
            Transport::Tls => Err(TransportError::NoTransport(Transport::Tls)),
        };
        match &result {
            Ok(()) => self.inner.stats.sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.inner.stats.send_errors.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// Sends one finished message now if that needs no waiting: a UDP datagram, or a frame
    /// for a TCP connection that is open and has room in its queue. Otherwise the message
    /// comes back as [`TrySendError::WouldBlock`], for [`Transports::send`] in a task.
    pub fn try_send(&self, to: &Peer, bytes: Bytes) -> Result<(), TrySendError> {
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
            Transport::Tcp => {
                let Some(tx) = self.open_conn(to) else {
                    return Err(TrySendError::WouldBlock(bytes));
                };
                match tx.try_send(bytes) {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::TrySendError::Full(bytes)) => {
                        return Err(TrySendError::WouldBlock(bytes))
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        Err(TransportError::ConnectionClosed(to.addr))
                    }
                }
            }
            Transport::Tls => Err(TransportError::NoTransport(Transport::Tls)),
        };
        match result {
            Ok(()) => {
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
    fn open_conn(&self, to: &Peer) -> Option<mpsc::Sender<Bytes>> {
        let table = lock(&self.inner.conns);
        to.conn
            .and_then(|id| table.by_id.get(&id))
            .or_else(|| {
                table
                    .by_addr
                    .get(&to.addr)
                    .and_then(|id| table.by_id.get(id))
            })
            .map(|c| c.tx.clone())
    }

    async fn send_tcp(&self, to: &Peer, bytes: Bytes) -> Result<(), TransportError> {
        let tx = match self.open_conn(to) {
            Some(tx) => tx,
            None => self.connect(to.addr).await?,
        };
        tx.send(bytes)
            .await
            .map_err(|_| TransportError::ConnectionClosed(to.addr))
    }

    async fn connect(&self, addr: SocketAddr) -> Result<mpsc::Sender<Bytes>, TransportError> {
        let stream =
            tokio::time::timeout(self.inner.config.connect_timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| TransportError::Connect {
                    addr,
                    source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                })?
                .map_err(|source| TransportError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(spawn_connection(&self.inner, stream, addr))
    }
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
        inner
            .sink
            .deliver(Peer::udp(from), Bytes::copy_from_slice(&buf[..len]));
    }
}

async fn accept_loop(inner: std::sync::Weak<Inner>, listener: TcpListener) {
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
        let _ = stream.set_nodelay(true);
        spawn_connection(&inner, stream, addr);
    }
}

/// Registers a connection in the table and starts its reader and writer tasks.
fn spawn_connection(
    inner: &Arc<Inner>,
    stream: TcpStream,
    addr: SocketAddr,
) -> mpsc::Sender<Bytes> {
    let id = ConnId(inner.next_conn.fetch_add(1, Ordering::Relaxed));
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    {
        let mut table = lock(&inner.conns);
        table.by_id.insert(
            id,
            Conn {
                peer_addr: addr,
                tx: tx.clone(),
            },
        );
        table.by_addr.insert(addr, id);
    }
    inner.stats.connections.fetch_add(1, Ordering::Relaxed);
    let (reader, writer) = stream.into_split();
    tokio::spawn(conn_writer(writer, rx));
    tokio::spawn(conn_reader(
        Arc::downgrade(inner),
        reader,
        id,
        addr,
        tx.clone(),
    ));
    tx
}

async fn conn_writer(mut writer: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(bytes) = rx.recv().await {
        if let Err(e) = writer.write_all(&bytes).await {
            debug!(error = %e, "tcp write failed; closing");
            break;
        }
    }
    let _ = writer.shutdown().await;
}

async fn conn_reader(
    inner: std::sync::Weak<Inner>,
    mut reader: tokio::net::tcp::OwnedReadHalf,
    id: ConnId,
    addr: SocketAddr,
    tx: mpsc::Sender<Bytes>,
) {
    let (max, idle) = match inner.upgrade() {
        Some(i) => (i.config.max_message, i.config.idle_timeout),
        None => return,
    };
    let mut decoder = StreamDecoder::new(max);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let peer = Peer {
        transport: Transport::Tcp,
        addr,
        conn: Some(id),
    };
    'conn: loop {
        match tokio::time::timeout(idle, reader.read_buf(&mut buf)).await {
            Err(_) => {
                debug!(%addr, "tcp connection idle; closing");
                break;
            }
            Ok(Err(e)) => {
                debug!(%addr, error = %e, "tcp read failed");
                break;
            }
            Ok(Ok(0)) => break,
            Ok(Ok(_)) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Frame::Message(bytes))) => {
                    inner.stats.received.fetch_add(1, Ordering::Relaxed);
                    inner.sink.deliver(peer, bytes);
                }
                Ok(Some(Frame::Ping)) => {
                    // RFC 5626 §3.5.1: a double-CRLF ping is answered with a single CRLF pong.
                    let _ = tx.try_send(Bytes::from_static(b"\r\n"));
                }
                Ok(None) => break,
                Err(e) => {
                    inner.stats.framing_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(%addr, error = %e, "tcp framing error; closing connection");
                    break 'conn;
                }
            }
        }
    }
    if let Some(inner) = inner.upgrade() {
        let mut table = lock(&inner.conns);
        if let Some(conn) = table.by_id.remove(&id) {
            if table.by_addr.get(&conn.peer_addr) == Some(&id) {
                table.by_addr.remove(&conn.peer_addr);
            }
        }
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
