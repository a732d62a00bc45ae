//! Kafka helpers for tests: produce with headers, read a topic, committed offsets.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

/// A record to produce: key, value, headers.
pub type Record = (String, Vec<u8>, Vec<(String, String)>);

/// Where a produced record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
}

pub struct Kafka {
    bootstrap: String,
    producer: FutureProducer,
}

impl Kafka {
    /// A client whose producer batches as librdkafka does by default (`linger.ms` 5),
    /// uncompressed.
    pub fn new(bootstrap: &str) -> Kafka {
        Kafka::with(bootstrap, &[])
    }

    /// A client whose producer compresses its batches with `codec` (`gzip`, `snappy`,
    /// `lz4`, `zstd`).
    pub fn compressed(bootstrap: &str, codec: &str) -> Kafka {
        Kafka::with(bootstrap, &[("compression.type", codec)])
    }

    /// A client whose producer has librdkafka's defaults plus `settings`. Records up to
    /// 12 MB may be produced (librdkafka's default stops at 1 MB), so tests can send
    /// what the brokers of real users accept.
    pub fn with(bootstrap: &str, settings: &[(&str, &str)]) -> Kafka {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("message.max.bytes", "12000000");
        for (k, v) in settings {
            config.set(*k, *v);
        }
        let producer = config.create().expect("test producer");
        Kafka {
            bootstrap: bootstrap.into(),
            producer,
        }
    }

    /// Produces one record and waits for the broker to acknowledge it.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&str>,
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> Produced {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(topic).payload(value).headers(h);
        if let Some(k) = key {
            record = record.key(k);
        }
        let (partition, offset) = match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(d) => (d.partition, d.offset),
            Err((e, _)) => panic!("produce to {topic}: {e}"),
        };
        Produced { partition, offset }
    }

    /// Produces records in order, many in flight at once, and waits for them all.
    pub async fn send_many(&self, topic: &str, records: &[Record]) -> Vec<Produced> {
        let mut pending = Vec::with_capacity(records.len());
        for (key, value, headers) in records {
            let mut h = OwnedHeaders::new();
            for (k, v) in headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(v.as_str()),
                });
            }
            let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
                .key(key.as_str())
                .payload(value.as_slice())
                .headers(h);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => panic!("queue a record for {topic}: {e}"),
            }
        }
        let mut out = Vec::with_capacity(pending.len());
        for d in pending {
            match d.await {
                Ok(Ok(d)) => out.push(Produced {
                    partition: d.partition,
                    offset: d.offset,
                }),
                other => panic!("produce to {topic}: {other:?}"),
            }
        }
        out
    }

    /// Reads `topic` from the beginning until `count` records arrived (or `timeout`).
    pub fn read_topic(&self, topic: &str, count: usize, timeout: Duration) -> Vec<OwnedMessage> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", format!("testkit-reader-{}", crate::free_port()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .create()
            .expect("test consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < count && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push(m.detach());
            }
        }
        out
    }

    /// The group's committed offset per partition (-1 where none).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("offset reader");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    }

    /// One past the last offset of each partition.
    pub fn end_offsets(&self, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("watermark reader");
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .expect("watermarks")
                    .1
            })
            .collect()
    }
}

impl Kafka {
    /// Waits until `group` has committed up to the end of every partition of `topic`
    /// (an empty partition has nothing to commit).
    pub async fn wait_committed_to_end(&self, group: &str, topic: &str, partitions: i32) {
        let end = self.end_offsets(topic, partitions);
        crate::eventually(
            Duration::from_secs(60),
            "offsets committed to the end",
            || {
                let committed = self.committed(group, topic, partitions);
                let done = committed
                    .iter()
                    .zip(&end)
                    .all(|(&c, &e)| c == e || (e == 0 && c < 0));
                async move { done.then_some(()) }
            },
        )
        .await;
    }
}

/// A header's value as text.
pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    kd_pipeline::replay::header_text(m, key)
}

impl Kafka {
    pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
        header(m, key)
    }

    pub fn value(m: &OwnedMessage) -> &[u8] {
        m.payload().unwrap_or_default()
    }
}
