//! [`PostgresStore`]: the billing [`Store`] on PostgreSQL, for relays that share one
//! database. Same semantics as the [`SqliteStore`](crate::sqlite::SqliteStore): the
//! open-session journal, session and charge records with the same idempotency keys, the
//! same per-op atomicity inside a group-committed batch, versioned migrations, and
//! recovery of the sessions a crash left open.
//!
//! # Why a synchronous client
//!
//! The store is driven by the group-commit [`Writer`](crate::writer::Writer): one OS
//! thread owns it and runs one transaction at a time, each covering every request queued
//! meanwhile. That thread wants exactly one connection, used in sequence; a pool would
//! hold connections nobody uses, and an async client would need a runtime on a thread
//! that has nothing else to wait for. So the store holds one [`postgres::Client`] (the
//! synchronous face of `tokio-postgres`, driving it on a private current-thread runtime),
//! the way [`SqliteStore`](crate::sqlite::SqliteStore) holds one rusqlite connection.
//! A connection lost between batches is made again at the next batch.
//!
//! # Durability
//!
//! A batch is one transaction; [`Store::apply`] returns when its `COMMIT` does, and with
//! `synchronous_commit = on` (the server's default, and what the store sets for its own
//! session when it finds `off`) PostgreSQL answers a `COMMIT` only once its WAL is
//! flushed to disk (and, with synchronous standbys configured, to them).
//!
//! A commit whose answer is lost with the connection is in doubt: it may have committed.
//! The batch is reported as [`BillingError::CommitFailed`]; a charge resubmitted with the
//! same event id then comes back as a duplicate, and a close of a session that had in
//! fact been closed as [`BillingError::UnknownSession`] — never a second record.
//!
//! # Atomic ops without savepoints
//!
//! PostgreSQL aborts the whole transaction when one statement fails. Rather than a
//! savepoint around every op (two more round trips each, and past 64 subtransactions in
//! one transaction every other session's snapshot checks slow down), the batch runs
//! without them; the ops' own checks ([`Op::validate`], `ON CONFLICT`, `DELETE …
//! RETURNING`) keep statements from failing in normal use. If one does fail with a data
//! or constraint error, the transaction is rolled back and the batch run again without
//! that op, which is answered with the error: it leaves no trace and the others commit,
//! as on SQLite. Any other error (the connection, the server shutting down) fails the
//! batch.
//!
//! # Schema
//!
//! Everything lives in the PostgreSQL schema `billing` (tables `meta`, `open_sessions`,
//! `session_records`, `charge_records`, the same as the SQLite file's), so the database
//! can hold other parts of the relay's shared state beside it. The version is in
//! `billing.meta`; migrations run in one transaction under an advisory lock, so relays
//! started together migrate once. A `billing` schema with tables but no billing meta
//! table, or a newer version, is refused and left untouched.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postgres::config::Host;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Row, Statement};
use tracing::{debug, info, warn};

use crate::error::BillingError;
use crate::money::{Currency, Money};
use crate::record::{ChargeRecord, EndCause, SessionRecord, UnitCharge};
use crate::store::{
    recovered_end, unique_ids, EndedSession, JournaledSession, NewCharge, Op, OpenSession, Outcome,
    Period, Store, TouchSessions,
};
use crate::tariff::Tariff;

/// The value of `application` in `billing.meta`.
const APPLICATION: &str = "service-relay-billing";

/// The key of the advisory lock taken while migrating (`'billing'` in ASCII).
const MIGRATION_LOCK: i64 = 0x62_69_6c_6c_69_6e_67;

/// One step of the schema's history.
pub(crate) struct Migration {
    /// The schema version after this step; versions are 1, 2, 3, … in order.
    pub(crate) version: i64,
    /// What the step does, for the log.
    pub(crate) description: &'static str,
    /// The SQL that performs it.
    pub(crate) sql: &'static str,
}

const SCHEMA_V1: &str = "
CREATE SCHEMA IF NOT EXISTS billing;

CREATE TABLE billing.meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE billing.open_sessions (
    session_id      TEXT PRIMARY KEY CHECK (length(session_id) > 0),
    call_id         TEXT NOT NULL CHECK (length(call_id) > 0),
    subscriber      TEXT NOT NULL CHECK (length(subscriber) > 0),
    service         TEXT NOT NULL CHECK (length(service) > 0),
    server          TEXT NOT NULL CHECK (length(server) > 0),
    plan            TEXT NOT NULL CHECK (length(plan) > 0),
    tariff          JSON NOT NULL,
    confirmed_at_ms BIGINT NOT NULL CHECK (confirmed_at_ms >= 0),
    last_seen_ms    BIGINT NOT NULL CHECK (last_seen_ms >= confirmed_at_ms)
);

CREATE TABLE billing.session_records (
    record_id       BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    session_id      TEXT NOT NULL CHECK (length(session_id) > 0),
    call_id         TEXT NOT NULL CHECK (length(call_id) > 0),
    subscriber      TEXT NOT NULL CHECK (length(subscriber) > 0),
    service         TEXT NOT NULL CHECK (length(service) > 0),
    server          TEXT NOT NULL CHECK (length(server) > 0),
    plan            TEXT NOT NULL CHECK (length(plan) > 0),
    tariff          TEXT NOT NULL CHECK (length(tariff) > 0),
    confirmed_at_ms BIGINT NOT NULL CHECK (confirmed_at_ms >= 0),
    ended_at_ms     BIGINT NOT NULL CHECK (ended_at_ms >= confirmed_at_ms),
    duration_ms     BIGINT NOT NULL CHECK (duration_ms = ended_at_ms - confirmed_at_ms),
    end_cause       TEXT NOT NULL CHECK (end_cause IN ('caller-bye', 'server-bye', 'timeout',
                        'transferred', 'changed', 'relay-shutdown', 'recovered-after-restart')),
    amount_minor    BIGINT NOT NULL CHECK (amount_minor >= 0),
    currency        TEXT NOT NULL CHECK (length(currency) = 3 AND currency = upper(currency))
);
CREATE INDEX session_records_by_end ON billing.session_records (ended_at_ms);

CREATE TABLE billing.charge_records (
    record_id        BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    session_id       TEXT CHECK (session_id IS NULL OR length(session_id) > 0),
    server           TEXT NOT NULL CHECK (length(server) > 0),
    subscriber       TEXT NOT NULL CHECK (length(subscriber) > 0),
    service          TEXT CHECK (service IS NULL OR length(service) > 0),
    event_id         TEXT NOT NULL CHECK (length(event_id) > 0),
    amount_minor     BIGINT NOT NULL CHECK (amount_minor >= 0),
    currency         TEXT NOT NULL CHECK (length(currency) = 3 AND currency = upper(currency)),
    units            BIGINT CHECK (units IS NULL OR units >= 0),
    unit_price_minor BIGINT CHECK (unit_price_minor IS NULL OR unit_price_minor >= 0),
    description      TEXT NOT NULL,
    charged_at_ms    BIGINT NOT NULL CHECK (charged_at_ms >= 0),
    CHECK ((units IS NULL) = (unit_price_minor IS NULL)),
    CHECK (units IS NULL OR amount_minor = units * unit_price_minor),
    UNIQUE (server, event_id)
);
CREATE INDEX charge_records_by_time ON billing.charge_records (charged_at_ms);
";

/// Version 2, for relays sharing their billing (issue 15); SQLite's version 3 does the same:
///
/// * the end-cause `CHECK` of `session_records` also accepts `relay-lost` (another relay
///   closed a dead relay's session after its lease expired) and `admin` (an operator ended
///   it); PostgreSQL checks every existing row against the new constraint, and each passes,
///   since the old list is part of the new one. The constraint keeps the name PostgreSQL
///   gave the column's check in version 1.
/// * `open_sessions` gets a `node` column: the relay that owns the session and renews its
///   lease. Rows journaled before it belong to `''`, the name of a lone relay, which is
///   what they were; an index by node and last-seen time serves the lease queries.
///
/// A migration is history: its list of causes is frozen here, not generated.
const SCHEMA_V2: &str = "
ALTER TABLE billing.session_records DROP CONSTRAINT session_records_end_cause_check;
ALTER TABLE billing.session_records ADD CONSTRAINT session_records_end_cause_check
    CHECK (end_cause IN ('caller-bye', 'server-bye', 'timeout', 'transferred', 'changed',
        'relay-shutdown', 'recovered-after-restart', 'relay-lost', 'admin'));

ALTER TABLE billing.open_sessions ADD COLUMN node TEXT NOT NULL DEFAULT '';
CREATE INDEX open_sessions_by_node ON billing.open_sessions (node, last_seen_ms);
";

/// Version 3, SQLite's version 4: the server Call-ID and account of sessions, so that a
/// charge arriving after its session ended finds the session in the records:
///
/// * `open_sessions` and `session_records` get `server_call_id`, the SIP Call-ID of the
///   application server's leg (`''` for the rows written before: unknown, and never
///   matched by a lookup), and `account`, the application-server account that speaks for
///   the server (`NULL` for a static server, and for the rows written before);
/// * `session_records` is indexed by each key an ended session is looked up by: its
///   session id, its terminal Call-ID and its server Call-ID. The indexes live in the
///   `billing` schema with their table, named as SQLite's are.
const SCHEMA_V3: &str = "
ALTER TABLE billing.open_sessions
    ADD COLUMN server_call_id TEXT NOT NULL DEFAULT '',
    ADD COLUMN account TEXT CHECK (account IS NULL OR length(account) > 0);
ALTER TABLE billing.session_records
    ADD COLUMN server_call_id TEXT NOT NULL DEFAULT '',
    ADD COLUMN account TEXT CHECK (account IS NULL OR length(account) > 0);
CREATE INDEX session_records_by_session ON billing.session_records (session_id);
CREATE INDEX session_records_by_call ON billing.session_records (call_id);
CREATE INDEX session_records_by_server_call ON billing.session_records (server_call_id);
";

/// The schema's history, oldest first (PostgreSQL's own; it started where SQLite's
/// version 2 stood: its version 2 is SQLite's version 3, its version 3 SQLite's version 4).
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "billing schema: meta, open-session journal, session records, charge records",
        sql: SCHEMA_V1,
    },
    Migration {
        version: 2,
        description: "relay-lost and admin end causes; open sessions owned by a node",
        sql: SCHEMA_V2,
    },
    Migration {
        version: 3,
        description: "server call id and account of sessions; records indexed by each call id",
        sql: SCHEMA_V3,
    },
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 3;

const SESSION_COLUMNS: &str = "record_id, session_id, call_id, subscriber, service, server, plan, \
     tariff, confirmed_at_ms, ended_at_ms, duration_ms, end_cause, amount_minor, currency";
/// What a delete of journal rows returns to write their records:
/// [`PostgresStore::write_record`] reads them by position.
const DELETED_COLUMNS: &str = "session_id, call_id, subscriber, service, server, plan, \
     tariff::text, confirmed_at_ms, last_seen_ms, server_call_id, account";
const CHARGE_COLUMNS: &str = "record_id, session_id, server, subscriber, service, event_id, \
     amount_minor, currency, units, unit_price_minor, description, charged_at_ms";

/// [`Op::FindEnded`]: the latest session record, ended since `$2`, whose session id,
/// terminal Call-ID or server Call-ID is `$1` (never `''`: the caller looks up no empty
/// key); a union of one index lookup per column, as on SQLite.
const FIND_ENDED: &str = "SELECT session_id, call_id, server_call_id, subscriber, service, \
     server, account, ended_at_ms FROM billing.session_records WHERE record_id IN ( \
         SELECT record_id FROM billing.session_records WHERE session_id = $1 \
         UNION SELECT record_id FROM billing.session_records WHERE call_id = $1 \
         UNION SELECT record_id FROM billing.session_records WHERE server_call_id = $1) \
     AND ended_at_ms >= $2 ORDER BY ended_at_ms DESC, record_id DESC LIMIT 1";

/// One run of a batch: each op's result (`None` for ops left out), or the index and error
/// of the op whose statement failed, after which the transaction was rolled back.
type Attempt = Result<Vec<Option<Result<Outcome, BillingError>>>, (usize, BillingError)>;

/// How an op failed inside a batch.
enum OpFailure {
    /// Refused by the store's own logic before anything was written; the batch goes on.
    Refused(BillingError),
    /// A statement failed on its data (a constraint, a bad value): the transaction is
    /// aborted, so the batch is run again without this op.
    Statement(BillingError),
    /// The connection or the server failed: the whole batch fails.
    Fatal(BillingError),
}

/// The PostgreSQL billing store. See the [module documentation](self).
pub struct PostgresStore {
    client: RefCell<Client>,
    /// Set when a batch failed on the connection or the server: the next use connects
    /// again rather than trust a connection in an unknown state.
    broken: Cell<bool>,
    config: Config,
    read_only: bool,
    /// The database, as its URL without the password, for errors and logs.
    target: String,
    /// Prepared statements by their SQL, for this connection.
    statements: RefCell<HashMap<String, Statement>>,
    /// Journaled tariff snapshots already parsed, by their JSON text.
    tariffs: RefCell<HashMap<String, Arc<Tariff>>>,
    /// The JSON snapshots of tariffs already journaled.
    snapshots: RefCell<HashMap<Tariff, Arc<str>>>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// The most tariffs kept in each of the caches; past this a cache starts over.
const TARIFF_CACHE: usize = 64;

/// `postgres://user@host:port/dbname` of a configuration: everything but the password.
fn redacted(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(
            config
                .get_ports()
                .iter()
                .copied()
                .chain(std::iter::repeat(5432)),
        )
        .map(|(host, port)| match host {
            Host::Tcp(name) => format!("{name}:{port}"),
            Host::Unix(dir) => format!("{}:{port}", dir.display()),
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or_default()
    )
}

/// Whether a server error is about the op's data (refuse that op) rather than the
/// connection or the server (fail the batch): data exceptions (class 22), integrity
/// constraint violations (23) and exceptions raised by triggers (P0001).
fn is_statement_error(e: &postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        let code = code.code();
        code.starts_with("22") || code.starts_with("23") || code == SqlState::RAISE_EXCEPTION.code()
    })
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://` URL or a `key=value` string)
    /// for reading and writing, creating or migrating the `billing` schema.
    ///
    /// Refuses, without changing anything, a `billing` schema that is not the billing
    /// store's ([`BillingError::Corrupt`]) or has a newer version
    /// ([`BillingError::NewerSchema`]).
    pub fn connect(url: &str) -> Result<Self, BillingError> {
        Self::connect_with(url, MIGRATIONS)
    }

    /// Connects read-only, e.g. for reports while relays write; the schema must be
    /// exactly the current one.
    pub fn connect_read_only(url: &str) -> Result<Self, BillingError> {
        let store = Self::open_connection(url, true)?;
        let found = store.inspect()?;
        let path = PathBuf::from(&store.target);
        if found > SCHEMA_VERSION {
            return Err(BillingError::NewerSchema {
                path,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            return Err(BillingError::OlderSchema {
                path,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(store)
    }

    pub(crate) fn connect_with(url: &str, migrations: &[Migration]) -> Result<Self, BillingError> {
        let store = Self::open_connection(url, false)?;
        store.migrate(migrations)?;
        debug!(target_db = %store.target, "billing store open");
        Ok(store)
    }

    fn open_connection(url: &str, read_only: bool) -> Result<Self, BillingError> {
        let mut config: Config = url.parse().map_err(|e| BillingError::InvalidInput {
            field: "postgres url",
            reason: format!("{e}"),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("service-relay-billing");
        }
        let target = redacted(&config);
        let client =
            Self::session(&config, read_only).map_err(|source| BillingError::Postgres {
                target: target.clone(),
                source,
            })?;
        Ok(PostgresStore {
            client: RefCell::new(client),
            broken: Cell::new(false),
            config,
            read_only,
            target,
            statements: RefCell::new(HashMap::new()),
            tariffs: RefCell::new(HashMap::new()),
            snapshots: RefCell::new(HashMap::new()),
        })
    }

    /// A new connection with the session settings the store relies on.
    fn session(config: &Config, read_only: bool) -> Result<Client, postgres::Error> {
        let mut client = config.connect(NoTls)?;
        let sync: String = client.query_one("SHOW synchronous_commit", &[])?.get(0);
        if sync == "off" {
            warn!("the server's synchronous_commit is off; the billing store sets it on for its own session");
            client.batch_execute("SET synchronous_commit = on")?;
        }
        let fsync: String = client.query_one("SHOW fsync", &[])?.get(0);
        if fsync != "on" {
            warn!("the PostgreSQL server runs with fsync = off: a crash of its machine can lose committed billing records");
        }
        if read_only {
            client.batch_execute("SET default_transaction_read_only = on")?;
        }
        Ok(client)
    }

    /// The database, as its URL without the password.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64, BillingError> {
        self.inspect()
    }

    /// Runs `sql` (one or more statements, no parameters) on the store's connection:
    /// for tests and tools that look under the store.
    pub fn execute_batch(&self, sql: &str) -> Result<(), BillingError> {
        self.client
            .borrow_mut()
            .batch_execute(sql)
            .map_err(|e| self.pg(e))
    }

    /// The value of a server setting as the store's session sees it (`SHOW name`).
    pub fn setting(&self, name: &str) -> Result<String, BillingError> {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(BillingError::InvalidInput {
                field: "setting",
                reason: format!("{name:?} is not a setting name"),
            });
        }
        let row = self
            .client
            .borrow_mut()
            .query_one(&format!("SHOW {name}"), &[])
            .map_err(|e| self.pg(e))?;
        Ok(row.get(0))
    }

    fn pg(&self, source: postgres::Error) -> BillingError {
        if source.is_closed() {
            self.broken.set(true);
        }
        BillingError::Postgres {
            target: self.target.clone(),
            source,
        }
    }

    fn corrupt(&self, detail: impl Into<String>) -> BillingError {
        BillingError::Corrupt {
            path: PathBuf::from(&self.target),
            detail: detail.into(),
        }
    }

    /// Connects again if the connection was lost (the server restarted, the network
    /// failed); prepared statements go with the old connection.
    fn ensure_connected(&self) -> Result<(), BillingError> {
        if !self.broken.get() && !self.client.borrow().is_closed() {
            return Ok(());
        }
        warn!(target_db = %self.target, "billing database connection lost; connecting again");
        let client = Self::session(&self.config, self.read_only).map_err(|e| self.pg(e))?;
        *self.client.borrow_mut() = client;
        self.statements.borrow_mut().clear();
        self.broken.set(false);
        Ok(())
    }

    /// The statement for `sql`, prepared once per connection.
    fn prepared(&self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(stmt) = self.statements.borrow().get(sql) {
            return Ok(stmt.clone());
        }
        let stmt = self.client.borrow_mut().prepare(sql)?;
        self.statements
            .borrow_mut()
            .insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }

    fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, BillingError> {
        let stmt = self.prepared(sql).map_err(|e| self.pg(e))?;
        self.client
            .borrow_mut()
            .query(&stmt, params)
            .map_err(|e| self.pg(e))
    }

    fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, BillingError> {
        let stmt = self.prepared(sql).map_err(|e| self.pg(e))?;
        self.client
            .borrow_mut()
            .execute(&stmt, params)
            .map_err(|e| self.pg(e))
    }

    /// The schema version: 0 when there is no `billing` schema or it is empty, an error
    /// when it holds something other than the billing store.
    fn inspect(&self) -> Result<i64, BillingError> {
        let tables: Vec<String> = self
            .query(
                "SELECT c.relname::text FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'billing' AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
                 ORDER BY 1",
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if tables.is_empty() {
            return Ok(0);
        }
        if !tables.iter().any(|t| t == "meta") {
            return Err(self.corrupt(format!(
                "its billing schema has tables ({}) but no billing meta table",
                tables.join(", ")
            )));
        }
        let read = |key: &str| -> Result<Option<String>, BillingError> {
            let rows = self
                .client
                .borrow_mut()
                .query(
                    "SELECT value::text FROM billing.meta WHERE key = $1",
                    &[&key],
                )
                .map_err(|e| {
                    if e.code().is_some_and(|c| c.code().starts_with("42")) {
                        self.corrupt(format!("its billing.meta table cannot be read: {e}"))
                    } else {
                        self.pg(e)
                    }
                })?;
            Ok(rows.first().map(|r| r.get(0)))
        };
        match read("application")? {
            Some(app) if app == APPLICATION => {}
            Some(app) => {
                return Err(self.corrupt(format!("its billing.meta table belongs to {app:?}")));
            }
            None => return Err(self.corrupt("its billing.meta table names no application")),
        }
        let version = read("schema_version")?
            .ok_or_else(|| self.corrupt("its billing.meta table has no schema_version"))?;
        version
            .parse::<i64>()
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| self.corrupt(format!("schema_version {version:?} is not a version")))
    }

    fn migrate(&self, migrations: &[Migration]) -> Result<(), BillingError> {
        let latest = migrations.last().map_or(0, |m| m.version);
        // Look before touching anything: a foreign or newer schema stays as it is.
        let found = self.inspect()?;
        if found > latest {
            return Err(BillingError::NewerSchema {
                path: PathBuf::from(&self.target),
                found,
                supported: latest,
            });
        }
        if found == latest {
            return Ok(());
        }
        self.execute_batch("BEGIN")?;
        let result = self.migrate_in_transaction(migrations, latest);
        match result {
            Ok(()) => self.execute_batch("COMMIT"),
            Err(e) => {
                if let Err(rollback) = self.execute_batch("ROLLBACK") {
                    warn!(error = %rollback, "rollback of a failed migration failed");
                }
                Err(e)
            }
        }
    }

    fn migrate_in_transaction(
        &self,
        migrations: &[Migration],
        latest: i64,
    ) -> Result<(), BillingError> {
        // Relays started together: one migrates, the others wait here and find it done.
        self.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        let current = self.inspect()?;
        if current > latest {
            return Err(BillingError::NewerSchema {
                path: PathBuf::from(&self.target),
                found: current,
                supported: latest,
            });
        }
        for m in migrations.iter().filter(|m| m.version > current) {
            info!(target_db = %self.target, version = m.version, step = m.description,
                "migrating billing schema");
            self.execute_batch(m.sql)?;
        }
        self.execute(
            "INSERT INTO billing.meta (key, value) VALUES ('application', $1) \
             ON CONFLICT (key) DO NOTHING",
            &[&APPLICATION],
        )?;
        self.execute(
            "INSERT INTO billing.meta (key, value) VALUES ('schema_version', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&latest.to_string()],
        )?;
        Ok(())
    }

    /// The tariff of a journaled session, parsed once per distinct snapshot.
    fn journaled_tariff(&self, session_id: &str, json: &str) -> Result<Arc<Tariff>, BillingError> {
        let mut cache = self.tariffs.borrow_mut();
        if let Some(tariff) = cache.get(json) {
            return Ok(Arc::clone(tariff));
        }
        let tariff = Arc::new(parse_tariff(session_id, json)?);
        if cache.len() >= TARIFF_CACHE {
            cache.clear();
        }
        cache.insert(json.to_owned(), Arc::clone(&tariff));
        Ok(tariff)
    }

    /// The JSON snapshot journaled for `tariff`, serialised once per distinct tariff.
    fn tariff_snapshot(&self, tariff: &Tariff) -> Result<Arc<str>, BillingError> {
        let mut cache = self.snapshots.borrow_mut();
        if let Some(json) = cache.get(tariff) {
            return Ok(Arc::clone(json));
        }
        let json: Arc<str> = serde_json::to_string(tariff)
            .map_err(|e| BillingError::InvalidInput {
                field: "tariff",
                reason: e.to_string(),
            })?
            .into();
        if cache.len() >= TARIFF_CACHE {
            cache.clear();
        }
        cache.insert(tariff.clone(), Arc::clone(&json));
        Ok(json)
    }

    /// Sorts a failure: a data or constraint error from the server refuses its op after
    /// a rollback, a connection or server error fails the batch, and an error of the
    /// store's own logic refuses its op — after a rollback too when the op may have
    /// written something before failing (`wrote`).
    fn classify(e: BillingError, wrote: bool) -> OpFailure {
        match &e {
            BillingError::Postgres { source, .. } if is_statement_error(source) => {
                OpFailure::Statement(e)
            }
            BillingError::Postgres { .. } => OpFailure::Fatal(e),
            _ if wrote => OpFailure::Statement(e),
            _ => OpFailure::Refused(e),
        }
    }

    fn apply_op(&self, op: &Op) -> Result<Outcome, OpFailure> {
        op.validate().map_err(OpFailure::Refused)?;
        match op {
            // One writing statement each: an error before it or from it left nothing.
            Op::Open(open) => self
                .insert_open(open)
                .map(|()| Outcome::Opened)
                .map_err(|e| Self::classify(e, false)),
            Op::Touch(touch) => self
                .touch(touch)
                .map(Outcome::Touched)
                .map_err(|e| Self::classify(e, false)),
            Op::TouchAll { node, seen_at_ms } => self
                .touch_all(node, *seen_at_ms)
                .map(Outcome::Touched)
                .map_err(|e| Self::classify(e, false)),
            Op::Charge(charge) => self
                .charge(charge)
                .map(|(record, duplicate)| Outcome::Charged { record, duplicate })
                .map_err(|e| Self::classify(e, false)),
            // A failure after the journal row's delete must not leave it deleted.
            Op::Close(close) => {
                match self.close_row(&close.session_id, close.ended_at_ms, close.cause) {
                    Ok(Some(record)) => Ok(Outcome::Closed(record)),
                    Ok(None) => Err(OpFailure::Refused(BillingError::UnknownSession {
                        session_id: close.session_id.clone(),
                    })),
                    Err(e) => Err(Self::classify(e, true)),
                }
            }
            Op::Recover { node, now_ms } => self
                .recover_node(node, *now_ms)
                .map(Outcome::Recovered)
                .map_err(|e| Self::classify(e, true)),
            Op::ClaimLost {
                node,
                lease_ms,
                now_ms,
            } => self
                .claim_lost(node, *lease_ms, *now_ms)
                .map(Outcome::Claimed)
                .map_err(|e| Self::classify(e, true)),
            // A read: it writes nothing, so it can always be refused alone (a failed
            // statement still aborts the transaction, which then runs again without it).
            Op::FindEnded {
                key,
                ended_since_ms,
            } => self
                .find_ended(key, *ended_since_ms)
                .map(Outcome::FoundEnded)
                .map_err(|e| Self::classify(e, false)),
        }
    }

    /// The session record for [`Op::FindEnded`] (see [`FIND_ENDED`]).
    fn find_ended(
        &self,
        key: &str,
        ended_since_ms: i64,
    ) -> Result<Option<EndedSession>, BillingError> {
        if key.is_empty() {
            return Ok(None);
        }
        let rows = self.query(FIND_ENDED, &[&key, &ended_since_ms])?;
        Ok(rows.first().map(|row| EndedSession {
            session_id: row.get(0),
            call_id: row.get(1),
            server_call_id: row.get(2),
            subscriber: row.get(3),
            service: row.get(4),
            server: row.get(5),
            account: row.get(6),
            ended_at_ms: row.get(7),
        }))
    }

    fn insert_open(&self, open: &OpenSession) -> Result<(), BillingError> {
        let tariff = self.tariff_snapshot(&open.tariff)?;
        let inserted = self.execute(
            "INSERT INTO billing.open_sessions (session_id, call_id, subscriber, service, \
             server, plan, tariff, confirmed_at_ms, last_seen_ms, node, server_call_id, \
             account) \
             VALUES ($1, $2, $3, $4, $5, $6, $7::text::json, $8, $8, $9, $10, $11) \
             ON CONFLICT (session_id) DO NOTHING",
            &[
                &open.session_id,
                &open.call_id,
                &open.subscriber,
                &open.service,
                &open.server,
                &open.plan,
                &&*tariff,
                &open.confirmed_at_ms,
                &open.node,
                &open.server_call_id,
                &open.account,
            ],
        )?;
        if inserted == 0 {
            return Err(BillingError::SessionAlreadyOpen {
                session_id: open.session_id.clone(),
            });
        }
        Ok(())
    }

    fn touch_all(&self, node: &str, seen_at_ms: i64) -> Result<usize, BillingError> {
        let n = self.execute(
            "UPDATE billing.open_sessions SET last_seen_ms = GREATEST(last_seen_ms, $2) \
             WHERE node = $1",
            &[&node, &seen_at_ms],
        )?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn touch(&self, touch: &TouchSessions) -> Result<usize, BillingError> {
        let ids = unique_ids(&touch.session_ids);
        if ids.is_empty() {
            return Ok(0);
        }
        let n = self.execute(
            "UPDATE billing.open_sessions SET last_seen_ms = GREATEST(last_seen_ms, $2) \
             WHERE session_id = ANY($1)",
            &[&ids, &touch.seen_at_ms],
        )?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Takes a session out of the journal and writes its record; `None` if it is not
    /// journaled (never opened, or closed already — also by another relay: the row is
    /// deleted by exactly one transaction).
    fn close_row(
        &self,
        session_id: &str,
        ended_at_ms: i64,
        cause: EndCause,
    ) -> Result<Option<SessionRecord>, BillingError> {
        let sql = format!(
            "DELETE FROM billing.open_sessions WHERE session_id = $1 RETURNING {DELETED_COLUMNS}"
        );
        let rows = self.query(&sql, &[&session_id])?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        self.write_record(row, ended_at_ms, cause).map(Some)
    }

    /// Rates a session whose journal row was just deleted (`row`: its
    /// [`DELETED_COLUMNS`]) and writes its record.
    fn write_record(
        &self,
        row: &Row,
        ended_at_ms: i64,
        cause: EndCause,
    ) -> Result<SessionRecord, BillingError> {
        let session_id: String = row.get(0);
        let tariff_json: String = row.get(6);
        let confirmed_at_ms: i64 = row.get(7);
        let tariff = self.journaled_tariff(&session_id, &tariff_json)?;
        // A clock that stepped back makes a zero-length session, never a negative one.
        let ended_at_ms = ended_at_ms.max(confirmed_at_ms);
        let duration_ms = ended_at_ms - confirmed_at_ms;
        let mut record = SessionRecord {
            record_id: 0,
            session_id,
            call_id: row.get(1),
            subscriber: row.get(2),
            service: row.get(3),
            server: row.get(4),
            plan: row.get(5),
            tariff: tariff.name().to_owned(),
            confirmed_at_ms,
            ended_at_ms,
            duration_ms,
            cause,
            charge: tariff.charge_for(duration_ms.unsigned_abs()),
        };
        let inserted = self.query(
            "INSERT INTO billing.session_records (session_id, call_id, subscriber, service, \
             server, plan, tariff, confirmed_at_ms, ended_at_ms, duration_ms, end_cause, \
             amount_minor, currency, server_call_id, account) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             RETURNING record_id",
            &[
                &record.session_id,
                &record.call_id,
                &record.subscriber,
                &record.service,
                &record.server,
                &record.plan,
                &record.tariff,
                &record.confirmed_at_ms,
                &record.ended_at_ms,
                &record.duration_ms,
                &record.cause.as_str(),
                &record.charge.minor,
                &record.charge.currency.as_str(),
                // As journaled: positions 9 and 10 of DELETED_COLUMNS.
                &row.get::<_, &str>(9),
                &row.get::<_, Option<&str>>(10),
            ],
        )?;
        record.record_id = inserted
            .first()
            .map(|r| r.get(0))
            .ok_or_else(|| self.corrupt("an insert of a session record returned no id"))?;
        Ok(record)
    }

    fn charge(&self, charge: &NewCharge) -> Result<(ChargeRecord, bool), BillingError> {
        let (amount, units) = charge.validate()?;
        let record = ChargeRecord {
            record_id: 0,
            session_id: charge.session_id.clone(),
            server: charge.server.clone(),
            subscriber: charge.subscriber.clone(),
            service: charge.service.clone(),
            event_id: charge.event_id.clone(),
            amount,
            units,
            description: charge.description.clone(),
            charged_at_ms: charge.charged_at_ms,
        };
        let inserted = self.query(
            "INSERT INTO billing.charge_records (session_id, server, subscriber, service, \
             event_id, amount_minor, currency, units, unit_price_minor, description, \
             charged_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (server, event_id) DO NOTHING RETURNING record_id",
            &[
                &record.session_id,
                &record.server,
                &record.subscriber,
                &record.service,
                &record.event_id,
                &record.amount.minor,
                &record.amount.currency.as_str(),
                &record.units.map(|u| u.units),
                &record.units.map(|u| u.unit_price_minor),
                &record.description,
                &record.charged_at_ms,
            ],
        )?;
        if let Some(row) = inserted.first() {
            return Ok((
                ChargeRecord {
                    record_id: row.get(0),
                    ..record
                },
                false,
            ));
        }
        // The event was charged before (by this relay or, committed meanwhile, another).
        let sql = format!(
            "SELECT {CHARGE_COLUMNS} FROM billing.charge_records \
             WHERE server = $1 AND event_id = $2"
        );
        let rows = self.query(&sql, &[&charge.server, &charge.event_id])?;
        let row = rows.first().ok_or_else(|| {
            self.corrupt(format!(
                "charge ({}, {}) conflicts but cannot be found",
                charge.server, charge.event_id
            ))
        })?;
        let earlier = read_charge(row)?;
        if (earlier.amount, earlier.units, &earlier.subscriber)
            != (record.amount, record.units, &record.subscriber)
        {
            warn!(server = %charge.server, event_id = %charge.event_id,
                stored = %earlier.amount, submitted = %record.amount,
                "charge event resubmitted with different content; the stored one stands");
        }
        Ok((earlier, true))
    }

    /// Takes the journal rows that `delete` (a `DELETE … RETURNING` the
    /// [`DELETED_COLUMNS`]) removes and writes their records, each ending at its
    /// last-seen time. Only one transaction deletes a row: one that another transaction
    /// deleted first (a concurrent close or claim) is skipped once that one commits, so
    /// every session is closed once.
    fn close_deleted(
        &self,
        delete: &str,
        params: &[&(dyn ToSql + Sync)],
        now_ms: i64,
        cause: EndCause,
    ) -> Result<Vec<SessionRecord>, BillingError> {
        let mut rows = self.query(delete, params)?;
        rows.sort_by_key(|row| (row.get::<_, i64>(7), row.get::<_, String>(0)));
        rows.iter()
            .map(|row| {
                let ended = recovered_end(row.get(7), row.get(8), now_ms);
                self.write_record(row, ended, cause)
            })
            .collect()
    }

    fn recover_node(&self, node: &str, now_ms: i64) -> Result<Vec<SessionRecord>, BillingError> {
        let sql = format!(
            "DELETE FROM billing.open_sessions WHERE node = $1 RETURNING {DELETED_COLUMNS}"
        );
        let records =
            self.close_deleted(&sql, &[&node], now_ms, EndCause::RecoveredAfterRestart)?;
        if !records.is_empty() {
            info!(
                node,
                sessions = records.len(),
                "closed sessions left open by a crash"
            );
        }
        Ok(records)
    }

    fn claim_lost(
        &self,
        node: &str,
        lease_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<SessionRecord>, BillingError> {
        // The rows are locked first, skipping those another transaction holds: a relay
        // claiming at the same moment (it deletes them; if it fails, the next claim takes
        // them), the owner renewing its lease (then it is alive) or closing the session.
        // So claimers never wait on each other and cannot deadlock, and each row is
        // deleted by one transaction only. A row updated since the statement's snapshot
        // is checked again when locked, so a renewal that committed meanwhile wins.
        let sql = format!(
            "DELETE FROM billing.open_sessions WHERE session_id IN ( \
                 SELECT session_id FROM billing.open_sessions \
                 WHERE node <> $1 AND last_seen_ms < $2 \
                 FOR UPDATE SKIP LOCKED) \
             RETURNING {DELETED_COLUMNS}"
        );
        let expired_before = now_ms.saturating_sub(lease_ms);
        self.close_deleted(&sql, &[&node, &expired_before], now_ms, EndCause::RelayLost)
    }

    /// Rolls back after a failure, if the connection still stands.
    fn rollback(&self) {
        if self.client.borrow().is_closed() {
            return;
        }
        if let Err(e) = self.client.borrow_mut().batch_execute("ROLLBACK") {
            warn!(error = %e, "rollback of a failed billing batch failed");
        }
    }

    /// Runs one attempt at a batch: the outcomes, or the index of an op whose statement
    /// failed (the transaction is rolled back), or a fatal error.
    fn attempt(
        &self,
        ops: &[Op],
        excluded: &[Option<BillingError>],
    ) -> Result<Attempt, BillingError> {
        self.execute_batch("BEGIN").map_err(|e| {
            self.broken.set(true);
            BillingError::CommitFailed {
                detail: e.to_string(),
            }
        })?;
        let mut results = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            if excluded[i].is_some() {
                results.push(None);
                continue;
            }
            match self.apply_op(op) {
                Ok(outcome) => results.push(Some(Ok(outcome))),
                Err(OpFailure::Refused(e)) => {
                    debug!(op = op.kind(), error = %e, "billing op refused");
                    results.push(Some(Err(e)));
                }
                Err(OpFailure::Statement(e)) => {
                    debug!(op = op.kind(), error = %e, "billing op failed; batch runs again without it");
                    self.rollback();
                    return Ok(Err((i, e)));
                }
                Err(OpFailure::Fatal(e)) => {
                    self.rollback();
                    self.broken.set(true);
                    return Err(BillingError::CommitFailed {
                        detail: e.to_string(),
                    });
                }
            }
        }
        if let Err(e) = self.client.borrow_mut().batch_execute("COMMIT") {
            let e = self.pg(e);
            self.rollback();
            self.broken.set(true);
            return Err(BillingError::CommitFailed {
                detail: e.to_string(),
            });
        }
        Ok(Ok(results))
    }
}

fn parse_tariff(session_id: &str, json: &str) -> Result<Tariff, BillingError> {
    serde_json::from_str(json).map_err(|e| BillingError::BadRow {
        table: "open_sessions",
        key: session_id.to_owned(),
        detail: format!("journaled tariff: {e}"),
    })
}

fn read_session(row: &Row) -> Result<SessionRecord, BillingError> {
    let record_id: i64 = row.get(0);
    let bad = |detail: String| BillingError::BadRow {
        table: "session_records",
        key: record_id.to_string(),
        detail,
    };
    let cause: String = row.get(11);
    let currency: String = row.get(13);
    Ok(SessionRecord {
        record_id,
        session_id: row.get(1),
        call_id: row.get(2),
        subscriber: row.get(3),
        service: row.get(4),
        server: row.get(5),
        plan: row.get(6),
        tariff: row.get(7),
        confirmed_at_ms: row.get(8),
        ended_at_ms: row.get(9),
        duration_ms: row.get(10),
        cause: cause.parse().map_err(|e| bad(format!("{e}")))?,
        charge: Money::new(
            row.get(12),
            Currency::new(&currency).map_err(|e| bad(e.to_string()))?,
        ),
    })
}

fn read_charge(row: &Row) -> Result<ChargeRecord, BillingError> {
    let record_id: i64 = row.get(0);
    let currency: String = row.get(7);
    let currency = Currency::new(&currency).map_err(|e| BillingError::BadRow {
        table: "charge_records",
        key: record_id.to_string(),
        detail: e.to_string(),
    })?;
    let units: Option<i64> = row.get(8);
    let unit_price: Option<i64> = row.get(9);
    Ok(ChargeRecord {
        record_id,
        session_id: row.get(1),
        server: row.get(2),
        subscriber: row.get(3),
        service: row.get(4),
        event_id: row.get(5),
        amount: Money::new(row.get(6), currency),
        units: units
            .zip(unit_price)
            .map(|(units, unit_price_minor)| UnitCharge {
                units,
                unit_price_minor,
            }),
        description: row.get(10),
        charged_at_ms: row.get(11),
    })
}

impl PostgresStore {
    /// Streams the rows of `sql` (two BIGINT parameters) to `visit`.
    fn scan(
        &self,
        sql: &str,
        period: Period,
        visit: &mut dyn FnMut(&Row) -> Result<(), BillingError>,
    ) -> Result<(), BillingError> {
        self.ensure_connected()?;
        let stmt = self.prepared(sql).map_err(|e| self.pg(e))?;
        let mut client = self.client.borrow_mut();
        let mut rows = client
            .query_raw(&stmt, [period.since_ms, period.until_ms])
            .map_err(|e| self.pg(e))?;
        while let Some(row) = rows.next().map_err(|e| self.pg(e))? {
            visit(&row)?;
        }
        Ok(())
    }
}

impl Store for PostgresStore {
    fn apply(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, BillingError>>, BillingError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        self.ensure_connected()
            .map_err(|e| BillingError::CommitFailed {
                detail: e.to_string(),
            })?;
        // Ops whose statement failed, with their errors; each run excludes one more, so
        // this ends after at most ops.len() + 1 runs.
        let mut excluded: Vec<Option<BillingError>> =
            std::iter::repeat_with(|| None).take(ops.len()).collect();
        loop {
            match self.attempt(ops, &excluded)? {
                Ok(results) => {
                    return Ok(results
                        .into_iter()
                        .zip(excluded)
                        .map(|(result, refused)| match (result, refused) {
                            (Some(result), _) => result,
                            (None, Some(e)) => Err(e),
                            (None, None) => {
                                Err(BillingError::UnexpectedOutcome { expected: "any" })
                            }
                        })
                        .collect());
                }
                Err((i, e)) => excluded[i] = Some(e),
            }
        }
    }

    fn journal(&self) -> Result<Vec<JournaledSession>, BillingError> {
        self.ensure_connected()?;
        let rows = self.query(
            "SELECT session_id, call_id, subscriber, service, server, plan, tariff::text, \
             confirmed_at_ms, last_seen_ms, node, server_call_id, account \
             FROM billing.open_sessions ORDER BY confirmed_at_ms, session_id",
            &[],
        )?;
        rows.iter()
            .map(|row| {
                let session_id: String = row.get(0);
                let tariff: String = row.get(6);
                Ok(JournaledSession {
                    session: OpenSession {
                        node: row.get(9),
                        tariff: parse_tariff(&session_id, &tariff)?,
                        session_id,
                        call_id: row.get(1),
                        server_call_id: row.get(10),
                        subscriber: row.get(2),
                        service: row.get(3),
                        server: row.get(4),
                        account: row.get(11),
                        plan: row.get(5),
                        confirmed_at_ms: row.get(7),
                    },
                    last_seen_ms: row.get(8),
                })
            })
            .collect()
    }

    fn scan_sessions(
        &self,
        period: Period,
        visit: &mut dyn FnMut(SessionRecord) -> Result<(), BillingError>,
    ) -> Result<(), BillingError> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM billing.session_records \
             WHERE ended_at_ms >= $1 AND ended_at_ms < $2 ORDER BY ended_at_ms, record_id"
        );
        self.scan(&sql, period, &mut |row| visit(read_session(row)?))
    }

    fn scan_charges(
        &self,
        period: Period,
        visit: &mut dyn FnMut(ChargeRecord) -> Result<(), BillingError>,
    ) -> Result<(), BillingError> {
        let sql = format!(
            "SELECT {CHARGE_COLUMNS} FROM billing.charge_records \
             WHERE charged_at_ms >= $1 AND charged_at_ms < $2 ORDER BY charged_at_ms, record_id"
        );
        self.scan(&sql, period, &mut |row| visit(read_charge(row)?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::store::CloseSession;
    use crate::tariff::TariffSpec;
    use crate::test_pg_server;

    const T0: i64 = 1_700_000_000_000;

    fn session(id: &str, at: i64) -> OpenSession {
        OpenSession {
            node: String::new(),
            session_id: id.into(),
            call_id: format!("call-{id}"),
            server_call_id: String::new(),
            subscriber: "alice".into(),
            service: "video".into(),
            server: "as1".into(),
            account: None,
            plan: "gold".into(),
            tariff: Tariff::new(TariffSpec {
                name: "standard".into(),
                service: None,
                plan: None,
                currency: Currency::new("EUR").unwrap(),
                setup: 10,
                rate: 2,
                period_seconds: 60,
                increment: "60/60".parse().unwrap(),
                free_seconds: 0,
            })
            .unwrap(),
            confirmed_at_ms: at,
        }
    }

    /// Journals a session as version 1 did (no node column).
    fn open_before_v2(store: &PostgresStore, id: &str, at: i64) {
        let tariff = serde_json::to_string(&session(id, at).tariff).unwrap();
        store
            .client
            .borrow_mut()
            .execute(
                "INSERT INTO billing.open_sessions (session_id, call_id, subscriber, service, \
                 server, plan, tariff, confirmed_at_ms, last_seen_ms) \
                 VALUES ($1, 'call-' || $1, 'alice', 'video', 'as1', 'gold', $2::text::json, \
                 $3, $3)",
                &[&id, &tariff, &at],
            )
            .unwrap();
    }

    /// Closes a session as versions 1 and 2 did (no server call id, no account): its
    /// record rated with the tariff of [`session`], its journal row deleted.
    fn close_before_v3(store: &PostgresStore, id: &str, ended_at_ms: i64, cause: EndCause) {
        let mut client = store.client.borrow_mut();
        let confirmed_at_ms: i64 = client
            .query_one(
                "SELECT confirmed_at_ms FROM billing.open_sessions WHERE session_id = $1",
                &[&id],
            )
            .unwrap()
            .get(0);
        let tariff = session(id, confirmed_at_ms).tariff;
        let charge = tariff.charge_for((ended_at_ms - confirmed_at_ms).unsigned_abs());
        client
            .execute(
                "WITH gone AS (DELETE FROM billing.open_sessions WHERE session_id = $1 \
                 RETURNING *) \
                 INSERT INTO billing.session_records (session_id, call_id, subscriber, \
                 service, server, plan, tariff, confirmed_at_ms, ended_at_ms, duration_ms, \
                 end_cause, amount_minor, currency) \
                 SELECT session_id, call_id, subscriber, service, server, plan, $2, \
                 confirmed_at_ms, $3, $3 - confirmed_at_ms, $4, $5, $6 FROM gone",
                &[
                    &id,
                    &tariff.name(),
                    &ended_at_ms,
                    &cause.as_str(),
                    &charge.minor,
                    &charge.currency.as_str(),
                ],
            )
            .unwrap();
    }

    fn insert_raw_record(store: &PostgresStore, cause: &str) -> Result<u64, postgres::Error> {
        store.client.borrow_mut().execute(
            "INSERT INTO billing.session_records (session_id, call_id, subscriber, service, \
             server, plan, tariff, confirmed_at_ms, ended_at_ms, duration_ms, end_cause, \
             amount_minor, currency) \
             VALUES ('raw', 'call-raw', 'alice', 'video', 'as1', 'basic', 'standard', \
             0, 10, 10, $1, 0, 'EUR')",
            &[&cause],
        )
    }

    #[test]
    fn a_version_1_database_migrates_keeping_every_record_and_journaled_session() {
        let server = test_pg_server::shared();
        let url = server.fresh_database();
        let (records, journal) = {
            let store = PostgresStore::connect_with(&url, &MIGRATIONS[..1]).unwrap();
            assert_eq!(store.schema_version().unwrap(), 1);
            // The causes version 1 knew; the new ones are refused by its CHECK.
            for (i, cause) in EndCause::ALL[..7].iter().copied().enumerate() {
                let id = format!("s{i}");
                open_before_v2(&store, &id, T0);
                close_before_v3(&store, &id, T0 + 1_000 * (i as i64 + 1), cause);
            }
            let err = insert_raw_record(&store, "relay-lost").unwrap_err();
            assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION), "{err}");
            open_before_v2(&store, "live", T0);
            (
                store.session_records(Period::all()).unwrap(),
                vec![JournaledSession {
                    session: session("live", T0),
                    last_seen_ms: T0,
                }],
            )
        };
        assert_eq!(records.len(), 7);
        assert!(matches!(
            PostgresStore::connect_read_only(&url).unwrap_err(),
            BillingError::OlderSchema {
                found: 1,
                supported: SCHEMA_VERSION,
                ..
            }
        ));

        let mut store = PostgresStore::connect(&url).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(store.session_records(Period::all()).unwrap(), records);
        // Journaled before the node column: the lone relay's ("").
        assert_eq!(store.journal().unwrap(), journal);
        // The session journaled before the migration belongs to the lone relay, ''.
        let node: String = store
            .client
            .borrow_mut()
            .query_one(
                "SELECT node FROM billing.open_sessions WHERE session_id = 'live'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(node, "");
        // The new causes are stored, a made-up one still refused.
        for cause in [EndCause::RelayLost, EndCause::Admin] {
            insert_raw_record(&store, cause.as_str()).unwrap();
        }
        let err = insert_raw_record(&store, "hung-up").unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION), "{err}");
        let record = store
            .close_session(CloseSession {
                session_id: "live".into(),
                ended_at_ms: T0 + 61_000,
                cause: EndCause::RelayLost,
            })
            .unwrap();
        assert_eq!(record.cause, EndCause::RelayLost);
        assert_eq!(record.charge.minor, 10 + 2 * 2);
        assert!(record.record_id > records.iter().map(|r| r.record_id).max().unwrap());
    }

    #[test]
    fn a_version_2_database_migrates_reading_back_no_server_call_id_and_no_account() {
        let server = test_pg_server::shared();
        let url = server.fresh_database();
        let records = {
            let store = PostgresStore::connect_with(&url, &MIGRATIONS[..2]).unwrap();
            assert_eq!(store.schema_version().unwrap(), 2);
            for (i, id) in ["s0", "s1"].into_iter().enumerate() {
                open_before_v2(&store, id, T0);
                close_before_v3(&store, id, T0 + 1_000 * (i as i64 + 1), EndCause::CallerBye);
            }
            open_before_v2(&store, "live", T0);
            store.session_records(Period::all()).unwrap()
        };
        assert!(matches!(
            PostgresStore::connect_read_only(&url).unwrap_err(),
            BillingError::OlderSchema {
                found: 2,
                supported: SCHEMA_VERSION,
                ..
            }
        ));

        let mut store = PostgresStore::connect(&url).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(store.session_records(Period::all()).unwrap(), records);
        // Journaled before the columns: no server call id, no account.
        assert_eq!(
            store.journal().unwrap(),
            [JournaledSession {
                session: session("live", T0),
                last_seen_ms: T0,
            }]
        );
        let old: Vec<(String, Option<String>)> = store
            .client
            .borrow_mut()
            .query(
                "SELECT server_call_id, account FROM billing.session_records \
                 ORDER BY record_id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(old, [(String::new(), None), (String::new(), None)]);
        crate::store::check_upgraded_sessions_have_no_call_id_of_server(&mut store, T0 + 9_000);
        // The lookup's indexes are in the billing schema, beside their table.
        let indexes: Vec<String> = store
            .client
            .borrow_mut()
            .query(
                "SELECT indexname::text FROM pg_catalog.pg_indexes \
                 WHERE schemaname = 'billing' AND tablename = 'session_records' ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            indexes,
            [
                "session_records_by_call",
                "session_records_by_end",
                "session_records_by_server_call",
                "session_records_by_session",
                "session_records_pkey",
            ]
        );
    }
}
