//! Digest authentication of terminals and application-server accounts (RFC 3261 §22,
//! RFC 7616, RFC 8760): who is asking, or the challenge to send back.
//!
//! REGISTER is challenged with 401 / `WWW-Authenticate`, every other request with 407 /
//! `Proxy-Authenticate` (the relay acts as a proxy-like element). Unknown users are challenged
//! exactly like known ones (the digest server verifies them against a dummy), so the answers
//! do not tell an attacker which user names exist. Failed attempts are counted per user name;
//! past the limit the user is refused with 403 for a lock-out period instead of being
//! challenged again, which stops online password guessing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rsip::prelude::*;
use rsip::{Header, Request};
use sip_core::digest::{Credentials, DigestError, DigestServer, StoredCredential};

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
        Authenticator {
            digest: DigestServer::new(realm, secret, nonce_ttl),
            failures: (0..FAILURE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            policy,
        }
    }

    /// Challenges with `algorithms`, in this order (RFC 8760 §2.4).
    pub fn with_algorithms(mut self, algorithms: &[sip_core::digest::Algorithm]) -> Authenticator {
        self.digest = self.digest.with_algorithms(algorithms);
        self
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

    /// The challenge headers for a 401 or 407: SHA-256 first, then MD5 (RFC 8760 §2.4).
    pub fn challenge_headers(&self, kind: ChallengeKind, stale: bool) -> Vec<Header> {
        self.digest
            .challenge(unix_now(), stale)
            .into_iter()
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

    fn request(auth: Option<String>) -> Request {
        let mut text = String::from(
            "INVITE sip:echo@relay.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
             From: <sip:alice@relay.test>;tag=1\r\nTo: <sip:echo@relay.test>\r\nCall-ID: a@b\r\n\
             CSeq: 1 INVITE\r\nContent-Length: 0\r\n",
        );
        if let Some(a) = auth {
            text.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        text.push_str("\r\n");
        match rsip::SipMessage::try_from(text.as_str()).unwrap() {
            rsip::SipMessage::Request(r) => r,
            _ => panic!("not a request"),
        }
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
    fn no_credentials_are_challenged_with_both_algorithms() {
        let auth = authenticator(3);
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
