//! The test broker itself: it must behave as Kafka does with the input real producers
//! send (multi-record, compressed batches), or every other test here could pass on a
//! broker that hides the bugs that matter. Stock Tansu 0.6.0's memory engine did not: a
//! fetch starting inside a multi-record batch got the *next* batch, and its latest offset
//! was wrong (`tools/tansu` fixes both). These tests fail on such a broker. The suite
//! runs on the SQLite engine (every codec but snappy, which it cannot read back) and
//! tests snappy input on the patched memory engine: both are checked here.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kd_testkit::Tansu;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

const RECORDS: i64 = 1000;

/// Keeps the largest batch (in records) the producer reported sending.
#[derive(Clone, Default)]
struct LargestBatch(Arc<Mutex<i64>>);

impl ClientContext for LargestBatch {
    fn stats(&self, stats: Statistics) {
        let mut largest = self.0.lock().unwrap();
        for t in stats.topics.values() {
            *largest = (*largest).max(t.batchcnt.max);
        }
    }
}

impl ProducerContext for LargestBatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Produces `RECORDS` records as a stock producer with `linger.ms = 50` does: in
/// multi-record batches. Returns the most records the producer put in one batch.
async fn produce_batched(tansu: &Tansu, topic: &str, codec: &str) -> i64 {
    let context = LargestBatch::default();
    let producer: FutureProducer<LargestBatch> = ClientConfig::new()
        .set("bootstrap.servers", tansu.bootstrap())
        .set("linger.ms", "50")
        .set("compression.type", codec)
        .set("statistics.interval.ms", "100")
        .create_with_context(context.clone())
        .expect("producer");
    let mut pending = Vec::new();
    for n in 0..RECORDS {
        let value = format!("{{\"n\":{n}}}");
        // Two headers each (the SQLite engine stores them apart from the records).
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "n",
                value: Some(&n.to_string()),
            })
            .insert(Header {
                key: "second",
                value: Some("x"),
            });
        let record: FutureRecord<'_, str, str> = FutureRecord::to(topic)
            .key("k")
            .payload(value.as_str())
            .headers(headers)
            .partition(0);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for (n, d) in pending.into_iter().enumerate() {
        let delivery = d.await.unwrap().unwrap();
        assert_eq!((delivery.partition, delivery.offset), (0, n as i64));
    }
    // Statistics are emitted every 100 ms; the batches above are in the next ones.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let largest = *context.0.lock().unwrap();
    largest
}

/// Reads `topic` partition 0 from `from` to the end: the offsets returned.
fn read_from(tansu: &Tansu, topic: &str, from: i64) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", tansu.bootstrap())
        .set(
            "group.id",
            format!("broker-test-{}", kd_testkit::free_port()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(from))
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut offsets = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (offsets.len() as i64) < RECORDS - from && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("fetch");
            assert_eq!(
                m.payload(),
                Some(format!("{{\"n\":{}}}", m.offset()).as_bytes())
            );
            let headers: Vec<(String, Vec<u8>)> = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(
                headers,
                [
                    ("n".to_owned(), m.offset().to_string().into_bytes()),
                    ("second".to_owned(), b"x".to_vec())
                ],
                "the headers of offset {}",
                m.offset()
            );
            offsets.push(m.offset());
        }
    }
    offsets
}

/// Every fetch offset inside, at and after batches of each codec returns from that
/// offset, and the watermarks are right.
async fn fetches_from_inside_batches_are_right(tansu: &Tansu, codecs: &[&str]) {
    for &codec in codecs {
        let topic = format!("batched-{codec}");
        tansu.create_topic(&topic, 1);
        let largest = produce_batched(tansu, &topic, codec).await;
        assert!(
            largest >= 10,
            "{codec}: the producer sent multi-record batches (largest: {largest} records)"
        );

        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", tansu.bootstrap())
            .create()
            .unwrap();
        let (low, high) = reader
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .unwrap();
        assert_eq!((low, high), (0, RECORDS), "{codec}: watermarks");

        // Offsets at, just after and in the middle of batches, and the last one.
        for from in [0, 1, 7, 50, 333, 501, 998, RECORDS - 1] {
            let got = read_from(tansu, &topic, from);
            let want: Vec<i64> = (from..RECORDS).collect();
            assert!(
                got == want,
                "{codec}: a fetch from offset {from} returned {} records starting at {:?}",
                got.len(),
                got.first()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_fetches_from_inside_a_batch_return_every_record_and_the_high_watermark_is_right()
{
    fetches_from_inside_batches_are_right(&Tansu::start(), &["none", "gzip", "lz4", "zstd"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_memory_engine_every_codec_is_read_back_from_inside_batches() {
    fetches_from_inside_batches_are_right(
        &Tansu::start_memory(),
        &["none", "gzip", "snappy", "lz4", "zstd"],
    )
    .await;
}
