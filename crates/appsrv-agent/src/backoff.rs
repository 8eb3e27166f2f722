//! Exponential backoff for requests retried until the relay answers (registration, charges).

use std::time::Duration;

/// Delays that start at `initial`, double on every failure up to `max`, and start over after
/// a success. Deterministic: jitter is left to the caller, so tests can predict every delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff from `initial` to `max` (`max` below `initial` is raised to it).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The delay before the next attempt; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let delays: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
        let mut low = Backoff::new(Duration::from_secs(3), Duration::from_secs(1));
        assert_eq!(low.next_delay(), Duration::from_secs(3));
        assert_eq!(low.next_delay(), Duration::from_secs(3));
    }
}
