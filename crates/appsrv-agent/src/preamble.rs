//! The session context a `tcp://` backend is told before the terminal's first byte
//! (`docs/protocol.md`, "Backend preamble"): who is connected — the session id, the
//! subscriber the relay asserted, the service and its parameters, the terminal's address —
//! so that an application server that only sees a TCP connection knows whom it serves and
//! which session to charge.
//!
//! Three formats, chosen per service (`[[services]] preamble`):
//! * `none` — nothing: the backend's own protocol from the first byte;
//! * `json` — one line of JSON ([`JsonPreamble`]) ending in `\n`;
//! * `proxy-v2` — a PROXY protocol version 2 header (HAProxy's specification, "2.2. Binary
//!   header format"): command `PROXY`, TCP over IPv4 or IPv6 with the terminal as source and
//!   the data gateway as destination, followed by TLVs: `PP2_TYPE_UNIQUE_ID` (0x05) with the
//!   session id when it fits in 128 bytes, and the custom types [`TLV_SESSION_ID`],
//!   [`TLV_SUBSCRIBER`], [`TLV_SERVICE`] and [`TLV_PARAMS`] (UTF-8 text).
//!
//! Encoding is a pure function; [`parse_proxy_v2`] and [`JsonPreamble::parse`] read them back,
//! for Rust backends and for the tests.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// The PROXY protocol v2 signature: the first 12 bytes of every v2 header.
pub const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// `PP2_TYPE_UNIQUE_ID`: the session id, when it is at most 128 bytes long.
pub const TLV_UNIQUE_ID: u8 = 0x05;
/// Custom TLV: the session id (the Call-ID of the relay's leg to this server), any length.
pub const TLV_SESSION_ID: u8 = 0xE0;
/// Custom TLV: the subscriber the relay asserted.
pub const TLV_SUBSCRIBER: u8 = 0xE1;
/// Custom TLV: the service delivered.
pub const TLV_SERVICE: u8 = 0xE2;
/// Custom TLV: the service parameters as `name=value;flag` text (empty when none).
pub const TLV_PARAMS: u8 = 0xE3;
/// The longest unique id `PP2_TYPE_UNIQUE_ID` may carry.
const UNIQUE_ID_MAX: usize = 128;
/// The version of the JSON preamble's fields.
pub const JSON_VERSION: u32 = 1;

/// Service parameters as a backend sees them: name to value (`None` for a bare flag); a
/// name given twice keeps its last value.
pub type ParamMap = BTreeMap<String, Option<String>>;

/// What a backend is told before the terminal's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PreambleFormat {
    /// Nothing.
    #[default]
    None,
    /// One JSON line.
    Json,
    /// A PROXY protocol v2 header with TLVs.
    ProxyV2,
}

impl PreambleFormat {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            PreambleFormat::None => "none",
            PreambleFormat::Json => "json",
            PreambleFormat::ProxyV2 => "proxy-v2",
        }
    }
}

impl fmt::Display for PreambleFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a preamble format name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown preamble {0:?} (expected none, json or proxy-v2)")]
pub struct PreambleFormatError(String);

impl FromStr for PreambleFormat {
    type Err = PreambleFormatError;

    fn from_str(s: &str) -> Result<PreambleFormat, PreambleFormatError> {
        match s.trim() {
            "none" => Ok(PreambleFormat::None),
            "json" => Ok(PreambleFormat::Json),
            "proxy-v2" => Ok(PreambleFormat::ProxyV2),
            other => Err(PreambleFormatError(other.to_string())),
        }
    }
}

/// The session a data connection belongs to, as far as the agent knows it when the
/// connection is handed its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionContext {
    /// The session id: the Call-ID of the relay's leg to this server.
    pub session_id: String,
    /// The subscriber the relay asserted (`P-Asserted-Identity`).
    pub subscriber: String,
    /// The service delivered (`P-Asserted-Service`).
    pub service: String,
    /// The service parameters, in the order the relay wrote them.
    pub params: Vec<(String, Option<String>)>,
}

/// The JSON preamble: one object on one line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JsonPreamble {
    /// [`JSON_VERSION`].
    pub version: u32,
    /// The session id (the Call-ID of the relay's leg to this server): what the control
    /// API and the relay's charge records call the session.
    pub session_id: String,
    /// The subscriber the relay asserted.
    pub subscriber: String,
    /// The service delivered.
    pub service: String,
    /// Its parameters.
    pub params: ParamMap,
    /// The terminal's address, as the data gateway sees it.
    pub terminal: SocketAddr,
    /// The data gateway's address the terminal connected to.
    pub gateway: SocketAddr,
}

/// Why a preamble could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    /// Fewer bytes than the header says.
    #[error("the preamble is cut short")]
    Truncated,
    /// Not a PROXY v2 header (signature, version or command).
    #[error("not a PROXY protocol v2 header: {0}")]
    NotProxyV2(&'static str),
    /// A TLV runs past the header's end, or a text TLV is not UTF-8.
    #[error("bad TLV: {0}")]
    BadTlv(&'static str),
    /// The JSON line does not parse.
    #[error("bad JSON preamble: {0}")]
    BadJson(String),
}

/// The parameters as `name=value;flag` text, in order.
pub fn params_text(params: &[(String, Option<String>)]) -> String {
    params
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k.clone(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The parameters as a map.
pub fn param_map(params: &[(String, Option<String>)]) -> ParamMap {
    params.iter().cloned().collect()
}

/// The bytes to send a backend before the terminal's: empty for [`PreambleFormat::None`].
/// `terminal` is the terminal's address and `gateway` the address it connected to.
pub fn encode(
    format: PreambleFormat,
    ctx: &SessionContext,
    terminal: SocketAddr,
    gateway: SocketAddr,
) -> Vec<u8> {
    match format {
        PreambleFormat::None => Vec::new(),
        PreambleFormat::Json => encode_json(ctx, terminal, gateway),
        PreambleFormat::ProxyV2 => encode_proxy_v2(ctx, terminal, gateway),
    }
}

fn encode_json(ctx: &SessionContext, terminal: SocketAddr, gateway: SocketAddr) -> Vec<u8> {
    let preamble = JsonPreamble {
        version: JSON_VERSION,
        session_id: ctx.session_id.clone(),
        subscriber: ctx.subscriber.clone(),
        service: ctx.service.clone(),
        params: param_map(&ctx.params),
        terminal: canonical(terminal),
        gateway: canonical(gateway),
    };
    // Serialising plain strings, numbers and maps of strings cannot fail; an empty object
    // would still be one line.
    let mut line = serde_json::to_vec(&preamble).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    line
}

/// An address with an IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4
/// peer) written as the IPv4 address it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn push_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    // Values longer than a TLV can say are cut: nothing the agent sends comes near 64 KiB.
    let len = value.len().min(u16::MAX as usize);
    out.push(kind);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&value[..len]);
}

fn encode_proxy_v2(ctx: &SessionContext, terminal: SocketAddr, gateway: SocketAddr) -> Vec<u8> {
    let (src, dst) = (canonical(terminal), canonical(gateway));
    let mut body = Vec::with_capacity(128);
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x11
        }
        (s, d) => {
            body.extend_from_slice(&v6(s).octets());
            body.extend_from_slice(&v6(d).octets());
            0x21
        }
    };
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    if ctx.session_id.len() <= UNIQUE_ID_MAX {
        push_tlv(&mut body, TLV_UNIQUE_ID, ctx.session_id.as_bytes());
    }
    push_tlv(&mut body, TLV_SESSION_ID, ctx.session_id.as_bytes());
    push_tlv(&mut body, TLV_SUBSCRIBER, ctx.subscriber.as_bytes());
    push_tlv(&mut body, TLV_SERVICE, ctx.service.as_bytes());
    push_tlv(&mut body, TLV_PARAMS, params_text(&ctx.params).as_bytes());
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&PROXY_V2_SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    out.push(family); // TCP over IPv4 (0x11) or IPv6 (0x21)
    out.extend_from_slice(&(body.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// A PROXY v2 header read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyV2 {
    /// The source: the terminal.
    pub source: SocketAddr,
    /// The destination: the data gateway.
    pub destination: SocketAddr,
    /// Every TLV, in order: type and value.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl ProxyV2 {
    /// The first TLV of `kind` as text.
    pub fn text(&self, kind: u8) -> Option<&str> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Reads a PROXY v2 header (TCP over IPv4 or IPv6) from the start of `bytes`; returns it
/// and how many bytes it took.
pub fn parse_proxy_v2(bytes: &[u8]) -> Result<(ProxyV2, usize), PreambleError> {
    if bytes.len() < 16 {
        return Err(PreambleError::Truncated);
    }
    if bytes[..12] != PROXY_V2_SIGNATURE {
        return Err(PreambleError::NotProxyV2("signature"));
    }
    if bytes[12] != 0x21 {
        return Err(PreambleError::NotProxyV2("version and command"));
    }
    let family = bytes[13];
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let total = 16 + len;
    let body = bytes.get(16..total).ok_or(PreambleError::Truncated)?;
    let (source, destination, rest) = match family {
        0x11 if body.len() >= 12 => {
            let ip = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
                &body[12..],
            )
        }
        0x21 if body.len() >= 36 => {
            let ip = |b: &[u8]| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&b[..16]);
                IpAddr::from(o).to_canonical()
            };
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            (
                SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
                &body[36..],
            )
        }
        0x11 | 0x21 => return Err(PreambleError::Truncated),
        _ => return Err(PreambleError::NotProxyV2("address family")),
    };
    let mut tlvs = Vec::new();
    let mut at = 0;
    while at < rest.len() {
        let head = rest
            .get(at..at + 3)
            .ok_or(PreambleError::BadTlv("header past the end"))?;
        let n = usize::from(u16::from_be_bytes([head[1], head[2]]));
        let value = rest
            .get(at + 3..at + 3 + n)
            .ok_or(PreambleError::BadTlv("value past the end"))?;
        tlvs.push((head[0], value.to_vec()));
        at += 3 + n;
    }
    Ok((
        ProxyV2 {
            source,
            destination,
            tlvs,
        },
        total,
    ))
}

impl JsonPreamble {
    /// Reads the JSON preamble from one line (its newline optional).
    pub fn parse(line: &[u8]) -> Result<JsonPreamble, PreambleError> {
        serde_json::from_slice(line.strip_suffix(b"\n").unwrap_or(line))
            .map_err(|e| PreambleError::BadJson(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ctx() -> SessionContext {
        SessionContext {
            session_id: "leg-1@relay.test".into(),
            subscriber: "alice".into(),
            service: "game".into(),
            params: vec![("level".into(), Some("3".into())), ("hd".into(), None)],
        }
    }

    #[test]
    fn formats_parse_and_print() {
        for f in [
            PreambleFormat::None,
            PreambleFormat::Json,
            PreambleFormat::ProxyV2,
        ] {
            assert_eq!(f.as_str().parse::<PreambleFormat>().unwrap(), f);
        }
        let e = "haproxy".parse::<PreambleFormat>().unwrap_err();
        assert!(
            e.to_string().contains("expected none, json or proxy-v2"),
            "{e}"
        );
    }

    #[test]
    fn none_sends_nothing() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(encode(PreambleFormat::None, &ctx(), a, a).is_empty());
    }

    #[test]
    fn the_json_preamble_is_one_line_with_every_field() {
        let terminal: SocketAddr = "[::ffff:192.0.2.7]:40000".parse().unwrap();
        let gateway: SocketAddr = "127.0.0.1:7080".parse().unwrap();
        let line = encode(PreambleFormat::Json, &ctx(), terminal, gateway);
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert!(line.ends_with(b"\n"));
        let back = JsonPreamble::parse(&line).unwrap();
        assert_eq!(back.version, 1);
        assert_eq!(back.session_id, "leg-1@relay.test");
        assert_eq!(back.subscriber, "alice");
        assert_eq!(back.service, "game");
        assert_eq!(back.params.get("level"), Some(&Some("3".to_string())));
        assert_eq!(back.params.get("hd"), Some(&None));
        assert_eq!(back.terminal, "192.0.2.7:40000".parse().unwrap());
        assert_eq!(back.gateway, gateway);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["params"]["hd"], serde_json::Value::Null);
    }

    #[test]
    fn the_proxy_v2_header_follows_the_specification() {
        let terminal: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let gateway: SocketAddr = "127.0.0.1:7080".parse().unwrap();
        let bytes = encode(PreambleFormat::ProxyV2, &ctx(), terminal, gateway);
        assert_eq!(
            &bytes[..12],
            b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"
        );
        assert_eq!(bytes[12], 0x21, "version 2, PROXY");
        assert_eq!(bytes[13], 0x11, "TCP over IPv4");
        let len = u16::from_be_bytes([bytes[14], bytes[15]]) as usize;
        assert_eq!(bytes.len(), 16 + len);
        assert_eq!(&bytes[16..20], &[192, 0, 2, 7]);
        assert_eq!(&bytes[20..24], &[127, 0, 0, 1]);
        assert_eq!(&bytes[24..26], &40000u16.to_be_bytes());
        assert_eq!(&bytes[26..28], &7080u16.to_be_bytes());
        let (back, used) = parse_proxy_v2(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!((back.source, back.destination), (terminal, gateway));
        assert_eq!(back.text(TLV_UNIQUE_ID), Some("leg-1@relay.test"));
        assert_eq!(back.text(TLV_SESSION_ID), Some("leg-1@relay.test"));
        assert_eq!(back.text(TLV_SUBSCRIBER), Some("alice"));
        assert_eq!(back.text(TLV_SERVICE), Some("game"));
        assert_eq!(back.text(TLV_PARAMS), Some("level=3;hd"));
    }

    #[test]
    fn ipv6_and_long_session_ids() {
        let terminal: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let gateway: SocketAddr = "127.0.0.1:7080".parse().unwrap();
        let mut long = ctx();
        long.session_id = "x".repeat(200);
        let bytes = encode(PreambleFormat::ProxyV2, &long, terminal, gateway);
        assert_eq!(bytes[13], 0x21, "TCP over IPv6 when either side is IPv6");
        let (back, _) = parse_proxy_v2(&bytes).unwrap();
        assert_eq!(back.source, terminal);
        assert_eq!(back.destination, gateway, "IPv4-mapped read back as IPv4");
        assert_eq!(
            back.text(TLV_UNIQUE_ID),
            None,
            "over 128 bytes: no unique id"
        );
        assert_eq!(back.text(TLV_SESSION_ID).map(str::len), Some(200));
    }

    #[test]
    fn broken_headers_are_refused() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let good = encode(PreambleFormat::ProxyV2, &ctx(), a, a);
        assert_eq!(
            parse_proxy_v2(&good[..20]).unwrap_err(),
            PreambleError::Truncated
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            parse_proxy_v2(&bad).unwrap_err(),
            PreambleError::NotProxyV2(_)
        ));
        let mut cut_tlv = good.clone();
        // The last TLV (the 10 bytes of `level=3;hd`) claims more than there is.
        let n = cut_tlv.len();
        cut_tlv[n - 12..n - 10].copy_from_slice(&[0xff, 0xff]);
        assert!(parse_proxy_v2(&cut_tlv).is_err());
        assert!(JsonPreamble::parse(b"{\"version\":1}\n").is_err());
    }
}
