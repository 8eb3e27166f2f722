//! Charges the application server asks for (claim 4, "based on a request from the
//! application server"): the request as the control API and the library take it
//! ([`AppCharge`]), its checks, the event id it goes to the relay under, and the answer
//! ([`ChargeReceipt`]).
//!
//! Event ids are the server's own: 1 to 128 characters of ASCII letters, digits and
//! `.`, `_`, `:`, `-`. One id is one charge, for as long as the relay keeps records: asking
//! again with the same id (a retry after a lost answer, a restart) is answered as the first
//! time and charged once, because the relay stores a charge once per server and event id.
//! The relay sees the id as `app:<id>` ([`relay_event_id`]), so the server's ids never meet
//! the agent's own (`<account>-<run>-<sequence>`, for byte blocks). Asking again with the
//! same id but another amount, session or subscriber is refused ([`EventLedger`]) rather
//! than silently charged as the first.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::charging::Price;

/// The longest event id accepted.
pub const MAX_EVENT_ID: usize = 128;
/// The longest description accepted, in bytes.
pub const MAX_DESCRIPTION: usize = 512;
/// The largest total accepted, in minor units (what the relay's store can hold).
pub const MAX_TOTAL: u64 = i64::MAX as u64;
/// How many event ids [`EventLedger`] remembers.
pub const LEDGER_SIZE: usize = 100_000;

/// A charge the application server asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppCharge {
    /// The server's own id for this chargeable event.
    pub event_id: String,
    /// The session to charge (its id as the agent's events and the preamble give it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The subscriber to charge: required without a session (the relay accepts it only for
    /// a subscriber this server has served); with one, it must be the session's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber: Option<String>,
    /// A total in minor units (or `units`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<u64>,
    /// Units charged (or `amount`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<u64>,
    /// The price of a unit in minor units, with `units` (default: `billing.price_per_block`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<u64>,
    /// ISO 4217 code (default: `billing.currency`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// For the billing record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What the agent answers once a charge is settled (or known to be on its way).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChargeReceipt {
    /// `confirmed` (the relay committed it) or `pending` (not confirmed yet; retried until
    /// the relay answers).
    pub status: ReceiptStatus,
    /// The server's event id.
    pub event_id: String,
    /// The event id the relay stores (`app:<event_id>`).
    pub relay_event_id: String,
    /// The session charged, if any.
    pub session_id: Option<String>,
    /// The subscriber charged.
    pub subscriber: String,
    /// The total in minor units.
    pub amount: u64,
    /// The currency.
    pub currency: String,
    /// For a pending charge: whether it is in the spool directory (kept across restarts).
    pub spooled: bool,
    /// For a pending charge: why it is not confirmed yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Whether a charge is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReceiptStatus {
    /// The relay committed the charge record.
    Confirmed,
    /// Queued (and spooled when a spool directory is configured), retried until the relay
    /// answers; not confirmed within `billing.confirm_wait_secs`, or its first attempt
    /// failed in a way that is retried.
    Pending,
}

/// Why a charge was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargeError {
    /// The request is malformed (the text says how).
    #[error("{0}")]
    Invalid(String),
    /// The session is not one of this server's (live, or ended within the grace period).
    #[error("session {0:?} is not a session of this server")]
    UnknownSession(String),
    /// The subscriber named is not the session's.
    #[error("subscriber {given:?} is not the subscriber of session {session_id:?}")]
    SubscriberMismatch {
        /// The session.
        session_id: String,
        /// The subscriber the request named.
        given: String,
    },
    /// The event id was used for another charge.
    #[error("event id {0:?} was already used for a different charge")]
    EventIdReused(String),
    /// The relay refused the charge.
    #[error("the relay refused the charge: {status} {reason}")]
    Refused {
        /// The relay's status code.
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// The agent is stopping; nothing was queued.
    #[error("the agent is shutting down")]
    Stopped,
}

/// A checked charge, ready to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCharge {
    /// The event id the relay sees.
    pub relay_event_id: String,
    /// The price.
    pub price: Price,
    /// Its total, in minor units.
    pub total: u64,
    /// The currency (resolved).
    pub currency: String,
    /// The description (resolved).
    pub description: String,
}

/// The event id the relay stores for the server's `event_id`.
pub fn relay_event_id(event_id: &str) -> String {
    format!("app:{event_id}")
}

/// Whether `id` is an acceptable event id.
pub fn is_event_id(id: &str) -> bool {
    (1..=MAX_EVENT_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b))
}

/// Whether `code` is an ISO 4217-shaped currency code.
pub fn is_currency(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

impl AppCharge {
    /// Checks the request's own fields (not the session, which the caller looks up), with
    /// `unit_price` and `currency` as the defaults.
    pub fn check(&self, unit_price: u64, currency: &str) -> Result<CheckedCharge, ChargeError> {
        let bad = |m: String| Err(ChargeError::Invalid(m));
        if !is_event_id(&self.event_id) {
            return bad(format!(
                "event_id must be 1 to {MAX_EVENT_ID} characters of letters, digits, '.', '_', \
                 ':' and '-'"
            ));
        }
        if self.session_id.is_none() && self.subscriber.is_none() {
            return bad("give session_id, or subscriber for a charge out of session".into());
        }
        if self.session_id.as_deref() == Some("") || self.subscriber.as_deref() == Some("") {
            return bad("session_id and subscriber must not be empty".into());
        }
        let (price, total) = match (self.amount, self.units, self.unit_price) {
            (Some(a), None, None) => (Price::Amount(a), Some(a)),
            (None, Some(u), p) => {
                let p = p.unwrap_or(unit_price);
                (
                    Price::Units {
                        units: u,
                        unit_price: Some(p),
                    },
                    u.checked_mul(p),
                )
            }
            (Some(_), _, _) => {
                return bad("give amount, or units (and unit_price), not both".into())
            }
            (None, None, _) => return bad("give amount, or units (and unit_price)".into()),
        };
        let total = match total {
            Some(0) => return bad("the charge is for nothing (0)".into()),
            Some(t) if t <= MAX_TOTAL => t,
            _ => return bad(format!("the total is over {MAX_TOTAL}")),
        };
        let currency = self
            .currency
            .clone()
            .unwrap_or_else(|| currency.to_string());
        if !is_currency(&currency) {
            return bad(format!(
                "currency {currency:?} is not an ISO 4217 code like EUR"
            ));
        }
        let description = self.description.clone().unwrap_or_default();
        if description.len() > MAX_DESCRIPTION || description.chars().any(char::is_control) {
            return bad(format!(
                "description must be at most {MAX_DESCRIPTION} bytes without control characters"
            ));
        }
        Ok(CheckedCharge {
            relay_event_id: relay_event_id(&self.event_id),
            price,
            total,
            currency,
            description,
        })
    }
}

/// The event ids asked for in this run of the agent, each with a fingerprint of what it
/// charged (session, subscriber, total, currency), so that an id used again for a different
/// charge is refused. Holds the last [`LEDGER_SIZE`] ids; older ones are left to the relay,
/// which stores each id once whatever it carries.
#[derive(Debug, Default)]
pub struct EventLedger {
    seen: HashMap<String, u64>,
    order: VecDeque<String>,
}

impl EventLedger {
    /// Records `event_id` for a charge of `fingerprint`; refuses it when the id was used for
    /// a different one.
    pub fn record(&mut self, event_id: &str, fingerprint: u64) -> Result<(), ChargeError> {
        match self.seen.get(event_id) {
            Some(f) if *f == fingerprint => return Ok(()),
            Some(_) => return Err(ChargeError::EventIdReused(event_id.to_string())),
            None => {}
        }
        if self.order.len() >= LEDGER_SIZE {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(event_id.to_string(), fingerprint);
        self.order.push_back(event_id.to_string());
        Ok(())
    }

    /// Forgets `event_id` (its charge was refused before it reached the relay, so it may be
    /// asked for again, corrected).
    pub fn forget(&mut self, event_id: &str) {
        if self.seen.remove(event_id).is_some() {
            self.order.retain(|e| e != event_id);
        }
    }
}

/// The fingerprint of a charge: whom, how much, in what.
pub fn fingerprint(session_id: Option<&str>, subscriber: &str, checked: &CheckedCharge) -> u64 {
    let mut h = DefaultHasher::new();
    session_id.hash(&mut h);
    subscriber.hash(&mut h);
    checked.total.hash(&mut h);
    checked.currency.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn charge() -> AppCharge {
        AppCharge {
            event_id: "level-1".into(),
            session_id: Some("c1@relay".into()),
            amount: Some(25),
            ..AppCharge::default()
        }
    }

    #[test]
    fn a_good_charge_resolves_its_defaults() {
        let c = charge().check(3, "EUR").unwrap();
        assert_eq!(c.relay_event_id, "app:level-1");
        assert_eq!((c.price, c.total), (Price::Amount(25), 25));
        assert_eq!(c.currency, "EUR");
        let units = AppCharge {
            amount: None,
            units: Some(4),
            ..charge()
        }
        .check(3, "EUR")
        .unwrap();
        assert_eq!(
            units.price,
            Price::Units {
                units: 4,
                unit_price: Some(3)
            }
        );
        assert_eq!(units.total, 12);
        let priced = AppCharge {
            amount: None,
            units: Some(2),
            unit_price: Some(5),
            currency: Some("USD".into()),
            ..charge()
        }
        .check(3, "EUR")
        .unwrap();
        assert_eq!((priced.total, priced.currency.as_str()), (10, "USD"));
    }

    #[test]
    fn malformed_charges_are_refused_with_the_reason() {
        let err = |c: AppCharge| c.check(1, "EUR").unwrap_err().to_string();
        for id in ["", "has space", "é", &"x".repeat(129), "a/b"] {
            let e = err(AppCharge {
                event_id: id.into(),
                ..charge()
            });
            assert!(e.contains("event_id"), "{id:?}: {e}");
        }
        assert!(is_event_id("order:42_b.c-d"));
        assert!(err(AppCharge {
            session_id: None,
            ..charge()
        })
        .contains("give session_id"));
        assert!(err(AppCharge {
            units: Some(1),
            ..charge()
        })
        .contains("not both"));
        assert!(err(AppCharge {
            amount: None,
            ..charge()
        })
        .contains("give amount"));
        assert!(err(AppCharge {
            amount: Some(0),
            ..charge()
        })
        .contains("nothing"));
        assert!(err(AppCharge {
            amount: None,
            units: Some(u64::MAX),
            unit_price: Some(2),
            ..charge()
        })
        .contains("over"));
        assert!(err(AppCharge {
            currency: Some("eur".into()),
            ..charge()
        })
        .contains("ISO 4217"));
        assert!(err(AppCharge {
            description: Some("a\nb".into()),
            ..charge()
        })
        .contains("description"));
    }

    #[test]
    fn the_body_refuses_unknown_fields() {
        let e = serde_json::from_str::<AppCharge>(r#"{"event_id":"a","amount":1,"price":2}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let c: AppCharge =
            serde_json::from_str(r#"{"event_id":"a","subscriber":"bob","amount":1}"#).unwrap();
        assert_eq!(c.subscriber.as_deref(), Some("bob"));
    }

    #[test]
    fn the_ledger_refuses_an_event_id_used_for_another_charge() {
        let mut ledger = EventLedger::default();
        let a = charge().check(1, "EUR").unwrap();
        let b = AppCharge {
            amount: Some(26),
            ..charge()
        }
        .check(1, "EUR")
        .unwrap();
        let fa = fingerprint(Some("c1@relay"), "alice", &a);
        let fb = fingerprint(Some("c1@relay"), "alice", &b);
        assert_ne!(fa, fb);
        ledger.record("level-1", fa).unwrap();
        ledger.record("level-1", fa).unwrap();
        assert_eq!(
            ledger.record("level-1", fb).unwrap_err(),
            ChargeError::EventIdReused("level-1".into())
        );
        ledger.forget("level-1");
        ledger.record("level-1", fb).unwrap();
    }
}
