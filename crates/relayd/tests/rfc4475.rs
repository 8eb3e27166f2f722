//! RFC 4475 ("SIP Torture Test Messages") sent at a running relayd: every message of §3.1
//! (parser), §3.2, §3.3 (application-layer semantics) and §3.4 (RFC 2543 syntax), as
//! reproduced in `crates/sip-core/tests/rfc4475/`, each asserted to get the answer the RFC
//! prefers from an element in relayd's role (a registrar and B2BUA that authenticates), and
//! followed by an OPTIONS probe that must still get `200`.
//!
//! The relay serves the RFC's domain `example.com`. A message goes over the transport its
//! Via names: TCP answers come back on the connection; UDP answers go where RFC 3261
//! §18.2.2 sends them, the source address (`received`) and the Via's port, 5060 in every
//! message, so the test sends from a loopback address of its own on port 5060.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use support::relay::{Relay, RelayConfig};
use support::TestDir;

/// What relayd must do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A final response with this status code.
    Final(u16),
    /// Nothing: a response, or garbage that cannot be answered (dropped and counted).
    Nothing,
}
use Answer::{Final, Nothing};

/// Every message, with the answer RFC 4475 prefers (and RFC 3261 for a relay that
/// challenges before it serves).
const CASES: [(&str, &str, Answer); 49] = [
    // §3.1.1, valid messages: each is processed as any other request of its kind.
    // A To tag: in a dialog relayd does not know (§12.2.2).
    ("valid", "wsinv", Final(481)),
    // Extension method: 501 (§8.2.1).
    ("valid", "intmeth", Final(501)),
    // INVITE to example.net: relayd relays only to its own domain ("403 Not relaying", as
    // Kamailio's default configuration answers).
    ("valid", "esc01", Final(403)),
    // REGISTER: challenged.
    ("valid", "escnull", Final(401)),
    ("valid", "esc02", Final(501)),
    // OPTIONS to the relay's domain.
    ("valid", "lwsdisp", Final(200)),
    // INVITE to the relay's domain: challenged.
    ("valid", "longreq", Final(407)),
    ("valid", "dblreq", Final(401)),
    // OPTIONS whose user part holds `;` (rsip cannot read it; sip-core can).
    ("valid", "semiuri", Final(200)),
    ("valid", "transports", Final(200)),
    // MESSAGE to example.org: not served.
    ("valid", "mpart01", Final(404)),
    // Responses to nothing: dropped.
    ("valid", "unreason", Nothing),
    ("valid", "noreason", Nothing),
    // §3.1.2, invalid messages.
    ("invalid", "badinv01", Final(400)),
    ("invalid", "clerr", Final(400)),
    ("invalid", "ncl", Final(400)),
    ("invalid", "scalar02", Final(400)),
    ("invalid", "scalarlg", Nothing),
    ("invalid", "quotbal", Final(400)),
    ("invalid", "ltgtruri", Final(400)),
    ("invalid", "lwsruri", Final(400)),
    ("invalid", "lwsstart", Final(400)),
    ("invalid", "trws", Final(400)),
    ("invalid", "escruri", Final(400)),
    ("invalid", "baddate", Final(400)),
    ("invalid", "regbadct", Final(400)),
    ("invalid", "badaspec", Final(400)),
    ("invalid", "baddn", Final(400)),
    ("invalid", "badvers", Final(505)),
    ("invalid", "mismatch01", Final(400)),
    ("invalid", "mismatch02", Final(501)),
    ("invalid", "bigcode", Nothing),
    // §3.2.1: a branch of the bare magic cookie is handled as an RFC 2543 transaction.
    ("semantic", "badbranch", Final(200)),
    // §3.3.1: no Call-ID, From, To.
    ("semantic", "insuf", Final(400)),
    // §3.3.2, §3.3.3: schemes relayd never serves.
    ("semantic", "unkscm", Final(416)),
    ("semantic", "novelsc", Final(416)),
    // §3.3.4: "A registrar would reject this request with a 400 Bad Request response,
    // since the To: header field is required to contain a SIP or SIPS URI as an AOR."
    ("semantic", "unksm2", Final(400)),
    // §3.3.5: a UAS lists the Require tags it does not support.
    ("semantic", "bext01", Final(420)),
    // §3.3.6: a body relayd cannot relay.
    ("semantic", "invut", Final(415)),
    // §3.3.7: an unknown authorization scheme is no credentials: challenged.
    ("semantic", "regaut01", Final(401)),
    // §3.3.8, §3.3.9.
    ("semantic", "multi01", Final(400)),
    ("semantic", "mcl01", Final(400)),
    // §3.3.10: a response: dropped (and never sent to the broadcast address).
    ("semantic", "bcast", Nothing),
    // §3.3.11: OPTIONS with Max-Forwards 0 is answered by the element itself (§16.3 2).
    ("semantic", "zeromf", Final(200)),
    // §3.3.12–§3.3.14: legal REGISTERs: challenged.
    ("semantic", "cparam01", Final(401)),
    ("semantic", "cparam02", Final(401)),
    ("semantic", "regescrt", Final(401)),
    // §3.3.15: the answer must carry SDP, which the Accept excludes.
    ("semantic", "sdp01", Final(406)),
    // §3.4.1: RFC 2543 syntax, accepted: challenged like any INVITE.
    ("semantic", "inv2543", Final(407)),
];

fn load(dir: &str, name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../sip-core/tests/rfc4475/{dir}/{name}.dat",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The transport the top Via names (`UDP` when there is none to read).
fn via_transport(msg: &[u8]) -> &'static str {
    let text = String::from_utf8_lossy(msg);
    let top = text
        .lines()
        .find(|l| l.starts_with("Via:") || l.starts_with("v:") || l.starts_with("Via "));
    match top {
        Some(l) if l.contains("/TCP") => "TCP",
        _ => "UDP",
    }
}

/// The Call-ID the (first) message in `msg` carries, to match its answer (None: it has
/// none).
fn call_id(msg: &[u8]) -> Option<String> {
    String::from_utf8_lossy(msg)
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            let name = name.trim();
            (name.eq_ignore_ascii_case("Call-ID") || name.eq_ignore_ascii_case("i"))
                .then(|| value.trim().to_string())
        })
}

/// The status code of a response, and its Call-ID.
fn read_response(bytes: &[u8]) -> (u16, Option<String>) {
    let code = std::str::from_utf8(bytes.get(8..11).unwrap_or_default())
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, call_id(bytes))
}

/// A UDP socket on 127.x.y.z:5060, an address of this test's own.
fn udp_on_5060() -> UdpSocket {
    let pid = std::process::id();
    for n in 0..64u32 {
        let k = pid.wrapping_add(n * 7919);
        let ip = Ipv4Addr::new(127, 45, (k >> 8) as u8, (k as u8).max(2));
        if let Ok(sock) = UdpSocket::bind((ip, 5060)) {
            return sock;
        }
    }
    panic!("no loopback address with port 5060 free");
}

fn options_probe(local: SocketAddr, n: usize) -> (String, Vec<u8>) {
    let cid = format!("probe-{n}-{}", std::process::id());
    let text = format!(
        "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {local};rport;branch=z9hG4bKprobe{n}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:probe@example.com>;tag=p{n}\r\nTo: <sip:example.com>\r\n\
         Call-ID: {cid}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    (cid, text.into_bytes())
}

/// Receives on `sock` until a final response with Call-ID `cid` (or none, for `None`)
/// arrives; returns its code, and the codes of the final responses with Call-ID `watch`
/// seen meanwhile.
fn await_final(
    sock: &UdpSocket,
    cid: Option<&str>,
    watch: Option<&str>,
    timeout: Duration,
) -> Option<(u16, Vec<u16>)> {
    let deadline = Instant::now() + timeout;
    let mut others = Vec::new();
    let mut buf = vec![0u8; 65_535];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        let Ok(n) = sock.recv(&mut buf) else {
            return None;
        };
        let (code, got) = read_response(&buf[..n]);
        if code >= 200 {
            if got.as_deref() == cid {
                return Some((code, others));
            }
            if got.as_deref() == watch {
                others.push(code);
            }
        }
    }
}

/// Sends `msg` over TCP and returns the first final response on the connection.
fn tcp_exchange(port: u16, msg: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    stream.write_all(msg).ok()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Every complete response in `got`: the first final one is the answer.
        let mut start = 0;
        while let Some(end) = got[start..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| start + p + 4)
        {
            let (code, _) = read_response(&got[start..end]);
            if code >= 200 {
                return Some(code);
            }
            start = end;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).ok()?;
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn every_rfc4475_message_gets_the_answer_the_rfc_prefers_and_relayd_answers_a_probe_after() {
    let dir = TestDir::new("relayd-rfc4475-");
    let port = support::ports::free_port();
    let toml = RelayConfig::standard()
        .to_toml(port, &dir.path().join("data"))
        .replace("realm = \"relay.test\"", "realm = \"example.com\"");
    let config = dir.path().join("relayd.toml");
    std::fs::write(&config, toml).unwrap();
    let relay = Relay::start_with(&config, port);
    let relay_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let sock = udp_on_5060();
    let local = sock.local_addr().unwrap();

    let mut wrong = Vec::new();
    for (n, (dir, name, expected)) in CASES.iter().enumerate() {
        let msg = load(dir, name);
        let got = if via_transport(&msg) == "TCP" {
            match tcp_exchange(port, &msg) {
                Some(code) => Final(code),
                None => Nothing,
            }
        } else {
            sock.send_to(&msg, relay_addr).unwrap();
            // Wait for this message's answer; `Nothing` is confirmed by the probe below
            // getting its answer with none for this message before it.
            let cid = call_id(&msg);
            match expected {
                Final(_) => {
                    match await_final(&sock, cid.as_deref(), None, Duration::from_secs(5)) {
                        Some((code, _)) => Final(code),
                        None => Nothing,
                    }
                }
                Nothing => Nothing,
            }
        };
        let (probe_cid, probe) = options_probe(local, n);
        sock.send_to(&probe, relay_addr).unwrap();
        let own = call_id(&msg);
        let after = await_final(
            &sock,
            Some(&probe_cid),
            own.as_deref(),
            Duration::from_secs(5),
        );
        let answered_probe = matches!(after, Some((200, _)));
        let stray = after.map(|(_, others)| others).unwrap_or_default();
        let got = match (got, stray.first()) {
            (Nothing, Some(&code)) => Final(code),
            (got, _) => got,
        };
        if got != *expected || !answered_probe {
            wrong.push(format!(
                "{dir}/{name}: expected {expected:?}, got {got:?}; probe after it answered: {answered_probe}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} messages not answered as RFC 4475 prefers:\n{}\n--- relayd log ---\n{}",
        wrong.len(),
        CASES.len(),
        wrong.join("\n"),
        relay.log()
    );
}
