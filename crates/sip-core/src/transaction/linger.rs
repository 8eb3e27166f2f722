//! Non-INVITE server transactions in their Completed state over an unreliable transport,
//! kept compactly for Timer J (RFC 3261 §17.2.2).
//!
//! Once a non-INVITE server transaction has sent its final response, all it does for the
//! 64·T1 of Timer J is send that response again when the request is retransmitted. Kept as
//! a whole transaction (boxed, with its key's strings in two tables and its timer entry)
//! that took about twice what the response itself takes, for 32 s after every REGISTER,
//! BYE, MESSAGE or OPTIONS answered over UDP. Here it is a keyed 128-bit hash of its key,
//! where the response goes, the response, and when Timer J fires: one table entry and one
//! entry of a queue in the order they fire (Timer J is the same for all).

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::Instant;

use bytes::Bytes;

use super::matching::ServerKey;
use crate::Peer;

/// A completed non-INVITE transaction: where its final response went, the response, and
/// when it ends (Timer J).
#[derive(Debug)]
struct Completed {
    to: Peer,
    response: Bytes,
    until: Instant,
}

/// The completed non-INVITE server transactions of a layer, by their key's hash.
///
/// Keys are hashed twice with SipHash under two random keys into 128 bits: telling two
/// transactions apart by that alone takes a collision no sender can aim for (the keys are
/// chosen at start-up and never leave the process), and the strings of each key are not
/// kept.
#[derive(Debug)]
pub(super) struct Lingering {
    by_key: HashMap<u128, Completed>,
    /// Keys in the order their Timer J fires; an entry whose key was answered again later
    /// (a new transaction with the same key) is skipped when its time comes.
    queue: VecDeque<(Instant, u128)>,
    hashers: [std::collections::hash_map::RandomState; 2],
}

impl Default for Lingering {
    fn default() -> Self {
        Lingering {
            by_key: HashMap::new(),
            queue: VecDeque::new(),
            hashers: [
                std::collections::hash_map::RandomState::new(),
                std::collections::hash_map::RandomState::new(),
            ],
        }
    }
}

/// The room the tables keep however few entries they hold.
const KEEP_ROOM: usize = 256;

impl Lingering {
    fn hash(&self, key: &ServerKey) -> u128 {
        let [a, b] = &self.hashers;
        let hi = a.hash_one(key);
        let lo = b.hash_one(key);
        (u128::from(hi) << 64) | u128::from(lo)
    }

    /// Keeps a transaction that sent `response` to `to`, until `until` (Timer J).
    pub fn insert(&mut self, key: &ServerKey, to: Peer, response: Bytes, until: Instant) {
        let hash = self.hash(key);
        self.by_key.insert(
            hash,
            Completed {
                to,
                response,
                until,
            },
        );
        self.queue.push_back((until, hash));
    }

    /// The response to send again for a retransmission of the request with `key`, and
    /// where it goes, if such a transaction is completed and not yet ended.
    pub fn response_for(&self, key: &ServerKey) -> Option<(Peer, Bytes)> {
        self.by_key
            .get(&self.hash(key))
            .map(|c| (c.to, c.response.clone()))
    }

    /// Ends the transactions whose Timer J is due at `now`.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(at, hash)) = self.queue.front() {
            if at > now {
                break;
            }
            self.queue.pop_front();
            if self.by_key.get(&hash).is_some_and(|c| c.until == at) {
                self.by_key.remove(&hash);
            }
        }
        if self.by_key.capacity() > KEEP_ROOM && self.by_key.len() < self.by_key.capacity() / 4 {
            self.by_key
                .shrink_to((self.by_key.len() * 2).max(KEEP_ROOM / 2));
        }
        if self.queue.capacity() > KEEP_ROOM && self.queue.len() < self.queue.capacity() / 4 {
            self.queue
                .shrink_to((self.queue.len() * 2).max(KEEP_ROOM / 2));
        }
    }

    /// When the next one ends, if any: the earliest entry of the queue (one that was
    /// replaced may come first; firing it then ends nothing).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.front().map(|&(at, _)| at)
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// What the tables have room for (for tests of giving room back).
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.by_key.capacity() + self.queue.capacity()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::message::Summary;
    use rsip::Method;
    use std::time::Duration;

    fn key(branch: &str, method: Method) -> ServerKey {
        let mut summary = Summary {
            branch: branch.to_owned(),
            sent_by: "192.0.2.1:5060".to_owned(),
            call_id: "c".to_owned(),
            cseq: 1,
            cseq_method: method,
            from_tag: None,
            to_tag: None,
        };
        ServerKey::new(&mut summary, method)
    }

    fn peer() -> Peer {
        Peer::udp("192.0.2.1:5060".parse().unwrap())
    }

    #[test]
    fn a_completed_transaction_answers_its_own_key_until_timer_j() {
        let mut l = Lingering::default();
        let t0 = Instant::now();
        let j = Duration::from_secs(32);
        l.insert(
            &key("z9hG4bK1", Method::Register),
            peer(),
            Bytes::from_static(b"200"),
            t0 + j,
        );
        assert_eq!(
            l.response_for(&key("z9hG4bK1", Method::Register)),
            Some((peer(), Bytes::from_static(b"200")))
        );
        // Another branch, or the same branch with another method, is another transaction.
        assert_eq!(l.response_for(&key("z9hG4bK2", Method::Register)), None);
        assert_eq!(l.response_for(&key("z9hG4bK1", Method::Bye)), None);
        assert_eq!(l.next_deadline(), Some(t0 + j));
        l.expire(t0 + j - Duration::from_millis(1));
        assert_eq!(l.len(), 1);
        l.expire(t0 + j);
        assert!(l.is_empty() && l.next_deadline().is_none());
    }

    #[test]
    fn a_key_answered_again_keeps_its_later_end() {
        let mut l = Lingering::default();
        let t0 = Instant::now();
        let k = key("z9hG4bK1", Method::Options);
        l.insert(
            &k,
            peer(),
            Bytes::from_static(b"first"),
            t0 + Duration::from_secs(1),
        );
        l.insert(
            &k,
            peer(),
            Bytes::from_static(b"second"),
            t0 + Duration::from_secs(2),
        );
        l.expire(t0 + Duration::from_secs(1));
        assert_eq!(
            l.response_for(&k).map(|(_, r)| r),
            Some(Bytes::from_static(b"second"))
        );
        l.expire(t0 + Duration::from_secs(2));
        assert!(l.is_empty());
    }

    #[test]
    fn a_peaks_room_is_given_back() {
        let mut l = Lingering::default();
        let t0 = Instant::now();
        for i in 0..20_000u64 {
            l.insert(
                &key(&format!("z9hG4bK{i}"), Method::Register),
                peer(),
                Bytes::from_static(b"200"),
                t0 + Duration::from_millis(i),
            );
        }
        assert!(l.capacity() >= 40_000);
        l.expire(t0 + Duration::from_secs(60));
        assert!(l.is_empty());
        assert!(l.capacity() <= 2 * KEEP_ROOM, "{}", l.capacity());
    }
}
