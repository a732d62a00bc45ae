//! The consumer's callbacks, which librdkafka runs inside its poll: on a revoke, cancel
//! the revoked partitions' in-flight work and commit what is done (or keep it, when the
//! group no longer takes this pod's commits); on an assignment, commit what was kept for
//! those partitions, then start tracking and fetching; lag and broker health from the
//! statistics; client errors counted and logged once a minute per kind.
//!
//! They must return quickly and may not write to Kinesis or wait for lanes: a
//! rebalance waits for them. They run in the consume loop's task (inside its poll), so
//! the revoke's synchronous commit goes through `kafka::blocking`.

use std::sync::Arc;

use kd_kafka::auth::KafkaAuth;
use kd_telemetry::Readiness;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::broker_health::{brokers, BrokerHealth};
use crate::commits::commit_offsets;
use crate::kafka::{blocking, code_name};
use crate::log_limit::LogLimit;
use crate::offsets::OffsetTracker;
use crate::unsaved::{commit_kept, Unsaved};

/// The consumer's callbacks: commit on revoke, track assignments, report lag, count
/// errors.
pub struct WorkerContext {
    /// Told of every assignment and revoke; gives the offsets to commit on revoke.
    pub(crate) tracker: Arc<OffsetTracker>,
    /// Marked joined at the first assignment.
    pub(crate) readiness: Arc<Readiness>,
    /// Limits the consumer's error lines to one a minute per kind.
    pub(crate) errors: Arc<LogLimit>,
    /// OAUTHBEARER tokens (MSK IAM), when configured.
    pub(crate) auth: KafkaAuth,
    /// Whether any broker answers: readiness and a gauge from the statistics.
    pub(crate) brokers: BrokerHealth,
    /// Offsets of work done on partitions revoked before it could be committed.
    pub(crate) unsaved: Unsaved,
}

/// The (topic, partition) pairs of a rebalance's list.
fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// Counts a consumer error in `consumer_errors_total` and logs it once a minute per
/// kind: an unreadable partition or an unreachable broker repeats at every attempt.
pub(crate) fn consumer_error(errors: &LogLimit, e: &KafkaError, reason: &str) {
    let code = code_name(e);
    kd_telemetry::metrics()
        .consumer_errors
        .with_label_values(&[&code])
        .inc();
    if let Some(passed_over) = errors.due(&code) {
        tracing::warn!(error = %e, reason, errors_since_last_line = passed_over, "kafka consumer error");
    }
}

impl ClientContext for WorkerContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        self.auth.token()
    }

    /// Errors of the client as a whole (brokers down, a connection closed by the
    /// broker at every fetch).
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            self.brokers.all_brokers_down();
        }
        consumer_error(&self.errors, &error, reason);
    }

    fn stats(&self, stats: Statistics) {
        self.brokers.observed(brokers(&stats));
        let lag = &kd_telemetry::metrics().consumer_lag;
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 {
                    continue;
                }
                let part = partition.to_string();
                if p.consumer_lag >= 0 {
                    lag.with_label_values(&[topic.as_str(), part.as_str()])
                        .set(p.consumer_lag);
                } else {
                    let _ = lag.remove_label_values(&[topic.as_str(), part.as_str()]);
                }
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = partitions(tpl);
                // Stop the revoked partitions' in-flight work first (its next owner
                // reads it again), then commit what was done: the commit can take a
                // while, and the partitions' writes must not go on meanwhile. A commit
                // that fails (the group forgot this pod) is kept for the partitions'
                // return.
                let done = self.tracker.to_commit(Some(&revoked));
                self.tracker
                    .revoke(revoked.iter().map(|(t, p)| (t.as_str(), *p)));
                tracing::info!(partitions = ?revoked, "partitions revoked");
                if !blocking(|| commit_offsets(consumer, &self.tracker, &done)) {
                    self.unsaved.keep(&done);
                }
            }
            Rebalance::Assign(tpl) => {
                // Before reading starts (from the committed offsets), commit work done
                // on these partitions before the group lost this pod.
                let kept = self.unsaved.take(&partitions(tpl));
                if !kept.is_empty() {
                    blocking(|| commit_kept(consumer, kept));
                }
            }
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // librdkafka keeps a partition paused across reassignment; a new
                // assignment starts with nothing in flight, so it starts fetching.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!(error = %e, "cannot resume assigned partitions");
                }
                let assigned = partitions(tpl);
                self.tracker
                    .assign(assigned.iter().map(|(t, p)| (t.as_str(), *p)));
                self.readiness.set_joined_group();
                tracing::info!(partitions = ?assigned, "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance failed"),
        }
    }
}
