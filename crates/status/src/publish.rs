//! The publisher: at the end of every window (aligned to the epoch, so every pod's
//! windows line up) the book's open windows are closed, and with a status topic the
//! records are produced to it, keyed by source ID, into the partition
//! [`crate::partition::of`] names. Without a topic the windows are closed all the same:
//! the pod's view (`GET /tenants/{sourceId}`), the state gauge and forgetting idle
//! tenants depend on it. At shutdown the open window is closed early and produced too.
//!
//! A record covers the time since the previous close (`window_start` and
//! `window_secs` say so): a close that comes late (a slow send, a busy machine) makes
//! one longer record, never a record labelled with the wrong window. A wall clock that
//! steps back starts the next window afresh.
//!
//! Status is best effort: it has a producer of its own (a slow status topic never
//! delays a dead letter), a record Kafka does not take within the producer's
//! `message.timeout.ms` is counted and logged, never retried, and never holds
//! deliveries back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use crate::record::StatusRecord;

/// At shutdown, how long the last records may take to leave.
pub const FINAL_FLUSH: Duration = Duration::from_secs(3);
/// How long a record waits for room in a full producer queue before it is given up.
const QUEUE_WAIT: Duration = Duration::from_secs(5);
/// How long the status topic's partition count is asked for (at shutdown, 1 s: the exit
/// is waiting).
const METADATA_WAIT: Duration = Duration::from_secs(5);

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
        Some(s) => partitions(s, METADATA_WAIT).await,
        None => None,
    };
    // Records of a periodic send that shutdown interrupted: counted after the last flush.
    let mut unconfirmed: Vec<DeliveryFuture> = Vec::new();
    // The open window began here (aligned down: a pod started mid-window).
    let mut start_ms = now_ms() / window_ms * window_ms;
    loop {
        let now = now_ms();
        if now < start_ms {
            // The wall clock stepped back: the open window starts again from here.
            start_ms = now / window_ms * window_ms;
        }
        let next = (now / window_ms + 1) * window_ms;
        let stopped = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(next - now)) => false,
            _ = stop.cancelled() => true,
        };
        let end_ms = (if stopped { now_ms() } else { next }).max(start_ms + 1000);
        let (start, secs) = (start_ms / 1000, (end_ms - start_ms).div_ceil(1000));
        start_ms = end_ms / 1000 * 1000;
        let with_records = sink.is_some();
        let records = tokio::task::spawn_blocking(move || {
            let book = crate::book();
            if with_records {
                book.close(start, secs)
            } else {
                book.close_without_records();
                Vec::new()
            }
        })
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "closing the status windows failed");
            Vec::new()
        });
        if let Some(sink) = &sink {
            // At shutdown only if it was never learned (quickly: the exit is waiting).
            if !stopped || count.is_none() {
                let wait = if stopped {
                    Duration::from_secs(1)
                } else {
                    METADATA_WAIT
                };
                if let Some(n) = partitions(sink, wait).await {
                    count = Some(n);
                }
            }
            let (pending, refused) = enqueue(sink, count.unwrap_or(1), records).await;
            if stopped {
                unconfirmed.extend(pending);
                let producer = sink.producer.clone();
                let _ = tokio::task::spawn_blocking(move || producer.flush(FINAL_FLUSH)).await;
                let results: Vec<_> = unconfirmed.drain(..).map(|d| d.now_or_never()).collect();
                tally(results, refused, &sink.topic);
            } else {
                let mut results = Vec::with_capacity(pending.len());
                let mut rest = pending.into_iter();
                while let Some(mut delivery) = rest.next() {
                    tokio::select! {
                        r = &mut delivery => results.push(Some(r)),
                        // Shutdown: these leave with the last flush, and count then.
                        _ = stop.cancelled() => {
                            unconfirmed.push(delivery);
                            unconfirmed.extend(rest);
                            break;
                        }
                    }
                }
                tally(results, refused, &sink.topic);
            }
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
async fn partitions<C: ClientContext + 'static>(sink: &Sink<C>, wait: Duration) -> Option<i32> {
    let (p, t) = (sink.producer.clone(), sink.topic.clone());
    tokio::task::spawn_blocking(move || {
        let md = p.client().fetch_metadata(Some(&t), wait).ok()?;
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

/// Hands every record to the producer (serialised off the runtime's threads: 100,000
/// tenants make a few tens of MB): their confirmations, and how many could not be
/// handed over.
async fn enqueue<C: ClientContext + 'static>(
    sink: &Sink<C>,
    partitions: i32,
    records: Vec<StatusRecord>,
) -> (Vec<DeliveryFuture>, usize) {
    let n = records.len();
    let values = tokio::task::spawn_blocking(move || {
        records
            .into_iter()
            .filter_map(|r| Some((serde_json::to_vec(&r).ok()?, r.source_id)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut refused = n - values.len();
    let mut pending = Vec::with_capacity(values.len());
    for (value, key) in &values {
        let mut record = FutureRecord::to(&sink.topic)
            .key(key.as_str())
            .partition(crate::partition::of(key, partitions))
            .payload(value);
        let mut waited = Duration::ZERO;
        loop {
            match sink.producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if waited < QUEUE_WAIT =>
                {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    waited += Duration::from_millis(10);
                }
                Err((e, _)) => {
                    tracing::debug!(error = %e, "status record not produced");
                    refused += 1;
                    break;
                }
            }
        }
    }
    (pending, refused)
}

/// Counts the confirmations (`None`: not confirmed by the end of the last flush) and
/// the records refused before them.
fn tally<T, E>(
    results: Vec<Option<Result<Result<T, E>, futures::channel::oneshot::Canceled>>>,
    refused: usize,
    topic: &str,
) {
    let n = results.len() + refused;
    let ok = results
        .iter()
        .filter(|r| matches!(r, Some(Ok(Ok(_)))))
        .count();
    let failed = n - ok;
    let m = kd_telemetry::metrics();
    m.status_records
        .with_label_values(&["ok"])
        .inc_by(ok as u64);
    if failed > 0 {
        m.status_records
            .with_label_values(&["error"])
            .inc_by(failed as u64);
        tracing::warn!(
            failed,
            of = n,
            topic,
            "status records not produced (the tenants' delivery status misses them)"
        );
    }
}
