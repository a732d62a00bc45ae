//! Test harness (dev-dependency only).
//!
//! Every end-to-end test starts its own real services on free loopback ports and stops
//! them when dropped, so tests run in parallel and never share state:
//! - [`Tansu`]: a Kafka-protocol broker (in memory; `tools/tansu` fixes its batch handling).
//! - [`Moto`]: the AWS emulator (STS and Kinesis on one endpoint).
//! - [`RecordingProxy`]: sits in front of moto and records every STS AssumeRole call, so
//!   tests can check which roles were assumed, with which external IDs, how often.
//! - [`FakeAws`]: a fast AWS fake (STS AssumeRole, Kinesis PutRecord) for what the
//!   emulator cannot show, such as a rate limit moto is too slow to reach.
//! - [`TcpProxy`]: cuts the network between clients and the broker on demand.
//! - [`Worker`]: the `kinesis-destination run` process, with signals and metrics.
//!
//! Tansu and moto must be installed (`scripts/test.sh` does it).

mod aws;
mod counting;
pub mod env;
mod fake_aws;
mod kafka;
mod proxy;
mod sasl_broker;
mod services;
mod tcp_proxy;
mod worker;

pub use aws::{StreamRecord, Streams, Tenant};
pub use counting::{live_bytes, CountingAllocator};
pub use fake_aws::{FakeAws, FakeRecord, Fault, CALLER_ACCOUNT};
pub use kafka::{Kafka, Produced, Record};
pub use proxy::{AssumeRoleCall, RecordingProxy};
pub use sasl_broker::SaslBroker;
pub use services::{free_port, Moto, Tansu};
pub use tcp_proxy::TcpProxy;
pub use worker::{
    cpu_seconds_of, http_get, metric_value, ownership, peak_rss_of, produce, Worker, WorkerConfig,
};

use std::time::{Duration, Instant};

/// Asserts that a metrics page shows no dead letter of any reason (every reason's
/// series exists from the start, at 0).
pub fn assert_nothing_dead_lettered(metrics: &str) {
    assert_eq!(
        dead_lettered(metrics),
        0.0,
        "nothing dead-lettered:\n{metrics}"
    );
}

/// Dead letters of every reason on a metrics page.
pub fn dead_lettered(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("kinesis_destination_events_dead_lettered_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
