//! Log lines for conditions that repeat (a partition that cannot be read, a dead-letter
//! topic that refuses writes): the first occurrence of each kind is logged at once, then
//! at most one line per interval, with how many were passed over.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Decides, per kind of condition, whether to log it now.
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    seen: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug)]
struct Seen {
    logged_at: Instant,
    passed_over: u64,
}

impl LogLimit {
    pub fn new(every: Duration) -> Self {
        LogLimit {
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// One line a minute per kind.
    pub fn per_minute() -> Self {
        LogLimit::new(Duration::from_secs(60))
    }

    /// `Some(occurrences passed over since the last line)` when `kind` is to be logged
    /// now; `None` when it was logged less than an interval ago.
    pub fn due(&self, kind: &str) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(kind) {
            Some(s) if now.duration_since(s.logged_at) < self.every => {
                s.passed_over += 1;
                None
            }
            Some(s) => {
                let passed = s.passed_over;
                s.logged_at = now;
                s.passed_over = 0;
                Some(passed)
            }
            None => {
                seen.insert(
                    kind.to_owned(),
                    Seen {
                        logged_at: now,
                        passed_over: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_each_kind_once_per_interval_and_counts_what_it_passed_over() {
        let limit = LogLimit::new(Duration::from_millis(50));
        assert_eq!(limit.due("a"), Some(0));
        assert_eq!(limit.due("a"), None);
        assert_eq!(limit.due("a"), None);
        assert_eq!(limit.due("b"), Some(0), "kinds are limited separately");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limit.due("a"), Some(2));
        assert_eq!(limit.due("a"), None);
    }
}
