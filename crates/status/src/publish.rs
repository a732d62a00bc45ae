//! The publisher: at the end of every window (aligned to the epoch, so every pod's
//! windows line up) the book's open windows are closed, and with a status topic the
//! records are produced to it, keyed by source ID, into the partition
//! [`crate::partition::of`] names. Without a topic the windows are closed all the same:
//! the pod's view (`GET /tenants/{sourceId}`), the state gauge and forgetting idle
//! tenants depend on it. At shutdown the open window is closed early and produced too.
//!
//! A record covers the time since the previous close (`window_start` and
//! `window_secs` say so): a close that comes late (a slow send, a busy machine) makes
//! one longer record, never a record labelled with the wrong window.
//!
//! Status is best effort: it has a producer of its own (a slow status topic never
//! delays a dead letter), a record Kafka does not take within [`SEND_TIMEOUT`] is
//! counted and logged, never retried, and never holds deliveries back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use crate::record::StatusRecord;

/// How long a record may take to be acknowledged.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Records produced at once (the producer batches them).
const IN_FLIGHT: usize = 10_000;
/// At shutdown, how long the last records may take to leave.
pub const FINAL_FLUSH: Duration = Duration::from_secs(3);

/// Where records go: the producer and the topic.
pub struct Sink<C: ClientContext + 'static> {
    pub producer: FutureProducer<C>,
    pub topic: String,
}

/// Closes every window until `stop` (producing its records to `sink`, if any), then
/// the open one.
pub async fn publish_loop<C: ClientContext + 'static>(
    sink: Option<Sink<C>>,
    window: Duration,
    stop: CancellationToken,
) {
    let book = crate::book();
    book.set_window(window);
    let window_ms = book.window_secs() * 1000;
    let mut count = match &sink {
        Some(s) => partitions(s).await.unwrap_or(1),
        None => 1,
    };
    // The open window began here (aligned down: a pod started mid-window).
    let mut start_ms = now_ms() / window_ms * window_ms;
    loop {
        let now = now_ms();
        let next = (now / window_ms + 1) * window_ms;
        let stopped = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(next - now)) => false,
            _ = stop.cancelled() => true,
        };
        let end_ms = if stopped {
            now_ms().max(start_ms + 1000)
        } else {
            next.max(start_ms + 1000)
        };
        let (start, secs) = (start_ms / 1000, (end_ms - start_ms).div_ceil(1000));
        start_ms = end_ms / 1000 * 1000;
        let records =
            match tokio::task::spawn_blocking(move || crate::book().close(start, secs)).await {
                Ok(records) => records,
                Err(e) => {
                    tracing::error!(error = %e, "closing the status windows failed");
                    Vec::new()
                }
            };
        if let Some(sink) = &sink {
            if !stopped {
                if let Some(n) = partitions(sink).await {
                    count = n;
                }
            }
            send_all(sink, count, records, &stop, stopped).await;
        }
        if stopped {
            return;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The status topic's partition count, as the brokers say now.
async fn partitions<C: ClientContext + 'static>(sink: &Sink<C>) -> Option<i32> {
    let (p, t) = (sink.producer.clone(), sink.topic.clone());
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

/// Produces `records`, waiting for their acknowledgements (at most [`SEND_TIMEOUT`]
/// each; until `stop` for a periodic send, whose records then go with the last flush).
async fn send_all<C: ClientContext + 'static>(
    sink: &Sink<C>,
    partitions: i32,
    records: Vec<StatusRecord>,
    stop: &CancellationToken,
    last: bool,
) {
    let n = records.len();
    // Serialised off the runtime's threads: 100,000 tenants make a few tens of MB.
    let values = match tokio::task::spawn_blocking(move || {
        records
            .into_iter()
            .filter_map(|r| Some((serde_json::to_vec(&r).ok()?, r.source_id)))
            .collect::<Vec<_>>()
    })
    .await
    {
        Ok(v) => v,
        Err(_) => return,
    };
    let topic = sink.topic.as_str();
    let mut failed = n - values.len();
    let sends = futures::stream::iter(values)
        .map(|(value, key)| async move {
            let record = FutureRecord::to(topic)
                .key(key.as_str())
                .partition(crate::partition::of(&key, partitions))
                .payload(&value);
            match sink.producer.send(record, SEND_TIMEOUT).await {
                Ok(_) => 0,
                Err((e, _)) => {
                    tracing::debug!(error = %e, "status record not produced");
                    1
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .fold(0, |a, b| async move { a + b });
    let mut acknowledged = n;
    tokio::select! {
        f = sends => failed += f,
        // Shutdown: what is queued leaves with the last flush below.
        _ = stop.cancelled(), if !last => acknowledged = 0,
    }
    if last {
        let producer = sink.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(FINAL_FLUSH)).await;
    }
    let m = kd_telemetry::metrics();
    m.status_records
        .with_label_values(&["ok"])
        .inc_by(acknowledged.saturating_sub(failed) as u64);
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
