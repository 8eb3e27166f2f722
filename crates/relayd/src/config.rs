//! The relay's configuration: one TOML file (`relayd --config FILE`), every key with a
//! default, so that `relayd` with no file at all listens on UDP and TCP 127.0.0.1:5060 and
//! keeps its data in `./relayd-data`.
//!
//! Loading is two passes. The first reads the file into typed structures and refuses
//! unknown keys and wrong types, naming the file, the key path and what was expected
//! (`relayd.toml: key `listen.udp`: expected a socket address like 127.0.0.1:5060, got
//! "nowhere" (line 3, column 7)`). The second, [`Config::validate`], checks what types
//! cannot: references between sections (a rule naming an unknown service or plan), regular
//! expressions, duplicate names, credentials; it reports every problem, each with its key.
//!
//! Paths: `storage.data_dir` is taken relative to the working directory (like any daemon's
//! data path); `users_file` relative to the directory of the configuration file, since it
//! is its companion.
//!
//! `examples/relayd.toml` is the annotated reference of every section.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::directory::{Directory, DirectoryError, HealthPolicy, Strategy};
use crate::registrar::{IpNet, Registrar, RegistrarPolicy};
use crate::rules::{is_token, RuleConfig, RuleErrors, RuleSet};

/// The default listening address, UDP and TCP.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 5060));

/// The name given to a configuration that was not read from a file.
const BUILT_IN: &str = "(built-in defaults)";

/// One problem found by [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key path at fault (`users[1].plan`), with the file it is in when that is not the
    /// configuration file itself.
    pub key: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

/// Why a configuration was refused. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or of the wrong type.
    #[error("{}: {}", file.display(), describe(key.as_deref(), message, *position))]
    Parse {
        /// The file.
        file: PathBuf,
        /// The key path, when the problem is at a key.
        key: Option<String>,
        /// What is wrong and what was expected.
        message: String,
        /// Line and column (from 1) in the file, when known.
        position: Option<(usize, usize)>,
    },
    /// The file reads well but its content does not hold together.
    #[error("{}", problems.iter().map(|p| format!("{}: {p}", file.display())).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn describe(key: Option<&str>, message: &str, position: Option<(usize, usize)>) -> String {
    let mut out = String::new();
    if let Some(key) = key {
        out.push_str(&format!("key `{key}`: "));
    }
    out.push_str(message);
    if let Some((line, column)) = position {
        out.push_str(&format!(" (line {line}, column {column})"));
    }
    out
}

fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Deserializes `T` from TOML `text`, mapping errors to [`ConfigError::Parse`] with the key
/// path and position.
fn parse_toml<T: de::DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        ConfigError::Parse {
            file: file.to_path_buf(),
            key: (path != ".").then_some(path),
            message: inner.message().trim().to_owned(),
            position: inner.span().map(|span| position(text, span.start)),
        }
    })
}

/// A value read from a configuration string: what it expects, and how to parse it.
trait ConfigStr: Sized {
    const EXPECTED: &'static str;
    fn parse_config(s: &str) -> Option<Self>;
}

impl ConfigStr for SocketAddr {
    const EXPECTED: &'static str = "a socket address like 127.0.0.1:5060";
    fn parse_config(s: &str) -> Option<Self> {
        s.trim().parse().ok()
    }
}

impl ConfigStr for sip_core::source::Net {
    const EXPECTED: &'static str = "a network like 127.0.0.0/8";
    fn parse_config(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

impl ConfigStr for UtcOffset {
    const EXPECTED: &'static str = "a UTC offset like +01:00";
    fn parse_config(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

struct StrVisitor<T>(PhantomData<T>);

fn got<E: de::Error>(expected: &str, what: impl fmt::Display) -> E {
    E::custom(format!("expected {expected}, got {what}"))
}

impl<'de, T: ConfigStr> Visitor<'de> for StrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        T::parse_config(v).ok_or_else(|| got(T::EXPECTED, format_args!("{v:?}")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Err(got(T::EXPECTED, format_args!("the number {v}")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Err(got(T::EXPECTED, format_args!("the number {v}")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        Err(got(T::EXPECTED, format_args!("the number {v}")))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        Err(got(T::EXPECTED, format_args!("{v}")))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(got(T::EXPECTED, "a list"))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(got(T::EXPECTED, "a table"))
    }
}

/// One element of a list of [`ConfigStr`] values.
struct Item<T>(T);

impl<'de, T: ConfigStr> Deserialize<'de> for Item<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(StrVisitor::<T>(PhantomData))
            .map(Item)
    }
}

/// Accepts one value (`"127.0.0.1:5060"`) or a list of them.
fn one_or_many<'de, D: Deserializer<'de>, T: ConfigStr>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    struct ListVisitor<T>(PhantomData<T>);
    impl<'de, T: ConfigStr> Visitor<'de> for ListVisitor<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{} or a list of them", T::EXPECTED)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
            StrVisitor::<T>(PhantomData)
                .visit_str(v)
                .map(|one| vec![one])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(Item(one)) = seq.next_element::<Item<T>>()? {
                out.push(one);
            }
            Ok(out)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<T>, E> {
            Err(got(T::EXPECTED, format_args!("the number {v}")))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Vec<T>, E> {
            Err(got(T::EXPECTED, format_args!("{v}")))
        }
        fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Vec<T>, A::Error> {
            Err(got(T::EXPECTED, "a table"))
        }
    }
    deserializer.deserialize_any(ListVisitor::<T>(PhantomData))
}

fn one<'de, D: Deserializer<'de>, T: ConfigStr>(deserializer: D) -> Result<T, D::Error> {
    deserializer.deserialize_any(StrVisitor::<T>(PhantomData))
}

/// A fixed offset from UTC, for the time-of-day conditions of rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UtcOffset(pub i32);

/// An offset not written `+HH:MM`, `-HH:MM` or `Z`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a UTC offset like +01:00, got {0:?}")]
pub struct BadUtcOffset(pub String);

impl FromStr for UtcOffset {
    type Err = BadUtcOffset;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadUtcOffset(s.to_owned());
        let t = s.trim();
        if t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") {
            return Ok(UtcOffset(0));
        }
        let (sign, rest) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => return Err(bad()),
        };
        let (h, m) = rest.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let h: i32 = h.parse().map_err(|_| bad())?;
        let m: i32 = m.parse().map_err(|_| bad())?;
        if h > 18 || m > 59 {
            return Err(bad());
        }
        Ok(UtcOffset(sign * (h * 3600 + m * 60)))
    }
}

impl fmt::Display for UtcOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { '-' } else { '+' };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{:02}:{:02}", abs / 3600, abs % 3600 / 60)
    }
}

/// `[listen]`: where the relay takes SIP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [listen] table")]
pub struct ListenConfig {
    /// UDP addresses (one or a list; an empty list turns UDP off).
    #[serde(deserialize_with = "one_or_many")]
    pub udp: Vec<SocketAddr>,
    /// TCP addresses (one or a list; an empty list turns TCP off).
    #[serde(deserialize_with = "one_or_many")]
    pub tcp: Vec<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            udp: vec![DEFAULT_LISTEN],
            tcp: vec![DEFAULT_LISTEN],
        }
    }
}

/// `[relay]`: who the relay is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [relay] table")]
pub struct RelayConfig {
    /// The digest authentication realm (RFC 3261 §22), also the relay's domain.
    pub realm: String,
    /// The offset of the local time that rules' `time` ranges are written in.
    #[serde(deserialize_with = "one")]
    pub utc_offset: UtcOffset,
    /// Other host names that address the relay itself (besides the realm and its listen
    /// addresses), e.g. `relay.example.net`.
    pub domains: Vec<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            realm: "localhost".into(),
            utc_offset: UtcOffset(0),
            domains: Vec::new(),
        }
    }
}

/// `[sip]`: protocol timers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [sip] table")]
pub struct SipConfig {
    /// RFC 3261 T1, the round-trip estimate, in milliseconds (default 500). Retransmission
    /// intervals and the 64·T1 transaction timeouts (Timers B, F, H…) scale with it; lower it
    /// only on networks known to be fast.
    pub t1_ms: u64,
}

impl Default for SipConfig {
    fn default() -> Self {
        SipConfig { t1_ms: 500 }
    }
}

/// The range `[sip] t1_ms` is taken in: 1 ms to 60 s (64·T1 is then at most 64 minutes).
pub const T1_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=60_000;

impl SipConfig {
    /// T1, held to [`T1_MS_RANGE`] ([`Config::validate`] refuses a value outside it, so this
    /// only matters for a configuration that was never validated).
    pub fn t1(&self) -> Duration {
        Duration::from_millis(self.t1_ms.clamp(*T1_MS_RANGE.start(), *T1_MS_RANGE.end()))
    }

    /// 64·T1: how long a 2xx waits for its ACK (RFC 3261 §13.3.1.4), the timeout of Timers
    /// B, F and H. Saturating: never wraps, whatever `t1_ms` holds.
    pub fn t1_times_64(&self) -> Duration {
        self.t1().saturating_mul(64)
    }
}

/// `[limits]`: what one source address may hold or send (issue 14, findings 4 and 5, and
/// the per-address rate limit; RFC 3261 §26.1.5): caps on TCP connections, deadlines on
/// their messages and writes, and a request rate per source address in the tradition of
/// Kamailio's `pike`. See docs/operations.md, "Flood limits".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [limits] table")]
pub struct LimitsConfig {
    /// TCP connections accepted and open at once, from every address together; one more is
    /// closed at once — 1 to 1000000.
    pub max_connections: u32,
    /// TCP connections accepted and open at once from one address (IPv4, or IPv6 /64) — 1
    /// to 1000000.
    pub max_connections_per_address: u32,
    /// How long a whole SIP message may take to arrive on a TCP connection, from its first
    /// byte (a new connection's first message: from the accept), in milliseconds; bytes
    /// arriving do not extend it — 100 to 600000.
    pub message_timeout_ms: u32,
    /// A TCP connection with no complete message or keep-alive for this long is closed, in
    /// seconds — 1 to 86400.
    pub idle_timeout_secs: u32,
    /// How long writing one message to a TCP connection may block (its peer not reading)
    /// before the connection is closed, in milliseconds — 100 to 600000.
    pub write_timeout_ms: u32,
    /// Requests a second one source address may send, sustained (ACKs not counted); past it
    /// requests are answered 503 with Retry-After, then dropped — 0 turns the limit off, else
    /// up to 1000000.
    pub requests_per_second: u32,
    /// Requests one address may send at once after a quiet time — 1 to 10000000.
    pub request_burst: u32,
    /// Over the rate, how many requests a second from one address are answered 503; the rest
    /// are dropped unanswered (a forged UDP source is not flooded with answers) — 0 to
    /// 100000.
    pub refusals_per_second: u32,
    /// Networks the rate limit does not apply to (one or a list; default: loopback).
    #[serde(deserialize_with = "one_or_many")]
    pub rate_exempt: Vec<sip_core::source::Net>,
    /// Addresses whose request rate is tracked at once; past it the one met longest ago is
    /// forgotten — 16 to 16777216.
    pub max_tracked_addresses: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let transport = sip_core::transport::TransportConfig::default();
        let rate = sip_core::rate::RateLimit::default();
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        LimitsConfig {
            max_connections: u32::try_from(transport.max_connections).unwrap_or(u32::MAX),
            max_connections_per_address: u32::try_from(transport.max_connections_per_source)
                .unwrap_or(u32::MAX),
            message_timeout_ms: ms(transport.message_timeout),
            idle_timeout_secs: u32::try_from(transport.idle_timeout.as_secs()).unwrap_or(300),
            write_timeout_ms: ms(transport.write_timeout),
            requests_per_second: rate.per_second,
            request_burst: rate.burst,
            refusals_per_second: rate.replies_per_second,
            rate_exempt: rate.exempt,
            max_tracked_addresses: u32::try_from(rate.max_tracked).unwrap_or(u32::MAX),
        }
    }
}

impl LimitsConfig {
    /// The transport configuration with these limits applied to `transport`.
    pub fn transport(
        &self,
        transport: sip_core::transport::TransportConfig,
    ) -> sip_core::transport::TransportConfig {
        sip_core::transport::TransportConfig {
            max_connections: self.max_connections as usize,
            max_connections_per_source: self.max_connections_per_address as usize,
            message_timeout: Duration::from_millis(u64::from(self.message_timeout_ms)),
            idle_timeout: Duration::from_secs(u64::from(self.idle_timeout_secs)),
            write_timeout: Duration::from_millis(u64::from(self.write_timeout_ms)),
            ..transport
        }
    }

    /// The per-address request rate limit, or `None` when `requests_per_second` is 0.
    pub fn rate_limit(&self) -> Option<sip_core::rate::RateLimit> {
        (self.requests_per_second > 0).then(|| sip_core::rate::RateLimit {
            per_second: self.requests_per_second,
            burst: self.request_burst,
            replies_per_second: self.refusals_per_second,
            exempt: self.rate_exempt.clone(),
            max_tracked: self.max_tracked_addresses as usize,
        })
    }

    /// Adds a problem for every value out of its range.
    fn check(&self, p: &mut Problems) {
        const MILLION: u32 = 1_000_000;
        for (key, value, min, max, unit) in [
            ("max_connections", self.max_connections, 1, MILLION, ""),
            (
                "max_connections_per_address",
                self.max_connections_per_address,
                1,
                MILLION,
                "",
            ),
            (
                "message_timeout_ms",
                self.message_timeout_ms,
                100,
                600_000,
                " milliseconds",
            ),
            (
                "idle_timeout_secs",
                self.idle_timeout_secs,
                1,
                86_400,
                " seconds",
            ),
            (
                "write_timeout_ms",
                self.write_timeout_ms,
                100,
                600_000,
                " milliseconds",
            ),
            (
                "requests_per_second",
                self.requests_per_second,
                0,
                MILLION,
                "",
            ),
            ("request_burst", self.request_burst, 1, 10 * MILLION, ""),
            (
                "refusals_per_second",
                self.refusals_per_second,
                0,
                100_000,
                "",
            ),
            (
                "max_tracked_addresses",
                self.max_tracked_addresses,
                16,
                1 << 24,
                "",
            ),
        ] {
            if !(min..=max).contains(&value) {
                p.add(
                    format!("limits.{key}"),
                    format!("{value} is out of range ({min} to {max}{unit})"),
                );
            }
        }
    }
}

/// `[metrics]`: the Prometheus text endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [metrics] table")]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served (plain HTTP, loopback advised); absent (the default):
    /// no endpoint.
    pub listen: Option<SocketAddr>,
}

/// `[auth]`: digest authentication and its limits on failed attempts (RFC 3261 §22; issue
/// 14: counted per source address and per (user, source), never per user name alone; see
/// `crate::auth` and docs/operations.md, "Authentication limits").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "an [auth] table")]
pub struct AuthConfig {
    /// How long a nonce stays valid, in seconds; after that the client is challenged with
    /// `stale=true`.
    pub nonce_ttl_secs: u32,
    /// Failed attempts of one user from one source address (a UDP one counting
    /// `udp_failure_weight` percent) before that user's credentials are no longer checked
    /// from there (answered as a wrong password) — 1 to 1000.
    pub max_failures: u32,
    /// How long those failures are counted from the first, and how long the user then stays
    /// locked out from that source, in seconds — 1 to 604800.
    pub lockout_secs: u32,
    /// Failed attempts from one source address (IPv4, or IPv6 /64), whatever the user names,
    /// before the source is refused (503 with Retry-After) — 1 to 100000.
    pub source_max_failures: u32,
    /// How long a source's failures are counted from the first, in seconds — 1 to 604800.
    pub source_window_secs: u32,
    /// How long a source stays refused, in seconds — 1 to 604800.
    pub source_block_secs: u32,
    /// What a failure over UDP counts, in percent of one over TCP or TLS (a UDP source
    /// address can be forged) — 1 to 100.
    pub udp_failure_weight: u32,
    /// Source addresses whose failures are counted at once; past it the oldest idle one is
    /// forgotten — 16 to 16777216.
    pub max_tracked_sources: u32,
    /// (user, source) pairs whose failures are counted at once (only users that exist) —
    /// 16 to 16777216.
    pub max_tracked_user_sources: u32,
    /// Which digest `uri` values are taken (RFC 7616 §3.4.6): "request-uri" (the
    /// Request-URI only) or "request-uri-or-relay" (also a URI naming the relay itself, as
    /// sipp sends; the default). Another `uri` gets 400.
    pub digest_uri: String,
    /// The digest algorithms every user is challenged with unless its own
    /// `digest_algorithms` says otherwise, one challenge each, in this order (RFC 8760
    /// §2.4): any of "MD5", "SHA-256", "MD5-sess", "SHA-256-sess". The default is MD5 alone,
    /// as Kamailio, Asterisk and FreeSWITCH challenge: baresip 1.0 gives up on a 401 that
    /// carries any challenge it does not know, and sipp answers only the first. Offer
    /// SHA-256 per user (`digest_algorithms = ["SHA-256", "MD5"]` in its entry), or here
    /// once every client of the relay takes it (docs/operations.md, "Digest algorithms").
    pub algorithms: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            nonce_ttl_secs: 300,
            max_failures: 5,
            lockout_secs: 60,
            source_max_failures: 20,
            source_window_secs: 60,
            source_block_secs: 300,
            udp_failure_weight: 50,
            max_tracked_sources: 65_536,
            max_tracked_user_sources: 65_536,
            digest_uri: "request-uri-or-relay".into(),
            algorithms: vec!["MD5".into()],
        }
    }
}

impl AuthConfig {
    /// The limits on failed attempts.
    pub fn failure_policy(&self) -> crate::auth::FailurePolicy {
        let secs = |s: u32| Duration::from_secs(u64::from(s));
        crate::auth::FailurePolicy {
            max_failures: self.max_failures,
            lockout: secs(self.lockout_secs),
            source_max_failures: self.source_max_failures,
            source_window: secs(self.source_window_secs),
            source_block: secs(self.source_block_secs),
            udp_weight_percent: self.udp_failure_weight,
            max_tracked_sources: self.max_tracked_sources as usize,
            max_tracked_user_sources: self.max_tracked_user_sources as usize,
        }
    }

    /// The digest `uri` check of `digest_uri`, or `None` for a value that is not one.
    pub fn digest_uri_check(&self) -> Option<crate::auth::DigestUriCheck> {
        match self.digest_uri.as_str() {
            "request-uri" => Some(crate::auth::DigestUriCheck::RequestUri),
            "request-uri-or-relay" => Some(crate::auth::DigestUriCheck::RequestUriOrRelay),
            _ => None,
        }
    }

    /// The configured algorithms, or the name that is not one.
    pub fn digest_algorithms(&self) -> Result<Vec<sip_core::digest::Algorithm>, String> {
        algorithms(&self.algorithms)
    }
}

/// Digest algorithms by name (RFC 7616 §3.7, RFC 8760 §2), or the first name that is not one.
fn algorithms(names: &[String]) -> Result<Vec<sip_core::digest::Algorithm>, String> {
    names
        .iter()
        .map(|name| sip_core::digest::Algorithm::from_name(name).ok_or_else(|| name.clone()))
        .collect()
}

/// `[session]`: timing of inquiries and liveness of established sessions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [session] table")]
pub struct SessionConfig {
    /// How long a server may take to answer an inquiry at all before the next candidate is
    /// tried, in milliseconds.
    pub inquiry_timeout_ms: u64,
    /// How long a server may ring before the inquiry gives up on it, in seconds.
    pub answer_timeout_secs: u32,
    /// Seconds between in-dialog OPTIONS probes of both legs of a session; 0 disables.
    pub probe_interval_secs: u32,
    /// How long a forked inquiry waits for the servers' answers, in seconds.
    pub fork_timeout_secs: u32,
    /// The session interval (RFC 4028 §4 `Session-Expires`) the relay asks for on each
    /// leg, and the largest it accepts, in seconds (default 1800). A leg whose session is
    /// not refreshed within it is ended and billed up to its last refresh.
    pub session_expires_secs: u32,
    /// The smallest session interval the relay accepts (RFC 4028 §5 `Min-SE`), in seconds
    /// (default 90); a shorter one is refused `422`. RFC 4028 forbids values under 90:
    /// lower ones (down to 1) are accepted for tests only, and make every session cost a
    /// refresh that often.
    pub min_se_secs: u32,
}

/// Default of `[session] session_expires_secs` (RFC 4028 §4 recommends 1800 s).
pub const DEFAULT_SESSION_EXPIRES_SECS: u32 = 1800;

/// Default of `[session] min_se_secs` (RFC 4028 §5: never under 90 s).
pub const DEFAULT_MIN_SE_SECS: u32 = 90;

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            inquiry_timeout_ms: 4000,
            answer_timeout_secs: 120,
            probe_interval_secs: 30,
            fork_timeout_secs: 30,
            session_expires_secs: DEFAULT_SESSION_EXPIRES_SECS,
            min_se_secs: DEFAULT_MIN_SE_SECS,
        }
    }
}

/// `[billing]`: application billing limits and the journal refresh.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [billing] table")]
pub struct BillingConfig {
    /// The currency of charge requests that name none.
    pub currency: String,
    /// The largest amount one charge event may carry, in minor units.
    pub max_charge: i64,
    /// Seconds between refreshes of live sessions' last-seen time in the journal.
    pub touch_interval_secs: u32,
    /// The least time, in milliseconds, between the starts of two billing commits: under
    /// load, what arrives within it shares one commit (one `fsync`); 0 commits each batch
    /// as soon as the previous one is done. It is the most it adds to the answer of a BYE.
    pub commit_interval_ms: u32,
    /// Seconds after its end a session can still be charged for: a server may send its
    /// last charge just after the BYE, and it still belongs to that session. Checked against
    /// the session's record in the billing store (nothing is kept in memory for it), so a
    /// reload changes it at once.
    pub late_charge_grace_secs: u32,
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            currency: "EUR".into(),
            max_charge: 100_000,
            touch_interval_secs: 10,
            commit_interval_ms: 10,
            late_charge_grace_secs: 600,
        }
    }
}

/// `[storage]`: where durable data lives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [storage] table")]
pub struct StorageConfig {
    /// The data directory (billing store, session journal), relative to the working
    /// directory.
    pub data_dir: PathBuf,
    /// Which database holds the shared state: `sqlite` (a file in `data_dir`; one relay)
    /// or `postgres` (`url`; several relays on one database).
    pub backend: StorageBackendKind,
    /// With `backend = "postgres"`: a `postgres://user[:password]@host[:port]/dbname`
    /// URL or a `key=value` connection string.
    pub url: String,
    /// This relay's name among the relays sharing one database: it holds the lease on the
    /// sessions it journals, so it must stay the same across restarts and differ from
    /// every other relay's. Required with `backend = "postgres"`.
    pub node: String,
    /// How long after a relay last renewed its lease another relay may close and bill its
    /// open sessions (end cause `relay-lost`).
    pub lease_secs: u32,
    /// With `backend = "postgres"`: the most connections this relay opens to the database.
    pub pool_size: u32,
}

impl StorageConfig {
    /// The billing store it names: `data_dir/billing.db` with SQLite, `url` with
    /// PostgreSQL.
    pub fn billing_backend(&self) -> billing::backend::StorageBackend {
        match self.backend {
            StorageBackendKind::Sqlite => billing::backend::StorageBackend::Sqlite {
                path: self.data_dir.join("billing.db"),
            },
            StorageBackendKind::Postgres => billing::backend::StorageBackend::Postgres {
                url: self.url.clone(),
            },
        }
    }

    /// The node name this relay journals its sessions under: `node` on PostgreSQL, `""`
    /// with SQLite (the file is one relay's alone, and sessions journaled before nodes
    /// existed are `""`'s, so a restart recovers them whatever the configuration names).
    pub fn billing_node(&self) -> &str {
        match self.backend {
            StorageBackendKind::Sqlite => "",
            StorageBackendKind::Postgres => &self.node,
        }
    }
}

/// `[storage] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackendKind {
    /// An SQLite file in the data directory (the default).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by several relays.
    Postgres,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./relayd-data"),
            backend: StorageBackendKind::Sqlite,
            url: String::new(),
            node: String::new(),
            lease_secs: 30,
            pool_size: 4,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`: what is logged and how. `RUST_LOG` overrides `level`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [log] table")]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `relayd=debug,sip_core=info`…
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[registrar]`: registration policy (see [`crate::registrar`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [registrar] table")]
pub struct RegistrarConfig {
    /// Shortest registration accepted, seconds (shorter: 423 with Min-Expires).
    pub min_expires: u32,
    /// Longest registration granted, seconds (longer ones are shortened).
    pub max_expires: u32,
    /// Registration time when the REGISTER gives none, seconds.
    pub default_expires: u32,
    /// Most Contacts bound to one user at once.
    pub max_bindings_per_user: usize,
    /// Networks Contact addresses must be in; empty allows every address.
    #[serde(deserialize_with = "one_or_many")]
    pub allowed_contact_nets: Vec<IpNet>,
    /// Number of lock shards of the binding table.
    pub shards: usize,
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        let policy = RegistrarPolicy::default();
        RegistrarConfig {
            min_expires: policy.min_expires,
            max_expires: policy.max_expires,
            default_expires: policy.default_expires,
            max_bindings_per_user: policy.max_bindings_per_user,
            allowed_contact_nets: policy.allowed_contact_nets,
            shards: 16,
        }
    }
}

/// `[directory]`: health probing of application servers (see [`crate::directory`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [directory] table")]
pub struct DirectoryConfig {
    /// Seconds between two OPTIONS probes of a server.
    pub probe_interval_secs: u32,
    /// Missed probes in a row that take a server out.
    pub failure_threshold: u32,
    /// Answered probes in a row that put it back.
    pub recovery_threshold: u32,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        let policy = HealthPolicy::default();
        DirectoryConfig {
            probe_interval_secs: u32::try_from(policy.probe_interval.as_secs()).unwrap_or(30),
            failure_threshold: policy.failure_threshold,
            recovery_threshold: policy.recovery_threshold,
        }
    }
}

/// How an account proves who it is: a plain password (for demos), or the digest HA1 hashes
/// (RFC 7616 §3.4.2: `H(user:realm:password)`), which is what operators should store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret<'a> {
    /// The password itself; the relay computes the hashes at start-up.
    Password(&'a str),
    /// Hex HA1 hashes; either may be missing, and only the algorithms present are offered.
    Ha1 {
        /// MD5 HA1, 32 hex digits.
        md5: Option<&'a str>,
        /// SHA-256 HA1, 64 hex digits.
        sha256: Option<&'a str>,
    },
}

fn redact(value: &Option<String>) -> Option<&'static str> {
    value.as_ref().map(|_| "<redacted>")
}

/// A `[[users]]` entry: a subscriber.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, expecting = "a [[users]] entry")]
pub struct UserConfig {
    /// The user name (the user part of the address of record, the digest username).
    pub name: String,
    /// The plain password (demos only: prefer the HA1 hashes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The MD5 HA1 hash, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ha1_md5: Option<String>,
    /// The SHA-256 HA1 hash, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ha1_sha256: Option<String>,
    /// The digest algorithms this user is challenged with, in order (RFC 8760 §2.4), instead
    /// of `[auth] algorithms`: `["SHA-256", "MD5"]` moves a user whose client takes SHA-256
    /// to it. A user whose only stored hash is `ha1_sha256` must be offered SHA-256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest_algorithms: Option<Vec<String>>,
    /// The tariff plan.
    pub plan: String,
    /// The subscriber class (rules may override it per request).
    pub class: String,
    /// The services subscribed to; `"*"` for every service.
    pub services: Vec<String>,
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig {
            name: String::new(),
            password: None,
            ha1_md5: None,
            ha1_sha256: None,
            digest_algorithms: None,
            plan: String::new(),
            class: "standard".into(),
            services: Vec::new(),
        }
    }
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &redact(&self.password))
            .field("ha1_md5", &redact(&self.ha1_md5))
            .field("ha1_sha256", &redact(&self.ha1_sha256))
            .field("digest_algorithms", &self.digest_algorithms)
            .field("plan", &self.plan)
            .field("class", &self.class)
            .field("services", &self.services)
            .finish()
    }
}

impl UserConfig {
    /// The user's secret.
    pub fn secret(&self) -> Secret<'_> {
        secret(&self.password, &self.ha1_md5, &self.ha1_sha256)
    }

    /// Whether the user subscribes to `service`.
    pub fn subscribes_to(&self, service: &str) -> bool {
        self.services.iter().any(|s| s == "*" || s == service)
    }
}

fn secret<'a>(
    password: &'a Option<String>,
    md5: &'a Option<String>,
    sha256: &'a Option<String>,
) -> Secret<'a> {
    match password {
        Some(password) => Secret::Password(password),
        None => Secret::Ha1 {
            md5: md5.as_deref(),
            sha256: sha256.as_deref(),
        },
    }
}

/// A `[[server_accounts]]` entry: an application-server account, which registers servers
/// and their services (see [`crate::registrar`]) and may send charge requests.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a [[server_accounts]] entry"
)]
pub struct AccountConfig {
    /// The account name (digest username).
    pub name: String,
    /// The plain password (demos only).
    pub password: Option<String>,
    /// The MD5 HA1 hash, hex.
    pub ha1_md5: Option<String>,
    /// The SHA-256 HA1 hash, hex.
    pub ha1_sha256: Option<String>,
    /// The digest algorithms this account is challenged with, in order (RFC 8760 §2.4),
    /// instead of `[auth] algorithms` (appsrv-agent takes `["SHA-256", "MD5"]`).
    pub digest_algorithms: Option<Vec<String>>,
    /// The services it may register; `"*"` for any.
    pub services: Vec<String>,
}

impl Default for AccountConfig {
    fn default() -> Self {
        AccountConfig {
            name: String::new(),
            password: None,
            ha1_md5: None,
            ha1_sha256: None,
            digest_algorithms: None,
            services: vec!["*".into()],
        }
    }
}

impl fmt::Debug for AccountConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountConfig")
            .field("name", &self.name)
            .field("password", &redact(&self.password))
            .field("ha1_md5", &redact(&self.ha1_md5))
            .field("ha1_sha256", &redact(&self.ha1_sha256))
            .field("digest_algorithms", &self.digest_algorithms)
            .field("services", &self.services)
            .finish()
    }
}

impl AccountConfig {
    /// The account's secret.
    pub fn secret(&self) -> Secret<'_> {
        secret(&self.password, &self.ha1_md5, &self.ha1_sha256)
    }

    /// The services the account may register, `None` for any (for
    /// [`crate::registrar::Role::AppServer`]).
    pub fn allowed_services(&self) -> Option<&[String]> {
        (!self.services.iter().any(|s| s == "*")).then_some(self.services.as_slice())
    }
}

/// A `[[services]]` entry: a service the relay delivers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [[services]] entry")]
pub struct ServiceConfig {
    /// The service id, as in `sip:<service>@<relay>`.
    pub name: String,
    /// How its servers are chosen unless a rule says otherwise.
    pub strategy: Strategy,
    /// A line for people.
    pub description: String,
}

/// A `[[servers]]` entry: a static application server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [[servers]] entry")]
pub struct ServerConfig {
    /// A name for logs and reports (default: the URI).
    pub name: String,
    /// The SIP URI to send INVITE legs and probes to.
    pub uri: String,
    /// The services it delivers.
    pub services: Vec<String>,
    /// The most sessions it takes at once (no limit when absent).
    pub capacity: Option<u32>,
    /// The application-server account that speaks for it (may send charge requests for its
    /// sessions).
    pub account: Option<String>,
    /// Whether the relay probes it with OPTIONS (RFC 3261 §11) and takes it out while it
    /// does not answer (default true). With `false` it stays a candidate whatever happens:
    /// for servers that never answer OPTIONS (sipp's UAS without `-aa`); an inquiry it does
    /// not answer still fails over, call by call.
    pub probe: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            name: String::new(),
            uri: String::new(),
            services: Vec::new(),
            capacity: None,
            account: None,
            probe: true,
        }
    }
}

impl ServerConfig {
    /// The name, or the URI when no name is set.
    pub fn display_name(&self) -> &str {
        if self.name.is_empty() {
            &self.uri
        } else {
            &self.name
        }
    }
}

/// How many sessions one subscriber may hold at once when its class has no `[[classes]]`
/// entry and there is no `name = "*"` one.
pub const DEFAULT_MAX_SESSIONS_PER_SUBSCRIBER: u32 = 10;

/// The most `[[classes]] max_sessions` may be.
pub const MAX_SESSIONS_PER_SUBSCRIBER_LIMIT: u32 = 100_000;

/// A `[[classes]]` entry: what one subscriber of a class may hold at once (issue 14, finding
/// 10). The class of a request is the subscriber's `class`, or the one a rule's `set.class`
/// gives it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [[classes]] entry")]
pub struct ClassConfig {
    /// The class, as users and rules name it; `"*"` for every class without an entry of its
    /// own.
    pub name: String,
    /// The most sessions one subscriber of the class holds at once, counting each session of
    /// a forked request and each call still being inquired; one more INVITE is refused with
    /// `486` — 1 to 100000, default 10.
    pub max_sessions: u32,
}

impl Default for ClassConfig {
    fn default() -> Self {
        ClassConfig {
            name: String::new(),
            max_sessions: DEFAULT_MAX_SESSIONS_PER_SUBSCRIBER,
        }
    }
}

/// The relay's whole configuration. See the [module documentation](self).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a relayd configuration")]
pub struct Config {
    /// `[listen]`
    pub listen: ListenConfig,
    /// `[relay]`
    pub relay: RelayConfig,
    /// `[storage]`
    pub storage: StorageConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[registrar]`
    pub registrar: RegistrarConfig,
    /// `[directory]`
    pub directory: DirectoryConfig,
    /// `[auth]`
    pub auth: AuthConfig,
    /// `[session]`
    pub session: SessionConfig,
    /// `[billing]`
    pub billing: BillingConfig,
    /// `[metrics]`
    pub metrics: MetricsConfig,
    /// `[sip]`
    pub sip: SipConfig,
    /// `[limits]`
    pub limits: LimitsConfig,
    /// `[tls]` (see [`crate::tls_config`])
    pub tls: crate::tls_config::TlsConfig,
    /// `[admin]` (see [`crate::admin_config`])
    pub admin: crate::admin_config::AdminConfig,
    /// `[trace]` (see [`crate::trace::config`])
    pub trace: crate::trace::config::TraceConfig,
    /// A second file of `[[users]]` that `relayd user add` rewrites whole; relative to the
    /// configuration file's directory. A file that does not exist yet holds no users.
    pub users_file: Option<PathBuf>,
    /// `[[users]]`: subscribers.
    pub users: Vec<UserConfig>,
    /// `[[server_accounts]]`: application-server accounts.
    pub server_accounts: Vec<AccountConfig>,
    /// `[[services]]`: the services delivered.
    pub services: Vec<ServiceConfig>,
    /// `[[servers]]`: static application servers.
    pub servers: Vec<ServerConfig>,
    /// `[[rules]]`: ordered rules (see [`crate::rules`]).
    pub rules: Vec<RuleConfig>,
    /// `[[classes]]`: limits per subscriber class.
    pub classes: Vec<ClassConfig>,
    /// `[[tariffs]]`, kept as written for the billing crate. `plan` and `service` are read
    /// here to check references (`"*"` or absent: any).
    pub tariffs: Vec<toml::Value>,
    /// The users read from `users_file`.
    #[serde(skip)]
    pub managed_users: Vec<UserConfig>,
    /// The file the configuration was read from.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The content of a `users_file`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsersFile {
    /// The users.
    pub users: Vec<UserConfig>,
}

impl UsersFile {
    /// Reads `path`; a file that does not exist holds no users.
    pub fn load(path: &Path) -> Result<UsersFile, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => parse_toml(&text, path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(UsersFile::default()),
            Err(source) => Err(ConfigError::Io {
                file: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Collects problems with their key paths.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn check_credentials(
    p: &mut Problems,
    key: &str,
    field: &dyn Fn(&str) -> String,
    password: &Option<String>,
    md5: &Option<String>,
    sha256: &Option<String>,
) {
    match (password, md5, sha256) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => p.add(
            field("password"),
            "give either password or ha1_md5/ha1_sha256, not both",
        ),
        (Some(pw), None, None) if pw.is_empty() => p.add(field("password"), "must not be empty"),
        (None, None, None) => p.add(
            key,
            "no credentials: set ha1_md5 and/or ha1_sha256 (see `relayd user add`), or password",
        ),
        _ => {}
    }
    if let Some(h) = md5.as_deref().filter(|h| !is_hex(h, 32)) {
        p.add(
            field("ha1_md5"),
            format!("expected 32 hex digits, got {} characters", h.len()),
        );
    }
    if let Some(h) = sha256.as_deref().filter(|h| !is_hex(h, 64)) {
        p.add(
            field("ha1_sha256"),
            format!("expected 64 hex digits, got {} characters", h.len()),
        );
    }
}

/// Checks a user's or account's `digest_algorithms` (names, not empty) and that the
/// algorithms it is offered (its own list, else `[auth] algorithms`) include one whose HA1
/// is stored: a user holding only `ha1_sha256` must be offered SHA-256.
fn check_digest_algorithms(
    p: &mut Problems,
    field: &dyn Fn(&str) -> String,
    global: &[String],
    own: &Option<Vec<String>>,
    secret: Secret<'_>,
) {
    use sip_core::digest::HashFamily;
    let offered = match own {
        Some(list) if list.is_empty() => {
            p.add(
                field("digest_algorithms"),
                "must name at least one digest algorithm (leave it out for [auth] algorithms)",
            );
            return;
        }
        Some(list) => match algorithms(list) {
            Ok(offered) => offered,
            Err(name) => {
                let j = list.iter().position(|n| *n == name).unwrap_or(0);
                p.add(
                    field(&format!("digest_algorithms[{j}]")),
                    format!("unknown digest algorithm {name:?}: expected MD5, SHA-256, MD5-sess or SHA-256-sess"),
                );
                return;
            }
        },
        // Reported at auth.algorithms.
        None => match algorithms(global) {
            Ok(offered) => offered,
            Err(_) => return,
        },
    };
    let Secret::Ha1 { md5, sha256 } = secret else {
        return; // a password gives both hashes
    };
    let has = |family: HashFamily| match family {
        HashFamily::Md5 => md5.is_some(),
        HashFamily::Sha256 => sha256.is_some(),
    };
    if md5.is_none() && sha256.is_none() {
        return; // reported by check_credentials
    }
    if !offered.iter().any(|a| has(a.family())) {
        let names: Vec<&str> = offered.iter().map(|a| a.name()).collect();
        let whence = if own.is_some() {
            "digest_algorithms"
        } else {
            "[auth] algorithms"
        };
        let (stored, fix) = if md5.is_some() {
            (
                "ha1_md5",
                "set digest_algorithms = [\"MD5\"], or store ha1_sha256 too",
            )
        } else {
            (
                "ha1_sha256",
                "set digest_algorithms = [\"SHA-256\"], or store ha1_md5 too and set [\"SHA-256\", \"MD5\"]",
            )
        };
        p.add(
            field("digest_algorithms"),
            format!(
                "only {stored} is stored, but the user is offered {} ({whence}), so it could never log in: {fix}",
                names.join(", ")
            ),
        );
    }
}

impl Config {
    /// The digest algorithms offered to each user and account that has its own
    /// `digest_algorithms` (RFC 8760 §2.4); the others are offered `[auth] algorithms`.
    /// Names that are not algorithms are left out ([`Config::validate`] reports them).
    pub fn digest_algorithms_by_user(&self) -> HashMap<String, Vec<sip_core::digest::Algorithm>> {
        let users = self.all_users().map(|u| (&u.name, &u.digest_algorithms));
        let accounts = self
            .server_accounts
            .iter()
            .map(|a| (&a.name, &a.digest_algorithms));
        users
            .chain(accounts)
            .filter_map(|(name, list)| {
                let list = algorithms(list.as_deref()?).ok()?;
                (!list.is_empty()).then(|| (name.clone(), list))
            })
            .collect()
    }

    /// Reads, parses and validates the configuration file at `path`, and the users file it
    /// names.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        if let Some(users_file) = config.users_file_path() {
            config.managed_users = UsersFile::load(&users_file)?.users;
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses `text` as the configuration file `file` (types only: see
    /// [`Config::validate`]); the users file is not read.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = parse_toml(text, file)?;
        config.source = Some(file.to_path_buf());
        Ok(config)
    }

    /// The file the configuration came from, for messages.
    pub fn file_name(&self) -> PathBuf {
        self.source
            .clone()
            .unwrap_or_else(|| PathBuf::from(BUILT_IN))
    }

    /// The configuration file's directory, which relative paths are read from.
    pub fn base_dir(&self) -> PathBuf {
        self.source
            .as_deref()
            .and_then(Path::parent)
            .unwrap_or(Path::new(""))
            .to_path_buf()
    }

    /// The users file, resolved against the configuration file's directory.
    pub fn users_file_path(&self) -> Option<PathBuf> {
        let file = self.users_file.as_ref()?;
        let base = self
            .source
            .as_deref()
            .and_then(Path::parent)
            .unwrap_or(Path::new(""));
        Some(base.join(file))
    }

    /// Every subscriber: the configuration file's, then the users file's.
    pub fn all_users(&self) -> impl Iterator<Item = &UserConfig> {
        self.users.iter().chain(self.managed_users.iter())
    }

    /// The subscriber called `name`.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.all_users().find(|u| u.name == name)
    }

    /// The application-server account called `name`.
    pub fn server_account(&self, name: &str) -> Option<&AccountConfig> {
        self.server_accounts.iter().find(|a| a.name == name)
    }

    /// The declared service names.
    pub fn service_names(&self) -> BTreeSet<&str> {
        self.services.iter().map(|s| s.name.as_str()).collect()
    }

    /// The tariff plans the tariffs name, and whether a tariff applies to any plan.
    pub fn tariff_plans(&self) -> (BTreeSet<&str>, bool) {
        let mut plans = BTreeSet::new();
        let mut wildcard = false;
        for tariff in &self.tariffs {
            match tariff.get("plan").and_then(toml::Value::as_str) {
                Some("*") | None => wildcard = true,
                Some(plan) => {
                    plans.insert(plan);
                }
            }
        }
        (plans, wildcard)
    }

    /// Whether `plan` has a tariff (by name, or through a tariff for any plan).
    pub fn plan_known(&self, plan: &str) -> bool {
        let (plans, wildcard) = self.tariff_plans();
        wildcard || plans.contains(plan)
    }

    /// Checks what types cannot, reporting every problem with its key path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.limits.check(&mut p);
        for (key, message) in self.tls.load(&self.base_dir()).err().unwrap_or_default() {
            p.add(key, message);
        }
        for (key, message) in self.trace.problems() {
            p.add(key, message);
        }
        for (key, message) in self.admin.problems(&self.base_dir()) {
            p.add(key, message);
        }
        if let Err(name) = self.auth.digest_algorithms() {
            p.add("auth.algorithms", format!("unknown digest algorithm {name:?}: expected MD5, SHA-256, MD5-sess or SHA-256-sess"));
        } else if self.auth.algorithms.is_empty() {
            p.add("auth.algorithms", "must name at least one digest algorithm");
        }
        let a = &self.auth;
        const WEEK: u32 = 7 * 24 * 3600;
        for (key, value, min, max, unit) in [
            ("auth.max_failures", a.max_failures, 1, 1000, ""),
            ("auth.lockout_secs", a.lockout_secs, 1, WEEK, " seconds"),
            (
                "auth.source_max_failures",
                a.source_max_failures,
                1,
                100_000,
                "",
            ),
            (
                "auth.source_window_secs",
                a.source_window_secs,
                1,
                WEEK,
                " seconds",
            ),
            (
                "auth.source_block_secs",
                a.source_block_secs,
                1,
                WEEK,
                " seconds",
            ),
            (
                "auth.udp_failure_weight",
                a.udp_failure_weight,
                1,
                100,
                " percent",
            ),
            (
                "auth.max_tracked_sources",
                a.max_tracked_sources,
                16,
                1 << 24,
                "",
            ),
            (
                "auth.max_tracked_user_sources",
                a.max_tracked_user_sources,
                16,
                1 << 24,
                "",
            ),
        ] {
            if !(min..=max).contains(&value) {
                p.add(
                    key,
                    format!("{value} is out of range ({min} to {max}{unit})"),
                );
            }
        }
        if !T1_MS_RANGE.contains(&self.sip.t1_ms) {
            p.add(
                "sip.t1_ms",
                format!(
                    "{} is out of range ({} to {} milliseconds)",
                    self.sip.t1_ms,
                    T1_MS_RANGE.start(),
                    T1_MS_RANGE.end()
                ),
            );
        }
        let mut classes: HashMap<&str, usize> = HashMap::new();
        for (i, class) in self.classes.iter().enumerate() {
            if class.name.trim().is_empty() {
                p.add(
                    format!("classes[{i}].name"),
                    "must name a subscriber class (or \"*\" for every class without an entry)",
                );
            } else if let Some(first) = classes.insert(&class.name, i) {
                p.add(
                    format!("classes[{i}].name"),
                    format!("duplicate class `{}` (also classes[{first}])", class.name),
                );
            }
            if !(1..=MAX_SESSIONS_PER_SUBSCRIBER_LIMIT).contains(&class.max_sessions) {
                p.add(
                    format!("classes[{i}].max_sessions"),
                    format!(
                        "{} is out of range (1 to {MAX_SESSIONS_PER_SUBSCRIBER_LIMIT})",
                        class.max_sessions
                    ),
                );
            }
        }
        if a.digest_uri_check().is_none() {
            p.add(
                "auth.digest_uri",
                format!(
                    "expected \"request-uri\" or \"request-uri-or-relay\", got {:?}",
                    a.digest_uri
                ),
            );
        }
        let services = self.service_names();
        let (plans, any_plan) = self.tariff_plans();
        let plan_list = || {
            if plans.is_empty() {
                "no [[tariffs]] name a plan".to_owned()
            } else {
                format!(
                    "plans with tariffs: {}",
                    plans.iter().copied().collect::<Vec<_>>().join(", ")
                )
            }
        };
        let check_plan = |p: &mut Problems, key: String, plan: &str| {
            if plan.trim().is_empty() {
                p.add(key, format!("must name a tariff plan ({})", plan_list()));
            } else if !any_plan && !plans.contains(plan) {
                p.add(key, format!("unknown plan `{plan}` ({})", plan_list()));
            }
        };
        let check_service = |p: &mut Problems, key: String, service: &str, star: bool| {
            if star && service == "*" {
                return;
            }
            if !services.contains(service) {
                p.add(
                    key,
                    format!("unknown service `{service}`: declare it in [[services]]"),
                );
            }
        };

        // [listen], [relay], [storage], [log]
        if self.listen.udp.is_empty() && self.listen.tcp.is_empty() {
            p.add(
                "listen",
                "no udp or tcp address: the relay would listen nowhere",
            );
        }
        let realm = &self.relay.realm;
        if realm.trim().is_empty()
            || realm.contains(['"', '\\'])
            || realm.chars().any(char::is_control)
        {
            p.add(
                "relay.realm",
                "expected a realm like relay.example.com (no quotes)",
            );
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            p.add("storage.data_dir", "must not be empty");
        }
        let st = &self.storage;
        if st.backend == StorageBackendKind::Postgres {
            if st.url.trim().is_empty() {
                p.add(
                    "storage.url",
                    "backend = \"postgres\" needs a URL like postgres://relayd@db.example.com/relayd",
                );
            }
            if st.node.trim().is_empty() {
                p.add(
                    "storage.node",
                    "backend = \"postgres\" needs this relay's name, the same across restarts and unlike every other relay's",
                );
            }
            if st.pool_size == 0 {
                p.add("storage.pool_size", "must be at least 1");
            }
        } else if !st.url.is_empty() {
            p.add(
                "storage.url",
                "is for backend = \"postgres\"; with sqlite the store is a file in data_dir",
            );
        }
        if !st
            .node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || st.node.len() > 64
        {
            p.add(
                "storage.node",
                "expected a name like relay-a (letters, digits, - _ ., at most 64)",
            );
        }
        let touch = u64::from(self.billing.touch_interval_secs);
        if u64::from(st.lease_secs) < 2 * touch.max(1) {
            p.add(
                "storage.lease_secs",
                format!(
                    "must be at least twice billing.touch_interval_secs ({touch} s): a live relay renews its lease at each touch"
                ),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            p.add(
                "log.level",
                format!("expected a filter like `info` or `relayd=debug`: {e}"),
            );
        }

        // [registrar], [directory]
        let r = &self.registrar;
        if r.min_expires == 0 {
            p.add("registrar.min_expires", "must be at least 1");
        }
        if r.max_expires < r.min_expires {
            p.add("registrar.max_expires", "must not be below min_expires");
        }
        if !(r.min_expires..=r.max_expires).contains(&r.default_expires) {
            p.add(
                "registrar.default_expires",
                "must be between min_expires and max_expires",
            );
        }
        if r.max_bindings_per_user == 0 {
            p.add("registrar.max_bindings_per_user", "must be at least 1");
        }
        if !(1..=4096).contains(&r.shards) {
            p.add("registrar.shards", "must be between 1 and 4096");
        }
        // [session] timers (RFC 4028): a day at most; under 90 s only for tests.
        let se = &self.session;
        if !(1..=86_400).contains(&se.min_se_secs) {
            p.add("session.min_se_secs", "must be between 1 and 86400 seconds");
        }
        if !(se.min_se_secs.max(1)..=86_400).contains(&se.session_expires_secs) {
            p.add(
                "session.session_expires_secs",
                "must be between min_se_secs and 86400 seconds",
            );
        }

        let d = &self.directory;
        for (key, value) in [
            ("directory.probe_interval_secs", d.probe_interval_secs),
            ("directory.failure_threshold", d.failure_threshold),
            ("directory.recovery_threshold", d.recovery_threshold),
        ] {
            if value == 0 {
                p.add(key, "must be at least 1");
            }
        }

        // [[services]]
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, service) in self.services.iter().enumerate() {
            let key = format!("services[{i}].name");
            if !is_token(&service.name) || service.name == "*" {
                p.add(
                    key,
                    format!(
                        "expected a service name (a SIP token like `echo`), got {:?}",
                        service.name
                    ),
                );
            } else if let Some(first) = seen.insert(&service.name, i) {
                p.add(
                    key,
                    format!(
                        "duplicate service `{}` (also services[{first}])",
                        service.name
                    ),
                );
            }
        }

        // [[tariffs]]
        for (i, tariff) in self.tariffs.iter().enumerate() {
            let Some(table) = tariff.as_table() else {
                p.add(format!("tariffs[{i}]"), "expected a table");
                continue;
            };
            for field in ["plan", "service"] {
                match table.get(field) {
                    None => {}
                    Some(toml::Value::String(s)) if field == "service" => {
                        check_service(&mut p, format!("tariffs[{i}].service"), s, true)
                    }
                    Some(toml::Value::String(s)) if !s.trim().is_empty() => {}
                    Some(_) => p.add(
                        format!("tariffs[{i}].{field}"),
                        "expected a non-empty string",
                    ),
                }
            }
        }
        // The billing crate's own checks (names, currencies, increments), once the
        // references above hold.
        if !p.0.iter().any(|problem| problem.key.starts_with("tariffs")) {
            if let Err(message) = self.billing_tariffs() {
                p.add("tariffs", message);
            }
        }

        // Subscribers and accounts share one name space: both authenticate by name.
        let mut names: HashMap<&str, String> = HashMap::new();
        let managed = self
            .users_file_path()
            .map(|f| f.display().to_string())
            .unwrap_or_default();
        let users = self
            .users
            .iter()
            .enumerate()
            .map(|(i, u)| (format!("users[{i}]"), u))
            .chain(
                self.managed_users
                    .iter()
                    .enumerate()
                    .map(|(i, u)| (format!("users[{i}] in {managed}"), u)),
            );
        for (key, user) in users {
            // The " in FILE" suffix, if any, goes after the field name.
            let (base, suffix) = match key.split_once(" in ") {
                Some((base, file)) => (base.to_owned(), format!(" in {file}")),
                None => (key.clone(), String::new()),
            };
            let field = |f: &str| format!("{base}.{f}{suffix}");
            if !is_token(&user.name) {
                p.add(
                    field("name"),
                    format!("expected a user name (a SIP token), got {:?}", user.name),
                );
            } else if let Some(first) = names.insert(&user.name, key.clone()) {
                p.add(
                    field("name"),
                    format!("duplicate name `{}` (also {first})", user.name),
                );
            }
            check_credentials(
                &mut p,
                &key,
                &field,
                &user.password,
                &user.ha1_md5,
                &user.ha1_sha256,
            );
            check_digest_algorithms(
                &mut p,
                &field,
                &self.auth.algorithms,
                &user.digest_algorithms,
                user.secret(),
            );
            check_plan(&mut p, field("plan"), &user.plan);
            if user.class.trim().is_empty() {
                p.add(field("class"), "must not be empty");
            }
            for (j, service) in user.services.iter().enumerate() {
                check_service(&mut p, field(&format!("services[{j}]")), service, true);
            }
        }
        for (i, account) in self.server_accounts.iter().enumerate() {
            let key = format!("server_accounts[{i}]");
            if !is_token(&account.name) {
                p.add(
                    format!("{key}.name"),
                    format!(
                        "expected an account name (a SIP token), got {:?}",
                        account.name
                    ),
                );
            } else if let Some(first) = names.insert(&account.name, key.clone()) {
                p.add(
                    format!("{key}.name"),
                    format!("duplicate name `{}` (also {first})", account.name),
                );
            }
            check_credentials(
                &mut p,
                &key,
                &|f| format!("{key}.{f}"),
                &account.password,
                &account.ha1_md5,
                &account.ha1_sha256,
            );
            check_digest_algorithms(
                &mut p,
                &|f| format!("{key}.{f}"),
                &self.auth.algorithms,
                &account.digest_algorithms,
                account.secret(),
            );
            if account.services.is_empty() {
                p.add(
                    format!("{key}.services"),
                    "list the services it may register, or \"*\"",
                );
            }
            for (j, service) in account.services.iter().enumerate() {
                check_service(&mut p, format!("{key}.services[{j}]"), service, true);
            }
        }

        // [[servers]]
        for (i, server) in self.servers.iter().enumerate() {
            let key = format!("servers[{i}]");
            match sip_core::uri::Uri::parse(server.uri.trim()) {
                Ok(uri) if (uri.is_sip() || uri.is_sips()) && uri.host().is_some() => {}
                _ => p.add(
                    format!("{key}.uri"),
                    format!(
                        "expected a SIP URI like sip:127.0.0.1:5080, got {:?}",
                        server.uri
                    ),
                ),
            }
            if server.services.is_empty() {
                p.add(format!("{key}.services"), "list the services it delivers");
            }
            for (j, service) in server.services.iter().enumerate() {
                check_service(&mut p, format!("{key}.services[{j}]"), service, false);
            }
            if server.capacity == Some(0) {
                p.add(
                    format!("{key}.capacity"),
                    "must be at least 1 (leave it out for no limit)",
                );
            }
        }

        // [[rules]]
        if let Err(RuleErrors(errors)) = RuleSet::compile(&self.rules) {
            for error in errors {
                p.add(error.key, error.message);
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(service) = &rule.set.service {
                if is_token(service) {
                    check_service(&mut p, format!("rules[{i}].set.service"), service, false);
                }
            }
            if let Some(plan) = &rule.set.plan {
                if !plan.trim().is_empty() {
                    check_plan(&mut p, format!("rules[{i}].set.plan"), plan);
                }
            }
        }

        if p.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                file: self.file_name(),
                problems: p.0,
            })
        }
    }

    /// The most sessions one subscriber of `class` may hold at once: its `[[classes]]`
    /// entry, else the `"*"` entry, else [`DEFAULT_MAX_SESSIONS_PER_SUBSCRIBER`].
    pub fn max_sessions_of(&self, class: &str) -> u32 {
        let entry = |name: &str| self.classes.iter().find(|c| c.name == name);
        entry(class)
            .or_else(|| entry("*"))
            .map_or(DEFAULT_MAX_SESSIONS_PER_SUBSCRIBER, |c| c.max_sessions)
    }

    /// The timing limits every call lives by, from `[session]` and `[sip]`.
    pub fn session_limits(&self) -> crate::call::SessionLimits {
        let s = &self.session;
        crate::call::SessionLimits {
            inquiry_timeout: Duration::from_millis(s.inquiry_timeout_ms),
            answer_timeout: Duration::from_secs(u64::from(s.answer_timeout_secs)),
            ack_timeout: self.sip.t1_times_64(),
            probe_interval: Duration::from_secs(u64::from(s.probe_interval_secs)),
            fork_timeout: Duration::from_secs(u64::from(s.fork_timeout_secs)),
            session_timer: sip_core::dialog::session_timer::Policy {
                session_expires: s.session_expires_secs,
                min_se: s.min_se_secs,
            },
        }
    }

    /// The registrar policy of `[registrar]`.
    pub fn registrar_policy(&self) -> RegistrarPolicy {
        RegistrarPolicy {
            min_expires: self.registrar.min_expires,
            max_expires: self.registrar.max_expires,
            default_expires: self.registrar.default_expires,
            max_bindings_per_user: self.registrar.max_bindings_per_user,
            allowed_contact_nets: self.registrar.allowed_contact_nets.clone(),
        }
    }

    /// An empty registrar with the configured policy and shards.
    pub fn build_registrar(&self) -> Registrar {
        Registrar::new(self.registrar_policy(), self.registrar.shards)
    }

    /// The probing policy of `[directory]`.
    pub fn health_policy(&self) -> HealthPolicy {
        HealthPolicy {
            probe_interval: Duration::from_secs(u64::from(self.directory.probe_interval_secs)),
            failure_threshold: self.directory.failure_threshold,
            recovery_threshold: self.directory.recovery_threshold,
        }
    }

    /// A directory holding the static servers.
    pub fn build_directory(&self) -> Result<Directory, DirectoryError> {
        let directory = Directory::new(self.health_policy());
        for server in &self.servers {
            directory.add_static_with_probe(
                server.display_name(),
                &server.uri,
                &server.services,
                server.capacity,
                server.probe,
                server.account.clone(),
            )?;
        }
        Ok(directory)
    }

    fn billing_tariffs(&self) -> Result<billing::tariff::TariffTable, String> {
        use serde::Deserialize as _;
        billing::tariff::TariffTable::deserialize(toml::Value::Array(self.tariffs.clone()))
            .map_err(|e| e.to_string().trim().to_string())
    }

    /// The `[[tariffs]]` as the billing crate's table.
    pub fn tariff_table(&self) -> Result<billing::tariff::TariffTable, ConfigError> {
        self.billing_tariffs().map_err(|e| ConfigError::Invalid {
            file: self.file_name(),
            problems: vec![Problem {
                key: "tariffs".into(),
                message: e.to_string(),
            }],
        })
    }

    /// The compiled rules, with the UTC offset and each service's own strategy.
    pub fn build_rules(&self) -> Result<RuleSet, RuleErrors> {
        let strategies = self
            .services
            .iter()
            .map(|s| (s.name.clone(), s.strategy))
            .collect();
        Ok(RuleSet::compile(&self.rules)?
            .with_utc_offset(self.relay.utc_offset.0)
            .with_service_strategies(strategies))
    }

    /// A summary for people (`relayd check-config`).
    pub fn summary(&self) -> String {
        let list = |v: &[String]| v.join(", ");
        let addrs = |v: &[SocketAddr]| {
            if v.is_empty() {
                "off".to_owned()
            } else {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("configuration: {}", self.file_name().display()));
        line(format!(
            "listen: udp {}; tcp {}",
            addrs(&self.listen.udp),
            addrs(&self.listen.tcp)
        ));
        line(format!(
            "realm: {} (rules' local time UTC{})",
            self.relay.realm, self.relay.utc_offset
        ));
        line(format!(
            "data directory: {}",
            self.storage.data_dir.display()
        ));
        let r = &self.registrar;
        let nets = if r.allowed_contact_nets.is_empty() {
            "any address".to_owned()
        } else {
            r.allowed_contact_nets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        line(format!(
            "registrar: expires {}..{} s (default {}), at most {} contacts per user, contacts from {nets}",
            r.min_expires, r.max_expires, r.default_expires, r.max_bindings_per_user
        ));
        line(format!(
            "directory: probe every {} s, down after {} missed probes, up after {} answered",
            self.directory.probe_interval_secs,
            self.directory.failure_threshold,
            self.directory.recovery_threshold
        ));
        let l = &self.limits;
        line(format!(
            "limits: tcp connections {} ({} per address), message within {} ms, idle {} s, \
             write {} ms; {}",
            l.max_connections,
            l.max_connections_per_address,
            l.message_timeout_ms,
            l.idle_timeout_secs,
            l.write_timeout_ms,
            match l.rate_limit() {
                None => "no request rate limit".to_owned(),
                Some(r) => format!(
                    "{} requests/s per address (burst {}), exempt [{}]",
                    r.per_second,
                    r.burst,
                    r.exempt
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        ));
        line(format!("services: {}", self.services.len()));
        for s in &self.services {
            line(format!("  {} (strategy {})", s.name, s.strategy));
        }
        line(format!("static servers: {}", self.servers.len()));
        for s in &self.servers {
            line(format!(
                "  {} -> {} [{}]",
                s.display_name(),
                s.uri,
                list(&s.services)
            ));
        }
        let users: Vec<&UserConfig> = self.all_users().collect();
        match self.users_file_path() {
            Some(path) => line(format!(
                "users: {} ({} from {})",
                users.len(),
                self.managed_users.len(),
                path.display()
            )),
            None => line(format!("users: {}", users.len())),
        }
        for u in users {
            let secret = match u.secret() {
                Secret::Password(_) => "password",
                Secret::Ha1 { .. } => "ha1",
            };
            line(format!(
                "  {} plan {} class {} services [{}] ({secret})",
                u.name,
                u.plan,
                u.class,
                list(&u.services)
            ));
        }
        line(format!("server accounts: {}", self.server_accounts.len()));
        for a in &self.server_accounts {
            line(format!("  {} services [{}]", a.name, list(&a.services)));
        }
        let mut limits = vec![format!("* {}", self.max_sessions_of("*"))];
        limits.extend(
            self.classes
                .iter()
                .filter(|c| c.name != "*")
                .map(|c| format!("{} {}", c.name, c.max_sessions)),
        );
        line(format!(
            "sessions per subscriber, by class: {}",
            limits.join(", ")
        ));
        line(format!("rules: {}", self.rules.len()));
        for (i, rule) in self.rules.iter().enumerate() {
            let kind = if rule.default { " (default)" } else { "" };
            line(format!("  {i}: {}{kind}", rule.name));
        }
        let (plans, any_plan) = self.tariff_plans();
        let mut named: Vec<&str> = plans.into_iter().collect();
        if any_plan {
            named.push("* (default)");
        }
        let named = if named.is_empty() {
            "none".to_owned()
        } else {
            named.join(", ")
        };
        line(format!("tariffs: {} (plans: {named})", self.tariffs.len()));
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/relayd.toml")
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("relayd.toml"))
    }

    fn parse_error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    fn invalid(text: &str) -> Vec<Problem> {
        match parse(text).unwrap().validate().unwrap_err() {
            ConfigError::Invalid { problems, .. } => problems,
            other => panic!("{other}"),
        }
    }

    fn keys(text: &str) -> Vec<String> {
        invalid(text).into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn defaults_with_no_file() {
        let config = Config::default();
        config.validate().unwrap();
        assert_eq!(config.listen.udp, [DEFAULT_LISTEN]);
        assert_eq!(config.listen.tcp, [DEFAULT_LISTEN]);
        assert_eq!(config.listen.udp[0].to_string(), "127.0.0.1:5060");
        assert_eq!(config.storage.data_dir, PathBuf::from("./relayd-data"));
        assert!(config.users.is_empty() && config.services.is_empty() && config.rules.is_empty());
        assert_eq!(config.file_name(), PathBuf::from(BUILT_IN));
        // An empty file is the defaults.
        assert_eq!(parse("").unwrap().listen, config.listen);
        assert!(config
            .summary()
            .contains("listen: udp 127.0.0.1:5060; tcp 127.0.0.1:5060"));
    }

    #[test]
    fn example_file_loads_with_exactly_the_reference_content() {
        let config = Config::load(&example_path()).unwrap();
        assert_eq!(config.listen.udp, [DEFAULT_LISTEN]);
        assert_eq!(config.listen.tcp, [DEFAULT_LISTEN]);
        assert_eq!(config.relay.realm, "relay.test");
        assert_eq!(config.storage.data_dir, PathBuf::from("./relayd-data"));

        let users: Vec<&UserConfig> = config.all_users().collect();
        assert_eq!(users.len(), 2);
        let alice = config.user("alice").unwrap();
        assert_eq!(alice.secret(), Secret::Password("alice-secret"));
        assert_eq!(alice.plan, "basic");
        assert_eq!(alice.services, ["echo", "clock"]);
        assert!(alice.subscribes_to("clock") && !alice.subscribes_to("video"));
        let bob = config.user("bob").unwrap();
        assert_eq!(bob.secret(), Secret::Password("bob-secret"));
        assert_eq!(bob.plan, "premium");
        assert!(
            bob.subscribes_to("echo")
                && bob.subscribes_to("clock")
                && bob.subscribes_to("anything")
        );

        assert_eq!(config.server_accounts.len(), 1);
        let as1 = config.server_account("as1").unwrap();
        assert_eq!(as1.secret(), Secret::Password("as1-secret"));

        let services: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(services, ["echo", "clock"]);
        let servers: Vec<(&str, Vec<String>)> = config
            .servers
            .iter()
            .map(|s| (s.uri.as_str(), s.services.clone()))
            .collect();
        assert_eq!(
            servers,
            [
                ("sip:127.0.0.1:5080", vec!["echo".to_owned()]),
                ("sip:127.0.0.1:5081", vec!["clock".to_owned()])
            ]
        );

        assert!(config.servers.iter().all(|s| s.probe));
        assert_eq!(
            config.limits,
            LimitsConfig::default(),
            "the example's [limits] are the defaults"
        );
        assert_eq!(config.auth.algorithms, ["MD5"]);
        assert!(config.digest_algorithms_by_user().is_empty());

        let (plans, any) = config.tariff_plans();
        assert!(plans.contains("basic") && plans.contains("premium"));
        assert!(any, "the example has a default tariff");
        assert!(config.tariffs.iter().all(|t| t.get("currency").is_some()));

        // The pieces build.
        let directory = config.build_directory().unwrap();
        assert_eq!(directory.services(), ["clock", "echo"]);
        let rules = config.build_rules().unwrap();
        assert!(rules.names().last().is_some());
        let _ = config.build_registrar();
        assert!(config.summary().contains("realm: relay.test"));
    }

    #[test]
    fn bad_socket_address_names_file_key_and_expectation() {
        let message = parse_error("[listen]\nudp = \"nowhere\"\n");
        assert_eq!(
            message,
            "relayd.toml: key `listen.udp`: expected a socket address like 127.0.0.1:5060, got \"nowhere\" (line 2, column 7)"
        );
        let message = parse_error("[listen]\ntcp = [\"127.0.0.1:5060\", 5061]\n");
        assert!(
            message.contains("key `listen.tcp[1]`") && message.contains("got the number 5061"),
            "{message}"
        );
        let config =
            parse("[listen]\nudp = [\"127.0.0.1:5060\", \"[::1]:5060\"]\ntcp = []\n").unwrap();
        assert_eq!(config.listen.udp.len(), 2);
        assert!(config.listen.tcp.is_empty());
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_the_key() {
        let message = parse_error("[listen]\nudpp = \"127.0.0.1:5060\"\n");
        assert!(message.starts_with("relayd.toml: "), "{message}");
        assert!(message.contains("unknown field `udpp`"), "{message}");
        assert!(message.contains("listen"), "{message}");

        let message = parse_error("[registrar]\nmin_expires = \"soon\"\n");
        assert!(message.contains("key `registrar.min_expires`"), "{message}");
        assert!(message.contains("line 2"), "{message}");

        let message = parse_error("[[users]]\nname = \"a\"\n[[users]]\nname = \"b\"\nplan = 3\n");
        assert!(message.contains("key `users[1].plan`"), "{message}");

        let message = parse_error("[[rules]]\nname = \"r\"\nmatch = { ruri_usr = \"x\" }\n");
        assert!(message.contains("rules[0].match"), "{message}");
        assert!(message.contains("unknown field `ruri_usr`"), "{message}");

        let message = parse_error("[[services]]\nname = \"echo\"\nstrategy = \"fastest\"\n");
        assert!(message.contains("key `services[0].strategy`"), "{message}");
        assert!(message.contains("round-robin"), "{message}");

        let message = parse_error("[relay]\nutc_offset = \"CET\"\n");
        assert!(
            message
                .contains("key `relay.utc_offset`: expected a UTC offset like +01:00, got \"CET\""),
            "{message}"
        );

        let message = parse_error("[registrar]\nallowed_contact_nets = [\"10.0.0.0/33\"]\n");
        assert!(
            message.contains(
                "key `registrar.allowed_contact_nets[0]`: expected a network like 127.0.0.0/8"
            ),
            "{message}"
        );

        let message = parse_error("listen = 5\n");
        assert!(
            message.contains("key `listen`") && message.contains("[listen] table"),
            "{message}"
        );

        let message = parse_error("[listen\nudp = 1\n");
        assert!(
            message.starts_with("relayd.toml: ") && message.contains("line 1"),
            "{message}"
        );
    }

    const BASE: &str = r#"
        [[services]]
        name = "echo"
        [[tariffs]]
        name = "echo-basic"
        plan = "basic"
        service = "echo"
        rate = 1
        currency = "EUR"
    "#;

    #[test]
    fn validation_names_each_key() {
        let text = format!(
            r#"{BASE}
            [[users]]
            name = "alice"
            password = "x"
            plan = "gold"
            services = ["echo", "video"]
            [[users]]
            name = "alice"
            ha1_md5 = "abc"
            plan = "basic"
            [[server_accounts]]
            name = "as1"
            services = ["video"]
            [[servers]]
            uri = "http://example.com"
            services = ["video"]
            capacity = 0
            [[rules]]
            name = "r"
            match = {{ ruri_user = "(" }}
            set = {{ service = "video", plan = "gold" }}
            [[rules]]
            name = "d"
            default = true
            "#
        );
        assert_eq!(
            keys(&text),
            [
                "users[0].plan",
                "users[0].services[1]",
                "users[1].name",
                "users[1].ha1_md5",
                "server_accounts[0]",
                "server_accounts[0].services[0]",
                "servers[0].uri",
                "servers[0].services[0]",
                "servers[0].capacity",
                "rules[0].match.ruri_user",
                "rules[0].set.service",
                "rules[0].set.plan",
            ]
        );
        let problems = invalid(&text);
        assert_eq!(
            problems[0].message,
            "unknown plan `gold` (plans with tariffs: basic)"
        );
        let error = parse(&text).unwrap().validate().unwrap_err().to_string();
        assert!(
            error.lines().all(|l| l.starts_with("relayd.toml: key `")),
            "{error}"
        );
    }

    #[test]
    fn validation_of_sections() {
        assert_eq!(
            keys("[listen]\nudp = []\ntcp = []\n[relay]\nrealm = \"\"\n[log]\nlevel = \"[[[\"\n"),
            ["listen", "relay.realm", "log.level"]
        );
        assert_eq!(
            keys("[registrar]\nmin_expires = 100\nmax_expires = 50\nmax_bindings_per_user = 0\nshards = 0\n[directory]\nfailure_threshold = 0\n"),
            [
                "registrar.max_expires",
                "registrar.default_expires",
                "registrar.max_bindings_per_user",
                "registrar.shards",
                "directory.failure_threshold"
            ]
        );
        assert_eq!(
            keys("[[services]]\nname = \"echo\"\n[[services]]\nname = \"echo\"\n[[services]]\nname = \"a b\"\n[[tariffs]]\nservice = \"video\"\n[[tariffs]]\nplan = 1\n"),
            ["services[1].name", "services[2].name", "tariffs[0].service", "tariffs[1].plan"]
        );
        assert_eq!(
            keys(&format!("{BASE}\n[[users]]\nname = \"u\"\nplan = \"basic\"\npassword = \"p\"\nha1_sha256 = \"00\"\n")),
            ["users[0].password", "users[0].ha1_sha256"]
        );
        assert_eq!(
            keys(&format!("{BASE}\n[[users]]\nname = \"u\"\nplan = \"basic\"\npassword = \"p\"\n[[server_accounts]]\nname = \"u\"\npassword = \"q\"\n")),
            ["server_accounts[0].name"]
        );
    }

    #[test]
    fn flood_limits_have_safe_defaults_and_bad_values_are_named() {
        let config = Config::default();
        let limits = &config.limits;
        assert_eq!(
            (limits.max_connections, limits.max_connections_per_address),
            (4096, 64)
        );
        let transport = limits.transport(sip_core::transport::TransportConfig::default());
        assert_eq!(transport.message_timeout, Duration::from_secs(10));
        assert_eq!(transport.write_timeout, Duration::from_secs(10));
        assert_eq!(transport.idle_timeout, Duration::from_secs(300));
        let rate = limits.rate_limit().unwrap();
        assert_eq!(
            (rate.per_second, rate.burst, rate.replies_per_second),
            (100, 200, 10)
        );
        assert!(
            rate.exempt
                .iter()
                .any(|n| n.contains("127.0.0.1".parse().unwrap()))
                && rate
                    .exempt
                    .iter()
                    .any(|n| n.contains("::1".parse().unwrap())),
            "loopback is exempt by default (the benchmark calls from it)"
        );

        let text = "[limits]\nmax_connections = 100\nmax_connections_per_address = 5\n\
                    message_timeout_ms = 2000\nidle_timeout_secs = 60\nwrite_timeout_ms = 500\n\
                    requests_per_second = 20\nrequest_burst = 40\nrefusals_per_second = 2\n\
                    rate_exempt = \"10.0.0.0/8\"\nmax_tracked_addresses = 1024\n";
        let config = parse(text).unwrap();
        config.validate().unwrap();
        let transport = config
            .limits
            .transport(sip_core::transport::TransportConfig::default());
        assert_eq!(
            (
                transport.max_connections,
                transport.max_connections_per_source
            ),
            (100, 5)
        );
        assert_eq!(transport.message_timeout, Duration::from_millis(2000));
        assert_eq!(transport.idle_timeout, Duration::from_secs(60));
        assert_eq!(transport.write_timeout, Duration::from_millis(500));
        let rate = config.limits.rate_limit().unwrap();
        assert_eq!(
            (rate.per_second, rate.burst, rate.replies_per_second),
            (20, 40, 2)
        );
        assert_eq!(rate.exempt, ["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(rate.max_tracked, 1024);
        assert!(
            parse("[limits]\nrequests_per_second = 0\n")
                .unwrap()
                .limits
                .rate_limit()
                .is_none(),
            "0 turns the rate limit off"
        );
        assert!(parse("[limits]\nrate_exempt = []\n")
            .unwrap()
            .limits
            .rate_limit()
            .unwrap()
            .exempt
            .is_empty());

        let text = "[limits]\nmax_connections = 0\nmax_connections_per_address = 1000001\n\
                    message_timeout_ms = 99\nidle_timeout_secs = 0\nwrite_timeout_ms = 600001\n\
                    requests_per_second = 1000001\nrequest_burst = 0\n\
                    refusals_per_second = 100001\nmax_tracked_addresses = 15\n";
        assert_eq!(
            keys(text),
            [
                "limits.max_connections",
                "limits.max_connections_per_address",
                "limits.message_timeout_ms",
                "limits.idle_timeout_secs",
                "limits.write_timeout_ms",
                "limits.requests_per_second",
                "limits.request_burst",
                "limits.refusals_per_second",
                "limits.max_tracked_addresses",
            ]
        );
        let error = parse(text).unwrap().validate().unwrap_err().to_string();
        assert!(
            error.contains("relayd.toml: key `limits.message_timeout_ms`: 99 is out of range (100 to 600000 milliseconds)"),
            "the error names the file and the key: {error}"
        );
        let message = parse_error("[limits]\nrate_exempt = [\"10.0.0.0/33\"]\n");
        assert!(
            message.contains("key `limits.rate_exempt")
                && message.contains("expected a network like 127.0.0.0/8"),
            "{message}"
        );
        let message = parse_error("[limits]\nmax_connection = 5\n");
        assert!(message.contains("max_connection"), "{message}");
    }

    #[test]
    fn authentication_limits_have_safe_defaults_and_bad_values_are_named() {
        let config = Config::default();
        let policy = config.auth.failure_policy();
        assert_eq!(policy, crate::auth::FailurePolicy::default());
        assert_eq!(
            config.auth.digest_uri_check(),
            Some(crate::auth::DigestUriCheck::RequestUriOrRelay)
        );
        let text = "[auth]\nmax_failures = 3\nlockout_secs = 120\nsource_max_failures = 8\n\
                    source_window_secs = 30\nsource_block_secs = 900\nudp_failure_weight = 25\n\
                    max_tracked_sources = 1024\nmax_tracked_user_sources = 2048\n\
                    digest_uri = \"request-uri\"\n";
        let config = parse(text).unwrap();
        config.validate().unwrap();
        let policy = config.auth.failure_policy();
        assert_eq!(policy.max_failures, 3);
        assert_eq!(policy.lockout, Duration::from_secs(120));
        assert_eq!(policy.source_max_failures, 8);
        assert_eq!(policy.source_window, Duration::from_secs(30));
        assert_eq!(policy.source_block, Duration::from_secs(900));
        assert_eq!(policy.udp_weight_percent, 25);
        assert_eq!(policy.max_tracked_sources, 1024);
        assert_eq!(policy.max_tracked_user_sources, 2048);
        assert_eq!(
            config.auth.digest_uri_check(),
            Some(crate::auth::DigestUriCheck::RequestUri)
        );

        let text = "[auth]\nmax_failures = 0\nlockout_secs = 0\nsource_max_failures = 0\n\
                    source_window_secs = 0\nsource_block_secs = 604801\nudp_failure_weight = 101\n\
                    max_tracked_sources = 15\nmax_tracked_user_sources = 16777217\n\
                    digest_uri = \"anything\"\n";
        assert_eq!(
            keys(text),
            [
                "auth.max_failures",
                "auth.lockout_secs",
                "auth.source_max_failures",
                "auth.source_window_secs",
                "auth.source_block_secs",
                "auth.udp_failure_weight",
                "auth.max_tracked_sources",
                "auth.max_tracked_user_sources",
                "auth.digest_uri",
            ]
        );
        let problems = invalid(text);
        assert_eq!(
            problems[5].message,
            "101 is out of range (1 to 100 percent)"
        );
        assert!(
            problems[8].message.contains("request-uri-or-relay"),
            "{:?}",
            problems[8]
        );
        let error = parse(text).unwrap().validate().unwrap_err().to_string();
        assert!(
            error.contains("relayd.toml: key `auth.udp_failure_weight`: 101 is out of range"),
            "the error names the file and the key: {error}"
        );
        let message = parse_error("[auth]\nsource_max_failures = \"many\"\n");
        assert!(
            message.contains("key `auth.source_max_failures`") && message.contains("line 2"),
            "{message}"
        );
    }

    /// Issue 14, finding 11: `t1_ms * 64` wrapped (a panic in a debug build); now t1_ms is
    /// range-checked, naming the file and key, and 64·T1 saturates.
    #[test]
    fn t1_is_range_checked_and_64_t1_never_wraps() {
        let limits = Config::default().session_limits();
        assert_eq!(limits.ack_timeout, Duration::from_secs(32));
        assert_eq!(limits.inquiry_timeout, Duration::from_secs(4));
        let fast = parse("[sip]\nt1_ms = 50\n").unwrap();
        fast.validate().unwrap();
        assert_eq!(fast.sip.t1(), Duration::from_millis(50));
        assert_eq!(
            fast.session_limits().ack_timeout,
            Duration::from_millis(3_200)
        );

        let text = format!("[sip]\nt1_ms = {}\n", i64::MAX);
        let huge = parse(&text).unwrap();
        // Never validated: still no wrap and no panic.
        assert_eq!(huge.sip.t1_times_64(), Duration::from_secs(60 * 64));
        assert_eq!(
            huge.session_limits().ack_timeout,
            Duration::from_secs(3_840)
        );
        assert_eq!(
            SipConfig { t1_ms: u64::MAX }.t1_times_64(),
            Duration::from_secs(3_840)
        );
        assert_eq!(SipConfig { t1_ms: 0 }.t1(), Duration::from_millis(1));
        let error = huge.validate().unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "relayd.toml: key `sip.t1_ms`: {} is out of range (1 to 60000 milliseconds)",
                i64::MAX
            )
        );
        for bad in [0, 60_001] {
            assert_eq!(keys(&format!("[sip]\nt1_ms = {bad}\n")), ["sip.t1_ms"]);
        }
        parse("[sip]\nt1_ms = 60000\n").unwrap().validate().unwrap();
    }

    #[test]
    fn session_limits_per_class_default_to_ten_and_bad_entries_are_named() {
        let config = Config::default();
        assert_eq!(
            config.max_sessions_of("standard"),
            DEFAULT_MAX_SESSIONS_PER_SUBSCRIBER
        );
        assert_eq!(DEFAULT_MAX_SESSIONS_PER_SUBSCRIBER, 10);
        assert!(config
            .summary()
            .contains("sessions per subscriber, by class: * 10"));

        let text = "[[classes]]\nname = \"gold\"\nmax_sessions = 2\n\
                    [[classes]]\nname = \"*\"\nmax_sessions = 4\n";
        let config = parse(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.max_sessions_of("gold"), 2);
        assert_eq!(config.max_sessions_of("standard"), 4, "the \"*\" entry");
        assert!(config
            .summary()
            .contains("sessions per subscriber, by class: * 4, gold 2"));
        let only_gold = parse("[[classes]]\nname = \"gold\"\n").unwrap();
        assert_eq!(
            only_gold.max_sessions_of("gold"),
            10,
            "max_sessions defaults to 10"
        );

        let text = "[[classes]]\nname = \"\"\n\
                    [[classes]]\nname = \"gold\"\nmax_sessions = 0\n\
                    [[classes]]\nname = \"gold\"\nmax_sessions = 100001\n";
        assert_eq!(
            keys(text),
            [
                "classes[0].name",
                "classes[1].max_sessions",
                "classes[2].name",
                "classes[2].max_sessions"
            ]
        );
        let error = parse(text).unwrap().validate().unwrap_err().to_string();
        assert!(
            error.contains(
                "relayd.toml: key `classes[1].max_sessions`: 0 is out of range (1 to 100000)"
            ),
            "{error}"
        );
        assert!(
            error.contains("key `classes[2].name`: duplicate class `gold` (also classes[1])"),
            "{error}"
        );
        let message = parse_error("[[classes]]\nname = \"gold\"\nmax = 3\n");
        assert!(message.contains("classes[0]"), "{message}");
    }

    #[test]
    fn a_default_tariff_accepts_any_plan_and_hashes_are_credentials() {
        let text = format!(
            "{BASE}\n[[tariffs]]\nname = \"any\"\nplan = \"*\"\nrate = 5\ncurrency = \"EUR\"\n[[users]]\nname = \"u\"\nplan = \"whatever\"\nha1_md5 = \"{}\"\nha1_sha256 = \"{}\"\nservices = [\"*\"]\n",
            "a".repeat(32),
            "B".repeat(64)
        );
        let config = parse(&text).unwrap();
        config.validate().unwrap();
        let md5 = "a".repeat(32);
        let sha = "B".repeat(64);
        assert_eq!(
            config.user("u").unwrap().secret(),
            Secret::Ha1 {
                md5: Some(&md5),
                sha256: Some(&sha)
            }
        );
        assert!(
            !format!("{:?}", config.user("u").unwrap()).contains(&md5),
            "Debug redacts"
        );
    }

    #[test]
    fn users_file_is_read_relative_to_the_config_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("relayd.toml");
        std::fs::write(
            &config_path,
            format!("users_file = \"users.toml\"\n{BASE}\n[[users]]\nname = \"alice\"\npassword = \"a\"\nplan = \"basic\"\n"),
        )
        .unwrap();
        // Not there yet: no users from it.
        let config = Config::load(&config_path).unwrap();
        assert_eq!(
            config.users_file_path().unwrap(),
            dir.path().join("users.toml")
        );
        assert!(config.managed_users.is_empty());

        std::fs::write(
            dir.path().join("users.toml"),
            format!("[[users]]\nname = \"carol\"\nha1_md5 = \"{}\"\nplan = \"basic\"\nservices = [\"echo\"]\n", "0".repeat(32)),
        )
        .unwrap();
        let config = Config::load(&config_path).unwrap();
        assert_eq!(config.all_users().count(), 2);
        assert!(config.user("carol").is_some());

        std::fs::write(
            dir.path().join("users.toml"),
            "[[users]]\nname = \"alice\"\npassword = \"x\"\nplan = \"nope\"\n",
        )
        .unwrap();
        let message = Config::load(&config_path).unwrap_err().to_string();
        assert!(message.contains("key `users[0].name in "), "{message}");
        assert!(message.contains("key `users[0].plan in "), "{message}");

        std::fs::write(dir.path().join("users.toml"), "[[users]]\nnam = \"x\"\n").unwrap();
        let message = Config::load(&config_path).unwrap_err().to_string();
        assert!(
            message.contains("users.toml: ") && message.contains("unknown field `nam`"),
            "{message}"
        );
    }

    #[test]
    fn digest_algorithms_default_to_md5_and_are_chosen_per_user() {
        let config = Config::default();
        assert_eq!(config.auth.algorithms, ["MD5"]);
        assert_eq!(
            config.auth.digest_algorithms().unwrap(),
            [sip_core::digest::Algorithm::Md5]
        );
        let sha = "b".repeat(64);
        let md5 = "a".repeat(32);
        let text = format!(
            "{BASE}\n[[users]]\nname = \"u\"\nplan = \"basic\"\npassword = \"p\"\n\
             digest_algorithms = [\"SHA-256\", \"MD5\"]\n\
             [[users]]\nname = \"v\"\nplan = \"basic\"\nha1_sha256 = \"{sha}\"\n\
             digest_algorithms = [\"SHA-256\"]\n\
             [[users]]\nname = \"w\"\nplan = \"basic\"\npassword = \"p\"\n\
             [[server_accounts]]\nname = \"as\"\nha1_md5 = \"{md5}\"\nha1_sha256 = \"{sha}\"\n\
             digest_algorithms = [\"sha-256\", \"md5\"]\n"
        );
        let config = parse(&text).unwrap();
        config.validate().unwrap();
        let by_user = config.digest_algorithms_by_user();
        use sip_core::digest::Algorithm::{Md5, Sha256};
        assert_eq!(by_user.get("u").unwrap(), &[Sha256, Md5]);
        assert_eq!(by_user.get("v").unwrap(), &[Sha256]);
        assert_eq!(by_user.get("as").unwrap(), &[Sha256, Md5]);
        assert!(!by_user.contains_key("w"), "w takes [auth] algorithms");
    }

    #[test]
    fn digest_algorithm_problems_name_the_key() {
        let sha = "b".repeat(64);
        let md5 = "a".repeat(32);
        let text = format!(
            "{BASE}\n[[users]]\nname = \"u\"\nplan = \"basic\"\npassword = \"p\"\n\
             digest_algorithms = [\"MD5\", \"SHA-512\"]\n\
             [[users]]\nname = \"v\"\nplan = \"basic\"\npassword = \"p\"\ndigest_algorithms = []\n\
             [[users]]\nname = \"w\"\nplan = \"basic\"\nha1_sha256 = \"{sha}\"\n\
             [[users]]\nname = \"x\"\nplan = \"basic\"\nha1_md5 = \"{md5}\"\n\
             digest_algorithms = [\"SHA-256\"]\n\
             [[server_accounts]]\nname = \"as\"\nha1_sha256 = \"{sha}\"\n"
        );
        assert_eq!(
            keys(&text),
            [
                "users[0].digest_algorithms[1]",
                "users[1].digest_algorithms",
                "users[2].digest_algorithms",
                "users[3].digest_algorithms",
                "server_accounts[0].digest_algorithms",
            ]
        );
        let problems = invalid(&text);
        assert!(problems[0].message.contains("\"SHA-512\""), "{problems:?}");
        assert!(
            problems[2].message.contains("only ha1_sha256 is stored")
                && problems[2]
                    .message
                    .contains("offered MD5 ([auth] algorithms)")
                && problems[2].message.contains("[\"SHA-256\"]"),
            "{problems:?}"
        );
        assert!(
            problems[3].message.contains("only ha1_md5 is stored"),
            "{problems:?}"
        );
        let error = parse(&text).unwrap().validate().unwrap_err().to_string();
        assert!(
            error.contains("relayd.toml: key `users[2].digest_algorithms`: only ha1_sha256"),
            "{error}"
        );
        // Offered SHA-256 by [auth] algorithms, the same user is fine.
        let fixed = text.replacen(
            "[[services]]",
            "[auth]\nalgorithms = [\"SHA-256\", \"MD5\"]\n[[services]]",
            1,
        );
        assert!(!keys(&fixed).contains(&"users[2].digest_algorithms".to_string()));
        assert!(
            parse_error("[[users]]\nname = \"u\"\ndigest_algorithms = \"MD5\"\n")
                .contains("key `users[0].digest_algorithms`")
        );
    }

    #[test]
    fn servers_are_probed_unless_probe_is_false() {
        let text = format!(
            "{BASE}\n[[servers]]\nuri = \"sip:127.0.0.1:5080\"\nservices = [\"echo\"]\n\
             [[servers]]\nuri = \"sip:127.0.0.1:5081\"\nservices = [\"echo\"]\nprobe = false\n"
        );
        let config = parse(&text).unwrap();
        config.validate().unwrap();
        assert!(config.servers[0].probe);
        assert!(!config.servers[1].probe);
        let directory = config.build_directory().unwrap();
        let servers = directory.servers_of("echo");
        assert!(servers[0].is_probed() && !servers[1].is_probed());
        let due = directory.probe_due(std::time::Instant::now());
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].uri_text(), "sip:127.0.0.1:5080");
        let message = parse_error(&text.replace("probe = false", "probe = \"no\""));
        assert!(message.contains("key `servers[1].probe`"), "{message}");
    }

    #[test]
    fn missing_file_names_it() {
        let message = Config::load(Path::new("/nonexistent/relayd.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("/nonexistent/relayd.toml: cannot read"),
            "{message}"
        );
    }

    #[test]
    fn utc_offsets() {
        assert_eq!("+01:00".parse::<UtcOffset>().unwrap(), UtcOffset(3600));
        assert_eq!("-05:30".parse::<UtcOffset>().unwrap(), UtcOffset(-19800));
        assert_eq!("Z".parse::<UtcOffset>().unwrap(), UtcOffset(0));
        assert_eq!(UtcOffset(-19800).to_string(), "-05:30");
        for bad in ["1:00", "+1:00", "+19:00", "+01:60", "CET", ""] {
            assert!(bad.parse::<UtcOffset>().is_err(), "{bad}");
        }
    }

    #[test]
    fn postgres_storage_needs_a_url_and_a_node_name_and_a_lease_longer_than_two_touches() {
        let text = format!("{BASE}\n[storage]\nbackend = \"postgres\"\nlease_secs = 5\n");
        assert_eq!(
            keys(&text),
            ["storage.url", "storage.node", "storage.lease_secs"]
        );
        let text = format!(
            "{BASE}\n[storage]\nbackend = \"postgres\"\nurl = \"postgres://r@127.0.0.1/r\"\nnode = \"relay-a\"\n"
        );
        let config: Config = toml::from_str(&text).unwrap();
        config.validate().unwrap();
        let text = format!("{BASE}\n[storage]\nurl = \"postgres://r@h/r\"\nnode = \"a b\"\n");
        assert_eq!(keys(&text), ["storage.url", "storage.node"]);
    }
}
