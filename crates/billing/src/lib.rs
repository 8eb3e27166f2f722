//! Billing for the service relay: tariffs, session and charge records, a crash-safe
//! store and reports. There is no SIP in here; `relayd` calls it when a session is
//! confirmed, while it lives, when it ends, and when an application server asks to
//! charge.
//!
//! * [`money`] — amounts as integer minor units with a currency code; no floats anywhere.
//! * [`tariff`] — setup charge, rate per period, billing increment `a/b`, free seconds;
//!   a [`TariffTable`] loaded from the relay's `[[tariffs]]` and looked up by service and
//!   plan, with a default.
//! * [`record`] — [`SessionRecord`] (time billing), [`ChargeRecord`] (application
//!   billing), [`EndCause`].
//! * [`store`] — the [`Store`] trait and its requests; [`sqlite`] — [`SqliteStore`], the
//!   embedded default (bundled SQLite, WAL, `synchronous=FULL`, versioned schema);
//!   [`postgresql`] — [`PostgresStore`], the same on a PostgreSQL database that several
//!   relays can share; [`backend`] — [`AnyStore`] over either, chosen by a
//!   [`StorageBackend`].
//! * [`writer`] — the group-commit [`Writer`] thread and its `Clone + Send + Sync`
//!   [`WriterHandle`], awaitable from async code or waited on from threads.
//! * [`report`] — totals per subscriber, service or server over a period; CSV and JSON
//!   lines exports.
//!
//! # Using it
//!
//! ```
//! use billing::{CloseSession, EndCause, OpenSession, SqliteStore, Store, TariffTable, Writer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("billing.db");
//! let tariffs = TariffTable::from_toml_str(
//!     r#"
//!     [[tariffs]]
//!     name = "standard"
//!     currency = "EUR"
//!     setup = 10
//!     rate = 2             # minor units per 60 s
//!     increment = "60/60"
//!     "#,
//! )?;
//!
//! // At start-up, before taking traffic: close what a crash left open.
//! let mut store = SqliteStore::open(&path)?;
//! let recovered = store.recover("", 1_700_000_000_000)?;
//! assert!(recovered.is_empty());
//! let writer = Writer::spawn(store)?;
//! let billing = writer.handle(); // clone it into every session task
//!
//! // On the terminal's ACK: journal the session. In async code, `.await` instead of `.wait()`.
//! billing
//!     .open_session(OpenSession {
//!         node: String::new(),
//!         session_id: "s-1".into(),
//!         call_id: "a84b4c76e66710@terminal".into(),
//!         server_call_id: "9f2c01@as1".into(),
//!         subscriber: "alice".into(),
//!         service: "video".into(),
//!         server: "as1".into(),
//!         account: Some("acme".into()),
//!         plan: "gold".into(),
//!         tariff: tariffs.lookup("video", "gold")?.clone(),
//!         confirmed_at_ms: 1_700_000_000_000,
//!     })
//!     .wait()?;
//!
//! // On BYE: the record is durable when this returns; only then answer 200.
//! let record = billing
//!     .close_session(CloseSession {
//!         session_id: "s-1".into(),
//!         ended_at_ms: 1_700_000_061_000,
//!         cause: EndCause::CallerBye,
//!     })
//!     .wait()?;
//! assert_eq!(record.charge.minor, 10 + 2 * 2); // setup + two started minutes
//!
//! // A charge arriving just after the BYE still finds its session, by either Call-ID.
//! let ended = billing.find_ended("9f2c01@as1", 1_700_000_061_000 - 600_000).wait()?;
//! assert_eq!(ended.map(|s| s.session_id).as_deref(), Some("s-1"));
//! writer.shutdown()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Durability
//!
//! * The SQLite store runs in WAL mode with `synchronous=FULL`: when a transaction's
//!   `COMMIT` returns, it has been written and `fsync`ed to the write-ahead log, so it
//!   survives a crash of the relay and of the machine.
//! * The PostgreSQL store commits each batch with `synchronous_commit = on`: `COMMIT`
//!   returns once the server has flushed its WAL (see [`postgresql`]).
//! * The [`Writer`] answers a request only after the transaction holding it has
//!   committed. A relay that awaits [`WriterHandle::close_session`] before sending the
//!   200 to a `BYE` never acknowledges a disconnection whose record could be lost.
//! * Group commit keeps that cheap: the writer thread drains every request waiting in its
//!   queue into one transaction, so one `fsync` covers them all
//!   (`scripts/bench-billing.sh` measures it). Within a batch each request is atomic on
//!   its own: a refused one (bad input, unknown session) leaves no trace and does not
//!   affect the others; if the transaction cannot commit, every request in it fails with
//!   [`BillingError::CommitFailed`] and nothing of it is stored.
//! * A request is queued when the handle's method is called, not when its [`Pending`] is
//!   first polled; dropping the `Pending` (a cancelled task) does not cancel the write.
//! * Rows are never partial: tables are `STRICT` and `CHECK`ed (non-empty keys, amounts
//!   at least zero, `duration = ended − confirmed`, known end causes), a session's record
//!   and the removal of its journal row share one transaction, and a charge is unique per
//!   (server, event id), so resubmitting an event returns the first record with
//!   `duplicate = true` and charges nothing more.
//! * Bad input — a negative amount, an unknown tariff, an empty id, a time outside
//!   1970–9999 — is refused with an error naming the problem before anything is written.
//!   A file that is not a billing database, is damaged, or has a newer schema is refused
//!   with an error naming the file, and is left untouched.
//!
//! # Recovery after a crash
//!
//! A session is *journaled* (a row in `open_sessions`) when it is confirmed, with a
//! snapshot of its tariff. While it lives, the relay refreshes its `last_seen` time in
//! batches ([`WriterHandle::touch_sessions`], one request for all live sessions, e.g.
//! every 30 s). Closing it writes its [`SessionRecord`] and deletes the journal row in the
//! same transaction.
//!
//! If the relay dies, the journal holds exactly the sessions that were open.
//! [`Store::recover`]`(node, now)`, run at start-up before the relay takes traffic,
//! closes each of its own (journaled under its `node` name) with cause
//! [`EndCause::RecoveredAfterRestart`]:
//!
//! * it ends at its `last_seen` time (never after `now`, never before its confirmation),
//!   so the subscriber is billed up to the last moment the relay knew the session was
//!   alive — at most one refresh interval less than the truth, never more;
//! * it is rated with the tariff journaled at confirmation, whatever the configuration
//!   says after the restart;
//! * it is closed once: each record is written in the transaction that deletes its
//!   journal row, so running recovery again (or after a crash during recovery) finds
//!   only the sessions not yet closed, and the second run closes nothing.
//!
//! Sessions the relay ends on an orderly shutdown are closed normally with cause
//! [`EndCause::RelayShutdown`] and never reach recovery.
//!
//! # Several relays on one database: leases
//!
//! Relays sharing a PostgreSQL database each journal their sessions under their own node
//! name ([`OpenSession::node`]) and renew a lease on them by touching them all
//! ([`Op::TouchAll`] for their node, every few seconds). A relay's recovery closes only
//! its own sessions. When a relay dies and stays dead, the others' [`Op::ClaimLost`]
//! (run periodically with the lease length) closes each of its sessions once its lease
//! has expired — last seen more than the lease ago — with cause [`EndCause::RelayLost`],
//! billed up to its last-seen time as recovery would. Each session is closed exactly
//! once: its record is written in the transaction that deletes its journal row, and only
//! one transaction can delete it, so two relays claiming at once, or the dead relay
//! coming back and recovering, find nothing left to bill; a relay that was only cut off
//! and later closes such a session gets [`BillingError::UnknownSession`] and writes no
//! record.

pub mod backend;
pub mod error;
pub mod money;
mod oneshot;
pub mod postgresql;
pub mod record;
pub mod report;
pub mod sqlite;
pub mod store;
pub mod tariff;
pub mod writer;

/// The real PostgreSQL server of the integration tests, for the unit tests of
/// [`postgresql`]'s migrations.
#[cfg(test)]
#[path = "../tests/support/pg_server.rs"]
mod test_pg_server;

pub use backend::{AnyStore, StorageBackend};
pub use error::BillingError;
pub use money::{Currency, Money, MoneyError};
pub use postgresql::PostgresStore;
pub use record::{ChargeRecord, EndCause, SessionRecord, UnitCharge};
pub use report::{ExportFormat, GroupBy, RecordKind, Total};
pub use sqlite::SqliteStore;
pub use store::{
    ChargeAmount, CloseSession, EndedSession, JournaledSession, NewCharge, Op, OpenSession,
    Outcome, Period, Store, TouchSessions,
};
pub use tariff::{Increment, Tariff, TariffError, TariffSpec, TariffTable};
pub use writer::{Pending, Writer, WriterConfig, WriterHandle, WriterStats};
