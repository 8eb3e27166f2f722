//! Answering the relay's inquiry (DESIGN.md, "inquiry to the application server"): can this
//! service be delivered to this subscriber now? Pure functions of the request, the
//! configuration and the current load, so every rule is tested without a socket.
//!
//! The checks, in order, each with its answer:
//! 1. the request comes from the relay — else `403` ([`RelaySources`]);
//! 2. the service (`P-Asserted-Service`, else the Request-URI user, else the offer's
//!    `a=service`) is offered here — else `404`;
//! 3. the relay asserts a subscriber (`P-Asserted-Identity`) whom the service's policy
//!    allows — else `403`;
//! 4. the body is an SDP offer of an application stream over TCP that we can take
//!    passively (`a=setup:active` or `actpass`), or no body at all — else `415` / `488`;
//! 5. the service and the server have capacity left — else `486`.
//!
//! A yes is a `200` whose SDP answer names the data gateway and a fresh one-time token
//! ([`answer`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use rsip::Request;
use sip_core::address::{header_values, parse_asserted_identity, unquote, ServiceId};
use sip_core::resolve::{self, NetDns};
use sip_core::sdp::{AppSdp, Connection, SdpError, Setup, APP_PROTO};
use sip_core::uri::Uri;
use sip_core::{Peer, Transport};

use crate::config::{Config, ServiceConfig};

/// The header carrying the subscriber the relay authenticated (RFC 3325).
pub const P_ASSERTED_IDENTITY: &str = "P-Asserted-Identity";
/// The header carrying the service the relay decided on (RFC 6050).
pub const P_ASSERTED_SERVICE: &str = "P-Asserted-Service";

/// Service parameters: `name` or `name=value`, in order.
pub type Params = Vec<(String, Option<String>)>;

/// A service name and its parameters.
type Named = (String, Params);

/// A no, as a status code and reason phrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status code.
    pub code: u16,
    /// The reason phrase.
    pub reason: String,
}

impl Refusal {
    fn new(code: u16, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

/// Who may send the agent requests: the relay, known by its addresses and — when `[tls]` is
/// configured — by its certificate (issue 14, finding 7).
///
/// The IP address must be the relay's. Over UDP the port must also match when the relay URI
/// names one, because the relay sends from its listening socket; over TCP the relay may
/// connect from any port. The port compared is the one responses go to (RFC 3261 §18.2.2:
/// the source port, or the Via's when it has no `rport`), so the IP address is the check
/// that counts.
///
/// An address is not an identity: a UDP source is forged in one line, and on the relay's own
/// host any process can connect from its address. So with TLS configured
/// ([`RelaySources::require_tls`]) a request counts as the relay's only when it came over a
/// TLS connection whose peer presented a certificate that chains to the agent's trusted CA
/// (the TLS handshake checked that) *and* names the relay's host in its subjectAltName
/// (RFC 5922 §7.2) — a certificate of another application server from the same CA does not
/// do. Anything else, UDP and TCP included, is refused `403` before any capacity is
/// counted, so forged INVITEs hold no slots and obtain no tokens.
///
/// Why mutual TLS rather than a keyed signature (an HMAC over the relay's requests with a
/// shared secret): TLS authenticates the whole connection, so every byte of every request
/// and response is covered — Via, Call-ID, SDP, the token in the answer — without choosing
/// which headers to sign or canonicalising what proxies may rewrite; it also encrypts, which
/// the token needs anyway (finding 1), and replay is excluded by the handshake, where a
/// signature would need nonces or timestamps and a replay cache. Keys are per party
/// (the relay's certificate, each agent's own) instead of one secret shared by the relay and
/// every agent, and revoking an agent means not renewing its certificate. The cost — a CA and
/// certificates to manage — is the one every SIP-over-TLS deployment already pays
/// (RFC 5922).
#[derive(Clone)]
pub struct RelaySources {
    /// The relay and, with several relays serving as one, the others.
    relays: Vec<OneRelay>,
    /// With TLS: the transports, which keep each TLS connection's peer certificate.
    tls: Option<sip_core::transport::Transports>,
}

/// One relay's sources.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OneRelay {
    /// Its addresses, and the UDP port when its URI names one.
    entries: Vec<(IpAddr, Option<u16>)>,
    /// Its host as its URI names it (brackets removed): with TLS its certificate must name
    /// it (RFC 5922 §7.2).
    host: String,
}

/// Equal when the relays (addresses, hosts) and the TLS requirement are.
impl PartialEq for RelaySources {
    fn eq(&self, other: &RelaySources) -> bool {
        self.relays == other.relays && self.tls.is_some() == other.tls.is_some()
    }
}

impl Eq for RelaySources {}

impl std::fmt::Debug for RelaySources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySources")
            .field("relays", &self.relays)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl RelaySources {
    /// One relay's sources given directly: addresses and, optionally, the UDP port; `host`
    /// is what its certificate must name once [`RelaySources::require_tls`] is set.
    pub fn new(entries: Vec<(IpAddr, Option<u16>)>, host: &str) -> RelaySources {
        RelaySources {
            relays: vec![OneRelay {
                entries,
                host: host.to_string(),
            }],
            tls: None,
        }
    }

    /// These sources and `other`'s: inquiries from any of the relays are accepted (several
    /// relays serving as one).
    pub fn with(mut self, other: RelaySources) -> RelaySources {
        self.relays.extend(other.relays);
        self
    }

    /// Each relay's host and addresses (with the UDP port when its URI names one).
    pub fn relays(&self) -> impl Iterator<Item = (&str, &[(IpAddr, Option<u16>)])> {
        self.relays
            .iter()
            .map(|r| (r.host.as_str(), r.entries.as_slice()))
    }

    /// From now on, a request counts as a relay's only over TLS from a peer whose
    /// certificate (kept by `transports`, chained to the trusted CA) names that relay's host
    /// (RFC 5922 §7.2).
    pub fn require_tls(mut self, transports: sip_core::transport::Transports) -> RelaySources {
        self.tls = Some(transports);
        self
    }

    /// The sources of a relay URI: its IP address (IPv4, or IPv6 in brackets) and port, or
    /// the addresses its domain resolves to (RFC 3263).
    pub async fn of_uri(uri: &Uri, dns: &NetDns) -> Result<RelaySources, String> {
        let port = uri.port();
        let host = uri
            .host_text()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .ok_or_else(|| format!("the relay URI {uri} has no host"))?;
        if let Some(ip) = crate::config::relay_ip(uri) {
            return Ok(RelaySources::new(vec![(ip, port)], &host));
        }
        let targets = resolve::resolve(uri, dns)
            .await
            .map_err(|e| format!("cannot resolve the relay {uri}: {e}"))?;
        let mut entries: Vec<(IpAddr, Option<u16>)> =
            targets.iter().map(|t| (t.addr.ip(), port)).collect();
        entries.dedup();
        if entries.is_empty() {
            return Err(format!("the relay {uri} resolves to no address"));
        }
        Ok(RelaySources::new(entries, &host))
    }

    /// Whether a request from `peer` comes from a relay. An IPv4 relay seen through a
    /// dual-stack socket (`::ffff:127.0.0.1`) counts as itself.
    ///
    /// With [`RelaySources::require_tls`], the request must also have come over TLS from
    /// that relay's certificate.
    pub fn allows(&self, peer: &Peer) -> bool {
        let cert = match &self.tls {
            Some(transports) => {
                if peer.transport != Transport::Tls {
                    return false;
                }
                let Some(cert) = peer.conn.and_then(|c| transports.peer_certificate(c)) else {
                    return false;
                };
                Some(cert)
            }
            None => None,
        };
        let from = peer.addr.ip().to_canonical();
        self.relays.iter().any(|relay| {
            cert.as_ref()
                .is_none_or(|c| sip_core::tls::TlsSetup::certificate_names(c, &relay.host))
                && relay.entries.iter().any(|(ip, port)| {
                    ip.to_canonical() == from
                        && (peer.transport != Transport::Udp
                            || port.is_none_or(|p| p == peer.addr.port()))
                })
        })
    }
}

/// Sessions held now, in total and per service. A session counts from its 200 OK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Load {
    total: u32,
    per_service: HashMap<String, u32>,
}

impl Load {
    /// Counts a new session of `service`.
    pub fn add(&mut self, service: &str) {
        self.total = self.total.saturating_add(1);
        *self.per_service.entry(service.to_string()).or_default() += 1;
    }

    /// Forgets a session of `service`.
    pub fn remove(&mut self, service: &str) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_service.get_mut(service) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_service.remove(service);
            }
        }
    }

    /// Moves a session from one service to another.
    pub fn switch(&mut self, from: &str, to: &str) {
        self.remove(from);
        self.add(to);
    }

    /// Sessions held, all services.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Sessions of `service`.
    pub fn of(&self, service: &str) -> u32 {
        self.per_service.get(service).copied().unwrap_or(0)
    }
}

/// An inquiry the agent says yes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The service to deliver.
    pub service: ServiceConfig,
    /// Its parameters (Request-URI and `P-Asserted-Service` parameters), for the logs.
    pub params: Params,
    /// The subscriber.
    pub subscriber: String,
    /// The terminal's offer, if the request had one.
    pub offer: Option<AppSdp>,
}

/// Decides an initial INVITE (checks 2 to 5 of the module documentation).
pub fn decide(req: &Request, config: &Config, load: &Load) -> Result<Accepted, Refusal> {
    let offer = read_offer(req);
    let (name, mut params) = asserted_service(req)
        .or_else(|| ruri_service(req))
        .or_else(|| offered_service(&offer))
        .ok_or_else(|| Refusal::new(404, "No service named in the request"))?;
    params.extend(ruri_params(req));
    let service = config
        .service(&name)
        .ok_or_else(|| Refusal::new(404, format!("Service {name} not offered here")))?;
    let subscriber = asserted_subscriber(req)
        .ok_or_else(|| Refusal::new(403, "No asserted subscriber identity"))?;
    if !service.policy.allows(&subscriber) {
        return Err(Refusal::new(
            403,
            format!("Subscriber {subscriber} may not use {name}"),
        ));
    }
    let offer = offer?;
    check_capacity(config, service, load)?;
    Ok(Accepted {
        service: service.clone(),
        params,
        subscriber,
        offer,
    })
}

/// Decides a re-INVITE of a live session of `current` for `subscriber`: the service is the
/// one the relay asserts (`P-Asserted-Service`), else the current one. What the terminal's
/// offer names (`a=service:`) never changes it: the relay decides and bills changes, and
/// asserts the service on every re-INVITE it relays. A change of service is
/// checked like a new inquiry, with the session itself not counted against the new
/// service's capacity twice; the server's total does not change.
pub fn decide_change(
    req: &Request,
    current: &str,
    subscriber: &str,
    config: &Config,
    load: &Load,
) -> Result<Accepted, Refusal> {
    let offer = read_offer(req);
    let (name, params) = asserted_service(req).unwrap_or_else(|| (current.to_string(), Vec::new()));
    let service = config
        .service(&name)
        .ok_or_else(|| Refusal::new(404, format!("Service {name} not offered here")))?;
    let subscriber = asserted_subscriber(req).unwrap_or_else(|| subscriber.to_string());
    if !service.policy.allows(&subscriber) {
        return Err(Refusal::new(
            403,
            format!("Subscriber {subscriber} may not use {name}"),
        ));
    }
    let offer = offer?;
    if name != current {
        if let Some(cap) = service.capacity {
            if load.of(&name) >= cap {
                return Err(Refusal::new(486, format!("Service {name} at capacity")));
            }
        }
    }
    Ok(Accepted {
        service: service.clone(),
        params,
        subscriber,
        offer,
    })
}

fn check_capacity(config: &Config, service: &ServiceConfig, load: &Load) -> Result<(), Refusal> {
    if let Some(cap) = service.capacity {
        if load.of(&service.name) >= cap {
            return Err(Refusal::new(
                486,
                format!("Service {} at capacity", service.name),
            ));
        }
    }
    if let Some(cap) = config.capacity {
        if load.total() >= cap {
            return Err(Refusal::new(486, "Server at capacity"));
        }
    }
    Ok(())
}

/// The value of the first header named `name` (ASCII case ignored, compact forms
/// included), trimmed.
pub fn header_value<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    header_values(&req.headers, name).next()
}

/// The service in `P-Asserted-Service` (RFC 6050 §4, read by sip-core's [`ServiceId`]):
/// `echo`, `<echo>`, `echo;quality=hd`, or a URN whose last segment is the name
/// (`urn:urn-7:3gpp-service.echo`). The first of a list.
fn asserted_service(req: &Request) -> Option<Named> {
    let value = header_value(req, P_ASSERTED_SERVICE)?;
    let id = ServiceId::parse_list(value).ok()?.into_iter().next()?;
    let name = id.name();
    if name.is_empty() {
        return None;
    }
    let params = id
        .params()
        .map(|(k, v)| (k.to_string(), v.map(|v| unquote(v).into_owned())))
        .collect();
    Some((name.to_string(), params))
}

/// The Request-URI read by sip-core's parser: rsip 0.4 cannot model an IPv6 host, and the
/// wire layer then hands the URI over as written (an rsip carrier), which this reads back.
fn request_uri(req: &Request) -> Option<Uri> {
    Uri::from_rsip(&req.uri).ok()
}

fn ruri_service(req: &Request) -> Option<Named> {
    let uri = request_uri(req)?;
    let user = uri.user_decoded()?;
    (!user.is_empty()).then(|| (user.into_owned(), Vec::new()))
}

/// The URI parameters of RFC 3261 §19.1.1 and those rsip reads as its own (Via, From and
/// Contact parameters): not service parameters.
const SIP_URI_PARAMS: [&str; 11] = [
    "transport",
    "user",
    "method",
    "ttl",
    "maddr",
    "lr",
    "branch",
    "received",
    "tag",
    "expires",
    "q",
];

fn ruri_params(req: &Request) -> Params {
    let Some(uri) = request_uri(req) else {
        return Vec::new();
    };
    uri.params()
        .filter(|(name, _)| !SIP_URI_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name)))
        .map(|(name, value)| (name.to_string(), value.map(str::to_string)))
        .collect()
}

fn offered_service(offer: &Result<Option<AppSdp>, Refusal>) -> Option<Named> {
    match offer {
        Ok(Some(sdp)) => sdp.service.clone().map(|s| (s, Vec::new())),
        _ => None,
    }
}

/// The user part of the first SIP URI in `P-Asserted-Identity` (RFC 3325 §9.1, read by
/// sip-core's address parser; a `tel:` identity beside it is skipped).
pub fn asserted_subscriber(req: &Request) -> Option<String> {
    let value = header_value(req, P_ASSERTED_IDENTITY)?;
    parse_asserted_identity(value)
        .ok()?
        .iter()
        .filter(|id| id.uri().is_sip())
        .find_map(|id| {
            let user = id.uri().user_decoded()?;
            (!user.is_empty()).then(|| user.into_owned())
        })
}

/// The terminal's offer: none for an empty body; `415` for a body that is not SDP; `488`
/// for SDP we cannot answer.
pub fn read_offer(req: &Request) -> Result<Option<AppSdp>, Refusal> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let is_sdp = header_value(req, "Content-Type")
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|ct| ct.trim().eq_ignore_ascii_case("application/sdp"));
    if !is_sdp {
        return Err(Refusal::new(415, "Only application/sdp bodies"));
    }
    let sdp = AppSdp::parse(&req.body).map_err(|e| match e {
        SdpError::NoApplicationMedia => Refusal::new(488, "No application stream offered"),
        SdpError::UnsupportedTransport(t) => {
            Refusal::new(488, format!("Application stream over {t}, not TCP"))
        }
        other => Refusal::new(488, format!("Unreadable SDP offer: {other}")),
    })?;
    if !sdp.proto.eq_ignore_ascii_case(APP_PROTO) {
        return Err(Refusal::new(
            488,
            format!("Application protocol {} not supported", sdp.proto),
        ));
    }
    if sdp.port == 0 {
        return Err(Refusal::new(488, "Application stream refused in the offer"));
    }
    match sdp.setup_or_default(true) {
        Setup::Active | Setup::Actpass => Ok(Some(sdp)),
        other => Err(Refusal::new(
            488,
            format!(
                "Offer is setup:{}, the data gateway is passive",
                other.as_str()
            ),
        )),
    }
}

/// The SDP of a 200: the data gateway as the passive side, the service, and the token (none
/// when the answer keeps an existing data connection). `previous` is the session's last
/// answer, whose origin it continues with a higher version (RFC 3264 §8).
pub fn answer(
    data: SocketAddr,
    token: Option<&str>,
    service: &str,
    previous: Option<&AppSdp>,
) -> AppSdp {
    let mut sdp = AppSdp::new(data.ip(), data.port(), Setup::Passive);
    sdp.session_name = "relay".to_string();
    sdp.service = Some(service.to_string());
    sdp.token = token.map(str::to_string);
    sdp.connection = Some(if token.is_some() {
        Connection::New
    } else {
        Connection::Existing
    });
    if let Some(prev) = previous {
        // The data gateway speaks TLS or not for the agent's whole life: a later answer says
        // what the first did.
        sdp.tls = prev.tls;
        sdp.origin = prev.origin.clone();
        sdp.origin.session_version = prev.origin.session_version.saturating_add(1);
    }
    sdp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::config::Flags;
    use clap::Parser;
    use rsip::headers::UntypedHeader as _;
    use rsip::{Header, SipMessage};

    fn config(extra: &str) -> Config {
        let text = format!(
            "[relay]\naccount = \"as1\"\npassword = \"pw\"\n{extra}\n\
             [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\ncapacity = 2\n\
             [[services]]\nname = \"clock\"\nbackend = \"builtin:clock\"\nallow = [\"alice\"]\n"
        );
        Config::from_toml(
            &text,
            std::path::Path::new("t.toml"),
            &Flags::parse_from(["x"]),
        )
        .unwrap()
    }

    const OFFER: &str = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=relay\r\nc=IN IP4 192.0.2.1\r\n\
t=0 0\r\nm=application 9 TCP relay-data\r\na=setup:active\r\na=connection:new\r\na=service:echo\r\n";

    fn invite(ruri: &str, headers: &[&str], body: &str) -> Request {
        let mut text = format!(
            "INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1\r\n\
             From: <sip:relay@relay.test>;tag=r1\r\nTo: <{ruri}>\r\nCall-ID: leg1\r\n\
             CSeq: 1 INVITE\r\nContact: <sip:relay@127.0.0.1:5060>\r\nMax-Forwards: 70\r\n"
        );
        for h in headers {
            text.push_str(h);
            text.push_str("\r\n");
        }
        if !body.is_empty() {
            text.push_str("Content-Type: application/sdp\r\n");
        }
        text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        // Read as the endpoint reads it: sip-core's wire layer (IPv6 Request-URIs included).
        match sip_core::wire::parse(text.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            _ => unreachable!(),
        }
    }

    const PAI: &str = "P-Asserted-Identity: \"Alice\" <sip:alice@relay.test>";

    #[test]
    fn accepts_an_offered_service_for_an_allowed_subscriber() {
        let c = config("");
        let req = invite(
            "sip:echo@127.0.0.1:5080;quality=hd",
            &[PAI, "P-Asserted-Service: echo"],
            OFFER,
        );
        let a = decide(&req, &c, &Load::default()).unwrap();
        assert_eq!(a.service.name, "echo");
        assert_eq!(a.subscriber, "alice");
        assert_eq!(
            a.params,
            vec![("quality".to_string(), Some("hd".to_string()))]
        );
        assert_eq!(a.offer.unwrap().setup, Some(Setup::Active));
    }

    #[test]
    fn the_asserted_service_wins_over_the_request_uri() {
        let c = config("");
        let req = invite(
            "sip:echo@127.0.0.1:5080",
            &[PAI, "P-Asserted-Service: <clock>"],
            OFFER,
        );
        assert_eq!(
            decide(&req, &c, &Load::default()).unwrap().service.name,
            "clock"
        );
        let urn = invite(
            "sip:127.0.0.1:5080",
            &[PAI, "P-Asserted-Service: urn:urn-7:3gpp-service.clock"],
            OFFER,
        );
        assert_eq!(
            decide(&urn, &c, &Load::default()).unwrap().service.name,
            "clock"
        );
        // Neither header nor user part: the offer's a=service.
        let sdp_only = invite("sip:127.0.0.1:5080", &[PAI], OFFER);
        assert_eq!(
            decide(&sdp_only, &c, &Load::default())
                .unwrap()
                .service
                .name,
            "echo"
        );
    }

    #[test]
    fn refusals_carry_code_and_reason() {
        let c = config("[limits]\ncapacity = 3");
        let load = Load::default();
        let code = |req: &Request, load: &Load| decide(req, &c, load).unwrap_err();

        let r = code(&invite("sip:video@h", &[PAI], OFFER), &load);
        assert_eq!(
            (r.code, r.reason.as_str()),
            (404, "Service video not offered here")
        );
        let r = code(&invite("sip:echo@h", &[], OFFER), &load);
        assert_eq!(r.code, 403);
        let bob = "P-Asserted-Identity: <sip:bob@relay.test>";
        let r = code(&invite("sip:clock@h", &[bob], OFFER), &load);
        assert_eq!(
            (r.code, r.reason.as_str()),
            (403, "Subscriber bob may not use clock")
        );
        let audio = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
                     m=audio 4000 RTP/AVP 0\r\n";
        assert_eq!(code(&invite("sip:echo@h", &[PAI], audio), &load).code, 488);
        let passive = OFFER.replace("setup:active", "setup:passive");
        let r = code(&invite("sip:echo@h", &[PAI], &passive), &load);
        assert_eq!(r.code, 488);
        assert!(r.reason.contains("passive"), "{}", r.reason);
        let other_proto = OFFER.replace("relay-data", "chat");
        assert_eq!(
            code(&invite("sip:echo@h", &[PAI], &other_proto), &load).code,
            488
        );

        let mut busy = Load::default();
        busy.add("echo");
        busy.add("echo");
        let r = code(&invite("sip:echo@h", &[PAI], OFFER), &busy);
        assert_eq!(
            (r.code, r.reason.as_str()),
            (486, "Service echo at capacity")
        );
        busy.add("clock");
        let r = code(&invite("sip:clock@h", &[PAI], OFFER), &busy);
        assert_eq!((r.code, r.reason.as_str()), (486, "Server at capacity"));
        busy.remove("echo");
        assert!(decide(&invite("sip:clock@h", &[PAI], OFFER), &c, &busy).is_ok());
    }

    #[test]
    fn a_body_that_is_not_sdp_is_415_and_no_body_is_an_offerless_invite() {
        let c = config("");
        let mut req = invite("sip:echo@h", &[PAI], OFFER);
        for h in req.headers.iter_mut() {
            if let Header::ContentType(_) = h {
                *h = Header::ContentType(rsip::headers::ContentType::new("text/plain"));
            }
        }
        assert_eq!(decide(&req, &c, &Load::default()).unwrap_err().code, 415);
        let bare = invite("sip:echo@h", &[PAI], "");
        assert_eq!(decide(&bare, &c, &Load::default()).unwrap().offer, None);
    }

    #[test]
    fn changes_are_checked_like_inquiries_without_double_counting() {
        let c = config("[limits]\ncapacity = 1");
        let mut load = Load::default();
        load.add("echo");
        // Same service: the session's own place is enough even at full capacity.
        let same = invite("sip:as1@h", &[], OFFER);
        assert_eq!(
            decide_change(&same, "echo", "alice", &c, &load)
                .unwrap()
                .service
                .name,
            "echo"
        );
        // To clock, which alice may use: the total does not change.
        let to_clock = invite("sip:as1@h", &["P-Asserted-Service: clock"], OFFER);
        let a = decide_change(&to_clock, "echo", "alice", &c, &load).unwrap();
        assert_eq!(
            (a.service.name.as_str(), a.subscriber.as_str()),
            ("clock", "alice")
        );
        // Bob may not.
        assert_eq!(
            decide_change(&to_clock, "echo", "bob", &c, &load)
                .unwrap_err()
                .code,
            403
        );
        // An offer naming clock, with no service asserted by the relay: no change.
        let sdp_only = invite(
            "sip:as1@h",
            &[],
            &OFFER.replace("a=service:echo", "a=service:clock"),
        );
        assert!(OFFER.contains("a=service:echo"));
        assert_eq!(
            decide_change(&sdp_only, "echo", "alice", &c, &load)
                .unwrap()
                .service
                .name,
            "echo"
        );
        let to_video = invite("sip:as1@h", &["P-Asserted-Service: video"], OFFER);
        assert_eq!(
            decide_change(&to_video, "echo", "alice", &c, &load)
                .unwrap_err()
                .code,
            404
        );
    }

    #[test]
    fn relay_sources_check_ip_and_udp_port() {
        let s = RelaySources::new(
            vec![("127.0.0.1".parse().unwrap(), Some(5060))],
            "127.0.0.1",
        );
        let udp = |a: &str| Peer::udp(a.parse().unwrap());
        let tcp = |a: &str| Peer::tcp(a.parse().unwrap());
        assert!(s.allows(&udp("127.0.0.1:5060")));
        assert!(!s.allows(&udp("127.0.0.1:5061")));
        assert!(!s.allows(&udp("127.0.0.2:5060")));
        assert!(s.allows(&tcp("127.0.0.1:40000")));
        assert!(!s.allows(&tcp("127.0.0.2:5060")));
        let any_port =
            RelaySources::new(vec![("10.0.0.1".parse().unwrap(), None)], "relay.example");
        assert!(any_port.allows(&udp("10.0.0.1:1234")));
    }

    #[test]
    fn inquiries_from_every_relay_of_the_service_are_accepted_and_only_theirs() {
        let a = RelaySources::new(vec![("127.0.0.1".parse().unwrap(), Some(5060))], "a");
        let udp = |a: &str| Peer::udp(a.parse().unwrap());
        assert!(
            !a.allows(&udp("127.0.0.2:5070")),
            "B alone is not the relay"
        );
        let both = a.with(RelaySources::new(
            vec![("127.0.0.2".parse().unwrap(), Some(5070))],
            "b",
        ));
        assert!(both.allows(&udp("127.0.0.1:5060")));
        assert!(both.allows(&udp("127.0.0.2:5070")));
        assert!(!both.allows(&udp("127.0.0.2:5060")), "B's port is its own");
        assert!(!both.allows(&udp("127.0.0.3:5070")));
        assert_eq!(
            both.relays().map(|(host, _)| host).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[tokio::test]
    async fn relay_sources_of_an_ip_uri() {
        let uri = Uri::parse("sip:127.0.0.1:5999").unwrap();
        let s = RelaySources::of_uri(&uri, &NetDns::system()).await.unwrap();
        assert_eq!(
            s,
            RelaySources::new(
                vec![("127.0.0.1".parse().unwrap(), Some(5999))],
                "127.0.0.1"
            )
        );
    }

    #[test]
    fn subscriber_from_the_first_sip_identity() {
        let req = invite(
            "sip:echo@h",
            &["P-Asserted-Identity: <tel:+15551234>, \"A, B\" <sip:carol@relay.test;user=phone>"],
            "",
        );
        assert_eq!(asserted_subscriber(&req).as_deref(), Some("carol"));
        let bare = invite(
            "sip:echo@h",
            &["P-Asserted-Identity: sip:dave@relay.test"],
            "",
        );
        assert_eq!(asserted_subscriber(&bare).as_deref(), Some("dave"));
        let junk = invite("sip:echo@h", &["P-Asserted-Identity: <nonsense"], "");
        assert_eq!(asserted_subscriber(&junk), None);
    }

    #[test]
    fn answers_name_the_gateway_and_the_token() {
        let data: SocketAddr = "127.0.0.1:7080".parse().unwrap();
        let first = answer(data, Some("0123abcd"), "echo", None);
        let text = first.to_string();
        assert!(
            text.contains("m=application 7080 TCP relay-data\r\n"),
            "{text}"
        );
        assert!(text.contains("c=IN IP4 127.0.0.1\r\n"));
        assert!(text.contains("a=setup:passive\r\n"));
        assert!(text.contains("a=connection:new\r\n"));
        assert!(text.contains("a=session-token:0123abcd\r\n"));
        assert!(text.contains("a=service:echo\r\n"));
        let parsed = AppSdp::parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.token.as_deref(), Some("0123abcd"));
        let again = answer(data, None, "echo", Some(&first));
        assert_eq!(again.origin.session_id, first.origin.session_id);
        assert_eq!(
            again.origin.session_version,
            first.origin.session_version + 1
        );
        assert_eq!(again.connection, Some(Connection::Existing));
        assert_eq!(again.token, None);
    }

    #[test]
    fn an_ipv6_data_address_gives_an_ip6_answer() {
        let data: SocketAddr = "[::1]:7080".parse().unwrap();
        let sdp = answer(data, Some("0123abcd"), "echo", None);
        let text = sdp.to_string();
        assert!(text.contains("c=IN IP6 ::1\r\n"), "{text}");
        let origin = text.lines().find(|l| l.starts_with("o=")).unwrap();
        assert!(origin.ends_with(" IN IP6 ::1"), "{origin}");
        assert!(
            text.contains("m=application 7080 TCP relay-data\r\n"),
            "{text}"
        );
        let parsed = AppSdp::parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.socket_addr(), data);
        assert_eq!(parsed.origin.addr, data.ip());
    }

    #[test]
    fn an_inquiry_to_an_ipv6_request_uri_names_its_service_and_params() {
        let c = config("");
        let req = invite(
            "sip:echo@[::1]:5080;quality=hd;transport=udp",
            &["P-Asserted-Identity: <sip:alice@[2001:db8::1]>"],
            OFFER,
        );
        assert_eq!(ruri_service(&req), Some(("echo".to_string(), Vec::new())));
        let a = decide(&req, &c, &Load::default()).unwrap();
        assert_eq!(a.service.name, "echo");
        assert_eq!(a.subscriber, "alice");
        assert_eq!(
            a.params,
            vec![("quality".to_string(), Some("hd".to_string()))],
            "transport= is not a service parameter"
        );
    }

    #[tokio::test]
    async fn relay_sources_of_an_ipv6_uri() {
        let uri = Uri::parse("sip:[::1]:5999").unwrap();
        let s = RelaySources::of_uri(&uri, &NetDns::system()).await.unwrap();
        assert_eq!(
            s,
            RelaySources::new(vec![("::1".parse().unwrap(), Some(5999))], "::1")
        );
        assert!(s.allows(&Peer::udp("[::1]:5999".parse().unwrap())));
        assert!(!s.allows(&Peer::udp("[::1]:5998".parse().unwrap())));
        assert!(!s.allows(&Peer::udp("127.0.0.1:5999".parse().unwrap())));
        assert!(s.allows(&Peer::tcp("[::1]:40000".parse().unwrap())));
        // An IPv4 relay seen on a dual-stack socket.
        let v4 = RelaySources::new(
            vec![("127.0.0.1".parse().unwrap(), Some(5060))],
            "127.0.0.1",
        );
        assert!(v4.allows(&Peer::udp("[::ffff:127.0.0.1]:5060".parse().unwrap())));
    }
}
