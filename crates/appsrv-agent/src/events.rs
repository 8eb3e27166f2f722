//! What the application server hears of its sessions: [`SessionEvent`]s as they happen and
//! [`SessionInfo`] snapshots of the live ones. Both serialise to the JSON the control API
//! writes (`docs/protocol.md`, "Control API"), and are what an embedding server receives from
//! [`crate::handle::AgentHandle`].
//!
//! A session's events, in order: `started` (the agent answered the relay's inquiry 200),
//! `connected` for each data connection the terminal opens, `changed` for each change of
//! service the relay asserts on a re-INVITE, `transferred` when the relay says it moved the
//! session to another server, and `ended` last, with its cause.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::preamble::ParamMap;

/// Why a session ended, as the agent knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndCause {
    /// The relay sent BYE: the terminal hung up, or the relay ended the session without
    /// saying why.
    RelayBye,
    /// The relay sent BYE saying the session was transferred to another server.
    Transferred,
    /// The relay sent BYE saying the session changed to a service another server delivers.
    Changed,
    /// The application server asked (control API or [`crate::handle::AgentHandle::hang_up`]);
    /// the relay records it as `server-bye`.
    ServerHangUp,
    /// The data connection ended from the application side (the backend closed, a side
    /// failed, the backend could not be opened); the agent sent BYE.
    DataClosed,
    /// The terminal never used its token in time; the agent sent BYE.
    TokenExpired,
    /// The relay never ACKed the agent's 200; the agent sent BYE.
    NoAck,
    /// The agent is shutting down; it sent BYE.
    Shutdown,
    /// The relay stopped refreshing the session (RFC 4028 session timer: it crashed or lost
    /// the session); the agent sent BYE.
    SessionExpired,
}

impl EndCause {
    /// The name written in events and logs (`relay-bye`, `server-hang-up`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            EndCause::RelayBye => "relay-bye",
            EndCause::Transferred => "transferred",
            EndCause::Changed => "changed",
            EndCause::ServerHangUp => "server-hang-up",
            EndCause::DataClosed => "data-closed",
            EndCause::TokenExpired => "token-expired",
            EndCause::NoAck => "no-ack",
            EndCause::Shutdown => "shutdown",
            EndCause::SessionExpired => "session-expired",
        }
    }
}

impl std::fmt::Display for EndCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum SessionEvent {
    /// The agent accepted the relay's inquiry (its 200 went out): the session exists and
    /// may be charged.
    Started {
        /// The session id (the Call-ID of the relay's leg to this server).
        session_id: String,
        /// The subscriber the relay asserted.
        subscriber: String,
        /// The service.
        service: String,
        /// Its parameters.
        params: ParamMap,
        /// When, in Unix milliseconds.
        at_ms: u64,
    },
    /// The terminal opened a data connection with a good token.
    Connected {
        /// The session id.
        session_id: String,
        /// The terminal's address.
        terminal: SocketAddr,
        /// When, in Unix milliseconds.
        at_ms: u64,
    },
    /// The relay changed the session's service (a re-INVITE asserting another service this
    /// server delivers); the terminal's next data connection goes to the new service's
    /// backend.
    Changed {
        /// The session id.
        session_id: String,
        /// The service before.
        from: String,
        /// The service now.
        to: String,
        /// The new service's parameters.
        params: ParamMap,
        /// When, in Unix milliseconds.
        at_ms: u64,
    },
    /// The relay moved the session to another application server (it is followed by
    /// `ended` with cause `transferred`).
    Transferred {
        /// The session id.
        session_id: String,
        /// When, in Unix milliseconds.
        at_ms: u64,
    },
    /// The session is over; its data connections are closed.
    Ended {
        /// The session id.
        session_id: String,
        /// Why.
        cause: EndCause,
        /// In words.
        reason: String,
        /// When, in Unix milliseconds.
        at_ms: u64,
    },
}

impl SessionEvent {
    /// The session the event is about.
    pub fn session_id(&self) -> &str {
        match self {
            SessionEvent::Started { session_id, .. }
            | SessionEvent::Connected { session_id, .. }
            | SessionEvent::Changed { session_id, .. }
            | SessionEvent::Transferred { session_id, .. }
            | SessionEvent::Ended { session_id, .. } => session_id,
        }
    }
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionState {
    /// 200 sent, the relay's ACK not yet received.
    Pending,
    /// Established.
    Live,
}

/// A live session, as listed by the control API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionInfo {
    /// The session id (the Call-ID of the relay's leg to this server).
    pub session_id: String,
    /// The subscriber the relay asserted.
    pub subscriber: String,
    /// The service delivered now.
    pub service: String,
    /// Its parameters.
    pub params: ParamMap,
    /// Pending or live.
    pub state: SessionState,
    /// The terminal's address on its current data connection, if one is open.
    pub terminal: Option<SocketAddr>,
    /// When the agent accepted it, in Unix milliseconds.
    pub started_at_ms: u64,
    /// Bytes from the terminal to the backend so far.
    pub bytes_in: u64,
    /// Bytes from the backend to the terminal so far.
    pub bytes_out: u64,
}

/// Now, in Unix milliseconds (0 for a clock before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn events_serialise_with_their_name_and_cause() {
        let ended = SessionEvent::Ended {
            session_id: "c1".into(),
            cause: EndCause::ServerHangUp,
            reason: "asked by the application server".into(),
            at_ms: 5,
        };
        let json = serde_json::to_value(&ended).unwrap();
        assert_eq!(json["event"], "ended");
        assert_eq!(json["cause"], "server-hang-up");
        assert_eq!(json["session_id"], "c1");
        let back: SessionEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, ended);
        assert_eq!(back.session_id(), "c1");
        let started = SessionEvent::Started {
            session_id: "c1".into(),
            subscriber: "alice".into(),
            service: "game".into(),
            params: ParamMap::new(),
            at_ms: 1,
        };
        assert_eq!(serde_json::to_value(&started).unwrap()["event"], "started");
        for cause in [
            EndCause::RelayBye,
            EndCause::Transferred,
            EndCause::Changed,
            EndCause::ServerHangUp,
            EndCause::DataClosed,
            EndCause::TokenExpired,
            EndCause::NoAck,
            EndCause::Shutdown,
        ] {
            assert_eq!(
                serde_json::to_value(cause).unwrap(),
                serde_json::Value::String(cause.as_str().into())
            );
        }
    }
}
