//! The application-server agent: the program that runs beside an application server
//! (DESIGN.md), its side of the wire contract in `docs/protocol.md`.
//!
//! Its SIP side registers the server's services with the relay, answers the relay's
//! inquiries (can this service be delivered to this subscriber now?) with an SDP answer that
//! names the data gateway and a one-time token, and ends sessions; its data gateway lets a
//! terminal's bytes through to the service backend once the token checks out, counts them,
//! and has the relay charge for them.
//!
//! The crate is also a library for a Rust application server that embeds the agent:
//! [`agent::Agent::start`] on a [`config::Config`], then [`handle::AgentHandle`] to hear
//! session events, charge and hang up (`examples/metered_server.rs`). The binary is a thin
//! user of the same API.
//!
//! One concern per module:
//! * [`agent`] — the whole agent started and stopped; [`handle`] — the application server's
//!   verbs on it;
//! * [`config`] — TOML file, flags and defaults, merged and checked;
//! * [`registration`] — REGISTER with digest, refresh, retry, unregister (sans-IO core and
//!   its driver); [`auth`] — the client side of digest; [`backoff`] — retry pacing;
//! * [`inquiry`] — the decision on an INVITE and the SDP answer (pure functions);
//! * [`session`] — the user agent: live sessions, ACK, re-INVITE, BYE, shutdown;
//! * [`gateway`] — the data port: tokens, splicing, byte counting;
//! * [`backend`] — built-in `echo` and `clock`, and `tcp://` servers; [`preamble`] — who is
//!   connected, told to a `tcp://` backend first (JSON line or PROXY v2);
//! * [`charging`] — charge `MESSAGE`s, retried until answered, optionally spooled on disk;
//!   [`inflight`] — charges and data connections a session's BYE waits for;
//!   [`app_charge`] — the checks of the charges the application server asks for;
//! * [`events`] — session events and snapshots for the application server;
//! * [`control`] — the control API (HTTP on loopback, bearer token) over [`http`], a minimal
//!   HTTP/1.1.
//!
//! Choices the issue left open:
//! * requests are accepted only from the relay's IP address (over UDP also from its port when
//!   the relay URI names one; the relay sends from its listening socket); OPTIONS is answered
//!   for anyone;
//! * a token is good from the moment the 200 is sent (the terminal may connect before the
//!   relay's ACK reaches us) for `data.token_ttl_secs`; a session whose token expires unused
//!   is ended with BYE;
//! * charges are made per whole block of `billing.bytes_per_charge` bytes delivered to the
//!   terminal, and whenever the application server asks (control API or library), under its
//!   own event id;
//! * the session id the application server sees is the Call-ID of the relay's leg to this
//!   server: the relay knows a session by it, so charges name it directly.
//!
//! IPv6: the relay URI and every URI the agent builds or reads (its Contact, address of
//! record, registrar, charge URI, the relay's Request-URIs, Contacts and asserted identities)
//! go through sip-core's parsers ([`sip_core::uri`], [`sip_core::address`]), since rsip 0.4
//! cannot read an IPv6 reference; they enter rsip messages as carriers that print as written.
//! An IPv6 relay (`sip:[::1]:5060`) makes the SIP and data addresses default to `[::1]`;
//! hosts are written in brackets in Via, Contact and URIs, and an IPv6 data address gives an
//! `IN IP6` SDP answer.

pub mod agent;
pub mod app_charge;
pub mod auth;
pub mod backend;
pub mod backoff;
pub mod charging;
pub mod config;
pub mod control;
pub mod events;
pub mod gateway;
pub mod handle;
pub mod http;
pub mod inflight;
pub mod inquiry;
pub mod preamble;
pub mod registration;
pub mod session;
