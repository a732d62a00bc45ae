//! Dead letters: events that cannot be delivered, kept for inspection and replay.
//!
//! A dead letter is the original record (key, value, headers) produced to the
//! dead-letter topic with the `dlq.*` headers added (see "Dead letters" in the README). Producing the original back to
//! the input topic (without the `dlq.*` headers) replays it. An event counts as done
//! only once Kafka has acknowledged its dead letter.
//!
//! A dead letter too large for the dead-letter topic is written with its value cut to
//! what fits (`dlq.truncated`, `dlq.original_size`): the original stays findable by its
//! `dlq.topic`, `dlq.partition` and `dlq.offset`. Any other failure is retried; one
//! that will not go away by itself (unknown topic, no authorization) also takes the
//! worker's readiness away until a dead letter is written again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kd_telemetry::Readiness;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use tokio_util::sync::CancellationToken;

use crate::log_limit::LogLimit;
use crate::record::Record;
use crate::retry::RetryPolicy;

/// Bytes a dead letter adds to the record it carries: the `dlq.*` headers (the error
/// is one line of at most a few hundred bytes) and the record's framing, with room to
/// spare.
pub const DEAD_LETTER_ROOM: usize = 64 * 1024;

/// Kafka's default largest record (`message.max.bytes` of a broker, `max.message.bytes`
/// of a topic): a refused dead letter is cut to this first.
const KAFKA_DEFAULT_MAX_MESSAGE: usize = 1_048_588;

/// Why an event was dead-lettered: the values of the `dlq.reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    InvalidJson,
    MissingSourceId,
    UnknownSource,
    InvalidSettings,
    MissingPartitionKey,
    RecordTooLarge,
    UnsupportedType,
    DestinationRejected,
    RetriesExhausted,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::InvalidJson,
        Reason::MissingSourceId,
        Reason::UnknownSource,
        Reason::InvalidSettings,
        Reason::MissingPartitionKey,
        Reason::RecordTooLarge,
        Reason::UnsupportedType,
        Reason::DestinationRejected,
        Reason::RetriesExhausted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid_json",
            Reason::MissingSourceId => "missing_source_id",
            Reason::UnknownSource => "unknown_source",
            Reason::InvalidSettings => "invalid_settings",
            Reason::MissingPartitionKey => "missing_partition_key",
            Reason::RecordTooLarge => "record_too_large",
            Reason::UnsupportedType => "unsupported_type",
            Reason::DestinationRejected => "destination_rejected",
            Reason::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// A decision to dead-letter an event, with the one-line explanation for `dlq.error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: Reason,
    pub error: String,
    /// The source it belongs to, when known (for per-source metrics only).
    pub source: Option<String>,
}

impl DeadLetter {
    pub fn new(reason: Reason, error: impl Into<String>) -> Self {
        DeadLetter {
            reason,
            error: kd_event::text::one_line(&error.into()),
            source: None,
        }
    }

    pub fn of_source(mut self, source: &str) -> Self {
        self.source = Some(source.to_owned());
        self
    }
}

/// The headers of a dead letter: the original ones, then `dlq.reason`, `dlq.error`,
/// `dlq.topic`, `dlq.partition`, `dlq.offset`; for a value cut to fit,
/// `dlq.truncated = true` and `dlq.original_size` (bytes of the original value).
pub fn dead_letter_headers(
    original: &Record,
    dl: &DeadLetter,
    truncated_from: Option<usize>,
) -> OwnedHeaders {
    let mut headers = original.headers_to_produce(|_| true);
    let partition = original.partition().to_string();
    let offset = original.offset().to_string();
    for (key, value) in [
        ("dlq.reason", dl.reason.as_str()),
        ("dlq.error", dl.error.as_str()),
        ("dlq.topic", original.topic()),
        ("dlq.partition", partition.as_str()),
        ("dlq.offset", offset.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    if let Some(size) = truncated_from {
        headers = headers
            .insert(Header {
                key: "dlq.truncated",
                value: Some("true"),
            })
            .insert(Header {
                key: "dlq.original_size",
                value: Some(&size.to_string()),
            });
    }
    headers
}

/// What a failed dead-letter produce calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The record is larger than the producer or the topic accepts: cut it.
    TooLarge,
    /// Will not succeed until someone acts (unknown topic, authorization, policy).
    Stuck,
    /// May succeed if tried again (broker down, timeouts, leader changes).
    Transient,
}

fn classify(code: Option<RDKafkaErrorCode>) -> Failure {
    use RDKafkaErrorCode as C;
    match code {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => Failure::TooLarge,
        Some(
            C::UnknownTopicOrPartition
            | C::UnknownTopic
            | C::UnknownPartition
            | C::UnknownTopicId
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::Authentication
            | C::SaslAuthenticationFailed
            | C::PolicyViolation
            | C::InvalidRecord
            | C::UnsupportedForMessageFormat
            // The idempotent producer failed for good (its producer ID refused, the
            // broker without idempotence, sequence numbers out of step): every send
            // fails the same way until the process starts again.
            | C::Fatal,
        ) => Failure::Stuck,
        _ => Failure::Transient,
    }
}

/// The next, smaller value size to try for a dead letter of `value_len` bytes that was
/// refused as too large: first what the producer's own limit leaves room for, then
/// what a broker with Kafka's default limit accepts, then halves. `None` when even an
/// empty value was refused.
fn cut_to(value_len: usize, other_bytes: usize, producer_max: usize) -> Option<usize> {
    if value_len == 0 {
        return None;
    }
    let room = other_bytes + DEAD_LETTER_ROOM;
    [
        producer_max.saturating_sub(room),
        KAFKA_DEFAULT_MAX_MESSAGE.saturating_sub(room),
    ]
    .into_iter()
    .find(|&n| n < value_len)
    .or(Some(value_len / 2))
}

/// The librdkafka name of an error's code, for metric labels and log limits (a small
/// fixed set).
pub(crate) fn code_name(e: &KafkaError) -> String {
    e.rdkafka_error_code()
        .map_or_else(|| "Other".to_owned(), |c| format!("{c:?}"))
}

/// The dead-letter producer's client callbacks: its client-wide errors (brokers down)
/// are logged once a minute per kind, not at every reconnection attempt.
#[derive(Debug)]
pub struct DeadLetterClient {
    errors: LogLimit,
    /// OAUTHBEARER tokens (MSK IAM), when configured.
    auth: kd_tenants::kafka_auth::KafkaAuth,
}

impl DeadLetterClient {
    pub fn new(auth: kd_tenants::kafka_auth::KafkaAuth) -> Self {
        DeadLetterClient {
            errors: LogLimit::per_minute(),
            auth,
        }
    }
}

impl Default for DeadLetterClient {
    fn default() -> Self {
        DeadLetterClient::new(Default::default())
    }
}

impl rdkafka::ClientContext for DeadLetterClient {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        self.auth.token()
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(passed_over) = self.errors.due(&code_name(&error)) {
            tracing::warn!(error = %error, reason, errors_since_last_line = passed_over, "dead-letter producer error");
        }
    }
}

/// The producer dead letters are written with.
pub type DeadLetterProducer = FutureProducer<DeadLetterClient>;

/// Produces dead letters and waits for Kafka to confirm them.
#[derive(Clone)]
pub struct DeadLetters {
    producer: DeadLetterProducer,
    topic: Arc<str>,
    retry: RetryPolicy,
    readiness: Arc<Readiness>,
    /// The producer's `message.max.bytes`.
    max_message_bytes: usize,
    log: Arc<LogLimit>,
}

impl DeadLetters {
    pub fn new(
        producer: DeadLetterProducer,
        topic: &str,
        retry: RetryPolicy,
        readiness: Arc<Readiness>,
        max_message_bytes: usize,
    ) -> Self {
        DeadLetters {
            producer,
            topic: topic.into(),
            retry,
            readiness,
            max_message_bytes,
            log: Arc::new(LogLimit::per_minute()),
        }
    }

    /// Produces the dead letter, retrying for as long as it takes (an event is never
    /// acknowledged without its dead letter), with its value cut to fit if the topic
    /// refuses it as too large. `false` only when shutdown cancelled it.
    pub async fn send(
        &self,
        original: &Record,
        dl: &DeadLetter,
        cancel: &CancellationToken,
    ) -> bool {
        let m = kd_telemetry::metrics();
        let value = original.payload().unwrap_or_default();
        let key = original.key();
        let other_bytes = key.map_or(0, <[u8]>::len)
            + original
                .headers()
                .map(|(key, value)| key.len() + value.map_or(0, <[u8]>::len))
                .sum::<usize>();
        let mut value_len = value.len();
        let mut attempt = 0u32;
        loop {
            let truncated_from = (value_len < value.len()).then_some(value.len());
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
                .headers(dead_letter_headers(original, dl, truncated_from));
            if let Some(key) = key {
                record = record.key(key);
            }
            if original.payload().is_some() {
                record = record.payload(&value[..value_len]);
            }
            let started = Instant::now();
            let sent = tokio::select! {
                r = self.producer.send(record, Duration::from_secs(30)) => r,
                _ = cancel.cancelled() => return false,
            };
            let e = match sent {
                Ok(_) => {
                    m.dead_letter_produce_seconds
                        .observe(started.elapsed().as_secs_f64());
                    m.events_dead_lettered
                        .with_label_values(&[dl.reason.as_str()])
                        .inc();
                    if let Some(source) = dl.source.as_deref().and_then(kd_telemetry::source_label)
                    {
                        m.source_dead_lettered
                            .with_label_values(&[source, dl.reason.as_str()])
                            .inc();
                    }
                    // Any dead letter written shows the topic takes them again.
                    self.readiness.set_dead_letters_failing(None);
                    if truncated_from.is_some() {
                        m.dead_letters_truncated.inc();
                    }
                    tracing::info!(
                        reason = dl.reason.as_str(),
                        error = %dl.error,
                        topic = original.topic(),
                        partition = original.partition(),
                        offset = original.offset(),
                        truncated_from,
                        "event dead-lettered"
                    );
                    return true;
                }
                Err((e, _)) => e,
            };
            let code = code_name(&e);
            m.dead_letter_failures.with_label_values(&[&code]).inc();
            attempt = attempt.saturating_add(1);
            let failure = classify(e.rdkafka_error_code());
            if failure == Failure::TooLarge {
                if let Some(n) = cut_to(value_len, other_bytes, self.max_message_bytes) {
                    tracing::warn!(
                        topic = %self.topic,
                        error = %e,
                        size = value_len,
                        cut_to = n,
                        "dead letter too large for its topic; cutting its value to fit"
                    );
                    value_len = n;
                    continue;
                }
            }
            if failure != Failure::Transient {
                let why = match self.producer.client().fatal_error() {
                    Some((code, reason)) => format!(
                        "the dead-letter producer failed for good ({code:?}: {reason}); \
                         restart the pod (with ClusterAuthorizationFailed, allow idempotent \
                         writes: kafka-cluster:WriteDataIdempotently on MSK IAM, \
                         IdempotentWrite with ACLs before Kafka 2.8, or set \
                         enable.idempotence = false in [kafka.librdkafka])"
                    ),
                    None => e.to_string(),
                };
                self.readiness.set_dead_letters_failing(Some(format!(
                    "dead letters cannot be written to {}: {why}",
                    self.topic
                )));
            }
            if let Some(passed_over) = self.log.due(&code) {
                if failure == Failure::Transient {
                    tracing::warn!(topic = %self.topic, error = %e, failures_since_last_line = passed_over, "dead-letter produce failed; retrying");
                } else {
                    tracing::error!(topic = %self.topic, error = %e, failures_since_last_line = passed_over, "dead letters cannot be written until this is fixed; not ready, retrying");
                }
            }
            let wait = self.retry.backoff(attempt - 1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Headers, OwnedMessage, Timestamp};

    #[test]
    fn dead_letter_keeps_original_headers_and_adds_where_and_why() {
        let original = OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(b"k".to_vec()),
            "events".into(),
            Timestamp::NotAvailable,
            3,
            42,
            Some(OwnedHeaders::new().insert(Header {
                key: "source_id",
                value: Some("src_1"),
            })),
        );
        let original = Record::from_message(&original, "events".into());
        let dl = DeadLetter::new(Reason::UnknownSource, "no tenant\nsrc_1");
        let headers = dead_letter_headers(&original, &dl, None);
        let got: Vec<(String, String)> = headers
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        let want = [
            ("source_id", "src_1"),
            ("dlq.reason", "unknown_source"),
            ("dlq.error", "no tenant src_1"),
            ("dlq.topic", "events"),
            ("dlq.partition", "3"),
            ("dlq.offset", "42"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_truncated_dead_letter_says_so_and_how_large_the_original_was() {
        let original = OwnedMessage::new(
            Some(vec![b'x'; 10]),
            None,
            "events".into(),
            Timestamp::NotAvailable,
            0,
            7,
            None,
        );
        let original = Record::from_message(&original, "events".into());
        let dl = DeadLetter::new(Reason::RecordTooLarge, "too large");
        let headers = dead_letter_headers(&original, &dl, Some(1_100_000));
        let get = |k: &str| {
            headers
                .iter()
                .find(|h| h.key == k)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(get("dlq.truncated").as_deref(), Some("true"));
        assert_eq!(get("dlq.original_size").as_deref(), Some("1100000"));
        assert_eq!(get("dlq.offset").as_deref(), Some("7"));
        let whole = dead_letter_headers(&original, &dl, None);
        assert!(whole.iter().all(|h| h.key != "dlq.truncated"));
    }

    #[test]
    fn an_oversized_value_is_cut_to_the_producer_limit_then_kafkas_default_then_halves() {
        let producer_max = 100_000_000;
        // Over the producer's own limit: cut to what it leaves room for.
        let first = cut_to(150_000_000, 100, producer_max).unwrap();
        assert_eq!(first, producer_max - 100 - DEAD_LETTER_ROOM);
        // Under it, yet refused by the broker: what Kafka's default limit accepts.
        let second = cut_to(1_100_000, 100, producer_max).unwrap();
        assert_eq!(second, KAFKA_DEFAULT_MAX_MESSAGE - 100 - DEAD_LETTER_ROOM);
        // Refused again: halves, down to nothing, then give up.
        assert_eq!(cut_to(second, 100, producer_max), Some(second / 2));
        assert_eq!(cut_to(1, 100, producer_max), Some(0));
        assert_eq!(cut_to(0, 100, producer_max), None);
    }

    #[test]
    fn produce_failures_are_classified_by_what_they_call_for() {
        use RDKafkaErrorCode as C;
        assert_eq!(classify(Some(C::MessageSizeTooLarge)), Failure::TooLarge);
        for stuck in [
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::Fatal,
        ] {
            assert_eq!(classify(Some(stuck)), Failure::Stuck, "{stuck:?}");
        }
        for transient in [
            C::MessageTimedOut,
            C::BrokerTransportFailure,
            C::NotEnoughReplicas,
        ] {
            assert_eq!(
                classify(Some(transient)),
                Failure::Transient,
                "{transient:?}"
            );
        }
        assert_eq!(classify(None), Failure::Transient);
    }

    #[test]
    fn reason_names_match_the_contract() {
        let names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "invalid_json",
                "missing_source_id",
                "unknown_source",
                "invalid_settings",
                "missing_partition_key",
                "record_too_large",
                "unsupported_type",
                "destination_rejected",
                "retries_exhausted"
            ]
        );
    }
}
