//! Pauses between the attempts of a retried call: doubling from a first
//! pause up to a cap, optionally within a deadline. The one helper behind
//! the MDS connection's leader search, the client's chunk reads and writes
//! and its lock waits.

use std::time::{Duration, Instant};

/// Doubling pauses, capped, within an optional deadline.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    deadline: Option<Instant>,
}

impl Backoff {
    /// Pauses of `first`, twice that, ... up to `max` each; no deadline.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first,
            max,
            deadline: None,
        }
    }

    /// The same, giving up on a pause that would end at or past `deadline`.
    pub fn until(self, deadline: Instant) -> Backoff {
        Backoff {
            deadline: Some(deadline),
            ..self
        }
    }

    /// The next pause, or None if it would reach the deadline.
    pub fn next_pause(&mut self) -> Option<Duration> {
        let pause = self.next;
        if self.deadline.is_some_and(|d| Instant::now() + pause >= d) {
            return None;
        }
        self.next = (self.next * 2).min(self.max);
        Some(pause)
    }

    /// Sleeps the next pause; false at once if it would reach the deadline
    /// (time to give up).
    pub async fn wait(&mut self) -> bool {
        match self.next_pause() {
            Some(p) => {
                tokio::time::sleep(p).await;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(10), ms(50));
        let got: Vec<Duration> = (0..5).filter_map(|_| b.next_pause()).collect();
        assert_eq!(got, [ms(10), ms(20), ms(40), ms(50), ms(50)]);
    }

    #[test]
    fn gives_up_at_the_deadline() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(20), ms(1000)).until(Instant::now() + ms(3_600_000));
        assert_eq!(b.next_pause(), Some(ms(20)));
        let mut b = Backoff::new(ms(20), ms(1000)).until(Instant::now());
        assert_eq!(b.next_pause(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_the_pause() {
        let start = tokio::time::Instant::now();
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(10));
        assert!(b.wait().await);
        assert!(b.wait().await);
        assert_eq!(start.elapsed(), Duration::from_millis(20));
    }
}
