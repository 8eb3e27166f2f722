//! The registrar (RFC 3261 §10.3): the bindings of each user's address of record to the
//! Contact addresses it registered, with their expiry.
//!
//! Authentication comes first and is not done here: the session layer challenges the
//! REGISTER (401), and hands [`Registrar::register`] the authenticated user name with the
//! request's Contact, Expires, Call-ID and CSeq. The registrar then applies steps 6 to 8 of
//! §10.3: a `*` Contact only alone and with `Expires: 0`; a Contact's `expires` parameter
//! overriding the Expires header, itself overriding the default; an interval shorter than
//! the minimum refused with 423 and `Min-Expires`, a longer one shortened to the maximum; 0
//! removing the binding; Call-ID and CSeq ordering per binding; and all of a request's
//! changes committed together or not at all. The answer lists every current binding with
//! its remaining time, for the Contact headers of the 200.
//!
//! # Application servers
//!
//! An application-server account registers the same way, listing the services it delivers
//! as Contact parameters:
//!
//! ```text
//! Contact: <sip:as1@127.0.0.1:5080>;services="echo,clock";capacity=50;expires=600
//! ```
//!
//! * `services` (required for an application-server account): the service names, separated
//!   by commas, in a quoted string (a single service may go unquoted: `services=echo`).
//!   Each name is a SIP token. The account's `services` list in the configuration limits
//!   which ones it may offer (403 otherwise).
//! * `capacity` (optional): the most sessions the server takes at once, a positive integer.
//!   Without it the server has no limit.
//!
//! Both are ordinary Contact parameters (`generic-param` of RFC 3261 §25.1, as RFC 3840
//! feature parameters are), so a REGISTER carrying them is valid SIP; for a subscriber they
//! are kept and echoed but mean nothing. The session layer hands an application server's
//! bindings to the service directory with [`Binding::dynamic_server`].
//!
//! # Policy
//!
//! `allowed_contact_nets` restricts Contact addresses to the given networks (CIDR), so that
//! a scanner that guessed a password cannot bind a user to a foreign address. A Contact
//! whose host is a domain name is refused when the list is not empty, since it cannot be
//! checked without resolving it.
//!
//! With the list empty (the default) a subscriber may bind any address (a terminal behind a
//! NAT names an address the relay cannot reach anyway, and the relay answers it on its
//! flow), but an application-server account may bind only the address its REGISTER came
//! from, as an IP literal: the relay sends inquiries there carrying a subscriber's identity
//! and SDP, so an account must not be able to point them at a host of its choosing
//! (another server's, or anyone's). An operator whose servers register from elsewhere lists
//! the networks they are in.
//!
//! # Concurrency
//!
//! The bindings live in N shards keyed by the user name, each behind its own mutex, so
//! registrations and lookups of different users rarely meet on a lock; there is no global
//! lock. Each shard keeps an ordered queue of expiry times for [`Registrar::expire`] and
//! [`Registrar::next_expiry`], one entry per user (its earliest binding's), moved by each
//! refresh, so the queue never holds more entries than there are registered users.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rsip::prelude::*;
use sip_core::uri::{Host, Uri};
use sip_core::Peer;

use crate::directory::DynamicServer;
use crate::rules::is_token;

/// An IP network in CIDR notation, the one sip-core reads for its own limits.
pub use sip_core::source::Net as IpNet;

/// What the registrar accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrarPolicy {
    /// The shortest registration accepted, in seconds; shorter ones get 423 (§10.3 step 7).
    pub min_expires: u32,
    /// The longest registration granted; longer ones are shortened to it.
    pub max_expires: u32,
    /// The registration time when neither the Contact nor the request gives one (and for a
    /// malformed value, RFC 3261 §20.19).
    pub default_expires: u32,
    /// The most Contacts one user may have bound at once.
    pub max_bindings_per_user: usize,
    /// The networks Contact addresses must be in. Empty: a subscriber's may be anywhere, an
    /// application server's must be the address its REGISTER came from.
    pub allowed_contact_nets: Vec<IpNet>,
}

impl Default for RegistrarPolicy {
    fn default() -> Self {
        RegistrarPolicy {
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            max_bindings_per_user: 10,
            allowed_contact_nets: Vec::new(),
        }
    }
}

/// Who is registering, which decides how the services parameter is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role<'a> {
    /// A terminal's subscriber: Contact parameters are kept as they are.
    Subscriber,
    /// An application-server account: every Contact added must list its services.
    AppServer {
        /// The services the account may offer; `None` for any.
        allowed_services: Option<&'a [String]>,
    },
}

/// Why a REGISTER is refused; each maps to the status of the response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// 400: the request is malformed (a bad Contact, `*` misused, a missing header).
    #[error("400 {0}")]
    BadRequest(String),
    /// 403: the request is well formed but not allowed (a Contact address outside the
    /// allowed networks, too many bindings, a service the account may not offer).
    #[error("403 {0}")]
    Forbidden(String),
    /// 423: an expiry shorter than the minimum; the response carries `Min-Expires`.
    #[error("423 Interval Too Brief (Min-Expires: {min_expires})")]
    IntervalTooBrief {
        /// The value of the `Min-Expires` header.
        min_expires: u32,
    },
    /// 500: a request with the same Call-ID as a binding and a CSeq not higher (out of
    /// order or replayed; RFC 3261 §10.3 step 7 aborts it, and as for requests within a
    /// dialog (§12.2.2) the answer is 500).
    #[error("500 out-of-order CSeq {cseq} for Call-ID {call_id}")]
    OutOfOrder {
        /// The request's Call-ID.
        call_id: String,
        /// The request's CSeq number.
        cseq: u32,
    },
}

impl RegisterError {
    /// The status code of the response.
    pub fn status_code(&self) -> u16 {
        match self {
            RegisterError::BadRequest(_) => 400,
            RegisterError::Forbidden(_) => 403,
            RegisterError::IntervalTooBrief { .. } => 423,
            RegisterError::OutOfOrder { .. } => 500,
        }
    }

    /// The reason phrase of the response, saying what was wrong.
    pub fn reason(&self) -> String {
        match self {
            RegisterError::BadRequest(reason) | RegisterError::Forbidden(reason) => reason.clone(),
            RegisterError::IntervalTooBrief { .. } => "Interval Too Brief".into(),
            RegisterError::OutOfOrder { .. } => "Out Of Order CSeq".into(),
        }
    }

    /// The extra header the response needs: `Min-Expires` for a 423.
    pub fn extra_header(&self) -> Option<rsip::Header> {
        match self {
            RegisterError::IntervalTooBrief { min_expires } => Some(rsip::Header::MinExpires(
                rsip::headers::MinExpires::new(min_expires.to_string()),
            )),
            _ => None,
        }
    }
}

/// A Contact header parameter as received; `value` is unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactParam {
    /// The parameter name.
    pub name: String,
    /// The value, without quotes; `None` for a flag parameter.
    pub value: Option<String>,
    /// Whether the value was a quoted string (it is written back quoted).
    pub quoted: bool,
}

impl fmt::Display for ContactParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.value, self.quoted) {
            (None, _) => write!(f, ";{}", self.name),
            (Some(value), true) => {
                let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
                write!(f, ";{}=\"{escaped}\"", self.name)
            }
            (Some(value), false) => write!(f, ";{}={value}", self.name),
        }
    }
}

/// One entry of a Contact header (RFC 3261 §20.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactEntry {
    /// `*`: every binding (only with `Expires: 0`).
    Wildcard,
    /// An address with its parameters.
    Address(Box<ContactAddress>),
}

/// A Contact address: `"Name" <uri>;params` or `uri;params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactAddress {
    /// The display name, unquoted.
    pub display_name: Option<String>,
    /// The URI as written.
    pub uri_text: String,
    /// The URI, read with sip-core's parser (IPv6 references included).
    pub uri: Uri,
    /// The header parameters, in order.
    pub params: Vec<ContactParam>,
}

impl ContactAddress {
    fn param(&self, name: &str) -> Option<&ContactParam> {
        self.params
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }
}

/// Splits `s` at `sep` where it is outside quoted strings and, if `angles`, outside `<…>`.
fn split_outside(s: &str, sep: char, angles: bool) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut quoted, mut escaped, mut depth, mut start) = (false, false, 0u32, 0);
    for (i, c) in s.char_indices() {
        if quoted {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '<' if angles => depth += 1,
            '>' if angles => depth = depth.saturating_sub(1),
            c if c == sep && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

fn parse_params(rest: &str) -> Result<Vec<ContactParam>, String> {
    let mut parts = split_outside(rest, ';', false).into_iter();
    if parts.next().is_some_and(|before| !before.trim().is_empty()) {
        return Err(format!(
            "unexpected text {:?} before the parameters",
            rest.trim()
        ));
    }
    let mut params = Vec::new();
    for part in parts {
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim())),
            None => (part.trim(), None),
        };
        if !is_token(name) {
            return Err(format!("bad parameter name {name:?}"));
        }
        let param = match value {
            None => ContactParam {
                name: name.to_owned(),
                value: None,
                quoted: false,
            },
            Some(v) if v.starts_with('"') => ContactParam {
                name: name.to_owned(),
                value: Some(unquote(v).ok_or_else(|| format!("bad quoted value of {name}"))?),
                quoted: true,
            },
            Some(v) => {
                let ok = !v.is_empty()
                    && v.chars()
                        .all(|c| c.is_ascii() && (is_token(&c.to_string()) || ":[]".contains(c)));
                if !ok {
                    return Err(format!("bad value of parameter {name}"));
                }
                ContactParam {
                    name: name.to_owned(),
                    value: Some(v.to_owned()),
                    quoted: false,
                }
            }
        };
        params.push(param);
    }
    Ok(params)
}

fn parse_entry(entry: &str) -> Result<ContactEntry, String> {
    let entry = entry.trim();
    if entry == "*" {
        return Ok(ContactEntry::Wildcard);
    }
    if entry.is_empty() {
        return Err("empty Contact entry".into());
    }
    let lt = split_outside(entry, '<', false);
    let (display_name, uri_text, rest) = if lt.len() > 1 {
        let display = lt[0].trim();
        let after = &entry[lt[0].len() + 1..];
        let (uri, rest) = after
            .split_once('>')
            .ok_or_else(|| "Contact URI without closing `>`".to_owned())?;
        let display_name = match display {
            "" => None,
            d if d.starts_with('"') => {
                Some(unquote(d).ok_or_else(|| "bad quoted display name".to_owned())?)
            }
            d => Some(d.to_owned()),
        };
        (display_name, uri.trim(), rest)
    } else {
        // addr-spec form: parameters after the URI belong to the header (§20.10).
        match entry.split_once(';') {
            Some((uri, _)) => (None, uri.trim(), &entry[uri.len()..]),
            None => (None, entry, ""),
        }
    };
    let uri = Uri::parse(uri_text).map_err(|e| format!("bad Contact URI: {e}"))?;
    if !(uri.is_sip() || uri.is_sips()) || uri.host().is_none() {
        return Err(format!("unsupported Contact URI scheme in {uri_text:?}"));
    }
    Ok(ContactEntry::Address(Box::new(ContactAddress {
        display_name,
        uri_text: uri_text.to_owned(),
        uri,
        params: parse_params(rest)?,
    })))
}

/// Parses one Contact header value, which may hold several entries separated by commas
/// (commas inside quoted strings and `<…>` do not separate).
pub fn parse_contacts(value: &str) -> Result<Vec<ContactEntry>, String> {
    split_outside(value, ',', true)
        .into_iter()
        .map(parse_entry)
        .collect()
}

/// Reads a delta-seconds value (RFC 3261 §25.1); more than 2³²−1 counts as 2³²−1 (§20.19,
/// §10.2.1.1), anything else not a number is `None`.
fn delta_seconds(value: &str) -> Option<u32> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse::<u32>().unwrap_or(u32::MAX))
}

/// Compares Contact URIs as RFC 3261 §19.1.4 does in substance: scheme and host without
/// case, user with case, an explicit port different from none, and the parameters that
/// must match when present (transport, user, ttl, method, maddr).
fn uri_key(uri: &Uri) -> String {
    let scheme = uri.scheme_str().to_ascii_lowercase();
    let user = uri.user().unwrap_or("");
    let host = uri
        .host()
        .map(|h| h.to_string().to_ascii_lowercase())
        .unwrap_or_default();
    let port = uri.port().map(|p| p.to_string()).unwrap_or_default();
    let mut params: Vec<String> = uri
        .params()
        .filter(|(name, _)| {
            ["transport", "user", "ttl", "method", "maddr"]
                .iter()
                .any(|p| name.eq_ignore_ascii_case(p))
        })
        .map(|(name, value)| match value {
            Some(v) => format!(";{name}={v}").to_ascii_lowercase(),
            None => format!(";{name}").to_ascii_lowercase(),
        })
        .collect();
    params.sort();
    format!("{scheme}:{user}@{host}:{port}{}", params.concat())
}

fn host_ip(uri: &Uri) -> Option<IpAddr> {
    match uri.host()? {
        Host::V4(ip) => Some(IpAddr::V4(ip)),
        Host::V6(ip) => Some(IpAddr::V6(ip)),
        Host::Domain(_) => None,
    }
}

/// One binding of a user to a Contact address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The user (address of record) bound.
    pub user: String,
    /// The Contact URI as registered: where requests for the user go.
    pub uri_text: String,
    /// The Contact URI.
    pub uri: Uri,
    /// The display name of the Contact, if any.
    pub display_name: Option<String>,
    /// The Contact parameters other than `expires`, as received.
    pub params: Vec<ContactParam>,
    /// For an application-server account, the services offered (empty otherwise).
    pub services: Vec<String>,
    /// For an application-server account, its capacity in sessions, if given.
    pub capacity: Option<u32>,
    /// The Call-ID of the REGISTER that last updated the binding.
    pub call_id: String,
    /// Its CSeq number.
    pub cseq: u32,
    /// When the binding ends unless refreshed.
    pub expires_at: Instant,
    /// Where that REGISTER came from (transport, address, connection).
    pub source: Option<Peer>,
    key: String,
}

impl Binding {
    /// Seconds left at `now`, rounded up (0 once expired).
    pub fn expires_in(&self, now: Instant) -> u32 {
        let left = self.expires_at.saturating_duration_since(now);
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        u32::try_from(secs).unwrap_or(u32::MAX)
    }

    /// The `q` parameter in thousandths (1000 when absent or unreadable), for ordering.
    pub fn q_millis(&self) -> u32 {
        let Some(q) = self
            .params
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case("q"))
            .and_then(|p| p.value.as_deref())
        else {
            return 1000;
        };
        let (int, frac) = q.split_once('.').unwrap_or((q, ""));
        let frac: String = frac.chars().chain("000".chars()).take(3).collect();
        match (int.parse::<u32>(), frac.parse::<u32>()) {
            (Ok(i), Ok(f)) if i <= 1 => (i * 1000 + f).min(1000),
            _ => 1000,
        }
    }

    /// The Contact header value for the 200 to a REGISTER: the address, its parameters and
    /// `expires` set to the time left (§10.3 step 8).
    pub fn contact_value(&self, now: Instant) -> String {
        let mut out = self.contact_text();
        out.push_str(&format!(";expires={}", self.expires_in(now)));
        out
    }

    /// The Contact header value without `expires`: the address, its display name and its
    /// other parameters, as [`Binding::restore`] reads it back.
    pub fn contact_text(&self) -> String {
        let mut out = match &self.display_name {
            Some(name) => format!("\"{}\" <{}>", name.replace('"', "\\\""), self.uri_text),
            None => format!("<{}>", self.uri_text),
        };
        for param in &self.params {
            out.push_str(&param.to_string());
        }
        out
    }

    /// A binding made elsewhere (another relay sharing the database) from its stored parts:
    /// `contact` as [`Binding::contact_text`] wrote it. It has no `source`: this relay did
    /// not receive the REGISTER, so it holds no connection to the registering party.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        user: &str,
        contact: &str,
        services: Vec<String>,
        capacity: Option<u32>,
        call_id: &str,
        cseq: u32,
        expires_at: Instant,
    ) -> Result<Binding, String> {
        let mut entries = parse_contacts(contact)?;
        let address = match (entries.pop(), entries.is_empty()) {
            (Some(ContactEntry::Address(address)), true) => *address,
            _ => return Err(format!("not one Contact address: {contact:?}")),
        };
        Ok(Binding {
            user: user.to_owned(),
            key: uri_key(&address.uri),
            uri_text: address.uri_text,
            uri: address.uri,
            display_name: address.display_name,
            params: address
                .params
                .into_iter()
                .filter(|p| !p.name.eq_ignore_ascii_case("expires"))
                .collect(),
            services,
            capacity,
            call_id: call_id.to_owned(),
            cseq,
            expires_at,
            source: None,
        })
    }

    /// The Contact header for the 200 to a REGISTER.
    pub fn contact_header(&self, now: Instant) -> rsip::Header {
        rsip::Header::Contact(rsip::headers::Contact::new(self.contact_value(now)))
    }

    /// The binding as a directory entry, if it offers services (an application server).
    pub fn dynamic_server(&self) -> Option<DynamicServer> {
        (!self.services.is_empty()).then(|| DynamicServer {
            uri: self.uri_text.clone(),
            services: self.services.clone(),
            capacity: self.capacity,
            expires_at: self.expires_at,
        })
    }
}

/// The parts of a REGISTER the registrar needs, as found in the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRequest {
    /// Every Contact header value, in order (each may hold several entries).
    pub contacts: Vec<String>,
    /// The Expires header value, if any.
    pub expires: Option<String>,
    /// The Call-ID.
    pub call_id: String,
    /// The CSeq number.
    pub cseq: u32,
    /// Where the request came from.
    pub source: Option<Peer>,
}

impl RegisterRequest {
    /// Collects the Contact, Expires, Call-ID and CSeq headers of `request` (compact forms
    /// `m` and `i` included). A missing Call-ID or an unreadable CSeq is a 400.
    pub fn from_sip(request: &rsip::Request, source: Option<Peer>) -> Result<Self, RegisterError> {
        let mut contacts = Vec::new();
        let mut expires = None;
        let mut call_id = None;
        let mut cseq = None;
        for header in request.headers.iter() {
            match header {
                rsip::Header::Contact(c) => contacts.push(c.value().to_owned()),
                rsip::Header::Expires(e) => expires = Some(e.value().to_owned()),
                rsip::Header::CallId(c) => call_id = Some(c.value().to_owned()),
                rsip::Header::CSeq(c) => cseq = Some(c.value().to_owned()),
                rsip::Header::Other(name, value) if name.eq_ignore_ascii_case("m") => {
                    contacts.push(value.clone())
                }
                rsip::Header::Other(name, value) if name.eq_ignore_ascii_case("i") => {
                    call_id = Some(value.clone())
                }
                _ => {}
            }
        }
        let call_id = call_id
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .ok_or_else(|| RegisterError::BadRequest("Missing Call-ID".into()))?;
        let cseq = cseq
            .as_deref()
            .and_then(|c| c.split_whitespace().next())
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| RegisterError::BadRequest("Bad CSeq".into()))?;
        Ok(RegisterRequest {
            contacts,
            expires,
            call_id,
            cseq,
            source,
        })
    }
}

/// A successful REGISTER: the bindings now current, for the 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterOk {
    /// Every binding of the user after the update, highest `q` first.
    pub bindings: Vec<Binding>,
    /// The bindings the request removed, and any that had expired meanwhile.
    pub removed: Vec<Binding>,
}

impl RegisterOk {
    /// The Contact headers of the 200 (§10.3 step 8), one per binding.
    pub fn contact_headers(&self, now: Instant) -> Vec<rsip::Header> {
        self.bindings
            .iter()
            .map(|b| b.contact_header(now))
            .collect()
    }
}

#[derive(Debug, Default)]
struct Shard {
    users: HashMap<String, Vec<Binding>>,
    /// One entry per user with bindings: the earliest expiry among them. A refresh moves
    /// the user's entry instead of adding one, so a flood of REGISTER refreshes cannot grow
    /// the queue (issue 14, finding 11).
    timers: BTreeSet<(Instant, String)>,
    /// The time of each user's entry in `timers`.
    scheduled: HashMap<String, Instant>,
}

impl Shard {
    /// Puts the user's one timer entry at the earliest expiry of its bindings, or removes
    /// it when the user has none.
    fn reschedule(&mut self, user: &str) {
        let next = self
            .users
            .get(user)
            .and_then(|list| list.iter().map(|b| b.expires_at).min());
        let current = self.scheduled.get(user).copied();
        if next == current {
            return;
        }
        if let Some(at) = current {
            self.timers.remove(&(at, user.to_owned()));
            self.scheduled.remove(user);
        }
        if let Some(at) = next {
            self.timers.insert((at, user.to_owned()));
            self.scheduled.insert(user.to_owned(), at);
        }
    }

    /// Removes the user's bindings that ended at or before `now`.
    fn sweep_user(&mut self, user: &str, now: Instant) -> Vec<Binding> {
        let Some(list) = self.users.get_mut(user) else {
            return Vec::new();
        };
        let (gone, kept): (Vec<Binding>, Vec<Binding>) =
            list.drain(..).partition(|b| b.expires_at <= now);
        if kept.is_empty() {
            self.users.remove(user);
        } else {
            *list = kept;
        }
        gone
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A change a REGISTER asks for, checked before anything is committed.
struct Update {
    address: ContactAddress,
    key: String,
    expires: u32,
    services: Vec<String>,
    capacity: Option<u32>,
}

/// The registrar. See the [module documentation](self).
#[derive(Debug)]
pub struct Registrar {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    policy: RegistrarPolicy,
}

impl Registrar {
    /// A registrar with `shards` shards (at least one) applying `policy`.
    pub fn new(policy: RegistrarPolicy, shards: usize) -> Registrar {
        Registrar {
            shards: (0..shards.max(1)).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            policy,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &RegistrarPolicy {
        &self.policy
    }

    fn shard(&self, user: &str) -> &Mutex<Shard> {
        // The modulo is below the shard count, so the cast back is lossless.
        let index = self.hasher.hash_one(user) % self.shards.len() as u64;
        &self.shards[usize::try_from(index).unwrap_or(0)]
    }

    fn check_address(
        &self,
        address: &ContactAddress,
        role: Role<'_>,
        source: Option<&Peer>,
    ) -> Result<(), RegisterError> {
        let nets = &self.policy.allowed_contact_nets;
        if nets.is_empty() {
            return match (role, source) {
                (Role::AppServer { .. }, Some(source))
                    if host_ip(&address.uri).map(|ip| ip.to_canonical())
                        != Some(source.addr.ip().to_canonical()) =>
                {
                    Err(RegisterError::Forbidden(format!(
                        "Contact address {} is not the address the REGISTER came from",
                        address.uri.host_port_text().unwrap_or_default()
                    )))
                }
                _ => Ok(()),
            };
        }
        match host_ip(&address.uri) {
            Some(ip) if nets.iter().any(|net| net.contains(ip)) => Ok(()),
            _ => Err(RegisterError::Forbidden(format!(
                "Contact address {} not allowed",
                address.uri.host_port_text().unwrap_or_default()
            ))),
        }
    }

    fn services_of(
        address: &ContactAddress,
        role: Role<'_>,
    ) -> Result<(Vec<String>, Option<u32>), RegisterError> {
        let Role::AppServer { allowed_services } = role else {
            return Ok((Vec::new(), None));
        };
        let list = address
            .param("services")
            .and_then(|p| p.value.as_deref())
            .ok_or_else(|| RegisterError::BadRequest("Missing services parameter".into()))?;
        let mut services: Vec<String> = Vec::new();
        for name in list.split(',').map(str::trim) {
            if !is_token(name) {
                return Err(RegisterError::BadRequest(format!(
                    "Bad service name {name:?}"
                )));
            }
            if allowed_services.is_some_and(|allowed| !allowed.iter().any(|a| a == name)) {
                return Err(RegisterError::Forbidden(format!(
                    "Service {name} not allowed"
                )));
            }
            if !services.iter().any(|s| s == name) {
                services.push(name.to_owned());
            }
        }
        let capacity = match address.param("capacity") {
            None => None,
            Some(p) => match p.value.as_deref().and_then(delta_seconds) {
                Some(n) if n > 0 => Some(n),
                _ => return Err(RegisterError::BadRequest("Bad capacity parameter".into())),
            },
        };
        Ok((services, capacity))
    }

    /// Applies a REGISTER of the authenticated `user` (RFC 3261 §10.3 steps 6–8). With no
    /// Contact it only fetches the bindings. On error nothing changed.
    pub fn register(
        &self,
        user: &str,
        role: Role<'_>,
        request: &RegisterRequest,
        now: Instant,
    ) -> Result<RegisterOk, RegisterError> {
        let mut entries = Vec::new();
        for value in &request.contacts {
            entries.extend(parse_contacts(value).map_err(RegisterError::BadRequest)?);
        }
        // A malformed Expires header counts as the default (§20.19 says 3600).
        let header_expires = request
            .expires
            .as_deref()
            .map(|v| delta_seconds(v).unwrap_or(self.policy.default_expires));

        // Step 6: `*` only alone and with Expires: 0.
        let wildcard = entries.iter().any(|e| matches!(e, ContactEntry::Wildcard));
        if wildcard && (entries.len() != 1 || header_expires != Some(0)) {
            return Err(RegisterError::BadRequest(
                "Contact * needs Expires: 0 and no other Contact".into(),
            ));
        }

        let mut updates = Vec::new();
        for entry in entries {
            let ContactEntry::Address(address) = entry else {
                continue;
            };
            let expires = match address.param("expires") {
                Some(p) => p
                    .value
                    .as_deref()
                    .and_then(delta_seconds)
                    .unwrap_or(self.policy.default_expires),
                None => header_expires.unwrap_or(self.policy.default_expires),
            };
            if expires > 0 && expires < self.policy.min_expires {
                return Err(RegisterError::IntervalTooBrief {
                    min_expires: self.policy.min_expires,
                });
            }
            let expires = expires.min(self.policy.max_expires);
            let (services, capacity) = if expires > 0 {
                self.check_address(&address, role, request.source.as_ref())?;
                Self::services_of(&address, role)?
            } else {
                (Vec::new(), None)
            };
            updates.push(Update {
                key: uri_key(&address.uri),
                address: *address,
                expires,
                services,
                capacity,
            });
        }

        let mut shard = lock(self.shard(user));
        let mut removed = shard.sweep_user(user, now);
        let current = shard.users.get(user).cloned().unwrap_or_default();
        let stale = |b: &Binding| b.call_id == request.call_id && request.cseq <= b.cseq;
        let out_of_order = || RegisterError::OutOfOrder {
            call_id: request.call_id.clone(),
            cseq: request.cseq,
        };

        let next = if wildcard {
            // §10.3 step 6: remove every binding, unless one is from this Call-ID with a
            // CSeq not lower than the request's.
            if current.iter().any(stale) {
                return Err(out_of_order());
            }
            removed.extend(current);
            Vec::new()
        } else {
            let mut next = current;
            let mut touched: HashSet<String> = HashSet::new();
            for update in updates {
                let position = next.iter().position(|b| b.key == update.key);
                if let Some(i) = position {
                    if !touched.contains(&update.key) && stale(&next[i]) {
                        return Err(out_of_order());
                    }
                }
                touched.insert(update.key.clone());
                let expires_at = now + Duration::from_secs(u64::from(update.expires));
                let params: Vec<ContactParam> = update
                    .address
                    .params
                    .into_iter()
                    .filter(|p| !p.name.eq_ignore_ascii_case("expires"))
                    .collect();
                match (position, update.expires) {
                    (Some(i), 0) => removed.push(next.remove(i)),
                    (None, 0) => {}
                    (Some(i), _) => {
                        let binding = &mut next[i];
                        binding.uri_text = update.address.uri_text;
                        binding.uri = update.address.uri;
                        binding.display_name = update.address.display_name;
                        binding.params = params;
                        binding.services = update.services;
                        binding.capacity = update.capacity;
                        binding.call_id = request.call_id.clone();
                        binding.cseq = request.cseq;
                        binding.expires_at = expires_at;
                        binding.source = request.source;
                    }
                    (None, _) => next.push(Binding {
                        user: user.to_owned(),
                        uri_text: update.address.uri_text,
                        uri: update.address.uri,
                        display_name: update.address.display_name,
                        params,
                        services: update.services,
                        capacity: update.capacity,
                        call_id: request.call_id.clone(),
                        cseq: request.cseq,
                        expires_at,
                        source: request.source,
                        key: update.key,
                    }),
                }
            }
            if next.len() > self.policy.max_bindings_per_user {
                return Err(RegisterError::Forbidden(format!(
                    "Too many contacts (at most {})",
                    self.policy.max_bindings_per_user
                )));
            }
            next
        };

        // Commit.
        if next.is_empty() {
            shard.users.remove(user);
        } else {
            shard.users.insert(user.to_owned(), next.clone());
        }
        shard.reschedule(user);
        drop(shard);
        let mut bindings = next;
        sort_bindings(&mut bindings);
        for binding in &removed {
            tracing::debug!(user, contact = %binding.uri_text, "binding removed");
        }
        Ok(RegisterOk { bindings, removed })
    }

    /// Makes the bindings of `user` exactly `bindings` (those that have not ended at `now`),
    /// as another relay sharing the database registered them: no policy is applied (that
    /// relay applied it) and nothing is published again. Returns the bindings removed.
    pub fn replace_user(&self, user: &str, bindings: Vec<Binding>, now: Instant) -> Vec<Binding> {
        let next: Vec<Binding> = bindings
            .into_iter()
            .filter(|b| b.user == user && b.expires_at > now)
            .collect();
        let mut shard = lock(self.shard(user));
        let previous = shard.users.remove(user).unwrap_or_default();
        let removed = previous
            .into_iter()
            .filter(|old| !next.iter().any(|b| b.key == old.key))
            .collect();
        if !next.is_empty() {
            shard.users.insert(user.to_owned(), next);
        }
        shard.reschedule(user);
        removed
    }

    /// Whether `user` has at least one binding that has not expired at `now`.
    pub fn is_registered(&self, user: &str, now: Instant) -> bool {
        lock(self.shard(user))
            .users
            .get(user)
            .is_some_and(|list| list.iter().any(|b| b.expires_at > now))
    }

    /// The current bindings of `user` at `now`, highest `q` first, then most recently
    /// refreshed first.
    pub fn bindings(&self, user: &str, now: Instant) -> Vec<Binding> {
        let mut list: Vec<Binding> = lock(self.shard(user))
            .users
            .get(user)
            .map(|list| {
                list.iter()
                    .filter(|b| b.expires_at > now)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        sort_bindings(&mut list);
        list
    }

    /// Every current binding at `now`, by user, then as [`Registrar::bindings`] orders them.
    pub fn all_bindings(&self, now: Instant) -> Vec<Binding> {
        let mut users: Vec<String> = self
            .shards
            .iter()
            .flat_map(|shard| lock(shard).users.keys().cloned().collect::<Vec<_>>())
            .collect();
        users.sort();
        users
            .iter()
            .flat_map(|user| self.bindings(user, now))
            .collect()
    }

    /// Removes `user`'s binding to `contact` (the Contact URI as registered), or all of
    /// its bindings without one (an operator's removal), and returns them.
    pub fn remove(&self, user: &str, contact: Option<&str>) -> Vec<Binding> {
        let mut shard = lock(self.shard(user));
        let Some(list) = shard.users.get_mut(user) else {
            return Vec::new();
        };
        let (gone, kept): (Vec<Binding>, Vec<Binding>) = list
            .drain(..)
            .partition(|b| contact.is_none_or(|c| b.uri_text == c.trim()));
        if kept.is_empty() {
            shard.users.remove(user);
        } else {
            *list = kept;
        }
        shard.reschedule(user);
        gone
    }

    /// Removes every binding that ended at or before `now` and returns them.
    pub fn expire(&self, now: Instant) -> Vec<Binding> {
        let mut removed = Vec::new();
        for shard in &self.shards {
            let mut shard = lock(shard);
            while shard.timers.first().is_some_and(|(at, _)| *at <= now) {
                let Some((_, user)) = shard.timers.pop_first() else {
                    break;
                };
                shard.scheduled.remove(&user);
                let gone = shard.sweep_user(&user, now);
                shard.reschedule(&user);
                for binding in &gone {
                    tracing::debug!(user = %binding.user, contact = %binding.uri_text, "binding expired");
                }
                removed.extend(gone);
            }
        }
        removed
    }

    /// The earliest time a binding may expire: when to call [`Registrar::expire`] next.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.shards
            .iter()
            .filter_map(|shard| lock(shard).timers.first().map(|(at, _)| *at))
            .min()
    }

    /// Entries in the expiry queues: at most one per user with bindings, however often its
    /// bindings are refreshed.
    pub fn timer_entries(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).timers.len())
            .sum()
    }

    /// The number of users with at least one binding (expired ones not yet swept count).
    pub fn user_count(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).users.len())
            .sum()
    }
}

fn sort_bindings(list: &mut [Binding]) {
    list.sort_by(|a, b| {
        b.q_millis()
            .cmp(&a.q_millis())
            .then(b.expires_at.cmp(&a.expires_at))
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::net::SocketAddr;

    fn registrar() -> Registrar {
        Registrar::new(RegistrarPolicy::default(), 4)
    }

    fn req(contacts: &[&str], expires: Option<&str>, call_id: &str, cseq: u32) -> RegisterRequest {
        RegisterRequest {
            contacts: contacts.iter().map(|c| c.to_string()).collect(),
            expires: expires.map(str::to_owned),
            call_id: call_id.into(),
            cseq,
            source: None,
        }
    }

    fn uris(list: &[Binding]) -> Vec<&str> {
        list.iter().map(|b| b.uri_text.as_str()).collect()
    }

    const SUB: Role<'static> = Role::Subscriber;

    #[test]
    fn registers_several_contacts_and_reports_them_with_time_left() {
        let r = registrar();
        let t0 = Instant::now();
        let ok = r
            .register(
                "alice",
                SUB,
                &req(
                    &["<sip:alice@127.0.0.1:5070>;expires=120, \"Alice\" <sip:alice@127.0.0.1:5071>;q=0.5"],
                    Some("600"),
                    "c1",
                    1,
                ),
                t0,
            )
            .unwrap();
        assert_eq!(
            uris(&ok.bindings),
            ["sip:alice@127.0.0.1:5070", "sip:alice@127.0.0.1:5071"]
        );
        let later = t0 + Duration::from_millis(10_500);
        let values: Vec<String> = ok.bindings.iter().map(|b| b.contact_value(later)).collect();
        assert_eq!(
            values,
            [
                "<sip:alice@127.0.0.1:5070>;expires=110",
                "\"Alice\" <sip:alice@127.0.0.1:5071>;q=0.5;expires=590"
            ]
        );
        assert!(r.is_registered("alice", t0));
        assert!(!r.is_registered("bob", t0));
        assert_eq!(r.bindings("alice", t0).len(), 2);
        assert_eq!(ok.contact_headers(t0).len(), 2);
    }

    #[test]
    fn an_operator_lists_and_removes_one_binding_or_all_of_a_user() {
        let r = registrar();
        let t0 = Instant::now();
        let two = "<sip:alice@127.0.0.1:5070>, <sip:alice@127.0.0.1:5071>";
        r.register("alice", SUB, &req(&[two], Some("600"), "c1", 1), t0)
            .unwrap();
        r.register(
            "bob",
            SUB,
            &req(&["<sip:bob@127.0.0.1:5072>"], Some("600"), "c2", 1),
            t0,
        )
        .unwrap();
        assert_eq!(r.all_bindings(t0).len(), 3);
        let gone = r.remove("alice", Some("sip:alice@127.0.0.1:5071"));
        assert_eq!(uris(&gone), ["sip:alice@127.0.0.1:5071"]);
        assert_eq!(uris(&r.bindings("alice", t0)), ["sip:alice@127.0.0.1:5070"]);
        assert!(r.remove("alice", Some("sip:nowhere@127.0.0.1")).is_empty());
        assert_eq!(r.remove("bob", None).len(), 1);
        assert!(!r.is_registered("bob", t0));
        assert_eq!(
            r.timer_entries(),
            1,
            "bob's expiry entry went with his bindings"
        );
        assert_eq!(uris(&r.all_bindings(t0)), ["sip:alice@127.0.0.1:5070"]);
    }

    #[test]
    fn bindings_expire_on_time() {
        let r = registrar();
        let t0 = Instant::now();
        r.register(
            "alice",
            SUB,
            &req(&["<sip:alice@127.0.0.1:5070>"], Some("60"), "c1", 1),
            t0,
        )
        .unwrap();
        r.register(
            "bob",
            SUB,
            &req(&["<sip:bob@127.0.0.1:5072>"], Some("120"), "c2", 1),
            t0,
        )
        .unwrap();
        assert_eq!(r.next_expiry(), Some(t0 + Duration::from_secs(60)));
        let just_before = t0 + Duration::from_secs(60) - Duration::from_nanos(1);
        assert!(r.is_registered("alice", just_before));
        assert!(r.expire(just_before).is_empty());
        let at = t0 + Duration::from_secs(60);
        assert!(
            !r.is_registered("alice", at),
            "a binding is gone at its expiry"
        );
        let removed = r.expire(at);
        assert_eq!(uris(&removed), ["sip:alice@127.0.0.1:5070"]);
        assert_eq!(r.next_expiry(), Some(t0 + Duration::from_secs(120)));
        assert_eq!(r.user_count(), 1);
        assert_eq!(
            uris(&r.expire(t0 + Duration::from_secs(500))),
            ["sip:bob@127.0.0.1:5072"]
        );
        assert_eq!(r.next_expiry(), None);
        assert_eq!(r.user_count(), 0);
    }

    #[test]
    fn refresh_moves_the_expiry_and_the_stale_timer_is_harmless() {
        let r = registrar();
        let t0 = Instant::now();
        r.register(
            "alice",
            SUB,
            &req(&["<sip:alice@127.0.0.1:5070>"], Some("60"), "c1", 1),
            t0,
        )
        .unwrap();
        let t1 = t0 + Duration::from_secs(50);
        r.register(
            "alice",
            SUB,
            &req(&["<sip:alice@127.0.0.1:5070>"], Some("60"), "c1", 2),
            t1,
        )
        .unwrap();
        assert!(r.expire(t0 + Duration::from_secs(60)).is_empty());
        assert!(r.is_registered("alice", t0 + Duration::from_secs(100)));
        assert_eq!(r.bindings("alice", t1)[0].cseq, 2);
        assert_eq!(r.expire(t1 + Duration::from_secs(60)).len(), 1);
    }

    /// Issue 14, finding 11: each REGISTER used to push an expiry entry kept until its time
    /// came, so a flood of refreshes (3600 s each) grew the queue by one entry per request.
    #[test]
    fn a_refresh_flood_keeps_one_timer_entry_per_user() {
        let r = registrar();
        let t0 = Instant::now();
        for i in 0..2_000u32 {
            let at = t0 + Duration::from_millis(u64::from(i) * 10);
            r.register(
                "alice",
                SUB,
                &req(
                    &["<sip:alice@127.0.0.1:5070>, <sip:alice@127.0.0.1:5071>;expires=600"],
                    Some("3600"),
                    "c1",
                    i + 1,
                ),
                at,
            )
            .unwrap();
            r.register(
                "bob",
                SUB,
                &req(&["<sip:bob@127.0.0.1:5072>"], Some("3600"), "c2", i + 1),
                at,
            )
            .unwrap();
        }
        assert_eq!(r.timer_entries(), 2, "one entry per user");
        let last = t0 + Duration::from_millis(1_999 * 10);
        // The earliest binding decides the entry: alice's 600 s Contact.
        assert_eq!(r.next_expiry(), Some(last + Duration::from_secs(600)));
        let gone = r.expire(last + Duration::from_secs(600));
        assert_eq!(uris(&gone), ["sip:alice@127.0.0.1:5071"]);
        assert_eq!(
            r.timer_entries(),
            2,
            "alice's other binding keeps one entry"
        );
        assert_eq!(r.next_expiry(), Some(last + Duration::from_secs(3600)));
        // Removing every binding removes the entry.
        r.register(
            "bob",
            SUB,
            &req(&["<sip:bob@127.0.0.1:5072>;expires=0"], None, "c2", 9_999),
            last,
        )
        .unwrap();
        assert_eq!(r.timer_entries(), 1);
        assert_eq!(r.expire(last + Duration::from_secs(3600)).len(), 1);
        assert_eq!(r.timer_entries(), 0);
        assert_eq!(r.next_expiry(), None);
    }

    #[test]
    fn too_brief_is_423_with_min_expires_and_changes_nothing() {
        let r = registrar();
        let t0 = Instant::now();
        let err = r
            .register(
                "alice",
                SUB,
                &req(
                    &["<sip:alice@127.0.0.1:5070>, <sip:alice@127.0.0.1:5071>;expires=30"],
                    None,
                    "c1",
                    1,
                ),
                t0,
            )
            .unwrap_err();
        assert_eq!(err, RegisterError::IntervalTooBrief { min_expires: 60 });
        assert_eq!(err.status_code(), 423);
        assert_eq!(err.extra_header().unwrap().to_string(), "Min-Expires: 60");
        assert!(!r.is_registered("alice", t0), "all or nothing");
    }

    #[test]
    fn expires_param_overrides_header_and_max_shortens() {
        let r = registrar();
        let t0 = Instant::now();
        let ok = r
            .register(
                "alice",
                SUB,
                &req(
                    &[
                        "<sip:alice@127.0.0.1:5070>;expires=100",
                        "<sip:alice@127.0.0.1:5071>",
                    ],
                    Some("99999"),
                    "c1",
                    1,
                ),
                t0,
            )
            .unwrap();
        let left: Vec<u32> = ok.bindings.iter().map(|b| b.expires_in(t0)).collect();
        assert_eq!(left, [3600, 100], "sorted most lasting first at equal q");
        // Neither: the default; a malformed Expires header counts as the default too.
        let ok = r
            .register(
                "bob",
                SUB,
                &req(&["<sip:bob@127.0.0.1:5070>"], Some("soon"), "c2", 1),
                t0,
            )
            .unwrap();
        assert_eq!(ok.bindings[0].expires_in(t0), 3600);
    }

    #[test]
    fn expires_zero_removes_one_binding() {
        let r = registrar();
        let t0 = Instant::now();
        r.register(
            "alice",
            SUB,
            &req(
                &["<sip:alice@127.0.0.1:5070>", "<sip:alice@127.0.0.1:5071>"],
                None,
                "c1",
                1,
            ),
            t0,
        )
        .unwrap();
        let ok = r
            .register(
                "alice",
                SUB,
                &req(&["<sip:ALICE@127.0.0.1:5071>;expires=0"], None, "c1", 2),
                t0,
            )
            .unwrap();
        assert!(ok.removed.is_empty(), "user part compares with case");
        let ok = r
            .register(
                "alice",
                SUB,
                &req(&["<SIP:alice@127.0.0.1:5071>;expires=0"], None, "c1", 3),
                t0,
            )
            .unwrap();
        assert_eq!(uris(&ok.removed), ["sip:alice@127.0.0.1:5071"]);
        assert_eq!(uris(&ok.bindings), ["sip:alice@127.0.0.1:5070"]);
    }

    #[test]
    fn wildcard_removes_all_but_only_alone_with_expires_zero() {
        let r = registrar();
        let t0 = Instant::now();
        r.register(
            "alice",
            SUB,
            &req(
                &["<sip:alice@127.0.0.1:5070>", "<sip:alice@127.0.0.1:5071>"],
                None,
                "c1",
                1,
            ),
            t0,
        )
        .unwrap();
        for bad in [
            req(&["*"], None, "c2", 1),
            req(&["*"], Some("60"), "c2", 1),
            req(&["*", "<sip:alice@127.0.0.1:5070>"], Some("0"), "c2", 1),
        ] {
            let err = r.register("alice", SUB, &bad, t0).unwrap_err();
            assert_eq!(err.status_code(), 400, "{bad:?}");
        }
        assert_eq!(r.bindings("alice", t0).len(), 2);
        let ok = r
            .register("alice", SUB, &req(&["*"], Some("0"), "c2", 1), t0)
            .unwrap();
        assert_eq!(ok.removed.len(), 2);
        assert!(ok.bindings.is_empty());
        assert!(!r.is_registered("alice", t0));
    }

    #[test]
    fn wildcard_with_same_call_id_and_old_cseq_is_refused() {
        let r = registrar();
        let t0 = Instant::now();
        r.register(
            "alice",
            SUB,
            &req(&["<sip:alice@127.0.0.1:5070>"], None, "c1", 5),
            t0,
        )
        .unwrap();
        let err = r
            .register("alice", SUB, &req(&["*"], Some("0"), "c1", 5), t0)
            .unwrap_err();
        assert_eq!(err.status_code(), 500);
        assert!(r.is_registered("alice", t0));
        r.register("alice", SUB, &req(&["*"], Some("0"), "c1", 6), t0)
            .unwrap();
        assert!(!r.is_registered("alice", t0));
    }

    #[test]
    fn cseq_ordering_per_binding() {
        let r = registrar();
        let t0 = Instant::now();
        let c = ["<sip:alice@127.0.0.1:5070>"];
        r.register("alice", SUB, &req(&c, None, "c1", 10), t0)
            .unwrap();
        // Same Call-ID, lower or equal CSeq: aborted.
        for cseq in [9, 10] {
            let err = r
                .register("alice", SUB, &req(&c, Some("0"), "c1", cseq), t0)
                .unwrap_err();
            assert!(matches!(err, RegisterError::OutOfOrder { .. }), "{err}");
        }
        assert!(r.is_registered("alice", t0));
        // Another Call-ID replaces whatever its CSeq.
        let ok = r
            .register("alice", SUB, &req(&c, Some("120"), "c2", 1), t0)
            .unwrap();
        assert_eq!(
            (ok.bindings[0].call_id.as_str(), ok.bindings[0].cseq),
            ("c2", 1)
        );
        // A fetch (no Contact) changes nothing and is not ordered.
        let ok = r
            .register("alice", SUB, &req(&[], None, "c3", 1), t0)
            .unwrap();
        assert_eq!(ok.bindings.len(), 1);
        assert!(ok.removed.is_empty());
    }

    #[test]
    fn fetches_and_refreshes_keep_one_timer_entry_per_user() {
        let r = Registrar::new(RegistrarPolicy::default(), 1);
        let timers = |r: &Registrar| lock(&r.shards[0]).timers.len();
        let t0 = Instant::now();
        r.register(
            "alice",
            SUB,
            &req(&["<sip:a@127.0.0.1:1>, <sip:a@127.0.0.1:2>"], None, "c1", 1),
            t0,
        )
        .unwrap();
        assert_eq!(timers(&r), 1, "both end at the same instant");
        for cseq in 2..10 {
            r.register("alice", SUB, &req(&[], None, "c1", cseq), t0)
                .unwrap();
        }
        assert_eq!(timers(&r), 1, "fetches add no timer");
        let t1 = t0 + Duration::from_secs(1);
        r.register(
            "alice",
            SUB,
            &req(&["<sip:a@127.0.0.1:2>"], None, "c1", 10),
            t1,
        )
        .unwrap();
        assert_eq!(
            timers(&r),
            1,
            "the user's entry moves, at its earliest binding"
        );
        assert_eq!(r.next_expiry(), Some(t0 + Duration::from_secs(3600)));
        assert_eq!(r.expire(t0 + Duration::from_secs(3600)).len(), 1);
        assert_eq!(timers(&r), 1, "the binding left keeps the entry");
        assert_eq!(r.next_expiry(), Some(t1 + Duration::from_secs(3600)));
    }

    #[test]
    fn same_contact_twice_in_one_request_takes_the_last() {
        let r = registrar();
        let t0 = Instant::now();
        let ok = r
            .register(
                "alice",
                SUB,
                &req(&["<sip:alice@127.0.0.1:5070>;expires=100, <sip:alice@127.0.0.1:5070>;expires=200"], None, "c1", 1),
                t0,
            )
            .unwrap();
        assert_eq!(ok.bindings.len(), 1);
        assert_eq!(ok.bindings[0].expires_in(t0), 200);
    }

    #[test]
    fn contact_networks_policy() {
        let policy = RegistrarPolicy {
            allowed_contact_nets: vec!["127.0.0.0/8".parse().unwrap()],
            ..RegistrarPolicy::default()
        };
        let r = Registrar::new(policy, 1);
        let t0 = Instant::now();
        for foreign in ["<sip:alice@203.0.113.9:5060>", "<sip:alice@example.com>"] {
            let err = r
                .register("alice", SUB, &req(&[foreign], None, "c1", 1), t0)
                .unwrap_err();
            assert_eq!(err.status_code(), 403, "{foreign}");
        }
        assert!(!r.is_registered("alice", t0));
        r.register(
            "alice",
            SUB,
            &req(&["<sip:alice@127.0.0.2:5060>"], None, "c1", 2),
            t0,
        )
        .unwrap();
        // Removing a binding is never refused by the address policy.
        assert!(r
            .register(
                "alice",
                SUB,
                &req(&["<sip:alice@203.0.113.9>;expires=0"], None, "c1", 3),
                t0
            )
            .is_ok());
    }

    #[test]
    fn max_bindings_per_user() {
        let policy = RegistrarPolicy {
            max_bindings_per_user: 2,
            ..RegistrarPolicy::default()
        };
        let r = Registrar::new(policy, 2);
        let t0 = Instant::now();
        r.register(
            "alice",
            SUB,
            &req(&["<sip:a@127.0.0.1:1>, <sip:a@127.0.0.1:2>"], None, "c1", 1),
            t0,
        )
        .unwrap();
        let err = r
            .register(
                "alice",
                SUB,
                &req(&["<sip:a@127.0.0.1:3>"], None, "c1", 2),
                t0,
            )
            .unwrap_err();
        assert_eq!(err.status_code(), 403);
        // Expired bindings do not count.
        let later = t0 + Duration::from_secs(3600);
        let ok = r
            .register(
                "alice",
                SUB,
                &req(&["<sip:a@127.0.0.1:3>"], None, "c1", 3),
                later,
            )
            .unwrap();
        assert_eq!(uris(&ok.bindings), ["sip:a@127.0.0.1:3"]);
        assert_eq!(ok.removed.len(), 2, "the expired bindings are reported");
    }

    #[test]
    fn an_app_server_binds_only_the_address_it_registers_from_unless_nets_are_configured() {
        let r = registrar();
        let t0 = Instant::now();
        let role = Role::AppServer {
            allowed_services: None,
        };
        let from = |ip: &str, contact: &str| RegisterRequest {
            source: Some(Peer::udp(SocketAddr::new(ip.parse().unwrap(), 5080))),
            ..req(&[contact], Some("600"), &format!("c-{ip}-{contact}"), 1)
        };
        // Its own address, IPv4 or IPv6 (and an IPv4 source seen mapped on a dual-stack
        // socket), is fine.
        r.register(
            "as1",
            role,
            &from("127.0.0.1", "<sip:as1@127.0.0.1:5080>;services=echo"),
            t0,
        )
        .unwrap();
        r.register(
            "as1",
            role,
            &from("::ffff:127.0.0.1", "<sip:as1@127.0.0.1:5081>;services=echo"),
            t0,
        )
        .unwrap();
        r.register(
            "as6",
            role,
            &from("::1", "<sip:as6@[::1]:5080>;services=echo"),
            t0,
        )
        .unwrap();
        // Another host, or a name, would have the relay send inquiries wherever the
        // account says: refused.
        for contact in [
            "<sip:as2@127.0.0.9:5080>;services=echo",
            "<sip:as2@203.0.113.7:5080>;services=echo",
            "<sip:as2@victim.example.com:5080>;services=echo",
        ] {
            let e = r
                .register("as2", role, &from("127.0.0.3", contact), t0)
                .unwrap_err();
            assert_eq!(e.status_code(), 403, "{contact}");
        }
        // A subscriber's terminal may be anywhere (behind a NAT its Contact is private).
        r.register(
            "alice",
            Role::Subscriber,
            &from("127.0.0.3", "<sip:alice@192.168.1.20:5060>"),
            t0,
        )
        .unwrap();
        // With networks configured, they decide instead.
        let open = Registrar::new(
            RegistrarPolicy {
                allowed_contact_nets: vec!["127.0.0.0/8".parse().unwrap()],
                ..RegistrarPolicy::default()
            },
            4,
        );
        open.register(
            "as2",
            role,
            &from("127.0.0.3", "<sip:as2@127.0.0.9:5080>;services=echo"),
            t0,
        )
        .unwrap();
    }

    #[test]
    fn app_server_services_and_capacity() {
        let r = registrar();
        let t0 = Instant::now();
        let allowed = vec!["echo".to_owned(), "clock".to_owned()];
        let role = Role::AppServer {
            allowed_services: Some(&allowed),
        };
        let ok = r
            .register(
                "as1",
                role,
                &req(
                    &["<sip:as1@127.0.0.1:5080>;services=\"echo, clock,echo\";capacity=50"],
                    Some("600"),
                    "c1",
                    1,
                ),
                t0,
            )
            .unwrap();
        let b = &ok.bindings[0];
        assert_eq!(b.services, ["echo", "clock"]);
        assert_eq!(b.capacity, Some(50));
        assert_eq!(
            b.contact_value(t0),
            "<sip:as1@127.0.0.1:5080>;services=\"echo, clock,echo\";capacity=50;expires=600"
        );
        let d = b.dynamic_server().unwrap();
        assert_eq!(d.uri, "sip:as1@127.0.0.1:5080");
        assert_eq!(d.expires_at, t0 + Duration::from_secs(600));

        let unquoted = r
            .register(
                "as1",
                role,
                &req(&["<sip:as1@127.0.0.1:5081>;services=echo"], None, "c1", 2),
                t0,
            )
            .unwrap();
        assert_eq!(unquoted.bindings.len(), 2);

        for (contact, status) in [
            ("<sip:as1@127.0.0.1:5082>", 400),
            ("<sip:as1@127.0.0.1:5082>;services=\"video\"", 403),
            ("<sip:as1@127.0.0.1:5082>;services=\"echo,bad name\"", 400),
            ("<sip:as1@127.0.0.1:5082>;services=echo;capacity=0", 400),
            ("<sip:as1@127.0.0.1:5082>;services=echo;capacity=lots", 400),
        ] {
            let err = r
                .register("as1", role, &req(&[contact], None, "c1", 9), t0)
                .unwrap_err();
            assert_eq!(err.status_code(), status, "{contact}");
        }
        // Any service when the account is not limited.
        let any = Role::AppServer {
            allowed_services: None,
        };
        assert!(r
            .register(
                "as2",
                any,
                &req(&["<sip:as2@127.0.0.1:6000>;services=video"], None, "c9", 1),
                t0
            )
            .is_ok());
        // A subscriber's services parameter means nothing.
        let ok = r
            .register(
                "alice",
                SUB,
                &req(&["<sip:alice@127.0.0.1:5070>;services=echo"], None, "c3", 1),
                t0,
            )
            .unwrap();
        assert!(ok.bindings[0].services.is_empty());
        assert!(ok.bindings[0].dynamic_server().is_none());
    }

    #[test]
    fn hostile_contacts_are_400_not_panics() {
        let r = registrar();
        let t0 = Instant::now();
        for bad in [
            "",
            "<",
            "<sip:alice@127.0.0.1",
            "\"unterminated <sip:a@b>",
            "<mailto:alice@example.com>",
            "<sip:alice@127.0.0.1>;=x",
            "<sip:alice@127.0.0.1>;a=\"x",
            "<sip:alice@127.0.0.1>;a=b c",
            "<sip:alice@127.0.0.1> junk",
            ",,,",
            "<sip:é@127.0.0.1>;é=1",
            "<>",
        ] {
            let err = r
                .register("alice", SUB, &req(&[bad], None, "c1", 1), t0)
                .unwrap_err();
            assert_eq!(err.status_code(), 400, "{bad:?}");
        }
    }

    #[test]
    fn parses_contact_forms() {
        let entries = parse_contacts(
            "\"A, \\\"B\\\"\" <sip:a@127.0.0.1;transport=tcp>;+sip.instance=\"<urn:uuid:1>\";reg-id=1, sip:b@127.0.0.1:5070;q=0.7",
        )
        .unwrap();
        assert_eq!(entries.len(), 2);
        let ContactEntry::Address(a) = &entries[0] else {
            panic!()
        };
        assert_eq!(a.display_name.as_deref(), Some("A, \"B\""));
        assert_eq!(a.uri_text, "sip:a@127.0.0.1;transport=tcp");
        assert_eq!(
            a.param("+sip.instance").unwrap().value.as_deref(),
            Some("<urn:uuid:1>")
        );
        let ContactEntry::Address(b) = &entries[1] else {
            panic!()
        };
        assert_eq!(b.uri_text, "sip:b@127.0.0.1:5070");
        assert_eq!(b.param("q").unwrap().value.as_deref(), Some("0.7"));
        assert_eq!(parse_contacts(" * ").unwrap(), [ContactEntry::Wildcard]);
    }

    #[test]
    fn uri_comparison_follows_the_rfc_in_substance() {
        let key = |s: &str| uri_key(&Uri::parse(s).unwrap());
        assert_eq!(key("sip:alice@Example.COM"), key("SIP:alice@example.com"));
        assert_ne!(key("sip:alice@example.com"), key("sip:Alice@example.com"));
        assert_ne!(
            key("sip:alice@example.com"),
            key("sip:alice@example.com:5060")
        );
        assert_ne!(
            key("sip:alice@example.com;transport=tcp"),
            key("sip:alice@example.com")
        );
        assert_eq!(
            key("sip:alice@example.com;transport=TCP"),
            key("sip:alice@example.com;transport=tcp")
        );
        assert_eq!(
            key("sip:alice@example.com;foo=1"),
            key("sip:alice@example.com")
        );
    }

    #[test]
    fn from_sip_collects_the_headers() {
        let text = "REGISTER sip:relay.test SIP/2.0\r\n\
            Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKx\r\n\
            From: <sip:alice@relay.test>;tag=1\r\n\
            To: <sip:alice@relay.test>\r\n\
            Call-ID: abc@127.0.0.1\r\n\
            CSeq: 7 REGISTER\r\n\
            Contact: <sip:alice@127.0.0.1:5070>\r\n\
            Contact: <sip:alice@127.0.0.1:5071>\r\n\
            Expires: 300\r\n\
            Content-Length: 0\r\n\r\n";
        let rsip::SipMessage::Request(request) = rsip::SipMessage::try_from(text).unwrap() else {
            panic!("not a request")
        };
        let r = RegisterRequest::from_sip(&request, None).unwrap();
        assert_eq!(r.contacts.len(), 2);
        assert_eq!(r.expires.as_deref(), Some("300"));
        assert_eq!(r.call_id, "abc@127.0.0.1");
        assert_eq!(r.cseq, 7);
        let missing = text.replace("Call-ID: abc@127.0.0.1\r\n", "");
        let rsip::SipMessage::Request(request) =
            rsip::SipMessage::try_from(missing.as_str()).unwrap()
        else {
            panic!("not a request")
        };
        assert_eq!(
            RegisterRequest::from_sip(&request, None)
                .unwrap_err()
                .status_code(),
            400
        );
    }

    #[test]
    fn ip_networks() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        let host: IpNet = "::1".parse().unwrap();
        assert!(host.contains("::1".parse().unwrap()));
        assert!(!host.contains("127.0.0.1".parse().unwrap()));
        assert_eq!(host.to_string(), "::1/128");
        for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/", "::/129"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn q_values_order_bindings() {
        let r = registrar();
        let t0 = Instant::now();
        let ok = r
            .register(
                "alice",
                SUB,
                &req(&["<sip:a@127.0.0.1:1>;q=0.1, <sip:a@127.0.0.1:2>;q=1.0, <sip:a@127.0.0.1:3>;q=0.55"], None, "c1", 1),
                t0,
            )
            .unwrap();
        assert_eq!(
            uris(&ok.bindings),
            [
                "sip:a@127.0.0.1:2",
                "sip:a@127.0.0.1:3",
                "sip:a@127.0.0.1:1"
            ]
        );
        assert_eq!(ok.bindings[1].q_millis(), 550);
    }
}
