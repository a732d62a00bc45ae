//! Telemetry: the edge operators look at.
//!
//! One process-wide registry holds the metrics listed in the README (their names are part
//! of the product's contract) plus a few operational ones; every stage records into it through
//! [`metrics()`]. [`bind`] exposes `/metrics`, `/healthz` and `/readyz`. No metric
//! carries a per-source or per-user label: label values come from small fixed sets
//! (reasons, outcomes, AWS error codes, partitions).

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

/// All metrics of the worker.
pub struct Metrics {
    pub registry: Registry,
    pub events_received: IntCounter,
    pub events_delivered: IntCounter,
    pub aggregated_user_records: IntCounter,
    pub aggregated_kinesis_records: IntCounter,
    pub events_dead_lettered: IntCounterVec,
    pub put_duration: HistogramVec,
    pub delivery_latency: Histogram,
    pub put_errors: IntCounterVec,
    pub retries: IntCounter,
    pub write_panics: IntCounter,
    pub assume_role: IntCounterVec,
    pub credential_cache_hits: IntCounter,
    pub credential_cache_misses: IntCounter,
    pub rate_limit_wait_seconds: prometheus::Counter,
    pub clock_skew_seconds: prometheus::Gauge,
    pub in_flight_events: IntGauge,
    pub in_flight_bytes: IntGauge,
    pub oldest_in_flight_seconds: GaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub consumer_errors: IntCounterVec,
    pub kafka_brokers_answering: IntGauge,
    pub http_connections_closed: IntCounterVec,
    /// Tenants this pod accounts for, by delivery state (see `kd-status`).
    pub tenants: IntGaugeVec,
    /// Tenant settings loaded, valid or not.
    pub tenant_settings: IntGaugeVec,
    pub status_records: IntCounterVec,
    pub tenant_settings_errors: IntCounter,
    pub tenant_settings_records: IntCounter,
    pub commits: IntCounterVec,
    pub dead_letter_produce_seconds: Histogram,
    pub dead_letter_failures: IntCounterVec,
    pub dead_letters_truncated: IntCounter,
    pub put_records_batch_records: Histogram,
    pub fairness_skips: IntCounter,
    pub fairness_rereads: IntCounter,
    pub source_delivered: IntCounterVec,
    pub source_dead_lettered: IntCounterVec,
    pub source_put_errors: IntCounterVec,
}

const PREFIX: &str = "kinesis_destination_";

impl Metrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        // The standard process_* series (resident memory, CPU seconds, open file
        // descriptors, start time): what dashboards and alerts expect of any process.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let name = |n: &str| format!("{PREFIX}{n}");
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        // Integer counters and gauges, plain or with labels: name, help[, labels].
        macro_rules! counter {
            ($n:expr, $help:expr) => {
                reg!(IntCounter::new(name($n), $help)?)
            };
            ($n:expr, $help:expr, $labels:expr) => {
                reg!(IntCounterVec::new(Opts::new(name($n), $help), $labels)?)
            };
        }
        macro_rules! gauge {
            ($n:expr, $help:expr) => {
                reg!(IntGauge::new(name($n), $help)?)
            };
            ($n:expr, $help:expr, $labels:expr) => {
                reg!(IntGaugeVec::new(Opts::new(name($n), $help), $labels)?)
            };
        }
        Ok(Metrics {
            events_received: counter!("events_received_total", "Events read from Kafka."),
            events_delivered: counter!("events_delivered_total", "Events written to their tenant's Kinesis stream."),
            aggregated_user_records: counter!("aggregated_user_records_total", "Events written inside KPL aggregated records (tenants with aggregate)."),
            aggregated_kinesis_records: counter!("aggregated_kinesis_records_total", "KPL aggregated Kinesis records written (each holds several events)."),
            events_dead_lettered: counter!("events_dead_lettered_total", "Events produced to the dead-letter topic, by reason.", &["reason"]),
            delivery_latency: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    name("delivery_latency_seconds"),
                    "From an event's Kafka record timestamp to its acknowledged write: what lag and retries cost."
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 900.0, 3600.0, 14400.0
                ])
            )?),
            put_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    name("put_duration_seconds"),
                    "Duration of one Kinesis PutRecord or PutRecords call, by outcome."
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
                ]),
                &["outcome"]
            )?),
            put_errors: counter!("put_errors_total", "Failed Kinesis writes, by AWS error code.", &["error"]),
            retries: counter!("retries_total", "Writes retried after a retryable failure."),
            write_panics: counter!("write_panics_total", "Writes that panicked (each is caught and tried again; a bug to report)."),
            assume_role: counter!("assume_role_total", "STS AssumeRole calls, by outcome.", &["outcome"]),
            credential_cache_hits: counter!("credential_cache_hits_total", "Tenant credential lookups served from the cache."),
            credential_cache_misses: counter!("credential_cache_misses_total", "Tenant credential lookups that needed an AssumeRole."),
            rate_limit_wait_seconds: reg!(prometheus::Counter::new(
                name("rate_limit_wait_seconds_total"),
                "Time writes waited for stream capacity."
            )?),
            clock_skew_seconds: reg!(prometheus::Gauge::new(
                name("clock_skew_seconds"),
                "AWS's clock minus this machine's, as learned from AWS's answers; requests are signed in AWS's time."
            )?),
            in_flight_events: gauge!("in_flight_events", "Events read but not yet written or dead-lettered."),
            in_flight_bytes: gauge!("in_flight_bytes", "Bytes (keys and values) of the events read but not yet written or dead-lettered."),
            oldest_in_flight_seconds: reg!(GaugeVec::new(
                Opts::new(
                    name("oldest_in_flight_seconds"),
                    "How long the oldest event of a partition not yet written or dead-lettered has been waiting (0 with none)."
                ),
                &["topic", "partition"]
            )?),
            consumer_errors: counter!("consumer_errors_total", "Errors the Kafka consumer reported (undecodable batches, broker errors), by librdkafka error code.", &["error"]),
            kafka_brokers_answering: gauge!("kafka_brokers_answering", "Brokers the consumer is connected to that answered in the last 30 s (0: it cannot read; /readyz says so)."),
            http_connections_closed: counter!("http_connections_closed_total", "HTTP connections the worker closed to keep the port answering: over the per-address cap (per_address), the longest-open one closed to make room at the connection cap (evicted), or a newcomer refused while closed or not yet served ones hold their sockets (over_limit).", &["reason"]),
            consumer_lag: gauge!("consumer_lag", "Messages between the high watermark and the consumer position.", &["topic", "partition"]),
            tenants: gauge!("tenants", "Tenants this pod saw traffic of within the last hour, by delivery state at the last status interval.", &["state"]),
            tenant_settings: gauge!("tenant_settings", "Tenant settings loaded, by state (valid, invalid).", &["state"]),
            status_records: counter!("status_records_total", "Per-tenant status records produced to the status topic, by outcome.", &["outcome"]),
            tenant_settings_errors: counter!("tenant_settings_errors_total", "Tenant settings loads rejected (the last good settings stay in force)."),
            tenant_settings_records: counter!("tenant_settings_records_total", "Records applied from the tenant settings topic."),
            commits: counter!("offset_commits_total", "Kafka offset commits, by outcome.", &["outcome"]),
            dead_letter_produce_seconds: reg!(Histogram::with_opts(HistogramOpts::new(
                name("dead_letter_produce_seconds"),
                "Time to get a dead letter acknowledged by Kafka."
            ))?),
            dead_letter_failures: counter!("dead_letter_failures_total", "Dead-letter produces that failed (and are retried), by librdkafka error code.", &["error"]),
            dead_letters_truncated: counter!("dead_letters_truncated_total", "Dead letters written with their value cut to fit the dead-letter topic (the whole record is only in the input topic, until its retention ends)."),
            put_records_batch_records: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    name("put_records_batch_records"),
                    "Records per PutRecords call (tenants with usePutRecords)."
                )
                .buckets(vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0])
            )?),
            fairness_skips: counter!("fairness_skips_total", "Events left in Kafka for now because their tenant held its share of a full partition (counted at every pass)."),
            fairness_rereads: counter!("fairness_rereads_total", "Partitions read again from their first skipped event."),
            source_delivered: counter!("source_events_delivered_total", "Events delivered, for the sources in [metrics] source_labels.", &["source"]),
            source_dead_lettered: counter!("source_events_dead_lettered_total", "Events dead-lettered, for the sources in [metrics] source_labels.", &["source", "reason"]),
            source_put_errors: counter!("source_put_errors_total", "Failed writes, for the sources in [metrics] source_labels.", &["source", "error"]),
            registry,
        })
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

static METRICS: LazyLock<Metrics> =
    LazyLock::new(|| Metrics::new().expect("metric names and labels are static and valid"));

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Sources whose events are also counted per source. Off (empty) by default: a label
/// per source would be an unbounded set with 100,000 tenants. Set once, at start-up.
static SOURCE_LABELS: std::sync::OnceLock<std::collections::HashSet<String>> =
    std::sync::OnceLock::new();

/// Turns per-source metrics on for these sources (an allow-list keeps them bounded).
pub fn set_source_labels(sources: impl IntoIterator<Item = String>) {
    let _ = SOURCE_LABELS.set(sources.into_iter().collect());
}

/// `Some(source)` when the source is in the allow-list: the label value to use.
pub fn source_label(source: &str) -> Option<&str> {
    SOURCE_LABELS
        .get()
        .filter(|allowed| allowed.contains(source))
        .map(|_| source)
}

/// What `/readyz` reports: ready once tenant settings are loaded and the consumer has
/// joined its group, and no longer once shutdown has begun or while something that will
/// not go away by itself is wrong (dead letters cannot be written, the worker's own AWS
/// identity is refused).
#[derive(Debug, Default)]
pub struct Readiness {
    tenants_loaded: AtomicBool,
    joined_group: AtomicBool,
    shutting_down: AtomicBool,
    problems: std::sync::Mutex<std::collections::BTreeMap<Problem, String>>,
}

/// Conditions that take readiness away until they clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// Dead letters cannot be written (unknown topic, no authorization).
    DeadLetters,
    /// STS refuses the worker's own credentials.
    AwsIdentity,
    /// No Kafka token can be made (MSK IAM: the worker's AWS credentials expired and
    /// cannot be renewed).
    KafkaAuth,
    /// AWS refuses the worker's clock and its answers give nothing to correct it by.
    ClockSkew,
    /// No Kafka broker can be reached, or none has answered for a while (a network
    /// path that drops packets): nothing can be read.
    Kafka,
    /// No Kinesis endpoint has answered for a while, though calls were made: nothing
    /// can be written.
    AwsUnreachable,
}

impl Problem {
    /// The failing part, as `/readyz` names it to any caller.
    pub fn part(self) -> &'static str {
        match self {
            Problem::DeadLetters => "dead letters cannot be written",
            Problem::AwsIdentity => "the worker's own AWS credentials are refused",
            Problem::KafkaAuth => "no Kafka authentication token can be made",
            Problem::ClockSkew => "AWS refuses the worker's clock",
            Problem::Kafka => "kafka: no broker answering",
            Problem::AwsUnreachable => "aws: no Kinesis endpoint answering",
        }
    }
}

impl Readiness {
    pub fn set_tenants_loaded(&self) {
        self.tenants_loaded.store(true, Ordering::SeqCst);
    }
    pub fn set_joined_group(&self) {
        self.joined_group.store(true, Ordering::SeqCst);
    }
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
    /// `problem` is there (`Some(why)`), or cleared (`None`).
    pub fn set_problem(&self, problem: Problem, why: Option<String>) {
        let mut problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        match why {
            Some(why) => problems.insert(problem, why),
            None => problems.remove(&problem),
        };
    }
    /// Dead letters cannot be written (`Some(why)`), or can again (`None`).
    pub fn set_dead_letters_failing(&self, why: Option<String>) {
        self.set_problem(Problem::DeadLetters, why);
    }
    pub fn is_ready(&self) -> bool {
        self.reason().is_none()
    }
    /// What `/readyz` answers when the process is not ready: the parts that fail,
    /// named, without the errors' own text (broker addresses, topic names, AWS
    /// messages), which the logs and [`reason`](Self::reason) have. `None` when ready.
    pub fn public_reason(&self) -> Option<String> {
        self.why_not(|problem, _| problem.part().to_owned())
    }

    /// Why the process is not ready, in full (the errors' text): for logs and tests.
    /// `None` when it is ready.
    pub fn reason(&self) -> Option<String> {
        self.why_not(|_, why| why.to_owned())
    }

    /// Why the process is not ready, each problem told by `tell`; `None` when ready.
    fn why_not(&self, tell: impl Fn(Problem, &str) -> String) -> Option<String> {
        if self.shutting_down.load(Ordering::SeqCst) {
            Some("shutting down".into())
        } else if !self.tenants_loaded.load(Ordering::SeqCst) {
            Some("tenant settings not loaded".into())
        } else if !self.joined_group.load(Ordering::SeqCst) {
            Some("consumer has not joined its group".into())
        } else {
            let problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
            (!problems.is_empty()).then(|| {
                problems
                    .iter()
                    .map(|(problem, why)| tell(*problem, why))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        }
    }
}

mod http;
pub use http::bind;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_contract_metric_names() {
        let m = metrics();
        m.events_dead_lettered
            .with_label_values(&["invalid_json"])
            .inc();
        m.put_duration.with_label_values(&["ok"]).observe(0.01);
        m.put_errors.with_label_values(&["Throttling"]).inc();
        m.assume_role.with_label_values(&["ok"]).inc();
        m.consumer_lag.with_label_values(&["t", "0"]).set(3);
        m.oldest_in_flight_seconds
            .with_label_values(&["t", "0"])
            .set(1.5);
        m.consumer_errors
            .with_label_values(&["BadCompression"])
            .inc();
        m.dead_letter_failures
            .with_label_values(&["UnknownTopic"])
            .inc();
        let text = m.render();
        for name in [
            "kinesis_destination_events_received_total",
            "kinesis_destination_events_delivered_total",
            "kinesis_destination_events_dead_lettered_total{reason=\"invalid_json\"}",
            "kinesis_destination_put_duration_seconds_bucket{outcome=\"ok\"",
            "kinesis_destination_put_errors_total{error=\"Throttling\"}",
            "kinesis_destination_retries_total",
            "kinesis_destination_assume_role_total{outcome=\"ok\"}",
            "kinesis_destination_credential_cache_hits_total",
            "kinesis_destination_credential_cache_misses_total",
            "kinesis_destination_rate_limit_wait_seconds_total",
            "kinesis_destination_in_flight_events",
            "kinesis_destination_consumer_lag{partition=\"0\",topic=\"t\"}",
            "kinesis_destination_oldest_in_flight_seconds{partition=\"0\",topic=\"t\"}",
            "kinesis_destination_consumer_errors_total{error=\"BadCompression\"}",
            "kinesis_destination_dead_letter_failures_total{error=\"UnknownTopic\"}",
            "kinesis_destination_in_flight_bytes",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn readiness_needs_tenants_and_group_and_not_shutting_down() {
        let r = Readiness::default();
        assert!(!r.is_ready());
        r.set_tenants_loaded();
        assert!(!r.is_ready());
        r.set_joined_group();
        assert!(r.is_ready());
        r.set_dead_letters_failing(Some("dead-letter topic dlq: unknown topic".into()));
        assert!(!r.is_ready());
        assert_eq!(
            r.reason().as_deref(),
            Some("dead-letter topic dlq: unknown topic")
        );
        r.set_problem(Problem::AwsIdentity, Some("credentials refused".into()));
        assert_eq!(
            r.reason().as_deref(),
            Some("dead-letter topic dlq: unknown topic; credentials refused"),
            "every problem is named"
        );
        r.set_dead_letters_failing(None);
        r.set_problem(Problem::AwsIdentity, None);
        assert!(r.is_ready());
        r.set_shutting_down();
        assert!(!r.is_ready());
        assert_eq!(r.reason().as_deref(), Some("shutting down"));
    }
}
