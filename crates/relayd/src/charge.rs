//! Application billing (claim 4): an application-server account asks the relay to charge a
//! subscriber with `MESSAGE` and a body of type `application/vnd.relay.charge+json`
//! (docs/protocol.md). Out of dialog the account authenticates with digest (407); in dialog
//! the leg the relay itself set up with that server vouches for it.
//!
//! The charge record is committed before the 200; the same event id again is answered 200
//! and stored once. A malformed body, a missing field or an amount beyond the per-event limit
//! gets 400 with a reason; a session the server does not serve, or a subscriber it never
//! served, gets 403.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use billing::money::{Currency, Money};
use billing::store::{ChargeAmount, NewCharge};
use rsip::prelude::*;
use rsip::Header;
use serde::Deserialize;
use sip_core::endpoint::IncomingRequest;
use sip_core::message;
use tracing::{info, warn};

use crate::b2bua;
use crate::billing_control::unix_ms;
use crate::relay::Relay;

/// The content type of a charge request.
pub const CHARGE_CONTENT_TYPE: &str = "application/vnd.relay.charge+json";

/// A live session as charging sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedSession {
    /// The relay's session id.
    pub session_id: String,
    /// The subscriber it delivers to.
    pub subscriber: String,
    /// The service delivered.
    pub service: String,
    /// The application server's URI (as in the directory).
    pub server: String,
    /// The server leg's Call-ID.
    pub server_call_id: String,
    /// The terminal leg's Call-ID.
    pub terminal_call_id: String,
}

/// How long an ended session stays findable by default (`[billing] late_charge_grace_secs`):
/// a server may send its last charge just after the BYE, and it still belongs to that
/// session.
pub const ENDED_GRACE: Duration = Duration::from_secs(600);

/// One shard of the index: the sessions whose keys hash here, by key hash, with the time
/// each ended (if it did); the ended ones in the order they ended, to forget them after the
/// grace period without scanning.
#[derive(Default)]
struct ServedShard {
    by_key: HashMap<u64, (Arc<ServedSession>, Option<Instant>)>,
    ended: VecDeque<(Instant, u64)>,
}

impl ServedShard {
    /// Forgets the keys of sessions that ended more than `grace` before `now`.
    fn forget_expired(&mut self, now: Instant, grace: Duration) {
        while let Some(&(at, key)) = self.ended.front() {
            if now.saturating_duration_since(at) < grace {
                break;
            }
            self.ended.pop_front();
            // A key may have moved on to a later segment of the same call: keep that.
            if self
                .by_key
                .get(&key)
                .is_some_and(|(_, ended)| ended.is_some_and(|e| e <= at))
            {
                self.by_key.remove(&key);
            }
        }
    }
}

/// How many shards the index has: every call takes a few of their locks, none all of them.
const SERVED_SHARDS: usize = 16;

/// Which server serves which session, and which subscribers each server has served.
///
/// A session is findable from the moment its server answered 2xx — the terminal may use its
/// data connection before its ACK reaches the relay, and the server may charge for it — until
/// [`ENDED_GRACE`] after it ended, by its id and by both Call-IDs. Those keys are kept as
/// 64-bit keyed hashes (SipHash with a random key), sharded by hash: no string is copied per
/// session and no lock is shared by all calls. A lookup checks the key against the session
/// found, so a collision of two hashes can only make a key unfindable, never find the wrong
/// session.
pub struct ServedIndex {
    grace: Duration,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<ServedShard>>,
    /// By server URI, the subscribers it has served since start-up. Read-locked to look a
    /// pair up by `&str` (almost always already there: no allocation, no exclusive lock on
    /// the path of a call); written only for a new pair.
    history: RwLock<HashMap<String, HashSet<String>>>,
}

impl Default for ServedIndex {
    /// An index keeping ended sessions for [`ENDED_GRACE`].
    fn default() -> Self {
        ServedIndex::with_grace(ENDED_GRACE)
    }
}

impl ServedIndex {
    /// An index keeping ended sessions findable for `grace`.
    pub fn with_grace(grace: Duration) -> Self {
        ServedIndex {
            grace,
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..SERVED_SHARDS)
                .map(|_| Mutex::new(ServedShard::default()))
                .collect(),
            history: RwLock::new(HashMap::new()),
        }
    }
}

fn keys_of(s: &ServedSession) -> [&str; 3] {
    [
        s.session_id.as_str(),
        s.server_call_id.as_str(),
        s.terminal_call_id.as_str(),
    ]
}

impl ServedIndex {
    fn hash(&self, key: &str) -> u64 {
        use std::hash::BuildHasher as _;
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, ServedShard> {
        // Each operation on a shard is a map insert, lookup or removal: a poisoned lock
        // cannot hold a half-done one.
        self.shards[(hash >> 32) as usize % SERVED_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records an answered session (or a new billing segment of one), findable by its id and
    /// both Call-IDs.
    pub fn insert(&self, s: ServedSession) {
        if !self.has_served(&s.server, &s.subscriber) {
            self.history
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(s.server.clone())
                .or_default()
                .insert(s.subscriber.clone());
        }
        let now = Instant::now();
        let s = Arc::new(s);
        for key in keys_of(&s) {
            let hash = self.hash(key);
            let mut shard = self.shard(hash);
            shard.forget_expired(now, self.grace);
            shard.by_key.insert(hash, (Arc::clone(&s), None));
        }
    }

    /// Marks a session (segment) ended; it stays findable for the grace period.
    pub fn remove(&self, session_id: &str) {
        let now = Instant::now();
        let Some(s) = self.live(session_id) else {
            return;
        };
        for key in keys_of(&s) {
            let hash = self.hash(key);
            let mut shard = self.shard(hash);
            let mine = match shard.by_key.get_mut(&hash) {
                Some(entry) if entry.0.session_id == s.session_id => {
                    entry.1 = Some(now);
                    true
                }
                _ => false,
            };
            if mine {
                shard.ended.push_back((now, hash));
            }
        }
    }

    /// The live (not ended) session with this id.
    fn live(&self, session_id: &str) -> Option<Arc<ServedSession>> {
        let hash = self.hash(session_id);
        let shard = self.shard(hash);
        match shard.by_key.get(&hash) {
            Some((s, None)) if s.session_id == session_id => Some(Arc::clone(s)),
            _ => None,
        }
    }

    /// The session with this id or Call-ID (live, or ended within the grace period).
    pub fn find(&self, key: &str) -> Option<ServedSession> {
        let hash = self.hash(key);
        let shard = self.shard(hash);
        shard
            .by_key
            .get(&hash)
            .filter(|(s, _)| keys_of(s).contains(&key))
            .map(|(s, _)| ServedSession::clone(s))
    }

    /// Whether `server` has ever delivered a session to `subscriber`.
    pub fn has_served(&self, server: &str, subscriber: &str) -> bool {
        self.history
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(server)
            .is_some_and(|served| served.contains(subscriber))
    }

    /// Forgets what ended more than the grace period before `now`. Done as sessions are
    /// inserted, and by the relay's housekeeping every second, so that an idle relay gives
    /// the memory back too.
    pub fn forget_expired(&self, now: Instant) {
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget_expired(now, self.grace);
        }
    }

    /// How many keys the index holds (three per session, live or in its grace period).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).by_key.len())
            .sum()
    }

    /// Whether the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The JSON body of a charge request (docs/protocol.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeBody {
    event_id: String,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    subscriber: Option<String>,
    #[serde(default)]
    amount: Option<i64>,
    #[serde(default)]
    units: Option<i64>,
    #[serde(default)]
    unit_price: Option<i64>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

/// A refusal: status and reason phrase.
type Refusal = (u16, String);

fn bad(reason: impl Into<String>) -> Refusal {
    (400, reason.into())
}

/// Handles an out-of-dialog charge request: digest-authenticated as an application-server
/// account.
pub async fn handle(relay: Arc<Relay>, r: IncomingRequest) {
    if !relay.is_ours(&r.req.uri) {
        answer(&r, 404, "Not Found");
        return;
    }
    let Some(account) = relay_authenticate(&relay, &r) else {
        return;
    };
    if relay.config.server_account(&account).is_none() {
        answer(&r, 403, "Not an application-server account");
        return;
    }
    let servers: Vec<String> = account_servers(&relay, &account);
    process(&relay, &r, &account, &servers, None).await;
}

/// Handles a charge request that arrived on a server leg of `served` (the leg itself
/// authenticates the server).
pub async fn handle_in_dialog(relay: Arc<Relay>, r: IncomingRequest, served: ServedSession) {
    let servers = vec![served.server.clone()];
    let account = relay.account_of(&served.server).unwrap_or_default();
    process(&relay, &r, &account, &servers, Some(served)).await;
}

/// Whether a request is a charge request (by its Content-Type).
pub fn is_charge(req: &rsip::Request) -> bool {
    req.headers.iter().any(|h| match h {
        Header::ContentType(c) => c
            .value()
            .trim()
            .to_ascii_lowercase()
            .starts_with(CHARGE_CONTENT_TYPE),
        _ => false,
    })
}

fn relay_authenticate(relay: &Relay, r: &IncomingRequest) -> Option<String> {
    relay.authenticate_request(r)
}

/// The server URIs an account stands for: its registered bindings and the static servers
/// configured with that account.
fn account_servers(relay: &Relay, account: &str) -> Vec<String> {
    let mut out: Vec<String> = relay
        .registrar
        .bindings(account, std::time::Instant::now())
        .into_iter()
        .map(|b| b.uri_text)
        .collect();
    for s in &relay.config.servers {
        if s.account.as_deref() == Some(account) {
            out.push(s.uri.clone());
        }
    }
    out
}

fn same_server(a: &str, b: &str) -> bool {
    let host = |u: &str| -> String {
        sip_core::uri::Uri::parse(u.trim())
            .ok()
            .and_then(|u| {
                let host = u.host()?.to_string().to_ascii_lowercase();
                Some(format!("{host}:{}", u.port().unwrap_or(5060)))
            })
            .unwrap_or_else(|| u.to_string())
    };
    host(a) == host(b)
}

async fn process(
    relay: &Relay,
    r: &IncomingRequest,
    account: &str,
    servers: &[String],
    in_dialog: Option<ServedSession>,
) {
    match charge(relay, r, servers, in_dialog).await {
        Ok(()) => answer(r, 200, "OK"),
        Err((code, reason)) => {
            info!(account, code, reason = %reason, "charge refused");
            answer(r, code, &reason);
        }
    }
}

async fn charge(
    relay: &Relay,
    r: &IncomingRequest,
    servers: &[String],
    in_dialog: Option<ServedSession>,
) -> Result<(), Refusal> {
    if !is_charge(&r.req) {
        return Err((
            415,
            format!("Unsupported Media Type (expected {CHARGE_CONTENT_TYPE})"),
        ));
    }
    let body: ChargeBody =
        serde_json::from_slice(&r.req.body).map_err(|e| bad(format!("Malformed charge: {e}")))?;
    if body.event_id.trim().is_empty() {
        return Err(bad("Malformed charge: empty event_id"));
    }
    let limits = &relay.config.billing;
    let currency_code = body
        .currency
        .clone()
        .unwrap_or_else(|| limits.currency.clone());
    let currency = Currency::new(&currency_code).map_err(|e| bad(format!("Bad currency: {e}")))?;
    let amount = match (body.amount, body.units, body.unit_price) {
        (Some(a), None, None) => {
            if a < 0 {
                return Err(bad("Negative amount"));
            }
            ChargeAmount::Total(Money::new(a, currency))
        }
        (None, Some(units), Some(price)) => {
            if units < 0 || price < 0 {
                return Err(bad("Negative units or unit price"));
            }
            ChargeAmount::Units {
                units,
                unit_price: Money::new(price, currency),
            }
        }
        _ => {
            return Err(bad(
                "Malformed charge: give amount, or units and unit_price",
            ))
        }
    };
    let total = match amount {
        ChargeAmount::Total(m) => Some(m.minor),
        ChargeAmount::Units { units, unit_price } => units.checked_mul(unit_price.minor),
    };
    match total {
        Some(t) if t <= limits.max_charge => {}
        _ => {
            return Err(bad(format!(
                "Amount over the per-event limit of {}",
                limits.max_charge
            )))
        }
    }
    // Whom to charge, and is this server entitled to?
    let session = match (&in_dialog, &body.session_id, &body.call_id) {
        (Some(s), _, _) => Some(s.clone()),
        (None, Some(key), _) | (None, None, Some(key)) => match relay.served.find(key) {
            Some(s) if servers.iter().any(|srv| same_server(srv, &s.server)) => Some(s),
            _ => return Err((403, "Session not served by this server".into())),
        },
        (None, None, None) => None,
    };
    let (subscriber, service, session_id, server) = match session {
        Some(s) => {
            if body
                .subscriber
                .as_deref()
                .is_some_and(|sub| sub != s.subscriber)
            {
                return Err(bad("Subscriber does not match the session"));
            }
            (s.subscriber, Some(s.service), Some(s.session_id), s.server)
        }
        None => {
            let Some(subscriber) = body.subscriber.clone() else {
                return Err(bad(
                    "Malformed charge: missing session_id, call_id or subscriber",
                ));
            };
            let Some(server) = servers
                .iter()
                .find(|srv| relay.served.has_served(srv, &subscriber))
                .cloned()
            else {
                return Err((403, "Subscriber never served by this server".into()));
            };
            (subscriber, None, None, server)
        }
    };
    let new = NewCharge {
        session_id,
        // Keyed by the server's URI, as its session records are, so that reports per
        // server add both up; the account is in the log.
        server,
        subscriber,
        service,
        event_id: body.event_id,
        amount,
        description: body.description.unwrap_or_default(),
        charged_at_ms: unix_ms(SystemTime::now()),
    };
    match relay.billing.charge(new).await {
        Ok((record, duplicate)) => {
            info!(event_id = %record.event_id, server = %record.server, duplicate, "charge recorded");
            Ok(())
        }
        Err(e) => {
            warn!(error = %e, "charge not recorded");
            match e {
                billing::BillingError::InvalidInput { .. }
                | billing::BillingError::NegativeAmount { .. }
                | billing::BillingError::Money(_) => Err(bad(format!("Invalid charge: {e}"))),
                _ => Err((500, "Billing unavailable".into())),
            }
        }
    }
}

fn answer(r: &IncomingRequest, code: u16, reason: &str) {
    let tag = message::new_tag();
    let _ =
        r.tx.respond(b2bua::local_response(&r.req, code, reason, Some(&tag)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(id: &str, call: &str) -> ServedSession {
        ServedSession {
            session_id: id.into(),
            subscriber: "alice".into(),
            service: "echo".into(),
            server: "sip:127.0.0.1:5080".into(),
            server_call_id: format!("b-{call}"),
            terminal_call_id: format!("a-{call}"),
        }
    }

    #[test]
    fn a_session_is_found_by_id_and_both_call_ids_until_after_it_ended() {
        let index = ServedIndex::default();
        index.insert(served("s1", "c1"));
        for key in ["s1", "b-c1", "a-c1"] {
            assert_eq!(
                index.find(key).map(|s| s.session_id),
                Some("s1".to_string()),
                "{key}"
            );
        }
        index.remove("s1");
        // Ended, but a late charge still finds it.
        assert!(index.find("a-c1").is_some());
        assert!(index.has_served("sip:127.0.0.1:5080", "alice"));
        assert!(!index.has_served("sip:127.0.0.1:5080", "bob"));
    }

    #[test]
    fn ended_sessions_are_forgotten_after_the_grace_period_but_not_a_later_segment() {
        let index = ServedIndex::default();
        index.insert(served("s1", "c1"));
        // A change opened a new segment of the same call; the old one ended.
        index.insert(served("s2", "c1"));
        index.remove("s1");
        let later = Instant::now() + ENDED_GRACE + Duration::from_secs(1);
        index.forget_expired(later);
        assert!(index.find("s1").is_none());
        assert_eq!(
            index.find("a-c1").map(|s| s.session_id),
            Some("s2".to_string())
        );
        index.remove("s2");
        index.forget_expired(later + ENDED_GRACE + Duration::from_secs(1));
        assert!(index.find("a-c1").is_none() && index.find("s2").is_none());
    }

    #[test]
    fn sessions_over_every_shard_are_found_by_their_own_keys_only_and_all_forgotten() {
        let index = ServedIndex::default();
        for i in 0..1000 {
            index.insert(served(&format!("s{i}"), &format!("c{i}")));
        }
        for i in 0..1000 {
            for key in [format!("s{i}"), format!("a-c{i}"), format!("b-c{i}")] {
                assert_eq!(
                    index.find(&key).map(|s| s.session_id),
                    Some(format!("s{i}"))
                );
            }
            assert!(index.find(&format!("x-c{i}")).is_none());
        }
        for i in 0..1000 {
            index.remove(&format!("s{i}"));
        }
        // Removing an unknown or already ended session changes nothing.
        index.remove("s1");
        index.remove("nobody");
        index.forget_expired(Instant::now() + ENDED_GRACE + Duration::from_secs(1));
        assert!((0..1000).all(|i| index.find(&format!("a-c{i}")).is_none()));
        assert!(index.shards.iter().all(|s| s
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .is_empty()));
    }

    #[test]
    fn the_grace_period_is_the_configured_one() {
        let grace = Duration::from_secs(5);
        let index = ServedIndex::with_grace(grace);
        index.insert(served("s1", "c1"));
        assert_eq!(index.len(), 3);
        index.remove("s1");
        let ended = Instant::now();
        // Within its grace period a late charge still finds it ...
        index.forget_expired(ended + Duration::from_secs(4));
        assert!(index.find("b-c1").is_some());
        // ... and once it is over, nothing of it is left (well before the default 600 s).
        index.forget_expired(ended + grace + Duration::from_secs(1));
        assert!(index.find("b-c1").is_none());
        assert!(index.is_empty());
    }
}
