//! Whether AWS answers at all. A Kinesis call that times out or cannot connect says
//! little about AWS as a whole: one region may be down or black-holed while the others
//! answer, and their tenants are served meanwhile (the pod stays ready: no other pod
//! would do better). But when every call to any endpoint has gone unanswered for
//! [`Reach::silent_for`], nothing can be written from this pod:
//! `/readyz` says so and a warning is logged once a minute, until an answer comes.
//! Any answer counts, a refusal too: the network path works.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Reach {
    start: Instant,
    /// When the calls since the last answer began to go unanswered, in milliseconds
    /// since `start`, plus one (0: the last call was answered).
    unanswered_since: AtomicU64,
    /// Readiness is taken away.
    silent: AtomicBool,
    /// When the silence was last logged.
    logged: Mutex<Option<Instant>>,
    silent_for: Duration,
    readiness: OnceLock<Arc<kd_telemetry::Readiness>>,
}

impl Default for Reach {
    fn default() -> Self {
        Reach::new(Duration::from_secs(60))
    }
}

impl Reach {
    /// No answer for `silent_for`, with calls made, is AWS unreachable.
    pub fn new(silent_for: Duration) -> Self {
        Reach {
            start: Instant::now(),
            unanswered_since: AtomicU64::new(0),
            silent: AtomicBool::new(false),
            logged: Mutex::new(None),
            silent_for,
            readiness: OnceLock::new(),
        }
    }

    /// For an attempt timeout of `attempt`: six attempts' worth, 30 s at least.
    pub fn for_attempt_timeout(attempt: Duration) -> Self {
        Reach::new((attempt * 6).max(Duration::from_secs(30)))
    }

    pub fn set_readiness(&self, readiness: Arc<kd_telemetry::Readiness>) {
        let _ = self.readiness.set(readiness);
    }

    fn since_start(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64
    }

    /// An answer came (any status).
    pub fn answered(&self) {
        self.answered_at(Instant::now());
    }

    fn answered_at(&self, _now: Instant) {
        if self.unanswered_since.load(Ordering::Relaxed) != 0 {
            self.unanswered_since.store(0, Ordering::Relaxed);
        }
        if self.silent.load(Ordering::Relaxed) && self.silent.swap(false, Ordering::Relaxed) {
            *self.logged.lock().unwrap_or_else(|p| p.into_inner()) = None;
            if let Some(r) = self.readiness.get() {
                r.set_problem(kd_telemetry::Problem::AwsUnreachable, None);
            }
            tracing::info!("AWS answers again");
        }
    }

    /// A call got no answer: it timed out, or no connection could be made.
    pub fn unanswered(&self) {
        self.unanswered_at(Instant::now());
    }

    fn unanswered_at(&self, now: Instant) {
        // The silence is the run of unanswered calls since the last answer, not the
        // time since that answer: after a quiet night the first timeout is not one.
        let now_ms = self.since_start(now) + 1;
        let since = match self.unanswered_since.compare_exchange(
            0,
            now_ms,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => now_ms,
            Err(since) => since,
        };
        let silent = Duration::from_millis(now_ms.saturating_sub(since));
        if silent < self.silent_for {
            return;
        }
        let why = format!(
            "aws: no answer from any Kinesis endpoint for {} s: nothing can be written",
            silent.as_secs()
        );
        if !self.silent.swap(true, Ordering::Relaxed) {
            if let Some(r) = self.readiness.get() {
                r.set_problem(kd_telemetry::Problem::AwsUnreachable, Some(why.clone()));
            }
        }
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY) {
            *logged = Some(now);
            tracing::warn!("{why}");
        }
    }

    /// Whether AWS is taken as unreachable now.
    pub fn is_silent(&self) -> bool {
        self.silent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_only_after_a_whole_run_of_unanswered_calls_and_back_at_the_first_answer() {
        let readiness = Arc::new(kd_telemetry::Readiness::default());
        readiness.set_tenants_loaded();
        readiness.set_joined_group();
        let reach = Reach::new(Duration::from_secs(30));
        reach.set_readiness(readiness.clone());
        let t0 = reach.start;
        let at = |s: u64| t0 + Duration::from_secs(s);
        reach.answered_at(at(10));
        // A quiet hour, then a timeout: the run of silence begins now.
        reach.unanswered_at(at(3_600));
        assert!(readiness.is_ready() && !reach.is_silent());
        reach.unanswered_at(at(3_620));
        // Another region answers meanwhile: the run ends.
        reach.answered_at(at(3_625));
        reach.unanswered_at(at(3_640));
        reach.unanswered_at(at(3_669));
        assert!(readiness.is_ready(), "29 s of silence");
        reach.unanswered_at(at(3_671));
        assert!(reach.is_silent());
        assert!(readiness
            .reason()
            .unwrap()
            .contains("no answer from any Kinesis endpoint for 31 s"));
        reach.answered_at(at(3_680));
        assert!(readiness.is_ready() && !reach.is_silent());
    }

    #[test]
    fn the_silence_is_six_attempts_long_at_least_30_s() {
        assert_eq!(
            Reach::for_attempt_timeout(Duration::from_secs(10)).silent_for,
            Duration::from_secs(60)
        );
        assert_eq!(
            Reach::for_attempt_timeout(Duration::from_secs(2)).silent_for,
            Duration::from_secs(30)
        );
    }
}
