//! The running relay: the shared context every task reads, built from the configuration —
//! the endpoint, the registrar, the rules, the directory, billing, the routing table — and
//! what a call asks of it ([`CallEnv`], [`Relaying`]). The endpoint's events are taken by
//! [`crate::dispatch`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rand::RngCore;
use rsip::prelude::*;
use rsip::{Header, Method, Request};
use sip_core::digest::StoredCredential;
use sip_core::endpoint::{Endpoint, EndpointConfig, EventSink, IncomingRequest};
use sip_core::resolve::{resolve, SystemDns, Target};
use sip_core::transaction::ServerDeadlines;
use sip_core::transport::TransportConfig;
use sip_core::{message, Peer, Transport};
use tracing::{debug, info, warn};

use crate::auth::{AuthOutcome, Authenticator, ChallengeKind, CredentialStore, SharedFailure};
use crate::b2bua::{self, LocalAddr};
use crate::billing_control::BillingControl;
use crate::call::driver::routing::SessionTable;
use crate::call::{CallEnv, Redecision, SessionLimits};
use crate::cluster::listen::SharedState;
use crate::cluster::Cluster;
use crate::config::{Config, StorageBackendKind};
use crate::directory::{Directory, HealthChange, ServerRef, Strategy};
use crate::private_files;
use crate::registrar::{Binding, Registrar};
use crate::rules::{FactNeeds, RequestFacts};
use crate::served::{ServedIndex, ServedSession};
use crate::settings::Settings;
use crate::subscriber_sessions::SubscriberSessions;

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
    /// The configuration it started with: for the keys a reload does not change (listen
    /// addresses, TLS, storage, the admin listener, the realm). Users, services, servers,
    /// rules, tariffs and limits are read from [`Relay::settings`].
    pub config: Config,
    /// What a reload replaces (see [`crate::reload`]).
    settings: RwLock<Arc<Settings>>,
    /// Terminal and application-server bindings.
    pub registrar: Registrar,
    /// Held while an application-server account's REGISTER updates the registrar and then
    /// the directory from the bindings it left: two such REGISTERs at once (two agents of
    /// one account starting together) otherwise let the one whose update came first sync
    /// last, from bindings without the other's, and take the other's server out.
    pub server_registration: std::sync::Mutex<()>,
    /// The application servers and their health.
    pub directory: Directory,
    /// Billing control.
    pub billing: Arc<BillingControl>,
    /// Live sessions by Call-ID.
    pub sessions: SessionTable,
    /// Which server serves which live session (for charge requests).
    pub served: ServedIndex,
    /// Counters.
    pub stats: RelayStats,
    /// New out-of-dialog requests in hand (see [`MAX_BACKLOG`]).
    pub backlog: Backlog,
    /// How many sessions each subscriber holds, against its class's limit.
    pub subscriber_sessions: SubscriberSessions,
    /// The state shared with other relays on PostgreSQL (`[storage] backend = "postgres"`);
    /// `None` with SQLite, which connects to no database.
    pub cluster: Option<Cluster>,
    /// The ring of recent messages and decisions (`[trace]`); `None` when it is off.
    pub trace: Option<Arc<crate::trace::Trace>>,
}

impl SharedState for Relay {
    fn apply_bindings(&self, user: &str, bindings: Vec<Binding>) {
        let servers: Vec<_> = bindings
            .iter()
            .filter_map(Binding::dynamic_server)
            .collect();
        self.registrar.replace_user(user, bindings, Instant::now());
        if self.settings().config.server_account(user).is_some() {
            let (_, errors) = self.directory.sync_account(user, &servers);
            for e in errors {
                tracing::warn!(account = user, error = %e, "application server from another relay not added");
            }
        }
    }

    fn apply_health(&self, uri: &str, change: HealthChange) {
        self.directory.apply_health(uri, change);
    }

    fn apply_auth_failure(&self, failure: SharedFailure) {
        self.auth.count_shared_failure(&failure, Instant::now());
    }
}

impl CredentialStore for Relay {
    fn credential(&self, user: &str) -> Option<StoredCredential> {
        self.settings().credential(user)
    }

    fn names_relay(&self, uri: &sip_core::uri::Uri) -> bool {
        Relay::names_relay(self, uri)
    }
}

/// The second of the UTC day, for time-of-day rules.
/// The second of the UTC day now, for the rules' time conditions.
pub(crate) fn utc_second_of_day() -> u32 {
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
    pub async fn start(
        config: Config,
        events: Arc<dyn EventSink>,
    ) -> anyhow::Result<(Arc<Relay>, billing::writer::Writer)> {
        let realm = config.relay.realm.clone();
        // `[tls]`: checked by validate already; an error here names the key and file too.
        let tls_setup = config.tls.load(&config.base_dir()).map_err(|problems| {
            let text: Vec<String> = problems
                .iter()
                .map(|(key, message)| format!("key `{key}`: {message}"))
                .collect();
            anyhow::anyhow!("{}: {}", config.file_name().display(), text.join("; "))
        })?;
        let mut udp_tcp = config.listen.udp.clone();
        udp_tcp.extend(config.listen.tcp.iter().copied());
        let endpoint_config = EndpointConfig {
            transport: config.limits.transport(TransportConfig {
                udp: config.listen.udp.clone(),
                tcp: config.listen.tcp.clone(),
                tls: config.tls.listen_addrs(&udp_tcp),
                tls_setup,
                ..TransportConfig::default()
            }),
            rate_limit: config.limits.rate_limit(),
            timers: sip_core::transaction::Timers {
                t1: config.sip.t1(),
                ..sip_core::transaction::Timers::default()
            },
            server_deadlines: invite_deadline(&config.session),
            // A call matches a server's later 2xx to its session's dialog and ACKs it again
            // (Input::Stray): its INVITE transaction need not stay 64·T1 in Accepted.
            after_2xx: sip_core::transaction::After2xx::Terminate,
            ..EndpointConfig::default()
        };
        let endpoint = Endpoint::bind_with_sink(endpoint_config, events)
            .await
            .context("opening the SIP transports")?;
        let trace = crate::trace::Trace::from_config(&config.trace);
        if let Some(trace) = &trace {
            endpoint.transports().set_tap(trace.clone());
        }
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

        let settings = Settings::build(config.clone(), &realm)?;
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        let auth = Authenticator::new(
            &realm,
            secret,
            Duration::from_secs(u64::from(config.auth.nonce_ttl_secs)),
            config.auth.failure_policy(),
        )
        .with_uri_check(config.auth.digest_uri_check().unwrap_or_default())
        .with_algorithms(&config.auth.digest_algorithms().map_err(|name| {
            anyhow::anyhow!("auth.algorithms: unknown digest algorithm {name:?}")
        })?)
        .with_user_algorithms(config.digest_algorithms_by_user());
        let registrar = config.build_registrar();
        let directory = config
            .build_directory()
            .context("building the service directory")?;
        let tariffs = config.tariff_table().context("reading [[tariffs]]")?;
        // The SQLite store is created 0600 before SQLite opens it (its -wal and -shm then
        // get the same mode), in a data directory created 0700 (issue 14, finding 11). On
        // PostgreSQL there is no file.
        if config.storage.backend == crate::config::StorageBackendKind::Sqlite {
            let data_dir = &config.storage.data_dir;
            private_files::create_private_dir(data_dir)
                .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
            let store = data_dir.join("billing.db");
            let narrowed =
                private_files::prepare_private_file(&store, &["billing.db-wal", "billing.db-shm"])
                    .with_context(|| format!("preparing the billing store {}", store.display()))?;
            for file in narrowed {
                info!(file = %file.display(), "billing store file was readable by others; no longer");
            }
        }
        let (billing, writer) = BillingControl::open(
            &config.storage.billing_backend(),
            config.storage.billing_node(),
            &config.file_name(),
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
        let cluster = match config.storage.backend {
            StorageBackendKind::Sqlite => None,
            StorageBackendKind::Postgres => Some(
                Cluster::connect(&config.storage.url, &config.storage.node)
                    .await
                    .context("connecting to the shared state ([storage] url)")?,
            ),
        };
        let (cluster, listener) = cluster.unzip();
        if let Some(cluster) = &cluster {
            auth.set_failure_sink(Arc::new(cluster.clone()));
        }
        let relay = Arc::new(Relay {
            endpoint,
            realm,
            domains,
            locals,
            auth,
            config,
            settings: RwLock::new(Arc::new(settings)),
            registrar,
            server_registration: std::sync::Mutex::new(()),
            directory,
            billing: Arc::new(billing),
            sessions: SessionTable::default(),
            served: ServedIndex::default(),
            stats: RelayStats::default(),
            backlog: Backlog::new(MAX_BACKLOG),
            subscriber_sessions: SubscriberSessions::new(),
            cluster,
            trace,
        });
        if let Some(listener) = listener {
            listener
                .load(&*relay)
                .await
                .context("loading the shared state")?;
            tokio::spawn(listener.run(relay.clone()));
        }
        Ok((relay, writer))
    }

    /// The reloadable settings in force: a request takes them once and keeps them.
    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts `settings` in force for every request from now on (a reload); requests under
    /// way keep the ones they took.
    pub fn replace_settings(&self, settings: Settings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
    }

    /// Whether `service` is one the relay delivers: configured, or offered by a registered
    /// application server.
    pub fn knows_service(&self, service: &str) -> bool {
        self.settings().config.service_names().contains(service)
            || self.directory.services().iter().any(|s| s == service)
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
            .settings()
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
    ) -> Result<Redecision, (u16, &'static str)> {
        let settings = self.settings();
        let Some(user) = settings.config.user(subscriber) else {
            return Err((403, "Not a subscriber"));
        };
        let mut text = format!("sip:{service}@{}", self.realm);
        b2bua::write_params(&mut text, params);
        let ruri = sip_core::uri::Uri::parse(&text).map_err(|_| (400, "Unreadable service"))?;
        let mut facts = facts(req, &ruri, &user.plan, &user.class, settings.rules.needs());
        facts.method = Method::Invite.to_string();
        let decision = settings.rules.evaluate(&facts, utc_second_of_day());
        if decision.service.is_empty() {
            return Err((404, "No service requested"));
        }
        self.check_service(subscriber, &decision.service)?;
        Ok(Redecision {
            service: decision.service,
            params: decision.params.into_iter().collect(),
            plan: decision.plan,
        })
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
            .settings()
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

    /// Whether a request of an application-server account from `from` may be taken: always,
    /// unless `[tls] servers_need_certificate` asks that it came over a TLS connection whose
    /// peer presented a certificate chained to `[tls] ca` (mutual TLS, RFC 5922 §7.2; the
    /// handshake verified the chain). A server password alone then registers no server and
    /// charges no subscriber.
    pub fn server_peer_certified(&self, from: Peer) -> bool {
        if !self.config.tls.servers_need_certificate() {
            return true;
        }
        from.transport == Transport::Tls
            && from
                .conn
                .and_then(|conn| self.endpoint.transports().peer_certificate(conn))
                .is_some()
    }

    /// Where to send requests for an application server (RFC 3263 for a name, the URI's own
    /// port and transport for an IP host).
    pub async fn resolve_server(&self, server: &ServerRef) -> Option<Peer> {
        let targets = resolve(server.uri(), &SystemDns).await.ok()?;
        self.reachable_target(&targets)
    }

    /// [`Relay::resolve_server`] when that needs no DNS lookup (an IP host): `Some` with the
    /// answer, `None` for a name.
    pub fn resolve_server_now(&self, server: &ServerRef) -> Option<Option<Peer>> {
        let targets = sip_core::resolve::resolve_literal(server.uri())?;
        Some(targets.ok().and_then(|t| self.reachable_target(&t)))
    }

    /// The first target the relay can reach: from an address of the same family first.
    fn reachable_target(&self, targets: &[Target]) -> Option<Peer> {
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

    /// Answers `r` with a refusal of the relay's own (counted).
    pub(crate) fn refuse(&self, r: &IncomingRequest, code: u16, reason: &str) {
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
            Some(&r.stateless_tag()),
        );
        resp.headers
            .retain(|h| !matches!(h, Header::ContentLength(_)));
        resp.headers
            .extend(self.auth.challenge_headers_for(&r.req, kind, stale));
        message::set_content_length(&mut resp.headers, 0);
        // Statelessly (RFC 3261 §8.2.7): a request not yet authenticated leaves no
        // transaction behind for 32 s — a stranger's flood costs nothing kept, and every
        // call that registers first no longer holds its 401 meanwhile. A retransmission is
        // challenged again; the ACK of a 407 matches nothing and is dropped.
        r.tx.respond_stateless(resp);
    }

    /// Authenticates `r` (digest, RFC 3261 §22); answers it (challenge or refusal) and returns `None` unless the
    /// credentials are good.
    pub fn authenticate_request(&self, r: &IncomingRequest) -> Option<String> {
        let kind = ChallengeKind::for_method(&r.req.method);
        match self.auth.check(&r.req, kind, self, &r.from, Instant::now()) {
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
            AuthOutcome::SourceRefused { retry_after } => {
                // 503 + Retry-After, not 403: the refusal is temporary (RFC 3261 §21.5.4,
                // §21.4.4); see crate::auth.
                let secs = retry_after.as_secs().max(1);
                debug!(from = %r.from, retry_after_secs = secs, "source refused: too many failed authentication attempts");
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                let mut resp = b2bua::local_response(
                    &r.req,
                    503,
                    "Too many failed attempts",
                    Some(&r.stateless_tag()),
                );
                resp.headers
                    .push(Header::RetryAfter(rsip::headers::RetryAfter::new(
                        secs.to_string(),
                    )));
                // Statelessly, as a challenge: a refused source keeps nothing here.
                r.tx.respond_stateless(resp);
                None
            }
            AuthOutcome::Malformed(reason) => {
                self.refuse(r, 400, &format!("Malformed credentials: {reason}"));
                None
            }
            AuthOutcome::UriMismatch { uri } => {
                // RFC 7616 §3.4.6 / RFC 2617 §3.2.2.5: 400, and worth a log line, since it
                // may be an attack (crate::auth says why not a new challenge).
                warn!(from = %r.from, request_uri = %r.req.uri, digest_uri = %uri, "digest uri does not match the Request-URI");
                self.refuse(r, 400, "Digest uri does not match the Request-URI");
                None
            }
        }
    }
}

impl CallEnv for Relay {
    fn limits(&self) -> SessionLimits {
        self.settings().limits
    }

    fn realm(&self) -> &str {
        &self.realm
    }

    fn local(&self, peer: Peer) -> Arc<LocalAddr> {
        Relay::local(self, peer)
    }

    fn candidates(&self, service: &str, strategy: Strategy) -> Vec<ServerRef> {
        self.directory.candidates(service, strategy, Instant::now())
    }

    fn candidates_away_from(
        &self,
        service: &str,
        current: &ServerRef,
        current_last: bool,
    ) -> std::collections::VecDeque<ServerRef> {
        Relay::candidates_away_from(self, service, current, current_last)
    }

    fn serves(&self, server: &ServerRef, service: &str) -> bool {
        self.directory
            .servers_of(service)
            .iter()
            .any(|s| s.uri_text() == server.uri_text())
    }

    fn decide_again(
        &self,
        subscriber: &str,
        req: &Request,
        service: &str,
        params: &[(String, String)],
    ) -> Result<Redecision, (u16, &'static str)> {
        Relay::decide_again(self, subscriber, req, service, params)
    }

    fn names_relay(&self, uri: &sip_core::uri::Uri) -> bool {
        Relay::names_relay(self, uri)
    }

    fn session_started(&self, server: &ServerRef) {
        self.directory.session_started(server);
    }

    fn session_ended(&self, server: &ServerRef) {
        self.directory.session_ended(server);
    }

    fn take_session_slot(&self, subscriber: &str, limit: u32) -> bool {
        // Only further answers of a forked request ask here (admission takes the first).
        let taken = self.subscriber_sessions.try_take(subscriber, limit);
        if !taken {
            self.subscriber_sessions.count_fork_answer_dropped();
        }
        taken
    }

    fn give_back_session_slot(&self, subscriber: &str) {
        self.subscriber_sessions.give_back(subscriber);
    }

    fn index(&self, served: ServedSession) {
        self.served.insert(served);
    }

    fn unindex(&self, session_id: &str) {
        self.served.remove(session_id);
    }
}

/// The facts of a request that the rules look at.
///
/// The Request-URI is read with sip-core's own parser: its user is the service asked for,
/// or for a `tel:` URI (RFC 3966) the number, in its global form without visual separators
/// (`tel:+1-555-1234` reads `+15551234`), so that rules can match numbers.
pub(crate) fn facts(
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

/// How long an INVITE may wait for the relay's final response before the transaction layer
/// answers 408 itself: the layer's default (180 s from the request or, within a tenth of
/// it, the last provisional the relay passed on), or longer when `[session]
/// answer_timeout_secs` lets a server ring longer than nine tenths of that without a
/// provisional in between.
fn invite_deadline(session: &crate::config::SessionConfig) -> ServerDeadlines {
    let defaults = ServerDeadlines::default();
    let ringing = Duration::from_secs(u64::from(session.answer_timeout_secs))
        + Duration::from_millis(session.inquiry_timeout_ms)
        + Duration::from_secs(30);
    ServerDeadlines {
        invite: defaults.invite.max(ringing * 10 / 9),
        ..defaults
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
mod deadline_tests {
    use super::*;

    #[test]
    fn the_invite_deadline_outlasts_the_longest_ring() {
        let mut session = crate::config::SessionConfig::default();
        assert_eq!(invite_deadline(&session), ServerDeadlines::default());
        session.answer_timeout_secs = 600;
        let d = invite_deadline(&session);
        // 600 s of ringing, 4 s of inquiry, 30 s to spare, within the tenth the layer may
        // count from an earlier provisional.
        assert!(d.invite.mul_f64(0.9) >= Duration::from_secs(634), "{d:?}");
        assert!(d.invite <= Duration::from_secs(705), "{d:?}");
        assert_eq!(d.non_invite, None, "64·T1, the client's Timer F");
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
