//! The running relay: the shared context every task reads, built from the configuration, and
//! the dispatcher that takes the endpoint's events and hands each to the session it belongs
//! to, or to the handler of an out-of-dialog request (REGISTER, INVITE admission, OPTIONS,
//! MESSAGE charge requests).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rand::RngCore;
use rsip::prelude::*;
use rsip::{Header, Method, Request};
use sip_core::digest::StoredCredential;
use sip_core::endpoint::{Endpoint, EndpointConfig, EndpointEvent, EventSink, IncomingRequest};
use sip_core::resolve::{resolve, SystemDns, Target};
use sip_core::transport::TransportConfig;
use sip_core::{message, Peer};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::auth::{AuthOutcome, Authenticator, ChallengeKind, CredentialStore, FailurePolicy};
use crate::b2bua::{self, LocalAddr};
use crate::billing_control::BillingControl;
use crate::charge::{self, ServedIndex};
use crate::config::{Config, Secret};
use crate::content;
use crate::directory::{Directory, ServerRef, Strategy};
use crate::extensions;
use crate::registrar::{RegisterRequest, Registrar, Role};
use crate::routing::{SessionInput, SessionTable};
use crate::rules::{FactNeeds, RequestFacts, RuleSet};
use crate::session::{self, Admission, SessionLimits};

/// Counters of the relay, for logs and metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// INVITEs admitted into a session.
    pub admitted: AtomicU64,
    /// Requests refused (any 4xx/5xx/6xx the relay itself sent).
    pub refused: AtomicU64,
    /// Challenges sent (401/407).
    pub challenged: AtomicU64,
}

/// How many new out-of-dialog requests (REGISTER, INVITE, MESSAGE) may be in hand at once —
/// handed to a task and not yet answered or turned into a call. Past it the relay gives new
/// ones back to the endpoint, which answers them 503 with Retry-After and counts them,
/// instead of queueing them without bound (the role the endpoint's bounded event queue had
/// before events were dispatched inline).
pub const MAX_BACKLOG: usize = 16 * 1024;

/// A count of requests in hand, with a limit: [`Backlog::enter`] gives a ticket that counts
/// until it is dropped, or nothing when the limit is reached.
#[derive(Debug)]
pub struct Backlog {
    in_hand: Arc<std::sync::atomic::AtomicUsize>,
    limit: usize,
}

/// One request in hand (see [`Backlog`]); dropping it lets the next one in.
#[derive(Debug)]
pub struct BacklogTicket(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for BacklogTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Backlog {
    /// A backlog admitting at most `limit` requests at once.
    pub fn new(limit: usize) -> Backlog {
        Backlog {
            in_hand: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            limit,
        }
    }

    /// A ticket for one more request, unless `limit` are in hand already.
    pub fn enter(&self) -> Option<BacklogTicket> {
        let mut now = self.in_hand.load(Ordering::Acquire);
        loop {
            if now >= self.limit {
                return None;
            }
            match self.in_hand.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(BacklogTicket(Arc::clone(&self.in_hand))),
                Err(seen) => now = seen,
            }
        }
    }

    /// How many requests are in hand.
    pub fn len(&self) -> usize {
        self.in_hand.load(Ordering::Acquire)
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything the relay's tasks share. Built once from the configuration.
pub struct Relay {
    /// The SIP endpoint (transports and transactions).
    pub endpoint: Endpoint,
    /// The realm, also the relay's SIP domain.
    pub realm: String,
    domains: HashSet<String>,
    locals: Vec<Arc<LocalAddr>>,
    /// Digest authentication.
    pub auth: Authenticator,
    credentials: HashMap<String, StoredCredential>,
    /// The configuration it was built from.
    pub config: Config,
    /// Terminal and application-server bindings.
    pub registrar: Registrar,
    /// The rules that decide service and client information.
    pub rules: RuleSet,
    /// The application servers and their health.
    pub directory: Directory,
    /// Billing control.
    pub billing: Arc<BillingControl>,
    /// Live sessions by Call-ID.
    pub sessions: SessionTable,
    /// Session timing limits.
    pub limits: SessionLimits,
    /// Which server serves which live session (for charge requests).
    pub served: ServedIndex,
    /// Counters.
    pub stats: RelayStats,
    /// New out-of-dialog requests in hand (see [`MAX_BACKLOG`]).
    pub backlog: Backlog,
}

impl CredentialStore for Relay {
    fn credential(&self, user: &str) -> Option<StoredCredential> {
        self.credentials.get(user).cloned()
    }
}

fn stored_credential(
    user: &str,
    realm: &str,
    secret: Secret<'_>,
    key: &str,
) -> anyhow::Result<StoredCredential> {
    match secret {
        Secret::Password(p) => Ok(StoredCredential::from_password(user, realm, p)),
        Secret::Ha1 { md5, sha256 } => StoredCredential::from_ha1(md5, sha256)
            .map_err(|e| anyhow::anyhow!("{key}: bad HA1 hash for {user}: {e}")),
    }
}

/// The second of the UTC day, for time-of-day rules.
fn utc_second_of_day() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs % 86_400).unwrap_or(0)
}

impl Relay {
    /// Builds the relay from a validated configuration: binds the sockets, opens the billing
    /// store, runs crash recovery, then starts dispatching what the sockets receive. Returns
    /// the relay and the billing writer (to shut down last).
    pub async fn start(config: Config) -> anyhow::Result<(Arc<Relay>, billing::writer::Writer)> {
        let late_charge_grace =
            Duration::from_secs(u64::from(config.billing.late_charge_grace_secs));
        let realm = config.relay.realm.clone();
        let endpoint_config = EndpointConfig {
            transport: TransportConfig {
                udp: config.listen.udp.clone(),
                tcp: config.listen.tcp.clone(),
                ..TransportConfig::default()
            },
            timers: sip_core::transaction::Timers {
                t1: Duration::from_millis(config.sip.t1_ms.max(1)),
                ..sip_core::transaction::Timers::default()
            },
            ..EndpointConfig::default()
        };
        let events = Arc::new(RelayEvents::new());
        let endpoint = Endpoint::bind_with_sink(endpoint_config, events.clone())
            .await
            .context("opening the SIP transports")?;
        let locals: Vec<Arc<LocalAddr>> = endpoint
            .transports()
            .local_addrs()
            .into_iter()
            .map(|(transport, addr)| Arc::new(LocalAddr::new(transport, addr)))
            .collect();
        let mut domains: HashSet<String> = HashSet::new();
        domains.insert(realm.to_ascii_lowercase());
        domains.extend(config.relay.domains.iter().map(|d| d.to_ascii_lowercase()));
        for l in &locals {
            domains.insert(l.addr.to_string());
            domains.insert(l.addr.ip().to_string());
        }

        let mut credentials = HashMap::new();
        for (i, user) in config.all_users().enumerate() {
            let c = stored_credential(&user.name, &realm, user.secret(), &format!("users[{i}]"))?;
            credentials.insert(user.name.clone(), c);
        }
        for (i, account) in config.server_accounts.iter().enumerate() {
            let c = stored_credential(
                &account.name,
                &realm,
                account.secret(),
                &format!("server_accounts[{i}]"),
            )?;
            credentials.insert(account.name.clone(), c);
        }
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        let auth = Authenticator::new(
            &realm,
            secret,
            Duration::from_secs(u64::from(config.auth.nonce_ttl_secs)),
            FailurePolicy {
                max_failures: config.auth.max_failures,
                lockout: Duration::from_secs(u64::from(config.auth.lockout_secs)),
            },
        )
        .with_algorithms(&config.auth.digest_algorithms().map_err(|name| {
            anyhow::anyhow!("auth.algorithms: unknown digest algorithm {name:?}")
        })?)
        .with_user_algorithms(config.digest_algorithms_by_user());
        let registrar = config.build_registrar();
        let directory = config
            .build_directory()
            .context("building the service directory")?;
        let rules = config.build_rules().map_err(|e| anyhow::anyhow!("{e}"))?;
        let tariffs = config.tariff_table().context("reading [[tariffs]]")?;
        let (billing, writer) = BillingControl::open(
            &config.storage.data_dir,
            tariffs,
            Duration::from_millis(u64::from(config.billing.commit_interval_ms)),
        )?;
        let recovered = billing.recover().await?;
        if !recovered.is_empty() {
            info!(
                count = recovered.len(),
                "closed sessions left open by the last run"
            );
        }
        let limits = SessionLimits {
            inquiry_timeout: Duration::from_millis(config.session.inquiry_timeout_ms),
            answer_timeout: Duration::from_secs(u64::from(config.session.answer_timeout_secs)),
            ack_timeout: Duration::from_millis(config.sip.t1_ms.max(1) * 64),
            probe_interval: Duration::from_secs(u64::from(config.session.probe_interval_secs)),
            fork_timeout: Duration::from_secs(u64::from(config.session.fork_timeout_secs)),
        };
        let relay = Arc::new(Relay {
            endpoint,
            realm,
            domains,
            locals,
            auth,
            credentials,
            config,
            registrar,
            rules,
            directory,
            billing: Arc::new(billing),
            sessions: SessionTable::default(),
            limits,
            served: ServedIndex::with_grace(late_charge_grace),
            stats: RelayStats::default(),
            backlog: Backlog::new(MAX_BACKLOG),
        });
        events.start(&relay);
        Ok((relay, writer))
    }

    /// Whether `service` is one the relay delivers: configured, or offered by a registered
    /// application server.
    pub fn knows_service(&self, service: &str) -> bool {
        self.config.service_names().contains(service)
            || self.directory.services().iter().any(|s| s == service)
    }

    /// The application-server account that speaks for the server at `uri`: the account that
    /// registered it, or the `account` of its `[[servers]]` entry.
    pub fn account_of(&self, uri: &str) -> Option<String> {
        for service in self.directory.services() {
            for server in self.directory.servers_of(&service) {
                if server.uri_text() == uri {
                    if let crate::directory::Origin::Dynamic { account } = server.origin() {
                        return Some(account.clone());
                    }
                }
            }
        }
        self.config
            .servers
            .iter()
            .find(|s| s.uri == uri)
            .and_then(|s| s.account.clone())
    }

    /// Whether `subscriber` may have `service`: the service must exist (else 404) and be
    /// subscribed to (else 403). The refusal comes as status and reason phrase.
    pub fn check_service(
        &self,
        subscriber: &str,
        service: &str,
    ) -> Result<(), (u16, &'static str)> {
        if !self.knows_service(service) {
            return Err((404, "Unknown service"));
        }
        if !self
            .config
            .user(subscriber)
            .is_some_and(|u| u.subscribes_to(service))
        {
            return Err((403, "Service not subscribed"));
        }
        Ok(())
    }

    /// Runs the rules again for a live session of `subscriber` asking, with in-dialog request
    /// `req`, for `service` and `params` (a change's `P-Preferred-Service`, a transfer's
    /// `Refer-To`), as if the subscriber had called that service: a rule that restricts or
    /// redirects a service (by plan, class, time, headers…) holds for a change or a transfer
    /// as it does for a new call. The decision's service must be known and subscribed.
    pub fn decide_again(
        &self,
        subscriber: &str,
        req: &Request,
        service: &str,
        params: &[(String, String)],
    ) -> Result<crate::rules::Decision, (u16, &'static str)> {
        let Some(user) = self.config.user(subscriber) else {
            return Err((403, "Not a subscriber"));
        };
        let mut text = format!("sip:{service}@{}", self.realm);
        b2bua::write_params(&mut text, params);
        let ruri = sip_core::uri::Uri::parse(&text).map_err(|_| (400, "Unreadable service"))?;
        let mut facts = facts(req, &ruri, &user.plan, &user.class, self.rules.needs());
        facts.method = Method::Invite.to_string();
        let decision = self.rules.evaluate(&facts, utc_second_of_day());
        if decision.service.is_empty() {
            return Err((404, "No service requested"));
        }
        self.check_service(subscriber, &decision.service)?;
        Ok(decision)
    }

    /// The servers to move a live session of `service` to, in the service's selection order
    /// (a fork strategy asks them one by one here): servers other than `current` first, then
    /// `current` itself when `current_last` (a transfer may come back to it as a last resort).
    pub fn candidates_away_from(
        &self,
        service: &str,
        current: &ServerRef,
        current_last: bool,
    ) -> std::collections::VecDeque<ServerRef> {
        let strategy = match self
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .map(|s| s.strategy)
        {
            Some(Strategy::All) | None => Strategy::First,
            Some(s) => s,
        };
        let all = self.directory.candidates(service, strategy, Instant::now());
        let (same, others): (Vec<ServerRef>, Vec<ServerRef>) = all
            .into_iter()
            .partition(|s| s.uri_text() == current.uri_text());
        let mut others: std::collections::VecDeque<ServerRef> = others.into();
        if current_last {
            others.extend(same);
        }
        others
    }

    /// The relay's address for talking to `peer`: one on the peer's transport and address
    /// family (its Via and Contact must be reachable from there: an IPv6 peer gets the
    /// relay's IPv6 address), else one on the transport, else the first.
    pub fn local(&self, peer: Peer) -> Arc<LocalAddr> {
        let transport = peer.transport;
        self.locals
            .iter()
            .find(|l| l.transport == transport && l.addr.is_ipv4() == peer.addr.is_ipv4())
            .or_else(|| self.locals.iter().find(|l| l.transport == transport))
            .or_else(|| self.locals.first())
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(LocalAddr::new(
                    transport,
                    SocketAddr::from(([127, 0, 0, 1], 5060)),
                ))
            })
    }

    /// Where to send requests for an application server (RFC 3263 for a name, the URI's own
    /// port and transport for an IP host).
    pub async fn resolve_server(&self, server: &ServerRef) -> Option<Peer> {
        let targets = resolve(server.uri(), &SystemDns).await.ok()?;
        // A target the relay can reach from an address of the same family first.
        let reachable = |t: &Target, same_family: bool| {
            self.locals.iter().any(|l| {
                l.transport == t.transport && (!same_family || l.addr.is_ipv4() == t.addr.is_ipv4())
            })
        };
        let t = targets
            .iter()
            .find(|t| reachable(t, true))
            .or_else(|| targets.iter().find(|t| reachable(t, false)))?;
        Some(Peer {
            transport: t.transport,
            addr: t.addr,
            conn: None,
        })
    }

    /// Whether a Request-URI names the relay itself: its domain or one of its addresses.
    ///
    /// The URI is read with sip-core's own parser (rsip cannot read `tel:` or IPv6
    /// references). A `tel:` URI (RFC 3966) names a number, which only the relay can route:
    /// it is always ours, and the rules pick its service.
    pub fn is_ours(&self, uri: &rsip::Uri) -> bool {
        sip_core::uri::Uri::from_rsip(uri).is_ok_and(|u| self.names_relay(&u))
    }

    /// [`Relay::is_ours`] for a URI already read with sip-core's parser.
    pub fn names_relay(&self, uri: &sip_core::uri::Uri) -> bool {
        if uri.scheme() == sip_core::uri::Scheme::Tel {
            return true;
        }
        let (Some(host), Some(hostport)) = (uri.host_text(), uri.host_port_text()) else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let hostport = hostport.to_ascii_lowercase();
        self.domains.contains(&host)
            || self.domains.contains(bare)
            || self.domains.contains(&hostport)
    }

    fn refuse(&self, r: &IncomingRequest, code: u16, reason: &str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        let _ = r.tx.respond(b2bua::local_response(
            &r.req,
            code,
            reason,
            Some(&message::new_tag()),
        ));
    }

    fn challenge(&self, r: &IncomingRequest, kind: ChallengeKind, stale: bool) {
        self.stats.challenged.fetch_add(1, Ordering::Relaxed);
        let mut resp = b2bua::local_response(
            &r.req,
            kind.status(),
            message::reason_phrase(kind.status()),
            Some(&message::new_tag()),
        );
        resp.headers
            .retain(|h| !matches!(h, Header::ContentLength(_)));
        resp.headers
            .extend(self.auth.challenge_headers_for(&r.req, kind, stale));
        message::set_content_length(&mut resp.headers, 0);
        let _ = r.tx.respond(resp);
    }

    /// Authenticates `r` (digest, RFC 3261 §22); answers it (challenge or refusal) and returns `None` unless the
    /// credentials are good.
    pub fn authenticate_request(&self, r: &IncomingRequest) -> Option<String> {
        let kind = ChallengeKind::for_method(&r.req.method);
        match self.auth.check(&r.req, kind, self, Instant::now()) {
            AuthOutcome::Authenticated(user) => Some(user),
            AuthOutcome::Challenge { stale, failure } => {
                if let Some(failure) = failure {
                    info!(method = %r.req.method, from = %r.from, failure, "authentication failed; challenging again");
                }
                if kind == ChallengeKind::Proxy {
                    // Some user agents only answer a 401 to an INVITE; 407 is still right for
                    // a proxy-like element (see shared/notes/real-clients.md).
                    debug!("sent 407; a client that never answers it may only handle 401");
                }
                self.challenge(r, kind, stale);
                None
            }
            AuthOutcome::Locked => {
                warn!(from = %r.from, "too many failed authentication attempts");
                self.refuse(r, 403, "Too many failed attempts");
                None
            }
            AuthOutcome::Malformed(reason) => {
                self.refuse(r, 400, &format!("Malformed credentials: {reason}"));
                None
            }
        }
    }
}

fn call_id(req: &Request) -> Option<String> {
    req.headers.iter().find_map(|h| match h {
        Header::CallId(c) => Some(c.value().trim().to_string()),
        _ => None,
    })
}

/// Hands the endpoint's events to the relay inline, from the task that received each
/// message (see [`EventSink`]): a request on a live call goes straight into that call's
/// inbox. Events that come before the relay is built (its billing recovery may take a
/// moment) wait in a bounded buffer and are dispatched when it is; new requests beyond the
/// buffer are answered 503.
pub struct RelayEvents {
    relay: OnceLock<Weak<Relay>>,
    early: Mutex<Option<Vec<EndpointEvent>>>,
}

/// How many events may wait for the relay to be built.
const EARLY_EVENTS: usize = 16 * 1024;

impl RelayEvents {
    fn new() -> Self {
        RelayEvents {
            relay: OnceLock::new(),
            early: Mutex::new(Some(Vec::new())),
        }
    }

    fn early(&self) -> std::sync::MutexGuard<'_, Option<Vec<EndpointEvent>>> {
        self.early.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts dispatching to `relay`, the events that waited first.
    fn start(&self, relay: &Arc<Relay>) {
        let _ = self.relay.set(Arc::downgrade(relay));
        let waiting = self.early().take().unwrap_or_default();
        for event in waiting {
            if let Err(EndpointEvent::Request(r)) = dispatch(relay, event) {
                relay
                    .endpoint
                    .stats()
                    .overloaded
                    .fetch_add(1, Ordering::Relaxed);
                r.refuse_overloaded();
            }
        }
    }
}

impl EventSink for RelayEvents {
    fn deliver(&self, event: EndpointEvent) -> Result<(), EndpointEvent> {
        if let Some(relay) = self.relay.get() {
            return match relay.upgrade() {
                Some(relay) => dispatch(&relay, event),
                None => Ok(()),
            };
        }
        let mut early = self.early();
        match early.as_mut() {
            Some(waiting) if waiting.len() < EARLY_EVENTS => {
                waiting.push(event);
                Ok(())
            }
            Some(_) => Err(event),
            None => {
                // Started between the look above and the lock.
                drop(early);
                match self.relay.get().and_then(Weak::upgrade) {
                    Some(relay) => dispatch(&relay, event),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Routes one event of the endpoint: requests and ACKs of live calls to their inbox, new
/// requests to admission or registration.
#[allow(clippy::result_large_err)]
fn dispatch(relay: &Arc<Relay>, event: EndpointEvent) -> Result<(), EndpointEvent> {
    match event {
        EndpointEvent::Request(r) => {
            let Some(cid) = call_id(&r.req) else {
                return Ok(());
            };
            if r.req.method != Method::Register {
                if let Some(inbox) = relay.sessions.get(&cid) {
                    let _ = inbox.send(SessionInput::Request(r));
                    return Ok(());
                }
            }
            return out_of_dialog(relay, r, cid).map_err(EndpointEvent::Request);
        }
        EndpointEvent::Cancel {
            req,
            from: _,
            tx,
            invite,
        } => {
            let Some(cid) = call_id(&req) else {
                return Ok(());
            };
            if let Err(SessionInput::Cancel { req, tx, invite }) = relay
                .sessions
                .deliver(&cid, SessionInput::Cancel { req, tx, invite })
            {
                // Admission still running or already refused: end the INVITE here.
                let _ = tx.respond(b2bua::local_response(&req, 200, "OK", None));
                let _ = invite.respond(
                    b2bua::local_response(
                        &req,
                        487,
                        "Request Terminated",
                        Some(&message::new_tag()),
                    )
                    .with_cseq_method(Method::Invite),
                );
            }
        }
        EndpointEvent::Ack { ack, from: _ } => {
            if let Some(cid) = call_id(&ack) {
                let _ = relay.sessions.deliver(&cid, SessionInput::Ack(ack));
            }
        }
        EndpointEvent::StrayResponse { resp, from: _ } => {
            let cid = resp.headers.iter().find_map(|h| match h {
                Header::CallId(c) => Some(c.value().trim().to_string()),
                _ => None,
            });
            if let Some(cid) = cid {
                let _ = relay.sessions.deliver(&cid, SessionInput::Stray(resp));
            }
        }
        EndpointEvent::AckTimeout { tx } => {
            debug!(?tx, "a 2xx was never acknowledged");
        }
    }
    Ok(())
}

/// Handles a request outside any live call: REGISTER, a new INVITE and an out-of-dialog
/// MESSAGE go to a task of their own, unless [`MAX_BACKLOG`] are in hand already: then the
/// request comes back, for the endpoint to answer 503.
#[allow(clippy::result_large_err)]
fn out_of_dialog(
    relay: &Arc<Relay>,
    r: IncomingRequest,
    cid: String,
) -> Result<(), IncomingRequest> {
    let span = info_span!("request", call_id = %cid, method = %r.req.method);
    // RFC 3261 §8.2.2.3 / §16.3 step 5: after method inspection (the 405s below), before
    // authentication (see `extensions`).
    if !matches!(r.req.method, Method::Subscribe | Method::Publish) {
        if let Some(resp) = extensions::check(&r.req, &message::new_tag()) {
            relay.stats.refused.fetch_add(1, Ordering::Relaxed);
            debug!(parent: &span, method = %r.req.method, from = %r.from, "420: requires an unsupported extension");
            let _ = r.tx.respond(resp);
            return Ok(());
        }
    }
    match r.req.method {
        Method::Register => {
            let Some(ticket) = relay.backlog.enter() else {
                return Err(r);
            };
            let relay = relay.clone();
            tokio::spawn(
                async move {
                    let _ticket = ticket;
                    register(&relay, r)
                }
                .instrument(span),
            );
        }
        Method::Invite if !session::has_to_tag(&r.req) => {
            let Some(ticket) = relay.backlog.enter() else {
                return Err(r);
            };
            let relay = relay.clone();
            tokio::spawn(
                async move {
                    let _ticket = ticket;
                    admit(relay, r)
                }
                .instrument(span),
            );
        }
        Method::Options if !session::has_to_tag(&r.req) => {
            let mut resp = b2bua::local_response(&r.req, 200, "OK", Some(&message::new_tag()));
            resp.headers.push(Header::Allow(rsip::headers::Allow::new(
                "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, REFER, NOTIFY, INFO",
            )));
            resp.headers.push(Header::Accept(rsip::headers::Accept::new(
                "application/sdp, application/vnd.relay.charge+json",
            )));
            let _ = r.tx.respond(resp);
        }
        Method::Message if !session::has_to_tag(&r.req) => {
            let Some(ticket) = relay.backlog.enter() else {
                return Err(r);
            };
            let relay = relay.clone();
            tokio::spawn(
                async move {
                    let _ticket = ticket;
                    charge::handle(relay, r).await
                }
                .instrument(span),
            );
        }
        Method::Ack => {}
        Method::Subscribe | Method::Publish => {
            let mut resp =
                b2bua::local_response(&r.req, 405, "Method Not Allowed", Some(&message::new_tag()));
            resp.headers.push(Header::Allow(rsip::headers::Allow::new(
                "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, REFER, NOTIFY, INFO",
            )));
            let _ = r.tx.respond(resp);
        }
        _ => relay.refuse(&r, 481, "Call/Transaction Does Not Exist"),
    }
    Ok(())
}

/// REGISTER (RFC 3261 §10.3): authenticate (401), check the address of record is the
/// user's own, update the bindings; for an application-server account, the directory too.
fn register(relay: &Relay, r: IncomingRequest) {
    if !relay.is_ours(&r.req.uri) {
        relay.refuse(&r, 404, "Domain not served here");
        return;
    }
    // §10.3: the address of record is the To's SIP or SIPS URI; RFC 4475 §3.3.4 has a
    // registrar answer 400 to any other, before anything else is asked of the request.
    let aor = match sip_core::address::to_header(&r.req.headers) {
        Ok(Some(to)) if to.uri().is_sip() => to,
        _ => {
            relay.refuse(&r, 400, "Address of record must be a SIP or SIPS URI");
            return;
        }
    };
    let Some(user) = relay.authenticate_request(&r) else {
        return;
    };
    if aor.uri().user() != Some(user.as_str()) {
        relay.refuse(&r, 403, "Cannot register another user");
        return;
    }
    let account = relay.config.server_account(&user);
    let role = match account {
        Some(a) => Role::AppServer {
            allowed_services: a.allowed_services(),
        },
        None if relay.config.user(&user).is_some() => Role::Subscriber,
        None => {
            relay.refuse(&r, 403, "Unknown account");
            return;
        }
    };
    let now = Instant::now();
    let outcome = RegisterRequest::from_sip(&r.req, Some(r.from))
        .and_then(|rr| relay.registrar.register(&user, role, &rr, now));
    match outcome {
        Ok(ok) => {
            if account.is_some() {
                for gone in &ok.removed {
                    relay.directory.remove_dynamic(&user, &gone.uri_text);
                }
                let servers: Vec<_> = ok
                    .bindings
                    .iter()
                    .filter_map(|b| b.dynamic_server())
                    .collect();
                let (_, errors) = relay.directory.sync_account(&user, &servers);
                for e in errors {
                    warn!(account = %user, error = %e, "application server not added to the directory");
                }
            }
            info!(user = %user, bindings = ok.bindings.len(), "registered");
            let mut resp = b2bua::local_response(&r.req, 200, "OK", Some(&message::new_tag()));
            resp.headers
                .retain(|h| !matches!(h, Header::ContentLength(_)));
            resp.headers.extend(ok.contact_headers(now));
            message::set_content_length(&mut resp.headers, 0);
            let _ = r.tx.respond(resp);
        }
        Err(e) => {
            info!(user = %user, error = %e, "registration refused");
            let mut resp = b2bua::local_response(
                &r.req,
                e.status_code(),
                &e.reason(),
                Some(&message::new_tag()),
            );
            if let Some(h) = e.extra_header() {
                resp.headers.push(h);
            }
            relay.stats.refused.fetch_add(1, Ordering::Relaxed);
            let _ = r.tx.respond(resp);
        }
    }
}

/// The facts of a request that the rules look at.
///
/// The Request-URI is read with sip-core's own parser: its user is the service asked for,
/// or for a `tel:` URI (RFC 3966) the number, in its global form without visual separators
/// (`tel:+1-555-1234` reads `+15551234`), so that rules can match numbers.
fn facts(
    req: &Request,
    ruri: &sip_core::uri::Uri,
    plan: &str,
    class: &str,
    needs: FactNeeds,
) -> RequestFacts {
    let ruri_params = ruri
        .params()
        .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
        .collect();
    let ruri_user = match ruri.scheme() {
        sip_core::uri::Scheme::Tel => ruri.tel_number().unwrap_or_default(),
        _ => ruri.user().unwrap_or_default().to_string(),
    };
    let from_user = if needs.from_user {
        req.headers
            .iter()
            .find_map(|h| match h {
                Header::From(f) => sip_core::address::FromTo::parse(f.value())
                    .ok()
                    .and_then(|t| t.uri().user().map(str::to_string)),
                _ => None,
            })
            .unwrap_or_default()
    } else {
        String::new()
    };
    let headers = if needs.headers {
        req.headers
            .iter()
            .map(|h| {
                let text = h.to_string();
                match text.split_once(':') {
                    Some((n, v)) => (n.trim().to_string(), v.trim().to_string()),
                    None => (text, String::new()),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let preferred_service =
        b2bua::other_header(&req.headers, "P-Preferred-Service").map(|s| s.trim().to_string());
    RequestFacts {
        method: req.method.to_string(),
        ruri_user,
        ruri_params,
        from_user,
        headers,
        sdp: if needs.sdp {
            String::from_utf8_lossy(&req.body).into_owned()
        } else {
            String::new()
        },
        preferred_service,
        plan: plan.to_string(),
        class: class.to_string(),
    }
}

/// Admission of a new INVITE (claim 1's authentication, claim 2's rules): authenticate
/// (407), then registered, then service known and subscribed; then the session starts.
fn admit(relay: Arc<Relay>, r: IncomingRequest) {
    // Read once: for the domain here and for the rules' facts below.
    let ruri = match sip_core::uri::Uri::from_rsip(&r.req.uri) {
        Ok(u) if relay.names_relay(&u) => u,
        _ => {
            relay.refuse(&r, 403, "Not relaying");
            return;
        }
    };
    if message::check_max_forwards(&r.req).is_err() {
        relay.refuse(&r, 483, "Too Many Hops");
        return;
    }
    if let Some(refusal) = content::check_invite(&r.req) {
        let (code, reason) = refusal.status();
        let mut resp = b2bua::local_response(&r.req, code, reason, Some(&message::new_tag()));
        if refusal == content::Refusal::UnsupportedMediaType {
            resp.headers
                .push(Header::Accept(rsip::headers::Accept::new(content::SDP)));
        }
        relay.stats.refused.fetch_add(1, Ordering::Relaxed);
        let _ = r.tx.respond(resp);
        return;
    }
    let Some(user) = relay.authenticate_request(&r) else {
        return;
    };
    let Some(subscriber) = relay.config.user(&user) else {
        relay.refuse(&r, 403, "Not a subscriber");
        return;
    };
    if !relay.registrar.is_registered(&user, Instant::now()) {
        relay.refuse(&r, 403, "Not registered");
        return;
    }
    let decision = relay.rules.evaluate(
        &facts(
            &r.req,
            &ruri,
            &subscriber.plan,
            &subscriber.class,
            relay.rules.needs(),
        ),
        utc_second_of_day(),
    );
    if decision.service.is_empty() {
        relay.refuse(&r, 404, "No service requested");
        return;
    }
    if let Err((code, reason)) = relay.check_service(&user, &decision.service) {
        relay.refuse(&r, code, reason);
        return;
    }
    relay.stats.admitted.fetch_add(1, Ordering::Relaxed);
    info!(subscriber = %user, service = %decision.service, rule = %decision.rule_name, "admitted");
    let adm = Admission {
        subscriber: user,
        service: decision.service,
        strategy: decision.strategy,
        params: decision.params.into_iter().collect(),
        plan: decision.plan,
        rule: decision.rule_name,
    };
    session::spawn(relay, r, adm);
}

/// Sets the method of a response's CSeq (a 487 for an INVITE built from its CANCEL).
trait WithCseqMethod {
    fn with_cseq_method(self, method: Method) -> Self;
}

impl WithCseqMethod for rsip::Response {
    fn with_cseq_method(mut self, method: Method) -> Self {
        for h in self.headers.iter_mut() {
            if let Header::CSeq(c) = h {
                if let Some((seq, _)) = sip_core::fields::cseq(c.value()) {
                    *h = Header::CSeq(rsip::headers::CSeq::new(format!("{seq} {method}")));
                }
            }
        }
        self
    }
}

#[cfg(test)]
mod backlog_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_backlog_admits_up_to_its_limit_and_lets_one_in_per_ticket_dropped() {
        let backlog = Backlog::new(3);
        let mut tickets: Vec<_> = (0..3).map(|_| backlog.enter().unwrap()).collect();
        assert_eq!(backlog.len(), 3);
        assert!(backlog.enter().is_none(), "a fourth is refused");
        tickets.pop();
        let again = backlog.enter();
        assert!(again.is_some(), "a dropped ticket lets the next one in");
        assert!(backlog.enter().is_none());
        drop(again);
        assert_eq!(backlog.len(), 2);
    }

    #[test]
    fn tickets_taken_and_dropped_on_many_threads_add_up() {
        let backlog = Arc::new(Backlog::new(usize::MAX));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let backlog = Arc::clone(&backlog);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let t = backlog.enter().unwrap();
                        drop(t);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(backlog.is_empty());
    }
}

#[cfg(test)]
mod facts_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::rules::{FactNeeds, RequestFacts, RuleConfig, RuleSet};

    fn request(uri: &str) -> Request {
        let text = format!(
            "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKf\r\n\
             From: <sip:alice@relay.test>;tag=a\r\nTo: <{uri}>\r\nCall-ID: f\r\n\
             CSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        match sip_core::wire::parse(text.as_bytes()).unwrap() {
            rsip::SipMessage::Request(r) => r,
            rsip::SipMessage::Response(_) => unreachable!(),
        }
    }

    /// The rules' facts of an INVITE to `uri`, read as `admit` reads them.
    fn facts_of(uri: &str) -> RequestFacts {
        let req = request(uri);
        let ruri = sip_core::uri::Uri::from_rsip(&req.uri).unwrap();
        facts(&req, &ruri, "basic", "standard", FactNeeds::default())
    }

    #[test]
    fn a_tel_number_reaches_the_rules_and_picks_a_service() {
        #[derive(serde::Deserialize)]
        struct Rules {
            rules: Vec<RuleConfig>,
        }
        let rules: Rules = toml::from_str(
            "[[rules]]\nname = \"numbers\"\nmatch = { ruri_user = '^\\+1555' }\n\
             set = { service = \"echo\" }\n[[rules]]\nname = \"default\"\ndefault = true\n",
        )
        .unwrap();
        let set = RuleSet::compile(&rules.rules).unwrap();
        for uri in [
            "tel:+1-555-123-4567;phone-context=example.com",
            "sip:+15551234567@relay.test;user=phone",
        ] {
            let got = facts_of(uri);
            assert_eq!(got.ruri_user, "+15551234567", "{uri}");
            let decision = set.evaluate(&got, 0);
            assert_eq!(decision.rule_name, "numbers", "{uri}");
            assert_eq!(decision.service, "echo", "{uri}");
        }
        let got = facts_of("tel:+4930123456");
        assert_eq!(got.ruri_user, "+4930123456");
        assert_eq!(set.evaluate(&got, 0).rule_name, "default");
        // tel parameters are the URI's parameters.
        let got = facts_of("tel:+15551234;phone-context=example.com");
        assert_eq!(
            got.ruri_params,
            vec![("phone-context".to_string(), Some("example.com".to_string()))]
        );
    }
}
