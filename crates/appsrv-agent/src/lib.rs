//! The application-server agent: the program that runs beside an application server.
//!
//! Its SIP side registers the server's services with the relay, answers the relay's
//! inquiries (can this service be delivered to this subscriber now?) with an SDP answer that
//! names the data gateway and a one-time token, and ends sessions; its data gateway lets a
//! terminal's bytes through to the service backend once the token checks out, counts them,
//! and has the relay charge for them.

pub mod auth;
pub mod backend;
pub mod backoff;
pub mod config;
pub mod registration;
