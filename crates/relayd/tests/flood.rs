//! A flood a stranger can send with no account (issue 14, "What must hold": the flood test):
//! 10,000 REGISTERs with random unknown user names over UDP, half of them with made-up
//! credentials, and 1,000 TCP connections that never send a byte — while alice places calls
//! from 127.0.0.1, over UDP and over TCP, through a sipp application server.
//!
//! What must hold: relayd's memory stays bounded (its peak RSS, `VmHWM` in
//! `/proc/<pid>/status`, is printed and must stay under [`RSS_BOUND`]); every legitimate call
//! completes and is billed once; the idle connections are held only up to the per-address
//! cap and only until the message deadline; the source that floods hardest is rate-limited.
//! The counters come from relayd's own metrics endpoint.
//!
//! The flood comes from addresses of 127.0.0.0/8 other than 127.0.0.1 (Linux has the whole
//! /8 on the loopback), so the relay is configured with `[limits] rate_exempt =
//! ["127.0.0.1/32"]`: the defaults exempt all of loopback, which would exempt the flood.
//! Everything else is the default `[limits]`: 64 connections per address, a message due
//! within 10 s, 100 requests a second per address in bursts of 200.
//!
//! Every wait is bounded: processes by the harness's guards and [`STEP`], conditions by
//! polling with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use rand::Rng;
use support::billing::field;
use support::ports::free_port;
use support::relay::{RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sipp::{SippOpts, Transport};
use support::{wait_until, ALICE, REALM, STEP};

/// REGISTERs in the flood.
const REGISTERS: usize = 10_000;
/// Of which from the one source that floods hardest (the rest spread over many sources,
/// each within the rate limit's burst).
const FROM_HARDEST: usize = 2_000;
/// Sources sharing the rest of the flood.
const SPREAD_SOURCES: usize = 80;
/// Idle TCP connections opened.
const IDLE_CONNECTIONS: usize = 1_000;
/// Addresses they come from.
const IDLE_SOURCES: usize = 10;
/// `[limits] max_connections_per_address`, the default.
const PER_ADDRESS_CAP: usize = 64;
/// A generous bound on relayd's peak resident memory.
const RSS_BOUND_KIB: u64 = 200 * 1024;
/// The same, for messages.
const RSS_BOUND: &str = "200 MiB";
/// Legitimate calls over each transport.
const CALLS: u64 = 10;

/// `VmRSS` and `VmHWM` (peak) of process `pid`, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// The soft limit on this process's open files (`Max open files` in /proc/self/limits).
fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

/// relayd's metrics, by name (`GET /metrics` on `port`).
fn metrics(port: u16) -> HashMap<String, u64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with("relayd_") && !l.contains('{'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn metric(port: u16, name: &str) -> u64 {
    metrics(port)
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("relayd has no metric {name}"))
}

/// A REGISTER for a random user name that does not exist, from `local`; with made-up
/// credentials over `nonce` when one is given.
fn register(local: SocketAddr, n: usize, nonce: Option<&str>) -> String {
    let mut rng = rand::thread_rng();
    let user = format!("u{:016x}", rng.gen::<u64>());
    let auth = match nonce {
        Some(nonce) => format!(
            "Authorization: Digest username=\"{user}\", realm=\"{REALM}\", \
             nonce=\"{nonce}\", uri=\"sip:{REALM}\", response=\"{:032x}\", algorithm=MD5, \
             qop=auth, nc=00000001, cnonce=\"{:016x}\"\r\n",
            rng.gen::<u128>(),
            rng.gen::<u64>()
        ),
        None => String::new(),
    };
    format!(
        "REGISTER sip:{REALM} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bKflood{n}x{:x};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:{user}@{REALM}>;tag=f{n}\r\n\
         To: <sip:{user}@{REALM}>\r\n\
         Call-ID: flood-{n}-{:x}@{}\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <sip:{user}@{local}>\r\n\
         Expires: 300\r\n\
         {auth}Content-Length: 0\r\n\r\n",
        rng.gen::<u64>(),
        rng.gen::<u64>(),
        local.ip(),
    )
}

/// A nonce the relay on `relay` gives `sock` in a challenge to a REGISTER (retransmitted
/// every 500 ms, for at most [`STEP`]), so that made-up credentials are checked and fail,
/// rather than being challenged again as stale.
fn nonce_for(sock: &UdpSocket, relay: SocketAddr) -> String {
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let request = register(sock.local_addr().unwrap(), 0, None);
    let deadline = Instant::now() + STEP;
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        sock.send_to(request.as_bytes(), relay).unwrap();
        let Ok(len) = sock.recv(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..len]);
        if let Some(nonce) = text
            .split("nonce=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        {
            return nonce.to_string();
        }
    }
    panic!("no challenge from the relay for {:?}", sock.local_addr());
}

fn udp_from(ip: Ipv4Addr) -> UdpSocket {
    UdpSocket::bind((ip, 0)).unwrap_or_else(|e| {
        panic!(
            "cannot bind a UDP socket on {ip} ({e}): the test needs the whole of 127.0.0.0/8 \
             on the loopback interface, as Linux has it"
        )
    })
}

/// Sends the flood to the relay on `port`: [`REGISTERS`] in all, [`FROM_HARDEST`] of them
/// from 127.0.0.5, the rest from [`SPREAD_SOURCES`] addresses of 127.0.1.0/24, in batches of
/// 50 a few milliseconds apart (a flood the relay can take in, rather than one the kernel
/// drops on the floor); every other one with made-up credentials over a nonce the relay
/// gave that source. Answers are not read.
fn flood(port: u16) -> usize {
    let relay = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let hardest = udp_from(Ipv4Addr::new(127, 0, 0, 5));
    let spread: Vec<UdpSocket> = (1..=SPREAD_SOURCES)
        .map(|i| udp_from(Ipv4Addr::new(127, 0, 1, i as u8)))
        .collect();
    let hardest_nonce = nonce_for(&hardest, relay);
    let nonces: Vec<String> = spread.iter().map(|s| nonce_for(s, relay)).collect();
    let mut sent = 0;
    for n in 0..REGISTERS {
        let (sock, nonce) = if n % (REGISTERS / FROM_HARDEST) == 0 {
            (&hardest, &hardest_nonce)
        } else {
            (&spread[n % SPREAD_SOURCES], &nonces[n % SPREAD_SOURCES])
        };
        let text = register(
            sock.local_addr().unwrap(),
            n,
            (n % 2 == 1).then_some(nonce.as_str()),
        );
        if sock.send_to(text.as_bytes(), relay).is_ok() {
            sent += 1;
        }
        if n % 50 == 49 {
            thread::sleep(Duration::from_millis(5));
        }
    }
    sent
}

#[test]
fn a_flood_of_registers_and_idle_connections_leaves_memory_bounded_and_calls_working() {
    let mut scene = Scene::new();
    let as_port = scene.server("uas", "uas_answer.xml", SippOpts::default());
    let metrics_port = free_port();
    scene.start_relay(
        &RelayConfig::standard()
            .server(ServerSpec::udp(as_port, &["echo"]))
            // The sipp application server shares the machine with the flood (and with the
            // build, on a loaded box): its answer may take longer than the 5 s the tests
            // give an inquiry. Giving up on it is tests/refusals.rs' business, not this one.
            .inquiry_timeout_ms(20_000)
            .extra_toml(&format!(
                "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
                 [limits]\nrate_exempt = [\"127.0.0.1/32\"]\n\n\
                 [[classes]]\nname = \"*\"\nmax_sessions = {room}\n",
                // alice's calls over both transports may all be up at once when the
                // flood delays them: the per-subscriber limit (tests/subscriber_limit.rs)
                // is not what this test is about.
                room = 2 * CALLS + 10
            )),
    );
    let port = scene.relay().port;
    let pid = scene.relay().pid();
    assert!(
        wait_until(STEP, || TcpStream::connect(("127.0.0.1", metrics_port))
            .is_ok()),
        "the metrics endpoint never opened"
    );
    let (rss_start, _) = rss_kib(pid);

    // 1,000 TCP connections that never send a byte, 100 from each of 10 addresses. The
    // test process needs a descriptor for each.
    let limit = open_files_limit();
    let idle_wanted = if limit >= IDLE_CONNECTIONS as u64 + 200 {
        IDLE_CONNECTIONS
    } else {
        let n = (limit.saturating_sub(200) as usize / IDLE_SOURCES) * IDLE_SOURCES;
        eprintln!(
            "only {n} idle connections: this process may open {limit} files \
             (raise `ulimit -n` for all {IDLE_CONNECTIONS})"
        );
        n
    };
    let per_source = idle_wanted / IDLE_SOURCES;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut idle = Vec::with_capacity(idle_wanted);
    for i in 0..idle_wanted {
        let ip = Ipv4Addr::new(127, 0, 0, 10 + (i % IDLE_SOURCES) as u8);
        idle.push(socket_from(&rt, ip, port));
    }
    let kept = per_source.min(PER_ADDRESS_CAP) * IDLE_SOURCES;
    let refused = idle_wanted - kept;
    let counted = wait_until(STEP, || {
        metric(
            metrics_port,
            "relayd_tcp_connections_refused_per_address_total",
        ) >= refused as u64
    });
    let m = metrics(metrics_port);
    assert!(
        counted,
        "connections past the per-address cap were not refused: {m:?}"
    );
    assert_eq!(
        m["relayd_tcp_connections_refused_per_address_total"], refused as u64,
        "{m:?}"
    );
    assert!(
        m["relayd_tcp_connections_open"] <= kept as u64,
        "more connections held than the cap allows: {m:?}"
    );

    // The flood, from a thread, while alice calls over UDP and over TCP.
    let flooder = thread::spawn(move || flood(port));
    let mut udp_calls = scene.terminal(
        "uac-udp",
        "uac_call.xml",
        ALICE,
        "echo",
        SippOpts::default()
            .calls(CALLS)
            .args(&["-r", "10", "-d", "200"]),
    );
    let mut tcp_calls = scene.terminal(
        "uac-tcp",
        "uac_call.xml",
        ALICE,
        "echo",
        SippOpts::default()
            .over(Transport::Tcp)
            .calls(CALLS)
            .args(&["-r", "10", "-d", "200"]),
    );
    scene.assert_success(&mut udp_calls);
    scene.assert_success(&mut tcp_calls);
    let sent = flooder.join().expect("the flooding thread panicked");
    let (rss_flood, _) = rss_kib(pid);
    // Challenges and refusals of requests not yet authenticated are sent statelessly
    // (RFC 3261 §8.2.7): the flood, all of it well within the 32 s a stateful non-INVITE
    // transaction is kept over UDP (Timer J), left none behind. What is alive is alice's
    // own few (her REGISTERs' 200s and her BYEs, kept for Timer J).
    let transactions = metric(metrics_port, "relayd_transactions");
    assert!(
        transactions < 500,
        "{transactions} transactions kept after a flood of {sent} unauthenticated REGISTERs"
    );

    // The idle connections are closed at the message deadline (10 s from their accept).
    let closed = wait_until(STEP, || {
        metric(metrics_port, "relayd_tcp_message_timeouts_total") >= kept as u64
    });
    let m = metrics(metrics_port);
    assert!(
        closed,
        "idle connections were held past the deadline: {m:?}"
    );
    let mut buf = [0u8; 1];
    let mut sample = idle.swap_remove(0);
    sample.set_read_timeout(Some(STEP)).unwrap();
    assert!(
        matches!(sample.read(&mut buf), Ok(0) | Err(_)),
        "an idle connection is still open"
    );
    drop(idle);

    // Every call went through and was billed once.
    let records = scene.session_records();
    assert_eq!(records.len() as u64, 2 * CALLS, "{records:#?}");
    assert!(records.iter().all(|r| field(r, "subscriber") == "alice"));

    let (rss_end, rss_peak) = rss_kib(pid);
    println!(
        "flood: {sent} REGISTERs sent, {} idle TCP connections ({} refused at the per-address \
         cap, {} closed at the message deadline)",
        idle_wanted,
        m["relayd_tcp_connections_refused_per_address_total"],
        m["relayd_tcp_message_timeouts_total"],
    );
    println!(
        "relayd: received {} messages, challenged {}, {} failed digest answers, {} requests \
         answered 503 by the rate limit and {} dropped by it, {} answered 503 for a refused source",
        m["relayd_messages_received_total"],
        m["relayd_challenges_total"],
        m["relayd_auth_failures_total"],
        m["relayd_rate_limited_total"],
        m["relayd_rate_dropped_total"],
        m["relayd_auth_source_refusals_total"],
    );
    println!("relayd transactions alive right after the flood: {transactions}");
    println!(
        "relayd RSS: {rss_start} KiB at start, {rss_flood} KiB after the flood, {rss_end} KiB \
         at the end, peak {rss_peak} KiB (bound {RSS_BOUND})"
    );
    assert!(
        rss_peak < RSS_BOUND_KIB,
        "relayd's peak RSS {rss_peak} KiB is over {RSS_BOUND}"
    );
    // The relay took the flood in (most of it: UDP may lose some under load) and refused what
    // it should: the hardest source past its burst, the unknown names' failures.
    assert!(
        m["relayd_messages_received_total"] >= (REGISTERS / 2) as u64,
        "{m:?}"
    );
    assert!(
        m["relayd_rate_limited_total"] + m["relayd_rate_dropped_total"]
            >= (FROM_HARDEST / 4) as u64,
        "the hardest source was not rate-limited: {m:?}"
    );
    assert!(m["relayd_rate_limited_total"] > 0, "{m:?}");
    assert!(m["relayd_auth_failures_total"] > 0, "{m:?}");
    assert!(
        m["relayd_auth_sources_refused_total"] > 0,
        "no flooding source was refused for its failures: {m:?}"
    );
    assert_eq!(
        m["relayd_registered_users"], 1,
        "only alice registered: {m:?}"
    );
}

/// A TCP connection to the relay on `port` from `ip` (std has no bind-then-connect; tokio's
/// socket does it, and the stream is handed back as a blocking std one).
fn socket_from(rt: &tokio::runtime::Runtime, ip: Ipv4Addr, port: u16) -> TcpStream {
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind(SocketAddr::from((ip, 0)))
            .unwrap_or_else(|e| panic!("cannot bind {ip} ({e}): the test needs 127.0.0.0/8 on lo"));
        tokio::time::timeout(
            STEP,
            socket.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        )
        .await
        .expect("connect to the relay timed out")
        .expect("connect to the relay")
    });
    let stream = stream.into_std().expect("a std stream");
    stream.set_nonblocking(false).expect("blocking mode");
    stream
}
