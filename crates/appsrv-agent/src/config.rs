//! The agent's configuration: a TOML file (`--config`), command-line flags for the common
//! case, and embedded defaults, merged in that order of precedence (flags win).
//!
//! Errors name where the bad value came from: `FILE: key `relay.uri`: …` for the file,
//! `--relay: …` for a flag. See `examples/appsrv.toml` for every key with its default.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer};
use sip_core::tls::{ClientAuth as TlsClientAuth, TlsFile, TlsFiles, TlsSetup};
use sip_core::uri::{Host, Scheme, Uri};

use crate::backend::Backend;
use crate::preamble::PreambleFormat;

/// The command line. Every flag overrides the file's value of the same meaning.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "appsrv-agent",
    version,
    about = "Runs beside an application server: registers its services with the relay, \
             answers the relay's inquiries, and lets the terminals' application data through \
             its data gateway.",
    after_help = "Example:\n  appsrv-agent --relay sip:127.0.0.1:5060 --domain relay.test --account as1 \
                  --password-file as1.pw --service echo=builtin:echo \
                  --service chat=tcp://127.0.0.1:7000 --capacity 50\n\
                  Over IPv6 (SIP and data then listen on [::1]):\n  appsrv-agent --relay \
                  'sip:[::1]:5060' --domain relay.test --account as1 --password-file as1.pw \
                  --service echo=builtin:echo\n\n\
                  Backends: builtin:echo, builtin:clock, tcp://host:port.\n\
                  SIGTERM or Ctrl-C: live sessions are ended with BYE and the registration removed."
)]
pub struct Flags {
    /// TOML configuration file (see examples/appsrv.toml).
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The relay's SIP URI: where to register and send charges, and the only source of
    /// inquiries; an IPv6 address goes in brackets (sip:[::1]:5060) [file: relay.uri,
    /// default: sip:127.0.0.1:5060].
    #[arg(long, value_name = "URI")]
    pub relay: Option<String>,
    /// Another relay of the same service (relays sharing one database, DESIGN: several
    /// relays, one service): inquiries from it are accepted as from the relay; repeat for
    /// each [file: relay.others, default: none].
    #[arg(long = "other-relay", value_name = "URI")]
    pub other_relays: Vec<String>,
    /// The relay's domain (realm) for REGISTER, From and To [file: relay.domain, default:
    /// the relay URI's host].
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// The application-server account to register as [file: relay.account].
    #[arg(long, value_name = "NAME")]
    pub account: Option<String>,
    /// A file holding the account's password on its first line [file: relay.password_file].
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Do not register with the relay (the relay lists this server statically)
    /// [file: relay.register = false].
    #[arg(long)]
    pub no_register: bool,
    /// Registration lifetime asked for, in seconds; refreshed at half of what the relay
    /// grants [file: relay.expires, default: 120].
    #[arg(long, value_name = "SECS")]
    pub expires: Option<u32>,
    /// The DNS server (IP:PORT) to find a relay known by name with: NAPTR, SRV, A/AAAA
    /// (RFC 3263 §4); a relay that does not answer gives way to the next target (§4.3)
    /// [file: relay.dns, default: /etc/resolv.conf's servers].
    #[arg(long, value_name = "SERVER:PORT")]
    pub dns: Option<SocketAddr>,
    /// SIP address (UDP and TCP); of the relay's address family [file: sip.listen,
    /// default: 127.0.0.1:5080, or [::1]:5080 when the relay is an IPv6 address].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Host written in Contact and Via [file: sip.advertise, default: the listen IP].
    #[arg(long, value_name = "HOST")]
    pub advertise: Option<String>,
    /// Data gateway address (TCP) [file: data.listen, default: 127.0.0.1:7080, or
    /// [::1]:7080 when the relay is an IPv6 address].
    #[arg(long, value_name = "ADDR")]
    pub data_listen: Option<SocketAddr>,
    /// IP address written in the SDP answer [file: data.advertise, default: the data
    /// listen IP].
    #[arg(long, value_name = "IP")]
    pub data_advertise: Option<IpAddr>,
    /// A service and its backend, NAME=BACKEND; repeatable; replaces the backend of a
    /// service of the same name in the file [file: services].
    #[arg(long = "service", value_name = "NAME=BACKEND")]
    pub services: Vec<ServiceFlag>,
    /// Most sessions at once, all services together [file: limits.capacity, default: no
    /// limit].
    #[arg(long, value_name = "N")]
    pub capacity: Option<u32>,
    /// Seconds a session token stays valid before its first use [file:
    /// data.token_ttl_secs, default: 30].
    #[arg(long, value_name = "SECS")]
    pub token_ttl: Option<u64>,
    /// Bytes delivered per charge unit; 0 turns byte-block charging off (the application
    /// server's own charges go on) [file:
    /// billing.bytes_per_charge, default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub bytes_per_charge: Option<u64>,
    /// Price of one unit, in minor currency units [file: billing.price_per_block, default: 1].
    #[arg(long, value_name = "AMOUNT")]
    pub price_per_block: Option<u64>,
    /// Directory where charges wait until the relay confirms them [file:
    /// billing.spool_dir, default: none, kept in memory].
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Serve the application server's control API (HTTP) on this loopback address
    /// [file: control.listen, default: none, no API].
    #[arg(long, value_name = "ADDR")]
    pub control_listen: Option<SocketAddr>,
    /// A file holding the control API's bearer token on its first line [file:
    /// control.token_file].
    #[arg(long, value_name = "FILE")]
    pub control_token_file: Option<PathBuf>,
    /// Log filter, e.g. info or appsrv_agent=debug (RUST_LOG wins) [file: log.level].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format [file: log.format, default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// The agent's TLS certificate chain, PEM: presented to the relay as a TLS server (the
    /// relay's inquiries) and as a TLS client (REGISTER, charges), and by the data gateway
    /// [file: tls.certificate].
    #[arg(long, value_name = "FILE")]
    pub tls_certificate: Option<PathBuf>,
    /// The certificate's private key, PEM [file: tls.key].
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA the relay's certificate chains to, PEM [file: tls.ca].
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// SIP over TLS address [file: tls.listen, default: the sip.listen IP on port 5061, or
    /// port 0 when sip.listen's is 0].
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<SocketAddr>,
    /// Check the configuration, print a summary and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// A `--service NAME=BACKEND` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFlag {
    /// The service name.
    pub name: String,
    /// Its backend.
    pub backend: Backend,
}

impl FromStr for ServiceFlag {
    type Err = String;

    fn from_str(s: &str) -> Result<ServiceFlag, String> {
        let (name, backend) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not NAME=BACKEND"))?;
        let name = name.trim();
        if !is_token(name) {
            return Err(format!("{name:?} is not a valid service name"));
        }
        let backend = backend.parse::<Backend>().map_err(|e| e.to_string())?;
        Ok(ServiceFlag {
            name: name.to_string(),
            backend,
        })
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A password or token, kept out of `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(crate) String);

impl Secret {
    /// A secret holding `text`.
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The password itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The relay: where to register, whom to accept inquiries from, where charges go.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The relay's SIP URI (`sip:127.0.0.1:5060`, `sip:[::1]:5060`,
    /// `sip:relay.example;transport=tcp`), read by sip-core's parser (rsip 0.4 cannot read
    /// IPv6 references).
    pub uri: Uri,
    /// The relay's domain: Request-URI of REGISTER, host of From/To.
    pub domain: String,
    /// The application-server account.
    pub account: String,
    /// Its password.
    pub password: Secret,
    /// Whether to register at all.
    pub register: bool,
    /// Registration lifetime asked for, in seconds.
    pub expires: u32,
    /// The DNS server to resolve the relay's domain with, else the system's.
    pub dns: Option<SocketAddr>,
    /// The other relays of the same service (several relays on one database): any of them
    /// may send inquiries, which are accepted as the relay's (same checks: address, and the
    /// certificate with TLS). Registration and charges go to `uri`.
    pub others: Vec<Uri>,
}

impl RelayConfig {
    /// The DNS client to resolve the relay with (RFC 3263): the configured server, else
    /// the system's.
    pub fn dns_client(&self) -> sip_core::resolve::NetDns {
        match self.dns {
            Some(server) => {
                sip_core::resolve::NetDns::with_server(server, std::time::Duration::from_secs(2))
            }
            None => sip_core::resolve::NetDns::system(),
        }
    }
}

/// The SIP side of the agent.
#[derive(Debug, Clone)]
pub struct SipConfig {
    /// Address to listen on, UDP and TCP.
    pub listen: SocketAddr,
    /// Host written in Contact and Via.
    pub advertise: String,
}

/// The data gateway.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// TCP address to listen on.
    pub listen: SocketAddr,
    /// IP address written in the SDP answer.
    pub advertise: IpAddr,
    /// How long a token is valid before its first use.
    pub token_ttl: Duration,
    /// How long a terminal may take to send its token line.
    pub handshake_timeout: Duration,
    /// How long opening a TCP backend may take.
    pub backend_connect_timeout: Duration,
    /// Data connections waiting for their token line at once, from every address together
    /// (issue 14, finding 6); one more is closed at once.
    pub max_pending: usize,
    /// Data connections waiting for their token line at once from one address (IPv4, or
    /// IPv6 /64); one more is closed at once.
    pub max_pending_per_address: usize,
}

/// Default of `[data] max_pending_connections`: data connections waiting for their token
/// line at once, from every address together.
pub const DEFAULT_MAX_PENDING_CONNECTIONS: usize = 256;

/// Default of `[data] max_pending_per_address`: data connections waiting for their token
/// line at once from one address.
pub const DEFAULT_MAX_PENDING_PER_ADDRESS: usize = 16;

/// Who may use a service, by the subscriber name the relay asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Allowed subscribers; `*` allows everyone.
    pub allow: Vec<String>,
    /// Refused subscribers; wins over `allow`.
    pub deny: Vec<String>,
}

impl Policy {
    /// Whether `subscriber` may use the service.
    pub fn allows(&self, subscriber: &str) -> bool {
        let listed = |list: &[String]| list.iter().any(|n| n == "*" || n == subscriber);
        listed(&self.allow) && !self.deny.iter().any(|n| n == subscriber)
    }
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            allow: vec!["*".to_string()],
            deny: Vec::new(),
        }
    }
}

/// One service the server delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The service name, as the relay asks for it.
    pub name: String,
    /// Where its data goes.
    pub backend: Backend,
    /// Most sessions of this service at once (`None`: only the total limit applies).
    pub capacity: Option<u32>,
    /// Who may use it.
    pub policy: Policy,
    /// What its `tcp://` backend is told before the terminal's bytes.
    pub preamble: PreambleFormat,
}

/// Application billing (claim 4).
#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// Bytes delivered to the terminal per charge unit; 0 turns byte-block charging off
    /// (the application server's own charges go on).
    pub bytes_per_charge: u64,
    /// Price of one unit, in minor units.
    pub price_per_block: u64,
    /// ISO 4217 currency code.
    pub currency: String,
    /// Request-URI of the charge `MESSAGE`.
    pub charge_uri: Uri,
    /// First retry delay; doubled on each failure.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Where charges wait until the relay confirms them (none: in memory only).
    pub spool_dir: Option<PathBuf>,
    /// How long a charge the application server asks for waits for the relay's answer
    /// before it is answered as pending.
    pub confirm_wait: Duration,
}

/// The application server's control API (`docs/protocol.md`, "Control API").
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The loopback address of its HTTP listener.
    pub listen: SocketAddr,
    /// The bearer token every request must carry.
    pub token: Secret,
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A tracing filter.
    pub level: String,
    /// Text or JSON.
    pub format: LogFormat,
}

/// `[tls]`: mutual TLS with the relay (RFC 3261 §26.2, RFC 5922 §7.2), and TLS on the data
/// connection.
///
/// With it, the relay URI must be `sips:` (or `;transport=tls`); the agent listens for SIP
/// over TLS on [`AgentTls::listen`] and asks the relay for a certificate chained to `ca` that
/// names the relay's host; it registers and charges over TLS presenting its own certificate;
/// and its data gateway speaks only TLS (`TCP/TLS` in SDP). An inquiry that came any other
/// way — UDP, TCP, or TLS from a peer without such a certificate — is refused `403`
/// ([`crate::inquiry::RelaySources`]).
#[derive(Debug, Clone)]
pub struct AgentTls {
    /// The PEM files.
    pub files: TlsFiles,
    /// The loaded settings: the SIP listener requires client certificates.
    pub setup: TlsSetup,
    /// Where SIP over TLS is taken.
    pub listen: SocketAddr,
}

/// The whole, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The relay.
    pub relay: RelayConfig,
    /// The SIP side.
    pub sip: SipConfig,
    /// The data gateway.
    pub data: DataConfig,
    /// Most sessions at once, all services together.
    pub capacity: Option<u32>,
    /// The services, in configuration order.
    pub services: Vec<ServiceConfig>,
    /// Application billing.
    pub billing: BillingConfig,
    /// The control API, when served.
    pub control: Option<ControlConfig>,
    /// Logging.
    pub log: LogConfig,
    /// `[sessions]`: session timers (RFC 4028) on the relay's legs.
    pub sessions: SessionTimerPolicy,
    /// Mutual TLS with the relay, when configured.
    pub tls: Option<AgentTls>,
}

/// `[sessions]`: the session timer (RFC 4028) the agent holds each session to, so that a
/// session outlives a crashed relay by one interval at most: `session_expires_secs`
/// (default 1800) is the longest interval it grants, `min_se_secs` (default 90) the
/// shortest it accepts (`422` below). RFC 4028 §5 forbids intervals under 90 s: lower ones
/// (down to 1) are accepted for tests only.
pub type SessionTimerPolicy = sip_core::dialog::session_timer::Policy;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{}: cannot read", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or has the wrong type.
    #[error("{}: {}{message}", file.display(), key.as_deref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Parse {
        /// The file.
        file: PathBuf,
        /// The key path, when known.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or inconsistent; `origin` is `FILE: key `k`` or `--flag`.
    #[error("{origin}: {message}")]
    Invalid {
        /// Where the value came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// The file as written; every key optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    relay: RawRelay,
    sip: RawSip,
    data: RawData,
    limits: RawLimits,
    services: Vec<RawService>,
    billing: RawBilling,
    control: RawControl,
    log: RawLog,
    sessions: RawSessions,
    tls: RawTls,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    certificate: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    listen: Option<SocketAddr>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSessions {
    session_expires_secs: Option<u32>,
    min_se_secs: Option<u32>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRelay {
    uri: Option<String>,
    domain: Option<String>,
    account: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    register: Option<bool>,
    expires: Option<u32>,
    dns: Option<SocketAddr>,
    others: Option<Vec<String>>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSip {
    listen: Option<SocketAddr>,
    advertise: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawData {
    listen: Option<SocketAddr>,
    advertise: Option<IpAddr>,
    token_ttl_secs: Option<u64>,
    handshake_timeout_secs: Option<u64>,
    backend_connect_timeout_secs: Option<u64>,
    max_pending_connections: Option<u64>,
    max_pending_per_address: Option<u64>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    capacity: Option<u32>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(deserialize_with = "from_str")]
    backend: Backend,
    #[serde(default)]
    capacity: Option<u32>,
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default, deserialize_with = "opt_from_str")]
    preamble: Option<PreambleFormat>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBilling {
    bytes_per_charge: Option<u64>,
    price_per_block: Option<u64>,
    currency: Option<String>,
    charge_uri: Option<String>,
    retry_initial_ms: Option<u64>,
    retry_max_secs: Option<u64>,
    spool_dir: Option<PathBuf>,
    confirm_wait_secs: Option<u64>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawControl {
    listen: Option<SocketAddr>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

fn from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(deserializer)?;
    s.parse().map_err(de::Error::custom)
}

fn opt_from_str<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    from_str(deserializer).map(Some)
}

/// The shortest control API token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// Default relay URI.
pub const DEFAULT_RELAY: &str = "sip:127.0.0.1:5060";
/// Default SIP address.
pub const DEFAULT_SIP_LISTEN: &str = "127.0.0.1:5080";
/// Default SIP address when the relay is an IPv6 address.
pub const DEFAULT_SIP_LISTEN_V6: &str = "[::1]:5080";
/// Default data gateway address.
pub const DEFAULT_DATA_LISTEN: &str = "127.0.0.1:7080";
/// Default data gateway address when the relay is an IPv6 address.
pub const DEFAULT_DATA_LISTEN_V6: &str = "[::1]:7080";
/// Default registration lifetime asked for, in seconds.
pub const DEFAULT_EXPIRES: u32 = 120;
/// Default bytes per charge unit (1 MiB).
pub const DEFAULT_BYTES_PER_CHARGE: u64 = 1 << 20;

/// Whether `s` is a SIP token (RFC 3261 §25.1), the syntax of service and account names.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

/// Tracks where each value came from, for error messages.
struct Origins<'a> {
    file: Option<&'a Path>,
}

impl Origins<'_> {
    fn key(&self, key: &str) -> String {
        match self.file {
            Some(file) => format!("{}: key `{key}`", file.display()),
            None => format!("default `{key}`"),
        }
    }

    /// The origin of a value that a flag may have set.
    fn of(&self, flag_given: bool, flag: &str, key: &str) -> String {
        if flag_given {
            flag.to_string()
        } else {
            self.key(key)
        }
    }
}

fn invalid(origin: String, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin,
        message: message.into(),
    }
}

impl Config {
    /// Reads the file named by `--config` (if any), applies the flags and checks the result.
    pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
        let (raw, file) = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    file: path.clone(),
                    source,
                })?;
                (parse_toml(&text, path)?, Some(path.as_path()))
            }
            None => (RawConfig::default(), None),
        };
        Config::build(raw, file, flags)
    }

    /// Parses a file's text (for tests and `--check-config`) and applies the flags.
    pub fn from_toml(text: &str, file: &Path, flags: &Flags) -> Result<Config, ConfigError> {
        Config::build(parse_toml(text, file)?, Some(file), flags)
    }

    fn build(raw: RawConfig, file: Option<&Path>, flags: &Flags) -> Result<Config, ConfigError> {
        let b = Build {
            o: Origins { file },
            base_dir: file
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            flags,
        };
        let relay = b.relay(raw.relay)?;
        let billing = b.billing(raw.billing, &relay.domain)?;
        let relay_ip = relay_ip(&relay.uri);
        let sip = b.sip(raw.sip, relay_ip)?;
        let tls = b.tls(raw.tls, &relay, &sip)?;
        let sessions = b.sessions(raw.sessions)?;
        Ok(Config {
            sessions,
            tls,
            sip,
            data: b.data(raw.data, relay_ip)?,
            capacity: b.capacity(raw.limits)?,
            services: b.services(raw.services)?,
            control: b.control(raw.control)?,
            relay,
            billing,
            log: LogConfig {
                level: flags
                    .log_level
                    .clone()
                    .or(raw.log.level)
                    .unwrap_or_else(|| "info".to_string()),
                format: flags.log_format.or(raw.log.format).unwrap_or_default(),
            },
        })
    }

    /// The service named `name`, if offered.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }

    /// A readable summary, for `--check-config`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let capacity = |c: Option<u32>| c.map_or("no limit".to_string(), |c| c.to_string());
        out.push_str(&format!(
            "relay      {} (domain {}, account {}, {})\n",
            self.relay.uri,
            self.relay.domain,
            self.relay.account,
            if self.relay.register {
                format!("registers for {} s", self.relay.expires)
            } else {
                "no registration".to_string()
            }
        ));
        out.push_str(&format!(
            "sip        {} (advertised as {})\n",
            self.sip.listen, self.sip.advertise
        ));
        out.push_str(&format!(
            "data       {} (advertised as {}, tokens valid {} s, token line within {} s, \
             at most {} connections waiting for it, {} per address)\n",
            self.data.listen,
            self.data.advertise,
            self.data.token_ttl.as_secs(),
            self.data.handshake_timeout.as_secs(),
            self.data.max_pending,
            self.data.max_pending_per_address
        ));
        out.push_str(&format!("capacity   {}\n", capacity(self.capacity)));
        for s in &self.services {
            out.push_str(&format!(
                "service    {} -> {} (capacity {}, allow {:?}, deny {:?}, preamble {})\n",
                s.name,
                s.backend,
                capacity(s.capacity),
                s.policy.allow,
                s.policy.deny,
                s.preamble
            ));
        }
        if self.billing.bytes_per_charge == 0 {
            out.push_str(&format!(
                "billing    no byte-block charges; the application server's charges in {} to {}\n",
                self.billing.currency, self.billing.charge_uri
            ));
        } else {
            out.push_str(&format!(
                "billing    {} {} per {} bytes delivered, to {}\n",
                self.billing.price_per_block,
                self.billing.currency,
                self.billing.bytes_per_charge,
                self.billing.charge_uri
            ));
        }
        match &self.control {
            Some(c) => out.push_str(&format!("control    http://{} (bearer token)\n", c.listen)),
            None => out.push_str("control    off\n"),
        }
        match &self.tls {
            Some(t) => out.push_str(&format!(
                "tls        SIP on {} (inquiries only from the relay's certificate), data over TLS\n",
                t.listen
            )),
            None => out.push_str("tls        off\n"),
        }
        out
    }
}

/// Builds each section from the file's values and the flags.
struct Build<'a> {
    o: Origins<'a>,
    base_dir: PathBuf,
    flags: &'a Flags,
}

impl Build<'_> {
    /// `[tls]`: all three files, or none; required exactly when the relay URI is TLS.
    fn tls(
        &self,
        raw: RawTls,
        relay: &RelayConfig,
        sip: &SipConfig,
    ) -> Result<Option<AgentTls>, ConfigError> {
        let f = self.flags;
        let pick = |flag: &Option<PathBuf>, file: Option<PathBuf>, name: &str, key: &str| match (
            flag, file,
        ) {
            (Some(p), _) => Some((p.clone(), name.to_string())),
            (None, Some(p)) => Some((self.base_dir.join(p), self.o.key(key))),
            (None, None) => None,
        };
        let certificate = pick(
            &f.tls_certificate,
            raw.certificate,
            "--tls-certificate",
            "tls.certificate",
        );
        let key = pick(&f.tls_key, raw.key, "--tls-key", "tls.key");
        let ca = pick(&f.ca, raw.ca, "--ca", "tls.ca");
        let relay_tls = relay_is_tls(&relay.uri);
        let relay_origin = self.o.of(f.relay.is_some(), "--relay", "relay.uri");
        let any = certificate.is_some() || key.is_some() || ca.is_some();
        if !any {
            if relay_tls {
                return Err(invalid(
                    relay_origin,
                    format!(
                        "{} is a TLS URI: set tls.certificate, tls.key and tls.ca (or \
                         --tls-certificate, --tls-key, --ca) for mutual TLS with the relay",
                        relay.uri
                    ),
                ));
            }
            return Ok(None);
        }
        let (
            Some((cert_path, cert_origin)),
            Some((key_path, key_origin)),
            Some((ca_path, ca_origin)),
        ) = (certificate, key, ca)
        else {
            return Err(invalid(
                self.o.key("tls"),
                "tls.certificate, tls.key and tls.ca (--tls-certificate, --tls-key, --ca) go \
                 together: mutual TLS with the relay needs all three",
            ));
        };
        if !relay_tls {
            return Err(invalid(
                relay_origin,
                format!(
                    "{} is not a TLS URI, but [tls] is configured: use sips: (e.g. \
                     sips:127.0.0.1:5061)",
                    relay.uri
                ),
            ));
        }
        let files = TlsFiles {
            certificate: Some(cert_path),
            key: Some(key_path),
            ca: Some(ca_path),
        };
        let setup = TlsSetup::load(&files, TlsClientAuth::Required).map_err(|e| {
            let origin = match e.file(&files) {
                Some(TlsFile::Key) => key_origin.clone(),
                Some(TlsFile::Ca) => ca_origin.clone(),
                Some(TlsFile::Certificate) => cert_origin.clone(),
                None => self.o.key("tls"),
            };
            invalid(origin, e.to_string())
        })?;
        let listen = f.tls_listen.or(raw.listen).unwrap_or_else(|| {
            let port = if sip.listen.port() == 0 { 0 } else { 5061 };
            SocketAddr::new(sip.listen.ip(), port)
        });
        Ok(Some(AgentTls {
            files,
            setup,
            listen,
        }))
    }

    fn relay(&self, raw: RawRelay) -> Result<RelayConfig, ConfigError> {
        let uri_origin = self
            .o
            .of(self.flags.relay.is_some(), "--relay", "relay.uri");
        let uri_text = self
            .flags
            .relay
            .clone()
            .or(raw.uri)
            .unwrap_or_else(|| DEFAULT_RELAY.to_string());
        let uri = parse_relay_uri(&uri_text).map_err(|m| invalid(uri_origin.clone(), m))?;
        let domain = match self.flags.domain.clone().or(raw.domain) {
            Some(d) => {
                let d = d.trim().to_string();
                if !is_host(&d) {
                    return Err(invalid(
                        self.o
                            .of(self.flags.domain.is_some(), "--domain", "relay.domain"),
                        format!("{d:?} is not a domain name or address"),
                    ));
                }
                d
            }
            None => uri
                .host_port_text()
                .map(str::to_string)
                .ok_or_else(|| invalid(uri_origin, "the relay URI has no host"))?,
        };
        let account = self.flags.account.clone().or(raw.account).ok_or_else(|| {
            invalid(
                self.o.key("relay.account"),
                "no account: set relay.account in the file or --account",
            )
        })?;
        if !is_token(&account) {
            return Err(invalid(
                self.o
                    .of(self.flags.account.is_some(), "--account", "relay.account"),
                format!("{account:?} is not a valid account name"),
            ));
        }
        let password = match (&self.flags.password_file, raw.password, raw.password_file) {
            (Some(path), _, _) => read_password(path, "--password-file".to_string())?,
            (None, Some(_), Some(_)) => {
                return Err(invalid(
                    self.o.key("relay.password_file"),
                    "give either relay.password or relay.password_file, not both",
                ))
            }
            (None, Some(p), None) => {
                if p.is_empty() {
                    return Err(invalid(
                        self.o.key("relay.password"),
                        "the password is empty",
                    ));
                }
                Secret(p)
            }
            (None, None, Some(path)) => {
                read_password(&self.base_dir.join(path), self.o.key("relay.password_file"))?
            }
            (None, None, None) => {
                return Err(invalid(
                    self.o.key("relay.password"),
                    "no password: set relay.password or relay.password_file in the file, or \
                     --password-file",
                ))
            }
        };
        let register = !self.flags.no_register && raw.register.unwrap_or(true);
        let expires = self
            .flags
            .expires
            .or(raw.expires)
            .unwrap_or(DEFAULT_EXPIRES);
        if !(10..=86_400).contains(&expires) {
            return Err(invalid(
                self.o
                    .of(self.flags.expires.is_some(), "--expires", "relay.expires"),
                format!("{expires} is out of range (10 to 86400 seconds)"),
            ));
        }

        let (others, others_origin) = if self.flags.other_relays.is_empty() {
            (raw.others.unwrap_or_default(), self.o.key("relay.others"))
        } else {
            (self.flags.other_relays.clone(), "--other-relay".to_string())
        };
        let others = others
            .iter()
            .map(|text| {
                let other = parse_relay_uri(text)
                    .map_err(|m| invalid(others_origin.clone(), format!("{text:?}: {m}")))?;
                if relay_is_tls(&other) != relay_is_tls(&uri) {
                    return Err(invalid(
                        others_origin.clone(),
                        format!("{text:?}: every relay is reached alike: TLS (sips:) exactly when {uri} is"),
                    ));
                }
                Ok(other)
            })
            .collect::<Result<Vec<Uri>, ConfigError>>()?;

        Ok(RelayConfig {
            uri,
            domain,
            account,
            password,
            register,
            expires,
            dns: self.flags.dns.or(raw.dns),
            others,
        })
    }

    /// The SIP side; `relay_ip` is the relay's address when its URI names one, whose family
    /// the default listen address follows and a configured one must reach.
    fn sip(&self, raw: RawSip, relay_ip: Option<IpAddr>) -> Result<SipConfig, ConfigError> {
        let sip_listen = self
            .flags
            .listen
            .or(raw.listen)
            .unwrap_or_else(|| match relay_ip {
                Some(IpAddr::V6(_)) => default_addr(DEFAULT_SIP_LISTEN_V6),
                _ => default_addr(DEFAULT_SIP_LISTEN),
            });
        if let Some(relay) = relay_ip {
            if !can_reach(sip_listen.ip(), relay) {
                return Err(invalid(
                    self.o
                        .of(self.flags.listen.is_some(), "--listen", "sip.listen"),
                    format!(
                        "{sip_listen} cannot reach the relay at {relay}: listen on an address \
                         of the relay's family ({})",
                        match relay {
                            IpAddr::V4(_) => "IPv4, such as 127.0.0.1:5080 or 0.0.0.0:5080",
                            IpAddr::V6(_) => "IPv6, such as [::1]:5080 or [::]:5080",
                        }
                    ),
                ));
            }
        }
        let advertise_origin = self.o.of(
            self.flags.advertise.is_some(),
            "--advertise",
            "sip.advertise",
        );
        let advertise = match self.flags.advertise.clone().or(raw.advertise) {
            Some(h) if is_host(h.trim()) => h.trim().to_string(),
            Some(h) => {
                return Err(invalid(
                    advertise_origin,
                    format!("{h:?} is not a host name or address"),
                ))
            }
            None if sip_listen.ip().is_unspecified() => {
                return Err(invalid(
                    advertise_origin,
                    format!(
                        "sip.listen {sip_listen} is a wildcard address: say which address the \
                         relay should use (sip.advertise or --advertise)"
                    ),
                ))
            }
            None => sip_listen.ip().to_string(),
        };

        Ok(SipConfig {
            listen: sip_listen,
            advertise,
        })
    }

    /// The data gateway; its default address follows the family of `relay_ip` (the
    /// terminals' family is not known here: the relay's is the best guess).
    fn data(&self, raw: RawData, relay_ip: Option<IpAddr>) -> Result<DataConfig, ConfigError> {
        let data_listen = self
            .flags
            .data_listen
            .or(raw.listen)
            .unwrap_or_else(|| match relay_ip {
                Some(IpAddr::V6(_)) => default_addr(DEFAULT_DATA_LISTEN_V6),
                _ => default_addr(DEFAULT_DATA_LISTEN),
            });
        let data_advertise = match self.flags.data_advertise.or(raw.advertise) {
            Some(ip) if ip.is_unspecified() => {
                return Err(invalid(
                    self.o.of(
                        self.flags.data_advertise.is_some(),
                        "--data-advertise",
                        "data.advertise",
                    ),
                    format!("{ip} cannot be connected to"),
                ))
            }
            Some(ip) => ip,
            None if data_listen.ip().is_unspecified() => {
                return Err(invalid(
                    self.o.key("data.advertise"),
                    format!(
                        "data.listen {data_listen} is a wildcard address: say which address \
                         terminals should connect to (data.advertise or --data-advertise)"
                    ),
                ))
            }
            None => data_listen.ip(),
        };
        let token_ttl = self.flags.token_ttl.or(raw.token_ttl_secs).unwrap_or(30);
        if !(1..=3600).contains(&token_ttl) {
            return Err(invalid(
                self.o.of(
                    self.flags.token_ttl.is_some(),
                    "--token-ttl",
                    "data.token_ttl_secs",
                ),
                format!("{token_ttl} is out of range (1 to 3600 seconds)"),
            ));
        }
        let handshake = raw.handshake_timeout_secs.unwrap_or(5);
        if !(1..=600).contains(&handshake) {
            return Err(invalid(
                self.o.key("data.handshake_timeout_secs"),
                format!("{handshake} is out of range (1 to 600 seconds)"),
            ));
        }
        let connect = raw.backend_connect_timeout_secs.unwrap_or(5);
        if !(1..=600).contains(&connect) {
            return Err(invalid(
                self.o.key("data.backend_connect_timeout_secs"),
                format!("{connect} is out of range (1 to 600 seconds)"),
            ));
        }

        let cap = |key: &str, value: Option<u64>, default: usize| {
            let value = value.unwrap_or(default as u64);
            if (1..=100_000).contains(&value) {
                Ok(value as usize)
            } else {
                Err(invalid(
                    self.o.key(key),
                    format!("{value} is out of range (1 to 100000)"),
                ))
            }
        };
        let max_pending = cap(
            "data.max_pending_connections",
            raw.max_pending_connections,
            DEFAULT_MAX_PENDING_CONNECTIONS,
        )?;
        let max_pending_per_address = cap(
            "data.max_pending_per_address",
            raw.max_pending_per_address,
            DEFAULT_MAX_PENDING_PER_ADDRESS,
        )?;

        Ok(DataConfig {
            listen: data_listen,
            advertise: data_advertise,
            token_ttl: Duration::from_secs(token_ttl),
            handshake_timeout: Duration::from_secs(handshake),
            backend_connect_timeout: Duration::from_secs(connect),
            max_pending,
            max_pending_per_address,
        })
    }

    fn sessions(&self, raw: RawSessions) -> Result<SessionTimerPolicy, ConfigError> {
        let d = SessionTimerPolicy::default();
        let min_se = raw.min_se_secs.unwrap_or(d.min_se);
        let expires = raw.session_expires_secs.unwrap_or(d.session_expires);
        if !(1..=86_400).contains(&min_se) {
            return Err(invalid(
                self.o.key("sessions.min_se_secs"),
                "must be between 1 and 86400 seconds",
            ));
        }
        if !(min_se..=86_400).contains(&expires) {
            return Err(invalid(
                self.o.key("sessions.session_expires_secs"),
                "must be between min_se_secs and 86400 seconds",
            ));
        }
        Ok(SessionTimerPolicy {
            session_expires: expires,
            min_se,
        })
    }

    fn capacity(&self, raw: RawLimits) -> Result<Option<u32>, ConfigError> {
        let capacity = self.flags.capacity.or(raw.capacity);
        if capacity == Some(0) {
            return Err(invalid(
                self.o.of(
                    self.flags.capacity.is_some(),
                    "--capacity",
                    "limits.capacity",
                ),
                "capacity must be at least 1 (leave it out for no limit)",
            ));
        }
        Ok(capacity)
    }

    fn services(&self, raw: Vec<RawService>) -> Result<Vec<ServiceConfig>, ConfigError> {
        let mut services = Vec::new();
        let mut seen = HashSet::new();
        for (i, s) in raw.into_iter().enumerate() {
            let key = |k: &str| self.o.key(&format!("services[{i}].{k}"));
            if !is_token(&s.name) {
                return Err(invalid(
                    key("name"),
                    format!("{:?} is not a valid service name", s.name),
                ));
            }
            if !seen.insert(s.name.clone()) {
                return Err(invalid(
                    key("name"),
                    format!("service {:?} is listed twice", s.name),
                ));
            }
            if s.capacity == Some(0) {
                return Err(invalid(key("capacity"), "capacity must be at least 1"));
            }
            let allow = s.allow.unwrap_or_else(|| vec!["*".to_string()]);
            for (field, list) in [("allow", &allow), ("deny", &s.deny)] {
                if let Some(bad) = list.iter().find(|n| *n != "*" && !is_token(n)) {
                    return Err(invalid(
                        key(field),
                        format!("{bad:?} is not a subscriber name"),
                    ));
                }
            }
            services.push(ServiceConfig {
                name: s.name,
                backend: s.backend,
                capacity: s.capacity,
                policy: Policy {
                    allow,
                    deny: s.deny,
                },
                preamble: s.preamble.unwrap_or_default(),
            });
        }
        for flag in &self.flags.services {
            match services.iter_mut().find(|s| s.name == flag.name) {
                Some(existing) => existing.backend = flag.backend.clone(),
                None => services.push(ServiceConfig {
                    name: flag.name.clone(),
                    backend: flag.backend.clone(),
                    capacity: None,
                    policy: Policy::default(),
                    preamble: PreambleFormat::None,
                }),
            }
        }
        for (i, s) in services.iter().enumerate() {
            if s.preamble != PreambleFormat::None && !matches!(s.backend, Backend::Tcp { .. }) {
                return Err(invalid(
                    self.o.key(&format!("services[{i}].preamble")),
                    format!(
                        "a preamble is for tcp:// backends; {} is {}",
                        s.name, s.backend
                    ),
                ));
            }
        }
        if services.is_empty() {
            return Err(invalid(
                self.o.key("services"),
                "no services: add [[services]] to the file or --service NAME=BACKEND",
            ));
        }

        Ok(services)
    }

    fn billing(&self, raw: RawBilling, domain: &str) -> Result<BillingConfig, ConfigError> {
        let bytes_per_charge = self
            .flags
            .bytes_per_charge
            .or(raw.bytes_per_charge)
            .unwrap_or(DEFAULT_BYTES_PER_CHARGE);
        let price_per_block = self
            .flags
            .price_per_block
            .or(raw.price_per_block)
            .unwrap_or(1);
        if bytes_per_charge > 0 && price_per_block == 0 {
            return Err(invalid(
                self.o.of(
                    self.flags.price_per_block.is_some(),
                    "--price-per-block",
                    "billing.price_per_block",
                ),
                "must be at least 1 while billing.bytes_per_charge is set (0 turns byte-block charging off)",
            ));
        }
        let currency = raw.currency.unwrap_or_else(|| "EUR".to_string());
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(invalid(
                self.o.key("billing.currency"),
                format!("{currency:?} is not an ISO 4217 code like EUR"),
            ));
        }
        let charge_uri = match raw.charge_uri {
            Some(text) => Uri::parse(&text)
                .ok()
                .filter(|u| u.scheme() == Scheme::Sip)
                .ok_or_else(|| {
                    invalid(
                        self.o.key("billing.charge_uri"),
                        format!("{text:?} is not a sip: URI"),
                    )
                })?,
            None => Uri::parse(&format!("sip:charge@{domain}")).map_err(|_| {
                invalid(
                    self.o.key("relay.domain"),
                    format!("sip:charge@{domain} is not a valid URI"),
                )
            })?,
        };
        let retry_initial = raw.retry_initial_ms.unwrap_or(1000);
        if !(10..=600_000).contains(&retry_initial) {
            return Err(invalid(
                self.o.key("billing.retry_initial_ms"),
                format!("{retry_initial} is out of range (10 to 600000 ms)"),
            ));
        }
        let retry_max = raw.retry_max_secs.unwrap_or(60);
        if !(1..=3600).contains(&retry_max) {
            return Err(invalid(
                self.o.key("billing.retry_max_secs"),
                format!("{retry_max} is out of range (1 to 3600 seconds)"),
            ));
        }
        let confirm_wait = raw.confirm_wait_secs.unwrap_or(10);
        if !(1..=600).contains(&confirm_wait) {
            return Err(invalid(
                self.o.key("billing.confirm_wait_secs"),
                format!("{confirm_wait} is out of range (1 to 600 seconds)"),
            ));
        }
        let spool_dir = match (&self.flags.spool_dir, raw.spool_dir) {
            (Some(dir), _) => Some(dir.clone()),
            (None, Some(dir)) => Some(self.base_dir.join(dir)),
            (None, None) => None,
        };

        Ok(BillingConfig {
            bytes_per_charge,
            price_per_block,
            currency,
            charge_uri,
            retry_initial: Duration::from_millis(retry_initial),
            retry_max: Duration::from_secs(retry_max),
            spool_dir,
            confirm_wait: Duration::from_secs(confirm_wait),
        })
    }

    /// The control API: served when `control.listen` (or `--control-listen`) is set, on a
    /// loopback address only, with a token of at least [`MIN_TOKEN_LEN`] characters.
    fn control(&self, raw: RawControl) -> Result<Option<ControlConfig>, ConfigError> {
        let listen_origin = self.o.of(
            self.flags.control_listen.is_some(),
            "--control-listen",
            "control.listen",
        );
        let token = match (&self.flags.control_token_file, raw.token, raw.token_file) {
            (Some(path), _, _) => Some(read_password(path, "--control-token-file".to_string())?),
            (None, Some(_), Some(_)) => {
                return Err(invalid(
                    self.o.key("control.token_file"),
                    "give either control.token or control.token_file, not both",
                ))
            }
            (None, Some(t), None) => Some(Secret(t)),
            (None, None, Some(path)) => Some(read_password(
                &self.base_dir.join(path),
                self.o.key("control.token_file"),
            )?),
            (None, None, None) => None,
        };
        let token_origin = if self.flags.control_token_file.is_some() {
            "--control-token-file".to_string()
        } else {
            self.o.key("control.token")
        };
        let Some(listen) = self.flags.control_listen.or(raw.listen) else {
            if token.is_some() {
                return Err(invalid(
                    listen_origin,
                    "a control token is set but no control.listen address to serve the API on",
                ));
            }
            return Ok(None);
        };
        if !listen.ip().is_loopback() {
            return Err(invalid(
                listen_origin,
                format!(
                    "{listen} is not a loopback address: the control API is for the application \
                     server on this host (127.0.0.1 or [::1])"
                ),
            ));
        }
        let Some(token) = token else {
            return Err(invalid(
                token_origin,
                "the control API needs a token: set control.token or control.token_file, or \
                 --control-token-file",
            ));
        };
        let t = token.expose();
        if t.chars().count() < MIN_TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                token_origin,
                format!(
                    "the token must be at least {MIN_TOKEN_LEN} printable characters without \
                     spaces"
                ),
            ));
        }
        Ok(Some(ControlConfig { listen, token }))
    }
}

fn default_addr(text: &str) -> SocketAddr {
    text.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn parse_toml(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        ConfigError::Parse {
            file: file.to_path_buf(),
            key: (path != ".").then_some(path),
            message: inner.message().trim().to_string(),
        }
    })
}

fn read_password(path: &Path, origin: String) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if first.is_empty() {
        return Err(invalid(
            origin,
            format!("{}: the first line is empty", path.display()),
        ));
    }
    Ok(Secret(first.to_string()))
}

/// Whether `s` can stand as the host (optionally with a port) of a SIP URI.
fn is_host(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

/// Checks the relay URI, read by sip-core's parser (IPv6 references included): `sip:` only
/// (the agent has no TLS), UDP or TCP, no user part needed.
fn parse_relay_uri(text: &str) -> Result<Uri, String> {
    let uri = Uri::parse(text.trim()).map_err(|e| format!("{text:?} is not a SIP URI ({e})"))?;
    match uri.scheme() {
        Scheme::Sip => {}
        Scheme::Sips => {}
        _ => return Err(format!("{text:?} is not a sip: URI")),
    }
    if let Some(t) = uri.transport() {
        let ok = if uri.scheme() == Scheme::Sips {
            // RFC 3261 §26.2.2: sips asks TLS; transport=tcp on it is TLS over TCP.
            t.eq_ignore_ascii_case("tcp") || t.eq_ignore_ascii_case("tls")
        } else {
            t.eq_ignore_ascii_case("udp")
                || t.eq_ignore_ascii_case("tcp")
                || t.eq_ignore_ascii_case("tls")
        };
        if !ok {
            return Err(format!(
                "{text:?}: transport {t} is not supported (udp, tcp or tls; sips: tcp or tls)"
            ));
        }
    }
    match uri.host() {
        Some(Host::Domain("")) | None => Err(format!("{text:?} has no host")),
        Some(_) => Ok(uri),
    }
}

/// Whether a relay URI asks for TLS: `sips:`, or `;transport=tls` (RFC 3261 §26.2.2,
/// RFC 5630).
pub fn relay_is_tls(uri: &Uri) -> bool {
    uri.scheme() == Scheme::Sips
        || uri
            .transport()
            .is_some_and(|t| t.eq_ignore_ascii_case("tls"))
}

/// `host:port` as it goes into a Via or a URI: an IPv6 address in brackets
/// (`[::1]:5080`), a domain name or IPv4 address as it is. A host already in brackets is
/// kept so.
pub fn host_port(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

/// The host of a `host[:port]` text (a Via's sent-by), an IPv6 reference with its
/// brackets: `[::1]:5080` gives `[::1]`, `127.0.0.1:5080` gives `127.0.0.1`.
pub fn host_of(host_port: &str) -> &str {
    if host_port.starts_with('[') {
        return match host_port.find(']') {
            Some(end) => &host_port[..=end],
            None => host_port,
        };
    }
    match host_port.rsplit_once(':') {
        // A bare IPv6 address (several colons) has no port to strip.
        Some((host, _)) if !host.contains(':') => host,
        _ => host_port,
    }
}

/// The relay's IP address when its URI names one (not a domain name).
pub fn relay_ip(uri: &Uri) -> Option<IpAddr> {
    match uri.host()? {
        Host::V4(ip) => Some(IpAddr::V4(ip)),
        Host::V6(ip) => Some(IpAddr::V6(ip)),
        Host::Domain(_) => None,
    }
}

/// Whether a socket bound on `local` can exchange datagrams with `remote`: the same family,
/// or the IPv6 wildcard (dual-stack) for an IPv4 peer.
fn can_reach(local: IpAddr, remote: IpAddr) -> bool {
    match (local, remote) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => true,
        (IpAddr::V6(l), IpAddr::V4(_)) => l.is_unspecified() || l.to_ipv4_mapped().is_some(),
        (IpAddr::V4(_), IpAddr::V6(r)) => r.to_ipv4_mapped().is_some(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use clap::Parser;

    fn flags(args: &[&str]) -> Flags {
        let mut all = vec!["appsrv-agent"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).unwrap()
    }

    const EXAMPLE: &str = include_str!("../../../examples/appsrv.toml");

    #[test]
    fn the_example_file_loads_with_its_documented_values() {
        let c = Config::from_toml(EXAMPLE, Path::new("examples/appsrv.toml"), &flags(&[])).unwrap();
        assert_eq!(c.relay.account, "as1");
        assert_eq!(c.relay.domain, "relay.test");
        assert_eq!(c.relay.uri.to_string(), "sip:127.0.0.1:5060");
        assert_eq!(c.sip.listen, "127.0.0.1:5080".parse().unwrap());
        assert_eq!(c.data.listen, "127.0.0.1:7080".parse().unwrap());
        let names: Vec<_> = c.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["echo", "clock"]);
        assert_eq!(c.service("echo").unwrap().backend, Backend::Echo);
        assert_eq!(c.service("clock").unwrap().backend, Backend::Clock);
        assert_eq!(c.billing.charge_uri.to_string(), "sip:charge@relay.test");
        // The second agent of the issue: one flag pair away.
        let second = Config::from_toml(
            EXAMPLE,
            Path::new("examples/appsrv.toml"),
            &flags(&[
                "--listen",
                "127.0.0.1:5082",
                "--data-listen",
                "127.0.0.1:7082",
            ]),
        )
        .unwrap();
        assert_eq!(second.sip.listen.port(), 5082);
        assert_eq!(second.data.listen.port(), 7082);
        assert_eq!(
            second.data.advertise,
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    /// A CA and a certificate for 127.0.0.1 in `dir`: ca.pem, agent.pem, agent-key.pem.
    fn pki(dir: &Path) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("agent.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("agent-key.pem"), key.serialize_pem()).unwrap();
    }

    #[test]
    fn tls_needs_a_sips_relay_and_all_three_files_named_on_error() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let file = dir.path().join("agent.toml");
        let svc = "[[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n";
        let base = |relay: &str, tls: &str| {
            format!(
                "[relay]\nuri = \"{relay}\"\naccount = \"as1\"\npassword = \"pw\"\n\
                 [sip]\nlisten = \"127.0.0.1:5080\"\n{svc}{tls}"
            )
        };
        let good = "[tls]\ncertificate = \"agent.pem\"\nkey = \"agent-key.pem\"\nca = \"ca.pem\"\n";
        let c = Config::from_toml(&base("sips:127.0.0.1:5061", good), &file, &flags(&[])).unwrap();
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.listen, "127.0.0.1:5061".parse::<SocketAddr>().unwrap());
        assert!(tls.setup.has_certificate() && tls.setup.trusts_any());
        assert!(c.summary().contains("tls        SIP on 127.0.0.1:5061"));
        // A sips: relay without [tls].
        let e = Config::from_toml(&base("sips:127.0.0.1:5061", ""), &file, &flags(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("relay.uri") && e.contains("tls.certificate"),
            "{e}"
        );
        // [tls] with a plain relay.
        let e = Config::from_toml(&base("sip:127.0.0.1:5060", good), &file, &flags(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("relay.uri") && e.contains("sips:"), "{e}");
        // Two of three files.
        let e = Config::from_toml(
            &base(
                "sips:127.0.0.1:5061",
                "[tls]\ncertificate = \"agent.pem\"\nca = \"ca.pem\"\n",
            ),
            &file,
            &flags(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("key `tls`") && e.contains("all three"), "{e}");
        // A missing file, a key where the CA should be: the key and the file are named.
        let e = Config::from_toml(
            &base(
                "sips:127.0.0.1:5061",
                &good.replace("agent.pem", "missing.pem"),
            ),
            &file,
            &flags(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("key `tls.certificate`") && e.contains("missing.pem"),
            "{e}"
        );
        let e = Config::from_toml(
            &base(
                "sips:127.0.0.1:5061",
                &good.replace("\"ca.pem\"", "\"agent-key.pem\""),
            ),
            &file,
            &flags(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("key `tls.ca`") && e.contains("agent-key.pem"),
            "{e}"
        );
        // Flags alone.
        let ca = dir.path().join("ca.pem");
        let cert = dir.path().join("agent.pem");
        let key = dir.path().join("agent-key.pem");
        let c = Config::from_toml(
            &base("sips:127.0.0.1:5061", ""),
            &file,
            &flags(&[
                "--ca",
                ca.to_str().unwrap(),
                "--tls-certificate",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
                "--tls-listen",
                "127.0.0.1:0",
            ]),
        )
        .unwrap();
        assert_eq!(c.tls.unwrap().listen.port(), 0);
        // sips with transport=udp is refused.
        let e = Config::from_toml(
            &base("sips:127.0.0.1;transport=udp", good),
            &file,
            &flags(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("transport udp"), "{e}");
    }

    #[test]
    fn flags_alone_make_a_configuration_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let f = flags(&[
            "--relay",
            "sip:127.0.0.1:5999",
            "--account",
            "as1",
            "--password-file",
            pw.to_str().unwrap(),
            "--service",
            "echo=builtin:echo",
            "--service",
            "chat=tcp://127.0.0.1:7000",
            "--capacity",
            "50",
        ]);
        let c = Config::load(&f).unwrap();
        assert_eq!(c.relay.password.expose(), "s3cret");
        assert_eq!(c.relay.domain, "127.0.0.1:5999");
        assert!(c.relay.register);
        assert_eq!(c.relay.expires, DEFAULT_EXPIRES);
        assert_eq!(c.capacity, Some(50));
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.sip.advertise, "127.0.0.1");
        assert_eq!(c.data.token_ttl, Duration::from_secs(30));
        assert_eq!(c.billing.bytes_per_charge, DEFAULT_BYTES_PER_CHARGE);
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "password leaked into Debug"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let text = r#"
            [relay]
            account = "as1"
            password = "pw"
            [limits]
            capacity = 10
            [[services]]
            name = "echo"
            backend = "builtin:echo"
            capacity = 3
            allow = ["alice"]
        "#;
        let c = Config::from_toml(
            text,
            Path::new("a.toml"),
            &flags(&[
                "--capacity",
                "2",
                "--service",
                "echo=builtin:clock",
                "--no-register",
            ]),
        )
        .unwrap();
        assert_eq!(c.capacity, Some(2));
        let echo = c.service("echo").unwrap();
        assert_eq!(echo.backend, Backend::Clock);
        assert_eq!(echo.capacity, Some(3), "the flag replaces the backend only");
        assert!(echo.policy.allows("alice") && !echo.policy.allows("bob"));
        assert!(!c.relay.register);
    }

    fn error_of(text: &str, args: &[&str]) -> String {
        Config::from_toml(text, Path::new("agent.toml"), &flags(args))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn data_connections_waiting_for_a_token_are_capped_by_default_and_bad_caps_are_named() {
        let base = "[relay]\naccount = \"as1\"\npassword = \"pw\"\n\
                    [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n";
        let c = Config::from_toml(base, Path::new("agent.toml"), &flags(&[])).unwrap();
        assert_eq!(c.data.handshake_timeout, Duration::from_secs(5));
        assert_eq!(
            (c.data.max_pending, c.data.max_pending_per_address),
            (256, 16)
        );
        assert!(c
            .summary()
            .contains("token line within 5 s, at most 256 connections"));
        let c = Config::from_toml(
            &format!(
                "{base}[data]\nmax_pending_connections = 1000\nmax_pending_per_address = 4\n\
                 handshake_timeout_secs = 2\n"
            ),
            Path::new("agent.toml"),
            &flags(&[]),
        )
        .unwrap();
        assert_eq!(
            (c.data.max_pending, c.data.max_pending_per_address),
            (1000, 4)
        );
        assert_eq!(c.data.handshake_timeout, Duration::from_secs(2));
        for (key, value) in [
            ("max_pending_connections", "0"),
            ("max_pending_per_address", "100001"),
        ] {
            let e = error_of(&format!("{base}[data]\n{key} = {value}\n"), &[]);
            assert_eq!(
                e,
                format!("agent.toml: key `data.{key}`: {value} is out of range (1 to 100000)")
            );
        }
    }

    #[test]
    fn errors_name_the_file_and_key_or_the_flag() {
        let base = "[relay]\naccount = \"as1\"\npassword = \"pw\"\n";
        let svc = "[[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n";
        let e = error_of(&format!("{base}[sip]\nlisten = \"nowhere\"\n{svc}"), &[]);
        assert!(e.starts_with("agent.toml: key `sip.listen`"), "{e}");
        let e = error_of(
            &format!("{base}{svc}[[services]]\nname = \"x\"\nbackend = \"ftp://a\"\n"),
            &[],
        );
        assert!(
            e.contains("services[1].backend") && e.contains("expected builtin:echo"),
            "{e}"
        );
        let e = error_of(&format!("{base}{svc}[relay2]\n"), &[]);
        assert!(e.contains("unknown field `relay2`"), "{e}");
        let e = error_of(base, &[]);
        assert!(e.contains("no services"), "{e}");
        let e = error_of(&format!("{base}{svc}"), &["--relay", "sips:relay.test"]);
        assert!(e.starts_with("--relay:") && e.contains("TLS"), "{e}");
        let e = error_of(&format!("{base}{svc}"), &["--capacity", "0"]);
        assert!(e.starts_with("--capacity:"), "{e}");
        let e = error_of(&format!("{base}{svc}{svc}"), &[]);
        assert!(e.contains("services[1].name") && e.contains("twice"), "{e}");
        let e = error_of(
            &format!("{base}[sip]\nlisten = \"0.0.0.0:5080\"\n{svc}"),
            &[],
        );
        assert!(e.contains("sip.advertise"), "{e}");
        let e = error_of(&format!("{base}[billing]\nprice_per_block = 0\n{svc}"), &[]);
        assert!(e.contains("billing.price_per_block"), "{e}");
        let e = error_of(&format!("[relay]\naccount = \"as1\"\n{svc}"), &[]);
        assert!(e.contains("no password"), "{e}");
        let e = error_of(&format!("[relay]\npassword = \"pw\"\n{svc}"), &[]);
        assert!(e.contains("no account"), "{e}");
    }

    #[test]
    fn bad_flag_values_are_refused_by_the_parser() {
        let parse = |args: &[&str]| {
            let mut all = vec!["appsrv-agent"];
            all.extend_from_slice(args);
            Flags::try_parse_from(all).unwrap_err().to_string()
        };
        assert!(parse(&["--service", "echo"]).contains("NAME=BACKEND"));
        assert!(parse(&["--service", "echo=builtin:nope"]).contains("unknown built-in"));
        assert!(parse(&["--listen", "5080"]).contains("--listen"));
        assert!(parse(&["--capacity", "many"]).contains("--capacity"));
    }

    #[test]
    fn password_file_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("as1.pw"), "from-file\r\nignored\n").unwrap();
        let file = dir.path().join("agent.toml");
        let text = "[relay]\naccount = \"as1\"\npassword_file = \"as1.pw\"\n\
                    [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n";
        std::fs::write(&file, text).unwrap();
        let c = Config::load(&flags(&["--config", file.to_str().unwrap()])).unwrap();
        assert_eq!(c.relay.password.expose(), "from-file");
    }

    #[test]
    fn an_ipv6_relay_is_read_and_the_defaults_follow_its_family() {
        let base = "[relay]\naccount = \"as1\"\npassword = \"pw\"\n\
                    [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n";
        let c = Config::from_toml(
            base,
            Path::new("a.toml"),
            &flags(&["--relay", "sip:[::1]:5999"]),
        )
        .unwrap();
        assert_eq!(c.relay.uri.to_string(), "sip:[::1]:5999");
        assert_eq!(relay_ip(&c.relay.uri), Some("::1".parse().unwrap()));
        assert_eq!(c.relay.uri.port(), Some(5999));
        assert_eq!(c.relay.domain, "[::1]:5999");
        assert_eq!(c.sip.listen, "[::1]:5080".parse().unwrap());
        assert_eq!(c.sip.advertise, "::1");
        assert_eq!(c.data.listen, "[::1]:7080".parse().unwrap());
        assert_eq!(c.data.advertise, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(c.billing.charge_uri.to_string(), "sip:charge@[::1]:5999");
        assert_eq!(host_port(&c.sip.advertise, 5080), "[::1]:5080");

        // The file's relay.uri, with a transport, and addresses of its own.
        let text = "[relay]\nuri = \"sip:as1@[2001:db8::1]:5070;transport=TCP\"\n\
                    account = \"as1\"\npassword = \"pw\"\n\
                    [sip]\nlisten = \"[::]:5080\"\nadvertise = \"2001:db8::7\"\n\
                    [data]\nlisten = \"[2001:db8::7]:7000\"\n\
                    [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n";
        let c = Config::from_toml(text, Path::new("a.toml"), &flags(&[])).unwrap();
        assert_eq!(c.relay.uri.transport(), Some("TCP"));
        assert_eq!(c.relay.domain, "[2001:db8::1]:5070");
        assert_eq!(c.sip.listen, "[::]:5080".parse().unwrap());
        assert_eq!(host_port(&c.sip.advertise, 5080), "[2001:db8::7]:5080");
        assert_eq!(c.data.advertise, "2001:db8::7".parse::<IpAddr>().unwrap());

        // An IPv4 socket cannot reach an IPv6 relay; the IPv6 wildcard reaches an IPv4 one.
        let e = error_of(
            base,
            &["--relay", "sip:[::1]:5999", "--listen", "127.0.0.1:5080"],
        );
        assert!(e.starts_with("--listen:") && e.contains("IPv6"), "{e}");
        let e = error_of(
            base,
            &["--relay", "sip:127.0.0.1:5999", "--listen", "[::1]:5080"],
        );
        assert!(e.starts_with("--listen:") && e.contains("IPv4"), "{e}");
        let dual = Config::from_toml(
            base,
            Path::new("a.toml"),
            &flags(&[
                "--relay",
                "sip:127.0.0.1",
                "--listen",
                "[::]:5080",
                "--advertise",
                "127.0.0.1",
            ]),
        )
        .unwrap();
        assert_eq!(dual.sip.listen, "[::]:5080".parse().unwrap());

        // Broken IPv6 references are refused with the flag named.
        for bad in [
            "sip:[::1",
            "sip:[fe80::zz]:5060",
            "sip:[::1]:99999",
            "tel:+15551234",
        ] {
            let e = error_of(base, &["--relay", bad]);
            assert!(e.starts_with("--relay:"), "{bad}: {e}");
        }
    }

    #[test]
    fn host_port_brackets_ipv6_and_host_of_reads_it_back() {
        assert_eq!(host_port("::1", 5080), "[::1]:5080");
        assert_eq!(host_port("[::1]", 5080), "[::1]:5080");
        assert_eq!(host_port("127.0.0.1", 5080), "127.0.0.1:5080");
        assert_eq!(host_port("agent.example", 5080), "agent.example:5080");
        assert_eq!(host_of("[::1]:5080"), "[::1]");
        assert_eq!(host_of("[2001:db8::1]"), "[2001:db8::1]");
        assert_eq!(host_of("127.0.0.1:5080"), "127.0.0.1");
        assert_eq!(host_of("agent.example"), "agent.example");
        assert_eq!(host_of("::1"), "::1");
    }

    #[test]
    fn the_control_api_is_loopback_only_with_a_long_enough_token() {
        let base = "[relay]\naccount = \"as1\"\npassword = \"pw\"\n\
                    [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n";
        let c = Config::from_toml(base, Path::new("a.toml"), &flags(&[])).unwrap();
        assert!(c.control.is_none(), "no API unless asked for");
        assert_eq!(c.billing.confirm_wait, Duration::from_secs(10));
        let text =
            format!("{base}[control]\nlisten = \"127.0.0.1:7090\"\ntoken = \"0123456789abcdef\"\n");
        let c = Config::from_toml(&text, Path::new("a.toml"), &flags(&[])).unwrap();
        let control = c.control.as_ref().unwrap();
        assert_eq!(control.listen, "127.0.0.1:7090".parse().unwrap());
        assert_eq!(control.token.expose(), "0123456789abcdef");
        assert!(
            !format!("{c:?}").contains("0123456789abcdef"),
            "token in Debug"
        );
        assert!(c.summary().contains("control    http://127.0.0.1:7090"));

        let e = error_of(
            &format!("{base}[control]\nlisten = \"0.0.0.0:7090\"\ntoken = \"0123456789abcdef\"\n"),
            &[],
        );
        assert!(
            e.starts_with("agent.toml: key `control.listen`") && e.contains("loopback"),
            "{e}"
        );
        let e = error_of(
            &format!("{base}[control]\nlisten = \"127.0.0.1:7090\"\n"),
            &[],
        );
        assert!(
            e.contains("control.token") && e.contains("needs a token"),
            "{e}"
        );
        let e = error_of(
            &format!("{base}[control]\nlisten = \"[::1]:7090\"\ntoken = \"short\"\n"),
            &[],
        );
        assert!(
            e.starts_with("agent.toml: key `control.token`") && e.contains("at least 16"),
            "{e}"
        );
        let e = error_of(
            &format!("{base}[control]\ntoken = \"0123456789abcdef\"\n"),
            &[],
        );
        assert!(e.contains("control.listen"), "{e}");

        // Flags: the address and a token file.
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "fedcba9876543210fedcba\n").unwrap();
        let c = Config::from_toml(
            base,
            Path::new("a.toml"),
            &flags(&[
                "--control-listen",
                "[::1]:0",
                "--control-token-file",
                token.to_str().unwrap(),
            ]),
        )
        .unwrap();
        assert_eq!(c.control.unwrap().token.expose(), "fedcba9876543210fedcba");
        let e = error_of(base, &["--control-listen", "192.0.2.1:7090"]);
        assert!(e.starts_with("--control-listen:"), "{e}");
    }

    #[test]
    fn a_preamble_is_set_per_tcp_service() {
        let text = "[relay]\naccount = \"as1\"\npassword = \"pw\"\n\
                    [[services]]\nname = \"game\"\nbackend = \"tcp://127.0.0.1:7000\"\n\
                    preamble = \"proxy-v2\"\n\
                    [[services]]\nname = \"chat\"\nbackend = \"tcp://127.0.0.1:7001\"\n";
        let c = Config::from_toml(text, Path::new("a.toml"), &flags(&[])).unwrap();
        assert_eq!(c.service("game").unwrap().preamble, PreambleFormat::ProxyV2);
        assert_eq!(c.service("chat").unwrap().preamble, PreambleFormat::None);
        assert!(c.summary().contains("preamble proxy-v2"), "{}", c.summary());
        let e = error_of(
            "[relay]\naccount = \"as1\"\npassword = \"pw\"\n\
             [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\npreamble = \"json\"\n",
            &[],
        );
        assert!(
            e.contains("services[0].preamble") && e.contains("tcp://"),
            "{e}"
        );
        let e = error_of(
            "[relay]\naccount = \"as1\"\npassword = \"pw\"\n\
             [[services]]\nname = \"game\"\nbackend = \"tcp://h:1\"\npreamble = \"v1\"\n",
            &[],
        );
        assert!(
            e.contains("services[0].preamble") && e.contains("expected none"),
            "{e}"
        );
        let e = error_of(
            "[relay]\naccount = \"as1\"\npassword = \"pw\"\n[billing]\nconfirm_wait_secs = 0\n\
             [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n",
            &[],
        );
        assert!(e.contains("billing.confirm_wait_secs"), "{e}");
    }

    #[test]
    fn policy_allow_and_deny() {
        let p = Policy {
            allow: vec!["*".into()],
            deny: vec!["mallory".into()],
        };
        assert!(p.allows("alice"));
        assert!(!p.allows("mallory"));
        let only = Policy {
            allow: vec!["bob".into()],
            deny: vec![],
        };
        assert!(only.allows("bob") && !only.allows("alice"));
    }

    #[test]
    fn other_relays_are_read_from_the_file_or_the_flags_and_checked() {
        let base = "[[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n\
                    [relay]\nuri = \"sip:127.0.0.1:5060\"\naccount = \"as1\"\npassword = \"p\"\n";
        let file = format!("{base}others = [\"sip:127.0.0.2:5070\"]\n");
        let c = Config::from_toml(&file, Path::new("a.toml"), &flags(&[])).unwrap();
        assert_eq!(
            c.relay
                .others
                .iter()
                .map(|u| u.to_string())
                .collect::<Vec<_>>(),
            ["sip:127.0.0.2:5070"]
        );
        let c = Config::from_toml(
            &file,
            Path::new("a.toml"),
            &flags(&[
                "--other-relay",
                "sip:127.0.0.3:5060",
                "--other-relay",
                "sip:127.0.0.4:5060",
            ]),
        )
        .unwrap();
        assert_eq!(c.relay.others.len(), 2, "the flags replace the file's list");
        let bad = format!("{base}others = [\"mailto:x\"]\n");
        let e = Config::from_toml(&bad, Path::new("a.toml"), &flags(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("relay.others") && e.contains("mailto:x"), "{e}");
        let tls = format!("{base}others = [\"sips:127.0.0.2:5071\"]\n");
        let e = Config::from_toml(&tls, Path::new("a.toml"), &flags(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("relay.others") && e.contains("TLS"), "{e}");
    }
}
