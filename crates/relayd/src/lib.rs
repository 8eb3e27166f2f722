//! The relay server's building blocks, sans-IO: configuration, the registrar, the rules that
//! decide a request's service and client information, and the service directory.
//!
//! The binary (`src/main.rs`) composes them with `sip-core`'s endpoint and the `billing`
//! crate. Every core here takes the current time as a parameter and never touches a socket
//! or a clock, so its behaviour is tested deterministically.

pub mod directory;
pub mod rules;
pub mod registrar;
