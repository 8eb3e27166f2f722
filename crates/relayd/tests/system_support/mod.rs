//! The harness of the system tests (claim 10): the three programs — `relayd`,
//! `appsrv-agent` and `sip-client` — run as separate processes on loopback, each with its
//! own configuration file in a temporary directory, and sipp (Debian's `sip-tester`)
//! standing in for the terminal or for the application server.
//!
//! What is not particular to the three programs comes from the harness of relayd's other
//! cross-process tests (`support`): free ports, process guards, bounded waits, sipp and
//! its reports, relayd run as a process, the billing export. This module adds the system:
//! where `appsrv-agent` and `sip-client` come from, their configurations and the relay's,
//! [`System`] and [`Agent`], the `sip-client` runs, and a data gateway for sipp servers.
//!
//! # Where the binaries come from
//!
//! Cargo gives an integration test the path of its own crate's binaries only
//! (`CARGO_BIN_EXE_relayd`). `appsrv-agent` and `sip-client` are built by the same workspace
//! into the same directory, so they are looked up next to `relayd`; before the first test
//! uses them, [`programs`] runs `cargo build -p appsrv-agent -p sip-client` once (same
//! profile), which is a no-op when they are fresh (as under `cargo test --workspace`) and
//! keeps `cargo test -p relayd --test system` from running stale binaries. A build that
//! fails or takes longer than [`BUILD_TIMEOUT`] fails the tests with what cargo said.
//!
//! # Waiting and cleaning up
//!
//! Every wait polls a condition (a process exits, a metric appears, a record is exported, a
//! log line shows) against a bounded deadline, and fails with the evidence: the logs of every
//! process of the test. Every process is owned by a guard that kills it, by its own pid,
//! when dropped. When a test fails its directory is kept and its path printed.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::billing;
use crate::support::ports::free_port;
use crate::support::process::Guard;
use crate::support::relay::{relayd_cmd, Relay};
use crate::support::sipp::{Sipp, SippOpts, Transport};
use crate::support::{read_text, tail, wait_until, Credentials, TestDir, ALICE, BOB, REALM, STEP};

/// How long building `appsrv-agent` and `sip-client` may take.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// Bytes an agent delivers per charge unit in these tests.
pub const BYTES_PER_CHARGE: u64 = 1024;
/// The price of one charge unit, in minor units (not 1, so amounts differ from units).
pub const PRICE_PER_UNIT: i64 = 3;

/// The test tariff: setup 10, 60 per 60 s in 60/60 increments, EUR.
pub const TARIFF: &str = "[[tariffs]]\nname = \"system\"\nsetup = 10\nrate = 60\n\
    period_seconds = 60\nincrement = \"60/60\"\nfree_seconds = 0\ncurrency = \"EUR\"\n";

/// What [`TARIFF`] charges for a session of `duration_ms`: nothing for no time at all, else
/// the setup charge and one unit per second billed, rounded up to whole minutes.
pub fn tariff_charge(duration_ms: i64) -> i64 {
    if duration_ms <= 0 {
        return 0;
    }
    let seconds = (duration_ms + 999) / 1000;
    let billed = (seconds + 59) / 60 * 60;
    10 + billed
}

// ---------------------------------------------------------------------------------------
// JSON lines and fields.

/// The JSON objects of a JSON-lines text (lines that are not JSON are skipped: a line may
/// be half-written while it is read).
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect()
}

/// A string field of a JSON object, `""` when absent or not a string.
pub fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// An integer field of a JSON object (`-1` when absent).
pub fn int(v: &Value, key: &str) -> i64 {
    v[key].as_i64().unwrap_or(-1)
}

// ---------------------------------------------------------------------------------------
// The programs.

/// Where the three programs are.
pub struct Programs {
    /// `relayd`.
    pub relayd: PathBuf,
    /// `appsrv-agent`.
    pub agent: PathBuf,
    /// `sip-client`.
    pub client: PathBuf,
}

/// The three programs, `appsrv-agent` and `sip-client` built first if needed (see the
/// module documentation). Panics with cargo's output when they cannot be had.
pub fn programs() -> &'static Programs {
    static PROGRAMS: OnceLock<Result<Programs, String>> = OnceLock::new();
    match PROGRAMS.get_or_init(locate_programs) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn locate_programs() -> Result<Programs, String> {
    let relayd = PathBuf::from(env!("CARGO_BIN_EXE_relayd"));
    let dir = relayd
        .parent()
        .ok_or("CARGO_BIN_EXE_relayd has no directory")?
        .to_path_buf();
    let exe = |name: &str| dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let log = std::env::temp_dir().join(format!("system-tests-build-{}.log", std::process::id()));
    let out = File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&workspace)
        .args([
            "-p",
            "appsrv-agent",
            "-p",
            "sip-client",
            "--profile",
            &profile,
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut build = Guard::spawn(
        cmd,
        &format!("{cargo:?} to build appsrv-agent and sip-client"),
    );
    // Past the deadline the guard kills the build as it goes.
    let status = build.wait_timeout(BUILD_TIMEOUT);
    let output = read_text(&log);
    let _ = std::fs::remove_file(&log);
    let Some(status) = status else {
        return Err(format!(
            "building appsrv-agent and sip-client took longer than {BUILD_TIMEOUT:?}; \
             build them first: cargo build -p appsrv-agent -p sip-client"
        ));
    };
    if !status.success() {
        return Err(format!(
            "cargo build -p appsrv-agent -p sip-client --profile {profile} failed ({status}):\n{}",
            tail(&output, 40)
        ));
    }
    let programs = Programs {
        relayd,
        agent: exe("appsrv-agent"),
        client: exe("sip-client"),
    };
    for path in [&programs.agent, &programs.client] {
        if !path.exists() {
            return Err(format!(
                "{} is missing after the build: the system tests look for appsrv-agent and \
                 sip-client next to relayd ({}); build the workspace with the same profile and \
                 target directory as the tests (cargo build --workspace)",
                path.display(),
                dir.display()
            ));
        }
    }
    Ok(programs)
}

/// A static application server in the relay's configuration (a sipp server).
pub struct StaticServer {
    /// Its SIP port on 127.0.0.1.
    pub port: u16,
    /// Its transport.
    pub transport: Transport,
    /// The services it delivers.
    pub services: Vec<String>,
}

impl StaticServer {
    /// Its SIP URI, as written in the relay's configuration and in billing records.
    pub fn uri(&self) -> String {
        self.transport.loopback_uri(self.port)
    }
}

/// A running appsrv-agent.
pub struct Agent {
    /// Its account (`as1`, `as2`).
    pub account: String,
    /// Its SIP port.
    pub sip_port: u16,
    /// Its data gateway's port.
    pub data_port: u16,
    /// Its log file.
    pub log: PathBuf,
    /// The transport it talks to the relay over.
    pub transport: Transport,
    guard: Guard,
}

impl Agent {
    /// The URI the relay knows it by (the Contact it registers; `transport=` lower-case, as
    /// RFC 3261 writes it).
    pub fn uri(&self) -> String {
        match self.transport {
            Transport::Udp => format!("sip:{}@127.0.0.1:{}", self.account, self.sip_port),
            Transport::Tcp => format!(
                "sip:{}@127.0.0.1:{};transport=tcp",
                self.account, self.sip_port
            ),
        }
    }

    /// Its data gateway's address, as its SDP answers name it.
    pub fn data_addr(&self) -> String {
        format!("127.0.0.1:{}", self.data_port)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        read_text(&self.log)
    }

    /// SIGKILL: it stops answering at once, its registration left behind.
    pub fn kill(&mut self) {
        self.guard.kill();
    }
}

/// One test's world: a temporary directory, relayd, the agents, and the terminals and sipp
/// peers the test starts. Fields drop in declaration order: the agents, the relay, then the
/// directory (kept when the test failed).
pub struct System {
    /// The transport of every SIP hop.
    pub transport: Transport,
    /// The relay's SIP port (UDP and TCP).
    pub port: u16,
    /// The relay's metrics port.
    pub metrics_port: u16,
    /// The relay's configuration file.
    pub config: PathBuf,
    /// The agents, in start order.
    pub agents: Vec<Agent>,
    /// The other relays on the same database (see [`System::start_peer`]).
    pub peers: Vec<PeerRelay>,
    /// The PostgreSQL database the relays share, if they do.
    database: Option<String>,
    relay: Option<Relay>,
    extra_logs: Mutex<Vec<(String, PathBuf)>>,
    dir: TestDir,
}

impl System {
    /// Starts relayd (services echo, clock and echo-all; subscribers alice and bob;
    /// accounts as1 and as2) and `agents` appsrv-agents (as1, as2, …) registered over
    /// `transport`, each delivering echo, clock and echo-all; returns once the relay lists
    /// every agent as up.
    pub fn start(transport: Transport, agents: usize) -> System {
        System::start_with(transport, agents, &[])
    }

    /// As [`System::start`], with static servers in the relay's configuration too.
    pub fn start_with(transport: Transport, agents: usize, statics: &[StaticServer]) -> System {
        System::start_inner(transport, agents, statics, None)
    }

    /// As [`System::start`], the relay (node `relay-a`) keeping its shared state in the
    /// PostgreSQL database at `url` (`[storage] backend = "postgres"`); more relays join it
    /// with [`System::start_peer`].
    pub fn start_on_database(transport: Transport, agents: usize, url: &str) -> System {
        System::start_inner(transport, agents, &[], Some(url.to_string()))
    }

    fn start_inner(
        transport: Transport,
        agents: usize,
        statics: &[StaticServer],
        database: Option<String>,
    ) -> System {
        // appsrv-agent and sip-client are built before anything starts.
        programs();
        let dir = TestDir::new("relay-system-");
        let port = free_port();
        let metrics_port = free_port();
        let config = dir.path().join("relayd.toml");
        let mut text = relay_config(dir.path(), port, metrics_port, statics);
        if let Some(url) = &database {
            text = on_database(&text, url, "relay-a");
        }
        std::fs::write(&config, text).unwrap();
        let relay = Relay::start_with(&config, port);
        let mut system = System {
            transport,
            port,
            metrics_port,
            config,
            agents: Vec::new(),
            peers: Vec::new(),
            database,
            relay: Some(relay),
            extra_logs: Mutex::new(Vec::new()),
            dir,
        };
        let ready = wait_until(STEP, || system.metrics().is_some());
        assert!(
            ready,
            "relayd never served its metrics\n{}",
            system.report()
        );
        for i in 1..=agents {
            system.start_agent(&format!("as{i}"));
        }
        system
    }

    /// The test's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts one more agent for `account` (as1, as2) and waits until the relay lists it
    /// as up for each of its services.
    pub fn start_agent(&mut self, account: &str) {
        let sip_port = free_port();
        let data_port = free_port();
        let path = self.dir().join(format!("{account}.toml"));
        std::fs::write(
            &path,
            agent_config(self.transport, self.port, account, sip_port, data_port),
        )
        .unwrap();
        let log = self.dir().join(format!("{account}.log"));
        let mut cmd = Command::new(&programs().agent);
        cmd.arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let mut agent = Agent {
            account: account.to_string(),
            sip_port,
            data_port,
            log,
            transport: self.transport,
            guard: Guard::spawn(cmd, &format!("appsrv-agent {account}")),
        };
        let uri = agent.uri();
        let ready = wait_until(STEP, || {
            if let Some(status) = agent.guard.try_wait() {
                panic!(
                    "appsrv-agent {account} exited at start ({status}):\n{}\n{}",
                    agent.log_text(),
                    self.report()
                );
            }
            ["echo", "clock", "echo-all"]
                .iter()
                .all(|s| self.server_up(s, &uri))
        });
        self.agents.push(agent);
        assert!(
            ready,
            "the relay never listed {uri} as up for echo, clock and echo-all\n{}",
            self.report()
        );
    }

    /// Starts another relay, node `node`, on the same database as the first (see
    /// [`System::start_on_database`]), with the same services, subscribers and accounts, and
    /// its own port, metrics and billing store; returns its index in [`System::peers`].
    pub fn start_peer(&mut self, node: &str) -> usize {
        self.start_peer_with(node, |config| config)
    }

    /// As [`System::start_peer`], its configuration text passed through `edit` first.
    pub fn start_peer_with(&mut self, node: &str, edit: impl FnOnce(String) -> String) -> usize {
        let url = self
            .database
            .clone()
            .expect("start_peer needs a system started with start_on_database");
        let dir = self.dir().join(node);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let metrics_port = free_port();
        let config = dir.join("relayd.toml");
        let text = edit(on_database(
            &relay_config(&dir, port, metrics_port, &[]),
            &url,
            node,
        ));
        std::fs::write(&config, text).unwrap();
        let relay = Relay::start_with(&config, port);
        self.add_log(&format!("relayd {node}"), relay.log_path().to_path_buf());
        let peer = PeerRelay {
            port,
            metrics_port,
            config,
            relay,
        };
        let ready = wait_until(STEP, || metrics_at(peer.metrics_port).is_some());
        self.peers.push(peer);
        assert!(
            ready,
            "relayd {node} never served its metrics\n{}",
            self.report()
        );
        self.peers.len() - 1
    }

    /// The agent whose data gateway is `addr` (`127.0.0.1:port`).
    pub fn agent_by_data(&self, addr: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.data_addr() == addr)
    }

    /// The relay's SIP URI for this system's transport.
    pub fn relay_uri(&self) -> String {
        self.transport.loopback_uri(self.port)
    }

    /// The relay's metrics (Prometheus text), `None` when it does not answer.
    pub fn metrics(&self) -> Option<String> {
        metrics_at(self.metrics_port)
    }

    /// The value of one metric line of the relay whose metrics are on `metrics_port`.
    pub fn metric_at(metrics_port: u16, name: &str) -> Option<i64> {
        let metrics = metrics_at(metrics_port)?;
        metrics.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// The value of one metric line (`relayd_sessions_live`, or a name with labels).
    pub fn metric(&self, name: &str) -> Option<i64> {
        System::metric_at(self.metrics_port, name)
    }

    /// Whether the relay lists `server` as up for `service`.
    pub fn server_up(&self, service: &str, server: &str) -> bool {
        server_up_at(self.metrics_port, service, server)
    }
}

/// Whether the relay whose metrics are on `metrics_port` lists `server` as up for `service`.
pub fn server_up_at(metrics_port: u16, service: &str, server: &str) -> bool {
    System::metric_at(
        metrics_port,
        &format!("relayd_server_up{{service=\"{service}\",server=\"{server}\"}}"),
    ) == Some(1)
}

/// Whether the relay whose metrics are on `metrics_port` lists `server` for `service` at
/// all (up or down).
pub fn server_listed_at(metrics_port: u16, service: &str, server: &str) -> bool {
    System::metric_at(
        metrics_port,
        &format!("relayd_server_up{{service=\"{service}\",server=\"{server}\"}}"),
    )
    .is_some()
}

/// The metrics (Prometheus text) served on `metrics_port`, `None` when nothing answers.
fn metrics_at(metrics_port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", metrics_port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Another relay of a [`System`] on the same database.
pub struct PeerRelay {
    /// Its SIP port (UDP and TCP).
    pub port: u16,
    /// Its metrics port.
    pub metrics_port: u16,
    /// Its configuration file.
    pub config: PathBuf,
    /// The process.
    pub relay: Relay,
}

impl PeerRelay {
    /// The session records of its billing store.
    pub fn sessions(&self) -> Vec<Value> {
        billing::export(&self.config, "sessions")
    }

    /// Whether it lists `server` as up for `service`.
    pub fn server_up(&self, service: &str, server: &str) -> bool {
        server_up_at(self.metrics_port, service, server)
    }
}

/// A relay configuration's `[storage]` set to the PostgreSQL database at `url` as `node`.
fn on_database(config: &str, url: &str, node: &str) -> String {
    config.replacen(
        "[storage]\n",
        &format!("[storage]\nbackend = \"postgres\"\nurl = {url:?}\nnode = {node:?}\n"),
        1,
    )
}

impl System {
    /// A `sip-client` run as `user` against this relay over this system's transport.
    pub fn client(&self, name: &str, (user, password): Credentials<'_>) -> ClientCmd<'_> {
        ClientCmd {
            system: self,
            name: name.to_string(),
            user: user.to_string(),
            password: password.to_string(),
            args: Vec::new(),
            relay_port: None,
        }
    }

    /// A `relayd` command on this system's configuration (for `billing`, `check-config`).
    pub fn relayd_cmd(&self) -> assert_cmd::Command {
        let mut cmd = relayd_cmd(&self.config);
        cmd.current_dir(self.dir());
        cmd
    }

    /// `relayd billing export --format FORMAT --records RECORDS`, as text.
    pub fn export_text(&self, format: &str, records: &str) -> String {
        billing::export_text(&self.config, format, records)
    }

    /// The session records (time billing) of the billing store.
    pub fn sessions(&self) -> Vec<Value> {
        billing::export(&self.config, "sessions")
    }

    /// The charge records (application billing) of the billing store.
    pub fn charges(&self) -> Vec<Value> {
        billing::export(&self.config, "charges")
    }

    /// The session records of the terminal-side `call_id`, once there are `n` of them.
    pub fn wait_sessions(&self, call_id: &str, n: usize) -> Vec<Value> {
        let mut found = Vec::new();
        let done = wait_until(STEP, || {
            found = self
                .sessions()
                .into_iter()
                .filter(|r| text(r, "call_id") == call_id)
                .collect();
            found.len() >= n
        });
        assert!(
            done,
            "expected {n} session record(s) for call {call_id}, found {}: {found:#?}\n{}",
            found.len(),
            self.report()
        );
        found
    }

    /// The relay's log so far.
    pub fn relay_log(&self) -> String {
        self.relay.as_ref().map(Relay::log).unwrap_or_default()
    }

    /// Adds a file to the evidence printed by [`System::report`].
    pub fn add_log(&self, name: &str, path: PathBuf) {
        self.extra_logs
            .lock()
            .unwrap()
            .push((name.to_string(), path));
    }

    /// Everything worth reading when a test fails: the end of every log.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for (name, path) in self.extra_logs.lock().unwrap().iter() {
            let _ = writeln!(s, "--- {name}:\n{}", tail(&read_text(path), 30));
        }
        for agent in &self.agents {
            let _ = writeln!(
                s,
                "--- appsrv-agent {} (end):\n{}",
                agent.account,
                tail(&agent.log_text(), 25)
            );
        }
        let _ = writeln!(s, "--- relayd (end):\n{}", tail(&self.relay_log(), 40));
        s
    }

    /// Stops the relay with SIGTERM and waits for it (bounded); its exit status.
    pub fn stop_relay(&mut self) -> Option<ExitStatus> {
        let relay = self.relay.as_mut()?;
        Some(relay.terminate(STEP))
    }
}

/// The relay's configuration for a system test.
fn relay_config(dir: &Path, port: u16, metrics_port: u16, statics: &[StaticServer]) -> String {
    let mut s = format!(
        "[listen]\nudp = \"127.0.0.1:{port}\"\ntcp = \"127.0.0.1:{port}\"\n\n\
         [relay]\nrealm = \"{REALM}\"\n\n\
         [storage]\ndata_dir = {data:?}\n\n\
         [log]\nlevel = \"info,relayd=debug\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [registrar]\nallowed_contact_nets = [\"127.0.0.0/8\"]\n\n\
         [directory]\nprobe_interval_secs = 3600\n\n\
         [[services]]\nname = \"echo\"\nstrategy = \"first\"\n\n\
         [[services]]\nname = \"clock\"\nstrategy = \"round-robin\"\n\n\
         [[services]]\nname = \"echo-all\"\nstrategy = \"all\"\n\n\
         [[users]]\nname = \"{alice}\"\npassword = \"{alice_pw}\"\nplan = \"basic\"\n\
         services = [\"echo\", \"clock\"]\n\n\
         [[users]]\nname = \"{bob}\"\npassword = \"{bob_pw}\"\nplan = \"premium\"\n\
         services = [\"*\"]\n\n\
         [[server_accounts]]\nname = \"as1\"\npassword = \"as1-secret\"\nservices = [\"*\"]\n\n\
         [[server_accounts]]\nname = \"as2\"\npassword = \"as2-secret\"\nservices = [\"*\"]\n\n",
        data = dir.join("relayd-data"),
        alice = ALICE.0,
        alice_pw = ALICE.1,
        bob = BOB.0,
        bob_pw = BOB.1,
    );
    for server in statics {
        let services = server
            .services
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            s,
            "[[servers]]\nuri = \"{}\"\nservices = [{services}]\naccount = \"as1\"\n\n",
            server.uri()
        );
    }
    s.push_str(TARIFF);
    s
}

/// An agent's configuration: `account`'s password is `<account>-secret`.
fn agent_config(
    transport: Transport,
    relay_port: u16,
    account: &str,
    sip_port: u16,
    data_port: u16,
) -> String {
    format!(
        "[relay]\nuri = \"{relay}\"\ndomain = \"{REALM}\"\naccount = \"{account}\"\n\
         password = \"{account}-secret\"\nexpires = 120\n\n\
         [sip]\nlisten = \"127.0.0.1:{sip_port}\"\n\n\
         [data]\nlisten = \"127.0.0.1:{data_port}\"\n\n\
         [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n\n\
         [[services]]\nname = \"clock\"\nbackend = \"builtin:clock\"\n\n\
         [[services]]\nname = \"echo-all\"\nbackend = \"builtin:echo\"\n\n\
         [billing]\nbytes_per_charge = {BYTES_PER_CHARGE}\nprice_per_block = {PRICE_PER_UNIT}\n\
         currency = \"EUR\"\nretry_initial_ms = 200\n\n\
         [log]\nlevel = \"info\"\n",
        relay = transport.loopback_uri(relay_port),
    )
}

// ---------------------------------------------------------------------------------------
// sip-client.

/// A `sip-client` command being put together.
pub struct ClientCmd<'a> {
    system: &'a System,
    name: String,
    user: String,
    password: String,
    args: Vec<String>,
    relay_port: Option<u16>,
}

impl<'a> ClientCmd<'a> {
    /// Adds arguments (the subcommand and its options).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Talks to the relay on `port` (a [`PeerRelay`]'s) instead of the system's first.
    pub fn through(mut self, port: u16) -> Self {
        self.relay_port = Some(port);
        self
    }

    /// Uses another password than the account's.
    pub fn password(mut self, password: &str) -> Self {
        self.password = password.to_string();
        self
    }

    fn command(&self, files: &ClientFiles) -> Command {
        let system = self.system;
        let empty = system.dir().join("sip-client.toml");
        if !empty.exists() {
            std::fs::write(&empty, "").unwrap();
        }
        let mut cmd = Command::new(&programs().client);
        let relay = system
            .transport
            .loopback_uri(self.relay_port.unwrap_or(system.port));
        cmd.args(["-u", &self.user, "--relay", &relay, "--domain", REALM])
            .arg("--events-file")
            .arg(&files.events)
            .args(&self.args)
            .env("SIP_CLIENT_PASSWORD", &self.password)
            .env("SIP_CLIENT_CONFIG", &empty)
            .env_remove("SIP_CLIENT_USER")
            .env_remove("SIP_CLIENT_RELAY")
            .env_remove("SIP_CLIENT_DOMAIN")
            .env_remove("SIP_CLIENT_TIMER_T1_MS")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .current_dir(system.dir())
            .stdout(File::create(&files.stdout).unwrap())
            .stderr(File::create(&files.stderr).unwrap());
        cmd
    }

    /// Starts it with stdin a pipe the test writes to.
    pub fn spawn(self) -> Client<'a> {
        let files = ClientFiles::new(self.system.dir(), &self.name);
        let mut cmd = self.command(&files);
        cmd.stdin(Stdio::piped());
        let mut guard = Guard::spawn(cmd, &format!("sip-client {}", self.name));
        let stdin = guard.take_stdin();
        self.system.add_log(
            &format!("sip-client {} stderr", self.name),
            files.stderr.clone(),
        );
        Client {
            system: self.system,
            name: self.name,
            files,
            guard,
            stdin,
        }
    }

    /// Runs it to the end with `input` on stdin (then EOF).
    pub fn run(self, input: &[u8]) -> Finished {
        let mut client = self.spawn();
        client.write(input);
        client.close_stdin();
        client.finish()
    }
}

struct ClientFiles {
    stdout: PathBuf,
    stderr: PathBuf,
    events: PathBuf,
}

impl ClientFiles {
    fn new(dir: &Path, name: &str) -> ClientFiles {
        ClientFiles {
            stdout: dir.join(format!("{name}.out")),
            stderr: dir.join(format!("{name}.err")),
            events: dir.join(format!("{name}.events")),
        }
    }
}

/// A running `sip-client`.
pub struct Client<'a> {
    system: &'a System,
    name: String,
    files: ClientFiles,
    guard: Guard,
    stdin: Option<ChildStdin>,
}

impl Client<'_> {
    /// Writes to its stdin.
    pub fn write(&mut self, bytes: &[u8]) {
        if let Some(stdin) = self.stdin.as_mut() {
            // The client may have ended already (refused); a broken pipe is its business.
            let _ = stdin.write_all(bytes);
            let _ = stdin.flush();
        }
    }

    /// Closes its stdin (EOF).
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Its JSON events so far.
    pub fn events(&self) -> Vec<Value> {
        json_lines(&read_text(&self.files.events))
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> Vec<u8> {
        std::fs::read(&self.files.stdout).unwrap_or_default()
    }

    /// Waits (bounded) for an event named `event` for which `also` holds; returns it.
    pub fn wait_event(&mut self, event: &str, also: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        let done = wait_until(STEP, || {
            found = self
                .events()
                .into_iter()
                .find(|e| text(e, "event") == event && also(e));
            found.is_some() || self.guard.try_wait().is_some()
        });
        match found {
            Some(e) => e,
            None => panic!(
                "sip-client {} {}: no `{event}` event\nevents: {:#?}\nstderr:\n{}\n{}",
                self.name,
                if done { "exited" } else { "timed out" },
                self.events(),
                read_text(&self.files.stderr),
                self.system.report()
            ),
        }
    }

    /// Asks it to hang up (SIGTERM, as Ctrl-C).
    pub fn hang_up(&self) {
        // It may have ended already: then there is no one to signal.
        self.guard.try_signal("TERM");
    }

    /// Waits (bounded) for it to exit and collects what it did. Its stdin stays open until
    /// then (closing it would be one more reason for it to end the session).
    pub fn finish(mut self) -> Finished {
        let Some(status) = self.guard.wait_timeout(STEP) else {
            panic!(
                "sip-client {} did not exit within {STEP:?}\nstderr:\n{}\n{}",
                self.name,
                read_text(&self.files.stderr),
                self.system.report()
            );
        };
        Finished {
            status,
            stdout: std::fs::read(&self.files.stdout).unwrap_or_default(),
            stderr: read_text(&self.files.stderr),
            events: self.events(),
        }
    }
}

/// What a finished `sip-client` did.
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its stdout (the application data).
    pub stdout: Vec<u8>,
    /// Its human status lines.
    pub stderr: String,
    /// Its JSON events.
    pub events: Vec<Value>,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "sip-client exited with {}", self.status)?;
        writeln!(f, "stdout: {:?}", String::from_utf8_lossy(&self.stdout))?;
        writeln!(f, "stderr:\n{}", self.stderr.trim_end())?;
        writeln!(f, "events:")?;
        for event in &self.events {
            writeln!(f, "  {event}")?;
        }
        Ok(())
    }
}

impl Finished {
    /// The events named `name`.
    pub fn events_named(&self, name: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| text(e, "event") == name)
            .collect()
    }

    /// The Call-ID of its (first) session.
    pub fn call_id(&self) -> String {
        self.events_named("established")
            .first()
            .map(|e| text(e, "call_id").to_string())
            .unwrap_or_else(|| panic!("no session was established: {self:#?}"))
    }

    /// Asserts it exited with `code`.
    pub fn assert_code(&self, code: i32, system: &System) {
        assert_eq!(
            self.status.code(),
            Some(code),
            "sip-client exit status\nstderr:\n{}\nevents: {:#?}\n{}",
            self.stderr,
            self.events,
            system.report()
        );
    }
}

// ---------------------------------------------------------------------------------------
// sipp in the system.

impl System {
    /// Starts sipp `name` as `user`'s terminal, running `scenario_file` (tests/scenarios)
    /// against the relay over this system's transport and asking for `service`; its log
    /// and errors join [`System::report`].
    pub fn sipp_terminal(
        &self,
        name: &str,
        scenario_file: &str,
        user: Credentials<'_>,
        service: &str,
        opts: SippOpts,
    ) -> Sipp {
        let sipp = Sipp::terminal(
            self.dir(),
            name,
            scenario_file,
            self.port,
            user,
            Some(service),
            opts.over(self.transport),
        );
        self.watch(&sipp);
        sipp
    }

    /// Starts sipp `name` as an application server running `scenario_file` over this
    /// system's transport (on the port `opts` name, the one the relay's configuration
    /// knows) and returns at once: an OPTIONS probe would count as one of its calls, so the
    /// test waits for its port to be taken. Its log and errors join [`System::report`].
    pub fn sipp_server(&self, name: &str, scenario_file: &str, opts: SippOpts) -> Sipp {
        let sipp = Sipp::start(
            self.dir(),
            name,
            scenario_file,
            None,
            opts.over(self.transport),
        );
        self.watch(&sipp);
        sipp
    }

    fn watch(&self, sipp: &Sipp) {
        let name = &sipp.name;
        self.add_log(&format!("sipp {name} log"), sipp.log_path().to_path_buf());
        self.add_log(
            &format!("sipp {name} errors"),
            sipp.errors_path().to_path_buf(),
        );
    }

    /// Waits (bounded, and no longer than `sipp` runs) for a line `sipp` logged starting
    /// with `prefix`; returns the rest of it.
    pub fn wait_log(&self, sipp: &mut Sipp, prefix: &str) -> String {
        sipp.wait_logged(prefix).unwrap_or_else(|| {
            panic!(
                "sipp {} never logged `{prefix}`\n{}\n{}",
                sipp.name,
                evidence(sipp),
                self.report()
            )
        })
    }

    /// Waits (bounded) for `sipp` to exit and asserts it succeeded (every step of its
    /// scenario went as written).
    pub fn assert_success(&self, sipp: &mut Sipp) {
        let status = sipp.wait_timeout(STEP).unwrap_or_else(|| {
            panic!(
                "sipp {} did not finish within {STEP:?}\n{}\n{}",
                sipp.name,
                evidence(sipp),
                self.report()
            )
        });
        assert!(
            status.success(),
            "sipp {} failed ({status})\n{}\n{}",
            sipp.name,
            evidence(sipp),
            self.report()
        );
    }
}

/// Everything `sipp` left to read: its report (log, counters, errors, screen) and the end of
/// its message trace.
pub fn evidence(sipp: &Sipp) -> String {
    format!(
        "{}--- {} messages (end):\n{}",
        sipp.report(),
        sipp.name,
        tail(&sipp.messages(), 60)
    )
}

// ---------------------------------------------------------------------------------------
// A data gateway for sipp servers, and the data connection of sipp terminals.

/// A stand-in for an application server's data gateway (`docs/protocol.md`, "Data
/// connection"): accepts one connection, checks its token line, answers `OK`, and echoes
/// every byte until the terminal closes. For sipp servers, which cannot do it themselves.
pub struct EchoGateway {
    /// Its port on 127.0.0.1.
    pub port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl EchoGateway {
    /// Listens on a free port for a connection presenting `token`.
    pub fn start(token: &str) -> EchoGateway {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let token = token.to_string();
        let log = seen.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + STEP;
            let stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => return,
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(STEP)).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                return;
            }
            let presented = line.trim_end().to_string();
            log.lock().unwrap().push(format!("token {presented}"));
            if presented != token {
                let _ = writer.write_all(b"ERR unknown token\n");
                return;
            }
            let _ = writer.write_all(b"OK\n");
            let mut buf = [0u8; 4096];
            let mut echoed = 0usize;
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if writer.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        echoed += n;
                    }
                }
            }
            log.lock().unwrap().push(format!("echoed {echoed}"));
            let _ = writer.shutdown(std::net::Shutdown::Both);
        });
        EchoGateway {
            port,
            seen,
            thread: Some(thread),
        }
    }

    /// What it saw: `token <line>`, then `echoed <bytes>` once the terminal closed.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (bounded) for the connection to end; what it saw.
    pub fn finish(mut self) -> Vec<String> {
        if let Some(thread) = self.thread.take() {
            let done = wait_until(STEP, || thread.is_finished());
            if done {
                let _ = thread.join();
            }
        }
        self.seen()
    }
}

/// A terminal's data connection (`docs/protocol.md`): connects to `addr`, sends `token`,
/// and returns the stream once the gateway said `OK` (panics with what it said otherwise).
pub fn open_data(addr: SocketAddr, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect_timeout(&addr, STEP)
        .unwrap_or_else(|e| panic!("data endpoint {addr}: {e}"));
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream.write_all(format!("{token}\n").as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(1) => answer.push(byte[0]),
            _ => break,
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "OK\n",
        "the data gateway at {addr} refused the token"
    );
    stream
}

/// Reads exactly `n` bytes from `stream` (bounded by its read timeout).
pub fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}
