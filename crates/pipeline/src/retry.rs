//! How long and how often failed writes are retried.

use std::time::Duration;

use rand::Rng;

/// Backoff and windows for retrying writes.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Retryable failures (throttling, 5xx, timeouts) are retried this long, then the
    /// event is dead-lettered `retries_exhausted`.
    pub retry_window: Duration,
    /// Permanent failures (access denied, no such stream) are retried this long, since
    /// IAM changes take a while to propagate, then dead-lettered `destination_rejected`.
    pub permanent_window: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            retry_window: Duration::from_secs(4 * 3600),
            permanent_window: Duration::from_secs(180),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with full jitter: a uniform draw from zero to
    /// `initial * 2^attempt`, capped at `max_backoff`. Full jitter spreads the retries
    /// of many lanes hitting one throttled stream.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.min(30)))
            .min(self.max_backoff);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_under_the_cap() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(500),
            ..RetryPolicy::default()
        };
        for attempt in 0..40 {
            let ceiling = Duration::from_millis(10)
                .saturating_mul(2u32.saturating_pow(attempt.min(30)))
                .min(Duration::from_millis(500));
            for _ in 0..50 {
                assert!(p.backoff(attempt) <= ceiling);
            }
        }
        let late: Duration = (0..200).map(|_| p.backoff(20)).sum();
        assert!(
            late > Duration::from_millis(200 * 100),
            "late retries wait longer on average"
        );
    }
}
