//! A records/s and bytes/s budget whose rate adapts (AIMD): cut by a fifth at a
//! throttle, a tenth of the full rate back per quiet second.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Lowest share of the full rate AIMD goes down to.
const MIN_FACTOR: f64 = 0.1;
/// What a throttled answer multiplies the rate by. Gentle, because one throttle often
/// comes from requests bunched in flight (new connections at start-up), not a wrong rate;
/// repeated throttles still bring the rate down fast (0.8^n, once per second).
const DECREASE: f64 = 0.8;

/// A records/s and bytes/s budget whose rate can be lowered and raised.
pub(super) struct Bucket {
    pub(super) full_records: f64,
    pub(super) full_bytes: f64,
    pub(super) state: Mutex<BucketState>,
    pub(super) limiters: ArcSwap<(
        DefaultDirectRateLimiter,
        DefaultDirectRateLimiter,
        NonZeroU32,
    )>,
}

pub(super) struct BucketState {
    pub(super) factor: f64,
    /// Tokio's clock, so tests can move it (paused time).
    pub(super) last_change: tokio::time::Instant,
}

/// Share of a budget actually used: headroom for clocks and for counting windows that do
/// not line up with ours.
pub(super) const HEADROOM: f64 = 0.95;

/// The clock every limiter reads: a limiter made with its own asks the CPU what it
/// supports (CPUID) each time, which cost more than the rest of a cold tenant's
/// limiters.
static CLOCK: std::sync::LazyLock<governor::clock::QuantaClock> =
    std::sync::LazyLock::new(governor::clock::QuantaClock::default);

/// A limiter on the shared clock.
pub(super) fn direct(quota: Quota) -> DefaultDirectRateLimiter {
    RateLimiter::direct_with_clock(quota, CLOCK.clone())
}

pub(super) fn limiters(
    records: f64,
    bytes: f64,
) -> (
    DefaultDirectRateLimiter,
    DefaultDirectRateLimiter,
    NonZeroU32,
) {
    let r = NonZeroU32::new((records * HEADROOM).max(1.0) as u32).unwrap_or(NonZeroU32::MIN);
    let b = NonZeroU32::new((bytes * HEADROOM).max(1024.0) as u32).unwrap_or(NonZeroU32::MIN);
    // Bursts of a twentieth of a second: Kinesis counts over a sliding second, so a
    // full second's burst followed by the steady rate would overrun it.
    let burst = |n: NonZeroU32| NonZeroU32::new((n.get() / 20).max(1)).unwrap_or(NonZeroU32::MIN);
    // A byte burst must still let one maximum-size (1 MiB) record through eventually.
    let byte_burst = burst(b).max(NonZeroU32::new(64 * 1024).unwrap_or(NonZeroU32::MIN));
    (
        direct(Quota::per_second(r).allow_burst(burst(r))),
        direct(Quota::per_second(b).allow_burst(byte_burst)),
        byte_burst,
    )
}

impl Bucket {
    /// A bucket that starts spent: its first grants come at its pace, not as a burst.
    pub(super) fn new_spent(records: f64, bytes: f64) -> Bucket {
        let b = Bucket::new(records, bytes);
        let l = b.limiters.load();
        let _ = l.0.check_n(
            NonZeroU32::new((records * HEADROOM / 20.0).max(1.0) as u32).unwrap_or(NonZeroU32::MIN),
        );
        let _ = l.1.check_n(l.2);
        drop(l);
        b
    }

    pub(super) fn new(records: f64, bytes: f64) -> Bucket {
        Bucket {
            full_records: records,
            full_bytes: bytes,
            state: Mutex::new(BucketState {
                factor: 1.0,
                last_change: tokio::time::Instant::now(),
            }),
            limiters: ArcSwap::from_pointee(limiters(records, bytes)),
        }
    }

    /// Returns when it first had to wait, if it did.
    pub(super) async fn acquire(&self, bytes: usize) -> Option<Instant> {
        self.recover();
        let mut waited = None;
        // A token counts only if it came from the limiter in force: one granted by a
        // limiter that AIMD replaced meanwhile is taken again from the new one, or the
        // waiters of both would proceed at both paces.
        let l = loop {
            let l = self.limiters.load_full();
            waited = waited.or(ready(&l.0, NonZeroU32::MIN).await);
            if Arc::ptr_eq(&l, &self.limiters.load()) {
                break l;
            }
        };
        // A record larger than the byte burst takes its size in burst-sized steps.
        let mut left = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
        while left > 0 {
            let n = left.min(l.2.get());
            left -= n;
            // `n` is at most the burst, so the only error (InsufficientCapacity) cannot occur.
            waited = waited.or(ready(&l.1, NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)).await);
        }
        waited
    }

    pub(super) fn set_factor(&self, state: &mut BucketState, factor: f64) {
        state.factor = factor;
        state.last_change = tokio::time::Instant::now();
        let fresh = limiters(self.full_records * factor, self.full_bytes * factor);
        // A new limiter would allow a full burst at once on top of what the old one let
        // through this second: start it spent, so the pace just changes.
        let _ = fresh.0.check_n(
            NonZeroU32::new((self.full_records * factor * HEADROOM / 20.0).max(1.0) as u32)
                .unwrap_or(NonZeroU32::MIN),
        );
        let _ = fresh.1.check_n(fresh.2);
        self.limiters.store(Arc::new(fresh));
    }

    /// Multiplicative decrease, at most once per second (a burst of throttles is one signal).
    pub(super) fn throttled(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.last_change.elapsed() >= Duration::from_secs(1) || s.factor >= 1.0 {
            let f = (s.factor * DECREASE).max(MIN_FACTOR);
            self.set_factor(&mut s, f);
        }
    }

    /// Additive increase: a tenth of the full rate back per quiet second.
    pub(super) fn recover(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.factor < 1.0 && s.last_change.elapsed() >= Duration::from_secs(1) {
            let f = (s.factor + 0.1).min(1.0);
            self.set_factor(&mut s, f);
        }
    }

    #[cfg(test)]
    pub(super) fn factor(&self) -> f64 {
        self.state.lock().unwrap().factor
    }
}

/// Waits until `limiter` grants `n` cells (at most its burst). Waits on tokio's timer:
/// governor's own `until_ready` sleeps on a timer thread of its own, and waking it cost
/// more CPU than the writes themselves at tens of thousands of records a second.
/// Returns when it began to wait, if it had to (`Instant::now` is read only then).
pub(super) async fn ready(limiter: &DefaultDirectRateLimiter, n: NonZeroU32) -> Option<Instant> {
    use governor::clock::Clock;
    let mut waited = None;
    loop {
        match limiter.check_n(n) {
            Ok(Ok(())) => return waited,
            Ok(Err(not_until)) => {
                waited = waited.or_else(|| Some(Instant::now()));
                let wait = not_until.wait_time_from(limiter.clock().now());
                tokio::time::sleep(wait).await;
            }
            // More than the burst: cannot happen (callers ask for at most the burst).
            Err(_) => return waited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttling_cuts_the_rate_and_quiet_seconds_restore_it() {
        let second = Duration::from_secs(1);
        let b = Bucket::new(1000.0, 1e6);
        b.throttled();
        assert_eq!(b.factor(), 0.8);
        b.throttled();
        assert_eq!(b.factor(), 0.8, "one decrease per second");
        tokio::time::advance(second).await;
        b.throttled();
        assert!((b.factor() - 0.64).abs() < 1e-9);
        b.recover();
        assert!(
            (b.factor() - 0.64).abs() < 1e-9,
            "no increase within the second"
        );
        tokio::time::advance(second).await;
        b.recover();
        assert!(
            (b.factor() - 0.74).abs() < 1e-9,
            "a tenth back per quiet second"
        );
        for _ in 0..20 {
            tokio::time::advance(second).await;
            b.recover();
        }
        assert_eq!(b.factor(), 1.0, "never above the full rate");
        for _ in 0..20 {
            tokio::time::advance(second).await;
            b.throttled();
        }
        assert_eq!(b.factor(), MIN_FACTOR, "never below the floor");
    }
}
