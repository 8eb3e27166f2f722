//! `[trace]`: the ring of recent messages behind `relayd trace` and the status page.
//!
//! ```toml
//! [trace]
//! messages = 10000        # entries kept (messages and decisions); 0: no trace at all
//! max_bytes = 4194304     # the ring's memory, in bytes, raw messages included
//! raw_bytes = 4096        # the most of one message's bytes kept
//! ```

use serde::Deserialize;

/// The default number of entries kept.
pub const DEFAULT_MESSAGES: usize = 10_000;
/// The default cap on the ring's memory, in bytes: 4 MiB, about 5,000 entries of a plain
/// call (some 400 calls). It was 16 MiB, which the 10,000 entries filled with 8.5 MB that
/// stayed after a peak of calls — more than half of what a relay held a minute after one
/// (issue 13: RSS within 2× of idle a minute after the last call).
pub const DEFAULT_MAX_BYTES: usize = 4 << 20;
/// The default number of a message's bytes kept.
pub const DEFAULT_RAW_BYTES: usize = 4096;

/// How many rings the trace is sharded into (by Call-ID): recording takes one shard's lock,
/// so calls on different shards never wait for each other. Each has its share of
/// `messages` and `max_bytes`.
pub const SHARDS: usize = 16;

/// `[trace]`. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [trace] table")]
pub struct TraceConfig {
    /// Entries kept; 0 turns the trace off.
    pub messages: usize,
    /// The ring's memory cap, in bytes: the oldest entries go first when it is reached.
    pub max_bytes: usize,
    /// The most of one message's bytes kept (its head comes first; the rest is cut).
    pub raw_bytes: usize,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            messages: DEFAULT_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
            raw_bytes: DEFAULT_RAW_BYTES,
        }
    }
}

impl TraceConfig {
    /// Whether the trace is on.
    pub fn enabled(&self) -> bool {
        self.messages > 0 && self.max_bytes > 0
    }

    /// What is wrong with the section: (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let least = SHARDS * (self.raw_bytes + 1024);
        if self.messages > 0 && self.max_bytes < least {
            problems.push((
                "trace.max_bytes",
                format!("must be at least {least} when the trace is on ({SHARDS} shards of raw_bytes + 1024)"),
            ));
        }
        if self.messages > 0 && !(256..=65_536).contains(&self.raw_bytes) {
            problems.push((
                "trace.raw_bytes",
                "must be between 256 and 65536".to_owned(),
            ));
        }
        problems
    }
}
