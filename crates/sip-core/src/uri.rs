//! URIs as SIP carries them, read by our own parser: `sip:` and `sips:` (RFC 3261 §19.1,
//! grammar in §25.1), `tel:` (RFC 3966) and any other absolute URI, kept as its scheme and
//! text so that the caller can answer `416 Unsupported URI Scheme` (§8.2.2.1).
//!
//! rsip 0.4 misreads many legal URIs (IPv6 references, `tel:`, user parts holding `;`,
//! escaped characters); a [`Uri`] reads all of them. It keeps the text as written, so that
//! printing it gives back exactly what the peer sent, and offers both raw and decoded
//! (`%HH` unescaped) accessors. [`Uri::to_rsip`] and [`Uri::from_rsip`] carry it into and out
//! of rsip's message model.
//!
//! Parsing never panics: every input gives a [`Uri`] or a [`UriError`] saying what is wrong.

use std::borrow::Cow;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Why a text is not a URI (RFC 3261 §25.1, RFC 3966 §3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The text is empty.
    #[error("empty URI")]
    Empty,
    /// The text is longer than a URI we accept (64 KiB).
    #[error("URI too long")]
    TooLong,
    /// No `scheme:` in front (RFC 3986 §3.1).
    #[error("missing or invalid URI scheme")]
    InvalidScheme,
    /// A character not allowed in this part of the URI.
    #[error("invalid character {ch:?} in the {part} at byte {at}")]
    InvalidChar {
        /// The part of the URI (`user`, `host`, `parameter`…).
        part: &'static str,
        /// The character.
        ch: char,
        /// Its byte offset in the text.
        at: usize,
    },
    /// A `%` not followed by two hexadecimal digits (RFC 3261 §25.1 `escaped`).
    #[error("invalid %-escape at byte {at}")]
    InvalidEscape {
        /// The byte offset of the `%`.
        at: usize,
    },
    /// A `user@` with an empty user (RFC 3261 §25.1: `user = 1*(…)`).
    #[error("empty user part")]
    EmptyUser,
    /// No host after the scheme or the `@`.
    #[error("missing host")]
    MissingHost,
    /// A host that is neither a domain name nor an IPv4 address (RFC 3261 §25.1 `host`).
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    /// A `[…]` host that is not an IPv6 address (RFC 3261 §25.1 `IPv6reference`).
    #[error("invalid IPv6 reference {0:?}")]
    InvalidIpv6(String),
    /// A port that is empty, not a number or above 65535.
    #[error("invalid port {0:?}")]
    InvalidPort(String),
    /// An empty parameter name or value (`;;`, `;=x`, `;name=`).
    #[error("empty parameter name or value at byte {at}")]
    EmptyParam {
        /// The byte offset of the parameter.
        at: usize,
    },
    /// A `?header` part that is not `name=value` pairs joined by `&` (RFC 3261 §19.1.1).
    #[error("invalid URI header at byte {at}")]
    InvalidHeader {
        /// The byte offset of the header.
        at: usize,
    },
    /// A `tel:` number without digits or with characters a number cannot hold
    /// (RFC 3966 §3).
    #[error("invalid telephone number {0:?}")]
    InvalidTelNumber(String),
    /// A local `tel:` number without `phone-context` (RFC 3966 §5.1.5: it MUST have one).
    #[error("local telephone number without phone-context")]
    MissingPhoneContext,
}

/// The scheme of a [`Uri`] (RFC 3261 §19.1, RFC 3966).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `sip:` (RFC 3261 §19.1).
    Sip,
    /// `sips:` (RFC 3261 §19.1): secure transport to the target's domain.
    Sips,
    /// `tel:` (RFC 3966).
    Tel,
    /// Any other absolute URI (`mailto:`, `urn:`, `http:`…): answer 416 where a SIP or tel
    /// URI is needed (RFC 3261 §8.2.2.1).
    Other,
}

/// The host of a SIP URI (RFC 3261 §25.1 `host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host<'a> {
    /// A domain name, as written.
    Domain(&'a str),
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// An IPv6 address (written in brackets in the URI).
    V6(Ipv6Addr),
}

impl fmt::Display for Host<'_> {
    /// The host as it goes into a URI or a Via: IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Domain(d) => f.write_str(d),
            Host::V4(ip) => write!(f, "{ip}"),
            Host::V6(ip) => write!(f, "[{ip}]"),
        }
    }
}

/// A byte range of a URI's text (kept small: texts are at most 64 KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Span {
    pub(crate) start: u32,
    pub(crate) end: u32,
}

impl Span {
    pub(crate) fn new(start: usize, end: usize) -> Span {
        // Texts are checked to fit in 64 KiB before any span is made.
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    pub(crate) fn of(self, text: &str) -> &str {
        text.get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }

    pub(crate) fn is_empty(self) -> bool {
        self.start >= self.end
    }
}

/// The longest text we read as a URI or header value.
pub(crate) const MAX_LEN: usize = 65_535;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum HostAddr {
    Domain,
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    Sip {
        sips: bool,
        user: Option<Span>,
        password: Option<Span>,
        host: HostAddr,
        /// The host as written (brackets included for IPv6).
        host_span: Span,
        port: Option<u16>,
        /// From the host's start to the port's end.
        host_port: Span,
        /// From the first `;` of the parameters to the `?` or the end (may be empty).
        params: Span,
        /// After the `?` (None without headers).
        headers: Option<Span>,
    },
    Tel {
        /// The telephone-subscriber number as written.
        number: Span,
        global: bool,
        params: Span,
    },
    Other,
}

/// A URI (RFC 3261 §19.1 `sip:`/`sips:`, RFC 3966 `tel:`, or another absolute URI kept as
/// text), parsed once and printed as written.
///
/// Two `Uri`s are equal when their texts are: this is the identity the dialog layer needs
/// (what the peer wrote is what we send back), not §19.1.4's looser comparison.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uri {
    text: String,
    /// The scheme as written, up to the `:`.
    scheme_end: u32,
    kind: Kind,
}

/// RFC 3261 §25.1 `unreserved` = alphanum / mark.
pub(crate) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')'
        )
}

fn is_user_char(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'&' | b'=' | b'+' | b'$' | b',' | b';' | b'?' | b'/' | b'%'
        )
}

fn is_password_char(b: u8) -> bool {
    is_unreserved(b) || matches!(b, b'&' | b'=' | b'+' | b'$' | b',' | b'%')
}

/// RFC 3261 `paramchar` (and RFC 3966's, the same set).
fn is_param_char(b: u8) -> bool {
    is_unreserved(b) || matches!(b, b'[' | b']' | b'/' | b':' | b'&' | b'+' | b'$' | b'%')
}

/// RFC 3261 `hnv-unreserved` / unreserved / escaped.
fn is_header_char(b: u8) -> bool {
    is_unreserved(b) || matches!(b, b'[' | b']' | b'/' | b'?' | b':' | b'+' | b'$' | b'%')
}

/// Checks that every byte of `text[from..to]` passes `ok` and that every `%` starts a valid
/// escape.
fn check_chars(
    text: &str,
    from: usize,
    to: usize,
    part: &'static str,
    ok: fn(u8) -> bool,
) -> Result<(), UriError> {
    let bytes = text.as_bytes();
    let mut i = from;
    while i < to {
        let b = bytes[i];
        if !ok(b) {
            return Err(invalid_char(text, part, i));
        }
        if b == b'%' {
            let hex = |j: usize| j < to && bytes[j].is_ascii_hexdigit();
            if !(hex(i + 1) && hex(i + 2)) {
                return Err(UriError::InvalidEscape { at: i });
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

fn invalid_char(text: &str, part: &'static str, at: usize) -> UriError {
    let ch = text.get(at..).and_then(|s| s.chars().next()).unwrap_or('?');
    UriError::InvalidChar { part, ch, at }
}

/// `%HH`-decodes `text`; borrowed when it holds no escape. A decoded byte sequence that is
/// not UTF-8 is replaced lossily.
pub fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.contains('%') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hi = (bytes[i + 1] as char).to_digit(16);
            let lo = (bytes[i + 2] as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

/// Reads an IPv4 address as RFC 3261 writes it (`1*3DIGIT "." …`, leading zeros allowed).
fn parse_ipv4(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for o in &mut octets {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// RFC 3261 §25.1 `hostname`: labels of alphanumerics and inner `-`, the last starting with
/// a letter, an optional final dot. (`_` is accepted too: it is common in practice.)
fn is_hostname(text: &str) -> bool {
    let text = text.strip_suffix('.').unwrap_or(text);
    if text.is_empty() {
        return false;
    }
    let mut last = "";
    for label in text.split('.') {
        let b = label.as_bytes();
        if b.is_empty()
            || !b
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            || b[0] == b'-'
            || b[b.len() - 1] == b'-'
        {
            return false;
        }
        last = label;
    }
    last.as_bytes()
        .first()
        .is_some_and(|c| c.is_ascii_alphabetic())
}

/// Reads `host [":" port]` from `text[from..to]`: the host kind, the host span, the port.
pub(crate) fn parse_host_port(
    text: &str,
    from: usize,
    to: usize,
) -> Result<(HostKindPub, Span, Option<u16>), UriError> {
    let s = text.get(from..to).ok_or(UriError::MissingHost)?;
    if s.is_empty() {
        return Err(UriError::MissingHost);
    }
    let (host, host_len, rest) = if let Some(inner) = s.strip_prefix('[') {
        let close = inner
            .find(']')
            .ok_or_else(|| UriError::InvalidIpv6(s.to_string()))?;
        let addr = &inner[..close];
        let ip: Ipv6Addr = addr
            .parse()
            .map_err(|_| UriError::InvalidIpv6(format!("[{addr}]")))?;
        (HostKindPub::V6(ip), close + 2, &inner[close + 1..])
    } else {
        let end = s.find(':').unwrap_or(s.len());
        let host = &s[..end];
        if host.is_empty() {
            return Err(UriError::MissingHost);
        }
        let kind = if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            HostKindPub::V4(parse_ipv4(host).ok_or_else(|| UriError::InvalidHost(host.into()))?)
        } else if is_hostname(host) {
            HostKindPub::Domain
        } else {
            return Err(UriError::InvalidHost(host.into()));
        };
        (kind, end, &s[end..])
    };
    let port = if rest.is_empty() {
        None
    } else {
        let p = rest
            .strip_prefix(':')
            .ok_or_else(|| UriError::InvalidHost(s.to_string()))?;
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(UriError::InvalidPort(p.to_string()));
        }
        Some(
            p.parse::<u16>()
                .map_err(|_| UriError::InvalidPort(p.to_string()))?,
        )
    };
    Ok((host, Span::new(from, from + host_len), port))
}

/// The kind of a host read by [`parse_host_port`] (shared with the Via reader).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostKindPub {
    Domain,
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

/// Checks `;name[=value]` parameters in `text[from..to]` (which starts with `;` or is
/// empty), names and values with `ok`.
fn check_params(
    text: &str,
    from: usize,
    to: usize,
    name_ok: fn(u8) -> bool,
) -> Result<(), UriError> {
    let mut i = from;
    while i < to {
        // text[i] is the ';' opening a parameter.
        let start = i + 1;
        let end = text[start..to].find(';').map_or(to, |e| start + e);
        let (name_end, value) = match text[start..end].find('=') {
            Some(e) => (start + e, Some(start + e + 1)),
            None => (end, None),
        };
        if name_end == start || value == Some(end) {
            return Err(UriError::EmptyParam { at: i });
        }
        check_chars(text, start, name_end, "parameter name", name_ok)?;
        if let Some(v) = value {
            check_chars(text, v, end, "parameter value", is_param_char)?;
        }
        i = end;
    }
    Ok(())
}

fn params_iter(params: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    params.split(';').skip(1).map(|p| match p.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (p, None),
    })
}

impl Uri {
    /// Parses a URI: `sip:`/`sips:` per RFC 3261 §25.1, `tel:` per RFC 3966 §3, anything else
    /// with a valid scheme as an opaque absolute URI. Surrounding spaces and tabs are
    /// ignored.
    pub fn parse(text: &str) -> Result<Uri, UriError> {
        let text = text.trim_matches(|c| c == ' ' || c == '\t');
        if text.is_empty() {
            return Err(UriError::Empty);
        }
        if text.len() > MAX_LEN {
            return Err(UriError::TooLong);
        }
        let colon = text.find(':').ok_or(UriError::InvalidScheme)?;
        let scheme = &text[..colon];
        let sb = scheme.as_bytes();
        if sb.is_empty()
            || !sb[0].is_ascii_alphabetic()
            || !sb
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        {
            return Err(UriError::InvalidScheme);
        }
        let kind = if scheme.eq_ignore_ascii_case("sip") {
            parse_sip(text, colon + 1, false)?
        } else if scheme.eq_ignore_ascii_case("sips") {
            parse_sip(text, colon + 1, true)?
        } else if scheme.eq_ignore_ascii_case("tel") {
            parse_tel(text, colon + 1)?
        } else {
            if colon + 1 == text.len() {
                return Err(UriError::MissingHost);
            }
            check_chars(text, colon + 1, text.len(), "URI", |b| {
                b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'"' | b'\\')
            })?;
            Kind::Other
        };
        Ok(Uri {
            text: text.to_string(),
            scheme_end: colon as u32,
            kind,
        })
    }

    /// A text this crate printed from a parsed [`Uri`] (a dialog keeps its remote target
    /// so), parsed again: it parses back to an equal [`Uri`] (see `Display`). Should it
    /// ever not, it is kept as an opaque URI with that text rather than failing.
    pub(crate) fn reparse(text: &str) -> Uri {
        Uri::parse(text).unwrap_or_else(|_| Uri {
            text: text.to_string(),
            scheme_end: text.find(':').unwrap_or(0) as u32,
            kind: Kind::Other,
        })
    }

    /// The whole URI as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The scheme (RFC 3261 §19.1, RFC 3966).
    pub fn scheme(&self) -> Scheme {
        match &self.kind {
            Kind::Sip { sips: false, .. } => Scheme::Sip,
            Kind::Sip { sips: true, .. } => Scheme::Sips,
            Kind::Tel { .. } => Scheme::Tel,
            Kind::Other => Scheme::Other,
        }
    }

    /// The scheme as written (`sip`, `SIP`, `mailto`…).
    pub fn scheme_str(&self) -> &str {
        self.text
            .get(..self.scheme_end as usize)
            .unwrap_or_default()
    }

    /// What follows `scheme:`, as written.
    pub fn rest(&self) -> &str {
        self.text
            .get(self.scheme_end as usize + 1..)
            .unwrap_or_default()
    }

    /// Whether this is a `sips:` URI (RFC 3261 §19.1, §26.2.2).
    pub fn is_sips(&self) -> bool {
        matches!(self.kind, Kind::Sip { sips: true, .. })
    }

    /// Whether this is a `sip:` or `sips:` URI.
    pub fn is_sip(&self) -> bool {
        matches!(self.kind, Kind::Sip { .. })
    }

    /// The user part of a SIP URI as written (`%HH` escapes kept), without the password.
    pub fn user(&self) -> Option<&str> {
        match &self.kind {
            Kind::Sip { user, .. } => user.map(|s| s.of(&self.text)),
            _ => None,
        }
    }

    /// The user part with its `%HH` escapes decoded (RFC 3261 §19.1.4 compares URIs so).
    pub fn user_decoded(&self) -> Option<Cow<'_, str>> {
        self.user().map(percent_decode)
    }

    /// The password of a SIP URI as written (RFC 3261 §19.1.1: NOT RECOMMENDED, but legal).
    pub fn password(&self) -> Option<&str> {
        match &self.kind {
            Kind::Sip { password, .. } => password.map(|s| s.of(&self.text)),
            _ => None,
        }
    }

    /// The host of a SIP URI; `None` for `tel:` and other schemes.
    pub fn host(&self) -> Option<Host<'_>> {
        match &self.kind {
            Kind::Sip {
                host, host_span, ..
            } => Some(match host {
                HostAddr::Domain => Host::Domain(host_span.of(&self.text)),
                HostAddr::V4(ip) => Host::V4(*ip),
                HostAddr::V6(ip) => Host::V6(*ip),
            }),
            _ => None,
        }
    }

    /// The host as written (an IPv6 reference with its brackets).
    pub fn host_text(&self) -> Option<&str> {
        match &self.kind {
            Kind::Sip { host_span, .. } => Some(host_span.of(&self.text)),
            _ => None,
        }
    }

    /// The port of a SIP URI, when written.
    pub fn port(&self) -> Option<u16> {
        match &self.kind {
            Kind::Sip { port, .. } => *port,
            _ => None,
        }
    }

    /// `host[:port]` as written, an IPv6 host in brackets (`[2001:db8::10]:5070`): a form
    /// `SocketAddr` and RFC 3263 resolution both read.
    pub fn host_port_text(&self) -> Option<&str> {
        match &self.kind {
            Kind::Sip { host_port, .. } => Some(host_port.of(&self.text)),
            _ => None,
        }
    }

    fn params_text(&self) -> &str {
        match &self.kind {
            Kind::Sip { params, .. } | Kind::Tel { params, .. } => params.of(&self.text),
            Kind::Other => "",
        }
    }

    /// The URI parameters (RFC 3261 §19.1.1, RFC 3966 §3) in order, as written:
    /// `(name, value)`.
    pub fn params(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        params_iter(self.params_text())
    }

    /// The first parameter called `name` (ASCII case ignored): `Some(None)` when it has no
    /// value, `None` when absent. The value is as written (escapes kept).
    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The value of parameter `name` with its escapes decoded; `None` when absent or valueless.
    pub fn param_decoded(&self, name: &str) -> Option<Cow<'_, str>> {
        self.param(name).flatten().map(percent_decode)
    }

    /// Whether the URI has parameter `name` (ASCII case ignored).
    pub fn has_param(&self, name: &str) -> bool {
        self.param(name).is_some()
    }

    /// The `transport` parameter (RFC 3261 §19.1.1) as written (`udp`, `TCP`…).
    pub fn transport(&self) -> Option<&str> {
        self.param("transport").flatten()
    }

    /// Whether the URI names a loose router (`;lr`, RFC 3261 §19.1.1, §16.12).
    pub fn is_loose_router(&self) -> bool {
        self.is_sip() && self.has_param("lr")
    }

    /// The headers of a SIP URI (`?name=value&…`, RFC 3261 §19.1.1), as written.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        let text = match &self.kind {
            Kind::Sip {
                headers: Some(h), ..
            } => h.of(&self.text),
            _ => "",
        };
        text.split('&')
            .filter(|h| !h.is_empty())
            .map(|h| h.split_once('=').unwrap_or((h, "")))
    }

    /// The number of a `tel:` URI (RFC 3966 §5.1) without its visual separators: `+` and the
    /// digits of a global number (`+15551234567`), the digits of a local one.
    pub fn tel_number(&self) -> Option<String> {
        match &self.kind {
            Kind::Tel { number, .. } => Some(
                number
                    .of(&self.text)
                    .chars()
                    .filter(|c| !matches!(c, '-' | '.' | '(' | ')'))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The number of a `tel:` URI as written, separators included.
    pub fn tel_number_text(&self) -> Option<&str> {
        match &self.kind {
            Kind::Tel { number, .. } => Some(number.of(&self.text)),
            _ => None,
        }
    }

    /// Whether this is a `tel:` URI with a global number (`+…`, RFC 3966 §5.1.4).
    pub fn is_global_tel(&self) -> bool {
        matches!(self.kind, Kind::Tel { global: true, .. })
    }

    /// This URI minus the parts a Request-URI may not carry (RFC 3261 §19.1.1 table 1): the
    /// `method` parameter and the headers. Used when a strict router's URI becomes the
    /// Request-URI (§12.2.1.1).
    pub fn for_request_line(&self) -> Uri {
        let Kind::Sip {
            params, headers, ..
        } = &self.kind
        else {
            return self.clone();
        };
        if headers.is_none() && !self.has_param("method") {
            return self.clone();
        }
        let mut text = String::with_capacity(self.text.len());
        text.push_str(self.text.get(..params.start as usize).unwrap_or_default());
        for (n, v) in self.params() {
            if n.eq_ignore_ascii_case("method") {
                continue;
            }
            text.push(';');
            text.push_str(n);
            if let Some(v) = v {
                text.push('=');
                text.push_str(v);
            }
        }
        Uri::parse(&text).unwrap_or_else(|_| self.clone())
    }

    /// An rsip URI that prints exactly like this one. A plain `sip:`/`sips:` URI with a domain
    /// or IPv4 host is filled into rsip's structure (scheme, user, host and port, parameters)
    /// so that code reading its fields keeps working; parameters whose rsip form would print
    /// differently (rsip upper-cases `transport=tcp`) are kept as `Param::Other`. Anything
    /// rsip cannot model (IPv6, `tel:`, other schemes, user parts with `;`, headers, or text
    /// rsip would print otherwise) goes into a carrier: the whole text as a domain, which
    /// rsip prints verbatim.
    pub fn to_rsip(&self) -> rsip::Uri {
        self.structured_rsip()
            .filter(|u| u.to_string() == self.text)
            .unwrap_or_else(|| rsip_carrier(&self.text))
    }

    fn structured_rsip(&self) -> Option<rsip::Uri> {
        let Kind::Sip {
            sips,
            user,
            password,
            host,
            host_span,
            port,
            headers: None,
            ..
        } = &self.kind
        else {
            return None;
        };
        let user = user.map(|u| u.of(&self.text));
        if user.is_some_and(|u| u.contains(';')) {
            return None;
        }
        let host = match host {
            HostAddr::Domain => rsip::Host::Domain(host_span.of(&self.text).into()),
            HostAddr::V4(ip) => rsip::Host::IpAddr(std::net::IpAddr::V4(*ip)),
            HostAddr::V6(_) => return None,
        };
        let params = self
            .params()
            .map(|(n, v)| {
                let written_len = 1 + n.len() + v.map_or(0, |v| v.len() + 1);
                match rsip::Param::try_from((n, v)) {
                    Ok(p) if p.to_string().len() == written_len && same_param(&p, n, v) => p,
                    _ => rsip::Param::Other(n.into(), v.map(Into::into)),
                }
            })
            .collect();
        Some(rsip::Uri {
            scheme: Some(if *sips {
                rsip::Scheme::Sips
            } else {
                rsip::Scheme::Sip
            }),
            auth: user.map(|u| rsip::Auth {
                user: u.to_string(),
                password: password.map(|p| p.of(&self.text).to_string()),
            }),
            host_with_port: rsip::HostWithPort {
                host,
                port: port.map(rsip::Port::from),
            },
            params,
            headers: vec![],
        })
    }

    /// Parses what an rsip URI prints (see [`Uri::to_rsip`] for the way back).
    pub fn from_rsip(u: &rsip::Uri) -> Result<Uri, UriError> {
        Uri::parse(&u.to_string())
    }
}

/// Whether rsip's typed parameter prints as `;name[=value]` exactly.
fn same_param(p: &rsip::Param, name: &str, value: Option<&str>) -> bool {
    let printed = p.to_string();
    let Some(rest) = printed.strip_prefix(';') else {
        return false;
    };
    match value {
        None => rest == name,
        Some(v) => rest
            .split_once('=')
            .is_some_and(|(n, pv)| n == name && pv == v),
    }
}

/// The rsip URI that prints `text` verbatim: no scheme, the whole text as a domain.
pub fn rsip_carrier(text: &str) -> rsip::Uri {
    rsip::Uri {
        scheme: None,
        auth: None,
        host_with_port: rsip::HostWithPort {
            host: rsip::Host::Domain(text.into()),
            port: None,
        },
        params: vec![],
        headers: vec![],
    }
}

fn parse_sip(text: &str, start: usize, sips: bool) -> Result<Kind, UriError> {
    let len = text.len();
    // The user info ends at the first '@' (no '@' is legal unescaped elsewhere).
    let (user, password, host_start) = match text[start..].find('@') {
        Some(at) => {
            let at = start + at;
            let info = &text[start..at];
            let (user_end, pw) = match info.find(':') {
                Some(c) => (start + c, Some(start + c + 1)),
                None => (at, None),
            };
            if user_end == start {
                return Err(UriError::EmptyUser);
            }
            check_chars(text, start, user_end, "user", is_user_char)?;
            if let Some(p) = pw {
                check_chars(text, p, at, "password", is_password_char)?;
            }
            (
                Some(Span::new(start, user_end)),
                pw.map(|p| Span::new(p, at)),
                at + 1,
            )
        }
        None => (None, None, start),
    };
    // The host and port end at the first ';' or '?' past any IPv6 reference.
    let scan_from = if text[host_start..].starts_with('[') {
        text[host_start..]
            .find(']')
            .map_or(len, |e| host_start + e + 1)
    } else {
        host_start
    };
    let hp_end = text[scan_from..]
        .find([';', '?'])
        .map_or(len, |e| scan_from + e);
    let (host, host_span, port) = parse_host_port(text, host_start, hp_end)?;
    let params_end = text[hp_end..].find('?').map_or(len, |e| hp_end + e);
    check_params(text, hp_end, params_end, is_param_char)?;
    let headers = if params_end < len {
        let from = params_end + 1;
        for (i, h) in text[from..].split('&').scan(from, |pos, h| {
            let at = *pos;
            *pos += h.len() + 1;
            Some((at, h))
        }) {
            let Some(eq) = h.find('=') else {
                return Err(UriError::InvalidHeader { at: i });
            };
            if eq == 0 {
                return Err(UriError::InvalidHeader { at: i });
            }
            check_chars(text, i, i + h.len(), "header", |b| {
                is_header_char(b) || b == b'='
            })?;
            if h[eq + 1..].contains('=') {
                return Err(UriError::InvalidHeader { at: i });
            }
        }
        Some(Span::new(from, len))
    } else {
        None
    };
    let host = match host {
        HostKindPub::Domain => HostAddr::Domain,
        HostKindPub::V4(ip) => HostAddr::V4(ip),
        HostKindPub::V6(ip) => HostAddr::V6(ip),
    };
    let hp_written_end = host_start + (hp_end - host_start);
    Ok(Kind::Sip {
        sips,
        user,
        password,
        host,
        host_span,
        port,
        host_port: Span::new(host_start, hp_written_end),
        params: Span::new(hp_end, params_end),
        headers,
    })
}

fn parse_tel(text: &str, start: usize) -> Result<Kind, UriError> {
    let len = text.len();
    let end = text[start..].find(';').map_or(len, |e| start + e);
    let number = &text[start..end];
    let (global, digits) = match number.strip_prefix('+') {
        Some(d) => (true, d),
        None => (false, number),
    };
    let visual = |c: u8| matches!(c, b'-' | b'.' | b'(' | b')');
    let ok = if global {
        digits.bytes().all(|c| c.is_ascii_digit() || visual(c))
            && digits.bytes().any(|c| c.is_ascii_digit())
    } else {
        digits
            .bytes()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, b'*' | b'#') || visual(c))
            && digits
                .bytes()
                .any(|c| c.is_ascii_hexdigit() || matches!(c, b'*' | b'#'))
    };
    if !ok {
        return Err(UriError::InvalidTelNumber(number.to_string()));
    }
    check_params(text, end, len, |b| b.is_ascii_alphanumeric() || b == b'-')?;
    if !global
        && !params_iter(&text[end..])
            .any(|(n, v)| n.eq_ignore_ascii_case("phone-context") && v.is_some())
    {
        return Err(UriError::MissingPhoneContext);
    }
    Ok(Kind::Tel {
        number: Span::new(start, end),
        global,
        params: Span::new(end, len),
    })
}

impl fmt::Display for Uri {
    /// The URI as written (which parses back to an equal [`Uri`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Uri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Uri, UriError> {
        Uri::parse(s)
    }
}

impl TryFrom<&str> for Uri {
    type Error = UriError;

    fn try_from(s: &str) -> Result<Uri, UriError> {
        Uri::parse(s)
    }
}

impl TryFrom<&rsip::Uri> for Uri {
    type Error = UriError;

    fn try_from(u: &rsip::Uri) -> Result<Uri, UriError> {
        Uri::from_rsip(u)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn p(text: &str) -> Uri {
        Uri::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn plain_sip() {
        let u = p("sip:alice@relay.test:5070;transport=tcp;lr?subject=hi&priority=urgent");
        assert_eq!(u.scheme(), Scheme::Sip);
        assert_eq!(u.user(), Some("alice"));
        assert_eq!(u.host(), Some(Host::Domain("relay.test")));
        assert_eq!(u.port(), Some(5070));
        assert_eq!(u.transport(), Some("tcp"));
        assert_eq!(u.param("LR"), Some(None));
        assert!(u.is_loose_router());
        assert_eq!(u.param("maddr"), None);
        assert_eq!(
            u.headers().collect::<Vec<_>>(),
            [("subject", "hi"), ("priority", "urgent")]
        );
        assert_eq!(u.host_port_text(), Some("relay.test:5070"));
        assert_eq!(
            u.to_string(),
            "sip:alice@relay.test:5070;transport=tcp;lr?subject=hi&priority=urgent"
        );
        assert!(!u.is_sips());

        let u = p("sips:bob:secret@192.0.2.4");
        assert!(u.is_sips());
        assert_eq!(u.password(), Some("secret"));
        assert_eq!(u.host(), Some(Host::V4(Ipv4Addr::new(192, 0, 2, 4))));
        assert_eq!(u.port(), None);
        let u = p("SIP:relay.test.");
        assert_eq!(u.scheme(), Scheme::Sip);
        assert_eq!(u.scheme_str(), "SIP");
        assert_eq!(u.user(), None);
    }

    #[test]
    fn ipv6_with_and_without_port() {
        let u = p("sip:[2001:db8::10]:5070");
        assert_eq!(u.host(), Some(Host::V6("2001:db8::10".parse().unwrap())));
        assert_eq!(u.port(), Some(5070));
        assert_eq!(u.host_port_text(), Some("[2001:db8::10]:5070"));
        assert_eq!(u.host_text(), Some("[2001:db8::10]"));
        let sa: std::net::SocketAddr = u.host_port_text().unwrap().parse().unwrap();
        assert_eq!(sa.port(), 5070);
        let u = p("sip:alice@[2001:db8::10];transport=udp");
        assert_eq!(u.port(), None);
        assert_eq!(u.host_port_text(), Some("[2001:db8::10]"));
        assert_eq!(u.transport(), Some("udp"));
        let u = p("sip:[::ffff:192.0.2.1]");
        assert!(matches!(u.host(), Some(Host::V6(_))));
        assert_eq!(Host::V6("::1".parse().unwrap()).to_string(), "[::1]");
        // maddr with an IPv6 value.
        assert_eq!(
            p("sip:h.test;maddr=[::1]").param("maddr"),
            Some(Some("[::1]"))
        );
    }

    #[test]
    fn tel_uris() {
        let u = p("tel:+1-555-123-4567;phone-context=example.com");
        assert_eq!(u.scheme(), Scheme::Tel);
        assert_eq!(u.tel_number().as_deref(), Some("+15551234567"));
        assert_eq!(u.tel_number_text(), Some("+1-555-123-4567"));
        assert!(u.is_global_tel());
        assert_eq!(u.param("Phone-Context"), Some(Some("example.com")));
        assert_eq!(u.host(), None);
        let u = p("tel:7042;phone-context=+1-555-123");
        assert!(!u.is_global_tel());
        assert_eq!(u.tel_number().as_deref(), Some("7042"));
        let u = p("tel:+1(555)123.4567;ext=22;isub=1234");
        assert_eq!(u.tel_number().as_deref(), Some("+15551234567"));
        assert_eq!(u.param("ext"), Some(Some("22")));
        assert_eq!(Uri::parse("tel:7042"), Err(UriError::MissingPhoneContext));
        assert!(matches!(
            Uri::parse("tel:+"),
            Err(UriError::InvalidTelNumber(_))
        ));
        assert!(matches!(
            Uri::parse("tel:+1 555"),
            Err(UriError::InvalidTelNumber(_))
        ));
    }

    #[test]
    fn rfc4475_escapes_and_semiuri() {
        // RFC 4475 §3.1.1.1 (escruri) and §3.1.2.x (semiuri).
        let u = p("sip:sips%3Auser%40example.com@example.net");
        assert_eq!(u.user(), Some("sips%3Auser%40example.com"));
        assert_eq!(u.user_decoded().as_deref(), Some("sips:user@example.com"));
        assert_eq!(u.host(), Some(Host::Domain("example.net")));
        let u = p("sip:user;par=u%40example.net@example.com");
        assert_eq!(u.user(), Some("user;par=u%40example.net"));
        assert_eq!(u.host(), Some(Host::Domain("example.com")));
        assert_eq!(u.params().count(), 0);
        let u = p("sip:%61lice@atlanta.com;transport=TCP");
        assert_eq!(u.user_decoded().as_deref(), Some("alice"));
        let u = p("sip:+1-212-555-1212:1234@gateway.com;user=phone");
        assert_eq!(u.user(), Some("+1-212-555-1212"));
        assert_eq!(u.password(), Some("1234"));
        assert_eq!(u.param("user"), Some(Some("phone")));
        let u = p("sip:alice@atlanta.com;m%61ddr=x");
        assert_eq!(u.param("m%61ddr"), Some(Some("x")));
        // Escaped header value.
        let u = p("sip:a@b.test?Replaces=abc%40host%3Bto-tag%3D1");
        assert_eq!(
            u.headers().next(),
            Some(("Replaces", "abc%40host%3Bto-tag%3D1"))
        );
    }

    #[test]
    fn other_schemes() {
        for t in [
            "mailto:alice@example.com",
            "urn:uuid:090b314c-7132-0014-ac65-4248b341241a",
            "http://example.com/a?b=c",
            "im:alice@x",
        ] {
            let u = p(t);
            assert_eq!(u.scheme(), Scheme::Other);
            assert_eq!(u.to_string(), t);
            assert_eq!(u.user(), None);
            assert_eq!(u.host(), None);
        }
        assert_eq!(p("urn:service:sos").scheme_str(), "urn");
        assert_eq!(p("urn:service:sos").rest(), "service:sos");
    }

    #[test]
    fn malformed_inputs_are_errors() {
        type Check = fn(&UriError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| *e == UriError::Empty),
            ("   ", |e| *e == UriError::Empty),
            ("alice", |e| *e == UriError::InvalidScheme),
            ("1sip:a", |e| *e == UriError::InvalidScheme),
            (":a", |e| *e == UriError::InvalidScheme),
            ("sip:", |e| *e == UriError::MissingHost),
            ("sip:@h.test", |e| *e == UriError::EmptyUser),
            ("sip:a@", |e| *e == UriError::MissingHost),
            ("sip:a b@h", |e| {
                matches!(e, UriError::InvalidChar { part: "user", .. })
            }),
            ("sip:a%4@h", |e| matches!(e, UriError::InvalidEscape { .. })),
            ("sip:a%zz@h", |e| {
                matches!(e, UriError::InvalidEscape { .. })
            }),
            ("sip:h.test:", |e| matches!(e, UriError::InvalidPort(_))),
            ("sip:h.test:65536", |e| {
                matches!(e, UriError::InvalidPort(_))
            }),
            ("sip:h.test:5x", |e| matches!(e, UriError::InvalidPort(_))),
            ("sip:[2001:db8::10", |e| {
                matches!(e, UriError::InvalidIpv6(_))
            }),
            ("sip:[2001:db8::zz]", |e| {
                matches!(e, UriError::InvalidIpv6(_))
            }),
            ("sip:[::1]x", |e| matches!(e, UriError::InvalidHost(_))),
            ("sip:999.1.1.1", |e| matches!(e, UriError::InvalidHost(_))),
            ("sip:1.2.3", |e| matches!(e, UriError::InvalidHost(_))),
            ("sip:-h.test", |e| matches!(e, UriError::InvalidHost(_))),
            ("sip:h..test", |e| matches!(e, UriError::InvalidHost(_))),
            ("sip:h.test;;lr", |e| {
                matches!(e, UriError::EmptyParam { .. })
            }),
            ("sip:h.test;x=", |e| {
                matches!(e, UriError::EmptyParam { .. })
            }),
            ("sip:h.test;=x", |e| {
                matches!(e, UriError::EmptyParam { .. })
            }),
            ("sip:h.test;x=\"q\"", |e| {
                matches!(e, UriError::InvalidChar { .. })
            }),
            ("sip:h.test?x", |e| {
                matches!(e, UriError::InvalidHeader { .. })
            }),
            ("sip:h.test?=x", |e| {
                matches!(e, UriError::InvalidHeader { .. })
            }),
            ("sip:h.test?a=b=c", |e| {
                matches!(e, UriError::InvalidHeader { .. })
            }),
            ("sip:a@h test", |e| matches!(e, UriError::InvalidHost(_))),
            ("mailto:", |e| *e == UriError::MissingHost),
            ("urn:a<b", |e| matches!(e, UriError::InvalidChar { .. })),
            ("sip:\u{e9}@h", |e| {
                matches!(e, UriError::InvalidChar { ch: '\u{e9}', .. })
            }),
        ];
        for (text, want) in cases {
            match Uri::parse(text) {
                Err(e) => assert!(want(&e), "{text}: {e:?}"),
                Ok(u) => panic!("{text} parsed: {u:?}"),
            }
        }
        assert_eq!(Uri::parse(&"a".repeat(70_000)), Err(UriError::TooLong));
    }

    #[test]
    fn display_round_trips() {
        for t in [
            "sip:alice@relay.test",
            "sips:[2001:db8::1]:5061;transport=tls",
            "tel:+1-555-123-4567;phone-context=example.com",
            "sip:user;par=u%40example.net@example.com",
            "urn:uuid:1",
        ] {
            let u = p(t);
            assert_eq!(p(&u.to_string()), u);
        }
        assert_eq!(p("  sip:a@b.test \t").to_string(), "sip:a@b.test");
    }

    #[test]
    fn rsip_carrier_prints_verbatim() {
        for t in [
            "sip:[2001:db8::10]:5070",
            "tel:+1-555-123-4567;phone-context=example.com",
            "sip:user;par=u%40example.net@example.com",
            "urn:uuid:090b314c-7132-0014-ac65-4248b341241a",
            "sip:a@b.test?subject=x",
            "SIP:a@b.test",
            "sip:a@b.test:05060",
        ] {
            let u = p(t);
            let r = u.to_rsip();
            assert_eq!(r.scheme, None, "{t}");
            assert_eq!(r.to_string(), t);
            assert_eq!(Uri::from_rsip(&r).unwrap(), u);
            assert_eq!(rsip_carrier(t).to_string(), t);
        }
    }

    #[test]
    fn rsip_structure_for_plain_uris() {
        let u = p("sip:bob:pw@198.51.100.9:5080;transport=tcp;lr;maddr=1.2.3.4;x=y");
        let r = u.to_rsip();
        assert_eq!(r.to_string(), u.to_string());
        assert_eq!(r.scheme, Some(rsip::Scheme::Sip));
        assert_eq!(r.user(), Some("bob"));
        assert_eq!(
            r.host_with_port.host,
            rsip::Host::IpAddr("198.51.100.9".parse().unwrap())
        );
        assert_eq!(r.host_with_port.port, Some(rsip::Port::from(5080)));
        assert!(r.params.contains(&rsip::Param::Lr));
        assert!(r
            .params
            .iter()
            .any(|p| matches!(p, rsip::Param::Maddr(m) if m.value() == "1.2.3.4")));
        // rsip would print TCP: kept as written instead.
        assert!(r.params.iter().any(
            |p| matches!(p, rsip::Param::Other(n, Some(v)) if n.value() == "transport" && v.value() == "tcp")
        ));
        let r = p("sips:relay.test;transport=TLS").to_rsip();
        assert_eq!(r.scheme, Some(rsip::Scheme::Sips));
        assert_eq!(r.transport(), Some(&rsip::Transport::Tls));
        assert_eq!(r.to_string(), "sips:relay.test;transport=TLS");
        // What rsip itself parses comes back equal.
        let theirs = rsip::Uri::try_from("sip:alice@relay.test:5060;lr").unwrap();
        let ours = Uri::from_rsip(&theirs).unwrap();
        assert_eq!(ours.to_rsip(), theirs);
    }

    #[test]
    fn request_line_form_drops_method_and_headers() {
        let u = p("sip:p2.test;method=INVITE;transport=tcp?x=y");
        assert_eq!(
            u.for_request_line().to_string(),
            "sip:p2.test;transport=tcp"
        );
        let u = p("sip:[::1]:5060;lr");
        assert_eq!(u.for_request_line(), u);
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }
}
