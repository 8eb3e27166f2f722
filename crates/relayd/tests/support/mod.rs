//! Shared harness of relayd's cross-process tests: free ports, a relayd child with its log
//! captured, sipp children (UAC and UAS) with their statistics, a raw SIP client over UDP
//! for the refusals, and the billing export read back as JSON.
//!
//! Every child is owned by a guard that kills it (by its own pid, SIGKILL) when dropped, so
//! a failing test leaves nothing running. Nothing waits by sleeping for a fixed time: every
//! wait polls a condition against a bounded deadline and fails with the evidence (relayd's
//! log, sipp's output) when the deadline passes.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use sip_core::digest;

/// How long a relay or a sipp server may take to answer its first OPTIONS.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The realm (and SIP domain) of every test relay.
pub const REALM: &str = "relay.test";

// ---------------------------------------------------------------------------------------
// Waiting on conditions.

/// Polls `cond` every 20 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Ports.

/// A loopback port free for both UDP and TCP right now, never handed out twice in this
/// test process (tests run in parallel threads).
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..200 {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = tcp.local_addr().unwrap().port();
        let Ok(udp) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) else {
            continue;
        };
        drop((tcp, udp));
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no free loopback port found");
}

// ---------------------------------------------------------------------------------------
// Children.

/// A child process killed (SIGKILL, by its pid) and reaped when dropped.
pub struct Guard {
    child: Child,
    what: String,
}

impl Guard {
    /// Spawns `cmd`, naming it `what` in failures.
    pub fn spawn(mut cmd: Command, what: &str) -> Guard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Guard {
            child,
            what: what.to_string(),
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits up to `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    /// Sends `signal` (a name for kill(1): TERM, USR1…) to the child.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {} ({}) failed", self.pid(), self.what);
    }

    /// SIGKILL now, and reap.
    pub fn kill(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// The child itself (to take its pipes).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// sipp.

/// The sipp binary; a test that needs it fails naming the Debian package when it is missing.
pub fn sipp() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("sipp"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "sipp not found on PATH: these tests drive relayd with sipp; install the Debian \
             package `sip-tester` (apt-get install sip-tester)"
        )
    })
}

/// A scenario file of tests/scenarios.
pub fn scenario(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(name);
    assert!(p.is_file(), "missing scenario {}", p.display());
    p
}

/// The transport sipp and relayd speak to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP (sipp `-t u1`).
    Udp,
    /// TCP, one connection (sipp `-t t1`).
    Tcp,
}

impl Transport {
    fn sipp_flag(self) -> &'static str {
        match self {
            Transport::Udp => "u1",
            Transport::Tcp => "t1",
        }
    }

    /// The URI parameter that makes the relay use this transport towards a server.
    pub fn uri_param(self) -> &'static str {
        match self {
            Transport::Udp => "",
            Transport::Tcp => ";transport=tcp",
        }
    }
}

/// Statistics of a sipp run (the last line of its `-trace_stat` file), by column name.
#[derive(Debug, Clone, Default)]
pub struct SippStats(pub HashMap<String, String>);

impl SippStats {
    /// A cumulative counter, e.g. `count("SuccessfulCall")` reads `SuccessfulCall(C)`.
    pub fn count(&self, name: &str) -> u64 {
        self.0
            .get(&format!("{name}(C)"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    fn parse(text: &str) -> Option<SippStats> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header = lines.next()?;
        let last = lines.next_back()?;
        let map = header
            .split(';')
            .zip(last.split(';'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Some(SippStats(map))
    }
}

/// A sipp process with its statistics file, error log and captured output.
pub struct Sipp {
    guard: Guard,
    name: String,
    stats_file: PathBuf,
    error_file: PathBuf,
    out_file: PathBuf,
    /// The readiness probe's TCP connection, kept open while sipp runs.
    probe: Option<TcpStream>,
}

/// How to run one sipp.
pub struct SippRun<'a> {
    /// Working directory (sipp writes its files there).
    pub dir: &'a Path,
    /// A short unique name for its files.
    pub name: &'a str,
    /// The scenario file name in tests/scenarios.
    pub scenario: &'a str,
    /// `Some(host:port)` for a UAC, `None` for a UAS.
    pub remote: Option<String>,
    /// The local port (`-p`); 0 lets sipp choose.
    pub local_port: u16,
    /// The transport.
    pub transport: Transport,
    /// Further arguments.
    pub args: Vec<String>,
}

impl Sipp {
    /// Starts sipp as described, with `-trace_stat` every 100 ms and `-trace_err`.
    pub fn start(run: SippRun<'_>) -> Sipp {
        let sipp = sipp();
        let stats_file = run.dir.join(format!("{}-stats.csv", run.name));
        let error_file = run.dir.join(format!("{}-errors.log", run.name));
        let out_file = run.dir.join(format!("{}-out.txt", run.name));
        let mut cmd = Command::new(sipp);
        if let Some(remote) = &run.remote {
            cmd.arg(remote);
        }
        cmd.arg("-sf")
            .arg(scenario(run.scenario))
            .args(["-i", "127.0.0.1", "-t", run.transport.sipp_flag()])
            .args(["-nostdin", "-trace_stat", "-fd", "100ms", "-stf"])
            .arg(&stats_file)
            .args(["-trace_err", "-error_file"])
            .arg(&error_file);
        if run.local_port != 0 {
            cmd.args(["-p", &run.local_port.to_string()]);
        }
        cmd.args(&run.args)
            .current_dir(run.dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_file).unwrap())
            .stderr(
                std::fs::File::create(run.dir.join(format!("{}-stderr.txt", run.name))).unwrap(),
            );
        Sipp {
            guard: Guard::spawn(cmd, &format!("sipp {}", run.name)),
            name: run.name.to_string(),
            stats_file,
            error_file,
            out_file,
            probe: None,
        }
    }

    /// The last statistics line sipp wrote, if any yet.
    pub fn stats(&self) -> Option<SippStats> {
        SippStats::parse(&std::fs::read_to_string(&self.stats_file).ok()?)
    }

    /// sipp's error log (unexpected messages, failed regexp checks, retransmission limits).
    pub fn errors(&self) -> String {
        std::fs::read_to_string(&self.error_file).unwrap_or_default()
    }

    /// What sipp reported: its error log and the end of its screen.
    pub fn evidence(&self) -> String {
        let out = std::fs::read_to_string(&self.out_file).unwrap_or_default();
        let tail: Vec<&str> = out.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let mut counters: Vec<String> = self
            .stats()
            .map(|s| {
                s.0.iter()
                    .filter(|(k, v)| k.ends_with("(C)") && v.parse::<f64>().is_ok_and(|v| v != 0.0))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect()
            })
            .unwrap_or_default();
        counters.sort();
        format!(
            "--- sipp {} counters ---\n{}\n--- sipp {} errors ---\n{}\n--- sipp {} screen (tail) ---\n{}",
            self.name,
            counters.join(" "),
            self.name,
            self.errors(),
            self.name,
            tail.join("\n")
        )
    }

    /// Waits until the cumulative counter `name` reaches `n` (a UAS never exits on its
    /// own); panics with the evidence on timeout.
    pub fn wait_count(&self, name: &str, n: u64, timeout: Duration) -> SippStats {
        let mut last = SippStats::default();
        let ok = wait_until(timeout, || {
            if let Some(s) = self.stats() {
                last = s;
            }
            last.count(name) >= n
        });
        assert!(
            ok,
            "sipp {}: {name} stayed at {} (wanted {n})\n{}",
            self.name,
            last.count(name),
            self.evidence()
        );
        last
    }

    /// Waits for sipp to exit (a UAC with `-m`); panics with the evidence on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.guard.wait_timeout(timeout) {
            Some(status) => status,
            None => panic!(
                "sipp {} still running after {timeout:?}\n{}",
                self.name,
                self.evidence()
            ),
        }
    }

    /// Kills it now.
    pub fn kill(&mut self) {
        self.guard.kill();
    }
}

/// Writes sipp's injection file of one subscriber (`[field0]` user, `[field1]` password).
pub fn users_csv(dir: &Path, user: &str, password: &str) -> PathBuf {
    let p = dir.join(format!("{user}.csv"));
    std::fs::write(&p, format!("SEQUENTIAL\n{user};{password}\n")).unwrap();
    p
}

/// Who calls what, for a sipp terminal.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The subscriber (`-au`, `[field0]`).
    pub user: &'a str,
    /// Its password (`-ap`, `[field1]`).
    pub password: &'a str,
    /// The service called (`-s`, `[service]`).
    pub service: &'a str,
}

/// alice calling echo.
pub const ALICE_ECHO: Caller<'static> = Caller {
    user: "alice",
    password: "alice-secret",
    service: "echo",
};

/// A sipp UAC (terminal) registering `caller.user` and calling `caller.service` through
/// the relay at `relay_port`.
pub fn uac(
    dir: &Path,
    name: &str,
    scenario: &str,
    relay_port: u16,
    transport: Transport,
    caller: Caller<'_>,
    extra: &[&str],
) -> Sipp {
    let csv = users_csv(dir, caller.user, caller.password);
    let mut args: Vec<String> = vec![
        "-inf".into(),
        csv.display().to_string(),
        "-au".into(),
        caller.user.into(),
        "-ap".into(),
        caller.password.into(),
        "-s".into(),
        caller.service.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Sipp::start(SippRun {
        dir,
        name,
        scenario,
        remote: Some(format!("127.0.0.1:{relay_port}")),
        // Not sipp's default 5060, which a relay or another sipp may hold.
        local_port: free_port(),
        transport,
        args,
    })
}

/// A sipp UAS (application server) on `port`, answering OPTIONS on its own (`-aa`), ready
/// (it answered an OPTIONS) when this returns.
pub fn uas(
    dir: &Path,
    name: &str,
    scenario: &str,
    port: u16,
    transport: Transport,
    extra: &[&str],
) -> Sipp {
    let mut args: Vec<String> = vec!["-aa".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let sipp = Sipp::start(SippRun {
        dir,
        name,
        scenario,
        remote: None,
        local_port: port,
        transport,
        args,
    });
    let mut sipp = sipp;
    let ok = wait_until(READY_TIMEOUT, || match transport {
        Transport::Udp => udp_options(port),
        Transport::Tcp => {
            sipp.probe = tcp_options(port);
            sipp.probe.is_some()
        }
    });
    assert!(
        ok,
        "sipp {name} never answered OPTIONS on {port}\n{}",
        sipp.evidence()
    );
    sipp
}

// ---------------------------------------------------------------------------------------
// Raw SIP.

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A unique token for branches, tags and Call-IDs.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Sends one out-of-dialog OPTIONS to 127.0.0.1:`port` and says whether a 200 came back
/// within 300 ms.
pub fn options_ping(port: u16, transport: Transport) -> bool {
    match transport {
        Transport::Udp => udp_options(port),
        Transport::Tcp => tcp_options(port).is_some(),
    }
}

fn udp_options(port: u16) -> bool {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let local = sock.local_addr().unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let req = options_request(port, local, "UDP");
    if sock
        .send_to(req.as_bytes(), (Ipv4Addr::LOCALHOST, port))
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 65_535];
    match sock.recv(&mut buf) {
        Ok(n) => buf[..n].starts_with(b"SIP/2.0 200"),
        Err(_) => false,
    }
}

/// OPTIONS over a new TCP connection; the connection, still open, if a 200 came back.
/// Keep it open while the peer runs: a sipp server counts a connection closed under it as
/// a failed call (FailedTcpClosed), and exits on a reset.
fn tcp_options(port: u16) -> Option<TcpStream> {
    let timeout = Duration::from_millis(300);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    let local = stream.local_addr().ok()?;
    stream
        .write_all(options_request(port, local, "TCP").as_bytes())
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"SIP/2.0 200").then_some(stream)
}

fn options_request(port: u16, local: SocketAddr, transport: &str) -> String {
    format!(
        "OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};branch=z9hG4bK{}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@{REALM}>;tag={}\r\n\
         To: <sip:127.0.0.1:{port}>\r\n\
         Call-ID: {}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n",
        unique("p"),
        unique("t"),
        unique("ping-")
    )
}

/// A SIP response as a raw client reads it.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub code: u16,
    /// The reason phrase.
    pub reason: String,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Response {
    fn parse(bytes: &[u8]) -> Option<Response> {
        let text = std::str::from_utf8(bytes).ok()?;
        let head = text.split("\r\n\r\n").next()?;
        let mut lines = head.split("\r\n");
        let status = lines.next()?.strip_prefix("SIP/2.0 ")?;
        let (code, reason) = status.split_once(' ').unwrap_or((status, ""));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        Some(Response {
            code: code.parse().ok()?,
            reason: reason.to_string(),
            headers,
        })
    }

    /// Every value of header `name` (case-insensitive).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    /// `code reason`, for messages.
    pub fn status(&self) -> String {
        format!("{} {}", self.code, self.reason)
    }
}

/// A terminal speaking raw SIP over UDP to a relay: REGISTER and INVITE with digest
/// answers computed by `sip_core::digest` (RFC 3261 §22, RFC 7616).
pub struct SipClient {
    sock: UdpSocket,
    local: SocketAddr,
    relay: SocketAddr,
    /// The user name it speaks for.
    pub user: String,
}

impl SipClient {
    /// A client of `user` towards the relay on 127.0.0.1:`relay_port`.
    pub fn new(relay_port: u16, user: &str) -> SipClient {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let local = sock.local_addr().unwrap();
        SipClient {
            sock,
            local,
            relay: SocketAddr::from((Ipv4Addr::LOCALHOST, relay_port)),
            user: user.to_string(),
        }
    }

    fn send(&self, text: &str) {
        self.sock.send_to(text.as_bytes(), self.relay).unwrap();
    }

    /// The next final response (provisional ones skipped) whose CSeq is `cseq`, within 10 s.
    fn final_response(&self, cseq: &str) -> Response {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 65_535];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: no final response to {cseq}",
                self.user
            );
            self.sock.set_read_timeout(Some(left)).unwrap();
            let Ok(n) = self.sock.recv(&mut buf) else {
                continue;
            };
            let Some(resp) = Response::parse(&buf[..n]) else {
                continue;
            };
            if resp.code >= 200 && resp.header("CSeq") == Some(cseq) {
                return resp;
            }
        }
    }

    /// REGISTER with `password`, answering the 401; the final response.
    pub fn register(&self, password: &str) -> Response {
        let call_id = unique("reg-");
        let tag = unique("rt");
        let uri = format!("sip:{REALM}");
        let first = self.register_once(&uri, &call_id, &tag, 1, "");
        if first.code != 401 {
            return first;
        }
        let value = answer(
            &first,
            "WWW-Authenticate",
            "REGISTER",
            &uri,
            &self.user,
            password,
        );
        let auth = format!("Authorization: {value}\r\n");
        self.register_once(&uri, &call_id, &tag, 2, &auth)
    }

    fn register_once(
        &self,
        uri: &str,
        call_id: &str,
        tag: &str,
        cseq: u32,
        auth: &str,
    ) -> Response {
        self.send(&format!(
            "REGISTER {uri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{REALM}>;tag={tag}\r\n\
             To: <sip:{user}@{REALM}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <sip:{user}@{local}>\r\n\
             Expires: 300\r\n{auth}\
             Content-Length: 0\r\n\r\n",
            local = self.local,
            branch = unique("b"),
            user = self.user,
        ));
        self.final_response(&format!("{cseq} REGISTER"))
    }

    /// INVITE `sip:<service>@relay.test` (an application SDP offer), answering each 407
    /// with the next of `passwords`; returns the final response of every INVITE sent (one
    /// more than the passwords used, unless a non-407 ends it first). Non-2xx finals are
    /// ACKed; a 2xx is ACKed and hung up at once.
    pub fn invite(&self, service: &str, passwords: &[&str]) -> Vec<Response> {
        let call_id = unique("inv-");
        let tag = unique("it");
        let uri = format!("sip:{service}@{REALM}");
        let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=relay\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                   m=application 9 TCP relay-data\r\na=setup:active\r\na=connection:new\r\n";
        let mut finals = Vec::new();
        let mut auth = String::new();
        let mut passwords = passwords.iter();
        for cseq in 1u32.. {
            let branch = format!("z9hG4bK{}", unique("b"));
            let req = format!(
                "INVITE {uri} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {local};branch={branch};rport\r\n\
                 Max-Forwards: 70\r\n\
                 From: <sip:{user}@{REALM}>;tag={tag}\r\n\
                 To: <{uri}>\r\n\
                 Call-ID: {call_id}\r\n\
                 CSeq: {cseq} INVITE\r\n\
                 Contact: <sip:{user}@{local}>\r\n{auth}\
                 Content-Type: application/sdp\r\n\
                 Content-Length: {len}\r\n\r\n{sdp}",
                local = self.local,
                user = self.user,
                len = sdp.len(),
            );
            self.send(&req);
            let resp = self.final_response(&format!("{cseq} INVITE"));
            let to = resp.header("To").unwrap_or_default().to_string();
            // In a dialog (2xx) requests go to the remote target, the 2xx's Contact.
            let target = match resp.header("Contact") {
                Some(c) if resp.code < 300 => c
                    .split('<')
                    .nth(1)
                    .and_then(|c| c.split('>').next())
                    .unwrap_or(&uri)
                    .to_string(),
                _ => uri.clone(),
            };
            // ACK: for a non-2xx part of the INVITE transaction (same branch, RFC 3261
            // §17.1.1.3); for a 2xx its own transaction (then a BYE ends the call).
            let ack_branch = if resp.code >= 300 {
                branch.clone()
            } else {
                format!("z9hG4bK{}", unique("b"))
            };
            self.send(&format!(
                "ACK {target} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {local};branch={ack_branch};rport\r\n\
                 Max-Forwards: 70\r\n\
                 From: <sip:{user}@{REALM}>;tag={tag}\r\n\
                 To: {to}\r\n\
                 Call-ID: {call_id}\r\n\
                 CSeq: {cseq} ACK\r\n\
                 Content-Length: 0\r\n\r\n",
                local = self.local,
                user = self.user,
            ));
            let code = resp.code;
            finals.push(resp);
            if code < 300 {
                self.send(&format!(
                    "BYE {target} SIP/2.0\r\n\
                     Via: SIP/2.0/UDP {local};branch=z9hG4bK{b};rport\r\n\
                     Max-Forwards: 70\r\n\
                     From: <sip:{user}@{REALM}>;tag={tag}\r\n\
                     To: {to}\r\n\
                     Call-ID: {call_id}\r\n\
                     CSeq: {next} BYE\r\n\
                     Content-Length: 0\r\n\r\n",
                    local = self.local,
                    user = self.user,
                    b = unique("b"),
                    next = cseq + 1,
                ));
                break;
            }
            if code != 407 {
                break;
            }
            let Some(password) = passwords.next() else {
                break;
            };
            let last = finals.last().unwrap();
            let value = answer(
                last,
                "Proxy-Authenticate",
                "INVITE",
                &uri,
                &self.user,
                password,
            );
            auth = format!("Proxy-Authorization: {value}\r\n");
        }
        finals
    }
}

/// The credentials answering the strongest challenge in `resp`'s `header`s.
fn answer(
    resp: &Response,
    header: &str,
    method: &str,
    uri: &str,
    user: &str,
    password: &str,
) -> String {
    let challenges = resp.all(header);
    assert!(!challenges.is_empty(), "{} without {header}", resp.status());
    let challenge = digest::best_challenge(challenges).unwrap();
    challenge
        .answer(method, uri, user, password, &digest::new_cnonce(), 1)
        .unwrap()
        .to_header_value()
}

// ---------------------------------------------------------------------------------------
// relayd.

/// One application server of a test configuration.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// Its URI (`sip:127.0.0.1:PORT[;transport=tcp]`).
    pub uri: String,
    /// The services it delivers.
    pub services: Vec<String>,
}

impl ServerSpec {
    /// A server on 127.0.0.1:`port` delivering `services`.
    pub fn new(port: u16, transport: Transport, services: &[&str]) -> ServerSpec {
        ServerSpec {
            uri: format!("sip:127.0.0.1:{port}{}", transport.uri_param()),
            services: services.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// The configuration of a test relay. Subscribers: alice (echo, clock), bob (clock only),
/// carol (echo; for lockouts). Services: echo, clock, news. Account as1.
#[derive(Debug, Clone)]
pub struct RelaySpec {
    /// Static application servers.
    pub servers: Vec<ServerSpec>,
    /// `session.inquiry_timeout_ms`.
    pub inquiry_timeout_ms: u64,
    /// `directory.failure_threshold`.
    pub failure_threshold: u32,
    /// `auth.max_failures`.
    pub max_failures: u32,
}

impl Default for RelaySpec {
    fn default() -> Self {
        RelaySpec {
            servers: Vec::new(),
            inquiry_timeout_ms: 1000,
            failure_threshold: 100,
            max_failures: 3,
        }
    }
}

impl RelaySpec {
    /// The TOML text for a relay on UDP and TCP 127.0.0.1:`port`, data in `data_dir`.
    pub fn to_toml(&self, port: u16, data_dir: &Path) -> String {
        let mut out = format!(
            r#"[listen]
udp = "127.0.0.1:{port}"
tcp = "127.0.0.1:{port}"

[relay]
realm = "{REALM}"

[storage]
data_dir = "{data}"

[log]
level = "info"

[directory]
probe_interval_secs = 3600
failure_threshold = {ft}

[auth]
max_failures = {mf}
lockout_secs = 300

[session]
probe_interval_secs = 0
inquiry_timeout_ms = {it}

[[services]]
name = "echo"

[[services]]
name = "clock"

[[services]]
name = "news"

[[users]]
name = "alice"
password = "alice-secret"
plan = "basic"
services = ["echo", "clock"]

[[users]]
name = "bob"
password = "bob-secret"
plan = "basic"
services = ["clock"]

[[users]]
name = "carol"
password = "carol-secret"
plan = "basic"
services = ["echo"]

[[server_accounts]]
name = "as1"
password = "as1-secret"
services = ["*"]

[[tariffs]]
name = "default"
rate = 2
currency = "EUR"
"#,
            data = data_dir.display(),
            ft = self.failure_threshold,
            mf = self.max_failures,
            it = self.inquiry_timeout_ms,
        );
        for s in &self.servers {
            let services: Vec<String> = s.services.iter().map(|n| format!("\"{n}\"")).collect();
            out.push_str(&format!(
                "\n[[servers]]\nuri = \"{}\"\nservices = [{}]\n",
                s.uri,
                services.join(", ")
            ));
        }
        out
    }
}

/// A running relayd with its stderr (the tracing log) captured.
pub struct Relay {
    /// Its SIP port (UDP and TCP).
    pub port: u16,
    /// Its configuration file.
    pub config: PathBuf,
    guard: Guard,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

/// The relayd binary under test.
pub fn relayd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_relayd")
}

impl Relay {
    /// Writes the configuration of `spec` into `dir` (data in `dir/data`), starts relayd
    /// on a free port and waits until it answers OPTIONS.
    pub fn start(dir: &Path, spec: &RelaySpec) -> Relay {
        let port = free_port();
        let config = dir.join("relayd.toml");
        std::fs::write(&config, spec.to_toml(port, &dir.join("data"))).unwrap();
        Relay::start_with(&config, port)
    }

    /// Starts relayd on an existing configuration (a restart) and waits until it is ready.
    pub fn start_with(config: &Path, port: u16) -> Relay {
        let mut cmd = Command::new(relayd_bin());
        cmd.arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("RELAYD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut guard = Guard::spawn(cmd, "relayd");
        let stderr = guard.child_mut().stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr);
            let mut line = String::new();
            while matches!(lines.read_line(&mut line), Ok(n) if n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let mut relay = Relay {
            port,
            config: config.to_path_buf(),
            guard,
            log,
            reader: Some(reader),
        };
        relay.wait_ready();
        relay
    }

    fn wait_ready(&mut self) {
        let port = self.port;
        let mut exited = None;
        let ok = wait_until(READY_TIMEOUT, || {
            exited = self.guard.try_wait();
            exited.is_some() || options_ping(port, Transport::Udp)
        });
        if let Some(status) = exited {
            self.join_reader();
            panic!("relayd exited at start ({status})\n{}", self.log());
        }
        assert!(ok, "relayd not ready on {port}\n{}", self.log());
    }

    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// Everything relayd logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// How many log lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `n` log lines contain `needle`; panics with the log on timeout.
    pub fn wait_for(&self, needle: &str, n: usize, timeout: Duration) {
        let ok = wait_until(timeout, || self.count(needle) >= n);
        assert!(
            ok,
            "relayd logged {:?} {} times, wanted {n}\n{}",
            needle,
            self.count(needle),
            self.log()
        );
    }

    /// SIGKILL: the relay dies without a chance to end anything.
    pub fn kill(&mut self) {
        self.guard.kill();
        self.join_reader();
    }

    /// SIGTERM, then waits up to `timeout` for the exit; its status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.guard.signal("TERM");
        let status = self.guard.wait_timeout(timeout);
        self.join_reader();
        match status {
            Some(s) => s,
            None => panic!(
                "relayd still running {timeout:?} after SIGTERM\n{}",
                self.log()
            ),
        }
    }

    /// The session records, as `relayd billing export --format jsonl` prints them.
    pub fn sessions(&self) -> Vec<Value> {
        export(&self.config, "sessions")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.guard.kill();
        self.join_reader();
    }
}

/// `relayd --config CONFIG billing export --format jsonl --records KIND`, one JSON value per
/// record.
pub fn export(config: &Path, records: &str) -> Vec<Value> {
    let out = Command::new(relayd_bin())
        .arg("--config")
        .arg(config)
        .args([
            "billing",
            "export",
            "--format",
            "jsonl",
            "--records",
            records,
        ])
        .env_remove("RELAYD_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "billing export failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad export line {l:?}: {e}")))
        .collect()
}

/// A string field of a record.
pub fn field<'a>(record: &'a Value, name: &str) -> &'a str {
    record[name]
        .as_str()
        .unwrap_or_else(|| panic!("record without string {name}: {record}"))
}

/// An integer field of a record.
pub fn int(record: &Value, name: &str) -> i64 {
    record[name]
        .as_i64()
        .unwrap_or_else(|| panic!("record without integer {name}: {record}"))
}
