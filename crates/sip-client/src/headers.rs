//! Header values rsip gives no typed accessor for (Proxy-Authenticate, Refer-To, Event,
//! P-Preferred-Service…), read by name, and the few we write.

use rsip::headers::UntypedHeader as _;
use rsip::{Header, Headers, Method};
use sip_core::address::header_values;

/// The values of every header named `name` (case-insensitive, compact forms included), in
/// message order, trimmed; read with sip-core's [`header_values`]. The [`sip_core::wire`]
/// layer has already expanded compact names and split comma-joined values where RFC 3261
/// §7.3.1 allows it.
pub fn values(headers: &Headers, name: &str) -> Vec<String> {
    header_values(headers, name).map(str::to_string).collect()
}

/// The value of the first header named `name`, if any.
pub fn first(headers: &Headers, name: &str) -> Option<String> {
    values(headers, name).into_iter().next()
}

/// An extension header, `Name: value`.
pub fn other(name: &str, value: impl Into<String>) -> Header {
    Header::Other(name.to_string(), value.into())
}

/// The CSeq number and method of a message (`7 INVITE`), read here and by sip-core rather
/// than by rsip's typed header; `None` when absent or not in that form.
pub fn cseq(headers: &Headers) -> Option<(u32, Method)> {
    header_values(headers, "CSeq").find_map(cseq_value)
}

/// A CSeq value: the number and the method separated by any linear white space (RFC 3261
/// §20.16: `1*DIGIT LWS Method`), checked by [`sip_core::fields::cseq`] once the white
/// space is one space (that reader takes exactly one).
fn cseq_value(value: &str) -> Option<(u32, Method)> {
    let mut parts = value.split_ascii_whitespace();
    let (seq, method) = (parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    sip_core::fields::cseq(&format!("{seq} {method}"))
}

/// The status code and reason phrase of a response (the peer's phrase, kept by the wire
/// layer).
pub fn status(resp: &rsip::Response) -> (u16, String) {
    let text = resp.status_code.to_string();
    let reason = text
        .split_once(' ')
        .map(|(_, r)| r.to_string())
        .unwrap_or_default();
    (resp.status_code.code(), reason)
}

/// `Content-Type: <value>`.
pub fn content_type_header(value: &str) -> Header {
    Header::ContentType(rsip::headers::ContentType::new(value))
}

/// The methods this client accepts, for `Allow` (RFC 3261 §20.5).
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, NOTIFY, INFO";

/// `Allow: …` listing [`ALLOW`].
pub fn allow() -> Header {
    Header::Allow(rsip::headers::Allow::new(ALLOW))
}

/// `User-Agent: sip-client/<version>`.
pub fn user_agent() -> Header {
    Header::UserAgent(rsip::headers::UserAgent::new(format!(
        "sip-client/{}",
        env!("CARGO_PKG_VERSION")
    )))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn headers() -> Headers {
        Headers::from(vec![
            Header::CSeq(rsip::headers::CSeq::new("7 REFER")),
            other("Refer-To", "<sip:echo@relay.test>"),
            Header::ContentType(rsip::headers::ContentType::new(
                "Message/SipFrag;version=2.0",
            )),
            Header::ProxyAuthenticate(rsip::headers::ProxyAuthenticate::new(
                "Digest realm=\"a\", nonce=\"1\", algorithm=SHA-256",
            )),
            Header::ProxyAuthenticate(rsip::headers::ProxyAuthenticate::new(
                "Digest realm=\"a\", nonce=\"1\"",
            )),
        ])
    }

    #[test]
    fn reads_values_by_name() {
        let h = headers();
        assert_eq!(
            first(&h, "refer-to").as_deref(),
            Some("<sip:echo@relay.test>")
        );
        assert_eq!(values(&h, "Proxy-Authenticate").len(), 2);
        assert!(values(&h, "Proxy-Authenticate")[0].contains("SHA-256"));
        assert_eq!(first(&h, "Event"), None);
        assert_eq!(cseq(&h), Some((7, Method::Refer)));
    }

    #[test]
    fn cseq_is_read_without_rsip_typing() {
        let read = |v: &str| {
            cseq(&Headers::from(vec![Header::CSeq(
                rsip::headers::CSeq::new(v),
            )]))
        };
        assert_eq!(
            read("  42 \t  BYE "),
            Some((42, Method::Bye)),
            "any LWS between"
        );
        assert_eq!(read("42 BYE extra"), None);
        assert_eq!(read("42 bye"), None, "methods are case-sensitive");
        assert_eq!(read("42 BYE"), Some((42, Method::Bye)));
        assert_eq!(read(" 1 INVITE"), Some((1, Method::Invite)));
        assert_eq!(read("x INVITE"), None);
        assert_eq!(read("1"), None);
        assert_eq!(read("99999999999 INVITE"), None);
        assert_eq!(cseq(&Headers::default()), None);
    }
}
