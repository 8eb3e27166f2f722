//! The crate's error type.

use std::path::PathBuf;

use crate::money::MoneyError;
use crate::tariff::TariffError;

/// Everything that can go wrong in the billing crate. Each variant names the problem, and
/// a refused request never alters what is already stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BillingError {
    /// A field of a request is empty, too long, or otherwise unusable.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An amount below zero was submitted.
    #[error("negative amount: {field} is {minor} minor units; amounts must be zero or more")]
    NegativeAmount {
        /// The offending field.
        field: &'static str,
        /// The amount submitted.
        minor: i64,
    },
    /// An amount could not be computed (overflow, currency mismatch, bad code).
    #[error(transparent)]
    Money(#[from] MoneyError),
    /// A tariff is unknown or unusable.
    #[error(transparent)]
    Tariff(#[from] TariffError),
    /// A session with this id is already journaled as open.
    #[error("session {session_id:?} is already open")]
    SessionAlreadyOpen {
        /// The session id.
        session_id: String,
    },
    /// No open session has this id (never opened, or already closed).
    #[error("no open session {session_id:?} (never opened or already closed)")]
    UnknownSession {
        /// The session id.
        session_id: String,
    },
    /// The database file is not a billing database, or it is damaged. (For PostgreSQL,
    /// `path` is the database's URL without the password.)
    #[error("{}: not a billing database or damaged: {detail}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The database was written by a newer build with a schema this one does not know.
    #[error("{}: billing schema version {found} is newer than version {supported} known to this build; use a newer build", path.display())]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The version in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The database has an older schema and was opened read-only, so it cannot be migrated.
    #[error("{}: billing schema version {found} is older than version {supported}; open it read-write once to migrate it", path.display())]
    OlderSchema {
        /// The database file.
        path: PathBuf,
        /// The version in the file.
        found: i64,
        /// The version this build needs.
        supported: i64,
    },
    /// The database refused an operation.
    #[error("{}: {source}", path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The PostgreSQL server refused an operation, or could not be reached.
    #[error("{target}: {source}")]
    Postgres {
        /// The database, as its URL without the password.
        target: String,
        /// The client's error.
        #[source]
        source: postgres::Error,
    },
    /// The transaction holding this request failed to commit, so nothing of it was stored.
    #[error("billing commit failed, the request was not stored: {detail}")]
    CommitFailed {
        /// The cause of the failure.
        detail: String,
    },
    /// A stored row could not be read back into a record.
    #[error("stored {table} row {key} cannot be read: {detail}")]
    BadRow {
        /// The table.
        table: &'static str,
        /// The row's record id or session id.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A store answered an op with the outcome of another kind of op (a bug in the store).
    #[error("the billing store answered a {expected} request with another kind of outcome")]
    UnexpectedOutcome {
        /// The kind of op that was sent.
        expected: &'static str,
    },
    /// The group-commit writer has stopped; nothing more can be written through it.
    #[error("the billing writer has stopped")]
    WriterStopped,
    /// Writing an export failed.
    #[error("billing export: {0}")]
    Io(#[from] std::io::Error),
}
