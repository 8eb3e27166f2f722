//! The writer from async code, as relayd uses it: awaiting a commit must leave the
//! runtime's thread free, and each task is answered only after its commit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::time::Duration;

use billing::money::Currency;
use billing::record::{ChargeRecord, EndCause, SessionRecord};
use billing::sqlite::SqliteStore;
use billing::store::{CloseSession, JournaledSession, Op, OpenSession, Outcome, Period, Store};
use billing::tariff::{Tariff, TariffSpec};
use billing::writer::Writer;
use billing::BillingError;

/// A SQLite store whose every batch waits for a token from the test.
struct GatedStore {
    inner: SqliteStore,
    gate: mpsc::Receiver<()>,
}

impl Store for GatedStore {
    fn apply(&mut self, ops: &[Op]) -> Result<Vec<Result<Outcome, BillingError>>, BillingError> {
        // Bounded, so a runtime that is wrongly blocked fails the test instead of hanging it.
        match self.gate.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => self.inner.apply(ops),
            Err(_) => Err(BillingError::CommitFailed {
                detail: "the gate was never opened: the runtime thread was blocked".into(),
            }),
        }
    }

    fn journal(&self) -> Result<Vec<JournaledSession>, BillingError> {
        self.inner.journal()
    }

    fn scan_sessions(
        &self,
        period: Period,
        visit: &mut dyn FnMut(SessionRecord) -> Result<(), BillingError>,
    ) -> Result<(), BillingError> {
        self.inner.scan_sessions(period, visit)
    }

    fn scan_charges(
        &self,
        period: Period,
        visit: &mut dyn FnMut(ChargeRecord) -> Result<(), BillingError>,
    ) -> Result<(), BillingError> {
        self.inner.scan_charges(period, visit)
    }
}

fn tariff() -> Tariff {
    Tariff::new(TariffSpec {
        name: "t".into(),
        service: None,
        plan: None,
        currency: Currency::new("EUR").unwrap(),
        setup: 1,
        rate: 60,
        period_seconds: 60,
        increment: "1/1".parse().unwrap(),
        free_seconds: 0,
    })
    .unwrap()
}

#[test]
fn awaiting_a_commit_leaves_a_single_threaded_runtime_free() {
    const TASKS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("billing.db");
    let (gate, gate_rx) = mpsc::channel();
    let writer = Writer::spawn(GatedStore {
        inner: SqliteStore::open(&path).unwrap(),
        gate: gate_rx,
    })
    .unwrap();
    let handle = writer.handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let records = rt.block_on(async move {
        let tasks: Vec<_> = (0..TASKS)
            .map(|i| {
                let h = handle.clone();
                tokio::spawn(async move {
                    let sid = format!("s{i}");
                    h.open_session(OpenSession {
                        node: String::new(),
                        session_id: sid.clone(),
                        call_id: format!("c{i}"),
                        server_call_id: String::new(),
                        subscriber: "alice".into(),
                        service: "video".into(),
                        server: "as1".into(),
                        account: None,
                        plan: "basic".into(),
                        tariff: tariff(),
                        confirmed_at_ms: 1_000_000,
                    })
                    .await?;
                    h.close_session(CloseSession {
                        session_id: sid,
                        ended_at_ms: 1_000_000 + 1_000 * i as i64,
                        cause: EndCause::ServerBye,
                    })
                    .await
                })
            })
            .collect();
        // Every task runs up to its first await; this thread is still ours.
        for _ in 0..TASKS {
            tokio::task::yield_now().await;
        }
        let unanswered = tasks.iter().filter(|t| !t.is_finished()).count();
        assert_eq!(
            unanswered, TASKS,
            "no task may be answered before its commit"
        );
        // Each batch takes one token; there are at most two batches per task.
        for _ in 0..2 * TASKS {
            gate.send(()).unwrap();
        }
        let mut records = Vec::new();
        for t in tasks {
            records.push(t.await.unwrap().unwrap());
        }
        records
    });
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.session_id, format!("s{i}"));
        let secs = i as i64;
        assert_eq!(r.charge.minor, if secs == 0 { 0 } else { 1 + secs });
    }
    writer.shutdown().unwrap();
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.session_records(Period::all()).unwrap().len(), TASKS);
    assert!(store.journal().unwrap().is_empty());
}

#[test]
fn a_multi_threaded_runtime_gets_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("billing.db");
    let writer = Writer::spawn(SqliteStore::open(&path).unwrap()).unwrap();
    let handle = writer.handle();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let ids = rt.block_on(async move {
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let h = handle.clone();
                tokio::spawn(async move {
                    let sid = format!("m{i}");
                    h.open_session(OpenSession {
                        node: String::new(),
                        session_id: sid.clone(),
                        call_id: format!("c{i}"),
                        server_call_id: String::new(),
                        subscriber: "bob".into(),
                        service: "chat".into(),
                        server: "as2".into(),
                        account: None,
                        plan: "basic".into(),
                        tariff: tariff(),
                        confirmed_at_ms: 5_000,
                    })
                    .await
                    .unwrap();
                    h.close_session(CloseSession {
                        session_id: sid,
                        ended_at_ms: 65_000,
                        cause: EndCause::CallerBye,
                    })
                    .await
                    .unwrap()
                    .record_id
                })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        ids
    });
    writer.shutdown().unwrap();
    let mut stored: Vec<i64> = SqliteStore::open(&path)
        .unwrap()
        .session_records(Period::all())
        .unwrap()
        .iter()
        .map(|r| r.record_id)
        .collect();
    let mut ids = ids;
    ids.sort_unstable();
    stored.sort_unstable();
    assert_eq!(ids, stored);
    assert_eq!(ids.len(), 200);
}
