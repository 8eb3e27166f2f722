//! Digest access authentication for SIP (RFC 3261 §22.4, RFC 7616, RFC 8760), done in-house.
//!
//! rsip's digest support rejects `algorithm=SHA-256`, reads `nc` as a decimal byte, computes
//! `-sess` wrongly and compares in non-constant time, so this module parses and computes
//! everything itself.
//!
//! * Header values: [`Challenge`] (`WWW-Authenticate` / `Proxy-Authenticate`) and
//!   [`Credentials`] (`Authorization` / `Proxy-Authorization`), parsed from and written to
//!   `Digest k=v, k="quoted", …` (RFC 7616 §3.3, §3.4; RFC 7235 §2.1 auth-param syntax).
//! * Server: [`DigestServer`] issues challenges offering SHA-256 and MD5 side by side
//!   (RFC 8760 §2.4: SHA-256 first), with `qop="auth"`, and nonces it can validate without
//!   storing them (issue time + HMAC-SHA-256 under a secret key). It rejects expired nonces
//!   as [`DigestError::Stale`] (answer with `stale=true`), nonces it did not issue as
//!   [`DigestError::ForeignNonce`], and a nonce-count that does not grow as
//!   [`DigestError::Replay`] (a small bounded map nonce → highest nc, pruned on expiry).
//! * Stored credentials: [`StoredCredential`] keeps H(A1) for MD5 and SHA-256, so no plain
//!   password need sit in a file (RFC 7616 §5.2).
//! * Client: [`respond`] answers one challenge; [`best_challenge`] picks the strongest of
//!   several (SHA-256 over MD5, RFC 8760 §2.4).
//!
//! Unknown users are verified along the same path as known ones (against a keyed dummy
//! H(A1)), so that timing does not tell them apart; the caller must answer
//! [`DigestError::UnknownUser`] exactly like [`DigestError::WrongResponse`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use hmac::{Hmac, Mac};
use md5::Md5;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Why a digest header could not be used, or why credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The header value is not a well-formed digest challenge or credential; the text says
    /// what is wrong. Answer 400, or challenge again.
    #[error("malformed digest header: {0}")]
    Malformed(&'static str),
    /// The algorithm is not one of MD5, MD5-sess, SHA-256, SHA-256-sess, or it is one the
    /// server does not offer (RFC 7616 §3.7 registry).
    #[error("unsupported digest algorithm")]
    UnsupportedAlgorithm,
    /// The quality of protection is not `auth` (only `auth` is offered; RFC 7616 §3.3).
    #[error("unsupported digest qop")]
    UnsupportedQop,
    /// The credentials name another realm than the server's (RFC 3261 §22.1).
    #[error("digest realm mismatch")]
    RealmMismatch,
    /// The nonce was not issued by this server (its HMAC does not verify, or it is not in
    /// our format). Challenge again with a fresh nonce (without `stale`).
    #[error("digest nonce not issued by this server")]
    ForeignNonce,
    /// The response is correct but the nonce has expired: challenge again with
    /// `stale=true` (RFC 7616 §3.3), so the client retries without asking its user.
    #[error("digest nonce expired")]
    Stale,
    /// The nonce-count is not greater than the highest one already accepted for this nonce
    /// (RFC 7616 §3.4, §5.12): a replayed or reordered request.
    #[error("digest nonce-count replayed")]
    Replay,
    /// The response does not match: wrong password (or wrong user name).
    #[error("digest response mismatch")]
    WrongResponse,
    /// No credential is stored under the user name. The response was checked against a
    /// dummy H(A1) along the same path; answer exactly as for [`DigestError::WrongResponse`].
    #[error("unknown digest user")]
    UnknownUser,
}

/// A digest algorithm (RFC 7616 §3.7; RFC 8760 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `MD5` (RFC 2617; kept for the many user agents that speak nothing else).
    Md5,
    /// `MD5-sess`: H(A1) = MD5(MD5(user:realm:password):nonce:cnonce) (RFC 7616 §3.4.2).
    Md5Sess,
    /// `SHA-256` (RFC 7616, RFC 8760).
    Sha256,
    /// `SHA-256-sess`.
    Sha256Sess,
}

/// The hash function under an [`Algorithm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashFamily {
    /// MD5: 32 hex digits.
    Md5,
    /// SHA-256: 64 hex digits.
    Sha256,
}

impl HashFamily {
    /// The length of a hex digest of this family.
    pub fn hex_len(self) -> usize {
        match self {
            HashFamily::Md5 => 32,
            HashFamily::Sha256 => 64,
        }
    }

    /// H(p1:p2:…): the hex digest of the parts joined by colons (RFC 7616 §3.4.1).
    fn hash_hex(self, parts: &[&[u8]]) -> String {
        fn feed<D: Digest>(mut d: D, parts: &[&[u8]]) -> String {
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    d.update(b":");
                }
                d.update(part);
            }
            hex::encode(d.finalize())
        }
        match self {
            HashFamily::Md5 => feed(Md5::new(), parts),
            HashFamily::Sha256 => feed(Sha256::new(), parts),
        }
    }
}

impl Algorithm {
    /// Parses an algorithm name, ignoring case (RFC 7616 §3.3: `MD5`, `SHA-256`, `…-sess`).
    pub fn from_name(name: &str) -> Option<Algorithm> {
        const NAMES: [(&str, Algorithm); 4] = [
            ("MD5", Algorithm::Md5),
            ("MD5-sess", Algorithm::Md5Sess),
            ("SHA-256", Algorithm::Sha256),
            ("SHA-256-sess", Algorithm::Sha256Sess),
        ];
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, a)| *a)
    }

    /// The name as written on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Md5Sess => "MD5-sess",
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha256Sess => "SHA-256-sess",
        }
    }

    /// Whether this is a `-sess` variant (RFC 7616 §3.4.2).
    pub fn is_sess(self) -> bool {
        matches!(self, Algorithm::Md5Sess | Algorithm::Sha256Sess)
    }

    /// The hash function of the algorithm.
    pub fn family(self) -> HashFamily {
        match self {
            Algorithm::Md5 | Algorithm::Md5Sess => HashFamily::Md5,
            Algorithm::Sha256 | Algorithm::Sha256Sess => HashFamily::Sha256,
        }
    }

    /// Preference when several challenges are offered: SHA-256 over MD5 (RFC 8760 §2.4).
    fn strength(self) -> u8 {
        match self.family() {
            HashFamily::Sha256 => 2,
            HashFamily::Md5 => 1,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A quality of protection (RFC 7616 §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qop {
    /// `auth`: authentication of the request line only. The only one this module computes.
    Auth,
    /// `auth-int`: also the body. Recognised, never offered nor computed.
    AuthInt,
}

impl Qop {
    fn from_name(name: &str) -> Option<Qop> {
        if name.eq_ignore_ascii_case("auth") {
            Some(Qop::Auth)
        } else if name.eq_ignore_ascii_case("auth-int") {
            Some(Qop::AuthInt)
        } else {
            None
        }
    }

    /// The name as written on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Qop::Auth => "auth",
            Qop::AuthInt => "auth-int",
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths, not on where they
/// differ (for digest responses, nonce MACs and session tokens).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// H(A1) = H(username:realm:password) as lower-case hex (RFC 7616 §3.4.2), with the hash of
/// `algorithm`. For a `-sess` algorithm this is the stored base value; the session H(A1)
/// adds the nonce and cnonce when a response is computed.
pub fn ha1(algorithm: Algorithm, user: &str, realm: &str, password: &str) -> String {
    algorithm
        .family()
        .hash_hex(&[user.as_bytes(), realm.as_bytes(), password.as_bytes()])
}

/// A user's stored secret: H(A1) for MD5 and for SHA-256 (RFC 7616 §5.2), so no plain
/// password need be kept. Either may be absent (then that algorithm fails for the user).
/// `Debug` does not print the hashes: H(A1) is as good as the password in its realm.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCredential {
    md5_ha1: Option<String>,
    sha256_ha1: Option<String>,
}

impl fmt::Debug for StoredCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredCredential")
            .field("md5_ha1", &self.md5_ha1.as_ref().map(|_| "<redacted>"))
            .field(
                "sha256_ha1",
                &self.sha256_ha1.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl StoredCredential {
    /// Derives both H(A1) values from a password (for provisioning tools and tests).
    pub fn from_password(user: &str, realm: &str, password: &str) -> StoredCredential {
        StoredCredential {
            md5_ha1: Some(ha1(Algorithm::Md5, user, realm, password)),
            sha256_ha1: Some(ha1(Algorithm::Sha256, user, realm, password)),
        }
    }

    /// Builds a credential from stored hex H(A1) values (any case), checking their lengths
    /// (32 hex digits for MD5, 64 for SHA-256).
    pub fn from_ha1(
        md5_ha1: Option<&str>,
        sha256_ha1: Option<&str>,
    ) -> Result<StoredCredential, DigestError> {
        fn check(v: Option<&str>, family: HashFamily) -> Result<Option<String>, DigestError> {
            match v {
                None => Ok(None),
                Some(v) => {
                    let v = v.trim();
                    if v.len() != family.hex_len() || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(DigestError::Malformed("stored H(A1) is not a hex digest"));
                    }
                    Ok(Some(v.to_ascii_lowercase()))
                }
            }
        }
        let md5_ha1 = check(md5_ha1, HashFamily::Md5)?;
        let sha256_ha1 = check(sha256_ha1, HashFamily::Sha256)?;
        if md5_ha1.is_none() && sha256_ha1.is_none() {
            return Err(DigestError::Malformed("stored credential has no H(A1)"));
        }
        Ok(StoredCredential {
            md5_ha1,
            sha256_ha1,
        })
    }

    /// The stored MD5 H(A1), lower-case hex.
    pub fn md5_ha1(&self) -> Option<&str> {
        self.md5_ha1.as_deref()
    }

    /// The stored SHA-256 H(A1), lower-case hex.
    pub fn sha256_ha1(&self) -> Option<&str> {
        self.sha256_ha1.as_deref()
    }

    /// The H(A1) for the hash family of `algorithm`.
    pub fn ha1_for(&self, algorithm: Algorithm) -> Option<&str> {
        match algorithm.family() {
            HashFamily::Md5 => self.md5_ha1(),
            HashFamily::Sha256 => self.sha256_ha1(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Header value syntax (RFC 7235 §2.1: auth-scheme 1*SP #auth-param; RFC 7230 §3.2.6).

/// The most parameters we read from one header value; more is hostile.
const MAX_PARAMS: usize = 32;

/// Splits `Digest k=v, k="q", …` into its parameters (names lower-cased, quoted-strings
/// unescaped). Refuses other schemes, duplicates, unterminated quotes and stray text.
fn parse_digest_params(value: &str) -> Result<Vec<(String, String)>, DigestError> {
    let value = value.trim_start();
    let scheme_end = value
        .find([' ', '\t'])
        .ok_or(DigestError::Malformed("no parameters after the scheme"))?;
    if !value[..scheme_end].eq_ignore_ascii_case("Digest") {
        return Err(DigestError::Malformed("scheme is not Digest"));
    }
    let mut chars = value[scheme_end..].char_indices().peekable();
    let rest = &value[scheme_end..];
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        // Skip whitespace and empty list elements (RFC 7230 §7 allows `a, , b`).
        while let Some((_, c)) = chars.peek() {
            if *c == ' ' || *c == '\t' || *c == ',' {
                chars.next();
            } else {
                break;
            }
        }
        let Some(&(name_start, _)) = chars.peek() else {
            break;
        };
        let mut name_end = name_start;
        while let Some(&(i, c)) = chars.peek() {
            if is_tchar(c) {
                name_end = i + c.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        if name_end == name_start {
            return Err(DigestError::Malformed("expected a parameter name"));
        }
        let name = rest[name_start..name_end].to_ascii_lowercase();
        skip_ows(&mut chars);
        match chars.next() {
            Some((_, '=')) => {}
            _ => {
                return Err(DigestError::Malformed(
                    "expected '=' after a parameter name",
                ))
            }
        }
        skip_ows(&mut chars);
        let mut val = String::new();
        match chars.peek() {
            Some((_, '"')) => {
                chars.next();
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    match c {
                        '"' => {
                            closed = true;
                            break;
                        }
                        '\\' => match chars.next() {
                            Some((_, '\r' | '\n')) | None => {
                                return Err(DigestError::Malformed("bad escape in quoted-string"))
                            }
                            Some((_, e)) => val.push(e),
                        },
                        '\r' | '\n' => {
                            return Err(DigestError::Malformed("line break in quoted-string"))
                        }
                        c => val.push(c),
                    }
                }
                if !closed {
                    return Err(DigestError::Malformed("unterminated quoted-string"));
                }
            }
            _ => {
                // A token; be lenient about its characters (clients write `uri=sip:x`
                // unquoted), stopping at the list separator and whitespace.
                while let Some(&(_, c)) = chars.peek() {
                    if c == ',' || c == ' ' || c == '\t' || c == '"' {
                        break;
                    }
                    if c == '\r' || c == '\n' {
                        return Err(DigestError::Malformed("line break in a parameter"));
                    }
                    val.push(c);
                    chars.next();
                }
                if val.is_empty() {
                    return Err(DigestError::Malformed("empty parameter value"));
                }
            }
        }
        skip_ows(&mut chars);
        match chars.peek() {
            None | Some((_, ',')) => {}
            Some(_) => return Err(DigestError::Malformed("expected ',' between parameters")),
        }
        if params.iter().any(|(n, _)| *n == name) {
            return Err(DigestError::Malformed("duplicate parameter"));
        }
        if params.len() >= MAX_PARAMS {
            return Err(DigestError::Malformed("too many parameters"));
        }
        params.push((name, val));
    }
    if params.is_empty() {
        return Err(DigestError::Malformed("no parameters after the scheme"));
    }
    Ok(params)
}

fn skip_ows(chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>) {
    while let Some((_, ' ' | '\t')) = chars.peek() {
        chars.next();
    }
}

/// RFC 7230 §3.2.6 tchar.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Writes `s` as a quoted-string, escaping `"` and `\` (RFC 7230 §3.2.6).
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Reads a nonce-count: exactly 8 hex digits (RFC 7616 §3.4).
fn parse_nc(s: &str) -> Result<u32, DigestError> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DigestError::Malformed("nc is not 8 hex digits"));
    }
    u32::from_str_radix(s, 16).map_err(|_| DigestError::Malformed("nc is not 8 hex digits"))
}

/// A digest challenge, the value of a `WWW-Authenticate` or `Proxy-Authenticate` header
/// (RFC 3261 §22.1, RFC 7616 §3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The protection space.
    pub realm: String,
    /// The server nonce.
    pub nonce: String,
    /// The algorithm (MD5 when the parameter is absent).
    pub algorithm: Algorithm,
    /// The qop values offered, in order; unknown values are skipped. Empty when the
    /// parameter is absent (an RFC 2069 challenge).
    pub qop: Vec<Qop>,
    /// Opaque data to return unchanged.
    pub opaque: Option<String>,
    /// `stale=true`: the previous nonce expired, the password was right.
    pub stale: bool,
}

impl Challenge {
    /// Parses a challenge header value. An unknown algorithm gives
    /// [`DigestError::UnsupportedAlgorithm`].
    pub fn parse(value: &str) -> Result<Challenge, DigestError> {
        let params = parse_digest_params(value)?;
        let realm = param(&params, "realm").ok_or(DigestError::Malformed("realm missing"))?;
        let nonce = param(&params, "nonce").ok_or(DigestError::Malformed("nonce missing"))?;
        let algorithm = match param(&params, "algorithm") {
            None => Algorithm::Md5,
            Some(a) => Algorithm::from_name(a).ok_or(DigestError::UnsupportedAlgorithm)?,
        };
        let qop = param(&params, "qop")
            .map(|q| {
                q.split(',')
                    .filter_map(|t| Qop::from_name(t.trim()))
                    .collect()
            })
            .unwrap_or_default();
        let stale = param(&params, "stale").is_some_and(|s| s.eq_ignore_ascii_case("true"));
        Ok(Challenge {
            realm: realm.to_string(),
            nonce: nonce.to_string(),
            algorithm,
            qop,
            opaque: param(&params, "opaque").map(str::to_string),
            stale,
        })
    }

    /// The header value, `Digest realm="…", nonce="…", algorithm=…, qop="…"[, opaque][, stale=true]`.
    pub fn to_header_value(&self) -> String {
        let mut out = format!(
            "Digest realm={}, nonce={}, algorithm={}",
            quoted(&self.realm),
            quoted(&self.nonce),
            self.algorithm.name()
        );
        if !self.qop.is_empty() {
            let list: Vec<&str> = self.qop.iter().map(|q| q.name()).collect();
            out.push_str(", qop=");
            out.push_str(&quoted(&list.join(",")));
        }
        if let Some(opaque) = &self.opaque {
            out.push_str(", opaque=");
            out.push_str(&quoted(opaque));
        }
        if self.stale {
            out.push_str(", stale=true");
        }
        out
    }

    /// Answers the challenge for a request (RFC 7616 §3.4): with `qop=auth` when offered,
    /// else in the RFC 2069 form; `nc` is the count of requests already sent with this
    /// nonce plus one. Only `auth-int` on offer gives [`DigestError::UnsupportedQop`].
    pub fn answer(
        &self,
        method: &str,
        uri: &str,
        user: &str,
        password: &str,
        cnonce: &str,
        nc: u32,
    ) -> Result<Credentials, DigestError> {
        let qop = if self.qop.is_empty() {
            None
        } else if self.qop.contains(&Qop::Auth) {
            Some(Qop::Auth)
        } else {
            return Err(DigestError::UnsupportedQop);
        };
        let with_cnonce = qop.is_some() || self.algorithm.is_sess();
        let mut creds = Credentials {
            username: user.to_string(),
            realm: self.realm.clone(),
            nonce: self.nonce.clone(),
            uri: uri.to_string(),
            response: String::new(),
            algorithm: self.algorithm,
            qop,
            cnonce: with_cnonce.then(|| cnonce.to_string()),
            nc: qop.map(|_| nc),
            opaque: self.opaque.clone(),
        };
        let base = ha1(self.algorithm, user, &self.realm, password);
        creds.response = creds.expected_response(&base, method)?;
        Ok(creds)
    }
}

impl fmt::Display for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_header_value())
    }
}

/// Digest credentials, the value of an `Authorization` or `Proxy-Authorization` header
/// (RFC 3261 §22.2, §22.3; RFC 7616 §3.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The realm of the challenge answered.
    pub realm: String,
    /// The server nonce answered.
    pub nonce: String,
    /// The digest-uri the client hashed: often the Request-URI, not always (sipp sends
    /// `sip:HOST:PORT`); the response is verified against this value.
    pub uri: String,
    /// The request-digest, lower-case hex.
    pub response: String,
    /// The algorithm (MD5 when the parameter is absent).
    pub algorithm: Algorithm,
    /// The quality of protection applied, if any.
    pub qop: Option<Qop>,
    /// The client nonce (with a qop, or a `-sess` algorithm).
    pub cnonce: Option<String>,
    /// The nonce-count (with a qop).
    pub nc: Option<u32>,
    /// The challenge's opaque value, returned unchanged.
    pub opaque: Option<String>,
}

impl Credentials {
    /// Parses a credentials header value. Hostile input gives an error, never a panic; an
    /// unknown algorithm gives [`DigestError::UnsupportedAlgorithm`].
    pub fn parse(value: &str) -> Result<Credentials, DigestError> {
        let params = parse_digest_params(value)?;
        let get = |name: &'static str, missing: &'static str| {
            param(&params, name)
                .map(str::to_string)
                .ok_or(DigestError::Malformed(missing))
        };
        let username = get("username", "username missing")?;
        let realm = get("realm", "realm missing")?;
        let nonce = get("nonce", "nonce missing")?;
        let uri = get("uri", "uri missing")?;
        let response = get("response", "response missing")?.to_ascii_lowercase();
        let algorithm = match param(&params, "algorithm") {
            None => Algorithm::Md5,
            Some(a) => Algorithm::from_name(a).ok_or(DigestError::UnsupportedAlgorithm)?,
        };
        let qop = match param(&params, "qop") {
            None => None,
            Some(q) => Some(Qop::from_name(q).ok_or(DigestError::UnsupportedQop)?),
        };
        let cnonce = param(&params, "cnonce").map(str::to_string);
        let nc = param(&params, "nc").map(parse_nc).transpose()?;
        if qop.is_some() && (cnonce.is_none() || nc.is_none()) {
            return Err(DigestError::Malformed("qop without cnonce and nc"));
        }
        if algorithm.is_sess() && cnonce.is_none() {
            return Err(DigestError::Malformed("-sess algorithm without cnonce"));
        }
        Ok(Credentials {
            username,
            realm,
            nonce,
            uri,
            response,
            algorithm,
            qop,
            cnonce,
            nc,
            opaque: param(&params, "opaque").map(str::to_string),
        })
    }

    /// The header value, `Digest username="…", realm="…", …` (RFC 7616 §3.4).
    pub fn to_header_value(&self) -> String {
        let mut out = format!(
            "Digest username={}, realm={}, nonce={}, uri={}, response={}, algorithm={}",
            quoted(&self.username),
            quoted(&self.realm),
            quoted(&self.nonce),
            quoted(&self.uri),
            quoted(&self.response),
            self.algorithm.name()
        );
        if let Some(cnonce) = &self.cnonce {
            out.push_str(", cnonce=");
            out.push_str(&quoted(cnonce));
        }
        if let Some(qop) = self.qop {
            out.push_str(", qop=");
            out.push_str(qop.name());
        }
        if let Some(nc) = self.nc {
            out.push_str(&format!(", nc={nc:08x}"));
        }
        if let Some(opaque) = &self.opaque {
            out.push_str(", opaque=");
            out.push_str(&quoted(opaque));
        }
        out
    }

    /// The request-digest these credentials should carry for `method`, given the base
    /// H(A1) = H(user:realm:password) (RFC 7616 §3.4.1–§3.4.3): for `-sess`, H(A1) becomes
    /// H(H(A1):nonce:cnonce); H(A2) = H(method:uri); with `qop=auth` the digest is
    /// H(H(A1):nonce:nc:cnonce:auth:H(A2)), without a qop H(H(A1):nonce:H(A2)).
    pub fn expected_response(&self, ha1_base: &str, method: &str) -> Result<String, DigestError> {
        let family = self.algorithm.family();
        let ha1 = if self.algorithm.is_sess() {
            let cnonce = self
                .cnonce
                .as_deref()
                .ok_or(DigestError::Malformed("-sess algorithm without cnonce"))?;
            family.hash_hex(&[
                ha1_base.as_bytes(),
                self.nonce.as_bytes(),
                cnonce.as_bytes(),
            ])
        } else {
            ha1_base.to_string()
        };
        let ha2 = family.hash_hex(&[method.as_bytes(), self.uri.as_bytes()]);
        match self.qop {
            None => Ok(family.hash_hex(&[ha1.as_bytes(), self.nonce.as_bytes(), ha2.as_bytes()])),
            Some(Qop::AuthInt) => Err(DigestError::UnsupportedQop),
            Some(Qop::Auth) => {
                let (Some(nc), Some(cnonce)) = (self.nc, self.cnonce.as_deref()) else {
                    return Err(DigestError::Malformed("qop without cnonce and nc"));
                };
                let nc = format!("{nc:08x}");
                Ok(family.hash_hex(&[
                    ha1.as_bytes(),
                    self.nonce.as_bytes(),
                    nc.as_bytes(),
                    cnonce.as_bytes(),
                    b"auth",
                    ha2.as_bytes(),
                ]))
            }
        }
    }
}

impl Credentials {
    /// Whether the `uri` these credentials were computed over designates the same resource
    /// as the request's Request-URI `request_uri` (RFC 7616 §3.4.6, RFC 2617 §3.2.2.5: the
    /// server "MUST assure" it does, and SHOULD answer 400 when not; RFC 3261 §22.4 takes
    /// digest over as it is). Equal text matches; SIP and SIPS URIs also match when equal
    /// under RFC 3261 §19.1.4 (user and password case-sensitive after `%HH` decoding, host
    /// without regard to case or as an address, the same port or none on both, parameters
    /// present in both equal, `user`, `ttl`, `method` and `maddr` on both or neither,
    /// headers all equal); `tel:` URIs match by number and parameters (RFC 3966 §4).
    /// Anything that does not parse matches only as identical text.
    pub fn uri_matches(&self, request_uri: &str) -> bool {
        if self.uri == request_uri {
            return true;
        }
        match (
            crate::uri::Uri::parse(&self.uri),
            crate::uri::Uri::parse(request_uri),
        ) {
            (Ok(a), Ok(b)) => equivalent_uris(&a, &b),
            _ => false,
        }
    }
}

/// RFC 3261 §19.1.4 equality of two SIP or SIPS URIs, and RFC 3966 §4 of two `tel:` URIs
/// (number without visual separators, parameters as for SIP); other schemes never match.
fn equivalent_uris(a: &crate::uri::Uri, b: &crate::uri::Uri) -> bool {
    use crate::uri::{percent_decode, Host, Scheme};
    fn password(u: &crate::uri::Uri) -> Option<std::borrow::Cow<'_, str>> {
        u.password().map(percent_decode)
    }
    if a.scheme() != b.scheme() {
        return false;
    }
    match a.scheme() {
        Scheme::Sip | Scheme::Sips => {}
        Scheme::Tel => {
            return a.tel_number().is_some()
                && a.tel_number() == b.tel_number()
                && same_params(a, b)
        }
        Scheme::Other => return false,
    }
    let same_host = match (a.host(), b.host()) {
        (Some(Host::Domain(x)), Some(Host::Domain(y))) => x.eq_ignore_ascii_case(y),
        (Some(x), Some(y)) => x == y,
        _ => false,
    };
    let headers = |u: &crate::uri::Uri| {
        let mut h: Vec<(String, String)> = u
            .headers()
            .map(|(n, v)| {
                (
                    percent_decode(n).to_ascii_lowercase(),
                    percent_decode(v).into_owned(),
                )
            })
            .collect();
        h.sort();
        h
    };
    same_host
        && a.port() == b.port()
        && a.user_decoded() == b.user_decoded()
        && password(a) == password(b)
        && same_params(a, b)
        && headers(a) == headers(b)
}

/// RFC 3261 §19.1.4 on URI parameters: any parameter in both must be equal (names and
/// values without regard to case, after `%HH` decoding); `user`, `ttl`, `method` and `maddr`
/// must be in both or neither; any other parameter in one only is ignored.
fn same_params(a: &crate::uri::Uri, b: &crate::uri::Uri) -> bool {
    use crate::uri::percent_decode;
    let value = |u: &crate::uri::Uri, name: &str| {
        u.param(name)
            .map(|v| v.map(|v| percent_decode(v).to_ascii_lowercase()))
    };
    let one_way = |x: &crate::uri::Uri, y: &crate::uri::Uri| {
        x.params().all(|(name, _)| {
            let (vx, vy) = (value(x, name), value(y, name));
            let must_be_in_both = ["user", "ttl", "method", "maddr"]
                .iter()
                .any(|m| m.eq_ignore_ascii_case(name));
            match vy {
                Some(_) => vx == vy,
                None => !must_be_in_both,
            }
        })
    };
    one_way(a, b) && one_way(b, a)
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_header_value())
    }
}

// ---------------------------------------------------------------------------------------
// Client side.

/// Picks the challenge to answer from the values of several `WWW-Authenticate` /
/// `Proxy-Authenticate` headers: the strongest supported algorithm (SHA-256 over MD5,
/// RFC 8760 §2.4), the first offered among equals. Values that are not digest or use an
/// unknown algorithm are skipped; when none is usable the first error is returned.
pub fn best_challenge<'a, I>(values: I) -> Result<Challenge, DigestError>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut best: Option<Challenge> = None;
    let mut first_error = None;
    for value in values {
        match Challenge::parse(value) {
            Ok(c) => {
                let better = best
                    .as_ref()
                    .is_none_or(|b| c.algorithm.strength() > b.algorithm.strength());
                if better {
                    best = Some(c);
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    best.ok_or(first_error.unwrap_or(DigestError::Malformed("no challenge")))
}

/// Answers one challenge header value for a request: the value of the `Authorization`
/// (for a 401) or `Proxy-Authorization` (for a 407) header to add (RFC 3261 §22.2, §22.3).
/// `uri` is the Request-URI, `cnonce` a fresh random string, `nc` the nonce-count.
pub fn respond(
    challenge: &str,
    method: &str,
    uri: &str,
    user: &str,
    password: &str,
    cnonce: &str,
    nc: u32,
) -> Result<String, DigestError> {
    Challenge::parse(challenge)?
        .answer(method, uri, user, password, cnonce, nc)
        .map(|c| c.to_header_value())
}

/// A fresh client nonce: 16 random bytes as hex.
pub fn new_cnonce() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

// ---------------------------------------------------------------------------------------
// Server side.

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a decoded nonce: issue time (8), salt (8), truncated MAC (16).
const NONCE_BYTES: usize = 32;
const MAC_BYTES: usize = 16;
const REPLAY_SHARDS: usize = 16;
const DEFAULT_REPLAY_CAPACITY: usize = 65_536;
/// A replay shard whose map has at most this capacity keeps it when pruned.
const REPLAY_KEEP_ROOM: usize = 256;

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The authenticated user name.
    pub username: String,
    /// The algorithm the client used.
    pub algorithm: Algorithm,
    /// The nonce-count accepted.
    pub nc: u32,
    /// When the nonce was issued (Unix seconds).
    pub nonce_issued_at: u64,
}

/// The server side of digest authentication (RFC 3261 §22.1, RFC 7616 §3.3, §3.4, §5):
/// challenges, and verification of credentials with stateless nonces.
///
/// A nonce is hex(issued-at ‖ salt ‖ HMAC-SHA-256(key, realm ‖ issued-at ‖ salt ‖
/// binding)[..16]): the server recognises its own nonces and their age without storing
/// them. Only nonces that have authenticated a request are remembered (with the highest
/// nonce-count seen), in a bounded sharded map pruned on expiry; when it overflows, the
/// oldest entries are dropped and nonces as old as those are then treated as stale, so a
/// dropped entry can never be replayed. All methods take `&self`; one server can be shared
/// by many tasks.
pub struct DigestServer {
    realm: String,
    key: [u8; 32],
    nonce_ttl: u64,
    offered: Vec<Algorithm>,
    replay: ReplayGuard,
}

impl fmt::Debug for DigestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestServer")
            .field("realm", &self.realm)
            .field("nonce_ttl", &self.nonce_ttl)
            .field("offered", &self.offered)
            .finish_non_exhaustive()
    }
}

impl DigestServer {
    /// A server for `realm` whose nonces are keyed by `secret_key` and live `nonce_ttl`
    /// (whole seconds; at least one). Offers SHA-256 then MD5.
    pub fn new(
        realm: impl Into<String>,
        secret_key: [u8; 32],
        nonce_ttl: Duration,
    ) -> DigestServer {
        DigestServer {
            realm: realm.into(),
            key: secret_key,
            nonce_ttl: nonce_ttl.as_secs().max(1),
            offered: vec![Algorithm::Sha256, Algorithm::Md5],
            replay: ReplayGuard::new(DEFAULT_REPLAY_CAPACITY),
        }
    }

    /// Sets the algorithms offered, one challenge each, in order of preference (RFC 8760
    /// §2.4). Credentials using another algorithm are refused. An empty list is ignored.
    pub fn with_algorithms(mut self, algorithms: &[Algorithm]) -> DigestServer {
        if !algorithms.is_empty() {
            self.offered = algorithms.to_vec();
        }
        self
    }

    /// Sets how many used nonces are remembered for replay detection (default 65 536).
    pub fn with_replay_capacity(mut self, capacity: usize) -> DigestServer {
        self.replay = ReplayGuard::new(capacity);
        self
    }

    /// The realm of this server.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The challenge header values for a 401/407: one per offered algorithm, SHA-256 first,
    /// sharing one fresh nonce, each with `qop="auth"`; `stale=true` after
    /// [`DigestError::Stale`].
    pub fn challenge(&self, now_unix_secs: u64, stale: bool) -> Vec<String> {
        self.challenge_bound(now_unix_secs, stale, &[])
    }

    /// Like [`DigestServer::challenge`], with the nonce bound to `binding` (for instance the
    /// client's address, or the Call-ID): [`DigestServer::verify_bound`] then accepts it
    /// only with the same binding.
    pub fn challenge_bound(&self, now_unix_secs: u64, stale: bool, binding: &[u8]) -> Vec<String> {
        let nonce = self.new_nonce(now_unix_secs, binding);
        self.offered
            .iter()
            .map(|&algorithm| {
                Challenge {
                    realm: self.realm.clone(),
                    nonce: nonce.clone(),
                    algorithm,
                    qop: vec![Qop::Auth],
                    opaque: None,
                    stale,
                }
                .to_header_value()
            })
            .collect()
    }

    /// Verifies credentials of a request with `method`. `ha1_lookup` is asked once for the
    /// credential stored under the user name; `None` (no such user) is verified along the
    /// same path against a dummy and gives [`DigestError::UnknownUser`].
    ///
    /// Checks, in order: realm, algorithm offered, qop `auth` with cnonce and nc, nonce
    /// ours, response (constant time), nonce age ([`DigestError::Stale`] only when the
    /// response is right, RFC 7616 §3.3), nonce-count growth. The response is checked
    /// against the `uri` the client sent.
    pub fn verify<F>(
        &self,
        creds: &Credentials,
        method: &str,
        ha1_lookup: F,
        now_unix_secs: u64,
    ) -> Result<Verified, DigestError>
    where
        F: FnOnce(&str) -> Option<StoredCredential>,
    {
        self.verify_bound(creds, method, ha1_lookup, now_unix_secs, &[])
    }

    /// Like [`DigestServer::verify`], for a nonce issued by
    /// [`DigestServer::challenge_bound`] with `binding`; a different binding gives
    /// [`DigestError::ForeignNonce`].
    pub fn verify_bound<F>(
        &self,
        creds: &Credentials,
        method: &str,
        ha1_lookup: F,
        now_unix_secs: u64,
        binding: &[u8],
    ) -> Result<Verified, DigestError>
    where
        F: FnOnce(&str) -> Option<StoredCredential>,
    {
        if creds.realm != self.realm {
            return Err(DigestError::RealmMismatch);
        }
        if !self.offered.contains(&creds.algorithm) {
            return Err(DigestError::UnsupportedAlgorithm);
        }
        // We always offer qop=auth; a client must then use it (RFC 7616 §3.4).
        let nc = match (creds.qop, creds.nc, &creds.cnonce) {
            (Some(Qop::Auth), Some(nc), Some(_)) => nc,
            (Some(Qop::AuthInt), _, _) => return Err(DigestError::UnsupportedQop),
            (None, _, _) => return Err(DigestError::Malformed("qop missing")),
            _ => return Err(DigestError::Malformed("qop without cnonce and nc")),
        };
        let (issued, key) = self.check_nonce(&creds.nonce, binding)?;

        let stored = ha1_lookup(&creds.username);
        let known_ha1 = stored
            .as_ref()
            .and_then(|s| s.ha1_for(creds.algorithm))
            .filter(|h| h.len() == creds.algorithm.family().hex_len());
        let dummy;
        let ha1 = match known_ha1 {
            Some(h) => h,
            None => {
                dummy = self.dummy_ha1(&creds.username, creds.algorithm.family());
                dummy.as_str()
            }
        };
        let expected = creds.expected_response(ha1, method)?;
        let matches = constant_time_eq(expected.as_bytes(), creds.response.as_bytes());
        if known_ha1.is_none() {
            return Err(DigestError::UnknownUser);
        }
        if !matches {
            return Err(DigestError::WrongResponse);
        }
        if now_unix_secs > issued.saturating_add(self.nonce_ttl) {
            return Err(DigestError::Stale);
        }
        self.replay
            .check_and_record(key, issued, nc, now_unix_secs, self.nonce_ttl)?;
        Ok(Verified {
            username: creds.username.clone(),
            algorithm: creds.algorithm,
            nc,
            nonce_issued_at: issued,
        })
    }

    /// Drops remembered nonces that have expired (also done on the fly when the map fills).
    pub fn prune(&self, now_unix_secs: u64) {
        self.replay.prune(now_unix_secs, self.nonce_ttl);
    }

    fn mac(&self, raw: &[u8], binding: &[u8]) -> [u8; MAC_BYTES] {
        let mut out = [0u8; MAC_BYTES];
        // HMAC accepts keys of any length; the error branch cannot happen with 32 bytes.
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.key) else {
            return out;
        };
        mac.update(b"sip-core digest nonce v1\0");
        mac.update(&(self.realm.len() as u64).to_be_bytes());
        mac.update(self.realm.as_bytes());
        mac.update(raw);
        mac.update(binding);
        let full = mac.finalize().into_bytes();
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }

    fn new_nonce(&self, now_unix_secs: u64, binding: &[u8]) -> String {
        let mut bytes = [0u8; NONCE_BYTES];
        bytes[..8].copy_from_slice(&now_unix_secs.to_be_bytes());
        rand::thread_rng().fill_bytes(&mut bytes[8..16]);
        let mac = self.mac(&bytes[..16], binding);
        bytes[16..].copy_from_slice(&mac);
        hex::encode(bytes)
    }

    /// Checks that a nonce is ours; gives its issue time and its replay-guard key.
    fn check_nonce(&self, nonce: &str, binding: &[u8]) -> Result<(u64, u64), DigestError> {
        let mut bytes = [0u8; NONCE_BYTES];
        if nonce.len() != NONCE_BYTES * 2 || hex::decode_to_slice(nonce, &mut bytes).is_err() {
            return Err(DigestError::ForeignNonce);
        }
        let mac = self.mac(&bytes[..16], binding);
        if !constant_time_eq(&mac, &bytes[16..]) {
            return Err(DigestError::ForeignNonce);
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&bytes[..8]);
        // The replay guard's key: 64 bits of the MAC, which the other bytes and the key
        // decide (see [`ReplayGuard`]).
        let mut key = [0u8; 8];
        key.copy_from_slice(&bytes[16..24]);
        Ok((u64::from_be_bytes(ts), u64::from_le_bytes(key)))
    }

    /// A stand-in H(A1) for a user with no stored credential: keyed, so it is not guessable,
    /// and computed at the cost of a real verification.
    fn dummy_ha1(&self, user: &str, family: HashFamily) -> String {
        let mac = self.mac(b"unknown user", user.as_bytes());
        family.hash_hex(&[&mac])
    }
}

/// Remembers, per used nonce, the highest nonce-count accepted (RFC 7616 §5.12).
///
/// A nonce is known by 64 bits of its MAC (24 bytes an entry, not 48 with the whole nonce
/// as key): only the relay makes nonces, so two that share those bits are chance, odds
/// about n²/2⁶⁵; and sharing can only make a request look replayed (a new challenge),
/// never let a replay through, since a nonce always finds its own entry.
struct ReplayGuard {
    shards: Vec<Mutex<ReplayShard>>,
    capacity_per_shard: usize,
}

#[derive(Default)]
struct ReplayShard {
    seen: HashMap<u64, Seen>,
    /// Entries issued at or before this time may have been dropped on overflow: an unknown
    /// nonce that old is treated as stale rather than as new.
    floor: Option<u64>,
}

struct Seen {
    issued: u64,
    nc: u32,
}

impl ReplayGuard {
    fn new(capacity: usize) -> ReplayGuard {
        ReplayGuard {
            shards: (0..REPLAY_SHARDS).map(|_| Mutex::default()).collect(),
            capacity_per_shard: (capacity / REPLAY_SHARDS).max(8),
        }
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, ReplayShard> {
        // The MAC bytes are uniformly distributed: a fine shard selector.
        let index = (key >> 56) as usize % self.shards.len();
        // A poisoned lock only means another task panicked mid-update of a plain map;
        // the map is still usable.
        match self.shards[index].lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn check_and_record(
        &self,
        key: u64,
        issued: u64,
        nc: u32,
        now: u64,
        ttl: u64,
    ) -> Result<(), DigestError> {
        let mut shard = self.shard(key);
        if let Some(seen) = shard.seen.get_mut(&key) {
            if nc <= seen.nc {
                return Err(DigestError::Replay);
            }
            seen.nc = nc;
            return Ok(());
        }
        if shard.floor.is_some_and(|floor| issued <= floor) {
            return Err(DigestError::Stale);
        }
        if nc == 0 {
            return Err(DigestError::Replay);
        }
        if shard.seen.len() >= self.capacity_per_shard {
            shard.make_room(now, ttl, self.capacity_per_shard);
            if shard.floor.is_some_and(|floor| issued <= floor) {
                return Err(DigestError::Stale);
            }
        }
        shard.seen.insert(key, Seen { issued, nc });
        Ok(())
    }

    fn prune(&self, now: u64, ttl: u64) {
        for shard in &self.shards {
            let mut shard = match shard.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            shard
                .seen
                .retain(|_, s| s.issued.saturating_add(ttl) >= now);
            // A map keeps its capacity as entries leave: after a peak of calls, give back
            // the room once it is under a quarter used.
            let (len, capacity) = (shard.seen.len(), shard.seen.capacity());
            if capacity > REPLAY_KEEP_ROOM && len < capacity / 4 {
                shard.seen.shrink_to((len * 2).max(REPLAY_KEEP_ROOM / 2));
            }
        }
    }
}

impl ReplayShard {
    /// Drops expired entries; if that is not enough, drops the oldest eighth and raises the
    /// floor to the newest issue time dropped.
    fn make_room(&mut self, now: u64, ttl: u64, capacity: usize) {
        self.seen.retain(|_, s| s.issued.saturating_add(ttl) >= now);
        if self.seen.len() < capacity {
            return;
        }
        let mut times: Vec<u64> = self.seen.values().map(|s| s.issued).collect();
        times.sort_unstable();
        let Some(&cutoff) = times.get(times.len() / 8) else {
            return;
        };
        self.seen.retain(|_, s| s.issued > cutoff);
        self.floor = Some(self.floor.map_or(cutoff, |f| f.max(cutoff)));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];
    const T0: u64 = 1_700_000_000;

    #[test]
    fn a_remembered_nonce_takes_24_bytes_of_table() {
        assert_eq!(std::mem::size_of::<(u64, Seen)>(), 24);
    }

    fn server() -> DigestServer {
        DigestServer::new("relay.test", KEY, Duration::from_secs(300))
    }

    fn alice() -> Option<StoredCredential> {
        Some(StoredCredential::from_password(
            "alice",
            "relay.test",
            "secret",
        ))
    }

    /// The client's answer to the first (SHA-256) or second (MD5) challenge.
    fn answer(challenges: &[String], idx: usize, password: &str, nc: u32) -> Credentials {
        let c = Challenge::parse(&challenges[idx]).unwrap();
        c.answer(
            "REGISTER",
            "sip:relay.test",
            "alice",
            password,
            "c0ffee",
            nc,
        )
        .unwrap()
    }

    #[test]
    fn rfc2617_section_3_5_example() {
        // RFC 2617 §3.5: Mufasa / "Circle Of Life", GET /dir/index.html.
        let challenge = "Digest realm=\"testrealm@host.com\", qop=\"auth,auth-int\", \
            nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"";
        let value = respond(
            challenge,
            "GET",
            "/dir/index.html",
            "Mufasa",
            "Circle Of Life",
            "0a4f113b",
            1,
        )
        .unwrap();
        let creds = Credentials::parse(&value).unwrap();
        assert_eq!(creds.response, "6629fae49393a05397450978507c4ef1");
        assert_eq!(creds.nc, Some(1));
        assert!(value.contains("nc=00000001"), "{value}");
        assert!(
            value.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""),
            "{value}"
        );

        // And the RFC's own Authorization header verifies against the same H(A1).
        let rfc = Credentials::parse(
            "Digest username=\"Mufasa\", realm=\"testrealm@host.com\", \
             nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", uri=\"/dir/index.html\", qop=auth, \
             nc=00000001, cnonce=\"0a4f113b\", response=\"6629fae49393a05397450978507c4ef1\", \
             opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .unwrap();
        let base = ha1(
            Algorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        assert_eq!(rfc.expected_response(&base, "GET").unwrap(), rfc.response);
    }

    #[test]
    fn rfc7616_section_3_9_1_examples() {
        // RFC 7616 §3.9.1 (password "Circle of Life", lower-case o: erratum 4495).
        let nonce = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
        let opaque = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS";
        let cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
        let sha = format!(
            "Digest realm=\"http-auth@example.org\", qop=\"auth, auth-int\", algorithm=SHA-256, \
             nonce=\"{nonce}\", opaque=\"{opaque}\""
        );
        let md5 = format!(
            "Digest realm=\"http-auth@example.org\", qop=\"auth, auth-int\", algorithm=MD5, \
             nonce=\"{nonce}\", opaque=\"{opaque}\""
        );
        let run = |ch: &str| {
            let v = respond(
                ch,
                "GET",
                "/dir/index.html",
                "Mufasa",
                "Circle of Life",
                cnonce,
                1,
            )
            .unwrap();
            Credentials::parse(&v).unwrap()
        };
        let s = run(&sha);
        assert_eq!(s.algorithm, Algorithm::Sha256);
        assert_eq!(
            s.response,
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
        let m = run(&md5);
        assert_eq!(m.response, "8ca523f5e9506fed4657c9700eebdbec");
        // The best of the two is SHA-256, whatever the order.
        let best = best_challenge([md5.as_str(), sha.as_str()]).unwrap();
        assert_eq!(best.algorithm, Algorithm::Sha256);
    }

    #[test]
    fn sess_variants_hash_nonce_and_cnonce_into_ha1() {
        let base = ha1(
            Algorithm::Md5,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        let creds = Credentials {
            username: "Mufasa".into(),
            realm: "http-auth@example.org".into(),
            nonce: "n".into(),
            uri: "/".into(),
            response: String::new(),
            algorithm: Algorithm::Md5Sess,
            qop: Some(Qop::Auth),
            cnonce: Some("c".into()),
            nc: Some(1),
            opaque: None,
        };
        let sess_ha1 = HashFamily::Md5.hash_hex(&[base.as_bytes(), b"n", b"c"]);
        let ha2 = HashFamily::Md5.hash_hex(&[b"GET", b"/"]);
        let want = HashFamily::Md5.hash_hex(&[
            sess_ha1.as_bytes(),
            b"n",
            b"00000001",
            b"c",
            b"auth",
            ha2.as_bytes(),
        ]);
        assert_eq!(creds.expected_response(&base, "GET").unwrap(), want);
        let plain = Credentials {
            algorithm: Algorithm::Md5,
            ..creds.clone()
        };
        assert_ne!(plain.expected_response(&base, "GET").unwrap(), want);
    }

    #[test]
    fn server_offers_sha256_then_md5_with_qop() {
        let ch = server().challenge(T0, false);
        assert_eq!(ch.len(), 2);
        let a = Challenge::parse(&ch[0]).unwrap();
        let b = Challenge::parse(&ch[1]).unwrap();
        assert_eq!(a.algorithm, Algorithm::Sha256);
        assert_eq!(b.algorithm, Algorithm::Md5);
        assert_eq!(a.qop, vec![Qop::Auth]);
        assert_eq!(a.realm, "relay.test");
        assert_eq!(a.nonce, b.nonce);
        assert!(!a.stale);
        assert!(ch[0].contains("qop=\"auth\""), "{}", ch[0]);
        let stale = server().challenge(T0, true);
        assert!(Challenge::parse(&stale[0]).unwrap().stale);
        assert!(stale[1].ends_with("stale=true"));
    }

    #[test]
    fn both_algorithms_verify_and_sess_too() {
        let s =
            server().with_algorithms(&[Algorithm::Sha256, Algorithm::Md5, Algorithm::Sha256Sess]);
        let ch = s.challenge(T0, false);
        // The challenges share one nonce, so each answer must raise the nonce-count.
        for idx in 0..3 {
            let creds = answer(&ch, idx, "secret", idx as u32 + 1);
            let v = s.verify(&creds, "REGISTER", |_| alice(), T0 + 1).unwrap();
            assert_eq!(v.username, "alice");
            assert_eq!(v.nc, idx as u32 + 1);
            assert_eq!(v.nonce_issued_at, T0);
        }
    }

    #[test]
    fn wrong_password_is_wrong_response() {
        let s = server();
        let creds = answer(&s.challenge(T0, false), 0, "guess", 1);
        assert_eq!(
            s.verify(&creds, "REGISTER", |_| alice(), T0 + 1),
            Err(DigestError::WrongResponse)
        );
        // Same answer with another method also fails: the method is covered.
        let good = answer(&s.challenge(T0, false), 0, "secret", 1);
        assert_eq!(
            s.verify(&good, "INVITE", |_| alice(), T0 + 1),
            Err(DigestError::WrongResponse)
        );
    }

    #[test]
    fn reused_nonce_count_is_replay() {
        let s = server();
        let ch = s.challenge(T0, false);
        let first = answer(&ch, 0, "secret", 1);
        assert!(s.verify(&first, "REGISTER", |_| alice(), T0 + 1).is_ok());
        assert_eq!(
            s.verify(&first, "REGISTER", |_| alice(), T0 + 2),
            Err(DigestError::Replay)
        );
        let second = answer(&ch, 0, "secret", 2);
        assert!(s.verify(&second, "REGISTER", |_| alice(), T0 + 3).is_ok());
        // An older count after a newer one is refused too; a higher one is fine.
        assert_eq!(
            s.verify(&first, "REGISTER", |_| alice(), T0 + 4),
            Err(DigestError::Replay)
        );
        let tenth = answer(&ch, 0, "secret", 0x0a);
        assert!(tenth.to_header_value().contains("nc=0000000a"));
        assert!(s.verify(&tenth, "REGISTER", |_| alice(), T0 + 5).is_ok());
    }

    #[test]
    fn foreign_nonce_is_refused() {
        let ours = server();
        let other = DigestServer::new("relay.test", [9u8; 32], Duration::from_secs(300));
        let creds = answer(&other.challenge(T0, false), 0, "secret", 1);
        assert_eq!(
            ours.verify(&creds, "REGISTER", |_| alice(), T0 + 1),
            Err(DigestError::ForeignNonce)
        );
        // A nonce in another format, or tampered with (issue time moved forward).
        let mut odd = creds.clone();
        odd.nonce = "dcd98b7102dd2f0e8b11d0f600bfb0c093".into();
        assert_eq!(
            ours.verify(&odd, "REGISTER", |_| alice(), T0),
            Err(DigestError::ForeignNonce)
        );
        let ch = ours.challenge(T0, false);
        let mut tampered = answer(&ch, 0, "secret", 1);
        let later = format!("{:016x}{}", T0 + 10_000, &tampered.nonce[16..]);
        tampered.nonce = later;
        assert_eq!(
            ours.verify(&tampered, "REGISTER", |_| alice(), T0 + 5_000),
            Err(DigestError::ForeignNonce)
        );
    }

    #[test]
    fn expired_nonce_is_stale_only_with_right_password() {
        let s = server();
        let ch = s.challenge(T0, false);
        let good = answer(&ch, 0, "secret", 1);
        assert!(s.verify(&good, "REGISTER", |_| alice(), T0 + 300).is_ok());
        let next = answer(&ch, 0, "secret", 2);
        assert_eq!(
            s.verify(&next, "REGISTER", |_| alice(), T0 + 301),
            Err(DigestError::Stale)
        );
        let bad = answer(&ch, 1, "guess", 3);
        assert_eq!(
            s.verify(&bad, "REGISTER", |_| alice(), T0 + 301),
            Err(DigestError::WrongResponse)
        );
    }

    #[test]
    fn bound_nonce_needs_same_binding() {
        let s = server();
        let ch = s.challenge_bound(T0, false, b"192.0.2.1");
        let creds = answer(&ch, 0, "secret", 1);
        assert_eq!(
            s.verify_bound(&creds, "REGISTER", |_| alice(), T0, b"192.0.2.2"),
            Err(DigestError::ForeignNonce)
        );
        assert!(s
            .verify_bound(&creds, "REGISTER", |_| alice(), T0, b"192.0.2.1")
            .is_ok());
    }

    #[test]
    fn unknown_user_takes_the_same_path() {
        let s = server();
        let creds = answer(&s.challenge(T0, false), 0, "secret", 1);
        let mut asked = None;
        let r = s.verify(
            &creds,
            "REGISTER",
            |u| {
                asked = Some(u.to_string());
                None
            },
            T0,
        );
        assert_eq!(r, Err(DigestError::UnknownUser));
        assert_eq!(asked.as_deref(), Some("alice"));
        // A credential lacking the hash of the algorithm used looks the same.
        let md5_only = StoredCredential::from_ha1(
            Some(&ha1(Algorithm::Md5, "alice", "relay.test", "secret")),
            None,
        )
        .unwrap();
        assert_eq!(
            s.verify(&creds, "REGISTER", |_| Some(md5_only.clone()), T0),
            Err(DigestError::UnknownUser)
        );
    }

    #[test]
    fn realm_algorithm_and_qop_are_checked() {
        let s = server();
        let ch = s.challenge(T0, false);
        let mut creds = answer(&ch, 0, "secret", 1);
        creds.realm = "elsewhere".into();
        assert_eq!(
            s.verify(&creds, "REGISTER", |_| alice(), T0),
            Err(DigestError::RealmMismatch)
        );
        let sha_only = server().with_algorithms(&[Algorithm::Sha256]);
        let md5 = answer(&ch, 1, "secret", 1);
        assert_eq!(
            sha_only.verify(&md5, "REGISTER", |_| alice(), T0),
            Err(DigestError::UnsupportedAlgorithm)
        );
        let no_qop = Challenge {
            qop: vec![],
            ..Challenge::parse(&ch[0]).unwrap()
        }
        .answer("REGISTER", "sip:relay.test", "alice", "secret", "c", 1)
        .unwrap();
        assert_eq!(no_qop.qop, None);
        assert_eq!(
            s.verify(&no_qop, "REGISTER", |_| alice(), T0),
            Err(DigestError::Malformed("qop missing"))
        );
    }

    #[test]
    fn digest_uri_as_sent_is_used() {
        // sipp hashes `sip:HOST:PORT`, not the Request-URI: verification uses `uri=`.
        let s = server();
        let c = Challenge::parse(&s.challenge(T0, false)[1]).unwrap();
        let creds = c
            .answer("INVITE", "sip:127.0.0.1:5060", "alice", "secret", "abc", 1)
            .unwrap();
        assert!(s.verify(&creds, "INVITE", |_| alice(), T0).is_ok());
    }

    #[test]
    fn parses_case_escapes_and_whitespace() {
        let c = Credentials::parse(
            "digest  USERNAME = \"a\\\"b\" ,Realm=\"relay.test\",,nonce=\"n\",uri=sip:x,\
             response=ABCDEF, ALGORITHM=sha-256-SESS, qop=auth, nc=000000Ff, cnonce=\"c\"",
        )
        .unwrap();
        assert_eq!(c.username, "a\"b");
        assert_eq!(c.uri, "sip:x");
        assert_eq!(c.response, "abcdef");
        assert_eq!(c.algorithm, Algorithm::Sha256Sess);
        assert_eq!(c.nc, Some(255));
        // Round trip through our own writer.
        assert_eq!(Credentials::parse(&c.to_header_value()).unwrap(), c);
    }

    #[test]
    fn malformed_credentials_are_errors_not_panics() {
        let cases = [
            "",
            "Digest",
            "Basic dXNlcjpwYXNz",
            "Digest username=",
            "Digest username=\"unterminated",
            "Digest username=\"a\" realm=\"b\"",
            "Digest username=\"a\", username=\"b\", realm=r, nonce=n, uri=u, response=r",
            "Digest =x",
            "Digest username=\"a\", realm=\"r\", nonce=\"n\", uri=\"u\"",
            "Digest username=a, realm=r, nonce=n, uri=u, response=r, qop=auth, nc=1, cnonce=c",
            "Digest username=a, realm=r, nonce=n, uri=u, response=r, qop=auth, nc=0000000g, cnonce=c",
            "Digest username=a, realm=r, nonce=n, uri=u, response=r, qop=auth",
            "Digest username=a, realm=r, nonce=n, uri=u, response=r, algorithm=MD5-sess",
            "Digest username=\"\\",
            "Digest \u{feff}=\u{1F600}",
        ];
        for case in cases {
            assert!(
                matches!(Credentials::parse(case), Err(DigestError::Malformed(_))),
                "{case:?} gave {:?}",
                Credentials::parse(case)
            );
        }
        assert_eq!(
            Credentials::parse(
                "Digest username=a, realm=r, nonce=n, uri=u, response=r, algorithm=SHA-512"
            ),
            Err(DigestError::UnsupportedAlgorithm)
        );
        let many: String = (0..40).map(|i| format!("p{i}=v, ")).collect();
        assert!(Credentials::parse(&format!("Digest {many}")).is_err());
    }

    #[test]
    fn stored_credential_validates_and_redacts() {
        let from_pw = StoredCredential::from_password("alice", "relay.test", "secret");
        let md5 = from_pw.md5_ha1().unwrap().to_ascii_uppercase();
        let sha = from_pw.sha256_ha1().unwrap().to_string();
        let from_ha1 = StoredCredential::from_ha1(Some(&md5), Some(&sha)).unwrap();
        assert_eq!(from_ha1, from_pw);
        assert!(StoredCredential::from_ha1(Some("abc"), None).is_err());
        assert!(StoredCredential::from_ha1(Some(&sha), None).is_err());
        assert!(StoredCredential::from_ha1(None, None).is_err());
        assert!(!format!("{from_pw:?}").contains(&sha));
    }

    #[test]
    fn replay_map_overflow_never_reaccepts() {
        // A long nonce lifetime, so entries leave the map by overflow, not by expiry.
        let s = DigestServer::new("relay.test", KEY, Duration::from_secs(100_000))
            .with_replay_capacity(16 * 8);
        // Fill far beyond capacity with used nonces issued at increasing times.
        let mut first = None;
        for i in 0..400u64 {
            let ch = s.challenge(T0 + i, false);
            let creds = answer(&ch, 0, "secret", 1);
            s.verify(&creds, "REGISTER", |_| alice(), T0 + i).unwrap();
            first.get_or_insert(creds);
        }
        // The oldest nonce's entry was dropped: it is now stale, never accepted again.
        let replayed = first.unwrap();
        assert_eq!(
            s.verify(&replayed, "REGISTER", |_| alice(), T0 + 400),
            Err(DigestError::Stale)
        );
        let mut next = replayed.clone();
        next.nc = Some(2);
        let ha1 = alice().unwrap().sha256_ha1().unwrap().to_string();
        next.response = next.expected_response(&ha1, "REGISTER").unwrap();
        assert_eq!(
            s.verify(&next, "REGISTER", |_| alice(), T0 + 400),
            Err(DigestError::Stale)
        );
        // Fresh nonces still work.
        let creds = answer(&s.challenge(T0 + 401, false), 0, "secret", 1);
        assert!(s.verify(&creds, "REGISTER", |_| alice(), T0 + 401).is_ok());
    }

    #[test]
    fn pruning_gives_back_the_room_of_a_peak() {
        let ttl = Duration::from_secs(30);
        let s = DigestServer::new("relay.test", KEY, ttl);
        let room = |s: &DigestServer| -> usize {
            s.replay
                .shards
                .iter()
                .map(|shard| shard.lock().unwrap().seen.capacity())
                .sum()
        };
        for i in 0..20_000u64 {
            let creds = answer(&s.challenge(T0, false), 0, "secret", 1);
            s.verify(&creds, "REGISTER", |_| alice(), T0 + i / 1000)
                .unwrap();
        }
        let peak = room(&s);
        assert!(peak >= 20_000, "{peak}");
        // Within the nonce lifetime nothing goes: each nonce may still come with nc=2.
        s.prune(T0 + 20);
        assert_eq!(room(&s), peak);
        // Once they expired, the maps give their room back.
        s.prune(T0 + 31);
        assert!(room(&s) <= REPLAY_SHARDS * REPLAY_KEEP_ROOM, "{}", room(&s));
    }

    #[test]
    fn best_challenge_skips_unusable() {
        let sha = "Digest realm=\"r\", nonce=\"n\", algorithm=SHA-256, qop=\"auth\"";
        let md5 = "Digest realm=\"r\", nonce=\"n\", qop=\"auth\"";
        let odd = "Digest realm=\"r\", nonce=\"n\", algorithm=SHA-512-256";
        assert_eq!(
            best_challenge([odd, md5]).unwrap().algorithm,
            Algorithm::Md5
        );
        assert_eq!(
            best_challenge([md5, odd, sha]).unwrap().algorithm,
            Algorithm::Sha256
        );
        assert_eq!(
            best_challenge([odd]),
            Err(DigestError::UnsupportedAlgorithm)
        );
        assert!(best_challenge(std::iter::empty()).is_err());
        let int_only = "Digest realm=\"r\", nonce=\"n\", qop=\"auth-int\"";
        assert_eq!(
            respond(int_only, "INVITE", "sip:x", "u", "p", "c", 1),
            Err(DigestError::UnsupportedQop)
        );
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = Credentials::parse(&s);
            let _ = Challenge::parse(&s);
            let _ = Credentials::parse(&format!("Digest {s}"));
            let _ = Challenge::parse(&format!("Digest realm=\"r\", {s}"));
        }

        #[test]
        fn verifying_arbitrary_credentials_never_panics(
            user in ".{0,20}", nonce in "[0-9a-f]{0,70}", uri in ".{0,20}",
            response in "[0-9a-f]{0,70}", nc in proptest::num::u32::ANY,
            alg in 0usize..4, qop in proptest::bool::ANY,
        ) {
            let s = server();
            let algorithm = [Algorithm::Md5, Algorithm::Md5Sess, Algorithm::Sha256, Algorithm::Sha256Sess][alg];
            let creds = Credentials {
                username: user, realm: "relay.test".into(), nonce, uri, response, algorithm,
                qop: qop.then_some(Qop::Auth), cnonce: Some("c".into()), nc: Some(nc), opaque: None,
            };
            proptest::prop_assert!(s.verify(&creds, "REGISTER", |_| alice(), T0).is_err());
        }
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    fn with_uri(uri: &str) -> Credentials {
        Credentials {
            username: "alice".into(),
            realm: "relay.test".into(),
            nonce: "n".into(),
            uri: uri.into(),
            response: "r".into(),
            algorithm: Algorithm::Md5,
            qop: None,
            cnonce: None,
            nc: None,
            opaque: None,
        }
    }

    #[test]
    fn the_digest_uri_must_designate_the_request_uri() {
        // RFC 3261 §19.1.4 equivalents of the Request-URI match.
        for (digest, request) in [
            ("sip:echo@relay.test", "sip:echo@relay.test"),
            ("sip:echo@RELAY.test", "sip:echo@relay.test"),
            ("SIP:echo@relay.test", "sip:echo@relay.test"),
            ("sip:%65cho@relay.test", "sip:echo@relay.test"),
            (
                "sip:echo@relay.test;Transport=TCP",
                "sip:echo@relay.test;transport=tcp",
            ),
            ("sip:echo@relay.test;quality=hd", "sip:echo@relay.test"),
            ("sip:relay.test", "sip:relay.test"),
            ("sip:[::1]:5060", "sip:[0::1]:5060"),
            ("tel:+1-555-1234", "tel:+15551234"),
        ] {
            assert!(
                with_uri(digest).uri_matches(request),
                "{digest} designates {request}"
            );
        }
        // Anything naming another resource does not.
        for (digest, request) in [
            ("sip:premium@relay.test", "sip:echo@relay.test"),
            ("sip:Echo@relay.test", "sip:echo@relay.test"),
            ("sip:echo@elsewhere.test", "sip:echo@relay.test"),
            ("sip:echo@relay.test:5060", "sip:echo@relay.test"),
            ("sips:echo@relay.test", "sip:echo@relay.test"),
            ("sip:echo@relay.test;user=phone", "sip:echo@relay.test"),
            ("sip:echo@relay.test;maddr=10.0.0.1", "sip:echo@relay.test"),
            (
                "sip:echo@relay.test;quality=sd",
                "sip:echo@relay.test;quality=hd",
            ),
            ("sip:echo@relay.test?Subject=x", "sip:echo@relay.test"),
            ("sip:127.0.0.1:5060", "sip:echo@relay.test"),
            ("tel:+15551234", "tel:+15551235"),
            ("not a uri", "sip:echo@relay.test"),
            ("", "sip:echo@relay.test"),
        ] {
            assert!(
                !with_uri(digest).uri_matches(request),
                "{digest} does not designate {request}"
            );
        }
    }
}
