//! The tasks that run calls: a few long-lived tokio tasks, each owning the calls placed on
//! it, instead of a task (with its future, its timer and its wake-ups) per call. A call's
//! inbox schedules the call on its runner when something arrives; the runner hands the call
//! everything waiting, then what its deadline asks, and sleeps until the next input or the
//! earliest deadline of its calls. A call costs its runner a map entry and a heap entry per
//! deadline, not a task of a kilobyte.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

/// A call as its runner sees it (the driver and its call, see [`super::CallSlot`]).
pub(crate) trait CallTask: Send {
    /// Takes every input waiting in the call's inbox and carries out what they ask (also
    /// what the call asked when it was built, on the first run).
    fn drain(&mut self);
    /// The call's deadline came.
    fn timeout(&mut self);
    /// When the call next needs [`CallTask::timeout`].
    fn deadline(&self) -> Option<Instant>;
    /// Whether the call is over: the runner then drops it, which unroutes it.
    fn finished(&self) -> bool;
}

/// What a runner is handed: calls to start and calls with inputs waiting, by key.
#[derive(Default)]
struct Work {
    start: Vec<(u64, Box<dyn CallTask>)>,
    ready: VecDeque<u64>,
}

/// The side of a runner that inboxes and the spawner reach: its work queue and its
/// wake-up.
#[derive(Default)]
pub(crate) struct RunnerQueue {
    work: Mutex<Work>,
    wake: Notify,
}

impl RunnerQueue {
    fn work(&self) -> std::sync::MutexGuard<'_, Work> {
        // Pushes and takes whole entries: a poisoned lock holds no half-done one.
        self.work.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Has call `key` run: something arrived in its inbox.
    pub(crate) fn schedule(&self, key: u64) {
        self.work().ready.push_back(key);
        self.wake.notify_one();
    }

    /// The keys scheduled and not yet taken, in order.
    #[cfg(test)]
    pub(crate) fn ready_keys(&self) -> Vec<u64> {
        self.work().ready.iter().copied().collect()
    }

    /// Hands a new call over to the runner, which runs it at once.
    pub(crate) fn start(&self, key: u64, task: Box<dyn CallTask>) {
        self.work().start.push((key, task));
        self.wake.notify_one();
    }
}

/// A call on its runner, with the deadline the runner has armed for it.
struct Entry {
    task: Box<dyn CallTask>,
    armed: Option<Instant>,
}

/// The calls of one runner and their deadlines.
#[derive(Default)]
struct Calls {
    calls: HashMap<u64, Entry>,
    /// Deadlines by time; an entry whose call has moved its deadline since is skipped.
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Calls {
    /// Runs `what` on call `key`, if it is still there, then settles it. A call that panics
    /// is dropped alone (logged): the runner and its other calls go on, as they did when
    /// each call had a task of its own.
    fn run(&mut self, key: u64, what: fn(&mut dyn CallTask)) {
        let Some(entry) = self.calls.get_mut(&key) else {
            return;
        };
        let task = &mut entry.task;
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| what(task.as_mut())));
        if outcome.is_err() {
            tracing::error!(key, "a call panicked; dropped");
            self.calls.remove(&key);
            return;
        }
        self.settle(key);
    }

    /// After a call ran: drops it if it is over, else arms its next deadline.
    fn settle(&mut self, key: u64) {
        let Some(entry) = self.calls.get_mut(&key) else {
            return;
        };
        if entry.task.finished() {
            self.calls.remove(&key);
            if self.calls.capacity() > 1024 && self.calls.len() < self.calls.capacity() / 4 {
                self.calls.shrink_to((self.calls.len() * 2).max(512));
            }
            return;
        }
        let deadline = entry.task.deadline();
        if deadline != entry.armed {
            entry.armed = deadline;
            if let Some(at) = deadline {
                self.timers.push(Reverse((at, key)));
            }
        }
    }

    /// Runs the calls whose deadline is due at `now`; the earliest deadline left.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        self.sweep();
        while let Some(&Reverse((at, key))) = self.timers.peek() {
            if at > now {
                return Some(at);
            }
            self.timers.pop();
            let Some(entry) = self.calls.get_mut(&key) else {
                continue;
            };
            if entry.armed != Some(at) {
                continue;
            }
            entry.armed = None;
            self.run(key, |task| task.timeout());
        }
        None
    }

    /// Rebuilds the deadline heap once most of it is moved deadlines (a call re-arms at
    /// each answer), giving back a peak's room.
    fn sweep(&mut self) {
        if self.timers.len() <= 1024 || self.timers.len() < 2 * self.calls.len() {
            return;
        }
        let timers: BinaryHeap<_> = self
            .calls
            .iter()
            .filter_map(|(key, e)| e.armed.map(|at| Reverse((at, *key))))
            .collect();
        self.timers = timers;
    }
}

/// How many ready calls a runner takes from its queue before letting other tasks run.
const BATCH: usize = 256;

/// Runs the calls handed to `queue` for as long as the relay runs.
pub(crate) async fn run(queue: Arc<RunnerQueue>) {
    let mut calls = Calls::default();
    let mut started = Vec::new();
    let mut ready = Vec::with_capacity(BATCH);
    loop {
        // What arrived, taken under one lock: new calls, then up to a batch of ready ones.
        {
            let mut work = queue.work();
            started.append(&mut work.start);
            let n = work.ready.len().min(BATCH);
            ready.extend(work.ready.drain(..n));
        }
        for (key, task) in started.drain(..) {
            calls.calls.insert(key, Entry { task, armed: None });
            calls.run(key, |task| task.drain());
        }
        let full = ready.len() == BATCH;
        for key in ready.drain(..) {
            calls.run(key, |task| task.drain());
        }
        let next = calls.expire(Instant::now());
        if full {
            tokio::task::yield_now().await;
            continue;
        }
        match next {
            Some(at) => {
                tokio::select! {
                    () = queue.wake.notified() => {}
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                }
            }
            None => queue.wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A call that counts its runs and ends after `lives` timeouts.
    struct Counting {
        drains: Arc<AtomicUsize>,
        timeouts: Arc<AtomicUsize>,
        every: Duration,
        next: Instant,
        lives: usize,
    }

    impl CallTask for Counting {
        fn drain(&mut self) {
            self.drains.fetch_add(1, Ordering::SeqCst);
        }
        fn timeout(&mut self) {
            self.timeouts.fetch_add(1, Ordering::SeqCst);
            self.lives -= 1;
            self.next += self.every;
        }
        fn deadline(&self) -> Option<Instant> {
            (self.lives > 0).then_some(self.next)
        }
        fn finished(&self) -> bool {
            self.lives == 0
        }
    }

    #[test]
    fn a_call_runs_at_its_deadlines_and_is_dropped_when_over() {
        let mut calls = Calls::default();
        let t0 = Instant::now();
        let timeouts = Arc::new(AtomicUsize::new(0));
        let task = Counting {
            drains: Arc::default(),
            timeouts: timeouts.clone(),
            every: Duration::from_secs(1),
            next: t0 + Duration::from_secs(1),
            lives: 2,
        };
        calls.calls.insert(
            7,
            Entry {
                task: Box::new(task),
                armed: None,
            },
        );
        calls.settle(7);
        assert_eq!(calls.expire(t0), Some(t0 + Duration::from_secs(1)));
        assert_eq!(timeouts.load(Ordering::SeqCst), 0, "not due yet");
        assert_eq!(
            calls.expire(t0 + Duration::from_secs(1)),
            Some(t0 + Duration::from_secs(2))
        );
        assert_eq!(timeouts.load(Ordering::SeqCst), 1);
        assert_eq!(calls.expire(t0 + Duration::from_secs(5)), None);
        assert_eq!(timeouts.load(Ordering::SeqCst), 2);
        assert!(calls.calls.is_empty(), "over: dropped");
    }

    #[test]
    fn moved_deadlines_are_skipped_and_swept() {
        let mut calls = Calls::default();
        let t0 = Instant::now();
        let timeouts = Arc::new(AtomicUsize::new(0));
        for key in 0..2000u64 {
            calls.calls.insert(
                key,
                Entry {
                    task: Box::new(Counting {
                        drains: Arc::default(),
                        timeouts: timeouts.clone(),
                        every: Duration::from_secs(1),
                        next: t0 + Duration::from_secs(100),
                        lives: 1,
                    }),
                    armed: Some(t0 + Duration::from_secs(50)),
                },
            );
            // Armed at 50 s, then moved to 100 s: the 50 s entry is stale.
            calls
                .timers
                .push(Reverse((t0 + Duration::from_secs(50), key)));
            calls.settle(key);
        }
        assert_eq!(calls.timers.len(), 4000);
        // Long before the stale entries are due, they are swept.
        assert_eq!(
            calls.expire(t0 + Duration::from_secs(2)),
            Some(t0 + Duration::from_secs(100))
        );
        assert_eq!(calls.timers.len(), 2000);
        assert_eq!(
            calls.expire(t0 + Duration::from_secs(60)),
            Some(t0 + Duration::from_secs(100))
        );
        assert_eq!(
            timeouts.load(Ordering::SeqCst),
            0,
            "stale deadlines run nothing"
        );
        calls.expire(t0 + Duration::from_secs(100));
        assert_eq!(timeouts.load(Ordering::SeqCst), 2000);
        assert!(calls.calls.is_empty() && calls.timers.is_empty());
    }

    /// A call whose every run panics.
    struct Panicking;

    impl CallTask for Panicking {
        fn drain(&mut self) {
            panic!("a bug in one call");
        }
        fn timeout(&mut self) {}
        fn deadline(&self) -> Option<Instant> {
            None
        }
        fn finished(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_call_that_panics_is_dropped_alone() {
        let mut calls = Calls::default();
        let drains = Arc::new(AtomicUsize::new(0));
        calls.calls.insert(
            1,
            Entry {
                task: Box::new(Panicking),
                armed: None,
            },
        );
        calls.calls.insert(
            2,
            Entry {
                task: Box::new(Counting {
                    drains: drains.clone(),
                    timeouts: Arc::default(),
                    every: Duration::from_secs(1),
                    next: Instant::now() + Duration::from_secs(60),
                    lives: 1,
                }),
                armed: None,
            },
        );
        calls.run(1, |task| task.drain());
        calls.run(2, |task| task.drain());
        assert!(
            !calls.calls.contains_key(&1),
            "the panicking call is dropped"
        );
        assert!(calls.calls.contains_key(&2), "the other one goes on");
        assert_eq!(drains.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_runner_starts_calls_and_runs_the_scheduled_ones() {
        let queue = Arc::new(RunnerQueue::default());
        let runner = tokio::spawn(run(queue.clone()));
        let drains = Arc::new(AtomicUsize::new(0));
        let task = Counting {
            drains: drains.clone(),
            timeouts: Arc::default(),
            every: Duration::from_secs(3600),
            next: Instant::now() + Duration::from_secs(3600),
            lives: 1,
        };
        queue.start(1, Box::new(task));
        let waited = |n: usize| {
            let drains = drains.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while drains.load(Ordering::SeqCst) < n {
                        tokio::task::yield_now().await;
                    }
                })
                .await
                .is_ok()
            }
        };
        assert!(waited(1).await, "a started call runs at once");
        queue.schedule(1);
        assert!(waited(2).await, "a scheduled call runs again");
        // A key with no call (it ended) is skipped.
        queue.schedule(99);
        queue.schedule(1);
        assert!(waited(3).await);
        runner.abort();
    }
}
