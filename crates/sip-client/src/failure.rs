//! The ways a command can fail that the exit status tells apart (see the exit codes in
//! `main.rs` and `--help`).

use std::fmt;

/// A failure with its own exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The relay (or a server through it) answered a final non-2xx status.
    Refused {
        /// What was refused: `REGISTER`, `INVITE sip:echo@relay.test`.
        what: String,
        /// The SIP status.
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// Our credentials were refused (a second challenge after answering one).
    AuthFailed(String),
    /// No final answer in time (Timer B/F, a 408, or the answer timeout).
    NoAnswer(String),
}

impl Failure {
    /// The process exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused { .. } => crate::EXIT_REFUSED,
            Failure::AuthFailed(_) => crate::EXIT_AUTH_FAILED,
            Failure::NoAnswer(_) => crate::EXIT_NO_ANSWER,
        }
    }

    /// The failure for a final non-2xx response to `what`: 408 (or a local timeout) is
    /// "no answer", anything else "refused".
    pub fn from_status(what: &str, status: u16, reason: &str) -> Failure {
        if status == 408 {
            Failure::NoAnswer(format!("{what}: no answer ({status} {reason})"))
        } else {
            Failure::Refused {
                what: what.to_string(),
                status,
                reason: reason.to_string(),
            }
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused {
                what,
                status,
                reason,
            } => {
                write!(f, "{what} refused by the relay: {status} {reason}")
            }
            Failure::AuthFailed(m) | Failure::NoAnswer(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_exit_codes() {
        let refused = Failure::from_status("INVITE sip:echo@r", 403, "Service not subscribed");
        assert_eq!(refused.exit_code(), crate::EXIT_REFUSED);
        assert_eq!(
            refused.to_string(),
            "INVITE sip:echo@r refused by the relay: 403 Service not subscribed"
        );
        assert_eq!(
            Failure::from_status("INVITE", 408, "Request Timeout").exit_code(),
            crate::EXIT_NO_ANSWER
        );
        assert_eq!(
            Failure::AuthFailed("x".into()).exit_code(),
            crate::EXIT_AUTH_FAILED
        );
    }
}
