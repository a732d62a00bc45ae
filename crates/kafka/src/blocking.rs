//! Synchronous librdkafka calls from async code.

/// Runs a librdkafka call that may block (a synchronous commit, a seek) from a task: on
/// the multi-threaded runtime the worker's other tasks (the lane task it would run next
/// among them) move to another worker meanwhile. Elsewhere (a blocking thread, a
/// single-threaded test runtime) it just runs it.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
