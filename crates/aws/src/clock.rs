//! AWS's time, as the worker signs with it: the machine's clock corrected by an offset
//! learned from the `Date` header of AWS's answers, as the AWS SDKs do.
//!
//! AWS refuses a signature whose time is more than 5 minutes from its own
//! (`InvalidSignatureException`, "Signature expired" or "Signature not yet current").
//! On a node whose clock is off (a VM resumed from suspend, a broken NTP) every call
//! would be refused; with the offset, calls are signed in AWS's time instead. Every
//! answer's `Date` refines the offset; a refusal for skew sets it from the refusal's own
//! `Date` and the call is signed again at once ([`crate::api`]). An answer without a
//! `Date` leaves nothing to correct by: readiness is taken away until a call succeeds.
//!
//! The `Date` header has whole seconds, so the offset is only moved when an answer says
//! it is more than [`TOLERANCE`] off: the gauge does not wander with the rounding.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far an answer's time may be from the corrected clock before the offset moves:
/// `Date` is rounded down to the second and the answer took some time to arrive.
const TOLERANCE: Duration = Duration::from_secs(2);

/// The corrected clock, shared by every call of the process.
#[derive(Debug, Default)]
pub struct Clock {
    /// AWS's time minus the machine's, in milliseconds.
    offset_ms: AtomicI64,
    /// A refusal for skew could not be corrected (readiness is off).
    uncorrectable: AtomicBool,
    readiness: OnceLock<Arc<kd_telemetry::Readiness>>,
}

impl Clock {
    pub fn new() -> Self {
        Clock::default()
    }

    /// Takes readiness away while AWS refuses our time and gives nothing to correct it.
    pub fn set_readiness(&self, readiness: Arc<kd_telemetry::Readiness>) {
        let _ = self.readiness.set(readiness);
    }

    /// Now, in AWS's time.
    pub fn now(&self) -> SystemTime {
        shift(SystemTime::now(), self.offset_ms.load(Ordering::Relaxed))
    }

    /// AWS's time minus the machine's, in seconds.
    pub fn offset_secs(&self) -> f64 {
        self.offset_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Learns from an answer's `Date` header (`None` when it had none), received now.
    /// With `refused_for_skew`, the answer refused our time: the offset is set from it
    /// whatever the tolerance, and without a `Date` readiness is taken away. Returns
    /// whether the offset changed.
    pub fn observe(&self, date: Option<&[u8]>, refused_for_skew: bool) -> bool {
        let server = date.and_then(parse_http_date);
        let Some(server) = server else {
            if refused_for_skew {
                self.uncorrectable.store(true, Ordering::Relaxed);
                self.readiness(Some(
                    "AWS refuses the worker's clock as skewed and its answers carry no Date header to correct it by; check the node's clock (NTP)".into(),
                ));
            }
            return false;
        };
        // `Date` is rounded down: the middle of its second is the best guess.
        let server_ms = millis(server) + 500;
        let local_ms = millis(SystemTime::now());
        let offset = server_ms - local_ms;
        let current = self.offset_ms.load(Ordering::Relaxed);
        let moved = (offset - current).unsigned_abs() > TOLERANCE.as_millis() as u64;
        if moved || (refused_for_skew && offset != current) {
            self.offset_ms.store(offset, Ordering::Relaxed);
            kd_telemetry::metrics()
                .clock_skew_seconds
                .set(offset as f64 / 1000.0);
            if moved {
                tracing::warn!(
                    offset_s = offset as f64 / 1000.0,
                    "AWS's clock differs from the machine's; signing in AWS's time"
                );
            }
            return true;
        }
        false
    }

    /// A call went through: a skew problem, if there was one, is gone.
    pub fn succeeded(&self) {
        if self.uncorrectable.load(Ordering::Relaxed)
            && self.uncorrectable.swap(false, Ordering::Relaxed)
        {
            self.readiness(None);
        }
    }

    fn readiness(&self, why: Option<String>) {
        if let Some(r) = self.readiness.get() {
            r.set_problem(kd_telemetry::Problem::ClockSkew, why);
        }
    }
}

fn millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

fn shift(t: SystemTime, ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        t + d
    } else {
        t - d
    }
}

/// An HTTP date (RFC 9110's IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_http_date(raw: &[u8]) -> Option<SystemTime> {
    use aws_smithy_types::date_time::{DateTime, Format};
    let s = std::str::from_utf8(raw).ok()?;
    let t = DateTime::from_str(s.trim(), Format::HttpDate).ok()?;
    SystemTime::try_from(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http_date(t: SystemTime) -> String {
        use aws_smithy_types::date_time::{DateTime, Format};
        DateTime::from(t).fmt(Format::HttpDate).unwrap()
    }

    #[test]
    fn the_offset_follows_answers_that_are_more_than_the_tolerance_off() {
        let clock = Clock::new();
        let ahead = SystemTime::now() + Duration::from_secs(900);
        assert!(clock.observe(Some(http_date(ahead).as_bytes()), false));
        assert!(
            (clock.offset_secs() - 900.0).abs() < 2.0,
            "{}",
            clock.offset_secs()
        );
        let skewed_now = clock.now();
        let err = skewed_now
            .duration_since(SystemTime::now() + Duration::from_secs(898))
            .expect("corrected clock is ahead");
        assert!(err < Duration::from_secs(4), "{err:?}");
        // The same time again, a second later by the rounding: the offset stays.
        assert!(!clock.observe(Some(http_date(clock.now()).as_bytes()), false));
        // Behind.
        let behind = SystemTime::now() - Duration::from_secs(900);
        assert!(clock.observe(Some(http_date(behind).as_bytes()), false));
        assert!(
            (clock.offset_secs() + 900.0).abs() < 2.0,
            "{}",
            clock.offset_secs()
        );
        // An unreadable date changes nothing.
        assert!(!clock.observe(Some(b"yesterday"), false));
        assert!(!clock.observe(None, false));
    }

    #[test]
    fn a_skew_refusal_without_a_date_takes_readiness_until_a_call_succeeds() {
        let clock = Clock::new();
        let readiness = Arc::new(kd_telemetry::Readiness::default());
        readiness.set_tenants_loaded();
        readiness.set_joined_group();
        clock.set_readiness(readiness.clone());
        assert!(readiness.is_ready());
        assert!(!clock.observe(None, true));
        assert!(!readiness.is_ready());
        clock.succeeded();
        assert!(readiness.is_ready());
    }
}
