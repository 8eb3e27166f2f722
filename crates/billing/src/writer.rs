//! The group-commit writer: durability without losing throughput.
//!
//! One dedicated OS thread owns the [`Store`]. Callers send it [`Op`]s over a channel;
//! the thread takes the first waiting request, drains everything else already queued
//! (up to [`WriterConfig::max_batch`]) and applies the lot as one transaction, so one
//! `fsync` covers every request that arrived while the previous one was running. Each
//! caller is answered only after the transaction holding its request has committed.
//!
//! Under load a commit interval ([`WriterConfig::commit_interval`]) spaces the commits out
//! (PostgreSQL's `commit_delay`, in spirit): a request arriving less than that after the
//! previous commit started waits out the rest of the interval with whatever else arrives,
//! so a busy relay pays one WAL write and one `fsync` per interval instead of one per
//! handful of requests. A request arriving after a quiet spell is committed at once.
//!
//! A [`WriterHandle`] is `Clone + Send + Sync`. Every request returns a [`Pending`],
//! which is both a [`Future`] (for async code: awaiting it never blocks a runtime's worker
//! thread, the writer thread wakes the task) and a blocking [`Pending::wait`] (for plain
//! threads). Sending never blocks: the queue is unbounded, and a relay that produces
//! requests faster than the disk commits them shows it as growing latency.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, trace, warn};

use crate::error::BillingError;
use crate::oneshot;
use crate::record::{ChargeRecord, SessionRecord};
use crate::store::{
    CloseSession, EndedSession, NewCharge, Op, OpenSession, Outcome, Store, TouchSessions,
};

type Reply = oneshot::Sender<Result<Outcome, BillingError>>;

// Shutdown is sent once; boxing every request to shrink it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Message {
    Op(Op, Reply),
    Shutdown,
}

/// Tuning of the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// The most requests committed in one transaction (at least 1).
    pub max_batch: usize,
    /// The least time between the starts of two commits; zero commits as soon as the
    /// previous commit is done. It bounds the extra latency a request can see.
    pub commit_interval: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            max_batch: 4096,
            commit_interval: Duration::ZERO,
        }
    }
}

/// Counters of the writer's work since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions attempted.
    pub batches: u64,
    /// Requests handled.
    pub ops: u64,
    /// The largest batch so far.
    pub largest_batch: u64,
    /// Transactions that failed to commit.
    pub failed_batches: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    ops: AtomicU64,
    largest_batch: AtomicU64,
    failed_batches: AtomicU64,
}

/// The writer thread and a handle to it; dropping it (or [`Writer::shutdown`]) commits
/// what was queued before and stops the thread.
pub struct Writer {
    handle: WriterHandle,
    thread: Option<JoinHandle<()>>,
    /// Set when stopping, so that the thread cuts a commit interval short.
    stopping: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the writer thread with the default configuration.
    pub fn spawn<S: Store + 'static>(store: S) -> Result<Writer, BillingError> {
        Writer::spawn_with(store, WriterConfig::default())
    }

    /// Starts the writer thread.
    pub fn spawn_with<S: Store + 'static>(
        store: S,
        config: WriterConfig,
    ) -> Result<Writer, BillingError> {
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let stopping = Arc::new(AtomicBool::new(false));
        let thread_stopping = Arc::clone(&stopping);
        let config = WriterConfig {
            max_batch: config.max_batch.max(1),
            ..config
        };
        let thread = std::thread::Builder::new()
            .name("billing-writer".into())
            .spawn(move || run(store, &rx, config, &thread_counters, &thread_stopping))?;
        Ok(Writer {
            handle: WriterHandle { tx, counters },
            thread: Some(thread),
            stopping,
        })
    }

    /// A handle for sending requests; clone it freely.
    pub fn handle(&self) -> WriterHandle {
        self.handle.clone()
    }

    /// Commits every request queued before this call, then stops the thread and waits for
    /// it. Requests sent afterwards, through any handle, fail with
    /// [`BillingError::WriterStopped`].
    pub fn shutdown(mut self) -> Result<(), BillingError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), BillingError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // If the thread is already gone the message has nowhere to go; joining says why.
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.handle.tx.send(Message::Shutdown);
        thread.thread().unpark();
        thread.join().map_err(|_| {
            error!("the billing writer thread panicked");
            BillingError::WriterStopped
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            warn!(error = %e, "billing writer did not stop cleanly");
        }
    }
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

/// Sends requests to the writer thread. `Clone + Send + Sync`; sending never blocks.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Message>,
    counters: Arc<Counters>,
}

impl fmt::Debug for WriterHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriterHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl WriterHandle {
    /// Queues `op`; the result resolves once its transaction has committed. Input that
    /// fails [`Op::validate`] is refused at once without reaching the writer.
    pub fn submit(&self, op: Op) -> Pending<Outcome> {
        self.request(op, Ok)
    }

    /// Journals a confirmed session.
    pub fn open_session(&self, session: OpenSession) -> Pending<()> {
        self.request(Op::Open(session), Outcome::into_opened)
    }

    /// Refreshes the last-seen time of live sessions; resolves to how many were open.
    pub fn touch_sessions(&self, touch: TouchSessions) -> Pending<usize> {
        self.request(Op::Touch(touch), Outcome::into_touched)
    }

    /// Refreshes the last-seen time of every open session of `node` (renews its lease);
    /// resolves to how many there were.
    pub fn touch_all_open(&self, node: &str, seen_at_ms: i64) -> Pending<usize> {
        self.request(
            Op::TouchAll {
                node: node.to_owned(),
                seen_at_ms,
            },
            Outcome::into_touched,
        )
    }

    /// Closes a session; resolves to its record once the record is durable and the
    /// session is out of the journal.
    pub fn close_session(&self, close: CloseSession) -> Pending<SessionRecord> {
        self.request(Op::Close(close), Outcome::into_closed)
    }

    /// Records a charge; resolves to the stored record and whether the event had been
    /// charged before.
    pub fn record_charge(&self, charge: NewCharge) -> Pending<(ChargeRecord, bool)> {
        self.request(Op::Charge(charge), Outcome::into_charged)
    }

    /// Closes every session a crash of `node` left in the journal (see the crate
    /// documentation).
    pub fn recover(&self, node: &str, now_ms: i64) -> Pending<Vec<SessionRecord>> {
        self.request(
            Op::Recover {
                node: node.to_owned(),
                now_ms,
            },
            Outcome::into_recovered,
        )
    }

    /// Closes, as `relay-lost`, every session of other nodes whose lease of `lease_ms`
    /// had expired at `now_ms` (see [`Op::ClaimLost`]); resolves to their records.
    pub fn claim_lost(
        &self,
        node: &str,
        lease_ms: i64,
        now_ms: i64,
    ) -> Pending<Vec<SessionRecord>> {
        self.request(
            Op::ClaimLost {
                node: node.to_owned(),
                lease_ms,
                now_ms,
            },
            Outcome::into_claimed,
        )
    }

    /// Finds the ended session whose session id, terminal Call-ID or server Call-ID is
    /// `key` and that ended at or after `ended_since_ms` (see [`Op::FindEnded`]); the one
    /// that ended last when several do. Queued behind the writes like any request, it
    /// sees every record committed before it was submitted. It writes nothing, and a
    /// failure of its own never makes the other requests of its batch fail (a transaction
    /// that cannot commit fails them all, the lookup with them, as always).
    pub fn find_ended(&self, key: &str, ended_since_ms: i64) -> Pending<Option<EndedSession>> {
        self.request(
            Op::FindEnded {
                key: key.to_owned(),
                ended_since_ms,
            },
            Outcome::into_found_ended,
        )
    }

    /// The writer's counters.
    pub fn stats(&self) -> WriterStats {
        let c = &self.counters;
        WriterStats {
            batches: c.batches.load(Ordering::Relaxed),
            ops: c.ops.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
        }
    }

    fn request<T>(&self, op: Op, extract: fn(Outcome) -> Result<T, BillingError>) -> Pending<T> {
        if let Err(e) = op.validate() {
            return Pending::ready(Err(e));
        }
        let (reply, rx) = oneshot::channel();
        // If the writer has stopped, the message (and its reply sender) is dropped here
        // and the receiver resolves to `WriterStopped`.
        let _ = self.tx.send(Message::Op(op, reply));
        Pending {
            state: PendingState::Waiting { rx, extract },
        }
    }
}

/// The answer to a request, once its transaction has committed.
///
/// Await it in async code, or call [`wait`](Pending::wait) on a plain thread.
#[must_use = "a request is only known to be stored once its Pending resolves"]
pub struct Pending<T> {
    state: PendingState<T>,
}

enum PendingState<T> {
    Ready(Option<Result<T, BillingError>>),
    Waiting {
        rx: oneshot::Receiver<Result<Outcome, BillingError>>,
        extract: fn(Outcome) -> Result<T, BillingError>,
    },
}

impl<T> Pending<T> {
    fn ready(result: Result<T, BillingError>) -> Self {
        Pending {
            state: PendingState::Ready(Some(result)),
        }
    }

    /// Blocks the calling thread until the request is committed (or refused). Do not call
    /// it on an async runtime's worker thread: `.await` the `Pending` there instead.
    pub fn wait(self) -> Result<T, BillingError> {
        match self.state {
            PendingState::Ready(result) => result.unwrap_or(Err(BillingError::WriterStopped)),
            PendingState::Waiting { rx, extract } => match rx.recv() {
                Ok(result) => result.and_then(extract),
                Err(oneshot::Closed) => Err(BillingError::WriterStopped),
            },
        }
    }
}

// `Pending` never pins its value: it only moves the finished result out.
impl<T> Unpin for Pending<T> {}

impl<T> Future for Pending<T> {
    type Output = Result<T, BillingError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.state {
            PendingState::Ready(result) => {
                Poll::Ready(result.take().unwrap_or(Err(BillingError::WriterStopped)))
            }
            PendingState::Waiting { rx, extract } => match rx.poll_recv(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(result)) => Poll::Ready(result.and_then(*extract)),
                Poll::Ready(Err(oneshot::Closed)) => Poll::Ready(Err(BillingError::WriterStopped)),
            },
        }
    }
}

impl<T> fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            PendingState::Ready(_) => "ready",
            PendingState::Waiting { .. } => "waiting",
        };
        f.debug_struct("Pending").field("state", &state).finish()
    }
}

/// The writer thread's loop.
fn run<S: Store>(
    mut store: S,
    rx: &mpsc::Receiver<Message>,
    config: WriterConfig,
    counters: &Counters,
    stopping: &AtomicBool,
) {
    let mut ops = Vec::new();
    let mut replies = Vec::new();
    let mut last_commit: Option<Instant> = None;
    loop {
        let mut stop = false;
        match rx.recv() {
            Ok(Message::Op(op, reply)) => {
                ops.push(op);
                replies.push(reply);
            }
            Ok(Message::Shutdown) | Err(_) => break,
        }
        // Within the commit interval of the previous commit: let requests gather until it
        // has passed. The thread sleeps rather than waiting on the queue, so that requests
        // arriving meanwhile do not wake it one by one (two context switches each, on a
        // core the relay shares); stopping cuts the sleep short.
        if let Some(until) = last_commit.map(|t| t + config.commit_interval) {
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() || stopping.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::park_timeout(left);
            }
        }
        while !stop && ops.len() < config.max_batch {
            match rx.try_recv() {
                Ok(Message::Op(op, reply)) => {
                    ops.push(op);
                    replies.push(reply);
                }
                Ok(Message::Shutdown) | Err(TryRecvError::Disconnected) => {
                    stop = true;
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if !config.commit_interval.is_zero() {
            last_commit = Some(Instant::now());
        }
        commit(&mut store, &ops, &mut replies, counters);
        ops.clear();
        if stop {
            break;
        }
    }
    debug!("billing writer stopped");
}

/// Applies one batch and answers its callers, after the commit.
fn commit<S: Store>(store: &mut S, ops: &[Op], replies: &mut Vec<Reply>, counters: &Counters) {
    let n = ops.len() as u64;
    counters.batches.fetch_add(1, Ordering::Relaxed);
    counters.ops.fetch_add(n, Ordering::Relaxed);
    counters.largest_batch.fetch_max(n, Ordering::Relaxed);
    match store.apply(ops) {
        Ok(results) => {
            trace!(requests = n, "billing batch committed");
            let mut results = results.into_iter();
            for (reply, op) in replies.drain(..).zip(ops) {
                let result = results
                    .next()
                    .unwrap_or(Err(BillingError::UnexpectedOutcome {
                        expected: op.kind(),
                    }));
                reply.send(result);
            }
        }
        Err(e) => {
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            error!(error = %e, requests = n, "billing batch failed; nothing of it was stored");
            let detail = match e {
                BillingError::CommitFailed { detail } => detail,
                other => other.to_string(),
            };
            for reply in replies.drain(..) {
                reply.send(Err(BillingError::CommitFailed {
                    detail: detail.clone(),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::money::{Currency, Money};
    use crate::record::{ChargeRecord, EndCause, SessionRecord};
    use crate::sqlite::SqliteStore;
    use crate::store::{ChargeAmount, JournaledSession, Period};
    use crate::tariff::{Tariff, TariffSpec};
    use std::sync::Mutex;
    use std::task::{Wake, Waker};
    use std::time::{Duration, Instant};

    const T0: i64 = 1_700_000_000_000;

    fn _handle_is_clone_send_sync() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<WriterHandle>();
        fn check_future<T: Future + Send + Unpin>() {}
        check_future::<Pending<SessionRecord>>();
    }

    struct ThreadWaker(std::thread::Thread);

    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// A minimal executor: polls `fut` on this thread, sleeping until its waker fires.
    /// Fails if no wake-up comes within ten seconds (a lost wake-up would hang forever).
    fn block_on<F: Future + Unpin>(mut fut: F) -> F::Output {
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Poll::Ready(out) = Pin::new(&mut fut).poll(&mut cx) {
                return out;
            }
            assert!(Instant::now() < deadline, "future never woken");
            std::thread::park_timeout(Duration::from_millis(100));
        }
    }

    fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
        struct Noop;
        impl Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let waker = Waker::from(Arc::new(Noop));
        Pin::new(fut).poll(&mut Context::from_waker(&waker))
    }

    /// A store that blocks every batch until the test lets it go, and remembers batches
    /// (their sizes, and when each started).
    struct GateStore {
        gate: mpsc::Receiver<Result<(), String>>,
        batches: Arc<Mutex<Vec<usize>>>,
        started: Arc<Mutex<Vec<Instant>>>,
    }

    impl Store for GateStore {
        fn apply(
            &mut self,
            ops: &[Op],
        ) -> Result<Vec<Result<Outcome, BillingError>>, BillingError> {
            self.started.lock().unwrap().push(Instant::now());
            self.batches.lock().unwrap().push(ops.len());
            match self.gate.recv() {
                Ok(Ok(())) => Ok(ops.iter().map(|_| Ok(Outcome::Touched(1))).collect()),
                Ok(Err(detail)) => Err(BillingError::CommitFailed { detail }),
                Err(_) => Err(BillingError::WriterStopped),
            }
        }
        fn journal(&self) -> Result<Vec<JournaledSession>, BillingError> {
            Ok(Vec::new())
        }
        fn scan_sessions(
            &self,
            _: Period,
            _: &mut dyn FnMut(SessionRecord) -> Result<(), BillingError>,
        ) -> Result<(), BillingError> {
            Ok(())
        }
        fn scan_charges(
            &self,
            _: Period,
            _: &mut dyn FnMut(ChargeRecord) -> Result<(), BillingError>,
        ) -> Result<(), BillingError> {
            Ok(())
        }
    }

    fn touch(id: &str) -> TouchSessions {
        TouchSessions {
            session_ids: vec![id.into()],
            seen_at_ms: T0,
        }
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn requests_queued_during_a_commit_share_the_next_transaction() {
        let (gate, gate_rx) = mpsc::channel();
        let batches = Arc::new(Mutex::new(Vec::new()));
        let writer = Writer::spawn(GateStore {
            gate: gate_rx,
            batches: Arc::clone(&batches),
            started: Arc::default(),
        })
        .unwrap();
        let handle = writer.handle();
        let mut first = handle.touch_sessions(touch("first"));
        wait_until("the first batch to start", || {
            batches.lock().unwrap().len() == 1
        });
        let mut rest: Vec<Pending<usize>> = (0..9)
            .map(|i| handle.touch_sessions(touch(&format!("s{i}"))))
            .collect();
        // Nothing is answered before its commit.
        assert!(poll_once(&mut first).is_pending());
        assert!(rest.iter_mut().all(|p| poll_once(p).is_pending()));
        gate.send(Ok(())).unwrap();
        assert_eq!(first.wait().unwrap(), 1);
        wait_until("the second batch to start", || {
            batches.lock().unwrap().len() == 2
        });
        assert!(rest.iter_mut().all(|p| poll_once(p).is_pending()));
        gate.send(Ok(())).unwrap();
        for p in rest {
            assert_eq!(block_on(p).unwrap(), 1);
        }
        assert_eq!(*batches.lock().unwrap(), [1, 9]);
        let stats = handle.stats();
        assert_eq!((stats.batches, stats.ops, stats.largest_batch), (2, 10, 9));
        drop(gate);
        writer.shutdown().unwrap();
    }

    #[test]
    fn commits_are_spaced_by_the_commit_interval_and_gather_what_arrives() {
        let interval = Duration::from_millis(300);
        let (gate, gate_rx) = mpsc::channel();
        let batches = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(Mutex::new(Vec::new()));
        // Both commits may go through at once: only their timing is under test.
        gate.send(Ok(())).unwrap();
        gate.send(Ok(())).unwrap();
        let writer = Writer::spawn_with(
            GateStore {
                gate: gate_rx,
                batches: Arc::clone(&batches),
                started: Arc::clone(&started),
            },
            WriterConfig {
                commit_interval: interval,
                ..WriterConfig::default()
            },
        )
        .unwrap();
        let handle = writer.handle();
        assert_eq!(handle.touch_sessions(touch("first")).wait().unwrap(), 1);
        // Right after a commit: these wait out the interval, together.
        let pending: Vec<Pending<usize>> = (0..3)
            .map(|i| handle.touch_sessions(touch(&format!("s{i}"))))
            .collect();
        for p in pending {
            assert_eq!(p.wait().unwrap(), 1);
        }
        assert_eq!(
            *batches.lock().unwrap(),
            [1, 3],
            "the three requests share one commit"
        );
        let started = started.lock().unwrap().clone();
        assert!(
            started[1].duration_since(started[0]) >= interval,
            "the second commit started {:?} after the first",
            started[1].duration_since(started[0])
        );
        writer.shutdown().unwrap();
    }

    #[test]
    fn shutdown_commits_at_once_what_waits_for_the_interval() {
        let (gate, gate_rx) = mpsc::channel();
        let batches = Arc::new(Mutex::new(Vec::new()));
        gate.send(Ok(())).unwrap();
        gate.send(Ok(())).unwrap();
        let writer = Writer::spawn_with(
            GateStore {
                gate: gate_rx,
                batches: Arc::clone(&batches),
                started: Arc::default(),
            },
            WriterConfig {
                commit_interval: Duration::from_secs(3600),
                ..WriterConfig::default()
            },
        )
        .unwrap();
        let handle = writer.handle();
        assert_eq!(handle.touch_sessions(touch("first")).wait().unwrap(), 1);
        let waiting = handle.touch_sessions(touch("second"));
        // Within the hour-long interval: only the shutdown lets it through.
        writer.shutdown().unwrap();
        assert_eq!(waiting.wait().unwrap(), 1);
        assert_eq!(batches.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_failed_commit_fails_every_request_of_the_batch() {
        let (gate, gate_rx) = mpsc::channel();
        let batches = Arc::new(Mutex::new(Vec::new()));
        let writer = Writer::spawn(GateStore {
            gate: gate_rx,
            batches: Arc::clone(&batches),
            started: Arc::default(),
        })
        .unwrap();
        let handle = writer.handle();
        let first = handle.touch_sessions(touch("a"));
        wait_until("the first batch", || batches.lock().unwrap().len() == 1);
        let second = handle.touch_sessions(touch("b"));
        let third = handle.touch_sessions(touch("c"));
        gate.send(Ok(())).unwrap();
        gate.send(Err("disk full".into())).unwrap();
        assert_eq!(first.wait().unwrap(), 1);
        for p in [second, third] {
            let err = p.wait().unwrap_err();
            assert_eq!(
                err.to_string(),
                "billing commit failed, the request was not stored: disk full"
            );
        }
        assert_eq!(handle.stats().failed_batches, 1);
        drop(gate);
        drop(writer);
    }

    #[test]
    fn after_shutdown_requests_fail_with_writer_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer::spawn(SqliteStore::open(dir.path().join("b.db")).unwrap()).unwrap();
        let handle = writer.handle();
        let queued = handle.touch_sessions(touch("a"));
        writer.shutdown().unwrap();
        assert_eq!(
            queued.wait().unwrap(),
            0,
            "queued before shutdown: committed"
        );
        let err = block_on(handle.touch_sessions(touch("a"))).unwrap_err();
        assert!(matches!(err, BillingError::WriterStopped));
    }

    #[test]
    fn invalid_input_is_refused_without_reaching_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer::spawn(SqliteStore::open(dir.path().join("b.db")).unwrap()).unwrap();
        let handle = writer.handle();
        let eur = Currency::new("EUR").unwrap();
        let err = handle
            .record_charge(NewCharge {
                session_id: None,
                server: "as1".into(),
                subscriber: "bob".into(),
                service: None,
                event_id: "e".into(),
                amount: ChargeAmount::Total(Money::new(-5, eur)),
                description: String::new(),
                charged_at_ms: T0,
            })
            .wait()
            .unwrap_err();
        assert!(matches!(
            err,
            BillingError::NegativeAmount { minor: -5, .. }
        ));
        assert_eq!(handle.stats().ops, 0);
    }

    #[test]
    fn concurrent_callers_through_sqlite_all_get_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let writer = Writer::spawn(SqliteStore::open(&path).unwrap()).unwrap();
        let tariff = Tariff::new(TariffSpec {
            name: "t".into(),
            service: None,
            plan: None,
            currency: Currency::new("EUR").unwrap(),
            setup: 0,
            rate: 60,
            period_seconds: 60,
            increment: "1/1".parse().unwrap(),
            free_seconds: 0,
        })
        .unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let handle = writer.handle();
                let tariff = tariff.clone();
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    for i in 0..25 {
                        let sid = format!("t{t}-{i}");
                        handle
                            .open_session(OpenSession {
                                node: String::new(),
                                session_id: sid.clone(),
                                call_id: format!("c-{sid}"),
                                server_call_id: format!("as-{sid}"),
                                subscriber: format!("sub{t}"),
                                service: "video".into(),
                                server: "as1".into(),
                                account: None,
                                plan: "basic".into(),
                                tariff: tariff.clone(),
                                confirmed_at_ms: T0,
                            })
                            .wait()
                            .unwrap();
                        let close = CloseSession {
                            session_id: sid,
                            ended_at_ms: T0 + 1_000 * i,
                            cause: EndCause::CallerBye,
                        };
                        let record = block_on(handle.close_session(close)).unwrap();
                        assert_eq!(record.charge.minor, i);
                        ids.push(record.record_id);
                    }
                    ids
                })
            })
            .collect();
        let mut ids: Vec<i64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 200, "every close got its own record id");
        writer.shutdown().unwrap();
        let store = SqliteStore::open(&path).unwrap();
        let stored: Vec<i64> = store
            .session_records(Period::all())
            .unwrap()
            .iter()
            .map(|r| r.record_id)
            .collect();
        let mut stored_sorted = stored.clone();
        stored_sorted.sort_unstable();
        assert_eq!(stored_sorted, ids);
        assert!(store.journal().unwrap().is_empty());
    }
}
