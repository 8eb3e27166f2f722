//! What relayd accepts in the body of a new INVITE, and in the body it would answer with
//! (RFC 3261 §8.2.3, §21.4.7, §21.4.19; RFC 4475 §3.3.6 and §3.3.15): the relay relays
//! session descriptions only, so an offer in another media type gets `415 Unsupported Media
//! Type` with the `Accept` it takes, and a request whose `Accept` rules out SDP (the type
//! of every answer the relay relays) gets `406 Not Acceptable`. Checked before
//! authentication, like the other header inspections of §8.2.2: neither answer says
//! anything about a user.

use rsip::prelude::*;
use rsip::{Header, Request};
use sip_core::address::header_values;

/// The media type of the bodies the relay relays on INVITE (RFC 4566).
pub const SDP: &str = "application/sdp";

/// The content type of a charge request (docs/protocol.md, claim 4).
pub const CHARGE_CONTENT_TYPE: &str = "application/vnd.relay.charge+json";

/// Whether a request is a charge request (by its Content-Type).
pub fn is_charge(req: &Request) -> bool {
    req.headers.iter().any(|h| match h {
        Header::ContentType(c) => c
            .value()
            .trim()
            .to_ascii_lowercase()
            .starts_with(CHARGE_CONTENT_TYPE),
        _ => false,
    })
}

/// Why a new INVITE is refused for its content, with the status and phrase to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `415 Unsupported Media Type`: the body is not SDP (§21.4.13); the answer carries
    /// `Accept: application/sdp`.
    UnsupportedMediaType,
    /// `406 Not Acceptable`: the request's `Accept` excludes SDP (§21.4.7).
    NotAcceptable,
}

impl Refusal {
    /// The status code and reason phrase.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            Refusal::UnsupportedMediaType => (415, "Unsupported Media Type"),
            Refusal::NotAcceptable => (406, "Not Acceptable"),
        }
    }
}

/// Checks an INVITE's body type and its `Accept` (RFC 3261 §8.2.3). An INVITE with no body
/// (an offer to come in the ACK) passes; `Content-Type` names the body's type, parameters
/// ignored, case-insensitively (RFC 2045 §5.1); `multipart/*` is not relayed either.
pub fn check_invite(req: &Request) -> Option<Refusal> {
    if !req.body.is_empty() {
        // §7.4.1: a body with no Content-Type is not one we can read as SDP either.
        let is_sdp = header_values(&req.headers, "Content-Type")
            .next()
            .is_some_and(|t| media_type(t).eq_ignore_ascii_case(SDP));
        if !is_sdp {
            return Some(Refusal::UnsupportedMediaType);
        }
    }
    let mut accepts = header_values(&req.headers, "Accept").peekable();
    // No Accept: application/sdp is assumed (§20.1). An empty one accepts no body at all.
    accepts.peek()?;
    let takes_sdp = accepts
        .flat_map(|v| v.split(','))
        .map(media_type)
        .any(|range| {
            range.eq_ignore_ascii_case(SDP)
                || range == "*/*"
                || range.eq_ignore_ascii_case("application/*")
        });
    (!takes_sdp).then_some(Refusal::NotAcceptable)
}

/// The `type/subtype` of a media type or range, without parameters or spaces.
fn media_type(value: &str) -> &str {
    value.split(';').next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn invite(extra: &str, body: &str) -> Request {
        let text = format!(
            "INVITE sip:echo@relay.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKx\r\n\
             From: <sip:alice@relay.test>;tag=a\r\nTo: <sip:echo@relay.test>\r\nCall-ID: c\r\n\
             CSeq: 1 INVITE\r\nMax-Forwards: 70\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        match sip_core::wire::parse(text.as_bytes()).unwrap() {
            rsip::SipMessage::Request(r) => r,
            rsip::SipMessage::Response(_) => unreachable!(),
        }
    }

    #[test]
    fn sdp_offers_and_empty_invites_pass() {
        assert_eq!(check_invite(&invite("", "")), None);
        let sdp = "v=0\r\n";
        assert_eq!(
            check_invite(&invite("Content-Type: application/sdp\r\n", sdp)),
            None
        );
        assert_eq!(
            check_invite(&invite(
                "Content-Type: Application/SDP; charset=utf-8\r\n",
                sdp
            )),
            None
        );
        assert_eq!(
            check_invite(&invite(
                "Content-Type: application/sdp\r\nAccept: text/plain, application/sdp\r\n",
                sdp
            )),
            None
        );
        assert_eq!(check_invite(&invite("Accept: */*\r\n", "")), None);
        assert_eq!(check_invite(&invite("Accept: application/*\r\n", "")), None);
    }

    #[test]
    fn other_bodies_are_415() {
        let refused = check_invite(&invite(
            "Content-Type: application/unknownformat\r\n",
            "<audio/>",
        ));
        assert_eq!(refused, Some(Refusal::UnsupportedMediaType));
        assert_eq!(refused.unwrap().status().0, 415);
        assert_eq!(
            check_invite(&invite("", "v=0\r\n")),
            Some(Refusal::UnsupportedMediaType),
            "a body without a Content-Type"
        );
    }

    #[test]
    fn an_accept_without_sdp_is_406() {
        let refused = check_invite(&invite(
            "Content-Type: application/sdp\r\nAccept: text/nobodyKnowsThis\r\n",
            "v=0\r\n",
        ));
        assert_eq!(refused, Some(Refusal::NotAcceptable));
        assert_eq!(refused.unwrap().status().0, 406);
    }
}
