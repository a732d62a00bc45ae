//! Reading the status topic back: every partition (or, for one tenant, the one that
//! holds its records) from the first record at or after `since` to the end the topic
//! had when reading began. Without a consumer group: nothing is committed.

use std::collections::HashMap;
use std::time::Duration;

use kd_kafka::auth::{AuthContext, KafkaAuth};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::merge::Merged;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("status.topic: topic {0:?} does not exist on the brokers")]
    MissingTopic(String),
    #[error("{what}: {source}")]
    Kafka {
        what: &'static str,
        source: KafkaError,
    },
    #[error("reading {0:?} stalled: no record for 10 s before its end")]
    Stalled(String),
}

fn kafka(what: &'static str) -> impl FnOnce(KafkaError) -> ReadError {
    move |source| ReadError::Kafka { what, source }
}

/// Adds the records of `topic` since `merged.since` (of `source` only, when given) to
/// `merged`; how many records were read. Blocking: run it on a blocking thread.
pub fn read_into(
    base: &ClientConfig,
    auth: &KafkaAuth,
    topic: &str,
    source: Option<&str>,
    merged: &mut Merged,
) -> Result<u64, ReadError> {
    let consumer: BaseConsumer<AuthContext> = base
        .clone()
        .set("group.id", "kinesis-destination-status")
        .set("enable.auto.commit", "false")
        // The end of a partition is told, so one whose last offsets are transaction
        // markers or aborted records (never delivered) still ends.
        .set("enable.partition.eof", "true")
        // A start removed by retention meanwhile: from the oldest record kept.
        .set("auto.offset.reset", "earliest")
        .create_with_context(AuthContext(auth.clone()))
        .map_err(kafka("creating the status reader"))?;
    kd_kafka::auth::set_token_now(consumer.client(), auth);
    let metadata = consumer
        .fetch_metadata(Some(topic), WAIT)
        .map_err(kafka("reading the status topic's metadata"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(ReadError::MissingTopic(topic.to_owned()));
    }
    let wanted: Vec<i32> = match source {
        Some(s) => vec![crate::partition::of(s, partitions.len() as i32)],
        None => partitions,
    };
    let mut by_time = TopicPartitionList::new();
    for p in &wanted {
        by_time
            .add_partition_offset(topic, *p, Offset::Offset(merged.since as i64 * 1000))
            .map_err(kafka("asking offsets for times"))?;
    }
    let starts = consumer
        .offsets_for_times(by_time, WAIT)
        .map_err(kafka("asking offsets for times"))?;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assign = TopicPartitionList::new();
    for e in starts.elements() {
        if let Err(source) = e.error() {
            return Err(ReadError::Kafka {
                what: "asking offsets for times",
                source,
            });
        }
        let Offset::Offset(start) = e.offset() else {
            continue; // nothing at or after `since`
        };
        let (_, high) = consumer
            .fetch_watermarks(topic, e.partition(), WAIT)
            .map_err(kafka("reading the status topic's offsets"))?;
        if start < high {
            assign
                .add_partition_offset(topic, e.partition(), Offset::Offset(start))
                .map_err(kafka("assigning"))?;
            ends.insert(e.partition(), high);
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    consumer.assign(&assign).map_err(kafka("assigning"))?;
    let mut read = 0;
    let mut progress = std::time::Instant::now();
    while !ends.is_empty() {
        if progress.elapsed() > WAIT {
            return Err(ReadError::Stalled(topic.to_owned()));
        }
        let msg = match consumer.poll(WAIT) {
            None => return Err(ReadError::Stalled(topic.to_owned())),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ends.remove(&p);
                progress = std::time::Instant::now();
                continue;
            }
            Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                return Err(ReadError::Kafka {
                    what: "reading the status topic",
                    source: e,
                })
            }
            // A broker gone for a moment: librdkafka tries again (bounded by WAIT).
            Some(Err(_)) => continue,
            Some(Ok(m)) => m,
        };
        progress = std::time::Instant::now();
        let end = ends.get(&msg.partition()).copied().unwrap_or(0);
        if msg.offset() + 1 >= end {
            ends.remove(&msg.partition());
        }
        if msg.offset() >= end {
            continue;
        }
        if source.is_some_and(|s| msg.key() != Some(s.as_bytes())) {
            continue;
        }
        read += 1;
        if let Some(value) = msg.payload() {
            merged.add_json(msg.key().unwrap_or_default(), value);
        }
    }
    Ok(read)
}

/// Where the status records are, for the command and the page.
#[derive(Clone)]
pub struct Reader {
    pub base: ClientConfig,
    pub auth: KafkaAuth,
    pub topic: String,
}

impl Reader {
    /// Reads and merges the records of the last `range` up to now (of `source` only,
    /// when given), in rows of `bucket_secs`. Blocking.
    pub fn merged(
        &self,
        range: Duration,
        source: Option<&str>,
        bucket_secs: u64,
    ) -> Result<Merged, ReadError> {
        let until = crate::time::now_secs();
        let mut merged = Merged::new(until.saturating_sub(range.as_secs()), until, bucket_secs);
        // Every tenant: totals only, so the cost per tenant is bounded.
        merged.totals_only = source.is_none();
        read_into(&self.base, &self.auth, &self.topic, source, &mut merged)?;
        Ok(merged)
    }
}
