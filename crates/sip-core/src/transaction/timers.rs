//! Timer values (RFC 3261 §17 and Table 4, RFC 6026 §8) and the deadline queue the
//! transaction layer keeps them in.
//!
//! Every transaction has two timer slots whose meaning depends on its state (see
//! [`Slot`]). Arming a slot records the deadline in the transaction and appends an entry to
//! the queue. Re-arming or disarming never searches the queue: an entry is live only while
//! the transaction still exists and still holds the same deadline in that slot, so stale
//! entries are recognised in O(1) when they come due and are skipped.
//!
//! The queue keeps one first-in first-out lane per timer duration (T1, 2·T1, …, T4, 64·T1,
//! the 200 ms of the 100 Trying): the transaction layer is driven with a clock that does not
//! go back, so the entries of one duration come due in the order they were armed, and both
//! arming and taking the earliest entry cost O(number of durations) — about a dozen —
//! instead of a binary heap's O(log n) over every deadline of every retained transaction
//! (hundreds of thousands under load, with 64·T1 of retention), whose growth also moved the
//! whole heap in memory each time it doubled.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{ClientTxId, ServerTxId};

/// The timer base values of RFC 3261 §17.1.1.1 and Table 4.
///
/// Every other timer is derived from these: 64·T1 for Timers B, F, H, J, L and M, T1
/// doubling (capped at T2 where the RFC says so) for Timers A, E and G, T4 for Timers I and
/// K, 32 s (or 64·T1 when longer) for Timer D.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// RTT estimate, the first retransmission interval (default 500 ms).
    pub t1: Duration,
    /// The maximum retransmission interval for non-INVITE requests and INVITE responses
    /// (default 4 s).
    pub t2: Duration,
    /// The maximum duration a message remains in the network (default 5 s).
    pub t4: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

/// The smallest timer base we run with: a zero T1 would make every retransmission due at
/// once, forever.
const MIN_BASE: Duration = Duration::from_millis(1);
/// The largest timer base we run with, so that 64·T1 added to an `Instant` cannot overflow.
const MAX_BASE: Duration = Duration::from_secs(3600);

/// How long the server INVITE transaction waits for the TU's provisional response before
/// it sends 100 (Trying) itself (RFC 3261 §17.2.1).
pub(super) const TRYING_DELAY: Duration = Duration::from_millis(200);

impl Timers {
    /// The values clamped to a sane range: each base between 1 ms and one hour, and T2 not
    /// below T1.
    pub(super) fn normalized(self) -> Timers {
        let t1 = self.t1.clamp(MIN_BASE, MAX_BASE);
        Timers {
            t1,
            t2: self.t2.clamp(t1, MAX_BASE),
            t4: self.t4.clamp(MIN_BASE, MAX_BASE),
        }
    }

    /// 64·T1: Timers B, F, H, J (unreliable), L and M.
    pub fn transaction_timeout(&self) -> Duration {
        self.t1 * 64
    }

    /// Timer D (§17.1.1.2): at least 32 s on an unreliable transport, zero on a reliable one.
    pub fn timer_d(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            Duration::from_secs(32).max(self.transaction_timeout())
        }
    }

    /// Timers I and K (§17.2.1, §17.1.2.2): T4 on an unreliable transport, zero on a
    /// reliable one.
    pub fn timer_t4(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            self.t4
        }
    }

    /// Timer J (§17.2.2): 64·T1 on an unreliable transport, zero on a reliable one.
    pub fn timer_j(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            self.transaction_timeout()
        }
    }

    /// The next retransmission interval after `interval` when doubling capped at T2
    /// (Timers E and G, and the UAS core's 2xx retransmissions of §13.3.1.4).
    pub fn backoff_capped(&self, interval: Duration) -> Duration {
        (interval * 2).min(self.t2)
    }

    /// The next retransmission interval after `interval` when doubling without cap
    /// (Timer A). Bounded by 64·T1, past which Timer B has ended the transaction anyway.
    pub fn backoff_uncapped(&self, interval: Duration) -> Duration {
        (interval * 2).min(self.transaction_timeout())
    }
}

/// Which of a transaction's two timers an entry belongs to. The meaning depends on the
/// transaction's kind and state:
///
/// | transaction | state | `Resend` | `Lifetime` |
/// |---|---|---|---|
/// | client INVITE | Calling | A | B |
/// | client INVITE | Accepted / Completed | – | M / D |
/// | client non-INVITE | Trying, Proceeding | E | F |
/// | client non-INVITE | Completed | – | K |
/// | server INVITE | Proceeding | 100 (Trying) after 200 ms | – |
/// | server INVITE | Accepted | 2xx retransmission (§13.3.1.4) | L (and the ACK wait) |
/// | server INVITE | Completed / Confirmed | G / – | H / I |
/// | server non-INVITE | Completed | – | J |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Slot {
    /// Something to (re)send.
    Resend,
    /// The end of the current state.
    Lifetime,
}

/// The transaction a timer entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum TxRef {
    /// A client transaction.
    Client(ClientTxId),
    /// A server transaction.
    Server(ServerTxId),
}

/// One scheduled deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Entry {
    /// When it is due (first, so that the heap orders by time).
    pub at: Instant,
    /// Whose timer it is.
    pub tx: TxRef,
    /// Which of its timers.
    pub slot: Slot,
}

/// All deadlines of all transactions, earliest first; stale entries are left in place and
/// skipped by the caller.
#[derive(Debug, Default)]
pub(super) struct TimerQueue {
    lanes: Vec<Lane>,
    /// The instant entries' times are kept relative to: the first one armed.
    base: Option<Instant>,
}

/// The entries armed for one duration, in the order they come due.
#[derive(Debug)]
struct Lane {
    after: Duration,
    entries: VecDeque<Packed>,
}

/// An [`Entry`] as a lane keeps it: 16 bytes instead of 40 (an `Instant` and an enum of
/// ids), for every deadline of every transaction retained (several per call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed {
    /// Nanoseconds from the queue's base (negative for a caller whose clock went back).
    at: i64,
    /// The transaction's id, bit 63 set for a server transaction, bit 62 for the
    /// `Lifetime` slot. Ids count up from 0 by one per transaction: 2⁶² of them would
    /// take a hundred thousand years at a million a second.
    who: u64,
}

const SERVER_BIT: u64 = 1 << 63;
const LIFETIME_BIT: u64 = 1 << 62;
const ID_MASK: u64 = LIFETIME_BIT - 1;

impl Packed {
    fn of(entry: &Entry, base: Instant) -> Packed {
        let at = match entry.at.checked_duration_since(base) {
            Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            None => -i64::try_from(base.duration_since(entry.at).as_nanos()).unwrap_or(i64::MAX),
        };
        let (id, server) = match entry.tx {
            TxRef::Client(ClientTxId(id)) => (id, 0),
            TxRef::Server(ServerTxId(id)) => (id, SERVER_BIT),
        };
        let lifetime = match entry.slot {
            Slot::Resend => 0,
            Slot::Lifetime => LIFETIME_BIT,
        };
        Packed {
            at,
            who: (id & ID_MASK) | server | lifetime,
        }
    }

    fn entry(self, base: Instant) -> Entry {
        let offset = Duration::from_nanos(self.at.unsigned_abs());
        let at = if self.at >= 0 {
            base + offset
        } else {
            base.checked_sub(offset).unwrap_or(base)
        };
        let id = self.who & ID_MASK;
        Entry {
            at,
            tx: if self.who & SERVER_BIT != 0 {
                TxRef::Server(ServerTxId(id))
            } else {
                TxRef::Client(ClientTxId(id))
            },
            slot: if self.who & LIFETIME_BIT != 0 {
                Slot::Lifetime
            } else {
                Slot::Resend
            },
        }
    }
}

impl TimerQueue {
    /// Gives back the room of lanes a load peak grew, as the layer's tables do.
    pub fn give_back_room(&mut self) {
        for lane in &mut self.lanes {
            let entries = &mut lane.entries;
            if entries.capacity() > 256 && entries.len() < entries.capacity() / 4 {
                entries.shrink_to((entries.len() * 2).max(128));
            }
        }
    }

    /// Drops the stale entries (re-armed, disarmed, or of an ended transaction) once they
    /// are most of the queue: more than 1,024 entries, and over twice the `live` ones there
    /// can be (each sweep at least halves the queue, so sweeping costs O(1) per entry armed). A stale entry otherwise stays until its time comes — an INVITE's first
    /// deadline is minutes away, re-armed at its answer — and after a peak of calls the
    /// queue would hold the peak's entries, and their room, that long.
    pub fn drop_stale(&mut self, live: usize, is_live: impl Fn(&Entry) -> bool) {
        let Some(base) = self.base else {
            return;
        };
        let total: usize = self.lanes.iter().map(|l| l.entries.len()).sum();
        if total <= 1024 || total <= live.saturating_mul(2) {
            return;
        }
        for lane in &mut self.lanes {
            lane.entries.retain(|e| is_live(&e.entry(base)));
        }
        self.give_back_room();
    }

    /// Schedules an entry armed `after` its duration (its `at` is the time of arming plus
    /// `after`).
    pub fn push(&mut self, entry: Entry, after: Duration) {
        let base = *self.base.get_or_insert(entry.at);
        let entry = Packed::of(&entry, base);
        let lane = match self.lanes.iter().position(|l| l.after == after) {
            Some(i) => &mut self.lanes[i],
            None => {
                self.lanes.push(Lane {
                    after,
                    entries: VecDeque::new(),
                });
                let last = self.lanes.len() - 1;
                &mut self.lanes[last]
            }
        };
        match lane.entries.back() {
            Some(last) if last.at > entry.at => {
                // Armed with an earlier clock than the last entry (a caller whose `now`
                // went back): keep the lane in order.
                let i = lane.entries.partition_point(|e| e.at <= entry.at);
                lane.entries.insert(i, entry);
            }
            _ => lane.entries.push_back(entry),
        }
    }

    /// The lane holding the earliest entry.
    fn earliest(&self) -> Option<usize> {
        let mut best: Option<(usize, i64)> = None;
        for (i, lane) in self.lanes.iter().enumerate() {
            if let Some(front) = lane.entries.front() {
                if best.is_none_or(|(_, at)| front.at < at) {
                    best = Some((i, front.at));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// The earliest entry, live or stale.
    pub fn peek(&self) -> Option<Entry> {
        let base = self.base?;
        self.earliest()
            .and_then(|i| self.lanes[i].entries.front())
            .map(|e| e.entry(base))
    }

    /// Removes the earliest entry.
    pub fn pop(&mut self) -> Option<Entry> {
        let base = self.base?;
        let i = self.earliest()?;
        self.lanes[i].entries.pop_front().map(|e| e.entry(base))
    }

    /// Removes and returns the earliest entry if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Entry> {
        let base = self.base?;
        let i = self.earliest()?;
        let lane = &mut self.lanes[i].entries;
        let due = lane.front()?.entry(base);
        if due.at <= now {
            lane.pop_front();
            Some(due)
        } else {
            None
        }
    }

    /// Number of entries, stale ones included.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.entries.len()).sum()
    }
}

/// A transaction's two timer slots: the deadline each is armed for, if any.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct TimerSlots {
    resend: Option<Instant>,
    lifetime: Option<Instant>,
}

impl TimerSlots {
    fn get_mut(&mut self, slot: Slot) -> &mut Option<Instant> {
        match slot {
            Slot::Resend => &mut self.resend,
            Slot::Lifetime => &mut self.lifetime,
        }
    }

    /// Arms `slot` to fire `after` from `now`, replacing any earlier deadline of that slot.
    pub fn arm(
        &mut self,
        queue: &mut TimerQueue,
        tx: TxRef,
        slot: Slot,
        now: Instant,
        after: Duration,
    ) {
        let at = now + after;
        *self.get_mut(slot) = Some(at);
        queue.push(Entry { at, tx, slot }, after);
    }

    /// Disarms `slot`; its heap entry becomes stale.
    pub fn disarm(&mut self, slot: Slot) {
        *self.get_mut(slot) = None;
    }

    /// The deadline `slot` is armed for, if any.
    pub fn armed_at(&self, slot: Slot) -> Option<Instant> {
        match slot {
            Slot::Resend => self.resend,
            Slot::Lifetime => self.lifetime,
        }
    }

    /// Whether `slot` is armed.
    #[cfg(test)]
    pub fn is_armed(&self, slot: Slot) -> bool {
        match slot {
            Slot::Resend => self.resend.is_some(),
            Slot::Lifetime => self.lifetime.is_some(),
        }
    }

    /// Whether an entry for `slot` due at `at` is still the live one.
    pub fn is_live(&self, slot: Slot, at: Instant) -> bool {
        match slot {
            Slot::Resend => self.resend == Some(at),
            Slot::Lifetime => self.lifetime == Some(at),
        }
    }

    /// Consumes a due entry: true (and the slot disarmed) if it was the live one.
    pub fn fire(&mut self, slot: Slot, at: Instant) -> bool {
        let armed = self.get_mut(slot);
        if *armed == Some(at) {
            *armed = None;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_rfc_values() {
        let t = Timers::default();
        assert_eq!(t.t1, Duration::from_millis(500));
        assert_eq!(t.t2, Duration::from_secs(4));
        assert_eq!(t.t4, Duration::from_secs(5));
        assert_eq!(t.transaction_timeout(), Duration::from_secs(32));
        assert_eq!(t.timer_d(false), Duration::from_secs(32));
        assert_eq!(t.timer_d(true), Duration::ZERO);
        assert_eq!(t.timer_t4(false), Duration::from_secs(5));
        assert_eq!(t.timer_j(true), Duration::ZERO);
    }

    #[test]
    fn normalization_clamps() {
        let t = Timers {
            t1: Duration::ZERO,
            t2: Duration::ZERO,
            t4: Duration::MAX,
        }
        .normalized();
        assert_eq!(t.t1, MIN_BASE);
        assert_eq!(t.t2, MIN_BASE);
        assert_eq!(t.t4, MAX_BASE);
        let t = Timers {
            t1: Duration::from_secs(2),
            t2: Duration::from_secs(1),
            ..Timers::default()
        }
        .normalized();
        assert_eq!(t.t2, Duration::from_secs(2));
    }

    #[test]
    fn backoff() {
        let t = Timers::default();
        let mut i = t.t1;
        let mut seen = vec![];
        for _ in 0..6 {
            seen.push(i.as_millis());
            i = t.backoff_capped(i);
        }
        assert_eq!(seen, [500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(
            t.backoff_uncapped(Duration::from_secs(16)),
            Duration::from_secs(32)
        );
        assert_eq!(
            t.backoff_uncapped(Duration::from_secs(32)),
            Duration::from_secs(32)
        );
    }

    #[test]
    fn stale_entries_are_recognised() {
        let mut q = TimerQueue::default();
        let mut slots = TimerSlots::default();
        let t0 = Instant::now();
        let tx = TxRef::Client(ClientTxId(1));
        slots.arm(&mut q, tx, Slot::Resend, t0, Duration::from_secs(1));
        slots.arm(&mut q, tx, Slot::Resend, t0, Duration::from_secs(2));
        assert_eq!(q.len(), 2);
        assert!(q.pop_due(t0).is_none());
        let first = q.pop_due(t0 + Duration::from_secs(5)).unwrap();
        assert!(!slots.fire(first.slot, first.at), "re-armed entry is stale");
        let second = q.pop_due(t0 + Duration::from_secs(5)).unwrap();
        assert!(slots.is_live(second.slot, second.at));
        assert!(slots.fire(second.slot, second.at));
        assert!(!slots.is_armed(Slot::Resend));
        assert!(q.pop().is_none());
    }

    /// An entry comes out of a lane as it went in: either kind of transaction, either
    /// slot, due before the queue's base (a caller whose clock went back) or long after it.
    #[test]
    fn entries_are_kept_in_16_bytes_and_come_back_whole() {
        assert_eq!(std::mem::size_of::<Packed>(), 16);
        let t0 = Instant::now() + Duration::from_secs(3600);
        let mut q = TimerQueue::default();
        let cases = [
            (t0, TxRef::Client(ClientTxId(0)), Slot::Resend),
            (
                t0 - Duration::from_millis(1500),
                TxRef::Server(ServerTxId(7)),
                Slot::Lifetime,
            ),
            (
                t0 + Duration::from_nanos(1),
                TxRef::Client(ClientTxId(ID_MASK)),
                Slot::Lifetime,
            ),
            (
                t0 + Duration::from_secs(86_400),
                TxRef::Server(ServerTxId(1 << 40)),
                Slot::Resend,
            ),
        ];
        for (i, (at, tx, slot)) in cases.iter().enumerate() {
            q.push(
                Entry {
                    at: *at,
                    tx: *tx,
                    slot: *slot,
                },
                Duration::from_millis(i as u64 + 1),
            );
        }
        let mut got = Vec::new();
        while let Some(e) = q.pop() {
            got.push((e.at, e.tx, e.slot));
        }
        let mut want = cases.to_vec();
        want.sort_by_key(|c| c.0);
        assert_eq!(got, want);
    }

    fn entry(at: Instant, id: u64) -> Entry {
        Entry {
            at,
            tx: TxRef::Server(ServerTxId(id)),
            slot: Slot::Lifetime,
        }
    }

    /// Entries of several durations, armed at increasing times, come out in deadline order
    /// whatever lane they are in; an entry armed with an earlier clock than the one before
    /// it in its lane still comes out in its place.
    #[test]
    fn entries_come_out_in_deadline_order_across_lanes() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = TimerQueue::default();
        let mut want = Vec::new();
        let durations = [ms(32_000), ms(500), ms(200), ms(5_000), ms(1_000)];
        for step in 0..200u64 {
            let now = t0 + ms(step * 7);
            let after = durations[(step % 5) as usize];
            q.push(entry(now + after, step), after);
            want.push((now + after, step));
        }
        // A caller whose clock went back: armed 1 s before the last arming, same lane.
        let late = t0 + ms(190 * 7 - 1_000) + ms(500);
        q.push(entry(late, 999), ms(500));
        want.push((late, 999));
        want.sort();
        assert_eq!(q.len(), want.len());
        assert!(q.pop_due(t0).is_none(), "nothing is due at the start");
        let mut got = Vec::new();
        while let Some(e) = q.pop_due(t0 + ms(60_000)) {
            let TxRef::Server(ServerTxId(id)) = e.tx else {
                unreachable!()
            };
            got.push((e.at, id));
        }
        let want_at: Vec<Instant> = want.iter().map(|(at, _)| *at).collect();
        let got_at: Vec<Instant> = got.iter().map(|(at, _)| *at).collect();
        assert_eq!(got_at, want_at);
        assert_eq!(got.len(), 201);
        assert!(q.peek().is_none());
    }
}
