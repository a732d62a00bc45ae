//! Dead letters: events that cannot be delivered, kept for inspection and replay.
//!
//! A dead letter is the original record (key, value, headers) produced to the
//! dead-letter topic with the headers of SPEC 6 added. Producing the original back to
//! the input topic (without the `dlq.*` headers) replays it. An event counts as done
//! only once Kafka has acknowledged its dead letter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::retry::RetryPolicy;

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
            error: kd_aws::errors::one_line(&error.into()),
            source: None,
        }
    }

    pub fn of_source(mut self, source: &str) -> Self {
        self.source = Some(source.to_owned());
        self
    }
}

/// The headers of a dead letter: the original ones, then `dlq.reason`, `dlq.error`,
/// `dlq.topic`, `dlq.partition`, `dlq.offset`.
pub fn dead_letter_headers(original: &OwnedMessage, dl: &DeadLetter) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(h) = original.headers() {
        for header in h.iter() {
            headers = headers.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
    }
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
    headers
}

/// Produces dead letters and waits for Kafka to confirm them.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: Arc<str>,
    retry: RetryPolicy,
}

impl DeadLetters {
    pub fn new(producer: FutureProducer, topic: &str, retry: RetryPolicy) -> Self {
        DeadLetters {
            producer,
            topic: topic.into(),
            retry,
        }
    }

    /// Produces the dead letter, retrying for as long as it takes (an event is never
    /// acknowledged without its dead letter). `false` only when shutdown cancelled it.
    pub async fn send(
        &self,
        original: &OwnedMessage,
        dl: &DeadLetter,
        cancel: &CancellationToken,
    ) -> bool {
        let m = kd_telemetry::metrics();
        let headers = dead_letter_headers(original, dl);
        let mut attempt = 0u32;
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers.clone());
            if let Some(key) = original.key() {
                record = record.key(key);
            }
            if let Some(value) = original.payload() {
                record = record.payload(value);
            }
            let started = Instant::now();
            let sent = tokio::select! {
                r = self.producer.send(record, Duration::from_secs(30)) => r,
                _ = cancel.cancelled() => return false,
            };
            match sent {
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
                    tracing::info!(
                        reason = dl.reason.as_str(),
                        error = %dl.error,
                        topic = original.topic(),
                        partition = original.partition(),
                        offset = original.offset(),
                        "event dead-lettered"
                    );
                    return true;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, topic = %self.topic, attempt, "dead-letter produce failed; retrying");
                    let wait = self.retry.backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => return false,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

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
        let dl = DeadLetter::new(Reason::UnknownSource, "no tenant\nsrc_1");
        let headers = dead_letter_headers(&original, &dl);
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
