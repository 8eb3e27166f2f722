//! SDP for the application session (RFC 8866, formerly RFC 4566; TCP media per RFC 4145),
//! and a small generic line model so that rules can match any SDP content.
//!
//! The application data of a session is described by one media section:
//!
//! ```text
//! m=application <port> TCP relay-data           (TCP/TLS when the SIP leg is TLS)
//! c=IN IP4 <addr>
//! a=setup:active|passive|actpass|holdconn        (RFC 4145 §4)
//! a=connection:new|existing                      (RFC 4145 §5)
//! a=session-token:<token>                        (this platform: see below)
//! a=service:<service-id>                         (this platform, optional)
//! ```
//!
//! * The transport is `TCP` (RFC 4145 §3) and the format is [`APP_PROTO`], `relay-data`:
//!   an opaque byte stream between terminal and application server.
//! * `a=session-token:<token>` ([`TOKEN_ATTR`]) carries a one-time token chosen by the
//!   application side for this session. The terminal presents it as the first line of the
//!   data connection, and the data gateway lets no byte through before it has checked it
//!   (in constant time: [`AppSdp::token_matches`]). It is a platform extension, not an
//!   IANA-registered attribute; other SDP parsers ignore it as an unknown attribute
//!   (RFC 8866 §5.13).
//! * `a=service:<id>` ([`SERVICE_ATTR`]) names the service the stream delivers.
//! * `TCP/TLS` (RFC 4572 §7, now RFC 8122) in place of `TCP` says the data connection runs
//!   TLS over the TCP connection ([`AppSdp::tls`]): the passive end (the application
//!   server's data gateway) presents a certificate, which the active end (the terminal)
//!   verifies against its trusted CAs and the `c=` address (RFC 5922 §7.1), before the token
//!   crosses. An agent whose SIP leg is TLS answers only `TCP/TLS`, and a terminal whose SIP
//!   leg is TLS offers `TCP/TLS` and refuses an answer without it, so the token never crosses
//!   a network in clear.
//!
//! Bodies that are not ours (an audio offer from a softphone) are passed through untouched
//! by the relay; [`AppSdp::parse`] reports them as [`SdpError::NoApplicationMedia`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use rand::RngCore;

/// The format (`fmt`) of the application m-line: an opaque byte stream.
pub const APP_PROTO: &str = "relay-data";
/// The attribute carrying the one-time session token (`a=session-token:<token>`).
pub const TOKEN_ATTR: &str = "session-token";
/// The attribute naming the delivered service (`a=service:<id>`).
pub const SERVICE_ATTR: &str = "service";
/// The m-line transport of a data connection that runs TLS over TCP (RFC 4572 §7).
pub const TCP_TLS: &str = "TCP/TLS";

/// Why an SDP body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// The body is not UTF-8 text.
    #[error("SDP is not UTF-8")]
    NotUtf8,
    /// A line is not of the form `<letter>=<value>` (RFC 8866 §5); the 1-based line number.
    #[error("SDP line {0} is not <type>=<value>")]
    BadLine(usize),
    /// The body has no `m=application` section: some other session (audio, video).
    #[error("SDP has no application media")]
    NoApplicationMedia,
    /// There is an application section, but not over TCP or TCP/TLS (the transport is
    /// given).
    #[error("SDP application media over unsupported transport {0}")]
    UnsupportedTransport(String),
    /// A line the application session needs is missing or invalid; the text says which.
    #[error("invalid SDP: {0}")]
    Invalid(&'static str),
}

// ---------------------------------------------------------------------------------------
// Generic line model.

/// One SDP line, `<type>=<value>` (RFC 8866 §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdpLine {
    /// The type letter (`v`, `o`, `m`, `a`, …).
    pub kind: char,
    /// Everything after the `=`.
    pub value: String,
}

impl SdpLine {
    /// For an `a=` line, the attribute name and its value (`a=name:value`, or `a=flag` with
    /// no value) (RFC 8866 §5.13).
    pub fn attribute(&self) -> Option<(&str, Option<&str>)> {
        if self.kind != 'a' {
            return None;
        }
        Some(match self.value.split_once(':') {
            Some((name, value)) => (name, Some(value)),
            None => (self.value.as_str(), None),
        })
    }
}

impl fmt::Display for SdpLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.kind, self.value)
    }
}

/// A media section: its `m=` line and the lines up to the next `m=` (RFC 8866 §5.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSection {
    /// The value of the `m=` line: `<media> <port> <proto> <fmt> …`.
    pub media_line: String,
    /// The lines after the `m=` line.
    pub lines: Vec<SdpLine>,
}

impl MediaSection {
    fn field(&self, n: usize) -> Option<&str> {
        self.media_line.split_ascii_whitespace().nth(n)
    }

    /// The media type (`audio`, `video`, `application`, …).
    pub fn media_type(&self) -> &str {
        self.field(0).unwrap_or("")
    }

    /// The port (the part before a `/<number of ports>`), if it is a number.
    pub fn port(&self) -> Option<u16> {
        self.field(1)
            .and_then(|p| p.split('/').next())
            .and_then(|p| p.parse().ok())
    }

    /// The transport protocol (`RTP/AVP`, `TCP`, …).
    pub fn proto(&self) -> &str {
        self.field(2).unwrap_or("")
    }

    /// The media formats.
    pub fn formats(&self) -> impl Iterator<Item = &str> {
        self.media_line.split_ascii_whitespace().skip(3)
    }

    /// The value of the first attribute `name` of this section (`Some("")` for a flag).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        find_attribute(&self.lines, name)
    }

    /// The value of this section's `c=` line, if it has one.
    pub fn connection(&self) -> Option<&str> {
        self.lines
            .iter()
            .find(|l| l.kind == 'c')
            .map(|l| l.value.as_str())
    }
}

fn find_attribute<'a>(lines: &'a [SdpLine], name: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| match l.attribute() {
        Some((n, v)) if n.eq_ignore_ascii_case(name) => Some(v.unwrap_or("")),
        _ => None,
    })
}

/// An SDP body as lines: the session-level lines, then the media sections (RFC 8866 §5).
/// Any well-formed SDP parses, whatever its media; rules match against it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sdp {
    /// The session-level lines (before the first `m=`).
    pub session: Vec<SdpLine>,
    /// The media sections, in order.
    pub media: Vec<MediaSection>,
}

impl Sdp {
    /// Parses a body. Lines end in CRLF or LF (RFC 8866 §5 asks CRLF, and allows LF to be
    /// accepted); blank lines are skipped; every other line must be `<letter>=<value>`.
    pub fn parse(body: &[u8]) -> Result<Sdp, SdpError> {
        let text = std::str::from_utf8(body).map_err(|_| SdpError::NotUtf8)?;
        let mut sdp = Sdp::default();
        for (n, raw) in text.split('\n').enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line.trim().is_empty() {
                continue;
            }
            let mut chars = line.chars();
            let (Some(kind), Some('=')) = (chars.next(), chars.next()) else {
                return Err(SdpError::BadLine(n + 1));
            };
            if !kind.is_ascii_alphabetic() {
                return Err(SdpError::BadLine(n + 1));
            }
            let value = line[2..].to_string();
            if kind == 'm' {
                sdp.media.push(MediaSection {
                    media_line: value,
                    lines: Vec::new(),
                });
            } else if let Some(section) = sdp.media.last_mut() {
                section.lines.push(SdpLine { kind, value });
            } else {
                sdp.session.push(SdpLine { kind, value });
            }
        }
        Ok(sdp)
    }

    /// The value of the first session-level attribute `name` (`Some("")` for a flag).
    pub fn session_attribute(&self, name: &str) -> Option<&str> {
        find_attribute(&self.session, name)
    }

    /// The value of the first session-level line of type `kind`.
    pub fn session_value(&self, kind: char) -> Option<&str> {
        self.session
            .iter()
            .find(|l| l.kind == kind)
            .map(|l| l.value.as_str())
    }

    /// The media sections of a type (`audio`, `application`, …).
    pub fn media_of_type<'a>(&'a self, media: &'a str) -> impl Iterator<Item = &'a MediaSection> {
        self.media
            .iter()
            .filter(move |m| m.media_type().eq_ignore_ascii_case(media))
    }

    /// Every line of the body in order, as written (`k=v`), for pattern matching.
    pub fn lines(&self) -> impl Iterator<Item = String> + '_ {
        self.session
            .iter()
            .map(|l| l.to_string())
            .chain(self.media.iter().flat_map(|m| {
                std::iter::once(format!("m={}", m.media_line))
                    .chain(m.lines.iter().map(|l| l.to_string()))
            }))
    }
}

impl fmt::Display for Sdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.lines() {
            write!(f, "{line}\r\n")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The application session.

/// Which end opens the TCP connection (RFC 4145 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Setup {
    /// This end connects.
    Active,
    /// This end accepts.
    Passive,
    /// Either (offer only).
    Actpass,
    /// Not now.
    Holdconn,
}

impl Setup {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Setup::Active => "active",
            Setup::Passive => "passive",
            Setup::Actpass => "actpass",
            Setup::Holdconn => "holdconn",
        }
    }

    /// Parses an attribute value, ignoring case.
    pub fn from_name(s: &str) -> Option<Setup> {
        [
            Setup::Active,
            Setup::Passive,
            Setup::Actpass,
            Setup::Holdconn,
        ]
        .into_iter()
        .find(|v| v.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// Whether a new TCP connection is wanted (RFC 4145 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Connection {
    /// Open a new connection.
    New,
    /// Keep the existing one.
    Existing,
}

impl Connection {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::New => "new",
            Connection::Existing => "existing",
        }
    }

    /// Parses an attribute value, ignoring case.
    pub fn from_name(s: &str) -> Option<Connection> {
        [Connection::New, Connection::Existing]
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// The `o=` line (RFC 8866 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The user name (`-` when none).
    pub username: String,
    /// The session id.
    pub session_id: u64,
    /// The session version, increased on every change (RFC 3264 §8).
    pub session_version: u64,
    /// The address of the originating host.
    pub addr: IpAddr,
}

/// The application-session description: where the data endpoint is, who connects, and the
/// session's token and service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSdp {
    /// The `o=` line.
    pub origin: Origin,
    /// The `s=` line (`-` when none).
    pub session_name: String,
    /// The data endpoint's address (media-level `c=`, else session-level).
    pub addr: IpAddr,
    /// The data endpoint's TCP port (0: stream refused, RFC 3264 §6).
    pub port: u16,
    /// The m-line format, [`APP_PROTO`] for our data streams.
    pub proto: String,
    /// The m-line transport is `TCP/TLS` (RFC 4572 §7): the data connection runs TLS.
    pub tls: bool,
    /// `a=setup`; when absent, RFC 4145 §4.1 implies active in an offer and passive in an
    /// answer ([`AppSdp::setup_or_default`]).
    pub setup: Option<Setup>,
    /// `a=connection`; when absent, a new connection is assumed.
    pub connection: Option<Connection>,
    /// `a=session-token`: the one-time token the data gateway checks.
    pub token: Option<String>,
    /// `a=service`: the service delivered.
    pub service: Option<String>,
}

impl AppSdp {
    /// A description of a data endpoint with a fresh origin, `a=connection:new`, and no
    /// token or service.
    pub fn new(addr: IpAddr, port: u16, setup: Setup) -> AppSdp {
        let session_id = u64::from(rand::thread_rng().next_u32());
        AppSdp {
            origin: Origin {
                username: "-".to_string(),
                session_id,
                session_version: 1,
                addr,
            },
            session_name: "-".to_string(),
            addr,
            port,
            proto: APP_PROTO.to_string(),
            tls: false,
            setup: Some(setup),
            connection: Some(Connection::New),
            token: None,
            service: None,
        }
    }

    /// Parses a body. A body without an application section (a softphone's audio offer)
    /// gives [`SdpError::NoApplicationMedia`]; the first `m=application … TCP …` (or
    /// `TCP/TLS`) section is the one read.
    pub fn parse(body: &[u8]) -> Result<AppSdp, SdpError> {
        AppSdp::from_sdp(&Sdp::parse(body)?)
    }

    /// Reads the application session out of a parsed body.
    pub fn from_sdp(sdp: &Sdp) -> Result<AppSdp, SdpError> {
        let mut apps = sdp.media_of_type("application").peekable();
        let Some(first) = apps.peek().copied() else {
            return Err(SdpError::NoApplicationMedia);
        };
        let Some(media) = apps.find(|m| {
            m.proto().eq_ignore_ascii_case("TCP") || m.proto().eq_ignore_ascii_case(TCP_TLS)
        }) else {
            return Err(SdpError::UnsupportedTransport(first.proto().to_string()));
        };
        if let Some(v) = sdp.session_value('v') {
            if v.trim() != "0" {
                return Err(SdpError::Invalid("v= is not 0"));
            }
        }
        let origin = parse_origin(
            sdp.session_value('o')
                .ok_or(SdpError::Invalid("o= missing"))?,
        )?;
        let c = media
            .connection()
            .or_else(|| sdp.session_value('c'))
            .ok_or(SdpError::Invalid("c= missing"))?;
        let addr = parse_connection_addr(c)?;
        let port = media.port().ok_or(SdpError::Invalid("m= port"))?;
        let proto = media
            .formats()
            .next()
            .ok_or(SdpError::Invalid("m= format missing"))?
            .to_string();
        let attr = |name: &str| {
            media
                .attribute(name)
                .or_else(|| sdp.session_attribute(name))
        };
        let setup = attr("setup")
            .map(|v| Setup::from_name(v).ok_or(SdpError::Invalid("a=setup")))
            .transpose()?;
        let connection = attr("connection")
            .map(|v| Connection::from_name(v).ok_or(SdpError::Invalid("a=connection")))
            .transpose()?;
        let token = attr(TOKEN_ATTR)
            .map(|v| single_token(v).ok_or(SdpError::Invalid("a=session-token")))
            .transpose()?;
        let service = attr(SERVICE_ATTR)
            .map(|v| single_token(v).ok_or(SdpError::Invalid("a=service")))
            .transpose()?;
        Ok(AppSdp {
            origin,
            session_name: sdp.session_value('s').unwrap_or("-").to_string(),
            addr,
            port,
            tls: media.proto().eq_ignore_ascii_case(TCP_TLS),
            proto,
            setup,
            connection,
            token,
            service,
        })
    }

    /// The data endpoint's socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }

    /// `a=setup`, or its RFC 4145 §4.1 default: active in an offer, passive in an answer.
    pub fn setup_or_default(&self, is_offer: bool) -> Setup {
        self.setup.unwrap_or(if is_offer {
            Setup::Active
        } else {
            Setup::Passive
        })
    }

    /// Whether `presented` is this session's token, compared in constant time. False when
    /// the description carries no token.
    pub fn token_matches(&self, presented: &[u8]) -> bool {
        match &self.token {
            Some(token) => crate::digest::constant_time_eq(token.as_bytes(), presented),
            None => false,
        }
    }
}

impl fmt::Display for AppSdp {
    /// Writes the description with CRLF line ends. Control characters are dropped from
    /// every value, and whitespace from single-token values, so no value can break a line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.origin;
        write!(f, "v=0\r\n")?;
        write!(
            f,
            "o={} {} {} IN {} {}\r\n",
            token_text(&o.username),
            o.session_id,
            o.session_version,
            ip_family(o.addr),
            o.addr
        )?;
        write!(f, "s={}\r\n", line_text(&self.session_name))?;
        write!(f, "c=IN {} {}\r\n", ip_family(self.addr), self.addr)?;
        write!(f, "t=0 0\r\n")?;
        write!(
            f,
            "m=application {} {} {}\r\n",
            self.port,
            if self.tls { TCP_TLS } else { "TCP" },
            token_text(&self.proto)
        )?;
        if let Some(setup) = self.setup {
            write!(f, "a=setup:{}\r\n", setup.as_str())?;
        }
        if let Some(connection) = self.connection {
            write!(f, "a=connection:{}\r\n", connection.as_str())?;
        }
        if let Some(token) = &self.token {
            write!(f, "a={TOKEN_ATTR}:{}\r\n", token_text(token))?;
        }
        if let Some(service) = &self.service {
            write!(f, "a={SERVICE_ATTR}:{}\r\n", token_text(service))?;
        }
        Ok(())
    }
}

/// A fresh one-time session token: 128 random bits as 32 hex digits.
pub fn new_session_token() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn ip_family(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "IP4",
        IpAddr::V6(_) => "IP6",
    }
}

fn line_text(s: &str) -> String {
    let clean: String = s.chars().filter(|c| !c.is_control()).collect();
    if clean.trim().is_empty() {
        "-".to_string()
    } else {
        clean
    }
}

fn token_text(s: &str) -> String {
    let clean: String = s
        .chars()
        .filter(|c| !c.is_control() && !c.is_whitespace())
        .collect();
    if clean.is_empty() {
        "-".to_string()
    } else {
        clean
    }
}

/// A non-empty attribute value without inner whitespace or control characters (which the
/// rendering would leave out, so that a value read and written back would change).
fn single_token(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c.is_control()))
        .then(|| v.to_string())
}

/// `o=<username> <sess-id> <sess-version> IN IP4|IP6 <address>` (RFC 8866 §5.2).
fn parse_origin(value: &str) -> Result<Origin, SdpError> {
    let fields: Vec<&str> = value.split_ascii_whitespace().collect();
    let [username, id, version, nettype, addrtype, addr] = fields[..] else {
        return Err(SdpError::Invalid("o= does not have six fields"));
    };
    if !nettype.eq_ignore_ascii_case("IN") {
        return Err(SdpError::Invalid("o= network type is not IN"));
    }
    let addr = parse_addr(addrtype, addr).ok_or(SdpError::Invalid("o= address"))?;
    Ok(Origin {
        username: username.to_string(),
        session_id: id.parse().map_err(|_| SdpError::Invalid("o= session id"))?,
        session_version: version
            .parse()
            .map_err(|_| SdpError::Invalid("o= session version"))?,
        addr,
    })
}

/// `c=IN IP4|IP6 <address>[/ttl…]` (RFC 8866 §5.7); the address must be a literal.
fn parse_connection_addr(value: &str) -> Result<IpAddr, SdpError> {
    let fields: Vec<&str> = value.split_ascii_whitespace().collect();
    let [nettype, addrtype, addr] = fields[..] else {
        return Err(SdpError::Invalid("c= does not have three fields"));
    };
    if !nettype.eq_ignore_ascii_case("IN") {
        return Err(SdpError::Invalid("c= network type is not IN"));
    }
    let addr = addr.split('/').next().unwrap_or(addr);
    parse_addr(addrtype, addr).ok_or(SdpError::Invalid("c= address"))
}

fn parse_addr(addrtype: &str, addr: &str) -> Option<IpAddr> {
    let ip: IpAddr = addr.parse().ok()?;
    match (ip, addrtype.to_ascii_uppercase().as_str()) {
        (IpAddr::V4(_), "IP4") | (IpAddr::V6(_), "IP6") => Some(ip),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::net::Ipv4Addr;

    const AUDIO_OFFER: &str = "v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\n\
s=call\r\n\
c=IN IP4 192.0.2.10\r\n\
t=0 0\r\n\
m=audio 49170 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=sendrecv\r\n";

    fn sample() -> AppSdp {
        let mut app = AppSdp::new(
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
            40_000,
            Setup::Passive,
        );
        app.origin.session_id = 42;
        app.token = Some("tok123".into());
        app.service = Some("echo".into());
        app
    }

    #[test]
    fn tcp_tls_says_the_data_connection_runs_tls() {
        let mut app = sample();
        app.tls = true;
        let text = app.to_string();
        assert!(
            text.contains("m=application 40000 TCP/TLS relay-data\r\n"),
            "{text}"
        );
        let back = AppSdp::parse(text.as_bytes()).unwrap();
        assert!(back.tls);
        assert_eq!(back, app);
        assert!(!AppSdp::parse(sample().to_string().as_bytes()).unwrap().tls);
        let lower = text.replace("TCP/TLS", "tcp/tls");
        assert!(AppSdp::parse(lower.as_bytes()).unwrap().tls);
    }

    #[test]
    fn builds_the_design_shape() {
        let text = sample().to_string();
        assert_eq!(
            text,
            "v=0\r\n\
o=- 42 1 IN IP4 198.51.100.7\r\n\
s=-\r\n\
c=IN IP4 198.51.100.7\r\n\
t=0 0\r\n\
m=application 40000 TCP relay-data\r\n\
a=setup:passive\r\n\
a=connection:new\r\n\
a=session-token:tok123\r\n\
a=service:echo\r\n"
        );
    }

    #[test]
    fn round_trips() {
        let app = sample();
        assert_eq!(AppSdp::parse(app.to_string().as_bytes()).unwrap(), app);
        let v6 = AppSdp::new("2001:db8::5".parse().unwrap(), 9, Setup::Actpass);
        let text = v6.to_string();
        assert!(text.contains("c=IN IP6 2001:db8::5\r\n"), "{text}");
        assert_eq!(AppSdp::parse(text.as_bytes()).unwrap(), v6);
    }

    #[test]
    fn audio_offer_is_no_application_media() {
        assert_eq!(
            AppSdp::parse(AUDIO_OFFER.as_bytes()),
            Err(SdpError::NoApplicationMedia)
        );
        // …but the generic model reads it, for rules.
        let sdp = Sdp::parse(AUDIO_OFFER.as_bytes()).unwrap();
        let audio = sdp.media_of_type("audio").next().unwrap();
        assert_eq!(audio.port(), Some(49170));
        assert_eq!(audio.proto(), "RTP/AVP");
        assert_eq!(audio.formats().collect::<Vec<_>>(), ["0", "8", "101"]);
        assert_eq!(audio.attribute("rtpmap"), Some("0 PCMU/8000"));
        assert_eq!(audio.attribute("sendrecv"), Some(""));
        assert_eq!(sdp.session_value('s'), Some("call"));
        assert_eq!(sdp.to_string(), AUDIO_OFFER);
        assert!(sdp
            .lines()
            .any(|l| l == "a=rtpmap:101 telephone-event/8000"));
    }

    #[test]
    fn picks_application_section_among_others() {
        // LF line ends, session-level c= and token, media-level setup, audio first.
        let body = "v=0\n\
o=- 1 2 IN IP4 10.0.0.1\n\
s=x\n\
c=IN IP4 10.0.0.1\n\
a=session-token:abc\n\
t=0 0\n\
m=audio 4000 RTP/AVP 0\n\
m=application 5000 TCP relay-data\n\
c=IN IP4 10.0.0.2\n\
a=setup:ACTIVE\n";
        let app = AppSdp::parse(body.as_bytes()).unwrap();
        assert_eq!(app.addr, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(app.socket_addr().port(), 5000);
        assert_eq!(app.setup, Some(Setup::Active));
        assert_eq!(app.connection, None);
        assert_eq!(app.token.as_deref(), Some("abc"));
        assert_eq!(app.origin.session_version, 2);
        assert_eq!(app.setup_or_default(false), Setup::Active);
    }

    #[test]
    fn setup_defaults_per_rfc4145() {
        let mut app = sample();
        app.setup = None;
        assert_eq!(app.setup_or_default(true), Setup::Active);
        assert_eq!(app.setup_or_default(false), Setup::Passive);
        assert!(!app.to_string().contains("a=setup"));
    }

    #[test]
    fn other_application_transport_is_distinct() {
        let body = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
m=application 5000 UDP/BFCP *\r\n";
        assert_eq!(
            AppSdp::parse(body.as_bytes()),
            Err(SdpError::UnsupportedTransport("UDP/BFCP".into()))
        );
    }

    #[test]
    fn invalid_bodies_are_errors_not_panics() {
        let base = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nt=0 0\r\n";
        let cases: Vec<(String, SdpError)> = vec![
            (
                format!("{base}m=application 5000 TCP relay-data\r\n"),
                SdpError::Invalid("c= missing"),
            ),
            (
                format!("{base}c=IN IP4 host.example\r\nm=application 5000 TCP x\r\n"),
                SdpError::Invalid("c= address"),
            ),
            (
                format!("{base}c=IN IP6 10.0.0.1\r\nm=application 5000 TCP x\r\n"),
                SdpError::Invalid("c= address"),
            ),
            (
                format!("{base}c=IN IP4 10.0.0.1\r\nm=application 99999 TCP x\r\n"),
                SdpError::Invalid("m= port"),
            ),
            (
                format!("{base}c=IN IP4 10.0.0.1\r\nm=application 5000 TCP\r\n"),
                SdpError::Invalid("m= format missing"),
            ),
            (
                format!(
                    "{base}c=IN IP4 10.0.0.1\r\nm=application 5000 TCP x\r\na=setup:sideways\r\n"
                ),
                SdpError::Invalid("a=setup"),
            ),
            (
                format!(
                    "{base}c=IN IP4 10.0.0.1\r\nm=application 5000 TCP x\r\na=session-token:\r\n"
                ),
                SdpError::Invalid("a=session-token"),
            ),
            (
                "v=0\r\nm=application 5000 TCP x\r\nc=IN IP4 10.0.0.1\r\n".to_string(),
                SdpError::Invalid("o= missing"),
            ),
            (
                "v=0\r\nthis is not sdp\r\n".to_string(),
                SdpError::BadLine(2),
            ),
            ("=x\r\n".to_string(), SdpError::BadLine(1)),
            ("\u{e9}=x\r\n".to_string(), SdpError::BadLine(1)),
        ];
        for (body, want) in cases {
            assert_eq!(AppSdp::parse(body.as_bytes()), Err(want), "{body:?}");
        }
        assert_eq!(AppSdp::parse(b"v=0\r\n\xff=\r\n"), Err(SdpError::NotUtf8));
        assert_eq!(AppSdp::parse(b""), Err(SdpError::NoApplicationMedia));
    }

    #[test]
    fn values_cannot_inject_lines() {
        let mut app = sample();
        app.token = Some("a\r\na=setup:active".into());
        app.session_name = "x\r\nm=audio 1 RTP/AVP 0".into();
        let text = app.to_string();
        assert_eq!(text.lines().count(), 10, "{text}");
        let back = AppSdp::parse(text.as_bytes()).unwrap();
        assert_eq!(back.setup, Some(Setup::Passive));
        assert_eq!(back.token.as_deref(), Some("aa=setup:active"));
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = AppSdp::parse(&body);
        }

        #[test]
        fn parsing_sdp_like_text_never_panics(lines in proptest::collection::vec("[a-z]=[ -~]{0,40}", 0..12)) {
            let body = lines.join("\r\n");
            if let Ok(sdp) = Sdp::parse(body.as_bytes()) {
                let _ = AppSdp::from_sdp(&sdp);
                // The line model writes back what it read.
                proptest::prop_assert_eq!(Sdp::parse(sdp.to_string().as_bytes()).unwrap(), sdp);
            }
        }
    }

    #[test]
    fn token_check() {
        let app = sample();
        assert!(app.token_matches(b"tok123"));
        assert!(!app.token_matches(b"tok124"));
        assert!(!app.token_matches(b""));
        let fresh = new_session_token();
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, new_session_token());
        let mut none = sample();
        none.token = None;
        assert!(!none.token_matches(b""));
    }

    /// Found by the `sdp` fuzz target: a token with NUL bytes was read as it was, and written
    /// back without them, so the token a relay passed on was not the one it received.
    #[test]
    fn a_token_or_service_with_control_characters_is_refused() {
        let body = sample().to_string();
        for (attr, bad) in [("session-token", "tok\0\0"), ("service", "echo\x07")] {
            let good = sample();
            let value = if attr == "service" {
                good.service.clone().unwrap()
            } else {
                good.token.clone().unwrap()
            };
            let body = body.replace(&format!("a={attr}:{value}"), &format!("a={attr}:{bad}"));
            assert!(body.contains(bad), "{body}");
            assert!(AppSdp::parse(body.as_bytes()).is_err(), "{attr}");
        }
    }
}
