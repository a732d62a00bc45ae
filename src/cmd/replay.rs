//! `replay`: sends dead letters back to the topic they were read from, once whatever
//! stopped them is fixed (a tenant added, a role repaired). The original key, value and
//! headers are produced again; the `dlq.*` headers are dropped.
//!
//! It reads the dead-letter topic from the beginning up to its end at start, without a
//! consumer group: running it twice replays twice, so narrow it with `--reason`,
//! `--source-id` and `--from-offset`. A dead letter goes back only to one of the
//! configured input topics (or to `--to-topic`): one whose `dlq.topic` names another
//! topic is refused and counted. A dead letter whose value was cut to fit
//! (`dlq.truncated`) is not replayed: its original is at `dlq.topic`/`dlq.offset`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::CliError;
use crate::config::Config;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, env = "KINESIS_DESTINATION_CONFIG", value_name = "FILE")]
    config: PathBuf,
    /// Only dead letters with this dlq.reason (repeatable).
    #[arg(long = "reason")]
    reasons: Vec<String>,
    /// Only dead letters of this source (its source header, or projectId in the value).
    #[arg(long)]
    source_id: Option<String>,
    /// Start at this offset of every dead-letter partition.
    #[arg(long, default_value_t = 0)]
    from_offset: i64,
    /// Count what would be replayed, produce nothing.
    #[arg(long)]
    dry_run: bool,
    /// Produce every replayed event to this topic instead of its `dlq.topic`.
    #[arg(long)]
    to_topic: Option<String>,
}

pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    let config = Config::load(&args.config)?;
    let k = &config.kafka;
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", &k.bootstrap_servers);
    for (key, value) in &k.librdkafka {
        base.set(key, value);
    }
    let consumer: BaseConsumer = base
        .clone()
        .set("group.id", "kinesis-destination-replay")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| CliError::Usage(format!("config: kafka: {e}")))?;
    // The cluster's security settings ([kafka.librdkafka]) apply to the producer too,
    // and it takes records as large as the dead-letter producer does.
    let producer: FutureProducer = base
        .clone()
        .set("acks", "all")
        .set(
            "message.max.bytes",
            kd_pipeline::dead_letter_max_bytes(k).to_string(),
        )
        .create()
        .map_err(|e| CliError::Usage(format!("config: kafka: {e}")))?;
    let fail = |what: &str, e: &dyn std::fmt::Display| CliError::Failed(format!("{what}: {e}"));

    let topic = k.dead_letter_topic.as_str();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| fail("reading dead-letter topic metadata", &e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    // Each partition is read up to its end as it was at start.
    let mut ends: std::collections::HashMap<i32, i64> = Default::default();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| fail("reading dead-letter offsets", &e))?;
        let start = args.from_offset.max(low);
        if start < high {
            tpl.add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(|e| fail("assigning", &e))?;
            ends.insert(p, high);
        }
    }
    if ends.is_empty() {
        eprintln!("no dead letters to replay in {topic}");
        return Ok(ExitCode::SUCCESS);
    }
    consumer.assign(&tpl).map_err(|e| fail("assigning", &e))?;

    let (mut seen, mut replayed, mut refused, mut truncated) = (0u64, 0u64, 0u64, 0u64);
    let mut remaining: std::collections::HashSet<i32> = ends.keys().copied().collect();
    while !remaining.is_empty() {
        let Some(msg) = consumer.poll(Duration::from_secs(10)) else {
            return Err(CliError::Failed(format!(
                "no progress reading {topic} for 10s ({replayed} replayed so far)"
            )));
        };
        let msg = msg.map_err(|e| fail("reading dead letters", &e))?;
        let end = ends.get(&msg.partition()).copied().unwrap_or(0);
        if msg.offset() + 1 >= end {
            remaining.remove(&msg.partition());
        }
        if msg.offset() >= end {
            continue;
        }
        seen += 1;
        let header = |name: &str| -> Option<String> {
            msg.headers()?
                .iter()
                .filter(|h| h.key == name)
                .filter_map(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .last()
        };
        if !args.reasons.is_empty()
            && !header("dlq.reason").is_some_and(|r| args.reasons.contains(&r))
        {
            continue;
        }
        if let Some(want) = &args.source_id {
            let value = msg.payload().unwrap_or_default();
            let from_value = kd_event::EventView::decode(value)
                .ok()
                .and_then(|v| v.project_id);
            if header(&k.source_id_header).or(from_value).as_ref() != Some(want) {
                continue;
            }
        }
        if header("dlq.truncated").as_deref() == Some("true") {
            truncated += 1;
            continue;
        }
        let to_topic = match (&args.to_topic, header("dlq.topic")) {
            (Some(to), _) => to.clone(),
            (None, Some(from)) if k.topics.contains(&from) => from,
            (None, from) => {
                refused += 1;
                eprintln!(
                    "refused offset {} of partition {}: dlq.topic {from:?} is not an input topic (kafka.topics); --to-topic replays elsewhere",
                    msg.offset(),
                    msg.partition()
                );
                continue;
            }
        };
        replayed += 1;
        if args.dry_run {
            continue;
        }
        let mut headers = OwnedHeaders::new();
        if let Some(h) = msg.headers() {
            for h in h.iter().filter(|h| !h.key.starts_with("dlq.")) {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        // No timestamp is copied: the replayed record is stamped with the time of the
        // replay, and so gets a whole retry window again.
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&to_topic).headers(headers);
        if let Some(key) = msg.key() {
            record = record.key(key);
        }
        if let Some(value) = msg.payload() {
            record = record.payload(value);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| fail("producing a replayed event", &e))?;
    }
    eprintln!(
        "{} {replayed} of {seen} dead letters{}{}",
        if args.dry_run {
            "would replay"
        } else {
            "replayed"
        },
        if refused > 0 {
            format!("; refused {refused} not read from an input topic")
        } else {
            String::new()
        },
        if truncated > 0 {
            format!("; left {truncated} truncated ones (their originals are where dlq.topic/dlq.offset say)")
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}
