//! The client side of digest authentication (RFC 3261 §22.2, §22.3; RFC 7616): remembers the
//! last challenge of the relay and answers it on every request that follows, counting the
//! nonce uses, so that a refresh or a retry is authenticated in one round trip.

use rsip::prelude::UntypedHeader;
use rsip::{Header, Response};
use sip_core::digest::{self, Challenge};

use crate::config::Secret;

/// Whether a challenge came in `WWW-Authenticate` (401, answered with `Authorization`) or
/// `Proxy-Authenticate` (407, answered with `Proxy-Authorization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// 401 / WWW-Authenticate.
    Www,
    /// 407 / Proxy-Authenticate.
    Proxy,
}

/// What a 401/407 tells the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChallengeOutcome {
    /// A new nonce (or `stale=true`): send the request again with credentials.
    Retry,
    /// The relay refused the credentials it asked for: the password is wrong.
    Rejected,
    /// No usable challenge in the response (missing, malformed, unknown algorithm).
    Unusable(String),
}

/// The credentials of one account and the challenge they answer.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    user: String,
    password: Secret,
    challenge: Option<(Challenge, ChallengeKind)>,
    nc: u32,
}

impl ClientAuth {
    /// An account's credentials, no challenge yet.
    pub fn new(user: &str, password: Secret) -> ClientAuth {
        ClientAuth {
            user: user.to_string(),
            password,
            challenge: None,
            nc: 0,
        }
    }

    /// Takes the challenge of a 401 or 407. `answered` says whether the request that got it
    /// carried credentials from [`ClientAuth::authorization`].
    pub fn on_challenge(&mut self, resp: &Response, answered: bool) -> ChallengeOutcome {
        let code = resp.status_code.code();
        let kind = if code == 407 {
            ChallengeKind::Proxy
        } else {
            ChallengeKind::Www
        };
        let values: Vec<String> = resp
            .headers
            .iter()
            .filter_map(|h| match (h, kind) {
                (Header::WwwAuthenticate(v), ChallengeKind::Www) => Some(v.value().to_string()),
                (Header::ProxyAuthenticate(v), ChallengeKind::Proxy) => Some(v.value().to_string()),
                _ => None,
            })
            .collect();
        let challenge = match digest::best_challenge(values.iter().map(String::as_str)) {
            Ok(c) => c,
            Err(e) => return ChallengeOutcome::Unusable(e.to_string()),
        };
        // Credentials computed from a challenge received just before (nonce count 1) and
        // challenged again without `stale=true` were refused. Credentials from an older,
        // reused challenge may simply carry a nonce the relay no longer knows (it restarted):
        // those get one fresh try.
        if answered && self.nc <= 1 && !challenge.stale {
            self.challenge = None;
            self.nc = 0;
            return ChallengeOutcome::Rejected;
        }
        self.challenge = Some((challenge, kind));
        self.nc = 0;
        ChallengeOutcome::Retry
    }

    /// The header answering the current challenge for `method` to `uri`, with the next
    /// nonce count, or `None` when no challenge has been seen.
    pub fn authorization(&mut self, method: &str, uri: &str) -> Option<Header> {
        let (challenge, kind) = self.challenge.as_ref()?;
        self.nc = self.nc.saturating_add(1);
        let creds = challenge
            .answer(
                method,
                uri,
                &self.user,
                self.password.expose(),
                &digest::new_cnonce(),
                self.nc,
            )
            .ok()?;
        let value = creds.to_header_value();
        Some(match kind {
            ChallengeKind::Www => Header::Authorization(rsip::headers::Authorization::new(value)),
            ChallengeKind::Proxy => {
                Header::ProxyAuthorization(rsip::headers::ProxyAuthorization::new(value))
            }
        })
    }

    /// Forgets the challenge (say, after the relay restarted and its nonces mean nothing).
    pub fn reset(&mut self) {
        self.challenge = None;
        self.nc = 0;
    }

    /// Whether a challenge is held.
    pub fn has_challenge(&self) -> bool {
        self.challenge.is_some()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sip_core::digest::{DigestServer, StoredCredential};

    fn challenge_response(code: u16, values: &[String]) -> Response {
        let mut headers = rsip::Headers::default();
        for v in values {
            headers.push(if code == 407 {
                Header::ProxyAuthenticate(rsip::headers::ProxyAuthenticate::new(v.clone()))
            } else {
                Header::WwwAuthenticate(rsip::headers::WwwAuthenticate::new(v.clone()))
            });
        }
        Response {
            status_code: sip_core::message::status(code, None),
            version: rsip::Version::V2,
            headers,
            body: Vec::new(),
        }
    }

    fn value_of(h: &Header) -> String {
        match h {
            Header::Authorization(a) => a.value().to_string(),
            Header::ProxyAuthorization(a) => a.value().to_string(),
            other => panic!("not a credentials header: {other:?}"),
        }
    }

    #[test]
    fn answers_the_strongest_challenge_and_verifies_with_the_server() {
        let server =
            DigestServer::new("relay.test", [7u8; 32], std::time::Duration::from_secs(300));
        let values = server.challenge(1_000, false);
        let mut auth = ClientAuth::new("as1", Secret("as1-secret".into()));
        assert!(auth.authorization("REGISTER", "sip:relay.test").is_none());
        assert_eq!(
            auth.on_challenge(&challenge_response(401, &values), false),
            ChallengeOutcome::Retry
        );
        let h = auth.authorization("REGISTER", "sip:relay.test").unwrap();
        assert!(matches!(h, Header::Authorization(_)));
        let creds = digest::Credentials::parse(&value_of(&h)).unwrap();
        assert_eq!(creds.algorithm, digest::Algorithm::Sha256);
        assert_eq!(creds.nc, Some(1));
        let stored = StoredCredential::from_password("as1", "relay.test", "as1-secret");
        let verified = server
            .verify(
                &creds,
                "REGISTER",
                |user| (user == "as1").then(|| stored.clone()),
                1_001,
            )
            .unwrap();
        assert_eq!(verified.username, "as1");
        // The next request reuses the nonce with the next count.
        let again = auth.authorization("REGISTER", "sip:relay.test").unwrap();
        assert_eq!(
            digest::Credentials::parse(&value_of(&again)).unwrap().nc,
            Some(2)
        );
    }

    #[test]
    fn proxy_challenges_get_proxy_authorization() {
        let values = vec!["Digest realm=\"r\", nonce=\"n1\", qop=\"auth\"".to_string()];
        let mut auth = ClientAuth::new("as1", Secret("pw".into()));
        assert_eq!(
            auth.on_challenge(&challenge_response(407, &values), false),
            ChallengeOutcome::Retry
        );
        assert!(matches!(
            auth.authorization("MESSAGE", "sip:charge@r"),
            Some(Header::ProxyAuthorization(_))
        ));
    }

    #[test]
    fn a_second_challenge_after_answering_means_rejected_unless_stale() {
        let first = vec!["Digest realm=\"r\", nonce=\"n1\", qop=\"auth\"".to_string()];
        let mut auth = ClientAuth::new("as1", Secret("wrong".into()));
        auth.on_challenge(&challenge_response(401, &first), false);
        auth.authorization("REGISTER", "sip:r").unwrap();
        assert_eq!(
            auth.on_challenge(&challenge_response(401, &first), true),
            ChallengeOutcome::Rejected
        );
        assert!(!auth.has_challenge());
        let stale = vec!["Digest realm=\"r\", nonce=\"n2\", qop=\"auth\", stale=true".to_string()];
        auth.on_challenge(&challenge_response(401, &first), false);
        auth.authorization("REGISTER", "sip:r").unwrap();
        assert_eq!(
            auth.on_challenge(&challenge_response(401, &stale), true),
            ChallengeOutcome::Retry
        );
        auth.authorization("REGISTER", "sip:r").unwrap();
        let other = vec!["Digest realm=\"r\", nonce=\"n3\", qop=\"auth\"".to_string()];
        assert_eq!(
            auth.on_challenge(&challenge_response(401, &other), true),
            ChallengeOutcome::Rejected
        );
        // A challenge reused for later requests (a relay restart forgets its nonces): one
        // fresh try rather than a verdict.
        auth.on_challenge(&challenge_response(401, &first), false);
        auth.authorization("REGISTER", "sip:r").unwrap();
        auth.authorization("REGISTER", "sip:r").unwrap();
        assert_eq!(
            auth.on_challenge(&challenge_response(401, &other), true),
            ChallengeOutcome::Retry
        );
    }

    #[test]
    fn unusable_challenges_are_reported() {
        let mut auth = ClientAuth::new("as1", Secret("pw".into()));
        assert!(matches!(
            auth.on_challenge(&challenge_response(401, &[]), false),
            ChallengeOutcome::Unusable(_)
        ));
        let bad = vec!["Basic realm=\"r\"".to_string()];
        assert!(matches!(
            auth.on_challenge(&challenge_response(401, &bad), false),
            ChallengeOutcome::Unusable(_)
        ));
    }
}
