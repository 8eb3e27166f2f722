//! The relay server (DESIGN.md): a signalling B2BUA that authenticates terminals, searches
//! the application servers that deliver the requested service, inquires of them, relays
//! their answers, establishes the session on the terminal's ACK, and bills it.
//!
//! The sans-IO cores take the current time as a parameter and never touch a socket or a
//! clock: [`config`], [`registrar`], [`rules`], [`directory`], [`auth`]. The running relay
//! composes them with `sip-core`'s endpoint and the `billing` crate: [`relay`] (shared
//! context and dispatch), [`routing`] (which call a Call-ID belongs to), [`session`] (one
//! task per call: inquiry, response relay, confirmation, disconnection) with [`leg`] (the
//! server legs' INVITE tasks), [`in_dialog`] (in-dialog requests relayed between the legs)
//! and [`b2bua`] (message construction), [`charge`] (application billing), [`change`],
//! [`transfer`] and [`fork`] (claims 5–7), [`billing_control`], [`health`] (probes and
//! expiry), [`extensions`] (420 Bad Extension) and [`metrics`].

pub mod auth;
pub mod b2bua;
pub mod billing_control;
pub mod change;
pub mod charge;
pub mod cli;
pub mod config;
pub mod content;
pub mod directory;
pub mod extensions;
pub mod fork;
pub mod health;
pub mod in_dialog;
pub mod leg;
pub mod metrics;
pub mod registrar;
pub mod relay;
pub mod routing;
pub mod rules;
pub mod session;
pub mod transfer;
