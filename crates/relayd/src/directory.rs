//! The service directory: which application servers deliver which service, whether they are
//! answering, and in which order the session layer should try them.
//!
//! Servers come from two places: static entries of the configuration (`[[servers]]`) and
//! servers registered dynamically by application-server accounts, whose REGISTER lists the
//! services as Contact parameters (see [`crate::registrar`] for the syntax). Health is kept by
//! periodic `OPTIONS` probes that the session layer sends: [`Directory::probe_due`] says whom
//! to probe, [`Directory::probe_result`] takes the answer. A server that misses
//! `failure_threshold` probes in a row is taken out; `recovery_threshold` answers in a row put
//! it back. Any final response is an answer (a server refusing OPTIONS with 404 or 501 is
//! alive); only silence or a transport failure is a miss. A static server configured with
//! `probe = false` ([`Directory::add_static_with_probe`]) is never probed and never taken out.
//!
//! The directory is sans-IO like the rest of the cores: it takes the current time as a
//! parameter and never sends anything itself.
//!
//! # Concurrency
//!
//! The session layer calls [`Directory::candidates`] from many tasks at once, and changes
//! (registrations, expiry) are rare next to lookups. So the directory is one read-mostly
//! [`RwLock`] over the service index, and everything that changes on the hot path lives in
//! the shared [`Server`] entries as atomics: the number of active sessions, the up/down flag,
//! the capacity, and each service's round-robin counter (an [`AtomicUsize`]). A lookup takes
//! the read lock only; starting or ending a session takes no lock at all. Probe bookkeeping
//! sits in a small per-server [`Mutex`] that only the prober touches.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sip_core::uri::{Scheme, Uri};

/// How the candidates for a service are ordered: the first is tried first, the others are
/// failover candidates in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Configuration order: static servers in file order, then dynamic ones in order of
    /// registration.
    #[default]
    First,
    /// Rotates the starting point by one on every lookup of the service.
    RoundRobin,
    /// The server with the fewest active sessions first (ties keep configuration order).
    LeastSessions,
    /// Every healthy candidate, in configuration order: the session layer inquires of all of
    /// them in parallel (forking).
    All,
}

impl Strategy {
    /// Every strategy, in documentation order.
    pub const ALL: [Strategy; 4] = [
        Strategy::First,
        Strategy::RoundRobin,
        Strategy::LeastSessions,
        Strategy::All,
    ];

    /// The name used in configuration files (`round-robin`).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::First => "first",
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastSessions => "least-sessions",
            Strategy::All => "all",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A strategy name that is not one of `first`, `round-robin`, `least-sessions`, `all`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy `{0}`, expected one of first, round-robin, least-sessions, all")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|strategy| strategy.name() == s)
            .ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

/// Identifies one server entry for as long as the directory runs (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(pub u64);

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Where a server entry comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A `[[servers]]` entry of the configuration; it stays for the life of the process.
    Static {
        /// The application-server account configured to speak for it, if any.
        account: Option<String>,
    },
    /// Registered by an application-server account; it goes when its registration expires
    /// or is removed.
    Dynamic {
        /// The application-server account that registered it.
        account: String,
    },
}

impl Origin {
    /// How an operator reads it (admin API, status page): `static` or `registered`.
    pub fn label(&self) -> &'static str {
        match self {
            Origin::Static { .. } => "static",
            Origin::Dynamic { .. } => "registered",
        }
    }
}

/// A change of a server's health, as reported by [`Directory::probe_result`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthChange {
    /// The server answered again and is back among the candidates.
    Up,
    /// The server stopped answering and was taken out of the candidates.
    Down,
}

/// Why a server could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// The server's URI is not a `sip:` or `sips:` URI that rsip can read.
    #[error("invalid server URI `{uri}`: {reason}")]
    BadUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server would deliver no service at all.
    #[error("server `{0}` lists no service")]
    NoServices(String),
}

/// When servers are probed and how many answers change their state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Time between two `OPTIONS` probes of the same server.
    pub probe_interval: Duration,
    /// Missed probes in a row that take a server out (at least 1).
    pub failure_threshold: u32,
    /// Answered probes in a row that put a server that is out back in (at least 1).
    pub recovery_threshold: u32,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            probe_interval: Duration::from_secs(30),
            failure_threshold: 2,
            recovery_threshold: 1,
        }
    }
}

/// A dynamic server as the registrar hands it over: one Contact of an application-server
/// account's registration (see [`Directory::sync_account`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicServer {
    /// The Contact URI, where the relay sends its INVITE legs and probes.
    pub uri: String,
    /// The services the Contact offers.
    pub services: Vec<String>,
    /// The most sessions the server takes at once, if it said.
    pub capacity: Option<u32>,
    /// When the registration ends unless refreshed.
    pub expires_at: Instant,
}

#[derive(Debug, Default)]
struct Probe {
    next_at: Option<Instant>,
    misses: u32,
    answers: u32,
    last_answer: Option<Instant>,
}

/// One application server known to the directory. Shared as a [`ServerRef`]: the session
/// layer keeps the reference for the life of a session and reports its end on it even if
/// the server has left the directory meanwhile.
#[derive(Debug)]
pub struct Server {
    id: ServerId,
    name: String,
    uri: Uri,
    uri_text: String,
    origin: Origin,
    /// 0 means no limit.
    capacity: AtomicU32,
    active: AtomicU32,
    up: AtomicBool,
    expires_at: Mutex<Option<Instant>>,
    probe: Mutex<Probe>,
    probed: bool,
    /// Drained by an operator: no new session, the live ones finish.
    drained: AtomicBool,
}

/// A shared reference to a [`Server`].
pub type ServerRef = Arc<Server>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Server {
    /// The directory's identifier of the entry.
    pub fn id(&self) -> ServerId {
        self.id
    }

    /// A name for logs and reports: the configured name of a static server, the account of a
    /// dynamic one.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where to send the INVITE leg and the `OPTIONS` probes, read with sip-core's parser
    /// (an IPv6 reference such as `sip:[::1]:5080` included, which rsip cannot read).
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The URI as it was configured or registered.
    pub fn uri_text(&self) -> &str {
        &self.uri_text
    }

    /// Whether the server is static or registered, and by whom.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The application-server account that speaks for the server: the one that registered
    /// it, or the `account` of its `[[servers]]` entry. Charges for the sessions it serves
    /// are taken from that account only, whatever URI another account registers.
    pub fn account(&self) -> Option<&str> {
        match &self.origin {
            Origin::Static { account } => account.as_deref(),
            Origin::Dynamic { account } => Some(account),
        }
    }

    /// The most sessions the server takes at once, `None` for no limit.
    pub fn capacity(&self) -> Option<u32> {
        match self.capacity.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// Sessions currently running on the server (see [`Directory::session_started`]).
    pub fn active_sessions(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether the server answers its probes (a new server is presumed up).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether the server is probed with `OPTIONS` at all: false for a static server
    /// configured with `probe = false`, which then stays a candidate whatever it answers.
    pub fn is_probed(&self) -> bool {
        self.probed
    }

    /// When the server last answered a probe.
    pub fn last_answer(&self) -> Option<Instant> {
        lock(&self.probe).last_answer
    }

    /// When a dynamic server's registration ends (`None` for a static server).
    pub fn expires_at(&self) -> Option<Instant> {
        *lock(&self.expires_at)
    }

    fn is_full(&self) -> bool {
        self.capacity()
            .is_some_and(|capacity| self.active_sessions() >= capacity)
    }

    /// Whether an operator drained the server (see [`Directory::set_drained`]).
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    fn is_candidate(&self, now: Instant) -> bool {
        self.is_up()
            && !self.is_full()
            && !self.is_drained()
            && self.expires_at().is_none_or(|at| at > now)
    }
}

#[derive(Debug, Default)]
struct ServiceEntry {
    servers: Vec<ServerRef>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct DynamicEntry {
    server: ServerRef,
    services: Vec<String>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    services: HashMap<String, ServiceEntry>,
    statics: Vec<(ServerRef, Vec<String>)>,
    /// Keyed by (account, contact URI text).
    dynamic: HashMap<(String, String), DynamicEntry>,
}

impl Inner {
    fn index(&mut self, server: &ServerRef, services: &[String]) {
        for service in services {
            let entry = self.services.entry(service.clone()).or_default();
            if !entry.servers.iter().any(|s| s.id == server.id) {
                entry.servers.push(server.clone());
            }
        }
    }

    fn unindex(&mut self, server: &ServerRef, services: &[String]) {
        for service in services {
            if let Some(entry) = self.services.get_mut(service) {
                entry.servers.retain(|s| s.id != server.id);
                if entry.servers.is_empty() {
                    self.services.remove(service);
                }
            }
        }
    }

    fn all_servers(&self) -> impl Iterator<Item = &ServerRef> {
        self.statics
            .iter()
            .map(|(server, _)| server)
            .chain(self.dynamic.values().map(|entry| &entry.server))
    }
}

fn parse_uri(uri: &str) -> Result<Uri, DirectoryError> {
    let bad = |reason: String| DirectoryError::BadUri {
        uri: uri.to_owned(),
        reason,
    };
    let parsed = Uri::parse(uri.trim()).map_err(|e| bad(e.to_string()))?;
    match parsed.scheme() {
        Scheme::Sip | Scheme::Sips if parsed.host().is_some() => Ok(parsed),
        _ => Err(bad("the scheme must be sip: or sips:".to_owned())),
    }
}

/// The service directory. See the [module documentation](self).
#[derive(Debug)]
pub struct Directory {
    inner: RwLock<Inner>,
    policy: HealthPolicy,
}

impl Directory {
    /// An empty directory probing by `policy`.
    pub fn new(policy: HealthPolicy) -> Directory {
        Directory {
            inner: RwLock::new(Inner::default()),
            policy: HealthPolicy {
                probe_interval: policy.probe_interval,
                failure_threshold: policy.failure_threshold.max(1),
                recovery_threshold: policy.recovery_threshold.max(1),
            },
        }
    }

    /// The probing policy in force.
    pub fn policy(&self) -> HealthPolicy {
        self.policy
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn new_server(
        inner: &mut Inner,
        name: &str,
        uri: &str,
        origin: Origin,
        capacity: Option<u32>,
        expires_at: Option<Instant>,
        probed: bool,
    ) -> Result<ServerRef, DirectoryError> {
        let parsed = parse_uri(uri)?;
        inner.next_id += 1;
        Ok(Arc::new(Server {
            id: ServerId(inner.next_id),
            name: name.to_owned(),
            uri: parsed,
            uri_text: uri.trim().to_owned(),
            origin,
            capacity: AtomicU32::new(capacity.unwrap_or(0)),
            active: AtomicU32::new(0),
            up: AtomicBool::new(true),
            expires_at: Mutex::new(expires_at),
            probe: Mutex::new(Probe::default()),
            probed,
            drained: AtomicBool::new(false),
        }))
    }

    /// Adds a static server (a `[[servers]]` entry) delivering `services`. It is presumed up
    /// until its probes say otherwise.
    pub fn add_static(
        &self,
        name: &str,
        uri: &str,
        services: &[String],
        capacity: Option<u32>,
    ) -> Result<ServerRef, DirectoryError> {
        self.add_static_with_probe(name, uri, services, capacity, true, None)
    }

    /// Adds a static server like [`Directory::add_static`]; with `probe` false it is never
    /// probed (RFC 3261 §11 `OPTIONS` are optional for a server to answer: some application
    /// servers never do) and stays a candidate for as long as the relay runs. An inquiry it
    /// does not answer still fails over to the next candidate, call by call. `account` is
    /// the application-server account that speaks for it (its charges), if any.
    pub fn add_static_with_probe(
        &self,
        name: &str,
        uri: &str,
        services: &[String],
        capacity: Option<u32>,
        probe: bool,
        account: Option<String>,
    ) -> Result<ServerRef, DirectoryError> {
        if services.is_empty() {
            return Err(DirectoryError::NoServices(name.to_owned()));
        }
        let mut inner = self.write();
        let server = Self::new_server(
            &mut inner,
            name,
            uri,
            Origin::Static { account },
            capacity,
            None,
            probe,
        )?;
        inner.index(&server, services);
        inner.statics.push((server.clone(), services.to_vec()));
        Ok(server)
    }

    /// Adds or refreshes the server that `account` registered at the Contact `uri`. A refresh
    /// keeps the entry (its session count and health) and takes the new services, capacity
    /// and expiry.
    pub fn upsert_dynamic(
        &self,
        account: &str,
        uri: &str,
        services: &[String],
        capacity: Option<u32>,
        expires_at: Instant,
    ) -> Result<ServerRef, DirectoryError> {
        if services.is_empty() {
            return Err(DirectoryError::NoServices(account.to_owned()));
        }
        let key = (account.to_owned(), uri.trim().to_owned());
        let mut inner = self.write();
        if let Some(entry) = inner.dynamic.remove(&key) {
            let server = entry.server;
            server
                .capacity
                .store(capacity.unwrap_or(0), Ordering::Relaxed);
            *lock(&server.expires_at) = Some(expires_at);
            if entry.services != services {
                inner.unindex(&server, &entry.services);
                inner.index(&server, services);
            }
            inner.dynamic.insert(
                key,
                DynamicEntry {
                    server: server.clone(),
                    services: services.to_vec(),
                },
            );
            return Ok(server);
        }
        let origin = Origin::Dynamic {
            account: account.to_owned(),
        };
        let server = Self::new_server(
            &mut inner,
            account,
            uri,
            origin,
            capacity,
            Some(expires_at),
            true,
        )?;
        inner.index(&server, services);
        inner.dynamic.insert(
            key,
            DynamicEntry {
                server: server.clone(),
                services: services.to_vec(),
            },
        );
        tracing::info!(account, uri, ?services, "application server registered");
        Ok(server)
    }

    /// The account, other than `account`, whose server (registered or configured) is at
    /// the host and port of `uri`, if any: an application-server account may not bind
    /// another's address, or inquiries for its services would go to that server under its
    /// name. A configured server without an account is reported as `"[[servers]]"`.
    pub fn other_account_at(&self, account: &str, uri: &Uri) -> Option<String> {
        let place = |u: &Uri| -> Option<(String, u16)> {
            let host = u.host()?.to_string().to_ascii_lowercase();
            let default = if u.scheme() == Scheme::Sips {
                5061
            } else {
                5060
            };
            Some((host, u.port().unwrap_or(default)))
        };
        let wanted = place(uri)?;
        let inner = self.read();
        let owner = inner
            .all_servers()
            .filter(|s| place(&s.uri).as_ref() == Some(&wanted))
            .find_map(|s| match s.account() {
                Some(owner) if owner == account => None,
                Some(owner) => Some(owner.to_owned()),
                None => Some("[[servers]]".to_owned()),
            });
        owner
    }

    /// Removes the server that `account` registered at `uri`, if any.
    pub fn remove_dynamic(&self, account: &str, uri: &str) -> Option<ServerRef> {
        let mut inner = self.write();
        let entry = inner
            .dynamic
            .remove(&(account.to_owned(), uri.trim().to_owned()))?;
        inner.unindex(&entry.server, &entry.services);
        tracing::info!(account, uri, "application server unregistered");
        Some(entry.server)
    }

    /// Makes the dynamic servers of `account` exactly `servers` (typically the bindings of
    /// its registration after a REGISTER): missing ones are added, present ones refreshed,
    /// the others removed. Returns the removed servers. A server whose URI cannot be read is
    /// skipped and reported in the error list.
    pub fn sync_account(
        &self,
        account: &str,
        servers: &[DynamicServer],
    ) -> (Vec<ServerRef>, Vec<DirectoryError>) {
        let mut errors = Vec::new();
        for server in servers {
            if let Err(e) = self.upsert_dynamic(
                account,
                &server.uri,
                &server.services,
                server.capacity,
                server.expires_at,
            ) {
                errors.push(e);
            }
        }
        let stale: Vec<String> = {
            let inner = self.read();
            inner
                .dynamic
                .keys()
                .filter(|(acc, uri)| acc == account && !servers.iter().any(|s| s.uri.trim() == uri))
                .map(|(_, uri)| uri.clone())
                .collect()
        };
        let removed = stale
            .iter()
            .filter_map(|uri| self.remove_dynamic(account, uri))
            .collect();
        (removed, errors)
    }

    /// Removes every dynamic server whose registration ended at or before `now`, and returns
    /// them.
    pub fn expire(&self, now: Instant) -> Vec<ServerRef> {
        let mut inner = self.write();
        let expired: Vec<(String, String)> = inner
            .dynamic
            .iter()
            .filter(|(_, entry)| entry.server.expires_at().is_some_and(|at| at <= now))
            .map(|(key, _)| key.clone())
            .collect();
        let mut removed = Vec::with_capacity(expired.len());
        for key in expired {
            if let Some(entry) = inner.dynamic.remove(&key) {
                inner.unindex(&entry.server, &entry.services);
                tracing::info!(account = %key.0, uri = %key.1, "application server registration expired");
                removed.push(entry.server);
            }
        }
        removed
    }

    /// When the next dynamic registration ends, if any: the time to call [`Directory::expire`].
    pub fn next_expiry(&self) -> Option<Instant> {
        self.read()
            .dynamic
            .values()
            .filter_map(|entry| entry.server.expires_at())
            .min()
    }

    /// The servers to try for `service`, ordered by `strategy`: the first is tried first,
    /// the rest are failover candidates in order (with [`Strategy::All`] the session layer
    /// tries them all at once). Servers that are down, full (at capacity) or whose
    /// registration has ended are left out; an empty list means nobody can deliver the
    /// service now.
    pub fn candidates(&self, service: &str, strategy: Strategy, now: Instant) -> Vec<ServerRef> {
        let inner = self.read();
        let Some(entry) = inner.services.get(service) else {
            return Vec::new();
        };
        let mut list: Vec<ServerRef> = entry
            .servers
            .iter()
            .filter(|server| server.is_candidate(now))
            .cloned()
            .collect();
        match strategy {
            Strategy::First | Strategy::All => {}
            Strategy::RoundRobin => {
                if !list.is_empty() {
                    let start = entry.next.fetch_add(1, Ordering::Relaxed) % list.len();
                    list.rotate_left(start);
                }
            }
            // A stable sort: ties keep configuration order.
            Strategy::LeastSessions => list.sort_by_key(|server| server.active_sessions()),
        }
        list
    }

    /// Every server (static, then registered) with the services it delivers.
    pub fn servers(&self) -> Vec<(ServerRef, Vec<String>)> {
        let inner = self.read();
        let mut out = inner.statics.clone();
        let mut dynamic: Vec<(ServerRef, Vec<String>)> = inner
            .dynamic
            .values()
            .map(|entry| (entry.server.clone(), entry.services.clone()))
            .collect();
        dynamic.sort_by_key(|(server, _)| server.id);
        out.extend(dynamic);
        out
    }

    /// Drains (`drained`) or undrains the servers named `key` (their name, their account or
    /// their URI as configured or registered): a drained server is no candidate for a new
    /// session or a move, and its live sessions finish. A refreshed registration keeps the
    /// mark; a registration that ended and comes again does not. Returns the servers marked.
    pub fn set_drained(&self, key: &str, drained: bool) -> Vec<ServerRef> {
        let key = key.trim();
        let inner = self.read();
        let marked: Vec<ServerRef> = inner
            .all_servers()
            .filter(|s| s.name == key || s.uri_text == key || s.account() == Some(key))
            .cloned()
            .collect();
        for server in &marked {
            server.drained.store(drained, Ordering::Relaxed);
            tracing::info!(
                server = server.name(),
                uri = server.uri_text(),
                drained,
                "application server drain changed by an operator"
            );
        }
        marked
    }

    /// Takes the static servers of `fresh` (a directory built from a reloaded
    /// configuration) in place of this one's: an entry with the same name, URI, account and
    /// probing is kept (its session count, health and drain mark) with the new services and
    /// capacity; others go, new ones come. Registered servers are untouched. Returns how
    /// many entries were (added, removed).
    pub fn replace_statics(&self, fresh: &Directory) -> (usize, usize) {
        let wanted = fresh.read().statics.clone();
        let mut inner = self.write();
        let old = std::mem::take(&mut inner.statics);
        let mut added = 0;
        let mut kept_ids = Vec::new();
        let mut statics = Vec::with_capacity(wanted.len());
        for (new, services) in wanted {
            let same = old
                .iter()
                .find(|(s, _)| {
                    s.name == new.name
                        && s.uri_text == new.uri_text
                        && s.probed == new.probed
                        && s.origin == new.origin
                        && !kept_ids.contains(&s.id)
                })
                .cloned();
            let server = match same {
                Some((server, old_services)) => {
                    let gone: Vec<String> = old_services
                        .into_iter()
                        .filter(|s| !services.contains(s))
                        .collect();
                    inner.unindex(&server, &gone);
                    server
                        .capacity
                        .store(new.capacity.load(Ordering::Relaxed), Ordering::Relaxed);
                    kept_ids.push(server.id);
                    server
                }
                None => {
                    inner.next_id += 1;
                    added += 1;
                    Arc::new(Server {
                        id: ServerId(inner.next_id),
                        name: new.name.clone(),
                        uri: new.uri.clone(),
                        uri_text: new.uri_text.clone(),
                        origin: new.origin.clone(),
                        capacity: AtomicU32::new(new.capacity.load(Ordering::Relaxed)),
                        active: AtomicU32::new(0),
                        up: AtomicBool::new(true),
                        expires_at: Mutex::new(None),
                        probe: Mutex::new(Probe::default()),
                        probed: new.probed,
                        drained: AtomicBool::new(false),
                    })
                }
            };
            inner.index(&server, &services);
            statics.push((server, services));
        }
        let mut removed = 0;
        for (server, services) in &old {
            if !kept_ids.contains(&server.id) {
                inner.unindex(server, services);
                removed += 1;
            }
        }
        inner.statics = statics;
        (added, removed)
    }

    /// Every server delivering `service`, whatever its state, in configuration order.
    pub fn servers_of(&self, service: &str) -> Vec<ServerRef> {
        self.read()
            .services
            .get(service)
            .map(|entry| entry.servers.clone())
            .unwrap_or_default()
    }

    /// The services that at least one server delivers, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().services.keys().cloned().collect();
        names.sort();
        names
    }

    /// Counts a session started on `server` (for `least-sessions` and capacity).
    pub fn session_started(&self, server: &Server) {
        server.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a session on `server` as ended. Never goes below zero.
    pub fn session_ended(&self, server: &Server) {
        // An Err here means the count was already zero: nothing to undo.
        let _ = server
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// The servers to send an `OPTIONS` probe to now. Each is scheduled for its next probe
    /// one interval later, so a probe whose result never comes does not stall the schedule.
    /// A newly added server is due at once; a server that is not probed never is.
    pub fn probe_due(&self, now: Instant) -> Vec<ServerRef> {
        let inner = self.read();
        inner
            .all_servers()
            .filter(|server| server.probed)
            .filter(|server| {
                let mut probe = lock(&server.probe);
                if probe.next_at.is_some_and(|at| at > now) {
                    return false;
                }
                probe.next_at = Some(now + self.policy.probe_interval);
                true
            })
            .cloned()
            .collect()
    }

    /// When the next probe is due, if any server is probed: the time to call
    /// [`Directory::probe_due`] again.
    pub fn next_probe(&self, now: Instant) -> Option<Instant> {
        self.read()
            .all_servers()
            .filter(|server| server.probed)
            .map(|server| lock(&server.probe).next_at.unwrap_or(now))
            .min()
    }

    /// Takes a change of health that another relay sharing the database saw for the
    /// server(s) at `uri`: a server one relay's probes took out is out here too, until
    /// probes (here or there) see it answer again. Servers that are not probed ignore it.
    /// Returns how many servers changed state.
    pub fn apply_health(&self, uri: &str, change: HealthChange) -> usize {
        let inner = self.read();
        let mut changed = 0;
        for server in inner
            .all_servers()
            .filter(|s| s.probed && s.uri_text == uri.trim())
        {
            let mut probe = lock(&server.probe);
            let up = change == HealthChange::Up;
            if up {
                probe.misses = 0;
            } else {
                probe.answers = 0;
            }
            if server.up.swap(up, Ordering::Relaxed) != up {
                changed += 1;
                tracing::info!(
                    server = server.name(),
                    uri = server.uri_text(),
                    up,
                    "application server health changed by another relay"
                );
            }
        }
        changed
    }

    /// Takes the result of a probe of `server`: `ok` when it answered (any final response
    /// counts as an answer: the server is alive), `false` when the probe timed out or could
    /// not be sent. Returns the change of state, if any. A server that is not probed ignores
    /// results (it stays up).
    pub fn probe_result(&self, server: &Server, ok: bool, now: Instant) -> Option<HealthChange> {
        if !server.probed {
            return None;
        }
        let mut probe = lock(&server.probe);
        if ok {
            probe.misses = 0;
            probe.answers = probe.answers.saturating_add(1);
            probe.last_answer = Some(now);
            if !server.is_up() && probe.answers >= self.policy.recovery_threshold {
                server.up.store(true, Ordering::Relaxed);
                tracing::info!(
                    server = server.name(),
                    uri = server.uri_text(),
                    "application server is up again"
                );
                return Some(HealthChange::Up);
            }
        } else {
            probe.answers = 0;
            probe.misses = probe.misses.saturating_add(1);
            if server.is_up() && probe.misses >= self.policy.failure_threshold {
                server.up.store(false, Ordering::Relaxed);
                tracing::warn!(
                    server = server.name(),
                    uri = server.uri_text(),
                    misses = probe.misses,
                    "application server stopped answering; taken out"
                );
                return Some(HealthChange::Down);
            }
        }
        None
    }
}

impl Default for Directory {
    fn default() -> Self {
        Directory::new(HealthPolicy::default())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn s(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn names(list: &[ServerRef]) -> Vec<String> {
        list.iter().map(|s| s.name().to_owned()).collect()
    }

    fn three() -> Directory {
        let dir = Directory::default();
        dir.add_static("a", "sip:127.0.0.1:5080", &s(&["echo"]), None)
            .unwrap();
        dir.add_static("b", "sip:127.0.0.1:5081", &s(&["echo", "clock"]), None)
            .unwrap();
        dir.add_static("c", "sip:127.0.0.1:5082", &s(&["echo"]), None)
            .unwrap();
        dir
    }

    #[test]
    fn a_drained_server_is_no_candidate_until_undrained_and_keeps_its_sessions() {
        let dir = three();
        let now = Instant::now();
        let b = dir.servers_of("clock")[0].clone();
        dir.session_started(&b);
        assert_eq!(names(&dir.set_drained("b", true)), ["b"]);
        assert_eq!(
            names(&dir.candidates("echo", Strategy::First, now)),
            ["a", "c"]
        );
        assert!(dir.candidates("clock", Strategy::First, now).is_empty());
        assert_eq!(b.active_sessions(), 1, "its live session is still counted");
        // By URI too; an unknown key marks nothing.
        assert_eq!(names(&dir.set_drained("sip:127.0.0.1:5081", false)), ["b"]);
        assert!(dir.set_drained("nobody", true).is_empty());
        assert_eq!(
            names(&dir.candidates("echo", Strategy::First, now)),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn replacing_the_statics_keeps_the_same_entries_state_and_takes_new_and_gone_ones() {
        let dir = three();
        let a = dir.servers_of("echo")[0].clone();
        dir.session_started(&a);
        dir.set_drained("a", true);
        let fresh = Directory::default();
        fresh
            .add_static("a", "sip:127.0.0.1:5080", &s(&["echo", "news"]), Some(5))
            .unwrap();
        fresh
            .add_static("d", "sip:127.0.0.1:5083", &s(&["clock"]), None)
            .unwrap();
        assert_eq!(dir.replace_statics(&fresh), (1, 2));
        let now = Instant::now();
        let kept = &dir.servers_of("news")[0];
        assert!(Arc::ptr_eq(kept, &a), "the same entry");
        assert_eq!(kept.active_sessions(), 1);
        assert!(kept.is_drained());
        assert_eq!(kept.capacity(), Some(5));
        assert_eq!(names(&dir.servers_of("echo")), ["a"]);
        assert_eq!(names(&dir.candidates("clock", Strategy::First, now)), ["d"]);
        assert_eq!(dir.services(), s(&["clock", "echo", "news"]));
        assert_eq!(
            names(
                &dir.servers()
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect::<Vec<_>>()
            ),
            ["a", "d"]
        );
    }

    #[test]
    fn strategy_names_round_trip() {
        for strategy in Strategy::ALL {
            assert_eq!(strategy.name().parse::<Strategy>().unwrap(), strategy);
        }
        assert!("fastest".parse::<Strategy>().is_err());
    }

    #[test]
    fn first_keeps_configuration_order_as_failover_order() {
        let dir = three();
        let now = Instant::now();
        assert_eq!(
            names(&dir.candidates("echo", Strategy::First, now)),
            ["a", "b", "c"]
        );
        assert_eq!(
            names(&dir.candidates("echo", Strategy::First, now)),
            ["a", "b", "c"]
        );
        assert_eq!(names(&dir.candidates("clock", Strategy::First, now)), ["b"]);
        assert!(dir.candidates("video", Strategy::First, now).is_empty());
    }

    #[test]
    fn round_robin_rotates_the_start_and_keeps_the_rest_as_failover() {
        let dir = three();
        let now = Instant::now();
        let got: Vec<Vec<String>> = (0..4)
            .map(|_| names(&dir.candidates("echo", Strategy::RoundRobin, now)))
            .collect();
        assert_eq!(got[0], ["a", "b", "c"]);
        assert_eq!(got[1], ["b", "c", "a"]);
        assert_eq!(got[2], ["c", "a", "b"]);
        assert_eq!(got[3], ["a", "b", "c"]);
    }

    #[test]
    fn least_sessions_orders_by_active_sessions_with_stable_ties() {
        let dir = three();
        let now = Instant::now();
        let all = dir.candidates("echo", Strategy::First, now);
        dir.session_started(&all[0]);
        dir.session_started(&all[0]);
        dir.session_started(&all[1]);
        assert_eq!(
            names(&dir.candidates("echo", Strategy::LeastSessions, now)),
            ["c", "b", "a"]
        );
        dir.session_ended(&all[0]);
        dir.session_ended(&all[0]);
        dir.session_ended(&all[0]); // one too many: stays at zero
        assert_eq!(all[0].active_sessions(), 0);
        assert_eq!(
            names(&dir.candidates("echo", Strategy::LeastSessions, now)),
            ["a", "c", "b"]
        );
    }

    #[test]
    fn all_returns_every_healthy_candidate() {
        let dir = three();
        let now = Instant::now();
        let b = dir.servers_of("echo")[1].clone();
        dir.probe_result(&b, false, now);
        dir.probe_result(&b, false, now);
        assert_eq!(
            names(&dir.candidates("echo", Strategy::All, now)),
            ["a", "c"]
        );
    }

    #[test]
    fn full_servers_are_skipped_until_a_session_ends() {
        let dir = Directory::default();
        let a = dir
            .add_static("a", "sip:127.0.0.1:5080", &s(&["echo"]), Some(1))
            .unwrap();
        dir.add_static("b", "sip:127.0.0.1:5081", &s(&["echo"]), None)
            .unwrap();
        let now = Instant::now();
        dir.session_started(&a);
        assert_eq!(names(&dir.candidates("echo", Strategy::First, now)), ["b"]);
        dir.session_ended(&a);
        assert_eq!(
            names(&dir.candidates("echo", Strategy::First, now)),
            ["a", "b"]
        );
    }

    #[test]
    fn health_goes_down_after_threshold_misses_and_up_after_one_answer() {
        let dir = three();
        let now = Instant::now();
        let a = dir.servers_of("echo")[0].clone();
        assert_eq!(dir.probe_result(&a, false, now), None);
        assert!(a.is_up(), "one miss is below the threshold of 2");
        assert_eq!(dir.probe_result(&a, false, now), Some(HealthChange::Down));
        assert!(!a.is_up());
        assert_eq!(
            names(&dir.candidates("echo", Strategy::First, now)),
            ["b", "c"]
        );
        assert_eq!(dir.probe_result(&a, false, now), None, "already down");
        assert_eq!(dir.probe_result(&a, true, now), Some(HealthChange::Up));
        assert_eq!(a.last_answer(), Some(now));
        assert_eq!(
            names(&dir.candidates("echo", Strategy::First, now)),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn an_answer_resets_the_miss_count() {
        let dir = three();
        let now = Instant::now();
        let a = dir.servers_of("echo")[0].clone();
        dir.probe_result(&a, false, now);
        dir.probe_result(&a, true, now);
        assert_eq!(dir.probe_result(&a, false, now), None);
        assert!(a.is_up());
    }

    #[test]
    fn recovery_threshold_needs_that_many_answers_in_a_row() {
        let dir = Directory::new(HealthPolicy {
            probe_interval: Duration::from_secs(10),
            failure_threshold: 1,
            recovery_threshold: 2,
        });
        let a = dir
            .add_static("a", "sip:127.0.0.1:5080", &s(&["echo"]), None)
            .unwrap();
        let now = Instant::now();
        assert_eq!(dir.probe_result(&a, false, now), Some(HealthChange::Down));
        assert_eq!(dir.probe_result(&a, true, now), None);
        assert_eq!(dir.probe_result(&a, false, now), None);
        assert_eq!(dir.probe_result(&a, true, now), None);
        assert_eq!(dir.probe_result(&a, true, now), Some(HealthChange::Up));
    }

    #[test]
    fn an_unprobed_static_server_is_never_due_and_stays_up() {
        let dir = Directory::new(HealthPolicy {
            probe_interval: Duration::from_secs(1),
            failure_threshold: 1,
            recovery_threshold: 1,
        });
        let quiet = dir
            .add_static_with_probe(
                "quiet",
                "sip:127.0.0.1:5080",
                &s(&["echo"]),
                None,
                false,
                None,
            )
            .unwrap();
        dir.add_static("b", "sip:127.0.0.1:5081", &s(&["echo"]), None)
            .unwrap();
        assert!(!quiet.is_probed());
        let t0 = Instant::now();
        for k in 0..5 {
            let now = t0 + Duration::from_secs(k);
            assert_eq!(names(&dir.probe_due(now)), ["b"], "at {k}s");
            // Even a miss reported for it (a probe raced with a reload) changes nothing.
            assert_eq!(dir.probe_result(&quiet, false, now), None);
        }
        assert!(quiet.is_up());
        assert_eq!(
            names(&dir.candidates("echo", Strategy::First, t0)),
            ["quiet", "b"]
        );
        // Only the probed server sets the schedule.
        assert!(dir.next_probe(t0).is_some());
        let only_quiet = Directory::default();
        only_quiet
            .add_static_with_probe(
                "quiet",
                "sip:127.0.0.1:5080",
                &s(&["echo"]),
                None,
                false,
                None,
            )
            .unwrap();
        assert!(only_quiet.probe_due(t0).is_empty());
        assert_eq!(only_quiet.next_probe(t0), None);
    }

    #[test]
    fn probes_are_due_at_once_then_every_interval() {
        let dir = three();
        let t0 = Instant::now();
        assert_eq!(dir.next_probe(t0), Some(t0));
        assert_eq!(dir.probe_due(t0).len(), 3);
        assert!(dir.probe_due(t0).is_empty(), "scheduled one interval later");
        let t1 = t0 + Duration::from_secs(29);
        assert!(dir.probe_due(t1).is_empty());
        assert_eq!(dir.next_probe(t1), Some(t0 + Duration::from_secs(30)));
        let t2 = t0 + Duration::from_secs(30);
        assert_eq!(dir.probe_due(t2).len(), 3);
    }

    #[test]
    fn dynamic_servers_join_refresh_and_expire() {
        let dir = three();
        let t0 = Instant::now();
        let exp = t0 + Duration::from_secs(60);
        let d = dir
            .upsert_dynamic(
                "as1",
                "sip:as1@127.0.0.1:5090",
                &s(&["echo", "video"]),
                Some(5),
                exp,
            )
            .unwrap();
        assert_eq!(
            d.origin(),
            &Origin::Dynamic {
                account: "as1".into()
            }
        );
        assert_eq!(
            names(&dir.candidates("echo", Strategy::First, t0)),
            ["a", "b", "c", "as1"]
        );
        assert_eq!(
            names(&dir.candidates("video", Strategy::First, t0)),
            ["as1"]
        );
        assert_eq!(dir.next_expiry(), Some(exp));

        // A refresh keeps the entry (and its sessions) and takes the new services.
        dir.session_started(&d);
        let exp2 = t0 + Duration::from_secs(120);
        let d2 = dir
            .upsert_dynamic(
                "as1",
                "sip:as1@127.0.0.1:5090",
                &s(&["video"]),
                Some(7),
                exp2,
            )
            .unwrap();
        assert_eq!(d2.id(), d.id());
        assert_eq!(d2.active_sessions(), 1);
        assert_eq!(d2.capacity(), Some(7));
        assert_eq!(
            names(&dir.candidates("echo", Strategy::First, t0)),
            ["a", "b", "c"]
        );

        // Past its expiry it is no candidate even before expire() runs.
        let late = t0 + Duration::from_secs(121);
        assert!(dir.candidates("video", Strategy::First, late).is_empty());
        assert!(dir.expire(t0 + Duration::from_secs(119)).is_empty());
        let removed = dir.expire(late);
        assert_eq!(names(&removed), ["as1"]);
        assert_eq!(dir.next_expiry(), None);
        assert!(dir.servers_of("video").is_empty());
        assert!(!dir.services().contains(&"video".to_owned()));
    }

    #[test]
    fn sync_account_adds_refreshes_and_removes() {
        let dir = Directory::default();
        let t0 = Instant::now();
        let exp = t0 + Duration::from_secs(60);
        let one = DynamicServer {
            uri: "sip:as1@127.0.0.1:5090".into(),
            services: s(&["echo"]),
            capacity: None,
            expires_at: exp,
        };
        let two = DynamicServer {
            uri: "sip:as1@127.0.0.1:5091".into(),
            ..one.clone()
        };
        let (removed, errors) = dir.sync_account("as1", &[one.clone(), two.clone()]);
        assert!(removed.is_empty() && errors.is_empty());
        dir.upsert_dynamic("as2", "sip:as2@127.0.0.1:6000", &s(&["echo"]), None, exp)
            .unwrap();
        assert_eq!(dir.servers_of("echo").len(), 3);
        let (removed, _) = dir.sync_account("as1", &[two]);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].uri_text(), "sip:as1@127.0.0.1:5090");
        let left: Vec<String> = dir
            .servers_of("echo")
            .iter()
            .map(|s| s.uri_text().to_owned())
            .collect();
        // Registration order is kept.
        assert_eq!(left, ["sip:as1@127.0.0.1:5091", "sip:as2@127.0.0.1:6000"]);
        let bad = DynamicServer {
            uri: "http://example.com".into(),
            ..one
        };
        let (_, errors) = dir.sync_account("as1", &[bad]);
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn bad_uris_and_empty_services_are_refused() {
        let dir = Directory::default();
        assert!(matches!(
            dir.add_static("x", "mailto:x@example.com", &s(&["echo"]), None),
            Err(DirectoryError::BadUri { .. })
        ));
        assert!(matches!(
            dir.add_static("x", "not a uri at all <>", &s(&["echo"]), None),
            Err(DirectoryError::BadUri { .. })
        ));
        assert_eq!(
            dir.add_static("x", "sip:127.0.0.1", &[], None).unwrap_err(),
            DirectoryError::NoServices("x".into())
        );
        assert!(dir.services().is_empty());
    }

    #[test]
    fn removed_server_can_still_count_down_its_sessions() {
        let dir = Directory::default();
        let t0 = Instant::now();
        let d = dir
            .upsert_dynamic(
                "as1",
                "sip:as1@127.0.0.1:5090",
                &s(&["echo"]),
                None,
                t0 + Duration::from_secs(5),
            )
            .unwrap();
        dir.session_started(&d);
        assert!(dir
            .remove_dynamic("as1", "sip:as1@127.0.0.1:5090")
            .is_some());
        dir.session_ended(&d);
        assert_eq!(d.active_sessions(), 0);
        assert!(dir
            .remove_dynamic("as1", "sip:as1@127.0.0.1:5090")
            .is_none());
    }

    #[test]
    fn an_address_is_another_accounts_when_its_server_is_theirs() {
        let dir = Directory::new(HealthPolicy::default());
        dir.add_static_with_probe(
            "a",
            "sip:127.0.0.1:5080",
            &s(&["echo"]),
            None,
            true,
            Some("as1".into()),
        )
        .unwrap();
        dir.add_static("plain", "sip:127.0.0.1:5090", &s(&["echo"]), None)
            .unwrap();
        dir.upsert_dynamic(
            "as3",
            "sip:as3@[::1]:5070",
            &s(&["clock"]),
            None,
            Instant::now() + Duration::from_secs(60),
        )
        .unwrap();
        let at =
            |account: &str, uri: &str| dir.other_account_at(account, &Uri::parse(uri).unwrap());
        // Same host and port, whatever the user part, parameters or case.
        assert_eq!(
            at("as2", "sip:as2@127.0.0.1:5080;transport=udp").as_deref(),
            Some("as1")
        );
        assert_eq!(at("as2", "sip:x@[::1]:5070").as_deref(), Some("as3"));
        assert_eq!(
            at("as2", "sip:127.0.0.1:5090").as_deref(),
            Some("[[servers]]")
        );
        // One's own server, another port or host, or the default port: nobody else's.
        assert_eq!(at("as1", "sip:as1@127.0.0.1:5080"), None);
        assert_eq!(at("as2", "sip:as2@127.0.0.1:5081"), None);
        assert_eq!(at("as2", "sip:as2@127.0.0.2:5080"), None);
        assert_eq!(at("as2", "sip:as2@127.0.0.1"), None);
    }
}
