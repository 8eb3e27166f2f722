//! The relay server (DESIGN.md): a signalling B2BUA that authenticates terminals, searches
//! the application servers that deliver the requested service, inquires of them, relays
//! their answers, establishes the session on the terminal's ACK, and bills it.
//!
//! The sans-IO cores take the current time as a parameter and never touch a socket or a
//! clock: [`config`], [`registrar`], [`rules`], [`directory`], [`auth`], and [`call`] — one
//! admitted INVITE from inquiry to bill (claims 1, 3, 5, 6 and 7), whose
//! [`call::driver`] is the tokio task that runs it. The running relay composes them with
//! `sip-core`'s endpoint and the `billing` crate: [`relay`] (the shared context),
//! [`dispatch`] (which handler or call each message goes to), [`b2bua`] (message
//! construction), [`charge`] (application billing) with [`served`] (which server serves
//! which session), [`billing_control`], [`health`] (probes and expiry), [`content`] and
//! [`extensions`] (what a request may carry), [`subscriber_sessions`] (how many sessions each
//! subscriber holds against its class's limit), [`private_files`] (the users file and the
//! billing store, readable by the operator only) and [`metrics`].

pub mod admin;
pub mod admin_config;
pub mod auth;
pub mod b2bua;
pub mod billing_control;
pub mod call;
pub mod charge;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod content;
pub mod ctl;
pub mod directory;
pub mod dispatch;
pub mod extensions;
pub mod health;
pub mod markup;
pub mod metrics;
pub mod private_files;
pub mod registrar;
pub mod relay;
pub mod reload;
pub mod rules;
pub mod served;
pub mod settings;
pub mod subscriber_sessions;
pub mod tls_config;
pub mod trace;
pub mod trace_command;
