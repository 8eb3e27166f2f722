//! Health probes as real application servers meet them (RFC 3261 §11): a static server
//! configured `probe = false` that never answers OPTIONS (sipp's UAS without `-aa`) stays in
//! the directory and takes calls; a server refusing OPTIONS with 404 stays in (any final
//! response is an answer); a silent server that is probed is taken out, which is also the
//! clock of these tests: once it is out, several probe intervals have passed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use support::ports::free_port;
use support::relay::{server_uri, Relay, RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sip::SipClient;
use support::sipp::{Sipp, SippOpts, Transport};
use support::{wait_until, ALICE, STEP};

/// Subscriber of every service of these tests.
const DAVE: (&str, &str) = ("dave", "dave-secret");

/// Whether `line` names `uri` itself (not a longer port that starts with its digits).
fn mentions(line: &str, uri: &str) -> bool {
    line.match_indices(uri).any(|(at, _)| {
        !line[at + uri.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// Log lines of a probe of `uri` (`relayd=debug`: one per probe that changed nothing).
fn probes_of(relay: &Relay, uri: &str) -> usize {
    relay
        .log()
        .lines()
        .filter(|l| l.contains("probe") && l.contains("alive=") && mentions(l, uri))
        .count()
}

/// Log lines saying `uri` was taken out.
fn taken_out(relay: &Relay, uri: &str) -> usize {
    relay
        .log()
        .lines()
        .filter(|l| l.contains("taken out") && mentions(l, uri))
        .count()
}

/// Starts relayd on `config` with probes every second, `probe = false` for the servers at
/// `unprobed` URIs.
fn start_relay(dir: &Path, config: &RelayConfig, unprobed: &[&str]) -> Relay {
    let port = free_port();
    let mut text = config.to_toml(port, &dir.join("data"));
    assert!(text.contains("probe_interval_secs = 3600"), "{text}");
    text = text.replacen("probe_interval_secs = 3600", "probe_interval_secs = 1", 1);
    for uri in unprobed {
        let line = format!("uri = {uri:?}\n");
        assert!(text.contains(&line), "{text}");
        text = text.replace(&line, &format!("{line}probe = false\n"));
    }
    let path = dir.join("relayd.toml");
    std::fs::write(&path, text).unwrap();
    Relay::start_with(&path, port)
}

/// A UDP application server that answers every request but ACK with `404 Not Found`, and
/// counts the OPTIONS it got. Stops when dropped.
struct Refuser {
    port: u16,
    options: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Refuser {
    fn start() -> Refuser {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let port = sock.local_addr().unwrap().port();
        let options = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, done) = (options.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_535];
            while !done.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.starts_with("OPTIONS ") {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(resp) = not_found(&text) {
                    let _ = sock.send_to(resp.as_bytes(), from);
                }
            }
        });
        Refuser {
            port,
            options,
            stop,
            thread: Some(thread),
        }
    }

    fn options(&self) -> usize {
        self.options.load(Ordering::Relaxed)
    }
}

impl Drop for Refuser {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `404 Not Found` for the request `text` (RFC 3261 §8.2.6: Via, From, Call-ID, CSeq
/// copied, a To tag added); `None` for an ACK or what is not a request.
fn not_found(text: &str) -> Option<String> {
    let head = text.split("\r\n\r\n").next()?;
    let mut lines = head.split("\r\n");
    let method = lines.next()?.split(' ').next()?;
    if method == "ACK" || method.starts_with("SIP/") {
        return None;
    }
    let mut out = String::from("SIP/2.0 404 Not Found\r\n");
    for line in lines {
        let name = line.split(':').next().unwrap_or("").trim();
        let keep = ["Via", "v", "From", "f", "Call-ID", "i", "CSeq"];
        if keep.iter().any(|k| name.eq_ignore_ascii_case(k)) {
            out.push_str(line);
            out.push_str("\r\n");
        } else if name.eq_ignore_ascii_case("To") || name == "t" {
            out.push_str(line);
            if !line.contains(";tag=") {
                out.push_str(";tag=refuser");
            }
            out.push_str("\r\n");
        }
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    Some(out)
}

/// The last final response of dave's INVITE of `service` (registered, its 407 answered).
fn dave_invites(relay: &Relay, service: &str) -> String {
    let dave = SipClient::new(relay.port, DAVE.0);
    assert_eq!(dave.register(DAVE.1).code, 200);
    let finals = dave.invite(service, &[DAVE.1]);
    assert_eq!(finals.first().map(|r| r.code), Some(407), "{finals:?}");
    finals.last().unwrap().status()
}

fn config() -> RelayConfig {
    RelayConfig::standard()
        .user(DAVE, &["echo", "clock", "news"])
        .failure_threshold(2)
        .inquiry_timeout_ms(2000)
        .t1_ms(50)
}

/// Waits until the probed silent server at `uri` is taken out and has missed a few more
/// probes: several probe intervals have passed.
fn wait_silent_taken_out(relay: &Relay, uri: &str) {
    let ok = wait_until(STEP, || taken_out(relay, uri) >= 1);
    assert!(
        ok,
        "the silent server {uri} was never taken out\n{}",
        relay.log()
    );
    let ok = wait_until(STEP, || probes_of(relay, uri) >= 2);
    assert!(ok, "no more probes of {uri}\n{}", relay.log());
}

#[test]
fn unprobed_server_that_never_answers_options_stays_in_and_takes_calls() {
    let scene = Scene::new();
    // sipp's UAS as it comes: no -aa, so it never answers OPTIONS.
    let quiet = Sipp::start(
        scene.dir(),
        "quiet",
        "uas_answer.xml",
        None,
        SippOpts::default(),
    );
    assert!(
        wait_until(STEP, || quiet.stats().is_some()),
        "{}",
        quiet.report()
    );
    let silent = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let silent_uri = server_uri(silent.local_addr().unwrap().port(), Transport::Udp);
    let quiet_uri = server_uri(quiet.port, Transport::Udp);
    let relay = start_relay(
        scene.dir(),
        &config()
            .server(ServerSpec::udp(quiet.port, &["echo"]))
            .server(ServerSpec::udp(
                silent.local_addr().unwrap().port(),
                &["news"],
            )),
        &[&quiet_uri],
    );

    wait_silent_taken_out(&relay, &silent_uri);
    assert_eq!(
        dave_invites(&relay, "news"),
        "480 No application server available"
    );

    // Meanwhile the unprobed server was never probed nor taken out…
    assert_eq!(probes_of(&relay, &quiet_uri), 0, "{}", relay.log());
    assert_eq!(taken_out(&relay, &quiet_uri), 0, "{}", relay.log());
    assert!(
        !quiet.messages().contains("OPTIONS"),
        "the relay probed it\n{}",
        quiet.messages()
    );
    // …and a call to it completes.
    let mut alice = Sipp::terminal(
        scene.dir(),
        "alice",
        "uac_call.xml",
        relay.port,
        ALICE,
        Some("echo"),
        SippOpts::default().args(&["-d", "100"]),
    );
    let status = alice.wait_exit(STEP);
    assert!(
        status.success(),
        "sipp: {status}\n{}\n{}\n{}",
        alice.report(),
        quiet.report(),
        relay.log()
    );
    quiet.wait_count("SuccessfulCall", 1, Duration::from_secs(10));
    assert_eq!(taken_out(&relay, &quiet_uri), 0, "{}", relay.log());
}

#[test]
fn server_answering_404_to_options_stays_in_and_a_silent_one_is_taken_out() {
    let scene = Scene::new();
    let refuser = Refuser::start();
    let refuser_uri = server_uri(refuser.port, Transport::Udp);
    let silent = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let silent_uri = server_uri(silent.local_addr().unwrap().port(), Transport::Udp);
    let relay = start_relay(
        scene.dir(),
        &config()
            .server(ServerSpec::udp(refuser.port, &["clock"]))
            .server(ServerSpec::udp(
                silent.local_addr().unwrap().port(),
                &["news"],
            )),
        &[],
    );

    wait_silent_taken_out(&relay, &silent_uri);
    let ok = wait_until(STEP, || refuser.options() >= 3);
    assert!(
        ok,
        "{} OPTIONS to the refuser\n{}",
        refuser.options(),
        relay.log()
    );
    assert_eq!(taken_out(&relay, &refuser_uri), 0, "{}", relay.log());
    assert!(
        relay
            .log()
            .lines()
            .any(|l| mentions(l, &refuser_uri) && l.contains("alive=true")),
        "{}",
        relay.log()
    );
    // Still a candidate: the call is inquired of it, and its own refusal relayed.
    assert_eq!(dave_invites(&relay, "clock"), "404 Not Found");
    assert!(
        relay
            .log()
            .lines()
            .any(|l| l.contains("inquiring") && mentions(l, &refuser_uri)),
        "{}",
        relay.log()
    );
    // The silent one is not a candidate any more.
    assert_eq!(
        dave_invites(&relay, "news"),
        "480 No application server available"
    );
}
