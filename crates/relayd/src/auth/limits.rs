//! Limits on failed digest answers in the pike / fail2ban tradition (issue 14, findings 2
//! and 3): failures are counted per source address, and per (user, source address) for
//! users that exist, never per user name alone, so a stranger can get only its own address
//! refused, never lock a user out for everyone.
//!
//! * A *source* is an IPv4 address, or the /64 prefix of an IPv6 address (one host usually
//!   holds a whole /64, RFC 4291 §2.5.1, and would otherwise count as 2^64 sources). An
//!   IPv4-mapped IPv6 address counts as its IPv4 address.
//! * Each failure adds a *weight*: one whole failure over TCP or TLS, where the source has
//!   completed a handshake, and `udp_weight_percent` of one over UDP, whose source address
//!   anyone can forge (RFC 3261 §26.1.5); a forger must then send more to get a victim's
//!   address refused.
//! * A [`Rule`] says how many failures within a window refuse the key, and for how long
//!   (fail2ban's `maxretry`, `findtime` and `bantime`).
//! * Tables are bounded: each holds at most a configured number of keys, over shards picked
//!   by a keyed hash (std's `RandomState`, a random SipHash key per process, so an attacker
//!   cannot aim at one shard), each shard a `HashMap` with its own random key. When a shard
//!   is full the key inserted longest ago goes (first in, first out, in O(1)); a key that is
//!   refused right now gets a second chance before an idle one. Every failure costs O(1):
//!   one hash, one map operation, at most a few queue operations. [`Table::prune`], called
//!   now and then, drops what has expired.
//! * User names are never stored: a user's key is a keyed 64-bit hash of the name (and the
//!   relay inserts one only for a name that has credentials), so neither the length nor
//!   the number of names an attacker sends costs memory.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sip_core::Transport;

/// Shards per table; keys are spread over them by a keyed hash.
const SHARDS: usize = 16;

/// How many refused keys a full shard passes over (back to the end of the queue) before it
/// evicts one anyway.
const SECOND_CHANCES: usize = 4;

/// The weight of one failure over TCP or TLS; a UDP failure weighs `udp_weight_percent`
/// hundredths of it.
pub const WHOLE_FAILURE: u32 = 100;

/// Where failed attempts come from: an IPv4 address or an IPv6 /64 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// An IPv4 address (also an IPv4-mapped IPv6 one).
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6Prefix(u64),
}

impl SourceKey {
    /// The source `ip` counts as.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(u32::from(v4)),
                None => SourceKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// The weight of one failure over `transport`: [`WHOLE_FAILURE`] over TCP and TLS,
/// `udp_weight_percent` (1 to 100) over UDP.
pub fn weight(transport: Transport, udp_weight_percent: u32) -> u32 {
    match transport {
        Transport::Udp => udp_weight_percent.clamp(1, WHOLE_FAILURE),
        Transport::Tcp | Transport::Tls => WHOLE_FAILURE,
    }
}

/// When a key is refused: `max_failures` whole failures (weights adding up to
/// `max_failures` × [`WHOLE_FAILURE`]) within `window` of the first refuse it for `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Whole failures that refuse the key (at least 1).
    pub max_failures: u32,
    /// How long failures are counted from the first of a run.
    pub window: Duration,
    /// How long the key stays refused.
    pub block: Duration,
}

impl Rule {
    fn threshold(&self) -> u32 {
        self.max_failures.max(1).saturating_mul(WHOLE_FAILURE)
    }
}

/// What a failure did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counted {
    /// The key was refused by this very failure.
    pub newly_refused: bool,
    /// Keys evicted to make room for this one.
    pub evicted: u64,
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    /// Weights added since `since`.
    score: u32,
    /// The first failure of the current window.
    since: Instant,
    /// Refused until then.
    refused_until: Option<Instant>,
}

impl Counter {
    fn refused_at(&self, now: Instant) -> Option<Instant> {
        self.refused_until.filter(|until| now < *until)
    }

    fn fail(&mut self, weight: u32, rule: &Rule, now: Instant) -> bool {
        if self.refused_at(now).is_some() {
            // Failures while refused neither count nor lengthen the refusal.
            return false;
        }
        if self.refused_until.take().is_some()
            || now.saturating_duration_since(self.since) >= rule.window
        {
            self.score = 0;
            self.since = now;
        }
        self.score = self.score.saturating_add(weight);
        if self.score < rule.threshold() {
            return false;
        }
        self.score = 0;
        // A block too long for the clock (the configuration bounds it) is no refusal.
        self.refused_until = now.checked_add(rule.block);
        self.refused_until.is_some()
    }

    fn expired(&self, rule: &Rule, now: Instant) -> bool {
        self.refused_at(now).is_none()
            && (self.score == 0 || now.saturating_duration_since(self.since) >= rule.window)
    }
}

struct Shard<K> {
    map: HashMap<K, Counter>,
    /// Every key of `map` once, oldest insertion first.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone> Shard<K> {
    /// Evicts until there is room for one more key; how many went.
    fn make_room(&mut self, cap: usize, now: Instant) -> u64 {
        let mut evicted = 0;
        let mut spared = 0;
        while self.map.len() >= cap {
            let Some(key) = self.order.pop_front() else {
                break;
            };
            let refused = self
                .map
                .get(&key)
                .is_some_and(|c| c.refused_at(now).is_some());
            if refused && spared < SECOND_CHANCES {
                spared += 1;
                self.order.push_back(key);
                continue;
            }
            self.map.remove(&key);
            evicted += 1;
        }
        evicted
    }
}

/// A bounded table of failure counters by key (see the [module documentation](self)).
pub struct Table<K> {
    shards: Vec<Mutex<Shard<K>>>,
    pick: RandomState,
    cap_per_shard: usize,
}

impl<K: Hash + Eq + Clone> Table<K> {
    /// A table holding at most `capacity` keys (at least one per shard).
    pub fn new(capacity: usize) -> Table<K> {
        Table {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        order: VecDeque::new(),
                    })
                })
                .collect(),
            pick: RandomState::new(),
            cap_per_shard: (capacity / SHARDS).max(1),
        }
    }

    /// The most keys it holds.
    pub fn capacity(&self) -> usize {
        self.cap_per_shard * SHARDS
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K>> {
        let index = (self.pick.hash_one(key) % SHARDS as u64) as usize;
        // A poisoned lock only means another task panicked mid-update of a plain map.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Until when `key` is refused, if it is at `now`. Stores nothing.
    pub fn refused_until(&self, key: &K, now: Instant) -> Option<Instant> {
        self.shard(key).map.get(key).and_then(|c| c.refused_at(now))
    }

    /// Counts a failure of `weight` for `key` under `rule`, inserting the key (and evicting
    /// the oldest of its shard when full).
    pub fn fail(&self, key: K, weight: u32, rule: &Rule, now: Instant) -> Counted {
        let cap = self.cap_per_shard;
        let mut shard = self.shard(&key);
        let mut evicted = 0;
        if !shard.map.contains_key(&key) {
            evicted = shard.make_room(cap, now);
            shard.order.push_back(key.clone());
        }
        let counter = shard.map.entry(key).or_insert(Counter {
            score: 0,
            since: now,
            refused_until: None,
        });
        Counted {
            newly_refused: counter.fail(weight, rule, now),
            evicted,
        }
    }

    /// Forgets the failures of `key` (after a success), keeping any refusal in force. The
    /// key stays in place (its slot in the queue with it) until evicted or pruned.
    pub fn reset(&self, key: &K) {
        if let Some(c) = self.shard(key).map.get_mut(key) {
            c.score = 0;
        }
    }

    /// Drops the keys that are neither refused nor counting within `rule`'s window.
    pub fn prune(&self, rule: &Rule, now: Instant) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.map.retain(|_, c| !c.expired(rule, now));
            let Shard { map, order } = &mut *shard;
            order.retain(|k| map.contains_key(k));
        }
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len())
            .sum()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A keyed 64-bit hash of a user name, the name's stand-in in the (user, source) table:
/// `RandomState` gives every process its own SipHash key.
pub struct UserKeys(RandomState);

impl UserKeys {
    /// Keys under a fresh random key.
    pub fn new() -> UserKeys {
        UserKeys(RandomState::new())
    }

    /// The key of `user`.
    pub fn of(&self, user: &str) -> u64 {
        self.0.hash_one(user)
    }
}

impl Default for UserKeys {
    fn default() -> Self {
        UserKeys::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const RULE: Rule = Rule {
        max_failures: 3,
        window: Duration::from_secs(60),
        block: Duration::from_secs(300),
    };

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_prefixes() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(SourceKey::of(a), SourceKey::of(b), "one /64");
        assert_ne!(SourceKey::of(a), SourceKey::of(c));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(
            SourceKey::of(mapped),
            SourceKey::of(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)))
        );
        assert_ne!(
            SourceKey::of(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            SourceKey::of(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    #[test]
    fn failures_within_the_window_refuse_then_the_refusal_lapses() {
        let table = Table::new(64);
        let t0 = Instant::now();
        let key = SourceKey::V4(1);
        let w = WHOLE_FAILURE;
        assert!(!table.fail(key, w, &RULE, t0).newly_refused);
        assert!(!table.fail(key, w, &RULE, t0).newly_refused);
        assert!(table.refused_until(&key, t0).is_none());
        assert!(table.fail(key, w, &RULE, t0).newly_refused);
        assert_eq!(table.refused_until(&key, t0), Some(t0 + RULE.block));
        // More failures while refused change nothing.
        let t1 = t0 + Duration::from_secs(100);
        assert!(!table.fail(key, w, &RULE, t1).newly_refused);
        assert_eq!(table.refused_until(&key, t1), Some(t0 + RULE.block));
        let t2 = t0 + RULE.block;
        assert!(table.refused_until(&key, t2).is_none(), "released");
        // A new run starts from nothing.
        assert!(!table.fail(key, w, &RULE, t2).newly_refused);
        assert!(!table.fail(key, w, &RULE, t2).newly_refused);
        assert!(table.refused_until(&key, t2).is_none());
    }

    #[test]
    fn failures_older_than_the_window_are_forgotten() {
        let table = Table::new(64);
        let t0 = Instant::now();
        let key = SourceKey::V4(2);
        table.fail(key, WHOLE_FAILURE, &RULE, t0);
        table.fail(key, WHOLE_FAILURE, &RULE, t0);
        let late = t0 + RULE.window;
        assert!(!table.fail(key, WHOLE_FAILURE, &RULE, late).newly_refused);
        assert!(table.refused_until(&key, late).is_none());
    }

    #[test]
    fn udp_failures_weigh_less() {
        assert_eq!(weight(Transport::Tcp, 50), WHOLE_FAILURE);
        assert_eq!(weight(Transport::Tls, 50), WHOLE_FAILURE);
        assert_eq!(weight(Transport::Udp, 50), 50);
        assert_eq!(weight(Transport::Udp, 0), 1, "never free");
        assert_eq!(weight(Transport::Udp, 500), WHOLE_FAILURE, "never more");
        let table = Table::new(64);
        let t0 = Instant::now();
        let key = SourceKey::V4(3);
        let udp = weight(Transport::Udp, 50);
        let refused_after = (1..=10)
            .find(|_| table.fail(key, udp, &RULE, t0).newly_refused)
            .unwrap_or(0);
        assert_eq!(refused_after, 6, "3 whole failures take 6 over UDP at 50 %");
    }

    #[test]
    fn a_full_table_evicts_the_oldest_idle_key_first() {
        let table = Table::new(SHARDS * 4);
        let t0 = Instant::now();
        let mut evicted = 0;
        for i in 0..10_000u32 {
            evicted += table.fail(SourceKey::V4(i), 1, &RULE, t0).evicted;
            assert!(table.len() <= table.capacity());
        }
        assert_eq!(table.len(), table.capacity());
        assert_eq!(evicted, 10_000 - table.capacity() as u64);
        // A refused key survives a flood of idle new ones (its second chances).
        let bad = SourceKey::V4(u32::MAX);
        for _ in 0..RULE.max_failures {
            table.fail(bad, WHOLE_FAILURE, &RULE, t0);
        }
        assert!(table.refused_until(&bad, t0).is_some());
        for i in 0..10_000u64 {
            table.fail(SourceKey::V6Prefix(i), 1, &RULE, t0);
        }
        assert!(table.refused_until(&bad, t0).is_some());
        assert_eq!(table.len(), table.capacity());
    }

    #[test]
    fn pruning_keeps_what_still_counts() {
        let table = Table::new(64);
        let t0 = Instant::now();
        for i in 0..3 {
            table.fail(SourceKey::V4(10), WHOLE_FAILURE, &RULE, t0);
            table.fail(SourceKey::V4(20 + i), WHOLE_FAILURE, &RULE, t0);
        }
        let later = t0 + RULE.window;
        table.prune(&RULE, later);
        assert_eq!(table.len(), 1, "only the refused key is left");
        assert!(table.refused_until(&SourceKey::V4(10), later).is_some());
        table.prune(&RULE, t0 + RULE.block);
        assert!(table.is_empty());
        // Reset forgets a count but keeps the key.
        table.fail(SourceKey::V4(30), WHOLE_FAILURE, &RULE, t0);
        table.reset(&SourceKey::V4(30));
        assert_eq!(table.len(), 1);
        table.prune(&RULE, t0);
        assert!(table.is_empty(), "a reset key has nothing left to count");
    }

    #[test]
    fn user_keys_are_stable_within_a_process() {
        let keys = UserKeys::new();
        assert_eq!(keys.of("alice"), keys.of("alice"));
        assert_ne!(keys.of("alice"), keys.of("bob"));
    }
}
