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

/// What a key of the index leads to.
#[derive(Clone)]
enum Slot {
    /// A live session (or segment), under each of its three keys.
    Live(Arc<LiveEntry>),
    /// An ended one, by its number in [`EndedStore`].
    Ended(u64),
}

/// One shard of the index: the sessions whose keys hash here, by key hash.
#[derive(Default)]
struct ServedShard {
    by_key: HashMap<u64, Slot>,
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

/// How many ended sessions one [`Chunk`] of the ended store holds.
const CHUNK_RECORDS: usize = 512;

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

/// An ended session kept for the late-charge grace, in a fixed-size record whose text lies
/// in its chunk's buffer: after a peak of calls, what the grace keeps is a few large
/// allocations, not several small ones per session scattered over the pages the calls
/// used (each of which would keep a page from going back to the system).
struct EndedRecord {
    /// When it ended.
    at: Instant,
    /// When its billing segment started.
    started: SystemTime,
    /// The index hashes of its three keys (id, server leg's and terminal's Call-IDs).
    keys: [u64; 3],
    /// Where its text starts in the chunk's buffer.
    start: u32,
    /// The ends of its fields, counted from `start`, in [`FIELDS`] order.
    ends: [u16; FIELDS],
    /// Whether it has an account (the account field is empty otherwise).
    has_account: bool,
}

/// How many text fields a session has in the index ([`LiveEntry`], [`EndedRecord`]), in
/// this order: session id, subscriber, service, server, account, server Call-ID, terminal
/// Call-ID.
const FIELDS: usize = 7;

/// Which of those fields it is found by: its id and both Call-IDs.
const KEY_FIELDS: [usize; 3] = [0, 5, 6];

/// Up to [`CHUNK_RECORDS`] ended sessions, numbered from `first`, and their text.
struct Chunk {
    first: u64,
    records: Vec<EndedRecord>,
    text: String,
}

impl Chunk {
    fn field(&self, r: &EndedRecord, i: usize) -> &str {
        field_of(&self.text, r.start as usize, |k| usize::from(r.ends[k]), i)
    }

    fn session(&self, r: &EndedRecord) -> ServedSession {
        session_of(|i| self.field(r, i), r.has_account, r.started)
    }
}

/// The ended sessions still findable, oldest first, in chunks: numbered in the order they
/// ended, and forgotten in that order (one grace period for all), a whole chunk given back
/// once its last one is forgotten.
#[derive(Default)]
struct EndedStore {
    chunks: VecDeque<Chunk>,
    /// The number of the oldest session not yet forgotten.
    oldest: u64,
    /// The number the next ended session gets.
    next: u64,
}

impl EndedStore {
    /// Keeps `s`, ended at `at`, under `keys`; its number, or `None` if its text is too
    /// long for a record (never for what admission lets in: Call-IDs of at most 256 bytes).
    fn push(&mut self, s: &LiveEntry, keys: [u64; 3], at: Instant) -> Option<u64> {
        let fields: [&str; FIELDS] = std::array::from_fn(|i| s.field(i));
        let mut ends = [0u16; FIELDS];
        let mut len = 0usize;
        for (end, f) in ends.iter_mut().zip(fields) {
            len += f.len();
            *end = u16::try_from(len).ok()?;
        }
        if self
            .chunks
            .back()
            .is_none_or(|c| c.records.len() == CHUNK_RECORDS)
        {
            self.chunks.push_back(Chunk {
                first: self.next,
                records: Vec::with_capacity(CHUNK_RECORDS),
                text: String::with_capacity(CHUNK_RECORDS * 128),
            });
        }
        let chunk = self.chunks.back_mut()?;
        let start = u32::try_from(chunk.text.len()).ok()?;
        for f in fields {
            chunk.text.push_str(f);
        }
        chunk.records.push(EndedRecord {
            at,
            started: s.started,
            keys,
            start,
            ends,
            has_account: s.has_account,
        });
        let seq = self.next;
        self.next += 1;
        Some(seq)
    }

    /// The chunk and record of session number `seq`, if not forgotten.
    fn get(&self, seq: u64) -> Option<(&Chunk, &EndedRecord)> {
        if seq < self.oldest {
            return None;
        }
        let front = self.chunks.front()?.first;
        let i = usize::try_from(seq.checked_sub(front)?).ok()?;
        let chunk = self.chunks.get(i / CHUNK_RECORDS)?;
        Some((chunk, chunk.records.get(i % CHUNK_RECORDS)?))
    }
}

/// Which server serves which session, and which subscribers each server has served.
///
/// A session is findable from the moment its server answered 2xx — the terminal may use its
/// data connection before its ACK reaches the relay, and the server may charge for it — until
/// the grace period after it ended, by its id and by both Call-IDs. Those keys are kept as
/// 64-bit keyed hashes (SipHash with a random key), sharded by hash: no string is copied per
/// key and no lock is shared by all calls. A lookup checks the key against the session
/// found, so a collision of two hashes can only make a key unfindable, never find the wrong
/// session. A live session's entry is the call's; once it ends, it is moved into the ended
/// store's compact records until the grace period is over.
pub struct ServedIndex {
    grace: Duration,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<ServedShard>>,
    /// Sessions ended within the grace period. Lock order: this, then a shard; never the
    /// other way round.
    ended: Mutex<EndedStore>,
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
            ended: Mutex::new(EndedStore::default()),
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

    fn ended(&self) -> std::sync::MutexGuard<'_, EndedStore> {
        // Pushes and pops whole records: a poisoned lock holds no half-done one.
        self.ended.lock().unwrap_or_else(|p| p.into_inner())
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
        let entry = Arc::new(LiveEntry::new(&s));
        for key in keys_of(&s) {
            let hash = self.hash(key);
            self.shard(hash)
                .by_key
                .insert(hash, Slot::Live(Arc::clone(&entry)));
        }
    }

    /// Marks a session (segment) ended; it stays findable for the grace period, moved out
    /// of the call's entry into a compact record.
    pub fn remove(&self, session_id: &str) {
        self.remove_at(session_id, Instant::now());
    }

    /// [`ServedIndex::remove`] at `now`.
    fn remove_at(&self, session_id: &str, now: Instant) {
        let Some(s) = self.live(session_id) else {
            return;
        };
        let keys = KEY_FIELDS.map(|i| self.hash(s.field(i)));
        let seq = self.ended().push(&s, keys, now);
        for hash in keys {
            let mut shard = self.shard(hash);
            let mine = matches!(
                shard.by_key.get(&hash),
                Some(Slot::Live(e)) if e.session_id() == s.session_id()
            );
            if mine {
                match seq {
                    Some(seq) => shard.by_key.insert(hash, Slot::Ended(seq)),
                    None => shard.by_key.remove(&hash),
                };
            }
        }
    }

    /// The live (not ended) session with this id.
    fn live(&self, session_id: &str) -> Option<Arc<LiveEntry>> {
        let hash = self.hash(session_id);
        let shard = self.shard(hash);
        match shard.by_key.get(&hash) {
            Some(Slot::Live(s)) if s.session_id() == session_id => Some(Arc::clone(s)),
            _ => None,
        }
    }

    /// The session with this id or Call-ID (live, or ended within the grace period).
    pub fn find(&self, key: &str) -> Option<ServedSession> {
        let hash = self.hash(key);
        let slot = self.shard(hash).by_key.get(&hash).cloned()?;
        match slot {
            Slot::Live(s) => s.has_key(key).then(|| s.session()),
            Slot::Ended(seq) => {
                let ended = self.ended();
                let (chunk, record) = ended.get(seq)?;
                let found = chunk.session(record);
                keys_of(&found).contains(&key).then_some(found)
            }
        }
    }

    /// Every live (not ended) session, each once, by session id.
    pub fn live_sessions(&self) -> Vec<ServedSession> {
        let mut out: Vec<ServedSession> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(shard.by_key.iter().filter_map(|(hash, slot)| match slot {
                // Each session is under three keys: take it under its id's.
                Slot::Live(s) if *hash == self.hash(s.session_id()) => Some(s.session()),
                _ => None,
            }));
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

    /// Forgets what ended more than the grace period before `now`, and gives back the room
    /// of a peak. Done by the relay's housekeeping every second, so that an idle relay gives
    /// the memory back too.
    pub fn forget_expired(&self, now: Instant) {
        let mut ended = self.ended();
        let mut forgot = false;
        while ended.oldest < ended.next {
            let seq = ended.oldest;
            let Some((_, record)) = ended.get(seq) else {
                break;
            };
            if now.saturating_duration_since(record.at) < self.grace {
                break;
            }
            for hash in record.keys {
                let mut shard = self.shard(hash);
                // A key may have moved on to a later segment of the same call: keep that.
                if matches!(shard.by_key.get(&hash), Some(Slot::Ended(s)) if *s == seq) {
                    shard.by_key.remove(&hash);
                }
            }
            ended.oldest += 1;
            forgot = true;
            let done = ended
                .chunks
                .front()
                .is_some_and(|c| ended.oldest >= c.first + CHUNK_RECORDS as u64);
            if done {
                ended.chunks.pop_front();
            }
        }
        if ended.oldest == ended.next {
            // Nothing left to find: the last, partly filled chunk goes too.
            ended.chunks.clear();
        }
        if ended.chunks.capacity() > 64 && ended.chunks.len() < ended.chunks.capacity() / 4 {
            let keep = (ended.chunks.len() * 2).max(16);
            ended.chunks.shrink_to(keep);
        }
        drop(ended);
        if forgot {
            for shard in &self.shards {
                shard
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .give_back_room();
            }
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
            let keys: usize = index
                .shards
                .iter()
                .map(|s| {
                    s.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .by_key
                        .capacity()
                })
                .sum();
            let ended = index.ended();
            let records: usize = ended.chunks.iter().map(|c| c.records.capacity()).sum();
            keys + records + ended.chunks.capacity()
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

    #[test]
    fn a_session_is_found_whole_live_and_ended_until_its_grace_is_over_in_order() {
        let grace = Duration::from_secs(60);
        let index = ServedIndex::with_grace(grace);
        let t0 = Instant::now();
        let n = 3 * CHUNK_RECORDS - 36;
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
        // Live, each is found whole by each of its keys, and listed once.
        for i in (0..n).step_by(7) {
            let want = session(i);
            for key in keys_of(&want) {
                assert_eq!(index.find(key).as_ref(), Some(&want), "{key}");
            }
        }
        assert_eq!(index.live_sessions().len(), n);
        for i in 0..n {
            index.remove_at(&format!("s-{i}"), t0 + Duration::from_millis(i as u64));
        }
        // Ended, each is found whole by each of its keys.
        for i in 0..n {
            let want = session(i);
            for key in keys_of(&want) {
                assert_eq!(index.find(key).as_ref(), Some(&want), "{key}");
            }
        }
        assert!(index.live_sessions().is_empty());
        // The grace is over for the first 701 (ended at t0 + 0..=700 ms), not for the rest.
        index.forget_expired(t0 + grace + Duration::from_millis(700));
        for i in 0..n {
            let found = index.find(&format!("b-call-{i}@host"));
            if i <= 700 {
                assert_eq!(found, None, "{i}");
            } else {
                assert_eq!(found, Some(session(i)), "{i}");
            }
        }
        assert_eq!(index.len(), 3 * (n - 701));
        // The first chunk went back whole; the second, half forgotten, stays.
        assert_eq!(index.ended().chunks.len(), 2);
        index.forget_expired(t0 + grace + Duration::from_secs(10));
        assert!(index.is_empty());
        assert!(index.ended().chunks.is_empty());
        // Numbers go on after everything was forgotten.
        index.insert(session(n));
        index.remove_at(&format!("s-{n}"), t0 + grace + Duration::from_secs(11));
        assert_eq!(index.find(&format!("s-{n}")), Some(session(n)));
    }
}
