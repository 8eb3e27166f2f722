//! Message helpers over rsip's model: identifiers (branch, tag, Call-ID), the summary of the
//! headers the transaction and dialog layers key on (parsed once), building a response from a
//! request (RFC 3261 §8.2.6), status codes with their reason phrases, and serialisation with a
//! correct Content-Length.

use bytes::Bytes;
use rand::Rng;
use rsip::prelude::*;
use rsip::{Header, Method, Request, Response, SipMessage, StatusCode};

use crate::fields;

/// The RFC 3261 §8.1.1.7 magic cookie that starts every branch we generate.
pub const BRANCH_COOKIE: &str = "z9hG4bK";

/// Why a message lacks what the transaction layer needs to handle it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// A mandatory header (RFC 3261 §8.1.1) is missing.
    #[error("missing {0} header")]
    Missing(&'static str),
    /// A mandatory header is present but cannot be read.
    #[error("invalid {0} header")]
    Invalid(&'static str),
    /// Max-Forwards reached zero: the request must not be forwarded (RFC 3261 §16.3 step 3;
    /// answered with `483 Too Many Hops`).
    #[error("Max-Forwards reached zero")]
    TooManyHops,
}

fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
}

/// A fresh Via branch, unique in space and time, with the RFC 3261 magic cookie.
pub fn new_branch() -> String {
    format!("{BRANCH_COOKIE}{}", random_token(20))
}

/// A fresh From/To tag (RFC 3261 §19.3: at least 32 bits of randomness).
pub fn new_tag() -> String {
    random_token(12)
}

/// The To tag of a response sent statelessly to a request with these ids and this CSeq
/// header value: the same for every retransmission of the request, as RFC 3261 §8.2.7
/// requires of a stateless UAS, another for another request, and not to be guessed from
/// them (SipHash under a key chosen at start-up). 16 hex digits: 64 bits (§19.3 asks 32).
pub fn stateless_tag(ids: &RequestIds, cseq: &str) -> String {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = KEY
        .get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher();
    ids.call_id.hash(&mut h);
    ids.from_tag.hash(&mut h);
    cseq.trim().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// A fresh Call-ID, `random@host` (RFC 3261 §8.1.1.4).
pub fn new_call_id(host: &str) -> String {
    format!("{}@{host}", random_token(24))
}

/// The standard reason phrase of a status code (RFC 3261 §21 and later RFCs), or a generic
/// phrase for its class.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        200 => "OK",
        202 => "Accepted",
        204 => "No Notification",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        305 => "Use Proxy",
        380 => "Alternative Service",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        410 => "Gone",
        413 => "Request Entity Too Large",
        414 => "Request-URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        421 => "Extension Required",
        422 => "Session Interval Too Small",
        423 => "Interval Too Brief",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        485 => "Ambiguous",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        489 => "Bad Event",
        491 => "Request Pending",
        493 => "Undecipherable",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        _ => match code / 100 {
            1 => "Session Progress",
            2 => "OK",
            3 => "Redirect",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Global Failure",
        },
    }
}

/// A status code carrying the given reason phrase (or the standard one). rsip writes the
/// variant name of a known code ("BusyHere"), so every status we emit goes through
/// `StatusCode::Other`, which keeps the phrase as given; compare codes with `.code()`.
pub fn status(code: u16, reason: Option<&str>) -> StatusCode {
    StatusCode::Other(code, reason.unwrap_or(reason_phrase(code)).to_string())
}

/// The headers the transaction and dialog layers key on, read once from a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The branch parameter of the top Via (empty when absent: an RFC 2543 peer).
    pub branch: String,
    /// The sent-by of the top Via (`host[:port]`), part of the §17.2.3 server match.
    pub sent_by: String,
    /// The Call-ID.
    pub call_id: String,
    /// The CSeq sequence number.
    pub cseq: u32,
    /// The CSeq method.
    pub cseq_method: Method,
    /// The tag of the From header, if any.
    pub from_tag: Option<String>,
    /// The tag of the To header, if any.
    pub to_tag: Option<String>,
}

/// What identifies a request within its dialog, as the transaction layer read it on the
/// way in (RFC 3261 §12.2.2: Call-ID, From tag, To tag), handed to the transaction user
/// so that no layer above reads the headers again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestIds {
    /// The Call-ID.
    pub call_id: String,
    /// The tag of the From header (the requester's), if any.
    pub from_tag: Option<String>,
    /// The tag of the To header, if any: present on a request within a dialog (§12.2).
    pub to_tag: Option<String>,
}

impl RequestIds {
    /// The ids in a summary.
    pub fn of(summary: &Summary) -> RequestIds {
        RequestIds {
            call_id: summary.call_id.clone(),
            from_tag: summary.from_tag.clone(),
            to_tag: summary.to_tag.clone(),
        }
    }

    /// Reads them from a request (for one that did not come through the transaction
    /// layer).
    pub fn read(req: &Request) -> Result<RequestIds, MessageError> {
        Summary::of_request(req).map(|s| RequestIds::of(&s))
    }
}

impl Summary {
    /// Reads the summary of a request or response.
    pub fn of(msg: &SipMessage) -> Result<Summary, MessageError> {
        summarize(msg.headers())
    }

    /// Reads the summary of a request.
    pub fn of_request(req: &Request) -> Result<Summary, MessageError> {
        summarize(&req.headers)
    }

    /// Reads the summary of a response.
    pub fn of_response(resp: &Response) -> Result<Summary, MessageError> {
        summarize(&resp.headers)
    }
}

fn summarize(headers: &rsip::Headers) -> Result<Summary, MessageError> {
    let mut via = None;
    let mut call_id = None;
    let mut cseq = None;
    let mut from = None;
    let mut to = None;
    for header in headers.iter() {
        match header {
            Header::Via(v) if via.is_none() => via = Some(v),
            Header::CallId(c) if call_id.is_none() => call_id = Some(c),
            Header::CSeq(c) if cseq.is_none() => cseq = Some(c),
            Header::From(f) if from.is_none() => from = Some(f),
            Header::To(t) if to.is_none() => to = Some(t),
            _ => {}
        }
    }
    let via = via.ok_or(MessageError::Missing("Via"))?;
    let (branch, sent_by) = match top_via(via.value()) {
        Some(v) => (v.branch().unwrap_or_default().to_string(), v.sent_by()),
        None => return Err(MessageError::Invalid("Via")),
    };
    let cseq = cseq.ok_or(MessageError::Missing("CSeq"))?;
    let (cseq, cseq_method) = fields::cseq_of(cseq.value()).ok_or(MessageError::Invalid("CSeq"))?;
    let call_id = call_id.ok_or(MessageError::Missing("Call-ID"))?.value();
    if call_id.trim().is_empty() {
        return Err(MessageError::Invalid("Call-ID"));
    }
    let from = from.ok_or(MessageError::Missing("From"))?;
    let to = to.ok_or(MessageError::Missing("To"))?;
    let from_tag = fields::tag_of(from.value())
        .map_err(|_| MessageError::Invalid("From"))?
        .map(|t| t.into_owned());
    let to_tag = fields::tag_of(to.value())
        .map_err(|_| MessageError::Invalid("To"))?
        .map(|t| t.into_owned());
    Ok(Summary {
        branch,
        sent_by,
        call_id: call_id.trim().to_string(),
        cseq,
        cseq_method,
        from_tag,
        to_tag,
    })
}

/// The one-pass reading of a top Via value, when it is in the plain form and spells the
/// parameters rsip knows as rsip does (else the caller asks rsip).
pub(crate) fn top_via(value: &str) -> Option<fields::ViaView<'_>> {
    fields::ViaView::parse(value).filter(|v| !v.has_unusual_param_names())
}

/// Builds a response to `req` per RFC 3261 §8.2.6.1: Via headers, From, To, Call-ID and CSeq
/// copied; a To tag added when the request had none and the response is not a 100 (the caller
/// passes the tag to use, so the dialog keeps one tag across responses); an empty body.
pub fn response_for(
    req: &Request,
    code: u16,
    reason: Option<&str>,
    to_tag: Option<&str>,
) -> Response {
    let mut headers = rsip::Headers::default();
    for header in req.headers.iter() {
        match header {
            Header::Via(_) | Header::From(_) | Header::CallId(_) | Header::CSeq(_) => {
                headers.push(header.clone())
            }
            Header::To(to) => {
                let has_tag = matches!(fields::tag_of(to.value()), Ok(Some(_)));
                match (has_tag, to_tag, code) {
                    (false, Some(tag), c) if c != 100 => headers.push(Header::To(
                        rsip::headers::To::new(format!("{};tag={tag}", to.value())),
                    )),
                    _ => headers.push(header.clone()),
                }
            }
            Header::Other(name, _) if code == 100 && name.eq_ignore_ascii_case("Timestamp") => {
                headers.push(header.clone())
            }
            Header::Timestamp(_) if code == 100 => headers.push(header.clone()),
            _ => {}
        }
    }
    headers.push(Header::ContentLength(rsip::headers::ContentLength::from(
        0u32,
    )));
    Response {
        status_code: status(code, reason),
        version: rsip::Version::V2,
        headers,
        body: Vec::new(),
    }
}

/// What [`response_for`] needs of a request, and nothing more: its method and
/// Request-URI, the Via, From, To, Call-ID and CSeq headers, no body. A UAS that must
/// still answer a request long after it arrived (a 2xx of another fork, a late final)
/// keeps this instead of the whole request.
pub fn response_headers_only(req: &Request) -> Request {
    let headers: Vec<Header> = req
        .headers
        .iter()
        .filter(|h| {
            matches!(
                h,
                Header::Via(_)
                    | Header::From(_)
                    | Header::To(_)
                    | Header::CallId(_)
                    | Header::CSeq(_)
            )
        })
        .cloned()
        .collect();
    Request {
        method: req.method,
        uri: req.uri.clone(),
        version: req.version.clone(),
        headers: headers.into(),
        body: Vec::new(),
    }
}

/// Sets the Content-Length header to the body's length (adding it when missing, dropping
/// duplicates), so that every message we send is framed right on a stream transport.
pub fn set_content_length(headers: &mut rsip::Headers, body_len: usize) {
    let mut kept = Vec::with_capacity(headers.iter().count() + 1);
    for header in std::mem::take(headers).into_iter() {
        if !matches!(header, Header::ContentLength(_)) {
            kept.push(header);
        }
    }
    kept.push(Header::ContentLength(rsip::headers::ContentLength::from(
        u32::try_from(body_len).unwrap_or(u32::MAX),
    )));
    *headers = rsip::Headers::from(kept);
}

/// Serialises a message for the wire with a correct Content-Length (any Content-Length it
/// carries is replaced by the body's length, written last among the headers).
///
/// The text is what rsip's `Display` writes, minus its intermediate strings (one per
/// header, then their join): the message is formatted into a buffer reused by the thread and
/// copied out at its exact size, since a transaction keeps its last message for its whole
/// retention time (up to 64·T1).
pub fn to_bytes(msg: impl Into<SipMessage>) -> Bytes {
    use std::fmt::Write as _;
    thread_local! {
        static BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    let msg: SipMessage = msg.into();
    let (headers, body) = match &msg {
        SipMessage::Request(r) => (&r.headers, &r.body),
        SipMessage::Response(r) => (&r.headers, &r.body),
    };
    BUFFER.with(|buffer| {
        let mut fresh = String::new();
        // A re-entrant call (none today) gets a buffer of its own rather than a panic.
        let mut borrowed = buffer.try_borrow_mut();
        let out: &mut String = match borrowed.as_deref_mut() {
            Ok(b) => b,
            Err(_) => &mut fresh,
        };
        out.clear();
        // Writing into a String cannot fail.
        let _ = match &msg {
            SipMessage::Request(r) => write!(out, "{} {} {}\r\n", r.method, r.uri, r.version),
            SipMessage::Response(r) => write!(out, "{} {}\r\n", r.version, r.status_code),
        };
        for header in headers.iter() {
            if !matches!(header, Header::ContentLength(_)) {
                let _ = write!(out, "{header}\r\n");
            }
        }
        let _ = write!(out, "Content-Length: {}\r\n\r\n", body.len());
        let mut bytes = Vec::with_capacity(out.len() + body.len());
        bytes.extend_from_slice(out.as_bytes());
        bytes.extend_from_slice(body);
        Bytes::from(bytes)
    })
}

/// RFC 3581 §4 / RFC 3261 §18.2.1: stamps the top Via of a received request with the address
/// it really came from. Adds `received=<ip>` when the sent-by host differs from the source IP
/// (a domain name always differs) or when the client asked for `rport`, and fills a bare
/// `rport` with the source port. A top Via that cannot be read is left alone.
pub fn stamp_received(req: &mut Request, source: std::net::SocketAddr) {
    let Some(via) = req.headers.iter_mut().find_map(|h| match h {
        Header::Via(via) => Some(via),
        _ => None,
    }) else {
        return;
    };
    let stamped = top_via(via.value()).and_then(|view| stamp_view(&view, source));
    if let Some(value) = stamped {
        *via = rsip::headers::Via::new(value);
    }
}

/// [`stamp_received`] on a Via read in one pass: the new value, or `None` to leave it.
fn stamp_view(via: &fields::ViaView<'_>, source: std::net::SocketAddr) -> Option<String> {
    use std::fmt::Write as _;
    let wants_rport = via
        .params()
        .any(|(name, value)| value.is_none() && name.eq_ignore_ascii_case("rport"));
    let same_host = via.host_ip() == Some(source.ip());
    if same_host && !wants_rport {
        return None;
    }
    let mut out = format!("SIP/2.0/{} {}", via.transport, via.sent_by());
    let mut placed = false;
    for (name, value) in via.params() {
        if name.eq_ignore_ascii_case("received") {
            continue;
        }
        if wants_rport && !placed && name.eq_ignore_ascii_case("rport") {
            let _ = write!(out, ";received={};rport={}", source.ip(), source.port());
            placed = true;
            continue;
        }
        out.push(';');
        out.push_str(name);
        if let Some(value) = value {
            out.push('=');
            out.push_str(value);
        }
    }
    if !placed {
        let _ = write!(out, ";received={}", source.ip());
    }
    Some(out)
}

/// [`stamp_received`] through rsip's typed Via: the oracle the one-pass reader is checked
/// against in tests (nothing from the network is read with rsip's typed headers).
#[cfg(test)]
fn stamp_typed(via: &rsip::headers::Via, source: std::net::SocketAddr) -> Option<String> {
    let mut typed = via.typed().ok()?;
    let is_rport = |p: &rsip::Param| matches!(p, rsip::Param::Other(name, _) if name.value().eq_ignore_ascii_case("rport"));
    let wants_rport = typed
        .params
        .iter()
        .any(|p| matches!(p, rsip::Param::Other(name, None) if name.value().eq_ignore_ascii_case("rport")));
    let same_host = matches!(
        &typed.uri.host_with_port.host,
        rsip::Host::IpAddr(ip) if *ip == source.ip()
    );
    if same_host && !wants_rport {
        return None;
    }
    typed
        .params
        .retain(|p| !matches!(p, rsip::Param::Received(_)));
    let received = rsip::Param::Received(rsip::param::Received::new(source.ip().to_string()));
    match typed.params.iter().position(is_rport) {
        Some(i) if wants_rport => {
            typed.params[i] =
                rsip::Param::Other("rport".into(), Some(source.port().to_string().into()));
            typed.params.insert(i, received);
        }
        _ => typed.params.push(received),
    }
    Some(typed.to_string())
}

/// RFC 3261 §16.3 step 3: whether a request may still be forwarded, without changing it
/// (what [`decrement_max_forwards`] checks): `Err(TooManyHops)` when Max-Forwards is 0,
/// `Err(Invalid)` when it is not a number; a request without one may be forwarded.
pub fn check_max_forwards(req: &Request) -> Result<(), MessageError> {
    let Some(mf) = req.headers.iter().find_map(|h| match h {
        Header::MaxForwards(mf) => Some(mf),
        _ => None,
    }) else {
        return Ok(());
    };
    match mf.value().trim().parse::<u32>() {
        Ok(0) => Err(MessageError::TooManyHops),
        Ok(_) => Ok(()),
        Err(_) => Err(MessageError::Invalid("Max-Forwards")),
    }
}

/// RFC 3261 §16.3 step 3 / §16.6 step 3: the Max-Forwards check of an element that forwards a
/// request. `Err(TooManyHops)` when it is 0 (answer `483`); otherwise decrements it, or adds
/// `Max-Forwards: 70` when the request has none.
pub fn decrement_max_forwards(req: &mut Request) -> Result<(), MessageError> {
    let existing = req.headers.iter_mut().find_map(|h| match h {
        Header::MaxForwards(mf) => Some(mf),
        _ => None,
    });
    match existing {
        Some(mf) => {
            let hops: u32 = mf
                .value()
                .trim()
                .parse()
                .map_err(|_| MessageError::Invalid("Max-Forwards"))?;
            if hops == 0 {
                return Err(MessageError::TooManyHops);
            }
            *mf = rsip::headers::MaxForwards::from(hops - 1);
        }
        None => req
            .headers
            .push(Header::MaxForwards(rsip::headers::MaxForwards::from(70u32))),
    }
    Ok(())
}

/// Where a response to `req` goes over UDP (RFC 3261 §18.2.2 with RFC 3581 §4): the
/// `received` address of the top Via (port from `rport` when it has a value, else the sent-by
/// port, else the transport's default), or else the sent-by itself. `None` when the top Via
/// cannot be read or names a domain without `received` (only IP hosts are answered here; a
/// domain would need RFC 3263 resolution).
pub fn response_target(req: &Request) -> Option<std::net::SocketAddr> {
    let via = req.headers.iter().find_map(|h| match h {
        Header::Via(via) => Some(via),
        _ => None,
    })?;
    // The one-pass reader (IPv6 sent-by and received included).
    let view = top_via(via.value())?;
    let default_port = if view.transport.starts_with("TLS") {
        5061
    } else {
        5060
    };
    let port = view
        .param("rport")
        .flatten()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(view.port.unwrap_or(default_port));
    let ip = view.received().or_else(|| view.host_ip())?;
    Some(std::net::SocketAddr::new(ip, port))
}

#[cfg(test)]
mod wire_helper_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn request(via: &str, max_forwards: Option<&str>) -> Request {
        let mf = max_forwards
            .map(|v| format!("Max-Forwards: {v}\r\n"))
            .unwrap_or_default();
        let text = format!(
            "OPTIONS sip:bob@relay.test SIP/2.0\r\nVia: {via}\r\n{mf}\
From: <sip:a@relay.test>;tag=1\r\nTo: <sip:bob@relay.test>\r\nCall-ID: c@h\r\n\
CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        );
        match SipMessage::try_from(text.as_str()) {
            Ok(SipMessage::Request(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    fn top_via(req: &Request) -> String {
        req.via_header().unwrap().value().to_string()
    }

    #[test]
    fn received_and_rport_are_stamped() {
        let src: std::net::SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut req = request("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport", None);
        stamp_received(&mut req, src);
        assert_eq!(
            top_via(&req),
            "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;received=198.51.100.7;rport=40000"
        );
        assert_eq!(response_target(&req), Some(src));
    }

    #[test]
    fn one_pass_stamp_writes_what_rsip_writes() {
        for (via, src) in [
            (
                "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport",
                "198.51.100.7:40000",
            ),
            (
                "SIP/2.0/UDP 10.0.0.1:05060;rport=7;branch=z9hG4bK1;rport",
                "198.51.100.7:1",
            ),
            (
                "SIP/2.0/TCP client.test;received=1.2.3.4;branch=z9hG4bK1",
                "192.0.2.1:5070",
            ),
            (
                "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK1;rport",
                "192.0.2.1:5070",
            ),
            (
                "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK1",
                "192.0.2.1:5070",
            ),
            (
                "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK1",
                "192.0.2.2:5070",
            ),
            (
                "SIP/2.0/UDP h.test;ttl=1;maddr=224.0.0.1;branch=z9hG4bK1;x",
                "192.0.2.2:9",
            ),
        ] {
            let src: std::net::SocketAddr = src.parse().unwrap();
            let view = super::top_via(via).unwrap();
            assert_eq!(
                stamp_view(&view, src),
                stamp_typed(&rsip::headers::Via::new(via), src),
                "{via}"
            );
        }
    }

    #[test]
    fn received_only_when_the_host_differs() {
        let src: std::net::SocketAddr = "192.0.2.1:5070".parse().unwrap();
        let mut req = request("SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK1", None);
        stamp_received(&mut req, src);
        assert_eq!(top_via(&req), "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK1");
        let mut req = request("SIP/2.0/UDP client.test;branch=z9hG4bK1", None);
        assert_eq!(response_target(&req), None, "a domain needs resolution");
        stamp_received(&mut req, src);
        assert_eq!(
            top_via(&req),
            "SIP/2.0/UDP client.test;branch=z9hG4bK1;received=192.0.2.1"
        );
        // Without rport the response goes to the sent-by port (default 5060).
        assert_eq!(
            response_target(&req),
            Some("192.0.2.1:5060".parse().unwrap())
        );
    }

    #[test]
    fn ipv6_vias_are_stamped_and_answered() {
        let src: std::net::SocketAddr = "[2001:db8::9]:40000".parse().unwrap();
        let mut req = request("SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1;rport", None);
        stamp_received(&mut req, src);
        assert_eq!(
            top_via(&req),
            "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1;received=2001:db8::9;rport=40000"
        );
        assert_eq!(response_target(&req), Some(src));
        let s = Summary::of_request(&req).unwrap();
        assert_eq!(s.sent_by, "[2001:db8::1]:5060");
        // Same host, no rport: left alone, answered at the sent-by.
        let src: std::net::SocketAddr = "[2001:db8::1]:5070".parse().unwrap();
        let mut req = request("SIP/2.0/TLS [2001:db8::1];branch=z9hG4bK1", None);
        stamp_received(&mut req, src);
        assert_eq!(top_via(&req), "SIP/2.0/TLS [2001:db8::1];branch=z9hG4bK1");
        assert_eq!(
            response_target(&req),
            Some("[2001:db8::1]:5061".parse().unwrap())
        );
    }

    #[test]
    fn response_target_agrees_with_rsip() {
        for via in [
            "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;received=198.51.100.7;rport=40000",
            "SIP/2.0/TLS 192.0.2.9;branch=z9hG4bK1",
            "SIP/2.0/UDP 192.0.2.9:5080;branch=z9hG4bK1;rport",
            "SIP/2.0/TCP client.test;branch=z9hG4bK1",
            "SIP/2.0/TCP client.test;branch=z9hG4bK1;received=192.0.2.1",
        ] {
            let req = request(via, None);
            let theirs = (|| {
                let typed = req.via_header().ok()?.typed().ok()?;
                let port = typed
                    .params
                    .iter()
                    .find_map(|p| match p {
                        rsip::Param::Other(n, Some(v)) if n.value() == "rport" => {
                            v.value().parse().ok()
                        }
                        _ => None,
                    })
                    .or(typed.uri.host_with_port.port.map(|p| *p.value()))
                    .unwrap_or(if typed.transport == rsip::Transport::Tls {
                        5061
                    } else {
                        5060
                    });
                let ip = match typed.received().ok().flatten() {
                    Some(ip) => ip,
                    None => match typed.uri.host_with_port.host {
                        rsip::Host::IpAddr(ip) => ip,
                        rsip::Host::Domain(_) => return None,
                    },
                };
                Some(std::net::SocketAddr::new(ip, port))
            })();
            assert_eq!(response_target(&req), theirs, "{via}");
        }
    }

    #[test]
    fn response_target_uses_sent_by_defaults() {
        let req = request("SIP/2.0/TLS 192.0.2.9;branch=z9hG4bK1", None);
        assert_eq!(
            response_target(&req),
            Some("192.0.2.9:5061".parse().unwrap())
        );
        let req = request("SIP/2.0/UDP 192.0.2.9:5080;branch=z9hG4bK1;rport", None);
        assert_eq!(
            response_target(&req),
            Some("192.0.2.9:5080".parse().unwrap())
        );
    }

    #[test]
    fn max_forwards_is_checked_and_decremented() {
        let mut req = request("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1", Some("1"));
        decrement_max_forwards(&mut req).unwrap();
        assert_eq!(req.max_forwards_header().unwrap().num().unwrap(), 0);
        assert_eq!(
            decrement_max_forwards(&mut req),
            Err(MessageError::TooManyHops)
        );
        let mut req = request("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1", None);
        decrement_max_forwards(&mut req).unwrap();
        assert_eq!(req.max_forwards_header().unwrap().num().unwrap(), 70);
        let mut req = request("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1", Some("many"));
        assert_eq!(
            decrement_max_forwards(&mut req),
            Err(MessageError::Invalid("Max-Forwards"))
        );
    }

    #[test]
    fn max_forwards_check_agrees_with_the_decrement_and_changes_nothing() {
        for value in [
            Some("0"),
            Some("1"),
            Some("70"),
            Some("many"),
            Some(""),
            None,
        ] {
            let req = request("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1", value);
            let before = req.to_string();
            let mut decremented = req.clone();
            assert_eq!(
                check_max_forwards(&req),
                decrement_max_forwards(&mut decremented),
                "Max-Forwards {value:?}"
            );
            assert_eq!(req.to_string(), before);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const INVITE: &str = "INVITE sip:echo@relay.test SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc;rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@relay.test>;tag=f1\r\n\
To: <sip:echo@relay.test>\r\n\
Call-ID: c1@host\r\n\
CSeq: 7 INVITE\r\n\
Content-Length: 0\r\n\r\n";

    fn invite() -> Request {
        match SipMessage::try_from(INVITE) {
            Ok(SipMessage::Request(r)) => r,
            other => panic!("test message did not parse: {other:?}"),
        }
    }

    #[test]
    fn summary_reads_keys() {
        let s = Summary::of_request(&invite()).unwrap();
        assert_eq!(s.branch, "z9hG4bKabc");
        assert_eq!(s.sent_by, "127.0.0.1:5070");
        assert_eq!(s.call_id, "c1@host");
        assert_eq!(s.cseq, 7);
        assert_eq!(s.cseq_method, Method::Invite);
        assert_eq!(s.from_tag.as_deref(), Some("f1"));
        assert_eq!(s.to_tag, None);
    }

    #[test]
    fn a_request_cut_to_its_response_headers_answers_the_same() {
        let mut full = invite();
        full.body = b"v=0\r\n".to_vec();
        let slim = response_headers_only(&full);
        assert!(slim.body.is_empty());
        assert!(!slim
            .headers
            .iter()
            .any(|h| matches!(h, Header::MaxForwards(_))));
        for code in [180, 200, 486] {
            assert_eq!(
                to_bytes(response_for(&slim, code, None, Some("t1"))),
                to_bytes(response_for(&full, code, None, Some("t1"))),
                "{code}"
            );
        }
    }

    #[test]
    fn response_copies_and_tags() {
        let resp = response_for(&invite(), 486, None, Some("t9"));
        let text = String::from_utf8(to_bytes(resp).to_vec()).unwrap();
        assert!(text.starts_with("SIP/2.0 486 Busy Here\r\n"), "{text}");
        assert!(
            text.contains("To: <sip:echo@relay.test>;tag=t9\r\n"),
            "{text}"
        );
        assert!(text.contains("Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc;rport\r\n"));
        assert!(text.contains("Content-Length: 0\r\n"));
        assert!(!text.contains("Max-Forwards"));
        let trying = response_for(&invite(), 100, None, Some("t9"));
        assert!(!to_bytes(trying).windows(3).any(|w| w == b"t9\r"));
    }

    #[test]
    fn custom_reason_survives() {
        let resp = response_for(&invite(), 403, Some("Not registered"), Some("x"));
        let text = String::from_utf8(to_bytes(resp).to_vec()).unwrap();
        assert!(text.starts_with("SIP/2.0 403 Not registered\r\n"), "{text}");
    }

    #[test]
    fn content_length_matches_body() {
        let mut req = invite();
        req.body = b"v=0\r\n".to_vec();
        let text = String::from_utf8(to_bytes(req).to_vec()).unwrap();
        assert!(text.contains("Content-Length: 5\r\n"), "{text}");
        assert_eq!(text.matches("Content-Length").count(), 1);
        assert!(text.ends_with("\r\n\r\nv=0\r\n"));
    }

    #[test]
    fn serialisation_is_rsips_text_with_the_length_last() {
        // What rsip's Display writes once Content-Length is set (the earlier way), for a
        // request with a body and a response without one: same bytes, the header moved last.
        let mut req = invite();
        req.body = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n".to_vec();
        let resp = response_for(&invite(), 180, Some("Ringing"), Some("t1"));
        for msg in [SipMessage::Request(req), SipMessage::Response(resp)] {
            let mut expected = msg.clone();
            let len = expected.body().len();
            set_content_length(expected.headers_mut(), len);
            let ours = to_bytes(msg);
            assert_eq!(ours.as_ref(), expected.to_string().as_bytes());
            assert_eq!(ours.len(), ours.as_ref().len());
            let back = SipMessage::try_from(ours.as_ref()).unwrap();
            assert_eq!(back.headers(), expected.headers());
            assert_eq!(back.body(), expected.body());
        }
    }

    #[test]
    fn identifiers_are_fresh() {
        let a = new_branch();
        assert!(a.starts_with(BRANCH_COOKIE));
        assert_ne!(a, new_branch());
        assert_ne!(new_tag(), new_tag());
        assert!(new_call_id("h").ends_with("@h"));
    }
}
