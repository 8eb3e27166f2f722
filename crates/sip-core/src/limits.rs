//! Caps on connections held at once, overall and per source ([`SourceKey`]): what keeps a
//! stranger from holding every descriptor of a process (RFC 3261 §26.1.5, RFC 5626 §4.4 on
//! the cost of flows). [`ConnectionCaps::admit`] gives a [`ConnectionPermit`] that counts
//! until it is dropped, or says which cap refused.
//!
//! The table has one entry per source that holds a connection right now, so it is never
//! larger than the overall cap; an entry goes when its last connection does. One lock, held
//! for one map operation per connection opened or closed (not per message).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::source::SourceKey;

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapRefusal {
    /// Every connection allowed at once is taken.
    #[error("connection limit reached")]
    Overall,
    /// The source holds as many connections as one source may.
    #[error("per-address connection limit reached")]
    PerSource,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_source: HashMap<SourceKey, usize>,
}

/// Connections held at once, overall and per source, with their caps.
#[derive(Debug)]
pub struct ConnectionCaps {
    max_total: usize,
    max_per_source: usize,
    counts: Mutex<Counts>,
}

impl ConnectionCaps {
    /// Caps of `max_total` connections at once and `max_per_source` from one source (0 in
    /// either: no such cap).
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<ConnectionCaps> {
        Arc::new(ConnectionCaps {
            max_total,
            max_per_source,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // Every operation under the lock is one counter update: a poisoned lock is still
        // consistent.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more connection from `ip`, unless a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, CapRefusal> {
        let key = SourceKey::of(ip);
        let mut counts = self.lock();
        if self.max_total > 0 && counts.total >= self.max_total {
            return Err(CapRefusal::Overall);
        }
        let held = counts.per_source.entry(key).or_insert(0);
        if self.max_per_source > 0 && *held >= self.max_per_source {
            return Err(CapRefusal::PerSource);
        }
        *held += 1;
        counts.total += 1;
        Ok(ConnectionPermit {
            caps: Arc::clone(self),
            key,
        })
    }

    /// Connections counted right now.
    pub fn total(&self) -> usize {
        self.lock().total
    }

    /// Connections counted right now from the source of `ip`.
    pub fn from_source(&self, ip: IpAddr) -> usize {
        self.lock()
            .per_source
            .get(&SourceKey::of(ip))
            .copied()
            .unwrap_or(0)
    }

    /// Sources holding at least one connection.
    pub fn sources(&self) -> usize {
        self.lock().per_source.len()
    }

    fn release(&self, key: SourceKey) {
        let mut counts = self.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(held) = counts.per_source.get_mut(&key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.per_source.remove(&key);
            }
        }
    }
}

/// One connection counted by [`ConnectionCaps`]; dropping it gives its place back.
#[derive(Debug)]
pub struct ConnectionPermit {
    caps: Arc<ConnectionCaps>,
    key: SourceKey,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.caps.release(self.key);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_source_and_overall_and_places_come_back() {
        let caps = ConnectionCaps::new(5, 2);
        let a1 = caps.admit(ip("10.0.0.1")).unwrap();
        let _a2 = caps.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            caps.admit(ip("10.0.0.1")).unwrap_err(),
            CapRefusal::PerSource
        );
        // One IPv6 host's /64 is one source.
        let _b1 = caps.admit(ip("2001:db8::1")).unwrap();
        let _b2 = caps.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(
            caps.admit(ip("2001:db8::3")).unwrap_err(),
            CapRefusal::PerSource
        );
        let _c1 = caps.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(caps.total(), 5);
        assert_eq!(caps.admit(ip("10.0.0.4")).unwrap_err(), CapRefusal::Overall);
        drop(a1);
        assert_eq!(caps.total(), 4);
        assert_eq!(caps.from_source(ip("10.0.0.1")), 1);
        let _a3 = caps.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(caps.sources(), 3);
    }

    #[test]
    fn the_table_forgets_sources_without_connections() {
        let caps = ConnectionCaps::new(0, 0);
        let permits: Vec<_> = (0..100u8)
            .map(|i| caps.admit(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!((caps.total(), caps.sources()), (100, 100));
        drop(permits);
        assert_eq!((caps.total(), caps.sources()), (0, 0));
    }
}
