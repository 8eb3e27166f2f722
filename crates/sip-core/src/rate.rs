//! A limit on the rate of requests per source address, in the tradition of Kamailio's `pike`
//! module (RFC 3261 §26.1.5: flooding is the denial of service to expect): each source
//! ([`SourceKey`]: an IPv4 address or an IPv6 /64) has a token bucket of `burst` requests
//! refilled at `per_second`. A request past it is answered `503 Service Unavailable` with
//! `Retry-After` (RFC 3261 §21.5.4) — at most `replies_per_second` of them a second per
//! source, so a flood of forged UDP sources is not reflected at its victims — and the rest are
//! dropped unanswered. Both are counted by the caller.
//!
//! Sans-IO: every call takes the time. The table is bounded: at most `max_tracked` sources,
//! over shards picked by a keyed hash (std's `RandomState`, a random key per process, so an
//! attacker cannot aim at one shard). A full shard forgets the source it met longest ago,
//! passing over a source that is being limited right now a few times first; a forgotten
//! source starts again with a full bucket, which is what a source not seen for a while has
//! anyway. Each request costs one hash and one map operation.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::source::{Net, SourceKey};

/// Shards of the table.
const SHARDS: usize = 16;

/// How many sources being limited a full shard passes over before it forgets one anyway.
const SECOND_CHANCES: usize = 4;

/// One token, in the buckets' fixed-point unit (thousandths).
const TOKEN: u64 = 1000;

/// How many requests a source may send, and what happens past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests a second a source may send, sustained (at least 1).
    pub per_second: u32,
    /// Requests a source may send at once after a quiet time: the bucket's size (at least
    /// `per_second` is sensible).
    pub burst: u32,
    /// Over the limit, how many requests a second from one source are answered 503; the
    /// others are dropped.
    pub replies_per_second: u32,
    /// Sources the limit does not apply to.
    pub exempt: Vec<Net>,
    /// Sources tracked at once (at least [`SHARDS`]).
    pub max_tracked: usize,
}

impl Default for RateLimit {
    /// 100 requests a second per source, bursts of 200, 10 answers a second past it,
    /// loopback exempt, 65536 sources tracked.
    fn default() -> Self {
        RateLimit {
            per_second: 100,
            burst: 200,
            replies_per_second: 10,
            exempt: Net::loopback().to_vec(),
            max_tracked: 65_536,
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit (or exempt): handle it.
    Pass,
    /// Over the limit: answer it 503 with `Retry-After` of this many seconds.
    Refuse {
        /// When the source's bucket will be full again, in whole seconds (at least 1).
        retry_after: u32,
    },
    /// Over the limit, and past the answers allowed this second: drop it.
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Thousandths of a request.
    tokens: u64,
    refilled: Instant,
    /// The second (from `refilled`'s epoch) of the last refusal answered, and how many
    /// were answered in it.
    reply_window: Instant,
    replies: u32,
}

#[derive(Debug, Default)]
struct Shard {
    buckets: HashMap<SourceKey, Bucket>,
    /// Sources in the order they were first met (each once).
    order: VecDeque<SourceKey>,
}

/// The rate limiter: a bounded table of token buckets, one per source.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

impl RateLimiter {
    /// A limiter applying `limit`.
    pub fn new(limit: RateLimit) -> RateLimiter {
        let per_shard = limit.max_tracked.div_ceil(SHARDS).max(1);
        RateLimiter {
            limit,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard,
        }
    }

    /// The limit applied.
    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        // Every operation under the lock leaves the shard consistent between steps.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `ip` is exempt from the limit.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        self.limit.exempt.iter().any(|net| net.contains(ip))
    }

    /// Counts one request from `ip` at `now` and says what to do with it.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Verdict {
        if self.is_exempt(ip) {
            return Verdict::Pass;
        }
        let key = SourceKey::of(ip);
        let shard = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut shard = self.lock(shard);
        let capacity = u64::from(self.limit.burst.max(1)) * TOKEN;
        let rate = u64::from(self.limit.per_second.max(1));
        if !shard.buckets.contains_key(&key) {
            self.make_room(&mut shard, now, capacity, rate);
            shard.order.push_back(key);
        }
        let bucket = shard.buckets.entry(key).or_insert(Bucket {
            tokens: capacity,
            refilled: now,
            reply_window: now,
            replies: 0,
        });
        refill(bucket, now, capacity, rate);
        if bucket.tokens >= TOKEN {
            bucket.tokens -= TOKEN;
            return Verdict::Pass;
        }
        if now.saturating_duration_since(bucket.reply_window) >= Duration::from_secs(1) {
            bucket.reply_window = now;
            bucket.replies = 0;
        }
        if bucket.replies >= self.limit.replies_per_second {
            return Verdict::Drop;
        }
        bucket.replies += 1;
        // Until the bucket is full again: burst / rate seconds, at least one.
        let retry_after = (u64::from(self.limit.burst.max(1)).div_ceil(rate)).clamp(1, 3600);
        Verdict::Refuse {
            retry_after: u32::try_from(retry_after).unwrap_or(3600),
        }
    }

    /// Makes room for one more source in a full shard: forgets the one met longest ago,
    /// passing over a few that are being limited right now.
    fn make_room(&self, shard: &mut Shard, now: Instant, capacity: u64, rate: u64) {
        let mut chances = SECOND_CHANCES;
        while shard.buckets.len() >= self.per_shard {
            let Some(oldest) = shard.order.pop_front() else {
                // The order holds every key of the map; an empty order with a full map
                // cannot be, but never loop on it.
                shard.buckets.clear();
                return;
            };
            let limited = shard.buckets.get_mut(&oldest).is_some_and(|b| {
                refill(b, now, capacity, rate);
                b.tokens < capacity
            });
            if limited && chances > 0 {
                chances -= 1;
                shard.order.push_back(oldest);
                continue;
            }
            shard.buckets.remove(&oldest);
        }
    }

    /// Sources tracked right now.
    pub fn tracked(&self) -> usize {
        (0..SHARDS).map(|i| self.lock(i).buckets.len()).sum()
    }
}

/// Adds what `rate` requests a second earned since the last refill, up to `capacity`.
fn refill(bucket: &mut Bucket, now: Instant, capacity: u64, rate: u64) {
    let elapsed = now.saturating_duration_since(bucket.refilled);
    // rate tokens a second = rate thousandths a millisecond.
    let earned = (elapsed.as_millis() as u64).saturating_mul(rate);
    if earned > 0 {
        bucket.tokens = bucket.tokens.saturating_add(earned).min(capacity);
        bucket.refilled = now;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn limiter(per_second: u32, burst: u32, replies: u32) -> RateLimiter {
        RateLimiter::new(RateLimit {
            per_second,
            burst,
            replies_per_second: replies,
            exempt: Vec::new(),
            max_tracked: 1024,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_passes_then_a_few_are_answered_and_the_rest_dropped() {
        let l = limiter(10, 20, 3);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for i in 0..20 {
            assert_eq!(l.check(a, t0), Verdict::Pass, "request {i}");
        }
        for _ in 0..3 {
            assert_eq!(l.check(a, t0), Verdict::Refuse { retry_after: 2 });
        }
        assert_eq!(l.check(a, t0), Verdict::Drop);
        // Another source is not affected.
        assert_eq!(l.check(ip("192.0.2.2"), t0), Verdict::Pass);
        // 100 ms later one request more has been earned.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(l.check(a, t1), Verdict::Pass);
        assert_eq!(
            l.check(a, t1),
            Verdict::Drop,
            "still no more answers this second"
        );
        // A second later, answers again; 2 s later, a whole burst.
        let t2 = t0 + Duration::from_millis(1100);
        for i in 0..10 {
            assert_eq!(l.check(a, t2), Verdict::Pass, "10 requests earned: {i}");
        }
        assert!(matches!(l.check(a, t2), Verdict::Refuse { .. }));
        let t3 = t2 + Duration::from_secs(2);
        let passed = (0..30).filter(|_| l.check(a, t3) == Verdict::Pass).count();
        assert_eq!(passed, 20);
    }

    #[test]
    fn the_sustained_rate_passes_forever() {
        let l = limiter(50, 50, 1);
        let t0 = Instant::now();
        let a = ip("2001:db8::7");
        for i in 0..5000u64 {
            // 50 a second: one every 20 ms.
            let now = t0 + Duration::from_millis(i * 20);
            assert_eq!(l.check(a, now), Verdict::Pass, "request {i}");
        }
    }

    #[test]
    fn exempt_networks_are_never_limited() {
        let l = RateLimiter::new(RateLimit {
            per_second: 1,
            burst: 1,
            ..RateLimit::default()
        });
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(l.check(ip("127.0.0.1"), t0), Verdict::Pass);
            assert_eq!(l.check(ip("::1"), t0), Verdict::Pass);
        }
        assert_eq!(l.tracked(), 0, "exempt sources are not tracked");
        assert_eq!(l.check(ip("10.0.0.1"), t0), Verdict::Pass);
        assert!(matches!(
            l.check(ip("10.0.0.1"), t0),
            Verdict::Refuse { retry_after: 1 }
        ));
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_of_sources() {
        let l = RateLimiter::new(RateLimit {
            per_second: 1,
            burst: 2,
            replies_per_second: 0,
            exempt: Vec::new(),
            max_tracked: 64,
        });
        let t0 = Instant::now();
        let attacker = ip("198.51.100.1");
        for _ in 0..3 {
            l.check(attacker, t0);
        }
        assert_eq!(l.check(attacker, t0), Verdict::Drop);
        // A flood of sources, each seen once.
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i));
            l.check(IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()), now);
        }
        assert!(l.tracked() <= 64, "{} tracked", l.tracked());
    }
}
