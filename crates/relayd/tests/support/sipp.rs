//! sipp (Debian's `sip-tester`) as terminals (UAC) and application servers (UAS).
//!
//! Every sipp runs in the test's directory with its files named after it: `NAME.log` (what
//! the scenario's `<log>` actions wrote), `NAME.stats.csv` (its statistics every 100 ms),
//! `NAME.errors`, `NAME.messages` (every message sent and received), `NAME.out` (its
//! screen) and `NAME.stderr`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::ports::free_port;
use super::process::Guard;
use super::sip::{send_info, tcp_options_at, udp_options_at};
use super::{read_text, tail, unique, wait_until, Credentials, STEP};

/// The sipp binary; a test that needs it fails naming the Debian package when it is missing.
pub fn sipp() -> &'static Path {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("sipp"))
            .find(|p| p.is_file())
    });
    found.as_deref().unwrap_or_else(|| {
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// UDP (sipp `-t u1`).
    #[default]
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

    /// The name in a Via's sent-protocol (`SIP/2.0/UDP`).
    pub fn via_name(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }

    /// The URI parameter that makes the relay use this transport towards a server.
    pub fn uri_param(self) -> &'static str {
        match self {
            Transport::Udp => "",
            Transport::Tcp => ";transport=tcp",
        }
    }

    /// The SIP URI of 127.0.0.1:`port` reached over this transport
    /// (`sip:127.0.0.1:PORT[;transport=tcp]`).
    pub fn loopback_uri(self, port: u16) -> String {
        format!("sip:127.0.0.1:{port}{}", self.uri_param())
    }
}

/// How to run one sipp beyond its scenario: the transport, scenario keywords (`-key`), the
/// number of calls (`-m`), its local port (`-p`), a time limit (`-timeout`) and further
/// arguments. The default is UDP, no keywords, one call for a terminal and no limit for a
/// server, a free port, and [`STEP`] for a terminal and no limit for a server.
#[derive(Debug, Clone, Default)]
pub struct SippOpts {
    transport: Transport,
    keys: Vec<(String, String)>,
    calls: Option<u64>,
    port: Option<u16>,
    timeout: Option<Duration>,
    args: Vec<String>,
    host: Option<IpAddr>,
}

impl SippOpts {
    /// The default options with scenario keywords `keys` (`-key name value` each).
    pub fn keys(keys: &[(&str, &str)]) -> SippOpts {
        keys.iter()
            .fold(SippOpts::default(), |opts, (k, v)| opts.key(k, v))
    }

    /// One more scenario keyword (`-key name value`).
    pub fn key(mut self, name: &str, value: &str) -> SippOpts {
        self.keys.push((name.to_string(), value.to_string()));
        self
    }

    /// The transport (`-t u1` or `-t t1`).
    pub fn over(mut self, transport: Transport) -> SippOpts {
        self.transport = transport;
        self
    }

    /// How many calls to make (or take) before exiting (`-m`).
    pub fn calls(mut self, n: u64) -> SippOpts {
        self.calls = Some(n);
        self
    }

    /// The local port (`-p`), for a server whose port the relay's configuration names
    /// before it starts; a free one by default.
    pub fn port(mut self, port: u16) -> SippOpts {
        self.port = Some(port);
        self
    }

    /// How long the whole run may take (`-timeout`, with `-timeout_error`: reaching it is a
    /// failure).
    pub fn timeout(mut self, timeout: Duration) -> SippOpts {
        self.timeout = Some(timeout);
        self
    }

    /// The loopback address sipp binds (`-i`) and, for a terminal, where it finds the relay:
    /// 127.0.0.1 by default, `::1` for IPv6.
    pub fn on(mut self, host: IpAddr) -> SippOpts {
        self.host = Some(host);
        self
    }

    /// Further sipp arguments (`-r 10`, `-d 1000`…).
    pub fn args(mut self, args: &[&str]) -> SippOpts {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// The sipp arguments these options stand for.
    fn to_args(&self) -> Vec<String> {
        let mut args = vec!["-t".to_string(), self.transport.sipp_flag().to_string()];
        if let Some(n) = self.calls {
            args.extend(["-m".to_string(), n.to_string()]);
        }
        if let Some(timeout) = self.timeout {
            args.extend([
                "-timeout".to_string(),
                format!("{}s", timeout.as_secs()),
                "-timeout_error".to_string(),
            ]);
        }
        for (k, v) in &self.keys {
            args.extend(["-key".to_string(), k.clone(), v.clone()]);
        }
        args.extend(self.args.iter().cloned());
        args
    }
}

/// Scenario keywords alone: `&[("token", "e1")]` stands for `SippOpts::keys(&[("token", "e1")])`.
impl<const N: usize> From<&[(&str, &str); N]> for SippOpts {
    fn from(keys: &[(&str, &str); N]) -> SippOpts {
        SippOpts::keys(keys)
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

    /// The cumulative counters that are not zero, as `name=value`, sorted.
    fn nonzero(&self) -> Vec<String> {
        let mut counters: Vec<String> = self
            .0
            .iter()
            .filter(|(k, v)| k.ends_with("(C)") && v.parse::<f64>().is_ok_and(|v| v != 0.0))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        counters.sort();
        counters
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

/// One sipp process, a terminal or an application server, with its files.
pub struct Sipp {
    /// A name for messages and file names ("terminal", "echo-1"…).
    pub name: String,
    /// The local port it uses.
    pub port: u16,
    /// The Call-ID of its first call (a terminal's; servers answer the relay's Call-IDs).
    pub call_id: String,
    guard: Guard,
    log: PathBuf,
    stats: PathBuf,
    errors: PathBuf,
    out: PathBuf,
    messages: PathBuf,
    /// The readiness probe's TCP connection, kept open while a TCP server runs.
    probe: Option<TcpStream>,
}

impl Sipp {
    /// An application server (UAS) running `scenario_file` in `dir` on a free port,
    /// answering OPTIONS on its own (`-aa`); returns once it answered one (over TCP, that
    /// probe's connection is kept open: a sipp server counts a connection closed under it
    /// as a failed call).
    pub fn server(dir: &Path, name: &str, scenario_file: &str, opts: SippOpts) -> Sipp {
        let transport = opts.transport;
        let host = opts.host.unwrap_or(Ipv4Addr::LOCALHOST.into());
        let mut sipp = Sipp::start(dir, name, scenario_file, None, opts.args(&["-aa"]));
        let port = sipp.port;
        let ok = wait_until(STEP, || {
            if sipp.guard.try_wait().is_some() {
                return true;
            }
            match transport {
                Transport::Udp => udp_options_at(host, port),
                Transport::Tcp => {
                    sipp.probe = tcp_options_at(SocketAddr::new(host, port));
                    sipp.probe.is_some()
                }
            }
        });
        if let Some(status) = sipp.guard.try_wait() {
            panic!("{name} exited at start ({status})\n{}", sipp.report());
        }
        assert!(
            ok,
            "{name} never answered OPTIONS on {port}\n{}",
            sipp.report()
        );
        sipp
    }

    /// A terminal (UAC) running `scenario_file` in `dir` against the relay on
    /// 127.0.0.1:`relay_port` as `user` (`-au`/`-ap`, keyword `[user]`, and `[field0]` /
    /// `[field1]` of an injection file), calling `service` (`-s`) when given; one call
    /// within [`STEP`] (`-timeout`, an error when reached) unless `opts` say otherwise.
    pub fn terminal(
        dir: &Path,
        name: &str,
        scenario_file: &str,
        relay_port: u16,
        (user, password): Credentials<'_>,
        service: Option<&str>,
        opts: SippOpts,
    ) -> Sipp {
        let csv = dir.join(format!("{name}.users.csv"));
        std::fs::write(&csv, format!("SEQUENTIAL\n{user};{password}\n")).unwrap();
        let calls = opts.calls.unwrap_or(1);
        let timeout = opts.timeout.unwrap_or(STEP);
        let csv = csv.display().to_string();
        let mut opts = opts
            .calls(calls)
            .timeout(timeout)
            .key("user", user)
            .args(&["-au", user, "-ap", password, "-inf", &csv]);
        if let Some(service) = service {
            opts = opts.args(&["-s", service]);
        }
        Sipp::start(dir, name, scenario_file, Some(relay_port), opts)
    }

    /// Starts sipp running `scenario_file` in `dir` on its local port (a free one unless
    /// `opts` name it), towards 127.0.0.1:`remote` for a UAC, and returns at once: for a
    /// server that must not be probed (with `-aa` an OPTIONS would count as a call).
    pub fn start(
        dir: &Path,
        name: &str,
        scenario_file: &str,
        remote: Option<u16>,
        opts: SippOpts,
    ) -> Sipp {
        let port = opts.port.unwrap_or_else(free_port);
        let host = opts.host.unwrap_or(Ipv4Addr::LOCALHOST.into());
        let file = |ext: &str| dir.join(format!("{name}.{ext}"));
        let (log, stats, errors, out, messages) = (
            file("log"),
            file("stats.csv"),
            file("errors"),
            file("out"),
            file("messages"),
        );
        // %u: the call number, from 1.
        let cid = format!("{name}-{}-%u@127.0.0.1", unique(""));
        let mut cmd = Command::new(sipp());
        if let Some(remote) = remote {
            cmd.arg(SocketAddr::new(host, remote).to_string());
        }
        cmd.arg("-sf")
            .arg(scenario(scenario_file))
            .args(["-i", &host.to_string(), "-p", &port.to_string()])
            .args(["-cid_str", &cid])
            .args(opts.to_args())
            .args(["-nostdin", "-trace_logs", "-log_file"])
            .arg(&log)
            .args(["-trace_stat", "-fd", "100ms", "-stf"])
            .arg(&stats)
            .args(["-trace_err", "-error_file"])
            .arg(&errors)
            .args(["-trace_msg", "-message_file"])
            .arg(&messages)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(file("stderr")).unwrap());
        Sipp {
            name: name.to_string(),
            port,
            call_id: cid.replace("%u", "1"),
            guard: Guard::spawn(cmd, &format!("sipp {name}")),
            log,
            stats,
            errors,
            out,
            messages,
            probe: None,
        }
    }

    /// The lines its scenario logged so far (trimmed, empty ones left out).
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
        let mut lines = self.log();
        wait_until(STEP, || {
            lines = self.log();
            done(&lines)
        });
        lines
    }

    /// Waits until a line it logged starts with `prefix`, for at most [`STEP`] and no longer
    /// than it runs; the rest of that line, trimmed.
    pub fn wait_logged(&mut self, prefix: &str) -> Option<String> {
        let find = |sipp: &Sipp| {
            sipp.log()
                .iter()
                .find_map(|l| l.strip_prefix(prefix).map(|rest| rest.trim().to_string()))
        };
        let mut found = None;
        wait_until(STEP, || {
            found = find(self);
            found.is_some() || self.guard.try_wait().is_some()
        });
        // A line written just before it exited.
        found.or_else(|| find(self))
    }

    /// Its scenario log file (`NAME.log`).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its error log file (`NAME.errors`).
    pub fn errors_path(&self) -> &Path {
        &self.errors
    }

    /// Its trace of every message sent and received so far.
    pub fn messages(&self) -> String {
        read_text(&self.messages)
    }

    /// The last statistics line sipp wrote, if any yet.
    pub fn stats(&self) -> Option<SippStats> {
        SippStats::parse(&read_text(&self.stats))
    }

    /// Waits until the cumulative counter `name` reaches `n` (a server never exits on its
    /// own); panics with the report on timeout.
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
            "{}: {name} stayed at {} (wanted {n})\n{}",
            self.name,
            last.count(name),
            self.report()
        );
        last
    }

    /// Its error log (unexpected messages, failed regexp checks, retransmission limits).
    pub fn errors(&self) -> String {
        read_text(&self.errors)
    }

    /// Its log, counters, errors and the end of its screen, for failure messages.
    pub fn report(&self) -> String {
        let name = &self.name;
        let mut s = String::new();
        let _ = writeln!(s, "--- {name} log:\n{}", self.log().join("\n"));
        let counters = self.stats().map(|s| s.nonzero()).unwrap_or_default();
        let _ = writeln!(s, "--- {name} counters: {}", counters.join(" "));
        let errors = self.errors();
        if !errors.trim().is_empty() {
            let _ = writeln!(s, "--- {name} errors:\n{}", tail(&errors, 20));
        }
        let screen = tail(&read_text(&self.out), 40);
        let _ = writeln!(s, "--- {name} screen (end):\n{screen}");
        s
    }

    /// Waits for it to exit (a terminal, or a server with a number of calls); panics with
    /// the report on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_timeout(timeout) {
            Some(status) => status,
            None => panic!(
                "{} still running after {timeout:?}\n{}",
                self.name,
                self.report()
            ),
        }
    }

    /// Waits up to `timeout` for it to exit; its status, `None` while it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.guard.wait_timeout(timeout)
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        self.guard.try_wait().is_some()
    }

    /// Kills it now.
    pub fn kill(&mut self) {
        self.guard.kill();
    }

    /// Sends this terminal (over UDP) the INFO that ends its hold (terminal_hold.xml): a
    /// go signal from the test, addressed by its first call's Call-ID.
    pub fn signal_hang_up(&self) {
        send_info(self.port, &self.call_id);
    }
}
