//! Shared test harness: the agent as a child process (its log read line by line so a test
//! can wait for an event), sipp runs, and a small relay stand-in built on sip-core.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rsip::prelude::*;
use rsip::{Header, Method, Request, Response};
use sip_core::dialog::{Dialog, ViaSpec};
use sip_core::endpoint::{Endpoint, EndpointConfig, EndpointEvent, IncomingRequest};
use sip_core::message;
use sip_core::sdp::AppSdp;
use sip_core::transport::TransportConfig;
use sip_core::{Peer, Transport};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, Notify};

/// What every wait in these tests is bounded by.
pub const WAIT: Duration = Duration::from_secs(20);

/// The sipp binary; fails the test with the package to install when it is missing.
pub fn sipp() -> PathBuf {
    match std::process::Command::new("sipp").arg("-v").output() {
        Ok(_) => PathBuf::from("sipp"),
        Err(_) => panic!(
            "sipp is not installed: these tests need the Debian package `sip-tester` \
             (apt-get install -y sip-tester)"
        ),
    }
}

/// A UDP port free right now on `ip` (bound, read, released).
pub fn free_udp_port(ip: &str) -> u16 {
    let s = std::net::UdpSocket::bind((ip, 0)).unwrap();
    s.local_addr().unwrap().port()
}

pub fn scenario(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

/// A running agent.
pub struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    changed: Arc<Notify>,
    /// Its SIP (UDP) address.
    pub sip: SocketAddr,
    /// Its data gateway.
    pub data: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent with `args` plus the account as1 (password `as1-secret` in a file),
    /// SIP and data on free ports unless `args` say otherwise, debug logs; waits until ready.
    pub async fn start(args: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("password");
        std::fs::write(&pw, "as1-secret\n").unwrap();
        let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("appsrv-agent"));
        cmd.args(["--account", "as1", "--password-file", pw.to_str().unwrap()]);
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !args.contains(&"--data-listen") {
            cmd.args(["--data-listen", "127.0.0.1:0"]);
        }
        cmd.args(args)
            .env("RUST_LOG", "appsrv_agent=debug,sip_core=info")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let changed = Arc::new(Notify::new());
        {
            let lines = lines.clone();
            let changed = changed.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap().push(line);
                    changed.notify_waiters();
                }
                lines.lock().unwrap().push("<agent stderr closed>".into());
                changed.notify_waiters();
            });
        }
        let mut agent = Agent {
            child,
            lines,
            changed,
            sip: "0.0.0.0:0".parse().unwrap(),
            data: "0.0.0.0:0".parse().unwrap(),
            dir,
        };
        let ready = agent.wait_for("appsrv-agent ready").await;
        agent.sip = field(&ready, "sip=").parse().unwrap();
        agent.data = field(&ready, "data=").parse().unwrap();
        agent
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (bounded) for a log line containing `needle`, and returns it.
    pub async fn wait_for(&self, needle: &str) -> String {
        self.wait_for_nth(needle, 1).await
    }

    /// Waits (bounded) for the `n`th log line containing `needle`.
    pub async fn wait_for_nth(&self, needle: &str, n: usize) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let lines = self.lines.lock().unwrap();
                if let Some(line) = lines.iter().filter(|l| l.contains(needle)).nth(n - 1) {
                    return line.clone();
                }
                if lines.last().is_some_and(|l| l == "<agent stderr closed>") {
                    panic!(
                        "agent exited before logging {needle:?}:\n{}",
                        lines.join("\n")
                    );
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "no {needle:?} in the agent's log within {WAIT:?}:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Sends SIGTERM to the agent (a process this test started).
    pub fn sigterm(&self) {
        let pid = self.child.id().expect("agent already reaped");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for the agent to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("agent did not exit within {WAIT:?}:\n{}", self.log()),
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len();
    line[start..].split_whitespace().next().unwrap()
}

/// Runs sipp against `target` with a scenario from tests/scenarios; returns its output.
pub async fn run_sipp(
    target: SocketAddr,
    scenario_name: &str,
    local_ip: &str,
    port: u16,
) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(sipp())
        .arg(target.to_string())
        .args(["-sf", &scenario(scenario_name)])
        .args(["-i", local_ip, "-p", &port.to_string()])
        .args(["-m", "1", "-t", "u1"])
        .args(["-timeout", "30s", "-timeout_error"])
        .arg("-nostdin")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(out) => out.unwrap(),
        Err(_) => panic!("sipp ({scenario_name}) did not finish within 60 s"),
    }
}

pub fn assert_sipp_ok(out: &std::process::Output, what: &str, agent: &Agent) {
    assert!(
        out.status.success(),
        "sipp {what} failed ({:?}):\n{}\n{}\n--- agent log ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
}

/// A relay stand-in on sip-core: sends inquiries to the agent and receives its requests.
pub struct Relay {
    pub endpoint: Endpoint,
    pub events: mpsc::Receiver<EndpointEvent>,
    pub addr: SocketAddr,
}

/// A session the relay stand-in set up.
pub struct Leg {
    pub dialog: Dialog,
    pub answer: AppSdp,
    pub peer: Peer,
}

pub const OFFER: &str = "v=0\r\no=- 7 1 IN IP4 127.0.0.1\r\ns=relay\r\nc=IN IP4 127.0.0.1\r\n\
t=0 0\r\nm=application 9 TCP relay-data\r\na=setup:active\r\na=connection:new\r\n";

impl Relay {
    pub async fn bind() -> Relay {
        Relay::bind_on("127.0.0.1:0").await
    }

    /// A relay stand-in on `addr` (`[::1]:0` for IPv6).
    pub async fn bind_on(addr: &str) -> Relay {
        let config = EndpointConfig {
            transport: TransportConfig {
                udp: vec![addr.parse().unwrap()],
                ..TransportConfig::default()
            },
            shards: 1,
            ..EndpointConfig::default()
        };
        let (endpoint, events) = Endpoint::bind(config).await.unwrap();
        let addr = endpoint.local_addr(Transport::Udp).unwrap();
        Relay {
            endpoint,
            events,
            addr,
        }
    }

    pub fn uri(&self) -> String {
        format!("sip:{}", self.addr)
    }

    pub fn via(&self) -> ViaSpec {
        ViaSpec {
            transport: Transport::Udp,
            sent_by: self.addr.to_string(),
        }
    }

    /// An INVITE for `service` on behalf of `subscriber` with the standard offer.
    pub fn invite(&self, agent: SocketAddr, service: &str, subscriber: &str) -> Request {
        let text = format!(
            "INVITE sip:{service}@{agent} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:relay@{me}>;tag={tag}\r\n\
             To: <sip:{service}@{agent}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:relay@{me}>\r\n\
             P-Asserted-Identity: <sip:{subscriber}@relay.test>\r\n\
             P-Asserted-Service: {service}\r\n\
             Content-Type: application/sdp\r\n\
             Content-Length: {len}\r\n\r\n{OFFER}",
            me = self.addr,
            branch = message::new_branch(),
            tag = message::new_tag(),
            call_id = message::new_call_id("relay.test"),
            len = OFFER.len(),
        );
        // sip-core's wire layer reads what rsip cannot: an IPv6 Request-URI.
        match sip_core::wire::parse(text.as_bytes()).unwrap() {
            rsip::SipMessage::Request(r) => r,
            _ => unreachable!(),
        }
    }

    /// Sends `req` to the agent and returns its final response.
    pub async fn transact(&self, req: Request, agent: SocketAddr) -> Response {
        let mut tx = self.endpoint.send_request(req, Peer::udp(agent)).unwrap();
        tokio::time::timeout(WAIT, tx.final_response())
            .await
            .expect("no final response")
    }

    /// INVITE, expect 200, ACK: the session is live.
    pub async fn call(&self, agent: SocketAddr, service: &str, subscriber: &str) -> Leg {
        self.call_with(agent, service, subscriber, true).await
    }

    /// INVITE and 200; the ACK only when `ack`.
    pub async fn call_with(
        &self,
        agent: SocketAddr,
        service: &str,
        subscriber: &str,
        ack: bool,
    ) -> Leg {
        let invite = self.invite(agent, service, subscriber);
        let resp = self.transact(invite.clone(), agent).await;
        assert_eq!(resp.status_code.code(), 200, "inquiry refused: {resp}");
        let dialog = Dialog::uac(&invite, &resp).unwrap();
        let answer = AppSdp::parse(&resp.body).unwrap();
        let leg = Leg {
            dialog,
            answer,
            peer: Peer::udp(agent),
        };
        if ack {
            self.ack(&leg, &invite).await;
        }
        leg
    }

    pub async fn ack(&self, leg: &Leg, invite: &Request) {
        let ack = leg
            .dialog
            .ack_for_2xx(invite, &self.via(), vec![], vec![])
            .unwrap();
        self.endpoint.send_stateless(&leg.peer, ack).await.unwrap();
    }

    /// An in-dialog request on a leg; returns the final response.
    pub async fn in_dialog(
        &self,
        leg: &mut Leg,
        method: Method,
        extra: Vec<Header>,
        body: Vec<u8>,
    ) -> (Request, Response) {
        let req = leg
            .dialog
            .request(method, &self.via(), extra, body)
            .unwrap();
        let resp = self.transact(req.clone(), leg.peer.addr).await;
        (req, resp)
    }

    /// The next request the agent sends us (bounded wait); ACKs and other events are skipped.
    pub async fn next_request(&mut self) -> IncomingRequest {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(EndpointEvent::Request(r))) => return r,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("relay endpoint closed"),
                Err(_) => panic!("no request from the agent within {WAIT:?}"),
            }
        }
    }

    /// Waits for the agent's BYE on `leg` and answers 200.
    pub async fn expect_bye(&mut self, call_id: &str) {
        let r = self.next_request().await;
        assert_eq!(r.req.method, Method::Bye, "expected BYE, got {}", r.req);
        let got = r
            .req
            .headers
            .iter()
            .find_map(|h| match h {
                Header::CallId(c) => Some(c.value().to_string()),
                _ => None,
            })
            .unwrap();
        assert_eq!(got, call_id);
        r.tx.respond(message::response_for(&r.req, 200, None, None))
            .unwrap();
    }
}

pub fn header(msg: &impl HasHeaders, name: &str) -> Option<String> {
    msg.all_headers().iter().find_map(|h| {
        let line = h.to_string();
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

pub trait HasHeaders {
    fn all_headers(&self) -> &rsip::Headers;
}

impl HasHeaders for Request {
    fn all_headers(&self) -> &rsip::Headers {
        &self.headers
    }
}

impl HasHeaders for Response {
    fn all_headers(&self) -> &rsip::Headers {
        &self.headers
    }
}

/// Connects to the data gateway and presents `token`; returns the stream and the first
/// line the gateway answered.
pub async fn present_token(data: SocketAddr, token: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(data).await.unwrap();
    s.write_all(format!("{token}\n").as_bytes()).await.unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut byte))
            .await
            .expect("no answer")
            .unwrap();
        if n == 0 || byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    (s, String::from_utf8(line).unwrap())
}

/// Reads until end of stream (bounded).
pub async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("stream not closed in time")
        .unwrap();
    out
}

pub fn call_id(leg: &Leg) -> String {
    leg.dialog.id().call_id.to_owned()
}

/// Runs sipp as a server (a UAS scenario) on `port`; returns its output when its one call
/// is done.
pub async fn run_sipp_uas(scenario_name: &'static str, port: u16) -> std::process::Output {
    run_sipp_uas_on(scenario_name, "127.0.0.1", port).await
}

/// Runs sipp as a server (a UAS scenario) on `local_ip` (`::1` for IPv6) and `port`;
/// returns its output when its one call is done.
pub async fn run_sipp_uas_on(
    scenario_name: &'static str,
    local_ip: &str,
    port: u16,
) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(sipp())
        .args(["-sf", &scenario(scenario_name)])
        .args(["-i", local_ip, "-p", &port.to_string()])
        .args(["-m", "1", "-t", "u1"])
        .args(["-timeout", "40s", "-timeout_error"])
        .arg("-nostdin")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(out) => out.unwrap(),
        Err(_) => panic!("sipp ({scenario_name}) did not finish within 60 s"),
    }
}

/// Waits (bounded) until something has bound UDP `port` on 127.0.0.1 (a server we started).
pub async fn wait_port_bound(port: u16) {
    wait_port_bound_on("127.0.0.1", port).await
}

/// Waits (bounded) until something has bound UDP `port` on `ip` (a server we started).
pub async fn wait_port_bound_on(ip: &str, port: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while std::net::UdpSocket::bind((ip, port)).is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing bound UDP port {port} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// sipp running a client (UAC) scenario in the background, in a directory kept for its
/// logs (`-trace_logs`: what the scenario's `<log>` actions write), so that a test can read
/// what sipp captured while the call goes on.
pub struct SippRun {
    dir: tempfile::TempDir,
    child: Child,
    scenario: String,
}

impl SippRun {
    /// Starts `scenario_name` against `target` from `local_ip`:`port`, one call.
    pub fn start(target: SocketAddr, scenario_name: &str, local_ip: &str, port: u16) -> SippRun {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(sipp())
            .arg(target.to_string())
            .args(["-sf", &scenario(scenario_name)])
            .args(["-i", local_ip, "-p", &port.to_string()])
            .args(["-m", "1", "-t", "u1"])
            .args(["-timeout", "40s", "-timeout_error"])
            .args(["-nostdin", "-trace_logs", "-trace_err"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        SippRun {
            dir,
            child,
            scenario: scenario_name.trim_end_matches(".xml").to_string(),
        }
    }

    fn file_ending(&self, suffix: &str) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with(suffix) {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
        out
    }

    /// What the scenario's `<log>` actions wrote so far.
    pub fn logs(&self) -> String {
        self.file_ending("_logs.log")
    }

    /// sipp's errors so far (`-trace_err`): a failed regexp check, an unexpected message.
    pub fn errors(&self) -> String {
        self.file_ending("_errors.log")
    }

    /// Waits (bounded) for a logged line starting with `key` and returns its next word.
    pub async fn wait_logged(&mut self, key: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let logs = self.logs();
            if let Some(rest) = logs.lines().find_map(|l| l.trim().strip_prefix(key)) {
                if let Some(word) = rest.split_whitespace().next() {
                    return word.to_string();
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "sipp ({}) ended ({status:?}) before logging {key:?}:\n{logs}\n{}",
                    self.scenario,
                    self.errors()
                );
            }
            let errors = self.errors();
            assert!(
                errors.trim().is_empty(),
                "sipp ({}) failed before logging {key:?}:\n{errors}",
                self.scenario
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "sipp ({}) logged no {key:?} within {WAIT:?}:\n{logs}",
                self.scenario
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) for the scenario to end; its output.
    pub async fn finish(self) -> std::process::Output {
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait_with_output()).await {
            Ok(out) => out.unwrap(),
            Err(_) => panic!("sipp ({}) did not finish within 60 s", self.scenario),
        }
    }
}
