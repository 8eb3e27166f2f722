//! Billing records: what the store keeps and the reports read.
//!
//! A [`SessionRecord`] is time billing, written when a session ends; a [`ChargeRecord`] is
//! application billing, written when an application server asks to charge. Times are Unix
//! milliseconds (UTC) and amounts integer minor units.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::money::Money;

/// Why a session ended, as written in its record (`caller-bye`, `server-bye`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndCause {
    /// The terminal (the caller) sent `BYE`.
    CallerBye,
    /// The application server sent `BYE`.
    ServerBye,
    /// The session timed out (no refresh, no response).
    Timeout,
    /// The session was transferred to another server (`REFER`); this record is the part
    /// billed to the first server.
    Transferred,
    /// The service was changed (re-`INVITE` naming another service) and the old server's
    /// part ended.
    Changed,
    /// The relay ended the session because it was shutting down.
    RelayShutdown,
    /// The relay crashed while the session was open; it was closed on restart at its
    /// last-seen time (see the crate documentation).
    RecoveredAfterRestart,
    /// The relay that held the session stopped renewing its lease (it died, or lost the
    /// database); another relay sharing the database closed the session at its last-seen
    /// time once the lease had expired.
    RelayLost,
    /// An operator ended the session through the relay's admin API.
    Admin,
}

impl EndCause {
    /// Every cause, in declaration order.
    pub const ALL: [EndCause; 9] = [
        EndCause::CallerBye,
        EndCause::ServerBye,
        EndCause::Timeout,
        EndCause::Transferred,
        EndCause::Changed,
        EndCause::RelayShutdown,
        EndCause::RecoveredAfterRestart,
        EndCause::RelayLost,
        EndCause::Admin,
    ];

    /// The kebab-case name written into records.
    pub const fn as_str(&self) -> &'static str {
        match self {
            EndCause::CallerBye => "caller-bye",
            EndCause::ServerBye => "server-bye",
            EndCause::Timeout => "timeout",
            EndCause::Transferred => "transferred",
            EndCause::Changed => "changed",
            EndCause::RelayShutdown => "relay-shutdown",
            EndCause::RecoveredAfterRestart => "recovered-after-restart",
            EndCause::RelayLost => "relay-lost",
            EndCause::Admin => "admin",
        }
    }
}

/// An end-cause name that is not one of [`EndCause::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown end cause {0:?}: expected caller-bye, server-bye, timeout, transferred, changed, relay-shutdown, recovered-after-restart, relay-lost or admin")]
pub struct UnknownEndCause(pub String);

impl FromStr for EndCause {
    type Err = UnknownEndCause;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EndCause::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownEndCause(s.to_owned()))
    }
}

impl fmt::Display for EndCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EndCause {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EndCause {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Time billing: one session (or one server's part of a transferred or changed session),
/// from its confirmation to its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The store's id of this record, unique among session records.
    pub record_id: i64,
    /// The relay's session id.
    pub session_id: String,
    /// The SIP Call-ID of the terminal's leg.
    pub call_id: String,
    /// The subscriber billed.
    pub subscriber: String,
    /// The service delivered.
    pub service: String,
    /// The application server that delivered it.
    pub server: String,
    /// The subscriber's plan.
    pub plan: String,
    /// The name of the tariff that rated the session.
    pub tariff: String,
    /// When the session was confirmed (the terminal's `ACK`), Unix ms.
    pub confirmed_at_ms: i64,
    /// When it ended, Unix ms; never before `confirmed_at_ms`.
    pub ended_at_ms: i64,
    /// `ended_at_ms − confirmed_at_ms`.
    pub duration_ms: i64,
    /// Why it ended.
    pub cause: EndCause,
    /// What it cost under `tariff`.
    pub charge: Money,
}

/// A charge by units: `units × unit_price_minor` gives the amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitCharge {
    /// The number of units charged.
    pub units: i64,
    /// The price of one unit in the amount's minor units.
    pub unit_price_minor: i64,
}

/// Application billing: one charge event submitted by an application server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRecord {
    /// The store's id of this record, unique among charge records.
    pub record_id: i64,
    /// The relay's session id, when the charge was made within a session.
    pub session_id: Option<String>,
    /// The application server that asked to charge.
    pub server: String,
    /// The subscriber charged.
    pub subscriber: String,
    /// The service, when known.
    pub service: Option<String>,
    /// The server's own id of the event; the same (server, event id) is charged once.
    pub event_id: String,
    /// The total amount.
    pub amount: Money,
    /// The units and unit price, when the charge was made by units.
    pub units: Option<UnitCharge>,
    /// The server's description of what was charged.
    pub description: String,
    /// When the charge was recorded, Unix ms.
    pub charged_at_ms: i64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn end_causes_round_trip_through_their_names() {
        let names: Vec<&str> = EndCause::ALL.iter().map(EndCause::as_str).collect();
        assert_eq!(
            names,
            [
                "caller-bye",
                "server-bye",
                "timeout",
                "transferred",
                "changed",
                "relay-shutdown",
                "recovered-after-restart",
                "relay-lost",
                "admin"
            ]
        );
        for cause in EndCause::ALL {
            assert_eq!(cause.as_str().parse::<EndCause>(), Ok(cause));
            assert_eq!(cause.to_string(), cause.as_str());
            let json = serde_json::to_string(&cause).unwrap();
            assert_eq!(json, format!("\"{}\"", cause.as_str()));
            assert_eq!(serde_json::from_str::<EndCause>(&json).unwrap(), cause);
        }
        let err = "CallerBye".parse::<EndCause>().unwrap_err();
        assert!(err.to_string().contains("unknown end cause \"CallerBye\""));
        assert!(serde_json::from_str::<EndCause>("\"bye\"").is_err());
    }
}
