//! SIP extensions the relay requires of nobody and supports for nobody: the `Require` /
//! `Proxy-Require` check of RFC 3261 §8.2.2.3 and §16.3 (step 5), answered `420 Bad
//! Extension` with an `Unsupported` header field listing the option tags not understood
//! (§20.40).
//!
//! The relay supports one option tag, session timers (`timer`, RFC 4028, on each leg of a
//! session: see `call::session_timer`). It does not do reliable provisionals (`100rel`, RFC
//! 3262), `Path` (RFC 3327) or outbound (RFC 5626) itself. A request that merely lists such
//! tags in `Supported` passes; only a request that *requires* one is refused.
//!
//! `Proxy-Require` is checked like `Require`. RFC 3261 §16.3 has a proxy refuse an unknown
//! `Proxy-Require` tag with the same 420; relayd is a B2BUA that challenges like a proxy
//! (407) and ends the request itself (its server legs are new requests that carry neither
//! header), so it is the element that would have to understand the tag.
//!
//! Only requests outside a dialog are checked here (the dispatcher calls [`check`] before
//! anything else, before authentication): inside a dialog the relay relays requests to the
//! far leg, whose user agent answers for the extensions that leg negotiated (the relay
//! passes `Require` on in relayed responses). ACK and CANCEL are never checked: §8.2.2.3
//! has these header fields ignored in them.

use rsip::prelude::*;
use rsip::{Header, Method, Request, Response};
use sip_core::address::header_values;

/// The option tags (RFC 3261 §19.2) the relay supports as a UAS: session timers (RFC 4028).
pub const SUPPORTED: &[&str] = &[sip_core::dialog::session_timer::OPTION_TAG];

/// The option tags of `req`'s `Require` and `Proxy-Require` header fields that the relay does
/// not support (RFC 3261 §8.2.2.3, §16.3), in order of appearance, each once (compared
/// ignoring case, spelled as first sent). Empty for ACK and CANCEL, whose `Require` and
/// `Proxy-Require` are to be ignored.
pub fn unsupported(req: &Request) -> Vec<String> {
    if matches!(req.method, Method::Ack | Method::Cancel) {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    let values =
        header_values(&req.headers, "Require").chain(header_values(&req.headers, "Proxy-Require"));
    for value in values {
        for tag in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let known = SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(tag));
            if !known && !out.iter().any(|t| t.eq_ignore_ascii_case(tag)) {
                out.push(tag.to_owned());
            }
        }
    }
    out
}

/// The `420 Bad Extension` for `req` when it requires an option tag the relay does not
/// support, with `Unsupported` listing those tags (RFC 3261 §8.2.2.3, §21.4.15); `None` when
/// it may go on.
pub fn check(req: &Request, to_tag: &str) -> Option<Response> {
    let tags = unsupported(req);
    if tags.is_empty() {
        return None;
    }
    let mut resp = sip_core::message::response_for(req, 420, Some("Bad Extension"), Some(to_tag));
    resp.headers
        .push(Header::Unsupported(rsip::headers::Unsupported::new(
            tags.join(", "),
        )));
    Some(resp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn request(method: &str, extra: &str) -> Request {
        let text = format!(
            "{method} sip:relay.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
             From: <sip:alice@relay.test>;tag=1\r\nTo: <sip:relay.test>\r\nCall-ID: a@b\r\n\
             CSeq: 1 {method}\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        match rsip::SipMessage::try_from(text.as_str()).unwrap() {
            rsip::SipMessage::Request(r) => r,
            _ => panic!("not a request"),
        }
    }

    #[test]
    fn no_require_passes() {
        assert!(unsupported(&request("OPTIONS", "")).is_empty());
        assert!(check(&request("INVITE", "Supported: timer, 100rel\r\n"), "t").is_none());
    }

    #[test]
    fn unknown_required_tags_are_listed_once_in_order() {
        let req = request(
            "OPTIONS",
            "Require: foo, 100rel\r\nRequire: FOO, timer\r\nProxy-Require: bar\r\n",
        );
        // `timer` is supported (RFC 4028): not listed.
        assert_eq!(unsupported(&req), ["foo", "100rel", "bar"]);
        let resp = check(&req, "t1").unwrap();
        assert_eq!(resp.status_code.code(), 420);
        let text = resp.to_string();
        assert!(text.starts_with("SIP/2.0 420 Bad Extension\r\n"), "{text}");
        assert!(text.contains("Unsupported: foo, 100rel, bar\r\n"), "{text}");
        assert!(text.contains("tag=t1"), "{text}");
        assert!(text.contains("CSeq: 1 OPTIONS"), "{text}");
    }

    #[test]
    fn proxy_require_alone_is_refused_too() {
        let req = request("REGISTER", "Proxy-Require: sec-agree\r\n");
        assert_eq!(unsupported(&req), ["sec-agree"]);
    }

    #[test]
    fn ack_and_cancel_are_never_refused() {
        for method in ["ACK", "CANCEL"] {
            let req = request(method, "Require: foo\r\nProxy-Require: bar\r\n");
            assert!(unsupported(&req).is_empty(), "{method}");
            assert!(check(&req, "t").is_none(), "{method}");
        }
    }

    #[test]
    fn every_other_method_is_checked() {
        for method in [
            "INVITE",
            "REGISTER",
            "MESSAGE",
            "OPTIONS",
            "SUBSCRIBE",
            "BYE",
        ] {
            let req = request(method, "Require: 100rel\r\n");
            assert_eq!(unsupported(&req), ["100rel"], "{method}");
        }
    }
}
