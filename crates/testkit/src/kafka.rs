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

    /// Produces one record whose headers are given as raw bytes, as producers in other
    /// languages may send them (a name that is not UTF-8, say: rdkafka's Rust API only
    /// takes UTF-8 names), and waits until it is written. Names cannot hold a NUL.
    pub fn send_raw(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: &[(&[u8], Option<&[u8]>)],
    ) {
        use rdkafka::bindings as rd;
        use rdkafka::producer::{BaseProducer, Producer};
        use std::ffi::CString;
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("acks", "all")
            .create()
            .expect("raw test producer");
        let topic = CString::new(topic).expect("topic name");
        let names: Vec<CString> = headers
            .iter()
            .map(|(name, _)| CString::new(name.to_vec()).expect("no NUL in a header name"))
            .collect();
        let vu = |vtype, u| rd::rd_kafka_vu_t { vtype, u };
        use rd::rd_kafka_vtype_t as V;
        let mut vus = vec![
            vu(
                V::RD_KAFKA_VTYPE_TOPIC,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    cstr: topic.as_ptr(),
                },
            ),
            // librdkafka copies key and value (RD_KAFKA_MSG_F_COPY) and the headers.
            vu(
                V::RD_KAFKA_VTYPE_MSGFLAGS,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    i: rd::RD_KAFKA_MSG_F_COPY,
                },
            ),
            vu(
                V::RD_KAFKA_VTYPE_KEY,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                        ptr: key.as_ptr() as *mut _,
                        size: key.len(),
                    },
                },
            ),
            vu(
                V::RD_KAFKA_VTYPE_VALUE,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                        ptr: value.as_ptr() as *mut _,
                        size: value.len(),
                    },
                },
            ),
        ];
        for ((_, value), name) in headers.iter().zip(&names) {
            let (val, size) = match value {
                Some(v) => (v.as_ptr().cast(), v.len() as isize),
                None => (std::ptr::null(), 0),
            };
            vus.push(vu(
                V::RD_KAFKA_VTYPE_HEADER,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    header: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                        name: name.as_ptr(),
                        val,
                        size,
                    },
                },
            ));
        }
        // SAFETY: every pointer refers to memory alive until this call returns, and
        // librdkafka copies what it keeps (F_COPY for key and value, and the headers).
        let error = unsafe {
            rd::rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), vus.len())
        };
        if !error.is_null() {
            // SAFETY: a non-null error from produceva is ours to read and destroy.
            let message = unsafe { std::ffi::CStr::from_ptr(rd::rd_kafka_error_string(error)) }
                .to_string_lossy()
                .into_owned();
            unsafe { rd::rd_kafka_error_destroy(error) };
            panic!("producing a raw record: {message}");
        }
        producer
            .flush(Duration::from_secs(30))
            .expect("raw record written");
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

/// A header's (last) value as text.
pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    kd_pipeline::record::Record::from_message(m, m.topic().into()).header_text(key)
}

impl Kafka {
    pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
        header(m, key)
    }

    pub fn value(m: &OwnedMessage) -> &[u8] {
        m.payload().unwrap_or_default()
    }
}
