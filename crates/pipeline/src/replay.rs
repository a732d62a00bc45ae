//! Replaying dead letters once whatever stopped them is fixed (a tenant added, a role
//! repaired): the original key, value and headers are produced again, without the
//! `dlq.*` headers, to the input topic they were read from.
//!
//! The dead-letter topic is read from the start (or `from_offset`) to its end as it was
//! when the replay began, without a consumer group: replaying twice replays twice. A dead
//! letter goes back only to one of the configured input topics (or to `to_topic`); one
//! whose `dlq.topic` names another topic is refused. A dead letter whose value was cut to
//! fit (`dlq.truncated`) is not replayed: its original is at `dlq.topic`/`dlq.offset`.
//! The replayed record carries no timestamp of its own, so Kafka stamps it with the time
//! of the replay and it gets a whole retry window again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kd_kafka::auth::AuthContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{dead_letter_max_bytes, KafkaSettings};
use crate::record::Record;

/// Which dead letters to replay, and where.
#[derive(Debug, Clone, Default)]
pub struct ReplayRequest {
    /// Only dead letters with one of these `dlq.reason`s (all when empty).
    pub reasons: Vec<String>,
    /// Only dead letters of this source (its source header, or `projectId` in the value).
    pub source_id: Option<String>,
    /// Start at this offset of every dead-letter partition.
    pub from_offset: i64,
    /// Count what would be replayed, produce nothing.
    pub dry_run: bool,
    /// Produce every replayed event here instead of to its `dlq.topic`.
    pub to_topic: Option<String>,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters read.
    pub seen: u64,
    /// Produced again (or, with `dry_run`, that would have been).
    pub replayed: u64,
    /// Read from a topic that is not an input topic, and no `to_topic` given.
    pub refused: u64,
    /// Cut to fit the dead-letter topic: their originals must be replayed instead.
    pub truncated: u64,
}

/// A dead letter refused because its `dlq.topic` is not an input topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub partition: i32,
    pub offset: i64,
    /// Its `dlq.topic` header, if any.
    pub from_topic: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The `[kafka]` settings do not make a client.
    #[error("config: kafka: {0}")]
    Config(#[source] KafkaError),
    #[error("{what}: {source}")]
    Kafka {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("no progress reading {topic} for 10s ({replayed} replayed so far)")]
    Stalled { topic: String, replayed: u64 },
}

fn kafka_error(what: &'static str) -> impl FnOnce(KafkaError) -> ReplayError {
    move |source| ReplayError::Kafka { what, source }
}

/// What to do with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    /// Produce it to this topic.
    Replay(String),
    /// Not asked for (another reason or source).
    Filtered,
    Truncated,
    Refused(Option<String>),
}

/// Decides on one dead letter from its headers (`header(name)`) and value.
fn decide(
    header: impl Fn(&str) -> Option<String>,
    value: &[u8],
    k: &KafkaSettings,
    req: &ReplayRequest,
) -> Decision {
    if !req.reasons.is_empty() && !header("dlq.reason").is_some_and(|r| req.reasons.contains(&r)) {
        return Decision::Filtered;
    }
    if let Some(want) = &req.source_id {
        let from_value = kd_event::EventView::decode(value)
            .ok()
            .and_then(|v| v.project_id.map(std::borrow::Cow::into_owned));
        if header(&k.source_id_header).or(from_value).as_ref() != Some(want) {
            return Decision::Filtered;
        }
    }
    if header("dlq.truncated").as_deref() == Some("true") {
        return Decision::Truncated;
    }
    match (&req.to_topic, header("dlq.topic")) {
        (Some(to), _) => Decision::Replay(to.clone()),
        (None, Some(from)) if k.topics.contains(&from) => Decision::Replay(from),
        (None, from) => Decision::Refused(from),
    }
}

/// Replays the dead letters `req` asks for; `on_refused` hears of each refused one.
pub async fn replay(
    k: &KafkaSettings,
    req: &ReplayRequest,
    mut on_refused: impl FnMut(&Refused),
) -> Result<ReplayReport, ReplayError> {
    let base = crate::kafka::command_client_config(k);
    let context = || AuthContext(k.auth.clone());
    let consumer: BaseConsumer<AuthContext> = base
        .clone()
        .set("group.id", "kinesis-destination-replay")
        .set("enable.auto.commit", "false")
        .create_with_context(context())
        .map_err(ReplayError::Config)?;
    kd_kafka::auth::set_token_now(consumer.client(), &k.auth);
    // The cluster's security settings ([kafka.librdkafka]) apply to the producer too,
    // and it takes records as large as the dead-letter producer does.
    let producer: FutureProducer<AuthContext> = base
        .clone()
        .set("acks", "all")
        .set("message.max.bytes", dead_letter_max_bytes(k).to_string())
        .create_with_context(context())
        .map_err(ReplayError::Config)?;
    kd_kafka::auth::set_token_now(producer.client(), &k.auth);

    let topic = k.dead_letter_topic.as_str();
    let ends = assign_to_end(&consumer, topic, req.from_offset)?;
    let mut report = ReplayReport::default();
    let mut remaining: HashSet<i32> = ends.keys().copied().collect();
    while !remaining.is_empty() {
        let Some(msg) = consumer.poll(Duration::from_secs(10)) else {
            return Err(ReplayError::Stalled {
                topic: topic.to_owned(),
                replayed: report.replayed,
            });
        };
        let msg = msg.map_err(kafka_error("reading dead letters"))?;
        // Its headers read as bytes: rdkafka's accessor panics on a name that is not
        // UTF-8, which anyone producing to the topic could send.
        let msg = Record::from_kafka(&msg, Arc::from(msg.topic()));
        let end = ends.get(&msg.partition()).copied().unwrap_or(0);
        if msg.offset() + 1 >= end {
            remaining.remove(&msg.partition());
        }
        if msg.offset() >= end {
            continue;
        }
        report.seen += 1;
        let value = msg.payload().unwrap_or_default();
        let to_topic = match decide(|name| msg.header_text(name), value, k, req) {
            Decision::Replay(to) => to,
            Decision::Filtered => continue,
            Decision::Truncated => {
                report.truncated += 1;
                continue;
            }
            Decision::Refused(from_topic) => {
                report.refused += 1;
                on_refused(&Refused {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    from_topic,
                });
                continue;
            }
        };
        report.replayed += 1;
        if !req.dry_run {
            produce_again(&producer, &msg, &to_topic).await?;
        }
    }
    Ok(report)
}

/// Assigns every partition of `topic` from `from_offset` (or its low watermark) and
/// returns where each ends now; partitions with nothing to read are left out.
fn assign_to_end(
    consumer: &BaseConsumer<AuthContext>,
    topic: &str,
    from_offset: i64,
) -> Result<HashMap<i32, i64>, ReplayError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(kafka_error("reading dead-letter topic metadata"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(kafka_error("reading dead-letter offsets"))?;
        let start = from_offset.max(low);
        if start < high {
            tpl.add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(kafka_error("assigning"))?;
            ends.insert(p, high);
        }
    }
    if !ends.is_empty() {
        consumer.assign(&tpl).map_err(kafka_error("assigning"))?;
    }
    Ok(ends)
}

/// Produces a dead letter's key, value and headers (without `dlq.*`) to `to_topic`.
async fn produce_again(
    producer: &FutureProducer<AuthContext>,
    msg: &Record,
    to_topic: &str,
) -> Result<(), ReplayError> {
    let headers = msg.headers_to_produce(|name| !name.starts_with(b"dlq."));
    // No timestamp: Kafka stamps the record with the time of the replay.
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(to_topic).headers(headers);
    if let Some(key) = msg.key() {
        record = record.key(key);
    }
    if let Some(value) = msg.payload() {
        record = record.payload(value);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(source, _)| ReplayError::Kafka {
            what: "producing a replayed event",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn settings() -> KafkaSettings {
        KafkaSettings {
            topics: vec!["events".into()],
            ..KafkaSettings::default()
        }
    }

    #[test]
    fn a_dead_letter_goes_back_to_the_input_topic_it_was_read_from() {
        let h = headers(&[("dlq.topic", "events"), ("dlq.reason", "unknown_source")]);
        let req = ReplayRequest::default();
        assert_eq!(
            decide(&h, b"{}", &settings(), &req),
            Decision::Replay("events".into())
        );
    }

    #[test]
    fn a_dead_letter_of_another_topic_is_refused_unless_a_target_is_given() {
        let h = headers(&[("dlq.topic", "payments")]);
        let req = ReplayRequest::default();
        assert_eq!(
            decide(&h, b"{}", &settings(), &req),
            Decision::Refused(Some("payments".into()))
        );
        assert_eq!(
            decide(headers(&[]), b"{}", &settings(), &req),
            Decision::Refused(None),
            "no dlq.topic at all"
        );
        let to = ReplayRequest {
            to_topic: Some("retry".into()),
            ..ReplayRequest::default()
        };
        assert_eq!(
            decide(&h, b"{}", &settings(), &to),
            Decision::Replay("retry".into())
        );
    }

    #[test]
    fn reasons_and_sources_narrow_the_replay() {
        let req = ReplayRequest {
            reasons: vec!["unknown_source".into()],
            source_id: Some("src_a".into()),
            ..ReplayRequest::default()
        };
        let k = settings();
        let of = |reason, source| {
            headers(&[
                ("dlq.topic", "events"),
                ("dlq.reason", reason),
                ("source_id", source),
            ])
        };
        assert_eq!(
            decide(of("unknown_source", "src_a"), b"{}", &k, &req),
            Decision::Replay("events".into())
        );
        assert_eq!(
            decide(of("invalid_json", "src_a"), b"{}", &k, &req),
            Decision::Filtered
        );
        assert_eq!(
            decide(of("unknown_source", "src_b"), b"{}", &k, &req),
            Decision::Filtered
        );
        // Without the header, the body's projectId names the source.
        let bare = headers(&[("dlq.topic", "events"), ("dlq.reason", "unknown_source")]);
        assert_eq!(
            decide(&bare, br#"{"type":"track","projectId":"src_a"}"#, &k, &req),
            Decision::Replay("events".into())
        );
    }

    #[test]
    fn a_truncated_dead_letter_is_never_replayed() {
        let h = headers(&[("dlq.topic", "events"), ("dlq.truncated", "true")]);
        assert_eq!(
            decide(&h, b"{", &settings(), &ReplayRequest::default()),
            Decision::Truncated
        );
    }
}
