//! Message construction for the back-to-back user agent: the inquiry INVITE of a server leg,
//! responses relayed from one leg onto the other (SDP passed through untouched), and the
//! relay's own Contact. No state lives here; [`crate::call`] decides what to send.

use std::net::SocketAddr;

use rsip::prelude::*;
use rsip::{Header, Method, Request, Response};
use sip_core::dialog::ViaSpec;
use sip_core::{message, Transport};

/// The relay's own addresses on one transport: what to write in Via and Contact, worked
/// out once (every call writes them several times).
#[derive(Debug, Clone)]
pub struct LocalAddr {
    /// The transport.
    pub transport: Transport,
    /// The socket address we listen on.
    pub addr: SocketAddr,
    via: ViaSpec,
    contact_uri: rsip::Uri,
    contact_value: String,
}

impl LocalAddr {
    /// The relay's addresses for `transport` listening on `addr`. On TLS the Contact is a
    /// `sips:` URI (RFC 5630 §3.1.3 deprecates `;transport=tls` for saying "over TLS"; a
    /// `sips:` Contact asks every hop to the relay to be TLS, RFC 3261 §26.2.2), and the Via
    /// says `SIP/2.0/TLS`.
    pub fn new(transport: Transport, addr: SocketAddr) -> LocalAddr {
        let text = match transport {
            Transport::Udp => format!("sip:relay@{addr}"),
            Transport::Tls => format!("sips:relay@{addr}"),
            t => format!("sip:relay@{addr};transport={}", t.param_name()),
        };
        // rsip cannot read an IPv6 reference: sip-core parses, and rsip carries it verbatim.
        let contact_uri = sip_core::uri::Uri::parse(&text)
            .map(|u| u.to_rsip())
            .unwrap_or_else(|_| sip_core::uri::rsip_carrier(&text));
        LocalAddr {
            transport,
            addr,
            via: ViaSpec {
                transport,
                sent_by: addr.to_string(),
            },
            contact_value: format!("<{contact_uri}>"),
            contact_uri,
        }
    }

    /// A Via spec for requests leaving on this transport.
    pub fn via(&self) -> ViaSpec {
        self.via.clone()
    }

    /// The relay's Contact URI on this transport (RFC 3261 §8.1.1.8), where in-dialog
    /// requests of the leg come back to.
    pub fn contact_uri(&self) -> rsip::Uri {
        self.contact_uri.clone()
    }

    /// The Contact header carrying [`LocalAddr::contact_uri`].
    pub fn contact_header(&self) -> Header {
        Header::Contact(rsip::headers::Contact::new(self.contact_value.clone()))
    }
}

/// The headers a relayed message keeps describing its body.
fn body_headers(headers: &rsip::Headers) -> impl Iterator<Item = Header> + '_ {
    headers.iter().filter_map(|h| match h {
        Header::ContentType(_) | Header::ContentDisposition(_) | Header::ContentEncoding(_) => {
            Some(h.clone())
        }
        Header::Other(name, _) if name.eq_ignore_ascii_case("Content-Language") => Some(h.clone()),
        _ => None,
    })
}

/// What the relay's inquiry to one application server says.
#[derive(Debug, Clone)]
pub struct Inquiry<'a> {
    /// The service decided for the request.
    pub service: &'a str,
    /// Service parameters, written as Request-URI parameters.
    pub params: &'a [(String, String)],
    /// The authenticated subscriber.
    pub subscriber: &'a str,
    /// The relay's realm, the host of the asserted identity.
    pub realm: &'a str,
    /// The server's address, `host:port`, for the Request-URI and To.
    pub server_hostport: &'a str,
    /// The terminal's request whose body (the SDP offer) and Max-Forwards carry over.
    pub terminal_request: &'a Request,
    /// The relay's address on the server's transport.
    pub local: &'a LocalAddr,
}

/// Service parameters written as URI or header parameters: `;name[=value]` each, in order
/// (an empty value writes the name alone).
pub fn write_params(out: &mut String, params: &[(String, String)]) {
    use std::fmt::Write as _;
    for (k, v) in params {
        let _ = if v.is_empty() {
            write!(out, ";{k}")
        } else {
            write!(out, ";{k}={v}")
        };
    }
}

/// The `P-Asserted-Service` value (RFC 6050 §4.1, with the relay's service ids) for
/// `service` and its parameters: `service[;name[=value]…]`. The relay puts it on the
/// inquiry and on every re-INVITE it relays to a server, which switches service on this
/// header alone, never on what a terminal's SDP says.
pub fn asserted_service(service: &str, params: &[(String, String)]) -> String {
    let mut out = service.to_string();
    write_params(&mut out, params);
    out
}

/// Builds the INVITE of a server leg (DESIGN.md "inquiry"): a new dialog of its own with the
/// relay as UAC, `P-Asserted-Identity` and `P-Asserted-Service` set by the relay, and the
/// terminal's SDP offer as body.
pub fn inquiry_invite(inq: &Inquiry<'_>) -> Result<Request, rsip::Error> {
    // Over TLS the inquiry's Request-URI is `sips:` (RFC 5630 §3.1.3).
    let scheme = if inq.local.transport == Transport::Tls {
        "sips"
    } else {
        "sip"
    };
    let mut ruri = format!("{scheme}:{}@{}", inq.service, inq.server_hostport);
    write_params(&mut ruri, inq.params);
    if inq.local.transport == Transport::Tcp {
        ruri.push_str(&format!(";transport={}", inq.local.transport.param_name()));
    }
    // sip-core reads the URI (an IPv6 server included); rsip carries it.
    let uri = sip_core::uri::Uri::parse(&ruri)
        .map_err(|e| rsip::Error::ParseError(e.to_string()))?
        .to_rsip();
    let max_forwards = inq
        .terminal_request
        .headers
        .iter()
        .find_map(|h| match h {
            Header::MaxForwards(m) => m.value().trim().parse::<u32>().ok(),
            _ => None,
        })
        .unwrap_or(70)
        .saturating_sub(1);
    let mut headers = rsip::Headers::default();
    headers.push(inq.local.via().header());
    headers.push(Header::MaxForwards(rsip::headers::MaxForwards::new(
        max_forwards.to_string(),
    )));
    headers.push(Header::From(rsip::headers::From::new(format!(
        "<sip:{}@{}>;tag={}",
        inq.subscriber,
        inq.realm,
        message::new_tag()
    ))));
    headers.push(Header::To(rsip::headers::To::new(format!(
        "<sip:{}@{}>",
        inq.service, inq.server_hostport
    ))));
    headers.push(Header::CallId(rsip::headers::CallId::new(
        message::new_call_id(&inq.local.addr.ip().to_string()),
    )));
    headers.push(Header::CSeq(rsip::headers::CSeq::new("1 INVITE")));
    headers.push(inq.local.contact_header());
    headers.push(Header::Other(
        "P-Asserted-Identity".into(),
        format!("<sip:{}@{}>", inq.subscriber, inq.realm),
    ));
    headers.push(Header::Other(
        "P-Asserted-Service".into(),
        inq.service.to_string(),
    ));
    headers.push(Header::Allow(rsip::headers::Allow::new(
        "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, REFER, NOTIFY, INFO, UPDATE",
    )));
    for h in body_headers(&inq.terminal_request.headers) {
        headers.push(h);
    }
    let body = inq.terminal_request.body.clone();
    message::set_content_length(&mut headers, body.len());
    Ok(Request {
        method: Method::Invite,
        uri,
        version: rsip::Version::V2,
        headers,
        body,
    })
}

/// Relays `resp` (from the other leg) as the answer to `req` on this leg: same status code and
/// reason phrase, the body and its describing headers untouched, our To tag, and for 1xx/2xx
/// to a dialog-creating request our Contact.
pub fn relayed_response(
    req: &Request,
    resp: &Response,
    to_tag: Option<&str>,
    contact: Option<Header>,
) -> Response {
    let code = resp.status_code.code();
    let reason = match &resp.status_code {
        rsip::StatusCode::Other(_, reason) => Some(reason.as_str()),
        _ => None,
    };
    let mut out = message::response_for(req, code, reason, to_tag);
    out.headers
        .retain(|h| !matches!(h, Header::ContentLength(_)));
    if (100..300).contains(&code) && code > 100 {
        if let Some(contact) = contact {
            out.headers.push(contact);
        }
    }
    for h in resp.headers.iter() {
        match h {
            Header::RetryAfter(_)
            | Header::Warning(_)
            | Header::Unsupported(_)
            | Header::Require(_) => out.headers.push(h.clone()),
            Header::Other(name, _) if name.eq_ignore_ascii_case("Reason") => {
                out.headers.push(h.clone())
            }
            _ => {}
        }
    }
    for h in body_headers(&resp.headers) {
        out.headers.push(h);
    }
    out.body = resp.body.clone();
    message::set_content_length(&mut out.headers, out.body.len());
    out
}

/// A response of the relay's own to `req`, with a reason phrase and a To tag.
pub fn local_response(req: &Request, code: u16, reason: &str, to_tag: Option<&str>) -> Response {
    message::response_for(req, code, Some(reason), to_tag)
}

/// The headers describing a request's body, for relaying it in a new request.
pub fn carried_body(req: &Request) -> (Vec<Header>, Vec<u8>) {
    (body_headers(&req.headers).collect(), req.body.clone())
}

/// The headers describing a response's body, and the body, for carrying it in a request.
pub fn carried_body_of_response(resp: &Response) -> (Vec<Header>, Vec<u8>) {
    (body_headers(&resp.headers).collect(), resp.body.clone())
}

/// A body and the headers describing it, as [`carried_body`] gives them, kept for later
/// (a session's current offer, which a transfer's inquiry and a session refresh send
/// again): one allocation — each header as a `Name: value` line, then the body — instead of
/// a list of parsed headers, each header's value and the body apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    bytes: Box<[u8]>,
    /// Where the header lines end and the body starts.
    head: u32,
}

impl Carried {
    /// Keeps `headers` (those [`carried_body`] picks: Content-Type, -Disposition,
    /// -Encoding, -Language) and `body`.
    pub fn of(headers: &[Header], body: &[u8]) -> Carried {
        let mut bytes = Vec::new();
        for h in headers {
            let (name, value) = sip_core::address::header_name_value(h);
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(b": ");
            // A header value holds no line break (the wire layer unfolds them).
            bytes.extend(value.bytes().filter(|&b| b != b'\n'));
            bytes.push(b'\n');
        }
        let head = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        bytes.extend_from_slice(body);
        Carried {
            bytes: bytes.into_boxed_slice(),
            head,
        }
    }

    /// The headers and the body again, to put in a request.
    pub fn parts(&self) -> (Vec<Header>, Vec<u8>) {
        let head = (self.head as usize).min(self.bytes.len());
        let (lines, body) = self.bytes.split_at(head);
        let headers = String::from_utf8_lossy(lines)
            .lines()
            .filter_map(|line| line.split_once(": "))
            .map(|(name, value)| match name {
                "Content-Type" => Header::ContentType(rsip::headers::ContentType::new(value)),
                "Content-Disposition" => {
                    Header::ContentDisposition(rsip::headers::ContentDisposition::new(value))
                }
                "Content-Encoding" => {
                    Header::ContentEncoding(rsip::headers::ContentEncoding::new(value))
                }
                _ => Header::Other(name.into(), value.into()),
            })
            .collect();
        (headers, body.to_vec())
    }
}

impl From<(Vec<Header>, Vec<u8>)> for Carried {
    fn from((headers, body): (Vec<Header>, Vec<u8>)) -> Carried {
        Carried::of(&headers, &body)
    }
}

/// Extracts the value of an extension header (`Header::Other`) by name, ignoring case.
pub fn other_header<'a>(headers: &'a rsip::Headers, name: &str) -> Option<&'a str> {
    headers.iter().find_map(|h| match h {
        Header::Other(n, v) if n.eq_ignore_ascii_case(name) => Some(v.as_str()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn terminal_invite() -> Request {
        let text = "INVITE sip:echo@relay.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
                    Max-Forwards: 70\r\nFrom: <sip:alice@relay.test>;tag=1\r\nTo: <sip:echo@relay.test>\r\n\
                    Call-ID: a@b\r\nCSeq: 2 INVITE\r\nContact: <sip:alice@127.0.0.1:5070>\r\n\
                    Content-Type: application/sdp\r\nContent-Length: 5\r\n\r\nv=0\r\n";
        match sip_core::wire::parse(text.as_bytes()).unwrap() {
            rsip::SipMessage::Request(r) => r,
            _ => panic!(),
        }
    }

    /// A kept body comes back as it went in: each header printed the same, in order, and
    /// the body byte for byte (binary too).
    #[test]
    fn a_carried_body_comes_back_whole() {
        let headers = vec![
            Header::ContentType(rsip::headers::ContentType::new(
                "multipart/mixed;boundary=\"b:1\"",
            )),
            Header::ContentDisposition(rsip::headers::ContentDisposition::new(
                "session;handling=required",
            )),
            Header::ContentEncoding(rsip::headers::ContentEncoding::new("gzip")),
            Header::Other("Content-Language".into(), "fr".into()),
        ];
        let body: Vec<u8> = b"v=0\r\n\xff\x00\n: x\r\n".to_vec();
        let kept = Carried::of(&headers, &body);
        let (again, body_again) = kept.parts();
        let printed = |hs: &[Header]| hs.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        assert_eq!(printed(&again), printed(&headers));
        assert!(
            matches!(again[0], Header::ContentType(_)),
            "typed again: {again:?}"
        );
        assert_eq!(body_again, body);
        assert_eq!(Carried::default().parts(), (Vec::new(), Vec::new()));
    }

    #[test]
    fn inquiry_asserts_identity_and_service_and_carries_the_offer() {
        let local = LocalAddr::new(Transport::Udp, "127.0.0.1:5060".parse().unwrap());
        let req = terminal_invite();
        let params = vec![("quality".to_string(), "hd".to_string())];
        let inv = inquiry_invite(&Inquiry {
            service: "echo",
            params: &params,
            subscriber: "alice",
            realm: "relay.test",
            server_hostport: "127.0.0.1:5080",
            terminal_request: &req,
            local: &local,
        })
        .unwrap();
        let text = String::from_utf8(message::to_bytes(inv.clone()).to_vec()).unwrap();
        assert!(
            text.starts_with("INVITE sip:echo@127.0.0.1:5080;quality=hd SIP/2.0\r\n"),
            "{text}"
        );
        assert!(
            text.contains("P-Asserted-Identity: <sip:alice@relay.test>\r\n"),
            "{text}"
        );
        assert!(text.contains("P-Asserted-Service: echo\r\n"), "{text}");
        assert!(text.contains("Max-Forwards: 69\r\n"), "{text}");
        assert!(text.contains("Content-Type: application/sdp\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nv=0\r\n"), "{text}");
        // A leg of its own: not the terminal's Call-ID.
        assert!(!text.contains("Call-ID: a@b"));
    }

    #[test]
    fn relayed_response_keeps_code_reason_and_body() {
        let req = terminal_invite();
        let resp = match sip_core::wire::parse(
            b"SIP/2.0 486 Busy Right Now\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=x\r\n\
              To: <sip:c@d>;tag=y\r\nCall-ID: other\r\nCSeq: 1 INVITE\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi",
        )
        .unwrap()
        {
            rsip::SipMessage::Response(r) => r,
            _ => panic!(),
        };
        let out = relayed_response(&req, &resp, Some("t1"), None);
        let text = String::from_utf8(message::to_bytes(out).to_vec()).unwrap();
        assert!(text.starts_with("SIP/2.0 486 Busy Right Now\r\n"), "{text}");
        assert!(text.contains("Call-ID: a@b\r\n"));
        assert!(text.contains("CSeq: 2 INVITE\r\n"));
        assert!(
            text.contains("To: <sip:echo@relay.test>;tag=t1\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Type: text/plain\r\n"));
        assert!(text.ends_with("\r\n\r\nhi"));
    }
}
