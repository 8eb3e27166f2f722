//! The recording: the transports' tap ([`sip_core::transport::Tap`]) gives every message in
//! and out as it is on the wire; its start line, Call-ID and CSeq are read off its head (a
//! scan of the header lines, no parse), and the head and as much of the body as
//! `[trace] raw_bytes` allows are kept. The relay adds its decisions by Call-ID
//! ([`Trace::decision`]) and links a call's legs to it ([`Trace::link`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;
use sip_core::transport::Tap;
use sip_core::Peer;

use super::config::TraceConfig;
use super::ring::{Direction, Entry, Event, Message, Ring, StartLine};

/// The trace: the ring behind a lock held only to push or to copy entries out.
#[derive(Debug)]
pub struct Trace {
    ring: Mutex<Ring>,
    raw_bytes: usize,
}

impl Trace {
    /// The trace `config` asks for, or `None` when it is off.
    pub fn from_config(config: &TraceConfig) -> Option<Arc<Trace>> {
        config.enabled().then(|| {
            Arc::new(Trace {
                ring: Mutex::new(Ring::new(config.messages, config.max_bytes)),
                raw_bytes: config.raw_bytes,
            })
        })
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a message in or out, if its head has a start line and a Call-ID (what has
    /// not cannot be found by Call-ID, and is not kept).
    pub fn message(&self, direction: Direction, peer: &Peer, bytes: &[u8]) {
        self.message_at(SystemTime::now(), direction, peer, bytes);
    }

    /// [`Trace::message`] at a given time (for tests).
    pub fn message_at(&self, at: SystemTime, direction: Direction, peer: &Peer, bytes: &[u8]) {
        let Some(summary) = summarize(bytes) else {
            return;
        };
        let raw: Box<[u8]> = bytes[..bytes.len().min(self.raw_bytes)].into();
        let event = Event::Message(Message {
            direction,
            peer: *peer,
            call_id: summary.call_id.into(),
            start: summary.start,
            cseq: summary.cseq.into(),
            raw,
            len: bytes.len(),
        });
        self.ring().push(at, event);
    }

    /// Records a decision about the call `call_id` (its terminal Call-ID).
    pub fn decision(&self, call_id: &str, text: impl Into<String>) {
        self.decision_at(SystemTime::now(), call_id, text);
    }

    /// [`Trace::decision`] at a given time (for tests).
    pub fn decision_at(&self, at: SystemTime, call_id: &str, text: impl Into<String>) {
        let text: String = text.into();
        self.ring().push(
            at,
            Event::Decision {
                call_id: call_id.into(),
                text: text.into(),
            },
        );
    }

    /// Records that `leg` is the Call-ID of a leg of the call `call`.
    pub fn link(&self, call: &str, leg: &str) {
        if call == leg {
            return;
        }
        self.ring().push(
            SystemTime::now(),
            Event::Link {
                call: call.into(),
                leg: leg.into(),
            },
        );
    }

    /// A call's Call-IDs (the terminal's first) and entries, oldest first.
    pub fn call(&self, call_id: &str) -> (Vec<String>, Vec<Entry>) {
        self.ring().call(call_id)
    }

    /// At most `limit` entries after number `after`, and the cursor to ask after next.
    pub fn after(&self, after: u64, limit: usize) -> (Vec<Entry>, u64) {
        self.ring().after(after, limit)
    }

    /// The number of the newest entry: where to follow from.
    pub fn newest(&self) -> u64 {
        self.ring().newest()
    }

    /// The latest calls answered with a failure, newest first.
    pub fn recent_failures(&self, limit: usize) -> Vec<String> {
        self.ring().recent_failures(limit)
    }

    /// Entries and bytes held.
    pub fn usage(&self) -> (usize, usize) {
        let ring = self.ring();
        (ring.len(), ring.bytes())
    }
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
