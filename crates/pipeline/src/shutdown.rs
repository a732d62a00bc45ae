//! Shutdown, in the order that loses nothing: stop fetching, let in-flight writes finish
//! (or abandon them at `shutdown_timeout`, to be read again by the partition's next
//! owner), cancel what is left, commit what is done, leave the group. Committing and
//! leaving share one budget (`close_timeout`), so the whole exit takes at most
//! `shutdown_timeout + close_timeout` even when the brokers cannot be reached.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::callbacks::WorkerContext;
use crate::commits::commit;
use crate::dead_letter::DeadLetterProducer;
use crate::offsets::OffsetTracker;

/// What the worker hands over to be shut down.
pub(crate) struct Shutdown {
    pub consumer: Arc<StreamConsumer<WorkerContext>>,
    pub producer: DeadLetterProducer,
    pub tracker: Arc<OffsetTracker>,
    /// Cancels every in-flight write (through the tracker's per-partition tokens).
    pub cancel_writes: CancellationToken,
    /// Stops the periodic commits, whose task is `committer`.
    pub stop_committer: CancellationToken,
    pub committer: JoinHandle<()>,
    pub shutdown_timeout: Duration,
    pub close_timeout: Duration,
}

impl Shutdown {
    pub async fn run(self) {
        self.drain().await;
        self.cancel_writes.cancel();
        self.stop_committer.cancel();
        self.close().await;
    }

    /// Stops fetching by pausing every partition, but keeps polling the consumer while
    /// the writes finish: a rebalance during the drain is then served (its revoke cancels
    /// the partitions' work) instead of the group handing them over behind our back.
    async fn drain(&self) {
        let deadline = Instant::now() + self.shutdown_timeout;
        let (consumer, tracker) = (&self.consumer, &self.tracker);
        tracing::info!(
            in_flight = tracker.in_flight(),
            "shutting down: draining in-flight events"
        );
        if let Ok(assigned) = consumer.assignment() {
            if let Err(e) = consumer.pause(&assigned) {
                tracing::warn!(error = %e, "cannot pause partitions for shutdown");
            }
        }
        while tracker.in_flight() > 0 && Instant::now() < deadline {
            tokio::select! {
                // Nothing should arrive from paused partitions; anything that does is
                // left, unacknowledged, for the partition's next reader.
                _ = consumer.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let abandoned = tracker.in_flight();
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "shutdown deadline reached; abandoned events will be re-read after restart"
            );
        }
    }

    /// The final commit and leaving the group. A commit blocks while the broker is
    /// unreachable: every step has the one deadline, and the process leaves even then
    /// (uncommitted events are read again by the partition's next owner).
    async fn close(self) {
        let deadline = Instant::now() + self.close_timeout;
        if tokio::time::timeout_at(deadline, self.committer)
            .await
            .is_err()
        {
            tracing::warn!("periodic commit still blocked at shutdown");
        }
        let final_commit = {
            let (consumer, tracker) = (self.consumer.clone(), self.tracker.clone());
            tokio::task::spawn_blocking(move || commit(&*consumer, &tracker, None))
        };
        if tokio::time::timeout_at(deadline, final_commit)
            .await
            .is_err()
        {
            tracing::warn!("final offset commit timed out");
        }
        // Nothing is read or written from here on; the group may hand the partitions over.
        tracing::info!("leaving the consumer group");
        // Leaving the group (librdkafka's close) runs when the last handle drops.
        let (consumer, producer) = (self.consumer, self.producer);
        let leave = tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            drop(consumer);
            let _ = rdkafka::producer::Producer::flush(&producer, Duration::from_secs(5));
        });
        if tokio::time::timeout_at(deadline, leave).await.is_err() {
            tracing::warn!("leaving the consumer group timed out");
        }
    }
}
