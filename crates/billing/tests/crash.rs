//! Crash safety: a child process writes billing records as fast as it can through the
//! group-commit writer and prints each id after its commit returns; the test kills it
//! with SIGKILL at a random moment, reopens the store and checks that every printed id
//! is there, that no row is partial, and that recovery closes the journaled sessions
//! exactly once, also when run twice.
//!
//! Rounds alternate between two kinds of kill: one lands while the child writes at full
//! speed (a transaction may be half-written), the other after the child has printed a
//! random number of ids and then stopped sending requests, so every printed id was the
//! latest thing it was told: an id printed before its commit was durable would be lost.
//!
//! The child is this same test binary, re-executed with `--exact crash_child` and the
//! database (an SQLite path or a `postgres://` URL) in `BILLING_CRASH_CHILD_DB`; in a
//! normal run `crash_child` does nothing.
//!
//! It runs on both backends: on SQLite the killed process held the database file; on
//! PostgreSQL (a real server the test starts, Debian's package `postgresql`) it held a
//! connection, and the server goes on, so what is checked is that every acknowledged
//! commit is in the database and that a restarted relay's recovery closes the journal
//! once.
//!
//! The child reports on a channel of its own: a Unix socket the parent listens on (path in
//! `BILLING_CRASH_CHILD_IDS`), never its stdout, where libtest writes `test crash_child ... `
//! with no line break of its own and could share a line with an id. Every line on that
//! socket must be an id or `FROZEN`; anything else fails the test, so no id the child
//! reported as committed can go unread or unverified.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "support/pg_server.rs"]
mod pg_server;

use billing::backend::{AnyStore, StorageBackend};
use billing::money::{Currency, Money};
use billing::record::EndCause;
use billing::store::{
    ChargeAmount, CloseSession, NewCharge, OpenSession, Period, Store, TouchSessions,
};
use billing::tariff::{Tariff, TariffSpec};
use billing::writer::Writer;
use rand::Rng;

const CHILD_ENV: &str = "BILLING_CRASH_CHILD_DB";
/// The path of the Unix socket the child reports its ids on.
const IDS_ENV: &str = "BILLING_CRASH_CHILD_IDS";
/// When set to N, the child stops sending requests once it has printed N ids, prints
/// `FROZEN` when all its workers have stopped, and waits to be killed.
const FREEZE_ENV: &str = "BILLING_CRASH_FREEZE_AFTER";
const T0: i64 = 1_700_000_000_000;
const WORKERS: usize = 4;
/// The child stops by itself after this long, should the parent fail to kill it.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

fn tariff() -> Tariff {
    Tariff::new(TariffSpec {
        name: "crash".into(),
        service: None,
        plan: None,
        currency: Currency::new("EUR").unwrap(),
        setup: 3,
        rate: 2,
        period_seconds: 60,
        increment: "30/6".parse().unwrap(),
        free_seconds: 2,
    })
    .unwrap()
}

/// What the child does for worker `w`'s `i`-th iteration, so the parent can check it.
fn confirmed_at(i: u64) -> i64 {
    T0 + i as i64 * 1_000
}

fn ended_at(i: u64) -> i64 {
    confirmed_at(i) + (i as i64 % 200) * 997
}

fn charge_minor(i: u64) -> i64 {
    (i % 50) as i64 * 10
}

/// Sessions of every fifth iteration are left open (journaled) for recovery to find.
fn left_open(i: u64) -> bool {
    i % 5 == 4
}

fn cause(i: u64) -> EndCause {
    EndCause::ALL[(i % 6) as usize]
}

#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let freeze_after: Option<usize> = std::env::var(FREEZE_ENV).ok().map(|n| n.parse().unwrap());
    let ids_path = std::env::var_os(IDS_ENV).expect("the parent names the ids socket");
    let ids = Arc::new(Mutex::new(UnixStream::connect(ids_path).unwrap()));
    let store = AnyStore::open(&backend_of(path.to_str().unwrap())).unwrap();
    let writer = Writer::spawn(store).unwrap();
    let started = Instant::now();
    let printed = Arc::new(AtomicUsize::new(0));
    let frozen = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let handle = writer.handle();
            let printed = Arc::clone(&printed);
            let frozen = Arc::clone(&frozen);
            let ids = Arc::clone(&ids);
            std::thread::spawn(move || {
                let eur = Currency::new("EUR").unwrap();
                let tariff = tariff();
                // One whole line per write, under the lock: lines never interleave.
                let write_line = |line: &str| {
                    let mut out = ids.lock().unwrap();
                    out.write_all(line.as_bytes()).unwrap();
                    out.flush().unwrap();
                };
                let print = |line: String| {
                    write_line(&line);
                    printed.fetch_add(1, Ordering::SeqCst);
                };
                // Called before every request: in freeze mode, stop for good once enough
                // ids are printed; in any mode, give up should the parent never kill us.
                let checkpoint = || {
                    let freeze = freeze_after.is_some_and(|n| printed.load(Ordering::SeqCst) >= n);
                    if freeze && frozen.fetch_add(1, Ordering::SeqCst) + 1 == WORKERS {
                        write_line("FROZEN\n");
                    }
                    while freeze || started.elapsed() > CHILD_LIFETIME {
                        if started.elapsed() > CHILD_LIFETIME {
                            std::process::exit(2);
                        }
                        std::thread::park_timeout(Duration::from_millis(100));
                    }
                };
                let mut open_ids = Vec::new();
                for i in 0u64.. {
                    checkpoint();
                    let sid = format!("w{w}-{i}");
                    handle
                        .open_session(OpenSession {
                            node: String::new(),
                            session_id: sid.clone(),
                            call_id: format!("call-{sid}"),
                            server_call_id: String::new(),
                            subscriber: format!("sub-{w}"),
                            service: "video".into(),
                            server: "as1".into(),
                            account: None,
                            plan: "gold".into(),
                            tariff: tariff.clone(),
                            confirmed_at_ms: confirmed_at(i),
                        })
                        .wait()
                        .unwrap();
                    if left_open(i) {
                        print(format!("J {sid}\n"));
                        open_ids.push(sid.clone());
                    } else {
                        checkpoint();
                        let record = handle
                            .close_session(CloseSession {
                                session_id: sid.clone(),
                                ended_at_ms: ended_at(i),
                                cause: cause(i),
                            })
                            .wait()
                            .unwrap();
                        print(format!("S {} {sid}\n", record.record_id));
                    }
                    let event = format!("e-{sid}");
                    let charge = NewCharge {
                        session_id: Some(sid.clone()),
                        server: "as1".into(),
                        subscriber: format!("sub-{w}"),
                        service: Some("video".into()),
                        event_id: event.clone(),
                        amount: ChargeAmount::Total(Money::new(charge_minor(i), eur)),
                        description: format!("item {i}"),
                        charged_at_ms: confirmed_at(i),
                    };
                    checkpoint();
                    let (record, duplicate) = handle.record_charge(charge.clone()).wait().unwrap();
                    assert!(!duplicate);
                    print(format!("C {} {event}\n", record.record_id));
                    if i % 7 == 0 {
                        checkpoint();
                        let (again, duplicate) = handle.record_charge(charge).wait().unwrap();
                        assert!(duplicate);
                        assert_eq!(again.record_id, record.record_id);
                    }
                    if i % 10 == 9 {
                        checkpoint();
                        handle
                            .touch_sessions(TouchSessions {
                                session_ids: open_ids.clone(),
                                seen_at_ms: confirmed_at(i),
                            })
                            .wait()
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

/// What the child printed: ids it was told were committed.
#[derive(Default)]
struct Printed {
    sessions: Vec<(i64, String)>,
    charges: Vec<(i64, String)>,
    journaled: Vec<String>,
}

impl Printed {
    fn len(&self) -> usize {
        self.sessions.len() + self.charges.len() + self.journaled.len()
    }

    /// Takes one line of the ids channel. Nothing but the child's reports travels there,
    /// so a line that is not one is a broken report, never something to skip.
    fn take(&mut self, line: &str) {
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("S"), Some(id), Some(sid), None) => {
                self.sessions.push((id.parse().unwrap(), sid.to_owned()));
            }
            (Some("C"), Some(id), Some(event), None) => {
                self.charges.push((id.parse().unwrap(), event.to_owned()));
            }
            (Some("J"), Some(sid), None, None) => self.journaled.push(sid.to_owned()),
            _ => panic!("the child reported a line that is not an id: {line:?}"),
        }
    }
}

/// The iteration number of a session id `w<w>-<i>`.
fn iteration(sid: &str) -> u64 {
    sid.split('-').nth(1).unwrap().parse().unwrap()
}

/// Accepts the child's connection on `listener`, giving up after `deadline`.
fn accept_child(listener: &UnixListener, deadline: Instant) -> Option<UnixStream> {
    listener.set_nonblocking(true).unwrap();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accepting the child's ids connection: {e}"),
        }
    }
}

/// The store named by the child's environment: a `postgres://` URL or an SQLite path.
fn backend_of(db: &str) -> StorageBackend {
    if db.starts_with("postgres://") {
        StorageBackend::Postgres { url: db.to_owned() }
    } else {
        StorageBackend::Sqlite {
            path: PathBuf::from(db),
        }
    }
}

/// Runs the child on `db` until it has printed `kill_after` ids (and, with `freeze`,
/// stopped writing), kills it, and returns everything it printed. The ids socket goes
/// into `dir`.
fn run_and_kill(db: &str, dir: &Path, kill_after: usize, freeze: bool) -> Printed {
    let ids_path = dir.join("ids.sock");
    let listener = UnixListener::bind(&ids_path).unwrap();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, db)
        .env(IDS_ENV, &ids_path);
    if freeze {
        command.env(FREEZE_ENV, kill_after.to_string());
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let Some(ids) = accept_child(&listener, Instant::now() + Duration::from_secs(30)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child never connected to its ids socket");
    };
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        // Until EOF: the kill closes the child's end, and every line it wrote before is
        // still read.
        for line in BufReader::new(ids).lines() {
            let line = line.expect("the ids channel carries UTF-8 lines");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Printed::default();
    let mut frozen = false;
    while if freeze {
        !frozen
    } else {
        printed.len() < kill_after
    } {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line == "FROZEN" => frozen = true,
            Ok(line) => printed.take(&line),
            Err(e) => {
                let _ = child.kill();
                panic!("child stopped printing after {} ids: {e}", printed.len());
            }
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed, not finished");
    // Lines already in the socket were printed before the kill, so they count too.
    for line in rx.iter() {
        assert_ne!(line, "FROZEN", "FROZEN reported twice");
        printed.take(&line);
    }
    reader.join().unwrap();
    printed
}

fn verify_and_recover(backend: &StorageBackend, printed: &Printed) {
    let tariff = tariff();
    let mut store = AnyStore::open(backend).unwrap();
    if let AnyStore::Sqlite(sqlite) = &store {
        sqlite.integrity_check().unwrap();
    }

    let sessions: HashMap<i64, _> = store
        .session_records(Period::all())
        .unwrap()
        .into_iter()
        .map(|r| (r.record_id, r))
        .collect();
    let charges: HashMap<i64, _> = store
        .charge_records(Period::all())
        .unwrap()
        .into_iter()
        .map(|c| (c.record_id, c))
        .collect();
    let journal: HashMap<String, _> = store
        .journal()
        .unwrap()
        .into_iter()
        .map(|j| (j.session.session_id.clone(), j))
        .collect();

    // Every id printed after its commit is there.
    for (id, sid) in &printed.sessions {
        let r = sessions
            .get(id)
            .unwrap_or_else(|| panic!("session record {id} ({sid}) was printed but is lost"));
        assert_eq!(&r.session_id, sid);
    }
    for (id, event) in &printed.charges {
        let c = charges
            .get(id)
            .unwrap_or_else(|| panic!("charge record {id} ({event}) was printed but is lost"));
        assert_eq!(&c.event_id, event);
    }
    for sid in &printed.journaled {
        assert!(journal.contains_key(sid), "journaled session {sid} is lost");
    }

    // No partial or inconsistent row: each record is exactly what the child wrote, and a
    // session is either journaled or recorded, never both.
    let mut recorded = HashSet::new();
    for r in sessions.values() {
        let i = iteration(&r.session_id);
        assert!(
            !left_open(i),
            "{} was never closed by the child",
            r.session_id
        );
        assert!(
            recorded.insert(r.session_id.clone()),
            "{} recorded twice",
            r.session_id
        );
        assert!(
            !journal.contains_key(&r.session_id),
            "{} both closed and open",
            r.session_id
        );
        assert_eq!(r.call_id, format!("call-{}", r.session_id));
        assert_eq!(
            (r.confirmed_at_ms, r.ended_at_ms),
            (confirmed_at(i), ended_at(i))
        );
        assert_eq!(r.duration_ms, r.ended_at_ms - r.confirmed_at_ms);
        assert_eq!(r.cause, cause(i));
        assert_eq!(r.charge, tariff.charge_for(r.duration_ms as u64));
    }
    let mut events = HashSet::new();
    for c in charges.values() {
        let sid = c.session_id.as_deref().unwrap();
        assert_eq!(c.event_id, format!("e-{sid}"));
        assert!(
            events.insert(c.event_id.clone()),
            "{} charged twice",
            c.event_id
        );
        assert_eq!(c.amount.minor, charge_minor(iteration(sid)));
    }
    for (sid, j) in &journal {
        let i = iteration(sid);
        assert_eq!(j.session.confirmed_at_ms, confirmed_at(i));
        assert!(j.last_seen_ms >= j.session.confirmed_at_ms);
        // Sessions meant to be closed may be journaled if the kill came between open
        // and close; that is what recovery is for.
    }

    // Recovery closes each journaled session once, at its last-seen time.
    let now = T0 + 10_000_000_000;
    let recovered = store.recover("", now).unwrap();
    assert_eq!(recovered.len(), journal.len());
    for r in &recovered {
        let j = &journal[&r.session_id];
        assert_eq!(r.cause, EndCause::RecoveredAfterRestart);
        assert_eq!(r.ended_at_ms, j.last_seen_ms);
        assert_eq!(r.charge, tariff.charge_for(r.duration_ms as u64));
    }
    assert!(store.journal().unwrap().is_empty());
    assert!(
        store.recover("", now).unwrap().is_empty(),
        "second recovery"
    );
    drop(store);
    let mut store = AnyStore::open(backend).unwrap();
    assert!(
        store.recover("", now).unwrap().is_empty(),
        "recovery after reopening"
    );
    let all = store.session_records(Period::all()).unwrap();
    assert_eq!(all.len(), sessions.len() + journal.len());
    let recovered_count = all
        .iter()
        .filter(|r| r.cause == EndCause::RecoveredAfterRestart)
        .count();
    assert_eq!(recovered_count, journal.len());
}

/// Six rounds on fresh databases made by `fresh`, which returns the database and a
/// directory for the ids socket (and whatever must live as long as the round).
fn rounds<T>(fresh: impl Fn() -> (String, tempfile::TempDir, T)) {
    let mut rng = rand::thread_rng();
    for round in 0..6 {
        let (db, dir, _keep) = fresh();
        let kill_after = rng.gen_range(1..=1000);
        let freeze = round % 2 == 1;
        let printed = run_and_kill(&db, dir.path(), kill_after, freeze);
        assert!(printed.len() >= kill_after);
        verify_and_recover(&backend_of(&db), &printed);
        eprintln!(
            "round {round}{}: killed after {} printed ids ({} sessions, {} charges, {} journaled)",
            if freeze { " (frozen)" } else { "" },
            printed.len(),
            printed.sessions.len(),
            printed.charges.len(),
            printed.journaled.len()
        );
    }
}

#[test]
fn sigkill_loses_nothing_committed_and_recovery_runs_once() {
    rounds(|| {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("billing.db").to_str().unwrap().to_owned();
        (db, dir, ())
    });
}

#[test]
fn postgres_sigkill_loses_nothing_committed_and_recovery_runs_once() {
    let server = pg_server::shared();
    rounds(|| (server.fresh_database(), tempfile::tempdir().unwrap(), ()));
}
