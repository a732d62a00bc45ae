//! The publisher: at the end of every window (aligned to the epoch, so every pod's
//! windows line up) the book's open windows are closed into records and produced to
//! the status topic, keyed by source ID, into the partition [`crate::partition::of`]
//! names. At shutdown the open window is closed early and produced too.
//!
//! Status is best effort: a record Kafka does not take within [`SEND_TIMEOUT`] is
//! counted and logged, never retried past it, and never holds deliveries back.

use std::time::Duration;

use futures::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use crate::record::StatusRecord;
use crate::time::now_secs;

/// How long a record may take to be acknowledged.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Records produced at once (the producer batches them).
const IN_FLIGHT: usize = 10_000;

/// Publishes every window until `stop`, then the open one. `window` is also the book's.
pub async fn publish_loop<C: ClientContext + 'static>(
    producer: FutureProducer<C>,
    topic: String,
    window: Duration,
    stop: CancellationToken,
) {
    let book = crate::book();
    book.set_window(window);
    let window = book.window_secs();
    let mut count = partitions(&producer, &topic).await.unwrap_or(1);
    loop {
        let now = now_secs();
        let next = (now / window + 1) * window;
        let stopped = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(next - now)) => false,
            _ = stop.cancelled() => true,
        };
        // The window that ends at `next` (or, at shutdown, the one still open).
        let start = if stopped {
            now_secs() / window * window
        } else {
            next - window
        };
        let records = book.close(start);
        if let Some(n) = partitions(&producer, &topic).await {
            count = n;
        }
        send_all(&producer, &topic, count, records).await;
        if stopped {
            return;
        }
    }
}

/// The status topic's partition count, as the brokers say now.
async fn partitions<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    topic: &str,
) -> Option<i32> {
    let (p, t) = (producer.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let md = p
            .client()
            .fetch_metadata(Some(&t), Duration::from_secs(5))
            .ok()?;
        let n = md
            .topics()
            .iter()
            .find(|x| x.name() == t)?
            .partitions()
            .len();
        (n > 0).then_some(n as i32)
    })
    .await
    .ok()
    .flatten()
}

/// Produces `records`, waiting for every acknowledgement (or [`SEND_TIMEOUT`]).
pub async fn send_all<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    topic: &str,
    partitions: i32,
    records: Vec<StatusRecord>,
) {
    if records.is_empty() {
        return;
    }
    let m = kd_telemetry::metrics();
    let n = records.len();
    let failed: usize = futures::stream::iter(records)
        .map(|r| async move {
            let Ok(value) = serde_json::to_vec(&r) else {
                return 1;
            };
            let record = FutureRecord::to(topic)
                .key(r.source_id.as_str())
                .partition(crate::partition::of(&r.source_id, partitions))
                .payload(&value);
            match producer.send(record, SEND_TIMEOUT).await {
                Ok(_) => 0,
                Err((e, _)) => {
                    tracing::debug!(error = %e, "status record not produced");
                    1
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .fold(0, |a, b| async move { a + b })
        .await;
    m.status_records
        .with_label_values(&["ok"])
        .inc_by((n - failed) as u64);
    if failed > 0 {
        m.status_records
            .with_label_values(&["error"])
            .inc_by(failed as u64);
        tracing::warn!(
            failed,
            of = n,
            topic,
            "status records not produced (the tenants' delivery status misses this window)"
        );
    }
}
