//! Data connections that have not yet sent a token are capped (issue 14, finding 6): a
//! stranger opening connections to the data gateway and sending nothing holds at most
//! `[data] max_pending_per_address` of them, each for at most `handshake_timeout_secs` (then
//! `ERR no token in time`), and all strangers together at most `max_pending_connections`;
//! one more is closed at once without a byte, and a terminal with a real token from another
//! address still gets its data through.
//!
//! A running agent (a child process) configured by file, a relay stand-in that obtains a
//! real token with an INVITE, and raw TCP connections bound to addresses of 127.0.0.0/8
//! (Linux has the whole /8 on the loopback). Every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{present_token, Agent, Relay, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const PER_ADDRESS: usize = 3;
const OVERALL: usize = 6;
const HANDSHAKE: Duration = Duration::from_secs(2);

async fn connect_from(ip: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::V4(ip), 0))
        .unwrap_or_else(|e| panic!("cannot bind {ip} ({e}): the test needs 127.0.0.0/8 on lo"));
    tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .expect("connect timed out")
        .unwrap()
}

/// Everything the gateway sends on `s` until it closes it (a reset, when it closed with our
/// bytes unread, ends it too), and how long that took.
async fn until_closed(s: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the gateway never closed the connection")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&bytes).into_owned(),
        started.elapsed(),
    )
}

/// Whether a connection is refused at the cap: closed at once (well before the token
/// deadline) without a byte.
async fn refused_at_once(ip: Ipv4Addr, data: SocketAddr) -> bool {
    let mut s = connect_from(ip, data).await;
    let (text, took) = until_closed(&mut s).await;
    text.is_empty() && took < HANDSHAKE / 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_token_are_capped_per_address_and_overall() {
    let relay = Relay::bind().await;
    let uri = relay.uri();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[data]\nhandshake_timeout_secs = {}\nmax_pending_connections = {OVERALL}\n\
             max_pending_per_address = {PER_ADDRESS}\n",
            HANDSHAKE.as_secs()
        ),
    )
    .unwrap();
    let agent = Agent::start(&[
        "--config",
        config.to_str().unwrap(),
        "--relay",
        &uri,
        "--no-register",
        "--service",
        "echo=builtin:echo",
        "--bytes-per-charge",
        "0",
    ])
    .await;

    // A stranger at 127.0.0.5 holds its share of connections, sending nothing.
    let stranger = Ipv4Addr::new(127, 0, 0, 5);
    let mut held = Vec::new();
    for _ in 0..PER_ADDRESS {
        held.push(connect_from(stranger, agent.data).await);
    }
    let opened = Instant::now();
    // Every further one is closed at once.
    for i in 0..10 {
        assert!(
            refused_at_once(stranger, agent.data).await,
            "connection {i} past the per-address cap was not closed at once"
        );
    }
    let logged = agent.wait_for("too many waiting for their token").await;
    assert!(
        logged.contains("127.0.0.5") && logged.contains("per-address"),
        "{logged}"
    );

    // A terminal elsewhere presents a real token and its data flows.
    let leg = relay.call(agent.sip, "echo", "alice").await;
    let token = leg.answer.token.clone().expect("answer without a token");
    let (mut terminal, line) = present_token(agent.data, &token).await;
    assert_eq!(line, "OK");
    terminal.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    tokio::time::timeout(WAIT, terminal.read_exact(&mut four))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(&four, b"ping");

    // Strangers at other addresses fill the overall cap; past it, anyone is refused.
    for i in 0..(OVERALL - PER_ADDRESS) {
        held.push(connect_from(Ipv4Addr::new(127, 0, 0, 6 + i as u8), agent.data).await);
    }
    assert!(
        refused_at_once(Ipv4Addr::new(127, 0, 0, 20), agent.data).await,
        "a connection past the overall cap was not closed at once"
    );

    // The held ones are told they were too slow at the token deadline, and closed.
    for s in &mut held {
        let (text, _) = until_closed(s).await;
        assert_eq!(text, "ERR no token in time\n");
    }
    let waited = opened.elapsed();
    assert!(
        waited >= HANDSHAKE && waited < HANDSHAKE + WAIT,
        "held {waited:?} for a token deadline of {HANDSHAKE:?}"
    );
    agent.wait_for("no token in time").await;

    // Their places come back (once their refusals are drained): the stranger's address is
    // served again, and a wrong token gets its answer rather than a silent close.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = connect_from(stranger, agent.data).await;
        s.write_all(b"0123456789abcdef0123456789abcdef\n")
            .await
            .unwrap();
        let (text, _) = until_closed(&mut s).await;
        if text == "ERR unknown token\n" {
            break;
        }
        assert!(text.is_empty(), "{text}");
        assert!(
            Instant::now() < deadline,
            "the stranger's places never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
