//! The ring of recent trace entries, capped both in entries and in bytes: the oldest go
//! first when either cap is reached, so what a stranger's messages can take is fixed by
//! the configuration. Entries are found by Call-ID; a call's legs (the Call-IDs of the
//! relay's own INVITEs to servers) are linked to the terminal's Call-ID by [`Event::Link`]
//! entries, which age out with the rest.
//!
//! What a ring holds lives in two allocations whatever its number of entries: a queue of
//! fixed-size headers (number, time, kind, direction, peer, status code, where the entry's
//! parts lie) and one byte arena, a circular buffer in which each entry's variable-length
//! parts (Call-ID, CSeq, method or reason phrase, raw bytes; a decision's text; a link's
//! Call-IDs) lie back to back. A few small allocations per entry, scattered over the pages
//! a load peak used, would each keep its page from the system long after the peak; an
//! arena is given back whole. Recording an entry copies its parts into the arena and
//! allocates nothing unless the arena grows; a query (rare: an operator asking for a
//! trace) builds owned [`Entry`] values.

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::time::SystemTime;

use sip_core::Peer;

/// Which way a message went, seen from the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Received by the relay.
    In,
    /// Sent by the relay.
    Out,
}

/// What a message's start line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    /// A request and its method.
    Request(Box<str>),
    /// A response: its status code and reason phrase.
    Response(u16, Box<str>),
}

impl StartLine {
    /// The arrow's label: `INVITE`, `200 OK`.
    pub fn label(&self) -> String {
        match self {
            StartLine::Request(method) => method.to_string(),
            StartLine::Response(code, reason) => format!("{code} {reason}"),
        }
    }
}

/// One SIP message in or out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// In or out.
    pub direction: Direction,
    /// Where from (in) or where to (out).
    pub peer: Peer,
    /// Its Call-ID.
    pub call_id: Box<str>,
    /// Its start line.
    pub start: StartLine,
    /// Its CSeq header's value (`1 INVITE`).
    pub cseq: Box<str>,
    /// Its bytes, cut at `[trace] raw_bytes`.
    pub raw: Box<[u8]>,
    /// How long it was whole.
    pub len: usize,
}

/// One entry of the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message.
    Message(Message),
    /// A decision of the relay about a call: authentication, the rule that matched, the
    /// server chosen, billing.
    Decision {
        /// The Call-ID of the call (the terminal's).
        call_id: Box<str>,
        /// What was decided.
        text: Box<str>,
    },
    /// The Call-ID `leg` is a leg of the call `call` (the terminal's Call-ID).
    Link {
        /// The terminal's Call-ID.
        call: Box<str>,
        /// The leg's Call-ID.
        leg: Box<str>,
    },
}

impl Event {
    /// The Call-ID the entry is about (a link: the leg's).
    pub fn call_id(&self) -> &str {
        match self {
            Event::Message(m) => &m.call_id,
            Event::Decision { call_id, .. } => call_id,
            Event::Link { leg, .. } => leg,
        }
    }

    /// The entry's kind and its parts, in the order they lie in the arena (see [`Header`]).
    fn parts(&self) -> (Kind, [&[u8]; PARTS]) {
        match self {
            Event::Message(m) => {
                let (status, text) = match &m.start {
                    StartLine::Request(method) => (None, method),
                    StartLine::Response(code, reason) => (Some(*code), reason),
                };
                let kind = Kind::Message {
                    direction: m.direction,
                    peer: m.peer,
                    status,
                    len: m.len,
                };
                let parts = [
                    m.call_id.as_bytes(),
                    m.cseq.as_bytes(),
                    text.as_bytes(),
                    &m.raw[..],
                ];
                (kind, parts)
            }
            Event::Decision { call_id, text } => (
                Kind::Decision,
                [call_id.as_bytes(), text.as_bytes(), &[], &[]],
            ),
            Event::Link { call, leg } => (Kind::Link, [call.as_bytes(), leg.as_bytes(), &[], &[]]),
        }
    }

    /// What the entry counts against the byte cap while the ring holds it: [`ENTRY_COST`]
    /// and its parts in the arena (the arena's free room is counted by the ring).
    fn cost(&self) -> usize {
        let (_, parts) = self.parts();
        ENTRY_COST.saturating_add(parts.iter().map(|p| p.len()).sum())
    }
}

/// An entry and when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its number: increasing, never reused (the cursor of `relayd trace --follow`).
    pub seq: u64,
    /// When (wall clock).
    pub at: SystemTime,
    /// What.
    pub event: Event,
}

/// What an entry counts against the byte cap besides its parts: the size of an owned
/// [`Entry`], which is at least that of the [`Header`] the ring keeps of it.
const ENTRY_COST: usize = std::mem::size_of::<Entry>();
const _: () = assert!(std::mem::size_of::<Header>() <= ENTRY_COST);

/// How many variable-length parts an entry has at most.
const PARTS: usize = 4;

/// An arena of at most this room is left as it is when the ring holds little: its room
/// costs little.
const KEEP_ROOM: usize = 64 * 1024;

/// A header queue of at most this capacity is left as it is when the ring holds few
/// entries.
const KEEP_HEADERS: usize = 1024;

/// What an entry is, with its fixed-size fields.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A message; parts: Call-ID, CSeq, method or reason phrase, raw bytes.
    Message {
        direction: Direction,
        peer: Peer,
        /// `None` for a request, the status code of a response.
        status: Option<u16>,
        len: usize,
    },
    /// A decision; parts: Call-ID, text.
    Decision,
    /// A link; parts: the call's Call-ID, the leg's.
    Link,
}

/// What the ring keeps of an entry besides its parts, which lie back to back in the arena
/// from `off`, each as long as `lens` says (the unused ones empty).
#[derive(Debug, Clone, Copy)]
struct Header {
    seq: u64,
    at: SystemTime,
    kind: Kind,
    off: usize,
    lens: [u32; PARTS],
}

impl Header {
    /// The length of its parts together.
    fn len(&self) -> usize {
        self.lens.iter().map(|&l| l as usize).sum()
    }

    /// Where its parts end in the arena.
    fn end(&self) -> usize {
        self.off + self.len()
    }

    /// Where its part `part` lies in the arena.
    fn span(&self, part: usize) -> Range<usize> {
        let start = self.off + self.lens[..part].iter().map(|&l| l as usize).sum::<usize>();
        start..start + self.lens[part] as usize
    }

    /// The index of the part the entry is found by ([`Event::call_id`]).
    fn call_part(&self) -> usize {
        match self.kind {
            Kind::Link => 1,
            Kind::Message { .. } | Kind::Decision => 0,
        }
    }
}

/// The ring. Not shared by itself: [`crate::trace::Trace`] holds it behind a lock.
///
/// Its byte cap bounds the headers (counted [`ENTRY_COST`] each) and the arena's whole
/// room, used or not. The arena grows (into a new allocation, the entries' parts copied
/// back to back from its start) when an entry finds no room in it and the cap allows a
/// room at least a sixteenth larger, sized for as many entries of the size it holds as the
/// cap allows; otherwise the oldest entries go. Once the ring holds less than a quarter of
/// its arena's room (after a load peak, or large entries followed by small ones), the
/// arena shrinks to twice what it holds, and so does a header queue under a quarter full.
#[derive(Debug)]
pub struct Ring {
    headers: VecDeque<Header>,
    arena: Vec<u8>,
    /// The length of the entries' parts together: what of the arena is in use.
    live: usize,
    max_entries: usize,
    max_bytes: usize,
    next_seq: u64,
}

impl Ring {
    /// An empty ring of at most `max_entries` entries taking at most `max_bytes`.
    pub fn new(max_entries: usize, max_bytes: usize) -> Ring {
        Ring {
            headers: VecDeque::new(),
            arena: Vec::new(),
            live: 0,
            max_entries,
            max_bytes,
            next_seq: 1,
        }
    }

    /// Adds an entry numbered by the ring itself (a ring used alone); returns its number.
    pub fn push(&mut self, at: SystemTime, event: Event) -> u64 {
        let seq = self.next_seq;
        self.push_numbered(seq, at, event);
        seq
    }

    /// Adds an entry numbered `seq` (by whoever numbers the entries of several rings), the
    /// oldest going first while either cap would be passed. An entry larger than the whole
    /// ring is not kept. Its parts are copied into the arena: nothing is allocated unless
    /// the arena or the header queue grows.
    pub fn push_numbered(&mut self, seq: u64, at: SystemTime, event: Event) {
        self.next_seq = self.next_seq.max(seq + 1);
        if event.cost() > self.max_bytes || self.max_entries == 0 {
            return;
        }
        let (kind, parts) = event.parts();
        let mut lens = [0u32; PARTS];
        for (len, part) in lens.iter_mut().zip(&parts) {
            let Ok(part_len) = u32::try_from(part.len()) else {
                return;
            };
            *len = part_len;
        }
        let n: usize = parts.iter().map(|p| p.len()).sum();
        while self.headers.len() >= self.max_entries {
            self.evict();
        }
        let off = self.make_room(n);
        let mut at_byte = off;
        for part in parts {
            write_at(&mut self.arena, at_byte, part);
            at_byte += part.len();
        }
        self.live += n;
        self.headers.push_back(Header {
            seq,
            at,
            kind,
            off,
            lens,
        });
        self.give_back_room();
    }

    /// Where in the arena the parts of a new entry, `n` bytes, go: the oldest entries go
    /// until the arena has contiguous room for them and the cap is kept with one more
    /// entry, unless the arena can grow (see [`Ring`]).
    fn make_room(&mut self, n: usize) -> usize {
        loop {
            let room = self.arena.capacity();
            let fixed = (self.headers.len() + 1).saturating_mul(ENTRY_COST);
            if fixed.saturating_add(room) <= self.max_bytes {
                if let Some(off) = self.place(n) {
                    return off;
                }
            }
            let needed = self.live + n;
            if needed.saturating_add(fixed) <= self.max_bytes {
                let target = room
                    .saturating_mul(2)
                    .max(needed)
                    .min(fair_room(self.max_bytes, needed, fixed))
                    .max(needed);
                if self.headers.is_empty() || target >= room + room / 16 {
                    self.relayout(target);
                    return self.arena.len();
                }
            }
            if !self.evict() {
                // Not reached: an empty ring takes an entry within the cap above.
                self.relayout(n);
                return 0;
            }
        }
    }

    /// Where `n` bytes fit contiguously in the arena's present room, if they do: after the
    /// newest entry's parts, or at the start once they reach the end.
    fn place(&self, n: usize) -> Option<usize> {
        let room = self.arena.capacity();
        let (Some(oldest), Some(newest)) = (self.headers.front(), self.headers.back()) else {
            return (n <= room).then_some(0);
        };
        let (head, tail) = (oldest.off, newest.end());
        if newest.off >= head {
            // Not wrapped: free after the newest, and before the oldest. (Empty parts
            // always fit after the newest, so what goes to the start is not empty and lies
            // before the oldest's: the arena is wrapped.)
            if tail + n <= room {
                Some(tail)
            } else if n <= head {
                Some(0)
            } else {
                None
            }
        } else {
            // Wrapped: free between the newest and the oldest (the newest's start kept
            // before the oldest's, so that the arena still reads as wrapped).
            (tail < head && tail + n <= head).then_some(tail)
        }
    }

    /// Drops the oldest entry; whether there was one.
    fn evict(&mut self) -> bool {
        match self.headers.pop_front() {
            Some(old) => {
                self.live -= old.len();
                true
            }
            None => false,
        }
    }

    /// Moves the entries' parts into a new arena of `room` bytes (at least what they
    /// take), back to back from its start.
    fn relayout(&mut self, room: usize) {
        let mut arena = Vec::with_capacity(room.max(self.live));
        for header in self.headers.iter_mut() {
            let start = arena.len();
            arena.extend_from_slice(self.arena.get(header.off..header.end()).unwrap_or_default());
            header.off = start;
        }
        self.arena = arena;
    }

    /// Gives back the room a load peak grew and that is now mostly unused: the arena once
    /// it is under a quarter in use and larger than [`KEEP_ROOM`], to twice what it holds;
    /// the header queue likewise (so that a steady load never shrinks and regrows them).
    fn give_back_room(&mut self) {
        let room = self.arena.capacity();
        if room > KEEP_ROOM && self.live < room / 4 {
            self.relayout((self.live * 2).max(KEEP_ROOM / 2));
        }
        let capacity = self.headers.capacity();
        if capacity > KEEP_HEADERS && self.headers.len() < capacity / 4 {
            self.headers
                .shrink_to((self.headers.len() * 2).max(KEEP_HEADERS / 2));
        }
    }

    /// The part `part` of an entry.
    fn part(&self, header: &Header, part: usize) -> &[u8] {
        self.arena.get(header.span(part)).unwrap_or_default()
    }

    /// The part `part` of an entry that was a string.
    fn text(&self, header: &Header, part: usize) -> &str {
        std::str::from_utf8(self.part(header, part)).unwrap_or_default()
    }

    /// The Call-ID an entry is about ([`Event::call_id`]).
    fn call_id_of(&self, header: &Header) -> &str {
        self.text(header, header.call_part())
    }

    /// An entry as an owned value.
    fn entry(&self, header: &Header) -> Entry {
        let text = |part| Box::<str>::from(self.text(header, part));
        let event = match header.kind {
            Kind::Message {
                direction,
                peer,
                status,
                len,
            } => Event::Message(Message {
                direction,
                peer,
                call_id: text(0),
                start: match status {
                    None => StartLine::Request(text(2)),
                    Some(code) => StartLine::Response(code, text(2)),
                },
                cseq: text(1),
                raw: self.part(header, 3).into(),
                len,
            }),
            Kind::Decision => Event::Decision {
                call_id: text(0),
                text: text(1),
            },
            Kind::Link => Event::Link {
                call: text(0),
                leg: text(1),
            },
        };
        Entry {
            seq: header.seq,
            at: header.at,
            event,
        }
    }

    /// The links' headers.
    fn links(&self) -> impl Iterator<Item = &Header> {
        self.headers.iter().filter(|h| matches!(h.kind, Kind::Link))
    }

    /// The number of the newest entry (0 before the first).
    pub fn newest(&self) -> u64 {
        self.next_seq - 1
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.headers.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
    }

    /// What it takes, in bytes, as counted against the cap: its entries' headers (counted
    /// as large as an owned [`Entry`]) and its arena's whole room, used or not.
    pub fn bytes(&self) -> usize {
        self.headers
            .len()
            .saturating_mul(ENTRY_COST)
            .saturating_add(self.arena.capacity())
    }

    /// The call whose leg `leg` is, if a link says so.
    pub fn root_of(&self, leg: &str) -> Option<String> {
        self.links()
            .find(|h| self.part(h, 1) == leg.as_bytes())
            .map(|h| self.text(h, 0).to_owned())
    }

    /// The legs linked to the call `root`, with the numbers of their links.
    pub fn legs_of(&self, root: &str) -> Vec<(u64, String)> {
        self.links()
            .filter(|h| self.part(h, 0) == root.as_bytes())
            .map(|h| (h.seq, self.text(h, 1).to_owned()))
            .collect()
    }

    /// Every entry about one of `ids`.
    pub fn entries_of(&self, ids: &HashSet<&str>) -> Vec<Entry> {
        self.headers
            .iter()
            .filter(|h| ids.contains(self.call_id_of(h)))
            .map(|h| self.entry(h))
            .collect()
    }

    /// The Call-IDs of a call: the terminal's first, then its legs', in the order they were
    /// linked. `call_id` may be either the terminal's or a leg's.
    pub fn call_ids(&self, call_id: &str) -> Vec<String> {
        call_ids_of(&[self], call_id)
    }

    /// Every entry of the call `call_id` (terminal's or leg's Call-ID), oldest first (by
    /// time: a message sent is timed when its sending began, and may be recorded after the
    /// answer to it), with the call's Call-IDs (the terminal's first).
    pub fn call(&self, call_id: &str) -> (Vec<String>, Vec<Entry>) {
        let ids = self.call_ids(call_id);
        let set: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut entries = self.entries_of(&set);
        entries.sort_by_key(|e| (e.at, e.seq));
        (ids, entries)
    }

    /// At most `limit` entries numbered after `after`, oldest first, and the number to ask
    /// after next (the last one given, or `after` when none is new).
    pub fn after(&self, after: u64, limit: usize) -> (Vec<Entry>, u64) {
        let start = self.headers.partition_point(|h| h.seq <= after);
        let taken: Vec<Entry> = self
            .headers
            .iter()
            .skip(start)
            .take(limit)
            .map(|h| self.entry(h))
            .collect();
        let next = taken.last().map_or(after, |e| e.seq);
        (taken, next)
    }

    /// Every leg Call-ID linked in this ring.
    pub fn legs(&self) -> impl Iterator<Item = &str> {
        self.links().map(|h| self.text(h, 1))
    }

    /// The terminal Call-IDs of calls answered with a final failure (an INVITE's response
    /// of 300 or more sent to a Call-ID that `is_leg` says is no leg), with the number of
    /// that response, newest first, at most `limit`.
    pub fn failures(&self, limit: usize, is_leg: &dyn Fn(&str) -> bool) -> Vec<(u64, String)> {
        let mut found: Vec<(u64, String)> = Vec::new();
        for h in self.headers.iter().rev() {
            if found.len() == limit {
                break;
            }
            let Kind::Message {
                direction, status, ..
            } = h.kind
            else {
                continue;
            };
            let failed = matches!(status, Some(code) if code >= 300);
            if direction == Direction::Out && failed && self.part(h, 1).ends_with(b"INVITE") {
                let call_id = self.text(h, 0);
                if !is_leg(call_id) && !found.iter().any(|(_, f)| f == call_id) {
                    found.push((h.seq, call_id.to_owned()));
                }
            }
        }
        found
    }

    /// [`Ring::failures`] of this ring alone: the Call-IDs, newest first.
    pub fn recent_failures(&self, limit: usize) -> Vec<String> {
        let legs: HashSet<&str> = self.legs().collect();
        self.failures(limit, &|c| legs.contains(c))
            .into_iter()
            .map(|(_, c)| c)
            .collect()
    }
}

/// The room an arena needs to hold, within the cap `max_bytes`, as many entries of the
/// size it would hold on average as the cap allows, when it would hold `needed` bytes of
/// parts of entries whose headers count `fixed`: `max_bytes · needed / (needed + fixed)`,
/// which lies between `needed` and `max_bytes - fixed` when the entries fit.
fn fair_room(max_bytes: usize, needed: usize, fixed: usize) -> usize {
    let whole = needed as u128 + fixed as u128;
    if whole == 0 {
        return max_bytes;
    }
    usize::try_from(max_bytes as u128 * needed as u128 / whole).unwrap_or(max_bytes)
}

/// Writes `bytes` into the arena from `at` (at most its length: what lies beyond it is
/// appended), within its capacity when the caller made room.
fn write_at(arena: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    let inside = arena.len().saturating_sub(at).min(bytes.len());
    let (over, beyond) = bytes.split_at(inside);
    if let Some(old) = arena.get_mut(at..at + inside) {
        old.copy_from_slice(over);
    }
    arena.extend_from_slice(beyond);
}

/// The Call-IDs of the call `call_id` (the terminal's or a leg's) over several rings: the
/// terminal's first, then its legs' in the order they were linked.
pub fn call_ids_of(rings: &[&Ring], call_id: &str) -> Vec<String> {
    let root = rings
        .iter()
        .find_map(|r| r.root_of(call_id))
        .unwrap_or_else(|| call_id.to_owned());
    let mut legs: Vec<(u64, String)> = rings.iter().flat_map(|r| r.legs_of(&root)).collect();
    legs.sort();
    let mut ids = vec![root];
    for (_, leg) in legs {
        if !ids.contains(&leg) {
            ids.push(leg);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn note(call: &str, text: &str) -> Event {
        Event::Decision {
            call_id: call.into(),
            text: text.into(),
        }
    }

    #[test]
    fn the_oldest_entries_go_at_either_cap() {
        let now = SystemTime::UNIX_EPOCH;
        let mut ring = Ring::new(3, 1 << 20);
        for i in 0..5 {
            ring.push(now, note("a", &format!("n{i}")));
        }
        assert_eq!(ring.len(), 3);
        let (_, kept) = ring.call("a");
        assert_eq!(kept.first().map(|e| e.seq), Some(3));

        let one = note("b", &"x".repeat(100)).cost();
        let mut ring = Ring::new(1000, one * 2);
        for _ in 0..10 {
            ring.push(now, note("b", &"x".repeat(100)));
        }
        assert_eq!(ring.len(), 2);
        assert!(ring.bytes() <= one * 2);
        // Larger than the whole ring: not kept, nothing evicted for it.
        ring.push(now, note("b", &"y".repeat(one * 3)));
        assert_eq!(ring.len(), 2);
    }

    #[test]
    fn a_call_is_found_by_either_of_its_call_ids() {
        let now = SystemTime::UNIX_EPOCH;
        let mut ring = Ring::new(100, 1 << 20);
        ring.push(now, note("t", "auth"));
        ring.push(now, note("other", "unrelated"));
        ring.push(
            now,
            Event::Link {
                call: "t".into(),
                leg: "l1".into(),
            },
        );
        ring.push(now, note("l1", "on the leg"));
        let (ids, entries) = ring.call("l1");
        assert_eq!(ids, vec!["t".to_owned(), "l1".to_owned()]);
        assert_eq!(entries.len(), 3);
        assert_eq!(ring.call("t").1.len(), 3);
        assert_eq!(ring.call("other").1.len(), 1);
    }

    #[test]
    fn a_call_is_drawn_in_time_order_whatever_order_it_was_recorded_in() {
        let t0 = SystemTime::UNIX_EPOCH;
        let mut ring = Ring::new(100, 1 << 20);
        // The answer was recorded before the request it answers, timed when sent.
        ring.push(
            t0 + std::time::Duration::from_millis(2),
            note("c", "answer"),
        );
        ring.push(
            t0 + std::time::Duration::from_millis(1),
            note("c", "request"),
        );
        let (_, entries) = ring.call("c");
        let texts: Vec<&str> = entries
            .iter()
            .map(|e| match &e.event {
                Event::Decision { text, .. } => &**text,
                _ => "",
            })
            .collect();
        assert_eq!(texts, vec!["request", "answer"]);
    }

    #[test]
    fn follow_pages_through_new_entries() {
        let now = SystemTime::UNIX_EPOCH;
        let mut ring = Ring::new(100, 1 << 20);
        for i in 0..5 {
            ring.push(now, note("a", &i.to_string()));
        }
        let (page, next) = ring.after(0, 2);
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        let (page, next) = ring.after(next, 10);
        assert_eq!(page.len(), 3);
        let (page, again) = ring.after(next, 10);
        assert!(page.is_empty());
        assert_eq!(again, next);
    }

    fn peer() -> Peer {
        Peer::udp(std::net::SocketAddr::from(([192, 0, 2, 1], 5060)))
    }

    /// A message of `raw` bytes: a request when `code` is `None`, else a response sent.
    fn message(call: &str, code: Option<u16>, cseq: &str, raw: &[u8]) -> Event {
        Event::Message(Message {
            direction: if code.is_some() {
                Direction::Out
            } else {
                Direction::In
            },
            peer: peer(),
            call_id: call.into(),
            start: match code {
                Some(code) => StartLine::Response(code, "Busy Here".into()),
                None => StartLine::Request("INVITE".into()),
            },
            cseq: cseq.into(),
            raw: raw.into(),
            len: raw.len() + 7,
        })
    }

    /// The ring's invariants: within both caps, its arena's whole room counted, its
    /// entries' parts inside the arena and apart, numbered in order.
    fn check(ring: &Ring) {
        assert!(ring.len() <= ring.max_entries);
        assert!(
            ring.bytes() <= ring.max_bytes,
            "{} > {}",
            ring.bytes(),
            ring.max_bytes
        );
        assert_eq!(
            ring.bytes(),
            ring.len() * ENTRY_COST + ring.arena.capacity()
        );
        assert_eq!(
            ring.live,
            ring.headers.iter().map(Header::len).sum::<usize>()
        );
        let mut spans: Vec<(usize, usize)> =
            ring.headers.iter().map(|h| (h.off, h.end())).collect();
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:?}");
        assert!(spans.iter().all(|s| s.1 <= ring.arena.len()));
        assert!(ring.arena.len() <= ring.arena.capacity());
        assert!(ring
            .headers
            .iter()
            .zip(ring.headers.iter().skip(1))
            .all(|(a, b)| a.seq < b.seq));
    }

    /// Whether the newest entry's parts lie before the oldest's: the arena has wrapped.
    fn wrapped(ring: &Ring) -> bool {
        matches!((ring.headers.front(), ring.headers.back()), (Some(f), Some(b)) if b.off < f.off)
    }

    fn everything(ring: &Ring) -> Vec<Entry> {
        ring.after(0, usize::MAX).0
    }

    /// Pushes `events` one by one; after each, the ring must hold exactly the newest of
    /// them, whole, oldest first. Returns how many times the arena wrapped.
    fn push_and_compare(ring: &mut Ring, events: impl IntoIterator<Item = Event>) -> usize {
        let t0 = SystemTime::UNIX_EPOCH;
        let mut pushed: Vec<Entry> = Vec::new();
        let mut wraps = 0;
        for (i, event) in events.into_iter().enumerate() {
            let was = wrapped(ring);
            let at = t0 + std::time::Duration::from_micros(i as u64 * 7919 % 1_000_003);
            let seq = ring.push(at, event.clone());
            pushed.push(Entry { seq, at, event });
            check(ring);
            if !was && wrapped(ring) {
                wraps += 1;
            }
            let kept = everything(ring);
            assert_eq!(kept[..], pushed[pushed.len() - kept.len()..], "after {i}");
        }
        wraps
    }

    #[test]
    fn the_oldest_go_by_bytes_and_by_entries_across_the_arena_wrapping_around() {
        // By bytes: entries of many sizes, far fewer than the entries' cap.
        let cap = 16 * 1024;
        let mut ring = Ring::new(100_000, cap);
        let events = (0..3000).map(|i| note(&format!("c{i}"), &"x".repeat(20 + (i * 37) % 700)));
        let wraps = push_and_compare(&mut ring, events);
        assert!(wraps >= 20, "{wraps}");
        assert!(ring.len() < 100, "{}", ring.len());
        // What goes is what the cap requires, give or take the room lost at the wrap: the
        // entries kept take most of the cap.
        let kept: usize = everything(&ring).iter().map(|e| e.event.cost()).sum();
        assert!(kept >= cap * 3 / 4, "{kept}");

        // By entries: the byte cap never reached.
        let mut ring = Ring::new(7, 1 << 20);
        let events = (0..500).map(|i| note(&format!("c{i}"), &"y".repeat((i * 53) % 300)));
        let wraps = push_and_compare(&mut ring, events);
        assert!(wraps >= 20, "{wraps}");
        assert_eq!(ring.len(), 7);
        assert_eq!(everything(&ring).first().map(|e| e.seq), Some(494));
    }

    #[test]
    fn an_entry_larger_than_the_ring_is_not_kept_and_takes_nothing() {
        let now = SystemTime::UNIX_EPOCH;
        let cap = 4096;
        let mut ring = Ring::new(100, cap);
        for i in 0..1000 {
            if wrapped(&ring) && ring.len() >= 3 {
                break;
            }
            ring.push(now, note("a", &format!("{i:>200}")));
        }
        assert!(wrapped(&ring) && ring.len() >= 3);
        let before = everything(&ring);
        let seq = ring.push(now, note("big", &"y".repeat(cap)));
        assert_eq!(everything(&ring), before);
        assert!(ring.call("big").1.is_empty());
        assert_eq!(ring.newest(), seq);
        check(&ring);
        // One byte larger than the ring: not kept either.
        let over = cap - ENTRY_COST - "big".len() + 1;
        ring.push(now, note("big", &"y".repeat(over)));
        assert_eq!(everything(&ring), before);
        // Exactly as large as the ring: kept alone.
        ring.push(now, note("big", &"z".repeat(over - 1)));
        assert_eq!(ring.len(), 1);
        assert_eq!(ring.bytes(), cap);
        check(&ring);
        let (_, kept) = ring.call("big");
        assert!(
            matches!(&kept[..], [Entry { event: Event::Decision { text, .. }, .. }] if text.len() == over - 1)
        );
    }

    #[test]
    fn the_room_of_a_peak_is_given_back() {
        let now = SystemTime::UNIX_EPOCH;
        let mut ring = Ring::new(1000, 4 << 20);
        let raw = vec![b'r'; 2000];
        for i in 0..1000 {
            ring.push(now, message(&format!("peak-{i}"), None, "1 INVITE", &raw));
        }
        check(&ring);
        let peak = ring.arena.capacity();
        assert!(peak >= 1000 * 2000, "{peak}");
        // The load falls: small entries take the peak's place.
        for i in 0..1000 {
            ring.push(now, note(&format!("quiet-{i}"), "ok"));
            check(&ring);
        }
        assert_eq!(ring.len(), 1000);
        let quiet = ring.arena.capacity();
        assert!(quiet <= KEEP_ROOM, "{quiet} after a peak of {peak}");
        assert_eq!(ring.call("quiet-999").1.len(), 1);

        // A header queue grown for many small entries shrinks when a few large ones take
        // their place.
        let mut ring = Ring::new(100_000, 4 << 20);
        for i in 0..10_000 {
            ring.push(now, note(&format!("n{i}"), ""));
        }
        let many = ring.headers.capacity();
        assert!(many >= 10_000, "{many}");
        for i in 0..100 {
            ring.push(
                now,
                message(&format!("big-{i}"), None, "1 INVITE", &vec![b'b'; 100_000]),
            );
            check(&ring);
        }
        assert!(ring.len() < 50, "{}", ring.len());
        assert!(
            ring.headers.capacity() <= KEEP_HEADERS,
            "{} after {many}",
            ring.headers.capacity()
        );
    }

    #[test]
    fn a_steady_load_reuses_the_same_arena() {
        let now = SystemTime::UNIX_EPOCH;
        // Bound by entries, then by bytes.
        for mut ring in [Ring::new(100, 1 << 20), Ring::new(100_000, 64 * 1024)] {
            let event = |i: usize| note(&format!("c{i}"), &"s".repeat(100 + (i * 31) % 200));
            for i in 0..2000 {
                ring.push(now, event(i));
            }
            let (arena, room) = (ring.arena.as_ptr(), ring.arena.capacity());
            for i in 2000..20_000 {
                ring.push(now, event(i));
            }
            check(&ring);
            assert_eq!((ring.arena.as_ptr(), ring.arena.capacity()), (arena, room));
        }
    }

    #[test]
    fn contents_read_back_byte_exact_after_the_arena_wraps_around() {
        // Every byte value in the raw bytes (not UTF-8), strings of several bytes a
        // character, empty parts, requests and responses, decisions and links.
        let all_bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let event = |i: usize| {
            let call = format!("ç-{}-☎", i % 13);
            match i % 5 {
                0 => message(
                    &call,
                    None,
                    "1 INVITE",
                    &all_bytes[i % 256..(i % 256) + i % 700],
                ),
                1 => message(
                    &call,
                    Some(300 + (i % 300) as u16),
                    &format!("{i} INVITE"),
                    &all_bytes[..i % 97],
                ),
                2 => note(&call, &"é".repeat(i % 50)),
                3 => Event::Link {
                    call: call.into(),
                    leg: format!("leg-{i}-ß").into(),
                },
                _ => message("", Some(200), "", &[]),
            }
        };
        let mut ring = Ring::new(40, 12 * 1024);
        let wraps = push_and_compare(&mut ring, (0..2000).map(event));
        assert!(wraps >= 20, "{wraps}");

        // The queries read the same as over owned entries.
        let kept = everything(&ring);
        let legs: Vec<&str> = kept
            .iter()
            .filter_map(|e| match &e.event {
                Event::Link { leg, .. } => Some(&**leg),
                _ => None,
            })
            .collect();
        assert!(!legs.is_empty());
        assert_eq!(ring.legs().collect::<Vec<_>>(), legs);
        for e in &kept {
            if let Event::Link { call, leg } = &e.event {
                assert_eq!(ring.root_of(leg).as_deref(), Some(&**call));
                assert!(ring.legs_of(call).contains(&(e.seq, leg.to_string())));
            }
        }
        let mut failed: Vec<String> = Vec::new();
        for e in kept.iter().rev() {
            if let Event::Message(m) = &e.event {
                if matches!(m.start, StartLine::Response(code, _) if code >= 300)
                    && m.cseq.ends_with("INVITE")
                    && !failed.contains(&m.call_id.to_string())
                {
                    failed.push(m.call_id.to_string());
                }
            }
        }
        assert!(!failed.is_empty());
        assert_eq!(ring.recent_failures(100), failed);
        let ids: HashSet<&str> = ["ç-3-☎"].into();
        let of_3: Vec<Entry> = kept
            .iter()
            .filter(|e| e.event.call_id() == "ç-3-☎")
            .cloned()
            .collect();
        assert!(!of_3.is_empty());
        assert_eq!(ring.entries_of(&ids), of_3);
    }
}
