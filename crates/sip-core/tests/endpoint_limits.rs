//! The endpoint's limits against a flood (issue 14; RFC 3261 §26.1.5), on real loopback
//! sockets:
//!
//! * the per-address request rate limit: a burst passes, then a few requests are answered
//!   `503` with `Retry-After` (§21.5.4) and the rest dropped, each counted; another address,
//!   and an exempt one, are not affected; over TCP the 503 comes back on the connection;
//! * a TCP peer that sends requests and never reads: every answer either joins the
//!   connection's queue or closes the connection — no task is left waiting per answer
//!   (finding 4: each used to spawn one that waited forever).
//!
//! Every wait is bounded by a tokio timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sip_core::endpoint::{Endpoint, EndpointConfig, EndpointEvent, EventSink};
use sip_core::rate::RateLimit;
use sip_core::source::Net;
use sip_core::transport::TransportConfig;
use sip_core::{message, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

/// The longest any one wait of these tests may take.
const WAIT: Duration = Duration::from_secs(10);

/// Answers every request 200 at once, from inside `deliver`.
struct Answering;

impl EventSink for Answering {
    fn deliver(&self, event: EndpointEvent) -> Result<(), EndpointEvent> {
        if let EndpointEvent::Request(r) = event {
            let resp = message::response_for(&r.req, 200, None, Some(&message::new_tag()));
            let _ = r.tx.respond(resp);
        }
        Ok(())
    }
}

async fn endpoint(rate_limit: Option<RateLimit>, transport: TransportConfig) -> Endpoint {
    let config = EndpointConfig {
        transport: TransportConfig {
            udp: vec!["127.0.0.1:0".parse().unwrap()],
            tcp: vec!["127.0.0.1:0".parse().unwrap()],
            ..transport
        },
        rate_limit,
        max_pending_sends: 8,
        ..EndpointConfig::default()
    };
    Endpoint::bind_with_sink(config, Arc::new(Answering))
        .await
        .unwrap()
}

fn request(method: &str, transport: &str, from: SocketAddr, n: usize) -> String {
    let id = message::new_call_id("test");
    format!(
        "{method} sip:uas@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {from};branch={};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:uac@127.0.0.1>;tag=t{n}\r\n\
         To: <sip:uas@127.0.0.1>\r\n\
         Call-ID: {id}\r\n\
         CSeq: {n} {method}\r\n\
         Content-Length: 0\r\n\r\n",
        message::new_branch(),
    )
}

/// The status codes and Retry-After values of the responses in `text`.
fn statuses(text: &str) -> Vec<(u16, Option<String>)> {
    text.split("SIP/2.0 ")
        .skip(1)
        .filter_map(|resp| {
            let code = resp.get(..3)?.parse().ok()?;
            let retry = resp
                .lines()
                .find_map(|l| l.strip_prefix("Retry-After: "))
                .map(|v| v.trim().to_string());
            Some((code, retry))
        })
        .collect()
}

fn rate(per_second: u32, burst: u32, replies: u32, exempt: Vec<Net>) -> RateLimit {
    RateLimit {
        per_second,
        burst,
        replies_per_second: replies,
        exempt,
        max_tracked: 1024,
    }
}

/// Sends `n` OPTIONS over UDP from `ip` at once, then collects the answers until none comes
/// for 500 ms (bounded by [`WAIT`] overall).
async fn udp_burst(ip: Ipv4Addr, to: SocketAddr, n: usize) -> Vec<(u16, Option<String>)> {
    let sock = UdpSocket::bind((ip, 0))
        .await
        .unwrap_or_else(|e| panic!("cannot bind {ip} ({e}): the test needs 127.0.0.0/8 on lo"));
    let local = sock.local_addr().unwrap();
    for i in 0..n {
        sock.send_to(request("OPTIONS", "UDP", local, i).as_bytes(), to)
            .await
            .unwrap();
    }
    let mut out = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await {
            Ok(Ok(len)) => out.extend(statuses(&String::from_utf8_lossy(&buf[..len]))),
            _ => break,
        }
    }
    out
}

#[tokio::test]
async fn requests_over_the_rate_are_answered_503_then_dropped_and_counted() {
    let ep = endpoint(
        Some(rate(5, 10, 3, vec!["127.0.0.1/32".parse().unwrap()])),
        TransportConfig::default(),
    )
    .await;
    let to = ep.local_addr(Transport::Udp).unwrap();
    let answers = udp_burst(Ipv4Addr::new(127, 0, 0, 2), to, 40).await;
    let ok = answers.iter().filter(|(c, _)| *c == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(c, _)| *c == 503).collect();
    assert_eq!(ok, 10, "the burst passes: {answers:?}");
    assert_eq!(refused.len(), 3, "3 answers a second past it: {answers:?}");
    assert!(
        refused.iter().all(|(_, r)| r.as_deref() == Some("2")),
        "Retry-After: the time to refill the burst: {refused:?}"
    );
    let stats = ep.stats();
    assert_eq!(stats.rate_limited.load(Ordering::Relaxed), 3);
    assert_eq!(stats.rate_dropped.load(Ordering::Relaxed), 27);
    assert_eq!(ep.rate_tracked_sources(), 1);

    // Another source has its own bucket; the exempt one has none.
    let other = udp_burst(Ipv4Addr::new(127, 0, 0, 3), to, 10).await;
    assert_eq!(other.iter().filter(|(c, _)| *c == 200).count(), 10);
    let exempt = udp_burst(Ipv4Addr::LOCALHOST, to, 40).await;
    assert_eq!(
        exempt.iter().filter(|(c, _)| *c == 200).count(),
        40,
        "{exempt:?}"
    );
    assert_eq!(ep.rate_tracked_sources(), 2);
}

#[tokio::test]
async fn over_tcp_the_503_comes_back_on_the_connection() {
    let ep = endpoint(Some(rate(1, 2, 10, Vec::new())), TransportConfig::default()).await;
    let to = ep.local_addr(Transport::Tcp).unwrap();
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    let local = s.local_addr().unwrap();
    let mut burst = String::new();
    for i in 0..5 {
        burst.push_str(&request("OPTIONS", "TCP", local, i));
    }
    // An ACK is never limited (nor answered).
    burst.push_str(&request("ACK", "TCP", local, 9));
    s.write_all(burst.as_bytes()).await.unwrap();
    let mut got = String::new();
    let mut buf = vec![0u8; 16_384];
    while statuses(&got).len() < 5 {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("answers missing")
            .unwrap();
        assert!(n > 0, "closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let answers = statuses(&got);
    assert_eq!(
        answers,
        vec![
            (200, None),
            (200, None),
            (503, Some("2".into())),
            (503, Some("2".into())),
            (503, Some("2".into())),
        ]
    );
    assert_eq!(ep.stats().rate_limited.load(Ordering::Relaxed), 3);
    assert_eq!(ep.stats().rate_dropped.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn answers_to_a_tcp_peer_that_never_reads_never_pile_up() {
    let ep = endpoint(
        None,
        TransportConfig {
            write_timeout: Duration::from_millis(500),
            ..TransportConfig::default()
        },
    )
    .await;
    let to = ep.local_addr(Transport::Tcp).unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
        .unwrap();
    let s = socket.connect(to).await.unwrap();
    let local = s.local_addr().unwrap();
    let (_rd, mut wr) = s.into_split();
    // Requests as fast as it can, each answered 200 (a few hundred bytes), never read: the
    // socket buffers fill, then the connection's queue, which closes it.
    let stats = ep.transports().stats();
    let padding = "x".repeat(1000);
    let mut sent = 0;
    let deadline = Instant::now() + WAIT;
    while stats.queue_full.load(Ordering::Relaxed) + stats.write_timeouts.load(Ordering::Relaxed)
        == 0
    {
        assert!(Instant::now() < deadline, "the connection was never closed");
        let mut req = request("OPTIONS", "TCP", local, sent);
        // A long header makes each answer long too (it is copied into the 200).
        req = req.replacen(
            "Max-Forwards: 70",
            &format!("Max-Forwards: 70\r\nX-Pad: {padding}"),
            1,
        );
        match tokio::time::timeout(Duration::from_millis(200), wr.write_all(req.as_bytes())).await {
            Ok(Ok(())) => sent += 1,
            // Our own send buffer is full or the relay closed: look at the counters.
            Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        assert!(
            ep.pending_sends() <= 8,
            "{} answers waiting in tasks",
            ep.pending_sends()
        );
    }
    // Closed: the connection and whatever waited for it are gone.
    let deadline = Instant::now() + WAIT;
    while stats.connections_open.load(Ordering::Relaxed) != 0 || ep.pending_sends() != 0 {
        assert!(
            Instant::now() < deadline,
            "open {} pending {}",
            stats.connections_open.load(Ordering::Relaxed),
            ep.pending_sends()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(sent > 0);
}
