//! Billing records per second into PostgreSQL with `synchronous_commit = on`, through the
//! group-commit writer, as relayd drives it: many callers each waiting for their own
//! commit. Ignored in normal runs (it measures, it asserts nothing); run it with
//!
//! ```text
//! cargo test --release -p billing --test postgres_bench -- --ignored --nocapture
//! ```
//!
//! (`BENCH_SESSIONS` and `BENCH_CALLERS` change the size.) It starts its own server like
//! the store tests (Debian's package `postgresql`), with `fsync` on, on this machine's
//! disk. Each session is journaled (open), closed (a session record) and charged once (a
//! charge record): two records and three requests per session.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/pg_server.rs"]
mod pg_server;

use std::time::Instant;

use billing::money::{Currency, Money};
use billing::postgresql::PostgresStore;
use billing::record::EndCause;
use billing::store::{ChargeAmount, CloseSession, NewCharge, OpenSession, Period, Store};
use billing::tariff::{Tariff, TariffSpec};
use billing::writer::Writer;

const T0: i64 = 1_700_000_000_000;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn postgres_billing_records_per_second() {
    let sessions = env_or("BENCH_SESSIONS", 20_000);
    let callers = env_or("BENCH_CALLERS", 128).max(1);
    let server = pg_server::shared();
    let url = server.fresh_database();
    let store = PostgresStore::connect(&url).unwrap();
    assert_eq!(store.setting("synchronous_commit").unwrap(), "on");
    assert_eq!(store.setting("fsync").unwrap(), "on");
    let writer = Writer::spawn(store).unwrap();
    let tariff = Tariff::new(TariffSpec {
        name: "bench".into(),
        service: None,
        plan: None,
        currency: Currency::new("EUR").unwrap(),
        setup: 10,
        rate: 2,
        period_seconds: 60,
        increment: "60/60".parse().unwrap(),
        free_seconds: 0,
    })
    .unwrap();
    let started = Instant::now();
    let threads: Vec<_> = (0..callers)
        .map(|c| {
            let handle = writer.handle();
            let tariff = tariff.clone();
            std::thread::spawn(move || {
                let eur = Currency::new("EUR").unwrap();
                for i in (c..sessions).step_by(callers) {
                    let sid = format!("s{i}");
                    handle
                        .open_session(OpenSession {
                            node: String::new(),
                            session_id: sid.clone(),
                            call_id: format!("call-{i}"),
                            server_call_id: String::new(),
                            subscriber: format!("sub-{}", i % 100),
                            service: "video".into(),
                            server: "as1".into(),
                            account: None,
                            plan: "gold".into(),
                            tariff: tariff.clone(),
                            confirmed_at_ms: T0,
                        })
                        .wait()
                        .unwrap();
                    handle
                        .close_session(CloseSession {
                            session_id: sid.clone(),
                            ended_at_ms: T0 + 61_000,
                            cause: EndCause::CallerBye,
                        })
                        .wait()
                        .unwrap();
                    handle
                        .record_charge(NewCharge {
                            session_id: Some(sid),
                            server: "as1".into(),
                            subscriber: format!("sub-{}", i % 100),
                            service: Some("video".into()),
                            event_id: format!("e{i}"),
                            amount: ChargeAmount::Total(Money::new(5, eur)),
                            description: "bench".into(),
                            charged_at_ms: T0,
                        })
                        .wait()
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed();
    let stats = writer.handle().stats();
    writer.shutdown().unwrap();
    let records = 2 * sessions;
    let store = PostgresStore::connect(&url).unwrap();
    assert_eq!(
        store.session_records(Period::all()).unwrap().len(),
        sessions
    );
    println!(
        "postgres billing (synchronous_commit=on, fsync=on): {sessions} sessions, {callers} callers: \
         {records} records in {:.2} s = {:.0} records/s ({:.0} requests/s); {} commits, \
         {:.1} requests per commit",
        elapsed.as_secs_f64(),
        records as f64 / elapsed.as_secs_f64(),
        (3 * sessions) as f64 / elapsed.as_secs_f64(),
        stats.batches,
        stats.ops as f64 / stats.batches.max(1) as f64,
    );
}
