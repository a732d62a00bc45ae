//! The dead-letter producer: its client callbacks, and the send loop that retries until
//! Kafka has each dead letter (cutting a value too large to fit, taking readiness away
//! while a failure needs someone to act).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kd_telemetry::Readiness;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use tokio_util::sync::CancellationToken;

use super::headers::{cut_to, dead_letter_headers};
use super::DeadLetter;
use crate::kafka::code_name;
use crate::log_limit::LogLimit;
use crate::record::Record;
use crate::retry::RetryPolicy;

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

/// The dead-letter producer's client callbacks: its client-wide errors (brokers down)
/// are logged once a minute per kind, not at every reconnection attempt.
#[derive(Debug)]
pub struct DeadLetterClient {
    errors: LogLimit,
    /// OAUTHBEARER tokens (MSK IAM), when configured.
    auth: kd_kafka::auth::KafkaAuth,
}

impl DeadLetterClient {
    pub fn new(auth: kd_kafka::auth::KafkaAuth) -> Self {
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
                    if let Some(source) = dl.source.as_deref() {
                        kd_status::book().dead_lettered(
                            source,
                            dl.reason.as_str(),
                            &dl.error,
                            || original.status_place(),
                        );
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
}
