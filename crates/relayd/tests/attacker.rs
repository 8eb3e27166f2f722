//! A stranger with no account cannot lock anyone out (issue 14, finding 2), nor learn which
//! user names exist (SIPVicious' svwar and svcrack), while guessing stays slow.
//!
//! The stranger is a raw SIP client bound to 127.0.0.3 (any address of 127.0.0.0/8 is the
//! loopback on Linux) sending digest answers with wrong passwords over UDP; the victims are
//! the real programs on 127.0.0.1: `sip-client` as subscriber alice and `appsrv-agent` as
//! application-server account as1, through `relayd`. The relay counts failures per (user,
//! source address) and per source address, so the stranger's own address ends up refused
//! (`503`, RFC 3261 §21.5.4) while alice and as1 go on from theirs.
//!
//! Every wait is bounded: a raw request is retransmitted for at most [`ANSWER_WITHIN`], the
//! programs are awaited by the harness of the system tests (`system_support`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod system_support;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sip_core::digest;
use support::relay::{Relay, RelayConfig};
use support::sipp::Transport;
use support::{unique, wait_until, TestDir, ALICE, REALM, STEP};
use system_support::{int, text, System, BYTES_PER_CHARGE};

/// How long a raw request is retransmitted (every 250 ms) before the test gives up on it.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A response as the raw client reads it: status code, reason, headers.
#[derive(Debug, Clone)]
struct Answer {
    code: u16,
    reason: String,
    headers: Vec<(String, String)>,
}

impl Answer {
    fn parse(bytes: &[u8]) -> Option<Answer> {
        let text = std::str::from_utf8(bytes).ok()?;
        let head = text.split("\r\n\r\n").next()?;
        let mut lines = head.split("\r\n");
        let status = lines.next()?.strip_prefix("SIP/2.0 ")?;
        let (code, reason) = status.split_once(' ').unwrap_or((status, ""));
        Some(Answer {
            code: code.parse().ok()?,
            reason: reason.to_string(),
            headers: lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                .collect(),
        })
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    fn status(&self) -> String {
        format!("{} {}", self.code, self.reason)
    }
}

/// A client speaking raw SIP over UDP from `ip` to the relay on 127.0.0.1.
struct RawClient {
    sock: UdpSocket,
    local: SocketAddr,
    relay: SocketAddr,
    /// The last challenge seen (WWW-Authenticate or Proxy-Authenticate value): answered
    /// wrongly again once the relay stops challenging.
    last_challenge: Option<String>,
}

impl RawClient {
    fn bind(ip: Ipv4Addr, relay_port: u16) -> RawClient {
        let sock = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| {
            panic!(
                "cannot bind a UDP socket on {ip} ({e}): the test needs the whole of \
                 127.0.0.0/8 on the loopback interface, as Linux has it"
            )
        });
        let local = sock.local_addr().unwrap();
        RawClient {
            sock,
            local,
            relay: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), relay_port),
            last_challenge: None,
        }
    }

    /// REGISTER (401, `Authorization`) or MESSAGE to the charge URI (407,
    /// `Proxy-Authorization`) for `user`, with `auth` as the credentials header when given:
    /// the REGISTER binds the client's own address, the MESSAGE charges alice 1000.
    fn request(&self, method: &str, user: &str, call_id: &str, cseq: u32, auth: &str) -> String {
        let what = if method == "REGISTER" {
            format!("<sip:{user}@{}>", self.local)
        } else {
            format!(
                "{{\"event_id\":\"{}\",\"subscriber\":\"alice\",\"amount\":1000,\
                 \"currency\":\"EUR\",\"description\":\"not ours\"}}",
                unique("attack-")
            )
        };
        self.request_with(method, user, call_id, cseq, auth, &what)
    }

    /// As [`RawClient::request`], with `what` as the REGISTER's Contact value or the
    /// MESSAGE's charge body.
    fn request_with(
        &self,
        method: &str,
        user: &str,
        call_id: &str,
        cseq: u32,
        auth: &str,
        what: &str,
    ) -> String {
        let (uri, to, extra, body) = if method == "REGISTER" {
            let aor = format!("sip:{user}@{REALM}");
            (
                format!("sip:{REALM}"),
                aor,
                format!("Contact: {what}\r\nExpires: 300\r\n"),
                String::new(),
            )
        } else {
            let uri = format!("sip:charge@{REALM}");
            (
                uri.clone(),
                uri,
                "Content-Type: application/vnd.relay.charge+json\r\n".to_string(),
                what.to_string(),
            )
        };
        format!(
            "{method} {uri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{REALM}>;tag={tag}\r\n\
             To: <{to}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} {method}\r\n\
             {extra}{auth}Content-Length: {len}\r\n\r\n{body}",
            local = self.local,
            branch = unique("atk"),
            tag = unique("t"),
            len = body.len(),
        )
    }

    /// `method` for `user` with the right `password`: the request, its challenge, and the
    /// request again with credentials. The final answer to the second.
    fn authenticated(&self, method: &str, (user, password): (&str, &str), what: &str) -> Answer {
        let call_id = unique("rights-");
        let first = self.exchange(
            &self.request_with(method, user, &call_id, 1, "", what),
            &format!("1 {method}"),
        );
        let (challenge, name, uri) = if method == "REGISTER" {
            ("WWW-Authenticate", "Authorization", format!("sip:{REALM}"))
        } else {
            (
                "Proxy-Authenticate",
                "Proxy-Authorization",
                format!("sip:charge@{REALM}"),
            )
        };
        let challenge = first
            .header(challenge)
            .unwrap_or_else(|| panic!("{method} for {user} was not challenged: {first:?}"));
        let value = digest::respond(
            challenge,
            method,
            &uri,
            user,
            password,
            &digest::new_cnonce(),
            1,
        )
        .unwrap();
        self.exchange(
            &self.request_with(
                method,
                user,
                &call_id,
                2,
                &format!("{name}: {value}\r\n"),
                what,
            ),
            &format!("2 {method}"),
        )
    }

    /// Sends `text` and waits for its final response, retransmitting every 250 ms (RFC 3261
    /// §17.1.2.2 in spirit) for at most [`ANSWER_WITHIN`].
    fn exchange(&self, text: &str, cseq: &str) -> Answer {
        let deadline = Instant::now() + ANSWER_WITHIN;
        let mut buf = vec![0u8; 65_535];
        loop {
            self.sock.send_to(text.as_bytes(), self.relay).unwrap();
            let resend_at = Instant::now() + Duration::from_millis(250);
            loop {
                let now = Instant::now();
                assert!(
                    now < deadline,
                    "no final response from the relay to {cseq} from {} within {ANSWER_WITHIN:?}",
                    self.local
                );
                let wait = resend_at.min(deadline).saturating_duration_since(now);
                if wait.is_zero() {
                    break;
                }
                self.sock.set_read_timeout(Some(wait)).unwrap();
                let Ok(n) = self.sock.recv(&mut buf) else {
                    break;
                };
                if let Some(a) = Answer::parse(&buf[..n]) {
                    if a.code >= 200 && a.header("CSeq") == Some(cseq) {
                        return a;
                    }
                }
            }
        }
    }

    /// One bad digest answer for `user` with `method`: the request without credentials
    /// (for a fresh challenge), then with credentials computed from a wrong password. The
    /// final answers to both, in order.
    fn bad_answer(&mut self, method: &str, user: &str) -> [Answer; 2] {
        let call_id = unique("attack-");
        let first = self.exchange(
            &self.request(method, user, &call_id, 1, ""),
            &format!("1 {method}"),
        );
        let header = if method == "REGISTER" {
            "WWW-Authenticate"
        } else {
            "Proxy-Authenticate"
        };
        if let Some(c) = first.header(header) {
            self.last_challenge = Some(c.to_string());
        }
        let challenge = self
            .last_challenge
            .clone()
            .unwrap_or_else(|| panic!("never challenged: {}", first.status()));
        let uri = if method == "REGISTER" {
            format!("sip:{REALM}")
        } else {
            format!("sip:charge@{REALM}")
        };
        let value = digest::respond(
            &challenge,
            method,
            &uri,
            user,
            &unique("not-the-password-"),
            &digest::new_cnonce(),
            1,
        )
        .unwrap();
        let name = if method == "REGISTER" {
            "Authorization"
        } else {
            "Proxy-Authorization"
        };
        let second = self.exchange(
            &self.request(method, user, &call_id, 2, &format!("{name}: {value}\r\n")),
            &format!("2 {method}"),
        );
        [first, second]
    }
}

/// `n` bad digest answers for each of `targets` (method, user), taking turns; the status
/// codes each target got.
fn attack(client: &mut RawClient, targets: &[(&str, &str)], n: usize) -> Vec<Vec<u16>> {
    let mut codes = vec![Vec::with_capacity(n); targets.len()];
    for _ in 0..n {
        for (i, (method, user)) in targets.iter().enumerate() {
            codes[i].push(client.bad_answer(method, user)[1].code);
        }
    }
    codes
}

/// A stranger keeps sending wrong answers from its own address until told to stop; counts
/// what it sent.
struct Background {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Starts from `ip` answering `challenge` (one the relay gave before it refused `ip`).
    fn start(ip: Ipv4Addr, relay_port: u16, challenge: Option<String>) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut client = RawClient::bind(ip, relay_port);
                client.last_challenge = challenge;
                while !stop.load(Ordering::Relaxed) {
                    client.bad_answer("REGISTER", "alice");
                    client.bad_answer("MESSAGE", "as1");
                    sent.fetch_add(2, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Background {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the background attacker panicked");
        }
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The attacker test: 50 bad digest answers for alice and 50 for the
/// application-server account as1 from 127.0.0.3, then (with the stranger still at it)
/// alice registers and calls from 127.0.0.1 at once, the agent keeps its registration (and
/// a second agent process for as1 registers at once), and every charge the agent sends for
/// alice's session is recorded.
#[test]
fn a_stranger_cannot_lock_out_a_subscriber_or_an_application_server() {
    let system = System::start(Transport::Udp, 1);
    let attacker_ip = Ipv4Addr::new(127, 0, 0, 3);
    let mut attacker = RawClient::bind(attacker_ip, system.port);
    // alice's REGISTER (401) and as1's charge MESSAGE (407), in turns.
    let codes = attack(
        &mut attacker,
        &[("REGISTER", "alice"), ("MESSAGE", "as1")],
        50,
    );
    let (on_alice, on_as1) = (&codes[0], &codes[1]);
    // The stranger keeps at it while the victims go on.
    let background = Background::start(attacker_ip, system.port, attacker.last_challenge.clone());

    // alice registers from 127.0.0.1 at once: no lock-out to wait for.
    let started = Instant::now();
    let registered = system
        .client("register", ALICE)
        .args(["register", "--once"])
        .run(b"");
    registered.assert_code(0, &system);
    let reg = registered.events_named("registered");
    assert_eq!(reg.len(), 1, "{registered:#?}");
    assert_eq!(int(reg[0], "status"), 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "registered in {:?}: no lock-out was waited for",
        started.elapsed()
    );

    // alice calls echo and sends data; the agent charges per block, authenticated as as1
    // (MESSAGE with Proxy-Authorization) — the account the stranger went for.
    let mut client = system
        .client("call", ALICE)
        .args(["call", "echo", "--wait-after-eof", "5s"])
        .spawn();
    client.wait_event("data-connected", |_| true);
    assert!(
        wait_until(STEP, || system.metric("relayd_sessions_live") == Some(1)),
        "the relay never counted the session\n{}",
        system.report()
    );
    let blocks = 6u64;
    let input: Vec<u8> = (0..BYTES_PER_CHARGE * blocks)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    client.write(&input);
    let units = |charges: &[Value]| {
        charges
            .iter()
            .map(|c| int(&c["units"], "units"))
            .sum::<i64>()
    };
    let mut charges = Vec::new();
    let charged = wait_until(STEP, || {
        charges = system.charges();
        units(&charges) >= blocks as i64
    });
    assert!(
        charged,
        "expected {blocks} units charged while under attack, got {charges:#?}\n{}",
        system.report()
    );
    client.close_stdin();
    let run = client.finish();
    run.assert_code(0, &system);
    assert_eq!(run.stdout, input, "every byte came back");
    system.wait_sessions(&run.call_id(), 1);
    let charges = system.charges();
    assert_eq!(units(&charges), blocks as i64, "{charges:#?}");
    let events: HashSet<&str> = charges.iter().map(|c| text(c, "event_id")).collect();
    assert_eq!(
        events.len(),
        charges.len(),
        "each charge once: {charges:#?}"
    );
    assert!(
        charges
            .iter()
            .all(|c| text(c, "event_id").starts_with("as1-") && text(c, "subscriber") == "alice"),
        "only the agent's charges, none of the stranger's: {charges:#?}"
    );

    // The agent kept its registration and lost no charge; a second agent process for the
    // same account registers at once.
    let agent = &system.agents[0];
    assert!(
        system.server_up("echo", &agent.uri()),
        "{}",
        system.report()
    );
    let log = agent.log_text();
    for bad in ["registration failed", "relay refused the charge", "lost"] {
        assert!(!log.contains(bad), "the agent's log says {bad:?}:\n{log}");
    }
    let mut system = system;
    system.start_agent("as1");

    // What the stranger saw: challenges, then the refusal of its address.
    for (who, codes) in [("alice", on_alice), ("as1", on_as1)] {
        assert!(
            codes.iter().all(|c| [401, 407, 503].contains(c)),
            "the stranger only ever sees challenges and the refusal of its address ({who}): \
             {codes:?}"
        );
    }
    assert_eq!(on_alice[0], 401, "{on_alice:?}");
    assert_eq!(on_as1[0], 407, "{on_as1:?}");
    assert!(
        on_alice
            .iter()
            .chain(on_as1)
            .rev()
            .take(10)
            .all(|&c| c == 503),
        "the stranger's address is refused by the end: {on_alice:?} {on_as1:?}"
    );
    // Both were locked out, from 127.0.0.3 only.
    assert!(
        system
            .metric("relayd_auth_user_lockouts_total")
            .is_some_and(|n| n >= 2),
        "{}",
        system.metrics().unwrap_or_default()
    );
    let refused = attacker.bad_answer("REGISTER", "alice");
    assert_eq!(refused[0].code, 503, "{}", refused[0].status());
    assert!(
        refused[0].header("Retry-After").is_some(),
        "the refusal says when to come back: {:?}",
        refused[0]
    );
    assert!(
        system
            .metric("relayd_auth_sources_refused_total")
            .is_some_and(|n| n >= 1),
        "the refused source is counted\n{}",
        system.metrics().unwrap_or_default()
    );

    let sent = background.stop();
    assert!(sent > 0, "the stranger kept sending");
    let refusals = system
        .metric("relayd_auth_source_refusals_total")
        .unwrap_or(0);
    assert!(
        refusals as usize > sent,
        "the stranger stayed refused throughout: {refusals} refusals, {sent} attempts \
         in the background\n{}",
        system.metrics().unwrap_or_default()
    );
}

/// SIPVicious-style enumeration does not work: from two fresh addresses, the same run of
/// wrong answers for an existing user (alice) and for a name that does not exist gets the
/// same answers, status by status, up to and including the refusal of the address; and the
/// relay keeps no failure count for the unknown name (its table of (user, source) stays
/// empty while the known user's is one entry).
#[test]
fn an_unknown_user_looks_exactly_like_a_wrong_password() {
    let dir = TestDir::new("relay-enumeration-");
    let port = support::ports::free_port();
    let metrics_port = support::ports::free_port();
    let config = dir.path().join("relayd.toml");
    let text = RelayConfig::standard()
        .to_toml(port, &dir.path().join("data"))
        .replace(
            "[auth]\n",
            "[auth]\nsource_max_failures = 6\nsource_window_secs = 600\nsource_block_secs = 600\n",
        );
    std::fs::write(
        &config,
        format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    )
    .unwrap();
    let relay = Relay::start_with(&config, port);
    let metric = |name: &str| -> Option<i64> {
        let body = support_metrics(metrics_port)?;
        body.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    };
    assert!(
        wait_until(STEP, || metric("relayd_auth_tracked_user_sources")
            .is_some()),
        "no metrics\n{}",
        relay.log()
    );

    let run = |ip: Ipv4Addr, user: &str| -> Vec<String> {
        let mut client = RawClient::bind(ip, port);
        (0..16)
            .flat_map(|_| client.bad_answer("REGISTER", user))
            .map(|a| a.status())
            .collect()
    };
    let unknown = run(Ipv4Addr::new(127, 0, 0, 5), "nobody-by-that-name");
    assert_eq!(
        metric("relayd_auth_tracked_user_sources"),
        Some(0),
        "an unknown name is never stored"
    );
    let known = run(Ipv4Addr::new(127, 0, 0, 4), "alice");
    assert_eq!(
        known, unknown,
        "alice (exists, wrong password) and a name that does not exist look alike"
    );
    assert!(
        known.iter().any(|s| s.starts_with("503")),
        "guessing is slowed: the address is refused after a few failures: {known:?}"
    );
    assert_eq!(metric("relayd_auth_tracked_user_sources"), Some(1));
    assert_eq!(metric("relayd_auth_tracked_sources"), Some(2));
}

/// The digest `uri` must designate the Request-URI (RFC 7616 §3.4.6, RFC 2617 §3.2.2.5):
/// a REGISTER to `sip:relay.test` whose credentials were computed over another resource
/// (right password and all) gets `400`, whoever the user; over the Request-URI itself, or
/// the relay's own address as sipp writes it, alice registers.
#[test]
fn credentials_for_another_uri_are_refused_with_400() {
    let dir = TestDir::new("relay-digest-uri-");
    let relay = Relay::start(dir.path(), &RelayConfig::standard());
    let mut client = RawClient::bind(Ipv4Addr::LOCALHOST, relay.port);
    let register = |client: &mut RawClient, user: &str, password: &str, uri: &str| {
        let call_id = unique("uri-");
        let first = client.exchange(
            &client.request("REGISTER", user, &call_id, 1, ""),
            "1 REGISTER",
        );
        assert_eq!(first.code, 401, "{}", first.status());
        let challenge = first.header("WWW-Authenticate").unwrap().to_string();
        let value = digest::respond(
            &challenge,
            "REGISTER",
            uri,
            user,
            password,
            &digest::new_cnonce(),
            1,
        )
        .unwrap();
        let auth = format!("Authorization: {value}\r\n");
        client.exchange(
            &client.request("REGISTER", user, &call_id, 2, &auth),
            "2 REGISTER",
        )
    };
    for (user, password) in [("alice", "alice-secret"), ("nobody", "x")] {
        for uri in [
            "sip:alice@relay.test",
            "sip:elsewhere.test",
            "sip:10.1.2.3:5060",
        ] {
            let answer = register(&mut client, user, password, uri);
            assert_eq!(
                answer.status(),
                "400 Digest uri does not match the Request-URI",
                "{user} over {uri}"
            );
        }
    }
    for uri in [
        format!("sip:{REALM}"),
        format!("sip:127.0.0.1:{}", relay.port),
    ] {
        let answer = register(&mut client, "alice", "alice-secret", &uri);
        assert_eq!(answer.code, 200, "over {uri}: {}", answer.status());
    }
    assert!(
        relay
            .log()
            .contains("digest uri does not match the Request-URI"),
        "the mismatch is logged\n{}",
        relay.log()
    );
}

/// Finding 8: the right to charge is not decided by URI text, and an application-server
/// account cannot point the relay's inquiries at another host. alice's session is served by
/// the agent of as1; as2, with its own right password, from 127.0.0.3, cannot bind as1's
/// Contact address (nor one outside the allowed networks), and once registered at its own address it can
/// charge neither alice's session (by its Call-ID) nor alice (who never used as2), while as1
/// itself, over the same raw client, can. The charge store holds as1's charge only.
#[test]
fn another_account_cannot_take_a_servers_uri_nor_charge_its_subscribers() {
    let system = System::start(Transport::Udp, 1);
    let run = system
        .client("call", ALICE)
        .args(["call", "echo"])
        .run(b"hello");
    run.assert_code(0, &system);
    let call_id = run.call_id();
    system.wait_sessions(&call_id, 1);

    let stranger = RawClient::bind(Ipv4Addr::new(127, 0, 0, 3), system.port);
    let as2 = ("as2", "as2-secret");
    let as1_uri = system.agents[0].uri();
    for contact in [
        format!("<{as1_uri}>;services=echo"),
        "<sip:as2@203.0.113.7:5080>;services=echo".to_string(),
    ] {
        let answer = stranger.authenticated("REGISTER", as2, &contact);
        assert_eq!(answer.code, 403, "{contact}: {}", answer.status());
    }
    let own = format!("<sip:as2@{}>;services=echo", stranger.local);
    let answer = stranger.authenticated("REGISTER", as2, &own);
    assert_eq!(answer.code, 200, "its own address: {}", answer.status());

    let charge = |extra: &str| {
        format!(
            "{{\"event_id\":\"{}\",{extra}\"amount\":700,\"currency\":\"EUR\",\
             \"description\":\"rights\"}}",
            unique("rights-")
        )
    };
    let by_session = charge(&format!("\"call_id\":\"{call_id}\","));
    let by_subscriber = charge("\"subscriber\":\"alice\",");
    for body in [&by_session, &by_subscriber] {
        let answer = stranger.authenticated("MESSAGE", as2, body);
        assert_eq!(answer.code, 403, "as2 charging {body}: {}", answer.status());
    }
    // The session is still findable: as1, whose server served it, may charge it.
    let answer = stranger.authenticated("MESSAGE", ("as1", "as1-secret"), &by_session);
    assert_eq!(
        answer.code,
        200,
        "as1 charging its own session: {}",
        answer.status()
    );

    let charges: Vec<Value> = system
        .charges()
        .into_iter()
        .filter(|c| text(c, "description") == "rights")
        .collect();
    assert_eq!(charges.len(), 1, "{charges:#?}");
    assert_eq!(text(&charges[0], "subscriber"), "alice");
    assert_eq!(int(&charges[0]["amount"], "minor"), 700, "{charges:#?}");
    assert_eq!(
        text(&charges[0], "server"),
        as1_uri,
        "recorded against as1's server: {charges:#?}"
    );
}

/// The metrics text of the relay whose endpoint is on 127.0.0.1:`port`.
fn support_metrics(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}
