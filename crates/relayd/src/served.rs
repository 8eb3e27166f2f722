//! Which application server serves which live session, for charge requests (claim 4): the
//! index a call keeps of its sessions (it owns them; this only indexes them), found by
//! session id and by either leg's Call-ID. A session leaves it once its record is committed:
//! a charge that comes after that (a server may send its last one just after the BYE) is
//! checked against the record in the billing store (see [`crate::charge`]), so that what a
//! relay keeps in memory does not grow with its call rate times the late-charge grace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

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

/// One shard of the index: the sessions whose keys hash here, by key hash.
#[derive(Default)]
struct ServedShard {
    by_key: HashMap<u64, Arc<LiveEntry>>,
}

impl ServedShard {
    /// Gives back a peak's room once under a quarter full: a HashMap keeps its capacity as
    /// entries leave.
    fn give_back_room(&mut self) {
        if self.by_key.capacity() > KEEP_ROOM && self.by_key.len() < self.by_key.capacity() / 4 {
            self.by_key
                .shrink_to((self.by_key.len() * 2).max(KEEP_ROOM / 2));
        }
    }
}

/// The room a shard keeps however few entries it holds.
const KEEP_ROOM: usize = 256;

/// How many shards the index has: every call takes a few of their locks, none all of them.
const SERVED_SHARDS: usize = 16;

/// A live session as the index keeps it: its text in one allocation, its fields in
/// [`FIELDS`] order (not eight small strings per session).
struct LiveEntry {
    started: SystemTime,
    ends: [u32; FIELDS],
    has_account: bool,
    text: Box<str>,
}

impl LiveEntry {
    fn new(s: &ServedSession) -> LiveEntry {
        let fields = fields_of(s);
        let mut text = String::with_capacity(fields.iter().map(|f| f.len()).sum());
        let mut ends = [0u32; FIELDS];
        for (end, f) in ends.iter_mut().zip(fields) {
            text.push_str(f);
            *end = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        LiveEntry {
            started: s.started,
            ends,
            has_account: s.account.is_some(),
            text: text.into_boxed_str(),
        }
    }

    fn field(&self, i: usize) -> &str {
        field_of(&self.text, 0, |k| self.ends[k] as usize, i)
    }

    fn session_id(&self) -> &str {
        self.field(0)
    }

    /// Whether `key` is its id or one of its Call-IDs.
    fn has_key(&self, key: &str) -> bool {
        KEY_FIELDS.iter().any(|&i| self.field(i) == key)
    }

    fn session(&self) -> ServedSession {
        session_of(|i| self.field(i), self.has_account, self.started)
    }
}

/// Field `i` of `text`, which holds the fields back to back from `start`, field `k` ending
/// `end(k)` bytes after it.
fn field_of(text: &str, start: usize, end: impl Fn(usize) -> usize, i: usize) -> &str {
    let from = if i == 0 { 0 } else { end(i - 1) };
    text.get(start + from..start + end(i)).unwrap_or("")
}

/// A session as charging sees it, from its text fields in [`FIELDS`] order.
fn session_of<'a>(
    field: impl Fn(usize) -> &'a str,
    has_account: bool,
    started: SystemTime,
) -> ServedSession {
    ServedSession {
        session_id: field(0).to_owned(),
        subscriber: field(1).to_owned(),
        service: field(2).to_owned(),
        server: field(3).to_owned(),
        account: has_account.then(|| field(4).to_owned()),
        server_call_id: field(5).to_owned(),
        terminal_call_id: field(6).to_owned(),
        started,
    }
}

/// A session's text fields in [`FIELDS`] order.
fn fields_of(s: &ServedSession) -> [&str; FIELDS] {
    [
        s.session_id.as_str(),
        &s.subscriber,
        &s.service,
        &s.server,
        s.account.as_deref().unwrap_or(""),
        &s.server_call_id,
        &s.terminal_call_id,
    ]
}

/// How many text fields a session has in the index ([`LiveEntry`]), in this order: session id, subscriber, service, server, account, server Call-ID, terminal
/// Call-ID.
const FIELDS: usize = 7;

/// Which of those fields it is found by: its id and both Call-IDs.
const KEY_FIELDS: [usize; 3] = [0, 5, 6];

/// Which server serves which session, and which subscribers each server has served.
///
/// A session is findable from the moment its server answered 2xx — the terminal may use its
/// data connection before its ACK reaches the relay, and the server may charge for it — until
/// its record is committed, by its id and by both Call-IDs. Those keys are kept as 64-bit
/// keyed hashes (SipHash with a random key), sharded by hash: no string is copied per key and
/// no lock is shared by all calls. A lookup checks the key against the session found, so a
/// collision of two hashes can only make a key unfindable, never find the wrong session.
pub struct ServedIndex {
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
    fn default() -> Self {
        ServedIndex {
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
    /// both Call-IDs. A Call-ID a later segment shares with an earlier one leads to the
    /// later.
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
        let entry = Arc::new(LiveEntry::new(&s));
        for key in keys_of(&s) {
            let hash = self.hash(key);
            self.shard(hash).by_key.insert(hash, Arc::clone(&entry));
        }
    }

    /// Forgets a session (segment) whose record is committed: from now on a charge for it
    /// is checked against that record. The keys it shares with a later segment stay that
    /// segment's.
    pub fn remove(&self, session_id: &str) {
        let Some(s) = self.live(session_id) else {
            return;
        };
        for hash in KEY_FIELDS.map(|i| self.hash(s.field(i))) {
            let mut shard = self.shard(hash);
            let mine = shard
                .by_key
                .get(&hash)
                .is_some_and(|e| e.session_id() == s.session_id());
            if mine {
                shard.by_key.remove(&hash);
                shard.give_back_room();
            }
        }
    }

    /// The session with this id.
    fn live(&self, session_id: &str) -> Option<Arc<LiveEntry>> {
        let hash = self.hash(session_id);
        let shard = self.shard(hash);
        shard
            .by_key
            .get(&hash)
            .filter(|s| s.session_id() == session_id)
            .cloned()
    }

    /// The session with this id or Call-ID, until its record is committed.
    pub fn find(&self, key: &str) -> Option<ServedSession> {
        let hash = self.hash(key);
        let entry = self.shard(hash).by_key.get(&hash).cloned()?;
        entry.has_key(key).then(|| entry.session())
    }

    /// Every session in the index, each once, by session id.
    pub fn live_sessions(&self) -> Vec<ServedSession> {
        let mut out: Vec<ServedSession> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            // Each session is under three keys: take it under its id's.
            out.extend(
                shard
                    .by_key
                    .iter()
                    .filter(|(hash, s)| **hash == self.hash(s.session_id()))
                    .map(|(_, s)| s.session()),
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

    /// How many keys the index holds (three per session).
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
    use std::time::Duration;

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
    fn a_session_is_found_by_id_and_both_call_ids_until_it_is_removed() {
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
        for key in ["s1", "b-c1", "a-c1"] {
            assert_eq!(index.find(key), None, "{key}");
        }
        assert!(index.is_empty());
        // Whom its server served is remembered.
        assert_eq!(
            index.server_that_served("as1", "alice").as_deref(),
            Some("sip:127.0.0.1:5080")
        );
        assert_eq!(index.server_that_served("as1", "bob"), None);
        // Another account that registered the same URI has served nobody.
        assert_eq!(index.server_that_served("as2", "alice"), None);
    }

    #[test]
    fn removing_an_earlier_segment_leaves_the_later_one_its_call_ids() {
        let index = ServedIndex::default();
        index.insert(served("s1", "c1"));
        // A change opened a new segment of the same call (same Call-IDs here); the old one
        // ended after it, as its record is committed once the new one's is.
        index.insert(served("s2", "c1"));
        index.remove("s1");
        assert!(index.find("s1").is_none());
        assert_eq!(
            index.find("a-c1").map(|s| s.session_id),
            Some("s2".to_string())
        );
        assert_eq!(
            index.find("b-c1").map(|s| s.session_id),
            Some("s2".to_string())
        );
        index.remove("s2");
        assert!(index.is_empty());
    }

    #[test]
    fn sessions_over_every_shard_are_found_by_their_own_keys_only_and_all_removed() {
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
        // Removing an unknown or already removed session changes nothing.
        index.remove("s1");
        index.remove("nobody");
        assert!(index.is_empty());
    }

    #[test]
    fn live_sessions_lists_each_session_once_and_no_removed_one() {
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
    fn a_peaks_room_is_given_back_once_its_sessions_are_removed() {
        let index = ServedIndex::default();
        let room = |index: &ServedIndex| -> usize {
            index
                .shards
                .iter()
                .map(|s| {
                    s.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .by_key
                        .capacity()
                })
                .sum()
        };
        let idle = room(&index);
        for i in 0..20_000 {
            index.insert(served(&format!("s{i}"), &format!("c{i}")));
        }
        let peak = room(&index);
        assert!(peak > 60_000, "{peak}");
        for i in 0..20_000 {
            index.remove(&format!("s{i}"));
        }
        assert!(index.is_empty());
        let after = room(&index);
        assert!(
            after <= idle + SERVED_SHARDS * 2 * KEEP_ROOM,
            "room kept after the peak: {after} (peak {peak}, idle {idle})"
        );
    }

    #[test]
    fn a_session_is_found_whole_by_each_key() {
        let index = ServedIndex::default();
        let n = 1500;
        let session = |i: usize| {
            let mut s = served(&format!("s-{i}"), &format!("call-{i}@host"));
            // Fields of every length, and sessions with and without an account.
            s.subscriber = format!("user{}", "x".repeat(i % 7));
            s.account = (i % 3 != 0).then(|| format!("as{i}"));
            s.started = SystemTime::UNIX_EPOCH + Duration::from_millis(i as u64);
            s
        };
        for i in 0..n {
            index.insert(session(i));
        }
        for i in (0..n).step_by(7) {
            let want = session(i);
            for key in keys_of(&want) {
                assert_eq!(index.find(key).as_ref(), Some(&want), "{key}");
            }
        }
        assert_eq!(index.live_sessions().len(), n);
    }
}
