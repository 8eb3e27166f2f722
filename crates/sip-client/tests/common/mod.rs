//! Shared pieces of the cross-process tests: sipp standing in for the relay, a data server
//! standing in for the application server's data gateway, a lossy UDP hop, and the client.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The account every scenario expects.
pub const USER: &str = "alice";
/// Its password.
pub const PASSWORD: &str = "wonderland";
/// The relay's domain and realm in the scenarios.
pub const DOMAIN: &str = "relay.test";

/// Checks that sipp is installed; the message names the Debian package.
pub fn sipp_path() -> PathBuf {
    match Command::new("sipp")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => PathBuf::from("sipp"),
        Err(_) => panic!(
            "sipp is not installed: these tests need the Debian package `sip-tester` \
             (apt-get install -y sip-tester)"
        ),
    }
}

/// A port that was free a moment ago (bound to port 0, read, dropped).
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A port free a moment ago on `ip` (`::1` for IPv6), for UDP and TCP.
pub fn free_port_on(ip: &str) -> u16 {
    let udp = UdpSocket::bind((ip, 0)).unwrap();
    let port = udp.local_addr().unwrap().port();
    // The same port must be free for TCP too.
    match TcpListener::bind((ip, port)) {
        Ok(_) => port,
        Err(_) => free_port_on(ip),
    }
}

/// Whether a socket is bound to `port` (listening, for TCP), read from /proc/net so that
/// the probe never takes the port itself.
pub fn port_bound(port: u16, tcp: bool) -> bool {
    let files: &[&str] = if tcp {
        &["/proc/net/tcp", "/proc/net/tcp6"]
    } else {
        &["/proc/net/udp", "/proc/net/udp6"]
    };
    let suffix = format!(":{port:04X}");
    files.iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&suffix) && (!tcp || cols[3] == "0A")
            })
    })
}

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(name)
}

/// A sipp process playing a scenario as the relay, in its own directory (for its logs).
pub struct Sipp {
    child: Option<Child>,
    /// The address it listens on (`127.0.0.1`, or `::1` for IPv6).
    pub ip: String,
    /// The port it listens on.
    pub port: u16,
    dir: tempfile::TempDir,
    name: String,
}

impl Sipp {
    /// Starts `scenario` (in tests/scenarios) on a free port over `transport` ("u1" or
    /// "t1"), with `-key name value` pairs, and waits until its port is bound.
    pub fn start(scenario_name: &str, transport: &str, keys: &[(&str, &str)]) -> Sipp {
        Sipp::start_with(scenario_name, transport, keys, &[])
    }

    /// Like [`Sipp::start`], with `@NAME@` placeholders of the scenario replaced first (for
    /// what sipp needs literally, such as a response code).
    pub fn start_with(
        scenario_name: &str,
        transport: &str,
        keys: &[(&str, &str)],
        substitutions: &[(&str, &str)],
    ) -> Sipp {
        Sipp::start_on("127.0.0.1", scenario_name, transport, keys, substitutions)
    }

    /// Like [`Sipp::start_with`], listening on `ip` (`::1` for the IPv6 tests: sipp's
    /// `-i ::1`).
    pub fn start_on(
        ip: &str,
        scenario_name: &str,
        transport: &str,
        keys: &[(&str, &str)],
        substitutions: &[(&str, &str)],
    ) -> Sipp {
        let sipp = sipp_path();
        let dir = tempfile::tempdir().unwrap();
        let mut path = scenario(scenario_name);
        if !substitutions.is_empty() {
            let mut text = std::fs::read_to_string(&path).unwrap();
            for (k, v) in substitutions {
                text = text.replace(&format!("@{k}@"), v);
            }
            path = dir.path().join(scenario_name);
            std::fs::write(&path, text).unwrap();
        }
        let port = free_port_on(ip);
        let mut cmd = Command::new(sipp);
        cmd.arg("-sf")
            .arg(&path)
            .args(["-i", ip, "-p", &port.to_string(), "-t", transport])
            .args([
                "-m",
                "1",
                "-nostdin",
                "-trace_err",
                "-trace_logs",
                "-trace_msg",
            ])
            .args(["-timeout", "15s", "-timeout_error"]);
        for (k, v) in keys {
            cmd.arg("-key").arg(k).arg(v);
        }
        let mut child = cmd
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let tcp = transport.starts_with('t');
        let mut exited = None;
        wait_for(Duration::from_secs(5), "sipp to bind its port", || {
            if let Some(status) = child.try_wait().unwrap() {
                exited = Some(status);
                return true;
            }
            port_bound(port, tcp)
        });
        if let Some(status) = exited {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("sipp exited at once ({status:?}) with {scenario_name}:\n{err}");
        }
        Sipp {
            child: Some(child),
            ip: ip.to_string(),
            port,
            dir,
            name: scenario_name.trim_end_matches(".xml").to_string(),
        }
    }

    /// The relay URI for the client (an IPv6 address in brackets: `sip:[::1]:PORT`).
    pub fn relay(&self, transport: &str) -> String {
        let host = if self.ip.contains(':') {
            format!("[{}]", self.ip)
        } else {
            self.ip.clone()
        };
        if transport.starts_with('t') {
            format!("sip:{host}:{};transport=tcp", self.port)
        } else {
            format!("sip:{host}:{}", self.port)
        }
    }

    fn file_ending(&self, suffix: &str) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with(&self.name) && name.ends_with(suffix) {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
        out
    }

    /// What the scenario logged with `<log>`.
    pub fn logs(&self) -> String {
        self.file_ending("_logs.log")
    }

    /// The messages sipp saw and sent.
    pub fn messages(&self) -> String {
        self.file_ending("_messages.log")
    }

    /// Waits for sipp to finish the scenario; panics with its errors if it failed.
    pub fn expect_success(&mut self) {
        let status = self.wait(Duration::from_secs(10));
        assert!(
            status.success(),
            "sipp failed ({status:?}):\n{}\n--- errors ---\n{}\n--- messages ---\n{}",
            self.stderr(),
            self.file_ending("_errors.log"),
            self.messages()
        );
    }

    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let mut status = None;
        wait_for(limit, "sipp to finish its scenario", || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(e) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A data gateway standing in for the application server's: checks the token line,
/// answers `OK` and a greeting, then echoes until the client half-closes, and closes.
/// Unknown tokens get `ERR unknown token`.
pub struct DataServer {
    /// Its port.
    pub port: u16,
    /// The tokens presented, in order.
    pub seen: Arc<Mutex<Vec<String>>>,
    /// The addresses the connections came from, in order.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl DataServer {
    /// Serves `tokens` (token → greeting) on a free port, any number of connections.
    pub fn start(tokens: &[(&str, &str)]) -> DataServer {
        DataServer::start_on("127.0.0.1", tokens)
    }

    /// Like [`DataServer::start`], on `ip` (`::1` for IPv6).
    pub fn start_on(ip: &str, tokens: &[(&str, &str)]) -> DataServer {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let tokens: Vec<(String, String)> = tokens
            .iter()
            .map(|(t, g)| (t.to_string(), g.to_string()))
            .collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let peers2 = peers.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                if let Ok(peer) = conn.peer_addr() {
                    peers2.lock().unwrap().push(peer);
                }
                let tokens = tokens.clone();
                let seen = seen2.clone();
                thread::spawn(move || serve(conn, &tokens, &seen));
            }
        });
        DataServer { port, seen, peers }
    }

    /// The tokens presented so far.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(conn: std::net::TcpStream, tokens: &[(String, String)], seen: &Mutex<Vec<String>>) {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let token = line.trim_end().to_string();
    seen.lock().unwrap().push(token.clone());
    let Some((_, greeting)) = tokens.iter().find(|(t, _)| *t == token) else {
        let _ = writer.write_all(b"ERR unknown token\n");
        return;
    };
    let _ = writer.write_all(format!("OK\n{greeting}").as_bytes());
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if writer.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = writer.shutdown(std::net::Shutdown::Both);
}

/// A UDP hop between the client and sipp that drops the first datagram of each kind
/// `drop` names (by its first line's start, e.g. "INVITE " or "SIP/2.0 200"), once.
pub struct LossyHop {
    /// The port the client sends to.
    pub port: u16,
    /// The first lines dropped.
    pub dropped: Arc<Mutex<Vec<String>>>,
}

impl LossyHop {
    /// Forwards between the client (whoever sends first) and `server`.
    pub fn start(server: SocketAddr, drop: &[&str]) -> LossyHop {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let mut pending: Vec<String> = drop.iter().map(|s| s.to_string()).collect();
        let dropped = Arc::new(Mutex::new(Vec::new()));
        let dropped2 = dropped.clone();
        thread::spawn(move || {
            let mut client: Option<SocketAddr> = None;
            let mut buf = [0u8; 65536];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    return;
                };
                let first_line = String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if let Some(i) = pending
                    .iter()
                    .position(|p| first_line.starts_with(p.as_str()))
                {
                    pending.remove(i);
                    dropped2.lock().unwrap().push(first_line);
                    continue;
                }
                let to = if from == server {
                    match client {
                        Some(c) => c,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    server
                };
                let _ = sock.send_to(&buf[..n], to);
            }
        });
        LossyHop { port, dropped }
    }
}

/// The client with the test account and short SIP timers; HOME points at an empty
/// directory so no user configuration is read.
pub fn client(relay: &str, home: &Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("sip-client").unwrap();
    cmd.env_clear()
        .env("HOME", home)
        .env("SIP_CLIENT_PASSWORD", PASSWORD)
        .args([
            "-u",
            USER,
            "--relay",
            relay,
            "--domain",
            DOMAIN,
            "--timer-t1-ms",
            "50",
        ])
        .timeout(Duration::from_secs(15));
    cmd
}

/// The client's output.
pub struct Run {
    /// Exit status code.
    pub code: Option<i32>,
    /// stdout (the data).
    pub stdout: String,
    /// stderr (status lines).
    pub stderr: String,
}

impl Run {
    /// Runs the command to the end.
    pub fn of(cmd: &mut assert_cmd::Command) -> Run {
        let out = cmd.output().unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    /// Panics with everything when the exit code is not `code`.
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit status\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// The client run as a process the test talks to: stdin written on demand, stdout and
/// stderr collected as they come, signals sent by its pid.
pub struct Interactive {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
}

impl Interactive {
    /// Starts the client with the test account and `args`.
    pub fn spawn(relay: &str, home: &Path, args: &[&str]) -> Interactive {
        let mut child = Command::new(assert_cmd::cargo::cargo_bin("sip-client"))
            .env_clear()
            .env("HOME", home)
            .env("SIP_CLIENT_PASSWORD", PASSWORD)
            .args([
                "-u",
                USER,
                "--relay",
                relay,
                "--domain",
                DOMAIN,
                "--timer-t1-ms",
                "50",
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().unwrap(), out.clone());
        collect(child.stderr.take().unwrap(), err.clone());
        let stdin = child.stdin.take();
        Interactive {
            child,
            stdin,
            out,
            err,
        }
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_stderr(&self, needle: &str) {
        let err = self.err.clone();
        wait_for(
            Duration::from_secs(8),
            &format!("{needle:?} on stderr"),
            || err.lock().unwrap().contains(needle),
        );
    }

    /// Waits until stdout contains `needle`.
    pub fn wait_stdout(&self, needle: &str) {
        let out = self.out.clone();
        wait_for(
            Duration::from_secs(8),
            &format!("{needle:?} on stdout"),
            || out.lock().unwrap().contains(needle),
        );
    }

    /// Writes to the client's stdin.
    pub fn write(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Sends a signal (`INT`, `TERM`) to the client, by its pid.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the client to exit; its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut status = None;
        let child = &mut self.child;
        wait_for(Duration::from_secs(10), "the client to exit", || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap().code()
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
