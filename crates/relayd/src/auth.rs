//! Digest authentication of terminals and application-server accounts (RFC 3261 §22,
//! RFC 7616, RFC 8760): who is asking, or the challenge to send back.
//!
//! REGISTER is challenged with 401 / `WWW-Authenticate`, every other request with 407 /
//! `Proxy-Authenticate` (the relay acts as a proxy-like element). Unknown users are challenged
//! exactly like known ones (the digest server verifies them against a dummy), so the answers
//! do not tell an attacker which user names exist. Failed attempts are counted per user name;
//! past the limit the user is refused with 403 for a lock-out period instead of being
//! challenged again, which stops online password guessing.
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

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rsip::prelude::*;
use rsip::{Header, Request};
use sip_core::digest::{Algorithm, Credentials, DigestError, DigestServer, StoredCredential};

/// Who may authenticate: a lookup from user name to stored HA1 hashes.
pub trait CredentialStore: Send + Sync {
    /// The stored credential of `user`, or `None` when no such account exists.
    fn credential(&self, user: &str) -> Option<StoredCredential>;
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
    /// Refuse with 403: too many failed attempts for this user name.
    Locked,
    /// The credentials cannot be read at all: answer 400 with this reason.
    Malformed(String),
}

/// Limits on failed attempts.
#[derive(Debug, Clone, Copy)]
pub struct FailurePolicy {
    /// Failed attempts tolerated per user name before refusing with 403.
    pub max_failures: u32,
    /// How long a user name stays refused, and how long failures are remembered.
    pub lockout: Duration,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy {
            max_failures: 5,
            lockout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
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

/// Checks credentials and builds challenges; shared by every task of the relay.
pub struct Authenticator {
    digest: DigestServer,
    failures: Vec<Mutex<HashMap<String, Failures>>>,
    policy: FailurePolicy,
    /// Offered to users without a list of their own (and to unknown users).
    default: Vec<Algorithm>,
    /// Users and accounts with their own list.
    per_user: HashMap<String, Vec<Algorithm>>,
    /// Every algorithm offered to anyone, in the order the digest server challenges.
    accepted: Vec<Algorithm>,
}

const FAILURE_SHARDS: usize = 16;

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
            failures: (0..FAILURE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            policy,
            accepted: default.clone(),
            default,
            per_user: HashMap::new(),
        }
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

    fn shard(&self, user: &str) -> &Mutex<HashMap<String, Failures>> {
        let h = user
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        &self.failures[h % self.failures.len()]
    }

    fn locked(&self, user: &str, now: Instant) -> bool {
        let map = self.shard(user).lock().unwrap_or_else(|p| p.into_inner());
        map.get(user).is_some_and(|f| {
            f.count >= self.policy.max_failures && now.duration_since(f.last) < self.policy.lockout
        })
    }

    fn record_failure(&self, user: &str, now: Instant) {
        let mut map = self.shard(user).lock().unwrap_or_else(|p| p.into_inner());
        let lockout = self.policy.lockout;
        map.retain(|_, f| now.duration_since(f.last) < lockout);
        let entry = map.entry(user.to_string()).or_insert(Failures {
            count: 0,
            last: now,
        });
        entry.count += 1;
        entry.last = now;
    }

    fn clear_failures(&self, user: &str) {
        let mut map = self.shard(user).lock().unwrap_or_else(|p| p.into_inner());
        map.remove(user);
    }

    /// Checks the credentials of `req` (in the header that `kind` names) against `store`.
    pub fn check(
        &self,
        req: &Request,
        kind: ChallengeKind,
        store: &dyn CredentialStore,
        now: Instant,
    ) -> AuthOutcome {
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
        if self.locked(&creds.username, now) {
            return AuthOutcome::Locked;
        }
        if !self
            .algorithms_for(Some(&creds.username))
            .contains(&creds.algorithm)
        {
            return AuthOutcome::Challenge {
                stale: false,
                failure: Some(format!(
                    "algorithm {} not offered to this user",
                    creds.algorithm.name()
                )),
            };
        }
        match self
            .digest
            .verify(&creds, &method, |u| store.credential(u), unix_now())
        {
            Ok(v) => {
                self.clear_failures(&v.username);
                AuthOutcome::Authenticated(v.username)
            }
            Err(DigestError::Stale) => AuthOutcome::Challenge {
                stale: true,
                failure: Some("nonce expired".into()),
            },
            Err(e @ (DigestError::WrongResponse | DigestError::UnknownUser)) => {
                self.record_failure(&creds.username, now);
                if self.locked(&creds.username, now) {
                    AuthOutcome::Locked
                } else {
                    // Unknown and known users get the same answer.
                    let failure = if e == DigestError::UnknownUser {
                        "unknown user"
                    } else {
                        "wrong password"
                    };
                    AuthOutcome::Challenge {
                        stale: false,
                        failure: Some(failure.into()),
                    }
                }
            }
            Err(e) => AuthOutcome::Challenge {
                stale: false,
                failure: Some(e.to_string()),
            },
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
    }
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
        Authenticator::new(
            "relay.test",
            [7u8; 32],
            Duration::from_secs(300),
            FailurePolicy {
                max_failures,
                lockout: Duration::from_secs(60),
            },
        )
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
            Instant::now(),
        );
        assert_eq!(out, AuthOutcome::Authenticated("alice".into()));
    }

    #[test]
    fn wrong_password_is_challenged_then_locked() {
        let auth = authenticator(3);
        let now = Instant::now();
        for i in 1..=2 {
            let creds = answer(&auth, "alice", "guess", i);
            let out = auth.check(&request(Some(creds)), ChallengeKind::Proxy, &store(), now);
            assert!(
                matches!(out, AuthOutcome::Challenge { stale: false, .. }),
                "attempt {i}: {out:?}"
            );
        }
        let creds = answer(&auth, "alice", "guess", 3);
        assert_eq!(
            auth.check(&request(Some(creds)), ChallengeKind::Proxy, &store(), now),
            AuthOutcome::Locked
        );
        // Even the right password is refused while locked; allowed again after the lock-out.
        let creds = answer(&auth, "alice", "alice-secret", 4);
        assert_eq!(
            auth.check(
                &request(Some(creds.clone())),
                ChallengeKind::Proxy,
                &store(),
                now
            ),
            AuthOutcome::Locked
        );
        let later = now + Duration::from_secs(61);
        assert_eq!(
            auth.check(&request(Some(creds)), ChallengeKind::Proxy, &store(), later),
            AuthOutcome::Authenticated("alice".into())
        );
    }

    #[test]
    fn unknown_user_gets_the_same_challenge_as_a_wrong_password() {
        let auth = authenticator(5);
        let now = Instant::now();
        let unknown = auth.check(
            &request(Some(answer(&auth, "mallory", "x", 1))),
            ChallengeKind::Proxy,
            &store(),
            now,
        );
        let wrong = auth.check(
            &request(Some(answer(&auth, "alice", "x", 1))),
            ChallengeKind::Proxy,
            &store(),
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
            Instant::now(),
        );
        assert!(matches!(out, AuthOutcome::Malformed(_)), "{out:?}");
    }
}
