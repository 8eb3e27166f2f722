//! Digest authentication of terminals and application-server accounts (RFC 3261 §22,
//! RFC 7616, RFC 8760): who is asking, or the challenge to send back.
//!
//! REGISTER is challenged with 401 / `WWW-Authenticate`, every other request with 407 /
//! `Proxy-Authenticate` (the relay acts as a proxy-like element). Unknown users are challenged
//! exactly like known ones (the digest server verifies them against a dummy), so the answers
//! do not tell an attacker which user names exist.
//!
//! # Failed attempts (issue 14)
//!
//! Failures are counted in the pike / fail2ban tradition ([`limits`]), never per user name
//! alone — a stranger sending wrong answers for alice from its own address must not lock
//! alice out everywhere:
//!
//! * per *source* (an IPv4 address or IPv6 /64), for every failure whatever the name:
//!   past `[auth] source_max_failures` within `source_window_secs` the source is refused —
//!   every request from it that needs authentication is answered `503` with `Retry-After`
//!   (RFC 3261 §21.5.4: a temporary refusal, to be tried again later; `403` would tell a
//!   client never to repeat it, §21.4.4) — for `source_block_secs`;
//! * per (user, source) for users that exist: past `max_failures` within `lockout_secs` the
//!   user's credentials are no longer checked from that source for `lockout_secs` — answered
//!   with a challenge as if the password were wrong, the same answer an unknown name gets, so
//!   the lock-out tells an attacker nothing about which names exist, and its guesses while
//!   locked are wasted even when right;
//! * a failure over UDP counts `udp_failure_weight` percent of one over TCP or TLS, since a
//!   UDP source address can be forged;
//! * unknown user names are counted per source only and never stored; both tables are
//!   bounded and keyed by a per-process random hash key (see [`limits`]).
//!
//! Every failure adds the same weight to its source whether the name exists or not, and the
//! refusal of a source answers every name alike, so a run of wrong answers gets the same
//! responses for an existing user as for a made-up one (SIPVicious' svwar and svcrack learn
//! nothing), while guessing from any one address stays slow.
//!
//! # The digest `uri`
//!
//! Credentials are computed over a `uri` that must designate the Request-URI (RFC 7616
//! §3.4.6, RFC 2617 §3.2.2.5: "the server SHOULD return a 400 Bad Request error" when it does
//! not), else a captured answer for one service could be replayed on a request for another.
//! A mismatch gets `400`, not a new challenge: a new challenge would be answered over the
//! same wrong `uri` again, and the RFC's 400 tells the client's operator what is wrong. The
//! check runs before the user is looked up, so it says nothing about names. With `[auth]
//! digest_uri = "request-uri-or-relay"` (the default) a `uri` that names the relay itself
//! (no user part, one of its domains or addresses) is accepted too: sipp, the load generator
//! of Debian's `sip-tester`, always answers over `sip:<remote host>:<port>` (its
//! `-auth_uri`; an IPv6 host without brackets), never the Request-URI. `digest_uri =
//! "request-uri"` refuses that too.
//!
//! # Which algorithms are offered
//!
//! Every user is challenged with the relay's default algorithms (`[auth] algorithms`, MD5
//! alone unless configured: baresip 1.0 refuses a 401 that carries a challenge it does not
//! know, and most softphones speak only MD5), except users and accounts given their own
//! list (`digest_algorithms`, e.g. SHA-256 then MD5, RFC 8760 §2.4). The user is the
//! username of the credentials when the request carries some for the realm, else the user
//! of the To URI (REGISTER) or the From URI (anything else). Unknown users get the default,
//! exactly like known users without a list of their own. Credentials computed with an
//! algorithm the user was not offered are refused (challenged again), so a user moved to
//! SHA-256 alone cannot be pushed back to MD5.

pub mod limits;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rsip::prelude::*;
use rsip::{Header, Request};
use sip_core::digest::{Algorithm, Credentials, DigestError, DigestServer, StoredCredential};
use sip_core::uri::Uri;
use sip_core::Peer;
use tracing::{info, warn};

use self::limits::{weight, Rule, SourceKey, Table, UserKeys};

/// Who may authenticate: a lookup from user name to stored HA1 hashes, and the names the
/// relay itself goes by (for the digest `uri` check).
pub trait CredentialStore: Send + Sync {
    /// The stored credential of `user`, or `None` when no such account exists.
    fn credential(&self, user: &str) -> Option<StoredCredential>;

    /// Whether `uri` names the relay itself (one of its domains or addresses): accepted as a
    /// digest `uri` under [`DigestUriCheck::RequestUriOrRelay`]. None by default.
    fn names_relay(&self, _uri: &Uri) -> bool {
        false
    }
}

impl CredentialStore for HashMap<String, StoredCredential> {
    fn credential(&self, user: &str) -> Option<StoredCredential> {
        self.get(user).cloned()
    }
}

/// The outcome of checking a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// The request carries valid credentials of this user.
    Authenticated(String),
    /// Send a challenge: no credentials, or credentials that failed (`stale` when only the
    /// nonce had expired, RFC 7616 §3.3).
    Challenge {
        /// Whether to mark the challenge `stale=true`.
        stale: bool,
        /// Why credentials failed, for the log (`None` when there were none).
        failure: Option<String>,
    },
    /// The source address failed too often: refuse with 503 and `Retry-After` (RFC 3261
    /// §21.5.4, §20.33) without looking at the credentials.
    SourceRefused {
        /// How long the source stays refused.
        retry_after: Duration,
    },
    /// The credentials cannot be read at all: answer 400 with this reason.
    Malformed(String),
    /// The digest `uri` does not designate the Request-URI (RFC 7616 §3.4.6): answer 400.
    UriMismatch {
        /// The `uri` of the credentials.
        uri: String,
    },
}

/// Which digest `uri` values are taken for a request (RFC 7616 §3.4.6; see the [module
/// documentation](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DigestUriCheck {
    /// Only a URI equal to the Request-URI (RFC 3261 §19.1.4).
    RequestUri,
    /// The Request-URI, or a URI naming the relay itself (what sipp sends).
    #[default]
    RequestUriOrRelay,
}

/// Limits on failed attempts (see the [module documentation](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Whole failed attempts of one user from one source before its credentials are no
    /// longer checked from there.
    pub max_failures: u32,
    /// How long those are counted from the first, and how long the user stays locked out
    /// from that source.
    pub lockout: Duration,
    /// Whole failed attempts from one source, any user names, before the source is refused.
    pub source_max_failures: u32,
    /// How long those are counted from the first.
    pub source_window: Duration,
    /// How long a source stays refused.
    pub source_block: Duration,
    /// What one failure over UDP weighs, in percent of one over TCP or TLS (1 to 100).
    pub udp_weight_percent: u32,
    /// Sources counted at once (the table's bound).
    pub max_tracked_sources: usize,
    /// (user, source) pairs counted at once (the table's bound).
    pub max_tracked_user_sources: usize,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy {
            max_failures: 5,
            lockout: Duration::from_secs(60),
            source_max_failures: 20,
            source_window: Duration::from_secs(60),
            source_block: Duration::from_secs(300),
            udp_weight_percent: 50,
            max_tracked_sources: 65_536,
            max_tracked_user_sources: 65_536,
        }
    }
}

impl FailurePolicy {
    fn user_rule(&self) -> Rule {
        Rule {
            max_failures: self.max_failures,
            window: self.lockout,
            block: self.lockout,
        }
    }

    fn source_rule(&self) -> Rule {
        Rule {
            max_failures: self.source_max_failures,
            window: self.source_window,
            block: self.source_block,
        }
    }
}

/// Counters of the authenticator, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// Failed digest answers (wrong password, unknown user, algorithm not offered, or a
    /// user locked out from that source).
    pub failures: AtomicU64,
    /// Times a (user, source) pair was locked out.
    pub user_lockouts: AtomicU64,
    /// Times a source was refused.
    pub sources_refused: AtomicU64,
    /// Requests refused because their source was.
    pub source_refusals: AtomicU64,
    /// Counters evicted from a full table.
    pub evictions: AtomicU64,
    /// Credentials whose digest `uri` did not designate the Request-URI.
    pub uri_mismatches: AtomicU64,
}

/// One failed attempt as relays sharing their counters tell each other of it
/// ([`Authenticator::set_failure_sink`], [`Authenticator::count_shared_failure`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFailure {
    /// The user it was for, when the user exists (then it counts for (user, source) too).
    pub user: Option<String>,
    /// Where it came from.
    pub source: IpAddr,
    /// Its weight, as the relay that saw it weighed it by transport.
    pub weight: u32,
}

/// Where an authenticator reports the failures it counts itself, to share them with other
/// relays.
pub trait FailureSink: Send + Sync {
    /// `failure` was counted here.
    fn failed(&self, failure: SharedFailure);
}

/// Which header pair a challenge uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// 401 with `WWW-Authenticate`, answered in `Authorization` (registrars, UAS).
    Www,
    /// 407 with `Proxy-Authenticate`, answered in `Proxy-Authorization` (proxies).
    Proxy,
}

impl ChallengeKind {
    /// The kind the relay uses for a request method: 401 for REGISTER, 407 otherwise.
    pub fn for_method(method: &rsip::Method) -> ChallengeKind {
        if *method == rsip::Method::Register {
            ChallengeKind::Www
        } else {
            ChallengeKind::Proxy
        }
    }

    /// The status code of the challenge.
    pub fn status(self) -> u16 {
        match self {
            ChallengeKind::Www => 401,
            ChallengeKind::Proxy => 407,
        }
    }
}

/// Checks credentials (RFC 3261 §22.4, RFC 7616 §3.4) and builds challenges (§22.1, RFC
/// 8760 §2.4), and counts failed attempts per source and per (user, source) (see the
/// [module documentation](self)); shared by every task of the relay.
pub struct Authenticator {
    digest: DigestServer,
    policy: FailurePolicy,
    uri_check: DigestUriCheck,
    /// Failures per source address.
    sources: Table<SourceKey>,
    /// Failures per (keyed hash of a known user's name, source address).
    user_sources: Table<(u64, SourceKey)>,
    user_keys: UserKeys,
    stats: AuthStats,
    /// Offered to users without a list of their own (and to unknown users).
    default: Vec<Algorithm>,
    /// Users and accounts with their own list.
    per_user: HashMap<String, Vec<Algorithm>>,
    /// Every algorithm offered to anyone, in the order the digest server challenges.
    accepted: Vec<Algorithm>,
    /// Told of every failure counted here (relays sharing their counters).
    sink: OnceLock<Arc<dyn FailureSink>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Authenticator {
    /// An authenticator for `realm`, whose nonces are keyed by `secret` and live `nonce_ttl`.
    pub fn new(
        realm: &str,
        secret: [u8; 32],
        nonce_ttl: Duration,
        policy: FailurePolicy,
    ) -> Authenticator {
        let default = vec![Algorithm::Md5];
        Authenticator {
            digest: DigestServer::new(realm, secret, nonce_ttl).with_algorithms(&default),
            uri_check: DigestUriCheck::default(),
            sources: Table::new(policy.max_tracked_sources),
            user_sources: Table::new(policy.max_tracked_user_sources),
            user_keys: UserKeys::new(),
            stats: AuthStats::default(),
            policy,
            accepted: default.clone(),
            default,
            per_user: HashMap::new(),
            sink: OnceLock::new(),
        }
    }

    /// From now on, tells `sink` of every failure counted here (only the first sink set is
    /// kept), so that relays sharing a database lock a user out together.
    pub fn set_failure_sink(&self, sink: Arc<dyn FailureSink>) {
        if self.sink.set(sink).is_err() {
            warn!("a failure sink was already set; the new one is ignored");
        }
    }

    /// Counts a failure another relay saw, as if seen here, without reporting it to the
    /// sink: the failures of a user, or from a source, add up across relays.
    pub fn count_shared_failure(&self, failure: &SharedFailure, now: Instant) {
        let source = SourceKey::of(failure.source);
        if let Some(user) = failure.user.as_deref() {
            let counted = self.user_sources.fail(
                (self.user_keys.of(user), source),
                failure.weight,
                &self.policy.user_rule(),
                now,
            );
            if counted.newly_refused {
                self.stats.user_lockouts.fetch_add(1, Ordering::Relaxed);
                info!(
                    %user,
                    source = %failure.source,
                    "user locked out from this source after too many failed attempts (counted across relays)"
                );
            }
        }
        let counted = self
            .sources
            .fail(source, failure.weight, &self.policy.source_rule(), now);
        if counted.newly_refused {
            self.stats.sources_refused.fetch_add(1, Ordering::Relaxed);
            warn!(
                source = %failure.source,
                "source refused after too many failed authentication attempts (counted across relays)"
            );
        }
    }

    /// Takes digest `uri` values as `check` says (RFC 7616 §3.4.6); the default is
    /// [`DigestUriCheck::RequestUriOrRelay`].
    pub fn with_uri_check(mut self, check: DigestUriCheck) -> Authenticator {
        self.uri_check = check;
        self
    }

    /// Challenges users without a list of their own with `algorithms`, in this order (RFC
    /// 8760 §2.4); MD5 alone when not called. An empty list is ignored.
    pub fn with_algorithms(mut self, algorithms: &[Algorithm]) -> Authenticator {
        if !algorithms.is_empty() {
            self.default = algorithms.to_vec();
            return self.update_accepted();
        }
        self
    }

    /// Challenges each user named in `per_user` with its own algorithms, in order, instead
    /// of the default (`digest_algorithms` of a `[[users]]` or `[[server_accounts]]` entry).
    /// Empty lists are left out.
    pub fn with_user_algorithms(
        mut self,
        per_user: HashMap<String, Vec<Algorithm>>,
    ) -> Authenticator {
        self.per_user = per_user
            .into_iter()
            .filter(|(_, list)| !list.is_empty())
            .collect();
        self.update_accepted()
    }

    fn update_accepted(mut self) -> Authenticator {
        let mut accepted = self.default.clone();
        let mut extra: Vec<Algorithm> = self.per_user.values().flatten().copied().collect();
        extra.sort_by_key(|a| a.name());
        for a in extra {
            if !accepted.contains(&a) {
                accepted.push(a);
            }
        }
        self.digest = self.digest.with_algorithms(&accepted);
        self.accepted = accepted;
        self
    }

    /// The algorithms offered to `user` (RFC 8760 §2.4), in order: its own list, else the
    /// default (also for an unknown or unnamed user).
    pub fn algorithms_for(&self, user: Option<&str>) -> &[Algorithm] {
        user.and_then(|u| self.per_user.get(u))
            .map_or(self.default.as_slice(), Vec::as_slice)
    }

    /// The realm challenged.
    pub fn realm(&self) -> &str {
        self.digest.realm()
    }

    /// The counters, for the metrics endpoint.
    pub fn stats(&self) -> &AuthStats {
        &self.stats
    }

    /// How many sources have failure counters.
    pub fn tracked_sources(&self) -> usize {
        self.sources.len()
    }

    /// How many (user, source) pairs have failure counters.
    pub fn tracked_user_sources(&self) -> usize {
        self.user_sources.len()
    }

    /// Counts one failure from `source` (weighted by `transport`), and for `user` from there
    /// when the user exists; whether the source is refused now.
    fn record_failure(
        &self,
        user: Option<&str>,
        source: SourceKey,
        from: &Peer,
        now: Instant,
    ) -> bool {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let weight = weight(from.transport, self.policy.udp_weight_percent);
        if let Some(sink) = self.sink.get() {
            sink.failed(SharedFailure {
                user: user.map(str::to_owned),
                source: from.addr.ip(),
                weight,
            });
        }
        if let Some(user) = user {
            let counted = self.user_sources.fail(
                (self.user_keys.of(user), source),
                weight,
                &self.policy.user_rule(),
                now,
            );
            self.stats
                .evictions
                .fetch_add(counted.evicted, Ordering::Relaxed);
            if counted.newly_refused {
                self.stats.user_lockouts.fetch_add(1, Ordering::Relaxed);
                info!(
                    %user,
                    source = %from.addr.ip(),
                    lockout_secs = self.policy.lockout.as_secs(),
                    "user locked out from this source after too many failed attempts"
                );
            }
        }
        let counted = self
            .sources
            .fail(source, weight, &self.policy.source_rule(), now);
        self.stats
            .evictions
            .fetch_add(counted.evicted, Ordering::Relaxed);
        if counted.newly_refused {
            self.stats.sources_refused.fetch_add(1, Ordering::Relaxed);
            warn!(
                source = %from.addr.ip(),
                transport = ?from.transport,
                block_secs = self.policy.source_block.as_secs(),
                "source refused after too many failed authentication attempts"
            );
        }
        counted.newly_refused
    }

    /// The answer to a failed attempt: a challenge, unless this failure got the source
    /// refused (then the same refusal every later request from it gets).
    fn failed(
        &self,
        user: Option<&str>,
        source: SourceKey,
        from: &Peer,
        now: Instant,
        failure: &str,
    ) -> AuthOutcome {
        if self.record_failure(user, source, from, now) {
            self.stats.source_refusals.fetch_add(1, Ordering::Relaxed);
            return AuthOutcome::SourceRefused {
                retry_after: self.policy.source_block,
            };
        }
        AuthOutcome::Challenge {
            stale: false,
            failure: Some(failure.into()),
        }
    }

    /// Checks the credentials of `req` (in the header that `kind` names) against `store`,
    /// for a request that came from `from`, at `now`.
    pub fn check(
        &self,
        req: &Request,
        kind: ChallengeKind,
        store: &dyn CredentialStore,
        from: &Peer,
        now: Instant,
    ) -> AuthOutcome {
        let source = SourceKey::of(from.addr.ip());
        if let Some(until) = self.sources.refused_until(&source, now) {
            self.stats.source_refusals.fetch_add(1, Ordering::Relaxed);
            return AuthOutcome::SourceRefused {
                retry_after: until.saturating_duration_since(now),
            };
        }
        let method = req.method.to_string();
        let mut malformed = None;
        let mut found = None;
        for header in req.headers.iter() {
            let value = match (kind, header) {
                (ChallengeKind::Www, Header::Authorization(a)) => a.value(),
                (ChallengeKind::Proxy, Header::ProxyAuthorization(a)) => a.value(),
                _ => continue,
            };
            // Another scheme than Digest is no credentials of ours: the request is
            // challenged as if it had none (RFC 3261 §22.4, RFC 4475 §3.3.7).
            let scheme = value.trim_start().split([' ', '\t']).next().unwrap_or("");
            if !scheme.eq_ignore_ascii_case("Digest") {
                continue;
            }
            match Credentials::parse(value) {
                Ok(c) if c.realm == self.realm() => {
                    found = Some(c);
                    break;
                }
                Ok(_) => {} // credentials for another realm: not ours to check
                Err(e) => malformed = Some(e.to_string()),
            }
        }
        let Some(creds) = found else {
            return match malformed {
                Some(reason) => AuthOutcome::Malformed(reason),
                None => AuthOutcome::Challenge {
                    stale: false,
                    failure: None,
                },
            };
        };
        if !self.uri_designates_request(&creds, req, store) {
            self.stats.uri_mismatches.fetch_add(1, Ordering::Relaxed);
            return AuthOutcome::UriMismatch { uri: creds.uri };
        }
        if !self
            .algorithms_for(Some(&creds.username))
            .contains(&creds.algorithm)
        {
            // Counted against the source alone, as for an unknown name.
            let failure = format!(
                "algorithm {} not offered to this user",
                creds.algorithm.name()
            );
            return self.failed(None, source, from, now, &failure);
        }
        match self
            .digest
            .verify(&creds, &method, |u| store.credential(u), unix_now())
        {
            // Locked out from this source: the right password is not taken either, and the
            // answer is the one a wrong password gets (also for a right answer to an expired
            // nonce, whose `stale=true` would otherwise tell a right guess from a wrong one).
            Ok(_) | Err(DigestError::Stale) if self.locked_out(&creds.username, source, now) => {
                let user = Some(creds.username.as_str());
                self.failed(user, source, from, now, "user locked out from this source")
            }
            Ok(v) => {
                self.user_sources
                    .reset(&(self.user_keys.of(&v.username), source));
                AuthOutcome::Authenticated(v.username)
            }
            Err(DigestError::Stale) => AuthOutcome::Challenge {
                stale: true,
                failure: Some("nonce expired".into()),
            },
            // Unknown and known users get the same answer; only a known name is counted
            // per (user, source), and no name is ever stored.
            Err(DigestError::WrongResponse) => {
                self.failed(Some(&creds.username), source, from, now, "wrong password")
            }
            Err(DigestError::UnknownUser) => self.failed(None, source, from, now, "unknown user"),
            Err(e) => AuthOutcome::Challenge {
                stale: false,
                failure: Some(e.to_string()),
            },
        }
    }

    /// Whether `user` is locked out from `source` at `now`.
    fn locked_out(&self, user: &str, source: SourceKey, now: Instant) -> bool {
        self.user_sources
            .refused_until(&(self.user_keys.of(user), source), now)
            .is_some()
    }

    /// Whether the digest `uri` of `creds` is one taken for `req` (see [`DigestUriCheck`]).
    fn uri_designates_request(
        &self,
        creds: &Credentials,
        req: &Request,
        store: &dyn CredentialStore,
    ) -> bool {
        if creds.uri_matches(&req.uri.to_string()) {
            return true;
        }
        match self.uri_check {
            DigestUriCheck::RequestUri => false,
            DigestUriCheck::RequestUriOrRelay => Uri::parse(&creds.uri)
                .ok()
                .or_else(|| bracket_bare_ipv6(&creds.uri))
                .is_some_and(|u| u.is_sip() && u.user().is_none() && store.names_relay(&u)),
        }
    }

    /// The challenge headers for a 401 or 407 to a user without a list of its own: one per
    /// default algorithm, in order, sharing one nonce (RFC 8760 §2.4).
    pub fn challenge_headers(&self, kind: ChallengeKind, stale: bool) -> Vec<Header> {
        self.challenge_headers_with(kind, stale, &self.default)
    }

    /// The challenge headers for a 401 or 407 answering `req`: the algorithms offered to its
    /// user (see the [module documentation](self)), in order.
    pub fn challenge_headers_for(
        &self,
        req: &Request,
        kind: ChallengeKind,
        stale: bool,
    ) -> Vec<Header> {
        if self.per_user.is_empty() {
            return self.challenge_headers(kind, stale);
        }
        let user = request_user(req, kind, self.realm());
        self.challenge_headers_with(kind, stale, self.algorithms_for(user.as_deref()))
    }

    fn challenge_headers_with(
        &self,
        kind: ChallengeKind,
        stale: bool,
        wanted: &[Algorithm],
    ) -> Vec<Header> {
        // One value per accepted algorithm, in `accepted` order (DigestServer::challenge).
        let values = self.digest.challenge(unix_now(), stale);
        let by_algorithm: Vec<(Algorithm, String)> =
            self.accepted.iter().copied().zip(values).collect();
        wanted
            .iter()
            .filter_map(|w| {
                by_algorithm
                    .iter()
                    .find(|(a, _)| a == w)
                    .map(|(_, v)| v.clone())
            })
            .map(|value| match kind {
                ChallengeKind::Www => {
                    Header::WwwAuthenticate(rsip::headers::WwwAuthenticate::new(value))
                }
                ChallengeKind::Proxy => {
                    Header::ProxyAuthenticate(rsip::headers::ProxyAuthenticate::new(value))
                }
            })
            .collect()
    }

    /// Forgets expired nonces and failure counts; call now and then.
    pub fn prune(&self) {
        self.digest.prune(unix_now());
        self.prune_failures(Instant::now());
    }

    /// Forgets the failure counts that no longer count at `now`.
    pub fn prune_failures(&self, now: Instant) {
        self.sources.prune(&self.policy.source_rule(), now);
        self.user_sources.prune(&self.policy.user_rule(), now);
    }
}

/// sipp's digest `uri` toward an IPv6 relay, `sip:<address>:<port>` with the address not in
/// brackets (it prints `sip:%s:%d`), read as the URI it means (`sip:[::1]:5060`); `None`
/// for anything else.
fn bracket_bare_ipv6(uri: &str) -> Option<Uri> {
    let rest = uri.strip_prefix("sip:")?;
    let (host, port) = rest.rsplit_once(':')?;
    let ip: std::net::Ipv6Addr = host.parse().ok()?;
    let port: u16 = port.parse().ok()?;
    Uri::parse(&format!("sip:[{ip}]:{port}")).ok()
}

/// The user a request speaks for, to choose the algorithms of its challenge: the username
/// of its credentials for `realm`, else the user part of the To URI (REGISTER, RFC 3261
/// §10.2: the address of record) or of the From URI. `None` when none can be read.
fn request_user(req: &Request, kind: ChallengeKind, realm: &str) -> Option<String> {
    for header in req.headers.iter() {
        let value = match (kind, header) {
            (ChallengeKind::Www, Header::Authorization(a)) => a.value(),
            (ChallengeKind::Proxy, Header::ProxyAuthorization(a)) => a.value(),
            _ => continue,
        };
        if let Ok(c) = Credentials::parse(value) {
            if c.realm == realm {
                return Some(c.username);
            }
        }
    }
    let register = req.method == rsip::Method::Register;
    let value = req.headers.iter().find_map(|h| match h {
        Header::To(to) if register => Some(to.value()),
        Header::From(from) if !register => Some(from.value()),
        _ => None,
    })?;
    uri_user(value)
}

/// The user part of the SIP or SIPS URI of a From or To value (`"A" <sip:alice@host>;tag=1`,
/// `sip:alice@host;tag=1`), as written; `None` when there is none (a `tel:` URI has none).
fn uri_user(value: &str) -> Option<String> {
    let address = sip_core::address::FromTo::parse(value).ok()?;
    let uri = address.uri();
    if !uri.is_sip() {
        return None;
    }
    uri.user().filter(|u| !u.is_empty()).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use rand::RngCore;
    use std::net::SocketAddr;

    fn store() -> HashMap<String, StoredCredential> {
        let mut m = HashMap::new();
        m.insert(
            "alice".to_string(),
            StoredCredential::from_password("alice", "relay.test", "alice-secret"),
        );
        m
    }

    /// A request from the head `text` (start line and headers, no blank line), with
    /// `auth` in header `auth_header` when given.
    fn parse_request(mut text: String, auth_header: &str, auth: Option<String>) -> Request {
        if let Some(a) = auth {
            text.push_str(&format!("{auth_header}: {a}\r\n"));
        }
        text.push_str("\r\n");
        match rsip::SipMessage::try_from(text.as_str()).unwrap() {
            rsip::SipMessage::Request(r) => r,
            _ => panic!("not a request"),
        }
    }

    fn request(auth: Option<String>) -> Request {
        parse_request(
            "INVITE sip:echo@relay.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
             From: <sip:alice@relay.test>;tag=1\r\nTo: <sip:echo@relay.test>\r\nCall-ID: a@b\r\n\
             CSeq: 1 INVITE\r\nContent-Length: 0\r\n"
                .to_string(),
            "Proxy-Authorization",
            auth,
        )
    }

    fn answer(auth: &Authenticator, user: &str, password: &str, nc: u32) -> String {
        let challenges = auth.challenge_headers(ChallengeKind::Proxy, false);
        let values: Vec<String> = challenges
            .iter()
            .map(|h| h.to_string().split_once(": ").unwrap().1.to_string())
            .collect();
        sip_core::digest::respond(
            &values[0],
            "INVITE",
            "sip:echo@relay.test",
            user,
            password,
            "cn0nce",
            nc,
        )
        .unwrap()
    }

    fn authenticator(max_failures: u32) -> Authenticator {
        with_policy(policy(max_failures))
    }

    #[test]
    fn no_credentials_are_challenged_with_md5_alone_by_default() {
        let auth = authenticator(3);
        let headers = auth.challenge_headers_for(&request(None), ChallengeKind::Proxy, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        let text = headers[0].to_string();
        assert!(
            text.starts_with("Proxy-Authenticate: Digest") && text.contains("algorithm=MD5"),
            "{text}"
        );
        assert!(text.contains("qop=\"auth\""), "{text}");
    }

    fn sha256_for(users: &[&str]) -> Authenticator {
        let per_user = users
            .iter()
            .map(|u| (u.to_string(), vec![Algorithm::Sha256, Algorithm::Md5]))
            .collect();
        authenticator(5).with_user_algorithms(per_user)
    }

    fn algorithms_of(headers: &[Header]) -> Vec<String> {
        headers
            .iter()
            .map(|h| {
                let text = h.to_string();
                let value = text.split_once(": ").unwrap().1.to_string();
                sip_core::digest::Challenge::parse(&value)
                    .unwrap()
                    .algorithm
                    .name()
                    .to_string()
            })
            .collect()
    }

    fn register(user: &str, auth: Option<String>) -> Request {
        parse_request(
            format!(
                "REGISTER sip:relay.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK2\r\n\
                 From: \"Someone\" <sip:{user}@relay.test>;tag=9\r\nTo: <sip:{user}@relay.test>\r\n\
                 Call-ID: r@b\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n"
            ),
            "Authorization",
            auth,
        )
    }

    #[test]
    fn a_user_with_its_own_list_is_offered_sha256_first_others_md5() {
        let auth = sha256_for(&["alice"]);
        // INVITE: the From user; REGISTER: the To user.
        let alice = auth.challenge_headers_for(&request(None), ChallengeKind::Proxy, false);
        assert_eq!(algorithms_of(&alice), ["SHA-256", "MD5"]);
        let reg = auth.challenge_headers_for(&register("alice", None), ChallengeKind::Www, false);
        assert_eq!(algorithms_of(&reg), ["SHA-256", "MD5"]);
        assert!(reg[0].to_string().starts_with("WWW-Authenticate: "));
        // A known user without a list and an unknown user get the same single challenge.
        for user in ["bob", "nobody-here"] {
            let h = auth.challenge_headers_for(&register(user, None), ChallengeKind::Www, false);
            assert_eq!(algorithms_of(&h), ["MD5"], "{user}");
        }
        // Both challenges of one answer share one nonce.
        let nonces: Vec<String> = alice
            .iter()
            .map(|h| {
                let value = h.to_string().split_once(": ").unwrap().1.to_string();
                sip_core::digest::Challenge::parse(&value).unwrap().nonce
            })
            .collect();
        assert_eq!(nonces[0], nonces[1]);
    }

    #[test]
    fn sha256_credentials_authenticate_a_user_offered_sha256_only() {
        let mut store = store();
        store.insert(
            "bob".into(),
            StoredCredential::from_password("bob", "relay.test", "bob-secret"),
        );
        let auth = sha256_for(&["alice"]);
        let headers = auth.challenge_headers_for(&request(None), ChallengeKind::Proxy, false);
        let values: Vec<String> = headers
            .iter()
            .map(|h| h.to_string().split_once(": ").unwrap().1.to_string())
            .collect();
        let sha = sip_core::digest::best_challenge(values.iter().map(String::as_str)).unwrap();
        assert_eq!(sha.algorithm, Algorithm::Sha256);
        let creds = sha
            .answer(
                "INVITE",
                "sip:echo@relay.test",
                "alice",
                "alice-secret",
                "c1",
                1,
            )
            .unwrap()
            .to_header_value();
        assert_eq!(
            auth.check(
                &request(Some(creds)),
                ChallengeKind::Proxy,
                &store,
                &udp(1),
                Instant::now()
            ),
            AuthOutcome::Authenticated("alice".into())
        );
        // bob was never offered SHA-256: his SHA-256 answer (to alice's challenge) is
        // challenged again, not verified.
        let creds = sha
            .answer(
                "INVITE",
                "sip:echo@relay.test",
                "bob",
                "bob-secret",
                "c2",
                1,
            )
            .unwrap()
            .to_header_value();
        let out = auth.check(
            &request(Some(creds)),
            ChallengeKind::Proxy,
            &store,
            &udp(1),
            Instant::now(),
        );
        assert!(
            matches!(&out, AuthOutcome::Challenge { stale: false, failure: Some(f) } if f.contains("not offered")),
            "{out:?}"
        );
    }

    #[test]
    fn md5_is_refused_to_a_user_moved_to_sha256_alone() {
        let auth = authenticator(5).with_user_algorithms(
            [("alice".to_string(), vec![Algorithm::Sha256])]
                .into_iter()
                .collect(),
        );
        let h = auth.challenge_headers_for(&request(None), ChallengeKind::Proxy, false);
        assert_eq!(algorithms_of(&h), ["SHA-256"]);
        // An MD5 answer, to the challenge any other user gets.
        let creds = answer(&auth, "alice", "alice-secret", 1);
        let out = auth.check(
            &request(Some(creds)),
            ChallengeKind::Proxy,
            &store(),
            &udp(1),
            Instant::now(),
        );
        assert!(matches!(out, AuthOutcome::Challenge { .. }), "{out:?}");
    }

    #[test]
    fn the_user_of_a_request() {
        assert_eq!(
            uri_user("<sip:alice@relay.test>;tag=1").as_deref(),
            Some("alice")
        );
        assert_eq!(
            uri_user("\"A, B\" <sips:bob@h:5061;transport=tls>").as_deref(),
            Some("bob")
        );
        assert_eq!(uri_user("sip:carol:pw@h;tag=2").as_deref(), Some("carol"));
        assert_eq!(uri_user("<sip:relay.test>"), None);
        assert_eq!(uri_user("<tel:+331234>"), None);
        assert_eq!(uri_user("garbage"), None);
        let req = register("dave", None);
        assert_eq!(
            request_user(&req, ChallengeKind::Www, "relay.test").as_deref(),
            Some("dave")
        );
    }

    #[test]
    fn configured_algorithms_are_all_challenged_in_order() {
        let auth = authenticator(3).with_algorithms(&[Algorithm::Sha256, Algorithm::Md5]);
        let out = auth.check(
            &request(None),
            ChallengeKind::Proxy,
            &store(),
            &udp(1),
            Instant::now(),
        );
        assert_eq!(
            out,
            AuthOutcome::Challenge {
                stale: false,
                failure: None
            }
        );
        let headers = auth.challenge_headers(ChallengeKind::Proxy, false);
        assert_eq!(headers.len(), 2);
        let text: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
        assert!(
            text[0].starts_with("Proxy-Authenticate: Digest") && text[0].contains("SHA-256"),
            "{text:?}"
        );
        assert!(text[1].contains("MD5"), "{text:?}");
    }

    #[test]
    fn right_password_authenticates() {
        let auth = authenticator(3);
        let creds = answer(&auth, "alice", "alice-secret", 1);
        let out = auth.check(
            &request(Some(creds)),
            ChallengeKind::Proxy,
            &store(),
            &udp(1),
            Instant::now(),
        );
        assert_eq!(out, AuthOutcome::Authenticated("alice".into()));
    }

    /// A UDP peer on 10.0.0.`n`.
    fn udp(n: u8) -> Peer {
        Peer::udp(SocketAddr::from(([10, 0, 0, n], 5060)))
    }

    /// A TCP peer on 10.0.0.`n`.
    fn tcp(n: u8) -> Peer {
        Peer::tcp(SocketAddr::from(([10, 0, 0, n], 5060)))
    }

    /// Failure limits for the tests: `max_failures` per (user, source), 60 s lock-out;
    /// sources refused after 10 failures within 60 s, for 300 s; UDP counts half.
    fn policy(max_failures: u32) -> FailurePolicy {
        FailurePolicy {
            max_failures,
            lockout: Duration::from_secs(60),
            source_max_failures: 10,
            source_window: Duration::from_secs(60),
            source_block: Duration::from_secs(300),
            udp_weight_percent: 50,
            max_tracked_sources: 1024,
            max_tracked_user_sources: 1024,
        }
    }

    fn with_policy(policy: FailurePolicy) -> Authenticator {
        Authenticator::new("relay.test", [7u8; 32], Duration::from_secs(300), policy)
    }

    fn is_challenge(out: &AuthOutcome) -> bool {
        matches!(out, AuthOutcome::Challenge { stale: false, .. })
    }

    /// `user`'s INVITE with credentials for `password` (a fresh nonce-count each time).
    fn attempt(
        auth: &Authenticator,
        user: &str,
        password: &str,
        from: &Peer,
        now: Instant,
    ) -> AuthOutcome {
        static NC: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let nc = NC.fetch_add(1, Ordering::Relaxed);
        let creds = answer(auth, user, password, nc);
        auth.check(
            &request(Some(creds)),
            ChallengeKind::Proxy,
            &store(),
            from,
            now,
        )
    }

    #[derive(Default)]
    struct Told(std::sync::Mutex<Vec<SharedFailure>>);

    impl FailureSink for Told {
        fn failed(&self, failure: SharedFailure) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(failure);
        }
    }

    #[test]
    fn failures_another_relay_saw_count_here_and_are_not_told_again() {
        let auth = with_policy(policy(3));
        let told = Arc::new(Told::default());
        auth.set_failure_sink(told.clone());
        let now = Instant::now();
        let from = tcp(1);
        let shared = SharedFailure {
            user: Some("alice".into()),
            source: from.addr.ip(),
            weight: limits::WHOLE_FAILURE,
        };
        // Two failures on another relay, then one here: the third locks alice out.
        auth.count_shared_failure(&shared, now);
        auth.count_shared_failure(&shared, now);
        assert_eq!(auth.stats().user_lockouts.load(Ordering::Relaxed), 0);
        assert!(is_challenge(&attempt(&auth, "alice", "guess", &from, now)));
        assert_eq!(auth.stats().user_lockouts.load(Ordering::Relaxed), 1);
        let out = attempt(&auth, "alice", "alice-secret", &from, now);
        assert!(
            matches!(&out, AuthOutcome::Challenge { failure: Some(f), .. } if f.contains("locked")),
            "{out:?}"
        );
        // Only the failures counted here were told (the guess and the locked-out answer),
        // with their user, source and weight; the shared ones were not told back.
        let told = told.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(told.len(), 2, "{told:?}");
        assert_eq!(told[0], shared);
        // As for failures seen here, the lock-out is from that source only.
        assert_eq!(
            attempt(&auth, "alice", "alice-secret", &tcp(2), now),
            AuthOutcome::Authenticated("alice".into())
        );
    }

    #[test]
    fn failures_lock_a_user_out_from_one_source_only() {
        let auth = with_policy(policy(3));
        let now = Instant::now();
        // Three wrong answers over TCP from 10.0.0.1: challenged each time.
        for i in 1..=3 {
            let out = attempt(&auth, "alice", "guess", &tcp(1), now);
            assert!(is_challenge(&out), "attempt {i}: {out:?}");
        }
        assert_eq!(auth.stats().user_lockouts.load(Ordering::Relaxed), 1);
        // Locked out from 10.0.0.1: the right password is answered as a wrong one.
        let out = attempt(&auth, "alice", "alice-secret", &tcp(1), now);
        assert!(
            matches!(&out, AuthOutcome::Challenge { stale: false, failure: Some(f) } if f.contains("locked")),
            "{out:?}"
        );
        // From anywhere else alice is alice, at once.
        for from in [tcp(2), udp(3)] {
            assert_eq!(
                attempt(&auth, "alice", "alice-secret", &from, now),
                AuthOutcome::Authenticated("alice".into()),
                "from {from}"
            );
        }
        // After the lock-out, from 10.0.0.1 too; the success clears its count.
        let later = now + Duration::from_secs(60);
        assert_eq!(
            attempt(&auth, "alice", "alice-secret", &tcp(1), later),
            AuthOutcome::Authenticated("alice".into())
        );
        for _ in 1..=2 {
            attempt(&auth, "alice", "guess", &tcp(1), later);
        }
        assert_eq!(
            attempt(&auth, "alice", "alice-secret", &tcp(1), later),
            AuthOutcome::Authenticated("alice".into()),
            "two failures after the success do not lock"
        );
    }

    #[test]
    fn a_failure_over_udp_counts_half() {
        let auth = with_policy(policy(3));
        let now = Instant::now();
        // 3 whole failures: 6 over UDP.
        for _ in 1..=5 {
            attempt(&auth, "alice", "guess", &udp(1), now);
        }
        assert_eq!(
            attempt(&auth, "alice", "alice-secret", &udp(1), now),
            AuthOutcome::Authenticated("alice".into()),
            "five UDP failures are two and a half"
        );
        for _ in 1..=6 {
            attempt(&auth, "alice", "guess", &udp(1), now);
        }
        assert!(is_challenge(&attempt(
            &auth,
            "alice",
            "alice-secret",
            &udp(1),
            now
        )));
        // Over TCP a failure counts in full: three lock alice out from another source.
        for _ in 1..=3 {
            attempt(&auth, "alice", "guess", &tcp(2), now);
        }
        assert!(is_challenge(&attempt(
            &auth,
            "alice",
            "alice-secret",
            &tcp(2),
            now
        )));
        assert_eq!(auth.stats().user_lockouts.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn unknown_users_are_never_stored_and_count_against_their_source() {
        let auth = with_policy(policy(3));
        let now = Instant::now();
        let long = "x".repeat(60_000);
        for name in ["mallory", "eve", long.as_str()] {
            let out = attempt(&auth, name, "guess", &tcp(1), now);
            assert!(is_challenge(&out), "{out:?}");
        }
        assert_eq!(auth.tracked_user_sources(), 0, "no unknown name is stored");
        assert_eq!(auth.tracked_sources(), 1);
        assert_eq!(auth.stats().failures.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_failing_source_is_refused_then_released_on_the_clock() {
        let auth = with_policy(policy(3));
        let t0 = Instant::now();
        // Ten whole failures (TCP) from 10.0.0.1 under as many names: the tenth refuses it.
        for i in 1..=9 {
            let out = attempt(&auth, &format!("name{i}"), "guess", &tcp(1), t0);
            assert!(is_challenge(&out), "attempt {i}: {out:?}");
        }
        assert_eq!(
            attempt(&auth, "name10", "guess", &tcp(1), t0),
            AuthOutcome::SourceRefused {
                retry_after: Duration::from_secs(300)
            }
        );
        assert_eq!(auth.stats().sources_refused.load(Ordering::Relaxed), 1);
        // Refused for everything, with or without credentials, right or wrong, any name.
        let t1 = t0 + Duration::from_secs(100);
        assert_eq!(
            attempt(&auth, "alice", "alice-secret", &tcp(1), t1),
            AuthOutcome::SourceRefused {
                retry_after: Duration::from_secs(200)
            }
        );
        let bare = auth.check(&request(None), ChallengeKind::Proxy, &store(), &udp(1), t1);
        assert!(
            matches!(bare, AuthOutcome::SourceRefused { .. }),
            "{bare:?}"
        );
        // Others are not.
        assert_eq!(
            attempt(&auth, "alice", "alice-secret", &tcp(2), t1),
            AuthOutcome::Authenticated("alice".into())
        );
        // Released after source_block_secs (300 s), on the clock given.
        let t2 = t0 + Duration::from_secs(299);
        assert!(matches!(
            attempt(&auth, "alice", "alice-secret", &tcp(1), t2),
            AuthOutcome::SourceRefused { .. }
        ));
        let t3 = t0 + Duration::from_secs(300);
        assert_eq!(
            attempt(&auth, "alice", "alice-secret", &tcp(1), t3),
            AuthOutcome::Authenticated("alice".into())
        );
        assert!(auth.stats().source_refusals.load(Ordering::Relaxed) >= 4);
        // Failures that have expired are pruned.
        auth.prune_failures(t3 + Duration::from_secs(60));
        assert_eq!(auth.tracked_sources(), 0);
    }

    #[test]
    fn failures_spread_over_more_than_the_window_do_not_refuse_a_source() {
        let auth = with_policy(policy(100));
        let t0 = Instant::now();
        for i in 0..30u64 {
            let now = t0 + Duration::from_secs(i * 7);
            let out = attempt(&auth, "alice", "guess", &tcp(1), now);
            assert!(is_challenge(&out), "failure {i}: {out:?}");
        }
    }

    #[test]
    fn the_tables_stay_bounded_under_100_000_random_names() {
        let mut p = policy(3);
        p.max_tracked_sources = 256;
        p.max_tracked_user_sources = 256;
        p.source_max_failures = 100_000;
        let auth = with_policy(p);
        let now = Instant::now();
        let nonce = {
            let value = auth.challenge_headers(ChallengeKind::Proxy, false)[0].to_string();
            sip_core::digest::Challenge::parse(value.split_once(": ").unwrap().1)
                .unwrap()
                .nonce
        };
        let mut base = request(None);
        let mut rng = rand::thread_rng();
        for i in 0..100_000u32 {
            // A random name (up to 64 bytes), from a source of its own.
            let len = 1 + (rng.next_u32() % 64) as usize;
            let name: String = (0..len)
                .map(|_| char::from(b'a' + (rng.next_u32() % 26) as u8))
                .collect();
            let creds = format!(
                "Digest username=\"{name}\", realm=\"relay.test\", nonce=\"{nonce}\", \
                 uri=\"sip:echo@relay.test\", response=\"{:032x}\", algorithm=MD5, \
                 cnonce=\"c\", qop=auth, nc=00000001",
                i
            );
            base.headers
                .retain(|h| !matches!(h, Header::ProxyAuthorization(_)));
            base.headers.push(Header::ProxyAuthorization(
                rsip::headers::ProxyAuthorization::new(creds),
            ));
            let [a, b, c, d] = i.to_be_bytes();
            let from = Peer::udp(SocketAddr::from(([10 ^ a, b, c, d], 5060)));
            let out = auth.check(&base, ChallengeKind::Proxy, &store(), &from, now);
            assert!(is_challenge(&out), "{out:?}");
        }
        assert_eq!(auth.stats().failures.load(Ordering::Relaxed), 100_000);
        assert_eq!(
            auth.tracked_user_sources(),
            0,
            "random names are never stored"
        );
        assert!(auth.tracked_sources() <= 256, "{}", auth.tracked_sources());
        assert!(auth.stats().evictions.load(Ordering::Relaxed) >= 100_000 - 256);
        // Known users from as many sources are bounded too.
        for i in 0..5_000u32 {
            let [_, _, c, d] = i.to_be_bytes();
            let from = Peer::tcp(SocketAddr::from(([172, 16, c, d], 5060)));
            attempt(&auth, "alice", "guess", &from, now);
        }
        assert!(
            auth.tracked_user_sources() <= 256,
            "{}",
            auth.tracked_user_sources()
        );
        assert!(auth.tracked_sources() <= 256);
    }

    #[test]
    fn a_run_of_wrong_answers_looks_the_same_for_a_known_and_an_unknown_name() {
        let auth = with_policy(policy(3));
        let now = Instant::now();
        let run = |user: &str, from: &Peer| -> Vec<String> {
            (0..25)
                .map(|_| match attempt(&auth, user, "guess", from, now) {
                    AuthOutcome::Challenge { stale, .. } => format!("challenge stale={stale}"),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        let known = run("alice", &udp(1));
        let unknown = run("nobody", &udp(2));
        assert_eq!(known, unknown);
        assert!(
            known.last().is_some_and(|s| s.contains("SourceRefused")),
            "{known:?}"
        );
    }

    #[test]
    fn a_locked_out_user_is_not_told_a_right_guess_by_a_stale_nonce() {
        let auth = with_policy(policy(3));
        let now = Instant::now();
        for _ in 0..3 {
            attempt(&auth, "alice", "guess", &tcp(1), now);
        }
        // A right answer to a challenge issued an hour ago (nonces live 300 s here).
        let old = auth.digest.challenge(unix_now() - 3600, false);
        let creds = sip_core::digest::respond(
            &old[0],
            "INVITE",
            "sip:echo@relay.test",
            "alice",
            "alice-secret",
            "c",
            1,
        )
        .unwrap();
        let locked = auth.check(
            &request(Some(creds.clone())),
            ChallengeKind::Proxy,
            &store(),
            &tcp(1),
            now,
        );
        assert_eq!(
            locked,
            AuthOutcome::Challenge {
                stale: false,
                failure: Some("user locked out from this source".into())
            }
        );
        // From elsewhere, the same answer is stale, as it should be.
        let elsewhere = auth.check(
            &request(Some(creds)),
            ChallengeKind::Proxy,
            &store(),
            &tcp(2),
            now,
        );
        assert!(
            matches!(elsewhere, AuthOutcome::Challenge { stale: true, .. }),
            "{elsewhere:?}"
        );
    }

    /// A store that knows alice and goes by relay.test and 127.0.0.1:5060.
    struct Relayish(HashMap<String, StoredCredential>);

    impl CredentialStore for Relayish {
        fn credential(&self, user: &str) -> Option<StoredCredential> {
            self.0.credential(user)
        }

        fn names_relay(&self, uri: &Uri) -> bool {
            matches!(uri.host_port_text(), Some("relay.test" | "127.0.0.1:5060"))
        }
    }

    /// A store that knows alice and goes by [::1]:5060.
    struct Relayish6(HashMap<String, StoredCredential>);

    impl CredentialStore for Relayish6 {
        fn credential(&self, user: &str) -> Option<StoredCredential> {
            self.0.credential(user)
        }

        fn names_relay(&self, uri: &Uri) -> bool {
            uri.host_port_text() == Some("[::1]:5060")
        }
    }

    fn with_digest_uri(auth: &Authenticator, uri: &str) -> Request {
        let challenge = auth.challenge_headers(ChallengeKind::Proxy, false)[0].to_string();
        let value = challenge.split_once(": ").unwrap().1.to_string();
        let creds =
            sip_core::digest::respond(&value, "INVITE", uri, "alice", "alice-secret", "c", 1)
                .unwrap();
        request(Some(creds))
    }

    #[test]
    fn a_digest_uri_other_than_the_request_uri_is_refused() {
        let store = Relayish(store());
        let now = Instant::now();
        let auth = with_policy(policy(3));
        // The Request-URI is sip:echo@relay.test.
        for uri in [
            "sip:echo@relay.test",
            "sip:echo@RELAY.TEST",
            "sip:127.0.0.1:5060",
            "sip:relay.test",
        ] {
            let out = auth.check(
                &with_digest_uri(&auth, uri),
                ChallengeKind::Proxy,
                &store,
                &tcp(1),
                now,
            );
            assert_eq!(out, AuthOutcome::Authenticated("alice".into()), "{uri}");
        }
        for uri in [
            "sip:premium@relay.test",
            "sip:echo@elsewhere.test",
            "sip:10.9.9.9:5060",
            "sip:alice@127.0.0.1:5060",
        ] {
            let out = auth.check(
                &with_digest_uri(&auth, uri),
                ChallengeKind::Proxy,
                &store,
                &tcp(1),
                now,
            );
            assert_eq!(out, AuthOutcome::UriMismatch { uri: uri.into() }, "{uri}");
        }
        // sipp's unbracketed IPv6 form of the relay's address.
        let v6 = Relayish6(store.0.clone());
        let out = auth.check(
            &with_digest_uri(&auth, "sip:::1:5060"),
            ChallengeKind::Proxy,
            &v6,
            &tcp(1),
            now,
        );
        assert_eq!(out, AuthOutcome::Authenticated("alice".into()));
        assert!(bracket_bare_ipv6("sip:::1").is_none());
        assert!(bracket_bare_ipv6("sip:alice@::1:5060").is_none());
        assert!(bracket_bare_ipv6("sips:::1:5060").is_none());
        // Strictly the Request-URI: the relay's own name is refused too.
        let strict = with_policy(policy(3)).with_uri_check(DigestUriCheck::RequestUri);
        let out = strict.check(
            &with_digest_uri(&strict, "sip:127.0.0.1:5060"),
            ChallengeKind::Proxy,
            &store,
            &tcp(1),
            now,
        );
        assert!(matches!(out, AuthOutcome::UriMismatch { .. }), "{out:?}");
        let out = strict.check(
            &with_digest_uri(&strict, "sip:echo@relay.test"),
            ChallengeKind::Proxy,
            &store,
            &tcp(1),
            now,
        );
        assert_eq!(out, AuthOutcome::Authenticated("alice".into()));
        // A mismatch is not a guess: nothing is counted, whoever the name.
        assert_eq!(auth.stats().uri_mismatches.load(Ordering::Relaxed), 4);
        assert_eq!(auth.stats().failures.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn unknown_user_gets_the_same_challenge_as_a_wrong_password() {
        let auth = authenticator(5);
        let now = Instant::now();
        let unknown = auth.check(
            &request(Some(answer(&auth, "mallory", "x", 1))),
            ChallengeKind::Proxy,
            &store(),
            &udp(1),
            now,
        );
        let wrong = auth.check(
            &request(Some(answer(&auth, "alice", "x", 1))),
            ChallengeKind::Proxy,
            &store(),
            &udp(1),
            now,
        );
        assert!(matches!(
            unknown,
            AuthOutcome::Challenge { stale: false, .. }
        ));
        assert!(matches!(wrong, AuthOutcome::Challenge { stale: false, .. }));
    }

    #[test]
    fn garbage_credentials_are_malformed_not_a_panic() {
        let auth = authenticator(5);
        let out = auth.check(
            &request(Some("Digest ,,,=\"".into())),
            ChallengeKind::Proxy,
            &store(),
            &udp(1),
            Instant::now(),
        );
        assert!(matches!(out, AuthOutcome::Malformed(_)), "{out:?}");
    }
}
