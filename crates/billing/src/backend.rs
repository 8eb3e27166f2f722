//! The choice of billing backend: [`StorageBackend`] says which database (`[storage]
//! backend = "sqlite" | "postgres"` in a relay's configuration), and [`AnyStore`] is a
//! [`Store`] over either, for the [`Writer`](crate::writer::Writer) and the reports.

use std::path::PathBuf;

use crate::error::BillingError;
use crate::postgresql::PostgresStore;
use crate::record::{ChargeRecord, SessionRecord};
use crate::sqlite::SqliteStore;
use crate::store::{JournaledSession, Op, Outcome, Period, Store};

/// Where billing records are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageBackend {
    /// An SQLite file on this machine: one relay, nothing to install (the default).
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL database, which several relays can share.
    Postgres {
        /// A `postgres://user[:password]@host[:port]/dbname` URL or a `key=value`
        /// connection string.
        url: String,
    },
}

/// A billing store on either backend.
// A process holds one or two, moved once into the writer thread: the variants' sizes
// do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyStore {
    /// SQLite.
    Sqlite(SqliteStore),
    /// PostgreSQL.
    Postgres(PostgresStore),
}

impl AnyStore {
    /// Opens the store for reading and writing, creating or migrating its schema.
    pub fn open(backend: &StorageBackend) -> Result<Self, BillingError> {
        Ok(match backend {
            StorageBackend::Sqlite { path } => AnyStore::Sqlite(SqliteStore::open(path)?),
            StorageBackend::Postgres { url } => AnyStore::Postgres(PostgresStore::connect(url)?),
        })
    }

    /// Opens the store read-only (for reports); the schema must be the current one.
    pub fn open_read_only(backend: &StorageBackend) -> Result<Self, BillingError> {
        Ok(match backend {
            StorageBackend::Sqlite { path } => AnyStore::Sqlite(SqliteStore::open_read_only(path)?),
            StorageBackend::Postgres { url } => {
                AnyStore::Postgres(PostgresStore::connect_read_only(url)?)
            }
        })
    }

    /// The backend's name: `sqlite` or `postgres`.
    pub const fn kind(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgres",
        }
    }

    fn inner(&self) -> &dyn Store {
        match self {
            AnyStore::Sqlite(s) => s,
            AnyStore::Postgres(s) => s,
        }
    }
}

impl Store for AnyStore {
    fn apply(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, BillingError>>, BillingError> {
        match self {
            AnyStore::Sqlite(s) => s.apply(ops),
            AnyStore::Postgres(s) => s.apply(ops),
        }
    }

    fn journal(&self) -> Result<Vec<JournaledSession>, BillingError> {
        self.inner().journal()
    }

    fn scan_sessions(
        &self,
        period: Period,
        visit: &mut dyn FnMut(SessionRecord) -> Result<(), BillingError>,
    ) -> Result<(), BillingError> {
        self.inner().scan_sessions(period, visit)
    }

    fn scan_charges(
        &self,
        period: Period,
        visit: &mut dyn FnMut(ChargeRecord) -> Result<(), BillingError>,
    ) -> Result<(), BillingError> {
        self.inner().scan_charges(period, visit)
    }
}
