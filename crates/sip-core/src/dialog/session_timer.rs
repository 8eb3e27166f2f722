//! Session timers (RFC 4028): the header fields a dialog's session interval is negotiated
//! with, the negotiation of each side, and when refreshes are due.
//!
//! Plain functions over header fields, sans-IO like the rest of the dialog layer: a user
//! agent reads the peer's `Session-Expires` (§4), `Min-SE` (§5) and `Supported: timer`
//! with [`read`], decides as UAS with [`Policy::answer`] (§9) or as UAC from the 2xx with
//! [`Negotiated::from_2xx`] (§7.2), writes its own header fields with [`Negotiated::stamp`]
//! and [`Policy::stamp_request`], and schedules with [`refresh_after`] (§10: half the
//! interval) and [`expiry_guard`] (§10: the side that does not refresh gives up
//! `min(32 s, SE/3)` before the end). Whatever the peer wrote is read without panicking:
//! a value that is not a number reads as absent.

use std::time::Duration;

use rsip::prelude::*;
use rsip::{Header, Method};

use crate::address::header_values;

/// The option tag of the extension (RFC 4028 §3).
pub const OPTION_TAG: &str = "timer";

/// The smallest session interval RFC 4028 allows (§4: `Min-SE` is never below 90 s).
pub const RFC_MIN_SE: u32 = 90;

/// The session interval RFC 4028 recommends (§4: 1800 s).
pub const RFC_DEFAULT_SE: u32 = 1800;

/// Who refreshes a session (RFC 4028 §4 `refresher` parameter), relative to the
/// transaction that carries it: `uac` is the sender of the request, `uas` its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresher {
    /// The sender of the request refreshes.
    Uac,
    /// The receiver of the request refreshes.
    Uas,
}

impl Refresher {
    /// The parameter value (`uac`, `uas`).
    pub fn as_str(self) -> &'static str {
        match self {
            Refresher::Uac => "uac",
            Refresher::Uas => "uas",
        }
    }
}

/// What a message says about session timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimerFields {
    /// `Session-Expires` delta-seconds (RFC 4028 §4), when present and readable.
    pub session_expires: Option<u32>,
    /// Its `refresher` parameter, when present and one of `uac`, `uas`.
    pub refresher: Option<Refresher>,
    /// `Min-SE` delta-seconds (RFC 4028 §5), the largest when several are present.
    pub min_se: Option<u32>,
    /// Whether `Supported` lists `timer` (RFC 4028 §3).
    pub supported: bool,
    /// Whether `Require` lists `timer`.
    pub required: bool,
    /// Whether `Allow` lists `UPDATE` (RFC 3311), which refreshes without an offer.
    pub allows_update: bool,
}

/// Reads a delta-seconds value: digits only, saturating at `u32::MAX`.
fn delta_seconds(text: &str) -> Option<u32> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        text.parse::<u64>()
            .map_or(u32::MAX, |v| u32::try_from(v).unwrap_or(u32::MAX)),
    )
}

/// Whether a comma-separated list in the header fields called `name` holds `token`.
fn lists(headers: &rsip::Headers, name: &str, token: &str) -> bool {
    header_values(headers, name)
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Reads the session-timer fields of a request or response (RFC 4028 §4, §5, §3; compact
/// `x` and `k` included). Unreadable values count as absent.
pub fn read(headers: &rsip::Headers) -> TimerFields {
    let mut out = TimerFields::default();
    if let Some(value) = header_values(headers, "Session-Expires").next() {
        let mut parts = value.split(';');
        out.session_expires = parts.next().and_then(delta_seconds);
        for param in parts {
            let (name, v) = param.split_once('=').unwrap_or((param, ""));
            if name.trim().eq_ignore_ascii_case("refresher") {
                let v = v.trim();
                out.refresher = if v.eq_ignore_ascii_case("uac") {
                    Some(Refresher::Uac)
                } else if v.eq_ignore_ascii_case("uas") {
                    Some(Refresher::Uas)
                } else {
                    None
                };
            }
        }
    }
    out.min_se = header_values(headers, "Min-SE")
        .filter_map(|v| delta_seconds(v.split(';').next().unwrap_or("")))
        .max();
    out.supported = lists(headers, "Supported", OPTION_TAG);
    out.required = lists(headers, "Require", OPTION_TAG);
    out.allows_update = lists(headers, "Allow", Method::Update.to_string().as_str());
    out
}

/// A `Session-Expires` header field (RFC 4028 §4).
pub fn session_expires_header(secs: u32, refresher: Option<Refresher>) -> Header {
    let value = match refresher {
        Some(r) => format!("{secs};refresher={}", r.as_str()),
        None => secs.to_string(),
    };
    Header::Other("Session-Expires".into(), value)
}

/// A `Min-SE` header field (RFC 4028 §5).
pub fn min_se_header(secs: u32) -> Header {
    Header::Other("Min-SE".into(), secs.to_string())
}

/// `Supported: timer`.
pub fn supported_header() -> Header {
    Header::Supported(rsip::headers::Supported::new(OPTION_TAG))
}

/// Takes out what another leg's negotiation wrote: `Session-Expires`, `Min-SE`, and the
/// `timer` tag of `Require` (a `Require` left empty goes). A B2BUA calls this before it
/// writes its own leg's values on a relayed message.
pub fn strip(headers: &mut rsip::Headers) {
    let kept: Vec<Header> = headers
        .iter()
        .filter_map(|h| {
            let (name, value) = crate::address::header_name_value(h);
            if crate::address::same_header_name(name, "Session-Expires")
                || crate::address::same_header_name(name, "Min-SE")
            {
                return None;
            }
            if crate::address::same_header_name(name, "Require") {
                let rest: Vec<&str> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(OPTION_TAG))
                    .collect();
                if rest.is_empty() {
                    return None;
                }
                return Some(Header::Require(rsip::headers::Require::new(
                    rest.join(", "),
                )));
            }
            Some(h.clone())
        })
        .collect();
    *headers = kept.into();
}

/// A side's session-timer settings: the interval it asks for and the smallest it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The session interval asked for, and the largest accepted, in seconds (RFC 4028 §4).
    pub session_expires: u32,
    /// The smallest session interval accepted, in seconds (RFC 4028 §5: `Min-SE`).
    pub min_se: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            session_expires: RFC_DEFAULT_SE,
            min_se: RFC_MIN_SE,
        }
    }
}

/// A session interval both sides agreed on, as seen from one side of the dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The session interval in seconds.
    pub secs: u32,
    /// Whether this side refreshes (else the peer does).
    pub we_refresh: bool,
    /// Whether the peer supports the extension (it said `Supported: timer`, or asked for
    /// an interval itself).
    pub peer_supports: bool,
    /// Whether the peer allows `UPDATE` (a refresh then needs no offer, RFC 4028 §7.4).
    pub peer_allows_update: bool,
}

/// What a UAS answers to a dialog-creating or refreshing request (RFC 4028 §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UasAnswer {
    /// `422 Session Interval Too Small` with `Min-SE` of this many seconds (§6).
    TooSmall(u32),
    /// No session timer on this dialog: the peer neither asked for one nor supports it.
    None,
    /// A session timer with these values; [`Negotiated::stamp`] writes them on the 2xx.
    Timer(Negotiated),
}

impl Policy {
    /// The UAS's decision for request `req` (RFC 4028 §9). An interval under our `Min-SE`
    /// is refused with 422 when the peer supports the extension (§6), and raised to it
    /// otherwise (a proxy inserted it: the peer could not retry); a larger interval than
    /// ours is reduced to ours (never below the request's `Min-SE`). With no
    /// `Session-Expires` but `Supported: timer`, we ask for our own interval and the peer
    /// refreshes; with neither, there is no timer (§9: we could refresh ourselves, but a
    /// peer that does not know the extension is better watched by other means).
    pub fn answer(&self, fields: &TimerFields) -> UasAnswer {
        // Never below the request's Min-SE (90 s when it has none, §9) nor our own.
        let lower = fields
            .min_se
            .unwrap_or(RFC_MIN_SE.min(self.min_se))
            .max(self.min_se);
        let (secs, we_refresh) = match fields.session_expires {
            Some(asked) => {
                if asked < self.min_se && fields.supported {
                    return UasAnswer::TooSmall(self.min_se);
                }
                let secs = asked.min(self.session_expires).max(lower);
                // §9 table 2: the request's choice is copied; with none, the peer refreshes
                // when it supports the extension, we do otherwise.
                let we_refresh = match fields.refresher {
                    Some(Refresher::Uas) => true,
                    Some(Refresher::Uac) => false,
                    None => !fields.supported,
                };
                (secs, we_refresh)
            }
            None if fields.supported => (self.session_expires.max(lower), false),
            None => return UasAnswer::None,
        };
        UasAnswer::Timer(Negotiated {
            secs,
            we_refresh,
            peer_supports: fields.supported || fields.session_expires.is_some(),
            peer_allows_update: fields.allows_update,
        })
    }

    /// Writes what a UAC asks for on a dialog-creating request (RFC 4028 §7.1):
    /// `Supported: timer`, `Session-Expires: <secs>;refresher=uac` (we refresh) and our
    /// `Min-SE`. `secs` is our interval unless a 422 asked for more.
    pub fn stamp_request(&self, headers: &mut rsip::Headers, secs: u32) {
        strip(headers);
        headers.push(supported_header());
        headers.push(session_expires_header(secs, Some(Refresher::Uac)));
        headers.push(min_se_header(self.min_se));
    }
}

impl Negotiated {
    /// The UAC's view of the 2xx to its request (RFC 4028 §7.2): a `Session-Expires` in the
    /// 2xx sets the interval and who refreshes (`uac`: we do); none means no session timer
    /// (the peer does not support it, or turned it off).
    pub fn from_2xx(fields: &TimerFields) -> Option<Negotiated> {
        let secs = fields.session_expires?;
        Some(Negotiated {
            secs,
            // §7.2: a 2xx without the parameter came from a UAS that leaves it to us.
            we_refresh: fields.refresher != Some(Refresher::Uas),
            peer_supports: true,
            peer_allows_update: fields.allows_update,
        })
    }

    /// Writes the session-timer fields of a 2xx we send as UAS (RFC 4028 §9):
    /// `Session-Expires` with the refresher named relative to the request (`uas`: we
    /// refresh), `Require: timer` when the peer refreshes (it must know it does), and
    /// `Supported: timer`. Whatever another leg wrote is taken out first.
    pub fn stamp_2xx(&self, headers: &mut rsip::Headers) {
        strip(headers);
        let refresher = if self.we_refresh {
            Refresher::Uas
        } else {
            Refresher::Uac
        };
        headers.push(session_expires_header(self.secs, Some(refresher)));
        if !self.we_refresh {
            headers.push(Header::Require(rsip::headers::Require::new(OPTION_TAG)));
        }
        headers.push(supported_header());
    }

    /// Writes the session-timer fields of a refresh we send (RFC 4028 §7.4): the same
    /// interval, `refresher=uac` when we are the refresher (we send it), `uas` otherwise,
    /// and `Supported: timer` and `Min-SE` with `min_se`.
    pub fn stamp_refresh(&self, headers: &mut rsip::Headers, min_se: u32) {
        strip(headers);
        let refresher = if self.we_refresh {
            Refresher::Uac
        } else {
            Refresher::Uas
        };
        headers.push(supported_header());
        headers.push(session_expires_header(self.secs, Some(refresher)));
        headers.push(min_se_header(min_se.min(self.secs)));
    }

    /// The interval as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.secs))
    }
}

/// The `422 Session Interval Too Small` fields (RFC 4028 §6): `Min-SE` with the smallest
/// interval accepted.
pub fn too_small_headers(min_se: u32) -> Vec<Header> {
    vec![min_se_header(min_se)]
}

/// When the refresher sends its refresh after the last one (RFC 4028 §10: half the
/// interval is recommended).
pub fn refresh_after(secs: u32) -> Duration {
    Duration::from_millis(u64::from(secs) * 500)
}

/// When the side that does not refresh considers the session expired after the last
/// refresh (RFC 4028 §10: the interval less `min(32 s, interval/3)`, so that its BYE goes
/// before the refresher's own view of the end).
pub fn expiry_guard(secs: u32) -> Duration {
    let whole = Duration::from_secs(u64::from(secs));
    whole.saturating_sub(Duration::from_secs(32).min(whole / 3))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn headers(text: &str) -> rsip::Headers {
        let msg = format!(
            "INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
             From: <sip:a@b>;tag=1\r\nTo: <sip:b@b>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n{text}Content-Length: 0\r\n\r\n"
        );
        match crate::wire::parse(msg.as_bytes()).unwrap() {
            rsip::SipMessage::Request(r) => r.headers,
            rsip::SipMessage::Response(r) => r.headers,
        }
    }

    #[test]
    fn reads_the_fields_in_long_and_compact_form_and_ignores_garbage() {
        let f = read(&headers(
            "Session-Expires: 1800;refresher=uas\r\nMin-SE: 90\r\nMin-SE: 120\r\nSupported: 100rel, Timer\r\nAllow: INVITE, UPDATE\r\n",
        ));
        assert_eq!(f.session_expires, Some(1800));
        assert_eq!(f.refresher, Some(Refresher::Uas));
        assert_eq!(f.min_se, Some(120));
        assert!(f.supported && f.allows_update && !f.required);
        let f = read(&headers("x: 300\r\nk: timer\r\nRequire: timer\r\n"));
        assert_eq!((f.session_expires, f.refresher), (Some(300), None));
        assert!(f.supported && f.required);
        let f = read(&headers(
            "Session-Expires: soon;refresher=me\r\nMin-SE: -1\r\n",
        ));
        assert_eq!(f, TimerFields::default());
        let f = read(&headers("Session-Expires: 99999999999999999999\r\n"));
        assert_eq!(f.session_expires, Some(u32::MAX));
    }

    #[test]
    fn the_uas_refuses_too_small_reduces_too_large_and_picks_the_refresher() {
        let p = Policy::default();
        let ask = |t: &str| p.answer(&read(&headers(t)));
        assert_eq!(
            ask("Session-Expires: 60\r\nSupported: timer\r\n"),
            UasAnswer::TooSmall(90)
        );
        // Inserted by a proxy for a UA that does not know the extension: raised, we refresh.
        let UasAnswer::Timer(n) = ask("Session-Expires: 60\r\n") else {
            panic!()
        };
        assert_eq!((n.secs, n.we_refresh), (90, true));
        let UasAnswer::Timer(n) = ask("Session-Expires: 7200\r\nSupported: timer\r\n") else {
            panic!()
        };
        assert_eq!((n.secs, n.we_refresh), (1800, false));
        let UasAnswer::Timer(n) =
            ask("Session-Expires: 600;refresher=uas\r\nSupported: timer\r\nAllow: UPDATE\r\n")
        else {
            panic!()
        };
        assert_eq!(
            (n.secs, n.we_refresh, n.peer_allows_update),
            (600, true, true)
        );
        let UasAnswer::Timer(n) = ask("Supported: timer\r\nMin-SE: 2000\r\n") else {
            panic!()
        };
        assert_eq!((n.secs, n.we_refresh), (2000, false));
        assert_eq!(ask(""), UasAnswer::None);
    }

    #[test]
    fn stamps_replace_what_another_leg_wrote() {
        let mut h = headers(
            "Session-Expires: 90;refresher=uac\r\nRequire: timer, 100rel\r\nMin-SE: 90\r\n",
        );
        let n = Negotiated {
            secs: 1800,
            we_refresh: false,
            peer_supports: true,
            peer_allows_update: false,
        };
        n.stamp_2xx(&mut h);
        let f = read(&h);
        assert_eq!(
            (f.session_expires, f.refresher, f.min_se),
            (Some(1800), Some(Refresher::Uac), None)
        );
        let requires: Vec<&str> = header_values(&h, "Require").collect();
        assert_eq!(requires, ["100rel", "timer"]);
        let mut h = headers("Require: timer\r\n");
        Policy::default().stamp_request(&mut h, 1800);
        assert_eq!(header_values(&h, "Require").count(), 0);
        let f = read(&h);
        assert_eq!(
            (f.session_expires, f.refresher, f.min_se, f.supported),
            (Some(1800), Some(Refresher::Uac), Some(90), true)
        );
        assert_eq!(
            Negotiated::from_2xx(&f).map(|n| (n.secs, n.we_refresh)),
            Some((1800, true))
        );
    }

    #[test]
    fn refreshes_go_at_half_and_the_other_side_gives_up_before_the_end() {
        assert_eq!(refresh_after(1800), Duration::from_secs(900));
        assert_eq!(refresh_after(3), Duration::from_millis(1500));
        assert_eq!(expiry_guard(1800), Duration::from_secs(1768));
        assert_eq!(expiry_guard(90), Duration::from_secs(60));
        assert_eq!(expiry_guard(3), Duration::from_secs(2));
    }
}
