//! Throughput of the group-commit writer on this machine, with SQLite in WAL mode and
//! `synchronous=FULL`: many concurrent tokio tasks each await their own commit, as the
//! relay's sessions do.
//!
//! ```text
//! cargo run --release -p billing --example billing_bench -- [--sessions N] [--callers C] [--dir DIR]
//! ```
//!
//! Three phases, each timed on its own: journal N sessions (open), close them (one
//! session record each), record N application charges. The database goes into a fresh
//! temporary directory (under `--dir` if given), removed at the end.

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use billing::money::{Currency, Money};
use billing::record::EndCause;
use billing::sqlite::SqliteStore;
use billing::store::{ChargeAmount, CloseSession, NewCharge, OpenSession};
use billing::tariff::{Tariff, TariffSpec};
use billing::writer::{Writer, WriterHandle, WriterStats};
use billing::BillingError;

const T0: i64 = 1_700_000_000_000;

struct Args {
    sessions: usize,
    callers: usize,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut args = Args {
        sessions: 100_000,
        callers: 256,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--sessions" => args.sessions = value()?.parse()?,
            "--callers" => args.callers = value()?.parse()?,
            "--dir" => args.dir = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("usage: billing_bench [--sessions N] [--callers C] [--dir DIR]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    if args.sessions == 0 || args.callers == 0 {
        return Err("--sessions and --callers must be at least 1".into());
    }
    Ok(args)
}

/// Runs `work(handle, i)` for every i in 0..n on a tokio runtime, from `callers`
/// concurrent tasks, each awaiting its own request's commit before sending the next.
fn phase<F, Fut>(
    rt: &tokio::runtime::Runtime,
    handle: &WriterHandle,
    n: usize,
    callers: usize,
    work: F,
) -> Result<(Duration, WriterStats), Box<dyn Error>>
where
    F: Fn(WriterHandle, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), BillingError>> + Send + 'static,
{
    let before = handle.stats();
    let work = Arc::new(work);
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let handle = handle.clone();
                let work = Arc::clone(&work);
                tokio::spawn(async move {
                    for i in (c..n).step_by(callers) {
                        work(handle.clone(), i).await?;
                    }
                    Ok::<(), BillingError>(())
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        Ok::<(), Box<dyn Error>>(())
    })?;
    let elapsed = start.elapsed();
    let after = handle.stats();
    let delta = WriterStats {
        batches: after.batches - before.batches,
        ops: after.ops - before.ops,
        largest_batch: after.largest_batch,
        failed_batches: after.failed_batches - before.failed_batches,
    };
    Ok((elapsed, delta))
}

fn report(name: &str, unit: &str, n: usize, elapsed: Duration, stats: WriterStats) {
    let per_sec = n as f64 / elapsed.as_secs_f64();
    let avg_batch = stats.ops as f64 / stats.batches.max(1) as f64;
    println!(
        "{name:<16} {n:>8} {unit:<8} {:>8.3} s {per_sec:>10.0} {unit}/s   {} commits, avg batch {avg_batch:.1}",
        elapsed.as_secs_f64(),
        stats.batches,
    );
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let dir = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let path = dir.path().join("bench.db");
    let tariff = Tariff::new(TariffSpec {
        name: "bench".into(),
        service: None,
        plan: None,
        currency: Currency::new("EUR")?,
        setup: 5,
        rate: 2,
        period_seconds: 60,
        increment: "30/6".parse()?,
        free_seconds: 3,
    })?;
    let writer = Writer::spawn(SqliteStore::open(&path)?)?;
    let handle = writer.handle();
    println!(
        "billing writer: SQLite WAL, synchronous=FULL, {} concurrent callers, database {}",
        args.callers,
        path.display()
    );

    let rt = tokio::runtime::Builder::new_multi_thread().build()?;
    let (open_time, stats) = phase(&rt, &handle, args.sessions, args.callers, move |h, i| {
        h.open_session(OpenSession {
            node: String::new(),
            session_id: format!("s{i}"),
            call_id: format!("{i}@bench"),
            server_call_id: String::new(),
            subscriber: format!("sub{}", i % 1000),
            service: "video".into(),
            server: format!("as{}", i % 8),
            account: None,
            plan: "basic".into(),
            tariff: tariff.clone(),
            confirmed_at_ms: T0 + i as i64,
        })
    })?;
    report("journal (open)", "ops", args.sessions, open_time, stats);

    let (close_time, stats) = phase(&rt, &handle, args.sessions, args.callers, |h, i| {
        let pending = h.close_session(CloseSession {
            session_id: format!("s{i}"),
            ended_at_ms: T0 + i as i64 + 95_000,
            cause: EndCause::CallerBye,
        });
        async move { pending.await.map(|_| ()) }
    })?;
    report(
        "session records",
        "records",
        args.sessions,
        close_time,
        stats,
    );

    let eur = Currency::new("EUR")?;
    let (charge_time, stats) = phase(&rt, &handle, args.sessions, args.callers, move |h, i| {
        let pending = h.record_charge(NewCharge {
            session_id: None,
            server: format!("as{}", i % 8),
            subscriber: format!("sub{}", i % 1000),
            service: Some("video".into()),
            event_id: format!("ev{i}"),
            amount: ChargeAmount::Total(Money::new(25, eur)),
            description: "bench item".into(),
            charged_at_ms: T0 + i as i64,
        });
        async move { pending.await.map(|_| ()) }
    })?;
    report(
        "charge records",
        "records",
        args.sessions,
        charge_time,
        stats,
    );

    let lifecycle = open_time + close_time;
    println!(
        "whole sessions (open + close): {:.0} session records/s",
        args.sessions as f64 / lifecycle.as_secs_f64()
    );
    writer.shutdown()?;
    Ok(())
}
