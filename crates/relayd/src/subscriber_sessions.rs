//! How many sessions each subscriber holds at once, against the limit of its class (issue 14,
//! finding 10: without one, a single subscriber could fill every application server's
//! capacity). `[[classes]] max_sessions` sets the limit per subscriber class.
//!
//! A subscriber's count is the number of slots it holds: admission takes one for each new
//! INVITE it lets through ([`SubscriberSessions::try_take`]), so that a burst of INVITEs
//! cannot all pass before the first is answered; the call keeps that slot for its first
//! session (from the server's 2xx, when the session is journaled, to its end) or gives it
//! back when its inquiry ends without one. Every further session of a forked request takes
//! a slot of its own, counted like the first (a forked answer over the limit is hung up).
//!
//! Only authenticated subscribers are ever counted, and a subscriber whose count falls back
//! to zero is forgotten, so the table holds at most one entry per subscriber with a call in
//! hand. It is sharded by a keyed hash of the name, so that calls of different subscribers
//! rarely meet on a lock: no global lock on the hot path.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The number of lock shards.
const SHARDS: usize = 64;

/// Counters of the limit, for metrics.
#[derive(Debug, Default)]
pub struct SubscriberLimitStats {
    /// INVITEs refused at admission because the subscriber held its limit.
    pub refused: AtomicU64,
    /// Answers of a forked request hung up because the subscriber held its limit.
    pub fork_answers_dropped: AtomicU64,
}

/// The per-subscriber session counts. See the [module documentation](self).
#[derive(Debug)]
pub struct SubscriberSessions {
    shards: Vec<Mutex<HashMap<String, u32>>>,
    hasher: RandomState,
    stats: SubscriberLimitStats,
}

impl Default for SubscriberSessions {
    fn default() -> Self {
        SubscriberSessions::new()
    }
}

fn lock(shard: &Mutex<HashMap<String, u32>>) -> MutexGuard<'_, HashMap<String, u32>> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SubscriberSessions {
    /// An empty table.
    pub fn new() -> SubscriberSessions {
        SubscriberSessions {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            stats: SubscriberLimitStats::default(),
        }
    }

    fn shard(&self, subscriber: &str) -> &Mutex<HashMap<String, u32>> {
        // The modulo is below the shard count, so the cast back is lossless.
        let index = self.hasher.hash_one(subscriber) % self.shards.len() as u64;
        &self.shards[usize::try_from(index).unwrap_or(0)]
    }

    /// Takes one of `subscriber`'s slots if it holds fewer than `limit`; whether it did.
    pub fn try_take(&self, subscriber: &str, limit: u32) -> bool {
        let mut shard = lock(self.shard(subscriber));
        match shard.get_mut(subscriber) {
            Some(held) if *held >= limit => false,
            Some(held) => {
                *held += 1;
                true
            }
            None if limit == 0 => false,
            None => {
                shard.insert(subscriber.to_owned(), 1);
                true
            }
        }
    }

    /// Gives back one of `subscriber`'s slots (one it took with [`Self::try_take`]).
    pub fn give_back(&self, subscriber: &str) {
        let mut shard = lock(self.shard(subscriber));
        match shard.get_mut(subscriber) {
            Some(held) if *held > 1 => *held -= 1,
            Some(_) => {
                shard.remove(subscriber);
            }
            None => {
                tracing::warn!(subscriber, "a session slot given back that was never taken");
            }
        }
    }

    /// How many slots `subscriber` holds.
    pub fn held(&self, subscriber: &str) -> u32 {
        lock(self.shard(subscriber))
            .get(subscriber)
            .copied()
            .unwrap_or(0)
    }

    /// How many subscribers hold at least one slot.
    pub fn subscribers(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// The counters.
    pub fn stats(&self) -> &SubscriberLimitStats {
        &self.stats
    }

    /// Counts an INVITE refused at admission.
    pub fn count_refusal(&self) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a forked answer hung up for the limit.
    pub fn count_fork_answer_dropped(&self) {
        self.stats
            .fork_answers_dropped
            .fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_subscriber_takes_up_to_its_limit_and_one_more_per_slot_given_back() {
        let t = SubscriberSessions::new();
        assert!(t.try_take("alice", 2));
        assert!(t.try_take("alice", 2));
        assert!(!t.try_take("alice", 2), "a third is over the limit");
        assert_eq!(t.held("alice"), 2);
        assert!(t.try_take("bob", 2), "another subscriber is unaffected");
        t.give_back("alice");
        assert!(t.try_take("alice", 2), "a slot given back lets one in");
        assert!(!t.try_take("alice", 2));
    }

    #[test]
    fn a_subscriber_holding_nothing_is_forgotten() {
        let t = SubscriberSessions::new();
        assert!(t.try_take("alice", 1));
        assert_eq!(t.subscribers(), 1);
        t.give_back("alice");
        assert_eq!(t.subscribers(), 0);
        assert_eq!(t.held("alice"), 0);
        // One too many: nothing goes below zero.
        t.give_back("alice");
        assert_eq!(t.held("alice"), 0);
        assert!(!t.try_take("alice", 0), "a limit of 0 admits nothing");
        assert_eq!(t.subscribers(), 0);
    }

    #[test]
    fn concurrent_takers_never_exceed_the_limit() {
        let t = Arc::new(SubscriberSessions::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || (0..1000).filter(|_| t.try_take("alice", 10)).count())
            })
            .collect();
        let taken: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(taken, 10);
        assert_eq!(t.held("alice"), 10);
    }
}
