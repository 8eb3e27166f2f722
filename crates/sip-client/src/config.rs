//! Command line, environment and configuration file, merged into [`Settings`].
//!
//! Precedence: a command-line flag, then its environment variable, then the file
//! (`--config FILE`, else `~/.config/sip-client/config.toml` when it exists), then the
//! default. The password is never required on the command line: `SIP_CLIENT_PASSWORD`,
//! `--password-file` or the file's `password` key keep it out of `ps` output; `--password`
//! works but warns. Errors name the flag, or the file and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use sip_core::resolve::{NaptrSpec, SrvSpec, StaticDns};
use sip_core::uri::{Scheme, Uri};
use sip_core::Transport;

/// Text after the options in `--help`: examples, exit codes, files.
const AFTER_HELP: &str = "\
Examples:
  export SIP_CLIENT_PASSWORD=secret
  sip-client -u alice --relay sip:relay.example.com register --once
  echo hi | sip-client -u alice --relay sip:127.0.0.1:5060 --domain relay.test call echo
  echo hi | sip-client -u alice --relay 'sip:[::1]:5060' --domain relay.test call echo
  sip-client -u alice --relay sip:relay.test call video ';quality=hd'
  sip-client call clock --no-data --then 'after 2s change echo; after 2s transfer clock; after 1s bye'
  sip-client --json call echo < input.bin > output.bin 2> events.jsonl

In a terminal, a line starting with ~ is a command: ~c SERVICE (change), ~t SERVICE
(transfer), ~s (status), ~. (hang up), ~? (help), ~~ (a literal ~); `@N` after the letter
picks one session (~. @2). Ctrl-C hangs up cleanly.

Exit status:
  0  done (hung up by either side)
  1  other error
  2  usage or configuration error
  3  refused by the relay (the SIP status is in the message)
  4  authentication failed (wrong user or password)
  5  no answer (timeout)
  6  data connection failed
  130  a second Ctrl-C: left without waiting for the hang-up

Environment: SIP_CLIENT_PASSWORD (the password), SIP_CLIENT_USER, SIP_CLIENT_RELAY,
SIP_CLIENT_DOMAIN, SIP_CLIENT_CONFIG, SIP_CLIENT_TIMER_T1_MS, RUST_LOG.
Config file (TOML; flags and environment win): user, password, relay, domain, transport,
listen, expires, timer_t1_ms, wait_after_eof, answer_timeout, the DNS server
[dns] server = \"IP:PORT\", and static DNS records [dns] a = { \"name\" = [\"ip\"] }, [[dns.srv]] name/priority/weight/port/target,
[[dns.naptr]] domain/order/preference/service/replacement. See crates/sip-client/README.md.";

/// `sip-client`: request services of a SIP service relay from a terminal.
#[derive(Debug, Parser)]
#[command(
    name = "sip-client",
    version,
    about = "Request services of a SIP service relay and exchange their application data",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Options shared by every command.
    #[command(flatten)]
    pub common: CommonArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every command.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Configuration file [default: ~/.config/sip-client/config.toml when it exists]
    #[arg(long, global = true, env = "SIP_CLIENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Account user name
    #[arg(short, long, global = true, env = "SIP_CLIENT_USER")]
    pub user: Option<String>,
    /// Password (visible in `ps`: prefer SIP_CLIENT_PASSWORD, --password-file or the config file)
    #[arg(long, global = true, value_name = "PASSWORD")]
    pub password: Option<String>,
    /// Read the password from the first line of FILE
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// The relay: a SIP URI (sip:relay.example.com, sip:127.0.0.1:5060;transport=tcp,
    /// sip:[::1]:5060 for IPv6); a domain name is resolved per RFC 3263 (NAPTR, SRV, A/AAAA)
    #[arg(
        short,
        long,
        global = true,
        env = "SIP_CLIENT_RELAY",
        value_name = "URI"
    )]
    pub relay: Option<String>,
    /// The relay's domain and digest realm (REGISTER sip:DOMAIN, INVITE sip:SERVICE@DOMAIN)
    /// [default: the relay URI's host]
    #[arg(long, global = true, env = "SIP_CLIENT_DOMAIN")]
    pub domain: Option<String>,
    /// SIP transport [default: the relay URI's transport= parameter, else udp; tls for a
    /// sips: relay]
    #[arg(long, global = true, value_enum)]
    pub transport: Option<TransportArg>,
    /// Trusted CA certificates (PEM) to verify the relay's TLS certificate (a sips: relay or
    /// --transport tls) and the data gateway's (TCP/TLS in the SDP answer) with; the
    /// certificate must name the relay URI's host (RFC 5922 §7.1)
    #[arg(long, global = true, env = "SIP_CLIENT_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The DNS server (IP:PORT) to find a relay known by name with: NAPTR, SRV, A/AAAA
    /// (RFC 3263 §4); a relay that does not answer gives way to the next SRV target (§4.3)
    /// [file: dns.server; default: /etc/resolv.conf's servers]
    #[arg(long, global = true, value_name = "SERVER:PORT")]
    pub dns: Option<String>,
    /// Local address to bind, IP or IP:PORT ([::1]:5070 for IPv6), of the relay's address
    /// family [default: the address that routes to the relay, port 0]
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Registration lifetime asked for, in seconds [default: 3600]
    #[arg(long, global = true, value_name = "SECS")]
    pub expires: Option<u32>,
    /// Machine-readable events, one JSON object per line, on stderr (or --events-file);
    /// stdout stays the data pipe
    #[arg(long, global = true)]
    pub json: bool,
    /// Write JSON events to FILE (human status lines stay on stderr)
    #[arg(long, global = true, value_name = "FILE")]
    pub events_file: Option<PathBuf>,
    /// SIP timer T1 in milliseconds (RFC 3261 §17; default 500): Timers A, B, E, F derive from it
    #[arg(long, global = true, env = "SIP_CLIENT_TIMER_T1_MS", value_name = "MS")]
    pub timer_t1_ms: Option<u64>,
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// A SIP transport named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// UDP (RFC 3261 §18), with retransmissions.
    Udp,
    /// TCP (RFC 3261 §18), framed by Content-Length.
    Tcp,
    /// TLS over TCP (RFC 3261 §26.2; needs --ca).
    Tls,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Transport {
        match t {
            TransportArg::Udp => Transport::Udp,
            TransportArg::Tcp => Transport::Tcp,
            TransportArg::Tls => Transport::Tls,
        }
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register with the relay and keep the binding refreshed until Ctrl-C (then unregister)
    Register(RegisterArgs),
    /// Request a service and pipe stdin to it and its output to stdout
    #[command(after_help = CALL_HELP)]
    Call(CallArgs),
}

const CALL_HELP: &str = "\
--then SCRIPT: steps separated by `;`, each `[after DURATION] ACTION`, run in order from the
moment the first session is established (DURATION: 500ms, 2s, 1m):
  change [@N] SERVICE[;p=v…]   re-INVITE with P-Preferred-Service (claim 5)
  transfer [@N] SERVICE        REFER to sip:SERVICE@DOMAIN (claim 6)
  bye [@N]                     hang up
  status [@N]                  print the sessions' state
  wait DURATION                pause
  sessions N                   wait until N sessions are established (forks, claim 7)
Without @N an action applies to every live session; a step ends when its SIP exchange does.
While a script runs, stdin EOF does not hang up; once it is done, the usual rules apply.

Sessions end when either side sends BYE, or when the data connection ends: after stdin EOF
the client half-closes and waits --wait-after-eof for the server to finish, then sends BYE.
Several 2xx from a forked request each become a session (numbered 1, 2, … in order); their
output is labelled `[N] ` per line once there is more than one (always with --label), or
written to --output-dir/session-N.out. Every session receives all of stdin.";

/// `sip-client register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Register once and exit (the binding stays until it expires)
    #[arg(long)]
    pub once: bool,
}

/// `sip-client call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// The service, with optional parameters: echo, video;quality=hd
    pub service: String,
    /// More service parameters: ';param=value' …
    #[arg(value_name = ";PARAM=VALUE", allow_hyphen_values = true)]
    pub params: Vec<String>,
    /// Do not register before calling
    #[arg(long)]
    pub no_register: bool,
    /// Hold the session without a data connection (for scripts)
    #[arg(long)]
    pub no_data: bool,
    /// Actions to run on the live session (see below)
    #[arg(long, value_name = "SCRIPT")]
    pub then: Option<String>,
    /// Write each session's output to DIR/session-N.out instead of stdout
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Label every output line with its session, `[N] `, even with one session
    #[arg(long)]
    pub label: bool,
    /// After stdin EOF, how long to wait for the server to finish before hanging up [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait_after_eof: Option<Duration>,
    /// How long to wait for a final answer before cancelling [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub answer_timeout: Option<Duration>,
    /// Read ~ escapes from stdin even when it is not a terminal
    #[arg(long, conflicts_with = "no_escapes")]
    pub escapes: bool,
    /// Never read ~ escapes, even from a terminal
    #[arg(long)]
    pub no_escapes: bool,
}

/// Parses `500ms`, `2s`, `1m`, `1h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (like 500ms, 2s, 1m)"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ms, s, m, h)"
            ))
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// The configuration file (TOML). Every key is optional; unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Account user name.
    pub user: Option<String>,
    /// Account password (keep the file private: mode 600).
    pub password: Option<String>,
    /// The relay URI.
    pub relay: Option<String>,
    /// The relay's domain and realm.
    pub domain: Option<String>,
    /// `udp`, `tcp` or `tls`.
    pub transport: Option<String>,
    /// Trusted CA certificates (PEM), relative to the config file's directory.
    pub ca: Option<PathBuf>,
    /// Local address, IP or IP:PORT (IPv6 in brackets with a port: `[::1]:5070`).
    pub listen: Option<String>,
    /// Registration lifetime, seconds.
    pub expires: Option<u32>,
    /// Timer T1, milliseconds.
    pub timer_t1_ms: Option<u64>,
    /// After stdin EOF, how long to wait for the server (`5s`).
    pub wait_after_eof: Option<String>,
    /// How long to wait for a final answer (`60s`).
    pub answer_timeout: Option<String>,
    /// Static DNS records, used instead of the system resolver for the names they cover.
    #[serde(default)]
    pub dns: DnsConfig,
}

/// Static DNS records (`[dns]`): for a relay domain with no DNS of its own, and for tests.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// The DNS server to ask, `IP:PORT` (`127.0.0.1:5353`).
    pub server: Option<String>,
    /// `name = ["192.0.2.1", …]`: A/AAAA records.
    #[serde(default)]
    pub a: BTreeMap<String, Vec<IpAddr>>,
    /// `[[dns.srv]]` records.
    #[serde(default)]
    pub srv: Vec<SrvEntry>,
    /// `[[dns.naptr]]` records.
    #[serde(default)]
    pub naptr: Vec<NaptrEntry>,
}

/// One SRV record (RFC 2782).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrvEntry {
    /// `_sip._udp.relay.test`.
    pub name: String,
    /// Lower first.
    #[serde(default)]
    pub priority: u16,
    /// Higher first among equal priorities.
    #[serde(default)]
    pub weight: u16,
    /// Port.
    pub port: u16,
    /// Target host.
    pub target: String,
}

/// One NAPTR record (RFC 3403, RFC 3263 §4.1).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NaptrEntry {
    /// The domain, `relay.test`.
    pub domain: String,
    /// Lower first.
    #[serde(default)]
    pub order: u16,
    /// Lower first among equal orders.
    #[serde(default)]
    pub preference: u16,
    /// `SIP+D2U`, `SIP+D2T` or `SIPS+D2T`.
    pub service: String,
    /// The SRV name, `_sip._udp.relay.test`.
    pub replacement: String,
}

/// Everything a command needs, merged from flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Account user name.
    pub user: String,
    /// Account password.
    pub password: String,
    /// The relay's domain (Request-URI host, From/To host).
    pub domain: String,
    /// The relay URI to resolve, read by sip-core's parser (rsip 0.4 cannot read an IPv6
    /// reference such as `sip:[::1]:5060`).
    pub relay: Uri,
    /// The transport asked for explicitly, if any.
    pub transport: Option<Transport>,
    /// The TLS settings (trusted CAs, loaded) when `--ca` is given.
    pub tls: Option<sip_core::tls::TlsSetup>,
    /// The local address to bind, if given.
    pub listen: Option<SocketAddr>,
    /// Registration lifetime asked for.
    pub expires: u32,
    /// Timer T1.
    pub t1: Duration,
    /// After stdin EOF, how long to wait for the server before hanging up.
    pub wait_after_eof: Duration,
    /// How long to wait for a final answer to the INVITE.
    pub answer_timeout: Duration,
    /// Static DNS records, when the file has any.
    pub dns: Option<StaticDns>,
    /// The DNS server to ask (`--dns`, `[dns] server`), else the system's.
    pub dns_server: Option<SocketAddr>,
}

/// A configuration problem, naming where it comes from.
#[derive(Debug)]
pub struct ConfigError {
    /// Where: `--relay`, `SIP_CLIENT_PASSWORD`, `/path/config.toml: relay`…
    pub source: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(source: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        source: source.into(),
        message: message.into(),
    }
}

/// The default configuration file: `$XDG_CONFIG_HOME/sip-client/config.toml`, else
/// `$HOME/.config/sip-client/config.toml`.
pub fn default_config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(xdg) = env("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("sip-client/config.toml"));
    }
    env("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".config/sip-client/config.toml"))
}

/// Reads and parses a configuration file; errors name the file and the key.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(path.display().to_string(), format!("cannot read: {e}")))?;
    parse_file(&text).map_err(|(key, message)| {
        let at = if key.is_empty() || key == "." {
            path.display().to_string()
        } else {
            format!("{}: {key}", path.display())
        };
        err(at, message)
    })
}

/// Parses a configuration file's text; an error gives the key path and the message.
pub fn parse_file(text: &str) -> Result<FileConfig, (String, String)> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        (key, inner.message().trim().to_string())
    })
}

/// Whether a file can be read by others than its owner (Unix permission bits).
#[cfg(unix)]
fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o077 != 0)
        .unwrap_or(false)
}

#[cfg(not(unix))]
fn readable_by_others(_path: &Path) -> bool {
    false
}

impl Settings {
    /// Merges flags, environment (through `env`), file and defaults. Warnings (a password
    /// on the command line, a password in a file others can read) go to `warn`.
    pub fn load(
        args: &CommonArgs,
        call: Option<&CallArgs>,
        env: &dyn Fn(&str) -> Option<String>,
        warn: &mut dyn FnMut(String),
    ) -> Result<Settings, ConfigError> {
        let (file, file_path) = match &args.config {
            Some(path) => (read_file(path)?, Some(path.clone())),
            None => match default_config_path(env) {
                Some(path) if path.exists() => (read_file(&path)?, Some(path)),
                _ => (FileConfig::default(), None),
            },
        };
        let fsrc = |key: &str| match &file_path {
            Some(p) => format!("{}: {key}", p.display()),
            None => key.to_string(),
        };

        let user = args
            .user
            .clone()
            .map(|u| (u, "--user".to_string()))
            .or_else(|| file.user.clone().map(|u| (u, fsrc("user"))))
            .ok_or_else(|| {
                err(
                    "account",
                    "no user name: give --user, SIP_CLIENT_USER or `user` in the config file",
                )
            })?;
        check_user(&user.0).map_err(|m| err(user.1.clone(), m))?;
        let user = user.0;

        let password = if let Some(p) = &args.password {
            warn("a password given with --password is visible to other users in `ps`; prefer SIP_CLIENT_PASSWORD or --password-file".into());
            p.clone()
        } else if let Some(path) = &args.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                err(
                    format!("--password-file {}", path.display()),
                    format!("cannot read: {e}"),
                )
            })?;
            text.lines().next().unwrap_or_default().to_string()
        } else if let Some(p) = env("SIP_CLIENT_PASSWORD") {
            p
        } else if let Some(p) = &file.password {
            if let Some(path) = &file_path {
                if readable_by_others(path) {
                    warn(format!(
                        "{} holds a password and can be read by other users: chmod 600 it",
                        path.display()
                    ));
                }
            }
            p.clone()
        } else {
            return Err(err(
                "account",
                "no password: set SIP_CLIENT_PASSWORD, give --password-file, or put `password` in the config file",
            ));
        };

        let (relay_text, relay_src) = args
            .relay
            .clone()
            .map(|r| (r, "--relay".to_string()))
            .or_else(|| file.relay.clone().map(|r| (r, fsrc("relay"))))
            .ok_or_else(|| {
                err(
                    "relay",
                    "no relay: give --relay URI, SIP_CLIENT_RELAY or `relay` in the config file",
                )
            })?;
        let relay = parse_relay(&relay_text).map_err(|m| err(relay_src.clone(), m))?;

        let domain = match args
            .domain
            .clone()
            .map(|d| (d, "--domain".to_string()))
            .or_else(|| file.domain.clone().map(|d| (d, fsrc("domain"))))
        {
            Some((d, src)) => {
                check_domain(&d).map_err(|m| err(src, m))?;
                d
            }
            // The host as written: an IPv6 address keeps its brackets (`[::1]`), so that
            // `sip:<user>@<domain>` stays a valid URI.
            None => relay.host_text().unwrap_or_default().to_string(),
        };

        let transport = match (args.transport, &file.transport) {
            (Some(t), _) => Some(Transport::from(t)),
            (None, Some(t)) => Some(match Transport::from_name(t) {
                Some(t) => t,
                _ => {
                    return Err(err(
                        fsrc("transport"),
                        format!("{t:?}: expected \"udp\", \"tcp\" or \"tls\""),
                    ))
                }
            }),
            (None, None) => None,
        };

        let ca = match (&args.ca, &file.ca) {
            (Some(p), _) => Some((p.clone(), "--ca".to_string())),
            (None, Some(p)) => Some((
                file_path
                    .as_deref()
                    .and_then(Path::parent)
                    .map(|d| d.join(p))
                    .unwrap_or_else(|| p.clone()),
                fsrc("ca"),
            )),
            (None, None) => None,
        };
        let secure = relay.is_sips()
            || transport == Some(Transport::Tls)
            || relay
                .transport()
                .is_some_and(|t| t.eq_ignore_ascii_case("tls"));
        if relay.is_sips() && matches!(transport, Some(Transport::Udp | Transport::Tcp)) {
            return Err(err(
                relay_src.clone(),
                "a sips: relay is reached over TLS only (RFC 3261 §26.2.2): leave out \
                 --transport or say tls",
            ));
        }
        let tls =
            match ca {
                Some((path, src)) => Some(
                    sip_core::tls::TlsSetup::load(
                        &sip_core::tls::TlsFiles {
                            ca: Some(path),
                            ..Default::default()
                        },
                        sip_core::tls::ClientAuth::None,
                    )
                    .map_err(|e| err(src, e.to_string()))?,
                ),
                None if secure => return Err(err(
                    relay_src.clone(),
                    "TLS to the relay needs the CA that signed its certificate: give --ca FILE \
                     (or `ca` in the config file)",
                )),
                None => None,
            };

        let listen = match (&args.listen, &file.listen) {
            (Some(l), _) => Some((
                parse_listen(l).map_err(|m| err("--listen", m))?,
                "--listen".to_string(),
            )),
            (None, Some(l)) => Some((
                parse_listen(l).map_err(|m| err(fsrc("listen"), m))?,
                fsrc("listen"),
            )),
            (None, None) => None,
        };
        // A relay given by IP address: the socket must be of its family (a relay known by
        // name is checked once resolved).
        if let (Some((addr, src)), Some(relay_ip)) = (&listen, relay_ip(&relay)) {
            if !reaches(addr.ip(), relay_ip) {
                return Err(err(
                    src.clone(),
                    format!(
                        "{addr} cannot reach the relay at {relay}: give an address of the relay's \
                         family ({})",
                        if relay_ip.is_ipv6() {
                            "IPv6, such as [::1] or [::]"
                        } else {
                            "IPv4, such as 127.0.0.1"
                        }
                    ),
                ));
            }
        }
        let listen = listen.map(|(addr, _)| addr);

        let expires = args.expires.or(file.expires).unwrap_or(3600);
        let t1_ms = args.timer_t1_ms.or(file.timer_t1_ms).unwrap_or(500);
        if !(1..=60_000).contains(&t1_ms) {
            return Err(err(
                "--timer-t1-ms",
                format!("{t1_ms}: expected 1 to 60000"),
            ));
        }
        let file_duration =
            |key: &str, v: &Option<String>| -> Result<Option<Duration>, ConfigError> {
                v.as_deref()
                    .map(|s| parse_duration(s).map_err(|m| err(fsrc(key), m)))
                    .transpose()
            };
        let wait_after_eof = match call.and_then(|c| c.wait_after_eof) {
            Some(d) => d,
            None => file_duration("wait_after_eof", &file.wait_after_eof)?
                .unwrap_or(Duration::from_secs(5)),
        };
        let answer_timeout = match call.and_then(|c| c.answer_timeout) {
            Some(d) => d,
            None => file_duration("answer_timeout", &file.answer_timeout)?
                .unwrap_or(Duration::from_secs(60)),
        };
        let dns = build_dns(&file.dns).map_err(|m| err(fsrc("dns"), m))?;
        let dns_server = match (&args.dns, &file.dns.server) {
            (Some(t), _) => Some(parse_dns_server(t).map_err(|m| err("--dns", m))?),
            (None, Some(t)) => Some(parse_dns_server(t).map_err(|m| err(fsrc("dns.server"), m))?),
            (None, None) => None,
        };

        Ok(Settings {
            user,
            password,
            domain,
            relay,
            transport,
            tls,
            listen,
            expires,
            t1: Duration::from_millis(t1_ms),
            wait_after_eof,
            answer_timeout,
            dns,
            dns_server,
        })
    }
}

fn check_user(user: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("empty user name".into());
    }
    if let Some(c) = user
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.!~*'+&=$,?/".contains(*c)))
    {
        return Err(format!("user name {user:?} contains {c:?}"));
    }
    Ok(())
}

fn check_domain(domain: &str) -> Result<(), String> {
    let ok = !domain.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err(format!("{domain:?} is not a domain name or address"))
    }
}

/// Reads a DNS server address, `IP:PORT` (`[::1]:53` for IPv6) or a bare IP (port 53).
pub fn parse_dns_server(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(addr);
    }
    t.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{text:?} is not a DNS server address (IP:PORT)"))
}

/// Reads the relay URI with sip-core's parser (IPv6 references included); a bare
/// `host[:port]` gets `sip:` in front, and a bare IPv6 address (`::1`) its brackets too.
pub fn parse_relay(text: &str) -> Result<Uri, String> {
    let t = text.trim();
    let has_scheme = t
        .split_once(':')
        .is_some_and(|(s, _)| s.eq_ignore_ascii_case("sip") || s.eq_ignore_ascii_case("sips"));
    let with_scheme = if has_scheme {
        t.to_string()
    } else if let Ok(std::net::IpAddr::V6(v6)) = t.parse::<std::net::IpAddr>() {
        format!("sip:[{v6}]")
    } else if t.contains("://")
        || (!t.starts_with('[')
            && t.split_once(':')
                .is_some_and(|(_, rest)| !rest.starts_with(|c: char| c.is_ascii_digit())))
    {
        return Err(format!(
            "{t:?} is not a SIP URI (sip:host[:port][;transport=tcp], sip:[::1]:5060)"
        ));
    } else {
        format!("sip:{t}")
    };
    let uri = Uri::parse(&with_scheme).map_err(|e| format!("{t:?} is not a SIP URI ({e})"))?;
    if !matches!(uri.scheme(), Scheme::Sip | Scheme::Sips) {
        return Err(format!("{t:?} is not a sip: URI"));
    }
    if uri.host_text().is_none_or(str::is_empty) {
        return Err(format!("{t:?} has no host"));
    }
    Ok(uri)
}

/// The relay's IP address when its URI names one rather than a domain.
fn relay_ip(relay: &Uri) -> Option<IpAddr> {
    match relay.host()? {
        sip_core::uri::Host::V4(ip) => Some(IpAddr::V4(ip)),
        sip_core::uri::Host::V6(ip) => Some(IpAddr::V6(ip)),
        sip_core::uri::Host::Domain(_) => None,
    }
}

/// Whether a socket bound on `local` can reach `remote`: the same family, or the IPv6
/// wildcard (dual-stack) for an IPv4 peer.
pub fn reaches(local: IpAddr, remote: IpAddr) -> bool {
    match (local, remote) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => true,
        (IpAddr::V6(l), IpAddr::V4(_)) => l.is_unspecified(),
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    }
}

/// Reads `IP` or `IP:PORT`; an IPv6 address bare (`::1`), in brackets (`[::1]`) or with a
/// port (`[::1]:5070`).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = t
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(t);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| format!("{t:?}: expected IP or IP:PORT"))
}

fn build_dns(dns: &DnsConfig) -> Result<Option<StaticDns>, String> {
    if dns.a.is_empty() && dns.srv.is_empty() && dns.naptr.is_empty() {
        return Ok(None);
    }
    let mut out = StaticDns::new();
    for (name, addrs) in &dns.a {
        out = out.with_addrs(name, addrs.iter().copied());
    }
    let mut srv: BTreeMap<&str, Vec<SrvSpec>> = BTreeMap::new();
    for e in &dns.srv {
        srv.entry(e.name.as_str()).or_default().push(SrvSpec {
            priority: e.priority,
            weight: e.weight,
            port: e.port,
            target: e.target.clone(),
        });
    }
    for (name, entries) in srv {
        out = out.with_srv(name, entries);
    }
    let mut naptr: BTreeMap<&str, Vec<NaptrSpec>> = BTreeMap::new();
    for e in &dns.naptr {
        naptr.entry(e.domain.as_str()).or_default().push(NaptrSpec {
            order: e.order,
            preference: e.preference,
            service: e.service.clone(),
            replacement: e.replacement.clone(),
        });
    }
    for (domain, entries) in naptr {
        out = out.with_naptr(domain, entries).map_err(|e| e.to_string())?;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["sip-client"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load(
        c: &Cli,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> (Result<Settings, ConfigError>, Vec<String>) {
        let mut warnings = Vec::new();
        let call = match &c.command {
            Command::Call(a) => Some(a),
            _ => None,
        };
        let r = Settings::load(&c.common, call, env, &mut |w| warnings.push(w));
        (r, warnings)
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn env_password_and_flags_merge() {
        let c = cli(&[
            "-u",
            "alice",
            "--relay",
            "sip:127.0.0.1:5070",
            "--config",
            "/nonexistent/x.toml",
            "register",
        ]);
        let (r, _) = load(&c, &no_env);
        let e = r.unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.toml"), "{e}");

        let c = cli(&[
            "-u",
            "alice",
            "--relay",
            "127.0.0.1:5070",
            "register",
            "--once",
        ]);
        let env = |k: &str| (k == "SIP_CLIENT_PASSWORD").then(|| "s3cret".to_string());
        let (r, warnings) = load(&c, &env);
        let s = r.unwrap();
        assert_eq!(s.password, "s3cret");
        assert!(warnings.is_empty());
        assert_eq!(s.domain, "127.0.0.1");
        assert_eq!(s.relay.to_string(), "sip:127.0.0.1:5070");
        assert_eq!(s.t1, Duration::from_millis(500));

        let c = cli(&[
            "-u",
            "alice",
            "--password",
            "pw",
            "--relay",
            "sip:relay.test",
            "register",
        ]);
        let (r, warnings) = load(&c, &no_env);
        assert_eq!(r.unwrap().password, "pw");
        assert!(warnings[0].contains("ps"));

        let c = cli(&["-u", "alice", "--relay", "sip:relay.test", "register"]);
        let (r, _) = load(&c, &no_env);
        assert!(r.unwrap_err().message.contains("SIP_CLIENT_PASSWORD"));
    }

    #[test]
    fn the_dns_server_is_an_address_with_port_53_by_default() {
        assert_eq!(
            parse_dns_server("127.0.0.1:5353"),
            Ok("127.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(
            parse_dns_server("192.0.2.53"),
            Ok("192.0.2.53:53".parse().unwrap())
        );
        assert_eq!(
            parse_dns_server("[::1]:53"),
            Ok("[::1]:53".parse().unwrap())
        );
        assert_eq!(parse_dns_server("::1"), Ok("[::1]:53".parse().unwrap()));
        assert!(parse_dns_server("dns.example:53")
            .unwrap_err()
            .contains("not a DNS server address"));
    }

    #[test]
    fn a_sips_relay_needs_a_ca_and_a_bad_ca_file_is_named() {
        let base = ["-u", "alice", "--password", "pw", "--relay"];
        let with = |relay: &str, more: &[&str]| {
            let mut args: Vec<&str> = base.to_vec();
            args.push(relay);
            args.extend_from_slice(more);
            args.push("register");
            load(&cli(&args), &no_env).0
        };
        let e = with("sips:127.0.0.1:5061", &[]).unwrap_err();
        assert_eq!(e.source, "--relay");
        assert!(e.message.contains("--ca"), "{e}");
        let e = with("sip:127.0.0.1:5061", &["--transport", "tls"]).unwrap_err();
        assert!(e.message.contains("--ca"), "{e}");
        let e = with("sips:127.0.0.1:5061", &["--transport", "udp"]).unwrap_err();
        assert!(e.message.contains("TLS only"), "{e}");
        let e = with("sips:127.0.0.1:5061", &["--ca", "/nonexistent/ca.pem"]).unwrap_err();
        assert_eq!(e.source, "--ca");
        assert!(e.message.contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        let s = with("sips:127.0.0.1:5061", &["--ca", ca_path.to_str().unwrap()]).unwrap();
        assert!(s.tls.is_some_and(|t| t.trusts_any()));
        // A key file given as the CA: named, with what is wrong.
        let key_path = dir.path().join("key.pem");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let e = with("sips:127.0.0.1:5061", &["--ca", key_path.to_str().unwrap()]).unwrap_err();
        assert!(
            e.message.contains("key.pem") && e.message.contains("no PEM certificate"),
            "{e}"
        );
    }

    #[test]
    fn file_values_and_errors_name_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "user = \"bob\"\npassword = \"pw\"\nrelay = \"sip:relay.test;transport=tcp\"\ndomain = \"relay.test\"\n\
             wait_after_eof = \"250ms\"\n[dns]\na = { \"relay.test\" = [\"127.0.0.1\"] }\n\
             [[dns.srv]]\nname = \"_sip._tcp.relay.test\"\nport = 5999\ntarget = \"relay.test\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = cli(&["--config", p, "call", "echo"]);
        let (r, _) = load(&c, &no_env);
        let s = r.unwrap();
        assert_eq!(s.user, "bob");
        assert_eq!(s.domain, "relay.test");
        assert_eq!(s.wait_after_eof, Duration::from_millis(250));
        assert!(s.dns.is_some());
        // A flag wins over the file.
        let c = cli(&[
            "--config",
            p,
            "-u",
            "carol",
            "call",
            "echo",
            "--wait-after-eof",
            "1s",
        ]);
        let s = load(&c, &no_env).0.unwrap();
        assert_eq!(
            (s.user.as_str(), s.wait_after_eof),
            ("carol", Duration::from_secs(1))
        );

        std::fs::write(
            &path,
            "user = \"bob\"\n[dns]\nsrv = [{ name = \"x\", port = \"no\", target = \"t\" }]\n",
        )
        .unwrap();
        let e = load(&cli(&["--config", p, "register"]), &no_env)
            .0
            .unwrap_err();
        assert!(e.source.ends_with("config.toml: dns.srv[0].port"), "{e}");
        std::fs::write(&path, "usr = \"bob\"\n").unwrap();
        let e = load(&cli(&["--config", p, "register"]), &no_env)
            .0
            .unwrap_err();
        assert!(e.to_string().contains("usr"), "{e}");
        std::fs::write(
            &path,
            "user = \"bob\"\npassword = \"x\"\nrelay = \"sip:r\"\nwait_after_eof = \"soon\"\n",
        )
        .unwrap();
        let e = load(&cli(&["--config", p, "call", "echo"]), &no_env)
            .0
            .unwrap_err();
        assert!(e.source.ends_with("config.toml: wait_after_eof"), "{e}");
    }

    #[test]
    fn relay_and_listen_forms() {
        assert_eq!(
            parse_relay("relay.test").unwrap().to_string(),
            "sip:relay.test"
        );
        assert_eq!(
            parse_relay("sip:10.0.0.1:5070;transport=tcp")
                .unwrap()
                .to_string()
                .to_lowercase(),
            "sip:10.0.0.1:5070;transport=tcp"
        );
        assert!(parse_relay("http://x").is_err());
        assert_eq!(
            parse_listen("127.0.0.1").unwrap().to_string(),
            "127.0.0.1:0"
        );
        assert_eq!(parse_listen("127.0.0.1:5099").unwrap().port(), 5099);
        assert!(parse_listen("here").is_err());
    }

    #[test]
    fn ipv6_relays_are_read_by_sip_core() {
        let r = parse_relay("sip:[::1]:5070").unwrap();
        assert_eq!(r.to_string(), "sip:[::1]:5070");
        assert_eq!(
            r.host(),
            Some(sip_core::uri::Host::V6(std::net::Ipv6Addr::LOCALHOST))
        );
        assert_eq!(r.port(), Some(5070));
        assert_eq!(
            parse_relay("[2001:db8::1]:5070").unwrap().to_string(),
            "sip:[2001:db8::1]:5070"
        );
        assert_eq!(parse_relay("::1").unwrap().to_string(), "sip:[::1]");
        assert_eq!(
            parse_relay("SIP:[::1];transport=tcp").unwrap().transport(),
            Some("tcp")
        );
        for bad in [
            "sip:[::1",
            "sip:[::zz]:5070",
            "[::1]:port",
            "sip:[::1]:99999",
            "tel:+1555",
        ] {
            assert!(parse_relay(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            parse_listen("[::1]:5099").unwrap(),
            "[::1]:5099".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(parse_listen("::1").unwrap().to_string(), "[::1]:0");

        // From the command line and from the file; the domain keeps its brackets.
        let env = |k: &str| (k == "SIP_CLIENT_PASSWORD").then(|| "pw".to_string());
        let c = cli(&["-u", "alice", "--relay", "sip:[::1]:5070", "register"]);
        let s = load(&c, &env).0.unwrap();
        assert_eq!(s.relay.to_string(), "sip:[::1]:5070");
        assert_eq!(s.domain, "[::1]");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "user = \"bob\"\npassword = \"pw\"\nrelay = \"sip:[2001:db8::5]:5080;transport=tcp\"\n\
             listen = \"[2001:db8::6]\"\n",
        )
        .unwrap();
        let c = cli(&["--config", path.to_str().unwrap(), "register"]);
        let s = load(&c, &no_env).0.unwrap();
        assert_eq!(s.relay.host_port_text(), Some("[2001:db8::5]:5080"));
        assert_eq!(s.domain, "[2001:db8::5]");
        assert_eq!(s.listen, Some("[2001:db8::6]:0".parse().unwrap()));
        // A socket of the other family cannot reach the relay: a configuration error.
        let c = cli(&[
            "-u",
            "alice",
            "--relay",
            "sip:[::1]:5070",
            "--listen",
            "127.0.0.1",
            "register",
        ]);
        let e = load(&c, &env).0.unwrap_err();
        assert_eq!(e.source, "--listen");
        assert!(e.message.contains("IPv6"), "{e}");
        let c = cli(&[
            "-u",
            "alice",
            "--relay",
            "sip:127.0.0.1:5070",
            "--listen",
            "[::]",
            "register",
        ]);
        assert!(load(&c, &env).0.is_ok(), "the IPv6 wildcard is dual-stack");
        std::fs::write(
            &path,
            "user = \"bob\"\npassword = \"pw\"\nrelay = \"sip:[::1\"\n",
        )
        .unwrap();
        let c = cli(&["--config", path.to_str().unwrap(), "register"]);
        let e = load(&c, &no_env).0.unwrap_err();
        assert!(e.source.ends_with("config.toml: relay"), "{e}");
    }

    #[test]
    fn help_lists_exit_codes() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "authentication failed",
            "no answer",
            "data connection failed",
            "~c SERVICE",
        ] {
            assert!(help.contains(needle), "help lacks {needle:?}");
        }
    }
}
