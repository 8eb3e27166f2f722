//! Which application server serves which live session, for charge requests (claim 4): the
//! index a call keeps of its sessions (it owns them; this only indexes them), found by
//! session id and by either leg's Call-ID, and kept findable for a grace period after a
//! session ended, since a server may send its last charge just after the BYE.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

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
    /// The application-server account that speaks for that server (the one that
    /// registered it, or its `[[servers]]` entry's `account`): the only one whose charges
    /// may name this session. `None` for a static server with no account.
    pub account: Option<String>,
    /// The server leg's Call-ID.
    pub server_call_id: String,
    /// The terminal leg's Call-ID.
    pub terminal_call_id: String,
    /// When its billing segment started (the 2xx to the terminal, or the change or transfer
    /// that opened it): its duration so far, for the admin API.
    pub started: SystemTime,
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
        // A peak's room is given back once the peak's sessions are forgotten: a HashMap and
        // a VecDeque keep their capacity as entries leave.
        if self.by_key.capacity() > KEEP_ROOM && self.by_key.len() < self.by_key.capacity() / 4 {
            self.by_key
                .shrink_to((self.by_key.len() * 2).max(KEEP_ROOM / 2));
        }
        if self.ended.capacity() > KEEP_ROOM && self.ended.len() < self.ended.capacity() / 4 {
            self.ended
                .shrink_to((self.ended.len() * 2).max(KEEP_ROOM / 2));
        }
    }
}

/// The room a shard keeps however few entries it holds.
const KEEP_ROOM: usize = 256;

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
    /// By application-server account, the subscribers its servers have served since
    /// start-up, with the URI of the server that last did (charges out of a session are
    /// recorded against it). Keyed by the account, not by a URI, since another account may
    /// register the same URI text. Read-locked to look a pair up by `&str` (almost always
    /// already there: no allocation, no exclusive lock on the path of a call); written only
    /// for a new pair.
    history: RwLock<HashMap<String, HashMap<String, String>>>,
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
        if let Some(account) = &s.account {
            if self.server_that_served(account, &s.subscriber).as_deref() != Some(&s.server) {
                self.history
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(account.clone())
                    .or_default()
                    .insert(s.subscriber.clone(), s.server.clone());
            }
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

    /// Every live (not ended) session, each once, by session id.
    pub fn live_sessions(&self) -> Vec<ServedSession> {
        let mut out: Vec<ServedSession> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(
                shard
                    .by_key
                    .iter()
                    // Each session is under three keys: take it under its id's.
                    .filter(|(hash, (s, ended))| {
                        ended.is_none() && **hash == self.hash(&s.session_id)
                    })
                    .map(|(_, (s, _))| ServedSession::clone(s)),
            );
        }
        out.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        out
    }

    /// The URI of the server of `account` that last delivered a session to `subscriber`,
    /// if one ever did: whether the account may charge the subscriber outside a session.
    pub fn server_that_served(&self, account: &str, subscriber: &str) -> Option<String> {
        self.history
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(account)
            .and_then(|served| served.get(subscriber).cloned())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn served(id: &str, call: &str) -> ServedSession {
        ServedSession {
            session_id: id.into(),
            subscriber: "alice".into(),
            service: "echo".into(),
            server: "sip:127.0.0.1:5080".into(),
            account: Some("as1".into()),
            server_call_id: format!("b-{call}"),
            terminal_call_id: format!("a-{call}"),
            started: SystemTime::UNIX_EPOCH,
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
        assert_eq!(
            index.server_that_served("as1", "alice").as_deref(),
            Some("sip:127.0.0.1:5080")
        );
        assert_eq!(index.server_that_served("as1", "bob"), None);
        // Another account that registered the same URI has served nobody.
        assert_eq!(index.server_that_served("as2", "alice"), None);
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
    fn live_sessions_lists_each_live_session_once_and_no_ended_one() {
        let index = ServedIndex::default();
        for i in 0..40 {
            index.insert(served(&format!("s{i:02}"), &format!("c{i}")));
        }
        index.remove("s07");
        let live: Vec<String> = index
            .live_sessions()
            .into_iter()
            .map(|s| s.session_id)
            .collect();
        let expected: Vec<String> = (0..40)
            .filter(|i| *i != 7)
            .map(|i| format!("s{i:02}"))
            .collect();
        assert_eq!(live, expected);
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

    #[test]
    fn a_peaks_room_is_given_back_once_its_sessions_are_forgotten() {
        let grace = Duration::from_secs(5);
        let index = ServedIndex::with_grace(grace);
        let room = |index: &ServedIndex| -> usize {
            index
                .shards
                .iter()
                .map(|s| {
                    let s = s.lock().unwrap_or_else(|p| p.into_inner());
                    s.by_key.capacity() + s.ended.capacity()
                })
                .sum()
        };
        let idle = room(&index);
        for i in 0..20_000 {
            index.insert(served(&format!("s{i}"), &format!("c{i}")));
        }
        for i in 0..20_000 {
            index.remove(&format!("s{i}"));
        }
        let peak = room(&index);
        assert!(peak > 60_000, "{peak}");
        index.forget_expired(Instant::now() + grace + Duration::from_secs(1));
        assert!(index.is_empty());
        let after = room(&index);
        assert!(
            after <= idle + SERVED_SHARDS * 2 * KEEP_ROOM,
            "room kept after the peak: {after} (peak {peak}, idle {idle})"
        );
    }
}
