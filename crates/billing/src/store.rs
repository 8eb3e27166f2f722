//! The [`Store`] trait: what the relay asks of durable billing storage, and the requests
//! it sends.
//!
//! Writes are [`Op`]s applied in batches: [`Store::apply`] runs a batch as one transaction
//! in which each op succeeds or fails on its own, and returns only after the transaction
//! is durable. One op only reads, [`Op::FindEnded`]: it runs in the batch's transaction, so
//! it sees what the ops before it wrote. The group-commit [`writer`](crate::writer) is built on that; the provided
//! single-op methods ([`Store::open_session`], [`Store::close_session`], …) are batches of
//! one, for start-up, tools and tests.

use std::collections::HashSet;

use crate::error::BillingError;
use crate::money::Money;
use crate::record::{ChargeRecord, EndCause, SessionRecord, UnitCharge};
use crate::tariff::Tariff;

/// The longest id, name or Call-ID accepted, in bytes.
pub const MAX_FIELD_LEN: usize = 256;
/// The longest charge description accepted, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// The latest time accepted, Unix ms: 9999-12-31T23:59:59.999Z.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// A half-open time range `[since_ms, until_ms)` in Unix ms, for queries and reports.
///
/// A session record falls in the period in which it *ended*; a charge record in the one
/// in which it was charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period {
    /// The first millisecond included.
    pub since_ms: i64,
    /// The first millisecond no longer included.
    pub until_ms: i64,
}

impl Period {
    /// `[since_ms, until_ms)`, refused if it ends before it starts.
    pub fn new(since_ms: i64, until_ms: i64) -> Result<Self, BillingError> {
        if until_ms < since_ms {
            return Err(BillingError::InvalidInput {
                field: "period",
                reason: format!("it ends ({until_ms}) before it starts ({since_ms})"),
            });
        }
        Ok(Period { since_ms, until_ms })
    }

    /// All time.
    pub const fn all() -> Self {
        Period {
            since_ms: i64::MIN,
            until_ms: i64::MAX,
        }
    }

    /// Whether `t_ms` falls in the period.
    pub const fn contains(&self, t_ms: i64) -> bool {
        self.since_ms <= t_ms && t_ms < self.until_ms
    }
}

/// A session confirmed by the terminal: journal it so its billing survives a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSession {
    /// The relay that owns the session and renews its lease ([`Op::TouchAll`]): its
    /// `[storage] node` name, `""` for a lone relay. Only this node recovers the session
    /// after a restart; any other closes it as `relay-lost` once its lease has expired
    /// ([`Op::ClaimLost`]).
    pub node: String,
    /// The relay's session id, unique among open sessions.
    pub session_id: String,
    /// The SIP Call-ID of the terminal's leg.
    pub call_id: String,
    /// The SIP Call-ID of the application server's leg; `""` when unknown (sessions
    /// journaled before schema version 4 of SQLite, 3 of PostgreSQL, read back with `""`).
    /// Kept in the session's record, so that an ended session can be found by it
    /// ([`Op::FindEnded`]).
    pub server_call_id: String,
    /// The subscriber billed.
    pub subscriber: String,
    /// The service delivered.
    pub service: String,
    /// The application server delivering it.
    pub server: String,
    /// The application-server account that speaks for [`server`](Self::server), kept in
    /// the session's record; `None` for a static server with no account (and for sessions
    /// journaled before the column existed). Not empty when given.
    pub account: Option<String>,
    /// The subscriber's plan.
    pub plan: String,
    /// The tariff that will rate the session; a snapshot is journaled, so a configuration
    /// change (or a restart with another configuration) does not re-rate open sessions.
    pub tariff: Tariff,
    /// When the session was confirmed, Unix ms.
    pub confirmed_at_ms: i64,
}

/// An open session as found in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournaledSession {
    /// The session as it was opened.
    pub session: OpenSession,
    /// The last time the relay saw it alive, Unix ms.
    pub last_seen_ms: i64,
}

/// A session that has ended, as [`Op::FindEnded`] finds it: what a charge that arrives
/// after its end needs to be billed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedSession {
    /// The relay's session id.
    pub session_id: String,
    /// The SIP Call-ID of the terminal's leg.
    pub call_id: String,
    /// The SIP Call-ID of the application server's leg; `""` for a session journaled
    /// before it was kept.
    pub server_call_id: String,
    /// The subscriber billed.
    pub subscriber: String,
    /// The service delivered.
    pub service: String,
    /// The application server that delivered it.
    pub server: String,
    /// The application-server account that speaks for the server; `None` for a static
    /// server with no account, or a session journaled before it was kept.
    pub account: Option<String>,
    /// When the session ended, Unix ms (its record's end time).
    pub ended_at_ms: i64,
}

/// Refresh the last-seen time of live sessions (sessions no longer open are skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TouchSessions {
    /// The sessions seen alive.
    pub session_ids: Vec<String>,
    /// When they were seen, Unix ms; a last-seen time never moves backwards.
    pub seen_at_ms: i64,
}

/// A session ended: write its record and drop it from the journal, atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseSession {
    /// The session id given when it was opened.
    pub session_id: String,
    /// When it ended, Unix ms; an end before the confirmation (a clock step) counts as a
    /// zero-length session.
    pub ended_at_ms: i64,
    /// Why it ended.
    pub cause: EndCause,
}

/// How much a charge event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeAmount {
    /// A total amount.
    Total(Money),
    /// A number of units at a unit price.
    Units {
        /// The number of units.
        units: i64,
        /// The price of one unit.
        unit_price: Money,
    },
}

/// An application server asks to charge a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCharge {
    /// The relay's session id, when charged within a session.
    pub session_id: Option<String>,
    /// The application server asking.
    pub server: String,
    /// The subscriber to charge.
    pub subscriber: String,
    /// The service, when known.
    pub service: Option<String>,
    /// The server's own event id; resubmitting it charges nothing more.
    pub event_id: String,
    /// The amount.
    pub amount: ChargeAmount,
    /// What is charged, for the subscriber's bill (may be empty).
    pub description: String,
    /// When the charge was requested, Unix ms.
    pub charged_at_ms: i64,
}

/// One write request to a [`Store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Journal a confirmed session.
    Open(OpenSession),
    /// Refresh the last-seen time of live sessions.
    Touch(TouchSessions),
    /// Refresh the last-seen time of every open session of one relay, which need not keep
    /// a list of them to say so: this renews its lease on them.
    TouchAll {
        /// The relay whose sessions are alive (see [`OpenSession::node`]).
        node: String,
        /// When they were seen, Unix ms; a last-seen time never moves backwards.
        seen_at_ms: i64,
    },
    /// Close a session and write its record.
    Close(CloseSession),
    /// Record an application charge.
    Charge(NewCharge),
    /// Close every session a crash of this relay left in the journal (see the crate
    /// documentation), cause `recovered-after-restart`; other relays' sessions stay.
    Recover {
        /// The relay starting up (see [`OpenSession::node`]).
        node: String,
        /// The current time, Unix ms; no recovered session ends later than this.
        now_ms: i64,
    },
    /// Close every session of *other* relays whose lease has expired (last seen more than
    /// `lease_ms` before `now_ms`), cause `relay-lost`, at its last-seen time (as
    /// recovery does). Each is closed once, however many relays claim at the same moment:
    /// its journal row is deleted by exactly one transaction.
    ClaimLost {
        /// The relay claiming; its own sessions are never claimed.
        node: String,
        /// How long a relay's sessions stay its own without a renewal, ms (more than 0).
        lease_ms: i64,
        /// The current time, Unix ms.
        now_ms: i64,
    },
    /// Find the ended session whose session id, terminal Call-ID or server Call-ID is
    /// `key` and that ended at or after `ended_since_ms`; when several match (a call's
    /// later billing segments share its terminal Call-ID), the one that ended last (then
    /// the latest record). An empty key matches nothing. It writes nothing; run through
    /// the [`Writer`](crate::writer::Writer), it sees every record committed before it was
    /// submitted (and those of the ops before it in its batch).
    FindEnded {
        /// A session id, a terminal Call-ID or a server Call-ID.
        key: String,
        /// The earliest end time accepted, Unix ms (any value: `i64::MIN` accepts all).
        ended_since_ms: i64,
    },
}

impl Op {
    /// A short name of the op, for logs and errors.
    pub const fn kind(&self) -> &'static str {
        match self {
            Op::Open(_) => "open",
            Op::Touch(_) => "touch",
            Op::TouchAll { .. } => "touch-all",
            Op::Close(_) => "close",
            Op::Charge(_) => "charge",
            Op::Recover { .. } => "recover",
            Op::ClaimLost { .. } => "claim-lost",
            Op::FindEnded { .. } => "find-ended",
        }
    }
}

/// The result of one successful [`Op`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The session is journaled.
    Opened,
    /// This many open sessions had their last-seen time refreshed.
    Touched(usize),
    /// The session's record, now stored.
    Closed(SessionRecord),
    /// The charge record; `duplicate` when the event had been charged before and the
    /// record is the earlier one.
    Charged {
        /// The stored record.
        record: ChargeRecord,
        /// Whether this event had been charged before.
        duplicate: bool,
    },
    /// The records of the sessions closed by recovery.
    Recovered(Vec<SessionRecord>),
    /// The records of the other relays' sessions closed as `relay-lost`.
    Claimed(Vec<SessionRecord>),
    /// The ended session found by [`Op::FindEnded`], if any.
    FoundEnded(Option<EndedSession>),
}

fn unexpected(expected: &'static str) -> BillingError {
    BillingError::UnexpectedOutcome { expected }
}

impl Outcome {
    /// `()` for [`Outcome::Opened`].
    pub fn into_opened(self) -> Result<(), BillingError> {
        match self {
            Outcome::Opened => Ok(()),
            _ => Err(unexpected("open")),
        }
    }

    /// The count of [`Outcome::Touched`].
    pub fn into_touched(self) -> Result<usize, BillingError> {
        match self {
            Outcome::Touched(n) => Ok(n),
            _ => Err(unexpected("touch")),
        }
    }

    /// The record of [`Outcome::Closed`].
    pub fn into_closed(self) -> Result<SessionRecord, BillingError> {
        match self {
            Outcome::Closed(r) => Ok(r),
            _ => Err(unexpected("close")),
        }
    }

    /// The record and duplicate flag of [`Outcome::Charged`].
    pub fn into_charged(self) -> Result<(ChargeRecord, bool), BillingError> {
        match self {
            Outcome::Charged { record, duplicate } => Ok((record, duplicate)),
            _ => Err(unexpected("charge")),
        }
    }

    /// The records of [`Outcome::Recovered`].
    pub fn into_recovered(self) -> Result<Vec<SessionRecord>, BillingError> {
        match self {
            Outcome::Recovered(r) => Ok(r),
            _ => Err(unexpected("recover")),
        }
    }

    /// The records of [`Outcome::Claimed`].
    pub fn into_claimed(self) -> Result<Vec<SessionRecord>, BillingError> {
        match self {
            Outcome::Claimed(r) => Ok(r),
            _ => Err(unexpected("claim-lost")),
        }
    }

    /// The session of [`Outcome::FoundEnded`].
    pub fn into_found_ended(self) -> Result<Option<EndedSession>, BillingError> {
        match self {
            Outcome::FoundEnded(s) => Ok(s),
            _ => Err(unexpected("find-ended")),
        }
    }
}

/// Durable billing storage.
///
/// Implementations must make [`apply`](Store::apply) atomic per op and durable per batch:
/// when it returns, every `Ok` outcome is on stable storage and every `Err` op left no
/// trace; if the batch cannot be committed at all, it returns `Err` and nothing of the
/// batch is stored.
pub trait Store: Send {
    /// Applies `ops` in one transaction, each op succeeding or failing on its own, and
    /// returns their results in order once the transaction is durable.
    fn apply(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, BillingError>>, BillingError>;

    /// The sessions currently journaled as open, oldest confirmation first.
    fn journal(&self) -> Result<Vec<JournaledSession>, BillingError>;

    /// Calls `visit` with every session record that ended within `period`, in order of
    /// end time; stops at the first error `visit` returns.
    fn scan_sessions(
        &self,
        period: Period,
        visit: &mut dyn FnMut(SessionRecord) -> Result<(), BillingError>,
    ) -> Result<(), BillingError>;

    /// Calls `visit` with every charge record charged within `period`, in order of charge
    /// time; stops at the first error `visit` returns.
    fn scan_charges(
        &self,
        period: Period,
        visit: &mut dyn FnMut(ChargeRecord) -> Result<(), BillingError>,
    ) -> Result<(), BillingError>;

    /// Applies a single op in its own transaction.
    fn apply_one(&mut self, op: Op) -> Result<Outcome, BillingError> {
        self.apply(std::slice::from_ref(&op))?
            .pop()
            .unwrap_or(Err(unexpected(op.kind())))
    }

    /// Journals a confirmed session.
    fn open_session(&mut self, session: OpenSession) -> Result<(), BillingError> {
        self.apply_one(Op::Open(session))?.into_opened()
    }

    /// Refreshes the last-seen time of live sessions; returns how many were open.
    fn touch_sessions(&mut self, touch: TouchSessions) -> Result<usize, BillingError> {
        self.apply_one(Op::Touch(touch))?.into_touched()
    }

    /// Refreshes the last-seen time of every open session of `node` (renews its lease);
    /// returns how many there were.
    fn touch_all_open(&mut self, node: &str, seen_at_ms: i64) -> Result<usize, BillingError> {
        self.apply_one(Op::TouchAll {
            node: node.to_owned(),
            seen_at_ms,
        })?
        .into_touched()
    }

    /// Closes a session: writes its record and removes it from the journal, atomically.
    fn close_session(&mut self, close: CloseSession) -> Result<SessionRecord, BillingError> {
        self.apply_one(Op::Close(close))?.into_closed()
    }

    /// Records a charge; a (server, event id) seen before returns the earlier record and
    /// `true`.
    fn record_charge(&mut self, charge: NewCharge) -> Result<(ChargeRecord, bool), BillingError> {
        self.apply_one(Op::Charge(charge))?.into_charged()
    }

    /// Closes every journaled session of `node` with cause `recovered-after-restart`.
    fn recover(&mut self, node: &str, now_ms: i64) -> Result<Vec<SessionRecord>, BillingError> {
        self.apply_one(Op::Recover {
            node: node.to_owned(),
            now_ms,
        })?
        .into_recovered()
    }

    /// Closes every session of nodes other than `node` whose lease of `lease_ms` has
    /// expired at `now_ms`, with cause `relay-lost` (see [`Op::ClaimLost`]).
    fn claim_lost(
        &mut self,
        node: &str,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<SessionRecord>, BillingError> {
        self.apply_one(Op::ClaimLost {
            node: node.to_owned(),
            lease_ms,
            now_ms,
        })?
        .into_claimed()
    }

    /// The ended session whose session id, terminal or server Call-ID is `key`, ended at or
    /// after `ended_since_ms` (see [`Op::FindEnded`]).
    fn find_ended(
        &mut self,
        key: &str,
        ended_since_ms: i64,
    ) -> Result<Option<EndedSession>, BillingError> {
        self.apply_one(Op::FindEnded {
            key: key.to_owned(),
            ended_since_ms,
        })?
        .into_found_ended()
    }

    /// The session records that ended within `period`.
    fn session_records(&self, period: Period) -> Result<Vec<SessionRecord>, BillingError> {
        let mut out = Vec::new();
        self.scan_sessions(period, &mut |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// The charge records charged within `period`.
    fn charge_records(&self, period: Period) -> Result<Vec<ChargeRecord>, BillingError> {
        let mut out = Vec::new();
        self.scan_charges(period, &mut |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }
}

// ---- validation, shared by every implementation ----

fn invalid(field: &'static str, reason: impl Into<String>) -> BillingError {
    BillingError::InvalidInput {
        field,
        reason: reason.into(),
    }
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), BillingError> {
    if value.len() > max {
        return Err(invalid(field, format!("longer than {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "contains a control character"));
    }
    Ok(())
}

fn check_field(field: &'static str, value: &str) -> Result<(), BillingError> {
    if value.is_empty() {
        return Err(invalid(field, "empty"));
    }
    check_text(field, value, MAX_FIELD_LEN)
}

/// A node name: may be empty (a lone relay), otherwise as any other field.
fn check_node(node: &str) -> Result<(), BillingError> {
    check_text("node", node, MAX_FIELD_LEN)
}

fn check_time(field: &'static str, t_ms: i64) -> Result<(), BillingError> {
    if (0..=MAX_TIME_MS).contains(&t_ms) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{t_ms} is not a Unix time in milliseconds between 1970 and 9999"),
        ))
    }
}

impl OpenSession {
    /// Checks every field: ids and names non-empty (but the node and the server Call-ID
    /// may be), at most [`MAX_FIELD_LEN`] bytes, without control characters; the time
    /// between 1970 and 9999.
    pub fn validate(&self) -> Result<(), BillingError> {
        check_node(&self.node)?;
        check_field("session id", &self.session_id)?;
        check_field("call id", &self.call_id)?;
        check_text("server call id", &self.server_call_id, MAX_FIELD_LEN)?;
        check_field("subscriber", &self.subscriber)?;
        check_field("service", &self.service)?;
        check_field("server", &self.server)?;
        if let Some(account) = &self.account {
            check_field("account", account)?;
        }
        check_field("plan", &self.plan)?;
        check_time("confirmed-at", self.confirmed_at_ms)
    }
}

impl TouchSessions {
    /// Checks the time and that no id is empty or oversized.
    pub fn validate(&self) -> Result<(), BillingError> {
        check_time("seen-at", self.seen_at_ms)?;
        self.session_ids
            .iter()
            .try_for_each(|id| check_field("session id", id))
    }
}

impl CloseSession {
    /// Checks the session id and the time.
    pub fn validate(&self) -> Result<(), BillingError> {
        check_field("session id", &self.session_id)?;
        check_time("ended-at", self.ended_at_ms)
    }
}

impl NewCharge {
    /// Checks every field and works out the total: the amount (or unit price) must not be
    /// negative, the unit count not negative, and units × price must fit in 64 bits.
    pub fn validate(&self) -> Result<(Money, Option<UnitCharge>), BillingError> {
        if let Some(session_id) = &self.session_id {
            check_field("session id", session_id)?;
        }
        check_field("server", &self.server)?;
        check_field("subscriber", &self.subscriber)?;
        if let Some(service) = &self.service {
            check_field("service", service)?;
        }
        check_field("event id", &self.event_id)?;
        check_text("description", &self.description, MAX_DESCRIPTION_LEN)?;
        check_time("charged-at", self.charged_at_ms)?;
        match self.amount {
            ChargeAmount::Total(amount) => {
                if amount.is_negative() {
                    return Err(BillingError::NegativeAmount {
                        field: "amount",
                        minor: amount.minor,
                    });
                }
                Ok((amount, None))
            }
            ChargeAmount::Units { units, unit_price } => {
                if unit_price.is_negative() {
                    return Err(BillingError::NegativeAmount {
                        field: "unit price",
                        minor: unit_price.minor,
                    });
                }
                if units < 0 {
                    return Err(invalid("units", format!("negative unit count {units}")));
                }
                let total = unit_price.checked_mul(units)?;
                Ok((
                    total,
                    Some(UnitCharge {
                        units,
                        unit_price_minor: unit_price.minor,
                    }),
                ))
            }
        }
    }
}

impl Op {
    /// Checks the op's input without touching storage.
    pub fn validate(&self) -> Result<(), BillingError> {
        match self {
            Op::Open(o) => o.validate(),
            Op::Touch(t) => t.validate(),
            Op::TouchAll { node, seen_at_ms } => {
                check_node(node)?;
                check_time("seen-at", *seen_at_ms)
            }
            Op::Close(c) => c.validate(),
            Op::Charge(c) => c.validate().map(|_| ()),
            Op::Recover { node, now_ms } => {
                check_node(node)?;
                check_time("now", *now_ms)
            }
            Op::ClaimLost {
                node,
                lease_ms,
                now_ms,
            } => {
                check_node(node)?;
                check_time("now", *now_ms)?;
                if !(1..=MAX_TIME_MS).contains(lease_ms) {
                    return Err(invalid(
                        "lease",
                        format!("{lease_ms} ms is not a lease: it must be more than 0"),
                    ));
                }
                Ok(())
            }
            // An empty key is no error: it finds nothing.
            Op::FindEnded { key, .. } => check_text("key", key, MAX_FIELD_LEN),
        }
    }
}

/// The end time of a session recovered at `now_ms` that was last seen at `last_seen_ms`:
/// its last-seen time, but never after `now_ms` (a clock that jumped back) and never
/// before its confirmation.
pub fn recovered_end(confirmed_at_ms: i64, last_seen_ms: i64, now_ms: i64) -> i64 {
    last_seen_ms.min(now_ms).max(confirmed_at_ms)
}

/// Deduplicates the ids of a touch, so each open session counts once.
pub(crate) fn unique_ids(ids: &[String]) -> Vec<&str> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter()
        .map(String::as_str)
        .filter(|id| seen.insert(*id))
        .collect()
}

/// What either backend must show after upgrading a database whose records and journal
/// predate `server_call_id` and `account` (sessions `s0`, `s1` closed, `live` open, each
/// with Call-ID `call-<id>`): the old records are found by their other keys with neither
/// column, never by the empty key, and the old open session closes (at `ended_at_ms`)
/// with neither column too.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn check_upgraded_sessions_have_no_call_id_of_server(
    store: &mut dyn Store,
    ended_at_ms: i64,
) {
    let found = store.find_ended("call-s1", 0).unwrap().unwrap();
    assert_eq!(
        (
            found.session_id.as_str(),
            found.server_call_id.as_str(),
            found.account
        ),
        ("s1", "", None)
    );
    assert_eq!(store.find_ended("", i64::MIN).unwrap(), None);
    store
        .close_session(CloseSession {
            session_id: "live".into(),
            ended_at_ms,
            cause: EndCause::Timeout,
        })
        .unwrap();
    let found = store.find_ended("live", 0).unwrap().unwrap();
    assert_eq!((found.server_call_id.as_str(), found.account), ("", None));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::money::{Currency, MoneyError};

    fn eur(minor: i64) -> Money {
        Money::new(minor, Currency::new("EUR").unwrap())
    }

    fn charge(amount: ChargeAmount) -> NewCharge {
        NewCharge {
            session_id: None,
            server: "as1".into(),
            subscriber: "alice".into(),
            service: None,
            event_id: "ev-1".into(),
            amount,
            description: "one song".into(),
            charged_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn charge_totals_and_refusals() {
        assert_eq!(
            charge(ChargeAmount::Total(eur(150))).validate().unwrap(),
            (eur(150), None)
        );
        let units = ChargeAmount::Units {
            units: 3,
            unit_price: eur(25),
        };
        assert_eq!(
            charge(units).validate().unwrap(),
            (
                eur(75),
                Some(UnitCharge {
                    units: 3,
                    unit_price_minor: 25
                })
            )
        );
        let err = charge(ChargeAmount::Total(eur(-1))).validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "negative amount: amount is -1 minor units; amounts must be zero or more"
        );
        let err = charge(ChargeAmount::Units {
            units: 2,
            unit_price: eur(-5),
        })
        .validate()
        .unwrap_err();
        assert!(matches!(
            err,
            BillingError::NegativeAmount {
                field: "unit price",
                minor: -5
            }
        ));
        let err = charge(ChargeAmount::Units {
            units: -2,
            unit_price: eur(5),
        })
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("negative unit count -2"), "{err}");
        let err = charge(ChargeAmount::Units {
            units: i64::MAX,
            unit_price: eur(2),
        })
        .validate()
        .unwrap_err();
        assert!(matches!(err, BillingError::Money(MoneyError::Overflow)));
    }

    #[test]
    fn fields_are_checked_by_name() {
        let mut c = charge(ChargeAmount::Total(eur(1)));
        c.event_id.clear();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid event id: empty"
        );
        let mut c = charge(ChargeAmount::Total(eur(1)));
        c.server = "as\r\n1".into();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid server: contains a control character"
        );
        let mut c = charge(ChargeAmount::Total(eur(1)));
        c.description = "x".repeat(MAX_DESCRIPTION_LEN + 1);
        assert!(c.validate().is_err());
        c.description.clear();
        assert!(c.validate().is_ok(), "an empty description is fine");
        let mut c = charge(ChargeAmount::Total(eur(1)));
        c.charged_at_ms = -1;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("invalid charged-at: -1 is not a Unix time"));
        let close = CloseSession {
            session_id: "s".into(),
            ended_at_ms: MAX_TIME_MS + 1,
            cause: EndCause::CallerBye,
        };
        assert!(close.validate().is_err());
    }

    #[test]
    fn recovered_end_is_clamped() {
        assert_eq!(recovered_end(1_000, 5_000, 9_000), 5_000);
        assert_eq!(
            recovered_end(1_000, 5_000, 3_000),
            3_000,
            "clock jumped back"
        );
        assert_eq!(
            recovered_end(1_000, 5_000, 500),
            1_000,
            "never before confirmation"
        );
    }

    #[test]
    fn periods_are_half_open() {
        let p = Period::new(10, 20).unwrap();
        assert!(p.contains(10) && p.contains(19) && !p.contains(20) && !p.contains(9));
        assert!(Period::new(20, 10).is_err());
        assert!(Period::all().contains(0));
    }

    #[test]
    fn touch_ids_are_deduplicated() {
        let ids = vec!["a".to_string(), "b".into(), "a".into()];
        assert_eq!(unique_ids(&ids), ["a", "b"]);
    }
}
