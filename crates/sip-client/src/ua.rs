//! The user agent core: one SIP endpoint bound for the client, the relay it talks to, our
//! Via and Contact, and the account's digest answers. Registration, the call and its
//! sessions all send through it.
//!
//! The endpoint is bound on the relay's address family (IPv4 or IPv6); our Via sent-by and
//! Contact write an IPv6 address in brackets (`[::1]:5070`). URIs are sip-core's
//! ([`sip_core::uri::Uri`]): rsip 0.4 cannot read IPv6 references, so they enter rsip
//! messages only as [`Uri::to_rsip`] carriers, which print as written.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use rsip::headers::UntypedHeader as _;
use rsip::{Header, Request, Response};
use sip_core::dialog::ViaSpec;
use sip_core::endpoint::{ClientTx, Endpoint, EndpointConfig, EndpointEvent, ServerTx};
use sip_core::resolve::{moves_on, resolve, Failover, NetDns, Target};
use sip_core::transaction::Timers;
use sip_core::transport::TransportConfig;
use sip_core::uri::{Host, Uri};
use sip_core::{message, Peer, Transport};
use tokio::sync::mpsc;

use crate::auth::{with_credentials, Account, AuthError, Authenticator, Kind};
use crate::config::Settings;
use crate::failure::Failure;
use crate::headers;

/// The user agent: cheap to clone.
#[derive(Clone)]
pub struct Ua {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    /// The relay's targets of the chosen transport and address family, in RFC 3263 order:
    /// the current one is used until it does not answer (RFC 3263 §4.3).
    relay: Mutex<Failover>,
    via: ViaSpec,
    contact: Uri,
    local_ip: IpAddr,
    account: Account,
    auth: Mutex<Authenticator>,
    timers: Timers,
}

/// The local address packets to `to` leave from (no packet is sent: a connected UDP
/// socket only looks the route up); the loopback address of `to`'s family when there is no
/// route.
fn route_ip(to: SocketAddr) -> IpAddr {
    let (any, loopback): (IpAddr, IpAddr) = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED.into(), Ipv4Addr::LOCALHOST.into())
    } else {
        (Ipv6Addr::UNSPECIFIED.into(), Ipv6Addr::LOCALHOST.into())
    };
    std::net::UdpSocket::bind(SocketAddr::new(any, 0))
        .and_then(|s| s.connect(to).and_then(|_| s.local_addr()))
        .map(|a| a.ip())
        .unwrap_or(loopback)
}

/// Checks that a socket bound on `listen` can reach the relay at `relay`: the same address
/// family, or the IPv6 wildcard (dual-stack) for an IPv4 relay.
fn check_family(listen: SocketAddr, relay: SocketAddr) -> anyhow::Result<()> {
    if crate::config::reaches(listen.ip(), relay.ip()) {
        Ok(())
    } else {
        bail!(
            "--listen {listen} cannot reach the relay at {relay}: give an address of the relay's \
             family ({})",
            if relay.is_ipv6() {
                "IPv6, such as [::1] or [::]"
            } else {
                "IPv4, such as 127.0.0.1"
            }
        )
    }
}

/// The address we write in Via, Contact and the SDP for a socket bound on `local`: itself,
/// or, for a wildcard (`0.0.0.0`, `[::]`), the address that routes to the relay.
fn advertised(local: SocketAddr, relay: SocketAddr) -> SocketAddr {
    if local.ip().is_unspecified() {
        SocketAddr::new(route_ip(relay), local.port())
    } else {
        local
    }
}

/// Our Contact URI, `sip:<user>@<host:port>[;transport=…]`, an IPv6 host in brackets.
fn contact_uri(user: &str, local: SocketAddr, transport: Transport) -> anyhow::Result<Uri> {
    let (scheme, transport_param) = match transport {
        Transport::Udp => ("sip", String::new()),
        // RFC 5630 §3.1.3: sips:, not ;transport=tls. The address is the one our TLS
        // connection to the relay is bound to, so the relay reaches us back on it.
        Transport::Tls => ("sips", String::new()),
        t => ("sip", format!(";transport={}", t.param_name())),
    };
    // `SocketAddr` prints an IPv6 address in brackets: `[::1]:5070`.
    let text = format!("{scheme}:{user}@{local}{transport_param}");
    Uri::parse(&text).with_context(|| format!("cannot build a Contact from {text}"))
}

/// See [`Ua::peer_for`]: `relay` is where a domain's requests go.
fn peer_of(uri: &Uri, relay: Peer) -> Peer {
    let ip = match uri.host() {
        Some(Host::V4(ip)) => IpAddr::V4(ip),
        Some(Host::V6(ip)) => IpAddr::V6(ip),
        Some(Host::Domain(_)) | None => return relay,
    };
    // A sips: URI, or transport=tls, is TLS (RFC 3261 §26.2.2) — only when we speak it (the
    // relay leg is TLS); otherwise the relay's transport.
    let wanted = if uri.is_sips() {
        Some(Transport::Tls)
    } else {
        uri.transport().and_then(Transport::from_name)
    };
    let transport = wanted
        .filter(|t| *t != Transport::Tls || relay.transport == Transport::Tls)
        .unwrap_or(relay.transport);
    let port = uri.port().unwrap_or(transport.default_port());
    Peer {
        transport,
        addr: SocketAddr::new(ip, port),
        conn: None,
    }
}

/// Picks the target to use: the first of the transport asked for, else the first we speak
/// (TLS only with trusted CAs to verify the relay with: `tls`).
fn pick_target(targets: &[Target], wanted: Option<Transport>, tls: bool) -> anyhow::Result<Peer> {
    let speakable = |t: &&Target| tls || t.transport != Transport::Tls;
    let chosen = match wanted {
        Some(w) => targets
            .iter()
            .find(|t| t.transport == w)
            .map(|t| t.peer())
            .or_else(|| {
                // An IP relay resolves to UDP unless its URI says otherwise: the flag wins.
                targets.first().map(|t| Peer {
                    transport: w,
                    addr: t.addr,
                    conn: None,
                })
            }),
        None => targets.iter().find(speakable).map(|t| t.peer()),
    };
    match chosen {
        Some(p) => Ok(p),
        None => bail!("the relay resolves to no address we can use (TLS ones need --ca FILE)"),
    }
}

/// The relay's targets to fail over between: `chosen` first, then the other targets of its
/// transport and address family, in resolution order (the endpoint is bound for those only).
fn relay_failover(chosen: Peer, targets: &[Target]) -> Failover {
    let first = Target {
        transport: chosen.transport,
        addr: chosen.addr,
    };
    Failover::starting_with(
        first,
        targets
            .iter()
            .copied()
            .filter(|t| t.transport == first.transport && t.addr.is_ipv4() == first.addr.is_ipv4()),
    )
}

impl Ua {
    /// Resolves the relay (RFC 3263), binds the endpoint and works out Via and Contact.
    /// Returns the user agent and the endpoint's events (requests to us, ACKs…).
    pub async fn start(settings: &Settings) -> anyhow::Result<(Ua, mpsc::Receiver<EndpointEvent>)> {
        let targets = match (&settings.dns, settings.dns_server) {
            (Some(dns), _) => resolve(&settings.relay, dns).await,
            (None, Some(server)) => {
                let dns = NetDns::with_server(server, Duration::from_secs(2));
                resolve(&settings.relay, &dns).await
            }
            (None, None) => resolve(&settings.relay, &NetDns::system()).await,
        }
        .with_context(|| format!("cannot find the relay {}", settings.relay))?;
        let relay = pick_target(&targets, settings.transport, settings.tls.is_some())?;
        let failover = relay_failover(relay, &targets);
        tracing::debug!(%relay, ?targets, "relay resolved");
        let listen = match settings.listen {
            Some(l) => {
                check_family(l, relay.addr)?;
                l
            }
            None => SocketAddr::new(route_ip(relay.addr), 0),
        };
        let timers = Timers {
            t1: settings.t1,
            t2: Timers::default().t2.max(settings.t1),
            t4: Timers::default().t4,
        };
        let tls = relay.transport == Transport::Tls;
        if tls && settings.tls.is_none() {
            bail!("TLS to the relay needs --ca FILE (the CA that signed the relay's certificate)");
        }
        // The data connection speaks TLS whenever the answer says TCP/TLS, and must when the
        // SIP leg is TLS.
        if let Some(setup) = &settings.tls {
            crate::data::configure_tls(setup.clone(), tls);
        }
        let config = EndpointConfig {
            transport: TransportConfig {
                udp: vec![listen],
                tcp: if relay.transport == Transport::Tcp {
                    vec![listen]
                } else {
                    Vec::new()
                },
                tls_setup: if tls { settings.tls.clone() } else { None },
                // We have no certificate, so cannot accept TLS: our TLS connection to the
                // relay leaves from our SIP port, which our Contact names (see contact_uri).
                tls_connect_from: tls.then_some(listen),
                ..TransportConfig::default()
            },
            timers,
            shards: 1,
            event_queue: 1024,
            ..EndpointConfig::default()
        };
        let (endpoint, events) = Endpoint::bind(config)
            .await
            .with_context(|| format!("cannot bind {listen}"))?;
        // Over TLS, our address is the UDP socket's (the TLS connection is bound to it).
        let bound = endpoint
            .local_addr(if tls { Transport::Udp } else { relay.transport })
            .with_context(|| format!("no local {} socket", relay.transport))?;
        // A relay known by name: its certificate must name that name (RFC 5922 §7.1).
        if tls {
            if let Some(Host::Domain(name)) = settings.relay.host() {
                let name = sip_core::tls::server_name(name)
                    .with_context(|| format!("the relay's host {name:?}"))?;
                for t in failover.targets() {
                    endpoint.transports().expect_name(t.addr, name.clone());
                }
            }
        }
        let local = advertised(bound, relay.addr);
        let contact = contact_uri(&settings.user, local, relay.transport)?;
        tracing::debug!(%bound, %local, %contact, "endpoint bound");
        let account = Account {
            user: settings.user.clone(),
            password: settings.password.clone(),
            domain: settings.domain.clone(),
        };
        let inner = Inner {
            endpoint,
            relay: Mutex::new(failover),
            via: ViaSpec {
                transport: relay.transport,
                sent_by: local.to_string(),
            },
            contact,
            local_ip: local.ip(),
            auth: Mutex::new(Authenticator::new(account.clone())),
            account,
            timers,
        };
        Ok((
            Ua {
                inner: Arc::new(inner),
            },
            events,
        ))
    }

    /// The relay's address.
    pub fn relay(&self) -> Peer {
        self.current_relay()
    }

    fn current_relay(&self) -> Peer {
        match self.inner.relay.lock() {
            Ok(f) => f.current().peer(),
            Err(poisoned) => poisoned.into_inner().current().peer(),
        }
    }

    /// The relay at `failed` did not answer (RFC 3263 §4.3): the next target, if any is
    /// left and `failed` is still the current one.
    fn relay_failed(&self, failed: Peer) -> Option<Peer> {
        let mut f = match self.inner.relay.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        if f.current().peer() != failed {
            return None;
        }
        let next = f.failed()?.peer();
        tracing::info!(%failed, %next, "the relay does not answer: trying the next target");
        Some(next)
    }

    /// How our requests' Via is written.
    pub fn via(&self) -> &ViaSpec {
        &self.inner.via
    }

    /// Our Contact URI (an IPv6 host in brackets).
    pub fn contact(&self) -> &Uri {
        &self.inner.contact
    }

    /// Our IP address (for the SDP: `c=IN IP6 …` when it is IPv6).
    pub fn local_ip(&self) -> IpAddr {
        self.inner.local_ip
    }

    /// The account.
    pub fn account(&self) -> &Account {
        &self.inner.account
    }

    /// 64·T1: how long a transaction may take.
    pub fn transaction_timeout(&self) -> Duration {
        self.inner.timers.transaction_timeout()
    }

    /// Where to send a request for `uri` (an in-dialog request's next hop, read by
    /// sip-core's parser): an IP host (IPv4, or IPv6 in brackets) directly, with the URI's
    /// transport or the relay's; a domain (or a non-SIP URI) through the relay.
    pub fn peer_for(&self, uri: &Uri) -> Peer {
        peer_of(uri, self.current_relay())
    }

    /// An out-of-dialog request to `uri` (put into the message as an rsip value that prints
    /// as written, IPv6 hosts included): Via, Max-Forwards, From (our AOR with `from_tag`),
    /// To, Call-ID, CSeq, Contact, User-Agent, then `extra`, and the body.
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &self,
        method: rsip::Method,
        uri: &Uri,
        to: &str,
        call_id: &str,
        from_tag: &str,
        cseq: u32,
        extra: Vec<Header>,
        body: Vec<u8>,
    ) -> Request {
        let mut h = vec![
            self.inner.via.header(),
            Header::MaxForwards(rsip::headers::MaxForwards::new("70")),
            Header::From(rsip::headers::From::new(format!(
                "<{}>;tag={from_tag}",
                self.inner.account.aor()
            ))),
            Header::To(rsip::headers::To::new(to.to_string())),
            Header::CallId(rsip::headers::CallId::new(call_id.to_string())),
            Header::CSeq(rsip::headers::CSeq::new(format!("{cseq} {method}"))),
            Header::Contact(rsip::headers::Contact::new(format!(
                "<{}>",
                self.inner.contact
            ))),
            headers::user_agent(),
        ];
        h.extend(extra);
        let mut headers = rsip::Headers::from(h);
        message::set_content_length(&mut headers, body.len());
        Request {
            method,
            uri: uri.to_rsip(),
            version: rsip::Version::V2,
            headers,
            body,
        }
    }

    /// Starts a client transaction.
    pub fn send(&self, req: Request, to: Peer) -> anyhow::Result<ClientTx> {
        tracing::debug!(method = %req.method, uri = %req.uri, %to, "send");
        self.inner
            .endpoint
            .send_request(req, to)
            .context("cannot send the request")
    }

    /// Sends an ACK for a 2xx (no transaction).
    pub async fn send_ack(&self, ack: Request, to: Peer) {
        if let Err(e) = self.inner.endpoint.send_stateless(&to, ack).await {
            tracing::warn!(%to, error = %e, "ACK not sent");
        }
    }

    /// Answers a server transaction; a closed endpoint is only logged.
    pub fn respond(&self, tx: &ServerTx, resp: Response) {
        if let Err(e) = tx.respond(resp) {
            tracing::debug!(error = %e, "response not sent");
        }
    }

    /// The credentials answering a 401/407 to `req`.
    pub fn authenticate(&self, req: &Request, resp: &Response) -> Result<Header, AuthError> {
        match self.inner.auth.lock() {
            Ok(mut auth) => auth.answer(req, resp),
            Err(poisoned) => poisoned.into_inner().answer(req, resp),
        }
    }

    /// Runs a non-INVITE transaction to its final response, answering 401/407 challenges
    /// (each once). `build` gives a fresh request for every attempt (new CSeq and branch);
    /// credentials are added here. Returns the last request sent and its final response
    /// (a timeout is a local 408).
    ///
    /// Sent to the relay, a request that times out, meets a transport failure or gets a 503
    /// goes again to the relay's next target, if there is one (RFC 3263 §4.3), which stays
    /// the relay from then on.
    pub async fn transact(
        &self,
        mut to: Peer,
        mut build: impl FnMut() -> anyhow::Result<Request>,
    ) -> anyhow::Result<(Request, Response)> {
        let mut creds: Vec<Header> = Vec::new();
        loop {
            let mut req = build()?;
            for c in &creds {
                req = with_credentials(req, c.clone());
            }
            let sent = match self.inner.endpoint.transports().ensure_connected(&to).await {
                Ok(()) => self.send(req.clone(), to),
                Err(e) => Err(anyhow::Error::new(e).context(format!("cannot connect to {to}"))),
            };
            let resp = match sent {
                Ok(mut tx) => tx.final_response().await,
                Err(e) => match self.relay_failed(to) {
                    Some(next) => {
                        tracing::debug!(error = %e, "send failed");
                        to = next;
                        creds.clear();
                        continue;
                    }
                    None => return Err(e),
                },
            };
            if moves_on(&resp) {
                if let Some(next) = self.relay_failed(to) {
                    to = next;
                    creds.clear();
                    continue;
                }
            }
            let code = resp.status_code.code();
            if Kind::of_status(code).is_none() {
                return Ok((req, resp));
            }
            match self.authenticate(&req, &resp) {
                Ok(h) => {
                    if creds.len() >= 4 {
                        return Ok((req, resp));
                    }
                    creds.push(h);
                }
                Err(AuthError::Rejected { status, realm }) => {
                    return Err(Failure::AuthFailed(format!(
                        "authentication failed: {} refused the credentials of {} for realm {realm:?} ({status})",
                        req.method,
                        self.inner.account.user
                    ))
                    .into())
                }
                Err(AuthError::NoChallenge(_)) => return Ok((req, resp)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn target_choice_follows_the_transport_asked_for() {
        let a: SocketAddr = "192.0.2.1:5060".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:5070".parse().unwrap();
        let targets = [
            Target {
                transport: Transport::Tls,
                addr: a,
            },
            Target {
                transport: Transport::Tcp,
                addr: b,
            },
            Target {
                transport: Transport::Udp,
                addr: a,
            },
        ];
        // Without trusted CAs the TLS target is passed over; with them it is first.
        assert_eq!(pick_target(&targets, None, false).unwrap(), Peer::tcp(b));
        assert_eq!(pick_target(&targets, None, true).unwrap(), Peer::tls(a));
        assert_eq!(
            pick_target(&targets, Some(Transport::Udp), false).unwrap(),
            Peer::udp(a)
        );
        let ip_only = [Target {
            transport: Transport::Udp,
            addr: a,
        }];
        assert_eq!(
            pick_target(&ip_only, Some(Transport::Tcp), false).unwrap(),
            Peer::tcp(a)
        );
        assert!(pick_target(&targets[..1], None, false).is_err());
    }

    #[test]
    fn route_ip_of_loopback_is_loopback() {
        assert_eq!(
            route_ip("127.0.0.1:9".parse().unwrap()),
            IpAddr::from(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            route_ip("[::1]:9".parse().unwrap()),
            IpAddr::from(Ipv6Addr::LOCALHOST)
        );
    }

    #[test]
    fn ipv6_contact_and_via_are_bracketed() {
        let local: SocketAddr = "[::1]:5070".parse().unwrap();
        let contact = contact_uri("alice", local, Transport::Udp).unwrap();
        assert_eq!(contact.to_string(), "sip:alice@[::1]:5070");
        assert_eq!(contact.host(), Some(Host::V6(Ipv6Addr::LOCALHOST)));
        let tcp = contact_uri("alice", local, Transport::Tcp).unwrap();
        assert_eq!(tcp.to_string(), "sip:alice@[::1]:5070;transport=tcp");
        // Into an rsip message and out again, unchanged.
        assert_eq!(contact.to_rsip().to_string(), "sip:alice@[::1]:5070");
        let via = ViaSpec {
            transport: Transport::Udp,
            sent_by: local.to_string(),
        }
        .header_with_branch("z9hG4bK1");
        assert_eq!(
            via.to_string(),
            "Via: SIP/2.0/UDP [::1]:5070;branch=z9hG4bK1;rport"
        );
        // A wildcard bind advertises the address that routes to the relay.
        let relay: SocketAddr = "[::1]:5060".parse().unwrap();
        assert_eq!(advertised("[::]:5070".parse().unwrap(), relay), local);
        assert_eq!(advertised(local, relay), local);
    }

    #[test]
    fn listen_family_must_reach_the_relay() {
        let v6: SocketAddr = "[::1]:5060".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        assert!(check_family("[::1]:0".parse().unwrap(), v6).is_ok());
        assert!(check_family("[::]:0".parse().unwrap(), v4).is_ok());
        let e = check_family("127.0.0.1:0".parse().unwrap(), v6).unwrap_err();
        assert!(e.to_string().contains("IPv6"), "{e}");
        assert!(check_family("[::1]:0".parse().unwrap(), v4).is_err());
    }

    #[test]
    fn in_dialog_targets_with_ipv6_hosts_go_direct() {
        let relay = Peer::udp("[::1]:5060".parse().unwrap());
        let direct = |u: &str| peer_of(&Uri::parse(u).unwrap(), relay);
        assert_eq!(
            direct("sip:as1@[::1]:5080"),
            Peer::udp("[::1]:5080".parse().unwrap())
        );
        assert_eq!(
            direct("sip:as1@[2001:db8::2];transport=tcp"),
            Peer::tcp("[2001:db8::2]:5060".parse().unwrap())
        );
        assert_eq!(direct("sip:relay.test;lr"), relay);
        assert_eq!(direct("tel:+15551234"), relay);
    }
}
