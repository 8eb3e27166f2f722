//! [`SqliteStore`]: the embedded default [`Store`], on SQLite (bundled) in WAL mode with
//! `synchronous=FULL`.
//!
//! The schema is versioned in a `meta` table and upgraded by an ordered list of
//! migrations when the store is opened read-write. Tables are `STRICT` and carry `CHECK`
//! constraints, so no row with a wrong type, an empty key, a negative amount or an
//! inconsistent duration can exist, whatever wrote it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row};
use tracing::{debug, info, warn};

use crate::error::BillingError;
use crate::money::{Currency, Money};
use crate::record::{ChargeRecord, EndCause, SessionRecord, UnitCharge};
use crate::store::{
    recovered_end, unique_ids, CloseSession, EndedSession, JournaledSession, NewCharge, Op,
    OpenSession, Outcome, Period, Store, TouchSessions,
};
use crate::tariff::Tariff;

/// The value of `application` in the `meta` table of every billing database.
const APPLICATION: &str = "service-relay-billing";
/// The page cache of the store's connection, as SQLite's `cache_size` takes it (negative:
/// KiB).
const PAGE_CACHE_KIB: i64 = -1024;

/// One step of the schema's history.
struct Migration {
    /// The schema version after this step; versions are 1, 2, 3, … in order.
    version: i64,
    /// What the step does, for the log.
    description: &'static str,
    /// The SQL that performs it.
    sql: &'static str,
}

const SCHEMA_V1: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE open_sessions (
    session_id      TEXT PRIMARY KEY NOT NULL CHECK (length(session_id) > 0),
    call_id         TEXT NOT NULL CHECK (length(call_id) > 0),
    subscriber      TEXT NOT NULL CHECK (length(subscriber) > 0),
    service         TEXT NOT NULL CHECK (length(service) > 0),
    server          TEXT NOT NULL CHECK (length(server) > 0),
    plan            TEXT NOT NULL CHECK (length(plan) > 0),
    tariff          TEXT NOT NULL CHECK (json_valid(tariff)),
    confirmed_at_ms INTEGER NOT NULL CHECK (confirmed_at_ms >= 0),
    last_seen_ms    INTEGER NOT NULL CHECK (last_seen_ms >= confirmed_at_ms)
) STRICT, WITHOUT ROWID;

CREATE TABLE session_records (
    record_id       INTEGER PRIMARY KEY,
    session_id      TEXT NOT NULL CHECK (length(session_id) > 0),
    call_id         TEXT NOT NULL CHECK (length(call_id) > 0),
    subscriber      TEXT NOT NULL CHECK (length(subscriber) > 0),
    service         TEXT NOT NULL CHECK (length(service) > 0),
    server          TEXT NOT NULL CHECK (length(server) > 0),
    plan            TEXT NOT NULL CHECK (length(plan) > 0),
    tariff          TEXT NOT NULL CHECK (length(tariff) > 0),
    confirmed_at_ms INTEGER NOT NULL CHECK (confirmed_at_ms >= 0),
    ended_at_ms     INTEGER NOT NULL CHECK (ended_at_ms >= confirmed_at_ms),
    duration_ms     INTEGER NOT NULL CHECK (duration_ms = ended_at_ms - confirmed_at_ms),
    end_cause       TEXT NOT NULL CHECK (end_cause IN ('caller-bye', 'server-bye', 'timeout',
                        'transferred', 'changed', 'relay-shutdown', 'recovered-after-restart')),
    amount_minor    INTEGER NOT NULL CHECK (amount_minor >= 0),
    currency        TEXT NOT NULL CHECK (length(currency) = 3 AND currency = upper(currency))
) STRICT;
CREATE INDEX session_records_by_end ON session_records (ended_at_ms);

CREATE TABLE charge_records (
    record_id        INTEGER PRIMARY KEY,
    session_id       TEXT CHECK (session_id IS NULL OR length(session_id) > 0),
    server           TEXT NOT NULL CHECK (length(server) > 0),
    subscriber       TEXT NOT NULL CHECK (length(subscriber) > 0),
    service          TEXT CHECK (service IS NULL OR length(service) > 0),
    event_id         TEXT NOT NULL CHECK (length(event_id) > 0),
    amount_minor     INTEGER NOT NULL CHECK (amount_minor >= 0),
    currency         TEXT NOT NULL CHECK (length(currency) = 3 AND currency = upper(currency)),
    units            INTEGER CHECK (units IS NULL OR units >= 0),
    unit_price_minor INTEGER CHECK (unit_price_minor IS NULL OR unit_price_minor >= 0),
    description      TEXT NOT NULL,
    charged_at_ms    INTEGER NOT NULL CHECK (charged_at_ms >= 0),
    CHECK ((units IS NULL) = (unit_price_minor IS NULL)),
    CHECK (units IS NULL OR amount_minor = units * unit_price_minor),
    UNIQUE (server, event_id)
) STRICT;
CREATE INDEX charge_records_by_time ON charge_records (charged_at_ms);
";

/// Version 2 rebuilds `session_records` with its end-cause `CHECK` written as a chain of
/// `=` tests: for `IN (…)` SQLite builds an ephemeral table on every insert, about a third
/// of the cost of writing a record. Nothing else about the table changes (columns, types,
/// `STRICT`, the other `CHECK`s, the index, the record ids), and no row can fail the new
/// `CHECK`, which accepts exactly the causes the old one did.
///
/// It follows SQLite's procedure for changing a table (<https://sqlite.org/lang_altertable.html>,
/// "Making Other Kinds Of Table Schema Changes"): create the new table, copy the rows, drop
/// the old table, rename the new one, recreate the index; all inside the migration's
/// transaction. No view, trigger or foreign key refers to `session_records`, and foreign
/// keys are not enabled, so the other steps have nothing to do.
///
/// A migration is history: once released, its SQL never changes, so this list of causes is
/// frozen here rather than generated from [`EndCause`]. A new cause needs a new migration;
/// `the_end_cause_check_lists_every_cause_and_nothing_else` fails until it has one.
const SCHEMA_V2: &str = "
CREATE TABLE new_session_records (
    record_id       INTEGER PRIMARY KEY,
    session_id      TEXT NOT NULL CHECK (length(session_id) > 0),
    call_id         TEXT NOT NULL CHECK (length(call_id) > 0),
    subscriber      TEXT NOT NULL CHECK (length(subscriber) > 0),
    service         TEXT NOT NULL CHECK (length(service) > 0),
    server          TEXT NOT NULL CHECK (length(server) > 0),
    plan            TEXT NOT NULL CHECK (length(plan) > 0),
    tariff          TEXT NOT NULL CHECK (length(tariff) > 0),
    confirmed_at_ms INTEGER NOT NULL CHECK (confirmed_at_ms >= 0),
    ended_at_ms     INTEGER NOT NULL CHECK (ended_at_ms >= confirmed_at_ms),
    duration_ms     INTEGER NOT NULL CHECK (duration_ms = ended_at_ms - confirmed_at_ms),
    end_cause       TEXT NOT NULL CHECK (end_cause = 'caller-bye' OR end_cause = 'server-bye'
                        OR end_cause = 'timeout' OR end_cause = 'transferred'
                        OR end_cause = 'changed' OR end_cause = 'relay-shutdown'
                        OR end_cause = 'recovered-after-restart'),
    amount_minor    INTEGER NOT NULL CHECK (amount_minor >= 0),
    currency        TEXT NOT NULL CHECK (length(currency) = 3 AND currency = upper(currency))
) STRICT;
INSERT INTO new_session_records (record_id, session_id, call_id, subscriber, service, server,
        plan, tariff, confirmed_at_ms, ended_at_ms, duration_ms, end_cause, amount_minor,
        currency)
    SELECT record_id, session_id, call_id, subscriber, service, server, plan, tariff,
        confirmed_at_ms, ended_at_ms, duration_ms, end_cause, amount_minor, currency
    FROM session_records ORDER BY record_id;
DROP TABLE session_records;
ALTER TABLE new_session_records RENAME TO session_records;
CREATE INDEX session_records_by_end ON session_records (ended_at_ms);
";

/// Version 3, for relays sharing their billing (issue 15):
///
/// * `session_records` is rebuilt as version 2 did (same procedure, same columns, ids and
///   index) with an end-cause `CHECK` that also accepts `relay-lost` (another relay closed
///   a dead relay's session after its lease expired) and `admin` (an operator ended it);
///   every row of version 2 passes it.
/// * `open_sessions` gets a `node` column: the relay that owns the session and renews its
///   lease. Rows journaled before it belong to `''`, the name of a lone relay, which is
///   what they were; an index by node and last-seen time serves the lease queries.
const SCHEMA_V3: &str = "
CREATE TABLE new_session_records (
    record_id       INTEGER PRIMARY KEY,
    session_id      TEXT NOT NULL CHECK (length(session_id) > 0),
    call_id         TEXT NOT NULL CHECK (length(call_id) > 0),
    subscriber      TEXT NOT NULL CHECK (length(subscriber) > 0),
    service         TEXT NOT NULL CHECK (length(service) > 0),
    server          TEXT NOT NULL CHECK (length(server) > 0),
    plan            TEXT NOT NULL CHECK (length(plan) > 0),
    tariff          TEXT NOT NULL CHECK (length(tariff) > 0),
    confirmed_at_ms INTEGER NOT NULL CHECK (confirmed_at_ms >= 0),
    ended_at_ms     INTEGER NOT NULL CHECK (ended_at_ms >= confirmed_at_ms),
    duration_ms     INTEGER NOT NULL CHECK (duration_ms = ended_at_ms - confirmed_at_ms),
    end_cause       TEXT NOT NULL CHECK (end_cause = 'caller-bye' OR end_cause = 'server-bye'
                        OR end_cause = 'timeout' OR end_cause = 'transferred'
                        OR end_cause = 'changed' OR end_cause = 'relay-shutdown'
                        OR end_cause = 'recovered-after-restart' OR end_cause = 'relay-lost'
                        OR end_cause = 'admin'),
    amount_minor    INTEGER NOT NULL CHECK (amount_minor >= 0),
    currency        TEXT NOT NULL CHECK (length(currency) = 3 AND currency = upper(currency))
) STRICT;
INSERT INTO new_session_records (record_id, session_id, call_id, subscriber, service, server,
        plan, tariff, confirmed_at_ms, ended_at_ms, duration_ms, end_cause, amount_minor,
        currency)
    SELECT record_id, session_id, call_id, subscriber, service, server, plan, tariff,
        confirmed_at_ms, ended_at_ms, duration_ms, end_cause, amount_minor, currency
    FROM session_records ORDER BY record_id;
DROP TABLE session_records;
ALTER TABLE new_session_records RENAME TO session_records;
CREATE INDEX session_records_by_end ON session_records (ended_at_ms);

ALTER TABLE open_sessions ADD COLUMN node TEXT NOT NULL DEFAULT '';
CREATE INDEX open_sessions_by_node ON open_sessions (node, last_seen_ms);
";

/// Version 4, so that a charge arriving after its session ended finds the session in the
/// records (where relayd used to keep every ended session in memory for a grace period):
///
/// * `open_sessions` and `session_records` get `server_call_id`, the SIP Call-ID of the
///   application server's leg (`''` for the rows written before: unknown, and never
///   matched by a lookup), and `account`, the application-server account that speaks for
///   the server (`NULL` for a static server, and for the rows written before);
/// * `session_records` is indexed by each key an ended session is looked up by: its
///   session id, its terminal Call-ID and its server Call-ID.
///
/// Adding columns needs no rebuild: `ALTER TABLE … ADD COLUMN` keeps the rows, their ids
/// and the other constraints, and a constant default fills the rows already there.
const SCHEMA_V4: &str = "
ALTER TABLE open_sessions ADD COLUMN server_call_id TEXT NOT NULL DEFAULT '';
ALTER TABLE open_sessions ADD COLUMN account TEXT
    CHECK (account IS NULL OR length(account) > 0);
ALTER TABLE session_records ADD COLUMN server_call_id TEXT NOT NULL DEFAULT '';
ALTER TABLE session_records ADD COLUMN account TEXT
    CHECK (account IS NULL OR length(account) > 0);
CREATE INDEX session_records_by_session ON session_records (session_id);
CREATE INDEX session_records_by_call ON session_records (call_id);
CREATE INDEX session_records_by_server_call ON session_records (server_call_id);
";

/// The schema's history, oldest first. A new database runs all of it, so that it has
/// exactly the schema of one migrated from an older version.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "meta, open-session journal, session records, charge records",
        sql: SCHEMA_V1,
    },
    Migration {
        version: 2,
        description: "session records: end-cause check without IN (no ephemeral table)",
        sql: SCHEMA_V2,
    },
    Migration {
        version: 3,
        description: "relay-lost and admin end causes; open sessions owned by a node",
        sql: SCHEMA_V3,
    },
    Migration {
        version: 4,
        description: "server call id and account of sessions; records indexed by each call id",
        sql: SCHEMA_V4,
    },
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 4;

const SESSION_COLUMNS: &str = "record_id, session_id, call_id, subscriber, service, server, plan, \
     tariff, confirmed_at_ms, ended_at_ms, duration_ms, end_cause, amount_minor, currency";
const CHARGE_COLUMNS: &str = "record_id, session_id, server, subscriber, service, event_id, \
     amount_minor, currency, units, unit_price_minor, description, charged_at_ms";

/// [`Op::FindEnded`]: the latest session record, ended since `?2`, whose session id,
/// terminal Call-ID or server Call-ID is `?1` (never `''`: the caller looks up no empty
/// key). Written as a union of one lookup per column, so that each uses its index rather
/// than the whole table being scanned (`find_ended_uses_the_indexes` checks the plan).
const FIND_ENDED: &str = "SELECT session_id, call_id, server_call_id, subscriber, service, \
     server, account, ended_at_ms FROM session_records WHERE record_id IN ( \
         SELECT record_id FROM session_records WHERE session_id = ?1 \
         UNION SELECT record_id FROM session_records WHERE call_id = ?1 \
         UNION SELECT record_id FROM session_records WHERE server_call_id = ?1) \
     AND ended_at_ms >= ?2 ORDER BY ended_at_ms DESC, record_id DESC LIMIT 1";

/// How an op failed inside a batch.
enum OpFailure {
    /// The op was refused and left no trace; the rest of the batch goes on.
    Refused(BillingError),
    /// The transaction itself is lost (rolled back by SQLite, or a savepoint or a
    /// half-done close could not be undone); the whole batch fails.
    Fatal(BillingError),
}

/// The SQLite billing store. See the [crate documentation](crate) for its guarantees.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// Journaled tariff snapshots already parsed, by their JSON text: most sessions share
    /// a handful of tariffs, and parsing one per close would cost more than the insert.
    tariffs: RefCell<HashMap<String, Arc<Tariff>>>,
    /// The JSON snapshots of the tariffs already journaled, for the same reason: one
    /// serialisation per distinct tariff rather than one per opened session.
    snapshots: RefCell<HashMap<Tariff, Arc<str>>>,
}

/// The most tariffs kept in each of the caches; past this a cache starts over.
const TARIFF_CACHE: usize = 64;

impl SqliteStore {
    fn new(conn: Connection, path: PathBuf) -> Self {
        SqliteStore {
            conn,
            path,
            tariffs: RefCell::new(HashMap::new()),
            snapshots: RefCell::new(HashMap::new()),
        }
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

    /// Opens (creating if missing) the billing database at `path` for reading and
    /// writing, in WAL mode with `synchronous=FULL`, migrating an older schema.
    ///
    /// Refuses, without changing the file, one that is not a billing database or is
    /// damaged ([`BillingError::Corrupt`]) and one written by a newer build
    /// ([`BillingError::NewerSchema`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, BillingError> {
        Self::open_with(path.as_ref(), MIGRATIONS)
    }

    /// Opens an existing billing database read-only, e.g. for reports while the relay
    /// runs. The schema must be exactly the current one.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, BillingError> {
        let path = path.as_ref().to_path_buf();
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags).map_err(|e| db_error(&path, e))?;
        let store = SqliteStore::new(conn, path);
        store.set_busy_timeout()?;
        let found = store.inspect()?;
        let supported = SCHEMA_VERSION;
        if found > supported {
            return Err(BillingError::NewerSchema {
                path: store.path,
                found,
                supported,
            });
        }
        if found < supported {
            return Err(BillingError::OlderSchema {
                path: store.path,
                found,
                supported,
            });
        }
        Ok(store)
    }

    fn open_with(path: &Path, migrations: &[Migration]) -> Result<Self, BillingError> {
        let path = path.to_path_buf();
        let conn = Connection::open(&path).map_err(|e| db_error(&path, e))?;
        let store = SqliteStore::new(conn, path);
        store.set_busy_timeout()?;
        let latest = migrations.last().map_or(0, |m| m.version);
        // Look before touching anything: a foreign, damaged or newer file stays as it is.
        let found = store.inspect()?;
        if found > latest {
            return Err(BillingError::NewerSchema {
                path: store.path,
                found,
                supported: latest,
            });
        }
        let mode: String = store
            .conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|e| store.db(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            warn!(path = %store.path.display(), %mode, "billing database is not in WAL mode");
        }
        store
            .conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| store.db(e))?;
        // The store appends records and looks one up now and then (a late charge): 1 MiB of
        // page cache instead of SQLite's 2 MB, which stayed full after every peak of calls.
        store
            .conn
            .pragma_update(None, "cache_size", PAGE_CACHE_KIB)
            .map_err(|e| store.db(e))?;
        store.migrate(migrations)?;
        debug!(path = %store.path.display(), version = latest, "billing store open");
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, BillingError> {
        self.inspect()
    }

    /// Runs SQLite's full `integrity_check`; [`BillingError::Corrupt`] if it finds damage.
    pub fn integrity_check(&self) -> Result<(), BillingError> {
        let mut stmt = self
            .conn
            .prepare("PRAGMA integrity_check")
            .map_err(|e| self.db(e))?;
        let problems = stmt
            .query_map([], |row| row.get::<_, String>(0))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.db(e))?;
        if problems.len() == 1 && problems[0] == "ok" {
            return Ok(());
        }
        Err(BillingError::Corrupt {
            path: self.path.clone(),
            detail: problems.join("; "),
        })
    }

    fn set_busy_timeout(&self) -> Result<(), BillingError> {
        self.conn
            .busy_timeout(Duration::from_secs(5))
            .map_err(|e| self.db(e))
    }

    fn db(&self, e: rusqlite::Error) -> BillingError {
        db_error(&self.path, e)
    }

    fn corrupt(&self, detail: impl Into<String>) -> BillingError {
        BillingError::Corrupt {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    /// The schema version of the file: 0 for an empty database, an error for a file that
    /// is not a billing database.
    fn inspect(&self) -> Result<i64, BillingError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite_%' ORDER BY name",
            )
            .map_err(|e| self.db(e))?;
        let tables = stmt
            .query_map([], |row| row.get::<_, String>(0))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.db(e))?;
        if tables.is_empty() {
            return Ok(0);
        }
        if !tables.iter().any(|t| t == "meta") {
            return Err(self.corrupt(format!(
                "it has tables ({}) but no billing meta table",
                tables.join(", ")
            )));
        }
        let read = |key: &str| -> Result<Option<String>, BillingError> {
            self.conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
                    row.get::<_, String>(0)
                })
                .optional()
                .map_err(|e| match e.sqlite_error_code() {
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => self.db(e),
                    _ => self.corrupt(format!("its meta table cannot be read: {e}")),
                })
        };
        match read("application")? {
            Some(app) if app == APPLICATION => {}
            Some(app) => {
                return Err(self.corrupt(format!("its meta table belongs to {app:?}")));
            }
            None => return Err(self.corrupt("its meta table names no application")),
        }
        let version = read("schema_version")?
            .ok_or_else(|| self.corrupt("its meta table has no schema_version"))?;
        version
            .parse::<i64>()
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| self.corrupt(format!("schema_version {version:?} is not a version")))
    }

    fn migrate(&self, migrations: &[Migration]) -> Result<(), BillingError> {
        let latest = migrations.last().map_or(0, |m| m.version);
        if self.inspect()? == latest {
            return Ok(());
        }
        self.exec("BEGIN IMMEDIATE").map_err(|e| self.db(e))?;
        let result = self.migrate_in_transaction(migrations, latest);
        match result {
            Ok(()) => self.exec("COMMIT").map_err(|e| self.db(e)),
            Err(e) => {
                if let Err(rollback) = self.exec("ROLLBACK") {
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
        // Another process may have migrated between our look and our lock: look again.
        let current = self.inspect()?;
        if current > latest {
            return Err(BillingError::NewerSchema {
                path: self.path.clone(),
                found: current,
                supported: latest,
            });
        }
        for m in migrations.iter().filter(|m| m.version > current) {
            info!(path = %self.path.display(), version = m.version, step = m.description,
                "migrating billing schema");
            self.conn.execute_batch(m.sql).map_err(|e| self.db(e))?;
        }
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('application', ?1) \
                 ON CONFLICT (key) DO NOTHING",
                [APPLICATION],
            )
            .map_err(|e| self.db(e))?;
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [latest.to_string()],
            )
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    fn exec(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    fn fatal(&self, e: rusqlite::Error) -> OpFailure {
        OpFailure::Fatal(self.db(e))
    }

    /// Runs `f` under a savepoint, so that a failing op leaves no trace.
    fn in_savepoint<T>(
        &self,
        f: impl FnOnce(&Self) -> Result<T, BillingError>,
    ) -> Result<T, OpFailure> {
        self.exec("SAVEPOINT op").map_err(|e| self.fatal(e))?;
        match f(self) {
            Ok(value) => {
                self.exec("RELEASE op").map_err(|e| self.fatal(e))?;
                Ok(value)
            }
            Err(e) if self.conn.is_autocommit() => Err(OpFailure::Fatal(e)),
            Err(e) => {
                self.exec("ROLLBACK TO op")
                    .and_then(|()| self.exec("RELEASE op"))
                    .map_err(|e| self.fatal(e))?;
                Err(OpFailure::Refused(e))
            }
        }
    }

    /// Classifies the result of an op that writes with a single statement: on error,
    /// SQLite has undone the statement, unless it rolled back the whole transaction.
    fn single_statement<T>(&self, result: Result<T, BillingError>) -> Result<T, OpFailure> {
        match result {
            Ok(value) => Ok(value),
            Err(e) if self.conn.is_autocommit() => Err(OpFailure::Fatal(e)),
            Err(e) => Err(OpFailure::Refused(e)),
        }
    }

    fn apply_op(&self, op: &Op) -> Result<Outcome, OpFailure> {
        op.validate().map_err(OpFailure::Refused)?;
        match op {
            // Single-statement writes: SQLite undoes a failed statement by itself.
            Op::Open(open) => {
                self.single_statement(self.insert_open(open).map(|()| Outcome::Opened))
            }
            Op::Touch(touch) => self.in_savepoint(|s| s.touch(touch).map(Outcome::Touched)),
            Op::TouchAll { node, seen_at_ms } => {
                self.single_statement(self.touch_all(node, *seen_at_ms).map(Outcome::Touched))
            }
            Op::Close(close) => self.close_op(close).map(Outcome::Closed),
            Op::Charge(charge) => self.single_statement(
                self.charge(charge)
                    .map(|(record, duplicate)| Outcome::Charged { record, duplicate }),
            ),
            Op::Recover { node, now_ms } => {
                self.in_savepoint(|s| s.recover_node(node, *now_ms).map(Outcome::Recovered))
            }
            Op::ClaimLost {
                node,
                lease_ms,
                now_ms,
            } => {
                self.in_savepoint(|s| s.claim_lost(node, *lease_ms, *now_ms).map(Outcome::Claimed))
            }
            // A read: it changes nothing, and fails alone unless SQLite lost the
            // transaction.
            Op::FindEnded {
                key,
                ended_since_ms,
            } => self.single_statement(
                self.find_ended(key, *ended_since_ms)
                    .map(Outcome::FoundEnded),
            ),
        }
    }

    /// The session record for [`Op::FindEnded`]: one index lookup per key column (see
    /// [`FIND_ENDED`]).
    fn find_ended(
        &self,
        key: &str,
        ended_since_ms: i64,
    ) -> Result<Option<EndedSession>, BillingError> {
        if key.is_empty() {
            return Ok(None);
        }
        self.conn
            .prepare_cached(FIND_ENDED)
            .and_then(|mut stmt| {
                stmt.query_row(params![key, ended_since_ms], |row| {
                    Ok(EndedSession {
                        session_id: row.get(0)?,
                        call_id: row.get(1)?,
                        server_call_id: row.get(2)?,
                        subscriber: row.get(3)?,
                        service: row.get(4)?,
                        server: row.get(5)?,
                        account: row.get(6)?,
                        ended_at_ms: row.get(7)?,
                    })
                })
                .optional()
            })
            .map_err(|e| self.db(e))
    }

    fn insert_open(&self, open: &OpenSession) -> Result<(), BillingError> {
        let tariff = self.tariff_snapshot(&open.tariff)?;
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO open_sessions (session_id, call_id, subscriber, service, server, \
                 plan, tariff, confirmed_at_ms, last_seen_ms, node, server_call_id, account) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11) \
                 ON CONFLICT (session_id) DO NOTHING",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    open.session_id,
                    open.call_id,
                    open.subscriber,
                    open.service,
                    open.server,
                    open.plan,
                    &*tariff,
                    open.confirmed_at_ms,
                    open.node,
                    open.server_call_id,
                    open.account,
                ])
            })
            .map_err(|e| self.db(e))?;
        if inserted == 0 {
            return Err(BillingError::SessionAlreadyOpen {
                session_id: open.session_id.clone(),
            });
        }
        Ok(())
    }

    fn touch_all(&self, node: &str, seen_at_ms: i64) -> Result<usize, BillingError> {
        self.conn
            .prepare_cached(
                "UPDATE open_sessions SET last_seen_ms = max(last_seen_ms, ?2) WHERE node = ?1",
            )
            .and_then(|mut stmt| stmt.execute(params![node, seen_at_ms]))
            .map_err(|e| self.db(e))
    }

    fn touch(&self, touch: &TouchSessions) -> Result<usize, BillingError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "UPDATE open_sessions SET last_seen_ms = max(last_seen_ms, ?2) \
                 WHERE session_id = ?1",
            )
            .map_err(|e| self.db(e))?;
        let mut touched = 0;
        for id in unique_ids(&touch.session_ids) {
            touched += stmt
                .execute(params![id, touch.seen_at_ms])
                .map_err(|e| self.db(e))?;
        }
        Ok(touched)
    }

    /// Closes a session for [`Op::Close`] without a savepoint (one costs more than the
    /// close itself): the record is written first, by a single statement that SQLite
    /// undoes by itself if it fails; if removing the journal row then fails, the record is
    /// deleted again. Either way a refused close leaves no trace. If that undo fails too,
    /// or SQLite rolled the transaction back, the whole batch fails.
    fn close_op(&self, close: &CloseSession) -> Result<SessionRecord, OpFailure> {
        let record = self.single_statement(self.write_record(
            &close.session_id,
            close.ended_at_ms,
            close.cause,
        ))?;
        match self.remove_journal_row(&close.session_id) {
            Ok(()) => Ok(record),
            Err(e) if self.conn.is_autocommit() => Err(OpFailure::Fatal(e)),
            Err(e) => {
                let undone = self
                    .conn
                    .prepare_cached("DELETE FROM session_records WHERE record_id = ?1")
                    .and_then(|mut stmt| stmt.execute([record.record_id]))
                    .map_err(|e| self.fatal(e))?;
                if undone != 1 {
                    return Err(OpFailure::Fatal(self.corrupt(format!(
                        "record {} of session {:?} vanished while undoing its close",
                        record.record_id, close.session_id
                    ))));
                }
                Err(OpFailure::Refused(e))
            }
        }
    }

    /// Removes a session from the journal and writes its record. Run it under a
    /// savepoint: a failure after the first write leaves the other one done.
    fn close_row(
        &self,
        session_id: &str,
        ended_at_ms: i64,
        cause: EndCause,
    ) -> Result<SessionRecord, BillingError> {
        let record = self.write_record(session_id, ended_at_ms, cause)?;
        self.remove_journal_row(session_id)?;
        Ok(record)
    }

    /// Rates a journaled session and writes its record, leaving the journal row.
    ///
    /// Plain statements, none with `RETURNING`: SQLite runs a `RETURNING` clause through
    /// an ephemeral table, which costs more than the write itself. Only the insert
    /// writes, so a failure leaves nothing behind (SQLite undoes a failed statement).
    fn write_record(
        &self,
        session_id: &str,
        ended_at_ms: i64,
        cause: EndCause,
    ) -> Result<SessionRecord, BillingError> {
        let journaled = self
            .conn
            .prepare_cached(
                "SELECT call_id, subscriber, service, server, plan, tariff, confirmed_at_ms, \
                 server_call_id, account FROM open_sessions WHERE session_id = ?1",
            )
            .and_then(|mut stmt| {
                stmt.query_row([session_id], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, String>(5)?,
                        row.get::<_, i64>(6)?,
                        row.get::<_, String>(7)?,
                        row.get::<_, Option<String>>(8)?,
                    ))
                })
                .optional()
            })
            .map_err(|e| self.db(e))?;
        let Some((
            call_id,
            subscriber,
            service,
            server,
            plan,
            tariff,
            confirmed_at_ms,
            server_call_id,
            account,
        )) = journaled
        else {
            return Err(BillingError::UnknownSession {
                session_id: session_id.to_owned(),
            });
        };
        let tariff = self.journaled_tariff(session_id, &tariff)?;
        // A clock that stepped back makes a zero-length session, never a negative one.
        let ended_at_ms = ended_at_ms.max(confirmed_at_ms);
        let duration_ms = ended_at_ms - confirmed_at_ms;
        let charge = tariff.charge_for(duration_ms.unsigned_abs());
        let mut record = SessionRecord {
            record_id: 0,
            session_id: session_id.to_owned(),
            call_id,
            subscriber,
            service,
            server,
            plan,
            tariff: tariff.name().to_owned(),
            confirmed_at_ms,
            ended_at_ms,
            duration_ms,
            cause,
            charge,
        };
        self.conn
            .prepare_cached(
                "INSERT INTO session_records (session_id, call_id, subscriber, service, server, \
                 plan, tariff, confirmed_at_ms, ended_at_ms, duration_ms, end_cause, \
                 amount_minor, currency, server_call_id, account) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    record.session_id,
                    record.call_id,
                    record.subscriber,
                    record.service,
                    record.server,
                    record.plan,
                    record.tariff,
                    record.confirmed_at_ms,
                    record.ended_at_ms,
                    record.duration_ms,
                    record.cause.as_str(),
                    record.charge.minor,
                    record.charge.currency.as_str(),
                    server_call_id,
                    account,
                ])
            })
            .map_err(|e| self.db(e))?;
        // The rowid of the insert that just succeeded on this connection, which only
        // this thread uses.
        record.record_id = self.conn.last_insert_rowid();
        Ok(record)
    }

    /// Deletes the journal row of a session that [`write_record`](Self::write_record)
    /// has just read (the transaction holds the write lock, so it is still there).
    fn remove_journal_row(&self, session_id: &str) -> Result<(), BillingError> {
        let deleted = self
            .conn
            .prepare_cached("DELETE FROM open_sessions WHERE session_id = ?1")
            .and_then(|mut stmt| stmt.execute([session_id]))
            .map_err(|e| self.db(e))?;
        if deleted != 1 {
            return Err(self.corrupt(format!(
                "journal row of session {session_id:?} vanished while closing it"
            )));
        }
        Ok(())
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
        // No `RETURNING` (see `write_record`): the row count tells a new event from a
        // duplicate, and the new row's id is the connection's last insert.
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO charge_records (session_id, server, subscriber, service, event_id, \
                 amount_minor, currency, units, unit_price_minor, description, charged_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
                 ON CONFLICT (server, event_id) DO NOTHING",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    record.session_id,
                    record.server,
                    record.subscriber,
                    record.service,
                    record.event_id,
                    record.amount.minor,
                    record.amount.currency.as_str(),
                    record.units.map(|u| u.units),
                    record.units.map(|u| u.unit_price_minor),
                    record.description,
                    record.charged_at_ms,
                ])
            })
            .map_err(|e| self.db(e))?;
        if inserted == 1 {
            return Ok((
                ChargeRecord {
                    record_id: self.conn.last_insert_rowid(),
                    ..record
                },
                false,
            ));
        }
        let sql = format!(
            "SELECT {CHARGE_COLUMNS} FROM charge_records WHERE server = ?1 AND event_id = ?2"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.db(e))?;
        let mut rows = stmt
            .query(params![charge.server, charge.event_id])
            .map_err(|e| self.db(e))?;
        let row = rows.next().map_err(|e| self.db(e))?.ok_or_else(|| {
            self.corrupt(format!(
                "charge ({}, {}) conflicts but cannot be found",
                charge.server, charge.event_id
            ))
        })?;
        let earlier = self.read_charge(row)?;
        if (earlier.amount, earlier.units, &earlier.subscriber)
            != (record.amount, record.units, &record.subscriber)
        {
            warn!(server = %charge.server, event_id = %charge.event_id,
                stored = %earlier.amount, submitted = %record.amount,
                "charge event resubmitted with different content; the stored one stands");
        }
        Ok((earlier, true))
    }

    /// Closes, at its last-seen time, each journaled session that `sql` selects (its
    /// parameters `params`; it returns session id, confirmation and last-seen times).
    /// The transaction holds SQLite's write lock, so no other writer closes one meanwhile.
    fn close_selected(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        now_ms: i64,
        cause: EndCause,
    ) -> Result<Vec<SessionRecord>, BillingError> {
        let open: Vec<(String, i64, i64)> = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut stmt| {
                stmt.query_map(params, |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect()
            })
            .map_err(|e| self.db(e))?;
        let mut records = Vec::with_capacity(open.len());
        for (session_id, confirmed_at_ms, last_seen_ms) in open {
            let ended = recovered_end(confirmed_at_ms, last_seen_ms, now_ms);
            records.push(self.close_row(&session_id, ended, cause)?);
        }
        Ok(records)
    }

    fn recover_node(&self, node: &str, now_ms: i64) -> Result<Vec<SessionRecord>, BillingError> {
        let records = self.close_selected(
            "SELECT session_id, confirmed_at_ms, last_seen_ms FROM open_sessions \
             WHERE node = ?1 ORDER BY confirmed_at_ms, session_id",
            [node],
            now_ms,
            EndCause::RecoveredAfterRestart,
        )?;
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
        self.close_selected(
            "SELECT session_id, confirmed_at_ms, last_seen_ms FROM open_sessions \
             WHERE node <> ?1 AND last_seen_ms < ?2 ORDER BY confirmed_at_ms, session_id",
            params![node, now_ms.saturating_sub(lease_ms)],
            now_ms,
            EndCause::RelayLost,
        )
    }

    fn read_session(&self, row: &Row<'_>) -> Result<SessionRecord, BillingError> {
        let db = |e| self.db(e);
        let record_id: i64 = row.get(0).map_err(db)?;
        let bad = |detail: String| BillingError::BadRow {
            table: "session_records",
            key: record_id.to_string(),
            detail,
        };
        let cause: String = row.get(11).map_err(db)?;
        let currency: String = row.get(13).map_err(db)?;
        Ok(SessionRecord {
            record_id,
            session_id: row.get(1).map_err(db)?,
            call_id: row.get(2).map_err(db)?,
            subscriber: row.get(3).map_err(db)?,
            service: row.get(4).map_err(db)?,
            server: row.get(5).map_err(db)?,
            plan: row.get(6).map_err(db)?,
            tariff: row.get(7).map_err(db)?,
            confirmed_at_ms: row.get(8).map_err(db)?,
            ended_at_ms: row.get(9).map_err(db)?,
            duration_ms: row.get(10).map_err(db)?,
            cause: cause.parse().map_err(|e| bad(format!("{e}")))?,
            charge: Money::new(
                row.get(12).map_err(db)?,
                Currency::new(&currency).map_err(|e| bad(e.to_string()))?,
            ),
        })
    }

    fn read_charge(&self, row: &Row<'_>) -> Result<ChargeRecord, BillingError> {
        let db = |e| self.db(e);
        let record_id: i64 = row.get(0).map_err(db)?;
        let currency: String = row.get(7).map_err(db)?;
        let currency = Currency::new(&currency).map_err(|e| BillingError::BadRow {
            table: "charge_records",
            key: record_id.to_string(),
            detail: e.to_string(),
        })?;
        let units: Option<i64> = row.get(8).map_err(db)?;
        let unit_price: Option<i64> = row.get(9).map_err(db)?;
        Ok(ChargeRecord {
            record_id,
            session_id: row.get(1).map_err(db)?,
            server: row.get(2).map_err(db)?,
            subscriber: row.get(3).map_err(db)?,
            service: row.get(4).map_err(db)?,
            event_id: row.get(5).map_err(db)?,
            amount: Money::new(row.get(6).map_err(db)?, currency),
            units: units
                .zip(unit_price)
                .map(|(units, unit_price_minor)| UnitCharge {
                    units,
                    unit_price_minor,
                }),
            description: row.get(10).map_err(db)?,
            charged_at_ms: row.get(11).map_err(db)?,
        })
    }
}

fn parse_tariff(session_id: &str, json: &str) -> Result<Tariff, BillingError> {
    serde_json::from_str(json).map_err(|e| BillingError::BadRow {
        table: "open_sessions",
        key: session_id.to_owned(),
        detail: format!("journaled tariff: {e}"),
    })
}

/// Maps a SQLite error on `path`: a file that is not a database or is damaged becomes
/// [`BillingError::Corrupt`], anything else [`BillingError::Database`].
fn db_error(path: &Path, e: rusqlite::Error) -> BillingError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => BillingError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        _ => BillingError::Database {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

impl Store for SqliteStore {
    fn apply(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, BillingError>>, BillingError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        self.exec("BEGIN IMMEDIATE").map_err(|e| self.db(e))?;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            match self.apply_op(op) {
                Ok(outcome) => results.push(Ok(outcome)),
                Err(OpFailure::Refused(e)) => {
                    debug!(op = op.kind(), error = %e, "billing op refused");
                    results.push(Err(e));
                }
                Err(OpFailure::Fatal(e)) => {
                    if !self.conn.is_autocommit() {
                        if let Err(rollback) = self.exec("ROLLBACK") {
                            warn!(error = %rollback, "rollback of a failed billing batch failed");
                        }
                    }
                    return Err(BillingError::CommitFailed {
                        detail: e.to_string(),
                    });
                }
            }
        }
        if let Err(e) = self.exec("COMMIT") {
            let e = self.db(e);
            if !self.conn.is_autocommit() {
                if let Err(rollback) = self.exec("ROLLBACK") {
                    warn!(error = %rollback, "rollback after a failed commit failed");
                }
            }
            return Err(BillingError::CommitFailed {
                detail: e.to_string(),
            });
        }
        Ok(results)
    }

    fn journal(&self) -> Result<Vec<JournaledSession>, BillingError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT session_id, call_id, subscriber, service, server, plan, tariff, \
                 confirmed_at_ms, last_seen_ms, node, server_call_id, account \
                 FROM open_sessions ORDER BY confirmed_at_ms, session_id",
            )
            .map_err(|e| self.db(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.db(e))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.db(e))? {
            let db = |e| self.db(e);
            let session_id: String = row.get(0).map_err(db)?;
            let tariff: String = row.get(6).map_err(db)?;
            out.push(JournaledSession {
                session: OpenSession {
                    node: row.get(9).map_err(db)?,
                    tariff: parse_tariff(&session_id, &tariff)?,
                    session_id,
                    call_id: row.get(1).map_err(db)?,
                    server_call_id: row.get(10).map_err(db)?,
                    subscriber: row.get(2).map_err(db)?,
                    service: row.get(3).map_err(db)?,
                    server: row.get(4).map_err(db)?,
                    account: row.get(11).map_err(db)?,
                    plan: row.get(5).map_err(db)?,
                    confirmed_at_ms: row.get(7).map_err(db)?,
                },
                last_seen_ms: row.get(8).map_err(db)?,
            });
        }
        Ok(out)
    }

    fn scan_sessions(
        &self,
        period: Period,
        visit: &mut dyn FnMut(SessionRecord) -> Result<(), BillingError>,
    ) -> Result<(), BillingError> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM session_records \
             WHERE ended_at_ms >= ?1 AND ended_at_ms < ?2 ORDER BY ended_at_ms, record_id"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.db(e))?;
        let mut rows = stmt
            .query(params![period.since_ms, period.until_ms])
            .map_err(|e| self.db(e))?;
        while let Some(row) = rows.next().map_err(|e| self.db(e))? {
            visit(self.read_session(row)?)?;
        }
        Ok(())
    }

    fn scan_charges(
        &self,
        period: Period,
        visit: &mut dyn FnMut(ChargeRecord) -> Result<(), BillingError>,
    ) -> Result<(), BillingError> {
        let sql = format!(
            "SELECT {CHARGE_COLUMNS} FROM charge_records \
             WHERE charged_at_ms >= ?1 AND charged_at_ms < ?2 ORDER BY charged_at_ms, record_id"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.db(e))?;
        let mut rows = stmt
            .query(params![period.since_ms, period.until_ms])
            .map_err(|e| self.db(e))?;
        while let Some(row) = rows.next().map_err(|e| self.db(e))? {
            visit(self.read_charge(row)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::store::{ChargeAmount, CloseSession};
    use crate::tariff::TariffSpec;

    const T0: i64 = 1_700_000_000_000;

    fn eur() -> Currency {
        Currency::new("EUR").unwrap()
    }

    /// Setup 10, 2 per minute, 60/60, no free seconds.
    fn tariff() -> Tariff {
        Tariff::new(TariffSpec {
            name: "standard".into(),
            service: None,
            plan: None,
            currency: eur(),
            setup: 10,
            rate: 2,
            period_seconds: 60,
            increment: "60/60".parse().unwrap(),
            free_seconds: 0,
        })
        .unwrap()
    }

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
            tariff: tariff(),
            confirmed_at_ms: at,
        }
    }

    fn close(id: &str, at: i64, cause: EndCause) -> CloseSession {
        CloseSession {
            session_id: id.into(),
            ended_at_ms: at,
            cause,
        }
    }

    fn charge(server: &str, event: &str, minor: i64) -> NewCharge {
        NewCharge {
            session_id: Some("s1".into()),
            server: server.into(),
            subscriber: "alice".into(),
            service: Some("video".into()),
            event_id: event.into(),
            amount: ChargeAmount::Total(Money::new(minor, eur())),
            description: "a song".into(),
            charged_at_ms: T0,
        }
    }

    fn fresh() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("billing.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn opens_in_wal_mode_with_full_sync_at_the_current_version() {
        let (_dir, store) = fresh();
        let mode: String = store
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let cache: i64 = store
            .conn
            .pragma_query_value(None, "cache_size", |r| r.get(0))
            .unwrap();
        assert_eq!(cache, PAGE_CACHE_KIB, "1 MiB of page cache");
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(MIGRATIONS.last().unwrap().version, SCHEMA_VERSION);
        store.integrity_check().unwrap();
    }

    #[test]
    fn cached_tariff_snapshots_journal_and_rate_like_the_tariffs_themselves() {
        let (_dir, mut store) = fresh();
        // More distinct tariffs than a cache holds, some sharing a name, each used twice
        // (the second time from the caches, unless evicted in between).
        let tariffs: Vec<Tariff> = (0..TARIFF_CACHE as i64 + 6)
            .map(|k| {
                Tariff::new(TariffSpec {
                    name: format!("t{}", k % 5),
                    service: None,
                    plan: None,
                    currency: eur(),
                    setup: k % 3,
                    rate: k,
                    period_seconds: 60,
                    increment: if k % 2 == 0 { "60/60" } else { "30/6" }.parse().unwrap(),
                    free_seconds: (k % 4) as u32,
                })
                .unwrap()
            })
            .collect();
        let mut expected = Vec::new();
        for round in 0..2 {
            for (k, t) in tariffs.iter().enumerate() {
                let id = format!("s{round}-{k}");
                let mut open = session(&id, T0);
                open.tariff = t.clone();
                store.open_session(open).unwrap();
                let json: String = store
                    .conn
                    .query_row(
                        "SELECT tariff FROM open_sessions WHERE session_id = ?1",
                        [&id],
                        |r| r.get(0),
                    )
                    .unwrap();
                assert_eq!(json, serde_json::to_string(t).unwrap(), "{id}");
                let duration = 1_000 * (k as i64 * 7 + round);
                expected.push((id, t.clone(), duration));
            }
        }
        assert!(store.snapshots.borrow().len() <= TARIFF_CACHE);
        let journal = store.journal().unwrap();
        for (id, t, _) in &expected {
            let j = journal
                .iter()
                .find(|j| &j.session.session_id == id)
                .unwrap();
            assert_eq!(&j.session.tariff, t, "{id}");
        }
        for (id, t, duration) in &expected {
            let record = store
                .close_session(close(id, T0 + duration, EndCause::CallerBye))
                .unwrap();
            assert_eq!(record.charge, t.charge_for(duration.unsigned_abs()), "{id}");
            assert_eq!(record.tariff, t.name());
        }
        assert!(store.tariffs.borrow().len() <= TARIFF_CACHE);
    }

    #[test]
    fn a_close_that_fails_half_way_is_undone_and_the_batch_goes_on() {
        let (_dir, mut store) = fresh();
        // Make removing b's journal row fail after its record has been written.
        store
            .conn
            .execute_batch(
                "CREATE TEMP TRIGGER keep_b BEFORE DELETE ON open_sessions \
                 WHEN OLD.session_id = 'b' BEGIN SELECT RAISE(ABORT, 'injected'); END;",
            )
            .unwrap();
        let results = store
            .apply(&[
                Op::Open(session("a", T0)),
                Op::Open(session("b", T0)),
                Op::Close(close("b", T0 + 1_000, EndCause::CallerBye)),
                Op::Close(close("a", T0 + 2_000, EndCause::CallerBye)),
                Op::Charge(charge("as1", "ev-1", 5)),
            ])
            .unwrap();
        assert!(
            matches!(&results[2], Err(BillingError::Database { source, .. })
                if source.to_string().contains("injected")),
            "{:?}",
            results[2]
        );
        assert!(results.iter().enumerate().all(|(i, r)| i == 2 || r.is_ok()));
        let records = store.session_records(Period::all()).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].session_id, "a");
        // Not even b's record id is gone: a got the one b had taken.
        assert_eq!(records[0].record_id, 1);
        let journal = store.journal().unwrap();
        assert_eq!(journal.len(), 1);
        assert_eq!(journal[0].session, session("b", T0));
        assert_eq!(store.charge_records(Period::all()).unwrap().len(), 1);

        // A record that cannot be written is refused the same way.
        store
            .conn
            .execute_batch(
                "DROP TRIGGER keep_b; \
                 CREATE TEMP TRIGGER no_records BEFORE INSERT ON session_records \
                 BEGIN SELECT RAISE(ABORT, 'injected'); END;",
            )
            .unwrap();
        let err = store
            .close_session(close("b", T0 + 3_000, EndCause::CallerBye))
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert_eq!(store.journal().unwrap().len(), 1);
        store
            .conn
            .execute_batch("DROP TRIGGER no_records;")
            .unwrap();
        let record = store
            .close_session(close("b", T0 + 3_000, EndCause::CallerBye))
            .unwrap();
        assert_eq!(record.record_id, 2);
        assert!(store.journal().unwrap().is_empty());
    }

    #[test]
    fn a_close_that_cannot_be_undone_fails_the_whole_batch() {
        for (trigger, undo_fails) in [
            // The journal row stays, and so would the record, whose removal fails too.
            ("RAISE(ABORT, 'injected')", true),
            // SQLite rolls the whole transaction back itself.
            ("RAISE(ROLLBACK, 'injected')", false),
        ] {
            let (_dir, mut store) = fresh();
            store.open_session(session("b", T0)).unwrap();
            let mut sql = format!(
                "CREATE TEMP TRIGGER keep_b BEFORE DELETE ON open_sessions \
                 BEGIN SELECT {trigger}; END;"
            );
            if undo_fails {
                sql.push_str(
                    "CREATE TEMP TRIGGER keep_records BEFORE DELETE ON session_records \
                     BEGIN SELECT RAISE(ABORT, 'injected'); END;",
                );
            }
            store.conn.execute_batch(&sql).unwrap();
            let err = store
                .apply(&[
                    Op::Charge(charge("as1", "ev-1", 5)),
                    Op::Open(session("c", T0)),
                    Op::Close(close("b", T0 + 1_000, EndCause::CallerBye)),
                ])
                .unwrap_err();
            assert!(
                matches!(err, BillingError::CommitFailed { .. }),
                "{trigger}: {err:?}"
            );
            assert!(store.conn.is_autocommit(), "{trigger}");
            assert!(store.session_records(Period::all()).unwrap().is_empty());
            assert!(store.charge_records(Period::all()).unwrap().is_empty());
            let journal = store.journal().unwrap();
            assert_eq!(journal.len(), 1, "{trigger}");
            assert_eq!(journal[0].session.session_id, "b");
        }
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_by_name_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billing.db");
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, BillingError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not a billing database or damaged"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), garbage);
    }

    #[test]
    fn a_damaged_billing_database_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billing.db");
        {
            let mut store = SqliteStore::open(&path).unwrap();
            store.open_session(session("a", T0)).unwrap();
            store
                .close_session(close("a", T0 + 1, EndCause::CallerBye))
                .unwrap();
            store
                .conn
                .pragma_update(None, "wal_checkpoint", "TRUNCATE")
                .unwrap();
        }
        // Overwrite everything after the first page (the schema) with garbage.
        let mut bytes = std::fs::read(&path).unwrap();
        let page = 4096.min(bytes.len());
        for b in &mut bytes[page..] {
            *b = 0xA5;
        }
        std::fs::write(&path, &bytes).unwrap();
        let result = SqliteStore::open(&path).and_then(|s| {
            s.integrity_check()?;
            s.session_records(Period::all())
        });
        let err = result.unwrap_err();
        assert!(matches!(err, BillingError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("billing.db"), "{err}");
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billing.db");
        {
            let mut store = SqliteStore::open(&path).unwrap();
            store.record_charge(charge("as1", "ev-1", 5)).unwrap();
            store
                .conn
                .execute(
                    "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
                    [],
                )
                .unwrap();
        }
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                BillingError::NewerSchema {
                    found: 99,
                    supported: SCHEMA_VERSION,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("schema version 99 is newer"),
            "{err}"
        );
        assert!(matches!(
            SqliteStore::open_read_only(&path).unwrap_err(),
            BillingError::NewerSchema { .. }
        ));
        let raw = Connection::open(&path).unwrap();
        let version: String = raw
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let charges: i64 = raw
            .query_row("SELECT count(*) FROM charge_records", [], |r| r.get(0))
            .unwrap();
        assert_eq!((version.as_str(), charges), ("99", 1));
    }

    #[test]
    fn a_foreign_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('x');")
            .unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            err.to_string()
                .contains("tables (users) but no billing meta table"),
            "{err}"
        );
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE meta (key TEXT, value TEXT); INSERT INTO meta VALUES ('application', 'cms');")
            .unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("belongs to \"cms\""), "{err}");
    }

    #[test]
    fn migrations_run_in_order_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billing.db");
        let v2 = [
            Migration {
                version: 1,
                description: "v1",
                sql: SCHEMA_V1,
            },
            Migration {
                version: 2,
                description: "add notes",
                sql: "CREATE TABLE notes (text TEXT NOT NULL) STRICT; \
                      INSERT INTO notes VALUES ('migrated');",
            },
        ];
        let store = SqliteStore::open_with(&path, &v2[..1]).unwrap();
        assert_eq!(store.schema_version().unwrap(), 1);
        drop(store);
        let store = SqliteStore::open_with(&path, &v2).unwrap();
        assert_eq!(store.schema_version().unwrap(), 2);
        drop(store);
        // Opening again runs nothing more: the insert of version 2 happened once.
        let store = SqliteStore::open_with(&path, &v2).unwrap();
        let notes: i64 = store
            .conn
            .query_row("SELECT count(*) FROM notes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(notes, 1);
        drop(store);
        // A build that knows only version 1 refuses the file.
        assert!(matches!(
            SqliteStore::open_with(&path, &v2[..1]).unwrap_err(),
            BillingError::NewerSchema {
                found: 2,
                supported: 1,
                ..
            }
        ));
    }

    /// Journals a session as versions 1 and 2 did (no node column).
    fn open_before_v3(conn: &Connection, id: &str, at: i64) {
        conn.execute(
            "INSERT INTO open_sessions (session_id, call_id, subscriber, service, server, plan, \
             tariff, confirmed_at_ms, last_seen_ms) \
             VALUES (?1, 'call-' || ?1, 'alice', 'video', 'as1', 'gold', ?2, ?3, ?3)",
            params![id, serde_json::to_string(&tariff()).unwrap(), at],
        )
        .unwrap();
    }

    /// Closes a session as versions 1 to 3 did (no server call id, no account): its record
    /// rated with [`tariff`], its journal row deleted.
    fn close_before_v4(conn: &Connection, id: &str, ended_at_ms: i64, cause: EndCause) {
        let confirmed_at_ms: i64 = conn
            .query_row(
                "SELECT confirmed_at_ms FROM open_sessions WHERE session_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        let charge = tariff().charge_for((ended_at_ms - confirmed_at_ms).unsigned_abs());
        conn.execute(
            "INSERT INTO session_records (session_id, call_id, subscriber, service, server, \
             plan, tariff, confirmed_at_ms, ended_at_ms, duration_ms, end_cause, \
             amount_minor, currency) \
             SELECT session_id, call_id, subscriber, service, server, plan, ?2, \
             confirmed_at_ms, ?3, ?3 - confirmed_at_ms, ?4, ?5, ?6 \
             FROM open_sessions WHERE session_id = ?1",
            params![
                id,
                tariff().name(),
                ended_at_ms,
                cause.as_str(),
                charge.minor,
                charge.currency.as_str()
            ],
        )
        .unwrap();
        conn.execute("DELETE FROM open_sessions WHERE session_id = ?1", [id])
            .unwrap();
    }

    /// Writes a session record straight into the table, past the store's checks.
    fn insert_raw_record(conn: &Connection, record_id: i64, cause: &str) -> rusqlite::Result<()> {
        conn.execute(
            "INSERT INTO session_records (record_id, session_id, call_id, subscriber, service, \
             server, plan, tariff, confirmed_at_ms, ended_at_ms, duration_ms, end_cause, \
             amount_minor, currency) \
             VALUES (?1, 'raw', 'call-raw', 'alice', 'video', 'as1', 'basic', 'standard', \
             0, 10, 10, ?2, 0, 'EUR')",
            params![record_id, cause],
        )
        .map(|_| ())
    }

    fn is_check_failure(result: rusqlite::Result<()>) -> bool {
        matches!(result, Err(ref e)
            if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
                && e.to_string().contains("CHECK constraint failed"))
    }

    /// Every object of the schema (type, name, table, SQL with whitespace collapsed),
    /// without the root pages, which depend on the file's history.
    fn schema_of(conn: &Connection) -> Vec<[String; 4]> {
        let mut stmt = conn
            .prepare(
                "SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master \
                 ORDER BY type, name",
            )
            .unwrap();
        stmt.query_map([], |r| {
            let sql: String = r.get(3)?;
            Ok([
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                sql.split_whitespace().collect::<Vec<_>>().join(" "),
            ])
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .unwrap()
    }

    fn session_records_sql(conn: &Connection) -> String {
        conn.query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'session_records'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn a_version_1_database_migrates_keeping_every_record_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billing.db");
        let (records, journal, charges) = {
            // A database as version 1 wrote it.
            let mut store = SqliteStore::open_with(&path, &MIGRATIONS[..1]).unwrap();
            assert_eq!(store.schema_version().unwrap(), 1);
            assert!(session_records_sql(&store.conn).contains("end_cause IN ('caller-bye'"));
            // The causes version 1 knew.
            for (i, cause) in EndCause::ALL[..7].iter().copied().enumerate() {
                let id = format!("s{i}");
                open_before_v3(&store.conn, &id, T0);
                close_before_v4(&store.conn, &id, T0 + 1_000 * (i as i64 + 1), cause);
            }
            // Ids with a gap, and a last id that is not the row count.
            store
                .conn
                .execute("DELETE FROM session_records WHERE record_id = 3", [])
                .unwrap();
            open_before_v3(&store.conn, "live", T0);
            store.record_charge(charge("as1", "ev-1", 5)).unwrap();
            (
                store.session_records(Period::all()).unwrap(),
                vec![JournaledSession {
                    session: session("live", T0),
                    last_seen_ms: T0,
                }],
                store.charge_records(Period::all()).unwrap(),
            )
        };
        let ids: Vec<i64> = records.iter().map(|r| r.record_id).collect();
        assert_eq!(ids, [1, 2, 4, 5, 6, 7]);
        assert!(matches!(
            SqliteStore::open_read_only(&path).unwrap_err(),
            BillingError::OlderSchema {
                found: 1,
                supported: SCHEMA_VERSION,
                ..
            }
        ));

        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        store.integrity_check().unwrap();
        assert_eq!(store.session_records(Period::all()).unwrap(), records);
        // Journaled before the node column: the lone relay's ("").
        assert_eq!(store.journal().unwrap(), journal);
        assert_eq!(store.charge_records(Period::all()).unwrap(), charges);

        // The new CHECK is in force, and the index is back.
        let sql = session_records_sql(&store.conn);
        assert!(sql.contains("CHECK (end_cause = 'caller-bye' OR"), "{sql}");
        assert!(!sql.contains(" IN ("), "{sql}");
        assert!(is_check_failure(insert_raw_record(
            &store.conn,
            100,
            "hung-up"
        )));
        let plan: String = store
            .conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT * FROM session_records WHERE ended_at_ms >= 0",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("session_records_by_end"), "{plan}");

        // Ids go on after the highest one kept.
        let record = store
            .close_session(close("live", T0 + 9_000, EndCause::Timeout))
            .unwrap();
        assert_eq!(record.record_id, 8);

        // And the migrated file has exactly the schema of a new one.
        let (_fresh_dir, fresh) = fresh();
        assert_eq!(schema_of(&store.conn), schema_of(&fresh.conn));
        drop(store);
        assert_eq!(
            SqliteStore::open_read_only(&path)
                .unwrap()
                .session_records(Period::all())
                .unwrap()
                .len(),
            records.len() + 1
        );
    }

    #[test]
    fn a_version_2_database_migrates_keeping_every_record_and_journaled_session() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billing.db");
        let (records, journal, charges) = {
            // A database as version 2 wrote it.
            let mut store = SqliteStore::open_with(&path, &MIGRATIONS[..2]).unwrap();
            assert_eq!(store.schema_version().unwrap(), 2);
            for (i, cause) in EndCause::ALL[..7].iter().copied().enumerate() {
                let id = format!("s{i}");
                open_before_v3(&store.conn, &id, T0);
                close_before_v4(&store.conn, &id, T0 + 1_000 * (i as i64 + 1), cause);
            }
            // Version 2 knows neither relay-lost nor admin.
            assert!(is_check_failure(insert_raw_record(
                &store.conn,
                100,
                "relay-lost"
            )));
            open_before_v3(&store.conn, "live", T0);
            store.record_charge(charge("as1", "ev-1", 5)).unwrap();
            (
                store.session_records(Period::all()).unwrap(),
                vec![JournaledSession {
                    session: session("live", T0),
                    last_seen_ms: T0,
                }],
                store.charge_records(Period::all()).unwrap(),
            )
        };
        assert!(matches!(
            SqliteStore::open_read_only(&path).unwrap_err(),
            BillingError::OlderSchema {
                found: 2,
                supported: SCHEMA_VERSION,
                ..
            }
        ));

        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        store.integrity_check().unwrap();
        assert_eq!(store.session_records(Period::all()).unwrap(), records);
        // Journaled before the node column: the lone relay's ("").
        assert_eq!(store.journal().unwrap(), journal);
        assert_eq!(store.charge_records(Period::all()).unwrap(), charges);
        // The session journaled before the migration belongs to the lone relay, ''.
        let node: String = store
            .conn
            .query_row(
                "SELECT node FROM open_sessions WHERE session_id = 'live'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(node, "");
        insert_raw_record(&store.conn, 100, "relay-lost").unwrap();
        insert_raw_record(&store.conn, 101, "admin").unwrap();
        assert!(is_check_failure(insert_raw_record(
            &store.conn,
            102,
            "hung-up"
        )));
        let record = store
            .close_session(close("live", T0 + 61_000, EndCause::RelayLost))
            .unwrap();
        assert_eq!(record.record_id, 102);
        assert_eq!(record.charge.minor, 10 + 2 * 2);
        // And the migrated file has exactly the schema of a new one.
        let (_fresh_dir, fresh) = fresh();
        assert_eq!(schema_of(&store.conn), schema_of(&fresh.conn));
    }

    #[test]
    fn a_version_3_database_migrates_reading_back_no_server_call_id_and_no_account() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billing.db");
        let (records, journal, charges) = {
            // A database as version 3 wrote it.
            let mut store = SqliteStore::open_with(&path, &MIGRATIONS[..3]).unwrap();
            assert_eq!(store.schema_version().unwrap(), 3);
            for (i, id) in ["s0", "s1"].into_iter().enumerate() {
                open_before_v3(&store.conn, id, T0);
                close_before_v4(
                    &store.conn,
                    id,
                    T0 + 1_000 * (i as i64 + 1),
                    EndCause::CallerBye,
                );
            }
            open_before_v3(&store.conn, "live", T0);
            store.record_charge(charge("as1", "ev-1", 5)).unwrap();
            let journal: Vec<String> = store
                .conn
                .prepare("SELECT session_id FROM open_sessions")
                .unwrap()
                .query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect())
                .unwrap();
            (
                store.session_records(Period::all()).unwrap(),
                journal,
                store.charge_records(Period::all()).unwrap(),
            )
        };
        assert!(matches!(
            SqliteStore::open_read_only(&path).unwrap_err(),
            BillingError::OlderSchema {
                found: 3,
                supported: SCHEMA_VERSION,
                ..
            }
        ));

        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        store.integrity_check().unwrap();
        assert_eq!(store.session_records(Period::all()).unwrap(), records);
        assert_eq!(store.charge_records(Period::all()).unwrap(), charges);
        // Journaled before the columns: no server call id, no account.
        assert_eq!(journal, ["live"]);
        assert_eq!(
            store.journal().unwrap(),
            [JournaledSession {
                session: session("live", T0),
                last_seen_ms: T0,
            }]
        );
        let old: Vec<(String, Option<String>)> = store
            .conn
            .prepare("SELECT server_call_id, account FROM session_records ORDER BY record_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .unwrap();
        assert_eq!(old, [(String::new(), None), (String::new(), None)]);
        crate::store::check_upgraded_sessions_have_no_call_id_of_server(&mut store, T0 + 9_000);
        // And the migrated file has exactly the schema of a new one.
        let (_fresh_dir, fresh) = fresh();
        assert_eq!(schema_of(&store.conn), schema_of(&fresh.conn));
    }

    #[test]
    fn find_ended_uses_the_indexes() {
        let (_dir, store) = fresh();
        let plan: Vec<String> = store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {FIND_ENDED}"))
            .unwrap()
            .query_map(params!["k", 0], |r| r.get(3))
            .and_then(|rows| rows.collect())
            .unwrap();
        let plan = plan.join("\n");
        for index in [
            "session_records_by_session",
            "session_records_by_call",
            "session_records_by_server_call",
        ] {
            assert!(plan.contains(&format!("INDEX {index} (")), "{plan}");
        }
        assert!(!plan.contains("SCAN session_records"), "{plan}");
    }

    #[test]
    fn the_end_cause_check_lists_every_cause_and_nothing_else() {
        let (_dir, store) = fresh();
        let sql = session_records_sql(&store.conn);
        let start = sql.find("CHECK (end_cause").expect("an end-cause CHECK");
        let check = &sql[start..start + sql[start..].find(')').unwrap()];
        let mut listed: Vec<&str> = check.split('\'').skip(1).step_by(2).collect();
        listed.sort_unstable();
        let mut causes: Vec<&str> = EndCause::ALL.iter().map(|c| c.as_str()).collect();
        causes.sort_unstable();
        assert_eq!(listed, causes, "{check}");

        for (i, cause) in EndCause::ALL.into_iter().enumerate() {
            insert_raw_record(&store.conn, i as i64 + 1, cause.as_str()).unwrap();
        }
        for bad in ["", "hung-up", "Caller-Bye", "caller-bye ", "timeout'"] {
            assert!(
                is_check_failure(insert_raw_record(&store.conn, 100, bad)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn read_only_store_reads_but_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("billing.db");
        let mut writer = SqliteStore::open(&path).unwrap();
        writer.record_charge(charge("as1", "ev-1", 5)).unwrap();
        let mut reader = SqliteStore::open_read_only(&path).unwrap();
        assert_eq!(reader.charge_records(Period::all()).unwrap().len(), 1);
        assert!(reader.record_charge(charge("as1", "ev-2", 5)).is_err());
        assert_eq!(writer.charge_records(Period::all()).unwrap().len(), 1);
        let missing = dir.path().join("missing.db");
        let err = SqliteStore::open_read_only(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.db"), "{err}");
    }
}
