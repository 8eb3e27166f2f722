//! The relay under test: its configuration, written as TOML, and relayd run as a process
//! with its log (stderr) in a file beside the configuration.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::billing::export;
use super::ports::free_port;
use super::process::Guard;
use super::sip::options_ping;
use super::sipp::Transport;
use super::{read_text, wait_until, Credentials, ALICE, AS1, BOB, CAROL, REALM, STEP};

/// The relayd binary under test.
pub fn relayd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_relayd")
}

/// `relayd --config CONFIG` for a one-shot subcommand (`billing …`, `check-config`), with
/// `RELAYD_CONFIG` and `RUST_LOG` removed from its environment and its run bounded by
/// [`STEP`].
pub fn relayd_cmd(config: &Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new(relayd_bin());
    cmd.arg("--config")
        .arg(config)
        .env_remove("RELAYD_CONFIG")
        .env_remove("RUST_LOG")
        .timeout(STEP);
    cmd
}

/// The URI of an application server on 127.0.0.1:`port` reached over `transport`, as the
/// configuration names it and the records carry it.
pub fn server_uri(port: u16, transport: Transport) -> String {
    transport.loopback_uri(port)
}

/// One static application server of a test configuration (`[[servers]]`).
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// Its URI (`sip:127.0.0.1:PORT[;transport=tcp]`).
    pub uri: String,
    /// The services it delivers.
    pub services: Vec<String>,
    /// The application-server account that speaks for it (may charge for its sessions).
    pub account: Option<String>,
}

impl ServerSpec {
    /// A server on 127.0.0.1:`port` over `transport`, delivering `services`.
    pub fn new(port: u16, transport: Transport, services: &[&str]) -> ServerSpec {
        ServerSpec {
            uri: server_uri(port, transport),
            services: services.iter().map(|s| s.to_string()).collect(),
            account: None,
        }
    }

    /// A server on 127.0.0.1:`port` over UDP, delivering `services`.
    pub fn udp(port: u16, services: &[&str]) -> ServerSpec {
        ServerSpec::new(port, Transport::Udp, services)
    }

    /// The same, spoken for by application-server account `name`.
    pub fn account(mut self, name: &str) -> ServerSpec {
        self.account = Some(name.to_string());
        self
    }
}

/// The configuration of a test relay: listening on UDP and TCP, realm [`REALM`], no health
/// probes, one tariff. Built from [`RelayConfig::default`] (nothing configured) or
/// [`RelayConfig::standard`] (a few services and subscribers).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// (name, strategy) of each `[[services]]`.
    services: Vec<(String, String)>,
    servers: Vec<ServerSpec>,
    /// (name, password, services) of each `[[users]]`.
    users: Vec<(String, String, Vec<String>)>,
    /// (name, password) of each `[[server_accounts]]`.
    accounts: Vec<(String, String)>,
    inquiry_timeout_ms: u64,
    failure_threshold: u32,
    max_failures: u32,
    max_charge: Option<i64>,
    probe_interval_secs: u32,
    t1_ms: u64,
    dual_stack: bool,
    /// More keys of `[storage]` (backend, url, node…), one per line.
    storage: String,
    extra: String,
}

impl Default for RelayConfig {
    /// No service, server, subscriber or account; inquiries time out after 5 s; servers are
    /// never taken out (`failure_threshold` 100); three failed digest answers lock a user out.
    fn default() -> Self {
        RelayConfig {
            services: Vec::new(),
            servers: Vec::new(),
            users: Vec::new(),
            accounts: Vec::new(),
            inquiry_timeout_ms: 5000,
            failure_threshold: 100,
            max_failures: 3,
            max_charge: None,
            probe_interval_secs: 0,
            t1_ms: 500,
            dual_stack: false,
            storage: String::new(),
            extra: String::new(),
        }
    }
}

impl RelayConfig {
    /// Services echo, clock and news (strategy `first`); subscribers [`ALICE`] (echo,
    /// clock), [`BOB`] (clock only) and [`CAROL`] (echo); account [`AS1`]. No server.
    pub fn standard() -> RelayConfig {
        RelayConfig::default()
            .service("echo", "first")
            .service("clock", "first")
            .service("news", "first")
            .user(ALICE, &["echo", "clock"])
            .user(BOB, &["clock"])
            .user(CAROL, &["echo"])
            .account(AS1)
    }

    /// A service and its selection strategy (`first`, `all`…).
    pub fn service(mut self, name: &str, strategy: &str) -> Self {
        self.services.push((name.into(), strategy.into()));
        self
    }

    /// A static application server.
    pub fn server(mut self, server: ServerSpec) -> Self {
        self.servers.push(server);
        self
    }

    /// A subscriber (plan "basic") of `services`.
    pub fn user(mut self, (name, password): Credentials<'_>, services: &[&str]) -> Self {
        let services = services.iter().map(|s| s.to_string()).collect();
        self.users.push((name.into(), password.into(), services));
        self
    }

    /// An application-server account (any service).
    pub fn account(mut self, (name, password): Credentials<'_>) -> Self {
        self.accounts.push((name.into(), password.into()));
        self
    }

    /// `[session] inquiry_timeout_ms`: how long a server may stay silent to an inquiry.
    pub fn inquiry_timeout_ms(mut self, ms: u64) -> Self {
        self.inquiry_timeout_ms = ms;
        self
    }

    /// `[directory] failure_threshold`.
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// `[auth] max_failures`: failed digest answers before a lockout.
    pub fn max_failures(mut self, n: u32) -> Self {
        self.max_failures = n;
        self
    }

    /// `[session] probe_interval_secs`: in-dialog OPTIONS liveness probes (0: off).
    pub fn probe_interval_secs(mut self, secs: u32) -> Self {
        self.probe_interval_secs = secs;
        self
    }

    /// `[sip] t1_ms`: RFC 3261 T1 (timeouts are 64·T1).
    pub fn t1_ms(mut self, ms: u64) -> Self {
        self.t1_ms = ms;
        self
    }

    /// `[billing] max_charge`: the per-event charge limit.
    pub fn max_charge(mut self, limit: i64) -> Self {
        self.max_charge = Some(limit);
        self
    }

    /// Listens on [::1] too (UDP and TCP, the same port as on 127.0.0.1).
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// More keys for `[storage]`, as TOML lines (`backend = "postgres"`, `url = …`,
    /// `node = …`, `lease_secs = …`), after its `data_dir`.
    pub fn storage_toml(mut self, text: &str) -> Self {
        self.storage.push_str(text);
        self.storage.push('\n');
        self
    }

    /// More TOML appended to the configuration as it is (`[[rules]]` tables, say).
    pub fn extra_toml(mut self, text: &str) -> Self {
        self.extra.push_str(text);
        self.extra.push('\n');
        self
    }

    /// The TOML text for a relay on UDP and TCP 127.0.0.1:`port`, data in `data_dir`.
    pub fn to_toml(&self, port: u16, data_dir: &Path) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let listen = if self.dual_stack {
            format!("[\"127.0.0.1:{port}\", \"[::1]:{port}\"]")
        } else {
            format!("\"127.0.0.1:{port}\"")
        };
        let mut s = format!(
            "[listen]\nudp = {listen}\ntcp = {listen}\n\n\
             [relay]\nrealm = \"{REALM}\"\n\n\
             [storage]\ndata_dir = {data_dir:?}\n{storage}\n\
             [log]\nlevel = \"info\"\n\n\
             [directory]\nprobe_interval_secs = 3600\nfailure_threshold = {ft}\n\n\
             [auth]\nmax_failures = {mf}\nlockout_secs = 300\n\n\
             [session]\nprobe_interval_secs = {pi}\ninquiry_timeout_ms = {it}\n\
             fork_timeout_secs = 30\n\n\
             [sip]\nt1_ms = {t1}\n\n",
            ft = self.failure_threshold,
            mf = self.max_failures,
            it = self.inquiry_timeout_ms,
            pi = self.probe_interval_secs,
            t1 = self.t1_ms,
            storage = self.storage,
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
                "[[users]]\nname = {name:?}\npassword = {password:?}\nplan = \"basic\"\n\
                 services = [{}]\n\n",
                list(services)
            );
        }
        for (name, password) in &self.accounts {
            let _ = write!(
                s,
                "[[server_accounts]]\nname = {name:?}\npassword = {password:?}\n\
                 services = [\"*\"]\n\n"
            );
        }
        for server in &self.servers {
            let _ = write!(
                s,
                "[[servers]]\nuri = {:?}\nservices = [{}]\n",
                server.uri,
                list(&server.services)
            );
            if let Some(account) = &server.account {
                let _ = writeln!(s, "account = {account:?}");
            }
            s.push('\n');
        }
        s.push_str(
            "[[tariffs]]\nname = \"default\"\nsetup = 0\nrate = 6\nperiod_seconds = 60\n\
             increment = \"1/1\"\ncurrency = \"EUR\"\n",
        );
        s.push('\n');
        s.push_str(&self.extra);
        s
    }
}

/// A running relayd, its log (stderr, `info,relayd=debug`) written to a file beside its
/// configuration.
pub struct Relay {
    /// Its SIP port (UDP and TCP).
    pub port: u16,
    /// Its configuration file.
    pub config: PathBuf,
    guard: Guard,
    log: PathBuf,
}

impl Relay {
    /// Writes `config` into `dir/relayd.toml` (data in `dir/data`), starts relayd on a free
    /// port and waits until it answers OPTIONS.
    pub fn start(dir: &Path, config: &RelayConfig) -> Relay {
        let port = free_port();
        let path = dir.join("relayd.toml");
        std::fs::write(&path, config.to_toml(port, &dir.join("data"))).unwrap();
        Relay::start_with(&path, port)
    }

    /// Starts relayd on an existing configuration listening on `port` (a restart) and waits
    /// until it is ready. Each start logs to a file of its own: `relayd.log`, then
    /// `relayd-2.log`…
    pub fn start_with(config: &Path, port: u16) -> Relay {
        let dir = config.parent().unwrap_or(Path::new("."));
        let log = (1..)
            .map(|n| match n {
                1 => dir.join("relayd.log"),
                n => dir.join(format!("relayd-{n}.log")),
            })
            .find(|p| !p.exists())
            .unwrap();
        let mut cmd = Command::new(relayd_bin());
        cmd.arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "info,relayd=debug")
            .env("NO_COLOR", "1")
            .env_remove("RELAYD_CONFIG")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut relay = Relay {
            port,
            config: config.to_path_buf(),
            guard: Guard::spawn(cmd, "relayd"),
            log,
        };
        let mut exited = None;
        let ok = wait_until(STEP, || {
            exited = relay.guard.try_wait();
            exited.is_some() || options_ping(port, Transport::Udp)
        });
        if let Some(status) = exited {
            panic!("relayd exited at start ({status})\n{}", relay.log());
        }
        assert!(
            ok,
            "relayd never answered OPTIONS on {port}\n{}",
            relay.log()
        );
        relay
    }

    /// Its process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        read_text(&self.log)
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
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
            "relayd logged {needle:?} {} times, wanted {n}\n{}",
            self.count(needle),
            self.log()
        );
    }

    /// SIGKILL: the relay dies without a chance to end anything.
    pub fn kill(&mut self) {
        self.guard.kill();
    }

    /// SIGTERM, then waits up to `timeout` for the exit; its status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.guard.signal("TERM");
        match self.guard.wait_timeout(timeout) {
            Some(status) => status,
            None => panic!(
                "relayd still running {timeout:?} after SIGTERM\n{}",
                self.log()
            ),
        }
    }

    /// Its session records (`relayd billing export --records sessions`); the relay may be
    /// stopped.
    pub fn sessions(&self) -> Vec<Value> {
        export(&self.config, "sessions")
    }

    /// Its charge records (`relayd billing export --records charges`).
    pub fn charges(&self) -> Vec<Value> {
        export(&self.config, "charges")
    }
}
