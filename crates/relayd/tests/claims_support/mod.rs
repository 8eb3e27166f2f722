//! The harness of the cross-process claims tests: `relayd` as a process with a configuration
//! written into a temporary directory, sipp (Debian's `sip-tester`) as terminals and as
//! application servers, and the billing export read back through `relayd billing export`.
//!
//! Every wait is on a condition (a process exits, a log line appears, a socket answers) and
//! bounded; every process spawned here is killed by its own guard. When a test fails, its
//! directory (configuration, relay log, sipp logs and message traces) is kept and its path
//! printed.

use std::fmt::Write as _;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any one step may take before the test gives up on it. Generous: the machine is
/// shared with builds.
pub const STEP: Duration = Duration::from_secs(20);

/// The sipp scenarios of this crate's tests.
pub fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(name)
}

/// The sipp program; panics naming the Debian package when it is missing.
pub fn sipp() -> &'static str {
    static CHECKED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let present = *CHECKED.get_or_init(|| {
        Command::new("sipp")
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    });
    assert!(
        present,
        "sipp is not installed: these tests need the Debian package `sip-tester` \
         (apt-get install -y sip-tester)"
    );
    "sipp"
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

fn unique() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Sends an out-of-dialog OPTIONS to `port` and waits up to `patience` for any response;
/// returns its status line.
fn options_answered(port: u16, patience: Duration) -> Option<String> {
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    let local = socket.local_addr().ok()?.port();
    let id = unique();
    let request = format!(
        "OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK-ready-{id};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:test@127.0.0.1:{local}>;tag=ready-{id}\r\n\
         To: <sip:127.0.0.1:{port}>\r\n\
         Call-ID: ready-{id}@127.0.0.1\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    );
    socket
        .send_to(request.as_bytes(), ("127.0.0.1", port))
        .ok()?;
    socket.set_read_timeout(Some(patience)).ok()?;
    let mut buf = [0u8; 4096];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.lines()
        .next()
        .filter(|l| l.starts_with("SIP/2.0 "))
        .map(str::to_string)
}

fn read_text(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One sipp process: a terminal (UAC) or an application server (UAS).
pub struct Sipp {
    /// A name for messages ("terminal", "echo-1"…).
    pub name: String,
    /// The local UDP port it uses.
    pub port: u16,
    /// The Call-ID of its call (terminals only; servers answer the relay's Call-IDs).
    pub call_id: String,
    child: Guard,
    log: PathBuf,
    out: PathBuf,
    err: PathBuf,
}

impl Sipp {
    fn spawn(dir: &Path, name: &str, port: u16, args: &[String]) -> Sipp {
        let log = dir.join(format!("{name}.log"));
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.errors"));
        let call_id = format!("{name}-{}@127.0.0.1", unique());
        let mut cmd = Command::new(sipp());
        cmd.args(args)
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-cid_str", &call_id])
            .arg("-nostdin")
            .arg("-trace_logs")
            .arg("-log_file")
            .arg(&log)
            .arg("-trace_msg")
            .arg("-message_file")
            .arg(dir.join(format!("{name}.messages")))
            .arg("-trace_err")
            .arg("-error_file")
            .arg(&err)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.stderr"))).unwrap());
        let child = Guard(cmd.spawn().unwrap());
        Sipp {
            name: name.to_string(),
            port,
            call_id,
            child,
            log,
            out,
            err,
        }
    }

    /// The lines its scenario logged so far.
    pub fn log(&self) -> Vec<String> {
        read_text(&self.log)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Waits until its log satisfies `done`, for at most [`STEP`], and returns the log as it
    /// is then (the caller checks it: a test reports every finding, not just the first).
    pub fn wait_for_log(&self, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + STEP;
        loop {
            let lines = self.log();
            if done(&lines) || Instant::now() >= deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.0.kill();
                let _ = self.child.0.wait();
                panic!(
                    "{} did not finish within {STEP:?}\n{}",
                    self.name,
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its log, errors and the end of its screen output, for failure messages.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "--- {} log:\n{}", self.name, self.log().join("\n"));
        let errors = read_text(&self.err);
        if !errors.trim().is_empty() {
            let _ = writeln!(s, "--- {} errors:\n{}", self.name, tail(&errors, 15));
        }
        let _ = writeln!(
            s,
            "--- {} screen (end):\n{}",
            self.name,
            tail(&read_text(&self.out), 25)
        );
        s
    }

    /// Sends this terminal the INFO that ends its hold (terminal_hold.xml): a go signal from
    /// the test, addressed by the call's Call-ID.
    pub fn signal_hang_up(&self) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = socket.local_addr().unwrap().port();
        let request = format!(
            "INFO sip:go@127.0.0.1:{port} SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK-go-{id};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:test@127.0.0.1:{local}>;tag=go\r\n\
             To: <sip:terminal@127.0.0.1:{port}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 INFO\r\n\
             Content-Length: 0\r\n\r\n",
            port = self.port,
            id = unique(),
            call_id = self.call_id,
        );
        socket
            .send_to(request.as_bytes(), ("127.0.0.1", self.port))
            .unwrap();
    }
}

/// One test's world: a temporary directory, the relay and the sipp processes.
pub struct Scene {
    dir: Option<tempfile::TempDir>,
    relay: Option<Relayd>,
    servers: Vec<Sipp>,
}

impl Default for Scene {
    fn default() -> Self {
        Self::new()
    }
}

impl Scene {
    /// An empty scene in a fresh temporary directory.
    pub fn new() -> Scene {
        sipp();
        Scene {
            dir: Some(tempfile::tempdir().unwrap()),
            relay: None,
            servers: Vec::new(),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// Starts an application server running `scenario` on a free port, with sipp keywords
    /// `keys` (`-key name value`), and waits until it answers OPTIONS. Returns its port.
    pub fn server(&mut self, name: &str, scenario_file: &str, keys: &[(&str, &str)]) -> u16 {
        let port = free_udp_port();
        let mut args = vec![
            "-sf".to_string(),
            scenario(scenario_file).display().to_string(),
            "-aa".to_string(),
        ];
        for (k, v) in keys {
            args.extend(["-key".to_string(), k.to_string(), v.to_string()]);
        }
        let mut server = Sipp::spawn(self.dir(), name, port, &args);
        let deadline = Instant::now() + STEP;
        while options_answered(port, Duration::from_millis(200)).is_none() {
            if let Some(status) = server.child.0.try_wait().unwrap() {
                panic!("{name} exited at start ({status})\n{}", server.report());
            }
            assert!(
                Instant::now() < deadline,
                "{name} never answered OPTIONS\n{}",
                server.report()
            );
        }
        self.servers.push(server);
        port
    }

    /// The application server named `name`.
    pub fn server_named(&self, name: &str) -> &Sipp {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server {name}"))
    }

    /// Writes `config` and starts relayd; returns once it answers OPTIONS.
    pub fn start_relay(&mut self, config: &RelayConfig) {
        let port = free_udp_port();
        let data = self.dir().join("data");
        let path = self.dir().join("relayd.toml");
        std::fs::write(&path, config.to_toml(port, &data)).unwrap();
        let log = self.dir().join("relayd.log");
        let child = Command::new(env!("CARGO_BIN_EXE_relayd"))
            .arg("--config")
            .arg(&path)
            .env_remove("RELAYD_CONFIG")
            .env("RUST_LOG", "info,relayd=debug")
            .env("NO_COLOR", "1")
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut relay = Relayd {
            child: Guard(child),
            port,
            config: path,
            log,
        };
        let deadline = Instant::now() + STEP;
        loop {
            match options_answered(port, Duration::from_millis(200)) {
                Some(line) if line.starts_with("SIP/2.0 200") => break,
                _ => {}
            }
            if let Some(status) = relay.child.0.try_wait().unwrap() {
                panic!(
                    "relayd exited at start ({status}):\n{}",
                    read_text(&relay.log)
                );
            }
            assert!(
                Instant::now() < deadline,
                "relayd never answered OPTIONS:\n{}",
                read_text(&relay.log)
            );
        }
        self.relay = Some(relay);
    }

    fn relay(&self) -> &Relayd {
        self.relay.as_ref().expect("the relay is not started")
    }

    /// Starts a terminal running `scenario_file` against the relay as `user` asking for
    /// `service` (sipp `-s`), with sipp keywords `keys`; one call.
    pub fn terminal(
        &self,
        name: &str,
        scenario_file: &str,
        (user, password): (&str, &str),
        service: &str,
        keys: &[(&str, &str)],
    ) -> Sipp {
        let mut args = vec![
            format!("127.0.0.1:{}", self.relay().port),
            "-sf".to_string(),
            scenario(scenario_file).display().to_string(),
            "-m".to_string(),
            "1".to_string(),
            "-s".to_string(),
            service.to_string(),
            "-au".to_string(),
            user.to_string(),
            "-ap".to_string(),
            password.to_string(),
            "-key".to_string(),
            "user".to_string(),
            user.to_string(),
            "-timeout".to_string(),
            format!("{}s", STEP.as_secs()),
            "-timeout_error".to_string(),
        ];
        for (k, v) in keys {
            args.extend(["-key".to_string(), k.to_string(), v.to_string()]);
        }
        Sipp::spawn(self.dir(), name, free_udp_port(), &args)
    }

    /// Runs `sipp` to completion and asserts it succeeded (exit status 0: every call of the
    /// scenario went as written).
    pub fn assert_success(&self, sipp: &mut Sipp) {
        let status = sipp.wait();
        assert!(
            status.success(),
            "{} failed ({status})\n{}",
            sipp.name,
            self.report(Some(sipp))
        );
    }

    /// An out-of-dialog charge request (charge_request.xml) from `account` with `body`;
    /// returns the status line of the relay's final answer.
    pub fn charge(&self, (account, password): (&str, &str), body: &str) -> String {
        let args = vec![
            format!("127.0.0.1:{}", self.relay().port),
            "-sf".to_string(),
            scenario("charge_request.xml").display().to_string(),
            "-m".to_string(),
            "1".to_string(),
            "-au".to_string(),
            account.to_string(),
            "-ap".to_string(),
            password.to_string(),
            "-key".to_string(),
            "user".to_string(),
            account.to_string(),
            "-key".to_string(),
            "body".to_string(),
            body.to_string(),
            "-timeout".to_string(),
            format!("{}s", STEP.as_secs()),
            "-timeout_error".to_string(),
        ];
        let mut sipp = Sipp::spawn(
            self.dir(),
            &format!("charge-{}", unique()),
            free_udp_port(),
            &args,
        );
        self.assert_success(&mut sipp);
        let log = sipp.log();
        log.iter()
            .find_map(|l| l.strip_prefix("STATUS "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no status logged for charge {body}\n{}", sipp.report()))
    }

    /// The session records of the billing store (`relayd billing export --records sessions`).
    pub fn session_records(&self) -> Vec<Value> {
        self.export("sessions")
    }

    /// The charge records of the billing store (`relayd billing export --records charges`).
    pub fn charge_records(&self) -> Vec<Value> {
        self.export("charges")
    }

    fn export(&self, records: &str) -> Vec<Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_relayd"))
            .arg("--config")
            .arg(&self.relay().config)
            .args([
                "billing",
                "export",
                "--format",
                "jsonl",
                "--records",
                records,
            ])
            .env_remove("RELAYD_CONFIG")
            .current_dir(self.dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "relayd billing export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Everything worth reading when a test fails: the given sipp, every server, the relay.
    pub fn report(&self, focus: Option<&Sipp>) -> String {
        let mut s = String::new();
        if let Some(sipp) = focus {
            s.push_str(&sipp.report());
        }
        for server in &self.servers {
            let _ = writeln!(s, "--- {} log:\n{}", server.name, server.log().join("\n"));
        }
        if let Some(relay) = &self.relay {
            let _ = writeln!(
                s,
                "--- relayd log (end):\n{}",
                tail(&read_text(&relay.log), 40)
            );
        }
        s
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        // Processes first (their guards kill them), then the directory.
        self.relay.take();
        self.servers.clear();
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() {
                let kept = dir.keep();
                eprintln!("test files kept in {}", kept.display());
            }
        }
    }
}

/// The running relay.
struct Relayd {
    child: Guard,
    port: u16,
    config: PathBuf,
    log: PathBuf,
}

/// The parts of a relay configuration the claims tests vary.
#[derive(Default)]
pub struct RelayConfig {
    services: Vec<(String, String)>,
    servers: Vec<(u16, Vec<String>, Option<String>)>,
    users: Vec<(String, String, Vec<String>)>,
    accounts: Vec<(String, String)>,
    max_charge: Option<i64>,
}

impl RelayConfig {
    /// A service and its selection strategy (`first`, `all`…).
    pub fn service(mut self, name: &str, strategy: &str) -> Self {
        self.services.push((name.into(), strategy.into()));
        self
    }

    /// A static application server on 127.0.0.1:`port`, optionally spoken for by `account`.
    pub fn server(mut self, port: u16, services: &[&str], account: Option<&str>) -> Self {
        self.servers.push((
            port,
            services.iter().map(|s| s.to_string()).collect(),
            account.map(str::to_string),
        ));
        self
    }

    /// A subscriber (plan "basic").
    pub fn user(mut self, (name, password): (&str, &str), services: &[&str]) -> Self {
        self.users.push((
            name.into(),
            password.into(),
            services.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    /// An application-server account.
    pub fn account(mut self, (name, password): (&str, &str)) -> Self {
        self.accounts.push((name.into(), password.into()));
        self
    }

    /// The per-event charge limit (`[billing] max_charge`).
    pub fn max_charge(mut self, limit: i64) -> Self {
        self.max_charge = Some(limit);
        self
    }

    fn to_toml(&self, port: u16, data: &Path) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = format!(
            "[listen]\nudp = \"127.0.0.1:{port}\"\ntcp = []\n\n\
             [relay]\nrealm = \"relay.test\"\n\n\
             [storage]\ndata_dir = {data:?}\n\n\
             [directory]\nprobe_interval_secs = 3600\n\n\
             [session]\nprobe_interval_secs = 0\ninquiry_timeout_ms = 5000\nfork_timeout_secs = 30\n\n"
        );
        if let Some(limit) = self.max_charge {
            let _ = write!(s, "[billing]\nmax_charge = {limit}\n\n");
        }
        for (name, strategy) in &self.services {
            let _ = write!(
                s,
                "[[services]]\nname = {name:?}\nstrategy = {strategy:?}\n\n"
            );
        }
        for (name, password, services) in &self.users {
            let _ = write!(
                s,
                "[[users]]\nname = {name:?}\npassword = {password:?}\nplan = \"basic\"\nservices = [{}]\n\n",
                list(services)
            );
        }
        for (name, password) in &self.accounts {
            let _ = write!(
                s,
                "[[server_accounts]]\nname = {name:?}\npassword = {password:?}\nservices = [\"*\"]\n\n"
            );
        }
        for (port, services, account) in &self.servers {
            let _ = write!(
                s,
                "[[servers]]\nuri = \"sip:127.0.0.1:{port}\"\nservices = [{}]\n",
                list(services)
            );
            if let Some(account) = account {
                let _ = writeln!(s, "account = {account:?}");
            }
            s.push('\n');
        }
        s.push_str(
            "[[tariffs]]\nname = \"default\"\nsetup = 0\nrate = 6\nperiod_seconds = 60\n\
             increment = \"1/1\"\ncurrency = \"EUR\"\n",
        );
        s
    }
}
