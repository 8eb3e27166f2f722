//! The trace of recent SIP messages and of the relay's decisions between them (issue 16):
//! what `relayd trace CALL-ID` and the status page draw as a call's ladder.
//!
//! - [`config`]: `[trace]`, the ring's size in messages and in bytes (0 messages: off, and
//!   then nothing is installed: no tap on the transports, no copy, no allocation);
//! - [`ring`]: the bounded ring of entries, found by Call-ID, a call linked to its legs;
//! - [`record`]: the recording — every message in and out, read off the wire by the
//!   transports' tap, and the decisions the relay notes;
//! - [`ladder`]: one call's entries laid out as a ladder (columns terminal, relay, servers);
//! - [`text`] and [`svg`]: the ladder drawn for a terminal and as a picture.

pub mod config;
pub mod ladder;
pub mod record;
pub mod ring;
pub mod svg;
pub mod text;

pub use record::Trace;

#[cfg(test)]
mod tests;
