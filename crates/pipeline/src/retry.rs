//! How long and how often failed writes are retried.

use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;

/// Backoff and windows for retrying writes.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Retryable failures (throttling, 5xx, timeouts) are retried until this long after
    /// the event was produced (its Kafka timestamp), then the event is dead-lettered
    /// `retries_exhausted`.
    pub retry_window: Duration,
    /// The least time a worker retries an event from its first failure, even when the
    /// event is already older than `retry_window` (a backlog after an outage, a partition
    /// taken over from another worker): a backlog is not dead-lettered at its first
    /// throttle.
    pub min_retry: Duration,
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
            min_retry: Duration::from_secs(300),
            permanent_window: Duration::from_secs(180),
        }
    }
}

impl RetryPolicy {
    /// When retryable failures of an event produced at `produced` (its Kafka record
    /// timestamp) stop being retried, for a worker whose first attempt failed at `start`
    /// (wall-clock `now`): `retry_window` after it was produced, so that neither a
    /// rebalance nor a restart starts its window again, but no sooner than
    /// `min_retry` (at most the window) after `start`. An event without a timestamp, or
    /// with one in the future, counts as produced now.
    pub fn give_up_at(
        &self,
        produced: Option<SystemTime>,
        now: SystemTime,
        start: Instant,
    ) -> Instant {
        let age = produced
            .and_then(|p| now.duration_since(p).ok())
            .unwrap_or_default();
        let left = self.retry_window.saturating_sub(age);
        let wait = left.max(self.min_retry.min(self.retry_window));
        // Windows are bounded by the configuration; a far future stands in for one
        // past what the clock can count.
        start
            .checked_add(wait)
            .unwrap_or_else(|| start + Duration::from_secs(30 * 24 * 3600))
    }

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
    fn the_retry_window_runs_from_the_event_s_timestamp_with_a_least_time_for_backlogs() {
        let p = RetryPolicy {
            retry_window: Duration::from_secs(3600),
            min_retry: Duration::from_secs(300),
            ..RetryPolicy::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let start = Instant::now();
        let ago = |secs| Some(now - Duration::from_secs(secs));
        let left = |produced| p.give_up_at(produced, now, start) - start;
        assert_eq!(
            left(ago(0)),
            Duration::from_secs(3600),
            "fresh: the whole window"
        );
        assert_eq!(
            left(ago(1000)),
            Duration::from_secs(2600),
            "taken over after a rebalance: what is left of its window"
        );
        assert_eq!(
            left(ago(3500)),
            Duration::from_secs(300),
            "nearly out: still the least time"
        );
        assert_eq!(
            left(ago(50_000)),
            Duration::from_secs(300),
            "a backlog older than the window: the least time"
        );
        assert_eq!(left(None), Duration::from_secs(3600), "no timestamp");
        assert_eq!(
            left(Some(now + Duration::from_secs(60))),
            Duration::from_secs(3600),
            "a producer clock ahead of ours"
        );
        let short = RetryPolicy {
            retry_window: Duration::from_secs(20),
            ..p
        };
        assert_eq!(
            short.give_up_at(ago(100), now, start) - start,
            Duration::from_secs(20),
            "the least time is never longer than the window"
        );
    }

    #[test]
    fn backoff_doubles_its_ceiling_up_to_the_cap_with_full_jitter() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(500),
            ..RetryPolicy::default()
        };
        let ms = Duration::from_millis;
        // (attempt, ceiling): 10 ms doubling, capped at 500 ms.
        for (attempt, ceiling) in [
            (0, ms(10)),
            (1, ms(20)),
            (3, ms(80)),
            (5, ms(320)),
            (6, ms(500)),
            (40, ms(500)),
        ] {
            let draws: Vec<Duration> = (0..2000).map(|_| p.backoff(attempt)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            // Full jitter: uniform from zero, so the mean is about half the ceiling and
            // some waits are short.
            let mean = draws.iter().sum::<Duration>() / 2000;
            assert!(
                mean > ceiling * 4 / 10 && mean < ceiling * 6 / 10,
                "attempt {attempt}: mean {mean:?}"
            );
            assert!(draws.iter().any(|d| *d < ceiling / 10), "attempt {attempt}");
        }
    }
}
