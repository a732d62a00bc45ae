//! The worker: sets up the consumer, the dead-letter producer, the delivery lanes and
//! the periodic commits, runs the consume loop until shutdown, then shuts down in order.
//!
//! ```text
//! run ─► ConsumeLoop::run ─► route ─► lane ─► Deliverer::deliver ─► tracker ─► commits
//!            │ (flow control tick)                                     ▲
//!            └────────────── dead letters ─────────────────────────────┘
//! ```
//!
//! Each step lives in its own module: `kafka` (client configurations), `callbacks`
//! (rebalances), `consume`, `flow`, `deliver`, `commits`, `shutdown`.

use std::sync::Arc;
use std::time::Duration;

use kd_aws::KinesisWriter;
use kd_kafka::auth::{set_token_now, AuthContext};
use kd_telemetry::Readiness;
use kd_tenants::TenantStore;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use tokio_util::sync::CancellationToken;

use crate::broker_health::BrokerHealth;
use crate::callbacks::WorkerContext;
use crate::commits::commit_loop;
use crate::consume::ConsumeLoop;
use crate::dead_letter::{DeadLetterClient, DeadLetterProducer, DeadLetters};
use crate::deliver::{Deliverer, Job, Retrying};
use crate::flow::FlowControl;
use crate::kafka::{
    check_topics, consumer_config, dead_letter_max_bytes, isolation_warning, producer_config,
    status_producer_config, KafkaSettings, MissingTopic,
};
use crate::lanes::{Group, Lanes};
use crate::log_limit::LogLimit;
use crate::offsets::OffsetTracker;
use crate::retry::RetryPolicy;
use crate::route::SourceIdFrom;
use crate::shutdown::Shutdown;

/// Everything the worker needs besides its collaborators.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub kafka: KafkaSettings,
    /// Most events read but not yet written or dead-lettered, over all partitions: past
    /// it no event is read until a quarter has drained (every partition is paused if
    /// that takes more than a few seconds).
    pub max_in_flight: usize,
    /// The same in bytes (keys and values), so large records cannot exhaust memory below
    /// the event cap.
    pub max_in_flight_bytes: usize,
    /// Most events in flight from one partition: past it that partition is paused until
    /// half has drained (with fairness, tenants at their share are skipped there first,
    /// and it pauses at one share more). Memory stays bounded however long a
    /// destination is down.
    pub max_in_flight_per_partition: usize,
    /// Share (0 to 1) of a full partition's in-flight budget one tenant may hold; its
    /// further events there are skipped and read again once it drains. 1 turns
    /// fairness off.
    pub tenant_share: f64,
    /// Read the source ID from the header only, never from the body's `projectId`.
    pub require_header: bool,
    pub commit_interval: Duration,
    /// On SIGTERM, how long in-flight events may take to finish before they are
    /// abandoned (to be re-read after restart).
    pub shutdown_timeout: Duration,
    /// After that, how long the final commit and leaving the group may take together
    /// before the worker exits anyway.
    pub close_timeout: Duration,
    pub retry: RetryPolicy,
    /// Per-tenant status records, when `status.topic` is set.
    pub status: Option<StatusSettings>,
}

/// Where and how often each tenant's status is produced (see `kd-status`).
#[derive(Clone, Debug)]
pub struct StatusSettings {
    pub topic: String,
    pub interval: Duration,
}

/// Longest the last status window may take to be produced at shutdown (its flush has
/// [`kd_status::publish::FINAL_FLUSH`] of it).
const FINAL_STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Status windows without `status.interval_secs` (no status topic): the pod's view and
/// the state gauge still close them.
const DEFAULT_STATUS_WINDOW: Duration = Duration::from_secs(60);

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A Kafka client could not be created or could not subscribe.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A topic the configuration names does not exist.
    #[error(transparent)]
    MissingTopic(#[from] MissingTopic),
}

/// Creates, at 0, the series whose increase alerts and dashboards compute, so that the
/// first dead letter of a reason (or the first failed commit, or denied AssumeRole)
/// after a start counts as an increase: a series that appears at 1 shows none.
fn initialize_series() {
    let m = kd_telemetry::metrics();
    for reason in crate::Reason::ALL {
        m.events_dead_lettered.with_label_values(&[reason.as_str()]);
    }
    for outcome in ["ok", "error"] {
        m.commits.with_label_values(&[outcome]);
        m.status_records.with_label_values(&[outcome]);
        m.put_duration.with_label_values(&[outcome]);
    }
    for outcome in ["ok", "denied", "error"] {
        m.assume_role.with_label_values(&[outcome]);
    }
}

/// Most events of one user in one aggregated record: a failed write retries them all.
const MAX_AGGREGATED_EVENTS: usize = 1000;

/// Runs the worker until `shutdown` is cancelled, then drains, commits and leaves the
/// group (see "Shutdown" in the README).
pub async fn run(
    settings: WorkerSettings,
    tenants: Arc<TenantStore>,
    writer: KinesisWriter,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    initialize_series();
    let cancel_writes = CancellationToken::new();
    let tracker = Arc::new(OffsetTracker::new(cancel_writes.clone()));
    let errors = Arc::new(LogLimit::per_minute());
    let context = WorkerContext {
        tracker: tracker.clone(),
        readiness: readiness.clone(),
        errors: errors.clone(),
        auth: settings.kafka.auth.clone(),
        brokers: BrokerHealth::new(readiness.clone()),
        unsaved: Default::default(),
    };
    if let Some(warning) = isolation_warning(&settings.kafka) {
        tracing::warn!("{warning}");
    }
    let consumer: StreamConsumer<WorkerContext> =
        consumer_config(&settings.kafka).create_with_context(context)?;
    set_token_now(consumer.client(), &settings.kafka.auth);
    let consumer = Arc::new(consumer);
    let status_topic = settings.status.as_ref().map(|s| s.topic.as_str());
    check_topics(&consumer, &settings.kafka, status_topic, &shutdown).await?;
    let topics: Vec<&str> = settings.kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let producer: DeadLetterProducer = producer_config(&settings.kafka)
        .create_with_context(DeadLetterClient::new(settings.kafka.auth.clone()))?;
    set_token_now(producer.client(), &settings.kafka.auth);
    // Status windows close whether or not they are produced (the pod's view and the
    // state gauge need them); records go through a producer of their own, so that a
    // slow status topic never delays a dead letter.
    let stop_status = CancellationToken::new();
    let status_sink = match &settings.status {
        Some(s) => {
            let producer: FutureProducer<AuthContext> = status_producer_config(&settings.kafka)
                .create_with_context(AuthContext(settings.kafka.auth.clone()))?;
            set_token_now(producer.client(), &settings.kafka.auth);
            Some(kd_status::publish::Sink {
                producer,
                topic: s.topic.clone(),
            })
        }
        None => None,
    };
    let status = tokio::spawn(kd_status::publish::publish_loop(
        status_sink,
        settings
            .status
            .as_ref()
            .map_or(DEFAULT_STATUS_WINDOW, |s| s.interval),
        stop_status.clone(),
    ));
    let dead_letters = DeadLetters::new(
        producer.clone(),
        &settings.kafka.dead_letter_topic,
        settings.retry.clone(),
        readiness.clone(),
        dead_letter_max_bytes(&settings.kafka),
    );
    let record_limits = writer.clone();
    let deliverer = Arc::new(Deliverer {
        retrying: Retrying {
            writer,
            retry: settings.retry.clone(),
            tenants: tenants.clone(),
            failures: LogLimit::per_minute(),
        },
        dead_letters: dead_letters.clone(),
        tracker: tracker.clone(),
    });
    let stop_committer = CancellationToken::new();
    let committer = tokio::spawn(commit_loop(
        consumer.clone(),
        tracker.clone(),
        settings.commit_interval,
        stop_committer.clone(),
    ));

    tracing::info!(topics = ?settings.kafka.topics, group = %settings.kafka.group_id, "consuming");
    let consume = ConsumeLoop {
        consumer: consumer.clone(),
        topics: std::sync::Mutex::new(
            settings
                .kafka
                .topics
                .iter()
                .map(|t| Arc::from(t.as_str()))
                .collect(),
        ),
        tracker: tracker.clone(),
        tenants,
        source_id_from: SourceIdFrom {
            header: settings.kafka.source_id_header.clone(),
            header_only: settings.require_header,
        },
        flow: FlowControl::new(
            settings.max_in_flight_per_partition,
            settings.max_in_flight,
            settings.max_in_flight_bytes,
            settings.tenant_share,
        ),
        lanes: Lanes::new(
            move |jobs: Group<Job>| {
                let deliverer = deliverer.clone();
                async move { deliverer.deliver(jobs).await }
            },
            move |group: &[Job], next: &Job| {
                crate::deliver::joins_aggregate(group, next, MAX_AGGREGATED_EVENTS, |t| {
                    record_limits.max_record_bytes(t)
                })
            },
        ),
        dead_letters,
        errors,
    };
    consume.run(&shutdown).await;
    drop(consume);

    readiness.set_shutting_down();
    Shutdown {
        consumer,
        producer,
        tracker,
        cancel_writes,
        stop_committer,
        committer,
        shutdown_timeout: settings.shutdown_timeout,
        close_timeout: settings.close_timeout,
    }
    .run()
    .await;
    // The open status window, early: what this pod did since the last one.
    stop_status.cancel();
    match tokio::time::timeout(FINAL_STATUS_TIMEOUT, status).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the status task failed"),
        Err(_) => tracing::warn!("the last status window was not produced in time"),
    }
    tracing::info!("stopped");
    Ok(())
}
