//! One call's entries laid out as a ladder: a column for the terminal, one for the relay,
//! one for each server its legs went to; each message an arrow between the relay and a
//! peer's column, each decision a note on the relay's column. [`super::text`] and
//! [`super::svg`] draw it.

use std::time::{SystemTime, UNIX_EPOCH};

use super::ring::{Direction, Entry, Event};

/// The relay's column.
pub const RELAY: usize = 1;
/// The terminal's column.
pub const TERMINAL: usize = 0;

/// A row of the ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// A message from one column to another.
    Arrow {
        /// When.
        at: SystemTime,
        /// The sender's column.
        from: usize,
        /// The receiver's column.
        to: usize,
        /// `INVITE`, `200 OK`.
        label: String,
        /// The message's CSeq.
        cseq: String,
    },
    /// A decision of the relay.
    Note {
        /// When.
        at: SystemTime,
        /// What.
        text: String,
    },
}

/// A call as a ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ladder {
    /// The call's Call-IDs: the terminal's first, then its legs'.
    pub call_ids: Vec<String>,
    /// The columns' titles: `terminal <addr>`, `relay`, then one per server.
    pub columns: Vec<String>,
    /// The rows, oldest first.
    pub rows: Vec<Row>,
}

impl Ladder {
    /// Lays out `entries` of the call whose Call-IDs are `call_ids` (the terminal's first).
    pub fn build(call_ids: Vec<String>, entries: &[Entry]) -> Ladder {
        let terminal_id = call_ids.first().cloned().unwrap_or_default();
        let mut columns = vec!["terminal".to_owned(), "relay".to_owned()];
        let mut terminal_named = false;
        let mut servers: Vec<String> = Vec::new();
        let mut rows = Vec::new();
        for entry in entries {
            match &entry.event {
                Event::Message(m) => {
                    let peer = m.peer.to_string();
                    let column = if *m.call_id == *terminal_id {
                        if !terminal_named {
                            columns[TERMINAL] = format!("terminal {peer}");
                            terminal_named = true;
                        }
                        TERMINAL
                    } else {
                        match servers.iter().position(|s| *s == peer) {
                            Some(i) => RELAY + 1 + i,
                            None => {
                                servers.push(peer.clone());
                                columns.push(format!("server {peer}"));
                                RELAY + servers.len()
                            }
                        }
                    };
                    let (from, to) = match m.direction {
                        Direction::In => (column, RELAY),
                        Direction::Out => (RELAY, column),
                    };
                    rows.push(Row::Arrow {
                        at: entry.at,
                        from,
                        to,
                        label: m.start.label(),
                        cseq: m.cseq.to_string(),
                    });
                }
                Event::Decision { text, .. } => rows.push(Row::Note {
                    at: entry.at,
                    text: text.to_string(),
                }),
                Event::Link { .. } => {}
            }
        }
        if servers.is_empty() {
            columns.push("server".to_owned());
        }
        Ladder {
            call_ids,
            columns,
            rows,
        }
    }
}

/// `HH:MM:SS.mmm` of `at`, in UTC.
pub fn clock(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        since.subsec_millis()
    )
}
