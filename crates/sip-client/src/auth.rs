//! The account and its digest answers to 401 and 407 challenges (RFC 3261 §22.2, §22.3;
//! RFC 7616; RFC 8760: SHA-256 preferred, MD5 accepted).
//!
//! Each challenge is answered once: when a request that already carried our credentials
//! for a realm is challenged again for that realm without `stale=true`, the password is
//! wrong and the answer is [`AuthError::Rejected`] (exit status "authentication failed").

use std::collections::HashMap;
use std::fmt;

use rsip::prelude::*;
use rsip::{Header, Request, Response};
use sip_core::digest::{self, Challenge, Credentials, DigestError};

use crate::headers;

/// The account the client acts for.
#[derive(Clone)]
pub struct Account {
    /// User name (digest username and From user part).
    pub user: String,
    /// Password.
    pub password: String,
    /// The relay's domain: `sip:<user>@<domain>` is the address of record.
    pub domain: String,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("user", &self.user)
            .field("password", &"…")
            .field("domain", &self.domain)
            .finish()
    }
}

impl Account {
    /// The address of record, `sip:<user>@<domain>`.
    pub fn aor(&self) -> String {
        format!("sip:{}@{}", self.user, self.domain)
    }
}

/// Which header pair a challenge uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 401: `WWW-Authenticate` → `Authorization`.
    Www,
    /// 407: `Proxy-Authenticate` → `Proxy-Authorization`.
    Proxy,
}

impl Kind {
    /// The kind for a status code, if it is a challenge.
    pub fn of_status(code: u16) -> Option<Kind> {
        match code {
            401 => Some(Kind::Www),
            407 => Some(Kind::Proxy),
            _ => None,
        }
    }

    fn challenge_header(self) -> &'static str {
        match self {
            Kind::Www => "WWW-Authenticate",
            Kind::Proxy => "Proxy-Authenticate",
        }
    }

    fn credentials_header(self) -> &'static str {
        match self {
            Kind::Www => "Authorization",
            Kind::Proxy => "Proxy-Authorization",
        }
    }

    fn header(self, value: String) -> Header {
        match self {
            Kind::Www => Header::Authorization(rsip::headers::Authorization::new(value)),
            Kind::Proxy => {
                Header::ProxyAuthorization(rsip::headers::ProxyAuthorization::new(value))
            }
        }
    }
}

/// Why a challenge was not answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The response is not a 401/407 or carries no usable challenge.
    NoChallenge(String),
    /// Our credentials were refused: the same realm challenged again, not stale.
    Rejected {
        /// 401 or 407.
        status: u16,
        /// The realm.
        realm: String,
    },
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::NoChallenge(why) => write!(f, "cannot answer the challenge: {why}"),
            AuthError::Rejected { status, realm } => write!(
                f,
                "authentication failed: credentials for realm {realm:?} refused ({status})"
            ),
        }
    }
}

impl std::error::Error for AuthError {}

/// Answers challenges for one account, counting nonce uses (`nc`).
#[derive(Debug)]
pub struct Authenticator {
    account: Account,
    nonce_counts: HashMap<String, u32>,
}

/// How many nonces' counts are remembered before the map is cleared.
const MAX_NONCES: usize = 64;

impl Authenticator {
    /// An authenticator for `account`.
    pub fn new(account: Account) -> Authenticator {
        Authenticator {
            account,
            nonce_counts: HashMap::new(),
        }
    }

    /// The credentials header answering the 401/407 `resp` to `req` (RFC 3261 §22.2): the
    /// strongest challenge offered (SHA-256 over MD5), hashed over `req`'s method and
    /// Request-URI. [`AuthError::Rejected`] when `req` already carried credentials for the
    /// challenge's realm and the challenge is not stale.
    pub fn answer(&mut self, req: &Request, resp: &Response) -> Result<Header, AuthError> {
        let status = resp.status_code.code();
        let kind = Kind::of_status(status)
            .ok_or_else(|| AuthError::NoChallenge(format!("status {status} is not a challenge")))?;
        let offered = headers::values(&resp.headers, kind.challenge_header());
        let challenge: Challenge = digest::best_challenge(offered.iter().map(String::as_str))
            .map_err(|e: DigestError| AuthError::NoChallenge(e.to_string()))?;
        let answered_before = headers::values(&req.headers, kind.credentials_header())
            .iter()
            .filter_map(|v| Credentials::parse(v).ok())
            .any(|c| c.realm == challenge.realm);
        if answered_before && !challenge.stale {
            return Err(AuthError::Rejected {
                status,
                realm: challenge.realm,
            });
        }
        if self.nonce_counts.len() >= MAX_NONCES {
            self.nonce_counts.clear();
        }
        let nc = self
            .nonce_counts
            .entry(challenge.nonce.clone())
            .or_insert(0);
        *nc += 1;
        let creds = challenge
            .answer(
                req.method.to_string().as_str(),
                &req.uri.to_string(),
                &self.account.user,
                &self.account.password,
                &digest::new_cnonce(),
                *nc,
            )
            .map_err(|e| AuthError::NoChallenge(e.to_string()))?;
        Ok(kind.header(creds.to_header_value()))
    }
}

/// `req` with `auth` in place of its credentials of the same kind for the same realm (a
/// stale retry), or added.
pub fn with_credentials(mut req: Request, auth: Header) -> Request {
    let realm_of = |h: &Header| -> Option<(bool, String)> {
        let (proxy, value) = match h {
            Header::Authorization(a) => (false, a.value()),
            Header::ProxyAuthorization(a) => (true, a.value()),
            _ => return None,
        };
        Credentials::parse(value).ok().map(|c| (proxy, c.realm))
    };
    if let Some(new) = realm_of(&auth) {
        let kept: Vec<Header> = std::mem::take(&mut req.headers)
            .into_iter()
            .filter(|h| realm_of(h).as_ref() != Some(&new))
            .collect();
        req.headers = rsip::Headers::from(kept);
    }
    req.headers.push(auth);
    req
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sip_core::digest::{DigestServer, StoredCredential};
    use sip_core::message::response_for;
    use std::time::Duration;

    fn account() -> Account {
        Account {
            user: "alice".into(),
            password: "wonderland".into(),
            domain: "relay.test".into(),
        }
    }

    fn invite() -> Request {
        let text = "INVITE sip:echo@relay.test SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKa1;rport\r\n\
From: <sip:alice@relay.test>;tag=t1\r\n\
To: <sip:echo@relay.test>\r\n\
Call-ID: c1@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@127.0.0.1:5070>\r\n\
Content-Length: 0\r\n\r\n";
        match rsip::SipMessage::try_from(text).unwrap() {
            rsip::SipMessage::Request(r) => r,
            _ => unreachable!(),
        }
    }

    fn challenge_response(
        req: &Request,
        server: &DigestServer,
        code: u16,
        stale: bool,
    ) -> Response {
        let mut resp = response_for(req, code, None, Some("rt"));
        for value in server.challenge(1_000, stale) {
            resp.headers.push(match code {
                401 => Header::WwwAuthenticate(rsip::headers::WwwAuthenticate::new(value)),
                _ => Header::ProxyAuthenticate(rsip::headers::ProxyAuthenticate::new(value)),
            });
        }
        resp
    }

    fn verify(
        server: &DigestServer,
        header: &Header,
        method: &str,
        password: &str,
    ) -> Result<sip_core::digest::Verified, DigestError> {
        let value = header
            .to_string()
            .split_once(':')
            .unwrap()
            .1
            .trim()
            .to_string();
        let creds = Credentials::parse(&value).unwrap();
        server.verify(
            &creds,
            method,
            |u| Some(StoredCredential::from_password(u, "relay.test", password)),
            1_001,
        )
    }

    #[test]
    fn answers_a_407_that_the_sip_core_server_accepts_with_sha256() {
        let server = DigestServer::new("relay.test", [7; 32], Duration::from_secs(300));
        let req = invite();
        let resp = challenge_response(&req, &server, 407, false);
        let mut auth = Authenticator::new(account());
        let header = auth.answer(&req, &resp).unwrap();
        assert!(matches!(header, Header::ProxyAuthorization(_)));
        let ok = verify(&server, &header, "INVITE", "wonderland").unwrap();
        assert_eq!(ok.username, "alice");
        assert_eq!(ok.algorithm, sip_core::digest::Algorithm::Sha256);
        assert_eq!(ok.nc, 1);
        // The same password check fails for a different password: the digest is real.
        let server2 = DigestServer::new("relay.test", [7; 32], Duration::from_secs(300));
        assert!(verify(&server2, &header, "INVITE", "other").is_err());
    }

    #[test]
    fn answers_a_401_for_register_with_md5_when_only_md5_is_offered() {
        let server = DigestServer::new("relay.test", [9; 32], Duration::from_secs(300))
            .with_algorithms(&[sip_core::digest::Algorithm::Md5]);
        let mut req = invite();
        req.method = rsip::Method::Register;
        let resp = challenge_response(&req, &server, 401, false);
        let header = Authenticator::new(account()).answer(&req, &resp).unwrap();
        assert!(matches!(header, Header::Authorization(_)));
        let ok = verify(&server, &header, "REGISTER", "wonderland").unwrap();
        assert_eq!(ok.algorithm, sip_core::digest::Algorithm::Md5);
    }

    #[test]
    fn a_second_challenge_after_credentials_is_rejection_unless_stale() {
        let server = DigestServer::new("relay.test", [1; 32], Duration::from_secs(300));
        let mut auth = Authenticator::new(account());
        let req = invite();
        let first = challenge_response(&req, &server, 407, false);
        let header = auth.answer(&req, &first).unwrap();
        let retried = with_credentials(req.clone(), header.clone());
        let again = challenge_response(&retried, &server, 407, false);
        assert_eq!(
            auth.answer(&retried, &again),
            Err(AuthError::Rejected {
                status: 407,
                realm: "relay.test".into()
            })
        );
        let stale = challenge_response(&retried, &server, 407, true);
        let header2 = auth.answer(&retried, &stale).unwrap();
        let retried2 = with_credentials(retried, header2);
        assert_eq!(
            headers::values(&retried2.headers, "Proxy-Authorization").len(),
            1
        );
        // No challenge at all.
        let plain = response_for(&req, 407, None, Some("x"));
        assert!(matches!(
            auth.answer(&req, &plain),
            Err(AuthError::NoChallenge(_))
        ));
    }
}
