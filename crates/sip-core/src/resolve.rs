//! Turning a SIP URI into the transport targets to try, in order (RFC 3263 §4).
//!
//! An IP host is resolved here, without DNS: its own port (or the transport's default) and
//! its `transport=` parameter, `sips:` meaning TLS (RFC 3263 §4.1, §4.2). rsip-dns is used
//! for domain names only, because it replaces an IP host's port with the default one.
//! Domains go through rsip-dns' RFC 3263 lookup (NAPTR → SRV → A/AAAA) over any
//! [`rsip_dns::DnsClient`]: [`StaticDns`] answers from maps filled from configuration (so
//! tests never need DNS), [`SystemDns`] asks the system resolver for addresses only, and
//! [`NetDns`] asks a real DNS server (hickory-resolver) for NAPTR, SRV and A/AAAA records:
//! the one named in configuration (`--dns 127.0.0.1:5353`), else `/etc/resolv.conf`'s.
//!
//! What is not I/O is plain functions with unit tests: SRV ordering by priority and weight
//! ([`order_srv`], RFC 2782 as RFC 3263 §4.4 asks), NAPTR ordering ([`order_naptr`],
//! RFC 3403 §4.1, RFC 3263 §4.1), and the fail-over over the ordered targets ([`Failover`],
//! [`moves_on`], RFC 3263 §4.3). [`NetDns`] is a thin layer that asks and converts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioAsyncResolver;
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

/// Orders SRV records for RFC 3263 §4.4: by priority (lowest first), and within one
/// priority by RFC 2782's weighted random selection: a record of weight `w` comes first with
/// probability `w / sum`, records of weight 0 only a very small chance (they are put first
/// in the running sum, as RFC 2782 asks). `key` gives a record's (priority, weight);
/// `random(n)` returns a number in `0..=n` (a seeded or fixed one in tests).
pub fn order_srv<T>(
    mut records: Vec<T>,
    key: impl Fn(&T) -> (u16, u16),
    mut random: impl FnMut(u32) -> u32,
) -> Vec<T> {
    // Stable: weight-0 records first within each priority, then as given.
    records.sort_by_key(|r| {
        let (priority, weight) = key(r);
        (priority, weight != 0)
    });
    let mut out = Vec::with_capacity(records.len());
    let mut rest = records;
    while !rest.is_empty() {
        let priority = key(&rest[0]).0;
        let group_len = rest.iter().take_while(|r| key(r).0 == priority).count();
        let mut group: Vec<T> = rest.drain(..group_len).collect();
        while !group.is_empty() {
            let sum: u32 = group.iter().map(|r| u32::from(key(r).1)).sum();
            let pick = random(sum).min(sum);
            let mut running = 0u32;
            let mut chosen = group.len() - 1;
            for (i, r) in group.iter().enumerate() {
                running += u32::from(key(r).1);
                if running >= pick {
                    chosen = i;
                    break;
                }
            }
            out.push(group.remove(chosen));
        }
    }
    out
}

/// Orders NAPTR records by order, then preference, lowest first (RFC 3403 §4.1, as RFC
/// 3263 §4.1 applies it). `key` gives a record's (order, preference).
pub fn order_naptr<T>(mut records: Vec<T>, key: impl Fn(&T) -> (u16, u16)) -> Vec<T> {
    records.sort_by_key(|r| key(r));
    records
}

/// Whether the final response of a request sent to one target means "try the next one"
/// (RFC 3263 §4.3): a transaction timeout or a transport failure (refused or reset TCP/TLS
/// connection, ICMP error), which sip-core's endpoint reports as a local 408 or 503 with no
/// header (RFC 3261 §8.1.3.1), or a 503 (Service Unavailable) from the target itself.
pub fn moves_on(resp: &rsip::Response) -> bool {
    let code = resp.status_code.code();
    code == 503 || (code == 408 && resp.headers.iter().next().is_none())
}

/// The targets of one resolution, tried in order (RFC 3263 §4.3): the current one is used
/// until a request to it fails as [`moves_on`] says, then the next one. Plain data, no I/O:
/// the program sends, sees the outcome, and calls [`Failover::failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    targets: Vec<Target>,
    current: usize,
}

impl Failover {
    /// The targets in the order to try them; `None` when there is none.
    pub fn new(targets: Vec<Target>) -> Option<Failover> {
        if targets.is_empty() {
            return None;
        }
        Some(Failover {
            targets,
            current: 0,
        })
    }

    /// `first`, then those of `others` that are not `first`, in their order.
    pub fn starting_with(first: Target, others: impl IntoIterator<Item = Target>) -> Failover {
        let mut targets = vec![first];
        for t in others {
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        Failover {
            targets,
            current: 0,
        }
    }

    /// The target in use.
    pub fn current(&self) -> Target {
        self.targets[self.current]
    }

    /// The current target did not answer: moves to the next one and returns it, or `None`
    /// when every target has been tried (the current one stays the last).
    pub fn failed(&mut self) -> Option<Target> {
        if self.current + 1 < self.targets.len() {
            self.current += 1;
            Some(self.targets[self.current])
        } else {
            None
        }
    }

    /// Starts again from the first target (a new resolution, or after a whole round failed).
    pub fn restart(&mut self) {
        self.current = 0;
    }

    /// All the targets, in order.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }
}

fn trim_name(name: &str) -> String {
    name.trim_end_matches('.').to_owned()
}

/// A [`DnsClient`] asking a real DNS server (hickory-resolver, over UDP with TCP on
/// truncation): NAPTR (RFC 3263 §4.1), SRV (§4.1, §4.2, ordered per [`order_srv`]) and
/// A/AAAA records. [`NetDns::with_server`] asks one server (`127.0.0.1:5353`), for every
/// record; [`NetDns::system`] asks `/etc/resolv.conf`'s servers for NAPTR and SRV and the
/// system resolver (`getaddrinfo`, so `/etc/hosts` too) for addresses, as [`SystemDns`]
/// does. Cheap to clone.
#[derive(Clone)]
pub struct NetDns {
    resolver: Option<TokioAsyncResolver>,
    /// Addresses too from `resolver` (a configured server), else from the system.
    addrs_from_resolver: bool,
}

impl std::fmt::Debug for NetDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDns")
            .field("resolver", &self.resolver.is_some())
            .field("addrs_from_resolver", &self.addrs_from_resolver)
            .finish()
    }
}

impl NetDns {
    /// Asks the DNS server at `server` for everything (no search list, no `/etc/hosts`),
    /// waiting `timeout` per query, two attempts.
    pub fn with_server(server: SocketAddr, timeout: std::time::Duration) -> NetDns {
        use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
        let group = NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
        let config = ResolverConfig::from_parts(None, Vec::new(), group);
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.attempts = 2;
        opts.use_hosts_file = false;
        opts.ndots = 0;
        NetDns {
            resolver: Some(TokioAsyncResolver::tokio(config, opts)),
            addrs_from_resolver: true,
        }
    }

    /// The system's configuration: NAPTR and SRV from `/etc/resolv.conf`'s servers (none
    /// when it cannot be read), addresses from `getaddrinfo`.
    pub fn system() -> NetDns {
        let resolver = match TokioAsyncResolver::tokio_from_system_conf() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(error = %e, "no system DNS configuration: addresses only");
                None
            }
        };
        NetDns {
            resolver,
            addrs_from_resolver: false,
        }
    }
}

#[async_trait]
impl DnsClient for NetDns {
    async fn naptr_lookup(&self, domain: rsip::Domain) -> Option<NaptrRecord> {
        let resolver = self.resolver.as_ref()?;
        let name = trim_name(&domain.to_string());
        let answer = match resolver.lookup(name.as_str(), RecordType::NAPTR).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%name, error = %e, "no NAPTR");
                return None;
            }
        };
        let mut entries = Vec::new();
        for rdata in answer.iter() {
            let RData::NAPTR(n) = rdata else { continue };
            // Unknown services (SIP+D2S, E2U…) are not ours: skip them (RFC 3263 §4.1).
            let Ok(services) = NaptrServices::try_from(n.services()) else {
                continue;
            };
            entries.push(NaptrEntry {
                order: n.order(),
                preference: n.preference(),
                flags: NaptrFlags::from(n.flags()),
                services,
                regexp: n.regexp().to_vec(),
                replacement: trim_name(&n.replacement().to_string()).into(),
            });
        }
        if entries.is_empty() {
            return None;
        }
        Some(NaptrRecord {
            entries: order_naptr(entries, |e| (e.order, e.preference)),
            domain,
        })
    }

    async fn srv_lookup(&self, domain: SrvDomain) -> Option<SrvRecord> {
        let resolver = self.resolver.as_ref()?;
        let name = trim_name(&domain.to_string());
        let answer = match resolver.srv_lookup(name.as_str()).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%name, error = %e, "no SRV");
                return None;
            }
        };
        let entries: Vec<SrvEntry> = answer
            .iter()
            // A target of "." means the service is not offered there (RFC 2782).
            .filter(|srv| !srv.target().is_root())
            .map(|srv| SrvEntry {
                priority: srv.priority(),
                weight: srv.weight(),
                port: srv.port().into(),
                target: trim_name(&srv.target().to_string()).into(),
            })
            .collect();
        if entries.is_empty() {
            return None;
        }
        let mut rng = rand::thread_rng();
        let entries = order_srv(
            entries,
            |e| (e.priority, e.weight),
            |n| rand::Rng::gen_range(&mut rng, 0..=n),
        );
        Some(SrvRecord { entries, domain })
    }

    async fn ip_lookup(&self, domain: rsip::Domain) -> Result<AddrRecord, rsip::Error> {
        let resolver = match &self.resolver {
            Some(r) if self.addrs_from_resolver => r,
            _ => return SystemDns.ip_lookup(domain).await,
        };
        let name = trim_name(&domain.to_string());
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(AddrRecord {
                domain,
                ip_addrs: vec![ip],
            });
        }
        let answer = resolver
            .lookup_ip(name.as_str())
            .await
            .map_err(|e| rsip::Error::Unexpected(format!("lookup of {name}: {e}")))?;
        let mut ip_addrs: Vec<IpAddr> = Vec::new();
        for ip in answer.iter() {
            if !ip_addrs.contains(&ip) {
                ip_addrs.push(ip);
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

    #[test]
    fn srv_order_is_priority_then_weighted_choice() {
        // (priority, weight, name)
        let recs = vec![
            (20, 0, "backup"),
            (10, 10, "b"),
            (10, 0, "zero"),
            (10, 90, "a"),
        ];
        let key = |r: &(u16, u16, &str)| (r.0, r.1);
        let names =
            |v: Vec<(u16, u16, &'static str)>| v.into_iter().map(|r| r.2).collect::<Vec<_>>();
        // random = the top of the range: the last of the running sum wins each round.
        assert_eq!(
            names(order_srv(recs.clone(), key, |n| n)),
            ["a", "b", "zero", "backup"]
        );
        // random = 0: a weight-0 record first (RFC 2782), then the first with weight.
        assert_eq!(
            names(order_srv(recs.clone(), key, |_| 0)),
            ["zero", "b", "a", "backup"]
        );
        // random = 50 of 100: past b's 10 (and zero's 0), inside a's 90.
        let mut first = true;
        let mid = order_srv(recs.clone(), key, |n| {
            if std::mem::take(&mut first) {
                50.min(n)
            } else {
                0
            }
        });
        assert_eq!(names(mid), ["a", "zero", "b", "backup"]);
        // A lower priority always goes first, whatever the weights (rsip-dns' own sort
        // adds weight to priority and would put (11, 500) before (10, 0)).
        let recs = vec![(11, 500, "late"), (10, 0, "early")];
        assert_eq!(names(order_srv(recs, key, |n| n)), ["early", "late"]);
        // Over many draws, weights 90:10 give about 90% first places.
        let mut seed = 1u64;
        let mut a_first = 0;
        for _ in 0..1000 {
            let recs = vec![(1, 90, "a"), (1, 10, "b")];
            let order = order_srv(recs, key, |n| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) % (u64::from(n) + 1)) as u32
            });
            if order[0].2 == "a" {
                a_first += 1;
            }
        }
        assert!((850..=950).contains(&a_first), "{a_first}");
    }

    #[test]
    fn naptr_order_is_order_then_preference() {
        let recs = vec![(20, 1, "c"), (10, 50, "b"), (10, 10, "a")];
        let out: Vec<_> = order_naptr(recs, |r| (r.0, r.1))
            .into_iter()
            .map(|r| r.2)
            .collect();
        assert_eq!(out, ["a", "b", "c"]);
    }

    #[test]
    fn failover_moves_on_a_timeout_a_transport_failure_or_a_503() {
        let a = t(Transport::Udp, "127.0.0.1:5071");
        let b = t(Transport::Udp, "127.0.0.1:5072");
        assert_eq!(Failover::new(Vec::new()), None);
        let mut f = Failover::new(vec![a, b]).unwrap();
        assert_eq!(f.current(), a);
        assert_eq!(f.failed(), Some(b));
        assert_eq!(f.current(), b);
        assert_eq!(f.failed(), None);
        assert_eq!(f.current(), b);
        f.restart();
        assert_eq!(f.current(), a);
        assert_eq!(f.targets(), [a, b]);
        let f = Failover::starting_with(b, [a, b, a]);
        assert_eq!(f.targets(), [b, a]);

        let local = |code: u16| rsip::Response {
            status_code: rsip::StatusCode::from(code),
            version: rsip::Version::V2,
            headers: rsip::Headers::default(),
            body: Vec::new(),
        };
        let remote = |code: u16| {
            let mut r = local(code);
            r.headers.push(rsip::Header::CallId("x@y".into()));
            r
        };
        // Local 408 (Timer B/F) and local 503 (transport error): the next target.
        assert!(moves_on(&local(408)));
        assert!(moves_on(&local(503)));
        // A 503 from the relay itself too; its own 408, or any other answer, does not.
        assert!(moves_on(&remote(503)));
        assert!(!moves_on(&remote(408)));
        assert!(!moves_on(&remote(401)));
        assert!(!moves_on(&remote(200)));
        assert!(!moves_on(&remote(404)));
    }
}
