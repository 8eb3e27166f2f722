//! Addresses as SIP headers carry them (RFC 3261 §20.10, grammar in §25.1): `name-addr`
//! (`[display-name] <URI>`) and `addr-spec` (a bare URI), each followed by header parameters,
//! and comma-separated lists of them; read by our own parser.
//!
//! rsip 0.4 keeps From, To, Contact, Route and Record-Route values as text and misreads many
//! legal ones when asked to type them: quoted parameter values holding `<`, `>`, `,` or `;`
//! (linphone's `+sip.instance="<urn:uuid:…>"`), IPv6 hosts, `tel:` URIs, display names with
//! escapes. [`NameAddr`] reads them all and keeps the text as written; the typed views
//! ([`FromTo`], [`Contact`], [`Contacts`], [`ReferTo`], [`ServiceId`]) and the list readers
//! ([`parse_list`], [`parse_routes`], [`parse_asserted_identity`]) are built on it, and
//! [`header_values`] finds the raw values in an rsip message.
//!
//! Parsing never panics: every input gives a value or an [`AddressError`].

use std::borrow::Cow;
use std::fmt;

use rsip::headers::UntypedHeader as _;
use rsip::Header;

use crate::uri::{Span, Uri, UriError, MAX_LEN};

/// Why a header value is not a name-addr, addr-spec or list of them (RFC 3261 §25.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The value (or an element of a list) is empty.
    #[error("empty value")]
    Empty,
    /// The value is longer than we accept (64 KiB).
    #[error("value too long")]
    TooLong,
    /// The URI is not valid.
    #[error("invalid URI: {0}")]
    Uri(#[from] UriError),
    /// A quoted string (display name or parameter value) without its closing `"`.
    #[error("unterminated quoted string at byte {at}")]
    UnterminatedQuote {
        /// The byte offset of the opening quote.
        at: usize,
    },
    /// A `<` without its `>`, or a quoted display name not followed by `<`.
    #[error("missing angle bracket at byte {at}")]
    MissingAngle {
        /// The byte offset where the bracket was expected.
        at: usize,
    },
    /// A character not allowed in a display name (§25.1: tokens or a quoted string).
    #[error("invalid display name at byte {at}")]
    InvalidDisplayName {
        /// The byte offset of the offending character.
        at: usize,
    },
    /// A header parameter that is not `;name[=value]` (§25.1 `generic-param`).
    #[error("invalid parameter at byte {at}")]
    InvalidParam {
        /// The byte offset of the offending character.
        at: usize,
    },
    /// An empty element in a comma-separated list (`a,,b`).
    #[error("empty list element at byte {at}")]
    EmptyElement {
        /// The byte offset of the element.
        at: usize,
    },
    /// Several comma-separated values where the header takes one (From, To, Refer-To).
    #[error("more than one value")]
    NotSingle,
    /// A `P-Preferred-Service` / `P-Asserted-Service` value that is not a service id
    /// (RFC 6050 §4).
    #[error("invalid service id {0:?}")]
    InvalidServiceId(String),
}

/// RFC 3261 §25.1 `token` characters.
pub(crate) fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

/// Characters of an unquoted parameter value: `token`, `host` (IPv6 references included),
/// and the other visible characters peers put there, except the separators.
fn is_value_char(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'<' | b'>' | b'\\')
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn skip_ws(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && is_ws(bytes[i]) {
        i += 1;
    }
    i
}

/// The end (one past the closing quote) of the quoted string opening at `start`
/// (§25.1 `quoted-string`: `\` escapes any character but CR and LF).
fn quoted_end(text: &str, start: usize) -> Result<usize, AddressError> {
    let bytes = text.as_bytes();
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return Ok(i + 1),
            b'\\' => {
                if i + 1 >= bytes.len() || matches!(bytes[i + 1], b'\r' | b'\n') {
                    return Err(AddressError::UnterminatedQuote { at: start });
                }
                i += 2;
            }
            b'\r' | b'\n' | 0 => return Err(AddressError::UnterminatedQuote { at: start }),
            _ => i += 1,
        }
    }
    Err(AddressError::UnterminatedQuote { at: start })
}

/// The content of a quoted string (with its quotes) unescaped; borrowed when it holds no
/// `\`. Anything else is returned as it is.
pub fn unquote(text: &str) -> Cow<'_, str> {
    let Some(inner) = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .filter(|_| text.len() >= 2)
    else {
        return Cow::Borrowed(text);
    };
    if !inner.contains('\\') {
        return Cow::Borrowed(inner);
    }
    let mut out = String::with_capacity(inner.len());
    let mut escaped = false;
    for c in inner.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` as a quoted string (§25.1): `"`, `\` and the control characters `qdtext` does not
/// allow escaped as `quoted-pair`s (tab stays as it is); CR and LF, which no quoted string
/// can carry, left out. What [`unquote`] makes of a display name read off the wire is so
/// written back in a form that parses again.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '\r' | '\n' => continue,
            '"' | '\\' => out.push('\\'),
            '\t' => {}
            c if c.is_ascii_control() => out.push('\\'),
            _ => {}
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Reads one `SWS ";" SWS name [SWS "=" SWS value]` at `i`; returns the name and value spans
/// and the position after it, `None` at the end of the text.
fn scan_param(text: &str, i: usize) -> Result<Option<(Span, Option<Span>, usize)>, AddressError> {
    let bytes = text.as_bytes();
    let i = skip_ws(bytes, i);
    if i >= bytes.len() {
        return Ok(None);
    }
    if bytes[i] != b';' {
        return Err(AddressError::InvalidParam { at: i });
    }
    let name_start = skip_ws(bytes, i + 1);
    let mut j = name_start;
    while j < bytes.len() && is_token_char(bytes[j]) {
        j += 1;
    }
    if j == name_start {
        return Err(AddressError::InvalidParam { at: name_start });
    }
    let name = Span::new(name_start, j);
    let k = skip_ws(bytes, j);
    if k >= bytes.len() || bytes[k] != b'=' {
        return Ok(Some((name, None, j)));
    }
    let v = skip_ws(bytes, k + 1);
    if v >= bytes.len() {
        return Err(AddressError::InvalidParam { at: v });
    }
    let end = if bytes[v] == b'"' {
        quoted_end(text, v)?
    } else {
        let mut e = v;
        while e < bytes.len() && is_value_char(bytes[e]) {
            e += 1;
        }
        if e == v {
            return Err(AddressError::InvalidParam { at: v });
        }
        e
    };
    Ok(Some((name, Some(Span::new(v, end)), end)))
}

/// Checks the header parameters of `text[from..]`.
fn check_params(text: &str, from: usize) -> Result<(), AddressError> {
    let mut i = from;
    while let Some((_, _, next)) = scan_param(text, i)? {
        i = next;
    }
    Ok(())
}

/// Header parameters in order, as written (a quoted value keeps its quotes).
#[derive(Debug, Clone)]
pub struct Params<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Params<'a> {
    fn new(text: &'a str) -> Params<'a> {
        Params { text, pos: 0 }
    }
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a str, Option<&'a str>);

    fn next(&mut self) -> Option<Self::Item> {
        let (name, value, next) = scan_param(self.text, self.pos).ok()??;
        self.pos = next;
        Some((name.of(self.text), value.map(|v| v.of(self.text))))
    }
}

fn find_param<'a>(params: Params<'a>, name: &str) -> Option<Option<&'a str>> {
    params
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The end of the list element starting at `start`: the first comma outside quoted strings
/// and angle brackets (§7.3.1), or the end of the text.
fn element_end(text: &str, start: usize) -> Result<usize, AddressError> {
    let bytes = text.as_bytes();
    let mut i = start;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i = quoted_end(text, i)?;
                continue;
            }
            b'<' => match text[i..].find('>') {
                Some(e) => i += e,
                None => return Err(AddressError::MissingAngle { at: i }),
            },
            b',' => return Ok(i),
            _ => {}
        }
        i += 1;
    }
    Ok(bytes.len())
}

/// Runs `parse` on every element of a comma-separated list.
fn parse_elements<T>(
    text: &str,
    parse: impl Fn(&str) -> Result<T, AddressError>,
) -> Result<Vec<T>, AddressError> {
    if text.len() > MAX_LEN {
        return Err(AddressError::TooLong);
    }
    if text.trim_matches(|c| c == ' ' || c == '\t').is_empty() {
        return Err(AddressError::Empty);
    }
    let mut out = Vec::with_capacity(1);
    let mut start = 0;
    loop {
        let end = element_end(text, start)?;
        let element = &text[start..end];
        if element.trim_matches(|c| c == ' ' || c == '\t').is_empty() {
            return Err(AddressError::EmptyElement { at: start });
        }
        out.push(parse(element)?);
        if end >= text.len() {
            return Ok(out);
        }
        start = end + 1;
    }
}

/// A `name-addr` or `addr-spec` with its header parameters (RFC 3261 §20.10, §25.1):
/// `["Display Name"] <uri>;param=value` or `uri;param=value` (where, per §20, the URI ends at
/// the first `;` and what follows are header parameters). Kept as written.
///
/// Two values are equal when their texts are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameAddr {
    text: String,
    /// The display name as written (a quoted string keeps its quotes).
    display: Option<Span>,
    /// Written with `<…>`.
    angle: bool,
    uri: Uri,
    /// From the first `;` after the URI (or `>`) to the end.
    params: Span,
}

impl NameAddr {
    /// Parses one value (not a list: see [`parse_list`]). Surrounding spaces and tabs are
    /// ignored.
    pub fn parse(text: &str) -> Result<NameAddr, AddressError> {
        let text = text.trim_matches(|c| c == ' ' || c == '\t');
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        if text.len() > MAX_LEN {
            return Err(AddressError::TooLong);
        }
        let bytes = text.as_bytes();
        // Where the `<` of a name-addr is, and the display name before it.
        let (display, lt) = if bytes[0] == b'"' {
            let end = quoted_end(text, 0)?;
            let lt = skip_ws(bytes, end);
            if lt >= bytes.len() || bytes[lt] != b'<' {
                return Err(AddressError::MissingAngle { at: lt });
            }
            (Some(Span::new(0, end)), Some(lt))
        } else {
            match text.find('<') {
                Some(lt)
                    if bytes[..lt]
                        .iter()
                        .all(|&b| is_token_char(b) || is_ws(b) || b >= 0x80) =>
                {
                    let name = text[..lt].trim_end_matches([' ', '\t']);
                    let display = (!name.is_empty()).then(|| Span::new(0, name.len()));
                    (display, Some(lt))
                }
                _ => (None, None),
            }
        };
        let (uri, params_from) = match lt {
            Some(lt) => {
                let gt = text[lt..]
                    .find('>')
                    .map(|e| lt + e)
                    .ok_or(AddressError::MissingAngle { at: lt })?;
                (Uri::parse(&text[lt + 1..gt])?, gt + 1)
            }
            None => {
                // addr-spec: the URI ends at the first `;` (§20) or whitespace.
                let end = text.find([';', ' ', '\t']).unwrap_or(text.len());
                (Uri::parse(&text[..end])?, end)
            }
        };
        check_params(text, params_from)?;
        Ok(NameAddr {
            text: text.to_string(),
            display,
            angle: lt.is_some(),
            uri,
            params: Span::new(params_from, text.len()),
        })
    }

    /// A name-addr `["display" ]<uri>` without parameters; the display name is written as
    /// a quoted string.
    pub fn new(display_name: Option<&str>, uri: &Uri) -> NameAddr {
        let mut text = String::new();
        let mut display = None;
        if let Some(name) = display_name {
            text.push_str(&quote(name));
            display = Some(Span::new(0, text.len()));
            text.push(' ');
        }
        text.push('<');
        text.push_str(uri.as_str());
        text.push('>');
        let end = text.len();
        NameAddr {
            text,
            display,
            angle: true,
            uri: uri.clone(),
            params: Span::new(end, end),
        }
    }

    /// The value as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The display name, unquoted and unescaped (§20.10); `None` when there is none.
    pub fn display_name(&self) -> Option<Cow<'_, str>> {
        self.display.map(|d| unquote(d.of(&self.text)))
    }

    /// The display name as written (quotes and escapes kept).
    pub fn display_name_raw(&self) -> Option<&str> {
        self.display.map(|d| d.of(&self.text))
    }

    /// The URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// Whether the value was written as a name-addr (`<uri>`), not a bare addr-spec.
    pub fn is_name_addr(&self) -> bool {
        self.angle
    }

    /// The header parameters in order, as written (§25.1 `generic-param`; a quoted value
    /// keeps its quotes).
    pub fn params(&self) -> Params<'_> {
        Params::new(self.params_text())
    }

    /// The header parameters' text as written, from the first `;` (empty when none).
    pub fn params_text(&self) -> &str {
        self.params.of(&self.text)
    }

    /// The first header parameter called `name` (ASCII case ignored), its value unquoted and
    /// unescaped: `Some(None)` when it has no value, `None` when absent.
    pub fn param(&self, name: &str) -> Option<Option<Cow<'_, str>>> {
        find_param(self.params(), name).map(|v| v.map(unquote))
    }

    /// Whether header parameter `name` is present (ASCII case ignored).
    pub fn has_param(&self, name: &str) -> bool {
        find_param(self.params(), name).is_some()
    }

    /// The `tag` parameter (§19.3) of a From or To value.
    pub fn tag(&self) -> Option<&str> {
        find_param(self.params(), "tag").flatten()
    }

    /// The `expires` parameter (§20.10) in seconds; `None` when absent or not a number.
    pub fn expires(&self) -> Option<u32> {
        let v = find_param(self.params(), "expires").flatten()?;
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // §20.19: a value past 2^32 - 1 means 2^32 - 1.
        Some(v.parse().unwrap_or(u32::MAX))
    }

    /// The `q` parameter (§20.10, `qvalue` in §25.1) in thousandths: `q=0.7` is 700.
    pub fn q_millis(&self) -> Option<u16> {
        let v = find_param(self.params(), "q").flatten()?;
        let (int, frac) = v.split_once('.').unwrap_or((v, ""));
        if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut millis: u16 = match int {
            "0" => 0,
            "1" => 1000,
            _ => return None,
        };
        let mut scale = 100;
        for b in frac.bytes() {
            millis += u16::from(b - b'0') * scale;
            scale /= 10;
        }
        (millis <= 1000).then_some(millis)
    }

    /// The `q` parameter (§20.10) as a number between 0 and 1.
    pub fn q(&self) -> Option<f32> {
        self.q_millis().map(|m| f32::from(m) / 1000.0)
    }

    /// This value with every header parameter called `name` (ASCII case ignored) removed.
    pub fn without_param(&self, name: &str) -> NameAddr {
        if !self.has_param(name) {
            return self.clone();
        }
        let mut text = String::with_capacity(self.text.len());
        text.push_str(
            self.text
                .get(..self.params.start as usize)
                .unwrap_or_default(),
        );
        for (n, v) in self.params() {
            if n.eq_ignore_ascii_case(name) {
                continue;
            }
            push_param(&mut text, n, v);
        }
        self.with_text(text)
    }

    /// This value with `;name[=value]` appended; a value that is not a token is written as a
    /// quoted string. `name` must be a token.
    pub fn with_param(&self, name: &str, value: Option<&str>) -> Result<NameAddr, AddressError> {
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return Err(AddressError::InvalidParam { at: 0 });
        }
        let mut text = self.text.clone();
        let value = value.map(|v| {
            if !v.is_empty() && v.bytes().all(is_token_char) {
                Cow::Borrowed(v)
            } else {
                Cow::Owned(quote(v))
            }
        });
        push_param(&mut text, name, value.as_deref());
        let mut out = self.clone();
        out.text = text;
        out.params.end = out.text.len() as u32;
        if out.text.len() > MAX_LEN {
            return Err(AddressError::TooLong);
        }
        Ok(out)
    }

    /// The same display name and URI with the parameters of `text` (built from this one).
    fn with_text(&self, text: String) -> NameAddr {
        let mut out = self.clone();
        out.params.end = text.len() as u32;
        out.text = text;
        out
    }
}

fn push_param(text: &mut String, name: &str, value: Option<&str>) {
    text.push(';');
    text.push_str(name);
    if let Some(v) = value {
        text.push('=');
        text.push_str(v);
    }
}

impl fmt::Display for NameAddr {
    /// The value as written (which parses back to an equal [`NameAddr`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for NameAddr {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<NameAddr, AddressError> {
        NameAddr::parse(s)
    }
}

/// Parses a comma-separated list of name-addr / addr-spec values (§7.3.1: `Contact: a, b`,
/// `Route: <a>, <b>`), splitting at the commas outside quoted strings and angle brackets.
pub fn parse_list(text: &str) -> Result<Vec<NameAddr>, AddressError> {
    parse_elements(text, NameAddr::parse)
}

/// Parses exactly one value where a header takes one (From, To, Refer-To).
fn parse_single(text: &str) -> Result<NameAddr, AddressError> {
    if text.len() > MAX_LEN {
        return Err(AddressError::TooLong);
    }
    if element_end(text, 0)? < text.len() {
        return Err(AddressError::NotSingle);
    }
    NameAddr::parse(text)
}

/// A From or To header value (RFC 3261 §20.20, §20.39): one name-addr or addr-spec with its
/// `tag` (§19.3) and other parameters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FromTo(NameAddr);

impl FromTo {
    /// Parses a From or To value; a list is an error.
    pub fn parse(text: &str) -> Result<FromTo, AddressError> {
        parse_single(text).map(FromTo)
    }

    /// The tag (§19.3), if any.
    pub fn tag(&self) -> Option<&str> {
        self.0.tag()
    }

    /// The address.
    pub fn address(&self) -> &NameAddr {
        &self.0
    }

    /// The address, owned.
    pub fn into_address(self) -> NameAddr {
        self.0
    }
}

impl std::ops::Deref for FromTo {
    type Target = NameAddr;

    fn deref(&self) -> &NameAddr {
        &self.0
    }
}

impl fmt::Display for FromTo {
    /// The value as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One Contact value (RFC 3261 §20.10): an address with `expires`, `q` and feature
/// parameters such as `+sip.instance` (RFC 5626 §4.1) and `reg-id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Contact(NameAddr);

impl Contact {
    /// Parses one Contact value (not `*`, not a list: see [`Contacts::parse`]).
    pub fn parse(text: &str) -> Result<Contact, AddressError> {
        NameAddr::parse(text).map(Contact)
    }

    /// The `+sip.instance` parameter unquoted (RFC 5626 §4.1), e.g.
    /// `<urn:uuid:090b314c-7132-0014-ac65-4248b341241a>`.
    pub fn instance(&self) -> Option<Cow<'_, str>> {
        self.0.param("+sip.instance").flatten()
    }

    /// The `reg-id` parameter (RFC 5626 §4.2).
    pub fn reg_id(&self) -> Option<u32> {
        find_param(self.0.params(), "reg-id")
            .flatten()
            .and_then(|v| v.parse().ok())
    }

    /// Whether the URI carries `ob` (RFC 5626 §5.4: the UA asks for outbound keep-alive;
    /// pjsua2 writes it).
    pub fn is_outbound(&self) -> bool {
        self.0.uri().has_param("ob")
    }

    /// The address.
    pub fn address(&self) -> &NameAddr {
        &self.0
    }

    /// The address, owned.
    pub fn into_address(self) -> NameAddr {
        self.0
    }
}

impl std::ops::Deref for Contact {
    type Target = NameAddr;

    fn deref(&self) -> &NameAddr {
        &self.0
    }
}

impl fmt::Display for Contact {
    /// The value as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A Contact header value (RFC 3261 §20.10): `*` (only in a REGISTER removing every binding,
/// §10.2.2) or a list of contacts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Contacts {
    /// `Contact: *`.
    Wildcard,
    /// One or more contacts.
    List(Vec<Contact>),
}

impl Contacts {
    /// Parses a Contact header value.
    pub fn parse(text: &str) -> Result<Contacts, AddressError> {
        if text.trim_matches(|c| c == ' ' || c == '\t') == "*" {
            return Ok(Contacts::Wildcard);
        }
        parse_elements(text, Contact::parse).map(Contacts::List)
    }

    /// The contacts (none for the wildcard).
    pub fn contacts(&self) -> &[Contact] {
        match self {
            Contacts::Wildcard => &[],
            Contacts::List(l) => l,
        }
    }
}

/// Parses a Route or Record-Route value (RFC 3261 §20.30, §20.34): a list of name-addrs with
/// parameters. (A bare URI is read too, its `;` parameters as header parameters.)
pub fn parse_routes(text: &str) -> Result<Vec<NameAddr>, AddressError> {
    parse_list(text)
}

/// Parses a P-Asserted-Identity or P-Preferred-Identity value (RFC 3325 §9.1): one or two
/// addresses (a SIP and a tel URI).
pub fn parse_asserted_identity(text: &str) -> Result<Vec<NameAddr>, AddressError> {
    parse_list(text)
}

/// A Refer-To value (RFC 3515 §2.1): one name-addr or addr-spec; in the name-addr form the
/// URI may carry headers (`?Replaces=…`) and any scheme.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReferTo(NameAddr);

impl ReferTo {
    /// Parses a Refer-To value; a list is an error.
    pub fn parse(text: &str) -> Result<ReferTo, AddressError> {
        parse_single(text).map(ReferTo)
    }

    /// The address.
    pub fn address(&self) -> &NameAddr {
        &self.0
    }

    /// The URI referred to.
    pub fn uri(&self) -> &Uri {
        self.0.uri()
    }
}

impl fmt::Display for ReferTo {
    /// The value as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A service id as `P-Preferred-Service` and `P-Asserted-Service` carry it (RFC 6050 §4):
/// a URN (`urn:urn-7:3gpp-service.ims.icsi.mmtel`) or, as the relay's terminals write it, a
/// plain service name, optionally in angle brackets, with `;name=value` parameters
/// (`echo;quality=hd`, `<clock>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceId {
    text: String,
    id: Span,
    params: Span,
}

impl ServiceId {
    /// Parses one service id (a list: [`ServiceId::parse_list`]).
    pub fn parse(text: &str) -> Result<ServiceId, AddressError> {
        let text = text.trim_matches(|c| c == ' ' || c == '\t');
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        if text.len() > MAX_LEN {
            return Err(AddressError::TooLong);
        }
        let (id, params_from) = match text.strip_prefix('<') {
            Some(inner) => {
                let gt = inner
                    .find('>')
                    .ok_or(AddressError::MissingAngle { at: 0 })?;
                (Span::new(1, 1 + gt), gt + 2)
            }
            None => {
                let end = text.find([';', ' ', '\t']).unwrap_or(text.len());
                (Span::new(0, end), end)
            }
        };
        let id_text = id.of(text);
        if id.is_empty()
            || !id_text
                .bytes()
                .all(|b| is_token_char(b) || matches!(b, b':' | b'/' | b'@'))
            || id_text.ends_with([':', '.'])
        {
            return Err(AddressError::InvalidServiceId(id_text.to_string()));
        }
        check_params(text, params_from)?;
        Ok(ServiceId {
            text: text.to_string(),
            id,
            params: Span::new(params_from, text.len()),
        })
    }

    /// Parses a comma-separated list of service ids (RFC 6050 §4.2).
    pub fn parse_list(text: &str) -> Result<Vec<ServiceId>, AddressError> {
        parse_elements(text, ServiceId::parse)
    }

    /// The id as written, without brackets or parameters.
    pub fn id(&self) -> &str {
        self.id.of(&self.text)
    }

    /// Whether the id is a URN (`urn:…`).
    pub fn is_urn(&self) -> bool {
        self.id()
            .get(..4)
            .is_some_and(|p| p.eq_ignore_ascii_case("urn:"))
    }

    /// The service name: a URN's last segment (after its last `:` or `.`,
    /// `urn:urn-7:3gpp-service.echo` → `echo`), else the id itself.
    pub fn name(&self) -> &str {
        let id = self.id();
        if self.is_urn() {
            id.rsplit([':', '.']).next().unwrap_or(id)
        } else {
            id
        }
    }

    /// The parameters in order, as written.
    pub fn params(&self) -> Params<'_> {
        Params::new(self.params.of(&self.text))
    }

    /// The first parameter called `name` (ASCII case ignored), unquoted.
    pub fn param(&self, name: &str) -> Option<Option<Cow<'_, str>>> {
        find_param(self.params(), name).map(|v| v.map(unquote))
    }
}

impl fmt::Display for ServiceId {
    /// The value as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The compact form of a header name (RFC 3261 §7.3.3 and the RFCs that add one).
fn compact_of(name: &str) -> Option<&'static str> {
    const TABLE: [(&str, &str); 20] = [
        ("Accept-Contact", "a"),
        ("Referred-By", "b"),
        ("Content-Type", "c"),
        ("Request-Disposition", "d"),
        ("Content-Encoding", "e"),
        ("From", "f"),
        ("Call-ID", "i"),
        ("Reject-Contact", "j"),
        ("Supported", "k"),
        ("Content-Length", "l"),
        ("Contact", "m"),
        ("Identity-Info", "n"),
        ("Event", "o"),
        ("Refer-To", "r"),
        ("Subject", "s"),
        ("To", "t"),
        ("Allow-Events", "u"),
        ("Via", "v"),
        ("Session-Expires", "x"),
        ("Identity", "y"),
    ];
    TABLE
        .iter()
        .find(|(long, _)| long.eq_ignore_ascii_case(name))
        .map(|(_, short)| *short)
}

/// Whether header name `a` names the same header as `b` (ASCII case ignored, compact forms
/// included).
pub fn same_header_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim(), b.trim());
    // Every compact form is one letter and every name it stands for longer: names of
    // different lengths match only when one is the other's compact form. (Called for each
    // header of a message on every lookup: the table is searched only for a one-letter name.)
    match (a.len(), b.len()) {
        (x, y) if x == y => a.eq_ignore_ascii_case(b),
        (1, _) => compact_of(b).is_some_and(|c| c.eq_ignore_ascii_case(a)),
        (_, 1) => compact_of(a).is_some_and(|c| c.eq_ignore_ascii_case(b)),
        _ => false,
    }
}

/// A header's name (rsip's spelling for the headers it knows, as received for the others)
/// and its raw value.
pub fn header_name_value(h: &Header) -> (&str, &str) {
    macro_rules! names {
        ($($v:ident => $n:literal),* $(,)?) => {
            match h {
                $(Header::$v(x) => ($n, x.value()),)*
                Header::Other(n, v) => (n.as_str(), v.as_str()),
            }
        };
    }
    names! {
        Accept => "Accept",
        AcceptEncoding => "Accept-Encoding",
        AcceptLanguage => "Accept-Language",
        AlertInfo => "Alert-Info",
        Allow => "Allow",
        AuthenticationInfo => "Authentication-Info",
        Authorization => "Authorization",
        CSeq => "CSeq",
        CallId => "Call-ID",
        CallInfo => "Call-Info",
        Contact => "Contact",
        ContentDisposition => "Content-Disposition",
        ContentEncoding => "Content-Encoding",
        ContentLanguage => "Content-Language",
        ContentLength => "Content-Length",
        ContentType => "Content-Type",
        Date => "Date",
        ErrorInfo => "Error-Info",
        Event => "Event",
        Expires => "Expires",
        From => "From",
        InReplyTo => "In-Reply-To",
        MaxForwards => "Max-Forwards",
        MimeVersion => "MIME-Version",
        MinExpires => "Min-Expires",
        Organization => "Organization",
        Priority => "Priority",
        ProxyAuthenticate => "Proxy-Authenticate",
        ProxyAuthorization => "Proxy-Authorization",
        ProxyRequire => "Proxy-Require",
        RecordRoute => "Record-Route",
        ReplyTo => "Reply-To",
        Require => "Require",
        RetryAfter => "Retry-After",
        Route => "Route",
        Server => "Server",
        Subject => "Subject",
        SubscriptionState => "Subscription-State",
        Supported => "Supported",
        Timestamp => "Timestamp",
        To => "To",
        Unsupported => "Unsupported",
        UserAgent => "User-Agent",
        Via => "Via",
        Warning => "Warning",
        WwwAuthenticate => "WWW-Authenticate",
    }
}

/// The raw values of every header called `name` (ASCII case ignored, compact forms
/// included), in message order, trimmed: rsip keeps From, To, Contact, Route… as text, and
/// unknown headers as `Header::Other(name, value)`. Parse them with this module's readers.
pub fn header_values<'a, 'n>(
    headers: &'a rsip::Headers,
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    headers.iter().filter_map(move |h| {
        let (n, v) = header_name_value(h);
        same_header_name(n, name).then(|| v.trim_matches(|c| c == ' ' || c == '\t'))
    })
}

/// The first From header of a message, parsed; `Ok(None)` when absent.
pub fn from_header(headers: &rsip::Headers) -> Result<Option<FromTo>, AddressError> {
    header_values(headers, "From")
        .next()
        .map(FromTo::parse)
        .transpose()
}

/// The first To header of a message, parsed; `Ok(None)` when absent.
pub fn to_header(headers: &rsip::Headers) -> Result<Option<FromTo>, AddressError> {
    header_values(headers, "To")
        .next()
        .map(FromTo::parse)
        .transpose()
}

/// Every Contact of a message, all headers and list elements in order; `Ok(None)` when there
/// is no Contact header, `Ok(Some(Contacts::Wildcard))` for `Contact: *`.
pub fn contact_headers(headers: &rsip::Headers) -> Result<Option<Contacts>, AddressError> {
    let mut out: Option<Contacts> = None;
    for v in header_values(headers, "Contact") {
        match (Contacts::parse(v)?, &mut out) {
            (Contacts::Wildcard, _) => return Ok(Some(Contacts::Wildcard)),
            (Contacts::List(l), Some(Contacts::List(all))) => all.extend(l),
            (list, slot) => *slot = Some(list),
        }
    }
    Ok(out)
}

/// Every entry of the headers called `name` (`Route` or `Record-Route`), all headers and
/// list elements in message order.
pub fn route_headers(headers: &rsip::Headers, name: &str) -> Result<Vec<NameAddr>, AddressError> {
    let mut out = Vec::new();
    for v in header_values(headers, name) {
        out.extend(parse_routes(v)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::uri::{Host, Scheme};

    fn na(text: &str) -> NameAddr {
        NameAddr::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    const LINPHONE: &str = "<sip:alice@127.0.0.1:59754;transport=udp>;+sip.instance=\"<urn:uuid:090b314c-7132-0014-ac65-4248b341241a>\";expires=3600";
    const BARESIP: &str = "<sip:alice-0x55c1e6e12290@127.0.0.1:60710>;+sip.instance=\"<urn:uuid:c3cb8d6e-2a7e-4e37-9c32-0a2c8f0e3f1b>\";expires=120";
    const PJSUA2: &str = "<sip:bob@192.168.1.20:5060;ob>;reg-id=1;+sip.instance=\"<urn:uuid:00000000-0000-0000-0000-0000a1b2c3d4>\"";

    #[test]
    fn linphone_contact() {
        let c = Contact::parse(LINPHONE).unwrap();
        assert_eq!(c.uri().user(), Some("alice"));
        assert_eq!(c.uri().port(), Some(59754));
        assert_eq!(c.uri().transport(), Some("udp"));
        assert_eq!(
            c.instance().as_deref(),
            Some("<urn:uuid:090b314c-7132-0014-ac65-4248b341241a>")
        );
        assert_eq!(c.expires(), Some(3600));
        assert_eq!(c.to_string(), LINPHONE);
        assert!(c.display_name().is_none());
    }

    #[test]
    fn baresip_and_pjsua2_contacts() {
        let c = Contact::parse(BARESIP).unwrap();
        assert_eq!(c.uri().user(), Some("alice-0x55c1e6e12290"));
        assert_eq!(c.expires(), Some(120));
        assert!(c.instance().unwrap().starts_with("<urn:uuid:c3cb8d6e"));
        let c = Contact::parse(PJSUA2).unwrap();
        assert!(c.is_outbound());
        assert_eq!(c.reg_id(), Some(1));
        assert_eq!(c.expires(), None);
    }

    #[test]
    fn contact_lists_and_wildcard() {
        assert_eq!(Contacts::parse(" * ").unwrap(), Contacts::Wildcard);
        let list = Contacts::parse(&format!(
            "\"Mr. Watson\" <sip:watson@worcester.bell-telephone.com>;q=0.7; expires=3600, \
             \"Mr. Watson\" <mailto:watson@bell-telephone.com> ;q=0.1, {LINPHONE}"
        ))
        .unwrap();
        let cs = list.contacts();
        assert_eq!(cs.len(), 3);
        assert_eq!(cs[0].q(), Some(0.7));
        assert_eq!(cs[0].q_millis(), Some(700));
        assert_eq!(cs[0].expires(), Some(3600));
        assert_eq!(cs[0].display_name().as_deref(), Some("Mr. Watson"));
        assert_eq!(cs[1].uri().scheme(), Scheme::Other);
        assert_eq!(cs[1].q_millis(), Some(100));
        assert_eq!(cs[2].to_string(), LINPHONE);
        assert!(Contacts::parse("*, <sip:a@b>").is_err());
        assert!(Contacts::parse("<sip:a@b>,,<sip:c@d>").is_err());
        assert_eq!(Contacts::parse(""), Err(AddressError::Empty));
    }

    #[test]
    fn display_names() {
        let a = na("\"Alice \\\"A\\\" <the first>; ok\" <sip:a@b.test>;tag=9f");
        assert_eq!(
            a.display_name().as_deref(),
            Some("Alice \"A\" <the first>; ok")
        );
        assert_eq!(a.tag(), Some("9f"));
        let a = na("Alice  Smith <sip:a@b.test>");
        assert_eq!(a.display_name().as_deref(), Some("Alice  Smith"));
        let a = na("\"\" <sip:a@b.test>");
        assert_eq!(a.display_name().as_deref(), Some(""));
        let a = na("<sip:a@b.test>");
        assert_eq!(a.display_name(), None);
        let a = na("\"Zo\u{eb}\" <sip:z@b.test>");
        assert_eq!(a.display_name().as_deref(), Some("Zo\u{eb}"));
        let a = NameAddr::new(Some("Bob \"B\""), &Uri::parse("sip:b@c.test").unwrap());
        assert_eq!(a.to_string(), "\"Bob \\\"B\\\"\" <sip:b@c.test>");
        assert_eq!(na(&a.to_string()), a);
        assert_eq!(a.display_name().as_deref(), Some("Bob \"B\""));
    }

    #[test]
    fn addr_spec_params_are_header_params() {
        let a = na("sip:alice@atlanta.com;tag=1928301774");
        assert!(!a.is_name_addr());
        assert_eq!(a.uri().to_string(), "sip:alice@atlanta.com");
        assert_eq!(a.tag(), Some("1928301774"));
        let a = na("<sip:alice@atlanta.com;transport=tcp>;tag=x");
        assert_eq!(a.uri().transport(), Some("tcp"));
        assert_eq!(a.param("transport"), None);
        let a = na("tel:+1-555-123-4567;tag=t");
        assert_eq!(a.uri().scheme(), Scheme::Tel);
        assert_eq!(a.tag(), Some("t"));
    }

    #[test]
    fn ipv6_tel_and_semiuri_addresses() {
        let a = na("<sip:bob@[2001:db8::10]:5070;transport=tcp>;tag=b1");
        assert!(matches!(a.uri().host(), Some(Host::V6(_))));
        assert_eq!(a.uri().host_port_text(), Some("[2001:db8::10]:5070"));
        let a = na("\"Tel\" <tel:+1-555-123-4567;phone-context=example.com>;tag=x");
        assert_eq!(a.uri().tel_number().as_deref(), Some("+15551234567"));
        let a = na("<sip:user;par=u%40example.net@example.com>");
        assert_eq!(a.uri().user(), Some("user;par=u%40example.net"));
        let a = na("<sip:[::1]>");
        assert_eq!(a.uri().port(), None);
    }

    #[test]
    fn params_with_spaces_and_quotes() {
        let a = na("<sip:a@b.test> ; tag = x ;lr; methods=\"INVITE, BYE\";received=[2001:db8::1]");
        assert_eq!(a.tag(), Some("x"));
        assert_eq!(a.param("LR"), Some(None));
        assert_eq!(a.param("methods").flatten().as_deref(), Some("INVITE, BYE"));
        assert_eq!(
            a.param("received").flatten().as_deref(),
            Some("[2001:db8::1]")
        );
        assert_eq!(a.params().count(), 4);
        let b = a
            .without_param("tag")
            .with_param("tag", Some("new"))
            .unwrap();
        assert_eq!(b.tag(), Some("new"));
        assert_eq!(
            b.to_string(),
            "<sip:a@b.test>;lr;methods=\"INVITE, BYE\";received=[2001:db8::1];tag=new"
        );
        assert_eq!(na(&b.to_string()), b);
        let c = a.with_param("x", Some("a b")).unwrap();
        assert_eq!(c.param("x").flatten().as_deref(), Some("a b"));
        assert!(a.with_param("bad name", None).is_err());
    }

    #[test]
    fn q_values() {
        for (v, want) in [
            ("0", Some(0)),
            ("1", Some(1000)),
            ("1.000", Some(1000)),
            ("0.5", Some(500)),
            ("0.123", Some(123)),
            ("1.1", None),
            ("0.1234", None),
            ("2", None),
            (".5", None),
        ] {
            assert_eq!(na(&format!("<sip:a@b>;q={v}")).q_millis(), want, "{v}");
        }
    }

    #[test]
    fn lists_respect_quotes_and_brackets() {
        let l = parse_list("<sip:p1.test;lr>, <sip:p2.test;lr>,<sip:[::1]:5060;lr>").unwrap();
        assert_eq!(l.len(), 3);
        assert!(l[2].uri().is_loose_router());
        let l = parse_list("\"a, b\" <sip:a@b>;x=\"1,2\", sip:c@d").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].display_name().as_deref(), Some("a, b"));
        assert_eq!(l[1].uri().to_string(), "sip:c@d");
    }

    #[test]
    fn malformed_values() {
        for bad in [
            "",
            "\"unterminated <sip:a@b>",
            "\"name\" sip:a@b",
            "<sip:a@b",
            "<sip:a@b>;",
            "<sip:a@b>;=x",
            "<sip:a@b>;x=",
            "<sip:a@b> junk",
            "<sip:a@b>;x=\"open",
            "name@ <sip:a@b>",
            "<>",
            "<not a uri>",
            "sip:a@b junk",
            "Alice",
        ] {
            assert!(NameAddr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            FromTo::parse("<sip:a@b>, <sip:c@d>"),
            Err(AddressError::NotSingle)
        );
        assert!(matches!(
            NameAddr::parse("<sip:a@[::g]>"),
            Err(AddressError::Uri(UriError::InvalidIpv6(_)))
        ));
    }

    #[test]
    fn refer_to_and_identity() {
        let r = ReferTo::parse("<sip:clock@relay.test?Replaces=abc%40h%3Bto-tag%3D1>").unwrap();
        assert_eq!(r.uri().user(), Some("clock"));
        assert_eq!(r.uri().headers().count(), 1);
        let r = ReferTo::parse("sip:video@relay.test").unwrap();
        assert_eq!(r.uri().user(), Some("video"));
        let pai = parse_asserted_identity("\"Alice\" <sip:alice@relay.test>, <tel:+15551234567>")
            .unwrap();
        assert_eq!(pai.len(), 2);
        assert_eq!(pai[1].uri().scheme(), Scheme::Tel);
    }

    #[test]
    fn service_ids() {
        let s = ServiceId::parse("urn:urn-7:3gpp-service.ims.icsi.mmtel").unwrap();
        assert!(s.is_urn());
        assert_eq!(s.name(), "mmtel");
        let s = ServiceId::parse("echo;quality=hd").unwrap();
        assert_eq!((s.id(), s.name()), ("echo", "echo"));
        assert_eq!(s.param("quality").flatten().as_deref(), Some("hd"));
        let s = ServiceId::parse(" <clock> ").unwrap();
        assert_eq!(s.name(), "clock");
        assert_eq!(s.to_string(), "<clock>");
        let l = ServiceId::parse_list("urn:urn-7:3gpp-service.clock, echo").unwrap();
        assert_eq!(
            l.iter().map(ServiceId::name).collect::<Vec<_>>(),
            ["clock", "echo"]
        );
        for bad in ["", "<echo", "ec ho", "echo;", "urn:", "<>"] {
            assert!(ServiceId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_from_rsip_headers() {
        let text = format!(
            "INVITE sip:echo@relay.test SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: \"A\" <sip:a@relay.test>;tag=1\r\nTo: <sip:echo@relay.test>\r\nCall-ID: c\r\n\
CSeq: 1 INVITE\r\nContact: {LINPHONE}\r\nContact: <sip:b@[2001:db8::2]>, <sip:c@h>\r\n\
Record-Route: <sip:p1.test;lr>, <sip:[2001:db8::9];lr>\r\n\
P-Asserted-Service: urn:urn-7:3gpp-service.echo\r\nContent-Length: 0\r\n\r\n"
        );
        let req = match rsip::SipMessage::try_from(text.as_str()).unwrap() {
            rsip::SipMessage::Request(r) => r,
            _ => unreachable!(),
        };
        let h = &req.headers;
        assert_eq!(header_values(h, "contact").count(), 2);
        assert_eq!(header_values(h, "m").count(), 2);
        assert_eq!(
            header_values(h, "p-asserted-service").collect::<Vec<_>>(),
            ["urn:urn-7:3gpp-service.echo"]
        );
        assert_eq!(from_header(h).unwrap().unwrap().tag(), Some("1"));
        assert_eq!(to_header(h).unwrap().unwrap().tag(), None);
        let cs = contact_headers(h).unwrap().unwrap();
        assert_eq!(cs.contacts().len(), 3);
        assert_eq!(cs.contacts()[0].expires(), Some(3600));
        let rr = route_headers(h, "Record-Route").unwrap();
        assert_eq!(rr.len(), 2);
        assert!(matches!(rr[1].uri().host(), Some(Host::V6(_))));
        assert!(route_headers(h, "Route").unwrap().is_empty());
        assert!(same_header_name("Call-ID", "i"));
        assert!(same_header_name("f", "FROM"));
        assert!(!same_header_name("From", "To"));
    }

    /// The length shortcut decides as the plain definition does (equal ignoring case, or
    /// either is the other's compact form) over every pair of names and letters.
    #[test]
    fn same_header_name_agrees_with_its_definition() {
        let plain = |a: &str, b: &str| {
            let (a, b) = (a.trim(), b.trim());
            a.eq_ignore_ascii_case(b)
                || compact_of(a).is_some_and(|c| c.eq_ignore_ascii_case(b))
                || compact_of(b).is_some_and(|c| c.eq_ignore_ascii_case(a))
        };
        let mut names: Vec<String> = vec!["X-Custom".into(), "Max-Forwards".into(), " To ".into()];
        for letter in 'a'..='z' {
            names.push(letter.to_string());
            names.push(letter.to_ascii_uppercase().to_string());
        }
        for long in [
            "Accept-Contact",
            "Referred-By",
            "Content-Type",
            "Request-Disposition",
            "Content-Encoding",
            "From",
            "Call-ID",
            "Reject-Contact",
            "Supported",
            "Content-Length",
            "Contact",
            "Identity-Info",
            "Event",
            "Refer-To",
            "Subject",
            "To",
            "Allow-Events",
            "Via",
            "Session-Expires",
            "Identity",
        ] {
            assert!(compact_of(long).is_some(), "{long}");
            names.push(long.to_string());
            names.push(long.to_ascii_uppercase());
        }
        let mut matched = 0;
        for a in &names {
            for b in &names {
                assert_eq!(same_header_name(a, b), plain(a, b), "{a:?} {b:?}");
                matched += usize::from(same_header_name(a, b));
            }
        }
        assert!(matched > names.len(), "compact forms matched too");
        assert!(same_header_name("v", "Via") && same_header_name(" VIA", "V"));
    }

    #[test]
    fn unquote_and_quote() {
        assert_eq!(unquote("\"a\\\\b\\\"c\""), "a\\b\"c");
        assert_eq!(unquote("plain"), "plain");
        assert_eq!(unquote("\""), "\"");
        assert_eq!(quote("a\"b\\"), "\"a\\\"b\\\\\"");
    }

    /// Found by the `uri` fuzz target: RFC 4475's `intmeth` display name, escaped BEL, NUL
    /// and DEL, unquoted and quoted again by `NameAddr::new`, gave a value that did not parse.
    #[test]
    fn quote_escapes_control_characters_and_drops_line_breaks() {
        let read =
            NameAddr::parse("\"BEL:\\\x07 NUL:\\\0 DEL:\\\x7f\" <sip:a@example.com>").unwrap();
        let name = read.display_name().unwrap();
        assert_eq!(name, "BEL:\x07 NUL:\0 DEL:\x7f");
        let again = NameAddr::new(Some(&name), read.uri());
        let parsed = NameAddr::parse(again.as_str()).unwrap();
        assert_eq!(parsed.display_name().unwrap(), name);
        assert_eq!(quote("a\tb\r\nc"), "\"a\tbc\"");
        assert!(NameAddr::parse(&format!("{} <sip:a@b.test>", quote("x\r\n\0y"))).is_ok());
    }
}
