//! Turning a SIP URI into the transport targets to try, in order (RFC 3263 §4).
//!
//! An IP host is resolved here, without DNS: its own port (or the transport's default) and
//! its `transport=` parameter, `sips:` meaning TLS (RFC 3263 §4.1, §4.2). rsip-dns is used
//! for domain names only, because it replaces an IP host's port with the default one.
//! Domains go through rsip-dns' RFC 3263 lookup (NAPTR → SRV → A/AAAA) over any
//! [`rsip_dns::DnsClient`]: [`StaticDns`] answers from maps filled from configuration (so
//! tests never need DNS), [`SystemDns`] asks the system resolver for addresses only.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use rsip::Host;
use rsip_dns::records::{
    AddrRecord, NaptrEntry, NaptrFlags, NaptrRecord, NaptrServices, SrvEntry, SrvRecord,
};
use rsip_dns::{Context, DnsClient, Lookup, ResolvableExt, SrvDomain, SupportedTransports};

use crate::peer::{Peer, Transport};
use crate::uri::{Host as UriHost, Scheme as UriScheme};

/// The most targets one resolution yields; RFC 3263 lookups can fan out widely.
const MAX_TARGETS: usize = 16;
/// The most steps of the lazy lookup we drive (each may be a DNS query).
const MAX_STEPS: usize = 64;

/// Why a URI could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The scheme is not `sip` or `sips`.
    #[error("cannot resolve a {0} URI")]
    UnsupportedScheme(String),
    /// The `transport=` parameter names a transport we do not speak (SCTP, WS…).
    #[error("unsupported transport {0}")]
    UnsupportedTransport(String),
    /// A `sips:` URI with `transport=udp` (RFC 3261 §26.2.2 asks TLS).
    #[error("sips URI with an insecure transport")]
    InsecureTransport,
    /// DNS gave no usable target for the domain.
    #[error("no target found for {0}")]
    NotFound(String),
    /// A configured DNS record is invalid; the text says which.
    #[error("invalid DNS record: {0}")]
    InvalidRecord(String),
}

/// One place to send to: a transport and a socket address (RFC 3263 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// The transport to use.
    pub transport: Transport,
    /// The address to send to.
    pub addr: SocketAddr,
}

impl Target {
    /// The target as a [`Peer`] with no particular connection.
    pub fn peer(&self) -> Peer {
        Peer {
            transport: self.transport,
            addr: self.addr,
            conn: None,
        }
    }
}

fn to_rsip(t: Transport) -> rsip::Transport {
    match t {
        Transport::Udp => rsip::Transport::Udp,
        Transport::Tcp => rsip::Transport::Tcp,
        Transport::Tls => rsip::Transport::Tls,
    }
}

fn from_rsip(t: rsip::Transport) -> Option<Transport> {
    match t {
        rsip::Transport::Udp => Some(Transport::Udp),
        rsip::Transport::Tcp => Some(Transport::Tcp),
        rsip::Transport::Tls => Some(Transport::Tls),
        _ => None,
    }
}

/// RFC 3263 for a URI whose answer needs no DNS: `Some` with the targets (or the error)
/// when the host is an IP address, or the URI cannot be resolved at all; `None` when the
/// host is a name that [`resolve`] must look up.
pub fn resolve_literal(uri: &crate::uri::Uri) -> Option<Result<Vec<Target>, ResolveError>> {
    match literal(uri) {
        Ok(Literal::Done(targets)) => Some(Ok(targets)),
        Ok(Literal::Lookup { .. }) => None,
        Err(e) => Some(Err(e)),
    }
}

/// What a URI says before any lookup.
enum Literal<'a> {
    /// Its host is an address: the targets.
    Done(Vec<Target>),
    /// Its host is a name to look up, with what the URI fixes.
    Lookup {
        domain: &'a str,
        secure: bool,
        port: Option<u16>,
        transport: Option<Transport>,
    },
}

fn literal(uri: &crate::uri::Uri) -> Result<Literal<'_>, ResolveError> {
    let secure_scheme = match uri.scheme() {
        UriScheme::Sip => false,
        UriScheme::Sips => true,
        _ => return Err(ResolveError::UnsupportedScheme(uri.scheme_str().to_owned())),
    };
    let transport = match uri.transport() {
        None => None,
        Some(t) => {
            let ours = Transport::from_name(t)
                .ok_or_else(|| ResolveError::UnsupportedTransport(t.to_ascii_uppercase()))?;
            Some(match (secure_scheme, ours) {
                (true, Transport::Udp) => return Err(ResolveError::InsecureTransport),
                (true, _) => Transport::Tls,
                (false, t) => t,
            })
        }
    };
    let secure = secure_scheme || transport == Some(Transport::Tls);
    let port = uri.port();
    let ip_target = |ip: IpAddr| {
        let transport = transport.unwrap_or(if secure {
            Transport::Tls
        } else {
            Transport::Udp
        });
        let port = port.unwrap_or_else(|| transport.default_port());
        Ok(Literal::Done(vec![Target {
            transport,
            addr: SocketAddr::new(ip, port),
        }]))
    };

    match uri.host() {
        None => Err(ResolveError::NotFound(uri.as_str().to_owned())),
        Some(UriHost::V4(ip)) => ip_target(IpAddr::V4(ip)),
        Some(UriHost::V6(ip)) => ip_target(IpAddr::V6(ip)),
        Some(UriHost::Domain(domain)) => Ok(Literal::Lookup {
            domain,
            secure,
            port,
            transport,
        }),
    }
}

/// The targets for a SIP URI, in the order to try them (RFC 3263 §4).
///
/// * scheme `sips` means TLS (a `transport=tcp` on it is TLS over TCP; `transport=udp` is
///   an error); `sip` without `transport=` means UDP for an IP host (RFC 3263 §4.1);
/// * an IP host (IPv4, or IPv6 in brackets) gives one target: its port, or 5060 (5061 for
///   TLS);
/// * a domain goes through rsip-dns with `dns` (NAPTR, SRV, then A/AAAA; an explicit port
///   skips NAPTR and SRV). Duplicates are dropped; at most 16 targets are returned.
///
/// The URI is read with sip-core's own parser ([`crate::uri::Uri`]): rsip 0.4 cannot read
/// an IPv6 reference.
pub async fn resolve<C: DnsClient>(
    uri: &crate::uri::Uri,
    dns: &C,
) -> Result<Vec<Target>, ResolveError> {
    let (domain, secure, port, transport) = match literal(uri)? {
        Literal::Done(targets) => return Ok(targets),
        Literal::Lookup {
            domain,
            secure,
            port,
            transport,
        } => (domain, secure, port, transport),
    };
    let context = Context {
        secure,
        host: Host::Domain(domain.into()),
        port: port.map(rsip::Port::from),
        transport: transport.map(to_rsip),
        dns_client: dns.clone(),
        supported_transports: SupportedTransports::only(vec![
            rsip::Transport::Udp,
            rsip::Transport::Tcp,
            rsip::Transport::Tls,
        ]),
    };
    let mut lookup = Lookup::from(context);
    let mut targets: Vec<Target> = Vec::new();
    for _ in 0..MAX_STEPS {
        let Some(next) = lookup.resolve_next().await else {
            break;
        };
        let Some(transport) = from_rsip(next.transport) else {
            continue;
        };
        let target = Target {
            transport,
            addr: SocketAddr::new(next.ip_addr, *next.port.value()),
        };
        if !targets.contains(&target) {
            targets.push(target);
            if targets.len() >= MAX_TARGETS {
                break;
            }
        }
    }
    if targets.is_empty() {
        tracing::debug!(%uri, "no DNS target");
        return Err(ResolveError::NotFound(domain.to_string()));
    }
    Ok(targets)
}

fn normalize(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// An SRV record target (RFC 2782), as written in configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvSpec {
    /// Lower is tried first.
    pub priority: u16,
    /// Among equal priorities, higher is tried first (a fixed order, not RFC 2782's
    /// weighted random choice, so that configuration behaves predictably).
    pub weight: u16,
    /// The port to use.
    pub port: u16,
    /// The host name (or IP literal) of the target.
    pub target: String,
}

/// A NAPTR record (RFC 3403, used per RFC 3263 §4.1), as written in configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NaptrSpec {
    /// Lower is tried first.
    pub order: u16,
    /// Among equal orders, lower is tried first.
    pub preference: u16,
    /// `SIP+D2U`, `SIP+D2T` or `SIPS+D2T`.
    pub service: String,
    /// The SRV name to query next, e.g. `_sip._tcp.relay.test`.
    pub replacement: String,
}

#[derive(Debug, Clone, Default)]
struct StaticRecords {
    naptr: HashMap<String, Vec<NaptrEntry>>,
    srv: HashMap<String, Vec<SrvEntry>>,
    addr: HashMap<String, Vec<IpAddr>>,
}

/// A [`DnsClient`] answering from static maps of NAPTR, SRV and A/AAAA records (names
/// compared case-insensitively, trailing dot ignored). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct StaticDns {
    records: Arc<StaticRecords>,
}

impl StaticDns {
    /// An empty resolver: every name is unknown.
    pub fn new() -> StaticDns {
        StaticDns::default()
    }

    /// Adds address records for `name` (A and AAAA alike).
    pub fn with_addrs(mut self, name: &str, addrs: impl IntoIterator<Item = IpAddr>) -> StaticDns {
        Arc::make_mut(&mut self.records)
            .addr
            .entry(normalize(name))
            .or_default()
            .extend(addrs);
        self
    }

    /// Sets the SRV records of `name` (`_sip._udp.relay.test`, `_sips._tcp.relay.test` …),
    /// ordered by priority then weight.
    pub fn with_srv(mut self, name: &str, mut entries: Vec<SrvSpec>) -> StaticDns {
        entries.sort_by(|a, b| a.priority.cmp(&b.priority).then(b.weight.cmp(&a.weight)));
        let entries = entries
            .into_iter()
            .map(|e| SrvEntry {
                priority: e.priority,
                weight: e.weight,
                port: e.port.into(),
                target: normalize(&e.target).into(),
            })
            .collect();
        Arc::make_mut(&mut self.records)
            .srv
            .insert(normalize(name), entries);
        self
    }

    /// Sets the NAPTR records of a domain, ordered by order then preference. Fails on an
    /// unknown service or a replacement that is not an SRV name.
    pub fn with_naptr(
        mut self,
        domain: &str,
        mut entries: Vec<NaptrSpec>,
    ) -> Result<StaticDns, ResolveError> {
        entries.sort_by(|a, b| a.order.cmp(&b.order).then(a.preference.cmp(&b.preference)));
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let services = NaptrServices::try_from(e.service.as_bytes())
                .map_err(|_| ResolveError::InvalidRecord(format!("NAPTR service {}", e.service)))?;
            let replacement = normalize(&e.replacement);
            if SrvDomain::try_from(replacement.as_str()).is_err() {
                return Err(ResolveError::InvalidRecord(format!(
                    "NAPTR replacement {replacement}"
                )));
            }
            out.push(NaptrEntry {
                order: e.order,
                preference: e.preference,
                flags: NaptrFlags::S,
                services,
                regexp: Vec::new(),
                replacement: replacement.into(),
            });
        }
        Arc::make_mut(&mut self.records)
            .naptr
            .insert(normalize(domain), out);
        Ok(self)
    }
}

#[async_trait]
impl DnsClient for StaticDns {
    async fn naptr_lookup(&self, domain: rsip::Domain) -> Option<NaptrRecord> {
        let entries = self.records.naptr.get(&normalize(&domain.to_string()))?;
        Some(NaptrRecord {
            entries: entries.clone(),
            domain,
        })
    }

    async fn srv_lookup(&self, domain: SrvDomain) -> Option<SrvRecord> {
        let entries = self.records.srv.get(&normalize(&domain.to_string()))?;
        Some(SrvRecord {
            entries: entries.clone(),
            domain,
        })
    }

    async fn ip_lookup(&self, domain: rsip::Domain) -> Result<AddrRecord, rsip::Error> {
        let name = normalize(&domain.to_string());
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(AddrRecord {
                domain,
                ip_addrs: vec![ip],
            });
        }
        match self.records.addr.get(&name) {
            Some(ips) if !ips.is_empty() => Ok(AddrRecord {
                domain,
                ip_addrs: ips.clone(),
            }),
            _ => Err(rsip::Error::Unexpected(format!(
                "no address record for {name}"
            ))),
        }
    }
}

/// A [`DnsClient`] over the system resolver (`getaddrinfo` through tokio): addresses only,
/// no NAPTR or SRV, so a domain resolves per RFC 3263 §4.2's A/AAAA fallback.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemDns;

#[async_trait]
impl DnsClient for SystemDns {
    async fn naptr_lookup(&self, _domain: rsip::Domain) -> Option<NaptrRecord> {
        None
    }

    async fn srv_lookup(&self, _domain: SrvDomain) -> Option<SrvRecord> {
        None
    }

    async fn ip_lookup(&self, domain: rsip::Domain) -> Result<AddrRecord, rsip::Error> {
        let name = domain.to_string();
        let addrs = tokio::net::lookup_host((name.as_str(), 0))
            .await
            .map_err(|e| rsip::Error::Unexpected(format!("lookup of {name}: {e}")))?;
        let mut ip_addrs: Vec<IpAddr> = Vec::new();
        for a in addrs {
            if !ip_addrs.contains(&a.ip()) {
                ip_addrs.push(a.ip());
            }
        }
        Ok(AddrRecord { domain, ip_addrs })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn uri(s: &str) -> crate::uri::Uri {
        crate::uri::Uri::parse(s).unwrap()
    }

    fn t(transport: Transport, addr: &str) -> Target {
        Target {
            transport,
            addr: addr.parse().unwrap(),
        }
    }

    fn dns() -> StaticDns {
        StaticDns::new()
            .with_srv(
                "_sip._udp.relay.test",
                vec![
                    SrvSpec {
                        priority: 20,
                        weight: 0,
                        port: 5090,
                        target: "backup.relay.test".into(),
                    },
                    SrvSpec {
                        priority: 10,
                        weight: 5,
                        port: 5080,
                        target: "Main.Relay.Test.".into(),
                    },
                ],
            )
            .with_addrs("main.relay.test", ["10.0.0.5".parse().unwrap()])
            .with_addrs("backup.relay.test", ["10.0.0.6".parse().unwrap()])
            .with_addrs("relay.test", ["10.0.0.1".parse().unwrap()])
    }

    #[tokio::test]
    async fn ip_host_keeps_its_port_and_transport() {
        let none = StaticDns::new();
        let r = |s: &'static str| {
            let none = none.clone();
            async move { resolve(&uri(s), &none).await }
        };
        assert_eq!(
            r("sip:bob@127.0.0.1:5070").await.unwrap(),
            [t(Transport::Udp, "127.0.0.1:5070")]
        );
        assert_eq!(
            r("sip:127.0.0.1").await.unwrap(),
            [t(Transport::Udp, "127.0.0.1:5060")]
        );
        assert_eq!(
            r("sip:127.0.0.1;transport=tcp").await.unwrap(),
            [t(Transport::Tcp, "127.0.0.1:5060")]
        );
        assert_eq!(
            r("sip:127.0.0.1:7000;transport=TLS").await.unwrap(),
            [t(Transport::Tls, "127.0.0.1:7000")]
        );
        assert_eq!(
            r("sips:10.1.2.3").await.unwrap(),
            [t(Transport::Tls, "10.1.2.3:5061")]
        );
        assert_eq!(
            r("sips:10.1.2.3:6000;transport=tcp").await.unwrap(),
            [t(Transport::Tls, "10.1.2.3:6000")]
        );
        assert_eq!(
            r("sips:10.1.2.3;transport=udp").await,
            Err(ResolveError::InsecureTransport)
        );
        assert_eq!(
            r("sip:10.1.2.3;transport=sctp").await,
            Err(ResolveError::UnsupportedTransport("SCTP".into()))
        );
        // IPv6 references (RFC 3261 §25.1, RFC 5118), which rsip 0.4 cannot read.
        assert_eq!(
            r("sip:[::1]:5070").await.unwrap(),
            [t(Transport::Udp, "[::1]:5070")]
        );
        assert_eq!(
            r("sip:as1@[2001:db8::10];transport=tcp").await.unwrap(),
            [t(Transport::Tcp, "[2001:db8::10]:5060")]
        );
        assert_eq!(
            r("sips:[2001:db8::10]").await.unwrap(),
            [t(Transport::Tls, "[2001:db8::10]:5061")]
        );
        assert_eq!(
            r("tel:+15551234").await,
            Err(ResolveError::UnsupportedScheme("tel".into()))
        );
    }

    #[tokio::test]
    async fn srv_resolution_of_a_domain() {
        let targets = resolve(&uri("sip:service@relay.test"), &dns())
            .await
            .unwrap();
        // SRV by priority first, the A-record fallback of the bare domain last.
        assert_eq!(
            targets,
            [
                t(Transport::Udp, "10.0.0.5:5080"),
                t(Transport::Udp, "10.0.0.6:5090"),
                t(Transport::Udp, "10.0.0.1:5060"),
            ]
        );
    }

    #[tokio::test]
    async fn naptr_then_srv() {
        let dns = dns()
            .with_naptr(
                "relay.test",
                vec![NaptrSpec {
                    order: 10,
                    preference: 10,
                    service: "SIP+D2T".into(),
                    replacement: "_sip._tcp.relay.test".into(),
                }],
            )
            .unwrap()
            .with_srv(
                "_sip._tcp.relay.test",
                vec![SrvSpec {
                    priority: 1,
                    weight: 1,
                    port: 5062,
                    target: "main.relay.test".into(),
                }],
            );
        let targets = resolve(&uri("sip:relay.test"), &dns).await.unwrap();
        assert_eq!(targets[0], t(Transport::Tcp, "10.0.0.5:5062"));
        assert!(dns
            .clone()
            .with_naptr(
                "x.test",
                vec![NaptrSpec {
                    order: 1,
                    preference: 1,
                    service: "FOO".into(),
                    replacement: "_sip._tcp.x".into()
                }]
            )
            .is_err());
    }

    #[tokio::test]
    async fn domain_with_port_or_transport() {
        // An explicit port: A records only, port kept.
        assert_eq!(
            resolve(&uri("sip:relay.test:5099"), &dns()).await.unwrap(),
            [t(Transport::Udp, "10.0.0.1:5099")]
        );
        // transport=tls and no SRV: A records, TLS default port.
        assert_eq!(
            resolve(&uri("sip:relay.test;transport=tls"), &dns())
                .await
                .unwrap(),
            [t(Transport::Tls, "10.0.0.1:5061")]
        );
        // transport=udp: the UDP SRV records first.
        assert_eq!(
            resolve(&uri("sip:relay.test;transport=udp"), &dns())
                .await
                .unwrap()[0],
            t(Transport::Udp, "10.0.0.5:5080")
        );
    }

    #[tokio::test]
    async fn unknown_domain_is_not_found() {
        assert_eq!(
            resolve(&uri("sip:nowhere.test"), &dns()).await,
            Err(ResolveError::NotFound("nowhere.test".into()))
        );
    }
}
