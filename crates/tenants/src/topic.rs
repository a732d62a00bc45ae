//! Kafka provider: tenant settings from a compacted topic. Record key = source
//! ID, value = the settings object; an empty value (tombstone) removes the tenant.
//!
//! Every pod reads the whole topic from the beginning, without a consumer group, and then
//! follows it, so all pods converge on the same settings. The first snapshot is installed
//! once every partition has been read up to its end as it was at start; later changes are
//! gathered for a short moment and installed together (one snapshot swap, not one per
//! record, so a burst of 100,000 changes does not copy the map 100,000 times).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::model::parse_tenant;
use crate::{Snapshot, TenantEntry, TenantStore};

/// Where the settings topic is.
#[derive(Debug, Clone)]
pub struct TopicSettings {
    pub bootstrap_servers: String,
    pub topic: String,
    /// The worker's `[kafka.librdkafka]` settings (security, TLS, SASL).
    pub librdkafka: BTreeMap<String, String>,
    /// How long changes are gathered before they are installed.
    pub flush_interval: Duration,
    /// OAUTHBEARER tokens (MSK IAM), as the worker's other clients have.
    pub auth: kd_kafka::auth::KafkaAuth,
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("tenant settings topic {topic}: {source}")]
    Kafka {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("tenant settings topic {topic}: no such topic (or it has no partitions)")]
    Missing { topic: String },
}

/// One record of the settings topic, applied to the working map.
pub fn apply_record(
    tenants: &mut HashMap<Arc<str>, TenantEntry>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) {
    let Some(source_id) = key
        .and_then(|k| std::str::from_utf8(k).ok())
        .filter(|k| !k.is_empty())
    else {
        tracing::warn!("tenant settings record without a source ID key skipped");
        kd_telemetry::metrics().tenant_settings_errors.inc();
        return;
    };
    let value = value.unwrap_or_default();
    if value.is_empty() {
        tenants.remove(source_id);
        return;
    }
    // The key as messages show it: escaped and clipped (it is any bytes a producer
    // wrote).
    let shown = kd_event::text::escape_clip(source_id, crate::SOURCE_ID_MAX_CHARS);
    let entry = match serde_json::from_slice::<serde_json::Value>(value) {
        Err(e) => TenantEntry::Invalid {
            reason: format!("tenant {shown}: settings are not JSON: {e}").into(),
        },
        Ok(mut v) => {
            // The key is the source ID; a value that names another one is a mistake.
            match v.get("sourceId").and_then(|s| s.as_str()) {
                Some(id) if id != source_id => TenantEntry::Invalid {
                    reason: format!(
                        "tenant {shown}: sourceId in the value is {:?}, not the record key",
                        kd_event::text::clip(id, crate::SOURCE_ID_MAX_CHARS)
                    )
                    .into(),
                },
                _ => {
                    if let Some(obj) = v.as_object_mut() {
                        obj.insert("sourceId".into(), source_id.into());
                    }
                    match parse_tenant(&v) {
                        Ok(t) => TenantEntry::Valid(Arc::new(t)),
                        Err(e) => TenantEntry::Invalid {
                            reason: e.to_string().into(),
                        },
                    }
                }
            }
        }
    };
    if let TenantEntry::Invalid { reason } = &entry {
        tracing::warn!(%reason, "invalid tenant settings; its events will be dead-lettered");
    }
    tenants.insert(source_id.into(), entry);
}

/// Reads the whole settings topic into `store`, then follows it until the process ends.
/// Returns only on an error that stops it from starting (bad settings, no such topic).
pub async fn follow_topic(
    settings: TopicSettings,
    store: Arc<TenantStore>,
) -> Result<(), TopicError> {
    let err = |source: rdkafka::error::KafkaError| TopicError::Kafka {
        topic: settings.topic.clone(),
        source,
    };
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("group.id", "kinesis-destination-settings")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    settings.auth.configure(&mut config, &settings.librdkafka);
    for (k, v) in &settings.librdkafka {
        if !matches!(k.as_str(), "group.id" | "group.instance.id") {
            config.set(k, v);
        }
    }
    // The end of each partition is reported, also for one emptied by retention or
    // ending in a transaction marker (no record at `high - 1` is ever returned).
    config.set("enable.partition.eof", "true");
    let consumer: StreamConsumer<kd_kafka::auth::AuthContext> = config
        .create_with_context(kd_kafka::auth::AuthContext(settings.auth.clone()))
        .map_err(err)?;
    kd_kafka::auth::set_token_now(consumer.client(), &settings.auth);
    let topic = settings.topic.clone();
    let (partitions, ends) = {
        let consumer = &consumer;
        let topic = topic.clone();
        // Metadata and watermark calls block; they run once, at start.
        tokio::task::block_in_place(move || -> Result<_, TopicError> {
            let md = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(30))
                .map_err(err)?;
            let parts: Vec<i32> = md
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if parts.is_empty() {
                return Err(TopicError::Missing { topic });
            }
            let mut ends = HashMap::new();
            for &p in &parts {
                let watermarks = consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(30))
                    .map_err(err)?;
                ends.insert(p, watermarks);
            }
            Ok((parts, ends))
        })?
    };
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .map_err(err)?;
    }
    consumer.assign(&tpl).map_err(err)?;

    let mut tenants: HashMap<Arc<str>, TenantEntry> = HashMap::new();
    let mut catching_up = CatchUp::new(ends);
    let started = std::time::Instant::now();
    let mut progress = tokio::time::interval(CATCH_UP_LOG_EVERY);
    progress.tick().await;
    let mut loaded = false;
    // Records applied to `tenants` but not yet in an installed snapshot.
    let mut unpublished = 0u64;
    let mut records = 0u64;
    let mut tick = tokio::time::interval(settings.flush_interval);
    loop {
        // The records metric counts records in force, so it moves only with a swap.
        let publish = |tenants: &HashMap<Arc<str>, TenantEntry>, unpublished: &mut u64| {
            store.replace(Snapshot::new(tenants.clone()));
            kd_telemetry::metrics()
                .tenant_settings_records
                .inc_by(std::mem::take(unpublished));
        };
        if !loaded && catching_up.done() {
            loaded = true;
            tracing::info!(topic = %topic, records, tenants = tenants.len(), "tenant settings loaded from topic");
            publish(&tenants, &mut unpublished);
        }
        tokio::select! {
            _ = tick.tick() => {
                if loaded && unpublished > 0 {
                    publish(&tenants, &mut unpublished);
                }
            }
            _ = progress.tick(), if !loaded => {
                tracing::warn!(
                    topic = %topic,
                    waited_secs = started.elapsed().as_secs(),
                    records,
                    behind = ?catching_up.behind(),
                    "still reading the tenant settings topic; not ready until every partition is read to its end (partition: next offset to see, end)"
                );
            }
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    records += 1;
                    apply_record(&mut tenants, m.key(), m.payload());
                    unpublished += 1;
                    catching_up.seen(m.partition(), m.offset());
                }
                Err(rdkafka::error::KafkaError::PartitionEOF(partition)) => {
                    catching_up.at_end(partition);
                }
                Err(e) => {
                    tracing::warn!(topic = %topic, error = %e, "reading tenant settings topic");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
}

/// How often the first read of the settings topic says how far it got.
const CATCH_UP_LOG_EVERY: Duration = Duration::from_secs(15);

/// Which partitions of the settings topic are not yet read up to their end as it was
/// at start. A partition is done once a record at or past its last offset is seen, or
/// once the consumer reports it is at the end (an empty partition, one whose records
/// retention or compaction removed, one whose last offset is a transaction marker:
/// none of these ever returns a record at `high - 1`).
#[derive(Debug)]
struct CatchUp {
    /// Partition → (next offset to see, end at start).
    behind: BTreeMap<i32, (i64, i64)>,
}

impl CatchUp {
    /// From each partition's (low, high) watermarks at start.
    fn new(watermarks: HashMap<i32, (i64, i64)>) -> Self {
        CatchUp {
            behind: watermarks
                .into_iter()
                .filter(|(_, (low, high))| low < high)
                .collect(),
        }
    }

    fn seen(&mut self, partition: i32, offset: i64) {
        if let Some((next, end)) = self.behind.get_mut(&partition) {
            *next = offset + 1;
            if *next >= *end {
                self.behind.remove(&partition);
            }
        }
    }

    fn at_end(&mut self, partition: i32) {
        self.behind.remove(&partition);
    }

    fn done(&self) -> bool {
        self.behind.is_empty()
    }

    fn behind(&self) -> &BTreeMap<i32, (i64, i64)> {
        &self.behind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_read_ends_at_each_partitions_end_whatever_is_there() {
        let mut c = CatchUp::new(HashMap::from([
            (0, (0, 0)),     // never written
            (1, (50, 50)),   // every record removed by retention
            (2, (0, 10)),    // ends in a transaction marker at 9
            (3, (100, 103)), // compacted up to 100
        ]));
        assert_eq!(c.behind().keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        c.seen(2, 8);
        assert!(
            !c.done(),
            "9 is not a record: 2 is not done by records alone"
        );
        c.seen(3, 102);
        assert_eq!(c.behind().keys().copied().collect::<Vec<_>>(), vec![2]);
        c.at_end(2);
        assert!(c.done(), "the consumer reached the end of 2");
        // A partition reported at its end before its records arrive (a record compacted
        // away after the watermarks were read) is done as well.
        let mut c = CatchUp::new(HashMap::from([(0, (0, 5))]));
        c.at_end(0);
        assert!(c.done());
    }

    fn settings(stream: &str) -> Vec<u8> {
        format!(r#"{{"roleAddress":"arn:aws:iam::123456789012:role/r","region":"us-east-1","stream":"{stream}"}}"#)
            .into_bytes()
    }

    #[test]
    fn records_add_change_and_remove_tenants() {
        let mut m = HashMap::new();
        apply_record(&mut m, Some(b"a"), Some(&settings("one")));
        let TenantEntry::Valid(t) = &m[&Arc::<str>::from("a")] else {
            panic!()
        };
        assert_eq!(t.stream.as_str(), "one");
        assert_eq!(t.source_id.as_str(), "a", "the key is the source ID");
        apply_record(&mut m, Some(b"a"), Some(&settings("two")));
        let TenantEntry::Valid(t) = &m[&Arc::<str>::from("a")] else {
            panic!()
        };
        assert_eq!(t.stream.as_str(), "two");
        apply_record(&mut m, Some(b"a"), Some(b""));
        assert!(m.is_empty(), "a tombstone removes the tenant");
        apply_record(&mut m, Some(b"a"), None);
        assert!(m.is_empty());
    }

    #[test]
    fn keys_that_would_forge_log_lines_are_shown_escaped_and_clipped() {
        let mut m = HashMap::new();
        let forged = format!("a\n{}", "x".repeat(5000));
        for value in [&b"{not json"[..], &settings("s")[..]] {
            apply_record(&mut m, Some(forged.as_bytes()), Some(value));
            let TenantEntry::Invalid { reason } = &m[forged.as_str()] else {
                panic!("invalid")
            };
            assert!(!reason.contains('\n') && reason.len() < 600, "{reason}");
            assert!(reason.starts_with("tenant a\\u{a}xxx"), "{reason}");
        }
    }

    #[test]
    fn bad_records_become_invalid_tenants_or_are_skipped() {
        let mut m = HashMap::new();
        apply_record(&mut m, Some(b"a"), Some(b"{not json"));
        assert!(matches!(
            m[&Arc::<str>::from("a")],
            TenantEntry::Invalid { .. }
        ));
        apply_record(&mut m, Some(b"b"), Some(br#"{"sourceId":"c","roleAddress":"arn:aws:iam::123456789012:role/r","region":"us-east-1","stream":"s"}"#));
        assert!(matches!(
            m[&Arc::<str>::from("b")],
            TenantEntry::Invalid { .. }
        ));
        apply_record(&mut m, None, Some(&settings("x")));
        assert_eq!(m.len(), 2, "no key, nothing to file it under");
    }
}
