//! SIP on top of [`rsip`]: the pieces every program of the service relay stands on.
//!
//! The protocol logic is sans-IO, in the style of `quinn-proto` and `str0m`: the
//! [`transaction`] and [`dialog`] state machines take messages and the current time and
//! give back what to transmit, events for the user and the next deadline. They never
//! touch a socket or a clock. [`transport`] and [`endpoint`] are the thin tokio shell
//! that owns sockets and timers and drives them.
//!
//! rsip 0.4.0 has gaps (see `shared/notes/rsip-0.4.md`); the [`wire`] layer sits in front
//! of it so that no caller ever meets them: compact header names, folding, comma-joined
//! headers and Content-Length framing are handled here.

pub mod address;
pub mod dialog;
pub mod digest;
pub mod endpoint;
pub mod fields;
pub mod framing;
pub mod limits;
pub mod message;
pub mod peer;
pub mod rate;
pub mod resolve;
pub mod sdp;
pub mod source;
pub mod tls;
pub mod transaction;
pub mod transport;
pub mod uri;
pub mod wire;

pub use peer::{ConnId, Peer, Transport};
pub use rsip;
