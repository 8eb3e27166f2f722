//! The wire layer in front of rsip: turns the bytes of one complete message (a UDP datagram,
//! or a frame cut by [`crate::framing`]) into an [`rsip::SipMessage`], doing what RFC 3261
//! §7.3 requires of a receiver and rsip 0.4 does not do.
//!
//! * Content-Length framing (§18.3): rsip takes every byte after the blank line as the body;
//!   here the body is trimmed to Content-Length, and a datagram whose body is shorter than its
//!   Content-Length is an error.
//! * Compact header names (§7.3.3, plus the later RFCs' letters) are expanded.
//! * Folded header lines (§7.3.1) are unfolded, whitespace before the colon is dropped, bare
//!   LF line endings are accepted.
//! * Comma-joined Via, Contact, Route and Record-Route values are split into one header each,
//!   respecting quoted strings and `<…>`.
//! * The structured headers the stack keys on (Via, From, To, Contact, Route, Record-Route,
//!   Call-ID, CSeq, Max-Forwards, Content-Length, Date) are checked against the RFC 3261
//!   grammar and written in the canonical spacing rsip's typed parsers expect, so RFC 4475's
//!   invalid messages are refused here with a reason fit for a `400`.
//! * Extension methods (rsip's `Method` is a closed enum) and methods in the wrong case are
//!   reported as [`WireError::UnknownMethod`], which [`reject`] answers with `501`.
//!
//! Fast path: a message that needs none of the rewriting above (the usual case) is checked in
//! place, without allocating, and its bytes go to rsip as they are. Only a message that needs
//! normalising is copied once into canonical form.

use bytes::Bytes;
use rsip::SipMessage;

/// The largest message the wire layer accepts, whatever the transport (1 MiB). Stream
/// transports apply their own, smaller limit while framing
/// ([`crate::framing::StreamDecoder::DEFAULT_MAX`]).
pub const MAX_MESSAGE: usize = 1 << 20;

/// The methods rsip 0.4 can represent, spelled exactly as RFC 3261 and its extensions define
/// them (methods are case-sensitive, §7.1).
const KNOWN_METHODS: [&[u8]; 14] = [
    b"ACK",
    b"BYE",
    b"CANCEL",
    b"INFO",
    b"INVITE",
    b"MESSAGE",
    b"NOTIFY",
    b"OPTIONS",
    b"PRACK",
    b"PUBLISH",
    b"REFER",
    b"REGISTER",
    b"SUBSCRIBE",
    b"UPDATE",
];

/// Compact header names (RFC 3261 §7.3.3 and the RFCs that added letters since) and the
/// names they stand for.
const COMPACT: [(u8, &str); 19] = [
    (b'a', "Accept-Contact"),
    (b'b', "Referred-By"),
    (b'c', "Content-Type"),
    (b'd', "Request-Disposition"),
    (b'e', "Content-Encoding"),
    (b'f', "From"),
    (b'i', "Call-ID"),
    (b'j', "Reject-Contact"),
    (b'k', "Supported"),
    (b'l', "Content-Length"),
    (b'm', "Contact"),
    (b'o', "Event"),
    (b'r', "Refer-To"),
    (b's', "Subject"),
    (b't', "To"),
    (b'u', "Allow-Events"),
    (b'v', "Via"),
    (b'x', "Session-Expires"),
    (b'y', "Identity"),
];

/// What is wrong with a message the wire layer refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input holds nothing but line breaks.
    #[error("no start line")]
    NoStartLine,
    /// The start line is neither `Method SP Request-URI SP SIP-Version` nor
    /// `SIP-Version SP Status-Code SP Reason-Phrase` (RFC 3261 §7.1, §7.2).
    #[error("malformed start line")]
    BadStartLine,
    /// The Request-URI is not one a request may carry (RFC 3261 §19.1.1, RFC 4475 §3.1.2.7 and
    /// §3.1.2.11).
    #[error("malformed Request-URI: {0}")]
    BadRequestUri(&'static str),
    /// A SIP version other than 2.0 (answered with `505`, RFC 3261 §8.2.2… §21.5.16).
    #[error("unsupported SIP version {0}")]
    UnsupportedVersion(String),
    /// A method rsip cannot represent: an extension method, or a known one in the wrong case
    /// (answered with `501`, RFC 3261 §8.2.1).
    #[error("unknown method {0}")]
    UnknownMethod(String),
    /// A mandatory header (RFC 3261 §8.1.1) is absent.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// A header breaks the RFC 3261 grammar, or a single-valued header is repeated.
    #[error("malformed {name} header: {reason}")]
    BadHeader {
        /// The header's (full) name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The header block is not closed by an empty line.
    #[error("header block not terminated by an empty line")]
    Truncated,
    /// The body is shorter than the Content-Length says (RFC 3261 §18.3: an error on a
    /// datagram).
    #[error("body shorter than Content-Length: {got} of {declared} bytes")]
    BodyTooShort {
        /// The Content-Length value.
        declared: usize,
        /// The bytes actually present after the blank line.
        got: usize,
    },
    /// The start line or a header holds bytes that are not UTF-8.
    #[error("header block is not UTF-8")]
    NotUtf8Headers,
    /// The message is larger than [`MAX_MESSAGE`].
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    /// The Request-URI's scheme is not one this stack serves: `sip`, `sips` and `tel`
    /// (answered with `416 Unsupported URI Scheme`, RFC 3261 §8.2.2.1, RFC 4475 §3.3.2).
    #[error("unsupported Request-URI scheme {0}")]
    UnsupportedUriScheme(String),
    /// rsip refused the normalised message.
    #[error("rsip rejected the message: {0}")]
    Rsip(String),
}

impl WireError {
    /// A short phrase saying what is wrong, for the reason phrase of the `400` (or `501`,
    /// `505`, `513`) sent back, e.g. "Bad Request: missing Call-ID" or
    /// "Malformed Via header: empty parameter".
    pub fn reason(&self) -> String {
        match self {
            WireError::NoStartLine => "Bad Request: no start line".to_string(),
            WireError::BadStartLine => "Bad Request: malformed start line".to_string(),
            WireError::BadRequestUri(why) => format!("Bad Request-URI: {why}"),
            WireError::UnsupportedVersion(_) => "Version Not Supported".to_string(),
            WireError::UnknownMethod(_) => "Not Implemented".to_string(),
            WireError::MissingHeader(name) => format!("Bad Request: missing {name}"),
            WireError::BadHeader { name, reason } => format!("Malformed {name} header: {reason}"),
            WireError::Truncated => "Bad Request: header block not terminated".to_string(),
            WireError::BodyTooShort { .. } => {
                "Bad Request: body shorter than Content-Length".to_string()
            }
            WireError::NotUtf8Headers => "Bad Request: headers are not UTF-8".to_string(),
            WireError::TooLarge => "Message Too Large".to_string(),
            WireError::UnsupportedUriScheme(_) => "Unsupported URI Scheme".to_string(),
            WireError::Rsip(_) => "Bad Request: unparseable message".to_string(),
        }
    }

    fn header(name: &str, reason: &'static str) -> WireError {
        WireError::BadHeader {
            name: name.to_string(),
            reason,
        }
    }
}

/// Parses one complete message: a UDP datagram, or a frame from
/// [`crate::framing::StreamDecoder`].
///
/// Leading CRLFs are skipped (RFC 3261 §7.5); the header block is normalised (see the module
/// documentation) and checked; the body is trimmed to Content-Length (a longer datagram is
/// truncated, a shorter one refused, §18.3; without Content-Length the body runs to the end
/// of the input); then rsip parses it. A response keeps the peer's reason phrase, which rsip
/// would drop for a known status code.
pub fn parse(bytes: &[u8]) -> Result<SipMessage, WireError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(WireError::TooLarge);
    }
    let frame = skip_leading_crlf(bytes);
    let scan = scan(frame)?;
    let available = frame.len() - scan.body_start;
    let body_len = match scan.content_length {
        Some(declared) if declared > available => {
            return Err(WireError::BodyTooShort {
                declared,
                got: available,
            })
        }
        Some(declared) => declared,
        None => available,
    };
    if let Start::Request { method, .. } = scan.start {
        if !is_known_method(method) {
            return Err(WireError::UnknownMethod(
                String::from_utf8_lossy(method).into_owned(),
            ));
        }
    }
    if let Some(err) = scan.problem {
        return Err(err);
    }
    let carried_uri = match scan.start {
        Start::Request { uri, .. } => Some(served_request_uri(uri)?),
        Start::Response { .. } => None,
    };
    let end = scan.body_start + body_len;
    let canonical;
    let input = if scan.rewrite {
        canonical = rewrite(frame, &scan, body_len)?;
        canonical.as_slice()
    } else {
        frame.get(..end).unwrap_or(frame)
    };
    let mut msg = match carried_uri {
        // rsip cannot model this Request-URI: it reads the message with a stand-in one,
        // and the request then carries the URI as written (see [`crate::uri::rsip_carrier`]).
        Some(Some(text)) => {
            let mut req = parse_with_stand_in_uri(input)?;
            req.uri = crate::uri::rsip_carrier(text);
            SipMessage::Request(req)
        }
        _ => SipMessage::try_from(input).map_err(|e| WireError::Rsip(truncate(e.to_string())))?,
    };
    if let (SipMessage::Response(resp), Start::Response { code, reason, .. }) =
        (&mut msg, &scan.start)
    {
        let phrase = std::str::from_utf8(reason).unwrap_or_default();
        resp.status_code = crate::message::status(*code, Some(phrase));
    }
    Ok(msg)
}

/// When [`parse`] failed on a request whose start line and Via are readable, the raw
/// response to send back: `501 Not Implemented` for an unknown method, `505` for another SIP
/// version, `513` for an oversized message, otherwise `400` with [`WireError::reason`] as its
/// phrase. It is built from the request's raw Via, From, To, Call-ID and CSeq lines (RFC 3261
/// §8.2.6.1), adds a To tag when there is none, and carries `Content-Length: 0`.
///
/// `None` when there is not enough to answer: no start line, no Via, a response (never
/// answered), or an ACK (never answered, §17.2.1). The caller then drops and counts.
pub fn reject(bytes: &[u8], err: &WireError) -> Option<Bytes> {
    let frame = skip_leading_crlf(bytes);
    let line_end = find(frame, b'\n').unwrap_or(frame.len());
    let start = strip_cr(frame.get(..line_end)?);
    if is_status_line(start) {
        return None;
    }
    let method_len = start.iter().take_while(|&&b| is_token(b)).count();
    if method_len == 0 || start.get(method_len) != Some(&b' ') || start.get(..method_len)? == b"ACK"
    {
        return None;
    }
    let (code, phrase) = match err {
        WireError::NoStartLine => return None,
        WireError::UnknownMethod(_) => (501, "Not Implemented".to_string()),
        WireError::UnsupportedVersion(_) => (505, "Version Not Supported".to_string()),
        WireError::TooLarge => (513, "Message Too Large".to_string()),
        WireError::UnsupportedUriScheme(_) => (416, "Unsupported URI Scheme".to_string()),
        other => (400, other.reason()),
    };

    let headers = header_block(frame.get(line_end + 1..).unwrap_or_default());
    let mut vias: Vec<&[u8]> = Vec::new();
    let (mut from, mut to, mut call_id, mut cseq) = (None, None, None, None);
    for line in Lines::new(headers).flatten() {
        let (full, _) = classify(line.name);
        let slot = match full {
            "Via" => {
                vias.push(line.value);
                continue;
            }
            "From" => &mut from,
            "To" => &mut to,
            "Call-ID" => &mut call_id,
            "CSeq" => &mut cseq,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(line.value);
        }
    }
    if vias.is_empty() {
        return None;
    }

    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(
        format!("SIP/2.0 {code} {}\r\n", phrase.replace(['\r', '\n'], " ")).as_bytes(),
    );
    for via in vias {
        put_header(&mut out, "Via", via);
    }
    if let Some(from) = from {
        put_header(&mut out, "From", from);
    }
    if let Some(to) = to {
        let mut value = Vec::with_capacity(to.len() + 20);
        unfold_into(to, &mut value);
        if !has_tag_param(&value) {
            value.extend_from_slice(b";tag=");
            value.extend_from_slice(crate::message::new_tag().as_bytes());
        }
        put_header(&mut out, "To", &value);
    }
    if let Some(call_id) = call_id {
        put_header(&mut out, "Call-ID", call_id);
    }
    if let Some(cseq) = cseq {
        put_header(&mut out, "CSeq", cseq);
    }
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    Some(Bytes::from(out))
}

/// rsip's errors quote the whole message; keep the start of it for logs.
fn truncate(mut text: String) -> String {
    const KEEP: usize = 160;
    if text.len() > KEEP {
        let mut end = KEEP;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn put_header(out: &mut Vec<u8>, name: &str, raw_value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    unfold_into(raw_value, out);
    out.extend_from_slice(b"\r\n");
}

/// The header block of a possibly malformed message: up to the first empty line, or all of it.
fn header_block(after_start: &[u8]) -> &[u8] {
    let mut pos = 0;
    while let Some(rel) = find(after_start.get(pos..).unwrap_or_default(), b'\n') {
        let end = pos + rel;
        if strip_cr(after_start.get(pos..end).unwrap_or_default()).is_empty() {
            return after_start.get(..pos).unwrap_or_default();
        }
        pos = end + 1;
    }
    after_start
}

/// Whether a To value (unfolded) carries a `tag` header parameter.
fn has_tag_param(value: &[u8]) -> bool {
    // Header parameters follow the closing `>` of a name-addr, or the URI of an addr-spec.
    let params_from = match top_level_position(value, b'>') {
        Some(gt) => gt + 1,
        None => 0,
    };
    value
        .get(params_from..)
        .unwrap_or_default()
        .split(|&b| b == b';')
        .skip(1)
        .any(|param| {
            let name = param.split(|&b| b == b'=').next().unwrap_or_default();
            trim_lws(name).eq_ignore_ascii_case(b"tag")
        })
}

// ---------------------------------------------------------------------------------------
// Scanning

/// The parsed start line.
#[derive(Debug, Clone, Copy)]
enum Start<'a> {
    Request {
        method: &'a [u8],
        uri: &'a [u8],
    },
    Response {
        code: u16,
        code_digits: &'a [u8],
        reason: &'a [u8],
    },
}

/// What one pass over a message found.
struct Scan<'a> {
    start: Start<'a>,
    /// The header lines (after the start line, before the empty line).
    headers: &'a [u8],
    /// Where the body starts in the frame.
    body_start: usize,
    content_length: Option<usize>,
    /// Whether the message must be rewritten into canonical form before rsip sees it.
    rewrite: bool,
    /// The first grammar problem found in a header; reported after framing errors and after
    /// an unknown method.
    problem: Option<WireError>,
}

/// The headers the wire layer checks and normalises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Via,
    From,
    To,
    Contact,
    Route,
    RecordRoute,
    CallId,
    CSeq,
    MaxForwards,
    ContentLength,
    Date,
    Other,
}

impl Kind {
    fn of(full_name: &str) -> Kind {
        match full_name {
            "Via" => Kind::Via,
            "From" => Kind::From,
            "To" => Kind::To,
            "Contact" => Kind::Contact,
            "Route" => Kind::Route,
            "Record-Route" => Kind::RecordRoute,
            "Call-ID" => Kind::CallId,
            "CSeq" => Kind::CSeq,
            "Max-Forwards" => Kind::MaxForwards,
            "Content-Length" => Kind::ContentLength,
            "Date" => Kind::Date,
            _ => Kind::Other,
        }
    }

    /// Headers whose values may be joined by commas (RFC 3261 §7.3.1) and are split here.
    fn splits(self) -> bool {
        matches!(
            self,
            Kind::Via | Kind::Contact | Kind::Route | Kind::RecordRoute
        )
    }
}

const KNOWN_NAMES: [&str; 11] = [
    "Via",
    "From",
    "To",
    "Contact",
    "Route",
    "Record-Route",
    "Call-ID",
    "CSeq",
    "Max-Forwards",
    "Content-Length",
    "Date",
];

/// The full name of a header (compact forms expanded; the names the wire layer checks in
/// their canonical spelling) and whether it was written in compact form. Other names come
/// back as "" (use the raw name).
fn classify(name: &[u8]) -> (&'static str, bool) {
    if let [letter] = name {
        let letter = letter.to_ascii_lowercase();
        if let Some((_, full)) = COMPACT.iter().find(|(c, _)| *c == letter) {
            return (full, true);
        }
    }
    for known in KNOWN_NAMES {
        if name.eq_ignore_ascii_case(known.as_bytes()) {
            return (known, false);
        }
    }
    ("", false)
}

fn scan(frame: &[u8]) -> Result<Scan<'_>, WireError> {
    if frame.is_empty() {
        return Err(WireError::NoStartLine);
    }
    let line_end = find(frame, b'\n');
    let raw_start = frame
        .get(..line_end.unwrap_or(frame.len()))
        .unwrap_or_default();
    let start_line = strip_cr(raw_start);
    let (start, start_canonical) = parse_start_line(start_line)?;
    let line_end = line_end.ok_or(WireError::Truncated)?;
    let mut rewrite = !start_canonical || raw_start.len() == start_line.len();

    // Find the empty line that closes the header block.
    let headers_start = line_end + 1;
    let mut pos = headers_start;
    let (headers_end, body_start) = loop {
        let rel = find(frame.get(pos..).unwrap_or_default(), b'\n').ok_or(WireError::Truncated)?;
        let end = pos + rel;
        if end == 0 || frame.get(end - 1) != Some(&b'\r') {
            rewrite = true; // bare LF
        }
        if strip_cr(frame.get(pos..end).unwrap_or_default()).is_empty() {
            break (pos, end + 1);
        }
        pos = end + 1;
    };
    let head = frame.get(..body_start).unwrap_or_default();
    if std::str::from_utf8(head).is_err() {
        return Err(WireError::NotUtf8Headers);
    }

    let mut scan = Scan {
        start,
        headers: frame.get(headers_start..headers_end).unwrap_or_default(),
        body_start,
        content_length: None,
        rewrite,
        problem: None,
    };
    let mut counts = [0usize; 11];
    for line in Lines::new(scan.headers) {
        let line = line.map_err(|bad| WireError::BadHeader {
            name: header_name_for_error(bad),
            reason: "not a header line",
        })?;
        let (full, compact) = classify(line.name);
        if compact || line.ws_before_colon || line.folded {
            scan.rewrite = true;
        }
        let kind = Kind::of(full);
        if let Some(i) = KNOWN_NAMES.iter().position(|n| *n == full) {
            counts[i] += if kind.splits() { 0 } else { 1 };
        }
        check_header(&mut scan, kind, full, line.value, &mut counts)?;
    }
    for (i, name) in KNOWN_NAMES.iter().enumerate() {
        let required = matches!(*name, "Via" | "From" | "To" | "Call-ID" | "CSeq");
        if required && counts[i] == 0 {
            scan.note(WireError::MissingHeader(name));
        }
        let single = matches!(
            *name,
            "From" | "To" | "Call-ID" | "CSeq" | "Max-Forwards" | "Date"
        );
        if single && counts[i] > 1 {
            scan.note(WireError::header(name, "repeated"));
        }
    }
    Ok(scan)
}

impl Scan<'_> {
    fn note(&mut self, err: WireError) {
        if self.problem.is_none() {
            self.problem = Some(err);
        }
    }
}

/// Checks one header in place (without allocating) and notes whether it is canonical.
fn check_header(
    scan: &mut Scan<'_>,
    kind: Kind,
    name: &'static str,
    value: &[u8],
    counts: &mut [usize; 11],
) -> Result<(), WireError> {
    match kind {
        Kind::Other => {
            if value.contains(&b'\r') {
                // A CR that is not part of a fold would end the line early for rsip.
                let mut c = Cur::new(value);
                while let Some(b) = c.peek() {
                    if b == b'\r' || b == b'\n' {
                        if !c.lws() {
                            return Err(WireError::BadHeader {
                                name: "header".to_string(),
                                reason: "stray line break",
                            });
                        }
                    } else {
                        c.i += 1;
                    }
                }
            }
            Ok(())
        }
        Kind::ContentLength => {
            let mut same = Same::new(value);
            let length = canon_number(value, &mut same, MAX_MESSAGE as u64)
                .map_err(|reason| WireError::header(name, reason))?;
            let length = usize::try_from(length).unwrap_or(usize::MAX);
            match scan.content_length {
                Some(previous) if previous != length => {
                    return Err(WireError::header(name, "conflicting values"))
                }
                _ => scan.content_length = Some(length),
            }
            if !same.finish() {
                scan.rewrite = true;
            }
            Ok(())
        }
        _ if kind.splits() => {
            let mut elements = 0;
            for element in split_top_level(value) {
                elements += 1;
                let mut same = Same::new(element);
                match canon_element(kind, element, &mut same) {
                    Ok(()) if !same.finish() => scan.rewrite = true,
                    Ok(()) => {}
                    Err(reason) => scan.note(WireError::header(name, reason)),
                }
            }
            if elements > 1 {
                scan.rewrite = true;
            }
            if let Some(i) = KNOWN_NAMES.iter().position(|n| *n == name) {
                counts[i] += elements;
            }
            Ok(())
        }
        _ => {
            let mut same = Same::new(value);
            match canon_element(kind, value, &mut same) {
                Ok(()) => {
                    if !same.finish() {
                        scan.rewrite = true;
                    }
                    if kind == Kind::CSeq {
                        check_cseq_method(scan, value);
                    }
                }
                Err(reason) => scan.note(WireError::header(name, reason)),
            }
            Ok(())
        }
    }
}

/// RFC 3261 §8.2 / RFC 4475 §3.1.2.17: the CSeq method must be the request's method.
fn check_cseq_method(scan: &mut Scan<'_>, value: &[u8]) {
    if let Start::Request { method, .. } = scan.start {
        let mut c = Cur::new(value);
        c.lws();
        c.take_while(|b| b.is_ascii_digit());
        c.lws();
        let cseq_method = c.take_while(is_token);
        if cseq_method != method && is_known_method(method) {
            scan.note(WireError::header(
                "CSeq",
                "method does not match the request line",
            ));
        }
    }
}

/// Emits the canonical form of one (comma-split) value of a checked header.
fn canon_element(kind: Kind, value: &[u8], out: &mut impl Out) -> Result<(), &'static str> {
    match kind {
        Kind::Via => canon_via(value, out),
        Kind::From | Kind::To | Kind::Contact | Kind::Route | Kind::RecordRoute => {
            canon_address(kind, value, out)
        }
        Kind::CallId => canon_call_id(value, out),
        Kind::CSeq => canon_cseq(value, out),
        Kind::MaxForwards => canon_number(value, out, 255).map(|_| ()),
        Kind::ContentLength => canon_number(value, out, MAX_MESSAGE as u64).map(|_| ()),
        Kind::Date => canon_date(value, out),
        Kind::Other => {
            unfold_into_out(value, out);
            Ok(())
        }
    }
}

fn header_name_for_error(line: &[u8]) -> String {
    let name: Vec<u8> = line
        .iter()
        .copied()
        .take_while(|&b| is_token(b))
        .take(64)
        .collect();
    if name.is_empty() {
        "header".to_string()
    } else {
        String::from_utf8_lossy(&name).into_owned()
    }
}

/// Parses a start line; also says whether it is already in the form rsip accepts.
fn parse_start_line(line: &[u8]) -> Result<(Start<'_>, bool), WireError> {
    if line.is_empty() {
        return Err(WireError::NoStartLine);
    }
    if is_status_line(line) {
        let sp = find(line, b' ').ok_or(WireError::BadStartLine)?;
        let (version, rest) = (
            line.get(..sp).unwrap_or_default(),
            line.get(sp + 1..).unwrap_or_default(),
        );
        let version_canonical = check_version(version)?;
        let digits = rest.get(..3).ok_or(WireError::BadStartLine)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(WireError::BadStartLine);
        }
        let code = digits
            .iter()
            .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
        if !(100..=699).contains(&code) {
            return Err(WireError::BadStartLine);
        }
        let reason = match rest.get(3) {
            None => &[][..],
            Some(b' ') => rest.get(4..).unwrap_or_default(),
            Some(_) => return Err(WireError::BadStartLine),
        };
        if reason.iter().any(|&b| b == b'\r' || b == b'\n') {
            return Err(WireError::BadStartLine);
        }
        let canonical = version_canonical && rest.len() > 3;
        return Ok((
            Start::Response {
                code,
                code_digits: digits,
                reason,
            },
            canonical,
        ));
    }
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(WireError::BadStartLine);
    };
    if method.is_empty() || !method.iter().all(|&b| is_token(b)) || uri.is_empty() {
        return Err(WireError::BadStartLine);
    }
    let version_canonical = check_version(version)?;
    check_request_uri(uri)?;
    Ok((Start::Request { method, uri }, version_canonical))
}

fn is_status_line(line: &[u8]) -> bool {
    line.get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
}

/// `Ok(true)` for `SIP/2.0`, `Ok(false)` for a differently cased `sip/2.0` (accepted, RFC 3261
/// §7.1 makes it case-insensitive), `UnsupportedVersion` for another `SIP/x.y`.
fn check_version(version: &[u8]) -> Result<bool, WireError> {
    if version == b"SIP/2.0" {
        return Ok(true);
    }
    if version.eq_ignore_ascii_case(b"SIP/2.0") {
        return Ok(false);
    }
    let numbers = version
        .get(..4)
        .filter(|p| p.eq_ignore_ascii_case(b"SIP/"))
        .and_then(|_| version.get(4..));
    match numbers {
        Some(n) => {
            let mut halves = n.split(|&b| b == b'.');
            let ok = matches!(
                (halves.next(), halves.next(), halves.next()),
                (Some(a), Some(b), None)
                    if !a.is_empty() && !b.is_empty()
                        && a.iter().chain(b).all(u8::is_ascii_digit)
            );
            if ok {
                Err(WireError::UnsupportedVersion(
                    String::from_utf8_lossy(version).into_owned(),
                ))
            } else {
                Err(WireError::BadStartLine)
            }
        }
        None => Err(WireError::BadStartLine),
    }
}

fn check_request_uri(uri: &[u8]) -> Result<(), WireError> {
    if uri.first() == Some(&b'<') {
        return Err(WireError::BadRequestUri("enclosed in <>"));
    }
    if uri
        .iter()
        .any(|&b| b <= b' ' || b == 0x7f || b == b'<' || b == b'>' || b == b'"')
    {
        return Err(WireError::BadRequestUri("illegal character"));
    }
    let scheme = uri_scheme(uri).ok_or(WireError::BadRequestUri("no scheme"))?;
    if scheme.eq_ignore_ascii_case(b"sip") || scheme.eq_ignore_ascii_case(b"sips") {
        // RFC 3261 §19.1.1: headers are not allowed in a Request-URI. `?` may appear in the
        // user part, so look only after the userinfo.
        let after_scheme = uri.get(scheme.len() + 1..).unwrap_or_default();
        let host_part = match find(after_scheme, b'@') {
            Some(at) => after_scheme.get(at + 1..).unwrap_or_default(),
            None => after_scheme,
        };
        if host_part.contains(&b'?') {
            return Err(WireError::BadRequestUri("headers are not allowed"));
        }
        if host_part.is_empty() {
            return Err(WireError::BadRequestUri("no host"));
        }
    }
    Ok(())
}

/// Checks that the Request-URI has a scheme this stack serves (`sip`, `sips`, `tel`), and
/// says whether rsip 0.4 can model it: `Ok(None)` when rsip reads it itself (the usual case,
/// decided from its bytes without parsing twice), `Ok(Some(text))` when the request must
/// carry it as written (a `tel:` URI, an IPv6 reference, a user part holding `;` as in RFC
/// 4475's `semiuri`). Such a URI is read by sip-core's own parser ([`crate::uri`]) here; a
/// URI it refuses is a `400`.
fn served_request_uri(uri: &[u8]) -> Result<Option<&str>, WireError> {
    let scheme = uri_scheme(uri).ok_or(WireError::BadRequestUri("no scheme"))?;
    let sip = scheme.eq_ignore_ascii_case(b"sip") || scheme.eq_ignore_ascii_case(b"sips");
    if !sip && !scheme.eq_ignore_ascii_case(b"tel") {
        return Err(WireError::UnsupportedUriScheme(
            String::from_utf8_lossy(scheme).into_owned(),
        ));
    }
    if sip && rsip_models(uri) {
        return Ok(None);
    }
    let text = std::str::from_utf8(uri).map_err(|_| WireError::NotUtf8Headers)?;
    crate::uri::Uri::parse(text).map_err(|_| WireError::BadRequestUri("malformed"))?;
    Ok(Some(text))
}

/// Whether rsip 0.4 reads this `sip`/`sips` URI right: no IPv6 reference, and no `;` in its
/// user part (rsip ends the user part there).
fn rsip_models(uri: &[u8]) -> bool {
    if uri.contains(&b'[') {
        return false;
    }
    match find(uri, b'@') {
        Some(at) => !uri.get(..at).unwrap_or_default().contains(&b';'),
        None => true,
    }
}

/// Parses a request whose Request-URI rsip cannot model: the start line is read with a
/// stand-in URI, which the caller replaces. The start line was checked by [`scan`] already.
fn parse_with_stand_in_uri(input: &[u8]) -> Result<rsip::Request, WireError> {
    let line_end = find(input, b'\n').ok_or(WireError::BadStartLine)?;
    let line = strip_cr(input.get(..line_end).unwrap_or_default());
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(_uri), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(WireError::BadStartLine);
    };
    let mut stand_in = Vec::with_capacity(input.len() + 32);
    stand_in.extend_from_slice(method);
    stand_in.extend_from_slice(b" sip:stand-in.invalid ");
    stand_in.extend_from_slice(version);
    stand_in.extend_from_slice(b"\r\n");
    stand_in.extend_from_slice(input.get(line_end + 1..).unwrap_or_default());
    match SipMessage::try_from(stand_in.as_slice()) {
        Ok(SipMessage::Request(req)) => Ok(req),
        Ok(SipMessage::Response(_)) => Err(WireError::BadStartLine),
        Err(e) => Err(WireError::Rsip(truncate(e.to_string()))),
    }
}

/// The scheme of an absolute URI (RFC 3986 §3.1), if it has one.
fn uri_scheme(uri: &[u8]) -> Option<&[u8]> {
    let colon = find(uri, b':')?;
    let scheme = uri.get(..colon)?;
    let first = *scheme.first()?;
    let rest_ok = scheme
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
    let has_more = uri.len() > colon + 1;
    (first.is_ascii_alphabetic() && rest_ok && has_more).then_some(scheme)
}

fn is_known_method(method: &[u8]) -> bool {
    KNOWN_METHODS.contains(&method)
}

// ---------------------------------------------------------------------------------------
// Rewriting

/// Writes the message in canonical form: one header per line, full names, no folding, one
/// value per Via/Contact/Route/Record-Route header, canonical spacing in the checked headers,
/// CRLF everywhere, and the body trimmed to `body_len`.
fn rewrite(frame: &[u8], scan: &Scan<'_>, body_len: usize) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(frame.len() + 64);
    match scan.start {
        Start::Request { method, uri } => {
            out.extend_from_slice(method);
            out.push(b' ');
            out.extend_from_slice(uri);
            out.extend_from_slice(b" SIP/2.0\r\n");
        }
        Start::Response {
            code_digits,
            reason,
            ..
        } => {
            out.extend_from_slice(b"SIP/2.0 ");
            out.extend_from_slice(code_digits);
            out.push(b' ');
            out.extend_from_slice(reason);
            out.extend_from_slice(b"\r\n");
        }
    }
    for line in Lines::new(scan.headers) {
        let line = line.map_err(|bad| WireError::BadHeader {
            name: header_name_for_error(bad),
            reason: "not a header line",
        })?;
        let (full, _) = classify(line.name);
        let name: &[u8] = if full.is_empty() {
            line.name
        } else {
            full.as_bytes()
        };
        let kind = Kind::of(full);
        if kind.splits() {
            for element in split_top_level(line.value) {
                out.extend_from_slice(name);
                out.extend_from_slice(b": ");
                canon_element(kind, element, &mut out)
                    .map_err(|reason| WireError::header(full, reason))?;
                out.extend_from_slice(b"\r\n");
            }
        } else {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            canon_element(kind, line.value, &mut out)
                .map_err(|reason| WireError::header(full, reason))?;
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    let body = frame
        .get(scan.body_start..scan.body_start + body_len)
        .unwrap_or_default();
    out.extend_from_slice(body);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Header lines

/// One logical header line: name, and value (leading whitespace skipped; folds and trailing
/// whitespace still in it).
struct Line<'a> {
    name: &'a [u8],
    value: &'a [u8],
    ws_before_colon: bool,
    folded: bool,
}

/// The logical lines of a header block (continuation lines joined). A line that is not
/// `token *WSP ":" value` comes back as `Err(line)`.
struct Lines<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Lines<'a> {
    fn new(s: &'a [u8]) -> Self {
        Lines { s, i: 0 }
    }
}

impl<'a> Iterator for Lines<'a> {
    type Item = Result<Line<'a>, &'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.i >= self.s.len() {
            return None;
        }
        let start = self.i;
        let mut from = start;
        let mut folded = false;
        let end = loop {
            match find(self.s.get(from..).unwrap_or_default(), b'\n') {
                None => {
                    self.i = self.s.len();
                    break self.s.len();
                }
                Some(rel) => {
                    let nl = from + rel;
                    if self.s.get(nl + 1).is_some_and(|&b| is_wsp(b)) {
                        folded = true;
                        from = nl + 1;
                        continue;
                    }
                    self.i = nl + 1;
                    break nl;
                }
            }
        };
        let logical = strip_cr(self.s.get(start..end).unwrap_or_default());
        let name_len = logical.iter().take_while(|&&b| is_token(b)).count();
        let after_name = logical.get(name_len..).unwrap_or_default();
        let ws = after_name.iter().take_while(|&&b| is_wsp(b)).count();
        if name_len == 0 || after_name.get(ws) != Some(&b':') {
            return Some(Err(logical));
        }
        let mut c = Cur::new(after_name.get(ws + 1..).unwrap_or_default());
        c.lws();
        Some(Ok(Line {
            name: logical.get(..name_len).unwrap_or_default(),
            value: c.rest(),
            ws_before_colon: ws > 0,
            folded,
        }))
    }
}

/// Splits a header value at the commas that separate values (RFC 3261 §7.3.1), not those
/// inside quoted strings or `<…>`.
fn split_top_level(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let current = rest?;
        match top_level_position(current, b',') {
            Some(comma) => {
                rest = current.get(comma + 1..);
                current.get(..comma)
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// The first position of `target` outside quoted strings and (unless looking for `>`)
/// outside `<…>`.
fn top_level_position(value: &[u8], target: u8) -> Option<usize> {
    let mut in_quotes = false;
    let mut in_angle = false;
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        if in_quotes {
            match b {
                b'\\' => i += 1,
                b'"' => in_quotes = false,
                _ => {}
            }
        } else if b == target && (!in_angle || target == b'>') {
            return Some(i);
        } else {
            match b {
                b'"' => in_quotes = true,
                b'<' => in_angle = true,
                b'>' => in_angle = false,
                _ => {}
            }
        }
        i += 1;
    }
    None
}

// ---------------------------------------------------------------------------------------
// The grammar of the checked headers (RFC 3261 §25.1), each written as a function that
// checks a value and emits its canonical form into an `Out`: a `Vec<u8>` when rewriting, a
// `Same` (which only compares) when checking in place.

/// Where canonical forms are written.
trait Out {
    fn put(&mut self, bytes: &[u8]);
    fn byte(&mut self, b: u8) {
        self.put(std::slice::from_ref(&b));
    }
}

impl Out for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// An `Out` that only checks whether the canonical form equals the original bytes.
struct Same<'a> {
    orig: &'a [u8],
    pos: usize,
    same: bool,
}

impl<'a> Same<'a> {
    fn new(orig: &'a [u8]) -> Self {
        Same {
            orig,
            pos: 0,
            same: true,
        }
    }

    fn finish(&self) -> bool {
        self.same && self.pos == self.orig.len()
    }
}

impl Out for Same<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if self.same {
            match self.orig.get(self.pos..self.pos + bytes.len()) {
                Some(o) if o == bytes => self.pos += bytes.len(),
                _ => self.same = false,
            }
        }
    }
}

/// A cursor over a header value.
struct Cur<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    fn new(s: &'a [u8]) -> Self {
        Cur { s, i: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn rest(&self) -> &'a [u8] {
        self.s.get(self.i..).unwrap_or_default()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// Skips linear whitespace (RFC 3261 §25.1: `[*WSP CRLF] 1*WSP`, bare LF tolerated);
    /// says whether there was any.
    fn lws(&mut self) -> bool {
        let start = self.i;
        loop {
            match self.peek() {
                Some(b' ' | b'\t') => self.i += 1,
                Some(b'\r')
                    if self.s.get(self.i + 1) == Some(&b'\n')
                        && self.s.get(self.i + 2).is_some_and(|&b| is_wsp(b)) =>
                {
                    self.i += 3
                }
                Some(b'\n') if self.s.get(self.i + 1).is_some_and(|&b| is_wsp(b)) => self.i += 2,
                _ => break,
            }
        }
        self.i > start
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a [u8] {
        let start = self.i;
        while let Some(b) = self.peek() {
            if !f(b) {
                break;
            }
            self.i += 1;
        }
        self.s.get(start..self.i).unwrap_or_default()
    }
}

/// RFC 3261 §25.1 `token` characters.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `Via: sent-protocol LWS sent-by *( SEMI via-params )` (§20.42), canonically
/// `SIP/2.0/UDP host:port;name=value`.
fn canon_via(value: &[u8], out: &mut impl Out) -> Result<(), &'static str> {
    let mut c = Cur::new(value);
    c.lws();
    let protocol = c.take_while(is_token);
    if protocol.is_empty() {
        return Err("missing sent-protocol");
    }
    out.put(protocol);
    for _ in 0..2 {
        c.lws();
        if !c.eat(b'/') {
            return Err("malformed sent-protocol");
        }
        c.lws();
        let part = c.take_while(is_token);
        if part.is_empty() {
            return Err("malformed sent-protocol");
        }
        out.byte(b'/');
        out.put(part);
    }
    if !c.lws() {
        return Err("missing sent-by");
    }
    out.byte(b' ');
    host(&mut c, out)?;
    c.lws();
    if c.eat(b':') {
        c.lws();
        port(&mut c, out)?;
    }
    params(&mut c, out)
}

/// `host = hostname / IPv4address / IPv6reference`.
fn host(c: &mut Cur<'_>, out: &mut impl Out) -> Result<(), &'static str> {
    if c.peek() == Some(b'[') {
        return ipv6_reference(c, out);
    }
    let name = c.take_while(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if name.is_empty() {
        return Err("malformed host");
    }
    out.put(name);
    Ok(())
}

fn ipv6_reference(c: &mut Cur<'_>, out: &mut impl Out) -> Result<(), &'static str> {
    let start = c.i;
    c.eat(b'[');
    let inner = c.take_while(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    if inner.is_empty() || !c.eat(b']') {
        return Err("malformed IPv6 reference");
    }
    out.put(c.s.get(start..c.i).unwrap_or_default());
    Ok(())
}

fn port(c: &mut Cur<'_>, out: &mut impl Out) -> Result<(), &'static str> {
    let digits = c.take_while(|b| b.is_ascii_digit());
    let value = digits.iter().try_fold(0u32, |acc, d| {
        let v = acc * 10 + u32::from(d - b'0');
        (v <= 65_535).then_some(v)
    });
    if digits.is_empty() || value.is_none() {
        return Err("malformed port");
    }
    out.byte(b':');
    out.put(digits);
    Ok(())
}

/// `*( SEMI generic-param )`, `generic-param = token [ EQUAL gen-value ]`,
/// `gen-value = token / host / quoted-string`; canonically `;name=value`.
fn params(c: &mut Cur<'_>, out: &mut impl Out) -> Result<(), &'static str> {
    loop {
        c.lws();
        if c.at_end() {
            return Ok(());
        }
        if !c.eat(b';') {
            return Err("unexpected character");
        }
        c.lws();
        let name = c.take_while(is_token);
        if name.is_empty() {
            return Err("empty parameter");
        }
        out.byte(b';');
        out.put(name);
        c.lws();
        if c.eat(b'=') {
            c.lws();
            out.byte(b'=');
            match c.peek() {
                Some(b'"') => quoted_string(c, out)?,
                Some(b'[') => ipv6_reference(c, out)?,
                _ => {
                    // A token, or a bare IPv6 address (`received=2001:db8::9`, `::1`:
                    // RFC 3261 §20.42 via-received, RFC 5118 §4.5).
                    let v = c.take_while(|b| is_token(b) || b == b':');
                    if v.is_empty() {
                        return Err("empty parameter value");
                    }
                    if v.contains(&b':')
                        && std::str::from_utf8(v)
                            .ok()
                            .and_then(|t| t.parse::<std::net::Ipv6Addr>().ok())
                            .is_none()
                    {
                        return Err("malformed parameter value");
                    }
                    out.put(v);
                }
            }
        }
    }
}

/// `quoted-string = DQUOTE *(qdtext / quoted-pair) DQUOTE`, emitted as is (folds become SP).
fn quoted_string(c: &mut Cur<'_>, out: &mut impl Out) -> Result<(), &'static str> {
    if !c.eat(b'"') {
        return Err("expected quoted string");
    }
    out.byte(b'"');
    loop {
        match c.peek() {
            None => return Err("unterminated quoted string"),
            Some(b'"') => {
                c.i += 1;
                out.byte(b'"');
                return Ok(());
            }
            Some(b'\\') => match c.s.get(c.i + 1) {
                Some(&b) if b != b'\r' && b != b'\n' => {
                    out.put(&[b'\\', b]);
                    c.i += 2;
                }
                _ => return Err("malformed quoted string"),
            },
            Some(b'\r' | b'\n') => {
                if c.lws() {
                    out.byte(b' ');
                } else {
                    return Err("line break in quoted string");
                }
            }
            Some(b) => {
                out.byte(b);
                c.i += 1;
            }
        }
    }
}

/// From, To, Contact, Route, Record-Route (§20.10, §20.20, §20.30, §20.34, §20.39):
/// `( name-addr / addr-spec ) *( SEMI param )`, with `name-addr = [ display-name ] LAQUOT
/// addr-spec RAQUOT` and `display-name = *(token LWS) / quoted-string`. Canonically
/// `display <uri>;name=value` or `uri;name=value`. Contact may be `*`; Route and
/// Record-Route must be name-addr.
fn canon_address(kind: Kind, value: &[u8], out: &mut impl Out) -> Result<(), &'static str> {
    let mut c = Cur::new(value);
    c.lws();
    if kind == Kind::Contact && c.peek() == Some(b'*') {
        c.i += 1;
        c.lws();
        if !c.at_end() {
            return Err("unexpected characters after *");
        }
        out.byte(b'*');
        return Ok(());
    }
    let name_addr = top_level_position(value, b'<').is_some();
    if c.peek() == Some(b'"') {
        quoted_string(&mut c, out)?;
        c.lws();
        if c.peek() != Some(b'<') {
            return Err("display name not followed by <URI>");
        }
        out.byte(b' ');
    } else if name_addr {
        let mut words = 0;
        loop {
            c.lws();
            if c.peek() == Some(b'<') {
                break;
            }
            let word = c.take_while(is_token);
            if word.is_empty() {
                return Err("display name is neither tokens nor a quoted string");
            }
            if words > 0 {
                out.byte(b' ');
            }
            out.put(word);
            words += 1;
        }
        if words > 0 {
            out.byte(b' ');
        }
    }
    if c.eat(b'<') {
        let uri = c.take_while(|b| b > b' ' && b != 0x7f && b != b'>' && b != b'<' && b != b'"');
        if !c.eat(b'>') {
            return Err(if c.peek().is_some_and(|b| b <= b' ') {
                "whitespace inside <URI>"
            } else {
                "unterminated <URI>"
            });
        }
        check_uri(uri)?;
        out.byte(b'<');
        out.put(uri);
        out.byte(b'>');
    } else {
        if matches!(kind, Kind::Route | Kind::RecordRoute) {
            return Err("value must be <URI>");
        }
        let uri = c.take_while(|b| b > b' ' && b != 0x7f && b != b';');
        check_uri(uri)?;
        if uri
            .iter()
            .any(|&b| matches!(b, b'?' | b',' | b'<' | b'>' | b'"'))
        {
            return Err("a URI with '?' or ',' must be enclosed in <>");
        }
        out.put(uri);
    }
    params(&mut c, out)
}

fn check_uri(uri: &[u8]) -> Result<(), &'static str> {
    if uri.is_empty() {
        return Err("empty URI");
    }
    uri_scheme(uri).map(|_| ()).ok_or("URI without a scheme")
}

/// `Call-ID = word [ "@" word ]` (§20.8); checked liberally as visible ASCII.
fn canon_call_id(value: &[u8], out: &mut impl Out) -> Result<(), &'static str> {
    let mut c = Cur::new(value);
    c.lws();
    let id = c.take_while(|b| (0x21..0x7f).contains(&b));
    if id.is_empty() {
        return Err("empty");
    }
    c.lws();
    if !c.at_end() {
        return Err("whitespace inside the value");
    }
    out.put(id);
    Ok(())
}

/// `CSeq = 1*DIGIT LWS Method` (§20.16), the number below 2**31 (§8.1.1.5).
fn canon_cseq(value: &[u8], out: &mut impl Out) -> Result<(), &'static str> {
    let mut c = Cur::new(value);
    c.lws();
    let digits = c.take_while(|b| b.is_ascii_digit());
    if digits.is_empty() {
        return Err("missing sequence number");
    }
    if parse_bounded(digits, (1 << 31) - 1).is_none() {
        return Err("sequence number out of range");
    }
    if !c.lws() {
        return Err("missing method");
    }
    let method = c.take_while(is_token);
    if method.is_empty() {
        return Err("missing method");
    }
    c.lws();
    if !c.at_end() {
        return Err("unexpected characters after the method");
    }
    out.put(digits);
    out.byte(b' ');
    out.put(method);
    Ok(())
}

/// `1*DIGIT` no larger than `max` (Max-Forwards: 255, §20.22; Content-Length, §20.14).
fn canon_number(value: &[u8], out: &mut impl Out, max: u64) -> Result<u64, &'static str> {
    let mut c = Cur::new(value);
    c.lws();
    let digits = c.take_while(|b| b.is_ascii_digit());
    c.lws();
    if digits.is_empty() || !c.at_end() {
        return Err("not a number");
    }
    let n = parse_bounded(digits, max).ok_or("value out of range")?;
    out.put(digits);
    Ok(n)
}

fn parse_bounded(digits: &[u8], max: u64) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, d| {
        let v = acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        (v <= max).then_some(v)
    })
}

/// `SIP-date = rfc1123-date` in GMT (§20.17): `Sat, 13 Nov 2010 23:29:00 GMT`.
fn canon_date(value: &[u8], out: &mut impl Out) -> Result<(), &'static str> {
    const DAYS: [&[u8]; 7] = [b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"];
    const MONTHS: [&[u8]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let date = trim_lws(value);
    let at = |r: std::ops::Range<usize>| date.get(r).unwrap_or_default();
    let digits = |r: std::ops::Range<usize>| {
        let s = at(r.clone());
        s.len() == r.len() && s.iter().all(u8::is_ascii_digit)
    };
    let ok = date.len() == 29
        && DAYS.contains(&at(0..3))
        && at(3..5) == b", "
        && digits(5..7)
        && at(7..8) == b" "
        && MONTHS.contains(&at(8..11))
        && at(11..12) == b" "
        && digits(12..16)
        && at(16..17) == b" "
        && digits(17..19)
        && at(19..20) == b":"
        && digits(20..22)
        && at(22..23) == b":"
        && digits(23..25)
        && at(25..29) == b" GMT";
    if !ok {
        return Err("not an RFC 1123 date in GMT");
    }
    out.put(date);
    Ok(())
}

/// Writes a value with every fold (and the whitespace around it) replaced by one SP and the
/// ends trimmed.
fn unfold_into_out(value: &[u8], out: &mut impl Out) {
    let mut c = Cur::new(trim_lws(value));
    let mut pending_space = false;
    while let Some(b) = c.peek() {
        if b == b'\r' || b == b'\n' {
            // A fold becomes one SP; a stray CR or LF (only possible in the raw lines `reject`
            // copies) must not reach the output either.
            if !c.lws() {
                c.i += 1;
            }
            pending_space = true;
            continue;
        }
        if is_wsp(b) {
            // Keep plain whitespace as it is, unless it touches a fold.
            let run = c.take_while(is_wsp);
            if matches!(c.peek(), Some(b'\r' | b'\n')) && c.lws() {
                pending_space = true;
            } else {
                if pending_space {
                    out.byte(b' ');
                    pending_space = false;
                }
                out.put(run);
            }
            continue;
        }
        if pending_space {
            out.byte(b' ');
            pending_space = false;
        }
        out.byte(b);
        c.i += 1;
    }
}

fn unfold_into(value: &[u8], out: &mut Vec<u8>) {
    unfold_into_out(value, out);
}

fn trim_lws(value: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let start = value.iter().position(|b| !is_ws(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ws(b))
        .map_or(start, |e| e + 1);
    value.get(start..end).unwrap_or_default()
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn find(haystack: &[u8], needle: u8) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

fn skip_leading_crlf(bytes: &[u8]) -> &[u8] {
    let skip = bytes
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    bytes.get(skip..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rsip::prelude::*;

    fn with_request_uri(uri: &str) -> Vec<u8> {
        INVITE.replacen("sip:bob@relay.test", uri, 1).into_bytes()
    }

    #[test]
    fn request_uris_rsip_cannot_read_are_carried_as_written() {
        for uri in [
            "tel:+15551234",
            "tel:+1-555-123-4567;phone-context=example.com",
            "sip:bob@[2001:db8::10]:5070",
            "sip:[::1]",
            "sips:alice;day=tuesday@example.com",
        ] {
            let msg = parse(&with_request_uri(uri)).unwrap_or_else(|e| panic!("{uri}: {e}"));
            let SipMessage::Request(req) = msg else {
                panic!("{uri}: not a request");
            };
            assert_eq!(req.uri.to_string(), uri);
            let ours = crate::uri::Uri::from_rsip(&req.uri).unwrap();
            assert_eq!(ours.to_string(), uri);
            assert!(crate::message::to_bytes(req)
                .starts_with(format!("INVITE {uri} SIP/2.0\r\n").as_bytes()));
        }
        // What rsip reads itself keeps its typed form.
        let SipMessage::Request(req) = parse(INVITE.as_bytes()).unwrap() else {
            panic!("not a request");
        };
        assert_eq!(req.uri.user(), Some("bob"));
    }

    #[test]
    fn an_unknown_request_uri_scheme_is_answered_416() {
        for (uri, scheme) in [
            ("mailto:bob@example.com", "mailto"),
            ("urn:service:sos", "urn"),
        ] {
            let bytes = with_request_uri(uri);
            let err = parse(&bytes).unwrap_err();
            assert_eq!(err, WireError::UnsupportedUriScheme(scheme.into()));
            let answer = reject(&bytes, &err).unwrap();
            assert!(answer.starts_with(b"SIP/2.0 416 Unsupported URI Scheme\r\n"));
        }
        // A served scheme whose URI is malformed is a 400.
        let bytes = with_request_uri("sip:bob@[2001:db8::10");
        let err = parse(&bytes).unwrap_err();
        assert!(matches!(err, WireError::BadRequestUri(_)), "{err:?}");
        assert!(reject(&bytes, &err).unwrap().starts_with(b"SIP/2.0 400 "));
    }

    const INVITE: &str = "INVITE sip:bob@relay.test SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:alice@relay.test>;tag=f1\r\n\
To: <sip:bob@relay.test>\r\n\
Call-ID: c1@host\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@192.0.2.1:5060>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\r";

    fn request(text: &str) -> rsip::Request {
        match parse(text.as_bytes()) {
            Ok(SipMessage::Request(r)) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn canonical_message_takes_the_fast_path() {
        let frame = skip_leading_crlf(INVITE.as_bytes());
        let scan = scan(frame).unwrap();
        assert!(!scan.rewrite, "a canonical message must not be rewritten");
        assert!(scan.problem.is_none());
        let req = request(INVITE);
        assert_eq!(req.body, b"v=0\r");
        assert_eq!(req.method, rsip::Method::Invite);
    }

    #[test]
    fn datagram_body_is_trimmed_to_content_length() {
        let text = format!("{INVITE}\nINVITE garbage");
        let req = request(&text);
        assert_eq!(req.body, b"v=0\r");
    }

    #[test]
    fn short_body_is_an_error() {
        let text = INVITE.replace("Content-Length: 4", "Content-Length: 40");
        assert_eq!(
            parse(text.as_bytes()),
            Err(WireError::BodyTooShort {
                declared: 40,
                got: 4
            })
        );
    }

    #[test]
    fn compact_folded_and_comma_joined_headers_are_normalised() {
        let text = "INVITE sip:bob@relay.test SIP/2.0\r\n\
v: SIP/2.0/UDP a.test;branch=z9hG4bK1, SIP / 2.0 / TCP\r\n  b.test ; branch = z9hG4bK2\r\n\
f: Alice <sip:alice@relay.test> ;tag=f1\r\n\
t  : <sip:bob@relay.test>\r\n\
i: c1@host\r\n\
CSeq: 1\r\n\tINVITE\r\n\
m: <sip:a@a.test>, \"Two, Three\" <sip:b@b.test>;q=0.5\r\n\
X-Folded: one\r\n two\r\n\
l: 0\r\n\r\n";
        let req = request(text);
        let vias: Vec<_> = req
            .headers
            .iter()
            .filter_map(|h| match h {
                rsip::Header::Via(v) => Some(v.typed().unwrap()),
                _ => None,
            })
            .collect();
        assert_eq!(vias.len(), 2);
        assert_eq!(vias[1].branch().unwrap().to_string(), "z9hG4bK2");
        assert_eq!(vias[1].uri.host_with_port.to_string(), "b.test");
        assert_eq!(
            req.from_header().unwrap().tag().unwrap().unwrap().value(),
            "f1"
        );
        assert_eq!(req.call_id_header().unwrap().value(), "c1@host");
        assert_eq!(req.cseq_header().unwrap().typed().unwrap().seq, 1);
        assert_eq!(req.contact_headers().len(), 2);
        let folded = req.headers.iter().find_map(|h| match h {
            rsip::Header::Other(n, v) if n == "X-Folded" => Some(v.clone()),
            _ => None,
        });
        assert_eq!(folded.as_deref(), Some("one two"));
        let summary = crate::message::Summary::of_request(&req).unwrap();
        assert_eq!(summary.branch, "z9hG4bK1");
    }

    #[test]
    fn bare_lf_is_tolerated() {
        let text = INVITE.replace("\r\n", "\n").replace("v=0\r", "v=0\n");
        let req = request(&text);
        assert_eq!(req.body, b"v=0\n");
        assert_eq!(req.headers.iter().count(), 9);
    }

    #[test]
    fn unknown_and_lower_case_methods_are_unknown() {
        let text = INVITE.replace("INVITE sip", "FOO sip");
        assert_eq!(
            parse(text.as_bytes()),
            Err(WireError::UnknownMethod("FOO".into()))
        );
        let text = INVITE.replace("INVITE sip", "invite sip");
        assert_eq!(
            parse(text.as_bytes()),
            Err(WireError::UnknownMethod("invite".into()))
        );
    }

    #[test]
    fn response_keeps_its_reason_phrase() {
        let text = "SIP/2.0 486 Gone Fishing\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc\r\n\
From: <sip:alice@relay.test>;tag=f1\r\n\
To: <sip:bob@relay.test>;tag=t1\r\n\
Call-ID: c1@host\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n";
        match parse(text.as_bytes()).unwrap() {
            SipMessage::Response(r) => {
                assert_eq!(r.status_code.code(), 486);
                assert!(r.to_string().starts_with("SIP/2.0 486 Gone Fishing\r\n"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_and_bad_headers_are_named() {
        let text = INVITE.replace("Call-ID: c1@host\r\n", "");
        let err = parse(text.as_bytes()).unwrap_err();
        assert_eq!(err, WireError::MissingHeader("Call-ID"));
        assert_eq!(err.reason(), "Bad Request: missing Call-ID");
        let text = INVITE.replace("branch=z9hG4bKabc;rport", "branch=z9hG4bKabc;;rport");
        let err = parse(text.as_bytes()).unwrap_err();
        assert_eq!(err.reason(), "Malformed Via header: empty parameter");
        let text = INVITE.replace("CSeq: 1 INVITE", "CSeq: 1 OPTIONS");
        assert!(matches!(
            parse(text.as_bytes()),
            Err(WireError::BadHeader { ref name, .. }) if name == "CSeq"
        ));
    }

    #[test]
    fn reject_builds_a_400_from_raw_lines() {
        let text = INVITE.replace("Max-Forwards: 70", "Max-Forwards: 300");
        let err = parse(text.as_bytes()).unwrap_err();
        let resp = reject(text.as_bytes(), &err).unwrap();
        let resp = std::str::from_utf8(&resp).unwrap();
        assert!(
            resp.starts_with("SIP/2.0 400 Malformed Max-Forwards header: value out of range\r\n"),
            "{resp}"
        );
        assert!(resp.contains("Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport\r\n"));
        assert!(resp.contains("To: <sip:bob@relay.test>;tag="));
        assert!(resp.contains("Call-ID: c1@host\r\n"));
        assert!(resp.contains("CSeq: 1 INVITE\r\n"));
        assert!(resp.ends_with("Content-Length: 0\r\n\r\n"));
        // What we send back parses, and is a response to the request.
        match parse(resp.as_bytes()).unwrap() {
            SipMessage::Response(r) => assert_eq!(r.status_code.code(), 400),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reject_answers_unknown_methods_with_501() {
        let text = INVITE
            .replace("INVITE sip", "FOO sip")
            .replace("1 INVITE", "1 FOO");
        let err = parse(text.as_bytes()).unwrap_err();
        let resp = reject(text.as_bytes(), &err).unwrap();
        assert!(resp.starts_with(b"SIP/2.0 501 Not Implemented\r\n"));
    }

    #[test]
    fn reject_stays_silent_when_it_cannot_answer() {
        // A response is never answered.
        assert_eq!(
            reject(b"SIP/2.0 200 OK\r\n\r\n", &WireError::Truncated),
            None
        );
        // An ACK is never answered.
        let ack = INVITE.replace("INVITE sip", "ACK sip");
        assert_eq!(reject(ack.as_bytes(), &WireError::BadStartLine), None);
        // No Via, nowhere to send the answer.
        let text = INVITE.replace(
            "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport\r\n",
            "",
        );
        let err = parse(text.as_bytes()).unwrap_err();
        assert_eq!(reject(text.as_bytes(), &err), None);
        // Garbage.
        assert_eq!(reject(b"\x00\x01garbage", &WireError::BadStartLine), None);
    }

    #[test]
    fn reject_keeps_an_existing_to_tag() {
        let text = INVITE
            .replace(
                "To: <sip:bob@relay.test>",
                "To: <sip:bob@relay.test>;tag=t9",
            )
            .replace("Max-Forwards: 70", "Max-Forwards: x");
        let err = parse(text.as_bytes()).unwrap_err();
        let resp = reject(text.as_bytes(), &err).unwrap();
        let resp = std::str::from_utf8(&resp).unwrap();
        assert!(
            resp.contains("To: <sip:bob@relay.test>;tag=t9\r\n"),
            "{resp}"
        );
        assert_eq!(resp.matches("tag=").count(), 2); // From's and To's
    }

    #[test]
    fn start_line_errors() {
        let text = INVITE.replace("SIP/2.0\r\nVia", "SIP/3.0\r\nVia");
        assert_eq!(
            parse(text.as_bytes()),
            Err(WireError::UnsupportedVersion("SIP/3.0".into()))
        );
        let resp = reject(
            text.as_bytes(),
            &WireError::UnsupportedVersion("SIP/3.0".into()),
        );
        assert!(resp
            .unwrap()
            .starts_with(b"SIP/2.0 505 Version Not Supported\r\n"));
        let text = INVITE.replace("INVITE sip:bob@relay.test", "INVITE <sip:bob@relay.test>");
        assert_eq!(
            parse(text.as_bytes()),
            Err(WireError::BadRequestUri("enclosed in <>"))
        );
        assert_eq!(parse(b"\r\n\r\n"), Err(WireError::NoStartLine));
        assert_eq!(
            parse(b"INVITE sip:a@b SIP/2.0\r\nVia: x"),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn non_utf8_headers_are_refused() {
        let mut bytes = INVITE.as_bytes().to_vec();
        let pos = INVITE.find("Call-ID: c1").unwrap() + 9;
        bytes[pos] = 0xff;
        assert_eq!(parse(&bytes), Err(WireError::NotUtf8Headers));
    }

    #[test]
    fn canonical_forms() {
        let mut out = Vec::new();
        canon_via(
            b"SIP / 2.0 / UDP\r\n h.test : 5070 ; branch = \"x\" ;rport",
            &mut out,
        )
        .unwrap();
        assert_eq!(out, b"SIP/2.0/UDP h.test:5070;branch=\"x\";rport");
        let mut out = Vec::new();
        canon_address(Kind::From, b"caller<sip:c@x.test> ; tag = 1", &mut out).unwrap();
        assert_eq!(out, b"caller <sip:c@x.test>;tag=1");
        assert_eq!(
            canon_address(Kind::To, b"\"Mr. J. User <sip:j@x.test>", &mut Vec::new()),
            Err("unterminated quoted string")
        );
        assert_eq!(
            canon_address(Kind::To, b"Bell, Alexander <sip:a@x.test>", &mut Vec::new()),
            Err("display name is neither tokens nor a quoted string")
        );
        assert_eq!(
            canon_address(
                Kind::Contact,
                b"sip:u@x.test?Route=%3Csip:y%3E",
                &mut Vec::new()
            ),
            Err("a URI with '?' or ',' must be enclosed in <>")
        );
        assert_eq!(
            canon_address(Kind::To, b"\"W\" < sip:w@x.test >", &mut Vec::new()),
            Err("whitespace inside <URI>")
        );
        let mut out = Vec::new();
        unfold_into_out(b"a  b\r\n   c \r\n\td", &mut out);
        assert_eq!(out, b"a  b c d");
    }

    #[test]
    fn via_received_may_be_a_bare_ipv6_address() {
        // RFC 3261 §20.42: via-received = "received" EQUAL (IPv4address / IPv6address);
        // what a UA copies back from a response into its ACK (RFC 5118 §4.5).
        for (raw, canonical) in [
            (
                &b"SIP/2.0/UDP [::1]:5090;branch=z9hG4bK1;received=::1;rport=5090"[..],
                &b"SIP/2.0/UDP [::1]:5090;branch=z9hG4bK1;received=::1;rport=5090"[..],
            ),
            (
                b"SIP/2.0/UDP [2001:db8::1];received = 2001:db8::9 ;branch=z9hG4bK2",
                b"SIP/2.0/UDP [2001:db8::1];received=2001:db8::9;branch=z9hG4bK2",
            ),
        ] {
            let mut out = Vec::new();
            canon_via(raw, &mut out).unwrap();
            assert_eq!(out, canonical);
        }
        assert_eq!(
            canon_via(b"SIP/2.0/UDP h.test;received=a:b:zz", &mut Vec::new()),
            Err("malformed parameter value")
        );
    }

    #[test]
    fn split_respects_quotes_and_angle_brackets() {
        let parts: Vec<_> = split_top_level(b"\"a, b\" <sip:x;p=1,2>, <sip:y>").collect();
        assert_eq!(
            parts,
            vec![&b"\"a, b\" <sip:x;p=1,2>"[..], &b" <sip:y>"[..]]
        );
    }
}
