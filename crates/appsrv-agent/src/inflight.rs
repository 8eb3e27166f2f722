//! Work in flight for a session, counted so that its BYE can wait for it (bounded): its
//! charges the relay has not answered yet (a charge naming a session the relay has already
//! closed would lose its link to the session), and its data connections still delivering
//! the backend's last bytes after the application server hung up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Counts work in flight, with a wait for none to be left.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    /// Counts one more until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    /// How many are in flight.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Returns once none is in flight.
    pub async fn settled(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// One piece of work in flight; dropping it (the work is done or given up) uncounts it.
#[derive(Debug)]
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn in_flight_work_settles_when_every_guard_is_gone() {
        let o = Arc::new(InFlight::default());
        o.settled().await;
        let a = o.begin();
        let b = o.begin();
        assert_eq!(o.count(), 2);
        let waiter = {
            let o = o.clone();
            tokio::spawn(async move { o.settled().await })
        };
        drop(a);
        assert_eq!(o.count(), 1);
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("settled() did not return")
            .unwrap();
        assert_eq!(o.count(), 0);
    }
}
