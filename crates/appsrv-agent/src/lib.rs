//! The application-server agent: the program that runs beside an application server
//! (DESIGN.md), its side of the wire contract in `docs/protocol.md`.
//!
//! Its SIP side registers the server's services with the relay, answers the relay's
//! inquiries (can this service be delivered to this subscriber now?) with an SDP answer that
//! names the data gateway and a one-time token, and ends sessions; its data gateway lets a
//! terminal's bytes through to the service backend once the token checks out, counts them,
//! and has the relay charge for them.
//!
//! One concern per module:
//! * [`config`] — TOML file, flags and defaults, merged and checked;
//! * [`registration`] — REGISTER with digest, refresh, retry, unregister (sans-IO core and
//!   its driver); [`auth`] — the client side of digest; [`backoff`] — retry pacing;
//! * [`inquiry`] — the decision on an INVITE and the SDP answer (pure functions);
//! * [`session`] — the user agent: live sessions, ACK, re-INVITE, BYE, shutdown;
//! * [`gateway`] — the data port: tokens, splicing, byte counting;
//! * [`backend`] — built-in `echo` and `clock`, and `tcp://` servers;
//! * [`charging`] — charge `MESSAGE`s, retried until answered, optionally spooled on disk.
//!
//! Choices the issue left open:
//! * requests are accepted only from the relay's IP address (over UDP also from its port when
//!   the relay URI names one; the relay sends from its listening socket); OPTIONS is answered
//!   for anyone;
//! * a token is good from the moment the 200 is sent (the terminal may connect before the
//!   relay's ACK reaches us) for `data.token_ttl_secs`; a session whose token expires unused
//!   is ended with BYE;
//! * charges are made per whole block of `billing.bytes_per_charge` bytes delivered to the
//!   terminal; a backend cannot ask for a charge of its own yet.

pub mod auth;
pub mod backend;
pub mod backoff;
pub mod charging;
pub mod config;
pub mod gateway;
pub mod inquiry;
pub mod registration;
pub mod session;
