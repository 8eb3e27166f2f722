//! One-pass readers for the header fields every message is keyed on: the top Via's
//! transport, sent-by and parameters (RFC 3261 §17.1.3, §17.2.3, §18.2), the From/To tag
//! (§12) and the CSeq (§8.1.1.5).
//!
//! rsip's typed parsers read the same fields, but build a whole typed header and allocate an
//! error value for every alternative their tokenizers try; under sipp load that was about a
//! tenth of relayd's CPU. These readers take the spelling that every user agent we know sends
//! (`SIP/2.0/UDP host:port;branch=…`, `"Name" <uri>;tag=…`, `7 INVITE`) in one pass without
//! allocating, and answer `None` for anything else, so that the caller falls back to rsip:
//! where both read a field they agree (see the tests), and the odd spellings keep rsip's
//! reading.

use rsip::Method;

/// The top Via of a message, read in place: `SIP/2.0/<transport> <host>[:<port>]` followed
/// by `;name[=value]` parameters, with no whitespace or comma in between. The host may be an
/// IPv6 reference (`[2001:db8::1]`, RFC 3261 §25.1 `sent-by`, RFC 5118 §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViaView<'a> {
    /// The transport token as written (`UDP`, `TCP`, `TLS`, …).
    pub transport: &'a str,
    /// The sent-by host as written: a domain name, an IPv4 address, or an IPv6 reference
    /// with its brackets (`[2001:db8::1]`).
    pub host: &'a str,
    /// The sent-by port, when written.
    pub port: Option<u16>,
    /// The text of the parameters, from the first `;` (empty when there are none).
    params: &'a str,
}

/// Transports rsip knows by name; another token is left to rsip.
const TRANSPORTS: [&str; 7] = ["UDP", "TCP", "TLS", "SCTP", "TLS-SCTP", "WS", "WSS"];

impl<'a> ViaView<'a> {
    /// Reads a Via header value; `None` when it is not in the plain form described above.
    pub fn parse(value: &'a str) -> Option<ViaView<'a>> {
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        let rest = value.strip_prefix("SIP/2.0/")?;
        let (transport, rest) = rest.split_once(' ')?;
        if !TRANSPORTS.contains(&transport) {
            return None;
        }
        let end = rest.find(';').unwrap_or(rest.len());
        let (sent_by, params) = rest.split_at(end);
        let (host, port) = if sent_by.starts_with('[') {
            // An IPv6 reference: `[addr]` then an optional `:port`.
            let close = sent_by.find(']')?;
            sent_by[1..close].parse::<std::net::Ipv6Addr>().ok()?;
            let (host, rest) = sent_by.split_at(close + 1);
            let port = match rest {
                "" => None,
                _ => Some(parse_port(rest.strip_prefix(':')?)?),
            };
            (host, port)
        } else {
            let (host, port) = match sent_by.split_once(':') {
                Some((host, port)) => (host, Some(parse_port(port)?)),
                None => (sent_by, None),
            };
            if host.is_empty() || !host.bytes().all(is_host_char) || !looks_like_host(host) {
                return None;
            }
            (host, port)
        };
        let view = ViaView {
            transport,
            host,
            port,
            params,
        };
        for (name, value) in view.raw_params() {
            if name.is_empty() || !name.bytes().all(is_token_char) {
                return None;
            }
            if let Some(v) = value {
                if v.is_empty() || !v.bytes().all(is_value_char) {
                    return None;
                }
            }
        }
        Some(view)
    }

    fn raw_params(&self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
        self.params
            .split(';')
            .skip(1)
            .map(|p| match p.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (p, None),
            })
    }

    /// The parameters in order, as `(name, value)`.
    pub fn params(&self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
        self.raw_params()
    }

    /// The first parameter called `name` (ASCII case ignored): `Some(None)` when it has no
    /// value, `None` when it is absent.
    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        self.raw_params()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The branch parameter (§8.1.1.7): the first `branch=` with a value, as rsip reads it;
    /// `None` when absent.
    pub fn branch(&self) -> Option<&'a str> {
        self.raw_params()
            .find_map(|(n, v)| if n == "branch" { v } else { None })
    }

    /// The sent-by host as an IP address (an IPv6 reference without its brackets); `None`
    /// for a domain name.
    pub fn host_ip(&self) -> Option<std::net::IpAddr> {
        parse_ip(self.host)
    }

    /// The `received` parameter (RFC 3261 §18.2.1) as an IP address: IPv4, or IPv6 with or
    /// without brackets (RFC 5118 §4.5 writes it bare). `None` when absent or not an address.
    pub fn received(&self) -> Option<std::net::IpAddr> {
        self.raw_params()
            .find_map(|(n, v)| {
                if n.eq_ignore_ascii_case("received") {
                    v
                } else {
                    None
                }
            })
            .and_then(parse_ip)
    }

    /// The sent-by as rsip writes it: `host` or `host:port` (an IPv6 host in brackets).
    pub fn sent_by(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{port}", self.host),
            None => self.host.to_string(),
        }
    }

    /// Whether any parameter name is spelled otherwise than rsip's lower case for the
    /// parameters it knows: such a Via is left to rsip.
    pub(crate) fn has_unusual_param_names(&self) -> bool {
        self.raw_params().any(|(n, _)| {
            n.bytes().any(|b| b.is_ascii_uppercase())
                && ["branch", "received", "rport", "ttl", "maddr"]
                    .iter()
                    .any(|k| n.eq_ignore_ascii_case(k))
        })
    }
}

fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn is_host_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-'
}

/// A dotted quad is read only when it is a valid IPv4 address: `999.1.1.1` is left to rsip.
fn looks_like_host(host: &str) -> bool {
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return host.parse::<std::net::Ipv4Addr>().is_ok();
    }
    !host.starts_with(['.', '-']) && !host.ends_with('-')
}

/// RFC 3261 §25.1 `token` characters.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

/// A parameter value: a token, or an IPv4 or IPv6 address or host (`received=`, `maddr=`;
/// an IPv6 address bare or in brackets).
fn is_value_char(b: u8) -> bool {
    is_token_char(b) || matches!(b, b':' | b'[' | b']')
}

/// An IP address, an IPv6 one bare or in brackets.
fn parse_ip(text: &str) -> Option<std::net::IpAddr> {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse().ok()
}

/// The tag parameter of a From or To header value (§19.3): `Some(Some(tag))`,
/// `Some(None)` when the header has no tag, `None` when the value is not in the plain
/// `["Name"|Name] <uri>[;param…]` form (the caller then asks rsip).
pub fn tag(value: &str) -> Option<Option<&str>> {
    let value = value.trim_matches(|c| c == ' ' || c == '\t');
    // Past a quoted display name, which may hold any character.
    let rest = match value.strip_prefix('"') {
        Some(quoted) => {
            let mut escaped = false;
            let mut end = None;
            for (i, c) in quoted.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            &quoted[end? + 1..]
        }
        None => value,
    };
    let open = rest.find('<')?;
    if rest[..open].contains(['"', ';', ',', '>']) {
        return None;
    }
    let close = open + rest[open..].find('>')?;
    let params = &rest[close + 1..];
    if params.is_empty() {
        return Some(None);
    }
    let params = params.strip_prefix(';')?;
    let mut found = None;
    for p in params.split(';') {
        let (name, v) = match p.split_once('=') {
            Some((name, v)) => (name, Some(v)),
            None => (p, None),
        };
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return None;
        }
        if let Some(v) = v {
            if v.is_empty() || !v.bytes().all(is_token_char) {
                return None;
            }
        }
        if name.eq_ignore_ascii_case("tag") {
            if name != "tag" || found.is_some() {
                // A spelling or a repetition left to rsip.
                return None;
            }
            found = Some(v?);
        }
    }
    Some(found)
}

/// The tag of a From or To header value (§19.3), read by [`tag`] where it can and by
/// [`crate::address::FromTo`] otherwise (any legal spelling: bare addr-spec, IPv6, `tel:`,
/// quoted parameters…): `Ok(None)` when there is none, `Err` when the value is not a
/// name-addr or addr-spec (the error's text says why).
pub fn tag_of(value: &str) -> Result<Option<std::borrow::Cow<'_, str>>, rsip::Error> {
    match tag(value) {
        Some(t) => Ok(t.map(std::borrow::Cow::Borrowed)),
        None => match crate::address::FromTo::parse(value) {
            Ok(v) => Ok(v.tag().map(|t| std::borrow::Cow::Owned(t.to_string()))),
            Err(e) => Err(rsip::Error::ParseError(e.to_string())),
        },
    }
}

/// A CSeq header value's number and method, read by [`cseq`] where it can and by rsip
/// otherwise; `None` when neither can.
pub fn cseq_of(value: &str) -> Option<(u32, Method)> {
    use rsip::headers::{ToTypedHeader as _, UntypedHeader as _};
    cseq(value).or_else(|| {
        rsip::headers::CSeq::new(value)
            .typed()
            .ok()
            .map(|c| (c.seq, c.method))
    })
}

/// A CSeq header value (`7 INVITE`; RFC 3261 §20.16, any linear white space between the
/// number and the method): its number and method; `None` when not in that form.
pub fn cseq(value: &str) -> Option<(u32, Method)> {
    let is_ws = |c: char| c == ' ' || c == '\t';
    let value = value.trim_matches(is_ws);
    let (seq, method) = value.split_once(is_ws)?;
    let method = method.trim_start_matches(is_ws);
    if seq.is_empty() || seq.len() > 10 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    Some((seq.parse().ok()?, method.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;
    use rsip::prelude::*;

    /// rsip's reading of a Via value: transport, sent-by and branch.
    fn rsip_via(value: &str) -> Option<(String, String, Option<String>)> {
        let typed = rsip::headers::Via::new(value).typed().ok()?;
        Some((
            typed.transport.to_string(),
            typed.uri.host_with_port.to_string(),
            typed.branch().map(|b| b.to_string()),
        ))
    }

    fn rsip_tag(value: &str) -> Option<Option<String>> {
        rsip::headers::From::new(value)
            .tag()
            .ok()
            .map(|t| t.map(|t| t.value().to_string()))
    }

    #[test]
    fn reads_the_plain_via() {
        let v = ViaView::parse("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc;rport").unwrap();
        assert_eq!(v.transport, "UDP");
        assert_eq!(v.host, "127.0.0.1");
        assert_eq!(v.port, Some(5070));
        assert_eq!(v.branch(), Some("z9hG4bKabc"));
        assert_eq!(v.param("rport"), Some(None));
        assert_eq!(v.param("RPORT"), Some(None));
        assert_eq!(v.param("received"), None);
        assert_eq!(v.sent_by(), "127.0.0.1:5070");
        let v = ViaView::parse("SIP/2.0/TCP client.example.com;branch=z9hG4bK1").unwrap();
        assert_eq!((v.host, v.port), ("client.example.com", None));
        assert_eq!(v.sent_by(), "client.example.com");
    }

    #[test]
    fn leaves_odd_vias_to_rsip() {
        for odd in [
            "SIP / 2.0 / UDP host;branch=z9hG4bK1",
            "SIP/2.0/UDP  host;branch=z9hG4bK1",
            "SIP/2.0/UDP host ; branch=z9hG4bK1",
            "SIP/2.0/UDP [2001:db8::1;branch=z9hG4bK1",
            "SIP/2.0/UDP [2001:db8::g]:5060;branch=z9hG4bK1",
            "SIP/2.0/UDP [::1]5060;branch=z9hG4bK1",
            "SIP/2.0/UDP [::1]:;branch=z9hG4bK1",
            "SIP/2.0/UDP host:99999;branch=z9hG4bK1",
            "SIP/2.0/UDP host;branch=\"quoted\"",
            "SIP/2.0/UDP host;branch=",
            "SIP/2.0/FOO host;branch=z9hG4bK1",
            "SIP/2.0/UDP a, SIP/2.0/UDP b",
            "SIP/2.0/UDP 999.1.1.1;branch=z9hG4bK1",
        ] {
            assert_eq!(ViaView::parse(odd), None, "{odd}");
        }
    }

    #[test]
    fn reads_ipv6_sent_by_and_received() {
        let v = ViaView::parse(
            "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKv6;received=2001:db8::9;rport=5070",
        )
        .unwrap();
        assert_eq!(v.host, "[2001:db8::1]");
        assert_eq!(v.port, Some(5060));
        assert_eq!(v.host_ip(), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(v.sent_by(), "[2001:db8::1]:5060");
        assert_eq!(v.branch(), Some("z9hG4bKv6"));
        assert_eq!(v.received(), Some("2001:db8::9".parse().unwrap()));
        assert_eq!(v.param("rport"), Some(Some("5070")));
        let v = ViaView::parse("SIP/2.0/TLS [::1];branch=z9hG4bK2;received=[2001:db8::7]").unwrap();
        assert_eq!((v.host, v.port), ("[::1]", None));
        assert_eq!(v.sent_by(), "[::1]");
        assert_eq!(v.received(), Some("2001:db8::7".parse().unwrap()));
        let v = ViaView::parse("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK3;received=192.0.2.1").unwrap();
        assert_eq!(v.received(), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(v.host_ip(), Some("10.0.0.1".parse().unwrap()));
        let v = ViaView::parse("SIP/2.0/UDP h.test;branch=z9hG4bK3;received=x").unwrap();
        assert_eq!((v.received(), v.host_ip()), (None, None));
    }

    #[test]
    fn tag_of_reads_what_rsip_cannot() {
        assert_eq!(
            tag_of("<sip:bob@[2001:db8::10]:5070>;tag=v6")
                .unwrap()
                .as_deref(),
            Some("v6")
        );
        assert_eq!(
            tag_of("<tel:+1-555-123-4567>;tag=t1").unwrap().as_deref(),
            Some("t1")
        );
        assert_eq!(
            tag_of("<sip:a@b.test>;x=\"a;b\";tag=q").unwrap().as_deref(),
            Some("q")
        );
        assert_eq!(
            tag_of("<sip:a@b.test>;TAG=up").unwrap().as_deref(),
            Some("up")
        );
        assert!(tag_of("<sip:a@b.test").is_err());
    }

    #[test]
    fn reads_tags() {
        assert_eq!(tag("<sip:alice@relay.test>;tag=f1"), Some(Some("f1")));
        assert_eq!(tag("<sip:echo@relay.test>"), Some(None));
        assert_eq!(
            tag("\"Alice; <the> \\\"first\\\"\" <sip:a@b;transport=tcp>;x=1;tag=9f"),
            Some(Some("9f"))
        );
        assert_eq!(tag("Alice <sip:a@b>;tag=t"), Some(Some("t")));
        // Forms left to rsip: no angle brackets, an odd spelling, a repetition.
        assert_eq!(tag("sip:a@b;tag=t"), None);
        assert_eq!(tag("<sip:a@b>;TAG=t"), None);
        assert_eq!(tag("<sip:a@b>;tag=t;tag=u"), None);
        assert_eq!(tag("<sip:a@b> ;tag=t"), None);
    }

    #[test]
    fn tag_of_falls_back_to_rsip() {
        assert_eq!(tag_of("<sip:a@b>;tag=x").unwrap().as_deref(), Some("x"));
        assert_eq!(tag_of("<sip:a@b>").unwrap().as_deref(), None);
        // Left to rsip by the one-pass reader, read by rsip.
        assert_eq!(tag("sip:a@b;tag=y"), None);
        assert_eq!(
            tag_of("sip:a@b;tag=y").unwrap().as_deref(),
            rsip_tag("sip:a@b;tag=y").flatten().as_deref()
        );
    }

    #[test]
    fn cseq_of_falls_back_to_rsip() {
        assert_eq!(cseq_of("7  INVITE"), Some((7, Method::Invite)));
        assert_eq!(cseq_of("seven INVITE"), None);
    }

    #[test]
    fn reads_cseq() {
        assert_eq!(cseq("7 INVITE"), Some((7, Method::Invite)));
        assert_eq!(cseq(" 4294967295 BYE "), Some((u32::MAX, Method::Bye)));
        assert_eq!(cseq("4294967296 BYE"), None);
        // Any linear white space between number and method (RFC 3261 §20.16, LWS).
        assert_eq!(cseq("7  INVITE"), Some((7, Method::Invite)));
        assert_eq!(cseq("7\t \tBYE"), Some((7, Method::Bye)));
        assert_eq!(cseq("7"), None);
        assert_eq!(cseq("7 "), None);
        assert_eq!(cseq("x INVITE"), None);
        assert_eq!(cseq("7 invite"), None);
    }

    #[test]
    fn agrees_with_rsip_on_the_examples() {
        for value in [
            "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc;rport",
            "SIP/2.0/TCP client.example.com;branch=z9hG4bK1;received=192.0.2.1",
            "SIP/2.0/TLS 192.0.2.9;branch=z9hG4bK1;rport=5061",
            "SIP/2.0/UDP h.test:05060;branch=z9hG4bK1",
            "SIP/2.0/UDP h.test:5060;ttl=3;maddr=192.0.2.1;branch=z9hG4bK.x-y_z",
        ] {
            let ours = ViaView::parse(value).unwrap();
            let theirs = rsip_via(value).unwrap();
            assert_eq!(ours.transport, theirs.0, "{value}");
            assert_eq!(ours.sent_by(), theirs.1, "{value}");
            assert_eq!(ours.branch().map(str::to_string), theirs.2, "{value}");
        }
    }

    fn token() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9][a-zA-Z0-9.!%*_+`'~-]{0,12}"
    }

    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u8..=255, 0u8..=255, 0u8..=255, 1u8..=254)
                .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
            "[a-z][a-z0-9-]{0,8}(\\.[a-z][a-z0-9]{0,6}){0,3}",
        ]
    }

    proptest! {
        /// Wherever the one-pass reader reads a Via, rsip reads the same transport, sent-by
        /// and branch.
        #[test]
        fn via_agrees_with_rsip(
            transport in prop::sample::select(vec!["UDP", "TCP", "TLS", "SCTP", "WS", "WSS"]),
            host in host(),
            port in prop::option::of(1u16..),
            params in prop::collection::vec(
                (prop_oneof![token(), Just("branch".to_string()), Just("rport".to_string()),
                             Just("received".to_string())],
                 prop::option::of(token())),
                0..5),
        ) {
            let mut value = format!("SIP/2.0/{transport} {host}");
            if let Some(p) = port {
                value.push_str(&format!(":{p}"));
            }
            for (name, v) in &params {
                value.push(';');
                value.push_str(name);
                if let Some(v) = v {
                    value.push('=');
                    value.push_str(v);
                }
            }
            if let Some(ours) = ViaView::parse(&value) {
                if !ours.has_unusual_param_names() {
                    if let Some(theirs) = rsip_via(&value) {
                        prop_assert_eq!(ours.transport, theirs.0.as_str());
                        prop_assert_eq!(ours.sent_by(), theirs.1);
                        prop_assert_eq!(ours.branch().map(str::to_string), theirs.2);
                    }
                }
            }
        }

        /// Wherever the one-pass reader reads a tag, rsip reads the same one.
        #[test]
        fn tag_agrees_with_rsip(
            name in prop::option::of("[A-Za-z ]{1,10}"),
            quoted in any::<bool>(),
            user in "[a-z0-9]{1,8}",
            host in host(),
            params in prop::collection::vec(
                (prop_oneof![token(), Just("tag".to_string())], prop::option::of(token())),
                0..4),
        ) {
            let mut value = String::new();
            if let Some(n) = &name {
                if quoted {
                    value.push_str(&format!("\"{n}\" "));
                } else {
                    value.push_str(&format!("{} ", n.trim()));
                }
            }
            value.push_str(&format!("<sip:{user}@{host}>"));
            for (n, v) in &params {
                value.push(';');
                value.push_str(n);
                if let Some(v) = v {
                    value.push('=');
                    value.push_str(v);
                }
            }
            if let Some(ours) = tag(&value) {
                if let Some(theirs) = rsip_tag(&value) {
                    prop_assert_eq!(ours.map(str::to_string), theirs, "{}", value);
                }
            }
        }
    }
}
