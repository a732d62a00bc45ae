//! Commits: the offsets the tracker says are done (every earlier offset of the
//! partition written or dead-lettered) go to Kafka every `commit_interval`, on revoke and
//! at shutdown. A failed commit hands its offsets back to the tracker for the next one.
//!
//! Commits are synchronous librdkafka calls: callers run them on a blocking thread, or,
//! on a revoke, inside librdkafka's rebalance callback, which runs in the consume loop's
//! task and so through [`crate::kafka::blocking`].

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::offsets::OffsetTracker;

/// Commits the tracker's committable offsets (all partitions, or `only` these).
pub(crate) fn commit<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    tracker: &OffsetTracker,
    only: Option<&[(String, i32)]>,
) {
    let _ = commit_offsets(consumer, tracker, &tracker.to_commit(only));
}

/// Commits offsets taken from the tracker (handing them back to it if the commit fails).
/// Whether they were committed.
pub(crate) fn commit_offsets<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    tracker: &OffsetTracker,
    offsets: &[(Arc<str>, i32, i64)],
) -> bool {
    let committed = try_commit(consumer, offsets);
    if !committed {
        tracker.commit_failed(offsets);
    }
    committed
}

/// Commits `offsets` synchronously, counting and logging the outcome. Whether they
/// were committed (nothing to commit counts as done).
pub(crate) fn try_commit<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    offsets: &[(Arc<str>, i32, i64)],
) -> bool {
    if offsets.is_empty() {
        return true;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in offsets {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(error = %e, "cannot build commit list");
            return false;
        }
    }
    let m = kd_telemetry::metrics();
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            m.commits.with_label_values(&["ok"]).inc();
            tracing::debug!(?offsets, "offsets committed");
            true
        }
        Err(e) => {
            m.commits.with_label_values(&["error"]).inc();
            tracing::warn!(error = %e, "offset commit failed; will retry");
            false
        }
    }
}

/// Commits what is committable every `interval` until `stop`.
pub(crate) async fn commit_loop<X: ConsumerContext + 'static>(
    consumer: Arc<StreamConsumer<X>>,
    tracker: Arc<OffsetTracker>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let (consumer, tracker) = (consumer.clone(), tracker.clone());
        let _ = tokio::task::spawn_blocking(move || commit(&*consumer, &tracker, None)).await;
    }
}
