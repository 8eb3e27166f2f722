//! stdin, shared by every session: each data connection reads the whole input from where
//! it joined, and sessions established later (forks) get what came before them, up to a
//! bounded history.
//!
//! The hub holds chunks in order. A subscriber's position is kept in the hub, so that a
//! session reconnecting its data connection (after a change or a transfer) goes on where
//! the old connection stopped. The reader is held back (backpressure) while the history is
//! over its bound and its oldest chunk has not been read by every subscriber.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

/// The shared input.
#[derive(Debug)]
pub struct InputHub {
    state: Mutex<HubState>,
    changed: Notify,
    cap: usize,
}

#[derive(Debug, Default)]
struct HubState {
    /// Absolute index of `chunks[0]`.
    base: u64,
    chunks: VecDeque<Bytes>,
    bytes: usize,
    eof: bool,
    /// Subscriber id → absolute index of the next chunk it reads.
    subs: HashMap<u64, u64>,
    next_sub: u64,
}

impl HubState {
    /// Drops the oldest chunks every subscriber has read while the history is over `cap`.
    fn prune(&mut self, cap: usize) {
        while self.bytes >= cap && !self.subs.is_empty() {
            let all_read = self.subs.values().all(|&pos| pos > self.base);
            if !all_read {
                break;
            }
            match self.chunks.pop_front() {
                Some(c) => {
                    self.bytes -= c.len();
                    self.base += 1;
                }
                None => break,
            }
        }
    }
}

impl InputHub {
    /// A hub keeping at most about `cap` bytes of history.
    pub fn new(cap: usize) -> Arc<InputHub> {
        Arc::new(InputHub {
            state: Mutex::new(HubState::default()),
            changed: Notify::new(),
            cap,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Adds a chunk; waits while the history is full of chunks not read by everyone.
    pub async fn push(&self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                st.prune(self.cap);
                if st.bytes < self.cap || st.chunks.is_empty() {
                    st.bytes += chunk.len();
                    st.chunks.push_back(chunk);
                    drop(st);
                    self.changed.notify_waiters();
                    return;
                }
            }
            notified.await;
        }
    }

    /// Marks the end of input.
    pub fn finish(&self) {
        self.lock().eof = true;
        self.changed.notify_waiters();
    }

    /// A new reader, starting at the oldest chunk still held.
    pub fn subscribe(self: &Arc<InputHub>) -> InputSub {
        let mut st = self.lock();
        let id = st.next_sub;
        st.next_sub += 1;
        let base = st.base;
        st.subs.insert(id, base);
        InputSub {
            hub: self.clone(),
            id,
        }
    }
}

/// One reader of the hub; dropping it lets the history go.
#[derive(Debug)]
pub struct InputSub {
    hub: Arc<InputHub>,
    id: u64,
}

impl InputSub {
    /// The next chunk, or `None` at end of input.
    pub async fn next(&self) -> Option<Bytes> {
        loop {
            let notified = self.hub.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.hub.lock();
                let pos = st
                    .subs
                    .get(&self.id)
                    .copied()
                    .unwrap_or(st.base)
                    .max(st.base);
                let offset = usize::try_from(pos - st.base).unwrap_or(usize::MAX);
                if let Some(chunk) = st.chunks.get(offset).cloned() {
                    st.subs.insert(self.id, pos + 1);
                    drop(st);
                    // The reader may be waiting for this chunk to be read.
                    self.hub.changed.notify_waiters();
                    return Some(chunk);
                }
                if st.eof {
                    return None;
                }
            }
            notified.await;
        }
    }
}

impl Drop for InputSub {
    fn drop(&mut self) {
        self.hub.lock().subs.remove(&self.id);
        self.hub.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn late_subscribers_get_the_history_and_eof() {
        let hub = InputHub::new(1024);
        let first = hub.subscribe();
        hub.push(Bytes::from_static(b"a")).await;
        hub.push(Bytes::from_static(b"b")).await;
        assert_eq!(first.next().await.unwrap(), "a");
        let late = hub.subscribe();
        hub.finish();
        assert_eq!(late.next().await.unwrap(), "a");
        assert_eq!(late.next().await.unwrap(), "b");
        assert_eq!(late.next().await, None);
        assert_eq!(first.next().await.unwrap(), "b");
        assert_eq!(first.next().await, None);
    }

    #[tokio::test]
    async fn the_reader_waits_for_slow_subscribers_beyond_the_bound() {
        let hub = InputHub::new(4);
        let sub = hub.subscribe();
        hub.push(Bytes::from_static(b"1234")).await;
        // Over the bound and unread: the next push must wait until the subscriber reads.
        let h2 = hub.clone();
        let pusher = tokio::spawn(async move { h2.push(Bytes::from_static(b"5678")).await });
        tokio::task::yield_now().await;
        assert!(!pusher.is_finished());
        assert_eq!(sub.next().await.unwrap(), "1234");
        tokio::time::timeout(Duration::from_secs(5), pusher)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sub.next().await.unwrap(), "5678");
        // The first chunk was dropped from the history: a new subscriber starts later.
        let late = hub.subscribe();
        hub.finish();
        assert_eq!(late.next().await.unwrap(), "5678");
    }

    #[tokio::test]
    async fn position_survives_a_reconnect_by_the_same_subscriber() {
        let hub = InputHub::new(1024);
        let sub = Arc::new(hub.subscribe());
        hub.push(Bytes::from_static(b"x")).await;
        hub.push(Bytes::from_static(b"y")).await;
        let s2 = sub.clone();
        assert_eq!(
            tokio::spawn(async move { s2.next().await })
                .await
                .unwrap()
                .unwrap(),
            "x"
        );
        assert_eq!(sub.next().await.unwrap(), "y");
    }
}
