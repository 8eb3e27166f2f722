//! The ring of recent trace entries, capped both in entries and in bytes: the oldest go
//! first when either cap is reached, so what a stranger's messages can take is fixed by
//! the configuration. Entries are found by Call-ID; a call's legs (the Call-IDs of the
//! relay's own INVITEs to servers) are linked to the terminal's Call-ID by [`Event::Link`]
//! entries, which age out with the rest.

use std::collections::{HashSet, VecDeque};
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

    /// What the entry takes in memory, roughly: its fixed size and what it owns.
    fn cost(&self) -> usize {
        let owned = match self {
            Event::Message(m) => {
                m.call_id.len()
                    + m.cseq.len()
                    + m.raw.len()
                    + match &m.start {
                        StartLine::Request(method) => method.len(),
                        StartLine::Response(_, reason) => reason.len(),
                    }
            }
            Event::Decision { call_id, text } => call_id.len() + text.len(),
            Event::Link { call, leg } => call.len() + leg.len(),
        };
        std::mem::size_of::<Entry>() + owned
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

/// The ring. Not shared by itself: [`crate::trace::Trace`] holds it behind a lock.
#[derive(Debug)]
pub struct Ring {
    entries: VecDeque<Entry>,
    max_entries: usize,
    max_bytes: usize,
    bytes: usize,
    next_seq: u64,
}

impl Ring {
    /// An empty ring of at most `max_entries` entries taking at most `max_bytes`.
    pub fn new(max_entries: usize, max_bytes: usize) -> Ring {
        Ring {
            entries: VecDeque::new(),
            max_entries,
            max_bytes,
            bytes: 0,
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
    /// ring is not kept.
    pub fn push_numbered(&mut self, seq: u64, at: SystemTime, event: Event) {
        self.next_seq = self.next_seq.max(seq + 1);
        let cost = event.cost();
        if cost > self.max_bytes || self.max_entries == 0 {
            return;
        }
        while self.entries.len() >= self.max_entries || self.bytes + cost > self.max_bytes {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.event.cost();
        }
        self.bytes += cost;
        self.entries.push_back(Entry { seq, at, event });
    }

    /// The number of the newest entry (0 before the first).
    pub fn newest(&self) -> u64 {
        self.next_seq - 1
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What its entries take, in bytes (as counted against the cap).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The call whose leg `leg` is, if a link says so.
    pub fn root_of(&self, leg: &str) -> Option<String> {
        self.entries.iter().find_map(|e| match &e.event {
            Event::Link { call, leg: l } if **l == *leg => Some(call.to_string()),
            _ => None,
        })
    }

    /// The legs linked to the call `root`, with the numbers of their links.
    pub fn legs_of(&self, root: &str) -> Vec<(u64, String)> {
        self.entries
            .iter()
            .filter_map(|e| match &e.event {
                Event::Link { call, leg } if **call == *root => Some((e.seq, leg.to_string())),
                _ => None,
            })
            .collect()
    }

    /// Every entry about one of `ids`.
    pub fn entries_of(&self, ids: &HashSet<&str>) -> Vec<Entry> {
        self.entries
            .iter()
            .filter(|e| ids.contains(e.event.call_id()))
            .cloned()
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
        let start = self.entries.partition_point(|e| e.seq <= after);
        let taken: Vec<Entry> = self
            .entries
            .iter()
            .skip(start)
            .take(limit)
            .cloned()
            .collect();
        let next = taken.last().map_or(after, |e| e.seq);
        (taken, next)
    }

    /// Every leg Call-ID linked in this ring.
    pub fn legs(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().filter_map(|e| match &e.event {
            Event::Link { leg, .. } => Some(&**leg),
            _ => None,
        })
    }

    /// The terminal Call-IDs of calls answered with a final failure (an INVITE's response
    /// of 300 or more sent to a Call-ID that `is_leg` says is no leg), with the number of
    /// that response, newest first, at most `limit`.
    pub fn failures(&self, limit: usize, is_leg: &dyn Fn(&str) -> bool) -> Vec<(u64, String)> {
        let mut found: Vec<(u64, String)> = Vec::new();
        for e in self.entries.iter().rev() {
            if found.len() == limit {
                break;
            }
            let Event::Message(m) = &e.event else {
                continue;
            };
            let failed = matches!(m.start, StartLine::Response(code, _) if code >= 300);
            if m.direction == Direction::Out
                && failed
                && m.cseq.ends_with("INVITE")
                && !is_leg(&m.call_id)
                && !found.iter().any(|(_, f)| **f == *m.call_id)
            {
                found.push((e.seq, m.call_id.to_string()));
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
}
