//! How fast something held in flight drains: events done over a recent window, so
//! that flow control can tell a tenant (or a partition) that is slow or down from one
//! that merely has a lot in flight because reading is faster than writing.
//!
//! Counts completions only; the window is rolled when a decision asks for the rate
//! ([`DrainRate::drains_and_roll`]), never on the hot path of completing an event.

use std::time::{Duration, Instant};

/// A rate is measured over at least this long before it is believed.
const MIN_WINDOW: Duration = Duration::from_millis(100);
/// A window this long is closed and a new one begun at the next decision.
const WINDOW: Duration = Duration::from_millis(500);

/// Completions counted since the current window began.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DrainRate {
    since: Instant,
    done: u32,
    /// Events a second in the previous window, once one was closed.
    last: Option<f64>,
}

impl Default for DrainRate {
    fn default() -> Self {
        DrainRate::new(Instant::now())
    }
}

impl DrainRate {
    pub(crate) fn new(now: Instant) -> Self {
        DrainRate {
            since: now,
            done: 0,
            last: None,
        }
    }

    /// One event done.
    pub(crate) fn count(&mut self) {
        self.done = self.done.saturating_add(1);
    }

    /// Whether nothing was done for at least [`MIN_WINDOW`]: neither in the current
    /// window (measured that long) nor in the last one closed. A tenant that is slow
    /// but writing is not idle; one whose stream is down is.
    pub(crate) fn idle(&self, now: Instant) -> bool {
        self.done == 0
            && now.saturating_duration_since(self.since) >= MIN_WINDOW
            && self.last.is_none_or(|rate| rate == 0.0)
    }

    /// Closes the window once it is [`WINDOW`] long: its rate becomes the last one and a
    /// new window begins. Called before a decision asks [`drains`](Self::drains).
    pub(crate) fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= WINDOW {
            *self = DrainRate {
                since: now,
                done: 0,
                last: Some(f64::from(self.done) / elapsed.as_secs_f64()),
            };
        }
    }

    /// Whether `held` events drain within `target` at the rate measured from `from` (or
    /// from the window's start, if later) to `now`: `None` while nothing was done in the
    /// window or less than [`MIN_WINDOW`] was measured. Reads only: the window is not
    /// rolled. Measuring from `from` (when what is held began to be read) keeps a window
    /// open since long before a burst from reading as a slow rate.
    pub(crate) fn drains_since(
        &self,
        held: usize,
        from: Instant,
        now: Instant,
        target: Duration,
    ) -> Option<bool> {
        let elapsed = now.saturating_duration_since(self.since.max(from));
        if self.done == 0 || elapsed < MIN_WINDOW {
            return None;
        }
        let rate = f64::from(self.done) / elapsed.as_secs_f64();
        Some(held as f64 <= rate * target.as_secs_f64())
    }

    /// [`drains`](Self::drains), then [`roll`](Self::roll): what a decision asks, the
    /// window closing once it is half a second long.
    pub(crate) fn drains_and_roll(&mut self, held: usize, now: Instant, target: Duration) -> bool {
        self.roll(now);
        self.drains(held, now, target)
    }

    /// Whether `held` events drain within `target` at the recent rate: the current
    /// window's once it is [`MIN_WINDOW`] long, else the last one's. Too young to tell
    /// (nothing measured that long) counts as not draining, so that a tenant that has not
    /// written anything yet is treated as a slow one.
    pub(crate) fn drains(&self, held: usize, now: Instant, target: Duration) -> bool {
        if held == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.since);
        let rate = if elapsed >= MIN_WINDOW {
            f64::from(self.done) / elapsed.as_secs_f64()
        } else {
            match self.last {
                Some(rate) => rate,
                None => return false,
            }
        };
        held as f64 <= rate * target.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn nothing_held_always_drains_and_a_rate_too_young_to_tell_does_not() {
        let t0 = Instant::now();
        let mut r = DrainRate::new(t0);
        assert!(r.drains(0, t0, SECOND));
        for _ in 0..1000 {
            r.count();
        }
        assert!(
            !r.drains(1, t0 + Duration::from_millis(50), SECOND),
            "50 ms is too short to measure"
        );
    }

    #[test]
    fn held_drains_when_the_recent_rate_clears_it_within_the_target() {
        let t0 = Instant::now();
        let mut r = DrainRate::new(t0);
        for _ in 0..200 {
            r.count();
        }
        // 200 in 200 ms: 1,000 a second.
        let t1 = t0 + Duration::from_millis(200);
        assert!(r.drains(1000, t1, SECOND));
        assert!(!r.drains(1001, t1, SECOND));
        assert!(r.drains(2000, t1, 2 * SECOND));
    }

    #[test]
    fn a_burst_after_a_quiet_while_is_measured_from_its_start() {
        let t0 = Instant::now();
        let mut r = DrainRate::new(t0);
        let burst = t0 + Duration::from_secs(10);
        let now = burst + Duration::from_millis(200);
        assert_eq!(
            r.drains_since(100, burst, now, SECOND),
            None,
            "nothing done yet"
        );
        for _ in 0..50 {
            r.count();
        }
        // 50 in the 200 ms since the burst began: 250 a second. Over the window's 10.2
        // s it would read as 5 a second.
        assert_eq!(r.drains_since(200, burst, now, SECOND), Some(true));
        assert_eq!(r.drains_since(300, burst, now, SECOND), Some(false));
        assert!(!r.drains(200, now, SECOND), "the whole window's rate");
        assert_eq!(
            r.drains_since(10, now - Duration::from_millis(50), now, SECOND),
            None,
            "under 100 ms measured"
        );
    }

    #[test]
    fn idle_means_nothing_done_for_a_measured_while() {
        let t0 = Instant::now();
        let mut r = DrainRate::new(t0);
        assert!(!r.idle(t0 + Duration::from_millis(50)), "too young to tell");
        assert!(r.idle(t0 + Duration::from_millis(150)));
        r.count();
        assert!(
            !r.idle(t0 + Duration::from_millis(150)),
            "one done: writing"
        );
        // The window closes with a rate above 0: the next one is not idle at once.
        r.roll(t0 + Duration::from_millis(600));
        assert!(r.drains(1, t0 + Duration::from_millis(600), SECOND));
        assert!(!r.idle(t0 + Duration::from_millis(800)));
    }

    #[test]
    fn a_tenant_that_stops_completing_stops_draining_within_a_window() {
        let t0 = Instant::now();
        let mut r = DrainRate::new(t0);
        for _ in 0..5000 {
            r.count();
        }
        // 10,000 a second in the first window, which is closed here.
        let t1 = t0 + Duration::from_millis(500);
        r.roll(t1);
        assert!(r.drains(5000, t1, SECOND));
        // Early in the next window the last window's rate stands in.
        assert!(r.drains(5000, t1 + Duration::from_millis(50), SECOND));
        // Then nothing completes: the rate is measured again, and it is 0.
        assert!(!r.drains(1, t1 + Duration::from_millis(150), SECOND));
    }
}
