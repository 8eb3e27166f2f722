//! The recording: the transports' tap ([`sip_core::transport::Tap`]) gives every message in
//! and out as it is on the wire; its start line, Call-ID and CSeq are read off its head (a
//! scan of the header lines, no parse), and the head and as much of the body as
//! `[trace] raw_bytes` allows are kept. The relay adds its decisions by Call-ID
//! ([`Trace::decision`]) and links a call's legs to it ([`Trace::link`]).

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;
use sip_core::transport::Tap;
use sip_core::Peer;

use super::config::{TraceConfig, SHARDS};
use super::ring::{call_ids_of, Direction, Entry, Event, Message, Ring, StartLine};

/// The trace: rings by Call-ID (see [`SHARDS`]), each behind a lock held only to push an
/// entry; entries numbered across them. A query locks every shard, in order, for as long as
/// it copies what it needs.
#[derive(Debug)]
pub struct Trace {
    shards: Box<[Mutex<Ring>]>,
    seq: AtomicU64,
    raw_bytes: usize,
}

impl Trace {
    /// The trace `config` asks for, or `None` when it is off.
    pub fn from_config(config: &TraceConfig) -> Option<Arc<Trace>> {
        config.enabled().then(|| {
            let shards = (0..SHARDS)
                .map(|_| {
                    Mutex::new(Ring::new(
                        config.messages.div_ceil(SHARDS),
                        config.max_bytes / SHARDS,
                    ))
                })
                .collect();
            Arc::new(Trace {
                shards,
                seq: AtomicU64::new(1),
                raw_bytes: config.raw_bytes,
            })
        })
    }

    fn push(&self, call_id: &str, at: SystemTime, event: Event) {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        call_id.hash(&mut hasher);
        // The modulo keeps the index below SHARDS (a u64 smaller than a usize).
        let shard = (hasher.finish() % SHARDS as u64) as usize;
        let mut ring = lock(&self.shards[shard]);
        // Numbered under the lock: in one shard, numbers grow with the order of entries.
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        ring.push_numbered(seq, at, event);
    }

    fn all(&self) -> Vec<MutexGuard<'_, Ring>> {
        self.shards.iter().map(lock).collect()
    }

    /// Records a message in or out, if its head has a start line and a Call-ID (what has
    /// not cannot be found by Call-ID, and is not kept).
    pub fn message(&self, direction: Direction, peer: &Peer, bytes: &[u8]) {
        self.message_at(SystemTime::now(), direction, peer, bytes);
    }

    /// [`Trace::message`] at a given time (for tests, and for a message sent, timed when
    /// its sending began).
    pub fn message_at(&self, at: SystemTime, direction: Direction, peer: &Peer, bytes: &[u8]) {
        let Some(summary) = summarize(bytes) else {
            return;
        };
        let raw: Box<[u8]> = bytes[..bytes.len().min(self.raw_bytes)].into();
        let call_id: Box<str> = summary.call_id.into();
        let key = call_id.clone();
        let event = Event::Message(Message {
            direction,
            peer: *peer,
            call_id,
            start: summary.start,
            cseq: summary.cseq.into(),
            raw,
            len: bytes.len(),
        });
        self.push(&key, at, event);
    }

    /// Records a decision about the call `call_id` (its terminal Call-ID).
    pub fn decision(&self, call_id: &str, text: impl Into<String>) {
        self.decision_at(SystemTime::now(), call_id, text);
    }

    /// [`Trace::decision`] at a given time (for tests).
    pub fn decision_at(&self, at: SystemTime, call_id: &str, text: impl Into<String>) {
        let text: String = text.into();
        let event = Event::Decision {
            call_id: call_id.into(),
            text: text.into(),
        };
        self.push(call_id, at, event);
    }

    /// Records that `leg` is the Call-ID of a leg of the call `call`.
    pub fn link(&self, call: &str, leg: &str) {
        if call == leg {
            return;
        }
        let event = Event::Link {
            call: call.into(),
            leg: leg.into(),
        };
        self.push(leg, SystemTime::now(), event);
    }

    /// A call's Call-IDs (the terminal's first) and entries, oldest first.
    pub fn call(&self, call_id: &str) -> (Vec<String>, Vec<Entry>) {
        let guards = self.all();
        let rings: Vec<&Ring> = guards.iter().map(|g| &**g).collect();
        let ids = call_ids_of(&rings, call_id);
        let set: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut entries: Vec<Entry> = rings.iter().flat_map(|r| r.entries_of(&set)).collect();
        drop(guards);
        entries.sort_by_key(|e| (e.at, e.seq));
        (ids, entries)
    }

    /// At most `limit` entries after number `after`, oldest first, and the cursor to ask
    /// after next.
    pub fn after(&self, after: u64, limit: usize) -> (Vec<Entry>, u64) {
        let mut taken: Vec<Entry> = self
            .all()
            .iter()
            .flat_map(|r| r.after(after, limit).0)
            .collect();
        taken.sort_by_key(|e| e.seq);
        taken.truncate(limit);
        let next = taken.last().map_or(after, |e| e.seq);
        (taken, next)
    }

    /// The latest calls answered with a failure, newest first.
    pub fn recent_failures(&self, limit: usize) -> Vec<String> {
        let guards = self.all();
        let legs: HashSet<&str> = guards.iter().flat_map(|r| r.legs()).collect();
        let is_leg = |c: &str| legs.contains(c);
        let mut found: Vec<(u64, String)> = guards
            .iter()
            .flat_map(|r| r.failures(limit, &is_leg))
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found.truncate(limit);
        found.into_iter().map(|(_, c)| c).collect()
    }

    /// The number of the newest entry: where to follow from.
    pub fn newest(&self) -> u64 {
        self.seq.load(Ordering::Relaxed) - 1
    }

    /// Entries and bytes held.
    pub fn usage(&self) -> (usize, usize) {
        self.all()
            .iter()
            .fold((0, 0), |(n, b), r| (n + r.len(), b + r.bytes()))
    }
}

fn lock(ring: &Mutex<Ring>) -> MutexGuard<'_, Ring> {
    ring.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tap for Trace {
    fn received(&self, from: &Peer, bytes: &Bytes) {
        self.message(Direction::In, from, bytes);
    }

    fn sent(&self, to: &Peer, bytes: &Bytes, at: SystemTime) {
        self.message_at(at, Direction::Out, to, bytes);
    }
}

/// What the trace reads of a message's head.
#[derive(Debug, PartialEq, Eq)]
struct Summary<'a> {
    start: StartLine,
    call_id: &'a str,
    cseq: &'a str,
}

/// The most of a head scanned for the Call-ID and CSeq.
const MAX_HEAD_SCAN: usize = 16 * 1024;

/// Reads the start line, Call-ID (`Call-ID` or `i`) and CSeq of a message's head.
fn summarize(bytes: &[u8]) -> Option<Summary<'_>> {
    let head = &bytes[..bytes.len().min(MAX_HEAD_SCAN)];
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first = std::str::from_utf8(lines.next()?).ok()?;
    let start = if let Some(rest) = first.strip_prefix("SIP/2.0 ") {
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        StartLine::Response(code.parse().ok()?, reason.trim().into())
    } else {
        let method = first.split(' ').next()?;
        if method.is_empty() || !first.ends_with("SIP/2.0") {
            return None;
        }
        StartLine::Request(method.into())
    };
    let mut call_id = None;
    let mut cseq = "";
    for line in lines {
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let Ok(name) = std::str::from_utf8(&line[..colon]) else {
            continue;
        };
        let Ok(value) = std::str::from_utf8(&line[colon + 1..]) else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("call-id") || name.eq_ignore_ascii_case("i") {
            call_id = Some(value.trim());
        } else if name.eq_ignore_ascii_case("cseq") {
            cseq = value.trim();
        }
    }
    let call_id = call_id.filter(|c| !c.is_empty())?;
    Some(Summary {
        start,
        call_id,
        cseq,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_head_gives_start_line_call_id_and_cseq() {
        let s = summarize(
            b"INVITE sip:echo@relay SIP/2.0\r\nVia: x\r\ni: abc@h\r\nCSeq: 1 INVITE\r\n\r\nv=0",
        )
        .unwrap();
        assert_eq!(s.start, StartLine::Request("INVITE".into()));
        assert_eq!(s.call_id, "abc@h");
        assert_eq!(s.cseq, "1 INVITE");
        let s = summarize(b"SIP/2.0 486 Busy Here\r\nCall-ID: x\r\ncseq: 2 BYE\r\n\r\n").unwrap();
        assert_eq!(s.start, StartLine::Response(486, "Busy Here".into()));
        assert_eq!(s.cseq, "2 BYE");
        // No Call-ID, a keep-alive, garbage: not kept.
        assert_eq!(
            summarize(b"OPTIONS sip:a SIP/2.0\r\nCSeq: 1 OPTIONS\r\n\r\n"),
            None
        );
        assert_eq!(summarize(b"\r\n\r\n"), None);
        assert_eq!(summarize(b"\xff\xfe"), None);
        assert_eq!(summarize(b"SIP/2.0 abc OK\r\nCall-ID: x\r\n\r\n"), None);
    }

    #[test]
    fn off_costs_nothing_and_a_message_is_cut_at_raw_bytes() {
        let off = TraceConfig {
            messages: 0,
            ..TraceConfig::default()
        };
        assert!(Trace::from_config(&off).is_none());
        let trace = Trace::from_config(&TraceConfig {
            raw_bytes: 256,
            ..TraceConfig::default()
        })
        .unwrap();
        let peer = Peer::udp("127.0.0.1:5060".parse().unwrap());
        let mut big = b"MESSAGE sip:a SIP/2.0\r\nCall-ID: big\r\nCSeq: 1 MESSAGE\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', 10_000));
        trace.message(Direction::In, &peer, &big);
        let (_, entries) = trace.call("big");
        let Event::Message(m) = &entries[0].event else {
            panic!("a message");
        };
        assert_eq!(m.raw.len(), 256);
        assert_eq!(m.len, big.len());
    }
}
