//! The limits of the stream transport against peers that hold resources without using them
//! (issue 14, findings 4 and 5; RFC 3261 §26.1.5), on real loopback sockets:
//!
//! * connections past the per-address cap, then past the overall cap, are closed at once and
//!   counted, and a place freed is taken again;
//! * a message trickled a byte at a time (slowloris) is cut off at its deadline, however
//!   often bytes arrive; one that arrives whole in time is delivered; an accepted connection
//!   that never sends is closed at the same deadline; one that has sent a message then idles
//!   is closed by the idle timeout instead;
//! * a connection this party opened is kept open by its double-CRLF pings (RFC 5626
//!   §3.5.1) through both sides' idle timeouts, and the single-CRLF pongs are not taken for
//!   a message under way;
//! * a peer that never reads: a write that blocks past the write timeout closes the
//!   connection, and so does a full send queue — no sender waits and nothing piles up.
//!
//! Every wait is bounded by a tokio timeout; none is a sleep hoping something happened.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sip_core::transport::{Sink, TransportConfig, TransportError, Transports, TrySendError};
use sip_core::{Peer, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

/// The longest any one wait of these tests may take.
const WAIT: Duration = Duration::from_secs(10);

/// Hands what the transports receive to the test.
struct Received(mpsc::UnboundedSender<(Peer, Bytes)>);

impl Sink for Received {
    fn deliver(&self, from: Peer, bytes: Bytes) {
        let _ = self.0.send((from, bytes));
    }
}

async fn transports(
    config: TransportConfig,
) -> (
    Transports,
    SocketAddr,
    mpsc::UnboundedReceiver<(Peer, Bytes)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let config = TransportConfig {
        tcp: vec!["127.0.0.1:0".parse().unwrap()],
        ..config
    };
    let t = Transports::bind(config, Arc::new(Received(tx)))
        .await
        .unwrap();
    let addr = t.local_addr(Transport::Tcp).unwrap();
    (t, addr, rx)
}

/// A TCP connection to `to` from `ip` (any address of 127.0.0.0/8 is the loopback on
/// Linux).
async fn connect_from(ip: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::V4(ip), 0))
        .unwrap_or_else(|e| panic!("cannot bind {ip} ({e}): the test needs 127.0.0.0/8 on lo"));
    socket.connect(to).await.unwrap()
}

fn options(branch: &str) -> String {
    format!(
        "OPTIONS sip:relay@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK{branch}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@127.0.0.1>;tag=t{branch}\r\n\
         To: <sip:relay@127.0.0.1>\r\n\
         Call-ID: {branch}@test\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// Waits (bounded) for `cond`, polling every 10 ms; panics with `what` when it never holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the far end closed `s`: a read gives end of input or a reset within [`WAIT`].
/// Anything received first is returned with the verdict.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Whether the connection is held open and served: a message sent on it is delivered.
async fn served(s: &mut TcpStream, rx: &mut mpsc::UnboundedReceiver<(Peer, Bytes)>, n: u32) {
    s.write_all(options(&format!("served{n}")).as_bytes())
        .await
        .unwrap();
    let (from, bytes) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("message not delivered")
        .unwrap();
    assert_eq!(from.addr, s.local_addr().unwrap());
    assert!(bytes.starts_with(b"OPTIONS "));
}

#[tokio::test]
async fn connections_past_the_caps_are_closed_at_once_and_counted() {
    let (t, addr, mut rx) = transports(TransportConfig {
        max_connections: 5,
        max_connections_per_source: 3,
        ..TransportConfig::default()
    })
    .await;
    let a = Ipv4Addr::new(127, 0, 0, 1);
    let mut held = Vec::new();
    for n in 0..3 {
        let mut s = connect_from(a, addr).await;
        served(&mut s, &mut rx, n).await;
        held.push(s);
    }
    // A fourth from the same address: closed without a byte read.
    let mut fourth = connect_from(a, addr).await;
    assert!(closed_by_peer(&mut fourth).await, "4th connection kept");
    assert_eq!(t.stats().refused_per_source.load(Ordering::Relaxed), 1);
    assert_eq!(t.accepted_connections(), 3);

    // Another address still gets in, up to the overall cap.
    let b = Ipv4Addr::new(127, 0, 0, 2);
    for n in 3..5 {
        let mut s = connect_from(b, addr).await;
        served(&mut s, &mut rx, n).await;
        held.push(s);
    }
    let mut sixth = connect_from(Ipv4Addr::new(127, 0, 0, 3), addr).await;
    assert!(closed_by_peer(&mut sixth).await, "6th connection kept");
    assert_eq!(t.stats().refused_overall.load(Ordering::Relaxed), 1);
    assert_eq!(t.accepted_connections(), 5);

    // A place freed is taken again.
    drop(held.remove(0));
    until("the closed connection's place is given back", || {
        t.accepted_connections() == 4
    })
    .await;
    let mut again = connect_from(a, addr).await;
    served(&mut again, &mut rx, 9).await;
    assert_eq!(t.accepted_connections(), 5);
    assert_eq!(t.stats().connections_open.load(Ordering::Relaxed), 5);
}

#[tokio::test]
async fn a_trickled_message_is_cut_off_at_its_deadline() {
    let deadline = Duration::from_millis(600);
    let (t, addr, mut rx) = transports(TransportConfig {
        message_timeout: deadline,
        idle_timeout: Duration::from_secs(60),
        ..TransportConfig::default()
    })
    .await;

    // Slowloris: one byte every 50 ms, far more often than any idle timer, never finishing
    // within the deadline (the message would take 15 s).
    let s = connect_from(Ipv4Addr::LOCALHOST, addr).await;
    let (mut rd, mut wr) = s.into_split();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for b in options("slow").bytes() {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(WAIT, rd.read(&mut buf))
        .await
        .expect("the trickling connection was never closed");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    let lived = started.elapsed();
    assert!(
        lived >= deadline && lived < deadline + Duration::from_secs(3),
        "closed after {lived:?}, deadline {deadline:?}"
    );
    trickle.abort();
    assert_eq!(t.stats().message_timeouts.load(Ordering::Relaxed), 1);
    assert!(rx.try_recv().is_err(), "a partial message was delivered");

    // A message in a few pieces well within the deadline is delivered, and the connection
    // then stays (the deadline is for a message under way, not for the connection).
    let mut s = connect_from(Ipv4Addr::LOCALHOST, addr).await;
    let text = options("pieces");
    for piece in text.as_bytes().chunks(text.len() / 4 + 1) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, bytes) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("message not delivered")
        .unwrap();
    assert_eq!(bytes, text.as_bytes());
    let mut one = [0u8; 1];
    assert!(
        tokio::time::timeout(deadline * 2, s.read(&mut one))
            .await
            .is_err(),
        "a connection with no message under way was closed by the message deadline"
    );

    // An accepted connection that never sends: its first message is due from the accept.
    let mut silent = connect_from(Ipv4Addr::LOCALHOST, addr).await;
    let started = Instant::now();
    assert!(closed_by_peer(&mut silent).await);
    assert!(started.elapsed() < deadline + Duration::from_secs(3));
    assert_eq!(t.stats().message_timeouts.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(500);
    let (t, addr, mut rx) = transports(TransportConfig {
        message_timeout: Duration::from_secs(30),
        idle_timeout: idle,
        ..TransportConfig::default()
    })
    .await;
    let mut s = connect_from(Ipv4Addr::LOCALHOST, addr).await;
    served(&mut s, &mut rx, 1).await;
    let started = Instant::now();
    assert!(closed_by_peer(&mut s).await);
    let lived = started.elapsed();
    assert!(lived >= idle - Duration::from_millis(50), "{lived:?}");
    assert_eq!(t.stats().idle_closed.load(Ordering::Relaxed), 1);
    until("the connection is gone", || {
        t.stats().connections_open.load(Ordering::Relaxed) == 0
    })
    .await;
}

/// A connection of a peer that sent one request and reads nothing, small receive buffer.
async fn deaf_peer(
    addr: SocketAddr,
    rx: &mut mpsc::UnboundedReceiver<(Peer, Bytes)>,
) -> (TcpStream, Peer) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(options("deaf").as_bytes()).await.unwrap();
    let (from, _) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("request not delivered")
        .unwrap();
    assert!(from.conn.is_some());
    (s, from)
}

#[tokio::test]
async fn a_write_to_a_peer_that_never_reads_times_out_and_closes() {
    let write_timeout = Duration::from_millis(500);
    let (t, addr, mut rx) = transports(TransportConfig {
        write_timeout,
        ..TransportConfig::default()
    })
    .await;
    let (_deaf, peer) = deaf_peer(addr, &mut rx).await;
    // 100 frames of 64 KB: far more than the socket buffers hold, fewer than the queue.
    let frame = Bytes::from(vec![b'x'; 64_000]);
    for i in 0..100 {
        match t.try_send(&peer, frame.clone()) {
            Ok(()) => {}
            other => panic!("frame {i}: {other:?}"),
        }
    }
    let started = Instant::now();
    until("the blocked write times out", || {
        t.stats().write_timeouts.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(started.elapsed() >= write_timeout - Duration::from_millis(100));
    until("the connection is closed", || {
        t.stats().connections_open.load(Ordering::Relaxed) == 0
    })
    .await;
    // Nothing more is queued for it: a frame now finds no connection to wait on.
    assert!(matches!(
        t.try_send(&peer, frame.clone()),
        Err(TrySendError::WouldBlock(_))
    ));
}

#[tokio::test]
async fn a_full_send_queue_closes_the_connection_instead_of_waiting() {
    let (t, addr, mut rx) = transports(TransportConfig {
        // Long, so the queue fills before the write times out.
        write_timeout: Duration::from_secs(60),
        ..TransportConfig::default()
    })
    .await;
    let (_deaf, peer) = deaf_peer(addr, &mut rx).await;
    let frame = Bytes::from(vec![b'y'; 16_000]);
    let mut sent = 0;
    let error = loop {
        match t.try_send(&peer, frame.clone()) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000, "the queue never filled");
    };
    assert!(
        matches!(error, TrySendError::Failed(TransportError::QueueFull(a)) if a == peer.addr),
        "{error:?} after {sent} frames"
    );
    assert_eq!(t.stats().queue_full.load(Ordering::Relaxed), 1);
    // The async send does not wait either: the connection is gone, and one to the peer's
    // address cannot be opened (it is a client's port).
    let result = tokio::time::timeout(WAIT, t.send(&peer, frame.clone()))
        .await
        .expect("send waited on a dead peer");
    assert!(result.is_err(), "{result:?}");
    until("the connection is closed", || {
        t.stats().connections_open.load(Ordering::Relaxed) == 0
    })
    .await;
}

#[tokio::test]
async fn pings_keep_an_opened_connection_through_both_idle_timeouts() {
    let idle = Duration::from_millis(400);
    let (server, server_addr, mut at_server) = transports(TransportConfig {
        idle_timeout: idle,
        message_timeout: Duration::from_millis(300),
        keepalive: None,
        ..TransportConfig::default()
    })
    .await;
    // The client pings four times per idle timeout; a pong left in its buffer as the start
    // of a message would close its side at its own message deadline, shorter than the time
    // to the next pong.
    let (client, _, mut at_client) = transports(TransportConfig {
        idle_timeout: idle,
        message_timeout: Duration::from_millis(50),
        keepalive: Some(Duration::from_millis(100)),
        ..TransportConfig::default()
    })
    .await;
    let to = Peer {
        transport: Transport::Tcp,
        addr: server_addr,
        conn: None,
    };
    client
        .send(&to, Bytes::from(options("first")))
        .await
        .unwrap();
    let (from, _) = tokio::time::timeout(WAIT, at_server.recv())
        .await
        .expect("first message not delivered")
        .unwrap();
    // Ten pings answered span 2.5 idle timeouts of silence otherwise.
    until("ten pings answered", || {
        server.stats().pings_answered.load(Ordering::Relaxed) >= 10
    })
    .await;
    for t in [&server, &client] {
        assert_eq!(t.stats().idle_closed.load(Ordering::Relaxed), 0);
        assert_eq!(t.stats().message_timeouts.load(Ordering::Relaxed), 0);
        assert_eq!(t.stats().connections_open.load(Ordering::Relaxed), 1);
    }
    // The connection still carries requests back to the party that opened it.
    server
        .send(&from, Bytes::from(options("back")))
        .await
        .unwrap();
    let (_, bytes) = tokio::time::timeout(WAIT, at_client.recv())
        .await
        .expect("nothing came back on the connection")
        .unwrap();
    assert!(bytes.starts_with(b"OPTIONS "));
    assert_eq!(client.stats().connections.load(Ordering::Relaxed), 1);
}
