//! A one-value channel on `std` alone, usable both blocking and as a future.
//!
//! The writer thread answers each caller through one of these: the receiver can be waited
//! on by a plain thread ([`Receiver::recv`]) or polled by any async runtime
//! ([`Receiver::poll_recv`], driven by the task's waker), so the crate needs no runtime.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// The sender was dropped without sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

struct State<T> {
    value: Option<T>,
    sender_alive: bool,
    waker: Option<Waker>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // The lock is never held across user code, so poisoning cannot leave the state
        // half-updated; carry on with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new channel.
pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            value: None,
            sender_alive: true,
            waker: None,
        }),
        ready: Condvar::new(),
    });
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver { shared },
    )
}

/// The sending half; sending consumes it, and dropping it unsent closes the channel.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Sends the value; the receiver (thread or task) is woken when `self` drops, at the
    /// end of this call.
    pub(crate) fn send(self, value: T) {
        self.shared.lock().value = Some(value);
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.sender_alive = false;
            state.waker.take()
        };
        self.shared.ready.notify_all();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The receiving half.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// Blocks the thread until the value arrives or the sender is dropped.
    pub(crate) fn recv(self) -> Result<T, Closed> {
        let mut state = self.shared.lock();
        loop {
            if let Some(value) = state.value.take() {
                return Ok(value);
            }
            if !state.sender_alive {
                return Err(Closed);
            }
            state = self
                .shared
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Polls for the value, registering the task's waker while it is not there yet.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, Closed>> {
        let mut state = self.shared.lock();
        if let Some(value) = state.value.take() {
            return Poll::Ready(Ok(value));
        }
        if !state.sender_alive {
            return Poll::Ready(Err(Closed));
        }
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn blocking_receive_gets_the_value_sent_from_another_thread() {
        let (tx, rx) = channel();
        let t = std::thread::spawn(move || tx.send(42));
        assert_eq!(rx.recv(), Ok(42));
        t.join().unwrap();
    }

    #[test]
    fn dropping_the_sender_closes_the_channel() {
        let (tx, rx) = channel::<u8>();
        drop(tx);
        assert_eq!(rx.recv(), Err(Closed));
    }

    #[test]
    fn polling_registers_the_waker_and_sending_wakes_it() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = channel();
        assert_eq!(rx.poll_recv(&mut cx), Poll::Pending);
        assert_eq!(
            rx.poll_recv(&mut cx),
            Poll::Pending,
            "polling again is fine"
        );
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        tx.send("done");
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "woken exactly once");
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Ok("done")));
    }

    #[test]
    fn a_dropped_sender_wakes_a_waiting_task_with_closed() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = channel::<u8>();
        assert_eq!(rx.poll_recv(&mut cx), Poll::Pending);
        drop(tx);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Err(Closed)));
    }
}
