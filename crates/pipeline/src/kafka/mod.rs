//! What the worker asks of librdkafka: the `[kafka]` settings, the consumer's and the
//! dead-letter producer's client configurations built from them (ours first, the
//! operator's `[kafka.librdkafka]` over them), their check at start-up, and whether the
//! topics the configuration names exist.
//!
//! Owns no running client: the worker creates them from these configurations. What
//! every Kafka client needs (authentication, error-code names, blocking calls) is in
//! `kd-kafka`.

pub(crate) use kd_kafka::{blocking, code_name};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use crate::log_limit::LogLimit;

/// Bytes a dead letter adds to the record it carries: the `dlq.*` headers (the error
/// is one line of at most a few hundred bytes) and the record's framing, with room to
/// spare.
pub const DEAD_LETTER_ROOM: usize = 64 * 1024;

/// Kafka side of the worker: the `[kafka]` section of the configuration.
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
    /// Amazon MSK IAM: SASL/OAUTHBEARER with tokens signed from the worker's own AWS
    /// credentials (see `kd_aws::msk_iam`).
    pub aws_msk_iam: bool,
    /// The MSK cluster's region (by default, the worker's AWS region).
    pub aws_msk_region: Option<String>,
    /// The token source every client gets (set at start-up from the two above).
    #[serde(skip)]
    pub auth: kd_kafka::auth::KafkaAuth,
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
            aws_msk_iam: false,
            aws_msk_region: None,
            auth: Default::default(),
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
            .field("aws_msk_iam", &self.aws_msk_iam)
            .field("aws_msk_region", &self.aws_msk_region)
            .finish()
    }
}

/// A topic the configuration names (under `key`) that the brokers do not have.
#[derive(Debug, thiserror::Error)]
#[error("{key}: topic {topic:?} does not exist on the brokers")]
pub struct MissingTopic {
    pub key: &'static str,
    pub topic: String,
}

/// The configuration of a one-shot command's clients (replay, status): the brokers and
/// the cluster's security settings, nothing of the worker's consumer or producer.
pub fn command_client_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers);
    k.auth.configure(&mut c, &k.librdkafka);
    for (key, value) in &k.librdkafka {
        c.set(key, value);
    }
    c
}

pub(crate) fn consumer_config(k: &KafkaSettings) -> ClientConfig {
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
        // Records of aborted transactions are never delivered, whatever librdkafka's
        // default may become; only `isolation.level` itself, set by the operator, says
        // otherwise (see [`isolation_warning`]).
        .set("isolation.level", "read_committed")
        .set("statistics.interval.ms", "5000");
    k.auth.configure(&mut c, &k.librdkafka);
    for (key, value) in &k.librdkafka {
        // The statistics are how lag and an unreachable cluster are seen (`0` would
        // turn them off: a pod told every broker was down would stay unready).
        if key == "statistics.interval.ms" && value.trim() == "0" {
            continue;
        }
        c.set(key, value);
    }
    c
}

/// The warning to log at start when `[kafka.librdkafka]` sets `isolation.level` to
/// anything but `read_committed`: the consumer then delivers records of transactions
/// their producer aborted (Kafka Streams, Connect exactly-once and Debezium write in
/// transactions), which no tenant should receive.
pub fn isolation_warning(k: &KafkaSettings) -> Option<String> {
    let level = k.librdkafka.get("isolation.level")?;
    (!level.trim().eq_ignore_ascii_case("read_committed")).then(|| {
        format!(
            "kafka.librdkafka isolation.level = {level:?}: records of aborted transactions \
             will be delivered to tenants' streams"
        )
    })
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

pub(crate) fn producer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("acks", "all")
        // A produce retried after its answer was lost (a leader moving, a broker lost,
        // a connection cut) is not stored twice.
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .set("message.max.bytes", dead_letter_max_bytes(k).to_string());
    k.auth.configure(&mut c, &k.librdkafka);
    for (key, value) in &k.librdkafka {
        // Consumer-only settings would only make the producer warn.
        if !CONSUMER_ONLY.contains(&key.as_str()) {
            c.set(key, value);
        }
    }
    c
}

/// The status records' producer: the dead-letter producer's settings (idempotent, so a
/// batch retried after a lost answer is stored once and not counted twice), but a
/// record that cannot be written within 10 s is given up (status is best effort) and a
/// queue of at most 200,000 records (a window of 100,000 tenants, twice).
pub(crate) fn status_producer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = producer_config(k);
    c.set("message.timeout.ms", "10000")
        .set("queue.buffering.max.messages", "200000");
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

/// A `[kafka.librdkafka]` property librdkafka rejects. librdkafka's error is not kept as
/// a source: it carries the property's value, which may be a password.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidKafkaSetting {
    /// The property's name (empty when librdkafka does not say which).
    pub key: String,
    /// librdkafka's one-line description of what is wrong (without the value for
    /// properties that hold secrets).
    pub reason: String,
}

/// Whether a librdkafka property holds a secret (its value is never shown).
fn is_secret_property(key: &str) -> bool {
    [
        "password",
        "secret",
        "token",
        "key.pem",
        "sasl.jaas",
        "private",
    ]
    .iter()
    .any(|s| key.contains(s))
}

/// Checks the `[kafka.librdkafka]` settings without connecting anywhere: the first
/// property librdkafka rejects, with its reason.
pub fn validate_kafka(k: &KafkaSettings) -> Result<(), InvalidKafkaSetting> {
    if k.aws_msk_iam {
        // MSK IAM is SASL/OAUTHBEARER: a setting that says otherwise cannot be meant.
        let set = |key: &str| k.librdkafka.get(key).map(|v| v.to_ascii_lowercase());
        if let Some(p) = set("security.protocol").filter(|p| !p.starts_with("sasl_")) {
            return Err(InvalidKafkaSetting {
                key: "security.protocol".into(),
                reason: format!("{p} with kafka.aws_msk_iam, which needs SASL_SSL"),
            });
        }
        for key in ["sasl.mechanism", "sasl.mechanisms"] {
            if let Some(m) = set(key).filter(|m| m != "oauthbearer") {
                return Err(InvalidKafkaSetting {
                    key: key.into(),
                    reason: format!("{m} with kafka.aws_msk_iam, which needs OAUTHBEARER"),
                });
            }
        }
    }
    for config in [consumer_config(k), producer_config(k)] {
        if let Err(e) = config.create_native_config() {
            let (key, reason) = match e {
                KafkaError::ClientConfig(_, _, key, _) if is_secret_property(&key) => {
                    (key, "invalid value (not shown: it is a secret)".to_owned())
                }
                KafkaError::ClientConfig(_, desc, key, _) => (key, desc),
                other => (String::new(), other.to_string()),
            };
            return Err(InvalidKafkaSetting { key, reason });
        }
    }
    Ok(())
}

/// Waits until the brokers say whether every input topic, the dead-letter topic and the
/// status topic (when set) exist: a missing one is an error naming its configuration key (dead letters could
/// never be written, or there is nothing to read). Brokers that cannot be reached are
/// waited for, as the consumer would wait for them anyway, until shutdown.
pub(crate) async fn check_topics<C: ConsumerContext + 'static>(
    consumer: &Arc<StreamConsumer<C>>,
    k: &KafkaSettings,
    status_topic: Option<&str>,
    shutdown: &CancellationToken,
) -> Result<(), MissingTopic> {
    // A subscription pattern (`^events-.*`) may match nothing yet: not checked.
    let wanted: Vec<(&'static str, String)> = k
        .topics
        .iter()
        .filter(|t| !t.starts_with('^'))
        .map(|t| ("kafka.topics", t.clone()))
        .chain([("kafka.dead_letter_topic", k.dead_letter_topic.clone())])
        .chain(status_topic.map(|t| ("status.topic", t.to_owned())))
        .collect();
    let log = LogLimit::per_minute();
    let mut token_set = std::time::Instant::now();
    loop {
        // Nothing polls the consumer yet: a wait longer than a token's life (15 min
        // with MSK IAM) needs a new one given directly.
        if token_set.elapsed() >= Duration::from_secs(60) {
            kd_kafka::auth::set_token_now(consumer.client(), &k.auth);
            token_set = std::time::Instant::now();
        }
        let (c, w) = (consumer.clone(), wanted.clone());
        match tokio::task::spawn_blocking(move || missing_topic(&*c, &w)).await {
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some((key, topic)))) => return Err(MissingTopic { key, topic }),
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_consumer_reads_committed_records_only_unless_the_operator_says_otherwise() {
        let mut k = KafkaSettings::default();
        // A passthrough copied from a Kafka Streams application, say.
        k.librdkafka
            .insert("fetch.wait.max.ms".into(), "100".into());
        assert_eq!(
            consumer_config(&k).get("isolation.level"),
            Some("read_committed")
        );
        assert_eq!(isolation_warning(&k), None);
        k.librdkafka
            .insert("isolation.level".into(), "read_committed".into());
        assert_eq!(isolation_warning(&k), None);
        k.librdkafka
            .insert("isolation.level".into(), "read_uncommitted".into());
        assert_eq!(
            consumer_config(&k).get("isolation.level"),
            Some("read_uncommitted"),
            "the operator's word"
        );
        let warning = isolation_warning(&k).expect("a warning");
        assert!(warning.contains("aborted transactions"), "{warning}");
        assert!(
            producer_config(&k).get("isolation.level").is_none(),
            "a consumer-only setting"
        );
    }

    #[test]
    fn a_rejected_librdkafka_property_is_named_with_its_reason() {
        let mut k = KafkaSettings::default();
        k.librdkafka
            .insert("fetch.wait.max.ms".into(), "soon".into());
        let e = validate_kafka(&k).unwrap_err();
        assert_eq!(e.key, "fetch.wait.max.ms");
        assert!(e.reason.contains("Invalid value"), "{}", e.reason);
        assert!(is_secret_property("sasl.password") && is_secret_property("ssl.key.password"));
        assert!(!is_secret_property("fetch.wait.max.ms"));
    }

    #[test]
    fn oidc_oauthbearer_is_built_in() {
        // librdkafka handles OIDC itself (with libcurl, which it is built with).
        let mut k = KafkaSettings::default();
        for (key, value) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "OAUTHBEARER"),
            ("sasl.oauthbearer.method", "oidc"),
            ("sasl.oauthbearer.client.id", "kinesis-destination"),
            ("sasl.oauthbearer.client.secret", "s3cr3t"),
            (
                "sasl.oauthbearer.token.endpoint.url",
                "https://idp.example.com/oauth2/token",
            ),
            ("sasl.oauthbearer.scope", "kafka"),
        ] {
            k.librdkafka.insert(key.into(), value.into());
        }
        if let Err(e) = validate_kafka(&k) {
            panic!("{}: {}", e.key, e.reason);
        }
    }

    #[test]
    fn msk_iam_refuses_a_protocol_or_mechanism_that_is_not_its_own() {
        let mut k = KafkaSettings {
            aws_msk_iam: true,
            ..Default::default()
        };
        assert!(validate_kafka(&k).is_ok());
        k.librdkafka
            .insert("security.protocol".into(), "SASL_PLAINTEXT".into());
        assert!(
            validate_kafka(&k).is_ok(),
            "SASL without TLS: a test broker"
        );
        k.librdkafka
            .insert("sasl.mechanism".into(), "SCRAM-SHA-512".into());
        assert_eq!(validate_kafka(&k).unwrap_err().key, "sasl.mechanism");
        k.librdkafka.remove("sasl.mechanism");
        k.librdkafka
            .insert("security.protocol".into(), "ssl".into());
        assert_eq!(validate_kafka(&k).unwrap_err().key, "security.protocol");
    }
}
