//! The worker: one Kafka consumer feeding routes, lanes and acknowledgements.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kd_aws::{ErrorClass, KinesisWriter};
use kd_event::PartitionKey;
use kd_telemetry::Readiness;
use kd_tenants::{TenantSettings, TenantStore};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dead_letter::{
    code_name, DeadLetter, DeadLetterClient, DeadLetterProducer, DeadLetters, Reason,
    DEAD_LETTER_ROOM,
};
use crate::lanes::Lanes;
use crate::log_limit::LogLimit;
use crate::offsets::{Admission, Budget, Fairness, FlowInput, Held, OffsetTracker, Ticket};
use crate::panics::{retrying_panics, GaveUp};
use crate::retry::RetryPolicy;
use crate::route::{route, SourceIdFrom};

/// Kafka side of the worker: the `[kafka]` section of the configuration (SPEC 2).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    pub dead_letter_topic: String,
    pub source_id_header: String,
    /// Passed to librdkafka verbatim, after our defaults (so they can override them):
    /// security, SASL, TLS, timeouts.
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            bootstrap_servers: "127.0.0.1:9092".into(),
            group_id: "kinesis-destination".into(),
            topics: vec!["segment-events".into()],
            dead_letter_topic: "segment-events-dlq".into(),
            source_id_header: "source_id".into(),
            librdkafka: BTreeMap::new(),
        }
    }
}

/// The librdkafka properties may hold credentials (`sasl.password`,
/// `ssl.key.password`, ...): their values never show in `Debug`, only their names.
impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("source_id_header", &self.source_id_header)
            .field("librdkafka", &self.librdkafka.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Everything the worker needs besides its collaborators.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub kafka: KafkaSettings,
    /// Most events read but not yet written or dead-lettered, over all partitions: past
    /// it every partition is paused until a quarter has drained.
    pub max_in_flight: usize,
    /// The same in bytes (keys and values): past it every partition is paused until a
    /// quarter has drained, so large records cannot exhaust memory below the event cap.
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
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A topic the configuration names (under `key`) that the brokers do not have.
    #[error("{key}: topic {topic:?} does not exist on the brokers")]
    MissingTopic { key: &'static str, topic: String },
}

/// The consumer's callbacks: commit on revoke, track assignments, report lag, count
/// errors.
pub struct WorkerContext {
    tracker: Arc<OffsetTracker>,
    readiness: Arc<Readiness>,
    errors: Arc<LogLimit>,
}

/// Counts a consumer error in `consumer_errors_total` and logs it once a minute per
/// kind: an unreadable partition or an unreachable broker repeats at every attempt.
fn consumer_error(errors: &LogLimit, e: &KafkaError, reason: &str) {
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
    /// Errors of the client as a whole (brokers down, a connection closed by the
    /// broker at every fetch).
    fn error(&self, error: KafkaError, reason: &str) {
        consumer_error(&self.errors, &error, reason);
    }

    fn stats(&self, stats: Statistics) {
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
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            // Stop the revoked partitions' in-flight work first (its next owner reads it
            // again), then commit what was done: the commit can take a while, and the
            // partitions' writes must not go on meanwhile.
            let done = self.tracker.to_commit(Some(&revoked));
            self.tracker
                .revoke(revoked.iter().map(|(t, p)| (t.as_str(), *p)));
            tracing::info!(partitions = ?revoked, "partitions revoked");
            commit_offsets(consumer, &self.tracker, done);
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
                let assigned: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
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

/// Commits the tracker's committable offsets (all partitions, or `only` these).
fn commit<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    tracker: &OffsetTracker,
    only: Option<&[(String, i32)]>,
) {
    commit_offsets(consumer, tracker, tracker.to_commit(only));
}

/// Commits offsets taken from the tracker (handing them back to it if the commit fails).
fn commit_offsets<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    tracker: &OffsetTracker,
    offsets: Vec<(Arc<str>, i32, i64)>,
) {
    if offsets.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in &offsets {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(error = %e, "cannot build commit list");
            tracker.commit_failed(&offsets);
            return;
        }
    }
    let m = kd_telemetry::metrics();
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            m.commits.with_label_values(&["ok"]).inc();
            tracing::debug!(?offsets, "offsets committed");
        }
        Err(e) => {
            m.commits.with_label_values(&["error"]).inc();
            tracker.commit_failed(&offsets);
            tracing::warn!(error = %e, "offset commit failed; will retry");
        }
    }
}

/// One event on its way to Kinesis.
struct Job {
    msg: OwnedMessage,
    ticket: Ticket,
    tenant: Arc<TenantSettings>,
    key: PartitionKey,
}

/// Writes events, retrying as the policy says, and acknowledges them.
struct Deliverer {
    writer: KinesisWriter,
    dead_letters: DeadLetters,
    tracker: Arc<OffsetTracker>,
    retry: RetryPolicy,
    /// Looked up again before each retry: settings may change during a retry window.
    tenants: Arc<TenantStore>,
}

enum Outcome {
    Written,
    DeadLetter(DeadLetter),
    Cancelled,
}

impl Deliverer {
    /// The settings in force now for the tenant an event was routed to: the same `Arc`
    /// while they did not change. A tenant removed or made invalid meanwhile is a dead
    /// letter (`unknown_source`, `invalid_settings`), as its next event would be.
    fn current_settings(
        &self,
        routed_with: &Arc<TenantSettings>,
    ) -> Result<Arc<TenantSettings>, DeadLetter> {
        let source = routed_with.source_id.as_str();
        match self.tenants.snapshot().get(source) {
            // The same settings (usually the very same `Arc`: a pointer comparison on
            // the per-event path; equal after a reload that changed nothing else).
            Some(kd_tenants::TenantEntry::Valid(t))
                if Arc::ptr_eq(t, routed_with) || **t == **routed_with =>
            {
                Ok(routed_with.clone())
            }
            Some(kd_tenants::TenantEntry::Valid(t)) => Ok(t.clone()),
            Some(kd_tenants::TenantEntry::Invalid { reason }) => Err(DeadLetter::new(
                Reason::InvalidSettings,
                format!("settings became invalid while the event was retried: {reason}"),
            )
            .of_source(source)),
            None => Err(DeadLetter::new(
                Reason::UnknownSource,
                format!("source {source:?} was removed while its event was retried"),
            )
            .of_source(source)),
        }
    }
}

impl Deliverer {
    async fn deliver(&self, job: Job) {
        let cancel = &job.ticket.cancel;
        // One retry window for the event, across panics too, counted from when it was
        // produced: a rebalance or a restart does not start it again.
        let started = Instant::now();
        let give_up_at = self
            .retry
            .give_up_at(produced_at(&job.msg), SystemTime::now(), started);
        let outcome = match retrying_panics(&self.retry, cancel, || {
            self.write_with_retries(&job, started, give_up_at)
        })
        .await
        {
            Ok(outcome) => outcome,
            Err(GaveUp::Cancelled) => Outcome::Cancelled,
            // A write that panics every time is a bug that would otherwise hold the
            // partition's commits back for good: the event goes to the dead letters.
            Err(GaveUp::Panicked { times, message }) => Outcome::DeadLetter(
                DeadLetter::new(
                    Reason::RetriesExhausted,
                    format!("the write panicked {times} times: {message}"),
                )
                .of_source(job.tenant.source_id.as_str()),
            ),
        };
        match outcome {
            Outcome::Written => {
                let m = kd_telemetry::metrics();
                m.events_delivered.inc();
                if let Some(source) = kd_telemetry::source_label(job.tenant.source_id.as_str()) {
                    m.source_delivered.with_label_values(&[source]).inc();
                }
                self.tracker.done(&job.ticket);
            }
            Outcome::DeadLetter(dl) => {
                if self
                    .dead_letters
                    .send(&job.msg, &dl, &job.ticket.cancel)
                    .await
                {
                    self.tracker.done(&job.ticket);
                }
            }
            // Abandoned at shutdown: not acknowledged, so it is read again on restart.
            Outcome::Cancelled => {}
        }
    }

    async fn write_with_retries(
        &self,
        job: &Job,
        started: Instant,
        give_up_at: Instant,
    ) -> Outcome {
        let data = job.msg.payload().unwrap_or_default();
        let mut permanent_since: Option<Instant> = None;
        let mut attempt = 0u32;
        let cancel = &job.ticket.cancel;
        let mut tenant = job.tenant.clone();
        loop {
            // Revoked or shutting down: leave the event to the partition's next reader.
            if cancel.is_cancelled() {
                return Outcome::Cancelled;
            }
            // Every attempt uses the settings in force now: an event may have waited in
            // its lane behind a retrying one, and one user's events must all follow a
            // change of stream together.
            match self.current_settings(&tenant) {
                Ok(current) => {
                    if !Arc::ptr_eq(&current, &tenant) {
                        tracing::info!(source_id = %tenant.source_id, "tenant settings changed; writing with the new ones");
                        // A new role, secret, region or stream: the old ones' failures
                        // say nothing about the new ones.
                        permanent_since = None;
                        tenant = current;
                    }
                }
                Err(dl) => return Outcome::DeadLetter(dl),
            }
            let result = tokio::select! {
                r = self.writer.put_record(&tenant, &job.key, data) => r,
                _ = cancel.cancelled() => return Outcome::Cancelled,
            };
            let err = match result {
                Ok(_) => return Outcome::Written,
                Err(e) => e,
            };
            match err.class {
                ErrorClass::Permanent => {
                    let since = *permanent_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.retry.permanent_window {
                        return Outcome::DeadLetter(
                            DeadLetter::new(Reason::DestinationRejected, err.to_string())
                                .of_source(tenant.source_id.as_str()),
                        );
                    }
                }
                ErrorClass::Retryable | ErrorClass::ExpiredCredentials => {
                    permanent_since = None;
                    if Instant::now() >= give_up_at {
                        let age = produced_at(&job.msg)
                            .and_then(|p| SystemTime::now().duration_since(p).ok())
                            .unwrap_or_else(|| started.elapsed());
                        return Outcome::DeadLetter(
                            DeadLetter::new(
                                Reason::RetriesExhausted,
                                format!(
                                    "still failing {}s after the event was produced ({}s of retries by this worker); last error {err}",
                                    age.as_secs(),
                                    started.elapsed().as_secs()
                                ),
                            )
                            .of_source(tenant.source_id.as_str()),
                        );
                    }
                }
            }
            tracing::debug!(source_id = %tenant.source_id, attempt, error = %err, "write failed; retrying");
            kd_telemetry::metrics().retries.inc();
            let wait = self.retry.backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return Outcome::Cancelled,
            }
        }
    }
}

/// When the event was produced, from its Kafka record's timestamp (create or log-append
/// time); `None` when it has none.
fn produced_at(msg: &OwnedMessage) -> Option<SystemTime> {
    let millis = msg.timestamp().to_millis()?;
    let millis = u64::try_from(millis).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(millis))
}

fn consumer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("group.id", &k.group_id)
        // Offsets are committed by the tracker, never by librdkafka on its own.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // A rebalance revokes only the partitions that move: the others' in-flight
        // writes go on (with an eager strategy every member drops all its work).
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("statistics.interval.ms", "5000");
    for (key, value) in &k.librdkafka {
        c.set(key, value);
    }
    c
}

/// librdkafka's default `receive.message.max.bytes`: the largest fetch response, and so
/// the largest record, the consumer takes.
const LIBRDKAFKA_RECEIVE_MAX: usize = 100_000_000;
/// librdkafka's upper bound for `message.max.bytes`.
const LIBRDKAFKA_MESSAGE_MAX: usize = 1_000_000_000;

/// The dead-letter producer's `message.max.bytes`: the largest record the consumer may
/// take (its `receive.message.max.bytes`, at least `fetch.max.bytes` + 512) plus room for
/// the dead-letter headers, unless `[kafka.librdkafka]` sets `message.max.bytes`.
pub fn dead_letter_max_bytes(k: &KafkaSettings) -> usize {
    let get = |key: &str| {
        k.librdkafka
            .get(key)
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    if let Some(set) = get("message.max.bytes") {
        return set;
    }
    let largest_input = get("receive.message.max.bytes").unwrap_or_else(|| {
        LIBRDKAFKA_RECEIVE_MAX.max(get("fetch.max.bytes").map_or(0, |f| f + 512))
    });
    (largest_input + DEAD_LETTER_ROOM).min(LIBRDKAFKA_MESSAGE_MAX)
}

fn producer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .set("message.max.bytes", dead_letter_max_bytes(k).to_string());
    for (key, value) in &k.librdkafka {
        // Consumer-only settings would only make the producer warn.
        if !CONSUMER_ONLY.contains(&key.as_str()) {
            c.set(key, value);
        }
    }
    c
}

const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "auto.offset.reset",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.commit.interval.ms",
    "partition.assignment.strategy",
    "fetch.min.bytes",
    "fetch.wait.max.ms",
    "fetch.max.bytes",
    "max.partition.fetch.bytes",
    "isolation.level",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "statistics.interval.ms",
];

/// Checks the `[kafka.librdkafka]` settings without connecting anywhere: the property
/// name and a one-line reason for the first one librdkafka rejects.
pub fn validate_kafka(k: &KafkaSettings) -> Result<(), (String, String)> {
    for config in [consumer_config(k), producer_config(k)] {
        match config.create_native_config() {
            Ok(_) => {}
            Err(KafkaError::ClientConfig(_, desc, key, _)) => return Err((key, desc)),
            Err(e) => return Err((String::new(), e.to_string())),
        }
    }
    Ok(())
}

/// Waits until the brokers say whether every input topic and the dead-letter topic
/// exist: a missing one is an error naming its configuration key (dead letters could
/// never be written, or there is nothing to read). Brokers that cannot be reached are
/// waited for, as the consumer would wait for them anyway, until shutdown.
async fn check_topics(
    consumer: &Arc<StreamConsumer<WorkerContext>>,
    k: &KafkaSettings,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    // A subscription pattern (`^events-.*`) may match nothing yet: not checked.
    let wanted: Vec<(&'static str, String)> = k
        .topics
        .iter()
        .filter(|t| !t.starts_with('^'))
        .map(|t| ("kafka.topics", t.clone()))
        .chain([("kafka.dead_letter_topic", k.dead_letter_topic.clone())])
        .collect();
    let log = LogLimit::per_minute();
    loop {
        let (c, w) = (consumer.clone(), wanted.clone());
        match tokio::task::spawn_blocking(move || missing_topic(&*c, &w)).await {
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some((key, topic)))) => return Err(WorkerError::MissingTopic { key, topic }),
            Ok(Err(e)) => {
                if log.due("metadata").is_some() {
                    tracing::warn!(error = %e, "cannot ask the brokers whether the topics exist; waiting for them");
                }
            }
            Err(e) => tracing::error!(error = %e, "topic check failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// The first of `wanted` (configuration key, topic) the brokers say they do not have.
fn missing_topic<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    wanted: &[(&'static str, String)],
) -> Result<Option<(&'static str, String)>, KafkaError> {
    use rdkafka::error::RDKafkaErrorCode as Code;
    for (key, topic) in wanted {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let found = metadata.topics().iter().find(|t| t.name() == topic);
        let error = found.and_then(|t| t.error()).map(Code::from);
        match (found, error) {
            (Some(t), None) if !t.partitions().is_empty() => {}
            (None, _)
            | (Some(_), None)
            | (Some(_), Some(Code::UnknownTopicOrPartition | Code::UnknownTopic)) => {
                return Ok(Some((key, topic.clone())))
            }
            (Some(_), Some(code)) => return Err(KafkaError::MetadataFetch(code)),
        }
    }
    Ok(None)
}

/// Runs the worker until `shutdown` is cancelled, then drains, commits and leaves the
/// group (SPEC 9).
pub async fn run(
    settings: WorkerSettings,
    tenants: Arc<TenantStore>,
    writer: KinesisWriter,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let cancel = CancellationToken::new();
    let tracker = Arc::new(OffsetTracker::new(cancel.clone()));
    let consumer_errors = Arc::new(LogLimit::per_minute());
    let context = WorkerContext {
        tracker: tracker.clone(),
        readiness: readiness.clone(),
        errors: consumer_errors.clone(),
    };
    let consumer: StreamConsumer<WorkerContext> =
        consumer_config(&settings.kafka).create_with_context(context)?;
    let consumer = Arc::new(consumer);
    check_topics(&consumer, &settings.kafka, &shutdown).await?;
    let topics: Vec<&str> = settings.kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let producer: DeadLetterProducer =
        producer_config(&settings.kafka).create_with_context(DeadLetterClient::default())?;

    let dead_letters = DeadLetters::new(
        producer.clone(),
        &settings.kafka.dead_letter_topic,
        settings.retry.clone(),
        readiness.clone(),
        dead_letter_max_bytes(&settings.kafka),
    );
    let deliverer = Arc::new(Deliverer {
        writer,
        dead_letters: dead_letters.clone(),
        tracker: tracker.clone(),
        retry: settings.retry.clone(),
        tenants: tenants.clone(),
    });
    let lanes = {
        let deliverer = deliverer.clone();
        Lanes::new(move |job: Job| {
            let deliverer = deliverer.clone();
            async move { deliverer.deliver(job).await }
        })
    };

    let stop_committer = CancellationToken::new();
    let committer = tokio::spawn(commit_loop(
        consumer.clone(),
        tracker.clone(),
        settings.commit_interval,
        stop_committer.clone(),
    ));

    tracing::info!(topics = ?settings.kafka.topics, group = %settings.kafka.group_id, "consuming");
    let flow = FlowControl::new(
        settings.max_in_flight_per_partition,
        settings.max_in_flight,
        settings.max_in_flight_bytes,
        settings.tenant_share,
    );
    let source_id_from = SourceIdFrom {
        header: settings.kafka.source_id_header.clone(),
        header_only: settings.require_header,
    };
    // The tick resumes drained partitions, and also keeps calling into librdkafka while
    // every partition is paused: it must be polled within max.poll.interval.ms or it
    // leaves the group.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                flow.reread_drained(&*consumer, &tracker);
                flow.apply(&*consumer, &tracker);
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    tracker.publish_oldest_in_flight();
                }
                continue;
            }
            m = consumer.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m.detach(),
            Err(e) => {
                // An undecodable batch or a partition the broker will not serve repeats
                // at every fetch.
                consumer_error(&consumer_errors, &e, "fetch");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let routed = route(&msg, &tenants.snapshot(), &source_id_from);
        let source = routed.as_ref().ok().map(|r| r.tenant.source_id.shared());
        let bytes = msg.payload().map_or(0, <[u8]>::len) + msg.key().map_or(0, <[u8]>::len);
        let ticket = match tracker.admit(
            msg.topic(),
            msg.partition(),
            msg.offset(),
            bytes,
            source.as_ref(),
            flow.fairness,
        ) {
            Admission::Handle(ticket) => ticket,
            // Read again after a skip, or not ours: nothing to do (not even count it).
            other => {
                if matches!(other, Admission::Skip) {
                    kd_telemetry::metrics().fairness_skips.inc();
                }
                tracing::trace!(offset = msg.offset(), partition = msg.partition(), admission = ?other, "not handled");
                continue;
            }
        };
        kd_telemetry::metrics().events_received.inc();
        if flow.over(&tracker, msg.topic(), msg.partition()) {
            flow.apply(&*consumer, &tracker);
        }
        match routed {
            Ok(routed) => {
                let lane = (routed.tenant.source_id.clone(), routed.key.clone());
                lanes.push(
                    lane,
                    Job {
                        msg,
                        ticket,
                        tenant: routed.tenant,
                        key: routed.key,
                    },
                );
            }
            Err(dl) => {
                let (dead_letters, tracker) = (dead_letters.clone(), tracker.clone());
                tokio::spawn(async move {
                    if dead_letters.send(&msg, &dl, &ticket.cancel).await {
                        tracker.done(&ticket);
                    }
                });
            }
        }
    }

    // SPEC 9: stop fetching, finish (or abandon) in-flight writes, commit, leave.
    readiness.set_shutting_down();
    let deadline = Instant::now() + settings.shutdown_timeout;
    tracing::info!(
        in_flight = tracker.in_flight(),
        "shutting down: draining in-flight events"
    );
    // Stop fetching by pausing every partition, but keep polling the consumer while the
    // writes finish: a rebalance during the drain is then served (its revoke cancels the
    // partitions' work) instead of the group handing them over behind our back.
    if let Ok(assigned) = consumer.assignment() {
        if let Err(e) = consumer.pause(&assigned) {
            tracing::warn!(error = %e, "cannot pause partitions for shutdown");
        }
    }
    while tracker.in_flight() > 0 && Instant::now() < deadline {
        tokio::select! {
            // Nothing should arrive from paused partitions; anything that does is left,
            // unacknowledged, for the partition's next reader.
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
    cancel.cancel();
    stop_committer.cancel();
    // Committing and leaving share one budget (`close_timeout`), so the whole exit takes
    // at most `shutdown_timeout + close_timeout`. A commit blocks while the broker is
    // unreachable: every step has this deadline, and the process leaves even then
    // (uncommitted events are read again by the partition's next owner).
    let close_deadline = tokio::time::Instant::now() + settings.close_timeout;
    if tokio::time::timeout_at(close_deadline, committer)
        .await
        .is_err()
    {
        tracing::warn!("periodic commit still blocked at shutdown");
    }
    let final_commit = {
        let consumer = consumer.clone();
        let tracker = tracker.clone();
        tokio::task::spawn_blocking(move || commit(&*consumer, &tracker, None))
    };
    if tokio::time::timeout_at(close_deadline, final_commit)
        .await
        .is_err()
    {
        tracing::warn!("final offset commit timed out");
    }
    // Nothing is read or written from here on; the group may hand the partitions over.
    tracing::info!("leaving the consumer group");
    // Leaving the group (librdkafka's close) runs when the last handle drops.
    let close = tokio::task::spawn_blocking(move || {
        consumer.unsubscribe();
        drop(consumer);
        let _ = rdkafka::producer::Producer::flush(&producer, Duration::from_secs(5));
    });
    if tokio::time::timeout_at(close_deadline, close)
        .await
        .is_err()
    {
        tracing::warn!("leaving the consumer group timed out");
    }
    drop(lanes);
    tracing::info!("stopped");
    Ok(())
}

/// Backpressure: pause a partition with too many events or bytes in flight (or all of
/// them when the totals are too high), resume it once enough have drained.
struct FlowControl {
    /// Held in flight in one partition at which it is paused.
    per_partition: Budget,
    /// Held in flight over all partitions at which every partition is paused.
    total: Budget,
    fairness: Option<Fairness>,
}

impl FlowControl {
    /// A partition may hold the same share of the byte budget as of the event budget
    /// (`total_bytes × per_partition / total`). With fairness (`tenant_share` below 1),
    /// a partition is contended once its budget is used up; tenants at their share are
    /// skipped there from then on, and the others may add up to one share more before
    /// the partition pauses.
    fn new(per_partition: usize, total: usize, total_bytes: usize, tenant_share: f64) -> Self {
        let total = Budget {
            events: total.max(1),
            bytes: total_bytes.max(1),
        };
        let per_partition = per_partition.max(1);
        let partition_share = (per_partition as f64 / total.events as f64).min(1.0);
        let budget = Budget {
            events: per_partition,
            bytes: ((total.bytes as f64 * partition_share) as usize).max(1),
        };
        let fairness = (tenant_share < 1.0).then(|| Fairness {
            contended_at: budget,
            per_source: budget.share(tenant_share),
            max_handled_ahead: per_partition.saturating_mul(50),
        });
        FlowControl {
            per_partition: match fairness {
                Some(f) => Budget {
                    events: budget.events + f.per_source.events,
                    bytes: budget.bytes.saturating_add(f.per_source.bytes),
                },
                None => budget,
            },
            total,
            fairness,
        }
    }

    /// Whether the partition just read from may need pausing.
    fn over(&self, tracker: &OffsetTracker, topic: &str, partition: i32) -> bool {
        tracker
            .held_in(topic, partition)
            .is_some_and(|held| self.per_partition.reached_by(held))
            || self.total.reached_by(tracker.held())
    }

    /// Reads partitions again from their first skipped offset once the tenants skipped
    /// there have drained below their share, or the partition to half its budget.
    fn reread_drained<C: Consumer<X>, X: ConsumerContext>(
        &self,
        consumer: &C,
        tracker: &OffsetTracker,
    ) {
        let Some(f) = self.fairness else { return };
        let half = Budget {
            events: f.contended_at.events.div_ceil(2),
            bytes: f.contended_at.bytes.div_ceil(2),
        };
        for (topic, partition, from) in tracker.skips_to_reread(half, f.per_source) {
            match consumer.seek(
                &topic,
                partition,
                Offset::Offset(from),
                Duration::from_secs(1),
            ) {
                Ok(()) => {
                    tracker.reread_from(&topic, partition, from);
                    kd_telemetry::metrics().fairness_rereads.inc();
                    tracing::debug!(%topic, partition, from, "reading skipped events again");
                }
                // The skip stays in force (its tenants' events are still skipped) and is
                // offered again at the next tick.
                Err(e) => {
                    tracing::warn!(%topic, partition, from, error = %e, "cannot seek back to skipped events; will retry");
                }
            }
        }
    }

    /// Pauses and resumes partitions as their in-flight counts say.
    fn apply<C: Consumer<X>, X: ConsumerContext>(&self, consumer: &C, tracker: &OffsetTracker) {
        let max_ahead = self.fairness.map_or(usize::MAX, |f| f.max_handled_ahead);
        let (pause, resume) = tracker.rebalance_flow(|f: &FlowInput| {
            // Skipping ahead is bounded too: the offsets handled past a skip are kept.
            let too_far_ahead = f.skipping && f.handled_ahead >= max_ahead;
            let (partition, total) = (
                Held {
                    events: f.in_flight,
                    bytes: f.bytes,
                },
                Held {
                    events: f.total,
                    bytes: f.total_bytes,
                },
            );
            if f.paused {
                // Hysteresis: resume only well below the caps, so a partition does not
                // flap between paused and fetching on every event.
                f.in_flight > self.per_partition.events / 2
                    || f.bytes > self.per_partition.bytes / 2
                    || f.total > self.total.events / 4 * 3
                    || f.total_bytes > self.total.bytes / 4 * 3
                    || too_far_ahead
            } else {
                self.per_partition.reached_by(partition)
                    || self.total.reached_by(total)
                    || too_far_ahead
            }
        });
        for (list, paused) in [(pause, true), (resume, false)] {
            if list.is_empty() {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            for (topic, partition) in &list {
                tpl.add_partition(topic, *partition);
            }
            let result = if paused {
                consumer.pause(&tpl)
            } else {
                consumer.resume(&tpl)
            };
            match result {
                Ok(()) => tracing::info!(partitions = ?list, paused, "backpressure"),
                Err(e) => tracing::warn!(error = %e, paused, "cannot pause or resume partitions"),
            }
        }
    }
}

async fn commit_loop(
    consumer: Arc<StreamConsumer<WorkerContext>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn a_partition_gets_the_share_of_the_byte_budget_it_has_of_the_event_budget() {
        let flow = FlowControl::new(2000, 20_000, 256 * MIB, 0.5);
        let f = flow.fairness.unwrap();
        let partition = 256 * MIB / 10;
        assert_eq!(
            f.contended_at,
            Budget {
                events: 2000,
                bytes: partition
            }
        );
        assert_eq!(
            f.per_source,
            Budget {
                events: 1000,
                bytes: partition / 2
            }
        );
        assert_eq!(
            flow.per_partition,
            Budget {
                events: 3000,
                bytes: partition + partition / 2
            },
            "with fairness, the others may add one share before the partition pauses"
        );
        let off = FlowControl::new(2000, 20_000, 256 * MIB, 1.0);
        assert!(off.fairness.is_none());
        assert_eq!(
            off.per_partition,
            Budget {
                events: 2000,
                bytes: partition
            }
        );
        // A partition budget above the total gets the whole byte budget, not more.
        let wide = FlowControl::new(30_000, 20_000, 256 * MIB, 1.0);
        assert_eq!(wide.per_partition.bytes, 256 * MIB);
    }

    #[test]
    fn the_dead_letter_producer_takes_what_the_consumer_may_read_plus_header_room() {
        let mut k = KafkaSettings::default();
        assert_eq!(dead_letter_max_bytes(&k), 100_000_000 + DEAD_LETTER_ROOM);
        k.librdkafka
            .insert("fetch.max.bytes".into(), "200000000".into());
        assert_eq!(
            dead_letter_max_bytes(&k),
            200_000_512 + DEAD_LETTER_ROOM,
            "librdkafka raises receive.message.max.bytes to fetch.max.bytes + 512"
        );
        k.librdkafka
            .insert("receive.message.max.bytes".into(), "2000000".into());
        assert_eq!(dead_letter_max_bytes(&k), 2_000_000 + DEAD_LETTER_ROOM);
        k.librdkafka
            .insert("message.max.bytes".into(), "1000000".into());
        assert_eq!(dead_letter_max_bytes(&k), 1_000_000, "the operator's word");
        assert!(validate_kafka(&KafkaSettings::default()).is_ok());
    }
}
