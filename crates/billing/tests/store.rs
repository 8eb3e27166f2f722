//! The billing store's contract, run against both backends: every test here runs once
//! on SQLite (`on_sqlite::…`) and once on a real PostgreSQL (`on_postgres::…`) that the
//! tests start themselves (see `support/pg_server.rs`; Debian's package `postgresql`).
//! Tests of one backend's own machinery (SQLite's file handling, PostgreSQL's session
//! settings and statement-failure replay) follow.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/pg_server.rs"]
mod pg_server;

use std::sync::Arc;

use billing::backend::{AnyStore, StorageBackend};
use billing::money::{Currency, Money};
use billing::postgresql::{PostgresStore, SCHEMA_VERSION as PG_SCHEMA_VERSION};
use billing::record::{EndCause, UnitCharge};
use billing::store::{
    ChargeAmount, CloseSession, EndedSession, NewCharge, Op, OpenSession, Outcome, Period, Store,
    TouchSessions,
};
use billing::tariff::{Tariff, TariffSpec};
use billing::writer::Writer;
use billing::BillingError;

const T0: i64 = 1_700_000_000_000;

/// One empty store on one backend, opened as many times as a test likes (a reopening is
/// what a restarted relay does).
struct Fixture {
    backend: StorageBackend,
    _dir: Option<tempfile::TempDir>,
    _server: Option<Arc<pg_server::PgServer>>,
}

impl Fixture {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Fixture {
            backend: StorageBackend::Sqlite {
                path: dir.path().join("billing.db"),
            },
            _dir: Some(dir),
            _server: None,
        }
    }

    fn postgres() -> Self {
        let server = pg_server::shared();
        Fixture {
            backend: StorageBackend::Postgres {
                url: server.fresh_database(),
            },
            _dir: None,
            _server: Some(server),
        }
    }

    fn open(&self) -> AnyStore {
        AnyStore::open(&self.backend).unwrap()
    }

    fn url(&self) -> &str {
        match &self.backend {
            StorageBackend::Postgres { url } => url,
            StorageBackend::Sqlite { .. } => panic!("not a PostgreSQL fixture"),
        }
    }
}

/// Each named test, once per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[test]
            fn $name() {
                super::$name(&super::Fixture::sqlite());
            })*
        }
        mod on_postgres {
            $(#[test]
            fn $name() {
                super::$name(&super::Fixture::postgres());
            })*
        }
    };
}

on_both_backends!(
    close_writes_the_record_and_empties_the_journal,
    an_end_before_the_confirmation_is_a_zero_length_session,
    every_end_cause_can_be_stored_and_read_back,
    opening_an_open_session_again_is_refused_and_changes_nothing,
    a_charge_event_is_stored_once_per_server,
    unit_charges_keep_units_and_price,
    refused_ops_in_a_batch_leave_no_trace_and_the_rest_commits,
    touch_all_refreshes_every_open_session_and_never_goes_back,
    touch_refreshes_open_sessions_and_never_goes_back,
    recovery_closes_each_journaled_session_once_at_its_last_seen_time,
    recovery_never_ends_a_session_after_now,
    queries_select_by_period,
    a_read_only_store_reads_but_never_writes,
    a_session_is_closed_once_by_two_stores_on_one_database,
    touch_all_renews_only_its_own_nodes_lease,
    recovery_closes_only_its_own_nodes_sessions,
    claim_lost_closes_only_expired_sessions_of_other_nodes_at_their_last_seen_time,
    a_session_claimed_as_lost_is_never_billed_again_by_its_node,
    relays_claiming_at_the_same_moment_bill_each_lost_session_once,
    claim_lost_refuses_a_lease_that_is_not_one,
    find_ended_finds_a_closed_session_by_each_of_its_keys,
    find_ended_returns_the_segment_that_ended_last,
    find_ended_never_finds_an_open_session_or_an_empty_key,
    recovered_and_claimed_sessions_keep_their_server_call_id_and_account,
    find_ended_in_a_batch_sees_the_ops_before_it_and_fails_alone,
    find_ended_through_the_writer_sees_every_close_submitted_before,
);

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
        server_call_id: format!("as-{id}"),
        subscriber: "alice".into(),
        service: "video".into(),
        server: "as1".into(),
        account: Some("acme".into()),
        plan: "gold".into(),
        tariff: tariff(),
        confirmed_at_ms: at,
    }
}

/// A session owned by relay `node`.
fn session_on(node: &str, id: &str, at: i64) -> OpenSession {
    OpenSession {
        node: node.into(),
        ..session(id, at)
    }
}

/// The journal as (node, session id, last seen).
fn journal_of(store: &AnyStore) -> Vec<(String, String, i64)> {
    store
        .journal()
        .unwrap()
        .into_iter()
        .map(|j| (j.session.node, j.session.session_id, j.last_seen_ms))
        .collect()
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

fn close_writes_the_record_and_empties_the_journal(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session("s1", T0)).unwrap();
    let journal = store.journal().unwrap();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].session, session("s1", T0));
    assert_eq!(journal[0].last_seen_ms, T0);

    let record = store
        .close_session(close("s1", T0 + 60_001, EndCause::CallerBye))
        .unwrap();
    assert_eq!(record.duration_ms, 60_001);
    assert_eq!(
        record.charge,
        Money::new(14, eur()),
        "setup 10 + two minutes at 2"
    );
    assert_eq!(record.tariff, "standard");
    assert_eq!(record.call_id, "call-s1");
    assert!(store.journal().unwrap().is_empty());
    assert_eq!(store.session_records(Period::all()).unwrap(), [record]);

    let err = store
        .close_session(close("s1", T0 + 70_000, EndCause::ServerBye))
        .unwrap_err();
    assert!(matches!(err, BillingError::UnknownSession { ref session_id } if session_id == "s1"));
    assert_eq!(store.session_records(Period::all()).unwrap().len(), 1);
}

fn an_end_before_the_confirmation_is_a_zero_length_session(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session("s1", T0)).unwrap();
    let record = store
        .close_session(close("s1", T0 - 5_000, EndCause::Timeout))
        .unwrap();
    assert_eq!((record.ended_at_ms, record.duration_ms), (T0, 0));
    assert_eq!(record.charge.minor, 0);
}

fn every_end_cause_can_be_stored_and_read_back(f: &Fixture) {
    let mut store = f.open();
    for (i, cause) in EndCause::ALL.into_iter().enumerate() {
        let id = format!("s{i}");
        store.open_session(session(&id, T0)).unwrap();
        store.close_session(close(&id, T0 + 1_000, cause)).unwrap();
    }
    let causes: Vec<EndCause> = store
        .session_records(Period::all())
        .unwrap()
        .into_iter()
        .map(|r| r.cause)
        .collect();
    assert_eq!(causes, EndCause::ALL);
}

fn opening_an_open_session_again_is_refused_and_changes_nothing(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session("s1", T0)).unwrap();
    let mut again = session("s1", T0 + 9);
    again.plan = "basic".into();
    let err = store.open_session(again).unwrap_err();
    assert_eq!(err.to_string(), "session \"s1\" is already open");
    let journal = store.journal().unwrap();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].session, session("s1", T0));
}

fn a_charge_event_is_stored_once_per_server(f: &Fixture) {
    let mut store = f.open();
    let (first, dup) = store.record_charge(charge("as1", "ev-1", 150)).unwrap();
    assert!(!dup);
    assert_eq!(first.amount, Money::new(150, eur()));
    let (again, dup) = store.record_charge(charge("as1", "ev-1", 150)).unwrap();
    assert!(dup);
    assert_eq!(again, first);
    // A resubmission with other content still returns the stored charge.
    let (changed, dup) = store.record_charge(charge("as1", "ev-1", 999)).unwrap();
    assert!(dup);
    assert_eq!(changed, first);
    // The same event id from another server is another event.
    let (other, dup) = store.record_charge(charge("as2", "ev-1", 150)).unwrap();
    assert!(!dup);
    assert_ne!(other.record_id, first.record_id);
    assert_eq!(store.charge_records(Period::all()).unwrap(), [first, other]);
}

fn unit_charges_keep_units_and_price(f: &Fixture) {
    let mut store = f.open();
    let mut c = charge("as1", "ev-u", 0);
    c.amount = ChargeAmount::Units {
        units: 7,
        unit_price: Money::new(3, eur()),
    };
    c.session_id = None;
    c.service = None;
    let (record, _) = store.record_charge(c).unwrap();
    assert_eq!(record.amount.minor, 21);
    assert_eq!(
        record.units,
        Some(UnitCharge {
            units: 7,
            unit_price_minor: 3
        })
    );
    assert_eq!(store.charge_records(Period::all()).unwrap(), [record]);
}

fn refused_ops_in_a_batch_leave_no_trace_and_the_rest_commits(f: &Fixture) {
    let mut store = f.open();
    store.record_charge(charge("as1", "ev-0", 5)).unwrap();
    let results = store
        .apply(&[
            Op::Open(session("a", T0)),
            Op::Charge(charge("as1", "ev-neg", -1)),
            Op::Close(close("missing", T0, EndCause::CallerBye)),
            Op::Open(session("a", T0)),
            Op::Close(close("a", T0 + 1_000, EndCause::ServerBye)),
            Op::Charge(charge("as1", "ev-1", 5)),
        ])
        .unwrap();
    assert!(matches!(results[0], Ok(Outcome::Opened)));
    assert!(matches!(
        results[1],
        Err(BillingError::NegativeAmount { minor: -1, .. })
    ));
    assert!(matches!(
        results[2],
        Err(BillingError::UnknownSession { .. })
    ));
    assert!(matches!(
        results[3],
        Err(BillingError::SessionAlreadyOpen { .. })
    ));
    assert!(matches!(results[4], Ok(Outcome::Closed(_))));
    assert!(matches!(
        results[5],
        Ok(Outcome::Charged {
            duplicate: false,
            ..
        })
    ));
    let events: Vec<String> = store
        .charge_records(Period::all())
        .unwrap()
        .into_iter()
        .map(|c| c.event_id)
        .collect();
    assert_eq!(events, ["ev-0", "ev-1"]);
    assert_eq!(store.session_records(Period::all()).unwrap().len(), 1);
    assert!(store.journal().unwrap().is_empty());
}

fn touch_all_refreshes_every_open_session_and_never_goes_back(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session("a", T0)).unwrap();
    store.open_session(session("b", T0)).unwrap();
    assert_eq!(store.touch_all_open("", T0 + 50_000).unwrap(), 2);
    assert_eq!(store.touch_all_open("", T0 + 20_000).unwrap(), 2);
    store
        .close_session(close("a", T0 + 60_000, EndCause::CallerBye))
        .unwrap();
    assert_eq!(store.touch_all_open("", T0 + 70_000).unwrap(), 1);
    let seen: Vec<(String, i64)> = store
        .journal()
        .unwrap()
        .iter()
        .map(|j| (j.session.session_id.clone(), j.last_seen_ms))
        .collect();
    assert_eq!(seen, [("b".to_string(), T0 + 70_000)]);
}

fn touch_refreshes_open_sessions_and_never_goes_back(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session("a", T0)).unwrap();
    store.open_session(session("b", T0)).unwrap();
    let touch = |ids: &[&str], at| TouchSessions {
        session_ids: ids.iter().map(|s| s.to_string()).collect(),
        seen_at_ms: at,
    };
    assert_eq!(
        store
            .touch_sessions(touch(&["a", "b", "gone", "a"], T0 + 50_000))
            .unwrap(),
        2
    );
    assert_eq!(store.touch_sessions(touch(&["a"], T0 + 20_000)).unwrap(), 1);
    let seen: Vec<i64> = store
        .journal()
        .unwrap()
        .iter()
        .map(|j| j.last_seen_ms)
        .collect();
    assert_eq!(seen, [T0 + 50_000, T0 + 50_000]);
}

fn recovery_closes_each_journaled_session_once_at_its_last_seen_time(f: &Fixture) {
    {
        let mut store = f.open();
        store.open_session(session("a", T0)).unwrap();
        store.open_session(session("b", T0 + 1_000)).unwrap();
        store.open_session(session("c", T0 + 2_000)).unwrap();
        store
            .close_session(close("c", T0 + 3_000, EndCause::CallerBye))
            .unwrap();
        store
            .touch_sessions(TouchSessions {
                session_ids: vec!["a".into()],
                seen_at_ms: T0 + 90_000,
            })
            .unwrap();
        // Dropped without closing a and b: as after a crash.
    }
    let mut store = f.open();
    let recovered = store.recover("", T0 + 600_000).unwrap();
    let summary: Vec<(&str, i64, i64, EndCause)> = recovered
        .iter()
        .map(|r| {
            (
                r.session_id.as_str(),
                r.ended_at_ms,
                r.charge.minor,
                r.cause,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a", T0 + 90_000, 14, EndCause::RecoveredAfterRestart),
            ("b", T0 + 1_000, 0, EndCause::RecoveredAfterRestart),
        ]
    );
    assert!(store.journal().unwrap().is_empty());
    assert!(
        store.recover("", T0 + 700_000).unwrap().is_empty(),
        "second run"
    );
    drop(store);
    let mut store = f.open();
    assert!(
        store.recover("", T0 + 800_000).unwrap().is_empty(),
        "after reopening"
    );
    assert_eq!(store.session_records(Period::all()).unwrap().len(), 3);
}

fn recovery_never_ends_a_session_after_now(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session("a", T0)).unwrap();
    store
        .touch_sessions(TouchSessions {
            session_ids: vec!["a".into()],
            seen_at_ms: T0 + 500_000,
        })
        .unwrap();
    let recovered = store.recover("", T0 + 100_000).unwrap();
    assert_eq!(recovered[0].ended_at_ms, T0 + 100_000);
}

fn queries_select_by_period(f: &Fixture) {
    let mut store = f.open();
    for (i, end) in [T0 + 1_000, T0 + 2_000, T0 + 3_000].into_iter().enumerate() {
        let id = format!("s{i}");
        store.open_session(session(&id, T0)).unwrap();
        store
            .close_session(close(&id, end, EndCause::CallerBye))
            .unwrap();
    }
    let ids: Vec<String> = store
        .session_records(Period::new(T0 + 2_000, T0 + 3_000).unwrap())
        .unwrap()
        .into_iter()
        .map(|r| r.session_id)
        .collect();
    assert_eq!(ids, ["s1"]);
    let mut c = charge("as1", "late", 1);
    c.charged_at_ms = T0 + 10_000;
    store.record_charge(c).unwrap();
    store.record_charge(charge("as1", "early", 1)).unwrap();
    let events: Vec<String> = store
        .charge_records(Period::new(T0 + 1, T0 + 10_001).unwrap())
        .unwrap()
        .into_iter()
        .map(|c| c.event_id)
        .collect();
    assert_eq!(events, ["late"]);
}

fn a_read_only_store_reads_but_never_writes(f: &Fixture) {
    let mut writer = f.open();
    writer.record_charge(charge("as1", "ev-1", 5)).unwrap();
    let mut reader = AnyStore::open_read_only(&f.backend).unwrap();
    assert_eq!(reader.charge_records(Period::all()).unwrap().len(), 1);
    assert!(reader.record_charge(charge("as1", "ev-2", 5)).is_err());
    assert_eq!(writer.charge_records(Period::all()).unwrap().len(), 1);
    // The reader sees what the writer commits later.
    writer.record_charge(charge("as1", "ev-3", 5)).unwrap();
    assert_eq!(reader.charge_records(Period::all()).unwrap().len(), 2);
}

/// Two stores on one database (on SQLite: one file; on PostgreSQL: what two relays
/// sharing a database are): a session is closed, and billed, by exactly one of them, and
/// a charge event is recorded once whichever store sees it first.
fn a_session_is_closed_once_by_two_stores_on_one_database(f: &Fixture) {
    let mut a = f.open();
    let mut b = f.open();
    a.open_session(session("s1", T0)).unwrap();
    let record = b
        .close_session(close("s1", T0 + 30_000, EndCause::CallerBye))
        .unwrap();
    assert_eq!(record.charge.minor, 12);
    let err = a
        .close_session(close("s1", T0 + 40_000, EndCause::ServerBye))
        .unwrap_err();
    assert!(
        matches!(err, BillingError::UnknownSession { .. }),
        "{err:?}"
    );
    let (first, dup) = a.record_charge(charge("as1", "ev-1", 7)).unwrap();
    assert!(!dup);
    let (again, dup) = b.record_charge(charge("as1", "ev-1", 7)).unwrap();
    assert!(dup);
    assert_eq!(again, first);
    assert_eq!(a.session_records(Period::all()).unwrap(), [record]);
    assert!(b.recover("", T0 + 90_000).unwrap().is_empty());
}

// ---- PostgreSQL's own machinery ----

#[test]
fn postgres_commits_with_synchronous_commit_on_at_the_current_version() {
    let f = Fixture::postgres();
    let store = PostgresStore::connect(f.url()).unwrap();
    assert_eq!(store.setting("synchronous_commit").unwrap(), "on");
    assert_eq!(store.setting("fsync").unwrap(), "on");
    assert_eq!(store.schema_version().unwrap(), PG_SCHEMA_VERSION);
    assert!(!store.target().contains("password"));
    // Connecting again migrates nothing and keeps what is there.
    let mut store = PostgresStore::connect(f.url()).unwrap();
    store.record_charge(charge("as1", "ev-1", 5)).unwrap();
    drop(store);
    let store = PostgresStore::connect(f.url()).unwrap();
    assert_eq!(store.charge_records(Period::all()).unwrap().len(), 1);
}

#[test]
fn postgres_turns_synchronous_commit_on_when_the_server_has_it_off() {
    let f = Fixture::postgres();
    let admin = PostgresStore::connect(f.url()).unwrap();
    let db = f.url().rsplit('/').next().unwrap().to_owned();
    admin
        .execute_batch(&format!("ALTER DATABASE {db} SET synchronous_commit = off"))
        .unwrap();
    let store = PostgresStore::connect(f.url()).unwrap();
    assert_eq!(store.setting("synchronous_commit").unwrap(), "on");
}

#[test]
fn postgres_refuses_a_newer_schema_and_leaves_it_unchanged() {
    let f = Fixture::postgres();
    let mut store = PostgresStore::connect(f.url()).unwrap();
    store.record_charge(charge("as1", "ev-1", 5)).unwrap();
    store
        .execute_batch("UPDATE billing.meta SET value = '99' WHERE key = 'schema_version'")
        .unwrap();
    let err = PostgresStore::connect(f.url()).unwrap_err();
    assert!(
        matches!(
            err,
            BillingError::NewerSchema {
                found: 99,
                supported: PG_SCHEMA_VERSION,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("schema version 99 is newer"),
        "{err}"
    );
    assert!(
        err.to_string().contains("postgres://billing@127.0.0.1:"),
        "{err}"
    );
    assert!(matches!(
        PostgresStore::connect_read_only(f.url()).unwrap_err(),
        BillingError::NewerSchema { .. }
    ));
    assert_eq!(store.charge_records(Period::all()).unwrap().len(), 1);
}

#[test]
fn postgres_refuses_a_billing_schema_that_is_not_the_stores() {
    let f = Fixture::postgres();
    let mut raw = postgres::Client::connect(f.url(), postgres::NoTls).unwrap();
    raw.batch_execute("CREATE SCHEMA billing; CREATE TABLE billing.users (name TEXT);")
        .unwrap();
    let err = PostgresStore::connect(f.url()).unwrap_err();
    assert!(matches!(err, BillingError::Corrupt { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("tables (users) but no billing meta table"),
        "{err}"
    );
    raw.batch_execute(
        "CREATE TABLE billing.meta (key TEXT, value TEXT); \
         INSERT INTO billing.meta VALUES ('application', 'cms');",
    )
    .unwrap();
    let err = PostgresStore::connect(f.url()).unwrap_err();
    assert!(err.to_string().contains("belongs to \"cms\""), "{err}");
    // Other schemas of the database (the relay's other shared state) are no concern.
    let g = Fixture::postgres();
    let mut raw = postgres::Client::connect(g.url(), postgres::NoTls).unwrap();
    raw.batch_execute("CREATE TABLE public.registrations (aor TEXT);")
        .unwrap();
    PostgresStore::connect(g.url()).unwrap();
}

#[test]
fn postgres_relays_started_together_migrate_once() {
    let f = Fixture::postgres();
    let url = f.url().to_owned();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PostgresStore::connect(&url).map(|s| s.schema_version()))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap().unwrap(), PG_SCHEMA_VERSION);
    }
}

/// A statement that fails inside a batch aborts PostgreSQL's transaction: the store rolls
/// back and runs the batch again without that op, which alone is refused, leaving no
/// trace — also a close whose record was written before the journal row's removal failed.
#[test]
fn postgres_a_failing_statement_refuses_only_its_op() {
    let f = Fixture::postgres();
    let mut store = PostgresStore::connect(f.url()).unwrap();
    store
        .execute_batch(
            "CREATE FUNCTION billing.keep_b() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF OLD.session_id = 'b' THEN RAISE EXCEPTION 'injected'; END IF; \
             RETURN OLD; END $$; \
             CREATE TRIGGER keep_b BEFORE DELETE ON billing.open_sessions \
             FOR EACH ROW EXECUTE FUNCTION billing.keep_b();",
        )
        .unwrap();
    let results = store
        .apply(&[
            Op::Open(session("a", T0)),
            Op::Open(session("b", T0)),
            Op::Close(close("b", T0 + 1_000, EndCause::CallerBye)),
            Op::Close(close("a", T0 + 2_000, EndCause::CallerBye)),
            Op::Charge(charge("as1", "ev-1", 5)),
            Op::Close(close("missing", T0, EndCause::CallerBye)),
        ])
        .unwrap();
    assert!(
        matches!(&results[2], Err(e @ BillingError::Postgres { .. }) if format!("{e:?}").contains("injected")),
        "{:?}",
        results[2]
    );
    assert!(matches!(
        results[5],
        Err(BillingError::UnknownSession { .. })
    ));
    assert!(results
        .iter()
        .take(5)
        .enumerate()
        .all(|(i, r)| i == 2 || r.is_ok()));
    let records = store.session_records(Period::all()).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].session_id, "a");
    let journal = store.journal().unwrap();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].session, session("b", T0));
    assert_eq!(store.charge_records(Period::all()).unwrap().len(), 1);
    // Recovery with b still stuck: refused whole, the journal keeps b.
    let err = store.recover("", T0 + 5_000).unwrap_err();
    assert!(format!("{err:?}").contains("injected"), "{err:?}");
    assert_eq!(store.journal().unwrap().len(), 1);
    store
        .execute_batch("DROP TRIGGER keep_b ON billing.open_sessions")
        .unwrap();
    let recovered = store.recover("", T0 + 5_000).unwrap();
    assert_eq!(recovered.len(), 1);
    assert!(matches!(
        store.apply(&[Op::Recover {
            node: String::new(),
            now_ms: T0 + 6_000
        }]).unwrap()[0],
        Ok(Outcome::Recovered(ref r)) if r.is_empty()
    ));
}

#[test]
fn postgres_a_lost_connection_fails_the_batch_and_the_next_one_reconnects() {
    let f = Fixture::postgres();
    let mut store = PostgresStore::connect(f.url()).unwrap();
    store.open_session(session("a", T0)).unwrap();
    let mut admin = postgres::Client::connect(f.url(), postgres::NoTls).unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'service-relay-billing' \
             AND datname = current_database()",
            &[],
        )
        .unwrap();
    let err = store
        .close_session(close("a", T0 + 1_000, EndCause::CallerBye))
        .unwrap_err();
    assert!(matches!(err, BillingError::CommitFailed { .. }), "{err:?}");
    let record = store
        .close_session(close("a", T0 + 1_000, EndCause::CallerBye))
        .unwrap();
    assert_eq!(record.session_id, "a");
    assert!(store.journal().unwrap().is_empty());
}

// ---- several relays on one database: nodes and leases ----

fn touch_all_renews_only_its_own_nodes_lease(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session_on("relay-a", "a1", T0)).unwrap();
    store.open_session(session_on("relay-a", "a2", T0)).unwrap();
    store.open_session(session_on("relay-b", "b1", T0)).unwrap();
    store.open_session(session_on("", "lone", T0)).unwrap();
    assert_eq!(store.touch_all_open("relay-a", T0 + 5_000).unwrap(), 2);
    assert_eq!(store.touch_all_open("relay-c", T0 + 6_000).unwrap(), 0);
    let mut journal = journal_of(&store);
    journal.sort();
    assert_eq!(
        journal,
        [
            ("".into(), "lone".into(), T0),
            ("relay-a".into(), "a1".into(), T0 + 5_000),
            ("relay-a".into(), "a2".into(), T0 + 5_000),
            ("relay-b".into(), "b1".into(), T0),
        ]
    );
}

fn recovery_closes_only_its_own_nodes_sessions(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session_on("relay-a", "a1", T0)).unwrap();
    store.open_session(session_on("relay-b", "b1", T0)).unwrap();
    store.touch_all_open("relay-a", T0 + 61_000).unwrap();
    store.touch_all_open("relay-b", T0 + 61_000).unwrap();
    drop(store);
    // relay-a restarts: its session is recovered; relay-b's, alive elsewhere, stays.
    let mut store = f.open();
    let recovered = store.recover("relay-a", T0 + 100_000).unwrap();
    let summary: Vec<(&str, i64, i64, EndCause)> = recovered
        .iter()
        .map(|r| {
            (
                r.session_id.as_str(),
                r.ended_at_ms,
                r.charge.minor,
                r.cause,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("a1", T0 + 61_000, 14, EndCause::RecoveredAfterRestart)]
    );
    assert_eq!(
        journal_of(&store),
        [("relay-b".into(), "b1".into(), T0 + 61_000)]
    );
    assert!(store.recover("relay-a", T0 + 200_000).unwrap().is_empty());
    assert_eq!(store.session_records(Period::all()).unwrap(), recovered);
}

fn claim_lost_closes_only_expired_sessions_of_other_nodes_at_their_last_seen_time(f: &Fixture) {
    const LEASE: i64 = 30_000;
    let now = T0 + 600_000;
    let mut store = f.open();
    // relay-a died: last renewed long ago.
    store.open_session(session_on("relay-a", "a1", T0)).unwrap();
    store
        .open_session(session_on("relay-a", "a2", T0 + 1_000))
        .unwrap();
    store.touch_all_open("relay-a", T0 + 90_000).unwrap();
    // relay-b is alive: renewed exactly a lease ago (not yet expired) and just now.
    store.open_session(session_on("relay-b", "b1", T0)).unwrap();
    store.touch_all_open("relay-b", now - LEASE).unwrap();
    store.open_session(session_on("relay-c", "c1", T0)).unwrap();
    store.touch_all_open("relay-c", now).unwrap();
    // The claimer's own session, however old, is not claimed (its recovery's business).
    store.open_session(session_on("relay-z", "z1", T0)).unwrap();
    // A lone relay's session left in the shared database is another node's.
    store
        .open_session(session_on("", "lone", T0 + 2_000))
        .unwrap();

    let claimed = store.claim_lost("relay-z", LEASE, now).unwrap();
    let summary: Vec<(&str, i64, i64, i64, EndCause)> = claimed
        .iter()
        .map(|r| {
            (
                r.session_id.as_str(),
                r.ended_at_ms,
                r.duration_ms,
                r.charge.minor,
                r.cause,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a1", T0 + 90_000, 90_000, 14, EndCause::RelayLost),
            ("a2", T0 + 90_000, 89_000, 14, EndCause::RelayLost),
            ("lone", T0 + 2_000, 0, 0, EndCause::RelayLost),
        ]
    );
    let mut journal = journal_of(&store);
    journal.sort();
    assert_eq!(
        journal,
        [
            ("relay-b".into(), "b1".into(), now - LEASE),
            ("relay-c".into(), "c1".into(), now),
            ("relay-z".into(), "z1".into(), T0),
        ]
    );
    let mut stored = store.session_records(Period::all()).unwrap();
    stored.sort_by(|x, y| x.session_id.cmp(&y.session_id));
    assert_eq!(stored, claimed);
    // A millisecond later b1's lease has expired too; nothing else is claimed twice.
    let claimed = store.claim_lost("relay-z", LEASE, now + 1).unwrap();
    let ids: Vec<&str> = claimed.iter().map(|r| r.session_id.as_str()).collect();
    assert_eq!(ids, ["b1"]);
    assert_eq!(claimed[0].ended_at_ms, now - LEASE);
    assert_eq!(store.session_records(Period::all()).unwrap().len(), 4);
}

/// The dead relay comes back (or was only cut off): its recovery, touches and closes
/// find nothing of a session another relay has billed as lost.
fn a_session_claimed_as_lost_is_never_billed_again_by_its_node(f: &Fixture) {
    let mut a = f.open();
    a.open_session(session_on("relay-a", "s1", T0)).unwrap();
    a.open_session(session_on("relay-a", "s2", T0)).unwrap();
    a.touch_all_open("relay-a", T0 + 30_000).unwrap();
    drop(a);
    let mut b = f.open();
    let claimed = b.claim_lost("relay-b", 10_000, T0 + 60_000).unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|r| r.cause == EndCause::RelayLost
        && r.ended_at_ms == T0 + 30_000
        && r.charge.minor == 12));

    let mut a = f.open();
    assert!(a.recover("relay-a", T0 + 70_000).unwrap().is_empty());
    assert_eq!(a.touch_all_open("relay-a", T0 + 70_000).unwrap(), 0);
    let err = a
        .close_session(close("s1", T0 + 80_000, EndCause::CallerBye))
        .unwrap_err();
    assert!(
        matches!(err, BillingError::UnknownSession { .. }),
        "{err:?}"
    );
    assert!(b
        .claim_lost("relay-b", 10_000, T0 + 90_000)
        .unwrap()
        .is_empty());
    let mut records = a.session_records(Period::all()).unwrap();
    records.sort_by(|x, y| x.session_id.cmp(&y.session_id));
    assert_eq!(records, claimed);
}

/// Two (then four) relays claim the same dead relay's sessions at the same moment, each
/// on its own connection and thread: every session is billed by exactly one of them.
fn relays_claiming_at_the_same_moment_bill_each_lost_session_once(f: &Fixture) {
    const SESSIONS: usize = 300;
    let mut dead = f.open();
    let batch: Vec<Op> = (0..SESSIONS)
        .map(|i| Op::Open(session_on("dead", &format!("s{i:03}"), T0)))
        .collect();
    for result in dead.apply(&batch).unwrap() {
        result.unwrap();
    }
    drop(dead);
    for claimers in [2, 4] {
        let barrier = Arc::new(std::sync::Barrier::new(claimers));
        let threads: Vec<_> = (0..claimers)
            .map(|c| {
                let mut store = f.open();
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut mine = Vec::new();
                    // Several rounds, so that claims overlap whoever starts first.
                    for round in 0..5 {
                        mine.extend(
                            store
                                .claim_lost(&format!("live-{c}"), 1_000, T0 + 10_000 + round)
                                .unwrap(),
                        );
                    }
                    mine
                })
            })
            .collect();
        let mut claimed: Vec<String> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .map(|r| {
                assert_eq!(r.cause, EndCause::RelayLost);
                r.session_id
            })
            .collect();
        claimed.sort();
        if claimers == 2 {
            let expected: Vec<String> = (0..SESSIONS).map(|i| format!("s{i:03}")).collect();
            assert_eq!(claimed, expected, "each session claimed once");
            // The same again for the second round, with sessions of its own.
            let mut dead = f.open();
            let batch: Vec<Op> = (0..SESSIONS)
                .map(|i| Op::Open(session_on("dead", &format!("t{i:03}"), T0)))
                .collect();
            for result in dead.apply(&batch).unwrap() {
                result.unwrap();
            }
        } else {
            let expected: Vec<String> = (0..SESSIONS).map(|i| format!("t{i:03}")).collect();
            assert_eq!(claimed, expected, "each session claimed once");
        }
    }
    let store = f.open();
    let mut stored: Vec<String> = store
        .session_records(Period::all())
        .unwrap()
        .into_iter()
        .map(|r| r.session_id)
        .collect();
    stored.sort();
    assert_eq!(stored.len(), 2 * SESSIONS);
    stored.dedup();
    assert_eq!(stored.len(), 2 * SESSIONS, "no session has two records");
    assert!(store.journal().unwrap().is_empty());
}

fn claim_lost_refuses_a_lease_that_is_not_one(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session_on("relay-a", "a1", T0)).unwrap();
    for lease in [0, -1] {
        let err = store.claim_lost("relay-b", lease, T0 + 10_000).unwrap_err();
        assert!(err.to_string().contains("not a lease"), "{err}");
    }
    let err = store
        .claim_lost("relay\nb", 1_000, T0 + 10_000)
        .unwrap_err();
    assert!(err.to_string().contains("invalid node"), "{err}");
    assert_eq!(journal_of(&store).len(), 1);
}

// ---- ended sessions found by a key (a charge arriving after the BYE) ----

/// The ended session of `session(id, …)` (server `as-{id}`, account `acme`).
fn ended(id: &str, ended_at_ms: i64) -> EndedSession {
    EndedSession {
        session_id: id.into(),
        call_id: format!("call-{id}"),
        server_call_id: format!("as-{id}"),
        subscriber: "alice".into(),
        service: "video".into(),
        server: "as1".into(),
        account: Some("acme".into()),
        ended_at_ms,
    }
}

fn find_ended_finds_a_closed_session_by_each_of_its_keys(f: &Fixture) {
    let mut store = f.open();
    let open = OpenSession {
        server_call_id: "srv-1".into(),
        ..session("s1", T0)
    };
    store.open_session(open).unwrap();
    let end = T0 + 30_000;
    store
        .close_session(close("s1", end, EndCause::CallerBye))
        .unwrap();
    let expected = EndedSession {
        server_call_id: "srv-1".into(),
        ..ended("s1", end)
    };
    for key in ["s1", "call-s1", "srv-1"] {
        assert_eq!(
            store.find_ended(key, end - 600_000).unwrap().as_ref(),
            Some(&expected),
            "{key}"
        );
        // Ended exactly at the bound: found; the bound after its end: not.
        assert!(store.find_ended(key, end).unwrap().is_some(), "{key}");
        assert_eq!(store.find_ended(key, end + 1).unwrap(), None, "{key}");
    }
    assert_eq!(store.find_ended("", i64::MIN).unwrap(), None);
    assert_eq!(store.find_ended("srv-2", i64::MIN).unwrap(), None);
    // A key that matches a prefix or another case is not a match.
    assert_eq!(store.find_ended("srv", i64::MIN).unwrap(), None);
    assert_eq!(store.find_ended("SRV-1", i64::MIN).unwrap(), None);
    // A static server with no account.
    let open = OpenSession {
        account: None,
        ..session("s2", T0)
    };
    store.open_session(open).unwrap();
    store
        .close_session(close("s2", end, EndCause::ServerBye))
        .unwrap();
    let found = store.find_ended("as-s2", 0).unwrap().unwrap();
    assert_eq!(found.account, None);
    // An account that is given must not be empty.
    let err = store
        .open_session(OpenSession {
            account: Some(String::new()),
            ..session("s3", T0)
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "invalid account: empty");
}

fn find_ended_returns_the_segment_that_ended_last(f: &Fixture) {
    let mut store = f.open();
    // Three billing segments of one call share its terminal Call-ID; the one that ended
    // last is closed first, so it has the lowest record id.
    for (id, srv) in [("seg-1", "srv-a"), ("seg-2", "srv-b"), ("seg-3", "srv-c")] {
        store
            .open_session(OpenSession {
                call_id: "call-x".into(),
                server_call_id: srv.into(),
                ..session(id, T0)
            })
            .unwrap();
    }
    store
        .close_session(close("seg-2", T0 + 20_000, EndCause::Changed))
        .unwrap();
    store
        .close_session(close("seg-1", T0 + 10_000, EndCause::Changed))
        .unwrap();
    let found = store.find_ended("call-x", 0).unwrap().unwrap();
    assert_eq!(
        (found.session_id.as_str(), found.ended_at_ms),
        ("seg-2", T0 + 20_000)
    );
    assert_eq!(found.server_call_id, "srv-b");
    // Nothing of the call ended after seg-2.
    let found = store.find_ended("call-x", T0 + 20_001).unwrap();
    assert_eq!(found, None);
    // Each segment is still found by its own server Call-ID and session id.
    assert_eq!(
        store.find_ended("srv-a", 0).unwrap().unwrap().session_id,
        "seg-1"
    );
    assert_eq!(
        store.find_ended("seg-1", 0).unwrap().unwrap().session_id,
        "seg-1"
    );
    // Ended at the same moment: the later record.
    store
        .close_session(close("seg-3", T0 + 20_000, EndCause::CallerBye))
        .unwrap();
    let found = store.find_ended("call-x", 0).unwrap().unwrap();
    assert_eq!(found.session_id, "seg-3");
}

fn find_ended_never_finds_an_open_session_or_an_empty_key(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session("live", T0)).unwrap();
    for key in ["live", "call-live", "as-live"] {
        assert_eq!(store.find_ended(key, i64::MIN).unwrap(), None, "{key}");
    }
    // A session without a server Call-ID (as journaled before it was kept): the empty key
    // never finds it.
    store
        .open_session(OpenSession {
            server_call_id: String::new(),
            ..session("old", T0)
        })
        .unwrap();
    store
        .close_session(close("old", T0 + 1_000, EndCause::CallerBye))
        .unwrap();
    assert_eq!(store.find_ended("", i64::MIN).unwrap(), None);
    let found = store.find_ended("call-old", i64::MIN).unwrap().unwrap();
    assert_eq!(found.server_call_id, "");
    // A key no stored Call-ID can be is refused, like any oversized or control-character
    // field.
    let err = store.find_ended("a\r\nb", 0).unwrap_err();
    assert!(
        matches!(err, BillingError::InvalidInput { field: "key", .. }),
        "{err:?}"
    );
}

fn recovered_and_claimed_sessions_keep_their_server_call_id_and_account(f: &Fixture) {
    let mut store = f.open();
    store.open_session(session_on("relay-a", "a1", T0)).unwrap();
    store.open_session(session_on("relay-b", "b1", T0)).unwrap();
    store
        .open_session(OpenSession {
            account: None,
            ..session_on("relay-b", "b2", T0)
        })
        .unwrap();
    // The journal returns them as opened.
    let journal = store.journal().unwrap();
    assert_eq!(journal[0].session, session_on("relay-a", "a1", T0));
    assert_eq!(journal[2].session.account, None);

    let recovered = store.recover("relay-a", T0 + 5_000).unwrap();
    assert_eq!(recovered.len(), 1);
    // Ended at its last-seen time, as recovery does.
    assert_eq!(store.find_ended("as-a1", 0).unwrap(), Some(ended("a1", T0)));
    let claimed = store.claim_lost("relay-a", 1_000, T0 + 60_000).unwrap();
    assert_eq!(claimed.len(), 2);
    assert_eq!(store.find_ended("as-b1", 0).unwrap(), Some(ended("b1", T0)));
    assert_eq!(
        store.find_ended("call-b2", 0).unwrap(),
        Some(EndedSession {
            account: None,
            ..ended("b2", T0)
        })
    );
}

fn find_ended_in_a_batch_sees_the_ops_before_it_and_fails_alone(f: &Fixture) {
    let mut store = f.open();
    let find = |key: &str| Op::FindEnded {
        key: key.into(),
        ended_since_ms: 0,
    };
    let results = store
        .apply(&[
            Op::Open(session("a", T0)),
            find("a"),
            Op::Close(close("a", T0 + 1_000, EndCause::CallerBye)),
            find("as-a"),
            Op::Close(close("missing", T0, EndCause::CallerBye)),
            find("a\u{7}"),
            find(""),
            Op::Charge(charge("as1", "ev-1", 5)),
        ])
        .unwrap();
    assert!(matches!(results[0], Ok(Outcome::Opened)));
    assert!(matches!(results[1], Ok(Outcome::FoundEnded(None))));
    assert!(matches!(results[2], Ok(Outcome::Closed(_))));
    assert!(
        matches!(&results[3], Ok(Outcome::FoundEnded(Some(s))) if *s == ended("a", T0 + 1_000)),
        "{:?}",
        results[3]
    );
    assert!(matches!(
        results[4],
        Err(BillingError::UnknownSession { .. })
    ));
    assert!(matches!(
        results[5],
        Err(BillingError::InvalidInput { field: "key", .. })
    ));
    assert!(matches!(results[6], Ok(Outcome::FoundEnded(None))));
    assert!(matches!(results[7], Ok(Outcome::Charged { .. })));
    // The writes of the batch committed, and the finds wrote nothing.
    assert_eq!(store.session_records(Period::all()).unwrap().len(), 1);
    assert_eq!(store.charge_records(Period::all()).unwrap().len(), 1);
    assert!(store.journal().unwrap().is_empty());
    assert_eq!(
        store
            .apply_one(find("a"))
            .unwrap()
            .into_found_ended()
            .unwrap(),
        Some(ended("a", T0 + 1_000))
    );
    assert!(matches!(
        Outcome::Opened.into_found_ended(),
        Err(BillingError::UnexpectedOutcome {
            expected: "find-ended"
        })
    ));
}

fn find_ended_through_the_writer_sees_every_close_submitted_before(f: &Fixture) {
    let writer = Writer::spawn(f.open()).unwrap();
    let billing = writer.handle();
    let mut pending = Vec::new();
    let mut finds = Vec::new();
    for i in 0..20 {
        let id = format!("s{i}");
        // Neither waited on before the lookup is submitted.
        pending.push(billing.open_session(session(&id, T0)));
        let close = billing.close_session(close(&id, T0 + 1_000 * i, EndCause::CallerBye));
        finds.push((i, billing.find_ended(&format!("as-{id}"), T0)));
        close.wait().unwrap();
    }
    for p in pending {
        p.wait().unwrap();
    }
    for (i, find) in finds {
        let id = format!("s{i}");
        assert_eq!(
            find.wait().unwrap(),
            Some(ended(&id, T0 + 1_000 * i)),
            "{id}"
        );
    }
    assert_eq!(billing.find_ended("s3", T0 + 3_001).wait().unwrap(), None);
    assert!(billing.find_ended("x\0", 0).wait().is_err());
    assert_eq!(billing.stats().failed_batches, 0);
    writer.shutdown().unwrap();
}
