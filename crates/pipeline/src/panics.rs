//! A panic inside one event's write must neither end its lane (and with it the writes
//! of every later event of that user) nor lose the event: it is caught, counted in
//! `kinesis_destination_write_panics_total`, logged, and the write is tried again, up to
//! [`MAX_PANICS`] times (a write that panics every time is a bug; its event is then
//! dead-lettered rather than holding the partition back for good).

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::retry::RetryPolicy;

/// Panics of one event's write after which it is given up.
pub const MAX_PANICS: u32 = 5;

/// Why [`retrying_panics`] stopped without a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GaveUp {
    /// `cancel` ended the wait.
    Cancelled,
    /// It panicked [`MAX_PANICS`] times; the last panic's message.
    Panicked { times: u32, message: String },
}

/// Runs `attempt` until it completes without panicking, waiting as `policy` says
/// between tries.
pub async fn retrying_panics<T, F, Fut>(
    policy: &RetryPolicy,
    cancel: &CancellationToken,
    mut attempt: F,
) -> Result<T, GaveUp>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let mut tries = 0u32;
    loop {
        match AssertUnwindSafe(attempt()).catch_unwind().await {
            Ok(done) => return Ok(done),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                kd_telemetry::metrics().write_panics.inc();
                tries = tries.saturating_add(1);
                if tries >= MAX_PANICS {
                    tracing::error!(panic = %message, tries, "a write panicked again; giving it up");
                    return Err(GaveUp::Panicked {
                        times: tries,
                        message,
                    });
                }
                tracing::error!(panic = %message, tries, "a write panicked; it is tried again");
                let wait = policy.backoff(tries - 1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => return Err(GaveUp::Cancelled),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_write_is_counted_and_tried_again_until_it_completes() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            ..RetryPolicy::default()
        };
        let tries = AtomicU32::new(0);
        let before = kd_telemetry::metrics().write_panics.get();
        let done = retrying_panics(&policy, &CancellationToken::new(), || async {
            if tries.fetch_add(1, Ordering::SeqCst) < 2 {
                panic!("injected");
            }
            "written"
        })
        .await;
        assert_eq!(done, Ok("written"));
        assert_eq!(tries.load(Ordering::SeqCst), 3);
        // At least these two: other tests of this process may count theirs meanwhile.
        assert!(kd_telemetry::metrics().write_panics.get() - before >= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_ends_the_wait_after_a_panic() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let done: Result<(), GaveUp> =
            retrying_panics(&RetryPolicy::default(), &cancel, || async {
                panic!("always")
            })
            .await;
        assert_eq!(done, Err(GaveUp::Cancelled));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_always_panics_is_given_up() {
        let done: Result<(), GaveUp> = retrying_panics(
            &RetryPolicy::default(),
            &CancellationToken::new(),
            || async { panic!("bug") },
        )
        .await;
        assert_eq!(
            done,
            Err(GaveUp::Panicked {
                times: MAX_PANICS,
                message: "bug".into()
            })
        );
    }
}
